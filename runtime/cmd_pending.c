/* Commands whose machinery lands with later issues (kernel generator, backends, trainer,
 * decoder). They parse --help like every command and otherwise say plainly that this build
 * cannot do the job yet, with status 1 (not 2: the input was not at fault). */
#include "cli.h"

#include <stdio.h>

static int pending(const char *cmd, const char *usage, const char *summary, int argc, char **argv) {
    const char *pos[8];
    int npos, done;
    int rc = cli_parse(cmd, usage, summary, argc, argv, NULL, pos, 0, 0, &npos, &done);
    if (done) return 0;
    (void)rc;
    fprintf(stderr, "realm %s: not available in this build yet (needs the kernel generator and a backend)\n", cmd);
    return 1;
}

int cmd_kernels(int argc, char **argv) {
    return pending("kernels", "MODEL.lua --backend cuda|opencl [--arch sm_XY] --out DIR",
                   "Generate the training and sampling kernels of a model and compile them.", argc, argv);
}
int cmd_eval(int argc, char **argv) {
    return pending("eval", "RUN --data FILE", "Bits per byte of a trained run on held-out text.", argc, argv);
}
int cmd_generate(int argc, char **argv) {
    return pending("generate", "RUN --prompt TEXT [-n N --temperature T --top-k K --top-p P --seed S]",
                   "Sample text from a trained run.", argc, argv);
}
int cmd_chat(int argc, char **argv) {
    return pending("chat", "RUN", "Interactive conversation with a trained run.", argc, argv);
}
