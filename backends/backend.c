/* Backend registry and the thin bk_* wrappers: argument checks live here once, so each
 * implementation only talks to its API. */
#include "backend.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kcache.h"

static const char *const kind_names[BK_NKINDS] = {"cuda", "opencl"};

const char *bk_kind_name(bk_kind k) { return (unsigned)k < BK_NKINDS ? kind_names[k] : "?"; }

int bk_kind_parse(const char *name, bk_kind *k) {
    for (int i = 0; i < BK_NKINDS; i++)
        if (name && strcmp(name, kind_names[i]) == 0) {
            *k = (bk_kind)i;
            return 0;
        }
    return -1;
}

const char *bk_dtype_name(bk_dtype dt) {
    static const char *const n[BK_NDTYPES] = {"f32", "bf16", "f16", "i32", "i64"};
    return (unsigned)dt < BK_NDTYPES ? n[dt] : "?";
}

int bk_device_count(bk_kind k, char *err, size_t errlen) {
    switch (k) {
    case BK_CUDA: return bk_cuda_device_count(err, errlen);
    case BK_OPENCL: return bk_opencl_device_count(err, errlen);
    default: snprintf(err, errlen, "unknown backend kind %d", (int)k); return -1;
    }
}

backend *bk_create(bk_kind k, int device, const bk_options *opt, char *err, size_t errlen) {
    bk_options none = {0};
    if (!opt) opt = &none;
    if (device < 0) {
        snprintf(err, errlen, "%s: device index %d is negative", bk_kind_name(k), device);
        return NULL;
    }
    switch (k) {
    case BK_CUDA: return bk_cuda_create(device, opt, err, errlen);
    case BK_OPENCL: return bk_opencl_create(device, opt, err, errlen);
    default: snprintf(err, errlen, "unknown backend kind %d", (int)k); return NULL;
    }
}

backend *bk_create_default(const bk_options *opt, char *err, size_t errlen) {
    char e1[512] = "", e2[512] = "";
    backend *b = bk_create(BK_CUDA, 0, opt, e1, sizeof e1);
    if (b) return b;
    b = bk_create(BK_OPENCL, 0, opt, e2, sizeof e2);
    if (b) return b;
    snprintf(err, errlen, "no usable backend. cuda: %s; opencl: %s", e1, e2);
    return NULL;
}

void bk_destroy(backend *b) {
    if (!b) return;
    char *e = b->err;
    /* Streams still open are the caller's leak, but the driver objects go with the context;
     * free our wrappers so nothing dangles. */
    while (b->streams) {
        bk_stream *s = b->streams;
        b->streams = s->next;
        b->iface->stream_destroy(b, s);
    }
    b->iface->destroy(b);
    free(e);
}

/* ---- errors ---- */

static void verr(backend *b, int append, const char *fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    int need = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (need < 0) return;
    size_t have = (append && b->err) ? strlen(b->err) : 0;
    if (have + (size_t)need + 1 > b->err_cap) {
        size_t cap = have + (size_t)need + 1 + 256;
        char *p = realloc(b->err, cap);
        if (!p) return; /* keep the older, shorter message rather than none */
        b->err = p;
        b->err_cap = cap;
    }
    vsnprintf(b->err + have, b->err_cap - have, fmt, ap);
}

void bk_set_error(backend *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    verr(b, 0, fmt, ap);
    va_end(ap);
}

void bk_append_error(backend *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    verr(b, 1, fmt, ap);
    va_end(ap);
}

const char *bk_error(const backend *b) { return b && b->err ? b->err : ""; }

void bk_setup_cache(backend *b, const bk_options *opt) {
    char err[512] = "";
    int rc = kcache_dir(opt ? opt->cache_dir : NULL, opt ? opt->no_cache : 0, b->cache_dir,
                        sizeof b->cache_dir, err, sizeof err);
    if (rc != 0) b->cache_dir[0] = 0;
    if (rc < 0) {
        /* Running without a cache is slower, never wrong; record why for `realm info`. */
        b->stats.cache_write_errors++;
        snprintf(b->stats.last_cache_error, sizeof b->stats.last_cache_error, "%s", err);
    }
}

/* ---- queries ---- */

const char *bk_name(const backend *b) { return bk_kind_name(b->kind); }
const bk_device_info *bk_info(const backend *b) { return &b->info; }
const bk_stats *bk_get_stats(const backend *b) { return &b->stats; }

int bk_mem_info(backend *b, size_t *free_bytes, size_t *total_bytes) {
    size_t f = 0, t = 0;
    int rc = b->iface->mem_info(b, &f, &t);
    if (free_bytes) *free_bytes = f;
    if (total_bytes) *total_bytes = t;
    return rc;
}

int bk_supports_dtype(backend *b, bk_dtype dt) {
    if ((unsigned)dt >= BK_NDTYPES) return 0;
    return b->iface->supports_dtype(b, dt);
}

int cuda_arch_supports_dtype(const char *arch, bk_dtype dt) {
    int num = 0;
    if (!arch || sscanf(arch, "sm_%d", &num) != 1) return 0;
    switch (dt) {
    case BK_F32: case BK_I32: case BK_I64: return 1;
    case BK_F16: return num >= 53;
    case BK_BF16: return num >= 80;
    default: return 0;
    }
}

int cuda_arch_has_wgmma(const char *arch) {
    return arch && (strcmp(arch, "sm_90") == 0 || strcmp(arch, "sm_90a") == 0);
}

/* ---- programs ---- */

bk_module *bk_compile(backend *b, const char *src, const char *options, const char *const *kernel_names) {
    if (!src) {
        bk_set_error(b, "%s compile: source is NULL", bk_name(b));
        return NULL;
    }
    return b->iface->compile(b, src, options ? options : "", kernel_names);
}

int bk_module_from_cache(const bk_module *m) { return m ? m->from_cache : 0; }

void bk_module_free(backend *b, bk_module *m) {
    if (m) b->iface->module_free(b, m);
}

bk_kernel *bk_kernel_get(backend *b, bk_module *m, const char *name) {
    if (!m || !name) {
        bk_set_error(b, "%s kernel lookup: %s is NULL", bk_name(b), m ? "name" : "module");
        return NULL;
    }
    for (bk_kernel *k = m->kernels; k; k = k->next)
        if (strcmp(k->name, name) == 0) return k;
    return b->iface->kernel(b, m, name);
}

/* ---- memory ---- */

bk_buf *bk_alloc(backend *b, size_t bytes) {
    if (bytes == 0) {
        bk_set_error(b, "%s alloc: zero bytes requested", bk_name(b));
        return NULL;
    }
    return b->iface->alloc(b, bytes);
}

void bk_free(backend *b, bk_buf *buf) {
    if (buf) b->iface->free(b, buf);
}

size_t bk_buf_size(const bk_buf *buf) { return buf ? buf->size : 0; }

void *bk_host_alloc(backend *b, size_t bytes) {
    if (bytes == 0) {
        bk_set_error(b, "%s host alloc: zero bytes requested", bk_name(b));
        return NULL;
    }
    return b->iface->host_alloc(b, bytes);
}

void bk_host_free(backend *b, void *p) {
    if (p) b->iface->host_free(b, p);
}

static int check_range(backend *b, const char *what, const bk_buf *buf, size_t off, size_t n, const void *host) {
    if (!buf || (!host && n)) {
        bk_set_error(b, "%s %s: %s pointer is NULL", bk_name(b), what, buf ? "host" : "device buffer");
        return -1;
    }
    if (off > buf->size || n > buf->size - off) {
        bk_set_error(b, "%s %s: range [%zu, %zu) is outside the %zu-byte buffer", bk_name(b), what,
                     off, off + n, buf->size);
        return -1;
    }
    return 0;
}

int bk_upload(backend *b, bk_buf *dst, size_t off, const void *src, size_t n) {
    if (check_range(b, "upload", dst, off, n, src)) return -1;
    return n ? b->iface->upload(b, NULL, dst, off, src, n, 0) : 0;
}

int bk_download(backend *b, void *dst, bk_buf *src, size_t off, size_t n) {
    if (check_range(b, "download", src, off, n, dst)) return -1;
    return n ? b->iface->download(b, NULL, dst, src, off, n, 0) : 0;
}

int bk_upload_async(backend *b, bk_stream *s, bk_buf *dst, size_t off, const void *src, size_t n) {
    if (check_range(b, "async upload", dst, off, n, src)) return -1;
    return n ? b->iface->upload(b, s, dst, off, src, n, 1) : 0;
}

int bk_download_async(backend *b, bk_stream *s, void *dst, bk_buf *src, size_t off, size_t n) {
    if (check_range(b, "async download", src, off, n, dst)) return -1;
    return n ? b->iface->download(b, s, dst, src, off, n, 1) : 0;
}

int bk_copy(backend *b, bk_stream *s, bk_buf *dst, size_t doff, bk_buf *src, size_t soff, size_t n) {
    static const char one = 0; /* stands in for the host pointer check_range wants */
    if (check_range(b, "copy (destination)", dst, doff, n, &one) ||
        check_range(b, "copy (source)", src, soff, n, &one))
        return -1;
    return n ? b->iface->copy(b, s, dst, doff, src, soff, n) : 0;
}

/* ---- execution ---- */

int bk_launch(backend *b, bk_stream *s, bk_kernel *k, const size_t grid[3], const size_t block[3],
              size_t shared_bytes, const bk_arg *args, int nargs) {
    if (!k) {
        bk_set_error(b, "%s launch: kernel is NULL", bk_name(b));
        return -1;
    }
    if (nargs < 0 || nargs > BK_MAX_ARGS || (nargs && !args)) {
        bk_set_error(b, "%s launch of %s: bad argument count %d (max %d)", bk_name(b), k->name, nargs,
                     BK_MAX_ARGS);
        return -1;
    }
    for (int d = 0; d < 3; d++)
        if (grid[d] == 0 || block[d] == 0) {
            bk_set_error(b, "%s launch of %s: grid/block dimension %d is zero", bk_name(b), k->name, d);
            return -1;
        }
    for (int i = 0; i < nargs; i++) {
        if (args[i].type < BK_ARG_BUF || args[i].type > BK_ARG_F32) {
            bk_set_error(b, "%s launch of %s: argument %d has unknown type %d", bk_name(b), k->name, i,
                         (int)args[i].type);
            return -1;
        }
        if (args[i].type == BK_ARG_BUF && !args[i].v.buf) {
            bk_set_error(b, "%s launch of %s: buffer argument %d is NULL", bk_name(b), k->name, i);
            return -1;
        }
    }
    return b->iface->launch(b, s, k, grid, block, shared_bytes, args, nargs);
}

bk_stream *bk_stream_create(backend *b) {
    bk_stream *s = b->iface->stream_create(b);
    if (s) {
        s->next = b->streams;
        b->streams = s;
    }
    return s;
}

void bk_stream_destroy(backend *b, bk_stream *s) {
    if (!s) return;
    for (bk_stream **p = &b->streams; *p; p = &(*p)->next)
        if (*p == s) {
            *p = s->next;
            break;
        }
    b->iface->stream_destroy(b, s);
}

bk_event *bk_event_create(backend *b) { return b->iface->event_create(b); }

void bk_event_destroy(backend *b, bk_event *e) {
    if (e) b->iface->event_destroy(b, e);
}

int bk_event_record(backend *b, bk_event *e, bk_stream *s) {
    if (!e) {
        bk_set_error(b, "%s event record: event is NULL", bk_name(b));
        return -1;
    }
    return b->iface->event_record(b, e, s);
}

static int check_recorded(backend *b, const char *what, const bk_event *e) {
    if (!e || !e->recorded) {
        bk_set_error(b, "%s %s: event is %s", bk_name(b), what, e ? "not recorded yet" : "NULL");
        return -1;
    }
    return 0;
}

int bk_event_sync(backend *b, bk_event *e) {
    if (check_recorded(b, "event sync", e)) return -1;
    return b->iface->event_sync(b, e);
}

int bk_stream_wait_event(backend *b, bk_stream *s, bk_event *e) {
    if (check_recorded(b, "stream wait", e)) return -1;
    return b->iface->stream_wait_event(b, s, e);
}

int bk_event_elapsed_ms(backend *b, bk_event *start, bk_event *end, double *ms) {
    if (check_recorded(b, "elapsed time (start)", start) || check_recorded(b, "elapsed time (end)", end))
        return -1;
    return b->iface->event_elapsed_ms(b, start, end, ms);
}

int bk_sync(backend *b, bk_stream *s) { return b->iface->sync(b, s); }

/* ---- graphs ---- */

int bk_graph_supported(backend *b) {
    const bk_iface *i = b->iface;
    return i->graph_supported && i->graph_begin && i->graph_end && i->graph_launch && i->graph_free &&
           i->graph_supported(b);
}

static int graph_check(backend *b, const char *what) {
    if (bk_graph_supported(b)) return 0;
    bk_set_error(b, "%s %s: graphs are not supported by this backend", bk_name(b), what);
    return -1;
}

int bk_graph_begin(backend *b, bk_stream *s) {
    return graph_check(b, "graph begin") ? -1 : b->iface->graph_begin(b, s);
}

bk_graph *bk_graph_end(backend *b, bk_stream *s) {
    return graph_check(b, "graph end") ? NULL : b->iface->graph_end(b, s);
}

int bk_graph_launch(backend *b, bk_graph *g, bk_stream *s) {
    if (graph_check(b, "graph launch")) return -1;
    if (!g) {
        bk_set_error(b, "%s graph launch: graph is NULL", bk_name(b));
        return -1;
    }
    return b->iface->graph_launch(b, g, s);
}

void bk_graph_free(backend *b, bk_graph *g) {
    if (g && b->iface->graph_free) b->iface->graph_free(b, g);
}

int bk_sync_all(backend *b) {
    if (b->iface->sync(b, NULL)) return -1;
    for (bk_stream *s = b->streams; s; s = s->next)
        if (b->iface->sync(b, s)) return -1;
    return 0;
}
