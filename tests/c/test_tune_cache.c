/* test_tune_cache.c - the tuning cache file: round trip, corrupt, truncated,
 * stale and hostile files, and concurrent writers in separate processes. */
#include "../../src/tune/tune.h"
#include "test.h"
#include "test_tune.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static gqmm__tune_entry entry(int i) {
  gqmm__tune_entry e;
  memset(&e, 0, sizeof e);
  snprintf(e.key.device, sizeof e.key.device, "Test GPU \"%d\"\\x", i % 3);
  snprintf(e.key.backend, sizeof e.key.backend, "cuda");
  snprintf(e.key.op, sizeof e.key.op, i % 2 ? "gather_qmm" : "qmm");
  snprintf(e.key.dtype, sizeof e.key.dtype, "bf16");
  e.key.bits = 4, e.key.group_size = 64, e.key.transpose = 1;
  e.key.K = 2816 + 64 * i, e.key.N = 1408, e.key.rows = 1 << (i % 7);
  snprintf(e.lib, sizeof e.lib, "%s", gqmm_version());
  snprintf(e.config, sizeof e.config, "n%d_k64_w4_s4", 64 * (1 + i % 3));
  e.time_us = 90.5 + i, e.weight_GBps = 2800 - i, e.fraction = 0.9;
  return e;
}

static int write_text(const char *path, const char *text, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  size_t w = fwrite(text, 1, n, f);
  return fclose(f) == 0 && w == n ? 0 : -1;
}

static char *slurp(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  char *b = malloc(1 << 20);
  *n = b ? fread(b, 1, 1 << 20, f) : 0;
  fclose(f);
  return b;
}

GQMM_TEST(cache_round_trip_and_merge) {
  char path[512];
  tmp_path(path, sizeof path, "rt");
  remove_cache(path);
  gqmm__tune_cache c;
  char msg[400];
  CHECK_OK(gqmm__tune_cache_load(path, &c, msg, sizeof msg)); /* missing file: empty */
  CHECK(c.n == 0 && msg[0] == '\0');
  gqmm__tune_entry es[10];
  for (int i = 0; i < 10; i++)
    es[i] = entry(i);
  CHECK_OK(gqmm__tune_cache_store(path, es, 6, msg, sizeof msg));
  CHECK_OK(gqmm__tune_cache_store(path, es + 4, 6, msg, sizeof msg)); /* overlaps 4, 5 */
  es[5].time_us = 1;
  snprintf(es[5].config, sizeof es[5].config, "replaced");
  CHECK_OK(gqmm__tune_cache_store(path, es + 5, 1, msg, sizeof msg));
  CHECK_OK(gqmm__tune_cache_load(path, &c, msg, sizeof msg));
  CHECK_MSG(c.n == 10 && msg[0] == '\0', "n=%d msg=%s", c.n, msg);
  for (int i = 0; i < 10; i++) {
    const gqmm__tune_entry *f = gqmm__tune_cache_find(&c, &es[i].key);
    CHECK(f != NULL);
    CHECK(!strcmp(f->config, es[i].config) && !strcmp(f->key.device, es[i].key.device));
    CHECK(fabs(f->time_us - es[i].time_us) < 1e-6 && fabs(f->fraction - 0.9) < 1e-9);
  }
  /* a key that differs in one field is not found */
  gqmm__tune_key k = es[0].key;
  k.rows *= 2;
  CHECK(gqmm__tune_cache_find(&c, &k) == NULL);
  gqmm__tune_cache_free(&c);
  remove_cache(path);
}

GQMM_TEST(cache_lookup_borrows_a_neighbouring_bucket) {
  gqmm__tune_cache c = {0};
  gqmm__tune_entry e1 = entry(0), e4 = entry(0), e64 = entry(0);
  e1.key.rows = 1, e4.key.rows = 4, e64.key.rows = 64;
  CHECK_OK(gqmm__tune_cache_put(&c, &e1));
  CHECK_OK(gqmm__tune_cache_put(&c, &e4));
  CHECK_OK(gqmm__tune_cache_put(&c, &e64));
  gqmm__tune_key k = e1.key;
  const int want[][2] = {{1, 1}, {2, 4}, {4, 4}, {8, 4}, {16, 0}, {32, 64}, {128, 64}, {256, 0}};
  for (int i = 0; i < 8; i++) {
    k.rows = want[i][0];
    const gqmm__tune_entry *f = gqmm__tune_cache_find_near(&c, &k);
    CHECK_MSG(want[i][1] ? f && f->key.rows == want[i][1] : !f, "rows %d", k.rows);
  }
  k.rows = 2;
  k.N = 704; /* another shape never borrows */
  CHECK(gqmm__tune_cache_find_near(&c, &k) == NULL);
  gqmm__tune_cache_free(&c);
}

GQMM_TEST(cache_stale_entries_are_reported_and_dropped) {
  char path[512], msg[400];
  tmp_path(path, sizeof path, "stale");
  FILE *f = fopen(path, "w");
  CHECK(f);
  fprintf(f, "{\"format\": \"gqmm-tune-cache\", \"version\": 1, \"entries\": [{\"device\": \"d\", "
             "\"lib\": \"0.0.1-old\", \"backend\": \"cuda\", \"op\": \"qmm\", \"dtype\": \"bf16\", "
             "\"config\": \"c\", \"bits\": 4, \"group_size\": 64, \"transpose\": 1, \"K\": 64, "
             "\"N\": 64, \"rows_per_expert\": 16}]}");
  fclose(f);
  gqmm__tune_cache c;
  CHECK_OK(gqmm__tune_cache_load(path, &c, msg, sizeof msg));
  CHECK(c.n == 1 && strstr(msg, "stale") != NULL);
  CHECK(gqmm__tune_cache_find(&c, &c.entries[0].key) == NULL);
  gqmm__tune_cache_free(&c);
  gqmm__tune_entry now = entry(3); /* the next store drops it */
  CHECK_OK(gqmm__tune_cache_store(path, &now, 1, msg, sizeof msg));
  CHECK_OK(gqmm__tune_cache_load(path, &c, msg, sizeof msg));
  CHECK(c.n == 1 && !strcmp(c.entries[0].lib, gqmm_version()) && msg[0] == '\0');
  gqmm__tune_cache_free(&c);
  remove_cache(path);
}

GQMM_TEST(cache_stale_version_is_not_used) {
  gqmm__tune_cache c = {0};
  gqmm__tune_entry e = entry(1);
  snprintf(e.lib, sizeof e.lib, "0.0.1-old");
  CHECK_OK(gqmm__tune_cache_put(&c, &e));
  CHECK(gqmm__tune_cache_find(&c, &e.key) == NULL);
  e = entry(1);
  CHECK_OK(gqmm__tune_cache_put(&c, &e));
  CHECK(c.n == 2 && gqmm__tune_cache_find(&c, &e.key) == &c.entries[1]);
  gqmm__tune_cache_free(&c);
}

GQMM_TEST(cache_corrupt_or_truncated_files_are_reported) {
  char path[512];
  tmp_path(path, sizeof path, "corrupt");
  remove_cache(path);
  gqmm__tune_entry es[3] = {entry(0), entry(1), entry(2)};
  char msg[400];
  CHECK_OK(gqmm__tune_cache_store(path, es, 3, msg, sizeof msg));
  size_t n;
  char *good = slurp(path, &n);
  CHECK(good && n > 100);
  /* every truncation: an error with a message, or (never) more entries than written */
  for (size_t cut = 0; cut < n; cut++) {
    CHECK(write_text(path, good, cut) == 0);
    gqmm__tune_cache c;
    int st = gqmm__tune_cache_load(path, &c, msg, sizeof msg);
    if (cut < n - 1) CHECK_MSG(st == GQMM_ERR_FORMAT && c.n == 0 && msg[0], "cut %zu: %d", cut, st);
    gqmm__tune_cache_free(&c);
  }
  const char *docs[] = {"not json",
                        "[]",
                        "{\"format\": \"other\", \"version\": 1, \"entries\": []}",
                        "{\"format\": \"gqmm-tune-cache\", \"version\": 2, \"entries\": []}",
                        "{\"format\": \"gqmm-tune-cache\", \"version\": 1}",
                        "{\"format\": \"gqmm-tune-cache\", \"version\": 1, \"entries\": {}}"};
  for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
    CHECK(write_text(path, docs[i], strlen(docs[i])) == 0);
    gqmm__tune_cache c;
    CHECK_MSG(gqmm__tune_cache_load(path, &c, msg, sizeof msg) == GQMM_ERR_FORMAT && msg[0], "%s",
              docs[i]);
    CHECK(c.n == 0);
  }
  /* a store over a corrupt file replaces it and says so */
  CHECK_OK(gqmm__tune_cache_store(path, es, 1, msg, sizeof msg));
  CHECK(strstr(msg, "replaced") != NULL);
  gqmm__tune_cache c;
  CHECK_OK(gqmm__tune_cache_load(path, &c, msg, sizeof msg));
  CHECK(c.n == 1);
  gqmm__tune_cache_free(&c);
  free(good);
  remove_cache(path);
}

GQMM_TEST(cache_hostile_entries_are_skipped) {
  char path[512];
  tmp_path(path, sizeof path, "hostile");
  /* The first entry is valid; each other one breaks one rule. */
  const char *valid =
      "\"device\": \"d\", \"lib\": \"0.1.0\", \"backend\": \"cuda\", \"op\": \"qmm\", "
      "\"dtype\": \"bf16\", \"config\": \"c\", \"group_size\": 64, \"transpose\": 1, "
      "\"K\": 64, \"N\": 64, \"rows_per_expert\": 16";
  const char *bad_tail[] = {"\"bits\": 7",
                            "\"bits\": -4",
                            "\"bits\": 4.5",
                            "\"bits\": 1e300",
                            "\"bits\": \"4\"",
                            "\"bits\": null",
                            "\"bits\": 4, \"rows_per_expert\": 12",
                            "\"bits\": 4, \"K\": 99999999999",
                            "\"bits\": 4, \"op\": \"rm -rf\"",
                            "\"bits\": 4, \"dtype\": \"f64\""};
  /* later members do not override: the reader takes the first, so each bad
   * field comes first in its object */
  char *doc = malloc(1 << 16);
  CHECK(doc);
  int n = snprintf(
      doc, 1 << 16,
      "{\"format\": \"gqmm-tune-cache\", \"version\": 1, \"entries\": [{%s, \"bits\": 4}", valid);
  for (size_t i = 0; i < sizeof bad_tail / sizeof bad_tail[0]; i++)
    n += snprintf(doc + n, (size_t)((1 << 16) - n), ", {%s, %s}", bad_tail[i], valid);
  /* a device name longer than the key holds, a control character */
  char longname[300];
  memset(longname, 'x', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  n += snprintf(doc + n, (size_t)((1 << 16) - n), ", {\"device\": \"%s\", %s, \"bits\": 4}",
                longname, valid + strlen("\"device\": \"d\", "));
  n += snprintf(doc + n, (size_t)((1 << 16) - n), ", {\"device\": \"a\\u0001b\", %s, \"bits\": 4}",
                valid + strlen("\"device\": \"d\", "));
  n += snprintf(doc + n, (size_t)((1 << 16) - n), ", 42, [], \"str\"]}");
  CHECK(write_text(path, doc, (size_t)n) == 0);
  free(doc);
  gqmm__tune_cache c;
  char msg[400];
  CHECK_OK(gqmm__tune_cache_load(path, &c, msg, sizeof msg));
  CHECK_MSG(c.n == 1, "n=%d (%s)", c.n, msg);
  CHECK(strstr(msg, "15 of 16 entries ignored") != NULL);
  CHECK(c.entries[0].key.bits == 4 && c.entries[0].key.rows == 16);
  gqmm__tune_cache_free(&c);
  /* an oversized file is refused before parsing */
  FILE *f = fopen(path, "wb");
  CHECK(f);
  for (unsigned i = 0; i <= GQMM__TUNE_MAX_FILE / 4096; i++)
    fprintf(f, "%4096s", " ");
  fclose(f);
  CHECK(gqmm__tune_cache_load(path, &c, msg, sizeof msg) == GQMM_ERR_FORMAT);
  CHECK(strstr(msg, "larger") != NULL);
  /* storing an invalid entry is refused */
  gqmm__tune_entry e = entry(0);
  e.key.bits = 7;
  CHECK(gqmm__tune_cache_store(path, &e, 1, msg, sizeof msg) == GQMM_ERR_ARG);
  remove_cache(path);
}

/* Two processes store 40 entries each, one per call, while a third keeps
 * reading: every read sees a complete file, and the end result holds all 80. */
GQMM_TEST(cache_concurrent_writers_merge) {
  char path[512];
  tmp_path(path, sizeof path, "concurrent");
  remove_cache(path);
  pid_t pids[3];
  for (int w = 0; w < 3; w++) {
    pids[w] = fork();
    CHECK(pids[w] >= 0);
    if (pids[w] == 0) {
      char msg[400];
      int bad = 0;
      for (int i = 0; i < 40; i++) {
        if (w < 2) {
          gqmm__tune_entry e = entry(w * 40 + i);
          bad |= gqmm__tune_cache_store(path, &e, 1, msg, sizeof msg) != GQMM_OK;
        } else {
          gqmm__tune_cache c;
          bad |= gqmm__tune_cache_load(path, &c, msg, sizeof msg) != GQMM_OK || msg[0] != '\0';
          gqmm__tune_cache_free(&c);
        }
      }
      _exit(bad);
    }
  }
  for (int w = 0; w < 3; w++) {
    int status = 0;
    CHECK(waitpid(pids[w], &status, 0) == pids[w]);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "process %d failed", w);
  }
  gqmm__tune_cache c;
  char msg[400];
  CHECK_OK(gqmm__tune_cache_load(path, &c, msg, sizeof msg));
  CHECK_MSG(c.n == 80 && msg[0] == '\0', "n=%d %s", c.n, msg);
  for (int i = 0; i < 80; i++) {
    gqmm__tune_entry e = entry(i);
    CHECK(gqmm__tune_cache_find(&c, &e.key) != NULL);
  }
  gqmm__tune_cache_free(&c);
  remove_cache(path);
}

GQMM_TEST(cache_default_path_follows_environment) {
  char buf[512];
  const char *old = getenv("GQMM_TUNE_CACHE");
  char saved[512] = "";
  if (old) snprintf(saved, sizeof saved, "%s", old);
  setenv("GQMM_TUNE_CACHE", "/some/where/t.json", 1);
  CHECK(gqmm__tune_default_path(buf, sizeof buf) && !strcmp(buf, "/some/where/t.json"));
  unsetenv("GQMM_TUNE_CACHE");
  if (getenv("XDG_CACHE_HOME") || getenv("HOME")) {
    CHECK(gqmm__tune_default_path(buf, sizeof buf));
    CHECK(strstr(buf, "gqmm/tune.json") != NULL);
  }
  if (old) setenv("GQMM_TUNE_CACHE", saved, 1);
}
