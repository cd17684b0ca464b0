/* ops_quantize.c - argument checks and dispatch for gqmm_quantize / gqmm_dequantize. */
#include "internal.h"

#include <stdio.h>

int gqmm__check_quant(gqmm_ctx *ctx, gqmm_quant q) {
  int st = gqmm_quant_check(q);
  if (st == GQMM_ERR_BITS)
    return gqmm__fail(ctx, st, "bits: %d is not supported (expected 2, 3, 4, 5, 6 or 8)", q.bits);
  if (st == GQMM_ERR_GROUP_SIZE)
    return gqmm__fail(ctx, st, "group_size: %d is not supported (expected 32, 64 or 128)",
                      q.group_size);
  return GQMM_OK;
}

/* shape[:-1] + (last,) of t into dst; returns ndim. */
static int replace_last(const gqmm_tensor *t, int64_t last, int64_t *dst) {
  for (int i = 0; i < t->ndim - 1; i++)
    dst[i] = t->shape[i];
  dst[t->ndim - 1] = last;
  return t->ndim;
}

int gqmm_quantize(gqmm_ctx *ctx, const gqmm_tensor *w, gqmm_quant q, gqmm_tensor *wq,
                  gqmm_tensor *scales, gqmm_tensor *biases) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  int st;
  if ((st = gqmm__check_quant(ctx, q))) return st;
  if ((st = gqmm__check_tensor(ctx, w, "w"))) return st;
  if (!gqmm__is_float(w->dtype))
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "w: dtype is %s, expected float32, float16 or bfloat16",
                      gqmm_dtype_name(w->dtype));
  if (w->ndim < 2)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "w: must have at least 2 dimensions, got %d", w->ndim);
  const int64_t k = w->shape[w->ndim - 1];
  if (k % q.group_size != 0)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE,
                      "w: last dimension %lld is not a multiple of group_size %d", (long long)k,
                      q.group_size);
  if (w->device != GQMM_DEVICE_CPU)
    return gqmm__fail(ctx, GQMM_ERR_DEVICE, "w: quantize runs on CPU memory only");
  int64_t shape[GQMM_MAX_DIMS];
  int nd = replace_last(w, gqmm_packed_words(q, k), shape);
  if ((st = gqmm__check_output(ctx, wq, GQMM_U32, nd, shape, "wq"))) return st;
  replace_last(w, k / q.group_size, shape);
  if ((st = gqmm__check_output(ctx, scales, w->dtype, nd, shape, "scales"))) return st;
  if ((st = gqmm__check_output(ctx, biases, w->dtype, nd, shape, "biases"))) return st;
  const gqmm_tensor *outs[3] = {wq, scales, biases};
  const char *names[3] = {"wq", "scales", "biases"};
  for (int i = 0; i < 3; i++) {
    if ((st = gqmm__check_same_device(ctx, outs[i], names[i], GQMM_DEVICE_CPU))) return st;
    if ((st = gqmm__check_no_overlap(ctx, outs[i], names[i], w, "w"))) return st;
    for (int j = i + 1; j < 3; j++)
      if ((st = gqmm__check_no_overlap(ctx, outs[i], names[i], outs[j], names[j]))) return st;
  }
  gqmm__ref_quantize(w->data, w->dtype, gqmm_tensor_numel(w) / (k ? k : 1), k, q, wq->data,
                     scales->data, biases->data);
  ctx->last_backend = "ref";
  return GQMM_OK;
}

int gqmm_dequantize(gqmm_ctx *ctx, const gqmm_tensor *wq, const gqmm_tensor *scales,
                    const gqmm_tensor *biases, gqmm_quant q, gqmm_tensor *out) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  int st;
  if ((st = gqmm__check_quant(ctx, q))) return st;
  if ((st = gqmm__check_tensor(ctx, wq, "wq"))) return st;
  if ((st = gqmm__check_tensor(ctx, scales, "scales"))) return st;
  if ((st = gqmm__check_tensor(ctx, biases, "biases"))) return st;
  if (wq->dtype != GQMM_U32)
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "wq: dtype is %s, expected uint32",
                      gqmm_dtype_name(wq->dtype));
  if (!gqmm__is_float(scales->dtype) || !gqmm__is_float(biases->dtype))
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "scales/biases: dtypes %s/%s, expected float types",
                      gqmm_dtype_name(scales->dtype), gqmm_dtype_name(biases->dtype));
  if (wq->ndim < 2)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "wq: must have at least 2 dimensions, got %d", wq->ndim);
  const int64_t words = wq->shape[wq->ndim - 1];
  const int64_t k = words * 32 / q.bits;
  if ((words * 32) % q.bits != 0 || k % q.group_size != 0)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE,
                      "wq: last dimension %lld words does not hold a whole number of %d-bit "
                      "groups of %d",
                      (long long)words, q.bits, q.group_size);
  int64_t shape[GQMM_MAX_DIMS];
  int nd = replace_last(wq, k / q.group_size, shape);
  const gqmm_tensor *sb[2] = {scales, biases};
  const char *sb_names[2] = {"scales", "biases"};
  for (int i = 0; i < 2; i++) {
    bool same = sb[i]->ndim == nd;
    for (int d = 0; same && d < nd; d++)
      same = sb[i]->shape[d] == shape[d];
    if (!same) {
      char want[160], got[160];
      gqmm__shape_str(want, sizeof want, nd, shape);
      gqmm__shape_str(got, sizeof got, sb[i]->ndim, sb[i]->shape);
      return gqmm__fail(ctx, GQMM_ERR_SHAPE, "%s: shape is %s, expected %s for wq", sb_names[i],
                        got, want);
    }
  }
  if (!out) return gqmm__fail(ctx, GQMM_ERR_NULL, "out: tensor pointer is NULL");
  if (!gqmm__is_float(out->dtype))
    return gqmm__fail(ctx, GQMM_ERR_OUTPUT, "out: dtype is %s, expected a float type",
                      gqmm_dtype_name(out->dtype));
  replace_last(wq, k, shape);
  if ((st = gqmm__check_output(ctx, out, out->dtype, nd, shape, "out"))) return st;
  const gqmm_tensor *ins[3] = {wq, scales, biases};
  const char *names[3] = {"wq", "scales", "biases"};
  for (int i = 0; i < 3; i++) {
    if ((st = gqmm__check_same_device(ctx, ins[i], names[i], GQMM_DEVICE_CPU))) return st;
    if ((st = gqmm__check_no_overlap(ctx, out, "out", ins[i], names[i]))) return st;
  }
  if ((st = gqmm__check_same_device(ctx, out, "out", GQMM_DEVICE_CPU))) return st;
  gqmm__ref_dequantize(wq->data, scales->data, scales->dtype, biases->data, biases->dtype,
                       gqmm_tensor_numel(wq) / (words ? words : 1), k, q, out->data, out->dtype);
  ctx->last_backend = "ref";
  return GQMM_OK;
}
