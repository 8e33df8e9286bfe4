/* The decoder: the step plan of docs/decode.md and the loop around it. The bytes fed at once
 * (a prompt, a chat turn) run through the prefill plan (the parallel forward, chunked scan and
 * flash attention, started from the step plan's state at its position) up to the longest
 * multiple of the Mamba-3 chunks that leaves one byte; the step plan's state goes into the
 * prefill plan and its final states come back, through the host, and the remaining bytes go
 * through the step plan one at a time, which also leaves the last byte's logits where the
 * sampler reads them. REALM_PREFILL=step feeds the step plan byte by byte: constant memory, no
 * context limit. */
#include "decode.h"

#include "op.h"
#include "safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static long gcd_l(long a, long b) {
    while (b) {
        long r = a % b;
        a = b;
        b = r;
    }
    return a;
}

static int find_named(const ir_graph *g, const char *name, ir_role role) {
    for (int j = 0; j < g->nt; j++)
        if (g->t[j].role == role && g->t[j].base == j && strcmp(g->t[j].name, name) == 0) return j;
    return -1;
}

/* Load the prefill graph and pair its states and parameters with the step graph's by name.
 * A model whose blocks have no prefill branch (a state the prefill graph does not write) keeps
 * pf.ok = 0 and decodes through the step plan alone. */
static void prefill_open(decoder *d, const char *src, size_t len, const char *path) {
    decode_prefill *pf = &d->pf;
    char err[512];
    if (model_load_prefill(src, len, path, &pf->m, err, sizeof err) < 0) {
        snprintf(pf->why, sizeof pf->why, "the prefill graph does not build: %.200s", err);
        return;
    }
    pf->loaded = 1;
    const ir_graph *sg = &d->m.g, *pg = &pf->m.g;
    pf->state_of = malloc(sizeof(int) * (size_t)sg->nt);
    pf->param_of = malloc(sizeof(int) * (size_t)pg->nt);
    if (!pf->state_of || !pf->param_of) {
        snprintf(pf->why, sizeof pf->why, "out of host memory");
        return;
    }
    int nstates = 0, paired = 0;
    for (int j = 0; j < pg->nt; j++) {
        const ir_tensor *t = &pg->t[j];
        pf->param_of[j] = -1;
        nstates += t->role == ROLE_STATE && t->base == j;
        if (t->role != ROLE_PARAM || t->base != j) continue;
        int i = find_named(sg, t->name, ROLE_PARAM);
        if (i < 0 || !ir_shape_eq(&sg->t[i].shape, &t->shape)) {
            snprintf(pf->why, sizeof pf->why, "parameter %.100s differs between the prefill and step graphs", t->name);
            return;
        }
        pf->param_of[j] = i;
    }
    for (int i = 0; i < sg->nt; i++) {
        const ir_tensor *t = &sg->t[i];
        pf->state_of[i] = -1;
        if (t->role != ROLE_STATE || t->base != i) continue;
        int j = find_named(pg, t->name, ROLE_STATE);
        if (j < 0 || !ir_shape_eq(&pg->t[j].shape, &t->shape)) {
            snprintf(pf->why, sizeof pf->why, "state %.100s has no prefill twin (a block without a g.mode == \"prefill\" branch)",
                     t->name);
            return;
        }
        pf->state_of[i] = j;
        paired++;
    }
    if (paired != nstates) {
        snprintf(pf->why, sizeof pf->why, "the prefill graph writes states the step graph does not carry");
        return;
    }
    /* the Mamba-3 hand-over is h_T only at a multiple of every layer's chunk */
    pf->unit = 1;
    const int fin = op_find("mamba3_final");
    for (int k = 0; k < pg->nn; k++)
        if (pg->n[k].op == fin) {
            long c = pg->n[k].ia[0];
            pf->unit = pf->unit / gcd_l(pf->unit, c) * c;
            if (pf->unit > DECODE_PREFILL_MAX) {
                snprintf(pf->why, sizeof pf->why, "the Mamba-3 chunks' least common multiple is too large");
                return;
            }
        }
    pf->ok = 1;
}

static void prefill_close(decode_prefill *pf) {
    if (pf->x.arena) exec_destroy(&pf->x);
    if (pf->planned) plan_free(&pf->p);
    if (pf->loaded) model_free(&pf->m);
    free(pf->state_of);
    free(pf->param_of);
}

static long max_numel(const ir_graph *g, long B) {
    long m = 8;
    for (int i = 0; i < g->nt; i++) {
        const ir_tensor *t = &g->t[i];
        if (t->role == ROLE_ACT && i != t->base) continue;
        long n = ir_numel(&t->shape, B, 1);
        if (n > m) m = n;
    }
    return m;
}

int decoder_open(decoder *d, const char *src, size_t len, const char *path, backend *bk, long B, char *err,
                 size_t errlen) {
    memset(d, 0, sizeof *d);
    d->bk = bk;
    d->B = B;
    const char *pe = getenv("REALM_PREFILL");
    if (pe && *pe && strcmp(pe, "step") != 0 && strcmp(pe, "parallel") != 0) {
        snprintf(err, errlen, "REALM_PREFILL must be step or parallel, got '%.40s'", pe);
        return -1;
    }
    d->parallel = !(pe && strcmp(pe, "step") == 0);
    if (model_load_step(src, len, path, &d->m, err, errlen) < 0) return -1;
    prefill_open(d, src, len, path);
    const ir_graph *g = &d->m.g;
    if (bk) {
        int keep[1] = {d->m.logits};
        if (plan_build(&d->p, g, 0, g->nn, bk_name(bk), keep, 1, err, errlen) < 0) goto fail;
        /* launches are in node order: the sampling tail starts at the first launch of its node */
        d->l_model = d->p.kg.nl;
        for (int l = 0; l < d->p.kg.nl; l++)
            if (d->p.kg.launches[l].node0 >= d->m.sample_node) {
                d->l_model = l;
                break;
            }
        if (exec_create(&d->x, bk, &d->p, B, 1, err, errlen) < 0) {
            plan_free(&d->p);
            goto fail;
        }
        const char *e = getenv("REALM_NO_CUDA_GRAPH");
        d->use_graph = bk_graph_supported(bk) && !(e && strcmp(e, "1") == 0);
        for (int i = 0; i < 3; i++) d->graph[i] = -1;
    } else {
        d->ref = ref_create(g, B, 1);
    }
    d->host = malloc(sizeof(float) * (size_t)max_numel(g, B));
    const decode_sampling greedy = {0, 0, 0, 1};
    if (decoder_reset(d, err, errlen) < 0 || decoder_set_sampling(d, &greedy, 0, err, errlen) < 0) {
        decoder_close(d);
        return -1;
    }
    return 0;
fail:
    prefill_close(&d->pf);
    model_free(&d->m);
    return -1;
}

void decoder_close(decoder *d) {
    if (d->bk) {
        if (d->x.arena) exec_destroy(&d->x);
        plan_free(&d->p);
    }
    ref_destroy(d->ref);
    prefill_close(&d->pf);
    model_free(&d->m);
    free(d->host);
    memset(d, 0, sizeof *d);
}

/* Dense float rows in and out of either executor. */
static int put(decoder *d, int t, const float *v, char *err, size_t errlen) {
    if (d->bk) return exec_upload(&d->x, t, v, err, errlen);
    ref_buf b = ref_get(d->ref, t);
    for (long r = 0; r < b.ntok; r++)
        for (long f = 0; f < b.feat; f++) b.p[r * b.ld + f] = v[r * b.feat + f];
    return 0;
}

static int get(decoder *d, int t, float *v, char *err, size_t errlen) {
    if (d->bk) return exec_download(&d->x, t, v, err, errlen);
    ref_buf b = ref_get(d->ref, t);
    for (long r = 0; r < b.ntok; r++)
        for (long f = 0; f < b.feat; f++) v[r * b.feat + f] = (float)b.p[r * b.ld + f];
    return 0;
}

static int stored(const decoder *d, int t) { return !d->bk || d->x.offset[d->m.g.t[t].base] != (size_t)-1; }

enum { RUN_MODEL, RUN_SAMPLE, RUN_STEP };

/* Run the model part, the sampling tail, or both (the whole step). On a backend with graphs
 * each of the three launch ranges is captured once and replayed: the arena, its offsets and
 * every kernel argument are fixed for the decoder's life, and what changes per step (tokens,
 * positions, sampling, the state) lives in the arena, written by stream-ordered uploads or by
 * the previous step's kernels. */
static int run(decoder *d, int what, char *err, size_t errlen) {
    if (!d->bk) {
        if (what != RUN_SAMPLE) ref_run(d->ref, 0, d->m.sample_node);
        if (what != RUN_MODEL) ref_run(d->ref, d->m.sample_node, d->m.g.nn);
        return 0;
    }
    int l0 = what == RUN_SAMPLE ? d->l_model : 0, l1 = what == RUN_MODEL ? d->l_model : d->p.kg.nl;
    if (l0 >= l1) return 0;
    if (!d->use_graph) return exec_run(&d->x, l0, l1, err, errlen);
    if (d->graph[what] < 0) {
        int id = exec_capture(&d->x, l0, l1, err, errlen);
        if (id < 0) {
            size_t n = strlen(err);
            if (n < errlen) snprintf(err + n, errlen - n, " (REALM_NO_CUDA_GRAPH=1 launches without a graph)");
            return -1;
        }
        d->graph[what] = id;
    }
    return exec_replay(&d->x, d->graph[what], err, errlen);
}

static int upload_params(decoder *d, int (*fill)(decoder *, int, float *, void *, char *, size_t), void *ctx,
                         char *err, size_t errlen) {
    const ir_graph *g = &d->m.g;
    d->pf.stale = 1;
    for (int i = 0; i < g->nt; i++) {
        const ir_tensor *t = &g->t[i];
        if (t->role != ROLE_PARAM || t->base != i || !stored(d, i)) continue;
        long n = ir_numel(&t->shape, 1, 1);
        float *v = malloc(sizeof(float) * (size_t)n);
        int rc = fill(d, i, v, ctx, err, errlen);
        if (rc == 0) rc = put(d, i, v, err, errlen);
        free(v);
        if (rc < 0) return -1;
    }
    return 0;
}

static int fill_init(decoder *d, int i, float *v, void *ctx, char *err, size_t errlen) {
    (void)err, (void)errlen;
    const ir_tensor *t = &d->m.g.t[i];
    long n = ir_numel(&t->shape, 1, 1);
    double *tmp = malloc(sizeof(double) * (size_t)n);
    ir_param_init_values(t, *(const uint64_t *)ctx, tmp, n);
    for (long k = 0; k < n; k++) v[k] = (float)tmp[k];
    /* the reference keeps fp64: give it the same fp32-rounded values the device gets */
    free(tmp);
    return 0;
}

int decoder_init_params(decoder *d, uint64_t seed, char *err, size_t errlen) {
    return upload_params(d, fill_init, &seed, err, errlen);
}

typedef struct {
    st_file *f;
    const char *path;
} st_ctx;

static int fill_st(decoder *d, int i, float *v, void *ctx, char *err, size_t errlen) {
    st_ctx *c = ctx;
    const ir_tensor *t = &d->m.g.t[i];
    const st_info *in = st_find(c->f, t->name);
    long n = ir_numel(&t->shape, 1, 1);
    if (!in || (long)in->numel != n) {
        snprintf(err, errlen, "%s: tensor %s is %s", c->path, t->name, in ? "the wrong size" : "missing");
        return -1;
    }
    if (st_copy_f32(in, v) < 0) {
        snprintf(err, errlen, "%s: tensor %s has an unsupported dtype", c->path, t->name);
        return -1;
    }
    return 0;
}

int decoder_load_weights(decoder *d, const char *path, char *err, size_t errlen) {
    st_ctx c = {st_open(path, err, errlen), path};
    if (!c.f) return -1;
    int rc = upload_params(d, fill_st, &c, err, errlen);
    st_close(c.f);
    return rc;
}

int decoder_reset(decoder *d, char *err, size_t errlen) {
    const ir_graph *g = &d->m.g;
    for (int i = 0; i < g->nt; i++) {
        const ir_tensor *t = &g->t[i];
        if (t->role != ROLE_STATE || t->base != i || !stored(d, i)) continue;
        long n = ir_numel(&t->shape, d->B, 1);
        memset(d->host, 0, sizeof(float) * (size_t)n);
        if (put(d, i, d->host, err, errlen) < 0) return -1;
    }
    d->pos = 0;
    d->pending = 0;
    return 0;
}

int decoder_set_sampling(decoder *d, const decode_sampling *s, int each, char *err, size_t errlen) {
    for (long b = 0; b < d->B; b++) {
        const decode_sampling *e = each ? &s[b] : s;
        float *r = d->host + b * 8;
        r[0] = (float)e->temperature;
        r[1] = (float)e->top_k;
        r[2] = (float)e->top_p;
        r[3] = (float)(e->seed & 0xFFFFFF);
        r[4] = (float)((e->seed >> 24) & 0xFFFFFF);
        r[5] = r[6] = r[7] = 0;
    }
    return put(d, d->m.sampling, d->host, err, errlen);
}

/* Run the byte that sampling left in `tokens` through the model (its position is already on
 * the device too). */
static int flush_pending(decoder *d, char *err, size_t errlen) {
    if (!d->pending) return 0;
    d->pending = 0;
    d->pos++;
    return run(d, RUN_MODEL, err, errlen);
}

long decoder_prefill_len(const decoder *d, long n) {
    if (!d->parallel || d->pending || !d->pf.ok || n < 2) return 0;
    long m = DECODE_PREFILL_MAX / d->B;
    if (n - 1 < m) m = n - 1;   /* the last byte goes through the step plan: the sampler reads its logits */
    return m / d->pf.unit * d->pf.unit;
}

/* Compile the prefill plan (once) and size its arena for m bytes per sequence: the arena is
 * planned for a power of two and reused for every shorter prompt (exec_set_seq), so a new
 * prompt recompiles nothing unless it is longer than every one before. The weights are copied
 * from the step plan whenever they changed. */
static int prefill_exec(decoder *d, long m, char *err, size_t errlen) {
    decode_prefill *pf = &d->pf;
    const ir_graph *pg = &pf->m.g;
    if (!pf->planned) {
        int keep[1] = {pf->m.logits};
        /* fp32, within the device's shared memory (the scan's large-tile variants check it) */
        const plan_options po = {.shared_max = (long)bk_info(d->bk)->max_shared_per_block};
        if (plan_build_opts(&pf->p, pg, 0, pg->nn, bk_name(d->bk), keep, 1, &po, err, errlen) < 0) return -1;
        pf->planned = 1;
    }
    if (pf->x.arena && pf->x.S_plan < m) exec_destroy(&pf->x);
    if (!pf->x.arena) {
        long cap = 256, most = DECODE_PREFILL_MAX / d->B;
        while (cap < m) cap *= 2;
        if (cap > most) cap = most > m ? most : m;
        if (exec_create(&pf->x, d->bk, &pf->p, d->B, cap, err, errlen) < 0) {
            memset(&pf->x, 0, sizeof pf->x);
            return -1;
        }
        pf->stale = 1;
    }
    for (int j = 0; pf->stale && j < pg->nt; j++) {
        const int i = pf->param_of[j];
        if (i < 0 || pf->x.offset[j] == (size_t)-1) continue;
        float *v = malloc(sizeof(float) * (size_t)ir_numel(&pg->t[j].shape, 1, 1));
        int rc = !v ? (snprintf(err, errlen, "out of host memory"), -1) : get(d, i, v, err, errlen);
        if (rc == 0) rc = exec_upload(&pf->x, j, v, err, errlen);
        free(v);
        if (rc < 0) return -1;
    }
    pf->stale = 0;
    return exec_set_seq(&pf->x, m, err, errlen);
}

/* Dense rows of one reference tensor into another of the same shape (fp64, no rounding). */
static void ref_copy(ref_buf dst, ref_buf src) {
    for (long r = 0; r < dst.ntok; r++)
        for (long f = 0; f < dst.feat; f++) dst.p[r * dst.ld + f] = src.p[r * src.ld + f];
}

/* The first m bytes of every sequence (bytes[b * n + i]) through the prefill plan, at positions
 * pos .. pos + m - 1 from the step plan's state; the step plan's state becomes the prefill
 * plan's final state and the position pos + m. The hand-over goes through the host both ways
 * (a few MB per prompt or chat turn). */
static int prefill(decoder *d, const uint8_t *bytes, long n, long m, float *logits, char *err, size_t errlen) {
    const double t0 = now_s();
    const long B = d->B, V = d->m.vocab, p0 = d->pos;
    decode_prefill *pf = &d->pf;
    const ir_graph *sg = &d->m.g, *pg = &pf->m.g;
    if (!d->bk) {
        ref_ctx *c = ref_create(pg, B, m);
        for (int j = 0; j < pg->nt; j++)
            if (pf->param_of[j] >= 0) ref_copy(ref_get(c, j), ref_get(d->ref, pf->param_of[j]));
        for (int i = 0; i < sg->nt; i++)
            if (pf->state_of[i] >= 0) ref_copy(ref_get(c, pf->state_of[i]), ref_get(d->ref, i));
        ref_buf tk = ref_get(c, pf->m.tokens), ps = ref_get(c, pf->m.positions);
        for (long b = 0; b < B; b++)
            for (long i = 0; i < m; i++) {
                tk.p[(b * m + i) * tk.ld] = bytes[b * n + i];
                ps.p[(b * m + i) * ps.ld] = (double)(p0 + i);
            }
        ref_run(c, 0, pg->nn);
        ref_buf L = ref_get(c, pf->m.logits);
        for (long r = 0; logits && r < B * m; r++)
            for (long f = 0; f < V; f++) logits[((r % m) * B + r / m) * V + f] = (float)L.p[r * L.ld + f];
        for (int i = 0; i < sg->nt; i++)
            if (pf->state_of[i] >= 0) ref_copy(ref_get(d->ref, i), ref_get(c, pf->state_of[i]));
        ref_destroy(c);
    } else {
        if (prefill_exec(d, m, err, errlen) < 0) {
            size_t k = strlen(err);
            if (k < errlen) snprintf(err + k, errlen - k, " (REALM_PREFILL=step decodes without the prefill plan)");
            return -1;
        }
        float *h = malloc(sizeof(float) * (size_t)(B * m) * (size_t)(logits ? V : 1));
        if (!h) {
            snprintf(err, errlen, "prefill: out of host memory");
            return -1;
        }
        /* the carried state in (zeros after a reset: the same path serves a new prompt) */
        int rc = 0;
        for (int i = 0; rc == 0 && i < sg->nt; i++)
            if (pf->state_of[i] >= 0 && pf->x.offset[pf->state_of[i]] != (size_t)-1) {
                if (stored(d, i)) rc = get(d, i, d->host, err, errlen);
                else memset(d->host, 0, sizeof(float) * (size_t)ir_numel(&sg->t[i].shape, B, 1));
                if (rc == 0) rc = exec_upload(&pf->x, pf->state_of[i], d->host, err, errlen);
            }
        for (long b = 0; b < B; b++)
            for (long i = 0; i < m; i++) h[b * m + i] = bytes[b * n + i];
        if (rc == 0) rc = exec_upload(&pf->x, pf->m.tokens, h, err, errlen);
        for (long b = 0; b < B; b++)
            for (long i = 0; i < m; i++) h[b * m + i] = (float)(p0 + i);
        if (rc == 0 && pf->x.offset[pf->m.positions] != (size_t)-1)
            rc = exec_upload(&pf->x, pf->m.positions, h, err, errlen);
        if (rc == 0) rc = exec_run(&pf->x, 0, pf->p.kg.nl, err, errlen);
        if (rc == 0 && logits) rc = exec_download(&pf->x, pf->m.logits, h, err, errlen);
        for (long r = 0; rc == 0 && logits && r < B * m; r++)
            memcpy(logits + ((r % m) * B + r / m) * V, h + r * V, sizeof(float) * (size_t)V);
        free(h);
        for (int i = 0; rc == 0 && i < sg->nt; i++)
            if (pf->state_of[i] >= 0 && stored(d, i)) {
                rc = exec_download(&pf->x, pf->state_of[i], d->host, err, errlen);
                if (rc == 0) rc = put(d, i, d->host, err, errlen);
            }
        if (rc < 0) return -1;
    }
    d->pos = p0 + m;
    d->prefill_bytes += m;
    d->prefill_s += now_s() - t0;
    return 0;
}

int decoder_feed(decoder *d, const uint8_t *bytes, long n, float *logits, char *err, size_t errlen) {
    if (flush_pending(d, err, errlen) < 0) return -1;
    const long B = d->B, V = d->m.vocab;
    long i0 = decoder_prefill_len(d, n);
    if (i0 > 0 && prefill(d, bytes, n, i0, logits, err, errlen) < 0) return -1;
    for (long i = i0; i < n; i++) {
        for (long b = 0; b < B; b++) d->host[b] = bytes[b * n + i];
        if (put(d, d->m.tokens, d->host, err, errlen) < 0) return -1;
        for (long b = 0; b < B; b++) d->host[b] = (float)d->pos;
        if (put(d, d->m.positions, d->host, err, errlen) < 0 || run(d, RUN_MODEL, err, errlen) < 0) return -1;
        d->pos++;
        if (logits && get(d, d->m.logits, logits + i * B * V, err, errlen) < 0) return -1;
    }
    return 0;
}

int decoder_next(decoder *d, uint8_t *out, char *err, size_t errlen) {
    if (d->pos == 0 && !d->pending) {
        snprintf(err, errlen, "decoder: nothing fed yet (feed at least one byte first)");
        return -1;
    }
    /* The byte sampled last (already in `tokens`) runs through the model and the sampler in
     * one go: one graph launch per byte on CUDA. Positions on the device hold the last byte's
     * position; the sampler writes pos + 1. */
    int what = RUN_SAMPLE;
    if (d->pending) {
        d->pending = 0;
        d->pos++;
        what = RUN_STEP;
    }
    if (run(d, what, err, errlen) < 0 || get(d, d->m.tokens, d->host, err, errlen) < 0) return -1;
    for (long b = 0; b < d->B; b++) out[b] = (uint8_t)d->host[b];
    d->pending = 1;
    return 0;
}

int decoder_set_position(decoder *d, long pos, char *err, size_t errlen) {
    if (flush_pending(d, err, errlen) < 0) return -1;
    d->pos = pos;
    return 0;
}
