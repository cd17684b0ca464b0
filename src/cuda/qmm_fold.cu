/*
 * qmm_fold.cu - the 4-bit tensor-core gather kernel with the affine scale
 * folded onto the accumulators instead of being applied to every weight.
 *
 * Why: qmm_mma.cu dequantizes each weight pair with four instructions (shift,
 * lop3 into a magic constant, subtract the magic, fma with scale and bias)
 * and that is two thirds of its instruction stream, which is what bounds it.
 * Here a weight pair costs a lop3 and 3/4 of a shift: the MMA is fed
 * M + q (M = 128 for bf16, 1024 for f16: OR-ing q into the mantissa of M is
 * exact) and, per group g of group size GS,
 *
 *   sum_k x_k (s q_k + b) = s * sum_k x_k (M + q_k) + (b - M s) * X_g,
 *   X_g = sum_k x_k (over the group),
 *
 * so each group's MMAs start from zero and the group ends with two float FMAs
 * per accumulator (s * acc, (b - M s) * X). That needs every MMA k-step to
 * stay inside one group: each lane reads one 32-bit word (8 consecutive k) of
 * a 32-k chunk, so the four lanes of a quad cover one chunk and the two
 * k-steps of a chunk take nibbles (0,4 | 2,6) and (1,5 | 3,7) of every word.
 *
 * x is prepared once per call (fold_prep): each 8-value block permuted to
 * that nibble order (0,4,2,6,1,5,3,7), so one 16-byte shared load gives both
 * k-steps' B fragments with no permute, rows zero-padded to a multiple of
 * 128 k, and the group sums X (float) beside it.
 *
 * Pipeline (as qmm_mma.cu): persistent grid over the plan's units, a
 * STAGES-deep cp.async ring of 128-k stages shared by all warps, one
 * __syncthreads per stage. Per stage and CTA: BN weight rows x 64 bytes
 * (row-major, 16-byte chunks XOR-swizzled by row so the word reads are
 * conflict-free), the unit's x rows (256 bytes each, swizzled), their X, and
 * the rows' scales and biases (2-byte values: loaded with plain loads two
 * stages ahead and stored to shared memory, since cp.async copies >= 4 bytes).
 *
 * Preconditions (gqmm__cu_fold_eligible): bits 4, f16/bf16, transpose, group
 * size 32/64/128, K % 32 == 0, 16-byte aligned x and w. Ragged K and N and
 * rows past a unit's count are masked (zero scales / zero-filled copies).
 */
#include "mma_common.cuh"
#include "ptx.cuh"

#include <cuda_runtime.h>
#include <type_traits>

using namespace gqmm_cu;

namespace {

constexpr int kStageK = 128;            /* k per pipeline stage */
constexpr int kXRowBytes = kStageK * 2; /* one token's x per stage */
constexpr int kWRowBytes = kStageK / 2; /* one weight row per stage (4-bit) */
constexpr uint32_t kNibbles = 0x000F000Fu;

template <typename T> struct fold_traits;
template <> struct fold_traits<__nv_bfloat16> {
  static constexpr float offset = 128.f; /* dtype_traits<>::magic as a value */
  static __device__ __forceinline__ float to_f(uint32_t bits16) { return __uint_as_float(bits16 << 16); }
};
template <> struct fold_traits<__half> {
  static constexpr float offset = 1024.f;
  static __device__ __forceinline__ float to_f(uint32_t bits16) {
    return __half2float(__ushort_as_half((unsigned short)bits16));
  }
};

/* Physical 16-byte chunk of logical chunk c (0..15) in token row r's stage:
 * rows of odd parity swap halves, so a quarter warp (rows g = 0/1, chunks
 * 4j + t) hits eight distinct bank groups. */
__host__ __device__ constexpr int xphys(int c, int r) { return c ^ ((r & 1) << 2); }
/* Physical chunk of chunk j (0..3) in weight row r: rows 2i, 2i+1 rotate. */
__host__ __device__ constexpr int wphys(int j, int r) { return j ^ ((r >> 1) & 3); }

template <typename T, int GS, int WARPS, int MT, int STAGES, int NTMAX> struct fold_kernel_impl {
  using TR = fold_traits<T>;
  static constexpr int kTokMax = 8 * NTMAX;
  static constexpr int kThreads = WARPS * 32;
  static constexpr int kBN = WARPS * MT * 16;
  static constexpr int kGps = kStageK / GS; /* groups per stage */
  static constexpr int kCpg = GS / 32;      /* 32-k chunks per group */
  static constexpr int kXStage = kTokMax * kXRowBytes;
  static constexpr int kWStage = kBN * kWRowBytes;
  static constexpr int kSStage = kBN * kGps * 2; /* scales (biases: the same again) */
  static constexpr int kXsStage = kTokMax * kGps * 4;
  static constexpr int kSlot = kXStage + kWStage + 2 * kSStage + kXsStage;
  static constexpr int kSmem = STAGES * kSlot;
  static constexpr int kWPer = kBN * 4 / kThreads;   /* weight chunks per thread */
  static constexpr int kXPer = kTokMax * 16 / kThreads; /* x chunks per thread */
  static constexpr int kSRows = (kBN + kThreads - 1) / kThreads; /* scale rows per thread */
  static constexpr int kSWords = (kGps * 2 + 3) / 4; /* 32-bit words of one row's scales */
  static constexpr int kDelay = STAGES - 2;          /* stages a scale load runs ahead of its store */
  static_assert(kWPer * kThreads == kBN * 4 && kXPer * kThreads == kTokMax * 16, "even split");
  static_assert(kBN % kThreads == 0 || kBN < kThreads, "scale rows split evenly over threads");
  static_assert(kTokMax <= kThreads, "one thread per X row");
  static_assert((kThreads / 4) % 8 == 0 && (kThreads / 16) % 2 == 0, "fixed swizzle per thread");
  static_assert(STAGES >= 3, "scale loads run kDelay >= 1 stages ahead");
  /* row v of this thread's scale rows exists in the tile */
  static __device__ __forceinline__ bool srow_in_tile(int v) {
    return kBN >= kThreads || (int)threadIdx.x + v * kThreads < kBN;
  }
  static_assert(kSlot % 16 == 0, "16-byte aligned slots");

  /* Per unit: where this thread's copies come from. */
  struct lstate {
    const uint8_t *w;            /* expert's weights + this thread's 16-byte column */
    const unsigned short *s;     /* expert's scales (biases: + b_minus_s bytes) */
    uint32_t n[kWPer];           /* weight rows (clamped to N - 1) */
    uint32_t sn[kSRows], smask;  /* scale rows (clamped); bit v: row v is < N */
    uint32_t xr[kXPer], xm;      /* token rows of the x chunks; bit i: chunk i has a token */
    uint32_t tr;                 /* thread < kTokMax: its token's x row (X copy) */
    bool tv;
  };
  /* Scale words of the stage a thread loads, waiting kDelay stages to be stored. */
  struct sregs {
    uint32_t s[kSRows][kSWords], b[kSRows][kSWords];
  };

  static __device__ __forceinline__ void load_unit(const kargs &a, const unit_t &u, lstate &ls) {
    const int tid = threadIdx.x;
    const int64_t e_rows = (int64_t)u.e * a.N;
    const int n0 = u.ntile * kBN;
    ls.w = (const uint8_t *)a.w + e_rows * a.row_bytes + (tid & 3) * 16;
    ls.s = (const unsigned short *)a.scales + e_rows * a.groups;
#pragma unroll
    for (int i = 0; i < kWPer; i++) ls.n[i] = min(n0 + (tid >> 2) + i * (kThreads / 4), a.N - 1);
    ls.smask = 0;
#pragma unroll
    for (int v = 0; v < kSRows; v++) {
      const int n = n0 + tid + v * kThreads;
      ls.sn[v] = min(n, a.N - 1);
      ls.smask |= n < a.N && srow_in_tile(v) ? 1u << v : 0u;
    }
    ls.xm = 0;
#pragma unroll
    for (int i = 0; i < kXPer; i++) {
      const int r = (tid >> 4) + i * (kThreads / 16);
      const bool has = r < u.cnt;
      ls.xr[i] = has ? (uint32_t)__ldg(a.plan.rows_x + u.r0 + r) : 0u;
      ls.xm |= has ? 1u << i : 0u;
    }
    ls.tv = tid < u.cnt;
    ls.tr = ls.tv ? (uint32_t)__ldg(a.plan.rows_x + u.r0 + tid) : 0u;
  }

  /* Start stage lk's copies into ring slot `slot` and load its scales into
   * sr (stored later by put_scales). Branch-free: k past K or a missing
   * token is a zero-byte (zero-filling) copy from an in-bounds address. */
  static __device__ __forceinline__ void issue(const kargs &a, const lstate &ls, int lk, uint32_t sm,
                                               int slot, sregs &sr) {
    const int tid = threadIdx.x;
    const uint32_t xs = sm + slot * kSlot, ws = xs + kXStage, xx = ws + kWStage + 2 * kSStage;
    /* weights: chunk (tid & 3) of rows (tid >> 2) + i * kThreads/4 */
    const int j = tid & 3;
    const bool kin = lk * kStageK + 32 * j < a.K;
    const uint8_t *wst = ls.w + (kin ? lk * kWRowBytes : 0);
    const uint32_t wstride = (uint32_t)a.row_bytes;
    const int r0 = tid >> 2;
    const uint32_t wdst = ws + r0 * kWRowBytes + wphys(j, r0) * 16;
#pragma unroll
    for (int i = 0; i < kWPer; i++)
      cp_async_l2pf(wdst + i * (kThreads / 4) * kWRowBytes, wst + (uint64_t)ls.n[i] * wstride,
                    kin ? 16 : 0);
    /* x: chunk (tid & 15) of the unit's token rows (tid >> 4) + i * kThreads/16 */
    const int c = tid & 15, xrow0 = tid >> 4;
    const uint8_t *xst = (const uint8_t *)a.xp + (size_t)lk * kXRowBytes + c * 16;
    const uint32_t xstride = (uint32_t)a.xp_pitch * 2u;
    const uint32_t xdst = xs + xrow0 * kXRowBytes + xphys(c, xrow0) * 16;
#pragma unroll
    for (int i = 0; i < kXPer; i++)
      cp_async<16>(xdst + i * (kThreads / 16) * kXRowBytes, xst + (uint64_t)ls.xr[i] * xstride,
                   (ls.xm >> i) & 1u ? 16 : 0);
    /* X: one token row per thread < kTokMax */
    if (tid < kTokMax)
      cp_async<kGps * 4>(xx + tid * kGps * 4,
                         a.xsum + (uint64_t)ls.tr * (uint32_t)a.xsum_pitch + lk * kGps,
                         ls.tv ? kGps * 4 : 0);
    /* scales and biases: row tid (+ v * kThreads), this stage's groups */
#pragma unroll
    for (int v = 0; v < kSRows; v++) {
      const unsigned short *sp = ls.s + (uint64_t)ls.sn[v] * (uint32_t)a.groups;
      const unsigned short *bp = (const unsigned short *)((const uint8_t *)sp + a.b_minus_s);
#pragma unroll
      for (int w = 0; w < kSWords; w++) sr.s[v][w] = sr.b[v][w] = 0;
#pragma unroll
      for (int g = 0; g < kGps; g++) {
        const int gi = lk * kGps + g;
        const bool ok = gi < a.groups && ((ls.smask >> v) & 1u);
        const uint32_t s = ok ? ldg_u16_l2pf(sp + gi) : 0u, b = ok ? ldg_u16_l2pf(bp + gi) : 0u;
        sr.s[v][g >> 1] |= s << (16 * (g & 1));
        sr.b[v][g >> 1] |= b << (16 * (g & 1));
      }
    }
  }

  /* Store a stage's scales (loaded kDelay stages earlier) into its slot. */
  static __device__ __forceinline__ void put_scales(uint8_t *smem, int slot, const sregs &sr) {
    uint8_t *ss = smem + slot * kSlot + kXStage + kWStage;
#pragma unroll
    for (int v = 0; v < kSRows; v++) {
      const int row = threadIdx.x + v * kThreads;
      if (!srow_in_tile(v)) continue;
#pragma unroll
      for (int half = 0; half < 2; half++) {
        uint8_t *p = ss + half * kSStage + row * kGps * 2;
        const uint32_t *src = half ? sr.b[v] : sr.s[v];
        if constexpr (kGps == 4) *reinterpret_cast<uint2 *>(p) = make_uint2(src[0], src[1]);
        else if constexpr (kGps == 2) *reinterpret_cast<uint32_t *>(p) = src[0];
        else *reinterpret_cast<unsigned short *>(p) = (unsigned short)src[0];
      }
    }
  }

  /* One stage for the unit's NT token tiles: per group, MMAs of M + q from
   * zero, then fold s and b - M s into acc. */
  template <int NT>
  static __device__ __forceinline__ void compute_n(const uint8_t *smem, int slot,
                                                   float (&acc)[MT][NTMAX][4]) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const uint8_t *xs = smem + slot * kSlot, *ws = xs + kXStage, *ss = ws + kWStage;
    const float *xx = reinterpret_cast<const float *>(ss + 2 * kSStage);
    /* s and c = b - M s of rows g, g+8 of each m tile, per group of the stage */
    float sf[MT][2][kGps], cf[MT][2][kGps];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int row = (warp * MT + mt) * 16 + h * 8 + g;
        uint32_t sw[kSWords], bw[kSWords];
#pragma unroll
        for (int w = 0; w < kSWords; w++) {
          const uint8_t *p = ss + row * kGps * 2 + 4 * w;
          if constexpr (kGps == 1) {
            sw[w] = *reinterpret_cast<const unsigned short *>(p);
            bw[w] = *reinterpret_cast<const unsigned short *>(p + kSStage);
          } else {
            sw[w] = *reinterpret_cast<const uint32_t *>(p);
            bw[w] = *reinterpret_cast<const uint32_t *>(p + kSStage);
          }
        }
#pragma unroll
        for (int gi = 0; gi < kGps; gi++) {
          const uint32_t s16 = (sw[gi >> 1] >> (16 * (gi & 1))) & 0xFFFFu;
          const uint32_t b16 = (bw[gi >> 1] >> (16 * (gi & 1))) & 0xFFFFu;
          sf[mt][h][gi] = TR::to_f(s16);
          cf[mt][h][gi] = fmaf(-TR::offset, sf[mt][h][gi], TR::to_f(b16));
        }
      }
    const int wsw = (g >> 1) & 3; /* wphys(j, row) for every row this lane reads */
#pragma unroll
    for (int gi = 0; gi < kGps; gi++) {
      float ag[MT][NT][4];
#pragma unroll
      for (int cj = 0; cj < kCpg; cj++) {
        const int j = gi * kCpg + cj;
        uint32_t wq[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int h = 0; h < 2; h++)
            wq[mt][h] = *reinterpret_cast<const uint32_t *>(
                ws + ((warp * MT + mt) * 16 + h * 8 + g) * kWRowBytes + ((j ^ wsw) << 4) + 4 * t);
        uint4 xv[NT];
#pragma unroll
        for (int n = 0; n < NT; n++)
          xv[n] = *reinterpret_cast<const uint4 *>(xs + (8 * n + g) * kXRowBytes +
                                                   (xphys(4 * j + t, g) << 4));
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
          /* k-step 0: nibbles (0,4) and (2,6); k-step 1: (1,5) and (3,7) */
          const int sh = 4 * ks;
          uint32_t A[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; mt++) {
            A[mt][0] = and_or(wq[mt][0] >> sh, kNibbles, dtype_traits<T>::magic);
            A[mt][1] = and_or(wq[mt][1] >> sh, kNibbles, dtype_traits<T>::magic);
            A[mt][2] = and_or(wq[mt][0] >> (sh + 8), kNibbles, dtype_traits<T>::magic);
            A[mt][3] = and_or(wq[mt][1] >> (sh + 8), kNibbles, dtype_traits<T>::magic);
          }
#pragma unroll
          for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < NT; n++) {
              const uint32_t b0 = ks ? xv[n].z : xv[n].x, b1 = ks ? xv[n].w : xv[n].y;
              if (cj == 0 && ks == 0) mma_16816_zero<T>(ag[mt][n], A[mt], b0, b1);
              else mma_16816<T>(ag[mt][n], A[mt], b0, b1);
            }
        }
      }
      /* fold: acc += s * ag + c * X (tokens 2t, 2t+1 of each tile) */
#pragma unroll
      for (int n = 0; n < NT; n++) {
        const float X0 = xx[(8 * n + 2 * t) * kGps + gi], X1 = xx[(8 * n + 2 * t + 1) * kGps + gi];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int r = 0; r < 4; r++) {
            const int h = r >> 1;
            acc[mt][n][r] = fmaf(sf[mt][h][gi], ag[mt][n][r], acc[mt][n][r]);
            acc[mt][n][r] = fmaf(cf[mt][h][gi], (r & 1) ? X1 : X0, acc[mt][n][r]);
          }
      }
    }
  }

  template <int NT = 1>
  static __device__ __forceinline__ void compute(int nt, const uint8_t *smem, int slot,
                                                 float (&acc)[MT][NTMAX][4]) {
    if constexpr (NT == NTMAX) compute_n<NT>(smem, slot, acc);
    else if (nt == NT) compute_n<NT>(smem, slot, acc);
    else compute<NT + 1>(nt, smem, slot, acc);
  }

  static __device__ __forceinline__ void run(const kargs &a) {
    extern __shared__ __align__(16) uint8_t smem[];
    int u0, u1;
    stripe(a, u0, u1);
    const int nk = (a.K + kStageK - 1) / kStageK;
    const int nflat = (u1 - u0) * nk;
    if (nflat <= 0) return;
    float acc[MT][NTMAX][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int j = 0; j < NTMAX; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) acc[mt][j][r] = 0.f;
    int lidx = u0, lk = 0, cidx = u0, ck = 0;
    unit_t lu = decode<kTokMax>(a, u0), cu = lu;
    lstate ls;
    load_unit(a, lu, ls);
    const uint32_t sm = smem_u32(smem);
    sregs sq[kDelay];
    /* Prologue: stages 0 .. STAGES-2, their scales stored at once. */
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
      if (s < nflat) {
        issue(a, ls, lk, sm, s, sq[0]);
        put_scales(smem, s, sq[0]);
        if (++lk == nk) {
          lk = 0;
          if (++lidx < u1) lu = next_unit<kTokMax>(a, lu), load_unit(a, lu, ls);
        }
      }
      cp_async_commit();
    }
    int slot = 0;
    for (int f = 0; f < nflat; f++) {
      const int next = slot == STAGES - 1 ? 0 : slot + 1;
      /* stage f + 1's scales, loaded kDelay iterations ago (stage f + 1 >= STAGES - 1) */
      if (f >= kDelay && f + 1 < nflat) put_scales(smem, next, sq[0]);
#pragma unroll
      for (int d = 0; d + 1 < kDelay; d++) sq[d] = sq[d + 1];
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      const int nslot = slot == 0 ? STAGES - 1 : slot - 1;
      if (f + STAGES - 1 < nflat) {
        issue(a, ls, lk, sm, nslot, sq[kDelay - 1]);
        if (++lk == nk) {
          lk = 0;
          if (++lidx < u1) lu = next_unit<kTokMax>(a, lu), load_unit(a, lu, ls);
        }
      }
      cp_async_commit();
      compute(cu.nt, smem, slot, acc);
      if (++ck == nk) {
        store_unit<T, MT, NTMAX, kBN>(a, cu, acc);
        ck = 0;
        if (++cidx < u1) cu = next_unit<kTokMax>(a, cu);
      }
      slot = next;
    }
    cp_async_wait<0>();
  }
};

template <typename T, int GS, int WARPS, int MT, int STAGES, int MINB, int NTMAX>
__global__ void __launch_bounds__(WARPS * 32, MINB) fold_kernel(kargs a) {
  fold_kernel_impl<T, GS, WARPS, MT, STAGES, NTMAX>::run(a);
}

/* x -> xp: each 8-value block in nibble order (0,4,2,6,1,5,3,7), rows
 * zero-padded to xp_pitch (a multiple of 128); xsum[row][g] = sum of group
 * g's x in float, k ascending (0 past K). One thread per (row, group). */
template <typename T, int GS>
__global__ void fold_prep(const T *x, int64_t rows, int K, T *xp, int xp_pitch, float *xsum,
                          int xsum_pitch) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * xsum_pitch) return;
  const int64_t row = i / xsum_pitch;
  const int grp = (int)(i - row * xsum_pitch);
  float sum = 0.f;
#pragma unroll
  for (int b = 0; b < GS / 8; b++) {
    const int k0 = grp * GS + 8 * b;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (k0 < K) v = *reinterpret_cast<const uint4 *>(x + row * K + k0);
    const T *e = reinterpret_cast<const T *>(&v);
#pragma unroll
    for (int q = 0; q < 8; q++) sum += dtype_traits<T>::to_f(e[q]);
    uint4 o;
    o.x = prmt(v.x, v.z, 0x5410); /* (x0, x4) */
    o.y = prmt(v.y, v.w, 0x5410); /* (x2, x6) */
    o.z = prmt(v.x, v.z, 0x7632); /* (x1, x5) */
    o.w = prmt(v.y, v.w, 0x7632); /* (x3, x7) */
    *reinterpret_cast<uint4 *>(xp + row * xp_pitch + k0) = o;
  }
  xsum[row * xsum_pitch + grp] = sum;
}

/* The compiled-in configs: X(name, warps, mtiles, stages, min CTAs/SM, n8 tiles). */
#define GQMM_FOLD_CONFIGS(X)                                                                      \
  X("fold_w4_m2_s4", 4, 2, 4, 1, 4)                                                               \
  X("fold_w4_m2_s4_b3", 4, 2, 4, 3, 4)                                                            \
  X("fold_w8_m1_s4_b2", 8, 1, 4, 2, 4)

template <typename T, int GS, int W, int M, int S, int B, int NT> launch_info info() {
  using K = fold_kernel_impl<T, GS, W, M, S, NT>;
  return {fold_kernel<T, GS, W, M, S, B, NT>, K::kThreads, K::kSmem};
}

template <typename T, int GS> launch_info pick_cfg(int cfg) {
  int i = 0;
#define GQMM__FOLD_CASE(name, w, m, s, b, nt)                                                     \
  if (cfg == i++) return info<T, GS, w, m, s, b, nt>();
  GQMM_FOLD_CONFIGS(GQMM__FOLD_CASE)
#undef GQMM__FOLD_CASE
  return {nullptr, 0, 0};
}

template <typename T> launch_info pick_gs(int gs, int cfg) {
  switch (gs) {
  case 32: return pick_cfg<T, 32>(cfg);
  case 64: return pick_cfg<T, 64>(cfg);
  case 128: return pick_cfg<T, 128>(cfg);
  default: return {nullptr, 0, 0};
  }
}

launch_info pick(const gqmm__cu_qmm *a, int cfg) {
  if (a->bits != 4) return {nullptr, 0, 0};
  if (a->dtype == GQMM__CU_BF16) return pick_gs<__nv_bfloat16>(a->group_size, cfg);
  if (a->dtype == GQMM__CU_F16) return pick_gs<__half>(a->group_size, cfg);
  return {nullptr, 0, 0};
}

const gqmm__cu_mma_config kConfigs[] = {
#define GQMM__FOLD_ROW(name, w, m, s, b, nt) {name, w, m, s, 8 * nt},
    GQMM_FOLD_CONFIGS(GQMM__FOLD_ROW)
#undef GQMM__FOLD_ROW
};

/* Prepared-x geometry: rows padded to a multiple of the stage's k. */
int64_t xp_pitch(const gqmm__cu_qmm *a) { return (a->K + kStageK - 1) / kStageK * kStageK; }
int64_t xsum_pitch(const gqmm__cu_qmm *a) { return xp_pitch(a) / a->group_size; }

template <typename T>
int launch_prep(const gqmm__cu_qmm *a, T *xp, float *xs) {
  const int64_t rows = a->x_rows, n = rows * xsum_pitch(a);
  if (n == 0) return 0;
  const int threads = 256;
  const unsigned blocks = (unsigned)((n + threads - 1) / threads);
  const T *x = (const T *)a->x;
  const int K = (int)a->K, xpp = (int)xp_pitch(a), xsp = (int)xsum_pitch(a);
  switch (a->group_size) {
  case 32: fold_prep<T, 32><<<blocks, threads>>>(x, rows, K, xp, xpp, xs, xsp); break;
  case 64: fold_prep<T, 64><<<blocks, threads>>>(x, rows, K, xp, xpp, xs, xsp); break;
  default: fold_prep<T, 128><<<blocks, threads>>>(x, rows, K, xp, xpp, xs, xsp); break;
  }
  return (int)cudaGetLastError();
}

} // namespace

extern "C" int gqmm__cu_fold_config_count(void) {
  return (int)(sizeof kConfigs / sizeof kConfigs[0]);
}
extern "C" const gqmm__cu_mma_config *gqmm__cu_fold_config_get(int i) {
  return i >= 0 && i < gqmm__cu_fold_config_count() ? &kConfigs[i] : nullptr;
}

extern "C" int gqmm__cu_fold_eligible(const gqmm__cu_qmm *a) {
  return gqmm__cu_mma_eligible(a) && a->bits == 4 &&
         (a->group_size == 32 || a->group_size == 64 || a->group_size == 128) &&
         xp_pitch(a) <= INT32_MAX / 2 && a->x_rows <= INT32_MAX;
}

extern "C" int64_t gqmm__cu_fold_scratch_bytes(const gqmm__cu_qmm *a) {
  const int64_t xp = a->x_rows * xp_pitch(a) * 2;
  return (xp + 255) / 256 * 256 + a->x_rows * xsum_pitch(a) * (int64_t)sizeof(float);
}

extern "C" int gqmm__cu_fold_grid(int cfg, const gqmm__cu_qmm *a, int sms, int *out_grid) {
  return grid_of(pick(a, cfg), sms, out_grid);
}

extern "C" int gqmm__cu_fold_run(int cfg, const gqmm__cu_qmm *a, const gqmm__cu_plan *plan,
                                 int experts, int grid, void *scratch) {
  launch_info li = pick(a, cfg);
  if (!li.fn || !scratch) return (int)cudaErrorInvalidValue;
  const int64_t xpb = (a->x_rows * xp_pitch(a) * 2 + 255) / 256 * 256;
  void *xp = scratch;
  float *xs = (float *)((char *)scratch + xpb);
  int err = a->dtype == GQMM__CU_BF16 ? launch_prep(a, (__nv_bfloat16 *)xp, xs)
                                      : launch_prep(a, (__half *)xp, xs);
  if (err) return err;
  const gqmm__cu_mma_config &c = kConfigs[cfg];
  kargs k = make_kargs(a, plan, experts, c.warps * c.mtiles * 16);
  k.xp = xp, k.xsum = xs;
  k.xp_pitch = (int)xp_pitch(a), k.xsum_pitch = (int)xsum_pitch(a);
  li.fn<<<grid, li.threads, li.smem>>>(k);
  return (int)cudaGetLastError();
}
