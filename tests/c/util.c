/* util.c - random inputs, poisoning and error measures for the C tests. */
#include "internal.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

test_rng test_rng_make(uint64_t salt) {
  static uint64_t run_seed; /* test-only: one seed per process */
  if (!run_seed) {
    const char *env = getenv("GQMM_TEST_SEED");
    run_seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL);
    if (!run_seed) run_seed = 1;
    fprintf(stderr, "GQMM_TEST_SEED=%llu\n", (unsigned long long)run_seed);
  }
  test_rng r = {run_seed * 0x9E3779B97F4A7C15ull ^ (salt * 0xD1B54A32D192ED03ull)};
  if (!r.s) r.s = 1;
  return r;
}

uint32_t test_rng_u32(test_rng *r) {
  r->s ^= r->s << 13;
  r->s ^= r->s >> 7;
  r->s ^= r->s << 17;
  return (uint32_t)(r->s >> 16);
}

float test_rng_normal(test_rng *r) {
  double u1 = (test_rng_u32(r) + 1.0) / 4294967297.0;
  double u2 = test_rng_u32(r) / 4294967296.0;
  return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void test_fill(test_rng *r, void *buf, gqmm_dtype dtype, int64_t n, float scale) {
  for (int64_t i = 0; i < n; i++) {
    float v = test_rng_normal(r) * scale;
    if (dtype == GQMM_F32)
      ((float *)buf)[i] = v;
    else if (dtype == GQMM_F16)
      ((uint16_t *)buf)[i] = gqmm_f32_to_f16(v);
    else
      ((uint16_t *)buf)[i] = gqmm_f32_to_bf16(v);
  }
}

static double load(const void *p, gqmm_dtype t, int64_t i) {
  if (t == GQMM_F32) return ((const float *)p)[i];
  if (t == GQMM_F16) return gqmm_f16_to_f32(((const uint16_t *)p)[i]);
  return gqmm_bf16_to_f32(((const uint16_t *)p)[i]);
}

double test_rel_err(const void *a, gqmm_dtype ta, const void *b, gqmm_dtype tb, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; i++) {
    double x = load(a, ta, i), y = load(b, tb, i);
    if (isnan(x) || isnan(y)) return INFINITY;
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

void test_poison(void *buf, gqmm_dtype dtype, int64_t n) {
  if (dtype == GQMM_F32) {
    for (int64_t i = 0; i < n; i++)
      ((float *)buf)[i] = NAN;
  } else {
    for (int64_t i = 0; i < n; i++)
      ((uint16_t *)buf)[i] = dtype == GQMM_F16 ? 0x7e00 : 0x7fc0;
  }
}

gqmm_ctx *test_ctx(gqmm_backend_kind kind) {
  gqmm_ctx_options o = {.backend = kind};
  gqmm_ctx *c = NULL;
  return gqmm_ctx_create(&c, &o) == GQMM_OK ? c : NULL;
}

const gqmm__backend *test_backend(gqmm_backend_kind kind) {
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++)
    if ((*b)->kind == kind) return *b;
  return NULL;
}
