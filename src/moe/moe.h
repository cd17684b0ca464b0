/*
 * moe.h - internals of the MoE expert layer (src/moe), shared by the layer's
 * front end, its CPU composition, the tests and `gqmm bench`.
 */
#ifndef GQMM_MOE_H
#define GQMM_MOE_H

#include "internal.h"

/*
 * The routing plan: the tokens*top_k (token, slot) pairs, numbered
 * p = token*top_k + slot, grouped by expert with a stable counting sort, so
 * expert e owns the contiguous rows [offsets[e], offsets[e+1]) and, inside
 * that range, its pairs keep ascending p. Every gathered GEMM then reads
 * each expert's weights once for all its rows.
 */
typedef struct {
  int64_t experts, rows;  /* rows = tokens * top_k */
  int64_t *offsets;       /* [experts + 1], offsets[experts] == rows */
  int64_t *row_pair;      /* [rows]: pair p of sorted row r */
  int64_t *pair_row;      /* [rows]: sorted row of pair p (the inverse) */
  int64_t *row_expert;    /* [rows]: expert of sorted row r (non-decreasing) */
} gqmm__moe_plan;

/* Build the plan from ids [tokens, top_k]; GQMM_ERR_INDEX names the first id
 * outside [0, experts). Free with gqmm__moe_plan_free (safe on a zeroed plan). */
int gqmm__moe_plan_build(gqmm_ctx *ctx, const int32_t *ids, int64_t tokens, int64_t top_k,
                         int64_t experts, gqmm__moe_plan *plan);
void gqmm__moe_plan_free(gqmm__moe_plan *plan);

/* Seconds spent in each step of the composed layer (the bench's breakdown). */
typedef struct {
  double plan_s, gate_up_s, act_s, down_s, combine_s;
} gqmm__moe_phases;

/*
 * The layer composed from a backend's qmm (CPU tensors): plan, gate_up
 * gathered GEMM, activation, down gathered GEMM, weighted combine in
 * ascending slot order. phases may be NULL.
 */
int gqmm__moe_compose(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__moe_args *a,
                      gqmm__moe_phases *phases);

/* gqmm_moe_forward with the composed path's phase times (phases may be NULL;
 * left untouched when a backend's fused moe_forward runs the layer). */
int gqmm__moe_forward_timed(gqmm_ctx *ctx, const gqmm_moe_weights *w, const gqmm_tensor *x,
                            const gqmm_tensor *expert_ids, const gqmm_tensor *expert_weights,
                            gqmm_activation act, gqmm_tensor *out, gqmm__moe_phases *phases);

/* The activation of one (gate, up) pair in float32. */
float gqmm__moe_act(gqmm__activation act, float gate, float up);

/* Run fn(arg, begin, end) over [0, rows) split into contiguous ranges, one
 * per thread (ctx->num_threads, GQMM_NUM_THREADS or the cores), at least
 * min_rows each. Rows must be independent: the result is the same for any split. */
typedef void (*gqmm__moe_rows_fn)(void *arg, int64_t begin, int64_t end);
void gqmm__moe_parallel_rows(gqmm_ctx *ctx, int64_t rows, int64_t min_rows, gqmm__moe_rows_fn fn,
                             void *arg);

#endif
