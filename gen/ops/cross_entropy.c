/* cross_entropy: mean over tokens of -log softmax(logits)[target]; logits [..., V] f32,
 * targets (i32) with logits' leading dims; output a scalar []. Gradient:
 * cross_entropy_bwd(logits, targets, dloss) = dloss * (softmax - onehot) / rows. */
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
    dt[0] = DT_F32;
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
    const ir_shape *ls = ref_shape(c, n->in[0]);
    long V = ls->d[ls->ndim - 1], rows = ref_rows(l, V);
    double acc = 0;
    for (long r = 0; r < rows; r++) {
        const double *x = ref_row(l, r, V);
        long k = (long)*ref_row(t, r, 1);
        acc += row_lse(x, V) - x[k];
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

/* One work-group of 256: work-item i takes rows i, i+256, ... in order, then a fixed tree adds
 * the 256 partial sums, so the loss is deterministic. */
static int emit(kgen *k, const ir_node *n) {
    int l = n->in[0], tg = n->in[1], y = n->out[0];
    const ir_shape *ls = &k->g->t[l].shape;
    long V = ls->d[ls->ndim - 1], per = kg_feat(k, l) / V;
    int node = (int)(n - k->g->n);
    char rl[160];
    kg_begin(k, "cross_entropy", node, node + 1);
    kg_in(k, "l", l);
    kg_in(k, "tg", tg);
    kg_out(k, "y", y);
    kg_line(k, "LOCAL float red[256];");
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, l), per);
    kg_line(k, "float acc = 0.0f;");
    kg_line(k, "for (long r = LID_X; r < M; r += 256) {");
    kg_line(k, "    GLOBAL float *xr = l + %s;", row_at(rl, sizeof rl, k, l, V, "r"));
    kg_line(k, "    float m = xr[0], s = 0.0f;");
    kg_line(k, "    for (int j = 1; j < %ld; j++) m = FMAXF(m, xr[j]);", V);
    kg_line(k, "    for (int j = 0; j < %ld; j++) s += EXPF(xr[j] - m);", V);
    emit_target(k, tg, V, "r");
    kg_line(k, "    acc += m + LOGF(s) - xr[kt];");
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

/* One work-group per row: tree max, tree sum of exponentials, then the row of gradients. */
static int emit_bwd(kgen *k, const ir_node *n) {
    int l = n->in[0], tg = n->in[1], dl = n->in[2], dx = n->out[0];
    const ir_shape *ls = &k->g->t[l].shape;
    long V = ls->d[ls->ndim - 1], per = kg_feat(k, l) / V;
    int bs = 32, node = (int)(n - k->g->n);
    while (bs < 256 && bs < V) bs *= 2;
    char rl[160], rd[160];
    kg_begin(k, "cross_entropy_bwd", node, node + 1);
    kg_in(k, "l", l);
    kg_in(k, "tg", tg);
    kg_in(k, "dl", dl);
    kg_out(k, "dx", dx);
    kg_line(k, "LOCAL float red[%d];", bs);
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, l), per);
    kg_line(k, "GLOBAL float *xr = l + %s;", row_at(rl, sizeof rl, k, l, V, "GID_X"));
    kg_line(k, "GLOBAL float *dr = dx + %s;", row_at(rd, sizeof rd, k, dx, V, "GID_X"));
    kg_line(k, "float m = xr[0];");
    kg_line(k, "for (int j = LID_X; j < %ld; j += %d) m = FMAXF(m, xr[j]);", V, bs);
    kg_line(k, "red[LID_X] = m;");
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s = %d; s > 0; s >>= 1) {", bs / 2);
    kg_line(k, "    if (LID_X < s) red[LID_X] = FMAXF(red[LID_X], red[LID_X + s]);");
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
    kg_line(k, "const float mx = red[0];");
    kg_line(k, "BARRIER();   /* everyone has read red[0] before it is reused */");
    kg_line(k, "float s = 0.0f;");
    kg_line(k, "for (int j = LID_X; j < %ld; j += %d) s += EXPF(xr[j] - mx);", V, bs);
    kg_line(k, "red[LID_X] = s;");
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s2 = %d; s2 > 0; s2 >>= 1) {", bs / 2);
    kg_line(k, "    if (LID_X < s2) red[LID_X] += red[LID_X + s2];");
    kg_line(k, "    BARRIER();");
    kg_line(k, "}");
    kg_line(k, "const float inv = 1.0f / red[0], sc = dl[0] / (float)M;");
    emit_target(k, tg, V, "GID_X");
    kg_line(k, "for (int j = LID_X; j < %ld; j += %d)", V, bs);
    kg_line(k, "    dr[j] = sc * (EXPF(xr[j] - mx) * inv - (j == kt ? 1.0f : 0.0f));");
    const ir_shape *s = ls;
    int nt = ir_ntok_dims(s);
    if (nt == 2) kg_grid(k, 0, 0, 0, 0, per, 1);
    else if (nt == 1) kg_grid(k, 0, 0, s->d[0] == DIM_B ? per : 0, s->d[0] == DIM_S ? per : 0, 0, 1);
    else kg_grid(k, 0, per, 0, 0, 0, 1);
    kg_block(k, bs, 1, 1);
    return kg_end(k);
}

const op_def op_cross_entropy = {.name = "cross_entropy", .nin = 2, .nout = 1, .infer = infer, .grad = grad,
                                 .ref = ref, .flops = flops, .emit = emit};
const op_def op_cross_entropy_bwd = {.name = "cross_entropy_bwd", .nin = 3, .nout = 1, .infer = infer_bwd,
                                     .ref = ref_bwd, .flops = flops, .emit = emit_bwd};
