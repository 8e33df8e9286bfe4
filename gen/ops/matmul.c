/* matmul: y = x W^T with W [N,K] (trans = 0, the nn.Linear layout), or y = x W with W [K,N]
 * (trans = 1). x is [..., K]; y is [..., N]. W must be a constant-shaped matrix.
 * Gradient: dx = matmul(dy, W) with the other transposition; dW = matmul_wgrad, which
 * contracts over every row: matmul_wgrad(a [..., P], b [..., Q]) = sum_rows a^T b : [P, Q]. */
#include "op.h"

#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0), *w = op_in_shape(g, n, 1);
    if (w->ndim != 2 || ir_ntok_dims(w)) return OP_ERR("weight must be a constant 2-D matrix");
    if (x->ndim < 1 || ir_ntok_dims(x) == x->ndim) return OP_ERR("input needs a feature dim");
    int K = x->d[x->ndim - 1];
    int wk = n->ia[0] ? w->d[0] : w->d[1], wn = n->ia[0] ? w->d[1] : w->d[0];
    if (wk != K) return OP_ERR("input has %d features but the weight expects %d", K, wk);
    out[0] = *x;
    out[0].d[x->ndim - 1] = wn;
    dt[0] = DT_F32;
    return 0;
}

static int infer_wgrad(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *a = op_in_shape(g, n, 0), *b = op_in_shape(g, n, 1);
    if (a->ndim < 1 || b->ndim < 1) return OP_ERR("inputs need a feature dim");
    int P = a->d[a->ndim - 1], Q = b->d[b->ndim - 1];
    ir_shape ra = *a, rb = *b;
    ra.d[ra.ndim - 1] = rb.d[rb.ndim - 1] = 1;
    if (!ir_shape_eq(&ra, &rb)) return OP_ERR("inputs have different row dims");
    out[0] = ir_shape_make(2, (int[]){P, Q});
    dt[0] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int x = n.in[0], w = n.in[1];
    long ia[IR_MAX_IATTR] = {!n.ia[0]};
    int in_dx[2] = {dout[0], w};
    if (ir_emit(g, "matmul", in_dx, 2, ia, NULL, &din[0]) < 0) return -1;
    int in_dw[2] = {dout[0], x};
    if (n.ia[0]) in_dw[0] = x, in_dw[1] = dout[0];
    return ir_emit(g, "matmul_wgrad", in_dw, 2, NULL, NULL, &din[1]) < 0 ? -1 : 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), w = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    const ir_shape *xs = ref_shape(c, n->in[0]);
    long K = xs->d[xs->ndim - 1], N = w.feat / K, rows = ref_rows(x, K);
    for (long r = 0; r < rows; r++) {
        const double *xr = ref_row(x, r, K);
        double *yr = ref_row(y, r, N);
        for (long j = 0; j < N; j++) {
            double acc = 0;
            for (long k = 0; k < K; k++) acc += xr[k] * (n->ia[0] ? w.p[k * N + j] : w.p[j * K + k]);
            yr[j] = acc;
        }
    }
}

static void ref_wgrad(const ref_ctx *c, const ir_node *n) {
    ref_buf a = ref_get(c, n->in[0]), b = ref_get(c, n->in[1]), o = ref_get(c, n->out[0]);
    const ir_shape *as = ref_shape(c, n->in[0]), *bs = ref_shape(c, n->in[1]);
    long P = as->d[as->ndim - 1], Q = bs->d[bs->ndim - 1], rows = ref_rows(a, P);
    for (long i = 0; i < P * Q; i++) o.p[i] = 0;
    for (long r = 0; r < rows; r++) {
        const double *ar = ref_row(a, r, P), *br = ref_row(b, r, Q);
        for (long p = 0; p < P; p++)
            for (long q = 0; q < Q; q++) o.p[p * Q + q] += ar[p] * br[q];
    }
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    const ir_shape *y = &g->t[n->out[0]].shape, *x = &g->t[n->in[0]].shape;
    return 2.0 * (double)ir_numel(y, B, S) * x->d[x->ndim - 1];
}

static double flops_wgrad(const ir_graph *g, const ir_node *n, long B, long S) {
    const ir_shape *a = &g->t[n->in[0]].shape, *b = &g->t[n->in[1]].shape;
    return 2.0 * (double)ir_numel(a, B, S) * b->d[b->ndim - 1];
}

const op_def op_matmul = {.name = "matmul", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref,
                          .flops = flops, .iattr = {"trans", NULL}};
const op_def op_matmul_wgrad = {.name = "matmul_wgrad", .nin = 2, .nout = 1, .infer = infer_wgrad,
                                .ref = ref_wgrad, .flops = flops_wgrad};
