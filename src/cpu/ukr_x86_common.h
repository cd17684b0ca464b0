/*
 * ukr_x86_common.h - pieces shared by the x86 ISA files, included after the
 * vector primitives (ukr_vf, vf_fma...) are defined: conversion of
 * activations and group parameters to float32 (F16C for f16; bf16 is the top
 * half of a float32), the int8 mode's kernels (ukr_i8_x86.h, whose
 * primitives the including file defines) and the peak loops the ceilings
 * measure.
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

/* dst[i] = src[i] rounded to dtype t: the rounding of gqmm__store_f, bit
 * for bit (bf16: round to nearest even on the bits, NaN -> 0x7fc0; 8 at a
 * time), f16 through it (its NaN encoding is not vcvtps2ph's). */
static void ukr_from_float(const float *src, gqmm_dtype t, int64_t n, void *dst) {
  int64_t i = 0;
  if (t == GQMM_F32) {
    memcpy(dst, src, (size_t)n * sizeof(float));
    return;
  }
  uint16_t *h = (uint16_t *)dst;
  if (t == GQMM_BF16) {
    const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    const __m256i qnan = _mm256_set1_epi32(0x7fc0);
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src + i));
      const __m256i up = _mm256_add_epi32(
          u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
      const __m256i r = _mm256_blendv_epi8(_mm256_srli_epi32(up, 16), qnan, nan);
      _mm_storeu_si128((__m128i *)(h + i),
                       _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
  }
  for (; i < n; i++)
    gqmm__store_f(dst, t, i, src[i]);
}

/* A peak loop fn: acc = STEP(acc, a, b) on 12 independent float-vector
 * chains (more than latency x throughput, 4 x 2 for the FMA), with a and b
 * (of type AT) opaque to the compiler every iteration, so it cannot drop or
 * fold the loop. */
#define UKR_PEAK_LOOP(fn, AT, a0, b0, STEP)    \
  static double fn(long iters) {               \
    ukr_vf acc[12];                            \
    AT a = a0, b = b0;                         \
    for (int i = 0; i < 12; i++)               \
      acc[i] = vf_set1((float)i);              \
    for (long it = 0; it < iters; it++) {      \
      for (int i = 0; i < 12; i++)             \
        acc[i] = STEP(acc[i], a, b);           \
      __asm__ volatile("" : "+v"(a), "+v"(b)); \
    }                                          \
    float sink = 0;                            \
    for (int i = 0; i < 12; i++)               \
      sink += vf_hsum(acc[i]);                 \
    return (double)sink;                       \
  }

/* The exact path's instruction: vector FMA. */
UKR_PEAK_LOOP(ukr_peak_fma, ukr_vf, vf_set1(1.0000001f), vf_set1(1e-7f), vf_fma)

#include "ukr_i8_x86.h"

static double ukr_peak_macs(bool int8) {
  return int8 ? gqmm__cpu_time_peak(ukr_peak_i8, 32.0 * UKR_I8_PEAK_CHAINS)
              : gqmm__cpu_time_peak(ukr_peak_fma, UKR_VW * 12.0);
}

#endif /* GQMM_UKR_X86_COMMON_H */
