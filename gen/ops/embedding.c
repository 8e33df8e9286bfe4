/* embedding: y[tok] = table[token[tok]]. tokens [B,S] (i32), table [V,d] -> [B,S,d].
 * Gradient: embedding_bwd(tokens, dy) sums dy rows into dtable [V,d] in token order, so the
 * result is deterministic (no atomics). */
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

const op_def op_embedding = {.name = "embedding", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref};
const op_def op_embedding_bwd = {.name = "embedding_bwd", .nin = 2, .nout = 1, .infer = infer_bwd,
                                 .ref = ref_bwd, .iattr = {"vocab", NULL}};
