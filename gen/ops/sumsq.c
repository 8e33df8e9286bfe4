/* sumsq: the sum of squares of every element of all inputs (up to IR_MAX_IO tensors), a
 * scalar. The optimizer uses it for the global gradient norm. The kernel is one work-group
 * reducing in a fixed order, so the result is bitwise reproducible. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    for (int i = 0; i < n->nin; i++)
        if (ir_ntok_dims(op_in_shape(g, n, i))) return OP_ERR("inputs must be constant-shaped (parameters)");
    out[0].ndim = 0;
    dt[0] = DT_F32;
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    double acc = 0;
    for (int i = 0; i < n->nin; i++) {
        ref_buf b = ref_get(c, n->in[i]);
        for (long k = 0; k < b.feat; k++) acc += b.p[k] * b.p[k];
    }
    ref_get(c, n->out[0]).p[0] = acc;
}

static int emit(kgen *k, const ir_node *n) {
    int id = (int)(n - k->g->n);
    kg_begin(k, "sumsq", id, id + 1);
    for (int i = 0; i < n->nin; i++) {
        char nm[16];
        snprintf(nm, sizeof nm, "g%d", i);
        kg_in(k, nm, n->in[i]);
    }
    kg_out(k, "out", n->out[0]);
    kg_line(k, "LOCAL float part[256];");
    kg_line(k, "const int l = LID_X;");
    kg_line(k, "float acc = 0.0f;");
    for (int i = 0; i < n->nin; i++)
        kg_line(k, "for (long j = l; j < %ld; j += 256) { const float v = g%d[j]; acc += v * v; }",
                kg_feat(k, n->in[i]), i);
    kg_line(k, "part[l] = acc;");
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s = 128; s > 0; s >>= 1) { if (l < s) part[l] += part[l + s]; BARRIER(); }");
    kg_line(k, "if (l == 0) out[0] = part[0];");
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    double f = 0;
    for (int i = 0; i < n->nin; i++) f += 2.0 * (double)ir_numel(&g->t[n->in[i]].shape, B, S);
    return f;
}

const op_def op_sumsq = {.name = "sumsq", .nin = -1, .nout = 1, .infer = infer, .ref = ref, .emit = emit, .flops = flops};
