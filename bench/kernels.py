"""Kernel benchmark: weight-streaming GB/s of the quantized GEMV/GEMM kernels
against this machine's measured read bandwidth, in the same run.

    python -m moe_numa.bench.kernels [--types q8_0,q4_k,q6_k] [--threads 1,2] [--json]
    moe-numa bench-kernels ...

Read bandwidth: a STREAM-like read (native AVX2 float sum) over an array
several times the L3, with the same pool of 1 or N threads, the better of plain
loads and loads with the kernels' software prefetch, timed in alternation with
each kernel (so both see the same load on a shared machine).  GEMV: y = W @ x with W
well beyond the L3 (>= 256 MiB by default); effective GB/s = weight bytes /
time; ratio = that / read bandwidth at the same thread count.  GEMM: n_tok = 64
and 512 tokens; GB/s counts the weight bytes once per call (as streamed), and
GFLOP/s (2*rows*cols*n_tok/time) is printed too.  Each number is the best of
--reps runs (this is a shared 2-core box: timings are noisy).  Also prints the
median time of an empty pool task (dispatch + completion).

Compute ceiling: each GEMV is also timed on weights in half of one core's L2,
called many times in a native loop on one thread (thread-CPU time, minimum
over samples, as --l2), times the thread count: "L2 GB/s" is the fastest n
cores can consume weights at all.  Where that is below the read bandwidth at
the same thread count the type is compute-bound there (its GEMV cannot reach
the bandwidth however good the prefetch): the "bound" column says "compute",
else "memory", and a closing line lists the compute-bound types with their
L2 rate as a share of the read bandwidth (the most their GEMV can reach).

Every type of the type table with a kernel is measured by default.

--l2: the compute ceiling alone, made for a busy machine: one thread, weights of
--l2-kib (default half of one core's L2) on --simd levels (default every level
the CPU has above scalar), timed in thread-CPU time without Python in the loop
(each sample: enough calls for ~0.5 ms), the minimum over --l2-samples samples
(robust to other processes most of the time).  Prints GB/s of weights per level
for GEMV and for the GEMM tiles of --l2-tokens tokens (GFLOP/s there).

--json prints a JSON list of rows {"kernel", "type", "threads", "tokens",
"gbps", "bandwidth_gbps", "ratio"} (GEMV rows also "l2_gbps", "bound").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from moe_numa import kernels as K
from moe_numa import quants

from . import standalone_main

DEFAULT_TYPES = ",".join(t.name.lower() for t in quants.SUPPORTED)


def cache_bytes(level: int = 3) -> int:
    """Size of the largest cache of that level (cpu0's view)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(f"{base}/{d}/level") as f:
                    lvl = int(f.read())
                with open(f"{base}/{d}/size") as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
            size = int(s.rstrip("KMG")) * mult
            if lvl == level:
                best = max(best, size)
    except OSError:
        pass
    return best or ((32 << 20) if level == 3 else (1 << 20))


def _best(fn, reps: int) -> float:
    fn()  # warm-up (page faults, thread wake-up)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def paired(read_buf, pool, fn, reps: int) -> tuple[float, float]:
    """(read GB/s, best time of fn): the read is a STREAM-like sum of read_buf,
    the better of plain loads and loads with software prefetch, timed in
    alternation with fn so that both see the same machine load."""
    K.read_sum(read_buf, pool)
    fn()
    tr, tf = [], []
    for _ in range(reps):
        for pf in (False, True):
            t0 = time.perf_counter()
            K.read_sum(read_buf, pool, prefetch=pf)
            tr.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        fn()
        tf.append(time.perf_counter() - t1)
    return read_buf.nbytes / min(tr) / 1e9, min(tf)


def big_weights(qtype, nbytes: int, cols: int, rng) -> np.ndarray:
    rb = K.row_bytes(qtype, cols)
    rows = max(1, nbytes // rb)
    tile = K.random_blocks(qtype, min(rows, max(1, (16 << 20) // rb)), cols, rng)
    reps = -(-rows // tile.shape[0])
    return np.ascontiguousarray(np.tile(tile, (reps, 1))[:rows])


def l2_native(t, w: np.ndarray, cols: int, nt: int, samples: int, rng) -> float:
    """Seconds per call of the kernel on weights w (L2-resident), nt tokens, one
    thread: thread-CPU time of a native loop (no Python between calls, each
    sample ~0.5 ms), the minimum over `samples` samples (robust to other
    processes on a shared machine), at the SIMD level in force."""
    from moe_numa import _native
    x = rng.normal(size=(nt, cols)).astype(np.float32)
    out = np.empty((nt, w.shape[0]), dtype=np.float32)
    xq = K.quantize_act(x, t)
    args = (int(t), w.ctypes.data, w.strides[0], w.shape[0], cols, xq.ctypes.data, xq.shape[1], nt, out.ctypes.data)
    ns1 = max(1, _native._time_rows(*args, 1))
    iters = max(1, int(5e5 // ns1))
    return min(_native._time_rows(*args, iters) for _ in range(samples)) / iters / 1e9


def l2_rate(qtype, cols: int, n: int, l2: int, rng, samples: int = 50) -> float:
    """Compute ceiling of n threads, GB/s: n x one thread's GEMV rate on weights
    in half of its core's L2 (the cores' L2 caches and pipelines are their own,
    so the ceiling scales with the cores; not so for SMT siblings)."""
    t = K._qtype(qtype)
    w = K.random_blocks(t, max(1, (l2 // 2) // K.row_bytes(t, cols)), cols, rng)
    return n * w.nbytes / l2_native(t, w, cols, 1, samples, rng) / 1e9


def l2_table(a: argparse.Namespace, types: list[str], log) -> list[dict]:
    """Single-thread L2-resident GB/s (and GFLOP/s), the min-time over many short samples."""
    levels = ([s.strip() for s in a.simd.split(",")] if a.simd else
              list(K.SIMD_LEVELS[1:K.SIMD_LEVELS.index(K.simd_level_cpu()) + 1]))
    toks = [int(t) for t in a.l2_tokens.split(",") if t.strip()]
    kib = a.l2_kib or cache_bytes(2) // 2048
    rng = np.random.default_rng(0)
    rows_out = []
    print(f"# L2 mode: 1 thread, {kib} KiB weights, cols {a.cols}, min over {a.l2_samples} samples; "
          f"GB/s (GFLOP/s for GEMM) per SIMD level", file=log)
    print(f"{'type':8} {'tok':>4} " + " ".join(f"{lv:>16}" for lv in levels), file=log)
    for tname in types:
        t = K._qtype(tname)
        rb = K.row_bytes(t, a.cols)
        w = K.random_blocks(t, max(1, (kib << 10) // rb), a.cols, rng)
        for nt in toks:
            cells = []
            for lv in levels:
                with K.simd(lv):
                    best = l2_native(t, w, a.cols, nt, a.l2_samples, rng)
                gbps = w.nbytes / best / 1e9
                gflops = 2 * w.shape[0] * a.cols * nt / best / 1e9
                rows_out.append({"kernel": "l2", "type": tname.lower(), "simd": lv, "tokens": nt,
                                 "gbps": round(gbps, 3), "gflops": round(gflops, 2)})
                cells.append(f"{gbps:7.1f} ({gflops:6.1f})")
            print(f"{tname:8} {nt:4d} " + " ".join(f"{c:>16}" for c in cells), file=log, flush=True)
    return rows_out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated weight types")
    ap.add_argument("--threads", default=None, help="thread counts, e.g. 1,2 (default: 1 and all CPUs)")
    ap.add_argument("--cols", type=int, default=4096, help="columns of the weight matrices")
    ap.add_argument("--gemv-mib", type=int, default=0, help="GEMV weight MiB (default max(256, 8 x L3))")
    ap.add_argument("--gemm-mib", type=int, default=64, help="GEMM weight MiB")
    ap.add_argument("--tokens", default="64,512", help="GEMM token counts ('' to skip)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--smt", action="store_true", help="also use SMT siblings")
    ap.add_argument("--json", action="store_true", help="print a JSON list of rows")
    ap.add_argument("--json-out", default=None, help="also write the JSON rows to this file")
    ap.add_argument("--l2", action="store_true", help="only the single-thread L2-resident rates (busy machines)")
    ap.add_argument("--l2-kib", type=int, default=0, help="--l2 weight KiB (default half of one core's L2)")
    ap.add_argument("--l2-tokens", default="1,4,16", help="--l2 token counts (1: GEMV)")
    ap.add_argument("--l2-samples", type=int, default=200, help="--l2 samples (the minimum is kept)")
    ap.add_argument("--simd", default=None, help="--l2 SIMD levels, e.g. avx2,avx512vnni (default: all above scalar)")


def main(argv=None) -> int:
    return standalone_main("moe-numa bench-kernels", __doc__, add_arguments, run, argv)


def run(a: argparse.Namespace) -> int:

    cpus = K.order_cpus(K.available_cpus(), use_smt=a.smt)
    threads = [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, len(cpus)})
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    if a.l2:
        with K.limit_blas_threads(1):
            return _emit(a, l2_table(a, types, sys.stderr if a.json else sys.stdout))
    tokens = [int(t) for t in a.tokens.split(",") if t.strip()]
    l3 = cache_bytes()
    l2 = cache_bytes(2)
    gemv_bytes = (a.gemv_mib << 20) if a.gemv_mib else max(256 << 20, 8 * l3)
    rng = np.random.default_rng(0)
    rows_out = []
    log = sys.stderr if a.json else sys.stdout

    def say(*args):
        print(*args, file=log, flush=True)

    from .bench import _lscpu, cpu_label
    say(f"# {cpu_label(_lscpu())}")
    say(f"# SIMD {K.simd_level()} (CPU {K.simd_level_cpu()}), prefetch {K.prefetch_distance()} B ahead, "
        f"CPUs {cpus}, L3 {l3 >> 20} MiB, "
        f"GEMV weights {gemv_bytes >> 20} MiB, cols {a.cols}, loadavg {os.getloadavg()}")
    pools = {n: K.ThreadPool(cpus[:n]) for n in threads}
    with K.limit_blas_threads(1):
        try:
            lat = np.median(pools[max(threads)].noop_latency(20000)) / 1e3
            say(f"# empty pool task ({max(threads)} threads): median {lat:.2f} us")
            rbuf = np.ones(max(gemv_bytes, 8 * l3) // 4, dtype=np.float32)
            bw_all = {n: [] for n in threads}
            compute_bound = []
            say(f"{'kernel':6} {'type':7} {'thr':>3} {'tok':>4} {'GB/s':>7} {'read':>6} {'ratio':>6} {'GFLOP/s':>8} "
                f"{'L2 GB/s':>8} bound")
            for tname in types:
                t = K._qtype(tname)
                w = big_weights(t, gemv_bytes, a.cols, rng)
                x = rng.normal(size=a.cols).astype(np.float32)
                out = np.empty(w.shape[0], dtype=np.float32)
                for n in threads:
                    b, s = paired(rbuf, pools[n], lambda: K.matmul(w, t, x, out=out, pool=pools[n]), a.reps)
                    bw = {n: b}
                    bw_all[n].append(b)
                    g = w.nbytes / s / 1e9
                    l2g = l2_rate(t, a.cols, n, l2, rng)
                    bound = "compute" if l2g < bw[n] else "memory"
                    if bound == "compute":
                        compute_bound.append(f"{tname} at {n} thr (L2 {l2g:.1f} GB/s = {l2g / bw[n]:.2f} of read)")
                    rows_out.append({"kernel": "gemv", "type": tname.lower(), "threads": n, "tokens": 1,
                                     "gbps": round(g, 3), "bandwidth_gbps": round(bw[n], 3),
                                     "ratio": round(g / bw[n], 4), "l2_gbps": round(l2g, 3), "bound": bound})
                    say(f"{'gemv':6} {tname:7} {n:3d} {1:4d} {g:7.2f} {bw[n]:6.1f} {g / bw[n]:6.3f} "
                        f"{2 * w.shape[0] * a.cols / s / 1e9:8.1f} {l2g:8.1f} {bound}")
                del w
                if tokens:
                    w = big_weights(t, a.gemm_mib << 20, a.cols, rng)
                    for nt in tokens:
                        x = rng.normal(size=(nt, a.cols)).astype(np.float32)
                        out = np.empty((nt, w.shape[0]), dtype=np.float32)
                        for n in threads:
                            b, s = paired(rbuf, pools[n], lambda: K.matmul(w, t, x, out=out, pool=pools[n]),
                                          max(2, a.reps // 2))
                            bw = {n: b}
                            g = w.nbytes / s / 1e9
                            rows_out.append({"kernel": "gemm", "type": tname.lower(), "threads": n, "tokens": nt,
                                             "gbps": round(g, 3), "bandwidth_gbps": round(bw[n], 3),
                                             "ratio": round(g / bw[n], 4)})
                            say(f"{'gemm':6} {tname:7} {n:3d} {nt:4d} {g:7.2f} {bw[n]:6.1f} {g / bw[n]:6.3f} "
                                f"{2 * w.shape[0] * a.cols * nt / s / 1e9:8.1f}")
                    del w
            say("# read bandwidth (best per GEMV row, median over rows): " + ", ".join(
                f"{n} thr {np.median(bw_all[n]):.1f} GB/s" for n in threads if bw_all[n]))
            say("# compute-bound (L2 ceiling below the read bandwidth): " + ("; ".join(compute_bound) or "none"))
            say(f"# loadavg at end {open('/proc/loadavg').read().split()[:3]}")
        finally:
            for p in pools.values():
                p.close()
    return _emit(a, rows_out)


def _emit(a: argparse.Namespace, rows_out: list[dict]) -> int:
    """--json / --json-out: the rows, after the table."""
    if a.json:
        print(json.dumps(rows_out, indent=1))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(rows_out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
