/*
 * moe.cu - the elementwise kernels of the MoE expert layer on the GPU
 * (moe_cuda.c chains them with the routing plan and the gathered GEMMs):
 * the gather indices of the two GEMMs, the gated activation and the weighted
 * combine of the k slots of each token.
 *
 * Numerics follow the CPU composition (src/moe/moe_compose.c) operation by
 * operation: float32 math with explicit round-to-nearest multiplies and adds
 * (no FMA contraction, like the -std=c11 host code; act.cuh), each result
 * rounded to the dtype once. The combine sums the slots in ascending order in one
 * thread per output element: no atomics, so the bits do not depend on the
 * schedule.
 */
#include "act.cuh"
#include "kernels.h"
#include "ptx.cuh"

#include <cuda_runtime.h>
#include <initializer_list>

using namespace gqmm_cu;

namespace {

constexpr int kThreads = 256;

__global__ void indices_kernel(int32_t *tok, int32_t *iota, int32_t R, int32_t top_k) {
  const int32_t p = blockIdx.x * kThreads + threadIdx.x;
  if (p < R) tok[p] = p / top_k, iota[p] = p;
}

/* V consecutive elements moved as one aligned access (16 bytes when V > 1). */
template <typename T, int V> struct __align__(sizeof(T) * V) pack {
  T v[V];
};

/* The (row, first column) of this thread in a rows x cols grid of V
 * columns per thread, numbered row-major over a 1-D grid: every CTA is
 * full whatever cols is (a CTA per row left most threads idle for the
 * seed's 704 or 2816 columns). false past the end. */
template <int V> __device__ __forceinline__ bool flat_at(int64_t rows, int64_t cols, int64_t *r,
                                                        int64_t *c) {
  const int64_t per_row = cols / V, g = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  *r = g / per_row;
  *c = (g - *r * per_row) * V;
  return *r < rows;
}

/* V columns per thread; V > 1 needs I, gs and uo multiples of V and
 * 16-byte aligned buffers. */
template <typename T, int V>
__global__ void act_kernel(int act, const T *__restrict__ gu, int64_t gs, int64_t uo,
                           T *__restrict__ h, int64_t R, int64_t I) {
  int64_t r, i;
  if (!flat_at<V>(R, I, &r, &i)) return;
  using P = pack<T, V>;
  const P g = *(const P *)(gu + r * gs + i), u = *(const P *)(gu + r * gs + uo + i);
  P o;
#pragma unroll
  for (int v = 0; v < V; v++)
    o.v[v] = dtype_traits<T>::from_f(
        act_f(act, dtype_traits<T>::to_f(g.v[v]), dtype_traits<T>::to_f(u.v[v])));
  *(P *)(h + r * I + i) = o;
}

/* out[t, n..n+V) = sum_j w[t, j] y[t k + j, n..n+V), ascending j.
 * V columns per thread; V > 1 needs H a multiple of V and y, out 16-byte
 * aligned. A token with a bad id is all NaN: its sum starts at NaN (the ids
 * are the same few words for the CTA's few tokens). */
template <typename T, int V>
__device__ __forceinline__ void combine_cols(const T *__restrict__ y, const T *__restrict__ w,
                                             const int32_t *__restrict__ ids, uint32_t E,
                                             T *__restrict__ out, int64_t t, int64_t k,
                                             int64_t H, int64_t n) {
  using P = pack<T, V>;
  bool bad = false;
#pragma unroll
  for (int64_t j = 0; j < k; j++) bad |= (uint32_t)__ldg(ids + t * k + j) >= E;
  float acc[V];
#pragma unroll
  for (int v = 0; v < V; v++) acc[v] = bad ? __int_as_float(0x7fc00000) : 0.0f;
#pragma unroll
  for (int64_t j = 0; j < k; j++) {
    const float wt = dtype_traits<T>::to_f(w[t * k + j]);
    const P yv = *(const P *)(y + (t * k + j) * H + n);
#pragma unroll
    for (int v = 0; v < V; v++)
      acc[v] = __fadd_rn(acc[v], __fmul_rn(wt, dtype_traits<T>::to_f(yv.v[v])));
  }
  P o;
#pragma unroll
  for (int v = 0; v < V; v++) o.v[v] = dtype_traits<T>::from_f(acc[v]);
  *(P *)(out + t * H + n) = o;
}

/* KC: top_k known at compile time (0: the run-time k), so the k loads of a
 * thread are unrolled and all in flight at once. DROP (16 bytes a thread,
 * y and its rows 128-byte aligned): y is dead once read, so its lines are
 * dropped from L2 instead of written back to memory, where they went while
 * the next layer's gate_up streamed its weights (the seed layer's y is
 * 11.5 MB). The 8 lanes of a line meet at the warp barrier first; every
 * 8-lane group is wholly inside or past the end (rows of H / V threads, a
 * multiple of 8). */
template <typename T, int V, int KC, bool DROP>
__global__ void combine_kernel(const T *__restrict__ y, const T *__restrict__ w,
                               const int32_t *__restrict__ ids, uint32_t E, T *__restrict__ out,
                               int64_t T_, int64_t k_rt, int64_t H, const uint8_t *dead,
                               int64_t dead_lines) {
  const int64_t k = KC ? KC : k_rt;
  int64_t t, n;
  const bool in = flat_at<V>(T_, H, &t, &n);
  if (in) combine_cols<T, V>(y, w, ids, E, out, t, k, H, n);
  /* the layer's other dead scratch (see gqmm__cu_moe_combine), a line or so a thread */
  const int64_t g = (int64_t)blockIdx.x * kThreads + threadIdx.x, G = (int64_t)gridDim.x * kThreads;
  for (int64_t l = g; l < dead_lines; l += G) discard_l2_line(dead + l * 128);
  if constexpr (DROP) {
    static_assert(V * sizeof(T) == 16, "8 lanes a 128-byte line");
    __syncwarp();
    if (in && (n / V) % 8 == 0)
#pragma unroll
      for (int64_t j = 0; j < k; j++) discard_l2_line(y + (t * k + j) * H + n);
  }
}

/* CTAs of kThreads for rows x cols at V columns per thread (flat_at);
 * false if that exceeds CUDA's grid limit. */
bool grid_flat(int64_t rows, int64_t cols, int V, unsigned *blocks) {
  if (rows < 1 || cols < V) return false;
  /* rows x cols elements are in memory: the product fits int64 */
  const int64_t threads = rows * (cols / V), n = (threads + kThreads - 1) / kThreads;
  if (n > INT32_MAX) return false;
  *blocks = (unsigned)n;
  return true;
}

/* 16 bytes per thread when every row start is 16-byte aligned, else 1. */
template <typename T> int vec_width(std::initializer_list<int64_t> counts,
                                    std::initializer_list<const void *> ptrs) {
  constexpr int V = 16 / sizeof(T);
  for (int64_t c : counts)
    if (c % V) return 1;
  for (const void *p : ptrs)
    if ((uintptr_t)p % 16) return 1;
  return V;
}

template <typename T>
int act_launch(int act, const void *gu, int64_t gs, int64_t uo, void *h, int64_t R, int64_t I,
               cudaStream_t st) {
  constexpr int VW = 16 / sizeof(T);
  const int V = vec_width<T>({I, gs, uo}, {gu, h});
  unsigned g;
  if (!grid_flat(R, I, V, &g)) return (int)cudaErrorInvalidConfiguration;
  if (V == VW)
    act_kernel<T, VW><<<g, kThreads, 0, st>>>(act, (const T *)gu, gs, uo, (T *)h, R, I);
  else
    act_kernel<T, 1><<<g, kThreads, 0, st>>>(act, (const T *)gu, gs, uo, (T *)h, R, I);
  return (int)cudaGetLastError();
}

template <typename T>
int combine_launch(const void *y, const void *w, const int32_t *ids, int32_t E, void *out,
                   int64_t T_, int64_t k, int64_t H, const void *dead, int64_t dead_bytes,
                   cudaStream_t st) {
  constexpr int VW = 16 / sizeof(T);
  const int V = vec_width<T>({H}, {y, out});
  unsigned g;
  if (!grid_flat(T_, H, V, &g)) return (int)cudaErrorInvalidConfiguration;
  const uint32_t e = (uint32_t)E;
  const T *yt = (const T *)y, *wt = (const T *)w;
  /* the whole 128-byte lines of the dead region */
  const uintptr_t d0 = ((uintptr_t)dead + 127) / 128 * 128;
  const int64_t nl = dead && dead_bytes > (int64_t)(d0 - (uintptr_t)dead)
                         ? (dead_bytes - (int64_t)(d0 - (uintptr_t)dead)) / 128
                         : 0;
  const uint8_t *dl = (const uint8_t *)d0;
  /* y's lines dropped after use (combine_kernel DROP) */
  const bool drop = V == VW && (H * (int64_t)sizeof(T)) % 128 == 0 && (uintptr_t)y % 128 == 0;
  if (drop && k == 8) /* the common top-8 */
    combine_kernel<T, VW, 8, true>
        <<<g, kThreads, 0, st>>>(yt, wt, ids, e, (T *)out, T_, k, H, dl, nl);
  else if (drop)
    combine_kernel<T, VW, 0, true>
        <<<g, kThreads, 0, st>>>(yt, wt, ids, e, (T *)out, T_, k, H, dl, nl);
  else if (V == VW)
    combine_kernel<T, VW, 0, false>
        <<<g, kThreads, 0, st>>>(yt, wt, ids, e, (T *)out, T_, k, H, dl, nl);
  else
    combine_kernel<T, 1, 0, false>
        <<<g, kThreads, 0, st>>>(yt, wt, ids, e, (T *)out, T_, k, H, dl, nl);
  return (int)cudaGetLastError();
}

} // namespace

extern "C" int gqmm__cu_moe_indices(int32_t *tok, int32_t *iota, int32_t R, int32_t top_k,
                                    gqmm__cu_stream stream) {
  if (R < 1) return 0;
  indices_kernel<<<(R + kThreads - 1) / kThreads, kThreads, 0, stream>>>(tok, iota, R, top_k);
  return (int)cudaGetLastError();
}

/* The dtype's instantiation of a templated launcher. */
#define GQMM__CU_DISPATCH(dtype, FN, ...)                                                         \
  switch (dtype) {                                                                                \
  case GQMM__CU_F32: return FN<float>(__VA_ARGS__);                                               \
  case GQMM__CU_F16: return FN<__half>(__VA_ARGS__);                                              \
  case GQMM__CU_BF16: return FN<__nv_bfloat16>(__VA_ARGS__);                                      \
  default: return (int)cudaErrorInvalidValue;                                                     \
  }

extern "C" int gqmm__cu_moe_act(int dtype, int act, const void *gu, int64_t gs, int64_t uo, void *h,
                                int64_t R, int64_t I, gqmm__cu_stream stream) {
  GQMM__CU_DISPATCH(dtype, act_launch, act, gu, gs, uo, h, R, I, stream)
}

extern "C" int gqmm__cu_moe_combine(int dtype, const void *y, const void *w, const int32_t *ids,
                                    int32_t E, void *out, int64_t T, int64_t k, int64_t H,
                                    const void *dead, int64_t dead_bytes, gqmm__cu_stream stream) {
  GQMM__CU_DISPATCH(dtype, combine_launch, y, w, ids, E, out, T, k, H, dead, dead_bytes, stream)
}
