/* cuemu: runs generated CUDA kernels on the CPU, for developing tensor-core templates on a
 * machine without a GPU. Not part of the build; see tools/cuemu/README.md.
 *
 * Every CUDA thread of a block is a coroutine (ucontext); a block runs to completion before
 * the next starts. __syncthreads and the warp-collective operations (shuffles, mma.sync,
 * ldmatrix) are barriers between coroutines; a barrier some threads never reach is reported.
 * The fragment layouts follow the PTX ISA (mma m16n8k16 bf16, ldmatrix m8n8 x4 [.trans]).
 * cp.async copies are held per thread until cp.async.wait_group releases them (late mode) or
 * done at issue (early mode): a kernel must give the same result both ways. The thread order
 * of the round-robin can be reversed, which exposes a read not ordered by a barrier. */
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__
#define __launch_bounds__(...)

struct emu_dim3 { unsigned x, y, z; };

struct emu_copy { void *dst; const void *src; int n, src_n; long group; };

struct emu_thread {
    ucontext_t ctx;
    emu_dim3 idx;
    int done;
    long bar_block, bar_warp;
    emu_copy *cp;
    int ncp, capcp;
    long group;   /* cp.async groups committed so far */
    char *stack;
};

#define EMU_STACK (256 * 1024)

struct emu_block {
    emu_thread *th;
    int n, cur;
    ucontext_t sched;
    emu_dim3 bidx, bdim, gdim;
    int reverse, early;
    unsigned char *dynshm;
    /* per warp, two alternating exchange buffers (a lane at collective c+2 has passed the
     * barrier of c+1, so every lane has finished reading c) */
    struct xbuf { uint32_t w[32][8]; const void *p[32]; } x[32][2];
    const char *err;
};

static emu_block *emu_b;

#define threadIdx (emu_b->th[emu_b->cur].idx)
#define blockIdx (emu_b->bidx)
#define blockDim (emu_b->bdim)
#define gridDim (emu_b->gdim)

static inline emu_thread &emu_me() { return emu_b->th[emu_b->cur]; }

static void emu_yield() { swapcontext(&emu_me().ctx, &emu_b->sched); }

static void emu_fail(const char *what) {
    fprintf(stderr, "cuemu: %s (block %u,%u thread %d)\n", what, emu_b->bidx.x, emu_b->bidx.y, emu_b->cur);
    abort();
}

static void __syncthreads() {
    emu_thread &me = emu_me();
    const long g = ++me.bar_block;
    for (;;) {
        int ok = 1;
        for (int i = 0; i < emu_b->n; i++) {
            if (emu_b->th[i].bar_block >= g) continue;
            if (emu_b->th[i].done) emu_fail("__syncthreads with exited threads");
            ok = 0;
        }
        if (ok) return;
        emu_yield();
    }
}

static void emu_warp_sync() {
    emu_thread &me = emu_me();
    const long g = ++me.bar_warp;
    const int w0 = emu_b->cur & ~31;
    for (;;) {
        int ok = 1;
        for (int i = w0; i < w0 + 32 && i < emu_b->n; i++) {
            if (emu_b->th[i].bar_warp >= g) continue;
            if (emu_b->th[i].done) emu_fail("warp collective with exited lanes");
            ok = 0;
        }
        if (ok) return;
        emu_yield();
    }
}

/* The lane's exchange buffer for its next collective; after emu_warp_sync every lane's
 * entries in the same buffer are readable. */
static emu_block::xbuf &emu_xb() {
    emu_thread &me = emu_me();
    return emu_b->x[emu_b->cur >> 5][me.bar_warp & 1];
}

static inline int emu_lane() { return emu_b->cur & 31; }

template <class T> static T emu_shfl_xor(T v, int m) {
    emu_block::xbuf &xb = emu_xb();
    uint32_t u;
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    memcpy(&u, &v, 4);
    xb.w[emu_lane()][0] = u;
    emu_warp_sync();
    u = xb.w[emu_lane() ^ m][0];
    memcpy(&v, &u, 4);
    return v;
}
static float __shfl_xor_sync(unsigned, float v, int m) { return emu_shfl_xor(v, m); }
static int __shfl_xor_sync(unsigned, int v, int m) { return emu_shfl_xor(v, m); }
static unsigned __shfl_xor_sync(unsigned, unsigned v, int m) { return emu_shfl_xor(v, m); }

static float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
static int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }

/* ---- the prelude's inline-asm helpers, emulated ---- */
static uint32_t emu_bf16(float f) {   /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
static float emu_f32(uint32_t h) { return __uint_as_float((h & 0xffffu) << 16); }

static unsigned pack_bf16x2(float lo, float hi) { return emu_bf16(lo) | (emu_bf16(hi) << 16); }

/* a: A 16x16 row (a0: row g, k 2t..; a1: row g+8; a2: row g, k 2t+8..; a3: row g+8, k 2t+8..)
 * b: B 16x8 col (b0: k 2t, 2t+1 of column g; b1: k 2t+8, 2t+9); d: (g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1) */
static void mma_bf16_16816(float *d, const unsigned *a, const unsigned *b) {
    emu_block::xbuf &xb = emu_xb();
    const int l = emu_lane();
    for (int i = 0; i < 4; i++) xb.w[l][i] = a[i];
    xb.w[l][4] = b[0];
    xb.w[l][5] = b[1];
    emu_warp_sync();
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        double s = 0.0;
        for (int kk = 0; kk < 16; kk++) {
            /* A(row, kk) */
            const int al = (row & 7) * 4 + ((kk & 7) >> 1), ar = (row >> 3) + 2 * (kk >> 3);
            const float av = emu_f32(xb.w[al][ar] >> (16 * (kk & 1)));
            /* B(kk, col) */
            const int bl = col * 4 + ((kk & 7) >> 1), br = 4 + (kk >> 3);
            const float bv = emu_f32(xb.w[bl][br] >> (16 * (kk & 1)));
            s += (double)av * (double)bv;
        }
        d[i] = (float)((double)d[i] + s);
    }
}

/* ldmatrix m8n8 x4: lane l gives the address of row l&7 of matrix l>>3 (16 bytes each). */
static void emu_ldsm(unsigned *r, const void *p, int trans) {
    emu_block::xbuf &xb = emu_xb();
    const int l = emu_lane();
    xb.p[l] = p;
    emu_warp_sync();
    for (int i = 0; i < 4; i++) {
        if (!trans) {
            const unsigned char *row = (const unsigned char *)xb.p[8 * i + (l >> 2)];
            memcpy(&r[i], row + 4 * (l & 3), 4);
        } else {
            const unsigned char *r0 = (const unsigned char *)xb.p[8 * i + 2 * (l & 3)];
            const unsigned char *r1 = (const unsigned char *)xb.p[8 * i + 2 * (l & 3) + 1];
            uint16_t lo, hi;
            memcpy(&lo, r0 + 2 * (l >> 2), 2);
            memcpy(&hi, r1 + 2 * (l >> 2), 2);
            r[i] = (unsigned)lo | ((unsigned)hi << 16);
        }
    }
}
static void ldsm_x4(unsigned *r, const void *p) { emu_ldsm(r, p, 0); }
static void ldsm_x4_trans(unsigned *r, const void *p) { emu_ldsm(r, p, 1); }

static void emu_copy_do(const emu_copy &c) {
    memcpy(c.dst, c.src, (size_t)c.src_n);
    memset((char *)c.dst + c.src_n, 0, (size_t)(c.n - c.src_n));
}
static void emu_cp_async(void *dst, const void *src, int n, int src_n) {
    emu_thread &me = emu_me();
    if ((uintptr_t)dst % (uintptr_t)n || (src_n && (uintptr_t)src % (uintptr_t)n)) emu_fail("misaligned cp.async");
    emu_copy c = {dst, src, n, src_n, me.group};
    if (emu_b->early) {
        emu_copy_do(c);
        return;
    }
    if (me.ncp == me.capcp) {
        me.capcp = me.capcp ? 2 * me.capcp : 64;
        me.cp = (emu_copy *)realloc(me.cp, sizeof *me.cp * (size_t)me.capcp);
    }
    me.cp[me.ncp++] = c;
}
static void cp_async16(void *dst, const void *src, int src_n) { emu_cp_async(dst, src, 16, src_n); }
static void cp_async4(void *dst, const void *src, int src_n) { emu_cp_async(dst, src, 4, src_n); }
static void cp_async_commit() { emu_me().group++; }
/* complete every copy except those of the newest n committed groups (and uncommitted ones) */
static void emu_cp_wait(int n) {
    emu_thread &me = emu_me();
    int k = 0;
    for (int i = 0; i < me.ncp; i++) {
        if (me.cp[i].group < me.group - n) emu_copy_do(me.cp[i]);
        else me.cp[k++] = me.cp[i];
    }
    me.ncp = k;
}
#define cp_async_wait(n) emu_cp_wait(n)

static float ex2f(float x) { return exp2f(x); }

/* ---- launch ---- */
typedef void (*emu_fn)(float *, long, long, long, long, long, long, long, long, long, long, long, long,
                       long, long, long, long, long, long, long, long, long, long);

struct emu_launch_args { emu_fn fn; float *A; long v[22]; };
static emu_launch_args *emu_args;

static void emu_entry() {
    emu_launch_args *a = emu_args;
    a->fn(a->A, a->v[0], a->v[1], a->v[2], a->v[3], a->v[4], a->v[5], a->v[6], a->v[7], a->v[8], a->v[9],
          a->v[10], a->v[11], a->v[12], a->v[13], a->v[14], a->v[15], a->v[16], a->v[17], a->v[18], a->v[19],
          a->v[20], a->v[21]);
    emu_thread &me = emu_me();
    if (me.ncp) emu_fail("exited with cp.async copies outstanding");
    me.done = 1;
}

extern "C" int cuemu_run(void *fn, float *A, const long *v, int nv, const size_t grid[3], const size_t block[3],
                         size_t shmem, int reverse, int early) {
    emu_launch_args a;
    memset(&a, 0, sizeof a);
    a.fn = (emu_fn)fn;
    a.A = A;
    for (int i = 0; i < nv && i < 22; i++) a.v[i] = v[i];
    emu_args = &a;
    emu_block *b = (emu_block *)calloc(1, sizeof *b);
    emu_b = b;
    b->n = (int)(block[0] * block[1] * block[2]);
    b->th = (emu_thread *)calloc((size_t)b->n, sizeof *b->th);
    b->bdim = {(unsigned)block[0], (unsigned)block[1], (unsigned)block[2]};
    b->gdim = {(unsigned)grid[0], (unsigned)grid[1], (unsigned)grid[2]};
    b->reverse = reverse;
    b->early = early;
    b->dynshm = (unsigned char *)malloc(shmem ? shmem : 16);
    for (int i = 0; i < b->n; i++) b->th[i].stack = (char *)malloc(EMU_STACK);
    for (size_t z = 0; z < grid[2]; z++)
        for (size_t y = 0; y < grid[1]; y++)
            for (size_t x = 0; x < grid[0]; x++) {
                b->bidx = {(unsigned)x, (unsigned)y, (unsigned)z};
                memset(b->dynshm, 0xff, shmem ? shmem : 16);   /* NaN: a read before any write shows */
                for (int i = 0; i < b->n; i++) {
                    emu_thread &t = b->th[i];
                    t.idx = {(unsigned)(i % block[0]), (unsigned)(i / block[0] % block[1]),
                             (unsigned)(i / (block[0] * block[1]))};
                    t.done = 0;
                    t.bar_block = t.bar_warp = 0;
                    t.ncp = 0;
                    t.group = 0;
                    getcontext(&t.ctx);
                    t.ctx.uc_stack.ss_sp = t.stack;
                    t.ctx.uc_stack.ss_size = EMU_STACK;
                    t.ctx.uc_link = &b->sched;
                    makecontext(&t.ctx, emu_entry, 0);
                }
                memset(b->x, 0, sizeof b->x);
                int left = b->n;
                while (left) {
                    left = 0;
                    for (int k = 0; k < b->n; k++) {
                        const int i = b->reverse ? b->n - 1 - k : k;
                        if (b->th[i].done) continue;
                        b->cur = i;
                        swapcontext(&b->sched, &b->th[i].ctx);
                        if (!b->th[i].done) left++;
                    }
                }
            }
    for (int i = 0; i < b->n; i++) {
        free(b->th[i].stack);
        free(b->th[i].cp);
    }
    free(b->th);
    free(b->dynshm);
    free(b);
    emu_b = NULL;
    return 0;
}

extern "C" void *cuemu_dynshm() { return emu_b->dynshm; }
