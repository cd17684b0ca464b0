/*
 * qmm_mma.cu - the tensor-core gather_qmm kernel for small M (MoE experts).
 *
 * Operands are swapped: the weights are the MMA's large operand (m16 rows =
 * 16 output features) and the tokens the small one (n8 = 8 rows of x), so an
 * expert with 16 rows pays for two n8 tiles, not a 64-row tile.
 *
 * Layout read: MLX's packed rows as they are (no repacking): w[e][n] is a
 * little-endian bit stream of K values. Each thread owns 32 consecutive k of
 * rows g and g+8 of an m16 tile (g = lane/4, t = lane%4 picks which 32 of the
 * stage's 128 k), copied with cp.async into its own slot of a shared-memory
 * ring (STAGES deep), so one 16-byte load per row per stage feeds 8 MMA k-steps.
 * Since a dot product does not care about the order of k, the 16 k-slots of
 * each MMA step hold whichever values one shift-and-mask pulls out of a word
 * ((w >> 4j) & 0x000F000F gives values j and j+4 of a 4-bit word as one
 * half2); the x fragments are built with the same permutation (prmt).
 * Dequantization is in registers: OR q into the mantissa of a magic constant
 * (bf16 128.0, f16 1024.0) together with the mask (one lop3), subtract it,
 * one packed FMA with scale and bias.
 *
 * The loop is issue-bound (ncu: ~467 warp instructions per KB of 4-bit
 * weights), so it is written to keep instructions per stage low: per-unit
 * base addresses with 32-bit row indices (one IMAD.WIDE per copy), branch-
 * free zero-filling copies, scale and bias packed in one register of the
 * in-flight FIFO, and one basic block per token-tile count (no per-tile
 * branches; MMAs interleaved over tiles, no NOP padding). Counts per stage
 * are in docs/perf-notes.md "CUDA kernel pass 3".
 *
 * Work: units = (expert, N tile of BN = warps*mtiles*16 features, chunk of
 * <= 32 rows), from the routing plan (route.cu, one descriptor per unit). A
 * persistent grid deals them round-robin (mma_common.cuh units_of_cta): every
 * unit streams the same bytes, so CTAs are balanced, and the chunks of one
 * expert's N tile run side by side on neighbouring CTAs, sharing their weight
 * reads through L2. The cp.async ring runs across unit boundaries (no
 * pipeline drain between units).
 * A stage reads only 64 bytes of each weight row, so the weight copies carry
 * an L2 256-byte prefetch hint: DRAM sees one 256-byte burst per row every
 * four stages instead of scattered 64-byte requests (H100: the load path alone
 * went from 65% to 78% of the read ceiling, the kernel from 48% to 54%). x rows of the unit's tokens
 * are staged per stage in shared memory (swizzled 16-byte chunks: conflict-
 * free fragment reads) and read by all warps.
 *
 * Preconditions (gqmm__cu_mma_eligible): transpose, bits 2/3/4/8, f16/bf16,
 * K % 32 == 0 (MLX), x/w 16-byte aligned. Ragged K (not a multiple of 128)
 * and N (not a multiple of BN) are masked; rows beyond a unit's count are
 * never copied (their stale columns are never stored).
 */
#include "mma_common.cuh"
#include "wfmt.cuh"

#include <cuda_runtime.h>

using namespace gqmm_cu;

namespace {

/* Physical 16-byte chunk of logical chunk c in a token's 256-byte x row. */
__device__ __forceinline__ int xphys(int c, int row) {
  return c ^ (((c >> 3) & 1) << 1) ^ (row & 1);
}

/* NTMAX: widest token tile (NTMAX x n8 rows per unit); the units of a plan
 * made for this config hold at most 8*NTMAX rows. */
template <typename T, int BITS, int WARPS, int MT, int STAGES, int NTMAX> struct mma_kernel_impl {
  using F = wfmt<BITS>;
  static constexpr int kNtMax = NTMAX;
  static constexpr int kTokMax = 8 * NTMAX;
  static constexpr int kThreads = WARPS * 32;
  static constexpr int kBN = WARPS * MT * 16;
  static constexpr int kXStage = kTokMax * kXRowBytes;
  static constexpr int kWStage = MT * 2 * F::bytes * kThreads;
  static constexpr int kSmem = STAGES * (kXStage + kWStage);

  /* Byte offset of unit u of (mt, half) in this thread's weight slot. */
  static __device__ __forceinline__ int woff(int mt, int h, int u, int tid) {
    return (((mt * 2 + h) * F::units + u) * kThreads + tid) * F::unit;
  }

  /* x chunks (16 bytes of one token row per stage) each thread copies. */
  static constexpr int kXPer = kTokMax * 16 / kThreads;
  static_assert(kXPer * kThreads == kTokMax * 16, "x chunks must split evenly over threads");
  static_assert(kThreads % 16 == 0, "a thread copies the same chunk column of every x row");

  /* The load side's per-unit state, kept small (the 64-register config):
   * the expert's base addresses and 32-bit row/token indices, so a stage's
   * addresses are one IMAD.WIDE each (per-stage 64-bit address math from
   * scratch was a third of the loop's instructions). */
  struct lstate {
    const uint8_t *w;                /* expert's weights + this lane's 32 k */
    const unsigned short *s;         /* expert's scales (biases: + b_minus_s bytes) */
    uint32_t n[MT][2];               /* the thread's weight rows in the expert */
    uint32_t xr[kXPer];              /* token rows of the thread's x chunks */
    int xsz[kXPer];                  /* 16, or 0: chunk i has no token (zero-filled) */
  };

  static __device__ __forceinline__ void load_unit(const kargs &a, const unit_t &lu, lstate &ls) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int64_t e_rows = (int64_t)lu.e * a.N;
    ls.w = (const uint8_t *)a.w + e_rows * a.row_bytes + t * F::bytes;
    ls.s = (const unsigned short *)a.scales + e_rows * a.groups;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int h = 0; h < 2; h++) /* rows past N (ragged tile) re-read row N-1, never stored */
        ls.n[mt][h] = min(lu.ntile * kBN + (warp * MT + mt) * 16 + h * 8 + g, a.N - 1);
#pragma unroll
    for (int i = 0; i < kXPer; i++) {
      const int r = (tid + i * kThreads) >> 4;
      const bool has = r < lu.cnt;
      ls.xr[i] = has ? (uint32_t)__ldg(a.plan.rows_x + lu.r0 + r) : 0u;
      ls.xsz[i] = has ? 16 : 0;
    }
  }

  /* Shared-memory offset of the thread's x chunk i in a stage (fixed per thread). */
  static __device__ __forceinline__ int xdst(int i) {
    const int tid = threadIdx.x, r = (tid + i * kThreads) >> 4;
    return r * kXRowBytes + xphys(tid & 15, r) * 16;
  }

  /* Start stage lk's copies into ring slot `slot` (sm: the ring's shared
   * address) and the loads of its scales and biases into rs/rb.
   * Branch-free: a k past K (ragged last stage) or a missing token row is a
   * zero-byte (zero-filling) copy from an in-bounds address; past K the
   * weights' scale and bias are the last group's (finite), times x = 0.
   * Each address is one IMAD.WIDE.U32 (32-bit row index x stride + the
   * stage's 64-bit base, kept opaque so the compiler does not re-derive it). */
  static __device__ __forceinline__ void issue(const kargs &a, const lstate &ls, int lk,
                                               uint32_t sm, const int (&xd)[kXPer], int slot,
                                               uint32_t (&rs)[MT][2], uint32_t (&rb)[MT][2]) {
    const int tid = threadIdx.x, lane = tid & 31, t = lane & 3;
    const uint32_t xs = sm + slot * (kXStage + kWStage), ws = xs + kXStage;
    const int k0 = lk * kStageK + 32 * t;
    const bool kin = k0 < a.K;
    const uint8_t *wst = opaque(ls.w + (kin ? lk * (kStageK * BITS / 8) : 0));
    const int gi = min(k0 >> a.gs_shift, a.groups - 1);
    const uint8_t *sst = opaque((const uint8_t *)(ls.s + gi));
    const uint8_t *bst = opaque(sst + a.b_minus_s);
    const uint32_t wstride = (uint32_t)a.row_bytes, sstride = (uint32_t)a.groups * 2u;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const uint8_t *src = wst + (uint64_t)ls.n[mt][h] * wstride;
#pragma unroll
        for (int u = 0; u < F::units; u++)
          if constexpr (F::unit == 16)
            cp_async_l2pf(ws + woff(mt, h, u, tid), src + u * F::unit, kin ? F::unit : 0);
          else
            cp_async<F::unit>(ws + woff(mt, h, u, tid), src + u * F::unit, kin ? F::unit : 0);
        rs[mt][h] = ldg_u16_l2pf(sst + (uint64_t)ls.n[mt][h] * sstride);
        rb[mt][h] = ldg_u16_l2pf(bst + (uint64_t)ls.n[mt][h] * sstride);
      }
    }
    /* x: the unit's token rows for this stage; missing rows/k are zeros. */
    const int kx = lk * kStageK + (tid & 15) * 8; /* the same 16-byte column of every row */
    const bool xin = kx < a.K;
    const uint8_t *xst = opaque((const uint8_t *)a.x + (xin ? (size_t)kx * 2 : 0));
    const uint32_t xstride = (uint32_t)a.K * 2u;
    /* Rows past the unit's count are not copied at all: they only feed MMA
     * columns of tokens that store_unit never writes (columns do not mix). */
#pragma unroll
    for (int i = 0; i < kXPer; i++)
      if (ls.xsz[i]) cp_async<16>(xs + xd[i], xst + (uint64_t)ls.xr[i] * xstride, xin ? 16 : 0);
  }

  /* One stage: dequantize this thread's weights once, reuse them for the
   * unit's NT token tiles. NT is a template parameter (with_nt picks it
   * once per stage) so a stage is one basic block: no branch per token
   * tile, and the scheduler can hide each MMA's latency behind the next
   * tile's MMA and the dequantization instead of padding with NOPs. */
  template <int NT>
  static __device__ __forceinline__ void compute_n(const uint8_t *smem, int slot,
                                                   const uint32_t (&sb)[MT][2],
                                                   float (&acc)[MT][kNtMax][4]) {
    const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const uint8_t *xs = smem + slot * (kXStage + kWStage);
    const uint8_t *ws = xs + kXStage;
    const uint8_t *xrow = xs + g * kXRowBytes + 64 * t;
    const int xsw = (((t >> 1) & 1) << 1) ^ (g & 1);
    uint32_t q[MT][2][BITS], sr[MT][2], br[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
#pragma unroll
        for (int u = 0; u < F::units; u++) load_lane_unit<BITS>(ws + woff(mt, h, u, tid), u, q[mt][h]);
        F::prep(q[mt][h]);
        sr[mt][h] = bcast_lo<T>(sb[mt][h]); /* s | s << 16 */
        br[mt][h] = bcast_hi<T>(sb[mt][h]); /* b | b << 16 */
      }
#pragma unroll
    for (int p = 0; p < F::phases; p++) {
      uint32_t A[MT][F::steps][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int sl = 0; sl < F::steps; sl++) {
          const int s = p * F::steps + sl;
#pragma unroll
          for (int r = 0; r < 4; r++) { /* a0: g,2s  a1: g+8,2s  a2: g,2s+1  a3: g+8,2s+1 */
            const int h = r & 1, pi = 2 * s + (r >> 1);
            /* k past K: issue() zeroed this stage's scale and bias, so w = 0 */
            A[mt][sl][r] = dequant<T, BITS>(F::pair(q[mt][h], pi, magic_of<T, BITS>()),
                                            sr[mt][h], br[mt][h]);
          }
        }
      uint32_t B[NT][F::steps][2];
#pragma unroll
      for (int j = 0; j < NT; j++) {
        uint32_t Z[4 * F::chunks];
#pragma unroll
        for (int i = 0; i < F::chunks; i++) {
          /* xphys(4t + ch, row) == 4t + (ch ^ xsw) for ch < 4, rows of g's parity */
          const uint8_t *xp = xrow + j * 8 * kXRowBytes + ((F::chunk(p, i) ^ xsw) << 4);
          uint4 v = *reinterpret_cast<const uint4 *>(xp);
          Z[4 * i] = v.x, Z[4 * i + 1] = v.y, Z[4 * i + 2] = v.z, Z[4 * i + 3] = v.w;
        }
#pragma unroll
        for (int sl = 0; sl < F::steps; sl++) {
          B[j][sl][0] = prmt(Z[F::ia(sl)], Z[F::ib(sl)], 0x5410);
          B[j][sl][1] = prmt(Z[F::ia(sl)], Z[F::ib(sl)], 0x7632);
        }
      }
      /* token tiles innermost: consecutive MMAs update different accumulators */
#pragma unroll
      for (int sl = 0; sl < F::steps; sl++)
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int j = 0; j < NT; j++) mma_16816<T>(acc[mt][j], A[mt][sl], B[j][sl][0], B[j][sl][1]);
    }
  }

  static __device__ __forceinline__ void run(const kargs &a) {
    extern __shared__ __align__(16) uint8_t smem[];
    const int nunits = units_of_cta(a);
    const int nk = (a.K + kStageK - 1) / kStageK;
    const int nflat = nunits * nk;
    if (nflat <= 0) return;
    /* Scales and biases of the stages in flight, oldest first: a FIFO in
     * registers (fixed indices: no local memory), s | b << 16 per row.
     * A stage's loads land in rs/rb and are packed into the FIFO one
     * iteration later, so no instruction waits for them. */
    uint32_t sb[STAGES - 1][MT][2], rs[MT][2] = {}, rb[MT][2] = {};
    float acc[MT][kNtMax][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int j = 0; j < kNtMax; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) acc[mt][j][r] = 0.f;
    /* Load side and compute side walk the same (unit, k-stage) sequence,
     * STAGES-1 stages apart. */
    unit_walk lw, cw;
    lw.start(a, nunits);
    cw = lw;
    lstate ls;
    load_unit(a, lw.u, ls);
    const uint32_t sm = smem_u32(smem);
    int xd[kXPer];
#pragma unroll
    for (int i = 0; i < kXPer; i++) xd[i] = xdst(i);
    auto pack = [&](uint32_t(&dst)[MT][2]) {
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) dst[mt][h] = prmt(rs[mt][h], rb[mt][h], 0x5410);
    };
    /* The load side's next stage into ring slot `slot`, then its walk on. */
    auto load_stage = [&](int slot) {
      issue(a, ls, lw.k, sm, xd, slot, rs, rb);
      if (lw.step(a, nunits, nk)) load_unit(a, lw.u, ls);
    };
    /* Prologue: stages 0..STAGES-2; stage s goes to sb[s + 1] (the first
     * shift moves it to s), the last one stays in rs/rb. */
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
      if (s < nflat) {
        load_stage(s);
      }
      if (s < STAGES - 2) pack(sb[s + 1]);
      cp_async_commit();
    }
    int slot = 0;
    for (int f = 0; f < nflat; f++) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
#pragma unroll
      for (int s = 0; s + 1 < STAGES - 1; s++)
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int h = 0; h < 2; h++) sb[s][mt][h] = sb[s + 1][mt][h];
      pack(sb[STAGES - 2]);
      const int nslot = slot == 0 ? STAGES - 1 : slot - 1;
      if (f + STAGES - 1 < nflat) {
        load_stage(nslot);
      }
      cp_async_commit();
      with_nt<kNtMax>(cw.u.nt, [&](auto nt) { compute_n<nt.value>(smem, slot, sb[0], acc); });
      if (cw.k == nk - 1) { /* the walk steps inside the rare branch (see qmm_wgmma.cu) */
        store_unit<T, MT, kNtMax, kBN>(a, cw.u, acc);
        cw.step(a, nunits, nk);
      } else {
        cw.k++;
      }
      slot = slot == STAGES - 1 ? 0 : slot + 1;
    }
    cp_async_wait<0>();
  }
};

/* MINB: CTAs per SM the register allocation must allow (1: no cap). */
template <typename T, int BITS, int WARPS, int MT, int STAGES, int MINB, int NTMAX>
__global__ void __launch_bounds__(WARPS * 32, MINB)
mma_kernel(kargs a) {
  mma_kernel_impl<T, BITS, WARPS, MT, STAGES, NTMAX>::run(a);
}

/* The compiled-in tile configurations:
 *   X(name, warps, mtiles, stages, min CTAs per SM, n8 token tiles per unit).
 * w8_m1_s3_b4 caps registers at 64 so 4 CTAs (32 warps) share an SM; w4_m2_s4
 * is held to 3 CTAs (<= 168 registers), what it got unbounded until session 2.
 * (A 64-row-unit variant, X("w8_m1_s4_t64", 8, 1, 4, 1, 8), needs ~140
 * registers, runs 1 CTA per SM and was slower even at 64 rows per expert.) */
#define GQMM_MMA_CONFIGS(X)                                                                       \
  X("w4_m2_s4", 4, 2, 4, 3, 4)                                                                    \
  X("w8_m1_s4", 8, 1, 4, 1, 4)                                                                    \
  X("w8_m1_s3_b4", 8, 1, 3, 4, 4)                                                                 \
  X("w4_m2_s3_b4", 4, 2, 3, 4, 4)

/* The wgmma kernel's configs for packed weights (qmm_wgmma.cu
 * GQMM_WG_CONFIGS, same order): X(name, warps, m16 tiles per warp, stages,
 * n8 token tiles). */
#define GQMM_WG_CONFIG_ROWS(X)                                                                    \
  X("wg_m2_s4_a2", 4, 2, 4, 4)                                                                    \
  X("wg_m2_s4", 4, 2, 4, 4)                                                                       \
  X("wg2_m1_s4_t64", 8, 1, 4, 8)                                                                  \
  X("wg_m2_s4_t64", 4, 2, 4, 8)                                                                   \
  X("wg_m2_s4_b4", 4, 2, 4, 4)

const gqmm__cu_mma_config kConfigs[] = {
#define GQMM__CFG_ROW(name, w, m, s, b, nt) {name, w, m, s, 8 * nt, 0},
    GQMM_MMA_CONFIGS(GQMM__CFG_ROW)
#undef GQMM__CFG_ROW
#define GQMM__WG_ROW(name, w, m, s, nt) {name, w, m, s, 8 * nt, 1},
    GQMM_WG_CONFIG_ROWS(GQMM__WG_ROW)
#undef GQMM__WG_ROW
};
constexpr int kNumConfigs = sizeof kConfigs / sizeof kConfigs[0];

template <typename T, int BITS, int W, int M, int S, int B, int NT> launch_info info() {
  using K = mma_kernel_impl<T, BITS, W, M, S, NT>;
  return {mma_kernel<T, BITS, W, M, S, B, NT>, K::kThreads, K::kSmem};
}

template <typename T, int BITS> launch_info pick_cfg(int cfg) {
  int i = 0;
#define GQMM__CFG_CASE(name, w, m, s, b, nt)                                                      \
  if (cfg == i++) return info<T, BITS, w, m, s, b, nt>();
  GQMM_MMA_CONFIGS(GQMM__CFG_CASE)
#undef GQMM__CFG_CASE
  return {nullptr, 0, 0};
}

template <typename T> launch_info pick_bits(int bits, int cfg) {
  switch (bits) {
  case 2: return pick_cfg<T, 2>(cfg);
  case 3: return pick_cfg<T, 3>(cfg);
  case 4: return pick_cfg<T, 4>(cfg);
  case 8: return pick_cfg<T, 8>(cfg);
  default: return {nullptr, 0, 0};
  }
}

constexpr int kNumMma = 0
#define GQMM__COUNT(...) +1
    GQMM_MMA_CONFIGS(GQMM__COUNT)
#undef GQMM__COUNT
    ;

launch_info pick(const gqmm__cu_qmm *a, int cfg) {
  if (cfg >= kNumMma) return wg_launch_info(a, cfg - kNumMma);
  if (a->dtype == GQMM__CU_BF16) return pick_bits<__nv_bfloat16>(a->bits, cfg);
  if (a->dtype == GQMM__CU_F16) return pick_bits<__half>(a->bits, cfg);
  return {nullptr, 0, 0};
}

} // namespace

extern "C" int gqmm__cu_mma_config_count(void) { return kNumConfigs; }
extern "C" const gqmm__cu_mma_config *gqmm__cu_mma_config_get(int i) {
  return i >= 0 && i < kNumConfigs ? &kConfigs[i] : nullptr;
}
extern "C" int gqmm__cu_mma_tok_max(int cfg) {
  const gqmm__cu_mma_config *c = gqmm__cu_mma_config_get(cfg);
  return c ? c->tok_max : 0;
}
extern "C" int gqmm__cu_mma_tile_n(int cfg) {
  const gqmm__cu_mma_config *c = gqmm__cu_mma_config_get(cfg);
  return c ? c->warps * c->mtiles * 16 : 0;
}

extern "C" int gqmm__cu_mma_n_tiles(int cfg, const gqmm__cu_qmm *a) {
  if (a->packed) return (int)gqmm__cu_pack_tiles(a->N, a->glu);
  const int t = gqmm__cu_mma_tile_n(cfg);
  return t > 0 ? (int)((a->N + t - 1) / t) : 0;
}

extern "C" int gqmm__cu_mma_eligible(const gqmm__cu_qmm *a) {
  if (!a->transpose) return 0;
  if (a->dtype != GQMM__CU_BF16 && a->dtype != GQMM__CU_F16) return 0;
  if (a->bits != 2 && a->bits != 3 && a->bits != 4 && a->bits != 8) return 0;
  if (log2_exact(a->group_size) < 5 || a->K % 32 != 0) return 0;
  if (((uintptr_t)a->x | (uintptr_t)a->w) % 16 != 0) return 0;
  if (a->N > INT32_MAX || a->K > INT32_MAX) return 0;
  return 1;
}

/* A packed config may be compiled for some widths only (qmm_wgmma.cu). */
extern "C" int gqmm__cu_mma_config_ok(int cfg, const gqmm__cu_qmm *a) {
  const gqmm__cu_mma_config *c = gqmm__cu_mma_config_get(cfg);
  return c && gqmm__cu_mma_eligible(a) && c->packed == (a->packed != nullptr) &&
         (!c->packed || pick(a, cfg).fn);
}

extern "C" const void *gqmm__cu_mma_instance(int cfg, const gqmm__cu_qmm *a) {
  return (const void *)pick(a, cfg).fn;
}

extern "C" int gqmm__cu_mma_grid(int cfg, const gqmm__cu_qmm *a, int sms, int *out_grid) {
  return grid_of(pick(a, cfg), sms, out_grid);
}

extern "C" int gqmm__cu_mma_run(int cfg, const gqmm__cu_qmm *a, const gqmm__cu_plan *plan,
                                int experts, int grid, gqmm__cu_stream stream) {
  launch_info li = pick(a, cfg);
  if (!li.fn || !gqmm__cu_mma_config_ok(cfg, a)) return (int)cudaErrorInvalidValue;
  li.fn<<<grid, li.threads, li.smem, stream>>>(make_kargs(a, plan, experts));
  return (int)cudaGetLastError();
}
