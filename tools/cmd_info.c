/* cmd_info.c - `gqmm info`: version, CPU features, compiled backends. */
#include "cli.h"
#include "internal.h"

#include <stdio.h>
#include <string.h>

int gqmm_cmd_info(int argc, char **argv) {
  if (argc > 1 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
    printf("usage: gqmm info\n");
    return 0;
  }
  char feat[256];
  gqmm_cpu_features(feat, sizeof feat);
  printf("gqmm %s\n", gqmm_version());
  printf("cpu: %s\n", feat);
  printf("backends:");
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++) printf(" %s", (*b)->name);
  printf("\n");
  return 0;
}
