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

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x within ~1 ulp, in branch-free float arithmetic the compiler
 * vectorizes (expf is a library call per element: the seed layer's
 * activation took 3.0 of 80.6 ms a layer on the AVX-512 EPYC): x = n ln2 +
 * r with |r| <= ln2 / 2 (n rounded by the 1.5 * 2^23 trick, ln2 in two
 * parts), e^r by its Taylor polynomial to r^7 (remainder < 6e-9), 2^n
 * through the exponent bits. x is clamped to [-87, 88], where e^x is a
 * normal float; the activations below saturate well inside that (e^88 in
 * a denominator reads as infinity, e^-87 as zero). NaN passes through. */
static inline float clamp_bits(float x, float lo, float hi) { /* select by masks, no branch */
  uint32_t xb, lb, hb;
  memcpy(&xb, &x, 4), memcpy(&lb, &lo, 4), memcpy(&hb, &hi, 4);
  const uint32_t above = 0u - (uint32_t)(x > hi), below = 0u - (uint32_t)(x < lo);
  xb = (xb & ~(above | below)) | (hb & above) | (lb & below);
  memcpy(&x, &xb, 4);
  return x;
}
static inline float exp_vec(float x) {
  x = clamp_bits(x, -87.0f, 88.0f); /* NaN stays NaN */
  const float t = x * 1.4426950408889634f + 12582912.0f, n = t - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.4286068203094172e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t tb, sb;
  memcpy(&tb, &t, 4);
  sb = (tb - 0x4b400000u + 127u) << 23; /* n + 127 in the exponent field */
  float scale;
  memcpy(&scale, &sb, 4);
  return p * scale;
}

/* gelu, tanh approximation (mlx.nn.gelu_approx, Gemma's gelu_pytorch_tanh),
 * times up. 1 + tanh(z) = 2 - 2 / (exp(2z) + 1): one exp instead of tanhf,
 * and exact at both saturations (exp large gives 2, exp -> 0 gives 0). */
static inline float geglu(float gate, float up) {
  const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
  const float z = c * (gate + 0.044715f * gate * gate * gate);
  return 0.5f * gate * (2.0f - 2.0f / (exp_vec(2.0f * z) + 1.0f)) * up;
}
static inline float swiglu(float gate, float up) {
  return gate / (1.0f + exp_vec(-gate)) * up; /* silu(gate) * up */
}

float gqmm__moe_act(gqmm__activation act, float gate, float up) {
  return act == GQMM__ACT_GEGLU ? geglu(gate, up) : swiglu(gate, up);
}

/* One gathered GEMM over the plan's rows: out[r] = x[x_index[r]] @ W[e_r]^T,
 * through the gqmm_pack copy pk where it is this backend's (the CPU's
 * layout keeps the rows' order, so a gqmm_pack_glu copy gives gate | up). */
static int gathered_qmm(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__moe_args *a,
                        const void *x, int64_t x_batches, const int64_t *x_index, int64_t K,
                        const uint32_t *w, const void *s, const void *b, const gqmm_packed *pk,
                        int64_t N, const gqmm__moe_plan *plan, void *out) {
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
      .packed = pk && pk->be == be ? pk : NULL,
  };
  return be->qmm(ctx, &q);
}

/* The elementwise steps, row-parallel; rows go through float32 in chunks. */
typedef struct {
  const gqmm__moe_args *a;
  const gqmm__moe_plan *plan;
  const char *gu; /* gate_up output; gate of row r at r*gs, its up at r*gs + uo */
  int64_t gs, uo;
  char *h;       /* activation output [R, I] */
  const char *y; /* down output [R, H] */
} layer_job;

#define CHUNK 512 /* floats per stack buffer */

/* The elementwise loops in 16-lane AVX-512 where the CPU has it, picked at
 * load time (ifunc): the same IEEE operations in the same order (no FMA
 * contraction under -std=c11), so the same bits as the baseline build. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define GQMM_ELEMENTWISE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GQMM_ELEMENTWISE_CLONES
#endif

GQMM_ELEMENTWISE_CLONES static void act_rows(void *arg, int64_t begin, int64_t end) {
  const layer_job *j = arg;
  const gqmm_dtype dt = j->a->dtype;
  const size_t esz = gqmm_dtype_size(dt);
  const int64_t I = j->a->inter;
  float g[CHUNK], u[CHUNK];
  for (int64_t r = begin; r < end; r++)
    for (int64_t c = 0; c < I; c += CHUNK) {
      const int64_t n = I - c < CHUNK ? I - c : CHUNK;
      gqmm__convert(g, GQMM_F32, j->gu + (size_t)(r * j->gs + c) * esz, dt, n);
      gqmm__convert(u, GQMM_F32, j->gu + (size_t)(r * j->gs + j->uo + c) * esz, dt, n);
      if (j->a->act == GQMM__ACT_GEGLU) /* one loop per activation: they vectorize */
        for (int64_t i = 0; i < n; i++)
          g[i] = geglu(g[i], u[i]);
      else
        for (int64_t i = 0; i < n; i++)
          g[i] = swiglu(g[i], u[i]);
      gqmm__convert(j->h + (size_t)(r * I + c) * esz, dt, g, GQMM_F32, n);
    }
}

/* out[t] = sum over slots in ascending order, one float32 add each: the
 * order, not the thread, fixes the bits. */
GQMM_ELEMENTWISE_CLONES static void combine_rows(void *arg, int64_t begin, int64_t end) {
  const layer_job *j = arg;
  const gqmm__moe_args *a = j->a;
  const size_t esz = gqmm_dtype_size(a->dtype);
  const int64_t H = a->hidden, k = a->top_k;
  float acc[CHUNK], y[CHUNK];
  for (int64_t t = begin; t < end; t++)
    for (int64_t c = 0; c < H; c += CHUNK) {
      const int64_t n = H - c < CHUNK ? H - c : CHUNK;
      for (int64_t i = 0; i < n; i++) acc[i] = 0.0f;
      for (int64_t s = 0; s < k; s++) {
        const int64_t p = t * k + s;
        const float wt = gqmm__load_f(a->expert_weights, a->dtype, p);
        gqmm__convert(y, GQMM_F32, j->y + (size_t)(j->plan->pair_row[p] * H + c) * esz, a->dtype, n);
        for (int64_t i = 0; i < n; i++) acc[i] += wt * y[i];
      }
      gqmm__convert((char *)a->out + (size_t)(t * H + c) * esz, a->dtype, acc, GQMM_F32, n);
    }
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
  double t0 = gqmm__now_s();
  gqmm__moe_plan plan;
  int st = gqmm__moe_plan_build(ctx, a->expert_ids_host, T, k, a->experts, &plan);
  if (st) return st;
  /* the work buffers, 64-byte aligned parts of the context's moe_buf:
   * token_of_row, row_id [R]; gu [R, 2I] (gate | up, or [R, I] twice); h [R, I]; y [R, H] */
  const size_t nr = (size_t)(R > 0 ? R : 1);
  const size_t part[5] = {nr * sizeof(int64_t), nr * sizeof(int64_t), nr * (size_t)(2 * I) * esz,
                          nr * (size_t)I * esz, nr * (size_t)H * esz};
  size_t off[5], need = 0;
  for (int i = 0; i < 5; i++)
    off[i] = need, need += (part[i] + 63) & ~(size_t)63;
  if (gqmm__reserve(&ctx->moe_buf, &ctx->moe_cap, need)) {
    st = gqmm__fail(ctx, GQMM_ERR_NOMEM, "moe_forward: cannot allocate work buffers for %lld rows",
                    (long long)R);
    goto done;
  }
  char *buf = ctx->moe_buf;
  int64_t *token_of_row = (int64_t *)(buf + off[0]), *row_id = (int64_t *)(buf + off[1]);
  char *gu = buf + off[2], *h = buf + off[3], *y = buf + off[4];
  for (int64_t r = 0; r < R; r++) {
    token_of_row[r] = plan.row_pair[r] / k;
    row_id[r] = r;
  }
  double t1 = gqmm__now_s();
  ph.plan_s = t1 - t0;
  /* gate_up: fused weights give [R, 2I] rows (gate then up) in one pass. */
  if (fused) {
    st = gathered_qmm(ctx, be, a, a->x, T, token_of_row, H, a->gate_w, a->gate_s, a->gate_b,
                      a->gate_pk, 2 * I, &plan, gu);
  } else {
    st = gathered_qmm(ctx, be, a, a->x, T, token_of_row, H, a->gate_w, a->gate_s, a->gate_b,
                      a->gate_pk, I, &plan, gu);
    if (!st)
      st = gathered_qmm(ctx, be, a, a->x, T, token_of_row, H, a->up_w, a->up_s, a->up_b, a->up_pk,
                        I, &plan, gu + (size_t)(R * I) * esz);
  }
  if (st) goto done;
  double t2 = gqmm__now_s();
  ph.gate_up_s = t2 - t1;
  /* Gate of row r at gu[r*gs], up at gu[r*gs + uo]. */
  layer_job job = {.a = a, .plan = &plan, .gu = gu, .gs = fused ? 2 * I : I,
                   .uo = fused ? I : R * I, .h = h, .y = y};
  gqmm__moe_parallel_rows(ctx, R, 16, act_rows, &job);
  double t3 = gqmm__now_s();
  ph.act_s = t3 - t2;
  st = gathered_qmm(ctx, be, a, h, R, row_id, I, a->down_w, a->down_s, a->down_b, a->down_pk, H,
                    &plan, y);
  if (st) goto done;
  double t4 = gqmm__now_s();
  ph.down_s = t4 - t3;
  gqmm__moe_parallel_rows(ctx, T, 4, combine_rows, &job);
  ph.combine_s = gqmm__now_s() - t4;
  if (phases) *phases = ph;
done:
  gqmm__moe_plan_free(&plan);
  return st;
}
