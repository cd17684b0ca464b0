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

typedef struct {
  bool loaded;
  gqmm__tune_cache cache;
  struct {
    const gqmm__backend *be;
    char key[128];
  } device[DEVICE_MEMO];
  gqmm__tile_config cfgs[GQMM__TUNE_MAX_CONFIGS];
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

int gqmm__choose_config(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__qmm_args *a) {
  if (ctx->forced_config >= 0) return ctx->forced_config;
  if (!be->configs) return -1;
  tune_state *s = state(ctx);
  if (!s) return -1;
  if (!s->loaded) {
    char msg[400];
    if (gqmm__tune_use_cache(ctx, NULL, msg, sizeof msg) != GQMM_OK || msg[0])
      fprintf(stderr, "gqmm: tuning cache: %s; %s\n", msg,
              s->cache.n ? "using the valid entries" : "ignored, using built-in defaults");
  }
  if (s->cache.n == 0) return -1;
  gqmm__tune_key k;
  gqmm__tune_key_of(be, device_key(ctx, s, be), a, &k);
  const gqmm__tune_entry *e = gqmm__tune_cache_find(&s->cache, &k);
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
