/* Crash-safe training checkpoints (layout: docs/formats.md, "Checkpoints").
 *
 *   <run_dir>/ckpt-00000200/        one complete checkpoint per directory
 *       model.safetensors ...       the files the caller gave
 *       checkpoint.json             manifest: format, version, step, name/size/sha256 per file
 *   <run_dir>/latest                "ckpt-00000200\n", replaced atomically
 *
 * A save builds ckpt-<step>.tmp/, fsyncs every file and the directory, renames it to
 * ckpt-<step>, fsyncs the run directory, then replaces `latest`, and only then deletes older
 * checkpoints (keeping the previous one) and leftovers of crashed saves. A crash at any point
 * therefore leaves `latest` naming a complete, checksummed checkpoint (or no checkpoint at all
 * before the first save completes). One process writes a run directory at a time.
 *
 * All functions write a one-line message (naming the path) into err on failure. */
#ifndef REALM_CHECKPOINT_H
#define REALM_CHECKPOINT_H

#include <stddef.h>

#include "fsutil.h"

#define CKPT_FORMAT "realm-checkpoint"
#define CKPT_VERSION 1
#define CKPT_MANIFEST "checkpoint.json"

/* Produces a file's bytes through out(); returns 0, or -1 with a message in err. The
 * safetensors writer st_write_cb has this signature. */
typedef int (*ckpt_writer_fn)(void *ctx, fs_write_fn out, void *out_ctx, char *err, size_t errlen);

typedef struct {
    const char *name;        /* plain file name: [A-Za-z0-9._-], not starting with '.',
                                not "checkpoint.json" */
    const void *data;        /* the bytes, used when write is NULL */
    size_t len;
    ckpt_writer_fn write;    /* or a streaming writer (large tensors need no extra copy) */
    void *ctx;
} ckpt_file;

/* Write checkpoint `step` (>= 0) into run_dir (created if missing, one level). Returns 0 or
 * -1; on failure no complete-looking checkpoint is left behind and earlier ones are intact.
 * Saving a step that already exists replaces it. */
int ckpt_save(const char *run_dir, long step, const ckpt_file *files, int nfiles, char *err, size_t errlen);

/* Find the checkpoint to resume from: the one `latest` names, or, when `latest` is missing or
 * names a directory that is gone, the highest-step ckpt-<step> directory holding a manifest
 * (leftover *.tmp directories are ignored). Returns 1 and fills dir_out ("<run_dir>/ckpt-...")
 * and *step (if non-NULL); 0 when there is none (including no run_dir); -1 on error. It does
 * not verify contents: call ckpt_verify next. */
int ckpt_find_latest(const char *run_dir, char *dir_out, size_t dir_len, long *step, char *err, size_t errlen);

/* Check a checkpoint directory against its manifest: format and version known, every listed
 * file present with the recorded size and sha256, step consistent with the directory name.
 * Returns 0 (and *step if non-NULL) or -1 with e.g.
 *   "runs/r/ckpt-00000200/model.safetensors: 4096 bytes, manifest says 8192 (truncated?)". */
int ckpt_verify(const char *ckpt_dir, long *step, char *err, size_t errlen);

#endif
