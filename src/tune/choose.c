/*
 * choose.c - which tile configuration a kernel runs with.
 * Order: a forced config (tests sweep them all; `gqmm tune` measures them),
 * then the tuning cache, then the backend's own heuristic (-1).
 */
#include "internal.h"

int gqmm__choose_config(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__qmm_args *a) {
  (void)be;
  (void)a;
  if (ctx->forced_config >= 0) return ctx->forced_config;
  return -1; /* no tuning cache consulted yet: src/tune adds the lookup */
}
