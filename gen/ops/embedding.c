/* embedding: y[tok] = table[token[tok]]. tokens [B,S] (i32), table [V,d] -> [B,S,d].
 * Gradient: embedding_bwd(tokens, dy) sums dy rows into dtable [V,d] in token order, so the
 * result is deterministic (no atomics). */
#include "kgen.h"
#include "op.h"

#include <stdio.h>
#include <string.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *tok = op_in_shape(g, n, 0), *tab = op_in_shape(g, n, 1);
    if (op_in_dtype(g, n, 0) != DT_I32) return OP_ERR("tokens must be integer");
    if (ir_ntok_dims(tok) != tok->ndim) return OP_ERR("tokens must have only batch/sequence dims");
    if (tab->ndim != 2 || ir_ntok_dims(tab)) return OP_ERR("table must be a constant [V, d] matrix");
    out[0] = *tok;
    out[0].d[out[0].ndim++] = tab->d[1];
    dt[0] = DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *dy = op_in_shape(g, n, 1);
    if (n->ia[0] < 1) return OP_ERR("vocab must be positive");
    if (dy->ndim < 1) return OP_ERR("dy must have a feature dim");
    out[0] = ir_shape_make(2, (int[]){(int)n->ia[0], dy->d[dy->ndim - 1]});
    dt[0] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int in[2] = {n.in[0], dout[0]};
    long ia[IR_MAX_IATTR] = {g->t[n.in[1]].shape.d[0]};
    din[0] = -1;
    return ir_emit(g, "embedding_bwd", in, 2, ia, NULL, &din[1]) < 0 ? -1 : 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf tok = ref_get(c, n->in[0]), tab = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    long V = tab.feat / y.feat;
    for (long t = 0; t < y.ntok; t++) {
        long v = (long)tok.p[t * tok.ld];
        if (v < 0 || v >= V) v = 0;   /* the runtime only feeds bytes; keep the oracle total */
        memcpy(&y.p[t * y.ld], &tab.p[v * y.feat], sizeof(double) * (size_t)y.feat);
    }
}

static void ref_bwd(const ref_ctx *c, const ir_node *n) {
    ref_buf tok = ref_get(c, n->in[0]), dy = ref_get(c, n->in[1]), dt = ref_get(c, n->out[0]);
    long d = dy.feat, V = dt.feat / d;
    memset(dt.p, 0, sizeof(double) * (size_t)dt.feat);
    for (long t = 0; t < dy.ntok; t++) {
        long v = (long)tok.p[t * tok.ld];
        if (v < 0 || v >= V) continue;
        for (long f = 0; f < d; f++) dt.p[v * d + f] += dy.p[t * dy.ld + f];
    }
}

/* ---- kernel templates ---- */

/* Grid dim 0 covering `mult` x (token count of t), `div` per group. */
static void grid_tokens(kgen *k, int t, long mult, long div) {
    const ir_shape *s = &k->g->t[t].shape;
    int nt = ir_ntok_dims(s);
    if (nt == 2) kg_grid(k, 0, 0, 0, 0, mult, div);
    else if (nt == 1) kg_grid(k, 0, 0, s->d[0] == DIM_B ? mult : 0, s->d[0] == DIM_S ? mult : 0, 0, div);
    else kg_grid(k, 0, mult, 0, 0, 0, div);
}

/* One work-item per output element. Tokens live in the arena as exact floats. */
static int emit(kgen *k, const ir_node *n) {
    int tok = n->in[0], tab = n->in[1], y = n->out[0];
    long d = kg_feat(k, y), V = kg_feat(k, tab) / d;
    int node = (int)(n - k->g->n);
    kg_begin(k, "embedding", node, node + 1);
    kg_in(k, "tok", tok);
    kg_in(k, "tab", tab);
    kg_out(k, "y", y);
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= %s * %ld) return;", kg_ntok_expr(k, y), d);
    kg_line(k, "const long t = i / %ld, f = i %% %ld;", d, d);
    kg_line(k, "int v = (int)tok[t * %ld];", kg_ld(k, tok));
    kg_line(k, "if (v < 0 || v >= %ld) v = 0;   /* same total oracle as the reference */", V);
    kg_line(k, "y[t * %ld + f] = tab[(long)v * %ld + f];", kg_ld(k, y), d);
    grid_tokens(k, y, d, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

/* Work-group (v, feature block): each work-item owns dtable[v, f] and walks all tokens in
 * order, 256 token ids at a time through LOCAL memory, adding the dy rows whose token is v.
 * Deterministic and atomic-free; the token ids are read V times (fine for byte vocabularies). */
static int emit_bwd(kgen *k, const ir_node *n) {
    int tok = n->in[0], dy = n->in[1], dt = n->out[0];
    long d = kg_feat(k, dy), V = kg_feat(k, dt) / d;
    int node = (int)(n - k->g->n);
    kg_begin(k, "embedding_bwd", node, node + 1);
    kg_in(k, "tok", tok);
    kg_in(k, "dy", dy);
    kg_out(k, "dt", dt);
    kg_line(k, "LOCAL int ids[256];");
    kg_line(k, "const long NT = %s;", kg_ntok_expr(k, dy));
    kg_line(k, "const int v = (int)GID_X;");
    kg_line(k, "const int f = (int)GID_Y * 256 + LID_X;");
    kg_line(k, "float acc = 0.0f;");
    kg_line(k, "for (long t0 = 0; t0 < NT; t0 += 256) {");
    kg_line(k, "    ids[LID_X] = t0 + LID_X < NT ? (int)tok[(t0 + LID_X) * %ld] : -1;", kg_ld(k, tok));
    kg_line(k, "    BARRIER();");
    kg_line(k, "    if (f < %ld)", d);
    kg_line(k, "        for (int i = 0; i < 256; i++)");
    kg_line(k, "            if (ids[i] == v) acc += dy[(t0 + i) * %ld + f];", kg_ld(k, dy));
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
    kg_line(k, "if (f < %ld) dt[(long)v * %ld + f] = acc;", d, d);
    kg_grid(k, 0, V, 0, 0, 0, 1);
    kg_grid(k, 1, (d + 255) / 256, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_embedding = {.name = "embedding", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref,
                             .emit = emit};
const op_def op_embedding_bwd = {.name = "embedding_bwd", .nin = 2, .nout = 1, .infer = infer_bwd,
                                 .ref = ref_bwd, .emit = emit_bwd, .iattr = {"vocab", NULL}};
