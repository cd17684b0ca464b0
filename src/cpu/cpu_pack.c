/*
 * cpu_pack.c - gqmm_pack for the CPU backend: the layout its packed kernels
 * read, the load-time copy into it, and the portable kernel over it.
 *
 * Why a layout of its own. In MLX's layout a weight row is one bit stream
 * along K, so vector lanes run along k: a kernel either sums each row's
 * lanes at the end and applies every group's scale per row and per pair of
 * dot instructions (the qmv kernel), or first copies the weights into a
 * panel with other lanes (the gemm paths): both cost about as much work
 * as the multiply-adds at 4-16 rows (docs/perf-notes.md, session 14). The
 * packed layout puts 16 weight rows in the 16 lanes of a vector instead:
 * a group's scales are then one vector, pairs of values unpack in two
 * instructions shared by every row of x, and a row of x is broadcast.
 *
 * The layout. Rows go in panels of GQMM__CPU_PANEL (64) consecutive rows
 * of one expert (the last panel of an expert padded with zero rows); a
 * panel is K / group_size records, one per group g, each
 *   slots: gs * bits / 32 vectors of 64 uint32 (the panel's rows in order):
 *          slot d of row r holds values k = g * gs + d * V + i, i < V
 *          (V = 32 / bits, the values of one MLX word), value i = 2j at bits
 *          [bits * j, bits * (j + 1)) and value 2j + 1 at 16 + bits * j;
 *   scales: the 64 rows' scales of group g, then their 64 biases, in the
 *          scales' dtype (float16 or bfloat16), 2 bytes each.
 * Records, panels and experts follow each other, so a panel is one linear
 * stream. 2- and 4-bit weights only (their slots are an MLX word with its
 * fields reordered); any K that is a whole number of groups.
 */
#include "cpu_backend.h"

#include <stdlib.h>
#include <string.h>

/* The bit of a slot where value i of its MLX word sits: even values in the
 * low half-word, odd ones in the high. */
static int slot_bit(int i, int bits) {
  return (i & 1) * 16 + bits * (i >> 1);
}

/* The fields of one MLX word (V values of `bits`, value i at bits * i)
 * reordered into a slot. */
static uint32_t slot_of_word(uint32_t w, int bits) {
  const uint32_t mask = (1u << bits) - 1u;
  uint32_t s = 0;
  for (int i = 0; i < 32 / bits; i++)
    s |= ((w >> (bits * i)) & mask) << slot_bit(i, bits);
  return s;
}

int gqmm__cpu_pack(gqmm_ctx *ctx, struct gqmm_packed *p, const uint32_t *w, const void *scales,
                   const void *biases, int64_t E, int64_t N) {
  const int bits = p->q.bits, gs = p->q.group_size;
  if (bits != 2 && bits != 4)
    return gqmm__fail(ctx, GQMM_ERR_UNSUPPORTED,
                      "gqmm_pack: the CPU packed layout holds 2- and 4-bit weights, not %d-bit; "
                      "use them unpacked (the MLX layout runs on every CPU path)",
                      bits);
  const int64_t K = p->K, G = K / gs, words = K * bits / 32, slots = gs * bits / 32;
  const int64_t rec = gqmm__cpu_pk_rec(bits, gs), panels = gqmm__cpu_pk_panels(N);
  /* the panels, then the records the kernels may prefetch past the last one */
  const int64_t bytes = E * panels * G * rec + GQMM__CPU_PK_PREFETCH * rec;
  uint8_t *d = gqmm__alloc_stream((size_t)bytes);
  if (!d)
    return gqmm__fail(ctx, GQMM_ERR_NOMEM, "gqmm_pack: cannot allocate %lld bytes",
                      (long long)bytes);
  memset(d, 0, (size_t)bytes); /* the padding rows: zero weights, scales and biases */
  const uint16_t *s16 = scales, *b16 = biases;
  for (int64_t e = 0; e < E; e++)
    for (int64_t n = 0; n < N; n++) {
      const int64_t row = e * N + n, r = n % GQMM__CPU_PANEL;
      uint8_t *panel = d + ((e * panels + n / GQMM__CPU_PANEL) * G) * rec;
      for (int64_t g = 0; g < G; g++) {
        uint8_t *rp = panel + g * rec;
        uint32_t *slot = (uint32_t *)rp;
        for (int64_t s = 0; s < slots; s++)
          slot[s * GQMM__CPU_PANEL + r] = slot_of_word(w[row * words + g * slots + s], bits);
        uint16_t *sb = (uint16_t *)(rp + slots * GQMM__CPU_PANEL * 4);
        sb[r] = s16[row * G + g];
        sb[GQMM__CPU_PANEL + r] = b16[row * G + g];
      }
    }
  p->data = d;
  p->nbytes = bytes;
  p->scaled = 0;
  return GQMM_OK;
}

/* The portable kernel over the packed layout (any dtype of x, any CPU):
 * each weight row dequantized to float (s * q + b, the reference's order)
 * and multiplied into the rows of x in float32, x as float rows. */
void gqmm__cpu_packed_portable(const gqmm__cpu_pkshape *ps, const uint8_t *pk, int np,
                               const float *const *x, int mr, float *C, int64_t ldc) {
  const int bits = ps->bits, gs = ps->group_size, slots = gs * bits / 32, per = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  float wv[128]; /* one group of one row (gs <= 128) */
  for (int p = 0; p < np; p++)
    for (int r = 0; r < GQMM__CPU_PANEL; r++) {
      float acc[GQMM__CPU_PK_MAX_ROWS] = {0.0f};
      for (int64_t g = 0; g < ps->G; g++) {
        const uint8_t *rp = pk + p * ps->panel_bytes + g * ps->rec;
        const uint32_t *slot = (const uint32_t *)rp;
        const uint16_t *sb = (const uint16_t *)(rp + slots * GQMM__CPU_PANEL * 4);
        const float s = gqmm__load_f(sb, ps->dtype, r),
                    b = gqmm__load_f(sb, ps->dtype, GQMM__CPU_PANEL + r);
        for (int d = 0; d < slots; d++) {
          const uint32_t v = slot[d * GQMM__CPU_PANEL + r];
          for (int i = 0; i < per; i++) {
            const uint32_t q = (v >> slot_bit(i, bits)) & mask;
            wv[d * per + i] = s * (float)q + b;
          }
        }
        for (int m = 0; m < mr; m++)
          for (int i = 0; i < gs; i++)
            acc[m] += x[m][g * gs + i] * wv[i];
      }
      for (int m = 0; m < mr; m++)
        C[m * ldc + p * GQMM__CPU_PANEL + r] = acc[m];
    }
}
