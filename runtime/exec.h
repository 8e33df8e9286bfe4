/* Runs a plan on a backend: one arena sized by the memory plan, one module, launches in the
 * plan's order on one stream. */
#ifndef REALM_EXEC_H
#define REALM_EXEC_H

#include "backend.h"
#include "plan.h"

typedef struct {
    backend *bk;
    const plan *p;
    long B, S;
    bk_module *mod;
    bk_kernel **kern;         /* per launch */
    bk_buf *arena;
    size_t arena_bytes;
    size_t *offset;           /* per tensor: byte offset of owners in the arena */
    bk_stream *stream;        /* NULL: the backend's default stream */
} plan_exec;

/* Compile the plan's module and allocate the arena for (B, S). */
int exec_create(plan_exec *x, backend *bk, const plan *p, long B, long S, char *err, size_t errlen);
void exec_destroy(plan_exec *x);
/* Queue launches [l0, l1). */
int exec_run(plan_exec *x, int l0, int l1, char *err, size_t errlen);
/* Copy a tensor (any layout, views included) between the arena and a dense host array of
 * ntok*feat floats. Blocking. */
int exec_upload(plan_exec *x, int t, const float *src, char *err, size_t errlen);
int exec_download(plan_exec *x, int t, float *dst, char *err, size_t errlen);

#endif
