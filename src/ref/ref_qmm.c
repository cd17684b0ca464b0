/*
 * ref_qmm.c - the scalar reference of the batched quantized matmul, the
 * oracle every other backend and kernel variant is tested against.
 *
 * Clear, not fast: each weight row (or column, for transpose=0) is
 * dequantized in float32 as w = scale * q + bias (one float multiply, one
 * float add), then every output element is a float32 sum over k in
 * ascending order, rounded once to the output dtype at the end.
 */
#include "internal.h"

#include <stdlib.h>

/* Dequantize row `r` (length len, groups along it) of one packed matrix. */
static void dequant_row(const gqmm__qmm_args *a, const uint32_t *w, const void *scales,
                        const void *biases, int64_t r, int64_t len, float *dst) {
  const int gs = a->q.group_size;
  const int64_t groups = len / gs;
  const uint8_t *row = (const uint8_t *)(w + r * gqmm_packed_words(a->q, len));
  for (int64_t j = 0; j < len; j++) {
    float s = gqmm__load_f(scales, a->dtype, r * groups + j / gs);
    float b = gqmm__load_f(biases, a->dtype, r * groups + j / gs);
    dst[j] = s * (float)gqmm__unpack(row, a->q.bits, j) + b;
  }
}

int gqmm__ref_qmm(gqmm_ctx *ctx, const gqmm__qmm_args *a) {
  const int64_t M = a->M, N = a->N, K = a->K;
  const size_t esz = gqmm_dtype_size(a->dtype);
  /* transpose=1: W is N rows of K; transpose=0: W is K rows of N. */
  const int64_t wrows = a->transpose ? N : K, wlen = a->transpose ? K : N;
  const int64_t w_words = wrows * gqmm_packed_words(a->q, wlen);
  const int64_t sb_elems = wrows * (wlen / a->q.group_size);
  float *wf = malloc((size_t)(K * N) * sizeof(float)); /* dequantized W as [N][K] */
  float *xf = malloc((size_t)K * sizeof(float));
  float *tmp = malloc((size_t)wlen * sizeof(float));
  if (!wf || !xf || !tmp) {
    free(wf);
    free(xf);
    free(tmp);
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "reference qmm: cannot allocate %lld floats",
                      (long long)(K * N));
  }
  int64_t cached_w = -1;
  for (int64_t b = 0; b < a->batch; b++) {
    const int64_t e = a->w_index[b];
    if (e != cached_w) {
      const uint32_t *w = a->w + e * w_words;
      const char *s = (const char *)a->scales + (size_t)(e * sb_elems) * esz;
      const char *bi = (const char *)a->biases + (size_t)(e * sb_elems) * esz;
      for (int64_t r = 0; r < wrows; r++) {
        dequant_row(a, w, s, bi, r, wlen, tmp);
        for (int64_t j = 0; j < wlen; j++) {
          if (a->transpose)
            wf[r * K + j] = tmp[j];
          else
            wf[j * K + r] = tmp[j];
        }
      }
      cached_w = e;
    }
    const char *xb = (const char *)a->x + (size_t)(a->x_index[b] * M * K) * esz;
    for (int64_t m = 0; m < M; m++) {
      for (int64_t k = 0; k < K; k++)
        xf[k] = gqmm__load_f(xb, a->dtype, m * K + k);
      for (int64_t n = 0; n < N; n++) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; k++)
          acc += xf[k] * wf[n * K + k];
        gqmm__store_f(a->out, a->dtype, (b * M + m) * N + n, acc);
      }
    }
  }
  free(wf);
  free(xf);
  free(tmp);
  return GQMM_OK;
}

static bool ref_supports(gqmm_ctx *ctx, const gqmm__qmm_args *a) {
  (void)ctx;
  return a->device == GQMM_DEVICE_CPU;
}

const gqmm__backend gqmm__ref_backend = {
    .name = "ref",
    .kind = GQMM_BACKEND_REF,
    .supports_qmm = ref_supports,
    .qmm = gqmm__ref_qmm,
    .release = NULL,
};
