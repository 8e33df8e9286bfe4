/* matmul: y = x W^T with W [N,K] (trans = 0, the nn.Linear layout), or y = x W with W [K,N]
 * (trans = 1). x is [..., K]; y is [..., N]. W must be a constant-shaped matrix.
 * Gradient: dx = matmul(dy, W) with the other transposition; dW = matmul_wgrad, which
 * contracts over every row: matmul_wgrad(a [..., P], b [..., Q]) = sum_rows a^T b : [P, Q]. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0), *w = op_in_shape(g, n, 1);
    if (w->ndim != 2 || ir_ntok_dims(w)) return OP_ERR("weight must be a constant 2-D matrix");
    if (x->ndim < 1 || ir_ntok_dims(x) == x->ndim) return OP_ERR("input needs a feature dim");
    int K = x->d[x->ndim - 1];
    int wk = n->ia[0] ? w->d[0] : w->d[1], wn = n->ia[0] ? w->d[1] : w->d[0];
    if (wk != K) return OP_ERR("input has %d features but the weight expects %d", K, wk);
    out[0] = *x;
    out[0].d[x->ndim - 1] = wn;
    dt[0] = DT_F32;
    return 0;
}

static int infer_wgrad(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *a = op_in_shape(g, n, 0), *b = op_in_shape(g, n, 1);
    if (a->ndim < 1 || b->ndim < 1) return OP_ERR("inputs need a feature dim");
    int P = a->d[a->ndim - 1], Q = b->d[b->ndim - 1];
    ir_shape ra = *a, rb = *b;
    ra.d[ra.ndim - 1] = rb.d[rb.ndim - 1] = 1;
    if (!ir_shape_eq(&ra, &rb)) return OP_ERR("inputs have different row dims");
    out[0] = ir_shape_make(2, (int[]){P, Q});
    dt[0] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int x = n.in[0], w = n.in[1];
    long ia[IR_MAX_IATTR] = {!n.ia[0]};
    int in_dx[2] = {dout[0], w};
    if (ir_emit(g, "matmul", in_dx, 2, ia, NULL, &din[0]) < 0) return -1;
    int in_dw[2] = {dout[0], x};
    if (n.ia[0]) in_dw[0] = x, in_dw[1] = dout[0];
    return ir_emit(g, "matmul_wgrad", in_dw, 2, NULL, NULL, &din[1]) < 0 ? -1 : 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), w = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    const ir_shape *xs = ref_shape(c, n->in[0]);
    long K = xs->d[xs->ndim - 1], N = w.feat / K, rows = ref_rows(x, K);
    for (long r = 0; r < rows; r++) {
        const double *xr = ref_row(x, r, K);
        double *yr = ref_row(y, r, N);
        for (long j = 0; j < N; j++) {
            double acc = 0;
            for (long k = 0; k < K; k++) acc += xr[k] * (n->ia[0] ? w.p[k * N + j] : w.p[j * K + k]);
            yr[j] = acc;
        }
    }
}

static void ref_wgrad(const ref_ctx *c, const ir_node *n) {
    ref_buf a = ref_get(c, n->in[0]), b = ref_get(c, n->in[1]), o = ref_get(c, n->out[0]);
    const ir_shape *as = ref_shape(c, n->in[0]), *bs = ref_shape(c, n->in[1]);
    long P = as->d[as->ndim - 1], Q = bs->d[bs->ndim - 1], rows = ref_rows(a, P);
    for (long i = 0; i < P * Q; i++) o.p[i] = 0;
    for (long r = 0; r < rows; r++) {
        const double *ar = ref_row(a, r, P), *br = ref_row(b, r, Q);
        for (long p = 0; p < P; p++)
            for (long q = 0; q < Q; q++) o.p[p * Q + q] += ar[p] * br[q];
    }
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    const ir_shape *y = &g->t[n->out[0]].shape, *x = &g->t[n->in[0]].shape;
    return 2.0 * (double)ir_numel(y, B, S) * x->d[x->ndim - 1];
}

static double flops_wgrad(const ir_graph *g, const ir_node *n, long B, long S) {
    const ir_shape *a = &g->t[n->in[0]].shape, *b = &g->t[n->in[1]].shape;
    return 2.0 * (double)ir_numel(a, B, S) * b->d[b->ndim - 1];
}

/* ---- kernel templates ----
 * Both kernels compute one 64x64 output tile per work-group of 256: work-item (tx, ty) owns
 * the 4x4 outputs at rows ty + 16i, cols tx + 16j, so its reads of the shared tiles are
 * broadcasts (rows) or consecutive (cols). The contraction dim goes through LOCAL memory 16
 * at a time and every output is summed by one work-item in a fixed order: deterministic. */
#define MT 64      /* output tile edge */
#define KT 16      /* contraction slice per step */

/* Element offset of row `r` (a C expression) of tensor t read as rows of `len` values: the
 * rows of one token are contiguous and tokens are ld apart (strided views). */
static const char *row_at(char *buf, size_t n, const kgen *k, int t, long len, const char *r) {
    long per = kg_feat(k, t) / len, ld = kg_ld(k, t);
    if (per == 1) snprintf(buf, n, "(%s) * %ld", r, ld);
    else snprintf(buf, n, "((%s) / %ld) * %ld + ((%s) %% %ld) * %ld", r, per, ld, r, per, len);
    return buf;
}

/* Grid dim `dim` covering (rows per token) x (token count of t), `div` rows per group. */
static void grid_rows(kgen *k, int dim, int t, long per, long div) {
    const ir_shape *s = &k->g->t[t].shape;
    int nt = ir_ntok_dims(s);
    if (nt == 2) kg_grid(k, dim, 0, 0, 0, per, div);
    else if (nt == 1) kg_grid(k, dim, 0, s->d[0] == DIM_B ? per : 0, s->d[0] == DIM_S ? per : 0, 0, div);
    else kg_grid(k, dim, per, 0, 0, 0, div);
}

/* Inside the contraction loop: acc[i][j] += as[kk][row i] * bs[kk][col j] over one KT slice;
 * the closing barrier lets the next slice overwrite the tiles. */
static void emit_tile_mac(kgen *k) {
    kg_line(k, "    BARRIER();");
    kg_line(k, "    for (int kk = 0; kk < %d; kk++) {", KT);
    kg_line(k, "        float a[4], b[4];");
    kg_line(k, "        for (int i = 0; i < 4; i++) { a[i] = as[kk][ty + 16 * i]; b[i] = bs[kk][tx + 16 * i]; }");
    kg_line(k, "        for (int i = 0; i < 4; i++)");
    kg_line(k, "            for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];");
    kg_line(k, "    }");
    kg_line(k, "    BARRIER();");
}

static void emit_tile_head(kgen *k) {
    /* +1 column: the transposing stores of the loads hit different banks */
    kg_line(k, "LOCAL float as[%d][%d];", KT, MT + 1);
    kg_line(k, "LOCAL float bs[%d][%d];", KT, MT + 1);
    kg_line(k, "const int tx = LID_X %% 16, ty = LID_X / 16;");
    kg_line(k, "float acc[4][4];");
    kg_line(k, "for (int i = 0; i < 4; i++)");
    kg_line(k, "    for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;");
}

static int emit(kgen *k, const ir_node *n) {
    int x = n->in[0], w = n->in[1], y = n->out[0];
    const ir_shape *xs = &k->g->t[x].shape;
    long K = xs->d[xs->ndim - 1], N = kg_feat(k, w) / K, per = kg_feat(k, x) / K;
    int node = (int)(n - k->g->n);
    char rx[160], ry[160];
    kg_begin(k, n->ia[0] ? "matmul_nn" : "matmul_nt", node, node + 1);
    kg_in(k, "x", x);
    kg_in(k, "w", w);
    kg_out(k, "y", y);
    emit_tile_head(k);
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, x), per);
    kg_line(k, "const long m0 = GID_X * %d;", MT);
    kg_line(k, "const int n0 = (int)GID_Y * %d;", MT);
    kg_line(k, "for (int k0 = 0; k0 < %ld; k0 += %d) {", K, KT);
    /* x tile: 16 consecutive k of each row, stored transposed as as[k][row] */
    kg_line(k, "    for (int i = 0; i < 4; i++) {");
    kg_line(k, "        const int e = LID_X + 256 * i, r = e / %d, kk = e %% %d;", KT, KT);
    kg_line(k, "        const long m = m0 + r;");
    if (K % KT)
        kg_line(k, "        as[kk][r] = (m < M && k0 + kk < %ld) ? x[%s + k0 + kk] : 0.0f;", K,
                row_at(rx, sizeof rx, k, x, K, "m"));
    else
        kg_line(k, "        as[kk][r] = m < M ? x[%s + k0 + kk] : 0.0f;", row_at(rx, sizeof rx, k, x, K, "m"));
    kg_line(k, "    }");
    if (n->ia[0]) {
        /* W [K,N]: rows of W are k, read along n */
        kg_line(k, "    for (int i = 0; i < 4; i++) {");
        kg_line(k, "        const int e = LID_X + 256 * i, kk = e / %d, c = e %% %d;", MT, MT);
        kg_line(k, "        bs[kk][c] = (k0 + kk < %ld && n0 + c < %ld) ? w[(long)(k0 + kk) * %ld + n0 + c] : 0.0f;", K,
                N, N);
        kg_line(k, "    }");
    } else {
        /* W [N,K]: read along k like x */
        kg_line(k, "    for (int i = 0; i < 4; i++) {");
        kg_line(k, "        const int e = LID_X + 256 * i, c = e / %d, kk = e %% %d;", KT, KT);
        kg_line(k, "        bs[kk][c] = (n0 + c < %ld && k0 + kk < %ld) ? w[(long)(n0 + c) * %ld + k0 + kk] : 0.0f;", N,
                K, K);
        kg_line(k, "    }");
    }
    emit_tile_mac(k);
    kg_line(k, "}");
    kg_line(k, "for (int i = 0; i < 4; i++) {");
    kg_line(k, "    const long m = m0 + ty + 16 * i;");
    kg_line(k, "    if (m >= M) break;");
    kg_line(k, "    for (int j = 0; j < 4; j++) {");
    kg_line(k, "        const int c = n0 + tx + 16 * j;");
    kg_line(k, "        if (c < %ld) y[%s + c] = acc[i][j];", N, row_at(ry, sizeof ry, k, y, N, "m"));
    kg_line(k, "    }");
    kg_line(k, "}");
    grid_rows(k, 0, x, per, MT);
    kg_grid(k, 1, (N + MT - 1) / MT, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

/* out [P,Q] = sum over rows of a^T b: a work-group owns an output tile and walks all rows in
 * order, KT rows per step. */
static int emit_wgrad(kgen *k, const ir_node *n) {
    int a = n->in[0], b = n->in[1], o = n->out[0];
    const ir_shape *as = &k->g->t[a].shape, *bs = &k->g->t[b].shape;
    long P = as->d[as->ndim - 1], Q = bs->d[bs->ndim - 1], per = kg_feat(k, a) / P;
    int node = (int)(n - k->g->n);
    char ra[160], rb[160];
    kg_begin(k, "matmul_wgrad", node, node + 1);
    kg_in(k, "a", a);
    kg_in(k, "b", b);
    kg_out(k, "o", o);
    emit_tile_head(k);
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, a), per);
    kg_line(k, "const int q0 = (int)GID_X * %d, p0 = (int)GID_Y * %d;", MT, MT);
    kg_line(k, "for (long r0 = 0; r0 < M; r0 += %d) {", KT);
    kg_line(k, "    for (int i = 0; i < 4; i++) {");
    kg_line(k, "        const int e = LID_X + 256 * i, rr = e / %d, c = e %% %d;", MT, MT);
    kg_line(k, "        const long r = r0 + rr;");
    kg_line(k, "        as[rr][c] = (r < M && p0 + c < %ld) ? a[%s + p0 + c] : 0.0f;", P, row_at(ra, sizeof ra, k, a, P, "r"));
    kg_line(k, "        bs[rr][c] = (r < M && q0 + c < %ld) ? b[%s + q0 + c] : 0.0f;", Q, row_at(rb, sizeof rb, k, b, Q, "r"));
    kg_line(k, "    }");
    emit_tile_mac(k);
    kg_line(k, "}");
    kg_line(k, "for (int i = 0; i < 4; i++) {");
    kg_line(k, "    const int p = p0 + ty + 16 * i;");
    kg_line(k, "    if (p >= %ld) break;", P);
    kg_line(k, "    for (int j = 0; j < 4; j++) {");
    kg_line(k, "        const int q = q0 + tx + 16 * j;");
    kg_line(k, "        if (q < %ld) o[(long)p * %ld + q] = acc[i][j];", Q, Q);
    kg_line(k, "    }");
    kg_line(k, "}");
    kg_grid(k, 0, (Q + MT - 1) / MT, 0, 0, 0, 1);
    kg_grid(k, 1, (P + MT - 1) / MT, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_matmul = {.name = "matmul", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref,
                          .flops = flops, .emit = emit, .iattr = {"trans", NULL}};
const op_def op_matmul_wgrad = {.name = "matmul_wgrad", .nin = 2, .nout = 1, .infer = infer_wgrad,
                                .ref = ref_wgrad, .flops = flops_wgrad, .emit = emit_wgrad};
