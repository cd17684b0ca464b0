/*
 * pack.cu - gqmm__cu_pack: MLX-layout weights, scales and biases into the
 * packed stage layout that the packed tensor-core configs read (kernels.h).
 *
 * Why: the MLX layout makes the kernel gather each stage from 128 rows (64
 * bytes of 4-bit weights per row, 1408 bytes apart in the seed's gate_up)
 * plus 2-byte scale and bias loads per row; every thread issues copies and
 * scale loads, and the load/store unit sees ~1000 requests per stage. In the
 * packed layout a stage is one contiguous block, brought in by one bulk copy
 * (the TMA engine) that one thread starts, and DRAM sees a plain stream.
 *
 * One CTA writes one stage block. The weight part is ordered
 * [m16 tile i][half h][copy unit u][lane] of `unit` bytes each (unit = 16
 * bytes for 2/4/8-bit, 4 bytes for 3-bit, as qmm_mma.cu's wfmt): lane
 * (g = lane / 4, t = lane % 4) holds 32 consecutive k (t-th quarter of the
 * stage) of row 16 i + 8 h + g. The scale part has one word per (row,
 * group of the stage): scale | bias << 16. Rows past N and k past K are 0.
 */
#include "kernels.h"

#include <cuda_runtime.h>

namespace {

constexpr int kTile = GQMM__CU_PACK_TILE_N, kStage = GQMM__CU_PACK_STAGE_K;

__global__ void pack_kernel(const uint8_t *w, const uint16_t *s, const uint16_t *b, uint8_t *out,
                            int N, int K, int bits, int gs, int tiles, int stages,
                            int stage_bytes) {
  const int64_t blk = blockIdx.x; /* (e * tiles + tile) * stages + stage */
  const int stage = (int)(blk % stages), tile = (int)(blk / stages % tiles);
  const int64_t e = blk / stages / tiles;
  const int64_t row_bytes = (int64_t)K * bits / 8, groups = K / gs;
  const int lane_bytes = 4 * bits; /* 32 values */
  const int unit = bits == 3 ? 4 : (lane_bytes < 16 ? lane_bytes : 16), units = lane_bytes / unit;
  const int wwords = kTile * kStage * bits / 32, gps = kStage / gs;
  uint32_t *dst = reinterpret_cast<uint32_t *>(out + blk * stage_bytes);
  for (int i = threadIdx.x; i < wwords; i += blockDim.x) {
    const int byte = 4 * i, c = byte / unit, within = byte % unit;
    const int lane = c % 32, u = c / 32 % units, h = c / 32 / units % 2, m16 = c / 32 / units / 2;
    const int n = tile * kTile + m16 * 16 + h * 8 + lane / 4;
    const int k0 = stage * kStage + 32 * (lane % 4);
    uint32_t v = 0;
    if (n < N && k0 < K)
      v = *reinterpret_cast<const uint32_t *>(w + (e * N + n) * row_bytes + (int64_t)k0 * bits / 8 +
                                             u * unit + within);
    dst[i] = v;
  }
  for (int i = threadIdx.x; i < kTile * gps; i += blockDim.x) {
    const int n = tile * kTile + i / gps;
    const int64_t grp = (int64_t)stage * gps + i % gps;
    uint32_t v = 0;
    if (n < N && grp < groups) {
      const int64_t at = (e * N + n) * groups + grp;
      v = (uint32_t)s[at] | (uint32_t)b[at] << 16;
    }
    dst[wwords + i] = v;
  }
}

} // namespace

extern "C" int gqmm__cu_pack(const uint32_t *w, const void *scales, const void *biases, int64_t E,
                             int64_t N, int64_t K, int bits, int group_size, uint8_t *out) {
  if ((bits != 2 && bits != 3 && bits != 4 && bits != 8) ||
      (group_size != 32 && group_size != 64 && group_size != 128) || K % 32 != 0 || N < 1 ||
      K < 1 || E < 1 || N > INT32_MAX || K > INT32_MAX)
    return (int)cudaErrorInvalidValue;
  const int64_t tiles = (N + kTile - 1) / kTile, stages = (K + kStage - 1) / kStage;
  const int64_t blocks = E * tiles * stages;
  if (blocks > INT32_MAX) return (int)cudaErrorInvalidValue;
  pack_kernel<<<(unsigned)blocks, 256>>>(reinterpret_cast<const uint8_t *>(w),
                                         static_cast<const uint16_t *>(scales),
                                         static_cast<const uint16_t *>(biases), out, (int)N,
                                         (int)K, bits, group_size, (int)tiles, (int)stages,
                                         (int)gqmm__cu_pack_stage_bytes(bits, group_size));
  return (int)cudaGetLastError();
}
