#!/usr/bin/env python3
"""summarize.py OUT_DIR - one table from the kiln-*.json and hf-*.json files
that scripts/gpu/bench.sh writes: kiln's figures, the share of the device
copy ceiling, and the ratio to transformers on the same weights."""
import glob
import json
import os
import sys

out = sys.argv[1]
hf = {}
for p in glob.glob(os.path.join(out, "hf-*.json")):
    try:
        hf[os.path.basename(p)[3:-5]] = json.load(open(p))
    except (OSError, ValueError):
        pass


def hf_tg(shape, batch):
    h = hf.get(shape) or {}
    for row in h.get("generate", []):
        if row.get("batch") == batch:
            return row.get("tok_s")
    return None


print(f"{'model':<24} {'type':<7} {'pp512 tok/s':>11} {'ttft ms':>8} {'TFLOP/s':>8} "
      f"{'batch':>5} {'tg tok/s':>9} {'GB/s':>6} {'% copy':>6} {'HF tok/s':>8} {'x HF':>6}")
for p in sorted(glob.glob(os.path.join(out, "kiln-*.json"))):
    name = os.path.basename(p)[5:-5]
    shape, _, typ = name.rpartition("-")
    try:
        k = json.load(open(p))
    except (OSError, ValueError):
        print(f"{shape:<24} {typ:<7} (no result)")
        continue
    first = True
    for row in k.get("tg", []):
        h = hf_tg(shape, row["batch"]) if typ == "bf16" else None
        ratio = f"{row['tok_s'] / h:6.1f}" if h else "     -"
        pp = f"{k.get('pp_tok_s', 0):11.0f} {k.get('ttft_ms', 0):8.1f} {k.get('pp_tflop_s', 0):8.1f}" \
            if first else " " * 29
        print(f"{shape if first else '':<24} {typ if first else '':<7} {pp} {row['batch']:>5} "
              f"{row['tok_s']:9.1f} {row['gb_s']:6.0f} {row['pct_of_copy']:6.1f} "
              f"{(f'{h:8.1f}' if h else '       -')} {ratio}")
        first = False
    print(f"{'':<24} copy ceiling {k.get('copy_gb_s', 0):.0f} GB/s, weights/step "
          f"{k.get('decode_bytes', 0) / 1e9:.2f} GB, load {k.get('load_sec', 0):.2f} s")
for shape, h in sorted(hf.items()):
    print(f"HF {shape}: from_pretrained {h.get('load_sec', 0):.2f} s, "
          f"prefill {h.get('prefill_tok_s', 0):.0f} tok/s, ttft {h.get('ttft_ms', 0):.1f} ms")
