/* Sliding-window causal attention: fp64 reference maths (forward, naive check, backward)
 * and the "attention" / "attention_bwd" primitives built on it. */
#include "attention.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long min_l(long a, long b) { return a < b ? a : b; }
static long max_l(long a, long b) { return a > b ? a : b; }

static double dot(const double *a, const double *b, long n) {
    double s = 0.0;
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* First key position visible to query position s. */
static long win_lo(const attn_dims *d, long s) { return max_l(0, s - d->window + 1); }

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz);
    if (!p) {
        fprintf(stderr, "realm: out of memory in attention reference\n");
        abort();
    }
    return p;
}

void attn_ref_forward(const attn_dims *d,
                      const double *q, long q_ld, const double *k, long k_ld,
                      const double *v, long v_ld,
                      double *o, long o_ld, double *lse, long lse_ld) {
    const long BLK = ATTN_REF_BLOCK, S = d->S, Dh = d->Dh, group = d->H / d->Hkv;
    /* Per-row running state of one query tile: max m, denominator l, unnormalised output. */
    double *m = xcalloc((size_t)BLK, sizeof *m);
    double *l = xcalloc((size_t)BLK, sizeof *l);
    double *acc = xcalloc((size_t)(BLK * Dh), sizeof *acc);
    double sc[ATTN_REF_BLOCK];
    for (long b = 0; b < d->B; b++)
        for (long h = 0; h < d->H; h++) {
            const long kvo = (h / group) * Dh;
            for (long i0 = 0; i0 < S; i0 += BLK) {
                const long i1 = min_l(S, i0 + BLK);
                for (long r = 0; r < i1 - i0; r++) {
                    m[r] = -INFINITY;
                    l[r] = 0.0;
                    memset(acc + r * Dh, 0, (size_t)Dh * sizeof *acc);
                }
                /* Key tiles that intersect the tile's band [win_lo(i0), i1-1]: tiles wholly
                 * before the band are never visited, which is the whole point of a window. */
                const long j_first = win_lo(d, i0) / BLK * BLK;
                for (long j0 = j_first; j0 < i1; j0 += BLK) {
                    const long j1 = min_l(S, j0 + BLK);
                    for (long i = i0; i < i1; i++) {
                        const long r = i - i0;
                        const long lo = max_l(j0, win_lo(d, i)), hi = min_l(j1 - 1, i);
                        if (lo > hi) continue;   /* this row sees nothing in this tile */
                        const double *qi = q + (b * S + i) * q_ld + h * Dh;
                        double mb = -INFINITY;
                        for (long j = lo; j <= hi; j++) {
                            sc[j - j0] = d->scale * dot(qi, k + (b * S + j) * k_ld + kvo, Dh);
                            if (sc[j - j0] > mb) mb = sc[j - j0];
                        }
                        const double mn = mb > m[r] ? mb : m[r];
                        /* exp(-inf) = 0 on the first visible tile: the empty state rescales away. */
                        const double corr = exp(m[r] - mn);
                        double *ar = acc + r * Dh;
                        l[r] *= corr;
                        for (long e = 0; e < Dh; e++) ar[e] *= corr;
                        for (long j = lo; j <= hi; j++) {
                            const double p = exp(sc[j - j0] - mn);
                            const double *vj = v + (b * S + j) * v_ld + kvo;
                            l[r] += p;
                            for (long e = 0; e < Dh; e++) ar[e] += p * vj[e];
                        }
                        m[r] = mn;
                    }
                }
                /* Every query sees at least itself, so l > 0 here. */
                for (long i = i0; i < i1; i++) {
                    const long r = i - i0;
                    double *oi = o + (b * S + i) * o_ld + h * Dh;
                    for (long e = 0; e < Dh; e++) oi[e] = acc[r * Dh + e] / l[r];
                    lse[(b * S + i) * lse_ld + h] = m[r] + log(l[r]);
                }
            }
        }
    free(m);
    free(l);
    free(acc);
}

void attn_ref_naive(const attn_dims *d,
                    const double *q, long q_ld, const double *k, long k_ld,
                    const double *v, long v_ld,
                    double *o, long o_ld, double *lse, long lse_ld) {
    const long S = d->S, Dh = d->Dh, group = d->H / d->Hkv;
    double *p = xcalloc((size_t)S, sizeof *p);
    for (long b = 0; b < d->B; b++)
        for (long h = 0; h < d->H; h++) {
            const long kvo = (h / group) * Dh;
            for (long i = 0; i < S; i++) {
                const double *qi = q + (b * S + i) * q_ld + h * Dh;
                double mx = -INFINITY;
                for (long j = 0; j < S; j++) {
                    const int visible = j <= i && i - j < d->window;
                    p[j] = visible ? d->scale * dot(qi, k + (b * S + j) * k_ld + kvo, Dh)
                                   : -INFINITY;
                    if (p[j] > mx) mx = p[j];
                }
                double sum = 0.0;
                for (long j = 0; j < S; j++) sum += (p[j] = exp(p[j] - mx));
                double *oi = o + (b * S + i) * o_ld + h * Dh;
                for (long e = 0; e < Dh; e++) {
                    double s = 0.0;
                    for (long j = 0; j < S; j++) s += p[j] * v[(b * S + j) * v_ld + kvo + e];
                    oi[e] = s / sum;
                }
                lse[(b * S + i) * lse_ld + h] = mx + log(sum);
            }
        }
    free(p);
}

void attn_ref_backward(const attn_dims *d,
                       const double *q, long q_ld, const double *k, long k_ld,
                       const double *v, long v_ld, const double *o, long o_ld,
                       const double *lse, long lse_ld, const double *dout, long do_ld,
                       double *dq, long dq_ld, double *dk, long dk_ld, double *dv, long dv_ld) {
    const long BLK = ATTN_REF_BLOCK, S = d->S, Dh = d->Dh, H = d->H, group = H / d->Hkv;
    const long ntok = d->B * S;
    /* D_i = do_i . o_i equals sum_j P_ij dP_ij; precomputing it is what lets the backward
     * run over key tiles without a second pass over the keys of each row. */
    double *D = xcalloc((size_t)(ntok * H), sizeof *D);
    for (long t = 0; t < ntok; t++)
        for (long h = 0; h < H; h++)
            D[t * H + h] = dot(dout + t * do_ld + h * Dh, o + t * o_ld + h * Dh, Dh);
    for (long t = 0; t < ntok; t++)
        memset(dq + t * dq_ld, 0, (size_t)(H * Dh) * sizeof *dq);
    /* Tile-local dk/dv accumulators: the kernel keeps these in registers and writes each key
     * tile once, which is why the shared-head sum needs no atomics. */
    double *dkt = xcalloc((size_t)(BLK * Dh), sizeof *dkt);
    double *dvt = xcalloc((size_t)(BLK * Dh), sizeof *dvt);
    for (long b = 0; b < d->B; b++)
        for (long g = 0; g < d->Hkv; g++) {
            const long kvo = g * Dh;
            for (long j0 = 0; j0 < S; j0 += BLK) {
                const long j1 = min_l(S, j0 + BLK);
                memset(dkt, 0, (size_t)(BLK * Dh) * sizeof *dkt);
                memset(dvt, 0, (size_t)(BLK * Dh) * sizeof *dvt);
                /* Queries that can see some key of the tile: j0 .. j1-1+window-1. */
                const long i_end = min_l(S, j1 - 1 + d->window);
                for (long h = g * group; h < (g + 1) * group; h++)
                    for (long i = j0; i < i_end; i++) {
                        const long ti = b * S + i;
                        const double *qi = q + ti * q_ld + h * Dh;
                        const double *doi = dout + ti * do_ld + h * Dh;
                        double *dqi = dq + ti * dq_ld + h * Dh;
                        const double Li = lse[ti * lse_ld + h], Di = D[ti * H + h];
                        const long lo = max_l(j0, win_lo(d, i)), hi = min_l(j1 - 1, i);
                        for (long j = lo; j <= hi; j++) {
                            const double *kj = k + (b * S + j) * k_ld + kvo;
                            const double *vj = v + (b * S + j) * v_ld + kvo;
                            const double p = exp(d->scale * dot(qi, kj, Dh) - Li);
                            const double ds = p * (dot(doi, vj, Dh) - Di) * d->scale;
                            double *dkr = dkt + (j - j0) * Dh, *dvr = dvt + (j - j0) * Dh;
                            for (long e = 0; e < Dh; e++) {
                                dvr[e] += p * doi[e];
                                dkr[e] += ds * qi[e];
                                dqi[e] += ds * kj[e];
                            }
                        }
                    }
                for (long j = j0; j < j1; j++) {
                    memcpy(dk + (b * S + j) * dk_ld + kvo, dkt + (j - j0) * Dh,
                           (size_t)Dh * sizeof *dk);
                    memcpy(dv + (b * S + j) * dv_ld + kvo, dvt + (j - j0) * Dh,
                           (size_t)Dh * sizeof *dv);
                }
            }
        }
    free(D);
    free(dkt);
    free(dvt);
}

double attn_visible_pairs(long S, long window) {
    const double s = (double)S, w = (double)window;
    if (window >= S) return s * (s + 1) / 2;
    return w * (w + 1) / 2 + (s - w) * w;
}

#ifndef ATTN_MATH_ONLY
/* ---- primitive glue ---- */
#include "kgen.h"
#include "op.h"

enum { IA_WINDOW = 0 };
enum { FA_SCALE = 0 };

/* Validates q, k, v (inputs 0..2) and returns H, Hkv, Dh. Shared by forward and backward so
 * both reject exactly the same graphs. */
static int check_qkv(const ir_graph *g, const ir_node *n, long *H, long *Hkv, long *Dh,
                     char *err, size_t errlen) {
    static const char *const nm[3] = {"q", "k", "v"};
    for (int i = 0; i < 3; i++) {
        const ir_shape *s = op_in_shape(g, n, i);
        char buf[96];
        ir_shape_str(s, buf, sizeof buf);
        if (s->ndim != 4 || s->d[0] != DIM_B || s->d[1] != DIM_S || s->d[2] <= 0 || s->d[3] <= 0)
            return OP_ERR("%s must be [B,S,heads,head_dim], got %s", nm[i], buf);
        if (op_in_dtype(g, n, i) == DT_I32) return OP_ERR("%s must be floating point", nm[i]);
    }
    const ir_shape *q = op_in_shape(g, n, 0), *k = op_in_shape(g, n, 1), *v = op_in_shape(g, n, 2);
    if (!ir_shape_eq(k, v)) {
        char bk[96], bv[96];
        ir_shape_str(k, bk, sizeof bk);
        ir_shape_str(v, bv, sizeof bv);
        return OP_ERR("k %s and v %s must have the same shape", bk, bv);
    }
    if (k->d[3] != q->d[3])
        return OP_ERR("q head_dim %d differs from k head_dim %d", q->d[3], k->d[3]);
    if (q->d[2] % k->d[2] != 0)
        return OP_ERR("query heads (%d) must be a multiple of kv heads (%d)", q->d[2], k->d[2]);
    if (n->ia[IA_WINDOW] < 1)
        return OP_ERR("window must be >= 1 (keys s-window+1..s are visible), got %ld",
                      n->ia[IA_WINDOW]);
    if (!isfinite(n->fa[FA_SCALE]))
        return OP_ERR("scale must be finite (0 selects 1/sqrt(head_dim))");
    *H = q->d[2];
    *Hkv = k->d[2];
    *Dh = q->d[3];
    return 0;
}

static int attention_infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt,
                           char *err, size_t errlen) {
    long H, Hkv, Dh;
    if (check_qkv(g, n, &H, &Hkv, &Dh, err, errlen) < 0) return -1;
    out[0] = *op_in_shape(g, n, 0);
    out[1] = ir_shape_make(3, (const int[]){DIM_B, DIM_S, (int)H});
    dt[0] = dt[1] = DT_F32;   /* lse stays fp32 whatever q is: the backward needs it exact */
    return 0;
}

static int attention_bwd_infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt,
                               char *err, size_t errlen) {
    long H, Hkv, Dh;
    if (check_qkv(g, n, &H, &Hkv, &Dh, err, errlen) < 0) return -1;
    const ir_shape *q = op_in_shape(g, n, 0);
    const ir_shape lse = ir_shape_make(3, (const int[]){DIM_B, DIM_S, (int)H});
    static const char *const nm[3] = {"o", "lse", "do"};
    const ir_shape *want[3] = {q, &lse, q};
    for (int i = 0; i < 3; i++) {
        const ir_shape *s = op_in_shape(g, n, 3 + i);
        if (!ir_shape_eq(s, want[i])) {
            char got[96], exp_[96];
            ir_shape_str(s, got, sizeof got);
            ir_shape_str(want[i], exp_, sizeof exp_);
            return OP_ERR("%s must be %s, got %s", nm[i], exp_, got);
        }
        if (op_in_dtype(g, n, 3 + i) == DT_I32) return OP_ERR("%s must be floating point", nm[i]);
    }
    for (int i = 0; i < 3; i++) {
        out[i] = *op_in_shape(g, n, i);
        dt[i] = DT_F32;
    }
    return 0;
}

static int attention_grad(ir_graph *g, int node, const int *dout, int *din) {
    din[0] = din[1] = din[2] = -1;
    if (dout[0] < 0) return 0;   /* lse is a side output: dout[1] never carries a gradient */
    /* Copy before emitting: ir_emit may reallocate g->n. */
    const ir_node nd = g->n[node];
    const int in[6] = {nd.in[0], nd.in[1], nd.in[2], nd.out[0], nd.out[1], dout[0]};
    int out[IR_MAX_IO];
    if (ir_emit(g, "attention_bwd", in, 6, nd.ia, nd.fa, out) != 3) return -1;
    for (int i = 0; i < 3; i++) din[i] = out[i];
    return 0;
}

static attn_dims ref_dims(const ref_ctx *c, const ir_node *n) {
    const ir_shape *q = ref_shape(c, n->in[0]), *k = ref_shape(c, n->in[1]);
    attn_dims d;
    d.B = ref_B(c);
    d.S = ref_S(c);
    d.H = q->d[2];
    d.Hkv = k->d[2];
    d.Dh = q->d[3];
    d.window = n->ia[IA_WINDOW];
    d.scale = n->fa[FA_SCALE] != 0.0 ? n->fa[FA_SCALE] : 1.0 / sqrt((double)d.Dh);
    return d;
}

static void attention_ref(const ref_ctx *c, const ir_node *n) {
    ref_buf q = ref_get(c, n->in[0]), k = ref_get(c, n->in[1]), v = ref_get(c, n->in[2]);
    ref_buf o = ref_get(c, n->out[0]), lse = ref_get(c, n->out[1]);
    attn_dims d = ref_dims(c, n);
    attn_ref_forward(&d, q.p, q.ld, k.p, k.ld, v.p, v.ld, o.p, o.ld, lse.p, lse.ld);
}

static void attention_bwd_ref(const ref_ctx *c, const ir_node *n) {
    ref_buf q = ref_get(c, n->in[0]), k = ref_get(c, n->in[1]), v = ref_get(c, n->in[2]);
    ref_buf o = ref_get(c, n->in[3]), lse = ref_get(c, n->in[4]), dO = ref_get(c, n->in[5]);
    ref_buf dq = ref_get(c, n->out[0]), dk = ref_get(c, n->out[1]), dv = ref_get(c, n->out[2]);
    attn_dims d = ref_dims(c, n);
    attn_ref_backward(&d, q.p, q.ld, k.p, k.ld, v.p, v.ld, o.p, o.ld, lse.p, lse.ld, dO.p, dO.ld,
                      dq.p, dq.ld, dk.p, dk.ld, dv.p, dv.ld);
}

static double attention_flops(const ir_graph *g, const ir_node *n, long B, long S) {
    const ir_shape *q = op_in_shape(g, n, 0);
    /* q.k and p*v: 2 multiply-adds per head-dim element per visible (query, key) pair. */
    return 4.0 * q->d[3] * q->d[2] * (double)B * attn_visible_pairs(S, n->ia[IA_WINDOW]);
}

static double attention_bwd_flops(const ir_graph *g, const ir_node *n, long B, long S) {
    /* Recomputed q.k, do.v, and the dq, dk, dv products: five matmuls to the forward's two. */
    return 2.5 * attention_flops(g, n, B, S);
}

/* ---- kernel templates ----
 * Simple, deterministic versions (no atomics, no LOCAL memory): one work-item per output row,
 * fp32 throughout, every size, stride, window and the scale baked into the source; only B, S
 * and T = B*S are runtime values.
 *   forward       : work-item (tok, h), h fastest. Online softmax over keys lo..s of its
 *                   sequence (running max m, sum l, Dh accumulators in a private array);
 *                   writes o row and lse = m + log(l).
 *   backward dq   : work-item (tok, h): loops over the same keys, p = exp(scale q.k - lse),
 *                   ds = p * (do.(v_j - o_i)) * scale, dq += ds k_j.
 *   backward dk/dv: work-item (tok, kv head g): loops over the query heads of the group, then
 *                   the queries s..min(S-1, s+window-1) that see this key (the reference's
 *                   order); dv += p do_i, dk += ds q_i.
 * do.(v_j - o_i) is do.v_j - D_i (D_i = do_i.o_i) written so that a query that only sees
 * itself (o_i == v_i exactly) gets exactly zero, as the reference does. */
typedef struct {
    long H, Hkv, Dh, group, window;
    char scale[48];
} attn_consts;

static attn_consts emit_consts(const kgen *k, const ir_node *n) {
    const ir_shape *q = &k->g->t[n->in[0]].shape, *kk = &k->g->t[n->in[1]].shape;
    attn_consts c;
    c.H = q->d[2];
    c.Hkv = kk->d[2];
    c.Dh = q->d[3];
    c.group = c.H / c.Hkv;
    c.window = n->ia[IA_WINDOW];
    const double sc = n->fa[FA_SCALE] != 0.0 ? n->fa[FA_SCALE] : 1.0 / sqrt((double)c.Dh);
    /* 9 significant digits round-trip the fp32 value exactly. */
    snprintf(c.scale, sizeof c.scale, "((float)%.8ef)", (double)(float)sc);
    return c;
}

#define ATTN_WG 64

/* Common prologue: work-item i -> (tok, head index hh of `nh`), s, first token of the
 * sequence t0. */
static void emit_row_prologue(kgen *k, long nh, const char *hname) {
    kg_line(k, "const long i = GID_X * %d + LID_X;", ATTN_WG);
    kg_line(k, "if (i >= T * %ld) return;", nh);
    kg_line(k, "const long tok = i / %ld;", nh);
    kg_line(k, "const long %s = i %% %ld;", hname, nh);
    kg_line(k, "const long s = tok %% S, t0 = tok - s;");
    kg_line(k, "(void)t0;");
}

/* Forward, work-group tiled: a work-group is ATTN_WG consecutive query positions of one
 * (sequence, head); grid x over query blocks, y over B*H. Key/value tiles of `bk` rows are
 * staged in LOCAL memory; the tile loop covers the whole group's band (uniform trip count
 * for the barriers) and each work-item visits only the keys in its own window, in key
 * order, so the result equals the one-row-per-work-item loop. Work-items past the end of the
 * sequence take part in the loads and barriers but compute nothing. */
static int attention_emit(struct kgen *k, const ir_node *n) {
    const attn_consts c = emit_consts(k, n);
    const int node = (int)(n - k->g->n);
    const int q = n->in[0], kk = n->in[1], v = n->in[2], o = n->out[0], lse = n->out[1];
    const long D = c.Dh;
    long bk = 8192 / D;                 /* two tiles of bk x Dh floats: 64 KiB / 2 at most */
    if (bk > 64) bk = 64;
    if (bk < 1) bk = 1;
    kg_begin(k, "attention", node, node + 1);
    kg_in(k, "q", q);
    kg_in(k, "k", kk);
    kg_in(k, "v", v);
    kg_out(k, "o", o);
    kg_out(k, "lse", lse);
    kg_line(k, "LOCAL float Kt[%ld], Vt[%ld];", bk * D, bk * D);
    kg_line(k, "const long bh = GID_Y, b = bh / %ld, h = bh %% %ld;", c.H, c.H);
    kg_line(k, "const long t0 = b * S, q0 = GID_X * %d;", ATTN_WG);
    kg_line(k, "const long s = q0 + LID_X, tok = t0 + s;");
    kg_line(k, "const int active = s < S;");
    kg_line(k, "const long q1 = (q0 + %d < S ? q0 + %d : S) - 1;   /* last query of the group */",
            ATTN_WG, ATTN_WG);
    kg_line(k, "long klo = q0 - %ld;", c.window - 1);
    kg_line(k, "if (klo < 0) klo = 0;");
    kg_line(k, "long lo = s - %ld;", c.window - 1);
    kg_line(k, "if (lo < 0) lo = 0;");
    kg_line(k, "const long kvo = (h / %ld) * %ld;", c.group, D);
    kg_line(k, "float qr[%ld], acc[%ld];", D, D);
    kg_line(k, "for (int e = 0; e < %ld; e++) { qr[e] = active ? q[tok * %ldL + h * %ld + e] : 0.0f; acc[e] = 0.0f; }",
            D, kg_ld(k, q), D);
    /* -1e30 instead of -inf: the first key rescales the empty state by exp(-huge) = 0. */
    kg_line(k, "float m = -1.0e30f, l = 0.0f;");
    kg_line(k, "for (long j0 = klo; j0 <= q1; j0 += %ld) {", bk);
    kg_line(k, "    for (int x = LID_X; x < %ld; x += %d) {", bk * D, ATTN_WG);
    kg_line(k, "        const long j = j0 + x / %ld;", D);
    kg_line(k, "        const int e = x %% %ld;", D);
    kg_line(k, "        Kt[x] = j <= q1 ? k[(t0 + j) * %ldL + kvo + e] : 0.0f;", kg_ld(k, kk));
    kg_line(k, "        Vt[x] = j <= q1 ? v[(t0 + j) * %ldL + kvo + e] : 0.0f;", kg_ld(k, v));
    kg_line(k, "    }");
    kg_line(k, "    BARRIER();");
    kg_line(k, "    const long r0 = (lo > j0 ? lo : j0) - j0;");
    kg_line(k, "    const long r1 = active ? (s < j0 + %ld ? s : j0 + %ld) - j0 : -1;", bk - 1, bk - 1);
    kg_line(k, "    for (long r = r0; r <= r1; r++) {");
    kg_line(k, "        float d = 0.0f;");
    kg_line(k, "        for (int e = 0; e < %ld; e++) d += qr[e] * Kt[r * %ld + e];", D, D);
    kg_line(k, "        const float sc = %s * d;", c.scale);
    kg_line(k, "        if (sc > m) {");
    kg_line(k, "            const float corr = EXPF(m - sc);");
    kg_line(k, "            l *= corr;");
    kg_line(k, "            for (int e = 0; e < %ld; e++) acc[e] *= corr;", D);
    kg_line(k, "            m = sc;");
    kg_line(k, "        }");
    kg_line(k, "        const float p = EXPF(sc - m);");
    kg_line(k, "        l += p;");
    kg_line(k, "        for (int e = 0; e < %ld; e++) acc[e] += p * Vt[r * %ld + e];", D, D);
    kg_line(k, "    }");
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
    kg_line(k, "if (active) {");
    kg_line(k, "    GLOBAL float *oi = o + tok * %ldL + h * %ld;", kg_ld(k, o), D);
    kg_line(k, "    for (int e = 0; e < %ld; e++) oi[e] = acc[e] / l;", D);
    kg_line(k, "    lse[tok * %ldL + h] = m + LOGF(l);", kg_ld(k, lse));
    kg_line(k, "}");
    kg_grid(k, 0, 0, 0, 1, 0, ATTN_WG);
    kg_grid(k, 1, 0, c.H, 0, 0, 1);
    kg_block(k, ATTN_WG, 1, 1);
    return kg_end(k);
}

static void emit_bwd_args(kgen *k, const ir_node *n) {
    kg_in(k, "q", n->in[0]);
    kg_in(k, "k", n->in[1]);
    kg_in(k, "v", n->in[2]);
    kg_in(k, "o", n->in[3]);
    kg_in(k, "lse", n->in[4]);
    kg_in(k, "dO", n->in[5]);
}

static int attention_bwd_emit(struct kgen *k, const ir_node *n) {
    const attn_consts c = emit_consts(k, n);
    const int node = (int)(n - k->g->n);
    const long D = c.Dh;
    const long qld = kg_ld(k, n->in[0]), kld = kg_ld(k, n->in[1]), vld = kg_ld(k, n->in[2]);
    const long old = kg_ld(k, n->in[3]), lld = kg_ld(k, n->in[4]), dold = kg_ld(k, n->in[5]);

    /* dq: one work-item per (token, query head) */
    kg_begin(k, "attention_bwd_dq", node, node + 1);
    emit_bwd_args(k, n);
    kg_out(k, "dq", n->out[0]);
    emit_row_prologue(k, c.H, "h");
    kg_line(k, "const long kvo = (h / %ld) * %ld;", c.group, D);
    kg_line(k, "long lo = s - %ld;", c.window - 1);
    kg_line(k, "if (lo < 0) lo = 0;");
    kg_line(k, "GLOBAL const float *qi = q + tok * %ldL + h * %ld;", qld, D);
    kg_line(k, "GLOBAL const float *oi = o + tok * %ldL + h * %ld;", old, D);
    kg_line(k, "GLOBAL const float *doi = dO + tok * %ldL + h * %ld;", dold, D);
    kg_line(k, "const float L = lse[tok * %ldL + h];", lld);
    kg_line(k, "float qr[%ld], dor[%ld], acc[%ld];", D, D, D);
    kg_line(k, "for (int e = 0; e < %ld; e++) { qr[e] = qi[e]; dor[e] = doi[e]; acc[e] = 0.0f; }", D);
    kg_line(k, "for (long j = t0 + lo; j <= tok; j++) {");
    kg_line(k, "    GLOBAL const float *kj = k + j * %ldL + kvo;", kld);
    kg_line(k, "    GLOBAL const float *vj = v + j * %ldL + kvo;", vld);
    kg_line(k, "    float d = 0.0f, dp = 0.0f;");
    kg_line(k, "    for (int e = 0; e < %ld; e++) {", D);
    kg_line(k, "        d += qr[e] * kj[e];");
    kg_line(k, "        dp += dor[e] * (vj[e] - oi[e]);");
    kg_line(k, "    }");
    kg_line(k, "    const float p = EXPF(%s * d - L);", c.scale);
    kg_line(k, "    const float ds = p * dp * %s;", c.scale);
    kg_line(k, "    for (int e = 0; e < %ld; e++) acc[e] += ds * kj[e];", D);
    kg_line(k, "}");
    kg_line(k, "GLOBAL float *dqi = dq + tok * %ldL + h * %ld;", kg_ld(k, n->out[0]), D);
    kg_line(k, "for (int e = 0; e < %ld; e++) dqi[e] = acc[e];", D);
    kg_grid(k, 0, 0, 0, 0, c.H, ATTN_WG);
    kg_block(k, ATTN_WG, 1, 1);
    if (kg_end(k) < 0) return -1;

    /* dk, dv: one work-item per (token, kv head); the queries that see key s are
     * s .. s+window-1 of the same sequence, summed over the group's heads in a fixed order. */
    kg_begin(k, "attention_bwd_dkv", node, node + 1);
    emit_bwd_args(k, n);
    kg_out(k, "dk", n->out[1]);
    kg_out(k, "dv", n->out[2]);
    emit_row_prologue(k, c.Hkv, "g");
    kg_line(k, "long hi = s + %ld;", c.window - 1);
    kg_line(k, "if (hi > S - 1) hi = S - 1;");
    kg_line(k, "GLOBAL const float *kj = k + tok * %ldL + g * %ld;", kld, D);
    kg_line(k, "GLOBAL const float *vj = v + tok * %ldL + g * %ld;", vld, D);
    kg_line(k, "float dka[%ld], dva[%ld];", D, D);
    kg_line(k, "for (int e = 0; e < %ld; e++) { dka[e] = 0.0f; dva[e] = 0.0f; }", D);
    kg_line(k, "for (long h = g * %ld; h < (g + 1) * %ld; h++) {", c.group, c.group);
    kg_line(k, "    for (long ti = tok; ti <= t0 + hi; ti++) {");
    kg_line(k, "        GLOBAL const float *qi = q + ti * %ldL + h * %ld;", qld, D);
    kg_line(k, "        GLOBAL const float *oi = o + ti * %ldL + h * %ld;", old, D);
    kg_line(k, "        GLOBAL const float *doi = dO + ti * %ldL + h * %ld;", dold, D);
    kg_line(k, "        float d = 0.0f, dp = 0.0f;");
    kg_line(k, "        for (int e = 0; e < %ld; e++) {", D);
    kg_line(k, "            d += qi[e] * kj[e];");
    kg_line(k, "            dp += doi[e] * (vj[e] - oi[e]);");
    kg_line(k, "        }");
    kg_line(k, "        const float p = EXPF(%s * d - lse[ti * %ldL + h]);", c.scale, lld);
    kg_line(k, "        const float ds = p * dp * %s;", c.scale);
    kg_line(k, "        for (int e = 0; e < %ld; e++) {", D);
    kg_line(k, "            dva[e] += p * doi[e];");
    kg_line(k, "            dka[e] += ds * qi[e];");
    kg_line(k, "        }");
    kg_line(k, "    }");
    kg_line(k, "}");
    kg_line(k, "GLOBAL float *dkj = dk + tok * %ldL + g * %ld;", kg_ld(k, n->out[1]), D);
    kg_line(k, "GLOBAL float *dvj = dv + tok * %ldL + g * %ld;", kg_ld(k, n->out[2]), D);
    kg_line(k, "for (int e = 0; e < %ld; e++) { dkj[e] = dka[e]; dvj[e] = dva[e]; }", D);
    kg_grid(k, 0, 0, 0, 0, c.Hkv, ATTN_WG);
    kg_block(k, ATTN_WG, 1, 1);
    return kg_end(k);
}

const op_def op_attention = {
    .name = "attention",
    .nin = 3, .nout = 2,
    .iattr = {"window", NULL},
    .fattr = {"scale", NULL},
    .ia_default = {0},          /* deliberately invalid: every model must choose a window */
    .fa_default = {0.0},        /* 0 = 1/sqrt(head_dim) */
    .infer = attention_infer,
    .grad = attention_grad,
    .ref = attention_ref,
    .flops = attention_flops,
    .emit = attention_emit,
};

const op_def op_attention_bwd = {
    .name = "attention_bwd",
    .nin = 6, .nout = 3,
    .iattr = {"window", NULL},
    .fattr = {"scale", NULL},
    .ia_default = {0},
    .fa_default = {0.0},
    .infer = attention_bwd_infer,
    .grad = NULL,
    .ref = attention_bwd_ref,
    .flops = attention_bwd_flops,
    .emit = attention_bwd_emit,
};
#endif
