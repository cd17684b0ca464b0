/*
 * test_tune_choose.c - the tuner and the automatic choice, against a
 * test-only backend: a fake table of tile configs whose qmm runs the
 * reference (so results are right) and advances a virtual clock by a
 * config- and shape-dependent cost (so the fastest config is known without
 * timing anything real). One config computes wrong results on purpose.
 */
#include "../../src/tune/json.h"
#include "../../src/tune/tune.h"
#include "test.h"
#include "test_tune.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- the fake backend ---------------------------------------------------- */

#define WRONG_ID 6
static const gqmm__tile_config fake_table[] = {
    {0, "m8_n32_k64_t128_s2", 8, 32, 64, 128, 2, 1},
    {1, "m16_n64_k64_t128_s3", 16, 64, 64, 128, 3, 1},
    {2, "m16_n128_k64_t256_s4", 16, 128, 64, 256, 4, 1},
    {3, "m32_n64_k128_t256_s4", 32, 64, 128, 256, 4, 1},
    {4, "m64_n64_k64_t128_s2", 64, 64, 64, 128, 2, 1},
    {5, "m16_n64_k64_t128_s3_sk2", 16, 64, 64, 128, 3, 2},
    {WRONG_ID, "wrong_results", 16, 64, 64, 128, 1, 1},
};
#define FAKE_N ((int)(sizeof fake_table / sizeof fake_table[0]))

static struct { /* test-only state of the fake device */
  double clock_s;
  bool offer_wrong;
  int calls;
} fake;

/* "Fits" if the K tile divides K and the N tile is not wider than N. */
static bool fake_fits(const gqmm__tile_config *c, const gqmm__qmm_args *a) {
  return a->K % c->tile_k == 0 && c->tile_n <= a->N && (c->id != WRONG_ID || fake.offer_wrong);
}

static int fake_configs(gqmm_ctx *ctx, const gqmm__qmm_args *a, gqmm__tile_config *out, int max) {
  (void)ctx;
  int n = 0;
  for (int i = 0; i < FAKE_N && n < max; i++)
    if (fake_fits(&fake_table[i], a)) out[n++] = fake_table[i];
  return n;
}

static double fake_cost_us(const gqmm__tile_config *c, int rows) {
  if (c->id == WRONG_ID) return 1; /* the fastest, and wrong */
  return 100 + 10 * fabs(log2(c->tile_m) - log2(rows)) - (c->tile_n == 128 ? 5 : 0) + 0.1 * c->id;
}

static int fake_qmm_config(gqmm_ctx *ctx, const gqmm__qmm_args *a, int id) {
  if (id < 0 || id >= FAKE_N || !fake_fits(&fake_table[id], a))
    return gqmm__fail(ctx, GQMM_ERR_ARG, "fake: config %d not valid here", id);
  int st = gqmm__ref_qmm(ctx, a);
  if (!st && id == WRONG_ID) gqmm__store_f(a->out, a->dtype, 0, 1e6f);
  fake.clock_s +=
      1e-6 * fake_cost_us(&fake_table[id], gqmm__rows_bucket(a->M * a->batch, a->w_batches));
  fake.calls++;
  return st;
}

static bool fake_supports(gqmm_ctx *ctx, const gqmm__qmm_args *a) {
  (void)ctx;
  return a->device == GQMM_DEVICE_CPU;
}

static int fake_qmm(gqmm_ctx *ctx, const gqmm__qmm_args *a);

static int fake_ceilings(gqmm_ctx *ctx, gqmm__ceilings *out) {
  (void)ctx;
  memset(out, 0, sizeof *out);
  snprintf(out->device_name, sizeof out->device_name, "fake device");
  out->copy_GBps = 100, out->read_GBps = 120, out->compute_GMACps = 1000;
  return GQMM_OK;
}

static void fake_device_key(gqmm_ctx *ctx, char *buf, size_t len) {
  (void)ctx;
  snprintf(buf, len, "fake device v1\n"); /* the newline must not reach the cache */
}

static const gqmm__backend fake_backend = {
    .name = "fake",
    .kind = GQMM_BACKEND_CPU,
    .supports_qmm = fake_supports,
    .qmm = fake_qmm,
    .configs = fake_configs,
    .qmm_config = fake_qmm_config,
    .ceilings = fake_ceilings,
    .device_key = fake_device_key,
};

static int fake_qmm(gqmm_ctx *ctx, const gqmm__qmm_args *a) {
  return fake_qmm_config(ctx, a, gqmm__pick_config(ctx, &fake_backend, a));
}

static double fake_clock(void *user) {
  (void)user;
  return fake.clock_s;
}

/* ---- helpers ------------------------------------------------------------- */

/* The args of a gather_qmm call with `rows` rows per expert (data unused by
 * configs and the key). */
static gqmm__qmm_args gather_args(long long E, long long K, long long N, int rows, gqmm_dtype t) {
  gqmm__qmm_args a;
  memset(&a, 0, sizeof a);
  a.dtype = t;
  a.q = (gqmm_quant){4, 64};
  a.transpose = 1;
  a.K = K, a.N = N, a.M = 1;
  a.batch = a.x_batches = rows * E;
  a.w_batches = E;
  return a;
}

static int best_fake(const gqmm__qmm_args *a) {
  gqmm__tile_config c[FAKE_N];
  int n = fake_configs(NULL, a, c, FAKE_N), best = -1;
  int rows = gqmm__rows_bucket(a->M * a->batch, a->w_batches);
  for (int i = 0; i < n; i++)
    if (c[i].id != WRONG_ID &&
        (best < 0 || fake_cost_us(&c[i], rows) < fake_cost_us(&fake_table[best], rows)))
      best = c[i].id;
  return best;
}

/* ---- cases --------------------------------------------------------------- */

GQMM_TEST(rows_bucket_is_a_power_of_two_ceiling) {
  CHECK(gqmm__rows_bucket(2048, 128) == 16);
  CHECK(gqmm__rows_bucket(2049, 128) == 32);
  CHECK(gqmm__rows_bucket(8, 128) == 1);
  CHECK(gqmm__rows_bucket(0, 128) == 1);
  CHECK(gqmm__rows_bucket(5, 1) == 8);
  CHECK(gqmm__rows_bucket(1LL << 40, 1) == 65536);
  CHECK(gqmm__rows_bucket(16, 0) == 16);
}

GQMM_TEST(heuristic_gives_every_shape_a_valid_config) {
  test_rng r = test_rng_make(11);
  gqmm__tile_config table[64];
  CHECK(gqmm__tune_heuristic(table, 0, NULL, 0) == -1);
  for (int it = 0; it < 20000; it++) {
    /* a random table: random fields, zeros included ("not used") */
    int n = 1 + (int)(test_rng_u32(&r) % 64);
    for (int i = 0; i < n; i++) {
      gqmm__tile_config *c = &table[i];
      memset(c, 0, sizeof *c);
      c->id = 1000 + i * 3;
      c->tile_m = (int)(test_rng_u32(&r) % 3 ? 1u << (test_rng_u32(&r) % 8) : 0);
      c->tile_n = (int)(test_rng_u32(&r) % 3 ? 8u << (test_rng_u32(&r) % 6) : 0);
      c->tile_k = (int)(test_rng_u32(&r) % 3 ? 16u << (test_rng_u32(&r) % 4) : 0);
      c->stages = (int)(test_rng_u32(&r) % 7);
      c->split_k = (int)(test_rng_u32(&r) % 5);
    }
    const int bits[] = {2, 3, 4, 5, 6, 8}, gs[] = {32, 64, 128};
    gqmm__qmm_args a;
    memset(&a, 0, sizeof a);
    a.q = (gqmm_quant){bits[test_rng_u32(&r) % 6], gs[test_rng_u32(&r) % 3]};
    a.K = a.q.group_size * (1 + test_rng_u32(&r) % 100);
    a.N = 1 + test_rng_u32(&r) % 5000;
    a.w_batches = 1 + test_rng_u32(&r) % 256;
    a.M = 1 + test_rng_u32(&r) % 70;
    a.batch = test_rng_u32(&r) % 3 ? 1 + test_rng_u32(&r) % 20000 : 1;
    int units = (int)(test_rng_u32(&r) % 300);
    int id = gqmm__tune_heuristic(table, n, &a, units);
    bool found = false;
    for (int i = 0; i < n; i++)
      found |= table[i].id == id;
    CHECK_MSG(found, "iteration %d: id %d not in the table", it, id);
    CHECK(gqmm__tune_heuristic(table, n, &a, units) == id); /* deterministic */
  }
  /* at 16 rows per expert a 16-row tile beats one that re-streams the weights */
  gqmm__qmm_args a = gather_args(128, 2816, 1408, 16, GQMM_BF16);
  gqmm__tile_config two[2] = {{7, "m8", 8, 128, 64, 128, 4, 1}, {9, "m16", 16, 128, 64, 128, 4, 1}};
  CHECK(gqmm__tune_heuristic(two, 2, &a, 132) == 9);
  /* equal tiles: more threads per tile win the tie, whatever the order */
  gqmm__tile_config warps[2] = {{3, "w4", 32, 128, 128, 128, 4, 1},
                                {5, "w8", 32, 128, 128, 256, 4, 1}};
  CHECK(gqmm__tune_heuristic(warps, 2, &a, 132) == 5);
  gqmm__tile_config swapped[2] = {warps[1], warps[0]};
  CHECK(gqmm__tune_heuristic(swapped, 2, &a, 132) == 5);
}

GQMM_TEST(choose_follows_forced_then_cache_then_heuristic) {
  char path[512], msg[400];
  tmp_path(path, sizeof path, "choose");
  remove_cache(path);
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  fake.offer_wrong = false;
  gqmm__qmm_args a = gather_args(128, 2816, 1408, 16, GQMM_BF16);
  CHECK_OK(gqmm__tune_use_cache(ctx, path, msg, sizeof msg)); /* no file yet */
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a) == -1);
  int h = gqmm__pick_config(ctx, &fake_backend, &a);
  CHECK(h >= 0 && h < FAKE_N && h != WRONG_ID);
  ctx->forced_config = 4;
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a) == 4);
  ctx->forced_config = -1;

  char dev[128];
  gqmm__tune_device_key(ctx, &fake_backend, dev, sizeof dev);
  CHECK(!strchr(dev, '\n'));
  gqmm__tune_entry e[4];
  memset(e, 0, sizeof e);
  for (int i = 0; i < 4; i++)
    snprintf(e[i].lib, sizeof e[i].lib, "%s", gqmm_version());
  gqmm__tune_key_of(&fake_backend, dev, &a, &e[0].key);
  snprintf(e[0].config, sizeof e[0].config, "m32_n64_k128_t256_s4");
  gqmm__qmm_args a_k64 = gather_args(128, 64 * 3, 1408, 16, GQMM_BF16); /* k128 tile cannot fit */
  gqmm__tune_key_of(&fake_backend, dev, &a_k64, &e[1].key);
  snprintf(e[1].config, sizeof e[1].config, "m32_n64_k128_t256_s4");
  gqmm__qmm_args a_r4 = gather_args(128, 2816, 1408, 4, GQMM_BF16);
  gqmm__tune_key_of(&fake_backend, dev, &a_r4, &e[2].key);
  snprintf(e[2].config, sizeof e[2].config, "no_such_config");
  gqmm__qmm_args a_f32 = gather_args(128, 2816, 1408, 16, GQMM_F32);
  gqmm__tune_key_of(&fake_backend, "another device", &a_f32, &e[3].key);
  snprintf(e[3].config, sizeof e[3].config, "m64_n64_k64_t128_s2");
  CHECK_OK(gqmm__tune_cache_store(path, e, 4, msg, sizeof msg));
  CHECK_OK(gqmm__tune_use_cache(ctx, path, msg, sizeof msg));
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a) == 3); /* the cached name, mapped to its id */
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a_k64) == -1); /* cached config does not fit */
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a_r4) == -1);  /* stale name */
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a_f32) == -1); /* other device */
  CHECK(gqmm__pick_config(ctx, &fake_backend, &a_r4) >= 0);
  gqmm__qmm_args a_r12 = gather_args(128, 2816, 1408, 12, GQMM_BF16); /* same bucket as 16 */
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a_r12) == 3);
  /* a gqmm_pack copy of the same weights: the cache (MLX layout) does not apply */
  struct gqmm_packed fake_pk;
  memset(&fake_pk, 0, sizeof fake_pk);
  gqmm__qmm_args a_pk = a;
  a_pk.packed = &fake_pk;
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a_pk) == -1);
  gqmm_ctx_destroy(ctx);

  /* the default path (GQMM_TUNE_CACHE) is read on first use; a corrupt file
   * is reported on stderr and ignored */
  const char *old = getenv("GQMM_TUNE_CACHE");
  char saved[512] = "";
  if (old) snprintf(saved, sizeof saved, "%s", old);
  setenv("GQMM_TUNE_CACHE", path, 1);
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a) == 3);
  gqmm_ctx_destroy(ctx);
  FILE *f = fopen(path, "wb");
  CHECK(f);
  fputs("{\"format\": \"gqmm-tune-cache\", \"version\": 1, \"entries\": [{\"dev", f);
  fclose(f);
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a) == -1);
  CHECK(gqmm__pick_config(ctx, &fake_backend, &a) >= 0);
  gqmm_ctx_destroy(ctx);
  if (old)
    setenv("GQMM_TUNE_CACHE", saved, 1);
  else
    unsetenv("GQMM_TUNE_CACHE");
  remove_cache(path);
}

static int progress_calls, progress_last_done, progress_total;
static bool progress_ok;
static void on_progress(void *user, const gqmm__tune_progress *p) {
  (void)user;
  progress_ok &= p->done >= progress_last_done && p->done <= p->total && p->elapsed_s >= 0;
  progress_ok &= p->done == 0 || isfinite(p->eta_s);
  progress_last_done = p->done;
  progress_total = p->total;
  progress_calls++;
}

GQMM_TEST(tuner_picks_the_fastest_correct_config_and_cache_serves_it) {
  const gqmm_dtype types[] = {GQMM_F32, GQMM_BF16};
  for (int ti = 0; ti < 2; ti++) {
    char path[512], msg[400];
    tmp_path(path, sizeof path, "tuner");
    remove_cache(path);
    gqmm_ctx *ctx = NULL;
    CHECK_OK(gqmm_ctx_create(&ctx, NULL));
    static const int rows[] = {1, 4, 16, 64};
    gqmm__tune_opts o;
    gqmm__tune_opts_default(&o);
    o.E = 4, o.K = 128, o.N = 64, o.top_k = 2, o.dtype = types[ti];
    o.rows = rows, o.n_rows = 4, o.runs = 5, o.warmup = 1;
    o.rotate_bytes = 3 * 4 * 64 * (128 / 2 + 2 * 2 * 2); /* about 3 copies */
    o.clock = fake_clock, o.progress = on_progress;
    fake.offer_wrong = true;
    progress_calls = progress_last_done = 0;
    progress_ok = true;
    gqmm__tune_result res;
    int calls0 = fake.calls;
    CHECK_OK(gqmm__tune_run(ctx, &fake_backend, &o, &res));
    CHECK(strstr(res.device, "fake device v1") && res.ceilings.copy_GBps == 100);
    CHECK(progress_ok && progress_calls == res.n_rec + 1 && progress_last_done == progress_total);
    int wrong = 0;
    for (int i = 0; i < res.n_rec; i++) {
      const gqmm__tune_record *r = &res.rec[i];
      if (r->cfg.id == WRONG_ID) {
        CHECK(r->status == GQMM_ERR_BACKEND);
        wrong++;
        continue;
      }
      CHECK_MSG(r->status == GQMM_OK, "%s rows %d: %s", r->cfg.name, r->rows, r->error);
      CHECK(r->samples == o.runs && r->key.rows == r->rows);
      double want = fake_cost_us(&r->cfg, r->rows);
      CHECK_MSG(fabs(r->time_us_median - want) < 1e-6 * want, "%s: %g vs %g", r->cfg.name,
                r->time_us_median, want);
      CHECK(r->experts_used >= 1 && r->experts_used <= 4 && r->rows_total == 4LL * r->rows);
      CHECK(fabs(r->weight_GBps - r->weight_bytes / (r->time_us_median * 1e3)) <
            1e-9 * r->weight_GBps);
      /* roofline = min(max(copy, read), compute * bytes / MACs) */
      double macs = (double)r->rows_total * 128 * 64;
      CHECK(fabs(r->roofline_GBps - fmin(120, 1000 * r->weight_bytes / macs)) < 1e-9);
    }
    CHECK(wrong == 4);
    /* min_sample_s 0: one call a sample; the wrong config stops after its check */
    CHECK(fake.calls - calls0 == (res.n_rec - wrong) * (1 + o.warmup + o.runs) + wrong);
    gqmm__tune_entry e[8];
    int n = gqmm__tune_entries(&res, e, 8);
    CHECK(n == 4);
    CHECK_OK(gqmm__tune_cache_store(path, e, n, msg, sizeof msg));
    gqmm__tune_result_free(&res);

    gqmm_ctx *ctx2 = NULL;
    CHECK_OK(gqmm_ctx_create(&ctx2, NULL));
    CHECK_OK(gqmm__tune_use_cache(ctx2, path, msg, sizeof msg));
    fake.offer_wrong = false;
    for (int r = 0; r < 4; r++) {
      gqmm__qmm_args a = gather_args(4, 128, 64, rows[r], o.dtype);
      CHECK_MSG(gqmm__choose_config(ctx2, &fake_backend, &a) == best_fake(&a), "rows %d", rows[r]);
    }
    gqmm_ctx_destroy(ctx2);
    gqmm_ctx_destroy(ctx);
    remove_cache(path);
  }
}

GQMM_TEST(tuner_quick_mode_and_plain_qmm) {
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  static const int rows[] = {16};
  gqmm__tune_opts o;
  gqmm__tune_opts_default(&o);
  o.gather = false, o.K = 256, o.N = 128;
  o.rows = rows, o.n_rows = 1, o.runs = 9, o.warmup = 0, o.quick = true, o.rotate_bytes = 0;
  o.clock = fake_clock;
  fake.offer_wrong = false;
  gqmm__tune_result res;
  CHECK_OK(gqmm__tune_run(ctx, &fake_backend, &o, &res));
  CHECK(res.n_rec == FAKE_N - 1);
  int pruned = 0;
  for (int i = 0; i < res.n_rec; i++) {
    CHECK_OK(res.rec[i].status);
    CHECK(!strcmp(res.rec[i].key.op, "qmm") && res.rec[i].key.rows == 16 &&
          res.rec[i].rows_total == 16);
    pruned += res.rec[i].pruned;
    if (res.rec[i].pruned) CHECK(res.rec[i].samples == 2);
  }
  CHECK(pruned > 0); /* m64 (cost 130) is more than 1.25x m16_n128 (95) */
  gqmm__qmm_args a;
  memset(&a, 0, sizeof a);
  a.q = (gqmm_quant){4, 64}, a.dtype = o.dtype, a.transpose = 1;
  a.M = 16, a.K = 256, a.N = 128, a.batch = a.x_batches = a.w_batches = 1;
  int b = gqmm__tune_best(&res, &res.rec[0].key);
  CHECK(b >= 0 && res.rec[b].cfg.id == best_fake(&a));
  gqmm__tune_result_free(&res);
  /* bad options fail with a message naming the argument, nothing leaks */
  o.K = 100;
  CHECK(gqmm__tune_run(ctx, &fake_backend, &o, &res) == GQMM_ERR_SHAPE);
  CHECK(strstr(gqmm_last_error(ctx), "K") != NULL);
  o.K = 256, o.n_rows = 0;
  CHECK(gqmm__tune_run(ctx, &fake_backend, &o, &res) == GQMM_ERR_ARG);
  o.n_rows = 1;
  CHECK(gqmm__tune_run(ctx, &gqmm__ref_backend, &o, &res) == GQMM_ERR_UNSUPPORTED);
  gqmm_ctx_destroy(ctx);
}

GQMM_TEST(tuner_json_output_parses_and_carries_every_measurement) {
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  static const int rows[] = {1, 16};
  gqmm__tune_opts o;
  gqmm__tune_opts_default(&o);
  o.E = 8, o.K = 128, o.N = 128, o.top_k = 4, o.rows = rows, o.n_rows = 2, o.runs = 3;
  o.rotate_bytes = 0, o.clock = fake_clock;
  fake.offer_wrong = true;
  gqmm__tune_result res;
  CHECK_OK(gqmm__tune_run(ctx, &fake_backend, &o, &res));
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  CHECK(f);
  gqmm__tune_write_json(f, &fake_backend, &o, &res);
  fclose(f);
  char err[200];
  gqmm__json *doc = gqmm__json_parse(text, len, err, sizeof err);
  free(text);
  CHECK_MSG(doc != NULL, "%s", err);
  const gqmm__json *recs = gqmm__json_get(doc, "records");
  CHECK(recs && recs->kind == GQMM__JSON_ARRAY);
  int n = 0, best = 0, failed = 0;
  for (const gqmm__json *r = recs->child; r; r = r->next, n++) {
    const char *keys[] = {"backend",
                          "device",
                          "op",
                          "E",
                          "K",
                          "N",
                          "M",
                          "rows_per_expert",
                          "bits",
                          "group_size",
                          "dtype",
                          "config",
                          "time_us_median",
                          "time_us_min",
                          "weight_bytes",
                          "weight_GBps",
                          "ceiling_copy_GBps",
                          "ceiling_read_GBps",
                          "ceiling_compute_GMACps",
                          "roofline_GBps",
                          "fraction_of_roofline",
                          "config_fields"};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++)
      CHECK_MSG(gqmm__json_get(r, keys[k]) != NULL, "record %d lacks %s", n, keys[k]);
    const gqmm__json *b = gqmm__json_get(r, "best");
    best += b && b->kind == GQMM__JSON_BOOL && b->number == 1;
    const char *e;
    CHECK(gqmm__json_get_str(r, "error", &e));
    if (e[0]) {
      failed++;
      CHECK(gqmm__json_get(r, "time_us_median")->kind == GQMM__JSON_NULL);
    }
    double frac, gbps, roof;
    if (!e[0]) {
      CHECK(gqmm__json_get_num(r, "fraction_of_roofline", &frac));
      CHECK(gqmm__json_get_num(r, "weight_GBps", &gbps) &&
            gqmm__json_get_num(r, "roofline_GBps", &roof));
      CHECK(fabs(frac - gbps / roof) < 1e-6 * frac);
    }
  }
  CHECK(n == res.n_rec && best == 2 && failed == 2);
  gqmm__json_free(doc);
  gqmm__tune_result_free(&res);
  gqmm_ctx_destroy(ctx);
}

GQMM_TEST(autotune_on_first_use_when_asked) {
  char path[512], msg[400];
  tmp_path(path, sizeof path, "auto");
  remove_cache(path);
  char saved_cache[512] = "", saved_tune[64] = "";
  const char *oc = getenv("GQMM_TUNE_CACHE"), *ot = getenv("GQMM_TUNE");
  if (oc) snprintf(saved_cache, sizeof saved_cache, "%s", oc);
  if (ot) snprintf(saved_tune, sizeof saved_tune, "%s", ot);
  setenv("GQMM_TUNE_CACHE", path, 1);
  setenv("GQMM_TUNE", "auto", 1);
  fake.offer_wrong = false;
  gqmm_ctx *ctx = NULL;
  CHECK_OK(gqmm_ctx_create(&ctx, NULL));
  gqmm__qmm_args a = gather_args(4, 128, 64, 8, GQMM_BF16);
  int calls0 = fake.calls;
  int id = gqmm__choose_config(ctx, &fake_backend, &a);
  CHECK(id >= 0 && id < FAKE_N && id != WRONG_ID && fake_fits(&fake_table[id], &a));
  CHECK(fake.calls > calls0); /* it measured */
  int calls1 = fake.calls;
  CHECK(gqmm__choose_config(ctx, &fake_backend, &a) == id);
  CHECK(fake.calls == calls1); /* and only once */
  CHECK(gqmm_last_error(ctx)[0] == '\0');
  gqmm_ctx_destroy(ctx);
  gqmm__tune_cache c;
  CHECK_OK(gqmm__tune_cache_load(path, &c, msg, sizeof msg));
  CHECK(c.n == 1 && c.entries[0].key.rows == 8 && !strcmp(c.entries[0].key.op, "gather_qmm"));
  gqmm__tune_cache_free(&c);
  if (oc)
    setenv("GQMM_TUNE_CACHE", saved_cache, 1);
  else
    unsetenv("GQMM_TUNE_CACHE");
  if (ot)
    setenv("GQMM_TUNE", saved_tune, 1);
  else
    unsetenv("GQMM_TUNE");
  remove_cache(path);
}
