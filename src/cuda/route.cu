/*
 * route.cu - the routing plan on the GPU: batch entries (x row, expert) of a
 * batched qmm -> rows grouped by expert and the list of work units of the
 * tensor-core kernel, in one small kernel (no host round trip).
 *
 * One CTA: a counting sort of the batch entries by expert. The order of rows
 * inside an expert depends on atomics, but every output row is computed
 * independently with the same reduction order, so results are deterministic.
 * Preconditions: indices already checked in range; batch*M < 2^31.
 */
#include "kernels.h"

#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 1024;

__global__ void __launch_bounds__(kThreads)
route_kernel(const int32_t *__restrict__ x_index, const int32_t *__restrict__ w_index,
             int32_t batch, int32_t M, int32_t experts, int32_t tok_max, int32_t n_tiles,
             gqmm__cu_plan p) {
  __shared__ int32_t carry_rows, carry_units;
  __shared__ int32_t scan_rows[kThreads], scan_units[kThreads];
  const int tid = threadIdx.x;
  for (int e = tid; e < experts; e += kThreads) p.count[e] = 0, p.fill[e] = 0;
  __syncthreads();
  for (int b = tid; b < batch; b += kThreads) atomicAdd(&p.count[w_index[b]], M);
  if (tid == 0) carry_rows = 0, carry_units = 0;
  __syncthreads();
  /* Block-wide exclusive scan over experts, kThreads at a time. */
  for (int base = 0; base < experts; base += kThreads) {
    const int e = base + tid;
    const int32_t c = e < experts ? p.count[e] : 0;
    const int32_t u = (c + tok_max - 1) / tok_max * n_tiles;
    scan_rows[tid] = c;
    scan_units[tid] = u;
    __syncthreads();
    for (int off = 1; off < kThreads; off <<= 1) { /* Hillis-Steele inclusive scan */
      int32_t r = tid >= off ? scan_rows[tid - off] : 0;
      int32_t v = tid >= off ? scan_units[tid - off] : 0;
      __syncthreads();
      scan_rows[tid] += r;
      scan_units[tid] += v;
      __syncthreads();
    }
    if (e < experts) {
      p.row_start[e] = carry_rows + scan_rows[tid] - c;
      p.unit_start[e] = carry_units + scan_units[tid] - u;
    }
    __syncthreads();
    if (tid == kThreads - 1) carry_rows += scan_rows[tid], carry_units += scan_units[tid];
    __syncthreads();
  }
  if (tid == 0) p.unit_start[experts] = carry_units;
  for (int b = tid; b < batch; b += kThreads) {
    const int32_t e = w_index[b];
    const int32_t at = p.row_start[e] + atomicAdd(&p.fill[e], M);
    for (int32_t m = 0; m < M; m++) {
      p.rows_x[at + m] = x_index[b] * M + m;
      p.rows_o[at + m] = b * M + m;
    }
  }
}

} // namespace

extern "C" int gqmm__cu_route(const int32_t *x_index, const int32_t *w_index, int32_t batch,
                              int32_t M, int32_t experts, int32_t tok_max, int32_t n_tiles,
                              gqmm__cu_plan plan) {
  route_kernel<<<1, kThreads>>>(x_index, w_index, batch, M, experts, tok_max, n_tiles, plan);
  return (int)cudaGetLastError();
}
