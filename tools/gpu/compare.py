"""Pairs klein-bench's rows with the diffusers rows of the same run and prints a markdown table
with the ratio (ours / diffusers; below 1 is faster). A `torch.compile` row pairs with our row of
the same case. Where the run holds the card's bf16 matmul rate, each transformer row with its
FLOPs also gets the step's floor on this card (FLOPs ÷ that rate) and ours against it.

Usage: python3 tools/gpu/compare.py components.json diffusers.json [stack.json]
"""

import json
import sys


def load_rows(path):
    with open(path) as f:
        data = json.load(f)
    return data["rows"] if isinstance(data, dict) else data


COMPILED = ", torch.compile"
# klein-bench's mark on a step replayed from a CUDA graph (its default).
GRAPHED = ", CUDA graph"


def case(r):
    """A row's case without klein-bench's configuration note ("decode 1024x1024 (…, op chunks …)"),
    its CUDA-graph mark or diffusers' compile mark."""
    return r["case"].split(" (")[0].removesuffix(GRAPHED).removesuffix(COMPILED)


def main():
    ours = {(r["component"], case(r), r["dtype"]): r for r in load_rows(sys.argv[1])}
    with open(sys.argv[2]) as f:
        ref = json.load(f)
    print(f"diffusers {ref['env'].get('diffusers')} / torch {ref['env'].get('torch')} on "
          f"{ref['env'].get('gpu')}\n")
    print("| component | case | dtype | klein ms | diffusers ms | ratio | diffusers peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in ref["rows"]:
        key = (r["component"], case(r), r["dtype"])
        mine = ours.get(key)
        ms = f"{mine['median_ms']:.1f}" if mine else "–"
        ratio = f"{mine['median_ms'] / r['median_ms']:.2f}" if mine else "–"
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"| {r['component']} | {r['case']} | {r['dtype']} | {ms} | {r['median_ms']:.1f} | "
              f"{ratio} | {peak} |")
    for key, r in ours.items():
        if not any((x["component"], case(x), x["dtype"]) == key for x in ref["rows"]):
            print(f"| {key[0]} | {key[1]} | {key[2]} | {r['median_ms']:.1f} | – | – | – |")
    rate = next((r["tflops"] for r in ref["rows"] if r["component"] == "gpu"), None)
    if rate:
        print(f"\nbf16 matmul 8192³ on this card: {rate:.0f} TFLOP/s\n")
        print("| case | TFLOP | floor ms | klein ms | klein / floor |\n|---|---|---|---|---|")
        for r in ref["rows"]:
            mine = ours.get((r["component"], case(r), r["dtype"]))
            if "tflop" in r and mine and not r["case"].endswith(COMPILED):
                floor = r["tflop"] / rate * 1e3
                print(f"| {r['case']} | {r['tflop']:.2f} | {floor:.1f} | "
                      f"{mine['median_ms']:.1f} | {mine['median_ms'] / floor:.3f} |")
    if len(sys.argv) > 3:
        with open(sys.argv[3]) as f:
            stack = json.load(f)
        print("\n| whole request through the services | klein s (client wall) |\n|---|---|")
        for name, secs in stack["requests"]:
            print(f"| {name} | {secs:.3f} |")
        for r in ref["rows"]:
            if r["component"] == "pipeline":
                print(f"| diffusers: {r['case']} | {r['median_ms'] / 1e3:.3f} |")
        print("\n| service | peak GPU memory (nvidia-smi, MiB) |\n|---|---|")
        for name, mib in stack["peak_mib"].items():
            print(f"| {name} | {mib} |")


if __name__ == "__main__":
    main()
