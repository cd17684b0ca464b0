/*
 * test.h - the C test runner's interface. A test file defines cases with
 * GQMM_TEST(name) { ... }; they register themselves at start-up, and
 * `gqmm_tests [--file test_x] [--case substring]` runs them.
 * Checks never abort: a failed CHECK marks the case failed and returns.
 */
#ifndef GQMM_TEST_H
#define GQMM_TEST_H

#include "gqmm.h"

#include <stdint.h>
#include <stdio.h>

typedef void (*gqmm_test_fn)(int *failed);
void gqmm_test_register(const char *file, const char *name, gqmm_test_fn fn);

#define GQMM_TEST(name)                                            \
  static void test_##name(int *gqmm_test_failed);                  \
  __attribute__((constructor)) static void register_##name(void) { \
    gqmm_test_register(__FILE__, #name, test_##name);              \
  }                                                                \
  static void test_##name(int *gqmm_test_failed)

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      fprintf(stderr, "  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      *gqmm_test_failed = 1;                                                     \
      return;                                                                    \
    }                                                                            \
  } while (0)

#define CHECK_MSG(cond, ...)                                                     \
  do {                                                                           \
    if (!(cond)) {                                                               \
      fprintf(stderr, "  %s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                              \
      fprintf(stderr, "\n");                                                     \
      *gqmm_test_failed = 1;                                                     \
      return;                                                                    \
    }                                                                            \
  } while (0)

#define CHECK_OK(expr)                                                          \
  do {                                                                          \
    int st_ = (expr);                                                           \
    CHECK_MSG(st_ == GQMM_OK, "%s -> %d (%s)", #expr, st_, gqmm_strerror(st_)); \
  } while (0)

/* ---- helpers (tests/c/util.c) ---- */

/* Deterministic per-case generator; seeds differ per case and per run of
 * GQMM_TEST_SEED, so inputs are fresh but failures reproducible. */
typedef struct {
  uint64_t s;
} test_rng;
test_rng test_rng_make(uint64_t salt);
uint32_t test_rng_u32(test_rng *r);
float test_rng_normal(test_rng *r);
/* n random float values (normal * scale) stored as dtype. */
void test_fill(test_rng *r, void *buf, gqmm_dtype dtype, int64_t n, float scale);
/* Relative error ||a - b|| / ||b|| over n elements of two float buffers. */
double test_rel_err(const void *a, gqmm_dtype ta, const void *b, gqmm_dtype tb, int64_t n);
/* A context on backend `kind` (NULL if it cannot be created). */
gqmm_ctx *test_ctx(gqmm_backend_kind kind);
/* The compiled-in backend of this kind, NULL if it is not built. */
struct gqmm__backend;
const struct gqmm__backend *test_backend(gqmm_backend_kind kind);
/* Fill with a NaN pattern so unwritten outputs are caught. */
void test_poison(void *buf, gqmm_dtype dtype, int64_t n);

#endif
