#include "kcache.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KC_MAGIC "REALMKC1"
#define KC_HEADER 56
/* Guards against a header whose length field is garbage making us malloc terabytes. */
#define KC_MAX_PAYLOAD ((uint64_t)1 << 32)

static int mkdir_p(const char *path, char *err, size_t errlen) {
    char tmp[1024];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof tmp) {
        snprintf(err, errlen, "cache directory path '%s' is empty or too long", path);
        return -1;
    }
    memcpy(tmp, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (tmp[i] != '/' && tmp[i] != 0) continue;
        char c = tmp[i];
        tmp[i] = 0;
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST) {
            snprintf(err, errlen, "cannot create cache directory %s: %s", tmp, strerror(errno));
            return -1;
        }
        tmp[i] = c;
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "cache path %s is not a directory", path);
        return -1;
    }
    return 0;
}

int kcache_dir(const char *override, int disable, char *dir, size_t dirlen, char *err, size_t errlen) {
    const char *off = getenv("REALM_NO_CACHE");
    if (disable || (off && *off && strcmp(off, "0") != 0)) {
        if (dirlen) dir[0] = 0;
        return 1;
    }
    const char *e;
    int n;
    if (override && *override)
        n = snprintf(dir, dirlen, "%s", override);
    else if ((e = getenv("REALM_CACHE_DIR")) && *e)
        n = snprintf(dir, dirlen, "%s", e);
    else if ((e = getenv("XDG_CACHE_HOME")) && *e)
        n = snprintf(dir, dirlen, "%s/realm", e);
    else if ((e = getenv("HOME")) && *e)
        n = snprintf(dir, dirlen, "%s/.cache/realm", e);
    else {
        snprintf(err, errlen, "no cache directory: none of REALM_CACHE_DIR, XDG_CACHE_HOME, HOME is set");
        return -1;
    }
    if (n < 0 || (size_t)n >= dirlen) {
        snprintf(err, errlen, "cache directory path is too long");
        return -1;
    }
    return mkdir_p(dir, err, errlen);
}

void kcache_key_init(kcache_key *k, const char *domain) {
    sha256_init(&k->ctx);
    kcache_key_str(k, "realm-kcache");
    uint32_t v = KCACHE_FORMAT_VERSION;
    kcache_key_add(k, &v, sizeof v);
    kcache_key_str(k, domain);
}

void kcache_key_add(kcache_key *k, const void *data, size_t n) {
    /* Length prefix: parts ("ab","c") and ("a","bc") must give different keys. */
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)n >> (8 * i));
    sha256_update(&k->ctx, len, sizeof len);
    if (n) sha256_update(&k->ctx, data, n);
}

void kcache_key_str(kcache_key *k, const char *s) {
    if (!s) {
        /* A NULL part differs from "" (length 0) by using an impossible length. */
        uint8_t tag[8];
        memset(tag, 0xff, sizeof tag);
        sha256_update(&k->ctx, tag, sizeof tag);
        return;
    }
    kcache_key_add(k, s, strlen(s));
}

void kcache_key_final(kcache_key *k, uint8_t key[32]) { sha256_final(&k->ctx, key); }

void kcache_path(const char *dir, const uint8_t key[32], char *path, size_t pathlen) {
    char hex[65];
    sha256_hex(key, hex);
    snprintf(path, pathlen, "%s/%s.kc", dir, hex);
}

static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get_u32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = v << 8 | p[i]; return v; }
static uint64_t get_u64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }

static int read_all(int fd, void *buf, size_t n) {
    uint8_t *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_all(int fd, const void *buf, size_t n) {
    const uint8_t *p = buf;
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

kcache_status kcache_get(const char *dir, const uint8_t key[32], void **data, size_t *len,
                         char *err, size_t errlen) {
    *data = NULL;
    *len = 0;
    if (!dir || !*dir) return KC_MISS;
    char path[1200];
    kcache_path(dir, key, path, sizeof path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) return KC_MISS;
        snprintf(err, errlen, "cannot open cache entry %s: %s", path, strerror(errno));
        return KC_BAD;
    }
    uint8_t h[KC_HEADER];
    struct stat st;
    kcache_status rc = KC_BAD;
    uint8_t *buf = NULL;
    if (fstat(fd, &st) != 0 || st.st_size < KC_HEADER || read_all(fd, h, KC_HEADER) != 0) {
        snprintf(err, errlen, "cache entry %s is truncated (no complete header)", path);
        goto done;
    }
    if (memcmp(h, KC_MAGIC, 8) != 0 || get_u32(h + 8) != KCACHE_FORMAT_VERSION) {
        snprintf(err, errlen, "cache entry %s has a bad magic or format version", path);
        goto done;
    }
    uint64_t n = get_u64(h + 16);
    if (n > KC_MAX_PAYLOAD || (uint64_t)st.st_size != KC_HEADER + n) {
        snprintf(err, errlen, "cache entry %s: payload length %llu does not match file size %lld",
                 path, (unsigned long long)n, (long long)st.st_size);
        goto done;
    }
    buf = malloc(n ? (size_t)n : 1);
    if (!buf) {
        snprintf(err, errlen, "out of memory reading cache entry %s (%llu bytes)", path, (unsigned long long)n);
        goto done;
    }
    if (read_all(fd, buf, (size_t)n) != 0) {
        snprintf(err, errlen, "cache entry %s: short read", path);
        goto done;
    }
    uint8_t sum[32];
    sha256(buf, (size_t)n, sum);
    if (memcmp(sum, h + 24, 32) != 0) {
        snprintf(err, errlen, "cache entry %s: payload checksum mismatch", path);
        goto done;
    }
    *data = buf;
    *len = (size_t)n;
    buf = NULL;
    rc = KC_HIT;
done:
    free(buf);
    close(fd);
    return rc;
}

int kcache_put(const char *dir, const uint8_t key[32], const void *data, size_t len,
               char *err, size_t errlen) {
    if (!dir || !*dir) return 0;
    char path[1200], tmp[1300];
    kcache_path(dir, key, path, sizeof path);
    /* Unique temp name in the same directory: rename() is only atomic within a filesystem,
     * and concurrent writers of the same key must not share a temp file. */
    snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create temp file %s: %s", tmp, strerror(errno));
        return -1;
    }
    uint8_t h[KC_HEADER];
    memcpy(h, KC_MAGIC, 8);
    put_u32(h + 8, KCACHE_FORMAT_VERSION);
    put_u32(h + 12, 0);
    put_u64(h + 16, (uint64_t)len);
    sha256(data, len, h + 24);
    const char *what = NULL;
    if (write_all(fd, h, sizeof h) != 0 || write_all(fd, data, len) != 0)
        what = "write";
    else if (fsync(fd) != 0)
        what = "fsync";
    int saved = errno;
    if (close(fd) != 0 && !what) {
        what = "close";
        saved = errno;
    }
    if (!what && rename(tmp, path) != 0) {
        what = "rename";
        saved = errno;
    }
    if (what) {
        unlink(tmp);
        snprintf(err, errlen, "cache entry %s: %s failed: %s", path, what, strerror(saved));
        return -1;
    }
    /* Make the rename itself durable; a failure here only risks losing the entry. */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
}
