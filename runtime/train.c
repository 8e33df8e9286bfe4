/* realm train: the training loop, checkpoints and resume. */
#include "autotune.h"
#include "checkpoint.h"
#include "cli.h"
#include "corpus.h"
#include "fsutil.h"
#include "json.h"
#include "loader.h"
#include "rng.h"
#include "safetensors.h"
#include "session.h"
#include "sha256.h"
#include "train.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double train_lr(const train_config *c, long step) {
    if (c->warmup > 0 && step <= c->warmup) return c->lr * (double)step / (double)c->warmup;
    if (strcmp(c->schedule, "constant") == 0) return c->lr;
    double lo = c->lr * c->min_lr_frac;
    long span = c->steps - c->warmup;
    double p = span > 0 ? (double)(step - c->warmup) / (double)span : 1.0;
    if (p > 1) p = 1;
    if (strcmp(c->schedule, "wsd") == 0)     /* warmup, stable, then a linear decay over the last 20% */
        return p < 0.8 ? c->lr : c->lr - (c->lr - lo) * (p - 0.8) / 0.2;
    return lo + 0.5 * (c->lr - lo) * (1.0 + cos(M_PI * p));
}

/* ---- checkpoint contents ---- */

typedef struct {
    st_tensor *t;
    int n;
    float **bufs;
} tensor_list;

static void list_free(tensor_list *l) {
    for (int i = 0; i < l->n; i++) free(l->bufs[i]);
    free(l->bufs);
    free(l->t);
    memset(l, 0, sizeof *l);
}

/* Download every tensor of `role` as a safetensors list named by the graph. */
static int gather_role(session *s, ir_role role, tensor_list *l, char *err, size_t errlen) {
    const ir_graph *g = &s->m.g;
    memset(l, 0, sizeof *l);
    l->t = calloc((size_t)g->nt, sizeof *l->t);
    l->bufs = calloc((size_t)g->nt, sizeof *l->bufs);
    for (int i = 0; i < g->nt; i++) {
        const ir_tensor *t = &g->t[i];
        if (t->role != role || t->base != i || s->x.offset[i] == (size_t)-1) continue;
        long n = ir_numel(&t->shape, 1, 1);
        float *b = malloc(sizeof(float) * (size_t)(n ? n : 1));
        if (exec_download(&s->x, i, b, err, errlen) < 0) {
            free(b);
            return -1;
        }
        int64_t shape[ST_MAX_DIMS];
        for (int d = 0; d < t->shape.ndim; d++) shape[d] = t->shape.d[d];
        l->bufs[l->n] = b;
        l->t[l->n++] = st_f32(t->name, b, t->shape.ndim, shape);
    }
    return 0;
}

/* Upload tensors of `role` from a safetensors file; every one must be present with its shape. */
static int scatter_role(session *s, ir_role role, const char *path, char *err, size_t errlen) {
    st_file *f = st_open(path, err, errlen);
    if (!f) return -1;
    const ir_graph *g = &s->m.g;
    int rc = 0;
    for (int i = 0; i < g->nt && rc == 0; i++) {
        const ir_tensor *t = &g->t[i];
        if (t->role != role || t->base != i || s->x.offset[i] == (size_t)-1) continue;
        const st_info *in = st_find(f, t->name);
        long n = ir_numel(&t->shape, 1, 1);
        if (!in || (long)in->numel != n) {
            snprintf(err, errlen, "%s: tensor %s is %s", path, t->name, in ? "the wrong size" : "missing");
            rc = -1;
            break;
        }
        if (st_copy_f32(in, s->host) < 0) {
            snprintf(err, errlen, "%s: tensor %s has an unsupported dtype", path, t->name);
            rc = -1;
            break;
        }
        rc = exec_upload(&s->x, i, s->host, err, errlen);
    }
    st_close(f);
    return rc;
}

int train_load_weights(session *s, const char *ckpt_dir, char *err, size_t errlen) {
    char path[1200];
    snprintf(path, sizeof path, "%.1100s/model.safetensors", ckpt_dir);
    return scatter_role(s, ROLE_PARAM, path, err, errlen);
}

int train_find_checkpoint(const char *run, char *dir, size_t dirlen, long *step, char *err, size_t errlen) {
    int found = ckpt_find_latest(run, dir, dirlen, step, err, errlen);
    if (found <= 0) return found;
    if (ckpt_verify(dir, step, err, errlen) < 0) return -1;
    return 1;
}

int train_read_model_source(const char *ckpt_dir, char **src, size_t *len, char *err, size_t errlen) {
    char path[1200];
    snprintf(path, sizeof path, "%.1100s/model.lua", ckpt_dir);
    return fs_read_file(path, 64u << 20, src, len, err, errlen);
}

static void hex_sha(const void *p, size_t n, char out[65]) {
    uint8_t h[32];
    sha256(p, n, h);
    sha256_hex(h, out);
}

typedef struct {
    long step, batch, seq, steps, warmup, eval_every, save_every;
    uint64_t seed;
    int recompute;           /* every layer recomputed (the auto-tuner's choice; kept on resume) */
    rng_state rng;
    double lr;
    char schedule[16];
    char model_sha[65];
    char precision[8];       /* "bf16" or "fp32": the matmuls' operand precision (kept on resume) */
    long best_step;          /* the step of the lowest validation loss so far (0: none yet) */
    double best_bpb;         /* that validation loss, bits/byte: RUN/best holds its checkpoint */
} train_state;

static void state_json(const train_state *st, json_buf *b) {
    json_buf_printf(b, "{\n  \"format\": \"realm-train-state\",\n  \"version\": 1,\n  \"step\": %ld,\n", st->step);
    json_buf_printf(b, "  \"model_sha256\": \"%s\",\n  \"seed\": \"%llu\",\n", st->model_sha, (unsigned long long)st->seed);
    json_buf_printf(b, "  \"sampler_rng\": [\"%llu\", \"%llu\", \"%llu\", \"%llu\"],\n",
                    (unsigned long long)st->rng.s[0], (unsigned long long)st->rng.s[1],
                    (unsigned long long)st->rng.s[2], (unsigned long long)st->rng.s[3]);
    json_buf_printf(b, "  \"recompute\": %d,\n  \"precision\": \"%s\",\n", st->recompute, st->precision);
    if (st->best_step > 0)
        json_buf_printf(b, "  \"best_validation\": {\"step\": %ld, \"bits_per_byte\": %.17g},\n", st->best_step,
                        st->best_bpb);
    json_buf_printf(b, "  \"batch\": %ld,\n  \"seq\": %ld,\n  \"steps\": %ld,\n  \"warmup\": %ld,\n", st->batch, st->seq,
                    st->steps, st->warmup);
    json_buf_printf(b, "  \"eval_every\": %ld,\n  \"save_every\": %ld,\n  \"lr\": %.17g,\n  \"schedule\": \"%s\"\n}\n",
                    st->eval_every, st->save_every, st->lr, st->schedule);
}

static int parse_u64(const json_value *v, uint64_t *out) {
    const char *s;
    if (!v || json_as_string(v, &s) != 1) return -1;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (errno || *end || end == s) return -1;
    *out = x;
    return 0;
}

static int read_state(const char *dir, train_state *st, char *err, size_t errlen) {
    char path[1200], *src;
    size_t len;
    snprintf(path, sizeof path, "%.1100s/state.json", dir);
    if (fs_read_file(path, 1 << 20, &src, &len, err, errlen) < 0) return -1;
    char perr[300];
    json_doc *d = json_parse(src, len, NULL, perr, sizeof perr);
    free(src);
    if (!d) {
        snprintf(err, errlen, "%s: %s", path, perr);
        return -1;
    }
    const json_value *r = json_root(d);
    int64_t i64;
    int ok = 1;
    const char *s;
#define GETI(key, dst) ok &= json_as_int(json_get(r, key), &i64) == 1 ? ((dst) = (long)i64, 1) : 0
    GETI("step", st->step);
    GETI("batch", st->batch);
    GETI("seq", st->seq);
    GETI("steps", st->steps);
    GETI("warmup", st->warmup);
    GETI("eval_every", st->eval_every);
    GETI("save_every", st->save_every);
#undef GETI
    /* optional: checkpoints written before the auto-tuner have no recompute field */
    st->recompute = json_as_int(json_get(r, "recompute"), &i64) == 1 && i64 != 0;
    /* optional: checkpoints written before bf16 have no precision field and were fp32 runs */
    if (json_as_string(json_get(r, "precision"), &s) == 1) {
        if (strcmp(s, "bf16") != 0 && strcmp(s, "fp32") != 0) ok = 0;
        else snprintf(st->precision, sizeof st->precision, "%s", s);
    } else {
        snprintf(st->precision, sizeof st->precision, "fp32");
    }
    /* optional: no evaluation yet, or a checkpoint from before RUN/best */
    const json_value *bv = json_get(r, "best_validation");
    st->best_step = 0;
    if (bv) {
        const json_value *bb = json_get(bv, "bits_per_byte");
        ok &= json_as_int(json_get(bv, "step"), &i64) == 1 && i64 > 0 && bb && bb->type == JSON_NUMBER && isfinite(bb->num);
        if (ok) st->best_step = (long)i64, st->best_bpb = bb->num;
    }
    const json_value *lr = json_get(r, "lr");
    ok &= lr && lr->type == JSON_NUMBER;
    if (ok) st->lr = lr->num;
    ok &= parse_u64(json_get(r, "seed"), &st->seed) == 0;
    const json_value *rs = json_get(r, "sampler_rng");
    for (int k = 0; k < 4 && ok; k++) ok &= parse_u64(json_at(rs, (size_t)k), &st->rng.s[k]) == 0;
    ok &= json_as_string(json_get(r, "model_sha256"), &s) == 1 && strlen(s) == 64;
    if (ok) memcpy(st->model_sha, s, 65);
    ok &= json_as_string(json_get(r, "schedule"), &s) == 1 && strlen(s) < sizeof st->schedule;
    if (ok) snprintf(st->schedule, sizeof st->schedule, "%s", s);
    json_free(d);
    if (!ok) snprintf(err, errlen, "%s: missing or malformed fields", path);
    return ok ? 0 : -1;
}

static int save_checkpoint(session *s, const char *run, const train_state *st, const char *model_src,
                           size_t model_len, char *err, size_t errlen) {
    tensor_list params, moments;
    int rc = -1;
    if (gather_role(s, ROLE_PARAM, &params, err, errlen) < 0 || gather_role(s, ROLE_OPT, &moments, err, errlen) < 0) {
        list_free(&params);
        return -1;
    }
    char stepbuf[32];
    snprintf(stepbuf, sizeof stepbuf, "%ld", st->step);
    st_meta meta[3] = {{"format", "realm"}, {"model", s->m.name}, {"step", stepbuf}};
    st_set pset = {params.t, params.n, meta, 3}, oset = {moments.t, moments.n, meta, 3};
    json_buf js = {0};
    state_json(st, &js);
    ckpt_file files[4] = {
        {.name = "model.safetensors", .write = st_write_cb, .ctx = &pset},
        {.name = "optim.safetensors", .write = st_write_cb, .ctx = &oset},
        {.name = "state.json", .data = js.p, .len = js.len},
        {.name = "model.lua", .data = model_src, .len = model_len},
    };
    rc = ckpt_save(run, st->step, files, 4, err, errlen);
    json_buf_free(&js);
    list_free(&params);
    list_free(&moments);
    return rc;
}

/* The loss log keeps one line per step; after a resume, lines past the checkpoint (from the
 * run that died) are dropped so the log reads as if the run had never stopped. */
static FILE *open_loss_log(const char *run, long upto, char *err, size_t errlen) {
    char path[1200], *src = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%.1100s/losses.tsv", run);
    struct stat stt;
    if (stat(path, &stt) == 0) {
        if (fs_read_file(path, 1u << 30, &src, &len, err, errlen) < 0) return NULL;
        json_buf keep = {0};
        char *line = src, *end = src + len;
        while (line < end) {
            char *nl = memchr(line, '\n', (size_t)(end - line));
            if (!nl) break;              /* a torn last line */
            long st = strtol(line, NULL, 10);
            if (st >= 1 && st <= upto) json_buf_put(&keep, line, (size_t)(nl - line + 1));
            line = nl + 1;
        }
        int rc = fs_write_atomic(path, keep.p ? keep.p : "", keep.len, err, errlen);
        json_buf_free(&keep);
        free(src);
        if (rc < 0) return NULL;
    }
    FILE *f = fopen(path, "a");
    if (!f) snprintf(err, errlen, "%s: %s", path, strerror(errno));
    return f;
}

/* Validation: fixed, evenly spaced windows of the held-out split, so every evaluation (and a
 * resumed run's) sees the same bytes. */
static int evaluate(session *ev, const corpus *c, long max_tokens, double *bpb, char *err, size_t errlen) {
    long B = ev->B, S = ev->S, rowlen = S + 1;
    uint64_t vsize = corpus_size(c, 1);
    if ((long)vsize < rowlen) {
        snprintf(err, errlen, "%s: the validation split is shorter than one sequence", corpus_path(c));
        return -1;
    }
    long rows = (max_tokens + S - 1) / S;
    long batches = (rows + B - 1) / B;
    uint8_t *buf = malloc((size_t)(B * rowlen));
    double total = 0;
    long span = (long)vsize - rowlen, nrows = batches * B;
    for (long bi = 0; bi < batches; bi++) {
        for (long r = 0; r < B; r++) {
            long idx = bi * B + r;
            uint64_t off = nrows > 1 ? (uint64_t)((double)span * (double)idx / (double)(nrows - 1)) : 0;
            corpus_read(c, 1, off, rowlen, buf + r * rowlen);
        }
        double l;
        if (session_set_batch(ev, buf, rowlen, err, errlen) < 0 || session_run(ev, err, errlen) < 0 ||
            session_loss(ev, &l, err, errlen) < 0) {
            free(buf);
            return -1;
        }
        total += l;
    }
    free(buf);
    *bpb = total / (double)batches / M_LN2;
    return 0;
}

static void fmt_eta(double sec, char *buf, size_t len) {
    if (sec < 0 || !isfinite(sec)) snprintf(buf, len, "?");
    else if (sec < 90) snprintf(buf, len, "%.0fs", sec);
    else if (sec < 5400) snprintf(buf, len, "%.0fm", sec / 60);
    else snprintf(buf, len, "%.1fh", sec / 3600);
}

int cmd_train(int argc, char **argv) {
    const char *data = NULL, *out = NULL, *bkname = "auto", *steps_s = NULL, *batch_s = NULL, *seq_s = NULL,
               *lr_s = NULL, *seed_s = NULL, *warmup_s = NULL, *eval_s = NULL, *save_s = NULL, *log_s = NULL,
               *dev_s = NULL, *evtok_s = NULL, *prec_s = NULL, *frac_s = NULL, *budget_s = NULL;
    const cli_opt opts[] = {
        {"--data", "CORPUS", "training corpus (realm corpus build output, or any text file: 90/10 split)", &data, NULL},
        {"--out", "RUN", "run directory; training resumes from its latest checkpoint", &out, NULL},
        {"--backend", "NAME", "cuda, opencl or auto (default auto)", &bkname, NULL},
        {"--device", "N", "device index (default 0)", &dev_s, NULL},
        {"--steps", "N", "total steps (default: the model's train.steps)", &steps_s, NULL},
        {"--batch", "B", "sequences per step, or auto: the largest that fits (default: auto on CUDA, else train.batch)",
         &batch_s, NULL},
        {"--seq", "S", "bytes per sequence, or auto: the largest power of two <= train.seq that fits (default: train.seq)",
         &seq_s, NULL},
        {"--memory-fraction", "F", "share of free device memory the run may fill (default 0.95)", &frac_s, NULL},
        {"--memory-budget", "BYTES", "use this instead of the free device memory (512M, 20G; env REALM_MEMORY_BUDGET)",
         &budget_s, NULL},
        {"--lr", "X", "peak learning rate (default: train.lr)", &lr_s, NULL},
        {"--warmup", "N", "warmup steps (default: train.warmup)", &warmup_s, NULL},
        {"--seed", "N", "initialisation and sampling seed (default 1)", &seed_s, NULL},
        {"--eval-every", "N", "validation every N steps (0: never); the checkpoint with the lowest validation loss is kept "
         "in RUN/best", &eval_s, NULL},
        {"--eval-tokens", "N", "bytes of validation text per evaluation (default 16384)", &evtok_s, NULL},
        {"--save-every", "N", "checkpoint every N steps (default: train.save_every)", &save_s, NULL},
        {"--log-every", "N", "progress line every N steps (default 10)", &log_s, NULL},
        {"--precision", "P", "bf16 (matmuls on tensor cores, fp32 accumulation; CUDA only) or fp32 (default: bf16 on "
         "CUDA, fp32 on OpenCL; a resumed run keeps its own)", &prec_s, NULL},
        {NULL, NULL, NULL, NULL, NULL},
    };
    const char *pos[1];
    int npos, done;
    int rc = cli_parse("train", "MODEL.lua --data CORPUS --out RUN [options]",
                       "Train a model. Checkpoints (weights in safetensors, optimizer state, sampler state) go to\n"
                       "RUN every --save-every steps and on SIGINT/SIGTERM; running the same command again resumes\n"
                       "from the latest one, and the loss sequence is the same as an uninterrupted run's.",
                       argc, argv, opts, pos, 1, 1, &npos, &done);
    if (rc || done) return rc;
    if (!data || !out) {
        fprintf(stderr, "realm train: --data and --out are required\n");
        return 2;
    }
    if (cli_pick("train", "--precision", prec_s, "bf16", "fp32")) return 2;
    /* SIGINT/SIGTERM are held from here on and checked between steps, so a signal always
     * lands on a step boundary and the checkpoint it triggers is consistent. */
    sigset_t hold;
    sigemptyset(&hold);
    sigaddset(&hold, SIGINT);
    sigaddset(&hold, SIGTERM);
    sigprocmask(SIG_BLOCK, &hold, NULL);
    char err[4096];
    char *src = NULL;
    size_t srclen = 0;
    /* Validate the model file before touching devices or the run directory. */
    train_config tc;
    if (model_probe(pos[0], &src, &srclen, &tc, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    const long probe_seq = tc.seq;   /* the model's longest sequence, for --seq auto */
    train_state st = {0};
    hex_sha(src, srclen, st.model_sha);
    st.seed = 1;
    long dev = 0, evtok = 16384, log_every = 10;
    rc = 0;
    rc |= steps_s && cli_long("train", "--steps", steps_s, 1, 1L << 40, &tc.steps);
    int batch_auto = batch_s && strcmp(batch_s, "auto") == 0, seq_auto = seq_s && strcmp(seq_s, "auto") == 0;
    rc |= batch_s && !batch_auto && cli_long("train", "--batch", batch_s, 1, 1L << 20, &tc.batch);
    rc |= seq_s && !seq_auto && cli_long("train", "--seq", seq_s, 1, 1L << 24, &tc.seq);
    double fraction = 0.95;
    rc |= frac_s && cli_double("train", "--memory-fraction", frac_s, 0.01, 1.0, &fraction);
    size_t budget = 0;
    if (!budget_s && getenv("REALM_MEMORY_BUDGET") && *getenv("REALM_MEMORY_BUDGET")) budget_s = getenv("REALM_MEMORY_BUDGET");
    if (budget_s && (at_parse_bytes(budget_s, &budget) < 0 || budget == 0)) {
        fprintf(stderr, "realm train: --memory-budget %s is not a byte count (e.g. 512M, 20G)\n", budget_s);
        rc = 2;
    }
    rc |= warmup_s && cli_long("train", "--warmup", warmup_s, 0, 1L << 40, &tc.warmup);
    rc |= eval_s && cli_long("train", "--eval-every", eval_s, 0, 1L << 40, &tc.eval_every);
    rc |= save_s && cli_long("train", "--save-every", save_s, 1, 1L << 40, &tc.save_every);
    rc |= log_s && cli_long("train", "--log-every", log_s, 1, 1L << 40, &log_every);
    rc |= dev_s && cli_long("train", "--device", dev_s, 0, 1024, &dev);
    rc |= evtok_s && cli_long("train", "--eval-tokens", evtok_s, 1, 1L << 40, &evtok);
    rc |= lr_s && cli_double("train", "--lr", lr_s, 0, 10, &tc.lr);
    long seed_l = 1;
    rc |= seed_s && cli_long("train", "--seed", seed_s, 0, 1L << 62, &seed_l);
    if (rc) {
        free(src);
        return 2;
    }
    st.seed = (uint64_t)seed_l;

    char bestdir[1300];   /* the checkpoint of the lowest validation loss */
    snprintf(bestdir, sizeof bestdir, "%.1200s/best", out);

    /* Resume? The checkpoint's own settings win, except --steps which may extend the run. */
    char ckdir[1200];
    long ckstep = 0;
    int found = train_find_checkpoint(out, ckdir, sizeof ckdir, &ckstep, err, sizeof err);
    if (found < 0) {
        fprintf(stderr, "realm train: %s\n", err);
        free(src);
        return 2;
    }
    train_state saved = {0};
    if (found) {
        if (read_state(ckdir, &saved, err, sizeof err) < 0) {
            fprintf(stderr, "realm train: %s\n", err);
            free(src);
            return 2;
        }
        if (strcmp(saved.model_sha, st.model_sha) != 0) {
            fprintf(stderr, "realm train: %s was trained from a different model file than %s (sha256 %.12s, now %.12s); "
                            "use the same file or a new --out\n", out, pos[0], saved.model_sha, st.model_sha);
            free(src);
            return 2;
        }
        st = saved;
        if (steps_s) st.steps = tc.steps;
        if (prec_s && strcmp(prec_s, st.precision) != 0)
            printf("note: --precision %s ignored: %s was started in %s and resumes in it\n", prec_s, out, st.precision);
        tc.batch = st.batch, tc.seq = st.seq, tc.steps = st.steps, tc.warmup = st.warmup, tc.lr = st.lr;
        tc.eval_every = st.eval_every, tc.save_every = st.save_every;
        snprintf(tc.schedule, sizeof tc.schedule, "%s", st.schedule);
    } else {
        st.batch = tc.batch, st.seq = tc.seq, st.steps = tc.steps, st.warmup = tc.warmup, st.lr = tc.lr;
        st.eval_every = tc.eval_every, st.save_every = tc.save_every;
        snprintf(st.schedule, sizeof st.schedule, "%s", tc.schedule);
        rng_seed(&st.rng, st.seed ^ 0x5eed5a3d1e5ull);
    }
    corpus *c = corpus_open(data, err, sizeof err);
    if (!c) {
        fprintf(stderr, "realm train: %s\n", err);
        if (c) corpus_close(c);
        free(src);
        return 2;
    }
    backend *bk = session_backend(bkname, (int)dev, err, sizeof err);
    if (!bk) {
        fprintf(stderr, "realm train: %s\n", err);
        corpus_close(c);
        free(src);
        return strcmp(bkname, "auto") == 0 ? 1 : 2;
    }
    /* bf16 by default where the device has bf16 tensor cores (CUDA, sm_80+); a resumed run
     * keeps the precision it was started with, so its losses continue the same computation. */
    if (!found)
        snprintf(st.precision, sizeof st.precision, "%s",
                 prec_s ? prec_s : bk->kind == BK_CUDA && bk_supports_dtype(bk, BK_BF16) ? "bf16" : "fp32");
    if (strcmp(st.precision, "bf16") == 0 && (bk->kind != BK_CUDA || !bk_supports_dtype(bk, BK_BF16))) {
        fprintf(stderr, "realm train: --precision bf16 needs CUDA on sm_80 or newer (%s is %s); use --precision fp32\n",
                bk_info(bk)->name, bk_name(bk));
        bk_destroy(bk);
        corpus_close(c);
        free(src);
        return 2;
    }
    const plan_options popt = {.bf16 = strcmp(st.precision, "bf16") == 0,
                               .shared_max = (long)bk_info(bk)->max_shared_per_block,
                               .wgmma = bk->kind == BK_CUDA && cuda_arch_has_wgmma(bk_info(bk)->arch)};
    session tr, ev;
    memset(&tr, 0, sizeof tr);
    memset(&ev, 0, sizeof ev);
    int have_ev = 0, status = 1;
    FILE *log = NULL;
    loader *ld = NULL;
    size_t free0 = 0, total0 = 0;
    /* Everything the run will hold on the device is decided here, from the plans, before any
     * allocation: the run either fits from step 1 or stops now (exit 2). */
    if (bk_mem_info(bk, &free0, &total0) < 0) free0 = total0 = bk_info(bk)->mem_total;
    if (found) batch_auto = seq_auto = 0;          /* a resumed run keeps its sizes */
    else if (!batch_s && bk->kind == BK_CUDA) batch_auto = 1;
    if (!found) st.recompute = 0;
    if (session_prepare_opts(&tr, src, srclen, pos[0], bk_name(bk), 1, st.recompute, &popt, err, sizeof err) < 0) {
        fprintf(stderr, "realm train: %s\n", err);
        status = 2;
        goto cleanup;
    }
    if (tc.eval_every > 0) {
        if (session_prepare_opts(&ev, src, srclen, pos[0], bk_name(bk), 0, 0, &popt, err, sizeof err) < 0) goto fail;
        have_ev = 1;
    }
    at_model am = {.train = &tr.p, .eval = have_ev ? &ev.p : NULL, .available = budget ? budget : free0,
                   .fraction = fraction, .max_alloc = bk_info(bk)->max_alloc};
    {
        const plan *plans[2] = {&tr.p, &ev.p};
        am.overhead = at_probe_overhead(bk, plans, have_ev ? 2 : 1);
    }
    printf("memory: %.1f MiB available (%s), target %.0f%% = %.1f MiB, backend overhead %.1f MiB\n",
           (double)am.available / 1048576.0, budget ? "--memory-budget" : "free device memory", 100 * fraction,
           (double)at_target(&am) / 1048576.0, (double)am.overhead / 1048576.0);
    if (seq_auto || batch_auto) {
        /* The alternative plan: every layer recomputed in the backward. */
        session alt;
        int have_alt = session_prepare_opts(&alt, src, srclen, pos[0], bk_name(bk), 1, 1, &popt, err, sizeof err) == 0;
        at_model am_rc = am;
        if (have_alt) am_rc.train = &alt.p;
        if (seq_auto) {
            long s0 = at_auto_seq(&am, tc.seq), s1 = have_alt ? at_auto_seq(&am_rc, tc.seq) : 0;
            tc.seq = s0 ? s0 : s1;
            if (!tc.seq) tc.seq = 1;       /* nothing fits: the check below explains */
            printf("auto-tuner: seq %ld (largest power of two <= the model's %ld that fits a batch of 1)\n", tc.seq,
                   probe_seq);
        }
        if (batch_auto) {
            long b0 = at_max_batch(&am, tc.seq, 1L << 20), b1 = have_alt ? at_max_batch(&am_rc, tc.seq, 1L << 20) : 0;
            /* Recomputing every layer costs about one more forward of the layers (~+33% of the
             * step's FLOPs), so it is taken only when it buys at least 1.5x the batch (or the
             * only batch that fits); a measured tokens/s comparison is not made. */
            int use_rc = b1 > 0 && (b0 == 0 || (double)b1 >= 1.5 * (double)b0);
            printf("auto-tuner: seq %ld: largest batch %ld without recompute, %ld with every layer recomputed; "
                   "using %s (%s)\n", tc.seq, b0, b1, use_rc ? "recompute" : "no recompute",
                   use_rc ? (b0 ? "the batch grows by 1.5x or more, which pays for the extra forward"
                                : "nothing fits without it")
                          : "recompute would not buy 1.5x the batch");
            tc.batch = use_rc ? b1 : b0;
            if (!tc.batch) tc.batch = 1;
            if (use_rc) {
                session_close(&tr);
                session_move(&tr, &alt);
                have_alt = 0;
                am.train = &tr.p;
                st.recompute = 1;
            }
        }
        if (have_alt) session_close(&alt);
    }
    if (!at_fits(&am, tc.batch, tc.seq)) {
        at_need n;
        at_need_of(&am, tc.batch, tc.seq, &n);
        long bmax = at_max_batch(&am, tc.seq, tc.batch);
        char why[512];
        snprintf(why, sizeof why, "it needs %.1f MiB (training arena %.1f, validation arena %.1f, data %.1f, overhead %.1f) "
                 "but the target is %.1f MiB (%.0f%% of %.1f MiB)%s", (double)n.total / 1048576.0,
                 (double)n.train / 1048576.0, (double)n.eval / 1048576.0, (double)n.data / 1048576.0,
                 (double)n.overhead / 1048576.0, (double)at_target(&am) / 1048576.0, 100 * fraction,
                 (double)am.available / 1048576.0,
                 am.max_alloc && (n.train > am.max_alloc || n.eval > am.max_alloc)
                     ? " or an arena exceeds the device's largest single allocation" : "");
        if (bmax > 0)
            fprintf(stderr, "realm train: batch %ld x seq %ld does not fit: %s; the largest batch that fits at seq %ld "
                            "is %ld\n", tc.batch, tc.seq, why, tc.seq, bmax);
        else {
            long smax = at_max_seq(&am, 1, tc.seq);
            if (smax > 0)
                fprintf(stderr, "realm train: batch %ld x seq %ld does not fit: %s; no batch fits at seq %ld, the "
                                "largest seq that fits with batch 1 is %ld\n", tc.batch, tc.seq, why, tc.seq, smax);
            else
                fprintf(stderr, "realm train: batch %ld x seq %ld does not fit: %s; not even batch 1 x seq 1 fits\n",
                        tc.batch, tc.seq, why);
        }
        status = 2;
        goto cleanup;
    }
    if (corpus_check(c, tc.seq + 1, err, sizeof err) < 0) {
        fprintf(stderr, "realm train: %s\n", err);
        status = 2;
        goto cleanup;
    }
    st.batch = tc.batch, st.seq = tc.seq;
    printf("realm train: %s on %s (%s), batch %ld x seq %ld, %ld steps, %s matmuls%s\n", pos[0], bk_info(bk)->name,
           bk_name(bk), tc.batch, tc.seq, tc.steps, st.precision, st.recompute ? ", every layer recomputed" : "");
    at_print_breakdown(stdout, "memory: ", &am, tc.batch, tc.seq);
    fflush(stdout);
    if (session_alloc(&tr, bk, tc.batch, tc.seq, err, sizeof err) < 0) goto fail;
    if (have_ev && session_alloc(&ev, bk, tc.batch, tc.seq, err, sizeof err) < 0) goto fail;
    if (found) {
        char path[1300];
        snprintf(path, sizeof path, "%.1100s/optim.safetensors", ckdir);
        if (train_load_weights(&tr, ckdir, err, sizeof err) < 0 || scatter_role(&tr, ROLE_OPT, path, err, sizeof err) < 0)
            goto fail;
        printf("resuming from %s (step %ld)\n", ckdir, st.step);
    } else if (session_init_params(&tr, st.seed, err, sizeof err) < 0) {
        goto fail;
    }
    if (fs_mkdir_p(out, err, sizeof err) < 0) goto fail;
    if (!(log = open_loss_log(out, st.step, err, sizeof err))) goto fail;
    printf("arena %.1f MiB, %d launches (%d kernels), %ld parameters\n", (double)tr.x.arena_bytes / 1048576.0,
           tr.p.kg.nl, tr.p.kg.nbodies, ir_param_count(&tr.m.g));
    fflush(stdout);

    /* the last allocation: from here on the run holds all the device memory it will use */
    if (!(ld = loader_create(bk, c, CORPUS_TRAIN, &st.rng, tc.batch, tc.seq, tc.steps - st.step, err, sizeof err)))
        goto fail;
    at_need need;
    at_need_of(&am, tc.batch, tc.seq, &need);

    sigset_t pending;
    double t0 = now(), tlast = t0, loss_sum = 0;
    long steps_run = 0, last_saved = st.step;
    int nlog = 0, stop_signal = 0;
    const train_config *cfg = &tc;
    while (st.step < tc.steps) {
        long step = st.step + 1;
        float hyper[8] = {(float)train_lr(cfg, step), (float)cfg->beta1, (float)cfg->beta2, (float)cfg->adam_eps,
                          (float)cfg->weight_decay, (float)(1 - pow(cfg->beta1, (double)step)),
                          (float)(1 - pow(cfg->beta2, (double)step)), (float)cfg->grad_clip};
        double loss;
        rng_state rng_after;
        if (exec_upload(&tr.x, tr.opt.hyper, hyper, err, sizeof err) < 0 ||
            loader_next(ld, &tr.x, tr.m.tokens, tr.m.targets, &rng_after, err, sizeof err) < 0 ||
            session_run(&tr, err, sizeof err) < 0 || session_loss(&tr, &loss, err, sizeof err) < 0)
            goto fail;
        /* the checkpointed sampler state is the one after the batches consumed, not the
         * loader thread's (which runs ahead) */
        st.rng = rng_after;
        if (steps_run == 0) {
            size_t f = 0, tot = 0;
            if (bk_mem_info(bk, &f, &tot) == 0) {
                size_t used = free0 > f ? free0 - f : 0;
                printf("memory: estimated %.1f MiB, measured %.1f MiB, utilisation %.1f%% of %.1f MiB %s\n",
                       (double)need.total / 1048576.0, (double)used / 1048576.0,
                       am.available ? 100.0 * (double)used / (double)am.available : 0.0,
                       (double)am.available / 1048576.0, budget ? "budget" : "free at start-up");
                fflush(stdout);
            }
        }
        if (!isfinite(loss)) {
            fprintf(stderr, "realm train: the loss is %g at step %ld; stopping (last checkpoint: step %ld)\n", loss,
                    step, last_saved);
            goto fail_quiet;
        }
        st.step = step;
        steps_run++;
        fprintf(log, "%ld\t%.9g\n", step, loss);
        fflush(log);
        loss_sum += loss;
        nlog++;
        if (step % log_every == 0 || step == tc.steps) {
            double t = now(), dt = t - t0;
            double tps = (double)steps_run * (double)(tc.batch * tc.seq) / dt;
            char eta[32];
            fmt_eta((double)(tc.steps - step) * dt / (double)steps_run, eta, sizeof eta);
            printf("step %6ld  loss %.4f  bits/byte %.3f  lr %.2e  %.0f tok/s  %.0f ms/step  MFU n/a  ETA %s\n", step,
                   loss_sum / nlog, loss_sum / nlog / M_LN2, hyper[0], tps, 1000 * (t - tlast) / nlog, eta);
            fflush(stdout);
            tlast = t;
            loss_sum = 0;
            nlog = 0;
        }
        if (have_ev && (step % tc.eval_every == 0 || step == tc.steps)) {
            double bpb;
            if (session_copy_params(&ev, &tr, err, sizeof err) < 0 || evaluate(&ev, c, evtok, &bpb, err, sizeof err) < 0)
                goto fail;
            /* the lowest so far: a whole checkpoint (resumable too) into RUN/best, written the
             * same atomic way; a tie keeps the earlier one */
            int best = st.best_step == 0 || bpb < st.best_bpb;
            if (best) {
                st.best_step = step, st.best_bpb = bpb;
                if (save_checkpoint(&tr, bestdir, &st, src, srclen, err, sizeof err) < 0) goto fail;
            }
            printf("step %6ld  validation bits/byte %.4f (loss %.4f nats)%s%s\n", step, bpb, bpb * M_LN2,
                   best ? "  lowest so far: saved to " : "", best ? bestdir : "");
            fflush(stdout);
        }
        sigpending(&pending);
        stop_signal = sigismember(&pending, SIGINT) ? SIGINT : sigismember(&pending, SIGTERM) ? SIGTERM : 0;
        if (step % tc.save_every == 0 || step == tc.steps || stop_signal) {
            if (save_checkpoint(&tr, out, &st, src, srclen, err, sizeof err) < 0) goto fail;
            last_saved = step;
        }
        if (stop_signal) {
            printf("%s at step %ld: checkpoint saved; run the same command to resume\n",
                   stop_signal == SIGINT ? "interrupted" : "terminated", step);
            break;
        }
    }
    if (!stop_signal) printf("done: %ld steps, checkpoint in %s\n", st.step, out);
    if (!stop_signal && st.best_step > 0)
        printf("lowest validation: %.4f bits/byte at step %ld, checkpoint in %s\n", st.best_bpb, st.best_step, bestdir);
    status = stop_signal ? 128 + stop_signal : 0;
    goto cleanup;
fail:
    fprintf(stderr, "realm train: %s\n", err);
fail_quiet:
    status = 1;
cleanup:
    if (log) fclose(log);
    loader_destroy(ld);
    if (have_ev) session_close(&ev);
    session_close(&tr);
    bk_destroy(bk);
    corpus_close(c);
    free(src);
    return status;
}
