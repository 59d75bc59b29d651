"""Splits an ncu csv of `klein-bench components --only vae_tiled` into the first decode's
statistics passes (from its first group-moments kernel to the last before a run of 800 launches
without one) and what follows them, with the top kernels of each.

Usage: ncu --clock-control none --launch-count 10000 --csv --metrics gpu__time_duration.sum \
           klein-bench --device cuda:0 components --only vae_tiled ... --iters 1 > ncu.csv
       python3 ncu_phases.py ncu.csv
"""
import csv
import sys
from collections import defaultdict

from ncu_top import SCALE

# Launches without a moments kernel that end the statistics passes (a pass's bands have a few
# dozen between two norms).
GAP = 800


def launches(path: str) -> list[tuple[int, str, float]]:
    """(launch ID, kernel name, ns), in launch order."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    rows = []
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(row["Metric Value"].replace(",", "")) * SCALE.get(row["Metric Unit"], 1)
        rows.append((int(row["ID"]), row["Kernel Name"].split("(")[0][:80], ns))
    return sorted(rows)


def top(seg: list[tuple[int, str, float]], label: str, n: int = 25) -> None:
    sums, counts = defaultdict(float), defaultdict(int)
    for _, name, ns in seg:
        sums[name] += ns
        counts[name] += 1
    total = sum(sums.values())
    print(f"\n== {label}: {len(seg)} launches, {total / 1e6:.2f} ms")
    for name, ns in sorted(sums.items(), key=lambda kv: -kv[1])[:n]:
        print(f"{100 * ns / total:5.1f} %  {ns / 1e6:8.2f} ms  {counts[name]:5d}x  {name}")


def main(path: str) -> None:
    rows = launches(path)
    print(f"{len(rows)} kernels, {sum(ns for _, _, ns in rows) / 1e6:.1f} ms")
    moments = [i for i, (_, name, _) in enumerate(rows) if "group_region" in name]
    start = end = moments[0]
    for i in moments:
        if i - end > GAP:
            break
        end = i
    after = [i for i in moments if i > end + GAP]
    top(rows[:start], "before the first moments (set-up, mid block, first norm's input)", 12)
    top(rows[start:end + 1], "statistics passes (first moments to last)")
    top(rows[end + 1:after[0] if after else len(rows)], "after them (final pass, the next decode's mid block)")


if __name__ == "__main__":
    main(sys.argv[1])
