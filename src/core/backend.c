/*
 * backend.c - the list of compiled-in backends and how one is chosen.
 * Each backend lives in its own directory and defines one gqmm__backend;
 * the front end never contains a kernel.
 */
#include "internal.h"

#include <stddef.h>

static const gqmm__backend *const backend_list[] = {
#ifdef GQMM_HAVE_CUDA
    &gqmm__cuda_backend,
#endif
#ifdef GQMM_HAVE_CPU
    &gqmm__cpu_backend,
#endif
    &gqmm__ref_backend,
    NULL,
};

const gqmm__backend *const *gqmm__backends(void) {
  return backend_list;
}

static const char *kind_name(gqmm_backend_kind k) {
  switch (k) {
  case GQMM_BACKEND_REF:
    return "ref";
  case GQMM_BACKEND_CPU:
    return "cpu";
  case GQMM_BACKEND_CUDA:
    return "cuda";
  default:
    return "auto";
  }
}

int gqmm__select_backend(gqmm_ctx *ctx, const gqmm__qmm_args *a, const gqmm__backend **out) {
  for (const gqmm__backend *const *b = backend_list; *b; b++) {
    const gqmm__backend *be = *b;
    if (ctx->backend_kind != GQMM_BACKEND_AUTO && be->kind != ctx->backend_kind) continue;
    if (a->packed && be != a->packed->be) continue; /* only its packer reads its layout */
    if (be->supports_qmm(ctx, a)) {
      *out = be;
      return GQMM_OK;
    }
  }
  if (a->packed)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "w: packed weights run only on the %s backend (context backend: %s; x "
                      "on %s, dtype %s)",
                      a->packed->be->name, kind_name(ctx->backend_kind),
                      a->device == GQMM_DEVICE_CUDA ? "cuda" : "cpu", gqmm_dtype_name(a->dtype));
  return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                    "no %s backend supports this call (device %s, dtype %s, bits %d, "
                    "group size %d)",
                    kind_name(ctx->backend_kind), a->device == GQMM_DEVICE_CUDA ? "cuda" : "cpu",
                    gqmm_dtype_name(a->dtype), a->q.bits, a->q.group_size);
}
