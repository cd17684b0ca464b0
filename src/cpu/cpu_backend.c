/*
 * cpu_backend.c - the CPU backend's interface (gqmm__cpu_backend): the ISA
 * chosen at run time from the CPU's features (or forced with the context
 * option cpu_isa / GQMM_CPU_ISA), the thread count (context option or
 * GQMM_NUM_THREADS, else one per online CPU), the block-size table the tuner
 * sweeps, and the lazily created state in ctx->cpu_state.
 */
#define _DEFAULT_SOURCE /* sysconf(_SC_NPROCESSORS_ONLN) */
#include "cpu_backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Best first. */
static const gqmm__cpu_isa *const isa_list[] = {
#ifdef GQMM_CPU_X86
    &gqmm__cpu_isa_avx512,
    &gqmm__cpu_isa_avx2,
#endif
    &gqmm__cpu_isa_portable,
};
#define N_ISA (sizeof isa_list / sizeof isa_list[0])

/*
 * Block sizes. The register tile must fit 16 ymm (AVX2: MR*NR accumulators
 * + NR panel vectors + 1 activation vector); mc x kc floats of x (16 KB:
 * mc = 16 KB / (4 kc), rounded down to a multiple of mr) stay in L1 while
 * every micro-panel of nr weight rows (nr x kc floats) runs over them, which
 * measured 90% of the FMA peak for the kernel alone (docs/perf-notes.md,
 * session 3; 73% with a 32 KB slice); nt trades the per-unit set-up against
 * units enough for every core. AVX-512 has 32 zmm registers, so it also
 * gets the wider tiles.
 */
#define ROWS_ANY (1 << 30)
static const gqmm__cpu_config configs_16reg[] = {
    {"m4n3_k256_t24_q4", 4, 3, 256, 16, 24, 4, 32},
    {"m4n3_k256_t24_q3", 4, 3, 256, 16, 24, 3, 32},
    {"m6n2_k256_t16_q4", 6, 2, 256, 12, 16, 4, 32},
    {"m4n2_k256_t16_q3", 4, 2, 256, 16, 16, 3, 32},
    {"m4n3_k512_t24_q4", 4, 3, 512, 8, 24, 4, 32},
    {"m6n2_k512_t32_q4", 6, 2, 512, 6, 32, 4, 32},
    {"m2n4_k256_t16_q1", 2, 4, 256, 16, 16, 1, 32},
    {"m4n3_k256_t48_q4", 4, 3, 256, 16, 48, 4, 32},
    {"m4n3_k128_t24_q3", 4, 3, 128, 32, 24, 3, 32},
    {"m6n2_k128_t16_q4", 6, 2, 128, 30, 16, 4, 32},
    {"m6n2_k128_t32_q4", 6, 2, 128, 30, 32, 4, 32},
    {"m4n3_k256_t12_q4", 4, 3, 256, 16, 12, 4, 32},
    {"m4n3_k128_t24_q4", 4, 3, 128, 32, 24, 4, 32},
    {"m6n2_k256_t8_q4", 6, 2, 256, 12, 8, 4, 32},
    {"m4n3_k1024_t24_q4", 4, 3, 1024, 4, 24, 4, 32},
    /* the default with every int8 block on qmv_i8 (i8_rows: the block limit) */
    {"m4n3_k512_t24_q4_i8qmv", 4, 3, 512, 8, 24, 4, ROWS_ANY},
};
static const gqmm__cpu_config configs_32reg[] = {
    {"m6n4_k256_t32_q4", 6, 4, 256, 12, 32, 4, 32},
    {"m4n4_k512_t32_q3", 4, 4, 512, 8, 32, 3, 32},
    {"m6n2_k256_t16_q4", 6, 2, 256, 12, 16, 4, 32},
    {"m4n3_k256_t24_q3", 4, 3, 256, 16, 24, 3, 32},
    {"m6n4_k256_t32_q4_i8qmv", 6, 4, 256, 12, 32, 4, ROWS_ANY},
};

const gqmm__cpu_config *gqmm__cpu_configs(const gqmm__cpu_isa *isa, int *count) {
  if (isa == &gqmm__cpu_isa_avx512) {
    *count = (int)(sizeof configs_32reg / sizeof configs_32reg[0]);
    return configs_32reg;
  }
  *count = (int)(sizeof configs_16reg / sizeof configs_16reg[0]);
  return configs_16reg;
}

/* The built-in choice: measured best on every M of `gqmm sweep` on the AVX2
 * development machine (docs/perf-notes.md); the 32-register table's first
 * row is its analogue with a wider register tile, not yet measured. */
int gqmm__cpu_default_config(const gqmm__cpu_isa *isa, const gqmm__qmm_args *a) {
  (void)a;
  return isa == &gqmm__cpu_isa_avx512 ? 0 : 4;
}

/* ---- state ------------------------------------------------------------- */

static int pick_isa(gqmm_ctx *ctx, const gqmm__cpu_isa **out) {
  const char *want = ctx->cpu_isa[0] ? ctx->cpu_isa : getenv("GQMM_CPU_ISA");
  const char *from = ctx->cpu_isa[0] ? "context option cpu_isa" : "GQMM_CPU_ISA";
  if (!want || !*want || !strcmp(want, "auto") || !strcmp(want, "best")) {
    for (size_t i = 0; i < N_ISA; i++)
      if (isa_list[i]->supported()) {
        *out = isa_list[i];
        return GQMM_OK;
      }
  }
  for (size_t i = 0; i < N_ISA; i++) {
    if (strcmp(want, isa_list[i]->name)) continue;
    if (!isa_list[i]->supported()) {
      char feats[160];
      gqmm_cpu_features(feats, sizeof feats);
      return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                        "%s: ISA '%s' was requested but this CPU lacks it (%s)", from, want, feats);
    }
    *out = isa_list[i];
    return GQMM_OK;
  }
  return gqmm__fail(ctx, GQMM_ERR_ARG,
                    "%s: unknown ISA '%s' (expected auto, avx512, avx2 or portable)", from, want);
}

static int pick_threads(gqmm_ctx *ctx, int *out) {
  long online = sysconf(_SC_NPROCESSORS_ONLN);
  if (online < 1) online = 1;
  if (ctx->num_threads > 0) {
    *out = ctx->num_threads;
    return GQMM_OK;
  }
  const char *env = getenv("GQMM_NUM_THREADS");
  if (env && *env) {
    char *end = NULL;
    long v = strtol(env, &end, 10);
    if (*end || v < 1 || v > 1024)
      return gqmm__fail(ctx, GQMM_ERR_ARG, "GQMM_NUM_THREADS: '%s' is not a count in [1, 1024]",
                        env);
    *out = (int)v;
    return GQMM_OK;
  }
  *out = (int)online;
  return GQMM_OK;
}

static void cpu_release(gqmm_ctx *ctx) {
  gqmm__cpu_state *st = ctx->cpu_state;
  if (!st) return;
  gqmm__cpu_pool_destroy(st->pool);
  for (int t = 0; t < st->threads; t++)
    free(st->scratch[t].buf);
  free(st->scratch);
  free(st->prep);
  free(st);
  ctx->cpu_state = NULL;
}

static int get_state(gqmm_ctx *ctx, gqmm__cpu_state **out) {
  if (ctx->cpu_state) {
    *out = ctx->cpu_state;
    return GQMM_OK;
  }
  const gqmm__cpu_isa *isa = NULL;
  int threads = 1, st;
  if ((st = pick_isa(ctx, &isa)) || (st = pick_threads(ctx, &threads))) return st;
  gqmm__cpu_state *s = calloc(1, sizeof *s);
  if (s) s->pool = gqmm__cpu_pool_create(threads);
  if (s) s->threads = gqmm__cpu_pool_threads(s->pool);
  if (s) s->scratch = calloc((size_t)s->threads, sizeof(gqmm__cpu_scratch));
  if (!s || !s->pool || !s->scratch) {
    if (s) gqmm__cpu_pool_destroy(s->pool);
    if (s) free(s->scratch);
    free(s);
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "cpu backend: cannot create a pool of %d threads",
                      threads);
  }
  s->isa = isa;
  snprintf(s->label, sizeof s->label, "cpu-%s", isa->name);
  ctx->cpu_state = s;
  *out = s;
  return GQMM_OK;
}

/* ---- the backend interface ---------------------------------------------- */

static bool cpu_supports(gqmm_ctx *ctx, const gqmm__qmm_args *a) {
  (void)ctx;
  return a->device == GQMM_DEVICE_CPU && gqmm__is_float(a->dtype) &&
         gqmm_quant_check(a->q) == GQMM_OK;
}

static int cpu_qmm_config(gqmm_ctx *ctx, const gqmm__qmm_args *a, int config_id) {
  gqmm__cpu_state *st = NULL;
  int status = get_state(ctx, &st), count;
  if (status) return status;
  const gqmm__cpu_config *cfgs = gqmm__cpu_configs(st->isa, &count);
  if (config_id < 0) config_id = gqmm__cpu_default_config(st->isa, a);
  if (config_id >= count)
    return gqmm__fail(ctx, GQMM_ERR_ARG, "config: id %d is outside the %d cpu-%s configurations",
                      config_id, count, st->isa->name);
  ctx->last_backend = st->label;
  return gqmm__cpu_run(ctx, st, a, &cfgs[config_id], ctx->cpu_int8 != 0);
}

static int cpu_qmm(gqmm_ctx *ctx, const gqmm__qmm_args *a) {
  return cpu_qmm_config(ctx, a, gqmm__choose_config(ctx, &gqmm__cpu_backend, a));
}

static int cpu_configs(gqmm_ctx *ctx, const gqmm__qmm_args *a, gqmm__tile_config *out, int max) {
  (void)a;
  gqmm__cpu_state *st = NULL;
  int count;
  if (get_state(ctx, &st)) return 0;
  const gqmm__cpu_config *cfgs = gqmm__cpu_configs(st->isa, &count);
  int n = 0;
  for (; n < count && n < max; n++) {
    gqmm__tile_config *t = &out[n];
    memset(t, 0, sizeof *t);
    t->id = n;
    snprintf(t->name, sizeof t->name, "%s_%s", st->isa->name, cfgs[n].name);
    t->tile_m = cfgs[n].mr;
    t->tile_n = cfgs[n].nt;
    t->tile_k = cfgs[n].kc;
    t->threads = st->threads;
    t->stages = 1;
    t->split_k = 1;
  }
  return n;
}

static int cpu_ceilings(gqmm_ctx *ctx, gqmm__ceilings *out) {
  gqmm__cpu_state *st = NULL;
  int status = get_state(ctx, &st);
  return status ? status : gqmm__cpu_ceilings(ctx, st, ctx->cpu_int8 != 0, out);
}

const gqmm__backend gqmm__cpu_backend = {
    .name = "cpu",
    .kind = GQMM_BACKEND_CPU,
    .supports_qmm = cpu_supports,
    .qmm = cpu_qmm,
    .moe_forward = NULL,
    .configs = cpu_configs,
    .qmm_config = cpu_qmm_config,
    .ceilings = cpu_ceilings,
    .release = cpu_release,
    .pack = gqmm__cpu_pack,
};
