/* Minimal test harness. A file tests/test_*.c defines tests with TEST(name) { ... }; the
 * Makefile collects the names, and tests/runner.c runs them and prints "N passed, N failed". */
#ifndef REALM_TEST_H
#define REALM_TEST_H

#include <stdint.h>
#include <stdio.h>

typedef struct tctx {
    const char *name;
    int failed;
    char msg[1024];
    uint64_t rng;            /* fresh per test: seeded from the clock unless REALM_TEST_SEED */
} tctx;

#define TEST(name) void test_##name(tctx *t)
/* A test of a minute or more: the runner starts these first. */
#define TEST_SLOW(name) void test_##name(tctx *t)

void t_fail(tctx *t, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Stop the test on failure. */
#define CHECK(cond, ...) do { if (!(cond)) { t_fail(t, __FILE__, __LINE__, __VA_ARGS__); return; } } while (0)

uint64_t t_next(tctx *t);              /* 64-bit random */
double t_uniform(tctx *t);             /* [0, 1) */
double t_normal(tctx *t);              /* N(0, 1) */
long t_randint(tctx *t, long lo, long hi);   /* inclusive */
/* ||a - b|| / ||b||; returns INFINITY if any value is NaN. */
double t_relerr(const double *a, const double *b, long n);
double t_maxabs(const double *a, const double *b, long n);

/* Run a shell command, capture stdout+stderr into out (truncated), return exit status
 * (or -1). The realm binary's path is t_realm_bin() (REALM_BIN, default build/realm). */
int t_run(const char *cmd, char *out, size_t outlen);
const char *t_realm_bin(void);
/* Helpers for the tests that drive the CLI. */
/* A text corpus: tinyshakespeare from ../shared when present, else the project's own docs. */
const char *t_text_corpus(char *buf, size_t len);
void t_tmpdir(tctx *t, char *buf, size_t len);     /* a fresh empty directory under /tmp */
void t_rmtree(const char *dir);
char *t_slurp(const char *path);                   /* malloc'd, NUL-terminated; NULL if unreadable */
int t_count_lines(const char *path);
/* Run `cmd` through /bin/sh in the background, its stdout discarded; returns the pid. */
int t_spawn(const char *cmd);

/* REALM_GPU=1: the CUDA device tests run (make test-gpu). */
int t_gpu_requested(void);
/* t_gpu_requested(), or else says "(no GPU: skipped)" and returns 0. */
int t_gpu_on(void);

/* Root of ../shared if present (tests that need it skip gracefully otherwise), or NULL. */
const char *t_shared_dir(void);

#endif
