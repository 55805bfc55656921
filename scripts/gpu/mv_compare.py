#!/usr/bin/env python3
"""mv_compare.py NEW.txt... -- OLD.txt...: bench_matvec outputs of two CUDA
plugins (validate.sh's mvab stage) side by side: for each weight and row
count, the median weight GB/s of each side over its files and new / old."""
import re
import statistics
import sys

ROW = re.compile(r"^(\w+)\s+(\d+x\d+)\s+[\d.]+\s+(.*)$")
CELL = re.compile(r"(\d+) \(\s*\d+%\)")
HEAD = re.compile(r"rows=(\d+)")


def load(paths):
    """{(type, shape): [[GB/s per row count] per file]}, row counts"""
    table, rows = {}, []
    for p in paths:
        for line in open(p):
            if "rows=" in line and line.startswith("type"):
                rows = [int(r) for r in HEAD.findall(line)]
            m = ROW.match(line)
            if m:
                cells = [int(c) for c in CELL.findall(m.group(3))]
                table.setdefault((m.group(1), m.group(2)), []).append(cells)
    return table, rows


def main(argv):
    if "--" not in argv:
        sys.exit("usage: mv_compare.py NEW.txt... -- OLD.txt...")
    cut = argv.index("--")
    new, rows = load(argv[:cut])
    old, _ = load(argv[cut + 1:])
    if not new or not old:
        sys.exit("mv_compare: no bench_matvec rows in one of the sides")
    print("weight GB/s, median of each side: new / old (new / old ratio)")
    print("%-6s %-13s " % ("type", "shape") + " ".join("%19s" % ("rows=%d" % r) for r in rows))
    for key in new:
        if key not in old:
            continue
        med_n = [statistics.median(c) for c in zip(*new[key])]
        med_o = [statistics.median(c) for c in zip(*old[key])]
        cells = ["%6.0f/%-6.0f %4.2fx" % (a, b, a / b if b else 0) for a, b in zip(med_n, med_o)]
        print("%-6s %-13s " % key + " ".join("%19s" % c for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])
