"""Where the GPU idles between a bench's operations: reads a tools/gpu/kernel_trace.c trace
(`kind,start_ns,end_ns,stream,name`), keeps the operations after its last idle stretch longer
than --pause seconds (klein-bench components cools the card for 5 s before timing), and prints
the span, the busy time, the gaps by size and by the pair of operations around them; then,
taking each host-to-device copy as the start of a transformer step (its timestep features),
every step's span and idle time, and its head: the time from that copy to the step's first
long kernel, while the GPU runs the small kernels the host queues one by one.

    python3 tools/gpu/trace_gaps.py TRACE.csv [--pause 1.0] [--steps N]
"""

import argparse
import collections
import csv
import signal

# A kernel this long (ns) ends a step's head: the host is ahead of the GPU from there on.
LONG_KERNEL_NS = 200_000


def short(name):
    """A readable kind for an operation: cuBLAS(Lt) kernels are `gemm`, the rest their name."""
    if name.startswith(("memset", "memcpy")):
        return name.split()[0]
    if "gemm" in name.lower() or "xmma" in name or name.startswith("nvjet"):
        return "gemm"
    return name[:48]


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=0, help="divide per-step totals by this")
    a = ap.parse_args()
    ops = sorted(
        (int(r[1]), int(r[2]), r[4])
        for r in csv.reader(open(a.trace))
        if len(r) >= 5 and r[0] in "KSC"
    )
    cut = 0
    for i in range(1, len(ops)):
        if ops[i][0] - ops[i - 1][1] > a.pause * 1e9:
            cut = i
    ops = ops[cut:]
    span = ops[-1][1] - ops[0][0]
    busy = sum(e - s for s, e, _ in ops)
    gaps = [(b[0] - a_[1], short(a_[2]), short(b[2])) for a_, b in zip(ops, ops[1:])]
    idle = sum(g for g, _, _ in gaps if g > 0)
    per = a.steps or 1
    print(f"{len(ops)} operations after the last pause: span {span / 1e6:.2f} ms, "
          f"busy {busy / 1e6:.2f} ms, idle between them {idle / 1e6:.3f} ms "
          f"({idle / max(span, 1) * 100:.2f} %)")
    if a.steps:
        print(f"per step: {len(ops) / per:.0f} operations, span {span / per / 1e6:.2f} ms, "
              f"idle {idle / per / 1e6:.3f} ms")
    sizes = collections.Counter()
    sums = collections.Counter()
    for g, _, _ in gaps:
        k = ("< 0" if g < 0 else "< 1 us" if g < 1000 else "< 2 us" if g < 2000
             else "< 5 us" if g < 5000 else "< 50 us" if g < 50000 else ">= 50 us")
        sizes[k] += 1
        sums[k] += max(g, 0)
    for k in ["< 0", "< 1 us", "< 2 us", "< 5 us", "< 50 us", ">= 50 us"]:
        if sizes[k]:
            print(f"  gaps {k:>8}: {sizes[k]:6d}, {sums[k] / 1e6:8.3f} ms")
    pairs = collections.Counter()
    counts = collections.Counter()
    for g, p, n in gaps:
        if g > 0:
            pairs[(p, n)] += g
            counts[(p, n)] += 1
    print("idle by the operations around it (per step if --steps):")
    for (p, n), t in pairs.most_common(20):
        c = counts[(p, n)]
        print(f"  {t / per / 1e3:8.1f} us  {c / per:6.1f}x  mean {t / c:7.0f} ns  {p} -> {n}")
    kinds = collections.Counter()
    kind_n = collections.Counter()
    for s, e, name in ops:
        kinds[short(name)] += e - s
        kind_n[short(name)] += 1
    print("busy by operation (per step if --steps):")
    for k, t in kinds.most_common(20):
        print(f"  {t / per / 1e6:8.3f} ms  {kind_n[k] / per:6.1f}x  {k}")
    starts = [i for i, (_, _, name) in enumerate(ops) if name.startswith("memcpy kind 1 ")]
    if len(starts) > 1:
        print("steps (from one host-to-device copy to the next):")
    for a, b in zip(starts, starts[1:]):
        step = ops[a:b]
        span = step[-1][1] - step[0][0]
        idle = span - sum(e - s for s, e, _ in step)
        first = next((i for i, (s, e, _) in enumerate(step) if e - s > LONG_KERNEL_NS), len(step))
        head = step[min(first, len(step) - 1)][0] - step[0][0]
        head_busy = sum(e - s for s, e, _ in step[:first])
        print(f"  {len(step)} operations, span {span / 1e6:.3f} ms, idle {idle / 1e3:.0f} us; "
              f"head {head / 1e3:.0f} us ({first} operations, {head_busy / 1e3:.0f} us busy)")


if __name__ == "__main__":
    main()
