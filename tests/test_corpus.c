/* sha256, the RNG, the corpus builder/reader and `realm corpus`. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "corpus.h"
#include "rng.h"
#include "sha256.h"
#include "test.h"

/* ------------------------------------------------------------------ helpers */

static int make_tmpdir(char *out, size_t n) {
    snprintf(out, n, "/tmp/realm-corpus-XXXXXX");
    return mkdtemp(out) ? 0 : -1;
}

static void rm_rf(const char *dir) {
    char cmd[600], o[64];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    t_run(cmd, o, sizeof o);
}

static int write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(data, 1, n, f);
    return fclose(f) == 0 && w == n ? 0 : -1;
}

/* Whole file into a malloc'd, NUL-terminated buffer. */
static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)len + 1);
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) { free(b); b = NULL; }
    fclose(f);
    if (b) { b[len] = 0; if (n) *n = (size_t)len; }
    return b;
}

static int one_line(const char *s) {
    const char *nl = strchr(s, '\n');
    return s[0] && (!nl || nl[1] == 0);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int have_cli(void) {
    if (access(t_realm_bin(), X_OK) == 0) return 1;
    printf("  note: %s not built; CLI checks skipped\n", t_realm_bin());
    return 0;
}

/* ------------------------------------------------------------------ sha256 */

static void hex_of(const void *d, size_t n, char out[65]) {
    uint8_t h[32];
    sha256(d, n, h);
    sha256_hex(h, out);
}

TEST(corpus_sha256_vectors) {
    char hex[65];
    hex_of("", 0, hex);
    CHECK(!strcmp(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"), "'': %s", hex);
    hex_of("abc", 3, hex);
    CHECK(!strcmp(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"), "abc: %s", hex);
    const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    hex_of(m448, strlen(m448), hex);
    CHECK(!strcmp(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"), "448: %s", hex);
    const char *m896 = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq"
                       "klmnopqrlmnopqrsmnopqrstnopqrstu";
    hex_of(m896, strlen(m896), hex);
    CHECK(!strcmp(hex, "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"), "896: %s", hex);

    /* One million 'a', fed in uneven random pieces to exercise the partial-block path. */
    char *a = malloc(1000000);
    CHECK(a, "oom");
    memset(a, 'a', 1000000);
    sha256_ctx c;
    sha256_init(&c);
    size_t off = 0;
    while (off < 1000000) {
        size_t k = (size_t)t_randint(t, 0, 200);
        if (k > 1000000 - off) k = 1000000 - off;
        sha256_update(&c, a + off, k);
        off += k;
    }
    uint8_t d[32];
    sha256_final(&c, d);
    sha256_hex(d, hex);
    free(a);
    CHECK(!strcmp(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"), "1M a: %s", hex);

    /* Lengths around the 55/56/64-byte padding edges: incremental == one-shot. */
    uint8_t buf[200];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)t_next(t);
    for (size_t n = 50; n <= 130; n++) {
        uint8_t h1[32], h2[32];
        sha256(buf, n, h1);
        sha256_init(&c);
        size_t cut = (size_t)t_randint(t, 0, (long)n);
        sha256_update(&c, buf, cut);
        sha256_update(&c, buf + cut, n - cut);
        sha256_final(&c, h2);
        CHECK(!memcmp(h1, h2, 32), "incremental differs at n=%zu cut=%zu", n, cut);
    }
}

/* ------------------------------------------------------------------ rng */

TEST(corpus_rng_known_values) {
    uint64_t x = 0;
    CHECK(rng_splitmix64(&x) == 0xe220a8397b1dcdafull, "splitmix64(0) wrong");
    rng_state r = {{1, 2, 3, 4}};
    /* First xoshiro256** output is rotl(s1*5, 7)*9 = rotl(10, 7)*9. */
    CHECK(rng_next(&r) == 11520, "xoshiro256** first output wrong");
    rng_state a, b;
    rng_seed(&a, 42);
    for (int i = 0; i < 10; i++) rng_next(&a);
    b = a;   /* a saved state resumes the exact sequence: what checkpoints rely on */
    for (int i = 0; i < 100; i++) CHECK(rng_next(&a) == rng_next(&b), "copy diverged at %d", i);
    rng_seed(&a, 0);
    CHECK(a.s[0] | a.s[1] | a.s[2] | a.s[3], "seed 0 gave the all-zero state");
    for (int i = 0; i < 1000; i++) {
        double u = rng_uniform(&a);
        CHECK(u >= 0 && u < 1, "uniform out of range: %g", u);
    }
}

TEST(corpus_rng_below_uniform) {
    rng_state r;
    rng_seed(&r, t_next(t));
    for (int i = 0; i < 100; i++) CHECK(rng_below(&r, 1) == 0, "below(1) != 0");
    /* n = 10: chi-square with 9 degrees of freedom; 40 is p ~ 5e-6. */
    long cnt[10] = {0};
    const long N = 100000;
    for (long i = 0; i < N; i++) {
        uint64_t v = rng_below(&r, 10);
        CHECK(v < 10, "below(10) gave %llu", (unsigned long long)v);
        cnt[v]++;
    }
    double chi = 0;
    for (int k = 0; k < 10; k++) chi += (cnt[k] - N / 10.0) * (cnt[k] - N / 10.0) / (N / 10.0);
    CHECK(chi < 40, "below(10) chi-square %.1f", chi);
    /* n = 3 * 2^62: plain modulo would make the first third twice as likely as the others
     * (2^64 = n + 2^62). Thirds must be equal: 2 degrees of freedom, 30 is p ~ 3e-7. */
    const uint64_t n = 3ull << 62;
    long th[3] = {0};
    const long M = 30000;
    for (long i = 0; i < M; i++) {
        uint64_t v = rng_below(&r, n);
        CHECK(v < n, "below(3*2^62) out of range");
        th[v >> 62]++;
    }
    chi = 0;
    for (int k = 0; k < 3; k++) chi += (th[k] - M / 3.0) * (th[k] - M / 3.0) / (M / 3.0);
    CHECK(chi < 30, "below(3*2^62) biased: %ld %ld %ld", th[0], th[1], th[2]);
    uint64_t big = rng_below(&r, UINT64_MAX);
    CHECK(big < UINT64_MAX, "below(max) out of range");
}

/* ------------------------------------------------------------------ text rule */

TEST(corpus_text_rule) {
    const uint8_t ok[] = "plain ASCII\n\t caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80";
    CHECK(corpus_is_text(ok, sizeof ok - 1, 0), "valid UTF-8 rejected");
    CHECK(!corpus_is_text((const uint8_t *)"a\0b", 3, 0), "NUL accepted");
    CHECK(!corpus_is_text((const uint8_t *)"caf\xe9!", 5, 0), "Latin-1 accepted");
    CHECK(!corpus_is_text((const uint8_t *)"\xc0\xaf", 2, 0), "overlong accepted");
    CHECK(!corpus_is_text((const uint8_t *)"\xed\xa0\x80", 3, 0), "surrogate accepted");
    CHECK(!corpus_is_text((const uint8_t *)"\xf4\x90\x80\x80", 4, 0), "> U+10FFFF accepted");
    /* A character cut by the 8 KiB window is fine if the file goes on, not at its end. */
    CHECK(corpus_is_text((const uint8_t *)"ab\xe2\x82", 4, 1), "cut char rejected mid-file");
    CHECK(!corpus_is_text((const uint8_t *)"ab\xe2\x82", 4, 0), "truncated char accepted at EOF");
}

/* ------------------------------------------------------------------ builder */

/* root/{a.txt, b.txt, bin.dat (NUL), empty.txt, latin1.txt, link_a -> a.txt,
 * loop -> root, .hidden/x.txt, sub/deep/c.md}. */
static int make_tree(const char *root) {
    char p[600];
    const uint8_t bin[] = {0x7f, 'E', 'L', 'F', 0, 0, 1, 2};
    int rc = 0;
    snprintf(p, sizeof p, "%s/b.txt", root);      rc |= write_file(p, "bravo\n", 6);
    snprintf(p, sizeof p, "%s/a.txt", root);      rc |= write_file(p, "alpha\n", 6);
    snprintf(p, sizeof p, "%s/bin.dat", root);    rc |= write_file(p, bin, sizeof bin);
    snprintf(p, sizeof p, "%s/empty.txt", root);  rc |= write_file(p, "", 0);
    snprintf(p, sizeof p, "%s/latin1.txt", root); rc |= write_file(p, "caf\xe9\n", 5);
    snprintf(p, sizeof p, "%s/link_a", root);     rc |= symlink("a.txt", p);
    snprintf(p, sizeof p, "%s/loop", root);       rc |= symlink(".", p);
    snprintf(p, sizeof p, "%s/.hidden", root);    rc |= mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/.hidden/x.txt", root); rc |= write_file(p, "hidden", 6);
    snprintf(p, sizeof p, "%s/sub", root);        rc |= mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/sub/deep", root);   rc |= mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/sub/deep/c.md", root); rc |= write_file(p, "charlie", 7);
    return rc;
}

TEST(corpus_build_tree) {
    char dir[64], root[128], out[160], mpath[170];
    CHECK(make_tmpdir(dir, sizeof dir) == 0, "mkdtemp failed");
    snprintf(root, sizeof root, "%s/src", dir);
    mkdir(root, 0755);
    CHECK(make_tree(root) == 0, "could not make the tree");
    snprintf(out, sizeof out, "%s/out/nested/corpus.bin", dir);   /* parents get created */
    snprintf(mpath, sizeof mpath, "%s.json", out);
    const char *srcs[] = {root};
    char err[512] = "";
    corpus_build_result res;
    int rc = corpus_build(out, srcs, 1, NULL, &res, err, sizeof err);
    if (rc) rm_rf(dir);
    CHECK(rc == 0, "build failed: %s", err);

    const char want[] = "alpha\n\x1e" "bravo\n\x1e" "charlie";
    size_t n = 0;
    char *data = slurp(out, &n);
    char *man = slurp(mpath, NULL);
    int data_ok = data && n == sizeof want - 1 && !memcmp(data, want, n);
    char hex[65];
    hex_of(want, sizeof want - 1, hex);
    char needle[600];
    int man_ok = 1;
    const char *missing = "";
#define HAS(...) do { snprintf(needle, sizeof needle, __VA_ARGS__); \
        if (man_ok && (!man || !strstr(man, needle))) { man_ok = 0; missing = needle; } } while (0)
    HAS("\"separator_byte\": 30");
    HAS("\"bytes\": %zu", sizeof want - 1);
    HAS("\"sha256\": \"%s\"", hex);
    HAS("\"documents\": 3");
    HAS("\"train\": [[0, 19]]");          /* 21 bytes, val = floor(2.1) = 2 */
    HAS("\"val\": [[19, 21]]");
    HAS("{\"path\": \"%s/a.txt\", \"offset\": 0, \"bytes\": 6", root);
    HAS("{\"path\": \"%s/b.txt\", \"offset\": 7, \"bytes\": 6", root);
    HAS("{\"path\": \"%s/sub/deep/c.md\", \"offset\": 14, \"bytes\": 7", root);
    HAS("{\"path\": \"%s/bin.dat\", \"reason\": \"binary\"}", root);
    HAS("{\"path\": \"%s/latin1.txt\", \"reason\": \"binary\"}", root);
    HAS("{\"path\": \"%s/empty.txt\", \"reason\": \"empty\"}", root);
    HAS("{\"path\": \"%s/link_a\", \"reason\": \"duplicate\"}", root);
    HAS("{\"path\": \"%s/loop\", \"reason\": \"symlink loop\"}", root);
#undef HAS
    int hidden = man && strstr(man, ".hidden") != NULL;
    char a_sha[65];
    hex_of("alpha\n", 6, a_sha);
    int per_file_sha = man && strstr(man, a_sha) != NULL;

    /* Same inputs, same bytes: rebuild over the old output (which must not feed itself). */
    corpus_build_result res2;
    int rc2 = corpus_build(out, srcs, 1, NULL, &res2, err, sizeof err);
    size_t n2 = 0;
    char *data2 = slurp(out, &n2), *man2 = slurp(mpath, NULL);
    int same = rc2 == 0 && data2 && man2 && n2 == n && !memcmp(data, data2, n) && man &&
               !strcmp(man, man2);

    char errc[512] = "";
    corpus *c = corpus_open(out, errc, sizeof errc);
    uint64_t tr = c ? corpus_size(c, CORPUS_TRAIN) : 0, va = c ? corpus_size(c, CORPUS_VAL) : 0;
    uint8_t rd[8] = {0};
    int rd_ok = c && corpus_read(c, CORPUS_VAL, 0, 2, rd) == 0 && !memcmp(rd, "ie", 2) &&
                corpus_read(c, CORPUS_VAL, 1, 2, rd) != 0 && corpus_nsources(c) == 3 &&
                corpus_ndocuments(c) == 3 && !strcmp(corpus_sha256(c), hex);
    corpus_close(c);

    /* A larger validation share through the options. */
    corpus_build_opts o = {0.5};
    int rc3 = corpus_build(out, srcs, 1, &o, NULL, err, sizeof err);
    c = corpus_open(out, errc, sizeof errc);
    int half = rc3 == 0 && c && corpus_size(c, 0) == 11 && corpus_size(c, 1) == 10;
    corpus_close(c);

    free(data); free(man); free(data2); free(man2);
    /* No temp files may be left behind next to the output. */
    char cmd[300], lsout[256];
    snprintf(cmd, sizeof cmd, "ls -A '%s/out/nested'", dir);
    t_run(cmd, lsout, sizeof lsout);
    rm_rf(dir);
    CHECK(data_ok, "corpus bytes wrong (%zu bytes)", n);
    CHECK(res.bytes == 21 && res.documents == 3 && res.train_bytes == 19 && res.val_bytes == 2 &&
          res.skipped == 5 && !strcmp(res.sha256, hex), "result wrong: %llu bytes %ld docs %ld skipped",
          (unsigned long long)res.bytes, res.documents, res.skipped);
    CHECK(man_ok, "manifest lacks: %s", missing);
    CHECK(!hidden, "hidden directory was walked");
    CHECK(per_file_sha, "per-source sha256 missing");
    CHECK(same, "rebuild not byte-identical (rc %d: %s)", rc2, err);
    CHECK(tr == 19 && va == 2, "reader split %llu/%llu: %s", (unsigned long long)tr,
          (unsigned long long)va, errc);
    CHECK(rd_ok, "corpus_read / manifest fields wrong");
    CHECK(half, "--val-fraction 0.5 not honoured");
    CHECK(!strcmp(lsout, "corpus.bin\ncorpus.bin.json\n"), "leftovers: %s", lsout);
}

TEST(corpus_build_errors) {
    char dir[64], p[200], p2[200], out[200], err[512];
    CHECK(make_tmpdir(dir, sizeof dir) == 0, "mkdtemp failed");
    snprintf(out, sizeof out, "%s/o.bin", dir);
    struct { const char *what; char src[200]; } cases[5];
    snprintf(cases[0].src, 200, "%s/does-not-exist", dir);  cases[0].what = "missing path";
    snprintf(cases[1].src, 200, "%s/empty", dir);           cases[1].what = "empty dir";
    mkdir(cases[1].src, 0755);
    snprintf(cases[2].src, 200, "%s/bins", dir);            cases[2].what = "binary-only dir";
    mkdir(cases[2].src, 0755);
    snprintf(p, sizeof p, "%s/bins/x.bin", dir);
    write_file(p, "\x00\x01\x02", 3);
    snprintf(p, sizeof p, "%s/bins/y.png", dir);
    write_file(p, "\x89PNG\r\n\x1a\n\x00\x00", 10);
    snprintf(cases[3].src, 200, "%s/bins/x.bin", dir);      cases[3].what = "explicit binary file";
    snprintf(cases[4].src, 200, "%s/empties", dir);         cases[4].what = "dir of empty files";
    mkdir(cases[4].src, 0755);
    snprintf(p, sizeof p, "%s/empties/e.txt", dir);
    write_file(p, "", 0);
    for (int i = 0; i < 5; i++) {
        const char *s[] = {cases[i].src};
        err[0] = 0;
        int rc = corpus_build(out, s, 1, NULL, NULL, err, sizeof err);
        if (rc != 2 || !strstr(err, cases[i].src) || strchr(err, '\n')) rm_rf(dir);
        CHECK(rc == 2, "%s: rc %d", cases[i].what, rc);
        CHECK(strstr(err, cases[i].src) && !strchr(err, '\n'), "%s: message '%s'", cases[i].what, err);
        CHECK(access(out, F_OK) != 0, "%s: output created", cases[i].what);
    }
    /* Output under a regular file: unwritable; the message names the output. */
    snprintf(p, sizeof p, "%s/text.txt", dir);
    write_file(p, "hello\n", 6);
    snprintf(p2, sizeof p2, "%s/text.txt/sub/o.bin", dir);
    const char *s[] = {p};
    int rc = corpus_build(p2, s, 1, NULL, NULL, err, sizeof err);
    int ok_unwritable = rc == 2 && strstr(err, p2) && !strchr(err, '\n');
    corpus_build_opts bad = {1.5};
    int rc_frac = corpus_build(out, s, 1, &bad, NULL, err, sizeof err);
    /* Nothing left behind in the directory besides the inputs. */
    char cmd[300], ls[512];
    snprintf(cmd, sizeof cmd, "ls -A '%s'", dir);
    t_run(cmd, ls, sizeof ls);
    rm_rf(dir);
    CHECK(ok_unwritable, "unwritable output: rc %d '%s'", rc, err);
    CHECK(rc_frac == 2, "val fraction 1.5 accepted");
    CHECK(!strcmp(ls, "bins\nempties\nempty\ntext.txt\n"), "leftovers: %s", ls);
}

/* ------------------------------------------------------------------ reader */

TEST(corpus_reader_errors) {
    char dir[64], p[200], mp[210], err[512];
    CHECK(make_tmpdir(dir, sizeof dir) == 0, "mkdtemp failed");
    snprintf(p, sizeof p, "%s/none.bin", dir);
    corpus *c = corpus_open(p, err, sizeof err);
    int missing_ok = !c && strstr(err, p) && one_line(err);
    corpus_close(c);

    snprintf(p, sizeof p, "%s/empty.txt", dir);
    write_file(p, "", 0);
    c = corpus_open(p, err, sizeof err);
    int empty_ok = !c && strstr(err, p) && strstr(err, "empty");
    corpus_close(c);

    /* 100 bytes, no manifest: 90 train / 10 val, too short for rows of 11+ in val. */
    snprintf(p, sizeof p, "%s/short.txt", dir);
    char text[100];
    for (int i = 0; i < 100; i++) text[i] = (char)('a' + i % 26);
    write_file(p, text, 100);
    c = corpus_open(p, err, sizeof err);
    int short_ok = 0, fallback_ok = 0, sample_ok = 0;
    if (c) {
        fallback_ok = corpus_size(c, 0) == 90 && corpus_size(c, 1) == 10 && !corpus_has_manifest(c);
        short_ok = corpus_check(c, 11, err, sizeof err) == -1 && strstr(err, p) &&
                   strstr(err, "val") && one_line(err) && corpus_check(c, 10, err, sizeof err) == 0;
        rng_state r;
        rng_seed(&r, 1);
        uint8_t rows[40];
        sample_ok = corpus_sample(c, CORPUS_VAL, &r, 2, 11, rows) == -1 &&
                    corpus_sample(c, CORPUS_VAL, &r, 4, 10, rows) == 0 && !memcmp(rows, text + 90, 10);
    }
    corpus_close(c);

    /* A manifest for other data is refused rather than silently misused. */
    snprintf(mp, sizeof mp, "%s.json", p);
    const char *m1 = "{\"bytes\": 99, \"splits\": {\"train\": [[0, 90]], \"val\": [[90, 99]]}}";
    write_file(mp, m1, strlen(m1));
    c = corpus_open(p, err, sizeof err);
    int mismatch_ok = !c && strstr(err, p) && strstr(err, "99") && one_line(err);
    corpus_close(c);
    const char *m2 = "{\"bytes\": 100, \"splits\": {\"train\": [[0, 90]], \"val\": [[90, ";
    write_file(mp, m2, strlen(m2));
    c = corpus_open(p, err, sizeof err);
    int malformed_ok = !c && strstr(err, mp) && one_line(err);
    corpus_close(c);
    /* Two train ranges around the val range: windows never straddle a range edge. */
    const char *m3 = "{\"bytes\": 100, \"extra\": [1, {\"x\": null}], \"splits\": {\"train\": "
                     "[[0, 40], [60, 100]], \"val\": [[40, 60]]}}";
    write_file(mp, m3, strlen(m3));
    c = corpus_open(p, err, sizeof err);
    int ranges_ok = 0;
    if (c) {
        rng_state r;
        rng_seed(&r, t_next(t));
        uint8_t row[30];
        uint64_t off;
        ranges_ok = corpus_size(c, 0) == 80 && corpus_size(c, 1) == 20;
        int seen_hi = 0;
        for (int i = 0; i < 2000 && ranges_ok; i++) {
            ranges_ok = corpus_sample_at(c, 0, &r, 1, 30, row, &off) == 0 &&
                        (off + 30 <= 40 || (off >= 60 && off + 30 <= 100)) &&
                        !memcmp(row, text + off, 30);
            seen_hi |= off >= 60;
        }
        uint8_t buf[10];
        ranges_ok = ranges_ok && seen_hi && corpus_read(c, 0, 35, 10, buf) == 0 &&
                    !memcmp(buf, text + 35, 5) && !memcmp(buf + 5, text + 60, 5);
    }
    corpus_close(c);
    rm_rf(dir);
    CHECK(missing_ok, "missing file: '%s'", err);
    CHECK(empty_ok, "empty file not refused");
    CHECK(fallback_ok, "plain-text fallback split wrong");
    CHECK(short_ok, "too-short check wrong: '%s'", err);
    CHECK(sample_ok, "sampling a too-short split must fail, a fitting one succeed");
    CHECK(mismatch_ok, "manifest size mismatch not refused");
    CHECK(malformed_ok, "malformed manifest not refused");
    CHECK(ranges_ok, "multi-range split sampled or read wrongly");
}

TEST(corpus_sparse_64g) {
    char dir[64], p[200], err[512];
    CHECK(make_tmpdir(dir, sizeof dir) == 0, "mkdtemp failed");
    snprintf(p, sizeof p, "%s/huge.bin", dir);
    const uint64_t size = 64ull << 30;
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0, "open %s failed", p);
    if (ftruncate(fd, (off_t)size) != 0) {
        printf("  note: cannot make a 64 GiB sparse file here; skipped\n");
        close(fd);
        rm_rf(dir);
        return;
    }
    /* Markers at the start, past 32 GiB (beyond any 32-bit offset) and at the very end. */
    const char *m0 = "BEGIN", *m1 = "MIDDLE", *m2 = "THE-END";
    int wr = pwrite(fd, m0, 5, 0) == 5 && pwrite(fd, m1, 6, (off_t)(size / 2 + 12345)) == 6 &&
             pwrite(fd, m2, 7, (off_t)(size - 7)) == 7;
    close(fd);
    if (!wr) rm_rf(dir);
    CHECK(wr, "pwrite failed");

    double t0 = now_s();
    corpus *c = corpus_open(p, err, sizeof err);
    double dt = now_s() - t0;
    if (!c) rm_rf(dir);
    CHECK(c, "open failed: %s", err);
    uint64_t val = corpus_val_bytes(size, 0.1), train = size - val;
    int sizes_ok = corpus_bytes(c) == size && corpus_size(c, 0) == train && corpus_size(c, 1) == val;

    /* 20000 windows; their offsets must spread evenly over the whole train split:
     * chi-square over 64 bins (63 degrees of freedom); 130 is p ~ 1e-6. */
    enum { NS = 20000, ROW = 257, BINS = 64 };
    rng_state r;
    rng_seed(&r, t_next(t));
    uint8_t *rows = malloc((size_t)NS * ROW);
    uint64_t *offs = malloc(NS * sizeof *offs);
    int sample_ok = rows && offs && corpus_sample_at(c, 0, &r, NS, ROW, rows, offs) == 0;
    long bins[BINS] = {0};
    uint64_t maxoff = 0;
    for (long i = 0; sample_ok && i < NS; i++) {
        if (offs[i] + ROW > train) { sample_ok = 0; break; }
        bins[offs[i] / ((train - ROW + 1 + BINS - 1) / BINS)]++;
        if (offs[i] > maxoff) maxoff = offs[i];
    }
    double chi = 0;
    for (int k = 0; k < BINS; k++) chi += (bins[k] - NS / (double)BINS) * (bins[k] - NS / (double)BINS) / (NS / (double)BINS);
    /* The windows' bytes are the file's bytes at those offsets. */
    const uint8_t *d = corpus_data(c);
    int content_ok = sample_ok;
    for (long i = 0; content_ok && i < NS; i += 97)
        content_ok = !memcmp(rows + i * ROW, d + offs[i], ROW);
    /* Reading near the end and across the 32 GiB mark. */
    uint8_t tail[7], mid[6], head[5];
    int read_ok = corpus_read(c, 1, val - 7, 7, tail) == 0 && !memcmp(tail, m2, 7) &&
                  corpus_read(c, 0, size / 2 + 12345, 6, mid) == 0 && !memcmp(mid, m1, 6) &&
                  corpus_read(c, 0, 0, 5, head) == 0 && !memcmp(head, m0, 5) &&
                  corpus_read(c, 1, val - 6, 7, tail) != 0;
    int check_ok = corpus_check(c, 1 << 20, err, sizeof err) == 0;
    free(rows);
    free(offs);
    corpus_close(c);
    rm_rf(dir);
    CHECK(dt < 0.5, "opening a 64 GiB file took %.3f s (must not read it)", dt);
    CHECK(sizes_ok, "split sizes wrong for 64 GiB");
    CHECK(sample_ok, "sampling failed or left the split");
    CHECK(maxoff > train / 64 * 63, "samples never reached the last 1/64 of the file");
    CHECK(chi < 130, "offsets not uniform over 64 GiB: chi-square %.1f", chi);
    CHECK(content_ok, "sampled bytes differ from the file");
    CHECK(read_ok, "corpus_read wrong near the end or past 32 GiB");
    CHECK(check_ok, "corpus_check refused a 64 GiB corpus: %s", err);
}

TEST(corpus_tinyshakespeare) {
    const char *sh = t_shared_dir();
    if (!sh) { printf("  note: shared data not found; tinyshakespeare test skipped\n"); return; }
    char p[512], err[512];
    snprintf(p, sizeof p, "%s/data/tinyshakespeare.txt", sh);
    corpus *c = corpus_open(p, err, sizeof err);
    CHECK(c, "open: %s", err);
    uint64_t n = corpus_bytes(c), tr = corpus_size(c, 0), va = corpus_size(c, 1);
    int ok = n == 1115394 && va == 111539 && tr == n - va && !corpus_has_manifest(c) &&
             corpus_check(c, 1025, err, sizeof err) == 0;
    rng_state r;
    rng_seed(&r, 7);
    uint8_t rows[4 * 257], first[15];
    int s = corpus_sample(c, 1, &r, 4, 257, rows) == 0 &&
            corpus_read(c, 0, 0, 15, first) == 0 && !memcmp(first, "First Citizen:\n", 15);
    corpus_close(c);
    CHECK(ok, "tinyshakespeare: %llu bytes, train %llu, val %llu", (unsigned long long)n,
          (unsigned long long)tr, (unsigned long long)va);
    CHECK(s, "tinyshakespeare sampling/reading failed");
}

/* ------------------------------------------------------------------ CLI */

TEST(corpus_cli) {
    if (!have_cli()) return;
    const char *bin = t_realm_bin();
    char dir[64], cmd[1024], out[4096];
    CHECK(make_tmpdir(dir, sizeof dir) == 0, "mkdtemp failed");
    char root[128];
    snprintf(root, sizeof root, "%s/src", dir);
    mkdir(root, 0755);
    CHECK(make_tree(root) == 0, "could not make the tree");

    const char *helps[] = {"corpus --help", "corpus build --help", "corpus info --help"};
    for (int i = 0; i < 3; i++) {
        snprintf(cmd, sizeof cmd, "%s %s", bin, helps[i]);
        int rc = t_run(cmd, out, sizeof out);
        if (rc != 0) rm_rf(dir);
        CHECK(rc == 0 && strstr(out, "usage: realm corpus"), "%s: rc %d: %s", helps[i], rc, out);
    }

    snprintf(cmd, sizeof cmd, "%s corpus build %s/c.bin %s --val-fraction 0.25", bin, dir, root);
    int rc = t_run(cmd, out, sizeof out);
    int build_ok = rc == 0 && strstr(out, "21 bytes");
    snprintf(cmd, sizeof cmd, "%s corpus info %s/c.bin --verify", bin, dir);
    int rc_info = t_run(cmd, out, sizeof out);
    int info_ok = rc_info == 0 && strstr(out, "3 sources") && strstr(out, "verified") &&
                  strstr(out, "[16, 21)");
    char info_out[4096];
    snprintf(info_out, sizeof info_out, "%s", out);

    /* Flip one byte: the size still matches, only --verify can tell. */
    char path[200];
    snprintf(path, sizeof path, "%s/c.bin", dir);
    int fd = open(path, O_WRONLY);
    int flipped = fd >= 0 && pwrite(fd, "A", 1, 0) == 1;
    if (fd >= 0) close(fd);
    int rc_bad = t_run(cmd, out, sizeof out);
    int verify_ok = flipped && rc_bad == 2 && strstr(out, "mismatch") && one_line(out);
    char verify_out[512];
    snprintf(verify_out, sizeof verify_out, "%.400s", out);

    /* Bad inputs: exit 2 with one line that names the path. */
    char paths[4][200];
    snprintf(paths[0], 200, "%s/missing", dir);
    snprintf(paths[1], 200, "%s/emptydir", dir);
    mkdir(paths[1], 0755);
    snprintf(paths[2], 200, "%s/bins", dir);
    mkdir(paths[2], 0755);
    char bp[256];
    snprintf(bp, sizeof bp, "%s/bins/z.bin", dir);
    write_file(bp, "\x00\xff", 2);
    snprintf(paths[3], 200, "%s/src/a.txt/x.bin", dir);   /* output under a file */
    int bad_ok[4];
    char bad_out[4][512];
    for (int i = 0; i < 4; i++) {
        if (i < 3) snprintf(cmd, sizeof cmd, "%s corpus build %s/o.bin %s", bin, dir, paths[i]);
        else snprintf(cmd, sizeof cmd, "%s corpus build %s %s", bin, paths[3], root);
        int r = t_run(cmd, out, sizeof out);
        bad_ok[i] = r == 2 && strstr(out, paths[i]) && one_line(out);
        snprintf(bad_out[i], sizeof bad_out[i], "rc %d: %.400s", r, out);
    }
    /* info on an empty file and a too-short path. */
    snprintf(path, sizeof path, "%s/empty.bin", dir);
    write_file(path, "", 0);
    snprintf(cmd, sizeof cmd, "%s corpus info %s", bin, path);
    int r_empty = t_run(cmd, out, sizeof out);
    int empty_ok = r_empty == 2 && strstr(out, path) && one_line(out);
    snprintf(cmd, sizeof cmd, "%s corpus frobnicate", bin);
    int r_unknown = t_run(cmd, out, sizeof out);
    rm_rf(dir);
    CHECK(build_ok, "build: rc %d", rc);
    CHECK(info_ok, "info: rc %d: %s", rc_info, info_out);
    CHECK(verify_ok, "corrupted corpus passed --verify (rc %d): %s", rc_bad, verify_out);
    for (int i = 0; i < 4; i++) CHECK(bad_ok[i], "bad input %d: %s", i, bad_out[i]);
    CHECK(empty_ok, "info on an empty file: rc %d", r_empty);
    CHECK(r_unknown == 2, "unknown subcommand: rc %d", r_unknown);
}

/* File names are bytes; the manifest must still be valid (strict) JSON that the reader takes. */
TEST(corpus_odd_filenames) {
    char dir[64], p[260], out[200], err[512];
    CHECK(make_tmpdir(dir, sizeof dir) == 0, "mkdtemp failed");
    snprintf(p, sizeof p, "%s/src", dir);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/src/caf\xe9 \"q\"\t.txt", dir);   /* Latin-1 byte, quote, tab */
    write_file(p, "some text\n", 10);
    snprintf(p, sizeof p, "%s/src", dir);
    snprintf(out, sizeof out, "%s/o.bin", dir);
    const char *s[] = {p};
    int rc = corpus_build(out, s, 1, NULL, NULL, err, sizeof err);
    char e2[512] = "";
    corpus *c = rc == 0 ? corpus_open(out, e2, sizeof e2) : NULL;
    int ok = c && corpus_has_manifest(c) && corpus_nsources(c) == 1;
    corpus_close(c);
    snprintf(p, sizeof p, "%s.json", out);
    char *man = slurp(p, NULL);
    int repl = man && strstr(man, "caf\xef\xbf\xbd \\\"q\\\"\\t.txt");
    free(man);
    rm_rf(dir);
    CHECK(rc == 0, "build failed: %s", err);
    CHECK(ok, "manifest with an odd file name not readable: %s", e2);
    CHECK(repl, "file name not escaped / replaced as expected");
}
