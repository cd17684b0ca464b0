/*
 * test_cuda.c - the CUDA backend against the reference.
 * Without a GPU (CI): the device API and the backend decline cleanly.
 * With a GPU: every tile config (and the generic kernel) of gather_qmm and
 * quantized_matmul against src/ref on fresh random data, every bits x group
 * size x dtype, ragged K and N, experts with 0 rows, all rows on one expert,
 * unsorted indices, M > 1, transpose=false; device outputs poisoned first.
 * GQMM_CUDA_TEST_QUICK=1 runs a subset (for compute-sanitizer).
 */
#include "internal.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static bool have_gpu(gqmm_ctx *ctx) {
  void *p = NULL;
  if (gqmm_device_alloc(ctx, 64, &p) != GQMM_OK) return false;
  gqmm_device_free(ctx, p);
  return true;
}

GQMM_TEST(cuda_declines_cleanly) {
  gqmm_ctx *ctx = test_ctx(GQMM_BACKEND_AUTO);
  CHECK(ctx);
  void *p = (void *)1;
  CHECK(gqmm_device_alloc(ctx, 64, NULL) == GQMM_ERR_NULL);
  CHECK(gqmm_device_copy(ctx, NULL, &p, 8, GQMM_COPY_HOST_TO_DEVICE) == GQMM_ERR_NULL);
  CHECK(gqmm_device_copy(ctx, &p, &p, 8, (gqmm_copy_kind)7) == GQMM_ERR_ARG);
  double k, o;
  CHECK(gqmm_device_last_time(ctx, NULL, &o) == GQMM_ERR_NULL);
  if (!have_gpu(ctx)) {
    int st = gqmm_device_alloc(ctx, 64, &p);
    CHECK(st == GQMM_ERR_UNSUPPORTED || st == GQMM_ERR_BACKEND);
    CHECK(p == NULL && gqmm_last_error(ctx)[0] != '\0');
    CHECK(gqmm_device_last_time(ctx, &k, &o) != GQMM_OK);
    /* A CUDA tensor with no GPU: an error naming the call, never a crash. */
    uint32_t wq[4 * 8] = {0};
    uint16_t s[4] = {0}, x[64] = {0}, out[4] = {0};
    int64_t ws[2] = {4, 8}, ss[2] = {4, 1}, xs[2] = {1, 64}, os[2] = {1, 4};
    gqmm_tensor tw = gqmm_tensor_make(wq, GQMM_U32, 2, ws), ts = gqmm_tensor_make(s, GQMM_BF16, 2, ss);
    gqmm_tensor tx = gqmm_tensor_make(x, GQMM_BF16, 2, xs), to = gqmm_tensor_make(out, GQMM_BF16, 2, os);
    tw.device = ts.device = tx.device = to.device = GQMM_DEVICE_CUDA;
    CHECK(gqmm_quantized_matmul(ctx, &tx, &tw, &ts, &ts, 1, (gqmm_quant){4, 64}, &to) ==
          GQMM_ERR_UNSUPPORTED);
  }
  /* CPU tensors are never taken by the CUDA backend (no host staging). */
  const gqmm__backend *be = test_backend(GQMM_BACKEND_CUDA);
  if (be) {
    gqmm__qmm_args a;
    memset(&a, 0, sizeof a);
    a.device = GQMM_DEVICE_CPU;
    a.dtype = GQMM_BF16;
    a.q = (gqmm_quant){4, 64};
    CHECK(!be->supports_qmm(ctx, &a));
  }
  gqmm_ctx_destroy(ctx);
}

/* ---- GPU correctness ------------------------------------------------------ */

typedef struct {
  const char *name;
  int E, N, K, M;         /* K: multiple of the group size, set per format */
  int batch;              /* entries of lhs/rhs; 0 = quantized_matmul (2-D w) */
  int x_batches;          /* leading dim of x */
  int transpose;
  int routing;            /* 0 random sorted, 1 random unsorted, 2 one expert, 3 skewed sorted */
} gpu_case;

typedef struct {
  void *h, *d;
  size_t bytes;
} dbuf;

static int dbuf_make(gqmm_ctx *ctx, dbuf *b, const void *host, size_t bytes) {
  b->bytes = bytes;
  b->h = NULL;
  int st = gqmm_device_alloc(ctx, bytes, &b->d);
  if (!st && host) st = gqmm_device_copy(ctx, b->d, host, bytes, GQMM_COPY_HOST_TO_DEVICE);
  return st;
}

static gqmm_tensor on_device(gqmm_tensor t, void *d) {
  t.data = d;
  t.device = GQMM_DEVICE_CUDA;
  return t;
}

static void make_indices(test_rng *r, const gpu_case *c, int32_t *lhs, int32_t *rhs) {
  for (int b = 0; b < c->batch; b++) {
    lhs[b] = (int32_t)(test_rng_u32(r) % (uint32_t)c->x_batches);
    uint32_t u = test_rng_u32(r);
    switch (c->routing) {
    case 2: rhs[b] = c->E - 1; break;
    case 3: rhs[b] = (u % 4 == 0) ? 1 : (int32_t)(u % (uint32_t)c->E) | 1; break; /* even experts empty */
    default: rhs[b] = (int32_t)(u % (uint32_t)c->E);
    }
  }
  if (c->routing == 0 || c->routing == 3) { /* sort rhs (insertion sort: small) */
    for (int i = 1; i < c->batch; i++)
      for (int j = i; j > 0 && rhs[j] < rhs[j - 1]; j--) {
        int32_t t = rhs[j];
        rhs[j] = rhs[j - 1], rhs[j - 1] = t;
      }
  }
}

/* One case's GPU call: its device tensors (host indices), output buffer
 * and flags. */
typedef struct {
  gqmm_tensor x, w, scales, biases, lhs, rhs, out;
  const dbuf *dout;
  int dense, transpose, sorted;
  gqmm_quant q;
} gpu_call;

/* The call on pk (a gqmm_pack copy), or NULL: on the MLX layout; its output
 * poisoned first, then the call, a sync and the output copied to host `got`. */
static int call_into(gqmm_ctx *gpu, gpu_call *k, const gqmm_packed *pk, const void *poison,
                     void *got) {
  const gqmm_tensor *tl = k->dense ? NULL : &k->lhs, *tr = k->dense ? NULL : &k->rhs;
  int st = gqmm_device_copy(gpu, k->dout->d, poison, k->dout->bytes, GQMM_COPY_HOST_TO_DEVICE);
  if (!st && pk)
    st = gqmm_gather_qmm_packed(gpu, &k->x, pk, tl, tr, k->sorted, &k->out);
  else if (!st)
    st = k->dense ? gqmm_quantized_matmul(gpu, &k->x, &k->w, &k->scales, &k->biases, k->transpose,
                                          k->q, &k->out)
                  : gqmm_gather_qmm(gpu, &k->x, &k->w, &k->scales, &k->biases, tl, tr, k->transpose,
                                    k->q, k->sorted, &k->out);
  if (!st) st = gqmm_device_sync(gpu);
  if (!st) st = gqmm_device_copy(gpu, got, k->dout->d, k->dout->bytes, GQMM_COPY_DEVICE_TO_HOST);
  return st;
}

/* Runs one case for one format on every config; returns 0 if all pass. */
static int run_case(gqmm_ctx *gpu, gqmm_ctx *ref, const gpu_case *c, gqmm_quant q, gqmm_dtype dt,
                    uint64_t salt) {
  test_rng r = test_rng_make(salt);
  const size_t es = gqmm_dtype_size(dt);
  const int dense = c->batch == 0;
  const int64_t E = dense ? 1 : c->E, N = c->N, K = c->K, M = c->M;
  const int64_t rows = c->transpose ? N : K, len = c->transpose ? K : N;
  const int64_t words = gqmm_packed_words(q, len), groups = len / q.group_size;
  const int64_t xb = dense ? 1 : c->x_batches, nb = dense ? 1 : c->batch;
  int fails = 0, st;
  float *wf = malloc((size_t)(E * rows * len) * es);
  uint32_t *wq = malloc((size_t)(E * rows * words) * 4);
  void *sc = malloc((size_t)(E * rows * groups) * es), *bi = malloc((size_t)(E * rows * groups) * es);
  void *x = malloc((size_t)(xb * M * K) * es);
  void *oref = malloc((size_t)(nb * M * N) * es), *ogpu = malloc((size_t)(nb * M * N) * es);
  void *poison = malloc((size_t)(nb * M * N) * es), *oplain = malloc((size_t)(nb * M * N) * es);
  int32_t *lhs = malloc((size_t)(nb + 1) * 4), *rhs = malloc((size_t)(nb + 1) * 4);
  dbuf dw = {0}, ds = {0}, db = {0}, dx = {0}, dout = {0};
  if (!wf || !wq || !sc || !bi || !x || !oref || !ogpu || !poison || !oplain || !lhs || !rhs) {
    fails = 1;
    goto done;
  }
  /* Small weights (odd salts): every scale takes gqmm_pack's factor for
   * linear dequantization (pack.cu; widths 2, 4, 8); large: none does, and
   * the pack keeps them as they are. Both must give the same results. */
  const bool small_w = salt & 1;
  test_fill(&r, wf, dt, E * rows * len, small_w ? 0.002f : 4.0f);
  test_fill(&r, x, dt, xb * M * K, 1.0f);
  test_poison(poison, dt, nb * M * N);
  int64_t wshape[3] = {E, rows, len}, qshape[3] = {E, rows, words}, sshape[3] = {E, rows, groups};
  const int wd = dense ? 2 : 3, off = dense ? 1 : 0;
  gqmm_tensor tw = gqmm_tensor_make(wf, dt, wd, wshape + off);
  gqmm_tensor tq = gqmm_tensor_make(wq, GQMM_U32, wd, qshape + off);
  gqmm_tensor ts = gqmm_tensor_make(sc, dt, wd, sshape + off), tb = gqmm_tensor_make(bi, dt, wd, sshape + off);
  if ((st = gqmm_quantize(ref, &tw, q, &tq, &ts, &tb))) {
    fprintf(stderr, "  quantize: %s\n", gqmm_last_error(ref));
    fails = 1;
    goto done;
  }
  int64_t xshape[3] = {xb, M, K}, oshape[3] = {nb, M, N}, ishape[1] = {nb};
  gqmm_tensor tx = gqmm_tensor_make(x, dt, dense ? 2 : 3, xshape + (dense ? 1 : 0));
  gqmm_tensor to = gqmm_tensor_make(oref, dt, dense ? 2 : 3, oshape + (dense ? 1 : 0));
  gqmm_tensor tl = gqmm_tensor_make(lhs, GQMM_I32, 1, ishape), tr = gqmm_tensor_make(rhs, GQMM_I32, 1, ishape);
  if (!dense) make_indices(&r, c, lhs, rhs);
  st = dense ? gqmm_quantized_matmul(ref, &tx, &tq, &ts, &tb, c->transpose, q, &to)
             : gqmm_gather_qmm(ref, &tx, &tq, &ts, &tb, &tl, &tr, c->transpose, q, c->routing != 1, &to);
  if (st) {
    fprintf(stderr, "  reference: %s\n", gqmm_last_error(ref));
    fails = 1;
    goto done;
  }
  if (dbuf_make(gpu, &dw, wq, (size_t)(E * rows * words) * 4) ||
      dbuf_make(gpu, &ds, sc, (size_t)(E * rows * groups) * es) ||
      dbuf_make(gpu, &db, bi, (size_t)(E * rows * groups) * es) ||
      dbuf_make(gpu, &dx, x, (size_t)(xb * M * K) * es) ||
      dbuf_make(gpu, &dout, NULL, (size_t)(nb * M * N) * es)) {
    fprintf(stderr, "  device alloc: %s\n", gqmm_last_error(gpu));
    fails = 1;
    goto done;
  }
  gqmm_tensor gq = on_device(tq, dw.d), gs = on_device(ts, ds.d), gb = on_device(tb, db.d);
  gpu_call call = {.x = on_device(tx, dx.d),
                   .w = gq,
                   .scales = gs,
                   .biases = gb,
                   .lhs = tl,
                   .rhs = tr,
                   .out = on_device(to, dout.d),
                   .dout = &dout,
                   .dense = dense,
                   .transpose = c->transpose,
                   .sorted = c->routing != 1,
                   .q = q};
  /* packed = 1: the same case on a gqmm_pack copy (the wgmma kernel), 2: on
   * a gqmm_pack_glu copy (rows paired, same results), where the format has
   * one; elsewhere gqmm_pack must decline (and gqmm_pack_glu refuse an odd
   * row count) */
  const bool packable = c->transpose && dt != GQMM_F32 && q.bits != 5 && q.bits != 6;
  for (int packed = 0; packed < 1 + 2 * c->transpose; packed++) {
    gqmm_packed *pk = NULL;
    if (packed) {
      st = packed == 1 ? gqmm_pack(gpu, &gq, &gs, &gb, q, &pk)
                       : gqmm_pack_glu(gpu, &gq, &gs, &gb, q, &pk);
      const int want = !packable ? GQMM_ERR_UNSUPPORTED
                       : packed == 2 && N % 2 ? GQMM_ERR_SHAPE
                                              : GQMM_OK;
      if (st != want) {
        fprintf(stderr, "  FAIL %s bits=%d gs=%d %s: %s status %d (%s)\n", c->name, q.bits,
                q.group_size, gqmm_dtype_name(dt), packed == 1 ? "gqmm_pack" : "gqmm_pack_glu", st,
                gqmm_last_error(gpu));
        fails++;
      }
      if (!pk) continue;
      const int want_lin = small_w;
      if (gqmm_packed_scaled(pk) != want_lin) {
        fprintf(stderr, "  FAIL %s bits=%d gs=%d %s: pack scaled=%d, expected %d\n", c->name, q.bits,
                q.group_size, gqmm_dtype_name(dt), gqmm_packed_scaled(pk), want_lin);
        fails++;
      }
    }
    gqmm__qmm_args probe_args;
    memset(&probe_args, 0, sizeof probe_args);
    probe_args.dtype = dt, probe_args.q = q, probe_args.transpose = c->transpose;
    probe_args.device = GQMM_DEVICE_CUDA, probe_args.M = M, probe_args.N = N, probe_args.K = K;
    probe_args.x = dx.d, probe_args.w = dw.d;
    probe_args.packed = packed ? pk : NULL;
    gqmm__tile_config cfgs[16];
    const int ncfg = test_backend(GQMM_BACKEND_CUDA)->configs(gpu, &probe_args, cfgs, 16);
    const double tol = dt == GQMM_F32 ? 1e-5 : dt == GQMM_F16 ? 4e-3 : 1.2e-2;
    /* some packed configs are compiled for some widths only (qmm_wgmma.cu):
     * the four-CTA one for 2-bit, whose stages are small enough */
    int four_cta = 0;
    for (int ci = 0; ci < ncfg; ci++) four_cta |= !strcmp(cfgs[ci].name, "mma_wg_m2_s4_b4");
    if (packed && four_cta != (q.bits == 2)) {
      fprintf(stderr, "  FAIL %s bits=%d gs=%d %s: config mma_wg_m2_s4_b4 %s\n", c->name, q.bits,
              q.group_size, gqmm_dtype_name(dt), four_cta ? "offered" : "missing");
      fails++;
    }
    for (int ci = -1; ci < ncfg; ci++) { /* -1: the built-in heuristic */
      gpu->forced_config = ci < 0 ? -1 : cfgs[ci].id;
      st = call_into(gpu, &call, packed ? pk : NULL, poison, ogpu);
      double err = st ? INFINITY : test_rel_err(ogpu, dt, oref, dt, nb * M * N);
      if (!st && ci < 0 && packed) { /* a second run: the same bits (the deal is fixed) */
        st = call_into(gpu, &call, pk, poison, oplain);
        if (!st && memcmp(oplain, ogpu, dout.bytes)) {
          fprintf(stderr, "  FAIL %s bits=%d gs=%d %s: a second run gave other bits\n", c->name,
                  q.bits, q.group_size, gqmm_dtype_name(dt));
          fails++;
        }
      }
      if (st || !(err <= tol)) {
        fprintf(stderr, "  FAIL %s bits=%d gs=%d %s config=%s%s: status %d (%s) rel_err=%.3g tol=%.1g\n",
                c->name, q.bits, q.group_size, gqmm_dtype_name(dt), ci < 0 ? "auto" : cfgs[ci].name,
                packed == 2 ? " (glu pack)" : "", st, st ? gqmm_last_error(gpu) : "", err, tol);
        fails++;
      } else if (ci < 0 && packed == 1 && gqmm_packed_scaled(pk)) {
        /* linear dequantization gives the magic path's weights bit for bit,
         * so the same MMAs give the same output bits */
        gqmm_packed *plain = NULL;
        gpu->pack_plain = 1;
        st = gqmm_pack(gpu, &gq, &gs, &gb, q, &plain);
        gpu->pack_plain = 0;
        if (!st) st = gqmm_packed_scaled(plain) ? GQMM_ERR_ARG : GQMM_OK;
        if (!st) st = call_into(gpu, &call, plain, poison, oplain);
        if (st || memcmp(oplain, ogpu, dout.bytes)) {
          fprintf(stderr, "  FAIL %s bits=%d gs=%d %s: linear and plain packs differ (status %d)\n",
                  c->name, q.bits, q.group_size, gqmm_dtype_name(dt), st);
          fails++;
        }
        gqmm_packed_free(gpu, plain);
      }
    }
    gqmm_packed_free(gpu, pk);
  }
  gpu->forced_config = -1;
done:
  gqmm_device_free(gpu, dw.d), gqmm_device_free(gpu, ds.d), gqmm_device_free(gpu, db.d);
  gqmm_device_free(gpu, dx.d), gqmm_device_free(gpu, dout.d);
  free(wf), free(wq), free(sc), free(bi), free(x), free(oref), free(ogpu), free(poison);
  free(oplain);
  free(lhs), free(rhs);
  return fails;
}

GQMM_TEST(cuda_matches_reference) {
  gqmm_ctx *gpu = test_ctx(GQMM_BACKEND_CUDA), *ref = test_ctx(GQMM_BACKEND_REF);
  CHECK(gpu && ref);
  if (!have_gpu(gpu)) {
    fprintf(stderr, "  no GPU: only the decline path is checked (cuda_declines_cleanly)\n");
    gqmm_ctx_destroy(gpu), gqmm_ctx_destroy(ref);
    return;
  }
  const char *quick_env = getenv("GQMM_CUDA_TEST_QUICK");
  const bool quick = quick_env && quick_env[0] == '1';
  /* K is set per group size below (ragged: 5 groups, not a multiple of 128). */
  const gpu_case cases[] = {
      {"moe_sorted_skewed", 8, 136, 0, 1, 90, 90, 1, 3},
      {"moe_unsorted", 6, 200, 0, 1, 64, 23, 1, 1},
      {"one_expert_70_rows", 5, 72, 0, 1, 70, 70, 1, 2},
      /* rows of 100 values: no 16-byte output runs (the element-wise store) */
      {"moe_n100", 7, 100, 0, 1, 50, 50, 1, 0},
      {"batched_M5", 8, 96, 0, 5, 6, 4, 1, 0},
      {"dense_M37", 1, 264, 0, 37, 0, 1, 1, 0},
      {"transpose_false", 4, 128, 0, 2, 7, 3, 0, 1},
  };
  const int bits[] = {4, 3, 2, 8, 5, 6};
  const int gsz[] = {64, 32, 128};
  const gqmm_dtype dts[] = {GQMM_BF16, GQMM_F16, GQMM_F32};
  int fails = 0, runs = 0;
  uint64_t salt = 1000;
  for (int bi = 0; bi < (quick ? 2 : 6); bi++)
    for (int gi = 0; gi < (quick ? 1 : 3); gi++)
      for (int di = 0; di < (quick ? 1 : 3); di++)
        for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
          gpu_case c = cases[ci];
          c.K = 5 * gsz[gi];
          if (!c.transpose && c.N % gsz[gi]) c.N = 2 * gsz[gi];
          fails += run_case(gpu, ref, &c, (gqmm_quant){bits[bi], gsz[gi]}, dts[di], salt++);
          runs++;
        }
  /* more experts than the routing kernel counts in shared memory (route.cu:
   * its global-memory counters), M > 1, unsorted */
  const gpu_case many = {"many_experts_M3", 4500, 16, 160, 3, 300, 50, 1, 1};
  fails += run_case(gpu, ref, &many, (gqmm_quant){4, 32}, GQMM_BF16, salt++);
  runs++;
  /* More units than the persistent grid has CTAs (up to 4 an SM: 528 on
   * 132 SMs), so every CTA walks several (the deal, mma_common.cuh): 64 or
   * 40 experts x 9 or 11 N tiles (the last of 76 rows), two or more chunks
   * an expert, K of a half last stage. (Session 17's stream-K deal, which
   * cut units between CTAs, was checked on these; perf-notes.) The
   * heuristic's run is repeated and must give the same bits. */
  const gpu_case sk[] = {{"many_units_unsorted", 64, 1100, 0, 1, 1600, 400, 1, 1},
                         {"many_units_skewed", 40, 1408, 0, 1, 1500, 300, 1, 3}};
  const struct {
    gqmm_quant q;
    gqmm_dtype dt;
  } skf[] = {
      {{4, 64}, GQMM_BF16}, {{2, 32}, GQMM_F16}, {{3, 128}, GQMM_BF16}, {{8, 64}, GQMM_BF16}};
  for (int fi = 0; fi < (quick ? 1 : 4); fi++)
    for (int ci = 0; ci < 2; ci++) {
      gpu_case c = sk[ci];
      c.K = 5 * skf[fi].q.group_size;
      fails += run_case(gpu, ref, &c, skf[fi].q, skf[fi].dt, salt++);
      runs++;
    }
  fprintf(stderr, "  %d GPU cases (each on every config), %d failures\n", runs, fails);
  gqmm_ctx_destroy(gpu), gqmm_ctx_destroy(ref);
  CHECK(fails == 0);
}

/* gqmm_pack and the packed op refuse what they cannot do, with a message. */
GQMM_TEST(cuda_pack_rejects_bad_input) {
  gqmm_ctx *ctx = test_ctx(GQMM_BACKEND_AUTO);
  CHECK(ctx);
  uint32_t wq[4 * 8] = {1};
  uint16_t s[4 * 4] = {1}, x[64] = {1}, out[4] = {0};
  int64_t ws[2] = {4, 8}, ss[2] = {4, 1}, xs[2] = {1, 64}, os[2] = {1, 4};
  gqmm_tensor tw = gqmm_tensor_make(wq, GQMM_U32, 2, ws), ts = gqmm_tensor_make(s, GQMM_BF16, 2, ss);
  gqmm_tensor tx = gqmm_tensor_make(x, GQMM_BF16, 2, xs), to = gqmm_tensor_make(out, GQMM_BF16, 2, os);
  gqmm_packed *pk = (gqmm_packed *)&pk;
  CHECK(gqmm_pack(ctx, &tw, &ts, &ts, (gqmm_quant){4, 64}, NULL) == GQMM_ERR_NULL);
  CHECK(gqmm_pack(ctx, &tw, &ts, NULL, (gqmm_quant){4, 64}, &pk) == GQMM_ERR_NULL && pk == NULL);
  /* host tensors pack for the CPU (one panel of one record: 64 rows x 64
   * values of 4 bits, then 64 scales and 64 biases; then the two records of
   * zeros the kernels may prefetch past the last panel, cpu_isa.h
   * GQMM__CPU_PK_PREFETCH), not on a reference context, which packs nothing */
  CHECK(gqmm_pack(ctx, &tw, &ts, &ts, (gqmm_quant){4, 64}, &pk) == GQMM_OK && pk != NULL);
  CHECK(gqmm_packed_nbytes(pk) == 3 * (64 * 64 / 2 + 64 * 2 * 2));
  gqmm_packed_free(ctx, pk);
  gqmm_ctx *ref = test_ctx(GQMM_BACKEND_REF);
  CHECK(ref && gqmm_pack(ref, &tw, &ts, &ts, (gqmm_quant){4, 64}, &pk) == GQMM_ERR_UNSUPPORTED);
  CHECK(strstr(gqmm_last_error(ref), "CPU backend") != NULL && pk == NULL);
  gqmm_ctx_destroy(ref);
  /* 5-bit has no packed layout; 4 words of 8 bits hold 32 values, K=32 */
  int64_t ws5[2] = {4, 5};
  gqmm_tensor tw5 = gqmm_tensor_make(wq, GQMM_U32, 2, ws5);
  int64_t ss5[2] = {4, 1};
  gqmm_tensor ts5 = gqmm_tensor_make(s, GQMM_BF16, 2, ss5);
  CHECK(gqmm_pack(ctx, &tw5, &ts5, &ts5, (gqmm_quant){5, 32}, &pk) == GQMM_ERR_UNSUPPORTED);
  CHECK(strstr(gqmm_last_error(ctx), "5-bit") != NULL);
  /* scales whose shape does not match w */
  int64_t bad[2] = {3, 1};
  gqmm_tensor tbad = gqmm_tensor_make(s, GQMM_BF16, 2, bad);
  CHECK(gqmm_pack(ctx, &tw, &tbad, &ts, (gqmm_quant){4, 64}, &pk) == GQMM_ERR_SHAPE);
  /* a GLU pack needs gate and up rows: an even row count */
  int64_t ws3[2] = {3, 8};
  gqmm_tensor tw3 = gqmm_tensor_make(wq, GQMM_U32, 2, ws3), ts3 = gqmm_tensor_make(s, GQMM_BF16, 2, bad);
  CHECK(gqmm_pack_glu(ctx, &tw3, &ts3, &ts3, (gqmm_quant){4, 64}, &pk) == GQMM_ERR_SHAPE && pk == NULL);
  CHECK(strstr(gqmm_last_error(ctx), "gqmm_pack_glu") != NULL);
  CHECK(gqmm_gather_qmm_packed(ctx, &tx, NULL, NULL, NULL, 0, &to) == GQMM_ERR_NULL);
  CHECK(gqmm_packed_nbytes(NULL) == 0 && gqmm_packed_scaled(NULL) == 0);
  gqmm_packed_free(ctx, NULL);
  if (have_gpu(ctx)) {
    void *dw = NULL, *dsb = NULL;
    CHECK(gqmm_device_alloc(ctx, sizeof wq, &dw) == GQMM_OK);
    CHECK(gqmm_device_alloc(ctx, sizeof s, &dsb) == GQMM_OK);
    gqmm_tensor gw = tw, gs = ts;
    gw.data = dw, gs.data = dsb, gw.device = gs.device = GQMM_DEVICE_CUDA;
    CHECK(gqmm_pack(ctx, &gw, &gs, &gs, (gqmm_quant){4, 64}, &pk) == GQMM_OK && pk != NULL);
    /* 4 rows: one half tile (kernels.h), half a full stage block */
    CHECK(gqmm_packed_nbytes(pk) == (128 * 128 / 2 + 128 * 2 * 4) / 2);
    gqmm_packed *glu = NULL; /* a GLU pack's tiles are whole */
    CHECK(gqmm_pack_glu(ctx, &gw, &gs, &gs, (gqmm_quant){4, 64}, &glu) == GQMM_OK && glu != NULL);
    CHECK(gqmm_packed_nbytes(glu) == 128 * 128 / 2 + 128 * 2 * 4);
    gqmm_packed_free(ctx, glu);
    /* host x with packed (device) weights; a context forced to the CPU */
    CHECK(gqmm_gather_qmm_packed(ctx, &tx, pk, NULL, NULL, 0, &to) != GQMM_OK);
    gqmm_ctx *cpu = test_ctx(GQMM_BACKEND_CPU);
    gqmm_tensor gx = tx, go = to;
    void *dx = NULL, *dout = NULL;
    CHECK(gqmm_device_alloc(ctx, sizeof x, &dx) == GQMM_OK && gqmm_device_alloc(ctx, sizeof out, &dout) == GQMM_OK);
    gx.data = dx, go.data = dout, gx.device = go.device = GQMM_DEVICE_CUDA;
    CHECK(gqmm_gather_qmm_packed(cpu, &gx, pk, NULL, NULL, 0, &go) == GQMM_ERR_UNSUPPORTED);
    CHECK(strstr(gqmm_last_error(cpu), "packed") != NULL);
    /* x whose K differs from the packed weights' */
    int64_t xs2[2] = {1, 32};
    gqmm_tensor gx2 = gqmm_tensor_make(dx, GQMM_BF16, 2, xs2);
    gx2.device = GQMM_DEVICE_CUDA;
    CHECK(gqmm_gather_qmm_packed(ctx, &gx2, pk, NULL, NULL, 0, &go) == GQMM_ERR_SHAPE);
    gqmm_ctx_destroy(cpu);
    gqmm_packed_free(ctx, pk);
    gqmm_device_free(ctx, dw), gqmm_device_free(ctx, dsb), gqmm_device_free(ctx, dx), gqmm_device_free(ctx, dout);
  }
  gqmm_ctx_destroy(ctx);
}
