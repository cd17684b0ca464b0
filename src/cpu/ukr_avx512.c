/*
 * ukr_avx512.c - AVX-512 micro-kernels (F/BW/VL/DQ + VNNI), compiled with
 * those flags only and dispatched only when the CPU reports all of them.
 * 16 float lanes and 32 zmm registers: the same template as AVX2 with twice
 * the lanes (a chunk is 2 vectors) and wider register tiles; weights unpack
 * through the AVX2 code and pair up, which keeps the AVX2 lane order. The
 * int8 mode uses VNNI's vpdpbusd (u8 x s8 -> s32 in one instruction).
 * Not measured on the development machine (no AVX-512 there): run
 * GQMM_CPU_ISA=avx512 build/gqmm_tests and `gqmm sweep --backend cpu` on one.
 */
#include "ukr_unpack_x86.h"

typedef __m512 ukr_vf;
#define UKR_VW 16
#define UKR_OVERREAD UKR_X86_OVERREAD

static inline ukr_vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline ukr_vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float *p, ukr_vf v) { _mm512_storeu_ps(p, v); }
static inline ukr_vf vf_set1(float f) { return _mm512_set1_ps(f); }
static inline ukr_vf vf_fma(ukr_vf a, ukr_vf b, ukr_vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline ukr_vf vf_add(ukr_vf a, ukr_vf b) { return _mm512_add_ps(a, b); }
static inline float vf_hsum(ukr_vf v) { return _mm512_reduce_add_ps(v); }
static inline float ukr_f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
static inline __attribute__((always_inline)) void unpack32(const uint8_t *src, int bits,
                                                          ukr_vf q[2]) {
  __m256i v[4];
  ukr_unpack32_i32(src, bits, v);
  for (int i = 0; i < 2; i++)
    q[i] = _mm512_cvtepi32_ps(_mm512_inserti64x4(_mm512_castsi256_si512(v[2 * i]), v[2 * i + 1], 1));
}

#include "ukr_template.h"
UKR_DEFINE_KERNELS(avx512)
#include "ukr_x86_common.h"

static bool avx512_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("fma");
}

/* int8 mode, 4-bit weights: as the AVX2 kernel, with vpdpbusd. */
static void avx512_qmv_i8(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rows, int nrows,
                          const int8_t *xq, const float *xs, const float *xsum, int R, float *C,
                          int64_t ldc) {
  const int gs = sh->group_size;
  const int64_t K = sh->K, G = K / gs;
  enum { RB = 8 };
  for (int n = 0; n < nrows; n++) {
    const gqmm__cpu_wrow *rw = &rows[n];
    for (int r0 = 0; r0 < R; r0 += RB) {
      const int rb = R - r0 < RB ? R - r0 : RB;
      __m256 tot[RB];
      float bsum[RB];
      for (int r = 0; r < RB; r++) {
        tot[r] = _mm256_setzero_ps();
        bsum[r] = 0.0f;
      }
      for (int64_t g = 0; g < G; g++) {
        __m256i acc[RB];
        for (int r = 0; r < RB; r++) acc[r] = _mm256_setzero_si256();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
          const __m256i wv = ukr_unpack32_u8_4bit(rw->w + k / 2);
          for (int r = 0; r < rb; r++)
            acc[r] = _mm256_dpbusd_epi32(acc[r], wv,
                                         _mm256_loadu_si256((const __m256i *)(xq + (r0 + r) * K + k)));
        }
        for (int r = 0; r < rb; r++) {
          const float sc = UKR_PARAM(rw->s, sh->dtype, g) * xs[(r0 + r) * G + g];
          tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(sc), tot[r]);
          bsum[r] += UKR_PARAM(rw->b, sh->dtype, g) * xsum[(r0 + r) * G + g];
        }
      }
      for (int r = 0; r < rb; r++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(tot[r]), _mm256_extractf128_ps(tot[r], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        C[(r0 + r) * ldc + n] = _mm_cvtss_f32(s) + bsum[r];
      }
    }
  }
}

/* int8 peak: 256-bit vpdpbusd (32 multiply-adds) in 10 chains. */
static double avx512_peak_i8(long iters) {
  __m256i acc[10], a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
  for (int i = 0; i < 10; i++) acc[i] = _mm256_set1_epi32(i);
  for (long it = 0; it < iters; it++) {
    for (int i = 0; i < 10; i++) acc[i] = _mm256_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  int sink = 0;
  for (int i = 0; i < 10; i++) sink += _mm256_extract_epi32(acc[i], 0);
  return (double)sink;
}

static double avx512_peak_macs(bool int8) {
  return int8 ? gqmm__cpu_time_peak(avx512_peak_i8, 32.0 * 10)
              : gqmm__cpu_time_peak(ukr_peak_fma, UKR_VW * 12.0);
}

const gqmm__cpu_isa gqmm__cpu_isa_avx512 = {
    .name = "avx512",
    .supported = avx512_supported,
    .perm = ukr_x86_perm,
    .to_float = ukr_to_float,
    .qmv = avx512_qmv,
    .dequant = avx512_dequant,
    .gemm = avx512_gemm,
    .vw = UKR_VW,
    .qmv_i8 = avx512_qmv_i8,
    .perm_i8 = ukr_x86_perm_i8,
    .peak_macs = avx512_peak_macs,
};
