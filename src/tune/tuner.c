/*
 * tuner.c - measures every tile configuration a backend offers at each
 * rows-per-expert bucket (what `gqmm tune` runs).
 *
 * Per (bucket, config): one poisoned warm-up call whose output must agree
 * with the first config's (configs change speed, never results: one that
 * disagrees is reported and never chosen), more warm-up, then `runs` timed
 * samples, each rotating through the input copies and ending with the
 * backend's sync, so a host clock times finished work. A sample repeats the
 * call until it lasts min_sample_s, so a 50 us GPU kernel is not timed
 * against its own launch overhead. The figure is the median sample.
 */
#include "problem.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_REPS 1000
#define QUICK_MIN_SAMPLES 2
#define QUICK_SLOWER 1.25 /* quick mode drops a config this much slower than the best */

void gqmm__tune_opts_default(gqmm__tune_opts *o) {
  static const int rows[] = {1, 4, 8, 16, 32, 64};
  memset(o, 0, sizeof *o);
  o->gather = true;
  o->E = 128, o->K = 2816, o->N = 1408, o->top_k = 8;
  o->q = (gqmm_quant){4, 64};
  o->dtype = GQMM_BF16;
  o->rows = rows;
  o->n_rows = 6;
  o->runs = 20;
  o->warmup = 2;
  o->rotate_bytes = 512e6; /* > 2x the largest last-level cache gqmm targets (H100 L2 50 MB) */
}

typedef struct {
  gqmm_ctx *ctx;
  const gqmm__backend *be;
  const gqmm__tune_opts *o;
  gqmm__tune_problem *p;
  double t_start;
  int copy; /* rotation counter */
} tuner;

static double now_s(const tuner *t) {
  if (t->o->clock) return t->o->clock(t->o->user);
  return gqmm__now_s();
}

static int call(tuner *t, int id) {
  gqmm__problem_use_copy(t->p, t->copy++);
  return t->be->qmm_config(t->ctx, &t->p->a, id);
}

static int sync_dev(tuner *t) {
  return t->be->sync ? t->be->sync(t->ctx) : GQMM_OK;
}

/* Time reps calls back to back; seconds per call. */
static int time_calls(tuner *t, int id, int reps, double *per_call) {
  int st = sync_dev(t);
  double t0 = now_s(t);
  for (int r = 0; r < reps && !st; r++)
    st = call(t, id);
  if (!st) st = sync_dev(t);
  *per_call = (now_s(t) - t0) / reps;
  return st;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* n elements from src[off] as float: a loop per dtype, since the per-element
 * switch of gqmm__load_f costs more than checking 10^7 outputs should. */
static void block_to_f32(const void *src, gqmm_dtype t, int64_t off, int n, float *dst) {
  if (t == GQMM_F32) {
    memcpy(dst, (const float *)src + off, (size_t)n * sizeof(float));
  } else if (t == GQMM_BF16) {
    const uint16_t *h = (const uint16_t *)src + off;
    for (int i = 0; i < n; i++) {
      uint32_t u = (uint32_t)h[i] << 16;
      memcpy(&dst[i], &u, sizeof u);
    }
  } else {
    const uint16_t *h = (const uint16_t *)src + off;
    for (int i = 0; i < n; i++)
      dst[i] = gqmm_f16_to_f32(h[i]);
  }
}

/* Relative L2 distance of two outputs (b may equal a: then it only looks for
 * NaN); infinite if either holds a NaN. Identical bytes are checked first. */
static double rel_diff(const void *a, const void *b, gqmm_dtype t, int64_t n) {
  enum { BLOCK = 4096 };
  float x[BLOCK], y[BLOCK];
  const bool same = a == b || !memcmp(a, b, (size_t)n * gqmm_dtype_size(t));
  double num = 0, den = 0;
  for (int64_t off = 0; off < n; off += BLOCK) {
    int m = n - off < BLOCK ? (int)(n - off) : BLOCK;
    block_to_f32(a, t, off, m, x);
    if (!same) block_to_f32(b, t, off, m, y);
    for (int i = 0; i < m; i++) {
      float yi = same ? x[i] : y[i];
      if (isnan(x[i]) || isnan(yi)) return INFINITY;
      num += ((double)x[i] - yi) * ((double)x[i] - yi);
      den += (double)yi * yi;
    }
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Outputs of two configs may differ by rounding (another summation order,
 * one more rounding to the output dtype), never by more. */
static double tolerance(gqmm_dtype t) {
  return t == GQMM_F32 ? 1e-4 : t == GQMM_F16 ? 4e-3 : 3e-2;
}

/* One (bucket, config) measurement into rec. `first` holds the output of the
 * first config that ran (NULL until one did); best_us is this bucket's best
 * median so far (quick mode compares against it). */
static void measure(tuner *t, const gqmm__tile_config *c, void **first, void *scratch,
                    double best_us, gqmm__tune_record *rec) {
  const gqmm__tune_opts *o = t->o;
  gqmm__tune_problem *p = t->p;
  const int64_t n_out = (int64_t)(p->out_bytes / gqmm_dtype_size(o->dtype));
  double one;
  int st = gqmm__problem_poison(t->ctx, p);
  t->copy = 0; /* the checked call runs on copy 0 for every config: same inputs */
  if (!st) st = time_calls(t, c->id, 1, &one);
  if (!st) st = gqmm__problem_read_out(t->ctx, p, scratch);
  if (!st && *first) {
    double d = rel_diff(scratch, *first, o->dtype, n_out);
    if (!(d <= tolerance(o->dtype))) {
      st = gqmm__fail(t->ctx, GQMM_ERR_BACKEND,
                      "config %s disagrees with the first config (relative difference %.3g)",
                      c->name, d);
    }
  } else if (!st) {
    if (rel_diff(scratch, scratch, o->dtype, n_out) != 0)
      st = gqmm__fail(t->ctx, GQMM_ERR_BACKEND, "config %s left NaN in the output", c->name);
    else if ((*first = malloc(p->out_bytes ? p->out_bytes : 1)))
      memcpy(*first, scratch, p->out_bytes);
  }
  for (int w = 0; w < o->warmup && !st; w++)
    st = time_calls(t, c->id, 1, &one);
  rec->status = st;
  if (st) return;
  int reps = 1;
  if (o->min_sample_s > 0 && one < o->min_sample_s)
    reps = one > 0 ? (int)fmin(MAX_REPS, ceil(o->min_sample_s / one)) : MAX_REPS;
  const int runs = o->runs > 0 ? o->runs : 1;
  double *samples = malloc((size_t)runs * sizeof *samples);
  if (!samples) {
    rec->status = gqmm__fail(t->ctx, GQMM_ERR_NOMEM, "tune: out of memory");
    return;
  }
  int n = 0;
  double lo = INFINITY;
  while (n < runs && !st) {
    st = time_calls(t, c->id, reps, &samples[n]);
    lo = fmin(lo, samples[n++]);
    if (o->quick && n >= QUICK_MIN_SAMPLES && lo * 1e6 > QUICK_SLOWER * best_us) {
      rec->pruned = true;
      break;
    }
  }
  rec->status = st;
  if (!st) {
    qsort(samples, (size_t)n, sizeof *samples, cmp_double);
    rec->samples = n;
    rec->time_us_median =
        1e6 * (n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2]));
    rec->time_us_min = 1e6 * samples[0];
  }
  free(samples);
}

/* Fill the derived figures of a record (bytes, GB/s, roofline, fraction). */
static void derive(const gqmm__tune_problem *p, const gqmm__ceilings *ce, gqmm__tune_record *r) {
  r->weight_bytes = p->expert_bytes * r->experts_used;
  if (r->status || !(r->time_us_median > 0)) return;
  r->weight_GBps = r->weight_bytes / (r->time_us_median * 1e3);
  const double mem = fmax(ce->copy_GBps, ce->read_GBps);
  const double macs = (double)r->rows_total * (double)p->a.K * (double)p->a.N;
  double roof = mem;
  if (ce->compute_GMACps > 0 && macs > 0) {
    double compute_bound = ce->compute_GMACps * r->weight_bytes / macs;
    roof = roof > 0 ? fmin(roof, compute_bound) : compute_bound;
  }
  r->roofline_GBps = roof;
  r->fraction = roof > 0 ? r->weight_GBps / roof : NAN;
}

int gqmm__tune_run(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__tune_opts *o,
                   gqmm__tune_result *res) {
  memset(res, 0, sizeof *res);
  if (!be->configs || !be->qmm_config)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED, "backend %s has no tile configurations to tune",
                      be->name);
  if (o->n_rows < 1 || !o->rows)
    return gqmm__fail(ctx, GQMM_ERR_ARG, "rows-per-expert: the list is empty");
  gqmm__tune_problem p;
  int st = gqmm__problem_init(ctx, be, o, &p);
  if (st) return st;
  tuner t = {ctx, be, o, &p, 0, 0};
  gqmm__tune_device_key(ctx, be, res->device, sizeof res->device);
  if (be->ceilings && (st = be->ceilings(ctx, &res->ceilings))) goto done;
  gqmm__tile_config *cfgs = malloc(GQMM__TUNE_MAX_CONFIGS * sizeof *cfgs);
  int *counts = calloc((size_t)o->n_rows, sizeof *counts);
  if (!cfgs || !counts) {
    st = gqmm__fail(ctx, GQMM_ERR_NOMEM, "tune: out of memory");
    goto free_lists;
  }
  /* Plan first (configs depend on the call), so progress knows the total. */
  int total = 0;
  for (int r = 0; r < o->n_rows && !st; r++) {
    if (!(st = gqmm__problem_set_rows(ctx, o, o->rows[r], &p))) {
      int n = be->configs(ctx, &p.a, cfgs, GQMM__TUNE_MAX_CONFIGS);
      counts[r] = n < 0 ? 0 : n > GQMM__TUNE_MAX_CONFIGS ? GQMM__TUNE_MAX_CONFIGS : n;
      total += counts[r];
    }
  }
  if (!st && !(res->rec = calloc((size_t)(total ? total : 1), sizeof *res->rec)))
    st = gqmm__fail(ctx, GQMM_ERR_NOMEM, "tune: out of memory");
  t.t_start = now_s(&t);
  for (int r = 0; r < o->n_rows && !st; r++) {
    if ((st = gqmm__problem_set_rows(ctx, o, o->rows[r], &p))) break;
    int n = be->configs(ctx, &p.a, cfgs, GQMM__TUNE_MAX_CONFIGS);
    n = n < 0 ? 0 : n > counts[r] ? counts[r] : n; /* never more than planned */
    void *first = NULL, *scratch = malloc(p.out_bytes ? p.out_bytes : 1);
    if (!scratch) st = gqmm__fail(ctx, GQMM_ERR_NOMEM, "tune: out of memory");
    double best_us = INFINITY;
    for (int i = 0; i < n && !st; i++) {
      if (o->progress) {
        double el = now_s(&t) - t.t_start;
        int done = res->n_rec;
        gqmm__tune_progress pr = {done,         total, o->rows[r],
                                  cfgs[i].name, el,    done ? el / done * (total - done) : NAN};
        o->progress(o->user, &pr);
      }
      gqmm__tune_record *rec = &res->rec[res->n_rec++];
      rec->cfg = cfgs[i];
      rec->rows = o->rows[r];
      gqmm__tune_key_of(be, res->device, &p.a, &rec->key);
      rec->rows_total = p.a.M * p.a.batch;
      rec->experts_used = p.experts_used;
      measure(&t, &cfgs[i], &first, scratch, best_us, rec);
      derive(&p, &res->ceilings, rec);
      if (!rec->status && !rec->pruned) best_us = fmin(best_us, rec->time_us_median);
      if (rec->status) snprintf(rec->error, sizeof rec->error, "%s", gqmm_last_error(ctx));
      gqmm__clear_error(ctx); /* a failing config is recorded, not fatal */
    }
    /* mark what the heuristic would have picked for this call */
    int h = gqmm__tune_heuristic(cfgs, n, &p.a, 0);
    for (int i = res->n_rec - n; i < res->n_rec; i++)
      res->rec[i].heuristic = res->rec[i].cfg.id == h;
    free(first);
    free(scratch);
  }
  for (int i = 0; i < res->n_rec; i++)
    res->rec[i].best = gqmm__tune_best(res, &res->rec[i].key) == i;
  if (!st && o->progress) {
    double el = now_s(&t) - t.t_start;
    gqmm__tune_progress pr = {res->n_rec, total, 0, "", el, 0};
    o->progress(o->user, &pr);
  }
free_lists:
  free(cfgs);
  free(counts);
done:
  gqmm__problem_free(ctx, &p);
  if (st) gqmm__tune_result_free(res);
  return st;
}

int gqmm__tune_best(const gqmm__tune_result *res, const gqmm__tune_key *k) {
  int best = -1;
  for (int i = 0; i < res->n_rec; i++) {
    const gqmm__tune_record *r = &res->rec[i];
    if (r->status || r->pruned || !(r->time_us_median > 0) || !gqmm__tune_key_equal(&r->key, k))
      continue;
    if (best < 0 || r->time_us_median < res->rec[best].time_us_median) best = i;
  }
  return best;
}

int gqmm__tune_entries(const gqmm__tune_result *res, gqmm__tune_entry *out, int max) {
  int n = 0;
  for (int i = 0; i < res->n_rec && n < max; i++) {
    bool seen = false;
    for (int j = 0; j < n && !seen; j++)
      seen = gqmm__tune_key_equal(&out[j].key, &res->rec[i].key);
    int b = seen ? -1 : gqmm__tune_best(res, &res->rec[i].key);
    if (b < 0) continue;
    const gqmm__tune_record *rec = &res->rec[b];
    gqmm__tune_entry *e = &out[n++];
    memset(e, 0, sizeof *e);
    e->key = rec->key;
    snprintf(e->lib, sizeof e->lib, "%s", gqmm_version());
    snprintf(e->config, sizeof e->config, "%s", rec->cfg.name);
    e->time_us = rec->time_us_median;
    e->weight_GBps = rec->weight_GBps;
    e->fraction = rec->fraction;
  }
  return n;
}

void gqmm__tune_result_free(gqmm__tune_result *res) {
  free(res->rec);
  res->rec = NULL;
  res->n_rec = 0;
}
