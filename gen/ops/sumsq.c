/* sumsq: the sum of squares of every element of all inputs (up to IR_MAX_IO tensors), a
 * scalar, plus `partial` [SUMSQ_CHUNKS], a workspace nobody differentiates. The optimizer uses
 * it for the global gradient norm. The inputs, read as one concatenated vector, are split into
 * SUMSQ_CHUNKS fixed chunks; a work-group per chunk writes its sum of squares to partial, and
 * one work-group adds the partials in a fixed tree, so the result is bitwise reproducible and
 * the whole GPU streams the gradients instead of one work-group. */
#include "kgen.h"
#include "op.h"

#include <stdio.h>
#include <string.h>

#define SUMSQ_CHUNKS 256   /* one element of partial per thread of the final work-group */

/* Elements per chunk of the concatenated inputs: the kernels' and the reference's split. */
static long chunk_len(long total) { return (total + SUMSQ_CHUNKS - 1) / SUMSQ_CHUNKS; }

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    for (int i = 0; i < n->nin; i++)
        if (ir_ntok_dims(op_in_shape(g, n, i))) return OP_ERR("inputs must be constant-shaped (parameters)");
    out[0].ndim = 0;
    out[1] = ir_shape_make(1, (int[]){SUMSQ_CHUNKS});
    dt[0] = dt[1] = DT_F32;
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    double acc = 0;
    long total = 0, at = 0;
    for (int i = 0; i < n->nin; i++) total += ref_get(c, n->in[i]).feat;
    long per = chunk_len(total);
    ref_buf part = ref_get(c, n->out[1]);
    memset(part.p, 0, sizeof(double) * SUMSQ_CHUNKS);
    for (int i = 0; i < n->nin; i++) {
        ref_buf b = ref_get(c, n->in[i]);
        for (long k = 0; k < b.feat; k++, at++) {
            acc += b.p[k] * b.p[k];
            part.p[at / per] += b.p[k] * b.p[k];
        }
    }
    ref_get(c, n->out[0]).p[0] = acc;
}

/* sumsq_part: group c covers elements [c * per, (c + 1) * per) of the concatenation; for each
 * input overlapping that range its threads read the overlap coalesced (thread l takes every
 * 256th element), then a fixed tree. sumsq_total: one group, thread i holds partial i, a fixed
 * tree. */
static int emit(kgen *k, const ir_node *n) {
    int id = (int)(n - k->g->n);
    long total = 0;
    for (int i = 0; i < n->nin; i++) total += kg_feat(k, n->in[i]);
    long per = chunk_len(total);
    kg_begin(k, "sumsq_part", id, id + 1);
    for (int i = 0; i < n->nin; i++) {
        char nm[16];
        snprintf(nm, sizeof nm, "g%d", i);
        kg_in(k, nm, n->in[i]);
    }
    kg_out(k, "part", n->out[1]);
    kg_line(k, "LOCAL float red[256];");
    kg_line(k, "const int l = LID_X;");
    kg_line(k, "const long c0 = GID_X * %ld, c1 = c0 + %ld;", per, per);
    kg_line(k, "float acc = 0.0f;");
    long at = 0;
    for (int i = 0; i < n->nin; i++) {
        long len = kg_feat(k, n->in[i]);
        /* the overlap of [c0, c1) with this input's range [at, at + len), in its own indices */
        kg_line(k, "{");
        kg_line(k, "    const long lo = c0 > %ld ? c0 - %ld : 0, hi = c1 < %ld ? c1 - %ld : %ld;", at, at, at + len, at,
                len);
        kg_line(k, "    for (long j = lo + l; j < hi; j += 256) { const float v = g%d[j]; acc += v * v; }", i);
        kg_line(k, "}");
        at += len;
    }
    kg_line(k, "red[l] = acc;");
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s = 128; s > 0; s >>= 1) { if (l < s) red[l] += red[l + s]; BARRIER(); }");
    kg_line(k, "if (l == 0) part[GID_X] = red[0];");
    kg_grid(k, 0, SUMSQ_CHUNKS, 0, 0, 0, 1);
    kg_block(k, 256, 1, 1);
    if (kg_end(k) < 0) return -1;

    kg_begin(k, "sumsq_total", id, id + 1);
    kg_in(k, "part", n->out[1]);
    kg_out(k, "out", n->out[0]);
    kg_line(k, "LOCAL float red[%d];", SUMSQ_CHUNKS);
    kg_line(k, "const int l = LID_X;");
    kg_line(k, "red[l] = part[l];");
    kg_line(k, "BARRIER();");
    kg_line(k, "for (int s = %d; s > 0; s >>= 1) { if (l < s) red[l] += red[l + s]; BARRIER(); }", SUMSQ_CHUNKS / 2);
    kg_line(k, "if (l == 0) out[0] = red[0];");
    kg_block(k, SUMSQ_CHUNKS, 1, 1);
    return kg_end(k);
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    double f = 0;
    for (int i = 0; i < n->nin; i++) f += 2.0 * (double)ir_numel(&g->t[n->in[i]].shape, B, S);
    return f;
}

const op_def op_sumsq = {.name = "sumsq", .nin = -1, .nout = 2, .infer = infer, .ref = ref, .emit = emit, .flops = flops};
