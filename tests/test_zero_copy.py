"""Zero-copy placement (NodeStore zero_copy, numa.memory.FileMapping): where placement
moves nothing (one node), shards that are plain file ranges are views of a copy-on-write
mapping of the GGUF instead of copies. The engine computes the same, every byte is still
accounted for (placed, mapped or copied), run-time writes never reach the file, the block
check still runs, and it is refused across real NUMA nodes."""
import hashlib

import numpy as np
import pytest

import moe_numa
from moe_numa.engine.backend import BEHIND_MIN_BYTES, _zero_copy
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


@pytest.mark.parametrize("zero_copy", [True, "behind"])
def test_weights_cache_wins_over_zero_copy(make_model, tmp_path, zero_copy):
    with moe_numa.load(make_model("qwen3moe", "q8_0"), backend="engine", numa_nodes=1, zero_copy=zero_copy,
                       weights_cache=str(tmp_path)) as m:
        ld = m.placement_report()["load"]
        assert ld["mapped_bytes"] == 0 and ld["weights_cache"]["built_nodes"] == [0]
        assert ld["mode"] == "weights_cache" and ld["behind"] is None


def test_zero_copy_modes_and_refusals():
    nodes = tuple(Node(k, (k,), (k,), memory_node=k) for k in range(2))
    two = Topology(nodes, real_nodes=2)
    big = BEHIND_MIN_BYTES
    assert _zero_copy(None, two, big) == "copy"
    for want in (True, "behind"):
        with pytest.raises(MoeNumaError, match=r"zero_copy=.* needs one NUMA node"):
            _zero_copy(want, two, big)
    one = Topology(nodes[:1], real_nodes=1)
    # a large file on one node: mapped, then copied behind; a small one is just copied
    assert _zero_copy(None, one, big) == "behind" and _zero_copy(None, one, big - 1) == "copy"
    assert _zero_copy(True, one) == "map" and _zero_copy(False, one, big) == "copy"
    assert _zero_copy("behind", one) == "behind"
    with pytest.raises(MoeNumaError, match="zero_copy must be True, False, None or 'behind', got 'mirror'"):
        _zero_copy("mirror", one)


# ------------------------------------------------------------ placed behind the first token

def _vma(addr):
    """The /proc/self/maps line of the mapping that holds addr: (start, end, pathname)."""
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi:
            return lo, hi, parts[5] if len(parts) > 5 else ""
    raise AssertionError(f"no mapping holds {addr:#x}")


def _wait_for(cond, timeout=30.0):
    import time
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


@pytest.fixture
def slow_behind(monkeypatch):
    """Background placement in 2 MiB runs; from the second run on, each waits for the test
    to open the gate, so that the test runs with part of the file moved and part mapped."""
    import threading
    from moe_numa.engine.backend import NodeStore
    from moe_numa.numa.memory import HUGE, FileMapping
    monkeypatch.setattr(NodeStore, "BEHIND_RUN", HUGE)
    calls = {"n": 0, "fail_at": None, "gate": threading.Event()}
    real = FileMapping.place_behind

    def place_behind(self, lo, hi, node):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise OSError(12, "no memory (test)")
        if calls["n"] > 1:
            assert calls["gate"].wait(60)
        return real(self, lo, hi, node)
    monkeypatch.setattr(FileMapping, "place_behind", place_behind)
    return calls


@pytest.mark.parametrize("preset,qtype", [("qwen3moe", "q8_0"), ("deepseek-v3", "q4_k")])
def test_placed_behind_computes_the_same_before_during_and_after(make_model, preset, qtype, slow_behind):
    path = make_model(preset, qtype)
    before = _sha(path)
    with moe_numa.load(path, backend="engine", numa_nodes=1, zero_copy=False) as copied:
        want = copied.logits(IDS)
    with moe_numa.load(path, backend="engine", numa_nodes=1, zero_copy="behind") as m:
        store = m.backend.store
        keys = _mapped_keys(store)
        fm = store.file_maps[m.gguf.paths[0]]
        addrs = {k: store.arrays[k].ctypes.data for k in keys}
        assert m.placement_report()["load"]["mode"] == "behind"
        np.testing.assert_array_equal(m.logits(IDS), want)          # while the copy goes on
        assert not store.behind["finished"] and store.behind["runs"] > 1
        slow_behind["gate"].set()
        assert m.wait_placed(timeout=60)
        np.testing.assert_array_equal(m.logits(IDS), want)          # from the copy
        b = m.placement_report()["load"]["behind"]
        assert b["finished"] and b["error"] is None and b["done_bytes"] == b["bytes"] >= sum(
            store.items[k].nbytes for k in keys)
        assert m.placement_report()["nodes"][0]["file_mapped_bytes"] == 0
        for k in keys:   # the same addresses, now anonymous memory, not the file
            arr = store.arrays[k]
            assert arr.ctypes.data == addrs[k] == fm.addr + store.items[k].src[1]
            for a in (arr.ctypes.data, arr.ctypes.data + arr.nbytes - 1):
                assert _vma(a)[2] == "", (k, _vma(a))
        if store.arenas[0].bound:
            pages = [p for p in m.backend.check_pages(sample=0) if p["key"] in {k[1] for k in keys}]
            assert pages and all(p["on_node"] == p["pages"] > 0 for p in pages)
    assert _sha(path) == before


def test_placed_behind_with_rebalance_swaps_meanwhile(make_model, slow_behind):
    """The rebalancer's swaps write into the shards while runs are copied and moved: none
    may land in a copy already taken (the store's write lock)."""
    path = make_model("qwen3moe", "q8_0")
    opts = dict(backend="engine", numa_nodes=2, expert_map="contiguous")
    with moe_numa.load(path, zero_copy=False, **opts) as copied:
        copied.logits(IDS * 8)
        swaps_want = copied.backend.rebalance(min_tokens=1, tolerance=0.0)
        want = copied.logits(IDS)
    import threading
    with moe_numa.load(path, zero_copy="behind", **opts) as m:
        m.logits(IDS * 8)
        b = m.backend.store.behind
        _wait_for(lambda: b["done_bytes"] > 0)   # the first run moved, the second held at the gate
        assert b["done_bytes"] < b["bytes"]
        # the swaps wait for the run in hand (held at the gate), then go between runs
        threading.Timer(0.3, slow_behind["gate"].set).start()
        swaps = m.backend.rebalance(min_tokens=1, tolerance=0.0)
        assert swaps == swaps_want and any(r["swaps"] for r in swaps.values())
        np.testing.assert_array_equal(m.logits(IDS), want)
        assert m.wait_placed(timeout=60)
        np.testing.assert_array_equal(m.logits(IDS), want)


def test_placed_behind_stops_cleanly_on_close_and_on_error(make_model, slow_behind):
    path = make_model("qwen3moe", "q8_0")
    m = moe_numa.load(path, backend="engine", numa_nodes=1, zero_copy="behind")
    import threading
    thread = m.backend.store._behind_thread
    threading.Timer(0.3, slow_behind["gate"].set).start()
    m.close()                                  # mid-placement: the thread stops after its run
    assert not thread.is_alive() and not m.backend.store.behind["finished"]
    with moe_numa.load(path, backend="engine", numa_nodes=1, zero_copy=False) as copied:
        want = copied.logits(IDS)
    slow_behind["n"], slow_behind["fail_at"] = 0, 2
    with moe_numa.load(path, backend="engine", numa_nodes=1, zero_copy="behind") as m:
        assert m.wait_placed(timeout=60) is False   # stopped: the rest stays mapped, and reads the same
        b = m.placement_report()["load"]["behind"]
        assert not b["finished"] and "no memory (test)" in b["error"] and 0 < b["done_bytes"] < b["bytes"]
        assert m.placement_report()["nodes"][0]["file_mapped_bytes"] > 0
        np.testing.assert_array_equal(m.logits(IDS), want)
