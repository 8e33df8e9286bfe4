/* The list of primitives. Adding one: write gen/ops/NAME.c and add its line here. */
#include "op.h"

#include <string.h>

extern const op_def op_embedding, op_embedding_bwd;
extern const op_def op_matmul, op_matmul_wgrad;
extern const op_def op_rmsnorm, op_rmsnorm_bwd;
extern const op_def op_add, op_mul, op_silu, op_silu_bwd;
extern const op_def op_fill, op_copy;
extern const op_def op_cross_entropy, op_cross_entropy_bwd;
extern const op_def op_rope, op_attention, op_attention_bwd;
extern const op_def op_mamba3_scan, op_mamba3_scan_bwd;
extern const op_def op_sumsq, op_adamw;
extern const op_def op_mamba3_step;
extern const op_def op_rope_at, op_ring_write, op_attention_ring;
extern const op_def op_sample;
extern const op_def op_mamba3_final, op_ring_fill;

static const op_def *const registry[] = {
    &op_embedding, &op_embedding_bwd,
    &op_matmul, &op_matmul_wgrad,
    &op_rmsnorm, &op_rmsnorm_bwd,
    &op_add, &op_mul, &op_silu, &op_silu_bwd,
    &op_fill, &op_copy,
    &op_cross_entropy, &op_cross_entropy_bwd,
    &op_rope, &op_attention, &op_attention_bwd,
    &op_mamba3_scan, &op_mamba3_scan_bwd,
    &op_sumsq, &op_adamw,
    &op_mamba3_step,
    &op_rope_at, &op_ring_write, &op_attention_ring,
    &op_sample,
    &op_mamba3_final, &op_ring_fill,
};

int op_count(void) { return (int)(sizeof registry / sizeof registry[0]); }

const op_def *op_get(int id) { return id >= 0 && id < op_count() ? registry[id] : NULL; }

int op_find(const char *name) {
    for (int i = 0; i < op_count(); i++)
        if (strcmp(registry[i]->name, name) == 0) return i;
    return -1;
}

const ir_shape *op_in_shape(const ir_graph *g, const ir_node *n, int i) { return &g->t[n->in[i]].shape; }
ir_dtype op_in_dtype(const ir_graph *g, const ir_node *n, int i) { return g->t[n->in[i]].dtype; }
