/* The reference executor: runs a graph node by node with every primitive's plain-C reference,
 * fp64 storage throughout. It is the oracle generated kernels are checked against. */
#ifndef REALM_REFERENCE_H
#define REALM_REFERENCE_H

#include "ir.h"
#include "op.h"

ref_ctx *ref_create(const ir_graph *g, long B, long S);
void ref_destroy(ref_ctx *c);
/* Storage of an owner tensor (ir_numel(shape, B, S) doubles); NULL for views. */
double *ref_data(ref_ctx *c, int tensor);
/* Fill every parameter from its initialiser (ir_param_init_values). */
void ref_init_params(ref_ctx *c, uint64_t seed);
/* Run nodes [from, to). */
void ref_run(ref_ctx *c, int from, int to);
/* Round tensor t's values to bf16 in place (nearest even, ir_bf16_bits): what bf16 storage
 * holds; ref_run does it to every bf16 tensor a node writes. */
void ref_round_bf16(const ref_ctx *c, int t);

#endif
