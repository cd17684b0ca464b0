/* test_core.c - dtype conversions, the format table, status strings. */
#include "internal.h"
#include "test.h"

#include <math.h>
#include <string.h>

GQMM_TEST(bf16_round_trip_and_rounding) {
  CHECK(gqmm_f32_to_bf16(1.0f) == 0x3f80);
  /* 1 + 2^-8 is exactly half way between two bf16 values: ties to even */
  CHECK(gqmm_f32_to_bf16(1.00390625f) == 0x3f80);
  CHECK(gqmm_f32_to_bf16(1.01171875f) == 0x3f82);
  CHECK(isnan(gqmm_bf16_to_f32(gqmm_f32_to_bf16(NAN))));
  test_rng r = test_rng_make(1);
  for (int i = 0; i < 100000; i++) {
    uint16_t h = (uint16_t)test_rng_u32(&r);
    float f = gqmm_bf16_to_f32(h);
    if (!isnan(f)) CHECK(gqmm_f32_to_bf16(f) == h);
  }
}

GQMM_TEST(f16_round_trip_and_rounding) {
  CHECK(gqmm_f32_to_f16(1.0f) == 0x3c00);
  CHECK(gqmm_f32_to_f16(65504.0f) == 0x7bff);
  CHECK(gqmm_f32_to_f16(65520.0f) == 0x7c00);
  CHECK(gqmm_f32_to_f16(-0.0f) == 0x8000);
  CHECK(gqmm_f32_to_f16(5.9604645e-8f) == 0x0001); /* smallest subnormal */
  CHECK(gqmm_f32_to_f16(2.9802322e-8f) == 0x0000); /* half of it: ties to even */
  for (uint32_t h = 0; h < 65536; h++) {
    float f = gqmm_f16_to_f32((uint16_t)h);
    if (!isnan(f)) CHECK_MSG(gqmm_f32_to_f16(f) == h, "h=0x%04x", h);
  }
  /* midpoints between consecutive f16 values round to the even one */
  for (uint32_t h = 0; h < 0x7bff; h++) {
    float lo = gqmm_f16_to_f32((uint16_t)h), hi = gqmm_f16_to_f32((uint16_t)(h + 1));
    float mid = (float)(((double)lo + (double)hi) / 2);
    uint16_t want = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
    CHECK_MSG(gqmm_f32_to_f16(mid) == want, "h=0x%04x", h);
  }
}

GQMM_TEST(format_table_is_consistent) {
  const int bits[] = {2, 3, 4, 5, 6, 8};
  for (int i = 0; i < 6; i++) {
    const gqmm__format *f = gqmm__format_for_bits(bits[i]);
    CHECK(f && f->bits == bits[i]);
    CHECK(f->values_per_pack * f->bits == f->bytes_per_pack * 8);
    CHECK(32 % f->values_per_pack == 0);
  }
  CHECK(gqmm__format_for_bits(7) == NULL);
  CHECK(gqmm__format_for_bits(1) == NULL);
  CHECK(gqmm_quant_check((gqmm_quant){4, 64}) == GQMM_OK);
  CHECK(gqmm_quant_check((gqmm_quant){7, 64}) == GQMM_ERR_BITS);
  CHECK(gqmm_quant_check((gqmm_quant){4, 16}) == GQMM_ERR_GROUP_SIZE);
}

GQMM_TEST(unpack_follows_the_bit_stream_rule) {
  /* element j at bits [j*bits, (j+1)*bits) of the little-endian byte stream */
  uint8_t row[40];
  test_rng r = test_rng_make(2);
  for (size_t i = 0; i < sizeof row; i++) row[i] = (uint8_t)test_rng_u32(&r);
  const int bits[] = {2, 3, 4, 5, 6, 8};
  for (int b = 0; b < 6; b++) {
    for (int j = 0; j * bits[b] + bits[b] <= 320; j++) {
      uint32_t want = 0;
      for (int t = 0; t < bits[b]; t++) {
        int bit = j * bits[b] + t;
        want |= (uint32_t)((row[bit / 8] >> (bit % 8)) & 1) << t;
      }
      CHECK(gqmm__unpack(row, bits[b], j) == want);
    }
  }
}

GQMM_TEST(strerror_names_every_status) {
#define X(name, value, text) CHECK(strcmp(gqmm_strerror(value), text) == 0);
  GQMM_STATUS_LIST(X)
#undef X
  CHECK(strcmp(gqmm_strerror(-999), "unknown status") == 0);
}
