/* cross_entropy: mean over tokens of -log softmax(logits)[target]; logits [..., V] f32,
 * targets (i32) with logits' leading dims; outputs the scalar mean [] and row_loss (targets'
 * shape): each row's -log softmax[target], which the kernels compute in parallel and then
 * reduce in a fixed order. row_loss is a workspace: nothing may differentiate through it.
 * Gradient: cross_entropy_bwd(logits, targets, dloss) = dloss * (softmax - onehot) / rows. */
#include "kgen.h"
#include "op.h"

#include <math.h>
#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *l = op_in_shape(g, n, 0), *t = op_in_shape(g, n, 1);
    if (op_in_dtype(g, n, 1) != DT_I32) return OP_ERR("targets must be integer");
    if (l->ndim != t->ndim + 1) return OP_ERR("logits must have one more dim than targets");
    for (int i = 0; i < t->ndim; i++)
        if (l->d[i] != t->d[i]) return OP_ERR("logits and targets disagree in dim %d", i + 1);
    out[0].ndim = 0;
    out[1] = *t;
    dt[0] = dt[1] = DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    (void)err; (void)errlen;
    out[0] = *op_in_shape(g, n, 0);
    dt[0] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int in[3] = {n.in[0], n.in[1], dout[0]};
    if (dout[1] >= 0) {
        snprintf(g->err, sizeof g->err, "cross_entropy: row_loss is a workspace and has no gradient rule");
        return -1;
    }
    din[1] = -1;
    return ir_emit(g, "cross_entropy_bwd", in, 3, NULL, NULL, &din[0]) < 0 ? -1 : 0;
}

static double row_lse(const double *x, long V) {
    double m = x[0], s = 0;
    for (long j = 1; j < V; j++) if (x[j] > m) m = x[j];
    for (long j = 0; j < V; j++) s += exp(x[j] - m);
    return m + log(s);
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf l = ref_get(c, n->in[0]), t = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    ref_buf rl = ref_get(c, n->out[1]);
    const ir_shape *ls = ref_shape(c, n->in[0]);
    long V = ls->d[ls->ndim - 1], rows = ref_rows(l, V);
    double acc = 0;
    for (long r = 0; r < rows; r++) {
        const double *x = ref_row(l, r, V);
        long k = (long)*ref_row(t, r, 1);
        *ref_row(rl, r, 1) = row_lse(x, V) - x[k];
        acc += *ref_row(rl, r, 1);
    }
    y.p[0] = acc / (double)rows;
}

static void ref_bwd(const ref_ctx *c, const ir_node *n) {
    ref_buf l = ref_get(c, n->in[0]), t = ref_get(c, n->in[1]), dl = ref_get(c, n->in[2]);
    ref_buf dx = ref_get(c, n->out[0]);
    const ir_shape *ls = ref_shape(c, n->in[0]);
    long V = ls->d[ls->ndim - 1], rows = ref_rows(l, V);
    double sc = dl.p[0] / (double)rows;
    for (long r = 0; r < rows; r++) {
        const double *x = ref_row(l, r, V);
        double *d = ref_row(dx, r, V), lse = row_lse(x, V);
        long k = (long)*ref_row(t, r, 1);
        for (long j = 0; j < V; j++) d[j] = sc * (exp(x[j] - lse) - (j == k));
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

/* Target class of row r as an int clamped into [0, V) (the reference assumes it already is). */
static void emit_target(kgen *k, int tg, long V, const char *r) {
    char rt[160];
    kg_line(k, "int kt = (int)tg[%s];", row_at(rt, sizeof rt, k, tg, 1, r));
    kg_line(k, "kt = kt < 0 ? 0 : kt >= %ld ? %ld : kt;", V, V - 1);
}

/* Threads per row ("team"): 32 (one warp) for byte vocabularies, fewer for tiny V, more for
 * large V so a thread holds at most 16 logits in registers. A power of two dividing 256. */
static int team_size(long V) {
    int rt = 1;
    while (rt < 256 && (long)rt * 16 < V) rt *= 2;
    int lo = 1;
    while (lo < 32 && lo < V) lo *= 2;
    return rt > lo ? rt : lo;
}

/* Grid dim 0 for rows of `per` per token, `teams` rows per group. */
static void grid_rows(kgen *k, int t, long per, int teams) {
    const ir_shape *s = &k->g->t[t].shape;
    int nt = ir_ntok_dims(s);
    if (nt == 2) kg_grid(k, 0, 0, 0, 0, per, teams);
    else if (nt == 1) kg_grid(k, 0, 0, s->d[0] == DIM_B ? per : 0, s->d[0] == DIM_S ? per : 0, 0, teams);
    else kg_grid(k, 0, per, 0, 0, 0, teams);
}

/* Shared by both kernels: 256 / RT teams per group, team j on row GID_X * teams + j (`ok`
 * false past the last row; such teams still reach every barrier). Lane l loads logits l,
 * l + RT, ... into scalars v0.. (-1e30 past the row end) and the team finds the row's max mx and
 * sum of exp(x - mx) se with one LOCAL tree over (max, sum) pairs, merging in a fixed order. */
static void emit_row_stats(kgen *k, int l, long V, int rt) {
    int ci = (int)((V + rt - 1) / rt);
    char rl[160];
    kg_line(k, "LOCAL float rm[256];");
    kg_line(k, "LOCAL float rsum[256];");
    kg_line(k, "const int lane = LID_X %% %d, team = LID_X / %d;", rt, rt);
    kg_line(k, "const long r = GID_X * %d + team;", 256 / rt);
    kg_line(k, "const int ok = r < M;");
    kg_line(k, "GLOBAL float *xr = l + %s;", row_at(rl, sizeof rl, k, l, V, "(ok ? r : 0)"));
    /* -1e30 rather than -INFINITY (which NVRTC does not define): a lane with no logits keeps
     * (-1e30, 0), and merging it scales its zero sum, or is scaled away by exp(-huge) = 0 */
    kg_line(k, "float m = -1e30f, se = 0.0f;");
    for (int i = 0; i < ci; i++) {
        kg_line(k, "float v%d = -1e30f;", i);
        if ((long)(i + 1) * rt > V) kg_line(k, "if (ok && lane + %d < %ld) v%d = xr[lane + %d];", i * rt, V, i, i * rt);
        else kg_line(k, "if (ok) v%d = xr[lane + %d];", i, i * rt);
        kg_line(k, "m = FMAXF(m, v%d);", i);
    }
    for (int i = 0; i < ci; i++) {
        if ((long)(i + 1) * rt > V) kg_line(k, "if (lane + %d < %ld) se += EXPF(v%d - m);", i * rt, V, i);
        else kg_line(k, "se += EXPF(v%d - m);", i);
    }
    kg_line(k, "rm[LID_X] = m;");
    kg_line(k, "rsum[LID_X] = se;");
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s = %d; s > 0; s >>= 1) {", rt / 2);
    kg_line(k, "    if (lane < s) {");
    kg_line(k, "        const float ma = rm[LID_X], mb = rm[LID_X + s], mm = FMAXF(ma, mb);");
    kg_line(k, "        rsum[LID_X] = rsum[LID_X] * EXPF(ma - mm) + rsum[LID_X + s] * EXPF(mb - mm);");
    kg_line(k, "        rm[LID_X] = mm;");
    kg_line(k, "    }");
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
    kg_line(k, "const float mx = rm[team * %d], sum = rsum[team * %d];", rt, rt);
}

/* Two launches. cross_entropy_rows: a team of threads per row (see emit_row_stats), lane 0
 * writes the row's loss. cross_entropy_mean: one group of 256; thread i adds rows i, i + 256,
 * ... (coalesced) with Kahan compensation, then a fixed tree adds the 256 sums, so the loss is
 * deterministic and its fp32 error stays near the tree's. */
static int emit(kgen *k, const ir_node *n) {
    int l = n->in[0], tg = n->in[1], y = n->out[0], rl = n->out[1];
    const ir_shape *ls = &k->g->t[l].shape;
    long V = ls->d[ls->ndim - 1], per = kg_feat(k, l) / V;
    int node = (int)(n - k->g->n), rt = team_size(V);
    char rr[160];
    kg_begin(k, "cross_entropy_rows", node, node + 1);
    kg_in(k, "l", l);
    kg_in(k, "tg", tg);
    kg_out(k, "rl", rl);
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, l), per);
    emit_row_stats(k, l, V, rt);
    kg_line(k, "if (ok && lane == 0) {");
    emit_target(k, tg, V, "r");
    kg_line(k, "    rl[%s] = mx + LOGF(sum) - xr[kt];", row_at(rr, sizeof rr, k, rl, 1, "r"));
    kg_line(k, "}");
    grid_rows(k, l, per, 256 / rt);
    kg_block(k, 256, 1, 1);
    if (kg_end(k) < 0) return -1;

    kg_begin(k, "cross_entropy_mean", node, node + 1);
    kg_in(k, "rl", rl);
    kg_out(k, "y", y);
    kg_line(k, "LOCAL float red[256];");
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, l), per);
    kg_line(k, "float acc = 0.0f, comp = 0.0f;");
    kg_line(k, "for (long r = LID_X; r < M; r += 256) {");
    kg_line(k, "    const float v = rl[%s] - comp, t = acc + v;", row_at(rr, sizeof rr, k, rl, 1, "r"));
    kg_line(k, "    comp = (t - acc) - v;");
    kg_line(k, "    acc = t;");
    kg_line(k, "}");
    kg_line(k, "red[LID_X] = acc;");
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s = 128; s > 0; s >>= 1) {");
    kg_line(k, "    if (LID_X < s) red[LID_X] += red[LID_X + s];");
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
    kg_line(k, "if (LID_X == 0) y[0] = red[0] / (float)M;");
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

/* A team per row as in the forward (several rows per group, one tree instead of a max tree
 * and a sum tree), then each lane writes its logits' gradients: coalesced within the team. */
static int emit_bwd(kgen *k, const ir_node *n) {
    int l = n->in[0], tg = n->in[1], dl = n->in[2], dx = n->out[0];
    const ir_shape *ls = &k->g->t[l].shape;
    long V = ls->d[ls->ndim - 1], per = kg_feat(k, l) / V;
    int node = (int)(n - k->g->n), rt = team_size(V), ci = (int)((V + rt - 1) / rt);
    char rd[160];
    kg_begin(k, "cross_entropy_bwd", node, node + 1);
    kg_in(k, "l", l);
    kg_in(k, "tg", tg);
    kg_in(k, "dl", dl);
    kg_out(k, "dx", dx);
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, l), per);
    emit_row_stats(k, l, V, rt);
    kg_line(k, "if (!ok) return;   /* after the last barrier */");
    kg_line(k, "const float inv = 1.0f / sum, sc = dl[0] / (float)M;");
    emit_target(k, tg, V, "r");
    kg_line(k, "GLOBAL float *dr = dx + %s;", row_at(rd, sizeof rd, k, dx, V, "r"));
    for (int i = 0; i < ci; i++) {
        kg_line(k, "{");
        kg_line(k, "    const int j = lane + %d;", i * rt);
        if ((long)(i + 1) * rt > V) kg_line(k, "    if (j < %ld)", V);
        kg_line(k, "    dr[j] = sc * (EXPF(v%d - mx) * inv - (j == kt ? 1.0f : 0.0f));", i);
        kg_line(k, "}");
    }
    grid_rows(k, l, per, 256 / rt);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_cross_entropy = {.name = "cross_entropy", .nin = 2, .nout = 2, .infer = infer, .grad = grad,
                                 .ref = ref, .flops = flops, .emit = emit};
const op_def op_cross_entropy_bwd = {.name = "cross_entropy_bwd", .nin = 3, .nout = 1, .infer = infer_bwd,
                                     .ref = ref_bwd, .flops = flops, .emit = emit_bwd};
