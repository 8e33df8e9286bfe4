/* The memory model, the auto-tuner, recomputation and realm-150m (docs/memory.md). The
 * training-path tests run the CLI on OpenCL (PoCL in CI) with a small --memory-budget. */
#include "autotune.h"
#include "frontend.h"
#include "fsutil.h"
#include "reference.h"
#include "session.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The tuner's model of a `realm train` run on OpenCL: training plan (every layer recomputed
 * or not), validation plan when the model validates, the budget and fraction given. */
typedef struct {
    session tr, ev;
    int have_ev;
    at_model am;
} tuned;

static int tuned_open(tctx *t, tuned *u, const char *path, int recompute, int with_eval, size_t budget) {
    char err[2048], *src;
    size_t len;
    memset(u, 0, sizeof *u);
    if (fs_read_file(path, 1 << 20, &src, &len, err, sizeof err) < 0 ||
        session_prepare(&u->tr, src, len, path, "opencl", 1, recompute, err, sizeof err) < 0 ||
        (with_eval && session_prepare(&u->ev, src, len, path, "opencl", 0, 0, err, sizeof err) < 0)) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        return -1;
    }
    free(src);
    u->have_ev = with_eval;
    u->am = (at_model){.train = &u->tr.p, .eval = with_eval ? &u->ev.p : NULL, .available = budget, .fraction = 0.95};
    return 0;
}

static void tuned_close(tuned *u) {
    if (u->have_ev) session_close(&u->ev);
    session_close(&u->tr);
}

static long number_after(const char *s, const char *key) {
    const char *p = strstr(s, key);
    return p ? strtol(p + strlen(key), NULL, 10) : -1;
}

/* A batch that cannot fit stops before training (exit 2, nothing created) with one line that
 * names the largest batch that fits, and that batch is the memory model's answer. */
TEST(autotune_small_budget_exits_2_with_largest_fit) {
    char data[512], dir[512], cmd[2048], out[8192];
    t_text_corpus(data, sizeof data);
    snprintf(dir, sizeof dir, "/tmp/realm-autotune-%d-%llu", (int)getpid(), (unsigned long long)(t_next(t) % 100000));
    snprintf(cmd, sizeof cmd, "%s train models/tiny.lua --data %s --out %s --backend opencl --batch 64 --seq 128 "
             "--steps 2 --memory-budget 8M", t_realm_bin(), data, dir);
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 2, "exit %d, want 2: %s", rc, out);
    CHECK(access(dir, F_OK) != 0, "the run directory was created before the memory check");
    long fit = number_after(out, "the largest batch that fits at seq 128 is ");
    CHECK(fit >= 1, "no largest batch in: %s", out);
    tuned u;
    if (tuned_open(t, &u, "models/tiny.lua", 0, 1, 8u << 20)) return;
    int ok = at_fits(&u.am, fit, 128) && !at_fits(&u.am, fit + 1, 128);
    long want = at_max_batch(&u.am, 128, 1L << 20);
    tuned_close(&u);
    CHECK(ok && want == fit, "CLI says batch %ld fits; the model says %ld", fit, want);
    /* nothing fits: the message falls back to the sequence length */
    snprintf(cmd, sizeof cmd, "%s train models/tiny.lua --data %s --out %s --backend opencl --batch 4 --seq 128 "
             "--steps 2 --memory-budget 2M", t_realm_bin(), data, dir);
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 2 && (strstr(out, "largest seq that fits with batch 1") || strstr(out, "not even batch 1")),
          "exit %d: %s", rc, out);
}

/* --batch auto on a budget: the chosen batch fits and the next one would not; the run trains,
 * and the estimate equals what the backend measured (PoCL counts exactly our buffers). */
TEST(autotune_batch_auto_fills_budget) {
    char data[512], dir[512], cmd[2048], out[16384];
    t_text_corpus(data, sizeof data);
    snprintf(dir, sizeof dir, "/tmp/realm-autotune-%d-%llu", (int)getpid(), (unsigned long long)(t_next(t) % 100000));
    snprintf(cmd, sizeof cmd, "%s train models/tiny.lua --data %s --out %s --backend opencl --batch auto --seq 64 "
             "--steps 1 --eval-every 0 --memory-budget 6M", t_realm_bin(), data, dir);
    int rc = t_run(cmd, out, sizeof out);
    char rm[600], o2[64];
    snprintf(rm, sizeof rm, "rm -rf %s", dir);
    t_run(rm, o2, sizeof o2);
    CHECK(rc == 0, "exit %d: %s", rc, out);
    long B = number_after(out, "), batch ");
    int rcall = strstr(out, "every layer recomputed\n") != NULL;
    CHECK(B >= 1, "no batch in: %s", out);
    CHECK(strstr(out, "auto-tuner: seq 64: largest batch"), "the tuner did not report its choice: %s", out);
    const char *m = strstr(out, "memory: estimated ");
    CHECK(m, "no estimate line: %s", out);
    double est = 0, meas = 0, util = 0;
    CHECK(sscanf(m, "memory: estimated %lf MiB, measured %lf MiB, utilisation %lf%%", &est, &meas, &util) == 3,
          "unparsable: %.200s", m);
    CHECK(fabs(est - meas) <= 0.05 + 0.01 * meas, "estimated %.1f MiB, measured %.1f MiB", est, meas);
    CHECK(util <= 95.0 + 1e-9, "utilisation %.1f%% above the 95%% target", util);
    tuned u;
    if (tuned_open(t, &u, "models/tiny.lua", rcall, 0, 6u << 20)) return;
    int ok = at_fits(&u.am, B, 64) && !at_fits(&u.am, B + 1, 64);
    tuned_close(&u);
    CHECK(ok, "batch %ld (recompute %d) is not the largest that fits", B, rcall);
}

/* The categories of plan_memory add up to plan_arena, with and without recomputation, at
 * several sizes; `realm graph --memory` prints the same sum. */
TEST(autotune_memory_breakdown_adds_up) {
    for (int rc = 0; rc < 2; rc++) {
        tuned u;
        if (tuned_open(t, &u, "models/tiny.lua", rc, 0, 1)) return;
        long sizes[][2] = {{1, 1}, {4, 64}, {3, 100}, {16, 128}};
        for (int i = 0; i < 4; i++) {
            plan_mem pm;
            plan_memory(&u.tr.p, sizes[i][0], sizes[i][1], &pm);
            size_t sum = 0;
            for (int c = 0; c < PM_NCAT; c++) sum += pm.peak[c];
            size_t arena = plan_arena(&u.tr.p, sizes[i][0], sizes[i][1], NULL);
            if (sum != arena || pm.arena != arena || pm.peak[PM_WEIGHTS] != pm.sum[PM_WEIGHTS]) {
                tuned_close(&u);
                CHECK(0, "recompute %d B %ld S %ld: categories %zu, arena %zu", rc, sizes[i][0], sizes[i][1], sum,
                      arena);
            }
        }
        tuned_close(&u);
    }
    char cmd[1024], out[8192];
    snprintf(cmd, sizeof cmd, "%s graph models/tiny.lua --memory --batch 4 --seq 64", t_realm_bin());
    CHECK(t_run(cmd, out, sizeof out) == 0, "%s", out);
    const char *p = strstr(out, "training arena");
    CHECK(p, "%s", out);
    unsigned long long a = 0, b = 0;
    p = strchr(p, '(');
    CHECK(p && sscanf(p, "(%llu bytes; categories sum to %llu)", &a, &b) == 2 && a == b && a > 0, "%s", out);
    CHECK(strstr(out, "saved activations") && strstr(out, "optimizer moments") && strstr(out, "data buffers"), "%s", out);
    /* the CUDA default is realm train's: bf16 matmuls, with bf16 storage a smaller arena */
    CHECK(strstr(out, "bf16 matmuls"), "%s", out);
    snprintf(cmd, sizeof cmd, "%s graph models/tiny.lua --memory --batch 4 --seq 64 --precision fp32", t_realm_bin());
    char out32[8192];
    CHECK(t_run(cmd, out32, sizeof out32) == 0, "%s", out32);
    unsigned long long a32 = 0, b32 = 0;
    const char *q = strstr(out32, "training arena");
    q = q ? strchr(q, '(') : NULL;
    CHECK(q && sscanf(q, "(%llu bytes; categories sum to %llu)", &a32, &b32) == 2 && a32 == b32, "%s", out32);
    CHECK(strstr(out32, "fp32 matmuls") && a < a32, "bf16 arena %llu, fp32 %llu: %s", a, a32, out32);
    snprintf(cmd, sizeof cmd, "%s graph models/tiny.lua --memory --precision fp16", t_realm_bin());
    CHECK(t_run(cmd, out32, sizeof out32) == 2 && strstr(out32, "fp16"), "%s", out32);
}

/* ---- recomputation ---- */

static const char *recompute_models[] = {
    /* tiny's block kinds, every mixer and MLP recomputed through the model file */
    "local nn = require 'realm.nn'\n"
    "return nn.model { name = 'rc', vocab = 64, d_model = 32,\n"
    "  blocks = { nn.mamba3 { d_state = 8, headdim = 16, expand = 2, chunk = 8, recompute = true },\n"
    "             nn.attention { heads = 2, window = 16, recompute = true },\n"
    "             nn.mamba3 { d_state = 8, headdim = 16, expand = 2, chunk = 8 } },\n"
    "  mlp = nn.swiglu { hidden = 48, recompute = true } }\n",
    /* a user block with a split (views inside the recomputed region, one part unused) */
    "local nn = require 'realm.nn'\n"
    "local odd = nn.block { kind = 'odd', recompute = true, build = function(g, x, ctx)\n"
    "  local h = nn.linear(g, x, 3 * g:dim(x), 'up')\n"
    "  local a, unused, b = g:split(h, {g:dim(x), g:dim(x), g:dim(x)})\n"
    "  return a * b + a\n"
    "end }\n"
    "return nn.model { name = 'custom', vocab = 32, d_model = 16, tie_embeddings = false,\n"
    "  blocks = { nn.attention { heads = 4, kv_heads = 2, window = 3 }, odd,\n"
    "             nn.mamba3 { d_state = 8, headdim = 8, expand = 2, chunk = 4, recompute = true } },\n"
    "  mlp = nn.swiglu { hidden = 8 } }\n",
};

/* Loss and every parameter gradient through the reference executor; recompute_off clears the
 * model file's recompute flags. */
static int ref_grads(tctx *t, const char *src, int recompute_off, long B, long S, double **grads, long *n,
                     double *loss) {
    realm_model m;
    char err[1024];
    if (model_load_string(src, strlen(src), "rc.lua", &m, err, sizeof err) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        return -1;
    }
    ir_graph *g = &m.g;
    int marked = 0;
    for (int s = 0; s < g->nsc; s++) {
        marked += g->sc[s].recompute;
        if (recompute_off) g->sc[s].recompute = 0;
    }
    if (!marked || ir_autodiff(g) < 0) {
        t_fail(t, __FILE__, __LINE__, "no recompute scope, or autodiff: %s", g->err);
        model_free(&m);
        return -1;
    }
    /* activations emitted by the backward other than the gates (a `recompute` op such as silu,
     * and the elementwise node after it) that are always recomputed: the scopes'
     * recomputation happened */
    int recomputed = 0;
    for (int i = g->backward_start; i < g->nn; i++) {
        if (g->t[g->n[i].out[0]].role != ROLE_ACT || op_get(g->n[i].op)->recompute) continue;
        recomputed |= !(i > g->backward_start && op_get(g->n[i - 1].op)->recompute && op_get(g->n[i].op)->ew);
    }
    if (recomputed == recompute_off) {
        t_fail(t, __FILE__, __LINE__, "recompute %s but %d recomputed nodes", recompute_off ? "off" : "on", recomputed);
        model_free(&m);
        return -1;
    }
    ref_ctx *c = ref_create(g, B, S);
    ref_init_params(c, 7);
    uint64_t x = 12345;
    for (int i = 0; i < g->nt; i++) {
        if (g->t[i].role != ROLE_INPUT || g->t[i].base != i) continue;
        long k = ir_numel(&g->t[i].shape, B, S);
        double *p = ref_data(c, i);
        for (long j = 0; j < k; j++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            p[j] = (double)((x >> 33) % (uint64_t)m.vocab);
        }
    }
    ref_run(c, 0, g->nn);
    *loss = ref_data(c, m.loss)[0];
    long total = 0;
    for (int i = 0; i < g->nt; i++)
        if (g->t[i].role == ROLE_PARAM && g->t[i].base == i) total += ir_numel(&g->t[i].shape, 1, 1);
    double *out = malloc(sizeof(double) * (size_t)total);
    long at = 0;
    for (int i = 0; i < g->nt; i++) {
        if (g->t[i].role != ROLE_PARAM || g->t[i].base != i) continue;
        const ir_tensor *gt = &g->t[g->t[i].grad];
        const double *d = ref_data(c, gt->base) + gt->offset;
        long k = ir_numel(&g->t[i].shape, 1, 1);
        memcpy(out + at, d, sizeof(double) * (size_t)k);
        at += k;
    }
    ref_destroy(c);
    model_free(&m);
    *grads = out;
    *n = total;
    return 0;
}

/* Recomputed forwards are the same computation, so gradients must agree exactly. */
TEST(recompute_gradients_equal_without) {
    for (int k = 0; k < 2; k++) {
        double *a, *b, la, lb;
        long na, nb;
        if (ref_grads(t, recompute_models[k], 1, 2, 19, &a, &na, &la)) return;
        if (ref_grads(t, recompute_models[k], 0, 2, 19, &b, &nb, &lb)) {
            free(a);
            return;
        }
        double worst = 0, norm = 0;
        for (long i = 0; i < na && na == nb; i++) {
            worst = fmax(worst, fabs(a[i] - b[i]));
            norm = fmax(norm, fabs(a[i]));
        }
        free(a);
        free(b);
        CHECK(na == nb && la == lb, "model %d: %ld vs %ld gradients, loss %.17g vs %.17g", k, na, nb, la, lb);
        CHECK(norm > 0 && worst <= 1e-12 * norm, "model %d: gradients differ by %.3g (max %.3g)", k, worst, norm);
    }
}

/* Recomputing every layer shrinks the arena (the activations die in the forward). */
TEST(recompute_shrinks_arena) {
    tuned a, b;
    if (tuned_open(t, &a, "models/tiny.lua", 0, 0, 1)) return;
    if (tuned_open(t, &b, "models/tiny.lua", 1, 0, 1)) {
        tuned_close(&a);
        return;
    }
    size_t x = plan_arena(&a.tr.p, 8, 128, NULL), y = plan_arena(&b.tr.p, 8, 128, NULL);
    plan_mem pa, pb;
    plan_memory(&a.tr.p, 8, 128, &pa);
    plan_memory(&b.tr.p, 8, 128, &pb);
    tuned_close(&a);
    tuned_close(&b);
    CHECK(y < x * 4 / 5, "arena %zu with recompute, %zu without", y, x);
    CHECK(pb.peak[PM_SAVED] < pa.peak[PM_SAVED] / 4, "saved activations at peak %zu vs %zu", pb.peak[PM_SAVED],
          pa.peak[PM_SAVED]);
}

TEST(model_realm150m_parameter_count) {
    realm_model m;
    char err[1024];
    CHECK(model_load("models/realm-150m.lua", &m, err, sizeof err) == 0, "%s", err);
    long n = ir_param_count(&m.g);
    int kinds = 0;
    for (int s = 0; s < m.g.nsc; s++) {
        if (strcmp(m.g.sc[s].kind, "mamba3") == 0) kinds |= 1;
        if (strcmp(m.g.sc[s].kind, "attention") == 0) kinds |= 2;
        if (strcmp(m.g.sc[s].kind, "swiglu") == 0) kinds |= 4;
    }
    int d = m.d_model;
    model_free(&m);
    CHECK(n >= 150000000L * 97 / 100 && n <= 150000000L * 103 / 100, "realm-150m has %ld parameters", n);
    CHECK(d >= 768 && kinds == 7, "d_model %d, block kinds mask %d", d, kinds);
}

TEST(autotune_parse_bytes) {
    size_t v;
    CHECK(at_parse_bytes("512M", &v) == 0 && v == 512u << 20, "512M");
    CHECK(at_parse_bytes("1.5G", &v) == 0 && v == 3ull << 29, "1.5G");
    CHECK(at_parse_bytes("4096", &v) == 0 && v == 4096, "4096");
    CHECK(at_parse_bytes("64KiB", &v) == 0 && v == 65536, "64KiB");
    CHECK(at_parse_bytes("x", &v) < 0 && at_parse_bytes("5Q", &v) < 0 && at_parse_bytes("-1", &v) < 0, "bad input");
}
