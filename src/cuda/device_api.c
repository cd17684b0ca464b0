/*
 * device_api.c - gqmm_device_* and gqmm_graph_*: the public face of the
 * device hooks (memory, stream, graphs) of whichever GPU backend is
 * compiled in. Compiled in every build, so that a CPU-only library answers
 * GQMM_ERR_UNSUPPORTED instead of failing to link.
 */
#include "internal.h"

#include <stdlib.h>

static const gqmm__backend *device_backend(void) {
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++)
    if ((*b)->mem_alloc) return *b;
  return NULL;
}

static int no_gpu(gqmm_ctx *ctx) {
  return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED, "device memory: no GPU backend compiled in");
}

int gqmm_device_alloc(gqmm_ctx *ctx, size_t bytes, void **out) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  if (!out) return gqmm__fail(ctx, GQMM_ERR_NULL, "out: pointer is NULL");
  *out = NULL;
  const gqmm__backend *be = device_backend();
  return be ? be->mem_alloc(ctx, bytes, out) : no_gpu(ctx);
}

void gqmm_device_free(gqmm_ctx *ctx, void *p) {
  const gqmm__backend *be = device_backend();
  if (ctx && be && p) be->mem_free(ctx, p);
}

int gqmm_device_copy(gqmm_ctx *ctx, void *dst, const void *src, size_t bytes,
                     gqmm_copy_kind kind) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  if ((!dst || !src) && bytes)
    return gqmm__fail(ctx, GQMM_ERR_NULL, "%s: pointer is NULL", dst ? "src" : "dst");
  if (kind < GQMM_COPY_HOST_TO_DEVICE || kind > GQMM_COPY_DEVICE_TO_DEVICE)
    return gqmm__fail(ctx, GQMM_ERR_ARG, "kind: %d is not a gqmm_copy_kind", (int)kind);
  const gqmm__backend *be = device_backend();
  if (!be) return no_gpu(ctx);
  return bytes ? be->mem_copy(ctx, dst, src, bytes, (gqmm__copy_dir)kind) : GQMM_OK;
}

int gqmm_device_sync(gqmm_ctx *ctx) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  const gqmm__backend *be = device_backend();
  return be && be->sync ? be->sync(ctx) : no_gpu(ctx);
}

int gqmm_device_last_time(gqmm_ctx *ctx, double *kernel_us, double *op_us) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  if (!kernel_us || !op_us)
    return gqmm__fail(ctx, GQMM_ERR_NULL, "%s: pointer is NULL", kernel_us ? "op_us" : "kernel_us");
  const gqmm__backend *be = device_backend();
  return be && be->last_time ? be->last_time(ctx, kernel_us, op_us) : no_gpu(ctx);
}

int gqmm_device_set_stream(gqmm_ctx *ctx, void *stream) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  const gqmm__backend *be = device_backend();
  return be && be->set_stream ? be->set_stream(ctx, stream) : no_gpu(ctx);
}

/* ---- graphs -------------------------------------------------------------- */

struct gqmm_graph {
  const gqmm__backend *be;
  const gqmm_ctx *ctx; /* the context that recorded it (its scratch is in the graph) */
  void *exec;          /* the backend's runnable graph */
};

int gqmm_graph_begin(gqmm_ctx *ctx) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  const gqmm__backend *be = device_backend();
  return be && be->graph_begin ? be->graph_begin(ctx) : no_gpu(ctx);
}

int gqmm_graph_end(gqmm_ctx *ctx, gqmm_graph **out) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  if (!out) return gqmm__fail(ctx, GQMM_ERR_NULL, "out: pointer is NULL");
  *out = NULL;
  const gqmm__backend *be = device_backend();
  if (!be || !be->graph_end) return no_gpu(ctx);
  gqmm_graph *g = calloc(1, sizeof *g);
  if (!g) return gqmm__fail(ctx, GQMM_ERR_NOMEM, "gqmm_graph_end: out of host memory");
  const int st = be->graph_end(ctx, &g->exec);
  if (st) {
    free(g);
    return st;
  }
  g->be = be;
  g->ctx = ctx;
  *out = g;
  return GQMM_OK;
}

int gqmm_graph_launch(gqmm_ctx *ctx, const gqmm_graph *g) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  if (!g) return gqmm__fail(ctx, GQMM_ERR_NULL, "g: pointer is NULL");
  if (g->ctx != ctx)
    return gqmm__fail(ctx, GQMM_ERR_ARG,
                      "g: recorded on another context (a graph replays on "
                      "the context that recorded it)");
  return g->be->graph_launch(ctx, g->exec);
}

void gqmm_graph_free(gqmm_graph *g) {
  if (!g) return;
  g->be->graph_free(g->exec);
  free(g);
}
