/* The training data path: a loader thread gathers batches from the memory-mapped corpus into
 * pinned host buffers (two, so one fills while the other uploads); the main thread uploads
 * them with async copies on a separate stream into two device staging slots, and the compute
 * stream waits on an event before copying a slot into the arena's tokens/targets. So the
 * gather of batch k+2 and the upload of batch k+1 overlap the compute of step k.
 *
 * Batch order is exactly the sampler's: batch j is the j-th draw from the PRNG state the
 * loader started from, and loader_next hands back the PRNG state right after the batch it
 * consumed, which is what a checkpoint must record even though the thread has run ahead. */
#ifndef REALM_LOADER_H
#define REALM_LOADER_H

#include "backend.h"
#include "corpus.h"
#include "exec.h"
#include "rng.h"

typedef struct loader loader;

/* Device bytes the loader allocates for (B, S): two staging slots of tokens + targets (fp32,
 * as the arena stores them). The memory model counts exactly this as "data buffers". */
size_t loader_device_bytes(long B, long S);

/* Allocate everything (device slots, pinned buffers, streams, events) and start the thread,
 * which will produce `nbatches` batches of B rows of S+1 bytes from `split`, starting from
 * PRNG state *rng. NULL with err on failure. */
loader *loader_create(backend *bk, const corpus *c, int split, const rng_state *rng, long B, long S, long nbatches,
                      char *err, size_t errlen);
/* Queue, on the compute stream of x, the copy of the next batch into tensors `tokens` and
 * `targets` (contiguous [B, S] owners), and start the upload of the batch after it. Kernels
 * queued afterwards on x's stream see the batch. *rng_after: sampler state after this batch. */
int loader_next(loader *ld, plan_exec *x, int tokens, int targets, rng_state *rng_after, char *err, size_t errlen);
void loader_destroy(loader *ld);

#endif
