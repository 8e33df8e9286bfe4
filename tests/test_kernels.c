/* Every kernel template, rendered for OpenCL and run on PoCL, against the fp64 reference:
 * one small graph per primitive (its forward and the nodes its gradient rule emits) on
 * awkward sizes, then whole models. */
#include "exec.h"
#include "frontend.h"
#include "kernelcheck.h"
#include "plan.h"
#include "op.h"
#include "optimizer.h"
#include "reference.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SH(...) ir_shape_make(sizeof((int[]){__VA_ARGS__}) / sizeof(int), (int[]){__VA_ARGS__})

typedef struct {
    const char *op;
    int nin;
    ir_shape in[12];
    ir_dtype dt[12];
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    int vocab;
    long S;
} kcase;

/* forward node + gradient-rule nodes fed by a random upstream gradient */
static int build_case(const kcase *kc, ir_graph *g, char *err, size_t len) {
    ir_init_graph(g);
    int in[12];
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
    if (!d->grad) return 0;
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

static void run_cases(tctx *t, const kcase *cases, int n) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    for (int i = 0; i < n && !t->failed; i++) {
        ir_graph g;
        char err[600];
        if (build_case(&cases[i], &g, err, sizeof err) < 0) {
            t_fail(t, __FILE__, __LINE__, "%s case %d: %s", cases[i].op, i, err);
            ir_free(&g);
            break;
        }
        kc_check_graph(t, bk, &g, 2, cases[i].S ? cases[i].S : 13, 1e-5, cases[i].vocab ? cases[i].vocab : 1);
        if (t->failed) {
            char m[sizeof t->msg];
            snprintf(m, sizeof m, "%s", t->msg);
            snprintf(t->msg, sizeof t->msg, "%s case %d: %.900s", cases[i].op, i, m);
        }
        ir_free(&g);
    }
    bk_destroy(bk);
}

#define F2 {DT_F32, DT_F32}

TEST(kernels_elementwise) {
    const kcase c[] = {
        {"add", 2, {SH(DIM_B, DIM_S, 5), SH(DIM_B, DIM_S, 5)}, F2, {0}, {0}, 0, 0},
        {"mul", 2, {SH(DIM_B, DIM_S, 300), SH(DIM_B, DIM_S, 300)}, F2, {0}, {0}, 0, 0},
        {"silu", 1, {SH(DIM_B, DIM_S, 3, 7)}, {DT_F32}, {0}, {0}, 0, 0},
        {"copy", 1, {SH(DIM_B, DIM_S, 9)}, {DT_F32}, {0}, {0}, 0, 0},
    };
    run_cases(t, c, sizeof c / sizeof c[0]);
}

TEST(kernels_dense) {
    const kcase c[] = {
        {"matmul", 2, {SH(DIM_B, DIM_S, 7), SH(5, 7)}, F2, {0}, {0}, 0, 0},
        {"matmul", 2, {SH(DIM_B, DIM_S, 67), SH(129, 67)}, F2, {0}, {0}, 0, 0},
        {"matmul", 2, {SH(DIM_B, DIM_S, 7), SH(7, 3)}, F2, {1}, {0}, 0, 0},
        {"matmul", 2, {SH(DIM_B, DIM_S, 2, 6), SH(4, 6)}, F2, {0}, {0}, 0, 0},
        {"rmsnorm", 2, {SH(DIM_B, DIM_S, 9), SH(9)}, F2, {0}, {1e-5}, 0, 0},
        {"rmsnorm", 2, {SH(DIM_B, DIM_S, 130), SH(130)}, F2, {0}, {1e-5}, 0, 0},
        /* more rows than dw chunks: several team steps per chunk, a ragged last step */
        {"rmsnorm", 2, {SH(DIM_B, DIM_S, 384), SH(384)}, F2, {0}, {1e-5}, 0, 1100},
        {"rmsnorm", 2, {SH(DIM_B, DIM_S, 2, 9), SH(9)}, F2, {0}, {1e-5}, 0, 700},
        {"embedding", 2, {SH(DIM_B, DIM_S), SH(11, 4)}, {DT_I32, DT_F32}, {0}, {0}, 11, 0},
        {"embedding", 2, {SH(DIM_B, DIM_S), SH(256, 33)}, {DT_I32, DT_F32}, {0}, {0}, 256, 0},
        /* more tokens than backward chunks; more ids than one LOCAL block of 256 */
        {"embedding", 2, {SH(DIM_B, DIM_S), SH(256, 40)}, {DT_I32, DT_F32}, {0}, {0}, 256, 1100},
        {"embedding", 2, {SH(DIM_B, DIM_S), SH(300, 33)}, {DT_I32, DT_F32}, {0}, {0}, 300, 600},
        {"cross_entropy", 2, {SH(DIM_B, DIM_S, 13), SH(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 13, 0},
        {"cross_entropy", 2, {SH(DIM_B, DIM_S, 256), SH(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 256, 0},
        /* rows > 256: the mean's threads add several rows each */
        {"cross_entropy", 2, {SH(DIM_B, DIM_S, 256), SH(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 256, 700},
    };
    run_cases(t, c, sizeof c / sizeof c[0]);
}

TEST(kernels_attention) {
    const kcase c[] = {
        {"rope", 1, {SH(DIM_B, DIM_S, 3, 8)}, {DT_F32}, {0, 3}, {0}, 0, 0},
        {"rope", 1, {SH(DIM_B, DIM_S, 2, 64)}, {DT_F32}, {0}, {0}, 0, 0},
        {"attention", 3, {SH(DIM_B, DIM_S, 4, 8), SH(DIM_B, DIM_S, 2, 8), SH(DIM_B, DIM_S, 2, 8)}, {DT_F32, DT_F32, DT_F32}, {3}, {0}, 0, 37},
        {"attention", 3, {SH(DIM_B, DIM_S, 2, 64), SH(DIM_B, DIM_S, 2, 64), SH(DIM_B, DIM_S, 2, 64)}, {DT_F32, DT_F32, DT_F32}, {100}, {0}, 0, 37},
        {"attention", 3, {SH(DIM_B, DIM_S, 1, 16), SH(DIM_B, DIM_S, 1, 16), SH(DIM_B, DIM_S, 1, 16)}, {DT_F32, DT_F32, DT_F32}, {1}, {0}, 0, 20},
        {"attention", 3, {SH(DIM_B, DIM_S, 6, 32), SH(DIM_B, DIM_S, 3, 32), SH(DIM_B, DIM_S, 3, 32)}, {DT_F32, DT_F32, DT_F32}, {17}, {0}, 0, 70},
        /* realm-9m's heads (6 of 64) with a window shorter than S: many key and query blocks */
        {"attention", 3, {SH(DIM_B, DIM_S, 6, 64), SH(DIM_B, DIM_S, 6, 64), SH(DIM_B, DIM_S, 6, 64)}, {DT_F32, DT_F32, DT_F32}, {96}, {0}, 0, 200},
        /* GQA at head dim 64, a window that is no multiple of the tile edge */
        {"attention", 3, {SH(DIM_B, DIM_S, 6, 64), SH(DIM_B, DIM_S, 2, 64), SH(DIM_B, DIM_S, 2, 64)}, {DT_F32, DT_F32, DT_F32}, {40}, {0}, 0, 77},
        /* head dim 6: padded to 8 inside the tiles */
        {"attention", 3, {SH(DIM_B, DIM_S, 2, 6), SH(DIM_B, DIM_S, 1, 6), SH(DIM_B, DIM_S, 1, 6)}, {DT_F32, DT_F32, DT_F32}, {5}, {0}, 0, 23},
        /* window longer than the sequence: plain causal */
        {"attention", 3, {SH(DIM_B, DIM_S, 2, 16), SH(DIM_B, DIM_S, 2, 16), SH(DIM_B, DIM_S, 2, 16)}, {DT_F32, DT_F32, DT_F32}, {1000}, {0}, 0, 70},
        /* heads too wide for the backward's tiles: the per-row fallback */
        {"attention", 3, {SH(DIM_B, DIM_S, 1, 800), SH(DIM_B, DIM_S, 1, 800), SH(DIM_B, DIM_S, 1, 800)}, {DT_F32, DT_F32, DT_F32}, {4}, {0}, 0, 9},
    };
    run_cases(t, c, sizeof c / sizeof c[0]);
}

TEST(kernels_mamba3) {
#define M3(H, P, N, NA) {SH(DIM_B, DIM_S, H, P), SH(DIM_B, DIM_S, N), SH(DIM_B, DIM_S, N), SH(DIM_B, DIM_S, H), \
                          SH(DIM_B, DIM_S, H), SH(DIM_B, DIM_S, H), SH(DIM_B, DIM_S, NA), SH(H), SH(H, N), SH(H, N), SH(H)}
#define F11 {DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32, DT_F32}
    const kcase c[] = {
        {"mamba3_scan", 11, M3(2, 8, 8, 2), F11, {4}, {0}, 0, 13},
        {"mamba3_scan", 11, M3(3, 16, 16, 4), F11, {16}, {0}, 0, 37},
        {"mamba3_scan", 11, M3(1, 4, 8, 1), F11, {64}, {0}, 0, 9},
        {"mamba3_scan", 11, M3(2, 3, 6, 3), F11, {4}, {0}, 0, 16},     /* S a multiple of chunk */
        {"mamba3_scan", 11, M3(2, 5, 4, 1), F11, {1}, {0}, 0, 7},      /* chunk 1 */
        {"mamba3_scan", 11, M3(1, 300, 4, 1), F11, {8}, {0}, 0, 13},   /* P > 256: two rows per item */
    };
    run_cases(t, c, sizeof c / sizeof c[0]);
}

static void check_model(tctx *t, const char *path, long B, long S) {
    realm_model m;
    char err[1024];
    CHECK(model_load(path, &m, err, sizeof err) == 0, "%s", err);
    CHECK(ir_autodiff(&m.g) == 0, "autodiff: %s", m.g.err);
    backend *bk = kc_opencl(t);
    if (bk) {
        kc_check_graph(t, bk, &m.g, B, S, 1e-5, m.vocab);
        bk_destroy(bk);
    }
    model_free(&m);
}

TEST(kernels_tiny_model_every_launch) { check_model(t, "models/tiny.lua", 2, 37); }

/* The optimizer nodes: sumsq over many gradients (more than one node's worth) and AdamW. */
TEST(kernels_optimizer) {
    ir_graph g;
    ir_init_graph(&g);
    int shapes[15][2] = {{3, 5}, {7, 1}, {300, 2}, {1, 1}, {4, 4}, {2, 9}, {5, 5}, {6, 1}, {1, 13},
                         {8, 8}, {3, 3}, {2, 2}, {9, 1}, {1, 2}, {17, 3}};
    for (int i = 0; i < 15; i++) {
        int p = ir_tensor_new(&g, NULL, SH(shapes[i][0], shapes[i][1]), DT_F32, ROLE_PARAM);
        g.t[p].init = i % 2 ? INIT_NORMAL : INIT_ONES;
        char name[32];
        snprintf(name, sizeof name, "grad%d", i);
        g.t[p].grad = ir_tensor_new(&g, name, SH(shapes[i][0], shapes[i][1]), DT_F32, ROLE_ACT);
    }
    ir_optimizer o;
    CHECK(ir_add_optimizer(&g, &o) == 0, "%s", g.err);
    backend *bk = kc_opencl(t);
    if (bk) {
        kc_check_graph(t, bk, &g, 1, 1, 1e-5, 1);
        bk_destroy(bk);
    }
    ir_free(&g);
}

/* AdamW's first step from zero moments moves each weight by about lr * sign(grad), plus the
 * decoupled decay: an independent statement of the update rule. */
TEST(optimizer_first_step) {
    ir_graph g;
    ir_init_graph(&g);
    int p = ir_tensor_new(&g, "w", SH(4, 3), DT_F32, ROLE_PARAM);
    g.t[p].init = INIT_NORMAL;
    g.t[p].grad = ir_tensor_new(&g, "dw", SH(4, 3), DT_F32, ROLE_ACT);
    ir_optimizer o;
    CHECK(ir_add_optimizer(&g, &o) == 0, "%s", g.err);
    ref_ctx *c = ref_create(&g, 1, 1);
    double w[12], dw[12];
    for (int i = 0; i < 12; i++) {
        w[i] = ref_data(c, p)[i] = t_normal(t);
        dw[i] = ref_data(c, g.t[p].grad)[i] = t_normal(t) * 1e-2;
    }
    for (int i = 0; i < g.nt; i++)
        if (g.t[i].role == ROLE_OPT) for (int k = 0; k < 12; k++) ref_data(c, i)[k] = 0;
    const double lr = 0.01, wd = 0.1, h[8] = {lr, 0.9, 0.95, 1e-12, wd, 0.1, 0.05, 1e9};
    for (int k = 0; k < 8; k++) ref_data(c, o.hyper)[k] = h[k];
    ref_run(c, o.first_node, g.nn);
    for (int i = 0; i < 12; i++) {
        double want = w[i] - lr * ((dw[i] > 0 ? 1 : -1) + wd * w[i]);
        CHECK(fabs(ref_data(c, p)[i] - want) < 1e-9, "w[%d] = %.12g, want %.12g", i, ref_data(c, p)[i], want);
    }
    ref_destroy(c);
    ir_free(&g);
}

/* Dense templates at sizes that cross tile and work-group edges (several row tiles, K and N
 * not multiples of the tile, rows of more than 256 values, more tokens than one id tile),
 * several rows per token, and a constant-shaped matmul. */
TEST(kernels_dense_edges) {
    const kcase c[] = {
        {"matmul", 2, {SH(DIM_B, DIM_S, 70), SH(130, 70)}, F2, {0}, {0}, 0, 100},
        {"matmul", 2, {SH(DIM_B, DIM_S, 3, 5), SH(5, 70)}, F2, {1}, {0}, 0, 50},
        {"matmul", 2, {SH(6, 7), SH(5, 7)}, F2, {0}, {0}, 0, 0},
        {"rmsnorm", 2, {SH(DIM_B, DIM_S, 300), SH(300)}, F2, {0}, {1e-5}, 0, 40},
        {"rmsnorm", 2, {SH(DIM_B, DIM_S, 2, 9), SH(9)}, F2, {0}, {1e-3}, 0, 0},
        {"embedding", 2, {SH(DIM_B, DIM_S), SH(7, 300)}, {DT_I32, DT_F32}, {0}, {0}, 7, 300},
        {"cross_entropy", 2, {SH(DIM_B, DIM_S, 300), SH(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 300, 200},
        {"cross_entropy", 2, {SH(DIM_B, DIM_S, 2, 5), SH(DIM_B, DIM_S, 2)}, {DT_F32, DT_I32}, {0}, {0}, 5, 0},
    };
    run_cases(t, c, sizeof c / sizeof c[0]);
}

/* The dense templates on strided views: inputs that are slices of wider tensors (token stride
 * larger than the row, a feature offset) and outputs written into slices. */
TEST(kernels_dense_views) {
    ir_graph g;
    ir_init_graph(&g);
    int xa = ir_tensor_new(&g, "xa", SH(DIM_B, DIM_S, 40), DT_F32, ROLE_PARAM);
    int xb = ir_tensor_new(&g, "xb", SH(DIM_B, DIM_S, 23), DT_F32, ROLE_PARAM);
    int ya = ir_tensor_new(&g, "ya", SH(DIM_B, DIM_S, 30), DT_F32, ROLE_PARAM);
    int ids = ir_tensor_new(&g, "ids", SH(DIM_B, DIM_S, 3), DT_I32, ROLE_INPUT);
    int w = ir_tensor_new(&g, "w", SH(9, 7), DT_F32, ROLE_PARAM);
    int w2 = ir_tensor_new(&g, "w2", SH(7, 5), DT_F32, ROLE_PARAM);
    int nw = ir_tensor_new(&g, "nw", SH(13), DT_F32, ROLE_PARAM);
    int tab = ir_tensor_new(&g, "tab", SH(11, 6), DT_F32, ROLE_PARAM);
    int dl = ir_tensor_new(&g, "dl", SH(1), DT_F32, ROLE_PARAM);
    int x7 = ir_view(&g, xa, SH(DIM_B, DIM_S, 2, 7), 3, "x7");
    int x13 = ir_view(&g, xa, SH(DIM_B, DIM_S, 2, 13), 11, "x13");
    int b6 = ir_view(&g, xb, SH(DIM_B, DIM_S, 2, 6), 4, "b6");
    int d13 = ir_view(&g, xb, SH(DIM_B, DIM_S, 13), 9, "d13");
    int y9 = ir_view(&g, ya, SH(DIM_B, DIM_S, 2, 9), 5, "y9");
    int e6 = ir_view(&g, ya, SH(DIM_B, DIM_S, 6), 23, "e6");
    int tg = ir_view(&g, ids, SH(DIM_B, DIM_S, 2), 1, "tg");
    int tok = ir_view(&g, ids, SH(DIM_B, DIM_S), 2, "tok");
    int out[IR_MAX_IO];
    long tr1[IR_MAX_IATTR] = {1};
    double eps[IR_MAX_FATTR] = {1e-5};
    long vocab[IR_MAX_IATTR] = {11};
    CHECK(ir_emit_into(&g, "matmul", (int[]){x7, w}, 2, NULL, NULL, y9) >= 0, "%s", g.err);
    CHECK(ir_emit(&g, "matmul", (int[]){x7, w2}, 2, tr1, NULL, out) == 1, "%s", g.err);
    CHECK(ir_emit(&g, "matmul_wgrad", (int[]){x7, b6}, 2, NULL, NULL, out) == 1, "%s", g.err);
    CHECK(ir_emit(&g, "rmsnorm", (int[]){x13, nw}, 2, NULL, eps, out) == 1, "%s", g.err);
    CHECK(ir_emit(&g, "rmsnorm_bwd", (int[]){x13, nw, x13}, 3, NULL, eps, out) == 3, "%s", g.err);
    CHECK(ir_emit(&g, "cross_entropy", (int[]){x13, tg}, 2, NULL, NULL, out) == 2, "%s", g.err);
    CHECK(ir_emit(&g, "cross_entropy_bwd", (int[]){x13, tg, dl}, 3, NULL, NULL, out) == 1, "%s", g.err);
    CHECK(ir_emit_into(&g, "embedding", (int[]){tok, tab}, 2, NULL, NULL, e6) >= 0, "%s", g.err);
    CHECK(ir_emit(&g, "embedding_bwd", (int[]){tok, d13}, 2, vocab, NULL, out) == 2, "%s", g.err);
    backend *bk = kc_opencl(t);
    if (bk) {
        kc_check_graph(t, bk, &g, 3, 11, 1e-5, 11);
        bk_destroy(bk);
    }
    ir_free(&g);
}

/* The whole plan end to end: forward, loss and backward run back to back on OpenCL from the
 * same parameters and bytes as the reference executor; the loss and every parameter gradient
 * match (<= 1e-5 normwise). */
TEST(kernels_tiny_model_end_to_end) {
    realm_model m;
    char err[4096];
    CHECK(model_load("models/tiny.lua", &m, err, sizeof err) == 0, "%s", err);
    CHECK(ir_autodiff(&m.g) == 0, "autodiff: %s", m.g.err);
    const ir_graph *g = &m.g;
    const long B = 2, S = 45;
    int keep[64], nkeep = 0;
    keep[nkeep++] = m.loss;
    for (int i = 0; i < g->nt && nkeep < 64; i++)
        if (g->t[i].role == ROLE_PARAM && g->t[i].base == i) keep[nkeep++] = g->t[i].grad;
    backend *bk = kc_opencl(t);
    if (!bk) {
        model_free(&m);
        return;
    }
    plan p = {0};
    plan_exec x = {0};
    int ok = plan_build(&p, g, 0, g->nn, "opencl", keep, nkeep, err, sizeof err) == 0;
    ok = ok && exec_create(&x, bk, &p, B, S, err, sizeof err) == 0;
    ref_ctx *c = ok ? ref_create(g, B, S) : NULL;
    float *buf = malloc(sizeof(float) * 256 * 64 * 8);
    double *hd = malloc(sizeof(double) * 256 * 64 * 8);
    double worst = 0;
    char worst_name[128] = "";
    if (ok) {
        ref_init_params(c, t_next(t));
        for (int i = 0; i < g->nt && ok; i++) {
            const ir_tensor *tt = &g->t[i];
            if (tt->base != i || (tt->role != ROLE_PARAM && tt->role != ROLE_INPUT)) continue;
            long n = ir_numel(&tt->shape, B, S);
            double *d = ref_data(c, i);
            for (long k = 0; k < n; k++) {
                if (tt->role == ROLE_INPUT) d[k] = (double)t_randint(t, 0, 255);
                else d[k] += 0.02 * t_normal(t);
                buf[k] = (float)d[k];
            }
            ok = exec_upload(&x, i, buf, err, sizeof err) == 0;
        }
        ok = ok && exec_run(&x, 0, p.kg.nl, err, sizeof err) == 0;
        ref_run(c, 0, g->nn);
        for (int k = 0; k < nkeep && ok; k++) {
            int tid = keep[k];
            long n = ir_numel(&g->t[tid].shape, B, S);
            ok = exec_download(&x, tid, buf, err, sizeof err) == 0;
            ref_buf rb = ref_get(c, tid);
            double *want = malloc(sizeof(double) * (size_t)n);
            for (long r = 0; r < rb.ntok; r++)
                for (long f = 0; f < rb.feat; f++) want[r * rb.feat + f] = rb.p[r * rb.ld + f];
            for (long q = 0; q < n; q++) hd[q] = buf[q];
            double e = t_relerr(hd, want, n);
            free(want);
            if (!(e <= worst)) {
                worst = e;
                snprintf(worst_name, sizeof worst_name, "%s", k == 0 ? "loss" : g->t[tid].name);
            }
        }
    }
    free(buf);
    free(hd);
    if (c) ref_destroy(c);
    if (x.arena) exec_destroy(&x);
    plan_free(&p);
    bk_destroy(bk);
    model_free(&m);
    CHECK(ok, "%s", err);
    CHECK(worst <= 1e-5, "%s differs from the reference: relative error %.3g", worst_name, worst);
}
