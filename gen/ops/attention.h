/* Plain-C fp64 reference maths of sliding-window causal attention and RoPE (design §7).
 * These are the oracles the generated kernels are checked against, so they favour clarity
 * over speed, but the forward and backward follow the flash structure (key blocks, online
 * softmax, saved log-sum-exp) so that the kernels have a line-by-line model to follow.
 *
 * Layout: token-major, token tok = b*S + s; every tensor has a token stride `ld` (elements
 * between consecutive tokens), which may exceed its feature count because q, k, v are
 * zero-copy slices of one projection.
 *   q, o, do, dq : [tok, H*Dh]       k, v, dk, dv : [tok, Hkv*Dh]      lse : [tok, H]
 * Query head h reads kv head h / (H/Hkv). Query at position s sees keys s-window+1 .. s of
 * its own sequence; scores are scale * (q.k). lse is the natural log of the softmax
 * denominator including the running max, i.e. log(sum_j exp(score_j)). */
#ifndef REALM_OPS_ATTENTION_H
#define REALM_OPS_ATTENTION_H

/* Key (and query) tile edge of the flash-style loops. Deliberately not a divisor of typical
 * test sizes so that partial tiles are exercised. */
#define ATTN_REF_BLOCK 16

typedef struct {
    long B, S;         /* batch, sequence length */
    long H, Hkv, Dh;   /* query heads, key/value heads (H % Hkv == 0), head dim */
    long window;       /* >= 1; window >= S means plain causal */
    double scale;      /* score scale; callers resolve the "0 = 1/sqrt(Dh)" default */
} attn_dims;

/* Flash-style forward: never forms an S x S matrix; key blocks wholly outside a query
 * tile's window are skipped. Writes every element of o and lse. */
void attn_ref_forward(const attn_dims *d,
                      const double *q, long q_ld, const double *k, long k_ld,
                      const double *v, long v_ld,
                      double *o, long o_ld, double *lse, long lse_ld);

/* Independent check of the forward: a full masked softmax per query. Same contract. */
void attn_ref_naive(const attn_dims *d,
                    const double *q, long q_ld, const double *k, long k_ld,
                    const double *v, long v_ld,
                    double *o, long o_ld, double *lse, long lse_ld);

/* Flash backward from the saved lse: P = exp(score - lse), D_i = do_i . o_i,
 * dS = P (do.v - D). dq, dk, dv are overwritten (not accumulated). Gradients of kv heads
 * shared by several query heads are summed in a fixed order, so the result is bitwise
 * reproducible. */
void attn_ref_backward(const attn_dims *d,
                       const double *q, long q_ld, const double *k, long k_ld,
                       const double *v, long v_ld, const double *o, long o_ld,
                       const double *lse, long lse_ld, const double *dout, long do_ld,
                       double *dq, long dq_ld, double *dk, long dk_ld, double *dv, long dv_ld);

/* Visible (query, key) pairs of one head of one sequence: sum over s of min(s+1, window). */
double attn_visible_pairs(long S, long window);

/* RoPE (gen/ops/rope.c): x, y : [tok, H*Dh], Dh even. Pair (2i, 2i+1) of every head is
 * rotated by angle pos * base^(-2i/Dh), pos = s + pos_offset; inverse != 0 rotates by the
 * negative angle, which is also the gradient. y may equal x (in place). */
void rope_ref(long B, long S, long H, long Dh, long pos_offset, double base, int inverse,
              const double *x, long x_ld, double *y, long y_ld);

#endif
