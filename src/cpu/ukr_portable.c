/*
 * ukr_portable.c - the portable C instantiation of the micro-kernels: a
 * "vector" is 8 floats in a struct, each primitive a short loop the compiler
 * may vectorize for whatever the baseline target offers. Values unpack in
 * natural order through the bit-stream rule; it runs on any CPU and is the
 * fallback when no SIMD ISA is usable.
 */
#include "cpu_isa.h"

#include <string.h>

#define UKR_VW 8
#define UKR_OVERREAD 0
typedef struct {
  float v[UKR_VW];
} ukr_vf;

static inline ukr_vf vf_zero(void) {
  ukr_vf r;
  for (int i = 0; i < UKR_VW; i++)
    r.v[i] = 0.0f;
  return r;
}
static inline ukr_vf vf_load(const float *p) {
  ukr_vf r;
  memcpy(r.v, p, sizeof r.v);
  return r;
}
static inline void vf_store(float *p, ukr_vf a) {
  memcpy(p, a.v, sizeof a.v);
}
static inline ukr_vf vf_set1(float f) {
  ukr_vf r;
  for (int i = 0; i < UKR_VW; i++)
    r.v[i] = f;
  return r;
}
/* fmaf would be a libm call without hardware FMA: a*b+c rounds twice here,
 * which is within the tests' float32 tolerance. */
static inline ukr_vf vf_fma(ukr_vf a, ukr_vf b, ukr_vf c) {
  for (int i = 0; i < UKR_VW; i++)
    c.v[i] += a.v[i] * b.v[i];
  return c;
}
static inline ukr_vf vf_add(ukr_vf a, ukr_vf b) {
  for (int i = 0; i < UKR_VW; i++)
    a.v[i] += b.v[i];
  return a;
}
static inline float vf_hsum(ukr_vf a) {
  float s = 0.0f;
  for (int i = 0; i < UKR_VW; i++)
    s += a.v[i];
  return s;
}
static inline float ukr_f16_to_f32(uint16_t h) {
  return gqmm_f16_to_f32(h);
}
static inline ukr_vf vf_param(const void *p, gqmm_dtype t, int64_t i) {
  ukr_vf r;
  for (int l = 0; l < UKR_VW; l++)
    r.v[l] = gqmm__cpu_param(p, t, i + l, ukr_f16_to_f32);
  return r;
}
static inline ukr_vf vf_bcast_param(const void *p, gqmm_dtype t, int64_t i) {
  return vf_set1(gqmm__cpu_param(p, t, i, ukr_f16_to_f32));
}
static inline void unpack32(const uint8_t *src, int bits, ukr_vf q[32 / UKR_VW]) {
  for (int j = 0; j < 32; j++)
    q[j / UKR_VW].v[j % UKR_VW] = (float)gqmm__unpack(src, bits, j);
}

#include "ukr_template.h"
UKR_DEFINE_KERNELS(portable)

static bool portable_supported(void) {
  return true;
}

static void portable_perm(int bits, int perm[32]) {
  (void)bits;
  for (int j = 0; j < 32; j++)
    perm[j] = j;
}

static void portable_to_float(const void *src, gqmm_dtype t, int64_t n, float *dst) {
  gqmm__convert(dst, GQMM_F32, src, t, n);
}

static void portable_from_float(const float *src, gqmm_dtype t, int64_t n, void *dst) {
  gqmm__convert(dst, t, src, GQMM_F32, n);
}

static double portable_peak(long iters) {
  ukr_vf acc[4], a = vf_set1(1.0000001f), b = vf_set1(1e-7f);
  for (int i = 0; i < 4; i++)
    acc[i] = vf_set1((float)i);
  for (long it = 0; it < iters; it++) {
    for (int i = 0; i < 4; i++)
      acc[i] = vf_fma(acc[i], a, b);
    __asm__ volatile("" : : "r"(&a), "r"(&b) : "memory");
  }
  return (double)(vf_hsum(acc[0]) + vf_hsum(acc[1]) + vf_hsum(acc[2]) + vf_hsum(acc[3]));
}

static double portable_peak_macs(bool int8) {
  (void)int8;
  return gqmm__cpu_time_peak(portable_peak, UKR_VW * 4.0);
}

const gqmm__cpu_isa gqmm__cpu_isa_portable = {
    .name = "portable",
    .supported = portable_supported,
    .perm = portable_perm,
    .to_float = portable_to_float,
    .from_float = portable_from_float,
    .qmv = portable_qmv,
    .dequant = portable_dequant,
    .gemm = portable_gemm,
    .vw = UKR_VW,
    .qmv_i8 = NULL,
    .peak_macs = portable_peak_macs,
};
