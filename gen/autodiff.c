/* Reverse-mode autodiff over the IR. Each primitive's gradient rule emits more IR; this file
 * only routes gradients: it sums contributions, seeds the loss, and makes gradients of
 * zero-copy views land directly in slices of their base's gradient (so the backward of a
 * split needs no concatenation kernel). */
#include "ir.h"
#include "op.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int *v;
    int n, cap;
} ilist;

typedef struct {
    ir_graph *g;
    int nt0;                 /* tensors that existed before autodiff (forward tensors) */
    ilist *contrib;          /* per forward tensor: gradient contributions */
    int *uses;               /* per tensor: times used as a contribution (grows) */
    int cap_uses;
} ad_state;

static void push(ilist *l, int x) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 4;
        l->v = realloc(l->v, sizeof(int) * (size_t)l->cap);
    }
    l->v[l->n++] = x;
}

static void count_use(ad_state *s, int t) {
    if (t >= s->cap_uses) {
        int c = s->cap_uses ? s->cap_uses : 256;
        while (c <= t) c *= 2;
        s->uses = realloc(s->uses, sizeof(int) * (size_t)c);
        memset(s->uses + s->cap_uses, 0, sizeof(int) * (size_t)(c - s->cap_uses));
        s->cap_uses = c;
    }
    s->uses[t]++;
}

/* Folds the sum acc + v into the rmsnorm_bwd that produced v, through its optional accumulate
 * input, when v is that node's dx, nothing else reads v and acc exists before the node runs:
 * the residual stream's gradient then costs no separate add pass over the activations. */
static int fold_sum(ir_graph *g, int acc, int v) {
    const int pn = g->t[v].producer;
    if (pn < 0 || g->n[pn].op != op_find("rmsnorm_bwd") || g->n[pn].nin != 3 || g->n[pn].out[0] != v) return 0;
    if (g->t[acc].producer >= pn || !ir_shape_eq(&g->t[acc].shape, &g->t[v].shape)) return 0;
    for (int i = 0; i < g->nn; i++)
        for (int j = 0; j < g->n[i].nin; j++)
            if (g->n[i].in[j] == v) return 0;
    g->n[pn].in[3] = acc;
    g->n[pn].nin = 4;
    return 1;
}

static int sum_list(ad_state *s, const ilist *l) {
    if (l->n == 0) return -1;
    int acc = l->v[0];
    for (int i = 1; i < l->n; i++) {
        if (fold_sum(s->g, acc, l->v[i])) {
            acc = l->v[i];
            continue;
        }
        if (fold_sum(s->g, l->v[i], acc)) continue;
        int in[2] = {acc, l->v[i]}, out;
        if (ir_emit(s->g, "add", in, 2, NULL, NULL, &out) < 0) return -2;
        acc = out;
    }
    return acc;
}

static int fill_zero(ir_graph *g, const ir_shape *sh) {
    long ia[IR_MAX_IATTR] = {sh->ndim};
    for (int i = 0; i < sh->ndim; i++) ia[1 + i] = sh->d[i];
    double fa[IR_MAX_FATTR] = {0};
    int out;
    return ir_emit(g, "fill", NULL, 0, ia, fa, &out) < 0 ? -2 : out;
}

/* A gradient tensor can be made to live inside another buffer if nothing else aliases it. */
static int retargetable(const ad_state *s, int t) {
    const ir_tensor *x = &s->g->t[t];
    return x->base == t && x->role == ROLE_GRAD && t >= s->nt0 && s->uses[t] == 1;
}

/* Total gradient of owner tensor b, including what flowed into its views. */
static int gather(ad_state *s, int b) {
    ir_graph *g = s->g;
    int direct = sum_list(s, &s->contrib[b]);
    if (direct == -2) return -2;
    int views[256], nv = 0;
    for (int v = 0; v < s->nt0; v++)
        if (v != b && g->t[v].base == b && s->contrib[v].n > 0) {
            if (nv == 256) {
                snprintf(g->err, sizeof g->err, "too many views of '%s'", g->t[b].name);
                return -2;
            }
            views[nv++] = v;
        }
    if (nv == 0) return direct;

    /* Views must tile disjoint feature ranges of the base row. */
    long feat = ir_feat(&g->t[b].shape);
    char *covered = calloc((size_t)feat, 1);
    for (int i = 0; i < nv; i++) {
        const ir_tensor *v = &g->t[views[i]];
        for (long f = v->offset; f < v->offset + ir_feat(&v->shape); f++) {
            if (covered[f]) {
                free(covered);
                snprintf(g->err, sizeof g->err, "overlapping views of '%s' both receive gradients", g->t[b].name);
                return -2;
            }
            covered[f] = 1;
        }
    }
    char name[160];
    snprintf(name, sizeof name, "grad(%s)", g->t[b].name);
    int G = ir_tensor_new(g, name, g->t[b].shape, DT_F32, ROLE_GRAD);
    for (int i = 0; i < nv; i++) {
        int v = views[i];
        int gv = sum_list(s, &s->contrib[v]);
        if (gv == -2) { free(covered); return -2; }
        if (!retargetable(s, gv)) {
            int out;
            if (ir_emit(g, "copy", &gv, 1, NULL, NULL, &out) < 0) { free(covered); return -2; }
            gv = out;
        }
        ir_retarget(g, gv, G, g->t[v].offset);
    }
    /* Feature ranges no view covers receive zeros. */
    int ntd = ir_ntok_dims(&g->t[b].shape);
    for (long f = 0; f < feat;) {
        if (covered[f]) { f++; continue; }
        long e = f;
        while (e < feat && !covered[e]) e++;
        ir_shape sh = {.ndim = ntd + 1};
        for (int k = 0; k < ntd; k++) sh.d[k] = g->t[b].shape.d[k];
        sh.d[ntd] = (int)(e - f);
        int z = fill_zero(g, &sh);
        if (z == -2) { free(covered); return -2; }
        ir_retarget(g, z, G, f);
        f = e;
    }
    free(covered);
    if (direct < 0) return G;
    int in[2] = {G, direct}, out;
    return ir_emit(g, "add", in, 2, NULL, NULL, &out) < 0 ? -2 : out;
}

static int needs_grad(const ir_graph *g, int t) {
    return g->t[t].role != ROLE_INPUT && g->t[t].dtype != DT_I32;
}

/* ---- recomputation ----
 * A forward node belongs to the recompute region of the outermost scope marked `recompute`
 * whose path is its own scope's path or a prefix of it ("layers.3.mixer" covers
 * "layers.3.mixer.in_proj"). A segment is a maximal run of consecutive forward nodes of one
 * region. Just before the backward reaches a segment, its nodes are emitted again (reading
 * the segment's inputs, which stay saved) and the gradient rules of the segment's nodes are
 * pointed at the copies, so the original activations are last read in the forward and the
 * memory planner lets them die there. */

static int path_covers(const char *outer, const char *inner) {
    size_t n = strlen(outer);
    return strncmp(outer, inner, n) == 0 && (inner[n] == 0 || inner[n] == '.');
}

/* Per scope: the scope whose region it belongs to, or -1. */
static int *recompute_roots(const ir_graph *g) {
    int *root = malloc(sizeof(int) * (size_t)(g->nsc ? g->nsc : 1));
    for (int s = 0; s < g->nsc; s++) {
        root[s] = -1;
        for (int r = 0; r < g->nsc; r++)
            if (g->sc[r].recompute && g->sc[r].path[0] && path_covers(g->sc[r].path, g->sc[s].path) &&
                (root[s] < 0 || strlen(g->sc[r].path) < strlen(g->sc[root[s]].path)))
                root[s] = r;
    }
    return root;
}

typedef struct {
    int a, b;                /* current segment [a, b] of forward nodes, a > b when none */
    int *map;                /* per forward tensor: its recomputed copy, or -1 */
} recomp;

/* The tensor a recomputed node reads in place of forward tensor t: the copy when t (or the
 * owner of view t) is produced inside the segment, else t itself. */
static int remap(ir_graph *g, recomp *r, int t) {
    if (r->map[t] >= 0) return r->map[t];
    int base = g->t[t].base, prod = g->t[base].producer;
    if (prod < r->a || prod > r->b || base == t || r->map[base] < 0) return t;
    ir_shape sh = g->t[t].shape;
    long off = g->t[t].offset - g->t[base].offset;
    char name[128];
    snprintf(name, sizeof name, "%.100s.recomputed", g->t[t].name);
    int v = ir_view(g, r->map[base], sh, off, name);
    r->map[t] = v;
    return v;
}

static int emit_recompute(ir_graph *g, recomp *r) {
    for (int j = r->a; j <= r->b; j++) {
        const ir_node n = g->n[j];
        int in[IR_MAX_IO];
        for (int k = 0; k < n.nin; k++) in[k] = remap(g, r, n.in[k]);
        ir_scope_set(g, n.scope);
        int id = ir_node_add(g, n.op, in, n.nin, n.ia, n.fa);
        if (id < 0) return -1;
        for (int o = 0; o < n.nout; o++) {
            int t = g->n[id].out[o];
            /* activations, not gradients: the memory model reports them as recomputed */
            g->t[t].role = ROLE_ACT;
            g->t[t].scope = g->t[n.out[o]].scope;
            r->map[n.out[o]] = t;
        }
    }
    return 0;
}

/* A node whose op_def says `recompute` (silu), read only by the elementwise node right after
 * it (the gates y * silu(z) of the Mamba mixers and SwiGLU), is recomputed in the backward
 * rather than stored: silu's own gradient reads z anyway, so the backward reads z once instead
 * of z and silu(z), the forward writes one tensor less, and the copy lands in the fused group
 * after the product that computes the gate's gradient (realm-9m at 8 x 8192: 1.8 GB of saved
 * activations less). Such a pair becomes a region of its own (ids past the scopes'),
 * recomputed like a scope marked `recompute`; the copy of the second node is never read and
 * stays in registers. */
static void mark_gate_recompute(const ir_graph *g, int nfwd, int *region) {
    for (int i = 0; i + 1 < nfwd; i++) {
        if (!op_get(g->n[i].op)->recompute || region[i] >= 0 || region[i + 1] >= 0 || !op_get(g->n[i + 1].op)->ew) continue;
        int t = g->n[i].out[0], readers = 0, next_reads = 0;
        if (t == g->loss) continue;
        for (int u = 0; u < g->nt; u++)
            if (u != t && g->t[u].base == t) readers += 2;         /* viewed: leave it alone */
        for (int j = 0; j < nfwd; j++)
            for (int q = 0; q < g->n[j].nin; q++)
                if (g->n[j].in[q] == t) {
                    readers++;
                    next_reads |= j == i + 1;
                }
        if (readers == 1 && next_reads) region[i] = region[i + 1] = g->nsc + i;
    }
}

int ir_autodiff(ir_graph *g) {
    if (g->loss < 0) {
        snprintf(g->err, sizeof g->err, "the model has no loss");
        return -1;
    }
    ad_state s = {.g = g, .nt0 = g->nt};
    s.contrib = calloc((size_t)g->nt, sizeof *s.contrib);
    int rc = -1;
    int nfwd = g->nn;
    g->backward_start = nfwd;
    int *root = recompute_roots(g);
    int *region = malloc(sizeof(int) * (size_t)(nfwd ? nfwd : 1));
    for (int i = 0; i < nfwd; i++) region[i] = root[g->n[i].scope];
    free(root);
    mark_gate_recompute(g, nfwd, region);
    recomp rc_state = {.a = 1, .b = 0, .map = malloc(sizeof(int) * (size_t)(s.nt0 ? s.nt0 : 1))};
    for (int i = 0; i < s.nt0; i++) rc_state.map[i] = -1;
    int seed_scope = g->t[g->loss].scope;
    ir_scope_set(g, seed_scope);
    {
        long ia[IR_MAX_IATTR] = {g->t[g->loss].shape.ndim};
        for (int i = 0; i < g->t[g->loss].shape.ndim; i++) ia[1 + i] = g->t[g->loss].shape.d[i];
        double fa[IR_MAX_FATTR] = {1.0};
        int seed;
        if (ir_emit(g, "fill", NULL, 0, ia, fa, &seed) < 0) goto done;
        push(&s.contrib[g->loss], seed);
        count_use(&s, seed);
    }
    for (int i = nfwd - 1; i >= 0; i--) {
        const ir_node n = g->n[i];
        const op_def *d = op_get(n.op);
        int dout[IR_MAX_IO], any = 0;
        for (int k = 0; k < n.nout; k++) {
            dout[k] = gather(&s, n.out[k]);
            if (dout[k] == -2) goto done;
            any |= dout[k] >= 0;
        }
        if (!any) continue;
        if (!d->grad) {
            snprintf(g->err, sizeof g->err, "primitive '%s' has no gradient", d->name);
            goto done;
        }
        int re = region[i] >= 0;
        if (re && !(i >= rc_state.a && i <= rc_state.b)) {
            /* first node of a new segment reached (from its end): recompute the whole run */
            rc_state.b = i;
            rc_state.a = i;
            while (rc_state.a > 0 && region[rc_state.a - 1] == region[i]) rc_state.a--;
            if (emit_recompute(g, &rc_state) < 0) goto done;
        }
        ir_scope_set(g, n.scope);
        int din[IR_MAX_IO];
        for (int k = 0; k < IR_MAX_IO; k++) din[k] = -1;
        if (re) {
            /* the rule reads the node's tensors through g->n[i]: show it the copies */
            for (int k = 0; k < n.nin; k++) g->n[i].in[k] = remap(g, &rc_state, n.in[k]);
            for (int k = 0; k < n.nout; k++) g->n[i].out[k] = remap(g, &rc_state, n.out[k]);
        }
        int grc = d->grad(g, i, dout, din);
        if (re) {
            memcpy(g->n[i].in, n.in, sizeof n.in);
            memcpy(g->n[i].out, n.out, sizeof n.out);
        }
        if (grc < 0) goto done;
        for (int k = 0; k < n.nin; k++) {
            if (din[k] < 0 || !needs_grad(g, n.in[k])) continue;
            push(&s.contrib[n.in[k]], din[k]);
            count_use(&s, din[k]);
        }
    }
    for (int p = 0; p < s.nt0; p++) {
        if (g->t[p].role != ROLE_PARAM || g->t[p].base != p) continue;
        ir_scope_set(g, g->t[p].scope);
        int gp = gather(&s, p);
        if (gp == -2) goto done;
        if (gp < 0 && (gp = fill_zero(g, &g->t[p].shape)) == -2) goto done;  /* unused parameter */
        g->t[p].grad = gp;
    }
    ir_scope_set(g, 0);
    rc = 0;
done:
    free(region);
    free(rc_state.map);
    for (int i = 0; i < s.nt0; i++) free(s.contrib[i].v);
    free(s.contrib);
    free(s.uses);
    return rc;
}
