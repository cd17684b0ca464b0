/* cli.h - shared pieces of the gqmm command-line tool: one function per command. */
#ifndef GQMM_CLI_H
#define GQMM_CLI_H

#include "gqmm.h"

typedef struct {
  const char *name;
  const char *summary;
  int (*run)(int argc, char **argv); /* argv[0] is the command name */
} gqmm_cli_command;

int gqmm_cmd_info(int argc, char **argv);
int gqmm_cmd_verify(int argc, char **argv);
int gqmm_cmd_bench(int argc, char **argv);
int gqmm_cmd_moe(int argc, char **argv);
int gqmm_cmd_tune(int argc, char **argv);
int gqmm_cmd_cuda_bench(int argc, char **argv);

/* Parses "--backend cpu|cuda|ref|auto"; returns 0 and sets *kind, or -1. */
int gqmm_cli_backend(const char *s, gqmm_backend_kind *kind);
/* Creates a context for --backend, printing the error on failure. */
gqmm_ctx *gqmm_cli_ctx(gqmm_backend_kind kind);

#endif
