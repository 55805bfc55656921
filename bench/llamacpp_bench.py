#!/usr/bin/env python3
"""llamacpp_bench.py - llama.cpp's prompt and generation speed on the CPU,
measured the way `kiln bench` measures kiln, for side-by-side ratios.

  pp: one prompt of P pseudo-random tokens evaluated in one batch
  tg: N tokens decoded one at a time after an 8-token prompt

Prints one JSON line.  Usage:
  .venv-llama/bin/python bench/llamacpp_bench.py MODEL -t THREADS -p 512 -n 128 --reps 3
"""
import argparse
import json
import random
import statistics
import time

from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    llm = Llama(model_path=a.model, n_ctx=a.p + a.n + 16, n_batch=max(a.p, 8),
                n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    nv = llm.n_vocab()
    rng = random.Random(0)

    def toks(n):
        return [256 + rng.randrange(nv - 512) for _ in range(n)]

    llm.reset()
    llm.eval(toks(8))  # warm-up
    pp, tg = [], []
    for _ in range(a.reps):
        if a.p:
            llm.reset()
            t = toks(a.p)
            t0 = time.perf_counter()
            llm.eval(t)
            pp.append(a.p / (time.perf_counter() - t0))
        if a.n:
            llm.reset()
            llm.eval(toks(8))
            t0 = time.perf_counter()
            for tok in toks(a.n):
                llm.eval([tok])
            tg.append(a.n / (time.perf_counter() - t0))
    print(json.dumps({"engine": "llama.cpp", "threads": a.threads,
                      "pp_tokens": a.p, "pp_tok_s": statistics.median(pp) if pp else 0,
                      "tg_tokens": a.n, "tg_tok_s": statistics.median(tg) if tg else 0,
                      "reps": a.reps}))


if __name__ == "__main__":
    main()
