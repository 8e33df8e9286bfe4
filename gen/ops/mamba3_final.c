/* Prefill hand-over for Mamba-3 (docs/decode.md "Prefill"): the decode step's carried state
 * at the end of a sequence that went through the chunked forward.
 *
 *   mamba3_final(saved, x, Bn, dd_dt, angles, dt_bias, B_bias [, Theta0]; chunk)
 *     -> S [B,H,P,N], Theta [B,H,NA], Kr [B,H,N], v [B,H,P]
 *
 * saved is mamba3_scan's chunk-state output (layout in mamba3_scan.h, same chunk). S is the
 * state stored for the last full chunk, which is h_T when the sequence length is a multiple of
 * chunk (the prefill plan runs only such lengths); zeros when there is no full chunk. Theta is
 * the cumulative angle over the whole sequence, wrapped to [0, 2pi) per token as the step and
 * the reference do, starting from Theta0 [B,H,NA] when the scan started from a carried state
 * (then `saved` already holds the state that continues it); Kr is the last token's key (B_bias added) rotated by it, v its input x.
 * These are exactly mamba3_step's state tensors, so the prefill graph assigns them onto the
 * same-named states the step graph carries.
 *
 * Theta is summed here rather than read from the scan's `theta` workspace: the sequential
 * fallback scan kernel does not write that workspace, and this op must not depend on which
 * scan kernel ran. */
#include "kgen.h"
#include "mamba3_scan.h"
#include "op.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { IN_SAVED, IN_X, IN_BN, IN_DDT, IN_ANG, IN_DTB, IN_BB, IN_N, IN_TH0 = IN_N };
enum { OUT_S, OUT_TH, OUT_KR, OUT_V, OUT_N };

static const char *const names[IN_N + 1] = {"saved", "x", "Bn", "dd_dt", "angles", "dt_bias", "B_bias", "Theta0"};
static const double PI_D = 3.14159265358979323846;

/* lead: 2 for [B,S,...], 0 for a parameter; then the trailing dims. */
static int want(const ir_graph *g, const ir_node *n, int i, int lead, const int *d, int nd, char *err,
                size_t errlen) {
    return op_want_input(g, n, i, lead, d, nd, names[i], err, errlen);
}

static int dims(const ir_graph *g, const ir_node *n, int *H, int *P, int *N, int *NA, char *err, size_t errlen) {
    if (n->nin != IN_N && n->nin != IN_N + 1)
        return OP_ERR("expects %d inputs (%d with the initial angle Theta0), got %d", IN_N, IN_N + 1, n->nin);
    if (n->ia[0] < 1) return OP_ERR("chunk must be >= 1, got %ld", n->ia[0]);
    const ir_shape *x = op_in_shape(g, n, IN_X), *bn = op_in_shape(g, n, IN_BN), *an = op_in_shape(g, n, IN_ANG);
    if (x->ndim != 4 || x->d[0] != DIM_B || x->d[1] != DIM_S || x->d[2] <= 0 || x->d[3] <= 0) {
        char b[96];
        ir_shape_str(x, b, sizeof b);
        return OP_ERR("input 2 (x) must have shape [B,S,H,P], got %s", b);
    }
    if (bn->ndim != 3 || bn->d[2] <= 0 || an->ndim != 3 || an->d[2] <= 0)
        return OP_ERR("Bn must be [B,S,N] and angles [B,S,NA]");
    *H = x->d[2], *P = x->d[3], *N = bn->d[2], *NA = an->d[2];
    if (2 * *NA > *N) return OP_ERR("%d rotation angles need 2*NA <= N, but N = %d", *NA, *N);
    const int sw[1] = {(int)(*H * m3_states_width(*P, *N, (int)n->ia[0]))}, hp[2] = {*H, *P}, n1[1] = {*N},
              h1[1] = {*H}, na[1] = {*NA}, hn[2] = {*H, *N};
    if (want(g, n, IN_SAVED, 2, sw, 1, err, errlen) || want(g, n, IN_X, 2, hp, 2, err, errlen) ||
        want(g, n, IN_BN, 2, n1, 1, err, errlen) || want(g, n, IN_DDT, 2, h1, 1, err, errlen) ||
        want(g, n, IN_ANG, 2, na, 1, err, errlen) || want(g, n, IN_DTB, 0, h1, 1, err, errlen) ||
        want(g, n, IN_BB, 0, hn, 2, err, errlen))
        return -1;
    const int ha[2] = {*H, *NA};
    if (n->nin > IN_TH0 && want(g, n, IN_TH0, 1, ha, 2, err, errlen)) return -1;
    return 0;
}

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    int H, P, N, NA;
    if (dims(g, n, &H, &P, &N, &NA, err, errlen)) return -1;
    out[OUT_S] = ir_shape_make(4, (int[]){DIM_B, H, P, N});
    out[OUT_TH] = ir_shape_make(3, (int[]){DIM_B, H, NA});
    out[OUT_KR] = ir_shape_make(3, (int[]){DIM_B, H, N});
    out[OUT_V] = ir_shape_make(3, (int[]){DIM_B, H, P});
    for (int i = 0; i < OUT_N; i++) dt[i] = DT_F32;
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf in[IN_N + 1], out[OUT_N];
    for (int i = 0; i < n->nin; i++) in[i] = ref_get(c, n->in[i]);
    for (int i = 0; i < OUT_N; i++) out[i] = ref_get(c, n->out[i]);
    const ir_shape *xs = ref_shape(c, n->in[IN_X]);
    const long B = ref_B(c), S = ref_S(c), CH = n->ia[0];
    const int H = xs->d[2], P = xs->d[3], N = (int)in[IN_BN].feat, NA = (int)in[IN_ANG].feat;
    const long W = m3_states_width(P, N, (int)CH), PN = (long)P * N, full = S / CH;
    double *th = malloc(sizeof(double) * (size_t)NA);
    for (long b = 0; b < B; b++) {
        const long last = b * S + S - 1;
        for (int h = 0; h < H; h++) {
            /* read before any output is written: Theta may be updated in place over Theta0 */
            for (int i = 0; i < NA; i++)
                th[i] = n->nin > IN_TH0 ? in[IN_TH0].p[b * in[IN_TH0].ld + (long)h * NA + i] : 0.0;
            for (long s = 0; s < S; s++) {
                const long tok = b * S + s;
                const double DT = m3_dt_act(in[IN_DDT].p[tok * in[IN_DDT].ld + h] + in[IN_DTB].p[h], NULL);
                for (int i = 0; i < NA; i++)
                    th[i] = m3_wrap_angle(th[i] + DT * (PI_D * tanh(in[IN_ANG].p[tok * in[IN_ANG].ld + i])));
            }
            double *So = out[OUT_S].p + b * out[OUT_S].ld + (long)h * PN;
            for (long e = 0; e < PN; e++)
                So[e] = full ? in[IN_SAVED].p[(b * S + (full - 1) * CH + e / W) * in[IN_SAVED].ld + (long)h * W + e % W]
                             : 0.0;
            double *Th = out[OUT_TH].p + b * out[OUT_TH].ld + (long)h * NA;
            double *Kr = out[OUT_KR].p + b * out[OUT_KR].ld + (long)h * N;
            double *v = out[OUT_V].p + b * out[OUT_V].ld + (long)h * P;
            const double *bn = in[IN_BN].p + last * in[IN_BN].ld, *bb = in[IN_BB].p + (long)h * N;
            for (int i = 0; i < NA; i++) {
                Th[i] = th[i];
                const double k0 = bn[2 * i] + bb[2 * i], k1 = bn[2 * i + 1] + bb[2 * i + 1];
                Kr[2 * i] = k0 * cos(th[i]) - k1 * sin(th[i]);
                Kr[2 * i + 1] = k0 * sin(th[i]) + k1 * cos(th[i]);
            }
            for (int j = 2 * NA; j < N; j++) Kr[j] = bn[j] + bb[j];
            for (int p = 0; p < P; p++) v[p] = in[IN_X].p[last * in[IN_X].ld + (long)h * P + p];
        }
    }
    free(th);
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    const ir_shape *x = &g->t[n->in[IN_X]].shape;
    const double H = x->d[2], NA = g->t[n->in[IN_ANG]].shape.d[2];
    /* the angle sum: softplus, tanh, a multiply-add and the wrap per token, head and angle */
    return (double)B * (double)S * H * (NA * 6.0 + 4.0);
}

/* ---- kernel template ----
 * One work-group of NT work-items per (b, h). Each work-item sums the angle increments of a
 * contiguous block of tokens (computing DT once per token for all NA angles), wrapping after
 * every token as the step does; the NT partial angles are then added in a fixed tree, wrapped
 * at every level. No atomics, fixed order: deterministic. The copies (S from the last full
 * chunk's rows of `saved`, v, the rotated key) are strided over the work-group. */

#define KL(...) kg_line(k, __VA_ARGS__)
enum { NT = 256 };

static void emit_wrap(kgen *k, const char *a) {
    /* 2pi = 6.28318548f - 1.74845553e-7f (Cody-Waite), as the scan and step kernels wrap */
    KL("{ const float kq = (float)(long)(%s * 0.159154943f); %s = (%s - kq * 6.28318548f) + kq * 1.74845553e-7f; }",
       a, a, a);
    KL("if (%s < 0.0f) %s = (%s + 6.28318548f) - 1.74845553e-7f;", a, a, a);
}

static int emit(kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    const int node = (int)(n - g->n);
    const ir_shape *xs = &g->t[n->in[IN_X]].shape;
    const int H = xs->d[2], P = xs->d[3], N = (int)kg_feat(k, n->in[IN_BN]), NA = (int)kg_feat(k, n->in[IN_ANG]);
    const long CH = n->ia[0], W = m3_states_width(P, N, (int)CH), PN = (long)P * N;
    const long ldst = kg_ld(k, n->in[IN_SAVED]), ldx = kg_ld(k, n->in[IN_X]), ldb = kg_ld(k, n->in[IN_BN]),
               lddt = kg_ld(k, n->in[IN_DDT]), ldang = kg_ld(k, n->in[IN_ANG]);
    const long ldS = kg_ld(k, n->out[OUT_S]), ldT = kg_ld(k, n->out[OUT_TH]), ldK = kg_ld(k, n->out[OUT_KR]),
               ldV = kg_ld(k, n->out[OUT_V]);
    kg_begin(k, "mamba3_final", node, node + 1);
    kg_in(k, "st", n->in[IN_SAVED]);
    kg_in(k, "x", n->in[IN_X]);
    kg_in(k, "Bn", n->in[IN_BN]);
    kg_in(k, "ddt", n->in[IN_DDT]);
    kg_in(k, "ang", n->in[IN_ANG]);
    kg_in(k, "dtb", n->in[IN_DTB]);
    kg_in(k, "Bb", n->in[IN_BB]);
    const int init = n->nin > IN_TH0;
    if (init) kg_in(k, "Thi", n->in[IN_TH0]);
    kg_out(k, "So", n->out[OUT_S]);
    kg_out(k, "Tho", n->out[OUT_TH]);
    kg_out(k, "Kro", n->out[OUT_KR]);
    kg_out(k, "vo", n->out[OUT_V]);
    KL("const long b = GID_X / %d;", H);
    KL("const int h = (int)(GID_X - b * %d);", H);
    KL("const int lid = LID_X;");
    KL("LOCAL float red[%d];", NT);
    KL("LOCAL float sTh[%d];", NA);
    KL("const float dtbh = dtb[h];");
    KL("float acc[%d];", NA);
    KL("for (int i = 0; i < %d; i++) acc[i] = 0.0f;", NA);
    KL("const long per = (S + %d) / %d, lo = lid * per, hi = lo + per < S ? lo + per : S;", NT - 1, NT);
    KL("for (long s = lo; s < hi; s++) {");
    KL("const long tok = b * S + s;");
    KL("const float u = ddt[tok * %ldL + h] + dtbh;", lddt);
    KL("const float DT = u > 20.0f ? u : LOG1PF(EXPF(u));");
    KL("for (int i = 0; i < %d; i++) {", NA);
    KL("float a = acc[i] + DT * (3.14159265f * TANHF(ang[tok * %ldL + i]));", ldang);
    emit_wrap(k, "a");
    KL("acc[i] = a;");
    KL("}");
    KL("}");
    KL("for (int i = 0; i < %d; i++) {", NA);
    KL("red[lid] = acc[i];");
    KL("BARRIER();");
    KL("for (int w = %d; w > 0; w >>= 1) {", NT / 2);
    KL("if (lid < w) {");
    KL("float a = red[lid] + red[lid + w];");
    emit_wrap(k, "a");
    KL("red[lid] = a;");
    KL("}");
    KL("BARRIER();");
    KL("}");
    if (init) {
        /* the carried angle last, read before the barrier that precedes every write of Tho
         * (which may be Thi itself: the prefill graph updates its state in place) */
        KL("if (lid == 0) {");
        KL("float a = red[0] + Thi[b * %ldL + h * %d + i];", kg_ld(k, n->in[IN_TH0]), NA);
        emit_wrap(k, "a");
        KL("sTh[i] = a;");
        KL("}");
    } else {
        KL("if (lid == 0) sTh[i] = red[0];");
    }
    KL("BARRIER();");
    KL("}");
    KL("const long last = b * S + S - 1;");
    KL("for (int j = lid; j < %d; j += %d) Tho[b * %ldL + h * %d + j] = sTh[j];", NA, NT, ldT, NA);
    /* item j < NA rotates pair j; the rest copy the unrotated tail dims */
    KL("for (int j = lid; j < %d; j += %d) {", N - NA, NT);
    KL("GLOBAL float *kr = Kro + b * %ldL + h * %d;", ldK, N);
    KL("if (j < %d) {", NA);
    KL("const float c = COSF(sTh[j]), sn = SINF(sTh[j]);");
    KL("const float k0 = Bn[last * %ldL + 2 * j] + Bb[h * %d + 2 * j], k1 = Bn[last * %ldL + 2 * j + 1] + Bb[h * %d + 2 * j + 1];",
       ldb, N, ldb, N);
    KL("kr[2 * j] = k0 * c - k1 * sn;");
    KL("kr[2 * j + 1] = k0 * sn + k1 * c;");
    KL("} else {");
    KL("const int nn = %d + j;", NA);
    KL("kr[nn] = Bn[last * %ldL + nn] + Bb[h * %d + nn];", ldb, N);
    KL("}");
    KL("}");
    KL("for (int p = lid; p < %d; p += %d) vo[b * %ldL + h * %d + p] = x[last * %ldL + h * %d + p];", P, NT, ldV, P,
       ldx, P);
    KL("const long full = S / %ldL;", CH);
    KL("for (long e = lid; e < %ldL; e += %d)", PN, NT);
    KL("So[b * %ldL + h * %ldL + e] = full > 0 ? st[(b * S + (full - 1) * %ldL + e / %ldL) * %ldL + h * %ldL + e %% %ldL] : 0.0f;",
       ldS, PN, CH, W, ldst, W, W);
    kg_grid(k, 0, 0, H, 0, 0, 1);
    kg_block(k, NT, 1, 1);
    return kg_end(k);
}

const op_def op_mamba3_final = {
    .name = "mamba3_final",
    .nin = -IN_N, .nout = OUT_N,   /* 7, or 8 with Theta0 */
    .iattr = {"chunk", NULL},
    .fattr = {NULL},
    .ia_default = {64},
    .infer = infer,
    .grad = NULL,
    .ref = ref,
    .flops = flops,
    .emit = emit,
};
