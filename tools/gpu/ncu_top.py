"""Shares of GPU time per kernel from `ncu --csv --metrics gpu__time_duration.sum` output.

Usage: ncu --csv --metrics gpu__time_duration.sum CMD > ncu.csv; python3 ncu_top.py ncu.csv [N]
Prints the N kernels (default 15) with the largest summed duration, their launch count and
share of the total. ncu locks the clocks, so only the shares carry over to unprofiled runs.
"""

import csv
import sys
from collections import defaultdict


def main(path: str, top: int) -> None:
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    total_ns, sums, counts = 0.0, defaultdict(float), defaultdict(int)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        ns = value * {"nsecond": 1, "ns": 1, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9, "s": 1e9}[row["Metric Unit"]]
        name = row["Kernel Name"].split("(")[0][:90]
        sums[name] += ns
        counts[name] += 1
        total_ns += ns
    print(f"total {total_ns / 1e6:.1f} ms over {sum(counts.values())} launches")
    for name, ns in sorted(sums.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{100 * ns / total_ns:5.1f} %  {ns / 1e6:8.2f} ms  {counts[name]:5d}x  {name}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15)
