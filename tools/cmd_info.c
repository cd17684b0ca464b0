/* cmd_info.c - `gqmm info`: version, CPU features, compiled backends and the
 * one `--backend auto` picks for host and for CUDA memory. */
#include "cli.h"
#include "internal.h"

#include <stdio.h>
#include <string.h>

/* Name of the backend AUTO selects for the seed's gate_up problem on `dev`. */
static const char *auto_choice(gqmm_ctx *ctx, gqmm_device dev) {
  gqmm__qmm_args a;
  memset(&a, 0, sizeof a);
  a.dtype = GQMM_BF16;
  a.q = (gqmm_quant){4, 64};
  a.transpose = 1;
  a.device = dev;
  a.M = 16, a.N = 1408, a.K = 2816, a.batch = 128, a.x_batches = 128, a.w_batches = 128;
  const gqmm__backend *be = NULL;
  return gqmm__select_backend(ctx, &a, &be) == GQMM_OK ? be->name : "none";
}

int gqmm_cmd_info(int argc, char **argv) {
  if (argc > 1) {
    printf("usage: gqmm info\n");
    return strcmp(argv[1], "--help") && strcmp(argv[1], "-h") ? 2 : 0;
  }
  char feat[256];
  gqmm_cpu_features(feat, sizeof feat);
  printf("gqmm %s\n", gqmm_version());
  printf("cpu: %s\n", feat);
  printf("backends compiled (best first):");
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++)
    printf(" %s", (*b)->name);
  printf("\n");
  gqmm_ctx *ctx = gqmm_cli_ctx(GQMM_BACKEND_AUTO);
  if (!ctx) return 1;
  printf("--backend auto runs on: %s (host memory), %s (CUDA memory)\n",
         auto_choice(ctx, GQMM_DEVICE_CPU), auto_choice(ctx, GQMM_DEVICE_CUDA));
  gqmm_ctx_destroy(ctx);
  return 0;
}
