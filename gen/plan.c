#include "plan.h"
#include "op.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Iteration space of an elementwise node: its output's token dims and feature count. */
static int same_space(const ir_graph *g, int a, int b) {
    const ir_shape *sa = &g->t[g->n[a].out[0]].shape, *sb = &g->t[g->n[b].out[0]].shape;
    int na = ir_ntok_dims(sa), nb = ir_ntok_dims(sb);
    if (na != nb || ir_feat(sa) != ir_feat(sb)) return 0;
    for (int i = 0; i < na; i++)
        if (sa->d[i] != sb->d[i]) return 0;
    return 1;
}

/* The tensors nodes [n0, n1) of an elementwise chain read from memory: produced before the
 * chain or stored by it (a stored value is still taken from its producer's register), never
 * `src` (a value the enclosing kernel hands over, or -1). */
static int chain_inputs(const plan *p, int n0, int n1, int src, int *ext) {
    const ir_graph *g = p->g;
    int next = 0;
    for (int i = n0; i < n1; i++)
        for (int j = 0; j < g->n[i].nin; j++) {
            int t = g->n[i].in[j], inside = t == src, dup = 0;
            for (int q = n0; q < i; q++) inside |= g->n[q].out[0] == t && !p->stored[t];
            for (int e = 0; e < next; e++) dup |= ext[e] == t;
            if (!inside && !dup && next < KG_MAX_ARGS) ext[next++] = t;
        }
    return next;
}

static int chain_stores(const plan *p, int t) { return p->stored[t] || p->g->t[t].base != t; }

/* Whether tensor t is stored as bf16 (gen/precision.c; kgen refuses it in dialects without
 * the bf16 helpers f2bf and bf2f). */
static int bf16_value(const kgen *k, int t) { return k->g->t[t].dtype == DT_BF16; }

/* The chain at element (tok, f), in two parts so that a caller can issue the loads of several
 * elements before their arithmetic. Loads (phase 1): input `apfx`in<e> into `vpfx`x<e> (0 where
 * `guard`, a C condition or NULL, is false). Values (phase 2): node i's into `vpfx`v<i - n0>,
 * stored ones written to `apfx`out<i - n0>; src's value is `srcval`. */
static void emit_chain(kgen *k, const plan *p, int n0, int n1, const int *ext, int next, int src, const char *srcval,
                       const char *apfx, const char *vpfx, const char *tok, const char *f, const char *guard,
                       int phase) {
    const ir_graph *g = p->g;
    if (phase & 1)
        for (int e = 0; e < next; e++) {
            /* a bf16-stored input (gen/precision.c) widens on load */
            const int h = bf16_value(k, ext[e]);
            if (guard)
                kg_line(k, "const float %sx%d = (%s) ? %s%sin%d[(%s) * %ld + (%s)]%s : 0.0f;", vpfx, e, guard, h ? "bf2f(" : "",
                        apfx, e, tok, kg_ld(k, ext[e]), f, h ? ")" : "");
            else
                kg_line(k, "const float %sx%d = %s%sin%d[(%s) * %ld + (%s)]%s;", vpfx, e, h ? "bf2f(" : "", apfx, e, tok,
                        kg_ld(k, ext[e]), f, h ? ")" : "");
        }
    if (!(phase & 2)) return;
    for (int i = n0; i < n1; i++) {
        const ir_node *n = &g->n[i];
        char names[IR_MAX_IO][48];
        const char *in[IR_MAX_IO];
        for (int j = 0; j < n->nin; j++) {
            int t = n->in[j], found = 0;
            for (int q = i - 1; q >= n0 && !found; q--)
                if (g->n[q].out[0] == t) snprintf(names[j], sizeof names[j], "%sv%d", vpfx, q - n0), found = 1;
            if (!found && t == src) snprintf(names[j], sizeof names[j], "(%s)", srcval), found = 1;
            for (int e = 0; e < next && !found; e++)
                if (ext[e] == t) snprintf(names[j], sizeof names[j], "%sx%d", vpfx, e), found = 1;
            in[j] = names[j];
        }
        strbuf ex = {0};
        op_get(n->op)->ew(&ex, n, in);
        kg_line(k, "const float %sv%d = %s;", vpfx, i - n0, ex.s);
        sb_free(&ex);
        int t = n->out[0];
        if (chain_stores(p, t))
            kg_line(k, bf16_value(k, t) ? "%sout%d[(%s) * %ld + (%s)] = f2bf(%sv%d);" : "%sout%d[(%s) * %ld + (%s)] = %sv%d;",
                    apfx, i - n0, tok, kg_ld(k, t), f, vpfx, i - n0);
    }
}

static void chain_args(kgen *k, const plan *p, int n0, int n1, const int *ext, int next, const char *pfx, int outs) {
    char nm[16];
    if (!outs)
        for (int e = 0; e < next; e++) {
            snprintf(nm, sizeof nm, "%sin%d", pfx, e);
            kg_in(k, nm, ext[e]);
        }
    else
        for (int i = n0; i < n1; i++) {
            int t = p->g->n[i].out[0];
            if (!chain_stores(p, t)) continue;
            snprintf(nm, sizeof nm, "%sout%d", pfx, i - n0);
            kg_out(k, nm, t);
        }
}

void plan_epi_inputs(kgen *k, const plan_epilogue *e) { chain_args(k, e->p, e->n0, e->n1, e->ext, e->next, "e", 0); }

void plan_epi_outputs(kgen *k, const plan_epilogue *e) { chain_args(k, e->p, e->n0, e->n1, e->ext, e->next, "e", 1); }

void plan_epi_loads(kgen *k, const plan_epilogue *e, int u, const char *tok, const char *f, const char *guard) {
    char vp[16];
    snprintf(vp, sizeof vp, "e%d", u);
    emit_chain(k, e->p, e->n0, e->n1, e->ext, e->next, e->src, NULL, "e", vp, tok, f, guard, 1);
}

void plan_epi_values(kgen *k, const plan_epilogue *e, int u, const char *tok, const char *f, const char *val) {
    char vp[16];
    snprintf(vp, sizeof vp, "e%d", u);
    emit_chain(k, e->p, e->n0, e->n1, e->ext, e->next, e->src, val, "e", vp, tok, f, NULL, 2);
}

/* elements a thread of a fused elementwise kernel (render_fused) */
#define FUSED_U 4

/* Renders nodes [n0, n1) (all elementwise, one iteration space) as one kernel; values that
 * never leave the group stay in registers. */
static int render_fused(plan *p, int n0, int n1) {
    const ir_graph *g = p->g;
    kgen *k = &p->kg;
    char what[48];
    snprintf(what, sizeof what, "%s", n1 - n0 > 1 ? "fused" : op_get(g->n[n0].op)->name);
    kg_begin(k, what, n0, n1);
    int outt = g->n[n0].out[0];
    long feat = ir_feat(&g->t[outt].shape);
    int ext[KG_MAX_ARGS], next = chain_inputs(p, n0, n1, -1, ext);
    chain_args(k, p, n0, n1, ext, next, "", 0);
    chain_args(k, p, n0, n1, ext, next, "", 1);
    const char *ntok = kg_ntok_expr(k, outt);
    /* FUSED_U elements a thread, 256 apart (each load instruction of a warp stays contiguous),
     * all their loads issued before any arithmetic: one element a thread kept too few loads
     * in flight (the Mamba gate product at 8 x 8192 on an H100: 0.27 ms, 1.9 TB/s) */
    kg_line(k, "const long i0 = GID_X * %d + LID_X, n = %s * %ld;", 256 * FUSED_U, ntok, feat);
    char tok[FUSED_U][16], f[FUSED_U][16], ok[FUSED_U][16], vp[FUSED_U][16];
    for (int u = 0; u < FUSED_U; u++) {
        snprintf(tok[u], sizeof tok[u], "tok%d", u);
        snprintf(f[u], sizeof f[u], "f%d", u);
        snprintf(ok[u], sizeof ok[u], "ok%d", u);
        snprintf(vp[u], sizeof vp[u], "u%d", u);
        kg_line(k, "const long i%d = i0 + %d, tok%d = i%d < n ? i%d / %ld : 0, f%d = i%d < n ? i%d %% %ld : 0;", u + 1, 256 * u,
                u, u + 1, u + 1, feat, u, u + 1, u + 1, feat);
        kg_line(k, "const int ok%d = i%d < n;", u, u + 1);
        kg_line(k, "(void)tok%d; (void)f%d;", u, u);
    }
    for (int u = 0; u < FUSED_U; u++) emit_chain(k, p, n0, n1, ext, next, -1, NULL, "", vp[u], tok[u], f[u], ok[u], 1);
    for (int u = 0; u < FUSED_U; u++) {
        kg_line(k, "if (ok%d) {", u);
        emit_chain(k, p, n0, n1, ext, next, -1, NULL, "", vp[u], tok[u], f[u], NULL, 2);
        kg_line(k, "}");
    }
    int nt = kg_tokdims(k, outt);
    const ir_shape *s = &g->t[outt].shape;
    if (nt == 2) kg_grid(k, 0, 0, 0, 0, feat, 256 * FUSED_U);
    else if (nt == 1) kg_grid(k, 0, 0, s->d[0] == DIM_B ? feat : 0, s->d[0] == DIM_S ? feat : 0, 0, 256 * FUSED_U);
    else kg_grid(k, 0, feat, 0, 0, 0, 256 * FUSED_U);
    kg_block(k, 256, 1, 1);
    return kg_end(k);
}

/* Where node i (not elementwise) can take the elementwise nodes after it into its output
 * stage: its template says so, its one output is an owner nobody views (a view would be read
 * from memory by one thread while another thread's block is still writing it), and the nodes
 * after it iterate over that output's space and read it. Returns the end of the group (i + 1:
 * nothing to fuse). */
static int epilogue_end(const ir_graph *g, int i, int node1, const int *aliased) {
    const ir_node *n = &g->n[i];
    const op_def *od = op_get(n->op);
    if (!od->epilogue_ok || n->nout != 1 || !od->epilogue_ok(g, n)) return i + 1;
    int y = n->out[0];
    if (g->t[y].base != y || aliased[y]) return i + 1;
    int j = i + 1, reads = 0;
    while (j < node1 && op_get(g->n[j].op)->ew && same_space(g, i, j)) {
        /* a run that writes into the operands' storage (a view of it) would race with the
         * blocks still reading them: it ends before such a node */
        int clobbers = 0, ob = g->t[g->n[j].out[0]].base;
        for (int q = 0; q < n->nin; q++) clobbers |= g->t[n->in[q]].base == ob;
        if (clobbers) break;
        for (int q = 0; q < g->n[j].nin; q++) reads |= g->n[j].in[q] == y;
        j++;
    }
    return reads ? j : i + 1;
}

/* ---- the side stream ----
 * A parameter's gradient is read only by the optimizer at the end of the step, so the launches
 * that make it (the weight-gradient matmuls and their split-K sums, the norms' weight sums, the
 * scan's parameter sums, the embedding's scatter) hold up nothing in the backward chain. Many
 * of the chain's kernels are latency-bound and leave a multiprocessor partly idle, and every
 * kernel ends in a partial wave; a second stream lets the gradient work fill those gaps (H200,
 * realm-9m at 8 x 8192: 71.35 -> 68.94 ms per step with every such launch unjoined until the
 * end of the step, the bound on what this can give).
 *
 * Launch l is a side launch when it is in the backward and every owner it writes is a
 * parameter's gradient or is touched afterwards only by side launches. The executor issues it
 * on the side stream after the main stream's work so far (its inputs are ready) and makes main
 * launch join[l] wait for it: the first later main launch that shares an owner with l where
 * either writes, or SIDE_LAG launches on, which bounds how long its tensors are kept. Side
 * launches run in order among themselves. The memory plan keeps every owner a side launch
 * touches alive up to join[l] - 1, so no main launch in between is given its bytes: together
 * the schedule has the same hazards as the sequential order and computes the same bits. */
#define SIDE_LAG 24

static int side_schedule(plan *p) {
    const ir_graph *g = p->g;
    const int nl = p->kg.nl, nt = g->nt;
    p->side = calloc((size_t)(nl ? nl : 1), 1);
    p->join = malloc(sizeof(int) * (size_t)(nl ? nl : 1));
    char *pgrad = p->kg.d->side_stream ? calloc((size_t)(nt ? nt : 1), 1) : NULL;
    if (!p->side || !p->join || (p->kg.d->side_stream && !pgrad)) {
        free(pgrad);
        snprintf(p->kg.err, sizeof p->kg.err, "out of memory scheduling the side stream");
        return -1;
    }
    for (int l = 0; l < nl; l++) p->join[l] = -1;
    if (!pgrad) return 0;
    for (int t = 0; t < nt; t++)
        if (g->t[t].role == ROLE_PARAM && g->t[t].grad >= 0) pgrad[g->t[g->t[t].grad].base] = 1;
    for (int l = nl - 1; l >= 0; l--) {
        const plan_launch *L = &p->kg.launches[l];
        if (!g->n[L->node0].backward) break;
        int ok = L->param_grad && L->nout > 0;
        for (int a = L->nin; a < L->nin + L->nout && ok; a++) {
            const int b = g->t[L->arg[a]].base;
            if (pgrad[b]) continue;
            if (p->persist[b]) ok = 0;
            for (int m = l + 1; m < nl && ok; m++) {
                const plan_launch *M = &p->kg.launches[m];
                for (int q = 0; q < M->nargs && ok; q++)
                    if (g->t[M->arg[q]].base == b && !p->side[m]) ok = 0;
            }
        }
        p->side[l] = (char)ok;
    }
    free(pgrad);
    for (int l = 0; l < nl; l++) {
        if (!p->side[l]) continue;
        const plan_launch *L = &p->kg.launches[l];
        int j = l + SIDE_LAG < nl ? l + SIDE_LAG : nl;
        for (int m = l + 1; m < j; m++) {
            if (p->side[m]) continue;
            const plan_launch *M = &p->kg.launches[m];
            int hazard = 0;
            for (int a = 0; a < L->nargs && !hazard; a++)
                for (int q = 0; q < M->nargs && !hazard; q++)
                    hazard = g->t[L->arg[a]].base == g->t[M->arg[q]].base && (a >= L->nin || q >= M->nin);
            if (hazard) j = m;
        }
        p->join[l] = j;
        p->nside++;
        for (int a = 0; a < L->nargs; a++) {
            const int b = g->t[L->arg[a]].base;
            if (p->last[b] < j - 1) p->last[b] = j - 1;
        }
    }
    return 0;
}

int plan_build(plan *p, const ir_graph *g, int node0, int node1, const char *dialect_name, const int *keep,
               int nkeep, char *err, size_t errlen) {
    return plan_build_opts(p, g, node0, node1, dialect_name, keep, nkeep, NULL, err, errlen);
}

int plan_build_opts(plan *p, const ir_graph *g, int node0, int node1, const char *dialect_name, const int *keep,
                    int nkeep, const plan_options *opt, char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    p->g = g;
    p->node0 = node0;
    p->node1 = node1;
    const dialect *d = dialect_find(dialect_name);
    if (!d) {
        snprintf(err, errlen, "no kernel dialect for backend '%s'", dialect_name);
        return -1;
    }
    kg_init(&p->kg, d, g);
    kg_set_bf16(&p->kg, opt && opt->bf16);
    p->kg.shared_max = opt && opt->shared_max > 0 ? opt->shared_max : 160L * 1024;
    p->kg.wgmma = p->kg.bf16 && opt && opt->wgmma;
    int nt = g->nt;
    p->stored = calloc((size_t)nt, 1);
    p->persist = calloc((size_t)nt, 1);
    p->first = malloc(sizeof(int) * (size_t)nt);
    p->last = malloc(sizeof(int) * (size_t)nt);
    for (int i = 0; i < nt; i++) {
        const ir_tensor *t = &g->t[i];
        p->first[i] = p->last[i] = -1;
        if (t->role == ROLE_PARAM || t->role == ROLE_OPT || t->role == ROLE_INPUT || t->role == ROLE_STATE ||
            i == g->loss)
            p->persist[t->base] = 1;
    }
    for (int i = 0; i < nkeep; i++) p->persist[g->t[keep[i]].base] = 1;

    int *aliased = calloc((size_t)nt, sizeof(int));
    for (int t = 0; t < nt; t++)
        if (g->t[t].base != t) aliased[g->t[t].base] = 1;
    /* Fusion groups: maximal runs of consecutive elementwise nodes over one iteration space,
     * either alone or in the output stage of the node before them (epilogue_end). */
    int *group_end = malloc(sizeof(int) * (size_t)(node1 + 1));
    for (int i = node0; i < node1;) {
        int j = i + 1;
        if (op_get(g->n[i].op)->ew)
            while (j < node1 && op_get(g->n[j].op)->ew && same_space(g, i, j)) j++;
        else
            j = epilogue_end(g, i, node1, aliased);
        group_end[i] = j;
        i = j;
    }
    /* A value stays in a register only if it is an owner nobody aliases, read only inside its
     * group, and not needed after the run. */
    for (int i = node0; i < node1;) {
        int j = group_end[i];
        int fused = op_get(g->n[i].op)->ew || j > i + 1;
        for (int a = i; a < j; a++)
            for (int o = 0; o < g->n[a].nout; o++) {
                int t = g->n[a].out[o];
                int outside = 0;
                for (int b = node0; b < node1 && !outside; b++) {
                    if (b >= i && b < j && fused) continue;
                    for (int q = 0; q < g->n[b].nin; q++) outside |= g->n[b].in[q] == t;
                }
                int reg = fused && (op_get(g->n[a].op)->ew || a == i) && !outside && !aliased[t] &&
                          g->t[t].base == t && !p->persist[t];
                p->stored[g->t[t].base] = 1;
                if (reg) {
                    p->stored[t] = 0;
                    p->nfused++;
                }
            }
        i = j;
    }
    for (int t = 0; t < nt; t++)
        if (p->persist[t] && g->t[t].base == t) p->stored[t] = 1;
    /* values flowing in from outside the compiled range live in the arena */
    for (int i = node0; i < node1; i++)
        for (int q = 0; q < g->n[i].nin; q++) {
            int t = g->n[i].in[q], pr = g->t[t].producer;
            if (pr < node0 || pr >= node1) p->stored[g->t[t].base] = 1;
        }
    free(aliased);

    int rc = 0;
    for (int i = node0; i < node1 && rc == 0;) {
        int j = group_end[i];
        const op_def *od = op_get(g->n[i].op);
        plan_epilogue epi = {.p = p, .n0 = i + 1, .n1 = j, .src = g->n[i].out[0]};
        if (!od->ew && j > i + 1) {
            epi.src_stored = p->stored[epi.src];
            epi.next = chain_inputs(p, epi.n0, epi.n1, epi.src, epi.ext);
            p->kg.epi = &epi;
        }
        if (od->ew) {
            if ((rc = render_fused(p, i, j)) < 0)
                snprintf(err, errlen, "%s", p->kg.err[0] ? p->kg.err : "fused kernel failed");
        } else if (!od->emit) {
            snprintf(err, errlen, "primitive '%s' has no kernel template", od->name);
            rc = -1;
        } else if (od->emit(&p->kg, &g->n[i]) < 0) {
            snprintf(err, errlen, "%s: %s", od->name, p->kg.err[0] ? p->kg.err : "kernel template failed");
            rc = -1;
        }
        p->kg.epi = NULL;
        i = j;
    }
    free(group_end);
    if (rc == 0 && p->kg.err[0]) {
        snprintf(err, errlen, "%s", p->kg.err);
        rc = -1;
    }
    if (rc < 0) {
        plan_free(p);
        return -1;
    }
    for (int l = 0; l < p->kg.nl; l++)
        for (int a = 0; a < p->kg.launches[l].nargs; a++) {
            int b = g->t[p->kg.launches[l].arg[a]].base;
            if (p->first[b] < 0) p->first[b] = l;
            p->last[b] = l;
        }
    if (side_schedule(p) < 0) {
        snprintf(err, errlen, "%s", p->kg.err);
        plan_free(p);
        return -1;
    }
    return 0;
}

void plan_free(plan *p) {
    kg_free(&p->kg);
    free(p->stored);
    free(p->persist);
    free(p->first);
    free(p->last);
    free(p->side);
    free(p->join);
    memset(p, 0, sizeof *p);
}

typedef struct {
    int t;
    size_t bytes;
} alloc_req;

static int by_size_desc(const void *a, const void *b) {
    const alloc_req *x = a, *y = b;
    if (x->bytes != y->bytes) return x->bytes < y->bytes ? 1 : -1;
    return x->t - y->t;
}

size_t plan_arena(const plan *p, long B, long S, size_t *offset) {
    const ir_graph *g = p->g;
    int nt = g->nt;
    alloc_req *req = malloc(sizeof *req * (size_t)(nt ? nt : 1));
    int nr = 0;
    for (int t = 0; t < nt; t++) {
        if (offset) offset[t] = (size_t)-1;
        if (g->t[t].base != t || !p->stored[t]) continue;
        if (!p->persist[t] && p->first[t] < 0) continue;      /* never touched by this plan */
        size_t bytes = (size_t)ir_numel(&g->t[t].shape, B, S) * (size_t)ir_dtype_bytes(g->t[t].dtype);
        bytes = (bytes + PLAN_ALIGN - 1) / PLAN_ALIGN * PLAN_ALIGN;
        req[nr++] = (alloc_req){t, bytes ? bytes : PLAN_ALIGN};
    }
    qsort(req, (size_t)nr, sizeof *req, by_size_desc);
    size_t *off = malloc(sizeof *off * (size_t)(nr ? nr : 1));
    size_t total = 0;
    int nl = p->kg.nl;
    for (int i = 0; i < nr; i++) {
        int t = req[i].t;
        int f = p->persist[t] ? 0 : p->first[t], l = p->persist[t] ? nl : p->last[t];
        /* lowest offset clear of every placed tensor whose lifetime overlaps */
        size_t o = 0;
        for (int again = 1; again;) {
            again = 0;
            for (int j = 0; j < i; j++) {
                int u = req[j].t;
                int uf = p->persist[u] ? 0 : p->first[u], ul = p->persist[u] ? nl : p->last[u];
                if (ul < f || uf > l) continue;
                if (o < off[j] + req[j].bytes && off[j] < o + req[i].bytes) {
                    o = off[j] + req[j].bytes;
                    again = 1;
                }
            }
        }
        off[i] = o;
        if (o + req[i].bytes > total) total = o + req[i].bytes;
        if (offset) offset[t] = o;
    }
    free(off);
    free(req);
    return total;
}

const char *plan_mem_cat_name(plan_mem_cat c) {
    static const char *const names[PM_NCAT] = {
        "weights", "gradients", "optimizer moments", "inputs", "saved activations", "forward temporaries",
        "recomputed activations", "backward workspace", "outputs", "packing slack"};
    return c < PM_NCAT ? names[c] : "?";
}

void plan_memory(const plan *p, long B, long S, plan_mem *out) {
    const ir_graph *g = p->g;
    int nt = g->nt, nl = p->kg.nl;
    memset(out, 0, sizeof *out);
    out->arena = plan_arena(p, B, S, NULL);
    char *is_pgrad = calloc((size_t)(nt ? nt : 1), 1);
    for (int t = 0; t < nt; t++)
        if (g->t[t].role == ROLE_PARAM && g->t[t].grad >= 0) is_pgrad[g->t[g->t[t].grad].base] = 1;
    int bwd0 = nl;   /* first launch of the backward */
    for (int l = 0; l < nl && bwd0 == nl; l++)
        if (g->n[p->kg.launches[l].node0].backward) bwd0 = l;
    size_t *delta = calloc((size_t)nl + 2, sizeof *delta);   /* live bytes change at each launch */
    size_t *neg = calloc((size_t)nl + 2, sizeof *neg);
    char *cat = malloc((size_t)(nt ? nt : 1));
    size_t persist = 0;
    for (int t = 0; t < nt; t++) {
        cat[t] = -1;
        /* exactly the tensors plan_arena places, at the sizes it gives them */
        if (g->t[t].base != t || !p->stored[t]) continue;
        if (!p->persist[t] && p->first[t] < 0) continue;
        size_t bytes = (size_t)ir_numel(&g->t[t].shape, B, S) * (size_t)ir_dtype_bytes(g->t[t].dtype);
        bytes = (bytes + PLAN_ALIGN - 1) / PLAN_ALIGN * PLAN_ALIGN;
        if (!bytes) bytes = PLAN_ALIGN;
        const ir_tensor *x = &g->t[t];
        int prod_bwd = x->producer >= 0 && g->n[x->producer].backward;
        plan_mem_cat c;
        if (x->role == ROLE_PARAM) c = PM_WEIGHTS;
        else if (x->role == ROLE_OPT) c = PM_MOMENTS;
        else if (x->role == ROLE_INPUT || x->role == ROLE_STATE) c = PM_INPUTS;
        else if (is_pgrad[t]) c = PM_GRADS;
        else if (p->persist[t]) c = PM_OUTPUTS;
        else if (x->role == ROLE_ACT && !prod_bwd) c = p->last[t] >= bwd0 ? PM_SAVED : PM_FWD_TMP;
        else if (x->role == ROLE_ACT) c = PM_RECOMPUTED;
        else c = PM_BWD_TMP;
        cat[t] = (char)c;
        out->sum[c] += bytes;
        if (p->persist[t]) {
            persist += bytes;
        } else {
            delta[p->first[t]] += bytes;
            neg[p->last[t] + 1] += bytes;
        }
    }
    size_t live = 0, best = 0;
    int at = 0;
    for (int l = 0; l < nl; l++) {
        live += delta[l];
        live -= neg[l];
        if (live > best) best = live, at = l;
    }
    out->peak_launch = at;
    size_t used = 0;
    for (int t = 0; t < nt; t++) {
        if (cat[t] < 0) continue;
        int alive = p->persist[t] || (p->first[t] <= at && at <= p->last[t]);
        if (!alive) continue;
        size_t bytes = (size_t)ir_numel(&g->t[t].shape, B, S) * (size_t)ir_dtype_bytes(g->t[t].dtype);
        bytes = (bytes + PLAN_ALIGN - 1) / PLAN_ALIGN * PLAN_ALIGN;
        if (!bytes) bytes = PLAN_ALIGN;
        out->peak[(int)cat[t]] += bytes;
        used += bytes;
    }
    /* tensors live together occupy disjoint bytes, so used <= arena always */
    out->peak[PM_SLACK] = out->arena >= used ? out->arena - used : 0;
    free(cat);
    free(delta);
    free(neg);
    free(is_pgrad);
}

long plan_elem_offset(const plan *p, const size_t *offset, int t) {
    const ir_tensor *x = &p->g->t[t];
    return (long)(offset[x->base] / (size_t)ir_dtype_bytes(p->g->t[x->base].dtype)) + x->offset;
}

void plan_grid(const plan_launch *l, long B, long S, size_t groups[3]) {
    for (int d = 0; d < 3; d++) {
        const kg_dim *g = &l->grid[d];
        long n = g->c0 + g->cB * B + g->cS * S + g->cBS * B * S;
        groups[d] = (size_t)((n + g->div - 1) / g->div);
        if (groups[d] == 0) groups[d] = 1;
    }
}

void plan_describe(const plan *p, long B, long S, strbuf *out) {
    const ir_graph *g = p->g;
    size_t *off = malloc(sizeof *off * (size_t)g->nt);
    size_t total = plan_arena(p, B, S, off);
    sb_printf(out, "# realm plan: %d launches, %d distinct kernels, %d values fused into registers\n",
              p->kg.nl, p->kg.nbodies, p->nfused);
    sb_printf(out, "# arena at B=%ld S=%ld: %zu bytes\n", B, S, total);
    for (int i = 0; i < p->kg.nl; i++) {
        const plan_launch *l = &p->kg.launches[i];
        size_t gr[3];
        plan_grid(l, B, S, gr);
        sb_printf(out, "launch %d %s nodes [%d,%d) grid %zux%zux%zu block %dx%dx%d", i, l->kernel, l->node0,
                  l->node1, gr[0], gr[1], gr[2], l->block[0], l->block[1], l->block[2]);
        if (l->shmem) sb_printf(out, " shared %ld", l->shmem);
        if (p->side && p->side[i]) sb_printf(out, " side join %d", p->join[i]);
        sb_printf(out, " args");
        for (int a = 0; a < l->nargs; a++)
            sb_printf(out, " %s%s@%ld", a < l->nin ? "in:" : "out:", g->t[l->arg[a]].name,
                      plan_elem_offset(p, off, l->arg[a]));
        sb_printf(out, "\n");
    }
    free(off);
}
