/*
 * test_moe_forward.c - gqmm_moe_forward against an independent float64
 * computation (dequantize, gate/up, activation, down, weighted sum written
 * out here in double), for both activations, fused and separate gate/up,
 * every bits x group size x dtype; determinism; argument checks.
 */
#include "../../src/moe/moe.h" /* gqmm__moe_act */
#include "test.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One random layer and its routing; gate and up are quantized separately,
 * and gate_up is their per-expert concatenation (gate rows first). */
typedef struct {
  int64_t T, k, E, H, I;
  gqmm_quant q;
  gqmm_dtype dt;
  uint32_t *gw, *uw, *guw, *dw;
  void *gs, *gb, *us, *ub, *gus, *gub, *ds, *db;
  void *x, *ew, *out;
  int32_t *ids;
  gqmm_tensor t[17]; /* descriptors, see layer_tensors */
  gqmm_moe_weights fused, separate;
} layer;

enum { TG, TGS, TGB, TU, TUS, TUB, TGU, TGUS, TGUB, TD, TDS, TDB, TX, TIDS, TEW, TOUT, TCOUNT };

static void layer_free(layer *L) {
  void *p[] = {L->gw, L->uw, L->guw, L->dw, L->gs, L->gb, L->us, L->ub,
               L->gus, L->gub, L->ds, L->db, L->x, L->ew, L->out, L->ids};
  for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
}

/* Quantize E x rows x K random weights (scale 1/sqrt(K)) into wq, s, b. */
static int quantize(gqmm_ctx *ctx, test_rng *r, const layer *L, int64_t rows, int64_t K,
                    uint32_t **wq, void **s, void **b) {
  const size_t esz = gqmm_dtype_size(L->dt);
  const int64_t n = L->E * rows * K, words = K * L->q.bits / 32, groups = K / L->q.group_size;
  void *w = malloc((size_t)n * esz);
  *wq = malloc((size_t)(L->E * rows * words) * 4);
  *s = malloc((size_t)(L->E * rows * groups) * esz);
  *b = malloc((size_t)(L->E * rows * groups) * esz);
  if (!w || !*wq || !*s || !*b) return free(w), GQMM_ERR_NOMEM;
  test_fill(r, w, L->dt, n, 1.0f / sqrtf((float)K));
  int64_t ws[3] = {L->E, rows, K}, qs[3] = {L->E, rows, words}, ss[3] = {L->E, rows, groups};
  gqmm_tensor tw = gqmm_tensor_make(w, L->dt, 3, ws), tq = gqmm_tensor_make(*wq, GQMM_U32, 3, qs);
  gqmm_tensor ts = gqmm_tensor_make(*s, L->dt, 3, ss), tb = gqmm_tensor_make(*b, L->dt, 3, ss);
  int st = gqmm_quantize(ctx, &tw, L->q, &tq, &ts, &tb);
  free(w);
  return st;
}

/* Routing: random ids in [0, E - 1) skewed to the low experts (expert E-1
 * never chosen: a zero-row expert), or all on expert 1 when `one_expert`. */
static int layer_make(gqmm_ctx *ctx, test_rng *r, layer *L, bool one_expert) {
  const size_t esz = gqmm_dtype_size(L->dt);
  const int64_t T = L->T, k = L->k, E = L->E, H = L->H, I = L->I, R = T * k;
  int st;
  if ((st = quantize(ctx, r, L, I, H, &L->gw, &L->gs, &L->gb)) ||
      (st = quantize(ctx, r, L, I, H, &L->uw, &L->us, &L->ub)) ||
      (st = quantize(ctx, r, L, H, I, &L->dw, &L->ds, &L->db)))
    return st;
  const int64_t words = H * L->q.bits / 32, groups = H / L->q.group_size;
  L->guw = malloc((size_t)(E * 2 * I * words) * 4);
  L->gus = malloc((size_t)(E * 2 * I * groups) * esz);
  L->gub = malloc((size_t)(E * 2 * I * groups) * esz);
  L->x = malloc((size_t)(T * H) * esz);
  L->ew = malloc((size_t)R * esz);
  L->out = malloc((size_t)(T * H) * esz);
  L->ids = malloc((size_t)R * sizeof(int32_t));
  if (!L->guw || !L->gus || !L->gub || !L->x || !L->ew || !L->out || !L->ids)
    return GQMM_ERR_NOMEM;
  for (int64_t e = 0; e < E; e++) {
    const size_t wb = (size_t)(I * words) * 4, sb = (size_t)(I * groups) * esz;
    memcpy((char *)L->guw + 2 * e * wb, (char *)L->gw + e * wb, wb);
    memcpy((char *)L->guw + (2 * e + 1) * wb, (char *)L->uw + e * wb, wb);
    memcpy((char *)L->gus + 2 * e * sb, (char *)L->gs + e * sb, sb);
    memcpy((char *)L->gus + (2 * e + 1) * sb, (char *)L->us + e * sb, sb);
    memcpy((char *)L->gub + 2 * e * sb, (char *)L->gb + e * sb, sb);
    memcpy((char *)L->gub + (2 * e + 1) * sb, (char *)L->ub + e * sb, sb);
  }
  test_fill(r, L->x, L->dt, T * H, 1.0f);
  for (int64_t p = 0; p < R; p++) {
    uint32_t u = test_rng_u32(r);
    const int64_t span = E > 1 ? E - 1 : 1;
    L->ids[p] = one_expert ? 1 : (int32_t)((u & 1) ? (u >> 1) % ((span + 1) / 2) : (u >> 1) % span);
    float wt = 0.05f + (float)(test_rng_u32(r) % 1000) / 1000.0f;
    if (L->dt == GQMM_F32) ((float *)L->ew)[p] = wt;
    else ((uint16_t *)L->ew)[p] = L->dt == GQMM_F16 ? gqmm_f32_to_f16(wt) : gqmm_f32_to_bf16(wt);
  }
  const int64_t shp[TCOUNT][3] = {
      {E, I, words}, {E, I, groups}, {E, I, groups}, {E, I, words}, {E, I, groups}, {E, I, groups},
      {E, 2 * I, words}, {E, 2 * I, groups}, {E, 2 * I, groups},
      {E, H, I * L->q.bits / 32}, {E, H, I / L->q.group_size}, {E, H, I / L->q.group_size},
      {T, H}, {T, k}, {T, k}, {T, H}};
  void *data[TCOUNT] = {L->gw, L->gs, L->gb, L->uw, L->us, L->ub, L->guw, L->gus, L->gub,
                        L->dw, L->ds, L->db, L->x, L->ids, L->ew, L->out};
  for (int i = 0; i < TCOUNT; i++) {
    gqmm_dtype d = i == TIDS ? GQMM_I32
                   : (i == TG || i == TU || i == TGU || i == TD) ? GQMM_U32 : L->dt;
    L->t[i] = gqmm_tensor_make(data[i], d, i >= TX ? 2 : 3, shp[i]);
  }
  gqmm_moe_weights f = {.q = L->q, .gate_up = &L->t[TGU], .gate_up_scales = &L->t[TGUS],
                        .gate_up_biases = &L->t[TGUB], .down = &L->t[TD],
                        .down_scales = &L->t[TDS], .down_biases = &L->t[TDB]};
  gqmm_moe_weights s = {.q = L->q, .gate = &L->t[TG], .gate_scales = &L->t[TGS],
                        .gate_biases = &L->t[TGB], .up = &L->t[TU], .up_scales = &L->t[TUS],
                        .up_biases = &L->t[TUB], .down = &L->t[TD], .down_scales = &L->t[TDS],
                        .down_biases = &L->t[TDB]};
  L->fused = f;
  L->separate = s;
  return GQMM_OK;
}

static double ld(const void *p, gqmm_dtype t, int64_t i) {
  if (t == GQMM_F32) return ((const float *)p)[i];
  if (t == GQMM_F16) return gqmm_f16_to_f32(((const uint16_t *)p)[i]);
  return gqmm_bf16_to_f32(((const uint16_t *)p)[i]);
}

/* q-value j of a packed row: element j is bits [j*bits, (j+1)*bits) of the
 * row's little-endian byte stream (written out here, independent of the library). */
static unsigned qval(const uint32_t *row, int bits, int64_t j) {
  unsigned v = 0;
  for (int b = 0; b < bits; b++) {
    int64_t bit = j * bits + b;
    v |= ((((const uint8_t *)row)[bit >> 3] >> (bit & 7)) & 1u) << b;
  }
  return v;
}

/* Dequantized weight [e, n, kk] of a [E, N, K] packed matrix, in double. */
static double wval(const layer *L, const uint32_t *w, const void *s, const void *b, int64_t N,
                   int64_t K, int64_t e, int64_t n, int64_t kk) {
  const int64_t row = e * N + n, g = row * (K / L->q.group_size) + kk / L->q.group_size;
  return ld(s, L->dt, g) * qval(w + row * (K * L->q.bits / 32), L->q.bits, kk) + ld(b, L->dt, g);
}

static double act64(gqmm_activation a, double g, double u) {
  if (a == GQMM_ACT_GEGLU)
    return 0.5 * g * (1.0 + tanh(0.7978845608028654 /* sqrt(2 / pi) */ * (g + 0.044715 * g * g * g))) * u;
  return g / (1.0 + exp(-g)) * u;
}

/* The [E, N, K] packed matrix dequantized to double. */
static double *dequant64(const layer *L, const uint32_t *w, const void *s, const void *b,
                         int64_t N, int64_t K) {
  double *d = malloc((size_t)(L->E * N * K) * sizeof(double));
  for (int64_t e = 0; d && e < L->E; e++)
    for (int64_t n = 0; n < N; n++)
      for (int64_t kk = 0; kk < K; kk++) d[(e * N + n) * K + kk] = wval(L, w, s, b, N, K, e, n, kk);
  return d;
}

/* out64[t, n] = sum_j ew[t, j] * down[e] @ act(gate[e] @ x[t], up[e] @ x[t]). */
static void reference64(const layer *L, gqmm_activation act, double *out64) {
  const int64_t H = L->H, I = L->I;
  double *h = malloc((size_t)I * sizeof(double));
  double *G = dequant64(L, L->gw, L->gs, L->gb, I, H), *U = dequant64(L, L->uw, L->us, L->ub, I, H);
  double *D = dequant64(L, L->dw, L->ds, L->db, H, I);
  for (int64_t i = 0; i < L->T * H; i++) out64[i] = h && G && U && D ? 0.0 : NAN;
  for (int64_t t = 0; h && G && U && D && t < L->T; t++)
    for (int64_t j = 0; j < L->k; j++) {
      const int64_t e = L->ids[t * L->k + j];
      for (int64_t i = 0; i < I; i++) {
        double g = 0, u = 0;
        for (int64_t c = 0; c < H; c++) {
          const double xv = ld(L->x, L->dt, t * H + c);
          g += xv * G[(e * I + i) * H + c];
          u += xv * U[(e * I + i) * H + c];
        }
        h[i] = act64(act, g, u);
      }
      const double wt = ld(L->ew, L->dt, t * L->k + j);
      for (int64_t n = 0; n < H; n++) {
        double y = 0;
        for (int64_t i = 0; i < I; i++) y += h[i] * D[(e * H + n) * I + i];
        out64[t * H + n] += wt * y;
      }
    }
  free(h);
  free(G);
  free(U);
  free(D);
}

static double rel_err64(const void *a, gqmm_dtype t, const double *ref, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; i++) {
    const double v = ld(a, t, i);
    if (isnan(v)) return INFINITY;
    num += (v - ref[i]) * (v - ref[i]);
    den += ref[i] * ref[i];
  }
  return sqrt(num / (den > 0 ? den : 1));
}

/* Tolerances: each intermediate (gate_up, h, down) is rounded to the dtype,
 * as in mlx; f32 carries only float32 accumulation error. */
static double tolerance(gqmm_dtype t) { return t == GQMM_F32 ? 1e-4 : t == GQMM_F16 ? 6e-3 : 4e-2; }

static int run(gqmm_ctx *ctx, layer *L, const gqmm_moe_weights *w, gqmm_activation act) {
  test_poison(L->out, L->dt, L->T * L->H);
  return gqmm_moe_forward(ctx, w, &L->t[TX], &L->t[TIDS], &L->t[TEW], act, &L->t[TOUT]);
}

/* Both activations, with the separate and the fused gate/up weights, each
 * against float64; fused and separate hold the same weights, so they must
 * give the same bits. Returns a status (messages on stderr, `what` first). */
static int check_layer(gqmm_ctx *ctx, layer *L, const gqmm_moe_weights *separate,
                       const gqmm_moe_weights *fused, const char *what) {
  const size_t nb = (size_t)(L->T * L->H) * gqmm_dtype_size(L->dt);
  double *ref = malloc((size_t)(L->T * L->H) * sizeof(double));
  void *first = malloc(nb);
  int st = ref && first ? GQMM_OK : GQMM_ERR_NOMEM;
  for (int a = 0; a < 2 && !st; a++) {
    const gqmm_activation act = a ? GQMM_ACT_GEGLU : GQMM_ACT_SWIGLU;
    reference64(L, act, ref);
    for (int f = 0; f < 2 && !st; f++) {
      st = run(ctx, L, f ? fused : separate, act);
      double err = st ? INFINITY : rel_err64(L->out, L->dt, ref, L->T * L->H);
      if (st || !(err <= tolerance(L->dt))) {
        fprintf(stderr, "  %s bits %d gs %d %s act %d fused %d: st %d (%s) err %.3g\n", what,
                L->q.bits, L->q.group_size, gqmm_dtype_name(L->dt), a, f, st, gqmm_last_error(ctx),
                err);
        st = st ? st : GQMM_ERR_BACKEND;
      }
      if (!st && f == 0) memcpy(first, L->out, nb);
      if (!st && f == 1 && memcmp(first, L->out, nb) != 0) st = GQMM_ERR_BACKEND;
    }
  }
  free(ref);
  free(first);
  return st;
}

GQMM_TEST(moe_forward_matches_float64_all_formats) {
  const gqmm_backend_kind kinds[] = {GQMM_BACKEND_REF, GQMM_BACKEND_AUTO};
  const int bits[] = {2, 3, 4, 5, 6, 8}, groups[] = {32, 64, 128};
  const gqmm_dtype dts[] = {GQMM_F32, GQMM_F16, GQMM_BF16};
  test_rng r = test_rng_make(601);
  for (int kb = 0; kb < 2; kb++) {
    gqmm_ctx_options o = {.backend = kinds[kb]};
    gqmm_ctx *ctx = NULL;
    CHECK_OK(gqmm_ctx_create(&ctx, &o));
    for (int bi = 0; bi < 6; bi++)
      for (int gi = 0; gi < 3; gi++)
        for (int di = 0; di < 3; di++) {
          /* ragged: 13 tokens, 3 slots, 7 experts (one never routed) */
          layer L = {.T = 13, .k = 3, .E = 7, .H = 256, .I = 128, .q = {bits[bi], groups[gi]},
                     .dt = dts[di]};
          int st = layer_make(ctx, &r, &L, false);
          if (!st) st = check_layer(ctx, &L, &L.separate, &L.fused, kb ? "auto" : "ref");
          layer_free(&L);
          if (st) gqmm_ctx_destroy(ctx);
          CHECK_OK(st);
        }
    gqmm_ctx_destroy(ctx);
  }
}

/* The layer on the CPU with gqmm_pack copies of its weights (src/cpu/
 * cpu_pack.c: 2- and 4-bit): fused gate_up (gqmm_pack_glu, as a user of
 * either backend would pack it) and separate gate and up, both activations,
 * every group size, f16 and bf16, against float64; fused and separate agree
 * bit for bit, and a copy packed for the CPU is refused by a layer whose
 * tensors claim to be on the GPU. */
GQMM_TEST(moe_forward_cpu_packed_weights) {
  const int groups[] = {32, 64, 128};
  const gqmm_dtype dts[] = {GQMM_F16, GQMM_BF16};
  test_rng r = test_rng_make(606);
  gqmm_ctx_options o = {.backend = GQMM_BACKEND_CPU};
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, &o));
  for (int bits = 2; bits <= 4; bits += 2)
    for (int gi = 0; gi < 3; gi++)
      for (int di = 0; di < 2; di++) {
        /* ragged: 21 tokens, 4 slots, 9 experts (one never routed); I = 96 rows
         * (group 32) make a ragged panel, 2I = 192 three panels (a pair and one) */
        layer L = {
            .T = 21, .k = 4, .E = 9, .H = 384, .I = 96, .q = {bits, groups[gi]}, .dt = dts[di]};
        if (L.I % L.q.group_size) L.I = 128;
        int st = layer_make(ctx, &r, &L, false);
        gqmm_packed *pk[4] = {NULL, NULL, NULL, NULL}; /* gate_up, gate, up, down */
        if (!st) st = gqmm_pack_glu(ctx, &L.t[TGU], &L.t[TGUS], &L.t[TGUB], L.q, &pk[0]);
        if (!st) st = gqmm_pack(ctx, &L.t[TG], &L.t[TGS], &L.t[TGB], L.q, &pk[1]);
        if (!st) st = gqmm_pack(ctx, &L.t[TU], &L.t[TUS], &L.t[TUB], L.q, &pk[2]);
        if (!st) st = gqmm_pack(ctx, &L.t[TD], &L.t[TDS], &L.t[TDB], L.q, &pk[3]);
        gqmm_moe_weights f = L.fused, s = L.separate;
        f.gate_up_packed = pk[0], f.down_packed = pk[3];
        s.gate_packed = pk[1], s.up_packed = pk[2], s.down_packed = pk[3];
        if (!st) st = check_layer(ctx, &L, &s, &f, "cpu packed");
        if (!st) { /* a CPU copy for tensors said to be on the GPU: refused before anything runs */
          gqmm_moe_weights g = f;
          gqmm_tensor t[3] = {L.t[TGU], L.t[TGUS], L.t[TGUB]};
          for (int i = 0; i < 3; i++)
            t[i].device = GQMM_DEVICE_CUDA;
          g.gate_up = &t[0], g.gate_up_scales = &t[1], g.gate_up_biases = &t[2];
          const int bad = gqmm_moe_forward(ctx, &g, &L.t[TX], &L.t[TIDS], &L.t[TEW], GQMM_ACT_GEGLU,
                                           &L.t[TOUT]);
          if (bad == GQMM_OK) st = GQMM_ERR_BACKEND;
        }
        for (int i = 0; i < 4; i++)
          gqmm_packed_free(ctx, pk[i]);
        layer_free(&L);
        if (st) gqmm_ctx_destroy(ctx);
        CHECK_OK(st);
      }
  gqmm_ctx_destroy(ctx);
}

GQMM_TEST(moe_forward_is_deterministic_across_threads_and_runs) {
  test_rng r = test_rng_make(602);
  gqmm_ctx *ctx[2] = {NULL, NULL};
  for (int i = 0; i < 2; i++) {
    gqmm_ctx_options o = {.backend = GQMM_BACKEND_AUTO, .num_threads = i + 1};
    CHECK_OK(gqmm_ctx_create(&ctx[i], &o));
  }
  layer L = {.T = 64, .k = 4, .E = 16, .H = 256, .I = 128, .q = {4, 64}, .dt = GQMM_BF16};
  int st = layer_make(ctx[0], &r, &L, false);
  const size_t nb = (size_t)(L.T * L.H) * 2;
  void *first = malloc(nb);
  for (int rep = 0; rep < 6 && !st; rep++) {
    st = run(ctx[rep % 2], &L, rep % 3 ? &L.fused : &L.separate, GQMM_ACT_GEGLU);
    if (!st && rep == 0) memcpy(first, L.out, nb);
    if (!st && memcmp(first, L.out, nb) != 0) st = GQMM_ERR_BACKEND;
  }
  /* num_threads 0 defers to GQMM_NUM_THREADS (then the core count) */
  gqmm_ctx *env_ctx = NULL;
  const char *threads[] = {"1", "3"};
  for (int i = 0; i < 2 && !st; i++) {
    setenv("GQMM_NUM_THREADS", threads[i], 1);
    st = gqmm_ctx_create(&env_ctx, NULL);
    if (!st) st = run(env_ctx, &L, &L.fused, GQMM_ACT_GEGLU);
    if (!st && memcmp(first, L.out, nb) != 0) st = GQMM_ERR_BACKEND;
    gqmm_ctx_destroy(env_ctx);
    env_ctx = NULL;
  }
  unsetenv("GQMM_NUM_THREADS");
  free(first);
  layer_free(&L);
  gqmm_ctx_destroy(ctx[0]);
  gqmm_ctx_destroy(ctx[1]);
  CHECK_OK(st);
}

GQMM_TEST(moe_forward_all_rows_on_one_expert) {
  test_rng r = test_rng_make(603);
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  layer L = {.T = 40, .k = 2, .E = 5, .H = 128, .I = 64, .q = {3, 32}, .dt = GQMM_F32};
  int st = layer_make(ctx, &r, &L, true);
  double *ref = malloc((size_t)(L.T * L.H) * sizeof(double));
  if (!st) st = run(ctx, &L, &L.separate, GQMM_ACT_SWIGLU);
  if (!st) reference64(&L, GQMM_ACT_SWIGLU, ref);
  double err = st ? INFINITY : rel_err64(L.out, L.dt, ref, L.T * L.H);
  free(ref);
  layer_free(&L);
  gqmm_ctx_destroy(ctx);
  CHECK_OK(st);
  CHECK_MSG(err <= tolerance(GQMM_F32), "err %.3g", err);
}

/* The call fails with `want` and a message containing `name`. */
static int fails_with(gqmm_ctx *ctx, int st, int want, const char *name) {
  if (st == want && strstr(gqmm_last_error(ctx), name)) return 1;
  fprintf(stderr, "  expected %d naming '%s', got %d: %s\n", want, name, st, gqmm_last_error(ctx));
  return 0;
}

/* Each bad argument returns its status and a message naming it. */
GQMM_TEST(moe_forward_rejects_bad_arguments) {
  test_rng r = test_rng_make(604);
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  layer L = {.T = 6, .k = 2, .E = 4, .H = 128, .I = 64, .q = {4, 64}, .dt = GQMM_BF16};
  int ok = layer_make(ctx, &r, &L, false) == GQMM_OK;
  const gqmm_tensor *x = &L.t[TX], *ids = &L.t[TIDS], *ew = &L.t[TEW];
  gqmm_tensor *out = &L.t[TOUT];
  const gqmm_activation sw = GQMM_ACT_SWIGLU;
  L.ids[5] = 4; /* == E, at [2, 1] */
  ok = ok && fails_with(ctx, run(ctx, &L, &L.fused, sw), GQMM_ERR_INDEX, "expert_ids: element [2, 1]");
  /* host ids stay checked before anything runs: a uint32 id above INT32_MAX
   * is named as the unsigned value, and out is not written */
  gqmm_tensor ids_u32 = *ids;
  ids_u32.dtype = GQMM_U32;
  L.ids[5] = (int32_t)0x80000000u;
  const size_t out_bytes = (size_t)(L.T * L.H) * gqmm_dtype_size(L.dt);
  void *poisoned = malloc(out_bytes);
  ok = ok && poisoned;
  if (ok) test_poison(poisoned, L.dt, L.T * L.H), memcpy(L.out, poisoned, out_bytes);
  ok = ok && fails_with(ctx, gqmm_moe_forward(ctx, &L.fused, x, &ids_u32, ew, sw, out),
                        GQMM_ERR_INDEX, "element [2, 1] is 2147483648");
  ok = ok && memcmp(L.out, poisoned, out_bytes) == 0;
  free(poisoned);
  L.ids[5] = 0;
  gqmm_moe_weights w = L.fused;
  w.gate = L.separate.gate;
  ok = ok && fails_with(ctx, run(ctx, &L, &w, sw), GQMM_ERR_ARG, "gate_up");
  w = L.separate;
  w.down = &L.t[TU]; /* [E, I, H*bits/32] where [E, H, I*bits/32] is due */
  ok = ok && fails_with(ctx, run(ctx, &L, &w, sw), GQMM_ERR_SHAPE, "down");
  gqmm_tensor f32s = L.t[TGS];
  f32s.dtype = GQMM_F32;
  w = L.separate;
  w.gate_scales = &f32s;
  ok = ok && fails_with(ctx, run(ctx, &L, &w, sw), GQMM_ERR_DTYPE, "gate_scales");
  ok = ok && fails_with(ctx, run(ctx, &L, &L.fused, (gqmm_activation)7), GQMM_ERR_ARG, "act");
  gqmm_tensor dev = *x;
  dev.device = GQMM_DEVICE_CUDA;
  ok = ok && fails_with(ctx, gqmm_moe_forward(ctx, &L.fused, &dev, ids, ew, sw, out),
                        GQMM_ERR_DEVICE, "expert_ids");
  gqmm_tensor alias = *out;
  alias.data = L.x;
  ok = ok && fails_with(ctx, gqmm_moe_forward(ctx, &L.fused, x, ids, ew, sw, &alias),
                        GQMM_ERR_OVERLAP, "x");
  const int64_t bad_shape[2] = {L.T, 1};
  gqmm_tensor ew1 = gqmm_tensor_make(L.ew, L.dt, 2, bad_shape);
  ok = ok && fails_with(ctx, gqmm_moe_forward(ctx, &L.fused, x, ids, &ew1, sw, out),
                        GQMM_ERR_SHAPE, "expert_weights");
  ok = ok && fails_with(ctx, gqmm_moe_forward(ctx, NULL, x, ids, ew, sw, out), GQMM_ERR_NULL,
                        "weights");
  gqmm_tensor out_f32 = *out;
  out_f32.dtype = GQMM_F32;
  ok = ok && fails_with(ctx, gqmm_moe_forward(ctx, &L.fused, x, ids, ew, sw, &out_f32),
                        GQMM_ERR_OUTPUT, "out");
  layer_free(&L);
  gqmm_ctx_destroy(ctx);
  CHECK(ok);
}

GQMM_TEST(moe_forward_zero_tokens_and_uint32_ids) {
  test_rng r = test_rng_make(605);
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  layer L = {.T = 9, .k = 2, .E = 4, .H = 128, .I = 64, .q = {5, 32}, .dt = GQMM_F16};
  int st = layer_make(ctx, &r, &L, false);
  double *ref = malloc((size_t)(L.T * L.H) * sizeof(double));
  /* uint32 ids: the same values, read the same way */
  gqmm_tensor ids_u32 = L.t[TIDS];
  ids_u32.dtype = GQMM_U32;
  test_poison(L.out, L.dt, L.T * L.H);
  if (!st)
    st = gqmm_moe_forward(ctx, &L.separate, &L.t[TX], &ids_u32, &L.t[TEW], GQMM_ACT_GEGLU,
                          &L.t[TOUT]);
  if (!st) reference64(&L, GQMM_ACT_GEGLU, ref);
  const double err = st ? INFINITY : rel_err64(L.out, L.dt, ref, L.T * L.H);
  /* zero tokens: valid shapes, nothing to do, out untouched */
  const int64_t xs0[2] = {0, L.H}, ps0[2] = {0, L.k};
  gqmm_tensor x0 = gqmm_tensor_make(L.x, L.dt, 2, xs0), i0 = gqmm_tensor_make(L.ids, GQMM_I32, 2, ps0);
  gqmm_tensor w0 = gqmm_tensor_make(L.ew, L.dt, 2, ps0), o0 = gqmm_tensor_make(L.out, L.dt, 2, xs0);
  const int st0 = st ? st : gqmm_moe_forward(ctx, &L.fused, &x0, &i0, &w0, GQMM_ACT_SWIGLU, &o0);
  free(ref);
  layer_free(&L);
  gqmm_ctx_destroy(ctx);
  CHECK_OK(st);
  CHECK_OK(st0);
  CHECK_MSG(err <= tolerance(GQMM_F16), "err %.3g", err);
}

/* The CPU layer's activations (moe_compose.c, a vectorizable exp) against
 * float64 over gate values from saturation to saturation: within a few
 * float32 ulps, saturating the same way, NaN propagating. */
GQMM_TEST(moe_activations_match_float64) {
  for (int a = 0; a < 2; a++) {
    const gqmm__activation act = a ? GQMM__ACT_GEGLU : GQMM__ACT_SWIGLU;
    double worst = 0;
    for (int i = -40000; i <= 40000; i++) {
      const float g = (float)i * 2.5e-3f, u = 1.0f + (float)(i % 7) * 0.125f;
      const double gd = g,
                   sig = a ? 0.5 * (1.0 + tanh(0.7978845608028654 * (gd + 0.044715 * gd * gd * gd)))
                           : 1.0 / (1.0 + exp(-gd));
      const double want = gd * sig * u, got = gqmm__moe_act(act, g, u);
      /* relative to the result, or to gate * up where the result is orders
       * smaller (GeGLU's 2 - 2 / (e^2z + 1) cancels for z << 0, as tanh's
       * 1 + tanh(z) would: an absolute float32 error of the inputs' size) */
      const double err = fabs(got - want), rel = want != 0 ? err / fabs(want) : err;
      if (rel > worst && fabs(want) > 1e-3 * fabs(gd * u)) worst = rel;
      CHECK_MSG(err <= 4e-6 * fabs(want) + 2.4e-7 * fabs(gd * u),
                "act %d gate %.9g up %g: %.9g against %.9g", a, g, u, got, want);
    }
    printf("  act %s: worst relative error %.3g (results above 1e-3 gate x up)\n",
           a ? "geglu" : "swiglu", worst);
    CHECK(isnan(gqmm__moe_act(act, NAN, 1.0f)) && isnan(gqmm__moe_act(act, 1.0f, NAN)));
    CHECK(gqmm__moe_act(act, 1e30f, 1.0f) == 1e30f); /* saturates to gate * up */
    CHECK(fabs(gqmm__moe_act(act, -1e30f, 1.0f)) < 1e-6);
  }
}
