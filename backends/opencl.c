/* OpenCL backend. libOpenCL.so.1 (the ICD loader) is dlopen'd and every entry point resolved
 * with dlsym, so the binary starts on machines without OpenCL; the Khronos headers are used
 * for types and constants only. One context + one in-order profiling queue per backend;
 * extra streams are extra queues on the same context. Program binaries are cached through
 * kcache. */
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "kcache.h"

/* Every entry point we use; __typeof__ keeps each pointer's type identical to the header's
 * prototype, so a signature mistake cannot compile. */
#define OCL_FUNCS(X)                                                                              \
    X(clGetPlatformIDs) X(clGetPlatformInfo) X(clGetDeviceIDs) X(clGetDeviceInfo)                 \
    X(clCreateContext) X(clReleaseContext) X(clCreateCommandQueue) X(clReleaseCommandQueue)       \
    X(clCreateProgramWithSource) X(clCreateProgramWithBinary) X(clBuildProgram)                   \
    X(clGetProgramBuildInfo) X(clGetProgramInfo) X(clReleaseProgram) X(clCreateKernel)            \
    X(clReleaseKernel) X(clSetKernelArg) X(clEnqueueNDRangeKernel) X(clCreateBuffer)              \
    X(clReleaseMemObject) X(clEnqueueWriteBuffer) X(clEnqueueReadBuffer) X(clEnqueueCopyBuffer)   \
    X(clEnqueueMapBuffer) X(clEnqueueUnmapMemObject) X(clEnqueueMarkerWithWaitList)               \
    X(clEnqueueBarrierWithWaitList) X(clWaitForEvents) X(clReleaseEvent)                          \
    X(clGetEventProfilingInfo) X(clFinish)

typedef struct ocl_api {
    void *lib;
#define X(f) __typeof__(f) *f;
    OCL_FUNCS(X)
#undef X
} ocl_api;

/* Pinned host allocations: the mapping of an ALLOC_HOST_PTR buffer, remembered so that
 * bk_host_free can unmap and release it. */
typedef struct ocl_pinned {
    struct ocl_pinned *next;
    void *ptr;
    cl_mem mem;
} ocl_pinned;

typedef struct ocl {
    backend base;          /* first: a backend* is an ocl* */
    ocl_api api;
    cl_platform_id platform;
    cl_device_id device;
    cl_context ctx;
    cl_command_queue queue;
    ocl_pinned *pinned;
    size_t allocated;      /* device bytes we hold: OpenCL has no free-memory query */
    int has_fp16;
} ocl;

static const char *cl_errname(cl_int e) {
    switch (e) {
#define E(x) case x: return #x;
    E(CL_SUCCESS) E(CL_DEVICE_NOT_FOUND) E(CL_DEVICE_NOT_AVAILABLE) E(CL_COMPILER_NOT_AVAILABLE)
    E(CL_MEM_OBJECT_ALLOCATION_FAILURE) E(CL_OUT_OF_RESOURCES) E(CL_OUT_OF_HOST_MEMORY)
    E(CL_PROFILING_INFO_NOT_AVAILABLE) E(CL_MEM_COPY_OVERLAP) E(CL_IMAGE_FORMAT_MISMATCH)
    E(CL_IMAGE_FORMAT_NOT_SUPPORTED) E(CL_BUILD_PROGRAM_FAILURE) E(CL_MAP_FAILURE)
    E(CL_MISALIGNED_SUB_BUFFER_OFFSET) E(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)
    E(CL_COMPILE_PROGRAM_FAILURE) E(CL_LINKER_NOT_AVAILABLE) E(CL_LINK_PROGRAM_FAILURE)
    E(CL_DEVICE_PARTITION_FAILED) E(CL_KERNEL_ARG_INFO_NOT_AVAILABLE) E(CL_INVALID_VALUE)
    E(CL_INVALID_DEVICE_TYPE) E(CL_INVALID_PLATFORM) E(CL_INVALID_DEVICE) E(CL_INVALID_CONTEXT)
    E(CL_INVALID_QUEUE_PROPERTIES) E(CL_INVALID_COMMAND_QUEUE) E(CL_INVALID_HOST_PTR)
    E(CL_INVALID_MEM_OBJECT) E(CL_INVALID_IMAGE_FORMAT_DESCRIPTOR) E(CL_INVALID_IMAGE_SIZE)
    E(CL_INVALID_SAMPLER) E(CL_INVALID_BINARY) E(CL_INVALID_BUILD_OPTIONS) E(CL_INVALID_PROGRAM)
    E(CL_INVALID_PROGRAM_EXECUTABLE) E(CL_INVALID_KERNEL_NAME) E(CL_INVALID_KERNEL_DEFINITION)
    E(CL_INVALID_KERNEL) E(CL_INVALID_ARG_INDEX) E(CL_INVALID_ARG_VALUE) E(CL_INVALID_ARG_SIZE)
    E(CL_INVALID_KERNEL_ARGS) E(CL_INVALID_WORK_DIMENSION) E(CL_INVALID_WORK_GROUP_SIZE)
    E(CL_INVALID_WORK_ITEM_SIZE) E(CL_INVALID_GLOBAL_OFFSET) E(CL_INVALID_EVENT_WAIT_LIST)
    E(CL_INVALID_EVENT) E(CL_INVALID_OPERATION) E(CL_INVALID_GL_OBJECT) E(CL_INVALID_BUFFER_SIZE)
    E(CL_INVALID_MIP_LEVEL) E(CL_INVALID_GLOBAL_WORK_SIZE) E(CL_INVALID_PROPERTY)
    E(CL_INVALID_IMAGE_DESCRIPTOR) E(CL_INVALID_COMPILER_OPTIONS) E(CL_INVALID_LINKER_OPTIONS)
    E(CL_INVALID_DEVICE_PARTITION_COUNT)
#undef E
    case -1001: return "CL_PLATFORM_NOT_FOUND_KHR"; /* ICD loader: no platform installed */
    default: return "unknown OpenCL error";
    }
}

/* Record a failed call on b; returns -1 so callers can `return fail(...)`. */
static int fail(ocl *o, const char *call, cl_int e) {
    bk_set_error(&o->base, "OpenCL %s failed: %s (%d)", call, cl_errname(e), (int)e);
    return -1;
}

/* ---- library loading ---- */

static int api_load(ocl_api *a, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    const char *names[] = {"libOpenCL.so.1", "libOpenCL.so"};
    char first[256] = "";
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !a->lib; i++) {
        a->lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (!a->lib && i == 0) snprintf(first, sizeof first, "%s", dlerror());
    }
    if (!a->lib) {
        snprintf(err, errlen, "OpenCL loader libOpenCL.so.1 not found: %s (install an ICD loader, "
                 "e.g. ocl-icd-libopencl1, plus a driver such as pocl-opencl-icd)", first);
        return -1;
    }
#define X(f)                                                                               \
    if (!(*(void **)&a->f = dlsym(a->lib, #f))) {                                          \
        snprintf(err, errlen, "OpenCL loader lacks %s (needs OpenCL 1.2): %s", #f, dlerror()); \
        dlclose(a->lib);                                                                   \
        a->lib = NULL;                                                                     \
        return -1;                                                                         \
    }
    OCL_FUNCS(X)
#undef X
    return 0;
}

/* The idx-th device over all platforms (platform order, then device order). */
static int find_device(ocl_api *a, int idx, cl_platform_id *pp, cl_device_id *pd, int *count,
                       char *err, size_t errlen) {
    cl_uint np = 0;
    cl_int e = a->clGetPlatformIDs(0, NULL, &np);
    if (e == -1001 || (e == CL_SUCCESS && np == 0)) {
        snprintf(err, errlen, "no OpenCL platform installed (no ICD in /etc/OpenCL/vendors; "
                 "e.g. install pocl-opencl-icd)");
        return -1;
    }
    if (e != CL_SUCCESS) {
        snprintf(err, errlen, "OpenCL clGetPlatformIDs failed: %s (%d)", cl_errname(e), (int)e);
        return -1;
    }
    cl_platform_id plats[64];
    if (np > 64) np = 64;
    if ((e = a->clGetPlatformIDs(np, plats, NULL)) != CL_SUCCESS) {
        snprintf(err, errlen, "OpenCL clGetPlatformIDs failed: %s (%d)", cl_errname(e), (int)e);
        return -1;
    }
    int n = 0;
    for (cl_uint p = 0; p < np; p++) {
        cl_uint nd = 0;
        e = a->clGetDeviceIDs(plats[p], CL_DEVICE_TYPE_ALL, 0, NULL, &nd);
        if (e == CL_DEVICE_NOT_FOUND || nd == 0) continue; /* a platform with no devices */
        if (e != CL_SUCCESS) {
            snprintf(err, errlen, "OpenCL clGetDeviceIDs failed: %s (%d)", cl_errname(e), (int)e);
            return -1;
        }
        if (idx >= n && idx < n + (int)nd) {
            cl_device_id devs[256];
            if (nd > 256) nd = 256;
            if ((e = a->clGetDeviceIDs(plats[p], CL_DEVICE_TYPE_ALL, nd, devs, NULL)) != CL_SUCCESS) {
                snprintf(err, errlen, "OpenCL clGetDeviceIDs failed: %s (%d)", cl_errname(e), (int)e);
                return -1;
            }
            *pp = plats[p];
            *pd = devs[idx - n];
        }
        n += (int)nd;
    }
    if (count) *count = n;
    if (idx >= n) {
        snprintf(err, errlen, "OpenCL device %d does not exist (%d device%s found)", idx, n, n == 1 ? "" : "s");
        return -1;
    }
    return 0;
}

int bk_opencl_device_count(char *err, size_t errlen) {
    ocl_api a;
    if (api_load(&a, err, errlen)) return -1;
    cl_platform_id p;
    cl_device_id d;
    int n = 0;
    char e2[512] = "";
    int rc = find_device(&a, 0, &p, &d, &n, e2, sizeof e2);
    if (rc && n == 0) {
        snprintf(err, errlen, "%s", e2);
        n = -1;
    }
    /* Not dlclose'd: see ocl_destroy. */
    return n;
}

/* ---- device info ---- */

static int dev_str(ocl *o, cl_device_info what, const char *wname, char *out, size_t outlen) {
    cl_int e = o->api.clGetDeviceInfo(o->device, what, outlen, out, NULL);
    if (e == CL_INVALID_VALUE) { /* longer than our buffer: fetch and truncate */
        size_t need = 0;
        if ((e = o->api.clGetDeviceInfo(o->device, what, 0, NULL, &need)) == CL_SUCCESS) {
            char *tmp = malloc(need + 1);
            if (!tmp) return fail(o, "clGetDeviceInfo (out of host memory)", CL_OUT_OF_HOST_MEMORY);
            e = o->api.clGetDeviceInfo(o->device, what, need, tmp, NULL);
            tmp[need] = 0;
            snprintf(out, outlen, "%s", tmp);
            free(tmp);
        }
    }
    if (e != CL_SUCCESS) {
        char call[96];
        snprintf(call, sizeof call, "clGetDeviceInfo(%s)", wname);
        return fail(o, call, e);
    }
    out[outlen - 1] = 0;
    return 0;
}

#define DEV_STR(o, what, out) dev_str(o, what, #what, out, sizeof(out))
#define DEV_VAL(o, what, var)                                                                  \
    do {                                                                                       \
        cl_int e_ = (o)->api.clGetDeviceInfo((o)->device, what, sizeof(var), &(var), NULL);    \
        if (e_ != CL_SUCCESS) return fail(o, "clGetDeviceInfo(" #what ")", e_);                \
    } while (0)

static int query_info(ocl *o) {
    bk_device_info *in = &o->base.info;
    char pname[120] = "", pver[128] = "";
    cl_int e;
    if ((e = o->api.clGetPlatformInfo(o->platform, CL_PLATFORM_NAME, sizeof pname, pname, NULL)) != CL_SUCCESS)
        return fail(o, "clGetPlatformInfo(CL_PLATFORM_NAME)", e);
    if ((e = o->api.clGetPlatformInfo(o->platform, CL_PLATFORM_VERSION, sizeof pver, pver, NULL)) != CL_SUCCESS)
        return fail(o, "clGetPlatformInfo(CL_PLATFORM_VERSION)", e);
    pname[sizeof pname - 1] = pver[sizeof pver - 1] = 0;
    snprintf(in->platform, sizeof in->platform, "%s (%s)", pname, pver);
    if (DEV_STR(o, CL_DEVICE_NAME, in->name) || DEV_STR(o, CL_DEVICE_VENDOR, in->vendor) ||
        DEV_STR(o, CL_DEVICE_OPENCL_C_VERSION, in->arch) ||
        DEV_STR(o, CL_DRIVER_VERSION, in->driver_version))
        return -1;
    cl_uint cu = 0;
    size_t wg = 0;
    cl_ulong lmem = 0, gmem = 0, maxalloc = 0;
    cl_bool unified = CL_FALSE;
    DEV_VAL(o, CL_DEVICE_MAX_COMPUTE_UNITS, cu);
    DEV_VAL(o, CL_DEVICE_MAX_WORK_GROUP_SIZE, wg);
    DEV_VAL(o, CL_DEVICE_LOCAL_MEM_SIZE, lmem);
    DEV_VAL(o, CL_DEVICE_GLOBAL_MEM_SIZE, gmem);
    DEV_VAL(o, CL_DEVICE_MAX_MEM_ALLOC_SIZE, maxalloc);
    DEV_VAL(o, CL_DEVICE_HOST_UNIFIED_MEMORY, unified);
    in->compute_units = (int)cu;
    in->max_threads_per_block = (int)wg;
    in->max_shared_per_block = (size_t)lmem;
    in->mem_total = (size_t)gmem;
    in->max_alloc = (size_t)maxalloc;
    in->unified_memory = unified == CL_TRUE;
    size_t need = 0;
    if ((e = o->api.clGetDeviceInfo(o->device, CL_DEVICE_EXTENSIONS, 0, NULL, &need)) != CL_SUCCESS)
        return fail(o, "clGetDeviceInfo(CL_DEVICE_EXTENSIONS)", e);
    char *ext = malloc(need + 1);
    if (!ext) return fail(o, "clGetDeviceInfo (out of host memory)", CL_OUT_OF_HOST_MEMORY);
    e = o->api.clGetDeviceInfo(o->device, CL_DEVICE_EXTENSIONS, need, ext, NULL);
    ext[need] = 0;
    o->has_fp16 = e == CL_SUCCESS && strstr(ext, "cl_khr_fp16") != NULL;
    free(ext);
    if (e != CL_SUCCESS) return fail(o, "clGetDeviceInfo(CL_DEVICE_EXTENSIONS)", e);
    return 0;
}

/* ---- create / destroy ---- */

static const bk_iface ocl_iface;

static void ocl_destroy(backend *b) {
    ocl *o = (ocl *)b;
    if (o->queue) o->api.clFinish(o->queue);
    while (o->pinned) {
        ocl_pinned *p = o->pinned;
        o->pinned = p->next;
        o->api.clEnqueueUnmapMemObject(o->queue, p->mem, p->ptr, 0, NULL, NULL);
        o->api.clReleaseMemObject(p->mem);
        free(p);
    }
    if (o->queue) {
        o->api.clFinish(o->queue);
        o->api.clReleaseCommandQueue(o->queue);
    }
    if (o->ctx) o->api.clReleaseContext(o->ctx);
    /* The loader is deliberately not dlclose'd: ICDs (PoCL among them) keep worker threads
     * and atexit handlers inside libraries the loader opened, and unloading it under them
     * can crash at exit. dlopen is reference-counted, so reopening later is cheap. */
    free(o);
}

backend *bk_opencl_create(int device, const bk_options *opt, char *err, size_t errlen) {
    ocl *o = calloc(1, sizeof *o);
    if (!o) {
        snprintf(err, errlen, "OpenCL: out of host memory");
        return NULL;
    }
    o->base.iface = &ocl_iface;
    o->base.kind = BK_OPENCL;
    o->base.device = device;
    if (api_load(&o->api, err, errlen) ||
        find_device(&o->api, device, &o->platform, &o->device, NULL, err, errlen)) {
        free(o);
        return NULL;
    }
    cl_int e = CL_SUCCESS;
    cl_context_properties props[] = {CL_CONTEXT_PLATFORM, (cl_context_properties)o->platform, 0};
    o->ctx = o->api.clCreateContext(props, 1, &o->device, NULL, NULL, &e);
    if (!o->ctx || e != CL_SUCCESS) {
        snprintf(err, errlen, "OpenCL clCreateContext failed: %s (%d)", cl_errname(e), (int)e);
        goto fail;
    }
    o->queue = o->api.clCreateCommandQueue(o->ctx, o->device, CL_QUEUE_PROFILING_ENABLE, &e);
    if (!o->queue || e != CL_SUCCESS) {
        snprintf(err, errlen, "OpenCL clCreateCommandQueue failed: %s (%d)", cl_errname(e), (int)e);
        goto fail;
    }
    if (query_info(o)) {
        snprintf(err, errlen, "%s", bk_error(&o->base));
        goto fail;
    }
    bk_setup_cache(&o->base, opt);
    return &o->base;
fail:
    free(o->base.err);
    o->base.err = NULL;
    ocl_destroy(&o->base);
    return NULL;
}

/* ---- queries ---- */

static int ocl_mem_info(backend *b, size_t *free_bytes, size_t *total_bytes) {
    ocl *o = (ocl *)b;
    *total_bytes = b->info.mem_total;
    *free_bytes = o->allocated < b->info.mem_total ? b->info.mem_total - o->allocated : 0;
    return 0;
}

static int ocl_supports_dtype(backend *b, bk_dtype dt) {
    ocl *o = (ocl *)b;
    switch (dt) {
    case BK_F32: case BK_I32: case BK_I64: return 1;
    case BK_F16: return o->has_fp16;
    default: return 0; /* OpenCL C has no bf16 arithmetic type */
    }
}

/* ---- programs ---- */

static void module_release(ocl *o, bk_module *m) {
    while (m->kernels) {
        bk_kernel *k = m->kernels;
        m->kernels = k->next;
        if (k->h) o->api.clReleaseKernel((cl_kernel)k->h);
        free(k->name);
        free(k);
    }
    if (m->h) o->api.clReleaseProgram((cl_program)m->h);
    free(m);
}

static void ocl_module_free(backend *b, bk_module *m) { module_release((ocl *)b, m); }

static bk_kernel *ocl_kernel(backend *b, bk_module *m, const char *name) {
    ocl *o = (ocl *)b;
    cl_int e = CL_SUCCESS;
    cl_kernel ck = o->api.clCreateKernel((cl_program)m->h, name, &e);
    if (!ck || e != CL_SUCCESS) {
        bk_set_error(b, "OpenCL kernel '%s': clCreateKernel failed: %s (%d)%s", name, cl_errname(e), (int)e,
                     e == CL_INVALID_KERNEL_NAME ? " (no __kernel of that name in the module)" : "");
        return NULL;
    }
    bk_kernel *k = calloc(1, sizeof *k);
    char *nm = strdup(name);
    if (!k || !nm) {
        free(k);
        free(nm);
        o->api.clReleaseKernel(ck);
        bk_set_error(b, "OpenCL kernel '%s': out of host memory", name);
        return NULL;
    }
    k->name = nm;
    k->h = ck;
    k->next = m->kernels;
    m->kernels = k;
    return k;
}

/* Append the program's build log for our device to b's error. */
static void append_build_log(ocl *o, cl_program p) {
    size_t n = 0;
    cl_int e = o->api.clGetProgramBuildInfo(p, o->device, CL_PROGRAM_BUILD_LOG, 0, NULL, &n);
    if (e != CL_SUCCESS) {
        bk_append_error(&o->base, "\n(build log unavailable: clGetProgramBuildInfo failed: %s (%d))",
                        cl_errname(e), (int)e);
        return;
    }
    char *log = malloc(n + 1);
    if (!log) return;
    e = o->api.clGetProgramBuildInfo(p, o->device, CL_PROGRAM_BUILD_LOG, n, log, NULL);
    log[e == CL_SUCCESS ? n : 0] = 0;
    bk_append_error(&o->base, "\nbuild log:\n%s", log);
    free(log);
}

/* Build from a cached binary; NULL (and nothing recorded as an error) if it won't load. */
static cl_program load_binary(ocl *o, const void *bin, size_t len, const char *options) {
    cl_int e = CL_SUCCESS, status = CL_SUCCESS;
    const unsigned char *bp = bin;
    cl_program p = o->api.clCreateProgramWithBinary(o->ctx, 1, &o->device, &len, &bp, &status, &e);
    if (!p || e != CL_SUCCESS || status != CL_SUCCESS) {
        if (p) o->api.clReleaseProgram(p);
        return NULL;
    }
    if (o->api.clBuildProgram(p, 1, &o->device, options, NULL, NULL) != CL_SUCCESS) {
        o->api.clReleaseProgram(p);
        return NULL;
    }
    return p;
}

static void store_binary(ocl *o, cl_program p, const uint8_t key[32]) {
    backend *b = &o->base;
    size_t len = 0;
    cl_int e = o->api.clGetProgramInfo(p, CL_PROGRAM_BINARY_SIZES, sizeof len, &len, NULL);
    const char *what = "clGetProgramInfo(CL_PROGRAM_BINARY_SIZES)";
    unsigned char *bin = NULL;
    if (e == CL_SUCCESS && len == 0) {
        e = CL_INVALID_BINARY; /* the driver offers no binary: nothing to cache */
        what = "program binary (driver returned none)";
    }
    if (e == CL_SUCCESS) {
        bin = malloc(len);
        if (!bin) {
            e = CL_OUT_OF_HOST_MEMORY;
            what = "program binary (malloc)";
        } else {
            e = o->api.clGetProgramInfo(p, CL_PROGRAM_BINARIES, sizeof bin, &bin, NULL);
            what = "clGetProgramInfo(CL_PROGRAM_BINARIES)";
        }
    }
    char err[512];
    if (e != CL_SUCCESS) {
        b->stats.cache_write_errors++;
        snprintf(b->stats.last_cache_error, sizeof b->stats.last_cache_error, "OpenCL %s failed: %s (%d)",
                 what, cl_errname(e), (int)e);
    } else if (kcache_put(b->cache_dir, key, bin, len, err, sizeof err)) {
        b->stats.cache_write_errors++;
        snprintf(b->stats.last_cache_error, sizeof b->stats.last_cache_error, "%s", err);
    }
    free(bin);
}

static bk_module *ocl_compile(backend *b, const char *src, const char *options, const char *const *names) {
    ocl *o = (ocl *)b;
    bk_module *m = calloc(1, sizeof *m);
    if (!m) {
        bk_set_error(b, "OpenCL compile: out of host memory");
        return NULL;
    }
    uint8_t key[32];
    kcache_key k;
    kcache_key_init(&k, "opencl-program-binary");
    kcache_key_str(&k, src);
    kcache_key_str(&k, options);
    kcache_key_str(&k, b->info.name);
    kcache_key_str(&k, b->info.vendor);
    kcache_key_str(&k, b->info.driver_version);
    kcache_key_str(&k, b->info.platform); /* name + platform version */
    kcache_key_str(&k, b->info.arch);
    kcache_key_final(&k, key);

    cl_program p = NULL;
    if (b->cache_dir[0]) {
        void *bin = NULL;
        size_t len = 0;
        char err[512];
        kcache_status st = kcache_get(b->cache_dir, key, &bin, &len, err, sizeof err);
        if (st == KC_HIT) {
            p = load_binary(o, bin, len, options);
            if (!p) { /* a valid file the driver rejects (e.g. a driver update): rebuild */
                b->stats.cache_rejected++;
                snprintf(b->stats.last_cache_error, sizeof b->stats.last_cache_error,
                         "OpenCL driver rejected a cached program binary; rebuilt from source");
            }
        } else if (st == KC_BAD) {
            b->stats.cache_rejected++;
            snprintf(b->stats.last_cache_error, sizeof b->stats.last_cache_error, "%s", err);
        }
        free(bin);
    }
    if (p) {
        b->stats.cache_hits++;
        m->from_cache = 1;
    } else {
        b->stats.cache_misses++;
        b->stats.compiles++;
        cl_int e = CL_SUCCESS;
        p = o->api.clCreateProgramWithSource(o->ctx, 1, &src, NULL, &e);
        if (!p || e != CL_SUCCESS) {
            fail(o, "clCreateProgramWithSource", e);
            free(m);
            return NULL;
        }
        e = o->api.clBuildProgram(p, 1, &o->device, options, NULL, NULL);
        if (e != CL_SUCCESS) {
            fail(o, "clBuildProgram", e);
            bk_append_error(b, "\noptions: '%s'", options);
            append_build_log(o, p);
            o->api.clReleaseProgram(p);
            free(m);
            return NULL;
        }
        if (b->cache_dir[0]) store_binary(o, p, key);
    }
    m->h = p;
    for (const char *const *n = names; n && *n; n++)
        if (!ocl_kernel(b, m, *n)) {
            module_release(o, m);
            return NULL;
        }
    return m;
}

/* ---- memory ---- */

static bk_buf *ocl_alloc(backend *b, size_t bytes) {
    ocl *o = (ocl *)b;
    if (bytes > b->info.max_alloc) {
        bk_set_error(b, "OpenCL alloc of %zu bytes exceeds the device's largest buffer "
                     "(CL_DEVICE_MAX_MEM_ALLOC_SIZE = %zu)", bytes, b->info.max_alloc);
        return NULL;
    }
    bk_buf *buf = calloc(1, sizeof *buf);
    if (!buf) {
        bk_set_error(b, "OpenCL alloc: out of host memory");
        return NULL;
    }
    cl_int e = CL_SUCCESS;
    cl_mem mem = o->api.clCreateBuffer(o->ctx, CL_MEM_READ_WRITE, bytes, NULL, &e);
    if (!mem || e != CL_SUCCESS) {
        fail(o, "clCreateBuffer", e);
        bk_append_error(b, " (%zu bytes)", bytes);
        free(buf);
        return NULL;
    }
    buf->size = bytes;
    buf->h = (uintptr_t)mem;
    o->allocated += bytes;
    return buf;
}

static void ocl_free(backend *b, bk_buf *buf) {
    ocl *o = (ocl *)b;
    o->api.clReleaseMemObject((cl_mem)buf->h);
    o->allocated -= buf->size < o->allocated ? buf->size : o->allocated;
    free(buf);
}

static void *ocl_host_alloc(backend *b, size_t bytes) {
    ocl *o = (ocl *)b;
    ocl_pinned *pn = calloc(1, sizeof *pn);
    if (!pn) {
        bk_set_error(b, "OpenCL host alloc: out of host memory");
        return NULL;
    }
    /* ALLOC_HOST_PTR + map is OpenCL's route to page-locked memory (NVIDIA and AMD pin it). */
    cl_int e = CL_SUCCESS;
    pn->mem = o->api.clCreateBuffer(o->ctx, CL_MEM_READ_WRITE | CL_MEM_ALLOC_HOST_PTR, bytes, NULL, &e);
    if (!pn->mem || e != CL_SUCCESS) {
        fail(o, "clCreateBuffer(CL_MEM_ALLOC_HOST_PTR)", e);
        free(pn);
        return NULL;
    }
    pn->ptr = o->api.clEnqueueMapBuffer(o->queue, pn->mem, CL_TRUE, CL_MAP_READ | CL_MAP_WRITE, 0, bytes,
                                        0, NULL, NULL, &e);
    if (!pn->ptr || e != CL_SUCCESS) {
        fail(o, "clEnqueueMapBuffer", e);
        o->api.clReleaseMemObject(pn->mem);
        free(pn);
        return NULL;
    }
    pn->next = o->pinned;
    o->pinned = pn;
    return pn->ptr;
}

static void ocl_host_free(backend *b, void *ptr) {
    ocl *o = (ocl *)b;
    for (ocl_pinned **pp = &o->pinned; *pp; pp = &(*pp)->next) {
        ocl_pinned *pn = *pp;
        if (pn->ptr != ptr) continue;
        *pp = pn->next;
        /* Async copies may still read the mapping: drain first so unmapping is safe. */
        o->api.clFinish(o->queue);
        o->api.clEnqueueUnmapMemObject(o->queue, pn->mem, pn->ptr, 0, NULL, NULL);
        o->api.clFinish(o->queue);
        o->api.clReleaseMemObject(pn->mem);
        free(pn);
        return;
    }
}

static cl_command_queue qof(ocl *o, bk_stream *s) { return s ? (cl_command_queue)s->h : o->queue; }

static int ocl_upload(backend *b, bk_stream *s, bk_buf *dst, size_t off, const void *src, size_t n, int async) {
    ocl *o = (ocl *)b;
    cl_int e = o->api.clEnqueueWriteBuffer(qof(o, s), (cl_mem)dst->h, async ? CL_FALSE : CL_TRUE, off, n, src,
                                           0, NULL, NULL);
    return e == CL_SUCCESS ? 0 : fail(o, "clEnqueueWriteBuffer", e);
}

static int ocl_download(backend *b, bk_stream *s, void *dst, bk_buf *src, size_t off, size_t n, int async) {
    ocl *o = (ocl *)b;
    cl_int e = o->api.clEnqueueReadBuffer(qof(o, s), (cl_mem)src->h, async ? CL_FALSE : CL_TRUE, off, n, dst,
                                          0, NULL, NULL);
    return e == CL_SUCCESS ? 0 : fail(o, "clEnqueueReadBuffer", e);
}

static int ocl_copy(backend *b, bk_stream *s, bk_buf *dst, size_t doff, bk_buf *src, size_t soff, size_t n) {
    ocl *o = (ocl *)b;
    cl_int e = o->api.clEnqueueCopyBuffer(qof(o, s), (cl_mem)src->h, (cl_mem)dst->h, soff, doff, n, 0, NULL, NULL);
    return e == CL_SUCCESS ? 0 : fail(o, "clEnqueueCopyBuffer", e);
}

/* ---- execution ---- */

static int ocl_launch(backend *b, bk_stream *s, bk_kernel *k, const size_t grid[3], const size_t block[3],
                      size_t shared, const bk_arg *args, int nargs) {
    ocl *o = (ocl *)b;
    cl_kernel ck = (cl_kernel)k->h;
    for (int i = 0; i < nargs; i++) {
        cl_int e;
        cl_mem mem;
        cl_long l;
        cl_int ii;
        cl_float f;
        switch (args[i].type) {
        case BK_ARG_BUF: mem = (cl_mem)args[i].v.buf->h; e = o->api.clSetKernelArg(ck, (cl_uint)i, sizeof mem, &mem); break;
        case BK_ARG_I64: l = args[i].v.i64; e = o->api.clSetKernelArg(ck, (cl_uint)i, sizeof l, &l); break;
        case BK_ARG_I32: ii = args[i].v.i32; e = o->api.clSetKernelArg(ck, (cl_uint)i, sizeof ii, &ii); break;
        default: f = args[i].v.f32; e = o->api.clSetKernelArg(ck, (cl_uint)i, sizeof f, &f); break;
        }
        if (e != CL_SUCCESS) {
            fail(o, "clSetKernelArg", e);
            bk_append_error(b, " (kernel %s, argument %d)", k->name, i);
            return -1;
        }
    }
    if (shared) {
        cl_int e = o->api.clSetKernelArg(ck, (cl_uint)nargs, shared, NULL);
        if (e != CL_SUCCESS) {
            fail(o, "clSetKernelArg", e);
            bk_append_error(b, " (kernel %s: the __local argument %d of %zu bytes for shared memory)", k->name,
                            nargs, shared);
            return -1;
        }
    }
    size_t global[3];
    for (int d = 0; d < 3; d++) {
        if (grid[d] > SIZE_MAX / block[d]) {
            bk_set_error(b, "OpenCL launch of %s: grid*block overflows in dimension %d", k->name, d);
            return -1;
        }
        global[d] = grid[d] * block[d];
    }
    cl_int e = o->api.clEnqueueNDRangeKernel(qof(o, s), ck, 3, NULL, global, block, 0, NULL, NULL);
    if (e != CL_SUCCESS) {
        fail(o, "clEnqueueNDRangeKernel", e);
        bk_append_error(b, " (kernel %s, grid %zux%zux%zu, block %zux%zux%zu)", k->name, grid[0], grid[1],
                        grid[2], block[0], block[1], block[2]);
        return -1;
    }
    return 0;
}

static bk_stream *ocl_stream_create(backend *b) {
    ocl *o = (ocl *)b;
    bk_stream *s = calloc(1, sizeof *s);
    if (!s) {
        bk_set_error(b, "OpenCL stream: out of host memory");
        return NULL;
    }
    cl_int e = CL_SUCCESS;
    cl_command_queue q = o->api.clCreateCommandQueue(o->ctx, o->device, CL_QUEUE_PROFILING_ENABLE, &e);
    if (!q || e != CL_SUCCESS) {
        fail(o, "clCreateCommandQueue", e);
        free(s);
        return NULL;
    }
    s->h = q;
    return s;
}

static void ocl_stream_destroy(backend *b, bk_stream *s) {
    ocl *o = (ocl *)b;
    o->api.clFinish((cl_command_queue)s->h);
    o->api.clReleaseCommandQueue((cl_command_queue)s->h);
    free(s);
}

static bk_event *ocl_event_create(backend *b) {
    bk_event *e = calloc(1, sizeof *e);
    if (!e) bk_set_error(b, "OpenCL event: out of host memory");
    return e;
}

static void ocl_event_destroy(backend *b, bk_event *e) {
    ocl *o = (ocl *)b;
    if (e->h) o->api.clReleaseEvent((cl_event)e->h);
    free(e);
}

static int ocl_event_record(backend *b, bk_event *ev, bk_stream *s) {
    ocl *o = (ocl *)b;
    cl_event ce = NULL;
    /* A marker with an empty wait list completes when everything queued before it has. */
    cl_int e = o->api.clEnqueueMarkerWithWaitList(qof(o, s), 0, NULL, &ce);
    if (e != CL_SUCCESS) return fail(o, "clEnqueueMarkerWithWaitList", e);
    if (ev->h) o->api.clReleaseEvent((cl_event)ev->h);
    ev->h = ce;
    ev->recorded = 1;
    return 0;
}

static int ocl_event_sync(backend *b, bk_event *ev) {
    ocl *o = (ocl *)b;
    cl_event ce = (cl_event)ev->h;
    cl_int e = o->api.clWaitForEvents(1, &ce);
    return e == CL_SUCCESS ? 0 : fail(o, "clWaitForEvents", e);
}

static int ocl_stream_wait_event(backend *b, bk_stream *s, bk_event *ev) {
    ocl *o = (ocl *)b;
    cl_event ce = (cl_event)ev->h;
    cl_int e = o->api.clEnqueueBarrierWithWaitList(qof(o, s), 1, &ce, NULL);
    return e == CL_SUCCESS ? 0 : fail(o, "clEnqueueBarrierWithWaitList", e);
}

static int ocl_event_elapsed_ms(backend *b, bk_event *start, bk_event *end, double *ms) {
    ocl *o = (ocl *)b;
    cl_event ev[2] = {(cl_event)start->h, (cl_event)end->h};
    cl_int e = o->api.clWaitForEvents(2, ev);
    if (e != CL_SUCCESS) return fail(o, "clWaitForEvents", e);
    /* Markers' END timestamps: the moment all work before each marker had finished. */
    cl_ulong t[2];
    for (int i = 0; i < 2; i++) {
        e = o->api.clGetEventProfilingInfo(ev[i], CL_PROFILING_COMMAND_END, sizeof t[i], &t[i], NULL);
        if (e != CL_SUCCESS) return fail(o, "clGetEventProfilingInfo(CL_PROFILING_COMMAND_END)", e);
    }
    *ms = ((double)t[1] - (double)t[0]) * 1e-6;
    return 0;
}

static int ocl_sync(backend *b, bk_stream *s) {
    ocl *o = (ocl *)b;
    cl_int e = o->api.clFinish(qof(o, s));
    return e == CL_SUCCESS ? 0 : fail(o, "clFinish", e);
}

static const bk_iface ocl_iface = {
    .destroy = ocl_destroy,
    .mem_info = ocl_mem_info,
    .supports_dtype = ocl_supports_dtype,
    .compile = ocl_compile,
    .module_free = ocl_module_free,
    .kernel = ocl_kernel,
    .alloc = ocl_alloc,
    .free = ocl_free,
    .host_alloc = ocl_host_alloc,
    .host_free = ocl_host_free,
    .upload = ocl_upload,
    .download = ocl_download,
    .copy = ocl_copy,
    .launch = ocl_launch,
    .stream_create = ocl_stream_create,
    .stream_destroy = ocl_stream_destroy,
    .event_create = ocl_event_create,
    .event_destroy = ocl_event_destroy,
    .event_record = ocl_event_record,
    .event_sync = ocl_event_sync,
    .stream_wait_event = ocl_stream_wait_event,
    .event_elapsed_ms = ocl_event_elapsed_ms,
    .sync = ocl_sync,
};
