/* format.c - the table of supported affine bit widths and their pack units. */
#include "internal.h"

static const gqmm__format formats[] = {
    {2, 16, 4}, /* 16 values per uint32 */
    {3, 8, 3},  /* 8 values in 3 bytes */
    {4, 8, 4},  /* 8 values per uint32 */
    {5, 8, 5},  /* 8 values in 5 bytes */
    {6, 4, 3},  /* 4 values in 3 bytes */
    {8, 4, 4},  /* 4 values per uint32 */
};

/* tests/c/test_format.c checks each row: values*bits == bytes*8, 32 % values == 0. */

const gqmm__format *gqmm__format_for_bits(int bits) {
  for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++)
    if (formats[i].bits == bits) return &formats[i];
  return NULL;
}

int gqmm_quant_check(gqmm_quant q) {
  if (!gqmm__format_for_bits(q.bits)) return GQMM_ERR_BITS;
  if (q.group_size != 32 && q.group_size != 64 && q.group_size != 128) return GQMM_ERR_GROUP_SIZE;
  return GQMM_OK;
}

int64_t gqmm_packed_words(gqmm_quant q, int64_t k) {
  return k * q.bits / 32;
}
