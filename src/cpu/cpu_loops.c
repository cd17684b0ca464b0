/*
 * cpu_loops.c - the CPU backend's generic loops: everything but the
 * arithmetic. From the front end's (x_index, w_index) list it builds expert
 * blocks (all rows that use one expert, gathered; unsorted indices are
 * counting-sorted first, stably, so the blocks and thus the results equal
 * the sorted path's), cuts each block into units of `nt` weight rows, and
 * lets the pool's threads take units in expert-major order from an atomic
 * counter, so a skewed routing (one expert with most rows) is spread over
 * every core. Per unit a thread:
 *   1. converts the block's x rows to float32 in the ISA's chunk order, once
 *      per block on that thread (plus per-group sums, or int8 codes);
 *   2. points at the unit's weight rows, scales and biases (the kernels
 *      convert the parameters as they read them);
 *   3. runs the small-M qmv kernel (rows <= 4: weights unpacked in registers
 *      straight into every row; 6-8 rows: two such passes, see qmv_first),
 *      or, for more rows, dequantizes kc-blocks of the unit's weights once
 *      into a panel and runs the MR x NR gemm micro-kernel over all rows
 *      (mc rows of x at a time, each nr-row micro-panel over those rows):
 *      weights are read from memory once per call whatever the rows (twice
 *      for the 6-8 row split, the second pass from L2);
 *   4. rounds the float32 results into the rows' own output places (the
 *      scatter back to the caller's order).
 * No reduction is split across threads, so results do not depend on the
 * thread count or on which thread ran a unit.
 */
#include "cpu_backend.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Most rows in one x block; larger experts become several blocks (each
 * reads the expert's weights again, but such a call is compute bound). */
#define ROWS_MAX_BYTES ((int64_t)4 << 20)
#define ROWS_MAX_COUNT 512
/* Bytes of x the small-M path keeps in L1 per K block (half of Zen 3's
 * L1), and the most it runs unblocked (see qmv_kblock). */
#define QMV_KBLOCK_BYTES (16 << 10)
#define QMV_WHOLE_K_BYTES (24 << 10)
/* Weight rows per unit when every block takes the small-M path. Such a unit
 * streams its rows once, a stretch of memory the hardware prefetchers must
 * ramp up on at every unit start: 256 rows (360 KB of 4-bit rows at K =
 * 2816) instead of the panel path's nt = 32 took qmm M = 1 from 23-24 to
 * 31-32 GB/s on the 2-core AVX-512 EPYC (docs/perf-notes.md, session 12;
 * 128 rows: 29-31, 512: 31-32). At least SMALL_UNITS_PER_THREAD units per
 * thread are kept, so the shared counter still balances the cores. */
#define SMALL_UNIT_ROWS 256
#define SMALL_UNITS_PER_THREAD 4
/* Weight rows per unit of packed weights: four panels (cpu_pack.c), two of
 * the pairs the kernel takes at once for 1 row. Where units come to the
 * threads from one counter (next_unit: blocks of fewer than 4 rows on
 * average), a thread's next unit is not the next in memory: each
 * unit starts its stream cold (the kernel's prefetch across a panel's end
 * reaches the other thread's unit). Four panels instead of two halve those
 * starts: gather 2-4 rows per expert and qmm M = 8 4-5% faster, int8
 * gather 4-8 rows 3-12% (perf-notes, session 16). */
#define PK_UNIT_ROWS (4 * GQMM__CPU_PANEL)
/* The most threads that take their units from runs of their own
 * (next_unit); with more, they all take them from the shared counter. */
#define RANGE_SLOTS 64
/* int8 tile heights of blocks of more than 8 rows (pk_tiles). */
#define PK_I8_SPLIT_ROWS 6

/* A thread's range of units [lo, hi) in one word (hi << 32 | lo): the
 * owner takes from the front, the others from the back, each by one
 * compare-and-swap, so no unit is taken twice. On its own cache line. */
typedef struct {
  _Alignas(64) atomic_ullong lohi;
} unit_range;

typedef struct {
  const gqmm__qmm_args *a;
  const gqmm__cpu_isa *isa;
  const gqmm__cpu_config *cfg;
  gqmm__cpu_state *st;
  bool int8;
  bool xbf;   /* bf16 activations on an ISA with a bf16 dot kernel: x block also as bf16 */
  bool bf16_panel; /* xbf, and weight reuse through gemm_bf16 (x also transposed) */
  int64_t nt; /* weight rows (transpose=1) or columns (transpose=0) per unit */
  gqmm__cpu_shape sh;
  int64_t G;                             /* groups per weight row */
  int64_t nw;                            /* weight rows per expert (N, or K when transpose=0) */
  int64_t *x_off;                        /* [rows] element offset of each gathered x row */
  int64_t *out_off;                      /* [rows] element offset of its output row */
  int64_t *blk_first, *blk_rows, *blk_e; /* [nblocks] */
  int64_t nblocks, tiles, rows_max;
  bool small_only;  /* every block takes the small-M path (no panel scratch) */
  int perm[32];     /* chunk order of the x block */
  int col_perm[32]; /* transpose=0: column order of a dequantized chunk */
  const struct gqmm_packed *pk; /* a CPU gqmm_pack copy (cpu_pack.c), or NULL */
  gqmm__cpu_pkshape ps;
  bool pk_bf16; /* pk with bf16 x on an ISA with a bf16 packed kernel (else the portable one) */
  bool pk_i8;   /* pk in int8 mode (the ISA's packed kernel on int8 codes) */
  /* pk_bf16 / pk_i8: every row's group sums (and int8 codes and scales),
   * made once for all threads by a first pass over the blocks (prep_x) */
  float *pk_xsum, *pk_xs; /* [rows][G] */
  int8_t *pk_xq;          /* [rows][K] */
  atomic_llong next_blk;
  atomic_llong next;
  /* Packed units with weight reuse (4+ rows a block on average) come from
   * per-thread ranges (next_unit), else from the shared counter `next`. */
  bool ranges;
  unit_range range[RANGE_SLOTS];
} job;

/* ---- building blocks -------------------------------------------------- */

static int build_blocks(gqmm_ctx *ctx, job *j) {
  const gqmm__qmm_args *a = j->a;
  const int64_t B = a->batch, M = a->M, rows = B * M;
  int64_t *order = malloc((size_t)B * sizeof(int64_t));
  j->x_off = malloc((size_t)rows * sizeof(int64_t));
  j->out_off = malloc((size_t)rows * sizeof(int64_t));
  /* at most one block per batch entry plus one per rows_max split */
  const int64_t max_blocks = B + rows / j->rows_max + 1;
  j->blk_first = malloc((size_t)max_blocks * 3 * sizeof(int64_t));
  int64_t *count = NULL;
  if (!a->w_sorted) count = calloc((size_t)a->w_batches + 1, sizeof(int64_t));
  if (!order || !j->x_off || !j->out_off || !j->blk_first || (!a->w_sorted && !count)) {
    free(order);
    free(count);
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "cpu backend: cannot allocate the row plan (%lld rows)",
                      (long long)rows);
  }
  j->blk_rows = j->blk_first + max_blocks;
  j->blk_e = j->blk_rows + max_blocks;
  if (a->w_sorted) {
    for (int64_t b = 0; b < B; b++)
      order[b] = b;
  } else { /* stable counting sort of the batch entries by expert */
    for (int64_t b = 0; b < B; b++)
      count[a->w_index[b] + 1]++;
    for (int64_t e = 0; e < a->w_batches; e++)
      count[e + 1] += count[e];
    for (int64_t b = 0; b < B; b++)
      order[count[a->w_index[b]]++] = b;
    free(count);
  }
  int64_t r = 0, nb = 0;
  for (int64_t i = 0; i < B; i++) {
    const int64_t b = order[i], e = a->w_index[b];
    for (int64_t m = 0; m < M; m++, r++) {
      j->x_off[r] = (a->x_index[b] * M + m) * a->K;
      j->out_off[r] = (b * M + m) * a->N;
      if (nb > 0 && j->blk_e[nb - 1] == e && j->blk_rows[nb - 1] < j->rows_max) {
        j->blk_rows[nb - 1]++;
      } else {
        j->blk_first[nb] = r;
        j->blk_rows[nb] = 1;
        j->blk_e[nb] = e;
        nb++;
      }
    }
  }
  j->nblocks = nb;
  free(order);
  return GQMM_OK;
}

/* ---- per-thread scratch -------------------------------------------------- */

typedef struct {
  float *xf, *xsum, *xs, *tmp, *panel, *C;
  float *Cv; /* gemm accumulators: R x nt vectors of vw lanes */
  int8_t *xq;
  float *xsum_t;  /* int8 panel path: xsum transposed, [groups][rows8(R)] */
  float *sf, *bf; /* int8 panel path: the unit's scales and biases as float, [nt][groups] */
  uint16_t *xb;   /* the x block as bf16 (xbf) */
  uint32_t *xT;   /* bf16_panel: slabs of 16 rows, pairs transposed ([slab][K / 2][16]) */
  float *xsT;     /* bf16_panel: their group sums ([slab][groups][16]) */
  float *sb;      /* bf16_panel: the panel rows' scales, then biases, as float */
  gqmm__cpu_wrow *wrows;
} scratch_view;

/* Rows rounded up to whole 8-lane vectors (xsum_t's stride). */
static int64_t rows8(int64_t R) {
  return (R + 7) & ~(int64_t)7;
}

static size_t carve(size_t *off, size_t bytes) {
  size_t at = *off;
  *off += (bytes + 63) & ~(size_t)63;
  return at;
}

/* Lays the scratch out; returns the bytes needed, pointers into base if set. */
static size_t layout(const job *j, char *base, scratch_view *v) {
  const int64_t R = j->rows_max, K = j->a->K, nt = j->nt;
  size_t off = 0;
  const size_t o_xf = carve(&off, (size_t)(R * K) * 4),
               o_xsum = carve(&off, (size_t)(R * (K / 32 + 1)) * 4);
  const size_t o_xs = carve(&off, (size_t)(R * (K / 32 + 1)) * 4),
               o_tmp = carve(&off, (size_t)K * 4);
  const bool panel = !j->small_only;
  /* floats of a panel row: kc of them, or a bf16 panel's fixed row stride */
  int64_t pk = j->a->transpose ? j->cfg->kc : 1;
  if (j->bf16_panel && pk < GQMM__CPU_BF16_KC / 2) pk = GQMM__CPU_BF16_KC / 2;
  const size_t o_panel = carve(&off, panel ? (size_t)(nt * pk) * 4 : 0);
  const size_t o_C = carve(&off, (size_t)(R * nt) * 4);
  const size_t o_Cv = carve(&off, panel && j->a->transpose ? (size_t)(R * nt * j->isa->vw) * 4 : 0);
  const size_t o_xq = carve(&off, j->int8 ? (size_t)(R * K) : 0);
  const size_t o_xt = carve(&off, j->int8 ? (size_t)(rows8(R) * (K / 32 + 1)) * 4 : 0);
  const size_t o_sf = carve(&off, j->int8 ? (size_t)(2 * nt * (K / 32 + 1)) * 4 : 0);
  const size_t o_xb = carve(&off, j->xbf ? (size_t)(R * K) * 2 : 0);
  const int64_t R16 = (R + 15) / 16 * 16, bp = j->bf16_panel && panel;
  const size_t o_xT = carve(&off, bp ? (size_t)(R16 * K) * 2 : 0);
  const size_t o_xsT = carve(&off, bp ? (size_t)(R16 * (K / 32 + 1)) * 4 : 0);
  const size_t o_sb = carve(&off, bp ? (size_t)(2 * nt * (GQMM__CPU_BF16_KC / 32)) * 4 : 0);
  const size_t o_wr = carve(&off, (size_t)nt * sizeof(gqmm__cpu_wrow));
  if (base) {
    v->xf = (float *)(base + o_xf);
    v->xsum = (float *)(base + o_xsum);
    v->xs = (float *)(base + o_xs);
    v->tmp = (float *)(base + o_tmp);
    v->panel = (float *)(base + o_panel);
    v->C = (float *)(base + o_C);
    v->Cv = (float *)(base + o_Cv);
    v->xq = (int8_t *)(base + o_xq);
    v->xsum_t = (float *)(base + o_xt);
    v->sf = (float *)(base + o_sf);
    v->bf = v->sf + nt * (K / 32 + 1);
    v->xb = (uint16_t *)(base + o_xb);
    v->xT = (uint32_t *)(base + o_xT);
    v->xsT = (float *)(base + o_xsT);
    v->sb = (float *)(base + o_sb);
    v->wrows = (gqmm__cpu_wrow *)(base + o_wr);
  }
  return off;
}

static int reserve_scratch(gqmm_ctx *ctx, job *j) {
  const size_t need = layout(j, NULL, NULL);
  for (int t = 0; t < j->st->threads; t++) {
    gqmm__cpu_scratch *s = &j->st->scratch[t];
    s->cached_block = -1;
    if (gqmm__reserve(&s->buf, &s->cap, need))
      return gqmm__fail(ctx, GQMM_ERR_NOMEM, "cpu backend: cannot allocate %zu bytes of scratch",
                        need);
  }
  return GQMM_OK;
}

/* ---- the work of one unit ------------------------------------------------ */

static const char *elem(const void *base, int64_t i, size_t esz) {
  return (const char *)base + (size_t)i * esz;
}

/* How a block of R rows runs the small-M qmv kernel: the rows of its first
 * sub-block (R up to qmv_rows: all of them; up to twice that: two halves,
 * ceil(R/2) and the rest, one pass each, which measured faster than the
 * panel gemm at 8 rows: docs/perf-notes.md), or 0 for the gemm path.
 * A row's summation order in the kernel depends on its pass's row count
 * only through the accumulator chains (2 at <= 2 rows, 1 beyond) and the K
 * blocks (qmv_kblock): both halves must agree on them, or a row's bits would
 * depend on its place in the block (sorted vs unsorted indices), so 5 rows
 * (3 + 2) stay on the gemm path. The qmv kernel's per-group identity
 * s*sum(x*q) + b*sum(x) cancels two large terms, costing ~3x float32's
 * rounding error; f32 callers asked for float32 accuracy, so they take the
 * dequantize-then-FMA path at every M. */
static int64_t qmv_first(const job *j, int64_t R) {
  const int64_t q = j->cfg->qmv_rows, R1 = (R + 1) / 2;
  if (!j->a->transpose || j->int8 || j->pk || j->a->dtype == GQMM_F32 || R > 2 * q) return 0;
  if (R <= q) return R;
  return (R1 <= 2) == (R - R1 <= 2) ? R1 : 0;
}

/* How a block of R rows runs: rows [0, P) on a panel, rows [P, R) in qmv
 * passes of at most S rows. A qmv block (qmv_first) has P = 0. On the bf16
 * panel a slab costs its 16 lanes whatever it holds, about four qmv passes
 * of the unit's cached weights: blocks of up to 3 passes' rows (12) take
 * qmv passes only (gather at 8 rows/expert 31.2-32.7 -> 26.7-27.0 ms; 4
 * passes lost at 16 rows), and the last R % 16 rows past whole slabs take
 * qmv passes when they would fill at most half a slab (17-24 rows: one slab
 * and one or two passes, not two slabs; tails of 9-12 as three passes
 * measured no better). AVX-512 EPYC, perf-notes session 12. */
typedef struct {
  int64_t P, S;
} row_split;
static row_split split_rows(const job *j, int64_t R) {
  const int64_t R1 = qmv_first(j, R), T = R % 16, q = j->cfg->qmv_rows;
  if (R1) return (row_split){0, R1};
  if (!j->bf16_panel) return (row_split){R, 0};
  if (R <= 3 * q) return (row_split){0, q};
  if (T == 0 || T > 2 * q) return (row_split){R, 0};
  return (row_split){R - T, T <= q ? T : (T + 1) / 2};
}

/* Whether a block of R rows runs without a panel (qmv, or int8's qmv_i8):
 * split_rows decides, so a job whose every block is small takes the long
 * units of SMALL_UNIT_ROWS. */
static bool small_path(const job *j, int64_t R) {
  return j->int8 ? R <= j->cfg->i8_rows : split_rows(j, R).P == 0;
}

/* K block of a qmv pass whose largest sub-block has R1 rows: keeps the rows'
 * slice of x in L1 (4 x 2816 floats is 45 KB, more than Zen 3's 32 KB). At
 * R1 <= 2 blocking measured slower, and so did it for a slice of up to
 * QMV_WHOLE_K_BYTES: 4 rows of 2816 bf16 (22.5 KB) ran the seed's M = 4 at
 * 21 GB/s whole and 13 blocked (AVX-512 EPYC, 48 KB L1; perf-notes session
 * 12). Both halves of a split block use it. */
static int64_t qmv_kblock(const job *j, int64_t R1) {
  const int gs = j->a->q.group_size;
  const int64_t K = j->a->K, xb = j->xbf ? 2 : 4; /* bytes of an x value in the block */
  if (R1 <= 2 || R1 * K * xb <= QMV_WHOLE_K_BYTES) return K;
  return QMV_KBLOCK_BYTES / xb / R1 / gs * gs;
}

/* A group's sum of x in one fixed order (every path reads these bits): 8
 * interleaved partial sums, added pairwise at the end, a loop the compiler
 * keeps in vector registers (4 groups' scalar chains went through the stack
 * and took ~10% of the seed's gate_up on AVX-512). */
static float group_sum(const float *t, int gs) {
  float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int i = 0; i < gs; i += 8)
    for (int l = 0; l < 8; l++)
      s[l] += t[i + l];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* Step 1: the block's x rows, float32 in chunk order, group sums, or int8
 * codes, their scales and the group sums transposed in int8 mode.
 * The qmv kernel reads each sub-block's rows chunk-interleaved (cpu_isa.h),
 * the gemm and transpose=0 paths row after row. */
static void prepare_x(const job *j, const scratch_view *v, int64_t blk) {
  const gqmm__qmm_args *a = j->a;
  const size_t esz = gqmm_dtype_size(a->dtype);
  const int64_t K = a->K, G = j->G, R = j->blk_rows[blk], first = j->blk_first[blk];
  const int gs = j->sh.group_size;
  const row_split sp = split_rows(j, R);
  const int64_t R8 = rows8(R), P = sp.P;
  /* the bf16 panel reads its rows only as xT: pairs of the row's bf16
   * values in chunk order, slab r / 16, lane r % 16 (zero past P) */
  const bool panel_bf = j->bf16_panel && P > 0;
  for (int64_t r = 0; panel_bf && r < (P + 15) / 16 * 16; r++) {
    uint32_t *xt = v->xT + (r / 16) * (K / 2) * 16 + r % 16;
    const uint16_t *xr = r < P ? (const uint16_t *)elem(a->x, j->x_off[first + r], esz) : NULL;
    for (int64_t c = 0; c < K; c += 32)
      for (int i = 0; i < 16; i++)
        xt[(c / 2 + i) * 16] =
            xr ? xr[c + j->perm[2 * i]] | (uint32_t)xr[c + j->perm[2 * i + 1]] << 16 : 0;
  }
  for (int64_t r = 0; r < R; r++) {
    j->isa->to_float(elem(a->x, j->x_off[first + r], esz), a->dtype, K, v->tmp);
    /* a qmv row's sub-block [r0, r0 + Rh) (chunk-interleaved), else row-major */
    const bool qmv_row = r >= P;
    const int64_t r0 = qmv_row ? P + (r - P) / sp.S * sp.S : r;
    const int64_t Rh = qmv_row ? (R - r0 < sp.S ? R - r0 : sp.S) : 1;
    /* (the packed bf16 kernel reads x in place: only the group sums here) */
    for (int64_t c = 0; !j->int8 && !j->pk_bf16 && !(panel_bf && !qmv_row) && c < K; c += 32) {
      float *dst = v->xf + (qmv_row ? r0 * K + c * Rh + (r - r0) * 32 : r * K + c);
      for (int l = 0; l < 32; l++)
        dst[l] = v->tmp[c + j->perm[l]];
    }
    if (!a->transpose) continue;
    for (int64_t g = 0; g < G; g++) {
      const float sum = group_sum(v->tmp + g * gs, gs);
      v->xsum[r * G + g] = sum;
      if (j->int8) v->xsum_t[g * R8 + r] = sum;
    }
    if (j->int8 && !j->pk) /* (packed int8 codes: prep_x) */
      j->isa->quant_i8(v->tmp, K, gs, v->xq + r * K, v->xs + r * G);
  }
  for (int64_t g = 0; j->int8 && g < G; g++) /* padding lanes of the bias pass */
    for (int64_t r = R; r < R8; r++)
      v->xsum_t[g * R8 + r] = 0.0f;
  if (j->xbf) /* bf16 inputs (qmv rows): the top half of each float is the value, exactly */
    for (int64_t i = (panel_bf ? P : 0) * K; i < R * K; i++) {
      uint32_t u;
      memcpy(&u, &v->xf[i], 4);
      v->xb[i] = (uint16_t)(u >> 16);
    }
  for (int64_t r = 0; panel_bf && r < (P + 15) / 16 * 16; r++) /* the slabs' group sums */
    for (int64_t g = 0; g < G; g++)
      v->xsT[((r / 16) * G + g) * 16 + r % 16] = r < P ? v->xsum[r * G + g] : 0.0f;
}

/* The int8 panel path's kc: the exact path's blocking in bytes (kc floats
 * of a row are 4 kc codes, so an x slice of mc rows and the panel of nt rows
 * take the bytes they take there), measured faster than kc codes (fewer
 * tiles, each with its scale products and totals to set up); at most
 * GQMM__CPU_I8_MAX_GROUPS groups. */
static int64_t i8_kc(const job *j) {
  const int64_t kc = 4 * j->cfg->kc, cap = GQMM__CPU_I8_MAX_GROUPS * (int64_t)j->sh.group_size;
  return kc < cap ? kc : cap;
}

/* int8 mode, rows [m0, m0 + rows) of a block against one micro-panel: tiles
 * of mr rows, and a short tail (1 row after tiles of 3) merged with the last
 * tile into two tiles of about equal height (2 + 2, not 3 + 1: a 1-row tile
 * loads a weight vector per multiply). */
static void panel_i8_rows(const job *j, const scratch_view *v, int64_t m0, int64_t rows, int n,
                          int nb, const uint8_t *P, int64_t k0, int64_t kc, int phase) {
  const int64_t K = j->a->K, G = j->G, nt = j->nt, g0 = k0 / j->sh.group_size;
  const int mr = j->isa->mr_i8;
  int64_t body = rows / mr * mr, t1 = 0, t2 = rows - body;
  if (t2 && t2 < mr - 1 && body >= mr) {
    body -= mr;
    t1 = (mr + t2) / 2;
    t2 = mr + t2 - t1;
  }
  const int64_t part[3][2] = {{mr, body}, {t1, t1}, {t2, t2}}; /* {tile rows, rows} */
  for (int p = 0; p < 3; m0 += part[p++][1])
    if (part[p][1])
      j->isa->gemm_i8((int)part[p][0], nb, (int)part[p][1], j->sh.group_size, kc,
                      v->xq + m0 * K + k0, K, P, kc, v->xs + m0 * G + g0, v->sf + n * G + g0, G,
                      v->Cv + (m0 * nt + n) * 8, nt, phase, v->C + m0 * nt + n);
}

/* int8 mode (transpose=1, 4-bit): the unit's scales and biases as float,
 * the b * sum(x) term into C (bias_i8: per weight row in group order, rows
 * along the vector lanes: the order of a scalar sum), then the dot products
 * added by qmv_i8 (blocks of at most i8_rows rows: weights unpacked in
 * registers, applied to every row) or BLIS-style weight reuse: per kc block
 * the unit's rows are unpacked to bytes once (pack_i8, nt x kc bytes: 48 KB
 * at t24 and 2048 codes, the exact path's panel bytes), then each micro-panel of nr rows runs over
 * an mc-row slice of the codes (gemm_i8). Both add a row's groups in the same order with the same
 * operations, so a row's bits do not depend on the path. */
static void unit_i8(const job *j, const scratch_view *v, int64_t R, int nn) {
  const gqmm__qmm_args *a = j->a;
  const gqmm__cpu_isa *isa = j->isa;
  const int nr = isa->nr_i8;
  const int64_t K = a->K, G = j->G, nt = j->nt, R8 = rows8(R);
  const int64_t kcfg = i8_kc(j);
  /* the unit's rows are consecutive rows of one expert: their scales (and
   * biases) are one run of nn * G values, one conversion each */
  isa->to_float(v->wrows[0].s, a->dtype, nn * G, v->sf);
  isa->to_float(v->wrows[0].b, a->dtype, nn * G, v->bf);
  float bsum[4 * (ROWS_MAX_COUNT + 8)];
  for (int i = 0; i < nn; i += 4) {
    const int nb = nn - i < 4 ? nn - i : 4;
    isa->bias_i8(v->bf + i * G, G, nb, v->xsum_t, G, R8, bsum);
    for (int b = 0; b < nb; b++)
      for (int64_t r = 0; r < R; r++)
        v->C[r * nt + i + b] = bsum[b * R8 + r];
  }
  if (R <= j->cfg->i8_rows) {
    isa->qmv_i8(&j->sh, v->wrows, nn, v->sf, G, v->xq, v->xs, (int)R, v->C, nt);
    return;
  }
  uint8_t *panel = (uint8_t *)v->panel;
  const int64_t mc = (j->cfg->mc + isa->mr_i8 - 1) / isa->mr_i8 * isa->mr_i8; /* whole tiles */
  for (int64_t k0 = 0; k0 < K; k0 += kcfg) {
    const int64_t kc = K - k0 < kcfg ? K - k0 : kcfg;
    const int phase =
        (k0 == 0 ? GQMM__CPU_GEMM_FIRST : 0) | (k0 + kc == K ? GQMM__CPU_GEMM_LAST : 0);
    for (int i = 0; i < nn; i++)
      isa->pack_i8(&j->sh, &v->wrows[i], k0, kc, panel + i * kc);
    for (int64_t m0 = 0; m0 < R; m0 += mc)
      for (int n = 0; n < nn; n += nr)
        panel_i8_rows(j, v, m0, R - m0 < mc ? R - m0 : mc, n, nn - n < nr ? nn - n : nr,
                      panel + n * kc, k0, kc, phase);
  }
}

/* Weight reuse for bf16 data (isa->gemm_bf16): per kc block, the unit's rows
 * as exact bf16 q values, then each slab of 16 block rows against micro-
 * panels of GQMM__CPU_BF16_NR rows (the slab's x block stays in L1 across
 * them). */
static void unit_bf16(const job *j, const scratch_view *v, int64_t R, int nn) {
  const gqmm__cpu_isa *isa = j->isa;
  const int64_t K = j->a->K, G = j->G, nt = j->nt, gs = j->sh.group_size;
  enum { kb = GQMM__CPU_BF16_KC, ld = GQMM__CPU_BF16_KC, ldg = GQMM__CPU_BF16_KC / 32 };
  uint16_t *panel = (uint16_t *)v->panel;
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t kc = K - k0 < kb ? K - k0 : kb;
    const int phase =
        (k0 == 0 ? GQMM__CPU_GEMM_FIRST : 0) | (k0 + kc == K ? GQMM__CPU_GEMM_LAST : 0);
    float *s = v->sb, *b = v->sb + nt * ldg;
    for (int i = 0; i < nn; i++)
      isa->dequant_bf16(&j->sh, &v->wrows[i], k0, kc, panel + i * ld, s + i * ldg, b + i * ldg);
    for (int64_t sl = 0; sl * 16 < R; sl++) {
      const int rows = R - 16 * sl < 16 ? (int)(R - 16 * sl) : 16;
      const uint32_t *xT = v->xT + (sl * (K / 2) + k0 / 2) * 16;
      const float *xsT = v->xsT + (sl * G + k0 / gs) * 16;
      for (int n = 0; n < nn; n += GQMM__CPU_BF16_NR) {
        const int nb = nn - n < GQMM__CPU_BF16_NR ? nn - n : GQMM__CPU_BF16_NR;
        isa->gemm_bf16(nb, kc, (int)gs, xT, panel + n * ld, s + n * ldg, b + n * ldg, xsT,
                       v->Cv + (sl * nt + n) * 16, phase, v->C + 16 * sl * nt + n, nt, rows);
      }
    }
  }
}

/* The FMA panel (float32 weights, lanes along k) over the block's R rows. */
static void unit_fma_panel(const job *j, const scratch_view *v, int64_t R, int nn) {
  const int64_t K = j->a->K, nt = j->nt;
  const int mr = j->cfg->mr, nr = j->cfg->nr, vw = j->isa->vw;
  for (int64_t k0 = 0; k0 < K; k0 += j->cfg->kc) {
    const int64_t kc = K - k0 < j->cfg->kc ? K - k0 : j->cfg->kc;
    const int phase =
        (k0 == 0 ? GQMM__CPU_GEMM_FIRST : 0) | (k0 + kc == K ? GQMM__CPU_GEMM_LAST : 0);
    for (int i = 0; i < nn; i++)
      j->isa->dequant(&j->sh, &v->wrows[i], k0, kc, v->panel + i * kc);
    /* row blocks of mc (x's kc slice stays in L1), micro-panels, then the
     * block's rows mr at a time: nr panel rows stay in L1 for all of them */
    const int64_t mc = j->cfg->mc;
    for (int64_t m0 = 0; m0 < R; m0 += mc) {
      const int64_t rb = R - m0 < mc ? R - m0 : mc, full = rb / mr * mr;
      const float *xb = v->xf + m0 * K + k0;
      float *Cb = v->Cv + m0 * nt * vw, *Co = v->C + m0 * nt;
      for (int n = 0; n < nn; n += nr) {
        const int nb = nn - n < nr ? nn - n : nr;
        const float *P = v->panel + n * kc;
        if (full) j->isa->gemm(mr, nb, (int)full, kc, xb, K, P, kc, Cb + n * vw, nt, phase, Co + n);
        if (rb > full)
          j->isa->gemm((int)(rb - full), nb, (int)(rb - full), kc, xb + full * K, K, P, kc,
                       Cb + (full * nt + n) * vw, nt, phase, Co + full * nt + n);
      }
    }
  }
}

/* The packed kernels' tiles of a block of R rows (unit_packed, and prep_x,
 * which lays int8 codes out by tile): pk_tiles of them, of near-equal
 * heights, at most GQMM__CPU_PK_MAX_ROWS each; tile t, starting at row r0
 * (the heights of the tiles before it summed), has pk_tile_height rows.
 *
 * int8 blocks of more than GQMM__CPU_PK_MAX_ROWS rows take tiles of at most
 * PK_I8_SPLIT_ROWS: from L2 the int8 kernel runs 5-6 row tiles at 312-356
 * GMAC/s a core and 7-8 row ones at 229-282 (gqmm_cpu_pk_probe --int8), and
 * such a block needs several tiles anyway. int8 qmm M = 16-128 ran 5-12%
 * faster, gathers of 32-128 rows per expert 6-9% (perf-notes, session 17).
 * Blocks of up to 8 rows stay one tile: split in two, the second tile
 * re-reads the weights from L2 after the first streamed them, which cost
 * qmm M = 8 4-6%. bf16's 8-row tile is among its fastest: bf16 keeps 8. */
static int64_t pk_tiles(const job *j, int64_t R) {
  const int64_t most =
      j->pk_i8 && R > GQMM__CPU_PK_MAX_ROWS ? PK_I8_SPLIT_ROWS : GQMM__CPU_PK_MAX_ROWS;
  return (R + most - 1) / most;
}
static int pk_tile_height(int64_t R, int64_t tiles, int64_t t, int64_t r0) {
  return (int)((R - r0) / (tiles - t));
}

/* Packed weights (cpu_pack.c), rows [n0, n0 + nn) of expert e (n0 a whole
 * number of panels): panels in pairs against the block's rows in tiles of
 * at most GQMM__CPU_PK_MAX_ROWS, of near-equal heights (13 rows: 7 + 6, not
 * 8 + 5: the unpacking is per tile), each covering the pair in calls of its
 * width (GQMM__CPU_PK_VECTORS), so a pair is read from memory by the first
 * tile and from L2 by the rest. bf16 x is read in place (natural order);
 * other dtypes and ISAs without the kernel take the portable one on the
 * float rows. */
static void unit_packed(const job *j, const scratch_view *v, int64_t blk, int64_t n0, int nn) {
  const gqmm__qmm_args *a = j->a;
  const size_t esz = gqmm_dtype_size(a->dtype);
  const int64_t e = j->blk_e[blk], R = j->blk_rows[blk], first = j->blk_first[blk];
  const int64_t K = a->K, G = j->G, nt = j->nt, pb = j->ps.panel_bytes;
  const int64_t panels = gqmm__cpu_pk_panels(a->N), np = gqmm__cpu_pk_panels(nn);
  const uint8_t *base = (const uint8_t *)j->pk->data + (e * panels + n0 / GQMM__CPU_PANEL) * pb;
  const int64_t tiles = pk_tiles(j, R);
  for (int64_t p = 0; p < np; p += 2) {
    const int pair = np - p < 2 ? 1 : 2;
    for (int64_t t = 0, r0 = 0; t < tiles; t++) {
      const int mr = pk_tile_height(R, tiles, t, r0);
      const int nw = GQMM__CPU_PK_VECTORS(mr, j->pk_i8), nv = nw < 4 * pair ? nw : 4 * pair;
      float *Ct = v->C + r0 * nt + p * GQMM__CPU_PANEL;
      if (!j->pk_bf16 && !j->pk_i8) {
        const float *xr[GQMM__CPU_PK_MAX_ROWS];
        for (int m = 0; m < mr; m++)
          xr[m] = v->xf + (r0 + m) * K;
        gqmm__cpu_packed_portable(&j->ps, base + p * pb, pair, xr, mr, Ct, nt);
      } else { /* the tile's int8 codes (interleaved, prep_x), or the caller's bf16 rows */
        const uint8_t *xr[GQMM__CPU_PK_MAX_ROWS];
        for (int m = 0; m < mr; m++)
          xr[m] = j->pk_i8 ? (const uint8_t *)j->pk_xq + (first + r0) * K
                           : (const uint8_t *)elem(a->x, j->x_off[first + r0 + m], esz);
        for (int v0 = 0; v0 < 4 * pair; v0 += nv)
          j->isa->packed(&j->ps, base + (p + v0 / 4) * pb, nv, xr, mr,
                         j->pk_i8 ? j->pk_xs + (first + r0) * G : NULL,
                         j->pk_xsum + (first + r0) * G, Ct + 16 * v0, nt);
      }
      r0 += mr;
    }
  }
}

/* transpose=1 unit: weight rows [n0, n0+nn) of expert e against the block. */
static void unit_transposed(const job *j, const scratch_view *v, int64_t blk, int64_t n0, int nn) {
  if (j->pk) {
    unit_packed(j, v, blk, n0, nn);
    return;
  }
  const gqmm__qmm_args *a = j->a;
  const size_t esz = gqmm_dtype_size(a->dtype);
  const int64_t e = j->blk_e[blk], R = j->blk_rows[blk], K = a->K, G = j->G, nt = j->nt;
  for (int i = 0; i < nn; i++) {
    const int64_t wr = e * j->nw + n0 + i;
    v->wrows[i] = (gqmm__cpu_wrow){(const uint8_t *)a->w + wr * j->sh.row_bytes,
                                   elem(a->scales, wr * G, esz), elem(a->biases, wr * G, esz)};
  }
  if (j->int8) {
    unit_i8(j, v, R, nn);
    return;
  }
  const row_split sp = split_rows(j, R);
  if (sp.P && j->bf16_panel)
    unit_bf16(j, v, sp.P, nn);
  else if (sp.P)
    unit_fma_panel(j, v, R, nn);
  for (int64_t r0 = sp.P; r0 < R; r0 += sp.S) {
    const int64_t Rh = R - r0 < sp.S ? R - r0 : sp.S, kb = qmv_kblock(j, sp.S);
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
      const int64_t kc = K - k0 < kb ? K - k0 : kb;
      if (j->xbf)
        j->isa->qmv_bf16(&j->sh, v->wrows, nn, v->xb + r0 * K, v->xsum + r0 * G, (int)Rh, k0, kc,
                         v->C + r0 * nt, nt);
      else
        j->isa->qmv(&j->sh, v->wrows, nn, v->xf + r0 * K, v->xsum + r0 * G, (int)Rh, k0, kc,
                    v->C + r0 * nt, nt);
    }
  }
}

/* transpose=0 unit: output columns [n0, n0+nn) (nn a multiple of 32). W rows
 * run along n, so each k-row segment is dequantized (chunk order) and added
 * into every row's accumulators with a vectorizable axpy; the chunk order is
 * undone when storing. */
static void unit_plain(const job *j, const scratch_view *v, int64_t blk, int64_t n0, int nn) {
  const gqmm__qmm_args *a = j->a;
  const size_t esz = gqmm_dtype_size(a->dtype);
  const int64_t e = j->blk_e[blk], R = j->blk_rows[blk], K = a->K, G = j->G, nt = j->nt;
  memset(v->C, 0, (size_t)(R * nt) * sizeof(float));
  for (int64_t k = 0; k < K; k++) {
    const int64_t wr = e * K + k;
    const gqmm__cpu_wrow row = {(const uint8_t *)a->w + wr * j->sh.row_bytes,
                                elem(a->scales, wr * G, esz), elem(a->biases, wr * G, esz)};
    j->isa->dequant(&j->sh, &row, n0, nn, v->panel);
    for (int64_t r = 0; r < R; r++) {
      const float xv = v->xf[r * K + k];
      float *c = v->C + r * nt;
      for (int n = 0; n < nn; n++)
        c[n] += xv * v->panel[n];
    }
  }
}

static void store_rows(const job *j, const scratch_view *v, int64_t blk, int64_t n0, int nn) {
  const gqmm__qmm_args *a = j->a;
  const int64_t R = j->blk_rows[blk], first = j->blk_first[blk], nt = j->nt;
  for (int64_t r = 0; r < R; r++) {
    const int64_t o = j->out_off[first + r] + n0;
    const float *c = v->C + r * nt;
    if (a->transpose) {
      j->isa->from_float(c, a->dtype, nn, (char *)a->out + (size_t)o * gqmm_dtype_size(a->dtype));
    } else {
      for (int n = 0; n < nn; n++)
        gqmm__store_f(a->out, a->dtype, o + (n & ~31) + j->col_perm[n & 31], c[n]);
    }
  }
}

/* Prefetch of unit u's first kc block of each weight row (the dequant and
 * pack_i8 kernels prefetch every later block themselves) and of the rows' scales and
 * biases, issued a unit ahead so that a panel-path unit whose weights come
 * from DRAM does not begin with misses on every row (qmm M=16, 1 thread:
 * -10%, docs/perf-notes.md). Whichever thread takes u finds them in this
 * core's cache or on the way. */
static void prefetch_unit(const job *j, int64_t u) {
  if (u >= j->nblocks * j->tiles || j->pk) return;      /* packed kernels prefetch their stream */
  if (small_path(j, j->blk_rows[u / j->tiles])) return; /* not a panel unit */
  const int64_t n0 = (u % j->tiles) * j->nt, nn = j->a->N - n0 < j->nt ? j->a->N - n0 : j->nt;
  const int64_t first = j->blk_e[u / j->tiles] * j->nw + n0;
  const int64_t head = gqmm__cpu_chunk_offset(j->sh.bits, j->int8 ? i8_kc(j) : j->cfg->kc),
                bytes = head < j->sh.row_bytes ? head : j->sh.row_bytes;
  const int64_t pbytes = (int64_t)gqmm_dtype_size(j->a->dtype) * j->G; /* a row's s or b */
  for (int64_t i = 0; i < nn; i++) {
    for (int64_t off = 0; off < bytes; off += 64)
      __builtin_prefetch((const char *)j->a->w + (first + i) * j->sh.row_bytes + off, 0, 3);
    for (int64_t off = 0; off < pbytes; off += 64) { /* the kernel reads them as it goes */
      __builtin_prefetch((const char *)j->a->scales + (first + i) * pbytes + off, 0, 3);
      __builtin_prefetch((const char *)j->a->biases + (first + i) * pbytes + off, 0, 3);
    }
  }
}

/* The packed kernels' x rows, once for all threads (pk_bf16, pk_i8): blocks
 * from a shared counter, each row's group sums (and its int8 codes); the
 * unit pass then reads them wherever its units run, where a
 * per-thread x block would be made by every thread that takes a unit of the
 * block (the seed's gather: 11 units a block, so both threads, each
 * quantizing every row). The int8 codes of each packed tile (unit_packed's
 * rows [r0, r0 + mr) of a block) are interleaved by quads, quad q of the
 * tile's row m at (q mr + m) 4 bytes from the tile's first code: the kernel
 * then takes every row's quad of a step from one line, at constant offsets
 * from one pointer (cpu_isa.h). */
static void prep_x(void *arg, int t) {
  job *j = arg;
  const gqmm__qmm_args *a = j->a;
  const size_t esz = gqmm_dtype_size(a->dtype);
  const int64_t K = a->K, G = j->G;
  const int gs = j->sh.group_size;
  scratch_view v;
  layout(j, j->st->scratch[t].buf, &v);
  for (;;) {
    const int64_t b = atomic_fetch_add(&j->next_blk, 1);
    if (b >= j->nblocks) break;
    const int64_t first = j->blk_first[b], R = j->blk_rows[b], tiles = pk_tiles(j, R);
    for (int64_t ti = 0, r0 = 0; ti < tiles; ti++) {
      const int mr = pk_tile_height(R, tiles, ti, r0);
      for (int m = 0; m < mr; m++) {
        const int64_t r = first + r0 + m;
        j->isa->to_float(elem(a->x, j->x_off[r], esz), a->dtype, K, v.tmp);
        for (int64_t g = 0; g < G; g++)
          j->pk_xsum[r * G + g] = group_sum(v.tmp + g * gs, gs);
        if (!j->pk_i8) continue;
        j->isa->pk_quant_i8(v.tmp, K, gs, j->sh.bits, v.xq, j->pk_xs + r * G);
        int8_t *tile = j->pk_xq + (first + r0) * K;
        for (int64_t q = 0; q < K / 4; q++)
          memcpy(tile + (q * mr + m) * 4, v.xq + 4 * q, 4);
      }
      r0 += mr;
    }
  }
}

/* Thread t's next unit, or a value >= total when none is left.
 *
 * The shared counter deals consecutive units to alternate threads, so a
 * thread's next unit is never the next in memory and each starts its
 * stream cold. With `ranges` each thread owns an equal run of consecutive
 * units and takes them front to back, streaming on from one to the next;
 * a thread whose run is done takes the last unit of the run with the most
 * left. Only where the units reuse weights: with 1-2 rows a block (memory
 * bound) two threads streaming regions far apart were 5-7% slower than
 * interleaved units (qmm M = 1-2), while 4-16 rows per expert gained 2-5%
 * (perf-notes, sessions 16 and 17). Which thread computes a unit does not
 * change its result. */
static int64_t next_unit(job *j, int t, int threads, int64_t total) {
  if (!j->ranges) return atomic_fetch_add(&j->next, 1);
  for (;;) { /* the front of the own run */
    unsigned long long v = atomic_load(&j->range[t].lohi);
    const uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
    if (lo >= hi) break;
    if (atomic_compare_exchange_weak(&j->range[t].lohi, &v, v + 1)) return lo;
  }
  for (;;) { /* the back of the run with the most left */
    int from = -1;
    uint32_t most = 0;
    for (int o = 0; o < threads; o++) {
      const unsigned long long v = atomic_load(&j->range[o].lohi);
      const uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
      if (hi > lo && hi - lo > most) most = hi - lo, from = o;
    }
    if (from < 0) return total;
    unsigned long long v = atomic_load(&j->range[from].lohi);
    const uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
    if (lo >= hi) continue;
    if (atomic_compare_exchange_weak(&j->range[from].lohi, &v,
                                     (unsigned long long)(hi - 1) << 32 | lo))
      return hi - 1;
  }
}

static void worker(void *arg, int t) {
  job *j = arg;
  gqmm__cpu_scratch *s = &j->st->scratch[t];
  scratch_view v;
  layout(j, s->buf, &v);
  const int64_t total = j->nblocks * j->tiles;
  const int64_t nt = j->nt, ncols = j->a->N;
  const int threads = j->st->threads;
  for (;;) {
    const int64_t u = next_unit(j, t, threads, total);
    if (u >= total) break;
    const int64_t blk = u / j->tiles, n0 = (u % j->tiles) * nt;
    const int nn = (int)(ncols - n0 < nt ? ncols - n0 : nt);
    if (j->a->transpose) prefetch_unit(j, u + 1);
    if (s->cached_block != blk && !j->pk_xsum) {
      prepare_x(j, &v, blk);
      s->cached_block = blk;
    }
    if (j->a->transpose)
      unit_transposed(j, &v, blk, n0, nn);
    else
      unit_plain(j, &v, blk, n0, nn);
    store_rows(j, &v, blk, n0, nn);
  }
}

int gqmm__cpu_run(gqmm_ctx *ctx, gqmm__cpu_state *st, const gqmm__qmm_args *a,
                  const gqmm__cpu_config *cfg, bool int8) {
  job j;
  memset(&j, 0, sizeof j);
  j.a = a;
  j.isa = st->isa;
  j.cfg = cfg;
  j.st = st;
  j.pk = a->packed;
  /* int8 mode: 4-bit on the MLX layout, 2/4-bit packed, where the ISA has it */
  j.int8 = int8 && a->transpose &&
           (j.pk ? st->isa->packed != NULL : a->q.bits == 4 && st->isa->qmv_i8 != NULL);
  j.xbf = !j.int8 && !j.pk && a->transpose && a->dtype == GQMM_BF16 && st->isa->qmv_bf16 &&
          st->isa->qmv_bf16_supported();
  j.bf16_panel = j.xbf && st->isa->gemm_bf16 && st->isa->dequant_bf16;
  if (j.pk) {
    const int64_t G = a->K / a->q.group_size, rec = gqmm__cpu_pk_rec(a->q.bits, a->q.group_size);
    j.ps = (gqmm__cpu_pkshape){a->q.bits, a->q.group_size, j.pk->dtype, G, rec, G * rec};
    j.pk_i8 = j.int8;
    j.pk_bf16 =
        !j.int8 && a->dtype == GQMM_BF16 && st->isa->packed && st->isa->qmv_bf16_supported();
  }
  j.nt = a->transpose ? cfg->nt : 64; /* transpose=0 units are whole 32-column chunks */
  const int64_t wlen = a->transpose ? a->K : a->N;
  j.nw = a->transpose ? a->N : a->K;
  j.G = wlen / a->q.group_size;
  j.sh = (gqmm__cpu_shape){
      a->q.bits, a->q.group_size, a->dtype, wlen, gqmm_packed_words(a->q, wlen) * 4, 0};
  /* whole rows ahead (the next pair at least), GQMM__CPU_QMV_PREFETCH bytes or more */
  j.sh.pf_ahead = (GQMM__CPU_QMV_PREFETCH + j.sh.row_bytes - 1) / j.sh.row_bytes;
  if (j.sh.pf_ahead < 2) j.sh.pf_ahead = 2;
  j.sh.pf_ahead *= j.sh.row_bytes;
  j.rows_max = ROWS_MAX_BYTES / (a->K * 4 + 1);
  if (j.rows_max < 8) j.rows_max = 8;
  if (j.rows_max > ROWS_MAX_COUNT) j.rows_max = ROWS_MAX_COUNT;
  /* x in the ISA's chunk order, but for the packed kernels (natural order)
   * and transpose=0 (the weights' chunk order is undone at the store) */
  for (int l = 0; l < 32; l++)
    j.perm[l] = l;
  if (a->transpose && !j.pk)
    st->isa->perm(a->q.bits, j.perm);
  else if (!a->transpose)
    st->isa->perm(a->q.bits, j.col_perm);
  int status = build_blocks(ctx, &j);
  if (!status && j.pk) { /* whole panels: PK_UNIT_ROWS, more where every block is small */
    int64_t nt = PK_UNIT_ROWS, most = 0;
    for (int64_t b = 0; b < j.nblocks; b++)
      most = j.blk_rows[b] > most ? j.blk_rows[b] : most;
    const int64_t units = SMALL_UNITS_PER_THREAD * (int64_t)st->threads;
    const int64_t longer = j.nblocks * a->N / (units > 0 ? units : 1) / GQMM__CPU_PANEL;
    if (most <= 4 && longer * GQMM__CPU_PANEL > nt) nt = longer * GQMM__CPU_PANEL;
    j.nt = nt < SMALL_UNIT_ROWS ? nt : SMALL_UNIT_ROWS;
  } else if (!status && a->transpose) { /* small-M jobs stream long units (SMALL_UNIT_ROWS) */
    j.small_only = true;
    for (int64_t b = 0; b < j.nblocks; b++)
      j.small_only &= small_path(&j, j.blk_rows[b]);
    const int64_t units = SMALL_UNITS_PER_THREAD * (int64_t)st->threads;
    int64_t nt = j.nblocks * a->N / (units > 0 ? units : 1);
    if (nt > SMALL_UNIT_ROWS) nt = SMALL_UNIT_ROWS;
    if (j.small_only && nt > j.nt) j.nt = nt;
    /* the bf16 panel's micro-panels are GQMM__CPU_BF16_NR rows: whole ones
     * (32 -> 36 rows a unit, and K blocks of GQMM__CPU_BF16_KC instead of
     * the FMA path's kc: 3-6% on the seed shapes, AVX-512 EPYC) */
    if (j.bf16_panel && !j.small_only)
      j.nt = (j.nt + GQMM__CPU_BF16_NR - 1) / GQMM__CPU_BF16_NR * GQMM__CPU_BF16_NR;
  }
  j.tiles = (a->N + j.nt - 1) / j.nt;
  if (!status) status = reserve_scratch(ctx, &j);
  if (!status && (j.pk_bf16 || j.pk_i8)) {
    const int64_t rows = a->batch * a->M;
    const size_t sums = (size_t)(2 * rows * j.G) * sizeof(float), /* xsum, then xs */
        need = sums + (j.pk_i8 ? (size_t)(rows * a->K) : 0);
    if (gqmm__reserve(&st->prep, &st->prep_cap, need)) {
      status = gqmm__fail(ctx, GQMM_ERR_NOMEM,
                          "cpu backend: cannot allocate %zu bytes for x's group sums", need);
    } else {
      j.pk_xsum = st->prep;
      j.pk_xs = j.pk_xsum + rows * j.G;
      j.pk_xq = j.pk_i8 ? (int8_t *)((char *)st->prep + sums) : NULL;
    }
    atomic_init(&j.next_blk, 0);
    if (!status) gqmm__cpu_pool_run(st->pool, prep_x, &j);
  }
  if (!status) {
    atomic_init(&j.next, 0);
    const int64_t total = j.nblocks * j.tiles, T = st->threads;
    j.ranges =
        j.pk && T > 1 && T <= RANGE_SLOTS && total < INT32_MAX && a->batch * a->M >= 4 * j.nblocks;
    for (int64_t t = 0; j.ranges && t < T; t++)
      atomic_init(&j.range[t].lohi,
                  (unsigned long long)(total * (t + 1) / T) << 32 | (uint64_t)(total * t / T));
    gqmm__cpu_pool_run(st->pool, worker, &j);
  }
  free(j.x_off);
  free(j.out_off);
  free(j.blk_first);
  return status;
}
