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
#define PREFETCH_AHEAD GQMM__CPU_QMV_PREFETCH

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
  int op; /* 0 read, 1 copy, 2 peak, 3 read two prefetched streams */
  int threads;
  char *src, *dst;
  size_t bytes;
  const gqmm__cpu_isa *isa;
  bool int8, bf16; /* the peak of: the int8 step, the bf16 dot, else the FMA */
  double rate[256];
  unsigned long long sink[256];
} bench_job;

static void bench_task(void *arg, int t) {
  bench_job *b = arg;
  if (b->op == 2) {
    b->rate[t % 256] = b->bf16 ? b->isa->peak_bf16() : b->isa->peak_macs(b->int8);
    return;
  }
  const size_t part = b->bytes / (size_t)b->threads / 64 * 64, lo = part * (size_t)t;
  if (b->op == 1) {
    memcpy(b->dst + lo, b->src + lo, part);
    return;
  }
  /* read: 8 independent sums (one 64-byte line a step) the compiler
   * vectorizes, over one stream (op 0), or (op 3) two streams in lockstep
   * (the halves of the thread's part), each prefetched PREFETCH_AHEAD bytes
   * ahead, as the small-M kernels read weight rows in pairs: on the AVX-512
   * EPYC one stream a thread read 45-52 GB/s and two 51-55 */
  const unsigned long long *p = (const unsigned long long *)(b->src + lo);
  unsigned long long s[8] = {0};
  const size_t n = part / 8;
  if (b->op == 3) {
    const size_t h = n / 2 / 8 * 8;
    for (size_t i = 0; i + 8 <= h; i += 8) {
      __builtin_prefetch(p + i + PREFETCH_AHEAD / 8, 0, 0);
      __builtin_prefetch(p + h + i + PREFETCH_AHEAD / 8, 0, 0);
      for (int k = 0; k < 4; k++)
        s[k] += p[i + k] + p[i + k + 4];
      for (int k = 0; k < 4; k++)
        s[k + 4] += p[h + i + k] + p[h + i + k + 4];
    }
  } else {
    for (size_t i = 0; i + 8 <= n; i += 8)
      for (int k = 0; k < 8; k++)
        s[k] += p[i + k];
  }
  b->sink[t % 256] = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
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
  char *src = gqmm__alloc_stream(BUF_BYTES), *dst = gqmm__alloc_stream(BUF_BYTES / 2);
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
  /* exact mode's instruction for bf16 data where there is a bf16 dot (the
   * sweep's and the model bench's data): f32/f16 data runs the FMA, so for
   * those this peak overstates the roof and understates the fraction */
  b->bf16 = !b->int8 && st->isa->peak_bf16 && st->isa->qmv_bf16_supported();
  b->src = src;
  b->dst = dst;
  b->bytes = BUF_BYTES;
  const double plain = best_rate(st, b, 0, 1.0), ahead = best_rate(st, b, 3, 1.0);
  out->read_GBps = plain > ahead ? plain : ahead;
  b->bytes = BUF_BYTES / 2;
  out->copy_GBps = best_rate(st, b, 1, 2.0);
  b->op = 2;
  gqmm__cpu_pool_run(st->pool, bench_task, b);
  double macs = 0.0;
  for (int t = 0; t < st->threads && t < 256; t++)
    macs += b->rate[t];
  out->compute_GMACps = macs / 1e9;
  snprintf(out->compute_what, sizeof out->compute_what, "%s %s", st->isa->name,
           b->int8   ? st->isa->i8_what
           : b->bf16 ? "vdpbf16ps (bf16 data)"
                     : "fp32 fma");
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
