/*
 * ref_quantize.c - affine quantize and dequantize, bit-exact with MLX's CPU
 * backend (mlx/backend/cpu/quantized.cpp `quantize`, ops.cpp
 * `affine_dequantize`).
 *
 * Quantize, per group of group_size values, all in float32:
 *   scale = max((max - min) / n_bins, 1e-7), negated unless |min| > |max|;
 *   the "edge" (the larger-magnitude extreme) is made exactly representable:
 *   q0 = rint(edge / scale); if q0 != 0: scale = edge / q0, bias = edge, so
 *   q = 0 decodes to the edge and q = -q0 ... to exactly 0 in float32.
 *   q = clamp(rint((w - bias) / scale), 0, n_bins) with the float32 scale and
 *   bias; only then are scale and bias rounded to w's dtype and stored.
 * Dequantize (MLX's CPU graph): multiply then add, each rounded to the dtype.
 */
#include "internal.h"

#include <math.h>
#include <string.h>

/* std::max / std::min as MLX uses them, including their NaN behaviour. */
static float max_like_std(float a, float b) {
  return (a < b) ? b : a;
}
static float min_like_std(float a, float b) {
  return (b < a) ? b : a;
}

/* OR value v (< 2^bits) into a zeroed packed row at element j. */
static void pack_value(uint8_t *row, int bits, int64_t j, uint32_t v) {
  int64_t bit = j * bits;
  uint8_t *p = row + (bit >> 3);
  int shift = (int)(bit & 7);
  uint32_t shifted = v << shift;
  p[0] |= (uint8_t)(shifted & 0xffu);
  if (shift + bits > 8) p[1] |= (uint8_t)(shifted >> 8);
}

void gqmm__ref_quantize(const void *w, gqmm_dtype dtype, int64_t rows, int64_t k, gqmm_quant q,
                        uint32_t *wq, void *scales, void *biases) {
  const float n_bins = (float)((1 << q.bits) - 1);
  const float eps = 1e-7f;
  const int64_t groups_per_row = k / q.group_size;
  const int64_t row_words = gqmm_packed_words(q, k);
  memset(wq, 0, (size_t)(rows * row_words) * sizeof(uint32_t));
  for (int64_t r = 0; r < rows; r++) {
    uint8_t *row = (uint8_t *)(wq + r * row_words);
    for (int64_t g = 0; g < groups_per_row; g++) {
      const int64_t base = r * k + g * q.group_size;
      float w_min = INFINITY, w_max = -INFINITY;
      for (int j = 0; j < q.group_size; j++) {
        float v = gqmm__load_f(w, dtype, base + j);
        w_max = max_like_std(w_max, v);
        w_min = min_like_std(w_min, v);
      }
      bool edge_is_min = fabsf(w_min) > fabsf(w_max);
      float scale = max_like_std((w_max - w_min) / n_bins, eps);
      scale = edge_is_min ? scale : -scale;
      float edge = edge_is_min ? w_min : w_max;
      float q0 = rintf(edge / scale);
      float bias = 0.0f;
      if (q0 != 0.0f) {
        scale = edge / q0;
        bias = edge;
      }
      for (int j = 0; j < q.group_size; j++) {
        float v = rintf((gqmm__load_f(w, dtype, base + j) - bias) / scale);
        v = min_like_std(max_like_std(v, 0.0f), n_bins);
        /* NaN survives the clamp (std::max/min semantics); MLX's x86 cast of it
         * yields 0, and a NaN to integer cast is undefined in C: spell it out. */
        pack_value(row, q.bits, g * q.group_size + j, isnan(v) ? 0u : (uint32_t)v);
      }
      gqmm__store_f(scales, dtype, r * groups_per_row + g, scale);
      gqmm__store_f(biases, dtype, r * groups_per_row + g, bias);
    }
  }
}

/* Round v to dtype t and back, as storing an intermediate in t would. */
static float round_to(gqmm_dtype t, float v) {
  switch (t) {
  case GQMM_F16:
    return gqmm_f16_to_f32(gqmm_f32_to_f16(v));
  case GQMM_BF16:
    return gqmm_bf16_to_f32(gqmm_f32_to_bf16(v));
  default:
    return v;
  }
}

void gqmm__ref_dequantize(const uint32_t *wq, const void *scales, gqmm_dtype s_dtype,
                          const void *biases, gqmm_dtype b_dtype, int64_t rows, int64_t k,
                          gqmm_quant q, void *out, gqmm_dtype out_dtype) {
  const gqmm_dtype t = gqmm__promote(s_dtype, b_dtype);
  const int64_t groups_per_row = k / q.group_size;
  const int64_t row_words = gqmm_packed_words(q, k);
  for (int64_t r = 0; r < rows; r++) {
    const uint8_t *row = (const uint8_t *)(wq + r * row_words);
    for (int64_t j = 0; j < k; j++) {
      int64_t g = r * groups_per_row + j / q.group_size;
      float s = gqmm__load_f(scales, s_dtype, g);
      float b = gqmm__load_f(biases, b_dtype, g);
      /* uint32 * scale promotes to the scale's dtype; + bias to promote(s, b) */
      float prod = round_to(s_dtype, (float)gqmm__unpack(row, q.bits, j) * s);
      float v = round_to(t, prod + b);
      gqmm__store_f(out, out_dtype, r * k + j, v);
    }
  }
}
