#include "session.h"

#include "kgen.h"
#include "precision.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

backend *session_backend(const char *name, int device, char *err, size_t errlen) {
    if (!name || strcmp(name, "auto") == 0) {
        char e1[1024], e2[1024];
        backend *b = bk_create(BK_CUDA, device, NULL, e1, sizeof e1);
        if (b) return b;
        b = bk_create(BK_OPENCL, device, NULL, e2, sizeof e2);
        if (b) return b;
        snprintf(err, errlen, "no usable device: CUDA: %.400s; OpenCL: %.400s", e1, e2);
        return NULL;
    }
    bk_kind k;
    if (bk_kind_parse(name, &k) != 0) {
        snprintf(err, errlen, "unknown backend '%s' (cuda, opencl or auto)", name);
        return NULL;
    }
    return bk_create(k, device, NULL, err, errlen);
}

int session_prepare(session *s, const char *src, size_t len, const char *path, const char *dialect, int training,
                    int recompute_all, char *err, size_t errlen) {
    return session_prepare_opts(s, src, len, path, dialect, training, recompute_all, NULL, err, errlen);
}

int session_prepare_opts(session *s, const char *src, size_t len, const char *path, const char *dialect,
                         int training, int recompute_all, const plan_options *opt, char *err, size_t errlen) {
    memset(s, 0, sizeof *s);
    s->training = training;
    s->recompute_all = recompute_all;
    if (model_load_string(src, len, path, &s->m, err, errlen) < 0) return -1;
    ir_graph *g = &s->m.g;
    if (recompute_all)
        for (int i = 0; i < g->nsc; i++) {
            const char *pth = g->sc[i].path;
            /* "layers.N" exactly: a whole layer (mixer, MLP and residual adds) */
            if (strncmp(pth, "layers.", 7) == 0 && pth[7] && !strchr(pth + 7, '.')) g->sc[i].recompute = 1;
        }
    /* bf16 plans of a training step keep what only matmuls read as bf16 (gen/precision.c) */
    const int bf16_store = opt && opt->bf16 && !opt->fp32_storage && kg_dialect_has_bf16(dialect);
    int nodes = g->nn;
    if (training) {
        if (ir_autodiff(g) < 0 || (bf16_store && ir_bf16_storage(g) < 0) || ir_add_optimizer(g, &s->opt) < 0) {
            snprintf(err, errlen, "%s: %s", path, g->err);
            model_free(&s->m);
            return -1;
        }
        nodes = g->nn;
    }
    int keep[2] = {s->m.loss, s->m.logits};
    if (plan_build_opts(&s->p, g, 0, nodes, dialect, keep, training ? 1 : 2, opt, err, errlen) < 0) {
        model_free(&s->m);
        return -1;
    }
    s->bf16 = s->p.kg.bf16;
    return 0;
}

void session_move(session *dst, session *src) {
    *dst = *src;
    dst->p.g = &dst->m.g;
    dst->p.kg.g = &dst->m.g;
    if (dst->x.p) dst->x.p = &dst->p;
    memset(src, 0, sizeof *src);
}

int session_alloc(session *s, backend *bk, long B, long S, char *err, size_t errlen) {
    s->bk = bk;
    s->B = B;
    s->S = S;
    if (exec_create(&s->x, bk, &s->p, B, S, err, errlen) < 0) return -1;
    const ir_graph *g = &s->m.g;
    long maxn = 8;
    for (int i = 0; i < g->nt; i++) {
        long n = ir_numel(&g->t[i].shape, B, S);
        if (n > maxn) maxn = n;
    }
    s->host = malloc(sizeof(float) * (size_t)maxn);
    return 0;
}

int session_open(session *s, const char *src, size_t len, const char *path, backend *bk, int training, long B,
                 long S, char *err, size_t errlen) {
    if (session_prepare(s, src, len, path, bk_name(bk), training, 0, err, errlen) < 0) return -1;
    if (session_alloc(s, bk, B, S, err, errlen) < 0) {
        plan_free(&s->p);
        model_free(&s->m);
        return -1;
    }
    return 0;
}

void session_close(session *s) {
    if (s->x.arena) exec_destroy(&s->x);
    plan_free(&s->p);
    model_free(&s->m);
    free(s->host);
    memset(s, 0, sizeof *s);
}

int session_init_params(session *s, uint64_t seed, char *err, size_t errlen) {
    const ir_graph *g = &s->m.g;
    double *tmp = NULL;
    int rc = 0;
    for (int i = 0; i < g->nt && rc == 0; i++) {
        const ir_tensor *t = &g->t[i];
        if (t->base != i || (t->role != ROLE_PARAM && t->role != ROLE_OPT)) continue;
        if (s->x.offset[i] == (size_t)-1) continue;
        long n = ir_numel(&t->shape, 1, 1);
        tmp = realloc(tmp, sizeof(double) * (size_t)n);
        ir_param_init_values(t, seed, tmp, n);
        for (long k = 0; k < n; k++) s->host[k] = (float)tmp[k];
        rc = exec_upload(&s->x, i, s->host, err, errlen);
    }
    free(tmp);
    return rc;
}

int session_tensor(const session *s, const char *name) {
    for (int i = 0; i < s->m.g.nt; i++)
        if (strcmp(s->m.g.t[i].name, name) == 0) return i;
    return -1;
}

int session_copy_params(session *dst, const session *src, char *err, size_t errlen) {
    const ir_graph *g = &src->m.g;
    for (int i = 0; i < g->nt; i++) {
        if (g->t[i].role != ROLE_PARAM || g->t[i].base != i) continue;
        int j = session_tensor(dst, g->t[i].name);
        if (j < 0 || dst->x.offset[j] == (size_t)-1 || src->x.offset[i] == (size_t)-1) continue;
        size_t n = (size_t)ir_numel(&g->t[i].shape, 1, 1) * 4;
        if (bk_copy(src->bk, NULL, dst->x.arena, dst->x.offset[j], src->x.arena, src->x.offset[i], n) < 0) {
            snprintf(err, errlen, "copying %s: %s", g->t[i].name, bk_error(src->bk));
            return -1;
        }
    }
    return 0;
}

int session_set_batch(session *s, const uint8_t *rows, long rowlen, char *err, size_t errlen) {
    long B = s->B, S = s->S;
    for (long b = 0; b < B; b++)
        for (long t = 0; t < S; t++) s->host[b * S + t] = rows[b * rowlen + t];
    if (exec_upload(&s->x, s->m.tokens, s->host, err, errlen) < 0) return -1;
    if (s->x.offset[s->m.targets] == (size_t)-1) return 0;
    for (long b = 0; b < B; b++)
        for (long t = 0; t < S; t++) s->host[b * S + t] = rows[b * rowlen + t + 1];
    return exec_upload(&s->x, s->m.targets, s->host, err, errlen);
}

int session_run(session *s, char *err, size_t errlen) { return exec_run(&s->x, 0, s->p.kg.nl, err, errlen); }

int session_loss(session *s, double *loss, char *err, size_t errlen) {
    float v;
    if (exec_download(&s->x, s->m.loss, &v, err, errlen) < 0) return -1;
    *loss = v;
    return 0;
}
