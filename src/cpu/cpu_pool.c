/*
 * cpu_pool.c - a fork-join pool on pthreads. Workers sleep on a condition
 * variable between calls; a call bumps the generation, every worker runs
 * the task once with its own index, the last one to finish wakes the caller.
 */
#include "cpu_pool.h"

#include <pthread.h>
#include <stdlib.h>

struct gqmm__cpu_pool {
  int threads;
  pthread_t *tids;
  pthread_mutex_t mu;
  pthread_cond_t wake, done;
  unsigned long generation;
  int pending; /* workers still running the current task */
  int stop;
  gqmm__cpu_task task;
  void *arg;
};

typedef struct {
  gqmm__cpu_pool *p;
  int index;
} worker_arg;

static void *worker(void *va) {
  worker_arg wa = *(worker_arg *)va;
  free(va);
  gqmm__cpu_pool *p = wa.p;
  unsigned long seen = 0;
  for (;;) {
    pthread_mutex_lock(&p->mu);
    while (!p->stop && p->generation == seen)
      pthread_cond_wait(&p->wake, &p->mu);
    if (p->stop) {
      pthread_mutex_unlock(&p->mu);
      return NULL;
    }
    seen = p->generation;
    gqmm__cpu_task task = p->task;
    void *arg = p->arg;
    pthread_mutex_unlock(&p->mu);
    task(arg, wa.index);
    pthread_mutex_lock(&p->mu);
    if (--p->pending == 0) pthread_cond_signal(&p->done);
    pthread_mutex_unlock(&p->mu);
  }
}

gqmm__cpu_pool *gqmm__cpu_pool_create(int threads) {
  gqmm__cpu_pool *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->threads = threads < 1 ? 1 : threads;
  p->tids = calloc((size_t)p->threads, sizeof(pthread_t));
  if (!p->tids) {
    free(p);
    return NULL;
  }
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->wake, NULL);
  pthread_cond_init(&p->done, NULL);
  for (int t = 1; t < p->threads; t++) {
    worker_arg *wa = malloc(sizeof *wa);
    if (wa) *wa = (worker_arg){p, t};
    if (!wa || pthread_create(&p->tids[t], NULL, worker, wa) != 0) {
      free(wa);
      p->threads = t; /* keep the workers that started */
      break;
    }
  }
  return p;
}

void gqmm__cpu_pool_destroy(gqmm__cpu_pool *p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  for (int t = 1; t < p->threads; t++)
    pthread_join(p->tids[t], NULL);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->wake);
  pthread_cond_destroy(&p->done);
  free(p->tids);
  free(p);
}

int gqmm__cpu_pool_threads(const gqmm__cpu_pool *p) {
  return p ? p->threads : 1;
}

void gqmm__cpu_pool_run(gqmm__cpu_pool *p, gqmm__cpu_task task, void *arg) {
  if (!p || p->threads == 1) {
    task(arg, 0);
    return;
  }
  pthread_mutex_lock(&p->mu);
  p->task = task;
  p->arg = arg;
  p->pending = p->threads - 1;
  p->generation++;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  task(arg, 0);
  pthread_mutex_lock(&p->mu);
  while (p->pending > 0)
    pthread_cond_wait(&p->done, &p->mu);
  pthread_mutex_unlock(&p->mu);
}
