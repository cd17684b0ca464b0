/*
 * cmd_sweep.c - `gqmm sweep`: the seed's weight-reuse sweep on one backend,
 * each figure beside the same run's ceilings.
 *
 *   qmm    quantized_matmul, K = 2816, N chosen so the weights are >= 4x the
 *          last-level cache, M = 1, 2, 4 ... 128 (fixed weights, growing reuse)
 *   gather gather_qmm on the seed's gate_up shape (E = 128, K = 2816,
 *          N = 1408), tokens = 16 * rows_per_expert, random top-8 routing,
 *          rows sorted by expert as mlx-lm does (x gathered, M = 1)
 *
 * Ceilings are measured first in the same process: memory copy and read
 * bandwidth (all threads) and the compute peak of the kernel's instruction.
 * roofline = min(max(copy, read), compute * weight_bytes / MACs), and every
 * row prints weight GB/s and its fraction of that roofline. Each point: 2
 * warm-up runs, then the median of >= 20 timed runs (fewer, printed, when one
 * run is slower than 0.25 s), with the input set rotated among enough copies
 * that a run never finds its weights in the cache, and outputs poisoned
 * (NaN) before every run. With --packed each copy of the weights is first
 * packed by gqmm_pack (a load-time step, not timed) and the points run
 * gqmm_gather_qmm_packed ("qmm_pk", "gather_pk").
 */
#include "cli.h"
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
  const gqmm__backend *be;
  gqmm_ctx *ctx;
  gqmm__ceilings ceil;
  const char *config;
  FILE *json;
  int json_count;
  int min_runs;
  double llc_bytes;
  uint64_t rng;
  int even;   /* gather: --routing even, every expert exactly rows/e rows */
  int packed; /* --packed: the weights through gqmm_pack (untimed), then the packed op */
  int ms[16]; /* M (qmm) and rows per expert (gather) of the sweep, in order */
  int n_ms;
} sweep;

typedef struct {
  const char *op;
  int E, K, N, M, bits, group_size;
  double rows_per_expert;
  double weight_bytes, macs;
} point;


static uint32_t next_u32(sweep *s) {
  s->rng ^= s->rng << 13;
  s->rng ^= s->rng >> 7;
  s->rng ^= s->rng << 17;
  return (uint32_t)(s->rng >> 16);
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Buffers of one input set, on the backend's device if it has one. */
typedef struct {
  void *p[6];
  size_t n[6];
} buffers;

static void *dev_put(sweep *s, const void *host, size_t n) {
  if (!s->be->mem_alloc) {
    void *p = malloc(n);
    if (p) memcpy(p, host, n);
    return p;
  }
  void *d = NULL;
  if (s->be->mem_alloc(s->ctx, n, &d)) return NULL;
  s->be->mem_copy(s->ctx, d, host, n, GQMM__COPY_H2D);
  return d;
}

static void dev_free(sweep *s, void *p) {
  if (!p) return;
  if (s->be->mem_free)
    s->be->mem_free(s->ctx, p);
  else
    free(p);
}

static void poison(sweep *s, void *out, size_t n) {
  if (!s->be->mem_alloc) {
    memset(out, 0xff, n); /* NaN in every float dtype */
    return;
  }
  void *h = malloc(n);
  if (!h) return;
  memset(h, 0xff, n);
  s->be->mem_copy(s->ctx, out, h, n, GQMM__COPY_H2D);
  free(h);
}

static void print_row(sweep *s, const point *p, double med, double mn, int runs) {
  const double gbps = p->weight_bytes / med / 1e9;
  const double mem = fmax(s->ceil.copy_GBps, s->ceil.read_GBps);
  const double compute = s->ceil.compute_GMACps * p->weight_bytes / p->macs;
  const double roof = fmin(mem, compute);
  printf("%-9s %4d %5d %6d %4d %7.1f %11.1f %11.1f %6d %9.2f %9.2f %6.1f%%\n", p->op, p->E, p->K,
         p->N, p->M, p->rows_per_expert, med * 1e6, mn * 1e6, runs, gbps, roof,
         100.0 * gbps / roof);
  fflush(stdout);
  if (!s->json) return;
  fprintf(s->json,
          "%s\n  {\"backend\": \"%s\", \"device\": \"%s\", \"op\": \"%s\", \"E\": %d, \"K\": %d, "
          "\"N\": %d, \"M\": %d, \"rows_per_expert\": %.3f, \"bits\": %d, \"group_size\": %d, "
          "\"dtype\": \"bfloat16\", \"config\": \"%s\", \"runs\": %d, \"time_us_median\": %.3f, "
          "\"time_us_min\": %.3f, \"weight_bytes\": %.0f, \"weight_GBps\": %.4f, "
          "\"ceiling_copy_GBps\": %.4f, \"ceiling_read_GBps\": %.4f, "
          "\"ceiling_compute_GMACps\": %.4f, \"compute_what\": \"%s\", \"roofline_GBps\": %.4f, "
          "\"fraction_of_roofline\": %.4f}",
          s->json_count++ ? "," : "", gqmm_last_backend(s->ctx), s->ceil.device_name, p->op, p->E,
          p->K, p->N, p->M, p->rows_per_expert, p->bits, p->group_size, s->config, runs, med * 1e6,
          mn * 1e6, p->weight_bytes, gbps, s->ceil.copy_GBps, s->ceil.read_GBps,
          s->ceil.compute_GMACps, s->ceil.compute_what, roof, gbps / roof);
}

/* Descriptors of one input set's w, scales and biases: [E, N, ...] (gather)
 * or, with ndim 2, the one matrix [N, ...] (quantized_matmul, E = 1). */
static void weight_tensors(const buffers *b, int ndim, const int64_t wshape[3],
                           const int64_t sshape[3], gqmm_device dev, gqmm_tensor t[3]) {
  t[0] = gqmm_tensor_make(b->p[1], GQMM_U32, ndim, wshape + 3 - ndim);
  t[1] = gqmm_tensor_make(b->p[2], GQMM_BF16, ndim, sshape + 3 - ndim);
  t[2] = gqmm_tensor_make(b->p[3], GQMM_BF16, ndim, sshape + 3 - ndim);
  for (int i = 0; i < 3; i++)
    t[i].device = dev;
}

/*
 * Times one point. Host inputs: x [rows, K] bf16, w/scales/biases of E
 * experts [E, N, ...], idx [rows] (NULL: quantized_matmul with x [M, K]).
 * Returns 0 or a status.
 */
static int time_point(sweep *s, point *p, const uint16_t *x, int64_t rows, const uint32_t *w,
                      const uint16_t *sc, const uint16_t *bi, const int32_t *idx) {
  const gqmm_quant q = {p->bits, p->group_size};
  const int64_t words = gqmm_packed_words(q, p->K), groups = p->K / p->group_size;
  const size_t nx = (size_t)(rows * p->K) * 2, nw = (size_t)((int64_t)p->E * p->N * words) * 4;
  const size_t ns = (size_t)((int64_t)p->E * p->N * groups) * 2, no = (size_t)(rows * p->N) * 2;
  const double set_bytes = (double)(nx + nw + 2 * ns);
  int copies = (int)ceil(3.0 * s->llc_bytes / set_bytes);
  if (copies < 1) copies = 1;
  if (copies > 8) copies = 8;
  buffers set[8];
  gqmm_packed *pk[8] = {NULL};
  memset(set, 0, sizeof set);
  int st = GQMM_OK;
  void *zero = calloc(1, no), *out = zero ? dev_put(s, zero, no) : NULL;
  free(zero);
  for (int c = 0; c < copies && out; c++) {
    set[c].p[0] = dev_put(s, x, nx);
    set[c].p[1] = dev_put(s, w, nw);
    set[c].p[2] = dev_put(s, sc, ns);
    set[c].p[3] = dev_put(s, bi, ns);
    if (!set[c].p[0] || !set[c].p[1] || !set[c].p[2] || !set[c].p[3]) st = GQMM_ERR_NOMEM;
  }
  if (!out) st = GQMM_ERR_NOMEM;
  const gqmm_device dev = s->be->mem_alloc ? GQMM_DEVICE_CUDA : GQMM_DEVICE_CPU;
  int64_t xshape[3] = {rows, 1, p->K}, wshape[3] = {p->E, p->N, words};
  int64_t sshape[3] = {p->E, p->N, groups}, ishape[1] = {rows}, oshape[3] = {rows, 1, p->N};
  int64_t qx[2] = {p->M, p->K}, qo[2] = {p->M, p->N};
  const int wdim = idx ? 3 : 2;
  for (int c = 0; s->packed && !st && c < copies; c++) {
    gqmm_tensor wt[3];
    weight_tensors(&set[c], wdim, wshape, sshape, dev, wt);
    st = gqmm_pack(s->ctx, &wt[0], &wt[1], &wt[2], q, &pk[c]);
  }
  double *times = NULL;
  int runs = 0, max_runs = s->min_runs;
  for (int r = -2; !st && r < max_runs; r++) {
    buffers *b = &set[(r + 2) % copies];
    gqmm_tensor tx, to, ti = {0}, wt[3];
    weight_tensors(b, wdim, wshape, sshape, dev, wt);
    if (idx) {
      tx = gqmm_tensor_make(b->p[0], GQMM_BF16, 3, xshape);
      to = gqmm_tensor_make(out, GQMM_BF16, 3, oshape);
      ti = gqmm_tensor_make((void *)idx, GQMM_I32, 1, ishape);
    } else {
      tx = gqmm_tensor_make(b->p[0], GQMM_BF16, 2, qx);
      to = gqmm_tensor_make(out, GQMM_BF16, 2, qo);
    }
    tx.device = to.device = dev;
    poison(s, out, no);
    if (s->be->sync) s->be->sync(s->ctx);
    const double t0 = gqmm__now_s();
    if (s->packed)
      st =
          gqmm_gather_qmm_packed(s->ctx, &tx, pk[(r + 2) % copies], NULL, idx ? &ti : NULL, 1, &to);
    else
      st = idx ? gqmm_gather_qmm(s->ctx, &tx, &wt[0], &wt[1], &wt[2], NULL, &ti, 1, q, 1, &to)
               : gqmm_quantized_matmul(s->ctx, &tx, &wt[0], &wt[1], &wt[2], 1, q, &to);
    if (!st && s->be->sync) st = s->be->sync(s->ctx);
    const double t = gqmm__now_s() - t0;
    if (st) break;
    if (r == -1) { /* the second warm-up decides how many runs fit */
      if (t > 0.25) max_runs = (int)fmax(5.0, fmin((double)s->min_runs, 8.0 / t));
      times = malloc((size_t)max_runs * sizeof(double));
      if (!times) st = GQMM_ERR_NOMEM;
    }
    if (r >= 0) times[runs++] = t;
  }
  if (!st && runs > 0) {
    qsort(times, (size_t)runs, sizeof(double), cmp_double);
    const double med = runs % 2 ? times[runs / 2] : 0.5 * (times[runs / 2 - 1] + times[runs / 2]);
    print_row(s, p, med, times[0], runs);
  } else if (st) {
    fprintf(stderr, "gqmm sweep: %s: %s\n", p->op, gqmm_last_error(s->ctx));
  }
  free(times);
  for (int c = 0; c < copies; c++)
    gqmm_packed_free(s->ctx, pk[c]);
  for (int c = 0; c < copies; c++)
    for (int i = 0; i < 4; i++)
      dev_free(s, set[c].p[i]);
  dev_free(s, out);
  return st;
}

/* Random packed weights and bf16 scales/biases of realistic magnitude. */
static int make_weights(sweep *s, int E, int N, int K, gqmm_quant q, uint32_t **w, uint16_t **sc,
                        uint16_t **bi) {
  const int64_t nw = (int64_t)E * N * gqmm_packed_words(q, K),
                ns = (int64_t)E * N * (K / q.group_size);
  *w = malloc((size_t)nw * 4);
  *sc = malloc((size_t)ns * 2);
  *bi = malloc((size_t)ns * 2);
  if (!*w || !*sc || !*bi) return GQMM_ERR_NOMEM;
  for (int64_t i = 0; i < nw; i++)
    (*w)[i] = next_u32(s) ^ (next_u32(s) << 16);
  for (int64_t i = 0; i < ns; i++) {
    (*sc)[i] = gqmm_f32_to_bf16(0.004f + 0.004f * (float)(next_u32(s) % 1000) / 1000.0f);
    (*bi)[i] = gqmm_f32_to_bf16(-0.03f - 0.03f * (float)(next_u32(s) % 1000) / 1000.0f);
  }
  return GQMM_OK;
}

static uint16_t *make_x(sweep *s, int64_t n) {
  uint16_t *x = malloc((size_t)n * 2);
  if (!x) return NULL;
  for (int64_t i = 0; i < n; i++)
    x[i] = gqmm_f32_to_bf16(((float)(next_u32(s) % 20001) - 10000.0f) / 10000.0f);
  return x;
}

/* The last-level cache as the kernel reports it in sysfs (sysconf's figure
 * is wrong on some virtual machines); 32 MB if unknown. */
static double cpu_llc_bytes(void) {
  double best = 0.0;
  for (int i = 0; i < 8; i++) {
    char path[96], buf[32] = "";
    snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
    FILE *f = fopen(path, "r");
    if (!f) continue;
    if (fgets(buf, sizeof buf, f)) {
      char *end = NULL;
      double v = strtod(buf, &end);
      if (end && (*end == 'K' || *end == 'k')) v *= 1024;
      if (end && (*end == 'M' || *end == 'm')) v *= 1024 * 1024;
      if (v > best) best = v;
    }
    fclose(f);
  }
  return best > 0 ? best : 32e6;
}

static int sweep_qmm(sweep *s, gqmm_quant q, int K) {
  const double bytes_per_row = (double)K * q.bits / 8 + 2.0 * 2 * K / q.group_size;
  int N = (int)ceil(4.0 * s->llc_bytes / bytes_per_row / 64.0) * 64;
  int most = 1; /* x holds the largest M's rows (--m goes to 512) */
  for (int i = 0; i < s->n_ms; i++)
    most = s->ms[i] > most ? s->ms[i] : most;
  uint32_t *w = NULL;
  uint16_t *sc = NULL, *bi = NULL, *x = make_x(s, (int64_t)most * K);
  int st = x ? make_weights(s, 1, N, K, q, &w, &sc, &bi) : GQMM_ERR_NOMEM;
  for (int i = 0; !st && i < s->n_ms; i++) {
    point p = {s->packed ? "qmm_pk" : "qmm",
               1,
               K,
               N,
               s->ms[i],
               q.bits,
               q.group_size,
               s->ms[i],
               N * bytes_per_row,
               (double)s->ms[i] * N * K};
    st = time_point(s, &p, x, s->ms[i], w, sc, bi, NULL);
  }
  free(w), free(sc), free(bi), free(x);
  return st;
}

static int sweep_gather(sweep *s, gqmm_quant q, int E, int K, int N, int topk) {
  uint32_t *w = NULL;
  uint16_t *sc = NULL, *bi = NULL;
  int st = make_weights(s, E, N, K, q, &w, &sc, &bi);
  const double bytes_per_expert = (double)N * K * q.bits / 8 + 2.0 * 2 * N * K / q.group_size;
  for (int i = 0; !st && i < s->n_ms; i++) {
    const int tokens = s->ms[i] * E / topk;
    const int64_t rows = (int64_t)tokens * topk;
    int32_t *idx = malloc((size_t)rows * 4);
    int *count = calloc((size_t)E, sizeof(int));
    uint16_t *x = make_x(s, rows * K);
    if (!idx || !count || !x) st = GQMM_ERR_NOMEM;
    /* random top-k routing: each token picks topk distinct experts (even:
     * token t takes experts t*topk .. t*topk+topk-1 mod E, so every expert
     * gets exactly rows/e rows, the same arithmetic per byte as qmm) */
    for (int t = 0; !st && t < tokens; t++) {
      int picked[64], np = 0;
      while (np < topk) {
        int e = s->even ? (t * topk + np) % E : (int)(next_u32(s) % (uint32_t)E), dup = 0;
        for (int j = 0; j < np; j++)
          dup |= picked[j] == e;
        if (!dup) picked[np++] = e;
      }
      for (int j = 0; j < topk; j++)
        count[picked[j]]++;
    }
    /* rows sorted by expert (mlx-lm's _gather_sort); x rows are the gathered ones */
    int used = 0;
    for (int e = 0, r = 0; !st && e < E; e++) {
      used += count[e] > 0;
      for (int c = 0; c < count[e]; c++)
        idx[r++] = e;
    }
    if (!st) {
      point p = {s->packed ? "gather_pk" : "gather",
                 E,
                 K,
                 N,
                 1,
                 q.bits,
                 q.group_size,
                 (double)rows / E,
                 used * bytes_per_expert,
                 (double)rows * N * K};
      st = time_point(s, &p, x, rows, w, sc, bi, idx);
    }
    free(idx), free(count), free(x);
  }
  free(w), free(sc), free(bi);
  return st;
}

int gqmm_cmd_sweep(int argc, char **argv) {
  gqmm_backend_kind kind = GQMM_BACKEND_AUTO;
  const char *json_path = NULL, *ops = "all";
  int int8 = 0, config = -1, threads = 0;
  double llc_mb = 0.0;
  sweep s;
  memset(&s, 0, sizeof s);
  for (int m = 1; m <= 128; m *= 2) /* the seed's sweep */
    s.ms[s.n_ms++] = m;
  s.min_runs = 20;
  s.rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)time(NULL);
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
      if (gqmm_cli_backend(argv[++i], &kind)) {
        fprintf(stderr, "gqmm sweep: unknown backend '%s'\n", argv[i]);
        return 2;
      }
    } else if (!strcmp(argv[i], "--json") && i + 1 < argc)
      json_path = argv[++i];
    else if (!strcmp(argv[i], "--op") && i + 1 < argc)
      ops = argv[++i];
    else if (!strcmp(argv[i], "--runs") && i + 1 < argc)
      s.min_runs = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--config") && i + 1 < argc)
      config = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
      threads = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--int8"))
      int8 = 1;
    else if (!strcmp(argv[i], "--packed"))
      s.packed = 1;
    else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
      s.rng = 0x9E3779B97F4A7C15ull ^ strtoull(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--routing") && i + 1 < argc) {
      s.even = !strcmp(argv[++i], "even");
      if (!s.even && strcmp(argv[i], "random")) {
        fprintf(stderr, "gqmm sweep: --routing must be random or even, not '%s'\n", argv[i]);
        return 2;
      }
    }
    else if (!strcmp(argv[i], "--llc-mb") && i + 1 < argc)
      llc_mb = atof(argv[++i]);
    else if (!strcmp(argv[i], "--m") && i + 1 < argc) {
      s.n_ms = 0; /* comma-separated, any M (the seed's are the default) */
      for (char *t = strtok(argv[++i], ","); t; t = strtok(NULL, ",")) {
        const int m = atoi(t);
        if (m < 1 || m > 512 || s.n_ms == 16) {
          fprintf(stderr, "gqmm sweep: --m takes up to 16 values in 1..512, not '%s'\n", t);
          return 2;
        }
        s.ms[s.n_ms++] = m;
      }
    } else {
      printf("usage: gqmm sweep [--backend auto|cpu|cuda] [--op all|qmm|gather] [--json FILE]\n"
             "                  [--runs N (default 20)] [--config ID] [--threads N]\n"
             "                  [--m 1,2,...  M / rows per expert (default 1,2,4,...,128)]\n"
             "                  [--llc-mb MB  cache size the shapes must exceed (default: sysfs)]\n"
             "                  [--int8  FAST MODE: int8-quantized activations, not exact]\n"
             "                  [--packed  weights packed at load by gqmm_pack (not timed)]\n"
             "                  [--routing random|even  gather: random top-8 (default) or\n"
             "                   exactly rows/e rows on every expert]\n"
             "                  [--seed N  inputs and routing (default: the time)]\n");
      return strcmp(argv[i], "--help") ? 2 : 0;
    }
  }
  if (s.min_runs < 1 || threads < 0) {
    fprintf(stderr, "gqmm sweep: --runs must be >= 1 and --threads >= 0\n");
    return 2;
  }
  gqmm_ctx_options o = {.backend = kind, .num_threads = threads, .cpu_int8_activations = int8};
  if (gqmm_ctx_create(&s.ctx, &o)) {
    fprintf(stderr, "gqmm sweep: cannot create a context\n");
    return 1;
  }
  s.ctx->forced_config = config;
  char cfg_name[64] = "auto";
  /* the backend `kind` selects for a bf16 4-bit problem on its device */
  for (const gqmm__backend *const *b = gqmm__backends(); *b && !s.be; b++) {
    gqmm__qmm_args a = {.dtype = GQMM_BF16,
                        .q = {4, 64},
                        .transpose = 1,
                        .device = (*b)->mem_alloc ? GQMM_DEVICE_CUDA : GQMM_DEVICE_CPU};
    if ((kind == GQMM_BACKEND_AUTO || (*b)->kind == kind) && (*b)->kind != GQMM_BACKEND_REF &&
        (*b)->supports_qmm(s.ctx, &a))
      s.be = *b;
    if (s.be && config >= 0 && s.be->configs) {
      gqmm__tile_config tc[64];
      int n = s.be->configs(s.ctx, &a, tc, 64);
      snprintf(cfg_name, sizeof cfg_name, "%s", config < n ? tc[config].name : "invalid");
    }
  }
  s.config = cfg_name;
  int rc = 1;
  if (!s.be || !s.be->ceilings) {
    fprintf(stderr, "gqmm sweep: no fast backend with ceilings for --backend\n");
    goto done;
  }
  if (s.be->ceilings(s.ctx, &s.ceil)) {
    fprintf(stderr, "gqmm sweep: ceilings: %s\n", gqmm_last_error(s.ctx));
    goto done;
  }
  s.llc_bytes = llc_mb > 0 ? llc_mb * 1e6 : s.be->mem_alloc ? 50e6 : cpu_llc_bytes();
  if (json_path && !(s.json = fopen(json_path, "w"))) {
    fprintf(stderr, "gqmm sweep: cannot write %s\n", json_path);
    goto done;
  }
  printf("gqmm sweep on %s%s\n", s.ceil.device_name,
         int8 ? "  ** FAST MODE: int8 activations **" : "");
  printf("ceilings (same run): copy %.2f GB/s, read %.2f GB/s, compute %.2f GMAC/s (%s); "
         "LLC %.0f MB\n",
         s.ceil.copy_GBps, s.ceil.read_GBps, s.ceil.compute_GMACps, s.ceil.compute_what,
         s.llc_bytes / 1e6);
  printf("%-9s %4s %5s %6s %4s %7s %11s %11s %6s %9s %9s %7s\n", "op", "E", "K", "N", "M", "rows/e",
         "median_us", "min_us", "runs", "wGB/s", "roof", "frac");
  if (s.json) fprintf(s.json, "[");
  const gqmm_quant q = {4, 64};
  int st = GQMM_OK;
  if (!strcmp(ops, "all") || !strcmp(ops, "qmm")) st = sweep_qmm(&s, q, 2816);
  if (!st && (!strcmp(ops, "all") || !strcmp(ops, "gather")))
    st = sweep_gather(&s, q, 128, 2816, 1408, 8);
  if (s.json) fprintf(s.json, "\n]\n");
  rc = st ? 1 : 0;
done:
  if (s.json) fclose(s.json);
  gqmm_ctx_destroy(s.ctx);
  return rc;
}
