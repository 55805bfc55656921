/*
 * cli.h - the kiln command-line tool: one function per subcommand, shared
 * option-parsing helpers.
 */
#ifndef KILN_CLI_H
#define KILN_CLI_H

#include <stdbool.h>
#include <stdint.h>

#include "kiln.h"

int cmd_inspect(int argc, char **argv);

/* Parse an integer option value in [lo, hi]; prints a clear error naming the
 * option and returns false when the text is not such a number. */
bool cli_parse_int(const char *opt, const char *text, long long lo,
                   long long hi, long long *out);
/* Parse a finite float option value in [lo, hi]. */
bool cli_parse_float(const char *opt, const char *text, double lo, double hi,
                     double *out);
/* Print "kiln: <what>: <last error>" to stderr. */
void cli_report(const char *what, kiln_status st);

#endif
