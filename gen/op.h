/* The primitive interface. One file per primitive in gen/ops/ defines one `op_def` holding
 * everything about it: how its output shapes follow from its inputs (the shape rule), how its
 * gradient is expressed as more IR (the gradient rule), its plain-C reference (fp64), and its
 * cost. gen/ops/registry.c lists them; the compiler core never names a primitive. */
#ifndef REALM_OP_H
#define REALM_OP_H

#include "ir.h"

/* A tensor as the reference sees it: fp64 storage, `ntok` rows of `feat` contiguous values,
 * `ld` values apart. Element (tok, f) is p[tok * ld + f]. */
typedef struct {
    double *p;
    long ntok, feat, ld;
} ref_buf;

/* Row r of a tensor viewed as rows of `len` values (len divides feat). */
static inline double *ref_row(ref_buf b, long r, long len) {
    long per_tok = b.feat / len;
    return b.p + (r / per_tok) * b.ld + (r % per_tok) * len;
}
static inline long ref_rows(ref_buf b, long len) { return b.ntok * (b.feat / len); }

typedef struct ref_ctx ref_ctx;
struct kgen;
struct strbuf;
ref_buf ref_get(const ref_ctx *c, int tensor);
long ref_B(const ref_ctx *c);
long ref_S(const ref_ctx *c);
const ir_shape *ref_shape(const ref_ctx *c, int tensor);
ir_dtype ref_dtype(const ref_ctx *c, int tensor);

typedef struct op_def {
    const char *name;
    int nin, nout;                 /* nin < 0: variadic, at least -nin inputs; nout < 0: see count_out */
    /* Outputs of a node with these inputs (n->nin, n->in set), when nout < 0. */
    int (*count_out)(const ir_node *n);
    /* Lua-facing attribute names (NULL-terminated lists); g:NAME(a, b, {key = value}) fills
     * ia[i] / fa[i] from the table, in the order given here. */
    const char *iattr[IR_MAX_IATTR + 1];
    const char *fattr[IR_MAX_FATTR + 1];
    long ia_default[IR_MAX_IATTR];
    double fa_default[IR_MAX_FATTR];
    /* Shape rule: fill out[0..nout-1] (shapes) and dtypes, or write a message and return -1. */
    int (*infer)(const ir_graph *g, const ir_node *n, ir_shape *out, ir_dtype *dt,
                 char *err, size_t errlen);
    /* Gradient rule: dout[i] is the gradient tensor of output i (or -1); set din[i] to a
     * tensor holding the gradient contribution for input i (or -1). NULL: not differentiable. */
    int (*grad)(ir_graph *g, int node, const int *dout, int *din);
    /* Reference: reads inputs and writes outputs through ref_get. */
    void (*ref)(const ref_ctx *c, const ir_node *n);
    /* Floating-point operations for concrete B, S. */
    double (*flops)(const ir_graph *g, const ir_node *n, long B, long S);
    /* Kernel template: renders the kernel(s) of this node through gen/kgen.h. */
    int (*emit)(struct kgen *k, const ir_node *n);
    /* Elementwise primitives instead give the expression of their single output in terms of
     * their inputs' expressions (float); the fusion pass chains them into one kernel. */
    void (*ew)(struct strbuf *out, const ir_node *n, const char *const *in);
    /* Non-NULL if `emit` can take the elementwise nodes that follow node n into its output
     * stage (kgen.epi, see plan_epilogue) for this node: each output element is then finished
     * where it is computed, and an intermediate that only the group reads is never stored. */
    int (*epilogue_ok)(const ir_graph *g, const ir_node *n);
    /* Elementwise and cheaper to compute again than to store and read back: when only the next
     * (elementwise) node reads its output, autodiff recomputes the pair in the backward. */
    int recompute;
    /* bf16 storage (gen/precision.c). Bit q: the bf16 template reads input q as it is when the
     * tensor is stored as bf16 (rows a multiple of 8 values, one row a token). A primitive
     * whose template can store its output as bf16 has an integer attribute named "bf16_out"
     * (elementwise ones always can: plan.c rounds at their store). */
    unsigned bf16_in;
} op_def;

const op_def *op_get(int id);
int op_count(void);
int op_find(const char *name);     /* -1 if unknown */

/* Helpers shared by the shape rules. */
#define OP_ERR(...) (snprintf(err, errlen, __VA_ARGS__), -1)
const ir_shape *op_in_shape(const ir_graph *g, const ir_node *n, int i);
ir_dtype op_in_dtype(const ir_graph *g, const ir_node *n, int i);
/* Input i must be a float tensor of shape [lead dims, d[0..nd)], the lead dims being [B,S]
 * (lead 2), [B] (1) or none (0); otherwise -1 with "input i+1 (name) must be a float tensor of
 * shape [..], got [..]" in err. */
int op_want_input(const ir_graph *g, const ir_node *n, int i, int lead, const int *d, int nd, const char *name,
                  char *err, size_t errlen);

#endif
