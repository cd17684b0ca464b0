/*
 * problem.h - the inputs the tuner times a backend on (private to src/tune):
 * random quantized experts (never zeros), copied several times so that
 * rotating through the copies keeps caches from flattering repeated runs,
 * and per rows-per-expert bucket a random top-k routing sorted by expert.
 */
#ifndef GQMM_TUNE_PROBLEM_H
#define GQMM_TUNE_PROBLEM_H

#include "tune.h"

#define GQMM__TUNE_MAX_COPIES 64

typedef struct {
  const gqmm__backend *be;
  bool on_device; /* buffers come from be->mem_alloc */
  int copies;     /* weight/activation copies in rotation */
  void *w[GQMM__TUNE_MAX_COPIES], *s[GQMM__TUNE_MAX_COPIES], *b[GQMM__TUNE_MAX_COPIES];
  void *x[GQMM__TUNE_MAX_COPIES];
  void *out;
  void *nan_host; /* out_bytes of NaN, copied over the output before a check */
  size_t w_bytes, sb_bytes, x_bytes, out_bytes;
  double expert_bytes; /* packed + scales + biases of one expert */
  gqmm__qmm_args a;    /* the call; x/w/scales/biases set per copy */
  int64_t *x_index, *w_index;
  int experts_used;
} gqmm__tune_problem;

/* Weights for all buckets (sized for the largest rows value). */
int gqmm__problem_init(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__tune_opts *o,
                       gqmm__tune_problem *p);
/* Routing and activations for `rows` per expert. */
int gqmm__problem_set_rows(gqmm_ctx *ctx, const gqmm__tune_opts *o, int rows,
                           gqmm__tune_problem *p);
/* Point the call at copy i (mod copies). */
void gqmm__problem_use_copy(gqmm__tune_problem *p, int i);
/* Fill the output with NaN (so an unwritten output shows), or read it back. */
int gqmm__problem_poison(gqmm_ctx *ctx, gqmm__tune_problem *p);
int gqmm__problem_read_out(gqmm_ctx *ctx, gqmm__tune_problem *p, void *host);
void gqmm__problem_free(gqmm_ctx *ctx, gqmm__tune_problem *p);

#endif
