/*
 * cache.c - the tuning cache file: {"format": "gqmm-tune-cache", "version": 1,
 * "entries": [{device, lib, backend, op, dtype, bits, group_size, transpose,
 * K, N, rows_per_expert, config, time_us, weight_GBps, fraction}, ...]}.
 *
 * Reading trusts nothing: size, syntax, every field's type, length and range
 * are checked, and an entry that fails is skipped (never half-used). Writing
 * merges under a POSIX record lock on a side file and renames a complete
 * temporary file into place, so readers never see a torn file and two
 * processes tuning at once keep both of their results.
 */
#include "json.h"
#include "tune.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NOTE(...) ((msg && msglen) ? (void)snprintf(msg, msglen, __VA_ARGS__) : (void)0)

static bool is_pow2(long long v) {
  return v > 0 && (v & (v - 1)) == 0;
}

bool gqmm__tune_entry_valid(const gqmm__tune_entry *e, char *why, size_t whylen) {
  const char *bad = NULL;
  const gqmm__tune_key *k = &e->key;
  if (!k->device[0])
    bad = "device is empty";
  else if (!k->backend[0])
    bad = "backend is empty";
  else if (strcmp(k->op, "gather_qmm") && strcmp(k->op, "qmm"))
    bad = "op is not gather_qmm or qmm";
  else if (strcmp(k->dtype, "f32") && strcmp(k->dtype, "f16") && strcmp(k->dtype, "bf16"))
    bad = "dtype is not f32, f16 or bf16";
  else if (gqmm_quant_check((gqmm_quant){k->bits, k->group_size}) != GQMM_OK)
    bad = "bits/group_size not supported";
  else if (k->transpose != 0 && k->transpose != 1)
    bad = "transpose is not 0 or 1";
  else if (k->K < 1 || k->K > (1 << 24) || k->N < 1 || k->N > (1 << 24))
    bad = "K or N out of range";
  else if (!is_pow2(k->rows) || k->rows > 65536)
    bad = "rows_per_expert is not a power of two <= 65536";
  else if (!e->lib[0])
    bad = "lib is empty";
  else if (!e->config[0])
    bad = "config is empty";
  if (bad && why && whylen) snprintf(why, whylen, "%s", bad);
  return bad == NULL;
}

/* A string member copied into dst; false if missing, not a string, or too long. */
static bool get_text(const gqmm__json *o, const char *key, char *dst, size_t len) {
  const char *s;
  if (!gqmm__json_get_str(o, key, &s) || strlen(s) >= len) return false;
  for (const unsigned char *c = (const unsigned char *)s; *c; c++)
    if (*c < 0x20) return false;
  strcpy(dst, s);
  return true;
}

/* The fields of an entry as data, shared by the reader and the writer: the
 * file's schema is this one list. Integers go through long long copies. */
typedef struct {
  const char *name;
  char *text; /* text field, or NULL */
  size_t len;
  long long *num; /* integer field */
  long long hi;   /* its largest valid value (all are >= 0) */
} field;

typedef struct {
  long long bits, group_size, transpose, K, N, rows;
} entry_ints;

enum { N_FIELDS = 12 };

static void entry_fields(gqmm__tune_entry *e, entry_ints *v, field f[N_FIELDS]) {
  gqmm__tune_key *k = &e->key;
  const field all[N_FIELDS] = {
      {"device", k->device, sizeof k->device, NULL, 0},
      {"lib", e->lib, sizeof e->lib, NULL, 0},
      {"backend", k->backend, sizeof k->backend, NULL, 0},
      {"op", k->op, sizeof k->op, NULL, 0},
      {"dtype", k->dtype, sizeof k->dtype, NULL, 0},
      {"config", e->config, sizeof e->config, NULL, 0},
      {"bits", NULL, 0, &v->bits, 64},
      {"group_size", NULL, 0, &v->group_size, 1024},
      {"transpose", NULL, 0, &v->transpose, 1},
      {"K", NULL, 0, &v->K, 1 << 24},
      {"N", NULL, 0, &v->N, 1 << 24},
      {"rows_per_expert", NULL, 0, &v->rows, 65536},
  };
  memcpy(f, all, sizeof all);
}

/* One entry of the file; false (with the field named in why) if invalid. */
static bool read_entry(const gqmm__json *o, gqmm__tune_entry *e, char *why, size_t whylen) {
  memset(e, 0, sizeof *e);
  entry_ints v;
  field f[N_FIELDS];
  entry_fields(e, &v, f);
  const char *bad = !o || o->kind != GQMM__JSON_OBJECT ? "(not an object)" : NULL;
  for (int i = 0; i < N_FIELDS && !bad; i++) {
    bool ok = f[i].text ? get_text(o, f[i].name, f[i].text, f[i].len)
                        : gqmm__json_get_int(o, f[i].name, 0, f[i].hi, f[i].num);
    if (!ok) bad = f[i].name;
  }
  if (bad) {
    snprintf(why, whylen, "'%s' missing, of the wrong type or too long", bad);
    return false;
  }
  gqmm__tune_key *k = &e->key;
  k->bits = (int)v.bits, k->group_size = (int)v.group_size, k->transpose = (int)v.transpose;
  k->K = v.K, k->N = v.N, k->rows = (int)v.rows;
  /* informative figures: absent or odd values are simply not shown */
  if (!gqmm__json_get_num(o, "time_us", &e->time_us) || e->time_us < 0) e->time_us = NAN;
  if (!gqmm__json_get_num(o, "weight_GBps", &e->weight_GBps)) e->weight_GBps = NAN;
  if (!gqmm__json_get_num(o, "fraction", &e->fraction)) e->fraction = NAN;
  return gqmm__tune_entry_valid(e, why, whylen);
}

/* Reads a whole regular file of at most GQMM__TUNE_MAX_FILE bytes. */
static int read_file(const char *path, char **out, size_t *len, char *msg, size_t msglen) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) {
    if (errno == ENOENT) return GQMM_OK; /* no cache yet */
    NOTE("cannot open %s: %s", path, strerror(errno));
    return GQMM_ERR_IO;
  }
  char *buf = malloc(GQMM__TUNE_MAX_FILE + 1);
  size_t n = buf ? fread(buf, 1, GQMM__TUNE_MAX_FILE + 1, f) : 0;
  int err = ferror(f);
  fclose(f);
  if (!buf || err) {
    free(buf);
    NOTE("cannot read %s", path);
    return buf ? GQMM_ERR_IO : GQMM_ERR_NOMEM;
  }
  if (n > GQMM__TUNE_MAX_FILE) {
    free(buf);
    NOTE("%s is larger than %u bytes", path, GQMM__TUNE_MAX_FILE);
    return GQMM_ERR_FORMAT;
  }
  *out = buf;
  *len = n;
  return GQMM_OK;
}

int gqmm__tune_cache_load(const char *path, gqmm__tune_cache *c, char *msg, size_t msglen) {
  memset(c, 0, sizeof *c);
  NOTE("%s", "");
  char *text;
  size_t len = 0;
  int st = read_file(path, &text, &len, msg, msglen);
  if (st || !text) return st;
  char perr[200];
  gqmm__json *doc = gqmm__json_parse(text, len, perr, sizeof perr);
  free(text);
  if (!doc) {
    NOTE("%s is not valid JSON (%s)", path, perr);
    return GQMM_ERR_FORMAT;
  }
  const char *fmt;
  long long ver;
  const gqmm__json *list = gqmm__json_get(doc, "entries");
  if (!gqmm__json_get_str(doc, "format", &fmt) || strcmp(fmt, GQMM__TUNE_FORMAT)) {
    NOTE("%s is not a gqmm tuning cache (no \"format\": \"%s\")", path, GQMM__TUNE_FORMAT);
    st = GQMM_ERR_FORMAT;
  } else if (!gqmm__json_get_int(doc, "version", 0, 1 << 30, &ver) ||
             ver != GQMM__TUNE_FORMAT_VERSION) {
    NOTE("%s has cache format version other than %d", path, GQMM__TUNE_FORMAT_VERSION);
    st = GQMM_ERR_FORMAT;
  } else if (!list || list->kind != GQMM__JSON_ARRAY) {
    NOTE("%s has no \"entries\" array", path);
    st = GQMM_ERR_FORMAT;
  }
  int skipped = 0, total = 0;
  char first_why[160] = "";
  for (const gqmm__json *o = st ? NULL : list->child; o; o = o->next, total++) {
    gqmm__tune_entry e;
    char why[120];
    if (total >= GQMM__TUNE_MAX_ENTRIES || !read_entry(o, &e, why, sizeof why)) {
      if (!skipped++)
        snprintf(first_why, sizeof first_why, "entry %d: %s", total,
                 total >= GQMM__TUNE_MAX_ENTRIES ? "too many entries" : why);
      continue;
    }
    if ((st = gqmm__tune_cache_put(c, &e))) {
      NOTE("out of memory reading %s", path);
      break;
    }
  }
  gqmm__json_free(doc);
  if (st) {
    gqmm__tune_cache_free(c);
    return st;
  }
  int stale = 0;
  for (int i = 0; i < c->n; i++)
    stale += strcmp(c->entries[i].lib, gqmm_version()) != 0;
  if (skipped)
    NOTE("%s: %d of %d entries ignored (first: %s)", path, skipped, total, first_why);
  else if (stale)
    NOTE("%s: %d entries measured by another gqmm version are stale and not used (the next "
         "`gqmm tune` drops them)",
         path, stale);
  return GQMM_OK;
}

const gqmm__tune_entry *gqmm__tune_cache_find(const gqmm__tune_cache *c, const gqmm__tune_key *k) {
  for (int i = 0; i < c->n; i++)
    if (!strcmp(c->entries[i].lib, gqmm_version()) && gqmm__tune_key_equal(&c->entries[i].key, k))
      return &c->entries[i];
  return NULL;
}

const gqmm__tune_entry *gqmm__tune_cache_find_near(const gqmm__tune_cache *c,
                                                   const gqmm__tune_key *k) {
  const gqmm__tune_entry *exact = gqmm__tune_cache_find(c, k), *near = NULL;
  if (exact) return exact;
  for (int i = 0; i < c->n; i++) {
    const gqmm__tune_entry *e = &c->entries[i];
    gqmm__tune_key same_rows = e->key;
    same_rows.rows = k->rows;
    /* one bucket away (half or double the rows); the larger wins a tie,
     * since a tile sized for more rows still covers fewer */
    if ((e->key.rows == 2 * k->rows || 2 * e->key.rows == k->rows) &&
        gqmm__tune_key_equal(&same_rows, k) && !strcmp(e->lib, gqmm_version()) &&
        (!near || e->key.rows > near->key.rows))
      near = e;
  }
  return near;
}

int gqmm__tune_cache_put(gqmm__tune_cache *c, const gqmm__tune_entry *e) {
  for (int i = 0; i < c->n; i++) {
    if (!strcmp(c->entries[i].lib, e->lib) && gqmm__tune_key_equal(&c->entries[i].key, &e->key)) {
      c->entries[i] = *e;
      return GQMM_OK;
    }
  }
  if (c->n >= GQMM__TUNE_MAX_ENTRIES) return GQMM_ERR_ARG;
  if (c->n == c->cap) {
    int cap = c->cap ? 2 * c->cap : 16;
    gqmm__tune_entry *p = realloc(c->entries, (size_t)cap * sizeof *p);
    if (!p) return GQMM_ERR_NOMEM;
    c->entries = p;
    c->cap = cap;
  }
  c->entries[c->n++] = *e;
  return GQMM_OK;
}

void gqmm__tune_cache_free(gqmm__tune_cache *c) {
  free(c->entries);
  memset(c, 0, sizeof *c);
}

static void write_entry(FILE *out, const gqmm__tune_entry *entry) {
  gqmm__tune_entry e = *entry;
  const gqmm__tune_key *k = &e.key;
  entry_ints v = {k->bits, k->group_size, k->transpose, k->K, k->N, k->rows};
  field f[N_FIELDS];
  entry_fields(&e, &v, f);
  fputs("    {", out);
  for (int i = 0; i < N_FIELDS; i++) {
    fprintf(out, "%s\"%s\": ", i ? ", " : "", f[i].name);
    if (f[i].text)
      gqmm__json_write_str(out, f[i].text);
    else
      gqmm__json_write_num(out, (double)*f[i].num);
  }
  const struct {
    const char *name;
    double value;
  } figures[] = {{"time_us", e.time_us}, {"weight_GBps", e.weight_GBps}, {"fraction", e.fraction}};
  for (size_t i = 0; i < sizeof figures / sizeof figures[0]; i++) {
    fprintf(out, ", \"%s\": ", figures[i].name);
    gqmm__json_write_num(out, figures[i].value);
  }
  fputc('}', out);
}

/* mkdir -p of the directory part of path. */
static void make_parent_dirs(const char *path) {
  char dir[1024];
  if (snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir) return;
  for (char *p = dir + 1; *p; p++) {
    if (*p != '/') continue;
    *p = '\0';
    mkdir(dir, 0755); /* EEXIST is fine; real failures show up at open */
    *p = '/';
  }
}

static int write_file(const char *path, const gqmm__tune_cache *c, char *msg, size_t msglen) {
  char tmp[1100];
  snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
  FILE *f = fopen(tmp, "wb");
  if (!f) {
    NOTE("cannot create %s: %s", tmp, strerror(errno));
    return GQMM_ERR_IO;
  }
  fprintf(f, "{\"format\": \"%s\", \"version\": %d, \"entries\": [\n", GQMM__TUNE_FORMAT,
          GQMM__TUNE_FORMAT_VERSION);
  for (int i = 0; i < c->n; i++) {
    write_entry(f, &c->entries[i]);
    fputs(i + 1 < c->n ? ",\n" : "\n", f);
  }
  fputs("]}\n", f);
  int bad = fflush(f) != 0 || ferror(f) || fsync(fileno(f)) != 0;
  bad |= fclose(f) != 0;
  if (bad || rename(tmp, path) != 0) {
    NOTE("cannot write %s: %s", path, strerror(errno));
    unlink(tmp);
    return GQMM_ERR_IO;
  }
  return GQMM_OK;
}

int gqmm__tune_cache_store(const char *path, const gqmm__tune_entry *add, int n, char *msg,
                           size_t msglen) {
  NOTE("%s", "");
  for (int i = 0; i < n; i++) {
    char why[120];
    if (!gqmm__tune_entry_valid(&add[i], why, sizeof why)) {
      NOTE("refusing to store an invalid entry: %s", why);
      return GQMM_ERR_ARG;
    }
  }
  char lock_path[1100];
  if (snprintf(lock_path, sizeof lock_path, "%s.lock", path) >= (int)sizeof lock_path) {
    NOTE("cache path too long");
    return GQMM_ERR_ARG;
  }
  make_parent_dirs(path);
  int fd = open(lock_path, O_RDWR | O_CREAT, 0644);
  if (fd < 0) {
    NOTE("cannot open %s: %s", lock_path, strerror(errno));
    return GQMM_ERR_IO;
  }
  struct flock lk = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
  int st;
  while ((st = fcntl(fd, F_SETLKW, &lk)) != 0 && errno == EINTR) {
  }
  if (st != 0) {
    NOTE("cannot lock %s: %s", lock_path, strerror(errno));
    close(fd);
    return GQMM_ERR_IO;
  }
  /* Under the lock: re-read what other writers stored, then merge ours. A
   * corrupt file is replaced (its reason is kept in msg for the caller). */
  gqmm__tune_cache c;
  char note[300];
  int lst = gqmm__tune_cache_load(path, &c, note, sizeof note);
  if (lst == GQMM_ERR_IO) {
    NOTE("%s", note);
    close(fd);
    return lst;
  }
  /* entries of other library versions are stale: this version never uses them */
  int kept = 0;
  for (int i = 0; i < c.n; i++)
    if (!strcmp(c.entries[i].lib, gqmm_version())) c.entries[kept++] = c.entries[i];
  c.n = kept;
  st = GQMM_OK;
  for (int i = 0; i < n && !st; i++)
    st = gqmm__tune_cache_put(&c, &add[i]);
  if (st)
    NOTE("cannot add entries: %s", gqmm_strerror(st));
  else
    st = write_file(path, &c, msg, msglen);
  if (!st && note[0]) NOTE("replaced or cleaned: %s", note);
  gqmm__tune_cache_free(&c);
  close(fd); /* releases the lock */
  return st;
}
