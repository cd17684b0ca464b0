/* tensor.c - tensor descriptors and the argument checks every op shares. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

gqmm_tensor gqmm_tensor_make(void *data, gqmm_dtype dtype, int ndim, const int64_t *shape) {
  gqmm_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = dtype;
  t.device = GQMM_DEVICE_CPU;
  if (ndim < 0 || ndim > GQMM_MAX_DIMS) {
    t.ndim = -1; /* rejected by every op with GQMM_ERR_NDIM */
    return t;
  }
  t.ndim = ndim;
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    t.shape[i] = shape[i];
    t.strides[i] = stride;
    stride *= shape[i];
  }
  return t;
}

int64_t gqmm_tensor_numel(const gqmm_tensor *t) {
  if (!t || t->ndim < 0 || t->ndim > GQMM_MAX_DIMS) return 0;
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++)
    n *= t->shape[i];
  return n;
}

bool gqmm__is_contiguous(const gqmm_tensor *t) {
  int64_t stride = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] != 1 && t->strides[i] != stride) return false;
    stride *= t->shape[i];
  }
  return true;
}

size_t gqmm__nbytes(const gqmm_tensor *t) {
  return (size_t)gqmm_tensor_numel(t) * gqmm_dtype_size(t->dtype);
}

void gqmm__shape_str(char *buf, size_t len, int ndim, const int64_t *shape) {
  size_t used = (size_t)snprintf(buf, len, "(");
  for (int i = 0; i < ndim && used < len; i++)
    used += (size_t)snprintf(buf + used, len - used, i ? ", %lld" : "%lld", (long long)shape[i]);
  if (used < len) snprintf(buf + used, len - used, ndim == 1 ? ",)" : ")");
}

int gqmm__check_tensor(gqmm_ctx *ctx, const gqmm_tensor *t, const char *name) {
  if (!t) return gqmm__fail(ctx, GQMM_ERR_NULL, "%s: tensor pointer is NULL", name);
  if (t->ndim < 0 || t->ndim > GQMM_MAX_DIMS)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "%s: ndim %d is outside [0, %d]", name, t->ndim,
                      GQMM_MAX_DIMS);
  if ((unsigned)t->dtype > (unsigned)GQMM_I32)
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "%s: unknown dtype %d", name, (int)t->dtype);
  if ((unsigned)t->device > (unsigned)GQMM_DEVICE_CUDA)
    return gqmm__fail(ctx, GQMM_ERR_DEVICE, "%s: unknown device %d", name, (int)t->device);
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] < 0)
      return gqmm__fail(ctx, GQMM_ERR_SHAPE, "%s: dimension %d is negative (%lld)", name, i,
                        (long long)t->shape[i]);
    if (t->shape[i] > 0 && n > (INT64_C(1) << 40) / t->shape[i])
      return gqmm__fail(ctx, GQMM_ERR_SHAPE, "%s: more than 2^40 elements", name);
    n *= t->shape[i];
  }
  if (!gqmm__is_contiguous(t))
    return gqmm__fail(ctx, GQMM_ERR_LAYOUT, "%s: must be row-contiguous (strides given are not)",
                      name);
  if (n > 0 && !t->data) return gqmm__fail(ctx, GQMM_ERR_NULL, "%s: data pointer is NULL", name);
  return GQMM_OK;
}

int gqmm__check_same_device(gqmm_ctx *ctx, const gqmm_tensor *t, const char *name,
                            gqmm_device dev) {
  if (t->device != dev)
    return gqmm__fail(ctx, GQMM_ERR_DEVICE, "%s: is on %s memory but the other inputs are on %s",
                      name, t->device == GQMM_DEVICE_CUDA ? "CUDA" : "CPU",
                      dev == GQMM_DEVICE_CUDA ? "CUDA" : "CPU");
  return GQMM_OK;
}

int gqmm__check_no_overlap(gqmm_ctx *ctx, const gqmm_tensor *out, const char *out_name,
                           const gqmm_tensor *in, const char *in_name) {
  if (!in || !in->data || !out->data || in->device != out->device) return GQMM_OK;
  uintptr_t a0 = (uintptr_t)out->data, a1 = a0 + gqmm__nbytes(out);
  uintptr_t b0 = (uintptr_t)in->data, b1 = b0 + gqmm__nbytes(in);
  if (a0 < b1 && b0 < a1)
    return gqmm__fail(ctx, GQMM_ERR_OVERLAP, "%s: output memory overlaps input %s", out_name,
                      in_name);
  return GQMM_OK;
}

int gqmm__check_output(gqmm_ctx *ctx, const gqmm_tensor *out, gqmm_dtype dtype, int ndim,
                       const int64_t *shape, const char *name) {
  int st = gqmm__check_tensor(ctx, out, name);
  if (st) return st;
  if (out->dtype != dtype)
    return gqmm__fail(ctx, GQMM_ERR_OUTPUT, "%s: dtype is %s, expected %s", name,
                      gqmm_dtype_name(out->dtype), gqmm_dtype_name(dtype));
  bool same = out->ndim == ndim;
  for (int i = 0; same && i < ndim; i++)
    same = out->shape[i] == shape[i];
  if (!same) {
    char want[160], got[160];
    gqmm__shape_str(want, sizeof want, ndim, shape);
    gqmm__shape_str(got, sizeof got, out->ndim, out->shape);
    return gqmm__fail(ctx, GQMM_ERR_OUTPUT, "%s: shape is %s, expected %s", name, got, want);
  }
  return GQMM_OK;
}
