/* cpu_features.c - what the CPU offers, for `gqmm info` and ISA dispatch. */
#include "internal.h"

#include <stdio.h>

void gqmm_cpu_features(char *buf, size_t len) {
  if (!buf || !len) return;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  snprintf(buf, len,
           "x86_64 avx2=%d fma=%d f16c=%d avx512f=%d avx512bw=%d avx512vnni=%d "
           "avx512bf16=%d",
           __builtin_cpu_supports("avx2") ? 1 : 0, __builtin_cpu_supports("fma") ? 1 : 0,
           __builtin_cpu_supports("f16c") ? 1 : 0, __builtin_cpu_supports("avx512f") ? 1 : 0,
           __builtin_cpu_supports("avx512bw") ? 1 : 0, __builtin_cpu_supports("avx512vnni") ? 1 : 0,
           __builtin_cpu_supports("avx512bf16") ? 1 : 0);
#else
  snprintf(buf, len, "portable (no x86-64 feature detection)");
#endif
}
