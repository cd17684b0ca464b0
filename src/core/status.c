/* status.c - status strings and the context's error message. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>

const char *gqmm_strerror(int status) {
  switch (status) {
#define GQMM__STATUS_CASE(name, value, text) \
  case value:                                \
    return text;
    GQMM_STATUS_LIST(GQMM__STATUS_CASE)
#undef GQMM__STATUS_CASE
  default:
    return "unknown status";
  }
}

const char *gqmm_status_name(int status) {
  switch (status) {
#define GQMM__STATUS_NAME(name, value, text) \
  case value:                                \
    return #name;
    GQMM_STATUS_LIST(GQMM__STATUS_NAME)
#undef GQMM__STATUS_NAME
  default:
    return "GQMM_UNKNOWN";
  }
}

int gqmm__fail(gqmm_ctx *ctx, int status, const char *fmt, ...) {
  if (ctx) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->errmsg, sizeof ctx->errmsg, fmt, ap);
    va_end(ap);
  }
  return status;
}

void gqmm__clear_error(gqmm_ctx *ctx) {
  if (ctx) ctx->errmsg[0] = '\0';
}

const char *gqmm_last_error(const gqmm_ctx *ctx) {
  return ctx ? ctx->errmsg : "null context";
}

const char *gqmm_last_backend(const gqmm_ctx *ctx) {
  return ctx && ctx->last_backend ? ctx->last_backend : "";
}
