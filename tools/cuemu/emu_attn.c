/* Runs the bf16 attention kernel cases of tests/test_bf16.c (and the attention kernel table)
 * on cuemu, each launch against the fp64 reference: emu_attn [case index ...]. CUEMU_REVERSE=1,
 * CUEMU_EARLY=1 select the schedule. */
#include "cuemu.h"
#include "kcases.h"
#include "kernelcheck.h"
#include "plan.h"
#include "test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ATT(H, HKV, DH, W, S) {"attention", 3, {SHC(DIM_B, DIM_S, H, DH), SHC(DIM_B, DIM_S, HKV, DH), \
                                SHC(DIM_B, DIM_S, HKV, DH)}, {DT_F32, DT_F32, DT_F32}, {W}, {0}, 0, S}
#define SHC(...) {(int)(sizeof((int[]){__VA_ARGS__}) / sizeof(int)), {__VA_ARGS__}}
static const kcase cases[] = {
    ATT(6, 6, 64, 96, 200),
    ATT(6, 2, 64, 96, 300),
    ATT(6, 6, 64, 1000, 150),
    ATT(2, 1, 40, 33, 100),
    ATT(2, 2, 128, 70, 150),
    ATT(2, 2, 64, 64, 129),
    ATT(1, 1, 64, 1, 70),
    ATT(1, 1, 64, 200, 520),    /* full interior tiles: 128-query blocks past the window */
    ATT(2, 1, 64, 130, 333),
};

int main(int argc, char **argv) {
    static const plan_options bf16_on = {.bf16 = 1};
    const int rev = getenv("CUEMU_REVERSE") && atoi(getenv("CUEMU_REVERSE"));
    const int early = getenv("CUEMU_EARLY") && atoi(getenv("CUEMU_EARLY"));
    backend *bk = cuemu_create(rev, early);
    const int nc = (int)(sizeof cases / sizeof cases[0]);
    const int nt = kcases_attention.n;
    int fails = 0;
    for (int i = 0; i < nc + nt; i++) {
        if (argc > 1) {
            int want = 0;
            for (int a = 1; a < argc; a++) want |= atoi(argv[a]) == i;
            if (!want) continue;
        }
        const kcase *c = i < nc ? &cases[i] : &kcases_attention.c[i - nc];
        if (strcmp(c->op, "attention") != 0) continue;
        tctx t = {.name = "emu", .rng = 12345u + (uint64_t)i};
        ir_graph g;
        char err[600];
        if (kc_build_case(c, &g, err, sizeof err) < 0) {
            printf("case %d: build: %s\n", i, err);
            fails++;
            continue;
        }
        kc_check_graph_opts(&t, bk, &g, 2, c->S ? c->S : 13, 1e-2, 1, &bf16_on);
        printf("case %d (H %d Hkv %d Dh %d W %ld S %ld): %s %s\n", i, c->in[0].d[2], c->in[1].d[2], c->in[0].d[3],
               c->ia[0], c->S, t.failed ? "FAIL" : "ok", t.failed ? t.msg : "");
        fflush(stdout);
        fails += t.failed;
        ir_free(&g);
    }
    bk_destroy(bk);
    return fails != 0;
}
