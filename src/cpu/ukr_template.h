/*
 * ukr_template.h - the CPU micro-kernels, written once over a few vector
 * primitives and instantiated by each ISA file (ukr_avx2.c, ukr_avx512.c,
 * ukr_portable.c), which defines before including this:
 *
 *   UKR_VW               float lanes per vector (8, 16)
 *   ukr_vf               the vector type
 *   UKR_OVERREAD         bytes unpack32 may read past its chunk (0 = exact)
 *   vf_zero, vf_load, vf_store, vf_set1, vf_fma(a, b, c) = a*b + c, vf_add,
 *   vf_hsum              horizontal sum to float
 *   ukr_f16_to_f32       scalar half -> float
 *   vf_param(p, t, i)    UKR_VW consecutive scale/bias values p[i..] of dtype
 *                        t (f32, f16, bf16) as floats
 *   vf_bcast_param(p, t, i)  p[i] of dtype t as float in every lane
 *   unpack32(src, bits, q[32 / UKR_VW])
 *                        the 32 q-values of one chunk (4*bits bytes at src) as
 *                        float vectors, in the ISA's lane order (perm)
 *
 * optionally (bf16 activations, AVX-512 BF16): UKR_HAVE_BF16DOT, the bf16
 * vector type ukr_vbf, ukr_q_to_bf16(q) (a chunk's exact small integers as
 * one bf16 vector, lane j = value j of the chunk's float vectors in order),
 * ukr_bf16_direct(bits) and ukr_unpack32_bf16(src, bits) (the same vector
 * straight from the packed chunk, for the widths where direct is true) and
 * ukr_bf16_dot(acc, qb, xb) (acc += pairwise products with the 32 bf16 at
 * xb), which add <isa>_qmv_bf16;
 *
 * and then UKR_DEFINE_KERNELS() emits static functions <isa>_qmv,
 * <isa>_dequant and <isa>_gemm with the signatures of gqmm__cpu_isa.
 * Every loop bound that shapes the register allocation (bits, rows, MR, NR)
 * is a compile-time constant in the always-inline bodies; the switch
 * dispatchers below instantiate each combination once.
 */
#ifndef GQMM_UKR_TEMPLATE_H
#define GQMM_UKR_TEMPLATE_H

#include "cpu_isa.h"

#include <string.h>

#define UKR_INLINE static inline __attribute__((always_inline))
#define UKR_PARAM(p, t, i) gqmm__cpu_param(p, t, i, ukr_f16_to_f32)
#define UKR_NV (32 / UKR_VW) /* vectors per 32-value chunk */

/* Unpack the chunk at byte `off` of a row. For 3/5/6 bits the vector unpack
 * loads whole 32-bit words and may read past the chunk; the last chunk of a
 * row may end the caller's buffer, so it is copied to a padded local first
 * (bits is a constant: the check vanishes for 2/4/8 bits). */
UKR_INLINE void ukr_chunk(const uint8_t *w, int64_t off, int bits, bool last, ukr_vf q[UKR_NV]) {
  if (UKR_OVERREAD && (bits == 3 || bits == 5 || bits == 6) && last) {
    uint8_t tmp[40] = {0};
    memcpy(tmp, w + off, (size_t)(4 * bits));
    unpack32(tmp, bits, q);
  } else {
    unpack32(w + off, bits, q);
  }
}

/* The end of a qmv row: sum_g b_g * sum(x)_g off the group loop (UKR_VW
 * groups per vector FMA instead of a scalar conversion, multiply and add per
 * (group, row) in it: the group loop is instruction bound; see
 * docs/perf-notes.md), plus the rows' dot products `sum`, into C (the first
 * K block stores, later ones add). */
UKR_INLINE void ukr_qmv_store(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rw,
                              const float *xsum, const int R, const int lg, int64_t k0, int64_t kc,
                              const ukr_vf *sum, float *C, int64_t ldc) {
  const int64_t G = sh->K >> lg, g0 = k0 >> lg, g1 = (k0 + kc) >> lg;
  ukr_vf bv[GQMM__CPU_QMV_MAX_ROWS];
  float bsum[GQMM__CPU_QMV_MAX_ROWS];
  for (int r = 0; r < R; r++)
    bv[r] = vf_zero();
  int64_t g = g0;
  for (; g + UKR_VW <= g1; g += UKR_VW) {
    const ukr_vf b = vf_param(rw->b, sh->dtype, g);
    for (int r = 0; r < R; r++)
      bv[r] = vf_fma(b, vf_load(xsum + r * G + g), bv[r]);
  }
  for (int r = 0; r < R; r++)
    bsum[r] = vf_hsum(bv[r]);
  for (; g < g1; g++) {
    const float b = UKR_PARAM(rw->b, sh->dtype, g);
    for (int r = 0; r < R; r++)
      bsum[r] += b * xsum[r * G + g];
  }
  for (int r = 0; r < R; r++)
    C[r * ldc] = (k0 ? C[r * ldc] : 0.0f) + (vf_hsum(sum[r]) + bsum[r]); /* first block: store */
}

/*
 * One weight row against R rows of x, the whole K, with the per-group
 * identity: acc holds sum x*q (q an exact small integer in float), the group
 * end folds s in with one FMA per accumulator into tot, and b*sum(x) into a
 * scalar. acc restarts every group, so out-of-order execution overlaps
 * consecutive groups' chains: 2 chains per row at R <= 2 (1 beyond) are
 * enough, and fewer chains mean fewer group-end FMAs (R = 1 with 2 chains
 * measured 2.5% faster than with 4; 4 chains per row at R = 2..4 slower).
 */
UKR_INLINE void ukr_qmv_row(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rw, const float *x,
                            const float *xsum, const int R, const int bits, int64_t k0, int64_t kc,
                            float *C, int64_t ldc) {
  enum { NA_MAX = UKR_NV };
  const int NA = UKR_NV >= 2 && R <= 2 ? 2 : 1;
  /* gs is 32, 64 or 128: shifts, not a 64-bit division per row (~40 cycles) */
  const int gs = sh->group_size, lg = __builtin_ctz((unsigned)gs);
  const int64_t K = sh->K, last_k = K - 32;
  ukr_vf tot[GQMM__CPU_QMV_MAX_ROWS][NA_MAX];
  for (int r = 0; r < R; r++)
    for (int a = 0; a < NA; a++)
      tot[r][a] = vf_zero();
  /* K-blocked (the loops block K at R >= 3): the row's next block comes a pass later */
  const bool ahead = R >= 3 && k0 + kc < K;
  for (int64_t g = k0 >> lg; g < (k0 + kc) >> lg; g++) {
    if (ahead) __builtin_prefetch(rw->w + gqmm__cpu_chunk_offset(bits, g * gs + kc), 0, 2);
    ukr_vf acc[GQMM__CPU_QMV_MAX_ROWS][NA_MAX];
    for (int r = 0; r < R; r++)
      for (int a = 0; a < NA; a++)
        acc[r][a] = vf_zero();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
      ukr_vf q[UKR_NV];
      ukr_chunk(rw->w, gqmm__cpu_chunk_offset(bits, k), bits, k == last_k, q);
      for (int v = 0; v < UKR_NV; v++)
        for (int r = 0; r < R; r++)
          acc[r][v % NA] = vf_fma(vf_load(x + k * R + r * 32 + v * UKR_VW), q[v], acc[r][v % NA]);
    }
    const ukr_vf s = vf_set1(UKR_PARAM(rw->s, sh->dtype, g));
    for (int r = 0; r < R; r++)
      for (int a = 0; a < NA; a++)
        tot[r][a] = vf_fma(acc[r][a], s, tot[r][a]);
  }
  ukr_vf sum[GQMM__CPU_QMV_MAX_ROWS];
  for (int r = 0; r < R; r++) {
    sum[r] = tot[r][0];
    for (int a = 1; a < NA; a++)
      sum[r] = vf_add(sum[r], tot[r][a]);
  }
  ukr_qmv_store(sh, rw, xsum, R, lg, k0, kc, sum, C, ldc);
}

#ifdef UKR_HAVE_BF16DOT
/* The chunk at byte `off` of a row as one bf16 vector of its exact q values
 * (ukr_chunk's lanes): straight from the bytes where the ISA can, else
 * through the float unpack. */
UKR_INLINE ukr_vbf ukr_chunk_bf16(const uint8_t *w, int64_t off, int bits, bool last) {
  if (ukr_bf16_direct(bits)) return ukr_unpack32_bf16(w + off, bits);
  ukr_vf q[UKR_NV];
  ukr_chunk(w, off, bits, last, q);
  return ukr_q_to_bf16(q);
}

/*
 * The bf16-dot form (bf16 x, scales and biases): W weight rows (1 or 2) at
 * once against R rows of x (bf16 pairs in chunk order), the group size GS a
 * constant. Each chunk is one bf16 vector of its exact q values and one dot
 * per (weight row, x row); a group's dot goes into its row's total with one
 * FMA by the group's scale, into two total chains in turn (one chain is an
 * FMA latency per group). Two weight rows share the x loads and the loop,
 * and double the independent chains: at R = 4, 24 of the 32 registers hold
 * totals and dots (M = 4: -12% time against one row at a time).
 */
UKR_INLINE void ukr_qmv_bf16_rows(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rw, const int W,
                                  const uint16_t *xb, const float *xsum, const int R,
                                  const int bits, const int GS, int64_t k0, int64_t kc, float *C,
                                  int64_t ldc) {
  const int lg = __builtin_ctz((unsigned)GS);
  const int64_t K = sh->K, last_k = K - 32;
  ukr_vf tot[2][GQMM__CPU_QMV_MAX_ROWS][2];
  for (int w = 0; w < W; w++)
    for (int r = 0; r < R; r++)
      tot[w][r][0] = tot[w][r][1] = vf_zero();
  const bool ahead = R >= 3 && k0 + kc < K; /* as in ukr_qmv_row */
  for (int64_t g = k0 >> lg; g < (k0 + kc) >> lg; g++) {
    for (int w = 0; w < W; w++) {
      const int64_t off = gqmm__cpu_chunk_offset(bits, g * GS);
      if (ahead) __builtin_prefetch(rw[w].w + gqmm__cpu_chunk_offset(bits, g * GS + kc), 0, 2);
      __builtin_prefetch(rw[w].w + sh->pf_ahead + off, 0, 0); /* a later row, same place */
    }
    ukr_vf acc[2][GQMM__CPU_QMV_MAX_ROWS];
    for (int w = 0; w < W; w++)
      for (int r = 0; r < R; r++)
        acc[w][r] = vf_zero();
    for (int c = 0; c < GS / 32; c++) {
      const int64_t k = g * GS + 32 * c;
      ukr_vbf qb[2];
      for (int w = 0; w < W; w++)
        qb[w] = ukr_chunk_bf16(rw[w].w, gqmm__cpu_chunk_offset(bits, k), bits, k == last_k);
      for (int r = 0; r < R; r++)
        for (int w = 0; w < W; w++)
          acc[w][r] = ukr_bf16_dot(acc[w][r], qb[w], xb + k * R + r * 32);
    }
    for (int w = 0; w < W; w++) {
      const ukr_vf s = vf_bcast_param(rw[w].s, GQMM_BF16, g);
      for (int r = 0; r < R; r++) { /* the chains swap places: no run-time index */
        const ukr_vf t = vf_fma(acc[w][r], s, tot[w][r][0]);
        tot[w][r][0] = tot[w][r][1], tot[w][r][1] = t;
      }
    }
  }
  for (int w = 0; w < W; w++) {
    ukr_vf sum[GQMM__CPU_QMV_MAX_ROWS];
    for (int r = 0; r < R; r++)
      sum[r] = vf_add(tot[w][r][0], tot[w][r][1]);
    ukr_qmv_store(sh, &rw[w], xsum, R, lg, k0, kc, sum, C + w, ldc);
  }
}
#endif

/* Dequantize [k0, k0+kc) of one row to float: w = s*q + b (one rounding).
 * Group-major with the group size a constant, so a whole group's chunks run
 * unrolled with no group test or parameter conversion between them; a block
 * may start or end inside a group (transpose=0 units), which takes the
 * chunk loop. The panel walks many rows kc values at a time, a stride the
 * hardware prefetchers miss, so each group asks for the same row's next
 * block. */
UKR_INLINE void ukr_dequant_chunk(const uint8_t *w, int64_t k, const int bits, int64_t last_k,
                                  ukr_vf s, ukr_vf b, float *dst) {
  ukr_vf q[UKR_NV];
  ukr_chunk(w, gqmm__cpu_chunk_offset(bits, k), bits, k == last_k, q);
  for (int v = 0; v < UKR_NV; v++)
    vf_store(dst + v * UKR_VW, vf_fma(q[v], s, b));
}

UKR_INLINE void ukr_dequant_row(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rw, int64_t k0,
                                int64_t kc, const int bits, const gqmm_dtype dt, const int gs,
                                float *dst) {
  const int64_t k1 = k0 + kc, last_k = sh->K - 32;
  const uint8_t *w = rw->w; /* locals: the stores to dst may alias *rw for all the compiler knows */
  const void *sp = rw->s, *bp = rw->b;
  for (int64_t k = k0; k < k1;) {
    const int64_t g = (int64_t)((uint64_t)k / gs), /* a shift: gs is a constant power of 2 */
        gend = (g + 1) * gs < k1 ? (g + 1) * gs : k1;
    const ukr_vf s = vf_bcast_param(sp, dt, g), b = vf_bcast_param(bp, dt, g);
    if (k + kc < sh->K) __builtin_prefetch(w + gqmm__cpu_chunk_offset(bits, k + kc), 0, 3);
    if (gend - k == gs) { /* a whole group */
      for (int c = 0; c < gs; c += 32)
        ukr_dequant_chunk(w, k + c, bits, last_k, s, b, dst + (k - k0) + c);
      k += gs;
    } else {
      for (; k < gend; k += 32)
        ukr_dequant_chunk(w, k, bits, last_k, s, b, dst + (k - k0));
    }
  }
}

/* MR x NR register tile over kc (a multiple of 32); lanes run along k, so
 * each accumulator is one (row, weight row) dot product. Between kc blocks
 * the accumulators live on as whole vectors in Cv; the first block starts
 * them at zero, the last one sums each one's lanes in registers and stores
 * the dot product to C (so Cv is never cleared and never summed in memory). */
UKR_INLINE void ukr_gemm_tile(const int mr, const int nr, int64_t kc, const float *x, int64_t ldx,
                              const float *P, int64_t ldp, float *Cv, int64_t ldc, int phase,
                              float *C) {
  ukr_vf acc[GQMM__CPU_MAX_MR][GQMM__CPU_MAX_NR];
  for (int m = 0; m < mr; m++)
    for (int n = 0; n < nr; n++)
      acc[m][n] = phase & GQMM__CPU_GEMM_FIRST ? vf_zero() : vf_load(Cv + (m * ldc + n) * UKR_VW);
  for (int64_t k = 0; k < kc; k += UKR_VW) {
    ukr_vf p[GQMM__CPU_MAX_NR];
    for (int n = 0; n < nr; n++)
      p[n] = vf_load(P + n * ldp + k);
    for (int m = 0; m < mr; m++) {
      const ukr_vf xv = vf_load(x + m * ldx + k);
      for (int n = 0; n < nr; n++)
        acc[m][n] = vf_fma(xv, p[n], acc[m][n]);
    }
  }
  for (int m = 0; m < mr; m++)
    for (int n = 0; n < nr; n++) {
      if (phase & GQMM__CPU_GEMM_LAST)
        C[m * ldc + n] = vf_hsum(acc[m][n]);
      else
        vf_store(Cv + (m * ldc + n) * UKR_VW, acc[m][n]);
    }
}

/* The tiles of one micro-panel, walking down the rows: the nr panel rows
 * (nr * kc floats) stay in L1 while x streams through in row order. */
UKR_INLINE void ukr_gemm_rows(const int mr, const int nr, int rows, int64_t kc, const float *x,
                              int64_t ldx, const float *P, int64_t ldp, float *Cv, int64_t ldc,
                              int phase, float *C) {
  for (int m = 0; m + mr <= rows; m += mr)
    ukr_gemm_tile(mr, nr, kc, x + m * ldx, ldx, P, ldp, Cv + m * ldc * UKR_VW, ldc, phase,
                  C + m * ldc);
}

/* ---- dispatchers: one instantiation per constant combination ------------ */

#define UKR_FOR_BITS(X) X(2) X(3) X(4) X(5) X(6) X(8)
#define UKR_FOR_R(X, b) X(b, 1) X(b, 2) X(b, 3) X(b, 4)
#define UKR_FOR_NR(X, m) X(m, 1) X(m, 2) X(m, 3) X(m, 4)
#define UKR_FOR_MR(X) \
  UKR_FOR_NR(X, 1)    \
  UKR_FOR_NR(X, 2) UKR_FOR_NR(X, 3) UKR_FOR_NR(X, 4) UKR_FOR_NR(X, 5) UKR_FOR_NR(X, 6)

#define UKR_QMV_CASE(b, r)                                          \
  case (b)*8 + (r):                                                 \
    for (int n = 0; n < nrows; n++)                                 \
      ukr_qmv_row(sh, &rows[n], x, xsum, r, b, k0, kc, C + n, ldc); \
    break;
#define UKR_QMV_BITS(b) UKR_FOR_R(UKR_QMV_CASE, b)
/* bf16: weight rows in pairs, the group size a constant */
#define UKR_QMV_BF16_GS(b, r, gs)                                                \
  case gs: {                                                                     \
    int n = 0;                                                                   \
    for (; n + 2 <= nrows; n += 2)                                               \
      ukr_qmv_bf16_rows(sh, &rows[n], 2, x, xsum, r, b, gs, k0, kc, C + n, ldc); \
    for (; n < nrows; n++)                                                       \
      ukr_qmv_bf16_rows(sh, &rows[n], 1, x, xsum, r, b, gs, k0, kc, C + n, ldc); \
  } break;
#define UKR_QMV_BF16_CASE(b, r)                                             \
  case (b)*8 + (r):                                                         \
    switch (sh->group_size) {                                               \
      UKR_QMV_BF16_GS(b, r, 32)                                             \
      UKR_QMV_BF16_GS(b, r, 64) UKR_QMV_BF16_GS(b, r, 128) default : break; \
    }                                                                       \
    break;
#define UKR_QMV_BF16_BITS(b) UKR_FOR_R(UKR_QMV_BF16_CASE, b)
/* the parameter dtype and the group size constants too (3 x 3 per width) */
#define UKR_DEQ_CALL(b, dt, gs)                       \
  case ((b)*4 + (dt)) * 4 + (gs) / 32 - 1:            \
    ukr_dequant_row(sh, row, k0, kc, b, dt, gs, dst); \
    break;
#define UKR_DEQ_DT(b, dt) UKR_DEQ_CALL(b, dt, 32) UKR_DEQ_CALL(b, dt, 64) UKR_DEQ_CALL(b, dt, 128)
#define UKR_DEQ_CASE(b) UKR_DEQ_DT(b, GQMM_F32) UKR_DEQ_DT(b, GQMM_F16) UKR_DEQ_DT(b, GQMM_BF16)
#define UKR_GEMM_CASE(m, n)                                           \
  case (m)*8 + (n):                                                   \
    ukr_gemm_rows(m, n, rows, kc, x, ldx, P, ldp, Cv, ldc, phase, C); \
    break;

/* The qmv entry points: x as float32, and (only where the ISA defines
 * UKR_HAVE_BF16DOT) as bf16 with bf16 scales and biases. */
#define UKR_QMV_FN(fn, xtype, CASES)                                                               \
  static void fn(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rows, int nrows, const xtype *x, \
                 const float *xsum, int R, int64_t k0, int64_t kc, float *C, int64_t ldc) {        \
    switch (sh->bits * 8 + R) { UKR_FOR_BITS(CASES) default : break; }                             \
  }
#ifdef UKR_HAVE_BF16DOT
#define UKR_QMV_BF16_FN(isa) UKR_QMV_FN(isa##_qmv_bf16, uint16_t, UKR_QMV_BF16_BITS)
#else
#define UKR_QMV_BF16_FN(isa)
#endif

#define UKR_DEFINE_KERNELS(isa)                                                               \
  UKR_QMV_FN(isa##_qmv, float, UKR_QMV_BITS)                                                  \
  UKR_QMV_BF16_FN(isa)                                                                        \
  static void isa##_dequant(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *row, int64_t k0, \
                            int64_t kc, float *dst) {                                         \
    switch ((sh->bits * 4 + (int)sh->dtype) * 4 + sh->group_size / 32 - 1) {                  \
      UKR_FOR_BITS(UKR_DEQ_CASE)                                                              \
    default:                                                                                  \
      break;                                                                                  \
    }                                                                                         \
  }                                                                                           \
  static void isa##_gemm(int mr, int nr, int rows, int64_t kc, const float *x, int64_t ldx,   \
                         const float *P, int64_t ldp, float *Cv, int64_t ldc, int phase,      \
                         float *C) {                                                          \
    switch (mr * 8 + nr) { UKR_FOR_MR(UKR_GEMM_CASE) default : break; }                       \
  }

#endif /* GQMM_UKR_TEMPLATE_H */
