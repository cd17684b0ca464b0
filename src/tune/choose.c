/*
 * choose.c - which tile configuration a kernel runs with.
 * Order: a forced config (tests sweep them all; `gqmm tune` measures them),
 * then the tuning cache, then the backend's own heuristic (-1).
 *
 * The cache file is read once per context, on the first lookup, into
 * ctx->tune_state; a lookup is then a scan of a few entries plus one call of
 * the backend's configs hook, which maps the stored name back to an id
 * only if that config is still compiled in and valid for this very call.
 */
#include "tune.h"

#include <stdlib.h>
#include <string.h>

#define DEVICE_MEMO 4 /* backends whose device key a context remembers */
#define TRIED_MEMO 32 /* keys a context has tried to auto-tune (never twice) */

typedef struct {
  bool loaded;
  gqmm__tune_cache cache;
  struct {
    const gqmm__backend *be;
    char key[128];
  } device[DEVICE_MEMO];
  gqmm__tile_config cfgs[GQMM__TUNE_MAX_CONFIGS];
  gqmm__tune_key tried[TRIED_MEMO];
  int n_tried;
} tune_state;

static tune_state *state(gqmm_ctx *ctx) {
  if (!ctx->tune_state) ctx->tune_state = calloc(1, sizeof(tune_state));
  return ctx->tune_state;
}

int gqmm__tune_use_cache(gqmm_ctx *ctx, const char *path, char *msg, size_t msglen) {
  tune_state *s = state(ctx);
  if (!s) return gqmm__fail(ctx, GQMM_ERR_NOMEM, "tuning state: out of memory");
  gqmm__tune_cache_free(&s->cache);
  s->loaded = true;
  char def[1024];
  if (!path) {
    if (!gqmm__tune_default_path(def, sizeof def)) {
      if (msg && msglen) msg[0] = '\0';
      return GQMM_OK; /* no home, no cache: the heuristic decides */
    }
    path = def;
  }
  return gqmm__tune_cache_load(path, &s->cache, msg, msglen);
}

static const char *device_key(gqmm_ctx *ctx, tune_state *s, const gqmm__backend *be) {
  int i = 0;
  for (; i < DEVICE_MEMO && s->device[i].be; i++)
    if (s->device[i].be == be) return s->device[i].key;
  if (i == DEVICE_MEMO) i = DEVICE_MEMO - 1; /* more backends than slots: reuse the last */
  s->device[i].be = be;
  gqmm__tune_device_key(ctx, be, s->device[i].key, sizeof s->device[i].key);
  return s->device[i].key;
}

static bool autotune_enabled(void) {
  const char *v = getenv("GQMM_TUNE");
  return v && !strcmp(v, "auto");
}

/*
 * GQMM_TUNE=auto: on a cache miss, run a quick tune of this very key (one
 * rows bucket, a few samples per config, slow configs dropped early), store
 * it in the cache file and use it. Opt-in, since it allocates the whole
 * problem once more and takes seconds; each key is tried once per context.
 */
static const gqmm__tune_entry *autotune(gqmm_ctx *ctx, tune_state *s, const gqmm__backend *be,
                                        const gqmm__qmm_args *a, const gqmm__tune_key *k) {
  for (int i = 0; i < s->n_tried && i < TRIED_MEMO; i++)
    if (gqmm__tune_key_equal(&s->tried[i], k)) return NULL;
  s->tried[s->n_tried++ % TRIED_MEMO] = *k;
  if (!a->transpose) return NULL; /* the tuner measures the Linear (transposed) layout */
  gqmm__tune_opts o;
  gqmm__tune_opts_default(&o);
  o.gather = !strcmp(k->op, "gather_qmm");
  o.E = a->w_batches, o.K = a->K, o.N = a->N, o.q = a->q, o.dtype = a->dtype;
  o.top_k = a->w_batches < 8 ? a->w_batches : 8;
  o.rows = &k->rows, o.n_rows = 1;
  o.quick = true, o.runs = 3, o.warmup = 0;
  o.min_sample_s = be->sync ? 1e-3 : 0;
  fprintf(stderr,
          "gqmm: GQMM_TUNE=auto: tuning %s %s K=%lld N=%lld %d-bit g%d %s, %d rows/expert\n",
          be->name, k->op, k->K, k->N, k->bits, k->group_size, k->dtype, k->rows);
  gqmm__tune_result res;
  gqmm__tune_entry e;
  int st = gqmm__tune_run(ctx, be, &o, &res);
  int n = st ? 0 : gqmm__tune_entries(&res, &e, 1);
  if (!st) gqmm__tune_result_free(&res);
  if (n != 1 || !gqmm__tune_key_equal(&e.key, k) || gqmm__tune_cache_put(&s->cache, &e)) {
    fprintf(stderr, "gqmm: GQMM_TUNE=auto: no result (%s)\n",
            st ? gqmm_last_error(ctx) : "no valid config");
    gqmm__clear_error(ctx);
    return NULL;
  }
  gqmm__clear_error(ctx);
  char path[1024], msg[400] = "";
  if (gqmm__tune_default_path(path, sizeof path) &&
      gqmm__tune_cache_store(path, &e, 1, msg, sizeof msg))
    fprintf(stderr, "gqmm: GQMM_TUNE=auto: not saved: %s\n", msg);
  return gqmm__tune_cache_find(&s->cache, k);
}

int gqmm__choose_config(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__qmm_args *a) {
  if (ctx->forced_config >= 0) return ctx->forced_config;
  /* The tuner measures MLX-layout weights; a gqmm_pack copy runs other
   * kernels, so its cache entries would not apply: the backend decides. */
  if (!be->configs || a->packed) return -1;
  tune_state *s = state(ctx);
  if (!s) return -1;
  if (!s->loaded) {
    char msg[400];
    if (gqmm__tune_use_cache(ctx, NULL, msg, sizeof msg) != GQMM_OK || msg[0])
      fprintf(stderr, "gqmm: tuning cache: %s; %s\n", msg,
              s->cache.n ? "using the valid entries" : "ignored, using built-in defaults");
  }
  gqmm__tune_key k;
  if (s->cache.n == 0 && !autotune_enabled()) return -1;
  gqmm__tune_key_of(be, device_key(ctx, s, be), a, &k);
  const gqmm__tune_entry *e = gqmm__tune_cache_find(&s->cache, &k);
  if (!e && autotune_enabled()) e = autotune(ctx, s, be, a, &k);
  if (!e) e = gqmm__tune_cache_find_near(&s->cache, &k);
  if (!e) return -1;
  int n = be->configs(ctx, a, s->cfgs, GQMM__TUNE_MAX_CONFIGS);
  if (n > GQMM__TUNE_MAX_CONFIGS) n = GQMM__TUNE_MAX_CONFIGS;
  for (int i = 0; i < n; i++)
    if (!strncmp(s->cfgs[i].name, e->config, sizeof s->cfgs[i].name)) return s->cfgs[i].id;
  return -1; /* stale entry: that config is gone or does not fit this call */
}

int gqmm__pick_config(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__qmm_args *a) {
  int id = gqmm__choose_config(ctx, be, a);
  if (id >= 0 || !be->configs) return id;
  tune_state *s = state(ctx);
  if (!s) return -1;
  int n = be->configs(ctx, a, s->cfgs, GQMM__TUNE_MAX_CONFIGS);
  if (n > GQMM__TUNE_MAX_CONFIGS) n = GQMM__TUNE_MAX_CONFIGS;
  return n > 0 ? gqmm__tune_heuristic(s->cfgs, n, a, 0) : -1;
}

void gqmm__tune_release(gqmm_ctx *ctx) {
  tune_state *s = ctx->tune_state;
  if (!s) return;
  gqmm__tune_cache_free(&s->cache);
  free(s);
  ctx->tune_state = NULL;
}
