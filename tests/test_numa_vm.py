"""Placement on a kernel with real NUMA nodes: ../shared/numa-vm boots a QEMU
guest with 2 or 4 nodes (AVX2 only, emulated, slow) and runs the placement
check there: every page of every expert on the node the map gives (also after
the rebalancer moved hot experts), including split slices and replicas (also
the replicas the rebalancer made within the budget), TP shards on their nodes, pool threads only on their node's CPUs, and the engine's
logits (AVX2 kernels) against the reference."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO.parent / "shared" / "numa-vm" / "run"

pytestmark = [pytest.mark.numa_vm, pytest.mark.skipif(not RUN.exists(), reason="../shared/numa-vm is not present")]


MIXED = ("model: {n_expert: 8}\nnodes: [0, 1]\nexperts: {0: 2-4, 1: 5-7, 0+1: 0-1}\n"
         "replicas: [{layer: 0, expert: 3, nodes: [1]}, {layer: 1, expert: 6, nodes: [0]}]\n")


@pytest.mark.parametrize("nodes,preset,mixed", [(2, "qwen3moe", False), (4, "deepseek-v3", False),
                                                (2, "qwen3moe", True)])
def test_placement_on_real_numa_nodes(nodes, preset, mixed):
    map_arg = ["--rebalance"] if nodes == 2 else []
    if nodes == 2 and not mixed:   # whole experts, which the rebalancer swaps (the default splits them)
        map_arg += ["--expert-map", "contiguous"]
    if mixed:   # split and replicated experts, then a rebalance that adds replicas within the budget
        map_path = REPO / "expert_maps" / "test-qwen3moe-mixed.yaml.tmp"
        map_path.write_text(MIXED)
        map_arg += ["--expert-map", str(map_path), "--replica-budget", "40%"]
    if nodes == 4:
        map_path = REPO / "expert_maps" / "test-deepseek-v3-4node.yaml.tmp"
        map_path.write_text("model: {n_expert: 16}\nnodes: [0, 1, 2, 3]\n"
                            "experts: {0: 0-3, 1: 4-7, 2: 8-11, 3: 12-15}\nlayers: {2: {3: 0-7, 1: 8-15}}\n")
        map_arg += ["--expert-map", str(map_path)]
    cmd = [str(RUN), "--nodes", str(nodes), "--timeout", "600", "--",
           "python3", "-m", "moe_numa.numa.check", "--preset", preset, "--type", "q8_0", "--json",
           "--compare-reference", *map_arg]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    if nodes == 4 or mixed:
        map_path.unlink()
    line = next((l for l in proc.stdout.splitlines() if l.startswith("{")), None)
    assert line, f"no result from the guest (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    r = json.loads(line)
    assert r["real_nodes"] == nodes and all(r["bound"])
    assert r["expert_shards"] > 0 and r["expert_pages_on_node"] == r["expert_pages"]
    assert r["experts_on_mapped_node"]
    if nodes == 2 and not mixed:
        assert r["rebalance_swaps"] > 0        # experts moved at run time are on their new node too
    if mixed:
        modes = r["expert_modes"]            # after the rebalance: split experts stay split
        assert modes["split"] == 4 and sum(modes.values()) == 16 and modes["replicated"] >= 1
        assert r["rebalance_replicated"] > 0   # copies made at run time are on their node too
        for cls in ("expert_replicas",):
            c = r["pages_by_class"][cls]
            assert c["on_node"] == c["pages"] > 0
        assert r["report"]["replica_bytes"] <= r["report"]["replica_budget_bytes"]
    assert not r["misplaced"], r["misplaced"]
    assert not r["misplaced_before_rebalance"], r["misplaced_before_rebalance"]
    for cls in ("attention", "routed_experts", "kv_cache", "output"):
        c = r["pages_by_class"][cls]
        assert c["on_node"] == c["pages"] > 0
    assert r["pool_threads_pinned"] >= nodes - 1 and r["thread_cpu_ok"]
    for p in r["pools"]:
        assert set(p["cpus"]) <= set(p["node_cpus"])
    assert r["argmax_agree"] >= 0.75 and r["max_abs_diff_vs_reference"] < 0.1 * r["logit_scale"]
    assert proc.returncode == 0


def test_weights_cache_on_real_numa_nodes(tmp_path_factory):
    """Build the placed-weights cache on a 2-node guest, then restart from it: both times
    every shard's pages (the cached images' tmpfs pages, and experts the rebalancer moved,
    copied on write) are on their node, and the logits match the reference."""
    from moe_numa.testing import make_test_model
    model = REPO / "expert_maps" / "test-weights-cache-model.gguf.tmp"
    make_test_model(model, "qwen3moe", "q8_0")
    one = (f"python3 -m moe_numa.numa.check -m {model} --weights-cache /dev/shm/wc --json --compare-reference "
           "--rebalance --expert-map contiguous")
    cmd = [str(RUN), "--nodes", "2", "--timeout", "600", "--", "bash", "-c", f"mkdir /dev/shm/wc && {one} && {one}"]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    finally:
        model.unlink()
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 2, f"rc {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for r, built in zip(lines, ([0, 1], [])):
        wc = r["report"]["load"]["weights_cache"]
        assert r["real_nodes"] == 2 and all(r["bound"]) and wc["built_nodes"] == built
        assert r["expert_pages_on_node"] == r["expert_pages"] > 0 and not r["misplaced"], r["misplaced"]
        assert r["rebalance_swaps"] > 0 and r["argmax_agree"] >= 0.75
        assert r["max_abs_diff_vs_reference"] <= 0.1 * r["logit_scale"]
