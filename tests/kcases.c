#include "kcases.h"

#include "kernelcheck.h"
#include "op.h"

#include <stdio.h>
#include <string.h>

#define SH(...) ir_shape_make(sizeof((int[]){__VA_ARGS__}) / sizeof(int), (int[]){__VA_ARGS__})
/* the same as a constant initializer, for the static tables */
#define SHC(...) {(int)(sizeof((int[]){__VA_ARGS__}) / sizeof(int)), {__VA_ARGS__}}
#define F2 {DT_F32, DT_F32}
#define M3(H, P, N, NA) {SHC(DIM_B, DIM_S, H, P), SHC(DIM_B, DIM_S, N), SHC(DIM_B, DIM_S, N), SHC(DIM_B, DIM_S, H), \
                          SHC(DIM_B, DIM_S, H), SHC(DIM_B, DIM_S, H), SHC(DIM_B, DIM_S, NA), SHC(H), SHC(H, N), SHC(H, N), SHC(H)}
#define M3F(H, P, N, NA, W) {SHC(DIM_B, DIM_S, (H) * (W)), SHC(DIM_B, DIM_S, H, P), SHC(DIM_B, DIM_S, N), \
                              SHC(DIM_B, DIM_S, H), SHC(DIM_B, DIM_S, NA), SHC(H), SHC(H, N)}
/* the scan with a carried state (prefill): M3's inputs, then S0 [B,H,P,N], Theta0 [B,H,NA],
 * Kr0 [B,H,N], v0 [B,H,P] */
#define M3I(H, P, N, NA) {SHC(DIM_B, DIM_S, H, P), SHC(DIM_B, DIM_S, N), SHC(DIM_B, DIM_S, N), SHC(DIM_B, DIM_S, H), \
                           SHC(DIM_B, DIM_S, H), SHC(DIM_B, DIM_S, H), SHC(DIM_B, DIM_S, NA), SHC(H), SHC(H, N), SHC(H, N), SHC(H), \
                           SHC(DIM_B, H, P, N), SHC(DIM_B, H, NA), SHC(DIM_B, H, N), SHC(DIM_B, H, P)}
#define F15 {DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32}
#define M3FI(H, P, N, NA, W) {SHC(DIM_B, DIM_S, (H) * (W)), SHC(DIM_B, DIM_S, H, P), SHC(DIM_B, DIM_S, N), \
                               SHC(DIM_B, DIM_S, H), SHC(DIM_B, DIM_S, NA), SHC(H), SHC(H, N), SHC(DIM_B, H, NA)}
#define F8 {DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32}
/* attention_prefix(o, lse, q, K, V, pos) for H query heads, HKV kv heads, head dim DH, window W */
#define APX(H, HKV, DH, W, S) {"attention_prefix", 6, {SHC(DIM_B, DIM_S, H, DH), SHC(DIM_B, DIM_S, H), SHC(DIM_B, DIM_S, H, DH), \
                               SHC(DIM_B, W, HKV, DH), SHC(DIM_B, W, HKV, DH), SHC(DIM_B, DIM_S)}, \
                               {DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_I32}, {0}, {0}, 40, S, 0}
#define F7 {DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32}
#define F11 {DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32}
#define TABLE(name) const kcase_table name = {name##_c, (int)(sizeof name##_c / sizeof name##_c[0])}

static const kcase kcases_elementwise_c[] = {
        {"add", 2, {SHC(DIM_B, DIM_S, 5), SHC(DIM_B, DIM_S, 5)}, F2, {0}, {0}, 0, 0, 0},
        {"mul", 2, {SHC(DIM_B, DIM_S, 300), SHC(DIM_B, DIM_S, 300)}, F2, {0}, {0}, 0, 0, 0},
        {"silu", 1, {SHC(DIM_B, DIM_S, 3, 7)}, {DT_F32}, {0}, {0}, 0, 0, 0},
        {"copy", 1, {SHC(DIM_B, DIM_S, 9)}, {DT_F32}, {0}, {0}, 0, 0, 0},
    };
TABLE(kcases_elementwise);

static const kcase kcases_dense_c[] = {
        {"matmul", 2, {SHC(DIM_B, DIM_S, 7), SHC(5, 7)}, F2, {0}, {0}, 0, 0, 0},
        {"matmul", 2, {SHC(DIM_B, DIM_S, 67), SHC(129, 67)}, F2, {0}, {0}, 0, 0, 0},
        {"matmul", 2, {SHC(DIM_B, DIM_S, 7), SHC(7, 3)}, F2, {1}, {0}, 0, 0, 0},
        {"matmul", 2, {SHC(DIM_B, DIM_S, 2, 6), SHC(4, 6)}, F2, {0}, {0}, 0, 0, 0},
        {"rmsnorm", 2, {SHC(DIM_B, DIM_S, 9), SHC(9)}, F2, {0}, {1e-5}, 0, 0, 0},
        {"rmsnorm", 2, {SHC(DIM_B, DIM_S, 130), SHC(130)}, F2, {0}, {1e-5}, 0, 0, 0},
        /* more rows than dw chunks: several team steps per chunk, a ragged last step */
        {"rmsnorm", 2, {SHC(DIM_B, DIM_S, 384), SHC(384)}, F2, {0}, {1e-5}, 0, 1100, 0},
        {"rmsnorm", 2, {SHC(DIM_B, DIM_S, 2, 9), SHC(9)}, F2, {0}, {1e-5}, 0, 700, 0},
        {"embedding", 2, {SHC(DIM_B, DIM_S), SHC(11, 4)}, {DT_I32, DT_F32}, {0}, {0}, 11, 0, 0},
        {"embedding", 2, {SHC(DIM_B, DIM_S), SHC(256, 33)}, {DT_I32, DT_F32}, {0}, {0}, 256, 0, 0},
        /* more tokens than backward chunks; more ids than one LOCAL block of 256 */
        {"embedding", 2, {SHC(DIM_B, DIM_S), SHC(256, 40)}, {DT_I32, DT_F32}, {0}, {0}, 256, 1100, 0},
        {"embedding", 2, {SHC(DIM_B, DIM_S), SHC(300, 33)}, {DT_I32, DT_F32}, {0}, {0}, 300, 600, 0},
        {"cross_entropy", 2, {SHC(DIM_B, DIM_S, 13), SHC(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 13, 0, 0},
        {"cross_entropy", 2, {SHC(DIM_B, DIM_S, 256), SHC(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 256, 0, 0},
        /* rows > 256: the mean's threads add several rows each */
        {"cross_entropy", 2, {SHC(DIM_B, DIM_S, 256), SHC(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 256, 700, 0},
    };
TABLE(kcases_dense);

static const kcase kcases_attention_c[] = {
        {"rope", 1, {SHC(DIM_B, DIM_S, 3, 8)}, {DT_F32}, {0, 3}, {0}, 0, 0, 0},
        {"rope", 1, {SHC(DIM_B, DIM_S, 2, 64)}, {DT_F32}, {0}, {0}, 0, 0, 0},
        {"attention", 3, {SHC(DIM_B, DIM_S, 4, 8), SHC(DIM_B, DIM_S, 2, 8), SHC(DIM_B, DIM_S, 2, 8)}, {DT_F32, DT_F32, DT_F32}, {3}, {0}, 0, 37, 0},
        {"attention", 3, {SHC(DIM_B, DIM_S, 2, 64), SHC(DIM_B, DIM_S, 2, 64), SHC(DIM_B, DIM_S, 2, 64)}, {DT_F32, DT_F32, DT_F32}, {100}, {0}, 0, 37, 0},
        {"attention", 3, {SHC(DIM_B, DIM_S, 1, 16), SHC(DIM_B, DIM_S, 1, 16), SHC(DIM_B, DIM_S, 1, 16)}, {DT_F32, DT_F32, DT_F32}, {1}, {0}, 0, 20, 0},
        {"attention", 3, {SHC(DIM_B, DIM_S, 6, 32), SHC(DIM_B, DIM_S, 3, 32), SHC(DIM_B, DIM_S, 3, 32)}, {DT_F32, DT_F32, DT_F32}, {17}, {0}, 0, 70, 0},
        /* realm-9m's heads (6 of 64) with a window shorter than S: many key and query blocks */
        {"attention", 3, {SHC(DIM_B, DIM_S, 6, 64), SHC(DIM_B, DIM_S, 6, 64), SHC(DIM_B, DIM_S, 6, 64)}, {DT_F32, DT_F32, DT_F32}, {96}, {0}, 0, 200, 0},
        /* GQA at head dim 64, a window that is no multiple of the tile edge */
        {"attention", 3, {SHC(DIM_B, DIM_S, 6, 64), SHC(DIM_B, DIM_S, 2, 64), SHC(DIM_B, DIM_S, 2, 64)}, {DT_F32, DT_F32, DT_F32}, {40}, {0}, 0, 77, 0},
        /* head dim 6: padded to 8 inside the tiles */
        {"attention", 3, {SHC(DIM_B, DIM_S, 2, 6), SHC(DIM_B, DIM_S, 1, 6), SHC(DIM_B, DIM_S, 1, 6)}, {DT_F32, DT_F32, DT_F32}, {5}, {0}, 0, 23, 0},
        /* window longer than the sequence: plain causal */
        {"attention", 3, {SHC(DIM_B, DIM_S, 2, 16), SHC(DIM_B, DIM_S, 2, 16), SHC(DIM_B, DIM_S, 2, 16)}, {DT_F32, DT_F32, DT_F32}, {1000}, {0}, 0, 70, 0},
        /* the prefill rings, continuing an old ring from a first position drawn in [0, 40): window
         * shorter than S (slots overwritten), longer (old slots kept) */
        {"ring_fill", 3, {SHC(DIM_B, DIM_S, 2, 6), SHC(DIM_B, 5, 2, 6), SHC(DIM_B, DIM_S)}, {DT_F32, DT_F32, DT_I32}, {0}, {0}, 40, 23, 0},
        {"ring_fill", 3, {SHC(DIM_B, DIM_S, 3, 64), SHC(DIM_B, 40, 3, 64), SHC(DIM_B, DIM_S)}, {DT_F32, DT_F32, DT_I32}, {0}, {0}, 40, 13, 0},
        /* the previous turns' ring as a prefix (o, lse, q, K, V, pos; first positions in [0, 40),
         * so some rows start at 0 and see no ring): window shorter than S, longer, GQA at head
         * dim 64, window 1 (no prefix at all) */
        APX(2, 2, 6, 5, 23), APX(4, 2, 8, 40, 13), APX(6, 2, 64, 9, 20), APX(2, 1, 4, 1, 7),
        /* heads too wide for the backward's tiles: the per-row fallback */
        {"attention", 3, {SHC(DIM_B, DIM_S, 1, 800), SHC(DIM_B, DIM_S, 1, 800), SHC(DIM_B, DIM_S, 1, 800)}, {DT_F32, DT_F32, DT_F32}, {4}, {0}, 0, 9, 0},
    };
TABLE(kcases_attention);

/* Every case has H >= 2: dD (and d dt_bias) are sums over all tokens of terms of either sign,
 * and one head's sum can cancel to a value whose fp32 error (from its fp32 terms) exceeds the
 * relative tolerance; normwise over two heads that needs both to cancel at once. */
static const kcase kcases_mamba3_c[] = {
        {"mamba3_scan", 11, M3(2, 8, 8, 2), F11, {4}, {0}, 0, 13, 0},
        {"mamba3_scan", 11, M3(3, 16, 16, 4), F11, {16}, {0}, 0, 37, 0},
        {"mamba3_scan", 11, M3(2, 4, 8, 1), F11, {64}, {0}, 0, 9, 0},
        {"mamba3_scan", 11, M3(2, 3, 6, 3), F11, {4}, {0}, 0, 16, 0},     /* S a multiple of chunk */
        {"mamba3_scan", 11, M3(2, 5, 4, 1), F11, {1}, {0}, 0, 7, 0},      /* chunk 1 */
        {"mamba3_scan", 11, M3(2, 300, 4, 1), F11, {8}, {0}, 0, 13, 0},   /* P > 256: two rows per item */
        {"mamba3_scan", 11, M3(2, 64, 64, 16), F11, {64}, {0}, 0, 150, 0}, /* realm-9m's head shape */
        {"mamba3_scan", 11, M3(2, 2, 8, 4), F11, {3}, {0}, 0, 10, 0},     /* chunked forward: NA > P, odd chunk */
        {"mamba3_scan", 11, M3(2, 5, 7, 2), F11, {5}, {0}, 0, 23, 0},     /* odd N past the rotated pairs */
        {"mamba3_scan", 11, M3(2, 8, 8, 2), F11, {4}, {0}, 0, 61, 0},     /* more chunks than the walks' slices */
        /* from a carried state (S0, Theta0, Kr0, v0): the chunked kernels (a partial last chunk,
         * S a multiple of the chunk, shorter than one chunk: only chunk 0 enters from the init),
         * realm-9m's head shape, and the sequential kernel (P > 256) */
        {"mamba3_scan", 15, M3I(2, 8, 8, 2), F15, {4}, {0}, 0, 13, 1},
        {"mamba3_scan", 15, M3I(3, 16, 16, 4), F15, {16}, {0}, 0, 32, 1},
        {"mamba3_scan", 15, M3I(2, 5, 7, 2), F15, {8}, {0}, 0, 5, 1},
        {"mamba3_scan", 15, M3I(2, 64, 64, 16), F15, {64}, {0}, 0, 150, 1},
        {"mamba3_scan", 15, M3I(2, 300, 4, 1), F15, {8}, {0}, 0, 13, 1},
        {"mamba3_scan", 15, M3I(2, 8, 8, 2), F15, {4}, {0}, 0, 61, 1},    /* more chunks than the walk's slices */
        /* the prefill hand-over: saved [B,S,H*W] (W = ceil(P*N/chunk)), x, Bn, dd_dt, angles,
         * dt_bias, B_bias; S a multiple of the chunk, not one (the last full chunk's rows), and
         * shorter than one chunk (zeros) */
        {"mamba3_final", 7, M3F(2, 8, 8, 2, 16), F7, {4}, {0}, 0, 16, 0},
        {"mamba3_final", 7, M3F(2, 8, 8, 2, 16), F7, {4}, {0}, 0, 13, 0},
        {"mamba3_final", 7, M3F(2, 8, 8, 2, 16), F7, {4}, {0}, 0, 3, 0},
        /* the angle continuing a carried Theta0 */
        {"mamba3_final", 8, M3FI(2, 8, 8, 2, 16), F8, {4}, {0}, 0, 16, 0},
        {"mamba3_final", 8, M3FI(2, 8, 8, 2, 16), F8, {4}, {0}, 0, 3, 0},
    };
TABLE(kcases_mamba3);

/* The shapes that reach the corners of the scan's bf16 tensor-core kernels (test_bf16.c runs
 * them in bf16 plans; the fp32 suites may too): partial last chunks, S a multiple of the chunk,
 * P != N, NA < N/2 and NA = N/2, P and N no multiples of a fragment, odd N, chunks that are no
 * multiple of 16 (padded rows) and of five warps. */
static const kcase kcases_mamba3_tc_c[] = {
        {"mamba3_scan", 11, M3(2, 64, 64, 16), F11, {64}, {0}, 0, 150, 0},   /* realm-9m's heads, 22 tokens in the last chunk */
        {"mamba3_scan", 11, M3(2, 64, 64, 16), F11, {64}, {0}, 0, 128, 0},   /* S a multiple of the chunk */
        {"mamba3_scan", 11, M3(3, 32, 64, 8), F11, {64}, {0}, 0, 100, 0},    /* P < N, NA = N/8 */
        {"mamba3_scan", 11, M3(2, 64, 32, 4), F11, {32}, {0}, 0, 77, 0},     /* P > N */
        {"mamba3_scan", 11, M3(1, 20, 24, 3), F11, {16}, {0}, 0, 40, 0},     /* P, N no multiple of 8, 16 */
        {"mamba3_scan", 11, M3(2, 16, 7, 2), F11, {8}, {0}, 0, 23, 0},       /* odd N; chunk 8 in a 16-row tile */
        {"mamba3_scan", 11, M3(1, 48, 40, 10), F11, {72}, {0}, 0, 230, 0},   /* five warps, 72 of 80 rows */
        {"mamba3_scan", 11, M3(1, 8, 16, 8), F11, {20}, {0}, 0, 45, 0},      /* every dim rotated */
    };
TABLE(kcases_mamba3_tc);

/* Long sums in fp32, checked at a looser tolerance (kcases_long_tol): mamba3_final's Theta
 * adds all 300 tokens' DT * pi * tanh(angle), each rounded by ~1e-7 of its size, ~1e-5 rad at
 * the end, which the rotated key k_prev carries (1e-5 normwise failed on some seeds). */
static const kcase kcases_mamba3_long_c[] = {
        {"mamba3_final", 7, M3F(3, 16, 7, 3, 7), F7, {16}, {0}, 0, 300, 0},   /* odd N; more tokens than work-items */
    };
TABLE(kcases_mamba3_long);
const double kcases_long_tol = 5e-5;

static const kcase kcases_dense_edges_c[] = {
        {"matmul", 2, {SHC(DIM_B, DIM_S, 70), SHC(130, 70)}, F2, {0}, {0}, 0, 100, 0},
        {"matmul", 2, {SHC(DIM_B, DIM_S, 3, 5), SHC(5, 70)}, F2, {1}, {0}, 0, 50, 0},
        {"matmul", 2, {SHC(6, 7), SHC(5, 7)}, F2, {0}, {0}, 0, 0, 0},
        {"rmsnorm", 2, {SHC(DIM_B, DIM_S, 300), SHC(300)}, F2, {0}, {1e-5}, 0, 40, 0},
        {"rmsnorm", 2, {SHC(DIM_B, DIM_S, 2, 9), SHC(9)}, F2, {0}, {1e-3}, 0, 0, 0},
        {"embedding", 2, {SHC(DIM_B, DIM_S), SHC(7, 300)}, {DT_I32, DT_F32}, {0}, {0}, 7, 300, 0},
        {"cross_entropy", 2, {SHC(DIM_B, DIM_S, 300), SHC(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 300, 200, 0},
        {"cross_entropy", 2, {SHC(DIM_B, DIM_S, 2, 5), SHC(DIM_B, DIM_S, 2)}, {DT_F32, DT_I32}, {0}, {0}, 5, 0, 0},
        /* weight gradients split over rows (split-K): 85 tiles take fewer than the most splits,
         * 840 rows fill some splits, end inside one and leave the rest empty */
        {"matmul_wgrad", 2, {SHC(DIM_B, DIM_S, 1030), SHC(DIM_B, DIM_S, 260)}, F2, {0}, {0}, 0, 420, 0},
        /* three rows per token, 600 rows: more non-empty splits than one, a ragged last one */
        {"matmul_wgrad", 2, {SHC(DIM_B, DIM_S, 3, 70), SHC(DIM_B, DIM_S, 3, 33)}, F2, {0}, {0}, 0, 100, 0},
        /* one row in all: every split but the first is empty */
        {"matmul_wgrad", 2, {SHC(1, 5), SHC(1, 9)}, F2, {0}, {0}, 0, 0, 0},
    };
TABLE(kcases_dense_edges);

/* forward node + gradient-rule nodes fed by a random upstream gradient */
int kc_build_case(const kcase *kc, ir_graph *g, char *err, size_t len) {
    ir_init_graph(g);
    int in[16];
    for (int i = 0; i < kc->nin; i++)
        in[i] = ir_tensor_new(g, NULL, kc->in[i], kc->dt[i], kc->dt[i] == DT_I32 ? ROLE_INPUT : ROLE_PARAM);
    const op_def *d = op_get(op_find(kc->op));
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    memcpy(ia, d->ia_default, sizeof ia);
    memcpy(fa, d->fa_default, sizeof fa);
    for (int i = 0; i < IR_MAX_IATTR; i++) if (kc->ia[i]) ia[i] = kc->ia[i];
    for (int i = 0; i < IR_MAX_FATTR; i++) if (kc->fa[i]) fa[i] = kc->fa[i];
    int out[IR_MAX_IO];
    if (ir_emit(g, kc->op, in, kc->nin, ia, fa, out) < 0) {
        snprintf(err, len, "%s", g->err);
        return -1;
    }
    if (!d->grad || kc->fwd_only) return 0;
    int dout[IR_MAX_IO], din[IR_MAX_IO];
    for (int i = 0; i < IR_MAX_IO; i++) dout[i] = din[i] = -1;
    dout[0] = ir_tensor_new(g, "dy", g->t[out[0]].shape, DT_F32, ROLE_PARAM);
    g->backward_start = g->nn;
    if (d->grad(g, 0, dout, din) < 0) {
        snprintf(err, len, "grad: %s", g->err);
        return -1;
    }
    return 0;
}

void kc_run_table(tctx *t, backend *bk, const char *label, kcase_table tab, double tol) {
    for (int i = 0; i < tab.n && !t->failed; i++) {
        const kcase *kc = &tab.c[i];
        ir_graph g;
        char err[600];
        if (kc_build_case(kc, &g, err, sizeof err) < 0) {
            t_fail(t, __FILE__, __LINE__, "%s %s case %d: %s", label, kc->op, i, err);
            ir_free(&g);
            break;
        }
        kc_check_graph(t, bk, &g, 2, kc->S ? kc->S : 13, tol, kc->vocab ? kc->vocab : 1);
        if (t->failed) {
            char m[sizeof t->msg];
            snprintf(m, sizeof m, "%s", t->msg);
            snprintf(t->msg, sizeof t->msg, "%s %s case %d: %.900s", label, kc->op, i, m);
        }
        ir_free(&g);
    }
}

int kc_build_dense_views(ir_graph *g) {
    ir_init_graph(g);
    int xa = ir_tensor_new(g, "xa", SH(DIM_B, DIM_S, 40), DT_F32, ROLE_PARAM);
    int xb = ir_tensor_new(g, "xb", SH(DIM_B, DIM_S, 23), DT_F32, ROLE_PARAM);
    int ya = ir_tensor_new(g, "ya", SH(DIM_B, DIM_S, 30), DT_F32, ROLE_PARAM);
    int ids = ir_tensor_new(g, "ids", SH(DIM_B, DIM_S, 3), DT_I32, ROLE_INPUT);
    int w = ir_tensor_new(g, "w", SH(9, 7), DT_F32, ROLE_PARAM);
    int w2 = ir_tensor_new(g, "w2", SH(7, 5), DT_F32, ROLE_PARAM);
    int nw = ir_tensor_new(g, "nw", SH(13), DT_F32, ROLE_PARAM);
    int tab = ir_tensor_new(g, "tab", SH(11, 6), DT_F32, ROLE_PARAM);
    int dl = ir_tensor_new(g, "dl", SH(1), DT_F32, ROLE_PARAM);
    int x7 = ir_view(g, xa, SH(DIM_B, DIM_S, 2, 7), 3, "x7");
    int x13 = ir_view(g, xa, SH(DIM_B, DIM_S, 2, 13), 11, "x13");
    int b6 = ir_view(g, xb, SH(DIM_B, DIM_S, 2, 6), 4, "b6");
    int d13 = ir_view(g, xb, SH(DIM_B, DIM_S, 13), 9, "d13");
    int y9 = ir_view(g, ya, SH(DIM_B, DIM_S, 2, 9), 5, "y9");
    int e6 = ir_view(g, ya, SH(DIM_B, DIM_S, 6), 23, "e6");
    int a13 = ir_view(g, ya, SH(DIM_B, DIM_S, 2, 13), 2, "a13");
    int tg = ir_view(g, ids, SH(DIM_B, DIM_S, 2), 1, "tg");
    int tok = ir_view(g, ids, SH(DIM_B, DIM_S), 2, "tok");
    int out[IR_MAX_IO];
    long tr1[IR_MAX_IATTR] = {1};
    double eps[IR_MAX_FATTR] = {1e-5};
    long vocab[IR_MAX_IATTR] = {11};
    if (!(ir_emit_into(g, "matmul", (int[]){x7, w}, 2, NULL, NULL, y9) >= 0)) return -1;
    if (!(ir_emit(g, "matmul", (int[]){x7, w2}, 2, tr1, NULL, out) == 1)) return -1;
    if (!(ir_emit(g, "matmul_wgrad", (int[]){x7, b6}, 2, NULL, NULL, out) == 2)) return -1;
    if (!(ir_emit(g, "rmsnorm", (int[]){x13, nw}, 2, NULL, eps, out) == 1)) return -1;
    if (!(ir_emit(g, "rmsnorm_bwd", (int[]){x13, nw, x13}, 3, NULL, eps, out) == 3)) return -1;
    /* with the accumulate input autodiff folds the residual stream's gradient into */
    if (!(ir_emit(g, "rmsnorm_bwd", (int[]){x13, nw, x13, a13}, 4, NULL, eps, out) == 3)) return -1;
    if (!(ir_emit(g, "cross_entropy", (int[]){x13, tg}, 2, NULL, NULL, out) == 2)) return -1;
    if (!(ir_emit(g, "cross_entropy_bwd", (int[]){x13, tg, dl}, 3, NULL, NULL, out) == 1)) return -1;
    if (!(ir_emit_into(g, "embedding", (int[]){tok, tab}, 2, NULL, NULL, e6) >= 0)) return -1;
    if (!(ir_emit(g, "embedding_bwd", (int[]){tok, d13}, 2, vocab, NULL, out) == 2)) return -1;
    return 0;
}
