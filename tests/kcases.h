/* The per-primitive kernel cases shared by the OpenCL (test_kernels.c), CUDA (test_gpu.c) and
 * bf16 suites: each case is one primitive's forward node plus the nodes its gradient rule
 * emits, fed by a random upstream gradient, at awkward sizes. */
#ifndef REALM_KCASES_H
#define REALM_KCASES_H

#include "backend.h"
#include "ir.h"
#include "test.h"

typedef struct {
    const char *op;
    int nin;
    ir_shape in[16];
    ir_dtype dt[16];
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    int vocab;               /* range of integer inputs */
    long S;                  /* sequence length (0: 13) */
    int fwd_only;            /* the forward node alone (a form without a gradient rule) */
} kcase;

typedef struct {
    const kcase *c;
    int n;
} kcase_table;

extern const kcase_table kcases_elementwise, kcases_dense, kcases_attention, kcases_mamba3, kcases_dense_edges,
    kcases_mamba3_long, kcases_mamba3_tc;
extern const double kcases_long_tol;   /* the tolerance of kcases_mamba3_long */

int kc_build_case(const kcase *kc, ir_graph *g, char *err, size_t len);
/* Every case of a table on bk, each launch against the reference (tol normwise); `label`
 * prefixes failure messages. */
void kc_run_table(tctx *t, backend *bk, const char *label, kcase_table tab, double tol);
/* The dense primitives on strided views: inputs sliced from wider tensors, outputs written
 * into slices. Returns 0 or -1 (g->err). */
int kc_build_dense_views(ir_graph *g);

#endif
