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
#include "kcases.h"
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

/* ---- kernel cases: the tables shared with tests/test_kernels.c (tests/kcases.c) ---- */

static void run_table_tol(tctx *t, kcase_table tab, double tol) {
    if (!t_gpu_on()) return;
    backend *bk = kc_cuda(t);
    if (!bk) return;
    kc_run_table(t, bk, gpu_backend_name(), tab, tol);
    bk_destroy(bk);
}

static void run_table(tctx *t, kcase_table tab) { run_table_tol(t, tab, 1e-5); }

TEST(gpu_kernels_elementwise) { run_table(t, kcases_elementwise); }

TEST(gpu_kernels_dense) { run_table(t, kcases_dense); }

TEST(gpu_kernels_attention) { run_table(t, kcases_attention); }

TEST(gpu_kernels_mamba3) {
    run_table(t, kcases_mamba3);
    if (!t->failed) run_table_tol(t, kcases_mamba3_long, kcases_long_tol);
}

TEST(gpu_kernels_dense_edges) { run_table(t, kcases_dense_edges); }

/* The dense templates on strided views (as kernels_dense_views). */
TEST(gpu_kernels_dense_views) {
    if (!t_gpu_on()) return;
    ir_graph g;
    if (kc_build_dense_views(&g) < 0) {
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
    if (!t_gpu_on()) return;
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
    if (!t_gpu_on()) return;
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

/* Steps on a GPU take milliseconds, so the run is long enough (and checkpoints often enough)
 * for the kill to land mid-run rather than after the end. */
static void train_cmd(char *cmd, size_t len, const char *data, const char *run, int steps, int save) {
    snprintf(cmd, len,
             "%s train models/tiny.lua --data %s --out %s --steps %d --save-every %d --backend %s --batch 4 --seq 64 "
             "--warmup 5 --eval-every 0 --log-every 50",
             t_realm_bin(), data, run, steps, save, gpu_backend_name());
}

TEST(gpu_train_kill9_resume_is_bitwise) {
    if (!t_gpu_on()) return;
    char data[512], dir[512], a[600], b[600], cmd[2048], ecmd[2100], out[8192], log[700];
    t_text_corpus(data, sizeof data);
    t_tmpdir(t, dir, sizeof dir);
    snprintf(a, sizeof a, "%s/a", dir);
    snprintf(b, sizeof b, "%s/b", dir);
    const int steps = 300, save = 10;
    train_cmd(cmd, sizeof cmd, data, a, steps, save);
    CHECK(t_run(cmd, out, sizeof out) == 0, "uninterrupted run failed: %s", out);
    int at = (int)t_randint(t, save + 1, steps / 2);
    train_cmd(cmd, sizeof cmd, data, b, steps, save);
    /* "exec" keeps the shell from standing between us and realm, so SIGKILL reaches it */
    snprintf(ecmd, sizeof ecmd, "exec %s", cmd);
    pid_t pid = (pid_t)t_spawn(ecmd);
    snprintf(log, sizeof log, "%s/losses.tsv", b);
    for (int i = 0; i < 60000 && t_count_lines(log) < at && waitpid(pid, NULL, WNOHANG) == 0; i++) usleep(500);
    kill(pid, SIGKILL);
    int st;
    waitpid(pid, &st, 0);
    CHECK(WIFSIGNALED(st), "the run finished before it could be killed (at step %d)", at);
    int logged = t_count_lines(log);
    CHECK(t_run(cmd, out, sizeof out) == 0, "resumed run failed: %s", out);
    CHECK(strstr(out, "resuming from"), "the second run did not resume: %s", out);
    snprintf(log, sizeof log, "%s/losses.tsv", a);
    char *la = t_slurp(log);
    snprintf(log, sizeof log, "%s/losses.tsv", b);
    char *lb = t_slurp(log);
    int same = la && lb && strcmp(la, lb) == 0, n = t_count_lines(log);
    free(la);
    free(lb);
    t_rmtree(dir);
    CHECK(n == steps, "resumed log has %d lines, want %d", n, steps);
    CHECK(same, "losses differ after kill -9 at step %d (%d logged) and resume", at, logged);
}

/* realm-9m learns on the GPU: 30 steps of batch 4 x 256 bytes. Random init predicts ~ln 256 =
 * 5.55 nats; byte unigram statistics alone are worth ~3.3, so a working step gets well below
 * the first loss within 30 steps. */
TEST(gpu_train_realm9m_loss_falls) {
    if (!t_gpu_on()) return;
    char data[512], dir[512], cmd[2048], out[16384], log[700];
    t_text_corpus(data, sizeof data);
    t_tmpdir(t, dir, sizeof dir);
    snprintf(cmd, sizeof cmd,
             "%s train models/realm-9m.lua --data %s --out %s --backend %s --steps 30 --batch 4 --seq 256 "
             "--warmup 5 --eval-every 0 --save-every 1000 --log-every 10",
             t_realm_bin(), data, dir, gpu_backend_name());
    int rc = t_run(cmd, out, sizeof out);
    snprintf(log, sizeof log, "%s/losses.tsv", dir);
    char *l = t_slurp(log);
    t_rmtree(dir);
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
    if (!t_gpu_on()) return;
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
