/* Mamba-3 SISO scan: fp64 reference (forward recurrent + chunked, chunked backward) and the
 * "mamba3_scan" / "mamba3_scan_bwd" primitives. Maths: design.md §7, executable definition:
 * ../shared/reference/mamba3_siso_oracle.py. */
#include "mamba3_scan.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef M3_MATH_ONLY
#include "op.h"
#endif

static const double M3_PI = 3.14159265358979323846;

/* ---------------------------------------------------------------- activations */

double m3_sigmoid(double u) {
    /* Two forms so exp never overflows for large |u|. */
    if (u >= 0) return 1.0 / (1.0 + exp(-u));
    double e = exp(u);
    return e / (1.0 + e);
}

double m3_dt_act(double u, double *d) {
    if (u > 20) {
        if (d) *d = 1.0;
        return u;
    }
    if (d) *d = m3_sigmoid(u);
    return log1p(exp(u));
}

double m3_a_act(double u, double *d) {
    /* Evaluate only the taken branch: 1/(1-u) at u = 1 would be inf (design §7 pitfalls).
     * f is C1 at 0 (both sides give f = 1, f' = 1). */
    double f, df;
    if (u >= 0) {
        f = 1.0 + u;
        df = 1.0;
    } else {
        double r = 1.0 / (1.0 - u);
        f = r;
        df = r * r;
    }
    if (f < 1e-4) {
        if (d) *d = 0.0;
        return -1e-4;
    }
    if (d) *d = -df;
    return -f;
}

double m3_wrap_angle(double a) {
    /* Python-style modulo (result in [0, 2pi)) so the stored decode state matches the oracle. */
    const double tp = 2.0 * M3_PI;
    double r = fmod(a, tp);
    if (r < 0) r += tp;
    if (r >= tp) r -= tp;
    return r;
}

/* ---------------------------------------------------------------- per-head precompute */

static void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz);
    if (!p) {
        /* The reference runs in tests and the compiler's checker; there is no sane recovery. */
        fprintf(stderr, "mamba3_scan reference: out of memory (%zu x %zu bytes)\n", n, sz);
        abort();
    }
    return p;
}

/* Everything the scan needs about one (sequence b, head h), computed once per head so the
 * forward and backward passes read identical values. */
typedef struct {
    long S;
    int P, N, NA;
    double *u_dt, *u_A;          /* pre-activations [S] */
    double *DT, *A, *ADT, *lam;  /* [S] */
    double *scale, *gamma;       /* [S]  trapezoid weights with b folded into token s */
    double *th;                  /* [S, NA]  pi * tanh(angles) */
    double *Th;                  /* [S, NA]  cumulative angle */
    double *K, *Q, *Kr, *Qr;     /* [S, N]   biased keys/queries, unrotated and rotated */
} m3_head;

static void head_alloc(m3_head *w, long S, int P, int N, int NA) {
    w->S = S; w->P = P; w->N = N; w->NA = NA;
    size_t s = (size_t)S;
    w->u_dt = xcalloc(s * 8, sizeof(double));
    w->u_A = w->u_dt + s;
    w->DT = w->u_dt + 2 * s;
    w->A = w->u_dt + 3 * s;
    w->ADT = w->u_dt + 4 * s;
    w->lam = w->u_dt + 5 * s;
    w->scale = w->u_dt + 6 * s;
    w->gamma = w->u_dt + 7 * s;
    w->th = xcalloc(s * (size_t)NA * 2, sizeof(double));
    w->Th = w->th + s * (size_t)NA;
    w->K = xcalloc(s * (size_t)N * 4, sizeof(double));
    w->Q = w->K + s * (size_t)N;
    w->Kr = w->K + 2 * s * (size_t)N;
    w->Qr = w->K + 3 * s * (size_t)N;
}

static void head_free(m3_head *w) {
    free(w->u_dt);
    free(w->th);
    free(w->K);
}

/* Rotate pairs (2i, 2i+1), i < NA, by angle th[i]; dims >= 2*NA pass through. */
static void rot(const double *x, const double *th, int N, int NA, double *y) {
    for (int n = 2 * NA; n < N; n++) y[n] = x[n];
    for (int i = 0; i < NA; i++) {
        double c = cos(th[i]), s = sin(th[i]);
        double x0 = x[2 * i], x1 = x[2 * i + 1];
        y[2 * i] = x0 * c - x1 * s;
        y[2 * i + 1] = x0 * s + x1 * c;
    }
}

/* Theta0: the carried cumulative angle of this head ([NA]) or NULL for zeros. */
static void head_prep(m3_head *w, const m3_dims *d, const m3_inputs *in, long b, int h,
                      const double *Theta0) {
    const long S = d->S;
    const int N = d->N, NA = d->NA;
    for (long s = 0; s < S; s++) {
        long tok = b * S + s;
        w->u_dt[s] = in->dd_dt[tok * in->dd_dt_ld + h] + in->dt_bias[h];
        w->u_A[s] = in->dd_A[tok * in->dd_A_ld + h];
        w->DT[s] = m3_dt_act(w->u_dt[s], NULL);
        w->A[s] = m3_a_act(w->u_A[s], NULL);
        w->ADT[s] = w->A[s] * w->DT[s];
        w->lam[s] = m3_sigmoid(in->trap[tok * in->trap_ld + h]);
        for (int i = 0; i < NA; i++) {
            double prev = s ? w->Th[(s - 1) * NA + i] : (Theta0 ? Theta0[i] : 0.0);
            w->th[s * NA + i] = M3_PI * tanh(in->angles[tok * in->angles_ld + i]);
            w->Th[s * NA + i] = m3_wrap_angle(prev + w->DT[s] * w->th[s * NA + i]);
        }
        double *K = w->K + s * N, *Q = w->Q + s * N;
        for (int n = 0; n < N; n++) {
            K[n] = in->Bn[tok * in->Bn_ld + n] + in->B_bias[(long)h * N + n];
            Q[n] = in->Cn[tok * in->Cn_ld + n] + in->C_bias[(long)h * N + n];
        }
        rot(K, w->Th + s * NA, N, NA, w->Kr + s * N);
        rot(Q, w->Th + s * NA, N, NA, w->Qr + s * N);
    }
    for (long s = 0; s < S; s++) {
        w->gamma[s] = w->lam[s] * w->DT[s];
        /* The next token's b-term belongs to this token's (v, Kr); it stops at the sequence end. */
        w->scale[s] = w->gamma[s] + (s + 1 < S ? (1.0 - w->lam[s + 1]) * w->DT[s + 1] : 0.0);
    }
}

static double dotv(const double *a, const double *b, int n) {
    double r = 0;
    for (int i = 0; i < n; i++) r += a[i] * b[i];
    return r;
}

/* Hand over (h_T, Theta_T, Kr_T, v_T) of head h of sequence b. Sh is the [P, N] state. */
static void put_final(const m3_dims *d, const m3_head *w, const m3_inputs *in,
                      const m3_state *init, long b, int h, const double *Sh, m3_state *fin) {
    const int P = d->P, N = d->N, NA = d->NA;
    long bh = b * d->H + h;
    memmove(fin->S + bh * P * N, Sh, sizeof(double) * (size_t)P * (size_t)N);
    if (d->S > 0) {
        long tok = b * d->S + d->S - 1;
        memcpy(fin->Theta + bh * NA, w->Th + (d->S - 1) * NA, sizeof(double) * (size_t)NA);
        memcpy(fin->Kr + bh * N, w->Kr + (d->S - 1) * N, sizeof(double) * (size_t)N);
        memcpy(fin->v + bh * P, in->x + tok * in->x_ld + (long)h * P, sizeof(double) * (size_t)P);
    } else {
        for (int i = 0; i < NA; i++) fin->Theta[bh * NA + i] = init ? init->Theta[bh * NA + i] : 0;
        for (int n = 0; n < N; n++) fin->Kr[bh * N + n] = init ? init->Kr[bh * N + n] : 0;
        for (int p = 0; p < P; p++) fin->v[bh * P + p] = init ? init->v[bh * P + p] : 0;
    }
}

/* ---------------------------------------------------------------- forward: recurrence */

void m3_ref_recurrent(m3_dims d, const m3_inputs *in, const m3_state *init,
                      double *y, long y_ld, m3_state *final) {
    const int H = d.H, P = d.P, N = d.N, NA = d.NA;
    m3_head w;
    head_alloc(&w, d.S, P, N, NA);
    double *Sh = xcalloc((size_t)P * (size_t)N + (size_t)N + (size_t)P, sizeof(double));
    double *kp = Sh + P * N, *vp = kp + N;
    for (long b = 0; b < d.B; b++) {
        for (int h = 0; h < H; h++) {
            long bh = b * H + h;
            /* Copy the carried state first: final may alias init. */
            if (init) {
                memcpy(Sh, init->S + bh * P * N, sizeof(double) * (size_t)P * (size_t)N);
                memcpy(kp, init->Kr + bh * N, sizeof(double) * (size_t)N);
                memcpy(vp, init->v + bh * P, sizeof(double) * (size_t)P);
            } else {
                memset(Sh, 0, sizeof(double) * (size_t)(P * N + N + P));
            }
            head_prep(&w, &d, in, b, h, init ? init->Theta + bh * NA : NULL);
            for (long s = 0; s < d.S; s++) {
                long tok = b * d.S + s;
                const double *v = in->x + tok * in->x_ld + (long)h * P;
                const double *Kr = w.Kr + s * N, *Qr = w.Qr + s * N;
                double a = exp(w.ADT[s]);
                double bc = (1.0 - w.lam[s]) * w.DT[s] * a;
                double g = w.gamma[s];
                for (int p = 0; p < P; p++) {
                    double *row = Sh + p * N;
                    for (int n = 0; n < N; n++)
                        row[n] = a * row[n] + bc * vp[p] * kp[n] + g * v[p] * Kr[n];
                    y[tok * y_ld + (long)h * P + p] = dotv(row, Qr, N) + in->D[h] * v[p];
                }
                memcpy(kp, Kr, sizeof(double) * (size_t)N);
                memcpy(vp, v, sizeof(double) * (size_t)P);
            }
            if (final) put_final(&d, &w, in, init, b, h, Sh, final);
        }
    }
    free(Sh);
    head_free(&w);
}

/* ---------------------------------------------------------------- forward: chunked */

/* The entering state of one head with a carried initial state: h0 plus the b-term of token 0
 * (which couples to the previous call's last token and so is not in any scale_s). */
static void aug_init(const m3_dims *d, const m3_head *w, const m3_state *init, long bh,
                     double *Sh) {
    const int P = d->P, N = d->N;
    if (!init) {
        memset(Sh, 0, sizeof(double) * (size_t)P * (size_t)N);
        return;
    }
    memcpy(Sh, init->S + bh * P * N, sizeof(double) * (size_t)P * (size_t)N);
    if (d->S == 0) return;
    double c = (1.0 - w->lam[0]) * w->DT[0];
    for (int p = 0; p < P; p++)
        for (int n = 0; n < N; n++) Sh[p * N + n] += c * init->v[bh * P + p] * init->Kr[bh * N + n];
}

/* One chunk [c0, c0+L) of head h: outputs y (if non-NULL) from the entering state Sh, then
 * advances Sh to the state leaving the chunk. cs: scratch [L]. */
static void chunk_fwd(const m3_dims *d, const m3_head *w, const m3_inputs *in, long b, int h,
                      long c0, long L, double *Sh, double *cs, double *y, long y_ld) {
    const int P = d->P, N = d->N;
    double acc = 0;
    for (long a = 0; a < L; a++) cs[a] = (acc += w->ADT[c0 + a]);
    if (y) {
        for (long a = 0; a < L; a++) {
            long t = c0 + a, tok = b * d->S + t;
            const double *Qr = w->Qr + t * N;
            double *yt = y + tok * y_ld + (long)h * P;
            double et = exp(fmin(cs[a], 0.0));
            double diag = w->gamma[t] * dotv(w->Q + t * N, w->K + t * N, N) + in->D[h];
            const double *vt = in->x + tok * in->x_ld + (long)h * P;
            for (int p = 0; p < P; p++) yt[p] = et * dotv(Sh + p * N, Qr, N) + diag * vt[p];
            for (long bb = 0; bb < a; bb++) {
                long s = c0 + bb;
                /* s < t is guaranteed by the loop bound, so the exponent is <= 0 mathematically;
                 * the min guards against rounding, never against an unmasked s > t. */
                double wgt = dotv(Qr, w->Kr + s * N, N) * exp(fmin(cs[a] - cs[bb], 0.0)) *
                             w->scale[s];
                const double *vs = in->x + (b * d->S + s) * in->x_ld + (long)h * P;
                for (int p = 0; p < P; p++) yt[p] += wgt * vs[p];
            }
        }
    }
    double eL = exp(fmin(cs[L - 1], 0.0));
    for (int i = 0; i < P * N; i++) Sh[i] *= eL;
    for (long bb = 0; bb < L; bb++) {
        long s = c0 + bb;
        double c = exp(fmin(cs[L - 1] - cs[bb], 0.0)) * w->scale[s];
        const double *vs = in->x + (b * d->S + s) * in->x_ld + (long)h * P;
        const double *Kr = w->Kr + s * N;
        for (int p = 0; p < P; p++)
            for (int n = 0; n < N; n++) Sh[p * N + n] += c * vs[p] * Kr[n];
    }
}

long m3_states_width(int P, int N, int chunk) {
    if (chunk < 1) chunk = 1;
    return ((long)P * N + chunk - 1) / chunk;
}

long m3_theta_width(int NA, int chunk) { return m3_states_width(2, NA, chunk); }

long m3_dstate_width(int P, int N, int NA, int chunk) {
    if (chunk < 1) chunk = 1;
    return ((long)P * N + 1 + 2L * NA + chunk - 1) / chunk;
}

long m3_bwd_width(int P, int N, int chunk) {
    if (chunk < 1) chunk = 1;
    return ((long)P * N + 1 + chunk - 1) / chunk;
}

/* Store the state Sh leaving chunk [c0, c0+L) of head h (zeros if the chunk is partial). */
static void put_states(const m3_dims *d, int chunk, long b, int h, long c0, long L,
                       const double *Sh, double *states, long ld) {
    const long W = m3_states_width(d->P, d->N, chunk), PN = (long)d->P * d->N;
    for (long e = 0; e < L * W; e++) {
        double v = L == chunk && e < PN ? Sh[e] : 0.0;
        states[(b * d->S + c0 + e / W) * ld + (long)h * W + e % W] = v;
    }
}

void m3_ref_chunked(m3_dims d, int chunk, const m3_inputs *in, const m3_state *init,
                    double *y, long y_ld, m3_state *final, double *states, long states_ld) {
    const int H = d.H, P = d.P, N = d.N, NA = d.NA;
    if (chunk < 1) chunk = 1;
    m3_head w;
    head_alloc(&w, d.S, P, N, NA);
    double *Sh = xcalloc((size_t)P * (size_t)N + (size_t)chunk, sizeof(double));
    double *cs = Sh + P * N;
    for (long b = 0; b < d.B; b++) {
        for (int h = 0; h < H; h++) {
            long bh = b * H + h;
            head_prep(&w, &d, in, b, h, init ? init->Theta + bh * NA : NULL);
            aug_init(&d, &w, init, bh, Sh);
            for (long c0 = 0; c0 < d.S; c0 += chunk) {
                long L = d.S - c0 < chunk ? d.S - c0 : chunk;
                chunk_fwd(&d, &w, in, b, h, c0, L, Sh, cs, y, y_ld);
                if (states) put_states(&d, chunk, b, h, c0, L, Sh, states, states_ld);
            }
            if (final) put_final(&d, &w, in, init, b, h, Sh, final);
        }
    }
    free(Sh);
    head_free(&w);
}

/* ---------------------------------------------------------------- backward
 *
 * A chunked reverse pass, the algorithm a GPU kernel follows (design §7 "Backward"):
 *  1. recompute the per-token quantities and the state entering each chunk (a forward sweep
 *     over chunks that stores those states);
 *  2. sweep the chunks in reverse carrying dS, the gradient of the state leaving the chunk;
 *     inside a chunk every product of the forward (inter-chunk S Qr, the masked intra-chunk
 *     Qr.Kr * decay * scale * v, the rotation-free diagonal, the state update) is
 *     differentiated directly, giving dQr, dKr, dv, dscale, dgamma and dcs; dADT is the
 *     in-chunk reverse cumsum of dcs;
 *  3. undo the rotation (dQ, dK, dTheta), reverse-cumsum dTheta over the whole sequence (the
 *     mod 2pi is an identity for the gradient) for d(angles) and dDT's angle share;
 *  4. chain through scale/gamma (the trapezoid shift couples token s and s+1), ADT, the
 *     activations, and the biases (summed over tokens) / shared B, C, angles (summed over
 *     heads). */

typedef struct {
    double *dDT, *dADT, *dlam, *dscale, *dgamma, *dcs;   /* [S] */
    double *dQr, *dKr, *dQ, *dK;                         /* [S, N] */
    double *dTh;                                         /* [S, NA] */
    double *Sc;                                          /* [nchunks, P, N] entering states */
    double *dS, *dSn;                                    /* [P, N] */
    double *cs;                                          /* [chunk] */
    double *tmp;                                         /* [max(P, N)] */
} m3_bwork;

/* Reverse sweep over the chunks of one head; fills the per-token gradient accumulators
 * (which must be zero on entry) and dv (the head's slice of g->x, zero on entry), *dD. */
static void head_bwd(const m3_dims *d, int chunk, const m3_head *w, const m3_inputs *in,
                     const double *states, long states_ld, const double *dy, long dy_ld,
                     const m3_grads *g, long b, int h, m3_bwork *k, double *dD) {
    const int P = d->P, N = d->N;
    const long S = d->S;
    long nch = (S + chunk - 1) / chunk;
    /* 1. entering states: read back from the forward's saved states (the rows of chunk c-1),
     * or recomputed by a forward sweep over the chunks */
    if (states) {
        const long W = m3_states_width(P, N, chunk);
        memset(k->Sc, 0, sizeof(double) * (size_t)P * (size_t)N);
        for (long c = 1; c < nch; c++)
            for (long e = 0; e < (long)P * N; e++)
                k->Sc[c * P * N + e] =
                    states[(b * S + (c - 1) * chunk + e / W) * states_ld + (long)h * W + e % W];
    } else {
        memset(k->dS, 0, sizeof(double) * (size_t)P * (size_t)N);   /* the running state */
        for (long c = 0; c < nch; c++) {
            long c0 = c * chunk, L = S - c0 < chunk ? S - c0 : chunk;
            memcpy(k->Sc + c * P * N, k->dS, sizeof(double) * (size_t)P * (size_t)N);
            chunk_fwd(d, w, in, b, h, c0, L, k->dS, k->cs, NULL, 0);
        }
    }
    /* 2. reverse sweep; dSn = gradient of the state leaving the chunk (0 after the last: the
     * final state is not an output of the training forward). */
    memset(k->dSn, 0, sizeof(double) * (size_t)P * (size_t)N);
#define XV(t) (in->x + (b * S + (t)) * in->x_ld + (long)h * P)
#define DV(t) (g->x + (b * S + (t)) * g->x_ld + (long)h * P)
#define DY(t) (dy + (b * S + (t)) * dy_ld + (long)h * P)
    for (long c = nch - 1; c >= 0; c--) {
        long c0 = c * chunk, L = S - c0 < chunk ? S - c0 : chunk;
        const double *Sc = k->Sc + c * P * N;
        double *cs = k->cs, *dcs = k->dcs + c0;
        double acc = 0;
        for (long a = 0; a < L; a++) cs[a] = (acc += w->ADT[c0 + a]);
        double eL = exp(fmin(cs[L - 1], 0.0));
        /* dS_entering = eL * dSn + sum_t e_t dy_t Qr_t^T */
        for (int i = 0; i < P * N; i++) k->dS[i] = eL * k->dSn[i];
        double sdS = 0;
        for (int i = 0; i < P * N; i++) sdS += k->dSn[i] * Sc[i];
        dcs[L - 1] += eL * sdS;
        for (long a = 0; a < L; a++) {
            long t = c0 + a;
            const double *dyt = DY(t), *vt = XV(t), *Qr = w->Qr + t * N;
            double *dQr = k->dQr + t * N;
            double et = exp(fmin(cs[a], 0.0));
            /* inter-chunk: y_t += e_t Sc Qr_t */
            for (int p = 0; p < P; p++) {
                double sq = dotv(Sc + p * N, Qr, N);
                dcs[a] += et * dyt[p] * sq;
                for (int n = 0; n < N; n++) {
                    dQr[n] += et * dyt[p] * Sc[p * N + n];
                    k->dS[p * N + n] += et * dyt[p] * Qr[n];
                }
            }
            /* intra-chunk, strictly causal */
            for (long bb = 0; bb < a; bb++) {
                long s = c0 + bb;
                const double *vs = XV(s), *Kr = w->Kr + s * N;
                double wdec = exp(fmin(cs[a] - cs[bb], 0.0));
                double qk = dotv(Qr, Kr, N), dyv = dotv(dyt, vs, P);
                double cterm = qk * wdec * w->scale[s] * dyv;
                dcs[a] += cterm;
                dcs[bb] -= cterm;
                k->dscale[s] += qk * wdec * dyv;
                double f = wdec * w->scale[s] * dyv;
                double *dKr = k->dKr + s * N;
                for (int n = 0; n < N; n++) {
                    dQr[n] += f * Kr[n];
                    dKr[n] += f * Qr[n];
                }
                double *dvs = DV(s);
                for (int p = 0; p < P; p++) dvs[p] += qk * wdec * w->scale[s] * dyt[p];
            }
            /* diagonal: (gamma_t Q_t.K_t + D) v_t */
            double dyv = dotv(dyt, vt, P), qk0 = dotv(w->Q + t * N, w->K + t * N, N);
            k->dgamma[t] += qk0 * dyv;
            for (int n = 0; n < N; n++) {
                k->dQ[t * N + n] += w->gamma[t] * dyv * w->K[t * N + n];
                k->dK[t * N + n] += w->gamma[t] * dyv * w->Q[t * N + n];
            }
            double *dvt = DV(t);
            for (int p = 0; p < P; p++) dvt[p] += (w->gamma[t] * qk0 + in->D[h]) * dyt[p];
            *dD += dyv;
        }
        /* state update: S_out += exp(cs_L - cs_s) scale_s v_s Kr_s^T */
        for (long bb = 0; bb < L; bb++) {
            long s = c0 + bb;
            const double *vs = XV(s), *Kr = w->Kr + s * N;
            double wdec = exp(fmin(cs[L - 1] - cs[bb], 0.0));
            double *u = k->tmp;   /* dSn Kr_s  [P] */
            for (int p = 0; p < P; p++) u[p] = dotv(k->dSn + p * N, Kr, N);
            double vdu = dotv(vs, u, P);
            dcs[L - 1] += wdec * w->scale[s] * vdu;
            dcs[bb] -= wdec * w->scale[s] * vdu;
            k->dscale[s] += wdec * vdu;
            double *dvs = DV(s), *dKr = k->dKr + s * N;
            for (int p = 0; p < P; p++) dvs[p] += wdec * w->scale[s] * u[p];
            for (int p = 0; p < P; p++) {
                double f = wdec * w->scale[s] * vs[p];
                for (int n = 0; n < N; n++) dKr[n] += f * k->dSn[p * N + n];
            }
        }
        /* the chunk-parallel kernels' workspaces: this chunk's increment of the state gradient
         * (dS - eL dSn) with its decay, and the gradient of the state leaving it */
        if (g->du) {
            const long Wd = m3_bwd_width(P, N, chunk), PN = (long)P * N;
            if (c > 0)
                for (long e = 0; e < chunk * Wd; e++)
                    g->du[(b * S + c0 - chunk + e / Wd) * g->du_ld + (long)h * Wd + e % Wd] =
                        e < PN ? k->dS[e] - eL * k->dSn[e] : e == PN ? eL : 0.0;
            if (c == nch - 1)
                for (long e = 0; e < L * Wd; e++) g->du[(b * S + c0 + e / Wd) * g->du_ld + (long)h * Wd + e % Wd] = 0.0;
        }
        if (g->dsl) {
            const long W = m3_states_width(P, N, chunk), PN = (long)P * N;
            for (long e = 0; e < L * W; e++)
                g->dsl[(b * S + c0 + e / W) * g->dsl_ld + (long)h * W + e % W] =
                    c < nch - 1 && e < PN ? k->dSn[e] : 0.0;
        }
        /* cs_a = sum_{j<=a} ADT_j  =>  dADT_j = sum_{a>=j} dcs_a (chunk-local) */
        double r = 0;
        for (long a = L - 1; a >= 0; a--) k->dADT[c0 + a] = (r += dcs[a]);
        memcpy(k->dSn, k->dS, sizeof(double) * (size_t)P * (size_t)N);
    }
#undef XV
#undef DV
#undef DY
}

void m3_ref_backward(m3_dims d, int chunk, const m3_inputs *in, const double *states,
                     long states_ld, const double *dy, long dy_ld, const m3_grads *g) {
    const int H = d.H, P = d.P, N = d.N, NA = d.NA;
    const long S = d.S, ntok = d.B * d.S;
    if (chunk < 1) chunk = 1;
    long nch = (S + chunk - 1) / chunk;
    /* Shared inputs and parameters accumulate over heads and tokens: clear them once. */
    for (long tok = 0; tok < ntok; tok++) {
        memset(g->Bn + tok * g->Bn_ld, 0, sizeof(double) * (size_t)N);
        memset(g->Cn + tok * g->Cn_ld, 0, sizeof(double) * (size_t)N);
        memset(g->angles + tok * g->angles_ld, 0, sizeof(double) * (size_t)NA);
        memset(g->x + tok * g->x_ld, 0, sizeof(double) * (size_t)H * (size_t)P);
    }
    memset(g->dt_bias, 0, sizeof(double) * (size_t)H);
    memset(g->D, 0, sizeof(double) * (size_t)H);
    memset(g->B_bias, 0, sizeof(double) * (size_t)H * (size_t)N);
    memset(g->C_bias, 0, sizeof(double) * (size_t)H * (size_t)N);

    m3_head w;
    head_alloc(&w, S, P, N, NA);
    m3_bwork k;
    size_t s = (size_t)S, pn = (size_t)P * (size_t)N;
    size_t mx = (size_t)(P > N ? P : N);
    size_t nacc = 6 * s + 4 * s * (size_t)N + s * (size_t)NA;
    double *acc = xcalloc(nacc, sizeof(double));
    double *fixed = xcalloc((size_t)nch * pn + 2 * pn + (size_t)chunk + mx, sizeof(double));
    k.dDT = acc; k.dADT = acc + s; k.dlam = acc + 2 * s; k.dscale = acc + 3 * s;
    k.dgamma = acc + 4 * s; k.dcs = acc + 5 * s;
    k.dQr = acc + 6 * s; k.dKr = k.dQr + s * N; k.dQ = k.dKr + s * N; k.dK = k.dQ + s * N;
    k.dTh = k.dK + s * N;
    k.Sc = fixed; k.dS = fixed + (size_t)nch * pn; k.dSn = k.dS + pn; k.cs = k.dSn + pn;
    k.tmp = k.cs + chunk;

    for (long b = 0; b < d.B; b++) {
        for (int h = 0; h < H; h++) {
            memset(acc, 0, sizeof(double) * nacc);
            head_prep(&w, &d, in, b, h, NULL);
            double dD = 0;
            head_bwd(&d, chunk, &w, in, states, states_ld, dy, dy_ld, g, b, h, &k, &dD);
            g->D[h] += dD;
            /* 3. rotation: Qr = R(Th) Q  =>  dQ += R^T dQr, dTh += dQr . dR/dTh Q */
            for (long t = 0; t < S; t++) {
                const double *Th = w.Th + t * NA;
                double *dQ = k.dQ + t * N, *dK = k.dK + t * N;
                const double *dQr = k.dQr + t * N, *dKr = k.dKr + t * N;
                const double *Qr = w.Qr + t * N, *Kr = w.Kr + t * N;
                for (int n = 2 * NA; n < N; n++) {
                    dQ[n] += dQr[n];
                    dK[n] += dKr[n];
                }
                for (int i = 0; i < NA; i++) {
                    double c = cos(Th[i]), sn = sin(Th[i]);
                    int i0 = 2 * i, i1 = 2 * i + 1;
                    dQ[i0] += c * dQr[i0] + sn * dQr[i1];
                    dQ[i1] += -sn * dQr[i0] + c * dQr[i1];
                    dK[i0] += c * dKr[i0] + sn * dKr[i1];
                    dK[i1] += -sn * dKr[i0] + c * dKr[i1];
                    /* d(rot x)/dth = (-(rot x)_1, (rot x)_0) */
                    k.dTh[t * NA + i] = -dQr[i0] * Qr[i1] + dQr[i1] * Qr[i0]
                                        - dKr[i0] * Kr[i1] + dKr[i1] * Kr[i0];
                }
            }
            /* Th_t = Th_{t-1} + DT_t th_t: reverse cumsum over the whole sequence */
            for (int i = 0; i < NA; i++) {
                double G = 0;
                for (long t = S - 1; t >= 0; t--) {
                    G += k.dTh[t * NA + i];
                    long tok = b * S + t;
                    double th = w.th[t * NA + i];
                    double tnh = th / M3_PI;
                    k.dDT[t] += G * th;
                    double share = G * w.DT[t] * M3_PI * (1.0 - tnh * tnh);
                    g->angles[tok * g->angles_ld + i] += share;
                    if (g->head) g->head[tok * g->head_ld + (long)h * (2 * N + NA) + 2 * N + i] = share;
                }
            }
            if (g->tk) {
                /* the backward kernels' per-token workspace (m3_grads): dDT and dlam so far lack
                 * the angle share; the trapezoid term from the previous token is added here only
                 * inside a chunk */
                const long Wt = NA + 4;
                for (long t = 0; t < S; t++) {
                    double *o = g->tk + (b * S + t) * g->tk_ld + (long)h * Wt;
                    long c0 = t / chunk * chunk, end = c0 + chunk < S ? c0 + chunk : S;
                    for (int i = 0; i < NA; i++) {
                        double G = 0;
                        for (long u = t; u < end; u++) G += k.dTh[u * NA + i];
                        o[i] = G;
                    }
                    double own = k.dgamma[t] + k.dscale[t];
                    double pdt = own * w.lam[t] + w.A[t] * k.dADT[t], plam = own * w.DT[t];
                    if (t > c0) {
                        pdt += k.dscale[t - 1] * (1.0 - w.lam[t]);
                        plam -= k.dscale[t - 1] * w.DT[t];
                    }
                    o[NA] = pdt;
                    o[NA + 1] = plam;
                    o[NA + 2] = k.dscale[t];
                    o[NA + 3] = dotv(dy + (b * S + t) * dy_ld + (long)h * P, in->x + (b * S + t) * in->x_ld + (long)h * P, P);
                }
            }
            /* 4. scale_s = lam_s DT_s + (1 - lam_{s+1}) DT_{s+1},  gamma_s = lam_s DT_s */
            for (long t = 0; t < S; t++) {
                double own = k.dgamma[t] + k.dscale[t];
                k.dlam[t] += own * w.DT[t];
                k.dDT[t] += own * w.lam[t];
                if (t > 0) {
                    k.dlam[t] -= k.dscale[t - 1] * w.DT[t];
                    k.dDT[t] += k.dscale[t - 1] * (1.0 - w.lam[t]);
                }
                k.dDT[t] += w.A[t] * k.dADT[t];
            }
            for (long t = 0; t < S; t++) {
                long tok = b * S + t;
                double ddt, dA;
                m3_dt_act(w.u_dt[t], &ddt);
                m3_a_act(w.u_A[t], &dA);
                double gdt = k.dDT[t] * ddt;
                g->dd_dt[tok * g->dd_dt_ld + h] = gdt;
                g->dt_bias[h] += gdt;
                g->dd_A[tok * g->dd_A_ld + h] = w.DT[t] * k.dADT[t] * dA;
                g->trap[tok * g->trap_ld + h] = k.dlam[t] * w.lam[t] * (1.0 - w.lam[t]);
                for (int n = 0; n < N; n++) {
                    double dk = k.dK[t * N + n], dq = k.dQ[t * N + n];
                    g->Bn[tok * g->Bn_ld + n] += dk;
                    g->Cn[tok * g->Cn_ld + n] += dq;
                    g->B_bias[(long)h * N + n] += dk;
                    g->C_bias[(long)h * N + n] += dq;
                    if (g->head) {
                        g->head[tok * g->head_ld + (long)h * (2 * N + NA) + n] = dk;
                        g->head[tok * g->head_ld + (long)h * (2 * N + NA) + N + n] = dq;
                    }
                }
            }
        }
    }
    free(acc);
    free(fixed);
    head_free(&w);
}

/* ---------------------------------------------------------------- operation counts */

/* Forward per head and chunk of L tokens: inter-chunk S Qr (2LPN), state decay + update
 * (PN + 2LPN), causal intra-chunk Qr.Kr and weights*V (L(L-1)/2 * 2(N+P)), diagonal Q.K
 * (2LN) and the D term (2LP), rotations of Q and K (12 L NA). */
static double fwd_chunk(double L, double P, double N, double NA) {
    return 4 * L * P * N + P * N + L * (L - 1) * (N + P) + 2 * L * N + 2 * L * P + 12 * L * NA;
}

/* Backward: the stored entering state is recomputed (the forward state update), then each
 * forward product yields two (or, for the P x N ones, three) products of the same size. */
static double bwd_chunk(double L, double P, double N, double NA) {
    return (2 * L * P * N + P * N)               /* recompute entering state */
           + 3 * (2 * L * P * N)                 /* inter: dcs, dQr, dS */
           + 4 * (2 * L * P * N) + 2 * P * N     /* state update: u, dv, dKr, dcs; dS decay */
           + L * (L - 1) * (2 * N + 2 * P + P)   /* intra: qk, dy.v, dQr, dKr, dv */
           + 6 * L * N + 4 * L * P               /* diagonal */
           + 24 * L * NA;                        /* rotation undo + dTheta */
}

static double count(m3_dims d, int chunk, double (*f)(double, double, double, double)) {
    if (chunk < 1) chunk = 1;
    long full = d.S / chunk, rem = d.S % chunk;
    double per = (double)full * f(chunk, d.P, d.N, d.NA) + (rem ? f((double)rem, d.P, d.N, d.NA) : 0);
    /* activations: softplus, A, sigmoid, tanh and the angle cumsum, ~20 flops per token */
    return (double)d.B * d.H * (per + 20.0 * (double)d.S);
}

double m3_flops_fwd(m3_dims d, int chunk) { return count(d, chunk, fwd_chunk); }
double m3_flops_bwd(m3_dims d, int chunk) { return count(d, chunk, bwd_chunk); }

/* ---------------------------------------------------------------- op definitions */
#ifndef M3_MATH_ONLY

/* The op interface.
 *
 *   mamba3_scan(x, Bn, Cn, dd_dt, dd_A, trap, angles, dt_bias, B_bias, C_bias, D; chunk)
 *     -> y [B,S,H,P], saved [B,S,H*W], dstate [B,S,H*Wd], theta [B,S,H*W2]
 *   saved: the chunk states (layout in mamba3_scan.h, W = m3_states_width(P, N, chunk)).
 *   dstate, theta: workspaces of the chunk-parallel kernels, which pass them from one launch
 *   to the next (so the reference fills them too, for the per-launch kernel checks); no
 *   gradient flows through them and the backward does not read them. dstate: each full
 *   chunk's state increment sum_s exp(cs_L - cs_s) scale_s v_s Kl_s^T with Kl_s the key
 *   rotated by the angle accumulated inside the chunk only, then the chunk's total decay and the
 *   cos/sin of its in-chunk angles (m3_dstate_width in mamba3_scan.h); theta: cos/sin
 *   of the cumulative angle leaving each full chunk (W2 = m3_theta_width(NA, chunk), layout
 *   in mamba3_scan.h). Rows of a partial last chunk and unused slots hold zeros.
 *
 *   mamba3_scan_bwd(x, Bn, Cn, dd_dt, dd_A, trap, angles, dt_bias, B_bias, C_bias, D, saved, dy,
 *                   theta; chunk)
 *     -> the gradients of the 11 forward inputs (in their order), then head [B,S,H*2N],
 *        head_ang [B,S,H*NA], du [B,S,H*Wd], dsl [B,S,H*W], tk [B,S,H*(NA+4)]
 *   head, head_ang: per-head shares of dBn, dCn (head) and d(angles) (head_ang), the
 *   workspaces the kernels reduce over heads in a fixed order (no floating-point atomics).
 *   du, dsl, tk: workspaces of the chunk-parallel backward (m3_grads in mamba3_scan.h); the
 *   sequential fallback kernel leaves them unwritten. theta: the forward's workspace (cos/sin
 *   of the angle leaving each chunk). */

enum { IN_X, IN_BN, IN_CN, IN_DDT, IN_DDA, IN_TRAP, IN_ANG, IN_DTB, IN_BB, IN_CB, IN_D, IN_NFWD };
/* the optional carried state of the prefill form (m3_state): inputs 12..15 */
enum { IN_S0 = IN_NFWD, IN_TH0, IN_KR0, IN_V0, IN_NINIT };
enum { BIN_ST = 11, BIN_DY = 12, BIN_TH = 13, BIN_N = 14 };
enum { BOUT_HEAD = 11, BOUT_HANG, BOUT_DU, BOUT_DSL, BOUT_TK, BOUT_N };
enum { OUT_Y, OUT_ST, OUT_DST, OUT_TH, OUT_N };

static const char *const fwd_names[IN_NINIT] = {
    "x", "Bn", "Cn", "dd_dt", "dd_A", "trap", "angles", "dt_bias", "B_bias", "C_bias", "D",
    "S0", "Theta0", "Kr0", "v0"};
static const char *const bwd_names[BIN_N] = {
    "x", "Bn", "Cn", "dd_dt", "dd_A", "trap", "angles", "dt_bias", "B_bias", "C_bias", "D", "saved", "dy", "theta"};

/* Checks one input: per-token ([B,S,...]) when tok, else a pure parameter; the trailing dims
 * must equal want[0..nw-1]. */
static int check_in(const ir_graph *g, const ir_node *n, int i, int tok, const int *want, int nw,
                    const char *what, const char *const *names, char *err, size_t errlen) {
    const ir_shape *s = op_in_shape(g, n, i);
    char buf[96];
    ir_shape_str(s, buf, sizeof buf);
    int lead = tok ? 2 : 0;
    int ok = s->ndim == lead + nw;
    if (ok && tok) ok = s->d[0] == DIM_B && s->d[1] == DIM_S;
    for (int j = 0; ok && j < nw; j++) ok = s->d[lead + j] == want[j];
    if (!ok)
        return OP_ERR("input %d (%s) must have shape %s, got %s", i + 1, names[i], what, buf);
    if (op_in_dtype(g, n, i) == DT_I32)
        return OP_ERR("input %d (%s) must be a float tensor", i + 1, names[i]);
    return 0;
}

/* Validates the inputs of either op and reads the sizes. */
static int check_all(const ir_graph *g, const ir_node *n, int bwd, int *H, int *P, int *N,
                     int *NA, char *err, size_t errlen) {
    int nin = bwd ? BIN_N : IN_NFWD;
    const char *const *names = bwd ? bwd_names : fwd_names;
    if (!bwd && n->nin == IN_NINIT) nin = IN_NINIT;
    if (n->nin != nin) {
        if (bwd) return OP_ERR("expects %d inputs, got %d", nin, n->nin);
        return OP_ERR("expects %d inputs (or %d with the initial state S0, Theta0, Kr0, v0), got %d", IN_NFWD,
                      IN_NINIT, n->nin);
    }
    const ir_shape *x = op_in_shape(g, n, IN_X), *bn = op_in_shape(g, n, IN_BN),
                   *an = op_in_shape(g, n, IN_ANG);
    if (x->ndim != 4 || x->d[0] != DIM_B || x->d[1] != DIM_S || x->d[2] <= 0 || x->d[3] <= 0) {
        char buf[96];
        ir_shape_str(x, buf, sizeof buf);
        return OP_ERR("input 1 (x) must have shape [B,S,H,P], got %s", buf);
    }
    if (bn->ndim != 3 || bn->d[2] <= 0 || an->ndim != 3 || an->d[2] <= 0) {
        char b1[96], b2[96];
        ir_shape_str(bn, b1, sizeof b1);
        ir_shape_str(an, b2, sizeof b2);
        return OP_ERR("Bn must be [B,S,N] and angles [B,S,NA], got %s and %s", b1, b2);
    }
    const ir_shape *cn = op_in_shape(g, n, IN_CN);
    if (!ir_shape_eq(bn, cn)) {
        /* N is read from Bn, so say that the two disagree rather than blame Cn alone */
        char b1[96], b2[96];
        ir_shape_str(bn, b1, sizeof b1);
        ir_shape_str(cn, b2, sizeof b2);
        return OP_ERR("Bn and Cn must have the same shape [B,S,N], got %s and %s", b1, b2);
    }
    *H = x->d[2]; *P = x->d[3]; *N = bn->d[2]; *NA = an->d[2];
    if (2 * *NA > *N)
        return OP_ERR("%d rotation angles need 2*NA <= N, but N = %d", *NA, *N);
    if (n->ia[0] < 1)
        return OP_ERR("chunk must be >= 1, got %ld", n->ia[0]);
    int hp[2] = {*H, *P}, nn[1] = {*N}, hh[1] = {*H}, na[1] = {*NA}, hn[2] = {*H, *N};
    char sh[64], sn[64], sa[64], shn[64], sh1[64], shp[64], sst[64];
    snprintf(sh, sizeof sh, "[B,S,%d]", *H);
    snprintf(sn, sizeof sn, "[B,S,%d]", *N);
    snprintf(sa, sizeof sa, "[B,S,%d]", *NA);
    snprintf(shn, sizeof shn, "[%d,%d]", *H, *N);
    snprintf(sh1, sizeof sh1, "[%d]", *H);
    snprintf(shp, sizeof shp, "[B,S,%d,%d]", *H, *P);
    int stw[1] = {(int)(*H * m3_states_width(*P, *N, (int)n->ia[0]))};
    snprintf(sst, sizeof sst, "[B,S,%d]", stw[0]);
    if (check_in(g, n, IN_BN, 1, nn, 1, sn, names, err, errlen) ||
        check_in(g, n, IN_CN, 1, nn, 1, sn, names, err, errlen) ||
        check_in(g, n, IN_DDT, 1, hh, 1, sh, names, err, errlen) ||
        check_in(g, n, IN_DDA, 1, hh, 1, sh, names, err, errlen) ||
        check_in(g, n, IN_TRAP, 1, hh, 1, sh, names, err, errlen) ||
        check_in(g, n, IN_ANG, 1, na, 1, sa, names, err, errlen) ||
        check_in(g, n, IN_DTB, 0, hh, 1, sh1, names, err, errlen) ||
        check_in(g, n, IN_BB, 0, hn, 2, shn, names, err, errlen) ||
        check_in(g, n, IN_CB, 0, hn, 2, shn, names, err, errlen) ||
        check_in(g, n, IN_X, 1, hp, 2, shp, names, err, errlen))
        return -1;
    if (check_in(g, n, IN_D, 0, hh, 1, sh1, names, err, errlen)) return -1;
    int thw[1] = {(int)(*H * m3_theta_width(*NA, (int)n->ia[0]))};
    char sth[64];
    snprintf(sth, sizeof sth, "[B,S,%d]", thw[0]);
    if (nin == IN_NINIT) {
        const int spn[3] = {*H, *P, *N}, sna[2] = {*H, *NA}, snn[2] = {*H, *N}, sp[2] = {*H, *P};
        if (op_want_input(g, n, IN_S0, 1, spn, 3, names[IN_S0], err, errlen) ||
            op_want_input(g, n, IN_TH0, 1, sna, 2, names[IN_TH0], err, errlen) ||
            op_want_input(g, n, IN_KR0, 1, snn, 2, names[IN_KR0], err, errlen) ||
            op_want_input(g, n, IN_V0, 1, sp, 2, names[IN_V0], err, errlen))
            return -1;
    }
    if (bwd && (check_in(g, n, BIN_ST, 1, stw, 1, sst, names, err, errlen) ||
                check_in(g, n, BIN_DY, 1, hp, 2, shp, names, err, errlen) ||
                check_in(g, n, BIN_TH, 1, thw, 1, sth, names, err, errlen)))
        return -1;
    return 0;
}

static ir_shape tok_shape(int f) {
    int d[3] = {DIM_B, DIM_S, f};
    return ir_shape_make(3, d);
}

static int infer_fwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err,
                     size_t errlen) {
    int H, P, N, NA;
    if (check_all(g, n, 0, &H, &P, &N, &NA, err, errlen)) return -1;
    out[0] = *op_in_shape(g, n, IN_X);
    out[OUT_ST] = tok_shape((int)(H * m3_states_width(P, N, (int)n->ia[0])));
    out[OUT_DST] = tok_shape((int)(H * m3_dstate_width(P, N, NA, (int)n->ia[0])));
    out[OUT_TH] = tok_shape((int)(H * m3_theta_width(NA, (int)n->ia[0])));
    dt[OUT_Y] = dt[OUT_ST] = dt[OUT_DST] = dt[OUT_TH] = DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err,
                     size_t errlen) {
    int H, P, N, NA;
    if (check_all(g, n, 1, &H, &P, &N, &NA, err, errlen)) return -1;
    for (int i = 0; i < IN_D; i++) out[i] = *op_in_shape(g, n, i);
    out[IN_D] = *op_in_shape(g, n, IN_DTB);     /* D: [H], like dt_bias */
    const int ch = (int)n->ia[0];
    out[BOUT_HEAD] = tok_shape(H * 2 * N);
    out[BOUT_HANG] = tok_shape(H * NA);
    out[BOUT_DU] = tok_shape((int)(H * m3_bwd_width(P, N, ch)));
    out[BOUT_DSL] = tok_shape((int)(H * m3_states_width(P, N, ch)));
    out[BOUT_TK] = tok_shape(H * (NA + 4));
    for (int i = 0; i < BOUT_N; i++) dt[i] = DT_F32;
    return 0;
}

/* Only y carries a gradient: the saved states only feed the backward, dstate and theta are
 * the forward kernels' workspaces. */
static int grad_fwd(ir_graph *g, int node, const int *dout, int *din) {
    for (int i = 0; i < g->n[node].nin; i++) din[i] = -1;
    if (dout[0] < 0) return 0;
    if (g->n[node].nin != IN_NFWD) {
        /* the backward (m3_ref_backward and its kernels) is for a zero initial state */
        snprintf(g->err, sizeof g->err, "mamba3_scan: no gradient through a scan with an initial state (prefill only)");
        return -1;
    }
    /* Copy what we need: ir_emit may grow g->n and move the node. */
    const ir_node *n = &g->n[node];
    int ins[BIN_N];
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    for (int i = 0; i < BIN_ST; i++) ins[i] = n->in[i];
    ins[BIN_ST] = n->out[OUT_ST];
    ins[BIN_DY] = dout[0];
    ins[BIN_TH] = n->out[OUT_TH];
    memcpy(ia, n->ia, sizeof ia);
    memcpy(fa, n->fa, sizeof fa);
    int outs[IR_MAX_IO];
    if (ir_emit(g, "mamba3_scan_bwd", ins, BIN_N, ia, fa, outs) < 0) return -1;
    for (int i = 0; i < IN_NFWD; i++) din[i] = outs[i];
    return 0;
}

/* Reads the inputs common to both ops. */
static void collect(const ref_ctx *c, const ir_node *n, m3_dims *d, m3_inputs *in, const double *D) {
    ref_buf b[IN_D];
    for (int i = 0; i < IN_D; i++) b[i] = ref_get(c, n->in[i]);
    d->B = ref_B(c);
    d->S = ref_S(c);
    const ir_shape *x = ref_shape(c, n->in[IN_X]);
    d->H = x->d[2];
    d->P = x->d[3];
    d->N = (int)b[IN_BN].feat;
    d->NA = (int)b[IN_ANG].feat;
    *in = (m3_inputs){
        .x = b[IN_X].p, .x_ld = b[IN_X].ld,
        .Bn = b[IN_BN].p, .Bn_ld = b[IN_BN].ld,
        .Cn = b[IN_CN].p, .Cn_ld = b[IN_CN].ld,
        .dd_dt = b[IN_DDT].p, .dd_dt_ld = b[IN_DDT].ld,
        .dd_A = b[IN_DDA].p, .dd_A_ld = b[IN_DDA].ld,
        .trap = b[IN_TRAP].p, .trap_ld = b[IN_TRAP].ld,
        .angles = b[IN_ANG].p, .angles_ld = b[IN_ANG].ld,
        .dt_bias = b[IN_DTB].p, .B_bias = b[IN_BB].p, .C_bias = b[IN_CB].p, .D = D};
}

/* The chunk-parallel kernels' workspaces (layout: the op interface above), in fp64 from the
 * same per-head quantities as m3_ref_chunked: dstate with the in-chunk angle Th_s - Th_in,
 * theta as cos/sin of the wrapped cumulative angle at each full chunk's last token. */
static void ref_workspaces(const m3_dims *d, int chunk, const m3_inputs *in, const double *Theta0, double *ds,
                           long ds_ld, double *th, long th_ld) {
    const int H = d->H, P = d->P, N = d->N, NA = d->NA;
    const long S = d->S, W = m3_dstate_width(P, N, NA, chunk), W2 = m3_theta_width(NA, chunk);
    const long PN = (long)P * N;
    m3_head w;
    head_alloc(&w, S, P, N, NA);
    double *inc = xcalloc((size_t)PN + (size_t)chunk + 2 * (size_t)N + (size_t)NA, sizeof(double));
    double *cs = inc + PN, *kl = cs + chunk, *ph = kl + N;
    for (long b = 0; b < d->B; b++) {
        for (int h = 0; h < H; h++) {
            const double *th0 = Theta0 ? Theta0 + (b * H + h) * NA : NULL;
            head_prep(&w, d, in, b, h, th0);
            for (long c0 = 0; c0 < S; c0 += chunk) {
                long L = S - c0 < chunk ? S - c0 : chunk;
                int full = L == chunk;
                memset(inc, 0, sizeof(double) * (size_t)PN);
                double acc = 0;
                for (long a = 0; a < L; a++) cs[a] = (acc += w.ADT[c0 + a]);
                for (long a = 0; full && a < L; a++) {
                    long s = c0 + a;
                    for (int i = 0; i < NA; i++)
                        ph[i] = w.Th[s * NA + i] - (c0 ? w.Th[(c0 - 1) * NA + i] : th0 ? th0[i] : 0.0);
                    rot(w.K + s * N, ph, N, NA, kl);
                    double cf = exp(fmin(cs[L - 1] - cs[a], 0.0)) * w.scale[s];
                    const double *vs = in->x + (b * S + s) * in->x_ld + (long)h * P;
                    for (int p = 0; p < P; p++)
                        for (int nn = 0; nn < N; nn++) inc[p * N + nn] += cf * vs[p] * kl[nn];
                }
                for (long e = 0; e < L * W; e++) {
                    double v = 0.0;
                    if (full && e < PN) v = inc[e];
                    else if (full && e == PN) v = exp(fmin(cs[L - 1], 0.0));
                    else if (full && e <= PN + 2L * NA) {
                        const long i = (e - PN - 1) / 2, s = c0 + L - 1;
                        const double a = w.Th[s * NA + i] - (c0 ? w.Th[(c0 - 1) * NA + i] : th0 ? th0[i] : 0.0);
                        v = (e - PN - 1) % 2 ? sin(a) : cos(a);
                    }
                    ds[(b * S + c0 + e / W) * ds_ld + (long)h * W + e % W] = v;
                }
                for (long e = 0; e < L * W2; e++) {
                    double v = 0.0;
                    if (full && e < 2L * NA) {
                        double a = w.Th[(c0 + L - 1) * NA + e / 2];
                        v = e % 2 ? sin(a) : cos(a);
                    }
                    th[(b * S + c0 + e / W2) * th_ld + (long)h * W2 + e % W2] = v;
                }
            }
        }
    }
    free(inc);
    head_free(&w);
}

static void ref_fwd(const ref_ctx *c, const ir_node *n) {
    m3_dims d;
    m3_inputs in;
    collect(c, n, &d, &in, ref_get(c, n->in[IN_D]).p);
    ref_buf y = ref_get(c, n->out[OUT_Y]), st = ref_get(c, n->out[OUT_ST]);
    /* the carried state tensors are dense [B, ...] owners (g:state), m3_state's layout */
    const m3_state init = n->nin == IN_NINIT
                              ? (m3_state){ref_get(c, n->in[IN_S0]).p, ref_get(c, n->in[IN_TH0]).p,
                                           ref_get(c, n->in[IN_KR0]).p, ref_get(c, n->in[IN_V0]).p}
                              : (m3_state){NULL, NULL, NULL, NULL};
    const m3_state *ip = n->nin == IN_NINIT ? &init : NULL;
    m3_ref_chunked(d, (int)n->ia[0], &in, ip, y.p, y.ld, NULL, st.p, st.ld);
    ref_buf ds = ref_get(c, n->out[OUT_DST]), th = ref_get(c, n->out[OUT_TH]);
    ref_workspaces(&d, (int)n->ia[0], &in, ip ? init.Theta : NULL, ds.p, ds.ld, th.p, th.ld);
}

static void ref_bwd(const ref_ctx *c, const ir_node *n) {
    m3_dims d;
    m3_inputs in;
    ref_buf st = ref_get(c, n->in[BIN_ST]);
    collect(c, n, &d, &in, ref_get(c, n->in[IN_D]).p);
    ref_buf dy = ref_get(c, n->in[BIN_DY]);
    ref_buf o[BOUT_N];
    for (int i = 0; i < BOUT_N; i++) o[i] = ref_get(c, n->out[i]);
    m3_grads gr = {
        .x = o[IN_X].p, .x_ld = o[IN_X].ld,
        .Bn = o[IN_BN].p, .Bn_ld = o[IN_BN].ld,
        .Cn = o[IN_CN].p, .Cn_ld = o[IN_CN].ld,
        .dd_dt = o[IN_DDT].p, .dd_dt_ld = o[IN_DDT].ld,
        .dd_A = o[IN_DDA].p, .dd_A_ld = o[IN_DDA].ld,
        .trap = o[IN_TRAP].p, .trap_ld = o[IN_TRAP].ld,
        .angles = o[IN_ANG].p, .angles_ld = o[IN_ANG].ld,
        .dt_bias = o[IN_DTB].p, .B_bias = o[IN_BB].p, .C_bias = o[IN_CB].p, .D = o[IN_D].p,
        .du = o[BOUT_DU].p, .du_ld = o[BOUT_DU].ld,
        .dsl = o[BOUT_DSL].p, .dsl_ld = o[BOUT_DSL].ld,
        .tk = o[BOUT_TK].p, .tk_ld = o[BOUT_TK].ld};
    /* the math API keeps each head's three shares side by side; the op splits them */
    const long W2 = 2L * d.N + d.NA, ntok = d.B * d.S;
    double *head = xcalloc((size_t)(ntok * d.H * W2), sizeof(double));
    gr.head = head;
    gr.head_ld = d.H * W2;
    m3_ref_backward(d, (int)n->ia[0], &in, st.p, st.ld, dy.p, dy.ld, &gr);
    for (long tok = 0; tok < ntok; tok++)
        for (int h = 0; h < d.H; h++) {
            const double *src = head + tok * d.H * W2 + h * W2;
            for (int f = 0; f < 2 * d.N; f++) o[BOUT_HEAD].p[tok * o[BOUT_HEAD].ld + (long)h * 2 * d.N + f] = src[f];
            for (int i = 0; i < d.NA; i++) o[BOUT_HANG].p[tok * o[BOUT_HANG].ld + (long)h * d.NA + i] = src[2 * d.N + i];
        }
    free(head);
}

static m3_dims dims_of(const ir_graph *g, const ir_node *n, long B, long S) {
    const ir_tensor *x = &g->t[n->in[IN_X]], *bn = &g->t[n->in[IN_BN]], *an = &g->t[n->in[IN_ANG]];
    return (m3_dims){B, S, x->shape.d[2], x->shape.d[3], bn->shape.d[2], an->shape.d[2]};
}

static double flops_fwd(const ir_graph *g, const ir_node *n, long B, long S) {
    return m3_flops_fwd(dims_of(g, n, B, S), (int)n->ia[0]);
}

static double flops_bwd(const ir_graph *g, const ir_node *n, long B, long S) {
    return m3_flops_bwd(dims_of(g, n, B, S), (int)n->ia[0]);
}

/* ---------------------------------------------------------------- kernel templates
 *
 * fp32 throughout, fp32 state. Simple designs (the tensor-core chunked kernels come later):
 *  forward: one work-group per (b, h), each work-item owning rows p of the state in private
 *    memory; tokens in order; per token the work-items build Kr_t, Qr_t (rotated, biased) in
 *    local memory (Kr triple-, Qr double-buffered so one barrier per token suffices) while
 *    the owner of angle pair i carries Theta_i (fp32, wrapped to [0, 2pi)).
 *  backward: the chunk-parallel kernels described above emit_bwd_chunked wherever the forward
 *    ran its chunked kernels and the tiles fit; otherwise (1) one work-group per (b, h): a
 *    Theta pre-pass, then the chunks in reverse carrying dS (P x N, local) and following the
 *    reference's chunked maths, one work-item per token of the chunk. Then, either way,
 *    (2) the per-head shares of dBn, dCn, d(angles) summed over heads in order h = 0..H-1.
 *    (3) dt_bias, B_bias, C_bias, D: one work-group per (h, parameter), a fixed strided
 *    partial sum over the B*S tokens and a fixed tree. No atomics anywhere. */

#include "kgen.h"

#define KL(...) kg_line(k, __VA_ARGS__)
#define M3_PI_F "3.14159265f"

typedef struct {
    int H, P, N, NA, CH;
    long W;          /* state columns per head in `saved` */
} m3_kdims;

static m3_kdims kdims(const kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    const ir_shape *x = &g->t[n->in[IN_X]].shape;
    m3_kdims d = {x->d[2], x->d[3], (int)ir_feat(&g->t[n->in[IN_BN]].shape),
                  (int)ir_feat(&g->t[n->in[IN_ANG]].shape), (int)n->ia[0], 0};
    d.W = m3_states_width(d.P, d.N, d.CH);
    return d;
}

/* Per-token activations of head h at token row `tok` (a C expression), as const floats named
 * with prefix v: u, DT, sg (softplus'), Av, dA (A'), lam. Only the taken branch of each
 * piecewise activation is evaluated. */
static void emit_acts(kgen *k, const char *v, const char *tok, long lddt, long ldda, long ldtr) {
    KL("const float %su = ddt[(%s) * %ldL + h] + dtbh;", v, tok, lddt);
    KL("const float %sDT = %su > 20.0f ? %su : LOG1PF(EXPF(%su));", v, v, v, v);
    KL("const float %ssg = %su > 20.0f ? 1.0f : (%su >= 0.0f ? 1.0f / (1.0f + EXPF(-%su)) : "
       "EXPF(%su) / (1.0f + EXPF(%su)));", v, v, v, v, v, v);
    KL("const float %sua = ddA[(%s) * %ldL + h];", v, tok, ldda);
    KL("float %sfA, %sdfA;", v, v);
    KL("if (%sua >= 0.0f) { %sfA = 1.0f + %sua; %sdfA = 1.0f; } else { %sfA = 1.0f / (1.0f - %sua); "
       "%sdfA = %sfA * %sfA; }", v, v, v, v, v, v, v, v, v);
    KL("const float %sAv = %sfA < 1e-4f ? -1e-4f : -%sfA;", v, v, v);
    KL("const float %sdA = %sfA < 1e-4f ? 0.0f : -%sdfA;", v, v, v);
    KL("const float %str = trap[(%s) * %ldL + h];", v, tok, ldtr);
    KL("const float %slam = %str >= 0.0f ? 1.0f / (1.0f + EXPF(-%str)) : EXPF(%str) / (1.0f + "
       "EXPF(%str));", v, v, v, v, v);
    KL("(void)%ssg; (void)%sdA; (void)%sAv;", v, v, v);
}

/* Tq wrapped to [0, 2pi) */
static void emit_wrap(kgen *k, const char *Tq) {
    /* 2pi = 6.28318548f - 1.74845553e-7f (Cody-Waite): subtracting k * float(2pi) alone would
     * drift by k * 1.7e-7 per step when DT * theta is large */
    KL("{ const float kq = (float)(long)(%s * 0.159154943f); %s = (%s - kq * 6.28318548f) + kq * 1.74845553e-7f; }",
       Tq, Tq, Tq);
    KL("if (%s < 0.0f) %s = (%s + 6.28318548f) - 1.74845553e-7f;", Tq, Tq, Tq);
}

/* Tq += DT * pi * tanh(angle), wrapped to [0, 2pi) */
static void emit_theta_step(kgen *k, const char *Tq, const char *DT, const char *angle) {
    KL("%s += %s * (" M3_PI_F " * TANHF(%s));", Tq, DT, angle);
    emit_wrap(k, Tq);
}

/* The tile loaders (and a few loops like them) read global memory in batches: each work-item issues the loads of
 * up to 8 of its items into registers, then converts and stores them. Written as one loop the
 * compiler keeps only a few loads in flight, because a generic pointer may alias the shared
 * tile being stored; with 4 warps per work-group those loops waited on memory for over a third
 * of the backward's main kernel. */
static int m3_batch(long total, int NT) {
    const long r = (total + NT - 1) / NT;
    return r < 8 ? (int)r : 8;
}

/* opens the batch loop over `total` items; the caller then emits its two inner loops over
 * u < U with it = it0 + u * NT (see m3_batch_item), and closes with "}" */
static void m3_batch_open(kgen *k, long total, int NT, int U) {
    /* one batch unrolled, not the whole loop: these kernels are long straight-line code and
     * already miss the instruction cache */
    KL("#pragma unroll 1");
    KL("for (int it0 = lid; it0 < %ld; it0 += %ld) {", total, (long)NT * U);
}

static void m3_batch_item(kgen *k, long total, int NT, int U) {
    KL("#pragma unroll");
    KL("for (int u = 0; u < %d; u++) {", U);
    KL("const int it = it0 + u * %d;", NT);
    if (total % ((long)NT * U)) KL("if (it >= %ld) break;", total);
}

/* A row tile of `rows` rows by NW words: each work-item keeps one word column w and takes rows
 * a0, a0 + RS, ... in batches of U, so an item's only index work is its row (the generic loop
 * above spends more instructions on indices than on loads; these kernels are long enough to
 * miss the instruction cache). Opens a block with w, n0 = 2w, a0 in scope and the batch loop;
 * the caller emits its two m3_rows_item loops and closes with three "}". */
static void m3_rows_open(kgen *k, long rows, int NW, int NT, int *RS, int *U) {
    if (NT % NW == 0 && rows % (NT / NW) == 0) {
        *RS = NT / NW;
        const long R = rows / *RS;
        *U = R < 8 ? (int)R : 8;
        while (R % *U) (*U)--;
        KL("{");
        KL("const int w = lid %% %d, n0 = 2 * w, a0 = lid / %d;", NW, NW);
        KL("#pragma unroll 1");
        KL("for (int r0 = 0; r0 < %ld; r0 += %d) {", R, *U);
    } else {   /* one row per pass when the work-group's width is not a multiple of the tile's */
        *RS = 0;
        *U = 1;
        KL("{");
        KL("#pragma unroll 1");
        KL("for (int it = lid; it < %ld; it += %d) {", rows * NW, NT);
        KL("const int a0 = it / %d, w = it - a0 * %d, n0 = 2 * w, r0 = 0;", NW, NW);
    }
}

static void m3_rows_item(kgen *k, int RS, int U) {
    KL("#pragma unroll");
    KL("for (int u = 0; u < %d; u++) {", U);
    KL("const int a = a0 + (r0 + u) * %d;", RS);
}

/* LPH[a][i] = the angle accumulated inside the chunk up to token a, wrapped to [0, 2pi): an
 * inclusive scan (Hillis-Steele, log2(CH) steps of wrapped pairwise sums) instead of one
 * work-item per angle walking the chunk, which left the rest of the work-group waiting at the
 * next barrier; each entry also collects fewer roundings (log2(CH) instead of up to CH).
 * Expects ldt (the tokens' DT, zero past L) in local memory and a barrier passed since; every
 * work-item must reach this call. `angle` names ang[token a, angle i] with a, i in scope. */
static void emit_chunk_angles(kgen *k, int NT, int CH, int NA, const char *angle) {
    if (NT % NA == 0 && (CH + NT / NA - 1) / (NT / NA) <= 16) {
        /* NT / NA work-items per angle, each a run of RPT consecutive tokens: the run's own
         * prefix in registers, then the totals of the runs before it from shared memory. One
         * barrier rather than two a step (Hillis-Steele below: 4.3% of the bwd main kernel's
         * samples, Nsight Compute, H100). With the cs prefix by shuffles, H100, realm-9m 8 x
         * 8192: out_tc 3.64 -> 3.32 ms a step, chunk_tc 2.91 -> 2.67, bwd_chunk_tc 2.70 ->
         * 2.45, bwd_main_tc 16.75 -> 16.13 */
        const int TPA = NT / NA, RPT = (CH + TPA - 1) / TPA;
        KL("LOCAL float lrun[%d];", NT);
        KL("{");
        KL("const int i = lid %% %d, run = lid / %d;", NA, NA);
        KL("float v[%d];", RPT);
        KL("#pragma unroll");
        KL("for (int r = 0; r < %d; r++) {", RPT);
        KL("const int a = run * %d + r;", RPT);
        KL("v[r] = a < L ? %s : 0.0f;", angle);
        KL("}");
        KL("#pragma unroll");
        KL("for (int r = 0; r < %d; r++) {", RPT);
        KL("const int a = run * %d + r;", RPT);
        KL("float x = 0.0f;");
        KL("if (a < L) {");
        KL("x = ldt[a] * (" M3_PI_F " * TANHF(v[r]));");
        emit_wrap(k, "x");
        KL("}");
        KL("if (r > 0) { x += v[r - 1];");
        emit_wrap(k, "x");
        KL("}");
        KL("v[r] = x;");
        KL("}");
        KL("lrun[lid] = v[%d];", RPT - 1);
        KL("BARRIER();");
        KL("float pre = 0.0f;");
        KL("for (int q = 0; q < run; q++) { pre += lrun[q * %d + i];", NA);
        emit_wrap(k, "pre");
        KL("}");
        KL("#pragma unroll");
        KL("for (int r = 0; r < %d; r++) {", RPT);
        KL("const int a = run * %d + r;", RPT);
        KL("float x = v[r];");
        KL("if (run > 0) { x += pre;");
        emit_wrap(k, "x");
        KL("}");
        if (RPT * TPA > CH) KL("if (a < %d) LPH[a * %d + i] = x;", CH, NA);
        else KL("LPH[a * %d + i] = x;", NA);
        KL("}");
        KL("}");
        return;
    }
    const int R = (CH * NA + NT - 1) / NT;
    {
        /* the angle inputs in batches ahead of their use (see m3_batch) */
        const long total = (long)CH * NA;
        const int U = m3_batch(total, NT);
        m3_batch_open(k, total, NT, U);
        KL("float ab[%d];", U);
        m3_batch_item(k, total, NT, U);
        KL("const int j = it, a = j / %d, i = j - a * %d;", NA, NA);
        KL("ab[u] = a < L ? %s : 0.0f;", angle);
        KL("}");
        m3_batch_item(k, total, NT, U);
        KL("const int j = it, a = j / %d;", NA);
        KL("float v = 0.0f;");
        KL("if (a < L) {");
        KL("v = ldt[a] * (" M3_PI_F " * TANHF(ab[u]));");
        emit_wrap(k, "v");
        KL("}");
        KL("LPH[j] = v;");
        KL("}");
        KL("}");
    }
    KL("for (int off = 1; off < %d; off <<= 1) {", CH);
    KL("float nv[%d];", R);
    KL("BARRIER();");
    KL("for (int r = 0; r < %d; r++) {", R);
    KL("const int j = lid + r * %d;", NT);
    KL("float v = 0.0f;");
    KL("if (j < %d) {", CH * NA);
    KL("v = LPH[j];");
    KL("if (j >= off * %d) { v += LPH[j - off * %d];", NA, NA);
    emit_wrap(k, "v");
    KL("}");
    KL("}");
    KL("nv[r] = v;");
    KL("}");
    KL("BARRIER();");
    KL("for (int r = 0; r < %d; r++) { const int j = lid + r * %d; if (j < %d) LPH[j] = nv[r]; }", R, NT, CH * NA);
    KL("}");
}

static void args_common(kgen *k, const ir_node *n) {
    kg_in(k, "x", n->in[IN_X]);
    kg_in(k, "Bn", n->in[IN_BN]);
    kg_in(k, "Cn", n->in[IN_CN]);
    kg_in(k, "ddt", n->in[IN_DDT]);
    kg_in(k, "ddA", n->in[IN_DDA]);
    kg_in(k, "trap", n->in[IN_TRAP]);
    kg_in(k, "ang", n->in[IN_ANG]);
    kg_in(k, "dtb", n->in[IN_DTB]);
    kg_in(k, "Bb", n->in[IN_BB]);
    kg_in(k, "Cb", n->in[IN_CB]);
}

/* The carried state of the prefill form (inputs IN_S0..IN_V0), only when the node has it, so
 * the training graph's kernels keep their parameter lists. */
static void args_init(kgen *k, const ir_node *n) {
    kg_in(k, "Si", n->in[IN_S0]);
    kg_in(k, "Thi", n->in[IN_TH0]);
    kg_in(k, "Kri", n->in[IN_KR0]);
    kg_in(k, "vi", n->in[IN_V0]);
}

/* One token of the recurrence for the work-group of head h (both the serial forward kernel
 * and the decode step render it): rotate this token's K and Q into sK/sQ slots kc/qc while the
 * owners of the angle pairs advance Theta in sTh, then each work-item updates its state rows
 * Srow (S = aa S + bb v_prev Kr_prev^T + gg v Kr^T) and writes y = S Qr + D v. Expects, in
 * scope: lid, tok, h, kc, kp, qc, DT, aa, bb, gg, Dh and the sK, sQ, sTh, Srow, vprev arrays. */
void m3_emit_token_update(kgen *k, int N, int NA, int P, int PB, int RP, long ldang, long ldb, long ldc, long ldx,
                          long ldy) {
    KL("for (int j = lid; j < %d; j += %d) {", N - NA, PB);
    KL("if (j < %d) {", NA);
    KL("float Tq = sTh[j];");
    char angx[96];
    snprintf(angx, sizeof angx, "ang[tok * %ldL + j]", ldang);
    emit_theta_step(k, "Tq", "DT", angx);
    KL("sTh[j] = Tq;");
    KL("const float cq = COSF(Tq), sq = SINF(Tq);");
    KL("const float k0 = Bn[tok * %ldL + 2 * j] + Bb[h * %d + 2 * j], k1 = Bn[tok * %ldL + 2 * j + 1] + Bb[h * %d + 2 * j + 1];",
       ldb, N, ldb, N);
    KL("const float q0 = Cn[tok * %ldL + 2 * j] + Cb[h * %d + 2 * j], q1 = Cn[tok * %ldL + 2 * j + 1] + Cb[h * %d + 2 * j + 1];",
       ldc, N, ldc, N);
    KL("sK[kc * %d + 2 * j] = k0 * cq - k1 * sq; sK[kc * %d + 2 * j + 1] = k0 * sq + k1 * cq;", N, N);
    KL("sQ[qc * %d + 2 * j] = q0 * cq - q1 * sq; sQ[qc * %d + 2 * j + 1] = q0 * sq + q1 * cq;", N, N);
    KL("} else {");
    KL("const int nn = %d + j;", NA);
    KL("sK[kc * %d + nn] = Bn[tok * %ldL + nn] + Bb[h * %d + nn];", N, ldb, N);
    KL("sQ[qc * %d + nn] = Cn[tok * %ldL + nn] + Cb[h * %d + nn];", N, ldc, N);
    KL("}");
    KL("}");
    KL("BARRIER();");
    KL("for (int r = 0; r < %d; r++) {", RP);
    KL("const int p = lid + r * %d;", PB);
    KL("if (p < %d) {", P);
    KL("const float v = x[tok * %ldL + h * %d + p];", ldx, P);
    KL("const float bv = bb * vprev[r], gv = gg * v;");
    KL("float acc = 0.0f;");
    KL("for (int nn = 0; nn < %d; nn++) {", N);
    KL("const float sv = aa * Srow[r * %d + nn] + bv * sK[kp * %d + nn] + gv * sK[kc * %d + nn];", N, N, N);
    KL("Srow[r * %d + nn] = sv;", N);
    KL("acc += sv * sQ[qc * %d + nn];", N);
    KL("}");
    KL("y[tok * %ldL + h * %d + p] = acc + Dh * v;", ldy, P);
    KL("vprev[r] = v;");
    KL("}");
    KL("}");
}

static int emit_fwd_seq(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    int node = (int)(n - g->n);
    m3_kdims d = kdims(k, n);
    const int H = d.H, P = d.P, N = d.N, NA = d.NA, CH = d.CH;
    const long W = d.W, PN = (long)P * N;
    const int PB = P < 256 ? P : 256, RP = (P + PB - 1) / PB;
    const long ldx = kg_ld(k, n->in[IN_X]), ldb = kg_ld(k, n->in[IN_BN]), ldc = kg_ld(k, n->in[IN_CN]),
               ldang = kg_ld(k, n->in[IN_ANG]), ldy = kg_ld(k, n->out[0]), ldst = kg_ld(k, n->out[1]);
    const int init = n->nin == IN_NINIT;
    kg_begin(k, "mamba3_scan", node, node + 1);
    args_common(k, n);
    kg_in(k, "Dp", n->in[IN_D]);
    if (init) args_init(k, n);
    kg_out(k, "y", n->out[0]);
    kg_out(k, "st", n->out[1]);
    KL("const long b = GID_X / %d;", H);
    KL("const int h = (int)(GID_X - b * %d);", H);
    KL("const int lid = LID_X;");
    KL("LOCAL float sK[%d];", 3 * N);
    KL("LOCAL float sQ[%d];", 2 * N);
    KL("LOCAL float sTh[%d];", NA);
    KL("float Srow[%d];", RP * N);
    KL("float vprev[%d];", RP);
    if (init) {
        /* the carried state, as the decode step loads it (dense [B, ...] rows, row b*H + h) */
        KL("const long bh = b * %d + h;", H);
        KL("for (int r = 0; r < %d; r++) {", RP);
        KL("const int p = lid + r * %d;", PB);
        KL("vprev[r] = p < %d ? vi[bh * %d + p] : 0.0f;", P, P);
        KL("for (int nn = 0; nn < %d; nn++) Srow[r * %d + nn] = p < %d ? Si[bh * %ldL + (long)p * %d + nn] : 0.0f;",
           N, N, P, PN, N);
        KL("}");
        KL("for (int j = lid; j < %d; j += %d) sTh[j] = Thi[bh * %d + j];", NA, PB, NA);
        KL("for (int j = lid; j < %d; j += %d) sK[%d + j] = Kri[bh * %d + j];   /* Kr of token -1 */", N, PB, 2 * N, N);
    } else {
        KL("for (int i = 0; i < %d; i++) Srow[i] = 0.0f;", RP * N);
        KL("for (int r = 0; r < %d; r++) vprev[r] = 0.0f;", RP);
        KL("for (int j = lid; j < %d; j += %d) sTh[j] = 0.0f;", NA, PB);
        KL("for (int j = lid; j < %d; j += %d) sK[%d + j] = 0.0f;   /* Kr of token -1 */", N, PB, 2 * N);
    }
    KL("const float dtbh = dtb[h], Dh = Dp[h];");
    KL("BARRIER();");
    KL("for (long s = 0; s < S; s++) {");
    KL("const long tok = b * S + s;");
    KL("const int kc = (int)(s %% 3), kp = (int)((s + 2) %% 3), qc = (int)(s %% 2);");
    emit_acts(k, "", "tok", kg_ld(k, n->in[IN_DDT]), kg_ld(k, n->in[IN_DDA]), kg_ld(k, n->in[IN_TRAP]));
    KL("const float aa = EXPF(Av * DT), bb = (1.0f - lam) * DT * aa, gg = lam * DT;");
    /* Kr_t, Qr_t: item j < NA is rotation pair j (its owner carries Theta_j), the rest copy the
     * unrotated tail dims */
    m3_emit_token_update(k, N, NA, P, PB, RP, ldang, ldb, ldc, ldx, ldy);
    /* chunk boundary: the state leaving a full chunk, spread over the chunk's own rows */
    KL("if ((s + 1) %% %d == 0) {", CH);
    KL("const long rb = tok + 1 - %d;", CH);
    /* the chunked form's state: the next token's b-term is folded into this token */
    emit_acts(k, "n", "s + 1 < S ? tok + 1 : tok", kg_ld(k, n->in[IN_DDT]), kg_ld(k, n->in[IN_DDA]),
              kg_ld(k, n->in[IN_TRAP]));
    KL("const float nb = s + 1 < S ? (1.0f - nlam) * nDT : 0.0f;");
    KL("for (int r = 0; r < %d; r++) {", RP);
    KL("const int p = lid + r * %d;", PB);
    KL("if (p < %d) for (int nn = 0; nn < %d; nn++) {", P, N);
    KL("const long e = (long)p * %d + nn;", N);
    KL("st[(rb + e / %ldL) * %ldL + h * %ldL + e %% %ldL] = Srow[r * %d + nn] + nb * vprev[r] * sK[kc * %d + nn];",
       W, ldst, W, W, N, N);
    KL("}");
    KL("}");
    KL("for (long e = %ldL + lid; e < %ldL; e += %d) st[(rb + e / %ldL) * %ldL + h * %ldL + e %% %ldL] = 0.0f;",
       PN, (long)CH * W, PB, W, ldst, W, W);
    KL("}");
    KL("}");
    /* rows of a partial last chunk hold zeros */
    KL("const long cl = (S / %d) * %d;", CH, CH);
    KL("for (long i = lid; i < (S - cl) * %ldL; i += %d) st[(b * S + cl + i / %ldL) * %ldL + h * %ldL + i %% %ldL] = 0.0f;",
       W, PB, W, ldst, W, W);
    kg_grid(k, 0, 0, H, 0, 0, 1);
    kg_block(k, PB, 1, 1);
    return kg_end(k);
}

/* Chunk-parallel forward. The sequential kernel above has only B*H work-groups walking all S
 * tokens, far too few for a large GPU; here only a short walk over chunks stays sequential.
 * kernelcheck runs and checks every launch on its own (inputs from the reference, outputs
 * poisoned), so whatever one launch hands the next is a node output that the reference
 * fills with the same values (ref_fwd): `dstate` and `theta` below.
 *  (1) mamba3_scan_chunk, one work-group per (chunk, b, h): the chunk's state increment in its
 *      local frame, dstate_c = sum_s exp(cs_L - cs_s) scale_s v_s Kl_s^T, where Kl_s is K_s
 *      rotated by phi_s, the angle accumulated inside the chunk only (up to and including s).
 *  (2) mamba3_scan_walk, one work-group per (b, h): the walk over chunks. The absolute key is
 *      Kr_s = R(Theta_in + phi_s) K_s = R(Theta_in) Kl_s per angle pair (rotations of a pair
 *      compose), and every row p of dstate is a combination of the Kl_s, so the increment in
 *      the absolute frame is each row's pair (x0, x1) rotated by Theta_in, the angle entering
 *      the chunk: S_c = exp(cs_L) S_{c-1} + R(Theta_in) dstate_c -> `saved`; the cos/sin of
 *      the angle leaving each chunk -> `theta`. Per-chunk decays and angle sums are computed
 *      for a tile of chunks in parallel first, so only chunk-long chains are serial.
 *  (3) mamba3_scan_out, one work-group per (chunk, b, h): y_t = exp(cs_t) S_in.Qr_t + sum_{s<=t}
 *      M_ts v_s, M_ts = Ql_t.Kl_s exp(cs_t - cs_s) scale_s (s < t), gamma_t Ql_t.Kl_t + D
 *      (s = t). The intra-chunk products are rotation invariant, so they use the local frame;
 *      the inter term uses S_in.R(Theta_in) Ql_t = (R(Theta_in)^T S_in).Ql_t, each work-item
 *      rotating its own state row once.
 * Deterministic: every sum has a fixed order, no atomics. Needs P <= 256 and the local tiles to
 * fit; otherwise emit_fwd falls back to the sequential kernel (which leaves the two
 * workspaces unwritten: nothing reads them). */
/* the element address of slot e (of a per-chunk vector of width w per head) in a token-major
 * array spread over a chunk's rows starting at row `rb` (the layout of `saved`) */
static void kl_spread(char *buf, size_t len, const char *rb, const char *e, long w, long ld) {
    snprintf(buf, len, "((%s) + (%s) / %ldL) * %ldL + h * %ldL + (%s) %% %ldL", rb, e, w, ld, w, e, w);
}

/* The chunk kernels' per-token scalars in local memory: DT (ldt), A DT (ladt), the trapezoid
 * weights scale (lsc) and gamma (lgm), the prefix cs (lcs), zeros past L, then the in-chunk
 * angles LPH. Expects c0, rb, L, h, lid and dtbh in scope. */
static void emit_chunk_scalars(kgen *k, int NT, int CH, int NA, long lddt, long ldda, long ldtr, long ldang) {
    char angx[96];
    snprintf(angx, sizeof angx, "ang[(rb + a) * %ldL + i]", ldang);
    KL("for (int a = lid; a < %d; a += %d) {", CH, NT);
    KL("if (a < L) {");
    KL("const long tk = rb + a;");
    KL("const int hasn = c0 + a + 1 < S;");
    KL("const long tkn = hasn ? tk + 1 : tk;");
    emit_acts(k, "", "tk", lddt, ldda, ldtr);
    emit_acts(k, "n", "tkn", lddt, ldda, ldtr);
    KL("ldt[a] = DT; ladt[a] = Av * DT; lgm[a] = lam * DT;");
    KL("lsc[a] = lam * DT + (hasn ? (1.0f - nlam) * nDT : 0.0f);");
    KL("} else { ldt[a] = 0.0f; ladt[a] = 0.0f; lgm[a] = 0.0f; lsc[a] = 0.0f; }");
    KL("}");
    KL("BARRIER();");
    /* the prefix cs, computed here by every chunk kernel, so all of them see the same values */
    if (strcmp(k->d->name, "cuda") == 0 && NT >= (CH + 31) / 32 * 32) {
        /* by warp shuffles (a step per power of two) plus the earlier warps' total: the serial
         * sum per token left the last token's work-item walking the chunk while the others
         * waited at the next barrier */
        KL("if (lid < %d) {", (CH + 31) / 32 * 32);
        KL("const int ln = lid & 31, wq = lid >> 5;");
        KL("float c = lid < %d ? ladt[lid] : 0.0f, e = 0.0f;", CH);
        KL("for (int q = 0; q < wq; q++) e += ladt[q * 32 + ln];");
        KL("for (int off = 16; off > 0; off >>= 1) e += __shfl_xor_sync(0xffffffffu, e, off);");
        KL("for (int off = 1; off < 32; off <<= 1) { const float o = __shfl_up_sync(0xffffffffu, c, off); if (ln >= off) c += o; }");
        KL("if (lid < %d) lcs[lid] = c + e;", CH);
        KL("}");
    } else
        KL("for (int a = lid; a < %d; a += %d) { float cs = 0.0f; for (int j = 0; j <= a && j < L; j++) cs += ladt[j]; lcs[a] = cs; }",
           CH, NT);
    emit_chunk_angles(k, NT, CH, NA, angx);
}

/* Q (or K) of token a, element nn, biased and rotated by the in-chunk angle, into `dst` */
static void emit_rot_load(kgen *k, const char *dst, const char *src, const char *bias, long ld, int N, int NA) {
    KL("{");
    KL("float v = %s[(rb + a) * %ldL + nn] + %s[h * %d + nn];", src, ld, bias, N);
    KL("if (nn < %d) {", 2 * NA);
    KL("const int i = nn >> 1;");
    KL("const float cq = COSF(LPH[a * %d + i]), sq = SINF(LPH[a * %d + i]);", NA, NA);
    KL("const float v0 = %s[(rb + a) * %ldL + 2 * i] + %s[h * %d + 2 * i], v1 = %s[(rb + a) * %ldL + 2 * i + 1] + %s[h * %d + 2 * i + 1];",
       src, ld, bias, N, src, ld, bias, N);
    KL("v = (nn & 1) ? v0 * sq + v1 * cq : v0 * cq - v1 * sq;");
    KL("}");
    KL("%s = v;", dst);
    KL("}");
}

/* cos/sin of the angle entering the chunk into tc/ts: left in `th` by the previous chunk (the
 * forward walk); for chunk 0 the identity, or with a carried state (init: H, else 0) its angle
 * Theta0 (input Thi). Expects c0, sb, b, h and lid in scope. */
static void emit_entering_angle(kgen *k, int NT, int NA, long W2, long ldth, int init) {
    char a0[200], a1[200];
    kl_spread(a0, sizeof a0, "sb", "2 * i", W2, ldth);
    kl_spread(a1, sizeof a1, "sb", "2 * i + 1", W2, ldth);
    KL("for (int i = lid; i < %d; i += %d) {", NA, NT);
    if (init)
        KL("if (c0 > 0) { tc[i] = th[%s]; ts[i] = th[%s]; } else { const float a0 = Thi[(b * %d + h) * %d + i]; "
           "tc[i] = COSF(a0); ts[i] = SINF(a0); }", a0, a1, init, NA);
    else KL("if (c0 > 0) { tc[i] = th[%s]; ts[i] = th[%s]; } else { tc[i] = 1.0f; ts[i] = 0.0f; }", a0, a1);
    KL("}");
}

/* cb = (1 - lam_0) DT_0 of the first token of sequence b (row b * S): the weight of the b-term
 * that couples it to the carried (v0, Kr0), folded into the state entering chunk 0 as the
 * reference's aug_init does. Expects b, h and dtbh in scope. */
static void emit_init_bcoef(kgen *k, long lddt, long ldtr) {
    KL("const float cb_u = ddt[(b * S) * %ldL + h] + dtbh;", lddt);
    KL("const float cb_DT = cb_u > 20.0f ? cb_u : LOG1PF(EXPF(cb_u));");
    KL("const float cb_tr = trap[(b * S) * %ldL + h];", ldtr);
    KL("const float cb_lam = cb_tr >= 0.0f ? 1.0f / (1.0f + EXPF(-cb_tr)) : EXPF(cb_tr) / (1.0f + EXPF(cb_tr));");
    KL("const float cb = (1.0f - cb_lam) * cb_DT;");
}

static long fwd_chunk_local(m3_kdims d, int *NT3) {
    const int P = d.P, N = d.N, NA = d.NA, CH = d.CH;
    int tg = 256 / P;
    *NT3 = P * (tg > 0 ? tg : 1);
    long k1 = 4L * (4L * CH + (long)CH * NA + (long)CH * N + (long)CH * P);
    long big = (long)CH * (N + 1) > (long)CH * CH ? (long)CH * (N + 1) : (long)CH * CH;
    long k3 = 4L * (5L * CH + (long)CH * NA + 2L * NA + (long)CH * (N + 1) + big);
    return k1 > k3 ? k1 : k3;
}

/* ---------------------------------------------------------------- bf16 tensor-core chunk kernels
 *
 * In bf16 plans on CUDA (k->bf16) the chunk products run on tensor cores: mma.sync m16n8k16,
 * bf16 operands, fp32 accumulation, the fragment conventions of kgen.h (kg_tc_*). Rounded to
 * bf16 are only the operands of the products (the rotated keys and queries, x, dy, the masked
 * decay matrix, the state): the decays, cumulative sums, DT, angles and the rotations
 * themselves are computed in fp32 as in the fp32 kernels and rounded once, when a tile is
 * staged into shared memory. A work-group is one chunk of one (sequence, head) as before, with
 * CHP/16 warps (CHP: the chunk rounded up to 16), warp w owning the 16 tokens 16w..16w+15 of
 * every product whose rows are tokens. Tiles are padded with zeros to whole fragments (rows
 * past the chunk's L tokens, columns past N or P) so that every mma may run over all of them.
 * The rotation pairs (2i, 2i+1) are exactly the bf16 pairs of a word, so a tile word is one
 * rotated pair, computed by one work-item. Deterministic as the fp32 kernels: every sum has a
 * fixed order (mma's internal order is fixed). */

static long m3_up16(long n) { return (n + 15) / 16 * 16; }

/* Whether a head's `width` values of tensor t can be read as pairs (2w, 2w + 1), each one
 * 8-byte load: width even and every row starting at an even element (the arena offsets are
 * known when the kernel is rendered). H100, realm-9m 8 x 8192: the four tensor-core scan
 * kernels 22.53 -> 22.33 ms a step. */
static int m3_pairs(const kgen *k, int t, int width) {
    return width % 2 == 0 && k->g->t[t].offset % 2 == 0 && kg_ld(k, t) % 2 == 0;
}

/* the same for the keys and queries of emit_tc_kq_rows */
static int m3_kq_pairs(const kgen *k, const ir_node *n, int N) {
    return m3_pairs(k, n->in[IN_BN], N) && m3_pairs(k, n->in[IN_CN], N);
}

/* Row tiles of the chunk's keys and queries in its local frame, one word per rotated pair:
 * dk[a * ws + w] = bf16 pair (Kl[a][2w], Kl[a][2w+1]), dq likewise for Ql; zeros past L tokens
 * and past N; with `pair` (m3_kq_pairs) a pair is one 8-byte load.
 * Expects rb, L, h, lid and LPH in scope. */
static void emit_tc_kq_rows(kgen *k, int NT, int CHP, int N, int NA, const char *dk, const char *dq, long ldb,
                            long ldc, int pair) {
    const int NW = (int)(m3_up16(N) / 2);
    const long ws = kg_tc_ws(m3_up16(N));
    /* the keys (from Bn + Bb) and/or the queries (Cn + Cb), whichever is asked for */
    const char *dst[2] = {dk, dq}, *src[2] = {"Bn", "Cn"}, *bias[2] = {"Bb", "Cb"}, *v[2] = {"k", "q"};
    const long ld[2] = {ldb, ldc};
    int RS, U;
    m3_rows_open(k, CHP, NW, NT, &RS, &U);
    for (int u = 0; u < 2; u++)
        if (dst[u]) {
            KL("float %sb[%d][2], %sc0 = 0.0f, %sc1 = 0.0f;", v[u], U, v[u], v[u]);
            KL("if (n0 < %d) %sc0 = %s[h * %d + n0];", N, v[u], bias[u], N);
            KL("if (n0 + 1 < %d) %sc1 = %s[h * %d + n0 + 1];", N, v[u], bias[u], N);
        }
    m3_rows_item(k, RS, U);
    for (int u = 0; u < 2; u++)
        if (dst[u]) KL("%sb[u][0] = 0.0f; %sb[u][1] = 0.0f;", v[u], v[u]);
    KL("if (a < L && n0 < %d) {", N);
    for (int u = 0; u < 2; u++) {
        if (!dst[u]) continue;
        if (pair) {
            KL("{ const float2 t2 = *(const float2 *)&%s[(rb + a) * %ldL + n0]; %sb[u][0] = t2.x + %sc0; %sb[u][1] = t2.y + %sc1; }",
               src[u], ld[u], v[u], v[u], v[u], v[u]);
            continue;
        }
        KL("%sb[u][0] = %s[(rb + a) * %ldL + n0] + %sc0;", v[u], src[u], ld[u], v[u]);
        if (N % 2) KL("if (n0 + 1 < %d) %sb[u][1] = %s[(rb + a) * %ldL + n0 + 1] + %sc1;", N, v[u], src[u], ld[u], v[u]);
        else KL("%sb[u][1] = %s[(rb + a) * %ldL + n0 + 1] + %sc1;", v[u], src[u], ld[u], v[u]);
    }
    KL("}");
    KL("}");
    m3_rows_item(k, RS, U);
    for (int u = 0; u < 2; u++)
        if (dst[u]) KL("float %s0 = %sb[u][0], %s1 = %sb[u][1];", v[u], v[u], v[u], v[u]);
    KL("if (a < L && w < %d) {", NA);
    KL("float cq, sq;");
    KL("sincos_wrapped(LPH[a * %d + w], &sq, &cq);", NA);
    for (int u = 0; u < 2; u++)
        if (dst[u])
            KL("{ const float r0 = %s0 * cq - %s1 * sq, r1 = %s0 * sq + %s1 * cq; %s0 = r0; %s1 = r1; }", v[u], v[u], v[u],
               v[u], v[u], v[u]);
    KL("}");
    for (int u = 0; u < 2; u++)
        if (dst[u]) KL("%s[a * %ld + w] = pack_bf16x2(%s0, %s1);", dst[u], ws, v[u], v[u]);
    KL("}");
    KL("}");
    KL("}");
}

/* A P x N state of head h stored in the rows from `base` (`saved` layout; zero where the C
 * condition `cond` fails) as a row tile of PP rows in the chunk's local frame, each row's pairs
 * rotated by -Theta_in: dst[p * ws + w] = bf16 pair (X[p][2w], X[p][2w+1]), X = S R(Theta_in).
 * With `pair` (m3_pairs of the state's width, N even) a pair is one 8-byte load; with base
 * NULL the state is a contiguous copy in shared memory (m3_state_at). With `dot`, the fp32
 * product of each loaded element with the same element of the state `dot` (where its `cond`
 * holds) is added to `sd`: a dot product that costs its second tensor's loads and nothing
 * else. Expects h, lid, tc, ts (and sd). */
typedef struct {
    const char *src, *base, *cond;
    long ld;
} m3_dot;

/* the address of state element `e` of head h: spread over the rows from `base` (kl_spread), or
 * with base NULL a contiguous [P][N] copy (a staged state in shared memory) */
static void m3_state_at(char *buf, size_t len, const char *base, const char *e, long W, long ld) {
    if (base) kl_spread(buf, len, base, e, W, ld);
    else snprintf(buf, len, "%s", e);
}

static void emit_tc_state_rows(kgen *k, int NT, int P, int PP, int N, int NA, const char *dst, const char *src, long W,
                               long ld, const char *base, const char *cond, int pair, const m3_dot *dot) {
    const int NW = (int)(m3_up16(N) / 2);
    const long ws = kg_tc_ws(m3_up16(N)), total = (long)PP * NW;
    const int U = m3_batch(total, NT);
    char a0[200], a1[200], d0[200], d1[200];
    m3_state_at(a0, sizeof a0, base, "e0", W, ld);
    m3_state_at(a1, sizeof a1, base, "e0 + 1", W, ld);
    if (dot) {
        m3_state_at(d0, sizeof d0, dot->base, "e0", W, dot->ld);
        m3_state_at(d1, sizeof d1, dot->base, "e0 + 1", W, dot->ld);
    }
    m3_batch_open(k, total, NT, U);
    KL("float sv[%d][2];", U);
    if (dot) KL("float dv2[%d][2];", U);
    m3_batch_item(k, total, NT, U);
    KL("const int p = it / %d, w = it - p * %d;", NW, NW);
    KL("sv[u][0] = 0.0f; sv[u][1] = 0.0f;");
    if (dot) KL("dv2[u][0] = 0.0f; dv2[u][1] = 0.0f;");
    KL("if (%s && p < %d && 2 * w < %d) {", cond, P, N);
    KL("const long e0 = (long)p * %d + 2 * w;", N);
    if (pair) {
        KL("{ const float2 t2 = *(const float2 *)&%s[%s]; sv[u][0] = t2.x; sv[u][1] = t2.y; }", src, a0);
        if (dot)
            KL("if (%s) { const float2 t2 = *(const float2 *)&%s[%s]; dv2[u][0] = t2.x; dv2[u][1] = t2.y; }", dot->cond,
               dot->src, d0);
    } else {
        KL("sv[u][0] = %s[%s];", src, a0);
        KL("if (2 * w + 1 < %d) sv[u][1] = %s[%s];", N, src, a1);
        if (dot) {
            KL("if (%s) {", dot->cond);
            KL("dv2[u][0] = %s[%s];", dot->src, d0);
            KL("if (2 * w + 1 < %d) dv2[u][1] = %s[%s];", N, dot->src, d1);
            KL("}");
        }
    }
    KL("}");
    KL("}");
    m3_batch_item(k, total, NT, U);
    KL("const int p = it / %d, w = it - p * %d;", NW, NW);
    KL("float s0 = sv[u][0], s1 = sv[u][1];");
    if (dot) KL("sd += s0 * dv2[u][0] + s1 * dv2[u][1];");
    KL("if (w < %d) { const float r0 = s0 * tc[w] + s1 * ts[w], r1 = s1 * tc[w] - s0 * ts[w]; s0 = r0; s1 = r1; }", NA);
    KL("%s[p * %ld + w] = pack_bf16x2(s0, s1);", dst, ws);
    KL("}");
    KL("}");
}

/* A row tile of a per-token [CH, P] input of head h: dst[a * ws + w] = bf16 pair (v[a][2w],
 * v[a][2w+1]), CHP rows, PK/2 words, zeros past L and P (v = src times the per-token factor
 * `fac`, an expression in the token a, if given); with `pair` (m3_pairs) a pair is one 8-byte
 * load. Expects rb, L, h, lid. */
static void emit_tc_tok_rows(kgen *k, int NT, int CHP, int P, int PK, const char *dst, const char *src, long ld, int pair,
                             const char *fac) {
    int RS, U;
    m3_rows_open(k, CHP, PK / 2, NT, &RS, &U);
    KL("float vb[%d][2];", U);
    m3_rows_item(k, RS, U);
    KL("vb[u][0] = 0.0f; vb[u][1] = 0.0f;");
    KL("if (a < L && n0 < %d) {", P);
    if (pair) {   /* P even: n0 < P means n0 + 1 < P */
        KL("const float2 t2 = *(const float2 *)&%s[(rb + a) * %ldL + h * %d + n0];", src, ld, P);
        KL("vb[u][0] = t2.x; vb[u][1] = t2.y;");
    } else {
        KL("vb[u][0] = %s[(rb + a) * %ldL + h * %d + n0];", src, ld, P);
        if (P % 2) KL("if (n0 + 1 < %d) vb[u][1] = %s[(rb + a) * %ldL + h * %d + n0 + 1];", P, src, ld, P);
        else KL("vb[u][1] = %s[(rb + a) * %ldL + h * %d + n0 + 1];", src, ld, P);
    }
    KL("}");
    KL("}");
    m3_rows_item(k, RS, U);
    if (fac) KL("if (a < L) { const float f = %s; vb[u][0] *= f; vb[u][1] *= f; }", fac);
    KL("%s[a * %ld + w] = pack_bf16x2(vb[u][0], vb[u][1]);", dst, kg_tc_ws(PK));
    KL("}");
    KL("}");
    KL("}");
}

/* The bf16 element (row, col) of the accumulator position e of n-tile j of a row tile (word
 * 4j + tq of row tr + 8 (e >> 1), half e & 1) as a float: a C expression. */
static void tc_elem(char *buf, size_t len, const char *tile, long ws, const char *row, const char *half) {
    snprintf(buf, len, "__uint_as_float((%s) ? (%s[(%s) * %ld + 4 * j + tq] & 0xffff0000u) : (%s[(%s) * %ld + 4 * j + tq] << 16))",
             half, tile, row, ws, tile, row, ws);
}

/* The fp32 values of a per-token [.., H*P] input at the thread's accumulator positions (tokens
 * tr + 8r, columns 8j + 2tq + e of head h; zero past L and P) into `float dst[2][NO][2]`,
 * every load issued at once: for a term a kernel adds at its final store, loaded early enough
 * that a product or a barrier covers the latency. */
static void emit_tc_token_loads(kgen *k, const char *dst, const char *src, long ld, int P, long NO) {
    KL("float %s[2][%ld][2];", dst, NO);
    KL("#pragma unroll");
    KL("for (int r = 0; r < 2; r++)");
    KL("    #pragma unroll");
    KL("    for (int j = 0; j < %ld; j++)", NO);
    KL("        for (int e = 0; e < 2; e++) {");
    KL("            const int t = tr + 8 * r, p = 8 * j + 2 * tq + e;");
    KL("            %s[r][j][e] = t < L && p < %d ? %s[(rb + t) * %ldL + h * %d + p] : 0.0f;", dst, P, src, ld, P);
    KL("        }");
}

/* out = acc + coef * pre at the thread's accumulator positions (acc [NO][4] in the mma
 * layout, pre from emit_tc_token_loads); coef is a C expression in the token t. */
static void emit_tc_token_stores(kgen *k, const char *out, long ldo, int P, int PP, long NO, const char *acc,
                                 const char *coef, const char *pre) {
    KL("#pragma unroll");
    KL("for (int r = 0; r < 2; r++) {");
    KL("    const int t = tr + 8 * r;");
    KL("    if (t >= L) continue;");
    KL("    const float coef = %s;", coef);
    KL("    #pragma unroll");
    KL("    for (int j = 0; j < %ld; j++)", NO);
    KL("        for (int e = 0; e < 2; e++) {");
    KL("            const int p = 8 * j + 2 * tq + e;");
    if (PP != P) KL("            if (p >= %d) continue;", P);
    KL("            %s[(rb + t) * %ldL + h * %d + p] = %s[j][2 * r + e] + coef * %s[r][j][e];", out, ldo, P, acc, pre);
    KL("        }");
    KL("}");
}

/* Sum of zr[r] over the quad (tq = 0..3) of each of the thread's two rows, a fixed butterfly. */
static void emit_quad_sum(kgen *k, const char *z) {
    KL("for (int r = 0; r < 2; r++) { %s[r] += __shfl_xor_sync(0xffffffffu, %s[r], 1); %s[r] += __shfl_xor_sync(0xffffffffu, %s[r], 2); }",
       z, z, z, z);
}

/* Whether the output kernel runs on tensor cores: bf16 plan, fragments of at most 128 rows,
 * columns and contraction (the accumulators stay in registers), tiles within the device. */
static long out_tc_shared(m3_kdims d) {
    const long CHP = m3_up16(d.CH), NP = m3_up16(d.N), PK = m3_up16(d.P);
    return 4L * (2 * CHP * kg_tc_ws(NP) + CHP * kg_tc_ws(PK) + PK * kg_tc_ws(NP));
}

static int out_tc(const kgen *k, m3_kdims d) {
    const long small = 4L * (5L * d.CH + (long)d.CH * d.NA + 2L * d.NA);
    const long max = k->shared_max > 0 ? k->shared_max : 160L * 1024;
    return k->bf16 && m3_up16(d.CH) <= 128 && m3_up16(d.N) <= 128 && m3_up16(d.P) <= 128 && small <= 40L * 1024 &&
           out_tc_shared(d) + small <= max;
}

/* mamba3_scan_out_tc, one work-group of CHP/16 warps per (chunk, b, h): y_t = exp(cs_t) Ql_t .
 * (S_in R(Theta_in))_p + sum_{s<=t} M_ts v_s + D v_t in three products per warp, its tokens
 * t = 16w + gq (+8) as rows. (1) The inter-chunk term: yacc = Ql Xs^T (contraction N) with the
 * state tile Xs = S_in R(Theta_in) as B (its rows p are the output columns), then each row
 * scaled by exp(cs_t) in fp32. (2) QK = Ql Kl^T (contraction N, Kl's rows s as columns), only
 * the n-tiles s < 16(w+1) that the causal mask keeps; masked in fp32 in the accumulators into
 * M_ts = QK_ts exp(cs_t - cs_s) scale_s (s < t), gamma_t QK_tt (s = t), 0 otherwise. (3) The
 * accumulators of n-tiles 2kt, 2kt+1 are M's A fragment of k-step kt (kg_tc_repack), and
 * yacc += M X with X^T staged [p][token pair] (contraction over the tokens s <= t: k-steps
 * kt <= w only). The skip term D v_t is added in fp32 from global memory when y is written. */
static int emit_out_tc(kgen *k, const ir_node *n, int node, m3_kdims d) {
    const int H = d.H, P = d.P, N = d.N, NA = d.NA, CH = d.CH;
    const long W = d.W, W2 = m3_theta_width(NA, CH);
    const int CHP = (int)m3_up16(CH), NP = (int)m3_up16(N), PK = (int)m3_up16(P), NT = 2 * CHP;
    const long wsN = kg_tc_ws(NP), wsP = kg_tc_ws(PK), NO = PK / 8;
    const long ldx = kg_ld(k, n->in[IN_X]), ldb = kg_ld(k, n->in[IN_BN]), ldc = kg_ld(k, n->in[IN_CN]),
               lddt = kg_ld(k, n->in[IN_DDT]), ldda = kg_ld(k, n->in[IN_DDA]), ldtr = kg_ld(k, n->in[IN_TRAP]),
               ldang = kg_ld(k, n->in[IN_ANG]), ldy = kg_ld(k, n->out[OUT_Y]), ldst = kg_ld(k, n->out[OUT_ST]),
               ldth = kg_ld(k, n->out[OUT_TH]);
    kg_begin(k, "mamba3_scan_out_tc", node, node + 1);
    /* 5 work-groups per multiprocessor instead of 4 (104 registers): costs 2 registers */
    if (NT <= 128) kg_min_blocks(k, 5);
    args_common(k, n);
    kg_in(k, "Dp", n->in[IN_D]);
    kg_in(k, "st", n->out[OUT_ST]);
    kg_in(k, "th", n->out[OUT_TH]);
    kg_out(k, "y", n->out[OUT_Y]);
    KL("const long c0 = GID_X * %d, bh = GID_Y, b = bh / %d;", CH, H);
    KL("const int h = (int)(bh - b * %d), lid = LID_X;", H);
    KL("const long rb = b * S + c0, sb = rb - %d;   /* the chunk's rows; the previous chunk's */", CH);
    KL("const int L = (int)(S - c0 < %d ? S - c0 : %d);", CH, CH);
    KL("LOCAL float ldt[%d], ladt[%d], lsc[%d], lgm[%d], lcs[%d];", CH, CH, CH, CH, CH);
    KL("LOCAL float LPH[%d], tc[%d], ts[%d];", CH * NA, NA, NA);
    kg_shared(k, "shK", (long)CHP * wsN);
    kg_shared(k, "shQ", (long)CHP * wsN);
    kg_shared(k, "shX", (long)CHP * wsP);
    kg_shared(k, "shS", (long)PK * wsN);
    KL("unsigned *Ks = (unsigned *)shK, *Qs = (unsigned *)shQ, *Xs = (unsigned *)shX, *Ss = (unsigned *)shS;");
    KL("const float dtbh = dtb[h], Dh = Dp[h];");
    emit_entering_angle(k, NT, NA, W2, ldth, 0);
    emit_chunk_scalars(k, NT, CH, NA, lddt, ldda, ldtr, ldang);
    KL("BARRIER();");
    emit_tc_kq_rows(k, NT, CHP, N, NA, "Ks", "Qs", ldb, ldc, m3_kq_pairs(k, n, N));
    emit_tc_tok_rows(k, NT, CHP, P, PK, "Xs", "x", ldx, m3_pairs(k, n->in[IN_X], P), NULL);
    emit_tc_state_rows(k, NT, P, PK, N, NA, "Ss", "st", W, ldst, "sb", "c0 > 0", N % 2 == 0 && m3_pairs(k, n->out[OUT_ST], (int)W),
                       NULL);
    KL("BARRIER();");
    kg_tc_prologue(k);
    KL("const int tr = warp * 16 + gq;   /* this thread's tokens: tr, tr + 8 */");
    kg_tc_afrag(k, NP, "qf", "Qs");
    /* (1) inter-chunk */
    kg_tc_zero(k, "yacc", NO);
    kg_tc_mma(k, "yacc", "qf[kk]", NULL, 0, "Ss", wsN, 0, NO, NP / 16, NULL, NULL);
    KL("float et[2];");
    KL("for (int r = 0; r < 2; r++) et[r] = tr + 8 * r < L ? exp_sfu(FMINF(lcs[tr + 8 * r], 0.0f)) : 0.0f;");
    KL("#pragma unroll");
    KL("for (int j = 0; j < %ld; j++)", NO);
    KL("    for (int e = 0; e < 4; e++) yacc[j][e] *= et[e >> 1];");
    /* (2) the masked decay matrix */
    kg_tc_zero(k, "macc", CHP / 8);
    kg_tc_mma(k, "macc", "qf[kk]", NULL, 0, "Ks", wsN, 0, CHP / 8, NP / 16, NULL, "j < 2 * warp + 2");
    KL("#pragma unroll");
    KL("for (int j = 0; j < %d; j++)", CHP / 8);
    KL("    for (int e = 0; e < 4; e++) {");
    KL("        const int t = tr + 8 * (e >> 1), s2 = 8 * j + 2 * tq + (e & 1);");
    KL("        float m = 0.0f;");
    KL("        if (t < L) {");
    KL("            if (s2 < t) m = macc[j][e] * exp_sfu(FMINF(lcs[t] - lcs[s2], 0.0f)) * lsc[s2];");
    KL("            else if (s2 == t) m = lgm[t] * macc[j][e];");
    KL("        }");
    KL("        macc[j][e] = m;");
    KL("    }");
    /* (3) y += M X; the fp32 x of the skip term D x is loaded first, so the product covers
     * its latency (loaded at the store, the kernel waited on it for a fifth of its samples:
     * Nsight Compute, H100) */
    kg_tc_repack(k, "mf", "macc", CHP / 16);
    emit_tc_token_loads(k, "xv", "x", ldx, P, NO);
    kg_tc_mma(k, "yacc", "mf[kk]", NULL, 0, "Xs", wsP, 1, NO, CHP / 16, "kk <= warp", NULL);
    emit_tc_token_stores(k, "y", ldy, P, PK, NO, "yacc", "Dh", "xv");
    kg_grid(k, 0, 0, 0, 1, 0, CH);
    kg_grid(k, 1, 0, H, 0, 0, 1);
    kg_block(k, NT, 1, 1);
    return kg_end(k);
}

/* Whether the chunk-increment kernels (forward and backward) run on tensor cores: bf16 plan, at
 * most 128 state rows P and columns N (accumulators in registers), tiles within the device. */
static int chunk_tc(const kgen *k, m3_kdims d) {
    const long CHP = m3_up16(d.CH), NK = m3_up16(d.N), PK = m3_up16(d.P);
    const long sh = 4L * (CHP * kg_tc_ws(NK) + CHP * kg_tc_ws(PK) + (long)d.CH * d.NA) +
                    4L * (5L * d.CH + 2L * d.NA);
    const long max = k->shared_max > 0 ? k->shared_max : 160L * 1024;
    return k->bf16 && CHP <= 256 && NK <= 128 && PK <= 128 && sh <= max;
}

/* mamba3_scan_chunk_tc (bwd = 0) and mamba3_scan_bwd_chunk_tc (bwd = 1), one work-group of
 * PK/16 warps per (chunk, b, h): a P x N chunk increment as one product over the chunk's
 * tokens, U = A^T Z, warp w owning the state rows p = 16w..16w+15. Forward: A_ap = exp(cs_L -
 * cs_a) scale_a x_ap and Z = Kl, the state increment in the chunk's frame (full chunks only);
 * backward: A_ap = exp(cs_a) dy_ap and Z = Ql, the state gradient's increment, then turned by
 * the entering angle in registers (a thread's accumulators of columns 8j + 2tq, + 1 are a whole
 * rotation pair). The decay factors multiply in fp32 before A is rounded; A^T is staged
 * [p][token pair] as the A operand, Z's row tile [token][pair] is built as in the other
 * kernels and transposed as integers to [n][token pair], the B operand. The outputs and their
 * zero padding are the fp32 kernels'. */
static int emit_chunk_tc(kgen *k, const ir_node *n, int node, m3_kdims d, int bwd) {
    const int H = d.H, P = d.P, N = d.N, NA = d.NA, CH = d.CH;
    const int CHP = (int)m3_up16(CH), NK = (int)m3_up16(N), PK = (int)m3_up16(P), NT = 2 * PK;
    const long wsN = kg_tc_ws(NK), wsP = kg_tc_ws(PK), NO = NK / 8, PN = (long)P * N;
    const long W = bwd ? m3_bwd_width(P, N, CH) : m3_dstate_width(P, N, NA, CH), W2 = m3_theta_width(NA, CH);
    const long ldb = kg_ld(k, n->in[IN_BN]), ldc = kg_ld(k, n->in[IN_CN]), lddt = kg_ld(k, n->in[IN_DDT]),
               ldda = kg_ld(k, n->in[IN_DDA]), ldtr = kg_ld(k, n->in[IN_TRAP]), ldang = kg_ld(k, n->in[IN_ANG]);
    const int out = bwd ? n->out[BOUT_DU] : n->out[OUT_DST];
    const long ldo = kg_ld(k, out);
    const char *o = bwd ? "du" : "ds", *base = bwd ? "sb" : "rb";
    char a0[200], a1[200];
    kg_begin(k, bwd ? "mamba3_scan_bwd_chunk_tc" : "mamba3_scan_chunk_tc", node, node + 1);
    /* 8 work-groups of 4 warps per multiprocessor rather than the 7 that 68-72 registers allow
     * (a few bytes of spills): H100, realm-9m 8 x 8192: chunk 2.35 -> 2.22 ms a step, bwd
     * chunk 2.19 -> 2.04 */
    if (NT <= 128) kg_min_blocks(k, 8);
    args_common(k, n);
    if (bwd) {
        kg_in(k, "dy", n->in[BIN_DY]);
        kg_in(k, "th", n->in[BIN_TH]);
    }
    kg_out(k, o, out);
    KL("const long c0 = GID_X * %d, bh = GID_Y, b = bh / %d;", CH, H);
    KL("const int h = (int)(bh - b * %d), lid = LID_X;", H);
    KL("const long rb = b * S + c0, sb = rb - %d;", CH);
    KL("const int L = (int)(S - c0 < %d ? S - c0 : %d);", CH, CH);
    KL("(void)sb;");
    KL("LOCAL float ldt[%d], ladt[%d], lsc[%d], lgm[%d], lcs[%d], tc[%d], ts[%d];", CH, CH, CH, CH, CH, NA, NA);
    kg_shared(k, "LPH", (long)CH * NA);
    kg_shared(k, "shZ", (long)CHP * wsN);
    kg_shared(k, "shA", (long)CHP * wsP);
    KL("unsigned *Zs = (unsigned *)shZ, *As = (unsigned *)shA;");
    KL("const float dtbh = dtb[h];");
    emit_chunk_scalars(k, NT, CH, NA, lddt, ldda, ldtr, ldang);
    if (bwd) emit_entering_angle(k, NT, NA, W2, kg_ld(k, n->in[BIN_TH]), 0);
    KL("BARRIER();");
    emit_tc_kq_rows(k, NT, CHP, N, NA, bwd ? NULL : "Zs", bwd ? "Zs" : NULL, ldb, ldc,
                    m3_kq_pairs(k, n, N));
    if (bwd)
        emit_tc_tok_rows(k, NT, CHP, P, PK, "As", "dy", kg_ld(k, n->in[BIN_DY]), m3_pairs(k, n->in[BIN_DY], P),
                         "exp_sfu(FMINF(lcs[a], 0.0f))");
    else
        emit_tc_tok_rows(k, NT, CHP, P, PK, "As", "x", kg_ld(k, n->in[IN_X]), m3_pairs(k, n->in[IN_X], P),
                         "exp_sfu(FMINF(lcs[L - 1] - lcs[a], 0.0f)) * lsc[a]");
    KL("BARRIER();");
    kg_tc_prologue(k);
    KL("const int tr = warp * 16 + gq;   /* this thread's state rows: tr, tr + 8 */");
    /* the forward's partial last chunk and the backward's chunk 0 write no product */
    if (bwd) KL("if (c0 > 0) {");
    else KL("if (L == %d) {", CH);
    kg_tc_afrag_trans(k, "af", "As", wsP, CHP / 16);
    kg_tc_zero(k, "acc", NO);
    kg_tc_mma(k, "acc", "af[kk]", NULL, 0, "Zs", wsN, 1, NO, CHP / 16, NULL, NULL);
    kl_spread(a0, sizeof a0, base, "e0", W, ldo);
    kl_spread(a1, sizeof a1, base, "e0 + 1", W, ldo);
    KL("#pragma unroll");
    KL("for (int r = 0; r < 2; r++) {");
    KL("    const int p = tr + 8 * r;");
    KL("    if (p >= %d) continue;", P);
    KL("    #pragma unroll");
    KL("    for (int j = 0; j < %ld; j++) {", NO);
    KL("        const int i = 4 * j + tq, n0 = 2 * i;");
    KL("        if (n0 >= %d) continue;", N);
    KL("        float u0 = acc[j][2 * r], u1 = acc[j][2 * r + 1];");
    if (bwd)
        KL("        if (i < %d) { const float r0 = u0 * tc[i] - u1 * ts[i], r1 = u0 * ts[i] + u1 * tc[i]; u0 = r0; u1 = r1; }",
           NA);
    KL("        const long e0 = (long)p * %d + n0;", N);
    KL("        %s[%s] = u0;", o, a0);
    if (N % 2) KL("        if (n0 + 1 < %d) %s[%s] = u1;", N, o, a1);
    else KL("        %s[%s] = u1;", o, a1);
    KL("    }");
    KL("}");
    kl_spread(a0, sizeof a0, base, "e", W, ldo);
    if (bwd) {
        KL("for (long e = %ldL + lid; e < %ldL; e += %d) du[%s] = e == %ldL ? exp_sfu(FMINF(lcs[L - 1], 0.0f)) : 0.0f;", PN,
           (long)CH * W, NT, a0, PN);
        KL("} else {");
        /* chunk 0's work-group clears the last chunk's rows instead (nothing leaves it) */
        KL("const long nch = (S + %d) / %d;", CH - 1, CH);
        KL("const long lb = b * S + (nch - 1) * %d, LL = S - (nch - 1) * %d;", CH, CH);
        kl_spread(a0, sizeof a0, "lb", "e", W, ldo);
        KL("for (long e = lid; e < LL * %ldL; e += %d) du[%s] = 0.0f;", W, NT, a0);
        KL("}");
    } else {
        /* then the chunk's decay and the cos/sin of its in-chunk angles (m3_dstate_width) */
        KL("for (long e = %ldL + lid; e < %ldL; e += %d) {", PN, (long)CH * W, NT);
        KL("    float v = 0.0f;");
        KL("    if (e == %ldL) v = exp_sfu(FMINF(lcs[%d], 0.0f));", PN, CH - 1);
        KL("    else if (e <= %ldL) { const int q = (int)(e - %ldL); v = (q & 1) ? SINF(LPH[%d + (q >> 1)]) : COSF(LPH[%d + (q >> 1)]); }",
           PN + 2L * NA, PN + 1, (CH - 1) * NA, (CH - 1) * NA);
        KL("    ds[%s] = v;", a0);
        KL("}");
        KL("} else {");
        KL("for (long e = lid; e < (long)L * %ldL; e += %d) ds[%s] = 0.0f;", W, NT, a0);
        KL("}");
    }
    kg_grid(k, 0, 0, 0, 1, 0, CH);
    kg_grid(k, 1, 0, H, 0, 0, 1);
    kg_block(k, NT, 1, 1);
    return kg_end(k);
}

static int emit_fwd_chunked(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    int node = (int)(n - g->n);
    const int init = n->nin == IN_NINIT;
    m3_kdims d = kdims(k, n);
    const int H = d.H, P = d.P, N = d.N, NA = d.NA, CH = d.CH, NH = (N + 1) / 2;
    const long W = d.W, PN = (long)P * N, W2 = m3_theta_width(NA, CH), Wd = m3_dstate_width(P, N, NA, CH);
    int NT3;
    (void)fwd_chunk_local(d, &NT3);
    const int NT = 256, TG = NT3 / P;
    const long ldx = kg_ld(k, n->in[IN_X]), ldb = kg_ld(k, n->in[IN_BN]), ldc = kg_ld(k, n->in[IN_CN]),
               lddt = kg_ld(k, n->in[IN_DDT]), ldda = kg_ld(k, n->in[IN_DDA]), ldtr = kg_ld(k, n->in[IN_TRAP]),
               ldang = kg_ld(k, n->in[IN_ANG]), ldy = kg_ld(k, n->out[OUT_Y]), ldst = kg_ld(k, n->out[OUT_ST]),
               ldds = kg_ld(k, n->out[OUT_DST]), ldth = kg_ld(k, n->out[OUT_TH]);
    char angx[96], ad[160], as0[160], as1[160], at[160];
    snprintf(angx, sizeof angx, "ang[(rb + a) * %ldL + i]", ldang);

    /* ---- (1) chunk increments in the local frame */
    if (chunk_tc(k, d)) {
        if (emit_chunk_tc(k, n, node, d, 0) < 0) return -1;
    } else {
        kg_begin(k, "mamba3_scan_chunk", node, node + 1);
        args_common(k, n);
        kg_out(k, "ds", n->out[OUT_DST]);
        KL("const long c0 = GID_X * %d, bh = GID_Y, b = bh / %d;", CH, H);
        KL("const int h = (int)(bh - b * %d), lid = LID_X;", H);
        KL("const long rb = b * S + c0;");
        KL("const int L = (int)(S - c0 < %d ? S - c0 : %d);", CH, CH);
        kl_spread(ad, sizeof ad, "rb", "i", Wd, ldds);
        KL("LOCAL float ldt[%d], ladt[%d], lsc[%d], lgm[%d], lcs[%d];", CH, CH, CH, CH, CH);
        KL("LOCAL float LPH[%d];", CH * NA);
        KL("LOCAL float KR[%d];", CH * N);
        KL("LOCAL float VW[%d];", CH * P);
        KL("const float dtbh = dtb[h];");
        emit_chunk_scalars(k, NT, CH, NA, lddt, ldda, ldtr, ldang);
        KL("BARRIER();");
        KL("for (int j = lid; j < L * %d; j += %d) {", N, NT);
        KL("const int a = j / %d, nn = j - a * %d;", N, N);
        emit_rot_load(k, "KR[j]", "Bn", "Bb", ldb, N, NA);
        KL("}");
        KL("for (int j = lid; j < L * %d; j += %d) {", P, NT);
        KL("const int a = j / %d, p = j - a * %d;", P, P);
        KL("VW[j] = EXPF(FMINF(lcs[L - 1] - lcs[a], 0.0f)) * lsc[a] * x[(rb + a) * %ldL + h * %d + p];", ldx, P);
        KL("}");
        KL("BARRIER();");
        /* a partial last chunk (no early return: PoCL miscompiled barriers after one) runs the
         * same steps on its L tokens, but no state leaves it, so its rows hold zeros */
        KL("for (long i = lid; i < (long)L * %ldL; i += %d) {", Wd, NT);
        KL("float acc = 0.0f;");
        KL("if (L == %d && i < %ldL) {", CH, PN);
        KL("const int p = (int)(i / %d), nn = (int)(i - (long)p * %d);", N, N);
        KL("for (int a = 0; a < %d; a++) acc += VW[a * %d + p] * KR[a * %d + nn];", CH, P, N);
        KL("} else if (L == %d && i == %ldL) {", CH, PN);
        KL("acc = EXPF(FMINF(lcs[%d], 0.0f));", CH - 1);
        KL("} else if (L == %d && i <= %ldL) {", CH, PN + 2L * NA);
        KL("const int e = (int)(i - %ldL), a = e >> 1;", PN + 1);
        KL("acc = (e & 1) ? SINF(LPH[%d + a]) : COSF(LPH[%d + a]);", (CH - 1) * NA, (CH - 1) * NA);
        KL("}");
        KL("ds[%s] = acc;", ad);
        KL("}");
        kg_grid(k, 0, 0, 0, 1, 0, CH);
        kg_grid(k, 1, 0, H, 0, 0, 1);
        kg_block(k, NT, 1, 1);
        if (kg_end(k) < 0) return -1;
    }

    /* ---- (2) the walk over chunks. Every pair (p, j) of the state's elements is its own chain
     * through the chunks (rotations act on pairs), so each work-item walks one pair, reading the
     * chunk's decay and in-chunk angle (cos, sin) that kernel (1) left in `dstate`; the angle
     * entering a chunk is kept as (cos, sin) and composed with each chunk's rotation,
     * renormalised so rounding cannot change its length over thousands of chunks. Loads of a
     * batch of WU chunks come first: a store to `saved` could alias the next chunk's loads
     * (one arena), so without the batch every step would wait for its own load. */
    const long NPR = (long)P * NH;
    const int WU = 8;
    kg_begin(k, "mamba3_scan_walk", node, node + 1);
    kg_in(k, "ds", n->out[OUT_DST]);
    if (init) {
        kg_in(k, "ddt", n->in[IN_DDT]);
        kg_in(k, "trap", n->in[IN_TRAP]);
        kg_in(k, "dtb", n->in[IN_DTB]);
        args_init(k, n);
    }
    kg_out(k, "st", n->out[OUT_ST]);
    kg_out(k, "th", n->out[OUT_TH]);
    KL("const long bh = GID_Y, b = bh / %d;", H);
    KL("const int h = (int)(bh - b * %d), lid = LID_X;", H);
    KL("const long nch = (S + %d) / %d, nfull = S / %d;", CH - 1, CH, CH);
    /* the slots past the state / the angles of every full chunk, and all rows of a partial
     * last chunk, hold zeros (the reference's layout) */
    const long padS = (long)CH * W - PN, padT = (long)CH * W2 - 2L * NA;
    KL("if (GID_X == 0) {");
    if (padS > 0) {
        KL("for (long i = lid; i < nfull * %ldL; i += %d) {", padS, NT);
        KL("const long rb = b * S + (i / %ldL) * %d, e = %ldL + i %% %ldL;", padS, CH, PN, padS);
        kl_spread(as0, sizeof as0, "rb", "e", W, ldst);
        KL("st[%s] = 0.0f;", as0);
        KL("}");
    }
    if (padT > 0) {
        KL("for (long i = lid; i < nfull * %ldL; i += %d) {", padT, NT);
        KL("const long rb = b * S + (i / %ldL) * %d, e = %dL + i %% %ldL;", padT, CH, 2 * NA, padT);
        kl_spread(at, sizeof at, "rb", "e", W2, ldth);
        KL("th[%s] = 0.0f;", at);
        KL("}");
    }
    KL("if (nch > nfull) {");
    KL("const long rb = b * S + nfull * %d;", CH);
    KL("const long L = S - nfull * %d;", CH);
    kl_spread(as0, sizeof as0, "rb", "i", W, ldst);
    KL("for (long i = lid; i < L * %ldL; i += %d) st[%s] = 0.0f;", W, NT, as0);
    kl_spread(at, sizeof at, "rb", "i", W2, ldth);
    KL("for (long i = lid; i < L * %ldL; i += %d) th[%s] = 0.0f;", W2, NT, at);
    KL("}");
    KL("}");
    KL("const long q = GID_X * %d + lid;", NT);
    KL("if (q < %ldL) {", NPR);
    KL("const int p = (int)(q / %d), j = (int)(q - (long)p * %d);", NH, NH);
    KL("const long e0 = (long)p * %d + 2 * j;", N);
    KL("const int odd = 2 * j + 1 < %d, turns = j < %d;", N, NA);
    KL("float S0 = 0.0f, S1 = 0.0f, ce = 1.0f, se = 0.0f;   /* state pair; angle entering the chunk */");
    if (init) {
        /* from the carried state plus token 0's b-term (aug_init), the angle from Theta0 */
        KL("const float dtbh = dtb[h];");
        emit_init_bcoef(k, lddt, kg_ld(k, n->in[IN_TRAP]));
        KL("const float cv = cb * vi[bh * %d + p];", P);
        KL("S0 = Si[bh * %ldL + e0] + cv * Kri[bh * %d + 2 * j];", PN, N);
        KL("if (odd) S1 = Si[bh * %ldL + e0 + 1] + cv * Kri[bh * %d + 2 * j + 1];", PN, N);
        KL("if (turns) { ce = COSF(Thi[bh * %d + j]); se = SINF(Thi[bh * %d + j]); }", NA, NA);
    }
    KL("for (long cbk = 0; cbk < nfull; cbk += %d) {", WU);
    KL("float vd[%d], v0[%d], v1[%d], vc[%d], vs[%d];", WU, WU, WU, WU, WU);
    KL("for (int u = 0; u < %d; u++) {", WU);
    KL("vd[u] = 1.0f; v0[u] = 0.0f; v1[u] = 0.0f; vc[u] = 1.0f; vs[u] = 0.0f;");
    KL("if (cbk + u < nfull) {");
    KL("const long rb = b * S + (cbk + u) * %d;", CH);
    kl_spread(ad, sizeof ad, "rb", "e", Wd, ldds);
    KL("long e = %ldL; vd[u] = ds[%s];", PN, ad);
    KL("e = e0; v0[u] = ds[%s];", ad);
    KL("e = e0 + 1; if (odd) v1[u] = ds[%s];", ad);
    KL("e = %ldL + 2 * j; if (turns) { vc[u] = ds[%s]; e++; vs[u] = ds[%s]; }", PN + 1, ad, ad);
    KL("}");
    KL("}");
    KL("for (int u = 0; u < %d && cbk + u < nfull; u++) {", WU);
    KL("const long rb = b * S + (cbk + u) * %d;", CH);
    KL("float x0 = v0[u], x1 = v1[u];");
    KL("if (turns) {");
    KL("const float r0 = x0 * ce - x1 * se, r1 = x0 * se + x1 * ce;");
    KL("x0 = r0; x1 = r1;");
    KL("const float nc = ce * vc[u] - se * vs[u], ns = se * vc[u] + ce * vs[u];");
    KL("const float rn = RSQRTF(nc * nc + ns * ns);");
    KL("ce = nc * rn; se = ns * rn;");
    kl_spread(at, sizeof at, "rb", "2 * j", W2, ldth);
    KL("if (p == 0) th[%s] = ce;", at);
    kl_spread(at, sizeof at, "rb", "2 * j + 1", W2, ldth);
    KL("if (p == 0) th[%s] = se;", at);
    KL("}");
    KL("S0 = vd[u] * S0 + x0; S1 = vd[u] * S1 + x1;");
    kl_spread(as0, sizeof as0, "rb", "e0", W, ldst);
    kl_spread(as1, sizeof as1, "rb", "e0 + 1", W, ldst);
    KL("st[%s] = S0;", as0);
    KL("if (odd) st[%s] = S1;", as1);
    KL("}");
    KL("}");
    KL("}");
    kg_grid(k, 0, (NPR + NT - 1) / NT, 0, 0, 0, 1);
    kg_grid(k, 1, 0, H, 0, 0, 1);
    kg_block(k, NT, 1, 1);
    if (kg_end(k) < 0) return -1;

    /* ---- (3) outputs, per (chunk, b, h) */
    /* (the tensor-core kernel has no carried-state entry: prefill plans, the only ones with
     * one, run fp32 matmuls anyway) */
    if (!init && out_tc(k, d)) return emit_out_tc(k, n, node, d);
    kg_begin(k, "mamba3_scan_out", node, node + 1);
    args_common(k, n);
    kg_in(k, "Dp", n->in[IN_D]);
    kg_in(k, "st", n->out[OUT_ST]);
    kg_in(k, "th", n->out[OUT_TH]);
    if (init) args_init(k, n);
    kg_out(k, "y", n->out[OUT_Y]);
    /* QR and Kl rows padded by one float: the M dot products of a warp read 32 different rows
     * at the same column, which would otherwise all fall in one bank */
    const int N1 = N + 1;
    const long big = (long)CH * N1 > (long)CH * CH ? (long)CH * N1 : (long)CH * CH;
    const int MR = (CH * CH + NT3 - 1) / NT3;
    KL("const long c0 = GID_X * %d, bh = GID_Y, b = bh / %d;", CH, H);
    KL("const int h = (int)(bh - b * %d), lid = LID_X;", H);
    KL("const long rb = b * S + c0, sb = rb - %d;   /* the chunk's rows; the previous chunk's */", CH);
    KL("const int L = (int)(S - c0 < %d ? S - c0 : %d);", CH, CH);
    KL("LOCAL float ldt[%d], ladt[%d], lsc[%d], lgm[%d], lcs[%d];", CH, CH, CH, CH, CH);
    KL("LOCAL float LPH[%d], tc[%d], ts[%d];", CH * NA, NA, NA);
    /* the tiles live in dynamic shared memory: with the chunk's inputs v staged too they pass
     * the 48 KiB of static LOCAL arrays */
    kg_shared(k, "QR", (long)CH * N1);
    kg_shared(k, "KM", big);   /* Kl of the chunk, then M */
    /* the chunk's v too where the device has room (fwd_chunk_local counts the rest) */
    int NT3x;
    const int stage_v = fwd_chunk_local(d, &NT3x) + 4L * CH * P <= (k->shared_max > 0 ? k->shared_max : 160L * 1024);
    if (stage_v) kg_shared(k, "XV", (long)CH * P);
    KL("const float dtbh = dtb[h], Dh = Dp[h];");
    emit_entering_angle(k, NT3, NA, W2, ldth, init ? H : 0);
    emit_chunk_scalars(k, NT3, CH, NA, lddt, ldda, ldtr, ldang);
    KL("BARRIER();");
    KL("for (int j = lid; j < L * %d; j += %d) {", N, NT3);
    KL("const int a = j / %d, nn = j - a * %d;", N, N);
    snprintf(at, sizeof at, "KM[a * %d + nn]", N1);
    emit_rot_load(k, at, "Bn", "Bb", ldb, N, NA);
    snprintf(at, sizeof at, "QR[a * %d + nn]", N1);
    emit_rot_load(k, at, "Cn", "Cb", ldc, N, NA);
    KL("}");
    if (stage_v)
        KL("for (int j = lid; j < L * %d; j += %d) XV[j] = x[(rb + j / %d) * %ldL + h * %d + j %% %d];", P, NT3, P, ldx, P, P);
    KL("BARRIER();");
    /* M in registers first: it overwrites Kl, which its own dot products still read */
    KL("float mr[%d];", MR);
    KL("for (int r = 0; r < %d; r++) {", MR);
    KL("const int j = lid + r * %d;", NT3);
    KL("const int t = j / %d, s2 = j - t * %d;", CH, CH);
    KL("float m = 0.0f;");
    KL("if (t < L && s2 <= t) {");
    KL("float qk = 0.0f;");
    KL("for (int nn = 0; nn < %d; nn++) qk += QR[t * %d + nn] * KM[s2 * %d + nn];", N, N1, N1);
    KL("m = s2 < t ? qk * EXPF(FMINF(lcs[t] - lcs[s2], 0.0f)) * lsc[s2] : lgm[t] * qk + Dh;");
    KL("}");
    KL("mr[r] = m;");
    KL("}");
    KL("BARRIER();");
    KL("for (int r = 0; r < %d; r++) { const int j = lid + r * %d; if (j < %d) KM[j] = mr[r]; }", MR, NT3, CH * CH);
    KL("BARRIER();");
    /* y: work-item (p, token group); its state row, turned into the chunk's local frame
     * (R(Theta_in)^T per pair), stays in registers for all its tokens */
    KL("if (lid < %d) {", P * TG);
    KL("const int p = lid %% %d, tg = lid / %d;", P, P);
    KL("float Sr[%d];", N);
    kl_spread(as0, sizeof as0, "sb", "e", W, ldst);
    KL("if (c0 > 0) for (int nn = 0; nn < %d; nn++) { const long e = (long)p * %d + nn; Sr[nn] = st[%s]; }", N, N, as0);
    if (init) {
        /* chunk 0 enters with the carried state plus token 0's b-term, as the walk starts */
        KL("else {");
        emit_init_bcoef(k, lddt, ldtr);
        KL("const float cv = cb * vi[bh * %d + p];", P);
        KL("for (int nn = 0; nn < %d; nn++) Sr[nn] = Si[bh * %ldL + (long)p * %d + nn] + cv * Kri[bh * %d + nn];", N,
           PN, N, N);
        KL("}");
    } else {
        KL("else for (int nn = 0; nn < %d; nn++) Sr[nn] = 0.0f;", N);
    }
    KL("for (int i = 0; i < %d; i++) {", NA);
    KL("const float s0 = Sr[2 * i], s1 = Sr[2 * i + 1];");
    KL("Sr[2 * i] = s0 * tc[i] + s1 * ts[i]; Sr[2 * i + 1] = s1 * tc[i] - s0 * ts[i];");
    KL("}");
    KL("for (int t = tg; t < L; t += %d) {", TG);
    KL("float sq = 0.0f;");
    KL("for (int nn = 0; nn < %d; nn++) sq += Sr[nn] * QR[t * %d + nn];", N, N1);
    KL("float acc = EXPF(FMINF(lcs[t], 0.0f)) * sq;");
    if (stage_v) KL("for (int s2 = 0; s2 <= t; s2++) acc += KM[t * %d + s2] * XV[s2 * %d + p];", CH, P);
    else KL("for (int s2 = 0; s2 <= t; s2++) acc += KM[t * %d + s2] * x[(rb + s2) * %ldL + h * %d + p];", CH, ldx, P);
    KL("y[(rb + t) * %ldL + h * %d + p] = acc;", ldy, P);
    KL("}");
    KL("}");
    kg_grid(k, 0, 0, 0, 1, 0, CH);
    kg_grid(k, 1, 0, H, 0, 0, 1);
    kg_block(k, NT3, 1, 1);
    return kg_end(k);
}

/* Whether the forward runs the chunk-parallel kernels (their `theta` workspace is what the
 * chunk-parallel backward reads). P <= 256: kernel 3's work-items own (p, token group); 44 KiB
 * leaves room under the 48 KiB every target guarantees. */
static int fwd_chunked(m3_kdims d) {
    int NT3;
    long local = fwd_chunk_local(d, &NT3);
    return d.P <= 256 && d.CH <= 256 && local <= 44L * 1024;
}

static int emit_fwd(kgen *k, const ir_node *n) {
    m3_kdims d = kdims(k, n);
    return fwd_chunked(d) ? emit_fwd_chunked(k, n) : emit_fwd_seq(k, n);
}

/* Backward kernel 1: one work-group per (b, h). */
static int emit_bwd_scan(kgen *k, const ir_node *n, int node, m3_kdims d) {
    const int H = d.H, P = d.P, N = d.N, NA = d.NA, CH = d.CH;
    const long W = d.W, PN = (long)P * N, W2 = 2L * N;
    int NT = CH > NA ? CH : NA;
    NT = (NT + 31) / 32 * 32;
    if (NT > 256) NT = 256;
    const long ldx = kg_ld(k, n->in[IN_X]), ldb = kg_ld(k, n->in[IN_BN]), ldc = kg_ld(k, n->in[IN_CN]),
               lddt = kg_ld(k, n->in[IN_DDT]), ldda = kg_ld(k, n->in[IN_DDA]), ldtr = kg_ld(k, n->in[IN_TRAP]),
               ldang = kg_ld(k, n->in[IN_ANG]), ldst = kg_ld(k, n->in[BIN_ST]), lddy = kg_ld(k, n->in[BIN_DY]),
               ldgx = kg_ld(k, n->out[IN_X]), ldgt = kg_ld(k, n->out[IN_DDT]), ldga = kg_ld(k, n->out[IN_DDA]),
               ldgr = kg_ld(k, n->out[IN_TRAP]), ldh = kg_ld(k, n->out[BOUT_HEAD]),
               ldha = kg_ld(k, n->out[BOUT_HANG]);
    kg_begin(k, "mamba3_scan_bwd", node, node + 1);
    args_common(k, n);
    kg_in(k, "Dp", n->in[IN_D]);
    kg_in(k, "st", n->in[BIN_ST]);
    kg_in(k, "dy", n->in[BIN_DY]);
    kg_out(k, "gx", n->out[IN_X]);
    kg_out(k, "gddt", n->out[IN_DDT]);
    kg_out(k, "gddA", n->out[IN_DDA]);
    kg_out(k, "gtrap", n->out[IN_TRAP]);
    kg_out(k, "hd", n->out[BOUT_HEAD]);
    kg_out(k, "ha", n->out[BOUT_HANG]);
    KL("const long b = GID_X / %d;", H);
    KL("const int h = (int)(GID_X - b * %d);", H);
    KL("const int lid = LID_X;");
    KL("LOCAL float dS[%ld];", PN);
    KL("LOCAL float X[%d];", CH * N);
    KL("LOCAL float TH[%d];", CH * NA);
    KL("LOCAL float ladt[%d];", CH);
    KL("LOCAL float lcs[%d];", CH);
    KL("LOCAL float lsc[%d];", CH);
    KL("LOCAL float ldcs[%d];", CH);
    KL("LOCAL float ldsc[%d];", CH);
    KL("LOCAL float lT[%d];", CH);
    KL("LOCAL float pend[4];");
    KL("const float dtbh = dtb[h];");
    KL("const float Dh = Dp[h];");
    KL("float qr[%d], kr[%d], dqr[%d], dkr[%d];", N, N, N, N);
    KL("float Gi = 0.0f;");
    /* pre-pass: Theta_t of every token into this head's angle columns of hd; read back later
     * only by the work-item that wrote it */
    char angx[96];
    KL("if (lid < %d) {", NA);
    KL("float Tq = 0.0f;");
    KL("for (long s = 0; s < S; s++) {");
    KL("const long tok = b * S + s;");
    KL("const float u = ddt[tok * %ldL + h] + dtbh;", lddt);
    KL("const float DT = u > 20.0f ? u : LOG1PF(EXPF(u));");
    snprintf(angx, sizeof angx, "ang[tok * %ldL + lid]", ldang);
    emit_theta_step(k, "Tq", "DT", angx);
    KL("ha[tok * %ldL + h * %d + lid] = Tq;", ldha, NA);
    KL("}");
    KL("}");
    KL("for (int e = lid; e < %ld; e += %d) dS[e] = 0.0f;", PN, NT);
    KL("if (lid < 4) pend[lid] = 0.0f;");
    KL("const long nch = (S + %d) / %d;", CH - 1, CH);
    KL("for (long c = nch - 1; c >= 0; c--) {");
    KL("const long c0 = c * %d;", CH);
    KL("const int L = (int)(S - c0 < %d ? S - c0 : %d);", CH, CH);
    KL("const long rb = b * S + c0, sb = rb - %d;   /* chunk rows; rows of the entering state */", CH);
    KL("BARRIER();");
    KL("if (lid < %d) for (int a2 = 0; a2 < L; a2++) TH[a2 * %d + lid] = ha[(rb + a2) * %ldL + h * %d + lid];",
       NA, NA, ldha, NA);
    KL("const int a = lid;");
    KL("const int own = a < L;");
    KL("const long tk = rb + (own ? a : 0);");
    KL("const int hasn = own && c0 + a + 1 < S;");
    KL("const long tkn = hasn ? tk + 1 : tk;");
    emit_acts(k, "", "tk", lddt, ldda, ldtr);
    emit_acts(k, "n", "tkn", lddt, ldda, ldtr);
    KL("const float gam = lam * DT;");
    KL("const float scl = gam + (hasn ? (1.0f - nlam) * nDT : 0.0f);");
    KL("if (own) { ladt[a] = Av * DT; lsc[a] = scl; }");
    KL("BARRIER();");
    KL("float cs = 0.0f;");
    KL("if (own) {");
    KL("for (int a2 = 0; a2 <= a; a2++) cs += ladt[a2];");
    KL("lcs[a] = cs;");
    KL("for (int i = 0; i < %d; i++) {", NA);
    KL("const float cq = COSF(TH[a * %d + i]), sq = SINF(TH[a * %d + i]);", NA, NA);
    KL("const float k0 = Bn[tk * %ldL + 2 * i] + Bb[h * %d + 2 * i], k1 = Bn[tk * %ldL + 2 * i + 1] + Bb[h * %d + 2 * i + 1];",
       ldb, N, ldb, N);
    KL("const float q0 = Cn[tk * %ldL + 2 * i] + Cb[h * %d + 2 * i], q1 = Cn[tk * %ldL + 2 * i + 1] + Cb[h * %d + 2 * i + 1];",
       ldc, N, ldc, N);
    KL("kr[2 * i] = k0 * cq - k1 * sq; kr[2 * i + 1] = k0 * sq + k1 * cq;");
    KL("qr[2 * i] = q0 * cq - q1 * sq; qr[2 * i + 1] = q0 * sq + q1 * cq;");
    KL("}");
    KL("for (int nn = %d; nn < %d; nn++) { kr[nn] = Bn[tk * %ldL + nn] + Bb[h * %d + nn]; qr[nn] = Cn[tk * %ldL + nn] + Cb[h * %d + nn]; }",
       2 * NA, N, ldb, N, ldc, N);
    KL("for (int nn = 0; nn < %d; nn++) X[a * %d + nn] = kr[nn];", N, N);
    KL("}");
    KL("BARRIER();");
    /* phase A (X = Kr of the chunk): inter-chunk, intra as the query, the state update, the
     * diagonal's dx */
    KL("const float eL = EXPF(FMINF(lcs[L - 1], 0.0f));");
    KL("float dcs = 0.0f, dsc = 0.0f, dgam = 0.0f, dyv0 = 0.0f, qk0 = 0.0f;");
    KL("if (own) {");
    KL("const float ea = EXPF(FMINF(cs, 0.0f));");
    KL("for (int nn = 0; nn < %d; nn++) { dqr[nn] = 0.0f; dkr[nn] = 0.0f; qk0 += qr[nn] * kr[nn]; }", N);
    KL("for (int p = 0; p < %d; p++) dyv0 += dy[tk * %ldL + h * %d + p] * x[tk * %ldL + h * %d + p];", P, lddy, P, ldx, P);
    KL("dgam = qk0 * dyv0;");
    KL("for (int p = 0; p < %d; p++) gx[tk * %ldL + h * %d + p] = (gam * qk0 + Dh) * dy[tk * %ldL + h * %d + p];",
       P, ldgx, P, lddy, P);
    KL("if (c > 0) for (int p = 0; p < %d; p++) {", P);
    KL("const float dyp = ea * dy[tk * %ldL + h * %d + p];", lddy, P);
    KL("float sq = 0.0f;");
    KL("for (int nn = 0; nn < %d; nn++) {", N);
    KL("const long e = (long)p * %d + nn;", N);
    KL("const float sc = st[(sb + e / %ldL) * %ldL + h * %ldL + e %% %ldL];", W, ldst, W, W);
    KL("sq += sc * qr[nn];");
    KL("dqr[nn] += dyp * sc;");
    KL("}");
    KL("dcs += dyp * sq;");
    KL("}");
    KL("for (int s2 = 0; s2 < a; s2++) {");
    KL("float qk = 0.0f, dyv = 0.0f;");
    KL("for (int nn = 0; nn < %d; nn++) qk += qr[nn] * X[s2 * %d + nn];", N, N);
    KL("for (int p = 0; p < %d; p++) dyv += dy[tk * %ldL + h * %d + p] * x[(rb + s2) * %ldL + h * %d + p];", P, lddy, P, ldx, P);
    KL("const float f = EXPF(FMINF(cs - lcs[s2], 0.0f)) * lsc[s2] * dyv;");
    KL("dcs += qk * f;");
    KL("for (int nn = 0; nn < %d; nn++) dqr[nn] += f * X[s2 * %d + nn];", N, N);
    KL("}");
    KL("const float wl = EXPF(FMINF(lcs[L - 1] - cs, 0.0f)) * scl;");
    KL("float vdu = 0.0f;");
    KL("for (int p = 0; p < %d; p++) {", P);
    KL("float u = 0.0f;");
    KL("for (int nn = 0; nn < %d; nn++) u += dS[p * %d + nn] * kr[nn];", N, N);
    KL("vdu += x[tk * %ldL + h * %d + p] * u;", ldx, P);
    KL("gx[tk * %ldL + h * %d + p] += wl * u;", ldgx, P);
    KL("}");
    KL("for (int nn = 0; nn < %d; nn++) {", N);
    KL("float cl = 0.0f;");
    KL("for (int p = 0; p < %d; p++) cl += dS[p * %d + nn] * x[tk * %ldL + h * %d + p];", P, N, ldx, P);
    KL("dkr[nn] += wl * cl;");
    KL("}");
    KL("dcs -= wl * vdu;");
    KL("dsc += EXPF(FMINF(lcs[L - 1] - cs, 0.0f)) * vdu;");
    KL("lT[a] = wl * vdu;");
    KL("}");
    KL("BARRIER();");
    KL("if (own) for (int nn = 0; nn < %d; nn++) X[a * %d + nn] = qr[nn];", N, N);
    KL("BARRIER();");
    /* phase B (X = Qr of the chunk): intra as the key, dcs of the last token, the diagonal,
     * rotation undo */
    KL("if (own) {");
    KL("for (int t2 = a + 1; t2 < L; t2++) {");
    KL("float qk = 0.0f, dyv = 0.0f;");
    KL("for (int nn = 0; nn < %d; nn++) qk += X[t2 * %d + nn] * kr[nn];", N, N);
    KL("for (int p = 0; p < %d; p++) dyv += dy[(rb + t2) * %ldL + h * %d + p] * x[tk * %ldL + h * %d + p];", P, lddy, P, ldx, P);
    KL("const float wd = EXPF(FMINF(lcs[t2] - cs, 0.0f));");
    KL("dcs -= qk * wd * scl * dyv;");
    KL("dsc += qk * wd * dyv;");
    KL("const float f = wd * scl * dyv, fv = qk * wd * scl;");
    KL("for (int nn = 0; nn < %d; nn++) dkr[nn] += f * X[t2 * %d + nn];", N, N);
    KL("for (int p = 0; p < %d; p++) gx[tk * %ldL + h * %d + p] += fv * dy[(rb + t2) * %ldL + h * %d + p];", P, ldgx, P, lddy, P);
    KL("}");
    KL("if (a == L - 1) {");
    KL("if (c > 0) {");
    KL("float sd = 0.0f;");
    KL("for (long e = 0; e < %ldL; e++) sd += dS[e] * st[(sb + e / %ldL) * %ldL + h * %ldL + e %% %ldL];", PN, W, ldst, W, W);
    KL("dcs += eL * sd;");
    KL("}");
    KL("for (int s2 = 0; s2 < L; s2++) dcs += lT[s2];");
    KL("}");
    /* diagonal gamma (Q.K) v in the rotated frame (rotation-invariant) */
    KL("for (int nn = 0; nn < %d; nn++) { const float q = qr[nn], kk = kr[nn]; dqr[nn] += gam * dyv0 * kk; dkr[nn] += gam * dyv0 * q; }", N);
    KL("const long hb = tk * %ldL + h * %ldL;", ldh, W2);
    KL("for (int i = 0; i < %d; i++) {", NA);
    KL("const float cq = COSF(TH[a * %d + i]), sq = SINF(TH[a * %d + i]);", NA, NA);
    KL("const int i0 = 2 * i, i1 = 2 * i + 1;");
    KL("hd[hb + i0] = cq * dkr[i0] + sq * dkr[i1];");
    KL("hd[hb + i1] = -sq * dkr[i0] + cq * dkr[i1];");
    KL("hd[hb + %d + i0] = cq * dqr[i0] + sq * dqr[i1];", N);
    KL("hd[hb + %d + i1] = -sq * dqr[i0] + cq * dqr[i1];", N);
    KL("TH[a * %d + i] = -dqr[i0] * qr[i1] + dqr[i1] * qr[i0] - dkr[i0] * kr[i1] + dkr[i1] * kr[i0];", NA);
    KL("}");
    KL("for (int nn = %d; nn < %d; nn++) { hd[hb + nn] = dkr[nn]; hd[hb + %d + nn] = dqr[nn]; }", 2 * NA, N, N);
    KL("ldcs[a] = dcs;");
    KL("ldsc[a] = dsc;");
    KL("}");
    KL("BARRIER();");
    /* phase C: dS becomes the gradient of the state entering the chunk; the angle owners run
     * the reverse cumsum of dTheta */
    KL("for (int e = lid; e < %ld; e += %d) {", PN, NT);
    KL("const int p = e / %d, nn = e %% %d;", N, N);
    KL("float acc = eL * dS[e];");
    KL("for (int a2 = 0; a2 < L; a2++) acc += EXPF(FMINF(lcs[a2], 0.0f)) * dy[(rb + a2) * %ldL + h * %d + p] * X[a2 * %d + nn];",
       lddy, P, N);
    KL("dS[e] = acc;");
    KL("}");
    KL("if (lid < %d) for (int a2 = L - 1; a2 >= 0; a2--) { Gi += TH[a2 * %d + lid]; TH[a2 * %d + lid] = Gi; }", NA, NA, NA);
    KL("BARRIER();");
    /* phase D: the scalar chain (trapezoid shift, ADT, activations) */
    KL("if (own) {");
    KL("float dADT = 0.0f;");
    KL("for (int a2 = a; a2 < L; a2++) dADT += ldcs[a2];");
    KL("float share = 0.0f;");
    KL("for (int i = 0; i < %d; i++) {", NA);
    KL("const float tn = TANHF(ang[tk * %ldL + i]), Gv = TH[a * %d + i];", ldang, NA);
    KL("share += Gv * (" M3_PI_F " * tn);");
    KL("ha[tk * %ldL + h * %d + i] = Gv * DT * " M3_PI_F " * (1.0f - tn * tn);", ldha, NA);
    KL("}");
    KL("const float ow = dgam + dsc;");
    KL("float dDT = ow * lam + Av * dADT + share, dlam = ow * DT;");
    KL("if (a > 0) { dDT += ldsc[a - 1] * (1.0f - lam); dlam -= ldsc[a - 1] * DT; }");
    KL("gddA[tk * %ldL + h] = DT * dADT * dA;", ldga);
    KL("if (a > 0 || c0 == 0) {");
    KL("gddt[tk * %ldL + h] = dDT * sg;", ldgt);
    KL("gtrap[tk * %ldL + h] = dlam * lam * (1.0f - lam);", ldgr);
    KL("} else {   /* waits for dscale of the previous chunk's last token */");
    KL("pend[(int)(c & 1) * 2] = dDT;");
    KL("pend[(int)(c & 1) * 2 + 1] = dlam;");
    KL("}");
    KL("if (a == L - 1 && hasn) {   /* finish the next chunk's first token */");
    KL("const float pd = pend[(int)((c + 1) & 1) * 2] + dsc * (1.0f - nlam);");
    KL("const float pl = pend[(int)((c + 1) & 1) * 2 + 1] - dsc * nDT;");
    KL("gddt[tkn * %ldL + h] = pd * nsg;", ldgt);
    KL("gtrap[tkn * %ldL + h] = pl * nlam * (1.0f - nlam);", ldgr);
    KL("}");
    KL("}");
    KL("}");
    kg_grid(k, 0, 0, H, 0, 0, 1);
    kg_block(k, NT, 1, 1);
    return kg_end(k);
}

/* ---------------------------------------------------------------- chunk-parallel backward
 *
 * Where the forward's chunked kernels ran, the backward follows the same shape (design §7,
 * "Backward"), all fp32, no atomics, every sum in a fixed order:
 *  (1) mamba3_scan_bwd_chunk, per (chunk c >= 1, b, h): the chunk's increment of the state
 *      gradient, sum_t exp(cs_t) dy_t Qr_t^T, formed in the chunk's local frame (keys and
 *      queries rotated by the angle accumulated inside the chunk) and turned into the absolute
 *      frame by the angle entering the chunk (the forward's `theta`); stored with the chunk's
 *      total decay in the rows of chunk c-1 (`du`).
 *  (2) mamba3_scan_bwd_walk, per (b, h): dS leaving chunk c-1 = decay_c * dS leaving c + du_c,
 *      from the last chunk to the first (`dsl`).
 *  (3) mamba3_scan_bwd_main, per (chunk, b, h): with the entering state (`saved`) and the
 *      leaving state gradient (`dsl`) turned into the local frame, every product of the chunk
 *      is differentiated at once as small matrix products in shared memory: G = dY V^T and
 *      QK = Ql Kl^T masked by the decays, then dQl, dKl, dV; the per-token sums (dcs, dscale)
 *      come from dot products of those results with their inputs (sum_s M_ts QK_ts =
 *      Ql_t . sum_s M_ts Kl_s), so no CH x CH temporary is needed for them. Writes dx, d(dd_A),
 *      the unrotated dK/dQ shares, and per token (`tk`) the in-chunk suffix of dTheta and the
 *      partial dDT/dlam.
 *  (4) mamba3_scan_bwd_fix, per (b, h): the angle gradient's carry from later chunks and the
 *      trapezoid term that crosses into the previous chunk, finishing d(dd_dt), d(trap) and
 *      the d(angles) shares.
 * A work-item (row r, lane q) of the main kernel owns row r of every CH x X product and the
 * columns q, q + TPR, ...; rows of shared tiles are padded by one float so the lanes of a
 * warp fall in different banks. */

/* threads per row of the main kernel's products */
static int bwd_tpr(int CH) { return CH <= 64 ? 4 : CH <= 128 ? 2 : 1; }

static long bwd_main_shared(m3_kdims d) {
    const long CH = d.CH, N = d.N, P = d.P;
    long mm = CH * (CH + 1);
    if (CH * (N + 1) > mm) mm = CH * (N + 1);
    long region = 2 * mm;
    if (P * (N + 1) > region) region = P * (N + 1);
    return 4L * (2 * CH * (N + 1) + 2 * CH * (P + 1) + region + CH * d.NA);
}

/* Past the device's shared memory (kgen.shared_max) the sequential backward runs instead: the
 * chunk kernel's tiles and the main kernel's (the fp32 one's, or the tensor-core one's where
 * bf16 takes it) must fit. */
static int bwd_chunked_fits(m3_kdims d, long shared_max, int tc) {
    const long small = 4L * 16 * d.CH + 4L * 3 * 256;   /* the main kernel's static arrays */
    return d.CH <= 256 && (tc || bwd_main_shared(d) + small <= shared_max) && 4L * d.CH * (d.N + d.P + d.NA) <= shared_max;
}

/* The main kernels' last steps (fp32 and tensor-core alike), with dTheta of each (token,
 * angle) in LPH, and ldcs, ldsc, lG, lQK per token in local memory behind a barrier: the
 * in-chunk suffix of dTheta, dADT (the in-chunk suffix of dcs), the partial dDT/dlam. */
static void emit_bwd_main_tail(kgen *k, int NT, int CH, int NA, long lddt, long ldda, long ldtr, long ldga, long ldtk,
                               long Wt, int shfl) {
    {
        /* a reverse inclusive scan over the chunk's rows (rows past L count as zero), all
         * work-items at once rather than one per angle walking the chunk */
        const int R = (CH * NA + NT - 1) / NT;
        KL("for (int off = 1; off < %d; off <<= 1) {", CH);
        KL("float nv[%d];", R);
        KL("for (int r = 0; r < %d; r++) {", R);
        KL("const int j = lid + r * %d, a = j / %d;", NT, NA);
        KL("float v = 0.0f;");
        KL("if (j < %d && a < L) { v = LPH[j]; if (a + off < L) v += LPH[j + off * %d]; }", CH * NA, NA);
        KL("nv[r] = v;");
        KL("}");
        KL("BARRIER();");
        KL("for (int r = 0; r < %d; r++) { const int j = lid + r * %d; if (j < %d) LPH[j] = nv[r]; }", R, NT, CH * NA);
        KL("BARRIER();");
        KL("}");
        KL("for (int j = lid; j < L * %d; j += %d) { const int a = j / %d, i = j - a * %d; tkw[(rb + a) * %ldL + h * %ld + i] = LPH[j]; }",
           NA, NT, NA, NA, ldtk, Wt);
    }
    /* dADT, the in-chunk suffix of dcs: with `shfl` (CUDA, CH <= 64, NT >= 64) by shuffles in
     * the first two warps, else a loop per work-item (the first walks the whole chunk) */
    KL("float dADT = 0.0f;");
    if (shfl) {
        KL("if (lid < 64) {");
        KL("float c = lid < L ? ldcs[lid] : 0.0f;");
        KL("for (int off = 1; off < 32; off <<= 1) { const float o = __shfl_down_sync(0xffffffffu, c, off); if ((lid & 31) + off < 32) c += o; }");
        KL("float t2 = lid < 32 && lid + 32 < L ? ldcs[lid + 32] : 0.0f;");
        KL("for (int off = 16; off > 0; off >>= 1) t2 += __shfl_xor_sync(0xffffffffu, t2, off);");
        KL("dADT = c + t2;");
        KL("}");
    }
    KL("if (lid < L) {");
    KL("const int a = lid;");
    KL("const long tk = rb + a;");
    emit_acts(k, "", "tk", lddt, ldda, ldtr);
    if (!shfl) KL("for (int a2 = a; a2 < L; a2++) dADT += ldcs[a2];");
    KL("const float ow = lQK[a] * lG[a] + ldsc[a];");
    KL("float pdt = ow * lam + Av * dADT, plam = ow * DT;");
    KL("if (a > 0) { pdt += ldsc[a - 1] * (1.0f - lam); plam -= ldsc[a - 1] * DT; }");
    KL("gddA[tk * %ldL + h] = DT * dADT * dA;", ldga);
    KL("tkw[tk * %ldL + h * %ld + %d] = pdt;", ldtk, Wt, NA);
    KL("tkw[tk * %ldL + h * %ld + %d] = plam;", ldtk, Wt, NA + 1);
    KL("tkw[tk * %ldL + h * %ld + %d] = ldsc[a];", ldtk, Wt, NA + 2);
    KL("tkw[tk * %ldL + h * %ld + %d] = lG[a];", ldtk, Wt, NA + 3);
    KL("}");
}

/* Whether the backward's main kernel runs on tensor cores (bf16 plans): fragments of at most
 * 128 rows, columns and contraction, its shared memory within the device. */
static long bwd_tc_slot(m3_kdims d) { return m3_up16(d.P) * kg_tc_ws(m3_up16(d.N)); }

static long bwd_tc_shared(m3_kdims d) {
    const long CHP = m3_up16(d.CH), NK = m3_up16(d.N), PK = m3_up16(d.P);
    const long dyn = 4L * (2 * CHP * kg_tc_ws(NK) + 2 * CHP * kg_tc_ws(PK) + bwd_tc_slot(d) + (long)d.CH * d.NA);
    const long stat = 4L * (12L * d.CH + 2L * d.NA + 2 * CHP + 1);
    return dyn + stat;
}

/* Whether the bwd main kernel stages dS_out (P x N fp32) in shared memory with cp.async at its
 * start: 16-byte pieces of the state (its width, row stride and arena offset multiples of 4
 * floats), the copy within the device next to the kernel's other shared memory. */
static int bwd_stage_dsl(const kgen *k, const ir_node *n, m3_kdims d) {
    const int t = n->out[BOUT_DSL];
    const long max = k->shared_max > 0 ? k->shared_max : 160L * 1024;
    return d.W % 4 == 0 && ((long)d.P * d.N) % 4 == 0 && kg_ld(k, t) % 4 == 0 && k->g->t[t].offset % 4 == 0 &&
           bwd_tc_shared(d) + 4L * d.P * d.N <= max;
}

static int bwd_tc(const kgen *k, m3_kdims d) {
    const long max = k->shared_max > 0 ? k->shared_max : 160L * 1024;
    return k->bf16 && m3_up16(d.CH) <= 128 && m3_up16(d.N) <= 128 && m3_up16(d.P) <= 128 && bwd_tc_shared(d) <= max;
}

/* One half of the backward main kernel's last step for the thread's token t (row r): g = acc +
 * gg X_t (acc dQl with X = Kl, or dKl with X = Ql) rotated back pair by pair into the dQ
 * (hoff = N) or dK (hoff = 0) share of `hd`, and the pair's share of dTheta from its own
 * rotated row (`own`): kept in thq by the first half (dQ, written early), added to it and
 * stored into LPH by the second. Expects t, r, gg, tq and the tiles in scope. */
static void emit_unrotate_half(kgen *k, const char *acc, const char *xe, int hoff, const char *own, int second, long wsN,
                               long NO, int N, int NA, int JQ, long ldh) {
    KL("    const long hb = (rb + t) * %ldL + h * %d;", ldh, 2 * N);
    KL("    #pragma unroll");
    KL("    for (int j = 0; j < %ld; j++) {", NO);
    KL("        const int i = 4 * j + tq, n0 = 2 * i;");
    KL("        if (n0 >= %d) continue;", N);
    KL("        float g[2];");
    KL("        for (int e2 = 0; e2 < 2; e2++) g[e2] = %s[j][2 * r + e2] + gg * %s;", acc, xe);
    KL("        if (j < %d && i < %d) {", JQ, NA);
    KL("            float cq, sq;");
    KL("            sincos_wrapped(LPH[t * %d + i], &sq, &cq);", NA);
    KL("            hd[hb + %d + n0] = cq * g[0] + sq * g[1]; hd[hb + %d + n0 + 1] = -sq * g[0] + cq * g[1];", hoff, hoff);
    KL("            const unsigned ow = %s[t * %ld + i];", own, wsN);
    if (second)
        KL("            LPH[t * %d + i] = thq[r][j < %d ? j : 0] - g[0] * __uint_as_float(ow & 0xffff0000u) + g[1] * __uint_as_float(ow << 16);",
           NA, JQ);
    else KL("            thq[r][j < %d ? j : 0] = -g[0] * __uint_as_float(ow & 0xffff0000u) + g[1] * __uint_as_float(ow << 16);", JQ);
    KL("        } else {");
    KL("            hd[hb + %d + n0] = g[0];", hoff);
    if (N % 2) KL("            if (n0 + 1 < %d) hd[hb + %d + n0 + 1] = g[1];", N, hoff);
    else KL("            hd[hb + %d + n0 + 1] = g[1];", hoff);
    KL("        }");
    KL("    }");
}

/* mamba3_scan_bwd_main_tc: the main kernel of the chunk-parallel backward (see the comment
 * above emit_bwd_chunked for what it computes) with every product on tensor cores. A
 * work-group of CHP/16 warps per (chunk, b, h); warp w owns the tokens 16w..16w+15 as the rows
 * of every product, so the gradients of its tokens, dQl, dKl (NK/8 n-tiles) and dV (PK/8), stay
 * in its registers, a rotation pair (2i, 2i+1) in one thread. Shared: row tiles of Ql, Kl, dY,
 * V ([token][pair]) and one slot R0 of a state in the local frame ([p][n pair]); every
 * fragment is read with ldmatrix, and a product that needs a tile's transpose reads the tile
 * with ldmatrix.trans, so no transposed copy is made (kg_tc_mma):
 *  (1) R0 = S_in R, loaded with the fp32 dot <dS_out, S_in> on the way: dQl = e_t dY (S_in R)
 *      (contraction P, R0 transposed); the row dot with Ql gives the inter-chunk share of dcs.
 *  (2) rows t: G = dY V^T and QK = Ql Kl^T (only s <= t), masked into MA_ts = decay lsc_s G_ts
 *      (s < t); sum_s MA_ts QK_ts is the row term of dcs; the diagonals G_tt, QK_tt go to
 *      shared; dQl += MA Kl with MA repacked as A fragments (k-steps of s <= t).
 *  (3) R0 = dS_out R: dV = wl dS Kl (contraction N), dKl = wl dS^T V (contraction P, R0
 *      transposed); the row dot of the first with V is lvdu.
 *  (4) rows s: G^T = V dY^T and QK^T = Kl Ql^T (only t >= s), masked into MA^T, and lsc_s
 *      decay QK^T (the scale folded in before rounding); sum_t decay G^T QK^T is dscale's share
 *      (and, times lsc_s, the column term of dcs); dKl += MA^T Ql, dV += (lsc MB)^T dY (k-steps
 *      of t >= s; Ql, dY transposed).
 * Against two slots with transposed copies made by the work-group (R1 = Kl^T, Ql^T, dY^T, and
 * dS_out loaded a second time as columns): three copies, three barriers, a second pass over
 * dS_out and over S_in (for the dot) fewer, a sixth of the code, and ldmatrix reads four words
 * where a plain load read one. H100, realm-9m 8 x 8192: this kernel 15.95 -> 12.73 ms a step.
 * Then in registers: the diagonal (gamma_t Q_t.K_t + D) v_t terms (D dy in fp32 from global),
 * dx written, and the rotation undone pair by pair with dTheta into LPH; the per-token chain
 * is the fp32 kernel's. Products whose result is masked (s > t) are skipped per warp. */
static int emit_bwd_main_tc(kgen *k, const ir_node *n, int node, m3_kdims d) {
    const int H = d.H, P = d.P, N = d.N, NA = d.NA, CH = d.CH;
    const long W = d.W, W2 = m3_theta_width(NA, CH), Wt = NA + 4;
    const int CHP = (int)m3_up16(CH), NK = (int)m3_up16(N), PK = (int)m3_up16(P), NT = 2 * CHP;
    const long wsN = kg_tc_ws(NK), wsP = kg_tc_ws(PK), NO = NK / 8, PO = PK / 8, CO = CHP / 8;
    /* the n-tiles that hold rotated pairs: angle i = 4j + tq < NA */
    const int JQ = (NA + 3) / 4 < (int)NO ? (NA + 3) / 4 : (int)NO;
    const long ldx = kg_ld(k, n->in[IN_X]), ldb = kg_ld(k, n->in[IN_BN]), ldc = kg_ld(k, n->in[IN_CN]),
               lddt = kg_ld(k, n->in[IN_DDT]), ldda = kg_ld(k, n->in[IN_DDA]), ldtr = kg_ld(k, n->in[IN_TRAP]),
               ldang = kg_ld(k, n->in[IN_ANG]), ldst = kg_ld(k, n->in[BIN_ST]), lddy = kg_ld(k, n->in[BIN_DY]),
               ldth = kg_ld(k, n->in[BIN_TH]), ldgx = kg_ld(k, n->out[IN_X]), ldga = kg_ld(k, n->out[IN_DDA]),
               ldh = kg_ld(k, n->out[BOUT_HEAD]), lddsl = kg_ld(k, n->out[BOUT_DSL]), ldtk = kg_ld(k, n->out[BOUT_TK]);
    char e1[400], e2[400];
    kg_begin(k, "mamba3_scan_bwd_main_tc", node, node + 1);
    /* 3 work-groups of 4 warps per multiprocessor rather than the 2 that 237 registers allow:
     * the kernel waits on memory between its phases, and the third group hides more of it than
     * the 192 bytes of spills cost (H200, realm-9m 8x8192: 22.8 -> 17.9 ms per step) */
    if (NT <= 128) kg_min_blocks(k, 3);
    args_common(k, n);
    kg_in(k, "Dp", n->in[IN_D]);
    kg_in(k, "st", n->in[BIN_ST]);
    kg_in(k, "dy", n->in[BIN_DY]);
    kg_in(k, "th", n->in[BIN_TH]);
    kg_in(k, "dsl", n->out[BOUT_DSL]);
    kg_out(k, "gx", n->out[IN_X]);
    kg_out(k, "gddA", n->out[IN_DDA]);
    kg_out(k, "hd", n->out[BOUT_HEAD]);
    kg_out(k, "tkw", n->out[BOUT_TK]);
    KL("const long c0 = GID_X * %d, bh = GID_Y, b = bh / %d;", CH, H);
    KL("const int h = (int)(bh - b * %d), lid = LID_X;", H);
    KL("const long rb = b * S + c0, sb = rb - %d;", CH);
    KL("const int L = (int)(S - c0 < %d ? S - c0 : %d);", CH, CH);
    KL("const int last = c0 + %d >= S;   /* nothing leaves the last chunk */", CH);
    KL("LOCAL float ldt[%d], ladt[%d], lsc[%d], lgm[%d], lcs[%d], tc[%d], ts[%d];", CH, CH, CH, CH, CH, NA, NA);
    KL("LOCAL float ldcs[%d], ldsc[%d], lvdu[%d], lG[%d], lQK[%d], lrd[%d], lsv[%d], red[%d], lsd[1];", CH, CH, CH, CH, CH,
       CH, CH, NT);
    kg_shared(k, "shQ", (long)CHP * wsN);
    kg_shared(k, "shK", (long)CHP * wsN);
    kg_shared(k, "shY", (long)CHP * wsP);
    kg_shared(k, "shV", (long)CHP * wsP);
    kg_shared(k, "sh0", bwd_tc_slot(d));
    kg_shared(k, "LPH", (long)CH * NA);
    KL("unsigned *Qs = (unsigned *)shQ, *Ks = (unsigned *)shK, *Ys = (unsigned *)shY, *Vs = (unsigned *)shV;");
    KL("unsigned *R0 = (unsigned *)sh0;");
    /* dS_out is needed only after the tile loads (the dot product, then phase 3): copied into
     * shared memory by cp.async from the start, its global latency hides behind everything
     * before, and neither use waits on global loads of its own */
    const int stage = bwd_stage_dsl(k, n, d);
    if (stage) {
        char ad[200];
        kg_shared(k, "shD", (long)P * N);
        kl_spread(ad, sizeof ad, "rb", "e", W, lddsl);
        KL("if (!last)");
        KL("    for (int c = lid; c < %ld; c += %d) { const long e = 4L * c; cp_async16(shD + e, dsl + %s, 16); }",
           (long)P * N / 4, NT, ad);
        KL("cp_async_commit();");
    }
    KL("const float dtbh = dtb[h], Dh = Dp[h];");
    emit_chunk_scalars(k, NT, CH, NA, lddt, ldda, ldtr, ldang);
    emit_entering_angle(k, NT, NA, W2, ldth, 0);
    if (stage) KL("cp_async_wait(0);");
    KL("BARRIER();");
    emit_tc_kq_rows(k, NT, CHP, N, NA, "Ks", "Qs", ldb, ldc, m3_kq_pairs(k, n, N));
    emit_tc_tok_rows(k, NT, CHP, P, PK, "Ys", "dy", lddy, m3_pairs(k, n->in[BIN_DY], P), NULL);
    emit_tc_tok_rows(k, NT, CHP, P, PK, "Vs", "x", ldx, m3_pairs(k, n->in[IN_X], P), NULL);
    /* R0 = S_in R (rows p), and on the way <dS_out, S_in> (both absolute, no rotation) */
    {
        const m3_dot dot = {stage ? "shD" : "dsl", stage ? NULL : "rb", "!last", lddsl};
        const int pair = N % 2 == 0 && m3_pairs(k, n->in[BIN_ST], (int)W) && (stage || m3_pairs(k, n->out[BOUT_DSL], (int)W));
        KL("float sd = 0.0f;");
        emit_tc_state_rows(k, NT, P, PK, N, NA, "R0", "st", W, ldst, "sb", "c0 > 0", pair, &dot);
        KL("red[lid] = sd;");
    }
    KL("BARRIER();");
    KL("if (lid == 0) { float s = 0.0f; for (int q = 0; q < %d; q++) s += red[q]; lsd[0] = s; }", NT);
    kg_tc_prologue(k);
    KL("const int tr = warp * 16 + gq;   /* this thread's tokens: tr, tr + 8 */");
    kg_tc_afrag(k, PK, "yf", "Ys");
    kg_tc_afrag(k, NK, "qf", "Qs");
    /* (1) inter-chunk: dQl = e_t dY Xs */
    kg_tc_zero(k, "dq", NO);
    kg_tc_mma(k, "dq", "yf[kk]", NULL, 0, "R0", wsN, 1, NO, PK / 16, NULL, NULL);
    tc_elem(e1, sizeof e1, "Qs", wsN, "tr + 8 * (e >> 1)", "e & 1");
    KL("{");
    KL("float zr[2] = {0.0f, 0.0f};");
    KL("#pragma unroll");
    KL("for (int j = 0; j < %ld; j++)", NO);
    KL("    for (int e = 0; e < 4; e++) zr[e >> 1] += dq[j][e] * %s;", e1);
    emit_quad_sum(k, "zr");
    KL("float et[2];");
    KL("for (int r = 0; r < 2; r++) {");
    KL("    const int t = tr + 8 * r;");
    KL("    et[r] = t < L ? exp_sfu(FMINF(lcs[t], 0.0f)) : 0.0f;");
    KL("    if (tq == 0 && t < L) ldcs[t] = et[r] * zr[r];");
    KL("}");
    KL("#pragma unroll");
    KL("for (int j = 0; j < %ld; j++)", NO);
    KL("    for (int e = 0; e < 4; e++) dq[j][e] *= et[e >> 1];");
    KL("}");
    /* (2) rows t: G, QK, MA; dQl += MA Kl */
    KL("{");
    kg_tc_zero(k, "ga", CO);
    kg_tc_zero(k, "qa", CO);
    kg_tc_mma(k, "ga", "yf[kk]", NULL, 0, "Vs", wsP, 0, CO, PK / 16, NULL, "j < 2 * warp + 2");
    kg_tc_mma(k, "qa", "qf[kk]", NULL, 0, "Ks", wsN, 0, CO, NK / 16, NULL, "j < 2 * warp + 2");
    KL("float zr[2] = {0.0f, 0.0f};");
    KL("#pragma unroll");
    KL("for (int j = 0; j < %ld; j++)", CO);
    KL("    for (int e = 0; e < 4; e++) {");
    KL("        const int t = tr + 8 * (e >> 1), s2 = 8 * j + 2 * tq + (e & 1);");
    KL("        float ma = 0.0f;");
    KL("        if (t < L) {");
    KL("            if (s2 < t) { ma = exp_sfu(FMINF(lcs[t] - lcs[s2], 0.0f)) * lsc[s2] * ga[j][e]; zr[e >> 1] += ma * qa[j][e]; }");
    KL("            else if (s2 == t) { lG[t] = ga[j][e]; lQK[t] = qa[j][e]; }");
    KL("        }");
    KL("        ga[j][e] = ma;");
    KL("    }");
    emit_quad_sum(k, "zr");
    KL("for (int r = 0; r < 2; r++) if (tq == 0 && tr + 8 * r < L) lrd[tr + 8 * r] = zr[r];");
    kg_tc_repack(k, "mf", "ga", CHP / 16);
    kg_tc_mma(k, "dq", "mf[kk]", NULL, 0, "Ks", wsN, 1, NO, CHP / 16, "kk <= warp", NULL);
    KL("}");
    KL("BARRIER();   /* done with R0 */");
    /* dQl is final here: its share of the outputs (the unrotated dQ, the query half of dTheta)
     * is written now rather than at the end, so its registers are free for the state update */
    tc_elem(e1, sizeof e1, "Ks", wsN, "t", "e2");
    KL("float thq[2][%d];   /* the query half of dTheta of (token tr + 8r, angle 4j + tq) */", JQ);
    KL("#pragma unroll");
    KL("for (int r = 0; r < 2; r++) {");
    KL("    const int t = tr + 8 * r;");
    KL("    if (t >= L) continue;");
    KL("    const float gg = lgm[t] * lG[t];");
    emit_unrotate_half(k, "dq", e1, N, "Qs", 0, wsN, NO, N, NA, JQ, ldh);
    KL("}");
    /* (3) the state update: dV = wl dS Kl, dKl = wl dS^T V */
    if (stage) emit_tc_state_rows(k, NT, P, PK, N, NA, "R0", "shD", W, 0, NULL, "!last", N % 2 == 0, NULL);
    else
        emit_tc_state_rows(k, NT, P, PK, N, NA, "R0", "dsl", W, lddsl, "rb", "!last",
                           N % 2 == 0 && m3_pairs(k, n->out[BOUT_DSL], (int)W), NULL);
    KL("BARRIER();");
    kg_tc_zero(k, "dv", PO);
    kg_tc_mma(k, "dv", NULL, "Ks", wsN, "R0", wsN, 0, PO, NK / 16, NULL, NULL);
    kg_tc_zero(k, "dk", NO);
    kg_tc_mma(k, "dk", NULL, "Vs", wsP, "R0", wsN, 1, NO, PK / 16, NULL, NULL);
    tc_elem(e1, sizeof e1, "Vs", wsP, "tr + 8 * (e >> 1)", "e & 1");
    KL("{");
    KL("float zr[2] = {0.0f, 0.0f};");
    KL("#pragma unroll");
    KL("for (int j = 0; j < %ld; j++)", PO);
    KL("    for (int e = 0; e < 4; e++) zr[e >> 1] += dv[j][e] * %s;", e1);
    emit_quad_sum(k, "zr");
    KL("float wl[2];");
    KL("for (int r = 0; r < 2; r++) {");
    KL("    const int t = tr + 8 * r;");
    KL("    wl[r] = t < L ? exp_sfu(FMINF(lcs[L - 1] - lcs[t], 0.0f)) * lsc[t] : 0.0f;");
    KL("    if (tq == 0 && t < L) lvdu[t] = zr[r];");
    KL("}");
    KL("#pragma unroll");
    KL("for (int j = 0; j < %ld; j++)", PO);
    KL("    for (int e = 0; e < 4; e++) dv[j][e] *= wl[e >> 1];");
    KL("#pragma unroll");
    KL("for (int j = 0; j < %ld; j++)", NO);
    KL("    for (int e = 0; e < 4; e++) dk[j][e] *= wl[e >> 1];");
    KL("}");
    /* (4) rows s: G^T, QK^T; dKl += MA^T Ql, dV += (lsc MB)^T dY */
    KL("{");
    kg_tc_zero(k, "ga", CO);
    kg_tc_zero(k, "qa", CO);
    kg_tc_mma(k, "ga", NULL, "Vs", wsP, "Ys", wsP, 0, CO, PK / 16, NULL, "j >= 2 * warp");
    kg_tc_mma(k, "qa", NULL, "Ks", wsN, "Qs", wsN, 0, CO, NK / 16, NULL, "j >= 2 * warp");
    KL("float zr[2] = {0.0f, 0.0f};");
    KL("#pragma unroll");
    KL("for (int j = 0; j < %ld; j++)", CO);
    KL("    for (int e = 0; e < 4; e++) {");
    KL("        const int s2 = tr + 8 * (e >> 1), t = 8 * j + 2 * tq + (e & 1);");
    KL("        float a = 0.0f, m = 0.0f;");
    KL("        if (t < L && s2 < t) {");
    KL("            const float wd = exp_sfu(FMINF(lcs[t] - lcs[s2], 0.0f));");
    KL("            zr[e >> 1] += wd * ga[j][e] * qa[j][e];");
    KL("            a = wd * lsc[s2] * ga[j][e];");
    KL("            m = wd * lsc[s2] * qa[j][e];");
    KL("        }");
    KL("        ga[j][e] = a;");
    KL("        qa[j][e] = m;");
    KL("    }");
    emit_quad_sum(k, "zr");
    KL("for (int r = 0; r < 2; r++) if (tq == 0 && tr + 8 * r < L) lsv[tr + 8 * r] = zr[r];");
    kg_tc_repack(k, "af", "ga", CHP / 16);
    kg_tc_repack(k, "bf", "qa", CHP / 16);
    kg_tc_mma(k, "dk", "af[kk]", NULL, 0, "Qs", wsN, 1, NO, CHP / 16, "kk >= warp", NULL);
    kg_tc_mma(k, "dv", "bf[kk]", NULL, 0, "Ys", wsP, 1, PO, CHP / 16, "kk >= warp", NULL);
    KL("}");
    /* dy of the thread's outputs for the fp32 diagonal term D dy, all the thread's loads issued at
     * once before the per-token sums, which cover their latency. Loaded where they were used
     * (per row, after the key half's unrotation) the kernel waited on them for 12% of its
     * samples (Nsight Compute, H100); loaded before the unrotation and used after it they
     * stay live across its SINF/COSF calls and spill. H100, realm-9m 8 x 8192: 18.17 -> 17.11
     * ms per step. */
    KL("BARRIER();   /* lG, lQK, lrd, lsv, lvdu, ldcs complete */");
    emit_tc_token_loads(k, "dyv", "dy", lddy, P, PO);
    /* per token: dcs and dscale (read after the next barrier) */
    /* the last token's sum over the chunk by the warp that holds it (one work-item walking the
     * chunk held the whole work-group at the next barrier) */
    KL("float lsum = 0.0f;");
    KL("if ((lid >> 5) == ((L - 1) >> 5)) {");
    KL("for (int s2 = lid & 31; s2 < L; s2 += 32) lsum += exp_sfu(FMINF(lcs[L - 1] - lcs[s2], 0.0f)) * lsc[s2] * lvdu[s2];");
    KL("for (int off = 16; off > 0; off >>= 1) lsum += __shfl_xor_sync(0xffffffffu, lsum, off);");
    KL("}");
    KL("if (lid < L) {");
    KL("const int a = lid;");
    KL("const float dl = exp_sfu(FMINF(lcs[L - 1] - lcs[a], 0.0f));");
    KL("float dc = ldcs[a] + lrd[a] - lsc[a] * lsv[a] - dl * lsc[a] * lvdu[a];");
    KL("if (a == L - 1) dc += exp_sfu(FMINF(lcs[L - 1], 0.0f)) * lsd[0] + lsum;");
    KL("ldcs[a] = dc;");
    KL("ldsc[a] = lsv[a] + dl * lvdu[a];");
    KL("}");
    /* the diagonal (gamma_t Q_t.K_t + D) dy_t and dx */
    emit_tc_token_stores(k, "gx", ldgx, P, PK, PO, "dv", "lgm[t] * lQK[t] + Dh", "dyv");
    /* the rotation of the key half undone in registers */
    tc_elem(e2, sizeof e2, "Qs", wsN, "t", "e2");
    KL("#pragma unroll");
    KL("for (int r = 0; r < 2; r++) {");
    KL("    const int t = tr + 8 * r;");
    KL("    if (t >= L) continue;");
    KL("    const float gg = lgm[t] * lG[t];");
    emit_unrotate_half(k, "dk", e2, 0, "Ks", 1, wsN, NO, N, NA, JQ, ldh);
    KL("}");
    KL("BARRIER();");
    emit_bwd_main_tail(k, NT, CH, NA, lddt, ldda, ldtr, ldga, ldtk, Wt, CH <= 64 && NT >= 64);
    kg_grid(k, 0, 0, 0, 1, 0, CH);
    kg_grid(k, 1, 0, H, 0, 0, 1);
    kg_block(k, NT, 1, 1);
    return kg_end(k);
}

static int emit_bwd_chunked(kgen *k, const ir_node *n, int node, m3_kdims d) {
    const int H = d.H, P = d.P, N = d.N, NA = d.NA, CH = d.CH, NH = (N + 1) / 2;
    const long W = d.W, PN = (long)P * N, Wd = m3_bwd_width(P, N, CH), W2 = m3_theta_width(NA, CH), Wt = NA + 4;
    const long ldx = kg_ld(k, n->in[IN_X]), ldb = kg_ld(k, n->in[IN_BN]), ldc = kg_ld(k, n->in[IN_CN]),
               lddt = kg_ld(k, n->in[IN_DDT]), ldda = kg_ld(k, n->in[IN_DDA]), ldtr = kg_ld(k, n->in[IN_TRAP]),
               ldang = kg_ld(k, n->in[IN_ANG]), ldst = kg_ld(k, n->in[BIN_ST]), lddy = kg_ld(k, n->in[BIN_DY]),
               ldth = kg_ld(k, n->in[BIN_TH]), ldgx = kg_ld(k, n->out[IN_X]), ldgt = kg_ld(k, n->out[IN_DDT]),
               ldga = kg_ld(k, n->out[IN_DDA]), ldgr = kg_ld(k, n->out[IN_TRAP]), ldh = kg_ld(k, n->out[BOUT_HEAD]),
               ldha = kg_ld(k, n->out[BOUT_HANG]), lddu = kg_ld(k, n->out[BOUT_DU]),
               lddsl = kg_ld(k, n->out[BOUT_DSL]), ldtk = kg_ld(k, n->out[BOUT_TK]);
    char a0[200], a1[200], a2[200], a3[200];

    /* ---- (1) per-chunk increments of the state gradient */
    if (chunk_tc(k, d)) {
        if (emit_chunk_tc(k, n, node, d, 1) < 0) return -1;
    } else {
        const int NT = 256;
        kg_begin(k, "mamba3_scan_bwd_chunk", node, node + 1);
        args_common(k, n);
        kg_in(k, "dy", n->in[BIN_DY]);
        kg_in(k, "th", n->in[BIN_TH]);
        kg_out(k, "du", n->out[BOUT_DU]);
        KL("const long c0 = GID_X * %d, bh = GID_Y, b = bh / %d;", CH, H);
        KL("const int h = (int)(bh - b * %d), lid = LID_X;", H);
        KL("const long rb = b * S + c0, sb = rb - %d;", CH);
        KL("const int L = (int)(S - c0 < %d ? S - c0 : %d);", CH, CH);
        KL("LOCAL float ldt[%d], ladt[%d], lsc[%d], lgm[%d], lcs[%d], tc[%d], ts[%d];", CH, CH, CH, CH, CH, NA, NA);
        kg_shared(k, "LPH", (long)CH * NA);
        kg_shared(k, "QL", (long)CH * N);
        kg_shared(k, "EY", (long)CH * P);
        KL("const float dtbh = dtb[h];");
        emit_chunk_scalars(k, NT, CH, NA, lddt, ldda, ldtr, ldang);
        emit_entering_angle(k, NT, NA, W2, ldth, 0);
        KL("BARRIER();");
        KL("for (int j = lid; j < %d; j += %d) {", CH * N, NT);
        KL("const int a = j / %d, nn = j - a * %d;", N, N);
        KL("if (a < L) {");
        emit_rot_load(k, "QL[j]", "Cn", "Cb", ldc, N, NA);
        KL("} else QL[j] = 0.0f;");
        KL("}");
        KL("for (int j = lid; j < %d; j += %d) {", CH * P, NT);
        KL("const int a = j / %d, p = j - a * %d;", P, P);
        KL("EY[j] = a < L ? EXPF(FMINF(lcs[a], 0.0f)) * dy[(rb + a) * %ldL + h * %d + p] : 0.0f;", lddy, P);
        KL("}");
        KL("BARRIER();");
        /* chunk 0's increment is the gradient of the zero initial state: not needed; its
         * work-group clears the last chunk's rows instead (nothing leaves the last chunk) */
        kl_spread(a0, sizeof a0, "sb", "e0", Wd, lddu);
        kl_spread(a1, sizeof a1, "sb", "e0 + 1", Wd, lddu);
        KL("if (c0 > 0) {");
        KL("for (int q = lid; q < %d; q += %d) {", P * NH, NT);
        KL("const int p = q / %d, j = q - p * %d;", NH, NH);
        KL("const long e0 = (long)p * %d + 2 * j;", N);
        KL("float u0 = 0.0f, u1 = 0.0f;");
        KL("const int j1 = 2 * j + 1 < %d ? 2 * j + 1 : 2 * j;", N);
        KL("for (int a = 0; a < L; a++) { const float e = EY[a * %d + p]; u0 += e * QL[a * %d + 2 * j]; u1 += e * QL[a * %d + j1]; }",
           P, N, N);
        KL("if (j < %d) { const float r0 = u0 * tc[j] - u1 * ts[j], r1 = u0 * ts[j] + u1 * tc[j]; u0 = r0; u1 = r1; }", NA);
        KL("du[%s] = u0;", a0);
        KL("if (2 * j + 1 < %d) du[%s] = u1;", N, a1);
        KL("}");
        kl_spread(a0, sizeof a0, "sb", "e", Wd, lddu);
        KL("for (long e = %ldL + lid; e < %ldL; e += %d) du[%s] = e == %ldL ? EXPF(FMINF(lcs[L - 1], 0.0f)) : 0.0f;",
           PN, (long)CH * Wd, NT, a0, PN);
        KL("} else {");
        KL("const long nch = (S + %d) / %d;", CH - 1, CH);
        KL("const long lb = b * S + (nch - 1) * %d, LL = S - (nch - 1) * %d;", CH, CH);
        kl_spread(a0, sizeof a0, "lb", "e", Wd, lddu);
        KL("for (long e = lid; e < LL * %ldL; e += %d) du[%s] = 0.0f;", Wd, NT, a0);
        KL("}");
        kg_grid(k, 0, 0, 0, 1, 0, CH);
        kg_grid(k, 1, 0, H, 0, 0, 1);
        kg_block(k, NT, 1, 1);
        if (kg_end(k) < 0) return -1;
    }

    /* ---- (2) the walk: gradients of the states leaving each chunk. The P x N elements are
     * independent chains, split over SL work-groups per (b, h) so more than B*H SMs wait on
     * the chunk-by-chunk loads. */
    {
        const int NT = 256, SL = PN >= 8L * NT ? 8 : 1;
        const long ES = (PN + SL - 1) / SL;
        const int RQ = (int)((ES + NT - 1) / NT);
        kg_begin(k, "mamba3_scan_bwd_walk", node, node + 1);
        kg_in(k, "du", n->out[BOUT_DU]);
        kg_out(k, "dsl", n->out[BOUT_DSL]);
        KL("const long b = GID_X / %d;", H);
        KL("const int h = (int)(GID_X - b * %d), lid = LID_X;", H);
        KL("const long e0 = GID_Y * %ldL, e1 = e0 + %ldL < %ldL ? e0 + %ldL : %ldL;", ES, ES, PN, ES, PN);
        KL("const long nch = (S + %d) / %d;", CH - 1, CH);
        KL("float R[%d];", RQ);
        KL("for (int r = 0; r < %d; r++) R[r] = 0.0f;", RQ);
        /* a batch of WU chunks' loads first: the stores to dsl could alias them (one arena) */
        const int WU = 8;
        KL("for (long cb = nch - 1; cb >= 1; cb -= %d) {", WU);
        KL("float vd[%d], vu[%d][%d];", WU, WU, RQ);
        KL("for (int u = 0; u < %d; u++) {", WU);
        KL("const long c = cb - u;");
        KL("vd[u] = 1.0f;");
        KL("for (int r = 0; r < %d; r++) vu[u][r] = 0.0f;", RQ);
        KL("if (c < 1) continue;");
        KL("const long sb = b * S + (c - 1) * %d;", CH);
        snprintf(a0, sizeof a0, "((sb) + %ldL / %ldL) * %ldL + h * %ldL + %ldL %% %ldL", PN, Wd, lddu, Wd, PN, Wd);
        KL("vd[u] = du[%s];", a0);
        kl_spread(a0, sizeof a0, "sb", "e", Wd, lddu);
        KL("for (int r = 0; r < %d; r++) {", RQ);
        KL("const long e = e0 + lid + (long)r * %d;", NT);
        KL("if (e < e1) vu[u][r] = du[%s];", a0);
        KL("}");
        KL("}");
        KL("for (int u = 0; u < %d && cb - u >= 1; u++) {", WU);
        KL("const long sb = b * S + (cb - u - 1) * %d;", CH);
        kl_spread(a1, sizeof a1, "sb", "e", W, lddsl);
        KL("for (int r = 0; r < %d; r++) {", RQ);
        KL("const long e = e0 + lid + (long)r * %d;", NT);
        KL("if (e < e1) { R[r] = vd[u] * R[r] + vu[u][r]; dsl[%s] = R[r]; }", a1);
        KL("}");
        KL("if (GID_Y == %d) for (long e = %ldL + lid; e < %ldL; e += %d) dsl[%s] = 0.0f;", SL - 1, PN, (long)CH * W, NT, a1);
        KL("}");
        KL("}");
        KL("if (GID_Y == 0) {");
        KL("const long lb = b * S + (nch - 1) * %d, LL = S - (nch - 1) * %d;", CH, CH);
        kl_spread(a1, sizeof a1, "lb", "e", W, lddsl);
        KL("for (long e = lid; e < LL * %ldL; e += %d) dsl[%s] = 0.0f;", W, NT, a1);
        KL("}");
        kg_grid(k, 0, 0, H, 0, 0, 1);
        kg_grid(k, 1, SL, 0, 0, 0, 1);
        kg_block(k, NT, 1, 1);
        if (kg_end(k) < 0) return -1;
    }

    /* ---- (3) the chunk's products */
    if (bwd_tc(k, d)) {
        if (emit_bwd_main_tc(k, n, node, d) < 0) return -1;
    } else {
        const int TPR = bwd_tpr(CH), NT = CH * TPR;
        const int CN = (N + TPR - 1) / TPR, CP = (P + TPR - 1) / TPR, CC = (CH + TPR - 1) / TPR;
        const int N1 = N + 1, P1 = P + 1, C1 = CH + 1;
        long mm = (long)CH * C1;
        if ((long)CH * N1 > mm) mm = (long)CH * N1;
        long region = 2 * mm;
        if ((long)P * N1 > region) region = (long)P * N1;
        kg_begin(k, "mamba3_scan_bwd_main", node, node + 1);
        args_common(k, n);
        kg_in(k, "Dp", n->in[IN_D]);
        kg_in(k, "st", n->in[BIN_ST]);
        kg_in(k, "dy", n->in[BIN_DY]);
        kg_in(k, "th", n->in[BIN_TH]);
        kg_in(k, "dsl", n->out[BOUT_DSL]);
        kg_out(k, "gx", n->out[IN_X]);
        kg_out(k, "gddA", n->out[IN_DDA]);
        kg_out(k, "hd", n->out[BOUT_HEAD]);
        kg_out(k, "tkw", n->out[BOUT_TK]);
        KL("const long c0 = GID_X * %d, bh = GID_Y, b = bh / %d;", CH, H);
        KL("const int h = (int)(bh - b * %d), lid = LID_X;", H);
        KL("const int tr = lid / %d, tq = lid - tr * %d;   /* product row, column lane */", TPR, TPR);
        KL("const long rb = b * S + c0, sb = rb - %d;", CH);
        KL("const int L = (int)(S - c0 < %d ? S - c0 : %d);", CH, CH);
        KL("const int last = c0 + %d >= S;   /* nothing leaves the last chunk */", CH);
        KL("LOCAL float ldt[%d], ladt[%d], lsc[%d], lgm[%d], lcs[%d], tc[%d], ts[%d];", CH, CH, CH, CH, CH, NA, NA);
        KL("LOCAL float ldcs[%d], ldsc[%d], lvdu[%d], lG[%d], lQK[%d], red[%d], lsd[1];", CH, CH, CH, CH, CH, 3 * NT);
        kg_shared(k, "QL", (long)CH * N1);
        kg_shared(k, "KL", (long)CH * N1);
        kg_shared(k, "DY", (long)CH * P1);
        kg_shared(k, "V", (long)CH * P1);
        kg_shared(k, "RG", region);
        kg_shared(k, "LPH", (long)CH * NA);
        KL("LOCAL_PTR float *X = RG;   /* the state, then its gradient: P x N in the local frame */");
        KL("LOCAL_PTR float *MA = RG, *MB = RG + %ld;", mm);
        KL("const float dtbh = dtb[h], Dh = Dp[h];");
        emit_chunk_scalars(k, NT, CH, NA, lddt, ldda, ldtr, ldang);
        emit_entering_angle(k, NT, NA, W2, ldth, 0);
        KL("BARRIER();");
        /* tiles: rows past L are zero, so every product below may run over all CH rows */
        KL("for (int j = lid; j < %d; j += %d) {", CH * N, NT);
        KL("const int a = j / %d, nn = j - a * %d;", N, N);
        KL("if (a < L) {");
        snprintf(a2, sizeof a2, "QL[a * %d + nn]", N1);
        emit_rot_load(k, a2, "Cn", "Cb", ldc, N, NA);
        snprintf(a2, sizeof a2, "KL[a * %d + nn]", N1);
        emit_rot_load(k, a2, "Bn", "Bb", ldb, N, NA);
        KL("} else { QL[a * %d + nn] = 0.0f; KL[a * %d + nn] = 0.0f; }", N1, N1);
        KL("}");
        KL("for (int j = lid; j < %d; j += %d) {", CH * P, NT);
        KL("const int a = j / %d, p = j - a * %d;", P, P);
        KL("DY[a * %d + p] = a < L ? dy[(rb + a) * %ldL + h * %d + p] : 0.0f;", P1, lddy, P);
        KL("V[a * %d + p] = a < L ? x[(rb + a) * %ldL + h * %d + p] : 0.0f;", P1, ldx, P);
        KL("}");
        /* X = S_in R(Theta_in): each state row turned into the chunk's frame */
        kl_spread(a0, sizeof a0, "sb", "e0", W, ldst);
        kl_spread(a1, sizeof a1, "sb", "e0 + 1", W, ldst);
        KL("for (int q = lid; q < %d; q += %d) {", P * NH, NT);
        KL("const int p = q / %d, j = q - p * %d;", NH, NH);
        KL("const long e0 = (long)p * %d + 2 * j;", N);
        KL("float s0 = 0.0f, s1 = 0.0f;");
        KL("if (c0 > 0) { s0 = st[%s]; if (2 * j + 1 < %d) s1 = st[%s]; }", a0, N, a1);
        KL("if (j < %d) { const float r0 = s0 * tc[j] + s1 * ts[j], r1 = s1 * tc[j] - s0 * ts[j]; s0 = r0; s1 = r1; }", NA);
        KL("X[p * %d + 2 * j] = s0;", N1);
        KL("if (2 * j + 1 < %d) X[p * %d + 2 * j + 1] = s1;", N, N1);
        KL("}");
        KL("BARRIER();");
        KL("float dq[%d], dk[%d], dv[%d], acc[%d];", CN, CN, CP, CC > CN ? (CC > CP ? CC : CP) : (CN > CP ? CN : CP));
        KL("for (int c = 0; c < %d; c++) { dq[c] = 0.0f; dk[c] = 0.0f; }", CN);
        KL("for (int c = 0; c < %d; c++) dv[c] = 0.0f;", CP);
        KL("const float et = EXPF(FMINF(lcs[tr], 0.0f));");
        KL("const float wl = EXPF(FMINF(lcs[L - 1] - lcs[tr], 0.0f)) * lsc[tr];");
        /* inter-chunk: y_t += e_t S_in Qr_t  ->  dQl_t = e_t X^T dy_t, dcs_t += e_t dy_t.X Ql_t */
        KL("{");
        KL("for (int c = 0; c < %d; c++) acc[c] = 0.0f;", CN);
        KL("for (int p = 0; p < %d; p++) {", P);
        KL("const float yv = DY[tr * %d + p];", P1);
        KL("for (int c = 0; c < %d; c++) { const int nn = tq + c * %d; if (nn < %d) acc[c] += yv * X[p * %d + nn]; }", CN, TPR, N, N1);
        KL("}");
        KL("float zd = 0.0f;");
        KL("for (int c = 0; c < %d; c++) { const int nn = tq + c * %d; if (nn < %d) { dq[c] = et * acc[c]; zd += acc[c] * QL[tr * %d + nn]; } }",
           CN, TPR, N, N1);
        KL("red[lid] = et * zd;");
        KL("}");
        KL("BARRIER();");
        KL("if (lid < %d) { float s = 0.0f; for (int q = 0; q < %d; q++) s += red[lid * %d + q]; ldcs[lid] = s; }", CH, TPR, TPR);
        KL("BARRIER();");
        /* X = dS_out R(Theta_in); <dS_out, S_in> needs no rotation (both absolute) */
        kl_spread(a2, sizeof a2, "rb", "e0", W, lddsl);
        kl_spread(a3, sizeof a3, "rb", "e0 + 1", W, lddsl);
        KL("{");
        KL("float sd = 0.0f;");
        KL("for (int q = lid; q < %d; q += %d) {", P * NH, NT);
        KL("const int p = q / %d, j = q - p * %d;", NH, NH);
        KL("const long e0 = (long)p * %d + 2 * j;", N);
        KL("float g0 = 0.0f, g1 = 0.0f;");
        KL("if (!last) {");
        KL("g0 = dsl[%s]; if (2 * j + 1 < %d) g1 = dsl[%s];", a2, N, a3);
        KL("if (c0 > 0) { sd += g0 * st[%s]; if (2 * j + 1 < %d) sd += g1 * st[%s]; }", a0, N, a1);
        KL("}");
        KL("if (j < %d) { const float r0 = g0 * tc[j] + g1 * ts[j], r1 = g1 * tc[j] - g0 * ts[j]; g0 = r0; g1 = r1; }", NA);
        KL("X[p * %d + 2 * j] = g0;", N1);
        KL("if (2 * j + 1 < %d) X[p * %d + 2 * j + 1] = g1;", N, N1);
        KL("}");
        KL("red[lid] = sd;");
        KL("}");
        KL("BARRIER();");
        KL("if (lid == 0) { float s = 0.0f; for (int q = 0; q < %d; q++) s += red[q]; lsd[0] = s; }", NT);
        /* the state update S_out += sum_s wl_s v_s Kl_s^T: dv_s += wl_s X Kl_s, dKl_s += wl_s X^T v_s */
        KL("{");
        KL("for (int c = 0; c < %d; c++) acc[c] = 0.0f;", CP);
        KL("for (int nn = 0; nn < %d; nn++) {", N);
        KL("const float kv = KL[tr * %d + nn];", N1);
        KL("for (int c = 0; c < %d; c++) { const int p = tq + c * %d; if (p < %d) acc[c] += kv * X[p * %d + nn]; }", CP, TPR, P, N1);
        KL("}");
        KL("float vd = 0.0f;");
        KL("for (int c = 0; c < %d; c++) { const int p = tq + c * %d; if (p < %d) { dv[c] = wl * acc[c]; vd += acc[c] * V[tr * %d + p]; } }",
           CP, TPR, P, P1);
        KL("for (int c = 0; c < %d; c++) acc[c] = 0.0f;", CN);
        KL("for (int p = 0; p < %d; p++) {", P);
        KL("const float vv = V[tr * %d + p];", P1);
        KL("for (int c = 0; c < %d; c++) { const int nn = tq + c * %d; if (nn < %d) acc[c] += vv * X[p * %d + nn]; }", CN, TPR, N, N1);
        KL("}");
        KL("for (int c = 0; c < %d; c++) dk[c] = wl * acc[c];", CN);
        KL("BARRIER();");
        KL("red[lid] = vd;");
        KL("}");
        KL("BARRIER();");
        KL("if (lid < %d) { float s = 0.0f; for (int q = 0; q < %d; q++) s += red[lid * %d + q]; lvdu[lid] = s; }", CH, TPR, TPR);
        /* the masked CH x CH products: MA = decay * scale_s * dy_t.v_s, MB = decay * Ql_t.Kl_s
         * (s < t); their diagonals go to lG, lQK */
        KL("for (int c = 0; c < %d; c++) {", CC);
        KL("const int s2 = tq + c * %d;", TPR);
        KL("if (s2 < %d) {", CH);
        KL("float gv = 0.0f, qk = 0.0f;");
        KL("if (s2 <= tr && tr < L) {");
        KL("for (int p = 0; p < %d; p++) gv += DY[tr * %d + p] * V[s2 * %d + p];", P, P1, P1);
        KL("for (int nn = 0; nn < %d; nn++) qk += QL[tr * %d + nn] * KL[s2 * %d + nn];", N, N1, N1);
        KL("}");
        KL("if (s2 == tr) { lG[tr] = gv; lQK[tr] = qk; }");
        KL("const float wd = s2 < tr ? EXPF(FMINF(lcs[tr] - lcs[s2], 0.0f)) : 0.0f;");
        KL("acc[c] = wd * lsc[s2] * gv;");
        KL("MB[tr * %d + s2] = wd * qk;", C1);
        KL("}");
        KL("}");
        KL("BARRIER();   /* every read of X (aliasing MA) is done */");
        KL("for (int c = 0; c < %d; c++) { const int s2 = tq + c * %d; if (s2 < %d) MA[tr * %d + s2] = acc[c]; }", CC, TPR, CH, C1);
        KL("BARRIER();");
        /* dQl_t += sum_s MA_ts Kl_s;  dKl_s += sum_t MA_ts Ql_t;  dV'_s = sum_t MB_ts dy_t */
        KL("{");
        KL("float rd = 0.0f, cd = 0.0f, sv = 0.0f;");
        KL("for (int c = 0; c < %d; c++) acc[c] = 0.0f;", CN);
        KL("for (int s2 = 0; s2 < tr; s2++) {");
        KL("const float m = MA[tr * %d + s2];", C1);
        KL("for (int c = 0; c < %d; c++) { const int nn = tq + c * %d; if (nn < %d) acc[c] += m * KL[s2 * %d + nn]; }", CN, TPR, N, N1);
        KL("}");
        KL("for (int c = 0; c < %d; c++) { const int nn = tq + c * %d; if (nn < %d) { dq[c] += acc[c]; rd += acc[c] * QL[tr * %d + nn]; } }",
           CN, TPR, N, N1);
        KL("for (int c = 0; c < %d; c++) acc[c] = 0.0f;", CN);
        KL("for (int t2 = tr + 1; t2 < L; t2++) {");
        KL("const float m = MA[t2 * %d + tr];", C1);
        KL("for (int c = 0; c < %d; c++) { const int nn = tq + c * %d; if (nn < %d) acc[c] += m * QL[t2 * %d + nn]; }", CN, TPR, N, N1);
        KL("}");
        KL("for (int c = 0; c < %d; c++) { const int nn = tq + c * %d; if (nn < %d) { dk[c] += acc[c]; cd += acc[c] * KL[tr * %d + nn]; } }",
           CN, TPR, N, N1);
        KL("for (int c = 0; c < %d; c++) acc[c] = 0.0f;", CP);
        KL("for (int t2 = tr + 1; t2 < L; t2++) {");
        KL("const float m = MB[t2 * %d + tr];", C1);
        KL("for (int c = 0; c < %d; c++) { const int p = tq + c * %d; if (p < %d) acc[c] += m * DY[t2 * %d + p]; }", CP, TPR, P, P1);
        KL("}");
        KL("for (int c = 0; c < %d; c++) { const int p = tq + c * %d; if (p < %d) { dv[c] += lsc[tr] * acc[c]; sv += acc[c] * V[tr * %d + p]; } }",
           CP, TPR, P, P1);
        KL("red[lid] = rd; red[%d + lid] = cd; red[%d + lid] = sv;", NT, 2 * NT);
        KL("}");
        /* the diagonal (gamma_t Q_t.K_t + D) v_t, rotation invariant */
        KL("{");
        KL("const float gg = lgm[tr] * lG[tr], gq = lgm[tr] * lQK[tr] + Dh;");
        KL("for (int c = 0; c < %d; c++) { const int nn = tq + c * %d; if (nn < %d) { dq[c] += gg * KL[tr * %d + nn]; dk[c] += gg * QL[tr * %d + nn]; } }",
           CN, TPR, N, N1, N1);
        KL("for (int c = 0; c < %d; c++) { const int p = tq + c * %d; if (p < %d) dv[c] += gq * DY[tr * %d + p]; }", CP, TPR, P, P1);
        KL("}");
        KL("BARRIER();");
        /* per token: dcs and dscale */
        KL("if (lid < L) {");
        KL("const int a = lid;");
        KL("float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;");
        KL("for (int q = 0; q < %d; q++) { r0 += red[a * %d + q]; r1 += red[%d + a * %d + q]; r2 += red[%d + a * %d + q]; }",
           TPR, TPR, NT, TPR, 2 * NT, TPR);
        KL("const float dl = EXPF(FMINF(lcs[L - 1] - lcs[a], 0.0f));");
        KL("float dc = ldcs[a] + r0 - r1 - dl * lsc[a] * lvdu[a];");
        KL("if (a == L - 1) {");
        KL("dc += EXPF(FMINF(lcs[L - 1], 0.0f)) * lsd[0];");
        KL("for (int s2 = 0; s2 < L; s2++) dc += EXPF(FMINF(lcs[L - 1] - lcs[s2], 0.0f)) * lsc[s2] * lvdu[s2];");
        KL("}");
        KL("ldcs[a] = dc;");
        KL("ldsc[a] = r2 + dl * lvdu[a];");
        KL("}");
        /* dQl, dKl through shared memory (MA, MB are free): the angle pairs of a row sit in
         * different lanes */
        KL("for (int c = 0; c < %d; c++) { const int nn = tq + c * %d; if (nn < %d) { MA[tr * %d + nn] = dq[c]; MB[tr * %d + nn] = dk[c]; } }",
           CN, TPR, N, N1, N1);
        KL("for (int c = 0; c < %d; c++) { const int p = tq + c * %d; if (p < %d && tr < L) gx[(rb + tr) * %ldL + h * %d + p] = dv[c]; }",
           CP, TPR, P, ldgx, P);
        KL("BARRIER();");
        /* rotation undo: dQ = R(phi)^T dQl; dTheta_t = dQl x Ql + dKl x Kl (rotation invariant) */
        KL("for (int j = lid; j < L * %d; j += %d) {", NH, NT);
        KL("const int a = j / %d, i = j - a * %d;", NH, NH);
        KL("const long hb = (rb + a) * %ldL + h * %d;", ldh, 2 * N);
        KL("const int i0 = 2 * i, i1 = 2 * i + 1 < %d ? 2 * i + 1 : 2 * i;", N);
        KL("if (i < %d) {", NA);
        KL("const float cq = COSF(LPH[a * %d + i]), sq = SINF(LPH[a * %d + i]);", NA, NA);
        KL("const float gq0 = MA[a * %d + i0], gq1 = MA[a * %d + i1], gk0 = MB[a * %d + i0], gk1 = MB[a * %d + i1];", N1, N1, N1, N1);
        KL("hd[hb + i0] = cq * gk0 + sq * gk1; hd[hb + i1] = -sq * gk0 + cq * gk1;");
        KL("hd[hb + %d + i0] = cq * gq0 + sq * gq1; hd[hb + %d + i1] = -sq * gq0 + cq * gq1;", N, N);
        KL("LPH[a * %d + i] = -gq0 * QL[a * %d + i1] + gq1 * QL[a * %d + i0] - gk0 * KL[a * %d + i1] + gk1 * KL[a * %d + i0];",
           NA, N1, N1, N1, N1);
        KL("} else {");
        KL("hd[hb + i0] = MB[a * %d + i0]; hd[hb + %d + i0] = MA[a * %d + i0];", N1, N, N1);
        KL("if (i1 != i0) { hd[hb + i1] = MB[a * %d + i1]; hd[hb + %d + i1] = MA[a * %d + i1]; }", N1, N, N1);
        KL("}");
        KL("}");
        KL("BARRIER();");
        emit_bwd_main_tail(k, NT, CH, NA, lddt, ldda, ldtr, ldga, ldtk, Wt, 0);
        kg_grid(k, 0, 0, 0, 1, 0, CH);
        kg_grid(k, 1, 0, H, 0, 0, 1);
        kg_block(k, NT, 1, 1);
        if (kg_end(k) < 0) return -1;
    }

    /* ---- (4) the angle carry and the trapezoid term across chunk boundaries. The carry into
     * a chunk is the sum of the later chunks' in-chunk totals (their first row of `tk`), so
     * SL work-groups per (b, h) each take a range of chunks: one first sums the totals of the
     * chunks after its range (strided partial sums added in a fixed order), then walks its
     * own chunks from last to first. Inside a chunk TPA work-items share a token's angles and
     * add their parts of its dDT share in order. */
    {
        const int NT = 256, SL = 8;
        const int TPA = CH >= NT ? 1 : (NT / CH < NA ? NT / CH : NA);
        const int NPART = NA >= NT ? 1 : NT / NA;
        kg_begin(k, "mamba3_scan_bwd_fix", node, node + 1);
        kg_in(k, "ddt", n->in[IN_DDT]);
        kg_in(k, "trap", n->in[IN_TRAP]);
        kg_in(k, "ang", n->in[IN_ANG]);
        kg_in(k, "dtb", n->in[IN_DTB]);
        kg_in(k, "tkw", n->out[BOUT_TK]);
        kg_out(k, "gddt", n->out[IN_DDT]);
        kg_out(k, "gtrap", n->out[IN_TRAP]);
        kg_out(k, "ha", n->out[BOUT_HANG]);
        KL("const long b = GID_X / %d;", H);
        KL("const int h = (int)(GID_X - b * %d), lid = LID_X;", H);
        KL("LOCAL float carry[%d], cur[%d], part[%d], shr[%d];", NA, NA, NA * NPART, CH * TPA);
        KL("const float dtbh = dtb[h];");
        KL("const long nch = (S + %d) / %d, per = (nch + %d) / %d;", CH - 1, CH, SL - 1, SL);
        KL("const long clo = GID_Y * per, chi = clo + per < nch ? clo + per : nch;");
        KL("for (int j = lid; j < %d; j += %d) {", NA * NPART, NT);
        KL("const int i = j %% %d, q = j / %d;", NA, NA);
        KL("float acc = 0.0f;");
        KL("for (long c = chi + q; c < nch; c += %d) acc += tkw[(b * S + c * %d) * %ldL + h * %ld + i];", NPART, CH, ldtk, Wt);
        KL("part[j] = acc;");
        KL("}");
        KL("BARRIER();");
        KL("for (int i = lid; i < %d; i += %d) {", NA, NT);
        KL("float acc = 0.0f;");
        KL("for (int q = 0; q < %d; q++) acc += part[q * %d + i];", NPART, NA);
        KL("carry[i] = acc;");
        KL("}");
        KL("for (long c = chi - 1; c >= clo; c--) {");
        KL("const long rb = b * S + c * %d;", CH);
        KL("const int L = (int)(S - c * %d < %d ? S - c * %d : %d);", CH, CH, CH, CH);
        KL("BARRIER();");
        KL("for (int i = lid; i < %d; i += %d) { cur[i] = carry[i]; carry[i] += tkw[rb * %ldL + h * %ld + i]; }", NA, NT, ldtk, Wt);
        KL("BARRIER();");
        KL("for (int j = lid; j < %d; j += %d) {", CH * TPA, NT);
        KL("const int a = j / %d, s0 = j - a * %d;", TPA, TPA);
        KL("float share = 0.0f;");
        KL("if (a < L) {");
        KL("const long tk = rb + a;");
        KL("const float u = ddt[tk * %ldL + h] + dtbh;", lddt);
        KL("const float DT = u > 20.0f ? u : LOG1PF(EXPF(u));");
        KL("for (int i = s0; i < %d; i += %d) {", NA, TPA);
        KL("const float Gv = tkw[tk * %ldL + h * %ld + i] + cur[i], tn = TANHF(ang[tk * %ldL + i]);", ldtk, Wt, ldang);
        KL("share += Gv * (" M3_PI_F " * tn);");
        KL("ha[tk * %ldL + h * %d + i] = Gv * DT * " M3_PI_F " * (1.0f - tn * tn);", ldha, NA);
        KL("}");
        KL("}");
        KL("shr[j] = share;");
        KL("}");
        KL("BARRIER();");
        KL("for (int a = lid; a < L; a += %d) {", NT);
        KL("const long tk = rb + a;");
        KL("const float u = ddt[tk * %ldL + h] + dtbh;", lddt);
        KL("const float DT = u > 20.0f ? u : LOG1PF(EXPF(u));");
        KL("const float sg = u > 20.0f ? 1.0f : (u >= 0.0f ? 1.0f / (1.0f + EXPF(-u)) : EXPF(u) / (1.0f + EXPF(u)));");
        KL("const float tr = trap[tk * %ldL + h];", ldtr);
        KL("const float lam = tr >= 0.0f ? 1.0f / (1.0f + EXPF(-tr)) : EXPF(tr) / (1.0f + EXPF(tr));");
        KL("float share = 0.0f;");
        KL("for (int s0 = 0; s0 < %d; s0++) share += shr[a * %d + s0];", TPA, TPA);
        KL("float dDT = tkw[tk * %ldL + h * %ld + %d] + share, dlam = tkw[tk * %ldL + h * %ld + %d];", ldtk, Wt, NA, ldtk, Wt,
           NA + 1);
        KL("if (a == 0 && c > 0) {");
        KL("const float dp = tkw[(tk - 1) * %ldL + h * %ld + %d];", ldtk, Wt, NA + 2);
        KL("dDT += dp * (1.0f - lam);");
        KL("dlam -= dp * DT;");
        KL("}");
        KL("gddt[tk * %ldL + h] = dDT * sg;", ldgt);
        KL("gtrap[tk * %ldL + h] = dlam * lam * (1.0f - lam);", ldgr);
        KL("}");
        KL("}");
        kg_grid(k, 0, 0, H, 0, 0, 1);
        kg_grid(k, 1, SL, 0, 0, 0, 1);
        kg_block(k, NT, 1, 1);
        if (kg_end(k) < 0) return -1;
    }
    return 0;
}

static int emit_bwd(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    int node = (int)(n - g->n);
    m3_kdims d = kdims(k, n);
    const int H = d.H, P = d.P, N = d.N, NA = d.NA, CH = d.CH;
    const long W2 = 2L * N + NA;
    long local = 4L * ((long)P * N + (long)CH * N + (long)CH * NA + 6L * CH + 4);
    const int chunked = fwd_chunked(d) && bwd_chunked_fits(d, k->shared_max > 0 ? k->shared_max : 160L * 1024, bwd_tc(k, d));
    if (chunked) {
        if (emit_bwd_chunked(k, n, node, d) < 0) return -1;
    } else if (CH > 256 || NA > 256 || local > 48L * 1024) {
        snprintf(k->err, sizeof k->err,
                 "mamba3_scan_bwd: the simple kernel needs chunk <= 256 and (P*N + chunk*(N+NA+6))*4 "
                 "<= 48 KiB of local memory; got P=%d N=%d NA=%d chunk=%d (%ld bytes)", P, N, NA, CH, local);
        return -1;
    } else if (emit_bwd_scan(k, n, node, d) < 0) {
        return -1;
    }

    /* 2. shares summed over heads in order: dBn, dCn, d(angles) */
    const long ldh = kg_ld(k, n->out[BOUT_HEAD]), ldha = kg_ld(k, n->out[BOUT_HANG]);
    kg_begin(k, "mamba3_scan_bwd_heads", node, node + 1);
    kg_in(k, "hd", n->out[BOUT_HEAD]);
    kg_in(k, "ha", n->out[BOUT_HANG]);
    kg_out(k, "gBn", n->out[IN_BN]);
    kg_out(k, "gCn", n->out[IN_CN]);
    kg_out(k, "gang", n->out[IN_ANG]);
    KL("const long i = GID_X * 256 + LID_X;");
    KL("if (i >= T * %ldL) return;", W2);
    KL("const long tok = i / %ldL;", W2);
    KL("const int f = (int)(i - tok * %ldL);", W2);
    KL("float acc = 0.0f;");
    KL("if (f < %d) for (int hh = 0; hh < %d; hh++) acc += hd[tok * %ldL + hh * %d + f];", 2 * N, H, ldh, 2 * N);
    KL("else for (int hh = 0; hh < %d; hh++) acc += ha[tok * %ldL + hh * %d + f - %d];", H, ldha, NA, 2 * N);
    KL("if (f < %d) gBn[tok * %ldL + f] = acc;", N, kg_ld(k, n->out[IN_BN]));
    KL("else if (f < %d) gCn[tok * %ldL + f - %d] = acc;", 2 * N, kg_ld(k, n->out[IN_CN]), N);
    KL("else gang[tok * %ldL + f - %d] = acc;", kg_ld(k, n->out[IN_ANG]), 2 * N);
    kg_grid(k, 0, 0, 0, 0, W2, 256);
    kg_block(k, 256, 1, 1);
    if (kg_end(k) < 0) return -1;

    /* 3. parameter gradients, deterministic: the biases' columns of `hd` in blocks of 32 per
     * work-group (h, block): 8 lanes of 32 work-items, each lane a strided compensated sum over
     * the tokens, so a warp reads 32 consecutive floats of one token row (reading a single
     * column per work-group, as before, fetched a 32-byte sector per float: 28 ms of realm-9m's
     * step on the H100); the lanes are then added in order. dt_bias and D: one work-group per
     * head, a strided partial sum over the tokens and a fixed tree. */
    const int NCB = (2 * N + 31) / 32, J = NCB + 2;
    /* 1024 work-items on CUDA: only H * J work-groups exist (72 for realm-9m, fewer than the
     * multiprocessors), and with 256 each they kept too few loads in flight (0.49 ms a launch
     * on the H100 at 0.93 TB/s) */
    const int NTP = strcmp(k->d->name, "cuda") == 0 ? 1024 : 256, LN = NTP / 32;
    kg_begin(k, "mamba3_scan_bwd_params", node, node + 1);
    kg_param_grad(k);
    kg_in(k, "hd", n->out[BOUT_HEAD]);
    kg_in(k, "gddt", n->out[IN_DDT]);
    kg_in(k, "x", n->in[IN_X]);
    kg_in(k, "dy", n->in[BIN_DY]);
    if (chunked) kg_in(k, "tkw", n->out[BOUT_TK]);
    kg_out(k, "gdtb", n->out[IN_DTB]);
    kg_out(k, "gBb", n->out[IN_BB]);
    kg_out(k, "gCb", n->out[IN_CB]);
    kg_out(k, "gD", n->out[IN_D]);
    KL("LOCAL float red[%d], redc[%d], red2[64];", NTP, NTP);
    KL("const int h = (int)(GID_X / %d), jb = (int)(GID_X %% %d);", J, J);
    KL("const int lid = LID_X;");
    KL("float acc = 0.0f, cmp = 0.0f;");
    KL("if (jb < %d) {", NCB);
    KL("const int col = jb * 32 + (lid & 31), lane = lid >> 5;");
    KL("if (col < %d) for (long tok = lane; tok < T; tok += %d) {", 2 * N, LN);
    KL("const float yk = hd[tok * %ldL + h * %d + col] - cmp;", ldh, 2 * N);
    KL("const float tk = acc + yk;");
    KL("cmp = (tk - acc) - yk;");
    KL("acc = tk;");
    KL("}");
    KL("} else {");
    KL("for (long tok = lid; tok < T; tok += %d) {", NTP);
    KL("float val;");
    KL("if (jb == %d) val = gddt[tok * %ldL + h];", NCB, kg_ld(k, n->out[IN_DDT]));
    /* dy_t . x_t: the chunked backward left it per token; a work-item reading a whole row
     * itself made the warp's loads touch 32 rows each (18 ms of realm-9m's step) */
    if (chunked) KL("else val = tkw[tok * %ldL + h * %d + %d];", kg_ld(k, n->out[BOUT_TK]), NA + 4, NA + 3);
    else {
    KL("else {");
    KL("float dv = 0.0f, dc = 0.0f;");
    KL("for (int p = 0; p < %d; p++) {", P);
    KL("const float yk = dy[tok * %ldL + h * %d + p] * x[tok * %ldL + h * %d + p] - dc;", kg_ld(k, n->in[BIN_DY]), P,
       kg_ld(k, n->in[IN_X]), P);
    KL("const float tk = dv + yk;");
    KL("dc = (tk - dv) - yk;");
    KL("dv = tk;");
    KL("}");
    KL("val = dv;");
    KL("}");
    }
    KL("const float yk = val - cmp;");
    KL("const float tk = acc + yk;");
    KL("cmp = (tk - acc) - yk;");
    KL("acc = tk;");
    KL("}");
    KL("}");
    /* one barrier outside the branches (PoCL mishandles barriers inside them) */
    /* the partials and their compensations are added in one more compensated sum: a
     * parameter gradient is a sum over every token that can cancel to far below its terms
     * (dD = sum dy . x), where a plain sum of the partials would lose its leading digits */
    KL("red[lid] = acc;");
    KL("redc[lid] = -cmp;");
    KL("BARRIER();");
    KL("if (jb < %d) {", NCB);
    KL("const int col = jb * 32 + lid;");
    KL("if (lid < 32 && col < %d) {", 2 * N);
    KL("float s = 0.0f, c = 0.0f;");
    KL("for (int l = 0; l < %d; l++) {", 2 * LN);
    KL("const float yk = ((l & 1) ? redc[(l >> 1) * 32 + lid] : red[(l >> 1) * 32 + lid]) - c, tk = s + yk;");
    KL("c = (tk - s) - yk; s = tk;");
    KL("}");
    KL("if (col < %d) gBb[h * %d + col] = s; else gCb[h * %d + col - %d] = s;", N, N, N, N);
    KL("}");
    KL("}");
    /* the 2 NTP partials of dt_bias and D in 32 runs of consecutive ones, then the 32 runs with
     * their compensations, each a compensated sum in order */
    KL("if (jb >= %d && lid < 32) {", NCB);
    KL("float s = 0.0f, c = 0.0f;");
    KL("for (int l = lid * %d; l < (lid + 1) * %d; l++) {", 2 * LN, 2 * LN);
    KL("const float yk = ((l & 1) ? redc[l >> 1] : red[l >> 1]) - c, tk = s + yk;");
    KL("c = (tk - s) - yk; s = tk;");
    KL("}");
    KL("red2[2 * lid] = s; red2[2 * lid + 1] = -c;");
    KL("}");
    KL("BARRIER();");
    KL("if (jb >= %d && lid == 0) {", NCB);
    KL("float s = 0.0f, c = 0.0f;");
    KL("for (int l = 0; l < 64; l++) {");
    KL("const float yk = red2[l] - c, tk = s + yk;");
    KL("c = (tk - s) - yk; s = tk;");
    KL("}");
    KL("if (jb == %d) gdtb[h] = s; else gD[h] = s;", NCB);
    KL("}");
    kg_grid(k, 0, (long)H * J, 0, 0, 0, 1);
    kg_block(k, NTP, 1, 1);
    return kg_end(k);
}

const op_def op_mamba3_scan = {
    .name = "mamba3_scan",
    .nin = -IN_NFWD,   /* 11, or 15 with the carried state (prefill) */
    .nout = OUT_N,
    .iattr = {"chunk", NULL},
    .fattr = {NULL},
    .ia_default = {64},
    .infer = infer_fwd,
    .grad = grad_fwd,
    .ref = ref_fwd,
    .flops = flops_fwd,
    .emit = emit_fwd,
};

const op_def op_mamba3_scan_bwd = {
    .name = "mamba3_scan_bwd",
    .nin = BIN_N,
    .nout = BOUT_N,
    .iattr = {"chunk", NULL},
    .fattr = {NULL},
    .ia_default = {64},
    .infer = infer_bwd,
    .grad = NULL,
    .ref = ref_bwd,
    .flops = flops_bwd,
    .emit = emit_bwd,
};

#endif /* M3_MATH_ONLY */
