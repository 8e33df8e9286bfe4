#include "ir.h"
#include "op.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *grow(void *p, int *cap, int need, size_t elem) {
    if (need <= *cap) return p;
    int c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(p, (size_t)c * elem);
    if (!q) {
        fprintf(stderr, "realm: out of host memory\n");
        exit(1);
    }
    memset((char *)q + (size_t)*cap * elem, 0, (size_t)(c - *cap) * elem);
    *cap = c;
    return q;
}

void ir_init_graph(ir_graph *g) {
    memset(g, 0, sizeof *g);
    g->loss = -1;
    g->sc = grow(g->sc, &g->cap_sc, 1, sizeof *g->sc);
    g->nsc = 1;                      /* scope 0: the model itself */
    snprintf(g->sc[0].kind, sizeof g->sc[0].kind, "model");
}

void ir_free(ir_graph *g) {
    free(g->t);
    free(g->n);
    free(g->sc);
    memset(g, 0, sizeof *g);
}

int ir_ntok_dims(const ir_shape *s) {
    int k = 0;
    while (k < s->ndim && s->d[k] < 0) k++;
    return k;
}

long ir_feat(const ir_shape *s) {
    long f = 1;
    for (int i = ir_ntok_dims(s); i < s->ndim; i++) f *= s->d[i];
    return f;
}

long ir_ntok(const ir_shape *s, long B, long S) {
    long n = 1;
    for (int i = 0; i < s->ndim && s->d[i] < 0; i++) n *= s->d[i] == DIM_B ? B : S;
    return n;
}

long ir_numel(const ir_shape *s, long B, long S) { return ir_ntok(s, B, S) * ir_feat(s); }

int ir_shape_eq(const ir_shape *a, const ir_shape *b) {
    if (a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->d[i] != b->d[i]) return 0;
    return 1;
}

void ir_shape_str(const ir_shape *s, char *buf, size_t len) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, len - k, "[");
    for (int i = 0; i < s->ndim && k < len; i++) {
        const char *sep = i ? "," : "";
        if (s->d[i] == DIM_B) k += (size_t)snprintf(buf + k, len - k, "%sB", sep);
        else if (s->d[i] == DIM_S) k += (size_t)snprintf(buf + k, len - k, "%sS", sep);
        else k += (size_t)snprintf(buf + k, len - k, "%s%d", sep, s->d[i]);
    }
    if (k < len) snprintf(buf + k, len - k, "]");
}

ir_shape ir_shape_make(int ndim, const int *d) {
    ir_shape s = {.ndim = ndim};
    for (int i = 0; i < ndim && i < IR_MAX_DIMS; i++) s.d[i] = d[i];
    return s;
}

int ir_dtype_bytes(ir_dtype dt) { return dt == DT_BF16 ? 2 : 4; }

uint16_t ir_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

int ir_bf16_owners(const ir_graph *g) {
    int n = 0;
    for (int i = 0; i < g->nt; i++) n += g->t[i].base == i && g->t[i].dtype == DT_BF16;
    return n;
}

float ir_bf16_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int ir_tensor_new(ir_graph *g, const char *name, ir_shape s, ir_dtype dt, ir_role role) {
    g->t = grow(g->t, &g->cap_t, g->nt + 1, sizeof *g->t);
    int id = g->nt++;
    ir_tensor *t = &g->t[id];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name ? name : "");
    if (!t->name[0]) snprintf(t->name, sizeof t->name, "t%d", id);
    t->shape = s;
    t->dtype = dt;
    t->role = role;
    t->base = id;
    t->offset = 0;
    t->tok_stride = ir_feat(&s);
    t->producer = -1;
    t->grad = -1;
    t->scope = g->cur_scope;
    return id;
}

int ir_view(ir_graph *g, int of, ir_shape s, long off, const char *name) {
    ir_tensor src = g->t[of];
    int id = ir_tensor_new(g, name, s, src.dtype, src.role);
    ir_tensor *t = &g->t[id];
    t->base = src.base;
    t->offset = src.offset + off;
    t->tok_stride = src.tok_stride;
    t->producer = src.producer;
    return id;
}

void ir_retarget(ir_graph *g, int t, int of, long off) {
    ir_tensor *v = &g->t[t];
    const ir_tensor *o = &g->t[of];
    v->base = o->base;
    v->offset = o->offset + off;
    v->tok_stride = o->tok_stride;
}

int ir_is_view(const ir_graph *g, int t) { return g->t[t].base != t; }

int ir_scope_push(ir_graph *g, const char *name, const char *kind) {
    int prev = g->cur_scope;
    g->sc = grow(g->sc, &g->cap_sc, g->nsc + 1, sizeof *g->sc);
    ir_scope *s = &g->sc[g->nsc];
    char parent[sizeof s->path];
    memcpy(parent, g->sc[prev].path, sizeof parent);
    int k = parent[0] ? snprintf(s->path, sizeof s->path, "%.80s.%.40s", parent, name)
                      : snprintf(s->path, sizeof s->path, "%.120s", name);
    (void)k;
    snprintf(s->kind, sizeof s->kind, "%s", kind && *kind ? kind : g->sc[prev].kind);
    g->cur_scope = g->nsc++;
    return prev;
}

void ir_scope_set(ir_graph *g, int scope) { g->cur_scope = scope; }

int ir_node_add(ir_graph *g, int op, const int *in, int nin, const long *ia, const double *fa) {
    const op_def *d = op_get(op);
    if (!d) {
        snprintf(g->err, sizeof g->err, "unknown primitive #%d", op);
        return -1;
    }
    if ((d->nin >= 0 && nin != d->nin) || (d->nin < 0 && nin < -d->nin) || nin > IR_MAX_IO) {
        snprintf(g->err, sizeof g->err, "%s takes %s%d inputs, got %d", d->name,
                 d->nin < 0 ? "at least " : "", d->nin < 0 ? -d->nin : d->nin, nin);
        return -1;
    }
    ir_node n;
    memset(&n, 0, sizeof n);
    n.op = op;
    n.nin = nin;
    n.scope = g->cur_scope;
    for (int i = 0; i < nin; i++) {
        if (in[i] < 0 || in[i] >= g->nt) {
            snprintf(g->err, sizeof g->err, "%s: input %d is not a tensor", d->name, i + 1);
            return -1;
        }
        n.in[i] = in[i];
    }
    n.nout = d->nout >= 0 ? d->nout : d->count_out(&n);
    if (n.nout < 1 || n.nout > IR_MAX_IO) {
        snprintf(g->err, sizeof g->err, "%s: %d inputs make %d outputs (1..%d)", d->name, nin, n.nout, IR_MAX_IO);
        return -1;
    }
    for (int i = 0; i < IR_MAX_IATTR; i++) n.ia[i] = ia ? ia[i] : d->ia_default[i];
    for (int i = 0; i < IR_MAX_FATTR; i++) n.fa[i] = fa ? fa[i] : d->fa_default[i];
    ir_shape outs[IR_MAX_IO];
    ir_dtype dts[IR_MAX_IO];
    for (int i = 0; i < IR_MAX_IO; i++) dts[i] = DT_F32;
    char msg[400];
    msg[0] = 0;
    if (d->infer(g, &n, outs, dts, msg, sizeof msg) < 0) {
        snprintf(g->err, sizeof g->err, "%s: %s", d->name, msg);
        return -1;
    }
    g->n = grow(g->n, &g->cap_n, g->nn + 1, sizeof *g->n);
    int id = g->nn++;
    n.backward = g->backward_start > 0 && id >= g->backward_start;
    for (int i = 0; i < n.nout; i++) {
        char name[128];
        snprintf(name, sizeof name, "%s%s%d", d->name, n.nout > 1 ? "." : "", n.nout > 1 ? i : id);
        int t = ir_tensor_new(g, name, outs[i], dts[i], n.backward ? ROLE_GRAD : ROLE_ACT);
        if (n.nout == 1) snprintf(g->t[t].name, sizeof g->t[t].name, "%s#%d", d->name, t);
        else snprintf(g->t[t].name, sizeof g->t[t].name, "%s.%d#%d", d->name, i, t);
        g->t[t].producer = id;
        n.out[i] = t;
    }
    g->n[id] = n;
    return id;
}

int ir_emit(ir_graph *g, const char *op, const int *in, int nin, const long *ia, const double *fa,
            int *out) {
    int o = op_find(op);
    if (o < 0) {
        snprintf(g->err, sizeof g->err, "unknown primitive '%s'", op);
        return -1;
    }
    int id = ir_node_add(g, o, in, nin, ia, fa);
    if (id < 0) return -1;
    for (int i = 0; out && i < g->n[id].nout; i++) out[i] = g->n[id].out[i];
    return g->n[id].nout;
}

int ir_emit_into(ir_graph *g, const char *op, const int *in, int nin, const long *ia,
                 const double *fa, int dst) {
    int out[IR_MAX_IO];
    if (ir_emit(g, op, in, nin, ia, fa, out) != 1) return -1;
    ir_tensor *o = &g->t[out[0]];
    if (!ir_shape_eq(&o->shape, &g->t[dst].shape)) {
        snprintf(g->err, sizeof g->err, "%s: output shape does not match destination", op);
        return -1;
    }
    /* The node writes straight into dst's storage: the fresh output becomes an alias. */
    ir_retarget(g, out[0], dst, 0);
    return out[0];
}

long ir_param_count(const ir_graph *g) {
    long n = 0;
    for (int i = 0; i < g->nt; i++)
        if (g->t[i].role == ROLE_PARAM && g->t[i].base == i) n += ir_numel(&g->t[i].shape, 1, 1);
    return n;
}

double ir_flops(const ir_graph *g, int node, long B, long S) {
    const op_def *d = op_get(g->n[node].op);
    return d->flops ? d->flops(g, &g->n[node], B, S) : 0.0;
}

/* ---- deterministic initialisation ---- */

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double unit(uint64_t *s) { return ((double)(splitmix(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

void ir_param_init_values(const ir_tensor *t, uint64_t seed, double *out, long n) {
    uint64_t h = 1469598103934665603ull;          /* FNV-1a of the name: order-independent */
    for (const char *c = t->name; *c; c++) h = (h ^ (uint8_t)*c) * 1099511628211ull;
    uint64_t s = seed ^ h;
    for (long i = 0; i < n; i++) {
        switch (t->init) {
        case INIT_NORMAL: {
            double u = unit(&s), v = unit(&s);
            out[i] = t->init_a * sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
            break;
        }
        case INIT_ONES: out[i] = 1.0; break;
        case INIT_CONST: out[i] = t->init_a; break;
        case INIT_DT_BIAS: {
            double lo = log(t->init_a), hi = log(t->init_b);
            double dt = exp(lo + (hi - lo) * unit(&s));
            if (dt < t->init_floor) dt = t->init_floor;
            out[i] = dt + log(-expm1(-dt));       /* softplus^-1(dt), stable for small dt */
            break;
        }
        default: out[i] = 0.0; break;
        }
    }
}
