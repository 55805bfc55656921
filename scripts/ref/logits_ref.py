#!/usr/bin/env python3
"""logits_ref.py - reference logits from llama.cpp for kiln's parity test.

Runs a GGUF model through llama.cpp (llama-cpp-python, CPU) on 20 fixed
prompts and writes a small binary fixture that tests/test_parity.c reads
without Python:

  header   char[8] "KILNPAR1", u32 n_prompts, u32 n_vocab, u32 top_k, u32 n_cont
  prompt   u32 n_prompt, i32 tokens[n_prompt + n_cont]
             (the prompt, then llama.cpp's greedy continuation of it)
           per position of those tokens:
             f32 logsumexp, i32 ids[top_k], f32 logits[top_k]
             (the reference's top_k logits, highest first)

Logits are compared at every position of prompt + continuation (kiln runs
them teacher-forced in one batch); the continuation itself is compared with
kiln's own greedy decoding from the prompt.
The top-k logits with the log-sum-exp are enough to compute, for each
position, the KL divergence of kiln's distribution from the reference over
the top-k tokens plus one bucket holding the rest of the mass.

Usage: .venv-llama/bin/python scripts/ref/logits_ref.py MODEL.gguf OUT.bin
(`make parity-ref` regenerates the committed fixtures.)
"""
import os
import struct
import sys

import numpy as np
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(__file__))
from parity_prompts import N_CONT, PROMPTS, TOP_K  # noqa: E402


def logsumexp(v):
    m = float(np.max(v))
    return m + float(np.log(np.sum(np.exp(v.astype(np.float64) - m))))


def main():
    model_path, out_path = sys.argv[1], sys.argv[2]
    llm = Llama(model_path=model_path, n_ctx=512, n_batch=512, logits_all=True,
                n_threads=2, verbose=False, seed=0)
    n_vocab = llm.n_vocab()
    with open(out_path, "wb") as f:
        f.write(b"KILNPAR1")
        f.write(struct.pack("<4I", len(PROMPTS), n_vocab, TOP_K, N_CONT))
        total = 0
        for p in PROMPTS:
            toks = llm.tokenize(p.encode(), add_bos=True, special=True)
            llm.reset()
            llm.eval(toks)
            cont = []
            last = np.array(llm.scores[len(toks) - 1], dtype=np.float32)
            for _ in range(N_CONT):
                t = int(np.argmax(last))
                cont.append(t)
                llm.eval([t])
                last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            seq = toks + cont
            scores = np.array(llm.scores[: len(seq)], dtype=np.float32)
            f.write(struct.pack("<I", len(toks)))
            f.write(np.array(seq, dtype="<i4").tobytes())
            for row in scores:
                ids = np.argsort(-row, kind="stable")[:TOP_K]
                f.write(struct.pack("<f", logsumexp(row)))
                f.write(ids.astype("<i4").tobytes())
                f.write(row[ids].astype("<f4").tobytes())
            total += len(seq)
            print(f"{len(toks):4d} tokens, continuation {cont[:8]}...", file=sys.stderr)
        print(f"{total} positions over {len(PROMPTS)} prompts -> {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
