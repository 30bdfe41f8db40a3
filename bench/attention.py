"""Attention at depth: the engine's attention block of one layer (norm, projections,
RoPE, the cache write, the flash attention over the cache, the output projection)
for decode (1 token) and a prefill chunk at context depths 0..4096, per KV-cache
type, on the active SIMD level.

    python -m moe_numa.bench.attention [--preset qwen3moe-bench,deepseek-v3-bench | -m FILE.gguf]
        [-d 0,512,1024,2048,4096] [--kv f16,q8_0,f32] [--tokens 1,64] [-t THREADS] [-r 5] [--json]
    MOE_NUMA_SIMD=avx2 python -m moe_numa.bench.attention ...   # the AVX2 path on an AVX-512 machine
    moe-numa bench-attention ...

The presets are the bench models' attention (Qwen3-30B-A3B-shaped GQA: 32 query heads,
4 KV heads of 128; DeepSeek-V3-shaped absorbed MLA: 16 heads, latent 512 + rope 64),
written once with one layer and small experts (the FFN is not timed) to
$MOE_NUMA_CACHE/bench/attn-PRESET.gguf.  Each cell is the best of --reps block calls
at positions depth .. depth + tokens - 1 (the time does not depend on the cached
values, so nothing is prefilled); "vs d0" is the time per token over that at depth 0
(1.00: attention cost does not grow with context).  A flat table means decode and
prefill keep their speed as the context grows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import standalone_main

PRESETS = ("qwen3moe-bench", "deepseek-v3-bench")


def attn_model(preset: str) -> Path:
    """A one-attention-layer model with the preset's attention shapes (written once)."""
    from moe_numa.testing.writer import PRESETS as SPECS, make_test_model
    base = Path(os.environ.get("MOE_NUMA_CACHE", Path.home() / ".cache" / "moe_numa")) / "bench"
    path = base / f"attn-{preset}.gguf"
    if not path.exists():
        base.mkdir(parents=True, exist_ok=True)
        spec = dataclasses.replace(SPECS[preset], n_layer=1, n_dense_lead=0, n_expert=8, n_used=2, expert_ff=64,
                                   n_groups=1, n_groups_used=1)
        tmp = path.with_suffix(".tmp.gguf")
        make_test_model(tmp, preset, "q8_0", spec=spec)
        tmp.rename(path)
    return path


def measure(path, depths, kv_types, tokens, threads, reps, log=print) -> list[dict]:
    import moe_numa
    from moe_numa import kernels as K
    rows = []
    n_ctx = -(-(max(depths) + max(tokens)) // 256) * 256
    for kv in kv_types:
        opts = dict(backend="engine", numa_nodes=1, n_ctx=n_ctx, cache_type_k=kv, cache_type_v=kv,
                    ubatch=max(tokens))
        if threads:
            opts["threads_per_node"] = threads
        with moe_numa.load(str(path), **opts) as m:
            core, hidden = m.backend.core, m.config.hidden
            rng = np.random.default_rng(0)
            for T in tokens:
                x0 = (0.1 * rng.standard_normal((T, hidden))).astype(np.float32)
                base = None
                for d in depths:
                    best = float("inf")
                    for _ in range(reps + 1):    # the first call warms caches and pages
                        x = x0.copy()
                        t0 = time.perf_counter()
                        core.attention(0, x, d)
                        best = min(best, time.perf_counter() - t0)
                    per_tok = best / T
                    base = per_tok if base is None else base
                    row = {"model": Path(path).name, "simd": K.simd_level(), "kv": kv, "tokens": T, "depth": d,
                           "ms": best * 1e3, "ms_per_token": per_tok * 1e3, "vs_d0": per_tok / base}
                    rows.append(row)
                    log(f"| {row['model']} | {row['simd']} | {kv} | {T} | {d} | {row['ms']:.3f} | "
                        f"{row['ms_per_token']:.4f} | {row['vs_d0']:.2f} |")
    return rows


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-m", "--model", action="append", help="GGUF file (repeatable; default: the --preset models)")
    ap.add_argument("--preset", default=",".join(PRESETS), help="attention shapes to write and time")
    ap.add_argument("-d", "--depth", default="0,512,1024,2048,4096", help="comma-separated context depths")
    ap.add_argument("--kv", default="f16,q8_0,f32", help="comma-separated KV-cache types")
    ap.add_argument("--tokens", default="1,64", help="tokens per block call (1: decode; more: a prefill chunk)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    ap.add_argument("-r", "--reps", type=int, default=5, help="calls per cell (the best is kept)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(a) -> int:
    depths = [int(d) for d in a.depth.split(",")]
    tokens = [int(t) for t in a.tokens.split(",")]
    kv_types = [k.strip().lower() for k in a.kv.split(",")]
    paths = a.model or [attn_model(p.strip()) for p in a.preset.split(",")]
    out = sys.stderr if a.json else sys.stdout
    print("| model | simd | kv | tokens | depth | ms | ms/token | vs d0 |", file=out)
    print("|---|---|---|---:|---:|---:|---:|---:|", file=out)
    rows = []
    for p in paths:
        rows += measure(p, depths, kv_types, tokens, a.threads, a.reps, log=lambda s: print(s, file=out, flush=True))
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    return standalone_main("python -m moe_numa.bench.attention", __doc__, add_arguments, run, argv, full_doc=True)


if __name__ == "__main__":
    sys.exit(main())
