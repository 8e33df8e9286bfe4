/* Finite-difference helpers shared by the gradient tests. */
#ifndef REALM_GRADCHECK_H
#define REALM_GRADCHECK_H

#include "frontend.h"
#include "reference.h"
#include "test.h"

/* Fill every input (tokens/targets with random bytes below `vocab`) and parameter. */
void gc_fill_inputs(tctx *t, ref_ctx *c, const ir_graph *g, int vocab, uint64_t seed);
/* Central-difference check of every parameter gradient of a model's loss; samples up to
 * `per_param` coordinates of each parameter. Returns the normwise relative error over all
 * sampled coordinates and writes the worst parameter's name. */
double gc_model_check(tctx *t, realm_model *m, long B, long S, int per_param, char *worst, size_t len);

#endif
