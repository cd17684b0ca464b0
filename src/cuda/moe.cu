/*
 * moe.cu - the elementwise kernels of the MoE expert layer on the GPU
 * (moe_cuda.c chains them with the routing plan and the gathered GEMMs):
 * the gather indices of the two GEMMs, the gated activation and the weighted
 * combine of the k slots of each token.
 *
 * Numerics follow the CPU composition (src/moe/moe_compose.c) operation by
 * operation: float32 math with explicit round-to-nearest multiplies and adds
 * (no FMA contraction, like the -std=c11 host code), each result rounded to
 * the dtype once. The combine sums the slots in ascending order in one
 * thread per output element: no atomics, so the bits do not depend on the
 * schedule.
 */
#include "kernels.h"
#include "ptx.cuh"

#include <cuda_runtime.h>

using namespace gqmm_cu;

namespace {

constexpr int kThreads = 256;

__global__ void indices_kernel(int32_t *tok, int32_t *iota, int32_t R, int32_t top_k) {
  const int32_t p = blockIdx.x * kThreads + threadIdx.x;
  if (p < R) tok[p] = p / top_k, iota[p] = p;
}

/* The same expressions as gqmm__moe_act (src/moe/moe_compose.c). */
__device__ __forceinline__ float act_f(int act, float g, float u) {
  if (act == 1) { /* GeGLU: gelu_tanh(g) * u, 1 + tanh(z) = 2 - 2 / (exp(2z) + 1) */
    const float c = 0.7978845608028654f;
    const float z = __fmul_rn(c, __fadd_rn(g, __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, g), g), g)));
    const float t = __fsub_rn(2.0f, __fdiv_rn(2.0f, __fadd_rn(expf(__fmul_rn(2.0f, z)), 1.0f)));
    return __fmul_rn(__fmul_rn(__fmul_rn(0.5f, g), t), u);
  }
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u); /* SwiGLU: silu(g) * u */
}

/* Row r (blockIdx.x), columns of blockIdx.y's stripe. */
template <typename T>
__global__ void act_kernel(int act, const T *__restrict__ gu, int64_t gs, int64_t uo,
                           T *__restrict__ h, int64_t I) {
  const int64_t r = blockIdx.x, i = (int64_t)blockIdx.y * kThreads + threadIdx.x;
  if (i >= I) return;
  const float g = dtype_traits<T>::to_f(gu[r * gs + i]), u = dtype_traits<T>::to_f(gu[r * gs + uo + i]);
  h[r * I + i] = dtype_traits<T>::from_f(act_f(act, g, u));
}

template <typename T>
__global__ void combine_kernel(const T *__restrict__ y, const T *__restrict__ w, T *__restrict__ out,
                               int64_t k, int64_t H) {
  const int64_t t = blockIdx.x, n = (int64_t)blockIdx.y * kThreads + threadIdx.x;
  if (n >= H) return;
  float acc = 0.0f;
  for (int64_t j = 0; j < k; j++) {
    const float wt = dtype_traits<T>::to_f(w[t * k + j]);
    acc = __fadd_rn(acc, __fmul_rn(wt, dtype_traits<T>::to_f(y[(t * k + j) * H + n])));
  }
  out[t * H + n] = dtype_traits<T>::from_f(acc);
}

/* Grid of `rows` x column stripes; false if it exceeds CUDA's grid limits. */
bool grid_2d(int64_t rows, int64_t cols, dim3 *g) {
  const int64_t stripes = (cols + kThreads - 1) / kThreads;
  if (rows < 1 || rows > INT32_MAX || stripes < 1 || stripes > 65535) return false;
  *g = dim3((unsigned)rows, (unsigned)stripes);
  return true;
}

} // namespace

extern "C" int gqmm__cu_moe_indices(int32_t *tok, int32_t *iota, int32_t R, int32_t top_k) {
  if (R < 1) return 0;
  indices_kernel<<<(R + kThreads - 1) / kThreads, kThreads>>>(tok, iota, R, top_k);
  return (int)cudaGetLastError();
}

/* Instantiate a dtype-templated launch for the three element types. */
#define GQMM__CU_DISPATCH(dtype, LAUNCH)                                                          \
  switch (dtype) {                                                                                \
  case GQMM__CU_F32: LAUNCH(float); break;                                                        \
  case GQMM__CU_F16: LAUNCH(__half); break;                                                       \
  case GQMM__CU_BF16: LAUNCH(__nv_bfloat16); break;                                               \
  default: return (int)cudaErrorInvalidValue;                                                     \
  }

extern "C" int gqmm__cu_moe_act(int dtype, int act, const void *gu, int64_t gs, int64_t uo, void *h,
                                int64_t R, int64_t I) {
  dim3 g;
  if (!grid_2d(R, I, &g)) return (int)cudaErrorInvalidConfiguration;
#define GQMM__ACT_LAUNCH(T) act_kernel<T><<<g, kThreads>>>(act, (const T *)gu, gs, uo, (T *)h, I)
  GQMM__CU_DISPATCH(dtype, GQMM__ACT_LAUNCH)
#undef GQMM__ACT_LAUNCH
  return (int)cudaGetLastError();
}

extern "C" int gqmm__cu_moe_combine(int dtype, const void *y, const void *w, void *out, int64_t T,
                                    int64_t k, int64_t H) {
  dim3 g;
  if (!grid_2d(T, H, &g)) return (int)cudaErrorInvalidConfiguration;
#define GQMM__COMBINE_LAUNCH(TY)                                                                  \
  combine_kernel<TY><<<g, kThreads>>>((const TY *)y, (const TY *)w, (TY *)out, k, H)
  GQMM__CU_DISPATCH(dtype, GQMM__COMBINE_LAUNCH)
#undef GQMM__COMBINE_LAUNCH
  return (int)cudaGetLastError();
}
