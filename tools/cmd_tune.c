/*
 * cmd_tune.c - `gqmm tune`: measures every tile configuration a backend
 * offers for one (op, shape, dtype, bits, group size) at several rows-per-
 * expert buckets, prints a table beside the same run's memory ceiling,
 * writes every measurement as JSON (--json) and stores the fastest config
 * per bucket in the tuning cache that later calls read automatically.
 */
#include "../src/tune/tune.h"
#include "cli.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_ROWS 16

static void usage(FILE *f) {
  fprintf(f,
          "usage: gqmm tune [options]\n"
          "  --backend auto|cpu|cuda     backend to tune (auto: the first with tile configs)\n"
          "  --op gather_qmm|qmm         gather_qmm over E experts (default) or one matrix\n"
          "  --E N --K N --N N --top-k N shape (default 128, 2816, 1408, 8: the seed's gate_up)\n"
          "  --bits B --group G          quantization (default 4, 64)\n"
          "  --dtype f32|f16|bf16        activations, scales, biases (default bf16)\n"
          "  --rows-per-expert LIST      e.g. 1,4,8,16,32,64 (the default; --quick: 16)\n"
          "  --runs N --warmup N         timed samples (median) and untimed calls per config\n"
          "  --quick                     fewer samples, drop clearly slower configs early\n"
          "  --json FILE                 write every measurement (config, times, GB/s, ceiling)\n"
          "  --cache FILE                cache to update (default GQMM_TUNE_CACHE or\n"
          "                              ~/.cache/gqmm/tune.json)\n"
          "  --no-save                   measure and report only\n");
}

static int parse_rows(const char *s, int *rows, int *n) {
  *n = 0;
  while (*s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || v < 1 || v > 65536 || (v & (v - 1)) || *n >= MAX_ROWS) return -1;
    rows[(*n)++] = (int)v;
    if (*end == ',')
      end++;
    else if (*end)
      return -1;
    s = end;
  }
  return *n ? 0 : -1;
}

static int parse_dtype(const char *s, gqmm_dtype *t) {
  if (!strcmp(s, "f32"))
    *t = GQMM_F32;
  else if (!strcmp(s, "f16"))
    *t = GQMM_F16;
  else if (!strcmp(s, "bf16"))
    *t = GQMM_BF16;
  else
    return -1;
  return 0;
}

/* The backend to tune: the named kind, or the first that has configs and
 * can run this op (auto). */
static const gqmm__backend *find_backend(gqmm_ctx *ctx, gqmm_backend_kind kind,
                                         const gqmm__tune_opts *o) {
  for (const gqmm__backend *const *b = gqmm__backends(); *b; b++) {
    const gqmm__backend *be = *b;
    if (!be->configs || (kind != GQMM_BACKEND_AUTO && be->kind != kind)) continue;
    gqmm__qmm_args a = {.dtype = o->dtype,
                        .q = o->q,
                        .transpose = 1,
                        .M = 1,
                        .N = o->N,
                        .K = o->K,
                        .batch = 1,
                        .x_batches = 1,
                        .w_batches = 1,
                        .device =
                            be->kind == GQMM_BACKEND_CUDA ? GQMM_DEVICE_CUDA : GQMM_DEVICE_CPU};
    if (be->supports_qmm(ctx, &a)) return be;
  }
  return NULL;
}

typedef struct {
  const char *backend;
  double last_print;
  bool tty;
} progress_state;


/* One status line on stderr: redrawn in place on a terminal, else at most
 * every 2 s (logs stay short). */
static void on_progress(void *user, const gqmm__tune_progress *p) {
  progress_state *s = user;
  double now = gqmm__now_s();
  bool last = p->done == p->total;
  if (!s->tty && !last && now - s->last_print < 2.0 && p->done > 0) return;
  s->last_print = now;
  char eta[32] = "?";
  if (isfinite(p->eta_s)) snprintf(eta, sizeof eta, "%.0f s", p->eta_s);
  if (last)
    fprintf(stderr, "%s[tune] %s: %d measurements in %.1f s\n", s->tty ? "\r\033[K" : "",
            s->backend, p->total, p->elapsed_s);
  else
    fprintf(stderr, "%s[tune] %s: config %d/%d  rows/expert %d  %-28s elapsed %.1f s  ETA %s%s",
            s->tty ? "\r\033[K" : "", s->backend, p->done + 1, p->total, p->rows, p->config,
            p->elapsed_s, eta, s->tty ? "" : "\n");
  fflush(stderr);
}

int gqmm_cmd_tune(int argc, char **argv) {
  gqmm_backend_kind kind = GQMM_BACKEND_AUTO;
  gqmm__tune_opts o;
  gqmm__tune_opts_default(&o);
  int rows[MAX_ROWS], n_rows = 0, runs = -1, warmup = -1;
  const char *json = NULL, *cache = NULL, *backend_arg = "auto";
  bool save = true;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    long long *dims[] = {&o.E, &o.K, &o.N, &o.top_k};
    const char *dim_names[] = {"--E", "--K", "--N", "--top-k"};
    int dim = -1;
    for (int d = 0; d < 4; d++)
      if (!strcmp(a, dim_names[d])) dim = d;
    bool ok = true;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--quick"))
      o.quick = true;
    else if (!strcmp(a, "--no-save"))
      save = false;
    else if (!v)
      ok = false;
    else if (dim >= 0)
      ok = (*dims[dim] = atoll(v)) > 0, i++;
    else if (!strcmp(a, "--backend"))
      ok = !gqmm_cli_backend(v, &kind), backend_arg = v, i++;
    else if (!strcmp(a, "--op")) {
      ok = !strcmp(v, "qmm") || !strcmp(v, "gather_qmm");
      o.gather = strcmp(v, "qmm") != 0, i++;
    } else if (!strcmp(a, "--bits"))
      o.q.bits = atoi(v), i++;
    else if (!strcmp(a, "--group"))
      o.q.group_size = atoi(v), i++;
    else if (!strcmp(a, "--dtype"))
      ok = !parse_dtype(v, &o.dtype), i++;
    else if (!strcmp(a, "--rows-per-expert"))
      ok = !parse_rows(v, rows, &n_rows), i++;
    else if (!strcmp(a, "--runs"))
      ok = (runs = atoi(v)) >= 1 && runs <= 10000, i++;
    else if (!strcmp(a, "--warmup"))
      ok = (warmup = atoi(v)) >= 0 && warmup <= 1000, i++;
    else if (!strcmp(a, "--json"))
      json = v, i++;
    else if (!strcmp(a, "--cache"))
      cache = v, i++;
    else
      ok = false;
    if (!ok) {
      fprintf(stderr, "gqmm tune: bad option or value: %s%s%s\n", a, v ? " " : "", v ? v : "");
      usage(stderr);
      return 2;
    }
  }
  if (n_rows)
    o.rows = rows, o.n_rows = n_rows;
  else if (o.quick) {
    static const int quick_rows[] = {16};
    o.rows = quick_rows, o.n_rows = 1;
  }
  /* quick: the checked first call already warms up */
  o.runs = runs > 0 ? runs : o.quick ? 3 : 20;
  o.warmup = warmup >= 0 ? warmup : o.quick ? 0 : 2;
  gqmm_ctx *ctx = gqmm_cli_ctx(kind);
  if (!ctx) return 1;
  int rc = 1;
  gqmm__tune_result res = {0};
  const gqmm__backend *be = find_backend(ctx, kind, &o);
  if (!be) {
    fprintf(stderr,
            "gqmm tune: no %s backend with tile configurations can run this op here "
            "(the reference backend has none)\n",
            kind == GQMM_BACKEND_AUTO ? "compiled-in" : backend_arg);
    goto done;
  }
  if (be->sync) o.min_sample_s = 1e-3; /* time >= 1 ms of back-to-back launches per sample */
  progress_state ps = {be->name, 0, isatty(2) != 0};
  o.progress = on_progress;
  o.user = &ps;
  if (gqmm__tune_run(ctx, be, &o, &res)) {
    fprintf(stderr, "gqmm tune: %s\n", gqmm_last_error(ctx));
    goto done;
  }
  gqmm__tune_print_table(stdout, &res);
  if (json) {
    FILE *f = fopen(json, "w");
    int bad = !f;
    if (f) {
      gqmm__tune_write_json(f, be, &o, &res);
      bad = ferror(f) != 0;
      bad |= fclose(f) != 0;
    }
    if (bad) {
      fprintf(stderr, "gqmm tune: cannot write %s\n", json);
      goto done;
    }
  }
  if (save) {
    gqmm__tune_entry entries[MAX_ROWS];
    int n = gqmm__tune_entries(&res, entries, MAX_ROWS);
    char path[1024], msg[400] = "";
    if (cache)
      snprintf(path, sizeof path, "%s", cache);
    else if (!gqmm__tune_default_path(path, sizeof path)) {
      fprintf(stderr, "gqmm tune: no cache path (set GQMM_TUNE_CACHE or HOME, or --cache)\n");
      goto done;
    }
    if (n && gqmm__tune_cache_store(path, entries, n, msg, sizeof msg)) {
      fprintf(stderr, "gqmm tune: %s\n", msg);
      goto done;
    }
    if (msg[0]) fprintf(stderr, "gqmm tune: note: %s\n", msg);
    printf("saved %d choice%s to %s\n", n, n == 1 ? "" : "s", path);
  }
  rc = 0;
done:
  gqmm__tune_result_free(&res);
  gqmm_ctx_destroy(ctx);
  return rc;
}
