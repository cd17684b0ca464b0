/* gqmm.c - the command-line tool's entry point and command table. */
#include "cli.h"

#include <stdio.h>
#include <string.h>

static const gqmm_cli_command commands[] = {
    {"info", "library version, CPU features and GPUs", gqmm_cmd_info},
    {"verify", "run every backend against the reference; non-zero exit on any failure",
     gqmm_cmd_verify},
    {"bench", "time the MoE expert layers of a model step (see gqmm bench --help)", gqmm_cmd_bench},
    {"moe", "run one MoE expert layer on random data, checked against the reference", gqmm_cmd_moe},
    {"tune", "measure tile configs, cache the fastest (see gqmm tune --help)", gqmm_cmd_tune},
    {"cuda-bench", "CUDA ceilings, seed shapes and weight-reuse sweep (JSON)", gqmm_cmd_cuda_bench},
};

static void usage(FILE *f) {
  fprintf(f, "gqmm %s - gathered low-bit quantized matmul (MLX affine format)\n\n"
             "usage: gqmm <command> [options]   (gqmm <command> --help for its options)\n\n"
             "commands:\n",
          gqmm_version());
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    fprintf(f, "  %-8s %s\n", commands[i].name, commands[i].summary);
}

int gqmm_cli_backend(const char *s, gqmm_backend_kind *kind) {
  if (!strcmp(s, "auto")) *kind = GQMM_BACKEND_AUTO;
  else if (!strcmp(s, "ref")) *kind = GQMM_BACKEND_REF;
  else if (!strcmp(s, "cpu")) *kind = GQMM_BACKEND_CPU;
  else if (!strcmp(s, "cuda")) *kind = GQMM_BACKEND_CUDA;
  else return -1;
  return 0;
}

gqmm_ctx *gqmm_cli_ctx(gqmm_backend_kind kind) {
  gqmm_ctx_options o = {.backend = kind};
  gqmm_ctx *ctx = NULL;
  int st = gqmm_ctx_create(&ctx, &o);
  if (st) fprintf(stderr, "gqmm: cannot create context: %s\n", gqmm_strerror(st));
  return ctx;
}

int main(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
      !strcmp(argv[1], "help")) {
    usage(stdout);
    return argc < 2 ? 2 : 0;
  }
  if (!strcmp(argv[1], "--version")) {
    printf("gqmm %s\n", gqmm_version());
    return 0;
  }
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
  fprintf(stderr, "gqmm: unknown command '%s'\n\n", argv[1]);
  usage(stderr);
  return 2;
}
