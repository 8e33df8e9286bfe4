/* A compiled model on a device: the graph from the model file, a plan (a whole training step,
 * or the forward pass only) and its arena. Shared by train, eval, generate and chat. */
#ifndef REALM_SESSION_H
#define REALM_SESSION_H

#include "backend.h"
#include "exec.h"
#include "frontend.h"
#include "optimizer.h"
#include "plan.h"

typedef struct {
    realm_model m;
    ir_optimizer opt;
    int training;
    plan p;
    plan_exec x;
    backend *bk;
    long B, S;
    float *host;              /* scratch, as large as the largest tensor */
    int recompute_all;        /* every layer recomputed in the backward (auto-tuner's choice) */
    int bf16;                 /* the plan's matmuls run in bf16 (granted: 0 on dialects without it) */
} session;

/* "auto" (CUDA if a device works, else OpenCL), "cuda" or "opencl". */
backend *session_backend(const char *name, int device, char *err, size_t errlen);

/* The device-free half of session_open: model, autodiff and optimizer (training), and the
 * plan for a backend's kernel dialect ("cuda" / "opencl"). Nothing is allocated on a device,
 * so the memory model (plan_arena, plan_memory) can be evaluated for any B, S before
 * choosing them. recompute_all: 1 marks every layer (scopes "layers.N") for recomputation,
 * on top of what the model file marks. */
int session_prepare(session *s, const char *src, size_t len, const char *path, const char *dialect, int training,
                    int recompute_all, char *err, size_t errlen);
/* The same with plan options (NULL: fp32), e.g. bf16 matmuls. */
int session_prepare_opts(session *s, const char *src, size_t len, const char *path, const char *dialect,
                         int training, int recompute_all, const plan_options *opt, char *err, size_t errlen);
/* The device half: compile the module and allocate the arena for (B, S). */
int session_alloc(session *s, backend *bk, long B, long S, char *err, size_t errlen);

/* Move a prepared (not yet allocated) session: the plan points into the session's own graph,
 * so a plain struct copy would leave it pointing at the old one. */
void session_move(session *dst, session *src);

/* Compile `src` (the model file's text; `path` names it in messages) for (B, S). */
int session_open(session *s, const char *src, size_t len, const char *path, backend *bk, int training, long B,
                 long S, char *err, size_t errlen);
void session_close(session *s);

/* Parameters (and, for training, zeroed optimizer moments) from the deterministic initialiser. */
int session_init_params(session *s, uint64_t seed, char *err, size_t errlen);
/* Tensor by name, -1 if none. */
int session_tensor(const session *s, const char *name);
/* Copy every parameter from another session of the same model (device to device). */
int session_copy_params(session *dst, const session *src, char *err, size_t errlen);
/* Upload token rows (nrows x rowlen bytes, rowlen >= S+1 for training): tokens = row[0..S),
 * targets = row[1..S]. */
int session_set_batch(session *s, const uint8_t *rows, long rowlen, char *err, size_t errlen);
int session_run(session *s, char *err, size_t errlen);
/* The scalar loss after a run (blocks until the device is done). */
int session_loss(session *s, double *loss, char *err, size_t errlen);

#endif
