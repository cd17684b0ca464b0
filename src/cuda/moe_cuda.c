/*
 * moe_cuda.c - the CUDA backend's moe_forward: the whole MoE expert layer on
 * device tensors, enqueued on the context's stream (backend_cuda.c) with no
 * host round trip and no host synchronization, so a graph can record it
 * (gqmm_graph_begin):
 *   plan     the pairs p = t*top_k + j as batch entries (x row t, expert
 *            ids[p], M = 1) -> routing plan on the GPU (route.cu), built from
 *            the device ids in one kernel for both GEMMs' N tilings; the
 *            same kernel checks the ids (see "bad ids" below)
 *   gate_up  one gathered GEMM of N = 2*inter (fused tensor) or two of N = inter
 *   act      SwiGLU / GeGLU into h [R, inter] (moe.cu); with a gqmm_pack_glu
 *            copy of the fused gate_up, in the gate_up GEMM's epilogue instead
 *            (mma_common.cuh store_unit_glu: gate_up writes h, no act kernel)
 *   down     gathered GEMM of h row p with expert ids[p] into y [R, hidden]
 *   combine  out[t] = sum_j w[t, j] * y[t*top_k + j], ascending j, float32
 * The GEMMs write rows in pair order (the plan's out row of entry p is p), so
 * the activation and the combine need no permutation. GEMMs run the tensor-
 * core kernel when it takes the arguments, else the generic one (5/6-bit,
 * f32). Scratch (indices, plans, gu, h, y) is cached in the context's CUDA
 * state and grown with cudaMalloc when a call needs more; only a growth
 * waits for queued work (cudaFree synchronizes), and is refused while a
 * graph records. Events between the steps give the phase times of the last
 * call (moe_phases hook; not in a recorded call).
 *
 * Bad ids: the host never reads the device ids (a copy would drain the
 * stream every layer). The plan kernel routes an id outside [0, E) to
 * expert 0 (no out-of-bounds access; the combine makes the token's output
 * NaN) and records the first bad pair in a host-mapped record of this
 * state. The record is reported, and cleared, as GQMM_ERR_ARG by the next
 * gqmm_device_sync (cuda_sync) and by the next moe_forward that finds it
 * set (gqmm__cuda_moe_take_error).
 */
#include "backend_cuda.h"
#include "kernels.h"

#include <cuda_runtime_api.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

enum { NEV = 6 };

typedef struct {
  int sms;
  char *buf; /* scratch, see layout() */
  size_t cap;
  cudaEvent_t ev[NEV]; /* before plan, gate_up, act, down, combine, after */
  int timed;
  int64_t idx_rows, idx_k; /* the pair indices in the scratch are for these (0: none) */
  volatile int32_t *err_h;   /* host-mapped bad-id record (kernels.h, gqmm__cu_moe_route) */
  int32_t *err_d;            /* its device view */
  uint32_t calls;            /* layer calls enqueued, to name the bad one */
  /* Recorded graphs keep the scratch's address: once a call was recorded,
   * a scratch that must change is replaced, the old one kept until the
   * state goes (so a replay of an old graph still has its memory). */
  bool recorded;
  void **retired;
  int nretired;
} moe_state;

static int moe_fail(gqmm_ctx *ctx, int err, const char *what) {
  cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
  return gqmm__fail(ctx, GQMM_ERR_BACKEND, "cuda moe_forward: %s: %s", what,
                    cudaGetErrorString((cudaError_t)err));
}

static moe_state *get_state(gqmm_ctx *ctx) {
  void **slot = gqmm__cuda_moe_slot(ctx);
  if (!slot) return NULL;
  if (*slot) return *slot;
  moe_state *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  int n = 0, dev = 0;
  void *err_h = NULL, *err_d = NULL;
  while (n < NEV && cudaEventCreate(&s->ev[n]) == cudaSuccess) n++;
  if (n < NEV || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&s->sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaHostAlloc(&err_h, 8 * sizeof(int32_t), cudaHostAllocMapped) != cudaSuccess ||
      cudaHostGetDevicePointer(&err_d, err_h, 0) != cudaSuccess) {
    cudaGetLastError();
    while (n--) cudaEventDestroy(s->ev[n]);
    cudaFreeHost(err_h);
    free(s);
    return NULL;
  }
  s->err_h = err_h;
  s->err_d = err_d;
  for (int i = 0; i < 8; i++) s->err_h[i] = 0;
  *slot = s;
  return s;
}

void gqmm__cuda_moe_release(void *moe) {
  moe_state *s = moe;
  if (!s) return;
  for (int i = 0; i < NEV; i++) cudaEventDestroy(s->ev[i]);
  cudaFree(s->buf);
  for (int i = 0; i < s->nretired; i++)
    cudaFree(s->retired[i]);
  free(s->retired);
  cudaFreeHost((void *)s->err_h);
  free(s);
}

int gqmm__cuda_moe_take_error(gqmm_ctx *ctx) {
  void **slot = gqmm__cuda_moe_slot(ctx);
  moe_state *s = slot ? *slot : NULL;
  if (!s || s->err_h[0] == 0) return GQMM_OK;
  /* The kernel wrote the fields before the call number (system fence).
   * Several bad calls in flight may mix their fields or lose one report;
   * their tokens are NaN all the same. */
  atomic_thread_fence(memory_order_acquire);
  const uint32_t call = (uint32_t)s->err_h[0];
  const int32_t p = s->err_h[1], id = s->err_h[2], E = s->err_h[3], k = s->err_h[4];
  s->err_h[0] = 0;
  char as_u32[32] = "";
  if (id < 0) snprintf(as_u32, sizeof as_u32, " (%u as uint32)", (unsigned)id);
  return gqmm__fail(ctx, GQMM_ERR_ARG,
                    "expert_ids: an earlier call (layer call %u on this context) had an id outside "
                    "[0, %d): element [%d, %d] is %d%s; that token's output rows are NaN",
                    call, E, k > 0 ? p / k : p, k > 0 ? p % k : 0, id, as_u32);
}

/* ---- scratch ------------------------------------------------------------ */

enum { S_TOK, S_IOTA, S_PLAN, S_GU, S_H, S_Y, S_UNITS_GU, S_UNITS_DOWN, S_PARTS };

/* The smallest work unit (rows) and N tile of any config: they bound the
 * number of units a GEMM of the layer can have, whatever config it takes. */
static void smallest_unit(int64_t *tok, int64_t *tile) {
  *tok = *tile = INT32_MAX;
  for (int c = 0; c < gqmm__cu_mma_config_count(); c++) {
    if (gqmm__cu_mma_tok_max(c) < *tok) *tok = gqmm__cu_mma_tok_max(c);
    if (gqmm__cu_mma_tile_n(c) < *tile) *tile = gqmm__cu_mma_tile_n(c);
  }
}

/* Room for the unit descriptors of a GEMM with N rows, for any config. */
static size_t units_bytes(int64_t R, int64_t E, int64_t N) {
  int64_t tok, tile;
  smallest_unit(&tok, &tile);
  return (size_t)gqmm__cu_units_bound(R, R < E ? R : E, tok, (N + tile - 1) / tile) * 16;
}

/* Byte offsets of the scratch parts (256-byte aligned: the tensor-core
 * kernel wants 16-byte aligned x rows); returns the total. */
static size_t layout(const gqmm__moe_args *a, size_t off[S_PARTS]) {
  const size_t R = (size_t)(a->tokens * a->top_k), E = (size_t)a->experts;
  const size_t esz = gqmm_dtype_size(a->dtype), plan = (5 * E + 2 + 3 * R) * sizeof(int32_t);
  const size_t bytes[S_PARTS] = {R * sizeof(int32_t),
                                 R * sizeof(int32_t),
                                 plan,
                                 R * (size_t)(2 * a->inter) * esz,
                                 R * (size_t)a->inter * esz,
                                 R * (size_t)a->hidden * esz,
                                 units_bytes((int64_t)R, (int64_t)E, 2 * a->inter),
                                 units_bytes((int64_t)R, (int64_t)E, a->hidden)};
  size_t at = 0;
  for (int i = 0; i < S_PARTS; i++) {
    off[i] = at;
    at += (bytes[i] + 255) & ~(size_t)255;
  }
  return at;
}

/* At least `need` bytes of scratch; fresh: a new one even if it is large
 * enough (its pair indices must change under recorded graphs). */
static int ensure_scratch(gqmm_ctx *ctx, moe_state *s, size_t need, bool fresh) {
  if (s->cap >= need && !fresh) return GQMM_OK;
  int st = gqmm__cuda_refuse_recording(ctx, "a moe_forward larger than any before on this "
                                            "context, or of another top_k (run one such "
                                            "call first)");
  if (st) return st;
  if (s->recorded && s->buf) { /* a recorded graph may still replay on it */
    void **r = realloc(s->retired, (size_t)(s->nretired + 1) * sizeof *r);
    if (!r) return gqmm__fail(ctx, GQMM_ERR_NOMEM, "cuda moe_forward: out of host memory");
    s->retired = r;
    s->retired[s->nretired++] = s->buf;
  } else {
    cudaFree(s->buf); /* waits for queued kernels that may still use it */
  }
  s->buf = NULL;
  s->cap = 0;
  s->idx_rows = s->idx_k = 0;
  const size_t n = need + need / 4;
  if (cudaMalloc((void **)&s->buf, n) != cudaSuccess) {
    cudaGetLastError();
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "cuda moe_forward: cannot allocate %zu bytes of scratch",
                      n);
  }
  s->cap = n;
  return GQMM_OK;
}

/* The plan arrays inside the plan part: gate_up's plan, down's units
 * (unit_start2) and the checked ids. */
static gqmm__cu_plan plan_at(char *base, int64_t E, int64_t R, int32_t **unit_start2,
                             int32_t **ids_safe) {
  gqmm__cu_plan p;
  p.count = (int32_t *)base, p.row_start = p.count + E, p.fill = p.row_start + E;
  p.unit_start = p.fill + E, p.rows_x = p.unit_start + E + 1, p.rows_o = p.rows_x + R;
  *unit_start2 = p.rows_o + R;
  *ids_safe = *unit_start2 + E + 1;
  return p;
}

/* ---- the GEMMs -------------------------------------------------------------- */

typedef struct {
  gqmm__cu_qmm k;
  int cfg;     /* tensor-core config, or gqmm__cu_mma_config_count() = generic */
  int n_tiles; /* N tiles of cfg (tensor-core only) */
  int tok;     /* rows per work unit of cfg (tensor-core only) */
  const struct gqmm_packed *pk; /* gqmm_pack copy of the weights, or NULL */
} gemm;

/* ids: the checked ids (the generic kernel reads them; the tensor-core one
 * reads the plan). */
static gemm gemm_make(const gqmm__moe_args *a, int64_t N, int64_t K, const void *x,
                      const int32_t *x_index, const int32_t *ids, const uint32_t *w,
                      const void *sc, const void *bi, const struct gqmm_packed *pk, void *out) {
  gemm g;
  g.k = (gqmm__cu_qmm){.dtype = (int)a->dtype, .bits = a->q.bits, .group_size = a->q.group_size,
                       .transpose = 1, .M = 1, .N = N, .K = K, .batch = a->tokens * a->top_k,
                       .x = x, .w = w, .scales = sc, .biases = bi, .out = out,
                       .x_index = x_index, .w_index = ids};
  gqmm__cuda_set_packed(&g.k, pk);
  g.pk = pk;
  g.cfg = gqmm__cu_mma_config_count();
  g.n_tiles = 0;
  g.tok = 0;
  return g;
}

/* The backend's choice for this GEMM seen as a gather_qmm (forced, tuned,
 * else its heuristic), so the layer runs what `gqmm tune` measured. */
static int pick_config(gqmm_ctx *ctx, gemm *g, int64_t experts) {
  const int generic = gqmm__cu_mma_config_count();
  const gqmm__qmm_args q = {.dtype = (gqmm_dtype)g->k.dtype,
                            .q = {g->k.bits, g->k.group_size},
                            .transpose = 1,
                            .device = GQMM_DEVICE_CUDA,
                            .M = 1,
                            .N = g->k.N,
                            .K = g->k.K,
                            .batch = g->k.batch,
                            .x_batches = g->k.batch,
                            .w_batches = experts,
                            .x = g->k.x,
                            .w = g->k.w,
                            .scales = g->k.scales,
                            .biases = g->k.biases,
                            .out = g->k.out,
                            .packed = g->pk};
  const int cfg = gqmm__cuda_pick_config(ctx, &q);
  if (!gqmm__cuda_config_valid(cfg, &g->k))
    return gqmm__fail(ctx, GQMM_ERR_ARG, "config: id %d is not valid for the layer's GEMMs", cfg);
  g->cfg = cfg;
  if (cfg < generic) {
    g->n_tiles = gqmm__cu_mma_n_tiles(cfg, &g->k);
    g->tok = gqmm__cu_mma_tok_max(cfg);
  }
  return GQMM_OK;
}

static int launch_gemm(gqmm_ctx *ctx, const gemm *g, const gqmm__cu_plan *p, int64_t E,
                       const char *what) {
  int err;
  gqmm__cu_stream stream = gqmm__cuda_stream(ctx);
  if (g->cfg == gqmm__cu_mma_config_count()) {
    err = gqmm__cu_generic_run(&g->k, stream);
  } else {
    int grid = 0;
    if ((err = gqmm__cuda_grid(ctx, g->cfg, &g->k, &grid)))
      return moe_fail(ctx, err, "occupancy query");
    /* No more CTAs than units: each expert with rows adds at most one
     * partial chunk of tok_max rows. */
    const int64_t R = g->k.batch, used = R < E ? R : E;
    const int64_t units = gqmm__cu_units_bound(R, used, g->tok, g->n_tiles);
    if (grid > units) grid = (int)units;
    err = gqmm__cu_mma_run(g->cfg, &g->k, p, (int)E, grid, stream);
  }
  return err ? moe_fail(ctx, err, what) : GQMM_OK;
}

/* ---- the layer ---------------------------------------------------------------- */

int gqmm__cuda_moe_forward(gqmm_ctx *ctx, const gqmm__moe_args *a) {
  if (a->device != GQMM_DEVICE_CUDA)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "moe_forward: the cuda backend takes device tensors only");
  void **slot = gqmm__cuda_moe_slot(ctx);
  int st =
      slot && !*slot ? gqmm__cuda_refuse_recording(ctx, "a context's first moe_forward") : GQMM_OK;
  if (st) return st;
  moe_state *s = get_state(ctx);
  if (!s) return gqmm__fail(ctx, GQMM_ERR_BACKEND, "cuda moe_forward: no usable GPU");
  gqmm__cu_stream stream = gqmm__cuda_stream(ctx);
  /* no phase events in a recorded call: their times could not be read */
  const bool recording = gqmm__cuda_recording(ctx);
  const int timing = ctx->moe_timing && !recording;
  /* A bad id of an earlier call that the device has reached by now. */
  st = gqmm__cuda_moe_take_error(ctx);
  if (st) return st;
  const int64_t T = a->tokens, k = a->top_k, H = a->hidden, I = a->inter, E = a->experts;
  /* The smallest work unit of any config bounds the unit count. */
  int64_t tok, tile;
  smallest_unit(&tok, &tile);
  const int64_t R = T * k;
  /* The plan and the kernels index rows and units with int32. */
  const int64_t worst_units = gqmm__cu_units_bound(R, E, tok, (2 * I > H ? 2 * I : H) / 16 + 1);
  if (R > INT32_MAX / 2 || E > INT32_MAX / 8 || worst_units > INT32_MAX)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "cuda moe_forward: %lld tokens x top_k %lld exceed the kernels' 32-bit "
                      "row indices", (long long)T, (long long)k);
  size_t off[S_PARTS];
  /* the pair indices (tok_of, iota) depend on top_k: rewriting them in place
   * would change what a recorded graph computes */
  st = ensure_scratch(ctx, s, layout(a, off), s->recorded && s->idx_k && s->idx_k != k);
  if (st) return st;
  const size_t esz = gqmm_dtype_size(a->dtype);
  int32_t *tok_of = (int32_t *)(s->buf + off[S_TOK]), *iota = (int32_t *)(s->buf + off[S_IOTA]);
  char *gu = s->buf + off[S_GU], *h = s->buf + off[S_H], *y = s->buf + off[S_Y];
  int32_t *down_units, *ids;
  gqmm__cu_plan pg = plan_at(s->buf + off[S_PLAN], E, R, &down_units, &ids);
  pg.units = (int32_t *)(s->buf + off[S_UNITS_GU]);
  int32_t *down_descs = (int32_t *)(s->buf + off[S_UNITS_DOWN]);
  const bool fused = a->gu_expert_rows == 2 * I;
  /* gate_up: [R, 2I] rows (gate | up) from the fused tensor, else gate
   * [R, I] then up [R, I]; the activation finds them by (gs, uo). */
  gemm gate = gemm_make(a, fused ? 2 * I : I, H, a->x, tok_of, ids, a->gate_w, a->gate_s,
                        a->gate_b, a->gate_pk, gu);
  gemm up = gemm_make(a, I, H, a->x, tok_of, ids, a->up_w, a->up_s, a->up_b, a->up_pk,
                      gu + (size_t)(R * I) * esz);
  gemm down = gemm_make(a, H, I, h, iota, ids, a->down_w, a->down_s, a->down_b, a->down_pk, y);
  if ((st = pick_config(ctx, &gate, E)) || (!fused && (st = pick_config(ctx, &up, E))) ||
      (st = pick_config(ctx, &down, E)))
    return st;
  const int generic = gqmm__cu_mma_config_count();
  /* A GLU pack of gate_up: the activation runs in its epilogue, into h. */
  const bool act_fused = fused && gate.cfg != generic && gate.k.glu;
  if (act_fused) gate.k.out = h, gate.k.epilogue_act = 1 + (int)a->act;
  /* One plan kernel for both GEMMs (gate and up share N, so one tiling);
   * down reads h row p, the out row of pair p. */
  const gemm *g0 = gate.cfg != generic ? &gate : &up;
  if (++s->calls == 0) s->calls = 1; /* 0 means "no error" in the record */
  const gqmm__cu_moe_route_args ra = {.ids = a->expert_ids,
                                      .pairs = (int32_t)R,
                                      .top_k = (int32_t)k,
                                      .experts = (int32_t)E,
                                      .tok_max = {g0->tok, down.tok},
                                      .n_tiles = {g0->n_tiles, down.n_tiles},
                                      .unit_start2 = down_units,
                                      .units2 = down_descs,
                                      .plan = pg,
                                      .ids_safe = ids,
                                      .err = s->err_d,
                                      .call = (int32_t)s->calls,
                                      .sms = s->sms,
                                      .stream = stream};
  gqmm__cu_plan pd = pg;
  pd.unit_start = down_units;
  pd.units = down_descs;
  pd.rows_x = pg.rows_o;
  int err;
  const char *what = "event";
  cudaEvent_t *ev = s->ev;
  s->timed = 0;
#define STEP(call, name)                                                                          \
  do {                                                                                            \
    what = name;                                                                                  \
    if ((err = (call))) goto launch_failed;                                                       \
  } while (0)
  /* the phase events only when asked for (gqmm bench --breakdown): six
   * records per layer are not free on the device's timeline */
#define MARK(i) \
  if (timing) STEP(cudaEventRecord(ev[i], stream), "event")
  MARK(0);
  if (s->idx_rows != R || s->idx_k != k) { /* they depend on R and k only */
    STEP(gqmm__cu_moe_indices(tok_of, iota, (int32_t)R, (int32_t)k, stream), "pair indices");
    s->idx_rows = R, s->idx_k = k;
  }
  STEP(gqmm__cu_moe_route(&ra), "routing plan");
  MARK(1);
  if ((st = launch_gemm(ctx, &gate, &pg, E, "gate_up GEMM"))) return st;
  if (!fused && (st = launch_gemm(ctx, &up, &pg, E, "up GEMM"))) return st;
  MARK(2);
  if (!act_fused)
    STEP(gqmm__cu_moe_act((int)a->dtype, (int)a->act, gu, fused ? 2 * I : I, fused ? I : R * I, h,
                          R, I, stream),
         "activation");
  MARK(3);
  if ((st = launch_gemm(ctx, &down, &pd, E, "down GEMM"))) return st;
  MARK(4);
  /* h (and gu, before it in the scratch, when a GEMM wrote it) is dead once
   * down has run: the combine drops their L2 lines, as it does y's, so they
   * are never written back to memory during the next layer's weight streams */
  char *dead = act_fused ? h : gu;
  STEP(gqmm__cu_moe_combine((int)a->dtype, y, a->expert_weights, a->expert_ids, (int32_t)E, a->out,
                            T, k, H, dead, (int64_t)(s->buf + off[S_Y] - dead), stream),
       "combine");
  MARK(5);
#undef MARK
#undef STEP
  s->timed = timing;
  s->recorded = s->recorded || recording;
  return GQMM_OK;
launch_failed:
  return moe_fail(ctx, err, what);
}

int gqmm__cuda_moe_phases(gqmm_ctx *ctx, double phase_s[5]) {
  void **slot = gqmm__cuda_moe_slot(ctx);
  moe_state *s = slot ? *slot : NULL;
  if (!s || !s->timed)
    return gqmm__fail(ctx, GQMM_ERR_ARG,
                      "cuda: no moe_forward with phase timing has run on this context");
  cudaError_t e = cudaEventSynchronize(s->ev[NEV - 1]);
  for (int i = 0; !e && i < NEV - 1; i++) {
    float ms = 0;
    e = cudaEventElapsedTime(&ms, s->ev[i], s->ev[i + 1]);
    phase_s[i] = 1e-3 * ms;
  }
  return e ? moe_fail(ctx, (int)e, "event timing") : GQMM_OK;
}
