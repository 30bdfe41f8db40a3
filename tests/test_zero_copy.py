"""Zero-copy placement (NodeStore zero_copy, numa.memory.FileMapping): where placement
moves nothing (one node), shards that are plain file ranges are views of a copy-on-write
mapping of the GGUF instead of copies. The engine computes the same, every byte is still
accounted for (placed, mapped or copied), run-time writes never reach the file, the block
check still runs, and it is refused across real NUMA nodes."""
import hashlib

import numpy as np
import pytest

import moe_numa
from moe_numa.engine.backend import _zero_copy
from moe_numa.errors import GGUFError, MoeNumaError
from moe_numa.numa.topology import Node, Topology

IDS = list(range(3, 15))


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _mapped_keys(store):
    return {k for k, it in store.items.items() if it.src is not None}


@pytest.mark.parametrize("preset,qtype", [("qwen3moe", "q8_0"), ("deepseek-v3", "q4_k")])
def test_one_node_maps_the_file_and_computes_the_same(make_model, preset, qtype):
    path = make_model(preset, qtype)
    with moe_numa.load(path, backend="engine", numa_nodes=1, zero_copy=False) as copied:
        want = copied.logits(IDS)
        rep_c = copied.placement_report()
        copy_arena = copied.backend.store.arenas[0].size
        assert rep_c["load"]["mapped_bytes"] == 0
    with moe_numa.load(path, backend="engine", numa_nodes=1, zero_copy=True) as m:
        store = m.backend.store
        ld = m.placement_report()["load"]
        keys = _mapped_keys(store)
        mapped = sum(store.items[k].nbytes for k in keys)
        assert keys and {k for k, it in store.items.items() if it.mapped} == keys
        assert ld["mapped_bytes"] == mapped
        # the rest (norms as float32, caches) is what the arena holds
        assert ld["copied_bytes"] == sum(it.nbytes for k, it in store.items.items()
                                         if it.fill is not None and k not in keys)
        assert ld["bytes"] == ld["copied_bytes"] + mapped == rep_c["load"]["bytes"]
        arena = store.arenas[0]
        fm = store.file_maps[m.gguf.paths[0]]
        for k in keys:   # a view of the file mapping at the tensor's own bytes, not of the arena
            arr = store.arrays[k]
            path_, off = store.items[k].src
            assert arr.ctypes.data == fm.addr + off
            assert not arena.addr <= arr.ctypes.data < arena.addr + arena.size
        assert copy_arena - arena.size >= mapped - 4096   # the weights were not allocated again (page rounding)
        rep = m.placement_report()
        assert rep["nodes"][0]["file_mapped_bytes"] == mapped
        assert rep["nodes"][0]["bytes_by_class"] == rep_c["nodes"][0]["bytes_by_class"]
        assert rep["placed_weight_bytes"] == rep_c["placed_weight_bytes"]
        np.testing.assert_array_equal(m.logits(IDS), want)
        if arena.bound:   # the mapped pages are there, on the one node
            pages = [p for p in m.backend.check_pages(sample=0) if p["key"] in {k[1] for k in keys}]
            assert pages and all(p["on_node"] == p["pages"] > 0 for p in pages)


def test_writes_to_mapped_weights_never_reach_the_file(make_model):
    """Virtual nodes over one real node may map too (zero_copy=True): an expert swap at
    rebalance (whole experts: split ones stay) writes into mapped shards, copied on write."""
    path = make_model("qwen3moe", "q8_0")
    before = _sha(path)
    with moe_numa.load(path, backend="engine", numa_nodes=2, zero_copy=False, expert_map="contiguous") as copied:
        copied.logits(IDS * 8)
        copied.backend.rebalance(min_tokens=1, tolerance=0.0)
        want = copied.logits(IDS)
    with moe_numa.load(path, backend="engine", numa_nodes=2, zero_copy=True, expert_map="contiguous") as m:
        assert m.placement_report()["load"]["mapped_bytes"] > 0
        m.logits(IDS * 8)
        rep = m.backend.rebalance(min_tokens=1, tolerance=0.0)
        assert any(r["swaps"] for r in rep.values())
        np.testing.assert_array_equal(m.logits(IDS), want)
        store = m.backend.store
        # the swapped shards keep their accounting: still every mapped byte, once
        assert sum(n["file_mapped_bytes"] for n in m.placement_report()["nodes"]) == \
            m.placement_report()["load"]["mapped_bytes"]
        moved = [k for k, it in store.items.items() if it.mapped and it.cls == "routed_experts"]
        store.arrays[moved[0]][...] = 0
    assert _sha(path) == before


def test_block_check_runs_on_mapped_shards(make_model, tmp_path):
    from test_check_tensors import corrupt
    src = make_model("qwen3moe", "q8_0")
    dst = tmp_path / "bad.gguf"
    per_row, blk = corrupt(src, dst, "blk.1.ffn_down_exps.weight", row=70, block=1)
    with pytest.raises(GGUFError, match=rf"blk\.1\.ffn_down_exps\.weight.*block {70 * per_row + blk} "):
        moe_numa.load(dst, backend="engine", numa_nodes=1, check_tensors=True, zero_copy=True)


def test_weights_cache_wins_over_zero_copy(make_model, tmp_path):
    with moe_numa.load(make_model("qwen3moe", "q8_0"), backend="engine", numa_nodes=1, zero_copy=True,
                       weights_cache=str(tmp_path)) as m:
        ld = m.placement_report()["load"]
        assert ld["mapped_bytes"] == 0 and ld["weights_cache"]["built_nodes"] == [0]


def test_zero_copy_is_refused_across_real_nodes():
    nodes = tuple(Node(k, (k,), (k,), memory_node=k) for k in range(2))
    two = Topology(nodes, real_nodes=2)
    assert _zero_copy(None, two) is False
    with pytest.raises(MoeNumaError, match="zero_copy=True needs one NUMA node"):
        _zero_copy(True, two)
    one = Topology(nodes[:1], real_nodes=1)
    # copied by default (decode reads the arenas' huge pages), mapped when asked
    assert _zero_copy(None, one) is False and _zero_copy(True, one) is True
