/* rmsnorm: y = x / sqrt(mean(x^2) + eps) * w over the last dim; x [..., d], w [d].
 * Gradient: rmsnorm_bwd(x, w, dy) -> (dx, dw) with r = 1/sqrt(mean(x^2)+eps):
 *   dx = r (w*dy) - r^3/d * x * sum(w*dy*x),   dw = sum over rows of dy * x * r. */
#include "kgen.h"
#include "op.h"

#include <math.h>
#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0), *w = op_in_shape(g, n, 1);
    if (x->ndim < 1 || ir_ntok_dims(x) == x->ndim) return OP_ERR("input needs a feature dim");
    if (w->ndim != 1 || w->d[0] != x->d[x->ndim - 1])
        return OP_ERR("weight must be [%d]", x->d[x->ndim - 1]);
    if (!(n->fa[0] > 0)) return OP_ERR("eps must be positive");
    out[0] = *x;
    dt[0] = DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    if (!ir_shape_eq(op_in_shape(g, n, 0), op_in_shape(g, n, 2))) return OP_ERR("x and dy shapes differ");
    out[0] = *op_in_shape(g, n, 0);
    out[1] = *op_in_shape(g, n, 1);
    dt[0] = dt[1] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int in[3] = {n.in[0], n.in[1], dout[0]};
    return ir_emit(g, "rmsnorm_bwd", in, 3, n.ia, n.fa, din) < 0 ? -1 : 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), w = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    long d = w.feat, rows = ref_rows(x, d);
    for (long r = 0; r < rows; r++) {
        const double *xr = ref_row(x, r, d);
        double *yr = ref_row(y, r, d), ss = 0;
        for (long i = 0; i < d; i++) ss += xr[i] * xr[i];
        double rs = 1.0 / sqrt(ss / (double)d + n->fa[0]);
        for (long i = 0; i < d; i++) yr[i] = xr[i] * rs * w.p[i];
    }
}

static void ref_bwd(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), w = ref_get(c, n->in[1]), dy = ref_get(c, n->in[2]);
    ref_buf dx = ref_get(c, n->out[0]), dw = ref_get(c, n->out[1]);
    long d = w.feat, rows = ref_rows(x, d);
    for (long i = 0; i < d; i++) dw.p[i] = 0;
    for (long r = 0; r < rows; r++) {
        const double *xr = ref_row(x, r, d), *dyr = ref_row(dy, r, d);
        double *dxr = ref_row(dx, r, d), ss = 0, dot = 0;
        for (long i = 0; i < d; i++) {
            ss += xr[i] * xr[i];
            dot += w.p[i] * dyr[i] * xr[i];
        }
        double rs = 1.0 / sqrt(ss / (double)d + n->fa[0]);
        for (long i = 0; i < d; i++) {
            dxr[i] = rs * w.p[i] * dyr[i] - rs * rs * rs / (double)d * xr[i] * dot;
            dw.p[i] += dyr[i] * xr[i] * rs;
        }
    }
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    return 4.0 * (double)ir_numel(&g->t[n->in[0]].shape, B, S);
}

/* ---- kernel templates ---- */

/* Element offset of row `r` (a C expression) of tensor t read as rows of `len` values: the
 * rows of one token are contiguous and tokens are ld apart (strided views). */
static const char *row_at(char *buf, size_t n, const kgen *k, int t, long len, const char *r) {
    long per = kg_feat(k, t) / len, ld = kg_ld(k, t);
    if (per == 1) snprintf(buf, n, "(%s) * %ld", r, ld);
    else snprintf(buf, n, "((%s) / %ld) * %ld + ((%s) %% %ld) * %ld", r, per, ld, r, per, len);
    return buf;
}

/* Grid dim 0: one group per row of t read as rows of d. */
static void grid_rows(kgen *k, int t, long per) {
    const ir_shape *s = &k->g->t[t].shape;
    int nt = ir_ntok_dims(s);
    if (nt == 2) kg_grid(k, 0, 0, 0, 0, per, 1);
    else if (nt == 1) kg_grid(k, 0, 0, s->d[0] == DIM_B ? per : 0, s->d[0] == DIM_S ? per : 0, 0, 1);
    else kg_grid(k, 0, per, 0, 0, 0, 1);
}

/* Work-group size for one row of d values: a power of two (tree reductions), 32..256. */
static int row_block(long d) {
    int bs = 32;
    while (bs < 256 && bs < d) bs *= 2;
    return bs;
}

/* Sum `var` over the work-group into red[0] in a fixed tree order. */
static void tree_sum(kgen *k, const char *red, const char *var, int bs) {
    kg_line(k, "%s[LID_X] = %s;", red, var);
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s = %d; s > 0; s >>= 1) {", bs / 2);
    kg_line(k, "    if (LID_X < s) %s[LID_X] += %s[LID_X + s];", red, red);
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
}

/* One work-group per row. */
static int emit(kgen *k, const ir_node *n) {
    int x = n->in[0], w = n->in[1], y = n->out[0];
    long d = kg_feat(k, w), per = kg_feat(k, x) / d;
    int bs = row_block(d), node = (int)(n - k->g->n);
    char rx[160], ry[160];
    kg_begin(k, "rmsnorm", node, node + 1);
    kg_in(k, "x", x);
    kg_in(k, "w", w);
    kg_out(k, "y", y);
    kg_line(k, "LOCAL float red[%d];", bs);
    kg_line(k, "GLOBAL float *xr = x + %s;", row_at(rx, sizeof rx, k, x, d, "GID_X"));
    kg_line(k, "GLOBAL float *yr = y + %s;", row_at(ry, sizeof ry, k, y, d, "GID_X"));
    kg_line(k, "float ss = 0.0f;");
    kg_line(k, "for (int f = LID_X; f < %ld; f += %d) ss += xr[f] * xr[f];", d, bs);
    tree_sum(k, "red", "ss", bs);
    kg_line(k, "const float rs = RSQRTF(red[0] / %ld.0f + %.9ef);", d, n->fa[0]);
    kg_line(k, "for (int f = LID_X; f < %ld; f += %d) yr[f] = xr[f] * rs * w[f];", d, bs);
    grid_rows(k, x, per);
    kg_block(k, bs, 1, 1);
    return kg_end(k);
}

#define DW_ROWS 8   /* rows per step of the dw kernel: 8 rows x 32 lanes = 256 work-items */

/* Two launches. dx: one work-group per row. dw: each work-item owns one feature and walks
 * every row in order (deterministic, overwrites dw); a group recomputes the 1/rms of DW_ROWS
 * rows at a time because nothing outside the IR tensors carries it between kernels. */
static int emit_bwd(kgen *k, const ir_node *n) {
    int x = n->in[0], w = n->in[1], dy = n->in[2], dx = n->out[0], dw = n->out[1];
    long d = kg_feat(k, w), per = kg_feat(k, x) / d;
    int bs = row_block(d), node = (int)(n - k->g->n);
    char rx[160], rdy[160], rdx[160];
    kg_begin(k, "rmsnorm_bwd_dx", node, node + 1);
    kg_in(k, "x", x);
    kg_in(k, "w", w);
    kg_in(k, "dy", dy);
    kg_out(k, "dx", dx);
    kg_line(k, "LOCAL float red[%d];", bs);
    kg_line(k, "LOCAL float red2[%d];", bs);
    kg_line(k, "GLOBAL float *xr = x + %s;", row_at(rx, sizeof rx, k, x, d, "GID_X"));
    kg_line(k, "GLOBAL float *dyr = dy + %s;", row_at(rdy, sizeof rdy, k, dy, d, "GID_X"));
    kg_line(k, "GLOBAL float *dxr = dx + %s;", row_at(rdx, sizeof rdx, k, dx, d, "GID_X"));
    kg_line(k, "float ss = 0.0f, dot = 0.0f;");
    kg_line(k, "for (int f = LID_X; f < %ld; f += %d) {", d, bs);
    kg_line(k, "    ss += xr[f] * xr[f];");
    kg_line(k, "    dot += w[f] * dyr[f] * xr[f];");
    kg_line(k, "}");
    kg_line(k, "red[LID_X] = ss;");
    kg_line(k, "red2[LID_X] = dot;");
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s = %d; s > 0; s >>= 1) {", bs / 2);
    kg_line(k, "    if (LID_X < s) {");
    kg_line(k, "        red[LID_X] += red[LID_X + s];");
    kg_line(k, "        red2[LID_X] += red2[LID_X + s];");
    kg_line(k, "    }");
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
    kg_line(k, "const float rs = RSQRTF(red[0] / %ld.0f + %.9ef);", d, n->fa[0]);
    kg_line(k, "const float c = rs * rs * rs / %ld.0f * red2[0];", d);
    kg_line(k, "for (int f = LID_X; f < %ld; f += %d) dxr[f] = rs * w[f] * dyr[f] - c * xr[f];", d, bs);
    grid_rows(k, x, per);
    kg_block(k, bs, 1, 1);
    if (kg_end(k) < 0) return -1;

    kg_begin(k, "rmsnorm_bwd_dw", node, node + 1);
    kg_in(k, "x", x);
    kg_in(k, "dy", dy);
    kg_out(k, "dw", dw);
    kg_line(k, "LOCAL float part[%d][33];", DW_ROWS);
    kg_line(k, "LOCAL float rsv[%d];", DW_ROWS);
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, x), per);
    kg_line(k, "const int f = (int)GID_X * 256 + LID_X, lane = LID_X %% 32, rw = LID_X / 32;");
    kg_line(k, "float acc = 0.0f;");
    kg_line(k, "for (long r0 = 0; r0 < M; r0 += %d) {", DW_ROWS);
    kg_line(k, "    const long r = r0 + rw;");
    kg_line(k, "    float ss = 0.0f;");
    kg_line(k, "    if (r < M) {");
    kg_line(k, "        GLOBAL float *xr = x + %s;", row_at(rx, sizeof rx, k, x, d, "r"));
    kg_line(k, "        for (int i = lane; i < %ld; i += 32) ss += xr[i] * xr[i];", d);
    kg_line(k, "    }");
    kg_line(k, "    part[rw][lane] = ss;");
    kg_line(k, "    BARRIER();");
    kg_line(k, "    if (LID_X < %d) {", DW_ROWS);
    kg_line(k, "        float s = 0.0f;");
    kg_line(k, "        for (int i = 0; i < 32; i++) s += part[LID_X][i];");
    kg_line(k, "        rsv[LID_X] = RSQRTF(s / %ld.0f + %.9ef);", d, n->fa[0]);
    kg_line(k, "    }");
    kg_line(k, "    BARRIER();");
    kg_line(k, "    if (f < %ld)", d);
    kg_line(k, "        for (int i = 0; i < %d && r0 + i < M; i++) {", DW_ROWS);
    kg_line(k, "            const long q = r0 + i;");
    kg_line(k, "            acc += dy[%s + f] * x[%s + f] * rsv[i];", row_at(rdy, sizeof rdy, k, dy, d, "q"),
            row_at(rx, sizeof rx, k, x, d, "q"));
    kg_line(k, "        }");
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
    kg_line(k, "if (f < %ld) dw[f] = acc;", d);
    kg_grid(k, 0, (d + 255) / 256, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_rmsnorm = {.name = "rmsnorm", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref,
                           .flops = flops, .emit = emit, .fattr = {"eps", NULL}, .fa_default = {1e-5}};
const op_def op_rmsnorm_bwd = {.name = "rmsnorm_bwd", .nin = 3, .nout = 2, .infer = infer_bwd, .ref = ref_bwd,
                               .flops = flops, .emit = emit_bwd, .fattr = {"eps", NULL}, .fa_default = {1e-5}};
