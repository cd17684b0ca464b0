/*
 * qmm_generic.cu - the generic batched qmm kernel: every bit width (2..8),
 * group size, dtype (f32/f16/bf16) and both transpose modes. One thread per
 * output element, k ascending, float32 arithmetic with the reference's exact
 * rounding (w = s*q + b, then acc += x*w, no FMA contraction), so its results
 * match src/ref bit for bit. Correct, not fast: it is the path for 5/6-bit,
 * f32, transpose=false and anything the tensor-core kernel declines.
 * Layout: MLX's (transpose: w[e] is N rows of K values; else K rows of N),
 * each row a little-endian bit stream.
 */
#include "kernels.h"
#include "ptx.cuh"
#include "wfmt.cuh"

#include <cuda_runtime.h>

using namespace gqmm_cu;

namespace {

template <typename T> __global__ void generic_kernel(gqmm__cu_qmm a) {
  const int64_t total = a.batch * a.M * a.N;
  const int64_t wrows = a.transpose ? a.N : a.K, wlen = a.transpose ? a.K : a.N;
  const int64_t row_bytes = wlen * a.bits / 8, groups = wlen / a.group_size;
  const T *x = (const T *)a.x, *sc = (const T *)a.scales, *bi = (const T *)a.biases;
  for (int64_t o = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; o < total;
       o += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = o % a.N, bm = o / a.N, m = bm % a.M, b = bm / a.M;
    const int64_t e = a.w_index[b];
    const T *xr = x + ((int64_t)a.x_index[b] * a.M + m) * a.K;
    const uint8_t *w = (const uint8_t *)a.w + e * wrows * row_bytes;
    const int64_t sb = e * wrows * groups;
    float acc = 0.f;
    for (int64_t k = 0; k < a.K; k++) {
      const int64_t r = a.transpose ? n : k, j = a.transpose ? k : n;
      const int64_t gi = sb + r * groups + j / a.group_size;
      const float q = (float)stream_value(w + r * row_bytes, a.bits, j);
      const float wv = __fadd_rn(__fmul_rn(dtype_traits<T>::to_f(sc[gi]), q),
                                 dtype_traits<T>::to_f(bi[gi]));
      acc = __fadd_rn(acc, __fmul_rn(dtype_traits<T>::to_f(xr[k]), wv));
    }
    ((T *)a.out)[o] = dtype_traits<T>::from_f(acc);
  }
}

} // namespace

extern "C" int gqmm__cu_generic_run(const gqmm__cu_qmm *a, gqmm__cu_stream stream) {
  const int64_t total = a->batch * a->M * a->N;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535 * 8) blocks = 65535 * 8; /* grid-stride covers the rest */
  if (blocks < 1) return 0;
  switch (a->dtype) {
  case GQMM__CU_F32:
    generic_kernel<float><<<(unsigned)blocks, threads, 0, stream>>>(*a);
    break;
  case GQMM__CU_F16:
    generic_kernel<__half><<<(unsigned)blocks, threads, 0, stream>>>(*a);
    break;
  case GQMM__CU_BF16:
    generic_kernel<__nv_bfloat16><<<(unsigned)blocks, threads, 0, stream>>>(*a);
    break;
  default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
