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

/* Whether owner t (and none of its views) is read only as a tensor-core operand: a matmul's x
 * (forward and input-gradient products: activations and output gradients) or either operand
 * of a weight gradient (the output gradient a, the input b). */
static int only_matmul_operand_reads(const ir_graph *g, int t) {
    int mm = op_find("matmul"), wg = op_find("matmul_wgrad"), reads = 0;
    for (int i = 0; i < g->nn; i++)
        for (int q = 0; q < g->n[i].nin; q++) {
            int r = g->n[i].in[q];
            if (g->t[r].base != t) continue;
            if (r != t || !((g->n[i].op == mm && q == 0) || g->n[i].op == wg)) return 0;
            reads++;
        }
    return reads > 0;
}

/* Producers that can store bf16: rmsnorm (its bf16_out attribute) and elementwise ops, which
 * plan.c renders in fused kernels or matmul epilogues (emit_chain rounds at the store). */
static int stores_bf16(const ir_graph *g, int node) {
    const op_def *d = op_get(g->n[node].op);
    return g->n[node].nout == 1 && (strcmp(d->name, "rmsnorm") == 0 || d->ew);
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
    int mm = op_find("matmul"), rms = op_find("rmsnorm"), changed = 0;
    for (int y = 0; y < g->nt; y++) {
        const ir_tensor *t = &g->t[y];
        if (t->base != y || y == g->loss || t->dtype != DT_F32 || (t->role != ROLE_ACT && t->role != ROLE_GRAD) ||
            !rows_of_8(g, y) || ir_feat(&t->shape) != t->shape.d[t->shape.ndim - 1] || !only_bf16_writers(g, y) ||
            !only_matmul_operand_reads(g, y))
            continue;
        for (int v = 0; v < g->nt; v++)
            if (g->t[v].base == y) g->t[v].dtype = DT_BF16;
        for (int i = 0; i < g->nn; i++)
            if (g->n[i].op == rms && g->t[g->n[i].out[0]].base == y) g->n[i].ia[0] = 1;
        changed++;
    }
    for (int i = 0; i < g->nn; i++) {
        if (g->n[i].op != mm) continue;
        int w = g->n[i].in[1];
        if (g->t[w].role != ROLE_PARAM || g->t[w].base != w || g->t[w].dtype != DT_F32 || !rows_of_8(g, w)) continue;
        /* node i is the first matmul reading w (the forward's): its copy is made right before
         * it, and every matmul reading w (the input gradient's, recomputed ones) reads the copy;
         * the weight gradient does not read w */
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
            if (g->n[j].op == mm && g->n[j].in[1] == w) g->n[j].in[1] = cast;
        changed++;
        i++;
    }
    return changed;
}
