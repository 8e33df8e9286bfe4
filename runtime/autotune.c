#include "autotune.h"
#include "loader.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>

void at_need_of(const at_model *m, long B, long S, at_need *n) {
    n->train = plan_arena(m->train, B, S, NULL);
    n->eval = m->eval ? plan_arena(m->eval, B, S, NULL) : 0;
    n->data = loader_device_bytes(B, S);
    n->overhead = m->overhead;
    n->total = n->train + n->eval + n->data + n->overhead;
}

size_t at_target(const at_model *m) { return (size_t)((double)m->available * m->fraction); }

int at_fits(const at_model *m, long B, long S) {
    at_need n;
    at_need_of(m, B, S, &n);
    if (m->max_alloc && (n.train > m->max_alloc || n.eval > m->max_alloc || n.data > m->max_alloc)) return 0;
    return n.total <= at_target(m);
}

/* Largest x in [1, cap] with fits(x), for fits monotone (true then false); 0 if none. */
static long search(const at_model *m, long fixed, long cap, int over_batch) {
#define FITS(x) (over_batch ? at_fits(m, (x), fixed) : at_fits(m, fixed, (x)))
    if (cap < 1 || !FITS(1)) return 0;
    long lo = 1, hi = 2;                       /* lo fits; find a hi that does not */
    while (hi <= cap && FITS(hi)) lo = hi, hi *= 2;
    if (hi > cap) {
        if (FITS(cap)) return cap;
        hi = cap;
    }
    while (hi - lo > 1) {
        long mid = lo + (hi - lo) / 2;
        if (FITS(mid)) lo = mid;
        else hi = mid;
    }
    return lo;
#undef FITS
}

long at_max_batch(const at_model *m, long S, long cap) { return search(m, S, cap, 1); }
long at_max_seq(const at_model *m, long B, long cap) { return search(m, B, cap, 0); }

long at_auto_seq(const at_model *m, long cap) {
    long s = 1;
    while (s * 2 <= cap) s *= 2;
    for (; s >= 1; s /= 2)
        if (at_fits(m, 1, s)) return s;
    return 0;
}

size_t at_probe_overhead(backend *bk, const plan *const *plans, int n) {
    size_t f0 = 0, f1 = 0, total;
    if (bk->kind != BK_CUDA || bk_mem_info(bk, &f0, &total) < 0) return 0;
    bk_module *mods[4] = {0};
    for (int i = 0; i < n && i < 4; i++) mods[i] = bk_compile(bk, plans[i]->kg.src.s, "", NULL);
    size_t over = bk_mem_info(bk, &f1, &total) == 0 && f1 < f0 ? f0 - f1 : 0;
    for (int i = 0; i < n && i < 4; i++)
        if (mods[i]) bk_module_free(bk, mods[i]);
    return over;
}

static double mib(size_t b) { return (double)b / 1048576.0; }

void at_print_breakdown(FILE *f, const char *prefix, const at_model *m, long B, long S) {
    plan_mem pm;
    plan_memory(m->train, B, S, &pm);
    at_need n;
    at_need_of(m, B, S, &n);
    const int nbf = ir_bf16_owners(m->train->g);
    fprintf(f, "%sbreakdown at batch %ld x seq %ld (fp32, %d tensors bf16); \"at peak\": bytes live at launch %d of %d, the arena's fullest:\n",
            prefix, B, S, nbf, pm.peak_launch, m->train->kg.nl);
    fprintf(f, "%s  %-26s %12s %14s\n", prefix, "category", "at peak MiB", "all MiB");
    size_t sum = 0;
    for (int c = 0; c < PM_NCAT; c++) {
        sum += pm.peak[c];
        if (c == PM_SLACK) fprintf(f, "%s  %-26s %12.2f %14s\n", prefix, plan_mem_cat_name((plan_mem_cat)c), mib(pm.peak[c]), "");
        else fprintf(f, "%s  %-26s %12.2f %14.2f\n", prefix, plan_mem_cat_name((plan_mem_cat)c), mib(pm.peak[c]),
                     mib(pm.sum[c]));
    }
    fprintf(f, "%s  %-26s %12.2f   (%zu bytes; categories sum to %zu)\n", prefix, "training arena", mib(pm.arena),
            pm.arena, sum);
    if (m->eval) fprintf(f, "%s  %-26s %12.2f\n", prefix, "validation arena", mib(n.eval));
    fprintf(f, "%s  %-26s %12.2f   (2 staging slots of tokens + targets)\n", prefix, "data buffers", mib(n.data));
    fprintf(f, "%s  %-26s %12.2f   (modules; measured at start-up by realm train)\n", prefix, "backend overhead",
            mib(n.overhead));
    fprintf(f, "%s  %-26s %12.2f   (%zu bytes)\n", prefix, "total", mib(n.total), n.total);
}

int at_parse_bytes(const char *s, size_t *out) {
    if (!s || !*s) return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0) || !isfinite(v)) return -1;
    double mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1024.0; end++; break;
    case 'm': case 'M': mul = 1048576.0; end++; break;
    case 'g': case 'G': mul = 1073741824.0; end++; break;
    case 't': case 'T': mul = 1099511627776.0; end++; break;
    default: break;
    }
    if (*end == 'i' && end[1] == 'B') end += 2;
    else if (*end == 'B') end++;
    if (*end) return -1;
    v *= mul;
    if (v >= 1.8e19) return -1;
    *out = (size_t)v;
    return 0;
}
