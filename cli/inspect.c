/*
 * inspect.c - `kiln inspect MODEL [--json]`: what a model file holds
 * (kiln_tools_inspect, src/tools/inspect.c, does the work).
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: kiln inspect MODEL [--json]\n\n"
               "MODEL is a GGUF file or a Hugging Face model directory.\n");
}

int cmd_inspect(int argc, char **argv)
{
    const char *path = NULL;
    bool as_json = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) {
            as_json = true;
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "kiln: inspect: unknown option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        } else if (!path) {
            path = argv[i];
        } else {
            fprintf(stderr, "kiln: inspect: more than one model given ('%s')\n", argv[i]);
            return 2;
        }
    }
    if (!path) {
        usage(stderr);
        return 2;
    }
    kiln_status st = kiln_tools_inspect(path, as_json, stdout);
    if (st != KILN_OK) {
        cli_report("inspect", st);
        return 1;
    }
    return 0;
}
