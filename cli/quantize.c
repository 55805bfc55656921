/*
 * quantize.c - `kiln quantize [OPTIONS] IN OUT TYPE`: write IN (a GGUF file
 * or a Hugging Face model directory) as a GGUF file of TYPE (a type or a
 * llama.cpp mix such as Q4_K_M), by round-to-nearest quantization.
 *
 * The work is kiln_tools_quantize's (src/model/convert.c); this file parses the
 * arguments, draws a progress bar on a terminal, prints the notes the
 * quantizer gives (tensors that fell back to another type, tokenizer
 * settings GGUF cannot carry) and a one-line summary.  Exit status: 0 on
 * success, 1 when the model could not be written (one line on stderr names
 * the file, tensor, key or type at fault), 2 for a usage error.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "util/util.h"

#define QUANTIZE_MAX_THREADS 1024

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kiln quantize [OPTIONS] IN OUT TYPE\n"
            "\n"
            "Write IN (a GGUF file, or a Hugging Face directory of a llama, qwen2, qwen3 or\n"
            "gemma3_text model) as the GGUF file OUT with weights in TYPE, rounding to\n"
            "nearest.  OUT is written as OUT.tmp and renamed when complete.\n"
            "\n"
            "types:\n"
            "  F32 F16 BF16            float weights\n"
            "  Q4_0 Q4_1 Q5_0 Q5_1 Q8_0  32-weight blocks (output.weight Q6_K, as llama.cpp)\n"
            "  Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K\n"
            "                          llama.cpp's K-quant mixes\n"
            "  Q3_K Q4_K Q5_K          one K-quant type for every weight matrix\n"
            "\n"
            "options:\n"
            "  --pure          no mix rules: every weight matrix gets TYPE's base type\n"
            "  -t, --threads N worker threads (default: all cores)\n"
            "  -q, --quiet     no progress bar, notes or summary\n"
            "  -h, --help      this help\n"
            "\n"
            "docs/quantize.md has the mix rules and what round-to-nearest means for quality.\n");
}

typedef struct cli_state {
    kiln_progress bar;
    bool started;
    bool show_bar;
    bool quiet;
} cli_state;

static void on_note(const char *msg, void *user)
{
    const cli_state *s = user;
    if (!s->quiet)
        fprintf(stderr, "kiln: quantize: note: %s\n", msg);
}

static void on_progress(uint64_t done, uint64_t total, void *user)
{
    cli_state *s = user;
    if (!s->show_bar)
        return;
    if (!s->started) {
        kiln_progress_init(&s->bar, "quantizing", total, true, 2);
        s->started = true;
    }
    kiln_progress_update(&s->bar, done);
}

int cmd_quantize(int argc, char **argv)
{
    kiln_tools_quantize_params qp;
    kiln_tools_quantize_params_default(&qp);
    cli_state s = {0};
    const char *pos[3];
    int n_pos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--pure")) {
            qp.pure = true;
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            s.quiet = true;
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            long long v;
            if (i + 1 >= argc) {
                fprintf(stderr, "kiln: quantize: %s needs a value\n", a);
                return 2;
            }
            if (!cli_parse_int(a, argv[++i], 1, QUANTIZE_MAX_THREADS, &v))
                return 2;
            qp.n_threads = (int)v;
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "kiln: quantize: unknown option '%s'\n", a);
            return 2;
        } else if (n_pos < 3) {
            pos[n_pos++] = a;
        } else {
            fprintf(stderr, "kiln: quantize: unexpected argument '%s' (usage: kiln quantize "
                    "[OPTIONS] IN OUT TYPE)\n", a);
            return 2;
        }
    }
    if (n_pos != 3) {
        usage(stderr);
        return 2;
    }
    s.show_bar = !s.quiet && isatty(2);
    qp.note = on_note;
    qp.note_user = &s;
    qp.progress = on_progress;
    qp.progress_user = &s;
    kiln_tools_quantize_stats stats;
    double t0 = kiln_now_sec();
    kiln_status st = kiln_tools_quantize(pos[0], pos[1], pos[2], &qp, &stats);
    if (s.started)
        kiln_progress_finish(&s.bar);
    if (st != KILN_OK) {
        cli_report("quantize", st);
        return 1;
    }
    if (!s.quiet) {
        char bi[32], bo[32];
        const char *mix = kiln_tools_quant_mix_name(pos[2]);
        fprintf(stderr,
                "kiln: quantize: wrote %s: %s %s, %s%s, %llu tensors (%llu converted, %llu "
                "fallbacks), %s -> %s in %.1f s\n",
                pos[1], stats.source_kind, stats.arch, mix ? mix : pos[2],
                qp.pure ? " (pure)" : "", (unsigned long long)stats.n_tensors,
                (unsigned long long)stats.n_converted, (unsigned long long)stats.n_fallback,
                kiln_fmt_bytes(stats.bytes_in, bi, sizeof bi),
                kiln_fmt_bytes(stats.bytes_out, bo, sizeof bo), kiln_now_sec() - t0);
    }
    return 0;
}
