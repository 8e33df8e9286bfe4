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
    /* Workspace: D_i = do_i . o_i per (token, head), computed once by the first kernel and read
     * by the two tiled ones (every key block needs it for every query it sees). Nothing
     * differentiates through it. */
    out[3] = lse;
    dt[3] = DT_F32;
    return 0;
}

static int attention_grad(ir_graph *g, int node, const int *dout, int *din) {
    din[0] = din[1] = din[2] = -1;
    if (dout[0] < 0) return 0;   /* lse is a side output: dout[1] never carries a gradient */
    /* Copy before emitting: ir_emit may reallocate g->n. */
    const ir_node nd = g->n[node];
    const int in[6] = {nd.in[0], nd.in[1], nd.in[2], nd.out[0], nd.out[1], dout[0]};
    int out[IR_MAX_IO];
    if (ir_emit(g, "attention_bwd", in, 6, nd.ia, nd.fa, out) != 4) return -1;
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
    ref_buf Dw = ref_get(c, n->out[3]);
    for (long t = 0; t < d.B * d.S; t++)
        for (long h = 0; h < d.H; h++)
            Dw.p[t * Dw.ld + h] = dot(dO.p + t * dO.ld + h * d.Dh, o.p + t * o.ld + h * d.Dh, d.Dh);
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
 * fp32 (bf16 plans on CUDA take the tensor-core kernels further down instead, for heads up to
 * their limits), deterministic (no atomics), every size, stride, window and the scale baked
 * into the source; only B, S and T = B*S are runtime values. The forward is below; the
 * backward is the tiled one further down, with these per-row kernels (no LOCAL memory) as
 * the fallback for heads too wide for its tiles:
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

/* ---- bf16 tensor-core kernels (CUDA, k->bf16) ----
 * With bf16 matmuls the attention products run on tensor cores too: mma.sync m16n8k16 (bf16
 * operands, fp32 accumulation) with the fragment conventions of gen/ops/matmul.c. Operands are
 * rounded from the fp32 arena while a tile is staged into shared memory; the softmax
 * statistics (running max, sum, lse, D) and the scaling stay fp32. Each warp owns 16 rows of
 * the block's own tile (queries in the forward and dq kernels, keys in dkv) and meets the
 * streamed side 64 rows at a time; a score tile of a warp is 16 x 8n: n-tiles of 8 columns,
 * accumulator e of n-tile j at row gq (+8 for e >= 2), column 8j + 2tq + (e & 1). Those
 * accumulators become the A operand of the second product without leaving registers: n-tiles
 * 2t and 2t+1 hold exactly the (row, k) pairs of the A fragment of k-step t (rows gq / gq+8,
 * k pairs 2tq and 2tq+8), which is what emit_tc_repack relies on. The head dim is padded to a
 * multiple of 16 (one k-step) with zeros.
 * Shared tiles hold bf16 pairs as 32-bit words, one token a row with the head dim contiguous,
 * rows padded by 4 words (16 bytes): the 8 row addresses of an ldmatrix phase then fall in 8
 * distinct 16-byte bank groups. ldmatrix gives the B operand of a product that contracts over
 * the head dim (Q K^T, dO V^T, K Q^T, V dO^T) and, with .trans, of one that contracts over the
 * tile's rows (P V, dS K, P^T dO, dS^T Q) from the same row-major tile: no transposed copies.
 * Streamed tiles (K and V in the forward and dq, Q and dO in dkv) are double-buffered through
 * an fp32 stage: cp.async brings tile i+1 from memory while the warps compute on tile i, and
 * one pass converts the stage to bf16 per tile (the arena is fp32, so a copy must round once
 * somewhere; here it is once per block and tile rather than per use).
 * Masking is exact: a warp tests the window and causality element by element only on the
 * tiles that cut its rows' bands (at most two or three per row block), takes the others
 * whole, and skips tiles none of its rows sees. Blocks outside the window are never visited,
 * and every output is summed by one thread in a fixed order (tiles in order, mma's fixed
 * internal order, a fixed quad shuffle for the row sums): no atomics, the same bits run to
 * run. Exponentials are exp2 with log2(e) folded into the score scale and the lse. Heads
 * wider than TC_FWD_MAXD (forward) or TC_BWD_MAXD (backward) keep the fp32 kernels.
 * Registers at Dh 64, sm_90 (ptxas -v): forward 128 under its cap of 2 blocks of 8 warps per
 * SM, dq 128 under 4 blocks (12 bytes spilled), dkv 168 under 3 blocks (its 73 KB of shared
 * memory allow no more). On the H100 this took realm-9m's attention at 8 x 8192 from 17.0 to
 * 8.2 ms per step (dkv 7.1 -> 3.2). */
#define TC_T 64            /* rows of a streamed tile */
#define TC_FWD_MAXD 128
#define TC_BWD_MAXD 64
#define TC_FWD_WARPS 8     /* 128 queries a forward block: each K/V tile serves twice the rows */
#define TC_BWD_WARPS 4

static long tc_dp(long Dh) { return (Dh + 15) / 16 * 16; }

/* Floats per row of an fp32 stage (16-byte rows for cp.async). */
static long tc_sw(long DP) { return DP + 4; }

/* log2(e), so exp(x) = exp2(x * log2(e)), and ln(2) to bring the lse back */
#define TC_LOG2E 1.4426950408889634
#define TC_LN2 0.6931471805599453

/* scale * log2(e) as an fp32 literal */
static void tc_scale2(const kgen *k, const ir_node *n, long Dh, char *buf, size_t len) {
    (void)k;
    const double sc = n->fa[FA_SCALE] != 0.0 ? n->fa[FA_SCALE] : 1.0 / sqrt((double)Dh);
    snprintf(buf, len, "((float)%.8ef)", (double)(float)((double)(float)sc * TC_LOG2E));
}

/* dst[r * ws + w] = bf16 pair (x[pos0 + r][2w], x[pos0 + r][2w + 1]) for `rows` rows of head
 * offset `hoff` of tensor `src`, read synchronously (tiles loaded once per block); rows past
 * the sequence and columns past Dh are zeros (0 * a stray NaN beyond the tensor would poison
 * a whole product). */
static void emit_tc_rows(kgen *k, const attn_consts *c, long DP, long rows, long nt, const char *dst, const char *src,
                         long ld, const char *pos0, const char *hoff) {
    const long W = DP / 2;
    kg_line(k, "for (int x = LID_X; x < %ld; x += %ld) {", rows * W, nt);
    kg_line(k, "    const int r = x / %ld, w = x %% %ld, e = 2 * w;", W, W);
    kg_line(k, "    const long ps = %s + r;", pos0);
    kg_line(k, "    float lo = 0.0f, hi = 0.0f;");
    kg_line(k, "    if (ps < S) {");
    kg_line(k, "        const float *p = %s + (t0 + ps) * %ldL + %s + e;", src, ld, hoff);
    if (DP == c->Dh) {
        kg_line(k, "        lo = p[0]; hi = p[1];");
    } else {
        kg_line(k, "        if (e < %ld) lo = p[0];", c->Dh);
        kg_line(k, "        if (e + 1 < %ld) hi = p[1];", c->Dh);
    }
    kg_line(k, "    }");
    kg_line(k, "    %s[r * %ld + w] = pack_bf16x2(lo, hi);", dst, kg_tc_ws(DP));
    kg_line(k, "}");
}

/* cp.async of TC_T rows (positions pos0.., head offset hoff, Dh floats each) of `src` into the
 * fp32 stage `dst`; rows past the sequence are zero-filled (their source address is clamped
 * to the sequence's first row, which exists). 16-byte copies when the rows allow them (the
 * arena offset is a runtime value, so its alignment is tested at run time), else 4-byte. */
static void emit_tc_issue(kgen *k, const attn_consts *c, long nt, const char *dst, const char *src, long ld,
                          const char *pos0, const char *hoff) {
    const long D = c->Dh, SW = tc_sw(tc_dp(D));
    const int wide = ld % 4 == 0 && D % 4 == 0;
    const long CPR = D / 4, RP = CPR > 0 && nt % CPR == 0 ? nt / CPR : 0;
    if (wide && RP > 0 && TC_T % RP == 0) {
        /* A thread copies the same 16-byte column of rows r0, r0 + RP, ... of every tile, so
         * its source and destination are one pointer each plus compile-time offsets: a copy
         * costs its guard and the cp.async. (Computing each copy's row and column, 64-bit
         * address and clamp in a loop made these loaders most of the issued instructions of
         * the backward kernels: Nsight Compute, H100.) A row past the sequence reads nothing
         * (src-size 0), so its address is never dereferenced. */
        kg_line(k, "if ((((unsigned long)%s) & 15) == 0) {", src);
        kg_line(k, "    const int r0 = (int)((unsigned)LID_X / %ldu), ch = (int)((unsigned)LID_X %% %ldu);", CPR, CPR);
        kg_line(k, "    const long rem = S - (%s + r0);", pos0);
        kg_line(k, "    GLOBAL const float *g = %s + (t0 + %s + r0) * %ldL + %s + 4 * ch;", src, pos0, ld, hoff);
        kg_line(k, "    const unsigned d = smem_u32(%s) + 4u * (unsigned)(r0 * %ld + 4 * ch);", dst, SW);
        kg_line(k, "    #pragma unroll");
        kg_line(k, "    for (int i = 0; i < %ld; i++)", TC_T / RP);
        kg_line(k, "        cp_async16(d + %ldu * (unsigned)i, g + %ldL * i, %ldL * i < rem ? 16 : 0);", 4 * RP * SW, RP * ld,
                RP);
        kg_line(k, "} else {");
    } else if (wide) {
        /* unroll 1: unrolled, the loop-invariant addresses of every copy would stay in
         * registers across the whole tile loop */
        kg_line(k, "if ((((unsigned long)%s) & 15) == 0) {", src);
        kg_line(k, "    #pragma unroll 1");
        kg_line(k, "    for (int x = LID_X; x < %ld; x += %ld) {", TC_T * D / 4, nt);
        kg_line(k, "        const int r = x / %ld, ch = x %% %ld;", D / 4, D / 4);
        kg_line(k, "        const long ps = %s + r;", pos0);
        kg_line(k, "        cp_async16(%s + r * %ld + 4 * ch, %s + (t0 + (ps < S ? ps : 0)) * %ldL + %s + 4 * ch, ps < S ? 16 : 0);",
                dst, SW, src, ld, hoff);
        kg_line(k, "    }");
        kg_line(k, "} else {");
    }
    kg_line(k, "#pragma unroll 1");
    kg_line(k, "for (int x = LID_X; x < %ld; x += %ld) {", TC_T * D, nt);
    kg_line(k, "    const int r = x / %ld, e = x %% %ld;", D, D);
    kg_line(k, "    const long ps = %s + r;", pos0);
    kg_line(k, "    cp_async4(%s + r * %ld + e, %s + (t0 + (ps < S ? ps : 0)) * %ldL + %s + e, ps < S ? 4 : 0);", dst, SW,
            src, ld, hoff);
    kg_line(k, "}");
    if (wide) kg_line(k, "}");
}

/* The stage `src` (TC_T rows of tc_sw floats) rounded into the bf16 tile `dst`; the stage's
 * padding columns (never written) are replaced by zeros. */
static void emit_tc_convert(kgen *k, const attn_consts *c, long nt, const char *dst, const char *src) {
    const long DP = tc_dp(c->Dh), W = DP / 2;
    const long W2 = W / 2, RC2 = W % 2 == 0 && nt % W2 == 0 ? nt / W2 : 0;
    if (DP == c->Dh && RC2 > 0 && TC_T % RC2 == 0) {
        /* Each thread converts the same two words of rows r0, r0 + RC2, ...: one pointer each
         * side and compile-time offsets (computing every word's row and column made these
         * loops most of the backward kernels' issued instructions: Nsight Compute, H100), and
         * every 16-byte load is issued before the first store (loads after a store to a
         * pointer that may alias them cannot be moved ahead of it; one at a time, the loop
         * waited on shared memory). */
        const long IT = TC_T / RC2;
        kg_line(k, "{");
        kg_line(k, "    const int r0 = (int)((unsigned)LID_X / %ldu), w2 = (int)((unsigned)LID_X %% %ldu);", W2, W2);
        kg_line(k, "    const float *p = %s + r0 * %ld + 4 * w2;", src, tc_sw(DP));
        kg_line(k, "    unsigned *q = %s + r0 * %ld + 2 * w2;", dst, kg_tc_ws(DP));
        const long U = IT < 4 ? IT : 4;   /* loads in flight; 8 made the dq kernel spill */
        kg_line(k, "    #pragma unroll");
        kg_line(k, "    for (int i0 = 0; i0 < %ld; i0 += %ld) {", IT, U);
        kg_line(k, "        float4 cv[%ld];", U);
        kg_line(k, "        #pragma unroll");
        kg_line(k, "        for (int u = 0; u < %ld; u++) cv[u] = *(const float4 *)(p + %ld * (i0 + u));", U, RC2 * tc_sw(DP));
        kg_line(k, "        #pragma unroll");
        kg_line(k, "        for (int u = 0; u < %ld; u++)", U);
        kg_line(k, "            *(uint2 *)(q + %ld * (i0 + u)) = make_uint2(pack_bf16x2(cv[u].x, cv[u].y), pack_bf16x2(cv[u].z, cv[u].w));",
                RC2 * kg_tc_ws(DP));
        kg_line(k, "    }");
        kg_line(k, "}");
        return;
    }
    kg_line(k, "for (int x = LID_X; x < %ld; x += %ld) {", TC_T * W, nt);
    kg_line(k, "    const int r = x / %ld, w = x %% %ld;", W, W);
    kg_line(k, "    const float *p = %s + r * %ld + 2 * w;", src, tc_sw(DP));
    if (DP == c->Dh)
        kg_line(k, "    %s[r * %ld + w] = pack_bf16x2(p[0], p[1]);", dst, kg_tc_ws(DP));
    else
        kg_line(k, "    %s[r * %ld + w] = pack_bf16x2(2 * w < %ld ? p[0] : 0.0f, 2 * w + 1 < %ld ? p[1] : 0.0f);", dst,
                kg_tc_ws(DP), c->Dh, c->Dh);
    kg_line(k, "}");
}

/* acc[j0 + j] (j < nt, nt even) += A B over DP/16 k-steps where B's column 8(jt + j) + gq is
 * row `rowb` + 8j + gq of the bf16 tile `tile` and the contraction runs along its words (the
 * head dim): one ldmatrix.x4 feeds two n-tiles. `afrag` is a C expression for the unsigned[4]
 * A fragment of k-step kk; with `aload` (a tile) it is loaded by ldmatrix first: the warp's 16
 * rows of that tile, so K or V need not stay in registers. */
static void emit_tc_mma_rows(kgen *k, long DP, const char *acc, const char *afrag, const char *aload, const char *tile,
                             const char *rowb, long nt) {
    const long ws = kg_tc_ws(DP);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int kk = 0; kk < %ld; kk++) {", DP / 16);
    if (aload) {
        kg_line(k, "    unsigned af[4];");
        kg_line(k, "    ldsm_x4(af, %s + (warp * 16 + (lane & 15)) * %ld + 8 * kk + 4 * (lane >> 4));", aload, ws);
    }
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int j = 0; j < %ld; j += 2) {", nt);
    kg_line(k, "        unsigned bq[4];");
    kg_line(k, "        ldsm_x4(bq, %s + (%s + 8 * j + ((lane >> 4) << 3) + (lane & 7)) * %ld + 8 * kk + 4 * ((lane >> 3) & 1));",
            tile, rowb, ws);
    kg_line(k, "        mma_bf16_16816(%s[j], %s, bq);", acc, afrag);
    kg_line(k, "        mma_bf16_16816(%s[j + 1], %s, bq + 2);", acc, afrag);
    kg_line(k, "    }");
    kg_line(k, "}");
}

/* acc[j] (j < NO = DP/8 n-tiles of the head dim) += A B where the contraction runs over `ks`
 * k-steps of rows of the bf16 tile `tile` from row `rowb` (B[row][e] = tile[row][e], read with
 * ldmatrix.trans) and A of k-step kt comes from the score accumulators `sacc` (n-tiles 2kt,
 * 2kt + 1), rounded to bf16 here. */
static void emit_tc_mma_cols(kgen *k, long DP, const char *acc, const char *sacc, const char *tile, const char *rowb,
                             long ks) {
    const long ws = kg_tc_ws(DP);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int kt = 0; kt < %ld; kt++) {", ks);
    kg_line(k, "    const unsigned pa[4] = {pack_bf16x2(%s[2 * kt][0], %s[2 * kt][1]), pack_bf16x2(%s[2 * kt][2], %s[2 * kt][3]),",
            sacc, sacc, sacc, sacc);
    kg_line(k, "                            pack_bf16x2(%s[2 * kt + 1][0], %s[2 * kt + 1][1]), pack_bf16x2(%s[2 * kt + 1][2], %s[2 * kt + 1][3])};",
            sacc, sacc, sacc, sacc);
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int j = 0; j < %ld; j += 2) {", DP / 8);
    kg_line(k, "        unsigned bq[4];");
    kg_line(k, "        ldsm_x4_trans(bq, %s + (%s + 16 * kt + (lane & 15)) * %ld + 4 * (j + (lane >> 4)));", tile, rowb, ws);
    kg_line(k, "        mma_bf16_16816(%s[j], pa, bq);", acc);
    kg_line(k, "        mma_bf16_16816(%s[j + 1], pa, bq + 2);", acc);
    kg_line(k, "    }");
    kg_line(k, "}");
}

/* Forward: block = 128 queries (8 warps) of one (sequence, head); Q's fragments live in
 * registers, K and V tiles of 64 keys stream through the stage over the band the block's
 * queries see. Per key tile and warp: S = Q K^T (scaled by scale log2(e); masked to -inf on
 * edge tiles), the online softmax on the accumulators (row max over the quad by shuffles),
 * then O = O corr + P V with P repacked as A fragments. Each thread keeps partial row sums l
 * over its own columns; the quad adds them at the end. */
static int attention_emit_tc(kgen *k, const ir_node *n, const attn_consts *c) {
    const int node = (int)(n - k->g->n);
    const int q = n->in[0], kk = n->in[1], v = n->in[2], o = n->out[0], lse = n->out[1];
    const long D = c->Dh, DP = tc_dp(D), NO = DP / 8, NT = 32 * TC_FWD_WARPS, QB = 16 * TC_FWD_WARPS;
    const long ws = kg_tc_ws(DP), SW = tc_sw(DP);
    char sc2[64];
    tc_scale2(k, n, D, sc2, sizeof sc2);
    kg_begin(k, "attention_tc", node, node + 1);
    kg_in(k, "q", q);
    kg_in(k, "k", kk);
    kg_in(k, "v", v);
    kg_out(k, "o", o);
    kg_out(k, "lse", lse);
    /* the stage doubles as Q's bf16 tile before the first K/V tile arrives */
    kg_shared(k, "Kst", 2 * TC_T * SW);
    kg_shared(k, "Kbf", 2 * TC_T * ws);
    kg_line(k, "float *Vst = Kst + %ld;", TC_T * SW);
    kg_line(k, "unsigned *Kb = (unsigned *)Kbf, *Vb = Kb + %ld, *Qb = (unsigned *)Kst;", TC_T * ws);
    kg_tc_prologue(k);
    kg_line(k, "const long bh = GID_Y, b = bh / %ld, h = bh %% %ld;", c->H, c->H);
    kg_line(k, "const long t0 = b * S, q0 = GID_X * %ld, qo = h * %ld, kvo = (h / %ld) * %ld;", QB, D, c->group, D);
    kg_line(k, "const long q1 = (q0 + %ld < S ? q0 + %ld : S) - 1;", QB, QB);
    kg_line(k, "long klo = q0 - %ld;", c->window - 1);
    kg_line(k, "if (klo < 0) klo = 0;");
    kg_line(k, "const long qw = q0 + warp * 16, qr = qw + gq;   /* this thread's rows: qr, qr + 8 */");
    kg_line(k, "const float NEG_INF = __int_as_float(0xff800000);");
    emit_tc_rows(k, c, DP, QB, NT, "Qb", "q", kg_ld(k, q), "q0", "qo");
    kg_line(k, "BARRIER();");
    kg_tc_afrag(k, DP, "qf", "Qb");
    kg_line(k, "BARRIER();");
    emit_tc_issue(k, c, NT, "Kst", "k", kg_ld(k, kk), "klo", "kvo");
    emit_tc_issue(k, c, NT, "Vst", "v", kg_ld(k, v), "klo", "kvo");
    kg_line(k, "cp_async_commit();");
    kg_tc_zero(k, "oacc", NO);
    /* -1e30, not -inf: a row that has seen only masked keys keeps corr = exp2(0) and p = 0 */
    kg_line(k, "float m[2] = {-1.0e30f, -1.0e30f}, l[2] = {0.0f, 0.0f};");
    kg_line(k, "for (long k0 = klo; k0 <= q1; k0 += %d) {", TC_T);
    kg_line(k, "cp_async_wait(0);");
    kg_line(k, "BARRIER();");   /* the stage is complete; every warp is done with the last tile */
    emit_tc_convert(k, c, NT, "Kb", "Kst");
    emit_tc_convert(k, c, NT, "Vb", "Vst");
    kg_line(k, "BARRIER();");   /* the tiles are complete; every thread is done reading the stage */
    kg_line(k, "if (k0 + %d <= q1) {", TC_T);
    kg_line(k, "    const long kn = k0 + %d;", TC_T);
    emit_tc_issue(k, c, NT, "Kst", "k", kg_ld(k, kk), "kn", "kvo");
    emit_tc_issue(k, c, NT, "Vst", "v", kg_ld(k, v), "kn", "kvo");
    kg_line(k, "}");
    kg_line(k, "cp_async_commit();");
    /* keys after every row of the warp, or out of every row's window, or no row left */
    kg_line(k, "if (qw >= S || k0 > qw + 15 || qw - (k0 + %d) >= %ld) continue;", TC_T - 1, c->window);
    kg_line(k, "const int full = k0 + %d <= qw && qw + 15 - k0 < %ld && qw + 15 < S;", TC_T - 1, c->window);
    kg_tc_zero(k, "sacc", 8);
    emit_tc_mma_rows(k, DP, "sacc", "qf[kk]", NULL, "Kb", "0", 8);
    /* The score scale (positive: attention_emit) commutes with the row maximum, so the maxima
     * are taken on the raw scores and the scale is folded into the exponent's fused
     * multiply-add: one multiplication fewer per score (the kernel issues more than it waits). */
    kg_line(k, "float mr[2] = {NEG_INF, NEG_INF};");
    kg_line(k, "if (full) {");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int j = 0; j < 8; j++)");
    kg_line(k, "        for (int e = 0; e < 4; e++) mr[e >> 1] = FMAXF(mr[e >> 1], sacc[j][e]);");
    kg_line(k, "} else {");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int j = 0; j < 8; j++)");
    kg_line(k, "        for (int e = 0; e < 4; e++) {");
    kg_line(k, "            const long qs = qr + 8 * (e >> 1), ks = k0 + 8 * j + 2 * tq + (e & 1);");
    kg_line(k, "            const int vis = qs < S && ks <= qs && qs - ks < %ld;", c->window);
    kg_line(k, "            sacc[j][e] = vis ? sacc[j][e] : NEG_INF;");
    kg_line(k, "            mr[e >> 1] = FMAXF(mr[e >> 1], sacc[j][e]);");
    kg_line(k, "        }");
    kg_line(k, "}");
    kg_line(k, "float corr[2];");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int r = 0; r < 2; r++) {");
    kg_line(k, "    mr[r] = FMAXF(mr[r], __shfl_xor_sync(0xffffffffu, mr[r], 1));");
    kg_line(k, "    mr[r] = FMAXF(mr[r], __shfl_xor_sync(0xffffffffu, mr[r], 2));");
    kg_line(k, "    const float mx = FMAXF(m[r], %s * mr[r]);", sc2);
    kg_line(k, "    corr[r] = exp2_sfu(m[r] - mx);");
    kg_line(k, "    m[r] = mx;");
    kg_line(k, "    l[r] *= corr[r];");
    kg_line(k, "}");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int j = 0; j < %ld; j++)", NO);
    kg_line(k, "    for (int e = 0; e < 4; e++) oacc[j][e] *= corr[e >> 1];");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int j = 0; j < 8; j++)");
    kg_line(k, "    for (int e = 0; e < 4; e++) {");
    kg_line(k, "        const float p = exp2_sfu(%s * sacc[j][e] - m[e >> 1]);", sc2);
    kg_line(k, "        l[e >> 1] += p;");
    kg_line(k, "        sacc[j][e] = p;");
    kg_line(k, "    }");
    emit_tc_mma_cols(k, DP, "oacc", "sacc", "Vb", "0", 4);
    kg_line(k, "}");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int r = 0; r < 2; r++) {");
    kg_line(k, "    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);");
    kg_line(k, "    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);");
    kg_line(k, "    const long qs = qr + 8 * r;");
    kg_line(k, "    if (qs >= S) continue;");
    kg_line(k, "    float *oi = o + (t0 + qs) * %ldL + qo;", kg_ld(k, o));
    kg_line(k, "    const float inv = 1.0f / l[r];");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int j = 0; j < %ld; j++)", NO);
    kg_line(k, "        for (int e = 0; e < 2; e++) {");
    kg_line(k, "            const int col = 8 * j + 2 * tq + e;");
    if (DP != D) kg_line(k, "            if (col >= %ld) continue;", D);
    kg_line(k, "            oi[col] = oacc[j][2 * r + e] * inv;");
    kg_line(k, "        }");
    kg_line(k, "    if (tq == 0) lse[(t0 + qs) * %ldL + h] = (m[r] + log2f(l[r])) * ((float)%.9ef);", kg_ld(k, lse), TC_LN2);
    kg_line(k, "}");
    kg_grid(k, 0, 0, 0, 1, 0, QB);
    kg_grid(k, 1, 0, c->H, 0, 0, 1);
    kg_block(k, (int)NT, 1, 1);
    kg_min_blocks(k, 2);
    return kg_end(k);
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
    /* the tensor-core kernel takes row maxima before scaling (a negative scale would turn them
     * into minima) */
    if (k->bf16 && tc_dp(D) <= TC_FWD_MAXD && n->fa[FA_SCALE] >= 0.0) return attention_emit_tc(k, n, &c);
    /* two tiles of bk x Dh floats within the 48 KiB of static LOCAL memory CUDA allows */
    long bk = 6144 / D;
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

static int emit_bwd_rows(struct kgen *k, const ir_node *n) {
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

/* ---- tiled backward (flash-attention-2 style, deterministic) ----
 * Three launches:
 *   attention_bwd_d   : D_i = do_i . o_i per (token, head) into the workspace output D.
 *   attention_bwd_dkv : one work-group per (sequence, kv head, block of BT keys). K and V of the
 *                       block stay in LOCAL memory; the group walks every query head of the kv
 *                       group and every block of BT queries that can see the keys (the window),
 *                       recomputes P = exp(scale q.k - lse) and dS = P (do.v - D) scale for the
 *                       BT x BT tile, and accumulates dV += P^T dO and dK += dS^T Q in registers.
 *   attention_bwd_dq  : one work-group per (sequence, head, block of BT queries). Q, dO, lse, D
 *                       of the block stay in LOCAL memory; the group walks the key blocks the
 *                       queries can see and accumulates dQ += dS K in registers.
 * Every output element is summed by one thread in a fixed order (heads, then query or key
 * blocks, then rows within a block), so there are no atomics and a run is bitwise
 * reproducible. dQ is computed apart from dK/dV (recomputing P and dS once more) because
 * sharing it would need atomics or a partial-sum buffer per key block.
 *
 * Thread layout (NT = TB * TE threads; TB = BT/4 row lanes, TE = DP/4 head-dim lanes):
 *   scores  : a thread computes a 2 x 4 tile of S and dP (rows ii, ii+BT/2; columns jj + c BT/4)
 *             with reads that are broadcasts or consecutive words across a warp.
 *   products: a thread owns a 4 x 4 register tile of dK and dV (or dQ): rows t + TB r, head-dim
 *             columns te + TE c, so a warp's global stores are contiguous along the head dim.
 * LOCAL layouts: row tiles are [row][DP+1] and the transposed key tiles [e][BT+1]; the padding
 * keeps the column-wise reads of the score loop free of bank conflicts. Head-dim columns
 * Dh..DP-1 hold zeros, which add nothing to any dot product. */
#define ATTN_LOCAL_FLOATS 12288   /* 48 KiB: CUDA's static shared-memory limit */
#define ATTN_MAX_THREADS 256

typedef struct {
    long DP;          /* head dim rounded up to a multiple of 4 */
    long BT;          /* query and key block edge (multiple of 4) */
    long TE, TB, NT;  /* head-dim lanes, row lanes, threads per work-group */
} attn_tiles;

/* LOCAL floats of each kernel: see the declarations in emit_bwd_dkv / emit_bwd_dq. */
static long dkv_local(long DP, long BT) {
    return 2 * DP * (BT + 1) + 2 * BT * (DP + 1) + 2 * BT * (BT + 1) + 2 * BT;
}
static long dq_local(long DP, long BT) {
    return 2 * DP * (BT + 1) + 2 * BT * (DP + 1) + BT * (BT + 1) + 2 * BT;
}

/* The largest block edge (at most 32) whose tiles fit in LOCAL memory with at most
 * ATTN_MAX_THREADS threads; -1 when none does (very wide heads), and the caller falls back to
 * the per-row kernels. 32 rather than 64: at Dh = 64 the dK/dV kernel's six tiles of 64 would
 * need 80 KiB. */
static int bwd_tiles(long Dh, attn_tiles *t) {
    t->DP = (Dh + 3) / 4 * 4;
    for (long bt = 32; bt >= 4; bt /= 2) {
        t->BT = bt;
        t->TE = t->DP / 4;
        t->TB = bt / 4;
        t->NT = t->TE * t->TB;
        if (t->NT <= ATTN_MAX_THREADS && dkv_local(t->DP, bt) <= ATTN_LOCAL_FLOATS &&
            dq_local(t->DP, bt) <= ATTN_LOCAL_FLOATS)
            return 0;
    }
    return -1;
}

/* Cooperative, coalesced load of BT token rows (first position `pos0`, head offset `hoff`) of
 * tensor `src` (token stride ld) into LOCAL `dst`, element (row, e) at dst[row*rs + e*es];
 * rows past the sequence and padding columns get zeros. */
static void emit_tile_load(kgen *k, const attn_consts *c, const attn_tiles *t, const char *dst,
                           long rs, long es, const char *src, long ld, const char *pos0,
                           const char *hoff) {
    kg_line(k, "for (int x = LID_X; x < %ld; x += %ld) {", t->BT * t->DP, t->NT);
    kg_line(k, "    const int r = x / %ld, e = x %% %ld;", t->DP, t->DP);
    kg_line(k, "    const long ps = %s + r;", pos0);
    if (t->DP == c->Dh) kg_line(k, "    const int ok = ps < S;");
    else kg_line(k, "    const int ok = ps < S && e < %ld;", c->Dh);
    kg_line(k, "    %s[r * %ld + e * %ld] = ok ? %s[(t0 + ps) * %ldL + %s + e] : 0.0f;", dst, rs, es, src,
            ld, hoff);
    kg_line(k, "}");
}

/* lse and D of the BT query rows starting at `pos0` for head `h` into Ls, Ds. */
static void emit_rowstat_load(kgen *k, const attn_tiles *t, long lld, long dld, const char *pos0) {
    kg_line(k, "for (int x = LID_X; x < %ld; x += %ld) {", t->BT, t->NT);
    kg_line(k, "    const long ps = %s + x;", pos0);
    kg_line(k, "    Ls[x] = ps < S ? lse[(t0 + ps) * %ldL + h] : 0.0f;", lld);
    kg_line(k, "    Ds[x] = ps < S ? Dw[(t0 + ps) * %ldL + h] : 0.0f;", dld);
    kg_line(k, "}");
}

/* The score tile of query block q0 against key block k0 from Qs, dOs ([row][DP+1]), KT, VT
 * ([e][BT+1]), Ls, Ds: for every visible (i, j), p = exp(scale s - lse_i) and
 * ds = p (dp - D_i) scale; invisible pairs (outside the window, after the query, or past the
 * sequence) get p = ds = 0. `store` is the statement that files p and ds of (i, j) away. */
static void emit_scores(kgen *k, const attn_consts *c, const attn_tiles *t, const char *store) {
    const long BT = t->BT, DP = t->DP, half = BT / 2, quarter = BT / 4;
    kg_line(k, "for (int it = LID_X; it < %ld; it += %ld) {", half * quarter, t->NT);
    kg_line(k, "    const int ii = it / %ld, jj = it %% %ld;", quarter, quarter);
    kg_line(k, "    float sc[2][4], dp[2][4];");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int a = 0; a < 2; a++)");
    kg_line(k, "        for (int cc = 0; cc < 4; cc++) { sc[a][cc] = 0.0f; dp[a][cc] = 0.0f; }");
    kg_line(k, "    for (int e = 0; e < %ld; e++) {", DP);
    kg_line(k, "        const float qa = Qs[ii * %ld + e], qb = Qs[(ii + %ld) * %ld + e];", DP + 1, half, DP + 1);
    kg_line(k, "        const float da = dOs[ii * %ld + e], db = dOs[(ii + %ld) * %ld + e];", DP + 1, half, DP + 1);
    kg_line(k, "        #pragma unroll");
    kg_line(k, "        for (int cc = 0; cc < 4; cc++) {");
    kg_line(k, "            const float kv = KT[e * %ld + jj + cc * %ld], vv = VT[e * %ld + jj + cc * %ld];",
            BT + 1, quarter, BT + 1, quarter);
    kg_line(k, "            sc[0][cc] += qa * kv; sc[1][cc] += qb * kv;");
    kg_line(k, "            dp[0][cc] += da * vv; dp[1][cc] += db * vv;");
    kg_line(k, "        }");
    kg_line(k, "    }");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int a = 0; a < 2; a++) {");
    kg_line(k, "        const int i = ii + a * %ld;", half);
    kg_line(k, "        const long qs = q0 + i;");
    kg_line(k, "        const float L = Ls[i], Dd = Ds[i];");
    kg_line(k, "        #pragma unroll");
    kg_line(k, "        for (int cc = 0; cc < 4; cc++) {");
    kg_line(k, "            const int j = jj + cc * %ld;", quarter);
    kg_line(k, "            const long ks = k0 + j;");
    kg_line(k, "            const int vis = qs < S && ks <= qs && qs - ks < %ld;", c->window);
    kg_line(k, "            const float p = vis ? EXPF(%s * sc[a][cc] - L) : 0.0f;", c->scale);
    /* With a window of 1 every softmax has one term, so dS is exactly zero; the fp32
     * difference dp - D would leave rounding noise where the reference has exact zeros. */
    if (c->window == 1) kg_line(k, "            const float ds = 0.0f;");
    else kg_line(k, "            const float ds = p * (dp[a][cc] - Dd) * %s;", c->scale);
    kg_line(k, "            %s", store);
    kg_line(k, "        }");
    kg_line(k, "    }");
    kg_line(k, "}");
}

/* The tiled kernels' inputs: o is not among them, D stands for it. */
static void emit_tiled_args(kgen *k, const ir_node *n) {
    kg_in(k, "q", n->in[0]);
    kg_in(k, "k", n->in[1]);
    kg_in(k, "v", n->in[2]);
    kg_in(k, "lse", n->in[4]);
    kg_in(k, "dO", n->in[5]);
    kg_in(k, "Dw", n->out[3]);
}

static int emit_bwd_d(kgen *k, const ir_node *n, const attn_consts *c) {
    const int node = (int)(n - k->g->n);
    kg_begin(k, "attention_bwd_d", node, node + 1);
    kg_in(k, "o", n->in[3]);
    kg_in(k, "dO", n->in[5]);
    kg_out(k, "Dw", n->out[3]);
    emit_row_prologue(k, c->H, "h");
    kg_line(k, "GLOBAL const float *oi = o + tok * %ldL + h * %ld;", kg_ld(k, n->in[3]), c->Dh);
    kg_line(k, "GLOBAL const float *doi = dO + tok * %ldL + h * %ld;", kg_ld(k, n->in[5]), c->Dh);
    kg_line(k, "float acc = 0.0f;");
    kg_line(k, "for (int e = 0; e < %ld; e++) acc += doi[e] * oi[e];", c->Dh);
    kg_line(k, "Dw[tok * %ldL + h] = acc;", kg_ld(k, n->out[3]));
    kg_grid(k, 0, 0, 0, 0, c->H, ATTN_WG);
    kg_block(k, ATTN_WG, 1, 1);
    return kg_end(k);
}


static int emit_bwd_dkv(kgen *k, const ir_node *n, const attn_consts *c, const attn_tiles *t) {
    const int node = (int)(n - k->g->n);
    const long BT = t->BT, DP = t->DP, TB = t->TB, TE = t->TE, D = c->Dh;
    char store[160];
    kg_begin(k, "attention_bwd_dkv", node, node + 1);
    emit_tiled_args(k, n);
    kg_out(k, "dk", n->out[1]);
    kg_out(k, "dv", n->out[2]);
    kg_line(k, "LOCAL float KT[%ld], VT[%ld], Qs[%ld], dOs[%ld], Ps[%ld], dSs[%ld], Ls[%ld], Ds[%ld];",
            DP * (BT + 1), DP * (BT + 1), BT * (DP + 1), BT * (DP + 1), BT * (BT + 1), BT * (BT + 1), BT, BT);
    kg_line(k, "const long bg = GID_Y, b = bg / %ld, g = bg %% %ld;", c->Hkv, c->Hkv);
    kg_line(k, "const long t0 = b * S, k0 = GID_X * %ld, kvo = g * %ld;", BT, D);
    kg_line(k, "const int te = LID_X %% %ld, tj = LID_X / %ld;", TE, TE);
    /* the last query that sees a key of the block: queries k0 .. qend, in blocks from k0 */
    kg_line(k, "long qend = (k0 + %ld < S ? k0 + %ld : S - 1) + %ld;", BT - 1, BT - 1, c->window - 1);
    kg_line(k, "if (qend > S - 1) qend = S - 1;");
    emit_tile_load(k, c, t, "KT", 1, BT + 1, "k", kg_ld(k, n->in[1]), "k0", "kvo");
    emit_tile_load(k, c, t, "VT", 1, BT + 1, "v", kg_ld(k, n->in[2]), "k0", "kvo");
    kg_line(k, "float dka[4][4], dva[4][4];");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int r = 0; r < 4; r++)");
    kg_line(k, "    for (int cc = 0; cc < 4; cc++) { dka[r][cc] = 0.0f; dva[r][cc] = 0.0f; }");
    kg_line(k, "for (long h = g * %ld; h < (g + 1) * %ld; h++) {", c->group, c->group);
    kg_line(k, "const long qo = h * %ld;", D);
    kg_line(k, "for (long q0 = k0; q0 <= qend; q0 += %ld) {", BT);
    emit_tile_load(k, c, t, "Qs", DP + 1, 1, "q", kg_ld(k, n->in[0]), "q0", "qo");
    emit_tile_load(k, c, t, "dOs", DP + 1, 1, "dO", kg_ld(k, n->in[5]), "q0", "qo");
    emit_rowstat_load(k, t, kg_ld(k, n->in[4]), kg_ld(k, n->out[3]), "q0");
    kg_line(k, "BARRIER();");
    snprintf(store, sizeof store, "Ps[i * %ld + j] = p; dSs[i * %ld + j] = ds;", BT + 1, BT + 1);
    emit_scores(k, c, t, store);
    kg_line(k, "BARRIER();");
    /* dV += P^T dO, dK += dS^T Q over the block's query rows, in row order */
    kg_line(k, "for (int i = 0; i < %ld; i++) {", BT);
    kg_line(k, "    float pr[4], sr[4], orow[4], qrow[4];");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int r = 0; r < 4; r++) { pr[r] = Ps[i * %ld + tj + r * %ld]; sr[r] = dSs[i * %ld + tj + r * %ld]; }",
            BT + 1, TB, BT + 1, TB);
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int cc = 0; cc < 4; cc++) { orow[cc] = dOs[i * %ld + te + cc * %ld]; qrow[cc] = Qs[i * %ld + te + cc * %ld]; }",
            DP + 1, TE, DP + 1, TE);
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int r = 0; r < 4; r++)");
    kg_line(k, "        for (int cc = 0; cc < 4; cc++) { dva[r][cc] += pr[r] * orow[cc]; dka[r][cc] += sr[r] * qrow[cc]; }");
    kg_line(k, "}");
    kg_line(k, "BARRIER();");   /* before the next block's loads overwrite the tiles */
    kg_line(k, "}");
    kg_line(k, "}");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int r = 0; r < 4; r++) {");
    kg_line(k, "    const long ks = k0 + tj + r * %ld;", TB);
    kg_line(k, "    if (ks >= S) continue;");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int cc = 0; cc < 4; cc++) {");
    kg_line(k, "        const int e = te + cc * %ld;", TE);
    if (DP != D) kg_line(k, "        if (e >= %ld) continue;", D);
    kg_line(k, "        dk[(t0 + ks) * %ldL + kvo + e] = dka[r][cc];", kg_ld(k, n->out[1]));
    kg_line(k, "        dv[(t0 + ks) * %ldL + kvo + e] = dva[r][cc];", kg_ld(k, n->out[2]));
    kg_line(k, "    }");
    kg_line(k, "}");
    kg_grid(k, 0, 0, 0, 1, 0, BT);
    kg_grid(k, 1, 0, c->Hkv, 0, 0, 1);
    kg_block(k, (int)t->NT, 1, 1);
    return kg_end(k);
}

static int emit_bwd_dq(kgen *k, const ir_node *n, const attn_consts *c, const attn_tiles *t) {
    const int node = (int)(n - k->g->n);
    const long BT = t->BT, DP = t->DP, TB = t->TB, TE = t->TE, D = c->Dh;
    char store[96];
    kg_begin(k, "attention_bwd_dq", node, node + 1);
    emit_tiled_args(k, n);
    kg_out(k, "dq", n->out[0]);
    kg_line(k, "LOCAL float KT[%ld], VT[%ld], Qs[%ld], dOs[%ld], dSs[%ld], Ls[%ld], Ds[%ld];",
            DP * (BT + 1), DP * (BT + 1), BT * (DP + 1), BT * (DP + 1), BT * (BT + 1), BT, BT);
    kg_line(k, "const long bh = GID_Y, b = bh / %ld, h = bh %% %ld;", c->H, c->H);
    kg_line(k, "const long t0 = b * S, q0 = GID_X * %ld, qo = h * %ld, kvo = (h / %ld) * %ld;", BT, D,
            c->group, D);
    kg_line(k, "const int te = LID_X %% %ld, ti = LID_X / %ld;", TE, TE);
    kg_line(k, "const long q1 = (q0 + %ld < S ? q0 + %ld : S - 1);   /* last query of the block */", BT - 1,
            BT - 1);
    /* key blocks (aligned to BT) from the one holding the first key the block's first query sees */
    kg_line(k, "long klo = q0 - %ld;", c->window - 1);
    kg_line(k, "if (klo < 0) klo = 0;");
    kg_line(k, "klo = klo / %ld * %ld;", BT, BT);
    emit_tile_load(k, c, t, "Qs", DP + 1, 1, "q", kg_ld(k, n->in[0]), "q0", "qo");
    emit_tile_load(k, c, t, "dOs", DP + 1, 1, "dO", kg_ld(k, n->in[5]), "q0", "qo");
    emit_rowstat_load(k, t, kg_ld(k, n->in[4]), kg_ld(k, n->out[3]), "q0");
    kg_line(k, "float acc[4][4];");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int r = 0; r < 4; r++)");
    kg_line(k, "    for (int cc = 0; cc < 4; cc++) acc[r][cc] = 0.0f;");
    kg_line(k, "for (long k0 = klo; k0 <= q1; k0 += %ld) {", BT);
    emit_tile_load(k, c, t, "KT", 1, BT + 1, "k", kg_ld(k, n->in[1]), "k0", "kvo");
    emit_tile_load(k, c, t, "VT", 1, BT + 1, "v", kg_ld(k, n->in[2]), "k0", "kvo");
    kg_line(k, "BARRIER();");
    /* dS stored key-major so the product loop reads a thread's rows as consecutive words */
    snprintf(store, sizeof store, "dSs[j * %ld + i] = ds; (void)p;", BT + 1);
    emit_scores(k, c, t, store);
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int j = 0; j < %ld; j++) {", BT);
    kg_line(k, "    float sr[4], kr[4];");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int r = 0; r < 4; r++) sr[r] = dSs[j * %ld + ti + r * %ld];", BT + 1, TB);
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int cc = 0; cc < 4; cc++) kr[cc] = KT[(te + cc * %ld) * %ld + j];", TE, BT + 1);
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int r = 0; r < 4; r++)");
    kg_line(k, "        for (int cc = 0; cc < 4; cc++) acc[r][cc] += sr[r] * kr[cc];");
    kg_line(k, "}");
    kg_line(k, "BARRIER();");
    kg_line(k, "}");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int r = 0; r < 4; r++) {");
    kg_line(k, "    const long qs = q0 + ti + r * %ld;", TB);
    kg_line(k, "    if (qs >= S) continue;");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int cc = 0; cc < 4; cc++) {");
    kg_line(k, "        const int e = te + cc * %ld;", TE);
    if (DP != D) kg_line(k, "        if (e >= %ld) continue;", D);
    kg_line(k, "        dq[(t0 + qs) * %ldL + qo + e] = acc[r][cc];", kg_ld(k, n->out[0]));
    kg_line(k, "    }");
    kg_line(k, "}");
    kg_grid(k, 0, 0, 0, 1, 0, BT);
    kg_grid(k, 1, 0, c->H, 0, 0, 1);
    kg_block(k, (int)t->NT, 1, 1);
    return kg_end(k);
}

/* ---- the backward on tensor cores (bf16 plans; see "bf16 tensor-core kernels" above) ----
 * Two launches, dq first. dq: a block's 64 queries keep Q and dO as A fragments and work out
 * D = dO . O of its rows in fp32 (into the workspace: the dkv launch reads it), so there is
 * no separate D pass; per key tile S = Q K^T and dP = dO V^T, then dS = P (dP - D) scale is
 * repacked in registers and dQ += dS K takes K through ldmatrix.trans. dkv: a block's 64 keys
 * keep K and V in shared memory (A fragments by ldmatrix when needed), so the score tiles
 * come out transposed (S^T = K Q^T, dP^T = V dO^T, keys in rows) and dV += P^T dO,
 * dK += dS^T Q take dO and Q through ldmatrix.trans; lse and D of the query tile, which index
 * the columns there, go through shared memory. Both kernels take the streamed tile in two
 * halves of 32 columns, which halves the live score registers (the products are the same). */
static void emit_tc_ds(kgen *k, const attn_consts *c, const char *sc2) {
    kg_line(k, "        const float p = vis ? exp2_sfu(%s * sacc[j][e] - L) : 0.0f;", sc2);
    /* window 1: one term per softmax, dS exactly zero (as in the fp32 kernels) */
    if (c->window == 1) kg_line(k, "        const float ds = 0.0f; (void)Dd;");
    else kg_line(k, "        const float ds = p * (dpacc[j][e] - Dd) * %s;", c->scale);
}

/* The element loop of a half tile: `pos` declares qs and ks of accumulator (j, e), `stat`
 * declares L (lse log2(e)) and Dd of its query; `store` files p and ds away. On a full tile
 * (the uniform flag `full`) no element is tested. */
static void emit_tc_scores(kgen *k, const attn_consts *c, const char *sc2, const char *pos, const char *stat,
                           const char *store) {
    for (int f = 0; f < 2; f++) {
        kg_line(k, f ? "} else {" : "if (full) {");
        kg_line(k, "#pragma unroll");
        kg_line(k, "for (int j = 0; j < 4; j++)");
        kg_line(k, "    for (int e = 0; e < 4; e++) {");
        kg_line(k, "        %s", stat);
        if (f) {
            kg_line(k, "        %s", pos);
            kg_line(k, "        const int vis = qs < S && ks <= qs && qs - ks < %ld;", c->window);
        } else {
            kg_line(k, "        const int vis = 1;");
        }
        emit_tc_ds(k, c, sc2);
        kg_line(k, "        %s", store);
        kg_line(k, "    }");
    }
    kg_line(k, "}");
}

static int emit_bwd_dq_tc(kgen *k, const ir_node *n, const attn_consts *c) {
    const int node = (int)(n - k->g->n);
    const long D = c->Dh, DP = tc_dp(D), NO = DP / 8, NT = 32 * TC_BWD_WARPS, QB = 16 * TC_BWD_WARPS;
    const long ws = kg_tc_ws(DP), SW = tc_sw(DP);
    char sc2[64];
    tc_scale2(k, n, D, sc2, sizeof sc2);
    kg_begin(k, "attention_bwd_dq_tc", node, node + 1);
    kg_in(k, "q", n->in[0]);
    kg_in(k, "k", n->in[1]);
    kg_in(k, "v", n->in[2]);
    kg_in(k, "o", n->in[3]);
    kg_in(k, "lse", n->in[4]);
    kg_in(k, "dO", n->in[5]);
    kg_out(k, "dq", n->out[0]);
    kg_out(k, "Dw", n->out[3]);
    /* the stage doubles as Q's and dO's bf16 tiles before the first K/V tile arrives */
    kg_shared(k, "Kst", 2 * TC_T * SW);
    kg_shared(k, "Kbf", 2 * TC_T * ws);
    kg_shared(k, "Ds", QB);
    kg_line(k, "float *Vst = Kst + %ld;", TC_T * SW);
    kg_line(k, "unsigned *Kb = (unsigned *)Kbf, *Vb = Kb + %ld, *Qb = (unsigned *)Kst, *dOb = Qb + %ld;", TC_T * ws,
            QB * ws);
    kg_tc_prologue(k);
    kg_line(k, "const long bh = GID_Y, b = bh / %ld, h = bh %% %ld;", c->H, c->H);
    kg_line(k, "const long t0 = b * S, q0 = GID_X * %ld, qo = h * %ld, kvo = (h / %ld) * %ld;", QB, D, c->group, D);
    kg_line(k, "const long q1 = (q0 + %ld < S ? q0 + %ld : S) - 1;", QB, QB);
    kg_line(k, "long klo = q0 - %ld;", c->window - 1);
    kg_line(k, "if (klo < 0) klo = 0;");
    kg_line(k, "const long qw = q0 + warp * 16, qr = qw + gq;   /* this thread's rows: qr, qr + 8 */");
    /* D = dO . O in fp32, a warp per row: lanes over the head dim, a fixed butterfly */
    kg_line(k, "for (int rr = 0; rr < 16; rr++) {");
    kg_line(k, "    const int r = warp * 16 + rr;");
    kg_line(k, "    const long qs = q0 + r;");
    kg_line(k, "    float acc = 0.0f;");
    kg_line(k, "    if (qs < S)");
    kg_line(k, "        for (int e = lane; e < %ld; e += 32) acc += dO[(t0 + qs) * %ldL + qo + e] * o[(t0 + qs) * %ldL + qo + e];",
            D, kg_ld(k, n->in[5]), kg_ld(k, n->in[3]));
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);");
    kg_line(k, "    if (lane == 0) {");
    kg_line(k, "        Ds[r] = acc;");
    kg_line(k, "        if (qs < S) Dw[(t0 + qs) * %ldL + h] = acc;", kg_ld(k, n->out[3]));
    kg_line(k, "    }");
    kg_line(k, "}");
    emit_tc_rows(k, c, DP, QB, NT, "Qb", "q", kg_ld(k, n->in[0]), "q0", "qo");
    emit_tc_rows(k, c, DP, QB, NT, "dOb", "dO", kg_ld(k, n->in[5]), "q0", "qo");
    kg_line(k, "BARRIER();");
    kg_tc_afrag(k, DP, "qf", "Qb");
    kg_tc_afrag(k, DP, "df", "dOb");
    kg_line(k, "float Lr[2], Dr[2];");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int r = 0; r < 2; r++) {");
    kg_line(k, "    const long qs = qr + 8 * r;");
    kg_line(k, "    Lr[r] = qs < S ? lse[(t0 + qs) * %ldL + h] * ((float)%.9ef) : 0.0f;", kg_ld(k, n->in[4]), TC_LOG2E);
    kg_line(k, "    Dr[r] = Ds[warp * 16 + gq + 8 * r];");
    kg_line(k, "}");
    kg_line(k, "BARRIER();");
    emit_tc_issue(k, c, NT, "Kst", "k", kg_ld(k, n->in[1]), "klo", "kvo");
    emit_tc_issue(k, c, NT, "Vst", "v", kg_ld(k, n->in[2]), "klo", "kvo");
    kg_line(k, "cp_async_commit();");
    kg_tc_zero(k, "dqa", NO);
    kg_line(k, "for (long k0 = klo; k0 <= q1; k0 += %d) {", TC_T);
    kg_line(k, "cp_async_wait(0);");
    kg_line(k, "BARRIER();");
    emit_tc_convert(k, c, NT, "Kb", "Kst");
    emit_tc_convert(k, c, NT, "Vb", "Vst");
    kg_line(k, "BARRIER();");
    kg_line(k, "if (k0 + %d <= q1) {", TC_T);
    kg_line(k, "    const long kn = k0 + %d;", TC_T);
    emit_tc_issue(k, c, NT, "Kst", "k", kg_ld(k, n->in[1]), "kn", "kvo");
    emit_tc_issue(k, c, NT, "Vst", "v", kg_ld(k, n->in[2]), "kn", "kvo");
    kg_line(k, "}");
    kg_line(k, "cp_async_commit();");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int half = 0; half < 2; half++) {");
    kg_line(k, "const long ka = k0 + 32 * half;");
    kg_line(k, "if (qw >= S || ka > qw + 15 || qw - (ka + 31) >= %ld) continue;", c->window);
    kg_line(k, "const int full = ka + 31 <= qw && qw + 15 - ka < %ld && qw + 15 < S;", c->window);
    kg_tc_zero(k, "sacc", 4);
    kg_tc_zero(k, "dpacc", 4);
    emit_tc_mma_rows(k, DP, "sacc", "qf[kk]", NULL, "Kb", "32 * half", 4);
    emit_tc_mma_rows(k, DP, "dpacc", "df[kk]", NULL, "Vb", "32 * half", 4);
    emit_tc_scores(k, c, sc2, "const long qs = qr + 8 * (e >> 1), ks = ka + 8 * j + 2 * tq + (e & 1);",
                   "const float L = Lr[e >> 1], Dd = Dr[e >> 1];", "sacc[j][e] = ds;");
    emit_tc_mma_cols(k, DP, "dqa", "sacc", "Kb", "32 * half", 2);
    kg_line(k, "}");
    kg_line(k, "}");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int r = 0; r < 2; r++) {");
    kg_line(k, "    const long qs = qr + 8 * r;");
    kg_line(k, "    if (qs >= S) continue;");
    kg_line(k, "    float *dqi = dq + (t0 + qs) * %ldL + qo;", kg_ld(k, n->out[0]));
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int j = 0; j < %ld; j++)", NO);
    kg_line(k, "        for (int e = 0; e < 2; e++) {");
    kg_line(k, "            const int col = 8 * j + 2 * tq + e;");
    if (DP != D) kg_line(k, "            if (col >= %ld) continue;", D);
    kg_line(k, "            dqi[col] = dqa[j][2 * r + e];");
    kg_line(k, "        }");
    kg_line(k, "}");
    kg_grid(k, 0, 0, 0, 1, 0, QB);
    kg_grid(k, 1, 0, c->H, 0, 0, 1);
    kg_block(k, (int)NT, 1, 1);
    kg_min_blocks(k, 4);
    return kg_end(k);
}

static int emit_bwd_dkv_tc(kgen *k, const ir_node *n, const attn_consts *c) {
    const int node = (int)(n - k->g->n);
    const long D = c->Dh, DP = tc_dp(D), NO = DP / 8, NT = 32 * TC_BWD_WARPS, KB = 16 * TC_BWD_WARPS;
    const long ws = kg_tc_ws(DP), SW = tc_sw(DP);
    char sc2[64];
    tc_scale2(k, n, D, sc2, sizeof sc2);
    kg_begin(k, "attention_bwd_dkv_tc", node, node + 1);
    emit_tiled_args(k, n);
    kg_out(k, "dk", n->out[1]);
    kg_out(k, "dv", n->out[2]);
    /* stage: Q, dO (TC_T x SW each), then lse and D of the tile's queries */
    kg_shared(k, "Qst", 2 * TC_T * SW + 2 * TC_T);
    kg_shared(k, "Qbf", 2 * TC_T * ws + 2 * KB * ws);
    kg_shared(k, "Ls", 2 * TC_T);
    kg_line(k, "float *dOst = Qst + %ld, *Lst = Qst + %ld, *Dst = Lst + %d, *Ds = Ls + %d;", TC_T * SW, 2 * TC_T * SW,
            TC_T, TC_T);
    kg_line(k, "unsigned *Qb = (unsigned *)Qbf, *dOb = Qb + %ld, *Kb = dOb + %ld, *Vb = Kb + %ld;", TC_T * ws, TC_T * ws,
            KB * ws);
    kg_tc_prologue(k);
    kg_line(k, "const long bg = GID_Y, b = bg / %ld, g = bg %% %ld;", c->Hkv, c->Hkv);
    kg_line(k, "const long t0 = b * S, k0 = GID_X * %ld, kvo = g * %ld;", KB, D);
    kg_line(k, "const long kw = k0 + warp * 16, kr = kw + gq;   /* this thread's keys: kr, kr + 8 */");
    /* the last query that sees a key of the block; query tiles from k0, for each head */
    kg_line(k, "long qend = (k0 + %ld < S ? k0 + %ld : S - 1) + %ld;", KB - 1, KB - 1, c->window - 1);
    kg_line(k, "if (qend > S - 1) qend = S - 1;");
    kg_line(k, "const long nq = (qend - k0) / %d + 1, ntile = nq * %ld;", TC_T, c->group);
    emit_tc_rows(k, c, DP, KB, NT, "Kb", "k", kg_ld(k, n->in[1]), "k0", "kvo");
    emit_tc_rows(k, c, DP, KB, NT, "Vb", "v", kg_ld(k, n->in[2]), "k0", "kvo");
    /* tile it: head g * group + it / nq, queries k0 + TC_T (it % nq) .. */
    const char *issue_fmt = "const long hn = %ld * g + (%s) / nq, q0n = k0 + %d * ((%s) %% nq), qon = hn * %ld;";
    for (int first = 1; first >= 0; first--) {
        if (!first) {
            kg_line(k, "for (long it = 0; it < ntile; it++) {");
            kg_line(k, "const long h = %ld * g + it / nq, q0 = k0 + %d * (it %% nq);", c->group, TC_T);
            kg_line(k, "cp_async_wait(0);");
            kg_line(k, "BARRIER();");
            emit_tc_convert(k, c, NT, "Qb", "Qst");
            emit_tc_convert(k, c, NT, "dOb", "dOst");
            kg_line(k, "if (LID_X < %d) { Ls[LID_X] = Lst[LID_X] * ((float)%.9ef); Ds[LID_X] = Dst[LID_X]; }", TC_T,
                    TC_LOG2E);
            kg_line(k, "BARRIER();");
            kg_line(k, "if (it + 1 < ntile) {");
        } else {
            kg_line(k, "{");
        }
        kg_line(k, issue_fmt, c->group, first ? "0" : "it + 1", TC_T, first ? "0" : "it + 1", D);
        emit_tc_issue(k, c, NT, "Qst", "q", kg_ld(k, n->in[0]), "q0n", "qon");
        emit_tc_issue(k, c, NT, "dOst", "dO", kg_ld(k, n->in[5]), "q0n", "qon");
        kg_line(k, "for (int x = LID_X; x < %d; x += %ld) {", 2 * TC_T, NT);
        kg_line(k, "    const long ps = q0n + (x & %d);", TC_T - 1);
        kg_line(k, "    const float *src = x < %d ? lse + (t0 + (ps < S ? ps : 0)) * %ldL + hn : Dw + (t0 + (ps < S ? ps : 0)) * %ldL + hn;",
                TC_T, kg_ld(k, n->in[4]), kg_ld(k, n->out[3]));
        kg_line(k, "    cp_async4(Lst + x, src, ps < S ? 4 : 0);");
        kg_line(k, "}");
        kg_line(k, "}");
        kg_line(k, "cp_async_commit();");
        if (first) {
            kg_tc_zero(k, "dka", NO);
            kg_tc_zero(k, "dva", NO);
        }
    }
    kg_line(k, "(void)h;");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int half = 0; half < 2; half++) {");
    kg_line(k, "const long qa = q0 + 32 * half;");
    /* every query of the half before every key of the warp, or past every key's window */
    kg_line(k, "if (qa >= S || qa + 31 < kw || qa - (kw + 15) >= %ld) continue;", c->window);
    kg_line(k, "const int full = kw + 15 <= qa && qa + 31 - kw < %ld && qa + 31 < S;", c->window);
    kg_tc_zero(k, "sacc", 4);
    kg_tc_zero(k, "dpacc", 4);
    emit_tc_mma_rows(k, DP, "sacc", "af", "Kb", "Qb", "32 * half", 4);
    emit_tc_mma_rows(k, DP, "dpacc", "af", "Vb", "dOb", "32 * half", 4);
    emit_tc_scores(k, c, sc2, "const long ks = kr + 8 * (e >> 1), qs = q0 + col;",
                   "const int col = 32 * half + 8 * j + 2 * tq + (e & 1); const float L = Ls[col], Dd = Ds[col];",
                   "sacc[j][e] = p; dpacc[j][e] = ds;");
    emit_tc_mma_cols(k, DP, "dva", "sacc", "dOb", "32 * half", 2);
    emit_tc_mma_cols(k, DP, "dka", "dpacc", "Qb", "32 * half", 2);
    kg_line(k, "}");
    kg_line(k, "}");
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int r = 0; r < 2; r++) {");
    kg_line(k, "    const long ks = kr + 8 * r;");
    kg_line(k, "    if (ks >= S) continue;");
    kg_line(k, "    float *dki = dk + (t0 + ks) * %ldL + kvo, *dvi = dv + (t0 + ks) * %ldL + kvo;",
            kg_ld(k, n->out[1]), kg_ld(k, n->out[2]));
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int j = 0; j < %ld; j++)", NO);
    kg_line(k, "        for (int e = 0; e < 2; e++) {");
    kg_line(k, "            const int col = 8 * j + 2 * tq + e;");
    if (DP != D) kg_line(k, "            if (col >= %ld) continue;", D);
    kg_line(k, "            dki[col] = dka[j][2 * r + e];");
    kg_line(k, "            dvi[col] = dva[j][2 * r + e];");
    kg_line(k, "        }");
    kg_line(k, "}");
    kg_grid(k, 0, 0, 0, 1, 0, KB);
    kg_grid(k, 1, 0, c->Hkv, 0, 0, 1);
    kg_block(k, (int)NT, 1, 1);
    kg_min_blocks(k, 3);
    return kg_end(k);
}

static int attention_bwd_emit(struct kgen *k, const ir_node *n) {
    const attn_consts c = emit_consts(k, n);
    attn_tiles t;
    if (k->bf16 && tc_dp(c.Dh) <= TC_BWD_MAXD) {
        /* dq first: it works out D, which dkv reads */
        if (emit_bwd_dq_tc(k, n, &c) < 0) return -1;
        return emit_bwd_dkv_tc(k, n, &c);
    }
    if (emit_bwd_d(k, n, &c) < 0) return -1;
    if (bwd_tiles(c.Dh, &t) < 0) return emit_bwd_rows(k, n);
    if (emit_bwd_dkv(k, n, &c, &t) < 0) return -1;
    return emit_bwd_dq(k, n, &c, &t);
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
    .nin = 6, .nout = 4,       /* dq, dk, dv, and the workspace D */
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
