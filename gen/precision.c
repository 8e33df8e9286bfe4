/* bf16 storage for tensors only tensor-core matmuls read (gen/precision.h).
 *
 * Why: the bf16 matmuls of realm-9m are short in K (288 to 768), so each output tile re-reads
 * its rows of x and of W from L2 for every column/row tile; with fp32 storage those re-reads
 * (about 2.8 GB for one Mamba in_proj at 8 x 8192) bound the kernel at ~1.2 TB/s of HBM
 * traffic. Stored as bf16 they are half the bytes, and the values are unchanged: the matmul's
 * loader rounds each fp32 operand to bf16 (round to nearest even) exactly as the producer now
 * does at its store. */
#include "precision.h"

#include "op.h"

#include <stdio.h>
#include <string.h>

/* Operands are copied in 16-byte chunks: rows of a multiple of 8 bf16 values. */
static int rows_of_8(const ir_graph *g, int t) { return ir_feat(&g->t[t].shape) % 8 == 0 && g->t[t].shape.d[g->t[t].shape.ndim - 1] % 8 == 0; }

/* Move the last node to position `pos`, shifting the nodes after it; producers follow. */
static void move_last_node(ir_graph *g, int pos) {
    int last = g->nn - 1;
    ir_node n = g->n[last];
    memmove(&g->n[pos + 1], &g->n[pos], sizeof(ir_node) * (size_t)(last - pos));
    g->n[pos] = n;
    for (int t = 0; t < g->nt; t++) {
        int p = g->t[t].producer;
        if (p == last) g->t[t].producer = pos;
        else if (p >= pos && p < last) g->t[t].producer = p + 1;
    }
}

/* Whether input q of node i may be stored as bf16 (op_def.bf16_in). */
static int reads_bf16(const ir_graph *g, int i, int q) { return (op_get(g->n[i].op)->bf16_in >> q) & 1u; }

/* Whether owner t (and none of its views) is read only by inputs that take bf16: operands of
 * the tensor-core matmuls (x of the forward and input-gradient products, both operands of a
 * weight gradient). */
static int only_bf16_reads(const ir_graph *g, int t) {
    int reads = 0;
    for (int i = 0; i < g->nn; i++)
        for (int q = 0; q < g->n[i].nin; q++) {
            int r = g->n[i].in[q];
            if (g->t[r].base != t) continue;
            if (r != t || !reads_bf16(g, i, q)) return 0;
            reads++;
        }
    return reads > 0;
}

/* The index of a primitive's "bf16_out" attribute, or -1 (op_def.bf16_in). */
static int bf16_out_attr(const op_def *d) {
    for (int a = 0; a < IR_MAX_IATTR && d->iattr[a]; a++)
        if (strcmp(d->iattr[a], "bf16_out") == 0) return a;
    return -1;
}

/* Writers that can store bf16: elementwise ops, which plan.c renders in fused kernels or
 * matmul epilogues (emit_chain rounds at the store), and primitives with a bf16_out attribute. */
static int stores_bf16(const ir_graph *g, int node) {
    const op_def *d = op_get(g->n[node].op);
    return g->n[node].nout == 1 && (d->ew || bf16_out_attr(d) >= 0);
}

/* Whether every node writing owner t (or a view of it: a gradient assembled from slices) can
 * store bf16. */
static int only_bf16_writers(const ir_graph *g, int t) {
    int writes = 0;
    for (int i = 0; i < g->nn; i++)
        for (int o = 0; o < g->n[i].nout; o++)
            if (g->t[g->n[i].out[o]].base == t) {
                if (!stores_bf16(g, i)) return 0;
                writes++;
            }
    return writes > 0;
}

int ir_bf16_storage(ir_graph *g) {
    if (g->backward_start <= 0) {
        snprintf(g->err, sizeof g->err, "bf16 storage is decided after autodiff");
        return -1;
    }
    int changed = 0;
    for (int y = 0; y < g->nt; y++) {
        const ir_tensor *t = &g->t[y];
        if (t->base != y || y == g->loss || t->dtype != DT_F32 || (t->role != ROLE_ACT && t->role != ROLE_GRAD) ||
            !rows_of_8(g, y) || ir_feat(&t->shape) != t->shape.d[t->shape.ndim - 1] || !only_bf16_writers(g, y) ||
            !only_bf16_reads(g, y))
            continue;
        for (int v = 0; v < g->nt; v++)
            if (g->t[v].base == y) g->t[v].dtype = DT_BF16;
        for (int i = 0; i < g->nn; i++) {
            const int a = bf16_out_attr(op_get(g->n[i].op));
            if (a >= 0 && g->t[g->n[i].out[0]].base == y) g->n[i].ia[a] = 1;
        }
        changed++;
    }
    for (int i = 0; i < g->nn; i++)
        for (int q = 0; q < g->n[i].nin; q++) {
            int w = g->n[i].in[q];
            if (!reads_bf16(g, i, q) || g->t[w].role != ROLE_PARAM || g->t[w].base != w || g->t[w].dtype != DT_F32 ||
                !rows_of_8(g, w))
                continue;
            /* node i is the first that reads weight w as a bf16 operand (the forward matmul): its
             * copy is made right before it, and every such read (the input gradient's matmul,
             * recomputed ones) takes the copy; other readers (an embedding) keep the fp32 w */
            int prev = g->cur_scope, cast;
            ir_scope_set(g, g->n[i].scope);
            int bs = g->backward_start, rc = ir_emit(g, "cast", &w, 1, NULL, NULL, &cast);
            ir_scope_set(g, prev);
            if (rc < 0) return -1;
            char name[128];
            snprintf(name, sizeof name, "%.100s.bf16", g->t[w].name);
            memcpy(g->t[cast].name, name, sizeof name);
            g->t[cast].role = ROLE_ACT;
            move_last_node(g, i);
            g->n[i].backward = i >= bs;
            g->backward_start = bs + (i < bs);
            for (int j = i + 1; j < g->nn; j++)
                for (int r = 0; r < g->n[j].nin; r++)
                    if (g->n[j].in[r] == w && reads_bf16(g, j, r)) g->n[j].in[r] = cast;
            changed++;
            i++;   /* node i is again the reader; its other inputs are looked at next */
        }
    return changed;
}
