/* rmsnorm: y = x / sqrt(mean(x^2) + eps) * w over the last dim; x [..., d], w [d].
 * Gradient: rmsnorm_bwd(x, w, dy) -> (dx, dw) with r = 1/sqrt(mean(x^2)+eps):
 *   dx = r (w*dy) - r^3/d * x * sum(w*dy*x),   dw = sum over rows of dy * x * r. */
#include "op.h"

#include <math.h>
#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0), *w = op_in_shape(g, n, 1);
    if (x->ndim < 1 || ir_ntok_dims(x) == x->ndim) return OP_ERR("input needs a feature dim");
    if (w->ndim != 1 || w->d[0] != x->d[x->ndim - 1])
        return OP_ERR("weight must be [%d]", x->d[x->ndim - 1]);
    if (!(n->fa[0] > 0)) return OP_ERR("eps must be positive");
    out[0] = *x;
    dt[0] = DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    if (!ir_shape_eq(op_in_shape(g, n, 0), op_in_shape(g, n, 2))) return OP_ERR("x and dy shapes differ");
    out[0] = *op_in_shape(g, n, 0);
    out[1] = *op_in_shape(g, n, 1);
    dt[0] = dt[1] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int in[3] = {n.in[0], n.in[1], dout[0]};
    return ir_emit(g, "rmsnorm_bwd", in, 3, n.ia, n.fa, din) < 0 ? -1 : 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), w = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    long d = w.feat, rows = ref_rows(x, d);
    for (long r = 0; r < rows; r++) {
        const double *xr = ref_row(x, r, d);
        double *yr = ref_row(y, r, d), ss = 0;
        for (long i = 0; i < d; i++) ss += xr[i] * xr[i];
        double rs = 1.0 / sqrt(ss / (double)d + n->fa[0]);
        for (long i = 0; i < d; i++) yr[i] = xr[i] * rs * w.p[i];
    }
}

static void ref_bwd(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), w = ref_get(c, n->in[1]), dy = ref_get(c, n->in[2]);
    ref_buf dx = ref_get(c, n->out[0]), dw = ref_get(c, n->out[1]);
    long d = w.feat, rows = ref_rows(x, d);
    for (long i = 0; i < d; i++) dw.p[i] = 0;
    for (long r = 0; r < rows; r++) {
        const double *xr = ref_row(x, r, d), *dyr = ref_row(dy, r, d);
        double *dxr = ref_row(dx, r, d), ss = 0, dot = 0;
        for (long i = 0; i < d; i++) {
            ss += xr[i] * xr[i];
            dot += w.p[i] * dyr[i] * xr[i];
        }
        double rs = 1.0 / sqrt(ss / (double)d + n->fa[0]);
        for (long i = 0; i < d; i++) {
            dxr[i] = rs * w.p[i] * dyr[i] - rs * rs * rs / (double)d * xr[i] * dot;
            dw.p[i] += dyr[i] * xr[i] * rs;
        }
    }
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    return 4.0 * (double)ir_numel(&g->t[n->in[0]].shape, B, S);
}

const op_def op_rmsnorm = {.name = "rmsnorm", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref,
                           .flops = flops, .fattr = {"eps", NULL}, .fa_default = {1e-5}};
const op_def op_rmsnorm_bwd = {.name = "rmsnorm_bwd", .nin = 3, .nout = 2, .infer = infer_bwd, .ref = ref_bwd,
                               .flops = flops, .fattr = {"eps", NULL}, .fa_default = {1e-5}};
