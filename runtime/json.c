#include "json.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- arena: the whole tree lives in a few large blocks so freeing is one walk and a parse
 * error cannot leak half-built nodes ---- */

typedef struct arena_block {
    struct arena_block *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
} arena_block;

struct json_doc {
    arena_block *blocks;
    json_value root;
};

static void *arena_alloc(json_doc *d, size_t n) {
    n = (n + 15) & ~(size_t)15;
    arena_block *b = d->blocks;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        b = malloc(sizeof *b + cap);
        if (!b) return NULL;
        b->used = 0;
        b->cap = cap;
        b->next = d->blocks;
        d->blocks = b;
    }
    void *p = b->data + b->used;
    b->used += n;
    return p;
}

void json_free(json_doc *d) {
    if (!d) return;
    arena_block *b = d->blocks;
    while (b) {
        arena_block *next = b->next;
        free(b);
        b = next;
    }
    free(d);
}

const json_value *json_root(const json_doc *d) { return d ? &d->root : NULL; }

/* ---- parser ---- */

typedef struct {
    const unsigned char *s;
    size_t len, pos;
    int max_depth;
    size_t values_left;
    json_doc *doc;
    char *err;
    size_t errlen;
    int failed;
} parser;

static void fail_at(parser *p, size_t at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail_at(parser *p, size_t at, const char *fmt, ...) {
    if (p->failed) return;    /* keep the first, innermost message */
    p->failed = 1;
    if (!p->err || !p->errlen) return;
    size_t line = 1, col = 1;
    for (size_t i = 0; i < at && i < p->len; i++) {
        if (p->s[i] == '\n') { line++; col = 1; } else col++;
    }
    int k = snprintf(p->err, p->errlen, "at byte %zu (line %zu, column %zu): ", at, line, col);
    if (k < 0 || (size_t)k >= p->errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err + k, p->errlen - (size_t)k, fmt, ap);
    va_end(ap);
}

/* Describe the byte at pos for error messages, so "unexpected 'x'" is readable even for
 * binary garbage. */
static const char *describe(parser *p, size_t pos, char buf[16]) {
    if (pos >= p->len) return "end of input";
    unsigned c = p->s[pos];
    if (c >= 0x20 && c < 0x7f) snprintf(buf, 16, "'%c'", (char)c);
    else snprintf(buf, 16, "byte 0x%02x", c);
    return buf;
}

static void skip_ws(parser *p) {
    while (p->pos < p->len) {
        unsigned char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int read_hex4(parser *p, size_t at, unsigned *out) {
    if (p->len - at < 4) { fail_at(p, at, "truncated \\u escape"); return -1; }
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p->s[at + (size_t)i]);
        if (h < 0) { fail_at(p, at + (size_t)i, "bad hex digit in \\u escape"); return -1; }
        v = v * 16 + (unsigned)h;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of a valid UTF-8 sequence starting at s[i] (RFC 3629: no overlongs, no surrogates,
 * nothing above U+10FFFF), or 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t i, size_t len) {
    unsigned c = s[i];
    size_t n;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c == 0xE0) { n = 3; lo = 0xA0; }
    else if (c >= 0xE1 && c <= 0xEC) n = 3;
    else if (c == 0xED) { n = 3; hi = 0x9F; }
    else if (c >= 0xEE && c <= 0xEF) n = 3;
    else if (c == 0xF0) { n = 4; lo = 0x90; }
    else if (c >= 0xF1 && c <= 0xF3) n = 4;
    else if (c == 0xF4) { n = 4; hi = 0x8F; }
    else return 0;
    if (len - i < n) return 0;
    if (s[i + 1] < lo || s[i + 1] > hi) return 0;
    for (size_t k = 2; k < n; k++)
        if ((s[i + k] & 0xC0) != 0x80) return 0;
    return n;
}

/* p->pos is at the opening quote. Two passes: find the closing quote (escapes skipped) to size
 * the arena buffer, then decode and validate. Decoded text is never longer than the raw text. */
static int parse_string(parser *p, const char **out, size_t *out_len) {
    size_t start = p->pos + 1, end = start;
    while (end < p->len && p->s[end] != '"') end += (p->s[end] == '\\') ? 2 : 1;
    if (end >= p->len) { fail_at(p, p->pos, "unterminated string"); return -1; }
    char *o = arena_alloc(p->doc, end - start + 1);
    if (!o) { fail_at(p, p->pos, "out of memory"); return -1; }
    size_t k = 0, i = start;
    while (i < end) {
        unsigned char c = p->s[i];
        if (c < 0x20) { fail_at(p, i, "control character 0x%02x in string (must be escaped)", c); return -1; }
        if (c >= 0x80) {
            size_t n = utf8_seq(p->s, i, end);
            if (!n) { fail_at(p, i, "invalid UTF-8 in string"); return -1; }
            memcpy(o + k, p->s + i, n);
            k += n;
            i += n;
            continue;
        }
        if (c != '\\') { o[k++] = (char)c; i++; continue; }
        unsigned char e = p->s[i + 1];   /* i + 1 < end holds: end never stops inside an escape */
        switch (e) {
        case '"': o[k++] = '"'; break;
        case '\\': o[k++] = '\\'; break;
        case '/': o[k++] = '/'; break;
        case 'b': o[k++] = '\b'; break;
        case 'f': o[k++] = '\f'; break;
        case 'n': o[k++] = '\n'; break;
        case 'r': o[k++] = '\r'; break;
        case 't': o[k++] = '\t'; break;
        case 'u': {
            unsigned cp;
            if (read_hex4(p, i + 2, &cp)) return -1;
            if (cp >= 0xDC00 && cp <= 0xDFFF) { fail_at(p, i, "lone low surrogate \\u%04X", cp); return -1; }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (p->len - (i + 6) < 6 || p->s[i + 6] != '\\' || p->s[i + 7] != 'u') {
                    fail_at(p, i, "high surrogate \\u%04X not followed by a low surrogate", cp);
                    return -1;
                }
                if (read_hex4(p, i + 8, &lo)) return -1;
                if (lo < 0xDC00 || lo > 0xDFFF) {
                    fail_at(p, i + 6, "high surrogate \\u%04X followed by \\u%04X, not a low surrogate", cp, lo);
                    return -1;
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                i += 6;
            }
            k += put_utf8(o + k, cp);   /* at most 4 bytes from 6 (or 12) raw ones */
            i += 4;
            break;
        }
        default: fail_at(p, i, "invalid escape '\\%c'", e >= 0x20 && e < 0x7f ? e : '?'); return -1;
        }
        i += 2;
    }
    if (i > end) { fail_at(p, end, "truncated escape at end of string"); return -1; }
    o[k] = 0;
    *out = o;
    *out_len = k;
    p->pos = end + 1;
    return 0;
}

static int parse_number(parser *p, json_value *v) {
    size_t start = p->pos, i = start;
    const unsigned char *s = p->s;
    int neg = 0, integral = 1;
    if (i < p->len && s[i] == '-') { neg = 1; i++; }
    if (i >= p->len || s[i] < '0' || s[i] > '9') { fail_at(p, i, "expected a digit"); return -1; }
    size_t int_start = i;
    if (s[i] == '0') {
        i++;
        if (i < p->len && s[i] >= '0' && s[i] <= '9') { fail_at(p, start, "leading zero in number"); return -1; }
    } else {
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    }
    size_t int_end = i;
    if (i < p->len && s[i] == '.') {
        integral = 0;
        i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') { fail_at(p, i, "expected a digit after '.'"); return -1; }
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < p->len && (s[i] == 'e' || s[i] == 'E')) {
        integral = 0;
        i++;
        if (i < p->len && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') { fail_at(p, i, "expected a digit in exponent"); return -1; }
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    }
    /* strtod needs a terminated copy; the grammar above already rejected everything strtod
     * would accept beyond JSON (hex, inf, nan, leading '+'). */
    char buf[512];
    if (i - start >= sizeof buf) { fail_at(p, start, "number longer than %zu characters", sizeof buf - 1); return -1; }
    memcpy(buf, s + start, i - start);
    buf[i - start] = 0;
    errno = 0;
    double d = strtod(buf, NULL);
    if (isinf(d)) { fail_at(p, start, "number out of range: %s", buf); return -1; }
    v->type = JSON_NUMBER;
    v->num = d;
    if (integral) {
        /* Accumulate as a magnitude; -2^63 is representable, +2^63 is not. */
        uint64_t m = 0, limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
        int fits = 1;
        for (size_t k = int_start; k < int_end; k++) {
            unsigned dg = (unsigned)(s[k] - '0');
            if (m > (limit - dg) / 10) { fits = 0; break; }
            m = m * 10 + dg;
        }
        if (fits) {
            v->is_int = 1;
            v->i = neg ? (m == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)m) : (int64_t)m;
        }
    }
    p->pos = i;
    return 0;
}

static int literal(parser *p, const char *word) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0) {
        fail_at(p, p->pos, "invalid literal (expected '%s')", word);
        return -1;
    }
    p->pos += n;
    return 0;
}

static int key_cmp(const void *a, const void *b) {
    const json_member *x = *(json_member *const *)a, *y = *(json_member *const *)b;
    size_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(x->key, y->key, n);
    if (c) return c;
    return (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

/* Temporary growable vector for container children; they move into the arena once the
 * container's size is known. */
typedef struct { void *p; size_t n, cap, elem; } vec;

static void *vec_push(vec *v) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 8;
        void *q = realloc(v->p, cap * v->elem);
        if (!q) return NULL;
        v->p = q;
        v->cap = cap;
    }
    void *slot = (char *)v->p + v->n * v->elem;
    memset(slot, 0, v->elem);
    v->n++;
    return slot;
}

static int parse_value(parser *p, json_value *v, int depth);

static int parse_array(parser *p, json_value *v, int depth) {
    vec items = {.elem = sizeof(json_value)};
    size_t open = p->pos++;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == ']') {
        p->pos++;
    } else {
        for (;;) {
            json_value *slot = vec_push(&items);
            if (!slot) { fail_at(p, p->pos, "out of memory"); goto bad; }
            if (parse_value(p, slot, depth + 1)) goto bad;
            skip_ws(p);
            if (p->pos < p->len && p->s[p->pos] == ',') { p->pos++; continue; }
            if (p->pos < p->len && p->s[p->pos] == ']') { p->pos++; break; }
            char b[16];
            fail_at(p, p->pos, "expected ',' or ']' in array opened at byte %zu, found %s", open,
                    describe(p, p->pos, b));
            goto bad;
        }
    }
    v->type = JSON_ARRAY;
    v->n = items.n;
    if (items.n) {
        v->items = arena_alloc(p->doc, items.n * sizeof(json_value));
        if (!v->items) { fail_at(p, open, "out of memory"); goto bad; }
        memcpy(v->items, items.p, items.n * sizeof(json_value));
    }
    free(items.p);
    return 0;
bad:
    free(items.p);
    return -1;
}

static int parse_object(parser *p, json_value *v, int depth) {
    vec mem = {.elem = sizeof(json_member)};
    size_t open = p->pos++;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == '}') {
        p->pos++;
    } else {
        for (;;) {
            skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != '"') {
                char b[16];
                fail_at(p, p->pos, "expected a string key in object opened at byte %zu, found %s", open,
                        describe(p, p->pos, b));
                goto bad;
            }
            json_member *m = vec_push(&mem);
            if (!m) { fail_at(p, p->pos, "out of memory"); goto bad; }
            if (parse_string(p, &m->key, &m->key_len)) goto bad;
            skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') {
                char b[16];
                fail_at(p, p->pos, "expected ':' after object key, found %s", describe(p, p->pos, b));
                goto bad;
            }
            p->pos++;
            if (parse_value(p, &m->value, depth + 1)) goto bad;
            skip_ws(p);
            if (p->pos < p->len && p->s[p->pos] == ',') { p->pos++; continue; }
            if (p->pos < p->len && p->s[p->pos] == '}') { p->pos++; break; }
            char b[16];
            fail_at(p, p->pos, "expected ',' or '}' in object opened at byte %zu, found %s", open,
                    describe(p, p->pos, b));
            goto bad;
        }
    }
    v->type = JSON_OBJECT;
    v->n = mem.n;
    if (mem.n) {
        v->members = arena_alloc(p->doc, mem.n * sizeof(json_member));
        v->by_key = arena_alloc(p->doc, mem.n * sizeof(json_member *));
        if (!v->members || !v->by_key) { fail_at(p, open, "out of memory"); goto bad; }
        memcpy(v->members, mem.p, mem.n * sizeof(json_member));
        for (size_t i = 0; i < mem.n; i++) v->by_key[i] = &v->members[i];
        qsort(v->by_key, mem.n, sizeof(json_member *), key_cmp);
        /* Duplicate keys make "which value wins" reader-dependent, so refuse them. */
        for (size_t i = 1; i < mem.n; i++) {
            if (key_cmp(&v->by_key[i - 1], &v->by_key[i]) == 0) {
                const json_member *a = v->by_key[i - 1], *b = v->by_key[i];
                const json_member *later = a->value.offset > b->value.offset ? a : b;
                fail_at(p, later->value.offset, "duplicate key \"%.*s\" in object opened at byte %zu",
                        (int)(later->key_len > 64 ? 64 : later->key_len), later->key, open);
                goto bad;
            }
        }
    }
    free(mem.p);
    return 0;
bad:
    free(mem.p);
    return -1;
}

static int parse_value(parser *p, json_value *v, int depth) {
    skip_ws(p);
    memset(v, 0, sizeof *v);
    v->offset = p->pos;
    if (p->values_left == 0) { fail_at(p, p->pos, "too many values (limit reached)"); return -1; }
    p->values_left--;
    if (p->pos >= p->len) { fail_at(p, p->pos, "expected a value, found end of input"); return -1; }
    unsigned char c = p->s[p->pos];
    switch (c) {
    case '{':
    case '[':
        if (depth >= p->max_depth) { fail_at(p, p->pos, "nesting deeper than %d", p->max_depth); return -1; }
        return c == '{' ? parse_object(p, v, depth) : parse_array(p, v, depth);
    case '"':
        v->type = JSON_STRING;
        return parse_string(p, &v->str, &v->len);
    case 't': v->type = JSON_BOOL; v->boolean = 1; return literal(p, "true");
    case 'f': v->type = JSON_BOOL; return literal(p, "false");
    case 'n': v->type = JSON_NULL; return literal(p, "null");
    default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number(p, v);
        if (c == 0xEF && p->pos == 0) { fail_at(p, 0, "byte-order mark is not allowed"); return -1; }
        char b[16];
        fail_at(p, p->pos, "expected a value, found %s", describe(p, p->pos, b));
        return -1;
    }
}

json_doc *json_parse(const char *src, size_t len, const json_limits *lim, char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    int max_depth = lim && lim->max_depth > 0 ? lim->max_depth : 64;
    size_t max_bytes = lim && lim->max_bytes ? lim->max_bytes : (size_t)256 << 20;
    size_t max_values = lim && lim->max_values ? lim->max_values : (size_t)4 << 20;
    if (len > max_bytes) {
        if (err && errlen) snprintf(err, errlen, "input is %zu bytes, over the %zu-byte limit", len, max_bytes);
        return NULL;
    }
    if (!src && len) {
        if (err && errlen) snprintf(err, errlen, "no input");
        return NULL;
    }
    json_doc *d = calloc(1, sizeof *d);
    if (!d) {
        if (err && errlen) snprintf(err, errlen, "out of memory");
        return NULL;
    }
    parser p = {.s = (const unsigned char *)(src ? src : ""), .len = len, .max_depth = max_depth,
                .values_left = max_values, .doc = d, .err = err, .errlen = errlen};
    if (parse_value(&p, &d->root, 0) == 0) {
        skip_ws(&p);
        if (p.pos == p.len) return d;
        char b[16];
        fail_at(&p, p.pos, "unexpected %s after the top-level value", describe(&p, p.pos, b));
    }
    json_free(d);
    return NULL;
}

/* ---- lookup ---- */

const json_value *json_get_n(const json_value *obj, const char *key, size_t key_len) {
    if (!obj || obj->type != JSON_OBJECT || !key) return NULL;
    size_t lo = 0, hi = obj->n;
    json_member probe = {.key = key, .key_len = key_len};
    const json_member *pp = &probe;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = key_cmp(&pp, &obj->by_key[mid]);
        if (c == 0) return &obj->by_key[mid]->value;
        if (c < 0) hi = mid; else lo = mid + 1;
    }
    return NULL;
}

const json_value *json_get(const json_value *obj, const char *key) {
    return key ? json_get_n(obj, key, strlen(key)) : NULL;
}

const json_value *json_at(const json_value *arr, size_t i) {
    if (!arr || arr->type != JSON_ARRAY || i >= arr->n) return NULL;
    return &arr->items[i];
}

const char *json_type_name(json_type t) {
    switch (t) {
    case JSON_NULL: return "null";
    case JSON_BOOL: return "boolean";
    case JSON_NUMBER: return "number";
    case JSON_STRING: return "string";
    case JSON_ARRAY: return "array";
    case JSON_OBJECT: return "object";
    }
    return "?";
}

int json_as_int(const json_value *v, int64_t *out) {
    if (!v || v->type != JSON_NUMBER || !v->is_int) return 0;
    *out = v->i;
    return 1;
}

int json_as_string(const json_value *v, const char **out) {
    if (!v || v->type != JSON_STRING || memchr(v->str, 0, v->len)) return 0;
    *out = v->str;
    return 1;
}

/* ---- writer ---- */

void json_buf_free(json_buf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

static int buf_reserve(json_buf *b, size_t extra) {
    if (b->oom) return -1;
    if (extra > SIZE_MAX / 2 - b->len) { b->oom = 1; return -1; }
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *q = realloc(b->p, cap);
    if (!q) { b->oom = 1; return -1; }
    b->p = q;
    b->cap = cap;
    return 0;
}

void json_buf_put(json_buf *b, const char *s, size_t n) {
    if (buf_reserve(b, n)) return;
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void json_buf_puts(json_buf *b, const char *s) { json_buf_put(b, s, strlen(s)); }

void json_buf_printf(json_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) { b->oom = 1; return; }
    if (buf_reserve(b, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void json_buf_str(json_buf *b, const char *s, size_t n) {
    json_buf_put(b, "\"", 1);
    size_t run = 0;   /* copy unescaped stretches in one go */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char ubuf[8];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            if (c < 0x20) { snprintf(ubuf, sizeof ubuf, "\\u%04x", c); esc = ubuf; }
        }
        if (!esc) continue;
        json_buf_put(b, s + run, i - run);
        json_buf_puts(b, esc);
        run = i + 1;
    }
    json_buf_put(b, s + run, n - run);
    json_buf_put(b, "\"", 1);
}

void json_buf_int(json_buf *b, int64_t v) { json_buf_printf(b, "%" PRId64, v); }

void json_buf_double(json_buf *b, double v) {
    if (!isfinite(v)) { json_buf_puts(b, "null"); return; }
    json_buf_printf(b, "%.17g", v);
}

void json_write(json_buf *b, const json_value *v) {
    switch (v->type) {
    case JSON_NULL: json_buf_puts(b, "null"); break;
    case JSON_BOOL: json_buf_puts(b, v->boolean ? "true" : "false"); break;
    case JSON_NUMBER:
        if (v->is_int) json_buf_int(b, v->i);
        else json_buf_double(b, v->num);
        break;
    case JSON_STRING: json_buf_str(b, v->str, v->len); break;
    case JSON_ARRAY:
        json_buf_put(b, "[", 1);
        for (size_t i = 0; i < v->n; i++) {
            if (i) json_buf_put(b, ",", 1);
            json_write(b, &v->items[i]);
        }
        json_buf_put(b, "]", 1);
        break;
    case JSON_OBJECT:
        json_buf_put(b, "{", 1);
        for (size_t i = 0; i < v->n; i++) {
            if (i) json_buf_put(b, ",", 1);
            json_buf_str(b, v->members[i].key, v->members[i].key_len);
            json_buf_put(b, ":", 1);
            json_write(b, &v->members[i].value);
        }
        json_buf_put(b, "}", 1);
        break;
    }
}
