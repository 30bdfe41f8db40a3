"""Node-local thread pools: pinning, several pools in flight, barriers, stats,
SMT-aware CPU ordering, BLAS limiting.  No timing assertions."""
import threading

import numpy as np
import pytest

from moe_numa import _native
from moe_numa import kernels as K
from moe_numa.errors import TopologyError

CPUS = K.available_cpus()


def cpus_n(n, start=0):
    return [CPUS[(start + i) % len(CPUS)] for i in range(n)]


@pytest.mark.parametrize("caller0", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_slice_runs_once_on_its_cpu(n, caller0):
    cpus = cpus_n(n)
    with K.ThreadPool(cpus, caller_is_worker0=caller0) as p:
        [(seen, runs, viol)] = _native._probe_pools([p._pool], 20, 3)
        assert runs == [20] * n
        assert viol == 0
        first = 1 if caller0 else 0          # the caller (slice 0) is not pinned by the pool
        assert seen[first:] == cpus[first:]
        st = p.stats()
        assert st["threads"] == n and st["tasks"] == [20] * n
        assert all(b >= 0 for b in st["busy_ns"]) and st["busy_ns_total"] > 0
        p.reset_stats()
        assert p.stats()["tasks"] == [0] * n


def test_several_pools_in_flight_at_once():
    a = K.ThreadPool(cpus_n(2), caller_is_worker0=False)
    b = K.ThreadPool(cpus_n(3, 1), caller_is_worker0=False)
    c = K.ThreadPool(cpus_n(2, 1), caller_is_worker0=True)
    try:
        res = _native._probe_pools([a._pool, b._pool, c._pool], 30, 2)
        assert [r[1] for r in res] == [[30] * 2, [30] * 3, [30] * 2]
        assert all(r[2] == 0 for r in res)
    finally:
        a.close(); b.close(); c.close()


def test_pools_used_from_several_python_threads():
    rng = np.random.default_rng(0)
    w = K.random_blocks("q4_k", 301, 1024, rng)
    x = rng.standard_normal((3, 1024)).astype(np.float32)
    ref = K.matmul(w, "q4_k", x)
    pools = [K.ThreadPool(cpus_n(2, i)) for i in range(3)]
    errors = []

    def work(p):
        try:
            for _ in range(20):
                np.testing.assert_array_equal(K.matmul(w, "q4_k", x, pool=p), ref)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(p,)) for p in pools]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for p in pools:
        p.close()
    assert not errors


def test_noop_latency_and_sleeping_workers():
    with K.ThreadPool(cpus_n(2), spin_us=0) as p:      # no spinning: every wake goes through the futex
        lat = p.noop_latency(200)
        assert lat.shape == (200,) and np.all(lat > 0)
        p.noop()
        [(_, runs, viol)] = _native._probe_pools([p._pool], 10, 4)
        assert runs == [10, 10] and viol == 0


def test_closed_pool_and_bad_cpus():
    p = K.ThreadPool(cpus_n(1))
    p.close()
    p.close()                                            # idempotent
    assert p.closed
    with pytest.raises(ValueError):
        p.stats()
    with pytest.raises(TopologyError, match=r"CPU 9999 does not exist"):
        K.ThreadPool([CPUS[0], 9999])
    with pytest.raises(TopologyError, match="list of CPU numbers"):
        K.ThreadPool(["a"])


def test_order_cpus_physical_first(monkeypatch):
    # 4 cores with 2 threads each: cpu c and c+4 are siblings
    from moe_numa.numa import topology
    monkeypatch.setattr(topology, "core_of", lambda c: c % 4)
    assert K.order_cpus([0, 4, 1, 5, 2, 6, 3, 7]) == [0, 1, 2, 3]
    assert K.order_cpus([0, 4, 1, 5, 2, 6, 3, 7], use_smt=True) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert K.order_cpus([5, 1]) == [5]


def test_order_cpus_reads_sysfs():
    got = K.order_cpus(CPUS, use_smt=True)
    assert sorted(got) == CPUS
    assert len(K.order_cpus(CPUS)) == len({K.core_of(c) for c in CPUS})


def test_limit_blas_threads():
    from threadpoolctl import threadpool_info
    np.ones((4, 4)) @ np.ones((4, 4))                    # load BLAS
    with K.limit_blas_threads(1):
        for lib in threadpool_info():
            if lib.get("user_api") == "blas":
                assert lib["num_threads"] == 1


def test_read_sum():
    x = np.arange(1 << 16, dtype=np.float32) % 7
    with K.ThreadPool(cpus_n(3)) as p:
        assert K.read_sum(x, p) == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-6)
    assert K.read_sum(x) == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-6)
