#!/usr/bin/env python3
"""decode_table.py OUT - the table of scripts/gpu/decode_check.sh: for each
model, the paths the decode-batch kernel and the FP16 GEMM replaced ("old":
KILN_CUDA_MMD=0 KILN_CUDA_GEMM=bf16) and the defaults ("new"): pp512 and decode tok/s at each batch, with % of the step
roofline that `kiln bench` printed; then TP 1 through the communicator
against the plain path."""
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
BATCHES = (1, 8, 16, 32, 64)


def load(name):
    p = out / f"b-{name}.json"
    try:
        return json.loads(p.read_text().strip().splitlines()[-1])
    except Exception:
        return None


def cell(d, b):
    if not d:
        return "-"
    for x in d.get("tg", []):
        if x["batch"] == b:
            return f"{x['tok_s']:.0f} ({x['pct_of_roofline']:.0f}%)"
    return "-"


print(f"{'model':16} {'path':4} {'pp512':>16} " + " ".join(f"{'b' + str(b):>16}" for b in BATCHES))
for name in ("05-bf16", "05-F16", "05-Q4_K_M", "7-bf16", "7-Q4_K_M"):
    for path in ("old", "new"):
        d = load(f"{name}-{path}")
        if d is None and path == "old" and load(f"{name}-new") is None:
            break
        pp = f"{d['pp_tok_s']:.0f} ({d['pp_pct_of_roofline']:.0f}%)" if d and "pp_tok_s" in d else "-"
        print(f"{name:16} {path:4} {pp:>16} " + " ".join(f"{cell(d, b):>16}" for b in BATCHES))
    o, n = load(f"{name}-old"), load(f"{name}-new")
    if o and n:
        r = []
        for b in BATCHES:
            to = next((x["tok_s"] for x in o["tg"] if x["batch"] == b), 0)
            tn = next((x["tok_s"] for x in n["tg"] if x["batch"] == b), 0)
            r.append(f"{tn / to:.2f}x" if to else "-")
        ppr = f"{n['pp_tok_s'] / o['pp_tok_s']:.2f}x" if o.get("pp_tok_s") else "-"
        print(f"{name:16} {'n/o':4} {ppr:>16} " + " ".join(f"{x:>16}" for x in r))
p, c = load("05-tp-plain"), load("05-tp-comm")
if p and c:
    tp, tc = cell(p, 1), cell(c, 1)
    a = next(x["tok_s"] for x in p["tg"] if x["batch"] == 1)
    b = next(x["tok_s"] for x in c["tg"] if x["batch"] == 1)
    print(f"TP 1 via the communicator, 0.5B b1: plain {tp}, comm {tc}, cost {100 * (1 - b / a):.1f} %")
