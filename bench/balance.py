"""Balance benchmark: our engine in several layouts and placements on one file,
fresh processes alternating A B C A B C..., so every layout sees the same
machine. Prints the medians of each test, the ratio to the first layout, and
the node balance (imbalance = critical path ÷ mean node busy time; waits =
share of node time spent waiting on the slowest node).

    python -m moe_numa.bench.balance -m bench.gguf \\
        --layouts 1x2:contiguous,2x1:contiguous,2x1:split,2x1:map.yaml --tests tg64,pp512 -r 5

A layout is NODESxTHREADS:MAP (MAP: contiguous, round-robin, split or a YAML file).
"""
from __future__ import annotations

import argparse
import statistics
import sys

from .bench import DEFAULT_NOISE, run_ours_once


def parse_layout(text: str) -> tuple[int, int, str]:
    try:
        shape, emap = text.split(":", 1)
        nodes, threads = (int(x) for x in shape.lower().split("x"))
    except ValueError:
        raise SystemExit(f"layout {text!r}: expected NODESxTHREADS:MAP, e.g. 2x1:split") from None
    return nodes, threads, emap


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_numa.bench.balance", description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--layouts", default="1x2:contiguous,2x1:contiguous,2x1:split")
    ap.add_argument("--tests", default="tg64,pp512")
    ap.add_argument("-r", "--reps", type=int, default=5, help="rounds (one fresh process per layout each)")
    ap.add_argument("--inner-reps", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args(argv)
    layouts = [parse_layout(x) for x in a.layouts.split(",") if x]
    tests = [t for t in a.tests.split(",") if t]
    results: dict[int, list[dict]] = {i: [] for i in range(len(layouts))}
    for rnd in range(a.reps):
        for i, (nodes, threads, emap) in enumerate(layouts):
            rec = run_ours_once(a.model, nodes * threads, tests, a.inner_reps, DEFAULT_NOISE, numa_nodes=nodes,
                                expert_map=emap, timeout=a.timeout)
            results[i].append(rec)
            print(f"round {rnd + 1} {nodes}x{threads}:{emap}: " + ", ".join(
                f"{t} {statistics.median(v['samples_ts']):.2f} t/s" for t, v in rec["tests"].items()),
                file=sys.stderr)
    print("| layout | " + " | ".join(f"{t} t/s | vs first | imbalance | waits" for t in tests) + " |")
    print("| --- |" + " ---: | ---: | ---: | ---: |" * len(tests))
    first = {}
    for i, (nodes, threads, emap) in enumerate(layouts):
        cells = []
        for t in tests:
            ts = [v for r in results[i] for v in r["tests"][t]["samples_ts"]]
            imb = [v for r in results[i] for v in r["tests"][t].get("imbalance") or []]
            wf = [v for r in results[i] for v in r["tests"][t].get("wait_frac") or []]
            med = statistics.median(ts)
            first.setdefault(t, med)
            cells.append(f"{med:.2f} [{min(ts):.2f}–{max(ts):.2f}] | {med / first[t]:.3f} | "
                         f"{statistics.median(imb):.3f} | {100 * statistics.median(wf):.1f}%")
        print(f"| {nodes} node(s) x {threads} thread(s), {emap} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
