/*
 * cli.h - the kiln command-line tool: one function per subcommand, shared
 * option-parsing helpers.
 */
#ifndef KILN_CLI_H
#define KILN_CLI_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "kiln.h"
#include "kiln_tools.h"

int cmd_inspect(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_detokenize(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_chat(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_bench_load(int argc, char **argv); /* `kiln bench load`, bench_load.c */
int cmd_bench_workload(int argc, char **argv); /* `kiln bench workload`, bench_workload.c */
int cmd_bench_mixed(int argc, char **argv); /* `kiln bench mixed`, bench_mixed.c */
int cmd_quantize(int argc, char **argv);
int cmd_serve(int argc, char **argv);       /* serve.c */
int cmd_eval(int argc, char **argv);        /* eval.c */

/* Options of the commands that run a model (generate, chat, bench). */
typedef struct run_opts {
    const char *model;
    const char *device;
    const char *chat_template;
    const char *system;
    int threads;            /* 0 = all cores */
    int ctx;                /* 0 = default */
    float gpu_mem_fraction; /* 0 = the engine's default */
    int eager;              /* no CUDA graphs */
    int kv_f32;             /* F32 KV cache */
    const char *pd;         /* --pd: prefill/decode split, or NULL */
    const char *decode_pipeline; /* --decode-pipeline, or NULL */
    int fast_activations;   /* 8-bit activations in quantized matmuls */
    int deterministic;      /* batch-invariant engine */
    kiln_sampling sampling;
    int load_streams;       /* device loading: upload streams (0 = default) */
    int load_ring_mib;      /* device loading: pinned staging ring (0 = default) */
    int load_threads;       /* device loading: read / convert workers (0 = auto) */
    int tp;                 /* --tp: tensor-parallel ranks (1 = none) */
    float tp_timeout;       /* --tp-timeout: seconds (0 = the default) */
    int tp_comm;            /* --tp-comm: --tp 1 through the communicator */
    bool quiet_load;        /* no progress bar (ranks other than 0) */
} run_opts;

/* The defaults; the seed is a fresh one each run (see fresh_seed). */
/* The whole command line (main.c): tensor parallelism runs it again for
 * each rank. */
extern int cli_argc;
extern char **cli_argv;

/* Tensor parallelism for a model command (tp.c), after its options are
 * parsed: true when the command is over here with *rc its exit status (this
 * process launched the ranks, or was a rank other than 0 and has followed
 * rank 0 to the end, or --tp was refused); false: go on as usual (rank 0,
 * or no tensor parallelism), and call cli_tp_end(rc) before returning. */
bool cli_tp_begin(run_opts *o, const char *cmd, int *rc);
/* The --tp options' help lines. */
#define CLI_TP_USAGE                                                                          \
    "  --tp N                   tensor parallel over N ranks (started here, or by mpirun\n"   \
    "                           -np N): CPU ranks over MPI, GPU ranks (cuda:K..K+N-1)\n"      \
    "                           over NCCL\n"                                                  \
    "  --tp-timeout SEC         a step or a silence of rank 0 longer than this ends every\n"  \
    "                           rank (default 300)\n"                                         \
    "  --tp-comm                --tp 1 through the communicator all the same (its cost)\n"
void cli_tp_end(int rc);

void cli_opts_default(run_opts *o);
/* 1: argv[*i] was a common option (consumed with its value), 0: not one,
 * -1: a bad value (message printed). */
int cli_parse_common(run_opts *o, int argc, char **argv, int *i);
/* What the engine and the chat renderer would refuse only after the model
 * has loaded (sampling values, stop strings, --chat-template), checked
 * before it loads, with their messages: false (printed as "kiln: CMD: ...")
 * when a value is bad. */
bool cli_check_opts(const run_opts *o, const char *cmd);
/* Load the model with a progress bar; NULL (message printed) on failure. */
kiln_model *cli_load_model(const run_opts *o, double *load_sec);
/* An engine for max_seqs sequences; n_ctx from --ctx, else the hint, else
 * the default, capped at the model's trained context. */
kiln_engine *cli_make_engine(kiln_model *m, const run_opts *o, int max_seqs, int n_ctx_hint);
/* Render msgs through the chat template (--chat-template, else the
 * model's) and append their tokens to *out. */
kiln_status cli_encode_chat(const kiln_model *m, const run_opts *o,
                            const kiln_chat_message *msgs, size_t n_msgs, kiln_tokens *out);

/* What a reply's token events add up to (generate.c, chat.c). */
#define CLI_REPLY_ERROR_MAX 512
typedef struct cli_reply {
    kiln_text text;      /* the reply so far; free with kiln_text_free */
    kiln_finish finish;  /* KILN_FINISH_NONE until the final event */
    int n_generated;
    bool failed;         /* out of memory holding the text */
    char error[CLI_REPLY_ERROR_MAX]; /* finish == KILN_FINISH_ERROR: why */
} cli_reply;

/* Add one event's text, count and finish reason to r. */
void cli_reply_add(cli_reply *r, const kiln_token_event *ev);
/* "eos", "stop", "length", "cancelled", "error" ("" for NONE). */
const char *cli_finish_name(kiln_finish f);

/* Read all of f (at most limit bytes) into a NUL-terminated heap buffer
 * (kiln_free) and its length into *len, NUL bytes included; NULL with a
 * message printed (naming what, and the limit) on failure. */
char *cli_read_all(FILE *f, const char *what, size_t limit, size_t *len);

/* Parse an integer option value in [lo, hi]; prints a clear error naming the
 * option and returns false when the text is not such a number. */
bool cli_parse_int(const char *opt, const char *text, long long lo,
                   long long hi, long long *out);
/* Parse a finite float option value in [lo, hi]. */
bool cli_parse_float(const char *opt, const char *text, double lo, double hi,
                     double *out);
/* n pseudo-random token ids from seed, clear of the special tokens at the
 * ends of most vocabularies (the benchmarks' prompts, the same every run). */
void cli_fill_tokens(int32_t *ids, int n, int n_vocab, uint64_t seed);
/* The device ceilings a roofline is measured against: copy bandwidth
 * (bytes read + written a second) and dense matrix rate (FLOP/s), each 0
 * where it could not be measured (a warning says why).  Measure before
 * creating an engine, whose KV pool takes most of a GPU's memory. */
typedef struct cli_ceiling {
    double copy_bps, mm_rate;
} cli_ceiling;
void cli_ceilings(kiln_model *m, cli_ceiling *c);
/* The least time moving `bytes` or computing `flops` takes against c,
 * whichever is longer (0 when neither ceiling was measured). */
double cli_roofline_sec(const cli_ceiling *c, double bytes, double flops);
/* Print "kiln: <what>: <last error>" to stderr. */
void cli_report(const char *what, kiln_status st);

#endif
