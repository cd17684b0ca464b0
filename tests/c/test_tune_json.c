/* test_tune_json.c - the tuning cache's JSON reader: grammar, limits, and
 * random mutations of valid documents (must never crash or leak; run under
 * `make asan`). */
#include "../../src/tune/json.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static gqmm__json *parse(const char *s) {
  char err[200];
  return gqmm__json_parse(s, strlen(s), err, sizeof err);
}

GQMM_TEST(json_parses_values_and_escapes) {
  gqmm__json *j = parse(
      " {\"a\": [1, -2.5e3, true, false, null], \"s\": \"x\\\"\\\\\\/\\n\\u00e9\\ud83d\\ude00\","
      " \"o\": {}, \"e\": []} ");
  CHECK(j && j->kind == GQMM__JSON_OBJECT);
  const gqmm__json *a = gqmm__json_get(j, "a");
  CHECK(a && a->kind == GQMM__JSON_ARRAY);
  CHECK(a->child->number == 1 && a->child->next->number == -2500);
  CHECK(a->child->next->next->kind == GQMM__JSON_BOOL && a->child->next->next->number == 1);
  const char *s;
  CHECK(gqmm__json_get_str(j, "s", &s));
  CHECK(!strcmp(s, "x\"\\/\n\xc3\xa9\xf0\x9f\x98\x80"));
  long long v;
  CHECK(!gqmm__json_get_int(j, "s", 0, 10, &v)); /* wrong type */
  CHECK(gqmm__json_get(j, "missing") == NULL);
  gqmm__json_free(j);
  j = parse("{\"i\": 42, \"f\": 4.5, \"big\": 1e300}");
  CHECK(j);
  CHECK(gqmm__json_get_int(j, "i", 0, 100, &v) && v == 42);
  CHECK(!gqmm__json_get_int(j, "i", 0, 10, &v));    /* out of range */
  CHECK(!gqmm__json_get_int(j, "f", 0, 100, &v));   /* not integral */
  CHECK(!gqmm__json_get_int(j, "big", 0, 100, &v)); /* no UB cast of a huge double */
  gqmm__json_free(j);
}

GQMM_TEST(json_rejects_malformed_input) {
  const char *bad[] = {"",
                       "   ",
                       "{",
                       "[1,]",
                       "[1 2]",
                       "{\"a\" 1}",
                       "{\"a\":}",
                       "{a:1}",
                       "01",
                       "1.",
                       ".5",
                       "-",
                       "1e",
                       "+1",
                       "inf",
                       "NaN",
                       "0x10",
                       "\"abc",
                       "\"\\x\"",
                       "\"\\u12\"",
                       "\"\\ud800\"",
                       "\"\\udc00x\"",
                       "\"\\u0000\"",
                       "\"a\nb\"",
                       "tru",
                       "nul",
                       "[1] 2",
                       "{\"a\":1}}",
                       "1e999",
                       "[\"\\ud800\\u0041\"]"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char err[200] = "";
    gqmm__json *j = gqmm__json_parse(bad[i], strlen(bad[i]), err, sizeof err);
    CHECK_MSG(j == NULL, "accepted '%s'", bad[i]);
    CHECK_MSG(strstr(err, "at byte") != NULL, "no position in '%s' for '%s'", err, bad[i]);
  }
  /* an embedded NUL ends nothing: the length is what counts */
  gqmm__json *j = gqmm__json_parse("[1]\0[2]", 7, NULL, 0);
  CHECK(j == NULL);
}

GQMM_TEST(json_limits_depth_and_string_length) {
  char deep[4 * GQMM__JSON_MAX_DEPTH + 8];
  int n = 0;
  for (int i = 0; i <= GQMM__JSON_MAX_DEPTH; i++)
    deep[n++] = '[';
  for (int i = 0; i <= GQMM__JSON_MAX_DEPTH; i++)
    deep[n++] = ']';
  gqmm__json *j = gqmm__json_parse(deep, (size_t)n, NULL, 0);
  CHECK(j == NULL); /* one level too deep */
  j = gqmm__json_parse(deep + 1, (size_t)n - 2, NULL, 0);
  CHECK(j != NULL); /* exactly at the limit */
  gqmm__json_free(j);
  /* a million '[' must fail fast, not overflow the stack */
  size_t big = 1000000;
  char *b = malloc(big);
  CHECK(b);
  memset(b, '[', big);
  char err[200];
  j = gqmm__json_parse(b, big, err, sizeof err);
  free(b);
  CHECK(j == NULL && strstr(err, "nesting"));
  char *s = malloc(GQMM__JSON_MAX_STRING + 8);
  CHECK(s);
  s[0] = '"';
  memset(s + 1, 'a', GQMM__JSON_MAX_STRING + 1);
  s[GQMM__JSON_MAX_STRING + 2] = '"';
  j = gqmm__json_parse(s, GQMM__JSON_MAX_STRING + 3, err, sizeof err);
  CHECK(j == NULL && strstr(err, "longer"));
  s[GQMM__JSON_MAX_STRING + 1] = '"';
  j = gqmm__json_parse(s, GQMM__JSON_MAX_STRING + 2, err, sizeof err);
  free(s);
  CHECK(j && j->kind == GQMM__JSON_STRING && strlen(j->string) == GQMM__JSON_MAX_STRING);
  gqmm__json_free(j);
}

/* What the writer makes of a string (s != NULL) or a number, in buf. */
static bool written(char *buf, size_t len, const char *s, double v) {
  FILE *f = fmemopen(buf, len, "w");
  if (!f) return false;
  if (s)
    gqmm__json_write_str(f, s);
  else
    gqmm__json_write_num(f, v);
  return fclose(f) == 0;
}

GQMM_TEST(json_writer_round_trips_through_reader) {
  const char *strs[] = {"plain", "quote\" backslash\\ newline\n tab\t ctl\x01 del\x7f", "\xc3\xa9"};
  const double nums[] = {0, -1, 2816, 1e-9, 123.456, 9007199254740991.0};
  char buf[256];
  for (size_t i = 0; i < 3; i++) {
    CHECK(written(buf, sizeof buf, strs[i], 0));
    gqmm__json *j = parse(buf);
    bool same = j && j->kind == GQMM__JSON_STRING && !strcmp(j->string, strs[i]);
    gqmm__json_free(j);
    CHECK_MSG(same, "%s", buf);
  }
  for (size_t i = 0; i < 6; i++) {
    CHECK(written(buf, sizeof buf, NULL, nums[i]));
    gqmm__json *j = parse(buf);
    bool same =
        j && j->kind == GQMM__JSON_NUMBER && fabs(j->number - nums[i]) <= 1e-8 * fabs(nums[i]);
    gqmm__json_free(j);
    CHECK_MSG(same, "%s", buf);
  }
  CHECK(written(buf, sizeof buf, NULL, NAN) && !strcmp(buf, "null"));
}

/* Random byte edits (flip, delete, duplicate, insert structural characters)
 * of a valid cache-like document: the reader must return a tree or an error,
 * never crash, hang or leak; a returned tree must be well formed. */
static int count_nodes(const gqmm__json *j, int depth) {
  int n = 0;
  for (; j; j = j->next) {
    if (depth > GQMM__JSON_MAX_DEPTH) return -1000000;
    if (j->kind == GQMM__JSON_STRING && !j->string) return -1000000;
    n += 1 + count_nodes(j->child, depth + 1);
  }
  return n;
}

GQMM_TEST(json_survives_random_mutations) {
  const char *seed = "{\"format\": \"gqmm-tune-cache\", \"version\": 1, \"entries\": [\n"
                     "{\"device\": \"NVIDIA H100 \\u00e9\", \"lib\": \"0.1.0\", \"op\": "
                     "\"gather_qmm\", \"bits\": 4,"
                     " \"K\": 2816, \"N\": 1408, \"rows_per_expert\": 16, \"time_us\": 95.25e0, "
                     "\"x\": [true, null]}]}";
  const size_t len = strlen(seed);
  test_rng r = test_rng_make(77);
  const char inserts[] = "{}[]\",:\\0123456789-+.eEtrufalsn \x01\xff";
  char *buf = malloc(len * 2 + 64);
  CHECK(buf);
  int accepted = 0;
  for (int it = 0; it < 20000; it++) {
    size_t n = len;
    memcpy(buf, seed, len);
    int edits = 1 + (int)(test_rng_u32(&r) % 4);
    for (int e = 0; e < edits && n > 0; e++) {
      size_t pos = test_rng_u32(&r) % n;
      switch (test_rng_u32(&r) % 4) {
      case 0:
        buf[pos] = (char)(buf[pos] ^ (1 << (test_rng_u32(&r) % 8)));
        break;
      case 1:
        memmove(buf + pos, buf + pos + 1, n - pos - 1), n--;
        break;
      case 2:
        if (n < len * 2 + 32) memmove(buf + pos + 1, buf + pos, n - pos), n++;
        break;
      default:
        buf[pos] = inserts[test_rng_u32(&r) % (sizeof inserts - 1)];
      }
    }
    if (test_rng_u32(&r) % 8 == 0) n = test_rng_u32(&r) % (n + 1); /* truncation */
    char err[200];
    gqmm__json *j = gqmm__json_parse(buf, n, err, sizeof err);
    if (j) {
      accepted++;
      CHECK(count_nodes(j, 0) > 0);
    } else {
      CHECK(err[0] != '\0');
    }
    gqmm__json_free(j);
  }
  free(buf);
  CHECK(accepted > 0 && accepted < 20000); /* the mutations really do both */
}
