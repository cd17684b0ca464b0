/*
 * test_ref.c - the scalar reference (the oracle of every backend) against an
 * independent float64 computation written here: its own bit-by-bit unpacking,
 * its own dot products, and error bounds derived from the float32 rounding
 * model rather than picked. Every bits x group size x dtype, ragged shapes,
 * broadcast indices, both transposes; outputs poisoned with NaN first.
 */
#include "internal.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const int all_bits[] = {2, 3, 4, 5, 6, 8};
static const int all_groups[] = {32, 64, 128};
static const gqmm_dtype all_dtypes[] = {GQMM_F32, GQMM_F16, GQMM_BF16};

/* Unit roundoff of a float dtype. */
static double unit_roundoff(gqmm_dtype t) {
  return t == GQMM_F32 ? 0x1p-24 : t == GQMM_F16 ? 0x1p-11 : 0x1p-8;
}

static double load64(const void *p, gqmm_dtype t, int64_t i) {
  return t == GQMM_F32   ? ((const float *)p)[i]
         : t == GQMM_F16 ? gqmm_f16_to_f32(((const uint16_t *)p)[i])
                         : gqmm_bf16_to_f32(((const uint16_t *)p)[i]);
}

/* Value j of a packed row, one bit at a time from the little-endian stream. */
static uint32_t stream_value(const uint32_t *row, int bits, int64_t j) {
  const uint8_t *bytes = (const uint8_t *)row;
  uint32_t v = 0;
  for (int t = 0; t < bits; t++) {
    int64_t bit = j * bits + t;
    v |= (uint32_t)((bytes[bit / 8] >> (bit % 8)) & 1u) << t;
  }
  return v;
}

/* These tests are about the reference itself, whatever else is compiled in. */
static int ref_ctx(gqmm_ctx **ctx) {
  gqmm_ctx_options o = {.backend = GQMM_BACKEND_REF};
  return gqmm_ctx_create(ctx, &o);
}

/* ---- quantize ------------------------------------------------------------- */

GQMM_TEST(ref_quantize_error_is_within_half_a_step) {
  gqmm_ctx *ctx = NULL;
  CHECK_OK(ref_ctx(&ctx));
  test_rng r = test_rng_make(101);
  for (int bi = 0; bi < 6; bi++)
    for (int gi = 0; gi < 3; gi++)
      for (int di = 0; di < 3; di++) {
        const int bits = all_bits[bi], gs = all_groups[gi];
        const gqmm_dtype dt = all_dtypes[di];
        const gqmm_quant q = {bits, gs};
        const int64_t rows = 1 + test_rng_u32(&r) % 9, k = gs * (1 + test_rng_u32(&r) % 3);
        const size_t es = gqmm_dtype_size(dt);
        void *w = malloc((size_t)(rows * k) * es), *s = malloc((size_t)(rows * k / gs) * es);
        void *b = malloc((size_t)(rows * k / gs) * es);
        uint32_t *wq = malloc((size_t)(rows * k * bits / 32) * 4);
        CHECK(w && s && b && wq);
        test_fill(&r, w, dt, rows * k, rows > 4 ? 100.0f : 0.5f);
        for (int64_t j = 0; j < gs; j++)
          gqmm__store_f(w, dt, j, 0.0f); /* an all-zero group */
        gqmm_tensor tw = gqmm_tensor_make(w, dt, 2, (int64_t[]){rows, k});
        gqmm_tensor tq = gqmm_tensor_make(wq, GQMM_U32, 2, (int64_t[]){rows, k * bits / 32});
        gqmm_tensor ts = gqmm_tensor_make(s, dt, 2, (int64_t[]){rows, k / gs});
        gqmm_tensor tb = gqmm_tensor_make(b, dt, 2, (int64_t[]){rows, k / gs});
        test_poison(s, dt, rows * k / gs);
        test_poison(b, dt, rows * k / gs);
        int st = gqmm_quantize(ctx, &tw, q, &tq, &ts, &tb);
        const double u = unit_roundoff(dt), n_bins = (double)((1 << bits) - 1);
        for (int64_t g = 0; g < rows * k / gs && !st; g++) {
          const double sc = load64(s, dt, g), bias = load64(b, dt, g);
          const int64_t row = g / (k / gs), col0 = (g % (k / gs)) * gs;
          const uint32_t *qrow = wq + row * (k * bits / 32);
          double lo = INFINITY, hi = -INFINITY;
          for (int j = 0; j < gs; j++) {
            double v = load64(w, dt, row * k + col0 + j);
            lo = fmin(lo, v), hi = fmax(hi, v);
          }
          if (lo == 0 && hi == 0) {
            CHECK(bias == 0 && sc < 0); /* scale -eps, every q 0 */
            for (int j = 0; j < gs; j++)
              CHECK(stream_value(qrow, bits, col0 + j) == 0);
            continue;
          }
          /* the larger-magnitude extreme is the bias (q = 0), up to its cast */
          const double edge = fabs(lo) > fabs(hi) ? lo : hi;
          CHECK_MSG(fabs(bias - edge) <= u * fabs(edge), "g %lld bias %g edge %g", (long long)g,
                    bias, edge);
          CHECK((edge == lo) == (sc > 0));
          /* Each value is the nearest grid point of scale * q + bias, in
           * grid units t = (w - bias) / scale; anchoring the grid at the edge
           * can leave the far extreme past q = n_bins, where it is clamped.
           * Slack: the cast of scale and bias to the dtype moves t by about
           * u * (n_bins + |bias / scale|). */
          const double slack = 1e-6 + 1.01 * u * (n_bins + fabs(bias / sc));
          for (int j = 0; j < gs; j++) {
            double t = (load64(w, dt, row * k + col0 + j) - bias) / sc;
            double qv = stream_value(qrow, bits, col0 + j);
            bool fine = fabs(t - qv) <= 0.5 + slack || (qv == n_bins && t > n_bins);
            CHECK_MSG(fine && t > -0.5 - slack, "bits %d gs %d %s: t %.6f got q %g", bits, gs,
                      gqmm_dtype_name(dt), t, qv);
          }
        }
        free(w), free(s), free(b), free(wq);
        CHECK_OK(st);
      }
  gqmm_ctx_destroy(ctx);
}

/* ---- dequantize ------------------------------------------------------------ */

GQMM_TEST(ref_dequantize_is_two_roundings_in_the_dtype) {
  gqmm_ctx *ctx = NULL;
  CHECK_OK(ref_ctx(&ctx));
  test_rng r = test_rng_make(102);
  for (int bi = 0; bi < 6; bi++)
    for (int gi = 0; gi < 3; gi++)
      for (int di = 0; di < 3; di++) {
        const int bits = all_bits[bi], gs = all_groups[gi];
        const gqmm_dtype dt = all_dtypes[di];
        const int64_t rows = 1 + test_rng_u32(&r) % 5, k = gs * (1 + test_rng_u32(&r) % 3);
        const int64_t words = k * bits / 32, groups = rows * k / gs;
        uint32_t *wq = malloc((size_t)(rows * words) * 4);
        float *s = malloc((size_t)groups * 4), *b = malloc((size_t)groups * 4);
        float *out = malloc((size_t)(rows * k) * 4);
        CHECK(wq && s && b && out);
        for (int64_t i = 0; i < rows * words; i++)
          wq[i] = test_rng_u32(&r);
        test_fill(&r, s, dt, groups, 0.1f); /* stored in dt, read back below */
        test_fill(&r, b, dt, groups, 1.0f);
        gqmm_tensor tq = gqmm_tensor_make(wq, GQMM_U32, 2, (int64_t[]){rows, words});
        gqmm_tensor ts = gqmm_tensor_make(s, dt, 2, (int64_t[]){rows, k / gs});
        gqmm_tensor tb = gqmm_tensor_make(b, dt, 2, (int64_t[]){rows, k / gs});
        gqmm_tensor to = gqmm_tensor_make(out, dt, 2, (int64_t[]){rows, k});
        test_poison(out, dt, rows * k);
        int st = gqmm_dequantize(ctx, &tq, &ts, &tb, (gqmm_quant){bits, gs}, &to);
        for (int64_t i = 0; i < rows * k && !st; i++) {
          const int64_t g = i / gs;
          /* q*s and (q*s)+b are exact in double, then rounded once to float
           * (innocuous: 53 >= 2*24+2 bits) and once to dt, as MLX's CPU does */
          double prod = (double)stream_value(wq + (i / k) * words, bits, i % k) * load64(s, dt, g);
          float p_t = (float)prod;
          gqmm__store_f(&p_t, dt, 0, p_t);
          double p_back = load64(&p_t, dt, 0);
          float sum = (float)(p_back + load64(b, dt, g));
          uint32_t want = 0, got = 0;
          gqmm__store_f(&want, dt, 0, sum);
          memcpy(&got, (const char *)out + i * (int64_t)gqmm_dtype_size(dt), gqmm_dtype_size(dt));
          CHECK_MSG(want == got, "bits %d gs %d %s element %lld: %#x != %#x", bits, gs,
                    gqmm_dtype_name(dt), (long long)i, got, want);
        }
        free(wq), free(s), free(b), free(out);
        CHECK_OK(st);
      }
  gqmm_ctx_destroy(ctx);
}

/* ---- quantized matmul ------------------------------------------------------ */

typedef struct {
  int64_t xb, M, K, N, E; /* x batches, rows, reduction, outputs, experts */
  int transpose;
  int nl, nr;           /* ndim of lhs / rhs (0 = not given) */
  int64_t ls[2], rs[2]; /* their shapes */
  int sorted;
} qmm_case;

/* Compare out[b] against float64 for every batch b of a gather problem. The
 * bound: the reference dequantizes w in float32 (two roundings) and sums K
 * products in float32 (K roundings), then rounds once to the dtype:
 * |err| <= (K + 4) u32 * sum|x||s q + b| + u_T * (|exact| + that). */
static int check_gather_case(const qmm_case *c, gqmm_quant q, gqmm_dtype dt, test_rng *r, char *why,
                             size_t whylen) {
  const int64_t wrows = c->transpose ? c->N : c->K, wlen = c->transpose ? c->K : c->N;
  const int64_t words = wlen * q.bits / 32, groups = wlen / q.group_size;
  const size_t es = gqmm_dtype_size(dt);
  int64_t nb = 1, bshape[2] = {1, 1}, nbd = 0;
  /* output batch shape: broadcast of lhs and rhs (both given here, or rhs only) */
  int nmax = c->nl > c->nr ? c->nl : c->nr;
  for (int i = 0; i < nmax; i++) {
    int64_t a = i < nmax - c->nl ? 1 : c->ls[i - (nmax - c->nl)];
    int64_t b = i < nmax - c->nr ? 1 : c->rs[i - (nmax - c->nr)];
    bshape[nbd++] = a == 1 ? b : a;
    nb *= a == 1 ? b : a;
  }
  const int64_t nlhs = c->nl ? c->ls[0] * (c->nl > 1 ? c->ls[1] : 1) : 0;
  const int64_t nrhs = c->nr ? c->rs[0] * (c->nr > 1 ? c->rs[1] : 1) : 0;
  void *x = malloc((size_t)(c->xb * c->M * c->K) * es);
  uint32_t *w = malloc((size_t)(c->E * wrows * words + 1) * 4);
  void *s = malloc((size_t)(c->E * wrows * groups) * es),
       *bi = malloc((size_t)(c->E * wrows * groups) * es);
  uint32_t *lhs = malloc((size_t)(nlhs + 1) * 4);
  int32_t *rhs = malloc((size_t)(nrhs + 1) * 4);
  void *out = malloc((size_t)(nb * c->M * c->N + 1) * es);
  gqmm_ctx *ctx = NULL;
  int ok = 0;
  if (!x || !w || !s || !bi || !lhs || !rhs || !out || ref_ctx(&ctx)) goto done;
  test_fill(r, x, dt, c->xb * c->M * c->K, 1.0f);
  for (int64_t i = 0; i < c->E * wrows * words; i++)
    w[i] = test_rng_u32(r);
  test_fill(r, s, dt, c->E * wrows * groups, 0.05f);
  test_fill(r, bi, dt, c->E * wrows * groups, 0.2f);
  for (int64_t i = 0; i < nlhs; i++)
    lhs[i] = test_rng_u32(r) % (uint32_t)c->xb;
  for (int64_t i = 0; i < nrhs; i++)
    rhs[i] = (int32_t)(test_rng_u32(r) % (uint32_t)c->E);
  if (c->sorted) /* skewed and grouped: most rows to one expert, some experts none */
    for (int64_t i = 0; i < nrhs; i++)
      rhs[i] = i < nrhs * 3 / 4 ? 0 : (int32_t)(c->E - 1);
  gqmm_tensor tx = gqmm_tensor_make(x, dt, 3, (int64_t[]){c->xb, c->M, c->K});
  gqmm_tensor tw = gqmm_tensor_make(w, GQMM_U32, 3, (int64_t[]){c->E, wrows, words});
  gqmm_tensor ts = gqmm_tensor_make(s, dt, 3, (int64_t[]){c->E, wrows, groups});
  gqmm_tensor tb = gqmm_tensor_make(bi, dt, 3, (int64_t[]){c->E, wrows, groups});
  gqmm_tensor tl = gqmm_tensor_make(lhs, GQMM_U32, c->nl, c->ls);
  gqmm_tensor tr = gqmm_tensor_make(rhs, GQMM_I32, c->nr, c->rs);
  int64_t oshape[4];
  for (int i = 0; i < nbd; i++)
    oshape[i] = bshape[i];
  oshape[nbd] = c->M;
  oshape[nbd + 1] = c->N;
  gqmm_tensor to = gqmm_tensor_make(out, dt, (int)nbd + 2, oshape);
  test_poison(out, dt, nb * c->M * c->N);
  int st = gqmm_gather_qmm(ctx, &tx, &tw, &ts, &tb, c->nl ? &tl : NULL, c->nr ? &tr : NULL,
                           c->transpose, q, c->sorted, &to);
  if (st) {
    snprintf(why, whylen, "status %s: %s", gqmm_status_name(st), gqmm_last_error(ctx));
    goto done;
  }
  const double u = unit_roundoff(dt);
  for (int64_t b = 0; b < nb; b++) {
    /* multi-index of b in the (<= 2-d) batch shape, then broadcast reads */
    int64_t i0 = nbd == 2 ? b / bshape[1] : 0, i1 = nbd == 2 ? b % bshape[1] : b;
    int64_t li = 0, ri = 0;
    if (c->nl == 1) li = lhs[c->ls[0] == 1 ? 0 : i1];
    if (c->nl == 2) li = lhs[(c->ls[0] == 1 ? 0 : i0) * c->ls[1] + (c->ls[1] == 1 ? 0 : i1)];
    if (c->nr == 1) ri = rhs[c->rs[0] == 1 ? 0 : i1];
    if (c->nr == 2) ri = rhs[(c->rs[0] == 1 ? 0 : i0) * c->rs[1] + (c->rs[1] == 1 ? 0 : i1)];
    if (!c->nl) li = b; /* default arange over x's batch (xb == nb in such cases) */
    for (int64_t m = 0; m < c->M; m++)
      for (int64_t n = 0; n < c->N; n++) {
        double exact = 0, mag = 0;
        for (int64_t k = 0; k < c->K; k++) {
          int64_t wr = c->transpose ? n : k, wc = c->transpose ? k : n;
          int64_t g = (ri * wrows + wr) * groups + wc / q.group_size;
          double qv = stream_value(w + (ri * wrows + wr) * words, q.bits, wc);
          double sv = load64(s, dt, g), bv = load64(bi, dt, g);
          double xv = load64(x, dt, (li * c->M + m) * c->K + k);
          exact += xv * (sv * qv + bv);
          mag += fabs(xv) * (fabs(sv * qv) + fabs(bv));
        }
        double got = load64(out, dt, (b * c->M + m) * c->N + n);
        double sum_bound = (double)(c->K + 4) * 0x1p-24 * mag;
        double bound = sum_bound + u * (fabs(exact) + sum_bound);
        if (!(fabs(got - exact) <= bound)) {
          snprintf(why, whylen, "out[%lld,%lld,%lld] = %.9g, float64 %.9g, bound %.3g",
                   (long long)b, (long long)m, (long long)n, got, exact, bound);
          goto done;
        }
      }
  }
  ok = 1;
done:
  gqmm_ctx_destroy(ctx);
  free(x), free(w), free(s), free(bi), free(lhs), free(rhs), free(out);
  return ok;
}

GQMM_TEST(ref_gather_qmm_matches_float64_every_format) {
  test_rng r = test_rng_make(103);
  for (int bi = 0; bi < 6; bi++)
    for (int gi = 0; gi < 3; gi++)
      for (int di = 0; di < 3; di++) {
        const gqmm_quant q = {all_bits[bi], all_groups[gi]};
        const gqmm_dtype dt = all_dtypes[di];
        /* ragged: N, M and the batch are odd; K a few groups */
        qmm_case c = {.xb = 3,
                      .M = 1 + test_rng_u32(&r) % 5,
                      .K = q.group_size * (1 + test_rng_u32(&r) % 3),
                      .N = 1 + 2 * (test_rng_u32(&r) % 12),
                      .E = 4,
                      .transpose = 1,
                      .nl = 2,
                      .ls = {3, 1},
                      .nr = 2,
                      .rs = {1, 5}};
        char why[256] = "";
        CHECK_MSG(check_gather_case(&c, q, dt, &r, why, sizeof why), "bits %d gs %d %s: %s", q.bits,
                  q.group_size, gqmm_dtype_name(dt), why);
      }
}

GQMM_TEST(ref_gather_qmm_shapes) {
  test_rng r = test_rng_make(104);
  const qmm_case cases[] = {
      /* transpose=0: groups along N, K odd */
      {.xb = 2,
       .M = 3,
       .K = 37,
       .N = 64,
       .E = 3,
       .transpose = 0,
       .nl = 1,
       .ls = {4},
       .nr = 1,
       .rs = {4}},
      /* rhs only, x batch matching, sorted and skewed (experts with 0 rows) */
      {.xb = 7, .M = 1, .K = 128, .N = 9, .E = 5, .transpose = 1, .nr = 1, .rs = {7}, .sorted = 1},
      /* M = 1, large K */
      {.xb = 1,
       .M = 1,
       .K = 4096,
       .N = 5,
       .E = 2,
       .transpose = 1,
       .nl = 1,
       .ls = {1},
       .nr = 1,
       .rs = {3}},
      /* lhs (1, 2) against rhs (3, 1) */
      {.xb = 2,
       .M = 4,
       .K = 64,
       .N = 11,
       .E = 3,
       .transpose = 1,
       .nl = 2,
       .ls = {1, 2},
       .nr = 2,
       .rs = {3, 1}},
      /* empty batch: nothing to compute, nothing to fail */
      {.xb = 1,
       .M = 2,
       .K = 64,
       .N = 3,
       .E = 2,
       .transpose = 1,
       .nl = 1,
       .ls = {1},
       .nr = 1,
       .rs = {0}},
  };
  const gqmm_quant qs[] = {{4, 64}, {3, 32}, {6, 64}};
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    for (size_t qi = 0; qi < 3; qi++)
      for (int di = 0; di < 3; di++) {
        const qmm_case *c = &cases[i];
        if ((c->transpose ? c->K : c->N) % qs[qi].group_size) continue;
        char why[256] = "";
        CHECK_MSG(check_gather_case(c, qs[qi], all_dtypes[di], &r, why, sizeof why),
                  "case %zu bits %d %s: %s", i, qs[qi].bits, gqmm_dtype_name(all_dtypes[di]), why);
      }
}

GQMM_TEST(ref_quantized_matmul_folds_x_batch_into_rows) {
  /* w 2-D: x (2, 3, K) is six rows; same numbers as a (6, K) x */
  gqmm_ctx *ctx = NULL;
  CHECK_OK(ref_ctx(&ctx));
  test_rng r = test_rng_make(105);
  enum { K = 64, N = 7 };
  float x[6 * K], s[N * 2], b[N * 2], y1[6 * N], y2[6 * N];
  uint32_t w[N * K * 5 / 32];
  test_fill(&r, x, GQMM_F32, 6 * K, 1.0f);
  test_fill(&r, s, GQMM_F32, N * 2, 0.1f);
  test_fill(&r, b, GQMM_F32, N * 2, 0.1f);
  for (size_t i = 0; i < sizeof w / 4; i++)
    w[i] = test_rng_u32(&r);
  const gqmm_quant q = {5, 32};
  gqmm_tensor tw = gqmm_tensor_make(w, GQMM_U32, 2, (int64_t[]){N, K * 5 / 32});
  gqmm_tensor ts = gqmm_tensor_make(s, GQMM_F32, 2, (int64_t[]){N, 2});
  gqmm_tensor tb = gqmm_tensor_make(b, GQMM_F32, 2, (int64_t[]){N, 2});
  gqmm_tensor x3 = gqmm_tensor_make(x, GQMM_F32, 3, (int64_t[]){2, 3, K});
  gqmm_tensor x2 = gqmm_tensor_make(x, GQMM_F32, 2, (int64_t[]){6, K});
  gqmm_tensor o3 = gqmm_tensor_make(y1, GQMM_F32, 3, (int64_t[]){2, 3, N});
  gqmm_tensor o2 = gqmm_tensor_make(y2, GQMM_F32, 2, (int64_t[]){6, N});
  test_poison(y1, GQMM_F32, 6 * N);
  test_poison(y2, GQMM_F32, 6 * N);
  CHECK_OK(gqmm_quantized_matmul(ctx, &x3, &tw, &ts, &tb, 1, q, &o3));
  CHECK_OK(gqmm_quantized_matmul(ctx, &x2, &tw, &ts, &tb, 1, q, &o2));
  CHECK(memcmp(y1, y2, sizeof y1) == 0);
  CHECK(test_rel_err(y1, GQMM_F32, y2, GQMM_F32, 6 * N) == 0.0); /* and no NaN left */
  CHECK(strcmp(gqmm_last_backend(ctx), "ref") == 0);
  gqmm_ctx_destroy(ctx);
}
