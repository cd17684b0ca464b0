/*
 * cpu_ceilings.c - the same-run ceilings a CPU benchmark figure is divided
 * by, measured on every thread of the pool at once: memory copy (bytes read
 * + written) and read-only bandwidth over buffers far larger than the
 * last-level cache, and the peak multiply-add rate of the instruction the
 * kernels use (the ISA's peak loop: vector FMA, or the int8 step).
 */
#include "cpu_backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUF_BYTES ((size_t)512 << 20) /* 16x a 32 MB LLC */


double gqmm__cpu_time_peak(double (*loop)(long iters), double macs_per_iter) {
  long iters = 1 << 14;
  for (;;) {
    const double t0 = gqmm__now_s();
    volatile double sink = loop(iters);
    (void)sink;
    const double dt = gqmm__now_s() - t0;
    if (dt > 0.05 || iters > (1L << 34)) return (double)iters * macs_per_iter / dt;
    iters *= dt > 0.005 ? (long)(0.06 / dt) + 1 : 8;
  }
}

typedef struct {
  int op; /* 0 read, 1 copy, 2 peak */
  int threads;
  char *src, *dst;
  size_t bytes;
  const gqmm__cpu_isa *isa;
  bool int8;
  double rate[256];
  unsigned long long sink[256];
} bench_job;

static void bench_task(void *arg, int t) {
  bench_job *b = arg;
  if (b->op == 2) {
    b->rate[t % 256] = b->isa->peak_macs(b->int8);
    return;
  }
  const size_t part = b->bytes / (size_t)b->threads / 64 * 64, lo = part * (size_t)t;
  if (b->op == 1) {
    memcpy(b->dst + lo, b->src + lo, part);
    return;
  }
  /* read: 4 independent sums the compiler vectorizes */
  const unsigned long long *p = (const unsigned long long *)(b->src + lo);
  unsigned long long s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = 0; i + 4 <= part / 8; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  b->sink[t % 256] = s0 + s1 + s2 + s3;
}

/* Best of 5 timed passes of op (GB/s counting `factor` x bytes). */
static double best_rate(gqmm__cpu_state *st, bench_job *b, int op, double factor) {
  b->op = op;
  double best = 0.0;
  for (int rep = 0; rep < 5; rep++) {
    const double t0 = gqmm__now_s();
    gqmm__cpu_pool_run(st->pool, bench_task, b);
    const double r = factor * (double)b->bytes / (gqmm__now_s() - t0) / 1e9;
    if (r > best) best = r;
  }
  return best;
}

int gqmm__cpu_ceilings(gqmm_ctx *ctx, gqmm__cpu_state *st, bool int8, gqmm__ceilings *out) {
  bench_job *b = calloc(1, sizeof *b);
  char *src = malloc(BUF_BYTES), *dst = malloc(BUF_BYTES / 2);
  if (!b || !src || !dst) {
    free(b), free(src), free(dst);
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "cpu ceilings: cannot allocate %zu MB of buffers",
                      (BUF_BYTES + BUF_BYTES / 2) >> 20);
  }
  /* touch every page with non-zero data so nothing reads the zero page */
  for (size_t i = 0; i < BUF_BYTES; i++)
    src[i] = (char)(i * 131u >> 3);
  memset(dst, 1, BUF_BYTES / 2);
  b->threads = st->threads;
  b->isa = st->isa;
  b->int8 = int8 && st->isa->qmv_i8;
  b->src = src;
  b->dst = dst;
  b->bytes = BUF_BYTES;
  out->read_GBps = best_rate(st, b, 0, 1.0);
  b->bytes = BUF_BYTES / 2;
  out->copy_GBps = best_rate(st, b, 1, 2.0);
  b->op = 2;
  gqmm__cpu_pool_run(st->pool, bench_task, b);
  double macs = 0.0;
  for (int t = 0; t < st->threads && t < 256; t++)
    macs += b->rate[t];
  out->compute_GMACps = macs / 1e9;
  snprintf(out->compute_what, sizeof out->compute_what, "%s %s", st->isa->name,
           b->int8 ? st->isa->i8_what : "fp32 fma");
  char model[64] = "CPU";
  FILE *f = fopen("/proc/cpuinfo", "r"); /* "model name : AMD EPYC" on Linux */
  for (char line[256]; f && fgets(line, sizeof line, f);) {
    char *colon = strchr(line, ':');
    if (strncmp(line, "model name", 10) || !colon) continue;
    snprintf(model, sizeof model, "%s", colon + 2);
    model[strcspn(model, "\n")] = 0;
    break;
  }
  if (f) fclose(f);
  snprintf(out->device_name, sizeof out->device_name, "%s, %s, %d threads", model, st->isa->name,
           st->threads);
  free(b), free(src), free(dst);
  return GQMM_OK;
}
