/* Prefill hand-over for attention (docs/decode.md "Prefill"): the decode step's ring of the
 * last `window` rows, built from a whole sequence that started at position 0.
 *
 *   ring_fill(x [B,S,...]; window) -> ring [B,window,...]
 *
 * Slot j holds the row of the last token s < S with s % window == j (the token at position s
 * lives in slot s % window, as ring_write puts it), zeros where no token maps (S < window).
 * Unlike ring_write over S tokens, every output element is a single read: its token is
 * computed, not searched for, so the cost does not grow with S. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>
#include <string.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0);
    char b[96];
    ir_shape_str(x, b, sizeof b);
    if (x->ndim < 3 || x->d[0] != DIM_B || x->d[1] != DIM_S) return OP_ERR("x must be [B,S,...], got %s", b);
    if (op_in_dtype(g, n, 0) == DT_I32) return OP_ERR("x must be a float tensor");
    if (n->ia[0] < 1 || n->ia[0] > (1L << 30)) return OP_ERR("window must be in [1, 2^30], got %ld", n->ia[0]);
    out[0] = *x;
    out[0].d[1] = (int)n->ia[0];
    dt[0] = DT_F32;
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), o = ref_get(c, n->out[0]);
    const long W = n->ia[0], F = x.feat, B = ref_B(c), S = ref_S(c);
    for (long b = 0; b < B; b++)
        for (long j = 0; j < W; j++) {
            double *row = o.p + b * o.ld + j * F;
            long last = -1;
            for (long s = j; s < S; s += W) last = s;
            for (long f = 0; f < F; f++) row[f] = last >= 0 ? x.p[(b * S + last) * x.ld + f] : 0.0;
        }
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    (void)g, (void)n, (void)B, (void)S;
    return 0.0;
}

/* One work-item per ring element. */
static int emit(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    const int x = n->in[0], out = n->out[0];
    const long W = n->ia[0], F = kg_feat(k, x), ldx = kg_ld(k, x), ldo = kg_ld(k, out);
    const int node = (int)(n - g->n);
    kg_begin(k, "ring_fill", node, node + 1);
    kg_in(k, "x", x);
    kg_out(k, "o", out);
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= B * %ldL) return;", W * F);
    kg_line(k, "const long b = i / %ldL, e = i %% %ldL, slot = e / %ldL, f = e %% %ldL;", W * F, W * F, F, F);
    kg_line(k, "float v = 0.0f;");
    kg_line(k, "if (slot < S) v = x[(b * S + slot + ((S - 1 - slot) / %ldL) * %ldL) * %ldL + f];", W, W, ldx);
    kg_line(k, "o[b * %ldL + e] = v;", ldo);
    kg_grid(k, 0, 0, W * F, 0, 0, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_ring_fill = {
    .name = "ring_fill",
    .nin = 1, .nout = 1,
    .iattr = {"window", NULL},
    .fattr = {NULL},
    .infer = infer,
    .grad = NULL,
    .ref = ref,
    .flops = flops,
    .emit = emit,
};
