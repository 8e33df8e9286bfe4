/* adamw: one AdamW step on one parameter, in place. Inputs: param, grad, m, v, the global
 * sum of squared gradients (for clipping), and `hyper`, a small tensor the host writes each
 * step: {lr, beta1, beta2, eps, weight_decay, 1-beta1^t, 1-beta2^t, clip}. Outputs alias
 * param, m and v. Weight decay is decoupled and applied when ia[0] (decay) is set.
 *   c = min(1, clip / (sqrt(sumsq) + 1e-6)), g' = c * grad
 *   m = b1 m + (1-b1) g' ; v = b2 v + (1-b2) g'^2
 *   p = p - lr * (wd * decay * p + (m / bc1) / (sqrt(v / bc2) + eps)) */
#include "kgen.h"
#include "op.h"

#include <math.h>
#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *p = op_in_shape(g, n, 0);
    for (int i = 1; i < 4; i++)
        if (!ir_shape_eq(p, op_in_shape(g, n, i))) return OP_ERR("param, grad, m and v must have one shape");
    if (ir_feat(op_in_shape(g, n, 4)) != 1) return OP_ERR("sumsq must be a scalar");
    if (ir_feat(op_in_shape(g, n, 5)) != 8) return OP_ERR("hyper must have 8 values");
    out[0] = out[1] = out[2] = *p;
    dt[0] = dt[1] = dt[2] = DT_F32;
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf p = ref_get(c, n->in[0]), g = ref_get(c, n->in[1]), m = ref_get(c, n->in[2]), v = ref_get(c, n->in[3]);
    const double ss = ref_get(c, n->in[4]).p[0], *h = ref_get(c, n->in[5]).p;
    ref_buf po = ref_get(c, n->out[0]), mo = ref_get(c, n->out[1]), vo = ref_get(c, n->out[2]);
    double clip = h[7] / (sqrt(ss) + 1e-6);
    if (clip > 1) clip = 1;
    for (long k = 0; k < p.feat; k++) {
        double gg = clip * g.p[k];
        double mm = h[1] * m.p[k] + (1 - h[1]) * gg;
        double vv = h[2] * v.p[k] + (1 - h[2]) * gg * gg;
        double step = (mm / h[5]) / (sqrt(vv / h[6]) + h[3]) + (n->ia[0] ? h[4] * p.p[k] : 0.0);
        po.p[k] = p.p[k] - h[0] * step;
        mo.p[k] = mm;
        vo.p[k] = vv;
    }
}

static int emit(kgen *k, const ir_node *n) {
    int id = (int)(n - k->g->n);
    long numel = kg_feat(k, n->in[0]);
    kg_begin(k, "adamw", id, id + 1);
    kg_in(k, "p", n->in[0]);
    kg_in(k, "g", n->in[1]);
    kg_in(k, "m", n->in[2]);
    kg_in(k, "v", n->in[3]);
    kg_in(k, "ss", n->in[4]);
    kg_in(k, "h", n->in[5]);
    kg_out(k, "po", n->out[0]);
    kg_out(k, "mo", n->out[1]);
    kg_out(k, "vo", n->out[2]);
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= %ld) return;", numel);
    kg_line(k, "const float clip = FMINF(1.0f, h[7] / (SQRTF(ss[0]) + 1e-6f));");
    kg_line(k, "const float gg = clip * g[i];");
    kg_line(k, "const float mm = h[1] * m[i] + (1.0f - h[1]) * gg;");
    kg_line(k, "const float vv = h[2] * v[i] + (1.0f - h[2]) * gg * gg;");
    kg_line(k, "const float pp = p[i];");
    kg_line(k, "const float step = (mm / h[5]) / (SQRTF(vv / h[6]) + h[3])%s;", n->ia[0] ? " + h[4] * pp" : "");
    kg_line(k, "po[i] = pp - h[0] * step;");
    kg_line(k, "mo[i] = mm;");
    kg_line(k, "vo[i] = vv;");
    kg_grid(k, 0, numel, 0, 0, 0, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    return 14.0 * (double)ir_numel(&g->t[n->in[0]].shape, B, S);
}

const op_def op_adamw = {.name = "adamw", .nin = 6, .nout = 3, .infer = infer, .ref = ref, .emit = emit,
                         .flops = flops, .iattr = {"decay", NULL}};
