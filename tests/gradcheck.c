#include "gradcheck.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void gc_fill_inputs(tctx *t, ref_ctx *c, const ir_graph *g, int vocab, uint64_t seed) {
    ref_init_params(c, seed);
    for (int i = 0; i < g->nt; i++) {
        if (g->t[i].role != ROLE_INPUT || g->t[i].base != i) continue;
        long n = ir_numel(&g->t[i].shape, ref_B(c), ref_S(c));
        double *p = ref_data(c, i);
        for (long k = 0; k < n; k++) p[k] = (double)t_randint(t, 0, vocab - 1);
    }
}

static double loss_of(ref_ctx *c, const realm_model *m) {
    ref_run(c, 0, m->g.backward_start);
    return ref_data(c, m->loss)[0];
}

double gc_model_check(tctx *t, realm_model *m, long B, long S, int per_param, char *worst, size_t len) {
    ir_graph *g = &m->g;
    ref_ctx *c = ref_create(g, B, S);
    gc_fill_inputs(t, c, g, m->vocab, t_next(t));
    /* Random initial values everywhere (not the structured init), so no gradient is trivially 0. */
    for (int i = 0; i < g->nt; i++) {
        if (g->t[i].role != ROLE_PARAM || g->t[i].base != i) continue;
        long n = ir_numel(&g->t[i].shape, 1, 1);
        double *p = ref_data(c, i);
        for (long k = 0; k < n; k++) p[k] += 0.3 * t_normal(t);
    }
    ref_run(c, 0, g->nn);
    double num = 0, den = 0, worst_err = -1;
    const double h = 1e-5;
    for (int i = 0; i < g->nt; i++) {
        if (g->t[i].role != ROLE_PARAM || g->t[i].base != i) continue;
        long n = ir_numel(&g->t[i].shape, 1, 1);
        const ir_tensor *gt = &g->t[g->t[i].grad];
        double *p = ref_data(c, i);
        double pn = 0, pd = 0;
        for (int s = 0; s < per_param && s < n; s++) {
            long k = n <= per_param ? s : t_randint(t, 0, n - 1);
            /* the gradient tensor may be a view; read it through its layout */
            long feat = ir_feat(&gt->shape);
            double an = ref_data(c, gt->base)[gt->offset + (k / feat) * gt->tok_stride + k % feat];
            /* Fourth-order central differences: the random parameters (init + 0.3 N(0,1)) can
             * give the loss a large third derivative, and the two-point rule's h^2 f'''/6 then
             * alone exceeds the bound (a norm weight's gradient -0.4148096 came out -0.4148115
             * at h = 1e-5 and -0.4148096 at h = 1e-6: CI failed at 3.9e-6). This rule's error is
             * h^4 f'''''/30, and its rounding about 1.5 eps |L| / h. */
            double keep = p[k], l[4];
            const double off[4] = {h, -h, 2 * h, -2 * h};
            for (int q = 0; q < 4; q++) {
                p[k] = keep + off[q];
                l[q] = loss_of(c, m);
            }
            p[k] = keep;
            double fd = (8 * (l[0] - l[1]) - (l[2] - l[3])) / (12 * h);
            pn += (an - fd) * (an - fd);
            pd += fd * fd;
        }
        double e = pd > 0 ? sqrt(pn / pd) : sqrt(pn);
        if (e > worst_err) {
            worst_err = e;
            snprintf(worst, len, "%s", g->t[i].name);
        }
        num += pn;
        den += pd;
    }
    ref_destroy(c);
    return den > 0 ? sqrt(num / den) : INFINITY;
}
