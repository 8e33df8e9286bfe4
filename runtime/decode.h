/* Constant-cost decoding (docs/decode.md): the model file's step graph (g.mode == "step")
 * compiled once, its recurrent state and sampler living in the arena. Each call advances
 * every sequence of the batch by one byte at a cost that does not depend on the position.
 * Bytes fed at once (a prompt, a chat turn) go through the model's prefill graph instead
 * (g.mode == "prefill": the parallel forward from the step graph's state, which hands its
 * final states back to the step graph).
 * Runs on a backend, or (bk == NULL) on the fp64 reference executor, which tests use as the
 * oracle. */
#ifndef REALM_DECODE_H
#define REALM_DECODE_H

#include "backend.h"
#include "exec.h"
#include "frontend.h"
#include "plan.h"
#include "reference.h"

#include <stdint.h>

typedef struct {
    double temperature;   /* <= 0: greedy */
    long top_k;           /* 0: all */
    double top_p;         /* <= 0 or >= 1: off */
    uint64_t seed;        /* 48 bits are used */
} decode_sampling;

/* The prefill side of a decoder (docs/decode.md "Prefill"). */
typedef struct {
    realm_model m;            /* the prefill graph (g.mode == "prefill"), when loaded */
    int loaded;
    int ok;                   /* usable: every step state has its prefill twin (else `why`) */
    char why[256];
    long unit;                /* prefilled lengths are multiples of this: the lcm of the Mamba-3 chunks */
    int *state_of;            /* per step-graph tensor: the prefill graph's state of the same name, or -1 */
    int *param_of;            /* per prefill-graph tensor: the step graph's parameter of the same name, or -1 */
    int planned;              /* p is built */
    plan p;
    plan_exec x;              /* created on first use; x.arena == NULL: not yet */
    int stale;                /* the step plan's weights changed since they were copied into x */
} decode_prefill;

/* Prompts longer than this (in bytes times the batch) prefill their first DECODE_PREFILL_MAX / B
 * bytes (rounded down to the unit) in parallel and step through the rest: one parallel run
 * holds every position's activations (realm-9m: about 16 KB per byte, 4 GB at this size). */
#define DECODE_PREFILL_MAX (1L << 18)

typedef struct {
    realm_model m;            /* the step graph */
    backend *bk;              /* NULL: reference executor */
    plan p;
    plan_exec x;
    ref_ctx *ref;
    long B;
    long pos;                 /* position of the next byte fed (all sequences advance together) */
    int pending;              /* a sampled byte sits in `tokens` but has not run through the model */
    int l_model;              /* launches [0, l_model) run the model, the rest sample */
    float *host;              /* scratch: the largest input or logits */
    /* CUDA graphs: when the backend supports them (bk_graph_supported) and REALM_NO_CUDA_GRAPH
     * is not 1, decoder_open sets use_graph, and each launch range (the model, the sampler, the
     * whole step) is captured on first use and replayed from then on. Setting use_graph to 0
     * before a step goes back to launch-by-launch (tests compare the two). */
    int use_graph;
    int graph[3];             /* exec_capture ids of the model / sampler / whole step; -1: not yet */
    /* Prefill: parallel is 1 unless REALM_PREFILL=step (tests and callers may set it either way
     * before a feed). The prefill graph starts from the step plan's state at its position, so a
     * new prompt and a chat turn that continues a conversation take the same path. */
    int parallel;
    decode_prefill pf;
    long prefill_bytes;       /* bytes (per sequence) prefilled in parallel so far */
    double prefill_s;         /* seconds spent on them (uploads, the run, the hand-over) */
} decoder;

/* Compile the step plan of a model file for batch B. */
int decoder_open(decoder *d, const char *src, size_t len, const char *path, backend *bk, long B, char *err,
                 size_t errlen);
void decoder_close(decoder *d);
/* Parameters: the deterministic initialiser (tests), or a safetensors file (a checkpoint's
 * model.safetensors: every parameter present with its size). */
int decoder_init_params(decoder *d, uint64_t seed, char *err, size_t errlen);
int decoder_load_weights(decoder *d, const char *safetensors_path, char *err, size_t errlen);
/* Empty every sequence: zero state, position 0. */
int decoder_reset(decoder *d, char *err, size_t errlen);
/* Per-sequence sampling parameters (s[b]); one entry for all when `each` is 0. */
int decoder_set_sampling(decoder *d, const decode_sampling *s, int each, char *err, size_t errlen);
/* Feed n bytes to every sequence (bytes[b * n + i]). logits (may be NULL): receives
 * [n][B][vocab], the logits after each byte. With d->parallel and a prefill graph, the longest
 * prefix that is a multiple of pf.unit and leaves at least one byte runs through the prefill
 * graph, started from the step plan's state at the current position (empty after a reset, or
 * the conversation so far), whose final states are copied back into the step plan; the rest
 * goes through the step plan one byte at a time. */
int decoder_feed(decoder *d, const uint8_t *bytes, long n, float *logits, char *err, size_t errlen);
/* Sample the next byte of every sequence on the device (out[b]); the byte is the next step's
 * input, already on the device. */
int decoder_next(decoder *d, uint8_t *out, char *err, size_t errlen);
/* Jump every sequence to position `pos` without feeding anything (the state is kept as it is):
 * for timing a step at a far position, whose cost does not depend on the state's contents. */
int decoder_set_position(decoder *d, long pos, char *err, size_t errlen);
/* How many of n bytes the next decoder_feed would prefill in parallel (0: all stepped). */
long decoder_prefill_len(const decoder *d, long n);

#endif
