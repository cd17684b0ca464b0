/*
 * moe_router.c - router logits -> top-k expert ids and weights, with the
 * semantics of mlx-lm's MoE blocks:
 *   softmax_topk       gates = softmax(logits, precise); keep the k largest
 *   softmax_topk_norm  the same, then scores / sum(scores) (Qwen3 norm_topk_prob)
 *   topk_softmax       keep the k largest logits; softmax over those k (Mixtral)
 * Softmax runs in float32 and is rounded to the logits' dtype, as
 * mx.softmax(..., precise=True) returns it; selection then compares those
 * rounded values (mlx's argpartition sees the same numbers).
 */
#include "moe.h"

#include <math.h>
#include <stdlib.h>

static float round_to(float v, gqmm_dtype t) {
  if (t == GQMM_BF16) return gqmm_bf16_to_f32(gqmm_f32_to_bf16(v));
  if (t == GQMM_F16) return gqmm_f16_to_f32(gqmm_f32_to_f16(v));
  return v;
}

/* Indices of the k largest of v[0..E) into ids, descending, ties to the
 * lower index; NaN ranks below every number. O(E*k): k is small. */
static void top_k(const float *v, int64_t E, int k, int32_t *ids) {
  for (int j = 0; j < k; j++) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++) {
      bool taken = false;
      for (int i = 0; i < j && !taken; i++) taken = ids[i] == e;
      if (taken) continue;
      if (best < 0 || v[e] > v[best] || (isnan(v[best]) && !isnan(v[e]))) best = e;
    }
    ids[j] = (int32_t)best;
  }
}

/* p[i] = softmax of v[0..n) in float32, each rounded to t. */
static void softmax(const float *v, int64_t n, gqmm_dtype t, float *p) {
  float m = -INFINITY, sum = 0.0f;
  for (int64_t i = 0; i < n; i++) m = v[i] > m ? v[i] : m;
  for (int64_t i = 0; i < n; i++) sum += (p[i] = expf(v[i] - m));
  for (int64_t i = 0; i < n; i++) p[i] = round_to(p[i] / sum, t);
}

int gqmm_router_topk(gqmm_ctx *ctx, const gqmm_tensor *logits, int k, gqmm_router_mode mode,
                     gqmm_tensor *expert_ids, gqmm_tensor *expert_weights) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  int st = gqmm__check_tensor(ctx, logits, "logits");
  if (st) return st;
  if (!gqmm__is_float(logits->dtype))
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "logits: dtype is %s, expected a float type",
                      gqmm_dtype_name(logits->dtype));
  if (logits->ndim != 2)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "logits: must be [tokens, experts], got %d dims",
                      logits->ndim);
  if (logits->device != GQMM_DEVICE_CPU)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED, "logits: router_topk runs on CPU tensors only");
  const int64_t T = logits->shape[0], E = logits->shape[1];
  if (k < 1 || k > E)
    return gqmm__fail(ctx, GQMM_ERR_ARG, "k: %d is outside [1, experts=%lld]", k, (long long)E);
  if (mode != GQMM_ROUTER_SOFTMAX_TOPK && mode != GQMM_ROUTER_SOFTMAX_TOPK_NORM &&
      mode != GQMM_ROUTER_TOPK_SOFTMAX)
    return gqmm__fail(ctx, GQMM_ERR_ARG, "mode: %d is not a gqmm_router_mode", (int)mode);
  const int64_t oshape[2] = {T, k};
  if ((st = gqmm__check_output(ctx, expert_ids, GQMM_I32, 2, oshape, "expert_ids")) ||
      (st = gqmm__check_output(ctx, expert_weights, logits->dtype, 2, oshape, "expert_weights")))
    return st;
  if ((st = gqmm__check_same_device(ctx, expert_ids, "expert_ids", GQMM_DEVICE_CPU)) ||
      (st = gqmm__check_same_device(ctx, expert_weights, "expert_weights", GQMM_DEVICE_CPU)) ||
      (st = gqmm__check_no_overlap(ctx, expert_ids, "expert_ids", logits, "logits")) ||
      (st = gqmm__check_no_overlap(ctx, expert_weights, "expert_weights", logits, "logits")) ||
      (st = gqmm__check_no_overlap(ctx, expert_weights, "expert_weights", expert_ids,
                                   "expert_ids")))
    return st;
  /* v: the token's logits; p: probabilities; w: the k kept weights (k <= E). */
  const size_t n = (size_t)(E > 0 ? E : 1);
  float *v = malloc(n * sizeof(float)), *p = malloc(n * sizeof(float)),
        *w = malloc(n * sizeof(float));
  if (!v || !p || !w) {
    free(v);
    free(p);
    free(w);
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "router_topk: cannot allocate %lld floats",
                      (long long)E);
  }
  const gqmm_dtype dt = logits->dtype;
  for (int64_t t = 0; t < T; t++) {
    gqmm__convert(v, GQMM_F32, (const char *)logits->data + (size_t)(t * E) * gqmm_dtype_size(dt),
                  dt, E);
    int32_t *row = (int32_t *)expert_ids->data + t * k;
    if (mode == GQMM_ROUTER_TOPK_SOFTMAX) {
      top_k(v, E, k, row);
      for (int j = 0; j < k; j++) p[j] = v[row[j]];
      softmax(p, k, dt, w);
    } else {
      softmax(v, E, dt, p);
      top_k(p, E, k, row);
      float sum = 0.0f;
      for (int j = 0; j < k; j++) sum += (w[j] = p[row[j]]);
      if (mode == GQMM_ROUTER_SOFTMAX_TOPK_NORM)
        for (int j = 0; j < k; j++) w[j] = round_to(w[j] / sum, dt);
    }
    for (int j = 0; j < k; j++) gqmm__store_f(expert_weights->data, dt, t * k + j, w[j]);
  }
  free(w);
  free(v);
  free(p);
  return GQMM_OK;
}
