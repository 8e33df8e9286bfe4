/* Decode (docs/decode.md): the step graph's primitives against their references with poisoned
 * outputs, prefill + step-by-step logits == the parallel forward's logits at every position
 * (reference executor and OpenCL, and CUDA under REALM_GPU=1), batch 3 == batch 1, and the
 * CLI: generate and chat on the step plan (same seed, same text; /reset, /seed, context kept
 * across turns; a pipe and, when tmux is installed, a pseudo-terminal). */
#include "test.h"

#include "decode.h"
#include "exec.h"
#include "frontend.h"
#include "kernelcheck.h"
#include "op.h"
#include "plan.h"
#include "reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Window 8 and chunk 4, so a 29-byte string crosses the window and several chunks (and ends
 * in a partial chunk); one attention layer groups its KV heads. */
static const char *const SMALL =
    "local nn = require 'realm.nn'\n"
    "return nn.model { name = 'dec', d_model = 32,\n"
    "  blocks = { nn.mamba3 { d_state = 16, headdim = 16, chunk = 4 }, nn.attention { heads = 2, window = 8 },\n"
    "             nn.mamba3 { d_state = 16, headdim = 16, chunk = 4 }, nn.attention { heads = 4, kv_heads = 2, window = 5 } },\n"
    "  mlp = nn.swiglu { hidden = 48 } }\n";

enum { SEQ = 29, NB = 3, V = 256 };

static backend *gpu_backend(tctx *t) {
    const char *e = getenv("REALM_GPU");
    if (!e || !*e || strcmp(e, "0") == 0) return NULL;
    char err[2048];
    backend *bk = bk_create(BK_CUDA, 0, NULL, err, sizeof err);
    if (!bk) t_fail(t, __FILE__, __LINE__, "REALM_GPU=1 but CUDA failed: %s", err);
    return bk;
}

/* Parameters from the initialiser, rounded to fp32 as every executor sees them. */
static void param_values(const ir_tensor *tt, uint64_t seed, double *d, long n) {
    ir_param_init_values(tt, seed, d, n);
    for (long k = 0; k < n; k++) d[k] = (float)d[k];
}

/* The parallel forward's logits [B,S,V] for bytes[b*S + s] (bk NULL: fp64 reference). */
static int parallel_logits(tctx *t, backend *bk, const char *src, const uint8_t *bytes, long B, long S, uint64_t seed,
                           double *out) {
    char err[4096];
    realm_model m;
    if (model_load_string(src, strlen(src), "dec.lua", &m, err, sizeof err) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        return -1;
    }
    const ir_graph *g = &m.g;
    const int nodes = g->t[m.logits].producer + 1;
    int rc = 0;
    if (!bk) {
        ref_ctx *c = ref_create(g, B, S);
        for (int i = 0; i < g->nt; i++)
            if (g->t[i].role == ROLE_PARAM && g->t[i].base == i)
                param_values(&g->t[i], seed, ref_data(c, i), ir_numel(&g->t[i].shape, 1, 1));
        for (long k = 0; k < B * S; k++) ref_data(c, m.tokens)[k] = bytes[k];
        ref_run(c, 0, nodes);
        ref_buf L = ref_get(c, m.logits);
        for (long r = 0; r < B * S; r++)
            for (long f = 0; f < V; f++) out[r * V + f] = L.p[r * L.ld + f];
        ref_destroy(c);
    } else {
        plan p;
        plan_exec x;
        int keep[1] = {m.logits};
        if (plan_build(&p, g, 0, nodes, bk_name(bk), keep, 1, err, sizeof err) < 0) {
            t_fail(t, __FILE__, __LINE__, "%s", err);
            model_free(&m);
            return -1;
        }
        if (exec_create(&x, bk, &p, B, S, err, sizeof err) < 0) {
            t_fail(t, __FILE__, __LINE__, "%s", err);
            plan_free(&p);
            model_free(&m);
            return -1;
        }
        float *h = malloc(sizeof(float) * (size_t)(B * S * V + 100000));
        double *d = malloc(sizeof(double) * 100000);
        for (int i = 0; i < g->nt && rc == 0; i++) {
            if (g->t[i].role != ROLE_PARAM || g->t[i].base != i || x.offset[i] == (size_t)-1) continue;
            long n = ir_numel(&g->t[i].shape, 1, 1);
            param_values(&g->t[i], seed, d, n);
            for (long k = 0; k < n; k++) h[k] = (float)d[k];
            rc = exec_upload(&x, i, h, err, sizeof err);
        }
        for (long k = 0; k < B * S; k++) h[k] = bytes[k];
        if (rc == 0) rc = exec_upload(&x, m.tokens, h, err, sizeof err);
        if (rc == 0) rc = exec_run(&x, 0, p.kg.nl, err, sizeof err);
        if (rc == 0) rc = exec_download(&x, m.logits, h, err, sizeof err);
        for (long k = 0; rc == 0 && k < B * S * V; k++) out[k] = h[k];
        if (rc < 0) t_fail(t, __FILE__, __LINE__, "%s", err);
        free(h);
        free(d);
        exec_destroy(&x);
        plan_free(&p);
    }
    model_free(&m);
    return rc;
}

/* Step-by-step logits, laid out like the parallel ones: out[(b*S + s)*V + f]. */
static int step_logits(tctx *t, backend *bk, const uint8_t *bytes, long B, long S, uint64_t seed, double *out) {
    char err[4096];
    decoder d;
    if (decoder_open(&d, SMALL, strlen(SMALL), "dec.lua", bk, B, err, sizeof err) < 0 ||
        (decoder_init_params(&d, seed, err, sizeof err) < 0 && (decoder_close(&d), 1))) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        return -1;
    }
    d.parallel = 0;   /* the step plan alone (the prefill plan has its own tests below) */
    uint8_t *col = malloc((size_t)B * (size_t)S);
    float *lg = malloc(sizeof(float) * (size_t)(S * B * V));
    for (long b = 0; b < B; b++)
        for (long s = 0; s < S; s++) col[b * S + s] = bytes[b * S + s];
    /* feed in two pieces: a prefill, then the rest one byte at a time */
    long cut = S / 3;
    int rc = decoder_feed(&d, col, 0, NULL, err, sizeof err);
    uint8_t *piece = malloc((size_t)B * (size_t)S);
    for (long b = 0; b < B; b++) memcpy(piece + b * cut, col + b * S, (size_t)cut);
    if (rc == 0) rc = decoder_feed(&d, piece, cut, lg, err, sizeof err);
    for (long s = cut; s < S && rc == 0; s++) {
        for (long b = 0; b < B; b++) piece[b] = col[b * S + s];
        rc = decoder_feed(&d, piece, 1, lg + s * B * V, err, sizeof err);
    }
    for (long s = 0; rc == 0 && s < S; s++)
        for (long b = 0; b < B; b++)
            for (long f = 0; f < V; f++) out[(b * S + s) * V + f] = lg[(s * B + b) * V + f];
    if (rc < 0) t_fail(t, __FILE__, __LINE__, "%s", err);
    free(piece);
    free(col);
    free(lg);
    decoder_close(&d);
    return rc;
}

/* Worst normwise relative error over positions (each position's [V] logits). */
static double worst_pos(const double *a, const double *b, long rows, long *at) {
    double w = 0;
    for (long r = 0; r < rows; r++) {
        double e = t_relerr(a + r * V, b + r * V, V);
        if (!(e <= w)) w = e, *at = r;
    }
    return w;
}

static void equivalence(tctx *t, backend *bk, const char *what) {
    uint8_t bytes[NB * SEQ];
    for (int k = 0; k < NB * SEQ; k++) bytes[k] = (uint8_t)t_randint(t, 0, 255);
    const uint64_t seed = t_next(t);
    double *par = malloc(sizeof(double) * NB * SEQ * V), *stp = malloc(sizeof(double) * NB * SEQ * V);
    double *one = malloc(sizeof(double) * SEQ * V);
    long at = 0;
    if (parallel_logits(t, bk, SMALL, bytes, NB, SEQ, seed, par) == 0 && step_logits(t, bk, bytes, NB, SEQ, seed, stp) == 0) {
        double e = worst_pos(stp, par, NB * SEQ, &at);
        if (!(e <= 1e-4))
            t_fail(t, __FILE__, __LINE__, "%s: step logits differ from the parallel forward at sequence %ld position %ld: %.3g",
                   what, at / SEQ, at % SEQ, e);
        /* batch 3 == batch 1, sequence by sequence */
        for (int b = 0; b < NB && !t->failed; b++) {
            if (step_logits(t, bk, bytes + b * SEQ, 1, SEQ, seed, one) < 0) break;
            e = worst_pos(one, stp + b * SEQ * V, SEQ, &at);
            if (!(e <= 1e-6))
                t_fail(t, __FILE__, __LINE__, "%s: batch 3 differs from batch 1 (sequence %d, position %ld): %.3g", what,
                       b, at, e);
        }
    }
    free(par);
    free(stp);
    free(one);
}

TEST(decode_step_equals_parallel_reference) { equivalence(t, NULL, "reference"); }

TEST(decode_step_equals_parallel_opencl) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    equivalence(t, bk, "opencl");
    bk_destroy(bk);
}

TEST(decode_step_equals_parallel_cuda) {
    backend *bk = gpu_backend(t);
    if (!bk) {
        if (!t->failed) printf("  (REALM_GPU not set: skipped)\n");
        return;
    }
    equivalence(t, bk, "cuda");
    bk_destroy(bk);
}

/* ---- prefill (the parallel forward handing its final states to the step plan) ---- */

/* Chunks 4 and 8 (prefill unit 8), windows 8 and 5, grouped KV heads. */
static const char *const PF =
    "local nn = require 'realm.nn'\n"
    "return nn.model { name = 'pf', d_model = 32,\n"
    "  blocks = { nn.mamba3 { d_state = 16, headdim = 16, chunk = 4 }, nn.attention { heads = 2, window = 8 },\n"
    "             nn.mamba3 { d_state = 16, headdim = 16, chunk = 8 }, nn.attention { heads = 4, kv_heads = 2, window = 5 } },\n"
    "  mlp = nn.swiglu { hidden = 48 } }\n";

enum { PSEQ = 40, PNB = 2 };

/* Prompt lengths: shorter than a chunk (all stepped), a multiple of the unit (the last unit is
 * stepped so one byte remains), one more than a multiple (prefill 16 exactly), neither, and
 * past both windows. */
static const long plen[] = {5, 16, 17, 21, 33};
static const long pexpect[] = {0, 8, 16, 16, 32};

static int open_pf(tctx *t, decoder *d, backend *bk, long B, uint64_t seed, int parallel) {
    char err[4096];
    if (decoder_open(d, PF, strlen(PF), "pf.lua", bk, B, err, sizeof err) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        return -1;
    }
    if (decoder_init_params(d, seed, err, sizeof err) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        decoder_close(d);
        return -1;
    }
    d->parallel = parallel;
    return 0;
}

/* Every state tensor of the step plan, dense fp64 (the reference's own values, or downloaded). */
static int state_values(tctx *t, decoder *d, int i, double *out) {
    const ir_tensor *tt = &d->m.g.t[i];
    const long n = ir_numel(&tt->shape, d->B, 1);
    if (!d->bk) {
        ref_buf b = ref_get(d->ref, i);
        for (long r = 0; r < b.ntok; r++)
            for (long f = 0; f < b.feat; f++) out[r * b.feat + f] = b.p[r * b.ld + f];
        return 0;
    }
    float *f = malloc(sizeof(float) * (size_t)n);
    char err[1024];
    int rc = exec_download(&d->x, i, f, err, sizeof err);
    for (long k = 0; rc == 0 && k < n; k++) out[k] = f[k];
    free(f);
    if (rc < 0) t_fail(t, __FILE__, __LINE__, "%s", err);
    return rc;
}

/* States of two decoders of the same model, tensor by tensor (normwise); angles compare as
 * (cos, sin) so 2pi - eps and +eps agree. */
static void same_states(tctx *t, decoder *a, decoder *b, double tol, const char *what) {
    const ir_graph *g = &a->m.g;
    int nstates = 0;
    for (int i = 0; i < g->nt && !t->failed; i++) {
        if (g->t[i].role != ROLE_STATE || g->t[i].base != i) continue;
        nstates++;
        const long n = ir_numel(&g->t[i].shape, a->B, 1);
        double *x = malloc(sizeof(double) * 2 * (size_t)n), *y = malloc(sizeof(double) * 2 * (size_t)n);
        long m = n;
        if (state_values(t, a, i, x) == 0 && state_values(t, b, i, y) == 0) {
            const char *nm = g->t[i].name;
            if (strlen(nm) > 6 && strcmp(nm + strlen(nm) - 6, ".theta") == 0) {
                for (long k = n - 1; k >= 0; k--) {
                    x[2 * k + 1] = sin(x[k]), x[2 * k] = cos(x[k]);
                    y[2 * k + 1] = sin(y[k]), y[2 * k] = cos(y[k]);
                }
                m = 2 * n;
            }
            double e = t_relerr(x, y, m);
            if (!(e <= tol)) t_fail(t, __FILE__, __LINE__, "%s: state %s differs: %.3g", what, nm, e);
        }
        free(x);
        free(y);
    }
    if (!t->failed && nstates != 12) t_fail(t, __FILE__, __LINE__, "expected 12 state tensors, found %d", nstates);
}

/* For each prompt length: prefill + step-by-step logits at every position equal the parallel
 * forward's, the prefill plan really ran (decoder_prefill_len, prefill_bytes), and the state
 * after the prompt equals the state after feeding it byte by byte. One decoder per path serves
 * every length through decoder_reset (the prefill arena is reused). */
static void prefill_equivalence(tctx *t, backend *bk, const char *what) {
    uint8_t bytes[PNB * PSEQ];
    for (int k = 0; k < PNB * PSEQ; k++) bytes[k] = (uint8_t)t_randint(t, 0, 255);
    const uint64_t seed = t_next(t);
    double *par = malloc(sizeof(double) * PNB * PSEQ * V), *got = malloc(sizeof(double) * PNB * PSEQ * V);
    float *lg = malloc(sizeof(float) * PSEQ * PNB * V);
    uint8_t *col = malloc(PNB * PSEQ);
    decoder dp, ds;
    char err[4096];
    if (parallel_logits(t, bk, PF, bytes, PNB, PSEQ, seed, par) < 0 || open_pf(t, &dp, bk, PNB, seed, 1) < 0) goto out;
    if (open_pf(t, &ds, bk, PNB, seed, 0) < 0) {
        decoder_close(&dp);
        goto out;
    }
    if (!dp.pf.ok) t_fail(t, __FILE__, __LINE__, "%s: no prefill plan: %s", what, dp.pf.why);
    if (!t->failed && dp.pf.unit != 8) t_fail(t, __FILE__, __LINE__, "%s: prefill unit %ld, expected 8", what, dp.pf.unit);
    for (size_t c = 0; c < sizeof plen / sizeof plen[0] && !t->failed; c++) {
        const long n = plen[c];
        int rc = decoder_reset(&dp, err, sizeof err) < 0 || decoder_reset(&ds, err, sizeof err) < 0;
        const long before = dp.prefill_bytes, m = decoder_prefill_len(&dp, n);
        if (m != pexpect[c]) {
            t_fail(t, __FILE__, __LINE__, "%s: a %ld-byte prompt prefills %ld bytes, expected %ld", what, n, m, pexpect[c]);
            break;
        }
        for (long b = 0; b < PNB; b++) memcpy(col + b * n, bytes + b * PSEQ, (size_t)n);
        if (!rc) rc = decoder_feed(&dp, col, n, lg, err, sizeof err) < 0 || decoder_feed(&ds, col, n, NULL, err, sizeof err) < 0;
        if (!rc && dp.prefill_bytes - before != m)
            t_fail(t, __FILE__, __LINE__, "%s: prefill ran %ld bytes, expected %ld", what, dp.prefill_bytes - before, m);
        if (!rc && !t->failed && dp.pos != n) t_fail(t, __FILE__, __LINE__, "%s: position %ld after %ld bytes", what, dp.pos, n);
        if (!rc && !t->failed) {
            char w[96];
            snprintf(w, sizeof w, "%s, %ld-byte prompt", what, n);
            same_states(t, &dp, &ds, 1e-4, w);
        }
        for (long s = n; !rc && s < PSEQ; s++) {
            uint8_t one[PNB];
            for (long b = 0; b < PNB; b++) one[b] = bytes[b * PSEQ + s];
            rc = decoder_feed(&dp, one, 1, lg + s * PNB * V, err, sizeof err) < 0;
        }
        if (rc) {
            t_fail(t, __FILE__, __LINE__, "%s: %s", what, err);
            break;
        }
        for (long s = 0; s < PSEQ; s++)
            for (long b = 0; b < PNB; b++)
                for (long f = 0; f < V; f++) got[(b * PSEQ + s) * V + f] = lg[(s * PNB + b) * V + f];
        long at = 0;
        double e = worst_pos(got, par, PNB * PSEQ, &at);
        if (!t->failed && !(e <= 1e-4))
            t_fail(t, __FILE__, __LINE__,
                   "%s: %ld-byte prompt: prefill + step logits differ from the parallel forward at sequence %ld position %ld: %.3g",
                   what, n, at / PSEQ, at % PSEQ, e);
    }
    decoder_close(&dp);
    decoder_close(&ds);
out:
    free(par);
    free(got);
    free(lg);
    free(col);
}

TEST(prefill_equals_parallel_reference) { prefill_equivalence(t, NULL, "reference"); }

TEST(prefill_equals_parallel_opencl) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    prefill_equivalence(t, bk, "opencl");
    bk_destroy(bk);
}

TEST(prefill_equals_parallel_cuda) {
    backend *bk = gpu_backend(t);
    if (!bk) {
        if (!t->failed) printf("  (REALM_GPU not set: skipped)\n");
        return;
    }
    prefill_equivalence(t, bk, "cuda");
    bk_destroy(bk);
}

/* ---- prefill from a carried state (a chat turn after the first) ---- */

/* Windows 12 and 5, so an 8-byte prefill (the unit) is shorter than one window and longer than
 * the other: its ring update keeps old slots in one layer and overwrites all in the other. */
static const char *const PFC =
    "local nn = require 'realm.nn'\n"
    "return nn.model { name = 'pfc', d_model = 32,\n"
    "  blocks = { nn.mamba3 { d_state = 16, headdim = 16, chunk = 4 }, nn.attention { heads = 2, window = 12 },\n"
    "             nn.mamba3 { d_state = 16, headdim = 16, chunk = 8 }, nn.attention { heads = 4, kv_heads = 2, window = 5 } },\n"
    "  mlp = nn.swiglu { hidden = 48 } }\n";

enum { CSEQ = 120 };

/* Feeds of a conversation, in order (then single bytes to CSEQ), and what each prefills: 3
 * (stepped), 10 at position 3 (8 prefilled, starting inside the first window: the ring prefix
 * is partly before position 0), a byte, 21 at 14 (16: past both windows, not chunk-aligned),
 * 3 (stepped), 9 at 38 (8: shorter than the 12-window), a byte, 17 at 48, 5 (stepped), 40 at
 * 70 (32, several chunks of both layers). */
static const long cfeed[] = {3, 10, 1, 21, 3, 9, 1, 17, 5, 40};
static const long cexpect[] = {0, 8, 0, 16, 0, 8, 0, 16, 0, 32};

/* A conversation fed in turns: every turn from the carried state goes through the prefill plan
 * as far as it can, and the logits at every position equal the parallel forward over the whole
 * concatenation (normwise <= 1e-4); each turn prefills what it should, and the final state
 * equals the byte-by-byte decoder's. */
static void turns_equivalence(tctx *t, backend *bk, const char *what) {
    uint8_t bytes[PNB * CSEQ];
    for (int k = 0; k < PNB * CSEQ; k++) bytes[k] = (uint8_t)t_randint(t, 0, 255);
    const uint64_t seed = t_next(t);
    double *par = malloc(sizeof(double) * PNB * CSEQ * V), *got = malloc(sizeof(double) * PNB * CSEQ * V);
    float *lg = malloc(sizeof(float) * CSEQ * PNB * V);
    uint8_t *col = malloc(PNB * CSEQ);
    decoder dp, ds;
    char err[4096];
    int rc = 0;
    if (parallel_logits(t, bk, PFC, bytes, PNB, CSEQ, seed, par) < 0) goto out;
    CHECK(decoder_open(&dp, PFC, strlen(PFC), "pfc.lua", bk, PNB, err, sizeof err) == 0, "%s", err);
    if (decoder_open(&ds, PFC, strlen(PFC), "pfc.lua", bk, PNB, err, sizeof err) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        decoder_close(&dp);
        goto out;
    }
    dp.parallel = 1;
    ds.parallel = 0;
    rc = decoder_init_params(&dp, seed, err, sizeof err) < 0 || decoder_init_params(&ds, seed, err, sizeof err) < 0;
    if (!rc && (!dp.pf.ok || dp.pf.unit != 8))
        t_fail(t, __FILE__, __LINE__, "%s: prefill plan %s, unit %ld (expected 8)", what, dp.pf.ok ? "ok" : dp.pf.why,
               dp.pf.unit);
    long at = 0;
    for (size_t c = 0; !rc && !t->failed && at < CSEQ; c++) {
        const long n = c < sizeof cfeed / sizeof cfeed[0] ? cfeed[c] : 1;
        const long want = c < sizeof cfeed / sizeof cfeed[0] ? cexpect[c] : 0;
        const long before = dp.prefill_bytes, m = decoder_prefill_len(&dp, n);
        if (m != want) {
            t_fail(t, __FILE__, __LINE__, "%s: a %ld-byte turn at position %ld prefills %ld bytes, expected %ld", what, n,
                   at, m, want);
            break;
        }
        for (long b = 0; b < PNB; b++) memcpy(col + b * n, bytes + b * CSEQ + at, (size_t)n);
        rc = decoder_feed(&dp, col, n, lg + at * PNB * V, err, sizeof err) < 0 ||
             decoder_feed(&ds, col, n, NULL, err, sizeof err) < 0;
        if (!rc && dp.prefill_bytes - before != m)
            t_fail(t, __FILE__, __LINE__, "%s: turn at %ld ran %ld bytes in parallel, expected %ld", what, at,
                   dp.prefill_bytes - before, m);
        at += n;
        if (!rc && !t->failed && dp.pos != at) t_fail(t, __FILE__, __LINE__, "%s: position %ld, expected %ld", what, dp.pos, at);
    }
    if (rc) t_fail(t, __FILE__, __LINE__, "%s: %s", what, err);
    if (!t->failed && dp.prefill_bytes != 80)
        t_fail(t, __FILE__, __LINE__, "%s: %ld bytes prefilled in all, expected 80", what, dp.prefill_bytes);
    if (!t->failed) same_states(t, &dp, &ds, 1e-4, what);
    if (!t->failed) {
        for (long s = 0; s < CSEQ; s++)
            for (long b = 0; b < PNB; b++)
                for (long f = 0; f < V; f++) got[(b * CSEQ + s) * V + f] = lg[(s * PNB + b) * V + f];
        long w = 0;
        double e = worst_pos(got, par, PNB * CSEQ, &w);
        if (!(e <= 1e-4))
            t_fail(t, __FILE__, __LINE__, "%s: turn-by-turn logits differ from the parallel forward at sequence %ld position %ld: %.3g",
                   what, w / CSEQ, w % CSEQ, e);
    }
    decoder_close(&dp);
    decoder_close(&ds);
out:
    free(par);
    free(got);
    free(lg);
    free(col);
}

TEST(prefill_turns_equal_parallel_reference) { turns_equivalence(t, NULL, "reference"); }

TEST(prefill_turns_equal_parallel_opencl) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    turns_equivalence(t, bk, "opencl");
    bk_destroy(bk);
}

TEST(prefill_turns_equal_parallel_cuda) {
    backend *bk = gpu_backend(t);
    if (!bk) {
        if (!t->failed) printf("  (REALM_GPU not set: skipped)\n");
        return;
    }
    turns_equivalence(t, bk, "cuda");
    bk_destroy(bk);
}

/* Same seed, same prompt: the prefill path samples the same bytes as the byte-by-byte path,
 * greedy and at temperature 1 over all 256 bytes (whose draws depend on every position being
 * right). Weights at init_std 0.25 spread the logits apart (at 0.02 the 256 logits sit within
 * float noise of each other and an argmax would be a coin toss). */
static void prefill_sampling(tctx *t, backend *bk, const char *what) {
    char src[2048], err[4096];
    snprintf(src, sizeof src, "%.*sinit_std = 0.25, mlp = nn.swiglu { hidden = 48 } }\n",
             (int)(strstr(PF, "mlp = ") - PF), PF);
    const decode_sampling modes[2] = {{0, 0, 0, 1}, {1.0, 0, 1.0, 4242}};
    enum { NP = 37, NG = 24 };
    uint8_t prompt[PNB * NP], out[2][PNB * NG];
    for (int k = 0; k < PNB * NP; k++) prompt[k] = (uint8_t)t_randint(t, 32, 126);
    const uint64_t seed = t_next(t);
    for (int mode = 0; mode < 2 && !t->failed; mode++) {
        for (int path = 0; path < 2 && !t->failed; path++) {
            decoder d;
            CHECK(decoder_open(&d, src, strlen(src), "pfs.lua", bk, PNB, err, sizeof err) == 0, "%s", err);
            d.parallel = path == 0;
            int rc = decoder_init_params(&d, seed, err, sizeof err) < 0 ||
                     decoder_set_sampling(&d, &modes[mode], 0, err, sizeof err) < 0 ||
                     decoder_feed(&d, prompt, NP, NULL, err, sizeof err) < 0;
            if (!rc && d.prefill_bytes != (path == 0 ? 32 : 0))
                t_fail(t, __FILE__, __LINE__, "%s: %ld bytes prefilled on path %d", what, d.prefill_bytes, path);
            for (int i = 0; !rc && i < NG; i++) {
                uint8_t o[PNB];
                rc = decoder_next(&d, o, err, sizeof err) < 0;
                for (int b = 0; b < PNB; b++) out[path][b * NG + i] = o[b];
            }
            decoder_close(&d);
            CHECK(!rc, "%s: %s", what, err);
        }
        CHECK(memcmp(out[0], out[1], sizeof out[0]) == 0, "%s: %s sampling: prefill and byte-by-byte paths differ", what,
              mode ? "temperature" : "greedy");
    }
}

TEST(prefill_sampling_reference) { prefill_sampling(t, NULL, "reference"); }

TEST(prefill_sampling_opencl) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    prefill_sampling(t, bk, "opencl");
    bk_destroy(bk);
}

/* The prefill graph itself: every kernel against the reference with poisoned outputs. */
TEST(prefill_plan_kernels) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    char err[4096];
    realm_model m;
    CHECK(model_load_prefill(PF, strlen(PF), "pf.lua", &m, err, sizeof err) == 0, "%s", err);
    kc_check_graph(t, bk, &m.g, 2, 16, 1e-5, 256);
    model_free(&m);
    bk_destroy(bk);
}

/* The step primitives on their own, outputs not aliased (so every element is poisoned and must
 * be written), S = 1 (decode) and S = 3 (several tokens per step). */
static int build_ops(ir_graph *g, char *err, size_t errlen) {
    ir_init_graph(g);
    const int H = 2, P = 8, N = 6, NA = 2, W = 5, Hq = 4, Hkv = 2, Dh = 6;
    int tk[2] = {DIM_B, DIM_S};
#define T_(name, role, dt, ...) ir_tensor_new(g, name, ir_shape_make(sizeof((int[]){__VA_ARGS__}) / sizeof(int), (int[]){__VA_ARGS__}), dt, role)
    int pos = ir_tensor_new(g, "positions", ir_shape_make(2, tk), DT_I32, ROLE_INPUT);
    int in[15];
    in[0] = T_("x", ROLE_INPUT, DT_F32, DIM_B, DIM_S, H, P);
    in[1] = T_("Bn", ROLE_INPUT, DT_F32, DIM_B, DIM_S, N);
    in[2] = T_("Cn", ROLE_INPUT, DT_F32, DIM_B, DIM_S, N);
    in[3] = T_("dd_dt", ROLE_INPUT, DT_F32, DIM_B, DIM_S, H);
    in[4] = T_("dd_A", ROLE_INPUT, DT_F32, DIM_B, DIM_S, H);
    in[5] = T_("trap", ROLE_INPUT, DT_F32, DIM_B, DIM_S, H);
    in[6] = T_("angles", ROLE_INPUT, DT_F32, DIM_B, DIM_S, NA);
    in[7] = T_("dt_bias", ROLE_INPUT, DT_F32, H);
    in[8] = T_("B_bias", ROLE_INPUT, DT_F32, H, N);
    in[9] = T_("C_bias", ROLE_INPUT, DT_F32, H, N);
    in[10] = T_("D", ROLE_INPUT, DT_F32, H);
    in[11] = T_("S", ROLE_STATE, DT_F32, DIM_B, H, P, N);
    in[12] = T_("Theta", ROLE_STATE, DT_F32, DIM_B, H, NA);
    in[13] = T_("Kr", ROLE_STATE, DT_F32, DIM_B, H, N);
    in[14] = T_("v", ROLE_STATE, DT_F32, DIM_B, H, P);
    int out[IR_MAX_IO];
    if (ir_emit(g, "mamba3_step", in, 15, NULL, NULL, out) < 0) goto bad;
    int x = T_("xk", ROLE_INPUT, DT_F32, DIM_B, DIM_S, Hkv, Dh);
    int q = T_("q", ROLE_INPUT, DT_F32, DIM_B, DIM_S, Hq, Dh);
    int ring = T_("ring", ROLE_STATE, DT_F32, DIM_B, W, Hkv, Dh);
    int ring2 = T_("ring2", ROLE_STATE, DT_F32, DIM_B, W, Hkv, Dh);
    int xr, qr, K2, V2, o;
    if (ir_emit(g, "rope_at", (int[]){x, pos}, 2, NULL, (double[IR_MAX_FATTR]){500.0}, &xr) < 0) goto bad;
    if (ir_emit(g, "rope_at", (int[]){q, pos}, 2, NULL, (double[IR_MAX_FATTR]){500.0}, &qr) < 0) goto bad;
    if (ir_emit(g, "ring_write", (int[]){ring, xr, pos}, 3, NULL, NULL, &K2) < 0) goto bad;
    if (ir_emit(g, "ring_write", (int[]){ring2, x, pos}, 3, NULL, NULL, &V2) < 0) goto bad;
    if (ir_emit(g, "attention_ring", (int[]){qr, K2, V2, pos}, 4, NULL, (double[IR_MAX_FATTR]){0.0}, &o) < 0) goto bad;
    int lg = T_("logits", ROLE_INPUT, DT_F32, DIM_B, DIM_S, 37);
    int prm = T_("sampling", ROLE_INPUT, DT_F32, DIM_B, 8);
    if (ir_emit(g, "sample", (int[]){lg, pos, prm}, 3, NULL, NULL, out) < 0) goto bad;
#undef T_
    return 0;
bad:
    snprintf(err, errlen, "%s", g->err);
    return -1;
}

TEST(decode_step_kernels) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    char err[1024];
    ir_graph g;
    CHECK(build_ops(&g, err, sizeof err) == 0, "%s", err);
    /* positions are drawn in [0, 40): past the window of 5, and a sampler with 37 bytes */
    kc_check_graph(t, bk, &g, 3, 1, 1e-5, 40);
    if (!t->failed) kc_check_graph(t, bk, &g, 2, 3, 1e-5, 40);
    ir_free(&g);
    /* the whole step graph, state updated in place and the sampler writing tokens/positions */
    realm_model m;
    if (!t->failed) {
        CHECK(model_load_step(SMALL, strlen(SMALL), "dec.lua", &m, err, sizeof err) == 0, "%s", err);
        kc_check_graph(t, bk, &m.g, 3, 1, 1e-5, 256);
        model_free(&m);
    }
    bk_destroy(bk);
}

/* The sampler: greedy is the argmax; top_k = 1 too; the same (seed, position) draws the same
 * byte; a draw follows the distribution (the byte frequencies over many positions). */
TEST(decode_sampler) {
    char err[4096];
    decoder d;
    CHECK(decoder_open(&d, SMALL, strlen(SMALL), "dec.lua", NULL, 2, err, sizeof err) == 0, "%s", err);
    CHECK(decoder_init_params(&d, 5, err, sizeof err) == 0, "%s", err);
    uint8_t in[2] = {'a', 'b'}, o1[2], o2[2];
    float lg[2 * V];
    CHECK(decoder_feed(&d, in, 1, lg, err, sizeof err) == 0, "%s", err);
    CHECK(decoder_next(&d, o1, err, sizeof err) == 0, "%s", err);
    for (int b = 0; b < 2; b++) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (lg[b * V + i] > lg[b * V + best]) best = i;
        CHECK(o1[b] == best, "greedy picked %d, argmax is %d", o1[b], best);
    }
    /* the same seed at the same position: the same byte, whatever came before */
    decode_sampling s = {1.0, 0, 1.0, 12345};
    uint8_t seq1[12], seq2[12];
    for (int run = 0; run < 2; run++) {
        CHECK(decoder_reset(&d, err, sizeof err) == 0 && decoder_set_sampling(&d, &s, 0, err, sizeof err) == 0, "%s", err);
        CHECK(decoder_feed(&d, in, 1, NULL, err, sizeof err) == 0, "%s", err);
        for (int i = 0; i < 6; i++) {
            CHECK(decoder_next(&d, o2, err, sizeof err) == 0, "%s", err);
            (run ? seq2 : seq1)[2 * i] = o2[0], (run ? seq2 : seq1)[2 * i + 1] = o2[1];
        }
    }
    CHECK(memcmp(seq1, seq2, sizeof seq1) == 0, "same seed, different bytes");
    decoder_close(&d);
}

/* ---- the CLI ---- */

static void sh(const char *cmd) {
    char out[256];
    t_run(cmd, out, sizeof out);
}

/* A run directory with a briefly trained tiny model; each CLI test removes its own. */
static int trained_run(tctx *t, char *dir, size_t len) {
    snprintf(dir, len, "/tmp/realm-%s-%d", t->name, (int)getpid());
    char cmd[2048], out[8192], data[512];
    t_text_corpus(data, sizeof data);
    snprintf(cmd, sizeof cmd,
             "rm -rf %s && %s train models/tiny.lua --data %s --out %s --steps 4 --save-every 4 --batch 2 --seq 32 "
             "--warmup 2 --eval-every 0 --backend opencl",
             dir, t_realm_bin(), data, dir);
    if (t_run(cmd, out, sizeof out) != 0) {
        t_fail(t, __FILE__, __LINE__, "training failed: %s", out);
        return -1;
    }
    return 0;
}

/* stdout only (stderr has the prompts) */
static int run_out(const char *cmd, char *out, size_t len) {
    char full[4200];
    snprintf(full, sizeof full, "{ { %.4100s ; } 2>/dev/null ; }", cmd);
    return t_run(full, out, len);
}

TEST(decode_cli_generate) {
    char dir[512], cmd[2048], a[8192], b[8192];
    if (trained_run(t, dir, sizeof dir) < 0) return;
    snprintf(cmd, sizeof cmd, "%s generate %s --prompt 'ROMEO:' -n 40 --seed 3 --backend opencl", t_realm_bin(), dir);
    CHECK(run_out(cmd, a, sizeof a) == 0, "generate failed: %s", a);
    CHECK(run_out(cmd, b, sizeof b) == 0 && strcmp(a, b) == 0, "same seed, different text:\n%s\n%s", a, b);
    CHECK(strncmp(a, "ROMEO:", 6) == 0, "output: %s", a);
    snprintf(cmd, sizeof cmd, "printf 'ROMEO:' | %s generate %s -n 40 --seed 3 --backend opencl", t_realm_bin(), dir);
    CHECK(run_out(cmd, b, sizeof b) == 0 && strcmp(a, b) == 0, "prompt from stdin differs:\n%s\n%s", a, b);
    snprintf(cmd, sizeof cmd, "%s generate %s --prompt 'ROMEO:' -n 40 --seed 4 --backend opencl", t_realm_bin(), dir);
    CHECK(run_out(cmd, b, sizeof b) == 0 && strcmp(a, b) != 0, "seeds 3 and 4 gave the same text: %s", a);
    /* --bench prints one line per position */
    snprintf(cmd, sizeof cmd, "%s generate %s --bench 10,1000 --bench-steps 3 --backend opencl", t_realm_bin(), dir);
    int ok = t_run(cmd, b, sizeof b) == 0 && strstr(b, "position 1000") && strstr(b, "ms/token");
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    sh(cmd);
    CHECK(ok, "bench: %s", b);
}

/* A prompt longer than tiny.lua's window (64) and several of its chunks (16): generate and chat
 * give the same text whether the prompt goes through the parallel prefill or byte by byte. */
TEST(decode_cli_prefill) {
    char dir[512], cmd[4096], a[8192], b[8192], path[600], msg[1200] = "";
    if (trained_run(t, dir, sizeof dir) < 0) return;
    snprintf(path, sizeof path, "%s/prompt.txt", dir);
    FILE *f = fopen(path, "wb");
    CHECK(f, "cannot write %s", path);
    fprintf(f, "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
               "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief,\n"
               "that thou, her maid, art far more fair than she.\n");
    fclose(f);
    const char *const sampling[] = {"--temperature 0", "--temperature 0.8 --seed 5"};
    int ok = 1;
    for (int i = 0; i < 2 && ok; i++) {
        snprintf(cmd, sizeof cmd, "%s generate %s -n 48 %s --backend opencl < %s", t_realm_bin(), dir, sampling[i], path);
        ok = run_out(cmd, a, sizeof a) == 0;
        snprintf(cmd, sizeof cmd, "%s generate %s -n 48 %s --backend opencl --prefill step < %s", t_realm_bin(), dir,
                 sampling[i], path);
        ok = ok && run_out(cmd, b, sizeof b) == 0 && strcmp(a, b) == 0 && strlen(a) > 150;
        if (!ok) snprintf(msg, sizeof msg, "generate (%s): parallel and step prefill differ:\n%.500s\n%.500s", sampling[i], a, b);
    }
    /* chat: a short first turn (stepped), then the long line, which prefills in parallel from the
     * state the first turn and its reply left (the only parallel bytes of the conversation: the
     * longest multiple of tiny's chunk, 16, that leaves one byte of the line), then a short one;
     * every reply equals the byte-by-byte chat's, greedy and seeded */
    const long line = (long)strlen("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
                                   "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief, "
                                   "that thou, her maid, art far more fair than she. ") + 1;
    for (int i = 0; i < 2 && ok; i++) {
        char want[64], feed[700];
        snprintf(want, sizeof want, "[%ld bytes of the conversation prefilled in parallel]", (line - 1) / 16 * 16);
        snprintf(feed, sizeof feed, "{ printf 'hello\\n'; cat %s | tr '\\n' ' '; printf '\\nwhat next\\n'; }", path);
        snprintf(cmd, sizeof cmd, "%s | %s chat %s -n 20 %s --backend opencl", feed, t_realm_bin(), dir, sampling[i]);
        ok = run_out(cmd, a, sizeof a) == 0 && t_run(cmd, b, sizeof b) == 0 && strstr(b, want);
        if (!ok) snprintf(msg, sizeof msg, "chat (%s): expected '%s' on stderr:\n%.1000s", sampling[i], want, b);
        snprintf(cmd, sizeof cmd, "%s | REALM_PREFILL=step %s chat %s -n 20 %s --backend opencl", feed, t_realm_bin(), dir,
                 sampling[i]);
        if (ok) {
            ok = run_out(cmd, b, sizeof b) == 0 && strcmp(a, b) == 0 && strlen(a) > 0;
            if (!ok) snprintf(msg, sizeof msg, "chat (%s): parallel and step prefill differ:\n%.500s\n%.500s", sampling[i], a, b);
        }
        if (ok) {
            ok = t_run(cmd, b, sizeof b) == 0 && strstr(b, "[0 bytes of the conversation prefilled in parallel]");
            if (!ok) snprintf(msg, sizeof msg, "chat --prefill step prefilled something:\n%.1000s", b);
        }
    }
    /* --bench reports the parallel prefill's throughput; a bad mode is refused */
    if (ok) {
        snprintf(cmd, sizeof cmd, "%s generate %s --bench 200 --bench-steps 2 --backend opencl", t_realm_bin(), dir);
        ok = t_run(cmd, a, sizeof a) == 0 && strstr(a, "parallel prefill of 192 bytes") && strstr(a, "bytes/s");
        if (!ok) snprintf(msg, sizeof msg, "bench: %.1000s", a);
    }
    if (ok) {
        snprintf(cmd, sizeof cmd, "%s generate %s -n 2 --prefill sideways --backend opencl", t_realm_bin(), dir);
        ok = t_run(cmd, a, sizeof a) == 2 && strstr(a, "--prefill must be parallel or step");
        if (!ok) snprintf(msg, sizeof msg, "bad --prefill: %.1000s", a);
    }
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    sh(cmd);
    CHECK(ok, "%s", msg);
}

TEST(decode_cli_chat_pipe) {
    char dir[512], cmd[4096], out[8192], r1[8192], gen[8192];
    if (trained_run(t, dir, sizeof dir) < 0) return;
    /* /seed and /reset: the same seed from a fresh state gives the same reply twice */
    snprintf(cmd, sizeof cmd,
             "printf '/seed 9\\nhello\\n/reset\\n/seed 9\\nhello\\n' | %s chat %s -n 12 --temperature 0.9 --backend opencl",
             t_realm_bin(), dir);
    CHECK(run_out(cmd, out, sizeof out) == 0, "chat failed: %s", out);
    size_t n = strlen(out);
    CHECK(n >= 2 && n % 2 == 0 && memcmp(out, out + n / 2, n / 2) == 0, "/reset + /seed should repeat the reply: [%s]",
          out);
    /* the prompts, the command acknowledgements, and a clean exit on EOF */
    CHECK(t_run(cmd, out, sizeof out) == 0, "chat failed: %s", out);
    int prompts = 0;
    for (char *p = out; (p = strstr(p, "> ")); p++) prompts++;
    CHECK(prompts == 6, "six prompts expected (five lines, then EOF), got %d: %s", prompts, out);
    CHECK(strstr(out, "seed 9") && strstr(out, "reset"), "commands not acknowledged: %s", out);
    /* context kept across turns: the second reply (greedy) is what generate gives for the
     * whole transcript, which it can only be if chat kept the first turn in its state */
    snprintf(cmd, sizeof cmd, "printf 'abc\\n' | %s chat %s -n 10 --temperature 0 --backend opencl", t_realm_bin(), dir);
    CHECK(run_out(cmd, r1, sizeof r1) == 0, "chat failed: %s", r1);
    snprintf(cmd, sizeof cmd, "printf 'abc\\nxyz\\n' | %s chat %s -n 10 --temperature 0 --backend opencl", t_realm_bin(),
             dir);
    CHECK(run_out(cmd, out, sizeof out) == 0, "chat failed: %s", out);
    size_t l1 = strlen(r1);
    CHECK(strncmp(out, r1, l1) == 0, "first turn differs: [%s] vs [%s]", r1, out);
    const char *r2 = out + l1;
    size_t l2 = strlen(r2);
    CHECK(l2 >= 1, "no second reply: [%s]", out);
    char path[600];
    snprintf(path, sizeof path, "%s/transcript.txt", dir);
    FILE *f = fopen(path, "wb");
    CHECK(f, "cannot write %s", path);
    fprintf(f, "abc\n%sxyz\n", r1);
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s generate %s -n %zu --temperature 0 --backend opencl < %s", t_realm_bin(), dir, l2, path);
    CHECK(run_out(cmd, gen, sizeof gen) == 0, "generate failed: %s", gen);
    size_t pl = 4 + l1 + 4;
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    sh(cmd);
    CHECK(strlen(gen) >= pl + l2 - 1 && strncmp(gen + pl, r2, l2 - 1) == 0,
          "second chat reply [%s] is not the continuation of the transcript [%s]", r2, gen + (strlen(gen) > pl ? pl : 0));
}

TEST(decode_cli_chat_tmux) {
    char out[8192];
    if (t_run("command -v tmux", out, sizeof out) != 0) {
        printf("  (tmux not installed: skipped)\n");
        return;
    }
    char dir[512], cmd[4096], sess[64];
    if (trained_run(t, dir, sizeof dir) < 0) return;
    snprintf(sess, sizeof sess, "realm-dec-%d", (int)getpid());
    char cwd[1024];
    CHECK(getcwd(cwd, sizeof cwd), "getcwd");
    snprintf(cmd, sizeof cmd,
             "tmux new-session -d -s %s -x 200 -y 50 \"cd %s && %s chat %s -n 6 --temperature 0 --backend opencl; "
             "echo CHAT-EXIT=\\$?; sleep 30\"",
             sess, cwd, t_realm_bin(), dir);
    CHECK(t_run(cmd, out, sizeof out) == 0, "tmux: %s", out);
    /* wait for the first prompt, type two turns and a command, then Ctrl-D */
    const char *const steps[] = {"hello", "/temperature 0", "again", NULL};
    int ok = 0;
    for (int i = 0; i < 200 && !ok; i++) {
        usleep(100000);
        snprintf(cmd, sizeof cmd, "tmux capture-pane -p -t %s", sess);
        t_run(cmd, out, sizeof out);
        ok = out[0] == '>';   /* capture-pane drops the prompt's trailing space */
    }
    for (int s = 0; ok && steps[s]; s++) {
        snprintf(cmd, sizeof cmd, "tmux send-keys -t %s '%s' Enter", sess, steps[s]);
        t_run(cmd, out, sizeof out);
        usleep(300000);
    }
    snprintf(cmd, sizeof cmd, "tmux send-keys -t %s C-d", sess);
    for (int i = 0; i < 300 && ok; i++) {
        if (i == 20) t_run(cmd, out, sizeof out);
        usleep(100000);
        char c2[256];
        snprintf(c2, sizeof c2, "tmux capture-pane -p -t %s", sess);
        t_run(c2, out, sizeof out);
        if (strstr(out, "CHAT-EXIT=")) break;
    }
    snprintf(cmd, sizeof cmd, "tmux kill-session -t %s; rm -rf %s", sess, dir);
    char tail[8192];
    memcpy(tail, out, sizeof tail);
    sh(cmd);
    CHECK(ok, "chat never prompted");
    CHECK(strstr(tail, "CHAT-EXIT=0"), "chat did not exit cleanly on Ctrl-D:\n%s", tail);
    int prompts = tail[0] == '>';
    for (char *p = tail; (p = strstr(p, "\n>")); p++) prompts++;
    CHECK(prompts >= 4, "expected a prompt per line and one at EOF:\n%s", tail);
    CHECK(strstr(tail, "hello") && strstr(tail, "again"), "typed lines not shown:\n%s", tail);
}

/* The step plan's CUDA source (every step primitive's template and the sampler) and the prefill
 * plan's (mamba3_final, ring_fill) compile with NVRTC for the CI architectures, no GPU needed. */
TEST(decode_step_nvrtc) {
    int major = 0, minor = 0;
    char err[4096];
    if (cuda_nvrtc_version(&major, &minor, err, sizeof err)) {
        printf("  (NVRTC not available: skipped)\n");
        return;
    }
    for (int which = 0; which < 2 && !t->failed; which++) {
        realm_model m;
        CHECK((which ? model_load_prefill : model_load_step)(SMALL, strlen(SMALL), "dec.lua", &m, err, sizeof err) == 0,
              "%s", err);
        plan p;
        if (plan_build(&p, &m.g, 0, m.g.nn, "cuda", NULL, 0, err, sizeof err) < 0) {
            model_free(&m);
            CHECK(0, "%s", err);
        }
        const char *arches[] = {"sm_80", "sm_90", "sm_120"};
        char log[8192];
        int rc = 0;
        for (int i = 0; i < 3 && rc == 0; i++) {
            void *cubin = NULL;
            size_t len = 0;
            rc = cuda_compile_only(p.kg.src.s, arches[i], "--std=c++17", &cubin, &len, log, sizeof log);
            free(cubin);
            if (rc) t_fail(t, __FILE__, __LINE__, "NVRTC %s (%s plan): %s", arches[i], which ? "prefill" : "step", log);
        }
        plan_free(&p);
        model_free(&m);
    }
}
