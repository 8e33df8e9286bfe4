/* adamw: one AdamW step on a group of parameters, in place, in one launch (multi-tensor).
 * Inputs: the global sum of squared gradients (for clipping), `hyper` (a small tensor the host
 * writes each step: {lr, beta1, beta2, eps, weight_decay, 1-beta1^t, 1-beta2^t, clip}), then
 * for each parameter j of the group param_j, grad_j, m_j, v_j. Outputs: param_j, m_j, v_j for
 * each j (they alias the inputs). Weight decay is decoupled and applied to parameter j when
 * bit j of ia[0] (decay) is set.
 *   c = min(1, clip / (sqrt(sumsq) + 1e-6)), g' = c * grad
 *   m = b1 m + (1-b1) g' ; v = b2 v + (1-b2) g'^2
 *   p = p - lr * (wd * decay * p + (m / bc1) / (sqrt(v / bc2) + eps))
 * One launch per group instead of one per parameter: a model's many small tensors (norm
 * weights, biases, D) each cost a launch of a few work-groups otherwise. */
#include "kgen.h"
#include "op.h"
#include "optimizer.h"

#include <math.h>
#include <stdio.h>

static int count_out(const ir_node *n) { return 3 * ((n->nin - 2) / 4); }

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    if ((n->nin - 2) % 4 != 0 || n->nin < 6) return OP_ERR("inputs: sumsq, hyper, then param, grad, m, v per parameter");
    const int np = (n->nin - 2) / 4;
    if (np > ADAMW_GROUP || 3 * np > IR_MAX_IO) return OP_ERR("at most %d parameters per group", ADAMW_GROUP);
    if (ir_feat(op_in_shape(g, n, 0)) != 1) return OP_ERR("sumsq must be a scalar");
    if (ir_feat(op_in_shape(g, n, 1)) != 8) return OP_ERR("hyper must have 8 values");
    for (int j = 0; j < np; j++) {
        const ir_shape *p = op_in_shape(g, n, 2 + 4 * j);
        for (int i = 1; i < 4; i++)
            if (!ir_shape_eq(p, op_in_shape(g, n, 2 + 4 * j + i)))
                return OP_ERR("param %d: param, grad, m and v must have one shape", j + 1);
        for (int i = 0; i < 3; i++) {
            out[3 * j + i] = *p;
            dt[3 * j + i] = DT_F32;
        }
    }
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    const double ss = ref_get(c, n->in[0]).p[0], *h = ref_get(c, n->in[1]).p;
    double clip = h[7] / (sqrt(ss) + 1e-6);
    if (clip > 1) clip = 1;
    for (int j = 0; j < (n->nin - 2) / 4; j++) {
        const int *in = n->in + 2 + 4 * j, *out = n->out + 3 * j;
        ref_buf p = ref_get(c, in[0]), g = ref_get(c, in[1]), m = ref_get(c, in[2]), v = ref_get(c, in[3]);
        ref_buf po = ref_get(c, out[0]), mo = ref_get(c, out[1]), vo = ref_get(c, out[2]);
        const int decay = (int)((n->ia[0] >> j) & 1);
        for (long k = 0; k < p.feat; k++) {
            double gg = clip * g.p[k];
            double mm = h[1] * m.p[k] + (1 - h[1]) * gg;
            double vv = h[2] * v.p[k] + (1 - h[2]) * gg * gg;
            double step = (mm / h[5]) / (sqrt(vv / h[6]) + h[3]) + (decay ? h[4] * p.p[k] : 0.0);
            po.p[k] = p.p[k] - h[0] * step;
            mo.p[k] = mm;
            vo.p[k] = vv;
        }
    }
}

/* A work-item per element of the group's parameters laid end to end; the tensor it falls in
 * is picked by comparing with the (constant) running sizes, so a warp rarely straddles two. */
static int emit(kgen *k, const ir_node *n) {
    const int id = (int)(n - k->g->n), np = (n->nin - 2) / 4;
    kg_begin(k, "adamw", id, id + 1);
    kg_in(k, "ss", n->in[0]);
    kg_in(k, "h", n->in[1]);
    char name[16];
    static const char *const role[4] = {"p", "g", "m", "v"}, *const orole[3] = {"po", "mo", "vo"};
    for (int j = 0; j < np; j++)
        for (int i = 0; i < 4; i++) {
            snprintf(name, sizeof name, "%s%d", role[i], j);
            kg_in(k, name, n->in[2 + 4 * j + i]);
        }
    for (int j = 0; j < np; j++)
        for (int i = 0; i < 3; i++) {
            snprintf(name, sizeof name, "%s%d", orole[i], j);
            kg_out(k, name, n->out[3 * j + i]);
        }
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "GLOBAL float *P, *G, *M, *V, *PO, *MO, *VO;");
    kg_line(k, "long e;");
    kg_line(k, "int decay;");
    long start = 0;
    for (int j = 0; j < np; j++) {
        const long numel = kg_feat(k, n->in[2 + 4 * j]);
        kg_line(k, "%sif (i < %ld) {", j ? "else " : "", start + numel);
        kg_line(k, "    P = p%d; G = g%d; M = m%d; V = v%d; PO = po%d; MO = mo%d; VO = vo%d;", j, j, j, j, j, j, j);
        kg_line(k, "    e = i - %ld; decay = %d;", start, (int)((n->ia[0] >> j) & 1));
        kg_line(k, "}");
        start += numel;
    }
    kg_line(k, "else return;");
    kg_line(k, "const float clip = FMINF(1.0f, h[7] / (SQRTF(ss[0]) + 1e-6f));");
    kg_line(k, "const float gg = clip * G[e];");
    kg_line(k, "const float mm = h[1] * M[e] + (1.0f - h[1]) * gg;");
    kg_line(k, "const float vv = h[2] * V[e] + (1.0f - h[2]) * gg * gg;");
    kg_line(k, "const float pp = P[e];");
    kg_line(k, "const float step = (mm / h[5]) / (SQRTF(vv / h[6]) + h[3]) + (decay ? h[4] * pp : 0.0f);");
    kg_line(k, "PO[e] = pp - h[0] * step;");
    kg_line(k, "MO[e] = mm;");
    kg_line(k, "VO[e] = vv;");
    kg_grid(k, 0, start, 0, 0, 0, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    double e = 0;
    for (int j = 0; j < (n->nin - 2) / 4; j++) e += (double)ir_numel(&g->t[n->in[2 + 4 * j]].shape, B, S);
    return 14.0 * e;
}

const op_def op_adamw = {.name = "adamw", .nin = -6, .nout = -1, .count_out = count_out, .infer = infer, .ref = ref, .emit = emit,
                         .flops = flops, .iattr = {"decay", NULL}};
