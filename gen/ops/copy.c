/* copy: y = x. Autodiff uses it to land a gradient in a slice of a larger gradient buffer. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    (void)err; (void)errlen;
    out[0] = *op_in_shape(g, n, 0);
    dt[0] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    (void)g; (void)node;
    din[0] = dout[0];
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), y = ref_get(c, n->out[0]);
    for (long t = 0; t < y.ntok; t++)
        for (long f = 0; f < y.feat; f++) y.p[t * y.ld + f] = x.p[t * x.ld + f];
}

static void ew(strbuf *out, const ir_node *n, const char *const *in) {
    (void)n;
    sb_printf(out, "%s", in[0]);
}

const op_def op_copy = {.name = "copy", .nin = 1, .nout = 1, .infer = infer, .grad = grad, .ref = ref, .ew = ew};
