/*
 * cpu_isa.h - the contract between the CPU backend's generic loops
 * (cpu_loops.c) and its per-ISA micro-kernels (ukr_<isa>.c).
 *
 * BLIS-style: the loops own blocking, threading and the walk over experts;
 * an ISA is one row of data (gqmm__cpu_isa) holding a few kernels with one
 * signature each. Every ISA file instantiates the same template
 * (ukr_template.h) from a handful of vector primitives, so adding an ISA never
 * touches the loops and no kernel body is written twice.
 *
 * Activation layout. The loops convert an expert's rows of x to float32 once
 * ("x block", R rows of K values). Inside every 32-value chunk the values are
 * stored in the ISA's unpack order for the weight format (perm[j] = which k
 * of the chunk lane j holds), so kernels multiply unpacked weights by x with
 * plain vector loads. Groups are >= 32 values, so a chunk never straddles two.
 */
#ifndef GQMM_CPU_ISA_H
#define GQMM_CPU_ISA_H

#include "internal.h"

#include <string.h>

/* How far ahead the bf16 qmv kernel prefetches: it walks weight rows in
 * pairs, two interleaved streams that the hardware prefetchers follow badly
 * (one thread 10.5 GB/s from memory, 27 from cache); 12 KB ahead (9 rows at
 * K = 2816, 4-bit) took two threads to 50-52 GB/s at M = 1 (4 rows: 49-50,
 * 16 rows: 50-51; AVX-512 EPYC, perf-notes session 12). */
#define GQMM__CPU_QMV_PREFETCH 12288
/* Weight rows handled by one qmv call and the most rows of x it accepts. */
#define GQMM__CPU_QMV_MAX_ROWS 4
/* gemm phases: the first kc block starts from zero, the last stores dot products. */
#define GQMM__CPU_GEMM_FIRST 1
#define GQMM__CPU_GEMM_LAST 2
/* Groups in one kc block of the int8 panel kernel (its scale products live
 * on the stack). */
#define GQMM__CPU_I8_MAX_GROUPS 64
/* Weight rows of one bf16 panel micro-kernel call (gemm_bf16), and the most
 * values of a row in one K block of its panel, also the panel's row stride
 * (a constant, so the kernel addresses every row from one register). */
#define GQMM__CPU_BF16_NR 12
#define GQMM__CPU_BF16_KC 512
/* Register-blocking limits of the gemm micro-kernel (MR x NR accumulators). */
#define GQMM__CPU_MAX_MR 6
#define GQMM__CPU_MAX_NR 4

/* One packed weight row and its group parameters (in the problem's dtype:
 * kernels convert one scale and bias per group, which costs nothing next to
 * the group's multiply-adds and saves a conversion pass per work unit). */
typedef struct {
  const uint8_t *w; /* packed values of the row (bit stream) */
  const void *s;    /* [groups] scales */
  const void *b;    /* [groups] biases */
} gqmm__cpu_wrow;

/* Shape facts every kernel needs. */
typedef struct {
  int bits, group_size;
  gqmm_dtype dtype;  /* of scales and biases */
  int64_t K;         /* values per weight row (the reduction) */
  int64_t row_bytes; /* packed bytes per weight row */
  /* From a weight row to the one the bf16 qmv kernel prefetches: whole rows,
   * at least GQMM__CPU_QMV_PREFETCH bytes (cpu_loops.c). */
  int64_t pf_ahead;
} gqmm__cpu_shape;

/* A gqmm_pack copy for the CPU (cpu_pack.c has the layout): panels of
 * GQMM__CPU_PANEL weight rows, each K / group_size records of rec bytes. */
#define GQMM__CPU_PANEL 64
/* Rows of x in one packed call; its vectors of 16 weight rows by rows (1
 * and 5 rows take two panels, the rest one); and the vectors a kernel's
 * accumulators hold at once (a chunk; the chunks of a group run one after
 * the other, so the weights stream from memory at an even pace). Every tile
 * keeps >= 12 accumulator chains (vdpbf16ps: ~6 cycles of latency, 2 a
 * cycle) but 1 row (8) and 2 rows (8: 2 x 8 measured no faster, bound by
 * the unpacking), within the 32 vector registers: 5 rows in chunks of 3
 * (3 + 3 + 2), 6-8 rows in chunks of 2. int8 mode keeps 5 rows on one panel
 * in chunks of 2: its 3-chunks ran 45% slower (qmm M = 5); it takes 3-4 rows
 * in chunks of 2 too (all 4 vectors at once, 12-16 int32 sums, ran 25-35%
 * slower from L2). (7-8 rows in chunks of 1: 5-10% faster from L2, 5-10%
 * slower from memory.) */
#define GQMM__CPU_PK_MAX_ROWS 8
/* Records ahead that the packed kernels prefetch (2304 bytes each at 4-bit,
 * g64; 1-2 beat 4 and 8), across a panel's end into whatever follows: the
 * next panel of the pair, or the next unit's. gqmm__cpu_pack pads the copy
 * with this many records, so the farthest one stays inside it. (Stopping at
 * the panel's end left each call's first records cold: the seed's down,
 * K = 704 and 11 records a panel, ran 5.6% slower.) */
#define GQMM__CPU_PK_PREFETCH 2
#define GQMM__CPU_PK_VECTORS(mr, i8) ((mr) == 1 || ((mr) == 5 && !(i8)) ? 8 : 4)
#define GQMM__CPU_PK_CHUNK(mr, nv, i8) \
  ((i8) ? ((mr) <= 2 ? (nv) : 2) : ((mr) <= 4 ? (nv) : (mr) == 5 ? 3 : 2))
typedef struct {
  int bits, group_size;
  gqmm_dtype dtype;    /* of the scales and biases (f16 or bf16) */
  int64_t G;           /* groups (records) per panel */
  int64_t rec;         /* bytes of one record */
  int64_t panel_bytes; /* G * rec */
} gqmm__cpu_pkshape;

/* Panels that hold n rows (the last one padded). */
static inline int64_t gqmm__cpu_pk_panels(int64_t n) {
  return (n + GQMM__CPU_PANEL - 1) / GQMM__CPU_PANEL;
}

/* Bytes of one record: the panel's slots (gs * bits / 32 uint32 words a
 * row), then its 64 scales and 64 biases (2 bytes each). */
static inline int64_t gqmm__cpu_pk_rec(int bits, int group_size) {
  return (int64_t)group_size * bits * GQMM__CPU_PANEL / 8 + 4 * GQMM__CPU_PANEL;
}

typedef struct {
  const char *name; /* "avx512", "avx2", "portable" */
  bool (*supported)(void);
  /* Lane order of one 32-value chunk for `bits`: perm[j] = k offset of lane j. */
  void (*perm)(int bits, int perm[32]);
  /* dst[i] = (float)src[i], src of dtype t (F16C/bit tricks per ISA). */
  void (*to_float)(const void *src, gqmm_dtype t, int64_t n, float *dst);
  /* dst[i] = src[i] rounded to dtype t exactly as gqmm__store_f rounds. */
  void (*from_float)(const float *src, gqmm_dtype t, int64_t n, void *dst);
  /*
   * Small-M path (memory bound): for each of nrows weight rows n, and each of
   * R <= GQMM__CPU_QMV_MAX_ROWS activation rows r, x chunk-interleaved:
   * value l of chunk c of row r at x[(c * R + r) * 32 + l] (one pointer and
   * constant offsets per chunk for all R rows, the R rows' chunk adjacent):
   *   C[r * ldc + n] (+)= sum_g s_g * (sum_{k in g} x_rk q_nk) + b_g * xsum[r][g]
   * over the groups of [k0, k0 + kc) (both multiples of the group size;
   * k0 = 0 stores, later blocks add), the
   * per-group identity, so the inner loop multiplies x by exact small
   * integers and the scale and bias are applied once per group.
   */
  void (*qmv)(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rows, int nrows, const float *x,
              const float *xsum, int R, int64_t k0, int64_t kc, float *C, int64_t ldc);
  /* The same with the x block as bf16 (the float32 block's top halves, exact
   * for bf16 activations): AVX-512 BF16's vdpbf16ps, one instruction per 32
   * products and row. NULL where the ISA has none; used only when
   * qmv_bf16_supported() (the CPU may have AVX-512 without BF16). */
  void (*qmv_bf16)(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rows, int nrows,
                   const uint16_t *xb, const float *xsum, int R, int64_t k0, int64_t kc, float *C,
                   int64_t ldc);
  bool (*qmv_bf16_supported)(void);
  /* Dequantize values [k0, k0 + kc) of one row as s*q + b into dst (chunk order). */
  void (*dequant)(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *row, int64_t k0, int64_t kc,
                  float *dst);
  /* One micro-panel of nr weight rows against the first rows / mr * mr rows
   * of x, mr at a time (mr <= rows), one kc block: for m < rows / mr * mr,
   * n < nr, the vw-lane vector at Cv + (m * ldc + n) * vw accumulates
   * x[m * ldx + k] * P[n * ldp + k] over k < kc, lane (k mod vw), starting
   * from zero if phase has GQMM__CPU_GEMM_FIRST; with GQMM__CPU_GEMM_LAST
   * the sum of its lanes (the dot product) goes to C[m * ldc + n] instead. */
  void (*gemm)(int mr, int nr, int rows, int64_t kc, const float *x, int64_t ldx, const float *P,
               int64_t ldp, float *Cv, int64_t ldc, int phase, float *C);
  int vw; /* float lanes of the gemm accumulators */
  /*
   * Weight reuse for bf16 data on a bf16 dot (NULL where none; used where
   * qmv_bf16_supported()): lanes along the block's rows, 16 at a time.
   * dequant_bf16 writes values [k0, k0 + kc) of one row (kc whole groups,
   * at most GQMM__CPU_BF16_KC) as exact bf16 q values in the chunk order (32
   * a chunk), and the block's scales and biases as float (kc / gs each).
   * gemm_bf16 runs nr <= GQMM__CPU_BF16_NR such rows (P, stride
   * GQMM__CPU_BF16_KC; their s and b at stride GQMM__CPU_BF16_KC / 32)
   * against a slab of 16 rows of x given as xT, pairs of bf16 in chunk order
   * transposed ([kc / 2][16] 32-bit words), with the slab's group sums of x
   * xsT ([kc / gs][16]): the 16-lane vector at Cv + 16 n holds outputs
   * (slab row, n), accumulating sum_g s_g sum_{k in g} x q + b_g xsum_g,
   * from zero with GQMM__CPU_GEMM_FIRST; with GQMM__CPU_GEMM_LAST the first
   * `rows` lanes go to C[m * ldc + n] instead.
   */
  void (*dequant_bf16)(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *row, int64_t k0, int64_t kc,
                       uint16_t *dst, float *s, float *b);
  void (*gemm_bf16)(int nr, int64_t kc, int gs, const uint32_t *xT, const uint16_t *P,
                    const float *s, const float *b, const float *xsT, float *Cv, int phase,
                    float *C, int64_t ldc, int rows);
  /*
   * Opt-in int8 mode (NULL where the ISA has none): 4-bit weights only.
   * quant_i8 turns one row of float x (natural order, K values) into codes
   * in the ISA's chunk order (xq) and per-group scales (xs): symmetric,
   * xs = max|x| / 127, codes round(x / xs) in [-127, 127]. The kernels take
   * xq as [R][K], xs as [R][groups], the weight rows' scales as float
   * ([row][groups], stride lds or ldg), and C holding the b * sum(x) term
   * (bias_i8), to which they add sum_g float(sum_{k in g} x q) * (s * xs).
   * qmv_i8 (small M, any R): nrows weight rows, unpacked in registers.
   */
  void (*quant_i8)(const float *x, int64_t K, int gs, int8_t *xq, float *xs);
  void (*qmv_i8)(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *rows, int nrows, const float *sf,
                 int64_t lds, const int8_t *xq, const float *xs, int R, float *C, int64_t ldc);
  /*
   * int8 mode, more rows (weight reuse, the same bits as qmv_i8 per row):
   * pack_i8 unpacks values [k0, k0 + kc) of one row to bytes in the
   * codes' chunk order; bias_i8 gives nb <= 4 weight rows' sum_g b_g * xsum_g
   * ([nb][ldr]) for ldr rows (a multiple of 8) from xsum transposed
   * ([groups][ldr]) and the rows' biases as float (stride ldb); gemm_i8 runs one micro-panel of nr
   * <= nr_i8 unpacked rows (stride ldp) over the first rows / mr * mr rows of codes x (stride ldx),
   * mr <= mr_i8 at a time, kc values (whole groups of gs, at most GQMM__CPU_I8_MAX_GROUPS of them):
   * with ldg groups per row of the rows' scales xs and the weight rows' float scales s, the 8-lane
   * totals of output (m, n) at Cv + (m * ldc + n) * 8 accumulate
   * sum_g float(sum_{k in g} x q) * (s * xs), from zero with
   * GQMM__CPU_GEMM_FIRST; with GQMM__CPU_GEMM_LAST their lanes' sum is added
   * to C[m * ldc + n] (holding sum_g b_g * xsum_g) instead.
   */
  void (*pack_i8)(const gqmm__cpu_shape *sh, const gqmm__cpu_wrow *row, int64_t k0, int64_t kc,
                  uint8_t *dst);
  void (*bias_i8)(const float *b, int64_t ldb, int nb, const float *xsum_t, int64_t G, int64_t ldr,
                  float *dst);
  void (*gemm_i8)(int mr, int nr, int rows, int gs, int64_t kc, const int8_t *x, int64_t ldx,
                  const uint8_t *P, int64_t ldp, const float *xs, const float *s, int64_t ldg,
                  float *Cv, int64_t ldc, int phase, float *C);
  int mr_i8, nr_i8;
  /*
   * Packed weights (NULL where none): mr <= GQMM__CPU_PK_MAX_ROWS rows of x,
   * row m at x[m] (K values), its group sums at xsum + m * G, against nv x 16
   * weight rows of the panel at pk (vectors past the panel's 4 are the next
   * panel's), nv = GQMM__CPU_PK_VECTORS(mr, xs != NULL), or 4 where that is 8 and there
   * is no next panel; for n < 16 nv (rows in the lanes):
   *  - xs NULL: x is bf16 in natural order (only where qmv_bf16_supported()),
   *    C[m * ldc + n] = sum_g s_ng * (sum_{k in g} x_mk q_nk) + b_ng * xsum_mg;
   *  - int8 mode: x is int8 codes in the order pk_quant_i8 writes them,
   *    the tile's rows interleaved by quads: quad q of row m at x[0] +
   *    (q mr + m) 4 (x[1..] are not read), with per-group scales xs (row m
   *    at xs + m * G),
   *    C[m * ldc + n] = sum_g float(sum_{k in g} q x) * (s xs) + b xsum.
   * pk_quant_i8: one row of float x (K values) as those codes and scales,
   * by quant_i8's rule (xs = max|x| / 127, codes round(x / xs)), each slot's
   * values (32 / bits) in quads (2q, 2q + H, 2q + 1, 2q + 1 + H), H = 16 / bits,
   * the values a slot's byte q of each half-word holds (cpu_pack.c).
   */
  void (*packed)(const gqmm__cpu_pkshape *ps, const uint8_t *pk, int nv, const uint8_t *const *x,
                 int mr, const float *xs, const float *xsum, float *C, int64_t ldc);
  void (*pk_quant_i8)(const float *x, int64_t K, int gs, int bits, int8_t *xq, float *xs);
  /* Peak loop of the kernels' multiply-add instruction: MACs/s on one thread;
   * i8_what names the int8 mode's instruction (NULL: no int8 mode). */
  double (*peak_macs)(bool int8);
  const char *i8_what;
  /* Multiply-adds per second of one thread's bf16 dot (vdpbf16ps: 32 an
   * instruction), the exact mode's instruction for bf16 data where
   * qmv_bf16_supported(); NULL without one. */
  double (*peak_bf16)(void);
} gqmm__cpu_isa;

extern const gqmm__cpu_isa gqmm__cpu_isa_avx512;
extern const gqmm__cpu_isa gqmm__cpu_isa_avx2;
extern const gqmm__cpu_isa gqmm__cpu_isa_portable;

/* MACs/s of one thread running loop(iters) (macs_per_iter each) for ~50 ms
 * (cpu_ceilings.c); the ISA files' peak loops use it. */
double gqmm__cpu_time_peak(double (*loop)(long iters), double macs_per_iter);

/* Element i of a scale/bias row as float; f16 through `f16` (F16C on x86). */
static inline __attribute__((always_inline)) float
gqmm__cpu_param(const void *p, gqmm_dtype t, int64_t i, float (*f16)(uint16_t)) {
  if (t == GQMM_F32) return ((const float *)p)[i];
  const uint16_t h = ((const uint16_t *)p)[i];
  if (t == GQMM_BF16) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return f16(h);
}

/* Byte offset of value k (a multiple of 32) inside a packed row. */
static inline int64_t gqmm__cpu_chunk_offset(int bits, int64_t k) {
  return (int64_t)((uint64_t)k >> 3) * bits;
}

#endif /* GQMM_CPU_ISA_H */
