/* Generated kernels against the reference: every launch of a plan runs on fresh inputs taken
 * from a reference execution, with its outputs poisoned (NaN) first. */
#ifndef REALM_KERNELCHECK_H
#define REALM_KERNELCHECK_H

#include "backend.h"
#include "ir.h"
#include "plan.h"
#include "test.h"

/* An OpenCL backend for tests (PoCL in CI), or NULL with a message in t (test fails). */
backend *kc_opencl(tctx *t);
/* Plan nodes [0, g->nn) for `bk`, then for each launch in order: upload its inputs from the
 * reference state, poison its outputs, run it, advance the reference over the launch's nodes,
 * and compare every output (normwise relative error <= tol). Returns 0 or -1 (t has the
 * failing launch). `prepare` (may be NULL) fills the reference's inputs and parameters. */
int kc_check_graph(tctx *t, backend *bk, const ir_graph *g, long B, long S, double tol, int vocab);
/* The same with the plan built with options (NULL: fp32), e.g. bf16 matmuls; with bf16 asked
 * for, the attention launches get their float inputs on the bf16 grid (see ref_round_bf16). */
int kc_check_graph_opts(tctx *t, backend *bk, const ir_graph *g, long B, long S, double tol, int vocab,
                        const plan_options *opt);

#endif
