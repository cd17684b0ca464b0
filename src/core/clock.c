/* clock.c - the one monotonic clock every timing in gqmm reads. */
#include "internal.h"

#include <time.h>

double gqmm__now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
