"""Loading: node-pinned parallel fill reported in GB/s, and the placed-weights
cache (moe_numa.numa.weights_cache): a cached restart gives the same logits as a
fresh placement, a stale cache (GGUF touched, another expert map) is rebuilt,
a corrupt or half-written file is never used."""
import os
import shutil

import numpy as np
import pytest

import moe_numa
from moe_numa.numa.weights_cache import HEADER, WeightsCacheError

IDS = list(range(7, 19))


@pytest.fixture
def cache_dir(tmp_path):
    # tmpfs where there is one (the real use); any directory works for correctness
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else str(tmp_path)
    d = os.path.join(base, f"moe-numa-test-{os.getpid()}-{tmp_path.name}")
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _load(path, cache_dir=None, **kw):
    return moe_numa.load(path, backend="engine", numa_nodes=2, weights_cache=cache_dir, **kw)


def _files(d):   # images and temp files; the lock file stays
    return sorted(f for f in os.listdir(d) if not f.endswith(".lock"))


def test_load_reports_throughput_and_fills_every_node(make_model):
    with _load(make_model("qwen3moe", "q8_0")) as m:
        ld = m.placement_report()["load"]
        placed = sum(it.nbytes for it in m.backend.store.items.values() if it.fill is not None)
        assert ld["bytes"] == placed > 0
        assert ld["seconds"] > 0 and ld["gb_per_s"] == pytest.approx(placed / ld["seconds"] / 1e9)
        assert ld["weights_cache"] is None


def test_cached_restart_maps_the_same_weights(make_model, cache_dir):
    path = make_model("deepseek-v3", "q4_k")
    with _load(path) as plain:
        want = plain.logits(IDS)
    with _load(path, cache_dir) as first:
        assert first.placement_report()["load"]["weights_cache"]["built_nodes"] == [0, 1]
        np.testing.assert_array_equal(first.logits(IDS), want)
    files = _files(cache_dir)
    assert len(files) == 2 and all(f.endswith(".mnw") for f in files)   # one per node, no temp left
    with _load(path, cache_dir) as second:
        wc = second.placement_report()["load"]["weights_cache"]
        assert wc["hit_nodes"] == [0, 1] and wc["built_nodes"] == []
        np.testing.assert_array_equal(second.logits(IDS), want)
        # caches stay out of the image: a used KV cache is anonymous memory after the prefix
        store = second.backend.store
        for (node, key), it in store.items.items():
            off = store.arrays[(node, key)].ctypes.data - store.arenas[node].addr
            assert (off < store.weight_bytes[node]) == (it.fill is not None)
        # run-time writes (an expert swap) are copied on write: the file is untouched
        before = {f: open(os.path.join(cache_dir, f), "rb").read() for f in files}
        (n1, k1), arr = next((k, a) for k, a in store.arrays.items() if store.items[k].cls == "routed_experts")
        arr[...] = 0
    assert {f: open(os.path.join(cache_dir, f), "rb").read() for f in files} == before
    with _load(path, cache_dir) as third:
        assert third.placement_report()["load"]["weights_cache"]["hit_nodes"] == [0, 1]
        np.testing.assert_array_equal(third.logits(IDS), want)


def test_stale_cache_is_rebuilt(make_model, cache_dir):
    path = make_model("qwen3moe", "q8_0")
    with _load(path, cache_dir) as m:
        want = m.logits(IDS)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))       # touched: identity changed
    with _load(path, cache_dir) as m:
        assert m.placement_report()["load"]["weights_cache"]["built_nodes"] == [0, 1]
        np.testing.assert_array_equal(m.logits(IDS), want)
    with _load(path, cache_dir, expert_map="round-robin") as m:         # another layout
        assert m.placement_report()["load"]["weights_cache"]["built_nodes"] == [0, 1]
        rr = m.logits(IDS)
    with _load(path, cache_dir, expert_map="round-robin") as m:
        assert m.placement_report()["load"]["weights_cache"]["hit_nodes"] == [0, 1]
        np.testing.assert_array_equal(m.logits(IDS), rr)
    assert len(_files(cache_dir)) == 2                                   # stale images replaced, not kept


@pytest.mark.parametrize("damage", ["image", "header", "truncate"])
def test_corrupt_cache_file_is_rejected(make_model, cache_dir, damage, caplog):
    path = make_model("qwen3moe", "q8_0")
    with _load(path, cache_dir) as m:
        want = m.logits(IDS)
    f = os.path.join(cache_dir, _files(cache_dir)[1])
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        if damage == "image":      # a whole region of the image overwritten
            fh.seek(HEADER)
            fh.write(os.urandom(min(size - HEADER, 1 << 20)))
        elif damage == "header":
            fh.write(b"garbage!")
        else:
            fh.truncate(size - 4096)
    with _load(path, cache_dir) as m:
        wc = m.placement_report()["load"]["weights_cache"]
        assert wc["hit_nodes"] == [0] and wc["built_nodes"] == [1] and 1 in wc["rejected"]
        np.testing.assert_array_equal(m.logits(IDS), want)
    assert "rejected" in caplog.text
    with _load(path, cache_dir) as m:   # rebuilt and good again
        assert m.placement_report()["load"]["weights_cache"]["hit_nodes"] == [0, 1]


def test_half_written_cache_is_never_used(make_model, cache_dir, monkeypatch):
    path = make_model("qwen3moe", "q8_0")
    from moe_numa.numa import weights_cache

    def boom(self, store):
        raise RuntimeError("killed while writing")
    monkeypatch.setattr(weights_cache.WeightsCache, "commit", boom)
    with pytest.raises(RuntimeError):
        _load(path, cache_dir)
    assert _files(cache_dir) == []      # temp files removed, nothing published
    monkeypatch.undo()
    # a build killed outright leaves its temp file: the next build removes it
    from moe_numa.numa.weights_cache import WeightsCache
    stale = WeightsCache(cache_dir, [path]).path(0) + ".tmp999999"
    open(stale, "wb").write(b"half an image")
    with _load(path, cache_dir) as m:
        assert m.placement_report()["load"]["weights_cache"]["built_nodes"] == [0, 1]
    assert len(_files(cache_dir)) == 2 and not os.path.exists(stale)


def test_unusable_cache_dir_is_a_clear_error(make_model, tmp_path):
    path = make_model("qwen3moe", "q8_0")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(WeightsCacheError, match="not a directory"):
        _load(path, str(tmp_path / "file"))
    with pytest.raises(WeightsCacheError, match="cannot create .*no/such"):
        _load(path, str(tmp_path / "no" / "such"))


def test_a_missing_cache_dir_is_made(make_model, tmp_path):
    with _load(make_model("qwen3moe", "q8_0"), str(tmp_path / "new")) as m:
        assert m.placement_report()["load"]["weights_cache"]["built_nodes"]
    assert _files(str(tmp_path / "new"))


def test_two_processes_build_once(make_model, cache_dir):
    """A second process loading the same model waits on the first's build, then maps it."""
    import json
    import subprocess
    import sys
    path = make_model("qwen3moe", "q8_0")
    code = ("import json, sys, moe_numa; m = moe_numa.load(sys.argv[1], backend='engine', numa_nodes=2, "
            "weights_cache=sys.argv[2]); print(json.dumps(m.placement_report()['load']['weights_cache']))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), cache_dir], stdout=subprocess.PIPE,
                              text=True, cwd=os.getcwd()) for _ in range(2)]
    out = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(len(o["built_nodes"]) for o in out) == [0, 2]     # one built both images, one mapped them
    assert len(_files(cache_dir)) == 2


def test_restart_bytes_are_accounted_and_images_hugepage_aligned(make_model, cache_dir):
    """The load reports where each placed byte came from (copied, or mapped from the cache),
    and images sit at a 2 MiB file offset over 2 MiB-aligned arenas: on a huge tmpfs they
    map by PMDs (see docs/numa-tuning.md)."""
    from moe_numa.numa.memory import HUGE
    path = make_model("qwen3moe", "q8_0")
    assert HEADER % HUGE == 0
    with _load(path, cache_dir) as m:
        ld = m.placement_report()["load"]
        assert ld["copied_bytes"] == ld["bytes"] > 0 and ld["cached_bytes"] == ld["mapped_bytes"] == 0
        want = m.logits(IDS)
    with _load(path, cache_dir) as m:
        ld = m.placement_report()["load"]
        assert ld["cached_bytes"] == ld["bytes"] > 0 and ld["copied_bytes"] == ld["mapped_bytes"] == 0
        assert all(a.addr % HUGE == 0 for a in m.backend.store.arenas)
        np.testing.assert_array_equal(m.logits(IDS), want)
