/*
 * ptx.cuh - small PTX wrappers and dtype traits shared by the .cu files.
 */
#ifndef GQMM_CUDA_PTX_CUH
#define GQMM_CUDA_PTX_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace gqmm_cu {

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

/* Asynchronous global->shared copy of BYTES (4, 8 or 16); with src_bytes = 0
 * the destination is zero-filled and nothing is read. 16-byte copies bypass
 * L1 (.cg): weights are streamed once. */
template <int BYTES>
__device__ __forceinline__ void cp_async(uint32_t dst, const void *src, int src_bytes) {
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src),
                 "n"(BYTES), "r"(src_bytes));
}
/* The same 16-byte copy with an L2 prefetch hint: the L2 fetches the
 * aligned 256 bytes around src from DRAM. A weight row is read 64 bytes per
 * pipeline stage; without the hint DRAM sees scattered 64-byte requests,
 * with it one 256-byte burst per four stages (the rest hit L2). */
__device__ __forceinline__ void cp_async_l2pf(uint32_t dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
/* A read-only 16-bit load with a 128-byte L2 prefetch (the scales of a
 * weight row are read 2-4 bytes per stage). */
__device__ __forceinline__ uint32_t ldg_u16_l2pf(const void *p) {
  unsigned short v;
  asm("ld.global.nc.L2::128B.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* Four 8x8 16-bit matrices from registers in the mma accumulator layout
 * (thread (g, t) holds row g, columns 2t and 2t+1 of matrix i in ri, the
 * lower column in the low half) to shared memory, transposed: column c of
 * matrix i becomes the 16-byte row at the address lane 8i + c gives. */
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1,
                                                  uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ uint4 lds_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

/* ---- bulk copies (the TMA engine, sm_90) tracked by an mbarrier ----------
 * One thread starts a contiguous global->shared copy of `bytes` (a multiple
 * of 16, both addresses 16-byte aligned); the copy counts its bytes against
 * the barrier's expected transaction count, and the barrier's phase
 * completes when they have all landed. Waiting threads see the data. */
__device__ __forceinline__ void mbar_init(uint32_t bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
/* Makes initialized barriers visible to the async (TMA) proxy. */
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
/* Arrive (the barrier's one arrival per phase) expecting `bytes` more. */
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
/* An L2 policy for data read once (the streamed weights): evicted first, so
 * the streams do not push out what is reused (x rows, the layer's h and y). */
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void *src, uint32_t bytes,
                                              uint32_t bar, uint64_t policy) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
               "[%0], [%1], %2, [%3], %4;\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar), "l"(policy)
               : "memory");
}
/* Drop the 128-byte L2 line at p (128-byte aligned) without writing it
 * back to memory; its bytes become undefined. For scratch that is dead. */
__device__ __forceinline__ void discard_l2_line(const void *p) {
  asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(p) : "memory");
}
/* Spin until the barrier's phase with this parity has completed. */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
  } while (!done);
}

/* p, as a value the compiler must keep: address arithmetic on it stays one
 * IMAD.WIDE per use instead of being re-associated into 64-bit adds. */
template <typename P> __device__ __forceinline__ P *opaque(P *p) {
  asm("mov.b64 %0, %0;" : "+l"(p));
  return p;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

/* (a & b) | c in one instruction: the compiler splits it into an AND and an
 * OR (two issue slots per weight pair in the dequantization). */
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

/* Activation/output element types and their tensor-core flavour. */
template <typename T> struct dtype_traits;
template <> struct dtype_traits<__nv_bfloat16> {
  using pair = __nv_bfloat162;
  /* 0x4300 is bf16 128.0: OR-ing q < 128 into the mantissa gives 128 + q. */
  static constexpr uint32_t magic = 0x43004300u;
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  /* lo in the low half: the lower address of a pair */
  static __device__ __forceinline__ uint32_t from_f2(float lo, float hi) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&p);
  }
  /* the low (high) half of w in both halves (see bcast_lo below) */
  static __device__ __forceinline__ pair lo2(pair w) { return __low2bfloat162(w); }
  static __device__ __forceinline__ pair hi2(pair w) { return __high2bfloat162(w); }
};
template <> struct dtype_traits<__half> {
  using pair = __half2;
  /* 0x6400 is f16 1024.0: q < 1024 fits the mantissa exactly. */
  static constexpr uint32_t magic = 0x64006400u;
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t from_f2(float lo, float hi) {
    const __half2 p = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&p);
  }
  static __device__ __forceinline__ pair lo2(pair w) { return __low2half2(w); }
  static __device__ __forceinline__ pair hi2(pair w) { return __high2half2(w); }
};
template <> struct dtype_traits<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};

/* A scale word s | b << 16 as the pair (s, s) or (b, b) of the dequantizing
 * FMA. Written with the type's broadcast intrinsics, not a PRMT: ptxas folds
 * them into the FMA's operand selectors (R.H0_H0, R.H1_H1), so the broadcast
 * costs no instruction and one register holds both (a PRMT each before:
 * 16 of ~300 instructions of a 4-bit stage; perf-notes, session 9). */
template <typename T> __device__ __forceinline__ uint32_t bcast_lo(uint32_t w) {
  using P = typename dtype_traits<T>::pair;
  const P r = dtype_traits<T>::lo2(*reinterpret_cast<const P *>(&w));
  return *reinterpret_cast<const uint32_t *>(&r);
}
template <typename T> __device__ __forceinline__ uint32_t bcast_hi(uint32_t w) {
  using P = typename dtype_traits<T>::pair;
  const P r = dtype_traits<T>::hi2(*reinterpret_cast<const P *>(&w));
  return *reinterpret_cast<const uint32_t *>(&r);
}

/* d += a (16x16, row) * b (16x8, col), f32 accumulators; one
 * specialization per 16-bit input type. Not volatile: a pure function of
 * its operands, so the compiler may schedule it. */
template <typename T>
__device__ __forceinline__ void mma_16816(float *d, const uint32_t *a, uint32_t b0, uint32_t b1);
#define GQMM__MMA_16816(T, ptx_type)                                                              \
  template <>                                                                                     \
  __device__ __forceinline__ void mma_16816<T>(float *d, const uint32_t *a, uint32_t b0,          \
                                               uint32_t b1) {                                     \
    asm("mma.sync.aligned.m16n8k16.row.col.f32." ptx_type "." ptx_type ".f32 "            \
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                         \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                 \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                 \
  }
GQMM__MMA_16816(__nv_bfloat16, "bf16")
GQMM__MMA_16816(__half, "f16")
#undef GQMM__MMA_16816


/* ---- wgmma (sm_90a): warpgroup MMA, A from registers, B from shared memory ----
 * D[64 x N] += A[64 x 16] * B[16 x N] for the 4 warps of a warpgroup: warp w
 * holds rows 16w..16w+15 of A in the mma.sync m16k16 register layout and of
 * D in the m16n8 layout per 8 columns (d[4j..4j+3]: columns 8j..8j+7). B is
 * described by a shared-memory matrix descriptor (K-major here). The
 * instruction is asynchronous: fence before it when its registers were
 * written by other instructions, commit it into a group, wait for the group
 * before touching D or A again (ptxas also guards the registers). */
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Keeps the compiler from moving accesses of v across the async MMAs. */
__device__ __forceinline__ void wgmma_pin(float &v) { asm volatile("" : "+f"(v)::"memory"); }

/* Descriptor of a K-major tile with 128-byte swizzle: rows (N) of 64 16-bit
 * values (128 bytes), 8-row atoms of 1 KB (1024-byte aligned base), chunk c
 * of row r stored at c ^ (r % 8). addr: the atom base plus the byte offset
 * of the k-step's 16 values inside the row (0, 32, 64, 96). */
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 |
         (uint64_t)1 << 62;
}

template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float *d, const uint32_t *a, uint64_t desc);
/* One specialization per (type, N): the register lists differ with N. */
#define GQMM__WG_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define GQMM__WGMMA(T, ptx_type, N, DREGS, AREGS, DESC, ...)                                       \
  template <>                                                                                     \
  __device__ __forceinline__ void wgmma_rs<T, N>(float *d, const uint32_t *a, uint64_t desc) {    \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                       \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." ptx_type "." ptx_type " {" DREGS \
                 "}, {" AREGS "}, " DESC ", p, 1, 1, 0;\n}\n"                                      \
                 : __VA_ARGS__                                                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                        \
  }
#define GQMM__WGMMA_TYPES(N, DREGS, AREGS, DESC, ...)                                              \
  GQMM__WGMMA(__nv_bfloat16, "bf16", N, DREGS, AREGS, DESC, __VA_ARGS__)                          \
  GQMM__WGMMA(__half, "f16", N, DREGS, AREGS, DESC, __VA_ARGS__)
GQMM__WGMMA_TYPES(8, "%0,%1,%2,%3", "%4,%5,%6,%7", "%8", GQMM__WG_D4(0))
GQMM__WGMMA_TYPES(16, "%0,%1,%2,%3,%4,%5,%6,%7", "%8,%9,%10,%11", "%12", GQMM__WG_D4(0),
                  GQMM__WG_D4(4))
GQMM__WGMMA_TYPES(24, "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11", "%12,%13,%14,%15", "%16",
                  GQMM__WG_D4(0), GQMM__WG_D4(4), GQMM__WG_D4(8))
GQMM__WGMMA_TYPES(32, "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15",
                  "%16,%17,%18,%19", "%20", GQMM__WG_D4(0), GQMM__WG_D4(4), GQMM__WG_D4(8),
                  GQMM__WG_D4(12))
GQMM__WGMMA_TYPES(40,
                  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15" ","
                  "%16,%17,%18,%19",
                  "%20,%21,%22,%23", "%24",
                  GQMM__WG_D4(0), GQMM__WG_D4(4), GQMM__WG_D4(8), GQMM__WG_D4(12),
                  GQMM__WG_D4(16))
GQMM__WGMMA_TYPES(48,
                  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15" ","
                  "%16,%17,%18,%19,%20,%21,%22,%23",
                  "%24,%25,%26,%27", "%28",
                  GQMM__WG_D4(0), GQMM__WG_D4(4), GQMM__WG_D4(8), GQMM__WG_D4(12),
                  GQMM__WG_D4(16), GQMM__WG_D4(20))
GQMM__WGMMA_TYPES(56,
                  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15" ","
                  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27",
                  "%28,%29,%30,%31", "%32",
                  GQMM__WG_D4(0), GQMM__WG_D4(4), GQMM__WG_D4(8), GQMM__WG_D4(12),
                  GQMM__WG_D4(16), GQMM__WG_D4(20), GQMM__WG_D4(24))
GQMM__WGMMA_TYPES(64,
                  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15" ","
                  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31",
                  "%32,%33,%34,%35", "%36",
                  GQMM__WG_D4(0), GQMM__WG_D4(4), GQMM__WG_D4(8), GQMM__WG_D4(12),
                  GQMM__WG_D4(16), GQMM__WG_D4(20), GQMM__WG_D4(24), GQMM__WG_D4(28))
#undef GQMM__WGMMA_TYPES
#undef GQMM__WGMMA
#undef GQMM__WG_D4

} // namespace gqmm_cu

#endif
