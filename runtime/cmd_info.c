/* `realm info`: what this machine can run. Every backend is probed; one that cannot load is
 * listed with the reason, so the output doubles as an installation check. */
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "kcache.h"

int cmd_info(int argc, char **argv);

static void usage(FILE *f) {
    fprintf(f,
            "usage: realm info\n"
            "Lists the backends (CUDA through the driver API + NVRTC, OpenCL through the ICD loader),\n"
            "whether each loaded and why not, and every device with its name, memory, compute\n"
            "capability or OpenCL C version. Also shows the NVRTC version (used for compile-only\n"
            "builds with no GPU) and the compiled-kernel cache directory.\n"
            "Environment: REALM_CACHE_DIR (cache location), REALM_NO_CACHE=1 (disable the cache),\n"
            "CUDA_HOME (where to look for libnvrtc).\n");
}

static void print_mib(const char *label, size_t bytes) {
    printf("%s%.0f MiB", label, (double)bytes / (1024.0 * 1024.0));
}

static void print_device(backend *b, int idx) {
    const bk_device_info *in = bk_info(b);
    printf("  device %d: %s\n", idx, in->name);
    if (b->kind == BK_CUDA)
        printf("    compute capability %d.%d (%s), %d SMs, driver %s, %s\n", in->cc_major, in->cc_minor, in->arch,
               in->compute_units, in->driver_version, in->compiler);
    else
        printf("    %s, %d compute units, driver %s\n    platform %s\n", in->arch, in->compute_units,
               in->driver_version, in->platform);
    size_t fr = 0, tot = 0;
    if (bk_mem_info(b, &fr, &tot) == 0) {
        print_mib("    memory ", tot);
        print_mib(" total, ", fr);
        printf(" free");
        if (in->max_alloc && in->max_alloc < in->mem_total) print_mib(", largest buffer ", in->max_alloc);
        printf("%s\n", in->unified_memory ? " (shared with the host)" : "");
    } else {
        printf("    memory: %s\n", bk_error(b));
    }
    printf("    dtypes:");
    for (int d = 0; d < BK_NDTYPES; d++)
        if (bk_supports_dtype(b, (bk_dtype)d)) printf(" %s", bk_dtype_name((bk_dtype)d));
    printf("; max %d threads/block, %zu KiB shared/block\n", in->max_threads_per_block,
           in->max_shared_per_block / 1024);
}

int cmd_info(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        fprintf(stderr, "realm info: unknown argument '%s'\n", argv[i]);
        usage(stderr);
        return 2;
    }
    int usable = 0;
    char err[1024];
    for (int k = 0; k < BK_NKINDS; k++) {
        printf("%s:", bk_kind_name((bk_kind)k));
        err[0] = 0;
        int n = bk_device_count((bk_kind)k, err, sizeof err);
        if (n < 0) {
            printf(" not available: %s\n", err);
        } else {
            printf(" %d device%s\n", n, n == 1 ? "" : "s");
            for (int d = 0; d < n; d++) {
                bk_options opt = {.no_cache = 1}; /* info must not create cache directories */
                backend *b = bk_create((bk_kind)k, d, &opt, err, sizeof err);
                if (!b) {
                    printf("  device %d: cannot open: %s\n", d, err);
                    continue;
                }
                print_device(b, d);
                bk_destroy(b);
                usable++;
            }
        }
        if (k == BK_CUDA) {
            int major = 0, minor = 0;
            if (cuda_nvrtc_version(&major, &minor, err, sizeof err) == 0)
                printf("  NVRTC %d.%d: compile-only builds (realm kernels --arch sm_XY) work without a GPU\n",
                       major, minor);
            else
                printf("  NVRTC not available: %s\n", err);
        }
    }
    char dir[1024];
    int rc = kcache_dir(NULL, 0, dir, sizeof dir, err, sizeof err);
    if (rc == 0) printf("kernel cache: %s\n", dir);
    else if (rc == 1) printf("kernel cache: disabled (REALM_NO_CACHE)\n");
    else printf("kernel cache: unavailable: %s\n", err);
    if (!usable) printf("no usable device: realm can still generate and compile kernels (NVRTC) but not run them\n");
    return 0;
}
