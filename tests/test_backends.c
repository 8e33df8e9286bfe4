/* Backends: OpenCL end to end on whatever OpenCL device is present (PoCL in CI), the kernel
 * cache (hits, damaged entries, disabled), CUDA compile-only through NVRTC for the CI
 * architectures, and CUDA's behaviour on a machine without a GPU (or, under REALM_GPU=1,
 * a real run on the GPU). A missing PoCL or NVRTC fails unless REALM_ALLOW_MISSING_BACKEND=1. */
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "kcache.h"
#include "test.h"

static int env_on(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

/* A backend that is absent here: fine only when the environment says so. Returns 1 when the
 * test should end quietly, 0 after recording a failure. */
static int missing_ok(tctx *t, const char *what, const char *why) {
    if (env_on("REALM_ALLOW_MISSING_BACKEND")) {
        printf("     (%s: %s unavailable, allowed by REALM_ALLOW_MISSING_BACKEND: %s)\n", t->name, what, why);
        return 1;
    }
    t_fail(t, __FILE__, __LINE__, "%s unavailable: %s (set REALM_ALLOW_MISSING_BACKEND=1 to allow)", what, why);
    return 0;
}

/* A fresh cache directory per test, removed at the end. */
typedef struct tmpdir { char path[64]; } tmpdir;

static int tmpdir_make(tmpdir *d) {
    snprintf(d->path, sizeof d->path, "/tmp/realm-bk-XXXXXX");
    return mkdtemp(d->path) ? 0 : -1;
}

static void tmpdir_remove(tmpdir *d) {
    DIR *dir = opendir(d->path);
    if (!dir) return;
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (e->d_name[0] == '.' && (!e->d_name[1] || (e->d_name[1] == '.' && !e->d_name[2]))) continue;
        char p[512];
        snprintf(p, sizeof p, "%s/%s", d->path, e->d_name);
        unlink(p);
    }
    closedir(dir);
    rmdir(d->path);
}

/* Cache entries (*.kc) in dir; the first one's path goes to first. */
static int count_entries(const char *dir, char *first, size_t firstlen) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l > 3 && strcmp(e->d_name + l - 3, ".kc") == 0) {
            if (n == 0 && first) snprintf(first, firstlen, "%s/%s", dir, e->d_name);
            n++;
        }
    }
    closedir(d);
    return n;
}

static int flip_byte(const char *path, long pos_from_end) {
    FILE *f = fopen(path, "r+b");
    if (!f) return -1;
    int c;
    int rc = -1;
    if (fseek(f, -pos_from_end, SEEK_END) == 0 && (c = fgetc(f)) != EOF && fseek(f, -1, SEEK_CUR) == 0 &&
        fputc(c ^ 0x5a, f) != EOF)
        rc = 0;
    if (fclose(f) != 0) rc = -1;
    return rc;
}

/* ---- kernels ---- */

/* Plan-style kernel: one arena, element offsets as int64. */
static const char *OCL_SAXPY =
    "__kernel void saxpy(__global float *arena, long x, long y, long out, long n, float a) {\n"
    "    long i = get_global_id(0);\n"
    "    if (i < n) arena[out + i] = a * arena[x + i] + arena[y + i];\n"
    "}\n";

static const char *CUDA_SAXPY =
    "#include <cuda_bf16.h>\n"
    "extern \"C\" __global__ void saxpy(float *arena, long long x, long long y, long long out,\n"
    "                                   long long n, float a) {\n"
    "    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
    "    if (i < n) arena[out + i] = a * arena[x + i] + arena[y + i];\n"
    "}\n"
    "extern \"C\" __global__ void scale_bf16(__nv_bfloat16 *p, long long n, float s) {\n"
    "    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
    "    if (i < n) p[i] = __float2bfloat16(__bfloat162float(p[i]) * s);\n"
    "}\n";

/* Run saxpy from module m on fresh random data at awkward offsets in a NaN-poisoned arena;
 * checks the result against fp64 and that nothing outside the output range was written. */
static void run_saxpy(tctx *t, backend *b, bk_module *m) {
    bk_kernel *k = bk_kernel_get(b, m, "saxpy");
    CHECK(k, "kernel saxpy: %s", bk_error(b));
    long n = t_randint(t, 1000, 5000);
    long x = t_randint(t, 0, 17), y = x + n + t_randint(t, 0, 9), out = y + n + t_randint(t, 1, 9);
    long total = out + n + t_randint(t, 1, 33);
    float a = (float)t_normal(t);
    float *host = malloc(sizeof(float) * (size_t)total);
    double *got = malloc(sizeof(double) * (size_t)n), *want = malloc(sizeof(double) * (size_t)n);
    bk_buf *arena = NULL;
    int ok = host && got && want;
    if (ok) {
        for (long i = 0; i < total; i++) host[i] = NAN;
        for (long i = 0; i < n; i++) {
            host[x + i] = (float)t_normal(t);
            host[y + i] = (float)t_normal(t);
            want[i] = (double)a * host[x + i] + host[y + i];
        }
    }
    char why[600] = "";
    if (!ok) snprintf(why, sizeof why, "out of host memory");
    else if (!(arena = bk_alloc(b, sizeof(float) * (size_t)total)) ||
             bk_upload(b, arena, 0, host, sizeof(float) * (size_t)total)) {
        snprintf(why, sizeof why, "alloc/upload: %s", bk_error(b));
    } else {
        bk_arg args[] = {BK_BUF(arena), BK_I64(x), BK_I64(y), BK_I64(out), BK_I64(n), BK_F32(a)};
        size_t block[3] = {64, 1, 1}, grid[3] = {(size_t)(n + 63) / 64, 1, 1};
        if (bk_launch(b, NULL, k, grid, block, 0, args, 6) || bk_sync(b, NULL) ||
            bk_download(b, host, arena, 0, sizeof(float) * (size_t)total))
            snprintf(why, sizeof why, "launch/download: %s", bk_error(b));
    }
    double err = INFINITY;
    long stray = -1;
    if (!why[0]) {
        for (long i = 0; i < n; i++) got[i] = host[out + i];
        err = t_relerr(got, want, n);
        for (long i = out + n; i < total && stray < 0; i++)
            if (!isnan(host[i])) stray = i;
        for (long i = y + n; i < out && stray < 0; i++)
            if (!isnan(host[i])) stray = i;
    }
    bk_free(b, arena);
    free(host);
    free(got);
    free(want);
    CHECK(!why[0], "%s", why);
    CHECK(err <= 1e-6, "saxpy n=%ld: relative error %g > 1e-6", n, err);
    CHECK(stray < 0, "saxpy wrote outside its output range (element %ld)", stray);
}

static backend *open_opencl(tctx *t, const char *cache_dir, int no_cache) {
    bk_options opt = {.cache_dir = cache_dir, .no_cache = no_cache};
    char err[1024] = "";
    /* REALM_TEST_OPENCL_DEVICE picks another device, e.g. NVIDIA's OpenCL next to PoCL. */
    const char *dev = getenv("REALM_TEST_OPENCL_DEVICE");
    backend *b = bk_create(BK_OPENCL, dev && *dev ? atoi(dev) : 0, &opt, err, sizeof err);
    if (!b) missing_ok(t, "OpenCL (PoCL)", err);
    return b;
}

/* ---- kcache on its own ---- */

TEST(backend_kcache_entries) {
    tmpdir d;
    CHECK(tmpdir_make(&d) == 0, "mkdtemp failed");
    char dir[1024], err[512] = "";
    int rc = kcache_dir(d.path, 0, dir, sizeof dir, err, sizeof err);
    uint8_t key[32], key2[32];
    kcache_key k;
    kcache_key_init(&k, "test");
    kcache_key_str(&k, "ab");
    kcache_key_str(&k, "c");
    kcache_key_final(&k, key);
    kcache_key_init(&k, "test");
    kcache_key_str(&k, "a");
    kcache_key_str(&k, "bc");
    kcache_key_final(&k, key2);
    size_t n = (size_t)t_randint(t, 1, 5000);
    unsigned char *payload = malloc(n);
    for (size_t i = 0; i < n && payload; i++) payload[i] = (unsigned char)t_next(t);
    void *data = NULL;
    size_t len = 0;
    char path[1200];
    kcache_path(dir, key, path, sizeof path);
    kcache_status miss = kcache_get(dir, key, &data, &len, err, sizeof err);
    int put = kcache_put(dir, key, payload, n, err, sizeof err);
    kcache_status hit = kcache_get(dir, key, &data, &len, err, sizeof err);
    int same = hit == KC_HIT && len == n && payload && memcmp(data, payload, n) == 0;
    free(data);
    int flipped = flip_byte(path, (long)t_randint(t, 1, (long)n));
    kcache_status bad1 = kcache_get(dir, key, &data, &len, err, sizeof err);
    free(data);
    int truncated = truncate(path, 40);
    kcache_status bad2 = kcache_get(dir, key, &data, &len, err, sizeof err);
    free(data);
    int reput = kcache_put(dir, key, payload, n, err, sizeof err);
    kcache_status hit2 = kcache_get(dir, key, &data, &len, err, sizeof err);
    free(data);
    free(payload);
    int entries = count_entries(dir, NULL, 0);
    tmpdir_remove(&d);
    CHECK(rc == 0, "kcache_dir: %s", err);
    CHECK(memcmp(key, key2, 32) != 0, "key parts are not length-prefixed: (ab,c) == (a,bc)");
    CHECK(miss == KC_MISS, "empty cache gave status %d", (int)miss);
    CHECK(put == 0, "kcache_put: %s", err);
    CHECK(same, "cache round trip of %zu bytes differs (status %d, len %zu)", n, (int)hit, len);
    CHECK(flipped == 0 && bad1 == KC_BAD, "a flipped payload byte was not detected (status %d)", (int)bad1);
    CHECK(truncated == 0 && bad2 == KC_BAD, "a truncated entry was not detected (status %d)", (int)bad2);
    CHECK(reput == 0 && hit2 == KC_HIT, "rewriting a damaged entry did not repair it");
    CHECK(entries == 1, "%d entries after rewrites (temp files left behind?)", entries);

    /* Disabled by option and by environment. */
    char dis[64];
    CHECK(kcache_dir(NULL, 1, dis, sizeof dis, err, sizeof err) == 1 && dis[0] == 0, "disable flag ignored");
    const char *old = getenv("REALM_NO_CACHE");
    char saved[64] = "";
    if (old) snprintf(saved, sizeof saved, "%s", old);
    setenv("REALM_NO_CACHE", "1", 1);
    rc = kcache_dir(NULL, 0, dis, sizeof dis, err, sizeof err);
    if (old) setenv("REALM_NO_CACHE", saved, 1);
    else unsetenv("REALM_NO_CACHE");
    CHECK(rc == 1, "REALM_NO_CACHE=1 did not disable the cache");
}

/* ---- OpenCL ---- */

TEST(backend_opencl_saxpy) {
    tmpdir d;
    CHECK(tmpdir_make(&d) == 0, "mkdtemp failed");
    backend *b = open_opencl(t, d.path, 0);
    if (!b) {
        tmpdir_remove(&d);
        return;
    }
    bk_device_info info = *bk_info(b), *in = &info;
    size_t fr = 0, tot = 0;
    int mi = bk_mem_info(b, &fr, &tot);
    const char *names[] = {"saxpy", NULL};
    bk_module *m = bk_compile(b, OCL_SAXPY, "-cl-std=CL1.2", names);
    if (m) run_saxpy(t, b, m);
    char e[1024];
    snprintf(e, sizeof e, "%s", bk_error(b));
    bk_module_free(b, m);
    int f32 = bk_supports_dtype(b, BK_F32), bf16 = bk_supports_dtype(b, BK_BF16);
    bk_destroy(b);
    tmpdir_remove(&d);
    if (t->failed) return;
    CHECK(m, "compile: %s", e);
    CHECK(mi == 0 && tot > 0 && tot == in->mem_total && fr <= tot, "mem_info: free %zu total %zu", fr, tot);
    CHECK(in->name[0] && strstr(in->arch, "OpenCL"), "device info: name '%s' arch '%s'", in->name, in->arch);
    CHECK(f32 == 1 && bf16 == 0, "dtypes: f32 %d bf16 %d (OpenCL: f32 only)", f32, bf16);
}

/* Pinned memory, async copies on a second stream, cross-stream waits, event timing. */
static void check_streams(tctx *t, backend *b) {
    long n = t_randint(t, 1000, 3000);
    size_t bytes = sizeof(float) * (size_t)n;
    float *pin = bk_host_alloc(b, bytes), *back = bk_host_alloc(b, bytes);
    bk_buf *src = bk_alloc(b, bytes), *dst = bk_alloc(b, bytes);
    bk_stream *s = bk_stream_create(b);
    bk_event *e0 = bk_event_create(b), *e1 = bk_event_create(b), *up = bk_event_create(b);
    char why[1024] = "";
    double ms = -1;
    long bad = -1;
    if (!pin || !back || !src || !dst || !s || !e0 || !e1 || !up) {
        snprintf(why, sizeof why, "setup: %s", bk_error(b));
    } else {
        for (long i = 0; i < n; i++) {
            pin[i] = (float)t_normal(t);
            back[i] = NAN;
        }
        /* upload on the side stream; the default stream waits for it, copies, times the copy */
        if (bk_upload_async(b, s, src, 0, pin, bytes) || bk_event_record(b, up, s) ||
            bk_stream_wait_event(b, NULL, up) || bk_event_record(b, e0, NULL) ||
            bk_copy(b, NULL, dst, 0, src, 0, bytes) || bk_event_record(b, e1, NULL) ||
            bk_download_async(b, NULL, back, dst, 0, bytes) || bk_sync_all(b) ||
            bk_event_elapsed_ms(b, e0, e1, &ms) || bk_event_sync(b, e1))
            snprintf(why, sizeof why, "%s", bk_error(b));
        for (long i = 0; i < n && !why[0] && bad < 0; i++)
            if (back[i] != pin[i]) bad = i;
    }
    /* A range past the end must be refused, not passed to the driver. */
    int oob = src ? bk_upload(b, src, bytes - 4, pin, 8) : -1;
    char oobmsg[256];
    snprintf(oobmsg, sizeof oobmsg, "%s", bk_error(b));
    bk_event_destroy(b, e0);
    bk_event_destroy(b, e1);
    bk_event_destroy(b, up);
    bk_stream_destroy(b, s);
    bk_free(b, src);
    bk_free(b, dst);
    bk_host_free(b, pin);
    bk_host_free(b, back);
    CHECK(!why[0], "%s", why);
    CHECK(bad < 0, "round trip through two streams differs at element %ld", bad);
    CHECK(ms >= 0 && ms < 10000, "event elapsed time %g ms", ms);
    CHECK(oob == -1 && strstr(oobmsg, "outside"), "out-of-range upload: rc %d, '%s'", oob, oobmsg);
}

TEST(backend_opencl_streams_events) {
    backend *b = open_opencl(t, NULL, 1);
    if (!b) return;
    check_streams(t, b);
    bk_destroy(b);
}

TEST(backend_opencl_build_error) {
    backend *b = open_opencl(t, NULL, 1);
    if (!b) return;
    const char *bad = "__kernel void broken(__global float *p) {\n    p[0] = undefined_thing + ;\n}\n";
    bk_module *m = bk_compile(b, bad, "", NULL);
    char e[4096];
    snprintf(e, sizeof e, "%s", bk_error(b));
    bk_module_free(b, m);
    /* A module that builds but lacks a requested kernel fails at compile, naming it. */
    const char *names[] = {"saxpy", "no_such_kernel", NULL};
    bk_module *m2 = bk_compile(b, OCL_SAXPY, "", names);
    char e2[1024];
    snprintf(e2, sizeof e2, "%s", bk_error(b));
    bk_module_free(b, m2);
    bk_destroy(b);
    CHECK(!m, "a kernel with a syntax error compiled");
    CHECK(strstr(e, "clBuildProgram") && strstr(e, "CL_BUILD_PROGRAM_FAILURE"), "error lacks the failed call: %s", e);
    CHECK(strstr(e, "build log") && strstr(e, "undefined_thing"), "error lacks the build log: %s", e);
    CHECK(!m2 && strstr(e2, "no_such_kernel") && strstr(e2, "CL_INVALID_KERNEL_NAME"), "missing kernel: %s", e2);
}

TEST(backend_opencl_cache) {
    tmpdir d;
    CHECK(tmpdir_make(&d) == 0, "mkdtemp failed");
    backend *b = open_opencl(t, d.path, 0);
    if (!b) {
        tmpdir_remove(&d);
        return;
    }
    /* Unique source per run, so PoCL's own cache cannot make the "miss" path look like a hit. */
    char src[1024];
    snprintf(src, sizeof src, "// run %llu\n%s", (unsigned long long)t_next(t), OCL_SAXPY);
    const char *names[] = {"saxpy", NULL};
    char why[2048] = "", entry[600] = "";
    bk_stats s[6];
    int from[6] = {0}, entries = 0;
    for (int step = 0; step < 6 && !why[0]; step++) {
        /* 0 miss, 1 hit, 2 miss after a flipped byte, 3 hit, 4 miss after truncation, 5 hit */
        if (step == 2 && flip_byte(entry, 5)) snprintf(why, sizeof why, "cannot modify %s", entry);
        if (step == 4 && truncate(entry, 30)) snprintf(why, sizeof why, "cannot truncate %s", entry);
        bk_module *m = bk_compile(b, src, "", names);
        if (!m) {
            snprintf(why, sizeof why, "compile %d: %s", step, bk_error(b));
            break;
        }
        from[step] = bk_module_from_cache(m);
        s[step] = *bk_get_stats(b);
        if (step == 0) entries = count_entries(d.path, entry, sizeof entry);
        if (step == 3) run_saxpy(t, b, m); /* a module loaded from the cache really runs */
        bk_module_free(b, m);
    }
    bk_destroy(b);

    /* Disabled: compiles, never hits, writes nothing. */
    tmpdir d2;
    int d2ok = tmpdir_make(&d2) == 0;
    backend *b2 = d2ok ? open_opencl(t, d2.path, 1) : NULL;
    int off_from = -1, off_entries = -1;
    long off_hits = -1;
    if (b2) {
        for (int i = 0; i < 2 && !why[0]; i++) {
            bk_module *m = bk_compile(b2, src, "", names);
            if (!m) snprintf(why, sizeof why, "uncached compile: %s", bk_error(b2));
            off_from = m ? bk_module_from_cache(m) : -1;
            bk_module_free(b2, m);
        }
        off_hits = bk_get_stats(b2)->cache_hits;
        off_entries = count_entries(d2.path, NULL, 0);
        bk_destroy(b2);
    }
    if (d2ok) tmpdir_remove(&d2);
    tmpdir_remove(&d);
    if (t->failed) return;
    CHECK(!why[0], "%s", why);
    CHECK(d2ok && off_from == 0 && off_hits == 0 && off_entries == 0,
          "disabled cache: from_cache %d, hits %ld, entries %d", off_from, off_hits, off_entries);
    CHECK(entries == 1, "%d cache entries after the first compile", entries);
    CHECK(!from[0] && s[0].cache_misses == 1 && s[0].compiles == 1, "first compile: from_cache %d misses %ld",
          from[0], s[0].cache_misses);
    CHECK(from[1] && s[1].cache_hits == 1 && s[1].compiles == 1, "second compile did not hit: hits %ld (%s)",
          s[1].cache_hits, s[1].last_cache_error);
    CHECK(!from[2] && s[2].cache_rejected == 1 && s[2].compiles == 2, "flipped entry: from_cache %d rejected %ld",
          from[2], s[2].cache_rejected);
    CHECK(from[3] && s[3].cache_hits == 2, "rebuilt entry did not hit (%s)", s[3].last_cache_error);
    CHECK(!from[4] && s[4].cache_rejected == 2, "truncated entry: from_cache %d rejected %ld", from[4],
          s[4].cache_rejected);
    CHECK(from[5] && s[5].cache_hits == 3 && s[5].cache_write_errors == 0, "after truncation: hits %ld, write errors %ld (%s)",
          s[5].cache_hits, s[5].cache_write_errors, s[5].last_cache_error);
}

/* ---- CUDA ---- */

TEST(backend_cuda_compile_only) {
    int major = 0, minor = 0;
    char err[1024];
    if (cuda_nvrtc_version(&major, &minor, err, sizeof err)) {
        missing_ok(t, "NVRTC", err);
        return;
    }
    const char *arches[] = {"sm_80", "sm_90", "sm_120"};
    for (int i = 0; i < 3; i++) {
        void *cubin = NULL;
        size_t len = 0;
        char log[8192];
        int rc = cuda_compile_only(CUDA_SAXPY, arches[i], "--std=c++17", &cubin, &len, log, sizeof log);
        int elf = cubin && len > 4 && memcmp(cubin, "\177ELF", 4) == 0;
        free(cubin);
        CHECK(rc == 0, "NVRTC %d.%d compile for %s failed:\n%s", major, minor, arches[i], log);
        CHECK(elf, "NVRTC output for %s is not an ELF CUBIN (%zu bytes)", arches[i], len);
    }
    CHECK(cuda_arch_supports_dtype("sm_80", BK_BF16) && !cuda_arch_supports_dtype("sm_75", BK_BF16) &&
              cuda_arch_supports_dtype("sm_75", BK_F32),
          "dtype table by arch is wrong");
}

TEST(backend_cuda_compile_error) {
    int major = 0, minor = 0;
    char err[1024];
    if (cuda_nvrtc_version(&major, &minor, err, sizeof err)) {
        missing_ok(t, "NVRTC", err);
        return;
    }
    const char *bad = "extern \"C\" __global__ void broken(float *p) { p[0] = undefined_thing + ; }\n";
    void *cubin = (void *)1;
    size_t len = 1;
    char log[8192];
    int rc = cuda_compile_only(bad, "sm_90", "", &cubin, &len, log, sizeof log);
    CHECK(rc == -1 && cubin == NULL && len == 0, "a kernel with a syntax error compiled");
    CHECK(strstr(log, "nvrtcCompileProgram") && strstr(log, "NVRTC log") && strstr(log, "undefined_thing"),
          "error lacks the NVRTC log: %s", log);
    CHECK(strstr(log, "errors in kernel broken (line 1)"), "error does not name the kernel: %s", log);
    /* a module of several kernels: the one with the error is named, not its neighbours */
    const char *two = "extern \"C\" __global__ void fine(float *p) { p[0] = 1.0f; }\n"
                      "extern \"C\" __global__ void second(float *p) {\n"
                      "    p[0] = also_undefined;\n"
                      "}\n";
    rc = cuda_compile_only(two, "sm_90", "", &cubin, &len, log, sizeof log);
    CHECK(rc == -1 && strstr(log, "errors in kernel second (line 3)") && !strstr(log, "kernel fine"),
          "error does not name the failing kernel of two: %s", log);
    rc = cuda_compile_only(CUDA_SAXPY, "compute_90", "", &cubin, &len, log, sizeof log);
    CHECK(rc == -1 && strstr(log, "compute_90"), "a virtual arch was accepted for a CUBIN: %s", log);
}

/* Without a GPU: creation fails cleanly with a reason. With REALM_GPU=1: it must work, and
 * saxpy, bf16 support and the cache are checked on the card. */
TEST(backend_cuda_device) {
    tmpdir d;
    CHECK(tmpdir_make(&d) == 0, "mkdtemp failed");
    bk_options opt = {.cache_dir = d.path};
    char err[1024] = "";
    backend *b = bk_create(BK_CUDA, 0, &opt, err, sizeof err);
    char cnt_err[512] = "";
    int count = bk_device_count(BK_CUDA, cnt_err, sizeof cnt_err);
    if (!b) {
        tmpdir_remove(&d);
        CHECK(!env_on("REALM_GPU"), "REALM_GPU=1 but the CUDA backend failed: %s", err);
        CHECK(strstr(err, "CUDA") && strlen(err) > 20, "unclear failure message: '%s'", err);
        CHECK(count <= 0, "device count %d but creation failed: %s", count, err);
        printf("     (no GPU here, as expected: %s)\n", err);
        return;
    }
    bk_device_info info = *bk_info(b), *in = &info;
    char why[4096] = "";
    int hit = 0;
    const char *names[] = {"saxpy", "scale_bf16", NULL};
    bk_module *m = bk_compile(b, CUDA_SAXPY, "--std=c++17", names);
    if (!m) snprintf(why, sizeof why, "compile: %s", bk_error(b));
    else run_saxpy(t, b, m);
    bk_module_free(b, m);
    if (!why[0]) {
        bk_module *m2 = bk_compile(b, CUDA_SAXPY, "--std=c++17", names);
        hit = m2 && bk_module_from_cache(m2);
        if (!m2) snprintf(why, sizeof why, "second compile: %s", bk_error(b));
        bk_module_free(b, m2);
    }
    size_t fr = 0, tot = 0;
    int mi = bk_mem_info(b, &fr, &tot);
    int bf16 = bk_supports_dtype(b, BK_BF16);
    if (!why[0] && !t->failed) check_streams(t, b);
    bk_destroy(b);
    tmpdir_remove(&d);
    if (t->failed) return;
    printf("     (CUDA device: %s %s, %zu MiB, driver %s, %s)\n", in->name, in->arch, tot >> 20,
           in->driver_version, in->compiler);
    CHECK(!why[0], "%s", why);
    CHECK(hit, "second compile of the same source did not hit the cache");
    CHECK(mi == 0 && fr > 0 && fr <= tot, "mem_info: free %zu total %zu", fr, tot);
    CHECK(count >= 1 && strncmp(in->arch, "sm_", 3) == 0, "count %d, arch '%s'", count, in->arch);
    CHECK(bf16 == (in->cc_major >= 8), "bf16 support %d on %s", bf16, in->arch);
}

TEST(backend_registry) {
    bk_kind k;
    CHECK(bk_kind_parse("cuda", &k) == 0 && k == BK_CUDA, "parse cuda");
    CHECK(bk_kind_parse("opencl", &k) == 0 && k == BK_OPENCL, "parse opencl");
    CHECK(bk_kind_parse("metal", &k) == -1, "parse of an unknown kind succeeded");
    char err[256] = "";
    int have_ocl = bk_device_count(BK_OPENCL, err, sizeof err) > 0;
    CHECK(bk_create(BK_OPENCL, 9999, NULL, err, sizeof err) == NULL && (!have_ocl || strstr(err, "9999")),
          "a nonexistent device opened or gave no reason: '%s'", err);
    CHECK(bk_create(BK_OPENCL, -1, NULL, err, sizeof err) == NULL && err[0], "negative device index accepted");
}
