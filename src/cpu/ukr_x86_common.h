/*
 * ukr_x86_common.h - pieces shared by the x86 ISA files, included after the
 * vector primitives (ukr_vf, vf_fma...) are defined: conversion of
 * activations and group parameters to float32 (F16C for f16; bf16 is the top
 * half of a float32), the int8 mode's kernel and the peak loops the ceilings
 * measure. The including file defines UKR_I8_ROWS and ukr_i8_dot(acc, w, x):
 * acc (8 x int32) += the 4-byte dot products of u8 w and s8 x.
 */
#ifndef GQMM_UKR_X86_COMMON_H
#define GQMM_UKR_X86_COMMON_H

static void ukr_to_float(const void *src, gqmm_dtype t, int64_t n, float *dst) {
  int64_t i = 0;
  if (t == GQMM_F32) {
    memcpy(dst, src, (size_t)n * sizeof(float));
    return;
  }
  const uint16_t *h = (const uint16_t *)src;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128((const __m128i *)(h + i));
    const __m256 f = t == GQMM_F16
                         ? _mm256_cvtph_ps(v)
                         : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    _mm256_storeu_ps(dst + i, f);
  }
  for (; i < n; i++)
    dst[i] = t == GQMM_F16 ? gqmm_f16_to_f32(h[i]) : gqmm_bf16_to_f32(h[i]);
}

/* The exact path's instruction: vector FMA in 12 independent chains (more
 * than latency x throughput = 4 x 2), a loop the compiler cannot drop. */
static double ukr_peak_fma(long iters) {
  ukr_vf acc[12], a = vf_set1(1.0000001f), b = vf_set1(1e-7f);
  for (int i = 0; i < 12; i++)
    acc[i] = vf_set1((float)i);
  for (long it = 0; it < iters; it++) {
    for (int i = 0; i < 12; i++)
      acc[i] = vf_fma(acc[i], a, b);
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  float sink = 0;
  for (int i = 0; i < 12; i++)
    sink += vf_hsum(acc[i]);
  return (double)sink;
}

/* int8 mode, 4-bit weights: each 32-value chunk is unpacked once to bytes
 * and applied to rb (a compile-time constant, <= UKR_I8_ROWS) activation rows
 * at once, so the int32 sums stay in registers; the group's sums are exact,
 * then scaled by s * (activation scale), plus b * sum(x). */
static inline __attribute__((always_inline)) void
ukr_qmv_i8_rows(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rw, const int8_t *xq,
                const float *xs, const float *xsum, const int rb, float *C, int64_t ldc) {
  const int gs = sh->group_size;
  const int64_t K = sh->K, G = K / gs;
  __m256 tot[UKR_I8_ROWS];
  float bsum[UKR_I8_ROWS];
  for (int r = 0; r < rb; r++) {
    tot[r] = _mm256_setzero_ps();
    bsum[r] = 0.0f;
  }
  for (int64_t g = 0; g < G; g++) {
    __m256i acc[UKR_I8_ROWS];
    for (int r = 0; r < rb; r++)
      acc[r] = _mm256_setzero_si256();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
      const __m256i wv = ukr_unpack32_u8_4bit(rw->w + k / 2);
      for (int r = 0; r < rb; r++)
        acc[r] = ukr_i8_dot(acc[r], wv, _mm256_loadu_si256((const __m256i *)(xq + r * K + k)));
    }
    const float s = UKR_PARAM(rw->s, sh->dtype, g), b = UKR_PARAM(rw->b, sh->dtype, g);
    for (int r = 0; r < rb; r++) {
      const __m256 sc = _mm256_set1_ps(s * xs[r * G + g]);
      tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), sc, tot[r]);
      bsum[r] += b * xsum[r * G + g];
    }
  }
  for (int r = 0; r < rb; r++)
    C[r * ldc] = ukr_hsum256(tot[r]) + bsum[r];
}

static void ukr_qmv_i8(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rows, int nrows,
                       const int8_t *xq, const float *xs, const float *xsum, int R, float *C,
                       int64_t ldc) {
  const int64_t K = sh->K, G = K / sh->group_size;
  for (int n = 0; n < nrows; n++) {
    for (int r0 = 0; r0 < R; r0 += UKR_I8_ROWS) {
      const int rb = R - r0 < UKR_I8_ROWS ? R - r0 : UKR_I8_ROWS;
      const int8_t *q = xq + r0 * K;
      const float *s = xs + r0 * G, *xm = xsum + r0 * G;
      float *c = C + r0 * ldc + n;
      switch (rb) { /* one instantiation per row count: sums in registers */
#define UKR_I8_CASE(nr)                                                                            \
  case nr:                                                                                         \
    ukr_qmv_i8_rows(sh, &rows[n], q, s, xm, nr, c, ldc);                                           \
    break;
        UKR_I8_CASE(1) UKR_I8_CASE(2) UKR_I8_CASE(3) UKR_I8_CASE(4)
#if UKR_I8_ROWS > 4
        UKR_I8_CASE(5) UKR_I8_CASE(6) UKR_I8_CASE(7) UKR_I8_CASE(8)
#endif
#undef UKR_I8_CASE
      default:
        break;
      }
    }
  }
}

/* The int8 mode's step (32 multiply-adds) in 8 independent chains. */
static double ukr_peak_i8(long iters) {
  __m256i acc[8], a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
  for (int i = 0; i < 8; i++)
    acc[i] = _mm256_set1_epi32(i);
  for (long it = 0; it < iters; it++) {
    for (int i = 0; i < 8; i++)
      acc[i] = ukr_i8_dot(acc[i], a, b);
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  int sink = 0;
  for (int i = 0; i < 8; i++)
    sink += _mm256_extract_epi32(acc[i], 0);
  return (double)sink;
}

static double ukr_peak_macs(bool int8) {
  return int8 ? gqmm__cpu_time_peak(ukr_peak_i8, 32.0 * 8)
              : gqmm__cpu_time_peak(ukr_peak_fma, UKR_VW * 12.0);
}

#endif /* GQMM_UKR_X86_COMMON_H */
