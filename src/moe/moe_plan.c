/*
 * moe_plan.c - the routing plan: (token, slot) pairs grouped by expert.
 *
 * A counting sort (count, exclusive prefix sum, scatter in ascending pair
 * order) is O(tokens * top_k), stable, and leaves no expert out: experts with
 * no rows get an empty range, so the GEMMs can walk offsets blindly.
 */
#include "moe.h"

#include <stdlib.h>

void gqmm__moe_plan_free(gqmm__moe_plan *plan) {
  free(plan->offsets);
  free(plan->row_pair);
  free(plan->pair_row);
  free(plan->row_expert);
  plan->offsets = plan->row_pair = plan->pair_row = plan->row_expert = NULL;
}

int gqmm__moe_plan_build(gqmm_ctx *ctx, const int32_t *ids, int64_t tokens, int64_t top_k,
                         int64_t experts, gqmm__moe_plan *plan) {
  plan->offsets = plan->row_pair = plan->pair_row = plan->row_expert = NULL;
  if (tokens < 0 || top_k < 1 || experts < 1)
    return gqmm__fail(ctx, GQMM_ERR_ARG,
                      "routing plan: tokens %lld, top_k %lld, experts %lld (need >= 0, >= 1, >= 1)",
                      (long long)tokens, (long long)top_k, (long long)experts);
  const int64_t rows = tokens * top_k;
  plan->experts = experts;
  plan->rows = rows;
  const size_t nr = (size_t)(rows > 0 ? rows : 1);
  plan->offsets = calloc((size_t)experts + 1, sizeof(int64_t));
  plan->row_pair = malloc(nr * sizeof(int64_t));
  plan->pair_row = malloc(nr * sizeof(int64_t));
  plan->row_expert = malloc(nr * sizeof(int64_t));
  if (!plan->offsets || !plan->row_pair || !plan->pair_row || !plan->row_expert) {
    gqmm__moe_plan_free(plan);
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "routing plan: cannot allocate %lld rows",
                      (long long)rows);
  }
  /* offsets[e + 1] counts expert e, so the prefix sum lands in place. */
  for (int64_t p = 0; p < rows; p++) {
    const int32_t e = ids[p];
    if (e < 0 || e >= experts) {
      gqmm__moe_plan_free(plan);
      return gqmm__fail(ctx, GQMM_ERR_INDEX,
                        "expert_ids: element [%lld, %lld] is %d, outside [0, %lld)",
                        (long long)(p / top_k), (long long)(p % top_k), (int)e, (long long)experts);
    }
    plan->offsets[e + 1]++;
  }
  for (int64_t e = 0; e < experts; e++) plan->offsets[e + 1] += plan->offsets[e];
  /* One cursor per expert walks its range; pairs are visited in ascending p,
   * which is what makes the sort stable. */
  int64_t *cursor = malloc((size_t)experts * sizeof(int64_t));
  if (!cursor) {
    gqmm__moe_plan_free(plan);
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "routing plan: cannot allocate %lld cursors",
                      (long long)experts);
  }
  for (int64_t e = 0; e < experts; e++) cursor[e] = plan->offsets[e];
  for (int64_t p = 0; p < rows; p++) {
    const int64_t r = cursor[ids[p]]++;
    plan->row_pair[r] = p;
    plan->pair_row[p] = r;
    plan->row_expert[r] = ids[p];
  }
  free(cursor);
  return GQMM_OK;
}
