"""Placement on a kernel with real NUMA nodes: ../shared/numa-vm boots a QEMU
guest with 2 or 4 nodes (AVX2 only, emulated, slow) and runs the placement
check there: every page of every expert on the node the map gives (also after
the rebalancer moved hot experts), including split slices and replicas (also
the replicas the rebalancer made within the budget), TP shards on their nodes, pool threads only on their node's CPUs, and the engine's
logits (AVX2 kernels) against the reference."""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO.parent / "shared" / "numa-vm" / "run"

pytestmark = [pytest.mark.numa_vm, pytest.mark.skipif(not RUN.exists(), reason="../shared/numa-vm is not present")]


MIXED = ("model: {n_expert: 8}\nnodes: [0, 1]\nexperts: {0: 2-4, 1: 5-7, 0+1: 0-1}\n"
         "replicas: [{layer: 0, expert: 3, nodes: [1]}, {layer: 1, expert: 6, nodes: [0]}]\n")
FOUR_NODES = ("model: {n_expert: 16}\nnodes: [0, 1, 2, 3]\n"
              "experts: {0: 0-3, 1: 4-7, 2: 8-11, 3: 12-15}\nlayers: {2: {3: 0-7, 1: 8-15}}\n")
CHECK = "python3 -m moe_numa.numa.check --json --compare-reference"


@pytest.fixture
def guest_dir():
    """A scratch directory the guest can read: under the checkout (the guest mounts our / but
    has its own /tmp), ignored by git, removed afterwards. Models are written here on the
    host, where it takes a second; under the guest's emulation it takes half a minute."""
    d = Path(tempfile.mkdtemp(prefix=".numa-vm-", dir=REPO))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_guest(nodes: int, script: str) -> list[dict]:
    """Boot a guest with `nodes` real NUMA nodes, run the bash `script` there, and return
    the JSON lines the checks printed, in order."""
    cmd = [str(RUN), "--nodes", str(nodes), "--timeout", "600", "--", "bash", "-c", f"set -e\n{script}"]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert proc.returncode == 0 and lines, \
        f"guest rc {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return lines


def check_placed(r: dict, nodes: int) -> None:
    """Every page of every shard on its node, pools pinned there, logits as the reference's."""
    assert r["real_nodes"] == nodes and all(r["bound"])
    assert r["expert_shards"] > 0 and r["expert_pages_on_node"] == r["expert_pages"] > 0
    assert r["experts_on_mapped_node"]
    assert not r["misplaced"], r["misplaced"]
    assert not r["misplaced_before_rebalance"], r["misplaced_before_rebalance"]
    for cls in ("attention", "routed_experts", "kv_cache", "output"):
        c = r["pages_by_class"][cls]
        assert c["on_node"] == c["pages"] > 0
    assert r["pool_threads_pinned"] >= nodes - 1 and r["thread_cpu_ok"]
    for p in r["pools"]:
        assert set(p["cpus"]) <= set(p["node_cpus"])
    assert r["argmax_agree"] >= 0.75 and r["max_abs_diff_vs_reference"] < 0.1 * r["logit_scale"]


def test_two_real_numa_nodes(guest_dir):
    """One 2-node guest runs, in turn:
    - whole experts copied into node memory, which the rebalancer swaps at run time: moved
      experts are on their new node;
    - the placed-weights cache, built with the same map, then restarted from: both times every
      shard's pages (the cached images' tmpfs pages, and experts the rebalancer moved, copied
      on write) are on their node;
    - split and replicated experts, then a rebalance that adds replicas within the budget."""
    from moe_numa.testing import make_test_model
    model = make_test_model(guest_dir / "qwen3moe.gguf", "qwen3moe", "q8_0")
    (guest_dir / "mixed.yaml").write_text(MIXED)
    whole = f"-m {model} --rebalance --expert-map contiguous"
    script = (f"{CHECK} {whole}\nmkdir /dev/shm/wc\n"
              f"{CHECK} {whole} --weights-cache /dev/shm/wc\n{CHECK} {whole} --weights-cache /dev/shm/wc\n"
              f"{CHECK} -m {model} --rebalance --expert-map {guest_dir / 'mixed.yaml'} --replica-budget 40%\n")
    copied, built, restarted, mixed = run_guest(2, script)
    for r in (copied, built, restarted, mixed):
        check_placed(r, 2)
    for r in (copied, built, restarted):
        assert r["rebalance_swaps"] > 0        # experts moved at run time are on their new node too
    for r, nodes_built in ((built, [0, 1]), (restarted, [])):
        assert r["report"]["load"]["weights_cache"]["built_nodes"] == nodes_built
    modes = mixed["expert_modes"]              # after the rebalance: split experts stay split
    assert modes["split"] == 4 and sum(modes.values()) == 16 and modes["replicated"] >= 1
    assert mixed["rebalance_replicated"] > 0   # copies made at run time are on their node too
    c = mixed["pages_by_class"]["expert_replicas"]
    assert c["on_node"] == c["pages"] > 0
    assert mixed["report"]["replica_bytes"] <= mixed["report"]["replica_budget_bytes"]


def test_four_real_numa_nodes(guest_dir):
    """DeepSeek-V3 (MLA, shared experts, a dense first layer) on a 4-node guest, with a map
    that places one layer's experts differently."""
    from moe_numa.testing import make_test_model
    model = make_test_model(guest_dir / "deepseek-v3.gguf", "deepseek-v3", "q8_0")
    (guest_dir / "four.yaml").write_text(FOUR_NODES)
    (r,) = run_guest(4, f"{CHECK} -m {model} --expert-map {guest_dir / 'four.yaml'}\n")
    check_placed(r, 4)
