"""Placement report for the NUMA engine: resident weight memory against the
GGUF's weight bytes (one copy, no copy per node), what is replicated, bytes per
node, and cross-node synchronisations per decoded token, at several node counts.

    python -m moe_numa.bench.placement -m MODEL.gguf [--nodes 1,2,4] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def measure(path: str, n_nodes: int, decode_tokens: int = 8) -> dict:
    import moe_numa
    from moe_numa.numa.memory import resident_bytes
    before = resident_bytes().get("RssAnon", 0)
    model = moe_numa.load(path, numa_nodes=n_nodes)
    try:
        b = model.backend
        rep = model.placement_report()
        anon = resident_bytes().get("RssAnon", 0) - before
        b.reset()
        b.forward(np.array([1], dtype=np.int32), all_logits=False)
        b.reset_counters()
        for i in range(decode_tokens):
            b.forward(np.array([i + 2], dtype=np.int32), all_logits=False)
        syncs = b.counters()["syncs"] / decode_tokens
        cfg = model.config
        # The embedding is read from the file map, one row per token, instead of being
        # placed; count it whole (as if resident) unless the output head is tied to it.
        embd = model.gguf.tensor("token_embd.weight").nbytes
        tied = "output.weight" not in model.gguf.tensors
        gguf_weights = rep["gguf_weight_bytes"]
        resident_weights = rep["placed_weight_bytes"] + (0 if tied else embd)
        return {
            "nodes": n_nodes, "gguf_weight_bytes": gguf_weights, "embedding_bytes": embd,
            "placed_weight_bytes": rep["placed_weight_bytes"], "replicated_bytes": rep["replicated_bytes"],
            "kv_cache_bytes": rep["kv_cache_bytes"], "rss_anon_delta": anon,
            "resident_vs_gguf": resident_weights / gguf_weights,
            "per_node": [sum(n["bytes_by_class"].get(c, 0) for c in n["bytes_by_class"] if c != "kv_cache")
                         for n in rep["nodes"]],
            "syncs_per_token": syncs, "n_layer": cfg.n_layer,
            # 2 per layer + 1 for the head; on several nodes one more per MoE layer (its router runs once,
            # each node a share of its rows)
            "syncs_bound": 2 * cfg.n_layer + 1 + (sum(map(cfg.is_moe_layer, range(cfg.n_layer))) if n_nodes > 1 else 0),
        }
    finally:
        model.close()


def format_table(rows: list[dict]) -> str:
    gib = 2 ** 30
    lines = ["| nodes | GGUF weights | placed in node memory | replicated | placed + file-mapped embedding vs GGUF "
             "| anon RSS after load | per node (GiB) | syncs / decoded token (bound 2L+1, + MoE layers on 2+ nodes) |",
             "|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['gguf_weight_bytes'] / gib:.3f} GiB | {r['placed_weight_bytes'] / gib:.3f} GiB | "
            f"{r['replicated_bytes'] / 2**20:.1f} MiB | {100 * (r['resident_vs_gguf'] - 1):+.2f}% | "
            f"{r['rss_anon_delta'] / gib:.3f} GiB | {', '.join(f'{b / gib:.2f}' for b in r['per_node'])} | "
            f"{r['syncs_per_token']:.0f} ({r['syncs_bound']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_numa.bench.placement", description=__doc__)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--nodes", default="1,2,4", help="node counts (virtual nodes where the machine has fewer)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [measure(args.model, int(n)) for n in args.nodes.split(",")]
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
