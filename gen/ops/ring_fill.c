/* Prefill hand-over for attention (docs/decode.md "Prefill"): the decode step's ring of the
 * last `window` rows after a prompt, which may continue earlier turns.
 *
 *   ring_fill(x [B,S,...], ring [B,W,...], pos [B,S]) -> ring' [B,W,...]
 *
 * The tokens of row b sit at consecutive positions from P0 = pos[b, 0] (only that one is read),
 * and the token at position p lives in slot p % W, as ring_write puts it. Slot j of ring' holds
 * the row of the last token whose slot is j, or, where no token of the prompt maps (S < W),
 * the old ring's slot j: the previous turn's key or value at that slot, zeros after a reset.
 * Each output element depends on its own slot only, so the prefill graph updates the ring in
 * place. Unlike ring_write over S tokens, every output element is a single read: its token is
 * computed, not searched for, so the cost does not grow with S. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>
#include <string.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0), *r = op_in_shape(g, n, 1), *p = op_in_shape(g, n, 2);
    char b[96], br[96];
    ir_shape_str(x, b, sizeof b);
    ir_shape_str(r, br, sizeof br);
    if (x->ndim < 3 || x->d[0] != DIM_B || x->d[1] != DIM_S) return OP_ERR("x must be [B,S,...], got %s", b);
    if (op_in_dtype(g, n, 0) == DT_I32) return OP_ERR("x must be a float tensor");
    int ok = r->ndim == x->ndim && r->d[0] == DIM_B && r->d[1] > 0;
    for (int i = 2; ok && i < x->ndim; i++) ok = r->d[i] == x->d[i];
    if (!ok || op_in_dtype(g, n, 1) == DT_I32)
        return OP_ERR("ring must be a float tensor [B,window] followed by x's row dims (x %s), got %s", b, br);
    if (p->ndim != 2 || p->d[0] != DIM_B || p->d[1] != DIM_S) return OP_ERR("positions (input 3) must be [B,S]");
    out[0] = *r;
    dt[0] = DT_F32;
    return 0;
}

static long ref_pos(double v) { return v > 0 ? (long)v : 0; }

/* Searches the tokens in order (the kernel computes the last one instead). */
static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), r = ref_get(c, n->in[1]), pos = ref_get(c, n->in[2]), o = ref_get(c, n->out[0]);
    const long W = ref_shape(c, n->in[1])->d[1], F = x.feat, B = ref_B(c), S = ref_S(c);
    for (long b = 0; b < B; b++) {
        const long P0 = ref_pos(pos.p[b * S * pos.ld]);
        for (long j = 0; j < W; j++) {
            double *row = o.p + b * o.ld + j * F;
            const double *old = r.p + b * r.ld + j * F;
            long last = -1;
            for (long s = 0; s < S; s++)
                if ((P0 + s) % W == j) last = s;
            for (long f = 0; f < F; f++) row[f] = last >= 0 ? x.p[(b * S + last) * x.ld + f] : old[f];
        }
    }
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    (void)g, (void)n, (void)B, (void)S;
    return 0.0;
}

/* One work-item per ring element: the first token s0 with slot (P0 + s0) % W, then the last one
 * s0 + k W < S, else the old element (read and written by the same work-item: in place is
 * safe). */
static int emit(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    const int x = n->in[0], ring = n->in[1], pos = n->in[2], out = n->out[0];
    const long W = g->t[ring].shape.d[1], F = kg_feat(k, x), ldx = kg_ld(k, x), ldo = kg_ld(k, out),
               ldr = kg_ld(k, ring), ldp = kg_ld(k, pos);
    const int node = (int)(n - g->n);
    kg_begin(k, "ring_fill", node, node + 1);
    kg_in(k, "x", x);
    kg_in(k, "ring", ring);
    kg_in(k, "pos", pos);
    kg_out(k, "o", out);
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= B * %ldL) return;", W * F);
    kg_line(k, "const long b = i / %ldL, e = i %% %ldL, slot = e / %ldL, f = e %% %ldL;", W * F, W * F, F, F);
    kg_line(k, "const float pv = pos[b * S * %ldL];", ldp);
    kg_line(k, "const long P0 = pv > 0.0f ? (long)pv : 0L;");
    kg_line(k, "const long s0 = (slot - P0 %% %ldL + %ldL) %% %ldL;", W, W, W);
    kg_line(k, "float v = ring[b * %ldL + e];", ldr);
    kg_line(k, "if (s0 < S) v = x[(b * S + s0 + ((S - 1 - s0) / %ldL) * %ldL) * %ldL + f];", W, W, ldx);
    kg_line(k, "o[b * %ldL + e] = v;", ldo);
    kg_grid(k, 0, 0, W * F, 0, 0, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_ring_fill = {
    .name = "ring_fill",
    .nin = 3, .nout = 1,
    .iattr = {NULL},
    .fattr = {NULL},
    .infer = infer,
    .grad = NULL,
    .ref = ref,
    .flops = flops,
    .emit = emit,
};
