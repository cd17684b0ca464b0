/*
 * ops_matmul.c - the front end of gqmm_quantized_matmul and gqmm_gather_qmm.
 *
 * Both ops reduce to one batched problem (gqmm__qmm_args): a list of
 * (x batch, w batch) pairs, one per output matrix. This file checks every
 * argument, applies MLX's broadcasting and dtype rules, builds that list,
 * widens mixed-dtype inputs, and hands the problem to a backend.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  gqmm_tensor out;  /* descriptor of the output (data NULL) */
  gqmm__qmm_args a; /* filled except data pointers */
  int64_t *x_index; /* owned */
  int64_t *w_index; /* owned */
} qmm_plan;

static void plan_free(qmm_plan *p) {
  free(p->x_index);
  free(p->w_index);
  p->x_index = p->w_index = NULL;
}

static int64_t prod(const int64_t *shape, int n) {
  int64_t r = 1;
  for (int i = 0; i < n; i++)
    r *= shape[i];
  return r;
}

/* numpy broadcasting of two shapes; error names both arguments. */
static int broadcast(gqmm_ctx *ctx, const int64_t *a, int na, const char *an, const int64_t *b,
                     int nb, const char *bn, int64_t *out, int *nout) {
  int n = na > nb ? na : nb;
  if (n > GQMM_MAX_DIMS - 2)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "%s/%s: broadcast batch shape has %d dims, max %d", an,
                      bn, n, GQMM_MAX_DIMS - 2);
  for (int i = 0; i < n; i++) {
    int64_t da = i < n - na ? 1 : a[i - (n - na)];
    int64_t db = i < n - nb ? 1 : b[i - (n - nb)];
    if (da != db && da != 1 && db != 1) {
      char sa[160], sb[160];
      gqmm__shape_str(sa, sizeof sa, na, a);
      gqmm__shape_str(sb, sizeof sb, nb, b);
      return gqmm__fail(ctx, GQMM_ERR_SHAPE, "%s %s and %s %s cannot be broadcast together", an, sa,
                        bn, sb);
    }
    out[i] = da == 1 ? db : da;
  }
  /* each side has < 2^40 elements, their broadcast may not: keep prod() finite */
  int64_t total = 1;
  for (int i = 0; i < n; i++) {
    if (out[i] > 0 && total > (INT64_C(1) << 40) / out[i])
      return gqmm__fail(ctx, GQMM_ERR_SHAPE, "%s/%s: broadcast batch has more than 2^40 elements",
                        an, bn);
    total *= out[i];
  }
  *nout = n;
  return GQMM_OK;
}

/* Flat index into a (right-aligned, broadcast) shape `s` of the output batch
 * position whose multi-index is `idx` over `full` dims. */
static int64_t bcast_offset(const int64_t *idx, int nfull, const int64_t *s, int ns) {
  int64_t off = 0;
  for (int i = 0; i < ns; i++) {
    int64_t d = s[i];
    int64_t v = d == 1 ? 0 : idx[i + (nfull - ns)];
    off = off * d + v;
  }
  return off;
}

/* The checks of a quantized weight set (internal.h), shared with gqmm_pack;
 * check_common runs them in this order with the x checks in between. */
int gqmm__check_qweight_tensors(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
                                const gqmm_tensor *biases) {
  int st;
  if ((st = gqmm__check_tensor(ctx, w, "w"))) return st;
  if ((st = gqmm__check_tensor(ctx, scales, "scales"))) return st;
  if (!biases) return gqmm__fail(ctx, GQMM_ERR_NULL, "biases: required in affine mode (got NULL)");
  return gqmm__check_tensor(ctx, biases, "biases");
}

int gqmm__check_qweight_dtypes(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
                               const gqmm_tensor *biases) {
  if (w->dtype != GQMM_U32)
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "w: dtype is %s, expected uint32 (packed)",
                      gqmm_dtype_name(w->dtype));
  if (!gqmm__is_float(scales->dtype))
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "scales: dtype is %s, expected a float type",
                      gqmm_dtype_name(scales->dtype));
  if (!gqmm__is_float(biases->dtype))
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "biases: dtype is %s, expected a float type",
                      gqmm_dtype_name(biases->dtype));
  return GQMM_OK;
}

int gqmm__check_qweight_shapes(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
                               const gqmm_tensor *biases, gqmm_quant q, int64_t *packed_len_out) {
  if (w->ndim < 2)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "w: must have at least 2 dimensions, got %d", w->ndim);
  const int64_t words = w->shape[w->ndim - 1];
  if ((words * 32) % q.bits != 0)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE,
                      "w: %lld words per row is not a whole number of %d-bit values",
                      (long long)words, q.bits);
  const int64_t packed_len = words * 32 / q.bits; /* K if transpose, else N */
  if (packed_len % q.group_size != 0)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE,
                      "w: rows hold %lld values, not a multiple of group_size %d",
                      (long long)packed_len, q.group_size);
  /* scales and biases: w.shape[:-1] + (packed_len / group_size,) */
  int64_t sb_shape[GQMM_MAX_DIMS];
  for (int i = 0; i < w->ndim - 1; i++)
    sb_shape[i] = w->shape[i];
  sb_shape[w->ndim - 1] = packed_len / q.group_size;
  const gqmm_tensor *sb[2] = {scales, biases};
  const char *names[2] = {"scales", "biases"};
  for (int i = 0; i < 2; i++) {
    bool same = sb[i]->ndim == w->ndim;
    for (int d = 0; same && d < w->ndim; d++)
      same = sb[i]->shape[d] == sb_shape[d];
    if (!same) {
      char want[160], got[160];
      gqmm__shape_str(want, sizeof want, w->ndim, sb_shape);
      gqmm__shape_str(got, sizeof got, sb[i]->ndim, sb[i]->shape);
      return gqmm__fail(ctx, GQMM_ERR_SHAPE, "%s: shape is %s, expected %s to match w", names[i],
                        got, want);
    }
  }
  *packed_len_out = packed_len;
  return GQMM_OK;
}

/* Checks shared by both ops: tensors, dtypes, K/N, scales/biases shapes. */
static int check_common(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                        const gqmm_tensor *scales, const gqmm_tensor *biases, int transpose,
                        gqmm_quant q, qmm_plan *p) {
  int st;
  if ((st = gqmm__check_quant(ctx, q))) return st;
  if ((st = gqmm__check_tensor(ctx, x, "x"))) return st;
  if ((st = gqmm__check_qweight_tensors(ctx, w, scales, biases))) return st;
  if ((st = gqmm__check_same_device(ctx, w, "w", x->device))) return st;
  if ((st = gqmm__check_same_device(ctx, scales, "scales", x->device))) return st;
  if ((st = gqmm__check_same_device(ctx, biases, "biases", x->device))) return st;
  if (!gqmm__is_float(x->dtype))
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "x: dtype is %s, expected float32, float16 or bfloat16",
                      gqmm_dtype_name(x->dtype));
  if ((st = gqmm__check_qweight_dtypes(ctx, w, scales, biases))) return st;
  if (x->ndim < 1) return gqmm__fail(ctx, GQMM_ERR_NDIM, "x: must have at least 1 dimension");
  int64_t packed_len;
  if ((st = gqmm__check_qweight_shapes(ctx, w, scales, biases, q, &packed_len))) return st;
  const int64_t rows = w->shape[w->ndim - 2]; /* N if transpose, else K */
  const int64_t K = transpose ? packed_len : rows;
  const int64_t N = transpose ? rows : packed_len;
  const int64_t xk = x->shape[x->ndim - 1];
  if (xk != K)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE,
                      "x: last dimension is %lld but w (transpose=%d, %d-bit) has K = %lld",
                      (long long)xk, transpose ? 1 : 0, q.bits, (long long)K);
  memset(p, 0, sizeof *p);
  p->a.dtype = gqmm__promote(x->dtype, gqmm__promote(scales->dtype, biases->dtype));
  p->a.q = q;
  p->a.transpose = transpose ? 1 : 0;
  p->a.device = x->device;
  p->a.K = K;
  p->a.N = N;
  p->a.M = x->ndim >= 2 ? x->shape[x->ndim - 2] : 1;
  p->a.x_batches = x->ndim > 2 ? prod(x->shape, x->ndim - 2) : 1;
  p->a.w_batches = prod(w->shape, w->ndim - 2);
  p->out.dtype = p->a.dtype;
  p->out.device = x->device;
  return GQMM_OK;
}

static int alloc_index(gqmm_ctx *ctx, qmm_plan *p, int64_t batch) {
  p->a.batch = batch;
  size_t n = (size_t)(batch > 0 ? batch : 1);
  p->x_index = malloc(n * sizeof(int64_t));
  p->w_index = malloc(n * sizeof(int64_t));
  if (!p->x_index || !p->w_index) {
    plan_free(p);
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "cannot allocate %lld batch indices", (long long)batch);
  }
  return GQMM_OK;
}

static void set_out_shape(qmm_plan *p, int nd, const int64_t *shape) {
  p->out.ndim = nd;
  int64_t stride = 1;
  for (int i = nd - 1; i >= 0; i--) {
    p->out.shape[i] = shape[i];
    p->out.strides[i] = stride;
    stride *= shape[i];
  }
}

/* Output shape = batch shape (nb dims of `shape`) + (M, N); with `build`,
 * allocate one (x, w) index pair per batch element. */
static int plan_batch(gqmm_ctx *ctx, qmm_plan *p, int64_t *shape, int nb, bool build) {
  const int64_t batch = prod(shape, nb);
  shape[nb] = p->a.M;
  shape[nb + 1] = p->a.N;
  set_out_shape(p, nb + 2, shape);
  p->a.batch = batch;
  return build ? alloc_index(ctx, p, batch) : GQMM_OK;
}

/* Odometer increment of a multi-index over shape[0..nb). */
static void next_index(int64_t *idx, const int64_t *shape, int nb) {
  for (int d = nb - 1; d >= 0; d--) {
    if (++idx[d] < shape[d]) return;
    idx[d] = 0;
  }
}

/* MLX quantized_matmul batching: w 2-D folds every leading dim of x into M;
 * x of <= 2 dims uses the first matrix of a batched w (as MLX's CPU kernel
 * does); otherwise the batch dims broadcast. */
static int plan_quantized_matmul(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                                 const gqmm_tensor *scales, const gqmm_tensor *biases,
                                 int transpose, gqmm_quant q, bool build, qmm_plan *p) {
  int st = check_common(ctx, x, w, scales, biases, transpose, q, p);
  if (st) return st;
  int64_t shape[GQMM_MAX_DIMS];
  if (w->ndim == 2 || x->ndim <= 2) {
    for (int i = 0; i < x->ndim - 1; i++)
      shape[i] = x->shape[i];
    shape[x->ndim - 1] = p->a.N;
    set_out_shape(p, x->ndim, shape);
    p->a.M = gqmm_tensor_numel(x) / (p->a.K ? p->a.K : 1);
    if (p->a.K == 0) p->a.M = prod(x->shape, x->ndim - 1);
    p->a.x_batches = 1;
    if (!build) return GQMM_OK;
    if ((st = alloc_index(ctx, p, 1))) return st;
    p->x_index[0] = 0;
    p->w_index[0] = 0;
    return GQMM_OK;
  }
  int nb;
  if ((st = broadcast(ctx, x->shape, x->ndim - 2, "x batch", w->shape, w->ndim - 2, "w batch",
                      shape, &nb)))
    return st;
  if ((st = plan_batch(ctx, p, shape, nb, build)) || !build) return st;
  int64_t idx[GQMM_MAX_DIMS] = {0};
  for (int64_t b = 0; b < p->a.batch; b++, next_index(idx, shape, nb)) {
    p->x_index[b] = bcast_offset(idx, nb, x->shape, x->ndim - 2);
    p->w_index[b] = bcast_offset(idx, nb, w->shape, w->ndim - 2);
  }
  return GQMM_OK;
}

/* Read element i of an int32/uint32 index tensor, range-checked. */
static int read_index(gqmm_ctx *ctx, const gqmm_tensor *t, const char *name, int64_t i,
                      int64_t limit, int64_t *out) {
  int64_t v = t->dtype == GQMM_I32 ? (int64_t)((const int32_t *)t->data)[i]
                                   : (int64_t)((const uint32_t *)t->data)[i];
  if (v < 0 || v >= limit)
    return gqmm__fail(ctx, GQMM_ERR_INDEX, "%s: element %lld is %lld, outside [0, %lld)", name,
                      (long long)i, (long long)v, (long long)limit);
  *out = v;
  return GQMM_OK;
}

static int check_indices(gqmm_ctx *ctx, const gqmm_tensor *t, const char *name) {
  int st = gqmm__check_tensor(ctx, t, name);
  if (st) return st;
  if (t->dtype != GQMM_I32 && t->dtype != GQMM_U32)
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "%s: dtype is %s, expected int32 or uint32", name,
                      gqmm_dtype_name(t->dtype));
  if (t->device != GQMM_DEVICE_CPU)
    return gqmm__fail(ctx, GQMM_ERR_DEVICE, "%s: index tensors must be in CPU memory", name);
  if (t->ndim > GQMM_MAX_DIMS - 2)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "%s: at most %d dimensions", name, GQMM_MAX_DIMS - 2);
  return GQMM_OK;
}

static int plan_gather_qmm(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                           const gqmm_tensor *scales, const gqmm_tensor *biases,
                           const gqmm_tensor *lhs, const gqmm_tensor *rhs, int transpose,
                           gqmm_quant q, bool build, qmm_plan *p) {
  int st = check_common(ctx, x, w, scales, biases, transpose, q, p);
  if (st) return st;
  if (x->ndim < 2)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "x: gather_qmm needs at least 2 dimensions, got %d",
                      x->ndim);
  if (lhs && (st = check_indices(ctx, lhs, "lhs_indices"))) return st;
  if (rhs && (st = check_indices(ctx, rhs, "rhs_indices"))) return st;
  /* Missing indices default to arange over the batch, shaped like it. */
  const int64_t *ls = lhs ? lhs->shape : x->shape;
  int nl = lhs ? lhs->ndim : x->ndim - 2;
  const int64_t *rs = rhs ? rhs->shape : w->shape;
  int nr = rhs ? rhs->ndim : w->ndim - 2;
  int64_t shape[GQMM_MAX_DIMS];
  int nb;
  if ((st = broadcast(ctx, ls, nl, "lhs_indices", rs, nr, "rhs_indices", shape, &nb))) return st;
  if ((st = plan_batch(ctx, p, shape, nb, build)) || !build) return st;
  int64_t idx[GQMM_MAX_DIMS] = {0};
  bool sorted = true;
  for (int64_t b = 0; b < p->a.batch; b++, next_index(idx, shape, nb)) {
    int64_t lo = bcast_offset(idx, nb, ls, nl), ro = bcast_offset(idx, nb, rs, nr);
    if (lhs)
      st = read_index(ctx, lhs, "lhs_indices", lo, p->a.x_batches, &p->x_index[b]);
    else
      p->x_index[b] = lo;
    if (!st && rhs)
      st = read_index(ctx, rhs, "rhs_indices", ro, p->a.w_batches, &p->w_index[b]);
    else if (!st)
      p->w_index[b] = ro;
    if (st) {
      plan_free(p);
      return st;
    }
    if (b > 0 && p->w_index[b] < p->w_index[b - 1]) sorted = false;
  }
  p->a.w_sorted = sorted;
  return GQMM_OK;
}

/* Widen src to dtype t into a new buffer if needed; *tmp owns it. */
static int widen(gqmm_ctx *ctx, const gqmm_tensor *src, gqmm_dtype t, const void **data, void **tmp,
                 const char *name) {
  *data = src->data;
  *tmp = NULL;
  if (src->dtype == t) return GQMM_OK;
  if (src->device != GQMM_DEVICE_CPU)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "%s: mixed dtypes on the GPU are not supported; pass %s", name,
                      gqmm_dtype_name(t));
  int64_t n = gqmm_tensor_numel(src);
  *tmp = malloc((size_t)(n > 0 ? n : 1) * gqmm_dtype_size(t));
  if (!*tmp) return gqmm__fail(ctx, GQMM_ERR_NOMEM, "%s: cannot allocate widened copy", name);
  gqmm__convert(*tmp, t, src->data, src->dtype, n);
  *data = *tmp;
  return GQMM_OK;
}

static int execute(gqmm_ctx *ctx, qmm_plan *p, const gqmm_tensor *x, const gqmm_tensor *w,
                   const gqmm_tensor *scales, const gqmm_tensor *biases, const gqmm_tensor *lhs,
                   const gqmm_tensor *rhs, gqmm_tensor *out) {
  int st = gqmm__check_output(ctx, out, p->out.dtype, p->out.ndim, p->out.shape, "out");
  if (!st) st = gqmm__check_same_device(ctx, out, "out", p->a.device);
  const gqmm_tensor *ins[6] = {x, w, scales, biases, lhs, rhs};
  const char *names[6] = {"x", "w", "scales", "biases", "lhs_indices", "rhs_indices"};
  for (int i = 0; i < 6 && !st; i++)
    st = gqmm__check_no_overlap(ctx, out, "out", ins[i], names[i]);
  if (st) {
    plan_free(p);
    return st;
  }
  void *tx = NULL, *ts = NULL, *tb = NULL;
  const gqmm_dtype t = p->a.dtype;
  if (!(st = widen(ctx, x, t, &p->a.x, &tx, "x")) &&
      !(st = widen(ctx, scales, t, &p->a.scales, &ts, "scales")) &&
      !(st = widen(ctx, biases, t, &p->a.biases, &tb, "biases"))) {
    p->a.w = w->data;
    p->a.out = out->data;
    p->a.x_index = p->x_index;
    p->a.w_index = p->w_index;
    if (p->a.batch > 0 && p->a.M > 0 && p->a.N > 0) {
      const gqmm__backend *be = NULL;
      st = gqmm__select_backend(ctx, &p->a, &be);
      if (!st) {
        ctx->last_backend = be->name;
        st = be->qmm(ctx, &p->a);
      }
    }
  }
  free(tx);
  free(ts);
  free(tb);
  plan_free(p);
  return st;
}

/* Both public ops and their _output queries share one plan: gather_qmm without
 * indices is quantized_matmul. build: also build the (x batch, w batch) list. */
static int plan_op(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                   const gqmm_tensor *scales, const gqmm_tensor *biases, const gqmm_tensor *lhs,
                   const gqmm_tensor *rhs, int transpose, gqmm_quant q, bool build,
                   qmm_plan *p) {
  gqmm__clear_error(ctx);
  if (!lhs && !rhs) return plan_quantized_matmul(ctx, x, w, scales, biases, transpose, q, build, p);
  return plan_gather_qmm(ctx, x, w, scales, biases, lhs, rhs, transpose, q, build, p);
}

static int run_op(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                  const gqmm_tensor *scales, const gqmm_tensor *biases, const gqmm_tensor *lhs,
                  const gqmm_tensor *rhs, int transpose, gqmm_quant q, const gqmm_packed *pk,
                  gqmm_tensor *out) {
  if (!ctx) return GQMM_ERR_NULL;
  qmm_plan p;
  int st = plan_op(ctx, x, w, scales, biases, lhs, rhs, transpose, q, true, &p);
  if (st) return st;
  p.a.packed = pk;
  return execute(ctx, &p, x, w, scales, biases, lhs, rhs, out);
}

static int output_op(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                     const gqmm_tensor *scales, const gqmm_tensor *biases, const gqmm_tensor *lhs,
                     const gqmm_tensor *rhs, int transpose, gqmm_quant q, gqmm_tensor *out) {
  if (!ctx) return GQMM_ERR_NULL;
  if (!out) return gqmm__fail(ctx, GQMM_ERR_NULL, "out: tensor pointer is NULL");
  qmm_plan p;
  int st = plan_op(ctx, x, w, scales, biases, lhs, rhs, transpose, q, false, &p);
  if (!st) *out = p.out;
  return st;
}

int gqmm_quantized_matmul(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                          const gqmm_tensor *scales, const gqmm_tensor *biases, int transpose,
                          gqmm_quant q, gqmm_tensor *out) {
  return run_op(ctx, x, w, scales, biases, NULL, NULL, transpose, q, NULL, out);
}

int gqmm_gather_qmm(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                    const gqmm_tensor *scales, const gqmm_tensor *biases,
                    const gqmm_tensor *lhs_indices, const gqmm_tensor *rhs_indices, int transpose,
                    gqmm_quant q, int sorted_indices, gqmm_tensor *out) {
  (void)sorted_indices; /* a hint only: the plan checks order itself */
  return run_op(ctx, x, w, scales, biases, lhs_indices, rhs_indices, transpose, q, NULL, out);
}

/* The packed copy stands in for the tensors it was made from: descriptors
 * of their shapes over its buffer, so every check and the plan are the
 * unpacked op's; the backend reads the packed layout. */
int gqmm_gather_qmm_packed(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_packed *w,
                           const gqmm_tensor *lhs_indices, const gqmm_tensor *rhs_indices,
                           int sorted_indices, gqmm_tensor *out) {
  (void)sorted_indices;
  if (!ctx) return GQMM_ERR_NULL;
  if (!w) return gqmm__fail(ctx, GQMM_ERR_NULL, "w: packed weights pointer is NULL");
  gqmm_tensor tw = gqmm_tensor_make(w->data, GQMM_U32, w->ndim, w->shape);
  int64_t sshape[GQMM_MAX_DIMS];
  memcpy(sshape, w->shape, sizeof sshape);
  sshape[w->ndim - 1] = w->K / w->q.group_size;
  gqmm_tensor ts = gqmm_tensor_make(w->data, w->dtype, w->ndim, sshape);
  tw.device = ts.device = w->device;
  return run_op(ctx, x, &tw, &ts, &ts, lhs_indices, rhs_indices, 1, w->q, w, out);
}

int gqmm_quantized_matmul_output(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                                 const gqmm_tensor *scales, const gqmm_tensor *biases,
                                 int transpose, gqmm_quant q, gqmm_tensor *out) {
  return output_op(ctx, x, w, scales, biases, NULL, NULL, transpose, q, out);
}

int gqmm_gather_qmm_output(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                           const gqmm_tensor *scales, const gqmm_tensor *biases,
                           const gqmm_tensor *lhs_indices, const gqmm_tensor *rhs_indices,
                           int transpose, gqmm_quant q, gqmm_tensor *out) {
  return output_op(ctx, x, w, scales, biases, lhs_indices, rhs_indices, transpose, q, out);
}
