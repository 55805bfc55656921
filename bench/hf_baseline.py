#!/usr/bin/env python3
"""hf_baseline.py - Hugging Face transformers on the same model directory,
the side-by-side baseline for `kiln bench` on the GPU.

    python3 bench/hf_baseline.py MODEL_DIR [--batch 1,8,32,64] [--gen 128]
        [--prompt 512] [--gen-prompt 8] [--reps 3] [--json OUT]

Figures (each the median of --reps runs after one warm-up run, with
torch.cuda.synchronize around every timed call):

  load     from_pretrained onto the device, the files read once beforehand
           so the page cache is warm (as for kiln's load figure)
  pp       generate() of one token after a --prompt token prompt: the time to
           first token, and prompt tokens / that time
  tg       at each --batch B: generate() of --gen tokens for B prompts of
           --gen-prompt tokens (greedy, min_new_tokens = max_new_tokens so
           end-of-text never stops it); "e2e" is B*gen / the whole call,
           "decode" is B*(gen-1) / (that call - a 1-token generate()), the
           figure `kiln bench` -n/-b reports

Prompts are random token ids (fixed seed).  Default bf16 weights, SDPA
attention, transformers' default (dynamic) KV cache.  Runs with the plain
python3 of a machine with torch + transformers.  --json keys (read by
scripts/gpu/summarize.py): load_sec, prompt, ttft_ms, prefill_tok_s, and
generate: [{batch, gen, tok_s (decode), e2e_tok_s, ms_per_step, total_s}].
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def warm_files(d):
    n = 0
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                while chunk := f.read(64 << 20):
                    n += len(chunk)
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", default="1,8,32,64")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen-prompt", type=int, default=8, help="prompt tokens of the tg runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = a.device
    cuda = dev.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    nbytes = warm_files(a.model)
    kw = {DTYPE_KW: DTYPES[a.dtype], "attn_implementation": a.attn}
    sync()
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(a.model, device_map=dev, **kw)
    except (ImportError, ValueError):  # transformers 4 wants accelerate for device_map
        model = AutoModelForCausalLM.from_pretrained(a.model, **kw).to(dev)
    sync()
    load_s = time.perf_counter() - t0
    model.eval()
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def ids(b, n):  # clear of the special tokens at the ends of the vocabulary
        return torch.randint(256, max(vocab - 512, 257), (b, n), generator=g).to(dev)

    def gen_time(x, n):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        assert out.shape[1] == x.shape[1] + n
        return time.perf_counter() - t

    def median(f):
        f()  # warm-up
        return statistics.median(f() for _ in range(a.reps))

    name = torch.cuda.get_device_name() if cuda else "cpu"
    res = {"model": a.model, "arch": type(model).__name__, "dtype": a.dtype, "attn": a.attn,
           "device": name, "transformers": transformers.__version__, "torch": torch.__version__,
           "load_sec": round(load_s, 3), "file_bytes": nbytes, "generate": []}
    print(f"model  {a.model} ({res['arch']}, {a.dtype}, {a.attn}) on {name}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"load   {load_s:.2f} s ({nbytes / 2**30:.2f} GiB, page cache warm)")
    if a.prompt > 0:
        x = ids(1, a.prompt)
        ttft = median(lambda: gen_time(x, 1))
        res.update(prompt=a.prompt, ttft_ms=round(ttft * 1e3, 2),
                   prefill_tok_s=round(a.prompt / ttft, 1))
        print(f"pp{a.prompt:<5d} {a.prompt / ttft:10.1f} tok/s   (time to first token "
              f"{ttft * 1e3:.1f} ms, median of {a.reps})")
    if a.gen > 1:
        print(f"tg{a.gen:<5d} {'batch':>6s} {'e2e tok/s':>10s} {'decode tok/s':>13s} "
              f"{'ms/step':>8s}   (prompt {a.gen_prompt}, median of {a.reps})")
    for b in [int(s) for s in a.batch.split(",") if s] if a.gen > 1 else []:
        x = ids(b, a.gen_prompt)
        try:
            t_full = median(lambda: gen_time(x, a.gen))
            t_one = median(lambda: gen_time(x, 1))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{'':7s} {b:6d} out of memory")
            res["generate"].append({"batch": b, "oom": True})
            continue
        dec = max(t_full - t_one, 1e-9)
        r = {"batch": b, "gen": a.gen, "tok_s": round(b * (a.gen - 1) / dec, 1),  # decode
             "e2e_tok_s": round(b * a.gen / t_full, 1),
             "ms_per_step": round(dec / (a.gen - 1) * 1e3, 3), "total_s": round(t_full, 3)}
        res["generate"].append(r)
        print(f"{'':7s} {b:6d} {r['e2e_tok_s']:10.1f} {r['tok_s']:13.1f} "
              f"{r['ms_per_step']:8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
