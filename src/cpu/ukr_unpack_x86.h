/*
 * ukr_unpack_x86.h - AVX2 unpacking of one 32-value chunk of MLX-packed
 * weights into 4 vectors of 8 int32, shared by the AVX2 and AVX-512 kernels
 * (the AVX-512 file pairs the vectors up, which keeps the same lane order;
 * for 4 bits it builds the same pairs directly, see ukr_avx512.c).
 *
 * Lane order (perm) per width, j = 8 * vector + lane:
 *   4-bit: bytes 0-7 widen to vectors 0 (low nibbles: even values) and 1
 *          (high nibbles: odd values), bytes 8-15 to vectors 2 and 3:
 *          vector v holds values (v >> 1) * 16 + 2 * lane + (v & 1).
 *   2-bit: byte i holds values 4i..4i+3: vector v = shift 2v, value 4 * lane + v.
 *   8-bit, 3/5/6-bit: natural order. The odd widths take 8 values from
 *          `bits` bytes as two 32-bit words (values 0-3 from byte 0, values
 *          4-7 from byte 4*bits/8) and one variable shift per lane; the
 *          second word reads up to 2 bytes past the chunk (UKR_OVERREAD).
 */
#ifndef GQMM_UKR_UNPACK_X86_H
#define GQMM_UKR_UNPACK_X86_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define UKR_X86_OVERREAD 2

static inline __attribute__((always_inline)) int32_t ukr_load32(const uint8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

static inline __attribute__((always_inline)) void ukr_unpack32_i32(const uint8_t *src, int bits,
                                                                   __m256i v[4]) {
  if (bits == 4) {
    /* each byte widened to a lane, then its two nibbles: 10 instructions with
     * the converts, the floor for this lane order; a broadcast + 2 vpshufb
     * placement, or fewer shifts by converts with exact float fix-ups, measured
     * 2-11% slower (docs/perf-notes.md, "CPU exact qmv unpack") */
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)src));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + 8)));
    const __m256i m = _mm256_set1_epi32(0x0f);
    v[0] = _mm256_and_si256(b0, m);
    v[1] = _mm256_srli_epi32(b0, 4);
    v[2] = _mm256_and_si256(b1, m);
    v[3] = _mm256_srli_epi32(b1, 4);
  } else if (bits == 8) {
    for (int i = 0; i < 4; i++)
      v[i] = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + 8 * i)));
  } else if (bits == 2) {
    const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)src));
    const __m256i m = _mm256_set1_epi32(3);
    for (int s = 0; s < 4; s++)
      v[s] = _mm256_and_si256(_mm256_srli_epi32(z, 2 * s), m);
  } else {
    const int r = (4 * bits) % 8, hb = 4 * bits / 8;
    const __m256i sh =
        _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, r, r + bits, r + 2 * bits, r + 3 * bits);
    const __m256i m = _mm256_set1_epi32((1 << bits) - 1);
    for (int i = 0; i < 4; i++) {
      const uint8_t *p = src + bits * i;
      const __m256i w =
          _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi32(ukr_load32(p))),
                                  _mm_set1_epi32(ukr_load32(p + hb)), 1);
      v[i] = _mm256_and_si256(_mm256_srlv_epi32(w, sh), m);
    }
  }
}

/* Sum of the 8 lanes. */
static inline float ukr_hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* The lane order above as a table: perm[j] = value index of lane j. */
static inline void ukr_x86_perm(int bits, int perm[32]) {
  for (int j = 0; j < 32; j++) {
    const int v = j / 8, l = j % 8;
    if (bits == 4)
      perm[j] = (v >> 1) * 16 + 2 * l + (v & 1);
    else if (bits == 2)
      perm[j] = 4 * l + v;
    else
      perm[j] = j;
  }
}

/* int8 mode, 4-bit weights: 16 bytes -> 32 unsigned bytes, low nibbles
 * (even values) in the low half, high nibbles (odd values) in the high half:
 * the 16 bytes loaded into both halves (vbroadcasti128, a load), the high
 * half shifted by 4 (vpsrlvd), both masked: 3 instructions instead of 5
 * (load, shift, two ands, vinserti128), qmv_i8 +11-19%. */
static inline __attribute__((always_inline)) __m256i ukr_unpack32_u8_4bit(const uint8_t *src) {
  const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)src));
  return _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                          _mm256_set1_epi8(0x0f));
}

#endif /* GQMM_UKR_UNPACK_X86_H */
