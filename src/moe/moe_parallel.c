/*
 * moe_parallel.c - split the layer's elementwise steps (activation, combine)
 * over threads by whole rows. Each row is computed by one thread in a fixed
 * order, so results do not depend on the thread count.
 */
#include "moe.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_THREADS 64

typedef struct {
  gqmm__moe_rows_fn fn;
  void *arg;
  int64_t begin, end;
} rows_task;

static void *run_task(void *p) {
  rows_task *t = p;
  t->fn(t->arg, t->begin, t->end);
  return NULL;
}

/* ctx->num_threads, else GQMM_NUM_THREADS, else the online cores. */
static int thread_count(const gqmm_ctx *ctx) {
  long n = ctx->num_threads;
  const char *env = getenv("GQMM_NUM_THREADS");
  if (n <= 0 && env) n = strtol(env, NULL, 10);
  if (n <= 0) n = sysconf(_SC_NPROCESSORS_ONLN);
  return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (int)n;
}

void gqmm__moe_parallel_rows(gqmm_ctx *ctx, int64_t rows, int64_t min_rows, gqmm__moe_rows_fn fn,
                             void *arg) {
  int n = thread_count(ctx);
  if (min_rows < 1) min_rows = 1;
  if (rows / min_rows < n) n = (int)(rows / min_rows > 0 ? rows / min_rows : 1);
  rows_task task[MAX_THREADS];
  pthread_t tid[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int i = 0; i < n; i++) {
    task[i] = (rows_task){fn, arg, rows * i / n, rows * (i + 1) / n};
    /* The caller's thread takes task 0; a thread that cannot start runs inline. */
    if (i > 0) started[i] = pthread_create(&tid[i], NULL, run_task, &task[i]) == 0;
  }
  run_task(&task[0]);
  for (int i = 1; i < n; i++) {
    if (started[i]) pthread_join(tid[i], NULL);
    else run_task(&task[i]);
  }
}
