/*
 * backend_cuda.h - what backend_cuda.c (the gqmm__backend of the GPU) and
 * moe_cuda.c (its MoE layer) call of each other.
 */
#ifndef GQMM_BACKEND_CUDA_H
#define GQMM_BACKEND_CUDA_H

#include "internal.h"
#include "kernels.h"

/* moe_cuda.c: the moe_forward / moe_phases hooks and the release of its state. */
int gqmm__cuda_moe_forward(gqmm_ctx *ctx, const gqmm__moe_args *a);
int gqmm__cuda_moe_phases(gqmm_ctx *ctx, double phase_s[5]);
void gqmm__cuda_moe_release(void *moe);
/* GQMM_ERR_ARG (and clears it) if a finished layer call had an expert id
 * outside [0, E) (the deferred check, see moe_cuda.c); else GQMM_OK. */
int gqmm__cuda_moe_take_error(gqmm_ctx *ctx);

/* backend_cuda.c: the slot in its per-context state where moe_cuda.c keeps
 * its own (NULL: no GPU state), and the config a gathered GEMM runs with
 * (forced, tuned, else the heuristic). */
void **gqmm__cuda_moe_slot(gqmm_ctx *ctx);
/* ctx's stream (NULL: the legacy default stream); whether a graph is
 * recording on it (gqmm_graph_begin), and GQMM_ERR_UNSUPPORTED naming
 * `what` if so (else GQMM_OK). */
gqmm__cu_stream gqmm__cuda_stream(gqmm_ctx *ctx);
bool gqmm__cuda_recording(gqmm_ctx *ctx);
int gqmm__cuda_refuse_recording(gqmm_ctx *ctx, const char *what);
int gqmm__cuda_pick_config(gqmm_ctx *ctx, const gqmm__qmm_args *a);
/* The persistent grid of tensor-core config cfg's kernel instance for k (its
 * occupancy times the SMs), asked of the runtime once per instance and
 * context; a cudaError_t. */
int gqmm__cuda_grid(gqmm_ctx *ctx, int cfg, const gqmm__cu_qmm *k, int *grid);
/* Whether config id cfg can run k: a tensor-core config that fits it, or
 * the generic kernel for weights in MLX's layout. */
bool gqmm__cuda_config_valid(int cfg, const gqmm__cu_qmm *k);

/* The kernel arguments a gqmm_pack copy sets (pk NULL: the MLX layout). */
static inline void gqmm__cuda_set_packed(gqmm__cu_qmm *k, const struct gqmm_packed *pk) {
  k->packed = pk ? (const uint8_t *)pk->data : NULL;
  k->glu = pk ? pk->glu : 0;
  k->packed_lin = pk ? pk->scaled : 0;
}

#endif
