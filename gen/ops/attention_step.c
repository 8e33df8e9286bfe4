/* The decode-side pieces of sliding-window attention (docs/decode.md):
 *
 *   rope_at(x, pos; base)        x [B,S,...,Dh], pos [B,S] -> y: RoPE at the absolute position
 *                                held in pos (the parallel "rope" uses s + pos_offset)
 *   ring_write(ring, x, pos)     ring [B,W,Hkv,Dh], x [B,S,Hkv,Dh], pos [B,S] -> ring' = ring
 *                                with x of token s in slot pos_s % W (tokens in order)
 *   attention_ring(q, K, V, pos; scale)
 *                                q [B,S,H,Dh], K, V [B,W,Hkv,Dh] rings -> o [B,S,H,Dh]: the
 *                                query at position p attends over positions
 *                                max(0, p-W+1) .. p, read from slots position % W
 *
 * Positions are exact small integers stored as floats (as tokens are). The ring's window W
 * is its second dim, so the causal window is the parallel form's (nn.attention). The decoder
 * runs S = 1; ring_write in place needs the tokens of one row to have distinct slots (S <= W
 * consecutive positions). */
#include "attention.h"
#include "kgen.h"
#include "op.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_pos(const ir_graph *g, const ir_node *n, int i, char *err, size_t errlen) {
    const ir_shape *p = op_in_shape(g, n, i);
    if (p->ndim != 2 || p->d[0] != DIM_B || p->d[1] != DIM_S) {
        char b[96];
        ir_shape_str(p, b, sizeof b);
        return OP_ERR("positions (input %d) must be [B,S], got %s", i + 1, b);
    }
    return 0;
}

/* A position as the reference reads it: the stored value, clamped to a sane integer. */
static long ref_pos(double v) { return v > 0 ? (long)v : 0; }

/* ---------------------------------------------------------------- rope_at */

static int rope_at_infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err,
                         size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0);
    char buf[96];
    ir_shape_str(x, buf, sizeof buf);
    if (x->ndim < 3 || x->d[0] != DIM_B || x->d[1] != DIM_S)
        return OP_ERR("x must be [B,S,...,head_dim], got %s", buf);
    if (x->d[x->ndim - 1] % 2 != 0) return OP_ERR("head_dim must be even (rotated in pairs), got %s", buf);
    if (op_in_dtype(g, n, 0) == DT_I32) return OP_ERR("x must be floating point");
    if (check_pos(g, n, 1, err, errlen)) return -1;
    if (!isfinite(n->fa[0]) || n->fa[0] <= 1.0) return OP_ERR("base must be a finite number > 1, got %g", n->fa[0]);
    out[0] = *x;
    dt[0] = DT_F32;
    return 0;
}

static void rope_at_ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), pos = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    const ir_shape *xs = ref_shape(c, n->in[0]);
    const long Dh = xs->d[xs->ndim - 1];
    for (long t = 0; t < x.ntok; t++)   /* one token at a time, at its own position */
        rope_ref(1, 1, x.feat / Dh, Dh, ref_pos(pos.p[t * pos.ld]), n->fa[0], 0, x.p + t * x.ld, x.ld,
                 y.p + t * y.ld, y.ld);
}

/* rope's kernel (gen/ops/rope.c) with the position read from the tensor: the frequency is a
 * 64-bit fixed-point count of turns per position, so pos * G wraps modulo one turn exactly
 * and the angle is exact up to the fp32 conversion at any position. */
static int rope_at_emit(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    const int x = n->in[0], pos = n->in[1], y = n->out[0];
    const ir_shape *xs = &g->t[x].shape;
    const long Dh = xs->d[xs->ndim - 1], NP = Dh / 2, H = kg_feat(k, x) / Dh;
    const double base = n->fa[0];
    const int node = (int)(n - g->n);
    kg_begin(k, "rope_at", node, node + 1);
    kg_in(k, "x", x);
    kg_in(k, "pos", pos);
    kg_out(k, "y", y);
    kg_line(k, "LOCAL unsigned long G[%ld];", NP);
    kg_line(k, "if (LID_X == 0) {");
    for (long i = 0; i < NP; i++) {
        const double turns = pow(base, -2.0 * (double)i / (double)Dh) / (2.0 * 3.14159265358979323846);
        kg_line(k, "    G[%ld] = 0x%016lxUL;", i, (unsigned long)ldexp(turns, 64));
    }
    kg_line(k, "}");
    kg_line(k, "BARRIER();");
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= T * %ld) return;   /* after the only barrier */", NP);
    kg_line(k, "const long tok = i / %ld;", NP);
    kg_line(k, "const int p = (int)(i %% %ld);", NP);
    kg_line(k, "const float pv = pos[tok * %ldL];", kg_ld(k, pos));
    kg_line(k, "const unsigned long ps = pv > 0.0f ? (unsigned long)(long)pv : 0UL;");
    kg_line(k, "const long turn = (long)(ps * G[p]);");
    const float rad = (float)(2.0 * 3.14159265358979323846 / ldexp(1.0, 64));
    kg_line(k, "const float a = (float)turn * ((float)%.8ef);", (double)rad);
    kg_line(k, "const float c = COSF(a), sn = SINF(a);");
    kg_line(k, "GLOBAL const float *xr = x + tok * %ldL + 2 * p;", kg_ld(k, x));
    kg_line(k, "GLOBAL float *yr = y + tok * %ldL + 2 * p;", kg_ld(k, y));
    kg_line(k, "for (int h = 0; h < %ld; h++) {", H);
    kg_line(k, "    const float x0 = xr[h * %ld], x1 = xr[h * %ld + 1];", Dh, Dh);
    kg_line(k, "    yr[h * %ld] = x0 * c - x1 * sn;", Dh);
    kg_line(k, "    yr[h * %ld + 1] = x0 * sn + x1 * c;", Dh);
    kg_line(k, "}");
    kg_grid(k, 0, 0, 0, 0, NP, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

static double rope_at_flops(const ir_graph *g, const ir_node *n, long B, long S) {
    return 3.0 * (double)ir_numel(op_in_shape(g, n, 0), B, S);
}

const op_def op_rope_at = {
    .name = "rope_at",
    .nin = 2, .nout = 1,
    .iattr = {NULL},
    .fattr = {"base", NULL},
    .fa_default = {10000.0},
    .infer = rope_at_infer,
    .ref = rope_at_ref,
    .flops = rope_at_flops,
    .emit = rope_at_emit,
};

/* ---------------------------------------------------------------- ring_write */

static int ring_infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *r = op_in_shape(g, n, 0), *x = op_in_shape(g, n, 1);
    char br[96], bx[96];
    ir_shape_str(r, br, sizeof br);
    ir_shape_str(x, bx, sizeof bx);
    if (r->ndim < 3 || r->d[0] != DIM_B || ir_ntok_dims(r) != 1)
        return OP_ERR("ring must be [B,window,...], got %s", br);
    int ok = x->ndim == r->ndim && x->d[0] == DIM_B && x->d[1] == DIM_S;
    for (int i = 2; ok && i < r->ndim; i++) ok = x->d[i] == r->d[i];
    if (!ok) return OP_ERR("x %s must be [B,S] followed by the ring's row dims (ring %s)", bx, br);
    if (check_pos(g, n, 2, err, errlen)) return -1;
    out[0] = *r;
    dt[0] = DT_F32;
    return 0;
}

static void ring_ref(const ref_ctx *c, const ir_node *n) {
    ref_buf r = ref_get(c, n->in[0]), x = ref_get(c, n->in[1]), pos = ref_get(c, n->in[2]), o = ref_get(c, n->out[0]);
    const long W = ref_shape(c, n->in[0])->d[1], F = r.feat / W, B = ref_B(c), S = ref_S(c);
    for (long b = 0; b < B; b++) {
        if (o.p != r.p) memcpy(o.p + b * o.ld, r.p + b * r.ld, sizeof(double) * (size_t)r.feat);
        for (long s = 0; s < S; s++) {
            const long t = b * S + s, slot = ref_pos(pos.p[t * pos.ld]) % W;
            memcpy(o.p + b * o.ld + slot * F, x.p + t * x.ld, sizeof(double) * (size_t)F);
        }
    }
}

/* In place (the output is the ring itself, as in the step graph) only the new rows are
 * written: one work-item per (token, feature). Otherwise every element of the output is
 * written: one work-item per ring element, taking the last token of its row that maps to its
 * slot, else the old value, so the result never depends on work-item order. */
static int ring_emit(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    const int ring = n->in[0], x = n->in[1], pos = n->in[2], out = n->out[0];
    const long W = g->t[ring].shape.d[1], F = kg_feat(k, ring) / W;
    const long ldr = kg_ld(k, ring), ldx = kg_ld(k, x), ldp = kg_ld(k, pos), ldo = kg_ld(k, out);
    const int inplace = g->t[ring].base == g->t[out].base && g->t[ring].offset == g->t[out].offset;
    const int node = (int)(n - g->n);
    kg_begin(k, inplace ? "ring_write_inplace" : "ring_write", node, node + 1);
    kg_in(k, "ring", ring);
    kg_in(k, "x", x);
    kg_in(k, "pos", pos);
    kg_out(k, "o", out);
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    if (inplace) {
        kg_line(k, "if (i >= T * %ldL) return;", F);
        kg_line(k, "const long tok = i / %ldL, f = i %% %ldL, b = tok / S;", F, F);
        kg_line(k, "const float pv = pos[tok * %ldL];", ldp);
        kg_line(k, "const long slot = (pv > 0.0f ? (long)pv : 0L) %% %ldL;", W);
        kg_line(k, "o[b * %ldL + slot * %ldL + f] = x[tok * %ldL + f];", ldo, F, ldx);
        kg_line(k, "(void)ring;");
        kg_grid(k, 0, 0, 0, 0, F, 256);
    } else {
        kg_line(k, "if (i >= B * %ldL) return;", W * F);
        kg_line(k, "const long b = i / %ldL, e = i %% %ldL, slot = e / %ldL, f = e %% %ldL;", W * F, W * F, F, F);
        kg_line(k, "float v = ring[b * %ldL + e];", ldr);
        kg_line(k, "for (long s = 0; s < S; s++) {");
        kg_line(k, "    const long tok = b * S + s;");
        kg_line(k, "    const float pv = pos[tok * %ldL];", ldp);
        kg_line(k, "    if ((pv > 0.0f ? (long)pv : 0L) %% %ldL == slot) v = x[tok * %ldL + f];", W, ldx);
        kg_line(k, "}");
        kg_line(k, "o[b * %ldL + e] = v;", ldo);
        kg_grid(k, 0, 0, W * F, 0, 0, 256);
    }
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_ring_write = {
    .name = "ring_write",
    .nin = 3, .nout = 1,
    .iattr = {NULL},
    .fattr = {NULL},
    .infer = ring_infer,
    .ref = ring_ref,
    .emit = ring_emit,
};

/* ---------------------------------------------------------------- attention_ring */

static int aring_infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err,
                       size_t errlen) {
    const ir_shape *q = op_in_shape(g, n, 0), *K = op_in_shape(g, n, 1), *V = op_in_shape(g, n, 2);
    char bq[96], bk[96];
    ir_shape_str(q, bq, sizeof bq);
    ir_shape_str(K, bk, sizeof bk);
    if (q->ndim != 4 || q->d[0] != DIM_B || q->d[1] != DIM_S || q->d[2] <= 0 || q->d[3] <= 0)
        return OP_ERR("q must be [B,S,heads,head_dim], got %s", bq);
    if (K->ndim != 4 || K->d[0] != DIM_B || K->d[1] <= 0 || K->d[2] <= 0 || K->d[3] != q->d[3])
        return OP_ERR("K must be a ring [B,window,kv_heads,%d], got %s", q->d[3], bk);
    if (!ir_shape_eq(K, V)) return OP_ERR("K and V rings must have the same shape");
    if (q->d[2] % K->d[2] != 0) return OP_ERR("query heads (%d) must be a multiple of kv heads (%d)", q->d[2], K->d[2]);
    if (check_pos(g, n, 3, err, errlen)) return -1;
    if (!isfinite(n->fa[0])) return OP_ERR("scale must be finite (0 selects 1/sqrt(head_dim))");
    out[0] = *q;
    dt[0] = DT_F32;
    return 0;
}

static double aring_scale(double s, long Dh) { return s != 0.0 ? s : 1.0 / sqrt((double)Dh); }

/* Plain softmax over the visible positions in increasing order (fp64). */
static void aring_ref(const ref_ctx *c, const ir_node *n) {
    ref_buf q = ref_get(c, n->in[0]), K = ref_get(c, n->in[1]), V = ref_get(c, n->in[2]), pos = ref_get(c, n->in[3]);
    ref_buf o = ref_get(c, n->out[0]);
    const ir_shape *qs = ref_shape(c, n->in[0]), *ks = ref_shape(c, n->in[1]);
    const long H = qs->d[2], Dh = qs->d[3], W = ks->d[1], Hkv = ks->d[2], group = H / Hkv, S = ref_S(c);
    const double scale = aring_scale(n->fa[0], Dh);
    double *p = malloc(sizeof(double) * (size_t)W);
    for (long t = 0; t < q.ntok; t++) {
        const long b = t / S, P = ref_pos(pos.p[t * pos.ld]), lo = P - W + 1 > 0 ? P - W + 1 : 0;
        for (long h = 0; h < H; h++) {
            const double *qi = q.p + t * q.ld + h * Dh;
            const long kvo = (h / group) * Dh;
            double mx = -INFINITY, sum = 0;
            for (long j = lo; j <= P; j++) {
                const double *kj = K.p + b * K.ld + (j % W) * Hkv * Dh + kvo;
                double d = 0;
                for (long e = 0; e < Dh; e++) d += qi[e] * kj[e];
                p[j - lo] = scale * d;
                if (p[j - lo] > mx) mx = p[j - lo];
            }
            for (long j = lo; j <= P; j++) sum += p[j - lo] = exp(p[j - lo] - mx);
            double *oi = o.p + t * o.ld + h * Dh;
            for (long e = 0; e < Dh; e++) {
                double a = 0;
                for (long j = lo; j <= P; j++) a += p[j - lo] * V.p[b * V.ld + (j % W) * Hkv * Dh + kvo + e];
                oi[e] = a / sum;
            }
        }
    }
    free(p);
}

static double aring_flops(const ir_graph *g, const ir_node *n, long B, long S) {
    const ir_shape *q = op_in_shape(g, n, 0), *K = op_in_shape(g, n, 1);
    return 4.0 * (double)B * (double)S * q->d[2] * q->d[3] * K->d[1];
}

/* Kernel: one work-group per (token, query head). Work-item r takes the visible positions
 * lo + r, lo + r + WG, ... with its own online softmax (max m, sum l, Dh accumulators); the
 * partial states are then merged in local memory in work-item order by the work-items owning
 * the output elements: a fixed order, so the result is deterministic. The cost is bounded by
 * the window, not the position. */
static int aring_emit(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    const int q = n->in[0], K = n->in[1], V = n->in[2], pos = n->in[3], o = n->out[0];
    const ir_shape *qs = &g->t[q].shape, *ks = &g->t[K].shape;
    const long H = qs->d[2], D = qs->d[3], W = ks->d[1], Hkv = ks->d[2], group = H / Hkv;
    long WG = 64;
    while (WG > 1 && WG * D > 8192) WG /= 2;   /* partial accumulators: WG x Dh floats of local memory */
    char scale[48];
    snprintf(scale, sizeof scale, "((float)%.8ef)", (double)(float)aring_scale(n->fa[0], D));
    const int node = (int)(n - g->n);
    kg_begin(k, "attention_ring", node, node + 1);
    kg_in(k, "q", q);
    kg_in(k, "K", K);
    kg_in(k, "V", V);
    kg_in(k, "pos", pos);
    kg_out(k, "o", o);
    kg_line(k, "LOCAL float pm[%ld], pl[%ld], pacc[%ld];", WG, WG, WG * D);
    kg_line(k, "const long tok = GID_X / %ld, h = GID_X %% %ld, b = tok / S;", H, H);
    kg_line(k, "const int r = LID_X;");
    kg_line(k, "const float pv = pos[tok * %ldL];", kg_ld(k, pos));
    kg_line(k, "const long P = pv > 0.0f ? (long)pv : 0L;");
    kg_line(k, "const long lo = P - %ldL > 0 ? P - %ldL : 0L;", W - 1, W - 1);
    kg_line(k, "const long kvo = (h / %ld) * %ld;", group, D);
    kg_line(k, "GLOBAL const float *qi = q + tok * %ldL + h * %ld;", kg_ld(k, q), D);
    kg_line(k, "float acc[%ld];", D);
    kg_line(k, "for (int e = 0; e < %ld; e++) acc[e] = 0.0f;", D);
    /* -1e30 instead of -inf: an empty partial rescales away as exp(-huge) = 0 */
    kg_line(k, "float m = -1.0e30f, l = 0.0f;");
    kg_line(k, "for (long j = lo + r; j <= P; j += %ld) {", WG);
    kg_line(k, "    GLOBAL const float *kj = K + b * %ldL + (j %% %ldL) * %ld + kvo;", kg_ld(k, K), W, Hkv * D);
    kg_line(k, "    GLOBAL const float *vj = V + b * %ldL + (j %% %ldL) * %ld + kvo;", kg_ld(k, V), W, Hkv * D);
    kg_line(k, "    float d = 0.0f;");
    kg_line(k, "    for (int e = 0; e < %ld; e++) d += qi[e] * kj[e];", D);
    kg_line(k, "    const float sc = %s * d;", scale);
    kg_line(k, "    if (sc > m) {");
    kg_line(k, "        const float corr = EXPF(m - sc);");
    kg_line(k, "        l *= corr;");
    kg_line(k, "        for (int e = 0; e < %ld; e++) acc[e] *= corr;", D);
    kg_line(k, "        m = sc;");
    kg_line(k, "    }");
    kg_line(k, "    const float p = EXPF(sc - m);");
    kg_line(k, "    l += p;");
    kg_line(k, "    for (int e = 0; e < %ld; e++) acc[e] += p * vj[e];", D);
    kg_line(k, "}");
    kg_line(k, "pm[r] = m;");
    kg_line(k, "pl[r] = l;");
    kg_line(k, "for (int e = 0; e < %ld; e++) pacc[r * %ld + e] = acc[e];", D, D);
    kg_line(k, "BARRIER();");
    kg_line(k, "float M = -1.0e30f;");
    kg_line(k, "for (int x = 0; x < %ld; x++) M = pm[x] > M ? pm[x] : M;", WG);
    kg_line(k, "float L = 0.0f;");
    kg_line(k, "for (int x = 0; x < %ld; x++) L += pl[x] * EXPF(pm[x] - M);", WG);
    kg_line(k, "GLOBAL float *oi = o + tok * %ldL + h * %ld;", kg_ld(k, o), D);
    kg_line(k, "for (int e = r; e < %ld; e += %ld) {", D, WG);
    kg_line(k, "    float a = 0.0f;");
    kg_line(k, "    for (int x = 0; x < %ld; x++) a += pacc[x * %ld + e] * EXPF(pm[x] - M);", WG, D);
    kg_line(k, "    oi[e] = a / L;");
    kg_line(k, "}");
    kg_grid(k, 0, 0, 0, 0, H, 1);
    kg_block(k, (int)WG, 1, 1);
    return kg_end(k);
}

const op_def op_attention_ring = {
    .name = "attention_ring",
    .nin = 4, .nout = 1,
    .iattr = {NULL},
    .fattr = {"scale", NULL},
    .fa_default = {0.0},
    .infer = aring_infer,
    .ref = aring_ref,
    .flops = aring_flops,
    .emit = aring_emit,
};
