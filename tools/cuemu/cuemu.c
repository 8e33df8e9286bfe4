/* cuemu backend: kind "cuda" (so plans render the CUDA dialect), but compile turns the source
 * into a shared object with g++ and the runtime of cuemu_rt.h, and launch runs each block's
 * threads as coroutines on the CPU. Buffers are host memory. Development tool only. */
#include "backend.h"
#include "cuemu.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    backend base;
    char dir[256];
    int nmod;
    int reverse, early;
} emu_backend;

typedef int (*run_fn)(void *, float *, const long *, int, const size_t *, const size_t *, size_t, int, int);

static const bk_iface emu_iface;

static void emu_destroy(backend *b) { free(b); }
static int emu_mem_info(backend *b, size_t *f, size_t *t) {
    (void)b;
    *f = *t = (size_t)8 << 30;
    return 0;
}
static int emu_supports(backend *b, bk_dtype dt) {
    (void)b;
    return dt == BK_F32 || dt == BK_BF16 || dt == BK_I32;
}

static bk_module *emu_compile(backend *b, const char *src, const char *options, const char *const *names) {
    emu_backend *e = (emu_backend *)b;
    (void)options;
    (void)names;
    char cpp[400], so[400], cmd[1400];
    snprintf(cpp, sizeof cpp, "%s/m%d.cpp", e->dir, e->nmod);
    snprintf(so, sizeof so, "%s/m%d.so", e->dir, e->nmod);
    e->nmod++;
    FILE *f = fopen(cpp, "w");
    if (!f) {
        bk_set_error(b, "cuemu: cannot write %s", cpp);
        return NULL;
    }
    fprintf(f, "#include \"cuemu_rt.h\"\n");
    /* drop the inline-asm prelude (first INLINE definition up to the first kernel) */
    const char *p = src, *in = strstr(src, "\nINLINE "), *k1 = strstr(src, "\nKERNEL ");
    if (in && k1 && in < k1) {
        fwrite(p, 1, (size_t)(in - p) + 1, f);
        p = k1 + 1;
    }
    static const char dyn[] = "extern __shared__ float realm_shm[];";
    for (const char *q; (q = strstr(p, dyn)); p = q + strlen(dyn)) {
        fwrite(p, 1, (size_t)(q - p), f);
        fputs("float *realm_shm = (float *)cuemu_dynshm();", f);
    }
    fputs(p, f);
    fclose(f);
    const char *inc = getenv("CUEMU_DIR") ? getenv("CUEMU_DIR") : "tools/cuemu";
    snprintf(cmd, sizeof cmd, "g++ -std=c++17 -O1 -g -fPIC -shared -w -I %s -o %s %s 2>&1", inc, so, cpp);
    FILE *pp = popen(cmd, "r");
    char log[4096] = "";
    size_t n = pp ? fread(log, 1, sizeof log - 1, pp) : 0;
    log[n] = 0;
    int rc = pp ? pclose(pp) : -1;
    if (rc != 0) {
        bk_set_error(b, "cuemu: g++ failed on %s:\n%s", cpp, log);
        return NULL;
    }
    void *h = dlopen(so, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        bk_set_error(b, "cuemu: dlopen %s: %s", so, dlerror());
        return NULL;
    }
    bk_module *m = calloc(1, sizeof *m);
    m->h = h;
    return m;
}

static void emu_module_free(backend *b, bk_module *m) {
    (void)b;
    while (m->kernels) {
        bk_kernel *k = m->kernels;
        m->kernels = k->next;
        free(k->name);
        free(k);
    }
    dlclose(m->h);
    free(m);
}

typedef struct { void *fn; run_fn run; } emu_kernel;

static bk_kernel *emu_kernel_get(backend *b, bk_module *m, const char *name) {
    void *fn = dlsym(m->h, name);
    run_fn run;
    *(void **)&run = dlsym(m->h, "cuemu_run");
    if (!fn || !run) {
        bk_set_error(b, "cuemu: no kernel %s", name);
        return NULL;
    }
    bk_kernel *k = calloc(1, sizeof *k);
    emu_kernel *ek = malloc(sizeof *ek);
    ek->fn = fn;
    ek->run = run;
    k->name = strdup(name);
    k->h = ek;
    k->next = m->kernels;
    m->kernels = k;
    return k;
}

static bk_buf *emu_alloc(backend *b, size_t bytes) {
    (void)b;
    bk_buf *buf = calloc(1, sizeof *buf);
    /* 256-byte aligned like cuMemAlloc */
    void *p = NULL;
    if (posix_memalign(&p, 256, bytes)) return NULL;
    memset(p, 0xff, bytes);
    buf->size = bytes;
    buf->h = (uintptr_t)p;
    return buf;
}
static void emu_free(backend *b, bk_buf *buf) {
    (void)b;
    free((void *)buf->h);
    free(buf);
}
static void *emu_host_alloc(backend *b, size_t n) {
    (void)b;
    return malloc(n);
}
static void emu_host_free(backend *b, void *p) {
    (void)b;
    free(p);
}
static int emu_upload(backend *b, bk_stream *s, bk_buf *dst, size_t off, const void *src, size_t n, int async) {
    (void)b, (void)s, (void)async;
    memcpy((char *)dst->h + off, src, n);
    return 0;
}
static int emu_download(backend *b, bk_stream *s, void *dst, bk_buf *src, size_t off, size_t n, int async) {
    (void)b, (void)s, (void)async;
    memcpy(dst, (char *)src->h + off, n);
    return 0;
}
static int emu_copy(backend *b, bk_stream *s, bk_buf *dst, size_t doff, bk_buf *src, size_t soff, size_t n) {
    (void)b, (void)s;
    memmove((char *)dst->h + doff, (char *)src->h + soff, n);
    return 0;
}

static int emu_launch(backend *b, bk_stream *s, bk_kernel *k, const size_t grid[3], const size_t block[3],
                      size_t shared_bytes, const bk_arg *args, int nargs) {
    emu_backend *e = (emu_backend *)b;
    (void)s;
    emu_kernel *ek = k->h;
    if (nargs < 1 || args[0].type != BK_ARG_BUF) {
        bk_set_error(b, "cuemu: first argument must be the arena");
        return -1;
    }
    long v[22];
    int nv = 0;
    for (int i = 1; i < nargs && nv < 22; i++) {
        if (args[i].type == BK_ARG_I64) v[nv++] = (long)args[i].v.i64;
        else if (args[i].type == BK_ARG_I32) v[nv++] = args[i].v.i32;
        else {
            bk_set_error(b, "cuemu: unsupported argument %d of %s", i, k->name);
            return -1;
        }
    }
    if (getenv("CUEMU_TRACE")) fprintf(stderr, "cuemu: %s grid %zux%zux%zu block %zu\n", k->name, grid[0], grid[1], grid[2], block[0]);
    return ek->run(ek->fn, (float *)args[0].v.buf->h, v, nv, grid, block, shared_bytes, e->reverse, e->early);
}

static bk_stream *emu_stream_create(backend *b) {
    (void)b;
    return calloc(1, sizeof(bk_stream));
}
static void emu_stream_destroy(backend *b, bk_stream *s) {
    (void)b;
    free(s);
}
static bk_event *emu_event_create(backend *b) {
    (void)b;
    return calloc(1, sizeof(bk_event));
}
static void emu_event_destroy(backend *b, bk_event *ev) {
    (void)b;
    free(ev);
}
static int emu_event_record(backend *b, bk_event *ev, bk_stream *s) {
    (void)b, (void)s;
    ev->recorded = 1;
    return 0;
}
static int emu_event_sync(backend *b, bk_event *ev) {
    (void)b, (void)ev;
    return 0;
}
static int emu_wait_event(backend *b, bk_stream *s, bk_event *ev) {
    (void)b, (void)s, (void)ev;
    return 0;
}
static int emu_elapsed(backend *b, bk_event *a, bk_event *c, double *ms) {
    (void)b, (void)a, (void)c;
    *ms = 0;
    return 0;
}
static int emu_sync(backend *b, bk_stream *s) {
    (void)b, (void)s;
    return 0;
}
static int emu_graph_supported(backend *b) {
    (void)b;
    return 0;
}

static const bk_iface emu_iface = {
    .destroy = emu_destroy,
    .mem_info = emu_mem_info,
    .supports_dtype = emu_supports,
    .compile = emu_compile,
    .module_free = emu_module_free,
    .kernel = emu_kernel_get,
    .alloc = emu_alloc,
    .free = emu_free,
    .host_alloc = emu_host_alloc,
    .host_free = emu_host_free,
    .upload = emu_upload,
    .download = emu_download,
    .copy = emu_copy,
    .launch = emu_launch,
    .stream_create = emu_stream_create,
    .stream_destroy = emu_stream_destroy,
    .event_create = emu_event_create,
    .event_destroy = emu_event_destroy,
    .event_record = emu_event_record,
    .event_sync = emu_event_sync,
    .stream_wait_event = emu_wait_event,
    .event_elapsed_ms = emu_elapsed,
    .sync = emu_sync,
    .graph_supported = emu_graph_supported,
};

backend *cuemu_create(int reverse, int early) {
    emu_backend *e = calloc(1, sizeof *e);
    e->base.iface = &emu_iface;
    e->base.kind = BK_CUDA;
    snprintf(e->base.info.name, sizeof e->base.info.name, "cuemu");
    snprintf(e->base.info.arch, sizeof e->base.info.arch, "sm_90");
    e->base.info.cc_major = 9;
    e->base.info.warp_size = 32;
    e->base.info.max_threads_per_block = 1024;
    e->base.info.max_shared_per_block = 227 * 1024;
    e->base.info.mem_total = e->base.info.max_alloc = (size_t)8 << 30;
    snprintf(e->dir, sizeof e->dir, "/tmp/cuemu-%d", (int)getpid());
    char cmd[300];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", e->dir);
    if (system(cmd) != 0) {
        free(e);
        return NULL;
    }
    e->reverse = reverse;
    e->early = early;
    return &e->base;
}
