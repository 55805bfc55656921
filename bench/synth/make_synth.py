#!/usr/bin/env python3
"""make_synth.py - a random-weight Hugging Face model of a published shape,
for kiln's GPU benchmarks and parity runs where the real checkpoint cannot be
downloaded.

    python3 bench/synth/make_synth.py OUT_DIR --shape qwen2.5-7b [--dtype bf16]
        [--seed N] [--layers N] [--vocab N] [--std 0.02] [--check]

OUT_DIR gets what a real checkpoint has and kiln reads: config.json (from
transformers' own config class, so HF and kiln read the same numbers),
model.safetensors or model-0000K-of-0000N.safetensors shards with
model.safetensors.index.json, tokenizer.json and tokenizer_config.json.

Weights are N(0, std) (std = initializer_range, 0.02), norm gains N(1, 0.1),
biases N(0, std); every tensor is filled in fixed chunks, each from its own
generator seeded by (seed, tensor, chunk), so the bytes depend on --seed only
(not on the thread count).  Tensors are generated and written one at a time
straight into the safetensors files: memory stays near the largest tensor
and a 7B BF16 model is disk-bound.

The tokenizer is a synthetic byte-level BPE whose size equals the model's
vocab: the 256 byte tokens, merges learned from a built-in English text,
then filler merges of existing tokens, then <|endoftext|> <|im_start|>
<|im_end|> as the last three ids.  Qwen shapes use Qwen2's split regex,
llama uses Llama 3's (with ignore_merges), as the real files do.

--layers / --vocab shrink the model for CPU checks; --check loads the result
with transformers and prints logit statistics of a short forward pass.
"""
import argparse
import json
import math
import os
import re
import struct
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
import transformers

# transformers 5 renamed torch_dtype (config field and from_pretrained argument) to dtype
DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

# Published hyperparameters (config.json of the Hugging Face checkpoints).
SHAPES = {
    "qwen2.5-0.5b": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False)),
    "qwen3-0.6b": ("qwen3", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False)),
    "llama-1b": ("llama", dict(  # Llama-3.2-1B
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}

DTYPES = {"bf16": (torch.bfloat16, "BF16"), "f16": (torch.float16, "F16"),
          "f32": (torch.float32, "F32")}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# tokenizer.json Split regexes (as in Qwen2's and Llama 3's files)
RE_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
            r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
RE_LLAMA3 = RE_QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
SHARD_BYTES = 4 << 30
CHUNK = 1 << 22  # elements per generator

TEXT = """\
A kiln is an insulated chamber that turns soft clay into hard, durable ware. The
potter loads the shelves, closes the door and raises the heat slowly, because water
trapped in the clay turns to steam and can crack a pot that warms too fast. Around
600 degrees the chemically bound water leaves; near 900 the clay begins to sinter,
and at 1200 to 1300 degrees stoneware and porcelain become dense and glassy.
Glazes are thin coats of silica, alumina and fluxes that melt into glass on the
surface. Their colour comes from small amounts of metal oxides: iron gives browns
and greens, cobalt a deep blue, copper red or green depending on the atmosphere.
In a reduction firing the potter starves the fire of oxygen, so the flame pulls
oxygen from the oxides in the clay and glaze, and the same glaze that was green
in an electric kiln comes out red. After the peak the kiln must cool as carefully
as it heated: quartz changes its crystal form at 573 degrees and shrinks suddenly,
and a pot opened too early can dunt, splitting with a sharp sound. Good firing
logs record the time, the temperature and the state of the flame every half hour,
so that the next load can be fired the same way, or better. Wood kilns take days
to fire and need a crew to feed them; gas and electric kilns are easier to control
but give less of the ash and flame marks that many makers love. Whatever the fuel,
the work is the same: patience, attention, and a willingness to learn from every
opening of the door. "It's done when it's done," the old potters say, and they're
right more often than the pyrometers are.
"""


def byte_chars():
    """GPT-2's byte -> printable character map of byte-level BPE."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def bpe_merges(n_merges):
    """n_merges deterministic merges: BPE on TEXT, then filler pairs."""
    bc = byte_chars()
    vocab = [bc[b] for b in range(256)]
    have = set(vocab) | set(SPECIALS)
    merges = []
    words = Counter("".join(bc[b] for b in w.encode())
                    for w in re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", TEXT))
    seqs = {w: list(w) for w in words}
    while len(merges) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            s = seqs[w]
            for p in zip(s, s[1:]):
                pairs[p] += c
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append((a, b))
        vocab.append(a + b)
        have.add(a + b)
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    # filler: every learned token extended by each short token, in order
    learned, short = list(vocab), [t for t in vocab if len(t) <= 2]
    for b in short:
        for a in learned:
            if len(merges) >= n_merges:
                return vocab, merges
            if a + b not in have:
                merges.append((a, b))
                vocab.append(a + b)
                have.add(a + b)
    raise SystemExit(f"make_synth: cannot make {n_merges} merges")


def write_tokenizer(out, n_vocab, arch):
    n_merges = n_vocab - 256 - len(SPECIALS)
    if n_merges < 0:
        raise SystemExit(f"make_synth: vocab {n_vocab} is smaller than 259")
    vocab, merges = bpe_merges(n_merges)
    llama = arch == "llama"
    added = [{"id": len(vocab) + i, "content": s, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i, s in enumerate(SPECIALS)]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None if llama else {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": RE_LLAMA3 if llama else RE_QWEN2},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False,
                           "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": llama,
                  "vocab": {t: i for i, t in enumerate(vocab)},
                  "merges": [f"{a} {b}" for a, b in merges]},  # no token holds a space
    }
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0],
           "eos_token": SPECIALS[2], "pad_token": SPECIALS[0], "add_bos_token": False,
           "add_eos_token": False, "model_max_length": 131072, "chat_template": CHATML}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def make_config(shape, layers, vocab):
    arch, hp = SHAPES[shape]
    hp = dict(hp)
    if layers:
        hp["num_hidden_layers"] = layers
    if vocab:
        hp["vocab_size"] = vocab
    v = hp["vocab_size"]
    cls = getattr(transformers, {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                                 "llama": "LlamaConfig"}[arch])  # Qwen3: transformers >= 4.51
    return arch, cls(bos_token_id=v - 3, eos_token_id=v - 1, pad_token_id=v - 3,
                     initializer_range=0.02, **hp)


def tensor_list(cfg):
    """(name, shape) of every stored tensor, from the model built on meta."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    out = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if cfg.tie_word_embeddings:
        out = [(n, s) for n, s in out if n != "lm_head.weight"]
    return out


def fill(t, name, seed, std, pool):
    """Fill t in place: chunk i from a generator seeded by (seed, name, i)."""
    flat = t.view(-1)
    if name.endswith("norm.weight"):
        mean, sd = 1.0, 0.1
    else:
        mean, sd = 0.0, std

    def one(i):
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{i}".encode()))
        flat[i * CHUNK:(i + 1) * CHUNK].normal_(mean, sd, generator=g)

    list(pool.map(one, range(math.ceil(flat.numel() / CHUNK))))


def write_weights(out, tensors, dtype, stname, seed, std):
    esize = torch.empty(0, dtype=dtype).element_size()
    # split into shards of at most SHARD_BYTES, in model order
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        nb = math.prod(shape) * esize
        if cur and size + nb > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, nb))
        size += nb
    shards.append(cur)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else \
        [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    # one thread writes tensor i while the pool generates tensor i + 1
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool, ThreadPoolExecutor(1) as writer:
        for fname, shard in zip(files, shards):
            hdr, off = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, nb in shard:
                hdr[name] = {"dtype": stname, "shape": list(shape), "data_offsets": [off, off + nb]}
                off += nb
                weight_map[name] = fname
            h = json.dumps(hdr, separators=(",", ":")).encode()
            h += b" " * (-len(h) % 8)
            with open(os.path.join(out, fname), "wb") as f:
                f.write(struct.pack("<Q", len(h)) + h)
                pending = None
                for name, shape, nb in shard:
                    t = torch.empty(shape, dtype=dtype)
                    fill(t, name, seed, std, pool)
                    if pending:
                        pending.result()
                    pending = writer.submit(f.write, t.view(-1).view(torch.uint8).numpy().data)
                pending.result()
            total += off
    if n > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total, n


def check(out):
    """A short forward pass through transformers: finite, non-degenerate logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kw = {DTYPE_KW: torch.float32 if dev == "cpu" else "auto"}
    model = AutoModelForCausalLM.from_pretrained(out, **kw).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = "The kiln was hot, and 1234 pots came out glazed."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text, "tokenizer round trip"
    with torch.no_grad():
        lg = model(torch.tensor([ids], device=dev)).logits[0].float()
    assert torch.isfinite(lg).all(), "non-finite logits"
    p = torch.softmax(lg, -1)
    ent = float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())
    print(f"check: {len(ids)} tokens {ids[:8]}..., logit std {float(lg.std()):.3f}, "
          f"row range {float((lg.max(-1).values - lg.min(-1).values).mean()):.2f}, "
          f"entropy {ent:.2f} nats (uniform {math.log(lg.shape[1]):.2f}), "
          f"argmax {lg.argmax(-1).tolist()[:8]}", file=sys.stderr)
    assert float(lg.std(-1).min()) > 1e-3, "degenerate (all-equal) logits"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers")
    ap.add_argument("--vocab", type=int, default=0, help="override vocab_size (CPU checks)")
    ap.add_argument("--std", type=float, default=0.02, help="weight std (initializer_range)")
    ap.add_argument("--check", action="store_true", help="run transformers on the result")
    a = ap.parse_args()
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    for f in os.listdir(a.out):  # stale shards of an earlier run would be read too
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(a.out, f))
    arch, cfg = make_config(a.shape, a.layers, a.vocab)
    dtype, stname = DTYPES[a.dtype]
    setattr(cfg, DTYPE_KW, dtype)  # written to config.json
    cfg.save_pretrained(a.out)
    write_tokenizer(a.out, cfg.vocab_size, arch)
    t1 = time.time()
    total, n = write_weights(a.out, tensor_list(cfg), dtype, stname, a.seed, a.std)
    t2 = time.time()
    print(f"{a.shape}: {arch}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, "
          f"{a.dtype}, {total / 2**30:.2f} GiB in {n} file(s) -> {a.out} "
          f"(tokenizer+config {t1 - t0:.1f} s, weights {t2 - t1:.1f} s, "
          f"{total / 2**30 / max(t2 - t1, 1e-9):.2f} GiB/s)", file=sys.stderr)
    if a.check:
        check(a.out)


if __name__ == "__main__":
    main()
