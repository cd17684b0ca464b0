/*
 * wgmma_probe.cu - how fast Hopper's tensor cores run wgmma with A from
 * registers (the "RS" form of qmm_wgmma.cu) under the gather kernel's issue
 * pattern, without memory traffic: a probe for kernel design, not part of
 * the library.
 *
 * Each CTA is one warpgroup. Per k-step each warp makes its A registers
 * (ALU = 0: a copy; ALU = n: n chained shift-and + packed FMA pairs, the
 * 4-bit linear dequantization n times), fences, issues MT wgmma.m64nNk16
 * into MT accumulators (SPLIT = 2: alternating k-steps go to a second set,
 * so consecutive MMAs into one set are two k-steps apart), commits and
 * waits until at most WAIT groups are pending. STAGE: every 8 k-steps a CTA
 * barrier and the weight words from shared memory, as at the kernel's stage
 * start. The B tile (the tokens) sits in shared memory in the kernel's
 * 128-byte swizzled layout; dynamic shared memory is sized so that exactly
 * `cps` CTAs share an SM.
 *
 * Output (JSON): per (variant, CTAs per SM), TFLOP/s, the SM's cycles per
 * k-step of all its CTAs, and tensor_busy: the nominal cycles (2048 bf16
 * FMAs per clock per SM: H100 SXM's 989 TFLOP/s dense at 1.83 GHz over 132
 * SMs) over the measured ones. bench/gpu_check.sh probe runs it; what it
 * showed is in docs/perf-notes.md, session 10.
 *
 * Built as gqmm_wgmma_probe with the CUDA backend (CMakeLists.txt).
 */
#include "wfmt.cuh"

#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

using namespace gqmm_cu;
using T = __nv_bfloat16;

namespace {

constexpr int kXHalf = 64 * 128; /* 64 tokens x 64 k: the most any variant reads */

template <int N, int MT, int WAIT, int ALU, int SPLIT, bool STAGE>
__global__ void __launch_bounds__(128) probe(int iters, float *out, long long *cyc) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t *smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const uint32_t st = smem_u32(smem);
  for (int i = threadIdx.x; i < (2 * kXHalf + 4096) / 4; i += 128) /* small bf16 pairs */
    reinterpret_cast<uint32_t *>(smem)[i] = 0x3C003C00u ^ (i & 0x00FF00FFu);
  __syncthreads();
  constexpr int kAcc = SPLIT * MT * N / 8 * 4;
  float acc[SPLIT][MT][N / 8][4];
  float *accf = &acc[0][0][0][0]; /* unrolled loops: constant indices, registers */
#pragma unroll
  for (int i = 0; i < kAcc; i++)
    accf[i] = 0.f;
  uint32_t q[MT][2];
#pragma unroll
  for (int m = 0; m < MT; m++)
    q[m][0] = 0x12345678u * (threadIdx.x + m), q[m][1] = ~q[m][0];
  /* STAGE: the kernel's stage start every 8 k-steps: a CTA barrier, then
   * the stage's weight words from shared memory (16 bytes a thread per m64
   * tile, past the B tile), which the k-steps' dequantization reads */
  const uint32_t wq = st + 2 * kXHalf + threadIdx.x * 16;
  const uint32_t sc = 0x3C003C00u, bi = 0xBC00BC00u;
  uint32_t hist[WAIT > 0 ? WAIT : 1][MT][4];
  const uint64_t desc0 = wgmma_desc_sw128(st);
  const long long t0 = clock64();
  for (int it = 0; it < iters; it++) {
    if constexpr (STAGE) {
      __syncthreads();
#pragma unroll
      for (int m = 0; m < MT; m++) {
        const uint4 v = lds_v4(wq + m * 2048);
        q[m][0] = v.x ^ v.z, q[m][1] = v.y ^ v.w;
      }
    }
#pragma unroll
    for (int s = 0; s < 8; s++) {
      uint32_t A[MT][4];
#pragma unroll
      for (int m = 0; m < MT; m++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
          const uint32_t w = q[m][r & 1];
          if constexpr (ALU == 0) {
            A[m][r] = w ^ (uint32_t)(s * 4 + r);
          } else {
            /* ALU shift-and + packed FMA pairs, each on the last's result */
            uint32_t v = w;
#pragma unroll
            for (int i = 0; i < ALU; i++)
              v = lin_dequant<T>((v >> ((s * 4 + r + i) & 7)) & 0x000F000Fu, sc, bi);
            A[m][r] = v;
          }
        }
      wgmma_fence();
      const uint64_t desc = desc0 + (uint64_t)((((s >> 2) * kXHalf) + (s & 3) * 32) >> 4);
#pragma unroll
      for (int m = 0; m < MT; m++)
        wgmma_rs<T, N>(&acc[s % SPLIT][m][0][0], A[m], desc);
      wgmma_commit();
      if constexpr (WAIT > 0) {
        wgmma_wait<WAIT>();
#pragma unroll
        for (int h = 0; h < WAIT; h++)
#pragma unroll
          for (int m = 0; m < MT; m++)
#pragma unroll
            for (int r = 0; r < 4; r++)
              asm volatile("" ::"r"(hist[h][m][r]));
#pragma unroll
        for (int h = WAIT - 1; h > 0; h--)
#pragma unroll
          for (int m = 0; m < MT; m++)
#pragma unroll
            for (int r = 0; r < 4; r++)
              hist[h][m][r] = hist[h - 1][m][r];
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
          for (int r = 0; r < 4; r++)
            hist[0][m][r] = A[m][r];
      } else {
        wgmma_wait<0>();
      }
    }
    if constexpr (!STAGE) {
#pragma unroll
      for (int m = 0; m < MT; m++)
        q[m][0] += 0x01010101u, q[m][1] ^= q[m][0];
    }
  }
  wgmma_wait<0>();
  const long long t1 = clock64();
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kAcc; i++)
    sum += accf[i];
  out[blockIdx.x * 128 + threadIdx.x] = sum;
  if (threadIdx.x == 0) { /* the SM's clock: spans of one SM's CTAs compare */
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    cyc[3 * blockIdx.x] = t0, cyc[3 * blockIdx.x + 1] = t1, cyc[3 * blockIdx.x + 2] = sm;
  }
}

struct variant {
  const char *name;
  void (*fn)(int, float *, long long *);
  int n, mt;
};

#define V(N, MT, W, ALU, SPLIT)                                                                  \
  {                                                                                              \
    "n" #N " mt" #MT " wait" #W " alu" #ALU " split" #SPLIT, probe<N, MT, W, ALU, SPLIT, false>, \
        N, MT                                                                                    \
  }
#define VS(N, MT, W, ALU) \
  { "n" #N " mt" #MT " wait" #W " alu" #ALU " stage", probe<N, MT, W, ALU, 1, true>, N, MT }
/* The loops of qmm_wgmma.cu's configs: two m64 tiles and 64 tokens (the
 * 64-token config), one m64 tile (two warpgroups of one), 32 and 16 tokens
 * (the default config); each with one or two dequantization pairs a
 * register, with one or two groups in flight, and with the stage start. */
const variant kVariants[] = {
    V(64, 2, 1, 0, 1), V(64, 2, 1, 1, 1), V(64, 2, 1, 2, 1), V(64, 2, 2, 2, 1),
    V(64, 2, 0, 1, 1), V(64, 2, 1, 1, 2), V(64, 1, 1, 1, 1), V(64, 1, 2, 1, 1),
    V(32, 2, 1, 1, 1), V(32, 2, 1, 2, 1), V(16, 2, 1, 1, 1), VS(64, 2, 1, 1),
    VS(64, 2, 1, 2),   VS(64, 2, 2, 2),   VS(32, 2, 1, 1),   VS(32, 2, 1, 2),
};

} // namespace

int main(int argc, char **argv) {
  const int iters = argc > 1 ? atoi(argv[1]) : 2000;
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  const int sms = prop.multiProcessorCount;
  float *out;
  long long *cyc;
  cudaMalloc(&out, (size_t)sms * 8 * 128 * sizeof(float));
  cudaMalloc(&cyc, (size_t)sms * 8 * 3 * sizeof(long long));
  long long *hcyc = (long long *)malloc((size_t)sms * 8 * 3 * sizeof(long long));
  long long *first_t = (long long *)malloc((size_t)sms * sizeof(long long));
  long long *last_t = (long long *)malloc((size_t)sms * sizeof(long long));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  printf("{\"device\": \"%s\", \"sms\": %d, \"rows\": [\n", prop.name, sms);
  bool first = true;
  for (const variant &v : kVariants) {
    for (int cps = 1; cps <= 4; cps++) {
      /* shared memory that lets exactly cps CTAs share an SM */
      const size_t smem = (size_t)(prop.sharedMemPerMultiprocessor / cps) - 2048;
      if (cudaFuncSetAttribute(v.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem))
        continue;
      int occ = 0;
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, v.fn, 128, smem);
      if (occ != cps) continue;
      const int grid = sms * cps;
      v.fn<<<grid, 128, smem>>>(iters / 10, out, cyc); /* warm */
      cudaEventRecord(e0);
      v.fn<<<grid, 128, smem>>>(iters, out, cyc);
      cudaEventRecord(e1);
      if (cudaEventSynchronize(e1) != cudaSuccess) {
        fprintf(stderr, "%s: %s\n", v.name, cudaGetErrorString(cudaGetLastError()));
        return 1;
      }
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      cudaMemcpy(hcyc, cyc, 3 * grid * sizeof(long long), cudaMemcpyDeviceToHost);
      /* each SM's span: first start to last end of its CTAs (the grid is
       * one wave: cps CTAs on every SM) */
      for (int i = 0; i < sms; i++)
        first_t[i] = -1, last_t[i] = 0;
      for (int i = 0; i < grid; i++) {
        const long long t0 = hcyc[3 * i], t1 = hcyc[3 * i + 1];
        const int sm = (int)hcyc[3 * i + 2];
        if (sm < 0 || sm >= sms) continue;
        if (first_t[sm] < 0 || t0 < first_t[sm]) first_t[sm] = t0;
        if (t1 > last_t[sm]) last_t[sm] = t1;
      }
      double span = 0;
      int used = 0;
      for (int i = 0; i < sms; i++)
        if (first_t[i] >= 0) span += (double)(last_t[i] - first_t[i]), used++;
      span /= used > 0 ? used : 1;
      const double fma = 64.0 * v.mt * v.n * 16 * 8 * iters * grid;
      /* per SM: cycles per k-step of all its CTAs, against the nominal
       * 2048 FMA a clock */
      const double per_step = span / (8.0 * iters);
      const double nominal = 64.0 * v.mt * v.n * 16 * cps / 2048;
      printf("%s{\"variant\": \"%s\", \"cps\": %d, \"ms\": %.3f, \"tflops\": %.1f, "
             "\"cycles_per_kstep\": %.1f, \"nominal_cycles\": %.1f, \"tensor_busy\": %.3f}",
             first ? "" : ",\n", v.name, cps, ms, 2 * fma / (ms * 1e-3) / 1e12, per_step, nominal,
             nominal / per_step);
      first = false;
    }
  }
  printf("\n]}\n");
  return 0;
}
