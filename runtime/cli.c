#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name;
    int (*fn)(int, char **);
    const char *summary;
} command;

static const command commands[] = {
    {"info", cmd_info, "backends, devices, memory, compute capability"},
    {"graph", cmd_graph, "layers, parameters, FLOPs/token and memory/token of a model file"},
    {"kernels", cmd_kernels, "generate (and compile) the kernels of a model for a backend"},
    {"corpus", cmd_corpus, "build or inspect a training corpus"},
    {"train", cmd_train, "train a model (resumes if the run directory has a checkpoint)"},
    {"eval", cmd_eval, "bits per byte of a trained run on a text"},
    {"generate", cmd_generate, "sample text from a trained run"},
    {"chat", cmd_chat, "interactive conversation with a trained run"},
    {"bench", cmd_bench, "time training steps of a model: tokens/s, MFU, memory, time per kernel class"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: realm COMMAND [options]   (realm COMMAND --help for details)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-9s %s\n", commands[i].name, commands[i].summary);
}

int realm_main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0) return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "realm: unknown command '%s' (see realm --help)\n", argv[1]);
    return 2;
}

static void print_help(const char *cmd, const char *usage_line, const char *summary, const cli_opt *opts) {
    printf("usage: realm %s %s\n\n%s\n", cmd, usage_line, summary);
    if (opts && opts[0].name) printf("\noptions:\n");
    for (int i = 0; opts && opts[i].name; i++) {
        char left[64];
        snprintf(left, sizeof left, "%s%s%s", opts[i].name, opts[i].arg ? " " : "", opts[i].arg ? opts[i].arg : "");
        printf("  %-24s %s\n", left, opts[i].help);
    }
    printf("  %-24s %s\n", "--help", "show this help");
}

int cli_parse(const char *cmd, const char *usage_line, const char *summary, int argc, char **argv,
              const cli_opt *opts, const char **pos, int minpos, int maxpos, int *npos, int *done) {
    *done = 0;
    *npos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            print_help(cmd, usage_line, summary, opts);
            *done = 1;
            return 0;
        }
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] == '-' && a[1] != 0) {
            const char *eq = strchr(a, '=');
            size_t nlen = eq ? (size_t)(eq - a) : strlen(a);
            const cli_opt *o = NULL;
            for (int k = 0; opts && opts[k].name; k++)
                if (strlen(opts[k].name) == nlen && strncmp(opts[k].name, a, nlen) == 0) o = &opts[k];
            if (!o) {
                fprintf(stderr, "realm %s: unknown option '%.*s' (see realm %s --help)\n", cmd, (int)nlen, a, cmd);
                return 2;
            }
            if (o->set) *o->set = 1;
            if (o->arg) {
                const char *v = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
                if (!v) {
                    fprintf(stderr, "realm %s: option %s needs a value (%s)\n", cmd, o->name, o->arg);
                    return 2;
                }
                *o->value = v;
            } else if (eq) {
                fprintf(stderr, "realm %s: option %s takes no value\n", cmd, o->name);
                return 2;
            }
        } else {
            if (*npos >= maxpos) {
                fprintf(stderr, "realm %s: unexpected argument '%s' (usage: realm %s %s)\n", cmd, a, cmd, usage_line);
                return 2;
            }
            pos[(*npos)++] = a;
        }
    }
    if (*npos < minpos) {
        fprintf(stderr, "realm %s: missing arguments (usage: realm %s %s)\n", cmd, cmd, usage_line);
        return 2;
    }
    return 0;
}

int cli_long(const char *cmd, const char *flag, const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "realm %s: %s must be an integer in [%ld, %ld], got '%s'\n", cmd, flag, lo, hi, s);
        return 2;
    }
    *out = v;
    return 0;
}

int cli_pick(const char *cmd, const char *flag, const char *s, const char *a, const char *b) {
    if (!s || strcmp(s, a) == 0 || strcmp(s, b) == 0) return 0;
    fprintf(stderr, "realm %s: %s must be %s or %s, got '%s'\n", cmd, flag, a, b, s);
    return 2;
}

int cli_double(const char *cmd, const char *flag, const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "realm %s: %s must be a number in [%g, %g], got '%s'\n", cmd, flag, lo, hi, s);
        return 2;
    }
    *out = v;
    return 0;
}
