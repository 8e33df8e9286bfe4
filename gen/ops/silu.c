/* silu: y = x * sigmoid(x). Gradient: silu_bwd(x, dy) = dy * s * (1 + x (1 - s)), s = sigmoid(x). */
#include "kgen.h"
#include "op.h"

#include <math.h>
#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    (void)err; (void)errlen;
    out[0] = *op_in_shape(g, n, 0);
    dt[0] = DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    if (!ir_shape_eq(op_in_shape(g, n, 0), op_in_shape(g, n, 1))) return OP_ERR("x and dy shapes differ");
    out[0] = *op_in_shape(g, n, 0);
    dt[0] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    int in[2] = {g->n[node].in[0], dout[0]};
    return ir_emit(g, "silu_bwd", in, 2, NULL, NULL, &din[0]) < 0 ? -1 : 0;
}

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), y = ref_get(c, n->out[0]);
    for (long t = 0; t < y.ntok; t++)
        for (long f = 0; f < y.feat; f++) {
            double v = x.p[t * x.ld + f];
            y.p[t * y.ld + f] = v * sigmoid(v);
        }
}

static void ref_bwd(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), dy = ref_get(c, n->in[1]), dx = ref_get(c, n->out[0]);
    for (long t = 0; t < dx.ntok; t++)
        for (long f = 0; f < dx.feat; f++) {
            double v = x.p[t * x.ld + f], s = sigmoid(v);
            dx.p[t * dx.ld + f] = dy.p[t * dy.ld + f] * s * (1.0 + v * (1.0 - s));
        }
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    return 4.0 * (double)ir_numel(&g->t[n->out[0]].shape, B, S);
}

static void ew(strbuf *out, const ir_node *n, const char *const *in) {
    (void)n;
    sb_printf(out, "(%s / (1.0f + EXPF(-%s)))", in[0], in[0]);
}

/* dy * s * (1 + x (1 - s)) with s = sigmoid(x) */
static void ew_bwd(strbuf *out, const ir_node *n, const char *const *in) {
    (void)n;
    sb_printf(out, "(%s * (1.0f / (1.0f + EXPF(-%s))) * (1.0f + %s * (1.0f - 1.0f / (1.0f + EXPF(-%s)))))", in[1], in[0],
              in[0], in[0]);
}

const op_def op_silu = {.name = "silu", .nin = 1, .nout = 1, .infer = infer, .grad = grad, .ref = ref, .flops = flops, .ew = ew,
                        .recompute = 1};
const op_def op_silu_bwd = {.name = "silu_bwd", .nin = 2, .nout = 1, .infer = infer_bwd, .ref = ref_bwd, .flops = flops, .ew = ew_bwd};
