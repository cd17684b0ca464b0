/*
 * kernels.h - the C view of the CUDA kernels: plain extern "C" launchers
 * called by backend_cuda.c and moe_cuda.c. Each launcher enqueues work on
 * the stream it is given (the context's: gqmm_device_set_stream; NULL is
 * the legacy default stream) and returns a cudaError_t as int (0 = success).
 */
#ifndef GQMM_CUDA_KERNELS_H
#define GQMM_CUDA_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cudaStream_t, without the CUDA headers (it is this very type). */
typedef struct CUstream_st *gqmm__cu_stream;

/* Element types the kernels take (values match gqmm_dtype). */
enum { GQMM__CU_F32 = 0, GQMM__CU_F16 = 1, GQMM__CU_BF16 = 2 };

/*
 * Routing plan (route.cu): rows of a batched qmm grouped by expert.
 * Input: batch entries b with x_index[b], w_index[b]; each entry has M rows.
 * Output, on the device (all int32):
 *   count[E]       rows per expert
 *   row_start[E]   first row of expert e in rows_x/rows_o (prefix of count)
 *   unit_start[E+1] first work unit of expert e; unit_start[E] = total units
 *   rows_x[R], rows_o[R]  R = batch*M: the x row and the out row of each row
 * A work unit is (expert, N tile, chunk of <= tok_max rows); units[4u..4u+3]
 * describe unit u: expert, N tile, first row, rows (16-byte aligned; room for
 * gqmm__cu_units_bound() units). `fill` is scratch of E ints.
 */
typedef struct {
  int32_t *count, *row_start, *unit_start, *fill, *rows_x, *rows_o, *units;
} gqmm__cu_plan;

/* At most this many units for R rows of `used` distinct experts (each adds
 * at most one partial chunk) in n_tiles N tiles. */
static inline int64_t gqmm__cu_units_bound(int64_t R, int64_t used, int64_t tok_max,
                                           int64_t n_tiles) {
  return ((R + tok_max - 1) / tok_max + used) * n_tiles;
}

/* sms: the device's multiprocessors (the plan kernel's grid, route.cu). */
int gqmm__cu_route(const int32_t *x_index, const int32_t *w_index, int32_t batch, int32_t M,
                   int32_t experts, int32_t tok_max, int32_t n_tiles, gqmm__cu_plan plan, int sms,
                   gqmm__cu_stream stream);

/*
 * The MoE layer's plan (M = 1, entry p = t*top_k + j is pair p, x row
 * p / top_k, out row p) for both GEMMs at once: plan.unit_start gets the
 * units of tiling 0 (gate_up), unit_start2 those of tiling 1 (down; n_tiles
 * 0: none); count, row_start, rows_x and rows_o are shared (down reads h row
 * p, i.e. rows_o as its rows_x). The ids are checked here: ids_safe[p] gets
 * ids[p], or 0 for an id outside [0, E), and the first bad pair p is written
 * to the host-mapped record err: err[1] = p, err[2] = the id's bits,
 * err[3] = E, err[4] = top_k, then err[0] = call (nonzero) after a system
 * fence. Nothing is written to err when every id is good.
 */
typedef struct {
  const int32_t *ids; /* [pairs], int32 or uint32 bits */
  int32_t pairs, top_k, experts;
  int32_t tok_max[2], n_tiles[2];
  int32_t *unit_start2; /* [E+1] */
  int32_t *units2;      /* unit descriptors of tiling 1 (as plan.units) */
  gqmm__cu_plan plan;
  int32_t *ids_safe; /* [pairs] */
  int32_t *err;      /* device view of 5 host-mapped ints */
  int32_t call;
  int sms; /* the device's multiprocessors */
  gqmm__cu_stream stream;
} gqmm__cu_moe_route_args;

int gqmm__cu_moe_route(const gqmm__cu_moe_route_args *a);

/* Arguments shared by the qmm kernels (device pointers). */
typedef struct {
  int dtype; /* GQMM__CU_* of x, scales, biases and out */
  int bits, group_size, transpose;
  int64_t M, N, K, batch;
  const void *x;
  const uint32_t *w;
  const void *scales, *biases;
  void *out;
  const int32_t *x_index, *w_index; /* [batch], on the device */
  /* Non-NULL: the weights in the stage layout of gqmm__cu_pack (w, scales
   * and biases are not read); only the packed (wgmma) configs run it. */
  const uint8_t *packed;
  int glu; /* packed is a GLU pack (N = 2I): out rows as the tensor's */
  int packed_lin; /* packed holds pre-scaled scales (gqmm__cu_pack's *lin) */
  /* With a GLU pack, 1 + a gqmm_activation: out is [rows, I] of
   * act(gate, up) of the rounded gate and up values (the MoE layer's
   * activation in the epilogue); 0: the plain [rows, N] output. */
  int epilogue_act;
} gqmm__cu_qmm;

/*
 * The packed stage layout (pack.cu, read by the wgmma kernel, qmm_wgmma.cu):
 * per expert e, tile of GQMM__CU_PACK_TILE_N weight rows and stage of
 * GQMM__CU_PACK_STAGE_K k, one contiguous block of gqmm__cu_pack_stage_bytes:
 * the stage's weights in the order the kernel's threads read them, then the
 * stage's scale and bias words (scale | bias << 16) row by row. Rows past N
 * and k past K are zeros (scale 0, bias 0). Blocks are ordered
 * (e, tile, stage), so a unit streams one contiguous region.
 */
enum { GQMM__CU_PACK_TILE_N = 128, GQMM__CU_PACK_STAGE_K = 128 };
static inline int64_t gqmm__cu_pack_stage_bytes(int bits, int group_size) {
  return (int64_t)GQMM__CU_PACK_TILE_N * GQMM__CU_PACK_STAGE_K * bits / 8 +
         (int64_t)GQMM__CU_PACK_TILE_N * (GQMM__CU_PACK_STAGE_K / group_size) * 4;
}
/* Stages of a packed row of K values (the last may be partial). */
static inline int64_t gqmm__cu_pack_stages(int64_t K) {
  return (K + GQMM__CU_PACK_STAGE_K - 1) / GQMM__CU_PACK_STAGE_K;
}
/*
 * GLU packs (gqmm_pack_glu) of a gate_up tensor [E, 2I, ...] (gate rows
 * [0, I), up rows [I, 2I)) pair the rows the activation combines: row
 * 16 i + 8 h + g of tile t (m16 tile i, half h, row g of the half: the rows
 * one thread's accumulators cover) is row h * I + 64 t + 8 i + g of the
 * tensor, present while 64 t + 8 i + g < I (else zeros). A tile is 64 gate
 * and their 64 up rows, every tile whole. glu below: 1 for a GLU pack.
 */
static inline int64_t gqmm__cu_pack_tiles(int64_t N, int glu) {
  return glu ? (N / 2 + GQMM__CU_PACK_TILE_N / 2 - 1) / (GQMM__CU_PACK_TILE_N / 2)
             : (N + GQMM__CU_PACK_TILE_N - 1) / GQMM__CU_PACK_TILE_N;
}
/* The last tile holds at most 64 rows (N % 128 in 1..64, e.g. N = 704): its
 * blocks keep only those rows, half the bytes (weights of m16 tiles 0..3,
 * then the 64 rows' scale words), instead of streaming zero padding. */
static inline int gqmm__cu_pack_half_last(int64_t N, int glu) {
  const int64_t r = N % GQMM__CU_PACK_TILE_N;
  return !glu && r > 0 && r <= GQMM__CU_PACK_TILE_N / 2;
}
/* The last stage holds at most 64 k (K % 128 in 1..64, e.g. down's K =
 * 704): its blocks are half blocks too, the first half of a whole one:
 * each lane's values of k-steps 0..3 (the first half of its 4*bits bytes),
 * then the scale words of the stage's first half of groups; the second
 * half is zeros and is neither copied nor computed. Not for 3-bit (a
 * lane's first four k-steps are not its first bytes). */
static inline int gqmm__cu_pack_half_k(int64_t K, int bits) {
  const int64_t r = K % GQMM__CU_PACK_STAGE_K;
  return bits != 3 && r > 0 && r <= GQMM__CU_PACK_STAGE_K / 2;
}
/* Bytes of one expert's blocks (its tiles in order, each tile's stages). */
static inline int64_t gqmm__cu_pack_expert_bytes(int64_t N, int64_t K, int bits, int group_size,
                                                 int glu) {
  const int64_t tiles = gqmm__cu_pack_tiles(N, glu);
  const int64_t stages = gqmm__cu_pack_stages(K);
  const int64_t full = gqmm__cu_pack_stage_bytes(bits, group_size);
  return stages * (full * tiles - (gqmm__cu_pack_half_last(N, glu) ? full / 2 : 0));
}
static inline int64_t gqmm__cu_pack_bytes(int64_t E, int64_t N, int64_t K, int bits,
                                          int group_size, int glu) {
  return E * gqmm__cu_pack_expert_bytes(N, K, bits, group_size, glu);
}
/* Pack E experts of w [E, N, K*bits/32] (MLX layout) with their scales and
 * biases (dtype GQMM__CU_F16 or _BF16) into out (gqmm__cu_pack_bytes).
 * bits 2/3/4/8, group size 32/64/128, K % 32 == 0; glu: a GLU pack (N
 * even). *lin in: 1 to try linear dequantization (wfmt.cuh: the scales
 * stored pre-scaled by a power of two); out: 1 if the pack has it, 0 if
 * the width has no such form or some scale does not take the factor
 * exactly (then the scales are stored as they are). Synchronizes the
 * stream. */
int gqmm__cu_pack(const uint32_t *w, const void *scales, const void *biases, int64_t E, int64_t N,
                  int64_t K, int bits, int group_size, int glu, int dtype, int *lin, uint8_t *out,
                  gqmm__cu_stream stream);
/* Tile configurations of the tensor-core kernel (qmm_mma.cu), as data. */
typedef struct {
  const char *name;
  int warps;   /* warps per CTA, each owning mtiles x 16 output features */
  int mtiles;  /* m16 tiles per warp */
  int stages;  /* cp.async ring depth */
  int tok_max; /* rows per work unit (8 x the widest n8 token tile) */
  int packed;  /* 1: the wgmma kernel on the packed layout (qmm_wgmma.cu);
                * 0: the mma.sync kernel on MLX's layout (qmm_mma.cu) */
} gqmm__cu_mma_config;

int gqmm__cu_mma_config_count(void);
const gqmm__cu_mma_config *gqmm__cu_mma_config_get(int i);
/* Rows of one work unit of config cfg; plans for cfg must use it. */
int gqmm__cu_mma_tok_max(int cfg);
int gqmm__cu_mma_tile_n(int cfg);
/* N tiles of a plan for config cfg on these args (a packed copy's tiles). */
int gqmm__cu_mma_n_tiles(int cfg, const gqmm__cu_qmm *a);
/* 1 if the tensor-core kernel runs these args (transpose, bits 2/3/4/8,
 * f16/bf16, aligned pointers); config cfg must also match a->packed. */
int gqmm__cu_mma_eligible(const gqmm__cu_qmm *a);
/* 1 if config cfg runs these args: eligible, and packed iff the config is. */
int gqmm__cu_mma_config_ok(int cfg, const gqmm__cu_qmm *a);
/* Persistent-grid size for config `cfg` on this device (CTAs); also sets
 * the kernel instance's shared-memory attribute, which a launch needs. */
int gqmm__cu_mma_grid(int cfg, const gqmm__cu_qmm *a, int sms, int *out_grid);
/* The kernel instance config cfg launches for these args (distinct per
 * template instance: config, dtype, bits, group size, dequantization), or
 * NULL: what a cache of gqmm__cu_mma_grid results is keyed by. */
const void *gqmm__cu_mma_instance(int cfg, const gqmm__cu_qmm *a);
/* Run with a plan made by gqmm__cu_route for tok_max and this config's N tile. */
int gqmm__cu_mma_run(int cfg, const gqmm__cu_qmm *a, const gqmm__cu_plan *plan, int experts,
                     int grid, gqmm__cu_stream stream);

/* Generic kernel (qmm_generic.cu): every bits, group size, dtype, transpose. */
int gqmm__cu_generic_run(const gqmm__cu_qmm *a, gqmm__cu_stream stream);

/* Ceilings (ceilings.cu): measured now on the current device (on the legacy
 * default stream; synchronous). */
int gqmm__cu_measure_ceilings(double *copy_GBps, double *read_GBps, double *mma_GMACps);


/* ---- The MoE expert layer's elementwise kernels (moe.cu) ----------------- */

/* tok[p] = p / top_k and iota[p] = p for p < R: the x rows of the gate_up
 * GEMM (the pair's token) and of the down GEMM (the pair's own h row). */
int gqmm__cu_moe_indices(int32_t *tok, int32_t *iota, int32_t R, int32_t top_k,
                         gqmm__cu_stream stream);
/* h[r, i] = act(gu[r*gs + i], gu[r*gs + uo + i]) for r < R, i < I; act 0 is
 * SwiGLU, 1 GeGLU (tanh); float32 math, rounded to dtype once. */
int gqmm__cu_moe_act(int dtype, int act, const void *gu, int64_t gs, int64_t uo, void *h, int64_t R,
                     int64_t I, gqmm__cu_stream stream);
/* out[t, n] = sum over j < k ascending of w[t, j] * y[t*k + j, n] in float32,
 * rounded once; one thread per output element (deterministic). A token with
 * an id outside [0, E) in ids[t*k .. t*k+k) gets NaN (its y rows were
 * computed with expert 0 in place of the bad id, see gqmm__cu_moe_route).
 * y is consumed: where its rows are 128-byte aligned its L2 lines are
 * discarded once read (never written back; its contents become undefined).
 * So are the whole lines of [dead, dead + dead_bytes) (NULL, 0: none): the
 * layer's other scratch that no later kernel reads. */
int gqmm__cu_moe_combine(int dtype, const void *y, const void *w, const int32_t *ids, int32_t E,
                         void *out, int64_t T, int64_t k, int64_t H, const void *dead,
                         int64_t dead_bytes, gqmm__cu_stream stream);

#ifdef __cplusplus
}
#endif
#endif
