/* matmul: y = x W^T with W [N,K] (trans = 0, the nn.Linear layout), or y = x W with W [K,N]
 * (trans = 1). x is [..., K]; y is [..., N]. W must be a constant-shaped matrix.
 * Gradient: dx = matmul(dy, W) with the other transposition; dW = matmul_wgrad, which
 * contracts over every row.
 *
 * The op interface of the weight gradient:
 *
 *   matmul_wgrad(a [..., P], b [..., Q]) -> o [P, Q], part [G, P, Q]
 *   o = sum over all R rows of a^T b. part: the workspace of the split-K kernels; part[g] is
 *   the same sum over rows [g rs, min(R, (g + 1) rs)) only, rs = wgrad_split_rows(R, G)
 *   (splits past the last row hold zeros). G = wgrad_splits(P, Q) is fixed when the node is
 *   made, because the row count (B*S) is only known at run time. No gradient flows through
 *   part; the reference fills it too, for the per-launch kernel checks. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>

/* ---- the split of a weight gradient's rows (split-K) ----
 * A weight gradient has few output tiles (realm-9m: 24 to 162 tiles of 64x64, against an
 * H100's 132 SMs) and a long contraction (B*S = 65536 rows). One work-group per tile would
 * leave most of the GPU idle while each walks every row; so each tile's rows are cut into G
 * splits, one work-group per (tile, split) writes its partial tile into `part`, and a second
 * kernel adds the G partials of each output in order g = 0, 1, ... . Both passes sum in a
 * fixed order, so the result is bitwise reproducible (no floating-point atomics).
 * G is chosen so that tiles x G is about WG_GROUPS work-groups: the bf16 kernel (64x64 tiles,
 * 128 threads) takes ~128 registers, so an H100 holds 4 of its blocks per SM, 528 in all, and 2048 is about four
 * waves (the partly filled last wave costs less the more waves there are). More splits cost
 * workspace traffic and memory, small next to the operands at training sizes: `part` holds
 * at most about WG_GROUPS 64x64 fp32 tiles, 32 MiB (or, past WG_GROUPS tiles, G = 1 and one
 * copy of the gradient), and the planner reuses
 * its bytes once the sum has run (at realm-9m's 8 x 8192 the arena does not grow at all).
 * G depends on P and Q only, not on B*S, which is known only at run time; a short contraction
 * just leaves some splits empty. Splits are whole multiples of WG_ALIGN rows (the bf16
 * kernel's contraction slice) so only the last non-empty split ends in a partial slice. */
#define WG_GROUPS 2048
#define WG_MAXSPLIT 32
#define WG_ALIGN 32

static long wgrad_splits(long P, long Q) {
    long tiles = ((P + 63) / 64) * ((Q + 63) / 64), g = (WG_GROUPS + tiles - 1) / tiles;
    return g > WG_MAXSPLIT ? WG_MAXSPLIT : g;
}

/* Rows per split: ceil(R / G) rounded up to WG_ALIGN. The kernels render the same formula
 * (emit_split_range). */
static long wgrad_split_rows(long R, long G) {
    return ((R + G - 1) / G + WG_ALIGN - 1) / WG_ALIGN * WG_ALIGN;
}

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
    out[1] = ir_shape_make(3, (int[]){(int)wgrad_splits(P, Q), P, Q});
    dt[0] = dt[1] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int x = n.in[0], w = n.in[1];
    long ia[IR_MAX_IATTR] = {!n.ia[0]};
    int in_dx[2] = {dout[0], w};
    if (ir_emit(g, "matmul", in_dx, 2, ia, NULL, &din[0]) < 0) return -1;
    int in_dw[2] = {dout[0], x}, dw[2];
    if (n.ia[0]) in_dw[0] = x, in_dw[1] = dout[0];
    if (ir_emit(g, "matmul_wgrad", in_dw, 2, NULL, NULL, dw) < 0) return -1;
    din[1] = dw[0];
    return 0;
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
    ref_buf a = ref_get(c, n->in[0]), b = ref_get(c, n->in[1]), o = ref_get(c, n->out[0]), part = ref_get(c, n->out[1]);
    const ir_shape *as = ref_shape(c, n->in[0]), *bs = ref_shape(c, n->in[1]);
    long P = as->d[as->ndim - 1], Q = bs->d[bs->ndim - 1], rows = ref_rows(a, P);
    long G = ref_shape(c, n->out[1])->d[0], rs = wgrad_split_rows(rows, G);
    for (long i = 0; i < P * Q; i++) o.p[i] = 0;
    for (long i = 0; i < G * P * Q; i++) part.p[i] = 0;
    for (long r = 0; r < rows; r++) {
        const double *ar = ref_row(a, r, P), *br = ref_row(b, r, Q);
        double *pg = part.p + (r / rs) * P * Q;
        for (long p = 0; p < P; p++)
            for (long q = 0; q < Q; q++) {
                o.p[p * Q + q] += ar[p] * br[q];
                pg[p * Q + q] += ar[p] * br[q];
            }
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

/* ---- bf16 tensor-core templates (CUDA, k->bf16) ----
 * An output tile of BM x BN per block of 32 x WGM x WGN threads: the warps form a WGM x WGN
 * grid, each owning a (BM/WGM) x (BN/WGN) sub-tile made of m16n8k16 mma.sync tiles with fp32
 * accumulators; the contraction goes through shared memory BK at a time.
 *
 * Forward and dgrad matmuls (matmul_nt_bf16, matmul_nn_bf16) take 128x128 tiles, 256 threads,
 * warps 64x32: every operand element staged into shared memory feeds 128 outputs instead of
 * 64 (half the global and shared traffic per FLOP of the 64x64 tiles used before), and a warp
 * reads 24 fragment words per 16 mma instead of 16 per 8. 64 fp32 accumulators per thread is
 * as far as this goes without spilling. The cost is fewer blocks on small inputs; realm trains
 * on B*S in the tens of thousands of rows, so at d = 384 a matmul still has hundreds of tiles.
 * Blocks are numbered with the N tiles fastest: the blocks resident at any moment cover a few
 * row blocks across every column tile, so each row of x is fetched from memory about once and
 * re-read by the other column tiles from L2, while the whole weight (a few MiB) stays in L2.
 * With the row blocks outermost, as before, x (~100 MiB at 65536 x 384 fp32) came from memory
 * once per column tile.
 * Weight gradients (matmul_wgrad_bf16) keep 64x64 tiles of 128 threads: they have few output
 * tiles and reach the GPU's width by splitting the rows (wgrad_splits counts 64x64 tiles).
 *
 * The arena stays fp32 in this version: operands are converted to bf16 (round to nearest
 * even) while a tile is staged into shared memory. That keeps every other kernel, the
 * optimizer (fp32 master weights), checkpoints and the memory plan unchanged, and the bf16
 * switch is local to this file; it costs the bandwidth of reading fp32 operands, which a
 * later version removes by storing bf16 copies of the matmul inputs in the arena.
 *
 * Shared tiles hold bf16 pairs as 32-bit words, [row][k/2] with k contiguous for both
 * operands (the row-major A and column-major B that mma's fragments want), 16 words of data
 * plus 4 of padding: the fragment reads (8 rows x 4 words per warp) then hit 32 distinct banks.
 * There are two of each (double buffering): the next slice's global loads are issued into
 * registers before the current slice's MMAs, so their latency hides behind the tensor-core
 * work, and are stored into the other buffer afterwards; one barrier per slice then both
 * publishes that buffer and retires the one just read. Every output is summed by one thread
 * in a fixed order (slices in order, mma's fixed internal order): deterministic. */
#define BK 32      /* contraction slice */

typedef struct {
    int bm, bn;     /* output tile */
    int wgm, wgn;   /* warps along M and along N */
} mma_tile;

static const mma_tile TILE_MM = {128, 128, 2, 4};
static const mma_tile TILE_WGRAD = {64, 64, 2, 2};

static int tile_threads(const mma_tile *t) { return 32 * t->wgm * t->wgn; }

/* How one operand tile (`rows` along M or N, BK along the contraction) is read from global
 * memory. kcontig: the contraction is contiguous; `roff` is a C expression for the element
 * offset of row `r` (a long) or, for a constant-shaped matrix, NULL with `ld` its row length.
 * Otherwise the tile's rows run along memory: element (row, kx) is at `koff` + row, with `koff`
 * a C expression in the contraction index `kx` (a long), and the staging transposes it. */
typedef struct {
    const char *name;       /* the kernel's pointer */
    int kcontig;
    const char *roff;       /* kcontig: offset of row `r`, or NULL (row * ld) */
    long ld;
    const char *koff;       /* !kcontig: offset of contraction index `kx` */
    const char *base;       /* first row of the tile: "m0" or "n0" */
    const char *lim;        /* rows in the matrix (C expression) */
    int rows;               /* rows of the tile: bm or bn */
} mma_operand;

/* Staging: each thread moves `mma_iters` bf16 pairs of an operand tile per slice. kcontig: 16
 * consecutive threads read one row's BK values (pairs 2 (tid & 15), +1), the block covers
 * nt / 16 rows per step, and iteration i takes row (tid >> 4) + (nt / 16) i. Otherwise
 * consecutive threads read consecutive rows (consecutive addresses) of one contraction pair:
 * row tid % rows, pair tid / rows + (nt / rows) i. */
static int mma_iters(const mma_operand *o, int nt) { return o->rows * (BK / 2) / nt; }

/* Registers r<name>[iters][2] <- the slice starting at contraction index `k0`. */
static void emit_mma_load(kgen *k, const mma_operand *o, int nt, const char *ktot, int kguard) {
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int i = 0; i < %d; i++) {", mma_iters(o, nt));
    if (o->kcontig) {
        if (o->roff) {
            kg_line(k, "        const long kx = k0 + 2 * (tid & 15), ro = %soff[i];", o->name);
        } else {
            kg_line(k, "        const long kx = k0 + 2 * (tid & 15), r = %s + (tid >> 4) + %d * i;", o->base, nt / 16);
            kg_line(k, "        const long ro = r < %s ? r * %ld : -1;", o->lim, o->ld);
        }
        if (kguard) {
            kg_line(k, "        r%s[i][0] = (ro >= 0 && kx < %s) ? %s[ro + kx] : 0.0f;", o->name, ktot, o->name);
            kg_line(k, "        r%s[i][1] = (ro >= 0 && kx + 1 < %s) ? %s[ro + kx + 1] : 0.0f;", o->name, ktot, o->name);
        } else {
            kg_line(k, "        r%s[i][0] = ro >= 0 ? %s[ro + kx] : 0.0f;", o->name, o->name);
            kg_line(k, "        r%s[i][1] = ro >= 0 ? %s[ro + kx + 1] : 0.0f;", o->name, o->name);
        }
    } else {
        kg_line(k, "        const long k2 = k0 + 2 * (tid / %d + %d * i), c = %s + tid %% %d;", o->rows, nt / o->rows,
                o->base, o->rows);
        kg_line(k, "        { const long kx = k2; r%s[i][0] = (c < %s && kx < %s) ? %s[%s + c] : 0.0f; }", o->name, o->lim,
                ktot, o->name, o->koff);
        kg_line(k, "        { const long kx = k2 + 1; r%s[i][1] = (c < %s && kx < %s) ? %s[%s + c] : 0.0f; }", o->name,
                o->lim, ktot, o->name, o->koff);
    }
    kg_line(k, "    }");
}

/* The registers -> shared buffer `buf` (a C expression), converted to bf16 pairs. */
static void emit_mma_store(kgen *k, const mma_operand *o, int nt, const char *buf) {
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int i = 0; i < %d; i++)", mma_iters(o, nt));
    if (o->kcontig)
        kg_line(k, "        s%s[%s][(tid >> 4) + %d * i][tid & 15] = pack_bf16x2(r%s[i][0], r%s[i][1]);", o->name, buf,
                nt / 16, o->name, o->name);
    else
        kg_line(k, "        s%s[%s][tid %% %d][tid / %d + %d * i] = pack_bf16x2(r%s[i][0], r%s[i][1]);", o->name, buf,
                o->rows, o->rows, nt / o->rows, o->name, o->name);
}

/* The whole kernel body after the arguments: C[m][n] = sum_k A[m][k] B[n][k] over the tile
 * (m0, n0) (C expressions defined by the caller's prologue), contraction indices from `kbeg`
 * to `ktot` (0 to K constant, or one split's rows for weight gradients); `store` writes acc
 * value `v` at (row m, col c) with both in range. a->rows and b->rows are the tile's. */
static int emit_mma_body(kgen *k, const mma_tile *t, const mma_operand *a, const mma_operand *b, const char *kbeg,
                         const char *ktot, int kguard, const char *store_row_ok, const char *store_col_lim,
                         const char *store) {
    const int nt = tile_threads(t), wm = t->bm / t->wgm, wn = t->bn / t->wgn, mi = wm / 16, nj = wn / 8;
    const mma_operand *ops[2] = {a, b};
    /* the staging maps above need whole iterations and, for the transposing one, a block at
     * least one tile edge wide */
    for (int q = 0; q < 2; q++)
        if (ops[q]->rows * (BK / 2) % nt || (!ops[q]->kcontig && nt % ops[q]->rows) || nt % 16) {
            snprintf(k->err, sizeof k->err, "matmul: tile %dx%d cannot be staged by %d threads", t->bm, t->bn, nt);
            return -1;
        }
    if (wm % 16 || wn % 8) {
        snprintf(k->err, sizeof k->err, "matmul: warp tile %dx%d is not made of m16n8 tiles", wm, wn);
        return -1;
    }
    kg_line(k, "LOCAL unsigned s%s[2][%d][%d], s%s[2][%d][%d];", a->name, a->rows, BK / 2 + 4, b->name, b->rows,
            BK / 2 + 4);
    kg_line(k, "const int tid = LID_X, lane = tid & 31, warp = tid >> 5;");
    kg_line(k, "const int wm = (warp / %d) * %d, wn = (warp %% %d) * %d, gq = lane >> 2, tq = lane & 3;", t->wgn, wm,
            t->wgn, wn);
    kg_line(k, "float acc[%d][%d][4];", mi, nj);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int i = 0; i < %d; i++)", mi);
    kg_line(k, "    for (int j = 0; j < %d; j++)", nj);
    kg_line(k, "        for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;");
    kg_line(k, "float r%s[%d][2], r%s[%d][2];", a->name, mma_iters(a, nt), b->name, mma_iters(b, nt));
    /* row offsets of the k-contiguous operands read through a view expression are fixed for
     * the whole contraction: computed once */
    for (int q = 0; q < 2; q++) {
        const mma_operand *o = ops[q];
        if (!o->kcontig || !o->roff) continue;
        kg_line(k, "long %soff[%d];", o->name, mma_iters(o, nt));
        kg_line(k, "#pragma unroll");
        kg_line(k, "for (int i = 0; i < %d; i++) {", mma_iters(o, nt));
        kg_line(k, "    const long r = %s + (tid >> 4) + %d * i;", o->base, nt / 16);
        kg_line(k, "    %soff[i] = r < %s ? %s : -1;", o->name, o->lim, o->roff);
        kg_line(k, "}");
    }
    kg_line(k, "{");
    kg_line(k, "    const long k0 = %s;", kbeg);
    emit_mma_load(k, a, nt, ktot, kguard);
    emit_mma_load(k, b, nt, ktot, kguard);
    emit_mma_store(k, a, nt, "0");
    emit_mma_store(k, b, nt, "0");
    kg_line(k, "}");
    kg_line(k, "BARRIER();");
    kg_line(k, "int buf = 0;");
    kg_line(k, "for (long kb = %s; kb < %s; kb += %d) {", kbeg, ktot, BK);
    kg_line(k, "    const int more = kb + %d < %s;", BK, ktot);
    kg_line(k, "    if (more) {");
    kg_line(k, "        const long k0 = kb + %d;", BK);
    emit_mma_load(k, a, nt, ktot, kguard);
    emit_mma_load(k, b, nt, ktot, kguard);
    kg_line(k, "    }");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int kk = 0; kk < %d; kk += 8) {", BK / 2);
    kg_line(k, "        unsigned af[%d][4], bf[%d][2];", mi, nj);
    kg_line(k, "        #pragma unroll");
    kg_line(k, "        for (int i = 0; i < %d; i++) {", mi);
    kg_line(k, "            const int r = wm + 16 * i + gq;");
    kg_line(k, "            af[i][0] = s%s[buf][r][kk + tq]; af[i][1] = s%s[buf][r + 8][kk + tq];", a->name, a->name);
    kg_line(k, "            af[i][2] = s%s[buf][r][kk + tq + 4]; af[i][3] = s%s[buf][r + 8][kk + tq + 4];", a->name,
            a->name);
    kg_line(k, "        }");
    kg_line(k, "        #pragma unroll");
    kg_line(k, "        for (int j = 0; j < %d; j++) {", nj);
    kg_line(k, "            const int c = wn + 8 * j + gq;");
    kg_line(k, "            bf[j][0] = s%s[buf][c][kk + tq]; bf[j][1] = s%s[buf][c][kk + tq + 4];", b->name, b->name);
    kg_line(k, "        }");
    kg_line(k, "        #pragma unroll");
    kg_line(k, "        for (int i = 0; i < %d; i++)", mi);
    kg_line(k, "            for (int j = 0; j < %d; j++) mma_bf16_16816(acc[i][j], af[i], bf[j]);", nj);
    kg_line(k, "    }");
    /* buf ^ 1 was last read in the previous slice, which every thread finished before the
     * barrier that ended it */
    kg_line(k, "    if (more) {");
    emit_mma_store(k, a, nt, "buf ^ 1");
    emit_mma_store(k, b, nt, "buf ^ 1");
    kg_line(k, "    }");
    kg_line(k, "    BARRIER();");
    kg_line(k, "    buf ^= 1;");
    kg_line(k, "}");
    /* accumulator e of tile (i, j): row gq (+8 for e >= 2), columns 2 tq and 2 tq + 1 */
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int i = 0; i < %d; i++)", mi);
    kg_line(k, "    for (int h = 0; h < 2; h++) {");
    kg_line(k, "        const long m = m0 + wm + 16 * i + gq + 8 * h;");
    kg_line(k, "        if (!(%s)) continue;", store_row_ok);
    kg_line(k, "        for (int j = 0; j < %d; j++)", nj);
    kg_line(k, "            for (int e = 0; e < 2; e++) {");
    kg_line(k, "                const long c = n0 + wn + 8 * j + 2 * tq + e;");
    kg_line(k, "                const float v = acc[i][j][2 * h + e];");
    kg_line(k, "                if (c < %s) %s;", store_col_lim, store);
    kg_line(k, "            }");
    kg_line(k, "    }");
    return 0;
}

/* Grid dim `dim` numbering the (row block, column tile) pairs of a matmul, column tiles
 * fastest: ceil(ntile (M + bm - 1) / bm) >= ntile ceil(M / bm) blocks, M = per x (token count
 * of t); the at most ntile blocks past the last row block return at once. */
static void grid_tiles(kgen *k, int dim, int t, long per, long ntile, long bm) {
    const ir_shape *s = &k->g->t[t].shape;
    int nt = ir_ntok_dims(s);
    long c = per * ntile, pad = ntile * (bm - 1);
    if (nt == 2) kg_grid(k, dim, pad, 0, 0, c, bm);
    else if (nt == 1) kg_grid(k, dim, pad, s->d[0] == DIM_B ? c : 0, s->d[0] == DIM_S ? c : 0, 0, bm);
    else kg_grid(k, dim, pad + c, 0, 0, 0, bm);
}

static int emit_bf16(kgen *k, const ir_node *n) {
    int x = n->in[0], w = n->in[1], y = n->out[0];
    const ir_shape *xs = &k->g->t[x].shape;
    const mma_tile *t = &TILE_MM;
    long K = xs->d[xs->ndim - 1], N = kg_feat(k, w) / K, per = kg_feat(k, x) / K, ntile = (N + t->bn - 1) / t->bn;
    int node = (int)(n - k->g->n);
    char rx[160], ry[160], st[240], nlim[32], klim[32], wk[64];
    kg_begin(k, n->ia[0] ? "matmul_nn_bf16" : "matmul_nt_bf16", node, node + 1);
    kg_in(k, "x", x);
    kg_in(k, "w", w);
    kg_out(k, "y", y);
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, x), per);
    kg_line(k, "const long m0 = (GID_X / %ld) * %d, n0 = (GID_X %% %ld) * %d;", ntile, t->bm, ntile, t->bn);
    kg_line(k, "if (m0 >= M) return;");
    snprintf(nlim, sizeof nlim, "%ldL", N);
    snprintf(klim, sizeof klim, "%ldL", K);
    mma_operand a = {.name = "x", .kcontig = 1, .roff = row_at(rx, sizeof rx, k, x, K, "r"), .base = "m0", .lim = "M",
                     .rows = t->bm};
    mma_operand b;
    if (n->ia[0]) {   /* W [K,N]: the contraction index selects the row */
        snprintf(wk, sizeof wk, "kx * %ld", N);
        b = (mma_operand){.name = "w", .kcontig = 0, .koff = wk, .base = "n0", .lim = nlim, .rows = t->bn};
    } else {          /* W [N,K] */
        b = (mma_operand){.name = "w", .kcontig = 1, .roff = NULL, .ld = K, .base = "n0", .lim = nlim, .rows = t->bn};
    }
    snprintf(st, sizeof st, "y[%s + c] = v", row_at(ry, sizeof ry, k, y, N, "m"));
    if (emit_mma_body(k, t, &a, &b, "0", klim, K % BK != 0, "m < M", nlim, st) < 0) return -1;
    grid_tiles(k, 0, x, per, ntile, t->bm);
    kg_block(k, tile_threads(t), 1, 1);
    return kg_end(k);
}

/* The rows [r0, r1) of this work-group's split (GID_Z), as wgrad_split_rows cuts them; r1 < r0
 * for a split past the last row, which then stores a zero tile. */
static void emit_split_range(kgen *k, const char *R, long G) {
    kg_line(k, "const long rs = ((%s + %ld) / %ld + %d) / %d * %d;", R, G - 1, G, WG_ALIGN - 1, WG_ALIGN, WG_ALIGN);
    kg_line(k, "const long r0 = GID_Z * rs, r1 = r0 + rs < %s ? r0 + rs : %s;", R, R);
}

/* The second pass: o = part[0] + part[1] + ... + part[G-1], in that order. */
static int emit_wgrad_sum(kgen *k, const ir_node *n) {
    const ir_shape *ps = &k->g->t[n->out[1]].shape;
    long G = ps->d[0], PQ = (long)ps->d[1] * ps->d[2];
    int node = (int)(n - k->g->n);
    kg_begin(k, "matmul_wgrad_sum", node, node + 1);
    kg_in(k, "part", n->out[1]);
    kg_out(k, "o", n->out[0]);
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= %ld) return;", PQ);
    kg_line(k, "float s = part[i];");
    kg_line(k, "for (int g = 1; g < %ld; g++) s += part[(long)g * %ld + i];", G, PQ);
    kg_line(k, "o[i] = s;");
    kg_grid(k, 0, PQ, 0, 0, 0, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

/* part[g][p][q] = sum over split g's rows r of a[r][p] b[r][q]: M is P, N is Q and the rows
 * are the contraction, so both operands are read along their rows and transposed into the
 * shared tiles. */
static int emit_wgrad_bf16(kgen *k, const ir_node *n) {
    int a = n->in[0], b = n->in[1], part = n->out[1];
    const ir_shape *as = &k->g->t[a].shape, *bs = &k->g->t[b].shape;
    long P = as->d[as->ndim - 1], Q = bs->d[bs->ndim - 1], per = kg_feat(k, a) / P;
    long G = k->g->t[part].shape.d[0];
    const mma_tile *t = &TILE_WGRAD;
    int node = (int)(n - k->g->n);
    char ra[160], rb[160], plim[32], qlim[32], st[160];
    kg_begin(k, "matmul_wgrad_bf16", node, node + 1);
    kg_in(k, "a", a);
    kg_in(k, "b", b);
    kg_out(k, "part", part);
    kg_line(k, "const long R = %s * %ld;", kg_ntok_expr(k, a), per);
    emit_split_range(k, "R", G);
    kg_line(k, "const long n0 = GID_X * %d, m0 = GID_Y * %d;", t->bn, t->bm);
    snprintf(plim, sizeof plim, "%ldL", P);
    snprintf(qlim, sizeof qlim, "%ldL", Q);
    mma_operand oa = {.name = "a", .kcontig = 0, .koff = row_at(ra, sizeof ra, k, a, P, "kx"), .base = "m0", .lim = plim,
                      .rows = t->bm};
    mma_operand ob = {.name = "b", .kcontig = 0, .koff = row_at(rb, sizeof rb, k, b, Q, "kx"), .base = "n0", .lim = qlim,
                      .rows = t->bn};
    snprintf(st, sizeof st, "part[GID_Z * %ld + m * %ld + c] = v", P * Q, Q);
    char rowok[48];
    snprintf(rowok, sizeof rowok, "m < %ld", P);
    if (emit_mma_body(k, t, &oa, &ob, "r0", "r1", 1, rowok, qlim, st) < 0) return -1;
    kg_grid(k, 0, (Q + t->bn - 1) / t->bn, 0, 0, 0, 1);
    kg_grid(k, 1, (P + t->bm - 1) / t->bm, 0, 0, 0, 1);
    kg_grid(k, 2, G, 0, 0, 0, 1);
    kg_block(k, tile_threads(t), 1, 1);
    if (kg_end(k) < 0) return -1;
    return emit_wgrad_sum(k, n);
}

static int emit(kgen *k, const ir_node *n) {
    if (k->bf16) return emit_bf16(k, n);
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

/* part[g] = sum over split g's rows of a^T b: a work-group owns an output tile of one split
 * and walks that split's rows in order, KT rows per step; emit_wgrad_sum adds the splits. */
static int emit_wgrad(kgen *k, const ir_node *n) {
    if (k->bf16) return emit_wgrad_bf16(k, n);
    int a = n->in[0], b = n->in[1], part = n->out[1];
    const ir_shape *as = &k->g->t[a].shape, *bs = &k->g->t[b].shape;
    long P = as->d[as->ndim - 1], Q = bs->d[bs->ndim - 1], per = kg_feat(k, a) / P;
    long G = k->g->t[part].shape.d[0];
    int node = (int)(n - k->g->n);
    char ra[160], rb[160];
    kg_begin(k, "matmul_wgrad", node, node + 1);
    kg_in(k, "a", a);
    kg_in(k, "b", b);
    kg_out(k, "part", part);
    emit_tile_head(k);
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, a), per);
    emit_split_range(k, "M", G);
    kg_line(k, "const int q0 = (int)GID_X * %d, p0 = (int)GID_Y * %d;", MT, MT);
    kg_line(k, "for (long rb = r0; rb < r1; rb += %d) {", KT);
    kg_line(k, "    for (int i = 0; i < 4; i++) {");
    kg_line(k, "        const int e = LID_X + 256 * i, rr = e / %d, c = e %% %d;", MT, MT);
    kg_line(k, "        const long r = rb + rr;");
    kg_line(k, "        as[rr][c] = (r < r1 && p0 + c < %ld) ? a[%s + p0 + c] : 0.0f;", P, row_at(ra, sizeof ra, k, a, P, "r"));
    kg_line(k, "        bs[rr][c] = (r < r1 && q0 + c < %ld) ? b[%s + q0 + c] : 0.0f;", Q, row_at(rb, sizeof rb, k, b, Q, "r"));
    kg_line(k, "    }");
    emit_tile_mac(k);
    kg_line(k, "}");
    kg_line(k, "for (int i = 0; i < 4; i++) {");
    kg_line(k, "    const int p = p0 + ty + 16 * i;");
    kg_line(k, "    if (p >= %ld) break;", P);
    kg_line(k, "    for (int j = 0; j < 4; j++) {");
    kg_line(k, "        const int q = q0 + tx + 16 * j;");
    kg_line(k, "        if (q < %ld) part[GID_Z * %ld + (long)p * %ld + q] = acc[i][j];", Q, P * Q, Q);
    kg_line(k, "    }");
    kg_line(k, "}");
    kg_grid(k, 0, (Q + MT - 1) / MT, 0, 0, 0, 1);
    kg_grid(k, 1, (P + MT - 1) / MT, 0, 0, 0, 1);
    kg_grid(k, 2, G, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    if (kg_end(k) < 0) return -1;
    return emit_wgrad_sum(k, n);
}

const op_def op_matmul = {.name = "matmul", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref,
                          .flops = flops, .emit = emit, .iattr = {"trans", NULL}};
const op_def op_matmul_wgrad = {.name = "matmul_wgrad", .nin = 2, .nout = 2, .infer = infer_wgrad,
                                .ref = ref_wgrad, .flops = flops_wgrad, .emit = emit_wgrad};
