/*
 * wfmt.cuh - how the tensor-core kernels pull weight pairs out of packed
 * words and dequantize them in registers (qmm_mma.cu, qmm_wgmma.cu).
 *
 * A lane holds 32 values of a row (4*BITS bytes). One shift-and-mask pulls
 * pair pi (0..15) out as two q values in the low bits of each 16-bit half
 * ((w >> 4j) & 0x000F000F gives values j and j+4 of a 4-bit word); OR-ed
 * into the mantissa of a magic constant (bf16 128.0, f16 1024.0) in the
 * same lop3, minus the constant, times the scale plus the bias (one packed
 * FMA), it is two dequantized values, exact as MLX's dequantize. Packs with
 * pre-scaled scales skip the constant ("linear dequantization" below: one
 * AND and one FMA per pair).
 */
#ifndef GQMM_CUDA_WFMT_CUH
#define GQMM_CUDA_WFMT_CUH

#include "ptx.cuh"

#include <type_traits>

namespace gqmm_cu {

constexpr int kStageK = 128;  /* k per pipeline stage: 4 lanes x 32 values */
constexpr int kXRowBytes = kStageK * 2; /* one token's x for a stage (16-bit types) */

/* How a BITS-wide format is split and reassembled (see the header comment). */
template <int BITS> struct wfmt {
  static constexpr int bytes = 4 * BITS; /* 32 values of one row */
  /* cp.async size: rows of 3-bit values are only 4-byte aligned. */
  static constexpr int unit = BITS == 3 ? 4 : (bytes < 16 ? bytes : 16);
  static constexpr int units = bytes / unit;
  /* 2/3-bit pair values 8 or 16 apart, so one phase spans two x chunks. */
  static constexpr int phases = (BITS == 2 || BITS == 3) ? 2 : 4;
  static constexpr int steps = 8 / phases;  /* MMA k-steps per phase */
  static constexpr int chunks = 4 / phases; /* 16-byte x chunks per phase */
  static __device__ __forceinline__ int chunk(int p, int i) {
    return BITS == 2 ? 2 * p + i : BITS == 3 ? p + 2 * i : p;
  }
  /* x registers (pairs of values) holding the two halves of b0/b1 of step sl */
  static __host__ __device__ constexpr int ia(int sl) { return BITS == 8 ? 2 * sl : sl; }
  static __host__ __device__ constexpr int ib(int sl) { return BITS == 8 ? 2 * sl + 1 : BITS == 4 ? sl + 2 : sl + 4; }

  /* Linear dequantization (lin_dequant below): pair j of a word (pi % per
   * word) is masked in place at bit lin_pos(j) of its half-words, taken
   * from the word shifted right by BITS j - lin_pos(j) (left if negative).
   * 4-bit: nibbles 0/1 of each byte at bits 0 and 4, one shift by 8 a word
   * (was 3); 2-bit: bits 4 and 6, shifts by -4, 4 and 8 (was 7); 8-bit:
   * bit 0, as before. 3-bit: bit 0, shifted there as pair() does, minus the
   * magic constant (so minus its subtraction: one instruction a pair). */
  static constexpr bool lin_ok = true;
  static constexpr int lin_base = BITS == 2 ? 4 : 0;
  static constexpr int lin_step = BITS == 2 ? 2 : BITS == 4 ? 4 : 0;
  static __host__ __device__ constexpr int lin_pos(int j) { return lin_base + lin_step * (j & 1); }
  /* Pair pi's two values in place at bit lin_pos of each half (no magic). */
  static __device__ __forceinline__ uint32_t pair_lin(const uint32_t *q, int pi) {
    if constexpr (BITS == 3) {
      return pair(q, pi, 0u);
    } else {
      constexpr int per_word = 16 / BITS;
      constexpr uint32_t mask = ((1u << BITS) - 1u) * 0x00010001u;
      const int j = pi % per_word, p = lin_pos(j), sh = BITS * j - p;
      const uint32_t w = q[pi / per_word];
      return (sh >= 0 ? w >> sh : w << -sh) & (mask << p);
    }
  }

  /* 3-bit: regroup 96 bits so lane 0 of each word holds values 0..15's
   * stream and lane 1 values 16..31's (16 bits per lane per word). */
  static __device__ __forceinline__ void prep(uint32_t *q) {
    if constexpr (BITS == 3) {
      uint32_t t0 = prmt(q[0], q[1], 0x7610), t1 = prmt(q[0], q[2], 0x5432),
               t2 = prmt(q[1], q[2], 0x7610);
      q[0] = t0, q[1] = t1, q[2] = t2;
    }
  }
  /* Pair pi (0..15) as two q values in the low bits of each 16-bit lane,
   * OR-ed with the magic constant m (one lop3 for shift-free formats). */
  static __device__ __forceinline__ uint32_t pair(const uint32_t *q, int pi, uint32_t m) {
    if constexpr (BITS == 3) {
      const int bit = 3 * pi, c = bit >> 4, off = bit & 15;
      if (off <= 13) return and_or(q[c] >> off, 0x00070007u, m);
      const uint32_t lo_mask = ((1u << (16 - off)) - 1u) * 0x00010001u;
      return ((q[c] >> off) & lo_mask) | ((q[c + 1] << (16 - off)) & (0x00070007u & ~lo_mask)) | m;
    } else {
      constexpr int per_word = 16 / BITS; /* pairs per word */
      constexpr uint32_t mask = ((1u << BITS) - 1u) * 0x00010001u;
      return and_or(q[pi / per_word] >> (BITS * (pi % per_word)), mask, m);
    }
  }
};

/* Value j of a row's little-endian bit stream of `bits`-wide values (the
 * MLX layout; the generic kernel and the packer read single values). */
__device__ __forceinline__ uint32_t stream_value(const uint8_t *row, int bits, int64_t j) {
  const int64_t bit = j * bits;
  const uint8_t *p = row + (bit >> 3);
  const int shift = (int)(bit & 7);
  uint32_t v = p[0];
  if (shift + bits > 8) v |= (uint32_t)p[1] << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

/* UNIT bytes (16, 8 or 4) from shared memory at p into q[0 .. UNIT / 4). */
template <int UNIT> __device__ __forceinline__ void load_words(const uint8_t *p, uint32_t *q) {
  static_assert(UNIT == 16 || UNIT == 8 || UNIT == 4, "a 16-, 8- or 4-byte load");
  if constexpr (UNIT == 16) {
    const uint4 v = *reinterpret_cast<const uint4 *>(p);
    q[0] = v.x, q[1] = v.y, q[2] = v.z, q[3] = v.w;
  } else if constexpr (UNIT == 8) {
    const uint2 v = *reinterpret_cast<const uint2 *>(p);
    q[0] = v.x, q[1] = v.y;
  } else {
    q[0] = *reinterpret_cast<const uint32_t *>(p);
  }
}

/* The BITS words of copy unit u of a lane's 32 values from shared memory at
 * p, into q[F::unit / 4 * u ..]. */
template <int BITS>
__device__ __forceinline__ void load_lane_unit(const uint8_t *p, int u, uint32_t *q) {
  load_words<wfmt<BITS>::unit>(p, q + wfmt<BITS>::unit / 4 * u);
}

/*
 * Linear dequantization: a 16-bit float whose bits p are below
 * 2^(mantissa bits + 1) has the value p * 2^-D (the subnormals and the
 * lowest normal binade, where the bits count in steps of one: D = 133 for
 * bf16, 24 for f16). A value q masked in place at bit P of a half-word is
 * such a p = q << P, so ONE packed FMA, p * (s * 2^(D - P)) + b, is
 * s q + b exactly, rounded once as MLX's dequantize: no magic constant to
 * subtract (one instruction a pair instead of two), and values can be used
 * at bit 4 or 6 of their byte, so fewer pairs need a shift (wfmt::pair_lin).
 * The packer stores s * 2^(D - lin_base) in place of s where every scale of
 * the tensor takes that factor exactly (pack.cu; else the magic path); pairs
 * at lin_base + lin_step use that times 2^-lin_step, exact too.
 */
template <typename T> constexpr int lin_denorm_exp() {
  return std::is_same<T, __nv_bfloat16>::value ? 133 : 24;
}
template <typename T>
__device__ __forceinline__ uint32_t lin_dequant(uint32_t p, uint32_t s2, uint32_t b2) {
  using P = typename dtype_traits<T>::pair;
  P r = __hfma2(*reinterpret_cast<P *>(&p), *reinterpret_cast<P *>(&s2),
                *reinterpret_cast<P *>(&b2));
  return *reinterpret_cast<uint32_t *>(&r);
}
/* s2 * 2^-step (exact: a power of two, far from the subnormals). */
template <typename T> __device__ __forceinline__ uint32_t lin_rescale(uint32_t s2, int step) {
  using P = typename dtype_traits<T>::pair;
  P f;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) f = __float2bfloat162_rn(1.f / (1 << step));
  else f = __float2half2_rn(1.f / (1 << step));
  P r = __hmul2(*reinterpret_cast<P *>(&s2), f);
  return *reinterpret_cast<uint32_t *>(&r);
}

/* The magic constant OR-ed into a q pair: 128 + q is not exact in bf16 for
 * q >= 128, so 8-bit bf16 goes through f16 (1024 + q). */
template <typename T, int BITS>
__host__ __device__ constexpr uint32_t magic_of() {
  return std::is_same<T, __nv_bfloat16>::value && BITS == 8 ? 0x64006400u : dtype_traits<T>::magic;
}

/* h = q pair | magic_of<T, BITS>() -> dequantized pair s*q + b of type T. */
template <typename T, int BITS>
__device__ __forceinline__ uint32_t dequant(uint32_t h, uint32_t s2, uint32_t b2) {
  using P = typename dtype_traits<T>::pair;
  if constexpr (std::is_same<T, __nv_bfloat16>::value && BITS == 8) {
    __half2 v = __hsub2(*reinterpret_cast<__half2 *>(&h), __float2half2_rn(1024.0f));
    float2 f = __half22float2(v);
    P sp = *reinterpret_cast<P *>(&s2), bp = *reinterpret_cast<P *>(&b2);
    float s = __low2float(sp), b = __low2float(bp);
    P r = __floats2bfloat162_rn(fmaf(f.x, s, b), fmaf(f.y, s, b));
    return *reinterpret_cast<uint32_t *>(&r);
  } else {
    P magic;
    if constexpr (std::is_same<T, __nv_bfloat16>::value) magic = __float2bfloat162_rn(128.0f);
    else magic = __float2half2_rn(1024.0f);
    P v = __hsub2(*reinterpret_cast<P *>(&h), magic);
    P r = __hfma2(v, *reinterpret_cast<P *>(&s2), *reinterpret_cast<P *>(&b2));
    return *reinterpret_cast<uint32_t *>(&r);
  }
}

} // namespace gqmm_cu

#endif
