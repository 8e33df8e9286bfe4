/* realm generate / chat / eval. generate and chat run the model's step plan (runtime/decode.c,
 * docs/decode.md): constant cost per byte, sampling on the device, the state kept across chat
 * turns; a prompt, and each chat turn from the state so far, goes through the parallel prefill
 * plan first. eval
 * scores windows of the training sequence length through the parallel forward. */
#include "cli.h"
#include "corpus.h"
#include "decode.h"
#include "session.h"
#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* A trained run's step plan with its latest weights. parallel: use the prefill plan for
 * prompts (1) or step through them byte by byte (0). */
static int decoder_from_run(decoder *d, backend **bk, const char *run, const char *bkname, long batch, int parallel,
                            char *err, size_t errlen) {
    char dir[1200];
    long step;
    int f = train_find_checkpoint(run, dir, sizeof dir, &step, err, errlen);
    if (f == 0) snprintf(err, errlen, "%s: no checkpoint (train a model into it first)", run);
    if (f <= 0) return 2;
    char *src;
    size_t len;
    if (train_read_model_source(dir, &src, &len, err, errlen) < 0) return 2;
    char label[1300], weights[1300];
    snprintf(label, sizeof label, "%.1100s/model.lua", dir);
    snprintf(weights, sizeof weights, "%.1100s/model.safetensors", dir);
    *bk = session_backend(bkname, 0, err, errlen);
    if (!*bk) {
        free(src);
        return 1;
    }
    int rc = decoder_open(d, src, len, label, *bk, batch, err, errlen);
    free(src);
    if (rc == 0 && decoder_load_weights(d, weights, err, errlen) < 0) {
        decoder_close(d);
        rc = -1;
    }
    if (rc < 0) {
        bk_destroy(*bk);
        return 1;
    }
    d->parallel = parallel;
    return 0;
}

typedef struct {
    const char *bk, *prompt, *n, *temp, *topk, *topp, *seed, *ctx, *bench, *bench_steps, *batch, *prefill;
} gen_args;

static int parse_sampling(const char *cmd, const gen_args *a, decode_sampling *sm, long *n, int *parallel) {
    sm->temperature = 0.8;
    sm->top_p = 0.95;
    sm->top_k = 0;
    long seed = 1, ctx = 0;
    int rc = 0;
    rc |= a->n && cli_long(cmd, "-n", a->n, 1, 1L << 30, n);
    rc |= a->temp && cli_double(cmd, "--temperature", a->temp, 0, 100, &sm->temperature);
    rc |= a->topk && cli_long(cmd, "--top-k", a->topk, 0, 256, &sm->top_k);
    rc |= a->topp && cli_double(cmd, "--top-p", a->topp, 0, 1, &sm->top_p);
    rc |= a->seed && cli_long(cmd, "--seed", a->seed, 0, 1L << 62, &seed);
    rc |= a->ctx && cli_long(cmd, "--context", a->ctx, 1, 1L << 40, &ctx);
    sm->seed = (uint64_t)seed;
    /* --prefill, else REALM_PREFILL, else parallel */
    const char *pf = a->prefill ? a->prefill : getenv("REALM_PREFILL");
    if (pf && *pf && strcmp(pf, "parallel") != 0 && strcmp(pf, "step") != 0) {
        fprintf(stderr, "realm %s: %s must be parallel or step, got '%s'\n", cmd, a->prefill ? "--prefill" : "REALM_PREFILL",
                pf);
        rc = 1;
    }
    *parallel = !(pf && strcmp(pf, "step") == 0);
    return rc ? 2 : 0;
}

#define SAMPLER_OPTS(a)                                                                                      \
    {"--backend", "NAME", "cuda, opencl or auto", &(a).bk, NULL},                                            \
    {"-n", "N", "bytes to generate", &(a).n, NULL},                                                          \
    {"--temperature", "T", "sampling temperature, 0 = greedy (default 0.8)", &(a).temp, NULL},               \
    {"--top-k", "K", "sample among the K most likely bytes (0 = all)", &(a).topk, NULL},                     \
    {"--top-p", "P", "nucleus sampling mass (default 0.95)", &(a).topp, NULL},                               \
    {"--seed", "N", "sampling seed (48 bits used): same seed, same text (default 1)", &(a).seed, NULL},      \
    {"--context", "N", "accepted for compatibility; the step plan has no context limit", &(a).ctx, NULL},      \
    {"--prefill", "MODE", "parallel (default: the prompt through the parallel forward) or step (byte by byte)", \
     &(a).prefill, NULL}

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

static void put_flush(utf8_out *u) {
    if (u->n) fwrite(u->pend, 1, (size_t)u->n, stdout);
    u->n = 0;
    fflush(stdout);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The parallel prefill of a P-byte prompt: its throughput after a warm-up run (the first one
 * compiles the prefill plan and sizes its arena). What the prefill plan takes of P bytes is
 * what a real P-byte prompt would: a multiple of the Mamba-3 chunk, at least one byte left. */
static int bench_prefill(decoder *d, long pos, long batch, char *err, size_t errlen) {
    const long m = decoder_reset(d, err, errlen) < 0 ? -1 : decoder_prefill_len(d, pos);
    if (m <= 0) return m < 0 ? -1 : 0;
    uint8_t *bytes = malloc((size_t)(batch * (m + 1)));
    if (!bytes) {
        snprintf(err, errlen, "--bench: out of host memory");
        return -1;
    }
    for (long i = 0; i < batch * (m + 1); i++) bytes[i] = (uint8_t)('a' + (i * 7) % 26);
    int rc = 0;
    double s0 = 0;
    long n0 = 0;
    for (int run = 0; run < 2 && rc == 0; run++) {
        s0 = d->prefill_s, n0 = d->prefill_bytes;
        rc = decoder_reset(d, err, errlen) < 0 || decoder_feed(d, bytes, m + 1, NULL, err, errlen) < 0 ? -1 : 0;
    }
    free(bytes);
    if (rc == 0) {
        const double dt = d->prefill_s - s0;
        printf("position %ld: parallel prefill of %ld bytes in %.3f ms, %.0f bytes/s (batch %ld: %.0f bytes/s)\n", pos,
               d->prefill_bytes - n0, dt * 1e3, (double)(d->prefill_bytes - n0) / dt, batch,
               (double)(batch * (d->prefill_bytes - n0)) / dt);
    }
    return rc;
}

/* --bench P1,P2,...: per-token time of the whole step (model + sampler + reading the byte) at
 * each position. The sequence jumps to P - 1 without feeding the bytes before it: the step's
 * cost depends on the position (the attention ring is full from position `window` on), never
 * on what the state holds, so this times exactly what a real P-byte conversation costs. With
 * the parallel prefill on, each position also times the prefill of a P-byte prompt. */
static int bench(decoder *d, const char *list, long steps, long batch, char *err, size_t errlen) {
    const char *p = list;
    uint8_t *in = calloc((size_t)batch, 1), *out = malloc((size_t)batch);
    int rc = 0;
    printf("decode bench: batch %ld, %ld timed steps per position, %s, prefill %s\n", batch, steps,
           d->use_graph ? "CUDA graph on" : d->bk && d->bk->kind == BK_CUDA ? "CUDA graph off" : "no graph",
           !d->parallel ? "byte by byte (step)" : d->pf.ok ? "parallel" : d->pf.why);
    while (*p && rc == 0) {
        char *end;
        long pos = strtol(p, &end, 10);
        if (end == p || pos < 1) {
            snprintf(err, errlen, "--bench: expected positions like 1024,16384, got '%s'", p);
            rc = 2;
            break;
        }
        p = *end == ',' ? end + 1 : end;
        if (bench_prefill(d, pos, batch, err, errlen) < 0) {
            rc = 1;
            break;
        }
        rc = decoder_reset(d, err, errlen) < 0 || decoder_set_position(d, pos - 1, err, errlen) < 0 ||
             decoder_feed(d, in, 1, NULL, err, errlen) < 0;
        for (long i = 0; i < 2 && rc == 0; i++) rc = decoder_next(d, out, err, errlen) < 0;   /* warm up */
        double t0 = now_s();
        for (long i = 0; i < steps && rc == 0; i++) rc = decoder_next(d, out, err, errlen) < 0;
        double dt = (now_s() - t0) / (double)steps;
        if (rc == 0)
            printf("position %ld: %.3f ms/token, %.1f tokens/s (batch %ld: %.1f bytes/s)\n", pos, dt * 1e3, 1.0 / dt,
                   batch, (double)batch / dt);
    }
    free(in);
    free(out);
    return rc;
}

int cmd_generate(int argc, char **argv) {
    gen_args a = {"auto", NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    const cli_opt opts[] = {{"--prompt", "TEXT", "text to continue (default: read standard input)", &a.prompt, NULL},
                            SAMPLER_OPTS(a),
                            {"--bench", "P1,P2,..", "time a decode step at these positions instead of generating", &a.bench,
                             NULL},
                            {"--bench-steps", "N", "timed steps per position (default 64)", &a.bench_steps, NULL},
                            {"--batch", "B", "sequences decoded together in --bench (default 1)", &a.batch, NULL},
                            {NULL, NULL, NULL, NULL, NULL}};
    const char *pos[1];
    int npos, done;
    int rc = cli_parse("generate", "RUN [--prompt TEXT] [-n N --temperature T --top-k K --top-p P --seed S]",
                       "Continue a prompt with a trained run's latest checkpoint. The prompt runs through the\n"
                       "parallel forward (--prefill parallel, the default), which hands its final state to the\n"
                       "recurrent step plan; each generated byte then costs one step, whatever the position.",
                       argc, argv, opts, pos, 1, 1, &npos, &done);
    if (rc || done) return rc;
    decode_sampling sm;
    long n = 200, steps = 64, batch = 1;
    int parallel;
    if (parse_sampling("generate", &a, &sm, &n, &parallel)) return 2;
    if ((a.bench_steps && cli_long("generate", "--bench-steps", a.bench_steps, 1, 1L << 30, &steps)) ||
        (a.batch && cli_long("generate", "--batch", a.batch, 1, 1L << 16, &batch)))
        return 2;
    if (!a.bench) batch = 1;
    char err[4096];
    decoder d;
    backend *bk;
    if ((rc = decoder_from_run(&d, &bk, pos[0], a.bk, batch, parallel, err, sizeof err)) != 0) {
        fprintf(stderr, "realm generate: %s\n", err);
        return rc;
    }
    if (a.bench) {
        rc = bench(&d, a.bench, steps, batch, err, sizeof err);
        if (rc) fprintf(stderr, "realm generate: %s\n", err);
        decoder_close(&d);
        bk_destroy(bk);
        return rc;
    }
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
    fwrite(prompt, 1, plen, stdout);
    fflush(stdout);
    utf8_out u = {0};
    if (decoder_set_sampling(&d, &sm, 0, err, sizeof err) < 0 ||
        decoder_feed(&d, (const uint8_t *)prompt, (long)plen, NULL, err, sizeof err) < 0) {
        fprintf(stderr, "\nrealm generate: %s\n", err);
        rc = 1;
    }
    for (long i = 0; i < n && rc == 0; i++) {
        uint8_t b;
        if (decoder_next(&d, &b, err, sizeof err) < 0) {
            fprintf(stderr, "\nrealm generate: %s\n", err);
            rc = 1;
            break;
        }
        put_byte(&u, b);
    }
    put_flush(&u);
    printf("\n");
    free(prompt);
    decoder_close(&d);
    bk_destroy(bk);
    return rc;
}

/* A chat command: 1 handled (message on stderr), 0 not a command, -1 failed. */
static int chat_command(decoder *d, decode_sampling *sm, const char *line, char *err, size_t errlen) {
    if (line[0] != '/') return 0;
    char word[32] = "", arg[128] = "";
    sscanf(line, "/%31s %127s", word, arg);
    if (strcmp(word, "reset") == 0) {
        if (decoder_reset(d, err, errlen) < 0) return -1;
        fprintf(stderr, "[reset: the conversation starts again]\n");
    } else if (strcmp(word, "temperature") == 0 || strcmp(word, "seed") == 0) {
        char *end;
        if (word[0] == 't') {
            double v = strtod(arg, &end);
            if (end == arg || !(v >= 0 && v <= 100)) {
                fprintf(stderr, "[/temperature needs a number in [0, 100]]\n");
                return 1;
            }
            sm->temperature = v;
            fprintf(stderr, "[temperature %g]\n", v);
        } else {
            unsigned long long v = strtoull(arg, &end, 10);
            if (end == arg || arg[0] == '-') {
                fprintf(stderr, "[/seed needs a non-negative integer]\n");
                return 1;
            }
            sm->seed = (uint64_t)v;
            fprintf(stderr, "[seed %llu]\n", v);
        }
        if (decoder_set_sampling(d, sm, 0, err, errlen) < 0) return -1;
    } else {
        fprintf(stderr, "[unknown command /%s: try /reset, /temperature X, /seed N]\n", word);
    }
    return 1;
}

int cmd_chat(int argc, char **argv) {
    gen_args a = {"auto", NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    const cli_opt opts[] = {SAMPLER_OPTS(a), {NULL, NULL, NULL, NULL, NULL}};
    const char *pos[1];
    int npos, done;
    int rc = cli_parse("chat", "RUN [options]",
                       "Talk to a trained run: each line you type is added to the conversation and the model's\n"
                       "reply (up to -n bytes, ending at a blank line) is streamed back. The model keeps its state\n"
                       "across turns, so a turn costs only its own bytes. Each turn runs through the parallel\n"
                       "prefill from the state so far (--prefill step: byte by byte); at the end, stderr says\n"
                       "how many bytes went through it.\n"
                       "Commands: /reset (start again), /temperature X, /seed N. Ctrl-D (end of input) leaves.",
                       argc, argv, opts, pos, 1, 1, &npos, &done);
    if (rc || done) return rc;
    decode_sampling sm;
    long n = 300;
    int parallel;
    if (parse_sampling("chat", &a, &sm, &n, &parallel)) return 2;
    char err[4096];
    decoder d;
    backend *bk;
    if ((rc = decoder_from_run(&d, &bk, pos[0], a.bk, 1, parallel, err, sizeof err)) != 0) {
        fprintf(stderr, "realm chat: %s\n", err);
        return rc;
    }
    if (decoder_set_sampling(&d, &sm, 0, err, sizeof err) < 0) goto fail;
    char line[8192];
    for (;;) {
        fputs("> ", stderr);
        fflush(stderr);
        if (!fgets(line, sizeof line - 1, stdin)) break;   /* room for a newline */
        int c = chat_command(&d, &sm, line, err, sizeof err);
        if (c < 0) goto fail;
        if (c > 0) continue;
        size_t ll = strlen(line);
        if (ll == 0 || line[ll - 1] != '\n') line[ll++] = '\n', line[ll] = 0;
        if (decoder_feed(&d, (const uint8_t *)line, (long)ll, NULL, err, sizeof err) < 0) goto fail;
        utf8_out u = {0};
        uint8_t last = '\n';   /* the line just fed ends with a newline */
        for (long i = 0; i < n; i++) {
            uint8_t b;
            if (decoder_next(&d, &b, err, sizeof err) < 0) goto fail;
            put_byte(&u, b);
            if (b == '\n' && last == '\n') break;   /* a blank line ends a turn */
            last = b;
        }
        put_flush(&u);
        /* what the model saw is what was shown: a reply cut at -n gets its newline fed too */
        if (last != '\n') {
            const uint8_t nl = '\n';
            if (decoder_feed(&d, &nl, 1, NULL, err, sizeof err) < 0) goto fail;
            fputc('\n', stdout);
        }
        fflush(stdout);
    }
    fprintf(stderr, "\n[%ld bytes of the conversation prefilled in parallel]\n", d.prefill_bytes);
    decoder_close(&d);
    bk_destroy(bk);
    return 0;
fail:
    fprintf(stderr, "realm chat: %s\n", err);
    decoder_close(&d);
    bk_destroy(bk);
    return 1;
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
