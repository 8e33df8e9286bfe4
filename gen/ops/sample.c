/* On-device sampling for decode (docs/decode.md):
 *
 *   sample(logits [B,S,V], pos [B,S], params [B,8]) -> next token [B,S], next position [B,S]
 *
 * params per sequence: 0 temperature (<= 0: greedy), 1 top_k (0 or >= V: all), 2 top_p (<= 0
 * or >= 1: off), 3 and 4 the seed's low and high 24 bits (exact in a float), 5..7 unused.
 * The random number is a counter-based hash of (seed, position), so the sampler has no state
 * of its own: the same seed and the same text give the same choice, and a chat that resumes
 * at position p draws exactly what an uninterrupted run would. In the step graph both outputs
 * are written in place over the tokens and positions inputs, so the next step reads the chosen
 * byte on the device and the host only reads it back to print it.
 *
 * Order of work (the reference and the kernel do the same, fp64 vs fp32): rank the logits
 * (descending, ties by index); greedy takes rank 0; else weights exp((l - max) / T) over the
 * top_k ranks, cut to the smallest prefix whose mass reaches top_p, and a draw u * mass walks
 * the prefix in rank order. This is the host sampler it replaces. */
#include "kgen.h"
#include "op.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* lowbias32 (a well-mixed 32-bit integer hash); the kernel spells the same steps */
static uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static uint32_t as_u32(double v) { return v > 0 ? (uint32_t)(long)v : 0U; }

/* A uniform in [0, 1) with 24 bits, exactly representable in fp32 and fp64 alike. */
static double draw(double pos, double seed_lo, double seed_hi) {
    uint32_t h = mix32(as_u32(pos) * 0x9E3779B9U + as_u32(seed_lo));
    h = mix32(h ^ as_u32(seed_hi));
    return (double)(h >> 8) * (1.0 / 16777216.0);
}

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *l = op_in_shape(g, n, 0), *p = op_in_shape(g, n, 1), *pr = op_in_shape(g, n, 2);
    char b[96];
    ir_shape_str(l, b, sizeof b);
    if (l->ndim != 3 || l->d[0] != DIM_B || l->d[1] != DIM_S || l->d[2] <= 0)
        return OP_ERR("logits must be [B,S,vocab], got %s", b);
    if (p->ndim != 2 || p->d[0] != DIM_B || p->d[1] != DIM_S) return OP_ERR("positions must be [B,S]");
    if (pr->ndim != 2 || pr->d[0] != DIM_B || pr->d[1] != 8) return OP_ERR("sampling parameters must be [B,8]");
    out[0] = out[1] = *p;
    dt[0] = dt[1] = DT_I32;   /* exact small integers in the fp32 arena, like the tokens */
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf L = ref_get(c, n->in[0]), P = ref_get(c, n->in[1]), Pr = ref_get(c, n->in[2]);
    ref_buf T = ref_get(c, n->out[0]), NP = ref_get(c, n->out[1]);
    const long V = L.feat, S = ref_S(c);
    int *ord = malloc(sizeof(int) * (size_t)V);
    double *w = malloc(sizeof(double) * (size_t)V);
    for (long t = 0; t < L.ntok; t++) {
        const double *l = L.p + t * L.ld, *pr = Pr.p + (t / S) * Pr.ld;
        for (long i = 0; i < V; i++) {
            long r = 0;
            for (long j = 0; j < V; j++) r += l[j] > l[i] || (l[j] == l[i] && j < i);
            ord[r] = (int)i;
        }
        const double temp = pr[0], top_p = pr[2], pos = P.p[t * P.ld];
        long K = pr[1] >= 1 && pr[1] < V ? (long)pr[1] : V, pick = ord[0];
        if (temp > 0) {
            double Z = 0;
            for (long r = 0; r < K; r++) Z += w[r] = exp((l[ord[r]] - l[ord[0]]) / temp);
            if (top_p > 0 && top_p < 1) {
                double cum = 0;
                for (long r = 0; r < K; r++) {
                    cum += w[r] / Z;
                    if (cum >= top_p) {
                        K = r + 1;
                        break;
                    }
                }
                Z = 0;
                for (long r = 0; r < K; r++) Z += w[r];
            }
            double u = draw(pos, pr[3], pr[4]) * Z;
            pick = ord[K - 1];
            for (long r = 0; r < K; r++) {
                u -= w[r];
                if (u < 0) {
                    pick = ord[r];
                    break;
                }
            }
        }
        T.p[t * T.ld] = (double)pick;
        NP.p[t * NP.ld] = pos + 1;
    }
    free(ord);
    free(w);
}

/* One work-group of 256 per token: the ranks in parallel (work-item i counts the logits
 * above logit i), then work-item 0 walks the ranks in order; V is small (256), so the serial
 * part is a few microseconds and the result is deterministic. */
static int emit(kgen *k, const ir_node *n) {
    const int node = (int)(n - k->g->n);
    const long V = kg_feat(k, n->in[0]);
    const long ldl = kg_ld(k, n->in[0]), ldp = kg_ld(k, n->in[1]), ldpr = kg_ld(k, n->in[2]);
    kg_begin(k, "sample", node, node + 1);
    kg_in(k, "lg", n->in[0]);
    kg_in(k, "pos", n->in[1]);
    kg_in(k, "prm", n->in[2]);
    kg_out(k, "ntok", n->out[0]);
    kg_out(k, "npos", n->out[1]);
    kg_line(k, "LOCAL int ord[%ld];", V);
    kg_line(k, "LOCAL float w[%ld];", V);
    kg_line(k, "const long t = GID_X;");
    kg_line(k, "GLOBAL const float *l = lg + t * %ldL;", ldl);
    kg_line(k, "GLOBAL const float *pr = prm + (t / S) * %ldL;", ldpr);
    kg_line(k, "for (int i = LID_X; i < %ld; i += 256) {", V);
    kg_line(k, "    const float li = l[i];");
    kg_line(k, "    int r = 0;");
    kg_line(k, "    for (int j = 0; j < %ld; j++) { const float lj = l[j]; r += (lj > li || (lj == li && j < i)) ? 1 : 0; }", V);
    kg_line(k, "    ord[r] = i;");
    kg_line(k, "}");
    kg_line(k, "BARRIER();");
    kg_line(k, "if (LID_X != 0) return;   /* after the only barrier */");
    kg_line(k, "const float temp = pr[0], top_p = pr[2], pv = pos[t * %ldL];", ldp);
    kg_line(k, "int K = pr[1] >= 1.0f && pr[1] < %ld.0f ? (int)pr[1] : %ld;", V, V);
    kg_line(k, "int pick = ord[0];");
    kg_line(k, "if (temp > 0.0f) {");
    kg_line(k, "    const float mx = l[ord[0]];");
    kg_line(k, "    float Z = 0.0f;");
    kg_line(k, "    for (int r = 0; r < K; r++) { w[r] = EXPF((l[ord[r]] - mx) / temp); Z += w[r]; }");
    kg_line(k, "    if (top_p > 0.0f && top_p < 1.0f) {");
    kg_line(k, "        float cum = 0.0f;");
    kg_line(k, "        for (int r = 0; r < K; r++) { cum += w[r] / Z; if (cum >= top_p) { K = r + 1; break; } }");
    kg_line(k, "        Z = 0.0f;");
    kg_line(k, "        for (int r = 0; r < K; r++) Z += w[r];");
    kg_line(k, "    }");
    /* the hash of (seed, position): lowbias32, as mix32 in the reference */
    kg_line(k, "    unsigned int hs = (pv > 0.0f ? (unsigned int)(long)pv : 0U) * 0x9E3779B9U + "
               "(pr[3] > 0.0f ? (unsigned int)(long)pr[3] : 0U);");
    kg_line(k, "    for (int round = 0; round < 2; round++) {");
    kg_line(k, "        hs ^= hs >> 16; hs *= 0x7feb352dU; hs ^= hs >> 15; hs *= 0x846ca68bU; hs ^= hs >> 16;");
    kg_line(k, "        if (round == 0) hs ^= pr[4] > 0.0f ? (unsigned int)(long)pr[4] : 0U;");
    kg_line(k, "    }");
    kg_line(k, "    float u = (float)(hs >> 8) * (1.0f / 16777216.0f) * Z;");
    kg_line(k, "    pick = ord[K - 1];");
    kg_line(k, "    for (int r = 0; r < K; r++) { u -= w[r]; if (u < 0.0f) { pick = ord[r]; break; } }");
    kg_line(k, "}");
    kg_line(k, "ntok[t * %ldL] = (float)pick;", kg_ld(k, n->out[0]));
    kg_line(k, "npos[t * %ldL] = pv + 1.0f;", kg_ld(k, n->out[1]));
    kg_grid(k, 0, 0, 0, 0, 1, 1);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

const op_def op_sample = {
    .name = "sample",
    .nin = 3, .nout = 2,
    .iattr = {NULL},
    .fattr = {NULL},
    .infer = infer,
    .ref = ref,
    .emit = emit,
};
