/* context.c - the context object: options, error message, backend state. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int gqmm_ctx_create(gqmm_ctx **out, const gqmm_ctx_options *opts) {
  if (!out) return GQMM_ERR_NULL;
  *out = NULL;
  gqmm_ctx *ctx = calloc(1, sizeof *ctx);
  if (!ctx) return GQMM_ERR_NOMEM;
  ctx->backend_kind = GQMM_BACKEND_AUTO;
  ctx->forced_config = -1;
  if (opts) {
    if ((unsigned)opts->backend > (unsigned)GQMM_BACKEND_CUDA || opts->num_threads < 0) {
      free(ctx);
      return GQMM_ERR_ARG;
    }
    ctx->backend_kind = opts->backend;
    ctx->num_threads = opts->num_threads;
    ctx->cpu_int8 = opts->cpu_int8_activations != 0;
    if (opts->cpu_isa) {
      if (strlen(opts->cpu_isa) >= sizeof ctx->cpu_isa) {
        free(ctx);
        return GQMM_ERR_ARG;
      }
      strcpy(ctx->cpu_isa, opts->cpu_isa);
    }
  }
  *out = ctx;
  return GQMM_OK;
}

void gqmm_ctx_destroy(gqmm_ctx *ctx) {
  if (!ctx) return;
  gqmm__tune_release(ctx);
  free(ctx->moe_buf);
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++)
    if ((*b)->release) (*b)->release(ctx);
  free(ctx);
}

const char *gqmm_version(void) {
  return GQMM_VERSION_STRING;
}
