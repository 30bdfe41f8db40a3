"""Lifecycle of a loaded model: close() and what comes after it, re-set layers
releasing what they replace, the process state a load changes and close()
restores (CPU affinity, BLAS threads, threads, RSS), and Ctrl-C during
placement and generation.

Anything that could hang on a regression runs in a subprocess with a timeout,
so a hang fails the test instead of stalling the suite."""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest

import moe_numa
from moe_numa.errors import ClosedError, MoeNumaError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CPUS = os.sched_getaffinity(0)

# Helpers the child processes share: thread count, RSS, CPU time of the process.
CHILD_PRELUDE = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    import moe_numa
    def threads():
        return len(os.listdir("/proc/self/task"))
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    def cpu_seconds():
        t = os.times()
        return t.user + t.system
    def report(**kw):
        print("RESULT " + json.dumps(kw), flush=True)
""")


def run_child(code: str, timeout: float = 120, **popen) -> dict:
    """Run code in a fresh interpreter from the repository root; its RESULT line as a dict."""
    proc = subprocess.run([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **popen)
    assert proc.returncode == 0, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"child printed no result:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][7:]) | {"stderr": proc.stderr}


def test_calls_after_close_raise_instead_of_hanging(make_model):
    path = make_model("qwen3moe", "q8_0")
    r = run_child(f"""
        m = moe_numa.load({str(path)!r}, n_ctx=64, numa_nodes=2)
        m.generate([1, 2, 3], max_tokens=2, temperature=0)
        backend = m.backend
        m.close()
        m.close()                        # idempotent
        errors = {{}}
        for name, call in [("generate", lambda: m.generate([1, 2, 3], max_tokens=2)),
                           ("logits", lambda: m.logits([1, 2])),
                           ("placement_report", m.placement_report),
                           ("rebalance", m.rebalance),
                           ("forward", lambda: backend.forward(np.array([1]))),
                           ("core", lambda: backend.core.ffn(0, np.zeros((1, 8), np.float32)))]:
            try:
                call()
                errors[name] = None
            except Exception as e:
                errors[name] = [type(e).__name__, isinstance(e, moe_numa.MoeNumaError), str(e)]
        report(errors=errors)
    """, timeout=60)
    for name, err in r["errors"].items():
        if name == "core":   # the backend dropped its engine: the attribute is gone, not a hang
            continue
        assert err is not None and err[0] == "ClosedError" and err[1], (name, err)
        assert "closed" in err[2]


def test_engine_refuses_to_run_on_a_closed_pool(make_model):
    path = make_model("qwen2moe", "q8_0")
    r = run_child(f"""
        m = moe_numa.load({str(path)!r}, n_ctx=64, numa_nodes=2)
        m.backend.pools[1].close()        # under the engine's feet
        try:
            m.generate([1, 2, 3], max_tokens=2)
            report(error=None)
        except Exception as e:
            report(error=[type(e).__name__, str(e)])
        m.close()
    """, timeout=60)
    assert r["error"][0] == "ClosedError" and "node 1" in r["error"][1]


@pytest.mark.parametrize("close", [False, True])
def test_exit_without_or_after_close_is_clean(make_model, close):
    path = make_model("deepseek-v3", "q8_0")
    r = run_child(f"""
        m = moe_numa.load({str(path)!r}, n_ctx=64, numa_nodes=2)
        m.generate([1, 2, 3], max_tokens=2, temperature=0)
        if {close}:
            m.close()
        keep = [m, m.backend, m.backend.core]   # alive until interpreter teardown
        report(ok=True)
    """, timeout=60)
    assert r["ok"]
    assert "Exception ignored" not in r["stderr"] and "Traceback" not in r["stderr"], r["stderr"]


def test_resetting_a_layer_releases_what_it_replaces(make_model):
    path = make_model("qwen3moe", "q8_0")
    with moe_numa.load(path, n_ctx=64, numa_nodes=2, rebalance_every=None) as m:
        B = m.backend
        layer = next(i for i in range(m.config.n_layer) if m.config.is_moe_layer(i))
        p = B.store.resolve(B._ffn_params[(0, layer)])
        before = B.core.retained()
        replaced = p.replace(ffn_norm=np.array(p.ffn_norm, copy=True), probs_bias=None)
        ref = weakref.ref(replaced.ffn_norm)
        B.core.set_ffn(0, layer, replaced)
        for _ in range(20):
            B.core.set_ffn(0, layer, p)
        del replaced
        gc.collect()
        assert ref() is None, "the engine still holds an array of a layer it replaced"
        assert B.core.retained() == before
        # rebalancing re-sets layers again and again: what the engine holds stays the same
        ids = list(range(1, 40))
        for _ in range(3):
            m.logits(ids)
            B.rebalance(min_tokens=1, tolerance=0.0)
        assert B.core.retained() == before
        np.testing.assert_allclose(m.logits(ids[:5]), m.logits(ids[:5]))


def test_close_restores_affinity_and_blas_limits_even_from_another_thread(make_model):
    from threadpoolctl import threadpool_info

    def blas():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    path = make_model("qwen2moe", "q8_0")
    np.ones((4, 4)) @ np.ones((4, 4))                    # BLAS loaded
    blas_before = blas()
    affinity = os.sched_getaffinity(0)
    m = moe_numa.load(path, n_ctx=64, numa_nodes=1)
    try:
        if len(affinity) > 1:
            assert os.sched_getaffinity(0) != affinity       # the loading thread is pinned while loaded
        m.generate([1, 2], max_tokens=2)
        assert blas() == blas_before                          # limited inside forward passes only
        other = threading.Thread(target=m.close)
        other.start()
        other.join()
    finally:
        m.close()
    assert os.sched_getaffinity(0) == affinity
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas_before


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning is only visible with 2+ CPUs")
def test_forward_from_another_thread_runs_on_node0s_core_then_restores_it(make_model):
    """The server's engine thread is not the loading thread: during a forward it must sit on
    node 0's first core, not wherever the scheduler put it (on a pool thread's core every
    sync waits for a time slice)."""
    m = moe_numa.load(make_model("qwen3moe", "q8_0"), n_ctx=64, numa_nodes=1)
    try:
        backend = m.backend
        core0 = backend.pools[0].cpus[0]
        inner = backend._forward_batch
        seen = {}

        def spy(*a):
            seen["during"] = os.sched_getaffinity(0)
            return inner(*a)
        backend._forward_batch = spy

        def engine_thread():
            os.sched_setaffinity(0, ALL_CPUS)     # a new thread inherits the pinned loader's mask
            seen["before"] = os.sched_getaffinity(0)
            backend.forward_batch([1, 2], [0, 1], [0, 0])
            seen["after"] = os.sched_getaffinity(0)
        t = threading.Thread(target=engine_thread)
        t.start()
        t.join()
        assert seen["during"] == {core0}
        assert seen["after"] == seen["before"] and len(seen["before"]) > 1
    finally:
        m.close()


def test_models_closed_in_load_order_give_the_thread_its_affinity_back(make_model):
    affinity = os.sched_getaffinity(0)
    models = [moe_numa.load(make_model(p, "q8_0"), n_ctx=32, numa_nodes=1) for p in ("qwen3moe", "qwen2moe")]
    for m in models:                 # first loaded, first closed: the second saw the pinned mask
        m.close()
    assert os.sched_getaffinity(0) == affinity


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2+ CPUs to split")
def test_a_second_model_beside_a_loaded_one_gets_every_cpu(make_model):
    """The first engine pins the loading thread to one core; the second must still see the
    thread's CPUs, not that one core (it used to put both virtual nodes on CPU 0)."""
    path = make_model("qwen3moe", "q8_0")
    with moe_numa.load(path, n_ctx=32, numa_nodes=1) as a:
        with moe_numa.load(path, n_ctx=32, numa_nodes=2, threads_per_node=1) as b:
            cpus = [p.cpus for p in b.backend.pools]
            assert len({c[0] for c in cpus}) == 2, cpus
            assert b.logits([1, 2, 3]).shape == a.logits([1, 2, 3]).shape
    assert os.sched_getaffinity(0) == ALL_CPUS


def test_load_generate_close_twenty_times_leaves_threads_and_rss(make_model):
    path = make_model("deepseek-v2-lite", "q8_0")
    r = run_child(f"""
        import gc
        def cycle():
            m = moe_numa.load({str(path)!r}, n_ctx=64, numa_nodes=2)
            m.generate([1, 2, 3], max_tokens=4, temperature=0.7, seed=1)
            m.close()
            del m
            gc.collect()
        import ctypes
        trim = ctypes.CDLL("libc.so.6").malloc_trim   # freed but kept by malloc is not a leak
        for _ in range(3):   # warm-up: imports, caches, allocator pools
            cycle()
        trim(0)
        t0, samples = threads(), [rss()]
        for k in range(20):
            cycle()
            if k in (9, 19):
                trim(0)
                samples.append(rss())
        report(threads=[t0, threads()], rss=samples)
    """, timeout=300)
    assert r["threads"][1] == r["threads"][0]
    # A leak grows with every cycle, so it shows in both halves; a one-off step (an allocator
    # arena, which another busy process on the machine can provoke) shows in one.
    first, second = (r["rss"][1] - r["rss"][0]) / 2**20, (r["rss"][2] - r["rss"][1]) / 2**20
    assert min(first, second) < 2 and first + second < 8, f"RSS grew by {first:.1f} + {second:.1f} MiB"


SIGINT_CHILD = """
    import signal, threading
    # A child of a background job (nohup, `cmd &` in a script) inherits SIGINT ignored,
    # and Python then leaves it ignored: ask for Ctrl-C as an interactive user has it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    path, phase = sys.argv[1], sys.argv[2]
    base_threads = threads()
    state = {}
    def slow_progress(done, total):      # stretches placement so that Ctrl-C lands inside it
        if "armed" not in state:         # (progress comes once per filled run of shards, so each
            state["armed"] = True        # call stands for a run of the copy)
            print("READY", flush=True)
        time.sleep(0.3)
    try:
        if phase == "placement":
            m = moe_numa.load(path, n_ctx=4096, numa_nodes=2, progress=slow_progress)
        else:
            m = moe_numa.load(path, n_ctx=4096, numa_nodes=2)
            seed = 0
            while True:   # a random model may sample EOS soon: generate again until Ctrl-C
                for i, piece in enumerate(m.generate([1, 2, 3], max_tokens=100000, temperature=0.8, seed=seed,
                                                     stream=True)):
                    if i == 2 and "armed" not in state:
                        state["armed"] = True
                        print("READY", flush=True)
                seed += 1
        report(interrupted=False)
    except KeyboardInterrupt:
        t_stop = time.monotonic()
        c0 = cpu_seconds()
        time.sleep(0.5)
        idle_cpu = cpu_seconds() - c0
        left = threads()
        if phase != "placement":
            m.close()
        report(interrupted=True, t_stop=t_stop, idle_cpu=idle_cpu, threads_left=left,
               threads_after_close=threads(), base_threads=base_threads)
"""


@pytest.mark.parametrize("phase", ["placement", "generation"])
def test_ctrl_c_stops_within_a_second_and_leaves_no_spinning_threads(make_model, phase):
    path = make_model("qwen3moe", "q8_0")
    proc = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(SIGINT_CHILD), str(path), phase],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", line + proc.stderr.read()
        time.sleep(0.05)
        t_sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    res = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert res["interrupted"], err
    assert res["t_stop"] - t_sent < 1.0, f"stopped {res['t_stop'] - t_sent:.2f} s after Ctrl-C"
    assert res["idle_cpu"] < 0.1, f"threads kept spinning: {res['idle_cpu']:.2f} CPU-seconds in 0.5 s"
    if phase == "placement":   # the failed load left no pool or placement thread behind
        assert res["threads_left"] == res["base_threads"], res
    assert res["threads_after_close"] == res["base_threads"], res


def test_closed_error_is_a_moe_numa_error():
    assert issubclass(ClosedError, MoeNumaError)
