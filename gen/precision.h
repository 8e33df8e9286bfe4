/* Storage precision: which tensors of a training graph live in the arena as bf16. */
#ifndef REALM_PRECISION_H
#define REALM_PRECISION_H

#include "ir.h"

/* For bf16 plans (CUDA tensor cores), after autodiff and before the optimizer: every weight a
 * matmul reads gets a bf16 copy made by a `cast` node just before its first such matmul, and
 * the matmuls read the copy; an activation that only matmuls read as an operand (the normed
 * inputs of the projections, the gated and SwiGLU products) is written as bf16 by its producer
 * (rmsnorm or an elementwise kernel). The matmuls round their operands to bf16 anyway, so the
 * step computes the same values from fewer bytes. Returns the number of tensors changed, or -1
 * with g->err. */
int ir_bf16_storage(ir_graph *g);

#endif
