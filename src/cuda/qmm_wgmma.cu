/*
 * qmm_wgmma.cu - the gather kernel on Hopper's warpgroup MMA (wgmma), for
 * weights in the packed layout (kernels.h, "k-step order").
 *
 * Why: at 16+ rows per expert the mma.sync kernel (qmm_mma.cu) is bound by
 * its arithmetic, not by memory: each warp reads the unit's x tile from
 * shared memory itself and the m16n8k16 tensor-core path runs at ~65% of
 * the bf16 peak. Here each warpgroup's four warps dequantize their 16-row
 * slices of a 64-row weight tile into registers (the A operand, same
 * register layout as mma.sync; one FMA per two weights on a pack with
 * pre-scaled scales, wfmt.cuh "linear dequantization"), and one
 * wgmma.m64nNk16 per 16 k multiplies them with the unit's tokens (N = 8..64)
 * read straight from shared memory (the B operand, K-major with the 128-byte
 * swizzle). The MMAs run asynchronously while the next k-step's weights are
 * dequantized. A CTA is one warpgroup with two m64 tiles (up to 32 or 64
 * tokens), or two warpgroups with one each (64 tokens: GQMM_WG_CONFIGS).
 *
 * The packed layout in k-step order: in the k-step s of a stage (16 k) a
 * wgmma wants lane (g, t) of warp w to hold k 2t, 2t+1, 2t+8, 2t+9 of rows
 * 16w + g and + 8, so pack.cu stores exactly those values in the lane's
 * slot, pair 2s + i (the shift-and-mask pair of wfmt) = k 16s + 2t + 8i and
 * + 1. x then stays in its natural order. A lane's values span the whole
 * 128-k stage, so a k-step's scale is the group of its 16 k: the group size
 * is a template parameter (the group of each k-step is then a constant).
 *
 * Pipeline and work walk as in qmm_mma.cu (mma_common.cuh), but: one bulk copy
 * per stage (weights + scale words, L2 evict-first: read once, they must not
 * push the reused x rows out of L2), x rows by cp.async, an mbarrier per
 * ring slot, units dealt round-robin over a persistent grid.
 */
#include "mma_common.cuh"
#include "wfmt.cuh"

#include <cuda_runtime.h>

using namespace gqmm_cu;

namespace {

/* AHEAD: stages in flight ahead of the one computed. STAGES - 1 refills the
 * slot of the previous stage, so its last MMAs must be waited for before
 * the barrier; STAGES - 2 refills the slot of the stage before that, whose
 * MMAs every warp has already waited for (the wait inside compute_n) before
 * it reaches the barrier, so the MMAs overlap the barrier and the copies. */
template <typename T, int BITS, int GS, int MT, int STAGES, int NTMAX, int AHEAD, bool LIN, int WGS>
struct wg_kernel {
  static_assert(AHEAD == STAGES - 1 || AHEAD == STAGES - 2, "ring slots");
  using F = wfmt<BITS>;
  static_assert(!LIN || F::lin_ok, "no linear dequantization for this width");
  /* scale registers per (row, group): one per lin_pos value */
  static constexpr int kSPos = LIN && F::lin_step ? 2 : 1;
  /* WGS warpgroups, each owning MT m64 tiles of the 128-row tile */
  static constexpr int kWarps = 4 * WGS, kThreads = 128 * WGS;
  static constexpr int kBN = MT * 64 * WGS;
  static_assert(kBN == GQMM__CU_PACK_TILE_N, "the packed layout is for 128-row tiles");
  static constexpr int kTokMax = 8 * NTMAX;
  static constexpr int kXHalf = kTokMax * 128; /* 64 k of every token: one swizzled region */
  static constexpr int kXStage = 2 * kXHalf;
  static constexpr int kGps = kStageK / GS; /* groups per stage */
  static constexpr int kWBytes = kBN * kStageK * BITS / 8;
  static constexpr int kWStage = kWBytes + kBN * kGps * 4;
  /* stages keep the x regions 1024-byte aligned (the swizzle atom) */
  static constexpr int kStageBytes = (kXStage + kWStage + 1023) / 1024 * 1024;
  static constexpr int kBarOff = STAGES * kStageBytes;
  /* The unit ring (below): slot i % kRing holds unit i's descriptor, then
   * its output rows. */
  static constexpr int kRing = 8, kRingAhead = 4, kRingSlot = 16 + 4 * kTokMax;
  static constexpr int kRingOff = (kBarOff + STAGES * 8 + 15) / 16 * 16;
  static constexpr int kSmem = kRingOff + kRing * kRingSlot + 1024; /* + alignment slack */
  static constexpr int kXPer = kTokMax * 16 / kThreads;
  /* MMAs go out in kGroups commit groups of kSteps k-steps (16 k each): two
   * groups in flight hold 2 * MT * kSteps * 4 A registers. One k-step per
   * group: 16 such registers, not 32 (4-bit: 154 registers instead of the
   * 168 cap), room that keeps the x copies' addresses live instead of
   * recomputed every stage (issue below; perf-notes, session 4). */
  static constexpr int kSteps = 1, kGroups = kStageK / 16 / kSteps;
  static_assert(kXPer * kThreads == kTokMax * 16, "x chunks must split evenly over threads");
  /* The 64-token configs run all 8 n8 token tiles whatever the unit's
   * count: an MMA column reads its own x row only, so the columns past the
   * count (x rows of earlier units, or never written) are garbage that is
   * never stored. One instance of the stage loop instead of one per count:
   * the one-warpgroup 4-bit bf16 instance 226 -> 196 registers, 5% faster
   * at 64 rows per expert, 6% at 96-128, the seed step at 4 canvases 3%
   * (H100); the short units it pays for (an expert's rows past a multiple
   * of 64) are few where these configs run (more than 32 rows per expert).
   * The 32-token configs keep the dispatch: at 1-16 rows per expert their
   * partial tiles are the rule (perf-notes, session 10). */
  static constexpr bool kAllTiles = NTMAX == 8;
  /* Half last stages (kernels.h gqmm__cu_pack_half_k): never 3-bit, and
   * K % 128 <= 64 cannot happen with 128-k groups. */
  static constexpr bool kHalfK = BITS != 3 && GS <= 64;

  /* m16 tile of (warp, mt): the m64 tile's 16-row slice of this warp */
  static __device__ __forceinline__ int m16_of(int mt) { return mt * kWarps + (threadIdx.x >> 5); }
  /* The unit's tile is a half tile: rows 0..63, scale words after them. */
  static __device__ __forceinline__ int half_tile(const kargs &a, const unit_t &u) {
    return a.pk_half_last && u.ntile == a.pk_tiles - 1;
  }

  /* The unit ring: the CTA's unit descriptors and each unit's output rows
   * reach shared memory by cp.async, ahead of use. A dependent global load
   * at a unit's start (its descriptor, then the addresses of its first
   * copies) or end (the output rows, then the stores) waits out the L2's
   * latency under the weight streams, ~1300 cycles: in down (a unit every
   * 5.5 stages) those two waits were 17% of the warps' stall samples
   * (perf-notes, session 8). The load side, entering unit i, reads i's
   * descriptor from the ring, fetches the descriptor of unit i + kRingAhead
   * and copies i's output rows; all travel in the copies' commit groups, so
   * the ring waits and barriers that order the stages order them too:
   * - a descriptor fetched when the load side enters unit i is read when it
   *   enters unit i + kRingAhead, at least kRingAhead stages later (one unit
   *   is one stage or more), so its group is complete (kRingAhead > AHEAD);
   * - the compute side, at most AHEAD stages behind, reads unit i's
   *   descriptor when it enters i and its rows at its end, before the load
   *   side enters i + kRing - kRingAhead (slot reused for a descriptor) or
   *   i + kRing (rows). */
  static_assert(AHEAD < kRingAhead && kRingAhead + AHEAD < kRing, "unit ring");
  struct walk {
    int idx, k; /* unit of this CTA, k-stage in it */
    unit_t u;
    /* One stage on; true if that entered unit idx (u: the caller's to read). */
    __device__ __forceinline__ bool step(int nunits, int nk) {
      if (++k < nk) return false;
      k = 0;
      return ++idx < nunits;
    }
  };
  static __device__ __forceinline__ int ring_slot(int i) { return kRingOff + (i % kRing) * kRingSlot; }
  static __device__ __forceinline__ unit_t ring_unit(const uint8_t *smem, int i) {
    return unit_of(*reinterpret_cast<const int4 *>(smem + ring_slot(i)));
  }
  static __device__ __forceinline__ const int32_t *ring_rows(const uint8_t *smem, int i) {
    return reinterpret_cast<const int32_t *>(smem + ring_slot(i) + 16);
  }
  /* Unit i's descriptor into its slot (deal stride g), if there is a unit i. */
  static __device__ __forceinline__ void ring_fetch(const kargs &a, uint32_t sm, int i, int nunits,
                                                    int g) {
    if (i < nunits) cp_async<16>(sm + ring_slot(i), unit_desc_ptr(a, i, g), 16);
  }

  /* kNoRow: chunk row i of this thread is past the unit's tokens */
  static constexpr uint32_t kNoRow = 0xFFFFFFFFu;
  struct lstate {
    const uint8_t *pk;  /* the unit's first stage block */
    int pk_bytes;       /* bytes of its stage blocks */
    uint32_t xr[kXPer]; /* x rows of the thread's chunk rows tid / 16 + 8 i, or kNoRow */
  };

  /* The load side enters unit w.idx: its copies' state, and its output
   * rows into the ring (read by its store). */
  static __device__ __forceinline__ void load_unit(const kargs &a, const walk &w, uint32_t sm,
                                                   lstate &ls) {
    const unit_t &lu = w.u;
    if ((int)threadIdx.x < lu.cnt)
      cp_async<4>(sm + ring_slot(w.idx) + 16 + 4 * threadIdx.x,
                  a.plan.rows_o + lu.r0 + threadIdx.x, 4);
    ls.pk = a.pk + lu.e * a.pk_expert_bytes + (int64_t)lu.ntile * a.pk_stages * a.pk_stage_bytes;
    ls.pk_bytes = a.pk_stage_bytes >> half_tile(a, lu);
#pragma unroll
    for (int i = 0; i < kXPer; i++) {
      const int r = (threadIdx.x >> 4) + i * (kThreads / 16);
      ls.xr[i] = r < lu.cnt ? (uint32_t)__ldg(a.plan.rows_x + lu.r0 + r) : kNoRow;
    }
  }

  /* Stage lk into ring slot `slot` (st: the slot's shared address): one bulk
   * copy of the block, and the unit's x rows into the swizzled K-major
   * layout (16-byte chunk c of token r: region c / 8, position
   * (c % 8) ^ (r % 8)). Rows past the unit's count are not copied: they feed
   * only MMA columns that are never stored. */
  static __device__ __forceinline__ void issue(const kargs &a, const lstate &ls, int lk, int nk,
                                               uint32_t st, uint32_t bar) {
    const int tid = threadIdx.x;
    if (tid == 0) { /* a half last stage: the first half of its block */
      const uint32_t bytes = (uint32_t)ls.pk_bytes >> (kHalfK && a.pk_half_k && lk == nk - 1);
      mbar_arrive_expect_tx(bar, bytes);
      bulk_copy_g2s(st + kXStage, ls.pk + (int64_t)lk * ls.pk_bytes, bytes, bar,
                    l2_evict_first_policy());
    }
    const int c = tid & 15, kx = lk * kStageK + c * 8, r0 = tid >> 4;
    const bool xin = kx < a.K;
    const uint8_t *xst = opaque((const uint8_t *)a.x + (xin ? (size_t)kx * 2 : 0));
    const uint32_t xstride = (uint32_t)a.K * 2u;
    /* rows r0 + 8 i share r % 8: one place + 1 KB steps */
    const uint32_t dst = st + (c >> 3) * kXHalf + r0 * 128 + (((c & 7) ^ (r0 & 7)) << 4);
#pragma unroll
    for (int i = 0; i < kXPer; i++)
      if (ls.xr[i] != kNoRow)
        cp_async<16>(dst + i * (kThreads / 16) * 128, xst + (uint64_t)ls.xr[i] * xstride,
                     xin ? 16 : 0);
  }

  /* One stage: dequantize the thread's weights k-step by k-step and issue
   * the warpgroup's MMAs for the unit's 8*NT tokens. HK: a half block (the
   * last stage of a ragged K): k-steps 0..3, each lane's first 2*BITS
   * bytes, the first half of the groups. sadj: kWBytes / 2 for a half tile
   * (its scale words follow 64 rows of weights), else 0. */
  template <int NT, bool HK>
  static __device__ __forceinline__ void compute_n(const uint8_t *stp, uint32_t st, int sadj,
                                                   float (&acc)[MT][NTMAX][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2;
    constexpr int kLaneB = F::bytes >> HK, kUnit = F::unit < kLaneB ? F::unit : kLaneB,
                  kUnits = kLaneB / kUnit, kWB = kWBytes >> HK, kG = kGps >> HK,
                  kGroupsH = kGroups >> HK;
    static_assert(!HK || (kHalfK && kGroups % 2 == 0), "half stages");
    const uint8_t *ws = stp + kXStage;
    uint32_t q[MT][2][BITS], sr[MT][2][kG][kSPos], br[MT][2][kG];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
#pragma unroll
        for (int u = 0; u < kUnits; u++)
          load_words<kUnit>(ws + (((m16_of(mt) * 2 + h) * kUnits + u) * 32 + lane) * kUnit,
                            q[mt][h] + kUnit / 4 * u);
        F::prep(q[mt][h]);
        /* the row's scale words, one per group of the stage */
        const uint32_t *sw = reinterpret_cast<const uint32_t *>(
            ws + kWB - (sadj >> HK) + ((m16_of(mt) * 16 + h * 8 + g) * kG) * 4);
#pragma unroll
        for (int j = 0; j < kG; j++) {
          const uint32_t w = sw[j];
          sr[mt][h][j][0] = bcast_lo<T>(w), br[mt][h][j] = bcast_hi<T>(w);
          if constexpr (kSPos == 2) sr[mt][h][j][1] = lin_rescale<T>(sr[mt][h][j][0], F::lin_step);
        }
      }
    /* A fragments are read by the MMAs asynchronously: a phase's registers
     * must not be rewritten before its group is done. Two phases in flight:
     * after committing phase p, wait until at most one group is pending
     * (phase p-1 done) and only then let phase p-1's registers go. */
    uint32_t Aprev[MT][kSteps][4];
    const uint64_t desc0 = wgmma_desc_sw128(st);
#pragma unroll
    for (int p = 0; p < kGroupsH; p++) {
      uint32_t A[MT][kSteps][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int sl = 0; sl < kSteps; sl++) {
          const int s = p * kSteps + sl, j = 16 * s / GS;
#pragma unroll
          for (int r = 0; r < 4; r++) { /* a0: g,2t  a1: g+8,2t  a2: g,2t+8  a3: g+8,2t+8 */
            const int h = r & 1, pi = 2 * s + (r >> 1);
            if constexpr (LIN)
              A[mt][sl][r] = lin_dequant<T>(F::pair_lin(q[mt][h], pi),
                                            sr[mt][h][j][kSPos == 2 && (pi & 1)], br[mt][h][j]);
            else
              A[mt][sl][r] = dequant<T, BITS>(F::pair(q[mt][h], pi, magic_of<T, BITS>()),
                                              sr[mt][h][j][0], br[mt][h][j]);
          }
        }
      wgmma_fence();
#pragma unroll
      for (int sl = 0; sl < kSteps; sl++) {
        /* k-step s: region s / 4, bytes 32 (s % 4) of each row; the address
         * field is in 16-byte units, so a constant added to the stage's
         * descriptor */
        const int s = p * kSteps + sl;
        const uint64_t desc = desc0 + (uint64_t)(((s >> 2) * kXHalf + (s & 3) * 32) >> 4);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) wgmma_rs<T, 8 * NT>(&acc[mt][0][0], A[mt][sl], desc);
      }
      wgmma_commit();
      if (p > 0) {
        wgmma_wait<1>();
        keep_live(Aprev);
      }
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int sl = 0; sl < kSteps; sl++)
#pragma unroll
          for (int r = 0; r < 4; r++) Aprev[mt][sl][r] = A[mt][sl][r];
    }
  }

  /* A finished unit's output through shared memory (one-warpgroup configs;
   * plain outputs and GLU outputs with their activation): the unit's last
   * stage's x region is free once that stage's MMAs are waited for (the
   * slot is refilled only after the next stage's barrier), so each warp
   * stages its values there, transposed to token rows by stmatrix, and
   * stores runs of 8 features in 16 bytes: at 32 tokens, per thread 4
   * (GLU: 2) row reads and stores instead of one two-byte store per value
   * (32; GLU 16) and 8 row loads (perf-notes, session 7). The rows are read
   * from the unit ring (shared memory), before the drain of the last MMAs. */
  static constexpr int kRuns = kTokMax * MT * 2 / 32; /* 16-byte runs a thread stores, at most */
  /* A warp's staging rows: a token's CH 16-byte chunks, swizzled by the
   * token so that the 8 rows of one stmatrix matrix, and the reads, fall
   * in distinct banks. */
  template <int CH>
  static __device__ __forceinline__ uint32_t staged_at(uint32_t base, int tok, int q) {
    return base + (tok * CH + (q ^ ((tok / (8 / CH)) & (CH - 1)))) * 16;
  }
  /* The output rows of the thread's runs, chunk lane % CH of tokens
   * lane / CH + (32 / CH) i (-1: past the unit's tokens). */
  template <int CH>
  static __device__ __forceinline__ void staged_rows(const uint8_t *smem, const walk &w,
                                                     int32_t (&row)[kRuns]) {
    const int lane = threadIdx.x & 31;
    const int32_t *rows = ring_rows(smem, w.idx);
#pragma unroll
    for (int i = 0; i < kTokMax * CH / 32; i++) {
      const int tok = lane / CH + i * (32 / CH);
      row[i] = tok < w.u.cnt ? rows[tok] : -1;
    }
  }
  /* The thread's runs from the staging rows at base: values n..n+7 of out
   * rows row[i] of ld values. */
  template <int CH>
  static __device__ __forceinline__ void staged_store(const kargs &a, uint32_t base,
                                                      const int32_t (&row)[kRuns], int n, int ld) {
    const int lane = threadIdx.x & 31;
    const bool vec = ((uintptr_t)a.out & 15) == 0 && (ld & 7) == 0 && n + 8 <= ld;
#pragma unroll
    for (int i = 0; i < kTokMax * CH / 32; i++) {
      if (row[i] < 0 || n >= ld) continue;
      const uint4 v = lds_v4(staged_at<CH>(base, lane / CH + i * (32 / CH), lane % CH));
      T *o = (T *)a.out + (int64_t)row[i] * ld + n;
      if (vec) {
        *reinterpret_cast<uint4 *>(o) = v;
      } else {
        const T *e = reinterpret_cast<const T *>(&v);
#pragma unroll
        for (int k = 0; k < 8; k++)
          if (n + k < ld) o[k] = e[k];
      }
    }
  }
  /* Plain outputs: the thread's values of (m16 tile mt, n8 tile j) are rows
   * g and g + 8 of tokens 2t and 2t + 1: two registers of two 8x8 (row,
   * token) matrices. A staging row is a token's MT x 16 rows (4 chunks). */
  static __device__ __forceinline__ void store_staged(const kargs &a, const unit_t &u,
                                                      float (&acc)[MT][NTMAX][4], uint32_t st,
                                                      const int32_t (&row)[kRuns]) {
    constexpr int CH = 2 * MT;
    static_assert(WGS == 1, "another warpgroup may still read the x region");
    static_assert(kWarps * kTokMax * CH * 16 <= kXStage && NTMAX % 2 == 0, "staging");
    using D = dtype_traits<T>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint32_t base = st + warp * (kTokMax * CH * 16);
    /* lane 8i + r: row r of matrix i = (rows 8 (i & 1).., tokens 8 (j + i / 2)..) */
    const int mi = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int j = 0; j < NTMAX; j += 2) {
        stmatrix_x4_trans(staged_at<CH>(base, 8 * (j + (mi >> 1)) + r8, 2 * mt + (mi & 1)),
                          D::from_f2(acc[mt][j][0], acc[mt][j][1]),
                          D::from_f2(acc[mt][j][2], acc[mt][j][3]),
                          D::from_f2(acc[mt][j + 1][0], acc[mt][j + 1][1]),
                          D::from_f2(acc[mt][j + 1][2], acc[mt][j + 1][3]));
#pragma unroll
        for (int jj = j; jj < j + 2; jj++)
#pragma unroll
          for (int r = 0; r < 4; r++) acc[mt][jj][r] = 0.f;
      }
    __syncwarp();
    const int q = lane % CH; /* the thread's chunk: m16 tile q / 2, rows 8 (q % 2).. */
    staged_store<CH>(a, base, row,
                     u.ntile * kBN + ((q >> 1) * (kBN / (16 * MT)) + warp) * 16 + (q & 1) * 8,
                     a.N);
  }
  /* A GLU pack with its activation (store_unit_glu's values): the thread's
   * (mt, j) values are gate and up of column g for tokens 2t and 2t + 1;
   * act(gate, up) of both is one register of an 8x8 (column, token)
   * matrix (four n8 tiles: 32 tokens, one stmatrix). A staging row is a
   * token's MT x 8 columns (MT chunks). */
  static __device__ __forceinline__ void store_staged_glu(const kargs &a, const unit_t &u,
                                                          float (&acc)[MT][NTMAX][4],
                                                          uint32_t st,
                                                          const int32_t (&row)[kRuns]) {
    constexpr int CH = MT;
    static_assert(WGS == 1 && NTMAX % 4 == 0, "staging: four n8 tiles a stmatrix");
    using D = dtype_traits<T>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint32_t base = st + warp * (kTokMax * CH * 16);
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int j0 = 0; j0 < NTMAX; j0 += 4) {
        uint32_t v[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
          float h[2];
#pragma unroll
          for (int c = 0; c < 2; c++) {
            h[c] = act_f(a.act - 1, D::to_f(D::from_f(acc[mt][j0 + j][c])),
                         D::to_f(D::from_f(acc[mt][j0 + j][2 + c])));
            acc[mt][j0 + j][c] = acc[mt][j0 + j][2 + c] = 0.f;
          }
          v[j] = D::from_f2(h[0], h[1]);
        }
        /* lane 8i + r: row r of matrix i = token 8 (j0 + i) + r */
        stmatrix_x4_trans(staged_at<CH>(base, 8 * j0 + lane, mt), v[0], v[1], v[2], v[3]);
      }
    __syncwarp();
    const int q = lane % CH; /* the thread's chunk: m16 tile q */
    staged_store<CH>(a, base, row, u.ntile * (kBN / 2) + (q * (kBN / (16 * MT)) + warp) * 8,
                     a.glu_i);
  }

  static __device__ __forceinline__ void keep_live(const uint32_t (&A)[MT][kSteps][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int sl = 0; sl < kSteps; sl++)
#pragma unroll
        for (int r = 0; r < 4; r++) asm volatile("" ::"r"(A[mt][sl][r]));
  }

  static __device__ __forceinline__ void pin_all(float (&acc)[MT][NTMAX][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int j = 0; j < NTMAX; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) wgmma_pin(acc[mt][j][r]);
  }

  static __device__ __forceinline__ void run(const kargs &a) {
    extern __shared__ __align__(16) uint8_t smem_raw[];
    const int nunits = units_of_cta(a);
    const int nk = (a.K + kStageK - 1) / kStageK;
    const int nflat = nunits * nk;
    if (nflat <= 0) return;
    /* the swizzle atoms need 1024-byte aligned regions */
    uint8_t *smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    const uint32_t sm = smem_u32(smem);
    float acc[MT][NTMAX][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int j = 0; j < NTMAX; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) acc[mt][j][r] = 0.f;
    const int g = deal_stride(a, units_total(a));
    if ((int)threadIdx.x <= kRingAhead) ring_fetch(a, sm, threadIdx.x, nunits, g);
    cp_async_commit();
    if (threadIdx.x == 0) {
      for (int s = 0; s < STAGES; s++) mbar_init(sm + kBarOff + 8 * s, 1);
      mbar_init_fence();
    }
    cp_async_wait<0>();
    __syncthreads();
    walk lw = {0, 0, ring_unit(smem, 0)}, cw = lw; /* load side, compute side */
    lstate ls;
    load_unit(a, lw, sm, ls);
    auto load_stage = [&](int slot) {
      issue(a, ls, lw.k, nk, sm + slot * kStageBytes, sm + kBarOff + 8 * slot);
      if (lw.step(nunits, nk)) {
        lw.u = ring_unit(smem, lw.idx);
        if (threadIdx.x == 0) ring_fetch(a, sm, lw.idx + kRingAhead, nunits, g);
        load_unit(a, lw, sm, ls);
      }
    };
#pragma unroll
    for (int s = 0; s < AHEAD; s++) {
      if (s < nflat) load_stage(s);
      cp_async_commit();
    }
    int slot = 0;
    uint32_t parity = 0;
    int sadj = half_tile(a, cw.u) ? kWBytes / 2 : 0;
    for (int f = 0; f < nflat; f++) {
      cp_async_wait<AHEAD - 1>();
      mbar_wait(sm + kBarOff + 8 * slot, parity);
      /* AHEAD = STAGES - 1: the previous stage's MMAs read the slot that is
       * refilled next */
      if constexpr (AHEAD == STAGES - 1) wgmma_wait<0>();
      __syncthreads();
      const int nslot = (slot + AHEAD) % STAGES;
      if (f + AHEAD < nflat) load_stage(nslot);
      cp_async_commit();
      auto stage = [&](auto nt) {
        uint8_t *stp = smem + slot * kStageBytes;
        const uint32_t st = sm + slot * kStageBytes;
        if constexpr (kHalfK) {
          if (a.pk_half_k && cw.k == nk - 1) compute_n<nt.value, true>(stp, st, sadj, acc);
          else compute_n<nt.value, false>(stp, st, sadj, acc);
        } else {
          compute_n<nt.value, false>(stp, st, sadj, acc);
        }
      };
      if constexpr (kAllTiles) stage(std::integral_constant<int, NTMAX>{});
      else with_nt<NTMAX>(cw.u.nt, stage);
      /* the unit's walk on, inside the rare branch (stepping it outside kept
       * the unit state live across the stage: 168 registers and spills) */
      if (cw.k == nk - 1) {
        if constexpr (WGS == 1) {
          int32_t row[kRuns];
          if (!a.glu_i) staged_rows<2 * MT>(smem, cw, row);
          else if (a.act) staged_rows<MT>(smem, cw, row);
          wgmma_wait<0>();
          pin_all(acc);
          const uint32_t st = sm + slot * kStageBytes;
          if (!a.glu_i) store_staged(a, cw.u, acc, st, row);
          else if (a.act) store_staged_glu(a, cw.u, acc, st, row);
          else store_unit_glu<T, MT, NTMAX, kBN>(a, cw.u, acc, ring_rows(smem, cw.idx));
        } else {
          wgmma_wait<0>();
          pin_all(acc);
          const int32_t *rows = ring_rows(smem, cw.idx);
          if (a.glu_i) store_unit_glu<T, MT, NTMAX, kBN>(a, cw.u, acc, rows);
          else store_unit<T, MT, NTMAX, kBN, true>(a, cw.u, acc, rows);
        }
        if (cw.step(nunits, nk)) {
          cw.u = ring_unit(smem, cw.idx);
          sadj = half_tile(a, cw.u) ? kWBytes / 2 : 0;
        }
      } else {
        cw.k++;
      }
      if (slot == STAGES - 1) slot = 0, parity ^= 1u;
      else slot++;
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
  }
};

template <typename T, int BITS, int GS, int MT, int STAGES, int MINB, int NTMAX, int AHEAD,
          bool LIN, int WGS>
__global__ void __launch_bounds__(128 * WGS, MINB) wg_kernel_fn(kargs a) {
  wg_kernel<T, BITS, GS, MT, STAGES, NTMAX, AHEAD, LIN, WGS>::run(a);
}

template <typename T, int BITS, int GS, int MT, int S, int B, int NT, int AH, bool LIN, int WGS>
launch_info info() {
  using K = wg_kernel<T, BITS, GS, MT, S, NT, AH, LIN, WGS>;
  return {wg_kernel_fn<T, BITS, GS, MT, S, B, NT, AH, LIN, WGS>, K::kThreads, K::kSmem};
}

/* The wgmma configurations (qmm_mma.cu GQMM_WG_CONFIG_ROWS names them):
 * X(m64 tiles per warpgroup, stages, min CTAs per SM, n8 tiles, stages
 * ahead, warpgroups). The last two take 64-token units, so an expert with
 * 33..64 rows is dequantized once, not twice: two warpgroups of one m64
 * tile each (32 accumulator registers per thread, 2 CTAs of 8 warps per
 * SM), or one warpgroup of two (64 accumulators, 232 registers, 2 CTAs of 4
 * warps). The second form issues ~1.6x fewer instructions per weight (the
 * per-k-step work covers two m64 tiles) and led at 64 and 128 rows per
 * expert by 3-10% (perf-notes, session 8). The last column: the widths
 * compiled (below). */
#define GQMM_WG_CONFIGS(X)                                                                        \
  X(2, 4, 3, 4, 2, 1, kAllBits) X(2, 4, 3, 4, 3, 1, kAllBits) X(1, 4, 2, 8, 2, 2, kAllBits)       \
  X(2, 4, 2, 8, 2, 1, kAllBits) X(2, 4, 4, 4, 2, 1, k2Bit)

/* The widths a config is compiled for (bit b: b-bit weights); other widths
 * get no instance, so gqmm__cu_mma_config_ok refuses the config for them.
 * Only 2-bit stages are small enough (13 KB with x) for four CTAs of the
 * default shape an SM. */
constexpr unsigned kAllBits = 1u << 2 | 1u << 3 | 1u << 4 | 1u << 8, k2Bit = 1u << 2;

template <typename T, int BITS, int GS, bool LIN> launch_info pick_cfg(int v) {
  int i = 0;
#define GQMM__WG_CASE(m, s, b, nt, ah, wgs, bits)                                                 \
  if (v == i++) {                                                                                 \
    if constexpr (((bits) >> BITS) & 1u) return info<T, BITS, GS, m, s, b, nt, ah, LIN, wgs>();   \
    else return {nullptr, 0, 0};                                                                  \
  }
  GQMM_WG_CONFIGS(GQMM__WG_CASE)
#undef GQMM__WG_CASE
  return {nullptr, 0, 0};
}

template <typename T, int BITS, bool LIN> launch_info pick_gs(int gs, int v) {
  switch (gs) {
  case 32: return pick_cfg<T, BITS, 32, LIN>(v);
  case 64: return pick_cfg<T, BITS, 64, LIN>(v);
  case 128: return pick_cfg<T, BITS, 128, LIN>(v);
  default: return {nullptr, 0, 0};
  }
}

/* lin: the pack's scales are pre-scaled for linear dequantization (wfmt.cuh). */
template <typename T, int BITS> launch_info pick_lin(int gs, int lin, int v) {
  if constexpr (wfmt<BITS>::lin_ok) {
    if (lin) return pick_gs<T, BITS, true>(gs, v);
  }
  return lin ? launch_info{nullptr, 0, 0} : pick_gs<T, BITS, false>(gs, v);
}

template <typename T> launch_info pick_bits(const gqmm__cu_qmm *a, int v) {
  const int gs = a->group_size, lin = a->packed_lin;
  switch (a->bits) {
  case 2: return pick_lin<T, 2>(gs, lin, v);
  case 3: return pick_lin<T, 3>(gs, lin, v);
  case 4: return pick_lin<T, 4>(gs, lin, v);
  case 8: return pick_lin<T, 8>(gs, lin, v);
  default: return {nullptr, 0, 0};
  }
}

} // namespace

namespace gqmm_cu {
launch_info wg_launch_info(const gqmm__cu_qmm *a, int variant) {
  if (a->dtype == GQMM__CU_BF16) return pick_bits<__nv_bfloat16>(a, variant);
  if (a->dtype == GQMM__CU_F16) return pick_bits<__half>(a, variant);
  return {nullptr, 0, 0};
}
} // namespace gqmm_cu
