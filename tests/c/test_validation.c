/*
 * test_validation.c - bad input returns a status and a message naming the
 * argument, never a crash, and never touches the output. One case per class
 * of error; each starts from a valid gather_qmm problem and breaks one thing.
 */
#include "internal.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { E = 3, N = 16, K = 64, M = 2, B = 4, GS = 32, BITS = 4 };

/* A valid gather_qmm problem: x (B, M, K) f32, w (E, N, K*4/32), rhs (B,). */
typedef struct {
  float x[B * M * K];
  uint32_t w[E * N * K * BITS / 32];
  float scales[E * N * K / GS], biases[E * N * K / GS];
  int32_t rhs[B];
  uint32_t lhs[B];
  float out[B * M * N];
  gqmm_tensor tx, tw, ts, tb, tr, tl, to;
  gqmm_quant q;
  gqmm_ctx *ctx;
} problem;

/* (Re)build the valid problem; the context is kept across calls. */
static void problem_init(problem *p) {
  gqmm_ctx *ctx = p->ctx;
  memset(p, 0, sizeof *p);
  p->ctx = ctx;
  test_rng r = test_rng_make(77);
  test_fill(&r, p->x, GQMM_F32, B * M * K, 1.0f);
  for (size_t i = 0; i < sizeof p->w / 4; i++)
    p->w[i] = test_rng_u32(&r);
  test_fill(&r, p->scales, GQMM_F32, E * N * K / GS, 0.1f);
  test_fill(&r, p->biases, GQMM_F32, E * N * K / GS, 0.1f);
  for (int i = 0; i < B; i++)
    p->rhs[i] = (int32_t)(test_rng_u32(&r) % E);
  for (int i = 0; i < B; i++)
    p->lhs[i] = test_rng_u32(&r) % B;
  test_poison(p->out, GQMM_F32, B * M * N);
  p->tx = gqmm_tensor_make(p->x, GQMM_F32, 3, (int64_t[]){B, M, K});
  p->tw = gqmm_tensor_make(p->w, GQMM_U32, 3, (int64_t[]){E, N, K * BITS / 32});
  p->ts = gqmm_tensor_make(p->scales, GQMM_F32, 3, (int64_t[]){E, N, K / GS});
  p->tb = gqmm_tensor_make(p->biases, GQMM_F32, 3, (int64_t[]){E, N, K / GS});
  p->tr = gqmm_tensor_make(p->rhs, GQMM_I32, 1, (int64_t[]){B});
  p->tl = gqmm_tensor_make(p->lhs, GQMM_U32, 1, (int64_t[]){B});
  p->to = gqmm_tensor_make(p->out, GQMM_F32, 3, (int64_t[]){B, M, N});
  p->q = (gqmm_quant){BITS, GS};
  if (!p->ctx) gqmm_ctx_create(&p->ctx, NULL);
}

static int run(problem *p) {
  return gqmm_gather_qmm(p->ctx, &p->tx, &p->tw, &p->ts, &p->tb, &p->tl, &p->tr, 1, p->q, 0,
                         &p->to);
}

/* The call failed with `want`, its message names `arg`, the output is untouched. */
#define EXPECT_FAIL(p, st, want, arg)                                                     \
  do {                                                                                    \
    int st__ = (st);                                                                      \
    const char *msg__ = gqmm_last_error((p)->ctx);                                        \
    CHECK_MSG(st__ == (want), "%s: got %s, want %s (%s)", #st, gqmm_status_name(st__),    \
              gqmm_status_name(want), msg__);                                             \
    CHECK_MSG(strstr(msg__, arg) != NULL, "message '%s' does not name '%s'", msg__, arg); \
    for (int i__ = 0; i__ < B * M * N; i__++)                                             \
      CHECK_MSG(isnan((p)->out[i__]), "out written");                                     \
  } while (0)

#define WITH_PROBLEM(p)                                 \
  problem p##_storage, *p = &p##_storage;               \
  p->ctx = NULL;                                        \
  problem_init(p);                                      \
  CHECK(p->ctx != NULL);                                \
  CHECK_OK(run(p)); /* the unbroken problem is valid */ \
  test_poison(p->out, GQMM_F32, B *M *N)

GQMM_TEST(null_pointers) {
  WITH_PROBLEM(p);
  CHECK(gqmm_gather_qmm(NULL, &p->tx, &p->tw, &p->ts, &p->tb, NULL, &p->tr, 1, p->q, 0, &p->to) ==
        GQMM_ERR_NULL);
  EXPECT_FAIL(
      p, gqmm_gather_qmm(p->ctx, NULL, &p->tw, &p->ts, &p->tb, NULL, &p->tr, 1, p->q, 0, &p->to),
      GQMM_ERR_NULL, "x");
  EXPECT_FAIL(
      p, gqmm_gather_qmm(p->ctx, &p->tx, &p->tw, &p->ts, NULL, NULL, &p->tr, 1, p->q, 0, &p->to),
      GQMM_ERR_NULL, "biases");
  EXPECT_FAIL(
      p, gqmm_gather_qmm(p->ctx, &p->tx, &p->tw, &p->ts, &p->tb, NULL, &p->tr, 1, p->q, 0, NULL),
      GQMM_ERR_NULL, "out");
  p->tw.data = NULL;
  EXPECT_FAIL(p, run(p), GQMM_ERR_NULL, "w: data pointer");
  CHECK(gqmm_ctx_create(NULL, NULL) == GQMM_ERR_NULL);
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(wrong_ndim) {
  WITH_PROBLEM(p);
  p->tw = gqmm_tensor_make(p->w, GQMM_U32, 1, (int64_t[]){E * N * K * BITS / 32});
  EXPECT_FAIL(p, run(p), GQMM_ERR_NDIM, "w");
  problem_init(p);
  p->tx.ndim = 9;
  EXPECT_FAIL(p, run(p), GQMM_ERR_NDIM, "x");
  problem_init(p);
  p->tx = gqmm_tensor_make(p->x, GQMM_F32, 1, (int64_t[]){K});
  EXPECT_FAIL(p, run(p), GQMM_ERR_NDIM, "x");
  gqmm_tensor w1 = gqmm_tensor_make(p->x, GQMM_F32, 1, (int64_t[]){K});
  gqmm_tensor o = p->to;
  EXPECT_FAIL(p, gqmm_quantize(p->ctx, &w1, p->q, &o, &o, &o), GQMM_ERR_NDIM, "w");
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(wrong_shapes) {
  WITH_PROBLEM(p);
  p->tx.shape[2] = K / 2; /* x's K disagrees with w */
  p->tx.strides[1] = K / 2;
  p->tx.strides[0] = M * K / 2;
  EXPECT_FAIL(p, run(p), GQMM_ERR_SHAPE, "x");
  problem_init(p);
  p->ts = gqmm_tensor_make(p->scales, GQMM_F32, 3, (int64_t[]){E, N - 1, K / GS});
  EXPECT_FAIL(p, run(p), GQMM_ERR_SHAPE, "scales");
  problem_init(p);
  p->tb = gqmm_tensor_make(p->biases, GQMM_F32, 2, (int64_t[]){E * N, K / GS});
  EXPECT_FAIL(p, run(p), GQMM_ERR_SHAPE, "biases");
  problem_init(p);
  p->tl = gqmm_tensor_make(p->lhs, GQMM_U32, 1, (int64_t[]){3}); /* 3 vs 4: no broadcast */
  EXPECT_FAIL(p, run(p), GQMM_ERR_SHAPE, "lhs_indices");
  problem_init(p);
  p->tx.shape[0] = -1;
  EXPECT_FAIL(p, run(p), GQMM_ERR_SHAPE, "x");
  /* quantized_matmul: batch dims that do not broadcast */
  problem_init(p);
  gqmm_tensor x2 = gqmm_tensor_make(p->x, GQMM_F32, 3, (int64_t[]){2, M, K});
  EXPECT_FAIL(p, gqmm_quantized_matmul(p->ctx, &x2, &p->tw, &p->ts, &p->tb, 1, p->q, &p->to),
              GQMM_ERR_SHAPE, "x batch");
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(k_not_a_multiple_of_group_size) {
  WITH_PROBLEM(p);
  /* quantize: 48 values per row with group 32 */
  gqmm_tensor w = gqmm_tensor_make(p->x, GQMM_F32, 2, (int64_t[]){2, 48});
  gqmm_tensor wq = gqmm_tensor_make(p->w, GQMM_U32, 2, (int64_t[]){2, 6});
  gqmm_tensor s = gqmm_tensor_make(p->scales, GQMM_F32, 2, (int64_t[]){2, 1});
  gqmm_tensor b = gqmm_tensor_make(p->biases, GQMM_F32, 2, (int64_t[]){2, 1});
  EXPECT_FAIL(p, gqmm_quantize(p->ctx, &w, p->q, &wq, &s, &b), GQMM_ERR_SHAPE, "w");
  /* matmul: packed rows of 6 words = 48 4-bit values */
  p->tw = gqmm_tensor_make(p->w, GQMM_U32, 3, (int64_t[]){E, N, 6});
  EXPECT_FAIL(p, run(p), GQMM_ERR_SHAPE, "w");
  /* dequantize: same */
  gqmm_tensor out = gqmm_tensor_make(p->out, GQMM_F32, 2, (int64_t[]){2, 48});
  EXPECT_FAIL(p, gqmm_dequantize(p->ctx, &wq, &s, &b, p->q, &out), GQMM_ERR_SHAPE, "wq");
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(unsupported_bits_group_size_dtype) {
  WITH_PROBLEM(p);
  p->q.bits = 7;
  EXPECT_FAIL(p, run(p), GQMM_ERR_BITS, "bits");
  p->q = (gqmm_quant){BITS, 16};
  EXPECT_FAIL(p, run(p), GQMM_ERR_GROUP_SIZE, "group_size");
  p->q = (gqmm_quant){BITS, GS};
  p->tx.dtype = GQMM_U32;
  EXPECT_FAIL(p, run(p), GQMM_ERR_DTYPE, "x");
  problem_init(p);
  p->tw.dtype = GQMM_I32;
  EXPECT_FAIL(p, run(p), GQMM_ERR_DTYPE, "w");
  problem_init(p);
  p->ts.dtype = GQMM_I32;
  EXPECT_FAIL(p, run(p), GQMM_ERR_DTYPE, "scales");
  problem_init(p);
  p->tr.dtype = GQMM_F32;
  EXPECT_FAIL(p, run(p), GQMM_ERR_DTYPE, "rhs_indices");
  problem_init(p);
  p->tx.dtype = (gqmm_dtype)42;
  EXPECT_FAIL(p, run(p), GQMM_ERR_DTYPE, "x");
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(index_out_of_range_and_negative) {
  WITH_PROBLEM(p);
  p->rhs[B - 1] = E; /* one past the last expert */
  EXPECT_FAIL(p, run(p), GQMM_ERR_INDEX, "rhs_indices");
  p->rhs[B - 1] = -1;
  EXPECT_FAIL(p, run(p), GQMM_ERR_INDEX, "rhs_indices");
  p->rhs[B - 1] = INT32_MIN;
  EXPECT_FAIL(p, run(p), GQMM_ERR_INDEX, "rhs_indices");
  p->rhs[B - 1] = 0;
  p->lhs[1] = B; /* uint32 index past the x batch */
  EXPECT_FAIL(p, run(p), GQMM_ERR_INDEX, "lhs_indices");
  p->lhs[1] = UINT32_MAX; /* would be -1 if misread as signed */
  EXPECT_FAIL(p, run(p), GQMM_ERR_INDEX, "lhs_indices");
  /* uint32 rhs too, and int32 lhs */
  problem_init(p);
  uint32_t urhs[B] = {0, 1, 2, 3};
  p->tr = gqmm_tensor_make(urhs, GQMM_U32, 1, (int64_t[]){B});
  EXPECT_FAIL(p, run(p), GQMM_ERR_INDEX, "rhs_indices");
  problem_init(p);
  int32_t ilhs[B] = {0, -2, 1, 1};
  p->tl = gqmm_tensor_make(ilhs, GQMM_I32, 1, (int64_t[]){B});
  EXPECT_FAIL(p, run(p), GQMM_ERR_INDEX, "lhs_indices");
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(mismatched_dtypes) {
  WITH_PROBLEM(p);
  /* quantize: scales/biases must have w's dtype, wq must be uint32 */
  gqmm_tensor w = gqmm_tensor_make(p->x, GQMM_F32, 2, (int64_t[]){2, K});
  gqmm_tensor wq = gqmm_tensor_make(p->w, GQMM_U32, 2, (int64_t[]){2, K * BITS / 32});
  gqmm_tensor s = gqmm_tensor_make(p->scales, GQMM_F16, 2, (int64_t[]){2, K / GS});
  gqmm_tensor b = gqmm_tensor_make(p->biases, GQMM_F32, 2, (int64_t[]){2, K / GS});
  EXPECT_FAIL(p, gqmm_quantize(p->ctx, &w, p->q, &wq, &s, &b), GQMM_ERR_OUTPUT, "scales");
  s.dtype = GQMM_F32;
  wq.dtype = GQMM_I32;
  EXPECT_FAIL(p, gqmm_quantize(p->ctx, &w, p->q, &wq, &s, &b), GQMM_ERR_OUTPUT, "wq");
  wq.dtype = GQMM_U32;
  gqmm_tensor out = gqmm_tensor_make(p->out, GQMM_F32, 2, (int64_t[]){2, K});
  EXPECT_FAIL(p, gqmm_dequantize(p->ctx, &s, &s, &b, p->q, &out), GQMM_ERR_DTYPE, "wq");
  /* matmul: x f16 with f32 scales promotes to f32, so an f16 out is wrong */
  uint16_t xh[B * M * K];
  test_rng r = test_rng_make(78);
  test_fill(&r, xh, GQMM_F16, B * M * K, 1.0f);
  p->tx = gqmm_tensor_make(xh, GQMM_F16, 3, (int64_t[]){B, M, K});
  p->to.dtype = GQMM_F16;
  EXPECT_FAIL(p, run(p), GQMM_ERR_OUTPUT, "out");
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(output_too_small_wrong_shape_wrong_dtype) {
  WITH_PROBLEM(p);
  p->to = gqmm_tensor_make(p->out, GQMM_F32, 3, (int64_t[]){B, M, N - 1});
  EXPECT_FAIL(p, run(p), GQMM_ERR_OUTPUT, "out");
  p->to = gqmm_tensor_make(p->out, GQMM_F32, 2, (int64_t[]){B * M, N});
  EXPECT_FAIL(p, run(p), GQMM_ERR_OUTPUT, "out");
  p->to = gqmm_tensor_make(p->out, GQMM_BF16, 3, (int64_t[]){B, M, N});
  EXPECT_FAIL(p, run(p), GQMM_ERR_OUTPUT, "out");
  /* the output-shape query agrees with what the op wants */
  gqmm_tensor want;
  CHECK_OK(gqmm_gather_qmm_output(p->ctx, &p->tx, &p->tw, &p->ts, &p->tb, &p->tl, &p->tr, 1, p->q,
                                  &want));
  CHECK(want.ndim == 3 && want.shape[0] == B && want.shape[1] == M && want.shape[2] == N);
  CHECK(want.dtype == GQMM_F32 && want.data == NULL);
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(output_overlapping_an_input) {
  WITH_PROBLEM(p);
  gqmm_tensor o = p->to;
  o.data = p->x + 8; /* inside x */
  CHECK(gqmm_gather_qmm(p->ctx, &p->tx, &p->tw, &p->ts, &p->tb, &p->tl, &p->tr, 1, p->q, 0, &o) ==
        GQMM_ERR_OVERLAP);
  CHECK(strstr(gqmm_last_error(p->ctx), "out") && strstr(gqmm_last_error(p->ctx), "x"));
  o.data = p->scales; /* B*M*N floats from here run over scales into biases */
  CHECK(gqmm_gather_qmm(p->ctx, &p->tx, &p->tw, &p->ts, &p->tb, &p->tl, &p->tr, 1, p->q, 0, &o) ==
        GQMM_ERR_OVERLAP);
  CHECK(strstr(gqmm_last_error(p->ctx), "scales") != NULL);
  /* quantize writing its scales over w */
  gqmm_tensor w = gqmm_tensor_make(p->x, GQMM_F32, 2, (int64_t[]){2, K});
  gqmm_tensor wq = gqmm_tensor_make(p->w, GQMM_U32, 2, (int64_t[]){2, K * BITS / 32});
  gqmm_tensor s = gqmm_tensor_make(p->x + 4, GQMM_F32, 2, (int64_t[]){2, K / GS});
  gqmm_tensor b = gqmm_tensor_make(p->biases, GQMM_F32, 2, (int64_t[]){2, K / GS});
  CHECK(gqmm_quantize(p->ctx, &w, p->q, &wq, &s, &b) == GQMM_ERR_OVERLAP);
  CHECK(strstr(gqmm_last_error(p->ctx), "scales") != NULL);
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(non_contiguous_strides) {
  WITH_PROBLEM(p);
  p->tx.strides[1] = 2 * K; /* every other row */
  EXPECT_FAIL(p, run(p), GQMM_ERR_LAYOUT, "x");
  problem_init(p);
  p->tw.strides[2] = 2;
  EXPECT_FAIL(p, run(p), GQMM_ERR_LAYOUT, "w");
  problem_init(p);
  p->tr.strides[0] = 0; /* a broadcast view */
  EXPECT_FAIL(p, run(p), GQMM_ERR_LAYOUT, "rhs_indices");
  problem_init(p);
  p->to.strides[2] = 2;
  EXPECT_FAIL(p, run(p), GQMM_ERR_LAYOUT, "out");
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(wrong_device) {
  WITH_PROBLEM(p);
  p->tw.device = GQMM_DEVICE_CUDA; /* host pointer claimed as device memory */
  EXPECT_FAIL(p, run(p), GQMM_ERR_DEVICE, "w");
  problem_init(p);
  p->to.device = GQMM_DEVICE_CUDA;
  EXPECT_FAIL(p, run(p), GQMM_ERR_DEVICE, "out");
  problem_init(p);
  p->tr.device = GQMM_DEVICE_CUDA; /* indices are read on the host */
  EXPECT_FAIL(p, run(p), GQMM_ERR_DEVICE, "rhs_indices");
  problem_init(p);
  p->tx.device = (gqmm_device)7;
  EXPECT_FAIL(p, run(p), GQMM_ERR_DEVICE, "x");
  gqmm_tensor w = gqmm_tensor_make(p->x, GQMM_F32, 2, (int64_t[]){2, K});
  w.device = GQMM_DEVICE_CUDA;
  gqmm_tensor wq = gqmm_tensor_make(p->w, GQMM_U32, 2, (int64_t[]){2, K * BITS / 32});
  gqmm_tensor s = gqmm_tensor_make(p->scales, GQMM_F32, 2, (int64_t[]){2, K / GS});
  gqmm_tensor b = gqmm_tensor_make(p->biases, GQMM_F32, 2, (int64_t[]){2, K / GS});
  EXPECT_FAIL(p, gqmm_quantize(p->ctx, &w, p->q, &wq, &s, &b), GQMM_ERR_DEVICE, "w");
  gqmm_ctx_destroy(p->ctx);
}

GQMM_TEST(bad_context_options) {
  gqmm_ctx *ctx = (gqmm_ctx *)1;
  gqmm_ctx_options o = {.backend = (gqmm_backend_kind)9};
  CHECK(gqmm_ctx_create(&ctx, &o) == GQMM_ERR_ARG && ctx == NULL);
  o = (gqmm_ctx_options){.num_threads = -1};
  CHECK(gqmm_ctx_create(&ctx, &o) == GQMM_ERR_ARG && ctx == NULL);
  o = (gqmm_ctx_options){.cpu_isa = "an-isa-name-longer-than-the-context-keeps-room-for"};
  CHECK(gqmm_ctx_create(&ctx, &o) == GQMM_ERR_ARG && ctx == NULL);
  CHECK(strcmp(gqmm_status_name(GQMM_ERR_INDEX), "GQMM_ERR_INDEX") == 0);
  CHECK(strcmp(gqmm_status_name(12345), "GQMM_UNKNOWN") == 0);
}

GQMM_TEST(broadcast_batch_too_large) {
  WITH_PROBLEM(p);
  /* lhs (2^21, 1) x rhs (1, 2^21): 2^42 output matrices, from small index arrays */
  uint32_t *big = calloc((size_t)1 << 21, sizeof(uint32_t));
  CHECK(big != NULL);
  p->tl = gqmm_tensor_make(big, GQMM_U32, 2, (int64_t[]){INT64_C(1) << 21, 1});
  p->tr = gqmm_tensor_make(big, GQMM_U32, 2, (int64_t[]){1, INT64_C(1) << 21});
  int st = run(p);
  free(big);
  EXPECT_FAIL(p, st, GQMM_ERR_SHAPE, "lhs_indices");
  gqmm_ctx_destroy(p->ctx);
}
