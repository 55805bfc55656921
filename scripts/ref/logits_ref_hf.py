#!/usr/bin/env python3
"""logits_ref_hf.py - reference logits from Hugging Face transformers for
kiln's parity test (tests/test_parity.c).

transformers loads the GGUF file itself (dequantizing every tensor to
float32, undoing llama.cpp's q/k permutation and Gemma's norm offset) and
runs its own PyTorch implementation of the architecture in float32: an
independent reference for kiln's loader, descriptors and forward pass.

For 20 fixed prompts it records the prompt, transformers' greedy 32-token
continuation, and at every position of prompt + continuation the top-40
logits with the log-sum-exp of the whole row, in the format described in
scripts/ref/kilnpar.py ("KILNPAR1").

Usage: .venv-ref/bin/python scripts/ref/logits_ref_hf.py [--long] MODEL.gguf OUT.bin
(--long: the single long prompt instead of the 20 short ones)
(`make parity-ref` regenerates the committed fixtures.)
"""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
import kilnpar  # noqa: E402
from parity_prompts import LONG_PROMPT, N_CONT, PROMPTS, TOP_K  # noqa: E402


def main():
    args = [a for a in sys.argv[1:] if a != "--long"]
    model_path, out_path = args[0], args[1]
    prompts = [LONG_PROMPT] if "--long" in sys.argv else PROMPTS
    d, name = os.path.split(os.path.abspath(model_path))
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    n_vocab = model.get_output_embeddings().weight.shape[0]
    total = 0
    with open(out_path, "wb") as f, torch.no_grad():
        kilnpar.write_header(f, len(prompts), n_vocab, TOP_K, N_CONT)
        for p in prompts:
            ids = tok(p, add_special_tokens=True)["input_ids"]
            # greedy continuation with the KV cache; end-of-text is not special
            seq = list(ids)
            out = model(torch.tensor([ids]), use_cache=True)
            for _ in range(N_CONT):
                nxt = int(torch.argmax(out.logits[0, -1]))
                seq.append(nxt)
                out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values,
                            use_cache=True)
            logits = model(torch.tensor([seq])).logits[0].double().numpy()
            kilnpar.write_prompt(f, len(ids), seq, logits, TOP_K)
            total += len(seq)
            print(f"{len(ids):4d} tokens, continuation {seq[len(ids):len(ids) + 8]}...",
                  file=sys.stderr)
    print(f"{total} positions over {len(prompts)} prompts -> {out_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
