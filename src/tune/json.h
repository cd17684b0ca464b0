/*
 * json.h - a small JSON reader and writer for the tuning cache and the
 * tuner's measurement files. The reader is written for hostile input: every
 * length, the nesting depth and the node count are bounded, and a malformed
 * document is an error with a byte offset, never a partial tree.
 */
#ifndef GQMM_TUNE_JSON_H
#define GQMM_TUNE_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#define GQMM__JSON_MAX_DEPTH 16     /* the cache needs 3 levels */
#define GQMM__JSON_MAX_STRING 1024  /* bytes after unescaping */
#define GQMM__JSON_MAX_NODES 200000 /* ~ 10 MB of cache; far beyond real use */

typedef enum {
  GQMM__JSON_NULL,
  GQMM__JSON_BOOL,
  GQMM__JSON_NUMBER,
  GQMM__JSON_STRING,
  GQMM__JSON_ARRAY,
  GQMM__JSON_OBJECT,
} gqmm__json_kind;

/* A node; an array's or object's elements form the list child -> next. */
typedef struct gqmm__json {
  gqmm__json_kind kind;
  double number; /* NUMBER; BOOL as 0/1 */
  char *string;  /* STRING value (NUL-terminated, no embedded NULs) */
  char *key;     /* member name when the parent is an OBJECT */
  struct gqmm__json *child, *next;
} gqmm__json;

/* Parse text[0, len). On error returns NULL and writes a message with the
 * byte offset to err. The whole input must be one value (whitespace around). */
gqmm__json *gqmm__json_parse(const char *text, size_t len, char *err, size_t errlen);
void gqmm__json_free(gqmm__json *j);

/* Member `key` of an object (the first one if repeated), or NULL. */
const gqmm__json *gqmm__json_get(const gqmm__json *obj, const char *key);
/* Typed member access: false if absent or of another kind. */
bool gqmm__json_get_str(const gqmm__json *obj, const char *key, const char **out);
bool gqmm__json_get_num(const gqmm__json *obj, const char *key, double *out);
/* An integral number within [lo, hi]. */
bool gqmm__json_get_int(const gqmm__json *obj, const char *key, long long lo, long long hi,
                        long long *out);

/* Writers: a quoted, escaped string; a number (non-finite values as null). */
void gqmm__json_write_str(FILE *f, const char *s);
void gqmm__json_write_num(FILE *f, double v);

#endif
