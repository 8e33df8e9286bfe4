/* Appends the optimizer to a differentiated graph, so one plan is one whole training step:
 * the global gradient norm (sumsq over every parameter gradient) and in-place multi-tensor
 * AdamW nodes, one per ADAMW_GROUP parameters. Weight decay applies to the weight matrices (parameters initialised from a
 * normal distribution: linear layers and the embedding), not to norms, biases, dt or D. */
#include "optimizer.h"

#include "op.h"

#include <stdio.h>
#include <string.h>

int ir_add_optimizer(ir_graph *g, ir_optimizer *o) {
    memset(o, 0, sizeof *o);
    ir_scope_set(g, 0);
    int prev = ir_scope_push(g, "optimizer", "optimizer");
    o->first_node = g->nn;
    o->hyper = ir_tensor_new(g, "hyper", ir_shape_make(1, (int[]){8}), DT_F32, ROLE_INPUT);
    int params[4096], np = 0;
    for (int i = 0; i < g->nt && np < 4096; i++)
        if (g->t[i].role == ROLE_PARAM && g->t[i].base == i && g->t[i].grad >= 0) params[np++] = i;
    /* sum of squares in groups that fit one node, then added up */
    int total = -1;
    for (int i = 0; i < np; i += IR_MAX_IO) {
        int in[IR_MAX_IO], n = 0, out[IR_MAX_IO];   /* out[1]: sumsq's per-chunk workspace */
        for (int k = i; k < np && n < IR_MAX_IO; k++) in[n++] = g->t[params[k]].grad;
        if (ir_emit(g, "sumsq", in, n, NULL, NULL, out) < 0) return -1;
        int part = out[0];
        if (total < 0) total = part;
        else {
            int a[2] = {total, part};
            if (ir_emit(g, "add", a, 2, NULL, NULL, &total) < 0) return -1;
        }
    }
    o->sumsq = total;
    for (int i0 = 0; i0 < np; i0 += ADAMW_GROUP) {
        int in[IR_MAX_IO] = {total, o->hyper}, out[IR_MAX_IO], k = 0;
        long ia[IR_MAX_IATTR] = {0};
        for (; k < ADAMW_GROUP && i0 + k < np; k++) {
            int p = params[i0 + k];
            char name[160];
            snprintf(name, sizeof name, "%.120s.m", g->t[p].name);
            int m = ir_tensor_new(g, name, g->t[p].shape, DT_F32, ROLE_OPT);
            snprintf(name, sizeof name, "%.120s.v", g->t[p].name);
            int v = ir_tensor_new(g, name, g->t[p].shape, DT_F32, ROLE_OPT);
            g->t[m].init = g->t[v].init = INIT_ZEROS;
            if (g->t[p].init == INIT_NORMAL) ia[0] |= 1L << k;
            in[2 + 4 * k] = p;
            in[3 + 4 * k] = g->t[p].grad;
            in[4 + 4 * k] = m;
            in[5 + 4 * k] = v;
        }
        if (ir_emit(g, "adamw", in, 2 + 4 * k, ia, NULL, out) < 0) return -1;
        for (int j = 0; j < k; j++) {
            ir_retarget(g, out[3 * j], in[2 + 4 * j], 0);
            ir_retarget(g, out[3 * j + 1], in[4 + 4 * j], 0);
            ir_retarget(g, out[3 * j + 2], in[5 + 4 * j], 0);
        }
    }
    ir_scope_set(g, prev);
    return 0;
}
