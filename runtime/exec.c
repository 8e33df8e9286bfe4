#include "exec.h"

#include "op.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int exec_create(plan_exec *x, backend *bk, const plan *p, long B, long S, char *err, size_t errlen) {
    memset(x, 0, sizeof *x);
    x->bk = bk;
    x->p = p;
    x->B = B;
    x->S = S;
    x->S_plan = S;
    int nl = p->kg.nl;
    const char **names = calloc((size_t)nl + 1, sizeof *names);
    for (int i = 0; i < nl; i++) names[i] = p->kg.launches[i].kernel;
    const char *opts = bk->kind == BK_OPENCL ? "-cl-std=CL1.2" : "";
    x->mod = bk_compile(bk, p->kg.src.s, opts, NULL);
    free(names);
    if (!x->mod) {
        snprintf(err, errlen, "compiling the %s kernels failed: %s", bk_name(bk), bk_error(bk));
        return -1;
    }
    x->kern = calloc((size_t)(nl ? nl : 1), sizeof *x->kern);
    for (int i = 0; i < nl; i++) {
        x->kern[i] = bk_kernel_get(bk, x->mod, p->kg.launches[i].kernel);
        if (!x->kern[i]) {
            snprintf(err, errlen, "kernel %s: %s", p->kg.launches[i].kernel, bk_error(bk));
            exec_destroy(x);
            return -1;
        }
    }
    if (p->nside > 0) {
        x->side = bk_stream_create(bk);
        x->fork = x->side ? bk_event_create(bk) : NULL;
        x->done = calloc((size_t)nl, sizeof *x->done);
        int ok = x->side && x->fork && x->done;
        for (int i = 0; ok && i < nl; i++)
            if (p->side[i]) ok = (x->done[i] = bk_event_create(bk)) != NULL;
        if (!ok) {
            snprintf(err, errlen, "creating the side stream and its events: %s", bk_error(bk));
            exec_destroy(x);
            return -1;
        }
    }
    x->offset = malloc(sizeof *x->offset * (size_t)p->g->nt);
    x->arena_bytes = plan_arena(p, B, S, x->offset);
    x->arena = bk_alloc(bk, x->arena_bytes ? x->arena_bytes : PLAN_ALIGN);
    if (!x->arena) {
        snprintf(err, errlen, "allocating the %zu-byte arena failed: %s", x->arena_bytes, bk_error(bk));
        exec_destroy(x);
        return -1;
    }
    return 0;
}

int exec_set_seq(plan_exec *x, long S, char *err, size_t errlen) {
    if (S < 1 || S > x->S_plan || x->ngraph) {
        snprintf(err, errlen, "sequence length %ld: the arena holds 1..%ld%s", S, x->S_plan,
                 x->ngraph ? " and graphs are captured" : "");
        return -1;
    }
    x->S = S;
    return 0;
}

static void prof_free(plan_exec *x) {
    exec_prof *pr = x->prof;
    if (!pr) return;
    int nl = x->p->kg.nl;
    for (int i = 0; pr->ev && i < 2 * nl; i++)
        if (pr->ev[i]) bk_event_destroy(x->bk, pr->ev[i]);
    free(pr->ev);
    free(pr->pending);
    free(pr->entry);
    free(pr->launch_ms);
    free(pr->by_op);
    free(pr);
    x->prof = NULL;
}

void exec_destroy(plan_exec *x) {
    if (x->bk) prof_free(x);
    for (int i = 0; i < x->ngraph; i++) bk_graph_free(x->bk, x->graph[i]);
    free(x->graph);
    for (int i = 0; x->done && i < x->p->kg.nl; i++)
        if (x->done[i]) bk_event_destroy(x->bk, x->done[i]);
    free(x->done);
    if (x->fork) bk_event_destroy(x->bk, x->fork);
    if (x->side) bk_stream_destroy(x->bk, x->side);
    if (x->arena) bk_free(x->bk, x->arena);
    if (x->mod) bk_module_free(x->bk, x->mod);
    free(x->kern);
    free(x->offset);
    memset(x, 0, sizeof *x);
}

/* The name a launch is accounted under: its first node's primitive, or "fused" when the
 * launch is a group of several elementwise nodes (plan.c names those kernels the same way). */
static const char *launch_op_name(const plan *p, const plan_launch *l) {
    const op_def *d = op_get(p->g->n[l->node0].op);
    return l->node1 - l->node0 > 1 && d->ew ? "fused" : d->name;
}

int exec_profile_enable(plan_exec *x, char *err, size_t errlen) {
    if (x->prof) return 0;
    int nl = x->p->kg.nl;
    exec_prof *pr = calloc(1, sizeof *pr);
    x->prof = pr;
    if (pr) {
        pr->ev = calloc((size_t)(2 * nl + 1), sizeof *pr->ev);
        pr->pending = calloc((size_t)nl + 1, 1);
        pr->entry = calloc((size_t)nl + 1, sizeof *pr->entry);
        pr->launch_ms = calloc((size_t)nl + 1, sizeof *pr->launch_ms);
        pr->by_op = calloc((size_t)nl + 1, sizeof *pr->by_op);
    }
    if (!pr || !pr->ev || !pr->pending || !pr->entry || !pr->launch_ms || !pr->by_op) {
        snprintf(err, errlen, "profiling: out of host memory");
        prof_free(x);
        return -1;
    }
    for (int i = 0; i < 2 * nl; i++)
        if (!(pr->ev[i] = bk_event_create(x->bk))) {
            snprintf(err, errlen, "profiling: creating an event: %s", bk_error(x->bk));
            prof_free(x);
            return -1;
        }
    /* Launches map to entries once, so collect only adds numbers. */
    for (int i = 0; i < nl; i++) {
        const char *name = launch_op_name(x->p, &x->p->kg.launches[i]);
        int e = 0;
        while (e < pr->nop && strcmp(pr->by_op[e].name, name) != 0) e++;
        if (e == pr->nop) pr->by_op[pr->nop++].name = name;
        pr->entry[i] = e;
    }
    return 0;
}

/* Read launch i's event pair into the totals (waits for its end event). */
static int prof_read(plan_exec *x, int i, char *err, size_t errlen) {
    exec_prof *pr = x->prof;
    double ms = 0;
    if (bk_event_elapsed_ms(x->bk, pr->ev[2 * i], pr->ev[2 * i + 1], &ms) < 0) {
        snprintf(err, errlen, "profiling launch %d: %s", i, bk_error(x->bk));
        return -1;
    }
    pr->pending[i] = 0;
    pr->launch_ms[i] += ms;
    pr->by_op[pr->entry[i]].ms += ms;
    pr->by_op[pr->entry[i]].launches++;
    pr->total_ms += ms;
    return 0;
}

int exec_profile_collect(plan_exec *x, char *err, size_t errlen) {
    if (!x->prof) return 0;
    for (int i = 0; i < x->p->kg.nl; i++)
        if (x->prof->pending[i] && prof_read(x, i, err, errlen) < 0) return -1;
    return 0;
}

void exec_profile_reset(plan_exec *x) {
    exec_prof *pr = x->prof;
    if (!pr) return;
    for (int e = 0; e < pr->nop; e++) pr->by_op[e].ms = 0, pr->by_op[e].launches = 0;
    for (int i = 0; i < x->p->kg.nl; i++) pr->launch_ms[i] = 0;
    pr->total_ms = 0;
}

int exec_side_wait(const plan *p, int i, int waited, int last) {
    int need = -1;
    for (int s = waited + 1; s <= last; s++)
        if (p->side[s] && p->join[s] <= i) need = s;
    return need;
}

/* Before main launch i: wait for what exec_side_wait says. */
static int side_join(plan_exec *x, int i, int *waited, int last, char *err, size_t errlen) {
    const int need = exec_side_wait(x->p, i, *waited, last);
    if (need < 0) return 0;
    if (bk_stream_wait_event(x->bk, x->stream, x->done[need]) < 0) {
        snprintf(err, errlen, "joining side launch %d before launch %d: %s", need, i, bk_error(x->bk));
        return -1;
    }
    *waited = need;
    return 0;
}

/* exec_run; with allow_side 0 every launch goes to x->stream (graph capture) */
static int run_range(plan_exec *x, int l0, int l1, int allow_side, char *err, size_t errlen) {
    bk_arg args[KG_MAX_ARGS + 3];
    exec_prof *pr = x->prof;
    const int use_side = allow_side && x->side && !pr && !x->side_off;
    int waited = l0 - 1, last_side = l0 - 1;
    for (int i = l0; i < l1; i++) {
        const plan_launch *l = &x->p->kg.launches[i];
        const int on_side = use_side && x->p->side[i];
        bk_stream *st = on_side ? x->side : x->stream;
        if (on_side && (bk_event_record(x->bk, x->fork, x->stream) < 0 || bk_stream_wait_event(x->bk, x->side, x->fork) < 0)) {
            snprintf(err, errlen, "forking launch %d (%s) onto the side stream: %s", i, l->kernel, bk_error(x->bk));
            goto fail;
        }
        if (use_side && !on_side && side_join(x, i, &waited, last_side, err, errlen) < 0) goto fail;
        if (pr) {
            /* re-recording an unread pair would lose its time: read it first */
            if (pr->pending[i] && prof_read(x, i, err, errlen) < 0) goto fail;
            if (bk_event_record(x->bk, pr->ev[2 * i], x->stream) < 0) {
                snprintf(err, errlen, "profiling launch %d: %s", i, bk_error(x->bk));
                goto fail;
            }
        }
        int na = 0;
        args[na++] = BK_BUF(x->arena);
        args[na++] = BK_I64(x->B);
        args[na++] = BK_I64(x->S);
        for (int a = 0; a < l->nargs; a++) args[na++] = BK_I64(plan_elem_offset(x->p, x->offset, l->arg[a]));
        size_t grid[3], block[3] = {(size_t)l->block[0], (size_t)l->block[1], (size_t)l->block[2]};
        plan_grid(l, x->B, x->S, grid);
        if (bk_launch(x->bk, st, x->kern[i], grid, block, (size_t)l->shmem, args, na) < 0) {
            snprintf(err, errlen, "launch %d (%s): %s", i, l->kernel, bk_error(x->bk));
            goto fail;
        }
        if (pr) {
            if (bk_event_record(x->bk, pr->ev[2 * i + 1], x->stream) < 0) {
                snprintf(err, errlen, "profiling launch %d: %s", i, bk_error(x->bk));
                goto fail;
            }
            pr->pending[i] = 1;
        }
        if (on_side) {
            if (bk_event_record(x->bk, x->done[i], x->side) < 0) {
                snprintf(err, errlen, "launch %d (%s) on the side stream: %s", i, l->kernel, bk_error(x->bk));
                goto fail;
            }
            last_side = i;
        }
    }
    if (last_side > waited && bk_stream_wait_event(x->bk, x->stream, x->done[last_side]) < 0) {
        snprintf(err, errlen, "joining the side stream after launch %d: %s", l1 - 1, bk_error(x->bk));
        return -1;
    }
    return 0;
fail:
    /* what was issued on the side stream still joins the main stream, so a caller that goes
     * on (reads a tensor, frees the arena) waits for it */
    if (last_side > waited) (void)bk_stream_wait_event(x->bk, x->stream, x->done[last_side]);
    return -1;
}

int exec_run(plan_exec *x, int l0, int l1, char *err, size_t errlen) { return run_range(x, l0, l1, 1, err, errlen); }

int exec_capture(plan_exec *x, int l0, int l1, char *err, size_t errlen) {
    if (!bk_graph_supported(x->bk)) {
        snprintf(err, errlen, "capturing launches %d..%d: graphs are not supported on %s", l0, l1, bk_name(x->bk));
        return -1;
    }
    if (x->prof) {
        snprintf(err, errlen, "capturing launches %d..%d: not while profiling", l0, l1);
        return -1;
    }
    if (l0 < 0 || l1 > x->p->kg.nl || l0 >= l1) {
        snprintf(err, errlen, "capturing launches %d..%d: out of range (the plan has %d)", l0, l1, x->p->kg.nl);
        return -1;
    }
    bk_graph **ng = realloc(x->graph, sizeof *ng * (size_t)(x->ngraph + 1));
    if (!ng) {
        snprintf(err, errlen, "capturing launches %d..%d: out of host memory", l0, l1);
        return -1;
    }
    x->graph = ng;
    if (bk_graph_begin(x->bk, x->stream) < 0) {
        snprintf(err, errlen, "capturing launches %d..%d: %s", l0, l1, bk_error(x->bk));
        return -1;
    }
    /* a failed launch still ends the capture, so the stream is usable afterwards */
    int rc = run_range(x, l0, l1, 0, err, errlen);
    bk_graph *g = bk_graph_end(x->bk, x->stream);
    if (rc < 0) {
        bk_graph_free(x->bk, g);
        return -1;
    }
    if (!g) {
        snprintf(err, errlen, "capturing launches %d..%d: %s", l0, l1, bk_error(x->bk));
        return -1;
    }
    x->graph[x->ngraph] = g;
    return x->ngraph++;
}

int exec_replay(plan_exec *x, int id, char *err, size_t errlen) {
    if (id < 0 || id >= x->ngraph) {
        snprintf(err, errlen, "replaying graph %d: no such graph (%d captured)", id, x->ngraph);
        return -1;
    }
    if (bk_graph_launch(x->bk, x->graph[id], x->stream) < 0) {
        snprintf(err, errlen, "replaying graph %d: %s", id, bk_error(x->bk));
        return -1;
    }
    return 0;
}

/* Tensors are dense per token row but rows may be strided (views): copy row by row unless
 * the rows are contiguous. Host values are fp32 (or int32) always; a bf16 tensor is converted
 * on the way (ir_bf16_bits), the way the kernels round. */
static int xfer(plan_exec *x, int t, float *host, int up, char *err, size_t errlen) {
    const ir_tensor *tt = &x->p->g->t[t];
    if (x->offset[tt->base] == (size_t)-1) {
        snprintf(err, errlen, "tensor %s has no storage in this plan", tt->name);
        return -1;
    }
    long ntok = ir_ntok(&tt->shape, x->B, x->S), feat = ir_feat(&tt->shape);
    const size_t es = (size_t)ir_dtype_bytes(tt->dtype);
    const int half = tt->dtype == DT_BF16;
    size_t base = (size_t)plan_elem_offset(x->p, x->offset, t) * es;
    uint16_t *h16 = NULL;
    void *h = host;
    if (half) {
        h16 = malloc(2 * (size_t)(ntok * feat > 0 ? ntok * feat : 1));
        if (!h16) {
            snprintf(err, errlen, "out of host memory for %s", tt->name);
            return -1;
        }
        if (up)
            for (long i = 0; i < ntok * feat; i++) h16[i] = ir_bf16_bits(host[i]);
        h = h16;
    }
    int rc = 0;
    if (tt->tok_stride == feat || ntok == 1) {
        size_t n = (size_t)(ntok * feat) * es;
        rc = up ? bk_upload(x->bk, x->arena, base, h, n) : bk_download(x->bk, h, x->arena, base, n);
    } else {
        for (long r = 0; r < ntok && rc == 0; r++) {
            size_t o = base + (size_t)(r * tt->tok_stride) * es, n = (size_t)feat * es;
            void *hr = (char *)h + (size_t)(r * feat) * es;
            rc = up ? bk_upload(x->bk, x->arena, o, hr, n) : bk_download(x->bk, hr, x->arena, o, n);
        }
    }
    if (half && !up && rc == 0)
        for (long i = 0; i < ntok * feat; i++) host[i] = ir_bf16_float(h16[i]);
    free(h16);
    if (rc < 0) snprintf(err, errlen, "%s of %s failed: %s", up ? "upload" : "download", tt->name, bk_error(x->bk));
    return rc;
}

int exec_upload(plan_exec *x, int t, const float *src, char *err, size_t errlen) {
    return xfer(x, t, (float *)src, 1, err, errlen);
}

int exec_download(plan_exec *x, int t, float *dst, char *err, size_t errlen) {
    return xfer(x, t, dst, 0, err, errlen);
}
