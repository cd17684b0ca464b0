/*
 * moe_compose.c - the MoE expert layer built from a backend's gathered qmm,
 * for backends without a fused moe_forward (the CPU ones).
 *
 * Rows are the (token, slot) pairs sorted by expert (moe_plan.c). Each GEMM is
 * one gqmm__qmm_args with M = 1 per entry and a non-decreasing w_index, the
 * shape of mlx-lm's sorted SwitchGLU path, so a backend streams each expert's
 * weights once for all of its rows. gate_up reads x in place through
 * x_index (no gather copy); the activation, down and the combine follow. The
 * k slots of a token are summed in float32 in ascending slot order: the
 * result does not depend on threads or schedule.
 */
#include "moe.h"

#include <math.h>
#include <stdlib.h>
#include <time.h>

double gqmm__moe_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

float gqmm__moe_act(gqmm__activation act, float gate, float up) {
  if (act == GQMM__ACT_GEGLU) {
    /* gelu, tanh approximation (mlx.nn.gelu_approx, Gemma's gelu_pytorch_tanh) */
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    float g = 0.5f * gate * (1.0f + tanhf(c * (gate + 0.044715f * gate * gate * gate)));
    return g * up;
  }
  return gate / (1.0f + expf(-gate)) * up; /* silu(gate) * up */
}

/* One gathered GEMM over the plan's rows: out[r] = x[x_index[r]] @ W[e_r]^T. */
static int gathered_qmm(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__moe_args *a,
                        const void *x, int64_t x_batches, const int64_t *x_index, int64_t K,
                        const uint32_t *w, const void *s, const void *b, int64_t N,
                        const gqmm__moe_plan *plan, void *out) {
  gqmm__qmm_args q = {
      .dtype = a->dtype,
      .q = a->q,
      .transpose = 1,
      .device = a->device,
      .M = 1,
      .N = N,
      .K = K,
      .batch = plan->rows,
      .x_batches = x_batches,
      .w_batches = a->experts,
      .x = x,
      .w = w,
      .scales = s,
      .biases = b,
      .out = out,
      .x_index = x_index,
      .w_index = plan->row_expert,
      .w_sorted = true,
  };
  return be->qmm(ctx, &q);
}

int gqmm__moe_compose(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__moe_args *a,
                      gqmm__moe_phases *phases) {
  if (a->device != GQMM_DEVICE_CPU)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "moe_forward: backend %s has no fused MoE layer for device tensors, and "
                      "composing one needs device elementwise kernels it lacks",
                      be->name);
  const int64_t T = a->tokens, k = a->top_k, H = a->hidden, I = a->inter, R = T * k;
  const size_t esz = gqmm_dtype_size(a->dtype);
  const bool fused = a->gu_expert_rows == 2 * I;
  gqmm__moe_phases ph = {0};
  double t0 = gqmm__moe_now();
  gqmm__moe_plan plan;
  int st = gqmm__moe_plan_build(ctx, a->expert_ids_host, T, k, a->experts, &plan);
  if (st) return st;
  const size_t nr = (size_t)(R > 0 ? R : 1);
  int64_t *token_of_row = malloc(nr * sizeof(int64_t));
  int64_t *row_id = malloc(nr * sizeof(int64_t));
  char *gu = malloc(nr * (size_t)(2 * I) * esz); /* [R, 2I]: gate | up, or [R, I] twice */
  char *h = malloc(nr * (size_t)I * esz);
  char *y = malloc(nr * (size_t)H * esz);
  const size_t wide = (size_t)(H > I ? H : I);
  float *fa = malloc(wide * sizeof(float)), *fb = malloc(wide * sizeof(float)); /* row scratch */
  if (!token_of_row || !row_id || !gu || !h || !y || !fa || !fb) {
    st = gqmm__fail(ctx, GQMM_ERR_NOMEM, "moe_forward: cannot allocate work buffers for %lld rows",
                    (long long)R);
    goto done;
  }
  for (int64_t r = 0; r < R; r++) {
    token_of_row[r] = plan.row_pair[r] / k;
    row_id[r] = r;
  }
  double t1 = gqmm__moe_now();
  ph.plan_s = t1 - t0;
  /* gate_up: fused weights give [R, 2I] rows (gate then up) in one pass. */
  if (fused) {
    st = gathered_qmm(ctx, be, a, a->x, T, token_of_row, H, a->gate_w, a->gate_s, a->gate_b,
                      2 * I, &plan, gu);
  } else {
    st = gathered_qmm(ctx, be, a, a->x, T, token_of_row, H, a->gate_w, a->gate_s, a->gate_b, I,
                      &plan, gu);
    if (!st)
      st = gathered_qmm(ctx, be, a, a->x, T, token_of_row, H, a->up_w, a->up_s, a->up_b, I,
                        &plan, gu + (size_t)(R * I) * esz);
  }
  if (st) goto done;
  double t2 = gqmm__moe_now();
  ph.gate_up_s = t2 - t1;
  /* Gate of row r at gu[r*gs], up at gu[r*gs + uo]; rows go through float32. */
  const int64_t gs = fused ? 2 * I : I, uo = fused ? I : R * I;
  for (int64_t r = 0; r < R; r++) {
    gqmm__convert(fa, GQMM_F32, gu + (size_t)(r * gs) * esz, a->dtype, I);
    gqmm__convert(fb, GQMM_F32, gu + (size_t)(r * gs + uo) * esz, a->dtype, I);
    for (int64_t i = 0; i < I; i++) fa[i] = gqmm__moe_act(a->act, fa[i], fb[i]);
    gqmm__convert(h + (size_t)(r * I) * esz, a->dtype, fa, GQMM_F32, I);
  }
  double t3 = gqmm__moe_now();
  ph.act_s = t3 - t2;
  st = gathered_qmm(ctx, be, a, h, R, row_id, I, a->down_w, a->down_s, a->down_b, H, &plan, y);
  if (st) goto done;
  double t4 = gqmm__moe_now();
  ph.down_s = t4 - t3;
  /* acc (fa) sums the token's slots in ascending j, one float32 add each. */
  for (int64_t t = 0; t < T; t++) {
    for (int64_t n = 0; n < H; n++) fa[n] = 0.0f;
    for (int64_t j = 0; j < k; j++) {
      const int64_t p = t * k + j;
      const float wt = gqmm__load_f(a->expert_weights, a->dtype, p);
      gqmm__convert(fb, GQMM_F32, y + (size_t)(plan.pair_row[p] * H) * esz, a->dtype, H);
      for (int64_t n = 0; n < H; n++) fa[n] += wt * fb[n];
    }
    gqmm__convert((char *)a->out + (size_t)(t * H) * esz, a->dtype, fa, GQMM_F32, H);
  }
  ph.combine_s = gqmm__moe_now() - t4;
  if (phases) *phases = ph;
done:
  free(token_of_row);
  free(row_id);
  free(gu);
  free(h);
  free(y);
  free(fa);
  free(fb);
  gqmm__moe_plan_free(&plan);
  return st;
}
