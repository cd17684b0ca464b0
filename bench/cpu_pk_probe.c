/*
 * cpu_pk_probe.c - the CPU packed kernels' rate per tile height, one thread,
 * weights in L2: what each tile's arithmetic can do without the memory
 * stream (kernel design data, not the library; docs/perf-notes.md, session
 * 15). It calls the AVX-512 ISA entry (cpu_isa.h packed) the way
 * cpu_loops.c's unit_packed does, on `panels` panels of 4-bit g64 weights
 * (default 4: ~400 KB, in L2 on Zen 4/5; 2000 makes it a memory stream),
 * and prints GMAC/s per row count beside the instruction's peak.
 *
 *   gqmm_cpu_pk_probe [panels] [--int8]
 */
#include "cpu_isa.h"
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
  const gqmm__cpu_isa *isa = &gqmm__cpu_isa_avx512;
  if (!isa->supported() || !isa->packed || !isa->qmv_bf16_supported()) {
    fprintf(stderr, "cpu_pk_probe: this CPU has no AVX-512 BF16 packed kernel\n");
    return 1;
  }
  int panels = 4, i8 = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--int8"))
      i8 = 1;
    else if (atoi(argv[i]) >= 2)
      panels = atoi(argv[i]) & ~1; /* whole pairs */
    else {
      fprintf(stderr, "usage: gqmm_cpu_pk_probe [panels >= 2] [--int8]\n");
      return 2;
    }
  }
  const int K = 2816, gs = 64, bits = 4, G = K / gs;
  const int64_t rec = gqmm__cpu_pk_rec(bits, gs);
  const gqmm__cpu_pkshape ps = {bits, gs, GQMM_BF16, G, rec, G * rec};
  uint8_t *pk = aligned_alloc(64, (size_t)(panels * ps.panel_bytes));
  uint16_t *xb = aligned_alloc(64, (size_t)GQMM__CPU_PK_MAX_ROWS * K * 2);
  float *sums = malloc(sizeof(float) * 2 * GQMM__CPU_PK_MAX_ROWS * G);
  float *C = aligned_alloc(64, sizeof(float) * GQMM__CPU_PK_MAX_ROWS * 128);
  if (!pk || !xb || !sums || !C) return 1;
  /* any finite data: the rate does not depend on the values */
  for (int64_t i = 0; i < panels * ps.panel_bytes; i++)
    pk[i] = (uint8_t)(i * 37 + 11);
  for (int i = 0; i < GQMM__CPU_PK_MAX_ROWS * K; i++)
    xb[i] = (uint16_t)(0x3f80 + (i & 15)); /* bf16 1.0 ... 1.12; as int8 codes, small */
  for (int i = 0; i < 2 * GQMM__CPU_PK_MAX_ROWS * G; i++)
    sums[i] = 0.01f;
  printf("gqmm_cpu_pk_probe: %d panels (%.0f KB), %s, one thread; GMAC/s (peak: %.0f)\n", panels,
         panels * ps.panel_bytes / 1024.0, i8 ? "int8 mode (vpdpbusd)" : "bf16 (vdpbf16ps)",
         (i8 ? isa->peak_macs(true) : isa->peak_bf16()) / 1e9);
  for (int mr = 1; mr <= GQMM__CPU_PK_MAX_ROWS; mr++) {
    const int nv = GQMM__CPU_PK_VECTORS(mr, i8);
    const uint8_t *x[GQMM__CPU_PK_MAX_ROWS];
    for (int m = 0; m < mr; m++)
      x[m] = (const uint8_t *)(xb + m * K);
    const int reps = panels > 64 ? 3 : 1000;
    const double t0 = gqmm__now_s();
    for (int r = 0; r < reps; r++)
      for (int p = 0; p < panels; p += 2)
        for (int v0 = 0; v0 < 8; v0 += nv) /* a pair of panels, as unit_packed */
          isa->packed(&ps, pk + (p + v0 / 4) * ps.panel_bytes, nv, x, mr,
                      i8 ? sums + GQMM__CPU_PK_MAX_ROWS * G : NULL, sums, C + 16 * v0, 128);
    const double s = gqmm__now_s() - t0, macs = (double)reps * panels * 64 * K * mr;
    printf("  %d row%s x %d vectors: %7.1f GMAC/s\n", mr, mr > 1 ? "s" : " ", nv, macs / s / 1e9);
  }
  free(pk), free(xb), free(sums), free(C);
  return 0;
}
