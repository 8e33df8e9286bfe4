#include "safetensors.h"

#include "json.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The format is little-endian on disk and the reader hands out pointers into the mapping,
 * so a big-endian host would need byte swapping everywhere; refuse to build there. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host"
#endif

static const struct { const char *name; size_t size; } dtypes[ST_NDTYPES] = {
    [ST_BOOL] = {"BOOL", 1}, [ST_U8] = {"U8", 1},     [ST_I8] = {"I8", 1},
    [ST_I16] = {"I16", 2},   [ST_U16] = {"U16", 2},   [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2}, [ST_I32] = {"I32", 4},   [ST_U32] = {"U32", 4},
    [ST_F32] = {"F32", 4},   [ST_I64] = {"I64", 8},   [ST_U64] = {"U64", 8},
    [ST_F64] = {"F64", 8},   [ST_F8_E4M3] = {"F8_E4M3", 1}, [ST_F8_E5M2] = {"F8_E5M2", 1},
};

const char *st_dtype_name(st_dtype t) { return (unsigned)t < ST_NDTYPES ? dtypes[t].name : "?"; }
size_t st_dtype_size(st_dtype t) { return (unsigned)t < ST_NDTYPES ? dtypes[t].size : 0; }

int st_dtype_from_name(const char *s, st_dtype *out) {
    for (int i = 0; i < ST_NDTYPES; i++)
        if (!strcmp(s, dtypes[i].name)) { *out = (st_dtype)i; return 1; }
    return 0;
}

static void errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* numel and byte size with overflow checks: a header is untrusted input. */
static int tensor_bytes(st_dtype dt, int ndim, const int64_t *shape, uint64_t *numel, uint64_t *nbytes) {
    uint64_t n = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return -1;
        uint64_t s = (uint64_t)shape[d];
        if (s && n > UINT64_MAX / s) return -1;
        n *= s;
    }
    uint64_t es = st_dtype_size(dt);
    if (n > UINT64_MAX / es) return -1;
    *numel = n;
    *nbytes = n * es;
    return 0;
}

/* ---- writer ---- */

st_tensor st_f32(const char *name, const float *data, int ndim, const int64_t *shape) {
    st_tensor t = {.name = name, .dtype = ST_F32, .ndim = ndim, .data = data};
    for (int d = 0; d < ndim && d < ST_MAX_DIMS; d++) t.shape[d] = shape[d];
    return t;
}

static int build_header(const st_set *set, json_buf *h, uint64_t *total, char *err, size_t errlen) {
    if (set->n < 0 || set->nmeta < 0 || (set->n && !set->tensors) || (set->nmeta && !set->meta)) {
        errf(err, errlen, "invalid tensor set");
        return -1;
    }
    json_buf_put(h, "{", 1);
    if (set->nmeta) {
        json_buf_puts(h, "\"__metadata__\":{");
        for (int i = 0; i < set->nmeta; i++) {
            const st_meta *m = &set->meta[i];
            if (!m->key || !m->value) { errf(err, errlen, "metadata entry %d has no key or value", i); return -1; }
            for (int j = 0; j < i; j++)
                if (!strcmp(set->meta[j].key, m->key)) {
                    errf(err, errlen, "duplicate metadata key \"%s\"", m->key);
                    return -1;
                }
            if (i) json_buf_put(h, ",", 1);
            json_buf_str(h, m->key, strlen(m->key));
            json_buf_put(h, ":", 1);
            json_buf_str(h, m->value, strlen(m->value));
        }
        json_buf_put(h, "}", 1);
    }
    uint64_t off = 0;
    for (int i = 0; i < set->n; i++) {
        const st_tensor *t = &set->tensors[i];
        if (!t->name || !t->name[0]) { errf(err, errlen, "tensor %d has no name", i); return -1; }
        if (!strcmp(t->name, "__metadata__")) { errf(err, errlen, "\"__metadata__\" is not a valid tensor name"); return -1; }
        if ((unsigned)t->dtype >= ST_NDTYPES) { errf(err, errlen, "tensor %s: invalid dtype %d", t->name, (int)t->dtype); return -1; }
        if (t->ndim < 0 || t->ndim > ST_MAX_DIMS) {
            errf(err, errlen, "tensor %s: %d dimensions (0..%d supported)", t->name, t->ndim, ST_MAX_DIMS);
            return -1;
        }
        uint64_t numel, nb;
        if (tensor_bytes(t->dtype, t->ndim, t->shape, &numel, &nb) || nb > UINT64_MAX - off) {
            errf(err, errlen, "tensor %s: negative or overflowing shape", t->name);
            return -1;
        }
        if (nb && !t->data) { errf(err, errlen, "tensor %s: no data", t->name); return -1; }
        /* Names are few (one per parameter), so a quadratic duplicate check is fine. */
        for (int j = 0; j < i; j++)
            if (!strcmp(set->tensors[j].name, t->name)) {
                errf(err, errlen, "duplicate tensor name \"%s\"", t->name);
                return -1;
            }
        if (set->nmeta || i) json_buf_put(h, ",", 1);
        json_buf_str(h, t->name, strlen(t->name));
        json_buf_printf(h, ":{\"dtype\":\"%s\",\"shape\":[", st_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) json_buf_printf(h, d ? ",%" PRId64 : "%" PRId64, t->shape[d]);
        json_buf_printf(h, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off, off + nb);
        off += nb;
    }
    json_buf_put(h, "}", 1);
    /* Pad so the data buffer starts 8-byte aligned in the file (and in a mapping of it). */
    while (!h->oom && (8 + h->len) % 8) json_buf_put(h, " ", 1);
    if (h->oom) { errf(err, errlen, "out of memory building the header"); return -1; }
    *total = off;
    return 0;
}

int st_write(const st_set *set, fs_write_fn out, void *out_ctx, char *err, size_t errlen) {
    json_buf h = {0};
    uint64_t total;
    if (build_header(set, &h, &total, err, errlen)) { json_buf_free(&h); return -1; }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)h.len >> (8 * i));
    int rc = out(out_ctx, len8, 8) || out(out_ctx, h.p, h.len);
    json_buf_free(&h);
    for (int i = 0; !rc && i < set->n; i++) {
        const st_tensor *t = &set->tensors[i];
        uint64_t numel = 0, nb = 0;
        tensor_bytes(t->dtype, t->ndim, t->shape, &numel, &nb);   /* validated by build_header */
        if (nb) rc = out(out_ctx, t->data, (size_t)nb);
    }
    if (rc) { errf(err, errlen, "write failed"); return -1; }
    return 0;
}

int st_write_cb(void *set, fs_write_fn out, void *out_ctx, char *err, size_t errlen) {
    return st_write(set, out, out_ctx, err, errlen);
}

typedef struct { unsigned char *p; size_t len, cap; } membuf;

static int mem_sink(void *ctx, const void *data, size_t len) {
    membuf *m = ctx;
    if (len > SIZE_MAX / 2 - m->len) return -1;
    if (m->len + len > m->cap) {
        size_t cap = m->cap ? m->cap : 4096;
        while (cap < m->len + len) cap *= 2;
        unsigned char *q = realloc(m->p, cap);
        if (!q) return -1;
        m->p = q;
        m->cap = cap;
    }
    memcpy(m->p + m->len, data, len);
    m->len += len;
    return 0;
}

int st_write_mem(const st_set *set, void **buf, size_t *len, char *err, size_t errlen) {
    membuf m = {0};
    *buf = NULL;
    *len = 0;
    if (st_write(set, mem_sink, &m, err, errlen)) {
        free(m.p);
        return -1;
    }
    *buf = m.p;
    *len = m.len;
    return 0;
}

int st_save(const char *path, const st_set *set, char *err, size_t errlen) {
    fs_atomic *f = fs_atomic_open(path, err, errlen);
    if (!f) return -1;
    char e2[256];
    if (st_write(set, fs_atomic_write, f, e2, sizeof e2)) {
        fs_atomic_abort(f);
        errf(err, errlen, "%s: %s", path, e2);
        return -1;
    }
    return fs_atomic_commit(f, err, errlen);
}

/* ---- reader ---- */

struct st_file {
    void *map;               /* our mmap, or NULL when the image is borrowed */
    size_t map_len;
    json_doc *doc;           /* owns the decoded names and metadata strings */
    st_info *tensors;
    int n;
    st_meta *meta;
    int nmeta;
};

void st_close(st_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->map_len);
    json_free(f->doc);
    free(f->tensors);
    free(f->meta);
    free(f);
}

static int by_offset(const void *a, const void *b) {
    const st_info *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return (x->end > y->end) - (x->end < y->end);
}

/* A JSON integer usable as an offset or dimension: exact, non-negative. */
static int get_u64(const json_value *v, uint64_t *out) {
    int64_t i;
    if (!json_as_int(v, &i) || i < 0) return 0;
    *out = (uint64_t)i;
    return 1;
}

static int parse_tensor(const char *label, const json_member *m, st_info *t, char *err, size_t errlen) {
    const json_value *v = &m->value;
    const char *nm = m->key;
    if (memchr(m->key, 0, m->key_len) || m->key_len == 0) {
        errf(err, errlen, "%s: tensor name is empty or contains a NUL", label);
        return -1;
    }
    if (v->type != JSON_OBJECT) {
        errf(err, errlen, "%s: tensor \"%s\": expected an object, got %s", label, nm, json_type_name(v->type));
        return -1;
    }
    for (size_t k = 0; k < v->n; k++) {
        const char *key = v->members[k].key;
        if (strcmp(key, "dtype") && strcmp(key, "shape") && strcmp(key, "data_offsets")) {
            errf(err, errlen, "%s: tensor \"%s\": unknown field \"%.40s\"", label, nm, key);
            return -1;
        }
    }
    const char *ds;
    if (!json_as_string(json_get(v, "dtype"), &ds)) {
        errf(err, errlen, "%s: tensor \"%s\": missing or non-string \"dtype\"", label, nm);
        return -1;
    }
    if (!st_dtype_from_name(ds, &t->dtype)) {
        errf(err, errlen, "%s: tensor \"%s\": unknown dtype \"%.20s\"", label, nm, ds);
        return -1;
    }
    const json_value *sh = json_get(v, "shape");
    if (!sh || sh->type != JSON_ARRAY) {
        errf(err, errlen, "%s: tensor \"%s\": missing or non-array \"shape\"", label, nm);
        return -1;
    }
    if (sh->n > ST_MAX_DIMS) {
        errf(err, errlen, "%s: tensor \"%s\": %zu dimensions (at most %d supported)", label, nm, sh->n, ST_MAX_DIMS);
        return -1;
    }
    t->ndim = (int)sh->n;
    for (size_t d = 0; d < sh->n; d++) {
        uint64_t s;
        if (!get_u64(&sh->items[d], &s)) {
            errf(err, errlen, "%s: tensor \"%s\": shape[%zu] is not a non-negative integer", label, nm, d);
            return -1;
        }
        t->shape[d] = (int64_t)s;
    }
    const json_value *of = json_get(v, "data_offsets");
    if (!of || of->type != JSON_ARRAY || of->n != 2 || !get_u64(&of->items[0], &t->begin) ||
        !get_u64(&of->items[1], &t->end)) {
        errf(err, errlen, "%s: tensor \"%s\": \"data_offsets\" must be [begin, end] non-negative integers", label, nm);
        return -1;
    }
    if (t->end < t->begin) {
        errf(err, errlen, "%s: tensor \"%s\": data_offsets end %" PRIu64 " < begin %" PRIu64, label, nm, t->end, t->begin);
        return -1;
    }
    uint64_t nb;
    if (tensor_bytes(t->dtype, t->ndim, t->shape, &t->numel, &nb)) {
        errf(err, errlen, "%s: tensor \"%s\": shape overflows", label, nm);
        return -1;
    }
    if (nb != t->end - t->begin) {
        errf(err, errlen, "%s: tensor \"%s\": %s shape needs %" PRIu64 " bytes but data_offsets span %" PRIu64,
             label, nm, st_dtype_name(t->dtype), nb, t->end - t->begin);
        return -1;
    }
    t->name = nm;
    t->nbytes = (size_t)nb;
    return 0;
}

static st_file *open_image(const unsigned char *buf, size_t len, const char *label, char *err, size_t errlen) {
    if (len < 8) {
        errf(err, errlen, "%s: %zu bytes, too short for a safetensors file (no 8-byte header length)", label, len);
        return NULL;
    }
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)buf[i] << (8 * i);
    if (hlen > ST_MAX_HEADER) {
        errf(err, errlen, "%s: header length %" PRIu64 " exceeds the %" PRIu64 "-byte limit (not a safetensors file?)",
             label, hlen, ST_MAX_HEADER);
        return NULL;
    }
    if (hlen > len - 8) {
        errf(err, errlen, "%s: header length %" PRIu64 " runs past the end of the %zu-byte file (truncated?)",
             label, hlen, len);
        return NULL;
    }
    if (hlen < 2 || buf[8] != '{') {
        errf(err, errlen, "%s: header does not start with '{' (not a safetensors file?)", label);
        return NULL;
    }
    char jerr[200];
    json_limits lim = {.max_depth = 8, .max_bytes = ST_MAX_HEADER};
    json_doc *doc = json_parse((const char *)buf + 8, (size_t)hlen, &lim, jerr, sizeof jerr);
    if (!doc) {
        errf(err, errlen, "%s: header JSON %s", label, jerr);
        return NULL;
    }
    const json_value *root = json_root(doc);
    st_file *f = calloc(1, sizeof *f);
    if (!f) { json_free(doc); errf(err, errlen, "%s: out of memory", label); return NULL; }
    f->doc = doc;
    if (root->type != JSON_OBJECT) {
        errf(err, errlen, "%s: header is a JSON %s, not an object", label, json_type_name(root->type));
        goto bad;
    }
    f->tensors = calloc(root->n ? root->n : 1, sizeof *f->tensors);
    const json_value *md = json_get(root, "__metadata__");
    if (md && md->type != JSON_OBJECT) {
        errf(err, errlen, "%s: \"__metadata__\" must be an object of strings", label);
        goto bad;
    }
    f->meta = calloc(md && md->n ? md->n : 1, sizeof *f->meta);
    if (!f->tensors || !f->meta) { errf(err, errlen, "%s: out of memory", label); goto bad; }
    for (size_t i = 0; md && i < md->n; i++) {
        const json_member *m = &md->members[i];
        const char *val;
        if (memchr(m->key, 0, m->key_len) || !json_as_string(&m->value, &val)) {
            errf(err, errlen, "%s: metadata \"%.40s\": values must be strings (without NULs)", label, m->key);
            goto bad;
        }
        f->meta[f->nmeta++] = (st_meta){m->key, val};
    }
    for (size_t i = 0; i < root->n; i++) {
        const json_member *m = &root->members[i];
        if (!strcmp(m->key, "__metadata__") && m->key_len == 12) continue;
        if (parse_tensor(label, m, &f->tensors[f->n], err, errlen)) goto bad;
        f->n++;
    }
    /* The tensors must tile the buffer exactly, as the reference implementation requires:
     * sorted by offset, each starts where the previous ended, the last ends at the file end. */
    qsort(f->tensors, (size_t)f->n, sizeof *f->tensors, by_offset);
    uint64_t data_len = (uint64_t)len - 8 - hlen, pos = 0;
    for (int i = 0; i < f->n; i++) {
        st_info *t = &f->tensors[i];
        if (t->begin < pos) {
            errf(err, errlen, "%s: tensor \"%s\" (bytes %" PRIu64 "..%" PRIu64 ") overlaps tensor \"%s\" (ending at %" PRIu64 ")",
                 label, t->name, t->begin, t->end, f->tensors[i - 1].name, pos);
            goto bad;
        }
        if (t->begin > pos) {
            errf(err, errlen, "%s: gap of %" PRIu64 " bytes in the data buffer before tensor \"%s\"", label,
                 t->begin - pos, t->name);
            goto bad;
        }
        if (t->end > data_len) {
            errf(err, errlen, "%s: tensor \"%s\" ends at byte %" PRIu64 " of the data buffer, but the file holds only %" PRIu64
                 " data bytes (truncated?)", label, t->name, t->end, data_len);
            goto bad;
        }
        t->data = buf + 8 + hlen + t->begin;
        pos = t->end;
    }
    if (pos != data_len) {
        errf(err, errlen, "%s: %" PRIu64 " data bytes but the tensors cover %" PRIu64 " (trailing garbage or wrong header)",
             label, data_len, pos);
        goto bad;
    }
    return f;
bad:
    st_close(f);
    return NULL;
}

st_file *st_open_mem(const void *buf, size_t len, const char *label, char *err, size_t errlen) {
    return open_image(buf, len, label ? label : "(memory)", err, errlen);
}

st_file *st_open(const char *path, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { errf(err, errlen, "%s: cannot open: %s", path, strerror(errno)); return NULL; }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        errf(err, errlen, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    size_t len = (size_t)st.st_size;
    void *map = NULL;
    if (len) {
        map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            errf(err, errlen, "%s: cannot mmap: %s", path, strerror(errno));
            close(fd);
            return NULL;
        }
    }
    close(fd);   /* the mapping stays valid */
    st_file *f = open_image(map ? map : "", len, path, err, errlen);
    if (!f) {
        if (map) munmap(map, len);
        return NULL;
    }
    f->map = map;
    f->map_len = len;
    return f;
}

int st_count(const st_file *f) { return f->n; }
const st_info *st_at(const st_file *f, int i) { return i >= 0 && i < f->n ? &f->tensors[i] : NULL; }

const st_info *st_find(const st_file *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

int st_meta_count(const st_file *f) { return f->nmeta; }
const st_meta *st_meta_at(const st_file *f, int i) { return i >= 0 && i < f->nmeta ? &f->meta[i] : NULL; }

const char *st_meta_get(const st_file *f, const char *key) {
    for (int i = 0; i < f->nmeta; i++)
        if (!strcmp(f->meta[i].key, key)) return f->meta[i].value;
    return NULL;
}

static float half_to_f32(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v;
    if (e == 0) v = ldexpf((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexpf((float)(m | 0x400), e - 25);
    return (h & 0x8000) ? -v : v;
}

int st_copy_f32(const st_info *t, float *dst) {
    const unsigned char *p = t->data;
    size_t es = st_dtype_size(t->dtype);
    if (t->dtype == ST_F32) { memcpy(dst, p, t->nbytes); return 0; }
    for (uint64_t i = 0; i < t->numel; i++, p += es) {
        switch (t->dtype) {
        case ST_BF16: {
            uint16_t h; memcpy(&h, p, 2);
            uint32_t u = (uint32_t)h << 16;
            memcpy(&dst[i], &u, 4);
            break;
        }
        case ST_F16: { uint16_t h; memcpy(&h, p, 2); dst[i] = half_to_f32(h); break; }
        case ST_F64: { double d; memcpy(&d, p, 8); dst[i] = (float)d; break; }
        case ST_BOOL: case ST_U8: dst[i] = (float)p[0]; break;
        case ST_I8: dst[i] = (float)(int8_t)p[0]; break;
        case ST_I16: { int16_t v; memcpy(&v, p, 2); dst[i] = (float)v; break; }
        case ST_U16: { uint16_t v; memcpy(&v, p, 2); dst[i] = (float)v; break; }
        case ST_I32: { int32_t v; memcpy(&v, p, 4); dst[i] = (float)v; break; }
        case ST_U32: { uint32_t v; memcpy(&v, p, 4); dst[i] = (float)v; break; }
        case ST_I64: { int64_t v; memcpy(&v, p, 8); dst[i] = (float)v; break; }
        case ST_U64: { uint64_t v; memcpy(&v, p, 8); dst[i] = (float)v; break; }
        default: return -1;
        }
    }
    return 0;
}
