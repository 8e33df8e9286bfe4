/* fill: a tensor of one value. Attributes: ndim, d0..d4 (DIM_B/DIM_S allowed) in ia; value fa[0].
 * Autodiff uses it for the loss seed and for gradient slices nothing flows into. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    (void)g;
    if (n->ia[0] < 0 || n->ia[0] > IR_MAX_DIMS) return OP_ERR("bad rank %ld", n->ia[0]);
    out[0].ndim = (int)n->ia[0];
    for (int i = 0; i < out[0].ndim; i++) out[0].d[i] = (int)n->ia[1 + i];
    dt[0] = DT_F32;
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf y = ref_get(c, n->out[0]);
    for (long t = 0; t < y.ntok; t++)
        for (long f = 0; f < y.feat; f++) y.p[t * y.ld + f] = n->fa[0];
}

static void ew(strbuf *out, const ir_node *n, const char *const *in) {
    (void)in;
    sb_printf(out, "((float)%.17g)", n->fa[0]);
}

const op_def op_fill = {.name = "fill", .nin = 0, .nout = 1, .infer = infer, .ref = ref,
                        .iattr = {"ndim", "d0", "d1", "d2", "d3", "d4", NULL}, .fattr = {"value", NULL}, .ew = ew};
