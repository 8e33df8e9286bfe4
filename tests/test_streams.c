/* The side stream (gen/plan.c "the side stream", runtime/exec.c): weight-gradient launches run
 * on a second CUDA stream beside the backward chain.
 *
 * Always (no GPU): realm-9m's CUDA training plan puts its weight-gradient work on the side and
 * nothing else, and exec_run's schedule (exec_side_wait) with the memory plan has no hazard,
 * over the whole step and over parts of it: no main launch that may run while a side launch
 * is still running touches bytes that launch writes, or writes bytes it reads. The same holds
 * for the fp32 and the recomputing plans, of realm-9m and tiny. The OpenCL plan has no side
 * launches.
 *
 * With REALM_GPU=1 (CUDA): training steps with the side stream give the same bits as with
 * every launch in line (deterministic kernels, the same order of every sum). */
#include "exec.h"
#include "op.h"
#include "plan.h"
#include "rng.h"
#include "session.h"
#include "test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const plan_options bf16_plan = {.bf16 = 1};

/* bytes [o, o + n) of owner b at (B, S), or n = 0 where b has no storage */
static void owner_range(const plan *p, const size_t *off, int b, long B, long S, size_t *o, size_t *n) {
    *o = off[b];
    *n = off[b] == (size_t)-1 ? 0 : (size_t)ir_numel(&p->g->t[b].shape, B, S) * (size_t)ir_dtype_bytes(p->g->t[b].dtype);
}

/* Hazards between side launch l and main launch m that may run at the same time: pairs of
 * arguments, one of them written, whose bytes overlap. */
static int overlapping_pairs(const plan *p, const size_t *off, int l, int m, long B, long S, char *what, size_t len) {
    const plan_launch *L = &p->kg.launches[l], *M = &p->kg.launches[m];
    int bad = 0;
    for (int a = 0; a < L->nargs; a++)
        for (int q = 0; q < M->nargs; q++) {
            if (a < L->nin && q < M->nin) continue;
            size_t o1, n1, o2, n2;
            owner_range(p, off, p->g->t[L->arg[a]].base, B, S, &o1, &n1);
            owner_range(p, off, p->g->t[M->arg[q]].base, B, S, &o2, &n2);
            if (n1 && n2 && o1 < o2 + n2 && o2 < o1 + n1) {
                if (!bad)
                    snprintf(what, len, "launch %d %s (side, joined at %d) and %d %s: %s and %s overlap", l, L->kernel,
                             p->join[l], m, M->kernel, p->g->t[L->arg[a]].name, p->g->t[M->arg[q]].name);
                bad++;
            }
        }
    return bad;
}

/* The pairs (side launch, main launch) that exec_run may run at once over launches [l0, l1)
 * (its schedule: a side launch starts after every launch before it; a main launch waits for
 * what exec_side_wait names; the end of the run waits for the rest), checked for overlapping
 * bytes; returns the count of overlapping argument pairs. */
static int schedule_hazards(const plan *p, const size_t *off, long B, long S, int l0, int l1, char *what, size_t len) {
    int *done_by = malloc(sizeof(int) * (size_t)(p->kg.nl ? p->kg.nl : 1));
    for (int l = 0; l < p->kg.nl; l++) done_by[l] = l1;
    int waited = l0 - 1, last = l0 - 1;
    for (int i = l0; i < l1; i++) {
        if (p->side[i]) {
            last = i;
            continue;
        }
        const int need = exec_side_wait(p, i, waited, last);
        if (need < 0) continue;
        for (int s = waited + 1; s <= need; s++) done_by[s] = i;
        waited = need;
    }
    int bad = 0;
    for (int l = l0; l < l1; l++)
        if (p->side[l])
            for (int m = l + 1; m < done_by[l]; m++)
                if (!p->side[m]) bad += overlapping_pairs(p, off, l, m, B, S, what, len);
    free(done_by);
    return bad;
}

/* schedule_hazards over the whole step and random sub-ranges (as a caller running part of a
 * plan would), at two shapes */
static int plan_hazards(tctx *t, const plan *p, char *what, size_t len) {
    const long Bs[2] = {8, 2}, Ss[2] = {8192, 100};
    int bad = 0;
    for (int c = 0; c < 2; c++) {
        size_t *off = malloc(sizeof *off * (size_t)p->g->nt);
        plan_arena(p, Bs[c], Ss[c], off);
        bad += schedule_hazards(p, off, Bs[c], Ss[c], 0, p->kg.nl, what, len);
        for (int r = 0; r < 20; r++) {
            int a = (int)t_randint(t, 0, p->kg.nl - 1), b = (int)t_randint(t, a + 1, p->kg.nl);
            bad += schedule_hazards(p, off, Bs[c], Ss[c], a, b, what, len);
        }
        free(off);
    }
    return bad;
}

TEST(plan_side_stream_is_hazard_free) {
    char err[4096], what[512] = "";
    char *src = t_slurp("models/realm-9m.lua");
    CHECK(src, "models/realm-9m.lua");
    session s, o;
    int ok = session_prepare_opts(&s, src, strlen(src), "models/realm-9m.lua", "cuda", 1, 0, &bf16_plan, err,
                                  sizeof err) == 0;
    int oko = ok && session_prepare_opts(&o, src, strlen(src), "models/realm-9m.lua", "opencl", 1, 0, NULL, err,
                                         sizeof err) == 0;
    free(src);
    if (!oko) {
        if (ok) session_close(&s);
        CHECK(0, "%s", err);
    }
    const plan *p = &s.p;
    const ir_graph *g = p->g;
    int wgrad = 0, wgrad_side = 0, not_grad_work = 0, before_bwd = 0, bad_join = 0, hazards = 0, counted = 0;
    for (int l = 0; l < p->kg.nl; l++) {
        const plan_launch *L = &p->kg.launches[l];
        const char *op = op_get(g->n[L->node0].op)->name;
        int is_wgrad = strcmp(op, "matmul_wgrad") == 0;
        wgrad += is_wgrad;
        if (!p->side[l]) continue;
        counted++;
        wgrad_side += is_wgrad;
        not_grad_work += !L->param_grad;
        before_bwd += !g->n[L->node0].backward;
        bad_join += p->join[l] <= l || p->join[l] > p->kg.nl;
    }
    hazards += plan_hazards(t, p, what, sizeof what);
    int o_side = o.p.nside;
    session_close(&o);
    int nside = p->nside;
    session_close(&s);
    printf("  realm-9m CUDA training plan: %d side launches, %d of %d weight-gradient matmul launches\n", nside, wgrad_side,
           wgrad);
    CHECK(counted == nside, "plan.nside %d, %d launches marked", nside, counted);
    /* every weight-gradient launch (split-K products and their sums) but the tied head's two,
     * whose gradient is added to the embedding's by a launch of the chain */
    CHECK(wgrad > 60 && wgrad_side == wgrad - 2, "%d of %d weight-gradient launches on the side, want all but two",
          wgrad_side, wgrad);
    CHECK(not_grad_work == 0, "%d side launches are not weight-gradient work", not_grad_work);
    CHECK(before_bwd == 0, "%d side launches in the forward", before_bwd);
    CHECK(bad_join == 0, "%d side launches joined before themselves or past the end", bad_join);
    CHECK(hazards == 0, "%d overlapping argument pairs, e.g. %s", hazards, what);
    CHECK(o_side == 0, "the OpenCL plan has %d side launches", o_side);
}

/* The same schedule check on the other CUDA training plans a run may use: fp32 matmuls, and
 * every layer recomputed (what the auto-tuner picks when memory is short), for realm-9m and
 * tiny. */
TEST(plan_side_stream_variants_are_hazard_free) {
    const char *models[2] = {"models/realm-9m.lua", "models/tiny.lua"};
    for (int mi = 0; mi < 2; mi++) {
        char err[4096], what[512] = "";
        char *src = t_slurp(models[mi]);
        CHECK(src, "%s", models[mi]);
        for (int v = 0; v < 3; v++) {
            session s;
            const int bf16 = v != 1, recompute = v == 2;
            if (session_prepare_opts(&s, src, strlen(src), models[mi], "cuda", 1, recompute, bf16 ? &bf16_plan : NULL,
                                     err, sizeof err) < 0) {
                free(src);
                CHECK(0, "%s", err);
            }
            const int nside = s.p.nside, bad = plan_hazards(t, &s.p, what, sizeof what);
            session_close(&s);
            if (nside == 0 || bad) free(src);
            CHECK(nside > 0, "%s (%s%s): no side launches", models[mi], bf16 ? "bf16" : "fp32",
                  recompute ? ", recomputed" : "");
            CHECK(bad == 0, "%s (%s%s): %d overlapping argument pairs, e.g. %s", models[mi], bf16 ? "bf16" : "fp32",
                  recompute ? ", recomputed" : "", bad, what);
        }
        free(src);
    }
}

/* Three training steps of realm-9m on CUDA from the same start; the parameters after them
 * (vals, malloc'd) and the last loss. */
static int three_steps(backend *bk, const char *src, const plan_options *po, int side_off, int recompute,
                       const uint8_t *rows, long B, long S, float **vals, long *total, double *loss, int *nside, char *err,
                       size_t errlen) {
    session s;
    const float hyper[8] = {3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.19f, 0.0975f, 1.0f};
    if (session_prepare_opts(&s, src, strlen(src), "models/realm-9m.lua", "cuda", 1, recompute, po, err, errlen) < 0)
        return -1;
    int failed = session_alloc(&s, bk, B, S, err, errlen) < 0;
    if (!failed) {
        *nside = s.p.nside;
        s.x.side_off = side_off;
        failed = session_init_params(&s, 1, err, errlen) < 0 || exec_upload(&s.x, s.opt.hyper, hyper, err, errlen) < 0 ||
                 session_set_batch(&s, rows, S + 1, err, errlen) < 0;
    }
    for (int step = 0; step < 3 && !failed; step++) failed = session_run(&s, err, errlen) < 0;
    if (!failed) failed = session_loss(&s, loss, err, errlen) < 0;
    const ir_graph *g = &s.m.g;
    *total = 0;
    for (int i = 0; i < g->nt; i++)
        if (g->t[i].role == ROLE_PARAM) *total += ir_numel(&g->t[i].shape, 1, 1);
    *vals = malloc(sizeof(float) * (size_t)(*total ? *total : 1));
    for (int i = 0, at = 0; i < g->nt && !failed; i++) {
        if (g->t[i].role != ROLE_PARAM) continue;
        failed = exec_download(&s.x, i, *vals + at, err, errlen) < 0;
        at += (int)ir_numel(&g->t[i].shape, 1, 1);
    }
    session_close(&s);
    return failed ? -1 : 0;
}

/* Two variants of the same training (plan options, side stream off) give the same loss and
 * parameters, bit for bit. */
static void same_bits(tctx *t, const plan_options *po0, int off0, const plan_options *po1, int off1, int recompute,
                      const char *what) {
    const char *e = getenv("REALM_GPU"), *be = getenv("REALM_GPU_BACKEND");
    if (!e || strcmp(e, "1") != 0 || (be && strcmp(be, "cuda") != 0)) {
        printf("  (no CUDA GPU: skipped)\n");
        return;
    }
    char err[4096];
    backend *bk = bk_create(BK_CUDA, 0, NULL, err, sizeof err);
    CHECK(bk, "REALM_GPU=1 but no CUDA device: %s", err);
    char *src = t_slurp("models/realm-9m.lua");
    const long B = 2, S = 512;
    uint8_t *rows = malloc((size_t)(B * (S + 1)));
    rng_state r;
    rng_seed(&r, t_next(t));
    for (long i = 0; i < B * (S + 1); i++) rows[i] = (uint8_t)rng_below(&r, 256);
    float *vals[2] = {NULL, NULL};
    double loss[2] = {0, 0};
    long total[2] = {0, 0};
    int nside = 0, failed = !src;
    if (!src) snprintf(err, sizeof err, "models/realm-9m.lua unreadable");
    if (!failed)
        failed = three_steps(bk, src, po0, off0, recompute, rows, B, S, &vals[0], &total[0], &loss[0], &nside, err,
                             sizeof err) < 0 ||
                 three_steps(bk, src, po1, off1, recompute, rows, B, S, &vals[1], &total[1], &loss[1], &nside, err,
                             sizeof err) < 0;
    long diff = 0;
    if (!failed && total[0] == total[1])
        for (long i = 0; i < total[0]; i++) diff += memcmp(&vals[0][i], &vals[1][i], sizeof(float)) != 0;
    free(vals[0]);
    free(vals[1]);
    free(rows);
    free(src);
    bk_destroy(bk);
    CHECK(!failed, "%s", err);
    printf("  3 steps of realm-9m at %ld x %ld (%s), %d side launches: loss %.6f / %.6f, %ld of %ld parameters differ\n",
           B, S, what, nside, loss[0], loss[1], diff, total[0]);
    CHECK(nside > 0, "the CUDA plan has no side launches");
    CHECK(total[0] == total[1] && total[0] > 0, "parameter counts %ld and %ld", total[0], total[1]);
    CHECK(memcmp(&loss[0], &loss[1], sizeof loss[0]) == 0, "loss %.9g against %.9g", loss[0], loss[1]);
    CHECK(diff == 0, "%ld of %ld parameters differ after 3 steps", diff, total[0]);
}

/* Side stream on and off. */
TEST(gpu_side_stream_same_bits) { same_bits(t, &bf16_plan, 0, &bf16_plan, 1, 0, "side stream on / off"); }

/* bf16 storage (gen/precision.c) and fp32 storage of the same bf16 plan: the matmuls round
 * their operands to bf16 exactly as the producers now do at their stores, so nothing may
 * change but the bytes moved. */
TEST(gpu_bf16_storage_same_bits) {
    const plan_options fp32_store = {.bf16 = 1, .fp32_storage = 1};
    same_bits(t, &bf16_plan, 0, &fp32_store, 0, 0, "bf16 / fp32 storage");
}

/* The same with every layer recomputed in the backward: the recomputed norms and products are
 * bf16 too, and the recomputed matmuls read the weights' copies made in the forward. */
TEST(gpu_bf16_storage_same_bits_recomputed) {
    const plan_options fp32_store = {.bf16 = 1, .fp32_storage = 1};
    same_bits(t, &bf16_plan, 0, &fp32_store, 0, 1, "bf16 / fp32 storage, every layer recomputed");
}
