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
            double keep = p[k];
            p[k] = keep + h;
            double lp = loss_of(c, m);
            p[k] = keep - h;
            double lm = loss_of(c, m);
            p[k] = keep;
            double fd = (lp - lm) / (2 * h);
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
