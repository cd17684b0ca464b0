/*
 * route.cu - the routing plan on the GPU: batch entries (x row, expert) of a
 * batched qmm -> rows grouped by expert and the list of work units of the
 * tensor-core kernel, in one small kernel (no host round trip).
 *
 * Every CTA (256 or 1024 threads) counts the entries by expert in shared memory
 * and scans the counts (a warp-shuffle block scan over the experts), so
 * each knows every expert's first row and first units; then CTA c places
 * the rows and unit descriptors of experts c, c + grid, ...: a CTA per
 * expert, all at once. One CTA did it all before and took ~13 us of latency
 * a layer, mostly the scatter's chain of global loads and shared atomics;
 * here each CTA's chain is one expert long. A CTA places its expert's rows
 * in entry order (each thread ranks a run of entries, one block scan), so
 * the plan is the same every run. When E is too large for shared memory,
 * one CTA keeps its counters in the plan's global arrays and places rows
 * with atomics (their order inside an expert then varies, but every output
 * row is computed alone with a fixed reduction order: the results do not).
 *
 * The MoE layer (gqmm__cu_moe_route) also checks its expert ids here, the
 * first kernel of the layer, so the host never reads them: an id outside
 * [0, E) is routed to expert 0 (always in bounds; the layer's combine turns
 * the token's output into NaN) and the first such pair is written to a
 * host-mapped error record that the host reads at its next sync. The same
 * kernel writes the unit lists of both GEMMs of the layer (gate_up and down
 * tile N differently; rows and counts are shared).
 */
#include "kernels.h"

#include <climits>
#include <cuda_runtime.h>

namespace {

/* Threads of the loop form's CTAs. */
constexpr int kThreads = 1024;
/* The register form (route_body's P > 0), up to kSmallThreads * kPer
 * entries (the seed layer's 2048 pairs): CTAs of kSmallThreads, each thread
 * holding kPer entries, so the ids are loaded once, in one round trip, and
 * ranked from registers, and the barriers and scans are short. Larger
 * batches take the loop form: at 1024 threads the register form measured
 * no faster at 4096 pairs and slower at 16384 (16 entries a thread; H100,
 * perf-notes session 11). */
constexpr int kPer = 8, kSmallThreads = 256;
/* Experts whose four per-expert ints fit the default 48 KB of shared memory. */
constexpr int kSharedExperts = 2048;

struct route_args {
  const int32_t *x_index; /* NULL: the x row of entry b is b / x_div */
  const int32_t *w_index;
  int32_t batch, M, experts, x_div;
  int32_t tok[2], n_tiles[2]; /* n_tiles[1] == 0: one tiling only */
  int32_t *unit_start2;       /* [E+1] of the second tiling */
  int32_t *units2;            /* unit descriptors of the second tiling */
  int32_t *w_safe;            /* NULL, or [batch]: w_index with bad ids -> 0 */
  int32_t *err;               /* NULL, or the error record (kernels.h) */
  int32_t call;
  int sms; /* multiprocessors: the shared-memory form's grid (launch) */
  gqmm__cu_plan p;
  cudaStream_t stream;
};

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
    for (int i = 0; i < 3; i++) ws[warp][i] = v[i];
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
  for (int i = 0; i < 3; i++) v[i] += ws[warp][i], tot[i] = ws[kWarps][i];
  __syncthreads(); /* ws may be reused */
}

/* Per-expert state: shared memory when E fits (route_body is inlined into
 * each kernel, so the compiler sees which memory the pointers address and
 * emits shared atomics and loads), else the plan's global arrays. The
 * descriptor pass reads counts and unit starts from here, not from the
 * plan's outputs in global memory (a round trip per expert). */
struct expert_state {
  int32_t *start; /* counts, then (after the scan) first rows */
  int32_t *fill;  /* rows placed so far (the one-CTA form only) */
  int32_t *count, *units0, *units1; /* count, first unit of each tiling */
};

/* An id outside [0, E) (int32 < 0 or >= E; uint32 > INT32_MAX reads < 0). */
__device__ __forceinline__ bool bad_id(const route_args &a, int32_t id) {
  return (uint32_t)id >= (uint32_t)a.experts;
}
/* Entry b's expert, a bad id read as 0. */
__device__ __forceinline__ int32_t expert_of(const route_args &a, int b) {
  const int32_t id = __ldg(a.w_index + b);
  return bad_id(a, id) ? 0 : id;
}

/* Write the M rows of entry b at row `at` of the plan. */
__device__ __forceinline__ void place(const route_args &a, int b, int32_t at) {
  const int32_t xr = a.x_index ? __ldg(a.x_index + b) : b / a.x_div;
  for (int32_t m = 0; m < a.M; m++) {
    a.p.rows_x[at + m] = xr * a.M + m;
    a.p.rows_o[at + m] = b * a.M + m;
  }
}

/* ORDERED (shared-memory state, any grid): CTA c places the experts c,
 * c + grid, ... in entry order. Else (one CTA, global state): rows placed
 * with atomics. Only CTA 0 writes the per-expert arrays, ids_safe and the
 * error record. NT threads a CTA. P > 0 (ORDERED, batch <= NT * P): thread
 * t holds the experts of entries [t P, t P + P) in registers from the count
 * to the ranking; P = 0: entries read in loops, as often as needed (the
 * ranking re-reads them). The register form exists for latency: the seed
 * layer's plan (2048 pairs) took 7.1 us in the loop form at 1024 threads
 * and takes 6.5 here (H100, ncu at real clocks: 1.8 M warp instructions
 * then, 0.67 M now). What is left is latency: barriers, the ids' loads. */
template <bool ORDERED, int NT, int P>
__device__ __forceinline__ void route_body(const route_args &a, const expert_state &es) {
  static_assert(P == 0 || ORDERED, "the register form places rows in entry order");
  constexpr int kWarps = NT / 32;
  __shared__ int32_t ws[kWarps + 1][3];
  __shared__ int32_t first_bad;
  const int tid = threadIdx.x, E = a.experts;
  const bool lead = blockIdx.x == 0;
  const gqmm__cu_plan &p = a.p;
  int32_t *start = es.start, *fill = es.fill;
  for (int e = tid; e < E; e += NT) {
    start[e] = 0;
    if (!ORDERED) fill[e] = 0;
  }
  if (tid == 0) first_bad = INT_MAX;
  /* the register form: the thread's entries' experts (-1 past the batch),
   * all P loads in flight at once, before the barrier */
  int32_t mine[P > 0 ? P : 1];
#pragma unroll
  for (int i = 0; i < P; i++) {
    const int b = tid * P + i;
    mine[i] = b < a.batch ? __ldg(a.w_index + b) : -1;
  }
  __syncthreads();
  auto count = [&](int b, int32_t id) { /* returns the expert (bad ids: 0) */
    const int32_t e = bad_id(a, id) ? 0 : id;
    if (lead && bad_id(a, id)) atomicMin(&first_bad, b);
    if (lead && a.w_safe) a.w_safe[b] = e;
    atomicAdd(&start[e], a.M);
    return e;
  };
  if constexpr (P > 0) {
#pragma unroll
    for (int i = 0; i < P; i++)
      if (tid * P + i < a.batch) mine[i] = count(tid * P + i, mine[i]);
  } else {
    for (int b = tid; b < a.batch; b += NT) count(b, __ldg(a.w_index + b));
  }
  __syncthreads();
  if (lead && tid == 0 && a.err && first_bad != INT_MAX) {
    /* Fields first, the call number last: the host reads the call number
     * and then trusts the rest. Plain stores: atomics on mapped host memory
     * are not guaranteed across PCIe. */
    volatile int32_t *r = a.err;
    r[1] = first_bad, r[2] = a.w_index[first_bad], r[3] = E, r[4] = a.x_div;
    __threadfence_system();
    r[0] = a.call;
  }
  /* Exclusive prefix over experts of rows and of both tilings' units. */
  int32_t carry[3] = {0, 0, 0};
  for (int base = 0; base < E; base += NT) {
    const int e = base + tid;
    const int32_t c = e < E ? start[e] : 0;
    int32_t v[3] = {c, 0, 0}, tot[3];
    for (int i = 0; i < 2; i++) v[i + 1] = (c + a.tok[i] - 1) / a.tok[i] * a.n_tiles[i];
    const int32_t own[3] = {v[0], v[1], v[2]};
    block_scan3<NT>(v, tot, ws);
    if (e < E) {
      const int32_t first = carry[0] + v[0] - own[0], u0 = carry[1] + v[1] - own[1],
                    u1 = carry[2] + v[2] - own[2];
      if (lead) {
        p.count[e] = c;
        p.row_start[e] = first;
        p.unit_start[e] = u0;
        if (a.n_tiles[1]) a.unit_start2[e] = u1;
      }
      start[e] = first; /* each thread rewrites only its own expert */
      es.count[e] = c, es.units0[e] = u0;
      if (a.n_tiles[1]) es.units1[e] = u1;
    }
    for (int i = 0; i < 3; i++) carry[i] += tot[i];
  }
  if (lead && tid == 0) {
    p.unit_start[E] = carry[1];
    if (a.n_tiles[1]) a.unit_start2[E] = carry[2];
  }
  __syncthreads();
  /* The unit descriptors (kernels.h) of this CTA's experts: a warp per
   * expert, its lanes over the expert's units (a dense call has one expert
   * with thousands of them). */
  const int lane = tid & 31, step = (int)gridDim.x;
  for (int e = (int)blockIdx.x + (tid >> 5) * step; e < E; e += kWarps * step) {
    const int32_t c = es.count[e], first = start[e];
    if (c == 0) continue;
    for (int i = 0; i < (a.n_tiles[1] ? 2 : 1); i++) {
      int4 *units = reinterpret_cast<int4 *>(i ? a.units2 : p.units) +
                    (i ? es.units1[e] : es.units0[e]);
      const int32_t tok = a.tok[i], nseg = (c + tok - 1) / tok;
      for (int32_t local = lane; local < nseg * a.n_tiles[i]; local += 32) {
        const int32_t t = nseg == 1 ? local : local / nseg, s = local - t * nseg;
        units[local] = make_int4(e, t, first + s * tok, min(tok, c - s * tok));
      }
    }
  }
  if constexpr (ORDERED) {
    /* The rows of each expert of this CTA in entry order: thread t ranks
     * the run of entries [t * per, (t + 1) * per). */
    const int per = P > 0 ? P : (a.batch + NT - 1) / NT, b0 = min(tid * per, a.batch),
              n = P > 0 ? P : min(b0 + per, a.batch) - b0;
    /* entry b0 + i's expert: held (P > 0: -1 past the batch) or reloaded */
    auto expert_at = [&](int i) { return P > 0 ? mine[i] : expert_of(a, b0 + i); };
    for (int e = (int)blockIdx.x; e < E; e += step) {
      if (es.count[e] == 0) continue; /* the same for every thread */
      int32_t v[3] = {0, 0, 0}, tot[3];
#pragma unroll
      for (int i = 0; i < n; i++)
        v[0] += expert_at(i) == e;
      const int32_t own = v[0];
      block_scan3<NT>(v, tot, ws);
      int32_t at = start[e] + (v[0] - own) * a.M;
#pragma unroll
      for (int i = 0; i < n; i++)
        if (expert_at(i) == e) place(a, b0 + i, at), at += a.M;
    }
  } else {
    for (int b = tid; b < a.batch; b += NT) {
      const int32_t e = expert_of(a, b);
      place(a, b, start[e] + atomicAdd(&fill[e], a.M));
    }
  }
}

template <int NT, int P> __global__ void __launch_bounds__(NT) route_kernel_shared(route_args a) {
  extern __shared__ int32_t smem[]; /* 4E ints */
  const int E = a.experts;
  route_body<true, NT, P>(a, {smem, nullptr, smem + E, smem + 2 * E, smem + 3 * E});
}

/* E too large for shared memory: one CTA, the plan's global scratch (count,
 * fill, unit_start and unit_start2 hold the same values the shared arrays
 * would). */
__global__ void __launch_bounds__(kThreads) route_kernel_global(route_args a) {
  route_body<false, kThreads, 0>(
      a, {a.p.row_start, a.p.fill, a.p.count, a.p.unit_start, a.unit_start2});
}

/* A CTA per expert up to two per multiprocessor (the seed layer: 128 CTAs,
 * each places one expert); with more experts each CTA takes several. */
int launch(const route_args &a) {
  if (a.experts <= kSharedExperts) {
    const int grid = a.experts < 2 * a.sms ? a.experts : 2 * a.sms;
    const size_t sh = 4 * (size_t)a.experts * sizeof(int32_t);
    if (a.batch <= kSmallThreads * kPer)
      route_kernel_shared<kSmallThreads, kPer><<<grid, kSmallThreads, sh, a.stream>>>(a);
    else
      route_kernel_shared<kThreads, 0><<<grid, kThreads, sh, a.stream>>>(a);
  } else {
    route_kernel_global<<<1, kThreads, 0, a.stream>>>(a);
  }
  return (int)cudaGetLastError();
}

} // namespace

extern "C" int gqmm__cu_route(const int32_t *x_index, const int32_t *w_index, int32_t batch,
                              int32_t M, int32_t experts, int32_t tok_max, int32_t n_tiles,
                              gqmm__cu_plan plan, int sms, gqmm__cu_stream stream) {
  route_args a = {};
  a.x_index = x_index, a.w_index = w_index, a.batch = batch, a.M = M, a.experts = experts;
  a.x_div = 1, a.tok[0] = tok_max, a.n_tiles[0] = n_tiles, a.tok[1] = 1, a.p = plan;
  a.sms = sms > 0 ? sms : 1;
  a.stream = stream;
  return launch(a);
}

extern "C" int gqmm__cu_moe_route(const gqmm__cu_moe_route_args *m) {
  route_args a = {};
  a.w_index = m->ids, a.batch = m->pairs, a.M = 1, a.experts = m->experts, a.x_div = m->top_k;
  for (int i = 0; i < 2; i++)
    a.tok[i] = m->tok_max[i] > 0 ? m->tok_max[i] : 1, a.n_tiles[i] = m->n_tiles[i];
  a.unit_start2 = m->unit_start2, a.units2 = m->units2, a.w_safe = m->ids_safe, a.err = m->err;
  a.call = m->call;
  a.sms = m->sms > 0 ? m->sms : 1;
  a.p = m->plan;
  a.stream = m->stream;
  return launch(a);
}
