/*
 * internal.h - what every part of the library shares: the context, error
 * reporting, the quant-format table and the backend interface.
 * Internal names are gqmm__*; nothing here is part of the public API.
 */
#ifndef GQMM_INTERNAL_H
#define GQMM_INTERNAL_H

#include "gqmm.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GQMM__ERRMSG_LEN 512

struct gqmm__backend;

struct gqmm_ctx {
  gqmm_backend_kind backend_kind;
  int num_threads;
  char cpu_isa[32];
  char errmsg[GQMM__ERRMSG_LEN];
  const char *last_backend;
  int forced_config; /* -1: automatic; else a config id of the running backend */
  /* Backend-private state, created lazily by each backend, freed in destroy. */
  void *cpu_state;
  void *cuda_state;
  void *tune_state;
  int cpu_int8; /* gqmm_ctx_options.cpu_int8_activations (CPU fast mode) */
  /* Tests and A/B runs: gqmm_pack stores the scales as they are (CUDA: no
   * linear dequantization, pack.cu), as it does where they do not fit. */
  int pack_plain;
  /* The MoE layer records its phases' device times (gqmm bench --breakdown;
   * the backend's moe_phases hook), at some cost on the device. */
  int moe_timing;
  /* The host MoE layer's work buffers (moe_compose.c), kept between calls:
   * at 8 canvases they are ~160 MB, which malloc would map and the kernel
   * zero afresh every layer. */
  void *moe_buf;
  size_t moe_cap;
};

/* Record a formatted message on ctx (may be NULL) and return status. */
int gqmm__fail(gqmm_ctx *ctx, int status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
void gqmm__clear_error(gqmm_ctx *ctx);

/* ---- quant formats ------------------------------------------------------- */

/*
 * MLX packs each row of q-values as one little-endian bit stream: element j
 * occupies bits [j*bits, (j+1)*bits). For bits 2/4/8 that is "32/bits values
 * per uint32, LSB first"; for 3/5 it is 8 values in 3/5 bytes, for 6 it is 4
 * values in 3 bytes. One rule serves all widths, so the table only needs the
 * pack unit used by loops that decode whole packs at a time.
 */
typedef struct {
  int bits;
  int values_per_pack; /* values decoded together */
  int bytes_per_pack;  /* bytes those values occupy */
} gqmm__format;

/* NULL if bits is not supported. */
const gqmm__format *gqmm__format_for_bits(int bits);

/* Value j of a packed row (bit-stream rule above). */
static inline uint32_t gqmm__unpack(const uint8_t *row, int bits, int64_t j) {
  int64_t bit = j * bits;
  const uint8_t *p = row + (bit >> 3);
  int shift = (int)(bit & 7);
  /* A value of <= 8 bits at shift <= 7 spans at most two bytes; 8-bit values
   * always start on a byte boundary, so p[1] is read only when needed. */
  uint32_t v = p[0];
  if (shift + bits > 8) v |= (uint32_t)p[1] << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

/* Seconds on a monotonic clock (benchmarks, tuner, ceilings, phase timing). */
double gqmm__now_s(void);

/* Host memory (mem.c). A buffer the kernels stream: in huge pages where the
 * system has them, 64-byte aligned; free() releases it. */
void *gqmm__alloc_stream(size_t bytes);
/* A buffer kept between calls, grown to `need` bytes (its contents then
 * lost); -1 (buf NULL, cap 0) if that allocation fails. */
int gqmm__reserve(void **buf, size_t *cap, size_t need);

/* ---- dtypes -------------------------------------------------------------- */

static inline bool gqmm__is_float(gqmm_dtype t) {
  return t == GQMM_F32 || t == GQMM_F16 || t == GQMM_BF16;
}
/* MLX type promotion among float types: equal -> same; f16 with bf16 -> f32. */
gqmm_dtype gqmm__promote(gqmm_dtype a, gqmm_dtype b);
/* Element i of a float tensor's buffer as float. */
float gqmm__load_f(const void *p, gqmm_dtype t, int64_t i);
/* Store v to element i, rounding to t (nearest even). */
void gqmm__store_f(void *p, gqmm_dtype t, int64_t i, float v);
/* Convert n elements between float dtypes (src and dst must not overlap). */
void gqmm__convert(void *dst, gqmm_dtype dt, const void *src, gqmm_dtype st, int64_t n);

/* ---- tensor checks (each returns a status and sets the message) ---------- */

bool gqmm__is_contiguous(const gqmm_tensor *t);
size_t gqmm__nbytes(const gqmm_tensor *t);
int gqmm__check_tensor(gqmm_ctx *ctx, const gqmm_tensor *t, const char *name);
/* Same device as `ref` (name for the message). */
int gqmm__check_same_device(gqmm_ctx *ctx, const gqmm_tensor *t, const char *name,
                            gqmm_device dev);
/* Error if the byte ranges of out and in intersect. */
int gqmm__check_no_overlap(gqmm_ctx *ctx, const gqmm_tensor *out, const char *out_name,
                           const gqmm_tensor *in, const char *in_name);
/* Error unless t (already checked) has exactly this dtype and shape; the
 * statuses say which kind of argument it is (DTYPE/SHAPE for an input,
 * OUTPUT for an output). */
int gqmm__check_dtype_shape(gqmm_ctx *ctx, const gqmm_tensor *t, const char *name,
                            gqmm_dtype dtype, int ndim, const int64_t *shape, int dtype_status,
                            int shape_status);
/* Error unless out has exactly this dtype and shape. */
int gqmm__check_output(gqmm_ctx *ctx, const gqmm_tensor *out, gqmm_dtype dtype, int ndim,
                       const int64_t *shape, const char *name);
/* Status + message for an unsupported (bits, group_size). */
int gqmm__check_quant(gqmm_ctx *ctx, gqmm_quant q);
/* A quantized weight set (w, scales, biases) as the ops check it
 * (ops_matmul.c), in three steps: valid tensors (biases required); w uint32
 * and float scales/biases; w at least 2-D, whole groups per row, scales and
 * biases of shape w.shape[:-1] + (values / group_size,). packed_len: the
 * values per row of w. */
int gqmm__check_qweight_tensors(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
                                const gqmm_tensor *biases);
int gqmm__check_qweight_dtypes(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
                               const gqmm_tensor *biases);
int gqmm__check_qweight_shapes(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
                               const gqmm_tensor *biases, gqmm_quant q, int64_t *packed_len);
void gqmm__shape_str(char *buf, size_t len, int ndim, const int64_t *shape);

/* ---- the backend interface ----------------------------------------------- */

/*
 * One batched quantized matmul, validated by the front end:
 *   for b in [0, batch): out[b] (M x N) = x[x_index[b]] (M x K) @ W[w_index[b]]
 * where W[e] is dequant(w[e]) transposed (transpose=1: w[e] is N x K packed)
 * or not (transpose=0: w[e] is K x N packed). x, scales, biases and out all
 * have dtype `dtype` (the front end widens mixed inputs first), are
 * row-contiguous and live on `device`. Products accumulate in float32.
 */
typedef struct {
  gqmm_dtype dtype;
  gqmm_quant q;
  int transpose;
  gqmm_device device;
  int64_t M, N, K;
  int64_t batch;
  int64_t x_batches, w_batches; /* sizes of the flattened batch axes */
  const void *x;                /* [x_batches, M, K] */
  const uint32_t *w;            /* [w_batches, N, K*bits/32] or [w_batches, K, N*bits/32] */
  const void *scales;           /* [w_batches, N, K/gs]      or [w_batches, K, N/gs] */
  const void *biases;           /* same as scales */
  void *out;                    /* [batch, M, N] */
  /* Host arrays, every entry checked in range: */
  const int64_t *x_index; /* [batch] */
  const int64_t *w_index; /* [batch] */
  bool w_sorted;          /* w_index is non-decreasing (checked, not trusted) */
  /* Non-NULL: the weights are this gqmm_pack copy (w, scales and biases
   * then point into it and must not be read as MLX layout). Only backends
   * with `pack` support it. */
  const struct gqmm_packed *packed;
} gqmm__qmm_args;

/* A gqmm_pack copy: the MLX tensors' shapes and format, and the device
 * buffer in the backend's layout. */
struct gqmm_packed {
  gqmm_quant q;
  gqmm_dtype dtype;      /* of the scales and biases */
  int ndim;              /* of w */
  int64_t shape[GQMM_MAX_DIMS]; /* w's shape: [..., N, K*bits/32] */
  int64_t K;
  int glu; /* gqmm_pack_glu: gate and up rows paired (w is [..., 2I, ...]) */
  int scaled; /* the backend stored the scales pre-scaled (CUDA: pack.cu's linear form) */
  gqmm_device device; /* where data lives: the CUDA device, or host memory (the CPU's layout) */
  const struct gqmm__backend *be;
  void *data;
  int64_t nbytes;
};

/*
 * The MoE expert layer, validated by the front end (src/moe):
 *   for each token t and slot j < top_k, e = expert_ids[t, j]:
 *     h = act(x[t] @ gate[e]^T, x[t] @ up[e]^T)          (inter values)
 *     out[t] += expert_weights[t, j] * (h @ down[e]^T)   (hidden values)
 * summed over j in ascending order (deterministic). act is SwiGLU
 * (silu(g) * u) or GeGLU (gelu_tanh(g) * u). gate and up are [E, inter, hidden]
 * packed; when they come fused in one tensor [E, 2*inter, hidden] (gate rows
 * first), gate_w/up_w point into it and gu_expert_rows = 2*inter, else
 * gu_expert_rows = inter. down is [E, hidden, inter] packed. x, scales,
 * biases, expert_weights and out have dtype `dtype`; all on `device`.
 */
typedef enum { GQMM__ACT_SWIGLU = 0, GQMM__ACT_GEGLU = 1 } gqmm__activation;

typedef struct {
  gqmm_dtype dtype;
  gqmm_quant q;
  gqmm__activation act;
  gqmm_device device;
  int64_t tokens, hidden, inter, experts, top_k;
  const void *x;              /* [tokens, hidden] */
  const int32_t *expert_ids;  /* [tokens, top_k]; CPU: checked in [0, experts); device: the
                               * backend checks them itself (deferred error, gqmm.h) */
  const void *expert_weights; /* [tokens, top_k] */
  const uint32_t *gate_w, *up_w;
  const void *gate_s, *gate_b, *up_s, *up_b;
  int64_t gu_expert_rows;
  const uint32_t *down_w;
  const void *down_s, *down_b;
  /* gqmm_pack copies (gqmm_moe_weights), or NULL */
  const struct gqmm_packed *gate_pk, *up_pk, *down_pk;
  void *out; /* [tokens, hidden] */
  /* expert_ids when they are host memory (range checked), else NULL: the
   * front end never copies device ids to the host (it would drain the queue). */
  const int32_t *expert_ids_host;
} gqmm__moe_args;

/*
 * A tile configuration of a fast kernel: changes speed, never results (tests
 * run every one). Each backend keeps a table of the configurations compiled
 * in; `id` indexes it. Fields a kernel does not use are 0.
 */
typedef struct {
  int id;
  char name[48]; /* e.g. "n128_k64_w4_s4"; stable across runs (cache key) */
  int tile_m, tile_n, tile_k; /* rows (tokens), output features, reduction */
  int threads;                /* threads per CTA (GPU) or per task (CPU) */
  int stages;                 /* pipeline depth */
  int split_k;                /* reduction split (1 = none) */
} gqmm__tile_config;

/* Same-run ceilings a benchmark reports beside each figure. */
typedef struct {
  char device_name[96];   /* "AMD EPYC (2 threads)", "NVIDIA H100 80GB HBM3" */
  double copy_GBps;       /* large copy, bytes read + written per second */
  double read_GBps;       /* large read-only reduction */
  double compute_GMACps;  /* peak multiply-adds/s of the instruction the kernel uses */
  char compute_what[48];  /* which instruction/path that peak is for */
} gqmm__ceilings;

typedef enum { GQMM__COPY_H2D = 0, GQMM__COPY_D2H = 1, GQMM__COPY_D2D = 2 } gqmm__copy_dir;

typedef struct gqmm__backend {
  const char *name;
  gqmm_backend_kind kind; /* which GQMM_BACKEND_* option selects it */
  /* true if this backend can run these args (device, dtype, bits...). */
  bool (*supports_qmm)(gqmm_ctx *ctx, const gqmm__qmm_args *a);
  int (*qmm)(gqmm_ctx *ctx, const gqmm__qmm_args *a);
  /* Optional: the whole MoE expert layer with fused epilogues. NULL: src/moe
   * composes it from qmm and its own elementwise steps. */
  int (*moe_forward)(gqmm_ctx *ctx, const gqmm__moe_args *a);
  /* Optional (NULL if the backend has no tile choices): fill up to `max`
   * configurations valid for these args (fit in registers/shared memory/
   * caches) and return how many; run the op with one of them by id. */
  int (*configs)(gqmm_ctx *ctx, const gqmm__qmm_args *a, gqmm__tile_config *out, int max);
  int (*qmm_config)(gqmm_ctx *ctx, const gqmm__qmm_args *a, int config_id);
  /* Optional: measure the ceilings now (takes ~0.1-1 s). */
  int (*ceilings)(gqmm_ctx *ctx, gqmm__ceilings *out);
  /* Optional (device backends): wait for queued work, so a host clock can time it. */
  int (*sync)(gqmm_ctx *ctx);
  /* Optional (device backends): memory of the backend's device. */
  int (*mem_alloc)(gqmm_ctx *ctx, size_t bytes, void **out);
  void (*mem_free)(gqmm_ctx *ctx, void *p);
  int (*mem_copy)(gqmm_ctx *ctx, void *dst, const void *src, size_t bytes, gqmm__copy_dir dir);
  /* Called by gqmm_ctx_destroy to free the backend's private state. */
  void (*release)(gqmm_ctx *ctx);
  /* Optional: a short stable name of the device and what its kernels were
   * built for ("NVIDIA H100 80GB HBM3 sm_90 driver 12080", "AMD EPYC 7B13
   * avx2"), the tuning cache's device key. Must be cheap (no measuring).
   * NULL: a CPU backend is keyed by its name, the CPU model and features;
   * a device backend by its name alone (all its GPUs share entries). */
  void (*device_key)(gqmm_ctx *ctx, char *buf, size_t len);
  /* Optional (device backends): device time of the last op, measured with
   * device events: its main kernel alone, and all of its device work. */
  int (*last_time)(gqmm_ctx *ctx, double *kernel_us, double *op_us);
  /* Optional (backends with moe_forward): device time in seconds of the last
   * moe_forward's steps (plan, gate_up, act, down, combine); waits for them. */
  int (*moe_phases)(gqmm_ctx *ctx, double phase_s[5]);
  /* Optional: the packed copy of E experts of w/scales/biases (validated:
   * transpose layout, [E, N, ...] on the backend's device) for gqmm_pack;
   * fills p->data and p->nbytes, allocated with mem_alloc (host memory from
   * aligned_alloc for the CPU backend, freed with free). */
  int (*pack)(gqmm_ctx *ctx, struct gqmm_packed *p, const uint32_t *w, const void *scales,
              const void *biases, int64_t E, int64_t N);
  /* Optional (device backends): the stream of ctx's work, and the recording
   * of graphs on it (gqmm_device_set_stream, gqmm_graph_*); graph_end gives
   * the backend's runnable graph, graph_free releases it. */
  int (*set_stream)(gqmm_ctx *ctx, void *stream);
  int (*graph_begin)(gqmm_ctx *ctx);
  int (*graph_end)(gqmm_ctx *ctx, void **exec);
  int (*graph_launch)(gqmm_ctx *ctx, void *exec);
  void (*graph_free)(void *exec);
} gqmm__backend;

/* Each backend defines one of these (src/ref, src/cpu, src/cuda). */
extern const gqmm__backend gqmm__ref_backend;
extern const gqmm__backend gqmm__cpu_backend;
extern const gqmm__backend gqmm__cuda_backend;

/* The backends compiled in, best first; NULL-terminated. */
const gqmm__backend *const *gqmm__backends(void);
/* Pick the backend for these args following ctx->backend_kind. */
int gqmm__select_backend(gqmm_ctx *ctx, const gqmm__qmm_args *a, const gqmm__backend **out);

/*
 * The configuration a backend's qmm should use for these args: ctx's forced
 * config if set (tests and `gqmm tune`), else the tuning cache's choice
 * (src/tune), else -1, meaning "use your built-in heuristic".
 */
int gqmm__choose_config(gqmm_ctx *ctx, const gqmm__backend *be, const gqmm__qmm_args *a);
/* Frees what src/tune keeps on the context (the loaded cache); called by
 * gqmm_ctx_destroy. */
void gqmm__tune_release(gqmm_ctx *ctx);

/* ---- reference kernels (src/ref) ----------------------------------------- */

void gqmm__ref_quantize(const void *w, gqmm_dtype dtype, int64_t rows, int64_t k, gqmm_quant q,
                        uint32_t *wq, void *scales, void *biases);
/* out = T(T_s(q * s) + b) with T = promote(s, b), then cast to out_dtype (MLX's CPU graph). */
void gqmm__ref_dequantize(const uint32_t *wq, const void *scales, gqmm_dtype s_dtype,
                          const void *biases, gqmm_dtype b_dtype, int64_t rows, int64_t k,
                          gqmm_quant q, void *out, gqmm_dtype out_dtype);
int gqmm__ref_qmm(gqmm_ctx *ctx, const gqmm__qmm_args *a);

#endif /* GQMM_INTERNAL_H */
