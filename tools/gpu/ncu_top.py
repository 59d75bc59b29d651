"""Shares of GPU time per kernel from `ncu --csv --metrics gpu__time_duration.sum` output.

Usage: ncu --csv --metrics gpu__time_duration.sum[,dram__bytes.sum] CMD > ncu.csv;
       python3 ncu_top.py ncu.csv [N]
Prints the N kernels (default 15) with the largest summed duration, their launch count and
share of the total; with `dram__bytes.sum` also collected, the bytes each moved and the rate.
ncu locks the clocks, so only the shares carry over to unprofiled runs.
"""

import csv
import sys
from collections import defaultdict

SCALE = {"nsecond": 1, "ns": 1, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9, "s": 1e9,
         "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def main(path: str, top: int) -> None:
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    total_ns, sums, counts, dram = 0.0, defaultdict(float), defaultdict(int), defaultdict(float)
    for row in csv.DictReader(lines):
        metric = row.get("Metric Name")
        value = float(row["Metric Value"].replace(",", "")) * SCALE.get(row["Metric Unit"], 1)
        name = row["Kernel Name"].split("(")[0][:90]
        if metric == "dram__bytes.sum":
            dram[name] += value
        elif metric == "gpu__time_duration.sum":
            sums[name] += value
            counts[name] += 1
            total_ns += value
    print(f"total {total_ns / 1e6:.1f} ms over {sum(counts.values())} launches")
    for name, ns in sorted(sums.items(), key=lambda kv: -kv[1])[:top]:
        rate = f"  {dram[name] / 1e9:7.2f} GB {dram[name] / ns / 1e3:5.2f} TB/s" if name in dram else ""
        print(f"{100 * ns / total_ns:5.1f} %  {ns / 1e6:8.2f} ms  {counts[name]:5d}x{rate}  {name}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15)
