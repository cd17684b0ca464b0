/* test_moe_router.c - router top-k against a float64 computation of the three modes. */
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Expected ids and weights for one token in double: rank by the value the
 * mode selects on (probabilities rounded to dt, or logits), ties to the lower id. */
static void expect(const double *logit, int E, int k, gqmm_router_mode mode, gqmm_dtype dt,
                   int *ids, double *w) {
  double *p = malloc((size_t)E * sizeof(double)), m = -INFINITY, sum = 0;
  for (int e = 0; e < E; e++) m = fmax(m, logit[e]);
  for (int e = 0; e < E; e++) sum += exp(logit[e] - m);
  for (int e = 0; e < E; e++) {
    double v = exp(logit[e] - m) / sum;
    p[e] = dt == GQMM_BF16 ? gqmm_bf16_to_f32(gqmm_f32_to_bf16((float)v)) : v;
  }
  const double *key = mode == GQMM_ROUTER_TOPK_SOFTMAX ? logit : p;
  for (int j = 0; j < k; j++) {
    int best = -1;
    for (int e = 0; e < E; e++) {
      int used = 0;
      for (int i = 0; i < j; i++) used |= ids[i] == e;
      if (!used && (best < 0 || key[e] > key[best])) best = e;
    }
    ids[j] = best;
  }
  double s = 0, mk = -INFINITY;
  for (int j = 0; j < k; j++) s += p[ids[j]], mk = fmax(mk, logit[ids[j]]);
  double sk = 0;
  for (int j = 0; j < k; j++) sk += exp(logit[ids[j]] - mk);
  for (int j = 0; j < k; j++)
    w[j] = mode == GQMM_ROUTER_SOFTMAX_TOPK        ? p[ids[j]]
           : mode == GQMM_ROUTER_SOFTMAX_TOPK_NORM ? p[ids[j]] / s
                                                    : exp(logit[ids[j]] - mk) / sk;
  free(p);
}

GQMM_TEST(router_topk_matches_float64_every_mode) {
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  test_rng r = test_rng_make(701);
  enum { T = 33, E = 40, K = 6 };
  const gqmm_dtype dts[] = {GQMM_F32, GQMM_BF16};
  int ok = 1;
  for (int di = 0; di < 2 && ok; di++)
    for (int mode = 0; mode < 3 && ok; mode++) {
      const gqmm_dtype dt = dts[di];
      float lf[T * E];
      uint16_t lh[T * E], wh[T * K];
      float wf[T * K];
      int32_t ids[T * K];
      /* distinct logits spread wide enough that bf16 keeps them apart */
      for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
          float v = (float)((e * 7 + t * 3) % E) * 0.25f + 0.01f * test_rng_normal(&r);
          lf[t * E + e] = dt == GQMM_F32 ? v : gqmm_bf16_to_f32(lh[t * E + e] = gqmm_f32_to_bf16(v));
        }
      const int64_t ls[2] = {T, E}, os[2] = {T, K};
      gqmm_tensor tl = gqmm_tensor_make(dt == GQMM_F32 ? (void *)lf : (void *)lh, dt, 2, ls);
      gqmm_tensor ti = gqmm_tensor_make(ids, GQMM_I32, 2, os);
      gqmm_tensor tw = gqmm_tensor_make(dt == GQMM_F32 ? (void *)wf : (void *)wh, dt, 2, os);
      test_poison(tw.data, dt, T * K);
      CHECK_OK(gqmm_router_topk(ctx, &tl, K, (gqmm_router_mode)mode, &ti, &tw));
      for (int t = 0; t < T && ok; t++) {
        double lg[E], w[K];
        int want[K];
        for (int e = 0; e < E; e++) lg[e] = lf[t * E + e];
        expect(lg, E, K, (gqmm_router_mode)mode, dt, want, w);
        for (int j = 0; j < K && ok; j++) {
          double got = dt == GQMM_F32 ? wf[t * K + j] : gqmm_bf16_to_f32(wh[t * K + j]);
          double tol = dt == GQMM_F32 ? 1e-6 : 8e-3;
          if (ids[t * K + j] != want[j] || !(fabs(got - w[j]) <= tol * fabs(w[j]) + 1e-7)) {
            fprintf(stderr, "  dt %d mode %d token %d slot %d: id %d want %d, w %g want %g\n", di,
                    mode, t, j, ids[t * K + j], want[j], got, w[j]);
            ok = 0;
          }
        }
      }
    }
  gqmm_ctx_destroy(ctx);
  CHECK(ok);
}

GQMM_TEST(router_topk_ties_and_errors) {
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  float lf[2 * 4] = {1, 3, 3, 0, 2, 2, 2, 2};
  int32_t ids[2 * 2];
  float w[2 * 2];
  const int64_t ls[2] = {2, 4}, os[2] = {2, 2};
  gqmm_tensor tl = gqmm_tensor_make(lf, GQMM_F32, 2, ls);
  gqmm_tensor ti = gqmm_tensor_make(ids, GQMM_I32, 2, os), tw = gqmm_tensor_make(w, GQMM_F32, 2, os);
  CHECK_OK(gqmm_router_topk(ctx, &tl, 2, GQMM_ROUTER_TOPK_SOFTMAX, &ti, &tw));
  CHECK(ids[0] == 1 && ids[1] == 2 && ids[2] == 0 && ids[3] == 1); /* ties: lower id first */
  CHECK(w[0] == 0.5f && w[1] == 0.5f);
  CHECK(gqmm_router_topk(ctx, &tl, 5, GQMM_ROUTER_SOFTMAX_TOPK, &ti, &tw) == GQMM_ERR_ARG);
  CHECK(strstr(gqmm_last_error(ctx), "k:"));
  CHECK(gqmm_router_topk(ctx, &tl, 2, (gqmm_router_mode)9, &ti, &tw) == GQMM_ERR_ARG);
  gqmm_tensor tw16 = tw;
  tw16.dtype = GQMM_BF16;
  CHECK(gqmm_router_topk(ctx, &tl, 2, GQMM_ROUTER_SOFTMAX_TOPK, &ti, &tw16) == GQMM_ERR_OUTPUT);
  CHECK(strstr(gqmm_last_error(ctx), "expert_weights"));
  gqmm_ctx_destroy(ctx);
}
