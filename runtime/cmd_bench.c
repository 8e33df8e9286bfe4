/* realm bench: the speed of one training step of a model file on a device.
 *
 * Builds the same training session `realm train` runs (forward, loss, backward, clip, AdamW
 * in one plan), feeds it random tokens, runs warm-up steps, then times N steps with device
 * events around each whole step (profiling off, so the headline is what training gets). A
 * second, separate pass with per-launch events (runtime/exec.c) gives where the time goes by
 * kernel class; its sum is a little larger than the step time, because every launch then
 * carries two event records. */
#include "cli.h"
#include "op.h"
#include "rng.h"
#include "session.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Kernel classes of the per-launch breakdown, in print order. */
static const char *const class_names[] = {"matmul", "scan", "attention", "elementwise", "norm",
                                          "embedding/loss", "optimizer", "other"};
#define NCLASS ((int)(sizeof class_names / sizeof class_names[0]))

static int class_of(const char *op) {
    if (strncmp(op, "matmul", 6) == 0) return 0;
    if (strncmp(op, "mamba3", 6) == 0) return 1;
    if (strncmp(op, "attention", 9) == 0 || strncmp(op, "rope", 4) == 0) return 2;
    static const char *const ew[] = {"fused", "add", "mul", "silu", "silu_bwd", "copy", "fill", NULL};
    for (int i = 0; ew[i]; i++)
        if (strcmp(op, ew[i]) == 0) return 3;
    if (strncmp(op, "rmsnorm", 7) == 0) return 4;
    if (strncmp(op, "embedding", 9) == 0 || strncmp(op, "cross_entropy", 13) == 0) return 5;
    if (strcmp(op, "adamw") == 0 || strcmp(op, "sumsq") == 0) return 6;
    return 7;
}

/* Datasheet peaks (dense, no sparsity) by device name, for MFU. The kernels compute in fp32
 * on the CUDA cores today, so the fp32 figure is the fair one; the bf16 tensor-core figure is
 * where the design (§9) aims. 0: unknown device, MFU not reported. */
static void peaks(const char *name, double *bf16, double *fp32) {
    *bf16 = *fp32 = 0;
    if (strstr(name, "H100") && (strstr(name, "PCIe") || strstr(name, "PCIE")))
        *bf16 = 756e12, *fp32 = 51.2e12;
    else if (strstr(name, "H100") || strstr(name, "H200") || strstr(name, "GH200"))
        *bf16 = 989.4e12, *fp32 = 66.9e12;  /* H100 SXM5; H200 has the same compute */
    else if (strstr(name, "A100"))
        *bf16 = 312e12, *fp32 = 19.5e12;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* One training step's inputs: random tokens and a plausible optimizer step. */
static int feed(session *s, rng_state *r, uint8_t *rows, long rowlen, char *err, size_t errlen) {
    for (long i = 0; i < s->B * rowlen; i++) rows[i] = (uint8_t)rng_below(r, 256);
    const float hyper[8] = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.19f, 0.0975f, 1.0f};
    if (exec_upload(&s->x, s->opt.hyper, hyper, err, errlen) < 0) return -1;
    return session_set_batch(s, rows, rowlen, err, errlen);
}

/* The distinct kernels that take the most time (launches of one kernel summed): where to look
 * next when tuning. */
static void print_top_kernels(const plan *p, const exec_prof *pr, long psteps) {
    int nk = p->kg.nbodies, order[512];
    double kms[512] = {0};
    long kl[512] = {0};
    if (nk > 512) nk = 512;
    for (int i = 0; i < p->kg.nl; i++)
        for (int b = 0; b < nk; b++)
            if (strcmp(p->kg.names[b], p->kg.launches[i].kernel) == 0) {
                kms[b] += pr->launch_ms[i];
                kl[b]++;
                break;
            }
    for (int b = 0; b < nk; b++) order[b] = b;
    for (int a = 1; a < nk; a++)
        for (int b = a; b > 0 && kms[order[b]] > kms[order[b - 1]]; b--) {
            int t = order[b];
            order[b] = order[b - 1];
            order[b - 1] = t;
        }
    printf("\nslowest kernels:\n  %-40s %10s %12s\n", "kernel", "launches", "ms/step");
    for (int r = 0; r < nk && r < 15; r++)
        printf("  %-40s %10ld %12.3f\n", p->kg.names[order[r]], kl[order[r]], kms[order[r]] / (double)psteps);
}

/* Every launch of the step in order: its device time, FLOPs and the bytes of its arguments
 * (each tensor read or written once), so a kernel far from its roofline stands out. */
static void print_launches(const plan *p, const exec_prof *pr, long psteps, long B, long S) {
    const ir_graph *g = p->g;
    printf("\nlaunches (ms/step, GFLOP, MB of arguments, TFLOP/s, GB/s):\n");
    for (int i = 0; i < p->kg.nl; i++) {
        const plan_launch *l = &p->kg.launches[i];
        double ms = pr->launch_ms[i] / (double)psteps, fl = 0, by = 0;
        for (int n = l->node0; n < l->node1; n++) fl += ir_flops(g, n, B, S);
        for (int a = 0; a < l->nargs; a++) {
            const ir_tensor *t = &g->t[l->arg[a]];
            by += (double)ir_numel(&t->shape, B, S) * ir_dtype_bytes(t->dtype);
        }
        printf("  %4d %-34s %8.3f %8.2f %8.1f %7.1f %7.0f ", i, l->kernel, ms, fl / 1e9, by / 1e6,
               ms > 0 ? fl / ms / 1e9 : 0, ms > 0 ? by / ms / 1e6 : 0);
        for (int a = 0; a < l->nargs; a++) {
            const ir_tensor *t = &g->t[l->arg[a]];
            if (a == 6) {   /* the optimizer's launches take a hundred */
                printf(" ... (%d more)", l->nargs - a);
                break;
            }
            printf(" %s%s[", a < l->nin ? "" : ">", t->name);
            for (int d = 0; d < t->shape.ndim; d++)
                printf(d ? "x%s" : "%s", t->shape.d[d] == DIM_B ? "B" : t->shape.d[d] == DIM_S ? "S" : "");
            for (int d = 0; d < t->shape.ndim; d++)
                if (t->shape.d[d] > 0) printf("%s%d", d ? "," : "", t->shape.d[d]);
            printf("]");
        }
        printf("\n");
    }
}

int cmd_bench(int argc, char **argv) {
    const char *bkname = "auto", *batch_s = NULL, *seq_s = NULL, *steps_s = NULL, *warm_s = NULL, *dev_s = NULL,
               *prof_s = NULL, *prec_s = NULL, *side_s = NULL, *storage_s = NULL, *wgmma_s = NULL;
    int launches = 0;
    const cli_opt opts[] = {
        {"--precision", "P", "bf16 or fp32 matmuls (default: bf16 on CUDA sm_80+, else fp32), as realm train", &prec_s,
         NULL},
        {"--backend", "B", "cuda, opencl or auto (default auto: CUDA if a GPU works)", &bkname, NULL},
        {"--device", "N", "device index (default 0)", &dev_s, NULL},
        {"--batch", "B", "batch size (default: the model's train.batch)", &batch_s, NULL},
        {"--seq", "S", "sequence length (default: the model's train.seq)", &seq_s, NULL},
        {"--steps", "N", "timed steps (default 10)", &steps_s, NULL},
        {"--warmup", "N", "untimed steps first (default 2)", &warm_s, NULL},
        {"--profile-steps", "N", "steps timed launch by launch for the breakdown (default 2, 0: none)", &prof_s, NULL},
        {"--side-stream", "on|off", "weight-gradient launches on a second stream (default on, CUDA)", &side_s, NULL},
        {"--bf16-storage", "on|off", "bf16 plans store what only matmuls read as bf16 (default on)", &storage_s, NULL},
        {"--wgmma", "on|off", "bf16 matmuls on Hopper's wgmma where they fit (default on, sm_90)", &wgmma_s, NULL},
        {"--launches", NULL, "also print every launch: ms/step, FLOPs, argument bytes, TFLOP/s, GB/s", NULL,
         &launches},
        {NULL, NULL, NULL, NULL, NULL},
    };
    const char *pos[1];
    int npos, done;
    int rc = cli_parse("bench", "MODEL.lua [--backend B] [--batch B --seq S] [--steps N] [--warmup N]",
                       "Time training steps (forward, backward, AdamW) of a model on random tokens and print\n"
                       "tokens/s, ms/step, MFU, memory and the device time per kernel class.",
                       argc, argv, opts, pos, 1, 1, &npos, &done);
    if (rc || done) return rc;
    char err[4096];
    char *src = NULL;
    size_t srclen = 0;
    train_config tc;
    if (model_probe(pos[0], &src, &srclen, &tc, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    long B = tc.batch, S = tc.seq, steps = 10, warm = 2, dev = 0, psteps = 2;
    rc = 0;
    rc |= batch_s && cli_long("bench", "--batch", batch_s, 1, 1L << 20, &B);
    rc |= seq_s && cli_long("bench", "--seq", seq_s, 1, 1L << 24, &S);
    rc |= steps_s && cli_long("bench", "--steps", steps_s, 1, 1L << 20, &steps);
    rc |= warm_s && cli_long("bench", "--warmup", warm_s, 0, 1L << 20, &warm);
    rc |= dev_s && cli_long("bench", "--device", dev_s, 0, 1024, &dev);
    rc |= prof_s && cli_long("bench", "--profile-steps", prof_s, 0, 1L << 20, &psteps);
    rc = rc || cli_pick("bench", "--side-stream", side_s, "on", "off") || cli_pick("bench", "--precision", prec_s, "bf16", "fp32") ||
         cli_pick("bench", "--bf16-storage", storage_s, "on", "off") || cli_pick("bench", "--wgmma", wgmma_s, "on", "off");
    if (rc) {
        free(src);
        return 2;
    }
    backend *bk = session_backend(bkname, (int)dev, err, sizeof err);
    if (!bk) {
        fprintf(stderr, "realm bench: %s\n", err);
        free(src);
        return strcmp(bkname, "auto") == 0 ? 1 : 2;
    }
    int can_bf16 = bk->kind == BK_CUDA && bk_supports_dtype(bk, BK_BF16);
    const plan_options popt = {.bf16 = prec_s ? strcmp(prec_s, "bf16") == 0 : can_bf16,
                               .shared_max = (long)bk_info(bk)->max_shared_per_block,
                               .fp32_storage = storage_s && strcmp(storage_s, "off") == 0,
                               .wgmma = bk->kind == BK_CUDA && cuda_arch_has_wgmma(bk_info(bk)->arch) &&
                                        !(wgmma_s && strcmp(wgmma_s, "off") == 0)};
    if (popt.bf16 && !can_bf16) {
        fprintf(stderr, "realm bench: --precision bf16 needs CUDA on sm_80 or newer\n");
        bk_destroy(bk);
        free(src);
        return 2;
    }
    size_t free0 = 0, total = 0, free_min = 0, fr = 0;
    int have_mem = bk_mem_info(bk, &free0, &total) == 0;
    free_min = free0;
    session s;
    int status = 1, have_session = 0;
    bk_event *e0 = NULL, *e1 = NULL;
    double *ms = calloc((size_t)steps, sizeof *ms);
    long rowlen = S + 1;
    uint8_t *rows = malloc((size_t)(B * rowlen));
    rng_state r;
    rng_seed(&r, 12345);
    printf("realm bench: %s on %s (%s), batch %ld x seq %ld, %s matmuls, %ld warm-up + %ld timed steps\n", pos[0],
           bk_info(bk)->name, bk_name(bk), B, S, popt.bf16 ? "bf16" : "fp32", warm, steps);
    fflush(stdout);
    if (session_prepare_opts(&s, src, srclen, pos[0], bk_name(bk), 1, 0, &popt, err, sizeof err) < 0) goto fail;
    if (session_alloc(&s, bk, B, S, err, sizeof err) < 0) {
        session_close(&s);
        goto fail;
    }
    have_session = 1;
    s.x.side_off = side_s && strcmp(side_s, "off") == 0;
    if (session_init_params(&s, 1, err, sizeof err) < 0) goto fail;
    if (!(e0 = bk_event_create(bk)) || !(e1 = bk_event_create(bk))) {
        goto fail_bk;
    }
    double loss0 = NAN, loss = NAN;
    for (long i = 0; i < warm; i++) {
        if (feed(&s, &r, rows, rowlen, err, sizeof err) < 0 || session_run(&s, err, sizeof err) < 0 ||
            session_loss(&s, &loss, err, sizeof err) < 0)
            goto fail;
        if (i == 0) loss0 = loss;
        if (have_mem && bk_mem_info(bk, &fr, &total) == 0 && fr < free_min) free_min = fr;
    }
    /* Each timed step: inputs uploaded first (outside the events, as the trainer's pinned
     * double buffering would hide them), then events around the launches alone. The loss is
     * read after the end event, so steps do not overlap and each event pair is one step. */
    for (long i = 0; i < steps; i++) {
        if (feed(&s, &r, rows, rowlen, err, sizeof err) < 0) goto fail;
        if (bk_event_record(bk, e0, s.x.stream) < 0) goto fail_bk;
        if (session_run(&s, err, sizeof err) < 0) goto fail;
        if (bk_event_record(bk, e1, s.x.stream) < 0 || bk_event_elapsed_ms(bk, e0, e1, &ms[i]) < 0) goto fail_bk;
        if (session_loss(&s, &loss, err, sizeof err) < 0) goto fail;
        if (i == 0 && warm == 0) loss0 = loss;
        if (have_mem && bk_mem_info(bk, &fr, &total) == 0 && fr < free_min) free_min = fr;
    }
    if (!isfinite(loss)) {
        snprintf(err, sizeof err, "the loss is %g after %ld steps", loss, warm + steps);
        goto fail;
    }
    /* The breakdown pass. */
    double cls_ms[NCLASS] = {0};
    double prof_total = 0;
    if (psteps > 0) {
        if (exec_profile_enable(&s.x, err, sizeof err) < 0) goto fail;
        for (long i = 0; i < psteps; i++)
            if (feed(&s, &r, rows, rowlen, err, sizeof err) < 0 || session_run(&s, err, sizeof err) < 0 ||
                exec_profile_collect(&s.x, err, sizeof err) < 0)
                goto fail;
        const exec_prof *pr = s.x.prof;
        for (int e = 0; e < pr->nop; e++) cls_ms[class_of(pr->by_op[e].name)] += pr->by_op[e].ms / (double)psteps;
        prof_total = pr->total_ms / (double)psteps;
    }

    const ir_graph *g = &s.m.g;
    double flops = 0;
    for (int i = 0; i < g->nn; i++) flops += ir_flops(g, i, B, S);
    double tok = (double)B * (double)S, sum = 0;
    for (long i = 0; i < steps; i++) sum += ms[i];
    double mean = sum / (double)steps;
    qsort(ms, (size_t)steps, sizeof *ms, cmp_double);
    double median = steps % 2 ? ms[steps / 2] : 0.5 * (ms[steps / 2 - 1] + ms[steps / 2]);
    double tps = tok / (median * 1e-3), achieved = flops / (median * 1e-3);
    double pk_bf16, pk_fp32;
    peaks(bk_info(bk)->name, &pk_bf16, &pk_fp32);

    printf("\n%-34s %s\n", "model", s.m.name);
    printf("%-34s %ld parameters, %d launches (%d distinct kernels)\n", "graph", ir_param_count(g), s.p.kg.nl,
           s.p.kg.nbodies);
    printf("%-34s %s\n", "side stream", s.x.side && !s.x.side_off ? "on" : "off");
    printf("%-34s %d tensors stored as bf16 (weight copies, activations and gradients only matmuls read)\n",
           "bf16 storage", ir_bf16_owners(&s.m.g));
    int nwg = 0;
    for (int l = 0; l < s.p.kg.nl; l++) nwg += strstr(s.p.kg.launches[l].kernel, "_wgmma") != NULL;
    printf("%-34s %d matmul launches on wgmma\n", "wgmma", nwg);
    if (s.x.side && !s.x.side_off)
        printf("%-34s %d weight-gradient launches beside the backward chain (the breakdown runs them in line)\n", "",
               s.p.nside);
    printf("%-34s %.0f\n", "tokens/s", tps);
    printf("%-34s %.3f median, %.3f mean, %.3f min, %.3f max\n", "ms/step", median, mean, ms[0], ms[steps - 1]);
    printf("%-34s %.2fM (sum of ir_flops over the step's nodes / B*S)\n", "FLOPs/token (fwd+bwd+optimizer)",
           flops / tok / 1e6);
    printf("%-34s %.2f TFLOP/s\n", "achieved", achieved / 1e12);
    if (pk_bf16 > 0) {
        printf("%-34s %.2f%% (peak %.1f TFLOP/s, datasheet)\n", "MFU vs bf16 dense tensor peak", 100 * achieved / pk_bf16,
               pk_bf16 / 1e12);
        /* an fp32 plan's matmuls run on the CUDA cores, so that is its ceiling; a bf16 plan's
         * run on tensor cores and the line would only mislead (it passed 100%) */
        if (!popt.bf16)
            printf("%-34s %.2f%% (peak %.1f TFLOP/s: --precision fp32 keeps the matmuls off the tensor cores)\n",
                   "MFU vs fp32 CUDA-core peak", 100 * achieved / pk_fp32, pk_fp32 / 1e12);
    } else {
        printf("%-34s n/a (no datasheet peak known for this device)\n", "MFU");
    }
    printf("%-34s %.1f MiB\n", "arena", (double)s.x.arena_bytes / 1048576.0);
    if (have_mem)
        printf("%-34s %.1f MiB (device free memory before the session minus the lowest seen after; of %.0f MiB)\n",
               "device memory used (peak)", (double)(free0 - free_min) / 1048576.0, (double)total / 1048576.0);
    else
        printf("%-34s n/a (%s)\n", "device memory used (peak)", bk_error(bk));
    printf("%-34s %.4f first, %.4f last (random tokens: ~ln 256 = 5.545)\n", "loss", loss0, loss);
    if (psteps > 0) {
        printf("\ntime per kernel class (%ld profiled step%s, events around every launch; sum %.3f ms/step):\n",
               psteps, psteps == 1 ? "" : "s", prof_total);
        printf("  %-16s %12s %8s\n", "class", "ms/step", "share");
        for (int c = 0; c < NCLASS; c++) {
            if (cls_ms[c] == 0 && c == NCLASS - 1) continue;
            printf("  %-16s %12.3f %7.1f%%\n", class_names[c], cls_ms[c], prof_total > 0 ? 100 * cls_ms[c] / prof_total : 0);
        }
        const exec_prof *pr = s.x.prof;
        printf("\nby primitive:\n  %-20s %10s %12s\n", "op", "launches", "ms/step");
        for (int e = 0; e < pr->nop; e++)
            printf("  %-20s %10ld %12.3f\n", pr->by_op[e].name, pr->by_op[e].launches / psteps,
                   pr->by_op[e].ms / (double)psteps);
        print_top_kernels(&s.p, pr, psteps);
        if (launches) print_launches(&s.p, pr, psteps, B, S);
    }
    /* One greppable line for scripts (bench/run.sh). */
    printf("\nRESULT backend=%s B=%ld S=%ld tok_s=%.1f ms_step=%.4f flops_tok=%.6g", bk_name(bk), B, S, tps, median,
           flops / tok);
    printf(" tflops=%.2f", achieved / 1e12);
    if (pk_bf16 > 0) printf(" mfu=%.4f peak_tflops=%.1f", achieved / pk_bf16, pk_bf16 / 1e12);
    if (have_mem) printf(" peak_mib=%.0f", (double)(free0 - free_min) / 1048576.0);
    for (int c = 0; c < NCLASS; c++) printf(" %s=%.4f", class_names[c], cls_ms[c]);
    printf("\n");
    status = 0;
    goto cleanup;
fail_bk:
    snprintf(err, sizeof err, "timing a step: %s", bk_error(bk));
fail:
    fprintf(stderr, "realm bench: %s\n", err);
cleanup:
    if (e0) bk_event_destroy(bk, e0);
    if (e1) bk_event_destroy(bk, e1);
    if (have_session) session_close(&s);
    bk_destroy(bk);
    free(ms);
    free(rows);
    free(src);
    return status;
}
