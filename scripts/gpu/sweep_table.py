#!/usr/bin/env python3
"""sweep_table.py OUT - the table of scripts/gpu/sweep.sh: decode tok/s (and
% of the step roofline) per model, matmul path and batch, the best path of
each batch marked with *."""
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
BATCHES = (1, 2, 4, 8, 16, 32, 64)
PATHS = ("default", "mmd64", "nommd", "gemm", "mmd64s2")

runs = {}
for p in sorted(out.glob("s-*.json")):
    model, path = p.stem[2:].rsplit("-", 1)
    try:
        d = json.loads(p.read_text().strip().splitlines()[-1])
    except (ValueError, IndexError):
        continue
    runs.setdefault(model, {})[path] = {x["batch"]: x for x in d.get("tg", [])}

print(f"{'model':14} {'path':8}" + "".join(f"{'b' + str(b):>14}" for b in BATCHES))
for model, paths in runs.items():
    best = {b: max((r[b]["tok_s"] for r in paths.values() if b in r), default=0) for b in BATCHES}
    for path in PATHS:
        r = paths.get(path)
        if not r:
            continue
        cells = []
        for b in BATCHES:
            if b not in r:
                cells.append(f"{'-':>14}")
                continue
            mark = "*" if r[b]["tok_s"] >= best[b] else " "
            cells.append(f"{r[b]['tok_s']:>8.0f} ({r[b]['pct_of_roofline']:>2.0f}%){mark}")
        print(f"{model:14} {path:8}" + "".join(f"{c:>14}" for c in cells))
