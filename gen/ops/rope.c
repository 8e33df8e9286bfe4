/* Rotary position embedding: fp64 reference and the "rope" primitive.
 * One pair layout everywhere (design §7 pitfalls): pair i of a head is elements (2i, 2i+1),
 * rotated by pos * base^(-2i/Dh). */
#include "attention.h"

#include <math.h>
#include <stdio.h>

void rope_ref(long B, long S, long H, long Dh, long pos_offset, double base, int inverse,
              const double *x, long x_ld, double *y, long y_ld) {
    const double sign = inverse ? -1.0 : 1.0;
    for (long b = 0; b < B; b++)
        for (long s = 0; s < S; s++) {
            const double pos = (double)(s + pos_offset);
            const double *xr = x + (b * S + s) * x_ld;
            double *yr = y + (b * S + s) * y_ld;
            for (long i = 0; i < Dh / 2; i++) {
                /* The angle depends on (pos, i) only; every head shares it. */
                const double a = sign * pos * pow(base, -2.0 * (double)i / (double)Dh);
                const double c = cos(a), sn = sin(a);
                for (long h = 0; h < H; h++) {
                    const long e = h * Dh + 2 * i;
                    /* Read both before writing: y may alias x. */
                    const double x0 = xr[e], x1 = xr[e + 1];
                    yr[e] = x0 * c - x1 * sn;
                    yr[e + 1] = x0 * sn + x1 * c;
                }
            }
        }
}

#ifndef ATTN_MATH_ONLY
/* ---- primitive glue ---- */
#include "kgen.h"
#include "op.h"

enum { IA_INVERSE = 0, IA_POS_OFFSET = 1 };
enum { FA_BASE = 0 };

static int rope_infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt,
                      char *err, size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0);
    char buf[96];
    ir_shape_str(x, buf, sizeof buf);
    if (x->ndim < 3 || x->d[0] != DIM_B || x->d[1] != DIM_S)
        return OP_ERR("x must be [B,S,...,head_dim] (positions come from S), got %s", buf);
    for (int i = 2; i < x->ndim; i++)
        if (x->d[i] <= 0) return OP_ERR("x must be [B,S,...,head_dim] with constant features, got %s", buf);
    const long Dh = x->d[x->ndim - 1];
    if (Dh % 2 != 0) return OP_ERR("head_dim must be even (rotated in pairs), got %ld in %s", Dh, buf);
    if (n->ia[IA_INVERSE] != 0 && n->ia[IA_INVERSE] != 1)
        return OP_ERR("inverse must be 0 or 1, got %ld", n->ia[IA_INVERSE]);
    if (n->ia[IA_POS_OFFSET] < 0)
        return OP_ERR("pos_offset must be >= 0, got %ld", n->ia[IA_POS_OFFSET]);
    if (!isfinite(n->fa[FA_BASE]) || n->fa[FA_BASE] <= 1.0)
        return OP_ERR("base must be a finite number > 1, got %g", n->fa[FA_BASE]);
    if (op_in_dtype(g, n, 0) == DT_I32) return OP_ERR("x must be floating point");
    out[0] = *x;
    dt[0] = DT_F32;
    return 0;
}

/* The rotation is orthogonal, so its transpose (the gradient) is the inverse rotation. */
static int rope_grad(ir_graph *g, int node, const int *dout, int *din) {
    din[0] = -1;
    if (dout[0] < 0) return 0;
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    for (int i = 0; i < IR_MAX_IATTR; i++) ia[i] = g->n[node].ia[i];
    for (int i = 0; i < IR_MAX_FATTR; i++) fa[i] = g->n[node].fa[i];
    ia[IA_INVERSE] = !ia[IA_INVERSE];
    int out[IR_MAX_IO];
    if (ir_emit(g, "rope", &dout[0], 1, ia, fa, out) != 1) return -1;
    din[0] = out[0];
    return 0;
}

static void rope_op_ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), y = ref_get(c, n->out[0]);
    const ir_shape *xs = ref_shape(c, n->in[0]);
    const long Dh = xs->d[xs->ndim - 1];   /* heads = everything between [B,S] and Dh */
    rope_ref(ref_B(c), ref_S(c), x.feat / Dh, Dh, n->ia[IA_POS_OFFSET], n->fa[FA_BASE],
             (int)n->ia[IA_INVERSE], x.p, x.ld, y.p, y.ld);
}

/* Kernel: one work-item per (token, pair i); the angle is computed once and applied to pair i
 * of every head (the reference's loop order). Precision: the angle pos * base^(-2i/Dh) grows
 * with the position, and forming it in fp32 costs ~|angle| * 6e-8 radians. Instead the
 * frequency is baked as an unsigned 64-bit fixed-point count of turns per position,
 * G = round(2^64 * freq / 2pi); pos * G wraps modulo 2^64, i.e. modulo one turn, exactly, so
 * the reduced angle (read as a signed fraction of a turn, [-pi, pi)) is exact up to the fp32
 * conversion at any position. */
static int rope_emit(struct kgen *k, const ir_node *n) {
    const ir_graph *g = k->g;
    const int x = n->in[0], y = n->out[0];
    const ir_shape *xs = &g->t[x].shape;
    const long Dh = xs->d[xs->ndim - 1], NP = Dh / 2, H = kg_feat(k, x) / Dh;
    const long xld = kg_ld(k, x), yld = kg_ld(k, y);
    const double base = n->fa[FA_BASE];
    const int node = (int)(n - g->n);
    kg_begin(k, "rope", node, node + 1);
    kg_in(k, "x", x);
    kg_out(k, "y", y);
    /* The table lives in LOCAL memory, written by one work-item as immediates: a private
     * array indexed by a runtime value would be copied to every thread's stack. */
    kg_line(k, "LOCAL unsigned long G[%ld];", NP);
    kg_line(k, "if (LID_X == 0) {");
    for (long i = 0; i < NP; i++) {
        const double turns = pow(base, -2.0 * (double)i / (double)Dh) / (2.0 * 3.14159265358979323846);
        kg_line(k, "    G[%ld] = 0x%016lxUL;", i, (unsigned long)ldexp(turns, 64));   /* turns < 1/(2pi) */
    }
    kg_line(k, "}");
    kg_line(k, "BARRIER();");
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= T * %ld) return;   /* after the only barrier */", NP);
    kg_line(k, "const long tok = i / %ld;", NP);
    kg_line(k, "const int p = (int)(i %% %ld);", NP);
    kg_line(k, "const unsigned long pos = (unsigned long)(tok %% S + %ld);", n->ia[IA_POS_OFFSET]);
    /* Two's complement: the wrapped product read as signed is the angle in [-1/2, 1/2) turns. */
    kg_line(k, "const long turn = (long)(pos * G[p]);");
    const float rad = (float)((n->ia[IA_INVERSE] ? -2.0 : 2.0) * 3.14159265358979323846 / ldexp(1.0, 64));
    kg_line(k, "const float a = (float)turn * ((float)%.8ef);", (double)rad);
    kg_line(k, "const float c = COSF(a), sn = SINF(a);");
    kg_line(k, "GLOBAL const float *xr = x + tok * %ldL + 2 * p;", xld);
    kg_line(k, "GLOBAL float *yr = y + tok * %ldL + 2 * p;", yld);
    kg_line(k, "for (int h = 0; h < %ld; h++) {", H);
    kg_line(k, "    const float x0 = xr[h * %ld], x1 = xr[h * %ld + 1];", Dh, Dh);
    kg_line(k, "    yr[h * %ld] = x0 * c - x1 * sn;", Dh);
    kg_line(k, "    yr[h * %ld + 1] = x0 * sn + x1 * c;", Dh);
    kg_line(k, "}");
    kg_grid(k, 0, 0, 0, 0, NP, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

static double rope_flops(const ir_graph *g, const ir_node *n, long B, long S) {
    /* Two multiplies and an add per output element; the angles are shared by all heads. */
    return 3.0 * (double)ir_numel(op_in_shape(g, n, 0), B, S);
}

const op_def op_rope = {
    .name = "rope",
    .nin = 1, .nout = 1,
    .iattr = {"inverse", "pos_offset", NULL},
    .fattr = {"base", NULL},
    .ia_default = {0, 0},
    .fa_default = {10000.0},
    .infer = rope_infer,
    .grad = rope_grad,
    .ref = rope_op_ref,
    .flops = rope_flops,
    .emit = rope_emit,
};
#endif
