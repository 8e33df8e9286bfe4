/* The decoder: the step plan of docs/decode.md and the loop around it. Prefill runs the step
 * plan over the prompt one byte at a time (constant memory, no context limit); handing the
 * chunked forward's final states over instead is the faster prefill still to come. */
#include "decode.h"

#include "safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    if (model_load_step(src, len, path, &d->m, err, errlen) < 0) return -1;
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
    model_free(&d->m);
    return -1;
}

void decoder_close(decoder *d) {
    if (d->bk) {
        if (d->x.arena) exec_destroy(&d->x);
        plan_free(&d->p);
    }
    ref_destroy(d->ref);
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

int decoder_feed(decoder *d, const uint8_t *bytes, long n, float *logits, char *err, size_t errlen) {
    if (flush_pending(d, err, errlen) < 0) return -1;
    const long B = d->B, V = d->m.vocab;
    for (long i = 0; i < n; i++) {
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
