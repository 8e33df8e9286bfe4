/* The device interface: one small vtable, two implementations (CUDA driver API + NVRTC, and
 * OpenCL), both reached through dlopen so build/realm starts on machines that have neither.
 *
 * Everything lives in a `backend` object (library handles, resolved entry points, context,
 * queues, statistics, the last error); there is no global mutable state, so two backends
 * (say CUDA and OpenCL on the same card) can be open side by side.
 *
 * Conventions
 *  - Calls that can fail return 0 on success and -1 on failure (or NULL for constructors);
 *    bk_error(b) then says what failed: the driver call, its error code by name and, for
 *    compiles, the full build log. The text stays valid until the next call on that backend.
 *  - A backend and everything made from it belong to one thread at a time.
 *  - Work is queued on a stream (CUDA stream / OpenCL in-order queue); stream NULL is the
 *    backend's default stream. Async copies read/write host memory when they execute, so the
 *    host buffer must stay alive (and, for uploads, unchanged) until a sync or an event says
 *    the copy is done; pinned memory (bk_host_alloc) makes them truly asynchronous.
 *  - Kernels take device buffers plus scalars; plan kernels take the arena buffer and int64
 *    element offsets, so BK_ARG_BUF + BK_ARG_I64 cover most launches.
 *  - CUDA kernel names must be unmangled (`extern "C" __global__`).
 *  - Dynamic shared memory: CUDA passes `shared_bytes` as the launch's dynamic shared size;
 *    OpenCL has no such launch parameter, so when shared_bytes > 0 the OpenCL backend binds
 *    one extra `__local` pointer argument of that size after the listed arguments.
 */
#ifndef REALM_BACKEND_H
#define REALM_BACKEND_H

#include <stddef.h>
#include <stdint.h>

typedef enum { BK_CUDA = 0, BK_OPENCL = 1, BK_NKINDS } bk_kind;

/* Element types a kernel may compute in (kept independent of gen/ so backends/ has no
 * upward dependency; the compiler maps its own dtype enum onto this one). */
typedef enum { BK_F32 = 0, BK_BF16, BK_F16, BK_I32, BK_I64, BK_NDTYPES } bk_dtype;

typedef struct bk_options {
    const char *cache_dir;  /* NULL: $REALM_CACHE_DIR, else $XDG_CACHE_HOME/realm, else ~/.cache/realm */
    int no_cache;           /* 1: neither read nor write the compiled-kernel cache
                               (REALM_NO_CACHE=1 in the environment does the same) */
} bk_options;

typedef struct bk_device_info {
    char name[256];           /* "NVIDIA H100 80GB HBM3", "pthread-skylake-avx512-..." */
    char vendor[128];
    char arch[32];            /* CUDA: "sm_90"; OpenCL: the device's "OpenCL C x.y" version */
    char driver_version[128]; /* CUDA: "13.0"; OpenCL: CL_DRIVER_VERSION */
    char platform[256];       /* OpenCL: platform name + version; CUDA: "CUDA" */
    char compiler[64];        /* CUDA: "NVRTC 13.0"; OpenCL: "" (built into the driver) */
    int cc_major, cc_minor;   /* CUDA compute capability; 0 on OpenCL */
    int compute_units;        /* SMs / compute units */
    int max_threads_per_block;
    int warp_size;            /* 32 on CUDA; 0 on OpenCL (no portable query) */
    size_t max_shared_per_block; /* bytes of shared (local) memory one block may use */
    size_t mem_total;         /* bytes of device memory */
    size_t max_alloc;         /* largest single buffer: OpenCL's CL_DEVICE_MAX_MEM_ALLOC_SIZE is
                                 often a quarter of mem_total, which caps the arena; CUDA: mem_total */
    int unified_memory;       /* 1 when device memory is host memory (PoCL, integrated GPUs) */
} bk_device_info;

/* What a backend has done with its compiled-kernel cache; tests read these to see hits. */
typedef struct bk_stats {
    long compiles;       /* source compiles (NVRTC / clBuildProgram from source) */
    long cache_hits;     /* modules loaded from a valid cache entry */
    long cache_misses;   /* compiled from source: no entry, a rejected entry, or cache disabled */
    long cache_rejected; /* of the misses, entries found damaged or unloadable: ignored, rebuilt
                            and overwritten */
    long cache_write_errors; /* a failed cache write does not fail the compile */
    char last_cache_error[512];
} bk_stats;

typedef struct backend backend;

/* The handle types are shared by both implementations (one definition, so the vtable has one
 * type across translation units); `h` holds the API's own handle (CUdeviceptr / cl_mem,
 * CUmodule / cl_program, ...). Callers treat them as opaque. */
typedef struct bk_buf { size_t size; uintptr_t h; } bk_buf;      /* device memory */
typedef struct bk_kernel {                                      /* one entry point; owned by its module */
    struct bk_kernel *next;
    char *name;
    void *h;
} bk_kernel;
typedef struct bk_module {                                      /* a compiled program */
    void *h;
    int from_cache;       /* 1 if loaded from a valid cache entry */
    bk_kernel *kernels;
} bk_module;
typedef struct bk_stream { struct bk_stream *next; void *h; } bk_stream; /* an in-order queue */
typedef struct bk_event { void *h; int recorded; } bk_event;   /* a point in a stream */
typedef struct bk_graph { void *h, *exec; } bk_graph;         /* a captured, instantiated launch sequence */

typedef enum { BK_ARG_BUF = 1, BK_ARG_I64, BK_ARG_I32, BK_ARG_F32 } bk_arg_type;
typedef struct bk_arg {
    bk_arg_type type;
    union { bk_buf *buf; int64_t i64; int32_t i32; float f32; } v;
} bk_arg;
#define BK_MAX_ARGS 128
#define BK_BUF(b) ((bk_arg){.type = BK_ARG_BUF, .v.buf = (b)})
#define BK_I64(x) ((bk_arg){.type = BK_ARG_I64, .v.i64 = (int64_t)(x)})
#define BK_I32(x) ((bk_arg){.type = BK_ARG_I32, .v.i32 = (int32_t)(x)})
#define BK_F32(x) ((bk_arg){.type = BK_ARG_F32, .v.f32 = (float)(x)})

/* The vtable each implementation fills in. Callers use the bk_* wrappers below, which
 * check arguments once so the implementations need not. */
typedef struct bk_iface {
    void (*destroy)(backend *b);
    int (*mem_info)(backend *b, size_t *free_bytes, size_t *total_bytes);
    int (*supports_dtype)(backend *b, bk_dtype dt);
    bk_module *(*compile)(backend *b, const char *src, const char *options,
                          const char *const *kernel_names);
    void (*module_free)(backend *b, bk_module *m);
    bk_kernel *(*kernel)(backend *b, bk_module *m, const char *name);
    bk_buf *(*alloc)(backend *b, size_t bytes);
    void (*free)(backend *b, bk_buf *buf);
    void *(*host_alloc)(backend *b, size_t bytes);
    void (*host_free)(backend *b, void *p);
    int (*upload)(backend *b, bk_stream *s, bk_buf *dst, size_t off, const void *src, size_t n, int async);
    int (*download)(backend *b, bk_stream *s, void *dst, bk_buf *src, size_t off, size_t n, int async);
    int (*copy)(backend *b, bk_stream *s, bk_buf *dst, size_t doff, bk_buf *src, size_t soff, size_t n);
    int (*launch)(backend *b, bk_stream *s, bk_kernel *k, const size_t grid[3], const size_t block[3],
                  size_t shared_bytes, const bk_arg *args, int nargs);
    bk_stream *(*stream_create)(backend *b);
    void (*stream_destroy)(backend *b, bk_stream *s);
    bk_event *(*event_create)(backend *b);
    void (*event_destroy)(backend *b, bk_event *e);
    int (*event_record)(backend *b, bk_event *e, bk_stream *s);
    int (*event_sync)(backend *b, bk_event *e);
    int (*stream_wait_event)(backend *b, bk_stream *s, bk_event *e);
    int (*event_elapsed_ms)(backend *b, bk_event *start, bk_event *end, double *ms);
    int (*sync)(backend *b, bk_stream *s);
    /* Optional (NULL where the API has no such thing: OpenCL): record a stream's work into a
     * graph instead of running it, then replay it with one call. graph_supported says whether
     * this driver has the entry points. */
    int (*graph_supported)(backend *b);
    int (*graph_begin)(backend *b, bk_stream *s);
    bk_graph *(*graph_end)(backend *b, bk_stream *s);
    int (*graph_launch)(backend *b, bk_graph *g, bk_stream *s);
    void (*graph_free)(backend *b, bk_graph *g);
} bk_iface;

/* The common part of every backend object; implementations embed it first. */
struct backend {
    const bk_iface *iface;
    bk_kind kind;
    int device;
    bk_device_info info;
    bk_stats stats;
    char cache_dir[1024];   /* "" when the cache is disabled */
    char *err;              /* last error, heap-grown so whole build logs fit */
    size_t err_cap;
    bk_stream *streams;     /* those made by bk_stream_create, for bk_sync_all */
};

/* ---- registry / selection ---- */
const char *bk_kind_name(bk_kind k);                 /* "cuda", "opencl" */
int bk_kind_parse(const char *name, bk_kind *k);     /* 0 on success */
/* Number of devices a backend kind sees; -1 with a reason in err when the kind is unusable
 * here (library missing, no driver, no platform). OpenCL devices are numbered across all
 * platforms in platform order. */
int bk_device_count(bk_kind k, char *err, size_t errlen);
/* Open device `device` of kind k. opt may be NULL. On failure returns NULL and err says why
 * (e.g. "CUDA driver libcuda.so.1 not found: ..."). */
backend *bk_create(bk_kind k, int device, const bk_options *opt, char *err, size_t errlen);
/* Try CUDA device 0, then OpenCL device 0; the reasons both failed go to err. */
backend *bk_create_default(const bk_options *opt, char *err, size_t errlen);
void bk_destroy(backend *b);

/* ---- queries ---- */
const char *bk_name(const backend *b);               /* "cuda" / "opencl" */
const bk_device_info *bk_info(const backend *b);
const bk_stats *bk_get_stats(const backend *b);
const char *bk_error(const backend *b);              /* "" when none */
int bk_mem_info(backend *b, size_t *free_bytes, size_t *total_bytes);
int bk_supports_dtype(backend *b, bk_dtype dt);      /* 1 / 0 */
const char *bk_dtype_name(bk_dtype dt);

/* ---- programs ---- */
/* Compile `src` (CUDA C++ for NVRTC / OpenCL C) with space-separated `options`, through the
 * on-disk cache. kernel_names (NULL-terminated, may be NULL) are resolved at once so a
 * missing entry point fails here rather than at first launch. CUDA: unless options name an
 * architecture (-arch / --gpu-architecture) the device's own sm_XY is used. */
bk_module *bk_compile(backend *b, const char *src, const char *options, const char *const *kernel_names);
int bk_module_from_cache(const bk_module *m);        /* 1 if loaded from a cache entry */
void bk_module_free(backend *b, bk_module *m);       /* frees its kernels too */
bk_kernel *bk_kernel_get(backend *b, bk_module *m, const char *name);

/* ---- memory ---- */
bk_buf *bk_alloc(backend *b, size_t bytes);
void bk_free(backend *b, bk_buf *buf);
size_t bk_buf_size(const bk_buf *buf);
void *bk_host_alloc(backend *b, size_t bytes);       /* pinned (page-locked) host memory */
void bk_host_free(backend *b, void *p);
int bk_upload(backend *b, bk_buf *dst, size_t off, const void *src, size_t n);        /* blocking */
int bk_download(backend *b, void *dst, bk_buf *src, size_t off, size_t n);            /* blocking */
int bk_upload_async(backend *b, bk_stream *s, bk_buf *dst, size_t off, const void *src, size_t n);
int bk_download_async(backend *b, bk_stream *s, void *dst, bk_buf *src, size_t off, size_t n);
int bk_copy(backend *b, bk_stream *s, bk_buf *dst, size_t doff, bk_buf *src, size_t soff, size_t n);

/* ---- execution ---- */
/* grid = blocks per dimension, block = threads per block (OpenCL: global = grid*block,
 * local = block). */
int bk_launch(backend *b, bk_stream *s, bk_kernel *k, const size_t grid[3], const size_t block[3],
              size_t shared_bytes, const bk_arg *args, int nargs);
bk_stream *bk_stream_create(backend *b);
void bk_stream_destroy(backend *b, bk_stream *s);
bk_event *bk_event_create(backend *b);
void bk_event_destroy(backend *b, bk_event *e);
int bk_event_record(backend *b, bk_event *e, bk_stream *s);
int bk_event_sync(backend *b, bk_event *e);                 /* host waits for the event */
int bk_stream_wait_event(backend *b, bk_stream *s, bk_event *e); /* stream waits, host doesn't */
/* Device time between two recorded events (waits for `end`). */
int bk_event_elapsed_ms(backend *b, bk_event *start, bk_event *end, double *ms);
int bk_sync(backend *b, bk_stream *s);                      /* NULL: the default stream */
int bk_sync_all(backend *b);                                /* every stream of b */

/* ---- graphs (CUDA graphs; unsupported on OpenCL) ---- */
/* Between bk_graph_begin and bk_graph_end, work queued on stream s (launches, device copies)
 * is recorded, not run; bk_graph_end returns it instantiated, and each bk_graph_launch runs
 * the whole sequence on a stream (same kernels, same arguments, same buffers) ordered like any
 * other work on it. While capturing, nothing may wait on s (no blocking copies, no sync): the
 * capture would be invalidated and bk_graph_end fails. A failed capture still ends it, so the
 * stream stays usable. Capture is thread-local: other threads' driver calls do not disturb it.
 * Where unsupported (bk_graph_supported 0) every call fails with "not supported". */
int bk_graph_supported(backend *b);                         /* 1 / 0 */
int bk_graph_begin(backend *b, bk_stream *s);
bk_graph *bk_graph_end(backend *b, bk_stream *s);
int bk_graph_launch(backend *b, bk_graph *g, bk_stream *s);
void bk_graph_free(backend *b, bk_graph *g);

/* ---- CUDA without a GPU (NVRTC only; CI uses this for sm_80, sm_90, sm_120) ---- */
/* Compile `src` to a CUBIN for `arch` ("sm_80", "sm_90a", "sm_120"). On success *cubin is
 * malloc'd (free() it) and 0 is returned; the NVRTC log (warnings too) goes to log either
 * way. On failure -1, and log holds what failed plus the full NVRTC log. No cache. */
int cuda_compile_only(const char *src, const char *arch, const char *options,
                      void **cubin, size_t *len, char *log, size_t loglen);
/* NVRTC's version, or -1 with the reason in err when libnvrtc cannot be loaded. */
int cuda_nvrtc_version(int *major, int *minor, char *err, size_t errlen);
/* Whether code for `arch` (e.g. "sm_90") can compute in dt: bf16 needs sm_80+. */
int cuda_arch_supports_dtype(const char *arch, bk_dtype dt);
/* Whether bf16 plans for `arch` may use wgmma (Hopper: sm_90, compiled as sm_90a). */
int cuda_arch_has_wgmma(const char *arch);

/* ---- for implementations ---- */
void bk_set_error(backend *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void bk_append_error(backend *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Resolve the cache directory for opt (honouring REALM_NO_CACHE / opt->no_cache) into
 * b->cache_dir, creating it; a cache that cannot be set up is disabled, not fatal. */
void bk_setup_cache(backend *b, const bk_options *opt);
backend *bk_opencl_create(int device, const bk_options *opt, char *err, size_t errlen);
backend *bk_cuda_create(int device, const bk_options *opt, char *err, size_t errlen);
int bk_opencl_device_count(char *err, size_t errlen);
int bk_cuda_device_count(char *err, size_t errlen);

#endif
