#!/usr/bin/env python3
"""side_table.py DIR - kiln beside llama.cpp on the same GGUF files, from
what validate.sh's llama stage left in DIR: llama.json (llama_bench.sh:
llama-bench pp512 / tg128, llama-batched-bench S_TG by batch) and
kiln-NAME.json (kiln bench --json -p 512 -n 128 -b 1,8,32,64).  Each cell
is kiln / llama.cpp tok/s and their ratio; kiln's decode figures include
sampling, llama-batched-bench's do not."""
import json
import pathlib
import sys

d = pathlib.Path(sys.argv[1])
try:
    llama = json.loads((d / "llama.json").read_text())
except (OSError, ValueError):
    llama = {}


def kiln(name):
    try:
        return json.loads((d / f"kiln-{name}.json").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def cell(k, l):
    if not k or not l:
        return f"{k or 0:,.0f} / {l or 0:,.0f}"
    return f"{k:,.0f} / {l:,.0f} ({k / l:.2f})"


cols = ("pp512", "b1", "b8", "b32", "b64")
print("| file | " + " | ".join(cols) + " |")
print("| --- |" + " --- |" * len(cols))
names = sorted(set(llama) | {p.stem[5:] for p in d.glob("kiln-*.json")})
for n in names:
    k, l = kiln(n), llama.get(n, {})
    tg = {x["batch"]: x["tok_s"] for x in (k or {}).get("tg", [])}
    lb = {int(b): v for b, v in l.get("batched", {}).items()}
    row = [cell((k or {}).get("pp_tok_s"), l.get("pp512")),
           cell(tg.get(1), l.get("tg128") or lb.get(1))]
    row += [cell(tg.get(b), lb.get(b)) for b in (8, 32, 64)]
    print(f"| {n} | " + " | ".join(row) + " |")
