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

void m3_ref_chunked(m3_dims d, int chunk, const m3_inputs *in, const m3_state *init,
                    double *y, long y_ld, m3_state *final) {
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
                     const double *dy, long dy_ld, const m3_grads *g, long b, int h,
                     m3_bwork *k, double *dD) {
    const int P = d->P, N = d->N;
    const long S = d->S;
    long nch = (S + chunk - 1) / chunk;
    /* 1. entering states */
    memset(k->dS, 0, sizeof(double) * (size_t)P * (size_t)N);   /* reused as the running state */
    for (long c = 0; c < nch; c++) {
        long c0 = c * chunk, L = S - c0 < chunk ? S - c0 : chunk;
        memcpy(k->Sc + c * P * N, k->dS, sizeof(double) * (size_t)P * (size_t)N);
        chunk_fwd(d, w, in, b, h, c0, L, k->dS, k->cs, NULL, 0);
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
        /* cs_a = sum_{j<=a} ADT_j  =>  dADT_j = sum_{a>=j} dcs_a (chunk-local) */
        double r = 0;
        for (long a = L - 1; a >= 0; a--) k->dADT[c0 + a] = (r += dcs[a]);
        memcpy(k->dSn, k->dS, sizeof(double) * (size_t)P * (size_t)N);
    }
#undef XV
#undef DV
#undef DY
}

void m3_ref_backward(m3_dims d, int chunk, const m3_inputs *in, const double *dy, long dy_ld,
                     const m3_grads *g) {
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
            head_bwd(&d, chunk, &w, in, dy, dy_ld, g, b, h, &k, &dD);
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
                    g->angles[tok * g->angles_ld + i] += G * w.DT[t] * M3_PI * (1.0 - tnh * tnh);
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

enum { IN_X, IN_BN, IN_CN, IN_DDT, IN_DDA, IN_TRAP, IN_ANG, IN_DTB, IN_BB, IN_CB, IN_D, IN_NFWD };

static const char *const in_names[IN_NFWD + 1] = {
    "x", "Bn", "Cn", "dd_dt", "dd_A", "trap", "angles", "dt_bias", "B_bias", "C_bias", "D", "dy"};

/* Checks one input: per-token ([B,S,...]) when tok, else a pure parameter; the trailing dims
 * must equal want[0..nw-1]. */
static int check_in(const ir_graph *g, const ir_node *n, int i, int tok, const int *want, int nw,
                    const char *what, char *err, size_t errlen) {
    const ir_shape *s = op_in_shape(g, n, i);
    char buf[96];
    ir_shape_str(s, buf, sizeof buf);
    int lead = tok ? 2 : 0;
    int ok = s->ndim == lead + nw;
    if (ok && tok) ok = s->d[0] == DIM_B && s->d[1] == DIM_S;
    for (int j = 0; ok && j < nw; j++) ok = s->d[lead + j] == want[j];
    if (!ok)
        return OP_ERR("input %d (%s) must have shape %s, got %s", i + 1, in_names[i],
                      what, buf);
    if (op_in_dtype(g, n, i) == DT_I32)
        return OP_ERR("input %d (%s) must be a float tensor", i + 1, in_names[i]);
    return 0;
}

/* Validates the 11 forward inputs (plus dy when bwd) and reads the sizes. */
static int check_all(const ir_graph *g, const ir_node *n, int bwd, int *H, int *P, int *N,
                     int *NA, char *err, size_t errlen) {
    int nin = IN_NFWD + (bwd ? 1 : 0);
    if (n->nin != nin) return OP_ERR("expects %d inputs, got %d", nin, n->nin);
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
    int hp[2] = {*H, *P}, nn[1] = {*N}, hh[1] = {*H}, na[1] = {*NA}, hn[2] = {*H, *N};
    char sh[64], sn[64], sa[64], shn[64], sh1[64];
    snprintf(sh, sizeof sh, "[B,S,%d]", *H);
    snprintf(sn, sizeof sn, "[B,S,%d]", *N);
    snprintf(sa, sizeof sa, "[B,S,%d]", *NA);
    snprintf(shn, sizeof shn, "[%d,%d]", *H, *N);
    snprintf(sh1, sizeof sh1, "[%d]", *H);
    char shp[64];
    snprintf(shp, sizeof shp, "[B,S,%d,%d]", *H, *P);
    if (check_in(g, n, IN_BN, 1, nn, 1, sn, err, errlen) ||
        check_in(g, n, IN_CN, 1, nn, 1, sn, err, errlen) ||
        check_in(g, n, IN_DDT, 1, hh, 1, sh, err, errlen) ||
        check_in(g, n, IN_DDA, 1, hh, 1, sh, err, errlen) ||
        check_in(g, n, IN_TRAP, 1, hh, 1, sh, err, errlen) ||
        check_in(g, n, IN_ANG, 1, na, 1, sa, err, errlen) ||
        check_in(g, n, IN_DTB, 0, hh, 1, sh1, err, errlen) ||
        check_in(g, n, IN_BB, 0, hn, 2, shn, err, errlen) ||
        check_in(g, n, IN_CB, 0, hn, 2, shn, err, errlen) ||
        check_in(g, n, IN_D, 0, hh, 1, sh1, err, errlen) ||
        check_in(g, n, IN_X, 1, hp, 2, shp, err, errlen))
        return -1;
    if (bwd && check_in(g, n, IN_NFWD, 1, hp, 2, shp, err, errlen)) return -1;
    if (n->ia[0] < 1)
        return OP_ERR("chunk must be >= 1, got %ld", n->ia[0]);
    return 0;
}

static int infer_fwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err,
                     size_t errlen) {
    int H, P, N, NA;
    if (check_all(g, n, 0, &H, &P, &N, &NA, err, errlen)) return -1;
    out[0] = *op_in_shape(g, n, IN_X);
    dt[0] = DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err,
                     size_t errlen) {
    int H, P, N, NA;
    if (check_all(g, n, 1, &H, &P, &N, &NA, err, errlen)) return -1;
    for (int i = 0; i < IN_NFWD; i++) {
        out[i] = *op_in_shape(g, n, i);
        dt[i] = DT_F32;
    }
    return 0;
}

static int grad_fwd(ir_graph *g, int node, const int *dout, int *din) {
    if (dout[0] < 0) {
        for (int i = 0; i < IN_NFWD; i++) din[i] = -1;
        return 0;
    }
    /* Copy what we need: ir_emit may grow g->n and move the node. */
    const ir_node *n = &g->n[node];
    int ins[IN_NFWD + 1];
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    for (int i = 0; i < IN_NFWD; i++) ins[i] = n->in[i];
    ins[IN_NFWD] = dout[0];
    memcpy(ia, n->ia, sizeof ia);
    memcpy(fa, n->fa, sizeof fa);
    int outs[IR_MAX_IO];
    if (ir_emit(g, "mamba3_scan_bwd", ins, IN_NFWD + 1, ia, fa, outs) < 0) return -1;
    for (int i = 0; i < IN_NFWD; i++) din[i] = outs[i];
    return 0;
}

static void collect(const ref_ctx *c, const ir_node *n, m3_dims *d, m3_inputs *in) {
    ref_buf b[IN_NFWD];
    for (int i = 0; i < IN_NFWD; i++) b[i] = ref_get(c, n->in[i]);
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
        .dt_bias = b[IN_DTB].p, .B_bias = b[IN_BB].p, .C_bias = b[IN_CB].p, .D = b[IN_D].p};
}

static void ref_fwd(const ref_ctx *c, const ir_node *n) {
    m3_dims d;
    m3_inputs in;
    collect(c, n, &d, &in);
    ref_buf y = ref_get(c, n->out[0]);
    m3_ref_chunked(d, (int)n->ia[0], &in, NULL, y.p, y.ld, NULL);
}

static void ref_bwd(const ref_ctx *c, const ir_node *n) {
    m3_dims d;
    m3_inputs in;
    collect(c, n, &d, &in);
    ref_buf dy = ref_get(c, n->in[IN_NFWD]);
    ref_buf o[IN_NFWD];
    for (int i = 0; i < IN_NFWD; i++) o[i] = ref_get(c, n->out[i]);
    m3_grads gr = {
        .x = o[IN_X].p, .x_ld = o[IN_X].ld,
        .Bn = o[IN_BN].p, .Bn_ld = o[IN_BN].ld,
        .Cn = o[IN_CN].p, .Cn_ld = o[IN_CN].ld,
        .dd_dt = o[IN_DDT].p, .dd_dt_ld = o[IN_DDT].ld,
        .dd_A = o[IN_DDA].p, .dd_A_ld = o[IN_DDA].ld,
        .trap = o[IN_TRAP].p, .trap_ld = o[IN_TRAP].ld,
        .angles = o[IN_ANG].p, .angles_ld = o[IN_ANG].ld,
        .dt_bias = o[IN_DTB].p, .B_bias = o[IN_BB].p, .C_bias = o[IN_CB].p, .D = o[IN_D].p};
    m3_ref_backward(d, (int)n->ia[0], &in, dy.p, dy.ld, &gr);
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

const op_def op_mamba3_scan = {
    .name = "mamba3_scan",
    .nin = IN_NFWD,
    .nout = 1,
    .iattr = {"chunk", NULL},
    .fattr = {NULL},
    .ia_default = {64},
    .infer = infer_fwd,
    .grad = grad_fwd,
    .ref = ref_fwd,
    .flops = flops_fwd,
};

const op_def op_mamba3_scan_bwd = {
    .name = "mamba3_scan_bwd",
    .nin = IN_NFWD + 1,
    .nout = IN_NFWD,
    .iattr = {"chunk", NULL},
    .fattr = {NULL},
    .ia_default = {64},
    .infer = infer_bwd,
    .grad = NULL,
    .ref = ref_bwd,
    .flops = flops_bwd,
};

#endif /* M3_MATH_ONLY */
