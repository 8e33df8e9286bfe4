/* Mamba-3 SISO scan: plain-C fp64 reference (design.md §7). It is the oracle that generated
 * scan kernels and the decode step are checked against, so it favours obvious loops over
 * speed.
 *
 * Layout: per-token arrays are token-major, token index tok = b*S + s, features contiguous,
 * and each array has its own token stride `ld` (elements between consecutive tokens), so
 * zero-copy column views of a larger projection output can be passed in directly. */
#ifndef REALM_MAMBA3_SCAN_H
#define REALM_MAMBA3_SCAN_H

typedef struct {
    long B, S;          /* batch rows (independent sequences), tokens per row */
    int H, P, N, NA;    /* heads, head dim, state dim, rotation angles (2*NA <= N) */
} m3_dims;

typedef struct {
    const double *x;      long x_ld;       /* [tok, H*P]   v of head h: x[tok*x_ld + h*P + p] */
    const double *Bn;     long Bn_ld;      /* [tok, N]     normalised B (shared by heads) */
    const double *Cn;     long Cn_ld;      /* [tok, N]     normalised C (shared by heads) */
    const double *dd_dt;  long dd_dt_ld;   /* [tok, H] */
    const double *dd_A;   long dd_A_ld;    /* [tok, H] */
    const double *trap;   long trap_ld;    /* [tok, H] */
    const double *angles; long angles_ld;  /* [tok, NA]    shared by heads */
    const double *dt_bias;                 /* [H] */
    const double *B_bias;                  /* [H, N] */
    const double *C_bias;                  /* [H, N] */
    const double *D;                       /* [H] */
} m3_inputs;

/* Gradients with the same layout as m3_inputs; every pointer is required. The backward
 * writes only the feature columns of each row, never the padding between ld and the width. */
typedef struct {
    double *x;      long x_ld;
    double *Bn;     long Bn_ld;
    double *Cn;     long Cn_ld;
    double *dd_dt;  long dd_dt_ld;
    double *dd_A;   long dd_A_ld;
    double *trap;   long trap_ld;
    double *angles; long angles_ld;
    double *dt_bias, *B_bias, *C_bias, *D;
    /* Optional (NULL: not written): the per-head shares of the gradients that are summed over
     * heads, [tok, H*(2N+NA)], token stride head_ld: for head h, columns h*(2N+NA) + [0, N)
     * hold dK_h (its share of dBn), + [N, 2N) dQ_h (share of dCn), + [2N, 2N+NA) the share of
     * d(angles). The kernels reduce them over heads in a fixed order. */
    double *head;   long head_ld;
    /* Optional (NULL: not written): the workspaces of the chunk-parallel backward kernels, so
     * each of its launches can be checked against this reference on its own. Layout like the
     * saved states below (spread over a chunk's rows), per head:
     *  du  (width m3_bwd_width): for every chunk c >= 1, in the rows of chunk c-1, its
     *      increment of the state gradient sum_{t in c} exp(cs_t) dy_t Qr_t^T (slots
     *      e < P*N) and, in slot P*N, exp(cs) of its last token (the chunk's total decay);
     *      rows of the last chunk are zero;
     *  dsl (width m3_states_width): in the rows of chunk c, the gradient of the state
     *      leaving c; rows of the last chunk (nothing leaves it) are zero;
     *  tk  ([tok, H*(NA+4)], per token and head): the in-chunk suffix sums of dTheta (NA),
     *      dDT and dlam without the angle share and without the trapezoid term that
     *      crosses into the previous chunk, dscale, and dy . x (the token's share of dD). */
    double *du;     long du_ld;
    double *dsl;    long dsl_ld;
    double *tk;     long tk_ld;
} m3_grads;

/* Recurrent state carried between calls (decode, prefill -> decode), one per sequence b. */
typedef struct {
    double *S;       /* [B, H, P, N]  h_t */
    double *Theta;   /* [B, H, NA]    cumulative angle, kept in [0, 2pi) */
    double *Kr;      /* [B, H, N]     rotated key of the last token */
    double *v;       /* [B, H, P]     input (x) of the last token */
} m3_state;

/* Activations, shared with the decode step and kernel tests so every consumer agrees on the
 * branch points. Each returns the value and stores the derivative in *d (d may be NULL). */
double m3_dt_act(double u, double *d);      /* softplus(u); u for u > 20 */
double m3_a_act(double u, double *d);       /* -max(f(u), 1e-4); only the taken branch of f */
double m3_sigmoid(double u);
double m3_wrap_angle(double a);             /* a mod 2pi, in [0, 2pi) */

/* Sequential recurrence (the decode form). init NULL means a zero state. y: [tok, H*P] with
 * token stride y_ld. final may be NULL, and may alias init (the decode step updates its state
 * in place). With S == 0, final receives a copy of init. */
void m3_ref_recurrent(m3_dims d, const m3_inputs *in, const m3_state *init,
                      double *y, long y_ld, m3_state *final);

/* Chunk states saved for the backward, token-major: [tok, H*W] with W = m3_states_width()
 * = ceil(P*N/chunk). The state LEAVING every full chunk c (tokens [c*chunk, (c+1)*chunk)) is
 * the chunked form's state: h_t of its last token t plus the next token's b-term, which the
 * chunked form folds into token t: (1 - lam_{t+1}) DT_{t+1} v_t Kr_t^T (none at the sequence
 * end, where it equals h_T). It is spread over that chunk's own tokens: element (h, p, n), e = p*N + n, lives at token
 * c*chunk + e / W, column h*W + e % W; slots e >= P*N are zero. Rows of a partial last chunk
 * are all zero. So the state entering chunk c >= 1 sits in the rows of chunk c-1 (always
 * full), chunk 0's entering state is zero (or the carried init), and when S is a multiple of
 * chunk the last chunk's rows hold the final state h_T. The decode state is m3_state, not
 * this. */
long m3_states_width(int P, int N, int chunk);
/* Per-head width of the backward's `du` workspace (m3_grads), ceil((P*N + 1)/chunk). */
long m3_bwd_width(int P, int N, int chunk);
/* Per-head width of the forward op's `dstate` workspace, ceil((P*N + 1 + 2*NA)/chunk), spread
 * over a full chunk's rows like the states above: slots e < P*N the chunk's state increment in
 * its local frame, slot P*N its total decay exp(min(cs_L, 0)), slots P*N + 1 + 2i and
 * P*N + 2 + 2i the cos and sin of the angle accumulated inside the chunk (angle i), so the walk
 * over chunks reads per-chunk scalars instead of recomputing them from the tokens. */
long m3_dstate_width(int P, int N, int NA, int chunk);
/* Per-head width of the forward op's `theta` workspace, ceil(2*NA/chunk): the cos and sin of
 * the cumulative angle leaving every full chunk (slot 2i: cos Theta_i, 2i+1: sin Theta_i),
 * spread over the chunk's rows exactly like the states above. */
long m3_theta_width(int NA, int chunk);

/* Chunked algorithm (the training/prefill form), chunk >= 1 tokens. Same contract as
 * m3_ref_recurrent; the final state equals the recurrent one (h_T, Theta_T, Kr_T, v_T).
 * states (may be NULL): receives the chunk states in the layout above (columns [0, H*W) of
 * every token row, token stride states_ld; other columns untouched). */
void m3_ref_chunked(m3_dims d, int chunk, const m3_inputs *in, const m3_state *init,
                    double *y, long y_ld, m3_state *final, double *states, long states_ld);

/* Gradients of sum(dy * y) w.r.t. every input and parameter, for a zero initial state (the
 * training case). Gradients are overwritten, not accumulated. Chunked reverse pass (see the
 * .c file). states: the forward's chunk states (layout above, same chunk), or NULL to
 * recompute them. */
void m3_ref_backward(m3_dims d, int chunk, const m3_inputs *in, const double *states,
                     long states_ld, const double *dy, long dy_ld, const m3_grads *g);

/* Operation counts of the chunked algorithms, shared by the op definitions and bench/. */
double m3_flops_fwd(m3_dims d, int chunk);
double m3_flops_bwd(m3_dims d, int chunk);

/* Kernel-template piece shared by the scan's serial forward and the decode step (defined in
 * mamba3_scan.c; see the comment there for what it expects in scope). */
struct kgen;
void m3_emit_token_update(struct kgen *k, int N, int NA, int P, int PB, int RP, long ldang, long ldb, long ldc,
                          long ldx, long ldy);

#endif
