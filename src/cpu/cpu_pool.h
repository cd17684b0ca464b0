/*
 * cpu_pool.h - the CPU backend's persistent thread pool: created once per
 * context (ctx->cpu_state), never more threads than asked for, the calling
 * thread is worker 0, so a 1-thread pool runs inline with no threads at all.
 */
#ifndef GQMM_CPU_POOL_H
#define GQMM_CPU_POOL_H

typedef struct gqmm__cpu_pool gqmm__cpu_pool;
typedef void (*gqmm__cpu_task)(void *arg, int thread);

/* NULL on failure (then run everything on one thread). */
gqmm__cpu_pool *gqmm__cpu_pool_create(int threads);
void gqmm__cpu_pool_destroy(gqmm__cpu_pool *p);
int gqmm__cpu_pool_threads(const gqmm__cpu_pool *p);
/* Runs task(arg, t) for every t in [0, threads) at once; returns when all end. */
void gqmm__cpu_pool_run(gqmm__cpu_pool *p, gqmm__cpu_task task, void *arg);

#endif
