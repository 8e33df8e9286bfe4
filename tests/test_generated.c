/* The generated source itself: `realm kernels` for CUDA architectures with NVRTC alone (CI has
 * no GPU), for OpenCL on PoCL, and golden copies of a fixed model's kernels so a change in
 * emitted code shows up as a diff. */
#include "frontend.h"
#include "optimizer.h"
#include "plan.h"
#include "test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Two compiles at a time (CI has two cores; NVRTC is single-threaded), each into its own log. */
TEST_SLOW(generated_cuda_kernels_compile_for_every_arch) {
    const char *models[] = {"models/tiny.lua", "models/realm-9m.lua", NULL};
    const char *archs[] = {"sm_80", "sm_90", "sm_120", NULL};
    char dir[256], cmd[2048], out[8192];
    snprintf(dir, sizeof dir, "/tmp/realm-archs-%d", (int)getpid());
    int k = snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s && printf '%%s\\n'", dir, dir);
    for (int m = 0; models[m]; m++)
        for (int a = 0; archs[a]; a++) k += snprintf(cmd + k, sizeof cmd - (size_t)k, " '%d %s %s'", m, models[m], archs[a]);
    snprintf(cmd + k, sizeof cmd - (size_t)k,
             " | xargs -P 2 -L 1 sh -c '%s kernels \"$1\" --backend cuda --arch \"$2\" > %s/$0.$2.log 2>&1; "
             "echo $? > %s/$0.$2.rc'",
             t_realm_bin(), dir, dir);
    CHECK(t_run(cmd, out, sizeof out) == 0, "%s", out);
    for (int m = 0; models[m]; m++)
        for (int a = 0; archs[a]; a++) {
            char path[512];
            snprintf(path, sizeof path, "cat %s/%d.%s.rc", dir, m, archs[a]);
            int rc = t_run(path, out, sizeof out) == 0 ? atoi(out) : -1;
            snprintf(path, sizeof path, "cat %s/%d.%s.log", dir, m, archs[a]);
            t_run(path, out, sizeof out);
            CHECK(rc == 0, "%s for %s: status %d: %s", models[m], archs[a], rc, out);
            CHECK(strstr(out, "forward") && strstr(out, "train") && strstr(out, "prefill") && strstr(out, "step") &&
                      strstr(out, "CUBIN"),
                  "%s", out);
            /* sm_80 and later train with bf16 matmuls by default (the decode plans stay fp32) */
            const char *train = strstr(out, "\ntrain "), *eol = train ? strchr(train + 1, '\n') : NULL,
                       *bf16 = train ? strstr(train, "bf16 matmuls") : NULL;
            CHECK(bf16 && (!eol || bf16 < eol), "%s for %s: the training plan is not bf16: %s", models[m], archs[a], out);
        }
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    t_run(cmd, out, sizeof out);
}

/* The README's command: CUDA kernels for sm_90 written to a directory, no GPU needed. */
TEST_SLOW(generated_cuda_kernels_written) {
    char dir[256], cmd[1024], out[8192];
    snprintf(dir, sizeof dir, "/tmp/realm-cuda-kernels-%d", (int)getpid());
    snprintf(cmd, sizeof cmd, "rm -rf %s && %s kernels models/tiny.lua --backend cuda --arch sm_90 --out %s", dir,
             t_realm_bin(), dir);
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "status %d: %s", rc, out);
    const char *files[] = {"forward.cu", "forward.plan", "train.cu",   "train.plan",
                           "prefill.cu", "prefill.plan", "step.cu",    "step.plan", NULL};
    for (int i = 0; files[i]; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        CHECK(access(p, R_OK) == 0, "%s was not written", p);
    }
    snprintf(cmd, sizeof cmd, "ls %s/*.cubin | wc -l && rm -rf %s", dir, dir);
    t_run(cmd, out, sizeof out);
    CHECK(atoi(out) == 4, "expected four CUBINs (forward, train, prefill, step), found %d", atoi(out));
}

/* --resources: ptxas's report for every kernel of every plan, with the launches of each; the
 * rows of a plan add up to its launch count, and each kernel has its threads, registers and
 * the work-groups that fit on a multiprocessor (at least one: every kernel must launch). */
TEST_SLOW(generated_cuda_resource_report) {
    char dir[256], cmd[1024];
    static char buf[1 << 17];
    char *out = buf + 1;   /* buf[0] = '\n': every plan's line then follows a newline */
    buf[0] = '\n';
    snprintf(dir, sizeof dir, "/tmp/realm-cuda-resources-%d", (int)getpid());
    /* the README's command, into a directory of its own */
    snprintf(cmd, sizeof cmd, "rm -rf %s && %s kernels models/tiny.lua --backend cuda --arch sm_90 --resources --out %s",
             dir, t_realm_bin(), dir);
    int rc = t_run(cmd, out, sizeof buf - 1);
    CHECK(rc == 0, "status %d: %.2000s", rc, out);
    const char *plans[] = {"forward", "train", "prefill", "step", NULL};
    for (int i = 0; plans[i]; i++) {
        char head[32];
        snprintf(head, sizeof head, "\n%-8s ", plans[i]);
        const char *h = strstr(buf, head);
        CHECK(h, "no %s line in: %.2000s", plans[i], out);
        int nk = 0, nl = 0;
        CHECK(sscanf(h + 1 + 9, " %d kernels, %d launches", &nk, &nl) == 2, "%.200s", h + 1);
        int rows = 0, launches = 0, bad = 0;
        const char *l = strchr(h + 1, '\n') + 1;
        l = strchr(l, '\n') + 1;   /* the table's header */
        while (strncmp(l, "  k", 3) == 0) {
            char name[64];
            long ln = 0, threads = 0, regs = 0, stack = 0, sst = 0, sld = 0, smem = 0, occ = 0;
            if (sscanf(l, " %63s %ld %ld %ld %ld %ld %ld %ld %ld", name, &ln, &threads, &regs, &stack, &sst, &sld, &smem,
                       &occ) != 9 ||
                ln < 1 || threads < 1 || threads > 1024 || regs < 1 || regs > 255 || occ < 1 || occ > 32)
                bad++;
            rows++;
            launches += (int)ln;
            l = strchr(l, '\n') + 1;
        }
        CHECK(rows == nk && launches == nl && !bad, "%s: %d rows for %d kernels, %d launches of %d, %d bad rows", plans[i],
              rows, nk, launches, nl, bad);
        char p[512];
        snprintf(p, sizeof p, "%s/%s.sm_90.ptxas.txt", dir, plans[i]);
        CHECK(access(p, R_OK) == 0, "%s was not written", p);
    }
    snprintf(cmd, sizeof cmd, "rm -rf %s; %s kernels models/tiny.lua --backend opencl --resources", dir, t_realm_bin());
    CHECK(t_run(cmd, out, sizeof buf - 1) == 2 && strstr(out, "--resources needs --backend cuda"), "%.500s", out);
}

TEST(generated_opencl_kernels_written_and_built) {
    char dir[256], cmd[1024], out[8192];
    snprintf(dir, sizeof dir, "/tmp/realm-kernels-%d", (int)getpid());
    snprintf(cmd, sizeof cmd, "rm -rf %s && %s kernels models/tiny.lua --backend opencl --out %s", dir, t_realm_bin(), dir);
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "status %d: %s", rc, out);
    const char *files[] = {"forward.cl", "forward.plan", "train.cl",   "train.plan",
                           "prefill.cl", "prefill.plan", "step.cl",    "step.plan", NULL};
    for (int i = 0; files[i]; i++) {
        char p[512];
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        CHECK(access(p, R_OK) == 0, "%s was not written", p);
    }
    snprintf(cmd, sizeof cmd, "grep -c '^launch' %s/train.plan && rm -rf %s", dir, dir);
    t_run(cmd, out, sizeof out);
    CHECK(atoi(out) > 50, "train.plan lists %d launches", atoi(out));
}

TEST(generated_bad_arch_is_refused) {
    char cmd[512], out[4096];
    snprintf(cmd, sizeof cmd, "%s kernels models/tiny.lua --backend cuda --arch compute_90", t_realm_bin());
    CHECK(t_run(cmd, out, sizeof out) == 2, "%s", out);
    snprintf(cmd, sizeof cmd, "%s kernels models/tiny.lua --backend metal", t_realm_bin());
    CHECK(t_run(cmd, out, sizeof out) == 2, "%s", out);
}

/* tests/golden/<model>.<dialect>.<plan> holds the source rendered for a fixed model. Set
 * REALM_UPDATE_GOLDEN=1 to rewrite them after an intended change (and review the diff). */
static void golden(tctx *t, const char *model, const char *dialect) {
    realm_model m;
    char err[1024];
    CHECK(model_load(model, &m, err, sizeof err) == 0, "%s", err);
    int nfwd = m.g.nn;
    ir_optimizer o;
    CHECK(ir_autodiff(&m.g) == 0 && ir_add_optimizer(&m.g, &o) == 0, "%s", m.g.err);
    const char *base = strrchr(model, '/') ? strrchr(model, '/') + 1 : model;
    for (int which = 0; which < 2; which++) {
        plan p;
        int keep[2] = {m.loss, m.logits};
        CHECK(plan_build(&p, &m.g, 0, which ? m.g.nn : nfwd, dialect, keep, 2, err, sizeof err) == 0, "%s", err);
        char path[512];
        snprintf(path, sizeof path, "tests/golden/%.*s.%s.%s", (int)(strlen(base) - 4), base, which ? "train" : "forward",
                 strcmp(dialect, "cuda") == 0 ? "cu" : "cl");
        if (getenv("REALM_UPDATE_GOLDEN")) {
            FILE *f = fopen(path, "wb");
            CHECK(f, "cannot write %s", path);
            fwrite(p.kg.src.s, 1, p.kg.src.n, f);
            fclose(f);
        }
        FILE *f = fopen(path, "rb");
        CHECK(f, "%s is missing (REALM_UPDATE_GOLDEN=1 creates it)", path);
        char *want = calloc(p.kg.src.n + 2, 1);
        size_t n = fread(want, 1, p.kg.src.n + 1, f);
        fclose(f);
        int same = n == p.kg.src.n && memcmp(want, p.kg.src.s, n) == 0;
        long line = 1;
        for (size_t i = 0; i < n && i < p.kg.src.n && want[i] == p.kg.src.s[i]; i++) line += want[i] == '\n';
        free(want);
        plan_free(&p);
        CHECK(same, "generated source differs from %s at line %ld (REALM_UPDATE_GOLDEN=1 after review)", path, line);
    }
    model_free(&m);
}

TEST(generated_source_matches_golden) {
    golden(t, "models/tiny.lua", "opencl");
    golden(t, "models/tiny.lua", "cuda");
}
