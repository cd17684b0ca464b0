/*
 * mma_common.cuh - what the two tensor-core gather kernels share: their
 * arguments, the walk over the routing plan's work units, the dispatch on a
 * unit's token-tile count and the output store (qmm_mma.cu and qmm_wgmma.cu
 * hold the pipelines and the arithmetic).
 */
#ifndef GQMM_CUDA_MMA_COMMON_CUH
#define GQMM_CUDA_MMA_COMMON_CUH

#include "act.cuh"
#include "kernels.h"
#include "ptx.cuh"

#include <cuda_runtime.h>
#include <stdint.h>
#include <type_traits>

namespace gqmm_cu {

struct kargs {
  const void *x;
  const uint32_t *w;
  const void *scales, *biases;
  void *out;
  int N, K, experts, groups, gs_shift; /* group size = 1 << gs_shift */
  int64_t row_bytes;                   /* packed bytes per weight row */
  int64_t b_minus_s;                   /* biases - scales in bytes: one pointer serves both */
  /* The packed stage layout (kernels.h gqmm__cu_pack), or NULL. */
  const uint8_t *pk;
  int pk_tiles, pk_stages, pk_stage_bytes; /* N tiles, k stages, bytes of one stage block */
  int pk_half_last;                        /* the last tile's blocks are half blocks */
  int pk_half_k;                           /* the last stage's blocks are half blocks */
  int64_t pk_expert_bytes;                 /* bytes of one expert's blocks */
  int glu_i, act; /* a GLU pack: I (else 0), and gqmm__cu_qmm.epilogue_act */
  int balanced;   /* deal units to the fewest CTAs of equal rounds (units_of_cta) */
  gqmm__cu_plan plan;
};

/* A work unit: rows [r0, r0 + cnt) of the plan (one expert e), N tile ntile;
 * nt = n8 token tiles that cover cnt. */
struct unit_t {
  int e, ntile, r0, cnt, nt;
};

/* Units are dealt round-robin: CTA b takes b, b + G, b + 2G, ... The
 * chunks of one (expert, N tile), adjacent in the plan, so run at the
 * same time on neighbouring CTAs and read the same weight rows: the second
 * finds them in L2 instead of DRAM. G is the grid, or with a.balanced the
 * fewest CTAs of it that take as many rounds as all of them: 1408 units
 * (gate_up) on 396 CTAs are 3.6 rounds, and the last one, with 220 CTAs
 * left, streams weights slower than the memory can; 352 CTAs run 4 each
 * (the other 44 none) and gate_up is 3% faster. Not for short units (down,
 * K = 704: 5.5 stages a unit): with 352 of 396 CTAs, 88 multiprocessors
 * keep three busy CTAs and 44 two, and down, bound per multiprocessor by
 * its many unit ends, was 11% slower (perf-notes, session 6). */
__device__ __forceinline__ int units_total(const kargs &a) {
  return __ldg(a.plan.unit_start + a.experts);
}
__device__ __forceinline__ int deal_stride(const kargs &a, int total) {
  const int rounds = (total + (int)gridDim.x - 1) / (int)gridDim.x;
  return a.balanced && rounds > 0 ? (total + rounds - 1) / rounds : (int)gridDim.x;
}
/* This CTA's unit count. */
__device__ __forceinline__ int units_of_cta(const kargs &a) {
  const int total = units_total(a), g = deal_stride(a, total), b = (int)blockIdx.x;
  return b < g && b < total ? (total - 1 - b) / g + 1 : 0;
}

/* The i-th unit of this CTA's descriptor, for deal stride g. */
__device__ __forceinline__ const int4 *unit_desc_ptr(const kargs &a, int i, int g) {
  return reinterpret_cast<const int4 *>(a.plan.units) + blockIdx.x + i * g;
}
/* The i-th unit of this CTA: one 16-byte load of its descriptor. */
__device__ __forceinline__ int4 unit_desc(const kargs &a, int i) {
  return __ldg(unit_desc_ptr(a, i, deal_stride(a, units_total(a))));
}
__device__ __forceinline__ unit_t unit_of(int4 d) { return {d.x, d.y, d.z, d.w, (d.w + 7) >> 3}; }

/* A walk over this CTA's units, one k-stage at a time. The mma.sync kernel
 * keeps two, the load side and the compute side, a few stages apart; the
 * next unit's descriptor is loaded a unit ahead. (The wgmma kernel keeps
 * its descriptors in a shared-memory ring instead: qmm_wgmma.cu.) */
struct unit_walk {
  int idx, k; /* unit of this CTA, k-stage in it */
  unit_t u;
  int4 next;
  __device__ __forceinline__ void start(const kargs &a, int nunits) {
    idx = 0, k = 0;
    u = unit_of(unit_desc(a, 0));
    next = unit_desc(a, nunits > 1 ? 1 : 0);
  }
  /* One stage on; true if that entered a new unit (now in u). */
  __device__ __forceinline__ bool step(const kargs &a, int nunits, int nk) {
    if (++k < nk) return false;
    k = 0;
    if (++idx >= nunits) return false;
    u = unit_of(next);
    next = unit_desc(a, idx + 1 < nunits ? idx + 1 : idx);
    return true;
  }
};

/* f(std::integral_constant<int, NT>{}) for a unit's nt (1..NTMAX <= 8) n8
 * token tiles: a stage's compute is instantiated per count, so it is one
 * basic block with no branch per token tile. A switch, not a chain of
 * tests: a full 64-token unit took seven compares and branches a stage. */
template <int NTMAX, typename Fn> __device__ __forceinline__ void with_nt(int nt, Fn &&f) {
  static_assert(NTMAX >= 1 && NTMAX <= 8, "n8 token tiles");
#define GQMM__NT_CASE(n)                                                                          \
  case n:                                                                                          \
    if constexpr (n <= NTMAX) {                                                                    \
      f(std::integral_constant<int, n>{});                                                         \
      break;                                                                                       \
    } else {                                                                                       \
      __builtin_unreachable();                                                                     \
    }
  switch (nt >= 1 && nt <= NTMAX ? nt : NTMAX) {
    GQMM__NT_CASE(1) GQMM__NT_CASE(2) GQMM__NT_CASE(3) GQMM__NT_CASE(4)
    GQMM__NT_CASE(5) GQMM__NT_CASE(6) GQMM__NT_CASE(7) GQMM__NT_CASE(8)
  default: __builtin_unreachable();
  }
#undef GQMM__NT_CASE
}

/* The output row (of `stride` elements) of the thread's token column c of
 * n8 tile j of a unit (NULL: no token there). Loaded per column as the
 * store goes: all 2 NTMAX pointers at once cost 4 NTMAX registers, which
 * the 64-token config does not have. rows: the unit's output rows in
 * shared memory (the wgmma kernel's unit ring), or NULL: the plan's. */
template <typename T>
__device__ __forceinline__ T *out_row(const kargs &a, const unit_t &cu, int64_t stride, int j,
                                      int c, const int32_t *rows) {
  const int tok = j * 8 + 2 * (threadIdx.x & 3) + c;
  if (tok >= cu.cnt) return nullptr;
  return (T *)a.out + (int64_t)(rows ? rows[tok] : __ldg(a.plan.rows_o + cu.r0 + tok)) * stride;
}

/* Write a finished unit's accumulators to its rows' outputs and zero them.
 * Warp w owns m16 tiles w*MT .. w*MT + MT-1 of the N tile, or with
 * MT_MAJOR (MT m64 tiles per warpgroup) tiles mt*WARPS + w. */
template <typename T, int MT, int NTMAX, int BN, bool MT_MAJOR = false>
__device__ __forceinline__ void store_unit(const kargs &a, const unit_t &cu,
                                           float (&acc)[MT][NTMAX][4],
                                           const int32_t *rows = nullptr) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2;
#pragma unroll
  for (int j = 0; j < NTMAX; j++)
#pragma unroll
    for (int c = 0; c < 2; c++) {
      T *orow = j < cu.nt ? out_row<T>(a, cu, a.N, j, c, rows) : nullptr;
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const int m16 = MT_MAJOR ? mt * (BN / (16 * MT)) + warp : warp * MT + mt;
          const int n = cu.ntile * BN + m16 * 16 + g + h * 8;
          if (orow && n < a.N) orow[n] = dtype_traits<T>::from_f(acc[mt][j][2 * h + c]);
          acc[mt][j][2 * h + c] = 0.f;
        }
    }
}

/* store_unit (MT_MAJOR) for a GLU pack (kernels.h): the thread's half 0 and
 * half 1 rows of an m16 tile are the gate and the up row of one column.
 * act 0: each to its tensor row; else out [rows, I] gets act(gate, up) of
 * the values rounded to T, as the unfused layer's activation reads them. */
template <typename T, int MT, int NTMAX, int BN>
__device__ __forceinline__ void store_unit_glu(const kargs &a, const unit_t &cu,
                                               float (&acc)[MT][NTMAX][4], const int32_t *rows) {
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, I = a.glu_i;
#pragma unroll
  for (int j = 0; j < NTMAX; j++)
#pragma unroll
    for (int c = 0; c < 2; c++) {
      T *orow = j < cu.nt ? out_row<T>(a, cu, a.act ? I : a.N, j, c, rows) : nullptr;
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        const int col = cu.ntile * (BN / 2) + (mt * (BN / (16 * MT)) + warp) * 8 + g;
        if (col < I && orow) {
          const T gt = dtype_traits<T>::from_f(acc[mt][j][c]);
          const T ut = dtype_traits<T>::from_f(acc[mt][j][2 + c]);
          if (a.act) {
            orow[col] = dtype_traits<T>::from_f(
                act_f(a.act - 1, dtype_traits<T>::to_f(gt), dtype_traits<T>::to_f(ut)));
          } else {
            orow[col] = gt;
            orow[I + col] = ut;
          }
        }
        acc[mt][j][c] = acc[mt][j][2 + c] = 0.f;
      }
    }
}

/* A compiled kernel instance and its launch shape. */
typedef void (*kernel_fn)(kargs);
struct launch_info {
  kernel_fn fn;
  int threads, smem;
};

/* The wgmma kernel (qmm_wgmma.cu) of config variant v for these args. */
launch_info wg_launch_info(const gqmm__cu_qmm *a, int v);

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
inline kargs make_kargs(const gqmm__cu_qmm *a, const gqmm__cu_plan *plan, int experts) {
  kargs k = {};
  k.x = a->x, k.w = a->w, k.scales = a->scales, k.biases = a->biases, k.out = a->out;
  k.N = (int)a->N, k.K = (int)a->K, k.experts = experts;
  k.groups = (int)(a->K / a->group_size);
  k.gs_shift = log2_exact(a->group_size);
  k.row_bytes = a->K * a->bits / 8;
  k.b_minus_s = (int64_t)((uintptr_t)a->biases - (uintptr_t)a->scales);
  k.pk = a->packed;
  if (a->packed) {
    k.pk_tiles = (int)gqmm__cu_pack_tiles(a->N, a->glu);
    k.pk_stages = (int)gqmm__cu_pack_stages(a->K);
    k.pk_stage_bytes = (int)gqmm__cu_pack_stage_bytes(a->bits, a->group_size);
    k.pk_half_last = gqmm__cu_pack_half_last(a->N, a->glu);
    k.pk_half_k = gqmm__cu_pack_half_k(a->K, a->bits);
    k.pk_expert_bytes = gqmm__cu_pack_expert_bytes(a->N, a->K, a->bits, a->group_size, a->glu);
    k.glu_i = a->glu ? (int)(a->N / 2) : 0;
    k.act = a->glu ? a->epilogue_act : 0;
  }
  /* the wgmma kernel's long units only (units_of_cta): 16 stages or more;
   * measured there, not on the MLX-layout kernel */
  k.balanced = a->packed && a->K >= 16 * GQMM__CU_PACK_STAGE_K;
  k.plan = *plan;
  return k;
}

} // namespace gqmm_cu

#endif
