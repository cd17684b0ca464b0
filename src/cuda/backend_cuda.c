/*
 * backend_cuda.c - the CUDA backend behind gqmm__backend: argument
 * marshalling, the routing plan + kernel launch, tile configs, ceilings,
 * device memory. Kernels live in the .cu files (kernels.h).
 *
 * The front end hands over host index arrays; they are copied once per call
 * (int32, through a pinned buffer) and the plan of rows grouped by expert is
 * built on the GPU (route.cu). All work goes to the context's stream (the
 * legacy default stream unless gqmm_device_set_stream or gqmm_graph_begin
 * set another), which a graph may be recording (gqmm_graph_*).
 * Supports only tensors in device memory (no host staging): with CPU tensors
 * or without a usable GPU, supports_qmm says no and AUTO falls through.
 * Weights come in MLX's layout (the mma.sync kernel, qmm_mma.cu) or as a
 * gqmm_pack copy made here by cuda_pack (the wgmma kernel, qmm_wgmma.cu).
 */
#include "backend_cuda.h"
#include "kernels.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { GRID_SLOTS = 32 };

typedef struct {
  int sms;
  /* persistent grids already asked for, by kernel instance (asking also
   * sets the instance's shared-memory attribute; gqmm__cuda_grid) */
  struct {
    const void *fn;
    int grid;
  } grids[GRID_SLOTS];
  char name[96];
  int32_t *h_idx; /* pinned: x_index then w_index */
  size_t h_cap;   /* entries */
  int32_t *d_idx;
  size_t d_cap;
  int32_t *d_plan; /* count, row_start, fill, unit_start (E+1), rows_x, rows_o */
  size_t plan_cap;
  cudaEvent_t ev_op0, ev_k0, ev_k1, ev_staged;
  bool staged_pending, timed;
  void *moe; /* moe_cuda.c's state */
  cudaStream_t stream; /* NULL: the legacy default stream */
  bool own_stream;     /* created by graph_begin, destroyed with the state */
} cuda_state;

void **gqmm__cuda_moe_slot(gqmm_ctx *ctx) {
  return ctx->cuda_state ? &((cuda_state *)ctx->cuda_state)->moe : NULL;
}

gqmm__cu_stream gqmm__cuda_stream(gqmm_ctx *ctx) {
  return ctx->cuda_state ? ((cuda_state *)ctx->cuda_state)->stream : NULL;
}

/* Whether ctx's stream is recording a graph (or was, and a call broke it). */
static bool recording(const cuda_state *s) {
  enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  if (!s || !s->stream) return false; /* the legacy stream cannot record */
  if (cudaStreamIsCapturing(s->stream, &cs) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return cs != cudaStreamCaptureStatusNone;
}

/* Wait for the work queued on ctx's stream (the legacy one: all of it). */
static cudaError_t drain(const cuda_state *s) {
  return s->stream ? cudaStreamSynchronize(s->stream) : cudaDeviceSynchronize();
}

bool gqmm__cuda_recording(gqmm_ctx *ctx) {
  return recording(ctx->cuda_state);
}

int gqmm__cuda_refuse_recording(gqmm_ctx *ctx, const char *what) {
  if (!recording(ctx->cuda_state)) return GQMM_OK;
  return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                    "cuda: %s cannot be recorded in a graph (gqmm_graph_begin is recording on "
                    "this context; see gqmm.h for what may be)",
                    what);
}

int gqmm__cuda_grid(gqmm_ctx *ctx, int cfg, const gqmm__cu_qmm *k, int *grid) {
  cuda_state *s = ctx->cuda_state;
  if (!s) return (int)cudaErrorNoDevice;
  const void *fn = gqmm__cu_mma_instance(cfg, k);
  int slot = 0;
  while (slot < GRID_SLOTS && s->grids[slot].fn && s->grids[slot].fn != fn) slot++;
  if (fn && slot < GRID_SLOTS && s->grids[slot].fn) return *grid = s->grids[slot].grid, 0;
  /* first use of this instance (a full table just asks every time) */
  const int err = gqmm__cu_mma_grid(cfg, k, s->sms, grid);
  if (!err && fn && slot < GRID_SLOTS) s->grids[slot].fn = fn, s->grids[slot].grid = *grid;
  return err;
}

/* -1: not probed yet; 0: no GPU; 1: GPU. Cached per context. */
static int probe(gqmm_ctx *ctx) {
  if (ctx->cuda_state) return 1;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
    cudaGetLastError(); /* clear the sticky "no device" error */
    return 0;
  }
  cuda_state *s = calloc(1, sizeof *s);
  if (!s) return 0;
  struct cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess ||
      cudaEventCreate(&s->ev_op0) != cudaSuccess || cudaEventCreate(&s->ev_k0) != cudaSuccess ||
      cudaEventCreate(&s->ev_k1) != cudaSuccess ||
      cudaEventCreateWithFlags(&s->ev_staged, cudaEventDisableTiming) != cudaSuccess) {
    cudaGetLastError();
    free(s);
    return 0;
  }
  s->sms = p.multiProcessorCount;
  snprintf(s->name, sizeof s->name, "%.95s", p.name);
  ctx->cuda_state = s;
  return 1;
}

/* GQMM_OK if ctx has a usable GPU and no graph is recording on its stream;
 * else the error (what: the call, named if a recording refuses it). */
static int usable_unrecorded(gqmm_ctx *ctx, const char *what) {
  if (probe(ctx) != 1) return gqmm__fail(ctx, GQMM_ERR_BACKEND, "cuda: no usable GPU");
  return gqmm__cuda_refuse_recording(ctx, what);
}

static int cuda_fail(gqmm_ctx *ctx, int err, const char *what) {
  return gqmm__fail(ctx, GQMM_ERR_BACKEND, "cuda: %s: %s", what,
                    cudaGetErrorString((cudaError_t)err));
}

static bool cuda_supports(gqmm_ctx *ctx, const gqmm__qmm_args *a) {
  if (a->device != GQMM_DEVICE_CUDA || !gqmm__is_float(a->dtype)) return false;
  return probe(ctx) == 1;
}

static gqmm__cu_qmm marshal(const gqmm__qmm_args *a, const int32_t *d_idx) {
  gqmm__cu_qmm k = {0};
  k.dtype = (int)a->dtype; /* GQMM__CU_* mirror gqmm_dtype */
  k.bits = a->q.bits, k.group_size = a->q.group_size, k.transpose = a->transpose;
  k.M = a->M, k.N = a->N, k.K = a->K, k.batch = a->batch;
  k.x = a->x, k.w = a->w, k.scales = a->scales, k.biases = a->biases, k.out = a->out;
  k.x_index = d_idx, k.w_index = d_idx ? d_idx + a->batch : NULL;
  gqmm__cuda_set_packed(&k, a->packed);
  k.epilogue_act = 0;
  return k;
}

/* Config ids: 0..n-1 the tensor-core tile configs, n the generic kernel. */
static int generic_id(void) { return gqmm__cu_mma_config_count(); }

static int cuda_configs(gqmm_ctx *ctx, const gqmm__qmm_args *a, gqmm__tile_config *out, int max) {
  (void)ctx;
  gqmm__cu_qmm k = marshal(a, NULL);
  int n = 0;
  if (gqmm__cu_mma_eligible(&k)) {
    for (int i = 0; i < gqmm__cu_mma_config_count() && n < max; i++) {
      if (!gqmm__cu_mma_config_ok(i, &k)) continue;
      const gqmm__cu_mma_config *c = gqmm__cu_mma_config_get(i);
      memset(&out[n], 0, sizeof out[n]);
      out[n].id = i;
      snprintf(out[n].name, sizeof out[n].name, "mma_%s", c->name);
      out[n].tile_m = c->tok_max;
      out[n].tile_n = gqmm__cu_mma_tile_n(i);
      out[n].tile_k = 128;
      out[n].threads = c->warps * 32;
      out[n].stages = c->stages;
      out[n].split_k = 1;
      n++;
    }
  }
  if (n < max && !a->packed) {
    memset(&out[n], 0, sizeof out[n]);
    out[n].id = generic_id();
    snprintf(out[n].name, sizeof out[n].name, "generic");
    out[n].tile_m = out[n].tile_n = out[n].tile_k = 1;
    out[n].threads = 256;
    out[n].split_k = 1;
    n++;
  }
  return n;
}

static int config_named(const char *name) {
  for (int i = 0; i < gqmm__cu_mma_config_count(); i++)
    if (!strcmp(gqmm__cu_mma_config_get(i)->name, name)) return i;
  return -1;
}

/* Built-in choice from measurements (docs/perf-notes.md). Packed weights
 * ("Session 3"): the wgmma kernel with the ring two stages ahead led on all
 * three seed shapes. MLX layout ("Session 2", every config on the seed's
 * shapes): 4 warps of two m16 tiles win every 2/3/4-bit shape; for 4-bit
 * with N >= 1024 (gate_up, down) the 3-stage ring at 4 CTAs per SM (config
 * 3) is level with or ahead of the 4-stage ring at 3 CTAs (config 0),
 * everywhere else config 0 leads. 8-bit was not measured per config after
 * session 1 and keeps its H100 rule: 8 warps of one m16 tile (config 1), the
 * 64-register variant (config 2) for short rows (K <= 1024). */
/* The share of a config's CTA slots busy over the rounds of a balanced deal
 * of `experts` x N tiles units (one unit an expert up to 32 rows; experts is
 * an upper bound for gather). */
static double deal_fill(gqmm_ctx *ctx, int cfg, const gqmm__cu_qmm *k, int64_t experts) {
  int grid = 0;
  if (cfg < 0 || gqmm__cuda_grid(ctx, cfg, k, &grid) || grid <= 0) {
    cudaGetLastError();
    return 0;
  }
  const double units = (double)(experts > 0 ? experts : 1) * gqmm__cu_mma_n_tiles(cfg, k);
  return units / (ceil(units / grid) * grid);
}

static int heuristic(gqmm_ctx *ctx, const gqmm__cu_qmm *k, int64_t experts) {
  if (k->packed) { /* the wgmma kernel: 2 stages ahead led on every seed shape; */
    /* more than 32 rows per expert: 64-token units ("Session 5"), on one
     * warpgroup of two m64 tiles since session 8 (3-10% faster than two
     * warpgroups of one at 64 and 128 rows per expert), except 8-bit
     * weights, whose 32 registers of a stage's codes leave that config at
     * 242-252 registers: there two warpgroups stay 2-4% faster. 2-bit up to
     * 32 rows: the default shape at 4 CTAs an SM (128 registers, no spills;
     * its 13 KB stages fit four rings), 2-5% faster (2-bit is bound by the
     * issue of its instruction stream, not by bytes in flight), unless its
     * units fill fewer of its slots: gate, 6 N tiles, 768 units, 73% of two
     * rounds of 528 CTAs against 97% of 396, ran 57.3 against 47.8 us
     * ("Session 9") */
    const int64_t rows = k->batch * k->M / (experts > 0 ? experts : 1);
    const char *name = rows <= 32     ? "wg_m2_s4_a2"
                       : k->bits == 8 ? "wg2_m1_s4_t64"
                                      : "wg_m2_s4_t64";
    int c = config_named(name);
    if (c < 0 || !gqmm__cu_mma_config_ok(c, k)) return -1;
    /* a fill within 2 points of the default's counts as equal, where b4
     * measured 2-5% faster */
    const int c4 = config_named("wg_m2_s4_b4");
    if (rows <= 32 && k->bits == 2 && c4 >= 0 && gqmm__cu_mma_config_ok(c4, k) &&
        deal_fill(ctx, c4, k, experts) >= deal_fill(ctx, c, k, experts) - 0.02)
      c = c4;
    return c;
  }
  if (!gqmm__cu_mma_eligible(k)) return generic_id();
  if (k->bits == 8) return k->K <= 1024 ? 2 : 1;
  return k->bits == 4 && k->N >= 1024 ? 3 : 0;
}

bool gqmm__cuda_config_valid(int cfg, const gqmm__cu_qmm *k) {
  if (cfg == generic_id()) return !k->packed; /* the generic kernel reads MLX's layout */
  return cfg >= 0 && cfg < generic_id() && gqmm__cu_mma_config_ok(cfg, k);
}

static int grow(gqmm_ctx *ctx, void **p, size_t *cap, size_t need, bool pinned) {
  if (*cap >= need) return GQMM_OK;
  size_t n = need + need / 2 + 1024;
  if (*p) pinned ? cudaFreeHost(*p) : cudaFree(*p);
  *p = NULL;
  *cap = 0;
  cudaError_t e = pinned ? cudaMallocHost(p, n) : cudaMalloc(p, n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "cuda: cannot allocate %zu bytes of scratch", n);
  }
  *cap = n;
  return GQMM_OK;
}

static int run_config(gqmm_ctx *ctx, const gqmm__qmm_args *a, int cfg) {
  cuda_state *s = ctx->cuda_state;
  const int64_t B = a->batch, R = a->batch * a->M;
  if (B > INT32_MAX / 2 || R > INT32_MAX || a->w_batches > INT32_MAX - 1 ||
      a->x_batches * a->M > INT32_MAX)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "cuda: batch %lld x M %lld rows exceed the kernels' 32-bit row indices",
                      (long long)B, (long long)a->M);
  gqmm__cu_qmm probe_k = marshal(a, NULL);
  if (cfg < 0) cfg = heuristic(ctx, &probe_k, a->w_batches);
  if (a->packed && cfg < 0)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "w: packed weights need float16/bfloat16 x and 16-byte aligned rows of x");
  if (!gqmm__cuda_config_valid(cfg, &probe_k))
    return gqmm__fail(ctx, GQMM_ERR_ARG, "config: id %d is not valid for these arguments", cfg);
  /* Host indices are uploaded each call: a replay would reuse the recorded
   * ones (and the wait below cannot be recorded). */
  int st = gqmm__cuda_refuse_recording(ctx, "gather_qmm / quantized_matmul (host indices)");
  if (st) return st;
  /* The pinned buffer may still feed the previous call's copy. */
  if (s->staged_pending && cudaEventSynchronize(s->ev_staged) != cudaSuccess)
    return cuda_fail(ctx, (int)cudaGetLastError(), "waiting for the index upload");
  s->staged_pending = false;
  size_t hb = s->h_cap * sizeof(int32_t), db = s->d_cap * sizeof(int32_t);
  st = grow(ctx, (void **)&s->h_idx, &hb, (size_t)(2 * B) * sizeof(int32_t), true);
  s->h_cap = hb / sizeof(int32_t);
  if (!st) st = grow(ctx, (void **)&s->d_idx, &db, (size_t)(2 * B) * sizeof(int32_t), false);
  s->d_cap = db / sizeof(int32_t);
  if (st) return st;
  for (int64_t b = 0; b < B; b++) {
    s->h_idx[b] = (int32_t)a->x_index[b];
    s->h_idx[B + b] = (int32_t)a->w_index[b];
  }
  cudaEventRecord(s->ev_op0, s->stream);
  cudaError_t e = cudaMemcpyAsync(s->d_idx, s->h_idx, (size_t)(2 * B) * sizeof(int32_t),
                                  cudaMemcpyHostToDevice, s->stream);
  if (e != cudaSuccess) return cuda_fail(ctx, (int)e, "index upload");
  cudaEventRecord(s->ev_staged, s->stream);
  s->staged_pending = true;
  gqmm__cu_qmm k = marshal(a, s->d_idx);
  int err;
  if (cfg == generic_id()) {
    cudaEventRecord(s->ev_k0, s->stream);
    err = gqmm__cu_generic_run(&k, s->stream);
  } else {
    const int64_t E = a->w_batches;
    const int tok = gqmm__cu_mma_tok_max(cfg), n_tiles = gqmm__cu_mma_n_tiles(cfg, &k);
    const int64_t used = B < E ? B : E;
    const int64_t max_units = gqmm__cu_units_bound(R, used, tok, n_tiles);
    /* count, row_start, fill, unit_start, rows_x, rows_o; the unit
     * descriptors from a 16-byte aligned int offset */
    const int64_t head = (4 * E + 1 + 2 * R + 3) / 4 * 4;
    size_t pb = s->plan_cap * sizeof(int32_t);
    if ((st = grow(ctx, (void **)&s->d_plan, &pb, (size_t)(head + 4 * max_units) * sizeof(int32_t),
                   false)))
      return st;
    s->plan_cap = pb / sizeof(int32_t);
    gqmm__cu_plan p;
    p.count = s->d_plan, p.row_start = p.count + E, p.fill = p.row_start + E;
    p.unit_start = p.fill + E, p.rows_x = p.unit_start + E + 1, p.rows_o = p.rows_x + R;
    p.units = s->d_plan + head;
    int grid = 0;
    err = gqmm__cuda_grid(ctx, cfg, &k, &grid);
    if (err) return cuda_fail(ctx, err, "occupancy query");
    /* No more CTAs than units can exist. */
    if (grid > max_units) grid = (int)max_units;
    err = gqmm__cu_route(k.x_index, k.w_index, (int32_t)B, (int32_t)a->M, (int32_t)E, tok, n_tiles,
                         p, s->sms, s->stream);
    if (err) return cuda_fail(ctx, err, "routing plan launch");
    cudaEventRecord(s->ev_k0, s->stream);
    err = gqmm__cu_mma_run(cfg, &k, &p, (int)E, grid, s->stream);
  }
  cudaEventRecord(s->ev_k1, s->stream);
  s->timed = true;
  if (err) return cuda_fail(ctx, err, "kernel launch");
  return GQMM_OK;
}

static int cuda_qmm_config(gqmm_ctx *ctx, const gqmm__qmm_args *a, int config_id) {
  if (probe(ctx) != 1) return gqmm__fail(ctx, GQMM_ERR_BACKEND, "cuda: no usable GPU");
  return run_config(ctx, a, config_id);
}

static int cuda_qmm(gqmm_ctx *ctx, const gqmm__qmm_args *a) {
  return cuda_qmm_config(ctx, a, gqmm__choose_config(ctx, &gqmm__cuda_backend, a));
}

/* The config a gathered GEMM with these args runs with: forced or tuned
 * (gqmm__choose_config), else the heuristic. moe_cuda.c uses it for the
 * layer's GEMMs, so `gqmm bench` runs the tuned choice too. */
int gqmm__cuda_pick_config(gqmm_ctx *ctx, const gqmm__qmm_args *a) {
  const int cfg = gqmm__choose_config(ctx, &gqmm__cuda_backend, a);
  if (cfg >= 0) return cfg;
  const gqmm__cu_qmm k = marshal(a, NULL);
  probe(ctx); /* deal_fill asks the context's grids (none without a GPU) */
  return heuristic(ctx, &k, a->w_batches);
}

static int cuda_ceilings(gqmm_ctx *ctx, gqmm__ceilings *out) {
  int st = usable_unrecorded(ctx, "the ceiling measurement");
  if (st) return st;
  cuda_state *s = ctx->cuda_state;
  memset(out, 0, sizeof *out);
  snprintf(out->device_name, sizeof out->device_name, "%.95s", s->name);
  snprintf(out->compute_what, sizeof out->compute_what, "mma.sync m16n8k16 bf16");
  int err = gqmm__cu_measure_ceilings(&out->copy_GBps, &out->read_GBps, &out->compute_GMACps);
  return err ? cuda_fail(ctx, err, "ceiling measurement") : GQMM_OK;
}

static int cuda_sync(gqmm_ctx *ctx) {
  int st = usable_unrecorded(ctx, "gqmm_device_sync");
  if (st) return st;
  cuda_state *s = ctx->cuda_state;
  cudaError_t e = drain(s);
  return e ? cuda_fail(ctx, (int)e, "synchronize") : gqmm__cuda_moe_take_error(ctx);
}

static int cuda_last_time(gqmm_ctx *ctx, double *kernel_us, double *op_us) {
  cuda_state *s = ctx->cuda_state;
  if (!s || !s->timed) return gqmm__fail(ctx, GQMM_ERR_ARG, "cuda: no op has run on this context");
  float k = 0, o = 0;
  cudaError_t e = cudaEventSynchronize(s->ev_k1);
  if (!e) e = cudaEventElapsedTime(&k, s->ev_k0, s->ev_k1);
  if (!e) e = cudaEventElapsedTime(&o, s->ev_op0, s->ev_k1);
  if (e) return cuda_fail(ctx, (int)e, "event timing");
  *kernel_us = 1e3 * k;
  *op_us = 1e3 * o;
  return GQMM_OK;
}

static int cuda_mem_alloc(gqmm_ctx *ctx, size_t bytes, void **out) {
  int st = usable_unrecorded(ctx, "gqmm_device_alloc");
  if (st) return st;
  cudaError_t e = cudaMalloc(out, bytes ? bytes : 1);
  if (e) {
    cudaGetLastError();
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "cuda: cannot allocate %zu bytes", bytes);
  }
  return GQMM_OK;
}

static void cuda_mem_free(gqmm_ctx *ctx, void *p) {
  (void)ctx;
  if (p) cudaFree(p);
}

static int cuda_mem_copy(gqmm_ctx *ctx, void *dst, const void *src, size_t bytes,
                         gqmm__copy_dir dir) {
  int st = usable_unrecorded(ctx, "gqmm_device_copy");
  if (st) return st;
  cuda_state *s = ctx->cuda_state;
  const enum cudaMemcpyKind kinds[3] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                        cudaMemcpyDeviceToDevice};
  /* on ctx's stream, after its queued work, and synchronous like cudaMemcpy */
  cudaError_t e = s->stream ? cudaMemcpyAsync(dst, src, bytes, kinds[dir], s->stream)
                            : cudaMemcpy(dst, src, bytes, kinds[dir]);
  if (!e && s->stream) e = cudaStreamSynchronize(s->stream);
  return e ? cuda_fail(ctx, (int)e, "copy") : GQMM_OK;
}

/* ---- the stream and graphs ------------------------------------------------- */

static int cuda_set_stream(gqmm_ctx *ctx, void *stream) {
  int st = usable_unrecorded(ctx, "gqmm_device_set_stream");
  if (st) return st;
  cuda_state *s = ctx->cuda_state;
  /* the old stream's work first, so ctx's calls stay in order */
  cudaError_t e = drain(s);
  if (e) return cuda_fail(ctx, (int)e, "waiting for the previous stream");
  if (s->own_stream) cudaStreamDestroy(s->stream);
  s->stream = (cudaStream_t)stream;
  s->own_stream = false;
  return GQMM_OK;
}

static int cuda_graph_begin(gqmm_ctx *ctx) {
  if (probe(ctx) != 1) return gqmm__fail(ctx, GQMM_ERR_BACKEND, "cuda: no usable GPU");
  cuda_state *s = ctx->cuda_state;
  if (recording(s))
    return gqmm__fail(ctx, GQMM_ERR_ARG, "gqmm_graph_begin: this context is already recording");
  if (!s->stream) { /* the legacy stream cannot record: a stream of ctx's own */
    cudaError_t e = drain(s);
    if (!e) e = cudaStreamCreate(&s->stream);
    if (e) return cuda_fail(ctx, (int)e, "creating the context's stream");
    s->own_stream = true;
  }
  /* thread-local: other threads' work does not break the recording */
  cudaError_t e = cudaStreamBeginCapture(s->stream, cudaStreamCaptureModeThreadLocal);
  return e ? cuda_fail(ctx, (int)e, "gqmm_graph_begin") : GQMM_OK;
}

static int cuda_graph_end(gqmm_ctx *ctx, void **exec) {
  cuda_state *s = ctx->cuda_state;
  if (!recording(s))
    return gqmm__fail(ctx, GQMM_ERR_ARG,
                      "gqmm_graph_end: this context is not recording "
                      "(gqmm_graph_begin)");
  cudaGraph_t g = NULL;
  cudaGraphExec_t x = NULL;
  cudaError_t e = cudaStreamEndCapture(s->stream, &g);
  if (e) {
    cudaGetLastError();
    if (g) cudaGraphDestroy(g);
    return gqmm__fail(ctx, GQMM_ERR_BACKEND,
                      "gqmm_graph_end: the recording broke (%s): a call during it failed or "
                      "queued work CUDA cannot record",
                      cudaGetErrorString(e));
  }
  e = cudaGraphInstantiate(&x, g, 0);
  cudaGraphDestroy(g);
  if (e) return cuda_fail(ctx, (int)e, "gqmm_graph_end: instantiating the graph");
  *exec = x;
  return GQMM_OK;
}

static int cuda_graph_launch(gqmm_ctx *ctx, void *exec) {
  if (probe(ctx) != 1) return gqmm__fail(ctx, GQMM_ERR_BACKEND, "cuda: no usable GPU");
  cuda_state *s = ctx->cuda_state;
  cudaError_t e = cudaGraphLaunch((cudaGraphExec_t)exec, s->stream);
  return e ? cuda_fail(ctx, (int)e, "gqmm_graph_launch") : GQMM_OK;
}

static void cuda_graph_free(void *exec) {
  if (exec) cudaGraphExecDestroy((cudaGraphExec_t)exec);
}

static void cuda_release(gqmm_ctx *ctx) {
  cuda_state *s = ctx->cuda_state;
  if (!s) return;
  if (recording(s)) { /* a recording never ended: drop it */
    cudaGraph_t g = NULL;
    if (cudaStreamEndCapture(s->stream, &g) == cudaSuccess && g) cudaGraphDestroy(g);
    cudaGetLastError();
  }
  cudaDeviceSynchronize();
  if (s->own_stream) cudaStreamDestroy(s->stream);
  gqmm__cuda_moe_release(s->moe);
  cudaFreeHost(s->h_idx);
  cudaFree(s->d_idx);
  cudaFree(s->d_plan);
  cudaEventDestroy(s->ev_op0);
  cudaEventDestroy(s->ev_k0);
  cudaEventDestroy(s->ev_k1);
  cudaEventDestroy(s->ev_staged);
  free(s);
  ctx->cuda_state = NULL;
}

static int cuda_pack(gqmm_ctx *ctx, struct gqmm_packed *p, const uint32_t *w, const void *scales,
                     const void *biases, int64_t E, int64_t N) {
  int st = usable_unrecorded(ctx, "gqmm_pack");
  if (st) return st;
  const int64_t bytes = gqmm__cu_pack_bytes(E, N, p->K, p->q.bits, p->q.group_size, p->glu);
  void *d = NULL;
  st = cuda_mem_alloc(ctx, (size_t)bytes, &d);
  if (st) return st;
  int lin = !ctx->pack_plain;
  int err = gqmm__cu_pack(w, scales, biases, E, N, p->K, p->q.bits, p->q.group_size, p->glu,
                          (int)p->dtype, &lin, d, gqmm__cuda_stream(ctx));
  if (err) {
    cudaFree(d);
    return cuda_fail(ctx, err, "pack kernel");
  }
  p->data = d;
  p->nbytes = bytes;
  p->scaled = lin;
  return GQMM_OK;
}

/* The tuning cache's device key: the card, its architecture and the driver,
 * so a cache carried to another GPU or driver is not trusted. */
static void cuda_device_key(gqmm_ctx *ctx, char *buf, size_t len) {
  struct cudaDeviceProp p;
  int driver = 0;
  if (probe(ctx) != 1 || cudaGetDeviceProperties(&p, 0) != cudaSuccess ||
      cudaDriverGetVersion(&driver) != cudaSuccess) {
    cudaGetLastError();
    snprintf(buf, len, "cuda (no device)");
    return;
  }
  snprintf(buf, len, "%.96s sm_%d%d driver %d", p.name, p.major, p.minor, driver);
}

const gqmm__backend gqmm__cuda_backend = {
    .name = "cuda",
    .kind = GQMM_BACKEND_CUDA,
    .supports_qmm = cuda_supports,
    .qmm = cuda_qmm,
    .moe_forward = gqmm__cuda_moe_forward,
    .configs = cuda_configs,
    .qmm_config = cuda_qmm_config,
    .ceilings = cuda_ceilings,
    .sync = cuda_sync,
    .mem_alloc = cuda_mem_alloc,
    .mem_free = cuda_mem_free,
    .mem_copy = cuda_mem_copy,
    .release = cuda_release,
    .last_time = cuda_last_time,
    .moe_phases = gqmm__cuda_moe_phases,
    .device_key = cuda_device_key,
    .pack = cuda_pack,
    .set_stream = cuda_set_stream,
    .graph_begin = cuda_graph_begin,
    .graph_end = cuda_graph_end,
    .graph_launch = cuda_graph_launch,
    .graph_free = cuda_graph_free,
};
