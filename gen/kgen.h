/* Kernel rendering. One renderer for every backend: kernel templates (in gen/ops/) write
 * C-like source using a few portable spellings (KERNEL, GLOBAL, LOCAL, BARRIER(), LID_X,
 * GID_X, ...) that each backend's dialect table defines once in the module preamble.
 *
 * Kernel calling convention: KERNEL void name(GLOBAL float *A, long B, long S, long o_1, ...)
 * where A is the arena and each o_i the element offset of one tensor; the template names
 * the tensors with kg_arg and gets `GLOBAL float *name = A + o_name;` in the body. Batch B
 * and sequence S are runtime values; every other size is a constant baked into the source. */
#ifndef REALM_KGEN_H
#define REALM_KGEN_H

#include "ir.h"

#include <stddef.h>

typedef struct strbuf {
    char *s;
    size_t n, cap;
} strbuf;
void sb_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sb_free(strbuf *b);

typedef struct {
    const char *key, *value;
} kg_spelling;

typedef struct dialect {
    const char *name;              /* "opencl", "cuda" */
    const kg_spelling *spell;      /* NULL-terminated table of portable spellings */
    const char *prelude;           /* helper functions every module needs (after the spellings) */
    /* Helpers a module with bf16 tensor-core kernels needs, or NULL where the dialect has no
     * bf16 matrix path (OpenCL): kg_set_bf16 then leaves k->bf16 at 0, so templates fall back
     * to fp32 and a bf16 request on such a backend still yields a correct (fp32) module. */
    const char *bf16_prelude;
    /* The backend runs a plan's side launches (plan.side) on a second stream, so the memory
     * plan must keep their tensors until they are joined (plan_build). */
    int side_stream;
} dialect;
const dialect *dialect_find(const char *name);
/* Whether the named dialect has bf16 matrix helpers (kg_set_bf16 would grant bf16). */
int kg_dialect_has_bf16(const char *name);

#define KG_MAX_ARGS 96

/* groups along one grid dim = ceil((c0 + cB*B + cS*S + cBS*B*S) / div) */
typedef struct {
    long c0, cB, cS, cBS, div;
} kg_dim;

typedef struct plan_launch {
    char kernel[48];
    int node0, node1;              /* IR nodes [node0, node1) this launch computes */
    int nargs;
    int arg[KG_MAX_ARGS];          /* tensor ids whose offsets are passed, in order */
    int nin, nout;                 /* arg[0..nin) are read; arg[nin..nin+nout) written */
    kg_dim grid[3];
    int block[3];
    long shmem;                    /* bytes of dynamic shared (local) memory, see kg_shared */
    int param_grad;                /* reduces into a parameter's gradient (kg_param_grad) */
} plan_launch;

typedef struct kgen {
    const dialect *d;
    const ir_graph *g;
    strbuf src;                    /* the module */
    strbuf body, params;           /* the kernel being rendered */
    plan_launch cur;
    plan_launch *launches;
    int nl, cap;
    char **bodies;                 /* params + body of every distinct kernel, for reuse */
    char (*names)[48];
    int nbodies;
    char err[512];
    int bf16;                      /* matmuls take bf16 operands on tensor cores (fp32 accumulation) */
    int wgmma;                     /* and may use Hopper's wgmma: the module is compiled for sm_90a */
    long shared_max;               /* bytes of shared memory a work-group may use (plan_options) */
    int min_blocks;                /* of the kernel being rendered, see kg_min_blocks */
    /* While a template runs: the elementwise group to fuse into its output stage, or NULL
     * (plan.c sets it only for primitives whose op_def says they take one: plan_epilogue). */
    const struct plan_epilogue *epi;
} kgen;

void kg_init(kgen *k, const dialect *d, const ir_graph *g);
/* Ask for bf16 matmuls; call before the first kernel. Only dialects with a bf16_prelude honour
 * it (k->bf16 says what was granted). */
void kg_set_bf16(kgen *k, int on);
void kg_free(kgen *k);

/* ---- the template API ---- */
void kg_begin(kgen *k, const char *what, int node0, int node1);
/* Pass tensor `t`'s offset; `cname` becomes a GLOBAL float pointer to its first element.
 * Inputs first (kg_in), then outputs (kg_out). */
void kg_in(kgen *k, const char *cname, int t);
void kg_out(kgen *k, const char *cname, int t);
void kg_line(kgen *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kg_grid(kgen *k, int dim, long c0, long cB, long cS, long cBS, long div);
void kg_block(kgen *k, int x, int y, int z);
/* A float array of n elements in the work-group's dynamic shared memory, declared at this
 * point of the body as `name`: for tiles beyond the 48 KiB that static LOCAL arrays may take
 * on CUDA (the launch opts in to more). OpenCL receives the region as a trailing __local
 * pointer argument. Each array starts 16-byte aligned. */
void kg_shared(kgen *k, const char *name, long n);
/* CUDA: have the compiler fit n work-groups of this kernel (at its kg_block size) on one
 * multiprocessor at a time, i.e. cap its registers (__launch_bounds__). Others ignore it. */
void kg_min_blocks(kgen *k, int n);
/* The kernel being rendered is weight-gradient work: it reduces into a parameter's gradient
 * (or a partial of one), which nothing reads before the optimizer. The plan may run such a
 * launch on a side stream (plan.side) once it has checked that nothing else needs it sooner. */
void kg_param_grad(kgen *k);
/* Finish the kernel: identical kernels (same parameters and body) are emitted once and shared. */
int kg_end(kgen *k);

/* ---- tensor-core fragments (CUDA bf16 plans: mma.sync m16n8k16, bf16 operands, fp32
 * accumulation; the prelude's mma_bf16_16816 and pack_bf16x2) ----
 * Conventions shared by the kernels that use them (gen/ops/attention.c, mamba3_scan.c): a warp
 * owns 16 rows of its tiles; lane = 4 gq + tq. Shared tiles hold bf16 pairs as 32-bit words,
 * rows padded by 4 words (kg_tc_ws) so that a fragment read (8 rows x 4 words, or the 8 row
 * addresses of an ldmatrix phase) hits 32 distinct banks. Accumulator e of n-tile j sits at row
 * gq (+8 for e >= 2), column 8j + 2tq + (e & 1); so the accumulators of n-tiles 2t and 2t+1 are
 * exactly the A fragment of k-step t of a following product (kg_tc_repack). */
/* Words per padded row of a tile with `cols` bf16 columns. */
long kg_tc_ws(long cols);
/* tid, lane, warp, gq, tq */
void kg_tc_prologue(kgen *k);
/* unsigned frag[DP/16][4]: the A fragments of the warp's 16 rows (warp * 16 + gq, + 8) of a
 * row tile of DP columns, every k-step, kept in registers. */
void kg_tc_afrag(kgen *k, long DP, const char *frag, const char *tile);
/* The same fragments (ks k-steps) from a tile stored the other way round, its rows along the
 * contraction and its words along the warp's rows (ws words a row): ldmatrix.trans. */
void kg_tc_afrag_trans(kgen *k, const char *frag, const char *tile, long ws, long ks);
/* acc[j] (j < nt n-tiles of 8 columns, nt even) += A B over ks k-steps, every fragment read by
 * ldmatrix (one x4 load feeds two n-tiles). B comes from `tile` (ws words a row) stored either
 * with its row 8j + .. for column j's and the words along the contraction (trans = 0), or the
 * other way round (trans = 1: row 16kk + .. for k-step kk, words along the columns), which is
 * how a product reads the transpose of a row tile without a transposed copy. The A fragment is
 * `afrag` (a C expression in kk for unsigned[4]), or with `atile` (aws words a row) the warp's
 * 16 rows of that tile loaded at each k-step. Only the k-steps and n-tiles for which the C
 * conditions kcond (on kk) and jcond (on j, tested at even j, must then hold for j + 1 too)
 * hold are computed (NULL: all): a warp skips the blocks a causal mask zeroes. The conditions
 * must be warp-uniform (mma.sync needs the whole warp). */
void kg_tc_mma(kgen *k, const char *acc, const char *afrag, const char *atile, long aws, const char *tile, long ws,
               int trans, long nt, long ks, const char *kcond, const char *jcond);
/* unsigned frag[ks][4]: A fragments of k-steps 0..ks-1 from the accumulators acc[2 ks][4] of a
 * 16 x 16ks result, rounded to bf16. */
void kg_tc_repack(kgen *k, const char *frag, const char *acc, long ks);
/* float acc[nt][4] = 0 */
void kg_tc_zero(kgen *k, const char *acc, long nt);

/* Layout helpers for templates: token stride and feature size of a tensor, and whether its
 * leading dims are [B,S] (2), [B] (1) or none (0). */
long kg_ld(const kgen *k, int t);
long kg_feat(const kgen *k, int t);
int kg_tokdims(const kgen *k, int t);
/* "T" (B*S), "B" or "1": the token count of a tensor as a C expression. */
const char *kg_ntok_expr(const kgen *k, int t);

#endif
