"""Soak benchmark: a long run of generation on the NUMA engine with expert
rebalancing every few hundred tokens, watching the process for growth.

Generates N tokens in total (default 50,000) as a series of requests of
`--request` tokens each (a fresh context per request, as a server would), on
`--nodes` (virtual) nodes, with `rebalance_every=--rebalance` tokens. Every
`--sample` tokens it records RSS, anonymous memory, open file descriptors,
threads and the decode speed of the tokens since the last sample. It prints a
markdown table and a summary against the hardening bar (RSS growth after
warm-up <= 1 MiB, decode-speed drift <= 5 %), and writes a PNG plot.

    python -m moe_numa.bench.soak [-m MODEL.gguf] [--tokens 50000] [--nodes 2]
                                  [--out soak.png] [--json soak.json]

Without -m it writes (once, cached) the small `qwen3moe` test model in Q4_K:
process growth shows on any model; the decode speed of a real one is more telling.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def default_model() -> str:
    from moe_numa.testing import make_test_model
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe_numa" / "bench-models"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "soak-qwen3moe-q4_k.gguf"
    if not path.exists():
        make_test_model(path, "qwen3moe", "q4_k", seed=0)
    return str(path)


def process_sample() -> dict:
    import psutil
    from moe_numa.numa.memory import resident_bytes
    p = psutil.Process()
    return {"rss": p.memory_info().rss, "anon": resident_bytes().get("RssAnon", 0),
            "fds": p.num_fds(), "threads": p.num_threads()}


def soak(path: str, tokens: int, nodes: int, rebalance: int, request: int, sample: int, n_ctx: int,
         progress: bool = True) -> dict:
    import moe_numa
    # whole experts: the rebalancer moves them (split experts, the default, stay where they are)
    model = moe_numa.load(path, n_ctx=n_ctx, numa_nodes=nodes, rebalance_every=rebalance, expert_map="contiguous")
    rows = []
    done = 0
    window_tokens, window_seconds = 0, 0.0
    next_sample = 0
    t_start = time.perf_counter()
    try:
        vocab = model.config.n_vocab
        seed = 0
        while done < tokens:
            if done >= next_sample:
                row = {"tokens": done, "seconds": time.perf_counter() - t_start,
                       "decode_tps": window_tokens / window_seconds if window_seconds else None,
                       "rebalances": len(model.backend.rebalance_log)} | process_sample()
                rows.append(row)
                window_tokens, window_seconds = 0, 0.0
                next_sample += sample
                if progress:
                    print(f"\r{done}/{tokens} tokens", end="", file=sys.stderr, flush=True)
            prompt = [(seed * 7919 + i * 104729) % vocab for i in range(16)]
            n = min(request, tokens - done)
            model.generate(prompt, max_tokens=n, temperature=0.8, seed=seed)
            st = model.last_stats
            done += max(st.generated_tokens, 1)
            window_tokens += max(st.generated_tokens - 1, 0)
            window_seconds += st.decode_seconds
            seed += 1
        rows.append({"tokens": done, "seconds": time.perf_counter() - t_start,
                     "decode_tps": window_tokens / window_seconds if window_seconds else None,
                     "rebalances": len(model.backend.rebalance_log)} | process_sample())
        swaps = sum(len(layer["swaps"]) for rep in model.backend.rebalance_log for layer in rep.values())
    finally:
        model.close()
    if progress:
        print(file=sys.stderr)
    return {"model": path, "tokens": done, "nodes": nodes, "rebalance_every": rebalance, "request": request,
            "rows": rows, "swaps": swaps, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """Growth and drift after warm-up (the first 10 % of the run, at least one sample)."""
    if len(rows) < 3:
        return {}
    warm = max(1, len(rows) // 10)
    after = rows[warm:]
    speeds = [r["decode_tps"] for r in after if r["decode_tps"]]
    q = max(1, len(speeds) // 4)
    first, last = sum(speeds[:q]) / q if speeds else 0, sum(speeds[-q:]) / q if speeds else 0
    return {"warmup_tokens": rows[warm]["tokens"],
            "rss_growth_bytes": after[-1]["rss"] - after[0]["rss"],
            "anon_growth_bytes": after[-1]["anon"] - after[0]["anon"],
            "fds_growth": after[-1]["fds"] - after[0]["fds"],
            "threads_growth": after[-1]["threads"] - after[0]["threads"],
            "decode_tps_first_quarter": first, "decode_tps_last_quarter": last,
            "decode_drift": (last - first) / first if first else None}


def markdown(res: dict) -> str:
    mib = 2 ** 20
    out = [f"Soak: {res['tokens']} tokens, {res['nodes']} nodes, rebalancing every {res['rebalance_every']} tokens "
           f"({res['swaps']} expert swaps), requests of {res['request']} tokens; model {res['model']}", "",
           "| tokens | s | RSS MiB | anon MiB | fds | threads | decode tok/s | rebalances |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        tps = f"{r['decode_tps']:.1f}" if r["decode_tps"] else "-"
        out.append(f"| {r['tokens']} | {r['seconds']:.1f} | {r['rss'] / mib:.2f} | {r['anon'] / mib:.2f} | "
                   f"{r['fds']} | {r['threads']} | {tps} | {r['rebalances']} |")
    s = res["summary"]
    if s:
        drift = f"{100 * s['decode_drift']:+.1f} %" if s["decode_drift"] is not None else "-"
        ok_rss = s["rss_growth_bytes"] <= mib
        ok_speed = s["decode_drift"] is not None and abs(s["decode_drift"]) <= 0.05
        out += ["", f"After warm-up ({s['warmup_tokens']} tokens): RSS {s['rss_growth_bytes'] / mib:+.2f} MiB "
                    f"({'ok' if ok_rss else 'over'} the 1 MiB bar), anonymous {s['anon_growth_bytes'] / mib:+.2f} MiB, "
                    f"fds {s['fds_growth']:+d}, threads {s['threads_growth']:+d}, decode speed "
                    f"{s['decode_tps_first_quarter']:.1f} -> {s['decode_tps_last_quarter']:.1f} tok/s "
                    f"({drift}, {'ok' if ok_speed else 'over'} the 5 % bar)"]
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    x = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax[0, 0].plot(x, [r["rss"] / 2**20 for r in rows], label="RSS")
    ax[0, 0].plot(x, [r["anon"] / 2**20 for r in rows], label="anonymous")
    ax[0, 0].set_ylabel("MiB")
    ax[0, 0].legend()
    ax[0, 1].plot(x, [r["fds"] for r in rows])
    ax[0, 1].set_ylabel("open fds")
    ax[1, 0].plot(x, [r["threads"] for r in rows])
    ax[1, 0].set_ylabel("threads")
    ax[1, 1].plot([xi for xi, r in zip(x, rows) if r["decode_tps"]], [r["decode_tps"] for r in rows if r["decode_tps"]])
    ax[1, 1].set_ylabel("decode tok/s")
    for a in ax[1]:
        a.set_xlabel("tokens generated")
    fig.suptitle(f"soak: {res['nodes']} nodes, rebalance every {res['rebalance_every']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the small qwen3moe test model, Q4_K)")
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rebalance", type=int, default=256, help="rebalance_every, in tokens")
    ap.add_argument("--request", type=int, default=512, help="tokens generated per request (fresh context each)")
    ap.add_argument("--sample", type=int, default=0, help="tokens between samples (default: tokens / 40)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--out", default="soak.png", help="PNG plot to write")
    ap.add_argument("--json", help="also write the samples as JSON here")
    a = ap.parse_args(argv)
    res = soak(a.model or default_model(), a.tokens, a.nodes, a.rebalance, a.request,
               a.sample or max(1, a.tokens // 40), a.ctx)
    print(markdown(res))
    plot(res, a.out)
    print(f"\nplot: {a.out}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
