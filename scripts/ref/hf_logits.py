#!/usr/bin/env python3
"""hf_logits.py - reference logits from transformers for any Hugging Face
model directory (a real checkpoint or one from bench/synth/make_synth.py),
as a "KILNPAR1" fixture (scripts/ref/kilnpar.py) for kiln's parity tests
(tests/parity.h; KILN_GPU_MODELS="DIR=OUT.bin" for tests/gpu/test_gpu_models.c).

    python3 scripts/ref/hf_logits.py MODEL_DIR OUT.bin [--device cuda|cpu]
        [--dtype f32|bf16] [--n-cont 64] [--lengths 7,64,300] [--top-k 40] [--seed 0]
        [--kl-dtype bf16]

Prompts are token ids, not text: one per --lengths entry, drawn uniformly
from a fixed seed over the tokenizer's base vocabulary (model.vocab of
tokenizer.json: no added/special tokens, no padding rows of the embedding),
so the fixture does not depend on a tokenizer implementation.  Each prompt
is followed by transformers' greedy --n-cont token continuation (KV cache,
end-of-text not special); then the whole sequence is run once more and the
top-k logits and log-sum-exp of every position are recorded.

The model runs in --dtype on --device (default float32: the exact function
the stored weights define, TF32 off; bf16 shows how far a bf16 engine may
drift).  --kl-dtype runs the same sequences through the model in that dtype
too and prints the mean KL of its logits from the --dtype ones over every
position (full rows): transformers' own error in that precision, the bar an
engine's reduced-precision path is held to.  Runs with the plain python3 of
a machine with torch + transformers.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kilnpar  # noqa: E402

DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def load_model(d, dtype, device):
    kw = {DTYPE_KW: dtype, "attn_implementation": "sdpa"}
    try:
        m = AutoModelForCausalLM.from_pretrained(d, device_map=device, **kw)
    except (ImportError, ValueError):  # transformers 4 wants accelerate for device_map
        m = AutoModelForCausalLM.from_pretrained(d, **kw).to(device)
    return m.eval()


def base_vocab(d, n_vocab):
    """Ids [0, n) safe to draw prompts from: the BPE vocabulary proper."""
    try:
        with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
            n = len(json.load(f)["model"]["vocab"])
        return min(n, n_vocab)
    except (OSError, KeyError, ValueError):
        return n_vocab


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    ap.add_argument("--n-cont", type=int, default=64)
    ap.add_argument("--lengths", default="7,64,300", help="prompt lengths, one prompt each")
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kl-dtype", choices=sorted(DTYPES), help="also report KL(dtype || this)")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    model = load_model(a.model, DTYPES[a.dtype], a.device)
    n_vocab = model.get_output_embeddings().weight.shape[0]
    hi = base_vocab(a.model, n_vocab)
    rng = np.random.RandomState(a.seed)
    prompts = [[int(t) for t in rng.randint(0, hi, size=int(n))] for n in a.lengths.split(",")]
    print(f"{a.model}: {type(model).__name__}, vocab {n_vocab} (prompts from [0, {hi})), "
          f"{a.dtype} on {a.device}, loaded in {time.time() - t0:.1f} s", file=sys.stderr)
    dev = a.device
    seqs = []
    with open(a.out, "wb") as f, torch.no_grad():
        kilnpar.write_header(f, len(prompts), n_vocab, a.top_k, a.n_cont)
        for ids in prompts:
            seq = list(ids)
            out = model(torch.tensor([ids], device=dev), use_cache=True)
            for _ in range(a.n_cont):
                nxt = int(torch.argmax(out.logits[0, -1]))
                seq.append(nxt)
                out = model(torch.tensor([[nxt]], device=dev),
                            past_key_values=out.past_key_values, use_cache=True)
            lg = model(torch.tensor([seq], device=dev)).logits[0].float()
            top2 = torch.topk(lg, 2, dim=-1).values
            gap = (top2[:, 0] - top2[:, 1])[len(ids) - 1:-1]  # at the greedy picks
            ent = -(torch.softmax(lg, -1) * torch.log_softmax(lg, -1)).sum(-1).mean()
            same = int((lg[len(ids) - 1:-1].argmax(-1).cpu() ==
                        torch.tensor(seq[len(ids):])).sum())
            kilnpar.write_prompt(f, len(ids), seq, lg.cpu().numpy(), a.top_k)
            seqs.append(seq)
            print(f"  prompt {len(ids):4d}: continuation {seq[len(ids):len(ids) + 6]}..., "
                  f"logit std {float(lg.std()):.2f}, entropy {float(ent):.2f} nats, "
                  f"top1-top2 gap median {float(gap.median()):.3f} min {float(gap.min()):.4f}, "
                  f"full-pass argmax = cached greedy at {same}/{a.n_cont}", file=sys.stderr)
    print(f"-> {a.out} ({os.path.getsize(a.out)} bytes, {time.time() - t0:.1f} s)",
          file=sys.stderr)
    if a.kl_dtype:
        other = load_model(a.model, DTYPES[a.kl_dtype], dev)
        kl_sum, n_pos = 0.0, 0
        with torch.no_grad():
            for seq in seqs:
                x = torch.tensor([seq], device=dev)
                lp = torch.log_softmax(model(x).logits[0].double(), -1)
                lq = torch.log_softmax(other(x).logits[0].double(), -1)
                kl_sum += float((lp.exp() * (lp - lq)).sum())
                n_pos += len(seq)
        print(f"KL({a.dtype} || {a.kl_dtype}) mean over {n_pos} positions: "
              f"{kl_sum / n_pos:.3e}")


if __name__ == "__main__":
    main()
