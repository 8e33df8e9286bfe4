/* Corpus builder, reader and the `realm corpus` command. Format: docs/corpus.md. */
#include "corpus.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "fsutil.h"
#include "json.h"
#include "sha256.h"

#define COPY_CHUNK (1u << 20)
#define MAX_DEPTH 256          /* deeper trees are almost surely a loop the inode check missed */
#define MAX_RANGES 64          /* byte ranges per split in a manifest */

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    /* Messages are promised to be one line; a path with a newline must not break that. */
    for (char *p = err; *p; p++)
        if (*p == '\n' || *p == '\r') *p = '?';
}

/* ---------------------------------------------------------------- text detection */

int corpus_is_text(const uint8_t *b, size_t n, int more_follows) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = b[i];
        if (c == 0) return 0;
        if (c < 0x80) { i++; continue; }
        /* RFC 3629 table: the allowed range of the second byte depends on the lead byte,
         * which is what excludes overlong forms, surrogates and code points past U+10FFFF. */
        size_t need;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c == 0xE0) { need = 2; lo = 0xA0; }
        else if (c == 0xED) { need = 2; hi = 0x9F; }
        else if (c >= 0xE1 && c <= 0xEF) need = 2;
        else if (c == 0xF0) { need = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) need = 3;
        else if (c == 0xF4) { need = 3; hi = 0x8F; }
        else return 0;
        for (size_t k = 1; k <= need; k++) {
            if (i + k >= n) return more_follows;   /* cut by the sniff window */
            uint8_t d = b[i + k];
            if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) return 0;
        }
        i += need + 1;
    }
    return 1;
}

uint64_t corpus_val_bytes(uint64_t total, double val_fraction) {
    if (!(val_fraction > 0)) return 0;
    if (val_fraction >= 1) return total;
    /* Exact in double up to 2^53 bytes (8 PiB); a corpus never gets near that. */
    double v = (double)total * val_fraction;
    uint64_t val = (uint64_t)v;
    return val > total ? total : val;
}

/* ---------------------------------------------------------------- manifest strings */

/* Paths are bytes, not necessarily UTF-8, but a manifest must be valid JSON (and json.c is
 * strict about UTF-8): valid sequences are copied, any other byte becomes U+FFFD. */
static void put_path(json_buf *b, const char *s) {
    size_t n = strlen(s);
    char *clean = malloc(3 * n + 1);
    if (!clean) { b->oom = 1; return; }
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        size_t len = 1;
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80) {
            len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
            if (i + len > n || !corpus_is_text((const uint8_t *)s + i, len, 0)) len = 0;
        }
        if (len == 0) { memcpy(clean + k, "\xEF\xBF\xBD", 3); k += 3; i++; continue; }
        memcpy(clean + k, s + i, len);
        k += len;
        i += len;
    }
    json_buf_str(b, clean, k);
    free(clean);
}

/* ---------------------------------------------------------------- source walk */

typedef struct { dev_t dev; ino_t ino; } file_id;
typedef struct { char *path; } doc_entry;
typedef struct { char *path; const char *reason; } skip_entry;

typedef struct {
    doc_entry *docs;
    long ndocs, capdocs;
    skip_entry *skips;
    long nskips, capskips;
    file_id *seen;            /* open-addressing set of files already taken */
    size_t seencap, nseen;
    file_id outs[2];          /* an existing OUT and OUT.json must not feed themselves */
    int nouts;
    file_id stack[MAX_DEPTH]; /* directories from the source root down to the current one */
    int depth;
    int oom;
} walker;

static int same_id(file_id a, file_id b) { return a.dev == b.dev && a.ino == b.ino; }

static size_t id_hash(file_id f, size_t mask) {
    uint64_t h = (uint64_t)f.dev * 0x9E3779B97F4A7C15ull ^ (uint64_t)f.ino * 0xBF58476D1CE4E5B9ull;
    return (size_t)(h ^ (h >> 29)) & mask;
}

/* Empty slots hold an id no real file has: the all-ones device and inode. */
static const file_id NO_ID = {(dev_t)-1, (ino_t)-1};

/* Returns 1 if f was new (and is now in the set), 0 if seen before, -1 when out of memory. */
static int seen_add(walker *w, file_id f) {
    if (2 * (w->nseen + 1) > w->seencap) {
        size_t cap = w->seencap ? 2 * w->seencap : 1024;
        file_id *t = malloc(cap * sizeof *t);
        if (!t) return -1;
        for (size_t j = 0; j < cap; j++) t[j] = NO_ID;
        for (size_t i = 0; i < w->seencap; i++) {
            if (same_id(w->seen[i], NO_ID)) continue;
            size_t j = id_hash(w->seen[i], cap - 1);
            while (!same_id(t[j], NO_ID)) j = (j + 1) & (cap - 1);
            t[j] = w->seen[i];
        }
        free(w->seen);
        w->seen = t;
        w->seencap = cap;
    }
    size_t j = id_hash(f, w->seencap - 1);
    for (; !same_id(w->seen[j], NO_ID); j = (j + 1) & (w->seencap - 1))
        if (same_id(w->seen[j], f)) return 0;
    w->seen[j] = f;
    w->nseen++;
    return 1;
}

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

static void add_doc(walker *w, const char *path) {
    if (w->ndocs == w->capdocs) {
        long cap = w->capdocs ? 2 * w->capdocs : 256;
        doc_entry *d = realloc(w->docs, (size_t)cap * sizeof *d);
        if (!d) { w->oom = 1; return; }
        w->docs = d;
        w->capdocs = cap;
    }
    char *p = xstrdup(path);
    if (!p) { w->oom = 1; return; }
    w->docs[w->ndocs++].path = p;
}

static void add_skip(walker *w, const char *path, const char *reason) {
    if (w->nskips == w->capskips) {
        long cap = w->capskips ? 2 * w->capskips : 64;
        skip_entry *s = realloc(w->skips, (size_t)cap * sizeof *s);
        if (!s) { w->oom = 1; return; }
        w->skips = s;
        w->capskips = cap;
    }
    char *p = xstrdup(path);
    if (!p) { w->oom = 1; return; }
    w->skips[w->nskips].path = p;
    w->skips[w->nskips++].reason = reason;
}

static void walker_free(walker *w) {
    for (long i = 0; i < w->ndocs; i++) free(w->docs[i].path);
    for (long i = 0; i < w->nskips; i++) free(w->skips[i].path);
    free(w->docs);
    free(w->skips);
    free(w->seen);
}

/* Why a regular file would not be a document, or NULL if it is one. */
static const char *file_verdict(walker *w, const char *path, const struct stat *st) {
    file_id id = {st->st_dev, st->st_ino};
    for (int i = 0; i < w->nouts; i++)
        if (same_id(id, w->outs[i])) return "output";
    if (st->st_size == 0) return "empty";
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return "unreadable";
    uint8_t buf[CORPUS_SNIFF_BYTES];
    size_t n = 0;
    while (n < sizeof buf) {
        ssize_t r = read(fd, buf + n, sizeof buf - n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += (size_t)r;
    }
    close(fd);
    if (n == 0) return "empty";
    if (!corpus_is_text(buf, n, (off_t)n < st->st_size)) return "binary";
    int fresh = seen_add(w, id);
    if (fresh < 0) { w->oom = 1; return "out of memory"; }
    if (!fresh) return "duplicate";
    return NULL;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Walks dir (already on w->stack); collects documents and skips. Returns documents added. */
static long walk_dir(walker *w, const char *dir) {
    long before = w->ndocs;
    DIR *d = opendir(dir);
    if (!d) { add_skip(w, dir, "unreadable"); return 0; }
    char **names = NULL;
    size_t nn = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        /* Hidden entries (.git, .cache, editor swap files) are tooling, not text to learn. */
        if (e->d_name[0] == '.') continue;
        if (nn == cap) {
            cap = cap ? 2 * cap : 64;
            char **t = realloc(names, cap * sizeof *t);
            if (!t) { w->oom = 1; break; }
            names = t;
        }
        if (!(names[nn] = xstrdup(e->d_name))) { w->oom = 1; break; }
        nn++;
    }
    closedir(d);
    /* readdir order depends on the file system; sorting makes the corpus reproducible. */
    if (nn) qsort(names, nn, sizeof *names, cmp_names);
    size_t dl = strlen(dir);
    int slash = dl > 0 && dir[dl - 1] == '/';
    for (size_t i = 0; i < nn && !w->oom; i++) {
        size_t pl = dl + 1 + strlen(names[i]) + 1;
        char *path = malloc(pl);
        if (!path) { w->oom = 1; break; }
        snprintf(path, pl, "%s%s%s", dir, slash ? "" : "/", names[i]);
        struct stat st;
        if (stat(path, &st) != 0) {
            add_skip(w, path, "dangling link or unreadable");
        } else if (S_ISDIR(st.st_mode)) {
            file_id id = {st.st_dev, st.st_ino};
            int loop = 0;
            for (int k = 0; k < w->depth; k++)
                if (same_id(id, w->stack[k])) loop = 1;
            if (loop) add_skip(w, path, "symlink loop");
            else if (w->depth == MAX_DEPTH) add_skip(w, path, "too deep");
            else {
                w->stack[w->depth++] = id;
                walk_dir(w, path);
                w->depth--;
            }
        } else if (S_ISREG(st.st_mode)) {
            const char *why = file_verdict(w, path, &st);
            if (why) add_skip(w, path, why);
            else add_doc(w, path);
        } else {
            add_skip(w, path, "not a regular file");
        }
        free(path);
    }
    for (size_t i = 0; i < nn; i++) free(names[i]);
    free(names);
    return w->ndocs - before;
}

/* ---------------------------------------------------------------- writing */

/* mkdir -p for the directory part of path, so `corpus build data/corpus.bin` just works. */
static int make_parents(const char *path) {
    char *p = xstrdup(path);
    if (!p) return -1;
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST) { free(p); return -1; }
        *s = '/';
    }
    free(p);
    return 0;
}

/* Appends one source file to the corpus; the separator goes in only once the document
 * is known to be non-empty, so a file that shrank to nothing since the walk leaves no stray
 * separator. Returns 0, 1 on a read error (errno set), 2 on a write error (reported by
 * fs_atomic_commit). */
static int copy_doc(fs_atomic *fa, int in, uint8_t *buf, sha256_ctx *all, uint64_t *total,
                    uint64_t *n, uint8_t digest[32]) {
    sha256_ctx one;
    sha256_init(&one);
    for (;;) {
        ssize_t r = read(in, buf, COPY_CHUNK);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return 1;
        if (r == 0) break;
        if (*n == 0 && *total) {
            uint8_t sep = CORPUS_SEP;
            if (fs_atomic_write(fa, &sep, 1) != 0) return 2;
            sha256_update(all, &sep, 1);
            (*total)++;
        }
        if (fs_atomic_write(fa, buf, (size_t)r) != 0) return 2;
        sha256_update(all, buf, (size_t)r);
        sha256_update(&one, buf, (size_t)r);
        *n += (uint64_t)r;
        *total += (uint64_t)r;
    }
    sha256_final(&one, digest);
    return 0;
}

int corpus_build(const char *out, const char *const *sources, int nsources,
                 const corpus_build_opts *opts, corpus_build_result *res,
                 char *err, size_t errlen) {
    double frac = opts ? opts->val_fraction : CORPUS_VAL_FRACTION;
    if (!(frac >= 0 && frac < 1)) {
        seterr(err, errlen, "--val-fraction must be in [0, 1), got %g", frac);
        return 2;
    }
    if (nsources <= 0) { seterr(err, errlen, "%s: no sources given", out); return 2; }

    size_t mlen = strlen(out) + 6;
    char *mpath = malloc(mlen);
    if (!mpath) { seterr(err, errlen, "out of memory"); return 2; }
    snprintf(mpath, mlen, "%s.json", out);

    walker w = {0};
    int status = 2;
    fs_atomic *fa = NULL;
    uint8_t *buf = NULL;
    json_buf js = {0}, src_js = {0};
    struct stat st;

    if (stat(out, &st) == 0) {
        if (S_ISDIR(st.st_mode)) { seterr(err, errlen, "%s: is a directory", out); goto done; }
        w.outs[w.nouts++] = (file_id){st.st_dev, st.st_ino};
    }
    if (stat(mpath, &st) == 0) w.outs[w.nouts++] = (file_id){st.st_dev, st.st_ino};

    for (int i = 0; i < nsources; i++) {
        const char *src = sources[i];
        if (stat(src, &st) != 0) {
            seterr(err, errlen, "%s: %s", src, strerror(errno));
            goto done;
        }
        if (S_ISDIR(st.st_mode)) {
            long nskip0 = w.nskips;
            w.depth = 0;
            w.stack[w.depth++] = (file_id){st.st_dev, st.st_ino};
            long got = walk_dir(&w, src);
            if (w.oom) break;
            if (got == 0) {
                seterr(err, errlen, "%s: directory has no text files (%ld entries skipped)",
                       src, w.nskips - nskip0);
                goto done;
            }
        } else if (S_ISREG(st.st_mode)) {
            const char *why = file_verdict(&w, src, &st);
            if (why && !strcmp(why, "binary")) {
                seterr(err, errlen, "%s: not a text file (NUL byte or invalid UTF-8 in the "
                       "first %d bytes)", src, CORPUS_SNIFF_BYTES);
                goto done;
            }
            if (why && (!strcmp(why, "unreadable") || !strcmp(why, "output"))) {
                seterr(err, errlen, "%s: %s", src, why[0] == 'o' ? "is the output itself"
                       : "cannot be read");
                goto done;
            }
            if (why) add_skip(&w, src, why);   /* empty or named twice: harmless */
            else add_doc(&w, src);
        } else {
            seterr(err, errlen, "%s: not a regular file or directory", src);
            goto done;
        }
        if (w.oom) break;
    }
    if (w.oom) { seterr(err, errlen, "out of memory while listing sources"); goto done; }
    if (w.ndocs == 0) {
        seterr(err, errlen, "%s: nothing to write: the sources hold no text", out);
        goto done;
    }

    if (make_parents(out) != 0) {
        seterr(err, errlen, "%s: cannot write: %s", out, strerror(errno));
        goto done;
    }
    char ferr[768];
    if (!(fa = fs_atomic_open(out, ferr, sizeof ferr))) {
        seterr(err, errlen, "%s", ferr);
        goto done;
    }
    buf = malloc(COPY_CHUNK);
    if (!buf) { seterr(err, errlen, "out of memory"); goto done; }

    sha256_ctx all;
    sha256_init(&all);
    uint64_t total = 0;
    long ndocs = 0;
    for (long i = 0; i < w.ndocs; i++) {
        const char *path = w.docs[i].path;
        int in = open(path, O_RDONLY | O_CLOEXEC);
        if (in < 0) {
            seterr(err, errlen, "%s: %s", path, strerror(errno));
            goto done;
        }
        uint64_t start = total + (total ? 1 : 0), n = 0;
        uint8_t h1[32];
        int rc = copy_doc(fa, in, buf, &all, &total, &n, h1);
        int saved = errno;
        close(in);
        errno = saved;
        if (rc == 1) {
            seterr(err, errlen, "%s: %s", path, strerror(errno));
            goto done;
        }
        if (rc == 2) break;   /* fs_atomic_commit below reports the write error */
        if (n == 0) { add_skip(&w, path, "empty"); continue; }
        char hex[65];
        sha256_hex(h1, hex);
        json_buf_printf(&src_js, "%s\n    {\"path\": ", ndocs ? "," : "");
        put_path(&src_js, path);
        json_buf_printf(&src_js, ", \"offset\": %llu, \"bytes\": %llu, \"sha256\": \"%s\"}",
                  (unsigned long long)start, (unsigned long long)n, hex);
        ndocs++;
    }
    if (total == 0) {
        seterr(err, errlen, "%s: nothing to write: the sources hold no text", out);
        goto done;
    }
    /* Data first: from here on OUT's new bytes are complete and durable. The old manifest is
     * dropped before they replace OUT, so no moment exists where a manifest describes
     * different data; a crash before the new manifest lands leaves a complete OUT with no
     * manifest, which the reader treats as plain text with the same default split. */
    if ((unlink(mpath) != 0 && errno != ENOENT)) {
        seterr(err, errlen, "%s: cannot replace: %s", mpath, strerror(errno));
        goto done;
    }
    int crc = fs_atomic_commit(fa, ferr, sizeof ferr);
    fa = NULL;
    if (crc != 0) { seterr(err, errlen, "%s", ferr); goto done; }

    uint8_t h[32];
    char hex[65];
    sha256_final(&all, h);
    sha256_hex(h, hex);
    uint64_t val = corpus_val_bytes(total, frac), train = total - val;

    json_buf_printf(&js, "{\n  \"format\": \"realm-corpus\",\n  \"version\": 1,\n");
    json_buf_printf(&js, "  \"separator_byte\": %d,\n", CORPUS_SEP);
    json_buf_printf(&js, "  \"bytes\": %llu,\n  \"sha256\": \"%s\",\n", (unsigned long long)total, hex);
    json_buf_printf(&js, "  \"documents\": %ld,\n  \"val_fraction\": %.15g,\n", ndocs, frac);
    json_buf_printf(&js, "  \"splits\": {\n    \"train\": [[0, %llu]],\n    \"val\": [[%llu, %llu]]\n  },\n",
              (unsigned long long)train, (unsigned long long)train, (unsigned long long)total);
    json_buf_printf(&js, "  \"sources\": [");
    if (src_js.p) json_buf_put(&js, src_js.p, src_js.len);
    json_buf_printf(&js, "\n  ],\n  \"skipped\": [");
    for (long i = 0; i < w.nskips; i++) {
        json_buf_printf(&js, "%s\n    {\"path\": ", i ? "," : "");
        put_path(&js, w.skips[i].path);
        json_buf_printf(&js, ", \"reason\": \"%s\"}", w.skips[i].reason);
    }
    json_buf_printf(&js, "%s]\n}\n", w.nskips ? "\n  " : "");
    if (js.oom || src_js.oom || w.oom) { seterr(err, errlen, "out of memory writing the manifest"); goto done; }

    if (fs_write_atomic(mpath, js.p, js.len, ferr, sizeof ferr) != 0) {
        seterr(err, errlen, "%s", ferr);
        goto done;
    }

    if (res) {
        res->bytes = total;
        res->train_bytes = train;
        res->val_bytes = val;
        res->documents = ndocs;
        res->skipped = w.nskips;
        memcpy(res->sha256, hex, sizeof hex);
    }
    status = 0;
done:
    if (fa) fs_atomic_abort(fa);
    free(buf);
    json_buf_free(&js);
    json_buf_free(&src_js);
    free(mpath);
    walker_free(&w);
    return status;
}

typedef struct { uint64_t lo, hi; } crange;

struct corpus {
    char *path;
    int fd;
    const uint8_t *data;
    uint64_t bytes;
    int has_manifest;
    long nsources, ndocs;
    char sha[65];
    crange r[2][MAX_RANGES];
    int nr[2];
    uint64_t size[2];
};

/* ---------------------------------------------------------------- reader */

static void split_sizes(corpus *c) {
    for (int s = 0; s < 2; s++) {
        c->size[s] = 0;
        for (int i = 0; i < c->nr[s]; i++) c->size[s] += c->r[s][i].hi - c->r[s][i].lo;
    }
}

/* Reads the split ranges and bookkeeping of mpath into c. 0 if there is no manifest or it was
 * read; -1 with a message if it exists but is unreadable, malformed or for other data. */
static int load_manifest(corpus *c, const char *mpath, char *err, size_t errlen) {
    struct stat st;
    if (stat(mpath, &st) != 0 && errno == ENOENT) return 0;
    char *text = NULL, e[768];
    size_t n = 0;
    if (fs_read_file(mpath, (size_t)1 << 30, &text, &n, e, sizeof e) != 0) {
        seterr(err, errlen, "%s", e);
        return -1;
    }
    json_doc *d = json_parse(text, n, NULL, e, sizeof e);
    free(text);
    if (!d) { seterr(err, errlen, "%s: malformed manifest: %s", mpath, e); return -1; }
    const json_value *root = json_root(d), *splits = json_get(root, "splits");
    int64_t bytes = -1, v;
    const char *sha;
    const char *bad = NULL;
    if (!json_as_int(json_get(root, "bytes"), &bytes) || bytes < 0) bad = "no valid \"bytes\"";
    else if (!splits || splits->type != JSON_OBJECT) bad = "no \"splits\" object";
    static const char *names[2] = {"train", "val"};
    for (int s = 0; s < 2 && !bad; s++) {
        const json_value *a = json_get(splits, names[s]);
        if (!a || a->type != JSON_ARRAY || a->n > MAX_RANGES) { bad = "bad split ranges"; break; }
        c->nr[s] = (int)a->n;
        for (size_t i = 0; i < a->n && !bad; i++) {
            int64_t lo, hi;
            const json_value *r = json_at(a, i);
            if (!r || r->type != JSON_ARRAY || r->n != 2 || !json_as_int(json_at(r, 0), &lo) ||
                !json_as_int(json_at(r, 1), &hi) || lo < 0 || lo > hi)
                bad = "bad split ranges";
            else
                c->r[s][i] = (crange){(uint64_t)lo, (uint64_t)hi};
        }
    }
    if (bad) {
        seterr(err, errlen, "%s: malformed manifest: %s", mpath, bad);
        json_free(d);
        return -1;
    }
    if (json_as_string(json_get(root, "sha256"), &sha) && strlen(sha) == 64)
        memcpy(c->sha, sha, 65);
    if (json_as_int(json_get(root, "documents"), &v)) c->ndocs = (long)v;
    const json_value *src = json_get(root, "sources");
    if (src && src->type == JSON_ARRAY) c->nsources = (long)src->n;
    json_free(d);
    if ((uint64_t)bytes != c->bytes) {
        seterr(err, errlen, "%s: file has %llu bytes but its manifest %s says %llu "
               "(rebuild the corpus)", c->path, (unsigned long long)c->bytes, mpath,
               (unsigned long long)bytes);
        return -1;
    }
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < c->nr[s]; i++)
            if (c->r[s][i].hi > c->bytes) {
                seterr(err, errlen, "%s: split range ends at %llu, past the end of %s",
                       mpath, (unsigned long long)c->r[s][i].hi, c->path);
                return -1;
            }
    c->has_manifest = 1;
    return 0;
}

corpus *corpus_open(const char *path, char *err, size_t errlen) {
    corpus *c = calloc(1, sizeof *c);
    char *mpath = NULL;
    if (!c || !(c->path = xstrdup(path))) {
        seterr(err, errlen, "%s: out of memory", path);
        goto fail;
    }
    c->fd = -1;
    c->nsources = c->ndocs = -1;
    c->fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (c->fd < 0 || fstat(c->fd, &st) != 0) {
        seterr(err, errlen, "%s: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) { seterr(err, errlen, "%s: not a regular file", path); goto fail; }
    if (st.st_size == 0) { seterr(err, errlen, "%s: corpus is empty", path); goto fail; }
    c->bytes = (uint64_t)st.st_size;
    if ((uint64_t)(size_t)c->bytes != c->bytes) {
        seterr(err, errlen, "%s: too large to map on this machine", path);
        goto fail;
    }
    /* Mapping costs nothing up front; pages come in as windows touch them. */
    void *m = mmap(NULL, (size_t)c->bytes, PROT_READ, MAP_SHARED, c->fd, 0);
    if (m == MAP_FAILED) { seterr(err, errlen, "%s: mmap: %s", path, strerror(errno)); goto fail; }
    c->data = m;
    /* Training reads scattered windows: read-ahead would only waste page cache. */
    madvise(m, (size_t)c->bytes, MADV_RANDOM);

    size_t ml = strlen(path) + 6;
    if (!(mpath = malloc(ml))) { seterr(err, errlen, "%s: out of memory", path); goto fail; }
    snprintf(mpath, ml, "%s.json", path);
    if (load_manifest(c, mpath, err, errlen) != 0) goto fail;
    if (!c->has_manifest) {
        uint64_t val = corpus_val_bytes(c->bytes, CORPUS_VAL_FRACTION);
        c->r[0][0] = (crange){0, c->bytes - val};
        c->r[1][0] = (crange){c->bytes - val, c->bytes};
        c->nr[0] = c->nr[1] = 1;
    }
    split_sizes(c);
    free(mpath);
    return c;
fail:
    free(mpath);
    corpus_close(c);
    return NULL;
}

void corpus_close(corpus *c) {
    if (!c) return;
    if (c->data) munmap((void *)c->data, (size_t)c->bytes);
    if (c->fd >= 0) close(c->fd);
    free(c->path);
    free(c);
}

const char *corpus_path(const corpus *c) { return c->path; }
uint64_t corpus_bytes(const corpus *c) { return c->bytes; }
const uint8_t *corpus_data(const corpus *c) { return c->data; }
int corpus_has_manifest(const corpus *c) { return c->has_manifest; }
long corpus_nsources(const corpus *c) { return c->nsources; }
long corpus_ndocuments(const corpus *c) { return c->ndocs; }
const char *corpus_sha256(const corpus *c) { return c->sha; }

uint64_t corpus_size(const corpus *c, int split) {
    return split == 0 || split == 1 ? c->size[split] : 0;
}

/* Number of window starts in a split: a window never straddles two ranges. */
static uint64_t window_starts(const corpus *c, int split, uint64_t rowlen) {
    uint64_t n = 0;
    for (int i = 0; i < c->nr[split]; i++) {
        uint64_t len = c->r[split][i].hi - c->r[split][i].lo;
        if (len >= rowlen) n += len - rowlen + 1;
    }
    return n;
}

int corpus_check(const corpus *c, long rowlen, char *err, size_t errlen) {
    static const char *names[2] = {"train", "val"};
    if (rowlen <= 0) { seterr(err, errlen, "%s: row length %ld is not positive", c->path, rowlen); return -1; }
    for (int s = 0; s < 2; s++)
        if (window_starts(c, s, (uint64_t)rowlen) == 0) {
            seterr(err, errlen, "%s: %s split has %llu bytes, too short for one row of %ld "
                   "bytes", c->path, names[s], (unsigned long long)c->size[s], rowlen);
            return -1;
        }
    return 0;
}

int corpus_sample_at(const corpus *c, int split, rng_state *r, long nrows, long rowlen,
                     uint8_t *out, uint64_t *offs) {
    if ((split != 0 && split != 1) || nrows < 0 || rowlen <= 0) return -1;
    uint64_t n = window_starts(c, split, (uint64_t)rowlen);
    if (n == 0) return -1;
    for (long row = 0; row < nrows; row++) {
        uint64_t k = rng_below(r, n), off = 0;
        for (int i = 0; i < c->nr[split]; i++) {
            uint64_t len = c->r[split][i].hi - c->r[split][i].lo;
            uint64_t m = len >= (uint64_t)rowlen ? len - (uint64_t)rowlen + 1 : 0;
            if (k < m) { off = c->r[split][i].lo + k; break; }
            k -= m;
        }
        memcpy(out + (size_t)row * (size_t)rowlen, c->data + off, (size_t)rowlen);
        if (offs) offs[row] = off;
    }
    return 0;
}

int corpus_sample(const corpus *c, int split, rng_state *r, long nrows, long rowlen, uint8_t *out) {
    return corpus_sample_at(c, split, r, nrows, rowlen, out, NULL);
}

int corpus_read(const corpus *c, int split, uint64_t off, long len, uint8_t *out) {
    if ((split != 0 && split != 1) || len < 0) return -1;
    if (off > c->size[split] || (uint64_t)len > c->size[split] - off) return -1;
    uint64_t want = (uint64_t)len;
    for (int i = 0; i < c->nr[split] && want; i++) {
        uint64_t rl = c->r[split][i].hi - c->r[split][i].lo;
        if (off >= rl) { off -= rl; continue; }
        uint64_t take = rl - off < want ? rl - off : want;
        memcpy(out, c->data + c->r[split][i].lo + off, (size_t)take);
        out += take;
        want -= take;
        off = 0;
    }
    return 0;
}

/* ---------------------------------------------------------------- CLI */

static const char *usage_corpus =
    "usage: realm corpus build OUT.bin SOURCES... [--val-fraction F]\n"
    "       realm corpus info FILE [--verify]\n"
    "\n"
    "A corpus is one raw byte file: the text files of SOURCES joined by the byte 0x1E,\n"
    "with a manifest OUT.bin.json (sources, sizes, sha256, train/val split).\n"
    "Run `realm corpus build --help` or `realm corpus info --help` for details.\n";

static const char *usage_build =
    "usage: realm corpus build OUT.bin SOURCES... [--val-fraction F]\n"
    "\n"
    "Concatenates SOURCES into OUT.bin and writes OUT.bin.json beside it.\n"
    "  SOURCES    files and directories; directories are walked recursively in byte\n"
    "             order of names, following symbolic links but never looping. Hidden\n"
    "             entries (names starting with '.') inside directories are left out.\n"
    "             A file is text unless its first 8 KiB hold a NUL byte or invalid\n"
    "             UTF-8; other files are skipped (and listed in the manifest).\n"
    "  Documents are separated by the single byte 0x1E (ASCII record separator).\n"
    "  --val-fraction F   hold out the last F of the bytes for validation (default 0.1)\n"
    "Both files are written to temporary names, synced and renamed, so an interrupted\n"
    "build never leaves a half-written corpus. Exit status 2 on bad input.\n";

static const char *usage_info =
    "usage: realm corpus info FILE [--verify]\n"
    "\n"
    "Prints the size, number of sources and documents, and the train/val split of FILE\n"
    "(from FILE.json; a plain text file without one splits 90% / 10%).\n"
    "  --verify   recompute the sha256 of FILE and compare it with the manifest\n";

static int is_help(const char *a) { return !strcmp(a, "--help") || !strcmp(a, "-h"); }

static void human(uint64_t b, char *out, size_t n) {
    if (b < 1024) snprintf(out, n, "%llu B", (unsigned long long)b);
    else if (b < (1ull << 20)) snprintf(out, n, "%.1f KiB", (double)b / 1024);
    else if (b < (1ull << 30)) snprintf(out, n, "%.1f MiB", (double)b / (1 << 20));
    else snprintf(out, n, "%.2f GiB", (double)b / (1 << 30));
}

static int corpus_cmd_build(int argc, char **argv) {
    const char **srcs = calloc((size_t)argc + 1, sizeof *srcs);
    if (!srcs) { fprintf(stderr, "realm corpus: out of memory\n"); return 2; }
    const char *out = NULL;
    int n = 0, opts_done = 0;
    corpus_build_opts o = {CORPUS_VAL_FRACTION};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!opts_done && a[0] == '-' && a[1]) {
            if (is_help(a)) { fputs(usage_build, stdout); free(srcs); return 0; }
            if (!strcmp(a, "--")) { opts_done = 1; continue; }
            const char *v = NULL;
            if (!strncmp(a, "--val-fraction=", 15)) v = a + 15;
            else if (!strcmp(a, "--val-fraction")) {
                if (i + 1 >= argc) {
                    fprintf(stderr, "realm corpus build: --val-fraction needs a value\n");
                    free(srcs);
                    return 2;
                }
                v = argv[++i];
            }
            if (v) {
                char *end;
                o.val_fraction = strtod(v, &end);
                if (end == v || *end || !(o.val_fraction >= 0 && o.val_fraction < 1)) {
                    fprintf(stderr, "realm corpus build: --val-fraction must be a number in "
                            "[0, 1), got '%s'\n", v);
                    free(srcs);
                    return 2;
                }
                continue;
            }
            fprintf(stderr, "realm corpus build: unknown option '%s' (see --help)\n", a);
            free(srcs);
            return 2;
        }
        if (!out) out = a;
        else srcs[n++] = a;
    }
    if (!out || n == 0) {
        fprintf(stderr, "realm corpus build: needs OUT.bin and at least one source (see --help)\n");
        free(srcs);
        return 2;
    }
    char err[1024];
    corpus_build_result res;
    int rc = corpus_build(out, srcs, n, &o, &res, err, sizeof err);
    free(srcs);
    if (rc) { fprintf(stderr, "realm corpus build: %s\n", err); return rc; }
    char h[32], ht[32], hv[32];
    human(res.bytes, h, sizeof h);
    human(res.train_bytes, ht, sizeof ht);
    human(res.val_bytes, hv, sizeof hv);
    printf("wrote %s: %llu bytes (%s), %ld documents, %ld entries skipped (see %s.json)\n",
           out, (unsigned long long)res.bytes, h, res.documents, res.skipped, out);
    printf("train %llu bytes (%s), val %llu bytes (%s), sha256 %s\n",
           (unsigned long long)res.train_bytes, ht, (unsigned long long)res.val_bytes, hv,
           res.sha256);
    return 0;
}

static int corpus_cmd_info(int argc, char **argv) {
    const char *path = NULL;
    int verify = 0;
    for (int i = 1; i < argc; i++) {
        if (is_help(argv[i])) { fputs(usage_info, stdout); return 0; }
        if (!strcmp(argv[i], "--verify")) verify = 1;
        else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "realm corpus info: unknown option '%s' (see --help)\n", argv[i]);
            return 2;
        } else if (!path) path = argv[i];
        else {
            fprintf(stderr, "realm corpus info: one FILE only (see --help)\n");
            return 2;
        }
    }
    if (!path) { fprintf(stderr, "realm corpus info: needs FILE (see --help)\n"); return 2; }
    char err[1024];
    corpus *c = corpus_open(path, err, sizeof err);
    if (!c) { fprintf(stderr, "realm corpus info: %s\n", err); return 2; }
    /* Verify before printing anything, so a mismatch is reported as the usual one line. */
    char hex[65] = "";
    if (verify) {
        sha256_ctx ctx;
        sha256_init(&ctx);
        /* Hash in slices so huge mappings never meet a size_t/length corner in update. */
        for (uint64_t off = 0; off < c->bytes; off += COPY_CHUNK) {
            uint64_t k = c->bytes - off < COPY_CHUNK ? c->bytes - off : COPY_CHUNK;
            sha256_update(&ctx, c->data + off, (size_t)k);
        }
        uint8_t d[32];
        sha256_final(&ctx, d);
        sha256_hex(d, hex);
        if (c->has_manifest && strcmp(hex, c->sha)) {
            fprintf(stderr, "realm corpus info: %s: sha256 mismatch: manifest says %s, file has %s\n",
                    path, c->sha, hex);
            corpus_close(c);
            return 2;
        }
    }
    char h[32];
    human(corpus_bytes(c), h, sizeof h);
    printf("file      %s\n", path);
    printf("bytes     %llu (%s)\n", (unsigned long long)corpus_bytes(c), h);
    if (c->has_manifest)
        printf("manifest  %s.json: %ld sources, %ld documents\n", path, c->nsources, c->ndocs);
    else
        printf("manifest  none (plain text: first 90%% train, last 10%% val)\n");
    static const char *names[2] = {"train", "val"};
    for (int s = 0; s < 2; s++) {
        human(c->size[s], h, sizeof h);
        printf("%-9s %llu bytes (%s) in", names[s], (unsigned long long)c->size[s], h);
        for (int i = 0; i < c->nr[s]; i++)
            printf(" [%llu, %llu)", (unsigned long long)c->r[s][i].lo,
                   (unsigned long long)c->r[s][i].hi);
        printf("\n");
    }
    if (verify)
        printf("sha256    %s (%s)\n", hex, c->has_manifest ? "verified" : "no manifest to compare with");
    else if (c->has_manifest)
        printf("sha256    %s (manifest; --verify to check)\n", c->sha);
    corpus_close(c);
    return 0;
}

int cmd_corpus(int argc, char **argv) {
    if (argc < 2 || is_help(argv[1])) {
        fputs(usage_corpus, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "build")) return corpus_cmd_build(argc - 1, argv + 1);
    if (!strcmp(argv[1], "info")) return corpus_cmd_info(argc - 1, argv + 1);
    fprintf(stderr, "realm corpus: unknown subcommand '%s' (expected build or info)\n", argv[1]);
    return 2;
}
