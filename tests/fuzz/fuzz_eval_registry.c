/*
 * fuzz_eval_registry.c - libFuzzer target for kiln eval's registry parser.
 *
 * The input is a registry file, parsed over a valid registry: it must be
 * accepted, or refused with a message, and a refused file must leave the
 * registry exactly as it was (the counts are checked).  An accepted one is
 * then looked up and sized the way the planner does.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "eval/eval.h"
#include "util/util.h"

#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c))                                                              \
            __builtin_trap();                                                  \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char base[] =
    "{\"models\": {\"m\": {\"path\": \"m.gguf\", \"params\": 1e9, \"layers\": 2,"
    " \"kv_heads\": 1, \"head_dim\": 8, \"dtype\": \"bf16\"}},"
    " \"datasets\": {\"d\": {\"format\": \"bigbench\", \"scoring\": \"exact\", \"path\": \"d\"}},"
    " \"categories\": {\"c\": {\"datasets\": [\"d\"], \"models\": [\"m\"]}}}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    eval_registry r;
    memset(&r, 0, sizeof r);
    kiln_error_clear();
    CHECK(eval_registry_parse(&r, base, sizeof base - 1, "base", "/b") == KILN_OK);
    kiln_status st = eval_registry_parse(&r, (const char *)data, size, "fuzz.json", "/f");
    if (st != KILN_OK) {
        CHECK(kiln_last_error()[0]);
        CHECK(r.n_models == 1 && r.n_datasets == 1 && r.n_cats == 1);
    }
    for (int i = 0; i < r.n_models; i++) {
        CHECK(r.models[i].name && r.models[i].name[0]);
        CHECK(eval_registry_model(&r, r.models[i].name) != NULL);
        (void)eval_kv_bytes_per_token(&r.models[i]);
        if (!r.models[i].path)
            (void)eval_weight_bytes(&r.models[i]);
    }
    for (int i = 0; i < r.n_datasets; i++) {
        const eval_dataset_def *d = &r.datasets[i];
        CHECK(d->n_samples >= 1 && d->max_tokens >= 1);
        CHECK(d->format == EVAL_FORMAT_EFFICIENCY || d->path);
    }
    for (int i = 0; i < r.n_cats; i++)
        CHECK(r.cats[i].n_datasets >= 1);
    eval_registry_free(&r);
    return 0;
}
