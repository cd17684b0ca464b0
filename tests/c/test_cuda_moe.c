/*
 * test_cuda_moe.c - the MoE expert layer on the GPU (the CUDA backend's
 * moe_forward) against the CPU composition of the reference backend on host
 * copies of the same inputs.
 * Without a GPU (CI): device tensors get a clear UNSUPPORTED error, the
 * hooks called directly decline, nothing crashes.
 * With a GPU: both activations, fused and separate gate/up, bits
 * 2/3/4/8 (tensor cores) and 5/6 (generic kernel), group sizes 32/64/128,
 * bf16/f16/f32, experts with 0 rows, all pairs on one expert, every tile
 * config, aligned and misaligned out, a hidden size whose rows are not
 * whole 128-byte lines; outputs poisoned before each run;
 * two runs bit-identical; a chain of calls enqueued with no synchronization
 * identical to the same calls synced one by one, on the legacy stream, a
 * stream of the caller's, and replayed from a recorded graph.
 * GQMM_CUDA_TEST_QUICK=1 runs a subset (for compute-sanitizer).
 */
#include "internal.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef GQMM_TEST_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

/* ---- one layer: host buffers, their tensors and device mirrors ------------ */

enum { GU, GUS, GUB, G, GS, GB, U, US, UB, D, DS, DB, X, IDS, EW, OUT, NT };

typedef struct {
  int64_t T, k, E, H, I;
  gqmm_quant q;
  gqmm_dtype dt;
  size_t out_shift; /* bytes: a misaligned out takes the combine's narrow path */
  void *h[NT], *d[NT];
  size_t bytes[NT];
  gqmm_tensor th[NT], td[NT]; /* host and device descriptors */
  gqmm_packed *pk[5]; /* gqmm_pack copies of gate_up, gate, up, down, gqmm_pack_glu of gate_up */
} layer;

static void layer_free(gqmm_ctx *gpu, layer *L) {
  for (int i = 0; i < 5; i++) gqmm_packed_free(gpu, L->pk[i]), L->pk[i] = NULL;
  for (int i = 0; i < NT; i++) {
    free(L->h[i]);
    if (gpu && L->d[i]) gqmm_device_free(gpu, L->d[i]);
  }
}

static gqmm_moe_weights weights(const gqmm_tensor *t, gqmm_quant q, int fused) {
  if (fused)
    return (gqmm_moe_weights){.q = q, .gate_up = &t[GU], .gate_up_scales = &t[GUS],
                              .gate_up_biases = &t[GUB], .down = &t[D], .down_scales = &t[DS],
                              .down_biases = &t[DB]};
  return (gqmm_moe_weights){.q = q, .gate = &t[G], .gate_scales = &t[GS], .gate_biases = &t[GB],
                            .up = &t[U], .up_scales = &t[US], .up_biases = &t[UB], .down = &t[D],
                            .down_scales = &t[DS], .down_biases = &t[DB]};
}

/* Descriptors of every part (data set later). */
static void layer_shapes(layer *L) {
  const int64_t E = L->E, H = L->H, I = L->I, T = L->T, k = L->k;
  const int64_t wh = H * L->q.bits / 32, gh = H / L->q.group_size;
  const int64_t wi = I * L->q.bits / 32, gi = I / L->q.group_size;
  const int64_t shp[NT][3] = {{E, 2 * I, wh}, {E, 2 * I, gh}, {E, 2 * I, gh}, {E, I, wh},
                              {E, I, gh},     {E, I, gh},     {E, I, wh},     {E, I, gh},
                              {E, I, gh},     {E, H, wi},     {E, H, gi},     {E, H, gi},
                              {T, H},         {T, k},         {T, k},         {T, H}};
  for (int i = 0; i < NT; i++) {
    const gqmm_dtype t = i == IDS ? GQMM_I32 : (i == GU || i == G || i == U || i == D) ? GQMM_U32 : L->dt;
    L->th[i] = gqmm_tensor_make(NULL, t, i >= X ? 2 : 3, shp[i]);
    L->bytes[i] = gqmm__nbytes(&L->th[i]);
  }
}

/* Random weights quantized by the reference; gate/up are the two row halves
 * of each expert of gate_up. routing 0: skewed over the low experts, the
 * top two never chosen (0 rows); 1: every pair on expert 1. */
static int layer_make(gqmm_ctx *ref, test_rng *r, layer *L, int routing) {
  layer_shapes(L);
  for (int i = 0; i < NT; i++)
    if (!(L->h[i] = malloc(L->bytes[i] ? L->bytes[i] : 1))) return GQMM_ERR_NOMEM;
  const size_t es = gqmm_dtype_size(L->dt);
  const int64_t E = L->E, H = L->H, I = L->I;
  int st = GQMM_OK;
  for (int part = 0; part < 2 && !st; part++) { /* gate_up, down */
    const int64_t rows = part ? H : 2 * I, K = part ? I : H, n = E * rows * K;
    const int b = part ? D : GU;
    void *w = malloc((size_t)n * es);
    if (!w) return GQMM_ERR_NOMEM;
    if (part) {
      test_fill(r, w, L->dt, n, 1.0f / sqrtf((float)K));
    } else { /* small gate rows, large up rows: see the pack check below */
      const size_t half = (size_t)(I * K) * es;
      for (int64_t e = 0; e < E; e++) {
        test_fill(r, (char *)w + 2 * e * half, L->dt, I * K, 0.002f);
        test_fill(r, (char *)w + (2 * e + 1) * half, L->dt, I * K, 4.0f);
      }
    }
    const int64_t ws[3] = {E, rows, K};
    gqmm_tensor tw = gqmm_tensor_make(w, L->dt, 3, ws);
    for (int j = 0; j < 3; j++) L->th[b + j].data = L->h[b + j];
    st = gqmm_quantize(ref, &tw, L->q, &L->th[b], &L->th[b + 1], &L->th[b + 2]);
    free(w);
  }
  for (int j = 0; j < 3; j++) /* split each expert's rows: gate first, then up */
    for (int64_t e = 0; e < E; e++) {
      const size_t half = L->bytes[G + j] / (size_t)E;
      memcpy((char *)L->h[G + j] + e * half, (char *)L->h[GU + j] + 2 * e * half, half);
      memcpy((char *)L->h[U + j] + e * half, (char *)L->h[GU + j] + (2 * e + 1) * half, half);
    }
  test_fill(r, L->h[X], L->dt, L->T * H, 1.0f);
  int32_t *ids = L->h[IDS];
  for (int64_t p = 0; p < L->T * L->k; p++) {
    const uint32_t u = test_rng_u32(r);
    ids[p] = routing ? 1 : (int32_t)((u & 1) ? (u >> 1) % 3 : (u >> 1) % (uint32_t)(E - 2));
  }
  test_fill(r, L->h[EW], L->dt, L->T * L->k, 0.5f);
  test_poison(L->h[OUT], L->dt, L->T * H);
  for (int i = 0; i < NT; i++) L->th[i].data = L->h[i];
  return st;
}

static int layer_upload(gqmm_ctx *gpu, layer *L) {
  for (int i = 0; i < NT; i++) {
    const size_t shift = i == OUT ? L->out_shift : 0;
    int st = gqmm_device_alloc(gpu, L->bytes[i] + shift, &L->d[i]);
    if (!st)
      st = gqmm_device_copy(gpu, (char *)L->d[i] + shift, L->h[i], L->bytes[i],
                            GQMM_COPY_HOST_TO_DEVICE);
    if (st) return st;
    L->td[i] = L->th[i];
    L->td[i].data = (char *)L->d[i] + shift;
    L->td[i].device = GQMM_DEVICE_CUDA;
  }
  return GQMM_OK;
}

/* ---- without a GPU (and the host-tensor decline with one) ----------------- */

GQMM_TEST(cuda_moe_declines_cleanly) {
  gqmm_ctx *ctx = test_ctx(GQMM_BACKEND_AUTO), *cu = test_ctx(GQMM_BACKEND_CUDA);
  CHECK(ctx && cu);
  layer L = {.T = 3, .k = 2, .E = 4, .H = 64, .I = 64, .q = {4, 64}, .dt = GQMM_BF16};
  test_rng r = test_rng_make(7101);
  int st = layer_make(ctx, &r, &L, 0);
  void *probe = NULL;
  const bool gpu = gqmm_device_alloc(ctx, 64, &probe) == GQMM_OK;
  gqmm_device_free(ctx, probe);
  /* Host tensors asked of the CUDA backend: it never stages host memory. */
  gqmm_moe_weights wh = weights(L.th, L.q, 1);
  if (!st)
    st = gqmm_moe_forward(cu, &wh, &L.th[X], &L.th[IDS], &L.th[EW], GQMM_ACT_SWIGLU, &L.th[OUT]) ==
                 GQMM_ERR_UNSUPPORTED && gqmm_last_error(cu)[0]
             ? GQMM_OK
             : GQMM_ERR_BACKEND;
  if (!st && !gpu) {
    /* Tensors marked as device memory (host pointers, never dereferenced):
     * no backend takes them, the message says so, out is left alone. */
    gqmm_tensor t[NT];
    for (int i = 0; i < NT; i++) t[i] = L.th[i], t[i].device = GQMM_DEVICE_CUDA;
    for (int f = 0; f < 2 && !st; f++) {
      gqmm_moe_weights w = weights(t, L.q, f);
      gqmm_ctx *c = f ? cu : ctx;
      int s2 = gqmm_moe_forward(c, &w, &t[X], &t[IDS], &t[EW], GQMM_ACT_GEGLU, &t[OUT]);
      if (s2 != GQMM_ERR_UNSUPPORTED || !strstr(gqmm_last_error(c), "cuda")) {
        fprintf(stderr, "  device tensors without a GPU: status %d (%s)\n", s2, gqmm_last_error(c));
        st = GQMM_ERR_BACKEND;
      }
    }
    const uint16_t *o = L.h[OUT];
    for (int64_t i = 0; i < L.T * L.H && !st; i++)
      if (o[i] != 0x7fc0) st = GQMM_ERR_BACKEND;
    /* no stream to set, no graph to record: errors with a message */
    gqmm_graph *g = (gqmm_graph *)&L; /* must come back NULL */
    if (!st &&
        (gqmm_device_set_stream(cu, NULL) == GQMM_OK || !gqmm_last_error(cu)[0] ||
         gqmm_graph_begin(cu) == GQMM_OK || !gqmm_last_error(cu)[0] ||
         gqmm_graph_end(cu, &g) == GQMM_OK || g || gqmm_graph_launch(cu, NULL) != GQMM_ERR_NULL)) {
      fprintf(stderr, "  streams and graphs without a GPU: %s\n", gqmm_last_error(cu));
      st = GQMM_ERR_BACKEND;
    }
    gqmm_graph_free(NULL);
    /* The hooks themselves, called with no GPU state: errors, no crash. */
    const gqmm__backend *be = test_backend(GQMM_BACKEND_CUDA);
    if (!st && be) {
      gqmm__moe_args a;
      memset(&a, 0, sizeof a);
      a.device = GQMM_DEVICE_CUDA, a.dtype = GQMM_BF16, a.q = L.q, a.tokens = 1, a.top_k = 1;
      a.hidden = a.inter = 64, a.experts = 1, a.gu_expert_rows = 128;
      double ph[5];
      if (!be->moe_forward || be->moe_forward(cu, &a) != GQMM_ERR_BACKEND ||
          !be->moe_phases || be->moe_phases(cu, ph) == GQMM_OK)
        st = GQMM_ERR_BACKEND;
    }
  }
  if (!st && gpu) { /* with a GPU: phases before any layer ran are an error */
    const gqmm__backend *be = test_backend(GQMM_BACKEND_CUDA);
    double ph[5];
    gqmm_ctx *fresh = test_ctx(GQMM_BACKEND_CUDA);
    if (!be || !fresh || !be->moe_phases || be->moe_phases(fresh, ph) == GQMM_OK) st = GQMM_ERR_BACKEND;
    gqmm_ctx_destroy(fresh);
  }
  layer_free(NULL, &L);
  gqmm_ctx_destroy(ctx);
  gqmm_ctx_destroy(cu);
  CHECK_OK(st);
}

/* ---- with a GPU ---------------------------------------------------------- */

/* true if gpu can allocate device memory; else says why the test stops
 * and destroys both of the test's contexts. */
static bool gpu_or_say(gqmm_ctx *gpu, gqmm_ctx *ref, const char *what) {
  void *probe = NULL;
  if (gqmm_device_alloc(gpu, 64, &probe) != GQMM_OK) {
    fprintf(stderr, "  no GPU: %s\n", what);
    gqmm_ctx_destroy(gpu), gqmm_ctx_destroy(ref);
    return false;
  }
  gqmm_device_free(gpu, probe);
  return true;
}

/* The gqmm_pack copies of gate_up, gate, up and down and the gqmm_pack_glu
 * copy of gate_up, into L->pk. */
static int layer_pack(gqmm_ctx *gpu, layer *L) {
  const int part[4] = {GU, G, U, D};
  int st = GQMM_OK;
  for (int i = 0; i < 5 && !st; i++)
    st = (i < 4 ? gqmm_pack : gqmm_pack_glu)(gpu, &L->td[part[i % 4]], &L->td[part[i % 4] + 1],
                                             &L->td[part[i % 4] + 2], L->q, &L->pk[i]);
  return st;
}

/* The layer's device weights, fused gate_up or separate gate and up: packed
 * 0 the MLX layout, 1 the gqmm_pack copies, 2 gate_up's gqmm_pack_glu copy
 * (fused only: the activation in the epilogue). */
static gqmm_moe_weights device_weights(const layer *L, int fused, int packed) {
  gqmm_moe_weights w = weights(L->td, L->q, fused);
  if (packed) {
    if (fused) w.gate_up_packed = L->pk[packed == 2 ? 4 : 0];
    else w.gate_packed = L->pk[1], w.up_packed = L->pk[2];
    w.down_packed = L->pk[3];
  }
  return w;
}

/* Run on the GPU with out poisoned first; copy the result to host `got`. */
static int gpu_run(gqmm_ctx *gpu, layer *L, int fused, int packed, gqmm_activation act,
                   const void *poison, void *got) {
  gqmm_moe_weights w = device_weights(L, fused, packed);
  int st = gqmm_device_copy(gpu, L->td[OUT].data, poison, L->bytes[OUT], GQMM_COPY_HOST_TO_DEVICE);
  if (!st) st = gqmm_moe_forward(gpu, &w, &L->td[X], &L->td[IDS], &L->td[EW], act, &L->td[OUT]);
  if (!st) st = gqmm_device_sync(gpu);
  if (!st) st = gqmm_device_copy(gpu, got, L->td[OUT].data, L->bytes[OUT], GQMM_COPY_DEVICE_TO_HOST);
  return st;
}

/* One layer, both activations, fused and separate, every config; returns
 * the number of failures. */
static int run_layer(gqmm_ctx *gpu, gqmm_ctx *ref, layer *L, int routing, uint64_t salt) {
  test_rng r = test_rng_make(salt);
  int fails = 0;
  int st = layer_make(ref, &r, L, routing);
  void *want = malloc(L->bytes[OUT]), *got = malloc(L->bytes[OUT]);
  void *again = malloc(L->bytes[OUT]), *poison = malloc(L->bytes[OUT]);
  if (!st && (!want || !got || !again || !poison)) st = GQMM_ERR_NOMEM;
  if (!st) st = layer_upload(gpu, L);
  if (st) {
    fprintf(stderr, "  setup: status %d (%s / %s)\n", st, gqmm_last_error(ref), gqmm_last_error(gpu));
    fails = 1;
    goto done;
  }
  test_poison(poison, L->dt, L->T * L->H);
  /* the layer again with gqmm_pack copies, where the format has them */
  const int packable = L->dt != GQMM_F32 && L->q.bits != 5 && L->q.bits != 6;
  if (packable && (st = layer_pack(gpu, L))) {
    fprintf(stderr, "  pack: status %d (%s)\n", st, gqmm_last_error(gpu));
    fails = 1;
    goto done;
  }
  /* gate's scales all take the one-FMA factor, up's none: the layer then
   * runs both kernel instances side by side */
  if (packable && (!gqmm_packed_scaled(L->pk[1]) || gqmm_packed_scaled(L->pk[2]))) {
    fprintf(stderr, "  FAIL bits %d %s: gate pack scaled %d, up pack scaled %d\n", L->q.bits,
            gqmm_dtype_name(L->dt), gqmm_packed_scaled(L->pk[1]), gqmm_packed_scaled(L->pk[2]));
    fails++;
  }
  const double tol = L->dt == GQMM_F32 ? 1e-5 : L->dt == GQMM_F16 ? 4e-3 : 1.2e-2;
  /* the reference once per activation; then the layer unpacked (pkd 0), on
   * gqmm_pack copies (1) and with gate_up's gqmm_pack_glu copy (2: of the
   * fused tensor only; separate gate and up run as in 1) */
  for (int a = 0; a < 2; a++) {
    const gqmm_activation act = a ? GQMM_ACT_GEGLU : GQMM_ACT_SWIGLU;
    gqmm_moe_weights wr = weights(L->th, L->q, 0);
    test_poison(want, L->dt, L->T * L->H);
    L->th[OUT].data = want;
    if ((st = gqmm_moe_forward(ref, &wr, &L->th[X], &L->th[IDS], &L->th[EW], act, &L->th[OUT]))) {
      fprintf(stderr, "  reference: %s\n", gqmm_last_error(ref));
      fails++;
      continue;
    }
    for (int pkd = 0; pkd < 1 + 2 * packable; pkd++) {
      gqmm__tile_config cfgs[16];
      gqmm__qmm_args probe = {.dtype = L->dt, .q = L->q, .transpose = 1,
                              .device = GQMM_DEVICE_CUDA, .M = 1, .N = L->I, .K = L->H,
                              .x = L->d[X], .w = L->d[G], .packed = pkd ? L->pk[1] : NULL};
      const int ncfg = test_backend(GQMM_BACKEND_CUDA)->configs(gpu, &probe, cfgs, 16);
      for (int f = pkd == 2; f < 2; f++)
        for (int ci = -1; ci < ncfg; ci++) { /* -1: the built-in choice */
          gpu->forced_config = ci < 0 ? -1 : cfgs[ci].id;
          st = gpu_run(gpu, L, f, pkd, act, poison, got);
          double err = st ? INFINITY : test_rel_err(got, L->dt, want, L->dt, L->T * L->H);
          /* determinism: the built-in choice run again gives the same bits */
          int same = 1;
          if (!st && ci < 0) {
            st = gpu_run(gpu, L, f, pkd, act, poison, again);
            same = !st && memcmp(got, again, L->bytes[OUT]) == 0;
          }
          if (!st && ci < 0 && pkd == 0 && f == 0 && a == 0) {
            /* phase times: only after a layer that recorded them */
            const gqmm__backend *be = test_backend(GQMM_BACKEND_CUDA);
            double ph[5] = {-1, -1, -1, -1, -1};
            if (be->moe_phases(gpu, ph) == GQMM_OK) st = GQMM_ERR_BACKEND;
            gpu->moe_timing = 1;
            if (!st) st = gpu_run(gpu, L, f, pkd, act, poison, again);
            gpu->moe_timing = 0;
            if (!st) st = be->moe_phases(gpu, ph);
            for (int i = 0; i < 5 && !st; i++)
              if (!(ph[i] >= 0 && ph[i] < 10)) st = GQMM_ERR_BACKEND;
            if (!st) same = memcmp(got, again, L->bytes[OUT]) == 0;
          }
          if (st || !(err <= tol) || !same) {
            fprintf(stderr,
                    "  FAIL T=%lld k=%lld E=%lld H=%lld I=%lld routing %d bits %d gs %d %s act %d "
                    "fused %d packed %d config %s: status %d (%s) rel_err %.3g (tol %.1g)%s\n",
                    (long long)L->T, (long long)L->k, (long long)L->E, (long long)L->H,
                    (long long)L->I, routing, L->q.bits, L->q.group_size, gqmm_dtype_name(L->dt), a,
                    f, pkd, ci < 0 ? "auto" : cfgs[ci].name, st, st ? gqmm_last_error(gpu) : "",
                    err, tol, same ? "" : " NOT DETERMINISTIC");
            fails++;
          }
        }
    }
  }
  gpu->forced_config = -1;
done:
  layer_free(gpu, L);
  free(want), free(got), free(again), free(poison);
  return fails;
}

GQMM_TEST(cuda_moe_matches_reference) {
  gqmm_ctx *gpu = test_ctx(GQMM_BACKEND_CUDA), *ref = test_ctx(GQMM_BACKEND_REF);
  CHECK(gpu && ref);
  if (!gpu_or_say(gpu, ref, "only the decline path is checked (cuda_moe_declines_cleanly)")) return;
  const char *quick_env = getenv("GQMM_CUDA_TEST_QUICK");
  const bool quick = quick_env && quick_env[0] == '1';
  const int bits[] = {4, 5, 3, 2, 8, 6}, gsz[] = {64, 32, 128};
  const gqmm_dtype dts[] = {GQMM_BF16, GQMM_F16, GQMM_F32};
  int fails = 0, runs = 0;
  uint64_t salt = 7200;
  for (int bi = 0; bi < (quick ? 2 : 6); bi++)
    for (int di = 0; di < (quick ? 1 : 3); di++)
      for (int gi = 0; gi < (quick || di ? 1 : 3); gi++) /* every group size in bf16 */
        for (int routing = 0; routing < 2; routing++) {
          /* ragged: 29 tokens x 3 slots, 9 experts (2 never routed), inter =
           * 3 groups (down's K not a multiple of 128, N = inter not of 128) */
          const int g = gsz[gi];
          layer L = {.T = 29, .k = 3, .E = 9, .H = 4 * g, .I = 3 * g, .q = {bits[bi], g}, .dt = dts[di],
                     .out_shift = routing ? gqmm_dtype_size(dts[di]) : 0};
          fails += run_layer(gpu, ref, &L, routing, salt++);
          runs++;
        }
  /* a seed-like slice: 64 tokens x top-8 over 16 experts, 4-bit group 64 */
  layer big = {.T = 64, .k = 8, .E = 16, .H = 512, .I = 256, .q = {4, 64}, .dt = GQMM_BF16};
  fails += run_layer(gpu, ref, &big, 0, salt++);
  runs++;
  /* the seed's routing, 256 tokens x top-8 over 128 experts: 2048 pairs,
   * the most the plan kernel's register form takes (route.cu), then 8 more
   * pairs (its loop form) */
  for (int extra = 0; extra < 2; extra++) {
    layer seed = {
        .T = 256 + extra, .k = 8, .E = 128, .H = 128, .I = 64, .q = {4, 64}, .dt = GQMM_BF16};
    fails += run_layer(gpu, ref, &seed, 0, salt++);
    runs++;
  }
  /* hidden 96: y's rows are 192 bytes, not whole 128-byte lines, so the
   * combine keeps y in L2 (moe.cu's 16-byte path without DROP) */
  layer ragged_h = {.T = 24, .k = 8, .E = 12, .H = 96, .I = 64, .q = {4, 32}, .dt = GQMM_BF16};
  fails += run_layer(gpu, ref, &ragged_h, 0, salt++);
  runs++;
  /* more experts than the plan kernel counts in shared memory (route.cu's
   * global-memory counters); almost every expert gets 0 or 1 rows */
  layer many = {.T = 16, .k = 4, .E = 4500, .H = 64, .I = 32, .q = {4, 32}, .dt = GQMM_BF16};
  fails += run_layer(gpu, ref, &many, 0, salt++);
  runs++;
  fprintf(stderr, "  %d GPU layers (each: 2 activations x fused/separate x every config), %d failures\n",
          runs, fails);
  gqmm_ctx_destroy(gpu), gqmm_ctx_destroy(ref);
  CHECK(fails == 0);
}

/* ---- chained calls: enqueued back to back vs one at a time --------------- */

/* `calls` layer calls, a device sync after each one if `each`, else none
 * between them: call c runs layer c % nl in variant (c / nl) % 3 (or 2 for
 * unpackable layers), on the layer's own x (even c) or on the output of
 * call c - 1 (odd c), into outs[c] (chain_run then copies every output to
 * host[c]).
 * Variant 0: a GLU pack of gate_up and a packed down (activation in
 * gate_up's epilogue); 1: separate packed gate and up (two GEMMs and the
 * activation kernel); 2: the MLX layout (the mma.sync kernel; the generic
 * one for 5-bit). */
static int chain_enqueue(gqmm_ctx *gpu, layer *Ls, int nl, int packable, int calls, int each,
                         void **outs) {
  int st = GQMM_OK;
  gqmm_tensor prev = Ls[0].td[OUT];
  for (int c = 0; c < calls && !st; c++) {
    layer *L = &Ls[c % nl];
    const int v = packable ? (c / nl) % 3 : 2;
    gqmm_moe_weights w = device_weights(L, v != 1, v == 0 ? 2 : v == 1);
    gqmm_tensor x = c % 2 ? prev : L->td[X], out = L->td[OUT];
    out.data = outs[c];
    st = gqmm_moe_forward(gpu, &w, &x, &L->td[IDS], &L->td[EW],
                          c % 3 ? GQMM_ACT_SWIGLU : GQMM_ACT_GEGLU, &out);
    prev = out;
    if (!st && each) st = gqmm_device_sync(gpu);
  }
  return st;
}

/* Wait for the chain, then copy every output to host[c]. */
static int chain_fetch(gqmm_ctx *gpu, const layer *L0, int calls, void **outs, void **host) {
  int st = gqmm_device_sync(gpu);
  for (int c = 0; c < calls && !st; c++)
    st = gqmm_device_copy(gpu, host[c], outs[c], L0->bytes[OUT], GQMM_COPY_DEVICE_TO_HOST);
  return st;
}

static int chain_run(gqmm_ctx *gpu, layer *Ls, int nl, int packable, int calls, int each,
                     void **outs, void **host) {
  int st = chain_enqueue(gpu, Ls, nl, packable, calls, each, outs);
  return st ? st : chain_fetch(gpu, &Ls[0], calls, outs, host);
}

/* A model enqueues its layers with no host synchronization: every call
 * reuses the plan, gu, h and y scratch of the context, and x is often the
 * output of the call before. The same calls with a sync after each give
 * the expected bits (every kernel is deterministic): they must be
 * identical. */
static int chain_case(gqmm_ctx *gpu, gqmm_ctx *ref, int bits, gqmm_dtype dt, uint64_t salt) {
  enum { NL = 3, CALLS = 24 };
  layer Ls[NL];
  memset(Ls, 0, sizeof Ls);
  void *outs[CALLS] = {0}, *got[2][CALLS] = {{0}};
  int st = GQMM_OK;
  const int packable = bits != 5 && bits != 6;
  test_rng r = test_rng_make(salt);
  for (int l = 0; l < NL && !st; l++) {
    /* skewed routing, all pairs on one expert, skewed again */
    Ls[l] = (layer){.T = 64, .k = 8, .E = 16, .H = 512, .I = 256, .q = {bits, 64}, .dt = dt};
    st = layer_make(ref, &r, &Ls[l], l == 1);
    if (!st) st = layer_upload(gpu, &Ls[l]);
    if (!st && packable) st = layer_pack(gpu, &Ls[l]);
  }
  const size_t ob = Ls[0].bytes[OUT];
  for (int c = 0; c < CALLS && !st; c++) {
    st = gqmm_device_alloc(gpu, ob, &outs[c]);
    for (int m = 0; m < 2 && !st; m++)
      if (!(got[m][c] = malloc(ob))) st = GQMM_ERR_NOMEM;
  }
  /* one at a time, back to back, one at a time again (the scratch then
   * holds what the back-to-back chain left) */
  for (int m = 0; m < 3 && !st; m++) {
    st = chain_run(gpu, Ls, NL, packable, CALLS, m != 1, outs, got[m == 1]);
    for (int c = 0; c < CALLS && !st && m == 2; c++)
      if (memcmp(got[0][c], got[1][c], ob)) {
        fprintf(stderr, "  FAIL bits %d %s: call %d (layer %d, variant %d) differs when the "
                "calls are enqueued back to back\n", bits, gqmm_dtype_name(dt), c, c % NL,
                packable ? (c / NL) % 3 : 2);
        st = GQMM_ERR_BACKEND;
      }
  }
  /* the outputs are numbers, not a chain decayed to zeros */
  int64_t finite = 0, nonzero = 0, n = Ls[0].T * Ls[0].H;
  for (int c = 0; c < CALLS && !st; c++)
    for (int64_t i = 0; i < n; i++) {
      const float v = gqmm__load_f(got[1][c], dt, i);
      finite += isfinite(v), nonzero += v != 0;
    }
  if (!st && (finite != CALLS * n || nonzero < CALLS * n * 9 / 10)) {
    fprintf(stderr, "  FAIL bits %d: %lld of %lld outputs finite, %lld nonzero\n", bits,
            (long long)finite, (long long)(CALLS * n), (long long)nonzero);
    st = GQMM_ERR_BACKEND;
  }
  if (st) fprintf(stderr, "  chain bits %d %s: status %d (%s)\n", bits, gqmm_dtype_name(dt), st,
                  gqmm_last_error(gpu));
  for (int c = 0; c < CALLS; c++) {
    if (outs[c]) gqmm_device_free(gpu, outs[c]);
    free(got[0][c]), free(got[1][c]);
  }
  for (int l = 0; l < NL; l++) layer_free(gpu, &Ls[l]);
  return st != GQMM_OK;
}

GQMM_TEST(cuda_moe_back_to_back_calls_match_synced_calls) {
  gqmm_ctx *gpu = test_ctx(GQMM_BACKEND_CUDA), *ref = test_ctx(GQMM_BACKEND_REF);
  CHECK(gpu && ref);
  if (!gpu_or_say(gpu, ref, "no kernels to chain here (cuda_moe_declines_cleanly)")) return;
  int fails = 0;
  fails += chain_case(gpu, ref, 4, GQMM_BF16, 7701); /* tensor cores, every variant */
  fails += chain_case(gpu, ref, 2, GQMM_F16, 7702);
  fails += chain_case(gpu, ref, 5, GQMM_BF16, 7703); /* the generic kernel between them */
  gqmm_ctx_destroy(gpu), gqmm_ctx_destroy(ref);
  CHECK(fails == 0);
}

/* ---- bad expert ids on the device: the deferred error ------------------- */

/* Out of the layer on the device, to host `got`; status of the copy. */
static int fetch_out(gqmm_ctx *gpu, layer *L, void *got) {
  return gqmm_device_copy(gpu, got, L->td[OUT].data, L->bytes[OUT], GQMM_COPY_DEVICE_TO_HOST);
}

/* Rows of token bad_t all NaN (bad_t < 0: none) and every other row within
 * tol of want; prints what is wrong. */
static bool out_ok(const layer *L, const void *got, const void *want, int64_t bad_t, double tol) {
  const int64_t H = L->H, n = L->T * H;
  const size_t es = gqmm_dtype_size(L->dt);
  bool ok = true;
  for (int64_t i = bad_t < 0 ? n : bad_t * H; i < (bad_t + 1) * H && i < n; i++)
    ok = ok && isnan(gqmm__load_f(got, L->dt, i));
  if (!ok) fprintf(stderr, "  token %lld with a bad id: output not all NaN\n", (long long)bad_t);
  char *mixed = malloc(L->bytes[OUT]); /* got with the bad token's rows from want */
  if (!mixed) return false;
  memcpy(mixed, got, L->bytes[OUT]);
  if (bad_t >= 0) memcpy(mixed + bad_t * H * es, (const char *)want + bad_t * H * es, H * es);
  const double err = test_rel_err(mixed, L->dt, want, L->dt, n);
  free(mixed);
  if (!(err <= tol)) fprintf(stderr, "  good tokens: rel_err %.3g (tol %.1g)\n", err, tol), ok = false;
  return ok;
}

/* The status is `want` and, if an error, its message contains `text`. */
static bool status_is(gqmm_ctx *gpu, int st, int want, const char *text, const char *step) {
  if (st == want && (!want || strstr(gqmm_last_error(gpu), text))) return true;
  fprintf(stderr, "  %s: status %d (%s), expected %d naming '%s'\n", step, st,
          gqmm_last_error(gpu), want, text);
  return false;
}

/* One layer with pair bad_p given the id `bad` (int32 or uint32 bits):
 * the call itself succeeds, the token's rows are NaN, the other tokens
 * are right; the next sync reports GQMM_ERR_ARG once; the bad call again,
 * then (after a synchronous copy) a good call is refused with the same
 * report; the call after that runs and matches the reference. */
static int bad_id_case(gqmm_ctx *gpu, gqmm_ctx *ref, int bits, gqmm_dtype ids_dt, int32_t bad,
                       int64_t bad_p, int glu, uint64_t salt) {
  layer L = {.T = 7, .k = 3, .E = 5, .H = 128, .I = 64, .q = {bits, 64}, .dt = GQMM_BF16};
  test_rng r = test_rng_make(salt);
  int st = layer_make(ref, &r, &L, 0);
  void *want = malloc(L.bytes[OUT]), *got = malloc(L.bytes[OUT]), *poison = malloc(L.bytes[OUT]);
  int32_t *bad_ids = malloc(L.bytes[IDS]);
  if (!st && (!want || !got || !poison || !bad_ids)) st = GQMM_ERR_NOMEM;
  L.th[IDS].dtype = ids_dt;
  if (!st) st = layer_upload(gpu, &L);
  if (!st && glu) st = layer_pack(gpu, &L);
  /* glu: gate_up's GLU pack and a packed down (the activation in gate_up's
   * epilogue), else the MLX layout */
  gqmm_moe_weights wr = weights(L.th, L.q, 0), wd = device_weights(&L, 1, glu ? 2 : 0);
  if (!st) {
    test_poison(want, L.dt, L.T * L.H);
    L.th[OUT].data = want;
    st = gqmm_moe_forward(ref, &wr, &L.th[X], &L.th[IDS], &L.th[EW], GQMM_ACT_SWIGLU, &L.th[OUT]);
  }
  if (st) {
    fprintf(stderr, "  setup: status %d (%s / %s)\n", st, gqmm_last_error(ref), gqmm_last_error(gpu));
    goto done;
  }
  test_poison(poison, L.dt, L.T * L.H);
  memcpy(bad_ids, L.h[IDS], L.bytes[IDS]);
  bad_ids[bad_p] = bad;
  char where[48];
  snprintf(where, sizeof where, "element [%lld, %lld]", (long long)(bad_p / L.k),
           (long long)(bad_p % L.k));
  const double tol = 1.2e-2;
  bool ok = true;
  for (int round = 0; round < 2 && ok; round++) {
    st = gqmm_device_copy(gpu, L.td[IDS].data, bad_ids, L.bytes[IDS], GQMM_COPY_HOST_TO_DEVICE);
    if (!st) st = gqmm_device_copy(gpu, L.td[OUT].data, poison, L.bytes[OUT], GQMM_COPY_HOST_TO_DEVICE);
    if (st) break;
    ok = status_is(gpu, gqmm_moe_forward(gpu, &wd, &L.td[X], &L.td[IDS], &L.td[EW],
                                         GQMM_ACT_SWIGLU, &L.td[OUT]),
                   GQMM_OK, "", "the bad call");
    if (round == 0) { /* reported by the sync, once */
      ok = ok && status_is(gpu, gqmm_device_sync(gpu), GQMM_ERR_ARG, "expert_ids", "sync");
      ok = ok && status_is(gpu, GQMM_ERR_ARG, GQMM_ERR_ARG, where, "sync's message");
      ok = ok && status_is(gpu, gqmm_device_sync(gpu), GQMM_OK, "", "second sync");
      ok = ok && fetch_out(gpu, &L, got) == GQMM_OK && out_ok(&L, got, want, bad_p / L.k, tol);
    } else { /* reported by the next layer call once the device got there */
      st = fetch_out(gpu, &L, got); /* a synchronous copy: the bad call has run */
      if (!st) st = gqmm_device_copy(gpu, L.td[IDS].data, L.h[IDS], L.bytes[IDS],
                                     GQMM_COPY_HOST_TO_DEVICE);
      if (st) break;
      ok = ok && out_ok(&L, got, want, bad_p / L.k, tol);
      ok = ok && status_is(gpu, gqmm_moe_forward(gpu, &wd, &L.td[X], &L.td[IDS], &L.td[EW],
                                                 GQMM_ACT_SWIGLU, &L.td[OUT]),
                           GQMM_ERR_ARG, where, "the call after the bad one");
      ok = ok && status_is(gpu, gqmm_device_sync(gpu), GQMM_OK, "", "sync after the report");
      /* and the one after that runs normally */
      st = gqmm_device_copy(gpu, L.td[OUT].data, poison, L.bytes[OUT], GQMM_COPY_HOST_TO_DEVICE);
      if (st) break;
      ok = ok && status_is(gpu, gqmm_moe_forward(gpu, &wd, &L.td[X], &L.td[IDS], &L.td[EW],
                                                 GQMM_ACT_SWIGLU, &L.td[OUT]),
                           GQMM_OK, "", "the good call");
      ok = ok && status_is(gpu, gqmm_device_sync(gpu), GQMM_OK, "", "sync after the good call");
      ok = ok && fetch_out(gpu, &L, got) == GQMM_OK && out_ok(&L, got, want, -1, tol);
    }
  }
  if (!st && !ok) st = GQMM_ERR_BACKEND;
  if (st)
    fprintf(stderr, "  FAIL bad id %d at pair %lld, bits %d, %s ids, glu %d: status %d (%s)\n", bad,
            (long long)bad_p, bits, gqmm_dtype_name(ids_dt), glu, st, gqmm_last_error(gpu));
done:
  gqmm_device_sync(gpu); /* leave no report behind for the next case */
  layer_free(gpu, &L);
  free(want), free(got), free(poison), free(bad_ids);
  return st != GQMM_OK;
}

GQMM_TEST(cuda_moe_bad_device_ids_are_deferred_errors) {
  gqmm_ctx *gpu = test_ctx(GQMM_BACKEND_CUDA), *ref = test_ctx(GQMM_BACKEND_REF);
  CHECK(gpu && ref);
  if (!gpu_or_say(gpu, ref, "device ids cannot be checked here (cuda_moe_declines_cleanly)"))
    return;
  /* tensor cores (4-bit) and the generic kernel (5-bit); id == E, -1, and
   * a uint32 above INT32_MAX; first, middle and last pair */
  int fails = 0;
  for (int glu = 0; glu < 2; glu++) { /* glu 1: the seed layer's packed form */
    fails += bad_id_case(gpu, ref, 4, GQMM_I32, 5, 0, glu, 7601);
    fails += bad_id_case(gpu, ref, 4, GQMM_I32, -1, 10, glu, 7602);
    fails += bad_id_case(gpu, ref, 4, GQMM_U32, (int32_t)0x80000001u, 20, glu, 7603);
  }
  fails += bad_id_case(gpu, ref, 5, GQMM_I32, 1000, 13, 0, 7604);
  fails += bad_id_case(gpu, ref, 5, GQMM_U32, -7, 20, 0, 7605);
  gqmm_ctx_destroy(gpu), gqmm_ctx_destroy(ref);
  CHECK(fails == 0);
}

/* ---- the context's stream and graphs of layer calls --------------------- */

/* Out of every call poisoned, one replay of g (or two back to back), then
 * the outputs to host. */
static int replay(gqmm_ctx *gpu, const gqmm_graph *g, int times, const layer *L0, int calls,
                  void **outs, const void *poison, void **host) {
  int st = GQMM_OK;
  for (int c = 0; c < calls && !st; c++)
    st = gqmm_device_copy(gpu, outs[c], poison, L0->bytes[OUT], GQMM_COPY_HOST_TO_DEVICE);
  for (int t = 0; t < times && !st; t++)
    st = gqmm_graph_launch(gpu, g);
  return st ? st : chain_fetch(gpu, L0, calls, outs, host);
}

/* host[c] equal to want[c], bit for bit, for every call; else says which. */
static bool same_bits(void **host, void **want, int calls, size_t bytes, const char *what) {
  for (int c = 0; c < calls; c++)
    if (memcmp(host[c], want[c], bytes)) {
      fprintf(stderr, "  FAIL %s: call %d differs from the calls run one by one\n", what, c);
      return false;
    }
  return true;
}

/* A chain of layer calls (chain_enqueue: every variant, x from the call
 * before) recorded as a graph after the calls ran once one by one: each
 * replay gives their bits; a replay after x changed gives the bits of the
 * calls run again on the new x (the graph reads the buffers' contents when
 * it runs); two replays back to back too; a replay after a larger call of
 * another top_k replaced the context's scratch. While recording, the calls
 * that cannot be recorded are refused and the recording goes on. Then the same
 * on a stream of the caller's (stream; NULL: none), with the chain run
 * directly there as well. */
static int graph_case(gqmm_ctx *gpu, gqmm_ctx *ref, int bits, void *stream, uint64_t salt) {
  enum { NL = 3, CALLS = 9 };
  layer Ls[NL + 1]; /* + one larger than any the context ran */
  memset(Ls, 0, sizeof Ls);
  void *outs[CALLS] = {0}, *want[CALLS] = {0}, *got[CALLS] = {0};
  int st = GQMM_OK;
  bool ok = true;
  gqmm_graph *g = NULL;
  test_rng r = test_rng_make(salt);
  for (int l = 0; l <= NL && !st; l++) {
    const bool big = l == NL; /* 1024 pairs of top-4 */
    Ls[l] = (layer){.T = big ? 256 : 64,
                    .k = big ? 4 : 8,
                    .E = 16,
                    .H = 512,
                    .I = 256,
                    .q = {bits, 64},
                    .dt = GQMM_BF16};
    st = layer_make(ref, &r, &Ls[l], l == 1);
    if (!st) st = layer_upload(gpu, &Ls[l]);
    if (!st) st = layer_pack(gpu, &Ls[l]);
  }
  const size_t ob = Ls[0].bytes[OUT];
  void *poison = malloc(ob), *x2 = malloc(Ls[0].bytes[X]);
  if (!st && (!poison || !x2)) st = GQMM_ERR_NOMEM;
  for (int c = 0; c < CALLS && !st; c++) {
    st = gqmm_device_alloc(gpu, ob, &outs[c]);
    if (!st && (!(want[c] = malloc(ob)) || !(got[c] = malloc(ob)))) st = GQMM_ERR_NOMEM;
  }
  if (!st) {
    test_poison(poison, GQMM_BF16, Ls[0].T * Ls[0].H);
    test_fill(&r, x2, GQMM_BF16, Ls[0].T * Ls[0].H, 1.0f);
    st = gqmm_device_set_stream(gpu, stream);
  }
  if (!st) st = chain_run(gpu, Ls, NL, 1, CALLS, 1, outs, want);
  if (!st && stream) { /* on the caller's stream, back to back */
    st = chain_run(gpu, Ls, NL, 1, CALLS, 0, outs, got);
    ok = ok && same_bits(got, want, CALLS, ob, "the chain on the caller's stream");
  }
  if (!st) st = gqmm_graph_begin(gpu);
  if (!st) { /* refused while recording; the recording goes on */
    gqmm_moe_weights wl = device_weights(&Ls[NL], 1, 2);
    gqmm_packed *pk = NULL;
    void *d = NULL;
    ok = ok && status_is(gpu, gqmm_graph_begin(gpu), GQMM_ERR_ARG, "already recording", "begin");
    ok = ok &&
         status_is(gpu, gqmm_device_sync(gpu), GQMM_ERR_UNSUPPORTED, "gqmm_device_sync", "sync");
    ok = ok && status_is(gpu, gqmm_device_copy(gpu, outs[0], poison, ob, GQMM_COPY_HOST_TO_DEVICE),
                         GQMM_ERR_UNSUPPORTED, "gqmm_device_copy", "copy");
    ok = ok &&
         status_is(gpu, gqmm_device_alloc(gpu, 64, &d), GQMM_ERR_UNSUPPORTED, "gqmm_device_alloc",
                   "alloc") &&
         !d;
    ok = ok && status_is(gpu, gqmm_device_set_stream(gpu, NULL), GQMM_ERR_UNSUPPORTED, "set_stream",
                         "set_stream");
    ok = ok &&
         status_is(gpu, gqmm_pack(gpu, &Ls[0].td[D], &Ls[0].td[DS], &Ls[0].td[DB], Ls[0].q, &pk),
                   GQMM_ERR_UNSUPPORTED, "gqmm_pack", "pack") &&
         !pk;
    ok = ok && status_is(gpu,
                         gqmm_moe_forward(gpu, &wl, &Ls[NL].td[X], &Ls[NL].td[IDS], &Ls[NL].td[EW],
                                          GQMM_ACT_SWIGLU, &Ls[NL].td[OUT]),
                         GQMM_ERR_UNSUPPORTED, "larger than any before", "a larger layer");
    st = chain_enqueue(gpu, Ls, NL, 1, CALLS, 0, outs);
    const int end = gqmm_graph_end(gpu, &g);
    if (!st) st = end;
  }
  if (!st) st = replay(gpu, g, 1, &Ls[0], CALLS, outs, poison, got);
  ok = ok && (st || same_bits(got, want, CALLS, ob, "a replay"));
  if (!st) st = replay(gpu, g, 2, &Ls[0], CALLS, outs, poison, got);
  ok = ok && (st || same_bits(got, want, CALLS, ob, "two replays back to back"));
  /* new x for layer 0: the calls one by one, then a replay */
  if (!st)
    st = gqmm_device_copy(gpu, Ls[0].td[X].data, x2, Ls[0].bytes[X], GQMM_COPY_HOST_TO_DEVICE);
  if (!st) st = chain_run(gpu, Ls, NL, 1, CALLS, 1, outs, want);
  if (!st) st = replay(gpu, g, 1, &Ls[0], CALLS, outs, poison, got);
  ok = ok && (st || same_bits(got, want, CALLS, ob, "a replay on new x"));
  /* a larger call of another top_k outside the recording replaces the
   * scratch: the graph keeps the one it was recorded on */
  if (!st) {
    gqmm_moe_weights wl = device_weights(&Ls[NL], 1, 2);
    st = gqmm_moe_forward(gpu, &wl, &Ls[NL].td[X], &Ls[NL].td[IDS], &Ls[NL].td[EW], GQMM_ACT_SWIGLU,
                          &Ls[NL].td[OUT]);
  }
  if (!st) st = replay(gpu, g, 1, &Ls[0], CALLS, outs, poison, got);
  ok = ok && (st || same_bits(got, want, CALLS, ob, "a replay after a larger call"));
  if (!st) { /* not recording any more; a graph replays on its own context only */
    gqmm_ctx *other = test_ctx(GQMM_BACKEND_CUDA);
    ok = ok && other &&
         status_is(other, gqmm_graph_launch(other, g), GQMM_ERR_ARG, "another context",
                   "launch elsewhere");
    gqmm_ctx_destroy(other);
    gqmm_graph *none = g;
    ok = ok && status_is(gpu, gqmm_graph_end(gpu, &none), GQMM_ERR_ARG, "not recording", "end") &&
         !none;
    ok = ok && status_is(gpu, gqmm_device_set_stream(gpu, NULL), GQMM_OK, "", "set_stream NULL");
  }
  if (!st && !ok) st = GQMM_ERR_BACKEND;
  if (st)
    fprintf(stderr, "  graph case bits %d, %s stream: status %d (%s)\n", bits,
            stream ? "the caller's" : "the context's own", st, gqmm_last_error(gpu));
  gqmm_graph_free(g);
  gqmm_device_set_stream(gpu, NULL);
  for (int c = 0; c < CALLS; c++) {
    if (outs[c]) gqmm_device_free(gpu, outs[c]);
    free(want[c]), free(got[c]);
  }
  free(poison), free(x2);
  for (int l = 0; l <= NL; l++)
    layer_free(gpu, &Ls[l]);
  return st != GQMM_OK;
}

GQMM_TEST(cuda_moe_graph_replays_match_direct_calls) {
  gqmm_ctx *gpu = test_ctx(GQMM_BACKEND_CUDA), *ref = test_ctx(GQMM_BACKEND_REF);
  CHECK(gpu && ref);
  if (!gpu_or_say(gpu, ref, "no graphs to record here (cuda_moe_declines_cleanly)")) return;
  int fails = graph_case(gpu, ref, 4, NULL, 7801);
#ifdef GQMM_TEST_HAVE_CUDA
  cudaStream_t s = NULL; /* a caller's stream, not ordered with the legacy one */
  if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess)
    fails++;
  else
    fails += graph_case(gpu, ref, 2, s, 7802);
  gqmm_ctx_destroy(gpu); /* before the stream it may use */
  if (s) cudaStreamDestroy(s);
#else
  fprintf(stderr, "  built without the CUDA runtime headers: no caller's stream case\n");
  gqmm_ctx_destroy(gpu);
#endif
  gqmm_ctx_destroy(ref);
  CHECK(fails == 0);
}
