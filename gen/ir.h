/* The graph IR: tensors with symbolic batch (B) and sequence (S) dimensions, and nodes that
 * apply registered primitives (gen/ops/) to them.
 *
 * Layout convention shared by every consumer (reference, planner, kernels): a tensor's
 * leading symbolic dims ([B,S], [B] or none) index "tokens"; the remaining constant dims are
 * its "features", stored contiguously. Element (tok, f) of a tensor lives at
 *     base_storage[offset + tok * tok_stride + f]
 * so a split along the last dim is a zero-copy view (same base, an offset, the base's stride)
 * and a reshape of the feature dims is a zero-copy view with the same offset and stride. */
#ifndef REALM_IR_H
#define REALM_IR_H

#include <stddef.h>
#include <stdint.h>

enum { DIM_B = -1, DIM_S = -2 };
#define IR_MAX_DIMS 5
#define IR_MAX_IO 64
#define IR_MAX_IATTR 8
#define IR_MAX_FATTR 4

typedef enum { DT_F32, DT_BF16, DT_I32 } ir_dtype;

typedef enum {
    ROLE_INPUT,      /* fed by the runtime each step (tokens, targets) */
    ROLE_PARAM,      /* trainable weight */
    ROLE_ACT,        /* forward activation or temporary */
    ROLE_GRAD,       /* produced by the backward pass */
    ROLE_OPT,        /* optimizer state (moments) */
    ROLE_STATE       /* recurrent decode state */
} ir_role;

typedef enum {
    INIT_NONE, INIT_NORMAL, INIT_ONES, INIT_ZEROS, INIT_CONST,
    INIT_DT_BIAS     /* softplus^-1 of dt ~ log-uniform[lo, hi], floored (design §7) */
} ir_init;

typedef struct {
    int ndim;
    int d[IR_MAX_DIMS];      /* > 0 constant, or DIM_B / DIM_S (leading positions only) */
} ir_shape;

typedef struct {
    char name[128];
    ir_shape shape;
    ir_dtype dtype;
    ir_role role;
    int base;                /* tensor owning the storage (itself for owners) */
    long offset;             /* element offset inside a token row of the base */
    long tok_stride;         /* elements between consecutive tokens of the base */
    int producer;            /* node id, or -1 for inputs/params */
    int grad;                /* gradient tensor after autodiff, or -1 */
    ir_init init;
    double init_a, init_b;   /* normal: std; const: value; dt_bias: lo, hi */
    double init_floor;
    int scope;               /* index into graph scopes */
} ir_tensor;

typedef struct {
    int op;                  /* index into the op registry */
    int nin, nout;
    int in[IR_MAX_IO];
    int out[IR_MAX_IO];
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    int backward;            /* 1 if emitted by autodiff */
    int scope;
} ir_node;

typedef struct {
    char path[128];          /* e.g. "layers.3.mixer" */
    char kind[32];           /* e.g. "mamba3" */
    int recompute;           /* re-run this block's forward in the backward instead of saving */
} ir_scope;

typedef struct ir_graph {
    ir_tensor *t; int nt, cap_t;
    ir_node *n;   int nn, cap_n;
    ir_scope *sc; int nsc, cap_sc;
    int cur_scope;
    int loss;                /* tensor id of the scalar loss, or -1 */
    int backward_start;      /* first node emitted by autodiff (nn if none) */
    char err[512];           /* last error message (no location) */
} ir_graph;

void ir_init_graph(ir_graph *g);
void ir_free(ir_graph *g);

/* Shapes */
int ir_ntok_dims(const ir_shape *s);              /* leading symbolic dims */
long ir_feat(const ir_shape *s);                  /* product of constant dims */
long ir_ntok(const ir_shape *s, long B, long S);  /* product of symbolic dims */
long ir_numel(const ir_shape *s, long B, long S);
int ir_shape_eq(const ir_shape *a, const ir_shape *b);
void ir_shape_str(const ir_shape *s, char *buf, size_t len);
ir_shape ir_shape_make(int ndim, const int *d);
int ir_dtype_bytes(ir_dtype dt);
/* bf16 storage of a float, round to nearest even as the kernels' cvt.rn (NaN stays NaN), and
 * back: the host side of bf16 tensors (uploads, downloads, the reference). */
uint16_t ir_bf16_bits(float f);
float ir_bf16_float(uint16_t h);
/* Owner tensors stored as bf16 (gen/precision.c), for reports. */
int ir_bf16_owners(const ir_graph *g);

/* Tensors. New owners get tok_stride = feat, offset 0. */
int ir_tensor_new(ir_graph *g, const char *name, ir_shape s, ir_dtype dt, ir_role role);
/* A zero-copy view of `of` with new shape (same token dims), feature offset `off`. */
int ir_view(ir_graph *g, int of, ir_shape s, long off, const char *name);
/* Turn owner tensor `t` into a view of `of` at feature offset `off` (planning not yet done). */
void ir_retarget(ir_graph *g, int t, int of, long off);
int ir_is_view(const ir_graph *g, int t);

/* Nodes: validates via the op's shape rule and creates the outputs. Returns node id or -1
 * (g->err holds the message). ia and fa, when not NULL, hold IR_MAX_IATTR and IR_MAX_FATTR
 * values (write `(double[IR_MAX_FATTR]){x}`, not `(double[]){x}`); NULL means the defaults. */
int ir_node_add(ir_graph *g, int op, const int *in, int nin, const long *ia, const double *fa);
/* Same, by op name; out receives the output ids. Returns number of outputs or -1. */
int ir_emit(ir_graph *g, const char *op, const int *in, int nin, const long *ia, const double *fa,
            int *out);
/* Like ir_emit but the (single) output is written into an existing tensor `dst` of the
 * same shape (used for gradients that land in a slice of a larger gradient). */
int ir_emit_into(ir_graph *g, const char *op, const int *in, int nin, const long *ia,
                 const double *fa, int dst);

int ir_scope_push(ir_graph *g, const char *name, const char *kind);  /* returns previous */
void ir_scope_set(ir_graph *g, int scope);

/* Reverse-mode autodiff from g->loss: appends the backward nodes and sets t[p].grad for every
 * parameter. Returns 0 or -1 with g->err. */
int ir_autodiff(ir_graph *g);

/* Deterministic parameter initialisation (design §7): each parameter draws from its own
 * stream seeded by (seed, name), so the result does not depend on creation order. */
void ir_param_init_values(const ir_tensor *t, uint64_t seed, double *out, long n);

/* Summary numbers used by `realm graph`. */
long ir_param_count(const ir_graph *g);
double ir_flops(const ir_graph *g, int node, long B, long S);

#endif
