/* Runs a plan on a backend: one arena sized by the memory plan, one module, launches in the
 * plan's order on one stream. */
#ifndef REALM_EXEC_H
#define REALM_EXEC_H

#include "backend.h"
#include "plan.h"

/* Opt-in per-launch timing (exec_profile_enable): device time accumulated per primitive name
 * ("fused" for a fused elementwise group). */
typedef struct {
    const char *name;         /* the primitive's registered name (static storage) or "fused" */
    double ms;                /* device milliseconds summed over every collected launch */
    long launches;
} exec_prof_entry;

typedef struct exec_prof {
    bk_event **ev;            /* 2 per launch: recorded just before and just after it */
    char *pending;            /* per launch: timed by exec_run, not yet read by collect */
    int *entry;               /* per launch: index into by_op */
    double *launch_ms;        /* per launch: device milliseconds summed over collected runs */
    exec_prof_entry *by_op;
    int nop;
    double total_ms;          /* sum over by_op */
} exec_prof;

typedef struct {
    backend *bk;
    const plan *p;
    long B, S;
    long S_plan;              /* the S the arena was planned for (exec_set_seq may lower S) */
    bk_module *mod;
    bk_kernel **kern;         /* per launch */
    bk_buf *arena;
    size_t arena_bytes;
    size_t *offset;           /* per tensor: byte offset of owners in the arena */
    bk_stream *stream;        /* NULL: the backend's default stream */
    exec_prof *prof;          /* NULL unless exec_profile_enable was called */
    bk_graph **graph;         /* exec_capture's graphs, freed by exec_destroy */
    int ngraph;
    /* The plan's side launches (plan.side) go to `side` unless profiling, capturing a graph
     * or side_off: forked from the main stream just before each, joined where plan.join says
     * and at the end of every exec_run. NULL when the plan has none. */
    bk_stream *side;
    bk_event *fork;
    bk_event **done;          /* per launch: recorded on `side` after a side launch */
    int side_off;             /* the caller's switch: 1 runs every launch on `stream` */
} plan_exec;

/* Compile the plan's module and allocate the arena for (B, S). */
int exec_create(plan_exec *x, backend *bk, const plan *p, long B, long S, char *err, size_t errlen);
void exec_destroy(plan_exec *x);
/* Run at sequence length S <= S_plan from now on, in the same arena: every tensor's size grows
 * with S and the memory plan gave each owner its S_plan bytes, so at a shorter S each tensor
 * uses a prefix of its own bytes and nothing overlaps. Lets one compiled module and arena serve
 * prompts of any length up to S_plan. Not while graphs are captured (their S is fixed). */
int exec_set_seq(plan_exec *x, long S, char *err, size_t errlen);
/* Which side launch main launch i must wait for, given that side launches up to `waited` are
 * already waited for and `last` is the latest one issued in this run: the latest s in
 * (waited, last] with plan.join[s] <= i (the side stream runs in order, so waiting for it
 * covers every side launch before it), or -1. exec_run's schedule, exposed for the tests. */
int exec_side_wait(const plan *p, int i, int waited, int last);
/* Queue launches [l0, l1). */
int exec_run(plan_exec *x, int l0, int l1, char *err, size_t errlen);
/* Graphs (backends with bk_graph_supported: CUDA). exec_capture records launches [l0, l1) into
 * a graph, without running them, and returns its id (>= 0; -1 and err on failure, including
 * "not supported" and profiling being on: the events would be captured too). exec_replay runs
 * it on x->stream, ordered after everything queued before: the same kernels with the same
 * arguments (the arena, B, S, offsets never change), so it does exactly what exec_run(l0, l1)
 * does, for one driver call. Inputs that change between replays must live in the arena and be
 * written by stream-ordered work (uploads, earlier launches). */
int exec_capture(plan_exec *x, int l0, int l1, char *err, size_t errlen);
int exec_replay(plan_exec *x, int id, char *err, size_t errlen);
/* Copy a tensor (any layout, views included) between the arena and a dense host array of
 * ntok*feat floats. Blocking. */
int exec_upload(plan_exec *x, int t, const float *src, char *err, size_t errlen);
int exec_download(plan_exec *x, int t, float *dst, char *err, size_t errlen);

/* Profiling. After exec_profile_enable every launch exec_run queues is bracketed by two events;
 * nothing waits for them until exec_profile_collect, which reads every pending pair (waiting
 * for the last) and adds the times to prof->by_op. Call collect once per run of the plan (say,
 * after each training step): exec_run collects by itself, with a wait, only when a launch is
 * about to be timed again before its previous timing was read. The events add a little work
 * between launches, so time the headline numbers with profiling off. */
int exec_profile_enable(plan_exec *x, char *err, size_t errlen);
int exec_profile_collect(plan_exec *x, char *err, size_t errlen);
void exec_profile_reset(plan_exec *x);     /* zero the totals (keeps profiling on) */

#endif
