#include "fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct fs_atomic {
    int fd;
    int failed;              /* a write failed: commit must refuse */
    int err_no;
    char *path, *tmp;
};

static void set_err(char *err, size_t errlen, const char *what, const char *path, int e) {
    if (err && errlen) snprintf(err, errlen, "%s %s: %s", what, path, strerror(e));
}

int fs_write_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len) {
        size_t chunk = len > ((size_t)1 << 30) ? ((size_t)1 << 30) : len;
        ssize_t w = write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (w == 0) { errno = EIO; return -1; }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

int fs_mkdir_p(const char *path, char *err, size_t errlen) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) {
        snprintf(err, errlen, "%s: bad directory name", path);
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != 0) continue;
        char c = buf[i];
        buf[i] = 0;
        if (mkdir(buf, 0777) < 0 && errno != EEXIST) {
            snprintf(err, errlen, "%s: %s", buf, strerror(errno));
            return -1;
        }
        buf[i] = c;
    }
    return 0;
}

int fs_dirname(const char *path, char *out, size_t outlen) {
    const char *slash = strrchr(path, '/');
    int n;
    if (!slash) n = snprintf(out, outlen, ".");
    else if (slash == path) n = snprintf(out, outlen, "/");
    else n = snprintf(out, outlen, "%.*s", (int)(slash - path), path);
    return (n < 0 || (size_t)n >= outlen) ? -1 : 0;
}

int fs_fsync_dir(const char *dir, char *err, size_t errlen) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) { set_err(err, errlen, "cannot open directory", dir, errno); return -1; }
    /* Some file systems refuse fsync on directories (EINVAL); their renames are as durable
     * as they get, so that is not worth failing a save over. */
    if (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP) {
        set_err(err, errlen, "cannot fsync directory", dir, errno);
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

fs_atomic *fs_atomic_open(const char *path, char *err, size_t errlen) {
    fs_atomic *f = calloc(1, sizeof *f);
    size_t n = strlen(path) + 32;
    if (f) {
        f->path = strdup(path);
        f->tmp = malloc(n);
    }
    if (!f || !f->path || !f->tmp) {
        if (f) { free(f->path); free(f->tmp); free(f); }
        set_err(err, errlen, "cannot write", path, ENOMEM);
        return NULL;
    }
    snprintf(f->tmp, n, "%s.tmp.%ld", path, (long)getpid());
    /* O_TRUNC rather than O_EXCL: a temp with our pid can only be a leftover from a crashed
     * process that had the same pid, never a live writer. */
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f->fd < 0) {
        set_err(err, errlen, "cannot create", f->tmp, errno);
        free(f->path); free(f->tmp); free(f);
        return NULL;
    }
    return f;
}

int fs_atomic_write(void *h, const void *data, size_t len) {
    fs_atomic *f = h;
    if (f->failed) return -1;
    if (fs_write_all(f->fd, data, len) != 0) {
        f->failed = 1;
        f->err_no = errno;
        return -1;
    }
    return 0;
}

static void atomic_free(fs_atomic *f) {
    free(f->path);
    free(f->tmp);
    free(f);
}

void fs_atomic_abort(fs_atomic *f) {
    if (!f) return;
    if (f->fd >= 0) close(f->fd);
    unlink(f->tmp);
    atomic_free(f);
}

int fs_atomic_commit(fs_atomic *f, char *err, size_t errlen) {
    int e = 0;
    const char *what = NULL;
    if (f->failed) { e = f->err_no; what = "cannot write"; }
    else if (fsync(f->fd) != 0) { e = errno; what = "cannot fsync"; }
    int rc = close(f->fd);
    f->fd = -1;
    if (!what && rc != 0) { e = errno; what = "cannot close"; }
    if (!what && rename(f->tmp, f->path) != 0) { e = errno; what = "cannot rename into place"; }
    if (what) {
        set_err(err, errlen, what, f->path, e);
        unlink(f->tmp);
        atomic_free(f);
        return -1;
    }
    char dir[4096];
    int ok = fs_dirname(f->path, dir, sizeof dir) == 0 ? fs_fsync_dir(dir, err, errlen) : 0;
    atomic_free(f);
    return ok;
}

int fs_write_atomic(const char *path, const void *data, size_t len, char *err, size_t errlen) {
    fs_atomic *f = fs_atomic_open(path, err, errlen);
    if (!f) return -1;
    fs_atomic_write(f, data, len);
    return fs_atomic_commit(f, err, errlen);
}

int fs_read_file(const char *path, size_t max_len, char **data, size_t *len, char *err, size_t errlen) {
    *data = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { set_err(err, errlen, "cannot open", path, errno); return -1; }
    struct stat st;
    if (fstat(fd, &st) != 0) { set_err(err, errlen, "cannot stat", path, errno); close(fd); return -1; }
    if (!S_ISREG(st.st_mode)) {
        if (err && errlen) snprintf(err, errlen, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    if ((unsigned long long)st.st_size > max_len) {
        if (err && errlen)
            snprintf(err, errlen, "%s: %lld bytes, more than the %zu allowed", path, (long long)st.st_size, max_len);
        close(fd);
        return -1;
    }
    size_t n = (size_t)st.st_size, got = 0;
    char *buf = malloc(n + 1);
    if (!buf) { set_err(err, errlen, "cannot read", path, ENOMEM); close(fd); return -1; }
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { set_err(err, errlen, "cannot read", path, errno); free(buf); close(fd); return -1; }
        if (r == 0) break;   /* shrank while reading: return what is there */
        got += (size_t)r;
    }
    close(fd);
    buf[got] = 0;
    *data = buf;
    *len = got;
    return 0;
}

/* Recursion is bounded by the tree's depth; the trees removed here (checkpoint directories)
 * are flat, and openat/unlinkat keep it immune to symlinks pointing elsewhere. */
static int remove_at(int parent, const char *name, const char *shown, int depth, char *err, size_t errlen) {
    if (unlinkat(parent, name, 0) == 0 || errno == ENOENT) return 0;
    if (errno != EISDIR && errno != EPERM) { set_err(err, errlen, "cannot remove", shown, errno); return -1; }
    if (depth > 32) {
        if (err && errlen) snprintf(err, errlen, "cannot remove %s: directory tree too deep", shown);
        return -1;
    }
    int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) { set_err(err, errlen, "cannot open directory", shown, errno); return -1; }
    DIR *d = fdopendir(fd);
    if (!d) { set_err(err, errlen, "cannot list", shown, errno); close(fd); return -1; }
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        rc = remove_at(dirfd(d), e->d_name, shown, depth + 1, err, errlen);
    }
    closedir(d);
    if (rc == 0 && unlinkat(parent, name, AT_REMOVEDIR) != 0 && errno != ENOENT) {
        set_err(err, errlen, "cannot remove directory", shown, errno);
        rc = -1;
    }
    return rc;
}

int fs_remove_tree(const char *path, char *err, size_t errlen) {
    return remove_at(AT_FDCWD, path, path, 0, err, errlen);
}
