#include "frontend.h"
#include "embedded_lua.h"
#include "op.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A model file is untrusted input: bound its memory and running time. */
#define FE_MEM_LIMIT (512u << 20)
#define FE_INSTR_LIMIT 50000000L

typedef struct {
    ir_graph *g;
    int step;                /* building the decode step graph (g.mode == "step") */
    int prefill;             /* building the prefill graph (g.mode == "prefill") */
    const char *chunk;       /* model path as shown in messages */
    char origin[300];        /* "file:line" of the block being built, set by the library */
    int last_line;           /* last line of the model file that ran (survives tail calls) */
    size_t mem;
    long instr;
} fe_ctx;

typedef struct {
    fe_ctx *fe;
    int id;
} lua_tensor;

static void *fe_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    fe_ctx *fe = ud;
    if (!ptr) osize = 0;
    if (nsize == 0) {
        fe->mem -= osize;
        free(ptr);
        return NULL;
    }
    if (fe->mem - osize + nsize > FE_MEM_LIMIT) return NULL;
    void *p = realloc(ptr, nsize);
    if (p) fe->mem = fe->mem - osize + nsize;
    return p;
}

static fe_ctx *get_fe(lua_State *L) {
    void *ud;
    lua_getallocf(L, &ud);
    return ud;
}

static int fe_error(lua_State *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void count_hook(lua_State *L, lua_Debug *ar) {
    fe_ctx *fe = get_fe(L);
    if (ar->event == LUA_HOOKLINE) {
        /* `return nn.model { ... }` is a tail call: the model file's frame is gone by the time
         * the library checks its arguments, so remember where the file last was. */
        if (lua_getinfo(L, "S", ar) && ar->source[0] == '@' && strcmp(ar->source + 1, fe->chunk) == 0)
            fe->last_line = ar->currentline;
        return;
    }
    fe->instr += 100000;
    if (fe->instr > FE_INSTR_LIMIT) fe_error(L, "model file ran too long (infinite loop?)");
}

/* Where to blame an error: the innermost frame in the model file; else the block the library
 * is building; else the innermost Lua frame. */
static void error_location(lua_State *L, char *buf, size_t len) {
    fe_ctx *fe = get_fe(L);
    lua_Debug ar;
    for (int lv = 0; lua_getstack(L, lv, &ar); lv++) {
        lua_getinfo(L, "Sl", &ar);
        if (ar.currentline > 0 && ar.source[0] == '@' && strcmp(ar.source + 1, fe->chunk) == 0) {
            snprintf(buf, len, "%s:%d", fe->chunk, ar.currentline);
            return;
        }
    }
    if (fe->origin[0]) {
        snprintf(buf, len, "%s", fe->origin);
        return;
    }
    /* Nothing of the file is on the stack (it has returned, or tail-called the library). */
    snprintf(buf, len, "%s:%d", fe->chunk, fe->last_line > 0 ? fe->last_line : 1);
}

static int fe_error(lua_State *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fe_error(lua_State *L, const char *fmt, ...) {
    char loc[400], msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    error_location(L, loc, sizeof loc);
    lua_pushfstring(L, "%s: %s", loc, msg);
    return lua_error(L);
}

/* ---- tensors ---- */

static const char *TENSOR_MT = "realm.tensor";

static void push_tensor(lua_State *L, fe_ctx *fe, int id) {
    lua_tensor *t = lua_newuserdatauv(L, sizeof *t, 0);
    t->fe = fe;
    t->id = id;
    luaL_setmetatable(L, TENSOR_MT);
}

static int check_tensor(lua_State *L, int idx, const char *what) {
    lua_tensor *t = luaL_testudata(L, idx, TENSOR_MT);
    if (!t) fe_error(L, "%s must be a tensor, got %s", what, luaL_typename(L, idx));
    return t->id;
}

/* A size: a positive integer that fits the IR. */
static int check_size(lua_State *L, int idx, const char *what) {
    if (!lua_isnumber(L, idx)) fe_error(L, "%s must be a number, got %s", what, luaL_typename(L, idx));
    int isint = 0;
    lua_Integer v = lua_tointegerx(L, idx, &isint);
    if (!isint) fe_error(L, "%s must be an integer, got %s", what, lua_tostring(L, idx));
    if (v <= 0 || v > (1 << 30)) fe_error(L, "%s must be positive, got %lld", what, (long long)v);
    return (int)v;
}

static ir_shape feature_shape_arg(lua_State *L, int idx, const char *what) {
    if (!lua_istable(L, idx)) fe_error(L, "%s must be a table of sizes", what);
    ir_shape s = {0};
    int n = (int)luaL_len(L, idx);
    if (n < 1 || n > IR_MAX_DIMS) fe_error(L, "%s must have 1 to %d sizes", what, IR_MAX_DIMS);
    for (int i = 1; i <= n; i++) {
        lua_geti(L, idx, i);
        s.d[s.ndim++] = check_size(L, -1, what);
        lua_pop(L, 1);
    }
    return s;
}

static int t_add(lua_State *L);
static int t_mul(lua_State *L);

static int binary(lua_State *L, const char *op) {
    lua_tensor *a = luaL_testudata(L, 1, TENSOR_MT), *b = luaL_testudata(L, 2, TENSOR_MT);
    if (!a || !b) fe_error(L, "'%s' needs two tensors", op);
    int in[2] = {a->id, b->id}, out;
    if (ir_emit(a->fe->g, op, in, 2, NULL, NULL, &out) < 0) fe_error(L, "%s", a->fe->g->err);
    push_tensor(L, a->fe, out);
    return 1;
}
static int t_add(lua_State *L) { return binary(L, "add"); }
static int t_mul(lua_State *L) { return binary(L, "mul"); }

static void push_shape(lua_State *L, const ir_shape *s) {
    lua_createtable(L, s->ndim, 0);
    for (int i = 0; i < s->ndim; i++) {
        if (s->d[i] == DIM_B) lua_pushliteral(L, "B");
        else if (s->d[i] == DIM_S) lua_pushliteral(L, "S");
        else lua_pushinteger(L, s->d[i]);
        lua_seti(L, -2, i + 1);
    }
}

static int t_tostring(lua_State *L) {
    lua_tensor *t = luaL_checkudata(L, 1, TENSOR_MT);
    char s[96];
    ir_shape_str(&t->fe->g->t[t->id].shape, s, sizeof s);
    lua_pushfstring(L, "tensor%s", s);
    return 1;
}

static int t_shape(lua_State *L) {
    lua_tensor *t = luaL_checkudata(L, 1, TENSOR_MT);
    push_shape(L, &t->fe->g->t[t->id].shape);
    return 1;
}

static int t_dim(lua_State *L) {
    lua_tensor *t = luaL_checkudata(L, 1, TENSOR_MT);
    const ir_shape *s = &t->fe->g->t[t->id].shape;
    lua_pushinteger(L, s->ndim ? s->d[s->ndim - 1] : 1);
    return 1;
}

/* ---- the graph object ---- */

static const char *GRAPH_MT = "realm.graph";

static fe_ctx *check_graph(lua_State *L) {
    fe_ctx **p = luaL_testudata(L, 1, GRAPH_MT);
    if (!p) fe_error(L, "expected the graph as first argument (use g:method(...))");
    return *p;
}

/* g:param(name, {dims}, init) ; init = "ones" | "zeros" | {"normal", std} | {"const", v}
 *                                     | {"dt_bias", lo, hi, floor} */
static int g_param(lua_State *L) {
    fe_ctx *fe = check_graph(L);
    ir_graph *g = fe->g;
    const char *name = luaL_checkstring(L, 2);
    ir_shape s = feature_shape_arg(L, 3, "parameter shape");
    char full[512];
    const char *scope = g->sc[g->cur_scope].path;
    if (scope[0]) snprintf(full, sizeof full, "%s.%s", scope, name);
    else snprintf(full, sizeof full, "%s", name);
    if (strlen(full) >= sizeof g->t[0].name) fe_error(L, "parameter name '%s' is too long", full);
    for (int i = 0; i < g->nt; i++)
        if (g->t[i].role == ROLE_PARAM && strcmp(g->t[i].name, full) == 0)
            fe_error(L, "parameter '%s' defined twice", full);
    int id = ir_tensor_new(g, full, s, DT_F32, ROLE_PARAM);
    ir_tensor *t = &g->t[id];
    t->init = INIT_NORMAL;
    t->init_a = 0.02;
    if (lua_type(L, 4) == LUA_TSTRING) {
        const char *k = lua_tostring(L, 4);
        if (strcmp(k, "ones") == 0) t->init = INIT_ONES;
        else if (strcmp(k, "zeros") == 0) t->init = INIT_ZEROS;
        else fe_error(L, "unknown initialiser '%s'", k);
    } else if (lua_istable(L, 4)) {
        lua_geti(L, 4, 1);
        const char *k = lua_tostring(L, -1);
        lua_pop(L, 1);
        double a[3] = {0, 0, 0};
        for (int i = 0; i < 3; i++) {
            lua_geti(L, 4, i + 2);
            a[i] = lua_tonumber(L, -1);
            lua_pop(L, 1);
        }
        if (k && strcmp(k, "normal") == 0) t->init_a = a[0];
        else if (k && strcmp(k, "const") == 0) t->init = INIT_CONST, t->init_a = a[0];
        else if (k && strcmp(k, "dt_bias") == 0) {
            if (!(a[0] > 0 && a[1] >= a[0])) fe_error(L, "dt_bias init needs 0 < lo <= hi");
            t->init = INIT_DT_BIAS, t->init_a = a[0], t->init_b = a[1], t->init_floor = a[2];
        } else fe_error(L, "unknown initialiser '%s'", k ? k : "?");
    } else if (!lua_isnoneornil(L, 4)) {
        fe_error(L, "initialiser must be a string or a table");
    }
    push_tensor(L, fe, id);
    return 1;
}

/* g:split(x, {n1, n2, ...}) -> views along the last dim */
static int g_split(lua_State *L) {
    fe_ctx *fe = check_graph(L);
    int x = check_tensor(L, 2, "split input");
    const ir_shape s = fe->g->t[x].shape;
    if (s.ndim == 0 || ir_ntok_dims(&s) == s.ndim) fe_error(L, "split needs a feature dim");
    luaL_checktype(L, 3, LUA_TTABLE);
    int n = (int)luaL_len(L, 3);
    if (n < 1) fe_error(L, "split needs at least one size");
    long total = 0, stride = s.ndim - 1 > ir_ntok_dims(&s) ? ir_feat(&s) / s.d[s.ndim - 1] : 1;
    if (stride != 1) fe_error(L, "split works on tensors with one feature dim");
    luaL_checkstack(L, n, "too many parts");
    int first = lua_gettop(L) + 1;
    for (int i = 1; i <= n; i++) {
        lua_geti(L, 3, i);
        int sz = check_size(L, -1, "split size");
        lua_pop(L, 1);
        ir_shape vs = s;
        vs.d[s.ndim - 1] = sz;
        if (total + sz > s.d[s.ndim - 1]) break;
        push_tensor(L, fe, ir_view(fe->g, x, vs, total, NULL));
        total += sz;
    }
    if (total != s.d[s.ndim - 1])
        fe_error(L, "split sizes add up to %ld but the tensor has %d features",
                 total, s.d[s.ndim - 1]);
    return lua_gettop(L) - first + 1;
}

/* g:reshape(x, {feature dims}) keeps the batch/sequence dims */
static int g_reshape(lua_State *L) {
    fe_ctx *fe = check_graph(L);
    int x = check_tensor(L, 2, "reshape input");
    const ir_shape s = fe->g->t[x].shape;
    ir_shape f = feature_shape_arg(L, 3, "reshape sizes");
    int nt = ir_ntok_dims(&s);
    if (nt + f.ndim > IR_MAX_DIMS) fe_error(L, "too many dims");
    ir_shape r = {.ndim = nt + f.ndim};
    for (int i = 0; i < nt; i++) r.d[i] = s.d[i];
    for (int i = 0; i < f.ndim; i++) r.d[nt + i] = f.d[i];
    if (ir_feat(&r) != ir_feat(&s))
        fe_error(L, "reshape changes the number of features (%ld -> %ld)", ir_feat(&s), ir_feat(&r));
    push_tensor(L, fe, ir_view(fe->g, x, r, 0, NULL));
    return 1;
}

static int g_shape(lua_State *L) {
    check_graph(L);
    lua_settop(L, 2);
    check_tensor(L, 2, "shape argument");
    lua_remove(L, 1);
    return t_shape(L);
}

static int g_dim(lua_State *L) {
    check_graph(L);
    check_tensor(L, 2, "dim argument");
    lua_remove(L, 1);
    return t_dim(L);
}

/* g:scope(name, kind, fn, ...) runs fn(...) with parameters named under `name` */
static int g_scope(lua_State *L) {
    fe_ctx *fe = check_graph(L);
    const char *name = luaL_checkstring(L, 2);
    const char *kind = luaL_optstring(L, 3, "");
    luaL_checktype(L, 4, LUA_TFUNCTION);
    int prev = ir_scope_push(fe->g, name, kind);
    int base = 4, nargs = lua_gettop(L) - base;
    lua_call(L, nargs, LUA_MULTRET);
    ir_scope_set(fe->g, prev);
    return lua_gettop(L) - base + 1;
}

/* g:recompute() marks the current scope: its activations are recomputed in the backward pass
 * rather than kept (the block's `recompute = true` in a model file). */
static int g_recompute(lua_State *L) {
    fe_ctx *fe = check_graph(L);
    fe->g->sc[fe->g->cur_scope].recompute = lua_isnone(L, 2) ? 1 : lua_toboolean(L, 2);
    return 0;
}

/* g:state(name, {dims}) -> a recurrent state tensor [B, dims...] named under the current
 * scope (ROLE_STATE: persistent in the arena, zeroed by the decoder at a reset). Only in the
 * step graph, and in the prefill graph, which writes the states the step graph starts from
 * (same names, same shapes): the training graph has no state. */
static int g_state(lua_State *L) {
    fe_ctx *fe = check_graph(L);
    ir_graph *g = fe->g;
    if (!fe->step && !fe->prefill) fe_error(L, "g:state is only available when g.mode is \"step\" or \"prefill\"");
    const char *name = luaL_checkstring(L, 2);
    ir_shape f = feature_shape_arg(L, 3, "state shape");
    if (f.ndim + 1 > IR_MAX_DIMS) fe_error(L, "state shape has too many dims");
    ir_shape s = {.ndim = f.ndim + 1};
    s.d[0] = DIM_B;
    for (int i = 0; i < f.ndim; i++) s.d[i + 1] = f.d[i];
    char full[512];
    const char *scope = g->sc[g->cur_scope].path;
    if (scope[0]) snprintf(full, sizeof full, "%s.%s", scope, name);
    else snprintf(full, sizeof full, "%s", name);
    if (strlen(full) >= sizeof g->t[0].name) fe_error(L, "state name '%s' is too long", full);
    for (int i = 0; i < g->nt; i++)
        if (g->t[i].role == ROLE_STATE && strcmp(g->t[i].name, full) == 0)
            fe_error(L, "state '%s' defined twice", full);
    int id = ir_tensor_new(g, full, s, DT_F32, ROLE_STATE);
    g->t[id].init = INIT_ZEROS;
    push_tensor(L, fe, id);
    return 1;
}

/* g:assign(state, value): `value` (the new state computed by a node) is stored in place over
 * `state`, so the next step reads it (the same retargeting the optimizer uses for AdamW). */
static int g_assign(lua_State *L) {
    fe_ctx *fe = check_graph(L);
    ir_graph *g = fe->g;
    int st = check_tensor(L, 2, "assign target");
    int v = check_tensor(L, 3, "assign value");
    if (g->t[st].role != ROLE_STATE || ir_is_view(g, st)) fe_error(L, "assign target must be a state tensor (g:state)");
    if (!ir_shape_eq(&g->t[st].shape, &g->t[v].shape)) {
        char a[96], b[96];
        ir_shape_str(&g->t[st].shape, a, sizeof a);
        ir_shape_str(&g->t[v].shape, b, sizeof b);
        fe_error(L, "assign: state %s and value %s differ in shape", a, b);
    }
    if (g->t[v].producer < 0 || ir_is_view(g, v)) fe_error(L, "assign value must be the direct output of an operation");
    for (int i = 0; i < g->nt; i++)
        if (i != v && g->t[i].base == v) fe_error(L, "assign value must not have views (assign before splitting it)");
    ir_retarget(g, v, st, 0);
    return 0;
}

/* g:origin("file:line") names the block being built, for errors raised outside the model file */
static int g_origin(lua_State *L) {
    fe_ctx *fe = check_graph(L);
    snprintf(fe->origin, sizeof fe->origin, "%s", luaL_optstring(L, 2, ""));
    return 0;
}

/* Every registered primitive is callable as g:NAME(inputs..., {attributes}). */
static int g_primitive(lua_State *L) {
    fe_ctx *fe = check_graph(L);
    int opid = (int)lua_tointeger(L, lua_upvalueindex(1));
    const op_def *d = op_get(opid);
    int top = lua_gettop(L);
    int has_attrs = top >= 2 && lua_istable(L, top) && !luaL_testudata(L, top, TENSOR_MT);
    int nin = top - 1 - has_attrs;
    if ((d->nin >= 0 && nin != d->nin) || (d->nin < 0 && nin < -d->nin) || nin > IR_MAX_IO)
        fe_error(L, "%s takes %s%d tensor argument%s, got %d", d->name, d->nin < 0 ? "at least " : "",
                 d->nin < 0 ? -d->nin : d->nin, d->nin == 1 ? "" : "s", nin);
    int in[IR_MAX_IO];
    for (int i = 0; i < nin; i++) {
        char what[64];
        snprintf(what, sizeof what, "%s argument %d", d->name, i + 1);
        in[i] = check_tensor(L, 2 + i, what);
    }
    long ia[IR_MAX_IATTR];
    double fa[IR_MAX_FATTR];
    memcpy(ia, d->ia_default, sizeof ia);
    memcpy(fa, d->fa_default, sizeof fa);
    if (has_attrs) {
        lua_pushnil(L);
        while (lua_next(L, top)) {
            if (lua_type(L, -2) != LUA_TSTRING) fe_error(L, "%s: attribute names must be strings", d->name);
            const char *k = lua_tostring(L, -2);
            int found = 0;
            for (int i = 0; d->iattr[i]; i++)
                if (strcmp(d->iattr[i], k) == 0) {
                    int isint = 0;
                    lua_Integer v = lua_tointegerx(L, -1, &isint);
                    if (!isint) fe_error(L, "%s: attribute '%s' must be an integer", d->name, k);
                    ia[i] = (long)v;
                    found = 1;
                }
            for (int i = 0; !found && d->fattr[i]; i++)
                if (strcmp(d->fattr[i], k) == 0) {
                    if (!lua_isnumber(L, -1)) fe_error(L, "%s: attribute '%s' must be a number", d->name, k);
                    fa[i] = lua_tonumber(L, -1);
                    found = 1;
                }
            if (!found) fe_error(L, "%s: unknown attribute '%s'", d->name, k);
            lua_pop(L, 1);
        }
    }
    int node = ir_node_add(fe->g, opid, in, nin, ia, fa);
    if (node < 0) fe_error(L, "%s", fe->g->err);
    const ir_node *n = &fe->g->n[node];
    for (int i = 0; i < n->nout; i++) push_tensor(L, fe, n->out[i]);
    return n->nout;
}

static void push_graph(lua_State *L, fe_ctx *fe) {
    fe_ctx **p = lua_newuserdatauv(L, sizeof *p, 0);
    *p = fe;
    if (luaL_newmetatable(L, GRAPH_MT)) {
        lua_newtable(L);
        static const luaL_Reg m[] = {{"param", g_param}, {"split", g_split}, {"reshape", g_reshape},
                                     {"shape", g_shape}, {"dim", g_dim},     {"scope", g_scope},
                                     {"origin", g_origin}, {"recompute", g_recompute},
                                     {"state", g_state}, {"assign", g_assign},
                                     {NULL, NULL}};
        luaL_setfuncs(L, m, 0);
        for (int i = 0; i < op_count(); i++) {
            lua_pushinteger(L, i);
            lua_pushcclosure(L, g_primitive, 1);
            lua_setfield(L, -2, op_get(i)->name);
        }
        lua_pushstring(L, fe->step ? "step" : fe->prefill ? "prefill" : "train");
        lua_setfield(L, -2, "mode");
        lua_setfield(L, -2, "__index");
    }
    lua_setmetatable(L, -2);
}

/* ---- sandbox ---- */

/* "path:line" of the model-file line running now (or last run): where a block is declared. */
static int model_location(lua_State *L) {
    char loc[400];
    fe_ctx *fe = get_fe(L);
    const char *o = fe->origin;
    char saved[sizeof fe->origin];
    memcpy(saved, o, sizeof saved);
    fe->origin[0] = 0;
    error_location(L, loc, sizeof loc);
    memcpy(fe->origin, saved, sizeof saved);
    lua_pushstring(L, loc);
    return 1;
}

static const char *const SAFE_GLOBALS[] = {"assert", "error", "ipairs", "next", "pairs", "pcall", "select",
                                           "tonumber", "tostring", "type", "xpcall", "setmetatable",
                                           "getmetatable", "rawequal", "rawget", "rawset", "rawlen",
                                           "math", "string", "table", "utf8", NULL};

static void push_env(lua_State *L, int with_debug) {
    lua_newtable(L);
    for (int i = 0; SAFE_GLOBALS[i]; i++) {
        lua_getglobal(L, SAFE_GLOBALS[i]);
        lua_setfield(L, -2, SAFE_GLOBALS[i]);
    }
    if (with_debug) {     /* the library records where blocks are declared */
        lua_pushcfunction(L, model_location);
        lua_setfield(L, -2, "model_location");
    }
}

static int lib_require(lua_State *L) {
    const char *mod = luaL_checkstring(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, "realm.loaded");
    if (lua_getfield(L, -1, mod) != LUA_TNIL) return 1;
    lua_pop(L, 1);
    for (const lualib_file *f = realm_lualib; f->module; f++) {
        if (strcmp(f->module, mod) != 0) continue;
        char chunk[256];
        snprintf(chunk, sizeof chunk, "@%s", f->path);
        if (luaL_loadbufferx(L, f->src, f->len, chunk, "t") != LUA_OK) return lua_error(L);
        push_env(L, 1);
        lua_pushcfunction(L, lib_require);
        lua_setfield(L, -2, "require");
        lua_setupvalue(L, -2, 1);
        lua_call(L, 0, 1);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushboolean(L, 1);
        }
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, mod);
        return 1;
    }
    return fe_error(L, "module '%s' not found (model files may require only the realm block library)", mod);
}

/* ---- building ---- */

static void one_line(char *s) {
    for (; *s; s++)
        if (*s == '\n' || *s == '\r' || *s == '\t') *s = ' ';
}

static int field_int(lua_State *L, int idx, const char *k, int *out) {
    int ok = lua_getfield(L, idx, k) == LUA_TNUMBER && lua_isinteger(L, -1);
    if (ok) *out = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return ok;
}

static double field_num(lua_State *L, int idx, const char *k, double dflt) {
    double v = lua_getfield(L, idx, k) == LUA_TNUMBER ? lua_tonumber(L, -1) : dflt;
    lua_pop(L, 1);
    return v;
}

/* Runs inside lua_pcall: stack has the model table at index 1. */
static int build_model(lua_State *L) {
    fe_ctx *fe = get_fe(L);
    realm_model *m = lua_touserdata(L, lua_upvalueindex(1));
    if (!lua_istable(L, 1)) fe_error(L, "the model file must return a model (nn.model { ... })");
    if (lua_getfield(L, 1, "name") == LUA_TSTRING) snprintf(m->name, sizeof m->name, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    if (!field_int(L, 1, "vocab", &m->vocab) || !field_int(L, 1, "d_model", &m->d_model))
        fe_error(L, "the model table needs integer fields vocab and d_model (use nn.model)");
    field_int(L, 1, "n_layers", &m->n_layers);
    train_config *tc = &m->train;
    if (lua_getfield(L, 1, "train") == LUA_TTABLE) {
        int t = lua_gettop(L);
        tc->lr = field_num(L, t, "lr", tc->lr);
        tc->min_lr_frac = field_num(L, t, "min_lr_frac", tc->min_lr_frac);
        tc->weight_decay = field_num(L, t, "weight_decay", tc->weight_decay);
        tc->beta1 = field_num(L, t, "beta1", tc->beta1);
        tc->beta2 = field_num(L, t, "beta2", tc->beta2);
        tc->adam_eps = field_num(L, t, "eps", tc->adam_eps);
        tc->grad_clip = field_num(L, t, "grad_clip", tc->grad_clip);
        tc->warmup = (long)field_num(L, t, "warmup", (double)tc->warmup);
        tc->steps = (long)field_num(L, t, "steps", (double)tc->steps);
        tc->batch = (long)field_num(L, t, "batch", (double)tc->batch);
        tc->seq = (long)field_num(L, t, "seq", (double)tc->seq);
        tc->eval_every = (long)field_num(L, t, "eval_every", (double)tc->eval_every);
        tc->save_every = (long)field_num(L, t, "save_every", (double)tc->save_every);
        if (lua_getfield(L, t, "schedule") == LUA_TSTRING)
            snprintf(tc->schedule, sizeof tc->schedule, "%s", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "forward") != LUA_TFUNCTION) fe_error(L, "the model table has no forward function");
    ir_graph *g = fe->g;
    int tok_shape[2] = {DIM_B, DIM_S};
    m->tokens = ir_tensor_new(g, "tokens", ir_shape_make(2, tok_shape), DT_I32, ROLE_INPUT);
    /* positions: each token's absolute position, in the step graph and in the prefill graph
     * (which may continue a state at any position) */
    if (fe->step || fe->prefill)
        m->positions = ir_tensor_new(g, "positions", ir_shape_make(2, tok_shape), DT_I32, ROLE_INPUT);
    else m->targets = ir_tensor_new(g, "targets", ir_shape_make(2, tok_shape), DT_I32, ROLE_INPUT);
    push_graph(L, fe);
    push_tensor(L, fe, m->tokens);
    if (m->positions >= 0) push_tensor(L, fe, m->positions);
    lua_call(L, m->positions >= 0 ? 3 : 2, 1);
    fe->origin[0] = 0;
    lua_tensor *lt = luaL_testudata(L, -1, TENSOR_MT);
    if (!lt) fe_error(L, "forward must return the logits tensor");
    const ir_shape *ls = &g->t[lt->id].shape;
    if (ls->ndim != 3 || ls->d[0] != DIM_B || ls->d[1] != DIM_S || ls->d[2] != m->vocab) {
        char s[96];
        ir_shape_str(ls, s, sizeof s);
        fe_error(L, "forward returned logits of shape %s, expected [B,S,%d]", s, m->vocab);
    }
    m->logits = lt->id;
    if (fe->step) {
        /* The sampling tail: the chosen byte and position + 1 land in place in the inputs, so
         * the next step needs nothing from the host. */
        ir_scope_set(g, 0);
        int prev = ir_scope_push(g, "sample", "sample");
        m->sampling = ir_tensor_new(g, "sampling", ir_shape_make(2, (int[]){DIM_B, 8}), DT_F32, ROLE_INPUT);
        m->sample_node = g->nn;
        int in[3] = {m->logits, m->positions, m->sampling}, out[2];
        if (ir_emit(g, "sample", in, 3, NULL, NULL, out) < 0) fe_error(L, "%s", g->err);
        ir_retarget(g, out[0], m->tokens, 0);
        ir_retarget(g, out[1], m->positions, 0);
        ir_scope_set(g, prev);
        g->loss = -1;
        return 0;
    }
    if (fe->prefill) {
        g->loss = -1;   /* the logits, and the states the block library assigned, are the outputs */
        return 0;
    }
    int prev = ir_scope_push(g, "loss", "loss");
    int in[2] = {m->logits, m->targets}, out[IR_MAX_IO];   /* out[1]: per-row losses (workspace) */
    if (ir_emit(g, "cross_entropy", in, 2, NULL, NULL, out) < 0) fe_error(L, "%s", g->err);
    m->loss = out[0];
    ir_scope_set(g, prev);
    g->loss = m->loss;
    return 0;
}

static void default_train(train_config *t) {
    memset(t, 0, sizeof *t);
    t->lr = 3e-3;
    t->min_lr_frac = 0.1;
    t->weight_decay = 0.1;
    t->beta1 = 0.9;
    t->beta2 = 0.95;
    t->adam_eps = 1e-8;
    t->grad_clip = 1.0;
    t->warmup = 100;
    t->steps = 2000;
    t->batch = 16;
    t->seq = 256;
    t->eval_every = 200;
    t->save_every = 200;
    snprintf(t->schedule, sizeof t->schedule, "cosine");
}

/* mode: 0 training, 1 step, 2 prefill */
static int load(const char *src, size_t len, const char *chunkname, int mode, realm_model *m, char *err,
                size_t errlen) {
    memset(m, 0, sizeof *m);
    m->step = mode == 1;
    m->prefill = mode == 2;
    m->positions = m->sampling = m->sample_node = -1;
    snprintf(m->path, sizeof m->path, "%s", chunkname);
    default_train(&m->train);
    m->tokens = m->targets = m->logits = m->loss = -1;
    ir_init_graph(&m->g);
    fe_ctx fe = {.g = &m->g, .chunk = m->path, .step = mode == 1, .prefill = mode == 2};
    lua_State *L = lua_newstate(fe_alloc, &fe);
    if (!L) {
        snprintf(err, errlen, "%s: cannot create a Lua state", chunkname);
        return -1;
    }
    luaL_requiref(L, LUA_GNAME, luaopen_base, 1);
    luaL_requiref(L, LUA_TABLIBNAME, luaopen_table, 1);
    luaL_requiref(L, LUA_STRLIBNAME, luaopen_string, 1);
    luaL_requiref(L, LUA_MATHLIBNAME, luaopen_math, 1);
    luaL_requiref(L, LUA_UTF8LIBNAME, luaopen_utf8, 1);
    luaL_requiref(L, LUA_DBLIBNAME, luaopen_debug, 1);
    lua_settop(L, 0);
    lua_sethook(L, count_hook, LUA_MASKCOUNT | LUA_MASKLINE, 100000);
    luaL_newmetatable(L, TENSOR_MT);
    static const luaL_Reg tm[] = {{"__add", t_add}, {"__mul", t_mul}, {"__tostring", t_tostring}, {NULL, NULL}};
    luaL_setfuncs(L, tm, 0);
    lua_newtable(L);
    lua_pushcfunction(L, t_shape);
    lua_setfield(L, -2, "shape");
    lua_pushcfunction(L, t_dim);
    lua_setfield(L, -2, "dim");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "realm.loaded");

    char chunk[600];
    snprintf(chunk, sizeof chunk, "@%s", chunkname);
    int rc = luaL_loadbufferx(L, src, len, chunk, "t");
    if (rc == LUA_OK) {
        push_env(L, 0);
        lua_pushcfunction(L, lib_require);
        lua_setfield(L, -2, "require");
        lua_setupvalue(L, -2, 1);
        rc = lua_pcall(L, 0, 1, 0);
    }
    if (rc == LUA_OK) {
        lua_pushlightuserdata(L, m);
        lua_pushcclosure(L, build_model, 1);
        lua_insert(L, -2);
        rc = lua_pcall(L, 1, 0, 0);
    }
    if (rc != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        if (rc == LUA_ERRMEM) snprintf(err, errlen, "%s: model file uses too much memory", chunkname);
        else snprintf(err, errlen, "%s", msg ? msg : "unknown error");
        one_line(err);
        lua_close(L);
        ir_free(&m->g);
        return -1;
    }
    lua_close(L);
    return 0;
}

int model_load_string(const char *src, size_t len, const char *chunkname, realm_model *m, char *err,
                      size_t errlen) {
    return load(src, len, chunkname, 0, m, err, errlen);
}

int model_load_step(const char *src, size_t len, const char *chunkname, realm_model *m, char *err, size_t errlen) {
    return load(src, len, chunkname, 1, m, err, errlen);
}

int model_load_prefill(const char *src, size_t len, const char *chunkname, realm_model *m, char *err,
                       size_t errlen) {
    return load(src, len, chunkname, 2, m, err, errlen);
}

/* The model file's text (at most 64 MiB). */
static int read_model_file(const char *path, char **out, size_t *outlen, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: cannot open model file", path);
        return -1;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0, r;
    do {
        if (len + 65536 > cap) {
            cap = cap ? cap * 2 : 65536;
            if (cap > (64u << 20)) {
                fclose(f);
                free(buf);
                snprintf(err, errlen, "%s: model file too large", path);
                return -1;
            }
            buf = realloc(buf, cap);
        }
        r = fread(buf + len, 1, cap - len, f);
        len += r;
    } while (r > 0);
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        snprintf(err, errlen, "%s: read error", path);
        return -1;
    }
    *out = buf;
    *outlen = len;
    return 0;
}

int model_load(const char *path, realm_model *m, char *err, size_t errlen) {
    char *buf;
    size_t len;
    if (read_model_file(path, &buf, &len, err, errlen) < 0) return -1;
    int rc = model_load_string(buf, len, path, m, err, errlen);
    free(buf);
    return rc;
}

int model_probe(const char *path, char **src, size_t *len, train_config *tc, char *err, size_t errlen) {
    if (read_model_file(path, src, len, err, errlen) < 0) return -1;
    realm_model m;
    if (model_load_string(*src, *len, path, &m, err, errlen) < 0) {
        free(*src);
        *src = NULL;
        return -1;
    }
    *tc = m.train;
    model_free(&m);
    return 0;
}

void model_free(realm_model *m) { ir_free(&m->g); }
