/* Training corpus: one raw byte file (documents joined by CORPUS_SEP) plus a JSON manifest
 * beside it (FILE.json) that records the sources, the checksum and the train/val split.
 * See docs/corpus.md for the format. The reader memory-maps the file, so opening is O(1)
 * in its size and every offset is 64-bit. */
#ifndef REALM_CORPUS_H
#define REALM_CORPUS_H

#include <stddef.h>
#include <stdint.h>

#include "rng.h"

/* Byte between two documents: ASCII "record separator". It never occurs in ordinary prose
 * or code, so the model can learn it as an unambiguous document boundary, and one byte costs
 * nothing. It is not escaped: a source that itself contains 0x1E is copied unchanged. */
#define CORPUS_SEP 0x1E
#define CORPUS_VAL_FRACTION 0.1      /* default held-out share: the last 10% of the bytes */
#define CORPUS_SNIFF_BYTES 8192      /* how much of a file decides text vs binary */

enum { CORPUS_TRAIN = 0, CORPUS_VAL = 1 };

typedef struct corpus corpus;

/* Maps PATH and reads PATH.json if it exists; without one, PATH is plain text and the split
 * is first 90% train / last 10% val. NULL on error with a one-line message naming the file
 * in err. */
corpus *corpus_open(const char *path, char *err, size_t errlen);
void corpus_close(corpus *c);

const char *corpus_path(const corpus *c);
uint64_t corpus_bytes(const corpus *c);                 /* whole file */
uint64_t corpus_size(const corpus *c, int split);       /* bytes in split (0 train, 1 val) */
const uint8_t *corpus_data(const corpus *c);            /* the mapping, corpus_bytes long */
int corpus_has_manifest(const corpus *c);
long corpus_nsources(const corpus *c);                  /* -1 without a manifest */
long corpus_ndocuments(const corpus *c);                /* -1 without a manifest */
const char *corpus_sha256(const corpus *c);             /* hex from the manifest, or "" */

/* 0 if both splits hold at least one window of rowlen bytes; else -1 and a one-line message
 * naming the file. Call once before training so a too-small corpus fails up front. */
int corpus_check(const corpus *c, long rowlen, char *err, size_t errlen);

/* nrows windows of rowlen (= S+1) bytes each, written back to back into out, every window
 * start drawn uniformly (rng_below) from all starts that keep the window inside the split.
 * corpus_sample_at also returns each window's file offset in offs (may be NULL).
 * 0 on success, -1 if the split is shorter than rowlen or an argument is invalid. */
int corpus_sample(const corpus *c, int split, rng_state *r, long nrows, long rowlen, uint8_t *out);
int corpus_sample_at(const corpus *c, int split, rng_state *r, long nrows, long rowlen,
                     uint8_t *out, uint64_t *offs);

/* len bytes starting off bytes into the split (for sequential validation passes).
 * 0 on success, -1 if [off, off+len) is not inside the split. */
int corpus_read(const corpus *c, int split, uint64_t off, long len, uint8_t *out);

/* Bytes held out for validation from a corpus of total bytes; the builder and the
 * no-manifest fallback share it so both cut in the same place. */
uint64_t corpus_val_bytes(uint64_t total, double val_fraction);

/* 1 if the first CORPUS_SNIFF_BYTES of buf (n bytes; more_follows if the file is longer)
 * look like text: no NUL byte and valid UTF-8. A multi-byte character cut by the end of
 * the window counts as valid when more of the file follows. */
int corpus_is_text(const uint8_t *buf, size_t n, int more_follows);

typedef struct {
    double val_fraction;     /* share of bytes held out at the end, in [0, 1) */
} corpus_build_opts;

typedef struct {
    uint64_t bytes, train_bytes, val_bytes;
    long documents;          /* files copied */
    long skipped;            /* binary, empty, duplicate, special or looping entries */
    char sha256[65];
} corpus_build_result;

/* Concatenates the text files found in sources (files, or directories walked recursively in
 * byte order of names) into out, writes out.json, both atomically. 0 on success; 2 on bad
 * input or an unwritable output, with a one-line message naming the path in err. */
int corpus_build(const char *out, const char *const *sources, int nsources,
                 const corpus_build_opts *opts, corpus_build_result *res,
                 char *err, size_t errlen);

/* `realm corpus build|info ...`; argv[0] is "corpus". Returns the exit status (0 or 2). */
int cmd_corpus(int argc, char **argv);

#endif
