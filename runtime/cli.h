/* Command-line plumbing shared by the realm commands. Every command is
 * `int cmd_NAME(int argc, char **argv)` with argv[0] the command name; it returns the exit
 * status: 0 success, 1 runtime failure, 2 bad input (one line on stderr naming the culprit). */
#ifndef REALM_CLI_H
#define REALM_CLI_H

typedef struct {
    const char *name;        /* "--batch" */
    const char *arg;         /* value placeholder for help ("N"), or NULL for a switch */
    const char *help;
    const char **value;      /* where the value goes (options with an argument) */
    int *set;                /* set to 1 when present (switches and options) */
} cli_opt;

/* Parses options and positionals. Prints the command's help and returns 0 with *done = 1 on
 * --help; returns 2 after printing a one-line error on bad usage. */
int cli_parse(const char *cmd, const char *usage, const char *summary, int argc, char **argv,
              const cli_opt *opts, const char **pos, int minpos, int maxpos, int *npos, int *done);
/* Parse an integer option value in [lo, hi]; on error prints "realm CMD: FLAG ..." and returns 2. */
int cli_long(const char *cmd, const char *flag, const char *s, long lo, long hi, long *out);
int cli_double(const char *cmd, const char *flag, const char *s, double lo, double hi, double *out);
/* A two-way option value: s (NULL: not given) must be a or b; otherwise prints "realm CMD:
 * FLAG must be A or B, got 'S'" and returns 2. */
int cli_pick(const char *cmd, const char *flag, const char *s, const char *a, const char *b);

int cmd_info(int argc, char **argv);
int cmd_graph(int argc, char **argv);
int cmd_kernels(int argc, char **argv);
int cmd_corpus(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_chat(int argc, char **argv);
int cmd_bench(int argc, char **argv);

int realm_main(int argc, char **argv);

#endif
