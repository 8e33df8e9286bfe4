#ifndef REALM_TRAIN_H
#define REALM_TRAIN_H

#include "frontend.h"
#include "session.h"

/* Learning rate at `step` (1-based): linear warmup, then cosine (or WSD, or constant) down to
 * lr * min_lr_frac at the last step. */
double train_lr(const train_config *c, long step);
/* Latest complete, verified checkpoint of a run: 1 found, 0 none, -1 damaged (err says which
 * file and why). */
int train_find_checkpoint(const char *run, char *dir, size_t dirlen, long *step, char *err, size_t errlen);
int train_read_model_source(const char *ckpt_dir, char **src, size_t *len, char *err, size_t errlen);
int train_load_weights(session *s, const char *ckpt_dir, char *err, size_t errlen);

#endif
