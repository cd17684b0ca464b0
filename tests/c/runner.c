/* runner.c - registers and runs the C test cases; prints "N passed, N failed". */
#include "test.h"

#include <stdlib.h>
#include <string.h>

#define MAX_TESTS 1024

typedef struct {
  const char *file;
  const char *name;
  gqmm_test_fn fn;
} test_case;

static test_case cases[MAX_TESTS];
static int n_cases;

void gqmm_test_register(const char *file, const char *name, gqmm_test_fn fn) {
  if (n_cases < MAX_TESTS) cases[n_cases++] = (test_case){file, name, fn};
}

int main(int argc, char **argv) {
  const char *file_filter = NULL, *case_filter = NULL;
  int list = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--file") && i + 1 < argc)
      file_filter = argv[++i];
    else if (!strcmp(argv[i], "--case") && i + 1 < argc)
      case_filter = argv[++i];
    else if (!strcmp(argv[i], "--list"))
      list = 1;
    else {
      fprintf(stderr, "usage: gqmm_tests [--file test_x] [--case substring] [--list]\n");
      return 2;
    }
  }
  int passed = 0, failed = 0;
  for (int i = 0; i < n_cases; i++) {
    const test_case *c = &cases[i];
    if (file_filter && !strstr(c->file, file_filter)) continue;
    if (case_filter && !strstr(c->name, case_filter)) continue;
    if (list) {
      printf("%s %s\n", c->file, c->name);
      continue;
    }
    int f = 0;
    c->fn(&f);
    printf("%s %s\n", f ? "FAIL" : "ok  ", c->name);
    fflush(stdout);
    if (f)
      failed++;
    else
      passed++;
  }
  if (!list) printf("%d passed, %d failed\n", passed, failed);
  if (!list && passed + failed == 0) {
    fprintf(stderr, "no test matched\n");
    return 1;
  }
  return failed ? 1 : 0;
}
