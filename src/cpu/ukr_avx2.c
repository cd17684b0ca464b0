/*
 * ukr_avx2.c - AVX2 + FMA + F16C micro-kernels (compiled with those flags
 * only; dispatched only when the CPU reports them). 8 float lanes, 16 ymm
 * registers: the gemm tile is at most 6 x 2 or 4 x 3 accumulators (+ loads).
 * The int8 mode multiplies unsigned 4-bit weights by signed int8
 * activations with vpmaddubsw (pairs, exact in int16: 2*15*127 < 2^15) and
 * widens with vpmaddwd, the AVX2 stand-in for VNNI's vpdpbusd.
 */
#include "ukr_unpack_x86.h"

typedef __m256 ukr_vf;
#define UKR_VW 8
#define UKR_OVERREAD UKR_X86_OVERREAD

static inline ukr_vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline ukr_vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float *p, ukr_vf v) { _mm256_storeu_ps(p, v); }
static inline ukr_vf vf_set1(float f) { return _mm256_set1_ps(f); }
static inline ukr_vf vf_fma(ukr_vf a, ukr_vf b, ukr_vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline ukr_vf vf_add(ukr_vf a, ukr_vf b) { return _mm256_add_ps(a, b); }
static inline float vf_hsum(ukr_vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline float ukr_f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
static inline __attribute__((always_inline)) void unpack32(const uint8_t *src, int bits,
                                                          ukr_vf q[4]) {
  __m256i v[4];
  ukr_unpack32_i32(src, bits, v);
  for (int i = 0; i < 4; i++) q[i] = _mm256_cvtepi32_ps(v[i]);
}

#include "ukr_template.h"
UKR_DEFINE_KERNELS(avx2)
#include "ukr_x86_common.h"


static bool avx2_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

/* int8 mode: one weight row, rows of x in blocks of 4 (registers). */
static void avx2_qmv_i8(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rows, int nrows,
                        const int8_t *xq, const float *xs, const float *xsum, int R, float *C,
                        int64_t ldc) {
  const int gs = sh->group_size;
  const int64_t K = sh->K, G = K / gs;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int n = 0; n < nrows; n++) {
    const gqmm__cpu_wrow *rw = &rows[n];
    for (int r0 = 0; r0 < R; r0 += 4) {
      const int rb = R - r0 < 4 ? R - r0 : 4;
      __m256 tot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
      float bsum[4] = {0, 0, 0, 0};
      for (int64_t g = 0; g < G; g++) {
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
          const __m256i wv = ukr_unpack32_u8_4bit(rw->w + k / 2);
          for (int r = 0; r < rb; r++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (r0 + r) * K + k));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
          }
        }
        for (int r = 0; r < rb; r++) {
          const float sc = UKR_PARAM(rw->s, sh->dtype, g) * xs[(r0 + r) * G + g];
          tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(sc), tot[r]);
          bsum[r] += UKR_PARAM(rw->b, sh->dtype, g) * xsum[(r0 + r) * G + g];
        }
      }
      for (int r = 0; r < rb; r++) C[(r0 + r) * ldc + n] = vf_hsum(tot[r]) + bsum[r];
    }
  }
}

/* The int8 peak loop: the (vpmaddubsw, vpmaddwd, vpaddd) step the kernel
 * uses, 32 multiply-adds each, in 8 independent chains. */
static double avx2_peak_i8(long iters) {
  __m256i acc[8], a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
  for (int i = 0; i < 8; i++) acc[i] = _mm256_set1_epi32(i);
  for (long it = 0; it < iters; it++) {
    for (int i = 0; i < 8; i++)
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  int sink = 0;
  for (int i = 0; i < 8; i++) sink += _mm256_extract_epi32(acc[i], 0);
  return (double)sink;
}

static double avx2_peak_macs(bool int8) {
  return int8 ? gqmm__cpu_time_peak(avx2_peak_i8, 32.0 * 8) : gqmm__cpu_time_peak(ukr_peak_fma, UKR_VW * 12.0);
}

const gqmm__cpu_isa gqmm__cpu_isa_avx2 = {
    .name = "avx2",
    .supported = avx2_supported,
    .perm = ukr_x86_perm,
    .to_float = ukr_to_float,
    .qmv = avx2_qmv,
    .dequant = avx2_dequant,
    .gemm = avx2_gemm,
    .vw = UKR_VW,
    .qmv_i8 = avx2_qmv_i8,
    .perm_i8 = ukr_x86_perm_i8,
    .peak_macs = avx2_peak_macs,
};
