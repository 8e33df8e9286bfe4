#include "loader.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOT_ALIGN 256

static size_t slot_bytes(long B, long S) {
    size_t n = (size_t)B * (size_t)S * 2 * sizeof(float);
    return (n + SLOT_ALIGN - 1) / SLOT_ALIGN * SLOT_ALIGN;
}

size_t loader_device_bytes(long B, long S) { return 2 * slot_bytes(B, S); }

struct loader {
    backend *bk;
    const corpus *c;
    int split;
    long B, S, n;
    size_t slot;
    bk_stream *copy;          /* uploads run here, beside the compute stream */
    bk_buf *dev;              /* two staging slots */
    float *pin[2];            /* pinned: tokens (B*S floats) then targets */
    bk_event *up[2];          /* upload of a slot finished */
    bk_event *used[2];        /* the compute stream has copied a slot out */
    rng_state up_after[2];    /* sampler state after the batch in each staging slot */
    long next;                /* next batch loader_next hands out */
    long queued;              /* last batch whose upload is queued (-1: none) */

    /* shared with the thread, under mu */
    pthread_t th;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int full[2];              /* pinned slot holds batch idx[] not yet uploaded */
    long idx[2];
    rng_state after[2];
    int stop, failed;
    rng_state rng;            /* the thread's own: it runs ahead of the consumed batches */
};

static void *gather_thread(void *arg) {
    loader *ld = arg;
    long B = ld->B, S = ld->S, rowlen = S + 1;
    uint8_t *rows = malloc((size_t)(B * rowlen));
    for (long j = 0; j < ld->n; j++) {
        int k = (int)(j & 1);
        pthread_mutex_lock(&ld->mu);
        while (ld->full[k] && !ld->stop) pthread_cond_wait(&ld->cv, &ld->mu);
        int stop = ld->stop;
        pthread_mutex_unlock(&ld->mu);
        if (stop) break;
        int bad = !rows || corpus_sample(ld->c, ld->split, &ld->rng, B, rowlen, rows) < 0;
        if (!bad) {
            float *tok = ld->pin[k], *tgt = ld->pin[k] + B * S;
            for (long b = 0; b < B; b++)
                for (long t = 0; t < S; t++) {
                    tok[b * S + t] = rows[b * rowlen + t];
                    tgt[b * S + t] = rows[b * rowlen + t + 1];
                }
        }
        pthread_mutex_lock(&ld->mu);
        if (bad) ld->failed = 1;
        else {
            ld->full[k] = 1;
            ld->idx[k] = j;
            ld->after[k] = ld->rng;
        }
        pthread_cond_broadcast(&ld->cv);
        pthread_mutex_unlock(&ld->mu);
        if (bad) break;
    }
    free(rows);
    return NULL;
}

loader *loader_create(backend *bk, const corpus *c, int split, const rng_state *rng, long B, long S, long nbatches,
                      char *err, size_t errlen) {
    loader *ld = calloc(1, sizeof *ld);
    ld->bk = bk;
    ld->c = c;
    ld->split = split;
    ld->B = B;
    ld->S = S;
    ld->n = nbatches;
    ld->slot = slot_bytes(B, S);
    ld->rng = *rng;
    ld->queued = -1;
    pthread_mutex_init(&ld->mu, NULL);
    pthread_cond_init(&ld->cv, NULL);
    const char *what = NULL;
    if (!(ld->copy = bk_stream_create(bk))) what = "creating the upload stream";
    else if (!(ld->dev = bk_alloc(bk, 2 * ld->slot))) what = "allocating the data staging buffers";
    for (int k = 0; k < 2 && !what; k++) {
        if (!(ld->pin[k] = bk_host_alloc(bk, ld->slot))) what = "allocating pinned host buffers";
        else if (!(ld->up[k] = bk_event_create(bk)) || !(ld->used[k] = bk_event_create(bk))) what = "creating events";
    }
    if (!what && pthread_create(&ld->th, NULL, gather_thread, ld) != 0) what = "starting the loader thread";
    if (what) {
        snprintf(err, errlen, "data loader: %s failed: %s", what, bk_error(bk));
        loader_destroy(ld);
        return NULL;
    }
    ld->started = 1;
    return ld;
}

/* Queue the upload of batch j (the thread must produce it first). */
static int upload(loader *ld, long j, char *err, size_t errlen) {
    int k = (int)(j & 1);
    pthread_mutex_lock(&ld->mu);
    while (!(ld->full[k] && ld->idx[k] == j) && !ld->failed) pthread_cond_wait(&ld->cv, &ld->mu);
    int failed = ld->failed && !(ld->full[k] && ld->idx[k] == j);
    ld->up_after[k] = ld->after[k];
    pthread_mutex_unlock(&ld->mu);
    if (failed) {
        snprintf(err, errlen, "data loader: sampling %ld rows of %ld bytes from %s failed", ld->B, ld->S + 1,
                 corpus_path(ld->c));
        return -1;
    }
    /* the staging slot must have been copied out by the step that used it two batches ago */
    if ((ld->used[k]->recorded && bk_stream_wait_event(ld->bk, ld->copy, ld->used[k]) < 0) ||
        bk_upload_async(ld->bk, ld->copy, ld->dev, (size_t)k * ld->slot, ld->pin[k],
                        (size_t)(ld->B * ld->S) * 2 * sizeof(float)) < 0 ||
        bk_event_record(ld->bk, ld->up[k], ld->copy) < 0) {
        snprintf(err, errlen, "data loader: upload failed: %s", bk_error(ld->bk));
        return -1;
    }
    ld->queued = j;
    return 0;
}

int loader_next(loader *ld, plan_exec *x, int tokens, int targets, rng_state *rng_after, char *err, size_t errlen) {
    long j = ld->next;
    if (j >= ld->n) {
        snprintf(err, errlen, "data loader: all %ld batches consumed", ld->n);
        return -1;
    }
    int k = (int)(j & 1);
    if (ld->queued < j && upload(ld, j, err, errlen) < 0) return -1;
    const ir_graph *g = x->p->g;
    size_t n = (size_t)(ld->B * ld->S) * sizeof(float);
    int ids[2] = {tokens, targets};
    if (bk_stream_wait_event(ld->bk, x->stream, ld->up[k]) < 0) goto fail;
    for (int i = 0; i < 2; i++) {
        const ir_tensor *t = &g->t[ids[i]];
        if (x->offset[t->base] == (size_t)-1 || t->base != ids[i] || t->tok_stride != ir_feat(&t->shape)) {
            snprintf(err, errlen, "data loader: %s is not a dense tensor of the arena", t->name);
            return -1;
        }
        if (bk_copy(ld->bk, x->stream, x->arena, x->offset[ids[i]], ld->dev, (size_t)k * ld->slot + (size_t)i * n, n) < 0)
            goto fail;
    }
    if (bk_event_record(ld->bk, ld->used[k], x->stream) < 0) goto fail;
    /* Batch j's upload was queued a step ago and has long finished; waiting for it here frees
     * its pinned buffer for batch j+2 without stalling anything. */
    if (bk_event_sync(ld->bk, ld->up[k]) < 0) goto fail;
    *rng_after = ld->up_after[k];
    pthread_mutex_lock(&ld->mu);
    ld->full[k] = 0;
    pthread_cond_broadcast(&ld->cv);
    pthread_mutex_unlock(&ld->mu);
    ld->next = j + 1;
    if (j + 1 < ld->n && upload(ld, j + 1, err, errlen) < 0) return -1;
    return 0;
fail:
    snprintf(err, errlen, "data loader: %s", bk_error(ld->bk));
    return -1;
}

void loader_destroy(loader *ld) {
    if (!ld) return;
    if (ld->started) {
        pthread_mutex_lock(&ld->mu);
        ld->stop = 1;
        pthread_cond_broadcast(&ld->cv);
        pthread_mutex_unlock(&ld->mu);
        pthread_join(ld->th, NULL);
    }
    /* queued copies read the pinned buffers: let them finish first */
    if (ld->copy) bk_sync(ld->bk, ld->copy);
    bk_sync(ld->bk, NULL);
    for (int k = 0; k < 2; k++) {
        if (ld->pin[k]) bk_host_free(ld->bk, ld->pin[k]);
        if (ld->up[k]) bk_event_destroy(ld->bk, ld->up[k]);
        if (ld->used[k]) bk_event_destroy(ld->bk, ld->used[k]);
    }
    if (ld->dev) bk_free(ld->bk, ld->dev);
    if (ld->copy) bk_stream_destroy(ld->bk, ld->copy);
    pthread_mutex_destroy(&ld->mu);
    pthread_cond_destroy(&ld->cv);
    free(ld);
}
