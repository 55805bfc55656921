/*
 * tokenize.c - `kiln tokenize` and `kiln detokenize`: a model's tokenizer
 * from the command line, to see how text is cut and to feed ids to other
 * tools.
 *
 *   kiln tokenize -m MODEL [--ids|--pieces] [--no-special] [--add-special] [TEXT|-]
 *   kiln detokenize -m MODEL [--skip-special] IDS...|-
 *
 * MODEL is a GGUF file or a Hugging Face model directory.  tokenize prints
 * one token per line (id, then its bytes quoted with C escapes) by default;
 * --ids prints the ids on one line (what detokenize reads), --pieces the
 * quoted pieces.  Text comes from the argument, or from standard input with
 * "-" or no argument.  Special tokens written in the text are matched
 * unless --no-special; BOS/EOS are added only with --add-special.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "util/util.h"

#define TOK_CLI_MAX_INPUT ((size_t)1 << 30) /* bytes read from stdin */

static void tokenize_usage(FILE *f)
{
    fprintf(f, "usage: kiln tokenize -m MODEL [--ids|--pieces] [--no-special] "
               "[--add-special] [TEXT|-]\n"
               "  -m, --model PATH  GGUF file or Hugging Face model directory\n"
               "  --ids             print the ids on one line\n"
               "  --pieces          print the pieces (quoted) on one line\n"
               "  --no-special      special tokens in the text are plain text\n"
               "  --add-special     add BOS/EOS as the model does\n"
               "  TEXT or -         the text (default: standard input)\n");
}

static void detokenize_usage(FILE *f)
{
    fprintf(f, "usage: kiln detokenize -m MODEL [--skip-special] IDS...|-\n"
               "  -m, --model PATH  GGUF file or Hugging Face model directory\n"
               "  --skip-special    leave out control tokens (BOS, EOS, ...)\n"
               "  IDS or -          token ids (default: read from standard input)\n");
}


/* The piece as a C string literal. */
static void print_quoted(const char *p, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        switch (c) {
        case '\n': fputs("\\n", stdout); break;
        case '\r': fputs("\\r", stdout); break;
        case '\t': fputs("\\t", stdout); break;
        case '"': fputs("\\\"", stdout); break;
        case '\\': fputs("\\\\", stdout); break;
        default:
            if (c < 0x20 || c == 0x7f)
                printf("\\x%02x", c);
            else
                putchar(c);
        }
    }
    putchar('"');
}

int cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL, *text = NULL;
    enum { OUT_TABLE, OUT_IDS, OUT_PIECES } mode = OUT_TABLE;
    unsigned flags = KILN_ENCODE_PARSE_SPECIAL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if ((!strcmp(a, "-m") || !strcmp(a, "--model")) && i + 1 < argc)
            model = argv[++i];
        else if (!strcmp(a, "--ids"))
            mode = OUT_IDS;
        else if (!strcmp(a, "--pieces"))
            mode = OUT_PIECES;
        else if (!strcmp(a, "--no-special"))
            flags &= ~KILN_ENCODE_PARSE_SPECIAL;
        else if (!strcmp(a, "--add-special"))
            flags |= KILN_ENCODE_ADD_SPECIAL;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            tokenize_usage(stdout);
            return 0;
        } else if ((a[0] != '-' || !strcmp(a, "-")) && !text)
            text = a;
        else {
            fprintf(stderr, "kiln: tokenize: unexpected argument '%s'\n", a);
            tokenize_usage(stderr);
            return 2;
        }
    }
    if (!model) {
        fprintf(stderr, "kiln: tokenize: no model (-m MODEL)\n");
        tokenize_usage(stderr);
        return 2;
    }
    char *owned = NULL;
    size_t len;
    if (!text || !strcmp(text, "-")) {
        if (!(owned = cli_read_all(stdin, "standard input", TOK_CLI_MAX_INPUT, &len)))
            return 1;
        text = owned;
    } else {
        len = strlen(text);
    }
    kiln_tokenizer *tok = NULL;
    kiln_status st = kiln_tokenizer_load(model, &tok);
    if (st != KILN_OK) {
        cli_report("tokenize", st);
        kiln_free(owned);
        return 1;
    }
    kiln_tokens ids = {0};
    st = kiln_tokenizer_encode(tok, text, len, flags, &ids);
    if (st != KILN_OK) {
        cli_report("tokenize", st);
    } else {
        for (size_t i = 0; i < ids.n; i++) {
            size_t pl;
            const char *p = kiln_tokenizer_piece(tok, ids.ids[i], &pl);
            if (mode == OUT_IDS) {
                printf(i ? " %d" : "%d", ids.ids[i]);
            } else if (mode == OUT_PIECES) {
                if (i)
                    putchar(' ');
                print_quoted(p, pl);
            } else {
                printf("%8d  ", ids.ids[i]);
                print_quoted(p, pl);
                putchar('\n');
            }
        }
        if (mode != OUT_TABLE)
            putchar('\n');
    }
    kiln_tokens_free(&ids);
    kiln_tokenizer_free(tok);
    kiln_free(owned);
    return st == KILN_OK ? 0 : 1;
}

/* Parse ids from whitespace-separated text into *ids; false on a bad one. */
static bool parse_ids(char *s, int32_t n_vocab, kiln_tokens *ids)
{
    for (char *tokp = strtok(s, " \t\r\n,"); tokp; tokp = strtok(NULL, " \t\r\n,")) {
        long long v;
        if (!cli_parse_int("token id", tokp, 0, (long long)n_vocab - 1, &v))
            return false;
        if (ids->n == ids->cap) {
            size_t cap = ids->cap ? ids->cap * 2 : 256;
            int32_t *nv = realloc(ids->ids, cap * sizeof *nv);
            if (!nv) {
                fprintf(stderr, "kiln: out of memory\n");
                return false;
            }
            ids->ids = nv;
            ids->cap = cap;
        }
        ids->ids[ids->n++] = (int32_t)v;
    }
    return true;
}

int cmd_detokenize(int argc, char **argv)
{
    const char *model = NULL;
    unsigned flags = 0;
    int first_id = 0;
    bool from_stdin = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if ((!strcmp(a, "-m") || !strcmp(a, "--model")) && i + 1 < argc)
            model = argv[++i];
        else if (!strcmp(a, "--skip-special"))
            flags |= KILN_DECODE_SKIP_SPECIAL;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            detokenize_usage(stdout);
            return 0;
        } else if (!strcmp(a, "-"))
            from_stdin = true;
        else if (a[0] != '-' || (a[1] >= '0' && a[1] <= '9')) {
            first_id = i;
            break;
        } else {
            fprintf(stderr, "kiln: detokenize: unexpected argument '%s'\n", a);
            detokenize_usage(stderr);
            return 2;
        }
    }
    if (!model) {
        fprintf(stderr, "kiln: detokenize: no model (-m MODEL)\n");
        detokenize_usage(stderr);
        return 2;
    }
    kiln_tokenizer *tok = NULL;
    kiln_status st = kiln_tokenizer_load(model, &tok);
    if (st != KILN_OK) {
        cli_report("detokenize", st);
        return 1;
    }
    int32_t nv = kiln_tokenizer_n_vocab(tok);
    kiln_tokens ids = {0};
    bool ok = true;
    if (first_id) {
        for (int i = first_id; i < argc && ok; i++)
            ok = parse_ids(argv[i], nv, &ids);
    } else {
        (void)from_stdin; /* no ids on the command line: standard input */
        size_t len;
        char *in = cli_read_all(stdin, "standard input", TOK_CLI_MAX_INPUT, &len);
        ok = in && parse_ids(in, nv, &ids);
        kiln_free(in);
    }
    kiln_text out = {0};
    if (ok) {
        st = kiln_tokenizer_decode(tok, ids.ids, ids.n, flags, &out);
        if (st != KILN_OK) {
            cli_report("detokenize", st);
            ok = false;
        } else {
            fwrite(out.data, 1, out.len, stdout);
            putchar('\n');
        }
    }
    kiln_text_free(&out);
    free(ids.ids);
    kiln_tokenizer_free(tok);
    return ok ? 0 : 1;
}
