/*
 * ukr_avx2.c - AVX2 + FMA + F16C micro-kernels (compiled with those flags
 * only; dispatched only when the CPU reports them). 8 float lanes, 16 ymm
 * registers: the gemm tile is at most 6 x 2 or 4 x 3 accumulators (+ loads).
 * The int8 mode multiplies unsigned 4-bit weights by signed int8
 * activations with vpmaddubsw (pairs, exact in int16: 2*15*127 < 2^15) and
 * widens with vpmaddwd, the AVX2 stand-in for VNNI's vpdpbusd.
 */
#include "cpu_isa.h"
#include "ukr_unpack_x86.h"

typedef __m256 ukr_vf;
#define UKR_VW 8
#define UKR_OVERREAD UKR_X86_OVERREAD

static inline ukr_vf vf_zero(void) {
  return _mm256_setzero_ps();
}
static inline ukr_vf vf_load(const float *p) {
  return _mm256_loadu_ps(p);
}
static inline void vf_store(float *p, ukr_vf v) {
  _mm256_storeu_ps(p, v);
}
static inline ukr_vf vf_set1(float f) {
  return _mm256_set1_ps(f);
}
static inline ukr_vf vf_param(const void *p, gqmm_dtype t, int64_t i) {
  if (t == GQMM_F32) return _mm256_loadu_ps((const float *)p + i);
  const __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
  return t == GQMM_F16 ? _mm256_cvtph_ps(v)
                       : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
/* p[i] of dtype t broadcast: bf16 and f16 as a 16-bit broadcast load, then
 * a shift or vcvtph2ps (2 instructions instead of a scalar load, shift,
 * move and broadcast) */
static inline ukr_vf vf_bcast_param(const void *p, gqmm_dtype t, int64_t i) {
  if (t == GQMM_F32) return _mm256_broadcast_ss((const float *)p + i);
  const __m128i h = _mm_set1_epi16((short)((const uint16_t *)p)[i]);
  return t == GQMM_F16 ? _mm256_cvtph_ps(h)
                       : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set_m128i(h, h), 16));
}
static inline ukr_vf vf_fma(ukr_vf a, ukr_vf b, ukr_vf c) {
  return _mm256_fmadd_ps(a, b, c);
}
static inline ukr_vf vf_add(ukr_vf a, ukr_vf b) {
  return _mm256_add_ps(a, b);
}
static inline float vf_hsum(ukr_vf v) {
  return ukr_hsum256(v);
}
static inline float ukr_f16_to_f32(uint16_t h) {
  return _cvtsh_ss(h);
}
static inline __attribute__((always_inline)) void unpack32(const uint8_t *src, int bits,
                                                           ukr_vf q[4]) {
  __m256i v[4];
  ukr_unpack32_i32(src, bits, v);
  for (int i = 0; i < 4; i++)
    q[i] = _mm256_cvtepi32_ps(v[i]);
}

#include "ukr_template.h"
UKR_DEFINE_KERNELS(avx2)
/* vpmaddubsw: u8 x s8 pairs into int16 (exact: 2 * 15 * 127 < 2^15), then
 * vpmaddwd by ones widens pairs into int32: AVX2's stand-in for vpdpbusd. */
static inline __m256i ukr_i8_dot(__m256i acc, __m256i w, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
/* The kernels widen once per group instead: int16 pair sums added over the
 * group's chunks (<= 4 x 3810 < 2^15), one vpmaddwd at the group's end. */
typedef __m256i ukr_i8_acc;
static inline __m256i ukr_i8_zero(void) {
  return _mm256_setzero_si256();
}
static inline __m256i ukr_i8_step(__m256i acc, __m256i w, __m256i x) {
  acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x));
  /* an empty asm: the sum stays a chain (GCC otherwise reassociates a group's
   * additions into a tree, all products live at once: spills at 128 values;
   * the 3x2 tile at g128 measured 1.3x faster with the chain) */
  __asm__("" : "+x"(acc));
  return acc;
}
static inline __m256i ukr_i8_finish(__m256i acc) {
  return _mm256_madd_epi16(acc, _mm256_set1_epi16(1));
}
#define UKR_I8_ROWS 4 /* 16 ymm: 4 group sums + 4 float totals + operands */
#define UKR_I8_MR 3   /* panel tile: 6 group sums + 6 totals + 2 weight vectors + x + ones */
#define UKR_I8_NR 2
#define UKR_I8_PEAK_CHAINS 6 /* the step reaches acc through vpaddd only (1 cycle) */
#include "ukr_x86_common.h"

static bool avx2_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

const gqmm__cpu_isa gqmm__cpu_isa_avx2 = {
    .name = "avx2",
    .supported = avx2_supported,
    .perm = ukr_x86_perm,
    .to_float = ukr_to_float,
    .from_float = ukr_from_float,
    .qmv = avx2_qmv,
    .dequant = avx2_dequant,
    .gemm = avx2_gemm,
    .vw = UKR_VW,
    UKR_I8_ISA_FIELDS,
    .peak_macs = ukr_peak_macs,
    .i8_what = "int8 vpmaddubsw+vpmaddwd",
};
