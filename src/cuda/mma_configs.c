/*
 * mma_configs.c - the tensor-core configs of both gather kernels as one list
 * (ids 0..plain-1: qmm_mma.cu, then qmm_fold.cu), so the backend, the MoE
 * layer and the tuner see one table of named configs.
 */
#include "kernels.h"

#include <cuda_runtime_api.h>

static int plain_n(void) { return gqmm__cu_plain_config_count(); }
static int is_fold(int cfg) { return cfg >= plain_n(); }

int gqmm__cu_mma_config_count(void) { return plain_n() + gqmm__cu_fold_config_count(); }

const gqmm__cu_mma_config *gqmm__cu_mma_config_get(int i) {
  if (i < 0) return NULL;
  return is_fold(i) ? gqmm__cu_fold_config_get(i - plain_n()) : gqmm__cu_plain_config_get(i);
}

int gqmm__cu_mma_tok_max(int cfg) {
  const gqmm__cu_mma_config *c = gqmm__cu_mma_config_get(cfg);
  return c ? c->tok_max : 0;
}

int gqmm__cu_mma_tile_n(int cfg) {
  const gqmm__cu_mma_config *c = gqmm__cu_mma_config_get(cfg);
  return c ? c->warps * c->mtiles * 16 : 0;
}

int gqmm__cu_mma_config_eligible(int cfg, const gqmm__cu_qmm *a) {
  if (!gqmm__cu_mma_config_get(cfg)) return 0;
  return is_fold(cfg) ? gqmm__cu_fold_eligible(a) : gqmm__cu_mma_eligible(a);
}

int64_t gqmm__cu_mma_scratch_bytes(int cfg, const gqmm__cu_qmm *a) {
  return is_fold(cfg) ? gqmm__cu_fold_scratch_bytes(a) : 0;
}

int gqmm__cu_mma_grid(int cfg, const gqmm__cu_qmm *a, int sms, int *out_grid) {
  if (!gqmm__cu_mma_config_eligible(cfg, a)) return (int)cudaErrorInvalidValue;
  return is_fold(cfg) ? gqmm__cu_fold_grid(cfg - plain_n(), a, sms, out_grid)
                      : gqmm__cu_plain_grid(cfg, a, sms, out_grid);
}

int gqmm__cu_mma_run(int cfg, const gqmm__cu_qmm *a, const gqmm__cu_plan *plan, int experts,
                     int grid, void *scratch) {
  if (!gqmm__cu_mma_config_eligible(cfg, a)) return (int)cudaErrorInvalidValue;
  return is_fold(cfg) ? gqmm__cu_fold_run(cfg - plain_n(), a, plan, experts, grid, scratch)
                      : gqmm__cu_plain_run(cfg, a, plan, experts, grid);
}
