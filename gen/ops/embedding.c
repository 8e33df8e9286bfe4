/* embedding: y[tok] = table[token[tok]]. tokens [B,S] (i32), table [V,d] -> [B,S,d].
 * Gradient: embedding_bwd(tokens, dy) -> (dtable [V,d], dtable_partial [EMB_CHUNKS,V,d]): the
 * tokens are split into EMB_CHUNKS fixed chunks, partial c holds the sum of chunk c's dy rows
 * per token id (in token order) and dtable adds the partials in chunk order, so the result is
 * deterministic (no atomics). dtable_partial is a workspace nobody differentiates. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>
#include <string.h>

/* Token chunks for the backward. A constant (static workspace shape), kept small because the
 * workspace is EMB_CHUNKS x V x d floats whatever the batch: 16 x the table (6 MB for realm-9m,
 * 1 MiB for the tiny CPU model, whose memory-budget tests notice more). 16 chunks x 12 feature
 * slices (d = 384) is 192 work-groups; each streams its tokens' dy through LOCAL tiles. */
#define EMB_CHUNKS 16
#define EMB_TILE 64   /* tokens per LOCAL tile: 32 KB of sums + 8 KB of dy stay under 48 KB */

/* Tokens per chunk: chunk c owns tokens [c * per, (c + 1) * per), in the kernels and the
 * reference alike. */
static long chunk_tokens(long ntok) { return (ntok + EMB_CHUNKS - 1) / EMB_CHUNKS; }

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *tok = op_in_shape(g, n, 0), *tab = op_in_shape(g, n, 1);
    if (op_in_dtype(g, n, 0) != DT_I32) return OP_ERR("tokens must be integer");
    if (ir_ntok_dims(tok) != tok->ndim) return OP_ERR("tokens must have only batch/sequence dims");
    if (tab->ndim != 2 || ir_ntok_dims(tab)) return OP_ERR("table must be a constant [V, d] matrix");
    out[0] = *tok;
    out[0].d[out[0].ndim++] = tab->d[1];
    dt[0] = DT_F32;
    return 0;
}

static int infer_bwd(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *dy = op_in_shape(g, n, 1);
    if (n->ia[0] < 1) return OP_ERR("vocab must be positive");
    if (dy->ndim < 1) return OP_ERR("dy must have a feature dim");
    out[0] = ir_shape_make(2, (int[]){(int)n->ia[0], dy->d[dy->ndim - 1]});
    out[1] = ir_shape_make(3, (int[]){EMB_CHUNKS, (int)n->ia[0], dy->d[dy->ndim - 1]});
    dt[0] = dt[1] = DT_F32;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    const ir_node n = g->n[node];
    int in[2] = {n.in[0], dout[0]}, out[IR_MAX_IO];
    long ia[IR_MAX_IATTR] = {g->t[n.in[1]].shape.d[0]};
    din[0] = -1;
    if (ir_emit(g, "embedding_bwd", in, 2, ia, NULL, out) < 0) return -1;
    din[1] = out[0];   /* out[1], the per-chunk workspace, is no gradient of anything */
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf tok = ref_get(c, n->in[0]), tab = ref_get(c, n->in[1]), y = ref_get(c, n->out[0]);
    long V = tab.feat / y.feat;
    for (long t = 0; t < y.ntok; t++) {
        long v = (long)tok.p[t * tok.ld];
        if (v < 0 || v >= V) v = 0;   /* the runtime only feeds bytes; keep the oracle total */
        memcpy(&y.p[t * y.ld], &tab.p[v * y.feat], sizeof(double) * (size_t)y.feat);
    }
}

static void ref_bwd(const ref_ctx *c, const ir_node *n) {
    ref_buf tok = ref_get(c, n->in[0]), dy = ref_get(c, n->in[1]), dt = ref_get(c, n->out[0]);
    ref_buf part = ref_get(c, n->out[1]);
    long d = dy.feat, V = dt.feat / d, per = chunk_tokens(dy.ntok);
    memset(dt.p, 0, sizeof(double) * (size_t)dt.feat);
    memset(part.p, 0, sizeof(double) * (size_t)part.feat);
    for (long t = 0; t < dy.ntok; t++) {
        long v = (long)tok.p[t * tok.ld];
        if (v < 0 || v >= V) continue;
        for (long f = 0; f < d; f++) {
            dt.p[v * d + f] += dy.p[t * dy.ld + f];
            part.p[((t / per) * V + v) * d + f] += dy.p[t * dy.ld + f];
        }
    }
}

/* ---- kernel templates ---- */

/* Grid dim 0 covering `mult` x (token count of t), `div` per group. */
static void grid_tokens(kgen *k, int t, long mult, long div) {
    const ir_shape *s = &k->g->t[t].shape;
    int nt = ir_ntok_dims(s);
    if (nt == 2) kg_grid(k, 0, 0, 0, 0, mult, div);
    else if (nt == 1) kg_grid(k, 0, 0, s->d[0] == DIM_B ? mult : 0, s->d[0] == DIM_S ? mult : 0, 0, div);
    else kg_grid(k, 0, mult, 0, 0, 0, div);
}

/* One work-item per output element. Tokens live in the arena as exact floats. */
static int emit(kgen *k, const ir_node *n) {
    int tok = n->in[0], tab = n->in[1], y = n->out[0];
    long d = kg_feat(k, y), V = kg_feat(k, tab) / d;
    int node = (int)(n - k->g->n);
    kg_begin(k, "embedding", node, node + 1);
    kg_in(k, "tok", tok);
    kg_in(k, "tab", tab);
    kg_out(k, "y", y);
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= %s * %ld) return;", kg_ntok_expr(k, y), d);
    kg_line(k, "const long t = i / %ld, f = i %% %ld;", d, d);
    kg_line(k, "int v = (int)tok[t * %ld];", kg_ld(k, tok));
    kg_line(k, "if (v < 0 || v >= %ld) v = 0;   /* same total oracle as the reference */", V);
    kg_line(k, "y[t * %ld + f] = tab[(long)v * %ld + f];", kg_ld(k, y), d);
    grid_tokens(k, y, d, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

/* Two launches.
 *
 * embedding_bwd_part: work-group (feature slice of 32, block of up to 256 token ids, chunk c)
 * keeps that [ids x 32] block of dtable in LOCAL memory (32 KB) and walks chunk c's tokens in
 * order, EMB_TILE at a time: the whole group loads the tile's ids and dy slices into LOCAL (many
 * independent coalesced loads in flight), then warp-sized row k of the group adds the tile's
 * rows whose id % 8 == k, lane l feature l of the slice. Every LOCAL sum has exactly one writer
 * that adds its rows in token order (deterministic without atomics), and the work is
 * O(tokens x d), not O(V x tokens x d) as a scan per id would be. Then the block is written to
 * partial c (zeros where no token hit, so the workspace is never stale).
 *
 * embedding_bwd_sum: one work-item per dtable element adds the EMB_CHUNKS partials in chunk
 * order with Kahan compensation. */
static int emit_bwd(kgen *k, const ir_node *n) {
    int tok = n->in[0], dy = n->in[1], dt = n->out[0], part = n->out[1];
    long d = kg_feat(k, dy), V = kg_feat(k, dt) / d;
    long nfs = (d + 31) / 32, vb = V < 256 ? V : 256, nvb = (V + 255) / 256;
    int node = (int)(n - k->g->n);
    kg_begin(k, "embedding_bwd_part", node, node + 1);
    kg_param_grad(k);
    kg_in(k, "tok", tok);
    kg_in(k, "dy", dy);
    kg_out(k, "part", part);
    kg_line(k, "LOCAL float acc[%ld];", vb * 32);
    kg_line(k, "LOCAL float dyt[%d];", EMB_TILE * 32);
    kg_line(k, "LOCAL int ids[%d];", EMB_TILE);
    kg_line(k, "const long NT = %s, per = (NT + %d) / %d;", kg_ntok_expr(k, dy), EMB_CHUNKS - 1, EMB_CHUNKS);
    kg_line(k, "const long c = GID_Y, t0 = c * per, t1 = t0 + per < NT ? t0 + per : NT;");
    kg_line(k, "const int fs = (int)(GID_X %% %ld), v0 = (int)(GID_X / %ld) * 256;", nfs, nfs);
    kg_line(k, "const int lane = LID_X %% 32, own = LID_X / 32, f = fs * 32 + lane;");
    kg_line(k, "for (int i = LID_X; i < %ld; i += 256) acc[i] = 0.0f;", vb * 32);
    kg_line(k, "for (long tb = t0; tb < t1; tb += %d) {", EMB_TILE);
    kg_line(k, "    const int nt = t1 - tb < %d ? (int)(t1 - tb) : %d;", EMB_TILE, EMB_TILE);
    kg_line(k, "    if (LID_X < %d) ids[LID_X] = LID_X < nt ? (int)tok[(tb + LID_X) * %ld] - v0 : -1;", EMB_TILE,
            kg_ld(k, tok));
    kg_line(k, "    for (int i = own; i < nt; i += 8)");
    kg_line(k, "        dyt[i * 32 + lane] = f < %ld ? dy[(tb + i) * %ld + f] : 0.0f;", d, kg_ld(k, dy));
    kg_line(k, "    BARRIER();");
    kg_line(k, "    for (int i = 0; i < nt; i++) {");
    kg_line(k, "        const int v = ids[i];   /* relative to this block of ids */");
    kg_line(k, "        if (v >= 0 && v < %ld && v0 + v < %ld && (v & 7) == own) acc[v * 32 + lane] += dyt[i * 32 + lane];",
            vb, V);
    kg_line(k, "    }");
    kg_line(k, "    BARRIER();   /* the tile is refilled next step */");
    kg_line(k, "}");
    kg_line(k, "BARRIER();   /* acc is read across rows below (and zeroed above when no tile ran) */");
    kg_line(k, "for (int i = LID_X; i < %ld; i += 256) {", vb * 32);
    kg_line(k, "    const int v = v0 + i / 32, ff = fs * 32 + i %% 32;");
    kg_line(k, "    if (v < %ld && ff < %ld) part[(c * %ld + v) * %ld + ff] = acc[i];", V, d, V, d);
    kg_line(k, "}");
    kg_grid(k, 0, nfs * nvb, 0, 0, 0, 1);
    kg_grid(k, 1, EMB_CHUNKS, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    if (kg_end(k) < 0) return -1;

    kg_begin(k, "embedding_bwd_sum", node, node + 1);
    kg_param_grad(k);
    kg_in(k, "part", part);
    kg_out(k, "dt", dt);
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= %ld) return;", V * d);
    kg_line(k, "float s = 0.0f, comp = 0.0f;");
    kg_line(k, "for (int c = 0; c < %d; c++) {", EMB_CHUNKS);
    kg_line(k, "    const float y = part[c * %ld + i] - comp, t = s + y;", V * d);
    kg_line(k, "    comp = (t - s) - y;");
    kg_line(k, "    s = t;");
    kg_line(k, "}");
    kg_line(k, "dt[i] = s;");
    kg_grid(k, 0, (V * d + 255) / 256, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_embedding = {.name = "embedding", .nin = 2, .nout = 1, .infer = infer, .grad = grad, .ref = ref,
                             .emit = emit};
const op_def op_embedding_bwd = {.name = "embedding_bwd", .nin = 2, .nout = 2, .infer = infer_bwd,
                                 .ref = ref_bwd, .emit = emit_bwd, .iattr = {"vocab", NULL}};
