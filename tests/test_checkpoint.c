/* JSON reader/writer, safetensors, atomic files and checkpoints. */
#include "test.h"

#include "checkpoint.h"
#include "fsutil.h"
#include "json.h"
#include "safetensors.h"
#include "sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------- helpers ---------- */

static int mk_tmpdir(char out[64]) {
    snprintf(out, 64, "/tmp/realm-ck-XXXXXX");
    return mkdtemp(out) ? 0 : -1;
}

static void rm_tmpdir(const char *dir) {
    char e[256];
    fs_remove_tree(dir, e, sizeof e);
}

/* Run body in a fresh temp directory that is removed afterwards even when a CHECK fails. */
#define WITH_TMPDIR(body)                                                 \
    do {                                                                  \
        char dir_[64];                                                    \
        CHECK(mk_tmpdir(dir_) == 0, "mkdtemp: %s", strerror(errno));      \
        body(t, dir_);                                                    \
        rm_tmpdir(dir_);                                                  \
    } while (0)

static int path_exists(const char *dir, const char *name) {
    char p[512];
    struct stat st;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return stat(p, &st) == 0;
}

static int read_text(const char *dir, const char *name, char *out, size_t cap) {
    char p[512], *d, e[256];
    size_t n;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    if (fs_read_file(p, cap - 1, &d, &n, e, sizeof e)) return -1;
    memcpy(out, d, n + 1);
    free(d);
    return 0;
}

static int contains(const char *hay, const char *needle) { return hay && strstr(hay, needle) != NULL; }

/* ---------- JSON ---------- */

TEST(json_parse_values) {
    const char *src =
        " {\"a\": [1, -2, 3.5, 1e3, -0, 9007199254740993, -9223372036854775808, 9223372036854775807,"
        " 9223372036854775808, 0.1],\n \"s\": \"q\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\u20ac\\ud83d\\ude00\\u0000x\","
        " \"t\": true, \"f\": false, \"n\": null, \"o\": {}, \"e\": [], \"\\u00e9\": \"\xc3\xa9\" } ";
    char err[256];
    json_doc *d = json_parse(src, strlen(src), NULL, err, sizeof err);
    CHECK(d, "parse failed: %s", err);
    const json_value *r = json_root(d), *a = json_get(r, "a");
    int ok = r->type == JSON_OBJECT && r->n == 8 && a && a->type == JSON_ARRAY && a->n == 10;
    int64_t i;
    ok = ok && json_as_int(json_at(a, 0), &i) && i == 1;
    ok = ok && json_as_int(json_at(a, 1), &i) && i == -2;
    ok = ok && !json_as_int(json_at(a, 2), &i) && json_at(a, 2)->num == 3.5;
    ok = ok && !json_at(a, 3)->is_int && json_at(a, 3)->num == 1000.0;
    ok = ok && json_as_int(json_at(a, 4), &i) && i == 0;
    /* 2^53 + 1 is not a double; the integer path must keep it exact. */
    ok = ok && json_as_int(json_at(a, 5), &i) && i == 9007199254740993LL;
    ok = ok && json_as_int(json_at(a, 6), &i) && i == INT64_MIN;
    ok = ok && json_as_int(json_at(a, 7), &i) && i == INT64_MAX;
    ok = ok && !json_at(a, 8)->is_int && json_at(a, 8)->num == 9223372036854775808.0;
    ok = ok && json_at(a, 9)->num == 0.1 && !json_at(a, 10);
    const json_value *s = json_get(r, "s");
    static const char want[] = "q\"\\/\b\f\n\r\t\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\0x";
    ok = ok && s && s->type == JSON_STRING && s->len == sizeof want - 1 && !memcmp(s->str, want, s->len);
    const char *cs;
    ok = ok && !json_as_string(s, &cs);    /* embedded NUL: refused as a C string */
    ok = ok && json_get(r, "t")->boolean == 1 && json_get(r, "f")->type == JSON_BOOL && !json_get(r, "f")->boolean;
    ok = ok && json_get(r, "n")->type == JSON_NULL && json_get(r, "o")->n == 0 && json_get(r, "e")->n == 0;
    ok = ok && json_as_string(json_get(r, "\xc3\xa9"), &cs) && !strcmp(cs, "\xc3\xa9");
    ok = ok && !json_get(r, "missing") && !json_get(a, "a") && !json_at(r, 0);
    ok = ok && r->offset == 1 && a->offset == 7;
    json_free(d);
    CHECK(ok, "parsed values differ from expectations");
}

TEST(json_rejects_bad_input) {
    static const struct { const char *src; const char *msg; } cases[] = {
        {"", "at byte 0 (line 1, column 1): expected a value, found end of input"},
        {"   ", "at byte 3"},
        {"[1,]", "at byte 3 (line 1, column 4): expected a value, found ']'"},
        {"{\"a\":1,}", "expected a string key"},
        {"{\"a\" 1}", "expected ':' after object key"},
        {"[1 2]", "expected ',' or ']'"},
        {"01", "leading zero"},
        {"1.", "expected a digit after '.'"},
        {"1e", "expected a digit in exponent"},
        {"-", "expected a digit"},
        {"+1", "expected a value, found '+'"},
        {"NaN", "expected a value"},
        {"Infinity", "expected a value"},
        {"1e999", "number out of range"},
        {"tru", "invalid literal"},
        {"nul", "invalid literal"},
        {"\"abc", "unterminated string"},
        {"\"a\\x\"", "invalid escape"},
        {"\"\\u12G4\"", "bad hex digit"},
        {"\"\\ud800\"", "not followed by a low surrogate"},
        {"\"\\ud800\\u0041\"", "not a low surrogate"},
        {"\"\\udc00\"", "lone low surrogate"},
        {"\"a\tb\"", "control character 0x09"},
        {"\"\xff\"", "invalid UTF-8"},
        {"\"\xc0\xaf\"", "invalid UTF-8"},          /* overlong '/' */
        {"\"\xed\xa0\x80\"", "invalid UTF-8"},      /* encoded surrogate */
        {"\"\xf4\x90\x80\x80\"", "invalid UTF-8"},  /* above U+10FFFF */
        {"\"\xe2\x82\"", "invalid UTF-8"},          /* truncated sequence */
        {"{\"k\":1,\"k\":2}", "at byte 11 (line 1, column 12): duplicate key \"k\""},
        {"[1] x", "unexpected 'x' after the top-level value"},
        {"[1]\n]", "at byte 4 (line 2, column 1)"},
        {"/* c */ 1", "expected a value, found '/'"},
        {"\xef\xbb\xbf{}", "byte-order mark"},
        {"[\x01]", "found byte 0x01"},
    };
    char err[256];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_doc *d = json_parse(cases[i].src, strlen(cases[i].src), NULL, err, sizeof err);
        json_free(d);
        CHECK(!d, "case %zu (%s) was accepted", i, cases[i].src);
        CHECK(contains(err, cases[i].msg), "case %zu: message \"%s\" lacks \"%s\"", i, err, cases[i].msg);
    }
    /* An embedded NUL byte in the input is just an unexpected character. */
    json_doc *d = json_parse("[1,\0]", 5, NULL, err, sizeof err);
    CHECK(!d && contains(err, "byte 0x00"), "NUL byte: %s", err);
    /* Limits: depth and size. */
    char deep[200];
    memset(deep, '[', 100);
    memset(deep + 100, ']', 100);
    json_limits lim = {.max_depth = 64};
    d = json_parse(deep, 200, &lim, err, sizeof err);
    CHECK(!d && contains(err, "nesting deeper than 64"), "depth: %s", err);
    lim.max_depth = 100;
    d = json_parse(deep, 200, &lim, err, sizeof err);
    CHECK(d, "depth 100 within limit 100: %s", err);
    json_free(d);
    json_limits small = {.max_bytes = 10};
    d = json_parse("[1,2,3,4,5,6]", 13, &small, err, sizeof err);
    CHECK(!d && contains(err, "limit"), "size limit: %s", err);
    json_limits few = {.max_values = 3};
    d = json_parse("[1,2,3]", 7, &few, err, sizeof err);
    CHECK(!d && contains(err, "too many values"), "value limit: %s", err);
}

TEST(json_writer_roundtrip) {
    json_buf b = {0};
    json_buf_str(&b, "a\"b\\c\n\x01\x1f\xc3\xa9/", 11);
    CHECK(!b.oom && !strcmp(b.p, "\"a\\\"b\\\\c\\n\\u0001\\u001f\xc3\xa9/\""), "escaped: %s", b.p);
    json_buf_free(&b);
    json_buf_double(&b, 0.1);
    json_buf_puts(&b, " ");
    json_buf_double(&b, 1.0 / 0.0);
    json_buf_puts(&b, " ");
    json_buf_int(&b, INT64_MIN);
    CHECK(!strcmp(b.p, "0.10000000000000001 null -9223372036854775808"), "numbers: %s", b.p);
    json_buf_free(&b);

    const char *src = "{\"x\":[1,2.5,-3e-7,\"\\u0000\\n\",{\"y\":null,\"z\":[true,false]}],\"big\":9007199254740993}";
    char err[256];
    json_doc *d = json_parse(src, strlen(src), NULL, err, sizeof err);
    CHECK(d, "%s", err);
    json_write(&b, json_root(d));
    json_free(d);
    d = json_parse(b.p, b.len, NULL, err, sizeof err);
    CHECK(d, "re-parse of \"%s\": %s", b.p, err);
    json_buf b2 = {0};
    json_write(&b2, json_root(d));
    json_free(d);
    int same = b.len == b2.len && !memcmp(b.p, b2.p, b.len) && contains(b.p, "9007199254740993") &&
               contains(b.p, "\"\\u0000\\n\"");
    json_buf_free(&b);
    json_buf_free(&b2);
    CHECK(same, "write/parse/write is not a fixed point");
}

/* Random mutations of valid documents: the parser must return a tree or an error, never crash
 * or read out of bounds (run under ASan to make that meaningful), and whatever it accepts
 * must serialise and re-parse. */
TEST(json_fuzz) {
    static const char *seeds[] = {
        "{\"a\":[1,2,{\"b\":\"c\\u00e9\\ud83d\\ude00\"}],\"n\":-1.5e+10,\"t\":true,\"f\":false,\"z\":null}",
        "[[[[[]]]],{\"\":\"\"},\"\\\\\\\"\",0,-0.0,1E-3]",
        "{\"__metadata__\":{\"k\":\"v\"},\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}",
    };
    char buf[512], err[256];
    json_limits lim = {.max_depth = 16};
    for (int it = 0; it < 30000; it++) {
        const char *s = seeds[t_next(t) % 3];
        size_t n = strlen(s);
        memcpy(buf, s, n);
        int muts = 1 + (int)(t_next(t) % 4);
        for (int m = 0; m < muts && n > 0; m++) {
            size_t pos = t_next(t) % n;
            switch (t_next(t) % 6) {
            case 0: buf[pos] = (char)t_next(t); break;                                   /* random byte */
            case 1: buf[pos] ^= (char)(1u << (t_next(t) % 8)); break;                   /* bit flip */
            case 2: memmove(buf + pos, buf + pos + 1, n - pos - 1); n--; break;         /* delete */
            case 3:                                                                      /* insert */
                if (n < sizeof buf - 1) {
                    memmove(buf + pos + 1, buf + pos, n - pos);
                    buf[pos] = "{}[]\",:\\u0e-."[t_next(t) % 14];
                    n++;
                }
                break;
            case 4: n = pos; break;                                                      /* truncate */
            case 5: {                                                                    /* duplicate a span */
                size_t len = 1 + t_next(t) % 16;
                if (pos + len <= n && n + len < sizeof buf) {
                    memmove(buf + pos + len, buf + pos, n - pos);
                    n += len;
                }
                break;
            }
            }
        }
        /* Exact-size heap copy so ASan sees any read past the end. */
        char *in = malloc(n ? n : 1);
        CHECK(in, "malloc");
        memcpy(in, buf, n);
        err[0] = 0;
        json_doc *d = json_parse(in, n, &lim, err, sizeof err);
        if (!d) {
            free(in);
            CHECK(!strncmp(err, "at byte ", 8), "error without a position: \"%s\"", err);
            continue;
        }
        json_buf w = {0};
        json_write(&w, json_root(d));
        json_free(d);
        free(in);
        json_doc *d2 = json_parse(w.p, w.len, &lim, err, sizeof err);
        json_buf_free(&w);
        CHECK(d2, "accepted input does not round-trip: %s", err);
        json_free(d2);
    }
    /* Pure noise too. */
    for (int it = 0; it < 3000; it++) {
        size_t n = t_next(t) % 64;
        char *in = malloc(n ? n : 1);
        CHECK(in, "malloc");
        for (size_t k = 0; k < n; k++) in[k] = (char)t_next(t);
        json_free(json_parse(in, n, &lim, err, sizeof err));
        free(in);
    }
}

/* ---------- safetensors ---------- */

typedef struct {
    st_tensor t[8];
    void *bufs[8];
    int n;
    st_meta meta[3];
} tset;

static void tset_free(tset *s) {
    for (int i = 0; i < s->n; i++) free(s->bufs[i]);
}

/* Random tensors of awkward sizes and every dtype the trainer writes (BF16 optional because
 * numpy cannot load it in the Python cross-check). */
static void make_tset(tctx *t, tset *s, int with_bf16) {
    static const struct { const char *name; st_dtype dt; int ndim; int64_t shape[3]; } spec[] = {
        {"layers.0.mixer.in_proj.weight", ST_F32, 2, {7, 5}},
        {"embed.weight", ST_F32, 1, {13}},
        {"scalar", ST_F64, 0, {0}},
        {"counts", ST_I32, 3, {2, 3, 1}},
        {"bytes", ST_U8, 1, {11}},
        {"empty", ST_F32, 2, {0, 4}},
        {"half", ST_BF16, 2, {3, 3}},
    };
    memset(s, 0, sizeof *s);
    for (size_t i = 0; i < sizeof spec / sizeof spec[0]; i++) {
        if (spec[i].dt == ST_BF16 && !with_bf16) continue;
        st_tensor *x = &s->t[s->n];
        x->name = spec[i].name;
        x->dtype = spec[i].dt;
        x->ndim = spec[i].ndim;
        size_t numel = 1;
        for (int d = 0; d < x->ndim; d++) { x->shape[d] = spec[i].shape[d]; numel *= (size_t)x->shape[d]; }
        size_t nb = numel * st_dtype_size(x->dtype);
        unsigned char *p = malloc(nb ? nb : 1);
        for (size_t k = 0; k < numel; k++) {
            switch (x->dtype) {
            case ST_F32: { float v = (float)t_normal(t); memcpy(p + 4 * k, &v, 4); break; }
            case ST_F64: { double v = t_normal(t); memcpy(p + 8 * k, &v, 8); break; }
            case ST_I32: { int32_t v = (int32_t)t_next(t); memcpy(p + 4 * k, &v, 4); break; }
            case ST_BF16: { float v = (float)t_normal(t); uint32_t u; memcpy(&u, &v, 4);
                            uint16_t h = (uint16_t)(u >> 16); memcpy(p + 2 * k, &h, 2); break; }
            default: p[k] = (unsigned char)t_next(t); break;
            }
        }
        x->data = p;
        s->bufs[s->n++] = p;
    }
    s->meta[0] = (st_meta){"format", "pt"};
    s->meta[1] = (st_meta){"model", "realm-9m \"quoted\" \\ \xc3\xa9\n"};
    s->meta[2] = (st_meta){"step", "1234"};
}

static int same_tensor(const st_tensor *a, const st_info *b) {
    if (!b || a->dtype != b->dtype || a->ndim != b->ndim) return 0;
    size_t numel = 1;
    for (int d = 0; d < a->ndim; d++) {
        if (a->shape[d] != b->shape[d]) return 0;
        numel *= (size_t)a->shape[d];
    }
    size_t nb = numel * st_dtype_size(a->dtype);
    return b->nbytes == nb && (nb == 0 || !memcmp(a->data, b->data, nb));
}

/* Parse the header with nothing but the generic JSON reader and byte arithmetic, so the
 * writer is checked against the format definition rather than against our own reader. */
static void check_header_bytes(tctx *t, const unsigned char *img, size_t len, const tset *s) {
    CHECK(len >= 8, "image too short");
    uint64_t n = 0;
    for (int i = 0; i < 8; i++) n |= (uint64_t)img[i] << (8 * i);
    CHECK(n <= len - 8 && (8 + n) % 8 == 0, "header length %" PRIu64 " not padded to 8 (file %zu)", n, len);
    CHECK(img[8] == '{', "header does not start with '{'");
    size_t end = 8 + (size_t)n;
    while (end > 8 && img[end - 1] == ' ') end--;
    CHECK(img[end - 1] == '}' && 8 + n - end < 8, "header padding is not 0..7 trailing spaces");
    char err[256];
    json_doc *d = json_parse((const char *)img + 8, (size_t)n, NULL, err, sizeof err);
    CHECK(d, "header is not JSON: %s", err);
    const json_value *r = json_root(d), *md = json_get(r, "__metadata__");
    int ok = r->type == JSON_OBJECT && r->n == (size_t)s->n + 1 && md && md->n == 3;
    const char *v;
    ok = ok && json_as_string(json_get(md, "model"), &v) && !strcmp(v, s->meta[1].value);
    uint64_t pos = 0;
    for (int i = 0; ok && i < s->n; i++) {
        const json_value *e = json_get(r, s->t[i].name), *sh = json_get(e, "shape"), *of = json_get(e, "data_offsets");
        int64_t b0, b1, dim;
        ok = e && e->n == 3 && json_as_string(json_get(e, "dtype"), &v) && !strcmp(v, st_dtype_name(s->t[i].dtype));
        ok = ok && sh && sh->type == JSON_ARRAY && sh->n == (size_t)s->t[i].ndim;
        size_t numel = 1;
        for (int k = 0; ok && k < s->t[i].ndim; k++) {
            ok = json_as_int(json_at(sh, (size_t)k), &dim) && dim == s->t[i].shape[k];
            numel *= (size_t)dim;
        }
        size_t nb = numel * st_dtype_size(s->t[i].dtype);
        /* Laid out in the order given, back to back. */
        ok = ok && of && of->n == 2 && json_as_int(json_at(of, 0), &b0) && json_as_int(json_at(of, 1), &b1) &&
             (uint64_t)b0 == pos && (uint64_t)(b1 - b0) == nb;
        ok = ok && (nb == 0 || !memcmp(img + 8 + n + b0, s->t[i].data, nb));
        pos += nb;
    }
    json_free(d);
    CHECK(ok, "header fields or data bytes do not match what was written");
    CHECK(8 + n + pos == len, "file size %zu != 8 + header + data", len);
}

static void st_roundtrip_body(tctx *t, const char *dir) {
    tset s;
    make_tset(t, &s, 1);
    st_set set = {s.t, s.n, s.meta, 3};
    char path[256], err[512];
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    int rc = st_save(path, &set, err, sizeof err);
    void *img = NULL;
    size_t len = 0;
    int rc2 = st_write_mem(&set, &img, &len, err, sizeof err);
    st_file *f = rc ? NULL : st_open(path, err, sizeof err);
    st_file *fm = rc2 ? NULL : st_open_mem(img, len, "mem", err, sizeof err);
    int ok = f && fm && st_count(f) == s.n && st_count(fm) == s.n && st_meta_count(f) == 3;
    for (int i = 0; ok && i < s.n; i++) {
        ok = same_tensor(&s.t[i], st_find(f, s.t[i].name)) && same_tensor(&s.t[i], st_find(fm, s.t[i].name));
        ok = ok && st_at(f, i) && !strcmp(st_at(f, i)->name, s.t[i].name);   /* file order = given order */
    }
    ok = ok && !strcmp(st_meta_get(f, "model"), s.meta[1].value) && !st_meta_get(f, "nope") && !st_find(f, "nope");
    /* st_copy_f32 converts BF16 exactly (it is the top half of an F32). */
    const st_info *h = f ? st_find(f, "half") : NULL;
    float conv[9];
    if (ok && h && st_copy_f32(h, conv) == 0) {
        for (int k = 0; k < 9; k++) {
            uint32_t u;
            memcpy(&u, &conv[k], 4);
            uint16_t raw;
            memcpy(&raw, (const unsigned char *)h->data + 2 * k, 2);
            if ((u >> 16) != raw || (u & 0xffff)) ok = 0;
        }
    } else ok = 0;
    st_close(f);
    st_close(fm);
    if (ok) {
        /* The file and the memory image are the same bytes. */
        char *fb;
        size_t fl;
        ok = fs_read_file(path, 1 << 20, &fb, &fl, err, sizeof err) == 0 && fl == len && !memcmp(fb, img, len);
        if (fl) free(fb);
    }
    int tmp_left = 0;
    snprintf(path, sizeof path, "m.safetensors.tmp.%ld", (long)getpid());
    tmp_left = path_exists(dir, path);
    if (ok) check_header_bytes(t, img, len, &s);
    free(img);
    tset_free(&s);
    CHECK(rc == 0 && rc2 == 0, "write failed: %s", err);
    CHECK(ok, "round trip mismatch: %s", err);
    CHECK(!tmp_left, "temporary file left behind");
}

TEST(safetensors_roundtrip) { WITH_TMPDIR(st_roundtrip_body); }

static void st_write_errors_body(tctx *t, const char *dir) {
    (void)dir;
    float x[4] = {0};
    st_tensor a[2] = {st_f32("w", x, 1, (int64_t[]){4}), st_f32("w", x, 1, (int64_t[]){4})};
    st_set set = {a, 2, NULL, 0};
    void *img;
    size_t len;
    char err[256];
    CHECK(st_write_mem(&set, &img, &len, err, sizeof err) == -1 && contains(err, "duplicate tensor name \"w\""), "%s", err);
    a[1] = st_f32("__metadata__", x, 1, (int64_t[]){4});
    CHECK(st_write_mem(&set, &img, &len, err, sizeof err) == -1 && contains(err, "__metadata__"), "%s", err);
    a[1] = st_f32("v", x, 1, (int64_t[]){-4});
    CHECK(st_write_mem(&set, &img, &len, err, sizeof err) == -1 && contains(err, "tensor v"), "%s", err);
    char path[256];
    snprintf(path, sizeof path, "%s/no/such/dir/x.safetensors", dir);
    a[1] = st_f32("v", x, 1, (int64_t[]){4});
    CHECK(st_save(path, &set, err, sizeof err) == -1 && contains(err, path), "%s", err);
}

TEST(safetensors_write_errors) { WITH_TMPDIR(st_write_errors_body); }

/* Build an image from a hand-written header and n zero data bytes. */
static size_t make_image(unsigned char *out, size_t cap, const char *hdr, size_t ndata) {
    size_t h = strlen(hdr);
    if (8 + h + ndata > cap) return 0;
    for (int i = 0; i < 8; i++) out[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(out + 8, hdr, h);
    memset(out + 8 + h, 0, ndata);
    return 8 + h + ndata;
}

static void st_malformed_body(tctx *t, const char *dir) {
    static const struct { const char *hdr; size_t ndata; const char *msg; } cases[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlaps"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "gap of 4 bytes"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "needs 12 bytes but data_offsets span 8"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 9, "trailing garbage"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, "truncated"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "end 0 < begin 8"},
        {"{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unknown dtype \"F33\""},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.5]}}", 8, "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", 8, "unknown field \"x\""},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, "overflows"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "9 dimensions"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},}", 8, "header JSON at byte"},
        {"{\"a\":[1,2]}", 0, "expected an object"},
        {"{\"__metadata__\":{\"k\":1}}", 0, "metadata \"k\""},
        {"{\"__metadata__\":[]}", 0, "\"__metadata__\" must be an object"},
        {"[]      ", 0, "does not start with '{'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "duplicate key"},
    };
    unsigned char img[512];
    char err[512];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t n = make_image(img, sizeof img, cases[i].hdr, cases[i].ndata);
        CHECK(n, "case %zu too big", i);
        unsigned char *exact = malloc(n);
        memcpy(exact, img, n);
        st_file *f = st_open_mem(exact, n, "case.safetensors", err, sizeof err);
        st_close(f);
        free(exact);
        CHECK(!f, "malformed case %zu accepted", i);
        CHECK(contains(err, "case.safetensors: ") && contains(err, cases[i].msg), "case %zu: \"%s\" lacks \"%s\"", i, err,
              cases[i].msg);
    }
    /* Zero-size tensors may share an offset, and an empty file body is fine. */
    size_t n = make_image(img, sizeof img,
                          "{\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},"
                          "\"a\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]},"
                          "\"z\":{\"dtype\":\"I32\",\"shape\":[3,0],\"data_offsets\":[1,1]}}", 1);
    st_file *f = st_open_mem(img, n, "ok", err, sizeof err);
    CHECK(f && st_count(f) == 3 && st_find(f, "a")->numel == 1, "valid edge file refused: %s", err);
    st_close(f);

    /* Header-length field: absurd, past the end, too short a file. */
    n = make_image(img, sizeof img, "{}", 0);
    img[7] = 0x7f;
    CHECK(!st_open_mem(img, n, "x", err, sizeof err) && contains(err, "exceeds"), "%s", err);
    img[7] = 0;
    img[0] = 200;
    CHECK(!st_open_mem(img, n, "x", err, sizeof err) && contains(err, "runs past the end"), "%s", err);
    CHECK(!st_open_mem(img, 5, "x", err, sizeof err) && contains(err, "too short"), "%s", err);

    /* Every truncation of a real file is refused, and so named, on disk. */
    tset s;
    make_tset(t, &s, 1);
    st_set set = {s.t, s.n, s.meta, 3};
    void *good;
    size_t glen;
    int rc = st_write_mem(&set, &good, &glen, err, sizeof err);
    tset_free(&s);
    CHECK(rc == 0, "%s", err);
    int all_refused = 1;
    for (size_t cut = 0; cut < glen; cut++) {
        unsigned char *c = malloc(cut ? cut : 1);
        memcpy(c, good, cut);
        st_file *g = st_open_mem(c, cut, "t", err, sizeof err);
        if (g) all_refused = 0;
        st_close(g);
        free(c);
    }
    char path[256];
    snprintf(path, sizeof path, "%s/trunc.safetensors", dir);
    int wrc = fs_write_atomic(path, good, glen - 3, err, sizeof err);
    f = wrc ? NULL : st_open(path, err, sizeof err);
    int named = !f && contains(err, path) && contains(err, "truncated");
    st_close(f);

    /* Random corruption: refused or accepted, never a crash or an out-of-bounds view. */
    int fuzz_ok = 1;
    for (int it = 0; it < 3000 && fuzz_ok; it++) {
        unsigned char *c = malloc(glen);
        memcpy(c, good, glen);
        int k = 1 + (int)(t_next(t) % 3);
        for (int j = 0; j < k; j++) c[t_next(t) % glen] ^= (unsigned char)(1u << (t_next(t) % 8));
        st_file *g = st_open_mem(c, glen, "fz", err, sizeof err);
        for (int i = 0; g && i < st_count(g); i++) {
            const st_info *x = st_at(g, i);
            const unsigned char *p = x->data;
            if (p < c || p + x->nbytes > c + glen) fuzz_ok = 0;
            volatile unsigned char sink = 0;
            for (size_t b = 0; b < x->nbytes; b++) sink ^= p[b];
            (void)sink;
        }
        st_close(g);
        free(c);
    }
    free(good);
    CHECK(all_refused, "a truncated image was accepted");
    CHECK(named, "truncated file on disk: \"%s\"", err);
    CHECK(fuzz_ok, "accepted a corrupted file with tensor data out of bounds");
}

TEST(safetensors_malformed) { WITH_TMPDIR(st_malformed_body); }

/* ---------- independent reader: the Python safetensors package ---------- */

static const char *py_check =
    "import sys, json, hashlib\n"
    "import numpy as np\n"
    "import safetensors.numpy as stn\n"
    "from safetensors import safe_open\n"
    "out = []\n"
    "for path in sys.argv[1:3]:\n"
    "    with safe_open(path, framework='numpy') as f:\n"
    "        md = f.metadata() or {}\n"
    "        for k in sorted(md): out.append('meta %s %s' % (k, md[k].encode('utf-8').hex()))\n"
    "        for k in sorted(f.keys()):\n"
    "            sl = f.get_slice(k)\n"
    "            dt, shape = sl.get_dtype(), list(sl.get_shape())\n"
    "            h = '-'\n"
    "            if dt != 'BF16':\n"
    "                a = f.get_tensor(k)\n"
    "                assert list(a.shape) == shape, (k, a.shape, shape)\n"
    "                h = hashlib.sha256(np.ascontiguousarray(a).astype(a.dtype.newbyteorder('<')).tobytes()).hexdigest()\n"
    "            out.append('%s %s %s %s' % (k, dt, shape, h))\n"
    "    if 'bf16' not in path:\n"
    "        d = stn.load_file(path)\n"
    "        out.append('load_file %d' % len(d))\n"
    "stn.save_file({'a': (np.arange(6, dtype=np.float32) * 0.5).reshape(2, 3),\n"
    "               'b': np.array([1, -2, 3], dtype=np.int32),\n"
    "               'c': np.arange(5, dtype=np.uint8),\n"
    "               'd': np.array(2.25, dtype=np.float64)}, sys.argv[3], metadata={'who': 'python'})\n"
    "open(sys.argv[4], 'w').write('\\n'.join(out) + '\\n')\n";

static void expected_lines(const tset *s, json_buf *b, int with_meta) {
    if (with_meta) {
        /* keys sorted: format, model, step */
        for (int i = 0; i < 3; i++) {
            json_buf_printf(b, "meta %s ", s->meta[i].key);
            for (const char *c = s->meta[i].value; *c; c++) json_buf_printf(b, "%02x", (unsigned char)*c);
            json_buf_puts(b, "\n");
        }
    }
    int order[8];
    for (int i = 0; i < s->n; i++) order[i] = i;
    for (int i = 0; i < s->n; i++)
        for (int j = i + 1; j < s->n; j++)
            if (strcmp(s->t[order[j]].name, s->t[order[i]].name) < 0) { int x = order[i]; order[i] = order[j]; order[j] = x; }
    for (int oi = 0; oi < s->n; oi++) {
        const st_tensor *x = &s->t[order[oi]];
        json_buf_printf(b, "%s %s [", x->name, st_dtype_name(x->dtype));
        size_t numel = 1;
        for (int d = 0; d < x->ndim; d++) {
            json_buf_printf(b, d ? ", %" PRId64 : "%" PRId64, x->shape[d]);
            numel *= (size_t)x->shape[d];
        }
        char hex[65] = "-";
        if (x->dtype != ST_BF16) {
            uint8_t h[32];
            sha256(x->data, numel * st_dtype_size(x->dtype), h);
            sha256_hex(h, hex);
        }
        json_buf_printf(b, "] %s\n", hex);
    }
}

static void python_body(tctx *t, const char *dir) {
    const char *py = getenv("REALM_PYTHON");
    if (!py || !*py) py = "python3";
    char cmd[2048], out[8192];
    snprintf(cmd, sizeof cmd, "%s -c 'import safetensors.numpy, numpy'", py);
    if (t_run(cmd, out, sizeof out) != 0) {
        const char *allow = getenv("REALM_ALLOW_NO_PYTHON_SAFETENSORS");
        if (allow && !strcmp(allow, "1")) {
            printf("note: safetensors_python: %s has no safetensors/numpy; cross-check skipped "
                   "(REALM_ALLOW_NO_PYTHON_SAFETENSORS=1)\n", py);
            return;
        }
        CHECK(0, "the independent safetensors check needs Python: `%s -m pip install safetensors numpy` "
                 "(or REALM_PYTHON=/path/to/python; REALM_ALLOW_NO_PYTHON_SAFETENSORS=1 skips it)", py);
    }
    tset a, b;
    make_tset(t, &a, 0);
    make_tset(t, &b, 1);
    st_set sa = {a.t, a.n, a.meta, 3}, sb = {b.t, b.n, NULL, 0};
    char pa[256], pb[256], pc[256], ps[256], err[512];
    snprintf(pa, sizeof pa, "%s/a.safetensors", dir);
    snprintf(pb, sizeof pb, "%s/b-bf16.safetensors", dir);
    snprintf(pc, sizeof pc, "%s/from-python.safetensors", dir);
    snprintf(ps, sizeof ps, "%s/check.py", dir);
    int rc = st_save(pa, &sa, err, sizeof err) || st_save(pb, &sb, err, sizeof err) ||
             fs_write_atomic(ps, py_check, strlen(py_check), err, sizeof err);
    json_buf want = {0};
    expected_lines(&a, &want, 1);
    json_buf_printf(&want, "load_file %d\n", a.n);
    expected_lines(&b, &want, 0);
    tset_free(&a);
    tset_free(&b);
    if (rc) json_buf_free(&want);
    CHECK(!rc, "%s", err);
    /* Results go to a file so that Python warnings on stderr cannot disturb the comparison. */
    snprintf(cmd, sizeof cmd, "%s %s %s %s %s %s/py.out", py, ps, pa, pb, pc, dir);
    int prc = t_run(cmd, out, sizeof out);
    char got[8192] = "";
    int same = prc == 0 && read_text(dir, "py.out", got, sizeof got) == 0 && !strcmp(got, want.p);
    if (!same) {
        fprintf(stderr, "python wrote:\n%s\nexpected:\n%s", got, want.p);
    }
    json_buf_free(&want);
    CHECK(prc == 0, "python failed to read our files (rc %d): %.600s", prc, out);
    CHECK(same, "python's view of the files differs from what was written (diff on stderr)");

    /* And the reverse: our reader on a file written by the reference implementation. */
    st_file *f = st_open(pc, err, sizeof err);
    CHECK(f, "%s", err);
    const st_info *ta = st_find(f, "a"), *tb = st_find(f, "b"), *tc = st_find(f, "c"), *td = st_find(f, "d");
    int ok = st_count(f) == 4 && ta && tb && tc && td && st_meta_get(f, "who") && !strcmp(st_meta_get(f, "who"), "python");
    ok = ok && ta->dtype == ST_F32 && ta->ndim == 2 && ta->shape[0] == 2 && ta->shape[1] == 3;
    ok = ok && tb->dtype == ST_I32 && tb->numel == 3 && tc->dtype == ST_U8 && tc->numel == 5;
    ok = ok && td->dtype == ST_F64 && td->ndim == 0 && td->numel == 1;
    float v[6];
    for (int i = 0; ok && i < 6; i++) ok = st_copy_f32(ta, v) == 0 && v[i] == 0.5f * (float)i;
    int32_t iv[3];
    if (ok) memcpy(iv, tb->data, 12);
    ok = ok && iv[0] == 1 && iv[1] == -2 && iv[2] == 3 && ((const unsigned char *)tc->data)[4] == 4;
    double dv = 0;
    if (ok) memcpy(&dv, td->data, 8);
    ok = ok && dv == 2.25;
    st_close(f);
    CHECK(ok, "file written by Python safetensors read back wrong");
}

TEST(safetensors_python) { WITH_TMPDIR(python_body); }

/* ---------- atomic files ---------- */

static void fsutil_body(tctx *t, const char *dir) {
    char p[256], txt[64], err[512];
    snprintf(p, sizeof p, "%s/f.txt", dir);
    CHECK(fs_write_atomic(p, "one", 3, err, sizeof err) == 0, "%s", err);
    CHECK(fs_write_atomic(p, "second", 6, err, sizeof err) == 0, "%s", err);
    CHECK(read_text(dir, "f.txt", txt, sizeof txt) == 0 && !strcmp(txt, "second"), "content %s", txt);

    fs_atomic *a = fs_atomic_open(p, err, sizeof err);
    CHECK(a, "%s", err);
    fs_atomic_write(a, "half-", 5);
    /* Before commit the target still holds the old bytes. */
    int before = read_text(dir, "f.txt", txt, sizeof txt) == 0 && !strcmp(txt, "second");
    fs_atomic_abort(a);
    CHECK(before, "target changed before commit");
    CHECK(read_text(dir, "f.txt", txt, sizeof txt) == 0 && !strcmp(txt, "second"), "abort changed the target");
    a = fs_atomic_open(p, err, sizeof err);
    CHECK(a, "%s", err);
    CHECK(fs_atomic_write(a, "stream", 6) == 0 && fs_atomic_write(a, "ed", 2) == 0, "write");
    CHECK(fs_atomic_commit(a, err, sizeof err) == 0, "%s", err);
    CHECK(read_text(dir, "f.txt", txt, sizeof txt) == 0 && !strcmp(txt, "streamed"), "content %s", txt);
    snprintf(txt, sizeof txt, "f.txt.tmp.%ld", (long)getpid());
    CHECK(!path_exists(dir, txt), "temp file left behind");

    snprintf(p, sizeof p, "%s/missing/f.txt", dir);
    CHECK(fs_write_atomic(p, "x", 1, err, sizeof err) == -1 && contains(err, "missing/f.txt.tmp"), "%s", err);
    /* Renaming over a directory fails: the temp must be removed and the error reported. */
    snprintf(p, sizeof p, "%s/adir", dir);
    CHECK(mkdir(p, 0755) == 0 && mkdir(strcat(p, "/sub"), 0755) == 0, "mkdir");
    snprintf(p, sizeof p, "%s/adir", dir);
    CHECK(fs_write_atomic(p, "x", 1, err, sizeof err) == -1 && contains(err, "rename"), "%s", err);
    snprintf(txt, sizeof txt, "adir.tmp.%ld", (long)getpid());
    CHECK(!path_exists(dir, txt), "temp left after a failed rename");
    CHECK(fs_remove_tree(p, err, sizeof err) == 0 && !path_exists(dir, "adir"), "%s", err);
    CHECK(fs_remove_tree(p, err, sizeof err) == 0, "removing a missing path: %s", err);
}

TEST(fsutil_atomic_write) { WITH_TMPDIR(fsutil_body); }

/* ---------- checkpoints ---------- */

typedef struct {
    const char *run_dir;
    int fail;               /* make the writer fail half-way */
    int saw_previous;       /* while writing, were the older checkpoint and `latest` intact? */
    long expect_latest;
    const st_set *set;
} probe_ctx;

static int probe_writer(void *ctx, fs_write_fn out, void *out_ctx, char *err, size_t errlen) {
    probe_ctx *p = ctx;
    char txt[64], want[64];
    snprintf(want, sizeof want, "ckpt-%08ld\n", p->expect_latest);
    p->saw_previous = read_text(p->run_dir, "latest", txt, sizeof txt) == 0 && !strcmp(txt, want);
    want[strlen(want) - 1] = 0;
    char mf[128];
    snprintf(mf, sizeof mf, "%s/checkpoint.json", want);
    p->saw_previous = p->saw_previous && path_exists(p->run_dir, mf);
    if (out(out_ctx, "partial", 7)) return -1;
    if (p->fail) {
        snprintf(err, errlen, "simulated failure");
        return -1;
    }
    return st_write_cb((void *)p->set, out, out_ctx, err, errlen);
}

static int save_step(const char *run, long step, probe_ctx *pc, const st_set *set, char *err, size_t errlen) {
    char state[128];
    int n = snprintf(state, sizeof state, "{\"step\": %ld, \"rng\": [1, 2, 3, 4]}\n", step);
    ckpt_file files[3] = {
        {.name = "model.safetensors", .write = st_write_cb, .ctx = (void *)set},
        {.name = "optim.safetensors", .write = probe_writer, .ctx = pc},
        {.name = "state.json", .data = state, .len = (size_t)n},
    };
    return ckpt_save(run, step, files, 3, err, errlen);
}

static int count_ckpts(const char *run) {
    int n = 0;
    char nm[64];
    for (long s = 0; s <= 1000; s += 100) {
        snprintf(nm, sizeof nm, "ckpt-%08ld", s);
        n += path_exists(run, nm);
    }
    return n;
}

static void ckpt_rotate_body(tctx *t, const char *dir) {
    char run[256], err[512], found[512], txt[64];
    snprintf(run, sizeof run, "%s/run", dir);
    long step = -5;
    CHECK(ckpt_find_latest(run, found, sizeof found, &step, err, sizeof err) == 0, "no run dir should mean none");
    tset s;
    make_tset(t, &s, 1);
    st_set set = {s.t, s.n, s.meta, 3};
    probe_ctx pc = {.run_dir = run, .set = &set};
    int rc = save_step(run, 100, &pc, &set, err, sizeof err);
    if (rc == 0) {
        pc.expect_latest = 100;
        rc = save_step(run, 200, &pc, &set, err, sizeof err);
    }
    int saw200 = pc.saw_previous;
    if (rc == 0) {
        pc.expect_latest = 200;
        rc = save_step(run, 300, &pc, &set, err, sizeof err);
    }
    int saw300 = pc.saw_previous;
    int failed_rc = 0, failed_tmp = 1;
    if (rc == 0) {
        pc.expect_latest = 300;
        pc.fail = 1;
        failed_rc = save_step(run, 400, &pc, &set, err, sizeof err);
        failed_tmp = path_exists(run, "ckpt-00000400.tmp") || path_exists(run, "ckpt-00000400");
    }
    tset_free(&s);
    CHECK(rc == 0, "save failed: %s", err);
    CHECK(saw200 && saw300, "the previous checkpoint or `latest` was disturbed before the new one was complete");
    CHECK(failed_rc == -1 && contains(err, "optim.safetensors") && contains(err, "simulated failure"),
          "failing writer: rc %d, \"%s\"", failed_rc, err);
    CHECK(!failed_tmp, "a failed save left its directory behind");
    CHECK(read_text(run, "latest", txt, sizeof txt) == 0 && !strcmp(txt, "ckpt-00000300\n"), "latest = %s", txt);
    CHECK(count_ckpts(run) == 2 && path_exists(run, "ckpt-00000200") && path_exists(run, "ckpt-00000300"),
          "expected exactly ckpt 200 and 300 to remain");
    CHECK(ckpt_find_latest(run, found, sizeof found, &step, err, sizeof err) == 1 && step == 300 &&
          contains(found, "/run/ckpt-00000300"), "find_latest: %s step %ld (%s)", found, step, err);
    long vstep = -1;
    CHECK(ckpt_verify(found, &vstep, err, sizeof err) == 0 && vstep == 300, "verify: %s", err);
    /* The manifest lists the files with sizes and sums that match an independent hash. */
    char mf[600], *m;
    size_t ml;
    snprintf(mf, sizeof mf, "%s/checkpoint.json", found);
    CHECK(fs_read_file(mf, 1 << 16, &m, &ml, err, sizeof err) == 0, "%s", err);
    json_doc *d = json_parse(m, ml, NULL, err, sizeof err);
    free(m);
    CHECK(d, "manifest JSON: %s", err);
    const json_value *r = json_root(d), *files = json_get(r, "files");
    int64_t v;
    int ok = json_as_int(json_get(r, "version"), &v) && v == CKPT_VERSION && json_as_int(json_get(r, "step"), &v) &&
             v == 300 && files && files->n == 3;
    for (size_t i = 0; ok && i < files->n; i++) {
        const char *name, *sum;
        ok = json_as_string(json_get(json_at(files, i), "name"), &name) &&
             json_as_string(json_get(json_at(files, i), "sha256"), &sum);
        char fp[600], *fb, hex[65];
        size_t fl;
        snprintf(fp, sizeof fp, "%s/%s", found, name);
        ok = ok && fs_read_file(fp, 1 << 20, &fb, &fl, err, sizeof err) == 0;
        if (ok) {
            uint8_t h[32];
            sha256(fb, fl, h);
            sha256_hex(h, hex);
            free(fb);
            ok = !strcmp(hex, sum) && json_as_int(json_get(json_at(files, i), "size"), &v) && (size_t)v == fl;
        }
    }
    json_free(d);
    CHECK(ok, "manifest does not describe the files");
    /* The weights inside are a valid safetensors file. */
    snprintf(mf, sizeof mf, "%s/model.safetensors", found);
    st_file *f = st_open(mf, err, sizeof err);
    int nt = f ? st_count(f) : -1;
    st_close(f);
    CHECK(nt == 7, "model.safetensors: %s", err);

    /* Re-saving the latest step replaces it and keeps the previous one. */
    make_tset(t, &s, 0);
    set = (st_set){s.t, s.n, NULL, 0};
    pc = (probe_ctx){.run_dir = run, .set = &set, .expect_latest = 300};
    rc = save_step(run, 300, &pc, &set, err, sizeof err);
    tset_free(&s);
    CHECK(rc == 0 && pc.saw_previous, "re-save: %s", err);
    CHECK(count_ckpts(run) == 2 && path_exists(run, "ckpt-00000200") && !path_exists(run, "ckpt-00000300.old.tmp"),
          "after re-saving step 300");
    CHECK(ckpt_verify(found, &vstep, err, sizeof err) == 0, "verify after re-save: %s", err);

    /* Invalid arguments. */
    ckpt_file bad = {.name = "../x", .data = "x", .len = 1};
    CHECK(ckpt_save(run, 500, &bad, 1, err, sizeof err) == -1 && contains(err, "invalid checkpoint file name"), "%s", err);
    bad.name = CKPT_MANIFEST;
    CHECK(ckpt_save(run, 500, &bad, 1, err, sizeof err) == -1, "manifest name accepted");
    CHECK(ckpt_save(run, -1, NULL, 0, err, sizeof err) == -1, "negative step accepted");
}

TEST(checkpoint_save_rotate) { WITH_TMPDIR(ckpt_rotate_body); }

static int corrupt(const char *dir, const char *name, long truncate_to, long flip_at) {
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    if (truncate_to >= 0) return truncate(p, truncate_to);
    int fd = open(p, O_RDWR);
    if (fd < 0) return -1;
    unsigned char c;
    int rc = pread(fd, &c, 1, flip_at) == 1 ? 0 : -1;
    c ^= 0x10;
    if (rc == 0 && pwrite(fd, &c, 1, flip_at) != 1) rc = -1;
    close(fd);
    return rc;
}

static void ckpt_corrupt_body(tctx *t, const char *dir) {
    char run[256], err[512], found[512];
    snprintf(run, sizeof run, "%s/run", dir);
    float w[64];
    for (int i = 0; i < 64; i++) w[i] = (float)t_normal(t);
    st_tensor tt = st_f32("w", w, 2, (int64_t[]){8, 8});
    st_set set = {&tt, 1, NULL, 0};
    ckpt_file files[2] = {
        {.name = "model.safetensors", .write = st_write_cb, .ctx = &set},
        {.name = "state.json", .data = "{\"step\": 7}\n", .len = 12},
    };
    CHECK(ckpt_save(run, 7, files, 2, err, sizeof err) == 0, "%s", err);
    long step;
    CHECK(ckpt_find_latest(run, found, sizeof found, &step, err, sizeof err) == 1 && step == 7, "%s", err);
    CHECK(ckpt_verify(found, NULL, err, sizeof err) == 0, "%s", err);

    /* Truncated. */
    CHECK(corrupt(found, "model.safetensors", 100, 0) == 0, "truncate: %s", strerror(errno));
    CHECK(ckpt_verify(found, NULL, err, sizeof err) == -1 && contains(err, "ckpt-00000007/model.safetensors") &&
          contains(err, "truncated") && !strchr(err, '\n'), "truncated file: \"%s\"", err);
    CHECK(ckpt_save(run, 7, files, 2, err, sizeof err) == 0, "%s", err);   /* restore */
    CHECK(ckpt_verify(found, NULL, err, sizeof err) == 0, "%s", err);

    /* One bit flipped, same size. */
    CHECK(corrupt(found, "model.safetensors", -1, 150) == 0, "flip");
    CHECK(ckpt_verify(found, NULL, err, sizeof err) == -1 && contains(err, "ckpt-00000007/model.safetensors") &&
          contains(err, "sha256 mismatch") && !strchr(err, '\n'), "bit flip: \"%s\"", err);
    CHECK(ckpt_save(run, 7, files, 2, err, sizeof err) == 0, "%s", err);
    CHECK(corrupt(found, "state.json", -1, 3) == 0, "flip");
    CHECK(ckpt_verify(found, NULL, err, sizeof err) == -1 && contains(err, "state.json: sha256 mismatch"), "%s", err);

    /* A missing file, and a damaged manifest. */
    CHECK(ckpt_save(run, 7, files, 2, err, sizeof err) == 0, "%s", err);
    char p[600];
    snprintf(p, sizeof p, "%s/state.json", found);
    unlink(p);
    CHECK(ckpt_verify(found, NULL, err, sizeof err) == -1 && contains(err, "state.json: missing"), "%s", err);
    CHECK(ckpt_save(run, 7, files, 2, err, sizeof err) == 0, "%s", err);
    CHECK(corrupt(found, CKPT_MANIFEST, 20, 0) == 0, "truncate manifest");
    CHECK(ckpt_verify(found, NULL, err, sizeof err) == -1 && contains(err, "checkpoint.json: corrupt manifest"), "%s", err);
    snprintf(p, sizeof p, "%s/%s", found, CKPT_MANIFEST);
    const char *future = "{\"format\": \"realm-checkpoint\", \"version\": 2, \"step\": 7, \"files\": []}";
    CHECK(fs_write_atomic(p, future, strlen(future), err, sizeof err) == 0, "%s", err);
    CHECK(ckpt_verify(found, NULL, err, sizeof err) == -1 && contains(err, "version 2"), "%s", err);
    const char *wrongstep = "{\"format\": \"realm-checkpoint\", \"version\": 1, \"step\": 8, \"files\": []}";
    CHECK(fs_write_atomic(p, wrongstep, strlen(wrongstep), err, sizeof err) == 0, "%s", err);
    CHECK(ckpt_verify(found, NULL, err, sizeof err) == -1 && contains(err, "step 8"), "%s", err);
    snprintf(p, sizeof p, "%s/nothing-here", run);
    CHECK(ckpt_verify(p, NULL, err, sizeof err) == -1 && contains(err, "nothing-here/checkpoint.json"), "%s", err);
}

TEST(checkpoint_verify_refuses_corruption) { WITH_TMPDIR(ckpt_corrupt_body); }

static void ckpt_tmp_body(tctx *t, const char *dir) {
    (void)t;
    char run[256], err[512], found[512], p[600];
    snprintf(run, sizeof run, "%s/run", dir);
    ckpt_file files[1] = {{.name = "state.json", .data = "{}", .len = 2}};
    CHECK(ckpt_save(run, 100, files, 1, err, sizeof err) == 0, "%s", err);
    /* A crash mid-save of a later step leaves a .tmp directory, possibly with a manifest. */
    snprintf(p, sizeof p, "%s/ckpt-00000200.tmp", run);
    CHECK(mkdir(p, 0755) == 0, "mkdir");
    snprintf(p, sizeof p, "%s/ckpt-00000200.tmp/checkpoint.json", run);
    CHECK(fs_write_atomic(p, "{", 1, err, sizeof err) == 0, "%s", err);
    snprintf(p, sizeof p, "%s/latest.tmp.99999", run);
    CHECK(fs_write_atomic(p, "ckpt-", 5, err, sizeof err) == 0, "%s", err);
    long step = -1;
    CHECK(ckpt_find_latest(run, found, sizeof found, &step, err, sizeof err) == 1 && step == 100, "found %ld", step);
    /* Without `latest`, the scan also ignores the .tmp directory. */
    snprintf(p, sizeof p, "%s/latest", run);
    unlink(p);
    CHECK(ckpt_find_latest(run, found, sizeof found, &step, err, sizeof err) == 1 && step == 100, "scan found %ld", step);
    /* A dangling `latest` falls back to the newest complete directory. */
    CHECK(fs_write_atomic(p, "ckpt-00000900\n", 14, err, sizeof err) == 0, "%s", err);
    CHECK(ckpt_find_latest(run, found, sizeof found, &step, err, sizeof err) == 1 && step == 100, "dangling: %ld", step);
    /* Garbage in `latest` is an error, not a silent guess. */
    CHECK(fs_write_atomic(p, "../../etc\n", 10, err, sizeof err) == 0, "%s", err);
    CHECK(ckpt_find_latest(run, found, sizeof found, &step, err, sizeof err) == -1 && contains(err, "latest"), "%s", err);
    CHECK(fs_write_atomic(p, "ckpt-00000100\n", 14, err, sizeof err) == 0, "%s", err);
    /* The next save cleans the debris up. */
    CHECK(ckpt_save(run, 300, files, 1, err, sizeof err) == 0, "%s", err);
    CHECK(!path_exists(run, "ckpt-00000200.tmp") && !path_exists(run, "latest.tmp.99999"), "leftovers not cleaned");
    CHECK(path_exists(run, "ckpt-00000100") && path_exists(run, "ckpt-00000300"), "kept set wrong");
    /* An empty run directory has no checkpoint. */
    snprintf(p, sizeof p, "%s/empty", dir);
    CHECK(mkdir(p, 0755) == 0, "mkdir");
    CHECK(ckpt_find_latest(p, found, sizeof found, &step, err, sizeof err) == 0, "empty run dir");
}

TEST(checkpoint_ignores_leftover_tmp) { WITH_TMPDIR(ckpt_tmp_body); }
