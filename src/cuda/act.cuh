/*
 * act.cuh - the gated activations of the MoE layer on the GPU, in float32:
 * the expressions of gqmm__moe_act (src/moe/moe_compose.c), with explicit
 * round-to-nearest multiplies and adds (no FMA contraction, like the
 * -std=c11 host code), but the exponential and the division of the fast
 * hardware paths (__expf, __fdividef: a few ulp of float32, ~1e-6
 * relative, far below the bf16/f16 rounding of the result): the fused
 * gate_up epilogue evaluates 16 of these per thread per work unit, and the
 * IEEE-exact versions took 8 us of a 126 us GEMM on the H100. Used by the
 * activation kernel (moe.cu) and the fused epilogue (mma_common.cuh), so
 * both GPU paths give the same bits.
 */
#ifndef GQMM_CUDA_ACT_CUH
#define GQMM_CUDA_ACT_CUH

#include <cuda_runtime.h>

namespace gqmm_cu {

/* act: gqmm_activation (0 SwiGLU, 1 GeGLU); g the gate value, u the up value. */
__device__ __forceinline__ float act_f(int act, float g, float u) {
  if (act == 1) { /* GeGLU: gelu_tanh(g) * u, 1 + tanh(z) = 2 - 2 / (exp(2z) + 1) */
    const float c = 0.7978845608028654f;
    const float z = __fmul_rn(c, __fadd_rn(g, __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, g), g), g)));
    const float t = __fsub_rn(2.0f, __fdividef(2.0f, __fadd_rn(__expf(__fmul_rn(2.0f, z)), 1.0f)));
    return __fmul_rn(__fmul_rn(__fmul_rn(0.5f, g), t), u);
  }
  return __fmul_rn(__fdividef(g, __fadd_rn(1.0f, __expf(-g))), u); /* SwiGLU: silu(g) * u */
}

} // namespace gqmm_cu

#endif
