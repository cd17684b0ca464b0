/*
 * route.cuh - device code of the routing plan that two kernels share: the
 * block scan of route.cu's plan kernel, and the plan made inside the MoE
 * layer's gate_up GEMM (the "fold", qmm_wgmma.cu).
 *
 * Why the fold: the plan kernel is a kernel of its own on the layer's
 * critical path (6.5 us of latency, plus its launch gap, while the DRAM
 * idles; perf-notes, session 11), and gate_up then waits out two dependent
 * global loads (a unit's descriptor, then its x rows) before its first
 * weight copy. Folded, every gate_up CTA reads the layer's expert ids once
 * (2048 pairs: 16 per thread, one round trip), counts them by expert in
 * shared memory and scans the counts itself, so each knows its own units
 * with no one to wait for; a unit's rows are the entries of its expert,
 * ranked in entry order by one block scan over the ids kept in shared
 * memory (one byte an entry). Nothing waits across CTAs. The down GEMM's
 * plan (its rows and unit descriptors) is still written to global memory,
 * each expert's part by the CTA whose index it is (as the plan kernel's
 * CTA per expert does), and read after gate_up has finished.
 */
#ifndef GQMM_CUDA_ROUTE_CUH
#define GQMM_CUDA_ROUTE_CUH

#include "kernels.h"

#include <climits>
#include <stdint.h>

namespace gqmm_cu {

/* Inclusive scan of v over the CTA's threads, three values at once; tot gets
 * the CTA totals. Two levels of warp shuffles (lanes, then the warp totals
 * in warp 0): no loop over the warps. Uses ws (NT / 32 + 1 rows of 3 ints);
 * ends with a barrier. */
template <int NT> __device__ void block_scan3(int32_t v[3], int32_t tot[3], int32_t (*ws)[3]) {
  constexpr int kWarps = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 1; off < 32; off <<= 1)
    for (int i = 0; i < 3; i++) {
      const int32_t o = __shfl_up_sync(0xffffffffu, v[i], off);
      if (lane >= off) v[i] += o;
    }
  if (lane == 31)
    for (int i = 0; i < 3; i++)
      ws[warp][i] = v[i];
  __syncthreads();
  if (warp == 0) { /* exclusive prefix of the warp totals, and the total */
    static_assert(kWarps <= 32 && NT % 32 == 0, "one warp scans the warp totals");
    for (int i = 0; i < 3; i++) {
      const int32_t t = lane < kWarps ? ws[lane][i] : 0;
      int32_t x = t;
      for (int off = 1; off < 32; off <<= 1) {
        const int32_t o = __shfl_up_sync(0xffffffffu, x, off);
        if (lane >= off) x += o;
      }
      if (lane < kWarps) ws[lane][i] = x - t;
      if (lane == 31) ws[kWarps][i] = x;
    }
  }
  __syncthreads();
  for (int i = 0; i < 3; i++)
    v[i] += ws[warp][i], tot[i] = ws[kWarps][i];
  __syncthreads(); /* ws may be reused */
}

/* ---- the fold ------------------------------------------------------------ */

/* Entries a thread holds: a CTA of NT threads folds up to 16 NT pairs (the
 * seed layer's 2048 at 128 threads). Ids are kept as bytes: E <= 255, and
 * 0xFF marks the padding past the pairs. */
constexpr int kFoldPer = 16, kFoldMaxExperts = 255;

/* What the fold writes besides its own units: the layer's plan for the down
 * GEMM (kernels.h gqmm__cu_moe_route_args, whose fields these are). */
struct fold_args {
  const int32_t *ids; /* NULL: no fold (the plan kernel ran) */
  int32_t *ids_safe, *err, *unit_start2, *units2;
  int32_t pairs, top_k, tok1, n_tiles1, call;
};

/* The shared memory the fold keeps for the whole kernel, after the kernel's
 * own: the ids (an entry a byte, 16 a thread), per expert its count, first
 * row, and first unit of each tiling (gate_up's: E + 1), and the block
 * scan's warp totals. */
__host__ __device__ constexpr int fold_smem_bytes(int E, int NT) {
  return (NT * kFoldPer + 4 * (4 * E + 1) + 4 * (NT / 32) + 15) / 16 * 16;
}
struct fold_smem {
  uint8_t *ids;
  int32_t *count, *row_start, *u1, *u0, *wsum;
  __device__ fold_smem(uint8_t *base, int E, int NT)
      : ids(base), count(reinterpret_cast<int32_t *>(base + NT * kFoldPer)), row_start(count + E),
        u1(row_start + E), u0(u1 + E), wsum(u0 + E + 1) {}
};

/* 0xFF or 0x00 bytes -> bits 0..3 (the four partial products land on
 * distinct bits: no carries). */
__device__ __forceinline__ uint32_t byte_mask_bits(uint32_t m) {
  return ((m & 0x01010101u) * 0x01020408u) >> 24 & 0xFu;
}

/* The thread's entries of expert e (bit i: entry 16 tid + i) in *mine, and
 * the count of e's entries before them in entry order. Every thread of the
 * CTA calls it (two barriers). */
template <int NT>
__device__ __forceinline__ int fold_rank(const fold_smem &fs, int e, uint32_t *mine) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint4 w = *reinterpret_cast<const uint4 *>(fs.ids + kFoldPer * threadIdx.x);
  const uint32_t key = 0x01010101u * (uint32_t)e;
  const uint32_t m =
      byte_mask_bits(__vcmpeq4(w.x, key)) | byte_mask_bits(__vcmpeq4(w.y, key)) << 4 |
      byte_mask_bits(__vcmpeq4(w.z, key)) << 8 | byte_mask_bits(__vcmpeq4(w.w, key)) << 12;
  const int c = __popc(m);
  int incl = c;
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) fs.wsum[warp] = incl;
  __syncthreads();
  int before = incl - c;
  for (int i = 0; i < warp; i++)
    before += fs.wsum[i];
  __syncthreads(); /* wsum is reused by the next call */
  *mine = m;
  return before;
}

/* Unit u of gate_up (tok0 rows a unit), from the counts: a descriptor as
 * the plan's (kernels.h), but its third field is the unit's first rank in
 * its expert, not a row of a global plan. */
__device__ __forceinline__ int4 fold_unit(const fold_smem &fs, int E, int tok0, int u) {
  int lo = 0, hi = E; /* the last expert whose first unit is <= u: u0[E] > u */
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (fs.u0[mid] <= u)
      lo = mid;
    else
      hi = mid;
  }
  const int c = fs.count[lo], nseg = (c + tok0 - 1) / tok0, local = u - fs.u0[lo];
  const int t = local / nseg, s = local - t * nseg;
  return make_int4(lo, t, s * tok0, min(tok0, c - s * tok0));
}

/* The prologue of a folded gate_up CTA (NT threads, every thread): the ids
 * into shared memory, counted by expert, and the scan; CTA 0 also writes
 * the per-expert arrays, ids_safe and the bad-id record (as the plan
 * kernel's CTA 0 does, route.cu). gate_up's tiling: tok0 rows a unit,
 * n_tiles0 N tiles. The ids are read as 16-byte vectors, consecutive
 * threads at consecutive addresses (f.ids 16-byte aligned): read 16
 * entries a thread apart, they took 4x the L2 requests, from every CTA.
 * scratch: shared memory free until it returns (3 (NT / 32 + 2) ints).
 * Ends with a barrier. */
template <int NT>
__device__ void fold_count(const fold_args &f, const gqmm__cu_plan &p, int E, int tok0,
                           int n_tiles0, const fold_smem &fs, int32_t *scratch) {
  constexpr int kWarps = NT / 32, kVec = kFoldPer / 4;
  const int tid = threadIdx.x;
  const bool lead = blockIdx.x == 0;
  int32_t(*ws)[3] = reinterpret_cast<int32_t(*)[3]>(scratch);
  int32_t *first_bad = &ws[kWarps + 1][0];
  for (int e = tid; e < E; e += NT)
    fs.count[e] = 0;
  if (tid == 0) *first_bad = INT_MAX;
  int4 id[kVec]; /* entries 4 (j NT + tid) + 0..3; all loads in flight at once */
#pragma unroll
  for (int j = 0; j < kVec; j++) {
    const int b0 = 4 * (j * NT + tid);
    if (b0 + 3 < f.pairs) {
      id[j] = __ldg(reinterpret_cast<const int4 *>(f.ids) + j * NT + tid);
    } else {
      int32_t v[4];
      for (int i = 0; i < 4; i++)
        v[i] = b0 + i < f.pairs ? __ldg(f.ids + b0 + i) : -1;
      id[j] = make_int4(v[0], v[1], v[2], v[3]);
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kVec; j++) {
    const int b0 = 4 * (j * NT + tid);
    const int32_t in[4] = {id[j].x, id[j].y, id[j].z, id[j].w};
    int32_t safe[4];
    uint32_t word = 0;
    for (int i = 0; i < 4; i++) {
      uint32_t e8 = 0xFFu;
      safe[i] = 0;
      if (b0 + i < f.pairs) {
        const bool bad = (uint32_t)in[i] >= (uint32_t)E;
        safe[i] = bad ? 0 : in[i];
        if (lead && bad) atomicMin(first_bad, b0 + i);
        atomicAdd(&fs.count[safe[i]], 1);
        e8 = (uint32_t)safe[i];
      }
      word |= e8 << (8 * i);
    }
    *reinterpret_cast<uint32_t *>(fs.ids + b0) = word;
    if (lead && f.ids_safe) /* CTA 0 only; the plan's array is only 4-byte aligned */
      for (int i = 0; i < 4 && b0 + i < f.pairs; i++)
        f.ids_safe[b0 + i] = safe[i];
  }
  __syncthreads();
  if (lead && tid == 0 && f.err && *first_bad != INT_MAX) { /* as route.cu */
    volatile int32_t *r = f.err;
    r[1] = *first_bad, r[2] = f.ids[*first_bad], r[3] = E, r[4] = f.top_k;
    __threadfence_system();
    r[0] = f.call;
  }
  /* Exclusive prefix over experts of rows and of both tilings' units. */
  int32_t carry[3] = {0, 0, 0};
  for (int base = 0; base < E; base += NT) {
    const int e = base + tid;
    const int32_t c = e < E ? fs.count[e] : 0;
    int32_t v[3] = {c, (c + tok0 - 1) / tok0 * n_tiles0, (c + f.tok1 - 1) / f.tok1 * f.n_tiles1};
    const int32_t own[3] = {v[0], v[1], v[2]};
    int32_t tot[3];
    block_scan3<NT>(v, tot, ws);
    if (e < E) {
      const int32_t first = carry[0] + v[0] - own[0], a0 = carry[1] + v[1] - own[1],
                    a1 = carry[2] + v[2] - own[2];
      fs.u0[e] = a0, fs.row_start[e] = first, fs.u1[e] = a1;
      if (lead) {
        p.count[e] = c, p.row_start[e] = first, p.unit_start[e] = a0;
        f.unit_start2[e] = a1;
      }
    }
    for (int i = 0; i < 3; i++)
      carry[i] += tot[i];
  }
  if (tid == 0) {
    fs.u0[E] = carry[1];
    if (lead) p.unit_start[E] = carry[1], f.unit_start2[E] = carry[2];
  }
  __syncthreads();
}

/* The down GEMM's plan for the experts blockIdx.x, + gridDim.x, ...: their
 * unit descriptors, and their rows in entry order (down reads h row p, the
 * out row of pair p). After fold_count; every thread calls it. A folded
 * gate_up calls it once its first weight copies are in flight. */
template <int NT>
__device__ void fold_down_plan(const fold_args &f, const gqmm__cu_plan &p, int E,
                               const fold_smem &fs) {
  const int tid = threadIdx.x;
  for (int e = (int)blockIdx.x; e < E; e += (int)gridDim.x) {
    const int32_t c = fs.count[e], first = fs.row_start[e];
    if (c == 0) continue; /* the same for every thread */
    const int32_t nseg = (c + f.tok1 - 1) / f.tok1;
    int4 *units = reinterpret_cast<int4 *>(f.units2) + fs.u1[e];
    for (int32_t local = tid; local < nseg * f.n_tiles1; local += NT) {
      const int32_t t = local / nseg, s = local - t * nseg;
      units[local] = make_int4(e, t, first + s * f.tok1, min(f.tok1, c - s * f.tok1));
    }
    uint32_t mine;
    int32_t at = first + fold_rank<NT>(fs, e, &mine);
    for (; mine; mine &= mine - 1)
      p.rows_o[at++] = kFoldPer * tid + (__ffs(mine) - 1);
  }
}

} // namespace gqmm_cu

#endif
