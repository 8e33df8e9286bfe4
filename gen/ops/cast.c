/* cast: y = bf16(x), round to nearest even; the copy of a weight that bf16 matmuls read
 * (gen/precision.c). Shape rule: y has x's shape, dtype bf16; x must be fp32 with an even
 * last dim. Gradient: the identity (dy flows to x unchanged, in fp32), like copy. Reference:
 * a copy; the reference rounds every bf16 tensor a node writes (gen/reference.c). Kernel: one
 * thread a pair of values (kgen refuses the bf16 output in dialects without bf16 helpers). */
#include "kgen.h"
#include "op.h"

#include <stdio.h>

static int infer(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt, char *err, size_t errlen) {
    const ir_shape *x = op_in_shape(g, n, 0);
    if (op_in_dtype(g, n, 0) != DT_F32) return OP_ERR("input must be fp32");
    if (x->ndim < 1 || x->d[x->ndim - 1] <= 0 || x->d[x->ndim - 1] % 2) return OP_ERR("last dim must be even");
    out[0] = *x;
    dt[0] = DT_BF16;
    return 0;
}

static int grad(ir_graph *g, int node, const int *dout, int *din) {
    (void)g; (void)node;
    din[0] = dout[0];
    return 0;
}

static void ref(const ref_ctx *c, const ir_node *n) {
    ref_buf x = ref_get(c, n->in[0]), y = ref_get(c, n->out[0]);
    for (long t = 0; t < y.ntok; t++)
        for (long f = 0; f < y.feat; f++) y.p[t * y.ld + f] = x.p[t * x.ld + f];
}

static int emit(kgen *k, const ir_node *n) {
    int x = n->in[0], y = n->out[0], node = (int)(n - k->g->n);
    const ir_shape *s = &k->g->t[x].shape;
    long feat = kg_feat(k, x), half = feat / 2, ldx = kg_ld(k, x), ldy = kg_ld(k, y);
    /* pairs load as float2 and store as one word where both rows start even */
    int pairs = k->g->t[x].offset % 2 == 0 && ldx % 2 == 0 && k->g->t[y].offset % 2 == 0 && ldy % 2 == 0;
    kg_begin(k, "cast_bf16", node, node + 1);
    kg_in(k, "x", x);
    kg_out(k, "y", y);
    kg_line(k, "const long i = GID_X * 256 + LID_X;");
    kg_line(k, "if (i >= %s * %ld) return;", kg_ntok_expr(k, x), half);
    kg_line(k, "const long r = i / %ld, c = 2 * (i - r * %ld);", half, half);
    if (pairs) {
        kg_line(k, "const float2 v = *(GLOBAL const float2 *)(x + r * %ld + c);", ldx);
        kg_line(k, "*(GLOBAL unsigned *)(y + r * %ld + c) = pack_bf16x2(v.x, v.y);", ldy);
    } else {
        kg_line(k, "y[r * %ld + c] = f2bf(x[r * %ld + c]);", ldy, ldx);
        kg_line(k, "y[r * %ld + c + 1] = f2bf(x[r * %ld + c + 1]);", ldy, ldx);
    }
    int nt = ir_ntok_dims(s);
    if (nt == 2) kg_grid(k, 0, 0, 0, 0, half, 256);
    else if (nt == 1) kg_grid(k, 0, 0, s->d[0] == DIM_B ? half : 0, s->d[0] == DIM_S ? half : 0, 0, 256);
    else kg_grid(k, 0, half, 0, 0, 0, 256);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

static double flops(const ir_graph *g, const ir_node *n, long B, long S) {
    (void)g; (void)n; (void)B; (void)S;
    return 0;
}

const op_def op_cast = {.name = "cast", .nin = 1, .nout = 1, .infer = infer, .grad = grad, .ref = ref,
                        .flops = flops, .emit = emit};
