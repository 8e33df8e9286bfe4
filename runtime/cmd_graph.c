/* realm graph: what a model file builds, in numbers. */
#include "autotune.h"
#include "cli.h"
#include "frontend.h"
#include "fsutil.h"
#include "op.h"
#include "session.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char name[128];
    char kind[32];
    long params;
    double flops;            /* forward + backward, whole batch */
    double saved;            /* bytes of forward activations kept for backward, whole batch */
} layer_row;

/* "layers.3.mixer.in_proj" -> "layers.3"; "embed" -> "embed" */
static void group_of(const char *path, char *out, size_t len) {
    const char *dot = strchr(path, '.');
    if (strncmp(path, "layers.", 7) == 0 && dot) dot = strchr(dot + 1, '.');
    size_t n = dot ? (size_t)(dot - path) : strlen(path);
    if (n >= len) n = len - 1;
    memcpy(out, path, n);
    out[n] = 0;
    if (!out[0]) snprintf(out, len, "(model)");
}

static layer_row *row_for(layer_row *rows, int *nrows, const ir_graph *g, int scope) {
    char name[128];
    group_of(g->sc[scope].path, name, sizeof name);
    for (int i = 0; i < *nrows; i++)
        if (strcmp(rows[i].name, name) == 0) return &rows[i];
    layer_row *r = &rows[(*nrows)++];
    memset(r, 0, sizeof *r);
    snprintf(r->name, sizeof r->name, "%s", name);
    /* the kind of a layer is the kind of its outermost scope */
    for (int s = 1; s < g->nsc; s++)
        if (strcmp(g->sc[s].path, name) == 0) {
            snprintf(r->kind, sizeof r->kind, "%s", g->sc[s].kind);
            break;
        }
    if (!r->kind[0]) snprintf(r->kind, sizeof r->kind, "%s", g->sc[scope].kind);
    return r;
}

static void human(double v, char *buf, size_t len) {
    if (v >= 1e9) snprintf(buf, len, "%.2fG", v / 1e9);
    else if (v >= 1e6) snprintf(buf, len, "%.2fM", v / 1e6);
    else if (v >= 1e3) snprintf(buf, len, "%.1fK", v / 1e3);
    else snprintf(buf, len, "%.0f", v);
}

/* realm graph --memory: the memory model without a device (no backend overhead). */
static int graph_memory(const char *path, const char *batch_s, const char *seq_s, const char *dialect, int recompute,
                        int bf16) {
    char err[4096], *src = NULL;
    size_t len = 0;
    if (fs_read_file(path, 64u << 20, &src, &len, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    session tr, ev;
    const plan_options po = {.bf16 = bf16};
    if (session_prepare_opts(&tr, src, len, path, dialect, 1, recompute, &po, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        free(src);
        return 2;
    }
    long B = tr.m.train.batch, S = tr.m.train.seq;
    int have_ev = tr.m.train.eval_every > 0;
    if ((batch_s && cli_long("graph", "--batch", batch_s, 1, 1L << 20, &B)) ||
        (seq_s && cli_long("graph", "--seq", seq_s, 1, 1L << 24, &S)) ||
        (have_ev && session_prepare_opts(&ev, src, len, path, dialect, 0, 0, &po, err, sizeof err) < 0)) {
        if (have_ev && err[0]) fprintf(stderr, "%s\n", err);
        session_close(&tr);
        free(src);
        return 2;
    }
    at_model am = {.train = &tr.p, .eval = have_ev ? &ev.p : NULL, .fraction = 1};
    printf("model %s (%s): %ld parameters, %s plan, %s matmuls%s\n", tr.m.name, path, ir_param_count(&tr.m.g), dialect,
           tr.p.kg.bf16 ? "bf16" : "fp32", recompute ? ", every layer recomputed" : "");
    at_print_breakdown(stdout, "", &am, B, S);
    if (have_ev) session_close(&ev);
    session_close(&tr);
    free(src);
    return 0;
}

int cmd_graph(int argc, char **argv) {
    const char *batch_s = NULL, *seq_s = NULL, *dialect = "cuda", *prec_s = NULL;
    int memory = 0, recompute = 0;
    const cli_opt opts[] = {
        {"--batch", "B", "batch size for the per-token numbers (default: the model's train.batch)", &batch_s, NULL},
        {"--seq", "S", "sequence length (default: the model's train.seq)", &seq_s, NULL},
        {"--memory", NULL, "print the training step's device memory by category (docs/memory.md)", NULL, &memory},
        {"--recompute", NULL, "with --memory: recompute every layer in the backward", NULL, &recompute},
        {"--backend", "NAME", "with --memory: kernel dialect the plan is built for (cuda or opencl; default cuda)",
         &dialect, NULL},
        {"--precision", "P", "with --memory: bf16 or fp32 matmuls (default bf16 for cuda, as realm train on sm_80+)",
         &prec_s, NULL},
        {NULL, NULL, NULL, NULL, NULL},
    };
    const char *pos[1];
    int npos, done;
    int rc = cli_parse("graph", "MODEL.lua [--batch B --seq S] [--memory [--recompute]]",
                       "Print the layer table of a model: parameters, training FLOPs per token (forward +\n"
                       "backward) and bytes of activations saved for the backward pass per token. With\n"
                       "--memory, print the exact device bytes of a training step at --batch x --seq by\n"
                       "category instead.",
                       argc, argv, opts, pos, 1, 1, &npos, &done);
    if (rc || done) return rc;
    if (cli_pick("graph", "--precision", prec_s, "bf16", "fp32")) return 2;
    /* bf16 storage (gen/precision.c) changes the arena: the same plan realm train builds */
    if (memory)
        return graph_memory(pos[0], batch_s, seq_s, dialect, recompute,
                            prec_s ? strcmp(prec_s, "bf16") == 0 : strcmp(dialect, "cuda") == 0);
    realm_model m;
    char err[1024];
    if (model_load(pos[0], &m, err, sizeof err) < 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    long B = m.train.batch, S = m.train.seq;
    if ((batch_s && cli_long("graph", "--batch", batch_s, 1, 1L << 20, &B)) ||
        (seq_s && cli_long("graph", "--seq", seq_s, 1, 1L << 24, &S))) {
        model_free(&m);
        return 2;
    }
    ir_graph *g = &m.g;
    if (ir_autodiff(g) < 0) {
        fprintf(stderr, "%s: %s\n", m.path, g->err);
        model_free(&m);
        return 2;
    }
    layer_row *rows = calloc((size_t)g->nsc + 1, sizeof *rows);
    int nrows = 0;
    for (int i = 0; i < g->nt; i++)
        if (g->t[i].role == ROLE_PARAM && g->t[i].base == i)
            row_for(rows, &nrows, g, g->t[i].scope)->params += ir_numel(&g->t[i].shape, 1, 1);
    double fwd = 0, total = 0;
    for (int i = 0; i < g->nn; i++) {
        double f = ir_flops(g, i, B, S);
        row_for(rows, &nrows, g, g->n[i].scope)->flops += f;
        total += f;
        if (!g->n[i].backward) fwd += f;
    }
    /* Saved activations: forward storage that some backward node reads, counted once per owner. */
    char *saved = calloc((size_t)g->nt, 1);
    for (int i = g->backward_start; i < g->nn; i++)
        for (int k = 0; k < g->n[i].nin; k++) {
            int b = g->t[g->n[i].in[k]].base;
            if (g->t[b].role == ROLE_ACT) saved[b] = 1;
        }
    double saved_total = 0;
    for (int b = 0; b < g->nt; b++) {
        if (!saved[b]) continue;
        double bytes = (double)ir_numel(&g->t[b].shape, B, S) * ir_dtype_bytes(g->t[b].dtype);
        int prod = g->t[b].producer;
        row_for(rows, &nrows, g, prod >= 0 ? g->n[prod].scope : g->t[b].scope)->saved += bytes;
        saved_total += bytes;
    }
    double tok = (double)B * (double)S;
    printf("model %s (%s): d_model %d, %d layers, vocab %d; per-token numbers at batch %ld, seq %ld\n\n",
           m.name, m.path, m.d_model, m.n_layers, m.vocab, B, S);
    printf("%-14s %-10s %12s %16s %16s\n", "layer", "kind", "params", "FLOPs/token", "saved B/token");
    for (int i = 0; i < nrows; i++) {
        char p[32], f[32], s[32];
        human((double)rows[i].params, p, sizeof p);
        human(rows[i].flops / tok, f, sizeof f);
        human(rows[i].saved / tok, s, sizeof s);
        printf("%-14s %-10s %12s %16s %16s\n", rows[i].name, rows[i].kind, p, f, s);
    }
    long np = ir_param_count(g);
    char p[32], f1[32], f2[32], s[32], six[32];
    human((double)np, p, sizeof p);
    human(fwd / tok, f1, sizeof f1);
    human(total / tok, f2, sizeof f2);
    human(saved_total / tok, s, sizeof s);
    human(6.0 * (double)np, six, sizeof six);
    printf("\nparameters            %ld (%s)\n", np, p);
    printf("FLOPs/token forward   %s\n", f1);
    printf("FLOPs/token fwd+bwd   %s  (6 x params = %s)\n", f2, six);
    printf("saved activations     %s bytes/token (fp32)\n", s);
    printf("graph                 %d tensors, %d nodes (%d forward, %d backward)\n", g->nt, g->nn,
           g->backward_start, g->nn - g->backward_start);
    free(saved);
    free(rows);
    model_free(&m);
    return 0;
}
