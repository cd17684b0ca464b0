/*
 * cmd_verify.c - `gqmm verify`: every compiled backend against the scalar
 * reference on fresh random gather_qmm cases (every bits x group size x
 * dtype, ragged shapes, sorted and unsorted indices, both transposes).
 * Device backends (those with mem_alloc) get their inputs copied to device
 * memory, so the GPU kernels themselves are checked, not a host fallback.
 * Prints one pass/fail row per backend and format; exits 1 on any failure.
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

/* Host inputs of one case, and the reference output. */
typedef struct {
  size_t n_x, n_wq, n_sb, n_out; /* element counts */
  void *x, *sc, *bi, *ref;
  uint32_t *wq;
  int32_t *idx;
  int64_t xshape[3], wshape[3], sshape[3], oshape[3], ishape[1];
} verify_inputs;

static void inputs_free(verify_inputs *in) {
  free(in->x), free(in->sc), free(in->bi), free(in->ref), free(in->wq), free(in->idx);
}

/* Random weights quantized by the reference, random x and routing, and the
 * reference result. Returns 0 or writes why into err. */
static int make_inputs(gqmm_ctx *rctx, rng *r, verify_shape s, gqmm_quant q, gqmm_dtype dt,
                       verify_inputs *in, char *err, size_t errlen) {
  const int64_t wrows = s.transpose ? s.N : s.K, wlen = s.transpose ? s.K : s.N;
  const size_t es = gqmm_dtype_size(dt);
  memset(in, 0, sizeof *in);
  in->n_x = (size_t)s.batch * s.M * s.K;
  in->n_wq = (size_t)(s.E * wrows * gqmm_packed_words(q, wlen));
  in->n_sb = (size_t)(s.E * wrows * (wlen / q.group_size));
  in->n_out = (size_t)s.batch * s.M * s.N;
  const size_t n_w = (size_t)s.E * wrows * wlen;
  float *wf = malloc(n_w * 4), *sc32 = malloc(in->n_sb * 4), *bi32 = malloc(in->n_sb * 4);
  in->x = malloc(in->n_x * es), in->ref = malloc(in->n_out * es);
  in->sc = malloc(in->n_sb * es), in->bi = malloc(in->n_sb * es);
  in->wq = malloc(in->n_wq * 4), in->idx = malloc((size_t)s.batch * 4);
  int rc = -1;
  if (!wf || !sc32 || !bi32 || !in->x || !in->ref || !in->sc || !in->bi || !in->wq || !in->idx) {
    snprintf(err, errlen, "out of memory");
    goto done;
  }
  for (size_t i = 0; i < n_w; i++)
    wf[i] = next_normal(r);
  for (size_t i = 0; i < in->n_x; i++)
    gqmm__store_f(in->x, dt, (int64_t)i, next_normal(r));
  for (int i = 0; i < s.batch; i++)
    in->idx[i] = (int32_t)(next_u32(r) % (uint32_t)s.E);
  if (s.sorted) /* insertion sort: the MoE path groups rows by expert */
    for (int i = 1; i < s.batch; i++)
      for (int j = i; j > 0 && in->idx[j - 1] > in->idx[j]; j--) {
        int32_t t = in->idx[j];
        in->idx[j] = in->idx[j - 1];
        in->idx[j - 1] = t;
      }
  const int64_t xs[3] = {s.batch, s.M, s.K}, ws[3] = {s.E, wrows, gqmm_packed_words(q, wlen)};
  const int64_t ss[3] = {s.E, wrows, wlen / q.group_size}, os[3] = {s.batch, s.M, s.N};
  memcpy(in->xshape, xs, sizeof xs), memcpy(in->wshape, ws, sizeof ws);
  memcpy(in->sshape, ss, sizeof ss), memcpy(in->oshape, os, sizeof os);
  in->ishape[0] = s.batch;
  gqmm_tensor tw = gqmm_tensor_make(wf, GQMM_F32, 3, (int64_t[]){s.E, wrows, wlen});
  gqmm_tensor twq = gqmm_tensor_make(in->wq, GQMM_U32, 3, in->wshape);
  gqmm_tensor ts32 = gqmm_tensor_make(sc32, GQMM_F32, 3, in->sshape);
  gqmm_tensor tb32 = gqmm_tensor_make(bi32, GQMM_F32, 3, in->sshape);
  if (gqmm_quantize(rctx, &tw, q, &twq, &ts32, &tb32)) {
    snprintf(err, errlen, "quantize: %s", gqmm_last_error(rctx));
    goto done;
  }
  gqmm__convert(in->sc, dt, sc32, GQMM_F32, (int64_t)in->n_sb);
  gqmm__convert(in->bi, dt, bi32, GQMM_F32, (int64_t)in->n_sb);
  gqmm_tensor tx = gqmm_tensor_make(in->x, dt, 3, in->xshape);
  gqmm_tensor ts = gqmm_tensor_make(in->sc, dt, 3, in->sshape);
  gqmm_tensor tb = gqmm_tensor_make(in->bi, dt, 3, in->sshape);
  gqmm_tensor ti = gqmm_tensor_make(in->idx, GQMM_I32, 1, in->ishape);
  gqmm_tensor tr = gqmm_tensor_make(in->ref, dt, 3, in->oshape);
  if (gqmm_gather_qmm(rctx, &tx, &twq, &ts, &tb, NULL, &ti, s.transpose, q, s.sorted, &tr)) {
    snprintf(err, errlen, "reference: %s", gqmm_last_error(rctx));
    goto done;
  }
  rc = 0;
done:
  free(wf), free(sc32), free(bi32);
  return rc;
}

/* Where a backend's operands live: host memory, or device copies. */
enum { X, WQ, SC, BI, OUT, N_BUFS };

static int run_on_backend(const gqmm__backend *be, gqmm_ctx *ctx, const verify_inputs *in,
                          verify_shape s, gqmm_quant q, gqmm_dtype dt, void *out, char *err,
                          size_t errlen) {
  const size_t es = gqmm_dtype_size(dt);
  const size_t bytes[N_BUFS] = {in->n_x * es, in->n_wq * 4, in->n_sb * es, in->n_sb * es,
                                in->n_out * es};
  void *host[N_BUFS] = {in->x, in->wq, in->sc, in->bi, out};
  void *buf[N_BUFS] = {0};
  const bool device = be->mem_alloc && be->mem_copy && be->mem_free;
  memset(out, 0xff, bytes[OUT]); /* NaN poison in every float dtype */
  int st = GQMM_OK;
  for (int i = 0; i < N_BUFS && !st; i++) {
    if (!device) {
      buf[i] = host[i];
      continue;
    }
    st = be->mem_alloc(ctx, bytes[i] ? bytes[i] : 1, &buf[i]);
    if (!st) st = be->mem_copy(ctx, buf[i], host[i], bytes[i], GQMM__COPY_H2D);
  }
  if (!st) {
    const gqmm_device dev = device ? GQMM_DEVICE_CUDA : GQMM_DEVICE_CPU;
    gqmm_tensor t[N_BUFS] = {gqmm_tensor_make(buf[X], dt, 3, in->xshape),
                             gqmm_tensor_make(buf[WQ], GQMM_U32, 3, in->wshape),
                             gqmm_tensor_make(buf[SC], dt, 3, in->sshape),
                             gqmm_tensor_make(buf[BI], dt, 3, in->sshape),
                             gqmm_tensor_make(buf[OUT], dt, 3, in->oshape)};
    for (int i = 0; i < N_BUFS; i++)
      t[i].device = dev;
    gqmm_tensor ti = gqmm_tensor_make(in->idx, GQMM_I32, 1, in->ishape); /* indices: host */
    st = gqmm_gather_qmm(ctx, &t[X], &t[WQ], &t[SC], &t[BI], NULL, &ti, s.transpose, q, s.sorted,
                         &t[OUT]);
    if (!st && be->sync) st = be->sync(ctx);
    if (!st && device) st = be->mem_copy(ctx, out, buf[OUT], bytes[OUT], GQMM__COPY_D2H);
  }
  if (st && st != GQMM_ERR_UNSUPPORTED) snprintf(err, errlen, "%s", gqmm_last_error(ctx));
  for (int i = 0; device && i < N_BUFS; i++)
    if (buf[i]) be->mem_free(ctx, buf[i]);
  return st;
}

/* ||out - ref|| / ||ref||; INFINITY if out has a NaN (an element not written). */
static double rel_err(const void *out, const void *ref, gqmm_dtype dt, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double a = gqmm__load_f(out, dt, (int64_t)i), b = gqmm__load_f(ref, dt, (int64_t)i);
    if (isnan(a)) return INFINITY;
    num += (a - b) * (a - b);
    den += b * b;
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static const verify_shape shapes[] = {
    {4, 1, 40, 128, 9, 1, 1}, {8, 3, 24, 256, 20, 1, 0}, {3, 17, 8, 384, 4, 1, 1},
    {5, 2, 128, 64, 6, 0, 1}, {1, 5, 64, 128, 3, 0, 0},  {16, 16, 72, 256, 48, 1, 1},
};

/* One table row: every shape of one format on one backend. Returns cases run
 * (0 if the backend declined them all) and sets *worst / err. */
static int verify_format(const gqmm__backend *be, gqmm_ctx *ctx, gqmm_ctx *rctx, rng *r,
                         gqmm_quant q, gqmm_dtype dt, double *worst, char *err, size_t errlen) {
  int runs = 0;
  *worst = 0;
  for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
    const verify_shape s = shapes[si];
    if ((s.transpose ? s.K : s.N) % q.group_size) continue; /* groups must fit */
    verify_inputs in;
    void *out = NULL;
    int st = make_inputs(rctx, r, s, q, dt, &in, err, errlen);
    if (!st) out = malloc(in.n_out * gqmm_dtype_size(dt));
    if (!st && !out) st = -1;
    if (!st) st = run_on_backend(be, ctx, &in, s, q, dt, out, err, errlen);
    if (st != GQMM_ERR_UNSUPPORTED) {
      double e = st ? INFINITY : rel_err(out, in.ref, dt, in.n_out);
      if (e > *worst || isnan(e)) *worst = e;
      runs++;
    }
    free(out);
    inputs_free(&in);
  }
  return runs;
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
  static const int bits[] = {2, 3, 4, 5, 6, 8};
  static const int groups[] = {32, 64, 128};
  static const gqmm_dtype dtypes[] = {GQMM_F32, GQMM_F16, GQMM_BF16};
  printf("gqmm verify (seed %llu): each backend against the scalar reference, %zu shapes per "
         "format\n",
         (unsigned long long)seed, sizeof shapes / sizeof shapes[0]);
  printf("%-12s %4s %5s %-9s %5s %10s %8s  %s\n", "backend", "bits", "group", "dtype", "cases",
         "max_rel", "tol", "result");
  int failures = 0, rows = 0;
  gqmm_ctx *rctx = gqmm_cli_ctx(GQMM_BACKEND_REF);
  if (!rctx) return 1;
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++) {
    const gqmm__backend *be = *b;
    if (be->kind == GQMM_BACKEND_REF) continue;
    if (only != GQMM_BACKEND_AUTO && be->kind != only) continue;
    gqmm_ctx *ctx = gqmm_cli_ctx(be->kind);
    if (!ctx) continue;
    rng r = {seed * 2654435761u + 1};
    for (size_t bi = 0; bi < 6; bi++)
      for (size_t gi = 0; gi < 3; gi++)
        for (size_t di = 0; di < 3; di++) {
          const gqmm_quant q = {bits[bi], groups[gi]};
          char err[256] = "";
          double worst;
          int runs = verify_format(be, ctx, rctx, &r, q, dtypes[di], &worst, err, sizeof err);
          if (!runs) continue; /* declined (e.g. no GPU present) */
          /* f32: a differently ordered float32 sum (~sqrt(K) 2^-24); f16/bf16:
           * the same, then one rounding of the output that may fall either way */
          const double tol = dtypes[di] == GQMM_F32 ? 1e-5 : 1e-2;
          const bool ok = worst <= tol;
          rows++;
          failures += !ok;
          printf("%-12s %4d %5d %-9s %5d %10.2e %8.0e  %s %s\n", be->name, q.bits, q.group_size,
                 gqmm_dtype_name(dtypes[di]), runs, worst, tol, ok ? "pass" : "FAIL", err);
        }
    gqmm_ctx_destroy(ctx);
  }
  gqmm_ctx_destroy(rctx);
  printf("%d passed, %d failed\n", rows - failures, failures);
  if (rows == 0) printf("(no backend other than the reference is compiled in or available)\n");
  return failures ? 1 : 0;
}
