/*
 * key.c - what a tuning decision is keyed by, and where the cache lives.
 * The rows-per-expert bucket is computed from the call alone (rows over the
 * experts of the weight tensor), so `gqmm tune --rows-per-expert 16` and a
 * real MoE call with 16 rows per expert on average land on the same key.
 */
#include "tune.h"

#include <stdlib.h>
#include <string.h>

int gqmm__rows_bucket(long long rows, long long experts) {
  if (experts < 1) experts = 1;
  long long avg = rows <= 0 ? 1 : (rows + experts - 1) / experts;
  int b = 1;
  while (b < avg && b < 65536)
    b *= 2;
  return b;
}

const char *gqmm__tune_dtype_name(gqmm_dtype t) {
  return t == GQMM_F32 ? "f32" : t == GQMM_F16 ? "f16" : t == GQMM_BF16 ? "bf16" : "?";
}

const char *gqmm__op_name(const gqmm__qmm_args *a) {
  return a->batch > 1 || a->w_batches > 1 ? "gather_qmm" : "qmm";
}

/* Copy at most len-1 bytes, replacing control characters: the key goes into
 * a JSON file and a one-line progress display. */
static void copy_clean(char *dst, size_t len, const char *src) {
  size_t i = 0;
  for (; src && src[i] && i + 1 < len; i++)
    dst[i] = (unsigned char)src[i] < 0x20 ? ' ' : src[i];
  dst[i] = '\0';
}

/* The CPU's model name ("AMD EPYC 7B13"), or "" where /proc/cpuinfo lacks it. */
static void cpu_model(char *buf, size_t len) {
  buf[0] = '\0';
  FILE *f = fopen("/proc/cpuinfo", "r");
  if (!f) return;
  char line[256];
  while (fgets(line, sizeof line, f)) {
    char *colon = strchr(line, ':');
    if (strncmp(line, "model name", 10) || !colon) continue;
    colon += 1 + (colon[1] == ' ');
    colon[strcspn(colon, "\n")] = '\0';
    snprintf(buf, len, "%s", colon);
    break;
  }
  fclose(f);
}

void gqmm__tune_device_key(gqmm_ctx *ctx, const gqmm__backend *be, char *buf, size_t len) {
  char tmp[400] = ""; /* longer than any name + model + features + isa */
  if (be->device_key) {
    be->device_key(ctx, tmp, sizeof tmp);
  } else if (be->kind != GQMM_BACKEND_CPU && be->kind != GQMM_BACKEND_REF) {
    /* The host's CPU says nothing about a GPU; without the hook all devices
     * of this backend share one key (a wrong choice can then cost speed,
     * never results: names are still checked against the configs). */
    snprintf(tmp, sizeof tmp, "%s (no device_key hook)", be->name);
  } else {
    char feat[160], model[96];
    gqmm_cpu_features(feat, sizeof feat);
    cpu_model(model, sizeof model);
    snprintf(tmp, sizeof tmp, "%s %s %s%s%s", be->name, model, feat, ctx->cpu_isa[0] ? " isa=" : "",
             ctx->cpu_isa);
  }
  copy_clean(buf, len, tmp);
}

void gqmm__tune_key_of(const gqmm__backend *be, const char *device, const gqmm__qmm_args *a,
                       gqmm__tune_key *k) {
  memset(k, 0, sizeof *k);
  copy_clean(k->device, sizeof k->device, device);
  copy_clean(k->backend, sizeof k->backend, be->name);
  copy_clean(k->op, sizeof k->op, gqmm__op_name(a));
  copy_clean(k->dtype, sizeof k->dtype, gqmm__tune_dtype_name(a->dtype));
  k->bits = a->q.bits;
  k->group_size = a->q.group_size;
  k->transpose = a->transpose ? 1 : 0;
  k->K = a->K;
  k->N = a->N;
  k->rows = gqmm__rows_bucket(a->M * a->batch, a->w_batches);
}

bool gqmm__tune_key_equal(const gqmm__tune_key *a, const gqmm__tune_key *b) {
  return a->bits == b->bits && a->group_size == b->group_size && a->transpose == b->transpose &&
         a->K == b->K && a->N == b->N && a->rows == b->rows && !strcmp(a->op, b->op) &&
         !strcmp(a->dtype, b->dtype) && !strcmp(a->backend, b->backend) &&
         !strcmp(a->device, b->device);
}

bool gqmm__tune_default_path(char *buf, size_t len) {
  const char *env = getenv("GQMM_TUNE_CACHE");
  int n;
  if (env && env[0])
    n = snprintf(buf, len, "%s", env);
  else if ((env = getenv("XDG_CACHE_HOME")) && env[0] == '/')
    n = snprintf(buf, len, "%s/gqmm/tune.json", env);
  else if ((env = getenv("HOME")) && env[0])
    n = snprintf(buf, len, "%s/.cache/gqmm/tune.json", env);
  else
    return false;
  return n > 0 && (size_t)n < len;
}
