"""Balance benchmark: our engine in several layouts and placements on one file,
fresh processes alternating A B C A B C..., so every layout sees the same
machine. Prints the medians of each test, the ratio to the first layout, and
the node balance (imbalance = critical path ÷ mean node busy time; waits =
share of node time spent waiting on the slowest node).

    python -m moe_numa.bench.balance -m bench.gguf \\
        --layouts 1x2:contiguous,2x1:contiguous,2x1:split,2x1:map.yaml --tests tg64,pp512 -r 5

A layout is NODESxTHREADS:MAP (MAP: contiguous, round-robin, split or a YAML file).

``--paired`` measures each layout against the first *in one process*: both are
loaded side by side (twice the weights in memory) and their runs interleave
(A B B A ...), so each round's ratio compares runs seconds apart. Use it where
the machine's read bandwidth drifts between processes, as in this VM, where
fresh-process medians swing by a third and hide a 3% difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from .bench import DEFAULT_NOISE, run_ours_once
from .run_ours import _Runner, parse_tests


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
    ap.add_argument("--paired", action="store_true",
                    help="each layout against the first in one process, runs interleaved (see above)")
    a = ap.parse_args(argv)
    layouts = [parse_layout(x) for x in a.layouts.split(",") if x]
    tests = [t for t in a.tests.split(",") if t]
    if a.paired:
        return paired(a.model, layouts, tests, a.reps)
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


def _load(model_path: str, layout: tuple[int, int, str], n_ctx: int):
    import moe_numa
    nodes, threads, emap = layout
    return moe_numa.load(model_path, numa_nodes=nodes, threads_per_node=threads, expert_map=emap, n_ctx=n_ctx,
                         rebalance_every=None)


def _timed(model, runner: _Runner, n_prompt: int, n_gen: int) -> dict:
    """One warm-up token, then the test from an empty cache: tokens/s and the node balance."""
    import time
    model.backend.reset()
    runner.gen(1)
    model.backend.reset()
    model.backend.reset_counters()
    t0 = time.perf_counter_ns()
    runner.prompt(n_prompt) if n_prompt else runner.gen(n_gen)
    ns = time.perf_counter_ns() - t0
    c = model.backend.counters()
    wait, busy = sum(c["node_wait_ns"]), sum(c["node_busy_ns"])
    return {"ts": (n_prompt + n_gen) / (ns * 1e-9), "imbalance": c["imbalance"],
            "wait_frac": wait / max(1, wait + busy)}


def paired(model_path: str, layouts: list, tests: list[str], rounds: int) -> int:
    """Each layout after the first is loaded beside the first in this process; per round and
    test both run, the order alternating, and the round's ratio is B/A."""
    specs = parse_tests(tests)
    n_ctx = -(-max(p + g for _, p, g in specs) // 256) * 256 + 256
    ref = layouts[0]
    rows = []
    for lay in layouts[1:]:
        a = _load(model_path, ref, n_ctx)
        try:
            b = _load(model_path, lay, n_ctx)
            try:
                tok = a.tokenizer
                bos = tok.bos_id if getattr(tok, "add_bos", False) else None
                res = {t: {"a": [], "b": []} for t, _, _ in specs}
                for rnd in range(rounds):
                    for name, n_prompt, n_gen in specs:
                        order = (("a", a), ("b", b)) if rnd % 2 == 0 else (("b", b), ("a", a))
                        for key, m in order:   # the same token ids for both engines
                            res[name][key].append(_timed(m, _Runner(m.backend, m.config.n_vocab, bos, rnd),
                                                         n_prompt, n_gen))
                        ra, rb = res[name]["a"][-1], res[name]["b"][-1]
                        print(f"round {rnd + 1} {name}: {ref[0]}x{ref[1]}:{ref[2]} {ra['ts']:.2f} t/s, "
                              f"{lay[0]}x{lay[1]}:{lay[2]} {rb['ts']:.2f} t/s, ratio {rb['ts'] / ra['ts']:.3f}",
                              file=sys.stderr, flush=True)
            finally:
                b.close()
        finally:
            a.close()
        rows.append((lay, res))
    from moe_numa import kernels as K
    from .bench import _lscpu, cpu_label
    print(f"CPU: {cpu_label(_lscpu())}, SIMD {K.simd_level()}\n")
    print(f"Paired in one process ({rounds} rounds, runs interleaved): each layout against "
          f"{ref[0]} node(s) x {ref[1]} thread(s), {ref[2]}; ratio = median of the rounds' B/A [range].\n")
    print("| layout | " + " | ".join(f"{t} t/s (B / A) | ratio | imbalance | waits" for t in tests) + " |")
    print("| --- |" + " ---: | ---: | ---: | ---: |" * len(tests))
    for lay, res in rows:
        cells = []
        for t in tests:
            ra, rb = res[t]["a"], res[t]["b"]
            ratios = [y["ts"] / x["ts"] for x, y in zip(ra, rb)]
            cells.append(f"{statistics.median(r['ts'] for r in rb):.2f} / {statistics.median(r['ts'] for r in ra):.2f}"
                         f" | {statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}]"
                         f" | {statistics.median(r['imbalance'] for r in rb):.3f}"
                         f" | {100 * statistics.median(r['wait_frac'] for r in rb):.1f}%")
        print(f"| {lay[0]} node(s) x {lay[1]} thread(s), {lay[2]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
