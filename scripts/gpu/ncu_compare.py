#!/usr/bin/env python3
"""ncu_compare.py A.csv B.csv ... - kernel time by kernel, side by side.

Each file is `ncu --csv --metrics gpu__time_duration.sum` output of one run
(validate.sh's ncutype stage: the same steps on weights of another type).
Prints, per kernel name (template arguments cut), the launches and total
microseconds of each run, the largest first, and each run's total."""
import csv
import pathlib
import re
import sys


def load(path):
    """{kernel: [launches, total us]} of one ncu CSV (lines before the
    header, ncu's and the program's own, are skipped)."""
    lines = pathlib.Path(path).read_text(errors="replace").splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    out = {}
    if start is None:
        return out
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = re.sub(r"<.*", "", row.get("Kernel Name", "?")).strip()
        name = re.sub(r"\(.*", "", name)
        name = re.sub(r"^void ", "", name)
        try:
            v = float(row["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        unit = row.get("Metric Unit", "nsecond")
        us = v / 1000.0 if unit.startswith("n") else v * 1000.0 if unit.startswith("m") else v
        k = out.setdefault(name, [0, 0.0])
        k[0] += 1
        k[1] += us
    return out


def main():
    paths = sys.argv[1:]
    if not paths:
        sys.exit("usage: ncu_compare.py A.csv B.csv ...")
    runs = [load(p) for p in paths]
    tags = [pathlib.Path(p).stem for p in paths]
    names = sorted({n for r in runs for n in r}, key=lambda n: -max(r.get(n, [0, 0])[1] for r in runs))
    w = max([len(n) for n in names] + [6])
    w = min(w, 60)
    print("%-*s" % (w, "kernel") + "".join("%22s" % t[-20:] for t in tags))
    for n in names:
        cells = "".join("%8d %10.1f us " % tuple(r.get(n, [0, 0.0])) for r in runs)
        print("%-*s %s" % (w, n[:w], cells))
    print("%-*s" % (w, "total") + "".join("%8d %10.1f us " % (sum(v[0] for v in r.values()),
                                                              sum(v[1] for v in r.values())) for r in runs))


if __name__ == "__main__":
    main()
