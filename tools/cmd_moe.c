/*
 * cmd_moe.c - `gqmm moe`: run one MoE expert layer (gqmm_moe_forward) of a
 * model's shape on random data and check it against the reference backend.
 * Weights are random floats quantized with gqmm_quantize; routing comes from
 * random router logits through gqmm_router_topk with the model's mode.
 */
#include "cli.h"
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static float rnd(uint64_t *s) { /* uniform in [-1, 1) */
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((double)(*s >> 11) / 4503599627370496.0 - 1.0);
}

/* Quantize E x rows x K random bf16 weights into the three tensors' buffers. */
static int quantized(gqmm_ctx *ctx, uint64_t *s, gqmm_quant q, int64_t E, int64_t rows, int64_t K,
                     gqmm_tensor t[3]) {
  const int64_t n = E * rows * K, ws[3] = {E, rows, K};
  const int64_t qs[3] = {E, rows, K * q.bits / 32}, ss[3] = {E, rows, K / q.group_size};
  uint16_t *w = malloc((size_t)n * 2);
  t[0] = gqmm_tensor_make(malloc((size_t)(qs[0] * qs[1] * qs[2]) * 4), GQMM_U32, 3, qs);
  t[1] = gqmm_tensor_make(malloc((size_t)(ss[0] * ss[1] * ss[2]) * 2), GQMM_BF16, 3, ss);
  t[2] = gqmm_tensor_make(malloc((size_t)(ss[0] * ss[1] * ss[2]) * 2), GQMM_BF16, 3, ss);
  int st = GQMM_ERR_NOMEM;
  if (w && t[0].data && t[1].data && t[2].data) {
    const float amp = 1.7f / sqrtf((float)K);
    for (int64_t i = 0; i < n; i++) w[i] = gqmm_f32_to_bf16(amp * rnd(s));
    gqmm_tensor tw = gqmm_tensor_make(w, GQMM_BF16, 3, ws);
    st = gqmm_quantize(ctx, &tw, q, &t[0], &t[1], &t[2]);
  }
  free(w);
  return st;
}

int gqmm_cmd_moe(int argc, char **argv) {
  gqmm_backend_kind kind = GQMM_BACKEND_AUTO;
  const gqmm_moe_model *m = gqmm_moe_model_find("diffusiongemma-26b-a4b");
  int tokens = 256, experts = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
      if (gqmm_cli_backend(argv[++i], &kind))
        return fprintf(stderr, "gqmm moe: unknown backend '%s'\n", argv[i]), 2;
    } else if (!strcmp(argv[i], "--model") && i + 1 < argc) {
      if (!(m = gqmm_moe_model_find(argv[++i])))
        return fprintf(stderr, "gqmm moe: unknown model '%s'\n", argv[i]), 2;
    } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) tokens = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--experts") && i + 1 < argc) experts = atoi(argv[++i]);
    else {
      printf("usage: gqmm moe [--model NAME] [--experts E] [--tokens T] [--backend auto|cpu|cuda|ref]\n"
             "Runs one expert layer of the model's shape (E overrides the expert count, to\n"
             "shrink it) on random data and compares it with the reference backend.\n");
      return strcmp(argv[i], "--help") ? 2 : 0;
    }
  }
  const int64_t E = experts > 0 ? experts : m->experts, H = m->hidden, I = m->inter, k = m->top_k;
  if (tokens < 1 || k > E) return fprintf(stderr, "gqmm moe: need tokens >= 1 and top_k <= E\n"), 2;
  gqmm_ctx *ctx = gqmm_cli_ctx(kind), *ref = gqmm_cli_ctx(GQMM_BACKEND_REF);
  gqmm_tensor gu[3] = {0}, dn[3] = {0};
  const int64_t xs[2] = {tokens, H}, ls[2] = {tokens, E}, ps[2] = {tokens, k};
  gqmm_tensor tx = gqmm_tensor_make(malloc((size_t)(tokens * H) * 2), GQMM_BF16, 2, xs);
  gqmm_tensor tl = gqmm_tensor_make(malloc((size_t)(tokens * E) * 4), GQMM_F32, 2, ls);
  gqmm_tensor ti = gqmm_tensor_make(malloc((size_t)(tokens * k) * 4), GQMM_I32, 2, ps);
  gqmm_tensor tw = gqmm_tensor_make(malloc((size_t)(tokens * k) * 2), GQMM_BF16, 2, ps);
  gqmm_tensor to = gqmm_tensor_make(malloc((size_t)(tokens * H) * 2), GQMM_BF16, 2, xs);
  gqmm_tensor tr = gqmm_tensor_make(malloc((size_t)(tokens * H) * 2), GQMM_BF16, 2, xs);
  uint64_t s = 0x853c49e6748fea9bull;
  int st = ctx && ref && tx.data && tl.data && ti.data && tw.data && to.data && tr.data
               ? GQMM_OK : GQMM_ERR_NOMEM;
  if (!st) st = quantized(ref, &s, m->q, E, 2 * I, H, gu);
  if (!st) st = quantized(ref, &s, m->q, E, H, I, dn);
  if (!st) {
    for (int64_t i = 0; i < tokens * H; i++) ((uint16_t *)tx.data)[i] = gqmm_f32_to_bf16(rnd(&s));
    for (int64_t i = 0; i < tokens * E; i++) ((float *)tl.data)[i] = 2.0f * rnd(&s);
    /* router weights in bf16, as the model would hand them over */
    gqmm_tensor bl = gqmm_tensor_make(malloc((size_t)(tokens * E) * 2), GQMM_BF16, 2, ls);
    st = bl.data ? GQMM_OK : GQMM_ERR_NOMEM;
    for (int64_t i = 0; !st && i < tokens * E; i++)
      ((uint16_t *)bl.data)[i] = gqmm_f32_to_bf16(((float *)tl.data)[i]);
    if (!st) st = gqmm_router_topk(ref, &bl, (int)k, m->router, &ti, &tw);
    free(bl.data);
  }
  gqmm_moe_weights w = {.q = m->q, .gate_up = &gu[0], .gate_up_scales = &gu[1],
                        .gate_up_biases = &gu[2], .down = &dn[0], .down_scales = &dn[1],
                        .down_biases = &dn[2]};
  double t_be = 0, t_ref = 0;
  if (!st) {
    for (int64_t i = 0; i < tokens * H; i++) ((uint16_t *)to.data)[i] = 0x7fc0; /* NaN poison */
    t_be = gqmm__now_s();
    st = gqmm_moe_forward(ctx, &w, &tx, &ti, &tw, m->act, &to);
    t_be = gqmm__now_s() - t_be;
    if (st) fprintf(stderr, "gqmm moe: %s\n", gqmm_last_error(ctx));
  }
  if (!st) {
    t_ref = gqmm__now_s();
    st = gqmm_moe_forward(ref, &w, &tx, &ti, &tw, m->act, &tr);
    t_ref = gqmm__now_s() - t_ref;
    if (st) fprintf(stderr, "gqmm moe: reference: %s\n", gqmm_last_error(ref));
  }
  int rc = st ? 1 : 0;
  if (!st) {
    double num = 0, den = 0;
    size_t same = 0;
    for (int64_t i = 0; i < tokens * H; i++) {
      const double a = gqmm_bf16_to_f32(((uint16_t *)to.data)[i]);
      const double b = gqmm_bf16_to_f32(((uint16_t *)tr.data)[i]);
      num += (a - b) * (a - b), den += b * b;
      same += ((uint16_t *)to.data)[i] == ((uint16_t *)tr.data)[i];
    }
    const double err = isnan(num) ? INFINITY : sqrt(num / (den > 0 ? den : 1));
    printf("%s layer (E=%lld, top-%lld, hidden %lld, inter %lld, %d-bit g%d bf16), %d tokens\n",
           m->name, (long long)E, (long long)k, (long long)H, (long long)I, m->q.bits,
           m->q.group_size, tokens);
    printf("%-8s %10.3f ms\nref      %10.3f ms\nrelative error vs ref %.3g, identical "
           "elements %.1f%%: %s\n", gqmm_last_backend(ctx), t_be * 1e3, t_ref * 1e3, err,
           100.0 * (double)same / (double)(tokens * H), err <= 1e-2 ? "ok" : "FAIL");
    rc = err <= 1e-2 ? 0 : 1;
  } else if (st == GQMM_ERR_NOMEM) {
    fprintf(stderr, "gqmm moe: out of memory\n");
  }
  for (int i = 0; i < 3; i++) free(gu[i].data), free(dn[i].data);
  free(tx.data), free(tl.data), free(ti.data), free(tw.data), free(to.data), free(tr.data);
  gqmm_ctx_destroy(ctx);
  gqmm_ctx_destroy(ref);
  return rc;
}
