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
#include "plan.h"

#include <stdio.h>

/* ---- the split of a weight gradient's rows (split-K) ----
 * A weight gradient has few output tiles (realm-9m: 24 to 162 tiles of 64x64, against an
 * H100's 132 SMs) and a long contraction (B*S = 65536 rows). One work-group per tile would
 * leave most of the GPU idle while each walks every row; so each tile's rows are cut into G
 * splits, one work-group per (tile, split) writes its partial tile into `part`, and a second
 * kernel adds the G partials of each output in order g = 0, 1, ... . Both passes sum in a
 * fixed order, so the result is bitwise reproducible (no floating-point atomics).
 * G is chosen so that there are about WG_GROUPS work-groups of 64x64 tiles (the fp32 kernel's;
 * 2048 is about four waves of the first bf16 kernel, 4 blocks of 128 threads per H100 SM). The
 * bf16 kernel now takes 128x128 tiles, two blocks per SM: tiles x G is then 288 to 546 blocks at
 * realm-9m's shapes, 1.1 to 2.1 waves of 264. A G counted in those tiles (3 or 4 full waves,
 * up to 64 splits) was measured on an H100: all bf16 weight gradients 7.5-7.7 ms per step at
 * 8 x 8192 against 7.9, too little to change G, which also fixes the fp32 plans' partial sums. More splits cost
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
    /* dW first: then the nodes that consume dx come right after the matmul that makes it,
     * and the plan can fuse them into its epilogue */
    int in_dw[2] = {dout[0], x}, dw[2];
    if (n.ia[0]) in_dw[0] = x, in_dw[1] = dout[0];
    if (ir_emit(g, "matmul_wgrad", in_dw, 2, NULL, NULL, dw) < 0) return -1;
    din[1] = dw[0];
    int in_dx[2] = {dout[0], w};
    return ir_emit(g, "matmul", in_dx, 2, ia, NULL, &din[0]) < 0 ? -1 : 0;
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
 * accumulators. Every form (matmul_nt_bf16, matmul_nn_bf16, matmul_wgrad_bf16) uses one body,
 * emit_mma_pipe; they differ only in how each operand lies in memory (mma_operand).
 *
 * Where the time goes (H100, realm-9m at 8 x 8192: M = 65536 rows, K and N 256..1716). The
 * arena is fp32, so operands arrive as fp32 and are rounded to bf16 (round to nearest even) on
 * the way into the tensor cores; the output is fp32. The limits, per SM, are then
 *  - shared-memory bandwidth (128 B/clock): fragments are read from fp32 tiles, twice the bytes
 *    of bf16 tiles, so the warp tile must reuse each fragment as much as the registers allow.
 *    A 64x64 warp tile (128 fp32 accumulators a thread) reads 8 KiB of fragments per 32 mma;
 *    64x32 (the first version's) read 6 KiB per 16, 1.5x the bytes per FLOP.
 *  - memory latency: one block of 8 warps with register-staged double buffering (the first
 *    version, 164 registers) kept too few loads in flight. Here global -> shared copies are
 *    cp.async (no registers, no thread waits on them) STAGES slices deep.
 *  - L2 -> SM traffic: each operand tile is re-read from L2 by every block that needs it,
 *    (BM + BN) K 4 bytes per block; 128x128 tiles take 32 FLOP per byte.
 *
 * Variant "p128" (TILE_MM, TILE_WGRAD): 128x128 tiles, 4 warps of 64x64, STAGES = 3 slices of
 * BK = 32 (96 KiB of dynamic shared memory), ~220-240 registers: two blocks per H100 SM, so
 * one block's prologue/epilogue (the output is 64 KiB of fp32 per tile) overlaps the other's
 * main loop. Knobs for tuning: the mma_tile table (tile, warp grid, stages, which shrink to
 * fit kgen.shared_max, and a register cap through minb), BK (the swizzles assume 32).
 * Measured on an H100 (realm-9m, 8 x 8192, ms per step for all matmul / matmul_wgrad launches;
 * the register-staged 128x128/8-warp first version: 32.0 / 14.9):
 *   p128, 128x128, 4 warps of 64x64, 3 stages                        13.9 / 8.0
 *   256x128, 8 warps of 64x64, 1 block per SM, 3 stages              15.5 / 10.7 (256x128 wgrad)
 *   256x128, 4 stages; wgrad 128x256, 8 warps, 4 stages              15.3 / 9.7
 *   128x128, 8 warps of 64x32, minb 2 (<= 128 registers, 16 warps)  15.2 / 9.4
 *   128x64, 4 warps of 64x32, minb 3                                  16.7 / 9.9
 * At p128 the in_proj forward ([65536 x 384] x [384 x 1716]) takes 0.47 ms (~180 TFLOP/s):
 * Nsight Compute shows L2 at ~72% of its peak, tensor pipe at ~10% and warps mostly waiting
 * on dependencies (fixed-latency and shared-memory loads) with only 2 warps per scheduler.
 * With both operands stored as bf16 (gen/precision.c) it takes 0.40 ms, and Nsight Compute
 * puts L2 at 83% of its peak (DRAM 35%): the re-reads of x and W by neighbouring tiles plus the
 * fp32 output. Larger tiles (fewer re-reads) lose more to one block a SM than they save (see
 * TILE_MM_EPI). What would go further: bf16 outputs where the consumers allow, or Hopper's
 * bulk copies and wgmma (sm_90a).
 *
 * Shared tiles hold fp32, in one of two layouts, both swizzled so that cp.async's 16-byte
 * writes and the fragment reads are free of bank conflicts:
 *  - K-major (operand contiguous along the contraction: x of the forward and dgrad, W [N,K]):
 *    [row][BK] with the 16-byte chunk c of row r at c ^ 4 (r & 1).
 *  - MN-major (contiguous along the tile's rows: W [K,N] of the dgrad, both operands of the
 *    weight gradient): [BK][rows] with chunk c of contraction line kp at c ^ 2 ((kp >> 2) & 3).
 * Fragments. Inside each 16-wide step of the contraction, the mma's logical k is permuted
 * against memory: logical {2t, 2t+1, 2t+8, 2t+9} of lane t = lane & 3 are physical
 * {4t, .., 4t+3}. A sum over k does not care about the order as long as A and B use the same
 * permutation (both layouts do), and it lets a lane fetch its four values of a K-major row
 * with one 16-byte load: A fragment rows g and g+8 (g = lane >> 2) are two float4 loads,
 * a B fragment one. From an MN-major tile a lane reads the same four values one word at a
 * time (its rows are its own). Each float pair becomes one bf16x2 register (pack_bf16x2).
 *
 * bf16 operands (tensors the plan stores as bf16, gen/precision.c) are copied as they are and
 * need no conversion; same permutation of k:
 *  - K-major: [row][BK] bf16, 64 bytes a row, chunk c of row r at c ^ 2 ((r >> 1) & 1); a
 *    lane's four values of a row are one 8-byte load (two bf16x2 registers).
 *  - MN-major: [BK][rows] bf16, chunk c of line l at c ^ ((l & 1) | ((l >> 2) & 3) << 1); the
 *    fragments come from ldmatrix.trans, whose eight row addresses are the lines {0, 1, 4, 5,
 *    8, 9, 12, 13} (+ 2 for the second register) of the 16-wide step, so lane t receives
 *    lines 4t, 4t+1 (and 4t+2, 4t+3): the permuted order above. The swizzle of those eight
 *    lines is 0..7, so each 8x8 load touches eight distinct banks.
 *
 * Pipeline: STAGES - 1 slices are requested ahead; each iteration waits for the oldest
 * (cp.async.wait_group), one barrier both publishes it to every warp and retires the stage
 * read in the previous iteration, which the next request then refills. Out-of-range rows,
 * columns and contraction indices are zero-filled by cp.async (src-size < 16): no branch on
 * the shape inside the main loop. An operand whose rows do not all start 16-byte aligned (a
 * view at an odd offset, a row length not a multiple of 4) is copied 4 bytes at a time.
 *
 * Blocks of the forward and dgrad are numbered with the N tiles fastest: the blocks resident
 * at any moment cover a few row blocks across every column tile, so each row of x is fetched
 * from memory about once and re-read by the other column tiles from L2, while the weight (a
 * few MiB) stays in L2. Every output is summed by one thread in a fixed order (slices in
 * order, mma's fixed internal order): deterministic. */
#define BK 32      /* contraction slice per pipeline stage */

typedef struct {
    int bm, bn;     /* output tile */
    int wgm, wgn;   /* warps along M and along N */
    int stages;     /* cp.async pipeline depth (slices); fewer if shared memory is short */
    int minb;       /* blocks per SM the register allocation must allow (0: the compiler's choice) */
} mma_tile;

/* Forward and dgrad with an epilogue (kgen.epi): 8 warps of 32x64 held to 2 blocks per SM
 * (<= 128 registers), 4 stages where two blocks' stages fit (bf16 operands; 3 with fp32
 * ones). The staged epilogue is memory-bound work after the main loop, and 16 warps a SM hide
 * it better than 8: realm-9m 8 x 8192 on an H100, the Mamba out_proj dgrad with its gate
 * gradients 3.52 -> 2.68 ms a step, the MLP's 2.27 -> 1.68; step 68.59 -> 66.80 with this tile
 * for every forward/dgrad product. Without an epilogue the 4 warps of 64x64 stay ahead (the
 * in_proj dgrad 2.29 against 2.49). Tried for all products at bf16 storage: 2x2 warps at 4
 * stages 68.19; 4x2 at 3 stages 67.48; 4x2 for the weight gradient too 67.60; 256x128 (8 or 16
 * warps), 128x256, 1 block a SM: 67.9-68.7 against 66.9. */
static const mma_tile TILE_MM_EPI = {128, 128, 4, 2, 4, 2};
static const mma_tile TILE_MM = {128, 128, 2, 2, 3, 0};
static const mma_tile TILE_WGRAD = {128, 128, 2, 2, 3, 0};

static int tile_threads(const mma_tile *t) { return 32 * t->wgm * t->wgn; }

/* How one operand tile (`rows` along M or N, BK along the contraction) is read from global
 * memory. kcontig: the contraction is contiguous; `roff` is a C expression for the element
 * offset of row `r` (a long) or, for a constant-shaped matrix, NULL with `ld` its row length.
 * Otherwise the tile's rows run along memory: element (row, kx) is at `koff` + row, with `koff`
 * a C expression in the contraction index `kx` (a long). vec: every 4-element chunk the tile
 * copies starts 16-byte aligned (see operand_vec). */
typedef struct {
    const char *name;       /* the kernel's pointer */
    int kcontig;
    const char *roff;       /* kcontig: offset of row `r`, or NULL (row * ld) */
    long ld;
    const char *koff;       /* !kcontig: offset of contraction index `kx` */
    long kld;               /* !kcontig: koff is kx * kld (0: not that simple) */
    const char *base;       /* first row of the tile: "m0" or "n0" */
    const char *lim;        /* rows in the matrix (C expression) */
    int rows;               /* rows of the tile: bm or bn */
    int vec;
    int half;               /* stored as bf16: 16-byte chunks are 8 values (vec then means 8-aligned) */
} mma_operand;

/* Elements of an operand in one 16-byte chunk, and bytes of one element. */
static int chunk_elems(const mma_operand *o) { return o->half ? 8 : 4; }
static int elem_bytes(const mma_operand *o) { return o->half ? 2 : 4; }

/* Whether every row of tensor t, read as rows of `len` values (row_at), starts at a multiple
 * of 4 elements: owners start PLAN_ALIGN-aligned in the arena (and the arena itself more), so
 * it is the view offset, the token stride and, with several rows a token, the row length. */
static int operand_vec(const kgen *k, int t, long len) {
    _Static_assert(PLAN_ALIGN % 16 == 0, "cp.async needs 16-byte aligned tensors");
    long per = kg_feat(k, t) / len, c = k->g->t[t].dtype == DT_BF16 ? 8 : 4;
    return k->g->t[t].offset % c == 0 && kg_ld(k, t) % c == 0 && (per == 1 || len % c == 0);
}

/* Whether operand o takes the fast copy path: 16-byte chunks and rows (kcontig) or contraction
 * lines (!kcontig) a constant stride apart, so each thread's source pointers are one base
 * pointer plus compile-time offsets and its row/column guards are fixed for the whole loop. */
static int pipe_fast(const mma_operand *o) { return o->vec && (o->kcontig ? !o->roff : o->kld > 0); }

/* The per-thread constants of the fast path (emit_pipe_load), before the prologue. A K-major
 * thread copies chunk tid & 7 of rows (tid >> 3) + (nt / 8) i; an MN-major one chunk tid % cpl
 * of contraction lines tid / cpl + (nt / cpl) i. */
static void emit_pipe_setup(kgen *k, const mma_operand *o) {
    const char *p = o->name;
    if (!pipe_fast(o)) return;
    if (o->half && o->kcontig) {
        /* 4 chunks a row: thread tid copies chunk tid & 3 of rows (tid >> 2) + (nt / 4) i, whose
         * swizzle (row >> 1) & 1 is the same for every i (nt / 4 is a multiple of 4) */
        kg_line(k, "const int %s_lr = tid >> 2, %s_lc = tid & 3;", p, p);
        kg_line(k, "GLOBAL const unsigned short *%s_g = %s + (%s + %s_lr) * %ld + 8 * %s_lc;", p, p, o->base, p, o->ld, p);
        kg_line(k, "const long %s_rem = %s - (%s + %s_lr);", p, o->lim, o->base, p);
        kg_line(k, "const unsigned %s_d = s%s_s + 2u * (unsigned)(%s_lr * %d + ((%s_lc ^ (((%s_lr >> 1) & 1) << 1)) << 3));", p, p,
                p, BK, p, p);
        return;
    }
    if (o->half) {
        const int cpl = o->rows / 8;
        kg_line(k, "const int %s_kl = tid / %d, %s_lc = tid %% %d;", p, cpl, p, cpl);
        kg_line(k, "GLOBAL const unsigned short *%s_g = %s + (long)%s_kl * %ld + %s + 8 * %s_lc;", p, p, p, o->kld, o->base, p);
        kg_line(k, "const long %s_cr = %s - (%s + 8 * %s_lc);", p, o->lim, o->base, p);
        kg_line(k, "const int %s_cb = %s_cr >= 8 ? 16 : %s_cr > 0 ? 2 * (int)%s_cr : 0;", p, p, p, p);
        kg_line(k, "const unsigned %s_d = s%s_s + 2u * (unsigned)(%s_kl * %d);", p, p, p, o->rows);
        return;
    }
    if (o->kcontig) {
        kg_line(k, "const int %s_lr = tid >> 3, %s_lc = tid & 7;", p, p);
        kg_line(k, "GLOBAL const float *%s_g = %s + (%s + %s_lr) * %ld + 4 * %s_lc;", p, p, o->base, p, o->ld, p);
        kg_line(k, "const long %s_rem = %s - (%s + %s_lr);", p, o->lim, o->base, p);
        kg_line(k, "const unsigned %s_d = s%s_s + 4u * (unsigned)(%s_lr * %d + ((%s_lc ^ ((%s_lr & 1) << 2)) << 2));", p, p, p,
                BK, p, p);
    } else {
        const int cpl = o->rows / 4;
        kg_line(k, "const int %s_kl = tid / %d, %s_lc = tid %% %d;", p, cpl, p, cpl);
        kg_line(k, "GLOBAL const float *%s_g = %s + (long)%s_kl * %ld + %s + 4 * %s_lc;", p, p, p, o->kld, o->base, p);
        kg_line(k, "const long %s_cr = %s - (%s + 4 * %s_lc);", p, o->lim, o->base, p);
        kg_line(k, "const int %s_cb = %s_cr >= 4 ? 16 : %s_cr > 0 ? 4 * (int)%s_cr : 0;", p, p, p, p);
        kg_line(k, "const unsigned %s_d = s%s_s + 4u * (unsigned)(%s_kl * %d);", p, p, p, o->rows);
    }
}

/* cp.async of operand o's slice starting at contraction index `k0` into stage `st` (both C
 * expressions in scope). kguard: the contraction may end inside the slice. */
static void emit_pipe_load(kgen *k, const mma_operand *o, int nt, const char *ktot, int kguard) {
    const char *p = o->name;
    const int sz = o->rows * BK;
    if (o->half && !o->kcontig) {
        const int ls = nt / (o->rows / 8);
        kg_line(k, "    {");
        kg_line(k, "    const long kr = %s - (k0 + %s_kl);", ktot, p);
        kg_line(k, "    GLOBAL const unsigned short *g = %s_g + k0 * %ld;", p, o->kld);
        kg_line(k, "    #pragma unroll");
        kg_line(k, "    for (int i = 0; i < %d; i++) {", BK / ls);
        kg_line(k, "        const int l = %s_kl + %d * i, nb = %d * i < kr ? %s_cb : 0, sw = (l & 1) | (((l >> 2) & 3) << 1);", p,
                ls, ls, p);
        kg_line(k, "        cp_async16(%s_d + 2u * (unsigned)(st * %d + %d * i) + 16u * (unsigned)(%s_lc ^ sw), "
                   "(const float *)(nb ? g + %ldL * i : %s), nb);",
                p, sz, ls * o->rows, p, (long)ls * o->kld, p);
        kg_line(k, "    }");
        kg_line(k, "    }");
        return;
    }
    if (pipe_fast(o) && o->kcontig) {   /* fp32 or bf16 (emit_mma_pipe checked bf16 is fast) */
        const int ce = chunk_elems(o), eb = elem_bytes(o), rs = nt / (BK / ce);
        kg_line(k, "    {");
        if (kguard) {
            kg_line(k, "    const long kr = %s - (k0 + %d * %s_lc);", ktot, ce, p);
            kg_line(k, "    const int kb = kr >= %d ? 16 : kr > 0 ? %d * (int)kr : 0;", ce, eb);
        } else {
            kg_line(k, "    const int kb = 16;");
        }
        kg_line(k, "    GLOBAL const %s *g = %s_g + k0;", o->half ? "unsigned short" : "float", p);
        kg_line(k, "    #pragma unroll");
        kg_line(k, "    for (int i = 0; i < %d; i++) {", o->rows / rs);
        kg_line(k, "        const int nb = %d * i < %s_rem ? kb : 0;", rs, p);
        if (o->half)
            kg_line(k, "        cp_async16(%s_d + 2u * (unsigned)(st * %d + %d * i), (const float *)(nb ? g + %ldL * i : %s), nb);",
                    p, sz, rs * BK, (long)rs * o->ld, p);
        else
            kg_line(k, "        cp_async16(%s_d + 4u * (unsigned)(st * %d + %d * i), nb ? g + %ldL * i : %s, nb);", p, sz,
                    rs * BK, (long)rs * o->ld, p);
        kg_line(k, "    }");
        kg_line(k, "    }");
        return;
    }
    if (pipe_fast(o)) {
        const int ls = nt / (o->rows / 4);
        kg_line(k, "    {");
        kg_line(k, "    const long kr = %s - (k0 + %s_kl);", ktot, p);
        kg_line(k, "    GLOBAL const float *g = %s_g + k0 * %ld;", p, o->kld);
        kg_line(k, "    #pragma unroll");
        kg_line(k, "    for (int i = 0; i < %d; i++) {", BK / ls);
        kg_line(k, "        const int nb = %d * i < kr ? %s_cb : 0, sw = (((%s_kl + %d * i) >> 2) & 3) << 1;", ls, p, p, ls);
        kg_line(k, "        cp_async16(%s_d + 4u * (unsigned)(st * %d + %d * i + ((%s_lc ^ sw) << 2)), nb ? g + %ldL * i : %s, nb);",
                p, sz, ls * o->rows, p, (long)ls * o->kld, p);
        kg_line(k, "    }");
        kg_line(k, "    }");
        return;
    }
    if (o->kcontig) {
        kg_line(k, "    #pragma unroll");
        kg_line(k, "    for (int i = 0; i < %d; i++) {", o->rows * (BK / 4) / nt);
        kg_line(k, "        const int e = tid + %d * i, row = e >> 3, ch = e & 7;", nt);
        kg_line(k, "        const long r = %s + row, kx = k0 + 4 * ch;", o->base);
        if (o->roff) kg_line(k, "        const long ro = %s;", o->roff);
        else kg_line(k, "        const long ro = r * %ld;", o->ld);
        kg_line(k, "        const unsigned d = s%s_s + 4u * (unsigned)(st * %d + row * %d + ((ch ^ ((row & 1) << 2)) << 2));",
                p, sz, BK);
        if (o->vec) {
            if (kguard) {
                kg_line(k, "        const long kr = %s - kx;", ktot);
                kg_line(k, "        const int nb = r < %s && kr > 0 ? (kr >= 4 ? 16 : 4 * (int)kr) : 0;", o->lim);
            } else {
                kg_line(k, "        const int nb = r < %s ? 16 : 0;", o->lim);
            }
            kg_line(k, "        cp_async16(d, nb ? %s + ro + kx : %s, nb);", p, p);
        } else {
            kg_line(k, "        #pragma unroll");
            kg_line(k, "        for (int q = 0; q < 4; q++) {");
            kg_line(k, "            const int ok = r < %s && kx + q < %s;", o->lim, ktot);
            kg_line(k, "            cp_async4(d + 4u * q, ok ? %s + ro + kx + q : %s, ok ? 4 : 0);", p, p);
            kg_line(k, "        }");
        }
        kg_line(k, "    }");
    } else {
        const int cpl = o->rows / 4;   /* chunks per contraction line */
        kg_line(k, "    #pragma unroll");
        kg_line(k, "    for (int i = 0; i < %d; i++) {", BK * cpl / nt);
        kg_line(k, "        const int e = tid + %d * i, kl = e / %d, ch = e %% %d;", nt, cpl, cpl);
        kg_line(k, "        const long kx = k0 + kl, c = %s + 4 * ch;", o->base);
        kg_line(k, "        const unsigned d = s%s_s + 4u * (unsigned)(st * %d + kl * %d + ((ch ^ (((kl >> 2) & 3) << 1)) << 2));",
                p, sz, o->rows);
        if (o->vec) {
            kg_line(k, "        const long cr = %s - c;", o->lim);
            kg_line(k, "        const int nb = kx < %s && cr > 0 ? (cr >= 4 ? 16 : 4 * (int)cr) : 0;", ktot);
            kg_line(k, "        cp_async16(d, nb ? %s + %s + c : %s, nb);", p, o->koff, p);
        } else {
            kg_line(k, "        #pragma unroll");
            kg_line(k, "        for (int q = 0; q < 4; q++) {");
            kg_line(k, "            const int ok = kx < %s && c + q < %s;", ktot, o->lim);
            kg_line(k, "            cp_async4(d + 4u * q, ok ? %s + %s + c + q : %s, ok ? 4 : 0);", p, o->koff, p);
            kg_line(k, "        }");
        }
        kg_line(k, "    }");
    }
}

/* Fragments of one 16-wide contraction step `j` of stage `st`: A (`frag` = "af", mi tiles of
 * 16 rows from wm) or B ("bf", nj tiles of 8 rows from wn), physical k 16 j + 4 tq .. + 3. */
static void emit_frag(kgen *k, const mma_operand *o, int isa, int count) {
    const char *p = o->name;
    const int R = o->rows, sz = o->rows * BK;
    if (o->half && o->kcontig) {
        kg_line(k, "        #pragma unroll");
        kg_line(k, "        for (int i = 0; i < %d; i++) {", count);
        kg_line(k, isa ? "            const int r = wm + 16 * i + gq;" : "            const int r = wn + 8 * i + gq;");
        /* rows r and r + 8 share the swizzle of gq */
        kg_line(k, "            const char *p = (const char *)s%s + 2 * (st * %d + r * %d) + "
                   "(((2 * j + (tq >> 1)) ^ (((gq >> 1) & 1) << 1)) << 4) + ((tq & 1) << 3);",
                p, sz, BK);
        kg_line(k, "            const uint2 lo = *(const uint2 *)p;");
        if (isa) {
            kg_line(k, "            const uint2 hi = *(const uint2 *)(p + %d);", 2 * 8 * BK);
            kg_line(k, "            af[i][0] = lo.x; af[i][1] = hi.x; af[i][2] = lo.y; af[i][3] = hi.y;");
        } else {
            kg_line(k, "            bf[i][0] = lo.x; bf[i][1] = lo.y;");
        }
        kg_line(k, "        }");
        return;
    }
    if (o->half) {
        /* ldmatrix.x4.trans: lane l addresses line L(l & 7) (+ 2 for the second register of a
         * pair) of the step; A: matrices (L, rows 0-7), (L, rows 8-15), (L+2, 0-7), (L+2, 8-15)
         * of one m16 tile; B: (L, tile i), (L+2, tile i), (L, tile i+1), (L+2, tile i+1). The
         * swizzle of line L(l & 7) is l & 7. */
        const char *two = isa ? "((lane >> 4) << 1)" : "(((lane >> 3) & 1) << 1)";
        const char *chunk = isa ? "(wm >> 3) + 2 * i + ((lane >> 3) & 1)" : "(wn >> 3) + i + (lane >> 4)";
        kg_line(k, "        #pragma unroll");
        kg_line(k, "        for (int i = 0; i < %d; i += %d) {", count, isa ? 1 : 2);
        kg_line(k, "            const int ln = 16 * j + ((lane & 1) | (((lane >> 1) & 3) << 2)) + %s;", two);
        kg_line(k, "            unsigned q[4];");
        kg_line(k, "            ldsm_x4_trans_at(q, s%s_s + 2u * (unsigned)(st * %d + ln * %d) + 16u * (unsigned)((%s) ^ (lane & 7)));", p,
                sz, R, chunk);
        if (isa) kg_line(k, "            af[i][0] = q[0]; af[i][1] = q[1]; af[i][2] = q[2]; af[i][3] = q[3];");
        else kg_line(k, "            bf[i][0] = q[0]; bf[i][1] = q[1]; bf[i + 1][0] = q[2]; bf[i + 1][1] = q[3];");
        kg_line(k, "        }");
        return;
    }
    kg_line(k, "        #pragma unroll");
    kg_line(k, "        for (int i = 0; i < %d; i++) {", count);
    if (isa) kg_line(k, "            const int r = wm + 16 * i + gq;");
    else kg_line(k, "            const int r = wn + 8 * i + gq;");
    if (o->kcontig) {
        /* rows r and r + 8 have the parity of gq: the same chunk swizzle */
        kg_line(k, "            const float *p = s%s + st * %d + r * %d + (((4 * j + tq) ^ ((gq & 1) << 2)) << 2);", p, sz,
                BK);
        kg_line(k, "            const float4 lo = *(const float4 *)p;");
        if (isa) {
            kg_line(k, "            const float4 hi = *(const float4 *)(p + %d);", 8 * BK);
            kg_line(k, "            af[i][0] = pack_bf16x2(lo.x, lo.y); af[i][1] = pack_bf16x2(hi.x, hi.y);");
            kg_line(k, "            af[i][2] = pack_bf16x2(lo.z, lo.w); af[i][3] = pack_bf16x2(hi.z, hi.w);");
        } else {
            kg_line(k, "            bf[i][0] = pack_bf16x2(lo.x, lo.y); bf[i][1] = pack_bf16x2(lo.z, lo.w);");
        }
    } else {
        /* contraction lines 16 j + 4 tq + q (q = 0..3) all carry the swizzle 2 tq */
        kg_line(k, "            const float *p = s%s + st * %d + (16 * j + 4 * tq) * %d;", p, sz, R);
        kg_line(k, "            const int o0 = (((r >> 2) ^ (tq << 1)) << 2) + (r & 3);");
        if (isa) {
            kg_line(k, "            const int o1 = ((((r + 8) >> 2) ^ (tq << 1)) << 2) + (r & 3);");
            kg_line(k, "            af[i][0] = pack_bf16x2(p[o0], p[%d + o0]); af[i][2] = pack_bf16x2(p[%d + o0], p[%d + o0]);",
                    R, 2 * R, 3 * R);
            kg_line(k, "            af[i][1] = pack_bf16x2(p[o1], p[%d + o1]); af[i][3] = pack_bf16x2(p[%d + o1], p[%d + o1]);",
                    R, 2 * R, 3 * R);
        } else {
            kg_line(k, "            bf[i][0] = pack_bf16x2(p[o0], p[%d + o0]); bf[i][1] = pack_bf16x2(p[%d + o0], p[%d + o0]);",
                    R, 2 * R, 3 * R);
        }
    }
    kg_line(k, "        }");
}

/* The output stage with an elementwise group (kgen.epi): the accumulators go to shared memory
 * (the pipeline's stages, free once the main loop is done), then the block walks its tile row
 * by row with consecutive threads on consecutive columns, so the group's loads and stores are
 * coalesced; done from the mma layout instead, every element's chain sat in the unrolled
 * accumulator loop (a realm-9m backward matmul went from 1.3 to 7.6 ms). Rows are padded by 8
 * floats: the float2 writes of a half-warp (rows gq, columns 2tq) then hit distinct banks.
 * `avail`: floats of shared memory from the first operand's stages on. */
#define EPI_U 8

static int emit_staged_epilogue(kgen *k, const mma_tile *t, long avail, const char *first, const char *store_row_ok,
                                const char *col_lim, const char *out_row) {
    const int wm = t->bm / t->wgm, wn = t->bn / t->wgn, mi = wm / 16, nj = wn / 8;
    long pad = (long)t->bm * (t->bn + 8) <= avail ? 8 : 0, cs = t->bn + pad;
    if ((long)t->bm * cs > avail) {
        snprintf(k->err, sizeof k->err, "matmul: a %dx%d output tile does not fit the stages", t->bm, t->bn);
        return -1;
    }
    kg_line(k, "BARRIER();   /* every warp is done with the stages */");
    kg_line(k, "LOCAL_PTR float *sc = s%s;", first);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int i = 0; i < %d; i++)", mi);
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int h = 0; h < 2; h++)");
    kg_line(k, "        #pragma unroll");
    kg_line(k, "        for (int j = 0; j < %d; j++)", nj);
    kg_line(k, "            *(float2 *)(sc + (wm + 16 * i + gq + 8 * h) * %ld + wn + 8 * j + 2 * tq) =", cs);
    kg_line(k, "                make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);");
    kg_line(k, "BARRIER();");
    /* EPI_U elements a thread per pass, all their loads issued before any arithmetic: the
     * compiler cannot move a load above an earlier element's store (the pointers may alias),
     * so one element at a time waited on memory for each */
    const int nt = tile_threads(t), per = t->bm * t->bn / nt, U = per < EPI_U ? per : EPI_U;
    char tok[EPI_U][16], col[EPI_U][16], val[EPI_U][16], ok[16];
    kg_line(k, "for (int e0 = tid; e0 < %d; e0 += %d) {", t->bm * t->bn, nt * U);
    for (int u = 0; u < U; u++) {
        snprintf(tok[u], sizeof tok[u], "em%d", u);
        snprintf(col[u], sizeof col[u], "ec%d", u);
        snprintf(val[u], sizeof val[u], "ev%d", u);
        kg_line(k, "    const int er%d = (e0 + %d) / %d, ecc%d = (e0 + %d) %% %d;", u, u * nt, t->bn, u, u * nt, t->bn);
        kg_line(k, "    const long em%d = m0 + er%d, ec%d = n0 + ecc%d;", u, u, u, u);
        kg_line(k, "    int eok%d;", u);
        kg_line(k, "    { const long m = em%d; eok%d = e0 + %d < %d && ec%d < %s && (%s); }", u, u, u * nt, t->bm * t->bn,
                u, col_lim, store_row_ok);
        snprintf(ok, sizeof ok, "eok%d", u);
        plan_epi_loads(k, k->epi, u, tok[u], col[u], ok);
    }
    for (int u = 0; u < U; u++) {
        kg_line(k, "    if (eok%d) {", u);
        kg_line(k, "        const float ev%d = sc[er%d * %ld + ecc%d];", u, u, cs, u);
        if (k->epi->src_stored) kg_line(k, "        { const long m = em%d; (%s)[ec%d] = ev%d; }", u, out_row, u, u);
        plan_epi_values(k, k->epi, u, tok[u], col[u], val[u]);
        kg_line(k, "    }");
    }
    kg_line(k, "}");
    return 0;
}

/* The output stage without an epilogue, straight from the mma layout: accumulator e of tile
 * (i, j) of the warp's sub-tile at (wm, wn) is row gq (+8 for e >= 2), columns 2 tq and 2 tq +
 * 1; rows where store_row_ok holds, columns below col_lim, two at a time if `pair`. */
static void emit_direct_store(kgen *k, long mi, long nj, const char *store_row_ok, const char *col_lim, const char *out_row,
                              int pair) {
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int i = 0; i < %ld; i++)", mi);
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int h = 0; h < 2; h++) {");
    kg_line(k, "        const long m = m0 + wm + 16 * i + gq + 8 * h;");
    kg_line(k, "        if (!(%s)) continue;", store_row_ok);
    kg_line(k, "        GLOBAL float *orow = %s;", out_row);
    kg_line(k, "        #pragma unroll");
    kg_line(k, "        for (int j = 0; j < %ld; j++) {", nj);
    kg_line(k, "            const long c = n0 + wn + 8 * j + 2 * tq;");
    kg_line(k, "            const float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];");
    if (pair) {
        kg_line(k, "            if (c + 1 < %s) *(float2 *)(orow + c) = make_float2(v0, v1);", col_lim);
        kg_line(k, "            else if (c < %s) orow[c] = v0;", col_lim);
    } else {
        kg_line(k, "            if (c < %s) orow[c] = v0;", col_lim);
        kg_line(k, "            if (c + 1 < %s) orow[c + 1] = v1;", col_lim);
    }
    kg_line(k, "        }");
    kg_line(k, "    }");
}

/* The whole kernel body after the arguments: C[m][n] = sum_k A[m][k] B[n][k] over the tile
 * (m0, n0) (C expressions defined by the caller's prologue), contraction indices from `kbeg`
 * to `ktot` (0 to K constant, or one split's rows for weight gradients; none if ktot <= kbeg,
 * which stores zeros). The output row m (store_row_ok true) starts at `out_row` (a pointer
 * expression in m); columns below `col_lim` are written, two at a time if `pair` (the row
 * start and col_lim even). a->rows and b->rows are the tile's. */
static int emit_mma_pipe(kgen *k, const mma_tile *t, const mma_operand *a, const mma_operand *b, const char *kbeg,
                         const char *ktot, int kguard, const char *store_row_ok, const char *col_lim,
                         const char *out_row, int pair) {
    const int nt = tile_threads(t), wm = t->bm / t->wgm, wn = t->bn / t->wgn, mi = wm / 16, nj = wn / 8;
    const mma_operand *ops[2] = {a, b};
    for (int q = 0; q < 2; q++) {
        const mma_operand *o = ops[q];
        const int ce = chunk_elems(o), cpr = BK / ce, cpl = o->rows / ce;
        int bad = o->kcontig ? o->rows * cpr % nt || nt % cpr || (o->half && nt % 16)
                            : o->rows % 32 || BK * cpl % nt || nt % cpl || (o->half && (o->rows % 64 || cpl < 8));
        if (bad || BK != 32) {
            snprintf(k->err, sizeof k->err, "matmul: tile %dx%d cannot be staged by %d threads", t->bm, t->bn, nt);
            return -1;
        }
        if (o->half && (!pipe_fast(o) || (!o->kcontig && q == 1 && (wn / 8) % 2))) {
            snprintf(k->err, sizeof k->err, "matmul: bf16 operand %s needs 8-aligned rows a constant stride apart", o->name);
            return -1;
        }
    }
    if (wm % 16 || wn % 8) {
        snprintf(k->err, sizeof k->err, "matmul: warp tile %dx%d is not made of m16n8 tiles", wm, wn);
        return -1;
    }
    const long stage_bytes = (long)BK * (a->rows * elem_bytes(a) + b->rows * elem_bytes(b)), limit = k->shared_max > 0 ? k->shared_max : 160L * 1024;
    int stages = t->stages;
    while (stages > 2 && stages * stage_bytes > limit) stages--;
    /* a tile that asks for minb blocks per SM gets them: past 3 stages only while minb blocks'
     * stages fit an H100 SM's 227 KiB with room for the static arrays */
    while (t->minb > 1 && stages > 3 && (long)t->minb * stages * stage_bytes > 200L * 1024) stages--;
    if (stages * stage_bytes > limit) {
        snprintf(k->err, sizeof k->err, "matmul: %d-stage %dx%d tiles need %ld bytes of shared memory, %ld available",
                 stages, t->bm, t->bn, stages * stage_bytes, limit);
        return -1;
    }
    char nm[16];
    for (int q = 0; q < 2; q++) {
        snprintf(nm, sizeof nm, "s%s", ops[q]->name);
        kg_shared(k, nm, (long)stages * ops[q]->rows * BK * elem_bytes(ops[q]) / 4);
    }
    kg_line(k, "const int tid = LID_X, lane = tid & 31, warp = tid >> 5;");
    kg_line(k, "const int wm = (warp / %d) * %d, wn = (warp %% %d) * %d, gq = lane >> 2, tq = lane & 3;", t->wgn, wm,
            t->wgn, wn);
    kg_line(k, "const unsigned s%s_s = smem_u32(s%s), s%s_s = smem_u32(s%s);", a->name, a->name, b->name, b->name);
    kg_line(k, "float acc[%d][%d][4];", mi, nj);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int i = 0; i < %d; i++)", mi);
    kg_line(k, "    for (int j = 0; j < %d; j++)", nj);
    kg_line(k, "        for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;");
    emit_pipe_setup(k, a);
    emit_pipe_setup(k, b);
    kg_line(k, "const long kbeg = %s, nk = (%s) > kbeg ? ((%s) - kbeg + %d) / %d : 0;", kbeg, ktot, ktot, BK - 1, BK);
    /* the first STAGES - 1 slices; a group is committed even when empty so that the count of
     * groups, which wait_group relies on, does not depend on the shape */
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int st = 0; st < %d; st++) {", stages - 1);
    kg_line(k, "    if (st < nk) {");
    kg_line(k, "    const long k0 = kbeg + (long)st * %d;", BK);
    emit_pipe_load(k, a, nt, ktot, kguard);
    emit_pipe_load(k, b, nt, ktot, kguard);
    kg_line(k, "    }");
    kg_line(k, "    cp_async_commit();");
    kg_line(k, "}");
    kg_line(k, "int st = 0, ws = %d;", stages - 1);
    kg_line(k, "for (long kt = 0; kt < nk; kt++) {");
    kg_line(k, "    CP_ASYNC_WAIT(%d);", stages - 2);
    kg_line(k, "    BARRIER();");
    /* the stage refilled here was read in the previous iteration, which every thread finished
     * before the barrier above */
    kg_line(k, "    if (kt + %d < nk) {", stages - 1);
    kg_line(k, "    const long k0 = kbeg + (kt + %d) * %d;", stages - 1, BK);
    kg_line(k, "    { const int st = ws;");
    emit_pipe_load(k, a, nt, ktot, kguard);
    emit_pipe_load(k, b, nt, ktot, kguard);
    kg_line(k, "    }");
    kg_line(k, "    }");
    kg_line(k, "    cp_async_commit();");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int j = 0; j < %d; j++) {", BK / 16);
    kg_line(k, "        unsigned af[%d][4], bf[%d][2];", mi, nj);
    emit_frag(k, a, 1, mi);
    emit_frag(k, b, 0, nj);
    kg_line(k, "        #pragma unroll");
    kg_line(k, "        for (int i = 0; i < %d; i++)", mi);
    kg_line(k, "            #pragma unroll");
    kg_line(k, "            for (int jn = 0; jn < %d; jn++) mma_bf16_16816(acc[i][jn], af[i], bf[jn]);", nj);
    kg_line(k, "    }");
    kg_line(k, "    st = st == %d ? 0 : st + 1;", stages - 1);
    kg_line(k, "    ws = ws == %d ? 0 : ws + 1;", stages - 1);
    kg_line(k, "}");
    kg_line(k, "CP_ASYNC_WAIT(0);");
    if (k->epi) return emit_staged_epilogue(k, t, stages * stage_bytes / 4, a->name, store_row_ok, col_lim,
                                            out_row);
    emit_direct_store(k, mi, nj, store_row_ok, col_lim, out_row, pair);
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

/* An elementwise group can follow the product into its output stage when a row of the
 * product is a token (the group indexes its inputs by token). */
static int epilogue_ok(const ir_graph *g, const ir_node *n) {
    const ir_shape *x = op_in_shape(g, n, 0);
    return ir_feat(x) == x->d[x->ndim - 1];
}

/* x, w, the epilogue's inputs, y (unless only the epilogue needs it), the epilogue's outputs */
static void emit_args(kgen *k, const ir_node *n) {
    kg_in(k, "x", n->in[0]);
    kg_in(k, "w", n->in[1]);
    if (k->epi) plan_epi_inputs(k, k->epi);
    if (!k->epi || k->epi->src_stored) kg_out(k, "y", n->out[0]);
    if (k->epi) plan_epi_outputs(k, k->epi);
}

/* ---- Hopper: products of bf16 operands on wgmma (sm_90a, kgen.wgmma) ----
 * mma.sync feeds the tensor cores from registers that every warp loads from shared memory, and
 * a 128x128 tile at two blocks a SM re-reads its operands from L2 once per column tile: the
 * bf16 in_proj forward ran at ~215 TFLOP/s with L2 at 83% of its peak. wgmma reads both
 * operands straight from shared memory, asynchronously, 64 x BN x 16 per warpgroup and
 * instruction, so the tile can be 192 x ~256 (one block a SM, fewer L2 reads per output) while
 * the next slices load.
 *
 * Forms: y = x W^T with W [N,K] (K-major, the forward) or y = x W with W [K,N] (N-major, the
 * input gradient), x [M,K] one row a token; x and W both stored as bf16 (gen/precision.c).
 * Three warpgroups, 64 rows of the tile each (2 and 4 were slower: bench/RESULTS.md); BN = N
 * split into ceil(N / 256) near-equal column tiles, a multiple of 8 for K-major W (1716 -> 7 x
 * 248, 576 -> 3 x 192: less waste than 256) and of 64 for N-major W.
 * Shared tiles, 128-byte swizzle (a 16-byte chunk c of a 128-byte row r at c ^ (r & 7), in
 * 1024-byte atoms of 8 rows, every stage 1024-byte aligned):
 *  - K-major (x; W of the forward): [row][64 k], atoms along the rows; the descriptor's stride
 *    offset is the atom (1024); the 16-wide k step kk starts 32 kk bytes into the rows.
 *  - N-major (W of the input gradient): a row is 64 columns of one k, so an atom holds 8 k of
 *    64 columns; atoms of 8 k are WG_MN_SBO (1024) apart (the stride offset), the 64-column
 *    blocks WG_MN_LBO (8192) apart (the leading offset); step kk starts 2 atoms further;
 *    imm-trans-b = 1.
 * Pipeline: cp.async, STAGES slices of 64 k, STAGES - 2 ahead: the slice refilled in iteration
 * kt was read by the wgmmas of kt - 2, which every thread has waited for (wgmma.wait_group 1
 * after kt - 1) before the barrier of kt. cp.async writes through the generic proxy and wgmma
 * reads through the async one, hence fence.proxy.async before that barrier. The epilogue (with
 * an elementwise group) is emit_staged_epilogue's, through the stages. Every output is summed
 * by the tensor cores in the fixed order of the slices: deterministic.
 * Tried and not kept (H100, realm-9m 8 x 8192): fp32 x rounded into the stage through
 * registers (the input gradients whose dy is fp32): 2.29 -> 2.40 ms for the in_proj's, 2.68 ->
 * 3.38 for the out_proj's, slower than mma.sync's rounding at the fragment load. */
#ifndef WG_NWG
#define WG_NWG 3        /* warpgroups a block: the tile is 64 WG_NWG rows */
#endif
#ifndef WG_STAGES
#define WG_STAGES 4
#endif
#ifndef WG_BN_MAX
#define WG_BN_MAX 256
#endif
#ifndef WG_MN_LBO
#define WG_MN_LBO 8192  /* N-major B: bytes between 64-column atoms (SBO: between 8-row groups) */
#define WG_MN_SBO 1024
#endif
#define WG_BK 64                        /* contraction slice: a 128-byte bf16 row */
#define WG_ATOM 1024                    /* the swizzle atom: 8 rows of 128 bytes */

/* Column tile: N in ceil(N / 256) near-equal parts, a multiple of 8 (K-major W) or of the
 * 64-column atom (N-major W). */
static long wg_bn(long N, int nmajor) {
    const long q = nmajor ? 64 : 8;
    long tiles = (N + WG_BN_MAX - 1) / WG_BN_MAX, bn = (N + tiles - 1) / tiles;
    return (bn + q - 1) / q * q;
}

static long wg_stage_bytes(long bm, long bn) { return (bm + bn) * 2 * WG_BK; }

/* Stages within the work-group's shared memory (3 at least; wgmma_ok checks those fit). */
static int wg_stages(long bm, long bn, long shared_max) {
    int st = WG_STAGES;
    while (st > 3 && st * wg_stage_bytes(bm, bn) + WG_ATOM > shared_max) st--;
    return st;
}

/* Whether the wgmma form takes this product (see above): x and W bf16, x one row a token with
 * rows 16-byte aligned. */
static int wgmma_ok(const kgen *k, const ir_node *n) {
    int x = n->in[0], w = n->in[1];
    const int nmajor = (int)n->ia[0];
    if (!k->wgmma || k->g->t[x].dtype != DT_BF16 || k->g->t[w].dtype != DT_BF16) return 0;
    const ir_shape *xs = &k->g->t[x].shape;
    long K = xs->d[xs->ndim - 1], N = kg_feat(k, w) / K, per = kg_feat(k, x) / K;
    const long bn = wg_bn(N, nmajor), bm = 64L * WG_NWG, stages = wg_stages(bm, bn, k->shared_max);
    /* an epilogue stages the fp32 output tile through the stages (emit_staged_epilogue) */
    return per == 1 && operand_vec(k, x, K) && K % 8 == 0 && k->g->t[w].offset % 8 == 0 &&
           (nmajor ? N % 8 == 0 : K % 8 == 0) && stages * wg_stage_bytes(bm, bn) + WG_ATOM <= k->shared_max &&
           (!k->epi || bm * bn * 4 <= stages * wg_stage_bytes(bm, bn));
}

/* cp.async of `rows` rows (from `base`, below `lim`) of a K-major bf16 operand into the stage
 * at shared address `dst`, slice k0: thread tid copies chunk lc = tid % 8 of rows
 * lr + (nt / 8) i, lr = tid / 8, to chunk lc ^ (r & 7) of its row (the 128-byte swizzle). */
static void emit_wg_load(kgen *k, int nt, const char *p, long rows, long ld, const char *base, const char *lim, long K) {
    const int rs = nt / 8;
    kg_line(k, "    {");
    kg_line(k, "    const long kr = %ldL - (k0 + 8 * lc);", K);
    kg_line(k, "    const int kb = kr >= 8 ? 16 : kr > 0 ? 2 * (int)kr : 0;");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int i = 0; i < %ld; i++) {", (rows + rs - 1) / rs);
    kg_line(k, "        const int r = lr + %d * i;", rs);
    if (rows % rs) kg_line(k, "        if (r >= %ld) break;", rows);
    kg_line(k, "        const long gr = %s + r;", base);
    kg_line(k, "        const int nb = gr < %s ? kb : 0;", lim);
    kg_line(k, "        cp_async16(dst + (unsigned)(r * 128 + ((lc ^ (r & 7)) << 4)), "
               "(const float *)(nb ? %s + gr * %ldL + k0 + 8 * lc : %s), nb);", p, ld, p);
    kg_line(k, "    }");
    kg_line(k, "    }");
}

/* cp.async of an N-major W [K,N] slice (rows k0.. of W, columns n0 .. n0 + bn) into the stage
 * at `dst`: 64-column atoms WG_MN_LBO bytes apart, each 8-row group of an atom WG_MN_SBO apart
 * inside it, row (k & 7) of a group 128 bytes, chunk c at c ^ (k & 7). */
static void emit_wg_load_nmajor(kgen *k, int nt, long bn, long N, long K) {
    const long cpr = bn / 8, total = WG_BK * cpr;
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int i = 0; i < %ld; i++) {", (total + nt - 1) / nt);
    kg_line(k, "        const int e = tid + %d * i;", nt);
    if (total % nt) kg_line(k, "        if (e >= %ld) break;", total);
    kg_line(k, "        const int kl = e / %ld, cc = e %% %ld, ch = cc & 7;", cpr, cpr);
    kg_line(k, "        const long gk = k0 + kl, gc = n0 + 8 * cc;");
    kg_line(k, "        const int nb = gk < %ldL && gc < %ldL ? 16 : 0;", K, N);
    kg_line(k, "        cp_async16(dst + (unsigned)((cc >> 3) * %d + (kl >> 3) * %d + (kl & 7) * 128 + ((ch ^ (kl & 7)) << 4)), "
               "(const float *)(nb ? w + gk * %ldL + gc : w), nb);", WG_MN_LBO, WG_MN_SBO, N);
    kg_line(k, "    }");
}

/* A whole stage at shared address `dst` (in scope with k0): x's rows, then W's tile sa bytes on. */
static void emit_wg_stage(kgen *k, int nt, long bm, long bn, int nmajor, long ldx, long N, long K, long sa) {
    char nlim[32];
    snprintf(nlim, sizeof nlim, "%ldL", N);
    emit_wg_load(k, nt, "x", bm, ldx, "m0", "M", K);
    kg_line(k, "    dst += %ldu;", sa);
    if (nmajor) emit_wg_load_nmajor(k, nt, bn, N, K);
    else emit_wg_load(k, nt, "w", bn, K, "n0", nlim, K);
}

/* One wgmma.mma_async m64nBNk16 on the thread's accumulators acc[0][j][e], A and B from the
 * descriptors da, db, D += A B; tb: B is N-major. */
static void emit_wgmma(kgen *k, long bn, int tb) {
    const long nr = bn / 2;
    char buf[512];
    kg_line(k, "asm volatile(\"{\\n.reg .pred p;\\nsetp.ne.b32 p, %%%ld, 0;\\n\"", nr + 2);
    kg_line(k, "    \"wgmma.mma_async.sync.aligned.m64n%ldk16.f32.bf16.bf16 {\"", bn);
    for (long i = 0; i < nr; i += 16) {
        int o = 0;
        for (long r = i; r < nr && r < i + 16; r++) o += snprintf(buf + o, sizeof buf - o, "%%%ld%s", r, r + 1 < nr ? "," : "");
        kg_line(k, "    \"%s\"", buf);
    }
    kg_line(k, "    \"}, %%%ld, %%%ld, p, 1, 1, 0, %d;\\n}\\n\"", nr, nr + 1, tb);
    for (long i = 0; i < nr; i += 8) {
        int o = 0;
        for (long r = i; r < nr && r < i + 8; r++)
            o += snprintf(buf + o, sizeof buf - o, "%s\"+f\"(acc[0][%ld][%ld])", r ? ", " : "", r / 4, r % 4);
        kg_line(k, "    %s%s", i ? "" : ": ", buf);
    }
    kg_line(k, "    : \"l\"(da), \"l\"(db), \"r\"(1));");
}

static int emit_wgmma_mm(kgen *k, const ir_node *n) {
    int x = n->in[0], w = n->in[1], y = n->out[0];
    const int nmajor = (int)n->ia[0];
    const ir_shape *xs = &k->g->t[x].shape;
    const long K = xs->d[xs->ndim - 1], N = kg_feat(k, w) / K, bn = wg_bn(N, nmajor), ntile = (N + bn - 1) / bn,
               nj = bn / 8;
    const int nwg = WG_NWG, bm = 64 * nwg, nt = 128 * nwg, stages = wg_stages(bm, bn, k->shared_max);
    const long sa = (long)bm * 2 * WG_BK, stage = wg_stage_bytes(bm, bn), ldx = kg_ld(k, x);
    int node = (int)(n - k->g->n);
    char ry[160], orow[200], nlim[32], name[48];
    snprintf(name, sizeof name, "matmul_%s_wgmma%s", nmajor ? "nn" : "nt", k->epi ? "_epi" : "");
    kg_begin(k, name, node, k->epi ? k->epi->n1 : node + 1);
    emit_args(k, n);
    kg_line(k, "const long M = %s;", kg_ntok_expr(k, x));
    kg_line(k, "const long m0 = (GID_X / %ld) * %d, n0 = (GID_X %% %ld) * %ld;", ntile, bm, ntile, bn);
    kg_line(k, "if (m0 >= M) return;");
    kg_shared(k, "sx", (stages * stage + WG_ATOM) / 4);
    kg_line(k, "const int tid = LID_X, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;");
    kg_line(k, "const int wm = 16 * warp, wn = 0, lr = tid >> 3, lc = tid & 7;");
    kg_line(k, "const unsigned s0 = (smem_u32(sx) + %du) & ~%du;", WG_ATOM - 1, WG_ATOM - 1);
    /* descriptors: start >> 4, leading and stride byte offsets >> 4, 128-byte swizzle. K-major:
     * the leading offset is unused, 8-row groups one atom apart. */
    kg_line(k, "const unsigned long long da0 = (1ull << 16) | (%dull << 32) | (1ull << 62) | ((s0 + (unsigned)(warp >> 2) * %du) >> 4);",
            WG_ATOM / 16, 64 * 2 * WG_BK);
    if (nmajor)
        kg_line(k, "const unsigned long long db0 = (%dull << 16) | (%dull << 32) | (1ull << 62) | ((s0 + %ldu) >> 4);",
                WG_MN_LBO / 16, WG_MN_SBO / 16, sa);
    else
        kg_line(k, "const unsigned long long db0 = (1ull << 16) | (%dull << 32) | (1ull << 62) | ((s0 + %ldu) >> 4);",
                WG_ATOM / 16, sa);
    kg_line(k, "float acc[1][%ld][4];", nj);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int j = 0; j < %ld; j++)", nj);
    kg_line(k, "    for (int e = 0; e < 4; e++) acc[0][j][e] = 0.0f;");
    kg_line(k, "const long nk = %ld;", (K + WG_BK - 1) / WG_BK);
    snprintf(nlim, sizeof nlim, "%ldL", N);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int st = 0; st < %d; st++) {", stages - 2);
    kg_line(k, "    if (st < nk) {");
    kg_line(k, "    const long k0 = (long)st * %d;", WG_BK);
    kg_line(k, "    unsigned dst = s0 + (unsigned)st * %ldu;", stage);
    emit_wg_stage(k, nt, bm, bn, nmajor, ldx, N, K, sa);
    kg_line(k, "    }");
    kg_line(k, "    cp_async_commit();");
    kg_line(k, "}");
    kg_line(k, "int st = 0, ws = %d;", stages - 2);
    kg_line(k, "for (long kt = 0; kt < nk; kt++) {");
    kg_line(k, "    CP_ASYNC_WAIT(%d);", stages - 3);
    kg_line(k, "    asm volatile(\"fence.proxy.async.shared::cta;\" ::: \"memory\");");
    kg_line(k, "    BARRIER();");
    kg_line(k, "    if (kt + %d < nk) {", stages - 2);
    kg_line(k, "    const long k0 = (kt + %d) * %d;", stages - 2, WG_BK);
    kg_line(k, "    unsigned dst = s0 + (unsigned)ws * %ldu;", stage);
    emit_wg_stage(k, nt, bm, bn, nmajor, ldx, N, K, sa);
    kg_line(k, "    }");
    kg_line(k, "    cp_async_commit();");
    kg_line(k, "    asm volatile(\"wgmma.fence.sync.aligned;\" ::: \"memory\");");
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int kk = 0; kk < %d; kk++) {", WG_BK / 16);
    kg_line(k, "        const unsigned long long da = da0 + (unsigned long long)((st * %ldu + 32u * kk) >> 4), "
               "db = db0 + (unsigned long long)((st * %ldu + %du * kk) >> 4);", stage, stage, nmajor ? 2 * WG_MN_SBO : 32);
    kg_line(k, "        {");
    emit_wgmma(k, bn, nmajor);
    kg_line(k, "        }");
    kg_line(k, "    }");
    kg_line(k, "    asm volatile(\"wgmma.commit_group.sync.aligned;\" ::: \"memory\");");
    kg_line(k, "    asm volatile(\"wgmma.wait_group.sync.aligned 1;\" ::: \"memory\");");
    kg_line(k, "    st = st == %d ? 0 : st + 1;", stages - 1);
    kg_line(k, "    ws = ws == %d ? 0 : ws + 1;", stages - 1);
    kg_line(k, "}");
    kg_line(k, "asm volatile(\"wgmma.wait_group.sync.aligned 0;\" ::: \"memory\");");
    /* the accumulators were written behind the compiler's back until the wait */
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int j = 0; j < %ld; j++)", nj);
    kg_line(k, "    for (int e = 0; e < 4; e++) asm volatile(\"\" : \"+f\"(acc[0][j][e]) :: \"memory\");");
    kg_line(k, "CP_ASYNC_WAIT(0);");
    snprintf(orow, sizeof orow, "y + %s", row_at(ry, sizeof ry, k, y, N, "m"));
    if (k->epi) {
        const mma_tile t = {bm, (int)bn, 4 * nwg, 1, stages, 1};
        kg_line(k, "{");
        kg_line(k, "LOCAL_PTR float *sxa = sx + (s0 - smem_u32(sx)) / 4;");
        /* emit_staged_epilogue addresses the stages as s<first> */
        if (emit_staged_epilogue(k, &t, (long)stages * stage / 4, "xa", "m < M", nlim, orow) < 0) return -1;
        kg_line(k, "}");
    } else {
        emit_direct_store(k, 1, nj, "m < M", nlim, orow, k->g->t[y].offset % 2 == 0 && kg_ld(k, y) % 2 == 0 && N % 2 == 0);
    }
    grid_tiles(k, 0, x, 1, ntile, bm);
    kg_block(k, nt, 1, 1);
    kg_min_blocks(k, 1);
    return kg_end(k);
}

static int emit_bf16(kgen *k, const ir_node *n) {
    if (wgmma_ok(k, n)) return emit_wgmma_mm(k, n);
    int x = n->in[0], w = n->in[1], y = n->out[0];
    const ir_shape *xs = &k->g->t[x].shape;
    const mma_tile *t = k->epi ? &TILE_MM_EPI : &TILE_MM;
    long K = xs->d[xs->ndim - 1], N = kg_feat(k, w) / K, per = kg_feat(k, x) / K, ntile = (N + t->bn - 1) / t->bn;
    int node = (int)(n - k->g->n);
    char rx[160], ry[160], orow[200], nlim[32], klim[32], wk[64];
    kg_begin(k, n->ia[0] ? (k->epi ? "matmul_nn_bf16_epi" : "matmul_nn_bf16") : (k->epi ? "matmul_nt_bf16_epi" : "matmul_nt_bf16"),
             node, k->epi ? k->epi->n1 : node + 1);
    emit_args(k, n);
    kg_line(k, "const long M = %s * %ld;", kg_ntok_expr(k, x), per);
    kg_line(k, "const long m0 = (GID_X / %ld) * %d, n0 = (GID_X %% %ld) * %d;", ntile, t->bm, ntile, t->bn);
    kg_line(k, "if (m0 >= M) return;");
    snprintf(nlim, sizeof nlim, "%ldL", N);
    snprintf(klim, sizeof klim, "%ldL", K);
    /* one row a token: rows are the token stride apart (the fast copy path) */
    mma_operand a = {.name = "x", .kcontig = 1, .roff = per == 1 ? NULL : row_at(rx, sizeof rx, k, x, K, "r"),
                     .ld = kg_ld(k, x), .base = "m0", .lim = "M", .rows = t->bm, .vec = operand_vec(k, x, K),
                     .half = k->g->t[x].dtype == DT_BF16};
    mma_operand b;
    /* a weight is an owner or a view at a constant offset: its rows align like its offset */
    const int whalf = k->g->t[w].dtype == DT_BF16, wc = whalf ? 8 : 4;
    int wvec = k->g->t[w].offset % wc == 0;
    if (n->ia[0]) {   /* W [K,N]: the contraction index selects the row */
        snprintf(wk, sizeof wk, "kx * %ld", N);
        b = (mma_operand){.name = "w", .kcontig = 0, .koff = wk, .kld = N, .base = "n0", .lim = nlim, .rows = t->bn,
                          .vec = wvec && N % wc == 0, .half = whalf};
    } else {          /* W [N,K] */
        b = (mma_operand){.name = "w", .kcontig = 1, .roff = NULL, .ld = K, .base = "n0", .lim = nlim, .rows = t->bn,
                          .vec = wvec && K % wc == 0, .half = whalf};
    }
    snprintf(orow, sizeof orow, "y + %s", row_at(ry, sizeof ry, k, y, N, "m"));
    int pair = k->g->t[y].offset % 2 == 0 && kg_ld(k, y) % 2 == 0 && N % 2 == 0;
    if (emit_mma_pipe(k, t, &a, &b, "0", klim, K % BK != 0, "m < M", nlim, orow, pair) < 0) return -1;
    grid_tiles(k, 0, x, per, ntile, t->bm);
    kg_block(k, tile_threads(t), 1, 1);
    if (t->minb) kg_min_blocks(k, t->minb);
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
    kg_param_grad(k);
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
    char ra[160], rb[160], plim[32], qlim[32], orow[160];
    kg_begin(k, "matmul_wgrad_bf16", node, node + 1);
    kg_param_grad(k);
    kg_in(k, "a", a);
    kg_in(k, "b", b);
    kg_out(k, "part", part);
    kg_line(k, "const long R = %s * %ld;", kg_ntok_expr(k, a), per);
    emit_split_range(k, "R", G);
    kg_line(k, "const long n0 = GID_X * %d, m0 = GID_Y * %d;", t->bn, t->bm);
    snprintf(plim, sizeof plim, "%ldL", P);
    snprintf(qlim, sizeof qlim, "%ldL", Q);
    mma_operand oa = {.name = "a", .kcontig = 0, .koff = row_at(ra, sizeof ra, k, a, P, "kx"),
                      .kld = per == 1 ? kg_ld(k, a) : 0, .base = "m0", .lim = plim, .rows = t->bm,
                      .vec = operand_vec(k, a, P), .half = k->g->t[a].dtype == DT_BF16};
    mma_operand ob = {.name = "b", .kcontig = 0, .koff = row_at(rb, sizeof rb, k, b, Q, "kx"),
                      .kld = kg_feat(k, b) / Q == 1 ? kg_ld(k, b) : 0, .base = "n0", .lim = qlim, .rows = t->bn,
                      .vec = operand_vec(k, b, Q), .half = k->g->t[b].dtype == DT_BF16};
    snprintf(orow, sizeof orow, "part + GID_Z * %ld + m * %ld", P * Q, Q);
    char rowok[48];
    snprintf(rowok, sizeof rowok, "m < %ld", P);
    if (emit_mma_pipe(k, t, &oa, &ob, "r0", "r1", 1, rowok, qlim, orow, Q % 2 == 0) < 0) return -1;
    kg_grid(k, 0, (Q + t->bn - 1) / t->bn, 0, 0, 0, 1);
    kg_grid(k, 1, (P + t->bm - 1) / t->bm, 0, 0, 0, 1);
    kg_grid(k, 2, G, 0, 0, 0, 1);
    kg_block(k, tile_threads(t), 1, 1);
    if (t->minb) kg_min_blocks(k, t->minb);
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
    kg_begin(k, n->ia[0] ? (k->epi ? "matmul_nn_epi" : "matmul_nn") : (k->epi ? "matmul_nt_epi" : "matmul_nt"), node,
             k->epi ? k->epi->n1 : node + 1);
    emit_args(k, n);
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
    if (k->epi) {
        kg_line(k, "        if (c < %ld) {", N);
        if (k->epi->src_stored) kg_line(k, "            y[%s + c] = acc[i][j];", row_at(ry, sizeof ry, k, y, N, "m"));
        plan_epi_loads(k, k->epi, 0, "m", "c", NULL);
        plan_epi_values(k, k->epi, 0, "m", "c", "acc[i][j]");
        kg_line(k, "        }");
    } else {
        kg_line(k, "        if (c < %ld) y[%s + c] = acc[i][j];", N, row_at(ry, sizeof ry, k, y, N, "m"));
    }
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
    kg_param_grad(k);
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
                          .flops = flops, .emit = emit, .iattr = {"trans", NULL}, .epilogue_ok = epilogue_ok,
                          .bf16_in = 3};
const op_def op_matmul_wgrad = {.name = "matmul_wgrad", .nin = 2, .nout = 2, .infer = infer_wgrad,
                                .ref = ref_wgrad, .flops = flops_wgrad, .emit = emit_wgrad, .bf16_in = 3};
