/*
 * tokenizer_bench.c - kiln's tokenizer throughput, single thread.
 *
 *   tokenizer_bench MODEL TEXT_FILE [REPEATS]
 *
 * Loads the model's tokenizer and encodes the file REPEATS times (default
 * 5) with special-token parsing on, two ways: the whole file in one call,
 * and line by line (each line with its '\n', one call per line: what
 * tokenizing many short prompts costs).  Prints the best run of each as
 * MB/s (10^6 bytes of input per second) with the token count, then decodes
 * the ids once and checks the text comes back.  bench/tokenizer.sh runs it beside the
 * Hugging Face `tokenizers` run of bench/tokenizer_bench.py on the same file.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kiln.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL TEXT_FILE [REPEATS]\n", argv[0]);
        return 2;
    }
    int reps = argc > 3 ? atoi(argv[3]) : 5;
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        perror(argv[2]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)sz + 1);
    if (!text || fread(text, 1, (size_t)sz, f) != (size_t)sz) {
        fprintf(stderr, "cannot read %s\n", argv[2]);
        return 1;
    }
    fclose(f);
    double t0 = now();
    kiln_tokenizer *tok;
    kiln_status st = kiln_tokenizer_load(argv[1], &tok);
    if (st != KILN_OK) {
        fprintf(stderr, "load: %s\n", kiln_last_error());
        return 1;
    }
    double t_load = now() - t0, best = 1e30;
    kiln_tokens ids = {0};
    for (int r = 0; r < reps; r++) {
        ids.n = 0;
        double a = now();
        st = kiln_tokenizer_encode(tok, text, (size_t)sz, KILN_ENCODE_PARSE_SPECIAL, &ids);
        double b = now() - a;
        if (st != KILN_OK) {
            fprintf(stderr, "encode: %s\n", kiln_last_error());
            return 1;
        }
        if (b < best)
            best = b;
    }
    /* line by line */
    double best_lines = 1e30;
    size_t n_lines_tok = 0;
    kiln_tokens lids = {0};
    for (int r = 0; r < reps; r++) {
        lids.n = 0;
        double a = now();
        for (long i = 0; i < sz;) {
            const char *e = memchr(text + i, '\n', (size_t)(sz - i));
            long l = e ? (long)(e - (text + i)) + 1 : sz - i;
            if (kiln_tokenizer_encode(tok, text + i, (size_t)l, KILN_ENCODE_PARSE_SPECIAL,
                                      &lids) != KILN_OK) {
                fprintf(stderr, "encode: %s\n", kiln_last_error());
                return 1;
            }
            i += l;
        }
        double b = now() - a;
        if (b < best_lines)
            best_lines = b;
        n_lines_tok = lids.n;
    }
    kiln_tokens_free(&lids);
    kiln_text out = {0};
    double a = now();
    st = kiln_tokenizer_decode(tok, ids.ids, ids.n, 0, &out);
    double t_dec = now() - a;
    int ok = st == KILN_OK && out.len == (size_t)sz && memcmp(out.data, text, (size_t)sz) == 0;
    printf("kiln whole file: %.2f MB in %.3f s: %.2f MB/s, %zu tokens (load %.3f s, decode "
           "%.0f MB/s, round trip %s)\n",
           sz / 1e6, best, sz / 1e6 / best, ids.n, t_load, sz / 1e6 / t_dec, ok ? "ok" : "FAILED");
    printf("kiln by line: %.2f MB in %.3f s: %.2f MB/s, %zu tokens\n", sz / 1e6, best_lines,
           sz / 1e6 / best_lines, n_lines_tok);
    kiln_text_free(&out);
    kiln_tokens_free(&ids);
    kiln_tokenizer_free(tok);
    free(text);
    return ok ? 0 : 1;
}
