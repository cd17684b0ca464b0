/*
 * ukr_avx512.c - AVX-512 micro-kernels (F/BW/VL/DQ + VNNI), compiled with
 * those flags only and dispatched only when the CPU reports all of them.
 * 16 float lanes and 32 zmm registers: the same template as AVX2 with twice
 * the lanes (a chunk is 2 vectors) and wider register tiles; weights unpack
 * through the AVX2 code and pair up, which keeps the AVX2 lane order. The
 * int8 mode uses VNNI's vpdpbusd (u8 x s8 -> s32 in one instruction); bf16
 * activations take vdpbf16ps on CPUs with AVX-512 BF16 (checked at run time:
 * this file is compiled with -mavx512bf16, only that kernel uses it).
 * Measured on a 2-core AVX-512 EPYC (docs/perf-notes.md, session 12).
 */
#include "cpu_isa.h"
#include "ukr_unpack_x86.h"

typedef __m512 ukr_vf;
#define UKR_VW 16
#define UKR_OVERREAD UKR_X86_OVERREAD

static inline ukr_vf vf_zero(void) {
  return _mm512_setzero_ps();
}
static inline ukr_vf vf_load(const float *p) {
  return _mm512_loadu_ps(p);
}
static inline void vf_store(float *p, ukr_vf v) {
  _mm512_storeu_ps(p, v);
}
static inline ukr_vf vf_set1(float f) {
  return _mm512_set1_ps(f);
}
static inline ukr_vf vf_param(const void *p, gqmm_dtype t, int64_t i) {
  if (t == GQMM_F32) return _mm512_loadu_ps((const float *)p + i);
  const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
  return t == GQMM_F16 ? _mm512_cvtph_ps(v)
                       : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
/* p[i] of dtype t broadcast: a 16-bit broadcast load, then vcvtph2ps, or
 * for bf16 a shift of each 32-bit lane (h << 16 | h) by 16 */
static inline ukr_vf vf_bcast_param(const void *p, gqmm_dtype t, int64_t i) {
  if (t == GQMM_F32) return _mm512_set1_ps(((const float *)p)[i]);
  const short v = (short)((const uint16_t *)p)[i];
  return t == GQMM_F16 ? _mm512_cvtph_ps(_mm256_set1_epi16(v))
                       : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_set1_epi16(v), 16));
}
static inline ukr_vf vf_fma(ukr_vf a, ukr_vf b, ukr_vf c) {
  return _mm512_fmadd_ps(a, b, c);
}
static inline ukr_vf vf_add(ukr_vf a, ukr_vf b) {
  return _mm512_add_ps(a, b);
}
static inline float vf_hsum(ukr_vf v) {
  return _mm512_reduce_add_ps(v);
}
static inline float ukr_f16_to_f32(uint16_t h) {
  return _cvtsh_ss(h);
}
static inline __attribute__((always_inline)) void unpack32(const uint8_t *src, int bits,
                                                           ukr_vf q[2]) {
  if (bits == 4) {
    /* The AVX2 lane order, one zmm per 8 bytes: lane j holds byte j % 8 (of
     * bytes 0-7, then 8-15) zero-extended, shifted by 0 (j < 8: low nibble)
     * or 4 (high), masked. The 16 bytes go to all four 128-bit blocks in one
     * load, so an in-block vpshufb reaches every byte: 4 instructions per
     * zmm instead of the 5 of two widened ymm halves joined by vinserti64x4. */
    const __m512i raw = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)src));
    const __m512i j = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i pick = _mm512_or_si512(j, _mm512_set1_epi32((int)0x80808000u));
    const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
    for (int i = 0; i < 2; i++) {
      const __m512i b = _mm512_shuffle_epi8(raw, _mm512_add_epi32(pick, _mm512_set1_epi32(8 * i)));
      q[i] =
          _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(b, sh), _mm512_set1_epi32(0x0f)));
    }
    return;
  }
  __m256i v[4];
  ukr_unpack32_i32(src, bits, v);
  for (int i = 0; i < 2; i++)
    q[i] =
        _mm512_cvtepi32_ps(_mm512_inserti64x4(_mm512_castsi256_si512(v[2 * i]), v[2 * i + 1], 1));
}

/* AVX-512 BF16: the chunk's q (integers <= 255, exact in bf16) as 32 bf16
 * lanes in the float vectors' order, and vdpbf16ps against 32 bf16 x. */
#define UKR_HAVE_BF16DOT 1
typedef __m512bh ukr_vbf;
static inline __attribute__((always_inline)) ukr_vbf ukr_q_to_bf16(const ukr_vf q[2]) {
  return _mm512_cvtne2ps_pbh(q[1], q[0]); /* low 16 lanes from q[0] */
}
static inline __attribute__((always_inline)) ukr_vf ukr_bf16_dot(ukr_vf acc, ukr_vbf qb,
                                                                 const uint16_t *xb) {
  return _mm512_dpbf16_ps(acc, qb, (ukr_vbf)_mm512_loadu_si512((const void *)xb));
}
/* 4- and 2-bit chunks go to bf16 directly, without float vectors: the
 * chunk's bytes in every 128-bit block (one broadcast load), vpshufb puts
 * word L's byte in its low half (high half zero), vpsrlvw brings word L's
 * field to the bottom, and vpermw maps the word's low 5 bits through a
 * 32-entry table to the bf16 of the field (entry i = bf16(i & mask), so the
 * bits above the field need no mask): 4 instructions for 32 values, where
 * unpack32 and vcvtne2ps2bf16 take 9. Same lanes as ukr_q_to_bf16 of
 * unpack32's vectors (ukr_x86_perm):
 *   4-bit: word L of block b (L = 8b + w) is byte 8(b >> 1) + w, shifted by
 *          4(b & 1) (blocks: low nibbles of bytes 0-7, their high nibbles,
 *          then bytes 8-15 likewise);
 *   2-bit: word L is byte w shifted by 2b (the chunk is 8 bytes, broadcast
 *          as one 64-bit word: nothing past the chunk is read). */
static inline bool ukr_bf16_direct(int bits) {
  return bits == 4 || bits == 2;
}
static inline __attribute__((always_inline)) ukr_vbf ukr_unpack32_bf16(const uint8_t *src,
                                                                       int bits) {
  /* bf16 of the integers 0..15, then again (index bit 4 is above a 4-bit field) */
#define UKR_BF16_0_15                                                                             \
  0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0, 0x4100, 0x4110, 0x4120, 0x4130, \
      0x4140, 0x4150, 0x4160, 0x4170
  static const uint16_t t4[32] = {UKR_BF16_0_15, UKR_BF16_0_15};
  static const uint16_t t2[32] = {0, 0x3f80, 0x4000, 0x4040, 0, 0x3f80, 0x4000, 0x4040,
                                  0, 0x3f80, 0x4000, 0x4040, 0, 0x3f80, 0x4000, 0x4040,
                                  0, 0x3f80, 0x4000, 0x4040, 0, 0x3f80, 0x4000, 0x4040,
                                  0, 0x3f80, 0x4000, 0x4040, 0, 0x3f80, 0x4000, 0x4040};
#undef UKR_BF16_0_15
  /* pick: per 128-bit block, word w takes byte base + w; -128 zeroes the high byte */
#define UKR_PICK(base)                                                                        \
  base, -128, base + 1, -128, base + 2, -128, base + 3, -128, base + 4, -128, base + 5, -128, \
      base + 6, -128, base + 7, -128
  static const int8_t pick4[64] = {UKR_PICK(0), UKR_PICK(0), UKR_PICK(8), UKR_PICK(8)};
  static const int8_t pick2[64] = {UKR_PICK(0), UKR_PICK(0), UKR_PICK(0), UKR_PICK(0)};
#undef UKR_PICK
  static const uint16_t sh4[32] = {0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4,
                                   0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4};
  static const uint16_t sh2[32] = {0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2,
                                   4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6};
  uint64_t w8;
  memcpy(&w8, src, 8);
  const __m512i raw = bits == 4 ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)src))
                                : _mm512_set1_epi64((long long)w8);
  const __m512i pick = _mm512_loadu_si512(bits == 4 ? (const void *)pick4 : (const void *)pick2);
  const __m512i sh = _mm512_loadu_si512(bits == 4 ? (const void *)sh4 : (const void *)sh2);
  const __m512i tab = _mm512_loadu_si512(bits == 4 ? (const void *)t4 : (const void *)t2);
  const __m512i field = _mm512_srlv_epi16(_mm512_shuffle_epi8(raw, pick), sh);
  return (ukr_vbf)_mm512_permutexvar_epi16(field, tab);
}

#include "ukr_template.h"
UKR_DEFINE_KERNELS(avx512)

/* ---- weight reuse for bf16 data (AVX-512 BF16): cpu_isa.h gemm_bf16 ----
 * The accumulators' lanes are 16 rows of x, so one output per lane and no
 * horizontal sums; each step is one 64-byte load of x pairs (16 rows) and
 * one vdpbf16ps per weight row against that row's pair broadcast from the
 * panel (a 32-bit broadcast operand). At a group's end one FMA folds in the
 * row's scale and one its bias times the rows' group sums. The panel is the
 * rows' exact bf16 q values, the qmv kernel's unpack stored instead of
 * used. */
static inline __attribute__((always_inline)) void
ukr_dequant_bf16_row(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *row, const int bits,
                     int64_t k0, int64_t kc, uint16_t *dst, float *s, float *b) {
  const int gs = sh->group_size;
  const int64_t last_k = sh->K - 32;
  for (int64_t k = k0; k < k0 + kc; k += 32) {
    /* the panel walks many rows kc values at a time, a stride the hardware
     * prefetchers miss: each chunk asks for the row's next block */
    if (k + kc < sh->K) __builtin_prefetch(row->w + gqmm__cpu_chunk_offset(bits, k + kc), 0, 3);
    const ukr_vbf qb = ukr_chunk_bf16(row->w, gqmm__cpu_chunk_offset(bits, k), bits, k == last_k);
    _mm512_storeu_si512(dst + (k - k0), (__m512i)qb);
  }
  for (int64_t g = k0 / gs; g < (k0 + kc) / gs; g++) {
    s[g - k0 / gs] = UKR_PARAM(row->s, sh->dtype, g);
    b[g - k0 / gs] = UKR_PARAM(row->b, sh->dtype, g);
  }
}
/* one instantiation per width: the unpack's tables and shifts are constants */
#define UKR_DEQ_BF16_CASE(b)                                 \
  case b:                                                    \
    ukr_dequant_bf16_row(sh, row, b, k0, kc, dst, s, bias); \
    break;
static void avx512_dequant_bf16(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *row, int64_t k0,
                                int64_t kc, uint16_t *dst, float *s, float *bias) {
  switch (sh->bits) {
    UKR_FOR_BITS(UKR_DEQ_BF16_CASE)
  default:
    break;
  }
}
#undef UKR_DEQ_BF16_CASE

static inline __attribute__((always_inline)) void
ukr_gemm_bf16_tile(const int nr, int64_t kc, const int gs, const uint32_t *xT, const uint16_t *P,
                   const float *s, const float *b, const float *xsT, float *Cv, int phase, float *C,
                   int64_t ldc, int rows) {
  enum { ldp = GQMM__CPU_BF16_KC, ldg = GQMM__CPU_BF16_KC / 32 };
  ukr_vf acc[GQMM__CPU_BF16_NR], tot[GQMM__CPU_BF16_NR];
  for (int n = 0; n < nr; n++)
    tot[n] = phase & GQMM__CPU_GEMM_FIRST ? vf_zero() : vf_load(Cv + 16 * n);
  const int pairs = gs / 2;
  for (int64_t g = 0; g < kc / gs; g++) {
    for (int n = 0; n < nr; n++)
      acc[n] = vf_zero();
    for (int64_t st = g * pairs; st < (g + 1) * pairs; st++) {
      const ukr_vbf xv = (ukr_vbf)_mm512_loadu_si512(xT + 16 * st);
      for (int n = 0; n < nr; n++) {
        int32_t qp;
        memcpy(&qp, P + n * ldp + 2 * st, 4);
        acc[n] = _mm512_dpbf16_ps(acc[n], xv, (ukr_vbf)_mm512_set1_epi32(qp));
      }
    }
    const ukr_vf xs = vf_load(xsT + 16 * g);
    for (int n = 0; n < nr; n++) {
      tot[n] = vf_fma(acc[n], vf_set1(s[n * ldg + g]), tot[n]);
      tot[n] = vf_fma(vf_set1(b[n * ldg + g]), xs, tot[n]);
    }
  }
  for (int n = 0; n < nr; n++) {
    if (!(phase & GQMM__CPU_GEMM_LAST)) {
      vf_store(Cv + 16 * n, tot[n]);
      continue;
    }
    float t[16];
    vf_store(t, tot[n]);
    for (int m = 0; m < rows; m++)
      C[m * ldc + n] = t[m];
  }
}

#define UKR_BF16_NR(n)                                                        \
  case n:                                                                     \
    ukr_gemm_bf16_tile(n, kc, gs, xT, P, s, b, xsT, Cv, phase, C, ldc, rows); \
    break;
static void avx512_gemm_bf16(int nr, int64_t kc, int gs, const uint32_t *xT, const uint16_t *P,
                             const float *s, const float *b, const float *xsT, float *Cv, int phase,
                             float *C, int64_t ldc, int rows) {
  switch (nr) {
    UKR_BF16_NR(1)
    UKR_BF16_NR(2) UKR_BF16_NR(3) UKR_BF16_NR(4) UKR_BF16_NR(5) UKR_BF16_NR(6) UKR_BF16_NR(7)
        UKR_BF16_NR(8) UKR_BF16_NR(9) UKR_BF16_NR(10) UKR_BF16_NR(11) UKR_BF16_NR(12) default
        : break;
  }
}
#undef UKR_BF16_NR
/* ---- packed weights (cpu_pack.c): cpu_isa.h packed ----
 * Lanes along weight rows: a slot vector (one 64-byte load) is 16 rows'
 * 32-bit slots, the even values of each in its low half-word and the odd
 * ones in its high half-word, so one shift of the slot vector by bits * j
 * brings field j of both halves to the bottom:
 *  - bf16 x (vdpbf16ps): (field & mask) | 0x4300 in each half is the bf16
 *    of 128 + q, exact (8 significant bits), so a pair (q[2j], q[2j + 1])
 *    of 16 rows is 2 simple instructions (a vpermw table lookup instead: 5
 *    cycles of latency on a shuffle port) and meets x's pair (k, k + 1)
 *    broadcast from its natural order. The offset is paid once a group:
 *    sum x (128 + q) = sum x q + 128 sum x, so the bias takes b - 128 s.
 *  - int8 mode (512-bit vpdpbusd): the field of every byte instead, four u8
 *    values a lane, (q[2j], q[2j + H], q[2j + 1], q[2j + 1 + H]) with
 *    H = 16 / bits, against x's codes in that order (pk_quant_i8), the
 *    tile's rows interleaved by quads (cpu_loops.c prep_x), so a step's
 *    quads of all rows sit in one line: 64 products an instruction; at a
 *    group's end the int32 sums become float and take s * xs.
 * Each unpacked vector feeds one instruction per row of x, and no lanes are
 * summed at the end; at a group's end every accumulator takes its rows'
 * scales and biases (a vector of 16 rows each) in two FMAs.
 * Tiles: mr rows x nv vectors (16 rows each) of the panel at pk (vectors
 * 4-7 are the next panel's 0-3): 1 row x 8 (two panels: 8 independent
 * chains; vdpbf16ps has ~6 cycles of latency at 2 a cycle); 2 x 4; 3-4 x 4
 * with the totals kept in C (in registers they spilled: 4 rows 3.8 -> 3.0
 * ms; int8 mode: in chunks of 2, cpu_isa.h); 5 x 8 in chunks of 3, 3 and 2
 * vectors (15 chains; int8 mode: 5 x 4 in chunks of 2, its 3-chunks ran
 * slower); 6-8 x 4 in chunks of 2 (each
 * unpack feeds 6-8 instructions; 6-8 x 4 accumulators do not fit the
 * registers). A chunk's
 * accumulators cover one group; the chunks of a record run one after the
 * other, so the call reads its panel once, at an even pace. (Before, 5-8
 * rows took a panel in two calls of 2 vectors each: the first streamed the
 * whole panel from memory at half the work, the second found it in L2 and
 * left the memory idle; qmm M = 8 went 70-72% -> 80-83% of its roofline.)
 * A row's operations do not depend on its tile. */
static inline __attribute__((always_inline)) ukr_vf ukr_pk_param(const uint8_t *p, gqmm_dtype t) {
  const __m256i h = _mm256_loadu_si256((const __m256i *)p);
  return t == GQMM_F16 ? _mm512_cvtph_ps(h)
                       : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
/* One chunk of a record: vectors c0 .. c0 + cw of the record at r0 (r1:
 * the next panel's) against the mr rows, its sums added to the totals (tot
 * or C) at the group's end; the first chunk of a record also prefetches the
 * slots' lines `ahead` bytes on (bf16). */
static inline __attribute__((always_inline)) void
ukr_pk_chunk(const gqmm__cpu_pkshape *ps, const uint8_t *r0, const uint8_t *r1, int64_t g,
             const int c0, const int cw, int64_t ahead, const int nv, const uint8_t *const *x,
             const int mr, const float *xs, const float *xsum, float *C, int64_t ldc, ukr_vf *tot,
             const bool in_c, const int bits, const bool i8) {
  const __m512i field = i8 ? _mm512_set1_epi8((char)((1u << bits) - 1u))
                           : _mm512_set1_epi16((short)((1u << bits) - 1u)),
                exp128 = _mm512_set1_epi16(0x4300); /* bf16 128.0: q joins its mantissa */
  const int gs = ps->group_size, slots = gs * bits / 32, per = 32 / bits; /* values a slot */
  const int steps = i8 ? per / 4 : per / 2; /* each takes 4 bytes of x: 2 bf16 or 4 codes */
  const int64_t G = ps->G, sbo = (int64_t)slots * GQMM__CPU_PANEL * 4; /* the record's scales */
  ukr_vf acc[16]; /* [m * cw + v] (<= 16: 1 x 8, 4 x 4, 5 x 3, 8 x 2): float sums, or int32 ones */
  for (int m = 0; m < mr; m++)
    for (int v = 0; v < cw; v++)
      acc[m * cw + v] = vf_zero();
  for (int d = 0; d < slots; d++) {
    __m512i T[8];
    for (int v = 0; v < cw; v++)
      T[v] = _mm512_loadu_si512((c0 + v < 4 ? r0 : r1) +
                                (d * GQMM__CPU_PANEL + 16 * ((c0 + v) & 3)) * 4);
    for (int l = 0; !i8 && c0 == 0 && l < (nv == 8 ? 8 : 4); l++)
      __builtin_prefetch((l < 4 ? r0 : r1) + ahead + (d * GQMM__CPU_PANEL + 16 * (l & 3)) * 4, 0,
                         3);
    const int64_t xb0 = (g * gs + d * per) * (i8 ? 1 : 2); /* the slot's first x byte */
    for (int j = 0; j < steps; j++) {
      __m512i w[8];
      for (int v = 0; v < cw; v++)
        w[v] = i8 ? _mm512_and_si512(_mm512_srli_epi32(T[v], (unsigned)(bits * j)), field)
                  : _mm512_ternarylogic_epi32(_mm512_srli_epi16(T[v], (unsigned)(bits * j)), field,
                                              exp128, 0xEA); /* (a & b) | c */
      for (int m = 0; m < mr; m++) {
        int32_t xp; /* a pair of bf16, or a quad of codes (the tile's quads interleaved) */
        memcpy(&xp, i8 ? x[0] + ((xb0 >> 2) + j) * (4 * mr) + 4 * m : x[m] + xb0 + 4 * j, 4);
        const __m512i xv = _mm512_set1_epi32(xp);
        for (int v = 0; v < cw; v++)
          acc[m * cw + v] = i8 ? _mm512_castsi512_ps(_mm512_dpbusd_epi32(
                                     _mm512_castps_si512(acc[m * cw + v]), w[v], xv))
                               : _mm512_dpbf16_ps(acc[m * cw + v], (ukr_vbf)w[v], (ukr_vbf)xv);
      }
    }
  }
  for (int v = 0; v < cw; v++) {
    const int c = c0 + v;
    const uint8_t *sb = (c < 4 ? r0 : r1) + sbo + 32 * (c & 3);
    const ukr_vf s = ukr_pk_param(sb, ps->dtype),
                 b = ukr_pk_param(sb + 2 * GQMM__CPU_PANEL, ps->dtype);
    const ukr_vf bb = i8 ? b : vf_fma(vf_set1(-128.0f), s, b);
    for (int m = 0; m < mr; m++) {
      const ukr_vf a =
          i8 ? _mm512_cvtepi32_ps(_mm512_castps_si512(acc[m * cw + v])) : acc[m * cw + v];
      const ukr_vf sm = i8 ? _mm512_mul_ps(s, vf_set1(xs[m * G + g])) : s;
      ukr_vf t = in_c ? vf_load(C + m * ldc + 16 * c) : tot[m * nv + c];
      t = vf_fma(bb, vf_set1(xsum[m * G + g]), vf_fma(a, sm, t));
      if (in_c)
        vf_store(C + m * ldc + 16 * c, t);
      else
        tot[m * nv + c] = t;
    }
  }
}
/* x: rows as bytes (bf16 values, or int8 codes with i8); xs: int8 mode's
 * code scales (row m at xs + m * G). The nv vectors go in chunks of cw
 * (the last one nv % cw where that is not 0), all chunks of a record before
 * the next record. */
static inline __attribute__((always_inline)) void
ukr_packed_tile(const gqmm__cpu_pkshape *ps, const uint8_t *pk, const int nv, const int cw,
                const uint8_t *const *x, const int mr, const float *xs, const float *xsum, float *C,
                int64_t ldc, const int bits, const bool i8) {
  const int slots = ps->group_size * bits / 32;
  const int64_t G = ps->G, rec = ps->rec;
  const bool two = nv == 8; /* a second panel */
  /* the totals in C for more than 12 of them (3-4 x 4 and 5-8 x 4: in
   * registers they spilled) */
  const bool in_c = mr * nv > 12;
  ukr_vf tot[12]; /* [m * nv + v], where they stay in registers */
  for (int m = 0; m < mr; m++)
    for (int v = 0; v < nv; v++) {
      if (in_c)
        vf_store(C + m * ldc + 16 * v, vf_zero());
      else
        tot[m * nv + v] = vf_zero();
    }
  for (int64_t g = 0; g < G; g++) {
    const uint8_t *r0 = pk + g * rec, *r1 = r0 + ps->panel_bytes;
    /* prefetch, GQMM__CPU_PK_PREFETCH records ahead. bf16: each slot's lines
     * beside its loads, by the first chunk (a loop over the record's lines
     * was 15-25% of the instructions; M = 1 -7%). int8 (half the work a
     * line): that loop measured 5% faster at 8-16 rows. */
    const int64_t ahead = GQMM__CPU_PK_PREFETCH * rec;        /* past the panel too: cpu_isa.h */
    const int64_t sbo = (int64_t)slots * GQMM__CPU_PANEL * 4; /* the record's scales */
    for (int64_t l = i8 ? 0 : sbo; l < rec; l += 64) {
      __builtin_prefetch(r0 + ahead + l, 0, 3);
      if (two) __builtin_prefetch(r1 + ahead + l, 0, 3);
    }
    int c0 = 0;
    for (; c0 + cw <= nv; c0 += cw)
      ukr_pk_chunk(ps, r0, r1, g, c0, cw, ahead, nv, x, mr, xs, xsum, C, ldc, tot, in_c, bits, i8);
    if (nv % cw)
      ukr_pk_chunk(ps, r0, r1, g, c0, nv % cw, ahead, nv, x, mr, xs, xsum, C, ldc, tot, in_c, bits,
                   i8);
  }
  for (int m = 0; m < mr && !in_c; m++)
    for (int v = 0; v < nv; v++)
      vf_store(C + m * ldc + 16 * v, tot[m * nv + v]);
}
/* one instantiation per (mode, bits, rows, vectors): the loops' bounds are constants */
#define UKR_PK_CASE(b, m, n)                                                                   \
  case ((b)*10 + (m)) * 10 + (n):                                                              \
    ukr_packed_tile(ps, pk, n, GQMM__CPU_PK_CHUNK(m, n, UKR_PK_I8), x, m, xs, xsum, C, ldc, b, \
                    UKR_PK_I8);                                                                \
    break;
#define UKR_PK_BITS(b)                                                                \
  UKR_PK_CASE(b, 1, 8)                                                                \
  UKR_PK_CASE(b, 1, 4)                                                                \
  UKR_PK_CASE(b, 2, 4)                                                                \
  UKR_PK_CASE(b, 3, 4)                                                                \
  UKR_PK_CASE(b, 4, 4)                                                                \
  UKR_PK_CASE(b, 5, 8) UKR_PK_CASE(b, 5, 4) UKR_PK_CASE(b, 6, 4) UKR_PK_CASE(b, 7, 4) \
      UKR_PK_CASE(b, 8, 4)
#define UKR_PK_SWITCH                       \
  switch ((ps->bits * 10 + mr) * 10 + nv) { \
    UKR_PK_BITS(4)                          \
    UKR_PK_BITS(2)                          \
  default:                                  \
    break;                                  \
  }
static void avx512_packed(const gqmm__cpu_pkshape *ps, const uint8_t *pk, int nv,
                          const uint8_t *const *x, int mr, const float *xs, const float *xsum,
                          float *C, int64_t ldc) {
  if (xs) {
#define UKR_PK_I8 true
    UKR_PK_SWITCH
#undef UKR_PK_I8
  } else {
#define UKR_PK_I8 false
    UKR_PK_SWITCH
#undef UKR_PK_I8
  }
}
#undef UKR_PK_SWITCH
#undef UKR_PK_CASE
#undef UKR_PK_BITS
static void avx512_pk_quant_i8(const float *x, int64_t K, int gs, int bits, int8_t *xq, float *xs) {
  /* quads of 16 codes: (0, 4, 1, 5, 2, 6, 3, 7) per 8-value 4-bit slot,
   * (0, 8, 1, 9, ... 7, 15) per 16-value 2-bit slot */
  const __m128i quads = bits == 4
                            ? _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15)
                            : _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t g = 0; g < K / gs; g++) {
    const float *t = x + g * gs;
    __m512 m = vf_zero();
    for (int i = 0; i < gs; i += 16) /* max(x, m) keeps m where x is NaN, as quant_i8's */
      m = _mm512_max_ps(_mm512_andnot_ps(sign, vf_load(t + i)), m);
    const float amax = _mm512_reduce_max_ps(m);
    const ukr_vf inv = vf_set1(amax > 0.0f ? 127.0f / amax : 0.0f);
    xs[g] = amax / 127.0f;
    for (int i = 0; i < gs; i += 16) { /* round to nearest even, saturate as the packs there */
      const __m128i c =
          _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(vf_load(t + i), inv)));
      _mm_storeu_si128((__m128i *)(xq + g * gs + i), _mm_shuffle_epi8(c, quads));
    }
  }
}

/* VNNI: four u8 x s8 products summed into each int32 lane in one
 * instruction, so the kernels' group sums are int32 from the start. The
 * 256-bit form keeps the AVX2 lanes (same bits as there) and, with AVX-512VL,
 * 32 ymm registers for the tiles. */
static inline __m256i ukr_i8_dot(__m256i acc, __m256i w, __m256i x) {
  return _mm256_dpbusd_epi32(acc, w, x);
}
typedef __m256i ukr_i8_acc;
static inline __m256i ukr_i8_zero(void) {
  return _mm256_setzero_si256();
}
static inline __m256i ukr_i8_step(__m256i acc, __m256i w, __m256i x) {
  return _mm256_dpbusd_epi32(acc, w, x);
}
static inline __m256i ukr_i8_finish(__m256i acc) {
  return acc;
}
#define UKR_I8_ROWS 8 /* 32 registers */
#define UKR_I8_MR 4   /* panel tile: 12 group sums + 12 totals + 3 weight vectors + x */
#define UKR_I8_NR 3
#define UKR_I8_PEAK_CHAINS 12 /* vpdpbusd: 5 cycles latency, 2 per cycle */
#include "ukr_x86_common.h"

/* 512-bit vpdpbusd, the packed int8 kernel's instruction (64 multiply-adds
 * a lane set); the MLX-layout int8 kernels use its 256-bit form */
static inline __m512i ukr_dpbusd512(__m512i acc, __m512i w, __m512i x) {
  return _mm512_dpbusd_epi32(acc, w, x);
}
static double ukr_peak_i8z(long iters) {
  __m512i acc[12], x[12], w = _mm512_set1_epi8(3);
  for (int i = 0; i < 12; i++) {
    acc[i] = _mm512_setzero_si512();
    x[i] = _mm512_set1_epi8((char)(i + 1));
  }
  for (long it = 0; it < iters; it++) {
    for (int i = 0; i < 12; i++)
      acc[i] = ukr_dpbusd512(acc[i], w, x[i]);
    __asm__ volatile("" : "+v"(w));
  }
  int sink = 0;
  for (int i = 0; i < 12; i++)
    sink += _mm_cvtsi128_si32(_mm512_castsi512_si128(acc[i]));
  return (double)sink;
}
static double avx512_peak_macs(bool int8) {
  return int8 ? gqmm__cpu_time_peak(ukr_peak_i8z, 64.0 * 12) : ukr_peak_macs(false);
}

/* vdpbf16ps (run only where avx512_bf16_supported()) */
UKR_PEAK_LOOP(ukr_peak_dp, ukr_vbf, (ukr_vbf)_mm512_set1_epi16(0x3f80),
              (ukr_vbf)_mm512_set1_epi16(0x3380), _mm512_dpbf16_ps)
static double avx512_peak_bf16(void) {
  return gqmm__cpu_time_peak(ukr_peak_dp, 32.0 * 12);
}

static bool avx512_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("fma");
}

static bool avx512_bf16_supported(void) {
  __builtin_cpu_init();
  return avx512_supported() && __builtin_cpu_supports("avx512bf16");
}

const gqmm__cpu_isa gqmm__cpu_isa_avx512 = {
    .name = "avx512",
    .supported = avx512_supported,
    .perm = ukr_x86_perm,
    .to_float = ukr_to_float,
    .from_float = ukr_from_float,
    .qmv = avx512_qmv,
    .qmv_bf16 = avx512_qmv_bf16,
    .qmv_bf16_supported = avx512_bf16_supported,
    .dequant = avx512_dequant,
    .gemm = avx512_gemm,
    .dequant_bf16 = avx512_dequant_bf16,
    .gemm_bf16 = avx512_gemm_bf16,
    .packed = avx512_packed,
    .pk_quant_i8 = avx512_pk_quant_i8,
    .vw = UKR_VW,
    UKR_I8_ISA_FIELDS,
    .peak_macs = avx512_peak_macs,
    .i8_what = "int8 vpdpbusd (512-bit)",
    .peak_bf16 = avx512_peak_bf16,
};
