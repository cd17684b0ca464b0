/*
 * test_cpu.c - the CPU backend against the scalar reference: every ISA this
 * machine can run (forced through the context option cpu_isa, so the AVX2
 * and portable kernels are checked even where AVX-512 would be picked),
 * every bits x group size x dtype, both paths (small-M qmv and the panel
 * gemm) and every block-size configuration, ragged shapes, experts with no
 * rows, skewed routing, unsorted indices (must equal the sorted path bit
 * for bit) and thread counts (results must not depend on them).
 */
#include "../../src/cpu/cpu_isa.h" /* the ISA rows, for the conversion test */
#include "internal.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const isas[] = {"portable", "avx2", "avx512"};
static const int all_bits[] = {2, 3, 4, 5, 6, 8};
static const int all_groups[] = {32, 64, 128};
static const gqmm_dtype all_dtypes[] = {GQMM_F32, GQMM_F16, GQMM_BF16};

/* A gather_qmm problem with its inputs (quantized with the reference). */
typedef struct {
  int E, M, N, K, batch, transpose;
  gqmm_quant q;
  gqmm_dtype dt;
  void *x, *sc, *bi;
  uint32_t *wq;
  int32_t *idx;
} problem;

static void problem_free(problem *p) {
  free(p->x), free(p->sc), free(p->bi), free(p->wq), free(p->idx);
  memset(p, 0, sizeof *p);
}

/* Routing: idx[i] = expert of batch entry i; mode 0 random, 1 skewed (most
 * rows to one expert, some experts empty). Sorted if `sorted`. */
static int problem_make(problem *p, test_rng *r, int mode, bool sorted) {
  const int64_t wrows = p->transpose ? p->N : p->K, wlen = p->transpose ? p->K : p->N;
  const int64_t n_w = (int64_t)p->E * wrows * wlen,
                n_sb = (int64_t)p->E * wrows * (wlen / p->q.group_size);
  const size_t es = gqmm_dtype_size(p->dt);
  float *wf = malloc((size_t)n_w * 4), *s32 = malloc((size_t)n_sb * 4),
        *b32 = malloc((size_t)n_sb * 4);
  p->x = malloc((size_t)p->batch * p->M * p->K * es);
  p->sc = malloc((size_t)n_sb * es);
  p->bi = malloc((size_t)n_sb * es);
  p->wq = malloc((size_t)(p->E * wrows * gqmm_packed_words(p->q, wlen)) * 4);
  p->idx = malloc((size_t)p->batch * 4);
  gqmm_ctx *rctx = NULL;
  int st = GQMM_ERR_NOMEM;
  if (!wf || !s32 || !b32 || !p->x || !p->sc || !p->bi || !p->wq || !p->idx) goto out;
  for (int64_t i = 0; i < n_w; i++)
    wf[i] = test_rng_normal(r) + 0.3f;
  test_fill(r, p->x, p->dt, (int64_t)p->batch * p->M * p->K, 1.0f);
  for (int i = 0; i < p->batch; i++) {
    int e = (int)(test_rng_u32(r) % (uint32_t)p->E);
    if (mode == 1) e = (test_rng_u32(r) % 8) ? p->E / 2 : (e % 2 ? e : (e + 1) % p->E);
    p->idx[i] = e;
  }
  if (sorted)
    for (int i = 1; i < p->batch; i++)
      for (int j = i; j > 0 && p->idx[j - 1] > p->idx[j]; j--) {
        int32_t t = p->idx[j];
        p->idx[j] = p->idx[j - 1];
        p->idx[j - 1] = t;
      }
  int64_t wshape[3] = {p->E, wrows, wlen}, qshape[3] = {p->E, wrows, gqmm_packed_words(p->q, wlen)};
  int64_t sshape[3] = {p->E, wrows, wlen / p->q.group_size};
  gqmm_tensor tw = gqmm_tensor_make(wf, GQMM_F32, 3, wshape),
              twq = gqmm_tensor_make(p->wq, GQMM_U32, 3, qshape);
  gqmm_tensor ts = gqmm_tensor_make(s32, GQMM_F32, 3, sshape),
              tb = gqmm_tensor_make(b32, GQMM_F32, 3, sshape);
  gqmm_ctx_options o = {.backend = GQMM_BACKEND_REF};
  if ((st = gqmm_ctx_create(&rctx, &o))) goto out;
  if ((st = gqmm_quantize(rctx, &tw, p->q, &twq, &ts, &tb))) goto out;
  gqmm__convert(p->sc, p->dt, s32, GQMM_F32, n_sb);
  gqmm__convert(p->bi, p->dt, b32, GQMM_F32, n_sb);
out:
  gqmm_ctx_destroy(rctx);
  free(wf), free(s32), free(b32);
  return st;
}

typedef struct {
  const char *isa;
  int threads, config, int8;
  int packed; /* gqmm_pack the weights on the runner's context, then gather_qmm_packed */
} runner;

/* Runs the problem on `how` (or the reference if how.isa is NULL) into out. */
static int problem_run(const problem *p, runner how, void *out, char *err, size_t errlen) {
  const int64_t wrows = p->transpose ? p->N : p->K, wlen = p->transpose ? p->K : p->N;
  int64_t xshape[3] = {p->batch, p->M, p->K},
          qshape[3] = {p->E, wrows, gqmm_packed_words(p->q, wlen)};
  int64_t sshape[3] = {p->E, wrows, wlen / p->q.group_size}, ishape[1] = {p->batch};
  int64_t oshape[3] = {p->batch, p->M, p->N};
  gqmm_tensor tx = gqmm_tensor_make(p->x, p->dt, 3, xshape),
              twq = gqmm_tensor_make(p->wq, GQMM_U32, 3, qshape);
  gqmm_tensor ts = gqmm_tensor_make(p->sc, p->dt, 3, sshape),
              tb = gqmm_tensor_make(p->bi, p->dt, 3, sshape);
  gqmm_tensor ti = gqmm_tensor_make(p->idx, GQMM_I32, 1, ishape),
              to = gqmm_tensor_make(out, p->dt, 3, oshape);
  gqmm_ctx_options o = {.backend = how.isa ? GQMM_BACKEND_CPU : GQMM_BACKEND_REF,
                        .num_threads = how.threads,
                        .cpu_isa = how.isa,
                        .cpu_int8_activations = how.int8};
  gqmm_ctx *ctx = NULL;
  int st = gqmm_ctx_create(&ctx, &o);
  if (st) return st;
  ctx->forced_config = how.config;
  test_poison(out, p->dt, (int64_t)p->batch * p->M * p->N);
  gqmm_packed *pk = NULL;
  if (how.packed && !(st = gqmm_pack(ctx, &twq, &ts, &tb, p->q, &pk)))
    st = gqmm_gather_qmm_packed(ctx, &tx, pk, NULL, &ti, 1, &to);
  else if (!how.packed)
    st = gqmm_gather_qmm(ctx, &tx, &twq, &ts, &tb, NULL, &ti, p->transpose, p->q, 1, &to);
  gqmm_packed_free(ctx, pk);
  if (st)
    snprintf(err, errlen, "%s", gqmm_last_error(ctx));
  else if (how.isa && strncmp(gqmm_last_backend(ctx), "cpu-", 4))
    snprintf(err, errlen, "ran on %s, not the cpu backend", gqmm_last_backend(ctx)), st = -99;
  gqmm_ctx_destroy(ctx);
  return st;
}

static bool isa_available(const char *isa) {
  gqmm_ctx_options o = {.backend = GQMM_BACKEND_CPU, .cpu_isa = isa, .num_threads = 1};
  gqmm_ctx *ctx = NULL;
  if (gqmm_ctx_create(&ctx, &o)) return false;
  ctx->forced_config = -1;
  uint16_t x[32] = {0}, s[1] = {0x3f80}, b[1] = {0}, out[1];
  uint32_t w[4] = {0};
  int64_t xs[2] = {1, 32}, ws[2] = {1, 4}, ss[2] = {1, 1}, os[2] = {1, 1};
  gqmm_tensor tx = gqmm_tensor_make(x, GQMM_BF16, 2, xs), tw = gqmm_tensor_make(w, GQMM_U32, 2, ws);
  gqmm_tensor ts = gqmm_tensor_make(s, GQMM_BF16, 2, ss),
              tb = gqmm_tensor_make(b, GQMM_BF16, 2, ss);
  gqmm_tensor to = gqmm_tensor_make(out, GQMM_BF16, 2, os);
  int st = gqmm_quantized_matmul(ctx, &tx, &tw, &ts, &tb, 1, (gqmm_quant){4, 32}, &to);
  gqmm_ctx_destroy(ctx);
  return st == GQMM_OK;
}

static double tol_for(gqmm_dtype dt) {
  return dt == GQMM_F32 ? 2e-5 : dt == GQMM_F16 ? 3e-3 : 1e-2;
}

/* Checks one problem on one runner against the reference; returns the error. */
#define CHECK_AGAINST_REF(p, how, tol)                                                          \
  do {                                                                                          \
    const int64_t n_out_ = (int64_t)(p).batch * (p).M * (p).N;                                  \
    const size_t es_ = gqmm_dtype_size((p).dt);                                                 \
    void *ref_ = malloc((size_t)n_out_ * es_), *got_ = malloc((size_t)n_out_ * es_);            \
    char err_[512] = "";                                                                        \
    int sr_ = ref_ && got_ ? problem_run(&(p), (runner){0}, ref_, err_, sizeof err_) : -12;     \
    int sg_ = sr_ ? sr_ : problem_run(&(p), (how), got_, err_, sizeof err_);                    \
    double e_ = sg_ ? INFINITY : test_rel_err(got_, (p).dt, ref_, (p).dt, n_out_);              \
    free(ref_), free(got_);                                                                     \
    CHECK_MSG(e_ <= (tol),                                                                      \
              "isa %s threads %d config %d int8 %d packed %d bits %d gs %d %s M %d N %d "       \
              "K %d E %d batch %d T %d: rel err %.3g (status %d %s)",                           \
              (how).isa, (how).threads, (how).config, (how).int8, (how).packed, (p).q.bits,     \
              (p).q.group_size, gqmm_dtype_name((p).dt), (p).M, (p).N, (p).K, (p).E, (p).batch, \
              (p).transpose, e_, sg_, err_);                                                    \
  } while (0)

GQMM_TEST(cpu_every_isa_format_dtype_matches_reference) {
  test_rng r = test_rng_make(701);
  for (size_t ii = 0; ii < 3; ii++) {
    if (!isa_available(isas[ii])) continue;
    for (int bi = 0; bi < 6; bi++)
      for (int gi = 0; gi < 3; gi++)
        for (int di = 0; di < 3; di++) {
          /* M=1 over many entries (qmv, 1..few rows per expert), M=9 (blocks
           * of 9+ rows: the panel gemm; 6-8 rows run as two qmv halves) */
          const int Ms[2] = {1, 9};
          for (int mi = 0; mi < 2; mi++) {
            problem p = {.E = 5,
                         .M = Ms[mi],
                         .N = 37,
                         .K = 3 * all_groups[gi] + (gi == 0 ? 32 : 0),
                         .batch = 11,
                         .transpose = 1,
                         .q = {all_bits[bi], all_groups[gi]},
                         .dt = all_dtypes[di]};
            CHECK_OK(problem_make(&p, &r, 0, mi == 0));
            CHECK_AGAINST_REF(p, ((runner){isas[ii], 2, -1, 0, 0}), tol_for(p.dt));
            problem_free(&p);
          }
        }
  }
}

/* gqmm_pack on the CPU (cpu_pack.c) and its kernels: every ISA (the
 * portable kernel where there is no vdpbf16ps one, or x is not bf16), 2-
 * and 4-bit, every group size, f16 and bf16; panels whole and ragged (N = 100:
 * a pair with a partial second panel; 200: a pair and a pair whose second
 * panel has 8 rows), one row per expert and blocks of many rows (tiles of
 * 1-4 rows and their tails), skewed routing with empty experts. */
GQMM_TEST(cpu_packed_matches_reference) {
  test_rng r = test_rng_make(731);
  static const int pk_bits[] = {2, 4};
  for (size_t ii = 0; ii < 3; ii++) {
    if (!isa_available(isas[ii])) continue;
    for (int bi = 0; bi < 2; bi++)
      for (int gi = 0; gi < 3; gi++)
        for (int di = 1; di < 3; di++) /* 16-bit scales (float32 ones are refused below) */
          for (int c = 0; c < 2; c++) {
            problem p = {.E = c ? 3 : 5,
                         .M = c ? 3 : 1,
                         .N = c ? 200 : 100,
                         .K = 3 * all_groups[gi] + (gi == 0 ? 32 : 0),
                         .batch = c ? 9 : 23,
                         .transpose = 1,
                         .q = {pk_bits[bi], all_groups[gi]},
                         .dt = all_dtypes[di]};
            CHECK_OK(problem_make(&p, &r, c, c == 0));
            CHECK_AGAINST_REF(p, ((runner){isas[ii], 2, -1, 0, 1}), tol_for(p.dt));
            problem_free(&p);
          }
  }
}

/* An integer-valued problem: random q values packed by the bit-stream rule,
 * scales powers of two, biases and x small integers. Every product and
 * every partial sum is then an integer below 2^24, exact in float32 as in
 * the reference's float64, so both round the same value to the output
 * dtype, whatever the order of the sums. */
static int problem_make_int(problem *p, test_rng *r) {
  const int64_t wrows = p->transpose ? p->N : p->K, wlen = p->transpose ? p->K : p->N;
  const int64_t words = gqmm_packed_words(p->q, wlen),
                n_sb = p->E * wrows * (wlen / p->q.group_size);
  const int64_t n_x = (int64_t)p->batch * p->M * p->K;
  const size_t es = gqmm_dtype_size(p->dt);
  float *f = malloc((size_t)(n_x > n_sb ? n_x : n_sb) * 4);
  p->x = malloc((size_t)n_x * es), p->sc = malloc((size_t)n_sb * es);
  p->bi = malloc((size_t)n_sb * es), p->idx = malloc((size_t)p->batch * 4);
  p->wq = calloc((size_t)(p->E * wrows * words), 4);
  if (!f || !p->x || !p->sc || !p->bi || !p->wq || !p->idx) return free(f), GQMM_ERR_NOMEM;
  for (int64_t row = 0; row < p->E * wrows; row++) {
    uint8_t *w = (uint8_t *)(p->wq + row * words);
    for (int64_t j = 0; j < wlen; j++) {
      const uint32_t q = test_rng_u32(r) & ((1u << p->q.bits) - 1);
      const int64_t bit = j * p->q.bits;
      w[bit >> 3] |= (uint8_t)(q << (bit & 7));
      if ((bit & 7) + p->q.bits > 8) w[(bit >> 3) + 1] |= (uint8_t)(q >> (8 - (bit & 7)));
    }
  }
  for (int64_t i = 0; i < n_sb; i++)
    f[i] = (float)(1 << (test_rng_u32(r) % 3)) * 0.5f;
  gqmm__convert(p->sc, p->dt, f, GQMM_F32, n_sb);
  for (int64_t i = 0; i < n_sb; i++)
    f[i] = (float)((int)(test_rng_u32(r) % 9) - 4);
  gqmm__convert(p->bi, p->dt, f, GQMM_F32, n_sb);
  for (int64_t i = 0; i < n_x; i++)
    f[i] = (float)((int)(test_rng_u32(r) % 7) - 3);
  gqmm__convert(p->x, p->dt, f, GQMM_F32, n_x);
  for (int i = 0; i < p->batch; i++)
    p->idx[i] = (int32_t)(test_rng_u32(r) % (uint32_t)p->E);
  free(f);
  return GQMM_OK;
}

/* Integer-valued problems must match the reference bit for bit on every ISA,
 * width, group size, dtype and path (qmv at 1-4 rows, the split qmv at 6
 * and 8, qmv passes or panels from 9 rows up at 9, 13, 20 and 40 rows and
 * their multiples: the bf16 panel's slabs of 16, a ragged last one or the
 * last 1-8 rows in qmv passes; transpose=0): the relative-error checks cannot
 * see a wrong lane or table entry that moves a bf16 result by less than
 * their tolerance (1e-2); this one sees any. */
GQMM_TEST(cpu_integer_problems_match_reference_bitwise) {
  test_rng r = test_rng_make(716);
  static const int Ms[] = {1, 2, 3, 4, 6, 8, 13, 40, 7, 20, 9}; /* transpose=0 at 3, 8, 7 */
  for (size_t ii = 0; ii < 3; ii++) {
    if (!isa_available(isas[ii])) continue;
    for (int bi = 0; bi < 6; bi++)
      for (int gi = 0; gi < 3; gi++)
        for (int di = 0; di < 3; di++)
          for (int mi = 0; mi < 11; mi++) {
            const int gs = all_groups[gi], T = mi % 3 != 2;
            problem p = {.E = 3,
                         .M = Ms[mi],
                         .N = 37,
                         .K = gs * (gs == 128 ? 3 : 5),
                         .batch = 4,
                         .transpose = T,
                         .q = {all_bits[bi], gs},
                         .dt = all_dtypes[di]};
            if (!T) p.N = 2 * gs; /* transpose=0: N is the packed length */
            CHECK_OK(problem_make_int(&p, &r));
            const int64_t n = (int64_t)p.batch * p.M * p.N;
            const size_t bytes = (size_t)n * gqmm_dtype_size(p.dt);
            void *ref = malloc(bytes), *got = malloc(bytes);
            char err[256] = "";
            CHECK(ref && got);
            int st = problem_run(&p, (runner){0}, ref, err, sizeof err);
            if (!st) st = problem_run(&p, (runner){isas[ii], 2, -1, 0, 0}, got, err, sizeof err);
            CHECK_MSG(!st, "isa %s bits %d gs %d M %d transpose %d: %s", isas[ii], p.q.bits, gs,
                      p.M, T, err);
            int64_t bad = 0;
            while (bad < n && !memcmp((char *)got + bad * (int64_t)gqmm_dtype_size(p.dt),
                                      (char *)ref + bad * (int64_t)gqmm_dtype_size(p.dt),
                                      gqmm_dtype_size(p.dt)))
              bad++;
            CHECK_MSG(bad == n,
                      "isa %s bits %d gs %d %s M %d transpose %d: element %lld is %g, "
                      "the reference %g",
                      isas[ii], p.q.bits, gs, gqmm_dtype_name(p.dt), p.M, T, (long long)bad,
                      bad < n ? gqmm__load_f(got, p.dt, bad) : 0.0,
                      bad < n ? gqmm__load_f(ref, p.dt, bad) : 0.0);
            free(ref), free(got);
            problem_free(&p);
          }
  }
}

/* The small-M path blocks K at 3 and 4 rows per expert (4096 / R floats of
 * x per block, rounded to groups): K = 2816 gives 2-3 blocks, the last one
 * ragged; blocks of 6-8 rows run the qmv kernel as two halves (3+3, 4+3,
 * 4+4) over a split x block, K-blocked alike. Every width and group size,
 * both half-precision dtypes (f32 takes the panel path). */
GQMM_TEST(cpu_qmv_k_blocks_match_reference) {
  test_rng r = test_rng_make(709);
  const int Ms[5] = {3, 4, 6, 7, 8};
  for (size_t ii = 0; ii < 3; ii++) {
    if (!isa_available(isas[ii])) continue;
    for (int bi = 0; bi < 6; bi++)
      for (int gi = 0; gi < 3; gi++)
        for (int mi = 0; mi < 5; mi++) {
          problem p = {.E = 2,
                       .M = Ms[mi],
                       .N = 29,
                       .K = 2816,
                       .batch = 1, /* one entry: exactly M rows per block */
                       .transpose = 1,
                       .q = {all_bits[bi], all_groups[gi]},
                       .dt = all_dtypes[1 + (bi + gi + mi) % 2]};
          CHECK_OK(problem_make(&p, &r, 0, true));
          CHECK_AGAINST_REF(p, ((runner){isas[ii], 2, -1, 0, 0}), tol_for(p.dt));
          problem_free(&p);
        }
  }
}

/* False once cfg is past the end of this ISA's block-size table. */
static bool config_exists(const problem *p, const char *isa, int cfg) {
  char err[256];
  void *tmp = malloc((size_t)p->batch * p->M * p->N * 4);
  int st = problem_run(p, (runner){isa, 1, cfg, 0, 0}, tmp, err, sizeof err);
  free(tmp);
  return !(st == GQMM_ERR_ARG && cfg > 0);
}

GQMM_TEST(cpu_every_config_and_row_count) {
  test_rng r = test_rng_make(702);
  for (size_t ii = 0; ii < 3; ii++) {
    if (!isa_available(isas[ii])) continue;
    for (int cfg = 0; cfg < 16; cfg++) {
      for (int M = 1; M <= 13; M += 3) {
        /* K = 320: a kc=256 block plus a ragged remainder; N = 53: ragged
         * tiles; bf16 at odd M (the config's qmv rows, split blocks), f32
         * (always the panel) at even M */
        problem p = {.E = 3,
                     .M = M,
                     .N = 53,
                     .K = 320,
                     .batch = 4,
                     .transpose = 1,
                     .q = {cfg % 2 ? 3 : 4, cfg % 3 ? 64 : 32},
                     .dt = M % 2 ? GQMM_BF16 : GQMM_F32};
        CHECK_OK(problem_make(&p, &r, 0, true));
        if (!config_exists(&p, isas[ii], cfg)) {
          problem_free(&p);
          break;
        }
        CHECK_AGAINST_REF(p, ((runner){isas[ii], 2, cfg, 0, 0}), tol_for(p.dt));
        problem_free(&p);
      }
    }
  }
}

/* The panel path's blocking: row counts that cross the configs' mc blocks
 * (4, 6, 8, 12, 16, 30, 32 rows) with tails shorter than mr, and K that is
 * one kc block (the gemm's first and last phase at once: no accumulator
 * round trip), several (K = 1152: 9 blocks of 128, 4.5 of 256, 2.25 of 512,
 * a ragged last block for most kc), or less than kc (1024). f32 always runs
 * the panel; bf16 at these row counts too. */
GQMM_TEST(cpu_gemm_row_blocks_and_k_phases) {
  test_rng r = test_rng_make(713);
  const int Ms[3] = {17, 26, 35}, Ks[2] = {128, 1152};
  for (size_t ii = 0; ii < 3; ii++) {
    if (!isa_available(isas[ii])) continue;
    for (int cfg = 0; cfg < 16; cfg++)
      for (int mi = 0; mi < 3; mi++)
        for (int ki = 0; ki < 2; ki++) {
          problem p = {.E = 2,
                       .M = Ms[mi],
                       .N = 31,
                       .K = Ks[ki],
                       .batch = 1, /* one entry: exactly M rows per block */
                       .transpose = 1,
                       .q = {all_bits[(cfg + mi) % 6], all_groups[(cfg + ki) % 3]},
                       .dt = (mi + ki) % 2 ? GQMM_BF16 : GQMM_F32};
          CHECK_OK(problem_make(&p, &r, 0, true));
          if (!config_exists(&p, isas[ii], cfg)) {
            problem_free(&p);
            cfg = 16; /* and the loops above end */
            break;
          }
          CHECK_AGAINST_REF(p, ((runner){isas[ii], 2, cfg, 0, 0}), tol_for(p.dt));
          problem_free(&p);
        }
  }
}

GQMM_TEST(cpu_transpose_false_matches_reference) {
  test_rng r = test_rng_make(703);
  for (size_t ii = 0; ii < 3; ii++) {
    if (!isa_available(isas[ii])) continue;
    for (int bi = 0; bi < 6; bi++)
      for (int di = 0; di < 3; di++) {
        problem p = {.E = 4,
                     .M = 3,
                     .N = 384,
                     .K = 45,
                     .batch = 6,
                     .transpose = 0,
                     .q = {all_bits[bi], all_groups[(bi + di) % 3]},
                     .dt = all_dtypes[di]};
        CHECK_OK(problem_make(&p, &r, 0, false));
        CHECK_AGAINST_REF(p, ((runner){isas[ii], 2, -1, 0, 0}), tol_for(p.dt));
        problem_free(&p);
      }
  }
}

/* Bitwise equality of two runs of the same problem. */
static bool same_bits(const problem *p, runner a, runner b, char *err, size_t errlen) {
  const size_t n = (size_t)p->batch * p->M * p->N * gqmm_dtype_size(p->dt);
  void *oa = malloc(n), *ob = malloc(n);
  bool ok = oa && ob && !problem_run(p, a, oa, err, errlen) &&
            !problem_run(p, b, ob, err, errlen) && !memcmp(oa, ob, n);
  free(oa), free(ob);
  return ok;
}

GQMM_TEST(cpu_results_do_not_depend_on_thread_count) {
  test_rng r = test_rng_make(704);
  for (int M = 1; M <= 9; M += 8) {
    problem p = {.E = 16,
                 .M = M,
                 .N = 300,
                 .K = 256,
                 .batch = 64,
                 .transpose = 1,
                 .q = {4, 64},
                 .dt = GQMM_BF16};
    CHECK_OK(problem_make(&p, &r, 1, true));
    char err[256] = "";
    for (int t = 2; t <= 5; t++)
      CHECK_MSG(same_bits(&p, (runner){"avx2", 1, -1, 0, 0}, (runner){"avx2", t, -1, 0, 0}, err,
                          sizeof err) ||
                    !isa_available("avx2"),
                "threads 1 vs %d differ (M %d) %s", t, M, err);
    CHECK(same_bits(&p, (runner){"portable", 1, -1, 0, 0}, (runner){"portable", 3, -1, 0, 0}, err,
                    sizeof err));
    problem_free(&p);
  }
}

/* Packed weights, integer-valued problems: bit for bit equal to the
 * reference (a wrong lane, slot field or table entry shows however small),
 * for tiles of 1, 2, 3 and 4 rows and their mixes (blocks of 1-2 rows per
 * entry, 5 and 13 rows), three panels (a pair, then one alone) and 2- and
 * 4-bit at every group size; and the same bits for 1 and 3 threads. */
GQMM_TEST(cpu_packed_integer_problems_bitwise_and_threads) {
  test_rng r = test_rng_make(732);
  static const int Ms[] = {1, 2, 3, 5, 13};
  for (size_t ii = 0; ii < 3; ii++) {
    if (!isa_available(isas[ii])) continue;
    for (int bits = 2; bits <= 4; bits += 2)
      for (int gi = 0; gi < 3; gi++)
        for (int mi = 0; mi < 5; mi++) {
          problem p = {.E = 4,
                       .M = Ms[mi],
                       .N = 130,
                       .K = 2 * all_groups[gi],
                       .batch = 6,
                       .transpose = 1,
                       .q = {bits, all_groups[gi]},
                       .dt = all_dtypes[1 + (gi + mi) % 2]};
          CHECK_OK(problem_make_int(&p, &r));
          char err[256] = "";
          CHECK_MSG(same_bits(&p, (runner){0}, (runner){isas[ii], 2, -1, 0, 1}, err, sizeof err),
                    "isa %s bits %d gs %d %s M %d: packed differs from the reference %s", isas[ii],
                    bits, p.q.group_size, gqmm_dtype_name(p.dt), p.M, err);
          CHECK_MSG(same_bits(&p, (runner){isas[ii], 1, -1, 0, 1}, (runner){isas[ii], 3, -1, 0, 1},
                              err, sizeof err),
                    "isa %s bits %d gs %d M %d: packed, threads 1 vs 3 differ %s", isas[ii], bits,
                    p.q.group_size, p.M, err);
          problem_free(&p);
        }
    /* Many units of 4+ rows a block, which the threads take from ranges of
     * their own and from each other's (cpu_loops.c next_unit): 5 units a
     * block (N = 1100), blocks of 5 to 25 rows; every unit once, whatever
     * the thread count. */
    for (int threads = 2; threads <= 3; threads++) {
      problem p = {.E = 5,
                   .M = 5,
                   .N = 1100,
                   .K = 128,
                   .batch = 9,
                   .transpose = 1,
                   .q = {4, 64},
                   .dt = GQMM_BF16};
      CHECK_OK(problem_make_int(&p, &r));
      char err[256] = "";
      CHECK_MSG(same_bits(&p, (runner){0}, (runner){isas[ii], threads, -1, 0, 1}, err, sizeof err),
                "isa %s threads %d: packed, many units, differs from the reference %s", isas[ii],
                threads, err);
      problem_free(&p);
    }
  }
}

/* What the CPU pack refuses, with a message that says why: 3- and 8-bit
 * weights (its layout holds 2 and 4), and float32 scales (16-bit ones). */
GQMM_TEST(cpu_pack_refuses_clearly) {
  test_rng r = test_rng_make(733);
  static const struct {
    int bits;
    gqmm_dtype dt;
    const char *why;
  } cases[] = {
      {3, GQMM_BF16, "2- and 4-bit"}, {8, GQMM_BF16, "2- and 4-bit"}, {4, GQMM_F32, "scales"}};
  for (int c = 0; c < 3; c++) {
    problem p = {.E = 2,
                 .M = 1,
                 .N = 64,
                 .K = 64,
                 .batch = 2,
                 .transpose = 1,
                 .q = {cases[c].bits, 64},
                 .dt = cases[c].dt};
    CHECK_OK(problem_make(&p, &r, 0, true));
    void *out = malloc((size_t)p.batch * p.N * gqmm_dtype_size(p.dt));
    char err[256] = "";
    CHECK(out);
    CHECK_MSG(problem_run(&p, (runner){"portable", 1, -1, 0, 1}, out, err, sizeof err) ==
                      GQMM_ERR_UNSUPPORTED &&
                  strstr(err, cases[c].why),
              "%d-bit %s pack: %s", cases[c].bits, gqmm_dtype_name(p.dt), err);
    free(out);
    problem_free(&p);
  }
}

/* The qmv kernel adds sum_g b_g * sum(x)_g after its group loop, a vector
 * of groups at a time plus a scalar tail: G = 21 groups per row gives whole
 * vectors and a ragged tail on every ISA (8 and 16 lanes), at 1-4 rows per
 * expert (random routing), checked against the reference and bit for bit
 * across thread counts. */
GQMM_TEST(cpu_qmv_bias_dot_vectors_and_tail) {
  test_rng r = test_rng_make(712);
  for (size_t ii = 0; ii < 3; ii++) {
    if (!isa_available(isas[ii])) continue;
    for (int bi = 0; bi < 6; bi++)
      for (int gi = 0; gi < 3; gi++) {
        problem p = {.E = 6,
                     .M = 1,
                     .N = 19,
                     .K = 21 * all_groups[gi],
                     .batch = 13,
                     .transpose = 1,
                     .q = {all_bits[bi], all_groups[gi]},
                     .dt = all_dtypes[1 + (bi + gi) % 2]};
        CHECK_OK(problem_make(&p, &r, 0, true));
        CHECK_AGAINST_REF(p, ((runner){isas[ii], 2, -1, 0, 0}), tol_for(p.dt));
        char err[256] = "";
        CHECK_MSG(same_bits(&p, (runner){isas[ii], 1, -1, 0, 0}, (runner){isas[ii], 3, -1, 0, 0},
                            err, sizeof err),
                  "isa %s bits %d gs %d: threads 1 vs 3 differ %s", isas[ii], p.q.bits,
                  p.q.group_size, err);
        problem_free(&p);
      }
  }
}

/* Shuffles the (sorted) problem's entries, index and x row together: each
 * output row must keep its bits (same blocks, rows in another order). */
static void check_unsorted_equals_sorted(int *gqmm_test_failed, problem p, test_rng r) {
  const size_t row = (size_t)p.N * 2, n = row * (size_t)p.batch;
  uint16_t *sorted_out = malloc(n), *unsorted_out = malloc(n);
  int *perm = malloc((size_t)p.batch * sizeof(int));
  int32_t *sorted_idx = malloc((size_t)p.batch * 4);
  void *sorted_x = malloc((size_t)p.batch * p.K * 2);
  CHECK(sorted_out && unsorted_out && perm && sorted_idx && sorted_x);
  char err[256] = "";
  CHECK_OK(problem_run(&p, (runner){"avx2", 2, -1, 0, 0}, sorted_out, err, sizeof err));
  /* shuffle entries (index and x row together): each output row must keep its bits */
  for (int i = 0; i < p.batch; i++)
    perm[i] = i;
  for (int i = p.batch - 1; i > 0; i--) {
    int j = (int)(test_rng_u32(&r) % (uint32_t)(i + 1)), t = perm[i];
    perm[i] = perm[j], perm[j] = t;
  }
  memcpy(sorted_idx, p.idx, (size_t)p.batch * 4);
  memcpy(sorted_x, p.x, (size_t)p.batch * p.K * 2);
  for (int i = 0; i < p.batch; i++) {
    p.idx[i] = sorted_idx[perm[i]];
    memcpy((char *)p.x + (size_t)i * p.K * 2, (char *)sorted_x + (size_t)perm[i] * p.K * 2,
           (size_t)p.K * 2);
  }
  CHECK_OK(problem_run(&p, (runner){"avx2", 2, -1, 0, 0}, unsorted_out, err, sizeof err));
  for (int i = 0; i < p.batch; i++)
    CHECK_MSG(
        !memcmp((char *)unsorted_out + i * row, (char *)sorted_out + (size_t)perm[i] * row, row),
        "row %d (sorted row %d) differs", i, perm[i]);
  CHECK_AGAINST_REF(p, ((runner){"portable", 2, -1, 0, 0}), tol_for(p.dt));
  free(sorted_out), free(unsorted_out), free(perm), free(sorted_idx), free(sorted_x);
}

GQMM_TEST(cpu_unsorted_indices_equal_sorted_path) {
  test_rng r = test_rng_make(705);
  problem p = {.E = 12,
               .M = 1,
               .N = 70,
               .K = 192,
               .batch = 90,
               .transpose = 1,
               .q = {4, 64},
               .dt = GQMM_F16};
  CHECK_OK(problem_make(&p, &r, 0, true));
  check_unsorted_equals_sorted(gqmm_test_failed, p, r);
  problem_free(&p);
  /* blocks of exactly 5, 6, 7 and 8 rows (gemm, then qmv halves 3+3, 4+3,
   * 4+4) at K = 2816 (the halves K-blocked): a row's bits must not depend on
   * which half its place in the block puts it in (f16 and N = 384: enough
   * outputs that a float32 difference survives the rounding to f16) */
  problem q = {.E = 4,
               .M = 1,
               .N = 384,
               .K = 2816,
               .batch = 26,
               .transpose = 1,
               .q = {4, 64},
               .dt = GQMM_F16};
  CHECK_OK(problem_make(&q, &r, 0, true));
  for (int e = 0, i = 0; e < 4; e++)
    for (int c = 0; c < 5 + e; c++)
      q.idx[i++] = e;
  check_unsorted_equals_sorted(gqmm_test_failed, q, r);
  problem_free(&q);
}

GQMM_TEST(cpu_skewed_routing_and_empty_experts) {
  test_rng r = test_rng_make(706);
  for (int M = 1; M <= 2; M++) {
    /* most entries on expert E/2 (a block larger than the row limit for
     * K = 4096 is split), several experts without rows */
    problem p = {.E = 9,
                 .M = M,
                 .N = 24,
                 .K = 4096,
                 .batch = 330,
                 .transpose = 1,
                 .q = {4, 128},
                 .dt = GQMM_BF16};
    CHECK_OK(problem_make(&p, &r, 1, M == 1));
    CHECK_AGAINST_REF(p, ((runner){"avx2", 2, -1, 0, 0}), tol_for(p.dt));
    CHECK_AGAINST_REF(p, ((runner){"portable", 3, 1, 0, 0}), tol_for(p.dt));
    problem_free(&p);
  }
}

GQMM_TEST(cpu_int8_mode_is_close_and_opt_in) {
  test_rng r = test_rng_make(707);
  /* rows per block 1..9: every row count of the int8 kernel's blocks (1-4, then 4 + rest) */
  static const int Ms[] = {1, 2, 3, 6, 7, 9};
  for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++) {
    const int M = Ms[mi];
    problem p = {.E = 6,
                 .M = M,
                 .N = 40,
                 .K = 512,
                 .batch = 10,
                 .transpose = 1,
                 .q = {4, 64},
                 .dt = GQMM_BF16};
    CHECK_OK(problem_make(&p, &r, 0, true));
    /* int8 activations: ~0.4% per-element noise, far from exact; bounded.
     * Over 400 seeds (M = 1, 400 outputs) the error was 0.0154 median,
     * 0.0199 at p99, 0.021-0.022 at the worst (a bound of 2e-2 failed ~1 run
     * in 300): 3e-2 bounds the mode, an exact-path bug gives errors ~1. */
    if (isa_available("avx2")) CHECK_AGAINST_REF(p, ((runner){"avx2", 2, -1, 1, 0}), 3e-2);
    /* the portable ISA has no int8 kernel: the option falls back to exact */
    CHECK_AGAINST_REF(p, ((runner){"portable", 2, -1, 1, 0}), tol_for(p.dt));
    problem_free(&p);
    /* other widths ignore the option (int8 covers 4-bit only) */
    problem q = {.E = 3,
                 .M = M,
                 .N = 20,
                 .K = 256,
                 .batch = 4,
                 .transpose = 1,
                 .q = {3, 64},
                 .dt = GQMM_F32};
    CHECK_OK(problem_make(&q, &r, 0, true));
    CHECK_AGAINST_REF(q, ((runner){"avx2", 2, -1, 1, 0}), tol_for(q.dt));
    problem_free(&q);
  }
}

/* The int8 mode from its definition, in float64: per (x row, group) the
 * codes lrintf(x * (127 / amax)) and scale amax / 127 (float, as the mode
 * computes them), then sum_g s * xs * sum(code * q) + b * sum(x). */
static void int8_emulate(const problem *p, double *out) {
  const int64_t G = p->K / p->q.group_size, gs = p->q.group_size;
  float *t = malloc((size_t)p->K * sizeof(float));
  for (int b = 0; t && b < p->batch; b++)
    for (int m = 0; m < p->M; m++) {
      for (int k = 0; k < p->K; k++)
        t[k] = (float)gqmm__load_f(p->x, p->dt, ((int64_t)b * p->M + m) * p->K + k);
      for (int n = 0; n < p->N; n++) {
        const int64_t wr = (int64_t)p->idx[b] * p->N + n;
        const uint8_t *row = (const uint8_t *)(p->wq + wr * gqmm_packed_words(p->q, p->K));
        double acc = 0;
        for (int64_t g = 0; g < G; g++) {
          float amax = 0.0f;
          double xsum = 0, dot = 0;
          for (int64_t k = g * gs; k < (g + 1) * gs; k++)
            amax = fabsf(t[k]) > amax ? fabsf(t[k]) : amax;
          const float inv = amax > 0.0f ? 127.0f / amax : 0.0f, xs = amax / 127.0f;
          for (int64_t k = g * gs; k < (g + 1) * gs; k++) {
            xsum += t[k];
            dot += (double)lrintf(t[k] * inv) * gqmm__unpack(row, p->q.bits, k);
          }
          acc += gqmm__load_f(p->sc, p->dt, wr * G + g) * xs * dot +
                 gqmm__load_f(p->bi, p->dt, wr * G + g) * xsum;
        }
        out[((int64_t)b * p->M + m) * p->N + n] = acc;
      }
    }
  free(t);
}

/* int8 mode over packed weights (packed_i8, AVX-512 VNNI): 2- and 4-bit,
 * every group size, f16 and bf16, blocks of 1 to ~40 rows (tiles of 1-8
 * rows; of at most 6 in blocks of more than 8), against the mode emulated
 * in float64 (the float32 rounding of the result) and the exact reference
 * (the mode's quantization bound), bit for bit across thread counts; on
 * ISAs without the kernel the option falls back to the exact packed path. */
GQMM_TEST(cpu_int8_mode_over_packed_weights) {
  test_rng r = test_rng_make(734);
  static const int Ms[] = {1, 3, 7};
  for (int bits = 2; bits <= 4; bits += 2)
    for (int gi = 0; gi < 3; gi++)
      for (int mi = 0; mi < 3; mi++) {
        problem p = {.E = 5,
                     .M = Ms[mi],
                     .N = 100,
                     .K = 3 * all_groups[gi],
                     .batch = 12,
                     .transpose = 1,
                     .q = {bits, all_groups[gi]},
                     .dt = all_dtypes[1 + (gi + mi) % 2]};
        CHECK_OK(problem_make(&p, &r, 1, mi != 1));
        const int64_t n_out = (int64_t)p.batch * p.M * p.N;
        const size_t bytes = (size_t)n_out * gqmm_dtype_size(p.dt);
        void *got = malloc(bytes);
        double *emu = malloc((size_t)n_out * sizeof(double));
        CHECK(got && emu);
        char err[256] = "";
        if (isa_available("avx512")) {
          CHECK_OK(problem_run(&p, (runner){"avx512", 2, -1, 1, 1}, got, err, sizeof err));
          int8_emulate(&p, emu);
          double num = 0, den = 0;
          for (int64_t i = 0; i < n_out; i++) {
            const double d = gqmm__load_f(got, p.dt, i) - emu[i];
            num += d * d, den += emu[i] * emu[i];
          }
          CHECK_MSG(sqrt(num / den) <= tol_for(p.dt),
                    "bits %d gs %d %s M %d: %.3g from the emulation", bits, p.q.group_size,
                    gqmm_dtype_name(p.dt), p.M, sqrt(num / den));
          CHECK_AGAINST_REF(p, ((runner){"avx512", 2, -1, 1, 1}), 3e-2);
          CHECK_MSG(same_bits(&p, (runner){"avx512", 1, -1, 1, 1}, (runner){"avx512", 3, -1, 1, 1},
                              err, sizeof err),
                    "bits %d gs %d M %d: threads 1 vs 3 differ %s", bits, p.q.group_size, p.M, err);
        }
        CHECK_AGAINST_REF(p, ((runner){"portable", 2, -1, 1, 1}), tol_for(p.dt));
        free(got), free(emu);
        problem_free(&p);
      }
}

/* The last row of an ISA's block-size table: the default blocking with every
 * int8 block on the small-M kernel (qmv_i8). */
static int last_config(const problem *p, const char *isa) {
  int c = 0;
  while (c < 64 && config_exists(p, isa, c + 1))
    c++;
  return c;
}

/* int8 mode, weight-reuse path (blocks of more than i8_rows rows: unpacked
 * panels, register tiles) against the small-M kernel on the same problem:
 * bit for bit (both fold each group with the same operations in the same
 * order), for every config of the table (kc, mc, nt change the blocking,
 * never the bits) and thread count; and against the mode emulated in float64
 * (tight: the float32 rounding of the result) and the exact reference (the
 * mode's quantization bound). Ragged K (a last kc block of 3-5 groups),
 * ragged N (units and micro-panels with tails), skewed routing, sorted and
 * not (blocks of 0 to ~70 rows: both paths, mc slices, row tails of 1 and 2),
 * g32/64/128, f32/f16/bf16. */
GQMM_TEST(cpu_int8_weight_reuse_matches_qmv_bitwise) {
  test_rng r = test_rng_make(714);
  static const char *const i8_isas[] = {"avx2", "avx512"};
  static const int Ks[3] = {37 * 32, 19 * 64, 11 * 128};
  for (size_t ii = 0; ii < 2; ii++) {
    if (!isa_available(i8_isas[ii])) continue;
    for (int gi = 0; gi < 3; gi++)
      for (int di = 0; di < 3; di++) {
        /* skewed routing: ~60 rows on one expert (the panel path: 8-row
         * slices with tails of 2 and 1 + 3), a few on others (qmv_i8),
         * empty experts */
        problem p = {.E = 6,
                     .M = 3,
                     .N = 37,
                     .K = Ks[gi],
                     .batch = 24,
                     .transpose = 1,
                     .q = {4, all_groups[gi]},
                     .dt = all_dtypes[di]};
        CHECK_OK(problem_make(&p, &r, 1, di != 1));
        const int64_t n_out = (int64_t)p.batch * p.M * p.N;
        const size_t bytes = (size_t)n_out * gqmm_dtype_size(p.dt);
        void *qmv = malloc(bytes), *got = malloc(bytes);
        double *emu = malloc((size_t)n_out * sizeof(double));
        CHECK(qmv && got && emu);
        char err[256] = "";
        const int cq = last_config(&p, i8_isas[ii]);
        CHECK_OK(problem_run(&p, (runner){i8_isas[ii], 1, cq, 1, 0}, qmv, err, sizeof err));
        /* every config on bf16 g64, the default and another elsewhere, 1-3 threads */
        for (int c = -1; c < cq; c++) {
          if (c >= 0 && !(gi == 1 && di == 2) && c != 0) continue;
          const int threads = 1 + (c + 2) % 3;
          CHECK_OK(problem_run(&p, (runner){i8_isas[ii], threads, c, 1, 0}, got, err, sizeof err));
          CHECK_MSG(!memcmp(got, qmv, bytes),
                    "isa %s gs %d %s config %d threads %d: differs from qmv_i8's bits", i8_isas[ii],
                    p.q.group_size, gqmm_dtype_name(p.dt), c, threads);
        }
        int8_emulate(&p, emu);
        double num = 0, den = 0;
        for (int64_t i = 0; i < n_out; i++) {
          const double d = gqmm__load_f(got, p.dt, i) - emu[i];
          num += d * d, den += emu[i] * emu[i];
        }
        CHECK_MSG(sqrt(num / den) <= tol_for(p.dt), "isa %s gs %d %s: %.3g from the emulation",
                  i8_isas[ii], p.q.group_size, gqmm_dtype_name(p.dt), sqrt(num / den));
        CHECK_AGAINST_REF(p, ((runner){i8_isas[ii], 2, -1, 1, 0}), 3e-2);
        free(qmv), free(got), free(emu);
        problem_free(&p);
      }
  }
}

/* The ISAs' output conversion (from_float: the stores of every path) rounds
 * exactly as gqmm__store_f on every class of float: random bit patterns
 * (NaNs, infinities, subnormals), halfway cases of bf16 and f16 and their
 * neighbours, signed zeros; lengths with vector tails. */
GQMM_TEST(cpu_output_conversion_matches_store_f) {
#if defined(__x86_64__)
  const gqmm__cpu_isa *const rows[] = {&gqmm__cpu_isa_portable, &gqmm__cpu_isa_avx2,
                                       &gqmm__cpu_isa_avx512};
#else
  const gqmm__cpu_isa *const rows[] = {&gqmm__cpu_isa_portable};
#endif
  enum { N = 4099 };
  test_rng r = test_rng_make(715);
  float *src = malloc(N * sizeof(float));
  uint16_t *got = malloc(N * 4), *want = malloc(N * 4);
  CHECK(src && got && want);
  for (int i = 0; i < N; i++) {
    uint32_t u = test_rng_u32(&r);
    if (i % 4 == 1) u = (u & 0xffff0000u) | 0x8000u;     /* bf16 tie */
    if (i % 4 == 2) u = (u & 0xc7ffe000u) | 0x38001000u; /* f16 tie, near 2^-14 */
    if (i % 8 == 3) u = (u & 0x807fffffu) | (i % 16 == 3 ? 0x7f800000u : 0u); /* NaN/inf, 0/sub */
    memcpy(&src[i], &u, 4);
  }
  for (size_t k = 0; k < sizeof rows / sizeof rows[0]; k++) {
    if (!rows[k]->supported()) continue;
    for (int di = 0; di < 3; di++) {
      const gqmm_dtype t = all_dtypes[di];
      const int n = N - di; /* ragged tails */
      memset(got, 0xa5, N * 4), memset(want, 0x5a, N * 4);
      rows[k]->from_float(src, t, n, got);
      for (int i = 0; i < n; i++)
        gqmm__store_f(want, t, i, src[i]);
      CHECK_MSG(!memcmp(got, want, (size_t)n * gqmm_dtype_size(t)), "isa %s %s differs",
                rows[k]->name, gqmm_dtype_name(t));
    }
  }
  free(src), free(got), free(want);
}

GQMM_TEST(cpu_bad_isa_requests_fail_clearly) {
  problem p = {
      .E = 2, .M = 1, .N = 8, .K = 64, .batch = 2, .transpose = 1, .q = {4, 64}, .dt = GQMM_F32};
  test_rng r = test_rng_make(708);
  CHECK_OK(problem_make(&p, &r, 0, true));
  float out[16];
  char err[512] = "";
  int st = problem_run(&p, (runner){"sse9", 1, -1, 0, 0}, out, err, sizeof err);
  CHECK_MSG(st == GQMM_ERR_ARG && strstr(err, "sse9"), "status %d: %s", st, err);
  if (!isa_available("avx512")) {
    st = problem_run(&p, (runner){"avx512", 1, -1, 0, 0}, out, err, sizeof err);
    CHECK_MSG(st == GQMM_ERR_UNSUPPORTED && strstr(err, "avx512"), "status %d: %s", st, err);
  }
  st = problem_run(&p, (runner){"portable", 1, 999, 0, 0}, out, err, sizeof err);
  CHECK_MSG(st == GQMM_ERR_ARG && strstr(err, "config"), "status %d: %s", st, err);
  problem_free(&p);
}

/* Accuracy of the exact and the int8 (fast) mode against float64 truth, on
 * the seed's format (4-bit, group 64) at K = 2816. Prints the figures that
 * docs/perf-notes.md records; bounds are loose (a failure means a bug). */
GQMM_TEST(cpu_int8_accuracy_vs_float64) {
  test_rng r = test_rng_make(709);
  const gqmm_dtype dts[2] = {GQMM_F32, GQMM_BF16};
  for (int di = 0; di < 2; di++) {
    problem p = {.E = 4,
                 .M = 8,
                 .N = 64,
                 .K = 2816,
                 .batch = 4,
                 .transpose = 1,
                 .q = {4, 64},
                 .dt = dts[di]};
    CHECK_OK(problem_make(&p, &r, 0, true));
    const int64_t n_out = (int64_t)p.batch * p.M * p.N, G = p.K / 64;
    double *truth = calloc((size_t)n_out, sizeof(double));
    void *raw = malloc((size_t)n_out * 4);
    CHECK(truth && raw);
    for (int b = 0; b < p.batch; b++) /* float64 truth of x @ dequant(w)^T */
      for (int m = 0; m < p.M; m++)
        for (int n = 0; n < p.N; n++) {
          const int64_t wr = (int64_t)p.idx[b] * p.N + n;
          const uint8_t *row = (const uint8_t *)(p.wq + wr * (p.K / 8));
          double acc = 0;
          for (int k = 0; k < p.K; k++) {
            const double s = gqmm__load_f(p.sc, p.dt, wr * G + k / 64);
            const double bb = gqmm__load_f(p.bi, p.dt, wr * G + k / 64);
            const double x = gqmm__load_f(p.x, p.dt, ((int64_t)b * p.M + m) * p.K + k);
            acc += x * (s * gqmm__unpack(row, 4, k) + bb);
          }
          truth[((int64_t)b * p.M + m) * p.N + n] = acc;
        }
    const char *modes[3] = {"reference", "cpu exact", "cpu int8"};
    for (int mode = 0; mode < 3; mode++) {
      char err[256] = "";
      runner how = {mode ? "avx2" : NULL, 2, -1, mode == 2, 0};
      if (mode && !isa_available("avx2")) how.isa = "portable";
      CHECK_OK(problem_run(&p, how, raw, err, sizeof err));
      double num = 0, den = 0, worst = 0;
      for (int64_t i = 0; i < n_out; i++) {
        const double d = gqmm__load_f(raw, p.dt, i) - truth[i];
        num += d * d;
        den += truth[i] * truth[i];
        worst = fmax(worst, fabs(d));
      }
      const double rel = sqrt(num / den), rms = sqrt(den / (double)n_out);
      fprintf(stderr, "  accuracy %-9s x %-8s: rel L2 err %.3e, max |err| / rms(out) %.3e\n",
              modes[mode], gqmm_dtype_name(p.dt), rel, worst / rms);
      const double bound = mode == 2 ? 2e-2 : p.dt == GQMM_F32 ? 1e-5 : 1e-2;
      CHECK_MSG(rel < bound, "%s %s: %.3g", modes[mode], gqmm_dtype_name(p.dt), rel);
    }
    free(truth), free(raw);
    problem_free(&p);
  }
}
