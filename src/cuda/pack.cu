/*
 * pack.cu - gqmm__cu_pack: MLX-layout weights, scales and biases into the
 * packed stage layout that the wgmma kernel reads (kernels.h, qmm_wgmma.cu).
 *
 * Why: the MLX layout makes a kernel gather each stage from 128 rows (64
 * bytes of 4-bit weights per row, 1408 bytes apart in the seed's gate_up)
 * plus 2-byte scale and bias loads per row; every thread issues copies and
 * scale loads, and the load/store unit sees ~1000 requests per stage. In the
 * packed layout a stage is one contiguous block, brought in by one bulk copy
 * (the TMA engine) that one thread starts, and DRAM sees a plain stream.
 *
 * One CTA writes one stage block (128 rows x 128 k). The weight part is
 * ordered [m16 tile i][half h][copy unit u][lane] of `unit` bytes each (16
 * bytes for 2/4/8-bit, 4 for 3-bit, as wfmt.cuh): the slot of lane
 * (g = lane / 4, t = lane % 4) holds row 16 i + 8 h + g's values at k 2t,
 * 2t+1, 2t+8, 2t+9 of each 16-k step of the stage: the lane's part of the
 * wgmma A fragment, placed so that the shift-and-mask pair pi of wfmt is
 * (k-step pi / 2, k 2t (+1) for even pi, 2t + 8 (+1) for odd). x then stays
 * in its natural order. The scale part has one word per (row, group of the
 * stage): scale | bias << 16, the scale times 2^(D - lin_base) in a pack
 * with linear dequantization (wfmt.cuh; when every scale takes the factor
 * exactly, else as it is). Rows past N and k past K are 0; a last tile of
 * at most 64 rows keeps only those rows, and a last stage of at most 64 k
 * only k-steps 0..3 (half blocks, kernels.h). A GLU pack
 * (kernels.h) only takes its rows from other places of the tensor.
 */
#include "kernels.h"
#include "wfmt.cuh"

#include <cuda_runtime.h>

using namespace gqmm_cu;

namespace {

constexpr int kTile = GQMM__CU_PACK_TILE_N, kStage = GQMM__CU_PACK_STAGE_K;

/* Stream position of the lo (hi: + half_gap) value of pair pi, as the
 * kernel's shift-and-mask extracts pairs (qmm_mma.cu wfmt::pair; 3-bit after
 * its prep regrouping). */
__device__ __forceinline__ int pair_pos(int bits, int pi, int *half_gap) {
  if (bits == 3) return *half_gap = 16, pi;
  const int per_word = 16 / bits;
  *half_gap = per_word;
  return 2 * per_word * (pi / per_word) + pi % per_word;
}

/* The tensor row of row r (0..127) of tile `tile`, or -1 for padding. */
__device__ __forceinline__ int src_row(int tile, int r, int N, int glu) {
  if (glu) {
    const int I = N / 2, col = tile * (kTile / 2) + (r >> 4) * 8 + (r & 7);
    return col < I ? (r >> 3 & 1) * I + col : -1;
  }
  const int n = tile * kTile + r;
  return n < N ? n : -1;
}

/* Scale bits s of a 16-bit float type times 2^e, or s itself for e = 0;
 * *bad is set if the product is not exactly representable. */
template <typename T> __device__ uint16_t scale_bits(uint16_t s, int e, int *bad) {
  if (!e) return s;
  const T v = *reinterpret_cast<const T *>(&s);
  const float f = ldexpf(dtype_traits<T>::to_f(v), e);
  const T r = dtype_traits<T>::from_f(f);
  if (!(dtype_traits<T>::to_f(r) == f) || isinf(f)) atomicOr(bad, 1);
  return *reinterpret_cast<const uint16_t *>(&r);
}

template <typename T>
__global__ void pack_kernel(const uint8_t *w, const uint16_t *s, const uint16_t *b, uint8_t *out,
                            int N, int K, int bits, int gs, int tiles, int stages,
                            int stage_bytes, int64_t expert_bytes, int half_last, int half_k,
                            int glu, int scale_exp, int *bad) {
  const int64_t blk = blockIdx.x; /* (e * tiles + tile) * stages + stage */
  const int stage = (int)(blk % stages), tile = (int)(blk / stages % tiles);
  const int64_t e = blk / stages / tiles;
  const int64_t row_bytes = (int64_t)K * bits / 8, groups = K / gs;
  /* a half tile (kernels.h): rows 0..63 only, half the weight words; a
   * half stage: each lane's first half (k-steps 0..3), the first half of
   * the groups */
  const int half = half_last && tile == tiles - 1, rows = half ? kTile / 2 : kTile;
  const int hk = half_k && stage == stages - 1;
  const int lane_bytes = 4 * bits >> hk; /* 32 values, or the first 16 */
  const int unit = bits == 3 ? 4 : (lane_bytes < 16 ? lane_bytes : 16), units = lane_bytes / unit;
  const int wwords = rows * kStage * bits / 32 >> hk, gps = kStage / gs >> hk;
  uint32_t *dst = reinterpret_cast<uint32_t *>(out + e * expert_bytes +
                                               ((int64_t)tile * stages + stage) * stage_bytes -
                                               (half ? (int64_t)stage * stage_bytes / 2 : 0));
  /* One lane slot per iteration: (m16 tile i, half h, lane) of the kernel. */
  for (int slot = threadIdx.x; slot < rows / 8 * 32; slot += blockDim.x) {
    const int lane = slot % 32, h = slot / 32 % 2, m16 = slot / 64;
    const int n = src_row(tile, m16 * 16 + h * 8 + lane / 4, N, glu);
    const int64_t k0 = (int64_t)stage * kStage + 2 * (lane % 4);
    const uint8_t *row = w + (e * N + (n >= 0 ? n : 0)) * row_bytes;
    uint32_t stream[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* 32 values of <= 8 bits */
    for (int pi = 0; pi < 16; pi++) {
      int gap;
      const int pos = pair_pos(bits, pi, &gap);
      for (int half = 0; half < 2; half++) {
        /* pair pi: k-step pi / 2 of the stage, its k 2t (+1) for even pi,
         * 2t + 8 (+1) for odd: the wgmma A fragment */
        const int64_t k = k0 + 16 * (pi / 2) + 8 * (pi % 2) + half;
        const uint64_t v = n >= 0 && k < K ? stream_value(row, bits, k) : 0u;
        const int bit = (pos + half * gap) * bits;
        const uint64_t sh = v << (bit & 31);
        stream[bit >> 5] |= (uint32_t)sh;
        if ((bit & 31) + bits > 32) stream[(bit >> 5) + 1] |= (uint32_t)(sh >> 32);
      }
    }
    for (int wi = 0; wi < lane_bytes / 4; wi++) { /* the lane's bytes, split into copy units */
      const int byte = 4 * wi, u = byte / unit, within = byte % unit;
      dst[((((m16 * 2 + h) * units + u) * 32 + lane) * unit + within) / 4] = stream[wi];
    }
  }
  for (int i = threadIdx.x; i < rows * gps; i += blockDim.x) {
    const int n = src_row(tile, i / gps, N, glu);
    const int64_t grp = (int64_t)stage * (kStage / gs) + i % gps;
    uint32_t v = 0;
    if (n >= 0 && grp < groups) {
      const int64_t at = (e * N + n) * groups + grp;
      v = (uint32_t)scale_bits<T>(s[at], scale_exp, bad) | (uint32_t)b[at] << 16;
    }
    dst[wwords + i] = v;
  }
  /* the unused second half of a half stage's block: zeros */
  for (int i = threadIdx.x; hk && i < wwords + rows * gps; i += blockDim.x)
    dst[wwords + rows * gps + i] = 0;
}

/* The power of two the scales take for linear dequantization (wfmt.cuh),
 * 0 for a width without it. */
template <typename T, int BITS> int lin_exp_of() {
  return wfmt<BITS>::lin_ok ? lin_denorm_exp<T>() - wfmt<BITS>::lin_base : 0;
}
template <typename T> int lin_exp(int bits) {
  return bits == 2 ? lin_exp_of<T, 2>() : bits == 4 ? lin_exp_of<T, 4>()
                                        : bits == 8 ? lin_exp_of<T, 8>() : lin_exp_of<T, 3>();
}

template <typename T>
int pack_as(const uint32_t *w, const void *scales, const void *biases, int64_t E, int64_t N,
            int64_t K, int bits, int gs, int glu, int *lin, uint8_t *out, cudaStream_t stream) {
  const int64_t tiles = gqmm__cu_pack_tiles(N, glu), stages = gqmm__cu_pack_stages(K);
  const int64_t blocks = E * tiles * stages;
  if (blocks > INT32_MAX) return (int)cudaErrorInvalidValue;
  int *bad = nullptr;
  cudaError_t err = cudaMallocManaged(&bad, sizeof *bad);
  if (err) return (int)err;
  const int exp = lin_exp<T>(bits);
  *lin = *lin && exp;
  for (;;) {
    *bad = 0;
    pack_kernel<T><<<(unsigned)blocks, 256, 0, stream>>>(
        reinterpret_cast<const uint8_t *>(w), static_cast<const uint16_t *>(scales),
        static_cast<const uint16_t *>(biases), out, (int)N, (int)K, bits, gs, (int)tiles,
        (int)stages, (int)gqmm__cu_pack_stage_bytes(bits, gs),
        gqmm__cu_pack_expert_bytes(N, K, bits, gs, glu), gqmm__cu_pack_half_last(N, glu),
        gqmm__cu_pack_half_k(K, bits), glu, *lin ? exp : 0, bad);
    err = cudaGetLastError();
    if (!err) err = cudaStreamSynchronize(stream);
    if (err || !*lin || !*bad) break;
    *lin = 0; /* a scale too large (or NaN) for the factor: pack them as they are */
  }
  cudaFree(bad);
  return (int)err;
}

} // namespace

extern "C" int gqmm__cu_pack(const uint32_t *w, const void *scales, const void *biases, int64_t E,
                             int64_t N, int64_t K, int bits, int group_size, int glu, int dtype,
                             int *lin, uint8_t *out, gqmm__cu_stream stream) {
  if ((bits != 2 && bits != 3 && bits != 4 && bits != 8) ||
      (group_size != 32 && group_size != 64 && group_size != 128) || K % 32 != 0 || N < 1 ||
      K < 1 || E < 1 || N > INT32_MAX || K > INT32_MAX || (glu && N % 2) ||
      (dtype != GQMM__CU_BF16 && dtype != GQMM__CU_F16))
    return (int)cudaErrorInvalidValue;
  return dtype == GQMM__CU_BF16
             ? pack_as<__nv_bfloat16>(w, scales, biases, E, N, K, bits, group_size, glu, lin, out,
                                      stream)
             : pack_as<__half>(w, scales, biases, E, N, K, bits, group_size, glu, lin, out, stream);
}
