"""`moe-numa bench-load`: how long a model takes to load, against llama.cpp's time to its
first token on the same file from a warm page cache (issue 11's load bar).

Each run is a fresh process, the methods alternating round by round:

- ``behind``   ours as loaded by default on one node: the GGUF mapped at once, the copy
               into hugepage node memory made by a background thread after load() returns
               (its end, ``placed_s``, is timed after the first token);
- ``copy``     ours with `zero_copy=False` (`--no-mmap`), the weights copied into node memory
               before load() returns: the cold placement (a multi-node machine always does it);
- ``mmap``     ours with `zero_copy=True` (`--mmap`): on one node the GGUF's plain tensor
               ranges are mapped copy-on-write (no copy), as llama.cpp's mmap;
- ``cache``    ours restarting from the placed-weights cache (`--weights-cache DIR`,
               built once, untimed, before the rounds);
- ``llama.cpp`` our llama_logits probe (llama.cpp's public API, its default mmap and,
               with ``--repack 1``, its default weight repacking) evaluating one token.

The time is from starting the process to the first token's logits (for ours: Python's
start and imports included), so llama.cpp's process exit is the only thing it pays that
ours does not. Ours import from bytecode compiled in an untimed first run, as an installed
package does. Ours also report the phases inside load(). Bars: load <= 2x llama.cpp's
(copy, and mmap); copy / cache >= 5x.

    python -m moe_numa.bench.load -m MODEL.gguf [-t THREADS] [-r 5] [--cache-dir /dev/shm/x]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from . import standalone_main

METHODS = ("behind", "copy", "mmap", "cache", "llama.cpp")


def _child(model: str, mode: str, threads: int | None, cache_dir: str | None, numa_nodes: int | None) -> None:
    """One load of ours, then one token; prints a JSON line (on the parent's clock: time.time())."""
    import numpy as np
    import moe_numa
    t_import = time.time()
    opts: dict = {"backend": "engine", "n_ctx": 256, "numa_nodes": numa_nodes}
    if threads:
        opts["threads_per_node"] = threads
    if mode == "mmap":
        opts["zero_copy"] = True
    elif mode == "copy":
        opts["zero_copy"] = False
    elif mode == "behind":
        opts["zero_copy"] = "behind"
    elif mode == "cache":
        opts["weights_cache"] = cache_dir
    m = moe_numa.load(model, **opts)
    t_loaded = time.time()
    tok = m.tokenizer.bos_id if m.tokenizer.bos_id is not None else 1
    m.backend.forward(np.array([tok], dtype=np.int32), all_logits=False)
    t_first = time.time()
    m.wait_placed()
    placed_s = time.time() - t_import
    st = m.backend.store.load_stats
    out = {"t_import": t_import, "load_s": t_loaded - t_import,
           "first_token_s": t_first - t_loaded, "t_first": t_first, "placed_s": placed_s, "phases": m.load_phases,
           "fill_s": st["seconds"], "fill_gbps": st["gb_per_s"], "copied_bytes": st["copied_bytes"],
           "mapped_bytes": st["mapped_bytes"], "cached_bytes": st["cached_bytes"],
           "weights_cache": st["weights_cache"]}
    m.close()
    from moe_numa.numa.memory import resident_bytes
    out["peak_rss_bytes"] = resident_bytes().get("VmHWM")
    sys.stdout.write(json.dumps(out) + "\n")


def _ours(a, mode: str) -> dict:
    cmd = [sys.executable, "-m", "moe_numa.bench.load", "--child", mode, "-m", a.model]
    if a.threads:
        cmd += ["-t", str(a.threads)]
    if a.numa_nodes:
        cmd += ["--numa-nodes", str(a.numa_nodes)]
    if mode == "cache":
        cmd += ["--cache-dir", a.cache_dir]
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=a.child_env)
    if p.returncode != 0:
        raise SystemExit(f"bench-load: {mode} run failed:\n{p.stderr[-3000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec["ttft_s"] = rec["t_first"] - t0
    rec["startup_s"] = rec["t_import"] - t0   # the interpreter and the imports
    return rec


def _llama(a, build) -> dict:
    with tempfile.TemporaryDirectory(prefix="moe_numa_load_") as td:
        cmd = [str(build.path("llama_logits")), "logits", "-m", a.model, "--ids", "1", "-o",
               os.path.join(td, "logits.f32"), "-t", str(a.threads or os.cpu_count()),
               "--repack", str(a.llama_repack), "--kv-type", "f16"]
        t0 = time.time()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"bench-load: llama.cpp run failed:\n{p.stderr[-3000:]}")
    return {"ttft_s": wall}


def _warm(path: str) -> None:
    """Read the file once so every method starts from a warm page cache."""
    with open(path, "rb") as f:
        while f.readinto(bytearray(64 << 20)):
            pass


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-t", "--threads", type=int, default=None, help="threads per node (default: all cores)")
    ap.add_argument("-r", "--reps", type=int, default=3, help="rounds (each method once per round)")
    ap.add_argument("--numa-nodes", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="weights cache directory (default: a new one in /dev/shm, "
                                                      "removed afterwards)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--llama-repack", type=int, default=1, choices=(0, 1),
                    help="llama.cpp's weight repacking (1: its default)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=("behind", "copy", "mmap", "cache"), help=argparse.SUPPRESS)


def run(a: argparse.Namespace) -> int:
    if a.child:
        _child(a.model, a.child, a.threads, a.cache_dir, a.numa_nodes)
        return 0
    methods = [x for x in a.methods.split(",") if x]
    bad = set(methods) - set(METHODS)
    if bad:
        raise SystemExit(f"bench-load: unknown method(s) {sorted(bad)}; choose from {', '.join(METHODS)}")
    own_cache = a.cache_dir is None and "cache" in methods
    if own_cache:
        a.cache_dir = tempfile.mkdtemp(prefix="moe-numa-bench-load-",
                                       dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    # The children import our modules from bytecode, as an installed package does: a checkout run
    # with PYTHONDONTWRITEBYTECODE compiles every module again in every round (0.1 s of each start).
    pycache = tempfile.mkdtemp(prefix="moe-numa-bench-load-pyc-")
    a.child_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    a.child_env["PYTHONPYCACHEPREFIX"] = pycache
    build = None
    if "llama.cpp" in methods:
        from . import llama_cpp as lc
        build = lc.find_or_build()
    try:
        _warm(a.model)
        if "cache" in methods:   # build the images once, untimed (and the bytecode with them)
            built = _ours(a, "cache")
            print(f"weights cache built in {a.cache_dir}: {built['weights_cache']}", file=sys.stderr)
        elif set(methods) - {"llama.cpp"}:
            _ours(a, next(m for m in methods if m != "llama.cpp"))   # the bytecode, untimed
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(a.reps):
            for m in methods:
                rec = _llama(a, build) if m == "llama.cpp" else _ours(a, m)
                runs[m].append(rec)
                print(f"round {r + 1}/{a.reps} {m}: {rec['ttft_s']:.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(pycache, ignore_errors=True)
        if own_cache:
            shutil.rmtree(a.cache_dir, ignore_errors=True)
    summary = {m: {"ttft_s": _med([x["ttft_s"] for x in rs]), "min_ttft_s": min(x["ttft_s"] for x in rs)}
               for m, rs in runs.items()}
    for m, rs in runs.items():
        if m != "llama.cpp":
            for key in ("startup_s", "load_s", "first_token_s", "placed_s", "fill_s", "fill_gbps", "copied_bytes",
                        "mapped_bytes", "cached_bytes", "peak_rss_bytes"):
                summary[m][key] = _med([x[key] for x in rs])
            for key in ("file_and_model_s", "tokenizer_s", "backend_s"):
                summary[m][key] = _med([x["phases"][key] for x in rs])
    if a.json:
        print(json.dumps({"model": a.model, "summary": summary, "runs": runs}))
        return 0
    from . import bench as B   # the CPU line every result names
    from moe_numa import kernels as K
    cpu = f"{B.cpu_label(B._lscpu())}, SIMD {K.simd_level()}"
    print(f"\nload of {os.path.basename(a.model)} ({os.path.getsize(a.model) / 2**30:.2f} GiB), warm page cache, "
          f"{a.reps} rounds (medians; min in brackets), CPU {cpu}\n")
    print("| method | process start to first token (s) | Python start + imports | load() | of which: file+model | tokenizer "
          "(overlapped) | backend | placement (s, GB/s) | copied / mapped / from cache (GiB) | first token (s) "
          "| all in node memory (s) | peak RSS (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    gib = 2 ** 30
    for m in methods:
        s = summary[m]
        row = f"| {m} | {_fmt(s['ttft_s'])} ({_fmt(s['min_ttft_s'])}) "
        if m == "llama.cpp":
            row += "| | | | | | | | | | |"
        else:
            row += (f"| {_fmt(s['startup_s'])} | {_fmt(s['load_s'])} | {_fmt(s['file_and_model_s'])} "
                    f"| {_fmt(s['tokenizer_s'])} | {_fmt(s['backend_s'])} "
                    f"| {_fmt(s['fill_s'])}, {_fmt(s['fill_gbps'])} "
                    f"| {s['copied_bytes'] / gib:.2f} / {s['mapped_bytes'] / gib:.2f} / {s['cached_bytes'] / gib:.2f} "
                    f"| {_fmt(s['first_token_s'], '.3f')} | {_fmt(s['placed_s'])} "
                    f"| {_fmt(None if s['peak_rss_bytes'] is None else s['peak_rss_bytes'] / gib)} |")
        print(row)
    print()
    lt = summary.get("llama.cpp", {}).get("ttft_s")
    for m in ("behind", "mmap", "copy"):
        if m in summary and lt:
            r = summary[m]["ttft_s"] / lt
            print(f"{m} / llama.cpp time to first token: {r:.2f}x (bar <= 2): {'met' if r <= 2 else '**missed**'}")
    if "copy" in summary and "cache" in summary:
        for key, what in (("ttft_s", "process start to first token"), ("load_s", "load()")):
            r = summary["copy"][key] / summary["cache"][key]
            print(f"copy / cache restart, {what}: {r:.2f}x faster (bar >= 5): {'met' if r >= 5 else '**missed**'}")
    return 0


def main(argv=None) -> int:
    return standalone_main("moe-numa bench-load", __doc__, add_arguments, run, argv, full_doc=True)


if __name__ == "__main__":
    sys.exit(main())
