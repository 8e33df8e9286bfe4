/* The compiled form of a graph: fusion groups, a fixed launch order, the kernel module
 * source, and the liveness the memory planner packs the arena with. */
#ifndef REALM_PLAN_H
#define REALM_PLAN_H

#include "ir.h"
#include "kgen.h"

typedef struct plan {
    const ir_graph *g;
    int node0, node1;        /* nodes compiled */
    kgen kg;                 /* launches (kg.launches, kg.nl) and the module source (kg.src) */
    char *stored;            /* per tensor: owner storage lives in the arena */
    char *persist;           /* per tensor: lives for the whole step (and across steps) */
    int *first, *last;       /* per owner: first and last launch touching it */
    int nfused;              /* nodes that became registers inside a fused kernel */
    /* Per launch. side: weight-gradient work that may run on a second stream (dialects with
     * side_stream; all zero otherwise): every tensor it writes is a parameter's gradient or
     * is touched afterwards only by other side launches. join: for a side launch, the first
     * later launch that may not start before it has finished (nl: the end of the run); a
     * side launch itself when the lag cap ends there, in which case the next main launch
     * waits (exec_side_wait). */
    char *side;
    int *join;
    int nside;
} plan;

/* An elementwise group fused into the output stage of the kernel before it (a matmul's
 * epilogue): nodes [n0, n1) all iterate over the space of `src`, the output of node n0 - 1,
 * whose template computes element (tok, f) of src in a register and hands it to
 * plan_epi_loads / plan_epi_values instead of (or besides, if src_stored) writing it. The template declares
 * its own inputs, then plan_epi_inputs, then its output only if src_stored, then
 * plan_epi_outputs; its launch covers nodes [n0 - 1, n1). */
typedef struct plan_epilogue {
    const struct plan *p;
    int n0, n1;
    int src, src_stored;
    int next, ext[KG_MAX_ARGS];   /* tensors the group reads from memory */
} plan_epilogue;
void plan_epi_inputs(kgen *k, const plan_epilogue *e);
void plan_epi_outputs(kgen *k, const plan_epilogue *e);
/* The group at element (tok, f) (C expressions; tok the flat token index) in two steps, so a
 * template can issue the loads of several elements (tags u = 0, 1, ...) before their
 * arithmetic: plan_epi_loads reads the group's inputs (zeros where the C condition `guard` is
 * false; NULL: always read), plan_epi_values computes every node's value from them and src's
 * value (the float expression `val`) and writes the stored outputs. */
void plan_epi_loads(kgen *k, const plan_epilogue *e, int u, const char *tok, const char *f, const char *guard);
void plan_epi_values(kgen *k, const plan_epilogue *e, int u, const char *tok, const char *f, const char *val);

/* How kernels compute. Zero-initialised means fp32 everywhere. */
typedef struct plan_options {
    /* Matmuls take bf16 operands on tensor cores with fp32 accumulation (CUDA). Dialects
     * without a bf16 path (OpenCL) ignore it. A training session then also stores what only
     * matmuls read as bf16 (gen/precision.c), unless fp32_storage. */
    int bf16;
    int fp32_storage;
    /* Bytes of shared (local) memory one work-group may use on the target device (0: assume
     * 160 KiB, what sm_80 and sm_90 allow). Templates with a large-tile variant fall back to a
     * smaller one past it (say, the scan backward on a 99 KiB sm_120 or a 48 KiB OpenCL GPU). */
    long shared_max;
    /* bf16 matmuls may use wgmma (Hopper, sm_90): the module must be compiled for sm_90a,
     * which the CUDA backend and `realm kernels` do for sm_90 (cuda_compile_arch). */
    int wgmma;
} plan_options;

/* Compile nodes [node0, node1) of g for `dialect` in fp32. `keep` lists tensors the host reads
 * after a run (besides parameters, optimizer state and inputs, which always persist). */
int plan_build(plan *p, const ir_graph *g, int node0, int node1, const char *dialect, const int *keep,
               int nkeep, char *err, size_t errlen);
/* The same with options (NULL: fp32). */
int plan_build_opts(plan *p, const ir_graph *g, int node0, int node1, const char *dialect, const int *keep,
                    int nkeep, const plan_options *opt, char *err, size_t errlen);
void plan_free(plan *p);

/* The memory plan for concrete B, S: byte offset of every stored owner tensor (others get
 * (size_t)-1) and the arena size. Tensors whose lifetimes do not overlap share bytes. */
#define PLAN_ALIGN 256
size_t plan_arena(const plan *p, long B, long S, size_t *offset);
/* The arena by category (docs/memory.md). The arena is one allocation whose tensors share
 * bytes when their lifetimes do not overlap, so a tensor cannot simply be "counted once":
 * `peak` attributes the bytes live during the launch where the most bytes are live (the
 * moment that sizes the arena) to the categories of the tensors live then, and the rest of
 * the arena (first-fit packing leaves holes) to PM_SLACK, so peak[] sums to `arena` exactly.
 * `sum` is each category's total size ignoring sharing (informational). */
typedef enum {
    PM_WEIGHTS,      /* parameters */
    PM_GRADS,        /* parameter gradients */
    PM_MOMENTS,      /* optimizer moments */
    PM_INPUTS,       /* tokens, targets, hyper-parameters */
    PM_SAVED,        /* forward activations a backward launch reads */
    PM_FWD_TMP,      /* forward activations that die within the forward */
    PM_RECOMPUTED,   /* forward activations re-emitted in the backward (recompute scopes) */
    PM_BWD_TMP,      /* other backward and optimizer temporaries */
    PM_OUTPUTS,      /* values the host reads after a run (loss, logits) */
    PM_SLACK,        /* bytes no tensor uses at the peak (packing holes) */
    PM_NCAT
} plan_mem_cat;

typedef struct {
    size_t arena;                 /* = plan_arena(p, B, S, NULL) */
    size_t peak[PM_NCAT];         /* sums to arena */
    size_t sum[PM_NCAT];
    int peak_launch;              /* launch where the most bytes are live */
} plan_mem;

const char *plan_mem_cat_name(plan_mem_cat c);
void plan_memory(const plan *p, long B, long S, plan_mem *out);

/* Element offset of any tensor (views included) given the owners' byte offsets. */
long plan_elem_offset(const plan *p, const size_t *offset, int t);
/* Number of groups of a launch along each grid dim for concrete B, S. */
void plan_grid(const plan_launch *l, long B, long S, size_t groups[3]);

/* Write the plan (launches, arguments, grids, memory plan at B,S) as text. */
void plan_describe(const plan *p, long B, long S, strbuf *out);

#endif
