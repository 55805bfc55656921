/* Placeholder until dequant.c / vecdot.c land: no type is computable yet. */
#include "quant/quant.h"

void quant_fill_kernels(quant_traits *t, kiln_type type)
{
    (void)type;
    t->supported = false;
}
