/*
 * heuristic.c - a default tile configuration without measuring, for calls
 * the tuning cache has no entry for.
 *
 * At a few rows per expert the kernel streams weights; what costs time is
 * (in this order): reading the weights more than once (a row tile smaller
 * than the expert's rows makes every extra row tile re-stream them), idle
 * units in the last wave of the grid, too few weight bytes in flight per
 * tile to cover memory latency, and only then arithmetic on padded rows
 * (cheap: the tensor cores are far from busy). The score multiplies one
 * efficiency factor per effect; the highest score wins; of equal scores,
 * the one with more threads per tile (on the H100 8 warps beat 4 by ~30% at
 * equal tiles, bench/data/tune-h100-*.json), then the earlier in the table.
 */
#include "tune.h"

#include <math.h>

#define INFLIGHT_TARGET 32768.0 /* bytes of weights per tile that hide DRAM latency */

static double config_score(const gqmm__tile_config *c, const gqmm__qmm_args *a, int rows,
                           double experts, int parallel_units) {
  const double tm = c->tile_m > 0 ? c->tile_m : rows;
  const double tn = c->tile_n > 0 ? c->tile_n : (double)a->N;
  const double tk = c->tile_k > 0 ? c->tile_k : a->q.group_size;
  const double split = c->split_k > 1 ? c->split_k : 1;
  const double stages = c->stages > 0 ? c->stages : 1;
  const double row_tiles = ceil(rows / tm);
  double score = 1.0 / row_tiles;              /* weight re-reads */
  score *= pow(rows / (row_tiles * tm), 0.25); /* padded MMA rows */
  const double n_tiles = ceil((double)a->N / tn);
  score *= sqrt((double)a->N / (n_tiles * tn)); /* lanes past N */
  const double units = n_tiles * experts * split;
  if (parallel_units > 0) {
    double waves = ceil(units / parallel_units);
    score *= units / (waves * parallel_units); /* last-wave tail */
  } else if (units < 16) {
    score *= units / 16;
  }
  score *= sqrt(fmin(1.0, tn * tk * a->q.bits / 8.0 * stages / INFLIGHT_TARGET));
  if (split > 1) score *= 0.95; /* reduction pass */
  return score;
}

int gqmm__tune_heuristic(const gqmm__tile_config *cfgs, int n, const gqmm__qmm_args *a,
                         int parallel_units) {
  if (!cfgs || n <= 0) return -1;
  const int rows = gqmm__rows_bucket(a->M * a->batch, a->w_batches);
  double experts = (double)(a->w_batches < a->M * a->batch ? a->w_batches : a->M * a->batch);
  if (experts < 1) experts = 1;
  int best = 0;
  double best_score = -1;
  for (int i = 0; i < n; i++) {
    double s = config_score(&cfgs[i], a, rows, experts, parallel_units);
    /* equal scores: more threads per tile keep more loads in flight */
    bool tie = s > best_score * (1 - 1e-9) && s < best_score * (1 + 1e-9);
    if (s > best_score * (1 + 1e-9) || (tie && cfgs[i].threads > cfgs[best].threads))
      best = i, best_score = s;
  }
  return cfgs[best].id;
}
