/* CUDA graphs (backends/backend.h bk_graph_*, runtime/exec.h exec_capture/exec_replay, and the
 * decoder's captured step, docs/decode.md): a captured launch sequence replays exactly; a
 * capture broken by a sync fails cleanly and leaves the stream usable; the decoder generates
 * the same bytes and bitwise the same logits with and without its graph; and the CLI's
 * generate/--bench run with the graph on. The GPU tests run only with REALM_GPU=1 (CUDA);
 * elsewhere they print a skip note. cuda_graph_opencl_unsupported always runs: OpenCL has no
 * graphs and says so, and its decoder launches as before. */
#include "test.h"

#include "decode.h"
#include "exec.h"
#include "kernelcheck.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static backend *graph_gpu(tctx *t) {
    if (!t_gpu_on()) return NULL;
    char err[2048];
    backend *bk = bk_create(BK_CUDA, 0, NULL, err, sizeof err);
    if (!bk) t_fail(t, __FILE__, __LINE__, "REALM_GPU=1 but CUDA failed: %s", err);
    else if (!bk_graph_supported(bk)) {
        t_fail(t, __FILE__, __LINE__, "CUDA driver %s lacks the graph entry points", bk_info(bk)->driver_version);
        bk_destroy(bk);
        return NULL;
    }
    return bk;
}

static const char *const MODEL =
    "local nn = require 'realm.nn'\n"
    "return nn.model { name = 'cg', d_model = 32,\n"
    "  blocks = { nn.mamba3 { d_state = 16, headdim = 16, chunk = 4 }, nn.attention { heads = 2, window = 8 },\n"
    "             nn.mamba3 { d_state = 16, headdim = 16, chunk = 4 }, nn.attention { heads = 4, kv_heads = 2, window = 5 } },\n"
    "  mlp = nn.swiglu { hidden = 48 } }\n";

TEST(cuda_graph_opencl_unsupported) {
    backend *bk = kc_opencl(t);
    if (!bk) return;
    CHECK(!bk_graph_supported(bk), "OpenCL claims graph support");
    int rc = bk_graph_begin(bk, NULL);
    int said = strstr(bk_error(bk), "not supported") != NULL;
    bk_graph *g = bk_graph_end(bk, NULL);
    int rc2 = bk_graph_launch(bk, NULL, NULL);
    bk_graph_free(bk, NULL);
    char err[4096];
    decoder d;
    int ok = decoder_open(&d, MODEL, strlen(MODEL), "cg.lua", bk, 1, err, sizeof err) == 0;
    int used = ok && d.use_graph;
    int cap = ok ? exec_capture(&d.x, 0, 1, err, sizeof err) : 0;
    if (ok) decoder_close(&d);
    bk_destroy(bk);
    CHECK(rc < 0 && said && !g && rc2 < 0, "graph calls on OpenCL should fail with 'not supported'");
    CHECK(ok, "decoder on OpenCL: %s", err);
    CHECK(!used && cap < 0 && strstr(err, "not supported"), "OpenCL decoder: use_graph %d, capture %d (%s)", used, cap,
          err);
}

/* x = 2x + a, for a = 1, 2, 3 in order: a replay that reorders or drops a launch shows. */
static const char *const KSRC =
    "extern \"C\" __global__ void affine(float *x, long long n, float a) {\n"
    "  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  if (i < n) x[i] = 2.0f * x[i] + a;\n"
    "}\n";

TEST(cuda_graph_backend) {
    backend *bk = graph_gpu(t);
    if (!bk) return;
    enum { N = 1000 };
    const char *names[] = {"affine", NULL};
    bk_module *m = bk_compile(bk, KSRC, "", names);
    bk_buf *buf = bk_alloc(bk, N * sizeof(float));
    float h[N], want[N];
    for (int i = 0; i < N; i++) h[i] = want[i] = (float)(i % 7) * 0.25f;
    int ok = m && buf && bk_upload(bk, buf, 0, h, sizeof h) == 0;
    bk_kernel *k = ok ? bk_kernel_get(bk, m, "affine") : NULL;
    const size_t grid[3] = {(N + 127) / 128, 1, 1}, block[3] = {128, 1, 1};
    bk_graph *g = NULL;
    if (k && bk_graph_begin(bk, NULL) == 0) {
        for (int a = 1; a <= 3 && ok; a++) {
            bk_arg args[3] = {BK_BUF(buf), BK_I64(N), BK_F32(a)};
            ok = bk_launch(bk, NULL, k, grid, block, 0, args, 3) == 0;
        }
        g = bk_graph_end(bk, NULL);
    }
    char why[1024];
    snprintf(why, sizeof why, "%s", bk_error(bk));
    /* nothing ran during the capture */
    float mid[N];
    int ok_mid = g && bk_download(bk, mid, buf, 0, sizeof mid) == 0 && memcmp(mid, want, sizeof mid) == 0;
    for (int r = 0; r < 4 && g && ok; r++) ok = bk_graph_launch(bk, g, NULL) == 0;
    ok = ok && g && bk_download(bk, h, buf, 0, sizeof h) == 0;
    for (int r = 0; r < 4; r++)
        for (int a = 1; a <= 3; a++)
            for (int i = 0; i < N; i++) want[i] = 2.0f * want[i] + (float)a;
    int same = ok && memcmp(h, want, sizeof h) == 0;
    /* a sync while capturing breaks the capture: begin succeeds, the sync and end fail, and the
     * stream still works afterwards */
    int b2 = bk_graph_begin(bk, NULL), s2 = bk_sync(bk, NULL);
    bk_graph *bad = bk_graph_end(bk, NULL);
    char why2[1024];
    snprintf(why2, sizeof why2, "%s", bk_error(bk));
    int after = bad == NULL && bk_download(bk, h, buf, 0, sizeof h) == 0 && memcmp(h, want, sizeof h) == 0;
    bk_graph_free(bk, bad);
    bk_graph_free(bk, g);
    if (buf) bk_free(bk, buf);
    if (m) bk_module_free(bk, m);
    bk_destroy(bk);
    CHECK(g, "capture failed: %s", why);
    CHECK(ok_mid, "launches ran while being captured");
    CHECK(same, "4 replays of the 3 captured launches differ from the host's result");
    CHECK(b2 == 0 && s2 < 0 && !bad && strstr(why2, "cuStreamEndCapture"),
          "sync during capture: begin %d sync %d end %p (%s)", b2, s2, (void *)bad, why2);
    CHECK(after, "the stream is unusable after a failed capture");
}

enum { B = 2, PROMPT = 13, GEN = 300, FAR = 5, V = 256 };

typedef struct {
    float pre[PROMPT * B * V];    /* logits after each prompt byte */
    uint8_t out[GEN * B];
    float after[B * V];           /* logits after one more fed byte */
    uint8_t far[FAR * B];         /* after a jump to position 262143 */
    int graphs;                   /* graphs captured */
} gen_result;

static int generate(tctx *t, backend *bk, int use_graph, gen_result *r) {
    char err[4096];
    decoder d;
    if (decoder_open(&d, MODEL, strlen(MODEL), "cg.lua", bk, B, err, sizeof err) < 0) {
        t_fail(t, __FILE__, __LINE__, "%s", err);
        return -1;
    }
    d.use_graph = use_graph;
    uint8_t prompt[B * PROMPT];
    for (int i = 0; i < B * PROMPT; i++) prompt[i] = (uint8_t)("ROMEO: hello, ROMEO: world!"[i % 27]);
    decode_sampling s[B] = {{0.9, 0, 0.95, 7}, {1.2, 20, 1.0, 1234567}};
    int rc = decoder_init_params(&d, 11, err, sizeof err) < 0 || decoder_set_sampling(&d, s, 1, err, sizeof err) < 0 ||
             decoder_feed(&d, prompt, PROMPT, r->pre, err, sizeof err) < 0;
    for (int i = 0; i < GEN && !rc; i++) rc = decoder_next(&d, r->out + i * B, err, sizeof err) < 0;
    uint8_t one[B] = {'\n', 'x'};
    rc = rc || decoder_feed(&d, one, 1, r->after, err, sizeof err) < 0 ||
         decoder_set_position(&d, 262143, err, sizeof err) < 0 || decoder_feed(&d, one, 1, NULL, err, sizeof err) < 0;
    for (int i = 0; i < FAR && !rc; i++) rc = decoder_next(&d, r->far + i * B, err, sizeof err) < 0;
    r->graphs = d.x.ngraph;
    if (rc) t_fail(t, __FILE__, __LINE__, "graph %s: %s", use_graph ? "on" : "off", err);
    decoder_close(&d);
    return rc ? -1 : 0;
}

TEST(cuda_graph_decode_same_bytes) {
    backend *bk = graph_gpu(t);
    if (!bk) return;
    gen_result *on = calloc(1, sizeof *on), *off = calloc(1, sizeof *off);
    int rc = generate(t, bk, 1, on) < 0 || generate(t, bk, 0, off) < 0;
    bk_destroy(bk);
    if (!rc) {
        printf("  %d graphs captured; first bytes: ", on->graphs);
        for (int i = 0; i < 40; i++) printf("%c", on->out[i * B] >= 32 && on->out[i * B] < 127 ? on->out[i * B] : '.');
        printf("\n");
    }
    int graphs = on->graphs, off_graphs = off->graphs;
    int pre = !memcmp(on->pre, off->pre, sizeof on->pre), out = !memcmp(on->out, off->out, sizeof on->out),
        after = !memcmp(on->after, off->after, sizeof on->after), far = !memcmp(on->far, off->far, sizeof on->far);
    free(on);
    free(off);
    if (rc) return;
    CHECK(graphs == 3 && off_graphs == 0, "graphs captured: %d with, %d without (want 3 and 0)", graphs, off_graphs);
    CHECK(pre, "prefill logits differ with the graph");
    CHECK(out, "generated bytes differ with the graph");
    CHECK(after, "logits after generation differ with the graph (state diverged)");
    CHECK(far, "bytes at position 262144 differ with the graph");
}

/* The CLI on a realm-9m run: REALM_GRAPH_RUN names one, else a 2-step run is trained here. */
TEST(cuda_graph_cli_bench) {
    backend *bk = graph_gpu(t);
    if (!bk) return;
    bk_destroy(bk);
    char dir[512], cmd[4096], a[16384], b[16384];
    const char *given = getenv("REALM_GRAPH_RUN");
    if (given && *given) {
        snprintf(dir, sizeof dir, "%s", given);
    } else {
        snprintf(dir, sizeof dir, "/tmp/realm-cuda-graph-%d", (int)getpid());
        snprintf(cmd, sizeof cmd,
                 "rm -rf %s && %s train models/realm-9m.lua --data README.md --out %s --backend cuda --batch 1 --seq 64 "
                 "--steps 2 --eval-every 0",
                 dir, t_realm_bin(), dir);
        CHECK(t_run(cmd, a, sizeof a) == 0, "training failed: %s", a);
    }
    snprintf(cmd, sizeof cmd, "%s generate %s --prompt 'ROMEO:' -n 200 --seed 3 --backend cuda 2>/dev/null",
             t_realm_bin(), dir);
    int ra = t_run(cmd, a, sizeof a);
    snprintf(cmd, sizeof cmd,
             "REALM_NO_CUDA_GRAPH=1 %s generate %s --prompt 'ROMEO:' -n 200 --seed 3 --backend cuda 2>/dev/null",
             t_realm_bin(), dir);
    int rb = t_run(cmd, b, sizeof b);
    CHECK(ra == 0 && rb == 0, "generate failed:\n%s\n%s", a, b);
    CHECK(strcmp(a, b) == 0, "same seed, different text with and without the graph:\n%s\n%s", a, b);
    for (int g = 1; g >= 0; g--) {
        snprintf(cmd, sizeof cmd, "%s%s generate %s --bench 1024,16384,262144 --backend cuda 2>&1",
                 g ? "" : "REALM_NO_CUDA_GRAPH=1 ", t_realm_bin(), dir);
        int rc = t_run(cmd, a, sizeof a);
        printf("  %s", a);
        CHECK(rc == 0 && strstr(a, "position 262144") && strstr(a, g ? "CUDA graph on" : "CUDA graph off"),
              "bench: %s", a);
    }
    if (!(given && *given)) {
        snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
        t_run(cmd, a, sizeof a);
    }
}
