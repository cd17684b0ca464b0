/*
 * mma_common.cuh - the tensor-core gather kernel's arguments, its walk over
 * the routing plan's work units and its output store (qmm_mma.cu holds the
 * pipeline and the arithmetic).
 */
#ifndef GQMM_CUDA_MMA_COMMON_CUH
#define GQMM_CUDA_MMA_COMMON_CUH

#include "kernels.h"
#include "ptx.cuh"

#include <cuda_runtime.h>
#include <stdint.h>

namespace gqmm_cu {

struct kargs {
  const void *x;
  const uint32_t *w;
  const void *scales, *biases;
  void *out;
  int N, K, experts, groups, gs_shift; /* group size = 1 << gs_shift */
  int n_tiles;                         /* N tiles of the config's BN rows */
  int64_t row_bytes;                   /* packed bytes per weight row */
  int64_t b_minus_s;                   /* biases - scales in bytes: one pointer serves both */
  gqmm__cu_plan plan;
};

/* A work unit: rows [r0, r0 + cnt) of the plan (one expert e), N tile ntile;
 * nt = n8 token tiles that cover cnt. Expert e's units are ntile-major:
 * local = ntile * nseg + chunk, chunk = which kTokMax rows of its count.
 * next_e/next_count/next_start: the following expert, loaded ahead so that
 * stepping to it costs no memory round trip. */
struct unit_t {
  int e, ntile, r0, cnt, nt;
  int chunk, nseg, count, start;
  int next_e, next_count, next_start;
};

template <int kTokMax> __device__ __forceinline__ void set_rows(unit_t &r) {
  r.r0 = r.start + r.chunk * kTokMax;
  r.cnt = min(kTokMax, r.count - r.chunk * kTokMax);
  r.nt = (r.cnt + 7) >> 3;
}

/* The first expert after e with rows (experts without rows have no units;
 * a.experts if none), and its count and first row. */
__device__ __forceinline__ void look_ahead(const kargs &a, unit_t &r) {
  int e = r.e + 1, c = 0;
  while (e < a.experts && (c = __ldg(a.plan.count + e)) == 0) e++;
  r.next_e = e;
  r.next_count = c;
  r.next_start = e < a.experts ? __ldg(a.plan.row_start + e) : 0;
}

/* Work unit u of the plan, found by binary search (once per CTA). */
template <int kTokMax>
__device__ __forceinline__ unit_t decode(const kargs &a, int u) {
  const int32_t *us = a.plan.unit_start;
  int lo = 0, hi = a.experts - 1;
  while (lo < hi) { /* last expert whose first unit is <= u (it has units) */
    int mid = (lo + hi + 1) >> 1;
    if (__ldg(us + mid) <= u) lo = mid;
    else hi = mid - 1;
  }
  unit_t r;
  r.e = lo;
  r.count = __ldg(a.plan.count + lo);
  r.start = __ldg(a.plan.row_start + lo);
  r.nseg = (r.count + kTokMax - 1) / kTokMax;
  const int local = u - __ldg(us + lo);
  r.ntile = local / r.nseg;
  r.chunk = local - r.ntile * r.nseg;
  set_rows<kTokMax>(r);
  look_ahead(a, r);
  return r;
}

/* The unit after r in plan order (the caller stops at its stripe's end):
 * the next chunk, else the next N tile, else the next expert with rows. */
template <int kTokMax>
__device__ __forceinline__ unit_t next_unit(const kargs &a, unit_t r) {
  if (++r.chunk == r.nseg) {
    r.chunk = 0;
    if (++r.ntile == a.n_tiles) {
      r.ntile = 0;
      r.e = r.next_e, r.count = r.next_count, r.start = r.next_start;
      r.nseg = (r.count + kTokMax - 1) / kTokMax;
      look_ahead(a, r);
    }
  }
  set_rows<kTokMax>(r);
  return r;
}

/* This CTA's contiguous stripe [u0, u1) of the plan's units (every unit
 * streams the same bytes, so equal stripes are balanced). */
__device__ __forceinline__ void stripe(const kargs &a, int &u0, int &u1) {
  const int total = __ldg(a.plan.unit_start + a.experts);
  u0 = (int)((int64_t)blockIdx.x * total / gridDim.x);
  u1 = (int)((int64_t)(blockIdx.x + 1) * total / gridDim.x);
}

/* Write a finished unit's accumulators (warp w owns m16 tiles w*MT ..
 * w*MT + MT-1 of the N tile) to its rows' outputs and zero them. */
template <typename T, int MT, int NTMAX, int BN>
__device__ __forceinline__ void store_unit(const kargs &a, const unit_t &cu,
                                           float (&acc)[MT][NTMAX][4]) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  T *out = (T *)a.out;
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int j = 0; j < NTMAX; j++)
#pragma unroll
      for (int r = 0; r < 4; r++) {
        const int n = cu.ntile * BN + (warp * MT + mt) * 16 + g + (r >> 1) * 8;
        const int tok = j * 8 + 2 * t + (r & 1);
        if (j < cu.nt && n < a.N && tok < cu.cnt)
          out[(int64_t)__ldg(a.plan.rows_o + cu.r0 + tok) * a.N + n] =
              dtype_traits<T>::from_f(acc[mt][j][r]);
        acc[mt][j][r] = 0.f;
      }
}

/* A compiled kernel instance and its launch shape. */
typedef void (*kernel_fn)(kargs);
struct launch_info {
  kernel_fn fn;
  int threads, smem;
};

/* Persistent-grid size: CTAs per SM the occupancy calculator allows x SMs. */
inline int grid_of(launch_info li, int sms, int *out_grid) {
  if (!li.fn) return (int)cudaErrorInvalidValue;
  cudaError_t e = cudaFuncSetAttribute(li.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, li.smem);
  if (e != cudaSuccess) return (int)e;
  int per_sm = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, li.fn, li.threads, li.smem);
  if (e != cudaSuccess) return (int)e;
  *out_grid = (per_sm > 0 ? per_sm : 1) * sms;
  return 0;
}

inline int log2_exact(int v) {
  int s = 0;
  while ((1 << s) < v) s++;
  return (1 << s) == v ? s : -1;
}

/* The kernel arguments both kernels share. */
inline kargs make_kargs(const gqmm__cu_qmm *a, const gqmm__cu_plan *plan, int experts, int tile_n) {
  kargs k = {};
  k.x = a->x, k.w = a->w, k.scales = a->scales, k.biases = a->biases, k.out = a->out;
  k.N = (int)a->N, k.K = (int)a->K, k.experts = experts;
  k.groups = (int)(a->K / a->group_size);
  k.gs_shift = log2_exact(a->group_size);
  k.row_bytes = a->K * a->bits / 8;
  k.b_minus_s = (int64_t)((uintptr_t)a->biases - (uintptr_t)a->scales);
  k.plan = *plan;
  k.n_tiles = (int)((a->N + tile_n - 1) / tile_n);
  return k;
}

} // namespace gqmm_cu

#endif
