/*
 * cmd_bench.c - `gqmm bench`: times gather_qmm on the seed workload
 * (E=128 experts, top-8 of 256 tokens, 4-bit, group 64, bf16) on a backend.
 */
#include "cli.h"
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int gqmm_cmd_bench(int argc, char **argv) {
  gqmm_backend_kind kind = GQMM_BACKEND_AUTO;
  int tokens = 256, E = 128, topk = 8, K = 2816, N = 1408, reps = 3;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
      if (gqmm_cli_backend(argv[++i], &kind)) {
        fprintf(stderr, "gqmm bench: unknown backend '%s'\n", argv[i]);
        return 2;
      }
    } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) tokens = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    else {
      printf("usage: gqmm bench [--backend auto|cpu|cuda|ref] [--tokens T] [--reps R]\n");
      return strcmp(argv[i], "--help") ? 2 : 0;
    }
  }
  if (tokens < 1 || reps < 1) {
    fprintf(stderr, "gqmm bench: --tokens and --reps must be positive\n");
    return 2;
  }
  gqmm_quant q = {4, 64};
  const int64_t rows = (int64_t)tokens * topk;
  const int64_t words = gqmm_packed_words(q, K), groups = K / q.group_size;
  uint32_t *wq = malloc((size_t)(E * N * words) * 4);
  uint16_t *sc = malloc((size_t)(E * N * groups) * 2), *bi = malloc((size_t)(E * N * groups) * 2);
  uint16_t *x = malloc((size_t)(rows * K) * 2), *out = malloc((size_t)(rows * N) * 2);
  int32_t *idx = malloc((size_t)rows * 4);
  gqmm_ctx *ctx = gqmm_cli_ctx(kind);
  int rc = 1;
  if (!wq || !sc || !bi || !x || !out || !idx || !ctx) goto done;
  uint64_t s = 88172645463325252ull;
  for (int64_t i = 0; i < E * N * words; i++) wq[i] = (uint32_t)((s = s * 6364136223846793005ull + 1) >> 32);
  for (int64_t i = 0; i < E * N * groups; i++) {
    sc[i] = gqmm_f32_to_bf16(0.01f + 0.001f * (float)(i % 7));
    bi[i] = gqmm_f32_to_bf16(-0.08f + 0.001f * (float)(i % 5));
  }
  for (int64_t i = 0; i < rows * K; i++) x[i] = gqmm_f32_to_bf16((float)((int)(i % 17) - 8) * 0.125f);
  /* random top-k routing, then sorted by expert as mlx-lm's SwitchGLU does */
  int *count = calloc((size_t)E, sizeof(int));
  if (!count) goto done;
  for (int64_t r = 0; r < rows; r++) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    count[(s >> 33) % (uint64_t)E]++;
  }
  for (int e = 0, r = 0; e < E; e++)
    for (int c = 0; c < count[e]; c++) idx[r++] = e;
  free(count);
  int64_t wshape[3] = {E, N, words}, sshape[3] = {E, N, groups}, xshape[3] = {rows, 1, K};
  int64_t ishape[1] = {rows}, oshape[3] = {rows, 1, N};
  gqmm_tensor tw = gqmm_tensor_make(wq, GQMM_U32, 3, wshape);
  gqmm_tensor ts = gqmm_tensor_make(sc, GQMM_BF16, 3, sshape), tb = gqmm_tensor_make(bi, GQMM_BF16, 3, sshape);
  gqmm_tensor tx = gqmm_tensor_make(x, GQMM_BF16, 3, xshape), ti = gqmm_tensor_make(idx, GQMM_I32, 1, ishape);
  gqmm_tensor to = gqmm_tensor_make(out, GQMM_BF16, 3, oshape);
  double best = INFINITY;
  for (int r = 0; r < reps; r++) {
    double t0 = now_s();
    int st = gqmm_gather_qmm(ctx, &tx, &tw, &ts, &tb, NULL, &ti, 1, q, 1, &to);
    double t = now_s() - t0;
    if (st) {
      fprintf(stderr, "gqmm bench: %s\n", gqmm_last_error(ctx));
      goto done;
    }
    if (t < best) best = t;
  }
  double bytes = (double)E * N * (words * 4 + groups * 4);
  printf("%-8s %-6s %4s %4s %5s %5s %6s %10s %10s %10s\n", "backend", "op", "E", "topk", "K", "N",
         "tokens", "time_ms", "weight_MB", "GB/s");
  printf("%-8s %-6s %4d %4d %5d %5d %6d %10.3f %10.1f %10.2f\n", gqmm_last_backend(ctx), "gate_up",
         E, topk, K, N, tokens, best * 1e3, bytes / 1e6, bytes / best / 1e9);
  rc = 0;
done:
  gqmm_ctx_destroy(ctx);
  free(wq), free(sc), free(bi), free(x), free(out), free(idx);
  return rc;
}
