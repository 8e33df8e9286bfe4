/* The list of primitives. Adding one: write gen/ops/NAME.c and add its line here. */
#include "op.h"

#include <stdio.h>
#include <string.h>

extern const op_def op_embedding, op_embedding_bwd;
extern const op_def op_matmul, op_matmul_wgrad;
extern const op_def op_rmsnorm, op_rmsnorm_bwd;
extern const op_def op_add, op_mul, op_silu, op_silu_bwd;
extern const op_def op_fill, op_copy, op_cast;
extern const op_def op_cross_entropy, op_cross_entropy_bwd;
extern const op_def op_rope, op_attention, op_attention_bwd;
extern const op_def op_mamba3_scan, op_mamba3_scan_bwd;
extern const op_def op_sumsq, op_adamw;
extern const op_def op_mamba3_step;
extern const op_def op_rope_at, op_ring_write, op_attention_ring;
extern const op_def op_sample;
extern const op_def op_mamba3_final, op_ring_fill, op_attention_prefix;

static const op_def *const registry[] = {
    &op_embedding, &op_embedding_bwd,
    &op_matmul, &op_matmul_wgrad,
    &op_rmsnorm, &op_rmsnorm_bwd,
    &op_add, &op_mul, &op_silu, &op_silu_bwd,
    &op_fill, &op_copy, &op_cast,
    &op_cross_entropy, &op_cross_entropy_bwd,
    &op_rope, &op_attention, &op_attention_bwd,
    &op_mamba3_scan, &op_mamba3_scan_bwd,
    &op_sumsq, &op_adamw,
    &op_mamba3_step,
    &op_rope_at, &op_ring_write, &op_attention_ring,
    &op_sample,
    &op_mamba3_final, &op_ring_fill, &op_attention_prefix,
};

int op_count(void) { return (int)(sizeof registry / sizeof registry[0]); }

const op_def *op_get(int id) { return id >= 0 && id < op_count() ? registry[id] : NULL; }

int op_find(const char *name) {
    for (int i = 0; i < op_count(); i++)
        if (strcmp(registry[i]->name, name) == 0) return i;
    return -1;
}

const ir_shape *op_in_shape(const ir_graph *g, const ir_node *n, int i) { return &g->t[n->in[i]].shape; }

int op_want_input(const ir_graph *g, const ir_node *n, int i, int lead, const int *d, int nd, const char *name,
                  char *err, size_t errlen) {
    const ir_shape *s = op_in_shape(g, n, i);
    int ok = s->ndim == lead + nd;
    if (ok && lead >= 1) ok = s->d[0] == DIM_B;
    if (ok && lead == 2) ok = s->d[1] == DIM_S;
    for (int j = 0; ok && j < nd; j++) ok = s->d[lead + j] == d[j];
    if (ok && op_in_dtype(g, n, i) == DT_I32) ok = 0;
    if (ok) return 0;
    char got[96], exp_[96];
    int k = snprintf(exp_, sizeof exp_, "[%s", lead == 2 ? "B,S" : lead == 1 ? "B" : "");
    for (int j = 0; j < nd && k < (int)sizeof exp_ - 12; j++)
        k += snprintf(exp_ + k, sizeof exp_ - (size_t)k, "%s%d", (j || lead) ? "," : "", d[j]);
    snprintf(exp_ + k, sizeof exp_ - (size_t)k, "]");
    ir_shape_str(s, got, sizeof got);
    return OP_ERR("input %d (%s) must be a float tensor of shape %s, got %s", i + 1, name, exp_, got);
}
ir_dtype op_in_dtype(const ir_graph *g, const ir_node *n, int i) { return g->t[n->in[i]].dtype; }
