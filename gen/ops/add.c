/* add: y = a + b, same shapes. Gradient: passes dy to both inputs unchanged. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *a = op_in_shape(g, n, 0), *b = op_in_shape(g, n, 1);
    if (!ir_shape_eq(a, b)) {
        char sa[64], sb[64];
        ir_shape_str(a, sa, sizeof sa);
        ir_shape_str(b, sb, sizeof sb);
        return OP_ERR("shape mismatch %s vs %s", sa, sb);
    }
    out[0] = *a;
    dt[0] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    (void)g; (void)node;
    din[0] = din[1] = dout[0];
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf a = ref_get(c, n->in[0]), b = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    for (long t = 0; t < y.ntok; t++)
        for (long f = 0; f < y.feat; f++) y.p[t * y.ld + f] = a.p[t * a.ld + f] + b.p[t * b.ld + f];
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    return (double)ir_numel(&g->t[n->out[0]].shape, B, S);
}

static void ew(strbuf *out, const ir_node *n, const char *const *in) {
    (void)n;
    sb_printf(out, "(%s + %s)", in[0], in[1]);
}

const op_def op_add = {.name = "add", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref, .flops = flops, .ew = ew};
