/*
 * mem.c - host memory for the buffers the kernels stream (gqmm_pack's CPU
 * copies, the CPU ceilings' buffers) and the work buffers kept between
 * calls (the CPU backend's scratch and x sums, the host MoE layer's).
 *
 * Why huge pages. A packed copy is hundreds of MB read once per call in
 * long linear runs. With 4 KB pages every 4 KB of the stream is a TLB miss
 * (the L2 TLB covers ~16 MB), a page walk the prefetchers cannot start
 * early. In 2 MB pages (Linux transparent huge pages, asked for with
 * madvise where the system leaves THP to the program) the packed kernels ran
 * 2.5-3.7% faster on the 2-core AVX-512 EPYC (docs/perf-notes.md, session
 * 15), and a copy packs with 512x fewer page faults. The ceilings' buffers
 * take the same pages, so a fraction of the ceiling compares like with like.
 * Elsewhere, or when the system refuses, these are plain 64-byte aligned
 * allocations; either way free() releases them.
 *
 * Why buffers kept between calls. Past malloc's largest reuse threshold
 * (32 MB) a buffer freed after each call is mapped afresh by the next, and
 * the kernel zeroes every page again: the int8 codes at 128 rows per
 * expert (46 MB) and the MoE layer's buffers at 8 canvases (~160 MB) cost
 * 10-17% of their calls that way.
 */
#define _DEFAULT_SOURCE /* madvise under -std=c11 */
#include "internal.h"

#include <stdlib.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define HUGE_BYTES ((size_t)2 << 20)

void *gqmm__alloc_stream(size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= 2 * HUGE_BYTES) {
    const size_t whole = (bytes + HUGE_BYTES - 1) & ~(HUGE_BYTES - 1);
    void *p = aligned_alloc(HUGE_BYTES, whole);
    if (p) (void)madvise(p, whole, MADV_HUGEPAGE); /* a hint: plain pages if refused */
    return p;
  }
#endif
  return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}

int gqmm__reserve(void **buf, size_t *cap, size_t need) {
  if (*cap >= need) return 0;
  free(*buf);
  *buf = gqmm__alloc_stream(need);
  *cap = *buf ? need : 0;
  return *buf ? 0 : -1;
}
