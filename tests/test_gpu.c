/* The CUDA backend on a real GPU: every kernel check of tests/test_kernels.c, whole models
 * launch by launch, the optimizer, kill -9 and resume bitwise through the CLI, and a short
 * realm-9m training whose loss must fall. These run only with REALM_GPU=1 (`make test-gpu`);
 * CI has no GPU, so elsewhere they print "(no GPU: skipped)" and pass.
 *
 * REALM_GPU_BACKEND=opencl runs the same tests on the OpenCL backend instead (PoCL here), so
 * the tests themselves can be exercised on a machine without a GPU.
 *
 * bench_cli (always on, OpenCL) checks `realm bench` end to end. */
#include "frontend.h"
#include "kernelcheck.h"
#include "op.h"
#include "optimizer.h"
#include "test.h"

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define SH(...) ir_shape_make(sizeof((int[]){__VA_ARGS__}) / sizeof(int), (int[]){__VA_ARGS__})

static int gpu_on(void) {
    const char *e = getenv("REALM_GPU");
    if (e && strcmp(e, "1") == 0) return 1;
    printf("  (no GPU: skipped)\n");
    return 0;
}

/* "cuda" unless REALM_GPU_BACKEND says otherwise (see the top of the file). */
static const char *gpu_backend_name(void) {
    const char *e = getenv("REALM_GPU_BACKEND");
    return e && *e ? e : "cuda";
}

/* The device under test, or NULL with the test failed: with REALM_GPU=1 a missing GPU is an
 * error, not a skip. */
static backend *kc_cuda(tctx *t) {
    char err[2048];
    bk_kind k = BK_CUDA;
    if (bk_kind_parse(gpu_backend_name(), &k) != 0) {
        t_fail(t, __FILE__, __LINE__, "REALM_GPU_BACKEND=%s is not a backend", gpu_backend_name());
        return NULL;
    }
    backend *bk = bk_create(k, 0, NULL, err, sizeof err);
    if (!bk) t_fail(t, __FILE__, __LINE__, "REALM_GPU=1 but no %s device: %s", gpu_backend_name(), err);
    return bk;
}

/* ---- kernel cases: the tables of tests/test_kernels.c, run on the GPU ---- */

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

/* forward node + gradient-rule nodes fed by a random upstream gradient (as test_kernels.c) */
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
    if (!gpu_on()) return;
    backend *bk = kc_cuda(t);
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
            snprintf(t->msg, sizeof t->msg, "%s %s case %d: %.900s", gpu_backend_name(), cases[i].op, i, m);
        }
        ir_free(&g);
    }
    bk_destroy(bk);
}

#define F2 {DT_F32, DT_F32}

TEST(gpu_kernels_elementwise) {
    const kcase c[] = {
        {"add", 2, {SH(DIM_B, DIM_S, 5), SH(DIM_B, DIM_S, 5)}, F2, {0}, {0}, 0, 0},
        {"mul", 2, {SH(DIM_B, DIM_S, 300), SH(DIM_B, DIM_S, 300)}, F2, {0}, {0}, 0, 0},
        {"silu", 1, {SH(DIM_B, DIM_S, 3, 7)}, {DT_F32}, {0}, {0}, 0, 0},
        {"copy", 1, {SH(DIM_B, DIM_S, 9)}, {DT_F32}, {0}, {0}, 0, 0},
    };
    run_cases(t, c, sizeof c / sizeof c[0]);
}

TEST(gpu_kernels_dense) {
    const kcase c[] = {
        {"matmul", 2, {SH(DIM_B, DIM_S, 7), SH(5, 7)}, F2, {0}, {0}, 0, 0},
        {"matmul", 2, {SH(DIM_B, DIM_S, 67), SH(129, 67)}, F2, {0}, {0}, 0, 0},
        {"matmul", 2, {SH(DIM_B, DIM_S, 7), SH(7, 3)}, F2, {1}, {0}, 0, 0},
        {"matmul", 2, {SH(DIM_B, DIM_S, 2, 6), SH(4, 6)}, F2, {0}, {0}, 0, 0},
        {"rmsnorm", 2, {SH(DIM_B, DIM_S, 9), SH(9)}, F2, {0}, {1e-5}, 0, 0},
        {"rmsnorm", 2, {SH(DIM_B, DIM_S, 130), SH(130)}, F2, {0}, {1e-5}, 0, 0},
        {"embedding", 2, {SH(DIM_B, DIM_S), SH(11, 4)}, {DT_I32, DT_F32}, {0}, {0}, 11, 0},
        {"embedding", 2, {SH(DIM_B, DIM_S), SH(256, 33)}, {DT_I32, DT_F32}, {0}, {0}, 256, 0},
        {"cross_entropy", 2, {SH(DIM_B, DIM_S, 13), SH(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 13, 0},
        {"cross_entropy", 2, {SH(DIM_B, DIM_S, 256), SH(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 256, 0},
    };
    run_cases(t, c, sizeof c / sizeof c[0]);
}

TEST(gpu_kernels_attention) {
    const kcase c[] = {
        {"rope", 1, {SH(DIM_B, DIM_S, 3, 8)}, {DT_F32}, {0, 3}, {0}, 0, 0},
        {"rope", 1, {SH(DIM_B, DIM_S, 2, 64)}, {DT_F32}, {0}, {0}, 0, 0},
        {"attention", 3, {SH(DIM_B, DIM_S, 4, 8), SH(DIM_B, DIM_S, 2, 8), SH(DIM_B, DIM_S, 2, 8)}, {DT_F32, DT_F32, DT_F32}, {3}, {0}, 0, 37},
        {"attention", 3, {SH(DIM_B, DIM_S, 2, 64), SH(DIM_B, DIM_S, 2, 64), SH(DIM_B, DIM_S, 2, 64)}, {DT_F32, DT_F32, DT_F32}, {100}, {0}, 0, 37},
        {"attention", 3, {SH(DIM_B, DIM_S, 1, 16), SH(DIM_B, DIM_S, 1, 16), SH(DIM_B, DIM_S, 1, 16)}, {DT_F32, DT_F32, DT_F32}, {1}, {0}, 0, 20},
        {"attention", 3, {SH(DIM_B, DIM_S, 6, 32), SH(DIM_B, DIM_S, 3, 32), SH(DIM_B, DIM_S, 3, 32)}, {DT_F32, DT_F32, DT_F32}, {17}, {0}, 0, 70},
        /* realm-9m's shape: 6 heads of 64, a window shorter than S */
        {"attention", 3, {SH(DIM_B, DIM_S, 6, 64), SH(DIM_B, DIM_S, 6, 64), SH(DIM_B, DIM_S, 6, 64)}, {DT_F32, DT_F32, DT_F32}, {96}, {0}, 0, 200},
    };
    run_cases(t, c, sizeof c / sizeof c[0]);
}

TEST(gpu_kernels_mamba3) {
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
        {"mamba3_scan", 11, M3(2, 64, 64, 16), F11, {64}, {0}, 0, 150}, /* realm-9m's head shape */
    };
    run_cases(t, c, sizeof c / sizeof c[0]);
#undef M3
#undef F11
}

TEST(gpu_kernels_dense_edges) {
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

/* The dense templates on strided views (as kernels_dense_views). */
TEST(gpu_kernels_dense_views) {
    if (!gpu_on()) return;
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
    int ok = ir_emit_into(&g, "matmul", (int[]){x7, w}, 2, NULL, NULL, y9) >= 0 &&
             ir_emit(&g, "matmul", (int[]){x7, w2}, 2, tr1, NULL, out) == 1 &&
             ir_emit(&g, "matmul_wgrad", (int[]){x7, b6}, 2, NULL, NULL, out) == 1 &&
             ir_emit(&g, "rmsnorm", (int[]){x13, nw}, 2, NULL, eps, out) == 1 &&
             ir_emit(&g, "rmsnorm_bwd", (int[]){x13, nw, x13}, 3, NULL, eps, out) == 3 &&
             ir_emit(&g, "cross_entropy", (int[]){x13, tg}, 2, NULL, NULL, out) == 2 &&
             ir_emit(&g, "cross_entropy_bwd", (int[]){x13, tg, dl}, 3, NULL, NULL, out) == 1 &&
             ir_emit_into(&g, "embedding", (int[]){tok, tab}, 2, NULL, NULL, e6) >= 0 &&
             ir_emit(&g, "embedding_bwd", (int[]){tok, d13}, 2, vocab, NULL, out) == 2;
    if (!ok) {
        t_fail(t, __FILE__, __LINE__, "building the graph: %s", g.err);
    } else {
        backend *bk = kc_cuda(t);
        if (bk) {
            kc_check_graph(t, bk, &g, 3, 11, 1e-5, 11);
            bk_destroy(bk);
        }
    }
    ir_free(&g);
}

/* A whole model's training graph (forward, loss, backward), every launch. */
static void check_model(tctx *t, const char *path, long B, long S) {
    if (!gpu_on()) return;
    realm_model m;
    char err[1024];
    CHECK(model_load(path, &m, err, sizeof err) == 0, "%s", err);
    if (ir_autodiff(&m.g) < 0) {
        t_fail(t, __FILE__, __LINE__, "autodiff: %s", m.g.err);
    } else {
        backend *bk = kc_cuda(t);
        if (bk) {
            kc_check_graph(t, bk, &m.g, B, S, 1e-5, m.vocab);
            bk_destroy(bk);
        }
    }
    model_free(&m);
}

TEST(gpu_kernels_tiny_model_every_launch) { check_model(t, "models/tiny.lua", 2, 37); }

/* realm-9m itself at a short length that still crosses a scan chunk (64). */
TEST(gpu_kernels_realm9m_every_launch) { check_model(t, "models/realm-9m.lua", 1, 80); }

/* sumsq over many gradients and AdamW (as kernels_optimizer). */
TEST(gpu_kernels_optimizer) {
    if (!gpu_on()) return;
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
    if (ir_add_optimizer(&g, &o) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", g.err);
    } else {
        backend *bk = kc_cuda(t);
        if (bk) {
            kc_check_graph(t, bk, &g, 1, 1, 1e-5, 1);
            bk_destroy(bk);
        }
    }
    ir_free(&g);
}

/* ---- through the CLI ---- */

/* Any text will do for mechanics; tinyshakespeare when ../shared (or $REALM_SHARED) has it. */
static const char *corpus_path(char *buf, size_t len) {
    const char *sh = t_shared_dir();
    if (sh) {
        snprintf(buf, len, "%s/data/tinyshakespeare.txt", sh);
        return buf;
    }
    snprintf(buf, len, "/tmp/realm-gpu-test-corpus-%d.txt", (int)getpid());
    char cmd[1024], out[256];
    snprintf(cmd, sizeof cmd, "cat README.md docs/*.md docs/*.md docs/*.md docs/*.md > %.900s", buf);
    t_run(cmd, out, sizeof out);
    return buf;
}

static void tmpdir(tctx *t, char *buf, size_t len) {
    snprintf(buf, len, "/tmp/realm-gpu-%s-%d-%llu", t->name, (int)getpid(), (unsigned long long)(t_next(t) % 100000));
    char cmd[600], out[64];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", buf, buf);
    t_run(cmd, out, sizeof out);
}

static void rmdir_r(const char *d) {
    char cmd[600], out[64];
    snprintf(cmd, sizeof cmd, "rm -rf %s", d);
    t_run(cmd, out, sizeof out);
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *b = NULL;
    long n = -1;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        b = calloc((size_t)n + 1, 1);
        if (b && fread(b, 1, (size_t)n, f) != (size_t)n) b[0] = 0;
    }
    fclose(f);
    return b;
}

static int count_lines(const char *path) {
    char *s = slurp(path);
    int n = 0;
    for (char *p = s; p && *p; p++) n += *p == '\n';
    free(s);
    return n;
}

static pid_t spawn(const char *cmd) {
    fflush(stdout);   /* else the child's exit flushes our buffered output a second time */
    pid_t pid = fork();
    if (pid == 0) {
        if (!freopen("/dev/null", "w", stdout)) _exit(126);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Steps on a GPU take milliseconds, so the run is long enough (and checkpoints often enough)
 * for the kill to land mid-run rather than after the end. */
static void train_cmd(char *cmd, size_t len, const char *data, const char *run, int steps, int save) {
    snprintf(cmd, len,
             "%s train models/tiny.lua --data %s --out %s --steps %d --save-every %d --backend %s --batch 4 --seq 64 "
             "--warmup 5 --eval-every 0 --log-every 50",
             t_realm_bin(), data, run, steps, save, gpu_backend_name());
}

TEST(gpu_train_kill9_resume_is_bitwise) {
    if (!gpu_on()) return;
    char data[512], dir[512], a[600], b[600], cmd[2048], ecmd[2100], out[8192], log[700];
    corpus_path(data, sizeof data);
    tmpdir(t, dir, sizeof dir);
    snprintf(a, sizeof a, "%s/a", dir);
    snprintf(b, sizeof b, "%s/b", dir);
    const int steps = 300, save = 10;
    train_cmd(cmd, sizeof cmd, data, a, steps, save);
    CHECK(t_run(cmd, out, sizeof out) == 0, "uninterrupted run failed: %s", out);
    int at = (int)t_randint(t, save + 1, steps / 2);
    train_cmd(cmd, sizeof cmd, data, b, steps, save);
    /* "exec" keeps the shell from standing between us and realm, so SIGKILL reaches it */
    snprintf(ecmd, sizeof ecmd, "exec %s", cmd);
    pid_t pid = spawn(ecmd);
    snprintf(log, sizeof log, "%s/losses.tsv", b);
    for (int i = 0; i < 60000 && count_lines(log) < at && waitpid(pid, NULL, WNOHANG) == 0; i++) usleep(500);
    kill(pid, SIGKILL);
    int st;
    waitpid(pid, &st, 0);
    CHECK(WIFSIGNALED(st), "the run finished before it could be killed (at step %d)", at);
    int logged = count_lines(log);
    CHECK(t_run(cmd, out, sizeof out) == 0, "resumed run failed: %s", out);
    CHECK(strstr(out, "resuming from"), "the second run did not resume: %s", out);
    snprintf(log, sizeof log, "%s/losses.tsv", a);
    char *la = slurp(log);
    snprintf(log, sizeof log, "%s/losses.tsv", b);
    char *lb = slurp(log);
    int same = la && lb && strcmp(la, lb) == 0, n = count_lines(log);
    free(la);
    free(lb);
    rmdir_r(dir);
    CHECK(n == steps, "resumed log has %d lines, want %d", n, steps);
    CHECK(same, "losses differ after kill -9 at step %d (%d logged) and resume", at, logged);
}

/* realm-9m learns on the GPU: 30 steps of batch 4 x 256 bytes. Random init predicts ~ln 256 =
 * 5.55 nats; byte unigram statistics alone are worth ~3.3, so a working step gets well below
 * the first loss within 30 steps. */
TEST(gpu_train_realm9m_loss_falls) {
    if (!gpu_on()) return;
    char data[512], dir[512], cmd[2048], out[16384], log[700];
    corpus_path(data, sizeof data);
    tmpdir(t, dir, sizeof dir);
    snprintf(cmd, sizeof cmd,
             "%s train models/realm-9m.lua --data %s --out %s --backend %s --steps 30 --batch 4 --seq 256 "
             "--warmup 5 --eval-every 0 --save-every 1000 --log-every 10",
             t_realm_bin(), data, dir, gpu_backend_name());
    int rc = t_run(cmd, out, sizeof out);
    snprintf(log, sizeof log, "%s/losses.tsv", dir);
    char *l = slurp(log);
    rmdir_r(dir);
    if (rc != 0 || !l) {
        free(l);
        CHECK(0, "training failed (status %d): %s", rc, out);
    }
    double first = NAN, last[5] = {NAN, NAN, NAN, NAN, NAN};
    int n = 0;
    for (char *p = l; p && *p;) {
        long step;
        double v;
        if (sscanf(p, "%ld\t%lf", &step, &v) == 2) {
            if (n == 0) first = v;
            last[n % 5] = v;
            n++;
        }
        p = strchr(p, '\n');
        if (p) p++;
    }
    free(l);
    double tail = 0;
    for (int i = 0; i < 5; i++) tail += last[i] / 5;
    printf("  realm-9m on %s: loss %.4f at step 1, mean of the last 5 of %d steps %.4f\n", gpu_backend_name(), first,
           n, tail);
    CHECK(n == 30, "%d losses logged, want 30: %s", n, out);
    CHECK(isfinite(first) && isfinite(tail) && tail < first - 1.0,
          "loss did not fall: %.4f at step 1, %.4f over the last 5 steps\n%s", first, tail, out);
}

/* `realm bench` on the GPU: a table and a parseable RESULT line. */
TEST(gpu_bench_cli) {
    if (!gpu_on()) return;
    char cmd[1024], out[16384];
    snprintf(cmd, sizeof cmd, "%s bench models/realm-9m.lua --backend %s --batch 2 --seq 256 --steps 3 --warmup 1",
             t_realm_bin(), gpu_backend_name());
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "bench failed (status %d): %s", rc, out);
    CHECK(strstr(out, "tokens/s") && strstr(out, "RESULT backend=") && strstr(out, "time per kernel class"),
          "bench output: %s", out);
}

/* ---- always on: `realm bench` end to end on OpenCL (PoCL in CI) ---- */
TEST(bench_cli) {
    char cmd[1024], out[16384];
    snprintf(cmd, sizeof cmd, "%s bench models/tiny.lua --backend opencl --batch 2 --seq 32 --steps 2 --warmup 1",
             t_realm_bin());
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "bench failed (status %d): %s", rc, out);
    const char *need[] = {"tokens/s", "ms/step", "FLOPs/token", "arena", "device memory used", "matmul",
                          "scan", "attention", "elementwise", "optimizer", "RESULT backend=opencl B=2 S=32", NULL};
    for (int i = 0; need[i]; i++) CHECK(strstr(out, need[i]), "bench output lacks '%s': %s", need[i], out);
    /* the profiled launches add up to the plan: every launch is accounted for once per step */
    const char *g = strstr(out, "launches (");
    CHECK(g, "no launch count: %s", out);
    while (g > out && g[-1] != ' ') g--;
    while (g > out && g[-1] == ' ') g--;
    while (g > out && g[-1] != ' ') g--;
    long nl = atol(g), sum = 0;
    const char *p = strstr(out, "by primitive:");
    CHECK(p, "no per-primitive table: %s", out);
    p = strchr(p, '\n');
    if (p) p = strchr(p + 1, '\n');   /* skip the header row */
    while (p && p[1] == ' ' && p[2] == ' ') {
        char name[64];
        long k;
        double ms;
        if (sscanf(p + 1, "%63s %ld %lf", name, &k, &ms) == 3) sum += k;
        p = strchr(p + 1, '\n');
    }
    CHECK(nl > 0 && sum == nl, "profiled launches per step %ld, plan launches %ld: %s", sum, nl, out);
    snprintf(cmd, sizeof cmd, "%s bench models/tiny.lua --backend opencl --steps 0", t_realm_bin());
    rc = t_run(cmd, out, sizeof out);
    char *nl1 = strchr(out, '\n');
    CHECK(rc == 2 && nl1 && !nl1[1], "--steps 0: status %d: %s", rc, out);
}
