/* File-system helpers for crash-safe output.
 *
 * An atomic write goes to "<path>.tmp.<pid>" in the target's directory (same file system, so
 * rename is atomic), is fsync'd, renamed over the target, and then the directory is fsync'd
 * so the rename itself survives a power cut. A reader therefore sees either the old complete
 * file or the new complete file, never a prefix. On any failure the temporary is removed and
 * the target is untouched.
 *
 * All functions return 0 on success and -1 on failure with a one-line message in err (which
 * names the path and the failing system call). */
#ifndef REALM_FSUTIL_H
#define REALM_FSUTIL_H

#include <stddef.h>

/* A byte sink: the streaming writers (safetensors, checkpoints) produce output through this so
 * the same code can fill a file, a hash, or a memory buffer. Returns 0, or -1 on failure (the
 * sink keeps its own error message). */
typedef int (*fs_write_fn)(void *ctx, const void *data, size_t len);

int fs_write_atomic(const char *path, const void *data, size_t len, char *err, size_t errlen);

/* Streaming variant: open, write any number of times, then commit or abort. Exactly one of
 * commit/abort must be called; both free the handle. fs_atomic_write matches fs_write_fn. */
typedef struct fs_atomic fs_atomic;
fs_atomic *fs_atomic_open(const char *path, char *err, size_t errlen);
int fs_atomic_write(void *f, const void *data, size_t len);
int fs_atomic_commit(fs_atomic *f, char *err, size_t errlen);
void fs_atomic_abort(fs_atomic *f);

/* write(2) until done, retrying on EINTR and short writes. Sets errno on failure. */
int fs_write_all(int fd, const void *data, size_t len);
/* fsync a directory so renames/creations/removals inside it are durable. */
int fs_fsync_dir(const char *dir, char *err, size_t errlen);
/* Read a whole regular file (at most max_len bytes, else an error) into a malloc'd buffer
 * with a NUL appended (not counted in *len). */
int fs_read_file(const char *path, size_t max_len, char **data, size_t *len, char *err, size_t errlen);
/* Remove a file or a directory tree. Symbolic links are removed, never followed. A missing
 * path is not an error. */
int fs_remove_tree(const char *path, char *err, size_t errlen);
/* The directory part of path ("." if none), into out. */
int fs_dirname(const char *path, char *out, size_t outlen);
/* Create a directory and any missing parents (like mkdir -p). 0, or -1 with the reason. */
int fs_mkdir_p(const char *path, char *err, size_t errlen);

#endif
