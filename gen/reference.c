#include "reference.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct ref_ctx {
    const ir_graph *g;
    long B, S;
    double **store;          /* per tensor; non-NULL for owners only */
};

ref_ctx *ref_create(const ir_graph *g, long B, long S) {
    ref_ctx *c = calloc(1, sizeof *c);
    c->g = g;
    c->B = B;
    c->S = S;
    c->store = calloc((size_t)g->nt, sizeof *c->store);
    for (int i = 0; i < g->nt; i++) {
        if (g->t[i].base != i) continue;
        long n = ir_numel(&g->t[i].shape, B, S);
        c->store[i] = malloc(sizeof(double) * (size_t)(n ? n : 1));
        /* Poison: a node that forgets to write an element shows up as NaN downstream. */
        for (long k = 0; k < n; k++) c->store[i][k] = NAN;
    }
    return c;
}

void ref_destroy(ref_ctx *c) {
    if (!c) return;
    for (int i = 0; i < c->g->nt; i++) free(c->store[i]);
    free(c->store);
    free(c);
}

double *ref_data(ref_ctx *c, int t) { return c->store[t]; }
long ref_B(const ref_ctx *c) { return c->B; }
long ref_S(const ref_ctx *c) { return c->S; }
const ir_shape *ref_shape(const ref_ctx *c, int t) { return &c->g->t[t].shape; }
ir_dtype ref_dtype(const ref_ctx *c, int t) { return c->g->t[t].dtype; }

ref_buf ref_get(const ref_ctx *c, int t) {
    const ir_tensor *x = &c->g->t[t];
    ref_buf b;
    b.p = c->store[x->base] + x->offset;
    b.ntok = ir_ntok(&x->shape, c->B, c->S);
    b.feat = ir_feat(&x->shape);
    b.ld = x->tok_stride;
    return b;
}

void ref_init_params(ref_ctx *c, uint64_t seed) {
    for (int i = 0; i < c->g->nt; i++) {
        const ir_tensor *t = &c->g->t[i];
        if (t->role != ROLE_PARAM || t->base != i) continue;
        ir_param_init_values(t, seed, c->store[i], ir_numel(&t->shape, 1, 1));
    }
}

/* A tensor stored as bf16 holds its values rounded to nearest even: the reference models the
 * storage, so kernels that read it are checked against what they are given. */
void ref_round_bf16(const ref_ctx *c, int t) {
    ref_buf b = ref_get(c, t);
    for (long r = 0; r < b.ntok; r++)
        for (long f = 0; f < b.feat; f++) b.p[r * b.ld + f] = ir_bf16_float(ir_bf16_bits((float)b.p[r * b.ld + f]));
}

void ref_run(ref_ctx *c, int from, int to) {
    for (int i = from; i < to; i++) {
        const ir_node *n = &c->g->n[i];
        op_get(n->op)->ref(c, n);
        for (int o = 0; o < n->nout; o++)
            if (c->g->t[n->out[o]].dtype == DT_BF16) ref_round_bf16(c, n->out[o]);
    }
}
