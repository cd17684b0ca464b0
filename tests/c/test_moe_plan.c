/* test_moe_plan.c - the routing plan (counting sort of (token, slot) pairs by expert). */
#include "../../src/moe/moe.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

/* Checks every invariant of a plan against the ids it came from. */
static int plan_is_valid(const gqmm__moe_plan *p, const int32_t *ids, int64_t rows, int64_t E) {
  if (p->rows != rows || p->offsets[0] != 0 || p->offsets[E] != rows) return 0;
  for (int64_t e = 0; e < E; e++) {
    int64_t count = 0;
    for (int64_t q = 0; q < rows; q++) count += ids[q] == e;
    if (p->offsets[e + 1] - p->offsets[e] != count) return 0;
    for (int64_t r = p->offsets[e]; r < p->offsets[e + 1]; r++) {
      if (p->row_expert[r] != e || ids[p->row_pair[r]] != e) return 0;
      if (r > p->offsets[e] && p->row_pair[r] <= p->row_pair[r - 1]) return 0; /* stable */
    }
  }
  for (int64_t q = 0; q < rows; q++)
    if (p->row_pair[p->pair_row[q]] != q) return 0; /* inverse */
  return 1;
}

GQMM_TEST(plan_random_skewed_and_empty_experts) {
  test_rng rng = test_rng_make(501);
  const int64_t shapes[][3] = {{256, 8, 128}, {37, 3, 11}, {1, 1, 1}, {5, 4, 64}, {0, 2, 4}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    const int64_t T = shapes[s][0], k = shapes[s][1], E = shapes[s][2], R = T * k;
    int32_t *ids = malloc((size_t)(R + 1) * sizeof(int32_t));
    CHECK(ids);
    /* skewed: half the pairs go to the first quarter of the experts, and the
     * last expert never appears (when E > 1), so empty ranges are exercised */
    for (int64_t q = 0; q < R; q++) {
      uint32_t u = test_rng_u32(&rng);
      int64_t span = E > 1 ? E - 1 : 1;
      ids[q] = (int32_t)((u & 1) ? (u >> 1) % ((span + 3) / 4) : (u >> 1) % span);
    }
    gqmm__moe_plan p;
    CHECK_OK(gqmm__moe_plan_build(NULL, ids, T, k, E, &p));
    int ok = plan_is_valid(&p, ids, R, E);
    if (E > 1) ok = ok && p.offsets[E] == p.offsets[E - 1];
    gqmm__moe_plan_free(&p);
    free(ids);
    CHECK_MSG(ok, "shape %zu", s);
  }
}

GQMM_TEST(plan_all_rows_on_one_expert) {
  const int64_t T = 50, k = 4, E = 16, R = T * k;
  int32_t ids[200];
  for (int64_t q = 0; q < R; q++) ids[q] = 9;
  gqmm__moe_plan p;
  CHECK_OK(gqmm__moe_plan_build(NULL, ids, T, k, E, &p));
  int ok = plan_is_valid(&p, ids, R, E) && p.offsets[9] == 0 && p.offsets[10] == R;
  for (int64_t r = 0; r < R; r++) ok = ok && p.row_pair[r] == r; /* stable = identity */
  gqmm__moe_plan_free(&p);
  CHECK(ok);
}

GQMM_TEST(plan_rejects_ids_out_of_range) {
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  int32_t ids[6] = {0, 1, 2, 3, 4, 3};
  gqmm__moe_plan p;
  CHECK(gqmm__moe_plan_build(ctx, ids, 3, 2, 4, &p) == GQMM_ERR_INDEX);
  CHECK(p.offsets == NULL && p.row_pair == NULL);
  CHECK(strstr(gqmm_last_error(ctx), "expert_ids") && strstr(gqmm_last_error(ctx), "[2, 0]"));
  ids[4] = -1;
  CHECK(gqmm__moe_plan_build(ctx, ids, 3, 2, 4, &p) == GQMM_ERR_INDEX);
  CHECK(gqmm__moe_plan_build(ctx, ids, 3, 0, 4, &p) == GQMM_ERR_ARG);
  gqmm_ctx_destroy(ctx);
}
