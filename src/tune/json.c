/*
 * json.c - bounded recursive-descent JSON reader (RFC 8259 grammar) and the
 * two writer helpers the tuner needs. Recursion depth is capped, so a
 * document of 10^6 '[' cannot exhaust the stack; strings and the node count
 * are capped, so a hostile file cannot make the reader allocate without bound.
 */
#include "json.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const char *s;
  size_t len, pos;
  int nodes;
  char *err;
  size_t errlen;
} parser;

static gqmm__json *fail(parser *p, const char *fmt, ...) {
  if (p->err && p->err[0] == '\0' && p->errlen) {
    char what[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(p->err, p->errlen, "%s at byte %zu", what, p->pos);
  }
  return NULL;
}

static void skip_ws(parser *p) {
  while (p->pos < p->len && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' ||
                             p->s[p->pos] == '\r'))
    p->pos++;
}

static gqmm__json *new_node(parser *p, gqmm__json_kind kind) {
  if (p->nodes >= GQMM__JSON_MAX_NODES) return fail(p, "more than %d values", GQMM__JSON_MAX_NODES);
  gqmm__json *j = calloc(1, sizeof *j);
  if (!j) return fail(p, "out of memory");
  p->nodes++;
  j->kind = kind;
  return j;
}

static int hex4(parser *p, unsigned *out) {
  if (p->len - p->pos < 4) return -1;
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    char c = p->s[p->pos++];
    v <<= 4;
    if (c >= '0' && c <= '9')
      v |= (unsigned)(c - '0');
    else if (c >= 'a' && c <= 'f')
      v |= (unsigned)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F')
      v |= (unsigned)(c - 'A' + 10);
    else
      return -1;
  }
  *out = v;
  return 0;
}

/* Reads a string starting at the opening quote into a new buffer. Escapes
 * become UTF-8; \u0000 and unpaired surrogates are rejected, so the result
 * is a C string that means what the file says. */
static char *parse_string(parser *p) {
  p->pos++; /* opening quote */
  char *buf = malloc(GQMM__JSON_MAX_STRING + 1);
  if (!buf) return (char *)fail(p, "out of memory");
  size_t n = 0;
  for (;;) {
    if (p->pos >= p->len) goto bad_end;
    unsigned char c = (unsigned char)p->s[p->pos++];
    unsigned cp;
    if (c == '"') break;
    if (c < 0x20) {
      fail(p, "control character in string");
      goto error;
    }
    if (c != '\\') {
      /* raw bytes (UTF-8 included) pass through */
      if (n + 1 > GQMM__JSON_MAX_STRING) goto too_long;
      buf[n++] = (char)c;
      continue;
    }
    if (p->pos >= p->len) goto bad_end;
    char e = p->s[p->pos++];
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    const char *hit = e ? strchr(from, e) : NULL;
    if (hit) {
      cp = (unsigned char)to[hit - from];
    } else if (e == 'u') {
      if (hex4(p, &cp)) {
        fail(p, "bad \\u escape");
        goto error;
      }
      if (cp >= 0xD800 && cp <= 0xDBFF) {
        unsigned lo;
        if (p->len - p->pos < 6 || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
          fail(p, "unpaired surrogate");
          goto error;
        }
        p->pos += 2;
        if (hex4(p, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
          fail(p, "unpaired surrogate");
          goto error;
        }
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
      } else if ((cp >= 0xDC00 && cp <= 0xDFFF) || cp == 0) {
        fail(p, cp ? "unpaired surrogate" : "\\u0000 in string");
        goto error;
      }
    } else {
      fail(p, "bad escape '\\%c'", e);
      goto error;
    }
    /* UTF-8 encode cp */
    unsigned char u[4];
    int m;
    if (cp < 0x80)
      u[0] = (unsigned char)cp, m = 1;
    else if (cp < 0x800)
      u[0] = (unsigned char)(0xC0 | (cp >> 6)), u[1] = (unsigned char)(0x80 | (cp & 63)), m = 2;
    else if (cp < 0x10000)
      u[0] = (unsigned char)(0xE0 | (cp >> 12)), u[1] = (unsigned char)(0x80 | ((cp >> 6) & 63)),
      u[2] = (unsigned char)(0x80 | (cp & 63)), m = 3;
    else
      u[0] = (unsigned char)(0xF0 | (cp >> 18)), u[1] = (unsigned char)(0x80 | ((cp >> 12) & 63)),
      u[2] = (unsigned char)(0x80 | ((cp >> 6) & 63)), u[3] = (unsigned char)(0x80 | (cp & 63)),
      m = 4;
    if (n + (size_t)m > GQMM__JSON_MAX_STRING) goto too_long;
    memcpy(buf + n, u, (size_t)m);
    n += (size_t)m;
  }
  buf[n] = '\0';
  return buf;
too_long:
  fail(p, "string longer than %d bytes", GQMM__JSON_MAX_STRING);
  goto error;
bad_end:
  fail(p, "unterminated string");
error:
  free(buf);
  return NULL;
}

/* JSON number grammar, checked before strtod sees it (strtod alone would
 * accept "inf", hex and leading '+'). */
static gqmm__json *parse_number(parser *p) {
  size_t start = p->pos, i = p->pos;
  const char *s = p->s;
#define DIGIT(k) ((k) < p->len && s[k] >= '0' && s[k] <= '9')
  if (i < p->len && s[i] == '-') i++;
  if (!DIGIT(i)) return fail(p, "bad number");
  if (s[i] == '0')
    i++;
  else
    while (DIGIT(i))
      i++;
  if (i < p->len && s[i] == '.') {
    i++;
    if (!DIGIT(i)) return fail(p, "bad number");
    while (DIGIT(i))
      i++;
  }
  if (i < p->len && (s[i] == 'e' || s[i] == 'E')) {
    i++;
    if (i < p->len && (s[i] == '+' || s[i] == '-')) i++;
    if (!DIGIT(i)) return fail(p, "bad number");
    while (DIGIT(i))
      i++;
  }
#undef DIGIT
  char tmp[64];
  if (i - start >= sizeof tmp) return fail(p, "number longer than %zu characters", sizeof tmp - 1);
  memcpy(tmp, s + start, i - start);
  tmp[i - start] = '\0';
  double v = strtod(tmp, NULL);
  if (!isfinite(v)) return fail(p, "number out of range");
  gqmm__json *j = new_node(p, GQMM__JSON_NUMBER);
  if (j) j->number = v;
  p->pos = i;
  return j;
}

static gqmm__json *parse_value(parser *p, int depth);

/* Array or object: elements (with keys for objects) chained child -> next. */
static gqmm__json *parse_container(parser *p, int depth, bool object) {
  if (depth >= GQMM__JSON_MAX_DEPTH) return fail(p, "nesting deeper than %d", GQMM__JSON_MAX_DEPTH);
  gqmm__json *j = new_node(p, object ? GQMM__JSON_OBJECT : GQMM__JSON_ARRAY);
  if (!j) return NULL;
  const char close = object ? '}' : ']';
  p->pos++;
  skip_ws(p);
  if (p->pos < p->len && p->s[p->pos] == close) {
    p->pos++;
    return j;
  }
  gqmm__json **tail = &j->child;
  for (;;) {
    char *key = NULL;
    skip_ws(p);
    if (object) {
      if (p->pos >= p->len || p->s[p->pos] != '"') goto bad;
      if (!(key = parse_string(p))) goto error;
      skip_ws(p);
      if (p->pos >= p->len || p->s[p->pos] != ':') {
        free(key);
        goto bad;
      }
      p->pos++;
    }
    gqmm__json *v = parse_value(p, depth + 1);
    if (!v) {
      free(key);
      goto error;
    }
    v->key = key;
    *tail = v;
    tail = &v->next;
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == ',') {
      p->pos++;
      continue;
    }
    if (p->pos < p->len && p->s[p->pos] == close) {
      p->pos++;
      return j;
    }
    goto bad;
  }
bad:
  fail(p, object ? "expected a member, ',' or '}'" : "expected a value, ',' or ']'");
error:
  gqmm__json_free(j);
  return NULL;
}

static bool literal(parser *p, const char *word) {
  size_t n = strlen(word);
  if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0) return false;
  p->pos += n;
  return true;
}

static gqmm__json *parse_value(parser *p, int depth) {
  skip_ws(p);
  if (p->pos >= p->len) return fail(p, "unexpected end of input");
  char c = p->s[p->pos];
  if (c == '{' || c == '[') return parse_container(p, depth, c == '{');
  if (c == '"') {
    char *str = parse_string(p);
    if (!str) return NULL;
    gqmm__json *j = new_node(p, GQMM__JSON_STRING);
    if (!j)
      free(str);
    else
      j->string = str;
    return j;
  }
  if (c == '-' || (c >= '0' && c <= '9')) return parse_number(p);
  gqmm__json_kind kind;
  double v = 0;
  if (literal(p, "true"))
    kind = GQMM__JSON_BOOL, v = 1;
  else if (literal(p, "false"))
    kind = GQMM__JSON_BOOL;
  else if (literal(p, "null"))
    kind = GQMM__JSON_NULL;
  else
    return fail(p, "unexpected character 0x%02x", (unsigned char)c);
  gqmm__json *j = new_node(p, kind);
  if (j) j->number = v;
  return j;
}

gqmm__json *gqmm__json_parse(const char *text, size_t len, char *err, size_t errlen) {
  if (err && errlen) err[0] = '\0';
  parser p = {text, len, 0, 0, err, errlen};
  if (!text) return fail(&p, "no input");
  gqmm__json *j = parse_value(&p, 0);
  if (!j) return NULL;
  skip_ws(&p);
  if (p.pos != p.len) {
    gqmm__json_free(j);
    return fail(&p, "trailing data after the document");
  }
  return j;
}

/* Frees siblings iteratively and children recursively: recursion depth is
 * the nesting depth, which the parser bounded. */
void gqmm__json_free(gqmm__json *j) {
  while (j) {
    gqmm__json *next = j->next;
    gqmm__json_free(j->child);
    free(j->string);
    free(j->key);
    free(j);
    j = next;
  }
}

const gqmm__json *gqmm__json_get(const gqmm__json *obj, const char *key) {
  if (!obj || obj->kind != GQMM__JSON_OBJECT) return NULL;
  for (const gqmm__json *m = obj->child; m; m = m->next)
    if (m->key && !strcmp(m->key, key)) return m;
  return NULL;
}

bool gqmm__json_get_str(const gqmm__json *obj, const char *key, const char **out) {
  const gqmm__json *m = gqmm__json_get(obj, key);
  if (!m || m->kind != GQMM__JSON_STRING) return false;
  *out = m->string;
  return true;
}

bool gqmm__json_get_num(const gqmm__json *obj, const char *key, double *out) {
  const gqmm__json *m = gqmm__json_get(obj, key);
  if (!m || m->kind != GQMM__JSON_NUMBER) return false;
  *out = m->number;
  return true;
}

bool gqmm__json_get_int(const gqmm__json *obj, const char *key, long long lo, long long hi,
                        long long *out) {
  double v;
  if (!gqmm__json_get_num(obj, key, &v)) return false;
  /* range check in double first: casting an out-of-range double is UB */
  if (!(v >= (double)lo && v <= (double)hi) || v != floor(v)) return false;
  *out = (long long)v;
  return true;
}

void gqmm__json_write_str(FILE *f, const char *s) {
  fputc('"', f);
  for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
    if (*c == '"' || *c == '\\')
      fprintf(f, "\\%c", *c);
    else if (*c == '\n')
      fputs("\\n", f);
    else if (*c < 0x20 || *c == 0x7f)
      fprintf(f, "\\u%04x", *c);
    else
      fputc(*c, f);
  }
  fputc('"', f);
}

void gqmm__json_write_num(FILE *f, double v) {
  if (!isfinite(v))
    fputs("null", f);
  else if (v == floor(v) && fabs(v) < 9007199254740992.0)
    fprintf(f, "%.0f", v);
  else
    fprintf(f, "%.9g", v);
}
