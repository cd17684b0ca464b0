/*
 * pack.c - gqmm_pack: the load-time copy of quantized weights in a backend's
 * kernel layout (the CUDA tensor-core kernels' stage layout, src/cuda/pack.cu,
 * or the CPU kernels' panels, src/cpu/cpu_pack.c), and its release. The copy keeps the shapes and
 * format of the tensors it came from, so gqmm_gather_qmm_packed checks its inputs exactly as
 * gqmm_gather_qmm does.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* The backend that packs for tensors on `dev` under ctx's backend choice:
 * the CUDA backend for its device's tensors, the CPU backend for host ones
 * (each has a `pack` hook and its own layout). */
static const gqmm__backend *packer(gqmm_ctx *ctx, gqmm_device dev) {
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++) {
    const gqmm__backend *be = *b;
    if (ctx->backend_kind != GQMM_BACKEND_AUTO && be->kind != ctx->backend_kind) continue;
    const bool host = be->kind == GQMM_BACKEND_CPU;
    if (be->pack && host == (dev == GQMM_DEVICE_CPU)) return be;
  }
  return NULL;
}

/* gqmm_pack and gqmm_pack_glu (glu = 1). */
static int pack(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
                const gqmm_tensor *biases, gqmm_quant q, int glu, gqmm_packed **out) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  if (!out) return gqmm__fail(ctx, GQMM_ERR_NULL, "out: pointer is NULL");
  *out = NULL;
  int st;
  int64_t K;
  if ((st = gqmm__check_quant(ctx, q)) ||
      (st = gqmm__check_qweight_tensors(ctx, w, scales, biases)))
    return st;
  if ((st = gqmm__check_same_device(ctx, scales, "scales", w->device)) ||
      (st = gqmm__check_same_device(ctx, biases, "biases", w->device)) ||
      (st = gqmm__check_qweight_dtypes(ctx, w, scales, biases)) ||
      (st = gqmm__check_qweight_shapes(ctx, w, scales, biases, q, &K)))
    return st;
  /* what the packed layout adds */
  if (scales->dtype != GQMM_F16 && scales->dtype != GQMM_BF16)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "scales: dtype is %s; the packed layout holds float16 or bfloat16 scales",
                      gqmm_dtype_name(scales->dtype));
  if (biases->dtype != scales->dtype)
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "biases: dtype is %s, expected %s like the scales",
                      gqmm_dtype_name(biases->dtype), gqmm_dtype_name(scales->dtype));
  if (q.bits != 2 && q.bits != 3 && q.bits != 4 && q.bits != 8)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "gqmm_pack: %d-bit weights have no packed layout (2, 3, 4 and 8 do); use "
                      "them unpacked",
                      q.bits);
  if (K % 32 != 0)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "gqmm_pack: K = %lld is not a multiple of 32 (the packed layout's unit)",
                      (long long)K);
  if (glu && w->shape[w->ndim - 2] % 2 != 0)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE,
                      "gqmm_pack_glu: w has %lld rows; a gate_up tensor has 2 x I (gate rows, "
                      "then up rows)",
                      (long long)w->shape[w->ndim - 2]);
  const gqmm__backend *be = packer(ctx, w->device);
  if (!be)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "gqmm_pack: no backend packs %s tensors under this context's backend "
                      "choice (the CUDA backend packs device tensors, the CPU backend host ones)",
                      w->device == GQMM_DEVICE_CUDA ? "cuda" : "cpu");
  gqmm_packed *p = calloc(1, sizeof *p);
  if (!p) return gqmm__fail(ctx, GQMM_ERR_NOMEM, "gqmm_pack: out of host memory");
  p->q = q;
  p->dtype = scales->dtype;
  p->ndim = w->ndim;
  memcpy(p->shape, w->shape, sizeof p->shape);
  p->K = K;
  p->glu = glu;
  p->device = w->device;
  p->be = be;
  const int64_t N = w->shape[w->ndim - 2];
  int64_t E = 1;
  for (int d = 0; d < w->ndim - 2; d++) E *= w->shape[d];
  if (E > 0 && N > 0 && (st = be->pack(ctx, p, w->data, scales->data, biases->data, E, N))) {
    free(p);
    return st;
  }
  *out = p;
  return GQMM_OK;
}

int gqmm_pack(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
              const gqmm_tensor *biases, gqmm_quant q, gqmm_packed **out) {
  return pack(ctx, w, scales, biases, q, 0, out);
}

int gqmm_pack_glu(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
                  const gqmm_tensor *biases, gqmm_quant q, gqmm_packed **out) {
  return pack(ctx, w, scales, biases, q, 1, out);
}

void gqmm_packed_free(gqmm_ctx *ctx, gqmm_packed *p) {
  if (!p) return;
  if (p->data && p->device == GQMM_DEVICE_CPU)
    free(p->data);
  else if (p->data && ctx && p->be->mem_free)
    p->be->mem_free(ctx, p->data);
  free(p);
}

int gqmm_packed_scaled(const gqmm_packed *p) { return p ? p->scaled : 0; }

int64_t gqmm_packed_nbytes(const gqmm_packed *p) { return p ? p->nbytes : 0; }
