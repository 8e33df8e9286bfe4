/* rmsnorm: y = x / sqrt(mean(x^2) + eps) * w over the last dim; x [..., d], w [d]. Attribute
 * bf16_out: y is stored as bf16 (set by gen/precision.c when only bf16 matmuls read it).
 * Gradient: rmsnorm_bwd(x, w, dy) -> (dx, dw, dw_partial) with r = 1/sqrt(mean(x^2)+eps):
 *   dx = r (w*dy) - r^3/d * x * sum(w*dy*x),   dw = sum over rows of dy * x * r.
 * dw_partial [RMS_CHUNKS, d] is a workspace nobody differentiates: the rows are split into
 * RMS_CHUNKS fixed chunks and row c of it holds chunk c's share of dw, so the weight gradient is
 * a two-level reduction in a fixed order (deterministic, no atomics) instead of one serial loop
 * over every token.
 * An optional fourth input `acc` (same shape as x) is added to dx: autodiff hands it the other
 * contributions to x's gradient (the residual stream's), so the sum costs no separate pass. */
#include "kgen.h"
#include "op.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* Chunks of rows for dw. A constant, not a function of B and S, so the workspace's shape is
 * static. 1024 work-groups of 256: at 512, about 400 fit an H100 at once (132 SMs), so a
 * second, mostly empty wave took a third of the time; the partials are 1024 x d floats
 * (1.5 MB at d = 384). */
#define RMS_CHUNKS 1024

/* Rows per chunk: chunk c owns rows [c * per, (c + 1) * per); the kernels and the reference
 * split the rows the same way, so the workspace can be checked like any output. */
static long chunk_rows(long rows) { return (rows + RMS_CHUNKS - 1) / RMS_CHUNKS; }

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0), *w = op_in_shape(g, n, 1);
    if (x->ndim < 1 || ir_ntok_dims(x) == x->ndim) return OP_ERR("input needs a feature dim");
    if (w->ndim != 1 || w->d[0] != x->d[x->ndim - 1])
        return OP_ERR("weight must be [%d]", x->d[x->ndim - 1]);
    if (!(n->fa[0] > 0)) return OP_ERR("eps must be positive");
    out[0] = *x;
    dt[0] = n->ia[0] ? DT_BF16 : DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    if (!ir_shape_eq(op_in_shape(g, n, 0), op_in_shape(g, n, 2))) return OP_ERR("x and dy shapes differ");
    if (n->nin > 4) return OP_ERR("at most 4 inputs (x, w, dy, acc)");
    if (n->nin == 4 && !ir_shape_eq(op_in_shape(g, n, 0), op_in_shape(g, n, 3))) return OP_ERR("x and acc shapes differ");
    const ir_shape *w = op_in_shape(g, n, 1);
    if (w->ndim != 1) return OP_ERR("weight must be one-dimensional");
    out[0] = *op_in_shape(g, n, 0);
    out[1] = *w;
    out[2] = ir_shape_make(2, (int[]){RMS_CHUNKS, w->d[0]});
    dt[0] = dt[1] = dt[2] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int in[3] = {n.in[0], n.in[1], dout[0]}, out[IR_MAX_IO];
    if (ir_emit(g, "rmsnorm_bwd", in, 3, NULL, n.fa, out) < 0) return -1;
    din[0] = out[0];   /* out[2], the dw workspace, is no gradient of anything */
    din[1] = out[1];
    return 0;
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
    ref_buf dx = ref_get(c, n->out[0]), dw = ref_get(c, n->out[1]), part = ref_get(c, n->out[2]);
    ref_buf acc = n->nin == 4 ? ref_get(c, n->in[3]) : (ref_buf){0};
    long d = w.feat, rows = ref_rows(x, d), per = chunk_rows(rows);
    for (long i = 0; i < d; i++) dw.p[i] = 0;
    memset(part.p, 0, sizeof(double) * (size_t)(RMS_CHUNKS * d));
    for (long r = 0; r < rows; r++) {
        const double *xr = ref_row(x, r, d), *dyr = ref_row(dy, r, d);
        double *dxr = ref_row(dx, r, d), ss = 0, dot = 0;
        for (long i = 0; i < d; i++) {
            ss += xr[i] * xr[i];
            dot += w.p[i] * dyr[i] * xr[i];
        }
        double rs = 1.0 / sqrt(ss / (double)d + n->fa[0]);
        for (long i = 0; i < d; i++) {
            dxr[i] = (acc.p ? ref_row(acc, r, d)[i] : 0.0) + rs * w.p[i] * dyr[i] - rs * rs * rs / (double)d * xr[i] * dot;
            dw.p[i] += dyr[i] * xr[i] * rs;
            part.p[(r / per) * d + i] += dyr[i] * xr[i] * rs;
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

/* Grid dim 0: one group per `div` rows of t read as rows of d. */
static void grid_rows(kgen *k, int t, long per, long div) {
    const ir_shape *s = &k->g->t[t].shape;
    int nt = ir_ntok_dims(s);
    if (nt == 2) kg_grid(k, 0, 0, 0, 0, per, div);
    else if (nt == 1) kg_grid(k, 0, 0, s->d[0] == DIM_B ? per : 0, s->d[0] == DIM_S ? per : 0, 0, div);
    else kg_grid(k, 0, per, 0, 0, 0, div);
}

/* Threads per row ("team") in rmsnorm and rmsnorm_bwd_dx: 32 (one warp) for the usual widths, fewer for
 * narrow rows so lanes are not idle, more for very wide ones so a thread keeps at most 16
 * values of a row in registers. A power of two (tree reductions) dividing 256. */
static int team_size(long d) {
    int rt = 1;
    while (rt < 256 && (long)rt * 16 < d) rt *= 2;
    int lo = 1;
    while (lo < 32 && lo < d) lo *= 2;
    return rt > lo ? rt : lo;
}

/* The generator unrolls the per-lane values into scalars (no register arrays). Only the last
 * slot can run past the row end; its lanes there hold zeros and store nothing. */
static const char *slot_guard(char *buf, size_t n, int i, int rt, long d) {
    if ((long)(i + 1) * rt > d) snprintf(buf, n, "if (f%d < %ld) ", i, d);
    else buf[0] = 0;
    return buf;
}

/* The sums of the team's partials `v[0..nv)` (one per lane), left in those variables in every
 * lane of the team. A fixed tree (lane l adds lane l + s, s = RT/2 .. 1): in LOCAL arrays
 * `arr[i]` behind barriers, or, on CUDA with a team of one warp, the same tree in registers by
 * warp shuffles (bitwise the same sums, and no work-group barrier per row, so the teams do not
 * wait for each other). */
static void emit_team_sums(kgen *k, int rt, int nv, const char *const *v, const char *const *arr) {
    if (rt == 32 && strcmp(k->d->name, "cuda") == 0) {
        kg_line(k, "for (int s = 16; s > 0; s >>= 1) {");
        for (int i = 0; i < nv; i++) kg_line(k, "    %s += __shfl_down_sync(0xffffffffu, %s, s);", v[i], v[i]);
        kg_line(k, "}");
        for (int i = 0; i < nv; i++) kg_line(k, "%s = __shfl_sync(0xffffffffu, %s, 0);", v[i], v[i]);
        return;
    }
    for (int i = 0; i < nv; i++) kg_line(k, "%s[LID_X] = %s;", arr[i], v[i]);
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s = %d; s > 0; s >>= 1) {", rt / 2);
    kg_line(k, "    if (lane < s) {");
    for (int i = 0; i < nv; i++) kg_line(k, "        %s[LID_X] += %s[LID_X + s];", arr[i], arr[i]);
    kg_line(k, "    }");
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
    for (int i = 0; i < nv; i++) kg_line(k, "%s = %s[team * %d];", v[i], arr[i], rt);
    /* the arrays are rewritten by the next row's sums */
    kg_line(k, "BARRIER();");
}

/* 256 / RT teams of RT threads per work-group, a row per team (like rmsnorm_bwd_dx below):
 * lane l keeps features l, l + RT, ... in registers, so the row is read once, and a group of
 * narrow rows is not mostly idle threads waiting on a 256-wide tree. */
static int emit(kgen *k, const ir_node *n) {
    int x = n->in[0], w = n->in[1], y = n->out[0];
    long d = kg_feat(k, w), per = kg_feat(k, x) / d;
    int node = (int)(n - k->g->n), rt = team_size(d), nteam = 256 / rt;
    int ci = (int)((d + rt - 1) / rt);
    char rx[160], ry[160], gd[48];
    kg_begin(k, "rmsnorm", node, node + 1);
    kg_in(k, "x", x);
    kg_in(k, "w", w);
    kg_out(k, "y", y);
    kg_line(k, "LOCAL float red[256];");
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, x), per);
    kg_line(k, "const int lane = LID_X %% %d, team = LID_X / %d;", rt, rt);
    kg_line(k, "const long r = GID_X * %d + team;", nteam);
    kg_line(k, "const int ok = r < M;");
    kg_line(k, "GLOBAL float *xr = x + %s;", row_at(rx, sizeof rx, k, x, d, "(ok ? r : 0)"));
    const int half = k->g->t[y].dtype == DT_BF16;
    kg_line(k, "GLOBAL %s *yr = y + %s;", half ? "unsigned short" : "float", row_at(ry, sizeof ry, k, y, d, "(ok ? r : 0)"));
    kg_line(k, "float ss = 0.0f;");
    for (int i = 0; i < ci; i++) {
        kg_line(k, "const int f%d = lane + %d;", i, i * rt);
        kg_line(k, "float x%d = 0.0f;", i);
        kg_line(k, "if (ok) { %sx%d = xr[f%d]; }", slot_guard(gd, sizeof gd, i, rt, d), i, i);
        kg_line(k, "ss += x%d * x%d;", i, i);
    }
    {
        const char *v[1] = {"ss"}, *arr[1] = {"red"};
        emit_team_sums(k, rt, 1, v, arr);
    }
    kg_line(k, "const float rs = RSQRTF(ss / %ld.0f + %.9ef);", d, n->fa[0]);
    kg_line(k, "if (ok) {");
    for (int i = 0; i < ci; i++)
        kg_line(k, half ? "    %syr[f%d] = f2bf(x%d * rs * w[f%d]);" : "    %syr[f%d] = x%d * rs * w[f%d];",
                slot_guard(gd, sizeof gd, i, rt, d), i, i, i);
    kg_line(k, "}");
    grid_rows(k, x, per, nteam);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

/* Two launches.
 *
 * rmsnorm_bwd_dx: RMS_CHUNKS work-groups of 256, group c owns the rows of chunk c. A group is
 * 256 / RT teams of RT threads; each step, team j takes the next row (rows r0 + j, r0 + j +
 * teams, ...), lane l holding features l, l + RT, ... in registers, so loads and stores are
 * coalesced and the row is read from memory once. The team's sums of x^2 and w*dy*x are LOCAL
 * trees (fixed order); dx is written and lane l adds dy*x*r into its per-feature accumulators.
 * At the end the teams' accumulators are added in team order and the group writes row c of
 * dw_partial (every row of it, zeros for an empty chunk, so it is never stale).
 *
 * rmsnorm_bwd_dw: a group per 32 features; 8 slices of the chunks, each a Kahan sum in chunk
 * order, then the 8 slices in order. Fixed order throughout: bitwise reproducible. */
static int emit_bwd(kgen *k, const ir_node *n) {
    int x = n->in[0], w = n->in[1], dy = n->in[2], dx = n->out[0], dw = n->out[1], part = n->out[2];
    long d = kg_feat(k, w), per = kg_feat(k, x) / d;
    int node = (int)(n - k->g->n), rt = team_size(d), nteam = 256 / rt;
    int ci = (int)((d + rt - 1) / rt);            /* values per lane */
    int ic = ci < 16 ? ci : 16;                   /* accumulators combined per LOCAL round */
    char rx[160], rdy[160], rdx[160], gd[48];
    kg_begin(k, "rmsnorm_bwd_dx", node, node + 1);
    kg_in(k, "x", x);
    kg_in(k, "w", w);
    kg_in(k, "dy", dy);
    if (n->nin == 4) kg_in(k, "acc", n->in[3]);
    kg_out(k, "dx", dx);
    kg_out(k, "part", part);
    kg_line(k, "LOCAL float r1[256];");
    kg_line(k, "LOCAL float r2[256];");
    kg_line(k, "LOCAL float comb[%d];", 256 * ic);
    kg_line(k, "const long M = %s * %ld, per = (M + %d) / %d;", kg_ntok_expr(k, x), per, RMS_CHUNKS - 1,
            RMS_CHUNKS);
    kg_line(k, "const long c0 = GID_X * per, c1 = c0 + per < M ? c0 + per : M;");
    kg_line(k, "const int lane = LID_X %% %d, team = LID_X / %d;", rt, rt);
    for (int i = 0; i < ci; i++) {
        kg_line(k, "const int f%d = lane + %d;", i, i * rt);
        kg_line(k, "float w%d = 0.0f, a%d = 0.0f, x%d = 0.0f, g%d = 0.0f;", i, i, i, i);
        if (n->nin == 4) kg_line(k, "float q%d = 0.0f;", i);
        kg_line(k, "%sw%d = w[f%d];", slot_guard(gd, sizeof gd, i, rt, d), i, i);
    }
    /* every thread runs the same number of steps (the loop bound is uniform), so the barriers
     * inside are reached by the whole group */
    kg_line(k, "for (long rb = c0; rb < c1; rb += %d) {", nteam);
    kg_line(k, "    const long r = rb + team;");
    kg_line(k, "    const int ok = r < c1;");
    kg_line(k, "    GLOBAL float *xr = x + %s;", row_at(rx, sizeof rx, k, x, d, "(ok ? r : c0)"));
    kg_line(k, "    GLOBAL float *dyr = dy + %s;", row_at(rdy, sizeof rdy, k, dy, d, "(ok ? r : c0)"));
    kg_line(k, "    GLOBAL float *dxr = dx + %s;", row_at(rdx, sizeof rdx, k, dx, d, "(ok ? r : c0)"));
    if (n->nin == 4) kg_line(k, "    GLOBAL float *ar = acc + %s;", row_at(rdx, sizeof rdx, k, n->in[3], d, "(ok ? r : c0)"));
    kg_line(k, "    float ss = 0.0f, dot = 0.0f;");
    kg_line(k, "    if (ok) {");
    /* acc is read with x and dy, so a row costs one round trip to memory, not two */
    for (int i = 0; i < ci; i++)
        kg_line(k, "        %s{ x%d = xr[f%d]; g%d = dyr[f%d];%s }", slot_guard(gd, sizeof gd, i, rt, d), i, i, i, i,
                n->nin == 4 ? (snprintf(rdx, sizeof rdx, " q%d = ar[f%d];", i, i), rdx) : "");
    for (int i = 0; i < ci; i++) {
        kg_line(k, "        ss += x%d * x%d;", i, i);
        kg_line(k, "        dot += w%d * g%d * x%d;", i, i, i);
    }
    kg_line(k, "    }");
    {
        const char *v[2] = {"ss", "dot"}, *arr[2] = {"r1", "r2"};
        emit_team_sums(k, rt, 2, v, arr);
    }
    kg_line(k, "    const float rs = RSQRTF(ss / %ld.0f + %.9ef);", d, n->fa[0]);
    kg_line(k, "    const float cc = rs * rs * rs / %ld.0f * dot;", d);
    kg_line(k, "    if (ok) {");
    for (int i = 0; i < ci; i++) {
        kg_line(k, "        %sdxr[f%d] = %srs * w%d * g%d - cc * x%d;", slot_guard(gd, sizeof gd, i, rt, d), i,
                n->nin == 4 ? (snprintf(rdx, sizeof rdx, "q%d + ", i), rdx) : "", i, i, i);
        kg_line(k, "        a%d += g%d * x%d * rs;", i, i, i);   /* zero past the row end */
    }
    kg_line(k, "    }");
    kg_line(k, "}");
    /* The teams' accumulators, ic slots at a time: comb[slot][team][lane], then thread q adds
     * slot q / RT, lane q % RT over the teams in order. */
    kg_line(k, "GLOBAL float *pr = part + GID_X * %ld;", d);
    for (int i0 = 0; i0 < ci; i0 += ic) {
        int n_i = ci - i0 < ic ? ci - i0 : ic;
        for (int i = i0; i < i0 + n_i; i++) kg_line(k, "comb[%d + LID_X] = a%d;", (i - i0) * 256, i);
        kg_line(k, "BARRIER();");
        kg_line(k, "for (int q = LID_X; q < %d; q += 256) {", n_i * rt);
        kg_line(k, "    const int f = %d + q;", i0 * rt);
        kg_line(k, "    const int sl = q / %d, ln = q %% %d;", rt, rt);
        kg_line(k, "    float s = 0.0f;");
        kg_line(k, "    for (int j = 0; j < %d; j++) s += comb[sl * 256 + j * %d + ln];", nteam, rt);
        kg_line(k, "    if (f < %ld) pr[f] = s;", d);
        kg_line(k, "}");
        kg_line(k, "BARRIER();");
    }
    kg_grid(k, 0, RMS_CHUNKS, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    if (kg_end(k) < 0) return -1;

    kg_begin(k, "rmsnorm_bwd_dw", node, node + 1);
    kg_param_grad(k);
    kg_in(k, "part", part);
    kg_out(k, "dw", dw);
    kg_line(k, "LOCAL float red[256];");
    kg_line(k, "const int lane = LID_X %% 32, sl = LID_X / 32;");
    kg_line(k, "const long f = GID_X * 32 + lane;");
    kg_line(k, "float s = 0.0f, comp = 0.0f;   /* Kahan: the sum keeps fp32 error near one ulp */");
    kg_line(k, "if (f < %ld)", d);
    kg_line(k, "    for (int q = sl; q < %d; q += 8) {", RMS_CHUNKS);
    kg_line(k, "        const float y = part[q * %ld + f] - comp, t = s + y;", d);
    kg_line(k, "        comp = (t - s) - y;");
    kg_line(k, "        s = t;");
    kg_line(k, "    }");
    kg_line(k, "red[LID_X] = s;");
    kg_line(k, "BARRIER();");
    kg_line(k, "if (sl == 0 && f < %ld) {", d);
    kg_line(k, "    float t = 0.0f;");
    kg_line(k, "    for (int j = 0; j < 8; j++) t += red[j * 32 + lane];");
    kg_line(k, "    dw[f] = t;");
    kg_line(k, "}");
    kg_grid(k, 0, (d + 31) / 32, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_rmsnorm = {.name = "rmsnorm", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref,
                           .flops = flops, .emit = emit, .iattr = {"bf16_out", NULL}, .fattr = {"eps", NULL},
                           .fa_default = {1e-5}};
const op_def op_rmsnorm_bwd = {.name = "rmsnorm_bwd", .nin = -3, .nout = 3, .infer = infer_bwd, .ref = ref_bwd,
                               .flops = flops, .emit = emit_bwd, .fattr = {"eps", NULL}, .fa_default = {1e-5}};
