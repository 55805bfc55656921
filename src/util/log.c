/*
 * log.c - leveled logging to stderr; the level comes from $KILN_LOG.
 */
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#include "util/util.h"

static int log_level = -1; /* -1: not yet read from the environment */

static int level_from_env(void)
{
    const char *e = getenv("KILN_LOG");
    if (!e)
        return KILN_LOG_WARN;
    if (!strcasecmp(e, "error")) return KILN_LOG_ERROR;
    if (!strcasecmp(e, "warn")) return KILN_LOG_WARN;
    if (!strcasecmp(e, "info")) return KILN_LOG_INFO;
    if (!strcasecmp(e, "debug")) return KILN_LOG_DEBUG;
    return KILN_LOG_WARN;
}

bool kiln_log_enabled(kiln_log_level lvl)
{
    if (log_level < 0)
        log_level = level_from_env();
    return (int)lvl <= log_level;
}

void kiln_log_set_level(kiln_log_level lvl) { log_level = (int)lvl; }

void kiln_log(kiln_log_level lvl, const char *fmt, ...)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    if (!kiln_log_enabled(lvl))
        return;
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "kiln: %s: %s\n", names[lvl], line);
}
