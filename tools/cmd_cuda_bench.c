/*
 * cmd_cuda_bench.c - `gqmm cuda-bench`: the CUDA backend's measurements in one
 * run, each beside the same run's ceilings (DESIGN.md section 5):
 *   - ceilings: device copy and read bandwidth, bf16 mma.sync peak;
 *   - gather_qmm on the seed's three shapes (E=128, random top-8 of 256
 *     tokens, rows sorted by expert as mlx-lm does), 4-bit and 2/3-bit,
 *     every tile config and the built-in choice;
 *   - the weight-reuse sweep: gather_qmm with exactly r rows on every expert
 *     (r = 1..128) and dense quantized_matmul K=2816 N=180224, M = 1..128.
 * Times are device-event times of the kernel (median of --reps, outputs
 * poisoned before each rep); op_time adds the index upload and routing plan.
 */
#include "cli.h"
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  gqmm_ctx *ctx;
  gqmm__ceilings ceil;
  FILE *json;
  int reps, nrec;
  uint64_t rng;
} bench;

static uint32_t next_u32(bench *b) {
  b->rng ^= b->rng << 13, b->rng ^= b->rng >> 7, b->rng ^= b->rng << 17;
  return (uint32_t)(b->rng >> 16);
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* Device buffer filled from a host buffer. */
static void *upload(bench *b, const void *h, size_t bytes) {
  void *d = NULL;
  if (gqmm_device_alloc(b->ctx, bytes, &d) ||
      (h && gqmm_device_copy(b->ctx, d, h, bytes, GQMM_COPY_HOST_TO_DEVICE))) {
    fprintf(stderr, "gqmm cuda-bench: %s\n", gqmm_last_error(b->ctx));
    gqmm_device_free(b->ctx, d);
    return NULL;
  }
  return d;
}

/* Random packed weights, scales and biases of E x N rows of K, on the device. */
typedef struct {
  void *w, *s, *b;
  int64_t E, N, K;
  gqmm_quant q;
} dweights;

static int make_weights(bench *b, dweights *dw, int64_t E, int64_t N, int64_t K, gqmm_quant q) {
  const int64_t words = gqmm_packed_words(q, K), groups = K / q.group_size;
  const size_t nw = (size_t)(E * N * words), ns = (size_t)(E * N * groups);
  uint32_t *w = malloc(nw * 4);
  uint16_t *s = malloc(ns * 2), *bi = malloc(ns * 2);
  int st = (w && s && bi) ? 0 : -1;
  for (size_t i = 0; !st && i < nw; i++) w[i] = next_u32(b);
  for (size_t i = 0; !st && i < ns; i++) {
    s[i] = gqmm_f32_to_bf16(0.002f + 1e-4f * (float)(next_u32(b) % 64));
    bi[i] = gqmm_f32_to_bf16(-0.02f + 1e-4f * (float)(next_u32(b) % 64));
  }
  dw->E = E, dw->N = N, dw->K = K, dw->q = q;
  dw->w = st ? NULL : upload(b, w, nw * 4);
  dw->s = st ? NULL : upload(b, s, ns * 2);
  dw->b = st ? NULL : upload(b, bi, ns * 2);
  free(w), free(s), free(bi);
  return dw->w && dw->s && dw->b ? 0 : -1;
}

static void free_weights(bench *b, dweights *dw) {
  gqmm_device_free(b->ctx, dw->w), gqmm_device_free(b->ctx, dw->s), gqmm_device_free(b->ctx, dw->b);
  memset(dw, 0, sizeof *dw);
}

/*
 * Time one call. rhs == NULL: dense quantized_matmul with M rows and w as
 * [E*N, K]. Else gather_qmm over `rows` entries (x [rows, 1, K], rhs sorted).
 */
static int measure(bench *b, const char *op, const char *shape, const dweights *dw, int64_t rows,
                   const int32_t *rhs, int config, const char *config_name, const gqmm_packed *pk) {
  const int64_t K = dw->K, N = rhs ? dw->N : dw->E * dw->N;
  const int64_t words = gqmm_packed_words(dw->q, K), groups = K / dw->q.group_size;
  const size_t xbytes = (size_t)(rows * K) * 2, obytes = (size_t)(rows * N) * 2;
  uint16_t *hx = malloc(xbytes), *hp = malloc(obytes), *ho = malloc(obytes);
  int rc = -1;
  void *dx = NULL, *dout = NULL, *dpoison = NULL;
  if (!hx || !hp || !ho) goto done;
  for (int64_t i = 0; i < rows * K; i++)
    hx[i] = gqmm_f32_to_bf16((float)((int)(next_u32(b) % 255) - 127) / 64.0f);
  for (int64_t i = 0; i < rows * N; i++) hp[i] = 0x7fc0; /* bf16 NaN */
  if (!(dx = upload(b, hx, xbytes)) || !(dout = upload(b, NULL, obytes)) ||
      !(dpoison = upload(b, hp, obytes)))
    goto done;
  int64_t xs3[3] = {rows, 1, K}, os3[3] = {rows, 1, N}, is[1] = {rows};
  int64_t ws3[3] = {dw->E, dw->N, words}, ss3[3] = {dw->E, dw->N, groups};
  int64_t ws2[2] = {N, words}, ss2[2] = {N, groups};
  gqmm_tensor tx, tw, ts, tb, to, tr;
  if (rhs) {
    tx = gqmm_tensor_make(dx, GQMM_BF16, 3, xs3), to = gqmm_tensor_make(dout, GQMM_BF16, 3, os3);
    tw = gqmm_tensor_make(dw->w, GQMM_U32, 3, ws3);
    ts = gqmm_tensor_make(dw->s, GQMM_BF16, 3, ss3), tb = gqmm_tensor_make(dw->b, GQMM_BF16, 3, ss3);
  } else {
    int64_t xs2[2] = {rows, K}, os2[2] = {rows, N};
    tx = gqmm_tensor_make(dx, GQMM_BF16, 2, xs2), to = gqmm_tensor_make(dout, GQMM_BF16, 2, os2);
    tw = gqmm_tensor_make(dw->w, GQMM_U32, 2, ws2);
    ts = gqmm_tensor_make(dw->s, GQMM_BF16, 2, ss2), tb = gqmm_tensor_make(dw->b, GQMM_BF16, 2, ss2);
  }
  tr = gqmm_tensor_make((void *)rhs, GQMM_I32, 1, is);
  tx.device = tw.device = ts.device = tb.device = to.device = GQMM_DEVICE_CUDA;
  b->ctx->forced_config = config;
  const int warm = 3, reps = b->reps;
  double *tk = malloc(sizeof(double) * (size_t)reps), *top = malloc(sizeof(double) * (size_t)reps);
  if (!tk || !top) goto done_t;
  for (int r = -warm; r < reps; r++) {
    int st = gqmm_device_copy(b->ctx, dout, dpoison, obytes, GQMM_COPY_DEVICE_TO_DEVICE);
    if (!st && pk) st = gqmm_gather_qmm_packed(b->ctx, &tx, pk, NULL, rhs ? &tr : NULL, 1, &to);
    else if (!st)
      st = rhs ? gqmm_gather_qmm(b->ctx, &tx, &tw, &ts, &tb, NULL, &tr, 1, dw->q, 1, &to)
               : gqmm_quantized_matmul(b->ctx, &tx, &tw, &ts, &tb, 1, dw->q, &to);
    double k = 0, o = 0;
    if (!st) st = gqmm_device_last_time(b->ctx, &k, &o);
    if (st) {
      fprintf(stderr, "gqmm cuda-bench: %s %s: %s\n", op, shape, gqmm_last_error(b->ctx));
      goto done_t;
    }
    if (r >= 0) tk[r] = k, top[r] = o;
  }
  if (gqmm_device_copy(b->ctx, ho, dout, obytes, GQMM_COPY_DEVICE_TO_HOST)) goto done_t;
  int64_t nan_out = 0;
  for (int64_t i = 0; i < rows * N; i++) nan_out += (ho[i] & 0x7fff) > 0x7f80;
  qsort(tk, (size_t)reps, sizeof(double), cmp_double);
  qsort(top, (size_t)reps, sizeof(double), cmp_double);
  /* Weight bytes of the experts actually used. */
  int64_t used = 1;
  if (rhs) {
    used = 0;
    for (int64_t i = 0; i < rows; i++) used += (i == 0 || rhs[i] != rhs[i - 1]);
  }
  const double wbytes = (double)used * (double)N * (double)(words * 4 + groups * 4);
  const double med = tk[reps / 2], gbps = wbytes / (med * 1e-6) / 1e9;
  const double macs = (double)rows * (double)N * (double)K;
  const double mem = fmax(b->ceil.copy_GBps, b->ceil.read_GBps);
  const double roof = fmin(mem, b->ceil.compute_GMACps * wbytes / macs);
  const double rpe = rhs ? (double)rows / (double)used : (double)rows;
  printf("%-8s %-10s %4d %4lld %5lld %6lld %6lld %7.1f  %-14s %9.1f %9.1f %8.0f %6.1f%% %s\n", op,
         shape, dw->q.bits, (long long)used, (long long)K, (long long)N, (long long)rows, rpe,
         config_name, med, top[reps / 2], gbps, 100.0 * gbps / roof,
         nan_out ? "NAN-OUTPUTS" : "");
  if (b->json) {
    fprintf(b->json,
            "%s\n  {\"backend\": \"cuda\", \"device\": \"%s\", \"op\": \"%s\", \"shape\": \"%s\", "
            "\"E\": %lld, \"K\": %lld, \"N\": %lld, \"M\": %lld, \"rows_per_expert\": %.3f, "
            "\"bits\": %d, \"group_size\": %d, \"dtype\": \"bfloat16\", \"config\": \"%s\", "
            "\"time_us_median\": %.3f, \"time_us_min\": %.3f, \"op_time_us_median\": %.3f, "
            "\"weight_bytes\": %.0f, \"weight_GBps\": %.2f, \"ceiling_copy_GBps\": %.2f, "
            "\"ceiling_read_GBps\": %.2f, \"ceiling_compute_GMACps\": %.1f, "
            "\"roofline_GBps\": %.2f, \"fraction_of_roofline\": %.4f, \"nan_outputs\": %lld}",
            b->nrec++ ? "," : "", b->ceil.device_name, op, shape, (long long)used, (long long)K,
            (long long)N, (long long)rows, rpe, dw->q.bits, dw->q.group_size, config_name, med,
            tk[0], top[reps / 2], wbytes, gbps, b->ceil.copy_GBps, b->ceil.read_GBps,
            b->ceil.compute_GMACps, roof, gbps / roof, (long long)nan_out);
  }
  rc = nan_out ? -1 : 0;
done_t:
  free(tk), free(top);
  b->ctx->forced_config = -1;
done:
  gqmm_device_free(b->ctx, dx), gqmm_device_free(b->ctx, dout), gqmm_device_free(b->ctx, dpoison);
  free(hx), free(hp), free(ho);
  return rc;
}

/* Sorted expert ids of `tokens` tokens routed top-k by random scores. */
static void random_routing(bench *b, int tokens, int topk, int E, int32_t *rhs) {
  int *count = calloc((size_t)E, sizeof(int));
  if (!count) return;
  for (int t = 0; t < tokens; t++) {
    int chosen[64], n = 0;
    while (n < topk) { /* k distinct experts: the top-k of random scores */
      int e = (int)(next_u32(b) % (uint32_t)E), dup = 0;
      for (int i = 0; i < n; i++) dup |= chosen[i] == e;
      if (!dup) chosen[n++] = e, count[e]++;
    }
  }
  for (int e = 0, r = 0; e < E; e++)
    for (int c = 0; c < count[e]; c++) rhs[r++] = e;
  free(count);
}

/* The gqmm_pack copy of dw, as [E, N, ...] (3-D) or as one dense [E*N, ...]
 * matrix (2-D), timed (host clock, pack kernel included). */
static gqmm_packed *pack_weights(bench *b, const dweights *dw, int dense) {
  const int64_t words = gqmm_packed_words(dw->q, dw->K), groups = dw->K / dw->q.group_size;
  int64_t ws[3] = {dw->E, dw->N, words}, ss[3] = {dw->E, dw->N, groups};
  if (dense) ws[1] = ss[1] = dw->E * dw->N;
  gqmm_tensor tw = gqmm_tensor_make(dw->w, GQMM_U32, 3 - dense, ws + dense);
  gqmm_tensor ts = gqmm_tensor_make(dw->s, GQMM_BF16, 3 - dense, ss + dense);
  gqmm_tensor tb = gqmm_tensor_make(dw->b, GQMM_BF16, 3 - dense, ss + dense);
  tw.device = ts.device = tb.device = GQMM_DEVICE_CUDA;
  gqmm_packed *pk = NULL;
  const double t0 = gqmm__now_s();
  if (gqmm_pack(b->ctx, &tw, &ts, &tb, dw->q, &pk)) {
    fprintf(stderr, "gqmm cuda-bench: pack: %s\n", gqmm_last_error(b->ctx));
    return NULL;
  }
  printf("gqmm_pack %d-bit %lld x %lld x %lld: %.2f ms, %.1f MB, %s\n", dw->q.bits,
         (long long)dw->E, (long long)dw->N, (long long)dw->K, 1e3 * (gqmm__now_s() - t0),
         (double)gqmm_packed_nbytes(pk) / 1e6,
         gqmm_packed_scaled(pk) ? "one-FMA dequantization" : "two-instruction dequantization");
  return pk;
}

/* measure() on every tensor-core config the backend offers for dw's weights
 * (pk: its gqmm_pack copy, so the packed configs); returns the failures. */
static int measure_configs(bench *b, const gqmm__backend *be, const char *op, const char *shape,
                           const dweights *dw, int64_t rows, const int32_t *rhs,
                           const gqmm_packed *pk) {
  const gqmm__qmm_args pa = {.dtype = GQMM_BF16, .q = dw->q, .transpose = 1,
                             .device = GQMM_DEVICE_CUDA, .M = 1, .N = dw->N, .K = dw->K,
                             .x = dw->w, .w = dw->w, .packed = pk};
  gqmm__tile_config cfgs[16];
  const int ncfg = be->configs(b->ctx, &pa, cfgs, 16);
  int fails = 0;
  for (int c = 0; c < ncfg; c++)
    if (strcmp(cfgs[c].name, "generic"))
      fails += measure(b, op, shape, dw, rows, rhs, cfgs[c].id, cfgs[c].name, pk) != 0;
  return fails;
}

static const gqmm__backend *cuda_be(void) {
  for (const gqmm__backend *const *p = gqmm__backends(); *p; p++)
    if ((*p)->kind == GQMM_BACKEND_CUDA && (*p)->ceilings) return *p;
  return NULL;
}

/* The seed's three expert GEMM shapes. */
static const struct {
  const char *name;
  int K, N;
} kShapes[3] = {{"gate_up", 2816, 1408}, {"gate", 2816, 704}, {"down", 704, 2816}};

static int shape_index(const char *name) {
  for (int i = 0; i < 3; i++)
    if (!strcmp(kShapes[i].name, name)) return i;
  return -1;
}

int gqmm_cmd_cuda_bench(int argc, char **argv) {
  bench b = {.reps = 20, .rng = 0x9E3779B97F4A7C15ull};
  const char *json = NULL;
  int quick = 0;
  const char *only = NULL; /* --sweep LIST: the packed sweep at these rows per expert only */
  int cfgs = 0;            /* --configs: there, every packed config too */
  int shape_i = 0;         /* --shape: which seed shape the sweep runs on (gate_up) */
  int sweep_bits = 4;      /* --bits: the sweep's weight width (4) */
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) b.reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--quick")) quick = 1;
    else if (!strcmp(argv[i], "--sweep") && i + 1 < argc) only = argv[++i];
    else if (!strcmp(argv[i], "--configs")) cfgs = 1;
    else if (!strcmp(argv[i], "--shape") && i + 1 < argc && shape_index(argv[i + 1]) >= 0)
      shape_i = shape_index(argv[++i]);
    else if (!strcmp(argv[i], "--bits") && i + 1 < argc && argv[i + 1][0] &&
             strchr("2348", argv[i + 1][0]) && !argv[i + 1][1])
      sweep_bits = atoi(argv[++i]);
    else {
      printf("usage: gqmm cuda-bench [--json FILE] [--reps N (20)] [--quick]\n"
             "                       [--sweep R,R,... (1..128): only the packed gate_up sweep at\n"
             "                        these rows per expert, the built-in config (profiling)]\n"
             "                       [--configs: with --sweep, every packed config as well]\n"
             "                       [--shape gate_up|gate|down: with --sweep, the seed shape\n"
             "                        it runs on (gate_up)]\n"
             "                       [--bits 2|3|4|8: with --sweep, the weight width (4)]\n");
      return strcmp(argv[i], "--help") ? 2 : 0;
    }
  }
  const gqmm__backend *be = cuda_be();
  if (!be || b.reps < 1) {
    fprintf(stderr, "gqmm cuda-bench: %s\n", be ? "--reps must be positive" : "built without CUDA");
    return 2;
  }
  b.ctx = gqmm_cli_ctx(GQMM_BACKEND_CUDA);
  if (!b.ctx) return 1;
  int rc = 1;
  int32_t *rhs = malloc(sizeof(int32_t) * 128 * 128);
  dweights dw = {0};
  if (!rhs || be->ceilings(b.ctx, &b.ceil)) {
    fprintf(stderr, "gqmm cuda-bench: %s\n", gqmm_last_error(b.ctx));
    goto out;
  }
  printf("device: %s  copy %.0f GB/s  read %.0f GB/s  %s %.0f GMAC/s\n", b.ceil.device_name,
         b.ceil.copy_GBps, b.ceil.read_GBps, b.ceil.compute_what, b.ceil.compute_GMACps);
  if (json && !(b.json = fopen(json, "w"))) {
    fprintf(stderr, "gqmm cuda-bench: cannot write %s\n", json);
    goto out;
  }
  if (b.json) fprintf(b.json, "[");
  printf("%-8s %-10s %4s %4s %5s %6s %6s %7s  %-14s %9s %9s %8s %7s\n", "op", "shape", "bits",
         "E", "K", "N", "rows", "rows/e", "config", "kern_us", "op_us", "GB/s", "ceil%");
  const int bitsv[3] = {4, 3, 2};
  int fails = 0;
  if (only) {
    gqmm_packed *pk = NULL;
    if (make_weights(&b, &dw, 128, kShapes[shape_i].N, kShapes[shape_i].K,
                     (gqmm_quant){sweep_bits, 64}) ||
        !(pk = pack_weights(&b, &dw, 0)))
      goto out;
    for (const char *p = only; *p;) {
      char *end;
      const long r = strtol(p, &end, 10);
      if (end == p || r < 1 || r > 128) {
        fprintf(stderr, "gqmm cuda-bench: --sweep takes rows per expert in 1..128, got '%s'\n", p);
        fails++;
        break;
      }
      for (int i = 0; i < 128 * r; i++) rhs[i] = i / (int)r;
      const char *sn = kShapes[shape_i].name;
      fails += measure(&b, "sweep", sn, &dw, 128 * r, rhs, -1, "packed-auto", pk) != 0;
      if (cfgs) fails += measure_configs(&b, be, "sweep", sn, &dw, 128 * r, rhs, pk);
      p = *end == ',' ? end + 1 : end;
    }
    gqmm_packed_free(b.ctx, pk);
  }
  for (int bi = 0; !only && bi < (quick ? 1 : 3); bi++) {
    for (int si = 0; si < 3; si++) {
      if (make_weights(&b, &dw, 128, kShapes[si].N, kShapes[si].K, (gqmm_quant){bitsv[bi], 64})) goto out;
      random_routing(&b, 256, 8, 128, rhs);
      gqmm_packed *pk = pack_weights(&b, &dw, 0);
      fails += !pk;
      /* MLX layout, then the packed copy: the built-in choice, every config */
      for (int packed = 0; packed < (pk ? 2 : 1); packed++) {
        const gqmm_packed *use = packed ? pk : NULL;
        fails += measure(&b, "gather", kShapes[si].name, &dw, 2048, rhs, -1,
                         packed ? "packed-auto" : "auto", use) != 0;
        fails += measure_configs(&b, be, "gather", kShapes[si].name, &dw, 2048, rhs, use);
      }
      if (si == 0 && bi == 0) { /* the sweep, on the gate_up weights */
        gqmm_packed *pk2 = pack_weights(&b, &dw, 1);
        fails += !pk2;
        for (int packed = 0; packed < (pk && pk2 ? 2 : 1); packed++) {
          const char *name = packed ? "packed-auto" : "auto";
          const gqmm_packed *use = packed ? pk : NULL;
          for (int r = 1; r <= 128; r *= 2) {
            for (int i = 0; i < 128 * r; i++) rhs[i] = i / r;
            fails += measure(&b, "sweep", "gate_up", &dw, 128 * r, rhs, -1, name, use) != 0;
            /* where the work unit's row count starts to matter: every config */
            if (r >= 32) fails += measure_configs(&b, be, "sweep", "gate_up", &dw, 128 * r, rhs, use);
          }
          for (int m = 1; m <= 128; m *= 2) /* same bytes as one dense [E*N, K] */
            fails += measure(&b, "dense", "E*N_x_K", &dw, m, NULL, -1, name,
                             packed ? pk2 : NULL) != 0;
        }
        gqmm_packed_free(b.ctx, pk2);
      }
      gqmm_packed_free(b.ctx, pk);
      free_weights(&b, &dw);
    }
  }
  if (b.json) fprintf(b.json, "\n]\n");
  rc = fails ? 1 : 0;
  if (fails) fprintf(stderr, "gqmm cuda-bench: %d measurements failed\n", fails);
out:
  free_weights(&b, &dw);
  if (b.json) fclose(b.json);
  free(rhs);
  gqmm_ctx_destroy(b.ctx);
  return rc;
}
