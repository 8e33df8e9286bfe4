/* Sliding-window attention and RoPE references: flash vs naive forward, window semantics,
 * finite-difference gradients, and (in the full build) the primitives' shape rules. */
#include "test.h"
#include "ops/attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A strided [ntok, feat] buffer: ld = feat + pad, pad elements NaN so a reference that reads
 * or writes outside the features is caught. */
typedef struct {
    double *p;
    long ntok, feat, ld;
} tbuf;

static tbuf tb_new(long ntok, long feat, long pad) {
    tbuf b = {NULL, ntok, feat, feat + pad};
    b.p = malloc((size_t)(ntok * b.ld) * sizeof *b.p);
    for (long i = 0; i < ntok * b.ld; i++) b.p[i] = NAN;
    return b;
}

static void tb_randn(tctx *t, tbuf *b) {
    for (long i = 0; i < b->ntok; i++)
        for (long f = 0; f < b->feat; f++) b->p[i * b->ld + f] = t_normal(t);
}

/* Packs the features into a dense array so the comparison helpers can be used. */
static double *tb_dense(const tbuf *b) {
    double *d = malloc((size_t)(b->ntok * b->feat) * sizeof *d);
    for (long i = 0; i < b->ntok; i++)
        memcpy(d + i * b->feat, b->p + i * b->ld, (size_t)b->feat * sizeof *d);
    return d;
}

static double tb_relerr(const tbuf *a, const tbuf *b) {
    double *x = tb_dense(a), *y = tb_dense(b);
    double e = t_relerr(x, y, a->ntok * a->feat);
    free(x);
    free(y);
    return e;
}

/* Poisons the features (pads already are): a reference that forgets an element fails. */
static void tb_poison(tbuf *b) {
    for (long i = 0; i < b->ntok * b->ld; i++) b->p[i] = NAN;
}

/* Pads pad-NaNs too, which relerr ignores; this catches writes into the pads. */
static int tb_pads_nan(const tbuf *b) {
    for (long i = 0; i < b->ntok; i++)
        for (long f = b->feat; f < b->ld; f++)
            if (!isnan(b->p[i * b->ld + f])) return 0;
    return 1;
}

typedef struct {
    attn_dims d;
    tbuf q, k, v;
} attn_case;

static attn_case case_new(tctx *t, long B, long S, long H, long Hkv, long Dh, long window,
                          int strided) {
    attn_case c;
    c.d = (attn_dims){B, S, H, Hkv, Dh, window, 1.0 / sqrt((double)Dh)};
    long ntok = B * S;
    c.q = tb_new(ntok, H * Dh, strided ? t_randint(t, 1, 7) : 0);
    c.k = tb_new(ntok, Hkv * Dh, strided ? t_randint(t, 1, 7) : 0);
    c.v = tb_new(ntok, Hkv * Dh, strided ? t_randint(t, 1, 7) : 0);
    tb_randn(t, &c.q);
    tb_randn(t, &c.k);
    tb_randn(t, &c.v);
    return c;
}

static void case_free(attn_case *c) {
    free(c->q.p);
    free(c->k.p);
    free(c->v.p);
}

static void fwd(const attn_case *c, tbuf *o, tbuf *lse, int naive) {
    (naive ? attn_ref_naive : attn_ref_forward)(&c->d, c->q.p, c->q.ld, c->k.p, c->k.ld, c->v.p,
                                                c->v.ld, o->p, o->ld, lse->p, lse->ld);
}

TEST(attention_flash_matches_naive) {
    /* B, S, H, Hkv, Dh, window, strided */
    static const long cases[][7] = {
        {1, 37, 2, 2, 8, 100, 0},   /* window > S: plain causal */
        {1, 37, 2, 2, 8, 37, 1},    /* window == S */
        {2, 29, 2, 1, 4, 1, 1},     /* window 1: each query sees only itself */
        {2, 50, 4, 2, 8, 21, 1},    /* GQA, window not a multiple of the block */
        {1, 48, 1, 1, 16, 16, 0},   /* one head, S and window multiples of the block */
        {3, 33, 1, 1, 5, 7, 1},     /* odd head dim, small window, S % block = 1 */
        {2, 45, 6, 3, 3, 17, 1},    /* window one past the block */
        {1, 5, 4, 1, 8, 3, 1},      /* S shorter than one block, multi-query */
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const long *p = cases[ci];
        attn_case c = case_new(t, p[0], p[1], p[2], p[3], p[4], p[5], (int)p[6]);
        long ntok = p[0] * p[1], pad = p[6] ? 3 : 0;
        tbuf o1 = tb_new(ntok, p[2] * p[4], pad), o2 = tb_new(ntok, p[2] * p[4], pad);
        tbuf l1 = tb_new(ntok, p[2], pad), l2 = tb_new(ntok, p[2], pad);
        fwd(&c, &o1, &l1, 0);
        fwd(&c, &o2, &l2, 1);
        double eo = tb_relerr(&o1, &o2), el = tb_relerr(&l1, &l2);
        int pads = tb_pads_nan(&o1) && tb_pads_nan(&l1);
        case_free(&c);
        free(o1.p); free(o2.p); free(l1.p); free(l2.p);
        CHECK(eo <= 1e-12, "case %zu: o relerr %.3g", ci, eo);
        CHECK(el <= 1e-12, "case %zu: lse relerr %.3g", ci, el);
        CHECK(pads, "case %zu: forward wrote into the stride padding", ci);
    }
}

/* Independent of both implementations: window 1 returns v of the own position, and a key
 * change at position p affects exactly the queries p .. p+window-1 of its own sequence. */
TEST(attention_window_semantics) {
    attn_case c = case_new(t, 2, 40, 4, 2, 6, 1, 1);
    long ntok = 80;
    tbuf o = tb_new(ntok, 24, 2), lse = tb_new(ntok, 4, 0);
    fwd(&c, &o, &lse, 0);
    double worst = 0;
    for (long tk = 0; tk < ntok; tk++)
        for (long h = 0; h < 4; h++) {
            const double *qi = c.q.p + tk * c.q.ld + h * 6, *kj = c.k.p + tk * c.k.ld + (h / 2) * 6;
            double s = 0;
            for (long e = 0; e < 6; e++) {
                worst = fmax(worst, fabs(o.p[tk * o.ld + h * 6 + e] - c.v.p[tk * c.v.ld + (h / 2) * 6 + e]));
                s += qi[e] * kj[e];
            }
            worst = fmax(worst, fabs(lse.p[tk * lse.ld + h] - s / sqrt(6.0)));
        }
    CHECK(worst <= 1e-13, "window 1: o != v or lse != score (max err %.3g)", worst);

    c.d.window = 13;
    const long p = t_randint(t, 0, 39), b = t_randint(t, 0, 1);
    tbuf o2 = tb_new(ntok, 24, 2), lse2 = tb_new(ntok, 4, 0);
    fwd(&c, &o, &lse, 0);
    for (long e = 0; e < c.k.feat; e++) c.k.p[(b * 40 + p) * c.k.ld + e] += 0.5;
    fwd(&c, &o2, &lse2, 0);
    int bad = -1;
    for (long tk = 0; tk < ntok && bad < 0; tk++) {
        const long s = tk % 40;
        const int expect = tk / 40 == b && s >= p && s < p + 13;
        /* lse too: a query whose only visible key is the changed one keeps o = v */
        const int changed = memcmp(o.p + tk * o.ld, o2.p + tk * o2.ld, 24 * sizeof(double)) != 0 ||
                            memcmp(lse.p + tk * lse.ld, lse2.p + tk * lse2.ld, 4 * sizeof(double)) != 0;
        if (expect != changed) bad = (int)tk;
    }
    case_free(&c);
    free(o.p); free(lse.p); free(o2.p); free(lse2.p);
    CHECK(bad < 0, "key at b=%ld s=%ld, window 13: token %d %s", b, p, bad,
          "changed when it should not (or vice versa)");
}

/* L = sum(W .* o); its gradient through the reference backward vs central differences. */
static double lin_loss(const attn_case *c, const tbuf *W, tbuf *o, tbuf *lse) {
    fwd(c, o, lse, 0);
    double L = 0;
    for (long i = 0; i < o->ntok; i++)
        for (long f = 0; f < o->feat; f++) L += W->p[i * W->ld + f] * o->p[i * o->ld + f];
    return L;
}

TEST(attention_backward_fd) {
    const long B = 2, S = 23, H = 4, Hkv = 2, Dh = 6;
    attn_case c = case_new(t, B, S, H, Hkv, Dh, 7, 1);
    c.d.scale = 0.7;   /* a non-default scale must flow through every term */
    const long ntok = B * S;
    tbuf W = tb_new(ntok, H * Dh, 1), o = tb_new(ntok, H * Dh, 2), lse = tb_new(ntok, H, 1);
    tb_randn(t, &W);
    lin_loss(&c, &W, &o, &lse);
    tbuf dq = tb_new(ntok, H * Dh, 3), dk = tb_new(ntok, Hkv * Dh, 1), dv = tb_new(ntok, Hkv * Dh, 2);
    attn_ref_backward(&c.d, c.q.p, c.q.ld, c.k.p, c.k.ld, c.v.p, c.v.ld, o.p, o.ld, lse.p, lse.ld,
                      W.p, W.ld, dq.p, dq.ld, dk.p, dk.ld, dv.p, dv.ld);
    /* Bitwise determinism: a second call must reproduce every bit. */
    tbuf dk2 = tb_new(ntok, Hkv * Dh, 1), dv2 = tb_new(ntok, Hkv * Dh, 2), dq2 = tb_new(ntok, H * Dh, 3);
    attn_ref_backward(&c.d, c.q.p, c.q.ld, c.k.p, c.k.ld, c.v.p, c.v.ld, o.p, o.ld, lse.p, lse.ld,
                      W.p, W.ld, dq2.p, dq2.ld, dk2.p, dk2.ld, dv2.p, dv2.ld);
    int same = 1;
    for (long i = 0; i < ntok; i++) {
        same &= memcmp(dk.p + i * dk.ld, dk2.p + i * dk.ld, (size_t)dk.feat * sizeof(double)) == 0;
        same &= memcmp(dv.p + i * dv.ld, dv2.p + i * dv.ld, (size_t)dv.feat * sizeof(double)) == 0;
        same &= memcmp(dq.p + i * dq.ld, dq2.p + i * dq.ld, (size_t)dq.feat * sizeof(double)) == 0;
    }
    int pads = tb_pads_nan(&dq) && tb_pads_nan(&dk) && tb_pads_nan(&dv);

    tbuf *xs[3] = {&c.q, &c.k, &c.v}, *gs[3] = {&dq, &dk, &dv};
    static const char *const nm[3] = {"dq", "dk", "dv"};
    double err[3];
    const double h = 1e-5;
    for (int a = 0; a < 3; a++) {
        tbuf fd = tb_new(xs[a]->ntok, xs[a]->feat, 0);
        for (long i = 0; i < xs[a]->ntok; i++)
            for (long f = 0; f < xs[a]->feat; f++) {
                double *x = &xs[a]->p[i * xs[a]->ld + f], x0 = *x;
                *x = x0 + h;
                double Lp = lin_loss(&c, &W, &o, &lse);
                *x = x0 - h;
                double Lm = lin_loss(&c, &W, &o, &lse);
                *x = x0;
                fd.p[i * fd.ld + f] = (Lp - Lm) / (2 * h);
            }
        err[a] = tb_relerr(gs[a], &fd);
        free(fd.p);
    }
    case_free(&c);
    free(W.p); free(o.p); free(lse.p); free(dq.p); free(dk.p); free(dv.p);
    free(dq2.p); free(dk2.p); free(dv2.p);
    for (int a = 0; a < 3; a++) CHECK(err[a] <= 1e-6, "%s relerr vs finite differences %.3g", nm[a], err[a]);
    CHECK(same, "backward is not bitwise reproducible");
    CHECK(pads, "backward wrote into the stride padding");
}

/* The backward overwrites: stale NaN in the outputs must not survive. */
TEST(attention_backward_overwrites) {
    attn_case c = case_new(t, 1, 20, 2, 1, 4, 5, 0);
    tbuf o = tb_new(20, 8, 0), lse = tb_new(20, 2, 0), dO = tb_new(20, 8, 0);
    tb_randn(t, &dO);
    fwd(&c, &o, &lse, 0);
    tbuf dq = tb_new(20, 8, 0), dk = tb_new(20, 4, 0), dv = tb_new(20, 4, 0);
    tb_poison(&dq);
    tb_poison(&dk);
    tb_poison(&dv);
    attn_ref_backward(&c.d, c.q.p, c.q.ld, c.k.p, c.k.ld, c.v.p, c.v.ld, o.p, o.ld, lse.p, lse.ld,
                      dO.p, dO.ld, dq.p, dq.ld, dk.p, dk.ld, dv.p, dv.ld);
    int nan = 0;
    for (long i = 0; i < 20 * 8; i++) nan |= isnan(dq.p[i]);
    for (long i = 0; i < 20 * 4; i++) nan |= isnan(dk.p[i]) || isnan(dv.p[i]);
    case_free(&c);
    free(o.p); free(lse.p); free(dO.p); free(dq.p); free(dk.p); free(dv.p);
    CHECK(!nan, "backward left an output element unwritten");
}

TEST(attention_visible_pairs) {
    for (long S = 1; S <= 40; S++)
        for (long w = 1; w <= 45; w++) {
            long n = 0;
            for (long s = 0; s < S; s++) n += s + 1 < w ? s + 1 : w;
            CHECK(attn_visible_pairs(S, w) == (double)n, "S=%ld window=%ld: %g != %ld", S, w,
                  attn_visible_pairs(S, w), n);
        }
}

TEST(rope_roundtrip_and_values) {
    const long B = 2, S = 19, H = 3, Dh = 10, off = 5;
    tbuf x = tb_new(B * S, H * Dh, 2), y = tb_new(B * S, H * Dh, 1), z = tb_new(B * S, H * Dh, 0);
    tb_randn(t, &x);
    rope_ref(B, S, H, Dh, off, 10000.0, 0, x.p, x.ld, y.p, y.ld);
    rope_ref(B, S, H, Dh, off, 10000.0, 1, y.p, y.ld, z.p, z.ld);
    double e = tb_relerr(&z, &x);
    /* Pair 0 turns by exactly pos radians; the last pair by pos * base^(-(Dh-2)/Dh). */
    double worst = 0;
    for (long tk = 0; tk < B * S; tk++) {
        const double pos = (double)(tk % S + off);
        for (long h = 0; h < H; h++) {
            const double *xr = x.p + tk * x.ld + h * Dh, *yr = y.p + tk * y.ld + h * Dh;
            worst = fmax(worst, fabs(yr[0] - (xr[0] * cos(pos) - xr[1] * sin(pos))));
            worst = fmax(worst, fabs(yr[1] - (xr[0] * sin(pos) + xr[1] * cos(pos))));
            const double a = pos * pow(10000.0, -(double)(Dh - 2) / (double)Dh);
            worst = fmax(worst, fabs(yr[Dh - 2] - (xr[Dh - 2] * cos(a) - xr[Dh - 1] * sin(a))));
        }
    }
    /* In place gives the same result. */
    tbuf w = tb_new(B * S, H * Dh, 2);
    memcpy(w.p, x.p, (size_t)(B * S * w.ld) * sizeof *w.p);
    rope_ref(B, S, H, Dh, off, 10000.0, 0, w.p, w.ld, w.p, w.ld);
    double ei = tb_relerr(&w, &y);
    int pads = tb_pads_nan(&y) && tb_pads_nan(&w);
    free(x.p); free(y.p); free(z.p); free(w.p);
    CHECK(e <= 1e-14, "inverse(rope(x)) != x: relerr %.3g", e);
    CHECK(worst <= 1e-12, "rotation angles wrong: max err %.3g", worst);
    CHECK(ei == 0, "in-place rope differs: relerr %.3g", ei);
    CHECK(pads, "rope wrote into the stride padding");
}

/* d/dx of sum(W .* rope(x)) must be rope_inverse(W): the gradient rule of the primitive. */
TEST(rope_backward_fd) {
    const long B = 2, S = 11, H = 2, Dh = 8, off = 3;
    const double base = 500.0;
    tbuf x = tb_new(B * S, H * Dh, 1), y = tb_new(B * S, H * Dh, 0), W = tb_new(B * S, H * Dh, 2);
    tbuf g = tb_new(B * S, H * Dh, 0), fd = tb_new(B * S, H * Dh, 0);
    tb_randn(t, &x);
    tb_randn(t, &W);
    rope_ref(B, S, H, Dh, off, base, 1, W.p, W.ld, g.p, g.ld);
    const double h = 1e-5;
    for (long i = 0; i < x.ntok; i++)
        for (long f = 0; f < x.feat; f++) {
            double L[2];
            for (int sgn = 0; sgn < 2; sgn++) {
                double x0 = x.p[i * x.ld + f];
                x.p[i * x.ld + f] = x0 + (sgn ? -h : h);
                rope_ref(B, S, H, Dh, off, base, 0, x.p, x.ld, y.p, y.ld);
                x.p[i * x.ld + f] = x0;
                L[sgn] = 0;
                for (long r = 0; r < y.ntok; r++)
                    for (long e = 0; e < y.feat; e++) L[sgn] += W.p[r * W.ld + e] * y.p[r * y.ld + e];
            }
            fd.p[i * fd.ld + f] = (L[0] - L[1]) / (2 * h);
        }
    double e = tb_relerr(&g, &fd);
    free(x.p); free(y.p); free(W.p); free(g.p); free(fd.p);
    CHECK(e <= 1e-6, "rope gradient relerr vs finite differences %.3g", e);
}

#ifndef ATTN_MATH_ONLY
/* ---- the primitives through the IR and the reference executor ---- */
#include "op.h"
#include "reference.h"

static int qkv(ir_graph *g, int H, int Hkv, int Dh, int *in) {
    const int qd[4] = {DIM_B, DIM_S, H, Dh}, kd[4] = {DIM_B, DIM_S, Hkv, Dh};
    in[0] = ir_tensor_new(g, "q", ir_shape_make(4, qd), DT_F32, ROLE_ACT);
    in[1] = ir_tensor_new(g, "k", ir_shape_make(4, kd), DT_F32, ROLE_ACT);
    in[2] = ir_tensor_new(g, "v", ir_shape_make(4, kd), DT_F32, ROLE_ACT);
    return 0;
}

TEST(attention_shape_rules) {
    ir_graph g;
    ir_init_graph(&g);
    int in[3], out[IR_MAX_IO];
    long ia[IR_MAX_IATTR] = {0};
    double fa[IR_MAX_FATTR] = {0};
    qkv(&g, 4, 2, 8, in);
    ia[0] = 16;
    int r = ir_emit(&g, "attention", in, 3, ia, fa, out);
    int ok_shapes = r == 2 && g.t[out[0]].shape.ndim == 4 && g.t[out[0]].shape.d[2] == 4 &&
                    g.t[out[0]].shape.d[3] == 8 && g.t[out[1]].shape.ndim == 3 &&
                    g.t[out[1]].shape.d[1] == DIM_S && g.t[out[1]].shape.d[2] == 4;
    char err0[sizeof g.err];
    snprintf(err0, sizeof err0, "%s", g.err);
    ia[0] = 0;
    int r_win = ir_emit(&g, "attention", in, 3, ia, fa, out);
    int win_msg = strstr(g.err, "window") != NULL;
    ia[0] = 8;
    int bad[3];
    qkv(&g, 4, 3, 8, bad);
    int r_gqa = ir_emit(&g, "attention", bad, 3, ia, fa, out);
    int gqa_msg = strstr(g.err, "multiple") != NULL;
    const int xd[4] = {DIM_B, DIM_S, 2, 7};
    int x = ir_tensor_new(&g, "x", ir_shape_make(4, xd), DT_F32, ROLE_ACT);
    long ria[IR_MAX_IATTR] = {0, 0};
    double rfa[IR_MAX_FATTR] = {10000.0};
    int r_odd = ir_emit(&g, "rope", &x, 1, ria, rfa, out);
    ir_free(&g);
    CHECK(r == 2, "valid attention rejected: %s", err0);
    CHECK(ok_shapes, "attention output shapes wrong");
    CHECK(r_win < 0 && win_msg, "window 0 accepted or unclear message");
    CHECK(r_gqa < 0 && gqa_msg, "H=4, Hkv=3 accepted or unclear message");
    CHECK(r_odd < 0, "odd head_dim accepted by rope");
}

/* q, k, v as zero-copy slices of one projection (so ld > features), the default scale,
 * the gradient rule's wiring, and rope's through the executor, all against the maths API. */
TEST(attention_op_glue) {
    const int B = 2, S = 21, H = 4, Hkv = 2, Dh = 6, win = 9;
    const int F = (H + 2 * Hkv) * Dh;
    ir_graph g;
    ir_init_graph(&g);
    const int pd[3] = {DIM_B, DIM_S, F}, qd[4] = {DIM_B, DIM_S, H, Dh}, kd[4] = {DIM_B, DIM_S, Hkv, Dh};
    int proj = ir_tensor_new(&g, "proj", ir_shape_make(3, pd), DT_F32, ROLE_INPUT);
    int dO = ir_tensor_new(&g, "do", ir_shape_make(4, qd), DT_F32, ROLE_INPUT);
    int in[3];
    in[0] = ir_view(&g, proj, ir_shape_make(4, qd), 0, "q");
    in[1] = ir_view(&g, proj, ir_shape_make(4, kd), H * Dh, "k");
    in[2] = ir_view(&g, proj, ir_shape_make(4, kd), (H + Hkv) * Dh, "v");
    long ia[IR_MAX_IATTR] = {win};
    double fa[IR_MAX_FATTR] = {0};
    int out[IR_MAX_IO], rout[IR_MAX_IO];
    int node = ir_emit(&g, "attention", in, 3, ia, fa, out) == 2 ? g.nn - 1 : -1;
    long ria[IR_MAX_IATTR] = {0, 3};
    double rfa[IR_MAX_FATTR] = {100.0};
    int rnode = ir_emit(&g, "rope", &in[0], 1, ria, rfa, rout) == 1 ? g.nn - 1 : -1;
    int dout[2] = {dO, -1}, din[3] = {-1, -1, -1}, rdin = -1;
    int gr = node < 0 ? -1 : op_get(g.n[node].op)->grad(&g, node, dout, din);
    int rgr = rnode < 0 ? -1 : op_get(g.n[rnode].op)->grad(&g, rnode, &dO, &rdin);
    if (node < 0 || rnode < 0 || gr < 0 || rgr < 0 || din[0] < 0 || din[1] < 0 || din[2] < 0 ||
        rdin < 0) {
        char msg[sizeof g.err];
        snprintf(msg, sizeof msg, "%s", g.err);
        ir_free(&g);
        CHECK(0, "building the graph failed: %s", msg);
    }
    ref_ctx *c = ref_create(&g, B, S);
    const long ntok = (long)B * S;
    double *P = ref_data(c, proj), *D = ref_data(c, dO);
    for (long i = 0; i < ntok * F; i++) P[i] = t_normal(t);
    for (long i = 0; i < ntok * H * Dh; i++) D[i] = t_normal(t);
    ref_run(c, 0, g.nn);

    attn_dims d = {B, S, H, Hkv, Dh, win, 1.0 / sqrt((double)Dh)};
    double *o = malloc(sizeof(double) * (size_t)(ntok * H * Dh)), *lse = malloc(sizeof(double) * (size_t)(ntok * H));
    double *dq = malloc(sizeof(double) * (size_t)(ntok * H * Dh));
    double *dk = malloc(sizeof(double) * (size_t)(ntok * Hkv * Dh)), *dv = malloc(sizeof(double) * (size_t)(ntok * Hkv * Dh));
    double *rq = malloc(sizeof(double) * (size_t)(ntok * H * Dh)), *rg = malloc(sizeof(double) * (size_t)(ntok * H * Dh));
    attn_ref_naive(&d, P, F, P + H * Dh, F, P + (H + Hkv) * Dh, F, o, H * Dh, lse, H);
    attn_ref_backward(&d, P, F, P + H * Dh, F, P + (H + Hkv) * Dh, F, o, H * Dh, lse, H, D, H * Dh,
                      dq, H * Dh, dk, Hkv * Dh, dv, Hkv * Dh);
    rope_ref(B, S, H, Dh, 3, 100.0, 0, P, F, rq, H * Dh);
    rope_ref(B, S, H, Dh, 3, 100.0, 1, D, H * Dh, rg, H * Dh);
    const ref_buf bo = ref_get(c, out[0]), bl = ref_get(c, out[1]), bq = ref_get(c, din[0]);
    const ref_buf bk = ref_get(c, din[1]), bv = ref_get(c, din[2]);
    const ref_buf br = ref_get(c, rout[0]), brg = ref_get(c, rdin);
    int dense = bo.ld == H * Dh && bl.ld == H && bq.ld == H * Dh && bk.ld == Hkv * Dh &&
                bv.ld == Hkv * Dh && br.ld == H * Dh && brg.ld == H * Dh;
    double e[7] = {INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY};
    if (dense) {
        e[0] = t_relerr(bo.p, o, ntok * H * Dh);
        e[1] = t_relerr(bl.p, lse, ntok * H);
        e[2] = t_relerr(bq.p, dq, ntok * H * Dh);
        e[3] = t_relerr(bk.p, dk, ntok * Hkv * Dh);
        e[4] = t_relerr(bv.p, dv, ntok * Hkv * Dh);
        e[5] = t_relerr(br.p, rq, ntok * H * Dh);
        e[6] = t_relerr(brg.p, rg, ntok * H * Dh);
    }
    ref_destroy(c);
    ir_free(&g);
    free(o); free(lse); free(dq); free(dk); free(dv); free(rq); free(rg);
    CHECK(dense, "outputs are expected to be fresh dense tensors");
    static const char *const nm[7] = {"o", "lse", "dq", "dk", "dv", "rope", "rope grad"};
    for (int i = 0; i < 7; i++) CHECK(e[i] <= 1e-12, "%s through the executor: relerr %.3g", nm[i], e[i]);
}
#endif
