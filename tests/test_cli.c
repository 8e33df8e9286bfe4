/* The command line as a user meets it: help, bad usage, bad model files. */
#include "test.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const COMMANDS[] = {"info", "graph", "kernels", "corpus", "train", "eval", "generate", "chat", "bench", NULL};

TEST(cli_help_for_every_command) {
    char cmd[512], out[8192], top[8192];
    snprintf(cmd, sizeof cmd, "%s --help", t_realm_bin());
    CHECK(t_run(cmd, top, sizeof top) == 0, "realm --help failed: %s", top);
    for (int i = 0; COMMANDS[i]; i++) {
        CHECK(strstr(top, COMMANDS[i]), "realm --help does not list %s", COMMANDS[i]);
        snprintf(cmd, sizeof cmd, "%s %s --help", t_realm_bin(), COMMANDS[i]);
        int rc = t_run(cmd, out, sizeof out);
        CHECK(rc == 0, "realm %s --help: status %d: %s", COMMANDS[i], rc, out);
        CHECK(strstr(out, "usage: realm"), "realm %s --help prints no usage: %s", COMMANDS[i], out);
    }
}

TEST(cli_bad_usage_is_one_line_status_2) {
    const char *cases[] = {"frobnicate", "graph --frobnicate models/tiny.lua", "graph",
                           "graph models/tiny.lua --batch zero", "graph models/tiny.lua --seq -5",
                           "graph models/does-not-exist.lua", "graph models/tiny.lua extra-arg", NULL};
    for (int i = 0; cases[i]; i++) {
        char cmd[512], out[4096];
        snprintf(cmd, sizeof cmd, "%s %s", t_realm_bin(), cases[i]);
        int rc = t_run(cmd, out, sizeof out);
        CHECK(rc == 2, "'realm %s' exited %d: %s", cases[i], rc, out);
        char *nl = strchr(out, '\n');
        CHECK(nl && nl[1] == 0, "'realm %s' did not print exactly one line: %s", cases[i], out);
    }
}

TEST(cli_graph_realm9m) {
    char cmd[512], out[16384];
    snprintf(cmd, sizeof cmd, "%s graph models/realm-9m.lua --batch 4 --seq 2048", t_realm_bin());
    CHECK(t_run(cmd, out, sizeof out) == 0, "realm graph failed: %s", out);
    const char *p = strstr(out, "parameters ");
    CHECK(p, "no parameter line: %s", out);
    long n = strtol(p + strlen("parameters "), NULL, 10);
    CHECK(n >= 9300000 && n <= 9900000, "realm-9m reports %ld parameters", n);
    CHECK(strstr(out, "FLOPs/token fwd+bwd"), "no FLOPs line");
    CHECK(strstr(out, "saved activations"), "no activation memory line");
    CHECK(strstr(out, "layers.7") && strstr(out, "attention") && strstr(out, "mamba3"), "layer table incomplete:\n%s", out);
}

/* Every file in tests/bad_models starts with "-- expect: LINE: text"; `realm graph` must print
 * exactly one line "tests/bad_models/F.lua:LINE: ...text..." and exit with status 2. */
TEST(cli_malformed_model_files) {
    DIR *d = opendir("tests/bad_models");
    CHECK(d, "tests/bad_models missing");
    int count = 0;
    struct dirent *e;
    char failure[8192] = "";
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 4, ".lua") != 0) continue;
        char path[512], first[512] = "";
        snprintf(path, sizeof path, "tests/bad_models/%s", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f || !fgets(first, sizeof first, f)) {
            if (f) fclose(f);
            snprintf(failure, sizeof failure, "%s: unreadable", path);
            break;
        }
        fclose(f);
        int line = 0;
        char text[400] = "";
        if (sscanf(first, "-- expect: %d: %399[^\n]", &line, text) != 2) {
            snprintf(failure, sizeof failure, "%s: no expect header", path);
            break;
        }
        char cmd[1024], out[4096], want[600];
        snprintf(cmd, sizeof cmd, "%s graph %s", t_realm_bin(), path);
        int rc = t_run(cmd, out, sizeof out);
        snprintf(want, sizeof want, "%s:%d: ", path, line);
        char *nl = strchr(out, '\n');
        if (rc != 2 || strncmp(out, want, strlen(want)) != 0 || !strstr(out, text) || !nl || nl[1]) {
            snprintf(failure, sizeof failure, "%s: status %d, wanted '%s...%s', got: %.2000s", path, rc, want, text, out);
            break;
        }
        count++;
    }
    closedir(d);
    CHECK(!failure[0], "%s", failure);
    CHECK(count >= 12, "only %d malformed model files", count);
}

/* `realm info` works on any machine: it lists both backends and says why one is unusable. */
TEST(cli_info_lists_backends) {
    char cmd[512], out[8192];
    snprintf(cmd, sizeof cmd, "%s info", t_realm_bin());
    CHECK(t_run(cmd, out, sizeof out) == 0, "realm info failed: %s", out);
    CHECK(strstr(out, "cuda") && strstr(out, "opencl"), "realm info does not mention both backends:\n%s", out);
}

/* realm bench --side-stream, --bf16-storage, --wgmma, --launches: off runs through (on PoCL,
 * where a plan has no side launches, no bf16 and no wgmma, the lines say off and 0 either way)
 * and prints the launch table; a value other than on/off is refused with status 2 naming it.
 * The side stream and bf16 storage themselves are checked in tests/test_streams.c, the wgmma
 * kernels in tests/test_bf16.c. */
TEST(bench_side_stream_flag) {
    char cmd[1024], out[65536];
    snprintf(cmd, sizeof cmd,
             "%s bench models/tiny.lua --backend opencl --batch 1 --seq 32 --steps 1 --warmup 0 --profile-steps 1 "
             "--side-stream off --bf16-storage off --wgmma off --launches",
             t_realm_bin());
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "status %d: %s", rc, out);
    CHECK(strstr(out, "side stream") && strstr(out, "RESULT "), "no side stream line or RESULT: %s", out);
    CHECK(strstr(out, "bf16 storage") && strstr(out, "launches (ms/step"), "no bf16 storage line or launch table: %s", out);
    CHECK(strstr(out, "0 matmul launches on wgmma"), "no wgmma line (0 launches on PoCL): %s", out);
    CHECK(strstr(out, "k0_") || strstr(out, "k1_"), "no kernel in the launch table: %s", out);
    snprintf(cmd, sizeof cmd, "%s bench models/tiny.lua --backend opencl --bf16-storage maybe", t_realm_bin());
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 2 && strstr(out, "--bf16-storage") && strstr(out, "maybe"), "status %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s bench models/tiny.lua --backend opencl --wgmma always", t_realm_bin());
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 2 && strstr(out, "--wgmma") && strstr(out, "always"), "status %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s bench models/tiny.lua --backend opencl --side-stream sometimes", t_realm_bin());
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 2 && strstr(out, "--side-stream") && strstr(out, "sometimes"), "status %d: %s", rc, out);
}

/* bench/run.sh (what `make bench` runs) on PoCL without PyTorch: the throughput, MFU/memory and
 * kernel-class tables and the decode lines, each with realm's numbers in it. */
TEST(bench_run_script) {
    char cmd[1024], out[16384];
    snprintf(cmd, sizeof cmd,
             "REALM_BIN=%s BENCH_BACKEND=opencl BENCH_MODEL=models/tiny.lua BENCH_MODES= BENCH_STEPS=1 BENCH_WARMUP=0 "
             "BENCH_SHAPES=2x32 BENCH_POSITIONS=100 BENCH_OUT=/tmp/realm-bench-%d bash bench/run.sh 2>/dev/null; rc=$?; "
             "cat /tmp/realm-bench-%d/table.md >/dev/null || rc=9; rm -rf /tmp/realm-bench-%d; exit $rc",
             t_realm_bin(), (int)getpid(), (int)getpid(), (int)getpid());
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "status %d: %s", rc, out);
    CHECK(strstr(out, "tiny training step"), "no throughput table: %s", out);
    /* the rows: tokens/s with ms/step; FLOPs/token and realm's peak memory; ms per class */
    const char *row = strstr(out, "| 2      | 32     | ");
    CHECK(row && row[20] >= '1' && row[20] <= '9', "no realm tokens/s in the row: %s", out);
    const char *mfu = strstr(out, "realm MFU");
    CHECK(mfu && strstr(mfu, "| 2      | 32     | ") && strstr(mfu, "M      | "), "no MFU/memory row: %s", out);
    CHECK(strstr(out, "| matmul ") && strstr(out, "| optimizer "), "no kernel-class table: %s", out);
    CHECK(strstr(out, "realm batch 1: position 100:") && strstr(out, "realm batch 64: position 100:"), "no decode lines: %s", out);
}

/* bench/compare.sh (two builds side by side; on the GPU machine with CUDA) runs through on
 * PoCL with one build twice: a row per RESULT field with its ratio, both builds' kernels. */
TEST(bench_compare_script) {
    char cmd[1024], out[16384];
    snprintf(cmd, sizeof cmd,
             "BENCH_STEPS=1 BENCH_BACKEND=opencl BENCH_MODEL=models/tiny.lua BENCH_OUT=/tmp/realm-compare-%d "
             "bash bench/compare.sh %s %s 1 32; rc=$?; rm -rf /tmp/realm-compare-%d; exit $rc",
             (int)getpid(), t_realm_bin(), t_realm_bin(), (int)getpid());
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "status %d: %s", rc, out);
    const char *rows[] = {"tok_s", "ms_step", "matmul", "scan", "attention", "norm", "new/old", "old:", "new:", NULL};
    for (int i = 0; rows[i]; i++) CHECK(strstr(out, rows[i]), "no '%s' in: %s", rows[i], out);
    CHECK(strstr(out, "slowest kernels"), "no kernel list: %s", out);
    snprintf(cmd, sizeof cmd, "bash bench/compare.sh %s", t_realm_bin());
    CHECK(t_run(cmd, out, sizeof out) == 2 && strstr(out, "usage"), "one build accepted: %s", out);
}
