/* The memory model of a training run and the auto-tuner that sizes batch and sequence length
 * from it (docs/memory.md). Everything here is a pure function of the plans except the
 * overhead probe, so the choice is made before anything is allocated: a run either fits
 * from step 1 or stops before training. */
#ifndef REALM_AUTOTUNE_H
#define REALM_AUTOTUNE_H

#include "backend.h"
#include "plan.h"

typedef struct {
    const plan *train;        /* the training step */
    const plan *eval;         /* forward-only validation plan at the same B, S; NULL if none */
    size_t overhead;          /* backend bytes outside our buffers (loaded modules), measured */
    size_t available;         /* free device memory at start-up, or the --memory-budget */
    double fraction;          /* share of `available` the run may fill */
    size_t max_alloc;         /* largest single buffer the device allows (0: no limit) */
} at_model;

typedef struct {
    size_t train, eval, data, overhead, total;
} at_need;

/* Device bytes of a run at (B, S), by part. */
void at_need_of(const at_model *m, long B, long S, at_need *n);
/* The budget: fraction * available. */
size_t at_target(const at_model *m);
/* 1 if (B, S) fits the budget and every arena fits one allocation. */
int at_fits(const at_model *m, long B, long S);
/* Largest B in [1, cap] that fits at S (the need grows with B, so a binary search), 0 if none. */
long at_max_batch(const at_model *m, long S, long cap);
/* Largest S in [1, cap] that fits at batch B, 0 if none. */
long at_max_seq(const at_model *m, long B, long cap);
/* Largest power of two <= cap that fits at batch 1, 0 if none. */
long at_auto_seq(const at_model *m, long cap);

/* Device memory a backend takes for loading these plans' modules: free memory before and
 * after compiling them (the modules are freed again; the run loads them from the kernel
 * cache). 0 where the backend cannot see it (OpenCL reports only our own buffers). */
size_t at_probe_overhead(backend *bk, const plan *const *plans, int n);

/* Print the run's memory at (B, S): the training arena by category (plan_memory), then the
 * validation arena, the data buffers, the backend overhead and the total. Every line starts
 * with `prefix`. */
#include <stdio.h>
void at_print_breakdown(FILE *f, const char *prefix, const at_model *m, long B, long S);

/* "1073741824", "512M", "1.5G", "64K" (binary units). 0 on success. */
int at_parse_bytes(const char *s, size_t *out);

#endif
