/* Prefill from a carried state (docs/decode.md "Prefill"): the keys of earlier turns, held in
 * the decode step's rings, as a prefix of a prompt's sliding-window attention.
 *
 *   attention_prefix(o, lse, q, K, V, pos; scale) -> o' [B,S,H,Dh]
 *
 * o [B,S,H,Dh] and lse [B,S,H] are `attention`'s outputs over the prompt's own keys; q the same
 * (rotated) queries; K, V [B,W,Hkv,Dh] the rings of the last W keys (RoPE applied) and values
 * before the prompt, position p in slot p % W (ring_write, ring_fill); pos [B,S] the tokens'
 * positions, consecutive within a row, so row b starts at P0 = pos[b, 0] (only that one is
 * read). The query at position P = P0 + s sees positions max(0, P-W+1) .. P: the prompt's own
 * keys (already in o, lse) and the ring's positions max(0, P-W+1) .. P0-1, which exist only for
 * s < W-1. o' merges the two softmaxes exactly: with the prefix's max m, sum l and unnormalised
 * output a, o' = (o e^(lse-M) + a e^(m-M)) / (e^(lse-M) + l e^(m-M)), M = max(lse, m). Rows that
 * see no ring position are o itself.
 *
 * Keeping the prompt's part in the flash `attention` (and its tensor-core variants) unchanged
 * and merging afterwards costs one pass over at most W-1 queries per row; a prompt starting at
 * position 0 (empty rings) gives o' = o. */
#include "kgen.h"
#include "op.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { IN_O, IN_LSE, IN_Q, IN_K, IN_V, IN_POS, IN_N };

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *o = op_in_shape(g, n, IN_O), *q = op_in_shape(g, n, IN_Q), *K = op_in_shape(g, n, IN_K);
    char bo[96], bk[96];
    ir_shape_str(o, bo, sizeof bo);
    ir_shape_str(K, bk, sizeof bk);
    if (o->ndim != 4 || o->d[0] != DIM_B || o->d[1] != DIM_S || o->d[2] <= 0 || o->d[3] <= 0)
        return OP_ERR("o must be [B,S,heads,head_dim], got %s", bo);
    if (!ir_shape_eq(o, q)) return OP_ERR("q must have o's shape %s", bo);
    const int H = o->d[2];
    if (op_want_input(g, n, IN_LSE, 2, &H, 1, "lse", err, errlen)) return -1;
    if (K->ndim != 4 || K->d[0] != DIM_B || K->d[1] <= 0 || K->d[2] <= 0 || K->d[3] != o->d[3])
        return OP_ERR("K must be a ring [B,window,kv_heads,%d], got %s", o->d[3], bk);
    if (!ir_shape_eq(K, op_in_shape(g, n, IN_V))) return OP_ERR("K and V rings must have the same shape");
    if (H % K->d[2] != 0) return OP_ERR("query heads (%d) must be a multiple of kv heads (%d)", H, K->d[2]);
    const ir_shape *p = op_in_shape(g, n, IN_POS);
    if (p->ndim != 2 || p->d[0] != DIM_B || p->d[1] != DIM_S) return OP_ERR("positions (input 6) must be [B,S]");
    if (!isfinite(n->fa[0])) return OP_ERR("scale must be finite (0 selects 1/sqrt(head_dim))");
    out[0] = *o;
    dt[0] = DT_F32;
    return 0;
}

static double scale_of(double s, long Dh) { return s != 0.0 ? s : 1.0 / sqrt((double)Dh); }

static long ref_pos(double v) { return v > 0 ? (long)v : 0; }

/* The prefix's plain softmax (fp64), merged with (o, lse). */
static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf o = ref_get(c, n->in[IN_O]), lse = ref_get(c, n->in[IN_LSE]), q = ref_get(c, n->in[IN_Q]);
    ref_buf K = ref_get(c, n->in[IN_K]), V = ref_get(c, n->in[IN_V]), pos = ref_get(c, n->in[IN_POS]);
    ref_buf y = ref_get(c, n->out[0]);
    const ir_shape *qs = ref_shape(c, n->in[IN_Q]), *ks = ref_shape(c, n->in[IN_K]);
    const long H = qs->d[2], Dh = qs->d[3], W = ks->d[1], Hkv = ks->d[2], group = H / Hkv, S = ref_S(c);
    const double scale = scale_of(n->fa[0], Dh);
    double *sc = malloc(sizeof(double) * (size_t)W), *a = malloc(sizeof(double) * (size_t)Dh);
    for (long t = 0; t < q.ntok; t++) {
        const long b = t / S, s = t % S, P0 = ref_pos(pos.p[b * S * pos.ld]), P = P0 + s;
        const long lo = P - W + 1 > 0 ? P - W + 1 : 0;
        for (long h = 0; h < H; h++) {
            const double *oi = o.p + t * o.ld + h * Dh;
            double *yi = y.p + t * y.ld + h * Dh;
            if (lo >= P0) {
                memmove(yi, oi, sizeof(double) * (size_t)Dh);
                continue;
            }
            const double *qi = q.p + t * q.ld + h * Dh;
            const long kvo = (h / group) * Dh;
            double m = -INFINITY, l = 0;
            for (long j = lo; j < P0; j++) {
                const double *kj = K.p + b * K.ld + (j % W) * Hkv * Dh + kvo;
                double d = 0;
                for (long e = 0; e < Dh; e++) d += qi[e] * kj[e];
                sc[j - lo] = scale * d;
                if (sc[j - lo] > m) m = sc[j - lo];
            }
            for (long e = 0; e < Dh; e++) a[e] = 0;
            for (long j = lo; j < P0; j++) {
                const double p = exp(sc[j - lo] - m);
                l += p;
                for (long e = 0; e < Dh; e++) a[e] += p * V.p[b * V.ld + (j % W) * Hkv * Dh + kvo + e];
            }
            const double L = lse.p[t * lse.ld + h], M = L > m ? L : m, wn = exp(L - M), wp = exp(m - M);
            for (long e = 0; e < Dh; e++) yi[e] = (oi[e] * wn + a[e] * wp) / (wn + l * wp);
        }
    }
    free(sc);
    free(a);
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    const ir_shape *q = op_in_shape(g, n, IN_Q), *K = op_in_shape(g, n, IN_K);
    const double W = K->d[1], rows = (double)B * (S < W - 1 ? (double)S : W - 1);
    /* at most W-1 queries per row see at most W-1 ring positions each */
    return 4.0 * rows * q->d[2] * q->d[3] * (W - 1);
}

/* One launch, two kinds of work-group, so every element of o' is written once:
 *  the first B (W-1) H groups, one per (b, s < W-1, head), attention_ring's design: work-item r
 *    takes ring positions lo + r, lo + r + WG, ... < P0 with its own online softmax, and the
 *    partial states are merged in work-item order with (o, lse) as one more partial: a fixed
 *    order, deterministic. A row with no ring position (P0 = 0) merges nothing and writes o;
 *  then one group per token, copying o for the rows s >= W-1, which see no ring position.
 * Both kinds pass the one barrier (PoCL mishandles barriers inside branches). */
static int emit(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    const int o = n->in[IN_O], lse = n->in[IN_LSE], q = n->in[IN_Q], K = n->in[IN_K], V = n->in[IN_V],
              pos = n->in[IN_POS], y = n->out[0];
    const ir_shape *qs = &g->t[q].shape, *ks = &g->t[K].shape;
    const long H = qs->d[2], D = qs->d[3], W = ks->d[1], Hkv = ks->d[2], group = H / Hkv, F = H * D;
    const long ldo = kg_ld(k, o), ldy = kg_ld(k, y), ldp = kg_ld(k, pos);
    const int node = (int)(n - g->n);
    long WG = 64;
    while (WG > 1 && WG * D > 8192) WG /= 2;   /* partial accumulators: WG x Dh floats of local memory */
    char scale[48];
    snprintf(scale, sizeof scale, "((float)%.8ef)", (double)(float)scale_of(n->fa[0], D));
    kg_begin(k, "attention_prefix", node, node + 1);
    kg_in(k, "o", o);
    kg_in(k, "lse", lse);
    kg_in(k, "q", q);
    kg_in(k, "K", K);
    kg_in(k, "V", V);
    kg_in(k, "pos", pos);
    kg_out(k, "y", y);
    kg_line(k, "LOCAL float pm[%ld], pl[%ld], pacc[%ld];", WG, WG, WG * D);
    kg_line(k, "const int r = LID_X;");
    kg_line(k, "const long npre = B * %ldL;   /* the prefix groups */", (W - 1) * H);
    kg_line(k, "const int pre = GID_X < npre;");
    kg_line(k, "const long bs = pre ? GID_X / %ld : 0, h = pre ? GID_X %% %ld : 0;", H, H);
    kg_line(k, "const long b = pre ? bs / %ldL : (GID_X - npre) / S, s = pre ? bs %% %ldL : (GID_X - npre) %% S;", W > 1 ? W - 1 : 1,
            W > 1 ? W - 1 : 1);
    /* prefix groups past the row (S < W-1) run the same steps on nothing and write nothing */
    kg_line(k, "const int live = pre && s < S;");
    kg_line(k, "const long tok = b * S + (s < S ? s : 0);");
    kg_line(k, "const float pv = pos[b * S * %ldL];", ldp);
    kg_line(k, "const long P0 = pv > 0.0f ? (long)pv : 0L, P = P0 + s;");
    kg_line(k, "const long lo = P - %ldL > 0 ? P - %ldL : 0L;", W - 1, W - 1);
    kg_line(k, "const long kvo = (h / %ld) * %ld;", group, D);
    kg_line(k, "GLOBAL const float *qi = q + tok * %ldL + h * %ld;", kg_ld(k, q), D);
    kg_line(k, "float acc[%ld];", D);
    kg_line(k, "for (int e = 0; e < %ld; e++) acc[e] = 0.0f;", D);
    /* -1e30 instead of -inf: an empty partial rescales away as exp(-huge) = 0 */
    kg_line(k, "float m = -1.0e30f, l = 0.0f;");
    kg_line(k, "for (long j = lo + r; live && j < P0; j += %ld) {", WG);
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
    kg_line(k, "if (live) {");
    /* the prompt's own part is one more partial: max lse, sum 1, output o */
    kg_line(k, "    const float ls = lse[tok * %ldL + h];", kg_ld(k, lse));
    kg_line(k, "    float M = ls;");
    kg_line(k, "    for (int x = 0; x < %ld; x++) M = pm[x] > M ? pm[x] : M;", WG);
    kg_line(k, "    const float wn = EXPF(ls - M);");
    kg_line(k, "    float L = wn;");
    kg_line(k, "    for (int x = 0; x < %ld; x++) L += pl[x] * EXPF(pm[x] - M);", WG);
    kg_line(k, "    GLOBAL const float *oi = o + tok * %ldL + h * %ld;", ldo, D);
    kg_line(k, "    GLOBAL float *yi = y + tok * %ldL + h * %ld;", ldy, D);
    kg_line(k, "    for (int e = r; e < %ld; e += %ld) {", D, WG);
    kg_line(k, "        float a = oi[e] * wn;");
    kg_line(k, "        for (int x = 0; x < %ld; x++) a += pacc[x * %ld + e] * EXPF(pm[x] - M);", WG, D);
    kg_line(k, "        yi[e] = a / L;");
    kg_line(k, "    }");
    kg_line(k, "} else if (!pre && s >= %ldL) {", W - 1);
    kg_line(k, "    for (long f = r; f < %ldL; f += %ld) y[tok * %ldL + f] = o[tok * %ldL + f];", F, WG, ldy, ldo);
    kg_line(k, "}");
    kg_grid(k, 0, 0, (W - 1) * H, 0, 1, 1);
    kg_block(k, (int)WG, 1, 1);
    return kg_end(k);
}

const op_def op_attention_prefix = {
    .name = "attention_prefix",
    .nin = IN_N, .nout = 1,
    .iattr = {NULL},
    .fattr = {"scale", NULL},
    .fa_default = {0.0},
    .infer = infer,
    .grad = NULL,
    .ref = ref,
    .flops = flops,
    .emit = emit,
};
