/* A small strict JSON (RFC 8259) reader and writer for the files realm itself reads and writes:
 * safetensors headers, checkpoint manifests, training state, corpus manifests.
 *
 * Reader: json_parse() builds a read-only tree inside one arena owned by a json_doc, so a
 * failed parse frees everything and a caller frees a whole document with one call. It is
 * strict on purpose (no comments, no trailing commas, no NaN, no duplicate keys, UTF-8 checked,
 * lone surrogates rejected) because these files are written by programs and anything odd in
 * them means corruption. Depth and size are bounded so hostile input cannot exhaust the stack
 * or memory, and every error names the byte offset (plus line and column) where it was found.
 *
 * Writer: json_buf is a growable byte buffer with helpers for escaped strings and numbers;
 * json_write() serialises a parsed value back (compact form). */
#ifndef REALM_JSON_H
#define REALM_JSON_H

#include <stddef.h>
#include <stdint.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;

typedef struct json_value json_value;
typedef struct json_member json_member;

struct json_value {
    json_type type;
    size_t offset;          /* byte offset of the value's first character in the input */
    int boolean;            /* JSON_BOOL */
    double num;             /* JSON_NUMBER: nearest double */
    int is_int;             /* JSON_NUMBER written without fraction/exponent and fits int64 */
    int64_t i;              /* ... then its exact value (exact beyond 2^53, unlike num) */
    const char *str;        /* JSON_STRING: decoded UTF-8, NUL-terminated ... */
    size_t len;             /* ... with this length (may contain \u0000, so use len) */
    size_t n;               /* JSON_ARRAY / JSON_OBJECT: number of elements / members */
    json_value *items;      /* JSON_ARRAY elements, in order */
    json_member *members;   /* JSON_OBJECT members, in document order */
    json_member **by_key;   /* JSON_OBJECT: members sorted by key, for binary-search lookup */
};

struct json_member {
    const char *key;        /* decoded, NUL-terminated */
    size_t key_len;
    json_value value;
};

typedef struct json_doc json_doc;

typedef struct {
    int max_depth;          /* nesting limit; 0 means 64 */
    size_t max_bytes;       /* input size limit; 0 means 256 MiB */
    size_t max_values;      /* node count limit (each costs ~100 bytes); 0 means 4 million */
} json_limits;

/* Parse len bytes (need not be NUL-terminated). Returns the document (free with json_free)
 * or NULL with a message like "at byte 17 (line 2, column 5): expected ':' after object key"
 * in err. lim may be NULL for defaults. Whitespace around the single top-level value is
 * allowed; anything else after it is an error. */
json_doc *json_parse(const char *src, size_t len, const json_limits *lim, char *err, size_t errlen);
const json_value *json_root(const json_doc *d);
void json_free(json_doc *d);

/* Lookups return NULL when absent or when v is not an object/array (so they chain). */
const json_value *json_get(const json_value *obj, const char *key);
const json_value *json_get_n(const json_value *obj, const char *key, size_t key_len);
const json_value *json_at(const json_value *arr, size_t i);
const char *json_type_name(json_type t);

/* Typed accessors: return 1 and store on success, 0 if v is absent or of another kind. */
int json_as_int(const json_value *v, int64_t *out);       /* exact integers only */
int json_as_string(const json_value *v, const char **out); /* rejects embedded NULs */

/* ---- writer ---- */
typedef struct {
    char *p;                /* NUL-terminated contents (NULL until something is written) */
    size_t len, cap;
    int oom;                /* set once an allocation failed; later writes are dropped */
} json_buf;

void json_buf_free(json_buf *b);
void json_buf_put(json_buf *b, const char *s, size_t n);
void json_buf_puts(json_buf *b, const char *s);
void json_buf_printf(json_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A quoted, escaped JSON string: ", \ and control bytes escaped; other bytes copied, so the
 * caller passes UTF-8. */
void json_buf_str(json_buf *b, const char *s, size_t n);
void json_buf_int(json_buf *b, int64_t v);
/* A decimal that reads back to the same double (%.17g); NaN/inf are not JSON, they become null. */
void json_buf_double(json_buf *b, double v);
/* Compact serialisation of a parsed value (object members in document order). */
void json_write(json_buf *b, const json_value *v);

#endif
