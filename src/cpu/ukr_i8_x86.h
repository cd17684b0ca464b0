/*
 * ukr_i8_x86.h - the int8 mode's kernels (4-bit weights, int8 activations),
 * shared by the x86 ISA files. The including file defines:
 *
 *   ukr_i8_dot(acc, w, x)  acc (8 x int32) += 4-byte dot products of u8 w and
 *                          s8 x: the step the int8 ceiling measures
 *   ukr_i8_acc             a group's running sum of u8 x s8 products
 *   ukr_i8_zero(), ukr_i8_step(acc, w, x), ukr_i8_finish(acc) -> 8 x int32
 *                          the sum over a group's chunks: AVX2 adds
 *                          vpmaddubsw's int16 pair sums and widens them once
 *                          per group with vpmaddwd (exact: a group of <= 128
 *                          values sums <= 4 x 2*15*127 = 15240 < 2^15 per
 *                          lane); VNNI's vpdpbusd accumulates int32 directly
 *   UKR_I8_ROWS            the most activation rows one qmv pass keeps in
 *                          registers; UKR_I8_MR, UKR_I8_NR the panel tile
 *   UKR_I8_PEAK_CHAINS     independent chains the peak loop needs to cover
 *                          the step's latency chain (through acc only)
 *
 * Lane l of a group's int32 sum holds the products of bytes 4l..4l+3 of each
 * of its chunks in both ISAs and both kernels (the per-lane integers do not
 * depend on how they were summed), and both kernels fold a group into a row's
 * float32 total with the same operations in the same order: the qmv kernel
 * and the panel tile give the same bits for a row, whichever runs it.
 */
#ifndef GQMM_UKR_I8_X86_H
#define GQMM_UKR_I8_X86_H

/* The scale products of n consecutive groups, sc[i] = s[i] * xs[i] (weight
 * and activation scale), each rounded once: 8 per vmulps, the tail one at a
 * time (the same products). Computed ahead of the group loop, so a group's
 * fold is a broadcast load instead of two broadcasts and a multiply. */
static inline __attribute__((always_inline)) void ukr_i8_scales(const float *s, const float *xs,
                                                                int64_t n, float *sc) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(sc + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), _mm256_loadu_ps(xs + i)));
  for (; i < n; i++)
    sc[i] = s[i] * xs[i];
}

/* One group folded into a row's 8-lane float total: tot += float(acc) * sc. */
static inline __attribute__((always_inline)) __m256 ukr_i8_fold(__m256 tot, ukr_i8_acc acc,
                                                                const float *sc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(ukr_i8_finish(acc)), _mm256_broadcast_ss(sc), tot);
}

/* ---- activations ------------------------------------------------------------ */

/* One row of x (float32, natural order) to int8 codes in the kernels' chunk
 * order (ukr_unpack32_u8_4bit's: the even values of a chunk, then the odd
 * ones), per group: amax = max |t|, xs = amax / 127, codes = t * (127 / amax)
 * rounded to nearest even (lrintf's rounding: vcvtps2dq under the default
 * MXCSR), all zero for a zero group. NaNs are skipped by the max, as by a
 * scalar `m > amax` (the row's outputs are NaN through sum(x) anyway). */
static void ukr_quant_i8(const float *t, int64_t K, int gs, int8_t *dst, float *xs) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  /* after the packs a 128-bit lane holds 4-value runs 0,2,4,6 (low) and
   * 1,3,5,7 (high): vpermd restores the natural order, vpshufb splits each
   * lane into its even and odd bytes, vpermq puts the evens first */
  const __m256i runs = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2,
                                         4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t g = 0; g < K / gs; g++) {
    const float *tg = t + g * gs;
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < gs; i += 8) /* max(x, m) keeps m where x is NaN */
      m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(tg + i)), m);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    xs[g] = amax / 127.0f;
    for (int c = 0; c < gs; c += 32) {
      __m256i v[4];
      for (int i = 0; i < 4; i++)
        v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(tg + c + 8 * i), inv));
      __m256i b =
          _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      b = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(b, runs), split);
      _mm256_storeu_si256((__m256i *)(dst + g * gs + c), _mm256_permute4x64_epi64(b, 0xd8));
    }
  }
}

/* ---- small M: weight chunks unpacked in registers -------------------------- */

/* Groups per block of the qmv kernel's scale products (stack: rows x 64). */
#define UKR_I8_QMV_GROUPS 64

/* One weight row (float scales sf) against rb (<= UKR_I8_ROWS) rows of
 * codes, group size gs, both compile-time constants: each 32-value chunk is
 * unpacked once to bytes and applied to every row, so the group sums stay in
 * registers; a group's exact sums are folded with s * (activation scale).
 * C holds the row's b * sum(x) (bias_i8) and gets the dot product added. */
static inline __attribute__((always_inline)) void
ukr_qmv_i8_rows(const gqmm__cpu_shape *sh, const uint8_t *w, const float *sf, const int8_t *xq,
                const float *xs, const int rb, const int gs, float *C, int64_t ldc) {
  const int64_t K = sh->K, G = K / gs;
  __m256 tot[UKR_I8_ROWS];
  float sc[UKR_I8_ROWS][UKR_I8_QMV_GROUPS];
  for (int r = 0; r < rb; r++)
    tot[r] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += UKR_I8_QMV_GROUPS) {
    const int64_t ng = G - g0 < UKR_I8_QMV_GROUPS ? G - g0 : UKR_I8_QMV_GROUPS;
    for (int r = 0; r < rb; r++)
      ukr_i8_scales(sf + g0, xs + r * G + g0, ng, sc[r]);
    for (int64_t g = g0; g < g0 + ng; g++) {
      ukr_i8_acc acc[UKR_I8_ROWS];
      for (int r = 0; r < rb; r++)
        acc[r] = ukr_i8_zero();
      for (int c = 0; c < gs; c += 32) { /* a constant count: unrolled */
        const int64_t k = g * gs + c;
        const __m256i wv = ukr_unpack32_u8_4bit(w + k / 2);
        for (int r = 0; r < rb; r++)
          acc[r] = ukr_i8_step(acc[r], wv, _mm256_loadu_si256((const __m256i *)(xq + r * K + k)));
      }
      for (int r = 0; r < rb; r++)
        tot[r] = ukr_i8_fold(tot[r], acc[r], &sc[r][g - g0]);
    }
  }
  for (int r = 0; r < rb; r++)
    C[r * ldc] = ukr_hsum256(tot[r]) + C[r * ldc];
}

/* One instantiation per row count and group size (constants: the sums stay
 * in registers, a group's chunks unroll). */
#define UKR_I8_QMV_GS(nr, g)                                                         \
  case (nr)*4 + (g) / 32:                                                            \
    if ((nr) <= UKR_I8_ROWS) ukr_qmv_i8_rows(sh, rows[n].w, s, q, x, nr, g, c, ldc); \
    break;
#define UKR_I8_QMV(nr) UKR_I8_QMV_GS(nr, 32) UKR_I8_QMV_GS(nr, 64) UKR_I8_QMV_GS(nr, 128)
#define UKR_I8_FOR_ROWS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)

static void ukr_qmv_i8(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rows, int nrows,
                       const float *sf, int64_t lds, const int8_t *xq, const float *xs, int R,
                       float *C, int64_t ldc) {
  const int gs = sh->group_size;
  const int64_t K = sh->K, G = K / gs;
  for (int n = 0; n < nrows; n++) {
    for (int r0 = 0; r0 < R; r0 += UKR_I8_ROWS) {
      const int rb = R - r0 < UKR_I8_ROWS ? R - r0 : UKR_I8_ROWS;
      const int8_t *q = xq + r0 * K;
      const float *s = sf + n * lds, *x = xs + r0 * G;
      float *c = C + r0 * ldc + n;
      switch (rb * 4 + gs / 32) { UKR_I8_FOR_ROWS(UKR_I8_QMV) default : break; }
    }
  }
}

/* ---- larger M: unpacked panels, register tiles ------------------------------ */

/* b * sum(x) of nb weight rows (biases b + i * ldb) for ldr rows (a
 * multiple of 8): dst[i * ldr + r] = sum_g b_i[g] * xsum_t[g * ldr + r],
 * 8 rows per vector, each lane a product and a sum per group in group
 * order, as ukr_qmv_i8_rows's scalar bsum. nb (<= 4) independent sums per
 * vector of rows: one chain would wait on vaddps's latency every group. */
static inline __attribute__((always_inline)) void ukr_bias_i8_rows(const float *b, int64_t ldb,
                                                                   const int nb,
                                                                   const float *xsum_t, int64_t G,
                                                                   int64_t ldr, float *dst) {
  for (int64_t r = 0; r < ldr; r += 8) {
    __m256 acc[4];
    for (int i = 0; i < nb; i++)
      acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
      const __m256 xv = _mm256_loadu_ps(xsum_t + g * ldr + r);
      for (int i = 0; i < nb; i++)
        acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_broadcast_ss(b + i * ldb + g), xv));
    }
    for (int i = 0; i < nb; i++)
      _mm256_storeu_ps(dst + i * ldr + r, acc[i]);
  }
}

static void ukr_bias_i8(const float *b, int64_t ldb, int nb, const float *xsum_t, int64_t G,
                        int64_t ldr, float *dst) {
  switch (nb) {
  case 1:
    ukr_bias_i8_rows(b, ldb, 1, xsum_t, G, ldr, dst);
    break;
  case 2:
    ukr_bias_i8_rows(b, ldb, 2, xsum_t, G, ldr, dst);
    break;
  case 3:
    ukr_bias_i8_rows(b, ldb, 3, xsum_t, G, ldr, dst);
    break;
  default:
    ukr_bias_i8_rows(b, ldb, 4, xsum_t, G, ldr, dst);
    break;
  }
}

/* Unpacks values [k0, k0 + kc) of one weight row to bytes (the qmv kernel's
 * register layout, 32 per chunk) and asks for the row's next block, which
 * the loops unpack a whole unit of rows later. */
static void ukr_pack_i8(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *row, int64_t k0,
                        int64_t kc, uint8_t *dst) {
  const uint8_t *w = row->w;
  for (int64_t k = k0; k < k0 + kc; k += 32)
    _mm256_storeu_si256((__m256i *)(dst + (k - k0)), ukr_unpack32_u8_4bit(w + k / 2));
  if (k0 + kc < sh->K)
    for (int64_t off = 0; off < kc / 2; off += 64)
      __builtin_prefetch(w + (k0 + kc) / 2 + off, 0, 3);
}

/* An mr x nr tile over kc values (whole groups of gs, at most
 * GQMM__CPU_I8_MAX_GROUPS): x rows of codes (stride ldx) against unpacked
 * weight rows (stride ldp), group sums in registers, folded per group into
 * mr x nr float totals with the products of the rows' activation scales xs
 * and the weight rows' scales s (float, [row][group], stride ldg). The
 * totals live in Cv between kc blocks; the first block starts them at zero,
 * the last adds their lanes' sum to C (which holds the b * sum(x) term), as
 * ukr_qmv_i8_rows ends a row. */
static inline __attribute__((always_inline)) void
ukr_gemm_i8_tile(const int mr, const int nr, const int gs, int64_t kc, const int8_t *x, int64_t ldx,
                 const uint8_t *P, int64_t ldp, const float *xs, const float *s, int64_t ldg,
                 float *Cv, int64_t ldc, int phase, float *C) {
  __m256 tot[UKR_I8_MR][UKR_I8_NR];
  for (int m = 0; m < mr; m++)
    for (int n = 0; n < nr; n++)
      tot[m][n] = phase & GQMM__CPU_GEMM_FIRST ? _mm256_setzero_ps()
                                               : _mm256_loadu_ps(Cv + (m * ldc + n) * 8);
  const int64_t groups = kc / gs;
  /* the tile's scale products, 8 groups per vector (a loop per (m, n) pair
   * cost as much as the products: ~10% of the kernel) */
  float sc[UKR_I8_MR][UKR_I8_NR][GQMM__CPU_I8_MAX_GROUPS];
  int64_t g8 = 0;
  for (; g8 + 8 <= groups; g8 += 8) {
    __m256 sv[UKR_I8_NR];
    for (int n = 0; n < nr; n++)
      sv[n] = _mm256_loadu_ps(s + n * ldg + g8);
    for (int m = 0; m < mr; m++) {
      const __m256 xv = _mm256_loadu_ps(xs + m * ldg + g8);
      for (int n = 0; n < nr; n++)
        _mm256_storeu_ps(&sc[m][n][g8], _mm256_mul_ps(sv[n], xv));
    }
  }
  for (; g8 < groups; g8++)
    for (int m = 0; m < mr; m++)
      for (int n = 0; n < nr; n++)
        sc[m][n][g8] = s[n * ldg + g8] * xs[m * ldg + g8];
  for (int64_t g = 0; g < groups; g++) {
    ukr_i8_acc acc[UKR_I8_MR][UKR_I8_NR];
    for (int m = 0; m < mr; m++)
      for (int n = 0; n < nr; n++)
        acc[m][n] = ukr_i8_zero();
    for (int c = 0; c < gs; c += 32) { /* a constant count: unrolled */
      const int64_t k = g * gs + c;
      __m256i w[UKR_I8_NR];
      for (int n = 0; n < nr; n++)
        w[n] = _mm256_loadu_si256((const __m256i *)(P + n * ldp + k));
      for (int m = 0; m < mr; m++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + m * ldx + k));
        for (int n = 0; n < nr; n++)
          acc[m][n] = ukr_i8_step(acc[m][n], w[n], xv);
      }
    }
    for (int m = 0; m < mr; m++)
      for (int n = 0; n < nr; n++)
        tot[m][n] = ukr_i8_fold(tot[m][n], acc[m][n], &sc[m][n][g]);
  }
  for (int m = 0; m < mr; m++)
    for (int n = 0; n < nr; n++) {
      if (phase & GQMM__CPU_GEMM_LAST)
        C[m * ldc + n] = ukr_hsum256(tot[m][n]) + C[m * ldc + n];
      else
        _mm256_storeu_ps(Cv + (m * ldc + n) * 8, tot[m][n]);
    }
}

/* One micro-panel of nr weight rows over the first rows / mr * mr rows of x,
 * mr at a time: the panel's nr x kc bytes stay in L1 while x streams. */
static inline __attribute__((always_inline)) void
ukr_gemm_i8_rows(const int mr, const int nr, int rows, const int gs, int64_t kc, const int8_t *x,
                 int64_t ldx, const uint8_t *P, int64_t ldp, const float *xs, const float *s,
                 int64_t ldg, float *Cv, int64_t ldc, int phase, float *C) {
  for (int m = 0; m + mr <= rows; m += mr)
    ukr_gemm_i8_tile(mr, nr, gs, kc, x + m * ldx, ldx, P, ldp, xs + m * ldg, s, ldg,
                     Cv + m * ldc * 8, ldc, phase, C + m * ldc);
}

/* Tiles up to the ISA's MR x NR and the three group sizes, one
 * instantiation each. */
#define UKR_I8_TILE_GS(m, n, g) \
  if (gs == (g)) ukr_gemm_i8_rows(m, n, rows, g, kc, x, ldx, P, ldp, xs, s, ldg, Cv, ldc, phase, C);
#define UKR_I8_TILE(m, n)                                                         \
  case (m)*8 + (n):                                                               \
    if ((m) <= UKR_I8_MR && (n) <= UKR_I8_NR) {                                   \
      UKR_I8_TILE_GS(m, n, 32) UKR_I8_TILE_GS(m, n, 64) UKR_I8_TILE_GS(m, n, 128) \
    }                                                                             \
    break;
#define UKR_I8_TILE_N(X, m) X(m, 1) X(m, 2) X(m, 3) X(m, 4)
#define UKR_I8_FOR_TILES(X) \
  UKR_I8_TILE_N(X, 1) UKR_I8_TILE_N(X, 2) UKR_I8_TILE_N(X, 3) UKR_I8_TILE_N(X, 4)

static void ukr_gemm_i8(int mr, int nr, int rows, int gs, int64_t kc, const int8_t *x, int64_t ldx,
                        const uint8_t *P, int64_t ldp, const float *xs, const float *s, int64_t ldg,
                        float *Cv, int64_t ldc, int phase, float *C) {
  switch (mr * 8 + nr) { UKR_I8_FOR_TILES(UKR_I8_TILE) default : break; }
}

/* The int8 entries of an x86 ISA's row (gqmm__cpu_isa). */
#define UKR_I8_ISA_FIELDS                                                                         \
  .qmv_i8 = ukr_qmv_i8, .quant_i8 = ukr_quant_i8, .pack_i8 = ukr_pack_i8, .bias_i8 = ukr_bias_i8, \
  .gemm_i8 = ukr_gemm_i8, .mr_i8 = UKR_I8_MR, .nr_i8 = UKR_I8_NR

/* ---- the ceiling ------------------------------------------------------------ */

/* The int8 mode's step (32 multiply-adds) in UKR_I8_PEAK_CHAINS independent
 * chains, each with its own activation operand, the weight operand opaque to
 * the compiler every iteration: with one shared pair the compiler computed AVX2's
 * vpmaddubsw + vpmaddwd once for all chains, so the loop timed one product
 * per 8 additions and overstated the peak 1.5-2x (docs/perf-notes.md,
 * session 4). */
static double ukr_peak_i8(long iters) {
  __m256i acc[UKR_I8_PEAK_CHAINS], x[UKR_I8_PEAK_CHAINS], w = _mm256_set1_epi8(3);
  for (int i = 0; i < UKR_I8_PEAK_CHAINS; i++) {
    acc[i] = _mm256_setzero_si256();
    x[i] = _mm256_set1_epi8((char)(i + 1));
  }
  for (long it = 0; it < iters; it++) {
    for (int i = 0; i < UKR_I8_PEAK_CHAINS; i++)
      acc[i] = ukr_i8_dot(acc[i], w, x[i]);
    __asm__ volatile("" : "+x"(w));
  }
  int sink = 0;
  for (int i = 0; i < UKR_I8_PEAK_CHAINS; i++)
    sink += _mm256_extract_epi32(acc[i], 0);
  return (double)sink;
}

#endif /* GQMM_UKR_I8_X86_H */
