/*
 * kiln_tools.h - the tools layer: what kiln's own command-line tools need
 * beyond kiln.h (looking inside model files, timing loads and copies,
 * quantizing).  Exported from libkiln so that the kiln binary uses only
 * exported calls (kiln.h, this file) and util/; not a stable interface for
 * other programs: names and structs here follow the tools, not a promise.
 */
#ifndef KILN_TOOLS_H
#define KILN_TOOLS_H

#include <stdint.h>
#include <stdio.h>

#include "kiln.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------
 * kiln inspect
 * ---------------------------------------------------------------------- */

/* Describe the model at path (a GGUF file or a Hugging Face directory) on
 * out: format, architecture and hyper-parameters (or why kiln cannot run
 * it), tokenizer, every tensor, totals by type, KV cache size; as JSON when
 * json != 0.  Fails only when the files cannot be opened or parsed. */
KILN_API kiln_status kiln_tools_inspect(const char *path, int json, FILE *out);

/* ------------------------------------------------------------------------
 * kiln bench load
 * ---------------------------------------------------------------------- */

#define KILN_TOOLS_MAX_FILES 4096

/* The files a model path is made of: one GGUF file, or the safetensors
 * shards of a Hugging Face directory (the first KILN_TOOLS_MAX_FILES). */
typedef struct kiln_tools_files {
    int n;
    char *path[KILN_TOOLS_MAX_FILES];  /* owned */
    uint64_t size[KILN_TOOLS_MAX_FILES];
    uint64_t bytes;                    /* sum of size */
} kiln_tools_files;

KILN_API kiln_status kiln_tools_model_files(const char *path, kiln_tools_files *out);
KILN_API void kiln_tools_files_free(kiln_tools_files *f);

/* Wall time of each phase of a model load. */
typedef struct kiln_tools_load_times {
    double open_sec;        /* files opened, headers parsed, hparams */
    double backend_sec;     /* device created (CUDA context) */
    double weights_sec;     /* bound and placed (the pipeline on a device) */
    double tokenizer_sec;   /* tokenizer loaded (overlaps weights on a device) */
    double total_sec;
} kiln_tools_load_times;

/* What the load pipeline did.  Thread times are summed over the workers. */
typedef struct kiln_tools_load_stats {
    int n_threads, n_streams, n_slots;
    uint64_t slot_bytes;
    uint64_t n_batches, n_pieces;
    uint64_t bytes_read;       /* from files and host memory */
    uint64_t bytes_converted;  /* of those, converted */
    uint64_t bytes_uploaded;
    double run_sec;            /* workers start -> last copy complete */
    double read_sec;           /* worker time reading */
    double convert_sec;        /* worker time converting */
    double stall_sec;          /* worker time waiting for a slot's copies */
    double alloc_sec;          /* worker time allocating pinned slots */
    double upload_span_sec;    /* device: first copy start -> last copy end */
    int direct_fallback;       /* O_DIRECT was refused; pread was used */
} kiln_tools_load_stats;

/* Load path with p as kiln_model_load does, timing each phase, then free
 * the model.  slot_bytes: staging slot size (0: the loader's); no_upload:
 * read and convert only.  times and stats are filled either way. */
KILN_API kiln_status kiln_tools_load_timed(const char *path, const kiln_model_params *p,
                                           uint64_t slot_bytes, int no_upload,
                                           kiln_tools_load_times *times,
                                           kiln_tools_load_stats *stats);

/* Host-to-device copy speeds of a device, GB/s. */
typedef struct kiln_tools_copy_probe {
    double pin_gbs;       /* pinning (pinned allocation + first touch) */
    double h2d_1, h2d_n;  /* pinned copies, one stream / n_streams streams */
    double pageable;      /* copies from pageable memory */
    int n_streams;
} kiln_tools_copy_probe;

/* Time copies of `bytes` pinned (and pageable_bytes pageable) bytes to
 * `device` (a device string) in chunk-byte pieces over n_streams upload
 * streams (0: the loader's default). */
KILN_API kiln_status kiln_tools_probe_copies(const char *device, int n_streams, size_t bytes,
                                             size_t pageable_bytes, size_t chunk,
                                             kiln_tools_copy_probe *out);

/* ------------------------------------------------------------------------
 * kiln quantize
 * ---------------------------------------------------------------------- */

/* A note for the user (a tensor that fell back to another type, a
 * tokenizer setting GGUF cannot carry); msg is valid during the call. */
typedef void (*kiln_tools_note_fn)(const char *msg, void *user);

typedef struct kiln_tools_quantize_params {
    int pure;                   /* every weight matrix the mix's base type */
    int n_threads;              /* 0 = OpenMP's default */
    kiln_tools_note_fn note;    /* NULL: notes are dropped */
    void *note_user;
    kiln_progress_fn progress;  /* bytes of tensor data written / to write */
    void *progress_user;
} kiln_tools_quantize_params;

typedef struct kiln_tools_quantize_stats {
    uint64_t n_tensors;
    uint64_t n_converted;       /* tensors whose bytes were recomputed */
    uint64_t n_fallback;        /* tensors whose row length forced another type */
    uint64_t bytes_in;          /* tensor bytes of the source */
    uint64_t bytes_out;         /* tensor bytes written */
    char arch[32];
    const char *source_kind;    /* "GGUF" or "Hugging Face" */
} kiln_tools_quantize_stats;

KILN_API void kiln_tools_quantize_params_default(kiln_tools_quantize_params *p);
/* Quantize / convert in (a GGUF file or a Hugging Face directory) to the
 * GGUF file out as type (a mix name: "Q4_K_M", "F16", ...).  On failure
 * nothing is left at out and the message names what is at fault; stats
 * (may be NULL) is filled on success. */
KILN_API kiln_status kiln_tools_quantize(const char *in, const char *out, const char *type,
                                         const kiln_tools_quantize_params *p,
                                         kiln_tools_quantize_stats *stats);
/* The canonical spelling of a mix name ("q4_k_m" -> "Q4_K_M"), or NULL
 * when kiln has no such mix. */
KILN_API const char *kiln_tools_quant_mix_name(const char *type);

#ifdef __cplusplus
}
#endif

#endif /* KILN_TOOLS_H */
