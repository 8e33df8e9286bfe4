#include "exec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int exec_create(plan_exec *x, backend *bk, const plan *p, long B, long S, char *err, size_t errlen) {
    memset(x, 0, sizeof *x);
    x->bk = bk;
    x->p = p;
    x->B = B;
    x->S = S;
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

void exec_destroy(plan_exec *x) {
    if (x->arena) bk_free(x->bk, x->arena);
    if (x->mod) bk_module_free(x->bk, x->mod);
    free(x->kern);
    free(x->offset);
    memset(x, 0, sizeof *x);
}

int exec_run(plan_exec *x, int l0, int l1, char *err, size_t errlen) {
    bk_arg args[KG_MAX_ARGS + 3];
    for (int i = l0; i < l1; i++) {
        const plan_launch *l = &x->p->kg.launches[i];
        int na = 0;
        args[na++] = BK_BUF(x->arena);
        args[na++] = BK_I64(x->B);
        args[na++] = BK_I64(x->S);
        for (int a = 0; a < l->nargs; a++) args[na++] = BK_I64(plan_elem_offset(x->p, x->offset, l->arg[a]));
        size_t grid[3], block[3] = {(size_t)l->block[0], (size_t)l->block[1], (size_t)l->block[2]};
        plan_grid(l, x->B, x->S, grid);
        if (bk_launch(x->bk, x->stream, x->kern[i], grid, block, 0, args, na) < 0) {
            snprintf(err, errlen, "launch %d (%s): %s", i, l->kernel, bk_error(x->bk));
            return -1;
        }
    }
    return 0;
}

/* Tensors are dense per token row but rows may be strided (views): copy row by row unless
 * the rows are contiguous. */
static int xfer(plan_exec *x, int t, float *host, int up, char *err, size_t errlen) {
    const ir_tensor *tt = &x->p->g->t[t];
    if (x->offset[tt->base] == (size_t)-1) {
        snprintf(err, errlen, "tensor %s has no storage in this plan", tt->name);
        return -1;
    }
    long ntok = ir_ntok(&tt->shape, x->B, x->S), feat = ir_feat(&tt->shape);
    size_t base = (size_t)plan_elem_offset(x->p, x->offset, t) * 4;
    int rc = 0;
    if (tt->tok_stride == feat || ntok == 1) {
        size_t n = (size_t)(ntok * feat) * 4;
        rc = up ? bk_upload(x->bk, x->arena, base, host, n) : bk_download(x->bk, host, x->arena, base, n);
    } else {
        for (long r = 0; r < ntok && rc == 0; r++) {
            size_t o = base + (size_t)(r * tt->tok_stride) * 4, n = (size_t)feat * 4;
            rc = up ? bk_upload(x->bk, x->arena, o, host + r * feat, n) : bk_download(x->bk, host + r * feat, x->arena, o, n);
        }
    }
    if (rc < 0) snprintf(err, errlen, "%s of %s failed: %s", up ? "upload" : "download", tt->name, bk_error(x->bk));
    return rc;
}

int exec_upload(plan_exec *x, int t, const float *src, char *err, size_t errlen) {
    return xfer(x, t, (float *)src, 1, err, errlen);
}

int exec_download(plan_exec *x, int t, float *dst, char *err, size_t errlen) {
    return xfer(x, t, dst, 0, err, errlen);
}
