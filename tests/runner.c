#include "test.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define X(name, slow) void test_##name(tctx *t);
#include "tests_list.h"
#undef X

typedef struct { const char *name; void (*fn)(tctx *); int slow; } test_entry;
static const test_entry all_tests[] = {
#define X(name, slow) {#name, test_##name, slow},
#include "tests_list.h"
#undef X
};

void t_fail(tctx *t, const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = snprintf(t->msg, sizeof t->msg, "%s:%d: ", file, line);
    vsnprintf(t->msg + k, sizeof t->msg - (size_t)k, fmt, ap);
    va_end(ap);
    t->failed = 1;
}

uint64_t t_next(tctx *t) {   /* splitmix64 */
    uint64_t z = (t->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
double t_uniform(tctx *t) { return (double)(t_next(t) >> 11) * (1.0 / 9007199254740992.0); }
double t_normal(tctx *t) {
    double u = t_uniform(t), v = t_uniform(t);
    if (u < 1e-300) u = 1e-300;
    return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
}
long t_randint(tctx *t, long lo, long hi) { return lo + (long)(t_next(t) % (uint64_t)(hi - lo + 1)); }

double t_relerr(const double *a, const double *b, long n) {
    double num = 0, den = 0;
    for (long i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return sqrt(num / den);
}
double t_maxabs(const double *a, const double *b, long n) {
    double m = 0;
    for (long i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        double d = fabs(a[i] - b[i]);
        if (d > m) m = d;
    }
    return m;
}

int t_run(const char *cmd, char *out, size_t outlen) {
    char full[4096];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE *p = popen(full, "r");
    if (!p) return -1;
    size_t k = 0;
    if (outlen) out[0] = 0;
    char buf[4096];
    size_t r;
    while ((r = fread(buf, 1, sizeof buf, p)) > 0) {
        if (outlen && k + 1 < outlen) {
            size_t c = r < outlen - 1 - k ? r : outlen - 1 - k;
            memcpy(out + k, buf, c);
            /* a sampled NUL byte would end the string early for strstr/strcmp: show it as '?' */
            for (size_t q = k; q < k + c; q++)
                if (!out[q]) out[q] = '?';
            k += c;
            out[k] = 0;
        }
    }
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

const char *t_realm_bin(void) {
    const char *b = getenv("REALM_BIN");
    return b && *b ? b : "build/realm";
}

int t_gpu_requested(void) {
    const char *e = getenv("REALM_GPU");
    return e && strcmp(e, "1") == 0;
}

int t_gpu_on(void) {
    if (t_gpu_requested()) return 1;
    printf("  (no GPU: skipped)\n");
    return 0;
}

const char *t_shared_dir(void) {
    struct stat st;
    const char *e = getenv("REALM_SHARED");
    if (e && stat(e, &st) == 0) return e;
    if (stat("../shared/data/tinyshakespeare.txt", &st) == 0) return "../shared";
    return NULL;
}

const char *t_text_corpus(char *buf, size_t len) {
    const char *sh = t_shared_dir();
    if (sh) {
        snprintf(buf, len, "%.400s/data/tinyshakespeare.txt", sh);
        return buf;
    }
    snprintf(buf, len, "/tmp/realm-test-corpus-%d.txt", (int)getpid());
    char cmd[1024], out[256];
    snprintf(cmd, sizeof cmd, "cat README.md docs/*.md docs/*.md docs/*.md docs/*.md > %.900s", buf);
    t_run(cmd, out, sizeof out);
    return buf;
}

void t_tmpdir(tctx *t, char *buf, size_t len) {
    snprintf(buf, len, "/tmp/realm-test-%s-%d-%llu", t->name, (int)getpid(), (unsigned long long)(t_next(t) % 100000));
    char cmd[600], out[64];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", buf, buf);
    t_run(cmd, out, sizeof out);
}

void t_rmtree(const char *dir) {
    char cmd[600], out[64];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    t_run(cmd, out, sizeof out);
}

char *t_slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *b = NULL;
    long n = -1;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        b = calloc((size_t)n + 1, 1);
        if (b && fread(b, 1, (size_t)n, f) != (size_t)n) b[0] = 0;
    }
    fclose(f);
    return b;
}

int t_count_lines(const char *path) {
    char *s = t_slurp(path);
    int n = 0;
    for (char *p = s; p && *p; p++) n += *p == '\n';
    free(s);
    return n;
}

int t_spawn(const char *cmd) {
    fflush(stdout);   /* else the child's exit flushes our buffered output a second time */
    pid_t pid = fork();
    if (pid == 0) {
        if (!freopen("/dev/null", "w", stdout)) _exit(126);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return (int)pid;
}

/* Each test runs in a child process of its own: a crash, a sanitizer report or a leak fails
 * that test (its output shown) instead of ending the run, and independent tests can run side
 * by side. REALM_TEST_JOBS sets how many at once (default: the CPUs online, but 1 with
 * REALM_GPU=1 so GPU tests never share the card); results print in the tests' order. */
typedef struct {
    int done, failed;
    pid_t pid;   /* 0 until started */
    int msg_fd;
    FILE *log;
    struct timespec t0;
    double dt;
    char msg[sizeof ((tctx *)0)->msg];
} test_run;

typedef struct { int failed; char msg[sizeof ((tctx *)0)->msg]; } test_report;

static double seconds_since(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0->tv_nsec);
}

static int start_test(test_run *r, size_t i, uint64_t seed0) {
    int fds[2];
    r->log = tmpfile();
    if (!r->log || pipe2(fds, O_CLOEXEC) != 0) return -1;
    clock_gettime(CLOCK_MONOTONIC, &r->t0);
    fflush(NULL);   /* else the child's exit writes our buffered output a second time */
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        close(fds[0]);
        int lfd = fileno(r->log);
        if (dup2(lfd, STDOUT_FILENO) < 0 || dup2(lfd, STDERR_FILENO) < 0) _exit(126);
        tctx t = {.name = all_tests[i].name, .rng = seed0 ^ (0x9E3779B97F4A7C15ull * (i + 1))};
        all_tests[i].fn(&t);
        test_report rep = {.failed = t.failed};
        memcpy(rep.msg, t.msg, sizeof rep.msg);
        fflush(NULL);
        ssize_t w = write(fds[1], &rep, sizeof rep);
        /* exit(), not _exit(): LeakSanitizer checks at exit and fails the test's status */
        exit(w == (ssize_t)sizeof rep ? 0 : 125);
    }
    close(fds[1]);
    /* a report missing because the child died must not leave us waiting on a grandchild
     * that still holds the pipe */
    fcntl(fds[0], F_SETFL, O_NONBLOCK);
    r->pid = pid;
    r->msg_fd = fds[0];
    return 0;
}

/* The child's report is one small write (under PIPE_BUF) made before it exits. */
static void finish_test(test_run *r, int status) {
    r->dt = seconds_since(&r->t0);
    test_report rep;
    ssize_t n = read(r->msg_fd, &rep, sizeof rep);
    close(r->msg_fd);
    r->done = 1;
    int reported = n == (ssize_t)sizeof rep, exited_ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    /* a test's own failure message wins over how its process ended afterwards */
    if (reported && (exited_ok || rep.failed)) {
        r->failed = rep.failed;
        memcpy(r->msg, rep.msg, sizeof r->msg);
    } else {
        r->failed = 1;
        if (WIFSIGNALED(status))
            snprintf(r->msg, sizeof r->msg, "the test process died of signal %d (output above)", WTERMSIG(status));
        else
            snprintf(r->msg, sizeof r->msg, "the test process exited with status %d after %s (output above)",
                     WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                     reported ? "passing" : "no report");
    }
}

static void print_test(const test_run *r, size_t i) {
    char buf[4096];
    size_t k;
    rewind(r->log);
    while ((k = fread(buf, 1, sizeof buf, r->log)) > 0) fwrite(buf, 1, k, stdout);
    fclose(r->log);
    if (r->failed) printf("FAIL %s (%.2fs): %s\n", all_tests[i].name, r->dt, r->msg);
    else printf("ok   %s (%.2fs)\n", all_tests[i].name, r->dt);
    fflush(stdout);
}

int main(int argc, char **argv) {
    int npass = 0, nfail = 0;
    const char *seed_env = getenv("REALM_TEST_SEED");
    uint64_t seed0 = seed_env ? strtoull(seed_env, NULL, 0) : (uint64_t)time(NULL) * 2654435761u;
    printf("test seed %llu (set REALM_TEST_SEED to repeat)\n", (unsigned long long)seed0);
    size_t ntests = sizeof all_tests / sizeof all_tests[0];
    const char *jobs_env = getenv("REALM_TEST_JOBS");
    long jobs = jobs_env && *jobs_env ? strtol(jobs_env, NULL, 10) : t_gpu_requested() ? 1 : sysconf(_SC_NPROCESSORS_ONLN);
    if (jobs < 1) jobs = 1;
    if (jobs > 64) jobs = 64;
    test_run *runs = calloc(ntests, sizeof *runs);
    int *selected = calloc(ntests, sizeof *selected);
    if (!runs || !selected) {
        fprintf(stderr, "realm_tests: out of memory\n");
        return 2;
    }
    for (size_t i = 0; i < ntests; i++) {
        selected[i] = argc <= 1;
        for (int a = 1; a < argc; a++)
            if (strstr(all_tests[i].name, argv[a])) selected[i] = 1;
    }
    /* TEST_SLOW tests start first, so the run does not end waiting on one of them alone */
    size_t *order = calloc(ntests, sizeof *order), norder = 0, next = 0, shown = 0;
    if (!order) {
        fprintf(stderr, "realm_tests: out of memory\n");
        return 2;
    }
    for (int slow = 1; slow >= 0; slow--)
        for (size_t i = 0; i < ntests; i++)
            if (selected[i] && all_tests[i].slow == slow) order[norder++] = i;
    long running = 0;
    for (;;) {
        if (next < norder && running < jobs) {
            size_t i = order[next++];
            if (start_test(&runs[i], i, seed0) != 0) {
                fprintf(stderr, "realm_tests: cannot start %s: %s\n", all_tests[i].name, strerror(errno));
                return 2;
            }
            running++;
            continue;
        }
        while (shown < ntests && (!selected[shown] || runs[shown].done)) {
            if (selected[shown]) {
                print_test(&runs[shown], shown);
                runs[shown].failed ? nfail++ : npass++;
            }
            shown++;
        }
        if (running == 0) break;
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR) continue;
            fprintf(stderr, "realm_tests: waitpid: %s\n", strerror(errno));
            return 2;
        }
        for (size_t i = 0; i < ntests; i++)
            if (!runs[i].done && runs[i].pid == pid) {
                finish_test(&runs[i], status);
                running--;
                break;
            }
    }
    free(order);
    free(runs);
    free(selected);
    printf("%d passed, %d failed\n", npass, nfail);
    return nfail ? 1 : 0;
}
