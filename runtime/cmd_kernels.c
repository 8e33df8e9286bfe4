/* realm kernels: render a model's training-step and forward kernels, and the decoder's prefill
 * and step kernels (docs/decode.md), for a backend, write them (and the launch plans) for
 * inspection, and compile them — for CUDA with NVRTC alone, so kernels for any architecture
 * can be built on a machine without a GPU. */
#include "backend.h"
#include "cli.h"
#include "frontend.h"
#include "fsutil.h"
#include "optimizer.h"
#include "plan.h"
#include "precision.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int write_text(const char *dir, const char *name, const char *text, size_t len, char *err, size_t errlen) {
    char path[1400];
    snprintf(path, sizeof path, "%.1000s/%s", dir, name);
    return fs_write_atomic(path, text, len, err, errlen);
}

/* One kernel's line of ptxas's resource report (--ptxas-options=-v). */
typedef struct {
    char name[48];
    long regs, frame, spill_st, spill_ld, smem;
} kres;

/* Parse ptxas's verbose log: "Compiling entry function 'NAME'", then "N bytes stack frame, N bytes
 * spill stores, N bytes spill loads" and "Used N registers, ... N bytes smem"; returns how many
 * kernels it found (at most max). */
static int parse_resources(const char *log, kres *r, int max) {
    int n = -1, own = 0;   /* own: the last "Function properties" block is the entry's, not a callee's */
    for (const char *l = log; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
        const char *q;
        if (n >= 0 && (q = strstr(l, "Function properties for ")) && q - l < 40) {
            q += strlen("Function properties for ");
            size_t k = strlen(r[n].name);
            own = strncmp(q, r[n].name, k) == 0 && (q[k] == '\n' || q[k] == 0 || q[k] == ' ' || q[k] == '\r');
            continue;
        }
        if ((q = strstr(l, "Compiling entry function '")) && q < (strchr(l, '\n') ? strchr(l, '\n') : l + strlen(l))) {
            if (n + 1 >= max) break;
            n++;
            memset(&r[n], 0, sizeof r[n]);
            q += strlen("Compiling entry function '");
            size_t k = 0;
            while (q[k] && q[k] != '\'' && k + 1 < sizeof r[n].name) r[n].name[k] = q[k], k++;
            r[n].name[k] = 0;
        } else if (n >= 0 && own && (q = strstr(l, " bytes stack frame")) && q - l < 60) {
            while (q > l && q[-1] >= '0' && q[-1] <= '9') q--;   /* "ptxas    .   160 bytes stack frame, ..." */
            sscanf(q, "%ld bytes stack frame, %ld bytes spill stores, %ld bytes spill loads", &r[n].frame, &r[n].spill_st,
                   &r[n].spill_ld);
        } else if (n >= 0 && (q = strstr(l, "Used ")) && q - l < 40) {
            sscanf(q, "Used %ld registers", &r[n].regs);
            const char *sm = strstr(q, " bytes smem");
            const char *eol = strchr(q, '\n');
            if (sm && (!eol || sm < eol)) {
                const char *b = sm;
                while (b > q && (b[-1] >= '0' && b[-1] <= '9')) b--;
                r[n].smem = atol(b);
            }
        }
    }
    return n + 1;
}

/* The table of --resources: every kernel with its launches, registers, stack frame and spills
 * (static shared memory too; the dynamic tiles are in the plan), spilling kernels flagged. */
static int by_kernel_number(const void *a, const void *b) {   /* k0_..., k1_...: render order */
    long x = atol(((const kres *)a)->name + 1), y = atol(((const kres *)b)->name + 1);
    return (x > y) - (x < y);
}

/* Per-multiprocessor limits of the architectures CI compiles for (CUDA programming guide,
 * compute capabilities table): threads, shared memory usable by blocks, resident blocks. */
typedef struct {
    long threads, smem, blocks;
} sm_limits;

static sm_limits limits_of(const char *arch) {
    int cc = atoi(arch + 3);
    if (cc >= 100 && cc != 100 && cc != 103) return (sm_limits){1536, 99 * 1024, 32};   /* sm_120 */
    if (cc >= 90) return (sm_limits){2048, 227 * 1024, 32};                            /* sm_90, sm_100 */
    if (cc == 86 || cc == 87 || cc == 89) return (sm_limits){1536, 99 * 1024, cc == 87 ? 16 : 24};
    if (cc >= 80) return (sm_limits){2048, 163 * 1024, 32};
    return (sm_limits){2048, 96 * 1024, 32};
}

/* Work-groups of `threads` threads with `regs` registers a thread and `smem` bytes of shared
 * memory (static + dynamic) that fit on one multiprocessor at once: registers go by warps in
 * units of 256 from 65536, each block reserves 1 KiB of shared memory (sm_80 on). */
static long blocks_per_sm(const char *arch, long threads, long regs, long smem) {
    sm_limits lim = limits_of(arch);
    long warps = (threads + 31) / 32, per_warp = (regs * 32 + 255) / 256 * 256;
    long by_regs = per_warp > 0 ? 65536 / (per_warp * warps) : lim.blocks;
    long by_smem = lim.smem / (smem + 1024), by_threads = lim.threads / (warps * 32), b = lim.blocks;
    if (by_regs < b) b = by_regs;
    if (by_smem < b) b = by_smem;
    if (by_threads < b) b = by_threads;
    return b;
}

static void print_resources(const char *what, const char *arch, const plan *p, kres *r, int n) {
    qsort(r, (size_t)n, sizeof *r, by_kernel_number);
    int spilling = 0;
    long maxregs = 0;
    printf("  %-40s %8s %7s %5s %6s %8s %8s %7s %9s\n", "kernel", "launches", "threads", "regs", "stack", "spill-st",
           "spill-ld", "smem", "blocks/SM");
    for (int i = 0; i < n; i++) {
        int launches = 0;
        long threads = 0, dyn = 0;
        for (int l = 0; l < p->kg.nl; l++) {
            const plan_launch *pl = &p->kg.launches[l];
            if (strcmp(pl->kernel, r[i].name) != 0) continue;
            if (!launches++) threads = (long)pl->block[0] * pl->block[1] * pl->block[2], dyn = pl->shmem;
        }
        long smem = r[i].smem + dyn;
        char occ[24] = "-";
        if (threads > 0) snprintf(occ, sizeof occ, "%ld", blocks_per_sm(arch, threads, r[i].regs, smem));
        printf("  %-40s %8d %7ld %5ld %6ld %8ld %8ld %7ld %9s%s\n", r[i].name, launches, threads, r[i].regs, r[i].frame,
               r[i].spill_st, r[i].spill_ld, smem, occ, r[i].spill_st || r[i].spill_ld ? "  spills" : "");
        spilling += r[i].spill_st || r[i].spill_ld;
        if (r[i].regs > maxregs) maxregs = r[i].regs;
    }
    printf("  %s for %s: %d kernels, at most %ld registers a thread, %d spilling\n", what, arch, n, maxregs, spilling);
}

/* Render (and compile) one plan; returns 0, 1 (compile failure) or 2 (bad input). */
static int one_plan(const char *what, const ir_graph *g, int nodes, const int *keep, int nkeep, const char *bkname,
                    const char *arch, const char *out, long B, long S, const plan_options *po, int resources,
                    int *nkernels) {
    char err[8192];
    plan p;
    if (plan_build_opts(&p, g, 0, nodes, bkname, keep, nkeep, po, err, sizeof err) < 0) {
        fprintf(stderr, "realm kernels: %s\n", err);
        return 1;
    }
    *nkernels = p.kg.nbodies;
    int rc = 0;
    const char *ext = strcmp(bkname, "cuda") == 0 ? "cu" : "cl";
    if (out) {
        char name[64];
        strbuf desc = {0};
        plan_describe(&p, B, S, &desc);
        snprintf(name, sizeof name, "%s.%s", what, ext);
        if (write_text(out, name, p.kg.src.s, p.kg.src.n, err, sizeof err) < 0) rc = 2;
        snprintf(name, sizeof name, "%s.plan", what);
        if (rc == 0 && write_text(out, name, desc.s, desc.n, err, sizeof err) < 0) rc = 2;
        sb_free(&desc);
        if (rc) fprintf(stderr, "realm kernels: %s\n", err);
    }
    if (rc == 0 && strcmp(bkname, "cuda") == 0) {
        void *cubin = NULL;
        size_t len = 0, loglen = resources ? (size_t)1 << 20 : sizeof err;
        char *log = resources ? malloc(loglen) : err;
        if (!log) {
            fprintf(stderr, "realm kernels: out of host memory\n");
            rc = 1;
        } else if (cuda_compile_only(p.kg.src.s, arch, resources ? "--ptxas-options=-v" : "", &cubin, &len, log, loglen) <
                   0) {
            fprintf(stderr, "realm kernels: %s kernels for %s: %s\n", what, arch, log);
            rc = 1;
        } else {
            printf("%-8s %3d kernels, %3d launches: compiled for %s, %s matmuls (%zu-byte CUBIN)\n", what,
                   p.kg.nbodies, p.kg.nl, arch, p.kg.bf16 ? "bf16" : "fp32", len);
            if (resources) {
                kres *r = calloc(256, sizeof *r);
                int n = r ? parse_resources(log, r, 256) : 0;
                if (n == 0) {
                    fprintf(stderr, "realm kernels: no resource report in NVRTC's log for %s\n", what);
                    rc = 1;
                } else {
                    print_resources(what, arch, &p, r, n);
                }
                free(r);
                if (out && rc == 0) {
                    char name[64];
                    snprintf(name, sizeof name, "%s.%s.ptxas.txt", what, arch);
                    if (write_text(out, name, log, strlen(log), err, sizeof err) < 0) {
                        fprintf(stderr, "realm kernels: %s\n", err);
                        rc = 2;
                    }
                }
            }
            if (out) {
                char name[64];
                snprintf(name, sizeof name, "%s.%s.cubin", what, arch);
                if (write_text(out, name, cubin, len, err, sizeof err) < 0) {
                    fprintf(stderr, "realm kernels: %s\n", err);
                    rc = 2;
                }
            }
            free(cubin);
        }
        if (resources) free(log);
    } else if (rc == 0) {
        backend *bk = bk_create(BK_OPENCL, 0, NULL, err, sizeof err);
        if (!bk) {
            fprintf(stderr, "realm kernels: %s\n", err);
            rc = 1;
        } else {
            bk_module *m = bk_compile(bk, p.kg.src.s, "-cl-std=CL1.2", NULL);
            if (!m) {
                fprintf(stderr, "realm kernels: %s kernels: %s\n", what, bk_error(bk));
                rc = 1;
            } else {
                printf("%-8s %3d kernels, %3d launches: compiled for %s\n", what, p.kg.nbodies, p.kg.nl, bk_info(bk)->name);
                bk_module_free(bk, m);
            }
            bk_destroy(bk);
        }
    }
    plan_free(&p);
    return rc;
}

int cmd_kernels(int argc, char **argv) {
    const char *bkname = NULL, *arch = "sm_90", *out = NULL, *batch_s = NULL, *seq_s = NULL, *prec_s = NULL;
    int resources = 0;
    const cli_opt opts[] = {
        {"--backend", "NAME", "cuda or opencl (required)", &bkname, NULL},
        {"--arch", "sm_XY", "CUDA architecture to compile for (default sm_90); needs no GPU", &arch, NULL},
        {"--out", "DIR", "write the kernel source, the launch plans and the binaries here", &out, NULL},
        {"--batch", "B", "batch for the memory plan written with --out (default: train.batch)", &batch_s, NULL},
        {"--seq", "S", "sequence length for that memory plan (default: train.seq)", &seq_s, NULL},
        {"--precision", "P", "bf16 or fp32 matmuls (default: bf16 for CUDA sm_80+, else fp32)", &prec_s, NULL},
        {"--resources", NULL, "CUDA: print each kernel's registers, stack and spills (ptxas's report)", NULL, &resources},
        {NULL, NULL, NULL, NULL, NULL},
    };
    const char *pos[1];
    int npos, done;
    int rc = cli_parse("kernels", "MODEL.lua --backend cuda|opencl [--arch sm_XY] [--out DIR]",
                       "Generate the kernels of a model's training step (forward, backward, optimizer), of its\n"
                       "forward pass and of the decoder's prefill and step plans (fp32, as generate and chat run\n"
                       "them), and compile them. CUDA needs only NVRTC, not a GPU.",
                       argc, argv, opts, pos, 1, 1, &npos, &done);
    if (rc || done) return rc;
    if (!bkname || (strcmp(bkname, "cuda") != 0 && strcmp(bkname, "opencl") != 0)) {
        fprintf(stderr, "realm kernels: --backend must be cuda or opencl\n");
        return 2;
    }
    if (strncmp(arch, "sm_", 3) != 0 || strlen(arch) < 5) {
        fprintf(stderr, "realm kernels: --arch must look like sm_90, got '%s'\n", arch);
        return 2;
    }
    if (resources && strcmp(bkname, "cuda") != 0) {
        fprintf(stderr, "realm kernels: --resources needs --backend cuda (the report is ptxas's)\n");
        return 2;
    }
    if (cli_pick("kernels", "--precision", prec_s, "bf16", "fp32")) return 2;
    /* as realm train: bf16 wherever the target has bf16 tensor cores */
    int bf16_ok = strcmp(bkname, "cuda") == 0 && cuda_arch_supports_dtype(arch, BK_BF16);
    if (prec_s && strcmp(prec_s, "bf16") == 0 && !bf16_ok) {
        fprintf(stderr, "realm kernels: --precision bf16 needs --backend cuda and sm_80 or newer\n");
        return 2;
    }
    /* as the device would plan them: its shared memory, and wgmma on Hopper */
    const plan_options po = {.bf16 = prec_s ? strcmp(prec_s, "bf16") == 0 : bf16_ok, .shared_max = limits_of(arch).smem,
                             .wgmma = cuda_arch_has_wgmma(arch)};
    char err[2048];
    realm_model m;
    if (model_load(pos[0], &m, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    long B = m.train.batch, S = m.train.seq;
    if ((batch_s && cli_long("kernels", "--batch", batch_s, 1, 1L << 20, &B)) ||
        (seq_s && cli_long("kernels", "--seq", seq_s, 1, 1L << 24, &S))) {
        model_free(&m);
        return 2;
    }
    if (out && mkdir(out, 0777) < 0 && errno != EEXIST) {
        fprintf(stderr, "realm kernels: %s: %s\n", out, strerror(errno));
        model_free(&m);
        return 2;
    }
    ir_optimizer opt;
    int keep[2] = {m.loss, m.logits}, nk = 0;
    /* as realm train builds its step (runtime/session.c) */
    if (ir_autodiff(&m.g) < 0 || (po.bf16 && ir_bf16_storage(&m.g) < 0) || ir_add_optimizer(&m.g, &opt) < 0) {
        fprintf(stderr, "%s: %s\n", pos[0], m.g.err);
        model_free(&m);
        return 2;
    }
    int nfwd = m.g.backward_start;
    rc = one_plan("forward", &m.g, nfwd, keep, 2, bkname, arch, out, B, S, &po, resources, &nk);
    if (rc == 0) rc = one_plan("train", &m.g, m.g.nn, keep, 1, bkname, arch, out, B, S, &po, resources, &nk);
    model_free(&m);
    /* the decoder's plans, built from the same file the way runtime/decode.c builds them */
    char *src = NULL;
    size_t len = 0;
    train_config tc;
    if (rc == 0 && model_probe(pos[0], &src, &len, &tc, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    const plan_options fp32 = {0};
    for (int which = 0; which < 2 && rc == 0; which++) {
        realm_model dm;
        if ((which ? model_load_step : model_load_prefill)(src, len, pos[0], &dm, err, sizeof err) < 0) {
            fprintf(stderr, "%s\n", err);
            rc = 2;
            break;
        }
        rc = one_plan(which ? "step" : "prefill", &dm.g, dm.g.nn, &dm.logits, 1, bkname, arch, out, B, which ? 1 : S, &fp32,
                      resources, &nk);
        model_free(&dm);
    }
    free(src);
    return rc;
}
