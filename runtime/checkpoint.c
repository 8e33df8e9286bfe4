#include "checkpoint.h"

#include "json.h"
#include "sha256.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PATH_CAP 4096

static void errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int join(char *out, size_t cap, const char *a, const char *b, char *err, size_t errlen) {
    int n = snprintf(out, cap, "%s/%s", a, b);
    if (n < 0 || (size_t)n >= cap) {
        errf(err, errlen, "path too long: %s/%s", a, b);
        return -1;
    }
    return 0;
}

/* Names that cannot escape the directory or hide from ls, and need no quoting in messages. */
static int valid_file_name(const char *s) {
    if (!s || !s[0] || s[0] == '.' || strlen(s) > 200) return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '.' || *p == '_' || *p == '-'))
            return 0;
    return 1;
}

/* "ckpt-<digits>" followed by exactly `suffix`; returns the step or -1. */
static long parse_ckpt_name(const char *s, const char *suffix) {
    if (strncmp(s, "ckpt-", 5) != 0) return -1;
    const char *p = s + 5;
    long step = 0;
    int nd = 0;
    while (*p >= '0' && *p <= '9') {
        if (step > (LONG_MAX - 9) / 10) return -1;
        step = step * 10 + (*p - '0');
        p++;
        nd++;
    }
    if (!nd || strcmp(p, suffix) != 0) return -1;
    return step;
}

static void ckpt_name(char *out, size_t cap, long step) { snprintf(out, cap, "ckpt-%08ld", step); }

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int has_manifest(const char *run_dir, const char *name) {
    char p[PATH_CAP];
    struct stat st;
    if (snprintf(p, sizeof p, "%s/%s/%s", run_dir, name, CKPT_MANIFEST) >= (int)sizeof p) return 0;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* ---- save ---- */

/* Sink that writes to a file descriptor while hashing and counting, so the manifest's sha256
 * describes exactly the bytes that went to disk without reading them back. */
typedef struct {
    int fd;
    int err_no;
    uint64_t size;
    sha256_ctx sha;
} hash_sink;

static int hash_sink_write(void *ctx, const void *data, size_t len) {
    hash_sink *s = ctx;
    if (s->err_no) return -1;
    if (fs_write_all(s->fd, data, len) != 0) {
        s->err_no = errno ? errno : EIO;
        return -1;
    }
    sha256_update(&s->sha, data, len);
    s->size += len;
    return 0;
}

typedef struct {
    uint64_t size;
    char hex[65];
} file_sum;

static int write_one(const char *dir, const char *name, const ckpt_file *f, file_sum *sum, char *err, size_t errlen) {
    char path[PATH_CAP];
    if (join(path, sizeof path, dir, name, err, errlen)) return -1;
    hash_sink s = {.fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644)};
    if (s.fd < 0) { errf(err, errlen, "cannot create %s: %s", path, strerror(errno)); return -1; }
    sha256_init(&s.sha);
    int rc;
    char werr[512] = "";
    if (f->write) {
        rc = f->write(f->ctx, hash_sink_write, &s, werr, sizeof werr);
    } else {
        rc = (f->len && !f->data) ? -1 : hash_sink_write(&s, f->data, f->len);
        if (rc && !s.err_no) snprintf(werr, sizeof werr, "no data");
    }
    if (rc || s.err_no) {
        if (s.err_no) errf(err, errlen, "cannot write %s: %s", path, strerror(s.err_no));
        else errf(err, errlen, "cannot write %s: %s", path, werr[0] ? werr : "writer failed");
        close(s.fd);
        return -1;
    }
    if (fsync(s.fd) != 0) {
        errf(err, errlen, "cannot fsync %s: %s", path, strerror(errno));
        close(s.fd);
        return -1;
    }
    if (close(s.fd) != 0) { errf(err, errlen, "cannot close %s: %s", path, strerror(errno)); return -1; }
    uint8_t d[32];
    sha256_final(&s.sha, d);
    sha256_hex(d, sum->hex);
    sum->size = s.size;
    return 0;
}

/* Which checkpoint to keep besides the new one: the one `latest` named before this save,
 * as that is what a resume would have used; failing that, the newest older complete one. */
static long previous_step(const char *run_dir, long new_step) {
    char path[PATH_CAP], *txt = NULL, e[8];
    size_t n;
    long prev = -1;
    if (snprintf(path, sizeof path, "%s/latest", run_dir) < (int)sizeof path &&
        fs_read_file(path, 256, &txt, &n, e, sizeof e) == 0) {
        while (n && (txt[n - 1] == '\n' || txt[n - 1] == ' ' || txt[n - 1] == '\r')) txt[--n] = 0;
        long s = parse_ckpt_name(txt, "");
        if (s >= 0 && s != new_step && has_manifest(run_dir, txt)) prev = s;
    }
    free(txt);
    if (prev >= 0) return prev;
    DIR *d = opendir(run_dir);
    if (!d) return -1;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        long s = parse_ckpt_name(de->d_name, "");
        if (s >= 0 && s < new_step && s > prev && has_manifest(run_dir, de->d_name)) prev = s;
    }
    closedir(d);
    return prev;
}

/* Delete every checkpoint except `keep_a`/`keep_b`, and debris of interrupted saves. Failures
 * here only cost disk space, so they are not reported as a failed save. */
static void prune(const char *run_dir, long keep_a, long keep_b) {
    DIR *d = opendir(run_dir);
    if (!d) return;
    char names[64][256];
    int nn = 0;
    struct dirent *de;
    /* Collect first, delete after: removing entries while readdir runs is unspecified. More
     * than 64 stale entries only happens after many crashes; the rest go at the next save. */
    while ((de = readdir(d)) != NULL && nn < 64) {
        const char *nm = de->d_name;
        long s = parse_ckpt_name(nm, "");
        int junk = (s >= 0 && s != keep_a && s != keep_b) || parse_ckpt_name(nm, ".tmp") >= 0 ||
                   parse_ckpt_name(nm, ".old.tmp") >= 0 || strncmp(nm, "latest.tmp.", 11) == 0;
        if (junk && strlen(nm) < sizeof names[0]) snprintf(names[nn++], sizeof names[0], "%s", nm);
    }
    closedir(d);
    char path[PATH_CAP], e[8];
    for (int i = 0; i < nn; i++)
        if (join(path, sizeof path, run_dir, names[i], e, sizeof e) == 0) fs_remove_tree(path, e, sizeof e);
}

static int write_manifest(const char *dir, long step, const ckpt_file *files, const file_sum *sums, int nfiles,
                          char *err, size_t errlen) {
    json_buf b = {0};
    json_buf_printf(&b, "{\n  \"format\": \"%s\",\n  \"version\": %d,\n  \"step\": %ld,\n  \"files\": [",
                    CKPT_FORMAT, CKPT_VERSION, step);
    for (int i = 0; i < nfiles; i++) {
        json_buf_puts(&b, i ? ",\n    {\"name\": " : "\n    {\"name\": ");
        json_buf_str(&b, files[i].name, strlen(files[i].name));
        json_buf_printf(&b, ", \"size\": %" PRIu64 ", \"sha256\": \"%s\"}", sums[i].size, sums[i].hex);
    }
    json_buf_puts(&b, nfiles ? "\n  ]\n}\n" : "]\n}\n");
    if (b.oom) { json_buf_free(&b); errf(err, errlen, "out of memory writing the manifest"); return -1; }
    ckpt_file mf = {.name = CKPT_MANIFEST, .data = b.p, .len = b.len};
    file_sum ignored;
    int rc = write_one(dir, CKPT_MANIFEST, &mf, &ignored, err, errlen);
    json_buf_free(&b);
    return rc;
}

int ckpt_save(const char *run_dir, long step, const ckpt_file *files, int nfiles, char *err, size_t errlen) {
    if (step < 0) { errf(err, errlen, "checkpoint step %ld is negative", step); return -1; }
    if (nfiles < 0 || (nfiles && !files)) { errf(err, errlen, "invalid checkpoint file list"); return -1; }
    for (int i = 0; i < nfiles; i++) {
        if (!valid_file_name(files[i].name) || !strcmp(files[i].name, CKPT_MANIFEST)) {
            errf(err, errlen, "invalid checkpoint file name \"%s\"", files[i].name ? files[i].name : "(null)");
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (!strcmp(files[i].name, files[j].name)) {
                errf(err, errlen, "checkpoint file \"%s\" given twice", files[i].name);
                return -1;
            }
    }
    if (mkdir(run_dir, 0755) != 0 && errno != EEXIST) {
        errf(err, errlen, "cannot create run directory %s: %s", run_dir, strerror(errno));
        return -1;
    }
    if (!is_dir(run_dir)) { errf(err, errlen, "%s is not a directory", run_dir); return -1; }

    char name[64], tmpname[80], oldname[80], tmp[PATH_CAP], final[PATH_CAP], old[PATH_CAP];
    ckpt_name(name, sizeof name, step);
    snprintf(tmpname, sizeof tmpname, "%s.tmp", name);
    snprintf(oldname, sizeof oldname, "%s.old.tmp", name);
    if (join(tmp, sizeof tmp, run_dir, tmpname, err, errlen) || join(final, sizeof final, run_dir, name, err, errlen) ||
        join(old, sizeof old, run_dir, oldname, err, errlen))
        return -1;
    long prev = previous_step(run_dir, step);

    /* A leftover from a crashed save of this same step is garbage by construction. */
    if (fs_remove_tree(tmp, err, errlen)) return -1;
    if (mkdir(tmp, 0755) != 0) { errf(err, errlen, "cannot create %s: %s", tmp, strerror(errno)); return -1; }
    file_sum *sums = calloc((size_t)(nfiles ? nfiles : 1), sizeof *sums);
    if (!sums) { errf(err, errlen, "out of memory"); goto fail; }
    for (int i = 0; i < nfiles; i++)
        if (write_one(tmp, files[i].name, &files[i], &sums[i], err, errlen)) goto fail;
    if (write_manifest(tmp, step, files, sums, nfiles, err, errlen)) goto fail;
    if (fs_fsync_dir(tmp, err, errlen)) goto fail;
    free(sums);
    sums = NULL;

    /* Re-saving an existing step: move the old one aside rather than delete it first, so
     * that a failure in between still leaves it on disk. */
    int replaced = 0;
    if (is_dir(final)) {
        if (fs_remove_tree(old, err, errlen)) goto fail;
        if (rename(final, old) != 0) { errf(err, errlen, "cannot move %s aside: %s", final, strerror(errno)); goto fail; }
        replaced = 1;
    }
    if (rename(tmp, final) != 0) {
        errf(err, errlen, "cannot rename %s to %s: %s", tmp, final, strerror(errno));
        if (replaced) rename(old, final);
        goto fail;
    }
    if (fs_fsync_dir(run_dir, err, errlen)) return -1;   /* complete on disk but not durable: report */

    char latest[PATH_CAP], line[80];
    if (join(latest, sizeof latest, run_dir, "latest", err, errlen)) return -1;
    int n = snprintf(line, sizeof line, "%s\n", name);
    if (fs_write_atomic(latest, line, (size_t)n, err, errlen)) return -1;
    prune(run_dir, step, prev);
    return 0;

fail:;
    char e2[8];
    free(sums);
    fs_remove_tree(tmp, e2, sizeof e2);
    return -1;
}

/* ---- find ---- */

int ckpt_find_latest(const char *run_dir, char *dir_out, size_t dir_len, long *step, char *err, size_t errlen) {
    if (!is_dir(run_dir)) return 0;
    char path[PATH_CAP], *txt = NULL, e[256], best[256] = "";
    size_t n;
    long found = -1;
    struct stat st;
    if (join(path, sizeof path, run_dir, "latest", err, errlen)) return -1;
    if (stat(path, &st) == 0) {
        if (fs_read_file(path, 256, &txt, &n, e, sizeof e)) { errf(err, errlen, "%s", e); return -1; }
        while (n && (txt[n - 1] == '\n' || txt[n - 1] == ' ' || txt[n - 1] == '\r')) txt[--n] = 0;
        long s = parse_ckpt_name(txt, "");
        if (s < 0 || memchr(txt, 0, n)) {
            errf(err, errlen, "%s: does not name a checkpoint directory (expected ckpt-<step>)", path);
            free(txt);
            return -1;
        }
        if (has_manifest(run_dir, txt)) {
            found = s;
            snprintf(best, sizeof best, "%s", txt);
        }
        free(txt);
    } else if (errno != ENOENT) {
        errf(err, errlen, "cannot stat %s: %s", path, strerror(errno));
        return -1;
    }
    /* `latest` missing or dangling (a crash while re-saving the same step, or a hand-edited
     * run directory): fall back to the newest complete directory. */
    if (found < 0) {
        DIR *d = opendir(run_dir);
        if (!d) { errf(err, errlen, "cannot list %s: %s", run_dir, strerror(errno)); return -1; }
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            long s = parse_ckpt_name(de->d_name, "");
            if (s > found && strlen(de->d_name) < sizeof best && has_manifest(run_dir, de->d_name)) {
                found = s;
                snprintf(best, sizeof best, "%s", de->d_name);
            }
        }
        closedir(d);
    }
    if (found < 0) return 0;
    if (join(dir_out, dir_len, run_dir, best, err, errlen)) return -1;
    if (step) *step = found;
    return 1;
}

/* ---- verify ---- */

static int hash_file(const char *path, uint64_t *size, char hex[65], char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { errf(err, errlen, "%s: cannot open: %s", path, strerror(errno)); return -1; }
    sha256_ctx c;
    sha256_init(&c);
    unsigned char *buf = malloc(1 << 20);
    if (!buf) { close(fd); errf(err, errlen, "%s: out of memory", path); return -1; }
    uint64_t total = 0;
    for (;;) {
        ssize_t r = read(fd, buf, 1 << 20);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            errf(err, errlen, "%s: cannot read: %s", path, strerror(errno));
            free(buf);
            close(fd);
            return -1;
        }
        if (r == 0) break;
        sha256_update(&c, buf, (size_t)r);
        total += (uint64_t)r;
    }
    free(buf);
    close(fd);
    uint8_t d[32];
    sha256_final(&c, d);
    sha256_hex(d, hex);
    *size = total;
    return 0;
}

static int is_hex64(const char *s) {
    if (strlen(s) != 64) return 0;
    for (int i = 0; i < 64; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return 1;
}

int ckpt_verify(const char *dir, long *step_out, char *err, size_t errlen) {
    char mpath[PATH_CAP], *txt = NULL, e[256];
    size_t n;
    if (join(mpath, sizeof mpath, dir, CKPT_MANIFEST, err, errlen)) return -1;
    if (fs_read_file(mpath, 1 << 20, &txt, &n, e, sizeof e)) {
        errf(err, errlen, "%s (incomplete or not a checkpoint)", e);
        return -1;
    }
    json_doc *doc = json_parse(txt, n, NULL, e, sizeof e);
    free(txt);
    if (!doc) { errf(err, errlen, "%s: corrupt manifest: %s", mpath, e); return -1; }
    const json_value *root = json_root(doc);
    const char *fmt;
    int64_t version, step;
    const json_value *files = json_get(root, "files");
    int rc = -1;
    if (!json_as_string(json_get(root, "format"), &fmt) || strcmp(fmt, CKPT_FORMAT) != 0) {
        errf(err, errlen, "%s: not a realm checkpoint manifest (\"format\" is not \"%s\")", mpath, CKPT_FORMAT);
        goto out;
    }
    if (!json_as_int(json_get(root, "version"), &version)) {
        errf(err, errlen, "%s: missing \"version\"", mpath);
        goto out;
    }
    if (version != CKPT_VERSION) {
        errf(err, errlen, "%s: checkpoint format version %" PRId64 ", this realm reads version %d", mpath, version,
             CKPT_VERSION);
        goto out;
    }
    if (!json_as_int(json_get(root, "step"), &step) || step < 0 || step > LONG_MAX) {
        errf(err, errlen, "%s: missing or invalid \"step\"", mpath);
        goto out;
    }
    const char *base = strrchr(dir, '/');
    base = base ? base + 1 : dir;
    long dstep = parse_ckpt_name(base, "");
    if (dstep >= 0 && dstep != step) {
        errf(err, errlen, "%s: manifest says step %" PRId64 " but the directory is %s", mpath, step, base);
        goto out;
    }
    if (!files || files->type != JSON_ARRAY) {
        errf(err, errlen, "%s: missing \"files\" list", mpath);
        goto out;
    }
    for (size_t i = 0; i < files->n; i++) {
        const json_value *f = &files->items[i];
        const char *name, *want;
        int64_t size;
        if (!json_as_string(json_get(f, "name"), &name) || !valid_file_name(name) ||
            !json_as_int(json_get(f, "size"), &size) || size < 0 ||
            !json_as_string(json_get(f, "sha256"), &want) || !is_hex64(want)) {
            errf(err, errlen, "%s: files[%zu] needs a plain \"name\", a \"size\" and a 64-hex-digit \"sha256\"", mpath, i);
            goto out;
        }
        char fpath[PATH_CAP], got[65];
        uint64_t have;
        if (join(fpath, sizeof fpath, dir, name, err, errlen)) goto out;
        struct stat st;
        if (stat(fpath, &st) != 0) {
            errf(err, errlen, "%s: missing (%s), listed in the manifest", fpath, strerror(errno));
            goto out;
        }
        if (!S_ISREG(st.st_mode)) { errf(err, errlen, "%s: not a regular file", fpath); goto out; }
        /* Check the size first: it is free, and names the likely cause (a truncated copy). */
        if ((uint64_t)st.st_size != (uint64_t)size) {
            errf(err, errlen, "%s: %lld bytes, manifest says %" PRId64 " (%s)", fpath, (long long)st.st_size, size,
                 (uint64_t)st.st_size < (uint64_t)size ? "truncated?" : "altered?");
            goto out;
        }
        if (hash_file(fpath, &have, got, err, errlen)) goto out;
        if (have != (uint64_t)size) { errf(err, errlen, "%s: changed while being verified", fpath); goto out; }
        if (strcmp(got, want) != 0) {
            errf(err, errlen, "%s: sha256 mismatch, the file is corrupt (manifest %.12s..., file %.12s...)", fpath, want, got);
            goto out;
        }
    }
    if (step_out) *step_out = (long)step;
    rc = 0;
out:
    json_free(doc);
    return rc;
}
