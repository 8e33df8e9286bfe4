/* The Lua front end: runs a model file in a sandbox and builds the training graph
 * (forward, loss) from it. Lua runs only here, at compile time. */
#ifndef REALM_FRONTEND_H
#define REALM_FRONTEND_H

#include "ir.h"

typedef struct {
    double lr, min_lr_frac, weight_decay, beta1, beta2, adam_eps, grad_clip;
    long warmup, steps, batch, seq, eval_every, save_every;
    char schedule[16];                 /* "cosine" | "wsd" | "constant" */
} train_config;

typedef struct {
    char path[512];
    char name[64];
    int vocab, d_model, n_layers;
    train_config train;
    ir_graph g;
    int tokens, targets, logits, loss; /* tensor ids */
    /* Step mode only (model_load_step; -1 otherwise): per-sequence absolute positions [B,S]
     * (the step plan runs at S = 1), sampling parameters [B,8] (docs/decode.md), and the
     * first node of the sampling tail: nodes [0, sample_node) are the model, the rest sample
     * a byte and write it (and position + 1) back into tokens/positions in place. */
    int positions, sampling, sample_node;
    int step;                          /* 1: built with g.mode == "step" */
    int prefill;                       /* 1: built with g.mode == "prefill" */
} realm_model;

/* Load `path` and build the forward graph and loss. On failure returns -1 and writes one line
 * "path:LINE: message" into err. */
int model_load(const char *path, realm_model *m, char *err, size_t errlen);
/* Same, from a string (tests). `chunkname` is the path shown in messages. */
int model_load_string(const char *src, size_t len, const char *chunkname, realm_model *m, char *err,
                      size_t errlen);
/* The single-token decode graph of the same model file (g.mode == "step" in Lua): inputs
 * tokens and positions [B,S] with S = 1, persistent ROLE_STATE tensors per layer (updated in
 * place), logits [B,S,vocab], then the on-device sampler. See docs/decode.md. */
int model_load_step(const char *src, size_t len, const char *chunkname, realm_model *m, char *err, size_t errlen);
/* The prefill graph of the same model file (g.mode == "prefill" in Lua): the parallel forward
 * (tokens [B,S] in, logits [B,S,vocab] out, no targets or loss) that also writes, into
 * ROLE_STATE tensors named and shaped exactly like the step graph's, the recurrent state at
 * the end of the sequence, for a sequence that starts at position 0 from an empty state.
 * Mamba-3 states are exact only when S is a multiple of every layer's chunk. See
 * docs/decode.md "Prefill". */
int model_load_prefill(const char *src, size_t len, const char *chunkname, realm_model *m, char *err,
                       size_t errlen);
void model_free(realm_model *m);
/* Read a model file and check that it builds, without keeping the graph: its text (malloc'd,
 * for compiling sessions from) and its train settings. -1 with the one-line error. */
int model_probe(const char *path, char **src, size_t *len, train_config *tc, char *err, size_t errlen);

#endif
