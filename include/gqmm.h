/*
 * gqmm.h - gathered low-bit quantized matrix multiplication (MLX affine format).
 *
 * gqmm computes what MLX's mx.quantize, mx.dequantize, mx.quantized_matmul and
 * mx.gather_qmm compute in mode "affine", on the same packed layout, with
 * kernels for the CPU and NVIDIA GPUs.
 *
 * Conventions
 *   - Every function returns GQMM_OK (0) or a negative gqmm_status. The context
 *     keeps a message naming the offending argument: gqmm_last_error(ctx).
 *   - Tensors are descriptors over caller-owned memory (gqmm never frees them).
 *     Strides are in elements; every op requires row-contiguous tensors and says
 *     so if one is not.
 *   - Quantization: w ~= scale * q + bias per group of `group_size` consecutive
 *     elements of the last axis; q in [0, 2^bits - 1] packed LSB-first into
 *     uint32 words (bits 3, 5, 6 form a byte stream, see docs/format.md).
 */
#ifndef GQMM_H
#define GQMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GQMM_VERSION_MAJOR 0
#define GQMM_VERSION_MINOR 1
#define GQMM_VERSION_PATCH 0
#define GQMM_VERSION_STRING "0.1.0"

/* ---- status codes -------------------------------------------------------- */

/* X(name, value, description): one list generates the enum and gqmm_strerror. */
#define GQMM_STATUS_LIST(X)                                                     \
  X(GQMM_OK, 0, "success")                                                     \
  X(GQMM_ERR_NULL, -1, "null pointer argument")                                \
  X(GQMM_ERR_DTYPE, -2, "unsupported or mismatched dtype")                     \
  X(GQMM_ERR_NDIM, -3, "wrong number of dimensions")                           \
  X(GQMM_ERR_SHAPE, -4, "incompatible shapes")                                 \
  X(GQMM_ERR_BITS, -5, "unsupported bit width")                                \
  X(GQMM_ERR_GROUP_SIZE, -6, "unsupported group size")                         \
  X(GQMM_ERR_INDEX, -7, "index out of range")                                  \
  X(GQMM_ERR_OUTPUT, -8, "output tensor has the wrong shape or dtype")         \
  X(GQMM_ERR_OVERLAP, -9, "output overlaps an input")                          \
  X(GQMM_ERR_LAYOUT, -10, "tensor is not row-contiguous")                      \
  X(GQMM_ERR_DEVICE, -11, "tensor on the wrong device")                        \
  X(GQMM_ERR_NOMEM, -12, "out of memory")                                      \
  X(GQMM_ERR_UNSUPPORTED, -13, "operation not supported by this backend")      \
  X(GQMM_ERR_BACKEND, -14, "backend failure")                                  \
  X(GQMM_ERR_ARG, -15, "invalid argument value")                               \
  X(GQMM_ERR_IO, -16, "file input/output error")                               \
  X(GQMM_ERR_FORMAT, -17, "malformed file or cache")

typedef enum {
#define GQMM__STATUS_ENUM(name, value, text) name = value,
  GQMM_STATUS_LIST(GQMM__STATUS_ENUM)
#undef GQMM__STATUS_ENUM
} gqmm_status;

/* Static description of a status code ("index out of range"). */
const char *gqmm_strerror(int status);
/* Static name of a status code ("GQMM_ERR_INDEX"); "GQMM_UNKNOWN" if none. */
const char *gqmm_status_name(int status);

/* ---- tensors ------------------------------------------------------------- */

typedef enum {
  GQMM_F32 = 0,
  GQMM_F16 = 1,
  GQMM_BF16 = 2,
  GQMM_U32 = 3,
  GQMM_I32 = 4,
} gqmm_dtype;

typedef enum {
  GQMM_DEVICE_CPU = 0,
  GQMM_DEVICE_CUDA = 1, /* data is a CUDA device pointer on the current device */
} gqmm_device;

#define GQMM_MAX_DIMS 8

typedef struct {
  void *data;
  gqmm_dtype dtype;
  int ndim;
  int64_t shape[GQMM_MAX_DIMS];
  int64_t strides[GQMM_MAX_DIMS]; /* in elements */
  gqmm_device device;
} gqmm_tensor;

/* A row-contiguous CPU tensor over `data`. ndim in [0, GQMM_MAX_DIMS]. */
gqmm_tensor gqmm_tensor_make(void *data, gqmm_dtype dtype, int ndim, const int64_t *shape);
int64_t gqmm_tensor_numel(const gqmm_tensor *t);
size_t gqmm_dtype_size(gqmm_dtype dtype);
const char *gqmm_dtype_name(gqmm_dtype dtype);

/* Scalar conversions (round to nearest even; NaN preserved). */
float gqmm_bf16_to_f32(uint16_t h);
uint16_t gqmm_f32_to_bf16(float f);
float gqmm_f16_to_f32(uint16_t h);
uint16_t gqmm_f32_to_f16(float f);

/* ---- context ------------------------------------------------------------- */

typedef enum {
  GQMM_BACKEND_AUTO = 0, /* the GPU if present and the op is supported, else CPU */
  GQMM_BACKEND_REF = 1,  /* scalar reference (the oracle; slow) */
  GQMM_BACKEND_CPU = 2,
  GQMM_BACKEND_CUDA = 3,
} gqmm_backend_kind;

typedef struct gqmm_ctx gqmm_ctx;

typedef struct {
  gqmm_backend_kind backend; /* default AUTO */
  int num_threads;           /* 0: GQMM_NUM_THREADS or all cores */
  const char *cpu_isa;       /* NULL: GQMM_CPU_ISA or best; else "avx512", "avx2", "portable" */
  /* FAST MODE, off by default, not exact: 1 quantizes activations to int8
   * (per row and group) for 4-bit weights on the CPU backend (VNNI/AVX2
   * integer dot products). Its error vs float64 is in docs/perf-notes.md. */
  int cpu_int8_activations;
} gqmm_ctx_options;

/* opts may be NULL for defaults. */
int gqmm_ctx_create(gqmm_ctx **out, const gqmm_ctx_options *opts);
void gqmm_ctx_destroy(gqmm_ctx *ctx);
/* Message for the last failing call on ctx ("" if none). Valid until the next call. */
const char *gqmm_last_error(const gqmm_ctx *ctx);
/* Name of the backend that ran the last op ("ref", "cpu-avx512", "cuda"...). */
const char *gqmm_last_backend(const gqmm_ctx *ctx);

/* ---- quantization parameters --------------------------------------------- */

typedef struct {
  int bits;       /* 2, 3, 4, 5, 6 or 8 */
  int group_size; /* 32, 64 or 128 */
} gqmm_quant;

/* GQMM_OK if gqmm supports (bits, group_size); else GQMM_ERR_BITS / _GROUP_SIZE. */
int gqmm_quant_check(gqmm_quant q);
/* uint32 words per packed row of k elements (k * bits / 32). */
int64_t gqmm_packed_words(gqmm_quant q, int64_t k);

/* ---- ops (mode "affine") ------------------------------------------------- */

/*
 * quantize: w (..., N, K) f32/f16/bf16, K % group_size == 0
 *   -> wq (..., N, K*bits/32) u32, scales/biases (..., N, K/group_size) of w's dtype.
 * Bit-exact with mlx.core.quantize on MLX's CPU backend.
 */
int gqmm_quantize(gqmm_ctx *ctx, const gqmm_tensor *w, gqmm_quant q, gqmm_tensor *wq,
                  gqmm_tensor *scales, gqmm_tensor *biases);

/*
 * dequantize: out = T(T(scale * q) + bias) elementwise in out's dtype T, as
 * mlx.core.dequantize computes on the CPU. out shape (..., N, K), dtype any float.
 */
int gqmm_dequantize(gqmm_ctx *ctx, const gqmm_tensor *wq, const gqmm_tensor *scales,
                    const gqmm_tensor *biases, gqmm_quant q, gqmm_tensor *out);

/*
 * quantized_matmul: out = x @ dequant(w).T (transpose=1, w (..., N, K*bits/32))
 *                   out = x @ dequant(w)   (transpose=0, w (..., K, N*bits/32)).
 * Batch dims broadcast as in MLX; out dtype = promote(x, scales, biases); the
 * products accumulate in float32.
 */
int gqmm_quantized_matmul(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                          const gqmm_tensor *scales, const gqmm_tensor *biases, int transpose,
                          gqmm_quant q, gqmm_tensor *out);

/*
 * gather_qmm: out[i] = x_b[lhs[i]] @ dequant(w_b[rhs[i]])^(T if transpose), with
 * x_b, w_b the inputs flattened over their batch dims (all but the last two)
 * and lhs, rhs broadcast together. NULL indices default to arange over the
 * batch. Indices are int32 or uint32; an index out of range is GQMM_ERR_INDEX.
 * sorted_indices is a hint that the given indices are ascending (the MoE path).
 * out shape = broadcast(lhs, rhs).shape + (M, N).
 */
int gqmm_gather_qmm(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                    const gqmm_tensor *scales, const gqmm_tensor *biases,
                    const gqmm_tensor *lhs_indices, const gqmm_tensor *rhs_indices, int transpose,
                    gqmm_quant q, int sorted_indices, gqmm_tensor *out);

/*
 * Shape/dtype inference: fill `out` (data NULL) with the output descriptor the
 * op would need for these inputs, or fail with the same status the op would.
 */
int gqmm_quantized_matmul_output(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                                 const gqmm_tensor *scales, const gqmm_tensor *biases,
                                 int transpose, gqmm_quant q, gqmm_tensor *out);
int gqmm_gather_qmm_output(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_tensor *w,
                           const gqmm_tensor *scales, const gqmm_tensor *biases,
                           const gqmm_tensor *lhs_indices, const gqmm_tensor *rhs_indices,
                           int transpose, gqmm_quant q, gqmm_tensor *out);

/* ---- packed weights (load-time layouts for the CUDA and CPU kernels) ----- */

/*
 * gqmm_pack: a copy of quantized weights w [..., N, K*bits/32] (MLX layout,
 * transpose=1) with their scales and biases [..., N, K/group_size] (f16 or
 * bf16) in the layout the backend's kernels stream fastest, made by the
 * backend that owns the tensors' memory:
 *  - CUDA device tensors: for each expert, each tile of 128 rows and each
 *    128 values of K, one contiguous block holding the weights in the order
 *    the kernel's threads read them followed by that block's scales and
 *    biases; bits 2/3/4/8. Built on the device.
 *  - host tensors (the CPU backend): panels of 64 rows whose records put
 *    the rows in the vector lanes (docs/format.md, "CPU packed layout");
 *    bits 2 and 4 (GQMM_ERR_UNSUPPORTED for 3 and 8). Its fast kernel takes
 *    bfloat16 x on CPUs with AVX-512 BF16; other dtypes and CPUs run a
 *    portable kernel over it (correct, not fast).
 * Built once, at load time; the MLX tensors stay valid and unchanged and
 * may be freed. Needs K % 32 == 0 (GQMM_ERR_UNSUPPORTED otherwise).
 * Values are bit-identical to the MLX layout's: results of the packed ops
 * equal the unpacked ops' within the usual float32-accumulation tolerance.
 */
typedef struct gqmm_packed gqmm_packed;
int gqmm_pack(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
              const gqmm_tensor *biases, gqmm_quant q, gqmm_packed **out);
/*
 * gqmm_pack_glu: gqmm_pack for a fused gate_up tensor [..., 2I, K*bits/32]
 * (gate rows [0, I), then up rows [I, 2I), as gqmm_moe_weights.gate_up),
 * with each gate row stored beside its up row. Given as gate_up_packed,
 * it lets gqmm_moe_forward apply the activation in the gate_up GEMM's
 * epilogue (no [tokens*k, 2I] intermediate and no separate pass).
 * gqmm_gather_qmm_packed reads it like a gqmm_pack copy, with the same
 * results. GQMM_ERR_SHAPE if the row count is odd. (The CPU layout keeps
 * the rows' order, so on host tensors it is the gqmm_pack copy.)
 */
int gqmm_pack_glu(gqmm_ctx *ctx, const gqmm_tensor *w, const gqmm_tensor *scales,
                  const gqmm_tensor *biases, gqmm_quant q, gqmm_packed **out);
void gqmm_packed_free(gqmm_ctx *ctx, gqmm_packed *p);
/* Bytes the packed copy occupies (device or host memory, as it was made). */
int64_t gqmm_packed_nbytes(const gqmm_packed *p);
/*
 * 1 if the pack dequantizes with one FMA per two weights (its scales stored
 * pre-scaled by a power of two, exactly; src/cuda/wfmt.cuh), 0 if it takes
 * the two-instruction path (same results, ~5% more kernel time on the
 * seed's shapes). gqmm_pack chooses the first when every scale fits:
 * |scale| < 2^-5 (3-, 4-, 8-bit) or 2^-1 (2-bit) for bfloat16, 2^-8 or 2^-4
 * for float16. Always 0 for a CPU copy (its layout has one form).
 */
int gqmm_packed_scaled(const gqmm_packed *p);
/*
 * gather_qmm (transpose=1) over packed weights: the same semantics, shapes,
 * broadcasting and errors as gqmm_gather_qmm with the tensors w was packed
 * from; NULL indices give quantized_matmul. It runs on the backend that
 * packed w: x and out on the same device as the copy, the indices in host
 * memory as for gqmm_gather_qmm (GQMM_ERR_UNSUPPORTED where it cannot run,
 * e.g. a CUDA copy under a context forced to the CPU).
 */
int gqmm_gather_qmm_packed(gqmm_ctx *ctx, const gqmm_tensor *x, const gqmm_packed *w,
                           const gqmm_tensor *lhs_indices, const gqmm_tensor *rhs_indices,
                           int sorted_indices, gqmm_tensor *out);

/* ---- MoE expert layer (src/moe) ------------------------------------------ */

/* The gated activation between gate_up and down. */
typedef enum {
  GQMM_ACT_SWIGLU = 0, /* silu(gate) * up: Llama, Qwen, Mixtral */
  GQMM_ACT_GEGLU = 1,  /* gelu_tanh(gate) * up: Gemma (gelu with the tanh approximation) */
} gqmm_activation;

/*
 * One MoE layer's quantized expert weights in the MLX layout (transpose=1,
 * mode "affine"): E experts, hidden size H, expert intermediate size I.
 * Either the fused gate_up set ([E, 2I, H*bits/32], gate rows first, then up)
 * or the separate gate and up sets ([E, I, H*bits/32] each); leave the other
 * pointers NULL. down is [E, H, I*bits/32]. Scales and biases have the packed
 * tensor's shape with the last axis K/group_size, and the dtype of x.
 */
typedef struct {
  gqmm_quant q;
  const gqmm_tensor *gate_up, *gate_up_scales, *gate_up_biases;
  const gqmm_tensor *gate, *gate_scales, *gate_biases;
  const gqmm_tensor *up, *up_scales, *up_biases;
  const gqmm_tensor *down, *down_scales, *down_biases;
  /* Optional (NULL: not used): gqmm_pack copies of gate_up (or gate and up)
   * and down, made from the tensors above; the CUDA backend reads these. */
  const gqmm_packed *gate_up_packed, *gate_packed, *up_packed, *down_packed;
} gqmm_moe_weights;

/*
 * The expert layer of a MoE block, as mlx-lm's SwitchGLU plus the router's
 * weighted sum:
 *   out[t] = sum over j < k (ascending) of expert_weights[t, j] *
 *            down[e] @ act(gate[e] @ x[t], up[e] @ x[t]),   e = expert_ids[t, j]
 * x [tokens, H]; expert_ids [tokens, k] int32/uint32, each in [0, E);
 * expert_weights [tokens, k] and out [tokens, H] of x's dtype (f32/f16/bf16).
 * Products accumulate in float32; the k-slot sum is in float32 in ascending
 * slot order, so the result is bitwise reproducible for any thread count.
 *
 * expert_ids out of range: host (CPU) ids are checked before anything runs
 * (GQMM_ERR_INDEX naming the element). Device ids are checked on the device,
 * so the call never waits for the GPU: the call returns GQMM_OK, the tokens
 * with a bad id get NaN output rows (no out-of-bounds access), and the error
 * is deferred. It is reported, once, as GQMM_ERR_ARG ("expert_ids: an
 * earlier call ... had an id outside [0, E): element [t, j] is v") by the
 * next gqmm_device_sync on ctx, or by a later gqmm_moe_forward on ctx that
 * starts after the device has run the bad call's first kernel (that call
 * then does nothing). The call after the report runs normally.
 */
int gqmm_moe_forward(gqmm_ctx *ctx, const gqmm_moe_weights *w, const gqmm_tensor *x,
                     const gqmm_tensor *expert_ids, const gqmm_tensor *expert_weights,
                     gqmm_activation act, gqmm_tensor *out);

/* How router logits become (ids, weights), following mlx-lm's models. */
typedef enum {
  GQMM_ROUTER_SOFTMAX_TOPK = 0,      /* softmax over E, keep the top k probabilities */
  GQMM_ROUTER_SOFTMAX_TOPK_NORM = 1, /* same, renormalized to sum 1 (Qwen3 norm_topk_prob) */
  GQMM_ROUTER_TOPK_SOFTMAX = 2,      /* top k logits, softmax over those k (Mixtral, gpt-oss) */
} gqmm_router_mode;

/*
 * Router top-k: logits [tokens, E] float (CPU) -> expert_ids [tokens, k]
 * int32 and expert_weights [tokens, k] of the logits' dtype. Softmax runs in
 * float32 (mlx "precise"); the probabilities are rounded to the logits' dtype
 * before selection, as in mlx. Slots come in descending order of weight, ties
 * to the lower expert id.
 */
int gqmm_router_topk(gqmm_ctx *ctx, const gqmm_tensor *logits, int k, gqmm_router_mode mode,
                     gqmm_tensor *expert_ids, gqmm_tensor *expert_weights);

/* Shapes of a public MoE model's expert layers (the bench's model table). */
typedef struct {
  const char *name;
  int layers, experts, top_k;
  int64_t hidden, inter; /* model width; one expert's intermediate size */
  gqmm_activation act;
  gqmm_router_mode router;
  gqmm_quant q;          /* the quantization its MLX checkpoints use */
  const char *source;    /* where the numbers come from */
} gqmm_moe_model;

/* Model i of the built-in table (NULL past the end); by name (NULL if unknown). */
const gqmm_moe_model *gqmm_moe_model_at(int i);
const gqmm_moe_model *gqmm_moe_model_find(const char *name);

/* ---- library info -------------------------------------------------------- */

const char *gqmm_version(void);
/* Writes a one-line description of the CPU features gqmm detected. */
void gqmm_cpu_features(char *buf, size_t len);

/* ---- device memory (GPU backends) ---------------------------------------- */

/*
 * Memory of the GPU that GQMM_DEVICE_CUDA tensors live on. Each call fails
 * with GQMM_ERR_UNSUPPORTED when no GPU backend is compiled in and
 * GQMM_ERR_BACKEND when no GPU is usable. Copies are synchronous.
 */
typedef enum {
  GQMM_COPY_HOST_TO_DEVICE = 0,
  GQMM_COPY_DEVICE_TO_HOST = 1,
  GQMM_COPY_DEVICE_TO_DEVICE = 2,
} gqmm_copy_kind;

int gqmm_device_alloc(gqmm_ctx *ctx, size_t bytes, void **out);
void gqmm_device_free(gqmm_ctx *ctx, void *p);
int gqmm_device_copy(gqmm_ctx *ctx, void *dst, const void *src, size_t bytes,
                     gqmm_copy_kind kind);
/* Wait until all queued device work of ctx has finished. Also reports a
 * deferred error of earlier calls (a bad device expert id of
 * gqmm_moe_forward) as GQMM_ERR_ARG. */
int gqmm_device_sync(gqmm_ctx *ctx);

/* Device time of the last op on ctx, from device events: its matmul kernel
 * alone, and all its device work (index upload, routing plan, kernel). */
int gqmm_device_last_time(gqmm_ctx *ctx, double *kernel_us, double *op_us);

/* ---- streams and graphs (GPU backends) ----------------------------------- */

/*
 * The CUDA stream (a cudaStream_t, passed as void *) that ctx's device work
 * goes to from now on: its kernels, index uploads and packing, and the
 * copies of gqmm_device_copy; gqmm_device_sync then waits for that stream.
 * NULL, the default: the legacy default stream. The call first waits for
 * the work ctx queued on its previous stream, so the order of ctx's calls
 * holds across the change. The stream stays the caller's: it must outlive
 * its use by ctx (set NULL before destroying it).
 */
int gqmm_device_set_stream(gqmm_ctx *ctx, void *stream);

/*
 * CUDA graphs of a sequence of calls on ctx (a model step, say): the work
 * is recorded once and replayed with one launch, without the host's
 * per-kernel launch work and with the device's launches prepared ahead.
 *
 *   gqmm_graph_begin(ctx)        ctx's device work is recorded from now on,
 *                                not run. With no stream set, ctx first
 *                                gets a stream of its own (a blocking one:
 *                                ordered with the legacy default stream).
 *   gqmm_moe_forward(ctx, ...)   as many as wanted
 *   gqmm_graph_end(ctx, &g)      stops recording; g is the runnable graph
 *   gqmm_graph_launch(ctx, g)    runs it on ctx's stream, as often as wanted
 *   gqmm_graph_free(g)
 *
 * A replay reads and writes the same device buffers the recorded calls
 * named, with their contents at the time of the replay. What may be
 * recorded: gqmm_moe_forward on device tensors, after one call of the same
 * shape has run on ctx outside the recording (its scratch memory is sized
 * then; a call that would need more, or another top_k, returns
 * GQMM_ERR_UNSUPPORTED and records nothing). Later calls on ctx leave a
 * graph valid: a scratch they must replace is kept until ctx is destroyed.
 * Launch a graph only on the context that recorded it (it uses that
 * context's scratch memory). Everything that copies host data, allocates or waits
 * (gqmm_gather_qmm and gqmm_quantized_matmul, which upload their host
 * indices; gqmm_pack; gqmm_device_alloc, _copy, _sync and _set_stream)
 * returns GQMM_ERR_UNSUPPORTED while recording, and the recording goes on;
 * do not gqmm_device_free (or gqmm_packed_free) during it either. Phase
 * timing is off in recorded calls. A bad device expert id in a replay is
 * reported as for a plain call, naming the recorded call's number. While
 * ctx records, the program must not queue other work on the legacy default
 * stream (CUDA's rule for recording a blocking stream) nor record on ctx
 * from another thread.
 */
typedef struct gqmm_graph gqmm_graph;
int gqmm_graph_begin(gqmm_ctx *ctx);
int gqmm_graph_end(gqmm_ctx *ctx, gqmm_graph **out);
int gqmm_graph_launch(gqmm_ctx *ctx, const gqmm_graph *g);
void gqmm_graph_free(gqmm_graph *g);

#ifdef __cplusplus
}
#endif
#endif /* GQMM_H */
