/* Every kernel template, rendered for OpenCL and run on PoCL, against the fp64 reference:
 * one small graph per primitive (its forward and the nodes its gradient rule emits) on
 * awkward sizes, then whole models. */
#include "exec.h"
#include "frontend.h"
#include "kcases.h"
#include "kernelcheck.h"
#include "plan.h"
#include "op.h"
#include "optimizer.h"
#include "reference.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SH(...) ir_shape_make(sizeof((int[]){__VA_ARGS__}) / sizeof(int), (int[]){__VA_ARGS__})



TEST(kernels_elementwise) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    kc_run_table(t, bk, "opencl", kcases_elementwise, 1e-5);
    bk_destroy(bk);
}

TEST(kernels_dense) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    kc_run_table(t, bk, "opencl", kcases_dense, 1e-5);
    bk_destroy(bk);
}

TEST(kernels_attention) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    kc_run_table(t, bk, "opencl", kcases_attention, 1e-5);
    bk_destroy(bk);
}

/* The scan backward's chunk-parallel kernels need ~111 KiB of shared memory at realm-9m's head
 * shape: a device with less (plan_options.shared_max: a 99 KiB sm_120, a 48 KiB OpenCL GPU)
 * gets the sequential backward instead of a launch that cannot run; that kernel's correctness
 * is covered by the P > 256 case of kcases_mamba3. */
TEST(kernels_scan_backward_follows_shared_memory) {
    const kcase *kc = NULL;
    for (int i = 0; i < kcases_mamba3.n; i++)
        if (strcmp(kcases_mamba3.c[i].op, "mamba3_scan") == 0 && kcases_mamba3.c[i].in[0].d[3] == 64 && !kcases_mamba3.c[i].fwd_only)
            kc = &kcases_mamba3.c[i];
    CHECK(kc != NULL, "no mamba3_scan case at head dim 64");
    const long limits[3] = {0, 99L * 1024, 48L * 1024};
    const int want_main[3] = {1, 0, 0};
    for (int l = 0; l < 3; l++) {
        ir_graph g;
        char err[600];
        CHECK(kc_build_case(kc, &g, err, sizeof err) == 0, "%s", err);
        plan p;
        const plan_options po = {.shared_max = limits[l]};
        CHECK(plan_build_opts(&p, &g, 0, g.nn, "cuda", NULL, 0, &po, err, sizeof err) == 0, "%s", err);
        int main_k = 0, serial_k = 0;
        long most = 0;
        for (int i = 0; i < p.kg.nl; i++) {
            main_k += strstr(p.kg.launches[i].kernel, "mamba3_scan_bwd_main") != NULL;
            const char *u = strstr(p.kg.launches[i].kernel, "mamba3_scan_bwd");
            serial_k += u && strcmp(u, "mamba3_scan_bwd") == 0;
            if (p.kg.launches[i].shmem > most) most = p.kg.launches[i].shmem;
        }
        plan_free(&p);
        ir_free(&g);
        CHECK(main_k == want_main[l] && serial_k == !want_main[l],
              "shared_max %ld: %d chunk-parallel and %d sequential backward launches", limits[l], main_k, serial_k);
        CHECK(limits[l] == 0 || most <= limits[l], "shared_max %ld: a launch asks for %ld bytes", limits[l], most);
    }
}

TEST(kernels_mamba3) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    kc_run_table(t, bk, "opencl", kcases_mamba3, 1e-5);
    kc_run_table(t, bk, "opencl", kcases_mamba3_long, kcases_long_tol);
    bk_destroy(bk);
}

static void check_model(tctx *t, const char *path, long B, long S) {
    realm_model m;
    char err[1024];
    CHECK(model_load(path, &m, err, sizeof err) == 0, "%s", err);
    CHECK(ir_autodiff(&m.g) == 0, "autodiff: %s", m.g.err);
    backend *bk = kc_opencl(t);
    if (bk) {
        kc_check_graph(t, bk, &m.g, B, S, 1e-5, m.vocab);
        bk_destroy(bk);
    }
    model_free(&m);
}

TEST(kernels_tiny_model_every_launch) { check_model(t, "models/tiny.lua", 2, 37); }

/* The bf16 checks' inputs through the same harness (attention's on the bf16 grid): OpenCL has
 * no bf16 path, so the plan keeps fp32 kernels, which must match the reference as closely as on
 * any other inputs; on the GPU the same inputs feed the tensor-core kernels
 * (bf16_kernels_*_every_launch). */
TEST(kernels_tiny_model_every_launch_bf16_grid_inputs) {
    realm_model m;
    char err[1024];
    CHECK(model_load("models/tiny.lua", &m, err, sizeof err) == 0, "%s", err);
    CHECK(ir_autodiff(&m.g) == 0, "autodiff: %s", m.g.err);
    backend *bk = kc_opencl(t);
    if (bk) {
        const plan_options bf16 = {.bf16 = 1};
        kc_check_graph_opts(t, bk, &m.g, 1, 21, 1e-5, m.vocab, &bf16);
        bk_destroy(bk);
    }
    model_free(&m);
}

/* The optimizer nodes: sumsq over many gradients (more than one node's worth) and AdamW. */
TEST(kernels_optimizer) {
    ir_graph g;
    ir_init_graph(&g);
    int shapes[15][2] = {{3, 5}, {7, 1}, {300, 2}, {1, 1}, {4, 4}, {2, 9}, {5, 5}, {6, 1}, {1, 13},
                         {8, 8}, {3, 3}, {2, 2}, {9, 1}, {1, 2}, {17, 3}};
    for (int i = 0; i < 15; i++) {
        int p = ir_tensor_new(&g, NULL, SH(shapes[i][0], shapes[i][1]), DT_F32, ROLE_PARAM);
        g.t[p].init = i % 2 ? INIT_NORMAL : INIT_ONES;
        char name[32];
        snprintf(name, sizeof name, "grad%d", i);
        g.t[p].grad = ir_tensor_new(&g, name, SH(shapes[i][0], shapes[i][1]), DT_F32, ROLE_ACT);
    }
    ir_optimizer o;
    CHECK(ir_add_optimizer(&g, &o) == 0, "%s", g.err);
    backend *bk = kc_opencl(t);
    if (bk) {
        kc_check_graph(t, bk, &g, 1, 1, 1e-5, 1);
        bk_destroy(bk);
    }
    ir_free(&g);
}

/* AdamW's first step from zero moments moves each weight by about lr * sign(grad), plus the
 * decoupled decay: an independent statement of the update rule. */
TEST(optimizer_first_step) {
    ir_graph g;
    ir_init_graph(&g);
    int p = ir_tensor_new(&g, "w", SH(4, 3), DT_F32, ROLE_PARAM);
    g.t[p].init = INIT_NORMAL;
    g.t[p].grad = ir_tensor_new(&g, "dw", SH(4, 3), DT_F32, ROLE_ACT);
    ir_optimizer o;
    CHECK(ir_add_optimizer(&g, &o) == 0, "%s", g.err);
    ref_ctx *c = ref_create(&g, 1, 1);
    double w[12], dw[12];
    for (int i = 0; i < 12; i++) {
        w[i] = ref_data(c, p)[i] = t_normal(t);
        dw[i] = ref_data(c, g.t[p].grad)[i] = t_normal(t) * 1e-2;
    }
    for (int i = 0; i < g.nt; i++)
        if (g.t[i].role == ROLE_OPT) for (int k = 0; k < 12; k++) ref_data(c, i)[k] = 0;
    const double lr = 0.01, wd = 0.1, h[8] = {lr, 0.9, 0.95, 1e-12, wd, 0.1, 0.05, 1e9};
    for (int k = 0; k < 8; k++) ref_data(c, o.hyper)[k] = h[k];
    ref_run(c, o.first_node, g.nn);
    for (int i = 0; i < 12; i++) {
        /* m_hat = g and v_hat = g^2 on the first step, so the step is g / (|g| + eps): sign(g)
         * unless |g| is within a few orders of eps (a draw near zero made this flaky) */
        double want = w[i] - lr * (dw[i] / (fabs(dw[i]) + h[3]) + wd * w[i]);
        CHECK(fabs(ref_data(c, p)[i] - want) < 1e-9, "w[%d] = %.12g, want %.12g", i, ref_data(c, p)[i], want);
    }
    ref_destroy(c);
    ir_free(&g);
}

/* Dense templates at sizes that cross tile and work-group edges (several row tiles, K and N
 * not multiples of the tile, rows of more than 256 values, more tokens than one id tile),
 * several rows per token, and a constant-shaped matmul. */
TEST(kernels_dense_edges) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    kc_run_table(t, bk, "opencl", kcases_dense_edges, 1e-5);
    bk_destroy(bk);
}

/* The dense templates on strided views: inputs that are slices of wider tensors (token stride
 * larger than the row, a feature offset) and outputs written into slices. */
TEST(kernels_dense_views) {
    ir_graph g;
    if (kc_build_dense_views(&g) < 0) {
        t_fail(t, __FILE__, __LINE__, "building the graph: %s", g.err);
        ir_free(&g);
        return;
    }
    backend *bk = kc_opencl(t);
    if (bk) {
        kc_check_graph(t, bk, &g, 3, 11, 1e-5, 11);
        bk_destroy(bk);
    }
    ir_free(&g);
}

/* The whole plan end to end: forward, loss and backward run back to back on OpenCL from the
 * same parameters and bytes as the reference executor; the loss and every parameter gradient
 * match (<= 1e-5 normwise). */
TEST(kernels_tiny_model_end_to_end) {
    realm_model m;
    char err[4096];
    CHECK(model_load("models/tiny.lua", &m, err, sizeof err) == 0, "%s", err);
    CHECK(ir_autodiff(&m.g) == 0, "autodiff: %s", m.g.err);
    const ir_graph *g = &m.g;
    const long B = 2, S = 45;
    int keep[64], nkeep = 0;
    keep[nkeep++] = m.loss;
    for (int i = 0; i < g->nt && nkeep < 64; i++)
        if (g->t[i].role == ROLE_PARAM && g->t[i].base == i) keep[nkeep++] = g->t[i].grad;
    backend *bk = kc_opencl(t);
    if (!bk) {
        model_free(&m);
        return;
    }
    plan p = {0};
    plan_exec x = {0};
    int ok = plan_build(&p, g, 0, g->nn, "opencl", keep, nkeep, err, sizeof err) == 0;
    ok = ok && exec_create(&x, bk, &p, B, S, err, sizeof err) == 0;
    ref_ctx *c = ok ? ref_create(g, B, S) : NULL;
    float *buf = malloc(sizeof(float) * 256 * 64 * 8);
    double *hd = malloc(sizeof(double) * 256 * 64 * 8);
    double worst = 0;
    char worst_name[128] = "";
    if (ok) {
        ref_init_params(c, t_next(t));
        for (int i = 0; i < g->nt && ok; i++) {
            const ir_tensor *tt = &g->t[i];
            if (tt->base != i || (tt->role != ROLE_PARAM && tt->role != ROLE_INPUT)) continue;
            long n = ir_numel(&tt->shape, B, S);
            double *d = ref_data(c, i);
            for (long k = 0; k < n; k++) {
                if (tt->role == ROLE_INPUT) d[k] = (double)t_randint(t, 0, 255);
                else d[k] += 0.02 * t_normal(t);
                buf[k] = (float)d[k];
            }
            ok = exec_upload(&x, i, buf, err, sizeof err) == 0;
        }
        ok = ok && exec_run(&x, 0, p.kg.nl, err, sizeof err) == 0;
        ref_run(c, 0, g->nn);
        for (int k = 0; k < nkeep && ok; k++) {
            int tid = keep[k];
            long n = ir_numel(&g->t[tid].shape, B, S);
            ok = exec_download(&x, tid, buf, err, sizeof err) == 0;
            ref_buf rb = ref_get(c, tid);
            double *want = malloc(sizeof(double) * (size_t)n);
            for (long r = 0; r < rb.ntok; r++)
                for (long f = 0; f < rb.feat; f++) want[r * rb.feat + f] = rb.p[r * rb.ld + f];
            for (long q = 0; q < n; q++) hd[q] = buf[q];
            double e = t_relerr(hd, want, n);
            free(want);
            if (!(e <= worst)) {
                worst = e;
                snprintf(worst_name, sizeof worst_name, "%s", k == 0 ? "loss" : g->t[tid].name);
            }
        }
    }
    free(buf);
    free(hd);
    if (c) ref_destroy(c);
    if (x.arena) exec_destroy(&x);
    plan_free(&p);
    bk_destroy(bk);
    model_free(&m);
    CHECK(ok, "%s", err);
    CHECK(worst <= 1e-5, "%s differs from the reference: relative error %.3g", worst_name, worst);
}

/* The plan takes the elementwise nodes after a matmul into its epilogue: realm-9m's residual
 * adds (forward) and the SwiGLU / gate gradients after the dx products (backward) leave no
 * launch of their own, the product each of them reads is never stored, and the epilogue
 * kernels render and run through the per-launch checks above (tiny model, OpenCL) and on the
 * GPU (bf16_kernels_*_every_launch). */
TEST(plan_fuses_elementwise_into_matmul_epilogues) {
    realm_model m;
    char err[4096];
    CHECK(model_load("models/realm-9m.lua", &m, err, sizeof err) == 0, "%s", err);
    CHECK(ir_autodiff(&m.g) == 0, "autodiff: %s", m.g.err);
    const ir_graph *g = &m.g;
    plan p = {0};
    int keep[1] = {m.loss};
    CHECK(plan_build(&p, g, 0, g->nn, "opencl", keep, 1, err, sizeof err) == 0, "%s", err);
    int epi = 0, adds = 0, kept = 0, bad_span = 0;
    for (int l = 0; l < p.kg.nl; l++) {
        const plan_launch *pl = &p.kg.launches[l];
        const ir_node *n0 = &g->n[pl->node0];
        /* (the tied embedding's two gradient parts and the clip's squared norms are added too) */
        if (strcmp(op_get(n0->op)->name, "add") == 0 && ir_ntok_dims(&g->t[n0->out[0]].shape) > 0) adds++;
        if (!strstr(pl->kernel, "_epi")) continue;
        epi++;
        bad_span += strcmp(op_get(n0->op)->name, "matmul") != 0 || pl->node1 - pl->node0 < 2;
        kept += p.stored[n0->out[0]] != 0;
        for (int a = 0; a < pl->nargs; a++) kept += pl->arg[a] == n0->out[0];
    }
    plan_free(&p);
    model_free(&m);
    /* 8 blocks x (mixer + MLP) residual adds, 8 MLP and 6 Mamba dx products */
    CHECK(epi == 16 + 8 + 6, "%d matmul launches with an epilogue, want 30", epi);
    CHECK(bad_span == 0, "%d epilogue launches do not start at a matmul and cover its group", bad_span);
    CHECK(kept == 0, "%d fused products are still stored", kept);
    CHECK(adds == 0, "%d residual adds still run as their own launch", adds);
}

/* An elementwise node that writes into the storage a matmul reads (here the other half of the
 * tensor the matmul's input is a view of) must not go into its epilogue: blocks still reading
 * the operand would race with blocks writing it. The same node writing a tensor of its own is
 * fused. Both plans are checked launch by launch on PoCL. */
TEST(plan_epilogue_never_writes_an_operand) {
    for (int clobber = 0; clobber < 2; clobber++) {
        ir_graph g;
        ir_init_graph(&g);
        int X = ir_tensor_new(&g, "X", SH(DIM_B, DIM_S, 16), DT_F32, ROLE_PARAM);
        int W = ir_tensor_new(&g, "W", SH(8, 8), DT_F32, ROLE_PARAM);
        int a = ir_view(&g, X, SH(DIM_B, DIM_S, 8), 0, "X.lo");
        int y[IR_MAX_IO], z;
        CHECK(ir_emit(&g, "matmul", (int[]){a, W}, 2, NULL, NULL, y) == 1, "%s", g.err);
        if (clobber) {
            int hi = ir_view(&g, X, SH(DIM_B, DIM_S, 8), 8, "X.hi");
            z = ir_emit_into(&g, "add", (int[]){y[0], a}, 2, NULL, NULL, hi);
        } else {
            int out[IR_MAX_IO];
            z = ir_emit(&g, "add", (int[]){y[0], a}, 2, NULL, NULL, out) == 1 ? out[0] : -1;
        }
        CHECK(z >= 0, "%s", g.err);
        g.loss = -1;
        plan p;
        char err[1024];
        int keep[1] = {z};
        const plan_options bf16 = {.bf16 = 1};
        CHECK(plan_build_opts(&p, &g, 0, g.nn, "cuda", keep, 1, &bf16, err, sizeof err) == 0, "%s", err);
        int epi = 0;
        for (int l = 0; l < p.kg.nl; l++) epi += strstr(p.kg.launches[l].kernel, "_epi") != NULL;
        plan_free(&p);
        CHECK(epi == !clobber, "%s: %d epilogue launches", clobber ? "writing the operand" : "a tensor of its own", epi);
        backend *bk = kc_opencl(t);
        if (bk) {
            kc_check_graph(t, bk, &g, 2, 19, 1e-5, 256);
            bk_destroy(bk);
        }
        ir_free(&g);
    }
}
