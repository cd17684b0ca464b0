/*
 * cpu_backend.h - state and entry points shared by the CPU backend's files:
 * the ISA chosen at run time, the thread pool, per-thread scratch, the
 * block-size table, the generic loops and the ceilings.
 */
#ifndef GQMM_CPU_BACKEND_H
#define GQMM_CPU_BACKEND_H

#include "cpu_isa.h"
#include "cpu_pool.h"

/* One row of the block-size table: changes speed, never results. */
typedef struct {
  const char *name;
  int mr, nr;   /* register tile: activation rows x weight rows */
  int kc;       /* reduction block (values), multiple of 128 */
  int mc;       /* rows per x slice (mc x kc floats stay in L1 across micro-panels), mr | mc */
  int nt;       /* weight rows per work unit (threads split experts x units) */
  int qmv_rows; /* blocks of at most this many rows take the small-M path (<= 4) */
  int i8_rows;  /* int8 mode: blocks of at most this many rows take qmv_i8, more the panel
                   (measured: qmv_i8 faster up to 32 rows, the panel from 48) */
} gqmm__cpu_config;

typedef struct {
  void *buf;
  size_t cap;
  int64_t cached_block; /* x block prepared in buf (-1: none) */
} gqmm__cpu_scratch;

typedef struct {
  const gqmm__cpu_isa *isa;
  char label[32]; /* "cpu-avx2", reported as the last backend */
  gqmm__cpu_pool *pool;
  int threads;
  gqmm__cpu_scratch *scratch; /* [threads] */
  /* The packed kernels' x group sums and int8 codes, shared by the threads
   * (cpu_loops.c prep_x), kept between calls: at the seed's 128 rows per
   * expert the codes are 46 MB, which malloc maps afresh each call (over
   * its largest reuse threshold), and zeroing those pages cost ~10% of the
   * call. */
  void *prep;
  size_t prep_cap;
} gqmm__cpu_state;

/* The table (per ISA: register tiles differ) and the built-in choice. */
const gqmm__cpu_config *gqmm__cpu_configs(const gqmm__cpu_isa *isa, int *count);
int gqmm__cpu_default_config(const gqmm__cpu_isa *isa, const gqmm__qmm_args *a);

/* The generic loops (cpu_loops.c). */
int gqmm__cpu_run(gqmm_ctx *ctx, gqmm__cpu_state *st, const gqmm__qmm_args *a,
                  const gqmm__cpu_config *cfg, bool int8);

/* gqmm_pack for the CPU (cpu_pack.c): the copy and the
 * portable kernel over it (x as float rows; cpu_isa.h packed's contract
 * without the group sums). */
int gqmm__cpu_pack(gqmm_ctx *ctx, struct gqmm_packed *p, const uint32_t *w, const void *scales,
                   const void *biases, int64_t E, int64_t N);
void gqmm__cpu_packed_portable(const gqmm__cpu_pkshape *ps, const uint8_t *pk, int np,
                               const float *const *x, int mr, float *C, int64_t ldc);

/* Same-run ceilings on every thread of the pool (cpu_ceilings.c). */
int gqmm__cpu_ceilings(gqmm_ctx *ctx, gqmm__cpu_state *st, bool int8, gqmm__ceilings *out);

#endif
