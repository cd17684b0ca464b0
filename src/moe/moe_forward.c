/*
 * moe_forward.c - the front end of gqmm_moe_forward: checks every argument,
 * fills gqmm__moe_args and hands the layer to the chosen backend's fused
 * moe_forward, or composes it from the backend's qmm (moe_compose.c).
 */
#include "moe.h"

#include <stdio.h>
#include <string.h>

/* t must have this dtype and shape exactly (an input: SHAPE/DTYPE errors). */
static int check_input(gqmm_ctx *ctx, const gqmm_tensor *t, const char *name, gqmm_dtype dtype,
                       gqmm_device dev, int ndim, const int64_t *shape) {
  int st = gqmm__check_tensor(ctx, t, name);
  if (!st) st = gqmm__check_same_device(ctx, t, name, dev);
  if (!st) st = gqmm__check_dtype_shape(ctx, t, name, dtype, ndim, shape, GQMM_ERR_DTYPE,
                                        GQMM_ERR_SHAPE);
  return st;
}

/* One packed set (w, scales, biases) of shape [E, rows, K*bits/32]; a -1 in
 * want_e/want_rows accepts what w has. Returns E and rows. */
static int check_qset(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *s,
                      const gqmm_tensor *b, const char *name, gqmm_quant q, gqmm_dtype dtype,
                      gqmm_device dev, int64_t want_e, int64_t want_rows, int64_t K, int64_t *e,
                      int64_t *rows) {
  char n[3][64];
  snprintf(n[0], sizeof n[0], "%s", name);
  snprintf(n[1], sizeof n[1], "%s_scales", name);
  snprintf(n[2], sizeof n[2], "%s_biases", name);
  int st = gqmm__check_tensor(ctx, w, n[0]);
  if (st) return st;
  if (w->ndim != 3)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "%s: must be [experts, rows, K*bits/32], got %d dims",
                      n[0], w->ndim);
  if (K % q.group_size != 0 || (K * q.bits) % 32 != 0)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE,
                      "%s: its K = %lld is not a multiple of group_size %d and of 32/bits", n[0],
                      (long long)K, q.group_size);
  const int64_t shape[3] = {want_e < 0 ? w->shape[0] : want_e,
                            want_rows < 0 ? w->shape[1] : want_rows, K * q.bits / 32};
  if ((st = check_input(ctx, w, n[0], GQMM_U32, dev, 3, shape))) return st;
  const int64_t sshape[3] = {shape[0], shape[1], K / q.group_size};
  if ((st = check_input(ctx, s, n[1], dtype, dev, 3, sshape))) return st;
  if ((st = check_input(ctx, b, n[2], dtype, dev, 3, sshape))) return st;
  *e = shape[0];
  *rows = shape[1];
  return GQMM_OK;
}

/* An optional gqmm_pack copy must come from a tensor of t's shape and format
 * (t: already checked, never NULL). */
static int check_packed(gqmm_ctx *ctx, const gqmm_packed *p, const char *name,
                        const gqmm_tensor *t, gqmm_quant q, gqmm_dtype dtype,
                        const gqmm_packed **dst) {
  *dst = p;
  if (!p) return GQMM_OK;
  if (p->device != t->device)
    return gqmm__fail(ctx, GQMM_ERR_DEVICE,
                      "%s_packed: was packed for the %s, but %s is on the %s (pack the tensors "
                      "the layer runs on)",
                      name, p->device == GQMM_DEVICE_CPU ? "cpu" : "cuda device", name,
                      t->device == GQMM_DEVICE_CPU ? "cpu" : "cuda device");
  bool same = p->ndim == t->ndim && p->q.bits == q.bits && p->q.group_size == q.group_size &&
              p->dtype == dtype;
  for (int d = 0; same && d < t->ndim; d++) same = p->shape[d] == t->shape[d];
  if (!same)
    return gqmm__fail(ctx, GQMM_ERR_ARG,
                      "%s_packed: was packed from a tensor of another shape, format or scale "
                      "dtype than %s (%d-bit group %d, %s)",
                      name, name, q.bits, q.group_size, gqmm_dtype_name(dtype));
  return GQMM_OK;
}

/* Fill a's weights from w: the fused set or the separate gate and up sets. */
static int check_weights(gqmm_ctx *ctx, const gqmm_moe_weights *w, gqmm__moe_args *a) {
  const bool fused = w->gate_up != NULL;
  if (fused && (w->gate || w->up))
    return gqmm__fail(ctx, GQMM_ERR_ARG, "weights: give either gate_up or gate and up, not both");
  if (!fused && (!w->gate || !w->up))
    return gqmm__fail(ctx, GQMM_ERR_NULL, "weights: gate_up is NULL and so is gate or up");
  int64_t E, rows;
  int st;
  if (fused) {
    st = check_qset(ctx, w->gate_up, w->gate_up_scales, w->gate_up_biases, "gate_up", a->q,
                    a->dtype, a->device, -1, -1, a->hidden, &E, &rows);
    if (st) return st;
    if (rows % 2 != 0)
      return gqmm__fail(ctx, GQMM_ERR_SHAPE, "gate_up: %lld rows per expert is odd (need 2 * inter)",
                        (long long)rows);
    a->inter = rows / 2;
    a->gate_w = w->gate_up->data;
    a->gate_s = w->gate_up_scales->data;
    a->gate_b = w->gate_up_biases->data;
    /* up rows follow the gate rows inside each expert; only the fused
     * stride (gu_expert_rows) lets a kernel find them, the pointers below
     * name where expert 0's up rows start. */
    const size_t esz = gqmm_dtype_size(a->dtype);
    const int64_t words = a->hidden * a->q.bits / 32, groups = a->hidden / a->q.group_size;
    a->up_w = a->gate_w + a->inter * words;
    a->up_s = (const char *)a->gate_s + (size_t)(a->inter * groups) * esz;
    a->up_b = (const char *)a->gate_b + (size_t)(a->inter * groups) * esz;
    a->gu_expert_rows = rows;
  } else {
    st = check_qset(ctx, w->gate, w->gate_scales, w->gate_biases, "gate", a->q, a->dtype,
                    a->device, -1, -1, a->hidden, &E, &rows);
    if (!st)
      st = check_qset(ctx, w->up, w->up_scales, w->up_biases, "up", a->q, a->dtype, a->device, E,
                      rows, a->hidden, &E, &rows);
    if (st) return st;
    a->inter = rows;
    a->gate_w = w->gate->data;
    a->gate_s = w->gate_scales->data;
    a->gate_b = w->gate_biases->data;
    a->up_w = w->up->data;
    a->up_s = w->up_scales->data;
    a->up_b = w->up_biases->data;
    a->gu_expert_rows = rows;
  }
  a->experts = E;
  if (E < 1 || a->inter < 1)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE, "%s: %lld experts of %lld rows (need >= 1 each)",
                      fused ? "gate_up" : "gate", (long long)E, (long long)a->inter);
  st = check_qset(ctx, w->down, w->down_scales, w->down_biases, "down", a->q, a->dtype, a->device,
                  E, a->hidden, a->inter, &E, &rows);
  if (st) return st;
  a->down_w = w->down->data;
  a->down_s = w->down_scales->data;
  a->down_b = w->down_biases->data;
  if (fused && (w->gate_packed || w->up_packed))
    return gqmm__fail(ctx, GQMM_ERR_ARG,
                      "gate_packed/up_packed: the layer has a fused gate_up tensor; pass "
                      "gate_up_packed");
  if (!fused && w->gate_up_packed)
    return gqmm__fail(ctx, GQMM_ERR_ARG,
                      "gate_up_packed: the layer has separate gate and up tensors; pass "
                      "gate_packed and up_packed");
  if (fused)
    st = check_packed(ctx, w->gate_up_packed, "gate_up", w->gate_up, a->q, a->dtype, &a->gate_pk);
  else if (!(st = check_packed(ctx, w->gate_packed, "gate", w->gate, a->q, a->dtype, &a->gate_pk)))
    st = check_packed(ctx, w->up_packed, "up", w->up, a->q, a->dtype, &a->up_pk);
  if (!st) st = check_packed(ctx, w->down_packed, "down", w->down, a->q, a->dtype, &a->down_pk);
  return st;
}

static int check_args(gqmm_ctx *ctx, const gqmm_moe_weights *w, const gqmm_tensor *x,
                      const gqmm_tensor *ids, const gqmm_tensor *ew, gqmm_activation act,
                      gqmm_tensor *out, gqmm__moe_args *a) {
  int st;
  if (!w) return gqmm__fail(ctx, GQMM_ERR_NULL, "weights: pointer is NULL");
  if ((st = gqmm__check_quant(ctx, w->q))) return st;
  if ((st = gqmm__check_tensor(ctx, x, "x"))) return st;
  if (!gqmm__is_float(x->dtype))
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "x: dtype is %s, expected float32, float16 or bfloat16",
                      gqmm_dtype_name(x->dtype));
  if (x->ndim != 2)
    return gqmm__fail(ctx, GQMM_ERR_NDIM, "x: must be [tokens, hidden], got %d dims", x->ndim);
  if (act != GQMM_ACT_SWIGLU && act != GQMM_ACT_GEGLU)
    return gqmm__fail(ctx, GQMM_ERR_ARG, "act: %d is not GQMM_ACT_SWIGLU or GQMM_ACT_GEGLU",
                      (int)act);
  memset(a, 0, sizeof *a);
  a->dtype = x->dtype;
  a->q = w->q;
  a->act = act == GQMM_ACT_GEGLU ? GQMM__ACT_GEGLU : GQMM__ACT_SWIGLU;
  a->device = x->device;
  a->tokens = x->shape[0];
  a->hidden = x->shape[1];
  if (a->hidden < 1) return gqmm__fail(ctx, GQMM_ERR_SHAPE, "x: hidden size is 0");
  if ((st = gqmm__check_tensor(ctx, ids, "expert_ids"))) return st;
  if (ids->dtype != GQMM_I32 && ids->dtype != GQMM_U32)
    return gqmm__fail(ctx, GQMM_ERR_DTYPE, "expert_ids: dtype is %s, expected int32 or uint32",
                      gqmm_dtype_name(ids->dtype));
  if (ids->ndim != 2 || ids->shape[0] != a->tokens || ids->shape[1] < 1)
    return gqmm__fail(ctx, GQMM_ERR_SHAPE,
                      "expert_ids: must be [tokens=%lld, top_k >= 1] (ndim %d)",
                      (long long)a->tokens, ids->ndim);
  a->top_k = ids->shape[1];
  const int64_t pshape[2] = {a->tokens, a->top_k};
  if ((st = check_input(ctx, ids, "expert_ids", ids->dtype, a->device, 2, pshape))) return st;
  if ((st = check_input(ctx, ew, "expert_weights", a->dtype, a->device, 2, pshape))) return st;
  if ((st = check_weights(ctx, w, a))) return st;
  const int64_t oshape[2] = {a->tokens, a->hidden};
  if ((st = gqmm__check_output(ctx, out, a->dtype, 2, oshape, "out"))) return st;
  if ((st = gqmm__check_same_device(ctx, out, "out", a->device))) return st;
  const gqmm_tensor *ins[] = {x,       ids,      ew,           w->gate_up, w->gate_up_scales,
                              w->gate_up_biases, w->gate, w->gate_scales, w->gate_biases, w->up,
                              w->up_scales, w->up_biases, w->down, w->down_scales, w->down_biases};
  const char *names[] = {"x",    "expert_ids", "expert_weights", "gate_up",     "gate_up_scales",
                         "gate_up_biases", "gate", "gate_scales", "gate_biases", "up",
                         "up_scales", "up_biases", "down", "down_scales", "down_biases"};
  for (size_t i = 0; i < sizeof ins / sizeof ins[0]; i++)
    if ((st = gqmm__check_no_overlap(ctx, out, "out", ins[i], names[i]))) return st;
  a->x = x->data;
  a->expert_ids = ids->data;
  a->expert_weights = ew->data;
  a->out = out->data;
  return GQMM_OK;
}

/* The backend that runs the gate_up GEMM of this layer also runs the layer. */
static int pick_backend(gqmm_ctx *ctx, const gqmm__moe_args *a, const gqmm__backend **be) {
  static const int64_t zero = 0;
  gqmm__qmm_args q = {.dtype = a->dtype, .q = a->q, .transpose = 1, .device = a->device,
                      .M = 1, .N = a->gu_expert_rows, .K = a->hidden, .batch = 1,
                      .x_batches = 1, .w_batches = a->experts, .x = a->x, .w = a->gate_w,
                      .scales = a->gate_s, .biases = a->gate_b, .out = a->out,
                      .x_index = &zero, .w_index = &zero, .w_sorted = true};
  return gqmm__select_backend(ctx, &q, be);
}

/* Host ids are range-checked here, before anything runs. Device ids are
 * never copied to the host: that copy would wait for all queued work every
 * layer. A backend's fused moe_forward checks them on the device and reports
 * a bad one at the next sync or layer call (the deferred error, gqmm.h);
 * without one the layer is composed on the host and takes host tensors only. */
static int check_host_ids(gqmm_ctx *ctx, const gqmm_tensor *ids, gqmm__moe_args *a) {
  if (ids->device != GQMM_DEVICE_CPU) return GQMM_OK;
  a->expert_ids_host = ids->data;
  /* uint32 ids above INT32_MAX read as negative here, and fail the same check. */
  for (int64_t p = 0; p < a->tokens * a->top_k; p++) {
    const int32_t e = a->expert_ids_host[p];
    if (e < 0 || e >= a->experts)
      return gqmm__fail(ctx, GQMM_ERR_INDEX,
                        "expert_ids: element [%lld, %lld] is %lld, outside [0, %lld)",
                        (long long)(p / a->top_k), (long long)(p % a->top_k),
                        ids->dtype == GQMM_U32 ? (long long)(uint32_t)e : (long long)e,
                        (long long)a->experts);
  }
  return GQMM_OK;
}

int gqmm__moe_forward_timed(gqmm_ctx *ctx, const gqmm_moe_weights *w, const gqmm_tensor *x,
                            const gqmm_tensor *expert_ids, const gqmm_tensor *expert_weights,
                            gqmm_activation act, gqmm_tensor *out, gqmm__moe_phases *phases) {
  if (!ctx) return GQMM_ERR_NULL;
  gqmm__clear_error(ctx);
  gqmm__moe_args a;
  int st = check_args(ctx, w, x, expert_ids, expert_weights, act, out, &a);
  if (st) return st;
  const gqmm__backend *be = NULL;
  if ((st = pick_backend(ctx, &a, &be))) return st;
  if ((st = check_host_ids(ctx, expert_ids, &a)) || a.tokens == 0) return st;
  ctx->last_backend = be->name;
  return be->moe_forward ? be->moe_forward(ctx, &a) : gqmm__moe_compose(ctx, be, &a, phases);
}

int gqmm_moe_forward(gqmm_ctx *ctx, const gqmm_moe_weights *w, const gqmm_tensor *x,
                     const gqmm_tensor *expert_ids, const gqmm_tensor *expert_weights,
                     gqmm_activation act, gqmm_tensor *out) {
  return gqmm__moe_forward_timed(ctx, w, x, expert_ids, expert_weights, act, out, NULL);
}
