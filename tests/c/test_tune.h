/* test_tune.h - helpers shared by the tuning tests (test_tune_*.c). */
#ifndef GQMM_TEST_TUNE_H
#define GQMM_TEST_TUNE_H

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* A per-process cache path under $TMPDIR (or /tmp), so parallel ctest runs
 * never share a file by accident. */
static inline void tmp_path(char *buf, size_t n, const char *tag) {
  const char *dir = getenv("TMPDIR");
  snprintf(buf, n, "%s/gqmm-test-%ld-%s.json", dir && dir[0] ? dir : "/tmp", (long)getpid(), tag);
}

/* Remove a cache file and its lock file. */
static inline void remove_cache(const char *path) {
  char lock[1100];
  snprintf(lock, sizeof lock, "%s.lock", path);
  unlink(path);
  unlink(lock);
}

#endif
