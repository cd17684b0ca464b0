/*
 * cmd_bench.c - `gqmm bench`: the MoE expert layers of one denoising step.
 *
 * Default: the seed's model (diffusiongemma-26b-a4b: 30 layers, E=128, top-8,
 * hidden 2816, inter 704, 4-bit group 64, bf16) on a 256-token canvas, on the
 * best backend, with random weights in the real packed format. Each figure is
 * printed beside the same run's measured ceiling (the backend's `ceilings`
 * hook); where a backend has none the table says so instead of inventing one.
 *
 * A step runs every MoE layer once. When the model does not fit in memory
 * (or --max-layers caps it), the distinct layers that fit are run and the
 * step time is scaled by layers / layers_run, and the output says so.
 * --levers sweeps canvases per step (B canvases share one pass over the
 * weights) and expert bits; --breakdown splits a layer into its phases.
 * On a GPU each step is timed two ways, alternated (--launch picks one):
 * its layer calls enqueued by the host one by one ("host"), and recorded
 * once as a CUDA graph (gqmm_graph_begin) whose replays are timed
 * ("graph"): the step as a model that replays graphs runs it.
 */
#include "../src/moe/moe.h"
#include "cli.h"

#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

extern char **environ;

#define NSETS 3 /* input sets rotated between calls */

/* How a step's layer calls reach the device: enqueued by the host call by
 * call, or replayed from a graph recorded once (gqmm_graph_*, GPU only). */
enum { LAUNCH_HOST = 1, LAUNCH_GRAPH = 2 };
static const char *launch_name(int l) {
  return l == LAUNCH_GRAPH ? "graph" : "host";
}

typedef struct {
  gqmm_moe_model m;         /* the shape (from the table or the command line) */
  int canvases, tokens;     /* B, tokens per canvas */
  int reps, max_layers;     /* -1: chosen from the backend */
  int levers, breakdown;
  int no_pack;              /* 1: the GPU reads the MLX layout (no gqmm_pack copies) */
  int no_glu;               /* 1: gate_up packed by gqmm_pack (activation not in its epilogue) */
  int launch;               /* LAUNCH_* bits: how steps are launched (0: by the backend) */
  const char *json, *plot;
  gqmm_backend_kind kind;
} bench_opts;

/* The backend a run lands on and where its tensors live. */
typedef struct {
  gqmm_ctx *ctx;
  const gqmm__backend *be;
  gqmm_device dev;
  gqmm__ceilings ceil;
  int have_ceil;
  int pack; /* layers get gqmm_pack copies (a device backend that packs) */
  int glu;  /* gate_up's copy is gqmm_pack_glu's */
} bench_env;

/* One layer's weights (fused gate_up, down) in the device's memory. */
typedef struct {
  void *buf[6]; /* gu_w, gu_s, gu_b, d_w, d_s, d_b */
  gqmm_tensor t[6];
  gqmm_packed *pk[2]; /* gqmm_pack_glu of gate_up and gqmm_pack of down, or NULL */
  gqmm_moe_weights w;
} bench_layer;

/* One input set: x, ids, expert weights, out; ids also kept on the host. */
typedef struct {
  void *x, *ids, *ew, *out;
  int32_t *ids_host; /* the routing, for timing the GEMMs alone */
  gqmm_tensor tx, tids, tew, tout;
  int64_t used_experts;
} bench_inputs;

typedef struct {
  int canvases, bits, layers_run;
  double step_med_s, step_min_s, weight_bytes, phase_s[5];
  int have_phases; /* 1: the composed layer's phases; 2: its GEMMs timed alone */
  int launch;      /* LAUNCH_HOST or LAUNCH_GRAPH */
} bench_result;

/* ---- memory on the run's device ------------------------------------------ */

static void *dev_alloc(bench_env *env, size_t n) {
  if (env->dev == GQMM_DEVICE_CPU) return malloc(n ? n : 1);
  void *p = NULL;
  return env->be->mem_alloc(env->ctx, n ? n : 1, &p) ? NULL : p;
}

static void dev_free(bench_env *env, void *p) {
  if (!p) return;
  if (env->dev == GQMM_DEVICE_CPU) free(p);
  else env->be->mem_free(env->ctx, p);
}

static int dev_upload(bench_env *env, void *dst, const void *src, size_t n) {
  if (env->dev == GQMM_DEVICE_CPU) {
    memcpy(dst, src, n);
    return 0;
  }
  return env->be->mem_copy(env->ctx, dst, src, n, GQMM__COPY_H2D);
}

/* Wait for the run's device; its status (a deferred error of the work). */
static int dev_sync(bench_env *env) {
  return env->be->sync ? env->be->sync(env->ctx) : GQMM_OK;
}

/* Memory the host can give without swapping (MemAvailable), in bytes. */
static double host_available(void) {
  FILE *f = fopen("/proc/meminfo", "r");
  char line[256];
  double kb = 0;
  while (f && fgets(line, sizeof line, f))
    if (sscanf(line, "MemAvailable: %lf kB", &kb) == 1) break;
  if (f) fclose(f);
  return kb > 0 ? kb * 1024.0 : 4e9;
}

/* ---- random data in the real format ------------------------------------- */

static uint64_t rng_next(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static float rng_normal(uint64_t *s) {
  double u1 = ((double)(rng_next(s) >> 11) + 1.0) / 9007199254740993.0;
  double u2 = (double)(rng_next(s) >> 11) / 9007199254740992.0;
  return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Random packed q-values, and scales/biases that keep outputs O(1):
 * w = s*q + b centred on zero with |w| ~ 1/sqrt(K). */
static void fill_quant(uint64_t *s, uint32_t *w, size_t words, uint16_t *sc, uint16_t *bi,
                       size_t groups, int bits, int64_t K) {
  for (size_t i = 0; i < words; i++) w[i] = (uint32_t)(rng_next(s) >> 17);
  const float half = (float)((1 << bits) - 1) / 2.0f, amp = 1.7f / sqrtf((float)K);
  for (size_t g = 0; g < groups; g++) {
    float scale = amp / half * (0.75f + 0.5f * (float)(rng_next(s) >> 40) / 16777216.0f);
    sc[g] = gqmm_f32_to_bf16(scale);
    bi[g] = gqmm_f32_to_bf16(-scale * half);
  }
}

static double layer_bytes(const gqmm_moe_model *m, gqmm_quant q, int64_t experts) {
  const double weights = 3.0 * (double)m->hidden * (double)m->inter;
  return (double)experts * (weights * q.bits / 8.0 + weights / q.group_size * 2 * 2);
}

static void layer_free(bench_env *env, bench_layer *L) {
  for (int i = 0; i < 6; i++) dev_free(env, L->buf[i]);
  for (int i = 0; i < 2; i++) gqmm_packed_free(env->ctx, L->pk[i]);
  memset(L, 0, sizeof *L);
}

/* Make one layer; `stage` is a host buffer of a layer's largest part. */
static int layer_make(bench_env *env, const gqmm_moe_model *m, gqmm_quant q, uint64_t *s,
                      void *stage, bench_layer *L) {
  const int64_t E = m->experts, H = m->hidden, I = m->inter;
  const int64_t shapes[6][3] = {{E, 2 * I, H * q.bits / 32}, {E, 2 * I, H / q.group_size},
                                {E, 2 * I, H / q.group_size}, {E, H, I * q.bits / 32},
                                {E, H, I / q.group_size},     {E, H, I / q.group_size}};
  memset(L, 0, sizeof *L);
  for (int part = 0; part < 2; part++) { /* gate_up, then down */
    const int64_t *ws = shapes[3 * part], *ss = shapes[3 * part + 1];
    const size_t words = (size_t)(ws[0] * ws[1] * ws[2]), groups = (size_t)(ss[0] * ss[1] * ss[2]);
    uint32_t *w = stage;
    uint16_t *sc = (uint16_t *)(w + words), *bi = sc + groups;
    fill_quant(s, w, words, sc, bi, groups, q.bits, part ? I : H);
    const size_t sizes[3] = {words * 4, groups * 2, groups * 2};
    const void *src[3] = {w, sc, bi};
    for (int i = 0; i < 3; i++) {
      const int k = 3 * part + i;
      L->buf[k] = dev_alloc(env, sizes[i]);
      if (!L->buf[k] || dev_upload(env, L->buf[k], src[i], sizes[i])) {
        layer_free(env, L);
        return -1;
      }
      L->t[k] = gqmm_tensor_make(L->buf[k], i ? GQMM_BF16 : GQMM_U32, 3, shapes[k]);
      L->t[k].device = env->dev;
    }
  }
  L->w = (gqmm_moe_weights){.q = q, .gate_up = &L->t[0], .gate_up_scales = &L->t[1],
                            .gate_up_biases = &L->t[2], .down = &L->t[3],
                            .down_scales = &L->t[4], .down_biases = &L->t[5]};
  /* The load-time step a user takes: the kernels' packed layout (the GPU's:
   * gate_up with its gate and up rows paired, the activation then in its
   * epilogue; the CPU's: panels of 64 rows, cpu_pack.c); formats without
   * one (GPU: 5/6-bit; CPU: all but 2- and 4-bit) stay unpacked. */
  for (int part = 0; env->pack && part < 2; part++) {
    const gqmm_tensor *t = &L->t[3 * part];
    const int st = (part || !env->glu ? gqmm_pack : gqmm_pack_glu)(env->ctx, &t[0], &t[1], &t[2],
                                                                    q, &L->pk[part]);
    if (st && st != GQMM_ERR_UNSUPPORTED) {
      layer_free(env, L);
      return -1;
    }
  }
  L->w.gate_up_packed = L->pk[0], L->w.down_packed = L->pk[1];
  return 0;
}

/* Router logits with a per-expert bias (popular and rare experts, as real
 * routers have), then the model's top-k: random routing, not uniform. */
static int inputs_make(bench_env *env, const gqmm_moe_model *m, int64_t tokens, uint64_t *s,
                       const float *bias, bench_inputs *in) {
  const int64_t E = m->experts, k = m->top_k, H = m->hidden;
  memset(in, 0, sizeof *in);
  float *logits = malloc((size_t)(tokens * E) * sizeof(float));
  int32_t *ids = malloc((size_t)(tokens * k) * sizeof(int32_t));
  uint16_t *ew = malloc((size_t)(tokens * k) * 2), *x = malloc((size_t)(tokens * H) * 2);
  int64_t *count = calloc((size_t)E, sizeof(int64_t));
  int st = -1;
  if (!logits || !ids || !ew || !x || !count) goto done;
  for (int64_t i = 0; i < tokens * E; i++) logits[i] = rng_normal(s) + bias[i % E];
  for (int64_t i = 0; i < tokens * H; i++) x[i] = gqmm_f32_to_bf16(rng_normal(s));
  const int64_t ls[2] = {tokens, E}, ps[2] = {tokens, k}, xs[2] = {tokens, H};
  gqmm_tensor tl = gqmm_tensor_make(logits, GQMM_F32, 2, ls);
  gqmm_tensor ti = gqmm_tensor_make(ids, GQMM_I32, 2, ps);
  gqmm_tensor tw = gqmm_tensor_make(malloc((size_t)(tokens * k) * sizeof(float)), GQMM_F32, 2, ps);
  if (!tw.data || gqmm_router_topk(env->ctx, &tl, (int)k, m->router, &ti, &tw)) {
    free(tw.data);
    goto done;
  }
  for (int64_t i = 0; i < tokens * k; i++) {
    ew[i] = gqmm_f32_to_bf16(((float *)tw.data)[i]);
    count[ids[i]]++;
  }
  free(tw.data);
  for (int64_t e = 0; e < E; e++) in->used_experts += count[e] > 0;
  in->x = dev_alloc(env, (size_t)(tokens * H) * 2);
  in->ids = dev_alloc(env, (size_t)(tokens * k) * 4);
  in->ew = dev_alloc(env, (size_t)(tokens * k) * 2);
  in->out = dev_alloc(env, (size_t)(tokens * H) * 2);
  if (!in->x || !in->ids || !in->ew || !in->out || dev_upload(env, in->x, x, (size_t)(tokens * H) * 2) ||
      dev_upload(env, in->ids, ids, (size_t)(tokens * k) * 4) ||
      dev_upload(env, in->ew, ew, (size_t)(tokens * k) * 2))
    goto done;
  in->ids_host = ids;
  ids = NULL;
  in->tx = gqmm_tensor_make(in->x, GQMM_BF16, 2, xs);
  in->tids = gqmm_tensor_make(in->ids, GQMM_I32, 2, ps);
  in->tew = gqmm_tensor_make(in->ew, GQMM_BF16, 2, ps);
  in->tout = gqmm_tensor_make(in->out, GQMM_BF16, 2, xs);
  in->tx.device = in->tids.device = in->tew.device = in->tout.device = env->dev;
  st = 0;
done:
  free(logits), free(ids), free(ew), free(x), free(count);
  return st;
}

static void inputs_free(bench_env *env, bench_inputs *in) {
  dev_free(env, in->x), dev_free(env, in->ids), dev_free(env, in->ew), dev_free(env, in->out);
  free(in->ids_host);
  memset(in, 0, sizeof *in);
}

/* ---- one measurement ------------------------------------------------------ */


static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Poison out (outside the timed region) so an unwritten row shows as NaN. */
static int poison(bench_env *env, bench_inputs *in, uint16_t *nan_row, int64_t n) {
  for (int64_t i = 0; i < n; i++) nan_row[i] = 0x7fc0;
  return dev_upload(env, in->out, nan_row, (size_t)n * 2);
}

static int outputs_written(bench_env *env, bench_inputs *in, uint16_t *host, int64_t n) {
  if (env->dev == GQMM_DEVICE_CPU) memcpy(host, in->out, (size_t)n * 2);
  else if (env->be->mem_copy(env->ctx, host, in->out, (size_t)n * 2, GQMM__COPY_D2H)) return 0;
  for (int64_t i = 0; i < n; i++)
    if (isnan(gqmm_bf16_to_f32(host[i]))) return 0;
  return 1;
}

/*
 * For a backend that runs the layer fused (no phases): the routing plan and
 * the gate_up and down gathered GEMMs alone through the backend's qmm, same
 * rows, median of reps, so the breakdown still shows what is outside them.
 */
static int time_gemms(bench_env *env, const bench_opts *o, gqmm_quant q, const bench_layer *L,
                      const bench_inputs *in, int64_t tokens, bench_result *res) {
  const gqmm_moe_model *m = &o->m;
  const int64_t R = tokens * m->top_k, H = m->hidden, I = m->inter;
  gqmm__moe_plan plan;
  double t0 = gqmm__now_s();
  if (gqmm__moe_plan_build(env->ctx, in->ids_host, tokens, m->top_k, m->experts, &plan)) return -1;
  const double plan_s = gqmm__now_s() - t0;
  int64_t *tok = malloc((size_t)R * sizeof(int64_t)), *row = malloc((size_t)R * sizeof(int64_t));
  void *gu = dev_alloc(env, (size_t)(R * 2 * I) * 2), *y = dev_alloc(env, (size_t)(R * H) * 2);
  double *t[2] = {calloc((size_t)o->reps, sizeof(double)), calloc((size_t)o->reps, sizeof(double))};
  int st = tok && row && gu && y && t[0] && t[1] ? 0 : -1;
  for (int64_t r = 0; !st && r < R; r++) tok[r] = plan.row_pair[r] / m->top_k, row[r] = r;
  /* down reads gu's first R*I values as its input h: any finite data times the same */
  gqmm__qmm_args g[2] = {
      {.dtype = GQMM_BF16, .q = q, .transpose = 1, .device = env->dev, .M = 1, .N = 2 * I, .K = H,
       .batch = R, .x_batches = tokens, .w_batches = m->experts, .x = in->x, .w = L->buf[0],
       .scales = L->buf[1], .biases = L->buf[2], .out = gu, .x_index = tok,
       .w_index = plan.row_expert, .w_sorted = true},
      {.dtype = GQMM_BF16, .q = q, .transpose = 1, .device = env->dev, .M = 1, .N = H, .K = I,
       .batch = R, .x_batches = R, .w_batches = m->experts, .x = gu, .w = L->buf[3],
       .scales = L->buf[4], .biases = L->buf[5], .out = y, .x_index = row,
       .w_index = plan.row_expert, .w_sorted = true}};
  for (int r = 0; !st && r < o->reps; r++)
    for (int i = 0; !st && i < 2; i++) {
      dev_sync(env);
      const double t1 = gqmm__now_s();
      st = env->be->qmm(env->ctx, &g[i]);
      dev_sync(env);
      t[i][r] = gqmm__now_s() - t1;
    }
  if (!st) {
    qsort(t[0], (size_t)o->reps, sizeof(double), cmp_double);
    qsort(t[1], (size_t)o->reps, sizeof(double), cmp_double);
    res->phase_s[0] = plan_s;
    res->phase_s[1] = t[0][o->reps / 2];
    res->phase_s[3] = t[1][o->reps / 2];
    res->have_phases = 2;
  }
  free(tok), free(row), free(t[0]), free(t[1]);
  dev_free(env, gu), dev_free(env, y);
  gqmm__moe_plan_free(&plan);
  return st;
}

/* Record the step's nl layer calls (layer l on input set l % NSETS) as one
 * graph in *g (--launch graph). */
static int record_step(bench_env *env, bench_layer *layers, int nl, bench_inputs *in,
                       gqmm_activation act, gqmm_graph **g) {
  int st = gqmm_graph_begin(env->ctx);
  for (int l = 0; l < nl && !st; l++) {
    bench_inputs *x = &in[l % NSETS];
    st = gqmm_moe_forward(env->ctx, &layers[l].w, &x->tx, &x->tids, &x->tew, act, &x->tout);
  }
  if (!st) return gqmm_graph_end(env->ctx, g);
  char why[256]; /* end the broken recording, keeping the first error */
  snprintf(why, sizeof why, "%s", gqmm_last_error(env->ctx));
  gqmm_graph *dead = NULL;
  if (gqmm_graph_end(env->ctx, &dead) == GQMM_OK) gqmm_graph_free(dead);
  fprintf(stderr, "gqmm bench: recording the step: %s\n", why);
  return st;
}

/* Time `reps` steps of nl distinct layers with B canvases, in each launch
 * mode of o->launch (one result each, in res[]; *nres of them), the modes
 * alternated step by step so they share the machine's state; median per
 * step, scaled to the model's layer count. A step the host enqueues runs
 * layer l on input set (r nl + l) % NSETS, a replayed one on l % NSETS. */
static int measure(bench_env *env, const bench_opts *o, gqmm_quant q, int canvases,
                   bench_layer *layers, int nl, bench_result *res, int *nres) {
  const gqmm_moe_model *m = &o->m;
  const int64_t tokens = (int64_t)o->tokens * canvases, n_out = tokens * m->hidden;
  int modes[2], nm = 0;
  if (o->launch & LAUNCH_HOST) modes[nm++] = LAUNCH_HOST;
  if (o->launch & LAUNCH_GRAPH) modes[nm++] = LAUNCH_GRAPH;
  *nres = 0;
  bench_inputs in[NSETS];
  memset(in, 0, sizeof in);
  uint64_t seed = 0x9E3779B97F4A7C15ull ^ (uint64_t)(canvases * 131 + q.bits);
  float *bias = malloc((size_t)m->experts * sizeof(float));
  uint16_t *host = malloc((size_t)n_out * 2);
  double *times = calloc((size_t)(2 * o->reps), sizeof(double));
  int st = -1, noted = 0;
  gqmm_graph *graph = NULL; /* the recorded step (LAUNCH_GRAPH) */
  if (!bias || !host || !times) goto done;
  for (int64_t e = 0; e < m->experts; e++) bias[e] = 0.25f * rng_normal(&seed);
  for (int i = 0; i < NSETS; i++)
    if (inputs_make(env, m, tokens, &seed, bias, &in[i])) {
      fprintf(stderr, "gqmm bench: cannot make inputs: %s\n", gqmm_last_error(env->ctx));
      goto done;
    }
  double used = 0;
  for (int i = 0; i < NSETS; i++) used += (double)in[i].used_experts / NSETS;
  for (int mi = 0; mi < nm; mi++) {
    memset(&res[mi], 0, sizeof res[mi]);
    res[mi].canvases = canvases, res[mi].bits = q.bits, res[mi].layers_run = nl;
    res[mi].launch = modes[mi];
    res[mi].weight_bytes = layer_bytes(m, q, 1) * used * m->layers;
  }
  const gqmm_activation act = m->act;
  /* warm-up: first-touch, lazy backend state, the scratch a recording needs */
  if (o->reps > 1 || (o->launch & LAUNCH_GRAPH)) {
    if (gqmm_moe_forward(env->ctx, &layers[0].w, &in[0].tx, &in[0].tids, &in[0].tew, act,
                         &in[0].tout))
      goto fail;
  }
  if ((o->launch & LAUNCH_GRAPH) && record_step(env, layers, nl, in, act, &graph)) goto done;
  double last_note = gqmm__now_s(), t_start = last_note, phase_sum[5] = {0};
  int calls = 0;
  for (int r = 0; r < o->reps; r++)
    for (int mi = 0; mi < nm; mi++) {
      const bool replay = modes[mi] == LAUNCH_GRAPH;
      int written[NSETS] = {0}; /* sets this step writes */
      for (int i = 0; i < NSETS; i++)
        if (poison(env, &in[i], host, n_out)) goto fail;
      dev_sync(env);
      const double t0 = gqmm__now_s();
      if (replay && gqmm_graph_launch(env->ctx, graph)) goto fail;
      for (int l = 0; l < nl; l++) {
        const int set = replay ? l % NSETS : (r * nl + l) % NSETS;
        written[set] = 1;
        if (replay) continue;
        bench_inputs *x = &in[set];
        gqmm__moe_phases ph = {-1, 0, 0, 0, 0};
        if (gqmm__moe_forward_timed(env->ctx, &layers[l].w, &x->tx, &x->tids, &x->tew, act,
                                    &x->tout, &ph))
          goto fail;
        if (ph.plan_s >= 0) {
          const double v[5] = {ph.plan_s, ph.gate_up_s, ph.act_s, ph.down_s, ph.combine_s};
          for (int k = 0; k < 5; k++)
            phase_sum[k] += v[k];
          calls++;
        }
        if (gqmm__now_s() - last_note > 2.0) { /* progress line for long runs */
          fprintf(stderr, "\r  bits %d, B %d: step %d/%d, layer %d/%d, %.0f s elapsed ", q.bits,
                  canvases, r + 1, o->reps, l + 1, nl, gqmm__now_s() - t_start);
          last_note = gqmm__now_s();
          noted = 1;
        }
      }
      if (dev_sync(env) && replay) goto fail; /* a replay's deferred error */
      times[mi * o->reps + r] = (gqmm__now_s() - t0) * (double)m->layers / nl;
      double v[5]; /* a fused layer's own device-timed steps (its last call of the step) */
      if (!replay && o->breakdown && env->be->moe_phases &&
          env->be->moe_phases(env->ctx, v) == GQMM_OK) {
        for (int k = 0; k < 5; k++) phase_sum[k] += v[k];
        calls++;
      }
      for (int i = 0; i < NSETS && r == o->reps - 1; i++) /* the last step of each mode */
        if (written[i] && !outputs_written(env, &in[i], host, n_out)) {
          if (noted) fprintf(stderr, "\n");
          fprintf(stderr, "gqmm bench: output has NaN (poison not overwritten) for input set %d\n",
                  i);
          goto done;
        }
    }
  if (noted) fprintf(stderr, "\n");
  for (int mi = 0; mi < nm; mi++) {
    double *t = times + mi * o->reps;
    qsort(t, (size_t)o->reps, sizeof(double), cmp_double);
    res[mi].step_med_s = t[o->reps / 2];
    res[mi].step_min_s = t[0];
  }
  res[0].have_phases = calls > 0; /* phases are timed on host-launched steps only */
  for (int k = 0; k < 5 && calls; k++)
    res[0].phase_s[k] = phase_sum[k] / calls;
  if (!calls && o->breakdown && time_gemms(env, o, q, &layers[0], &in[0], tokens, &res[0]))
    goto fail;
  *nres = nm;
  st = 0;
  goto done;
fail:
  if (noted) fprintf(stderr, "\n");
  fprintf(stderr, "gqmm bench: moe_forward: %s\n", gqmm_last_error(env->ctx));
done:
  gqmm_graph_free(graph);
  for (int i = 0; i < NSETS; i++) inputs_free(env, &in[i]);
  free(bias), free(host), free(times);
  return st;
}

/* ---- reporting ------------------------------------------------------------ */

/* The bound on GB/s for this step: memory ceiling, or compute where the
 * step's MACs per weight byte make compute bind first (DESIGN.md 5). */
static double roofline_GBps(const bench_env *env, const bench_opts *o, const bench_result *r) {
  if (!env->have_ceil) return 0;
  const double mem = fmax(env->ceil.copy_GBps, env->ceil.read_GBps);
  const double macs = (double)o->m.layers * o->tokens * r->canvases * o->m.top_k * 3.0 *
                      (double)o->m.hidden * (double)o->m.inter;
  if (env->ceil.compute_GMACps <= 0) return mem;
  return fmin(mem, env->ceil.compute_GMACps * r->weight_bytes / macs);
}

static void print_row(const bench_env *env, const bench_opts *o, const bench_result *r) {
  const double gbps = r->weight_bytes / r->step_med_s / 1e9, roof = roofline_GBps(env, o, r);
  printf("%3d %5d %13.2f %15.2f %10.4g %8.4g", r->canvases, r->bits, r->step_med_s * 1e3,
         r->step_med_s * 1e3 / r->canvases, r->weight_bytes / 1e9, gbps);
  if (roof > 0)
    printf(" %10.1f %8.3f %10.2f", roof, gbps / roof, r->weight_bytes / (roof * 1e9) * 1e3);
  else
    printf(" %10s %8s %10s", "n/m", "n/m", "n/m");
  printf(" %7s\n", launch_name(r->launch));
}

static void print_breakdown(const bench_opts *o, const bench_result *r) {
  const double layer = r->step_med_s / o->m.layers;
  printf("%3d %5d", r->canvases, r->bits);
  if (!r->have_phases) {
    printf("   (no phases: the backend runs the layer fused)\n");
    return;
  }
  /* fused backends: act and combine live in the GEMM epilogues (not timed alone) */
  double sum = 0;
  for (int k = 0; k < 5; k++) {
    const int fused = r->have_phases == 2 && (k == 2 || k == 4);
    if (fused) printf(" %10s", "(fused)");
    else printf(" %10.3f", r->phase_s[k] * 1e3), sum += r->phase_s[k];
  }
  printf(" %10.3f %10.3f\n", layer * 1e3, (layer - sum) * 1e3);
}

static void json_record(FILE *f, const bench_env *env, const bench_opts *o, const bench_result *r,
                        int first) {
  const double gbps = r->weight_bytes / r->step_med_s / 1e9, roof = roofline_GBps(env, o, r);
  const double rows = (double)o->tokens * r->canvases * o->m.top_k;
  fprintf(f,
          "%s  {\"backend\": \"%s\", \"device\": \"%s\", \"op\": \"moe_step\", \"model\": \"%s\", "
          "\"layers\": %d, \"layers_run\": %d, \"E\": %d, \"top_k\": %d, \"K\": %lld, \"N\": %lld, "
          "\"M\": %.0f, \"rows_per_expert\": %.3f, \"tokens_per_canvas\": %d, \"canvases\": %d, "
          "\"bits\": %d, \"group_size\": %d, \"dtype\": \"bfloat16\", \"config\": \"%s\", "
          "\"time_us_median\": %.3f, \"time_us_min\": %.3f, \"time_us_per_canvas\": %.3f, "
          "\"weight_bytes\": %.0f, \"weight_GBps\": %.3f, \"launch\": \"%s\"",
          first ? "" : ",\n", gqmm_last_backend(env->ctx),
          env->have_ceil ? env->ceil.device_name : "", o->m.name, o->m.layers, r->layers_run,
          o->m.experts, o->m.top_k, (long long)o->m.hidden, (long long)o->m.inter, rows,
          rows / o->m.experts, o->tokens, r->canvases, r->bits, o->m.q.group_size,
          !env->pack ? "auto"
          : env->glu ? "auto-packed"
                     : "auto-packed-plain",
          r->step_med_s * 1e6, r->step_min_s * 1e6, r->step_med_s * 1e6 / r->canvases,
          r->weight_bytes, gbps, launch_name(r->launch));
  if (env->have_ceil)
    fprintf(f, ", \"ceiling_copy_GBps\": %.3f, \"ceiling_read_GBps\": %.3f, "
            "\"ceiling_compute_GMACps\": %.3f, \"roofline_GBps\": %.3f, \"fraction_of_roofline\": %.4f",
            env->ceil.copy_GBps, env->ceil.read_GBps, env->ceil.compute_GMACps, roof, gbps / roof);
  else
    fprintf(f, ", \"ceiling_copy_GBps\": null, \"ceiling_read_GBps\": null, "
            "\"ceiling_compute_GMACps\": null, \"roofline_GBps\": null, \"fraction_of_roofline\": null");
  if (r->have_phases == 2)
    fprintf(f, ", \"layer_plan_us\": %.3f, \"gate_up_alone_us\": %.3f, \"down_alone_us\": %.3f",
            r->phase_s[0] * 1e6, r->phase_s[1] * 1e6, r->phase_s[3] * 1e6);
  else if (r->have_phases)
    fprintf(f, ", \"layer_plan_us\": %.3f, \"layer_gate_up_us\": %.3f, \"layer_act_us\": %.3f, "
            "\"layer_down_us\": %.3f, \"layer_combine_us\": %.3f",
            r->phase_s[0] * 1e6, r->phase_s[1] * 1e6, r->phase_s[2] * 1e6, r->phase_s[3] * 1e6,
            r->phase_s[4] * 1e6);
  fprintf(f, "}");
}

/* Draw the PNG with bench/plot_moe.py (GQMM_PYTHON, else .venv/bin/python, else python3). */
static int run_plot(const char *json, const char *png) {
  const char *py = getenv("GQMM_PYTHON");
  FILE *venv = fopen(".venv/bin/python", "r");
  if (!py) py = venv ? ".venv/bin/python" : "python3";
  if (venv) fclose(venv);
  char *argv[] = {(char *)py, "bench/plot_moe.py", (char *)json, (char *)png, NULL};
  pid_t pid;
  int status = 0;
  if (posix_spawnp(&pid, py, NULL, NULL, argv, environ) != 0 || waitpid(pid, &status, 0) < 0 ||
      !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "gqmm bench: plotting failed (%s bench/plot_moe.py %s %s)\n", py, json, png);
    return 1;
  }
  printf("plot: %s\n", png);
  return 0;
}

/* ---- the command ---------------------------------------------------------- */

static void usage(FILE *f) {
  fprintf(
      f,
      "usage: gqmm bench [--model NAME | --layers L --experts E --topk K --hidden H --inter I]\n"
      "                  [--act swiglu|geglu] [--bits B] [--group G] [--canvases B] [--tokens T]\n"
      "                  [--levers] [--breakdown] [--json FILE] [--plot FILE.png]\n"
      "                  [--backend auto|cpu|cuda|ref] [--reps N] [--max-layers N] [--no-pack]\n"
      "                  [--no-glu] [--launch host|graph|both]\n"
      "Times the MoE expert layers of one denoising step (default: the seed's model,\n"
      "one 256-token canvas). --levers: canvases 1,2,4,8 x expert bits 8,4,3,2.\n"
      "The weights are packed once at load (gqmm_pack_glu, gqmm_pack; on the CPU 2- and\n"
      "4-bit only); --no-pack reads the MLX layout instead; --no-glu packs gate_up with\n"
      "gqmm_pack (on a GPU the activation then runs as its own kernel). --launch: on a GPU\n"
      "each step is timed as the host enqueues it and replayed from a CUDA graph (both,\n"
      "the default), alternated; --breakdown times host launches only.\n"
      "models:");
  for (int i = 0; gqmm_moe_model_at(i); i++) fprintf(f, " %s", gqmm_moe_model_at(i)->name);
  fprintf(f, "\n");
}

/* "--flag VALUE" as a positive integer; -1 on a bad value. */
static int int_arg(int argc, char **argv, int *i, long long *out) {
  if (*i + 1 >= argc) return -1;
  char *end;
  *out = strtoll(argv[++*i], &end, 10);
  return (*end || *out < 1 || *out > (1ll << 40)) ? -1 : 0;
}

static int parse(int argc, char **argv, bench_opts *o) {
  *o = (bench_opts){.m = *gqmm_moe_model_find("diffusiongemma-26b-a4b"), .canvases = 1,
                    .tokens = 256, .reps = -1, .max_layers = -1, .kind = GQMM_BACKEND_AUTO};
  int custom = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    long long v = 0;
    int bad = 0;
    if (!strcmp(a, "--model") && i + 1 < argc) {
      const gqmm_moe_model *m = gqmm_moe_model_find(argv[++i]);
      if (!m) return fprintf(stderr, "gqmm bench: unknown model '%s'\n", argv[i]), usage(stderr), 2;
      o->m = *m;
    } else if (!strcmp(a, "--backend") && i + 1 < argc) {
      if (gqmm_cli_backend(argv[++i], &o->kind))
        return fprintf(stderr, "gqmm bench: unknown backend '%s'\n", argv[i]), 2;
    } else if (!strcmp(a, "--act") && i + 1 < argc) {
      ++i;
      if (!strcmp(argv[i], "swiglu")) o->m.act = GQMM_ACT_SWIGLU;
      else if (!strcmp(argv[i], "geglu")) o->m.act = GQMM_ACT_GEGLU;
      else bad = 1;
    } else if (!strcmp(a, "--json") && i + 1 < argc) o->json = argv[++i];
    else if (!strcmp(a, "--plot") && i + 1 < argc) o->plot = argv[++i];
    else if (!strcmp(a, "--levers")) o->levers = 1;
    else if (!strcmp(a, "--breakdown")) o->breakdown = 1;
    else if (!strcmp(a, "--no-pack")) o->no_pack = 1;
    else if (!strcmp(a, "--no-glu")) o->no_glu = 1;
    else if (!strcmp(a, "--launch") && i + 1 < argc) {
      ++i;
      if (!strcmp(argv[i], "host"))
        o->launch = LAUNCH_HOST;
      else if (!strcmp(argv[i], "graph"))
        o->launch = LAUNCH_GRAPH;
      else if (!strcmp(argv[i], "both"))
        o->launch = LAUNCH_HOST | LAUNCH_GRAPH;
      else
        bad = 1;
    } else if (!strcmp(a, "--layers"))
      bad = int_arg(argc, argv, &i, &v), o->m.layers = (int)v, custom = 1;
    else if (!strcmp(a, "--experts")) bad = int_arg(argc, argv, &i, &v), o->m.experts = (int)v, custom = 1;
    else if (!strcmp(a, "--topk")) bad = int_arg(argc, argv, &i, &v), o->m.top_k = (int)v, custom = 1;
    else if (!strcmp(a, "--hidden")) bad = int_arg(argc, argv, &i, &v), o->m.hidden = v, custom = 1;
    else if (!strcmp(a, "--inter")) bad = int_arg(argc, argv, &i, &v), o->m.inter = v, custom = 1;
    else if (!strcmp(a, "--bits")) bad = int_arg(argc, argv, &i, &v), o->m.q.bits = (int)v;
    else if (!strcmp(a, "--group")) bad = int_arg(argc, argv, &i, &v), o->m.q.group_size = (int)v;
    else if (!strcmp(a, "--canvases")) bad = int_arg(argc, argv, &i, &v), o->canvases = (int)v;
    else if (!strcmp(a, "--tokens")) bad = int_arg(argc, argv, &i, &v), o->tokens = (int)v;
    else if (!strcmp(a, "--reps")) bad = int_arg(argc, argv, &i, &v), o->reps = (int)v;
    else if (!strcmp(a, "--max-layers")) bad = int_arg(argc, argv, &i, &v), o->max_layers = (int)v;
    else if (!strcmp(a, "--help") || !strcmp(a, "-h")) return usage(stdout), 1;
    else return fprintf(stderr, "gqmm bench: unknown option '%s'\n", a), usage(stderr), 2;
    if (bad) return fprintf(stderr, "gqmm bench: %s needs a valid value\n", a), 2;
  }
  if (custom) o->m.name = "custom";
  if ((o->launch & LAUNCH_GRAPH) && o->breakdown)
    return fprintf(stderr, "gqmm bench: --breakdown's phase events cannot be read in a graph "
                           "replay; time it with --launch host\n"),
           2;
  if (o->m.top_k > o->m.experts)
    return fprintf(stderr, "gqmm bench: --topk %d exceeds --experts %d\n", o->m.top_k, o->m.experts), 2;
  if (gqmm_quant_check(o->m.q) || o->m.hidden % o->m.q.group_size || o->m.inter % o->m.q.group_size)
    return fprintf(stderr, "gqmm bench: bits %d / group %d do not fit hidden %lld and inter %lld\n",
                   o->m.q.bits, o->m.q.group_size, (long long)o->m.hidden, (long long)o->m.inter), 2;
  return 0;
}

/* The backend this run uses: the first of the list that --backend allows and
 * that works here (a device backend must give memory). */
static int pick_env(bench_opts *o, bench_env *env) {
  memset(env, 0, sizeof *env);
  env->ctx = gqmm_cli_ctx(o->kind);
  if (!env->ctx) return -1;
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++) {
    if (o->kind != GQMM_BACKEND_AUTO && (*b)->kind != o->kind) continue;
    if (o->kind == GQMM_BACKEND_AUTO && (*b)->mem_alloc && !(*b)->moe_forward) {
      /* device tensors need the backend's fused layer (no composed device path) */
      fprintf(stderr, "gqmm bench: backend %s has no MoE layer (moe_forward); skipping it\n",
              (*b)->name);
      continue;
    }
    env->be = *b;
    env->dev = (*b)->mem_alloc ? GQMM_DEVICE_CUDA : GQMM_DEVICE_CPU;
    void *probe = dev_alloc(env, 1 << 20);
    if (probe) {
      dev_free(env, probe);
      break;
    }
    env->be = NULL;
  }
  if (!env->be) {
    fprintf(stderr, "gqmm bench: no backend compiled in can run here for this --backend\n");
    return -1;
  }
  if ((o->launch & LAUNCH_GRAPH) && !env->be->graph_begin) {
    fprintf(stderr, "gqmm bench: --launch graph needs a GPU backend (this run is on %s)\n",
            env->be->name);
    return -1;
  }
  if (!o->launch) /* both where graphs exist, but the breakdown's events need host launches */
    o->launch = env->be->graph_begin && !o->breakdown ? LAUNCH_HOST | LAUNCH_GRAPH : LAUNCH_HOST;
  if (env->be->ceilings && env->be->ceilings(env->ctx, &env->ceil) == GQMM_OK) env->have_ceil = 1;
  env->pack = !o->no_pack && env->be->pack;
  env->glu = env->pack && !o->no_glu;
  const int is_ref = env->be->kind == GQMM_BACKEND_REF, dev = env->dev != GQMM_DEVICE_CPU;
  if (o->reps < 0) o->reps = is_ref ? 1 : dev ? 20 : 3;
  if (o->max_layers < 0) o->max_layers = is_ref ? 1 : dev ? o->m.layers : 2;
  return 0;
}

/* Make up to `want` distinct layers that fit; returns how many. */
static int make_layers(bench_env *env, const bench_opts *o, gqmm_quant q, bench_layer *L, int want) {
  const double per = layer_bytes(&o->m, q, o->m.experts);
  if (env->dev == GQMM_DEVICE_CPU) {
    const int fit = (int)(0.6 * host_available() / per);
    want = want < fit ? want : fit;
  }
  const int64_t E = o->m.experts, H = o->m.hidden, I = o->m.inter;
  const size_t stage_words = (size_t)(E * 2 * I * H) * q.bits / 32 + (size_t)(E * 2 * I * H / q.group_size);
  void *stage = malloc(stage_words * 4);
  uint64_t s = 0x2545F4914F6CDD1Dull ^ (uint64_t)q.bits;
  int n = 0;
  while (stage && n < want && layer_make(env, &o->m, q, &s, stage, &L[n]) == 0) n++;
  if (n > 1 && n < want && env->dev != GQMM_DEVICE_CPU) layer_free(env, &L[--n]); /* headroom */
  free(stage);
  return n;
}

int gqmm_cmd_bench(int argc, char **argv) {
  bench_opts o;
  int rc = parse(argc, argv, &o);
  if (rc) return rc == 1 ? 0 : rc;
  bench_env env;
  if (pick_env(&o, &env)) return gqmm_ctx_destroy(env.ctx), 1;
  env.ctx->moe_timing = o.breakdown; /* the phase events cost device time: only when shown */
  const gqmm_moe_model *m = &o.m;
  const int bits_levers[] = {8, 4, 3, 2}, canv_levers[] = {1, 2, 4, 8};
  const int nb = o.levers ? 4 : 1, nc = o.levers ? 4 : 1;
  bench_result res[32];
  int nres = 0, layers_run = 0;
  bench_layer *layers = calloc((size_t)m->layers, sizeof(bench_layer));
  rc = layers ? 0 : 1;
  printf("gqmm bench: %s expert layers: %d layers, E=%d, top-%d, hidden %lld, inter %lld, %s, "
         "group %d, bf16\n", m->name, m->layers, m->experts, m->top_k, (long long)m->hidden,
         (long long)m->inter, m->act == GQMM_ACT_GEGLU ? "GeGLU" : "SwiGLU", m->q.group_size);
  printf("backend: %s (%s memory, %s); ", env.be->name,
         env.dev == GQMM_DEVICE_CPU ? "host" : "device",
         !env.pack  ? "MLX weight layout"
         : env.glu ? "weights packed at load by gqmm_pack_glu / gqmm_pack"
                   : "weights packed at load by gqmm_pack");
  if (env.have_ceil)
    printf("ceilings on %s: copy %.1f GB/s, read %.1f GB/s, compute %.1f GMAC/s (%s)\n",
           env.ceil.device_name, env.ceil.copy_GBps, env.ceil.read_GBps, env.ceil.compute_GMACps,
           env.ceil.compute_what);
  else
    printf("ceiling: not measured (backend has no ceilings hook)\n");
  printf("canvas: %d tokens; rows per expert = %d tokens x %d / %d = %.1f per canvas; "
         "median of %d steps\n", o.tokens, o.tokens, m->top_k, m->experts,
         (double)o.tokens * m->top_k / m->experts, o.reps);
  if (env.dev != GQMM_DEVICE_CPU)
    printf("launch: %s%s%s, alternated step by step\n",
           o.launch & LAUNCH_HOST ? "host (each layer call enqueued by the host)" : "",
           o.launch == (LAUNCH_HOST | LAUNCH_GRAPH) ? " and " : "",
           o.launch & LAUNCH_GRAPH ? "graph (each step recorded once as a CUDA graph, replayed)"
                                   : "");
  for (int bi = 0; bi < nb && !rc; bi++) {
    gqmm_quant q = {o.levers ? bits_levers[bi] : m->q.bits, m->q.group_size};
    const int want = o.max_layers < m->layers ? o.max_layers : m->layers;
    layers_run = make_layers(&env, &o, q, layers, want);
    if (layers_run < 1) {
      fprintf(stderr, "gqmm bench: not even one layer (%.0f MB) fits in memory\n",
              layer_bytes(m, q, m->experts) / 1e6);
      rc = 1;
      break;
    }
    if (env.pack) { /* the load-time choice the user would want to see */
      int packs = 0, scaled = 0;
      for (int l = 0; l < layers_run; l++)
        for (int part = 0; part < 2; part++)
          packs += layers[l].pk[part] != NULL, scaled += gqmm_packed_scaled(layers[l].pk[part]);
      if (env.dev != GQMM_DEVICE_CPU) /* the GPU layout's choice; the CPU's has one form */
        printf("%d-bit: %d of %d packed tensors dequantize with one FMA per two weights "
               "(gqmm_packed_scaled)\n",
               q.bits, scaled, packs);
      else
        printf("%d-bit: %d of %d tensors packed (gqmm_pack: the CPU layout holds 2- and 4-bit)\n",
               q.bits, packs, 2 * layers_run);
    }
    if (bi == 0 || layers_run != res[nres - 1].layers_run)
      printf("%d-bit: %.1f MB per layer; ran %d distinct layer(s) of %d%s: step time = measured "
             "time x %d/%d\n", q.bits, layer_bytes(m, q, m->experts) / 1e6, layers_run, m->layers,
             layers_run == m->layers ? "" : layers_run == want ? " (--max-layers / backend default)"
                                                                : " (memory)",
             m->layers, layers_run);
    for (int ci = 0; ci < nc && !rc; ci++) {
      const int B = o.levers ? canv_levers[ci] : o.canvases;
      int got = 0;
      rc = measure(&env, &o, q, B, layers, layers_run, &res[nres], &got);
      nres += got;
    }
    for (int l = 0; l < layers_run; l++) layer_free(&env, &layers[l]);
  }
  free(layers);
  if (nres) {
    printf("ran on: %s\n", gqmm_last_backend(env.ctx));
    printf("%3s %5s %13s %15s %10s %8s %10s %8s %10s %7s\n", "B", "bits", "ms/step", "ms/canvas",
           "weight GB", "GB/s", "roof GB/s", "fraction", "floor ms", "launch");
    for (int i = 0; i < nres; i++) print_row(&env, &o, &res[i]);
  }
  if (nres && o.breakdown) {
    printf("per-layer breakdown (ms per layer call; other = layer - the phases timed):\n%3s %5s %10s %10s %10s "
           "%10s %10s %10s %10s\n", "B", "bits", "plan", "gate_up", "act", "down", "combine",
           "layer", "other");
    for (int i = 0; i < nres; i++) print_breakdown(&o, &res[i]);
  }
  char json_tmp[1024];
  const char *json = o.json;
  if (!json && o.plot) snprintf(json_tmp, sizeof json_tmp, "%s.json", o.plot), json = json_tmp;
  if (nres && json) {
    FILE *f = fopen(json, "w");
    if (!f) {
      fprintf(stderr, "gqmm bench: cannot write %s\n", json);
      rc = 1;
    } else {
      fprintf(f, "[\n");
      for (int i = 0; i < nres; i++) json_record(f, &env, &o, &res[i], i == 0);
      fprintf(f, "\n]\n");
      fclose(f);
      printf("json: %s\n", json);
    }
  }
  if (!rc && nres && o.plot) rc = run_plot(json, o.plot);
  gqmm_ctx_destroy(env.ctx);
  return rc ? 1 : 0;
}
