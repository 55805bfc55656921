#!/usr/bin/env python3
"""tokenizer_bench.py - Hugging Face `tokenizers` throughput on the same
file and vocabulary as bench/tokenizer_bench.c, single thread.

  tokenizer_bench.py MODEL.gguf TEXT_FILE [REPEATS]

The tokenizer is built exactly as the parity reference builds it
(scripts/ref/tokenizer_ref.py: transformers from the GGUF, plus the smollm
pre-tokenizer fix), and the Rust backend is called directly (no Python-side
post-processing is timed).  RAYON_NUM_THREADS=1 keeps it on one thread
(one string is encoded on one thread anyway).  Two ways, as the C side: the
whole file in one call, and line by line (encode_batch over the lines, each
with its '\n': the backend's own loop, no Python per line).  Prints the best
of REPEATS runs of each as MB/s (10^6 bytes per second) and the token count.
"""
import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "ref"))
import tokenizer_ref  # noqa: E402


def main():
    model, path = sys.argv[1], sys.argv[2]
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    text = open(path, encoding="utf-8").read()
    nbytes = len(text.encode("utf-8"))
    t0 = time.perf_counter()
    tok = tokenizer_ref.load_gguf_tokenizer(model)
    if tokenizer_ref.gguf_pre(model) == "smollm":
        tokenizer_ref.set_smollm(tok)
    backend = tok.backend_tokenizer
    t_load = time.perf_counter() - t0
    best, n = 1e30, 0
    for _ in range(reps):
        a = time.perf_counter()
        enc = backend.encode(text, add_special_tokens=False)
        b = time.perf_counter() - a
        best = min(best, b)
        n = len(enc.ids)
    print(f"hf whole file: {nbytes / 1e6:.2f} MB in {best:.3f} s: {nbytes / 1e6 / best:.2f} MB/s, "
          f"{n} tokens (load {t_load:.3f} s)")
    lines = text.splitlines(keepends=True)
    best_l, n_l = 1e30, 0
    for _ in range(reps):
        a = time.perf_counter()
        encs = backend.encode_batch(lines, add_special_tokens=False)
        best_l = min(best_l, time.perf_counter() - a)
        n_l = sum(len(e.ids) for e in encs)
    print(f"hf by line: {nbytes / 1e6:.2f} MB in {best_l:.3f} s: {nbytes / 1e6 / best_l:.2f} MB/s, "
          f"{n_l} tokens")


if __name__ == "__main__":
    main()
