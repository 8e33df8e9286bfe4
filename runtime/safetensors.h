/* The safetensors file format (https://github.com/huggingface/safetensors), written exactly so
 * that any safetensors reader loads realm's weights, and read with full validation so a
 * damaged or hostile file is refused with a message instead of being trusted.
 *
 *   bytes 0..7      N, the header length, unsigned 64-bit little-endian
 *   bytes 8..8+N    JSON header: {"__metadata__": {str: str}, "<tensor>": {"dtype": "F32",
 *                   "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
 *                   padded with spaces so 8+N is a multiple of 8
 *   bytes 8+N..     the data buffer; offsets are relative to its start; tensors are
 *                   row-major, little-endian, and tile the buffer exactly (no gaps, no
 *                   overlaps, nothing after the last one)
 *
 * Tensor data inside the buffer is not necessarily aligned to its element size (tensors are
 * packed in the order given), so read elements with memcpy or st_copy_f32(). */
#ifndef REALM_SAFETENSORS_H
#define REALM_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "fsutil.h"

#define ST_MAX_DIMS 8
/* The reference implementation's cap on the header; beyond it a file is refused. */
#define ST_MAX_HEADER ((uint64_t)100000000)

typedef enum {
    ST_BOOL, ST_U8, ST_I8, ST_I16, ST_U16, ST_F16, ST_BF16, ST_I32, ST_U32, ST_F32,
    ST_I64, ST_U64, ST_F64, ST_F8_E4M3, ST_F8_E5M2, ST_NDTYPES
} st_dtype;

const char *st_dtype_name(st_dtype t);            /* "F32", ... */
int st_dtype_from_name(const char *s, st_dtype *out); /* 1 found, 0 unknown */
size_t st_dtype_size(st_dtype t);                 /* bytes per element */

/* ---- writing ---- */

typedef struct {
    const char *name;        /* UTF-8, unique, not "__metadata__" */
    st_dtype dtype;
    int ndim;                /* 0 (a scalar) .. ST_MAX_DIMS */
    int64_t shape[ST_MAX_DIMS];
    const void *data;        /* product(shape) * st_dtype_size(dtype) bytes, little-endian */
} st_tensor;

typedef struct {
    const char *key, *value;
} st_meta;

/* Everything one file holds; also the ctx of st_write_cb. */
typedef struct {
    const st_tensor *tensors;
    int n;
    const st_meta *meta;     /* may be NULL */
    int nmeta;
} st_set;

/* Convenience: a float32 tensor with the given shape (ndim <= ST_MAX_DIMS). */
st_tensor st_f32(const char *name, const float *data, int ndim, const int64_t *shape);

/* Stream the file through out(). Validates names, shapes and sizes first, so nothing is
 * written for an invalid set. Returns 0, or -1 with a message. */
int st_write(const st_set *set, fs_write_fn out, void *out_ctx, char *err, size_t errlen);
/* Same, with the signature of a checkpoint writer callback (ckpt_file.write): ctx is st_set*. */
int st_write_cb(void *set, fs_write_fn out, void *out_ctx, char *err, size_t errlen);
/* Into a malloc'd buffer. */
int st_write_mem(const st_set *set, void **buf, size_t *len, char *err, size_t errlen);
/* Into a file, atomically (fsutil). */
int st_save(const char *path, const st_set *set, char *err, size_t errlen);

/* ---- reading ---- */

typedef struct {
    const char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    uint64_t numel;
    uint64_t begin, end;     /* data_offsets, relative to the buffer */
    const void *data;        /* into the mapped file; NOT necessarily aligned */
    size_t nbytes;
} st_info;

typedef struct st_file st_file;

/* mmap a file read-only and validate it completely. Errors read "<path>: <what is wrong>". */
st_file *st_open(const char *path, char *err, size_t errlen);
/* Validate an in-memory image (borrowed: it must outlive the st_file). label names it in
 * messages. */
st_file *st_open_mem(const void *buf, size_t len, const char *label, char *err, size_t errlen);
void st_close(st_file *f);

int st_count(const st_file *f);
/* Tensors in data-offset order, i.e. file order. */
const st_info *st_at(const st_file *f, int i);
const st_info *st_find(const st_file *f, const char *name);
int st_meta_count(const st_file *f);
const st_meta *st_meta_at(const st_file *f, int i);
const char *st_meta_get(const st_file *f, const char *key);   /* NULL if absent */

/* Convert a tensor to float32 into dst (numel floats). Handles F32, BF16, F16, F64, the
 * integer types and BOOL; returns -1 for F8 types. */
int st_copy_f32(const st_info *t, float *dst);

#endif
