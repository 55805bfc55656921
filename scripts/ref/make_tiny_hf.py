#!/usr/bin/env python3
"""make_tiny_hf.py - tiny random Hugging Face models and their reference
logits, for kiln's safetensors load-path parity test (tests/test_hf_models.c).

No real llama / qwen2 / qwen3 / gemma3_text checkpoint is available offline,
so this builds one tiny random model per architecture with transformers' own
config and model classes, saves it with save_pretrained (safetensors) and
records transformers' float32 logits for it.  Each model is chosen to
exercise what distinguishes its family on kiln's HF path:

  llama   BF16 weights, untied lm_head, HF (NEOX) rope, rope_theta 500000
  qwen2   F32 weights, q/k/v bias, tied embeddings, rope_theta 1e6, a vocab
          padded past the tokenizer's (as Qwen's checkpoints are)
  qwen3   F16 weights, per-head q/k RMS norm, head_dim 16 != hidden/heads 8,
          tied embeddings
  gemma3  BF16 weights (gemma3_text): norms stored as w - 1, sandwich norms,
          GeGLU, embedding scale, query_pre_attn_scalar != head_dim, a
          sliding window of 8 (the sequence is 48) on two of three layers,
          separate rope bases for sliding and global layers

Initialization is scaled by hand (unit-gain projections, random norm weights
and biases) so activations and logits are far from degenerate; the models
stay well under 300 KB each (hidden 32) so they can be committed.

The reference is computed in float32 even for a model stored in BF16/F16:
the saved directory is loaded back with dtype=torch.float32, so the weights
are exactly the stored values.  The fixture is the "KILNPAR1" format of
scripts/ref/kilnpar.py with one prompt: a fixed 40-token id sequence, then
the reference's 8-token greedy continuation, and at all 48 positions the
log-sum-exp and the top-40 logits.

Usage: .venv-ref/bin/python scripts/ref/make_tiny_hf.py OUTDIR
(writes OUTDIR/<arch>/ and OUTDIR/<arch>.bin; the committed copy lives in
tests/data/hf-tiny/).
"""
import os
import shutil
import sys

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config,
                          Qwen3Config)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kilnpar  # noqa: E402

TOK_DIR = os.path.join(HERE, "..", "..", "tests", "data", "tokenizer")
N_PROMPT = 40
N_CONT = 8
TOP_K = 40

COMMON = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def specs():
    return [
        ("llama", torch.bfloat16, "hf-llama3",
         LlamaConfig(vocab_size=1000, num_hidden_layers=2, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                     **COMMON)),
        ("qwen2", torch.float32, "hf-qwen2",
         Qwen2Config(vocab_size=1024, num_hidden_layers=2, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                     **COMMON)),
        ("qwen3", torch.float16, "hf-smollm",
         Qwen3Config(vocab_size=1000, num_hidden_layers=2, head_dim=16,
                     tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                     **COMMON)),
        ("gemma3", torch.bfloat16, "hf-gemma",
         Gemma3TextConfig(vocab_size=1160, num_hidden_layers=3, head_dim=16,
                          query_pre_attn_scalar=24, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention",
                                       "sliding_attention"],
                          rope_parameters={
                              "full_attention": {"rope_type": "default",
                                                 "rope_theta": 1000000.0},
                              "sliding_attention": {"rope_type": "default",
                                                    "rope_theta": 10000.0}},
                          final_logit_softcapping=None, attn_logit_softcapping=None,
                          **COMMON)),
    ]


def init_weights(model, arch):
    """Random weights with gains that keep every layer doing something."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "embed_tokens" in name or "lm_head" in name:
                p.copy_(r * 0.5)
            elif name.endswith("norm.weight"):
                # gemma stores w - 1; the others the gain itself
                p.copy_(r * 0.2 if arch == "gemma3" else 1.0 + r * 0.2)
            elif name.endswith(".bias"):
                p.copy_(r * 0.3)
            else:
                p.copy_(r / np.sqrt(p.shape[1]))


def make(outdir, arch, dtype, tok, cfg):
    torch.manual_seed(0)
    d = os.path.join(outdir, arch)
    shutil.rmtree(d, ignore_errors=True)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    init_weights(model, arch)
    model.to(dtype).save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOK_DIR, tok, f), d)
    gen = os.path.join(d, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)  # nothing kiln reads; keeps the committed dir minimal

    # float32 reference over exactly the stored values
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    rng = np.random.RandomState(7)
    seq = [int(t) for t in rng.randint(3, 1000, size=N_PROMPT)]
    with torch.no_grad():
        for _ in range(N_CONT):
            lg = ref(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(lg)))
        logits = ref(torch.tensor([seq])).logits[0].float().numpy()
    V = logits.shape[1]
    assert V == cfg.vocab_size
    with open(os.path.join(outdir, arch + ".bin"), "wb") as f:
        kilnpar.write_header(f, 1, V, TOP_K, N_CONT)
        kilnpar.write_prompt(f, N_PROMPT, seq, logits, TOP_K)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    p = torch.softmax(torch.tensor(logits), -1)
    ent = float(-(p * torch.log(p)).sum(-1).mean())
    print(f"{arch}: {size} bytes, {dtype}, logit std {logits.std():.2f}, "
          f"mean entropy {ent:.2f} nats, continuation {seq[N_PROMPT:]}", file=sys.stderr)


def main():
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    for arch, dtype, tok, cfg in specs():
        make(outdir, arch, dtype, tok, cfg)


if __name__ == "__main__":
    main()
