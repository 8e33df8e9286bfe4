/* CUDA backend: the driver API (libcuda.so.1) and NVRTC (libnvrtc), both dlopen'd and resolved
 * by name, so build/realm needs neither the toolkit headers nor a driver to build or start.
 * The few driver types and constants we use are declared here; they are part of the driver's
 * stable ABI. NVRTC alone (no driver, no GPU) is enough for cuda_compile_only, which CI uses
 * to compile every generated kernel for sm_80, sm_90 and sm_120. */
#include <dlfcn.h>
#include <link.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "kcache.h"

/* ---- driver API subset ---- */
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct CUgraph_st *CUgraph;
typedef struct CUgraphExec_st *CUgraphExec;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_NO_DEVICE = 100,
    CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 1,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK = 8,
    CU_DEVICE_ATTRIBUTE_WARP_SIZE = 10,
    CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    CU_DEVICE_ATTRIBUTE_INTEGRATED = 18,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
    CU_STREAM_NON_BLOCKING = 1,
    CU_EVENT_DEFAULT = 0,
    CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1,
};
/* Statically allocated shared memory above this needs an explicit opt-in per function. */

/* Entry points: field, primary symbol, fallback symbol (older drivers) or NULL. The _v2
 * names are what cuda.h's macros map the plain names to; calling the unversioned symbol
 * would get the legacy 32-bit-pointer ABI for some of them. */
#define CU_FUNCS(X)                                                                          \
    X(cuGetErrorName, "cuGetErrorName", NULL, CUresult, (CUresult, const char **))         \
    X(cuGetErrorString, "cuGetErrorString", NULL, CUresult, (CUresult, const char **))     \
    X(cuInit, "cuInit", NULL, CUresult, (unsigned))                                        \
    X(cuDriverGetVersion, "cuDriverGetVersion", NULL, CUresult, (int *))                   \
    X(cuDeviceGetCount, "cuDeviceGetCount", NULL, CUresult, (int *))                       \
    X(cuDeviceGet, "cuDeviceGet", NULL, CUresult, (CUdevice *, int))                       \
    X(cuDeviceGetName, "cuDeviceGetName", NULL, CUresult, (char *, int, CUdevice))         \
    X(cuDeviceGetAttribute, "cuDeviceGetAttribute", NULL, CUresult, (int *, int, CUdevice)) \
    X(cuDeviceTotalMem, "cuDeviceTotalMem_v2", NULL, CUresult, (size_t *, CUdevice))       \
    X(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", NULL, CUresult, (CUcontext *, CUdevice)) \
    X(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease", \
      CUresult, (CUdevice))                                                                \
    X(cuCtxSetCurrent, "cuCtxSetCurrent", NULL, CUresult, (CUcontext))                     \
    X(cuMemGetInfo, "cuMemGetInfo_v2", NULL, CUresult, (size_t *, size_t *))               \
    X(cuModuleLoadData, "cuModuleLoadData", NULL, CUresult, (CUmodule *, const void *))    \
    X(cuModuleUnload, "cuModuleUnload", NULL, CUresult, (CUmodule))                        \
    X(cuModuleGetFunction, "cuModuleGetFunction", NULL, CUresult, (CUfunction *, CUmodule, const char *)) \
    X(cuFuncSetAttribute, "cuFuncSetAttribute", NULL, CUresult, (CUfunction, int, int))    \
    X(cuMemAlloc, "cuMemAlloc_v2", NULL, CUresult, (CUdeviceptr *, size_t))                \
    X(cuMemFree, "cuMemFree_v2", NULL, CUresult, (CUdeviceptr))                            \
    X(cuMemAllocHost, "cuMemAllocHost_v2", NULL, CUresult, (void **, size_t))              \
    X(cuMemFreeHost, "cuMemFreeHost", NULL, CUresult, (void *))                            \
    X(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2", NULL, CUresult, (CUdeviceptr, const void *, size_t, CUstream)) \
    X(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2", NULL, CUresult, (void *, CUdeviceptr, size_t, CUstream)) \
    X(cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2", NULL, CUresult, (CUdeviceptr, CUdeviceptr, size_t, CUstream)) \
    X(cuStreamCreate, "cuStreamCreate", NULL, CUresult, (CUstream *, unsigned))            \
    X(cuStreamDestroy, "cuStreamDestroy_v2", NULL, CUresult, (CUstream))                   \
    X(cuStreamSynchronize, "cuStreamSynchronize", NULL, CUresult, (CUstream))              \
    X(cuStreamWaitEvent, "cuStreamWaitEvent", NULL, CUresult, (CUstream, CUevent, unsigned)) \
    X(cuEventCreate, "cuEventCreate", NULL, CUresult, (CUevent *, unsigned))               \
    X(cuEventDestroy, "cuEventDestroy_v2", NULL, CUresult, (CUevent))                      \
    X(cuEventRecord, "cuEventRecord", NULL, CUresult, (CUevent, CUstream))                 \
    X(cuEventSynchronize, "cuEventSynchronize", NULL, CUresult, (CUevent))                 \
    X(cuEventElapsedTime, "cuEventElapsedTime_v2", "cuEventElapsedTime", CUresult, (float *, CUevent, CUevent)) \
    X(cuLaunchKernel, "cuLaunchKernel", NULL,                                                \
      CUresult, (CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,   \
                   unsigned, CUstream, void **, void **))

/* Optional entry points (CUDA graphs): absent ones only make bk_graph_supported 0. Only the
 * versioned names are taken where the signature changed: cuStreamBeginCapture (10.0) lacked
 * the mode argument that _v2 has, and the old cuGraphInstantiate had an error-log signature,
 * so cuGraphInstantiateWithFlags (11.4+) is required. */
#define CU_GRAPH_FUNCS(X)                                                                     \
    X(cuStreamBeginCapture, "cuStreamBeginCapture_v2", NULL, CUresult, (CUstream, int))     \
    X(cuStreamEndCapture, "cuStreamEndCapture", NULL, CUresult, (CUstream, CUgraph *))      \
    X(cuGraphInstantiateWithFlags, "cuGraphInstantiateWithFlags", NULL, CUresult,           \
      (CUgraphExec *, CUgraph, unsigned long long))                                         \
    X(cuGraphLaunch, "cuGraphLaunch", NULL, CUresult, (CUgraphExec, CUstream))              \
    X(cuGraphExecDestroy, "cuGraphExecDestroy", NULL, CUresult, (CUgraphExec))              \
    X(cuGraphDestroy, "cuGraphDestroy", NULL, CUresult, (CUgraph))

typedef struct cu_api {
    void *lib;
#define X(field, name, alt, ret, params) ret (*field) params;
    CU_FUNCS(X)
    CU_GRAPH_FUNCS(X)
#undef X
    int have_graph;     /* every CU_GRAPH_FUNCS entry resolved */
} cu_api;

/* ---- NVRTC subset ---- */
typedef int nvrtcResult;
typedef struct _nvrtcProgram *nvrtcProgram;

#define NVRTC_FUNCS(X)                                                                       \
    X(nvrtcVersion, "nvrtcVersion", nvrtcResult, (int *, int *))                              \
    X(nvrtcGetErrorString, "nvrtcGetErrorString", const char *, (nvrtcResult))              \
    X(nvrtcCreateProgram, "nvrtcCreateProgram",                                              \
      nvrtcResult, (nvrtcProgram *, const char *, const char *, int, const char *const *, const char *const *)) \
    X(nvrtcDestroyProgram, "nvrtcDestroyProgram", nvrtcResult, (nvrtcProgram *))           \
    X(nvrtcCompileProgram, "nvrtcCompileProgram", nvrtcResult, (nvrtcProgram, int, const char *const *)) \
    X(nvrtcGetProgramLogSize, "nvrtcGetProgramLogSize", nvrtcResult, (nvrtcProgram, size_t *)) \
    X(nvrtcGetProgramLog, "nvrtcGetProgramLog", nvrtcResult, (nvrtcProgram, char *))       \
    X(nvrtcGetCUBINSize, "nvrtcGetCUBINSize", nvrtcResult, (nvrtcProgram, size_t *))       \
    X(nvrtcGetCUBIN, "nvrtcGetCUBIN", nvrtcResult, (nvrtcProgram, char *))

typedef struct nvrtc_api {
    void *lib;
    char path[256];
    char include[1216]; /* "-I<toolkit>/include" when cuda_bf16.h is found there, else "" */
    int major, minor;
#define X(field, name, ret, params) ret (*field) params;
    NVRTC_FUNCS(X)
#undef X
} nvrtc_api;

typedef struct cu_backend {
    backend base; /* first: a backend* is a cu_backend* */
    cu_api cu;
    nvrtc_api rtc;
    int have_rtc;
    char rtc_err[512]; /* why NVRTC could not be loaded: reported at the first compile */
    CUdevice dev;
    CUcontext ctx;
    CUstream stream;
    char arch[16];
    int driver_version;
    size_t shared_optin;
} cu_backend;

/* ---- library loading ---- */

/* Resolve the driver API. Failure messages say what is missing, so `realm info` on a machine
 * without NVIDIA's driver reads as a diagnosis, not a crash. */
static int cu_load(cu_api *a, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    a->lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!a->lib) {
        snprintf(err, errlen, "CUDA driver libcuda.so.1 not found: %s (is the NVIDIA driver installed?)",
                 dlerror());
        return -1;
    }
#define X(field, name, alt, ret, params)                                                      \
    *(void **)&a->field = dlsym(a->lib, name);                                                \
    if (!a->field && alt) *(void **)&a->field = dlsym(a->lib, alt ? alt : name);              \
    if (!a->field) {                                                                          \
        snprintf(err, errlen, "CUDA driver libcuda.so.1 lacks %s (driver too old?)", name);   \
        dlclose(a->lib);                                                                      \
        a->lib = NULL;                                                                        \
        return -1;                                                                            \
    }
    CU_FUNCS(X)
#undef X
    a->have_graph = 1;
#define X(field, name, alt, ret, params)                                                      \
    *(void **)&a->field = dlsym(a->lib, name);                                                \
    if (!a->field) a->have_graph = 0;
    CU_GRAPH_FUNCS(X)
#undef X
    return 0;
}

static const char *cu_errname(const cu_api *a, CUresult r) {
    const char *s = NULL;
    if (a->cuGetErrorName && a->cuGetErrorName(r, &s) == CUDA_SUCCESS && s) return s;
    return "unknown CUDA error";
}

/* NVRTC does not ship cuda_bf16.h / cuda_fp16.h as built-ins (13.0 does not), so kernels
 * that include them need the toolkit's include directory: look next to the library we
 * loaded (<root>/lib64/libnvrtc.so -> <root>/include), then $CUDA_HOME, /usr/local/cuda. */
static void find_include(nvrtc_api *n) {
    char cand[4][300];
    int nc = 0;
    struct link_map *lm = NULL;
    if (dlinfo(n->lib, RTLD_DI_LINKMAP, &lm) == 0 && lm && lm->l_name && lm->l_name[0] == '/') {
        char dir[256];
        snprintf(dir, sizeof dir, "%s", lm->l_name);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = 0;
        snprintf(cand[nc++], sizeof cand[0], "%s/../include", dir);
        snprintf(cand[nc++], sizeof cand[0], "%s/../../include", dir); /* targets/<triple>/lib */
    }
    const char *home = getenv("CUDA_HOME");
    if (home && *home) snprintf(cand[nc++], sizeof cand[0], "%s/include", home);
    snprintf(cand[nc++], sizeof cand[0], "/usr/local/cuda/include");
    for (int i = 0; i < nc; i++) {
        char probe[1232];
        snprintf(probe, sizeof probe, "%s/cuda_bf16.h", cand[i]);
        if (access(probe, R_OK) == 0) {
            char *real = realpath(cand[i], NULL);
            snprintf(n->include, sizeof n->include, "-I%s", real ? real : cand[i]);
            free(real);
            return;
        }
    }
}

static int nvrtc_load(nvrtc_api *n, char *err, size_t errlen) {
    memset(n, 0, sizeof *n);
    const char *names[] = {"libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2",
                           "libnvrtc.so.11"};
    const char *dirs[] = {getenv("CUDA_HOME"), getenv("CUDA_PATH"), "/usr/local/cuda"};
    const char *subs[] = {"lib64", "targets/x86_64-linux/lib", "lib"};
    char tried[256] = "";
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !n->lib; i++) {
        if ((n->lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL))) snprintf(n->path, sizeof n->path, "%s", names[i]);
        else if (i == 0) snprintf(tried, sizeof tried, "%s", dlerror());
    }
    for (size_t d = 0; d < sizeof dirs / sizeof dirs[0] && !n->lib; d++) {
        if (!dirs[d] || !*dirs[d]) continue;
        for (size_t s = 0; s < sizeof subs / sizeof subs[0] && !n->lib; s++)
            for (size_t i = 0; i < sizeof names / sizeof names[0] && !n->lib; i++) {
                snprintf(n->path, sizeof n->path, "%s/%s/%s", dirs[d], subs[s], names[i]);
                n->lib = dlopen(n->path, RTLD_NOW | RTLD_LOCAL);
            }
    }
    if (!n->lib) {
        n->path[0] = 0;
        snprintf(err, errlen, "NVRTC (libnvrtc.so) not found in the library path, $CUDA_HOME or "
                 "/usr/local/cuda: %s (install the CUDA toolkit's NVRTC, e.g. cuda-nvrtc-12-x)", tried);
        return -1;
    }
#define X(field, name, ret, params)                                                           \
    if (!(*(void **)&n->field = dlsym(n->lib, name))) {                                       \
        snprintf(err, errlen, "NVRTC %s lacks %s (NVRTC 11.1 or newer needed for CUBIN output)", \
                 n->path, name);                                                              \
        dlclose(n->lib);                                                                      \
        n->lib = NULL;                                                                        \
        return -1;                                                                            \
    }
    NVRTC_FUNCS(X)
#undef X
    if (n->nvrtcVersion(&n->major, &n->minor) != 0) {
        snprintf(err, errlen, "NVRTC %s: nvrtcVersion failed", n->path);
        dlclose(n->lib);
        n->lib = NULL;
        return -1;
    }
    find_include(n);
    /* Kept loaded (no dlclose): NVRTC is large, and CI compiles many kernels in one process;
     * dlopen reference-counts, so each later load is cheap. */
    return 0;
}

int cuda_nvrtc_version(int *major, int *minor, char *err, size_t errlen) {
    nvrtc_api n;
    if (nvrtc_load(&n, err, errlen)) return -1;
    *major = n.major;
    *minor = n.minor;
    return 0;
}

/* ---- NVRTC compilation (shared by the backend and compile-only) ---- */

/* Growable text for the NVRTC log plus our own description of what failed. */
typedef struct strbuf { char *s; size_t n, cap; } strbuf;

static void sb_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(strbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int need = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (need < 0) return;
    if (b->n + (size_t)need + 1 > b->cap) {
        size_t cap = b->n + (size_t)need + 1 + 256;
        char *p = realloc(b->s, cap);
        if (!p) return;
        b->s = p;
        b->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(b->s + b->n, b->cap - b->n, fmt, ap);
    va_end(ap);
    b->n += (size_t)need;
}

static int valid_arch(const char *arch) {
    int num = 0;
    char tail[8] = "";
    if (!arch || sscanf(arch, "sm_%d%7s", &num, tail) < 1 || num < 30) return 0;
    return tail[0] == 0 || strcmp(tail, "a") == 0 || strcmp(tail, "f") == 0;
}

/* The kernel that line `line` (1-based) of src belongs to: the last "KERNEL name(" or
 * "__global__ void name(" opening at or before it; "" if none. */
static void kernel_at_line(const char *src, long line, char *name, size_t len) {
    name[0] = 0;
    long at = 1;
    for (const char *l = src; l && *l && at <= line; at++) {
        const char *eol = strchr(l, '\n'), *k = NULL;
        size_t n = eol ? (size_t)(eol - l) : strlen(l);
        if (n > 7 && strncmp(l, "KERNEL ", 7) == 0) k = l + 7;
        const char *g = strstr(l, "__global__ void ");
        if (!k && g && (!eol || g < eol)) k = g + strlen("__global__ void ");
        if (k) {
            while (*k == ' ') k++;
            size_t i = 0;
            while (i + 1 < len && (k[i] == '_' || (k[i] >= 'a' && k[i] <= 'z') || (k[i] >= 'A' && k[i] <= 'Z') ||
                                   (k[i] >= '0' && k[i] <= '9')))
                name[i] = k[i], i++;
            name[i] = 0;
        }
        l = eol ? eol + 1 : NULL;
    }
}

/* "in kernel NAME (line N)" for the kernels NVRTC's log reports errors in (at most 8): a
 * module holds every kernel of a plan, so the line number alone does not say which failed. */
static void name_failed_kernels(const char *src, const char *text, strbuf *log) {
    char seen[8][64];
    int ns = 0;
    const char *tag = "realm_kernels.cu(";
    for (const char *e = text ? strstr(text, tag) : NULL; e && ns < 8; e = strstr(e + 1, tag)) {
        long line = atol(e + strlen(tag));
        const char *close = strstr(e, "): ");
        if (!close || strncmp(close + 3, "error", 5) != 0) continue;
        char name[64];
        kernel_at_line(src, line, name, sizeof name);
        if (!name[0]) continue;
        int dup = 0;
        for (int i = 0; i < ns; i++) dup |= strcmp(seen[i], name) == 0;
        if (dup) continue;
        snprintf(seen[ns++], sizeof seen[0], "%s", name);
        sb_printf(log, "%s kernel %s (line %ld)", ns == 1 ? "\nerrors in" : ",", name, line);
    }
}

/* Compile src for arch. On success *cubin (malloc'd) and *len are set and 0 is returned;
 * log receives NVRTC's log either way and, on failure, first says what failed. */
static int nvrtc_compile(const nvrtc_api *n, const char *src, const char *arch, const char *options,
                         void **cubin, size_t *len, strbuf *log) {
    *cubin = NULL;
    *len = 0;
    if (!valid_arch(arch)) {
        sb_printf(log, "NVRTC: bad target architecture '%s' (want sm_XY, sm_XYa or sm_XYf, e.g. sm_90)",
                  arch ? arch : "(null)");
        return -1;
    }
    /* Split options on whitespace (no quoting: generated options never contain spaces). */
    char *opts = strdup(options ? options : "");
    const char *argv[131];
    int argc = 0, user_arch = 0;
    char archopt[48];
    if (!opts) {
        sb_printf(log, "NVRTC: out of host memory");
        return -1;
    }
    for (char *save = NULL, *tok = strtok_r(opts, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
        if (argc == 128) {
            sb_printf(log, "NVRTC: more than 128 compile options");
            free(opts);
            return -1;
        }
        if (strncmp(tok, "-arch", 5) == 0 || strncmp(tok, "--gpu-architecture", 18) == 0) user_arch = 1;
        argv[argc++] = tok;
    }
    if (!user_arch) {
        /* sm_90 modules may hold wgmma, which only the arch-specific sm_90a target assembles; its
         * CUBIN runs on exactly the sm_90 devices an sm_90 one would */
        const int to_a = cuda_arch_has_wgmma(arch) && arch[strlen(arch) - 1] != 'a';
        snprintf(archopt, sizeof archopt, "--gpu-architecture=%s%s", arch, to_a ? "a" : "");
        argv[argc++] = archopt;
    }
    if (n->include[0]) argv[argc++] = n->include;
    nvrtcProgram prog = NULL;
    int rc = -1;
    nvrtcResult r = n->nvrtcCreateProgram(&prog, src, "realm_kernels.cu", 0, NULL, NULL);
    if (r != 0) {
        sb_printf(log, "NVRTC nvrtcCreateProgram failed: %s (%d)", n->nvrtcGetErrorString(r), r);
        free(opts);
        return -1;
    }
    nvrtcResult cr = n->nvrtcCompileProgram(prog, argc, argv);
    size_t loglen = 0;
    char *text = NULL;
    if (n->nvrtcGetProgramLogSize(prog, &loglen) == 0 && loglen > 1 && (text = malloc(loglen + 1))) {
        if (n->nvrtcGetProgramLog(prog, text) != 0) text[0] = 0;
        text[loglen] = 0;
    }
    if (cr != 0) {
        sb_printf(log, "NVRTC nvrtcCompileProgram failed for %s (NVRTC %d.%d): %s (%d)\noptions:", arch, n->major,
                  n->minor, n->nvrtcGetErrorString(cr), cr);
        for (int i = 0; i < argc; i++) sb_printf(log, " %s", argv[i]);
        name_failed_kernels(src, text, log);
        sb_printf(log, "\nNVRTC log:\n%s", text ? text : "(empty)");
        goto done;
    }
    if (text && *text) sb_printf(log, "%s", text); /* warnings */
    size_t sz = 0;
    if ((r = n->nvrtcGetCUBINSize(prog, &sz)) != 0 || sz == 0) {
        sb_printf(log, "NVRTC nvrtcGetCUBINSize failed: %s (%d)%s", n->nvrtcGetErrorString(r), r,
                  sz == 0 && r == 0 ? " (no CUBIN: was a virtual compute_XY arch given?)" : "");
        goto done;
    }
    void *bin = malloc(sz);
    if (!bin) {
        sb_printf(log, "NVRTC: out of host memory for a %zu-byte CUBIN", sz);
        goto done;
    }
    if ((r = n->nvrtcGetCUBIN(prog, bin)) != 0) {
        sb_printf(log, "NVRTC nvrtcGetCUBIN failed: %s (%d)", n->nvrtcGetErrorString(r), r);
        free(bin);
        goto done;
    }
    *cubin = bin;
    *len = sz;
    rc = 0;
done:
    free(text);
    free(opts);
    n->nvrtcDestroyProgram(&prog);
    return rc;
}

int cuda_compile_only(const char *src, const char *arch, const char *options, void **cubin, size_t *len,
                      char *log, size_t loglen) {
    nvrtc_api n;
    char err[512];
    *cubin = NULL;
    *len = 0;
    if (loglen) log[0] = 0;
    if (!src) {
        snprintf(log, loglen, "cuda_compile_only: source is NULL");
        return -1;
    }
    if (nvrtc_load(&n, err, sizeof err)) {
        snprintf(log, loglen, "%s", err);
        return -1;
    }
    strbuf sb = {0};
    int rc = nvrtc_compile(&n, src, arch, options, cubin, len, &sb);
    snprintf(log, loglen, "%s", sb.s ? sb.s : "");
    free(sb.s);
    return rc;
}

/* ---- device discovery ---- */

static int cu_init(cu_api *a, char *err, size_t errlen) {
    if (cu_load(a, err, errlen)) return -1;
    CUresult r = a->cuInit(0);
    if (r != CUDA_SUCCESS) {
        snprintf(err, errlen, "CUDA cuInit failed: %s (%d)%s", cu_errname(a, r), r,
                 r == CUDA_ERROR_NO_DEVICE ? " (no CUDA-capable GPU visible)" : "");
        return -1;
    }
    return 0;
}

int bk_cuda_device_count(char *err, size_t errlen) {
    cu_api a;
    if (cu_init(&a, err, errlen)) return -1;
    int n = 0;
    CUresult r = a.cuDeviceGetCount(&n);
    if (r != CUDA_SUCCESS) {
        snprintf(err, errlen, "CUDA cuDeviceGetCount failed: %s (%d)", cu_errname(&a, r), r);
        return -1;
    }
    /* The driver stays loaded: it keeps threads and state that outlive cuInit. */
    return n;
}

static int cufail(cu_backend *c, const char *call, CUresult r) {
    bk_set_error(&c->base, "CUDA %s failed: %s (%d)", call, cu_errname(&c->cu, r), r);
    return -1;
}

/* Make our context current on the calling thread; cheap, and lets a backend move between
 * threads or share a thread with another device's backend. */
#define CTX(c, failval)                                                                 \
    do {                                                                                \
        CUresult r_ = (c)->cu.cuCtxSetCurrent((c)->ctx);                                \
        if (r_ != CUDA_SUCCESS) {                                                       \
            cufail(c, "cuCtxSetCurrent", r_);                                           \
            return failval;                                                             \
        }                                                                               \
    } while (0)

static const bk_iface cu_iface;

static void cu_destroy(backend *b) {
    cu_backend *c = (cu_backend *)b;
    if (c->ctx) {
        c->cu.cuCtxSetCurrent(c->ctx);
        if (c->stream) {
            c->cu.cuStreamSynchronize(c->stream);
            c->cu.cuStreamDestroy(c->stream);
        }
        c->cu.cuDevicePrimaryCtxRelease(c->dev);
    }
    free(c);
}

backend *bk_cuda_create(int device, const bk_options *opt, char *err, size_t errlen) {
    cu_backend *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errlen, "CUDA: out of host memory");
        return NULL;
    }
    c->base.iface = &cu_iface;
    c->base.kind = BK_CUDA;
    c->base.device = device;
    if (cu_init(&c->cu, err, errlen)) {
        free(c);
        return NULL;
    }
    cu_api *a = &c->cu;
    int n = 0;
    CUresult r;
    const char *call = "cuDeviceGetCount";
    if ((r = a->cuDeviceGetCount(&n)) != CUDA_SUCCESS) goto fail;
    if (device >= n) {
        snprintf(err, errlen, "CUDA device %d does not exist (%d device%s found)", device, n, n == 1 ? "" : "s");
        free(c);
        return NULL;
    }
    call = "cuDeviceGet";
    if ((r = a->cuDeviceGet(&c->dev, device)) != CUDA_SUCCESS) goto fail;
    /* The primary context is the one the runtime API and other libraries use, so sharing it
     * keeps one context (and its memory reservation) per device in the process. */
    call = "cuDevicePrimaryCtxRetain";
    if ((r = a->cuDevicePrimaryCtxRetain(&c->ctx, c->dev)) != CUDA_SUCCESS) goto fail;
    call = "cuCtxSetCurrent";
    if ((r = a->cuCtxSetCurrent(c->ctx)) != CUDA_SUCCESS) goto fail;
    /* Non-blocking: our default stream must not serialise against the legacy NULL stream,
     * or a transfer stream could never overlap with compute. */
    call = "cuStreamCreate";
    if ((r = a->cuStreamCreate(&c->stream, CU_STREAM_NON_BLOCKING)) != CUDA_SUCCESS) goto fail;
    call = "cuDriverGetVersion";
    if ((r = a->cuDriverGetVersion(&c->driver_version)) != CUDA_SUCCESS) goto fail;

    bk_device_info *in = &c->base.info;
    call = "cuDeviceGetName";
    if ((r = a->cuDeviceGetName(in->name, (int)sizeof in->name, c->dev)) != CUDA_SUCCESS) goto fail;
    struct { int attr; int *out; const char *name; } attrs[] = {
        {CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, &in->cc_major, "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)"},
        {CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, &in->cc_minor, "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)"},
        {CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, &in->compute_units, "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)"},
        {CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, &in->max_threads_per_block, "cuDeviceGetAttribute(MAX_THREADS_PER_BLOCK)"},
        {CU_DEVICE_ATTRIBUTE_WARP_SIZE, &in->warp_size, "cuDeviceGetAttribute(WARP_SIZE)"},
        {CU_DEVICE_ATTRIBUTE_INTEGRATED, &in->unified_memory, "cuDeviceGetAttribute(INTEGRATED)"},
    };
    for (size_t i = 0; i < sizeof attrs / sizeof attrs[0]; i++) {
        call = attrs[i].name;
        if ((r = a->cuDeviceGetAttribute(attrs[i].out, attrs[i].attr, c->dev)) != CUDA_SUCCESS) goto fail;
    }
    int shared = 0, optin = 0;
    call = "cuDeviceGetAttribute(MAX_SHARED_MEMORY_PER_BLOCK)";
    if ((r = a->cuDeviceGetAttribute(&shared, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK, c->dev))) goto fail;
    call = "cuDeviceGetAttribute(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)";
    if ((r = a->cuDeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, c->dev))) goto fail;
    c->shared_optin = (size_t)(optin > shared ? optin : shared);
    in->max_shared_per_block = c->shared_optin;
    call = "cuDeviceTotalMem";
    if ((r = a->cuDeviceTotalMem(&in->mem_total, c->dev)) != CUDA_SUCCESS) goto fail;
    in->max_alloc = in->mem_total;
    snprintf(c->arch, sizeof c->arch, "sm_%d%d", in->cc_major, in->cc_minor);
    snprintf(in->arch, sizeof in->arch, "%s", c->arch);
    snprintf(in->vendor, sizeof in->vendor, "NVIDIA");
    snprintf(in->driver_version, sizeof in->driver_version, "%d.%d", c->driver_version / 1000,
             (c->driver_version % 1000) / 10);
    snprintf(in->platform, sizeof in->platform, "CUDA driver API");
    /* A missing NVRTC leaves a backend that can move memory but not compile: reported at the
     * first compile, so `realm info` can still describe the device. */
    c->have_rtc = nvrtc_load(&c->rtc, c->rtc_err, sizeof c->rtc_err) == 0;
    if (c->have_rtc) snprintf(in->compiler, sizeof in->compiler, "NVRTC %d.%d", c->rtc.major, c->rtc.minor);
    else snprintf(in->compiler, sizeof in->compiler, "NVRTC missing");
    bk_setup_cache(&c->base, opt);
    return &c->base;
fail:
    snprintf(err, errlen, "CUDA %s failed: %s (%d)", call, cu_errname(a, r), r);
    cu_destroy(&c->base);
    return NULL;
}

/* ---- queries ---- */

static int cu_mem_info(backend *b, size_t *free_bytes, size_t *total_bytes) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    CUresult r = c->cu.cuMemGetInfo(free_bytes, total_bytes);
    return r == CUDA_SUCCESS ? 0 : cufail(c, "cuMemGetInfo", r);
}

static int cu_supports_dtype(backend *b, bk_dtype dt) {
    return cuda_arch_supports_dtype(((cu_backend *)b)->arch, dt);
}

/* ---- programs ---- */

static void cu_module_free(backend *b, bk_module *m) {
    cu_backend *c = (cu_backend *)b;
    while (m->kernels) {
        bk_kernel *k = m->kernels;
        m->kernels = k->next;
        free(k->name);
        free(k);
    }
    if (m->h && c->cu.cuCtxSetCurrent(c->ctx) == CUDA_SUCCESS) c->cu.cuModuleUnload((CUmodule)m->h);
    free(m);
}

static bk_kernel *cu_kernel(backend *b, bk_module *m, const char *name) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, NULL);
    CUfunction f = NULL;
    CUresult r = c->cu.cuModuleGetFunction(&f, (CUmodule)m->h, name);
    if (r != CUDA_SUCCESS) {
        cufail(c, "cuModuleGetFunction", r);
        bk_append_error(b, " for kernel '%s' (is it declared extern \"C\" __global__?)", name);
        return NULL;
    }
    bk_kernel *k = calloc(1, sizeof *k);
    char *nm = strdup(name);
    if (!k || !nm) {
        free(k);
        free(nm);
        bk_set_error(b, "CUDA kernel '%s': out of host memory", name);
        return NULL;
    }
    k->name = nm;
    k->h = f;
    k->next = m->kernels;
    m->kernels = k;
    return k;
}

static bk_module *cu_compile(backend *b, const char *src, const char *options, const char *const *names) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, NULL);
    if (!c->have_rtc) {
        bk_set_error(b, "CUDA compile: %s", c->rtc_err);
        return NULL;
    }
    bk_module *m = calloc(1, sizeof *m);
    if (!m) {
        bk_set_error(b, "CUDA compile: out of host memory");
        return NULL;
    }
    char rtcver[32], drv[32];
    snprintf(rtcver, sizeof rtcver, "%d.%d", c->rtc.major, c->rtc.minor);
    snprintf(drv, sizeof drv, "%d", c->driver_version);
    uint8_t key[32];
    kcache_key k;
    kcache_key_init(&k, "cuda-cubin");
    kcache_key_str(&k, src);
    kcache_key_str(&k, options);
    kcache_key_str(&k, c->arch);
    kcache_key_str(&k, rtcver);
    kcache_key_str(&k, drv);
    kcache_key_final(&k, key);

    CUmodule mod = NULL;
    CUresult r;
    if (b->cache_dir[0]) {
        void *bin = NULL;
        size_t len = 0;
        char err[512];
        kcache_status st = kcache_get(b->cache_dir, key, &bin, &len, err, sizeof err);
        if (st == KC_HIT) {
            if ((r = c->cu.cuModuleLoadData(&mod, bin)) != CUDA_SUCCESS) {
                mod = NULL;
                b->stats.cache_rejected++;
                snprintf(b->stats.last_cache_error, sizeof b->stats.last_cache_error,
                         "CUDA cuModuleLoadData rejected a cached CUBIN: %s; rebuilt", cu_errname(&c->cu, r));
            }
        } else if (st == KC_BAD) {
            b->stats.cache_rejected++;
            snprintf(b->stats.last_cache_error, sizeof b->stats.last_cache_error, "%s", err);
        }
        free(bin);
    }
    if (mod) {
        b->stats.cache_hits++;
        m->from_cache = 1;
    } else {
        b->stats.cache_misses++;
        b->stats.compiles++;
        void *cubin = NULL;
        size_t len = 0;
        strbuf log = {0};
        if (nvrtc_compile(&c->rtc, src, c->arch, options, &cubin, &len, &log)) {
            bk_set_error(b, "%s", log.s ? log.s : "NVRTC compile failed (no log)");
            free(log.s);
            free(m);
            return NULL;
        }
        free(log.s);
        r = c->cu.cuModuleLoadData(&mod, cubin);
        if (r != CUDA_SUCCESS) {
            cufail(c, "cuModuleLoadData", r);
            bk_append_error(b, " (a %zu-byte CUBIN for %s)", len, c->arch);
            free(cubin);
            free(m);
            return NULL;
        }
        char err[512];
        if (b->cache_dir[0] && kcache_put(b->cache_dir, key, cubin, len, err, sizeof err)) {
            b->stats.cache_write_errors++;
            snprintf(b->stats.last_cache_error, sizeof b->stats.last_cache_error, "%s", err);
        }
        free(cubin);
    }
    m->h = mod;
    for (const char *const *n = names; n && *n; n++)
        if (!cu_kernel(b, m, *n)) {
            cu_module_free(b, m);
            return NULL;
        }
    return m;
}

/* ---- memory ---- */

static bk_buf *cu_alloc(backend *b, size_t bytes) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, NULL);
    bk_buf *buf = calloc(1, sizeof *buf);
    if (!buf) {
        bk_set_error(b, "CUDA alloc: out of host memory");
        return NULL;
    }
    CUdeviceptr p = 0;
    CUresult r = c->cu.cuMemAlloc(&p, bytes);
    if (r != CUDA_SUCCESS) {
        cufail(c, "cuMemAlloc", r);
        bk_append_error(b, " (%zu bytes)", bytes);
        free(buf);
        return NULL;
    }
    buf->size = bytes;
    buf->h = (uintptr_t)p;
    return buf;
}

static void cu_free(backend *b, bk_buf *buf) {
    cu_backend *c = (cu_backend *)b;
    if (c->cu.cuCtxSetCurrent(c->ctx) == CUDA_SUCCESS) c->cu.cuMemFree((CUdeviceptr)buf->h);
    free(buf);
}

static void *cu_host_alloc(backend *b, size_t bytes) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, NULL);
    void *p = NULL;
    CUresult r = c->cu.cuMemAllocHost(&p, bytes);
    if (r != CUDA_SUCCESS) {
        cufail(c, "cuMemAllocHost", r);
        bk_append_error(b, " (%zu bytes)", bytes);
        return NULL;
    }
    return p;
}

static void cu_host_free(backend *b, void *p) {
    cu_backend *c = (cu_backend *)b;
    if (c->cu.cuCtxSetCurrent(c->ctx) == CUDA_SUCCESS) c->cu.cuMemFreeHost(p);
}

static CUstream sof(cu_backend *c, bk_stream *s) { return s ? (CUstream)s->h : c->stream; }

static int finish(cu_backend *c, bk_stream *s, int async) {
    if (async) return 0;
    CUresult r = c->cu.cuStreamSynchronize(sof(c, s));
    return r == CUDA_SUCCESS ? 0 : cufail(c, "cuStreamSynchronize", r);
}

static int cu_upload(backend *b, bk_stream *s, bk_buf *dst, size_t off, const void *src, size_t n, int async) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    CUresult r = c->cu.cuMemcpyHtoDAsync((CUdeviceptr)dst->h + off, src, n, sof(c, s));
    return r == CUDA_SUCCESS ? finish(c, s, async) : cufail(c, "cuMemcpyHtoDAsync", r);
}

static int cu_download(backend *b, bk_stream *s, void *dst, bk_buf *src, size_t off, size_t n, int async) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    CUresult r = c->cu.cuMemcpyDtoHAsync(dst, (CUdeviceptr)src->h + off, n, sof(c, s));
    return r == CUDA_SUCCESS ? finish(c, s, async) : cufail(c, "cuMemcpyDtoHAsync", r);
}

static int cu_copy(backend *b, bk_stream *s, bk_buf *dst, size_t doff, bk_buf *src, size_t soff, size_t n) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    CUresult r = c->cu.cuMemcpyDtoDAsync((CUdeviceptr)dst->h + doff, (CUdeviceptr)src->h + soff, n, sof(c, s));
    return r == CUDA_SUCCESS ? 0 : cufail(c, "cuMemcpyDtoDAsync", r);
}

/* ---- execution ---- */

static int cu_launch(backend *b, bk_stream *s, bk_kernel *k, const size_t grid[3], const size_t block[3],
                     size_t shared, const bk_arg *args, int nargs) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    /* cuLaunchKernel takes a pointer to each argument's value; keep the values in one array
     * whose slots are wide enough for any arg type. */
    union { CUdeviceptr p; int64_t l; int32_t i; float f; } vals[BK_MAX_ARGS];
    void *params[BK_MAX_ARGS];
    for (int i = 0; i < nargs; i++) {
        switch (args[i].type) {
        case BK_ARG_BUF: vals[i].p = (CUdeviceptr)args[i].v.buf->h; break;
        case BK_ARG_I64: vals[i].l = args[i].v.i64; break;
        case BK_ARG_I32: vals[i].i = args[i].v.i32; break;
        default: vals[i].f = args[i].v.f32; break;
        }
        params[i] = &vals[i];
    }
    for (int d = 0; d < 3; d++)
        if (grid[d] > 0x7fffffffu || block[d] > 1024) {
            bk_set_error(b, "CUDA launch of %s: grid %zu or block %zu too large in dimension %d", k->name,
                         grid[d], block[d], d);
            return -1;
        }
    if (shared > c->shared_optin) {
        bk_set_error(b, "CUDA launch of %s: %zu bytes of shared memory exceed the device's %zu", k->name,
                     shared, c->shared_optin);
        return -1;
    }
    CUresult r;
    /* The default cap on dynamic shared memory is 48 KiB less the kernel's static arrays, so a
     * kernel with both may need the opt-in below 48 KiB of dynamic memory too: always ask. */
    if (shared > 0 &&
        (r = c->cu.cuFuncSetAttribute((CUfunction)k->h, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                      (int)shared)) != CUDA_SUCCESS) {
        cufail(c, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)", r);
        bk_append_error(b, " (kernel %s, %zu bytes)", k->name, shared);
        return -1;
    }
    r = c->cu.cuLaunchKernel((CUfunction)k->h, (unsigned)grid[0], (unsigned)grid[1], (unsigned)grid[2],
                             (unsigned)block[0], (unsigned)block[1], (unsigned)block[2], (unsigned)shared,
                             sof(c, s), nargs ? params : NULL, NULL);
    if (r != CUDA_SUCCESS) {
        cufail(c, "cuLaunchKernel", r);
        bk_append_error(b, " (kernel %s, grid %zux%zux%zu, block %zux%zux%zu, shared %zu)", k->name, grid[0],
                        grid[1], grid[2], block[0], block[1], block[2], shared);
        return -1;
    }
    return 0;
}

static bk_stream *cu_stream_create(backend *b) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, NULL);
    bk_stream *s = calloc(1, sizeof *s);
    if (!s) {
        bk_set_error(b, "CUDA stream: out of host memory");
        return NULL;
    }
    CUstream st = NULL;
    CUresult r = c->cu.cuStreamCreate(&st, CU_STREAM_NON_BLOCKING);
    if (r != CUDA_SUCCESS) {
        cufail(c, "cuStreamCreate", r);
        free(s);
        return NULL;
    }
    s->h = st;
    return s;
}

static void cu_stream_destroy(backend *b, bk_stream *s) {
    cu_backend *c = (cu_backend *)b;
    if (c->cu.cuCtxSetCurrent(c->ctx) == CUDA_SUCCESS) {
        c->cu.cuStreamSynchronize((CUstream)s->h);
        c->cu.cuStreamDestroy((CUstream)s->h);
    }
    free(s);
}

static bk_event *cu_event_create(backend *b) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, NULL);
    bk_event *e = calloc(1, sizeof *e);
    if (!e) {
        bk_set_error(b, "CUDA event: out of host memory");
        return NULL;
    }
    CUevent ev = NULL;
    CUresult r = c->cu.cuEventCreate(&ev, CU_EVENT_DEFAULT);
    if (r != CUDA_SUCCESS) {
        cufail(c, "cuEventCreate", r);
        free(e);
        return NULL;
    }
    e->h = ev;
    return e;
}

static void cu_event_destroy(backend *b, bk_event *e) {
    cu_backend *c = (cu_backend *)b;
    if (c->cu.cuCtxSetCurrent(c->ctx) == CUDA_SUCCESS) c->cu.cuEventDestroy((CUevent)e->h);
    free(e);
}

static int cu_event_record(backend *b, bk_event *e, bk_stream *s) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    CUresult r = c->cu.cuEventRecord((CUevent)e->h, sof(c, s));
    if (r != CUDA_SUCCESS) return cufail(c, "cuEventRecord", r);
    e->recorded = 1;
    return 0;
}

static int cu_event_sync(backend *b, bk_event *e) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    CUresult r = c->cu.cuEventSynchronize((CUevent)e->h);
    return r == CUDA_SUCCESS ? 0 : cufail(c, "cuEventSynchronize", r);
}

static int cu_stream_wait_event(backend *b, bk_stream *s, bk_event *e) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    CUresult r = c->cu.cuStreamWaitEvent(sof(c, s), (CUevent)e->h, 0);
    return r == CUDA_SUCCESS ? 0 : cufail(c, "cuStreamWaitEvent", r);
}

static int cu_event_elapsed_ms(backend *b, bk_event *start, bk_event *end, double *ms) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    CUresult r = c->cu.cuEventSynchronize((CUevent)end->h);
    if (r != CUDA_SUCCESS) return cufail(c, "cuEventSynchronize", r);
    float f = 0;
    r = c->cu.cuEventElapsedTime(&f, (CUevent)start->h, (CUevent)end->h);
    if (r != CUDA_SUCCESS) return cufail(c, "cuEventElapsedTime", r);
    *ms = f;
    return 0;
}

static int cu_sync(backend *b, bk_stream *s) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    return finish(c, s, 0);
}

/* ---- graphs ---- */

static int cu_graph_supported(backend *b) { return ((cu_backend *)b)->cu.have_graph; }

static int cu_graph_begin(backend *b, bk_stream *s) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    /* Thread-local mode: only this thread's unsafe calls (a sync, a blocking copy) invalidate
     * the capture; another thread's backend is left alone. */
    CUresult r = c->cu.cuStreamBeginCapture(sof(c, s), CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
    return r == CUDA_SUCCESS ? 0 : cufail(c, "cuStreamBeginCapture_v2", r);
}

static bk_graph *cu_graph_end(backend *b, bk_stream *s) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, NULL);
    CUgraph g = NULL;
    CUresult r = c->cu.cuStreamEndCapture(sof(c, s), &g);
    if (r != CUDA_SUCCESS) {
        if (g) c->cu.cuGraphDestroy(g);
        cufail(c, "cuStreamEndCapture", r);
        return NULL;
    }
    if (!g) {
        bk_set_error(b, "CUDA cuStreamEndCapture returned no graph");
        return NULL;
    }
    CUgraphExec e = NULL;
    r = c->cu.cuGraphInstantiateWithFlags(&e, g, 0);
    if (r != CUDA_SUCCESS) {
        c->cu.cuGraphDestroy(g);
        cufail(c, "cuGraphInstantiateWithFlags", r);
        return NULL;
    }
    bk_graph *bg = calloc(1, sizeof *bg);
    if (!bg) {
        c->cu.cuGraphExecDestroy(e);
        c->cu.cuGraphDestroy(g);
        bk_set_error(b, "CUDA graph: out of host memory");
        return NULL;
    }
    bg->h = g;
    bg->exec = e;
    return bg;
}

static int cu_graph_launch(backend *b, bk_graph *g, bk_stream *s) {
    cu_backend *c = (cu_backend *)b;
    CTX(c, -1);
    CUresult r = c->cu.cuGraphLaunch((CUgraphExec)g->exec, sof(c, s));
    return r == CUDA_SUCCESS ? 0 : cufail(c, "cuGraphLaunch", r);
}

static void cu_graph_free(backend *b, bk_graph *g) {
    cu_backend *c = (cu_backend *)b;
    if (c->cu.cuCtxSetCurrent(c->ctx) == CUDA_SUCCESS) {
        if (g->exec) c->cu.cuGraphExecDestroy((CUgraphExec)g->exec);
        if (g->h) c->cu.cuGraphDestroy((CUgraph)g->h);
    }
    free(g);
}

static const bk_iface cu_iface = {
    .destroy = cu_destroy,
    .mem_info = cu_mem_info,
    .supports_dtype = cu_supports_dtype,
    .compile = cu_compile,
    .module_free = cu_module_free,
    .kernel = cu_kernel,
    .alloc = cu_alloc,
    .free = cu_free,
    .host_alloc = cu_host_alloc,
    .host_free = cu_host_free,
    .upload = cu_upload,
    .download = cu_download,
    .copy = cu_copy,
    .launch = cu_launch,
    .stream_create = cu_stream_create,
    .stream_destroy = cu_stream_destroy,
    .event_create = cu_event_create,
    .event_destroy = cu_event_destroy,
    .event_record = cu_event_record,
    .event_sync = cu_event_sync,
    .stream_wait_event = cu_stream_wait_event,
    .event_elapsed_ms = cu_event_elapsed_ms,
    .sync = cu_sync,
    .graph_supported = cu_graph_supported,
    .graph_begin = cu_graph_begin,
    .graph_end = cu_graph_end,
    .graph_launch = cu_graph_launch,
    .graph_free = cu_graph_free,
};
