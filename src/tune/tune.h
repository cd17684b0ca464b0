/*
 * tune.h - tile-configuration tuning: the key of a decision, the persistent
 * JSON cache, the per-context lookup, the built-in heuristic and the tuner
 * that measures configurations (used by `gqmm tune`).
 *
 * A decision is keyed by (device key, backend, op, dtype, bits, group size,
 * transpose, K, N, rows-per-expert bucket) and stores a config NAME, never an
 * id: names are stable across builds, ids are not, and a name is mapped back
 * to an id only through the backend's own list of configurations valid for
 * the call, so a stale or hostile cache can at worst cost speed.
 */
#ifndef GQMM_TUNE_H
#define GQMM_TUNE_H

#include "internal.h"

#include <stdio.h>

#define GQMM__TUNE_MAX_CONFIGS 256   /* configs a backend may offer for one call */
#define GQMM__TUNE_MAX_ENTRIES 10000 /* entries a cache file may hold */
#define GQMM__TUNE_MAX_FILE (8u << 20)
#define GQMM__TUNE_FORMAT "gqmm-tune-cache"
#define GQMM__TUNE_FORMAT_VERSION 1

typedef struct {
  char device[128]; /* the backend's device key: model + driver/ISA */
  char backend[16]; /* "cpu", "cuda" ... */
  char op[16];      /* "gather_qmm" or "qmm" */
  char dtype[8];    /* "f32", "f16", "bf16" */
  int bits, group_size, transpose;
  long long K, N;
  int rows; /* rows-per-expert bucket, a power of two */
} gqmm__tune_key;

typedef struct {
  gqmm__tune_key key;
  char lib[16];                          /* library version that measured it (stale if different) */
  char config[48];                       /* config name */
  double time_us, weight_GBps, fraction; /* what the choice achieved (informative) */
} gqmm__tune_entry;

typedef struct {
  gqmm__tune_entry *entries;
  int n, cap;
} gqmm__tune_cache;

/* ---- keys (key.c) -------------------------------------------------------- */

/* Smallest power of two >= ceil(rows / experts), at least 1, at most 65536. */
int gqmm__rows_bucket(long long rows, long long experts);
/* "f32", "f16", "bf16" (the names the cache and the CLI use). */
const char *gqmm__tune_dtype_name(gqmm_dtype t);
/* "gather_qmm" when the call has several batches or experts, else "qmm". */
const char *gqmm__op_name(const gqmm__qmm_args *a);
/* The device key of a backend: its device_key hook, else its name, the CPU
 * features and the ISA the context asks for. */
void gqmm__tune_device_key(gqmm_ctx *ctx, const gqmm__backend *be, char *buf, size_t len);
/* The key of a call (device key given, it is memoized per context). */
void gqmm__tune_key_of(const gqmm__backend *be, const char *device, const gqmm__qmm_args *a,
                       gqmm__tune_key *k);
bool gqmm__tune_key_equal(const gqmm__tune_key *a, const gqmm__tune_key *b);
/* GQMM_TUNE_CACHE, else $XDG_CACHE_HOME/gqmm/tune.json, else
 * $HOME/.cache/gqmm/tune.json; false if none can be formed. */
bool gqmm__tune_default_path(char *buf, size_t len);

/* ---- the cache file (cache.c) -------------------------------------------- */

/* Load a cache file. A missing file is an empty cache (GQMM_OK). A file that
 * cannot be parsed, has the wrong format/version or is too large leaves the
 * cache empty and returns GQMM_ERR_FORMAT with the reason in msg; entries
 * that fail validation are skipped and counted in msg (GQMM_OK). */
int gqmm__tune_cache_load(const char *path, gqmm__tune_cache *c, char *msg, size_t msglen);
/* Merge `add` into the file under an exclusive lock (path + ".lock"), write a
 * temporary file and rename it over the old one, so a reader never sees a
 * half-written file and concurrent writers keep each other's entries. */
int gqmm__tune_cache_store(const char *path, const gqmm__tune_entry *add, int n, char *msg,
                           size_t msglen);
/* The entry for key measured by this library version, or NULL. */
const gqmm__tune_entry *gqmm__tune_cache_find(const gqmm__tune_cache *c, const gqmm__tune_key *k);
/* The entry for k, else one for the same call one rows bucket away (half or
 * double; the larger if both): buckets nobody tuned borrow a neighbour's
 * choice before falling back to the heuristic. */
const gqmm__tune_entry *gqmm__tune_cache_find_near(const gqmm__tune_cache *c,
                                                   const gqmm__tune_key *k);
/* Replace the entry with the same key and library version, or append. */
int gqmm__tune_cache_put(gqmm__tune_cache *c, const gqmm__tune_entry *e);
void gqmm__tune_cache_free(gqmm__tune_cache *c);
/* Checks an entry's fields (lengths, ranges); message names the field. */
bool gqmm__tune_entry_valid(const gqmm__tune_entry *e, char *why, size_t whylen);

/* ---- per-context lookup (choose.c) --------------------------------------- */

/* Use the cache file at path for this context (NULL: the default path),
 * replacing whatever was loaded. Returns the load status; msg as for load. */
int gqmm__tune_use_cache(gqmm_ctx *ctx, const char *path, char *msg, size_t msglen);
/* The configuration to run: gqmm__choose_config, else the heuristic over the
 * backend's configs, else -1 (the backend has none for these args). */
int gqmm__pick_config(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__qmm_args *a);

/* ---- heuristic (heuristic.c) --------------------------------------------- */

/*
 * A good default among cfgs[0, n) for these args without measuring: the id
 * of one of them, or -1 if n == 0. parallel_units is how many tiles run at
 * once (SMs x CTAs per SM, or CPU threads); 0 if unknown.
 */
int gqmm__tune_heuristic(const gqmm__tile_config *cfgs, int n, const gqmm__qmm_args *a,
                         int parallel_units);

/* ---- the tuner (tuner.c, inputs.c) --------------------------------------- */

typedef struct {
  int done, total;    /* measurements finished / planned */
  int rows;           /* rows-per-expert bucket being measured */
  const char *config; /* config name being measured */
  double elapsed_s, eta_s;
} gqmm__tune_progress;

typedef struct {
  bool gather; /* gather_qmm over E experts (else qmm on one matrix) */
  long long E, K, N, top_k;
  gqmm_quant q;
  gqmm_dtype dtype;
  const int *rows; /* rows-per-expert values to measure (powers of two) */
  int n_rows;
  int runs, warmup;    /* timed samples per config (median), untimed calls first */
  double min_sample_s; /* a sample repeats the call until it lasts this long */
  bool quick;          /* stop timing a config once it is clearly slower than the best */
  double rotate_bytes; /* weight copies rotated so that together they exceed this */
  unsigned long long seed;
  void (*progress)(void *user, const gqmm__tune_progress *p);
  double (*clock)(void *user); /* seconds; NULL: CLOCK_MONOTONIC (tests inject one) */
  void *user;
} gqmm__tune_opts;

typedef struct {
  gqmm__tile_config cfg;
  gqmm__tune_key key;   /* what a later call looks this measurement up by */
  int rows;             /* rows per expert asked for (key.rows is its bucket) */
  long long rows_total; /* rows in the call */
  int experts_used;
  int samples;
  double time_us_median, time_us_min;
  double weight_bytes, weight_GBps, roofline_GBps, fraction;
  int status;      /* GQMM_OK, or why this config has no figure: */
  char error[160]; /* the backend's message when status != GQMM_OK */
  bool pruned;     /* quick mode stopped it after a few samples */
  bool best;       /* the fastest fully measured config of its key */
  bool heuristic;  /* what gqmm__tune_heuristic picks for its key */
} gqmm__tune_record;

typedef struct {
  char device[128];
  gqmm__ceilings ceilings; /* zero if the backend cannot measure them */
  gqmm__tune_record *rec;
  int n_rec;
} gqmm__tune_result;

/* Defaults for the seed shape (gather_qmm E=128 K=2816 N=1408 4-bit gs 64 bf16). */
void gqmm__tune_opts_default(gqmm__tune_opts *o);
/* Measure every config the backend offers at every rows value. */
int gqmm__tune_run(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__tune_opts *o,
                   gqmm__tune_result *res);
/* Index in res->rec of the fastest fully measured record with this key, or -1. */
int gqmm__tune_best(const gqmm__tune_result *res, const gqmm__tune_key *k);
/* The cache entries of a run: one per key, its fastest config. */
int gqmm__tune_entries(const gqmm__tune_result *res, gqmm__tune_entry *out, int max);
void gqmm__tune_result_free(gqmm__tune_result *res);

/* ---- output (output.c) --------------------------------------------------- */

/* A human table of every measurement beside the same run's ceilings. */
void gqmm__tune_print_table(FILE *f, const gqmm__tune_result *res);
/* Every measurement as one JSON document (DESIGN.md section 5 record fields,
 * plus the config's fields, best/heuristic marks and errors). */
void gqmm__tune_write_json(FILE *f, const gqmm__backend *be, const gqmm__tune_opts *o,
                           const gqmm__tune_result *res);

#endif
