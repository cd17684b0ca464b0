/*
 * problem.c - builds the tuner's inputs (see problem.h). Values are random
 * and never zero: a kernel that skips work on zeros, or an output that was
 * never written, cannot look fast or right by accident.
 */
#include "problem.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BYTES 48e9 /* refuse shapes whose weights alone would not fit a GPU */

static uint64_t next_u64(uint64_t *s) { /* splitmix64 */
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Uniform in (-1, 1), never 0. */
static float next_signed(uint64_t *s) {
  return ((float)(next_u64(s) >> 40) + 0.5f) / 8388608.0f - 1.0f;
}

static void fill_floats(void *buf, gqmm_dtype t, int64_t n, uint64_t *s, float scale, float add) {
  for (int64_t i = 0; i < n; i++)
    gqmm__store_f(buf, t, i, next_signed(s) * scale + add);
}

static void *buf_alloc(gqmm_ctx *ctx, gqmm__tune_problem *p, size_t bytes) {
  void *q = NULL;
  if (p->on_device) {
    if (p->be->mem_alloc(ctx, bytes ? bytes : 1, &q)) return NULL;
  } else {
    q = malloc(bytes ? bytes : 1);
    if (!q) gqmm__fail(ctx, GQMM_ERR_NOMEM, "tune: cannot allocate %zu bytes", bytes);
  }
  return q;
}

static void buf_free(gqmm_ctx *ctx, gqmm__tune_problem *p, void *q) {
  if (!q) return;
  if (p->on_device)
    p->be->mem_free(ctx, q);
  else
    free(q);
}

/* A new buffer (device or host) holding a copy of host[0, bytes). */
static void *buf_from(gqmm_ctx *ctx, gqmm__tune_problem *p, const void *host, size_t bytes) {
  void *q = buf_alloc(ctx, p, bytes);
  if (!q) return NULL;
  if (p->on_device) {
    if (p->be->mem_copy(ctx, q, host, bytes, GQMM__COPY_H2D)) {
      buf_free(ctx, p, q);
      return NULL;
    }
  } else {
    memcpy(q, host, bytes);
  }
  return q;
}

int gqmm__problem_init(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__tune_opts *o,
                       gqmm__tune_problem *p) {
  memset(p, 0, sizeof *p);
  p->be = be;
  p->on_device = be->kind == GQMM_BACKEND_CUDA;
  if (p->on_device && (!be->mem_alloc || !be->mem_free || !be->mem_copy || !be->sync))
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED, "backend %s: no device memory hooks", be->name);
  int st = gqmm__check_quant(ctx, o->q);
  if (st) return st;
  if (!gqmm__is_float(o->dtype))
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "dtype: must be f32, f16 or bf16");
  const long long E = o->gather ? o->E : 1;
  if (E < 1 || E > 65536 || o->N < 1 || o->K < 1 || o->K % o->q.group_size || o->N > (1 << 24) ||
      o->K > (1 << 24))
    return gqmm__fail(ctx, GQMM_ERR_SHAPE,
                      "E, K, N: need E in [1, 65536], K and N in [1, 2^24], K %% group size "
                      "== 0; got E=%lld K=%lld N=%lld",
                      E, o->K, o->N);
  if (o->gather && (o->top_k < 1 || o->top_k > E))
    return gqmm__fail(ctx, GQMM_ERR_ARG, "top_k: must be in [1, E=%lld], got %lld", E, o->top_k);
  const int64_t words = gqmm_packed_words(o->q, o->K), groups = o->K / o->q.group_size;
  const size_t esz = gqmm_dtype_size(o->dtype);
  const double wb = (double)E * (double)o->N * (double)words * 4;
  const double sb = (double)E * (double)o->N * (double)groups * (double)esz;
  if (wb + 2 * sb > MAX_BYTES)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE, "E, K, N: weights of %.1f GB are too large",
                      (wb + 2 * sb) / 1e9);
  p->w_bytes = (size_t)wb;
  p->sb_bytes = (size_t)sb;
  p->expert_bytes = (wb + 2 * sb) / (double)E;
  double copies = ceil(o->rotate_bytes / (wb + 2 * sb));
  p->copies = copies < 1 ? 1 : copies > GQMM__TUNE_MAX_COPIES ? GQMM__TUNE_MAX_COPIES : (int)copies;

  gqmm__qmm_args *a = &p->a;
  a->dtype = o->dtype;
  a->q = o->q;
  a->transpose = 1;
  a->device = p->on_device ? GQMM_DEVICE_CUDA : GQMM_DEVICE_CPU;
  a->N = o->N;
  a->K = o->K;
  a->w_batches = E;

  uint64_t seed = o->seed ? o->seed : 0x5EEDull;
  uint32_t *w = malloc(p->w_bytes);
  void *s = malloc(p->sb_bytes), *b = malloc(p->sb_bytes);
  st = GQMM_OK;
  if (!w || !s || !b) st = gqmm__fail(ctx, GQMM_ERR_NOMEM, "tune: cannot allocate the weights");
  if (!st) {
    for (size_t i = 0; i < p->w_bytes / 4; i++)
      w[i] = (uint32_t)next_u64(&seed);
    fill_floats(s, o->dtype, (int64_t)(p->sb_bytes / esz), &seed, 0.01f, 0.0f);
    fill_floats(b, o->dtype, (int64_t)(p->sb_bytes / esz), &seed, 0.05f, 0.0f);
  }
  for (int i = 0; i < p->copies && !st; i++) {
    p->w[i] = buf_from(ctx, p, w, p->w_bytes);
    p->s[i] = p->w[i] ? buf_from(ctx, p, s, p->sb_bytes) : NULL;
    p->b[i] = p->s[i] ? buf_from(ctx, p, b, p->sb_bytes) : NULL;
    if (!p->b[i]) st = GQMM_ERR_NOMEM;
  }
  free(w);
  free(s);
  free(b);
  if (st) gqmm__problem_free(ctx, p);
  return st;
}

/* Random top-k routing of rows*E slots (tokens of top_k distinct experts, the
 * last token possibly fewer), sorted by expert with a counting sort. */
static int route(gqmm_ctx *ctx, const gqmm__tune_opts *o, int rows, uint64_t *seed,
                 gqmm__tune_problem *p) {
  const long long E = p->a.w_batches, total = (long long)rows * E;
  int64_t *count = calloc((size_t)E + 1, sizeof *count);
  int64_t *pick = malloc((size_t)total * sizeof *pick);
  if (!count || !pick) {
    free(count);
    free(pick);
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "tune: cannot allocate the routing");
  }
  for (long long t = 0; t * o->top_k < total; t++) {
    long long first = t * o->top_k, slots = total - first < o->top_k ? total - first : o->top_k;
    for (long long j = 0; j < slots; j++) {
      int64_t e;
      bool dup;
      do { /* distinct experts per token; top_k <= E so this ends */
        e = (int64_t)(next_u64(seed) % (uint64_t)E);
        dup = false;
        for (long long i = 0; i < j; i++)
          dup |= pick[first + i] == e;
      } while (dup);
      pick[first + j] = e;
      count[e]++;
    }
  }
  p->experts_used = 0;
  for (long long e = 0, r = 0; e < E; e++) {
    p->experts_used += count[e] > 0;
    for (int64_t c = 0; c < count[e]; c++)
      p->w_index[r++] = e;
  }
  for (long long r = 0; r < total; r++)
    p->x_index[r] = r;
  free(count);
  free(pick);
  return GQMM_OK;
}

int gqmm__problem_set_rows(gqmm_ctx *ctx, const gqmm__tune_opts *o, int rows,
                           gqmm__tune_problem *p) {
  for (int i = 0; i < p->copies; i++)
    buf_free(ctx, p, p->x[i]), p->x[i] = NULL;
  buf_free(ctx, p, p->out);
  p->out = NULL;
  free(p->nan_host);
  p->nan_host = NULL;
  free(p->x_index);
  free(p->w_index);
  p->x_index = p->w_index = NULL;
  if (rows < 1 || rows > 65536)
    return gqmm__fail(ctx, GQMM_ERR_ARG, "rows-per-expert: %d is not in [1, 65536]", rows);
  gqmm__qmm_args *a = &p->a;
  const long long total = o->gather ? (long long)rows * a->w_batches : rows;
  /* gather: one x batch of one row per slot (what mlx-lm's sorted SwitchGLU
   * passes); qmm: one matrix of `rows` rows */
  a->M = o->gather ? 1 : rows;
  a->batch = a->x_batches = o->gather ? total : 1;
  const size_t esz = gqmm_dtype_size(o->dtype);
  p->x_bytes = (size_t)total * (size_t)o->K * esz;
  p->out_bytes = (size_t)total * (size_t)o->N * esz;
  p->x_index = malloc((size_t)a->batch * sizeof(int64_t));
  p->w_index = malloc((size_t)a->batch * sizeof(int64_t));
  void *x = malloc(p->x_bytes);
  int st = GQMM_OK;
  if (!p->x_index || !p->w_index || !x)
    st = gqmm__fail(ctx, GQMM_ERR_NOMEM, "tune: cannot allocate %lld rows", total);
  uint64_t seed = (o->seed ? o->seed : 0x5EEDull) * 31 + (uint64_t)rows;
  if (!st && o->gather) st = route(ctx, o, rows, &seed, p);
  if (!st && !o->gather) {
    p->x_index[0] = p->w_index[0] = 0;
    p->experts_used = 1;
  }
  a->x_index = p->x_index;
  a->w_index = p->w_index;
  a->w_sorted = true;
  for (int i = 0; i < p->copies && !st; i++) {
    fill_floats(x, o->dtype, (int64_t)(p->x_bytes / esz), &seed, 1.0f, 0.0f);
    if (!(p->x[i] = buf_from(ctx, p, x, p->x_bytes))) st = GQMM_ERR_NOMEM;
  }
  if (!st && !(p->out = buf_alloc(ctx, p, p->out_bytes))) st = GQMM_ERR_NOMEM;
  if (!st && !(p->nan_host = malloc(p->out_bytes ? p->out_bytes : 1)))
    st = gqmm__fail(ctx, GQMM_ERR_NOMEM, "tune: cannot allocate the output");
  if (!st) { /* NaN in every dtype: the pattern of one element, repeated */
    char one[4];
    gqmm__store_f(one, o->dtype, 0, NAN);
    for (size_t i = 0; i < p->out_bytes; i += esz)
      memcpy((char *)p->nan_host + i, one, esz);
  }
  free(x);
  if (!st) gqmm__problem_use_copy(p, 0);
  return st;
}

void gqmm__problem_use_copy(gqmm__tune_problem *p, int i) {
  i %= p->copies;
  p->a.w = p->w[i];
  p->a.scales = p->s[i];
  p->a.biases = p->b[i];
  p->a.x = p->x[i];
  p->a.out = p->out;
}

int gqmm__problem_poison(gqmm_ctx *ctx, gqmm__tune_problem *p) {
  if (!p->on_device) {
    memcpy(p->out, p->nan_host, p->out_bytes);
    return GQMM_OK;
  }
  return p->be->mem_copy(ctx, p->out, p->nan_host, p->out_bytes, GQMM__COPY_H2D);
}

int gqmm__problem_read_out(gqmm_ctx *ctx, gqmm__tune_problem *p, void *host) {
  if (!p->on_device) {
    memcpy(host, p->out, p->out_bytes);
    return GQMM_OK;
  }
  return p->be->mem_copy(ctx, host, p->out, p->out_bytes, GQMM__COPY_D2H);
}

void gqmm__problem_free(gqmm_ctx *ctx, gqmm__tune_problem *p) {
  for (int i = 0; i < GQMM__TUNE_MAX_COPIES; i++) {
    buf_free(ctx, p, p->w[i]);
    buf_free(ctx, p, p->s[i]);
    buf_free(ctx, p, p->b[i]);
    buf_free(ctx, p, p->x[i]);
  }
  buf_free(ctx, p, p->out);
  free(p->nan_host);
  free(p->x_index);
  free(p->w_index);
  memset(p, 0, sizeof *p);
}
