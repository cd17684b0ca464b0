/*
 * cmd_verify.c - `gqmm verify`: every compiled backend against the scalar
 * reference on fresh random gather_qmm cases (every bits x group size x
 * dtype, ragged shapes, sorted and unsorted indices, both transposes).
 * Prints a pass/fail table; exits 1 on any failure.
 */
#include "cli.h"
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
  uint64_t s;
} rng;

static uint32_t next_u32(rng *r) {
  r->s ^= r->s << 13;
  r->s ^= r->s >> 7;
  r->s ^= r->s << 17;
  return (uint32_t)(r->s >> 16);
}

static float next_normal(rng *r) {
  double u1 = (next_u32(r) + 1.0) / 4294967297.0, u2 = next_u32(r) / 4294967296.0;
  return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

typedef struct {
  int E, M, N, K, batch, transpose, sorted;
} verify_shape;

/* One case on one backend: returns relative error vs the reference, or -1 if
 * the backend declined it, or INFINITY on an error status. */
static double run_case(gqmm_backend_kind kind, rng *r, verify_shape s, gqmm_quant q,
                       gqmm_dtype dt, char *err, size_t errlen) {
  const int64_t wrows = s.transpose ? s.N : s.K, wlen = s.transpose ? s.K : s.N;
  const size_t es = gqmm_dtype_size(dt);
  int64_t wshape[3] = {s.E, wrows, wlen}, xshape[3] = {s.batch, s.M, s.K};
  int64_t n_w = (int64_t)s.E * wrows * wlen, n_x = (int64_t)s.batch * s.M * s.K;
  int64_t n_out = (int64_t)s.batch * s.M * s.N;
  float *wf = malloc((size_t)n_w * sizeof(float));
  void *x = malloc((size_t)n_x * es), *out = malloc((size_t)n_out * es);
  void *ref = malloc((size_t)n_out * es);
  uint32_t *wq = malloc((size_t)(s.E * wrows * gqmm_packed_words(q, wlen)) * 4);
  int64_t n_sb = (int64_t)s.E * wrows * (wlen / q.group_size);
  void *sc = malloc((size_t)n_sb * es), *bi = malloc((size_t)n_sb * es);
  int32_t *idx = malloc((size_t)s.batch * sizeof(int32_t));
  double result = INFINITY;
  gqmm_ctx *rctx = gqmm_cli_ctx(GQMM_BACKEND_REF), *ctx = gqmm_cli_ctx(kind);
  if (!wf || !x || !out || !ref || !wq || !sc || !bi || !idx || !rctx || !ctx) goto done;
  for (int64_t i = 0; i < n_w; i++) wf[i] = next_normal(r);
  for (int64_t i = 0; i < n_x; i++) gqmm__store_f(x, dt, i, next_normal(r));
  for (int i = 0; i < s.batch; i++) idx[i] = (int32_t)(next_u32(r) % (uint32_t)s.E);
  if (s.sorted) /* insertion sort: the MoE path groups rows by expert */
    for (int i = 1; i < s.batch; i++)
      for (int j = i; j > 0 && idx[j - 1] > idx[j]; j--) {
        int32_t t = idx[j];
        idx[j] = idx[j - 1];
        idx[j - 1] = t;
      }
  gqmm_tensor tw = gqmm_tensor_make(wf, GQMM_F32, 3, wshape);
  int64_t qshape[3] = {s.E, wrows, gqmm_packed_words(q, wlen)};
  int64_t sshape[3] = {s.E, wrows, wlen / q.group_size};
  gqmm_tensor twq = gqmm_tensor_make(wq, GQMM_U32, 3, qshape);
  gqmm_tensor tsc32, tbi32;
  float *sc32 = malloc((size_t)n_sb * 4), *bi32 = malloc((size_t)n_sb * 4);
  if (!sc32 || !bi32) {
    free(sc32);
    free(bi32);
    goto done;
  }
  tsc32 = gqmm_tensor_make(sc32, GQMM_F32, 3, sshape);
  tbi32 = gqmm_tensor_make(bi32, GQMM_F32, 3, sshape);
  int st = gqmm_quantize(rctx, &tw, q, &twq, &tsc32, &tbi32);
  gqmm__convert(sc, dt, sc32, GQMM_F32, n_sb);
  gqmm__convert(bi, dt, bi32, GQMM_F32, n_sb);
  free(sc32);
  free(bi32);
  if (st) {
    snprintf(err, errlen, "quantize: %s", gqmm_last_error(rctx));
    goto done;
  }
  gqmm_tensor tx = gqmm_tensor_make(x, dt, 3, xshape);
  gqmm_tensor tsc = gqmm_tensor_make(sc, dt, 3, sshape), tbi = gqmm_tensor_make(bi, dt, 3, sshape);
  int64_t ishape[1] = {s.batch};
  gqmm_tensor tidx = gqmm_tensor_make(idx, GQMM_I32, 1, ishape);
  int64_t oshape[3] = {s.batch, s.M, s.N};
  gqmm_tensor tref = gqmm_tensor_make(ref, dt, 3, oshape), tout = gqmm_tensor_make(out, dt, 3, oshape);
  if ((st = gqmm_gather_qmm(rctx, &tx, &twq, &tsc, &tbi, NULL, &tidx, s.transpose, q, s.sorted,
                            &tref))) {
    snprintf(err, errlen, "reference: %s", gqmm_last_error(rctx));
    goto done;
  }
  memset(out, 0xff, (size_t)n_out * es); /* NaN poison in every float dtype */
  st = gqmm_gather_qmm(ctx, &tx, &twq, &tsc, &tbi, NULL, &tidx, s.transpose, q, s.sorted, &tout);
  if (st == GQMM_ERR_UNSUPPORTED) {
    result = -1;
    goto done;
  }
  if (st) {
    snprintf(err, errlen, "%s", gqmm_last_error(ctx));
    goto done;
  }
  double num = 0, den = 0;
  for (int64_t i = 0; i < n_out; i++) {
    double a = gqmm__load_f(out, dt, i), b = gqmm__load_f(ref, dt, i);
    if (isnan(a)) {
      num = INFINITY;
      break;
    }
    num += (a - b) * (a - b);
    den += b * b;
  }
  result = den > 0 ? sqrt(num / den) : sqrt(num);
done:
  gqmm_ctx_destroy(rctx);
  gqmm_ctx_destroy(ctx);
  free(wf), free(x), free(out), free(ref), free(wq), free(sc), free(bi), free(idx);
  return result;
}

int gqmm_cmd_verify(int argc, char **argv) {
  gqmm_backend_kind only = GQMM_BACKEND_AUTO;
  uint64_t seed = (uint64_t)time(NULL);
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
      if (gqmm_cli_backend(argv[++i], &only)) {
        fprintf(stderr, "gqmm verify: unknown backend '%s'\n", argv[i]);
        return 2;
      }
    } else if (!strcmp(argv[i], "--seed") && i + 1 < argc) {
      seed = strtoull(argv[++i], NULL, 10);
    } else {
      printf("usage: gqmm verify [--backend cpu|cuda|auto] [--seed N]\n");
      return strcmp(argv[i], "--help") ? 2 : 0;
    }
  }
  static const verify_shape shapes[] = {
      {4, 1, 40, 128, 9, 1, 1},  {8, 3, 24, 256, 20, 1, 0}, {3, 17, 8, 384, 4, 1, 1},
      {5, 2, 128, 64, 6, 0, 1},  {1, 5, 64, 128, 3, 0, 0},
  };
  static const int bits[] = {2, 3, 4, 5, 6, 8};
  static const int groups[] = {32, 64, 128};
  static const gqmm_dtype dtypes[] = {GQMM_F32, GQMM_F16, GQMM_BF16};
  printf("gqmm verify (seed %llu): each backend against the scalar reference\n",
         (unsigned long long)seed);
  printf("%-10s %5s %5s %-9s %-28s %10s  %s\n", "backend", "bits", "group", "dtype", "shape E/M/N/K/batch/T/sorted", "rel_err", "result");
  int failures = 0, runs = 0;
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++) {
    const gqmm__backend *be = *b;
    if (be->kind == GQMM_BACKEND_REF) continue;
    if (only != GQMM_BACKEND_AUTO && be->kind != only) continue;
    rng r = {seed * 2654435761u + 1};
    for (size_t bi = 0; bi < 6; bi++)
      for (size_t gi = 0; gi < 3; gi++)
        for (size_t di = 0; di < 3; di++)
          for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            verify_shape s = shapes[si];
            gqmm_quant q = {bits[bi], groups[gi]};
            /* K (or N for transpose=0) must hold whole groups */
            int64_t len = s.transpose ? s.K : s.N;
            if (len % q.group_size) continue;
            char err[256] = "";
            double e = run_case(be->kind, &r, s, q, dtypes[di], err, sizeof err);
            if (e < 0) continue; /* declined (e.g. no GPU present) */
            double tol = dtypes[di] == GQMM_F32 ? 1e-5 : 1e-2;
            bool ok = e <= tol;
            runs++;
            if (!ok) failures++;
            if (!ok || (gi == 1 && si == 0))
              printf("%-10s %5d %5d %-9s %d/%d/%d/%d/%d/%d/%d%*s %10.2e  %s %s\n", be->name,
                     q.bits, q.group_size, gqmm_dtype_name(dtypes[di]), s.E, s.M, s.N, s.K,
                     s.batch, s.transpose, s.sorted, 8, "", e, ok ? "pass" : "FAIL", err);
          }
  }
  printf("%d passed, %d failed\n", runs - failures, failures);
  if (runs == 0) printf("(no backend other than the reference is compiled in or available)\n");
  return failures ? 1 : 0;
}
