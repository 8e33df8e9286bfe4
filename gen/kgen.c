#include "kgen.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void sb_printf(strbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int need = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (need < 0) return;
    if (b->n + (size_t)need + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 1024;
        while (c < b->n + (size_t)need + 1) c *= 2;
        char *s = realloc(b->s, c);
        if (!s) {
            fprintf(stderr, "realm: out of host memory\n");
            exit(1);
        }
        b->s = s;
        b->cap = c;
    }
    va_start(ap, fmt);
    vsnprintf(b->s + b->n, b->cap - b->n, fmt, ap);
    va_end(ap);
    b->n += (size_t)need;
}

void sb_free(strbuf *b) {
    free(b->s);
    memset(b, 0, sizeof *b);
}

/* ---- dialects: the only place a backend's spelling of a construct appears ---- */

static const kg_spelling opencl_spell[] = {
    {"KERNEL", "__kernel void"},
    {"GLOBAL", "__global"},
    {"LOCAL", "__local"},
    {"LOCAL_PTR", "__local"},
    {"BARRIER()", "barrier(CLK_LOCAL_MEM_FENCE)"},
    {"GID_X", "((long)get_group_id(0))"},
    {"GID_Y", "((long)get_group_id(1))"},
    {"GID_Z", "((long)get_group_id(2))"},
    {"LID_X", "((int)get_local_id(0))"},
    {"LID_Y", "((int)get_local_id(1))"},
    {"LSZ_X", "((int)get_local_size(0))"},
    {"NGRP_X", "((long)get_num_groups(0))"},
    {"EXPF(x)", "exp(x)"},
    {"LOGF(x)", "log(x)"},
    {"SQRTF(x)", "sqrt(x)"},
    {"RSQRTF(x)", "rsqrt(x)"},
    {"TANHF(x)", "tanh(x)"},
    {"SINF(x)", "sin(x)"},
    {"COSF(x)", "cos(x)"},
    {"FABSF(x)", "fabs(x)"},
    {"FMAXF(a,b)", "fmax(a,b)"},
    {"FMINF(a,b)", "fmin(a,b)"},
    {"POWF(a,b)", "pow(a,b)"},
    {"LOG1PF(x)", "log1p(x)"},
    {"INLINE", "inline"},
    {NULL, NULL},
};

static const kg_spelling cuda_spell[] = {
    {"KERNEL", "extern \"C\" __global__ void"},
    {"GLOBAL", ""},
    {"LOCAL", "__shared__"},
    {"LOCAL_PTR", ""},
    {"BARRIER()", "__syncthreads()"},
    {"GID_X", "((long)blockIdx.x)"},
    {"GID_Y", "((long)blockIdx.y)"},
    {"GID_Z", "((long)blockIdx.z)"},
    {"LID_X", "((int)threadIdx.x)"},
    {"LID_Y", "((int)threadIdx.y)"},
    {"LSZ_X", "((int)blockDim.x)"},
    {"NGRP_X", "((long)gridDim.x)"},
    {"EXPF(x)", "expf(x)"},
    {"LOGF(x)", "logf(x)"},
    {"SQRTF(x)", "sqrtf(x)"},
    {"RSQRTF(x)", "rsqrtf(x)"},
    {"TANHF(x)", "tanhf(x)"},
    {"SINF(x)", "realm_sinf(x)"},
    {"COSF(x)", "realm_cosf(x)"},
    {"FABSF(x)", "fabsf(x)"},
    {"FMAXF(a,b)", "fmaxf(a,b)"},
    {"FMINF(a,b)", "fminf(a,b)"},
    {"POWF(a,b)", "powf(a,b)"},
    {"LOG1PF(x)", "log1pf(x)"},
    {"INLINE", "__device__ __forceinline__"},
    {NULL, NULL},
};

/* fp32 -> bf16 with round-to-nearest-even, two at a time: cvt.rn.bf16x2.f32 (sm_80+) puts its
 * first source in the upper half, so `hi` goes first. NaN stays NaN. Written here rather than
 * taken from cuda_bf16.h, which NVRTC does not always find (design §4.6). */
static const char cuda_bf16_prelude[] =
    "INLINE unsigned pack_bf16x2(float lo, float hi) {\n"
    "    unsigned r;\n"
    "    asm(\"cvt.rn.bf16x2.f32 %0, %1, %2;\" : \"=r\"(r) : \"f\"(hi), \"f\"(lo));\n"
    "    return r;\n"
    "}\n"
    "/* D += A B on tensor cores: A 16x16 bf16 (row), B 16x8 bf16 (col), C/D 16x8 fp32 */\n"
    "INLINE void mma_bf16_16816(float *d, const unsigned *a, const unsigned *b) {\n"
    "    asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 \"\n"
    "                 \"{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\"\n"
    "                 : \"+f\"(d[0]), \"+f\"(d[1]), \"+f\"(d[2]), \"+f\"(d[3])\n"
    "                 : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b[0]), \"r\"(b[1]));\n"
    "}\n"
    "/* Asynchronous global -> shared copies (sm_80+): n of the 16 (or 4) bytes are read, the\n"
    " * rest of the destination is zero-filled, so n = 0 zeroes it without touching memory. */\n"
    "INLINE unsigned smem_u32(const void *p) {\n"
    "    unsigned r;\n"
    "    asm(\"{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }\" : \"=r\"(r) : \"l\"(p));\n"
    "    return r;\n"
    "}\n"
    "INLINE void cp_async16(unsigned dst, const float *src, int n) {\n"
    "    asm volatile(\"cp.async.cg.shared.global [%0], [%1], 16, %2;\" :: \"r\"(dst), \"l\"(src), \"r\"(n) : \"memory\");\n"
    "}\n"
    "INLINE void cp_async4(unsigned dst, const float *src, int n) {\n"
    "    asm volatile(\"cp.async.ca.shared.global [%0], [%1], 4, %2;\" :: \"r\"(dst), \"l\"(src), \"r\"(n) : \"memory\");\n"
    "}\n"
    "INLINE void cp_async_commit(void) { asm volatile(\"cp.async.commit_group;\" ::: \"memory\"); }\n"
    "/* wait until at most n committed groups of this thread are still in flight */\n"
    "#define CP_ASYNC_WAIT(n) asm volatile(\"cp.async.wait_group \" #n \";\" ::: \"memory\")\n"
    "/* four 8x8 bf16 matrices; lane l gives row l & 7 of matrix l >> 3 (ldmatrix) */\n"
    "INLINE void ldsm_x4(unsigned *r, const void *p) {\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\"\n"
    "                 : \"=r\"(r[0]), \"=r\"(r[1]), \"=r\"(r[2]), \"=r\"(r[3]) : \"r\"(smem_u32(p)));\n"
    "}\n"
    "INLINE void ldsm_x4_trans(unsigned *r, const void *p) {\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\"\n"
    "                 : \"=r\"(r[0]), \"=r\"(r[1]), \"=r\"(r[2]), \"=r\"(r[3]) : \"r\"(smem_u32(p)));\n"
    "}\n"
    "INLINE void ldsm_x4_trans_at(unsigned *r, unsigned a) {\n"
    "    asm volatile(\"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\"\n"
    "                 : \"=r\"(r[0]), \"=r\"(r[1]), \"=r\"(r[2]), \"=r\"(r[3]) : \"r\"(a));\n"
    "}\n"
    "/* one value to and from bf16 storage (tensors the plan keeps as bf16), nearest even */\n"
    "INLINE unsigned short f2bf(float x) {\n"
    "    unsigned short r;\n"
    "    asm(\"cvt.rn.bf16.f32 %0, %1;\" : \"=h\"(r) : \"f\"(x));\n"
    "    return r;\n"
    "}\n"
    "INLINE float bf2f(unsigned short h) { return __uint_as_float((unsigned)h << 16); }\n"
    "/* the same copies addressed by a shared pointer (overloads) */\n"
    "INLINE void cp_async16(void *dst, const void *src, int n) { cp_async16(smem_u32(dst), (const float *)src, n); }\n"
    "INLINE void cp_async4(void *dst, const void *src, int n) { cp_async4(smem_u32(dst), (const float *)src, n); }\n"
    "#define cp_async_wait(n) asm volatile(\"cp.async.wait_group %0;\" :: \"n\"(n) : \"memory\")\n"
    "/* cos and sin of an angle in [0, 2pi] (the scan's wrapped in-chunk angles) on the\n"
    " * special-function unit, moved to [-pi, pi] where __sincosf's absolute error is at most\n"
    " * 2^-21.4: far under the bf16 rounding of the operands these rotate */\n"
    "INLINE void sincos_wrapped(float x, float *s, float *c) { __sincosf(x > 3.14159265f ? x - 6.28318531f : x, s, c); }\n"
    "/* 2^x and e^x on the special-function unit alone (exp2f and expf add a range reduction or\n"
    " * denormal handling around it): results under 2^-126 flush to zero, the relative error is\n"
    " * about 2^-22 (e^x: plus the rounding of x log2(e), under 2^-17 at |x| = 80). For softmax\n"
    " * weights and decay factors that multiply operands rounded to bf16. */\n"
    "INLINE float exp2_sfu(float x) { float r; asm(\"ex2.approx.ftz.f32 %0, %1;\" : \"=f\"(r) : \"f\"(x)); return r; }\n"
    "INLINE float exp_sfu(float x) { return exp2_sfu(x * 1.44269504f); }\n";

/* sinf and cosf as calls: inlined, each use carries the reduction for huge arguments (a few
 * hundred instructions and a local array), which made the scan's kernels long enough to miss
 * the instruction cache. Same functions, same results. */
static const char cuda_prelude[] =
    "__device__ __noinline__ float realm_sinf(float x) { return sinf(x); }\n"
    "__device__ __noinline__ float realm_cosf(float x) { return cosf(x); }\n";

static const dialect dialects[] = {
    {"opencl", opencl_spell, "", NULL, 0},
    {"cuda", cuda_spell, cuda_prelude, cuda_bf16_prelude, 1},
};

const dialect *dialect_find(const char *name) {
    for (size_t i = 0; i < sizeof dialects / sizeof dialects[0]; i++)
        if (strcmp(dialects[i].name, name) == 0) return &dialects[i];
    return NULL;
}

void kg_init(kgen *k, const dialect *d, const ir_graph *g) {
    memset(k, 0, sizeof *k);
    k->d = d;
    k->g = g;
    sb_printf(&k->src, "/* generated by realm for %s: do not edit */\n", d->name);
    for (const kg_spelling *s = d->spell; s->key; s++) sb_printf(&k->src, "#define %s %s\n", s->key, s->value);
    sb_printf(&k->src, "%s\n", d->prelude);
}

int kg_dialect_has_bf16(const char *name) {
    const dialect *d = dialect_find(name);
    return d && d->bf16_prelude;
}

void kg_set_bf16(kgen *k, int on) {
    k->bf16 = on && k->d->bf16_prelude;
    if (k->bf16) sb_printf(&k->src, "%s\n", k->d->bf16_prelude);
}

void kg_free(kgen *k) {
    sb_free(&k->src);
    sb_free(&k->body);
    sb_free(&k->params);
    for (int i = 0; i < k->nbodies; i++) free(k->bodies[i]);
    free(k->bodies);
    free(k->names);
    free(k->launches);
    memset(k, 0, sizeof *k);
}

void kg_begin(kgen *k, const char *what, int node0, int node1) {
    memset(&k->cur, 0, sizeof k->cur);
    snprintf(k->cur.kernel, sizeof k->cur.kernel, "%.40s", what);
    k->cur.node0 = node0;
    k->cur.node1 = node1;
    k->cur.block[0] = k->cur.block[1] = k->cur.block[2] = 1;
    k->min_blocks = 0;
    for (int i = 0; i < 3; i++) k->cur.grid[i] = (kg_dim){1, 0, 0, 0, 1};
    k->body.n = k->params.n = 0;
    if (k->body.s) k->body.s[0] = 0;
    if (k->params.s) k->params.s[0] = 0;
}

static void add_arg(kgen *k, const char *cname, int t) {
    if (k->cur.nargs >= KG_MAX_ARGS) {
        snprintf(k->err, sizeof k->err, "%s: too many tensor arguments", k->cur.kernel);
        return;
    }
    k->cur.arg[k->cur.nargs++] = t;
    sb_printf(&k->params, ", long o_%s", cname);
    /* a bf16 tensor's offset counts bf16 elements (plan_elem_offset); the templates read and
     * write it with the bf16 helpers, which only bf16 dialects have */
    if (k->g->t[t].dtype == DT_BF16 && !k->bf16 && !k->err[0])
        snprintf(k->err, sizeof k->err, "%s: bf16 tensor %s needs a dialect with bf16 (CUDA)", k->cur.kernel,
                 k->g->t[t].name);
    if (k->g->t[t].dtype == DT_BF16)
        sb_printf(&k->body, "    GLOBAL unsigned short *%s = (GLOBAL unsigned short *)A + o_%s;\n", cname, cname);
    else
        sb_printf(&k->body, "    GLOBAL float *%s = A + o_%s;\n", cname, cname);
}

void kg_in(kgen *k, const char *cname, int t) {
    /* arg[0..nin) are the reads: the side stream's hazards, the plan text and the per-launch
     * checks all rely on it */
    if (k->cur.nout > 0 && !k->err[0])
        snprintf(k->err, sizeof k->err, "%s: input %s declared after an output", k->cur.kernel, cname);
    add_arg(k, cname, t);
    k->cur.nin++;
}

void kg_out(kgen *k, const char *cname, int t) {
    add_arg(k, cname, t);
    k->cur.nout++;
}

void kg_line(kgen *k, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[2048];
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof buf) {
        snprintf(k->err, sizeof k->err, "%s: source line too long", k->cur.kernel);
        return;
    }
    sb_printf(&k->body, "    %s\n", buf);
}

void kg_grid(kgen *k, int dim, long c0, long cB, long cS, long cBS, long div) {
    k->cur.grid[dim] = (kg_dim){c0, cB, cS, cBS, div > 0 ? div : 1};
}

void kg_shared(kgen *k, const char *name, long n) {
    int cuda = strcmp(k->d->name, "cuda") == 0;
    if (k->cur.shmem == 0 && cuda) sb_printf(&k->body, "    extern __shared__ float realm_shm[];\n");
    long off = k->cur.shmem / (long)sizeof(float);
    sb_printf(&k->body, "    LOCAL_PTR float *%s = realm_shm + %ld;\n", name, off);
    k->cur.shmem += ((n * (long)sizeof(float) + 15) / 16) * 16;
}

void kg_block(kgen *k, int x, int y, int z) {
    k->cur.block[0] = x;
    k->cur.block[1] = y;
    k->cur.block[2] = z;
}

void kg_min_blocks(kgen *k, int n) { k->min_blocks = n; }

void kg_param_grad(kgen *k) { k->cur.param_grad = 1; }

int kg_end(kgen *k) {
    if (k->err[0]) return -1;
    /* part of the kernel's identity: it goes in front of the parameters */
    char bounds[64] = "";
    if (k->min_blocks > 0 && strcmp(k->d->name, "cuda") == 0)
        snprintf(bounds, sizeof bounds, "__launch_bounds__(%d, %d) ", k->cur.block[0] * k->cur.block[1] * k->cur.block[2],
                 k->min_blocks);
    strbuf whole = {0};
    /* OpenCL: the dynamic shared region is the trailing __local argument the backend binds */
    const char *shm = k->cur.shmem > 0 && strcmp(k->d->name, "cuda") != 0 ? ", __local float *realm_shm" : "";
    sb_printf(&whole, "%s(GLOBAL float *A, long B, long S%s%s) {\n    const long T = B * S;\n    (void)T;\n%s}\n",
              bounds, k->params.s ? k->params.s : "", shm, k->body.s ? k->body.s : "");
    int found = -1;
    for (int i = 0; i < k->nbodies; i++)
        if (strcmp(k->bodies[i], whole.s) == 0) found = i;
    if (found < 0) {
        found = k->nbodies++;
        k->bodies = realloc(k->bodies, sizeof *k->bodies * (size_t)k->nbodies);
        k->names = realloc(k->names, sizeof *k->names * (size_t)k->nbodies);
        k->bodies[found] = whole.s;
        snprintf(k->names[found], sizeof k->names[found], "k%d_%.40s", found, k->cur.kernel);
        const int nb = (int)strlen(bounds);
        sb_printf(&k->src, "\nKERNEL %.*s%s%s", nb, whole.s, k->names[found], whole.s + nb);
    } else {
        sb_free(&whole);
    }
    snprintf(k->cur.kernel, sizeof k->cur.kernel, "%s", k->names[found]);
    if (k->nl == k->cap) {
        k->cap = k->cap ? k->cap * 2 : 64;
        k->launches = realloc(k->launches, sizeof *k->launches * (size_t)k->cap);
    }
    k->launches[k->nl++] = k->cur;
    return 0;
}

/* ---- tensor-core fragments (see kgen.h) ---- */

long kg_tc_ws(long cols) { return cols / 2 + 4; }

void kg_tc_prologue(kgen *k) {
    kg_line(k, "const int tid = LID_X, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;");
    kg_line(k, "(void)tid;");
}

/* Plain loads rather than ldmatrix (an asm statement): the compiler may read these again from
 * shared memory instead of keeping them live, which it did in the scan's backward main kernel
 * (168 registers; with ldmatrix here it ran 12.72 -> 12.90 ms a step, H100). */
void kg_tc_afrag(kgen *k, long DP, const char *frag, const char *tile) {
    const long ws = kg_tc_ws(DP);
    kg_line(k, "unsigned %s[%ld][4];", frag, DP / 16);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int kk = 0; kk < %ld; kk++) {", DP / 16);
    kg_line(k, "    const int r = warp * 16 + gq;");
    kg_line(k, "    %s[kk][0] = %s[r * %ld + 8 * kk + tq]; %s[kk][1] = %s[(r + 8) * %ld + 8 * kk + tq];", frag, tile, ws,
            frag, tile, ws);
    kg_line(k, "    %s[kk][2] = %s[r * %ld + 8 * kk + tq + 4]; %s[kk][3] = %s[(r + 8) * %ld + 8 * kk + tq + 4];", frag,
            tile, ws, frag, tile, ws);
    kg_line(k, "}");
}

void kg_tc_afrag_trans(kgen *k, const char *frag, const char *tile, long ws, long ks) {
    kg_line(k, "unsigned %s[%ld][4];", frag, ks);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int kk = 0; kk < %ld; kk++)", ks);
    kg_line(k, "    ldsm_x4_trans(%s[kk], %s + (16 * kk + (lane & 7) + 8 * (lane >> 4)) * %ld + 8 * warp + 4 * ((lane >> 3) & 1));",
            frag, tile, ws);
}

void kg_tc_mma(kgen *k, const char *acc, const char *afrag, const char *atile, long aws, const char *tile, long ws,
               int trans, long nt, long ks, const char *kcond, const char *jcond) {
    if (nt % 2) {   /* a template's error, reported by kg_end rather than rendered wrong */
        snprintf(k->err, sizeof k->err, "kg_tc_mma: %ld n-tiles into %s, an odd number", nt, acc);
        return;
    }
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int kk = 0; kk < %ld; kk++) {", ks);
    if (kcond) kg_line(k, "    if (!(%s)) continue;", kcond);
    if (atile) {
        kg_line(k, "    unsigned afr[4];");
        kg_line(k, "    ldsm_x4(afr, %s + (warp * 16 + (lane & 15)) * %ld + 8 * kk + 4 * (lane >> 4));", atile, aws);
        afrag = "afr";
    }
    kg_line(k, "    #pragma unroll");
    kg_line(k, "    for (int j = 0; j < %ld; j += 2) {", nt);
    if (jcond) kg_line(k, "        if (!(%s)) continue;", jcond);
    kg_line(k, "        unsigned bq[4];");
    if (trans)
        kg_line(k, "        ldsm_x4_trans(bq, %s + (16 * kk + (lane & 15)) * %ld + 4 * (j + (lane >> 4)));", tile, ws);
    else
        kg_line(k, "        ldsm_x4(bq, %s + (8 * j + ((lane >> 4) << 3) + (lane & 7)) * %ld + 8 * kk + 4 * ((lane >> 3) & 1));",
                tile, ws);
    kg_line(k, "        mma_bf16_16816(%s[j], %s, bq);", acc, afrag);
    kg_line(k, "        mma_bf16_16816(%s[j + 1], %s, bq + 2);", acc, afrag);
    kg_line(k, "    }");
    kg_line(k, "}");
}

void kg_tc_repack(kgen *k, const char *frag, const char *acc, long ks) {
    kg_line(k, "unsigned %s[%ld][4];", frag, ks);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int kt = 0; kt < %ld; kt++) {", ks);
    kg_line(k, "    %s[kt][0] = pack_bf16x2(%s[2 * kt][0], %s[2 * kt][1]);", frag, acc, acc);
    kg_line(k, "    %s[kt][1] = pack_bf16x2(%s[2 * kt][2], %s[2 * kt][3]);", frag, acc, acc);
    kg_line(k, "    %s[kt][2] = pack_bf16x2(%s[2 * kt + 1][0], %s[2 * kt + 1][1]);", frag, acc, acc);
    kg_line(k, "    %s[kt][3] = pack_bf16x2(%s[2 * kt + 1][2], %s[2 * kt + 1][3]);", frag, acc, acc);
    kg_line(k, "}");
}

void kg_tc_zero(kgen *k, const char *acc, long nt) {
    kg_line(k, "float %s[%ld][4];", acc, nt);
    kg_line(k, "#pragma unroll");
    kg_line(k, "for (int j = 0; j < %ld; j++)", nt);
    kg_line(k, "    for (int e = 0; e < 4; e++) %s[j][e] = 0.0f;", acc);
}

long kg_ld(const kgen *k, int t) { return k->g->t[t].tok_stride; }
long kg_feat(const kgen *k, int t) { return ir_feat(&k->g->t[t].shape); }
int kg_tokdims(const kgen *k, int t) { return ir_ntok_dims(&k->g->t[t].shape); }

const char *kg_ntok_expr(const kgen *k, int t) {
    const ir_shape *s = &k->g->t[t].shape;
    int n = ir_ntok_dims(s);
    if (n == 2) return "T";
    if (n == 1) return s->d[0] == DIM_B ? "B" : "S";
    return "1";
}
