/* The compiler core: model files, the IR, autodiff, the reference executor, `realm graph`. */
#include "frontend.h"
#include "gradcheck.h"
#include "op.h"
#include "plan.h"
#include "precision.h"
#include "reference.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int load(tctx *t, const char *path, realm_model *m) {
    char err[1024];
    if (model_load(path, m, err, sizeof err) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        return -1;
    }
    if (ir_autodiff(&m->g) < 0) {
        t_fail(t, __FILE__, __LINE__, "autodiff: %s", m->g.err);
        model_free(m);
        return -1;
    }
    return 0;
}

TEST(model_realm9m_parameter_count) {
    realm_model m;
    if (load(t, "models/realm-9m.lua", &m)) return;
    long n = ir_param_count(&m.g);
    int pattern_ok = m.n_layers == 8 && m.d_model % 64 == 0;
    model_free(&m);
    CHECK(n >= 9600000L * 97 / 100 && n <= 9600000L * 103 / 100, "realm-9m has %ld parameters", n);
    CHECK(pattern_ok, "realm-9m layout");
}

TEST(model_tiny_under_300k) {
    realm_model m;
    if (load(t, "models/tiny.lua", &m)) return;
    long n = ir_param_count(&m.g);
    int kinds = 0;
    for (int s = 0; s < m.g.nsc; s++) {
        if (strcmp(m.g.sc[s].kind, "mamba3") == 0) kinds |= 1;
        if (strcmp(m.g.sc[s].kind, "attention") == 0) kinds |= 2;
        if (strcmp(m.g.sc[s].kind, "swiglu") == 0) kinds |= 4;
    }
    model_free(&m);
    CHECK(n > 0 && n < 300000, "tiny has %ld parameters", n);
    CHECK(kinds == 7, "tiny lacks a block kind (mask %d)", kinds);
}

/* The whole tiny model: every parameter gradient from autodiff + reference backward against
 * central differences of the reference forward. S crosses Mamba chunks and the attention
 * window so every path is exercised. */
TEST(model_tiny_gradients_match_finite_differences) {
    realm_model m;
    if (load(t, "models/tiny.lua", &m)) return;
    char worst[128] = "";
    double e = gc_model_check(t, &m, 2, 70, 3, worst, sizeof worst);
    model_free(&m);
    printf("  normwise relative error %.3g (worst parameter %s)\n", e, worst);
    CHECK(e <= 1e-6, "normwise relative error %.3g (worst parameter %s)", e, worst);
}

/* A model file exercising what the bundled ones do not: untied head, grouped KV heads, a user
 * block with a split whose second part is unused (its gradient slice must be zero-filled), a
 * tensor used twice, window 1. */
static const char *custom_model =
    "local nn = require 'realm.nn'\n"
    "local odd = nn.block { kind = 'odd', build = function(g, x, ctx)\n"
    "  local h = nn.linear(g, x, 3 * g:dim(x), 'up')\n"
    "  local a, unused, b = g:split(h, {g:dim(x), g:dim(x), g:dim(x)})\n"
    "  return a * b + a\n"
    "end }\n"
    "return nn.model { name = 'custom', vocab = 32, d_model = 16, tie_embeddings = false,\n"
    "  blocks = { nn.attention { heads = 4, kv_heads = 2, window = 1 }, odd,\n"
    "             nn.mamba3 { d_state = 8, headdim = 8, expand = 2, chunk = 4 },\n"
    "             nn.attention { heads = 2, window = 5 } },\n"
    "  mlp = nn.swiglu { hidden = 8 } }\n";

TEST(model_custom_gradients_match_finite_differences) {
    realm_model m;
    char err[1024];
    CHECK(model_load_string(custom_model, strlen(custom_model), "custom.lua", &m, err, sizeof err) == 0, "%s", err);
    CHECK(ir_autodiff(&m.g) == 0, "autodiff: %s", m.g.err);
    int fills = 0;
    for (int i = m.g.backward_start; i < m.g.nn; i++)
        fills += strcmp(op_get(m.g.n[i].op)->name, "fill") == 0;
    char worst[128] = "";
    double e = gc_model_check(t, &m, 2, 11, 4, worst, sizeof worst);
    model_free(&m);
    CHECK(fills >= 2, "expected a zero-filled gradient slice for the unused split part");
    CHECK(e <= 1e-6, "normwise relative error %.3g (worst parameter %s)", e, worst);
}

/* Per primitive: feed a random upstream gradient dy straight into the op's gradient rule and
 * compare each input gradient with central differences of sum(y * dy). */
typedef struct {
    const char *op;
    int nin;
    ir_shape in[4];
    ir_dtype dt[4];
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    int vocab;                /* range of integer inputs */
} op_case;

static double op_fd_check(tctx *t, const op_case *oc, char *msg, size_t len) {
    const long B = 2, S = 5;
    ir_graph g;
    ir_init_graph(&g);
    int in[4];
    for (int i = 0; i < oc->nin; i++)
        in[i] = ir_tensor_new(&g, NULL, oc->in[i], oc->dt[i], oc->dt[i] == DT_I32 ? ROLE_INPUT : ROLE_PARAM);
    int out[IR_MAX_IO];
    const op_def *d = op_get(op_find(oc->op));
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    memcpy(ia, d->ia_default, sizeof ia);
    memcpy(fa, d->fa_default, sizeof fa);
    for (int i = 0; i < IR_MAX_IATTR; i++) if (oc->ia[i]) ia[i] = oc->ia[i];
    for (int i = 0; i < IR_MAX_FATTR; i++) if (oc->fa[i]) fa[i] = oc->fa[i];
    if (ir_emit(&g, oc->op, in, oc->nin, ia, fa, out) < 1) {   /* out[0] is checked; others are workspaces */
        snprintf(msg, len, "%s: %s", oc->op, g.err);
        ir_free(&g);
        return INFINITY;
    }
    int y = out[0];
    int dy = ir_tensor_new(&g, "dy", g.t[y].shape, DT_F32, ROLE_PARAM);
    int nfwd = g.nn;
    g.backward_start = nfwd;
    int din[IR_MAX_IO];
    for (int i = 0; i < IR_MAX_IO; i++) din[i] = -1;
    int dout[IR_MAX_IO];   /* as autodiff passes it: -1 for outputs nothing reads */
    for (int i = 0; i < IR_MAX_IO; i++) dout[i] = -1;
    dout[0] = dy;
    if (d->grad(&g, 0, dout, din) < 0) {
        snprintf(msg, len, "%s grad: %s", oc->op, g.err);
        ir_free(&g);
        return INFINITY;
    }
    ref_ctx *c = ref_create(&g, B, S);
    for (int i = 0; i < g.nt; i++) {
        if (g.t[i].base != i || g.t[i].producer >= 0) continue;
        long n = ir_numel(&g.t[i].shape, B, S);
        double *p = ref_data(c, i);
        for (long k = 0; k < n; k++)
            p[k] = g.t[i].dtype == DT_I32 ? (double)t_randint(t, 0, oc->vocab - 1) : t_normal(t);
    }
    ref_run(c, 0, g.nn);
    double num = 0, den = 0;
    const double h = 1e-6;
    long ny = ir_numel(&g.t[y].shape, B, S);
    for (int i = 0; i < oc->nin; i++) {
        if (din[i] < 0) continue;
        double *p = ref_data(c, in[i]);
        long n = ir_numel(&g.t[in[i]].shape, B, S);
        const ir_tensor *gt = &g.t[din[i]];
        long feat = ir_feat(&gt->shape);
        for (int s = 0; s < 24; s++) {
            long k = t_randint(t, 0, n - 1);
            double keep = p[k], f[2];
            for (int side = 0; side < 2; side++) {
                p[k] = keep + (side ? -h : h);
                ref_run(c, 0, nfwd);
                double acc = 0;
                const double *yp = ref_data(c, y), *dyp = ref_data(c, dy);
                for (long j = 0; j < ny; j++) acc += yp[j] * dyp[j];
                f[side] = acc;
            }
            p[k] = keep;
            double fd = (f[0] - f[1]) / (2 * h);
            double an = ref_data(c, gt->base)[gt->offset + (k / feat) * gt->tok_stride + k % feat];
            num += (an - fd) * (an - fd);
            den += fd * fd;
        }
    }
    ref_destroy(c);
    ir_free(&g);
    return den > 0 ? sqrt(num / den) : INFINITY;
}

#define SH(...) ir_shape_make(sizeof((int[]){__VA_ARGS__}) / sizeof(int), (int[]){__VA_ARGS__})

TEST(primitive_gradients_match_finite_differences) {
    const op_case cases[] = {
        {"matmul", 2, {SH(DIM_B, DIM_S, 7), SH(5, 7)}, {DT_F32, DT_F32}, {0}, {0}, 0},
        {"matmul", 2, {SH(DIM_B, DIM_S, 7), SH(7, 3)}, {DT_F32, DT_F32}, {1}, {0}, 0},
        {"matmul", 2, {SH(DIM_B, DIM_S, 2, 6), SH(4, 6)}, {DT_F32, DT_F32}, {0}, {0}, 0},
        {"rmsnorm", 2, {SH(DIM_B, DIM_S, 9), SH(9)}, {DT_F32, DT_F32}, {0}, {1e-5}, 0},
        {"add", 2, {SH(DIM_B, DIM_S, 4), SH(DIM_B, DIM_S, 4)}, {DT_F32, DT_F32}, {0}, {0}, 0},
        {"mul", 2, {SH(DIM_B, DIM_S, 4), SH(DIM_B, DIM_S, 4)}, {DT_F32, DT_F32}, {0}, {0}, 0},
        {"silu", 1, {SH(DIM_B, DIM_S, 6)}, {DT_F32}, {0}, {0}, 0},
        {"copy", 1, {SH(DIM_B, DIM_S, 3)}, {DT_F32}, {0}, {0}, 0},
        {"embedding", 2, {SH(DIM_B, DIM_S), SH(11, 4)}, {DT_I32, DT_F32}, {0}, {0}, 11},
        {"cross_entropy", 2, {SH(DIM_B, DIM_S, 13), SH(DIM_B, DIM_S)}, {DT_F32, DT_I32}, {0}, {0}, 13},
        {"rope", 1, {SH(DIM_B, DIM_S, 3, 8)}, {DT_F32}, {0, 2}, {0}, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char msg[600] = "";
        double e = op_fd_check(t, &cases[i], msg, sizeof msg);
        CHECK(e <= 1e-6, "%s (case %zu): relative error %.3g %s", cases[i].op, i, e, msg);
    }
}

/* Every differentiable primitive in the registry has a case above or a dedicated test. */
TEST(primitive_gradient_coverage) {
    const char *covered[] = {"matmul", "rmsnorm", "add", "mul", "silu", "copy", "cast", "embedding",
                             "cross_entropy", "rope", "attention", "mamba3_scan", NULL};
    for (int i = 0; i < op_count(); i++) {
        const op_def *d = op_get(i);
        if (!d->grad) continue;
        int ok = 0;
        for (int k = 0; covered[k]; k++) ok |= strcmp(covered[k], d->name) == 0;
        CHECK(ok, "primitive '%s' has a gradient rule but no finite-difference test", d->name);
    }
}

/* Initialisation is a pure function of (seed, parameter name). */
TEST(param_init_is_deterministic) {
    realm_model m;
    if (load(t, "models/tiny.lua", &m)) return;
    ref_ctx *a = ref_create(&m.g, 1, 1), *b = ref_create(&m.g, 1, 1), *c = ref_create(&m.g, 1, 1);
    ref_init_params(a, 42);
    ref_init_params(b, 42);
    ref_init_params(c, 43);
    int same = 1, differ = 0, dt_ok = 1;
    for (int i = 0; i < m.g.nt; i++) {
        const ir_tensor *p = &m.g.t[i];
        if (p->role != ROLE_PARAM) continue;
        long n = ir_numel(&p->shape, 1, 1);
        same &= memcmp(ref_data(a, i), ref_data(b, i), sizeof(double) * (size_t)n) == 0;
        if (p->init == INIT_NORMAL) differ |= memcmp(ref_data(a, i), ref_data(c, i), sizeof(double) * (size_t)n) != 0;
        if (p->init == INIT_DT_BIAS)
            for (long k = 0; k < n; k++) {
                double dt = log1p(exp(ref_data(a, i)[k]));
                dt_ok &= dt >= 1e-3 * 0.999 && dt <= 1e-1 * 1.001;
            }
    }
    ref_destroy(a);
    ref_destroy(b);
    ref_destroy(c);
    model_free(&m);
    CHECK(same, "same seed gave different parameters");
    CHECK(differ, "different seeds gave the same parameters");
    CHECK(dt_ok, "dt_bias does not map to dt in [1e-3, 1e-1]");
}

/* The residual projections are scaled by 1/sqrt(2 * layers). */
TEST(param_init_residual_scaling) {
    realm_model m;
    if (load(t, "models/realm-9m.lua", &m)) return;
    double resid = -1, plain = -1;
    for (int i = 0; i < m.g.nt; i++) {
        if (strcmp(m.g.t[i].name, "layers.0.mixer.out_proj.weight") == 0) resid = m.g.t[i].init_a;
        if (strcmp(m.g.t[i].name, "layers.0.mixer.in_proj.weight") == 0) plain = m.g.t[i].init_a;
    }
    model_free(&m);
    CHECK(fabs(plain - 0.02) < 1e-12, "in_proj std %g", plain);
    CHECK(fabs(resid - 0.02 / sqrt(16.0)) < 1e-12, "out_proj std %g", resid);
}

/* The model-language walkthrough (docs/models.md): a block written in the model file trains. */
TEST(model_example_user_block_gradients) {
    realm_model m;
    if (load(t, "models/examples/gated.lua", &m)) return;
    int found = 0;
    for (int i = 0; i < m.g.nt; i++) found |= strcmp(m.g.t[i].name, "layers.1.mixer.gate") == 0;
    char worst[128] = "";
    double e = gc_model_check(t, &m, 1, 20, 3, worst, sizeof worst);
    model_free(&m);
    CHECK(found, "the user block's parameter is missing");
    CHECK(e <= 1e-6, "normwise relative error %.3g (worst parameter %s)", e, worst);
}

/* cast (fp32 -> bf16 storage) passes the gradient through unchanged: d/dW of sum(dy * x W16^T)
 * is dy^T x whatever the rounding of W16, and it lands on W with no copy. The reference
 * rounds the cast's output to bf16 (values on the bf16 grid, distinct from W's). */
TEST(cast_gradient_is_identity) {
    ir_graph g;
    ir_init_graph(&g);
    int x = ir_tensor_new(&g, "x", ir_shape_make(3, (int[]){DIM_B, DIM_S, 8}), DT_F32, ROLE_INPUT);
    int w = ir_tensor_new(&g, "w", ir_shape_make(2, (int[]){6, 8}), DT_F32, ROLE_PARAM);
    int w16, y, dy, din[IR_MAX_IO], dout[IR_MAX_IO];
    CHECK(ir_emit(&g, "cast", &w, 1, NULL, NULL, &w16) == 1, "%s", g.err);
    CHECK(g.t[w16].dtype == DT_BF16, "cast makes dtype %d", g.t[w16].dtype);
    CHECK(ir_emit(&g, "matmul", (int[]){x, w16}, 2, NULL, NULL, &y) == 1, "%s", g.err);
    dy = ir_tensor_new(&g, "dy", g.t[y].shape, DT_F32, ROLE_INPUT);
    g.backward_start = g.nn;
    for (int i = 0; i < IR_MAX_IO; i++) dout[i] = din[i] = -1;
    dout[0] = dy;
    CHECK(op_get(g.n[1].op)->grad(&g, 1, dout, din) == 0, "%s", g.err);
    int dw16 = din[1], dw[IR_MAX_IO] = {-1};
    CHECK(op_get(g.n[0].op)->grad(&g, 0, &dw16, dw) == 0, "%s", g.err);
    CHECK(dw[0] == dw16 && g.t[dw[0]].dtype == DT_F32, "the gradient of w is tensor %d (%d through the cast)", dw[0], dw16);
    ref_ctx *c = ref_create(&g, 2, 3);
    for (int i = 0; i < 2 * 3 * 8; i++) ref_data(c, x)[i] = sin(0.7 * i + 0.1);
    for (int i = 0; i < 6 * 8; i++) ref_data(c, w)[i] = cos(1.3 * i) / 3.0;
    for (int i = 0; i < 2 * 3 * 6; i++) ref_data(c, dy)[i] = sin(0.37 * i - 1.0);
    ref_run(c, 0, g.nn);
    double maxd = 0, moved = 0;
    for (int n = 0; n < 6; n++)
        for (int k = 0; k < 8; k++) {
            double want = 0;
            for (int r = 0; r < 6; r++) want += ref_data(c, dy)[r * 6 + n] * ref_data(c, x)[r * 8 + k];
            maxd = fmax(maxd, fabs(ref_data(c, dw[0])[n * 8 + k] - want));
            moved = fmax(moved, fabs(ref_data(c, w16)[n * 8 + k] - ref_data(c, w)[n * 8 + k]));
        }
    ref_destroy(c);
    ir_free(&g);
    CHECK(maxd < 1e-12, "dW differs from dy^T x by %g", maxd);
    CHECK(moved > 0 && moved < 1.0 / 128, "the cast moved values by at most %g (bf16 rounding expected)", moved);
}

/* The bf16 storage pass on realm-9m (after autodiff, as a bf16 training session runs it):
 * every weight a matmul reads gets one cast, placed before its first reader, and no matmul
 * reads the fp32 weight any more; the normed activations, the gated / SwiGLU products and the
 * gradients of the MLP input projections become bf16 and are read only as matmul operands; producers and the forward/backward split
 * stay consistent after the insertions; the step's arena shrinks; an fp32 dialect refuses
 * the bf16 tensors with a message. */
TEST(bf16_storage_pass_realm9m) {
    realm_model m;
    char err[2048];
    if (load(t, "models/realm-9m.lua", &m)) return;
    ir_graph *g = &m.g;
    int mm = op_find("matmul"), wg = op_find("matmul_wgrad"), cast = op_find("cast"), rms = op_find("rmsnorm");
    int weights = 0, nfwd = g->backward_start;
    for (int p = 0; p < g->nt; p++) {
        int reads = 0;
        for (int i = 0; i < g->nn; i++) reads |= g->n[i].op == mm && g->n[i].in[1] == p;
        weights += reads && g->t[p].role == ROLE_PARAM;
    }
    int changed = ir_bf16_storage(g);
    CHECK(changed > weights, "the pass changed %d tensors for %d matmul weights: %s", changed, weights, g->err);
    CHECK(g->backward_start == nfwd + weights, "backward starts at %d, %d forward nodes and %d casts", g->backward_start,
          nfwd, weights);
    int casts = 0, half_norms = 0, half_ew = 0, half_grads = 0, bad = 0;
    for (int i = 0; i < g->nn; i++) {
        const ir_node *n = &g->n[i];
        for (int o = 0; o < n->nout; o++) bad += g->t[n->out[o]].producer != i;
        bad += n->backward != (i >= g->backward_start);
        if (n->op == cast) {
            casts++;
            bad += g->t[n->in[0]].role != ROLE_PARAM || i >= g->backward_start;
            int first = -1;
            for (int j = 0; j < g->nn && first < 0; j++)
                if (g->n[j].op == mm && g->n[j].in[1] == n->out[0]) first = j;
            bad += first != i + 1;
        }
        if (n->op == mm) bad += g->t[n->in[1]].role == ROLE_PARAM;   /* every weight read through its copy */
        if (n->op != cast && n->nout == 1 && g->t[n->out[0]].dtype == DT_BF16) {
            const int y = n->out[0], owner = g->t[y].base == y;
            half_norms += n->op == rms && owner;
            half_ew += op_get(n->op)->ew != NULL && owner;
            bad += n->op != rms && !op_get(n->op)->ew;
            for (int j = 0; j < g->nn; j++)
                for (int q = 0; q < g->n[j].nin; q++)
                    bad += g->t[g->n[j].in[q]].base == g->t[y].base &&
                           !(g->n[j].op == mm && q == 0 && g->n[j].in[q] == g->t[y].base) && g->n[j].op != wg;
        }
    }
    for (int v = 0; v < g->nt; v++) {
        const ir_tensor *x = &g->t[v];
        if (x->base == v && x->dtype == DT_BF16 && x->role == ROLE_GRAD) half_grads++;
        bad += x->dtype != g->t[x->base].dtype;   /* views share their owner's storage */
    }
    CHECK(bad == 0, "%d inconsistencies after the pass", bad);
    CHECK(casts == weights, "%d casts for %d weights", casts, weights);
    CHECK(half_norms == 17, "%d normed activations in bf16 (16 blocks and the final norm expected)", half_norms);
    CHECK(half_ew == 14, "%d elementwise products in bf16 (6 Mamba gates and 8 SwiGLU expected)", half_ew);
    CHECK(half_grads == 8, "%d gradients in bf16 (the 8 MLP input projections', written by the SwiGLU backward)",
          half_grads);
    plan half, full, cl;
    const plan_options bf = {.bf16 = 1};
    CHECK(plan_build_opts(&half, g, 0, g->nn, "cuda", NULL, 0, &bf, err, sizeof err) == 0, "%s", err);
    size_t a16 = plan_arena(&half, 8, 8192, NULL);
    plan_free(&half);
    CHECK(plan_build_opts(&cl, g, 0, g->nn, "opencl", NULL, 0, &bf, err, sizeof err) < 0, "an OpenCL plan took bf16 tensors");
    CHECK(strstr(err, "bf16") != NULL, "message: %s", err);
    model_free(&m);
    if (load(t, "models/realm-9m.lua", &m)) return;
    CHECK(plan_build_opts(&full, &m.g, 0, m.g.nn, "cuda", NULL, 0, &bf, err, sizeof err) == 0, "%s", err);
    size_t a32 = plan_arena(&full, 8, 8192, NULL);
    plan_free(&full);
    model_free(&m);
    printf("  arena at 8 x 8192: %.1f MiB with bf16 storage, %.1f MiB without\n", a16 / 1048576.0, a32 / 1048576.0);
    CHECK(a16 < a32, "arena %zu with bf16 storage, %zu without", a16, a32);
}
