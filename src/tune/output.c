/*
 * output.c - what `gqmm tune` shows and writes: a table on stdout and one
 * JSON document with every measurement (bench/tune_report.py reads it).
 */
#include "json.h"
#include "tune.h"

#include <math.h>
#include <string.h>

static void kv_str(FILE *f, const char *k, const char *v, bool comma) {
  fprintf(f, "%s\"%s\": ", comma ? ", " : "", k);
  gqmm__json_write_str(f, v);
}

static void kv_num(FILE *f, const char *k, double v) {
  fprintf(f, ", \"%s\": ", k);
  gqmm__json_write_num(f, v);
}

static double positive_or_nan(double v) {
  return v > 0 ? v : NAN;
}

static void write_record(FILE *f, const gqmm__backend *be, const gqmm__tune_opts *o,
                         const gqmm__tune_result *res, const gqmm__tune_record *r) {
  const gqmm__ceilings *c = &res->ceilings;
  const bool ok = r->status == GQMM_OK;
  fputs("  {", f);
  kv_str(f, "backend", be->name, false);
  kv_str(f, "device", res->device, true);
  kv_str(f, "op", r->key.op, true);
  kv_num(f, "E", o->gather ? (double)o->E : 1);
  kv_num(f, "K", (double)o->K);
  kv_num(f, "N", (double)o->N);
  kv_num(f, "M", r->rows);
  kv_num(f, "rows_per_expert", r->rows);
  kv_num(f, "rows_bucket", r->key.rows);
  kv_num(f, "rows_total", (double)r->rows_total);
  kv_num(f, "experts_used", r->experts_used);
  kv_num(f, "bits", o->q.bits);
  kv_num(f, "group_size", o->q.group_size);
  kv_str(f, "dtype", r->key.dtype, true);
  kv_str(f, "config", r->cfg.name, true);
  fprintf(f,
          ", \"config_fields\": {\"tile_m\": %d, \"tile_n\": %d, \"tile_k\": %d, \"threads\": %d, "
          "\"stages\": %d, \"split_k\": %d}",
          r->cfg.tile_m, r->cfg.tile_n, r->cfg.tile_k, r->cfg.threads, r->cfg.stages,
          r->cfg.split_k);
  kv_num(f, "time_us_median", ok ? r->time_us_median : NAN);
  kv_num(f, "time_us_min", ok ? r->time_us_min : NAN);
  kv_num(f, "samples", r->samples);
  kv_num(f, "weight_bytes", r->weight_bytes);
  kv_num(f, "weight_GBps", ok ? r->weight_GBps : NAN);
  kv_num(f, "ceiling_copy_GBps", positive_or_nan(c->copy_GBps));
  kv_num(f, "ceiling_read_GBps", positive_or_nan(c->read_GBps));
  kv_num(f, "ceiling_compute_GMACps", positive_or_nan(c->compute_GMACps));
  kv_num(f, "roofline_GBps", positive_or_nan(r->roofline_GBps));
  kv_num(f, "fraction_of_roofline", ok ? r->fraction : NAN);
  fprintf(f, ", \"pruned\": %s, \"best\": %s, \"heuristic\": %s", r->pruned ? "true" : "false",
          r->best ? "true" : "false", r->heuristic ? "true" : "false");
  kv_str(f, "error", ok ? "" : r->error, true);
  fputc('}', f);
}

void gqmm__tune_write_json(FILE *f, const gqmm__backend *be, const gqmm__tune_opts *o,
                           const gqmm__tune_result *res) {
  const gqmm__ceilings *c = &res->ceilings;
  fputc('{', f);
  kv_str(f, "tool", "gqmm tune", false);
  kv_str(f, "version", gqmm_version(), true);
  kv_str(f, "backend", be->name, true);
  kv_str(f, "device", res->device, true);
  fputs(", \"ceilings\": {", f);
  kv_str(f, "device_name", c->device_name, false);
  kv_num(f, "copy_GBps", positive_or_nan(c->copy_GBps));
  kv_num(f, "read_GBps", positive_or_nan(c->read_GBps));
  kv_num(f, "compute_GMACps", positive_or_nan(c->compute_GMACps));
  kv_str(f, "compute_what", c->compute_what, true);
  fprintf(f, "}, \"quick\": %s, \"runs\": %d, \"records\": [\n", o->quick ? "true" : "false",
          o->runs);
  for (int i = 0; i < res->n_rec; i++) {
    write_record(f, be, o, res, &res->rec[i]);
    fputs(i + 1 < res->n_rec ? ",\n" : "\n", f);
  }
  fputs("]}\n", f);
}

void gqmm__tune_print_table(FILE *f, const gqmm__tune_result *res) {
  const gqmm__ceilings *c = &res->ceilings;
  fprintf(f, "device: %s\n", res->device);
  if (c->copy_GBps > 0 || c->read_GBps > 0)
    fprintf(f, "same-run ceilings: copy %.1f GB/s, read %.1f GB/s, compute %.1f GMAC/s (%s)\n",
            c->copy_GBps, c->read_GBps, c->compute_GMACps, c->compute_what);
  else
    fprintf(f, "same-run ceilings: not measured by this backend (fractions omitted)\n");
  fprintf(f, "%5s %-30s %4s %4s %4s %4s %3s %3s %10s %10s %9s %6s  %s\n", "rows", "config", "tm",
          "tn", "tk", "thr", "stg", "sk", "median_us", "min_us", "GB/s", "frac", "note");
  for (int i = 0; i < res->n_rec; i++) {
    const gqmm__tune_record *r = &res->rec[i];
    char note[200];
    snprintf(note, sizeof note, "%s%s%s%s", r->best ? "BEST " : "",
             r->heuristic ? "heuristic " : "", r->pruned ? "pruned(slow) " : "",
             r->status ? r->error : "");
    fprintf(f, "%5d %-30.30s %4d %4d %4d %4d %3d %3d ", r->rows, r->cfg.name, r->cfg.tile_m,
            r->cfg.tile_n, r->cfg.tile_k, r->cfg.threads, r->cfg.stages, r->cfg.split_k);
    if (r->status)
      fprintf(f, "%10s %10s %9s %6s  %s\n", "-", "-", "-", "-", note);
    else
      fprintf(f, "%10.2f %10.2f %9.2f %6.3f  %s\n", r->time_us_median, r->time_us_min,
              r->weight_GBps, r->fraction, note);
  }
}
