/* kiln inspect - placeholder until the format readers land. */
#include <stdio.h>

#include "cli.h"

int cmd_inspect(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    fprintf(stderr, "kiln: inspect: not built yet\n");
    return 1;
}
