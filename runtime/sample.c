/* realm generate / chat / eval: a trained run's weights through the forward plan. This first
 * version re-runs the parallel forward over the last `context` bytes for every new byte; the
 * constant-cost recurrent step graph replaces it later. */
#include "cli.h"
#include "corpus.h"
#include "rng.h"
#include "session.h"
#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double temperature, top_p;
    long top_k;
    rng_state rng;
} sampler;

/* Pick a byte from logits: temperature, then top-k, then top-p (nucleus); T = 0 is greedy. */
static int sample_byte(sampler *sm, const float *logits) {
    int idx[256];
    double p[256];
    for (int i = 0; i < 256; i++) idx[i] = i;
    for (int i = 1; i < 256; i++)           /* insertion sort by logit, descending, stable */
        for (int j = i; j > 0 && logits[idx[j]] > logits[idx[j - 1]]; j--) {
            int t = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = t;
        }
    if (sm->temperature <= 0) return idx[0];
    int k = sm->top_k > 0 && sm->top_k < 256 ? (int)sm->top_k : 256;
    double mx = logits[idx[0]], sum = 0;
    for (int i = 0; i < k; i++) sum += p[i] = exp((logits[idx[i]] - mx) / sm->temperature);
    if (sm->top_p > 0 && sm->top_p < 1) {
        double c = 0;
        int keep = k;
        for (int i = 0; i < k; i++) {
            c += p[i] / sum;
            if (c >= sm->top_p) {
                keep = i + 1;
                break;
            }
        }
        k = keep;
        sum = 0;
        for (int i = 0; i < k; i++) sum += p[i];
    }
    double u = rng_uniform(&sm->rng) * sum;
    for (int i = 0; i < k; i++) {
        u -= p[i];
        if (u < 0) return idx[i];
    }
    return idx[k - 1];
}

typedef struct {
    session s;
    backend *bk;
    float *logits;
} runner;

static int runner_open(runner *r, const char *run, const char *bkname, long context, long batch, char *err,
                       size_t errlen) {
    memset(r, 0, sizeof *r);
    char dir[1200];
    long step;
    int f = train_find_checkpoint(run, dir, sizeof dir, &step, err, errlen);
    if (f == 0) snprintf(err, errlen, "%s: no checkpoint (train a model into it first)", run);
    if (f <= 0) return 2;
    char *src;
    size_t len;
    if (train_read_model_source(dir, &src, &len, err, errlen) < 0) return 2;
    char label[1300];
    snprintf(label, sizeof label, "%.1100s/model.lua", dir);
    if (context <= 0) {
        realm_model m;
        if (model_load_string(src, len, label, &m, err, errlen) < 0) {
            free(src);
            return 2;
        }
        context = m.train.seq;
        model_free(&m);
    }
    r->bk = session_backend(bkname, 0, err, errlen);
    if (!r->bk) {
        free(src);
        return 1;
    }
    int rc = session_open(&r->s, src, len, label, r->bk, 0, batch, context, err, errlen);
    free(src);
    if (rc < 0 || train_load_weights(&r->s, dir, err, errlen) < 0) {
        if (rc == 0) session_close(&r->s);
        bk_destroy(r->bk);
        return 1;
    }
    r->logits = malloc(sizeof(float) * (size_t)(batch * context * 256));
    return 0;
}

static void runner_close(runner *r) {
    free(r->logits);
    session_close(&r->s);
    bk_destroy(r->bk);
}

/* Logits for the byte after hist[0..n): the last `context` bytes go through the forward. */
static int next_logits(runner *r, const uint8_t *hist, long n, const float **row, char *err, size_t errlen) {
    long S = r->s.S, start = n > S ? n - S : 0, len = n - start;
    uint8_t *buf = calloc((size_t)S + 1, 1);
    memcpy(buf, hist + start, (size_t)len);
    int rc = session_set_batch(&r->s, buf, S + 1, err, errlen);
    free(buf);
    if (rc < 0 || session_run(&r->s, err, errlen) < 0 ||
        exec_download(&r->s.x, r->s.m.logits, r->logits, err, errlen) < 0)
        return -1;
    *row = r->logits + (len - 1) * 256;
    return 0;
}

/* Write bytes, holding back an incomplete UTF-8 sequence until it is complete. */
typedef struct {
    uint8_t pend[4];
    int n;
} utf8_out;

static void put_byte(utf8_out *u, uint8_t b) {
    if (u->n == 0 && b < 0x80) {
        fputc(b, stdout);
    } else {
        u->pend[u->n++] = b;
        int need = (u->pend[0] & 0xE0) == 0xC0 ? 2 : (u->pend[0] & 0xF0) == 0xE0 ? 3 : (u->pend[0] & 0xF8) == 0xF0 ? 4 : 1;
        if (u->n >= need || (u->n > 1 && (b & 0xC0) != 0x80)) {
            fwrite(u->pend, 1, (size_t)u->n, stdout);
            u->n = 0;
        }
    }
    fflush(stdout);
}

typedef struct {
    const char *bk, *prompt, *n, *temp, *topk, *topp, *seed, *ctx;
} gen_args;

static int parse_sampler(const char *cmd, const gen_args *a, sampler *sm, long *n, long *ctx) {
    sm->temperature = 0.8;
    sm->top_p = 0.95;
    sm->top_k = 0;
    long seed = 1;
    int rc = 0;
    rc |= a->n && cli_long(cmd, "-n", a->n, 1, 1L << 30, n);
    rc |= a->temp && cli_double(cmd, "--temperature", a->temp, 0, 100, &sm->temperature);
    rc |= a->topk && cli_long(cmd, "--top-k", a->topk, 0, 256, &sm->top_k);
    rc |= a->topp && cli_double(cmd, "--top-p", a->topp, 0, 1, &sm->top_p);
    rc |= a->seed && cli_long(cmd, "--seed", a->seed, 0, 1L << 62, &seed);
    rc |= a->ctx && cli_long(cmd, "--context", a->ctx, 1, 1L << 20, ctx);
    rng_seed(&sm->rng, (uint64_t)seed);
    return rc ? 2 : 0;
}

#define SAMPLER_OPTS(a)                                                                                      \
    {"--backend", "NAME", "cuda, opencl or auto", &(a).bk, NULL},                                            \
    {"-n", "N", "bytes to generate", &(a).n, NULL},                                                          \
    {"--temperature", "T", "sampling temperature, 0 = greedy (default 0.8)", &(a).temp, NULL},               \
    {"--top-k", "K", "sample among the K most likely bytes (0 = all)", &(a).topk, NULL},                     \
    {"--top-p", "P", "nucleus sampling mass (default 0.95)", &(a).topp, NULL},                               \
    {"--seed", "N", "sampling seed: same seed, same text (default 1)", &(a).seed, NULL},                     \
    {"--context", "N", "bytes of context (default: the training sequence length)", &(a).ctx, NULL}

int cmd_generate(int argc, char **argv) {
    gen_args a = {"auto", NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    const cli_opt opts[] = {{"--prompt", "TEXT", "text to continue (default: read standard input)", &a.prompt, NULL},
                            SAMPLER_OPTS(a), {NULL, NULL, NULL, NULL, NULL}};
    const char *pos[1];
    int npos, done;
    int rc = cli_parse("generate", "RUN [--prompt TEXT] [-n N --temperature T --top-k K --top-p P --seed S]",
                       "Continue a prompt with a trained run's latest checkpoint.", argc, argv, opts, pos, 1, 1, &npos,
                       &done);
    if (rc || done) return rc;
    sampler sm;
    long n = 200, ctx = 0;
    if (parse_sampler("generate", &a, &sm, &n, &ctx)) return 2;
    char *prompt = NULL;
    size_t plen = 0;
    if (a.prompt) {
        prompt = strdup(a.prompt);
        plen = strlen(prompt);
    } else {
        size_t cap = 0;
        char buf[4096];
        size_t r;
        while ((r = fread(buf, 1, sizeof buf, stdin)) > 0) {
            if (plen + r + 1 > cap) cap = (plen + r + 1) * 2, prompt = realloc(prompt, cap);
            memcpy(prompt + plen, buf, r);
            plen += r;
        }
    }
    if (plen == 0) {
        free(prompt);
        prompt = strdup("\n");
        plen = 1;
    }
    char err[4096];
    runner r;
    if ((rc = runner_open(&r, pos[0], a.bk, ctx, 1, err, sizeof err)) != 0) {
        fprintf(stderr, "realm generate: %s\n", err);
        free(prompt);
        return rc;
    }
    uint8_t *hist = malloc(plen + (size_t)n);
    memcpy(hist, prompt, plen);
    long len = (long)plen;
    fwrite(prompt, 1, plen, stdout);
    utf8_out u = {0};
    for (long i = 0; i < n; i++) {
        const float *row;
        if (next_logits(&r, hist, len, &row, err, sizeof err) < 0) {
            fprintf(stderr, "\nrealm generate: %s\n", err);
            rc = 1;
            break;
        }
        uint8_t b = (uint8_t)sample_byte(&sm, row);
        hist[len++] = b;
        put_byte(&u, b);
    }
    if (u.n) fwrite(u.pend, 1, (size_t)u.n, stdout);
    printf("\n");
    free(hist);
    free(prompt);
    runner_close(&r);
    return rc;
}

int cmd_chat(int argc, char **argv) {
    gen_args a = {"auto", NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    const cli_opt opts[] = {SAMPLER_OPTS(a), {NULL, NULL, NULL, NULL, NULL}};
    const char *pos[1];
    int npos, done;
    int rc = cli_parse("chat", "RUN [options]",
                       "Talk to a trained run: each line you type is added to the conversation and the model's\n"
                       "reply (up to -n bytes, ending at a blank line) is streamed back. The whole conversation is\n"
                       "the context. Ctrl-D (end of input) leaves.",
                       argc, argv, opts, pos, 1, 1, &npos, &done);
    if (rc || done) return rc;
    sampler sm;
    long n = 300, ctx = 0;
    if (parse_sampler("chat", &a, &sm, &n, &ctx)) return 2;
    char err[4096];
    runner r;
    if ((rc = runner_open(&r, pos[0], a.bk, ctx, 1, err, sizeof err)) != 0) {
        fprintf(stderr, "realm chat: %s\n", err);
        return rc;
    }
    size_t cap = 1 << 16, len = 0;
    uint8_t *hist = malloc(cap);
    char line[8192];
    for (;;) {
        fputs("> ", stderr);
        if (!fgets(line, sizeof line, stdin)) break;
        size_t ll = strlen(line);
        if (len + ll + (size_t)n + 2 > cap) {
            cap = (len + ll + (size_t)n + 2) * 2;
            hist = realloc(hist, cap);
        }
        memcpy(hist + len, line, ll);
        len += ll;
        if (ll == 0 || line[ll - 1] != '\n') hist[len++] = '\n';
        utf8_out u = {0};
        for (long i = 0; i < n; i++) {
            const float *row;
            if (next_logits(&r, hist, (long)len, &row, err, sizeof err) < 0) {
                fprintf(stderr, "realm chat: %s\n", err);
                rc = 1;
                goto out;
            }
            uint8_t b = (uint8_t)sample_byte(&sm, row);
            hist[len++] = b;
            put_byte(&u, b);
            if (b == '\n' && len >= 2 && hist[len - 2] == '\n') break;   /* a blank line ends a turn */
        }
        if (u.n) fwrite(u.pend, 1, (size_t)u.n, stdout);
        if (hist[len - 1] != '\n') {
            hist[len++] = '\n';
            fputc('\n', stdout);
        }
        fflush(stdout);
    }
    fputc('\n', stderr);
out:
    free(hist);
    runner_close(&r);
    return rc;
}

int cmd_eval(int argc, char **argv) {
    const char *data = NULL, *bk = "auto", *maxb_s = NULL;
    const cli_opt opts[] = {{"--data", "FILE", "text (or corpus) to score, whole file", &data, NULL},
                            {"--backend", "NAME", "cuda, opencl or auto", &bk, NULL},
                            {"--max-bytes", "N", "score at most N bytes (default 1048576)", &maxb_s, NULL},
                            {NULL, NULL, NULL, NULL, NULL}};
    const char *pos[1];
    int npos, done;
    int rc = cli_parse("eval", "RUN --data FILE", "Bits per byte of a trained run on a text, in windows of the\n"
                       "training sequence length.", argc, argv, opts, pos, 1, 1, &npos, &done);
    if (rc || done) return rc;
    if (!data) {
        fprintf(stderr, "realm eval: --data is required\n");
        return 2;
    }
    long maxb = 1 << 20;
    if (maxb_s && cli_long("eval", "--max-bytes", maxb_s, 2, 1L << 40, &maxb)) return 2;
    char err[4096];
    corpus *c = corpus_open(data, err, sizeof err);
    if (!c) {
        fprintf(stderr, "realm eval: %s\n", err);
        return 2;
    }
    runner r;
    if ((rc = runner_open(&r, pos[0], bk, 0, 1, err, sizeof err)) != 0) {
        fprintf(stderr, "realm eval: %s\n", err);
        corpus_close(c);
        return rc;
    }
    long S = r.s.S;
    uint64_t total = corpus_bytes(c);
    if ((long)total < S + 1) {
        fprintf(stderr, "realm eval: %s: shorter than one window of %ld bytes\n", data, S + 1);
        runner_close(&r);
        corpus_close(c);
        return 2;
    }
    const uint8_t *bytes = corpus_data(c);
    double sum = 0;
    long windows = 0;
    for (uint64_t off = 0; off + (uint64_t)S + 1 <= total && (long)off < maxb; off += (uint64_t)S) {
        double l;
        if (session_set_batch(&r.s, bytes + off, S + 1, err, sizeof err) < 0 || session_run(&r.s, err, sizeof err) < 0 ||
            session_loss(&r.s, &l, err, sizeof err) < 0) {
            fprintf(stderr, "realm eval: %s\n", err);
            rc = 1;
            break;
        }
        sum += l;
        windows++;
    }
    if (rc == 0)
        printf("%s: %.4f bits/byte over %ld bytes (%ld windows of %ld)\n", data, sum / windows / M_LN2, windows * S,
               windows, S);
    runner_close(&r);
    corpus_close(c);
    return rc;
}
