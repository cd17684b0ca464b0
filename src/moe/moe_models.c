/*
 * moe_models.c - expert-layer shapes of public MoE models, for `gqmm bench`.
 * Only the expert layers matter here (attention and dense layers are not
 * gqmm's job); numbers come from each model's published config.json.
 */
#include "internal.h"

#include <string.h>

static const gqmm_moe_model models[] = {
    /* The seed's model: 30 * 128 * (2816*1408 + 704*2816) weights * 4.5 bits = 12.8 GB. */
    {"diffusiongemma-26b-a4b", 30, 128, 8, 2816, 704, GQMM_ACT_GEGLU, GQMM_ROUTER_SOFTMAX_TOPK_NORM,
     {4, 64}, "seed (mlx discussion #3691) and its 12.8 GB/step; router mode assumed"},
    {"qwen3-30b-a3b", 48, 128, 8, 2048, 768, GQMM_ACT_SWIGLU, GQMM_ROUTER_SOFTMAX_TOPK_NORM,
     {4, 64}, "Qwen/Qwen3-30B-A3B config.json (moe_intermediate_size 768, norm_topk_prob)"},
    {"mixtral-8x7b", 32, 8, 2, 4096, 14336, GQMM_ACT_SWIGLU, GQMM_ROUTER_TOPK_SOFTMAX, {4, 64},
     "mistralai/Mixtral-8x7B-v0.1 config.json"},
    {"gpt-oss-20b", 24, 32, 4, 2880, 2880, GQMM_ACT_SWIGLU, GQMM_ROUTER_TOPK_SOFTMAX, {4, 64},
     "openai/gpt-oss-20b config.json (shape only: its clamped SwiGLU and MXFP4 differ)"},
};

const gqmm_moe_model *gqmm_moe_model_at(int i) {
  if (i < 0 || i >= (int)(sizeof models / sizeof models[0])) return NULL;
  return &models[i];
}

const gqmm_moe_model *gqmm_moe_model_find(const char *name) {
  for (int i = 0; name && gqmm_moe_model_at(i); i++)
    if (!strcmp(models[i].name, name)) return &models[i];
  return NULL;
}
