"""Proof of placement on a real multi-NUMA kernel: where every shard's pages
really are (move_pages), and which CPUs every pool thread may run on and last
ran on. `moe-numa check-placement` and the numa-vm test use it.

    python -m moe_numa.numa.check [-m MODEL | --preset P] [--expert-map FILE] [--numa-nodes N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading

import numpy as np


def _thread_cpus() -> dict[int, dict]:
    """tid -> {"allowed": [cpus], "last_cpu": cpu} for every thread of this process."""
    from .topology import parse_cpulist
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                status = f.read()
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        allowed = next(line.split(":", 1)[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = {"allowed": parse_cpulist(allowed), "last_cpu": int(fields[36])}
    return out


def check(model, run_tokens: int = 8, rebalance: bool = False) -> dict:
    """Placement facts of a model loaded with the engine backend. With
    `rebalance`, hot experts are first moved between nodes (any imbalance), so
    the check also covers experts that changed node at run time."""
    backend = model.backend
    before = _thread_cpus()
    # Run a few tokens so every pool thread has run on its CPU at least once.
    model.logits(list(range(1, run_tokens + 1)))
    swaps = replicated = 0
    misplaced_before = []
    if rebalance:
        misplaced_before = [p for p in backend.check_pages(sample=0) if p["on_node"] != p["pages"]][:20]
        report = backend.rebalance(min_tokens=1, tolerance=0.0)
        swaps = sum(len(r["swaps"]) for r in report.values())
        replicated = sum(len(r["replicated"]) for r in report.values())
        model.logits(list(range(1, run_tokens + 1)))
    threads = _thread_cpus()
    main = threading.get_native_id()
    pools = []
    for k, pool in enumerate(backend.pools):
        node_cpus = sorted(backend.topology.nodes[k].cpus)
        pools.append({"node": k, "cpus": pool.cpus, "node_cpus": node_cpus,
                      "caller_is_worker0": pool.caller_is_worker0})
    pool_threads = [{"tid": tid, **info} for tid, info in threads.items() if tid != main and tid in before]
    all_pool_cpus = {c for p in pools for c in p["cpus"]}
    pinned = [t for t in pool_threads if len(t["allowed"]) == 1 and t["allowed"][0] in all_pool_cpus]
    pages = backend.check_pages(sample=0)
    by_class: dict[str, dict] = {}
    for p in pages:
        c = by_class.setdefault(p["class"], {"shards": 0, "pages": 0, "on_node": 0})
        c["shards"] += 1
        c["pages"] += p["pages"]
        c["on_node"] += p["on_node"]
    experts = [p for p in pages if p["class"] in ("routed_experts", "expert_replicas")]
    emap = backend.plan.expert_map
    # whole, split slice or replica: the shard's node is one the map gives the expert
    expert_nodes_ok = all(
        p["node"] in emap.holders(int(p["key"].split(".")[0][1:]), int(p["key"].split(".")[1][1:])) for p in experts)
    modes = {}
    for layer, lp in enumerate(backend.plan.layers):
        if any(lp.experts):
            for e in range(emap.n_expert):
                m = emap.mode(layer, e)
                modes[m] = modes.get(m, 0) + 1
    return {
        "topology": backend.topology.describe(),
        "real_nodes": backend.topology.real_nodes,
        "bound": [a.bound for a in backend.store.arenas],
        "pages_by_class": by_class,
        "expert_shards": len(experts),
        "expert_pages": sum(p["pages"] for p in experts),
        "expert_pages_on_node": sum(p["on_node"] for p in experts),
        "experts_on_mapped_node": expert_nodes_ok,
        "rebalance_swaps": swaps,
        "rebalance_replicated": replicated,
        "expert_modes": modes,
        "misplaced": [p for p in pages if p["on_node"] != p["pages"]][:20],
        "misplaced_before_rebalance": misplaced_before,
        "pools": pools,
        "pool_threads": pool_threads,
        "pool_threads_pinned": len(pinned),
        "thread_cpu_ok": all(t["last_cpu"] in t["allowed"] for t in pinned),
        "report": {k: v for k, v in backend.placement_report().items() if k not in ("topology",)},
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-m", "--model")
    ap.add_argument("--preset", default="qwen3moe")
    ap.add_argument("--type", default="q8_0")
    ap.add_argument("--expert-map")
    ap.add_argument("--numa-nodes", type=int)
    ap.add_argument("--compare-reference", action="store_true", help="also check logits against the reference")
    ap.add_argument("--rebalance", action="store_true", help="move hot experts between nodes first")
    ap.add_argument("--replica-budget", help="memory for expert replicas: a fraction (0.05), 5%%, or a size (2GiB)")
    ap.add_argument("--weights-cache", metavar="DIR", help="load through the placed-weights cache in DIR")
    ap.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import moe_numa
    from moe_numa.testing import make_test_model
    path = args.model
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory()
        path = str(make_test_model(os.path.join(tmp.name, "m.gguf"), args.preset, args.type))
    model = moe_numa.load(path, backend="engine", expert_map=args.expert_map, numa_nodes=args.numa_nodes,
                          replica_budget=args.replica_budget, weights_cache=args.weights_cache)
    result = check(model, rebalance=args.rebalance)
    if args.compare_reference:
        ids = list(range(1, 9))
        ref = moe_numa.load(path, backend="reference", act_quant=True)
        a, b = model.logits(ids), ref.logits(ids)
        result["max_abs_diff_vs_reference"] = float(np.abs(a - b).max())
        result["logit_scale"] = float(np.abs(b).max())
        result["argmax_agree"] = float((a.argmax(-1) == b.argmax(-1)).mean())
    model.close()
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(result["topology"])
        for cls, c in result["pages_by_class"].items():
            print(f"  {cls:<16} {c['shards']:5d} shards  {c['on_node']}/{c['pages']} pages on their node")
        print(f"  pool threads pinned to their node: {result['pool_threads_pinned']}/{len(result['pool_threads'])}")
    ok = (not result["misplaced"] and not result["misplaced_before_rebalance"] and result["experts_on_mapped_node"]
          and result["thread_cpu_ok"])
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-numa check-placement", description=__doc__)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
