/* cross_entropy: mean over tokens of -log softmax(logits)[target]; logits [..., V] f32,
 * targets (i32) with logits' leading dims; output a scalar []. Gradient:
 * cross_entropy_bwd(logits, targets, dloss) = dloss * (softmax - onehot) / rows. */
#include "op.h"

#include <math.h>
#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *l = op_in_shape(g, n, 0), *t = op_in_shape(g, n, 1);
    if (op_in_dtype(g, n, 1) != DT_I32) return OP_ERR("targets must be integer");
    if (l->ndim != t->ndim + 1) return OP_ERR("logits must have one more dim than targets");
    for (int i = 0; i < t->ndim; i++)
        if (l->d[i] != t->d[i]) return OP_ERR("logits and targets disagree in dim %d", i + 1);
    out[0].ndim = 0;
    dt[0] = DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    (void)err; (void)errlen;
    out[0] = *op_in_shape(g, n, 0);
    dt[0] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int in[3] = {n.in[0], n.in[1], dout[0]};
    din[1] = -1;
    return ir_emit(g, "cross_entropy_bwd", in, 3, NULL, NULL, &din[0]) < 0 ? -1 : 0;
}

static double row_lse(const double *x, long V) {
    double m = x[0], s = 0;
    for (long j = 1; j < V; j++) if (x[j] > m) m = x[j];
    for (long j = 0; j < V; j++) s += exp(x[j] - m);
    return m + log(s);
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf l = ref_get(c, n->in[0]), t = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    const ir_shape *ls = ref_shape(c, n->in[0]);
    long V = ls->d[ls->ndim - 1], rows = ref_rows(l, V);
    double acc = 0;
    for (long r = 0; r < rows; r++) {
        const double *x = ref_row(l, r, V);
        long k = (long)*ref_row(t, r, 1);
        acc += row_lse(x, V) - x[k];
    }
    y.p[0] = acc / (double)rows;
}

static void ref_bwd(const ref_ctx *c, const ir_node *n) {
    ref_buf l = ref_get(c, n->in[0]), t = ref_get(c, n->in[1]), dl = ref_get(c, n->in[2]);
    ref_buf dx = ref_get(c, n->out[0]);
    const ir_shape *ls = ref_shape(c, n->in[0]);
    long V = ls->d[ls->ndim - 1], rows = ref_rows(l, V);
    double sc = dl.p[0] / (double)rows;
    for (long r = 0; r < rows; r++) {
        const double *x = ref_row(l, r, V);
        double *d = ref_row(dx, r, V), lse = row_lse(x, V);
        long k = (long)*ref_row(t, r, 1);
        for (long j = 0; j < V; j++) d[j] = sc * (exp(x[j] - lse) - (j == k));
    }
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    return 4.0 * (double)ir_numel(&g->t[n->in[0]].shape, B, S);
}

const op_def op_cross_entropy = {.name = "cross_entropy", .nin = 2, .nout = 1, .infer = infer, .grad = grad,
                                 .ref = ref, .flops = flops};
const op_def op_cross_entropy_bwd = {.name = "cross_entropy_bwd", .nin = 3, .nout = 1, .infer = infer_bwd,
                                     .ref = ref_bwd, .flops = flops};
