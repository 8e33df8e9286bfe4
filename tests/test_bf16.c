/* bf16 matmuls (--precision bf16): tensor-core kernels with fp32 accumulation.
 *
 * With REALM_GPU=1 (`make test-gpu`): every matmul / matmul_wgrad template in bf16 against the
 * fp64 reference on awkward sizes and strided views, whole models launch by launch (normwise
 * relative error <= 1e-2, design §8), a short realm-9m training whose losses track an fp32
 * run, and a timing table of realm-9m's matmuls fp32 vs bf16 (printed, never asserted: speed
 * is not a test). REALM_GPU_BACKEND=cuda only: bf16 has no OpenCL path.
 *
 * Always (no GPU): the bf16 plan of realm-9m compiles with NVRTC for sm_80, sm_90 and sm_120,
 * OpenCL ignores the option, and the CLI's --precision is checked. */
#include "exec.h"
#include "frontend.h"
#include "kcases.h"
#include "kernelcheck.h"
#include "op.h"
#include "optimizer.h"
#include "plan.h"
#include "precision.h"
#include "rng.h"
#include "session.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SH(...) ir_shape_make(sizeof((int[]){__VA_ARGS__}) / sizeof(int), (int[]){__VA_ARGS__})

static const plan_options bf16_on = {.bf16 = 1};

static backend *cuda_dev(tctx *t) {
    char err[2048];
    backend *bk = bk_create(BK_CUDA, 0, NULL, err, sizeof err);
    if (!bk) t_fail(t, __FILE__, __LINE__, "REALM_GPU=1 but no CUDA device: %s", err);
    return bk;
}

/* matmul (with its gradient rule: the other transposition and matmul_wgrad) on x [.., K] */
typedef struct {
    ir_shape x, w;
    int trans;
    long S;
} mcase;

/* dt: the storage of x, w and dy (bf16: every operand of the three products is bf16) */
static int build_matmul_dt(const mcase *c, ir_graph *g, ir_dtype dt) {
    ir_init_graph(g);
    int x = ir_tensor_new(g, "x", c->x, dt, ROLE_PARAM), w = ir_tensor_new(g, "w", c->w, dt, ROLE_PARAM);
    long ia[IR_MAX_IATTR] = {c->trans};
    int out[IR_MAX_IO];
    if (ir_emit(g, "matmul", (int[]){x, w}, 2, ia, NULL, out) < 0) return -1;
    int dout[IR_MAX_IO], din[IR_MAX_IO];
    for (int i = 0; i < IR_MAX_IO; i++) dout[i] = din[i] = -1;
    dout[0] = ir_tensor_new(g, "dy", g->t[out[0]].shape, dt, ROLE_PARAM);
    g->backward_start = g->nn;
    return op_get(op_find("matmul"))->grad(g, 0, dout, din);
}

static int build_matmul(const mcase *c, ir_graph *g) { return build_matmul_dt(c, g, DT_F32); }

/* The options a bf16 session on this device plans with: wgmma where the device is Hopper. */
static plan_options device_bf16(backend *bk, int wgmma) {
    return (plan_options){.bf16 = 1, .shared_max = (long)bk_info(bk)->max_shared_per_block,
                          .wgmma = wgmma && cuda_arch_has_wgmma(bk_info(bk)->arch)};
}

/* Every case's three products (forward, input gradient, weight gradient) against the
 * reference on the GPU, operands stored as dt; on Hopper once with the wgmma forward and once
 * with mma.sync throughout. */
static void check_matmul_cases(tctx *t, const mcase *c, size_t n, ir_dtype dt, const char *what) {
    backend *bk = cuda_dev(t);
    if (!bk) return;
    const int passes = cuda_arch_has_wgmma(bk_info(bk)->arch) ? 2 : 1;
    for (int pass = 0; pass < passes; pass++) {
        const plan_options po = device_bf16(bk, pass == 0);
        for (size_t i = 0; i < n && !t->failed; i++) {
            ir_graph g;
            if (build_matmul_dt(&c[i], &g, dt) < 0) {
                t_fail(t, __FILE__, __LINE__, "case %zu: %s", i, g.err);
            } else {
                kc_check_graph_opts(t, bk, &g, 2, c[i].S, 1e-2, 1, &po);
                if (t->failed) {
                    char m[sizeof t->msg];
                    snprintf(m, sizeof m, "%s", t->msg);
                    snprintf(t->msg, sizeof t->msg, "%s case %zu%s: %.900s", what, i, po.wgmma ? " (wgmma)" : "", m);
                }
            }
            ir_free(&g);
        }
    }
    bk_destroy(bk);
}

TEST(bf16_kernels_matmul) {
    if (!t_gpu_on()) return;
    const mcase c[] = {
        {SH(DIM_B, DIM_S, 7), SH(5, 7), 0, 13},
        {SH(DIM_B, DIM_S, 67), SH(129, 67), 0, 13},
        {SH(DIM_B, DIM_S, 7), SH(7, 3), 1, 13},
        {SH(DIM_B, DIM_S, 2, 6), SH(4, 6), 0, 13},          /* two rows per token */
        {SH(DIM_B, DIM_S, 70), SH(130, 70), 0, 100},
        {SH(DIM_B, DIM_S, 3, 5), SH(5, 70), 1, 50},
        {SH(6, 7), SH(5, 7), 0, 1},                          /* no token dims */
        {SH(DIM_B, DIM_S, 33), SH(33, 65), 1, 31},           /* odd contraction, one past a tile */
        {SH(DIM_B, DIM_S, 384), SH(1716, 384), 0, 300},      /* realm-9m's in_proj */
        {SH(DIM_B, DIM_S, 768), SH(384, 768), 0, 257},       /* out_proj */
        {SH(DIM_B, DIM_S, 384), SH(384, 256), 1, 64},        /* exact tiles, trans */
        {SH(DIM_B, DIM_S, 1), SH(3, 1), 0, 5},               /* K = 1 */
        /* 6000 rows: the weight gradient's splits span several contraction slices each, the
         * last non-empty one ends inside a slice and the ones after it are empty */
        {SH(DIM_B, DIM_S, 384), SH(768, 384), 0, 3000},
        /* the 128x128 forward/dgrad tiles: M = 258, N = 257, K = 161 each one past whole
         * tiles (slices); then the transposed weight */
        {SH(DIM_B, DIM_S, 161), SH(257, 161), 0, 129},
        {SH(DIM_B, DIM_S, 161), SH(161, 257), 1, 129},
        {SH(DIM_B, DIM_S, 96), SH(128, 96), 0, 128},         /* whole tiles, K a multiple of the slice */
        {SH(DIM_B, DIM_S, 20), SH(20, 130), 1, 65},          /* K < slice, M and N two past a tile */
        {SH(DIM_B, DIM_S, 64), SH(64, 255), 1, 127},         /* M and N one or two short of whole tiles */
        {SH(DIM_B, DIM_S, 3, 32), SH(200, 32), 0, 43},       /* 3 rows per token, M = 258 */
    };
    check_matmul_cases(t, c, sizeof c / sizeof c[0], DT_F32, "bf16 matmul");
}

/* Operands stored as bf16 (gen/precision.c): the forward reads K-major x and W, the dgrad
 * K-major dy and MN-major W (ldmatrix.trans), the weight gradient MN-major dy and x. Rows and
 * columns past whole tiles, a contraction past whole slices, both transpositions. */
TEST(bf16_kernels_matmul_bf16_operands) {
    if (!t_gpu_on()) return;
    const mcase c[] = {
        {SH(DIM_B, DIM_S, 384), SH(1712, 384), 0, 300},      /* about realm-9m's in_proj (N a multiple of 8) */
        {SH(DIM_B, DIM_S, 768), SH(384, 768), 0, 257},       /* out_proj */
        {SH(DIM_B, DIM_S, 168), SH(264, 168), 0, 129},       /* M, N, K each past whole tiles/slices */
        {SH(DIM_B, DIM_S, 168), SH(168, 264), 1, 129},
        {SH(DIM_B, DIM_S, 8), SH(8, 24), 1, 3},              /* K < slice, tiny M */
        {SH(DIM_B, DIM_S, 384), SH(768, 384), 0, 3000},      /* several split-K slices */
        {SH(DIM_B, DIM_S, 288), SH(384, 288), 0, 200},       /* the MLP's w_out: K ends inside a wgmma slice */
        {SH(DIM_B, DIM_S, 64), SH(8, 64), 0, 70},            /* one 8-column wgmma tile */
        {SH(DIM_B, DIM_S, 16), SH(1000, 16), 0, 65},         /* 4 column tiles of 256, K < a slice */
    };
    check_matmul_cases(t, c, sizeof c / sizeof c[0], DT_BF16, "bf16-operand matmul");
}

/* Strided views: inputs and outputs that are slices of wider tensors (token stride != feat). */
TEST(bf16_kernels_matmul_views) {
    if (!t_gpu_on()) return;
    ir_graph g;
    ir_init_graph(&g);
    int xa = ir_tensor_new(&g, "xa", SH(DIM_B, DIM_S, 40), DT_F32, ROLE_PARAM);
    int xb = ir_tensor_new(&g, "xb", SH(DIM_B, DIM_S, 23), DT_F32, ROLE_PARAM);
    int ya = ir_tensor_new(&g, "ya", SH(DIM_B, DIM_S, 30), DT_F32, ROLE_PARAM);
    int xc = ir_tensor_new(&g, "xc", SH(DIM_B, DIM_S, 200), DT_F32, ROLE_PARAM);
    int w = ir_tensor_new(&g, "w", SH(9, 7), DT_F32, ROLE_PARAM);
    int w2 = ir_tensor_new(&g, "w2", SH(7, 5), DT_F32, ROLE_PARAM);
    int w3 = ir_tensor_new(&g, "w3", SH(70, 90), DT_F32, ROLE_PARAM);
    int x7 = ir_view(&g, xa, SH(DIM_B, DIM_S, 2, 7), 3, "x7");
    int b6 = ir_view(&g, xb, SH(DIM_B, DIM_S, 2, 6), 4, "b6");
    int y9 = ir_view(&g, ya, SH(DIM_B, DIM_S, 2, 9), 5, "y9");
    int c90 = ir_view(&g, xc, SH(DIM_B, DIM_S, 90), 7, "c90");
    int c70 = ir_view(&g, xc, SH(DIM_B, DIM_S, 70), 101, "c70");
    /* rows 16-byte aligned (offset and stride multiples of 4) but widths that are not: the
     * 16-byte copy path with chunks cut at the end of a row (K = 66, P = 66, Q = 130) */
    int c66 = ir_view(&g, xc, SH(DIM_B, DIM_S, 66), 132, "c66");
    int c130 = ir_view(&g, xc, SH(DIM_B, DIM_S, 130), 0, "c130");
    int w4 = ir_tensor_new(&g, "w4", SH(130, 66), DT_F32, ROLE_PARAM);
    int w5 = ir_tensor_new(&g, "w5", SH(66, 132), DT_F32, ROLE_PARAM);
    int out[IR_MAX_IO];
    long tr1[IR_MAX_IATTR] = {1};
    int ok = ir_emit_into(&g, "matmul", (int[]){x7, w}, 2, NULL, NULL, y9) >= 0 &&
             ir_emit(&g, "matmul", (int[]){x7, w2}, 2, tr1, NULL, out) == 1 &&
             ir_emit(&g, "matmul_wgrad", (int[]){x7, b6}, 2, NULL, NULL, out) == 2 &&
             ir_emit(&g, "matmul", (int[]){c90, w3}, 2, NULL, NULL, out) == 1 &&
             ir_emit(&g, "matmul", (int[]){c70, w3}, 2, tr1, NULL, out) == 1 &&
             ir_emit(&g, "matmul_wgrad", (int[]){c90, c70}, 2, NULL, NULL, out) == 2 &&
             ir_emit(&g, "matmul", (int[]){c66, w4}, 2, NULL, NULL, out) == 1 &&
             ir_emit(&g, "matmul", (int[]){c66, w5}, 2, tr1, NULL, out) == 1 &&
             ir_emit(&g, "matmul_wgrad", (int[]){c66, c130}, 2, NULL, NULL, out) == 2;
    if (!ok) {
        t_fail(t, __FILE__, __LINE__, "building the graph: %s", g.err);
    } else {
        backend *bk = cuda_dev(t);
        if (bk) {
            kc_check_graph_opts(t, bk, &g, 3, 71, 1e-2, 1, &bf16_on);
            bk_destroy(bk);
        }
    }
    ir_free(&g);
}

/* ---- attention on tensor cores ----
 * The attention cases of the kernel table (forward plus backward, each launch against the fp64
 * reference with poisoned outputs) with the plan in bf16, and shapes that reach the corners of
 * the tensor-core tiles: several 64-row blocks with S no multiple of 64, windows that end
 * inside a tile, padded head dims, GQA, and a window longer than S. */
#define ATT(H, HKV, DH, W, S) {"attention", 3, {SHC(DIM_B, DIM_S, H, DH), SHC(DIM_B, DIM_S, HKV, DH), \
                                SHC(DIM_B, DIM_S, HKV, DH)}, {DT_F32, DT_F32, DT_F32}, {W}, {0}, 0, S, 0}
#define SHC(...) {(int)(sizeof((int[]){__VA_ARGS__}) / sizeof(int)), {__VA_ARGS__}}
static const kcase bf16_attention_cases[] = {
    ATT(6, 6, 64, 96, 200),     /* realm-9m's heads, window shorter than S */
    ATT(6, 2, 64, 96, 300),     /* GQA 6 / 2 */
    ATT(6, 6, 64, 1000, 150),   /* window longer than S: plain causal over three blocks */
    ATT(2, 1, 40, 33, 100),     /* head dim 40: padded to 48 inside the tiles */
    ATT(2, 2, 128, 70, 150),    /* the widest tensor-core forward (fp32 backward) */
    ATT(2, 2, 64, 64, 129),     /* window exactly one tile; one query past two blocks */
    ATT(1, 1, 64, 1, 70),       /* window 1: every softmax has one term */
};

/* The cases of a table whose op starts with `op`, each launch against the reference at 1e-2 on
 * a batch of B sequences; min_px > 0 keeps only the cases whose first input's last two dims
 * (P x N of a scan, heads x head dim of attention) multiply to at least min_px. */
static void bf16_table(tctx *t, backend *bk, const kcase *c, int n, const char *op, const char *label, long B,
                       long min_px) {
    for (int i = 0; i < n && !t->failed; i++) {
        if (strncmp(c[i].op, op, strlen(op)) != 0) continue;
        const ir_shape *x = &c[i].in[0];
        if (min_px > 0 && (x->ndim < 2 || (long)x->d[x->ndim - 1] * c[i].in[1].d[c[i].in[1].ndim - 1] < min_px)) continue;
        ir_graph g;
        char err[600];
        if (kc_build_case(&c[i], &g, err, sizeof err) < 0) {
            t_fail(t, __FILE__, __LINE__, "%s case %d: %s", label, i, err);
        } else {
            kc_check_graph_opts(t, bk, &g, B, c[i].S ? c[i].S : 13, 1e-2, 1, &bf16_on);
            if (t->failed) {
                char m[sizeof t->msg];
                snprintf(m, sizeof m, "%s", t->msg);
                snprintf(t->msg, sizeof t->msg, "bf16 %s %s case %d: %.900s", op, label, i, m);
            }
        }
        ir_free(&g);
    }
}

TEST(bf16_kernels_attention) {
    if (!t_gpu_on()) return;
    backend *bk = cuda_dev(t);
    if (!bk) return;
    bf16_table(t, bk, kcases_attention.c, kcases_attention.n, "attention", "table", 2, 0);
    bf16_table(t, bk, bf16_attention_cases, (int)(sizeof bf16_attention_cases / sizeof bf16_attention_cases[0]),
               "attention", "tc", 2, 0);
    bk_destroy(bk);
}

/* ---- the Mamba-3 scan on tensor cores ----
 * The shapes of kcases_mamba3_tc (partial chunks, padded tiles, P != N, few rotated pairs) and
 * the scan table's cases with P x N >= 256, forward and backward, with the plan in bf16, on 4
 * sequences. The scan table's tiniest heads (P x N of 8 to 40, a few tokens) stay out: their
 * decay gradient (dd_A) sums products of 4 to 8 bf16-rounded terms with cancellation and one
 * reached 0.0101 normwise on 2 sequences once, while four more runs of the whole table stayed
 * under 0.0065 everywhere. */
TEST(bf16_kernels_mamba3) {
    if (!t_gpu_on()) return;
    backend *bk = cuda_dev(t);
    if (!bk) return;
    bf16_table(t, bk, kcases_mamba3.c, kcases_mamba3.n, "mamba3_scan", "table", 4, 256);
    bf16_table(t, bk, kcases_mamba3_tc.c, kcases_mamba3_tc.n, "mamba3", "tc", 4, 0);
    bk_destroy(bk);
}

/* A case's forward and backward in a bf16 plan give the same bits run to run (no atomics,
 * fixed order): run twice on the same inputs, every output of the case's `want_out` compared. */
static void check_deterministic(tctx *t, const kcase *kc, int want_out) {
    const kcase c = *kc;
    ir_graph g;
    char err[1024] = "";
    if (kc_build_case(&c, &g, err, sizeof err) < 0) {
        ir_free(&g);
        CHECK(0, "%s", err);
    }
    backend *bk = cuda_dev(t);
    plan p;
    plan_exec x;
    int planned = 0, created = 0, rc = -1;
    const long B = 2, S = c.S;
    float *h = NULL, *first[IR_MAX_IO * 2] = {0};
    if (!bk) goto out;
    if (plan_build_opts(&p, &g, 0, g.nn, "cuda", NULL, 0, &bf16_on, err, sizeof err) < 0) goto out;
    planned = 1;
    if (exec_create(&x, bk, &p, B, S, err, sizeof err) < 0) goto out;
    created = 1;
    long maxn = 1;
    for (int i = 0; i < g.nt; i++)
        if (ir_numel(&g.t[i].shape, B, S) > maxn) maxn = ir_numel(&g.t[i].shape, B, S);
    h = malloc(sizeof(float) * (size_t)maxn);
    for (int i = 0; i < g.nt; i++) {
        if (g.t[i].base != i || g.t[i].producer >= 0) continue;
        long n = ir_numel(&g.t[i].shape, B, S);
        for (long k = 0; k < n; k++) h[k] = (float)t_normal(t);
        if (exec_upload(&x, i, h, err, sizeof err) < 0) goto out;
    }
    /* every output of the case's nodes (forward and backward, workspaces too) */
    int outs[IR_MAX_IO * 2], nout = 0;
    for (int ni = 0; ni < g.nn; ni++)
        for (int j = 0; j < g.n[ni].nout && nout < IR_MAX_IO * 2; j++) outs[nout++] = g.n[ni].out[j];
    int same = 1;
    for (int run = 0; run < 2 && same; run++) {
        if (exec_run(&x, 0, p.kg.nl, err, sizeof err) < 0) goto out;
        if (bk_sync(bk, NULL) < 0) {
            snprintf(err, sizeof err, "%s", bk_error(bk));
            goto out;
        }
        for (int o = 0; o < nout; o++) {
            long n = ir_numel(&g.t[outs[o]].shape, B, S);
            if (exec_download(&x, outs[o], h, err, sizeof err) < 0) goto out;
            if (run == 0) {
                first[o] = malloc(sizeof(float) * (size_t)n);
                memcpy(first[o], h, sizeof(float) * (size_t)n);
            } else if (memcmp(first[o], h, sizeof(float) * (size_t)n) != 0) {
                same = 0;
                snprintf(err, sizeof err, "output %s differs between two runs", g.t[outs[o]].name);
            }
        }
    }
    rc = same && nout == want_out ? 0 : -1;
    if (same && nout != want_out) snprintf(err, sizeof err, "expected %d outputs, found %d", want_out, nout);
out:
    for (int o = 0; o < IR_MAX_IO * 2; o++) free(first[o]);
    free(h);
    if (created) exec_destroy(&x);
    if (planned) plan_free(&p);
    if (bk) bk_destroy(bk);
    ir_free(&g);
    CHECK(rc == 0, "%s", err);
}

/* attention: o, lse; dq, dk, dv and the workspace D */
TEST(bf16_attention_deterministic) {
    if (!t_gpu_on()) return;
    const kcase c = ATT(6, 2, 64, 96, 300);
    check_deterministic(t, &c, 6);
}

/* the scan: y and its 3 workspaces; 11 input gradients and 5 workspaces */
TEST(bf16_mamba3_deterministic) {
    if (!t_gpu_on()) return;
    check_deterministic(t, &kcases_mamba3_tc.c[0], 20);
}

static void check_model(tctx *t, const char *path, long B, long S) {
    if (!t_gpu_on()) return;
    realm_model m;
    char err[1024];
    CHECK(model_load(path, &m, err, sizeof err) == 0, "%s", err);
    /* as a bf16 training session builds it: weight copies and normed activations in bf16 */
    if (ir_autodiff(&m.g) < 0 || ir_bf16_storage(&m.g) < 0) {
        t_fail(t, __FILE__, __LINE__, "autodiff: %s", m.g.err);
    } else {
        backend *bk = cuda_dev(t);
        if (bk) {
            const plan_options po = device_bf16(bk, 1);
            kc_check_graph_opts(t, bk, &m.g, B, S, 1e-2, m.vocab, &po);
            bk_destroy(bk);
        }
    }
    model_free(&m);
}

TEST(bf16_kernels_tiny_model_every_launch) { check_model(t, "models/tiny.lua", 2, 37); }
TEST(bf16_kernels_realm9m_every_launch) { check_model(t, "models/realm-9m.lua", 1, 80); }

/* ---- training through the CLI ---- */

/* losses.tsv -> values (up to max); returns how many */
static int read_losses(const char *run, double *v, int max) {
    char path[700];
    snprintf(path, sizeof path, "%.600s/losses.tsv", run);
    char *s = t_slurp(path);
    int n = 0;
    for (char *p = s; p && *p && n < max;) {
        long step;
        double x;
        if (sscanf(p, "%ld\t%lf", &step, &x) == 2) v[n++] = x;
        p = strchr(p, '\n');
        if (p) p++;
    }
    free(s);
    return n;
}

static void rm_rf(const char *d) {
    char cmd[800], out[64];
    snprintf(cmd, sizeof cmd, "rm -rf %s", d);
    t_run(cmd, out, sizeof out);
}

/* realm-9m, 200 steps of batch 4 x 256 bytes of tinyshakespeare, bf16 against fp32 (the plan
 * the OpenCL backend runs, here on CUDA: an OpenCL run of realm-9m on a machine whose only
 * OpenCL device is PoCL on the CPU took over 6 minutes) from the same initialisation and
 * batches. The runs compute the same function up to bf16 rounding of the matmul operands, so
 * they are not bitwise equal and their trajectories drift apart slowly; the curves are
 * compared as means over windows of 20 steps (on an H100 the two curves fell 3.31 -> 1.86 and
 * 3.31 -> 1.84, 0.98% apart at most; a bf16 bug shows as a curve that does not fall or falls
 * apart from fp32's). Then a resume that asks for fp32 keeps the run's bf16. */
enum { TRACK_STEPS = 200, TRACK_WINDOW = 20 };
TEST(bf16_train_realm9m_tracks_fp32) {
    if (!t_gpu_on()) return;
    const char *sh = t_shared_dir();
    if (!sh) {
        printf("  (no ../shared/data/tinyshakespeare.txt: skipped)\n");
        return;
    }
    char data[512], dir[512], cmd[4096], out[16384], run[2][600];
    snprintf(data, sizeof data, "%s/data/tinyshakespeare.txt", sh);
    snprintf(dir, sizeof dir, "/tmp/realm-bf16-%d-%llu", (int)getpid(), (unsigned long long)(t_next(t) % 100000));
    const char *prec[2] = {"fp32", "bf16"};
    static double l[2][TRACK_STEPS + 8];
    int n[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        snprintf(run[i], sizeof run[i], "%s/%s", dir, prec[i]);
        snprintf(cmd, sizeof cmd,
                 "%s train models/realm-9m.lua --data %s --out %s --backend cuda --precision %s --steps %d --batch 4 "
                 "--seq 256 --warmup 20 --eval-every 0 --save-every 1000 --log-every 50",
                 t_realm_bin(), data, run[i], prec[i], TRACK_STEPS);
        int rc = t_run(cmd, out, sizeof out);
        if (rc != 0) {
            rm_rf(dir);
            CHECK(0, "%s training failed (status %d): %s", prec[i], rc, out);
        }
        char want[64];
        snprintf(want, sizeof want, "%s matmuls", prec[i]);
        if (!strstr(out, want)) rm_rf(dir);
        CHECK(strstr(out, want), "the run does not say '%s': %s", want, out);
        n[i] = read_losses(run[i], l[i], TRACK_STEPS + 8);
    }
    /* window means; the largest difference of bf16's from fp32's */
    enum { NW = TRACK_STEPS / TRACK_WINDOW };
    double w[2][NW], maxrel = 0;
    for (int i = 0; i < 2; i++)
        for (int k = 0; k < NW; k++) {
            w[i][k] = 0;
            for (int j = k * TRACK_WINDOW; j < (k + 1) * TRACK_WINDOW && j < n[i]; j++) w[i][k] += l[i][j] / TRACK_WINDOW;
        }
    for (int k = 0; k < NW; k++) {
        double r = fabs(w[1][k] - w[0][k]) / w[0][k];
        if (!(r <= maxrel)) maxrel = r;
    }
    for (int i = 0; i < 2; i++) {
        printf("  realm-9m %d steps, %s loss by %d-step window:", TRACK_STEPS, prec[i], TRACK_WINDOW);
        for (int k = 0; k < NW; k++) printf(" %.3f", w[i][k]);
        printf("\n");
    }
    printf("  largest difference %.2f%%\n", 100 * maxrel);
    /* the saved state says bf16, and a resume keeps it whatever --precision says */
    char rout[16384];
    snprintf(cmd, sizeof cmd, "grep -rh '\"precision\"' %s/ | sort -u", run[1]);
    t_run(cmd, out, sizeof out);
    int saved_bf16 = strstr(out, "\"bf16\"") != NULL;
    snprintf(cmd, sizeof cmd,
             "%s train models/realm-9m.lua --data %s --out %s --backend cuda --precision fp32 --steps %d --batch 4 "
             "--seq 256 --warmup 20 --eval-every 0 --save-every 1000 --log-every 10",
             t_realm_bin(), data, run[1], TRACK_STEPS + 2);
    int rc = t_run(cmd, rout, sizeof rout);
    rm_rf(dir);
    CHECK(n[0] == TRACK_STEPS && n[1] == TRACK_STEPS, "losses logged: fp32 %d, bf16 %d of %d", n[0], n[1], TRACK_STEPS);
    CHECK(isfinite(w[1][NW - 1]) && w[1][NW - 1] < l[1][0] - 2.0, "bf16 loss did not fall: %.4f -> %.4f", l[1][0],
          w[1][NW - 1]);
    CHECK(maxrel < 0.03, "bf16 loss curve %.2f%% from fp32's in a %d-step window", 100 * maxrel, TRACK_WINDOW);
    CHECK(saved_bf16, "state.json does not record bf16");
    CHECK(rc == 0 && strstr(rout, "resuming from") && strstr(rout, "bf16 matmuls") && strstr(rout, "ignored"),
          "resume with --precision fp32 (status %d): %s", rc, rout);
}

/* ---- timing (printed, not asserted) ---- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One realm-9m training step at B x S: median whole-step ms (profiling off) and device ms per
 * step in matmul / matmul_wgrad launches (profiling on). */
static int time_precision(tctx *t, backend *bk, const char *src, size_t len, int bf16, long B, long S, double *step_ms,
                          double *mm_ms, double *wg_ms, double *flop) {
    char err[4096];
    session s;
    plan_options po = {.bf16 = bf16};
    if (session_prepare_opts(&s, src, len, "models/realm-9m.lua", "cuda", 1, 0, &po, err, sizeof err) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        return -1;
    }
    int rc = -1;
    uint8_t *rows = malloc((size_t)(B * (S + 1)));
    rng_state r;
    rng_seed(&r, 7);
    for (long i = 0; i < B * (S + 1); i++) rows[i] = (uint8_t)rng_below(&r, 256);
    const float hyper[8] = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.19f, 0.0975f, 1.0f};
    *flop = 0;
    for (int i = 0; i < s.m.g.nn; i++) {
        const op_def *d = op_get(s.m.g.n[i].op);
        if (d->flops && strncmp(d->name, "matmul", 6) == 0) *flop += d->flops(&s.m.g, &s.m.g.n[i], B, S);
    }
    double ms[7];
    if (session_alloc(&s, bk, B, S, err, sizeof err) < 0 || session_init_params(&s, 1, err, sizeof err) < 0 ||
        exec_upload(&s.x, s.opt.hyper, hyper, err, sizeof err) < 0 ||
        session_set_batch(&s, rows, S + 1, err, sizeof err) < 0)
        goto out;
    for (int i = 0; i < 2; i++)
        if (session_run(&s, err, sizeof err) < 0) goto out;
    if (bk_sync(bk, NULL) < 0) goto out_bk;
    for (int i = 0; i < 7; i++) {
        double t0 = now_s();
        if (session_run(&s, err, sizeof err) < 0) goto out;
        if (bk_sync(bk, NULL) < 0) goto out_bk;
        ms[i] = 1000 * (now_s() - t0);
    }
    for (int i = 0; i < 7; i++)   /* median of 7 */
        for (int j = i + 1; j < 7; j++)
            if (ms[j] < ms[i]) {
                double x = ms[i];
                ms[i] = ms[j], ms[j] = x;
            }
    *step_ms = ms[3];
    if (exec_profile_enable(&s.x, err, sizeof err) < 0) goto out;
    const int psteps = 3;
    for (int i = 0; i < psteps; i++)
        if (session_run(&s, err, sizeof err) < 0 || exec_profile_collect(&s.x, err, sizeof err) < 0) goto out;
    *mm_ms = *wg_ms = 0;
    for (int e = 0; e < s.x.prof->nop; e++) {
        if (strcmp(s.x.prof->by_op[e].name, "matmul") == 0) *mm_ms += s.x.prof->by_op[e].ms / psteps;
        if (strcmp(s.x.prof->by_op[e].name, "matmul_wgrad") == 0) *wg_ms += s.x.prof->by_op[e].ms / psteps;
    }
    rc = 0;
    goto out;
out_bk:
    snprintf(err, sizeof err, "%s", bk_error(bk));
out:
    if (rc < 0) t_fail(t, __FILE__, __LINE__, "%s", err);
    free(rows);
    session_close(&s);
    return rc;
}

TEST(bf16_timing_realm9m) {
    if (!t_gpu_on()) return;
    char err[1024], *src = t_slurp("models/realm-9m.lua");
    CHECK(src, "models/realm-9m.lua");
    backend *bk = cuda_dev(t);
    if (!bk) {
        free(src);
        return;
    }
    const long B = 8, S = 1024;
    double step[2], mm[2], wg[2], fl[2];
    int ok = 1;
    for (int i = 0; i < 2 && ok; i++)
        ok = time_precision(t, bk, src, strlen(src), i, B, S, &step[i], &mm[i], &wg[i], &fl[i]) == 0;
    if (ok) {
        (void)err;
        printf("  realm-9m training step, batch %ld x seq %ld on %s:\n", B, S, bk_info(bk)->name);
        printf("    %-5s %12s %14s %18s %16s\n", "", "step ms", "matmul ms", "matmul_wgrad ms", "matmul TFLOP/s");
        for (int i = 0; i < 2; i++)
            printf("    %-5s %12.2f %14.2f %18.2f %16.1f\n", i ? "bf16" : "fp32", step[i], mm[i], wg[i],
                   fl[i] / ((mm[i] + wg[i]) * 1e-3) / 1e12);
        printf("    matmuls %.2fx faster, step %.2fx faster\n", (mm[0] + wg[0]) / (mm[1] + wg[1]), step[0] / step[1]);
    }
    bk_destroy(bk);
    free(src);
}

/* ---- always on ---- */

/* The bf16 plan of realm-9m (training step): its matmuls are mma.sync kernels, the fp32 plan has
 * none, and OpenCL ignores the option. The same plan is compiled by NVRTC for sm_80, sm_90 and
 * sm_120 in generated_cuda_kernels_compile_for_every_arch (`realm kernels` builds it alike). */
TEST(bf16_plan_uses_mma_for_every_matmul) {
    realm_model m;
    char err[4096];
    CHECK(model_load("models/realm-9m.lua", &m, err, sizeof err) == 0, "%s", err);
    ir_optimizer o;
    if (ir_autodiff(&m.g) < 0 || ir_add_optimizer(&m.g, &o) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", m.g.err);
        model_free(&m);
        return;
    }
    int keep[1] = {m.loss};
    plan pb, pf, po;
    int okb = plan_build_opts(&pb, &m.g, 0, m.g.nn, "cuda", keep, 1, &bf16_on, err, sizeof err) == 0;
    int okf = okb && plan_build(&pf, &m.g, 0, m.g.nn, "cuda", keep, 1, err, sizeof err) == 0;
    int oko = okf && plan_build_opts(&po, &m.g, 0, m.g.nn, "opencl", keep, 1, &bf16_on, err, sizeof err) == 0;
    if (!oko) {
        t_fail(t, __FILE__, __LINE__, "plan: %s", err);
        if (okf) plan_free(&pf);
        if (okb) plan_free(&pb);
        model_free(&m);
        return;
    }
    int nmma = 0, nmm = 0;
    for (int l = 0; l < pb.kg.nl; l++) {
        /* matmul_wgrad's second pass only adds fp32 partial tiles: no product to take in bf16 */
        if (strstr(pb.kg.launches[l].kernel, "matmul_wgrad_sum")) continue;
        nmma += strstr(pb.kg.launches[l].kernel, "_bf16") != NULL;
        nmm += strncmp(op_get(m.g.n[pb.kg.launches[l].node0].op)->name, "matmul", 6) == 0;
    }
    int bf_flag = pb.kg.bf16, has_mma = strstr(pb.kg.src.s, "mma.sync.aligned.m16n8k16") != NULL;
    int fp32_clean = !pf.kg.bf16 && !strstr(pf.kg.src.s, "mma.sync") && !strstr(pf.kg.src.s, "bf16");
    int ocl_fp32 = !po.kg.bf16 && !strstr(po.kg.src.s, "bf16");
    plan_free(&po);
    plan_free(&pf);
    plan_free(&pb);
    model_free(&m);
    CHECK(bf_flag && has_mma, "the bf16 CUDA plan has no mma.sync kernels");
    CHECK(nmm > 0 && nmma == nmm, "%d of %d matmul launches use the bf16 kernels", nmma, nmm);
    CHECK(fp32_clean, "plan_build (fp32) emitted bf16 code");
    CHECK(ocl_fp32, "the OpenCL dialect did not ignore bf16");
}

/* On Hopper (plan_options.wgmma) the products whose input and weight are both stored as bf16 run
 * on wgmma: in realm-9m's training plan every forward matmul but the attention output's (its
 * input is fp32) and the input gradients of the MLPs' w_in (their dy is bf16). Without the
 * option, or where the tiles' stages do not fit the shared memory, no wgmma is emitted. The
 * kernels are compiled for sm_90a by generated_cuda_kernels_compile_for_every_arch and checked
 * on the GPU by the bf16_kernels_* tests. */
TEST(bf16_plan_uses_wgmma_on_hopper) {
    realm_model m;
    char err[4096];
    CHECK(model_load("models/realm-9m.lua", &m, err, sizeof err) == 0, "%s", err);
    ir_optimizer o;
    if (ir_autodiff(&m.g) < 0 || ir_bf16_storage(&m.g) < 0 || ir_add_optimizer(&m.g, &o) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", m.g.err);
        model_free(&m);
        return;
    }
    int keep[1] = {m.loss};
    /* small: a device whose shared memory cannot hold the wgmma tiles' stages gets mma.sync */
    const plan_options hopper = {.bf16 = 1, .wgmma = 1, .shared_max = 227L * 1024},
                       ampere = {.bf16 = 1, .shared_max = 227L * 1024},
                       small = {.bf16 = 1, .wgmma = 1, .shared_max = 100L * 1024};
    plan ph, pa, ps;
    int okh = plan_build_opts(&ph, &m.g, 0, m.g.nn, "cuda", keep, 1, &hopper, err, sizeof err) == 0;
    int oka = okh && plan_build_opts(&pa, &m.g, 0, m.g.nn, "cuda", keep, 1, &ampere, err, sizeof err) == 0;
    int oks = oka && plan_build_opts(&ps, &m.g, 0, m.g.nn, "cuda", keep, 1, &small, err, sizeof err) == 0;
    if (!oks) {
        t_fail(t, __FILE__, __LINE__, "plan: %s", err);
        if (oka) plan_free(&pa);
        if (okh) plan_free(&ph);
        model_free(&m);
        return;
    }
    int mm = 0, mm_bf16 = 0, dgrad_bf16 = 0, wrong = 0, wg_other = 0;
    for (int l = 0; l < ph.kg.nl; l++) {
        const ir_node *n = &m.g.n[ph.kg.launches[l].node0];
        int is_wg = strstr(ph.kg.launches[l].kernel, "_wgmma") != NULL;
        if (strcmp(op_get(n->op)->name, "matmul") != 0) {
            wg_other += is_wg;
            continue;
        }
        int both = m.g.t[n->in[0]].dtype == DT_BF16 && m.g.t[n->in[1]].dtype == DT_BF16;
        mm++;
        mm_bf16 += both;
        dgrad_bf16 += both && ph.kg.launches[l].node0 >= m.g.backward_start;
        wrong += both != is_wg;
    }
    int src_h = strstr(ph.kg.src.s, "wgmma.mma_async.sync.aligned.m64n") != NULL;
    int src_a = strstr(pa.kg.src.s, "wgmma") != NULL, src_s = strstr(ps.kg.src.s, "wgmma") != NULL;
    plan_free(&ps);
    plan_free(&pa);
    plan_free(&ph);
    model_free(&m);
    CHECK(mm == 66 && mm_bf16 == 39 && dgrad_bf16 == 8,
          "%d matmul launches, %d with bf16 operands, %d of them input gradients (want 66, 39, 8)", mm, mm_bf16, dgrad_bf16);
    CHECK(wrong == 0 && wg_other == 0 && src_h, "%d matmul launches on the wrong kernel, %d other launches on wgmma", wrong,
          wg_other);
    CHECK(!src_a, "wgmma emitted without the option");
    CHECK(!src_s, "wgmma emitted where its stages do not fit 100 KiB of shared memory");
}

/* The forward/dgrad bf16 kernels number their 128x128 tiles along one grid dim, column tiles
 * fastest, from a formula in B and S that may overshoot (those blocks return at once): every
 * tile must get a block, and at most one row of tiles may be spare. */
TEST(bf16_matmul_grid_covers_every_tile) {
    const mcase c[] = {
        {SH(DIM_B, DIM_S, 384), SH(1716, 384), 0, 0},
        {SH(DIM_B, DIM_S, 3, 5), SH(5, 70), 1, 0},
        {SH(6, 7), SH(5, 7), 0, 0},
        {SH(DIM_B, DIM_S, 20), SH(20, 130), 1, 0},
    };
    const long bs[][2] = {{1, 1}, {2, 63}, {2, 64}, {3, 129}, {8, 8192}, {5, 1000}};
    int checked = 0;
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        ir_graph g;
        char err[1024];
        CHECK(build_matmul(&c[i], &g) == 0, "%s", g.err);
        plan p;
        if (plan_build_opts(&p, &g, 0, g.nn, "cuda", NULL, 0, &bf16_on, err, sizeof err) < 0) {
            ir_free(&g);
            CHECK(0, "plan: %s", err);
        }
        for (int l = 0; l < p.kg.nl; l++) {
            const plan_launch *pl = &p.kg.launches[l];
            if (!strstr(pl->kernel, "matmul_nt_bf16") && !strstr(pl->kernel, "matmul_nn_bf16")) continue;
            const ir_node *n = &g.n[pl->node0];
            const ir_shape *xs = &g.t[n->in[0]].shape;
            long K = xs->d[xs->ndim - 1], N = ir_feat(&g.t[n->in[1]].shape) / K, per = ir_feat(xs) / K;
            for (size_t j = 0; j < sizeof bs / sizeof bs[0]; j++) {
                size_t gr[3];
                plan_grid(pl, bs[j][0], bs[j][1], gr);
                int nt = ir_ntok_dims(xs);
                long M = per * (nt == 2 ? bs[j][0] * bs[j][1] : nt == 1 ? bs[j][0] : 1);
                long nct = (N + 127) / 128, need = nct * ((M + 127) / 128);
                int ok = (pl->block[0] == 128 || pl->block[0] == 256) && gr[1] == 1 && gr[2] == 1 && (long)gr[0] >= need &&
                         (long)gr[0] <= need + nct;
                if (!ok) {
                    char m[sizeof t->msg];
                    snprintf(m, sizeof m, "case %zu, %s at B=%ld S=%ld: grid %zux%zux%zu, block %d for %ld tiles", i,
                             pl->kernel, bs[j][0], bs[j][1], gr[0], gr[1], gr[2], pl->block[0], need);
                    plan_free(&p);
                    ir_free(&g);
                    CHECK(0, "%s", m);
                }
                checked++;
            }
        }
        plan_free(&p);
        ir_free(&g);
    }
    CHECK(checked == 4 * 2 * 6, "checked %d grids", checked);
}

/* Which launches of a bf16 plan run on tensor cores: kernels named *_tc. In realm-9m's bf16
 * training plan every launch of the kernels named in `want` (k<N>_<name>[_tc]) must be the _tc
 * version, the fp32 plan has none; every case of `cases` plans with at least one _tc kernel
 * and compiles with NVRTC (padded tiles, the odd shapes) so a template slip fails here, not
 * only on a GPU. */
static int is_tc_kernel(const char *name) { return strstr(name, "_tc") != NULL; }

static void check_tc_plans(tctx *t, const char *const *want, const kcase *cases, int nc) {
    realm_model m;
    char err[4096];
    CHECK(model_load("models/realm-9m.lua", &m, err, sizeof err) == 0, "%s", err);
    if (ir_autodiff(&m.g) < 0) {
        model_free(&m);
        CHECK(0, "%s", m.g.err);
    }
    int keep[1] = {m.loss};
    plan pb, pf;
    int okb = plan_build_opts(&pb, &m.g, 0, m.g.nn, "cuda", keep, 1, &bf16_on, err, sizeof err) == 0;
    int okf = okb && plan_build(&pf, &m.g, 0, m.g.nn, "cuda", keep, 1, err, sizeof err) == 0;
    int missing = 0, fp32_tc = 0, seen = 0;
    char which[256] = "";
    for (int w = 0; okf && want[w]; w++)
        for (int l = 0; l < pb.kg.nl; l++) {
            const char *kn = pb.kg.launches[l].kernel, *u = strchr(kn, '_');
            /* k<N>_<name>[_tc]: compare the name without the index and the suffix */
            char base[64];
            snprintf(base, sizeof base, "%s", u ? u + 1 : kn);
            char *tc = strstr(base, "_tc");
            if (tc) *tc = 0;
            if (strcmp(base, want[w]) != 0) continue;
            seen++;
            if (!tc) {
                missing++;
                snprintf(which, sizeof which, "%s", kn);
            }
        }
    for (int l = 0; okf && l < pf.kg.nl; l++) fp32_tc += is_tc_kernel(pf.kg.launches[l].kernel);
    if (okf) plan_free(&pf);
    if (okb) plan_free(&pb);
    model_free(&m);
    CHECK(okf, "plan: %s", err);
    CHECK(seen > 0 && missing == 0, "%d of %d %s... launches without tensor cores (%s)", missing, seen, want[0], which);
    CHECK(fp32_tc == 0, "the fp32 plan has %d tensor-core launches", fp32_tc);
    for (int i = 0; i < nc; i++) {
        ir_graph g;
        plan p;
        int ntc = 0, built = kc_build_case(&cases[i], &g, err, sizeof err) == 0 &&
                             plan_build_opts(&p, &g, 0, g.nn, "cuda", NULL, 0, &bf16_on, err, sizeof err) == 0;
        int compiled = 0;
        if (built) {
            for (int l = 0; l < p.kg.nl; l++) ntc += is_tc_kernel(p.kg.launches[l].kernel);
            void *cubin = NULL;
            size_t len = 0;
            compiled = cuda_compile_only(p.kg.src.s, "sm_80", "", &cubin, &len, err, sizeof err) == 0;
            free(cubin);
            plan_free(&p);
        }
        ir_free(&g);
        CHECK(built, "%s case %d: %s", cases[i].op, i, err);
        CHECK(ntc > 0, "%s case %d: no tensor-core kernel", cases[i].op, i);
        CHECK(compiled, "%s case %d: NVRTC: %.3000s", cases[i].op, i, err);
    }
}

TEST(bf16_attention_plan_uses_tensor_cores) {
    static const char *const want[] = {"attention", "attention_bwd_dq", "attention_bwd_dkv", NULL};
    check_tc_plans(t, want, bf16_attention_cases, (int)(sizeof bf16_attention_cases / sizeof bf16_attention_cases[0]));
}

TEST_SLOW(bf16_mamba3_plan_uses_tensor_cores) {
    static const char *const want[] = {"mamba3_scan_out", "mamba3_scan_bwd_main", "mamba3_scan_chunk",
                                       "mamba3_scan_bwd_chunk", NULL};
    check_tc_plans(t, want, kcases_mamba3_tc.c, kcases_mamba3_tc.n);
}

/* The scan's tensor-core backward needs less shared memory than the fp32 one (~63 KiB at
 * realm-9m's head shape): a 99 KiB device (sm_120) keeps the chunk-parallel backward in bf16
 * plans, a 48 KiB one gets the sequential kernel, and no launch asks for more than the limit. */
TEST(bf16_scan_backward_follows_shared_memory) {
    const kcase *kc = &kcases_mamba3_tc.c[0];
    const long limits[3] = {0, 99L * 1024, 48L * 1024};
    const int want_main[3] = {1, 1, 0};
    for (int l = 0; l < 3; l++) {
        ir_graph g;
        char err[600];
        CHECK(kc_build_case(kc, &g, err, sizeof err) == 0, "%s", err);
        plan p;
        const plan_options po = {.bf16 = 1, .shared_max = limits[l]};
        CHECK(plan_build_opts(&p, &g, 0, g.nn, "cuda", NULL, 0, &po, err, sizeof err) == 0, "%s", err);
        int main_tc = 0, main_k = 0, serial_k = 0, out_tc = 0;
        long most = 0;
        for (int i = 0; i < p.kg.nl; i++) {
            const char *kn = p.kg.launches[i].kernel, *u = strstr(kn, "mamba3_scan_bwd");
            main_tc += strstr(kn, "mamba3_scan_bwd_main_tc") != NULL;
            main_k += strstr(kn, "mamba3_scan_bwd_main") != NULL;
            serial_k += u && strcmp(u, "mamba3_scan_bwd") == 0;
            out_tc += strstr(kn, "mamba3_scan_out_tc") != NULL;
            if (p.kg.launches[i].shmem > most) most = p.kg.launches[i].shmem;
        }
        plan_free(&p);
        ir_free(&g);
        CHECK(main_tc == want_main[l] && main_k == main_tc && serial_k == !want_main[l],
              "shared_max %ld: %d tensor-core main, %d main, %d sequential backward launches", limits[l], main_tc, main_k,
              serial_k);
        CHECK(out_tc == 1, "shared_max %ld: %d tensor-core output launches", limits[l], out_tc);
        CHECK(limits[l] == 0 || most <= limits[l], "shared_max %ld: a launch asks for %ld bytes", limits[l], most);
    }
}

TEST_SLOW(bf16_cli_precision) {
    char cmd[1024], out[8192];
    /* realm-9m's default (bf16) compile for sm_90 is generated_cuda_kernels_compile_for_every_arch's */
    snprintf(cmd, sizeof cmd, "%s kernels models/tiny.lua --backend cuda --arch sm_90", t_realm_bin());
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0 && strstr(out, "bf16 matmuls") && strstr(out, "CUBIN"), "default kernels (status %d): %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s kernels models/tiny.lua --backend cuda --arch sm_90 --precision fp32", t_realm_bin());
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0 && strstr(out, "fp32 matmuls"), "--precision fp32 (status %d): %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s kernels models/tiny.lua --backend cuda --arch sm_75", t_realm_bin());
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0 && strstr(out, "fp32 matmuls"), "sm_75 defaults to fp32 (status %d): %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s kernels models/tiny.lua --backend opencl --precision bf16", t_realm_bin());
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 2, "opencl + bf16 kernels: status %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s kernels models/tiny.lua --backend cuda --precision fp16", t_realm_bin());
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 2, "--precision fp16: status %d: %s", rc, out);
    /* training: bf16 on OpenCL is one line and exit 2; a bad value too */
    char data[256], run[256];
    snprintf(data, sizeof data, "/tmp/realm-bf16-cli-%d.txt", (int)getpid());
    snprintf(run, sizeof run, "/tmp/realm-bf16-cli-%d", (int)getpid());
    snprintf(cmd, sizeof cmd, "cat README.md docs/*.md > %s", data);
    t_run(cmd, out, sizeof out);
    snprintf(cmd, sizeof cmd,
             "%s train models/tiny.lua --data %s --out %s --backend opencl --precision bf16 --steps 2 --batch 2 "
             "--seq 32 --eval-every 0",
             t_realm_bin(), data, run);
    rc = t_run(cmd, out, sizeof out);
    char *nl = strchr(out, '\n');
    int one_line = nl && !nl[1];
    snprintf(cmd, sizeof cmd,
             "%s train models/tiny.lua --data %s --out %s --backend opencl --precision fp8 --steps 2 --batch 2 "
             "--seq 32 --eval-every 0",
             t_realm_bin(), data, run);
    int rc8 = t_run(cmd, out + 4096, 4096);
    /* OpenCL defaults to fp32 and records it */
    snprintf(cmd, sizeof cmd,
             "%s train models/tiny.lua --data %s --out %s --backend opencl --steps 2 --batch 2 --seq 32 --eval-every 0 "
             "&& grep -rh '\"precision\"' %s/ | sort -u",
             t_realm_bin(), data, run, run);
    char out2[8192];
    int rcd = t_run(cmd, out2, sizeof out2);
    rm_rf(run);
    unlink(data);
    CHECK(rc == 2 && one_line && strstr(out, "bf16"), "opencl + --precision bf16: status %d: %s", rc, out);
    CHECK(rc8 == 2, "--precision fp8: status %d: %s", rc8, out + 4096);
    CHECK(rcd == 0 && strstr(out2, "fp32 matmuls") && strstr(out2, "\"precision\": \"fp32\""),
          "opencl default run (status %d): %s", rcd, out2);
}
