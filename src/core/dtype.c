/*
 * dtype.c - float16/bfloat16 conversions and dtype helpers.
 * Conversions round to nearest even, like MLX's and the hardware's casts, so
 * a stored scale or output is bit-identical to what MLX would store. NaN
 * becomes MLX's canonical NaN (its software casts on x86: bf16 0x7fc0 without
 * the sign, f16 sign|0x7d00), so even a NaN scale matches MLX bit for bit.
 */
#include "internal.h"

#include <string.h>

static uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* The bf16 conversions, static so gqmm__convert's loops inline them (the
 * exported functions may be interposed in a shared library, so calls to
 * them stay calls) and branch-free so those loops vectorize. */
static inline float bf16_to_f32(uint16_t h) {
  return bits_f32((uint32_t)h << 16);
}
/* Round to nearest even; NaN -> 0x7fc0. */
static inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f), r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r);
}

float gqmm_bf16_to_f32(uint16_t h) {
  return bf16_to_f32(h);
}

uint16_t gqmm_f32_to_bf16(float f) {
  return f32_to_bf16(f);
}

float gqmm_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    /* zero or subnormal: man * 2^-24, exact in float */
    float v = (float)man * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t gqmm_f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7d00u);
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: inf */
  if (a < 0x38800000u) {
    /* result is subnormal or zero: scale to units of 2^-24 and round even */
    if (a < 0x33000000u) return sign; /* < 2^-25: rounds to zero */
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    int shift = 126 - (int)(a >> 23); /* 14..24 */
    uint32_t half = 1u << (shift - 1);
    uint32_t rest = man & ((1u << shift) - 1u);
    uint32_t r = man >> shift;
    if (rest > half || (rest == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = a - 0x38000000u; /* rebias exponent 127 -> 15 */
  r += 0xfffu + ((r >> 13) & 1u);
  return (uint16_t)(sign | (r >> 13));
}

size_t gqmm_dtype_size(gqmm_dtype dtype) {
  switch (dtype) {
  case GQMM_F16:
  case GQMM_BF16:
    return 2;
  case GQMM_F32:
  case GQMM_U32:
  case GQMM_I32:
    return 4;
  }
  return 0;
}

const char *gqmm_dtype_name(gqmm_dtype dtype) {
  switch (dtype) {
  case GQMM_F32:
    return "float32";
  case GQMM_F16:
    return "float16";
  case GQMM_BF16:
    return "bfloat16";
  case GQMM_U32:
    return "uint32";
  case GQMM_I32:
    return "int32";
  }
  return "unknown";
}

gqmm_dtype gqmm__promote(gqmm_dtype a, gqmm_dtype b) {
  return a == b ? a : GQMM_F32;
}

float gqmm__load_f(const void *p, gqmm_dtype t, int64_t i) {
  switch (t) {
  case GQMM_F16:
    return gqmm_f16_to_f32(((const uint16_t *)p)[i]);
  case GQMM_BF16:
    return bf16_to_f32(((const uint16_t *)p)[i]);
  default:
    return ((const float *)p)[i];
  }
}

void gqmm__store_f(void *p, gqmm_dtype t, int64_t i, float v) {
  switch (t) {
  case GQMM_F16:
    ((uint16_t *)p)[i] = gqmm_f32_to_f16(v);
    break;
  case GQMM_BF16:
    ((uint16_t *)p)[i] = f32_to_bf16(v);
    break;
  default:
    ((float *)p)[i] = v;
    break;
  }
}

void gqmm__convert(void *dst, gqmm_dtype dt, const void *src, gqmm_dtype st, int64_t n) {
  if (dt == st) {
    memcpy(dst, src, (size_t)n * gqmm_dtype_size(dt));
    return;
  }
  /* bf16 <-> f32, the layer's elementwise steps' conversions: loops the
   * compiler vectorizes, instead of a dtype switch per element */
  if (st == GQMM_BF16 && dt == GQMM_F32) {
    const uint16_t *h = src;
    float *f = dst;
    for (int64_t i = 0; i < n; i++)
      f[i] = bf16_to_f32(h[i]);
    return;
  }
  if (st == GQMM_F32 && dt == GQMM_BF16) {
    const float *f = src;
    uint16_t *h = dst;
    for (int64_t i = 0; i < n; i++)
      h[i] = f32_to_bf16(f[i]);
    return;
  }
  for (int64_t i = 0; i < n; i++)
    gqmm__store_f(dst, dt, i, gqmm__load_f(src, st, i));
}
