"""One benchmark run of our engine, in its own process, the way llama-bench runs its tests.

    python -m moe_numa.bench.run_ours MODEL.gguf --threads 2 --tests pp64,pp512,tg32,tg128,tg32@d1024 \
        [--reps 1] [--numa-nodes N] [--expert-map FILE] [--n-ctx N] [--kv-type f16 | -ctk f16 -ctv q8_0] [--seed 0] [--json]

It is started by ``moe-numa bench`` (bench/bench.py) once per A/B round so that its
load time and peak RSS are its own.  Methodology, as llama-bench b11434
(tools/llama-bench/llama-bench.cpp, ``test_prompt`` / ``test_gen``):

- the model is loaded once per process (``moe_numa.load`` wall time, placement included,
  is the load time);
- per test, one warm-up: ppN runs the whole prompt once, tgN generates one token;
- then ``--reps`` timed repetitions, each from an empty cache (``backend.reset()``):
  ppN is one forward of N tokens (BOS first when the vocabulary adds one, then random
  ids), tgN is N forwards of one token each starting at position 0, the first token BOS
  (or random), the next ones random (no sampling); the first token is timed too;
- ``@dN`` tests (llama-bench ``-d N``): each repetition first runs an untimed N-token
  prompt into the empty cache, then the test from position N;
- tokens/s of a repetition = tokens / its wall time.

Around every timed repetition it samples the machine's busy CPU time (psutil) and
its own CPU time (getrusage, all threads), so the harness can tell whether another
process took CPU during the sample (``others_cpu_s``).

``--json`` prints one JSON object on the last line of stdout::

    {"engine": "moe_numa", "model": ..., "threads": 2, "n_nodes": 1, "threads_per_node": 2,
     "n_ctx": 512, "load_s": 1.23, "peak_rss_bytes": ..., "simd": "avx512vnni",
     "tests": [{"test": "pp64", "n_prompt": 64, "n_gen": 0, "warmup_ns": ...,
                "samples_ns": [...], "samples_ts": [...],
                "samples_wall_s": [...], "others_cpu_s": [...]}]}
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time

import numpy as np

from .bench import others_cpu_s, read_busy_ticks, self_cpu_s

_TEST_RE = re.compile(r"(pp|tg)(\d+)(?:@d(\d+))?")


def parse_tests(spec) -> list[tuple[str, int, int]]:
    """"pp64,tg32" (or a list) -> [("pp64", 64, 0), ("tg32", 0, 32)].
    "tg32@d1024" is tg32 after a 1024-token prompt (llama-bench's naming; see test_depth)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for t in (s.strip() for s in items):
        if not t:
            continue
        m = _TEST_RE.fullmatch(t)
        if not m or int(m.group(2)) <= 0:
            raise ValueError(f"benchmark test {t!r} is not ppN or tgN (N > 0), optionally @dDEPTH")
        n = int(m.group(2))
        out.append((t, n, 0) if m.group(1) == "pp" else (t, 0, n))
    if not out:
        raise ValueError("no benchmark tests given")
    return out


def test_depth(name: str) -> int:
    """The depth of a test name: "tg32@d1024" -> 1024, "tg32" -> 0."""
    m = _TEST_RE.fullmatch(name)
    return int(m.group(3) or 0) if m else 0


def with_depths(tests, depths) -> list[str]:
    """Every test at every depth, named as llama-bench names them ("tg32", "tg32@d1024")."""
    return [t if d == 0 else f"{t}@d{d}" for d in depths for t in tests]


def engine_kv_type() -> str:
    """The KV-cache type our engine uses by default (F32 before it had a choice)."""
    import inspect
    from moe_numa.engine.backend import EngineBackend
    p = inspect.signature(EngineBackend.__init__).parameters.get("cache_type_k")
    return str(p.default).lower() if p is not None and isinstance(p.default, str) else "f32"


class _Runner:
    def __init__(self, backend, n_vocab: int, bos: int | None, seed: int):
        self.backend = backend
        self.n_vocab = n_vocab
        self.bos = bos
        self.rng = np.random.default_rng(seed)

    def _ids(self, n: int) -> np.ndarray:
        ids = self.rng.integers(0, self.n_vocab, size=n).astype(np.int32)
        if self.bos is not None:
            ids[0] = self.bos
        return ids

    def prompt(self, n: int) -> None:
        self.backend.forward(self._ids(n), all_logits=False)

    def gen(self, n: int) -> None:
        tok = np.empty(1, dtype=np.int32)
        tok[0] = self.bos if self.bos is not None else self.rng.integers(0, self.n_vocab)
        for _ in range(n):
            self.backend.forward(tok, all_logits=False)
            tok[0] = self.rng.integers(0, self.n_vocab)


def run(model_path: str, threads: int, tests, reps: int = 1, numa_nodes: int | None = None,
        expert_map: str | None = None, n_ctx: int | None = None, seed: int = 0,
        warmup: bool = True, kv_type: str | None = None, zero_copy: bool | None = None,
        kv_type_v: str | None = None) -> dict:
    """kv_type: the KV cache's key type, and its value type unless kv_type_v is given (both
    default to the engine's; llama.cpp's -ctk / -ctv)."""
    import moe_numa
    from moe_numa import kernels as K
    from moe_numa.numa.topology import topology

    tests = parse_tests(tests)
    n_nodes = topology(numa_nodes).n_nodes
    if threads % n_nodes:
        raise ValueError(f"{threads} threads do not split evenly over {n_nodes} NUMA node(s)")
    need = max(p + g + test_depth(name) for name, p, g in tests)
    n_ctx = n_ctx or -(-need // 256) * 256          # llama-bench: n_ctx = n_prompt + n_gen
    opts = {"backend": "engine", "numa_nodes": numa_nodes, "threads_per_node": threads // n_nodes,
            "n_ctx": n_ctx}
    if expert_map:
        opts["expert_map"] = expert_map
    if zero_copy is not None:
        opts["zero_copy"] = zero_copy
    kv_k = kv_type or engine_kv_type()
    kv_v = kv_type_v or kv_k
    if (kv_k, kv_v) != (engine_kv_type(),) * 2:   # only engines with a choice accept the options
        opts["cache_type_k"], opts["cache_type_v"] = kv_k, kv_v
    t0 = time.perf_counter()
    model = moe_numa.load(model_path, **opts)
    load_s = time.perf_counter() - t0
    # On one node a large file is mapped and load() returns; the copy into hugepage memory
    # goes on behind it. The tests time decode from the copy, as a server would after its
    # first seconds: wait for it, and record when it was done.
    model.wait_placed()
    placed_s = time.perf_counter() - t0
    out = {"engine": "moe_numa", "model": str(model_path), "threads": threads, "n_nodes": n_nodes,
           "threads_per_node": threads // n_nodes, "n_ctx": n_ctx, "reps": reps, "warmup": warmup,
           "load_s": load_s, "placed_s": placed_s, "simd": K.simd_level(), "prefetch_bytes": K.prefetch_distance(), "kv_type": kv_k, "kv_type_v": kv_v, "tests": []}
    fill = getattr(getattr(model.backend, "store", None), "load_stats", None) or {}
    out["load_fill_gbps"] = fill.get("gb_per_s")   # the placement copy alone, GB/s
    out["load_mapped_bytes"] = fill.get("mapped_bytes")   # one node: mapped from the GGUF, not copied
    out["load_phases"] = getattr(model, "load_phases", None)
    try:
        tok = model.tokenizer
        bos = tok.bos_id if getattr(tok, "add_bos", False) else None
        r = _Runner(model.backend, model.config.n_vocab, bos, seed)
        for name, n_prompt, n_gen in tests:
            depth = test_depth(name)
            fn = (lambda: r.prompt(n_prompt)) if n_prompt else (lambda: r.gen(n_gen))
            rec = {"test": name, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": depth, "warmup_ns": None,
                   "samples_ns": [], "samples_ts": [], "samples_wall_s": [], "others_cpu_s": [],
                   "imbalance": [], "wait_frac": []}
            if warmup:
                model.backend.reset()
                w0 = time.perf_counter_ns()
                if n_prompt:
                    r.prompt(n_prompt)
                else:
                    r.gen(1)
                rec["warmup_ns"] = time.perf_counter_ns() - w0
            for _ in range(reps):
                model.backend.reset()
                if depth:   # llama-bench: the depth prompt fills the cache first, untimed
                    r.prompt(depth)
                model.backend.reset_counters()
                b0, c0 = read_busy_ticks(), self_cpu_s()
                t_start = time.perf_counter_ns()
                fn()
                ns = time.perf_counter_ns() - t_start
                b1, c1 = read_busy_ticks(), self_cpu_s()
                rec["samples_ns"].append(ns)
                rec["samples_ts"].append((n_prompt + n_gen) / (ns * 1e-9))
                rec["samples_wall_s"].append(ns * 1e-9)
                rec["others_cpu_s"].append(others_cpu_s(b0, b1, c1 - c0))
                # node balance: critical path / mean node busy time, and the share of node time spent waiting
                c = model.backend.counters()
                rec["imbalance"].append(c["imbalance"])
                rec["wait_frac"].append(sum(c["node_wait_ns"]) / max(1, sum(c["node_wait_ns"]) + sum(c["node_busy_ns"])))
            out["tests"].append(rec)
    finally:
        model.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_bytes"] = ru.ru_maxrss * 1024     # Linux: the process's VmHWM, in KiB
    out["cpu_s"] = ru.ru_utime + ru.ru_stime
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_numa.bench.run_ours",
                                 description="one llama-bench-style run of the moe_numa engine")
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, required=True, help="total threads (split over the nodes)")
    ap.add_argument("--tests", default="pp64,pp512,tg32,tg128")
    ap.add_argument("-r", "--reps", type=int, default=1)
    ap.add_argument("--numa-nodes", type=int, default=None)
    ap.add_argument("--expert-map", default=None)
    ap.add_argument("--n-ctx", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-type", default=None, help="KV-cache type of keys and values (default: the engine's)")
    ap.add_argument("-ctk", "--cache-type-k", default=None, help="key type (default: --kv-type)")
    ap.add_argument("-ctv", "--cache-type-v", default=None, help="value type (default: --kv-type)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--mmap", action="store_true",
                    help="map the GGUF's plain tensor ranges instead of copying them (one node)")
    ap.add_argument("--no-mmap", action="store_true", help="copy the weights into node memory (the default)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = ap.parse_args(argv)
    res = run(a.model, a.threads, a.tests, reps=a.reps, numa_nodes=a.numa_nodes, expert_map=a.expert_map,
              n_ctx=a.n_ctx, seed=a.seed, warmup=not a.no_warmup, kv_type=a.cache_type_k or a.kv_type,
              kv_type_v=a.cache_type_v or a.kv_type,
              zero_copy=True if a.mmap else (False if a.no_mmap else None))
    if a.json:
        sys.stdout.write(json.dumps(res) + "\n")
    else:
        print(f"load {res['load_s']:.2f} s, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB")
        for t in res["tests"]:
            ts = t["samples_ts"]
            print(f"{t['test']:>8}: {np.median(ts):10.2f} t/s  (n={len(ts)})  imbalance "
                  f"{np.median(t['imbalance']):.3f}, waits {100 * np.median(t['wait_frac']):.1f}% of node time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
