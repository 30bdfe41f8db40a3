"""End-to-end benchmark: moe_numa against llama.cpp's llama-bench, same GGUF file, same threads.

    moe-numa bench [-m MODEL.gguf ...] [-t THREADS] [--tests pp64,pp512,tg32,tg128] [-r 3]
                   [-d 0,1024,4096] [--kv-type f16 | -ctk f16 -ctv q8_0] [--flash-attn on]
                   [--llama-bench PATH | --llama-build DIR] [--repack 1] [--out PREFIX]
    moe-numa make-bench-model [--preset qwen3moe-bench] [--type q8_0,q4_k_m] [-o PATH] [--force]
    moe-numa make-bench-model --type lq-iq2_xxs     # low-bit mix: llama-quantize (+ imatrix) of the Q8_0 model

What one ``moe-numa bench`` does, per model:

1. reads the file once (page cache), takes its facts (``model_info``: weight bytes read
   per generated token);
2. runs ``--reps`` rounds; each round measures read bandwidth at the benchmark's thread
   count (bench/kernels.py's STREAM-like read), then runs A = our engine
   (``python -m moe_numa.bench.run_ours``, a fresh process) and B = ``llama-bench -r 1``
   (a fresh process), alternating A B A B; every process loads the model and does
   llama-bench's warm-ups before its timed repetitions (``--inner-reps``, default 1);
   with ``-d`` every test also runs at each depth (an untimed prompt of that many
   tokens first, as llama-bench ``-d``; named ``tg32@d1024``), and both engines get the
   same KV-cache types (``--kv-type``, or ``-ctk`` / ``-ctv`` apart) and llama-bench the ``--flash-attn`` setting;
3. accounts for CPU time taken by other processes during every timed sample
   (the machine's busy time minus the benchmarked process's and the harness's own CPU
   time); a run with a disturbed sample is repeated (``--max-retries``), and a
   disturbed sample that stays is flagged in the table;
4. reports medians [min-max] over rounds, the ratio ours / llama.cpp of the medians
   (same run), decode as a share of the bandwidth bound (read GB/s / weight bytes per
   token), load time and peak RSS of both, and whether the targets are met.

Outputs ``PREFIX.md`` (llama-bench-style markdown), ``PREFIX.json`` (every sample and
fact) and ``PREFIX.png`` (matplotlib, when installed).  The CPU accounting and memory
facts come from psutil (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from moe_numa.progress import progress_bar

from . import standalone_main

DEFAULT_TESTS = ("pp64", "pp512", "tg32", "tg128")
# issue 11's bar: decode >= 1.3x llama.cpp and, at Q8_0, >= 85% of the bandwidth bound;
# prefill >= 1.2x
DEFAULT_TARGET_TG = 1.3
DEFAULT_TARGET_PP = 1.2
DEFAULT_TARGET_SHARE = 0.85
# ... and at depth 4096 our decode keeps >= 70% of its depth-0 rate
DEFAULT_TARGET_KEEP = 0.70
KEEP_DEPTH = 4096
SHARE_TARGET_QUANTS = ("Q8_0",)
DEFAULT_NOISE = 0.05          # other processes may use 5% of one core during a sample
BENCH_PRESETS_DEFAULT = ("qwen3moe-bench",)
DEFAULT_QTYPES = ("q8_0", "q4_k_m")
ENGINES = ("moe_numa", "llama.cpp")


# ============================================================================ arithmetic

def summarize(values: Sequence[float]) -> dict | None:
    """{"median", "min", "max", "n"} of the values (None if there are none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def bound_tps(bandwidth_gbps: float | None, bytes_per_token: int | None) -> float | None:
    """Decode tokens/s if every generated token streamed its weights at the read bandwidth."""
    if not bandwidth_gbps or not bytes_per_token:
        return None
    return bandwidth_gbps * 1e9 / bytes_per_token


def tokens_per_s(n_tokens: int, ns: int | float) -> float:
    return n_tokens / (ns * 1e-9)


def parse_depths(spec: str) -> list[int]:
    """"0,1024,4096" -> [0, 1024, 4096] (llama-bench's -d)."""
    try:
        depths = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--depth {spec!r}: not a comma-separated list of token counts") from None
    if not depths or any(d < 0 for d in depths):
        raise ValueError(f"--depth {spec!r}: depths are token counts >= 0")
    return list(dict.fromkeys(depths))


def kind_of_test(test: str) -> str:
    return "tg" if test.startswith("tg") else "pp"


def target_for(test: str, target_pp: float, target_tg: float) -> float:
    return target_tg if kind_of_test(test) == "tg" else target_pp


# ============================================================================ CPU accounting

def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def read_busy_ticks() -> int:
    """Busy clock ticks of the whole machine: user + nice + system + irq + softirq + steal
    (steal: the hypervisor gave our CPU to someone else, which disturbs a benchmark as much
    as a local process); guest time is already inside user/nice; idle and iowait are not
    busy.  psutil reports /proc/stat's ticks as seconds; they are turned back into ticks."""
    import psutil
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
    return round(busy * clock_ticks())


def pid_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (all its threads), None if gone."""
    import psutil
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def peak_rss_sampler(pid: int) -> Callable[[], int]:
    """A function returning the largest RSS of process `pid` seen over its calls (0 if gone).
    Sampled, as psutil has no VmHWM: the harness calls it every 50 ms and at every line."""
    import psutil
    proc, peak = psutil.Process(pid), [0]

    def sample() -> int:
        try:
            peak[0] = max(peak[0], proc.memory_info().rss)
        except psutil.Error:
            pass
        return peak[0]
    return sample


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def others_cpu_s(busy0: int, busy1: int, own_s: float, hz: int | None = None) -> float:
    """CPU seconds used by everything else: machine busy time minus our own CPU seconds."""
    return (busy1 - busy0) / (hz or clock_ticks()) - own_s


def noise_slack_s(threads: int, hz: int | None = None) -> float:
    """Tick quantisation of /proc/stat: one tick per busy CPU at each end of a sample."""
    return (threads + 1) / (hz or clock_ticks())


def is_disturbed(others_s: float | None, wall_s: float, threshold: float, slack_s: float = 0.0) -> bool:
    """Did other processes use more than ``threshold`` of one core during ``wall_s``?"""
    if others_s is None:
        return False
    return others_s > threshold * wall_s + slack_s


@dataclass
class Snap:
    """A point in time: wall clock, machine busy ticks, harness CPU, child CPU."""
    t: float
    busy: int
    self_s: float
    child_s: float | None = None

    @classmethod
    def take(cls, pid: int | None = None) -> "Snap":
        return cls(time.perf_counter(), read_busy_ticks(), self_cpu_s(),
                   pid_cpu_s(pid) if pid else None)


def snap_others(a: Snap, b: Snap, hz: int | None = None) -> float | None:
    """Other processes' CPU seconds between two snaps (None without child CPU times)."""
    if a.child_s is None or b.child_s is None:
        return None
    return others_cpu_s(a.busy, b.busy, (b.child_s - a.child_s) + (b.self_s - a.self_s), hz)


# ============================================================================ llama-bench progress

_PROGRESS_RE = re.compile(
    r"llama-bench: benchmark (\d+)/(\d+): (starting|warmup prompt run|warmup generation run"
    r"|prompt run (\d+)/(\d+)|generation run (\d+)/(\d+)|depth run (\d+)/(\d+)(?: \(cached\))?)\s*$")


def parse_progress(line: str) -> dict | None:
    """A ``--progress`` line of llama-bench -> {"bench": i (1-based), "of": n, "kind", "rep"}.

    kind: "starting", "warmup" (prompt or generation), "prompt", "gen" or "depth";
    rep is the 1-based repetition for prompt/gen/depth lines, else None.
    """
    m = _PROGRESS_RE.search(line.strip())
    if not m:
        return None
    what = m.group(3)
    if what == "starting":
        kind, rep = "starting", None
    elif what.startswith("warmup"):
        kind, rep = "warmup", None
    elif what.startswith("prompt"):
        kind, rep = "prompt", int(m.group(4))
    elif what.startswith("generation"):
        kind, rep = "gen", int(m.group(6))
    else:
        kind, rep = "depth", int(m.group(8))
    return {"bench": int(m.group(1)), "of": int(m.group(2)), "kind": kind, "rep": rep}


@dataclass
class Event:
    line: str
    snap: Snap
    progress: dict | None = None


def llama_sample_noise(events: Sequence[Event], end: Snap, hz: int | None = None) -> dict[int, list[dict]]:
    """Per llama-bench instance (1-based), one {"wall_s", "others_cpu_s"} per timed repetition.

    A repetition spans from its "prompt run r/R" or "generation run r/R" line to the
    next progress line (or the end of the process): a little more than the timed part,
    never less.
    """
    prog = [e for e in events if e.progress]
    out: dict[int, list[dict]] = {}
    for i, e in enumerate(prog):
        p = e.progress
        if p["kind"] not in ("prompt", "gen"):
            continue
        # a pp+tg test prints "prompt run r" then "generation run r": one sample
        if p["kind"] == "gen" and i > 0 and prog[i - 1].progress["kind"] == "prompt" \
                and prog[i - 1].progress["bench"] == p["bench"] and prog[i - 1].progress["rep"] == p["rep"]:
            continue
        j = i + 1
        if p["kind"] == "prompt" and j < len(prog) and prog[j].progress["kind"] == "gen" \
                and prog[j].progress["bench"] == p["bench"] and prog[j].progress["rep"] == p["rep"]:
            j += 1
        stop = prog[j].snap if j < len(prog) else end
        out.setdefault(p["bench"], []).append(
            {"wall_s": stop.t - e.snap.t, "others_cpu_s": snap_others(e.snap, stop, hz)})
    return out


def llama_load_s(events: Sequence[Event]) -> float | None:
    """llama-bench's model load (+ context creation) time: from "benchmark 1/N: starting"
    to the first later progress line of that benchmark (its warm-up, or its first run)."""
    start = None
    for e in events:
        p = e.progress
        if not p or p["bench"] != 1:
            continue
        if p["kind"] == "starting":
            start = e.snap.t
        elif start is not None:
            return e.snap.t - start
    return None


# ============================================================================ child processes

@dataclass
class ChildResult:
    cmd: list[str]
    returncode: int
    stdout: str
    events: list[Event]
    start: Snap
    end: Snap
    wall_s: float
    cpu_s: float | None            # the child's own CPU seconds (wait4 rusage, all threads)
    peak_rss_bytes: int            # max RSS seen while it ran
    others_cpu_s: float | None     # other processes' CPU seconds over the whole run

    def stderr_tail(self, n: int = 30) -> str:
        return "\n".join(e.line for e in self.events[-n:])


def run_child(cmd: Sequence[str], timeout: float | None = None, env: dict | None = None,
              poll_s: float = 0.05, on_line: Callable[[str], None] | None = None) -> ChildResult:
    """Run a benchmarked process: stderr lines are time-stamped with CPU snapshots as
    they arrive, its peak RSS is its RSS sampled while it runs (ru_maxrss of a child
    would include the harness's own RSS at fork time), its CPU time comes from wait4."""
    cmd = [str(c) for c in cmd]
    start = Snap.take()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         text=True, errors="replace", bufsize=1)
    start.child_s = 0.0
    out_chunks: list[str] = []
    rss = peak_rss_sampler(p.pid)
    done = threading.Event()

    def read_stdout():
        out_chunks.append(p.stdout.read())

    def poll_rss():
        while not done.wait(poll_s):
            rss()

    t_out = threading.Thread(target=read_stdout, daemon=True)
    t_rss = threading.Thread(target=poll_rss, daemon=True)
    t_out.start()
    t_rss.start()
    killed = []
    timer = None
    if timeout:
        def kill():
            killed.append(True)
            p.kill()
        timer = threading.Timer(timeout, kill)
        timer.start()
    events: list[Event] = []
    try:
        for line in p.stderr:
            line = line.rstrip("\n")
            snap = Snap.take(p.pid)
            rss()
            events.append(Event(line, snap, parse_progress(line)))
            if on_line:
                on_line(line)
        end_busy = read_busy_ticks()
        end_t = time.perf_counter()
        end_self = self_cpu_s()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    finally:
        done.set()
        if timer:
            timer.cancel()
        t_out.join(timeout=10)
        t_rss.join(timeout=10)
        if p.returncode is None:       # interrupted: end the child we started
            p.kill()
            p.wait()
    cpu = ru.ru_utime + ru.ru_stime
    end = Snap(end_t, end_busy, end_self, cpu)
    if killed:
        raise TimeoutError(f"{cmd[0]} ran longer than {timeout:.0f} s and was killed")
    return ChildResult(cmd=cmd, returncode=p.returncode, stdout="".join(out_chunks), events=events,
                       start=start, end=end, wall_s=end.t - start.t, cpu_s=cpu, peak_rss_bytes=rss(),
                       others_cpu_s=snap_others(start, end))


def wait_quiet(max_wait_s: float, threshold: float, interval: float = 0.5,
               log: Callable[[str], None] = print) -> dict:
    """Wait (up to max_wait_s) until other processes use at most ``threshold`` of a core
    over ``interval``; returns {"waited_s", "others_frac"} of the last interval."""
    t0 = time.perf_counter()
    hz = clock_ticks()
    frac = 0.0
    while True:
        a = Snap.take()
        time.sleep(interval)
        b = Snap.take()
        others = others_cpu_s(a.busy, b.busy, b.self_s - a.self_s, hz)
        frac = max(0.0, others) / (b.t - a.t)
        waited = time.perf_counter() - t0
        if frac <= threshold or waited >= max_wait_s:
            if waited > 2 * interval:
                log(f"  waited {waited:.1f} s for a quiet machine (others now {100 * frac:.0f}% of a core)")
            return {"waited_s": round(waited, 2), "others_frac": round(frac, 4)}


# ============================================================================ the two engines

def parse_ours_json(text: str) -> dict:
    """The JSON object our runner prints on its last JSON line, checked and normalised:
    every test gets ``samples_ts`` recomputed from ``samples_ns``."""
    obj = None
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"run_ours printed bad JSON: {e}") from None
            break
    if obj is None:
        raise ValueError("run_ours printed no JSON object")
    for key in ("load_s", "tests", "threads"):
        if key not in obj:
            raise ValueError(f"run_ours JSON has no {key!r}")
    for t in obj["tests"]:
        n = int(t["n_prompt"]) + int(t["n_gen"])
        t["samples_ts"] = [tokens_per_s(n, ns) for ns in t["samples_ns"]]
        if len(t.get("others_cpu_s", [])) != len(t["samples_ns"]):
            t["others_cpu_s"] = [None] * len(t["samples_ns"])
        t.setdefault("samples_wall_s", [ns * 1e-9 for ns in t["samples_ns"]])
    return obj


def _finish_run(rec: dict, threads: int, threshold: float) -> dict:
    """Flag the disturbed samples of a run record; ``excess_others_s`` is how far the worst
    sample went over the allowance (<= 0: undisturbed), used to pick the least bad run."""
    slack = noise_slack_s(threads)
    n_dist = 0
    worst = 0.0
    excess = float("-inf")
    for t in rec["tests"].values():
        flags = []
        for o, w in zip(t["others_cpu_s"], t["wall_s"]):
            d = is_disturbed(o, w, threshold, slack)
            flags.append(d)
            if o is not None:
                excess = max(excess, o - threshold * w - slack)
                if d and w > 0:
                    worst = max(worst, o / w)
        t["disturbed"] = flags
        n_dist += sum(flags)
    rec["disturbed_samples"] = n_dist
    rec["disturbed"] = n_dist > 0
    rec["worst_others_frac"] = round(worst, 4)       # over the disturbed samples
    rec["excess_others_s"] = None if excess == float("-inf") else round(excess, 4)
    return rec


def run_ours_once(model: str, threads: int, tests: Sequence[str], inner_reps: int, threshold: float,
                  numa_nodes: int | None = None, expert_map: str | None = None, seed: int = 0,
                  timeout: float | None = None, python: str | None = None, simd: str = "native",
                  kv_type: str | None = None, kv_type_v: str | None = None) -> dict:
    cmd = [python or sys.executable, "-m", "moe_numa.bench.run_ours", model, "--threads", str(threads),
           "--tests", ",".join(tests), "--reps", str(inner_reps), "--seed", str(seed), "--json"]
    if kv_type:
        cmd += ["--cache-type-k", kv_type]
    if kv_type_v or kv_type:
        cmd += ["--cache-type-v", kv_type_v or kv_type]
    if numa_nodes:
        cmd += ["--numa-nodes", str(numa_nodes)]
    if expert_map:
        cmd += ["--expert-map", expert_map]
    env = None if simd == "native" else dict(os.environ, MOE_NUMA_SIMD=simd)
    res = run_child(cmd, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"our runner failed (exit {res.returncode}): {' '.join(res.cmd)}\n"
                           + res.stderr_tail() + "\n" + res.stdout[-2000:])
    obj = parse_ours_json(res.stdout)
    rec = {"engine": "moe_numa", "load_s": obj["load_s"], "placed_s": obj.get("placed_s"),
           "peak_rss_bytes": max(int(obj.get("peak_rss_bytes") or 0), res.peak_rss_bytes),
           "wall_s": res.wall_s, "cpu_s": res.cpu_s, "others_cpu_s": res.others_cpu_s,
           "simd": obj.get("simd"), "n_nodes": obj.get("n_nodes"), "threads_per_node": obj.get("threads_per_node"),
           "n_ctx": obj.get("n_ctx"), "kv_type": obj.get("kv_type"), "kv_type_v": obj.get("kv_type_v"),
           "load_fill_gbps": obj.get("load_fill_gbps"),
           "load_mapped_bytes": obj.get("load_mapped_bytes"), "load_phases": obj.get("load_phases"),
           "cmd": res.cmd,
           "tests": {t["test"]: {"samples_ts": t["samples_ts"], "samples_ns": t["samples_ns"],
                                 "wall_s": t["samples_wall_s"], "others_cpu_s": t["others_cpu_s"],
                                 "warmup_ns": t.get("warmup_ns"), "imbalance": t.get("imbalance"),
                                 "wait_frac": t.get("wait_frac")} for t in obj["tests"]}}
    return _finish_run(rec, threads, threshold)


def llama_bench_cmd(bench_path: str, model: str, threads: int, tests: Sequence[str], inner_reps: int,
                    repack: bool, extra_args: Sequence[str] = (), kv_type: str | None = None,
                    flash_attn: str | None = None, kv_type_v: str | None = None) -> list[str]:
    """llama-bench's command line. Tests named "tg32@d1024" become `-n 32 -d 1024`: llama-bench
    runs every test at every depth, so `tests` must be such a product (with_depths)."""
    from .llama_cpp import _bench_test_args
    from .run_ours import test_depth
    base = list(dict.fromkeys(t.split("@")[0] for t in tests))
    depths = list(dict.fromkeys(test_depth(t) for t in tests))
    cmd = ([str(bench_path), "-m", str(model), "-o", "json", "-t", str(threads), "-r", str(inner_reps),
            "--repack", "1" if repack else "0"] + _bench_test_args(base))
    if depths != [0]:
        cmd += ["-d", ",".join(str(d) for d in depths)]
    if kv_type:
        cmd += ["-ctk", kv_type]
    if kv_type_v or kv_type:
        cmd += ["-ctv", kv_type_v or kv_type]
    if flash_attn:
        cmd += ["-fa", flash_attn]
    return cmd + ["--progress"] + list(extra_args)


def llama_record(res: ChildResult, threads: int, threshold: float) -> dict:
    """Turn a finished llama-bench process into a run record (samples, noise, load, RSS)."""
    from .llama_cpp import parse_llama_bench_json
    recs = parse_llama_bench_json(res.stdout)
    noise = llama_sample_noise(res.events, res.end)
    tests = {}
    for i, r in enumerate(recs, start=1):
        ns = r["samples_ns"]
        n = r["n_prompt"] + r["n_gen"]
        nz = noise.get(i, [])
        if len(nz) != len(ns):           # no usable progress lines: account nothing
            nz = [{"wall_s": x * 1e-9, "others_cpu_s": None} for x in ns]
        tests[r["test"]] = {"samples_ts": [tokens_per_s(n, x) for x in ns], "samples_ns": ns,
                            "wall_s": [z["wall_s"] for z in nz], "others_cpu_s": [z["others_cpu_s"] for z in nz]}
    first = recs[0]["raw"] if recs else {}
    rec = {"engine": "llama.cpp", "load_s": llama_load_s(res.events), "peak_rss_bytes": res.peak_rss_bytes,
           "wall_s": res.wall_s, "cpu_s": res.cpu_s, "others_cpu_s": res.others_cpu_s, "cmd": res.cmd,
           "llama_bench": {k: first.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                                     "model_type", "model_size", "model_n_params", "n_batch",
                                                     "n_ubatch", "type_k", "type_v", "flash_attn", "repack",
                                                     "n_threads", "poll", "use_mmap", "load_mode")
                           if k in first},
           "tests": tests}
    return _finish_run(rec, threads, threshold)


REPACK_ABORT = "GGML_ASSERT(*cur_backend_id != -1)"


def run_llama_once(bench_path: str, model: str, threads: int, tests: Sequence[str], inner_reps: int,
                   threshold: float, repack: bool = True, extra_args: Sequence[str] = (),
                   timeout: float | None = None, kv_type: str | None = None, flash_attn: str | None = None,
                   kv_type_v: str | None = None, log: Callable[[str], None] = print) -> dict:
    def cmd(with_repack: bool) -> list[str]:
        return llama_bench_cmd(bench_path, model, threads, tests, inner_reps, with_repack, extra_args, kv_type,
                               flash_attn, kv_type_v)
    res = run_child(cmd(repack), timeout=timeout)
    fallback = None
    if res.returncode != 0 and repack and REPACK_ABORT in res.stderr_tail():
        # b11434's AMX build with repack on aborts on some files (DeepSeek's MLA tensors):
        # run it as it can run, and say so in the record
        fallback = f"llama-bench aborted with repack on ({REPACK_ABORT}); ran with --repack 0"
        log(f"  {fallback}")
        res = run_child(cmd(False), timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {res.returncode}): {' '.join(res.cmd)}\n"
                           + res.stderr_tail())
    rec = llama_record(res, threads, threshold)
    if fallback:
        rec["repack_fallback"] = fallback
    return rec


def run_with_retries(fn: Callable[[], dict], max_retries: int, quiet: Callable[[], dict] | None = None,
                     log: Callable[[str], None] = print) -> list[dict]:
    """Run ``fn`` until a run is undisturbed or the retries are spent.  Returns every
    attempt; exactly one has ``accepted`` True: the undisturbed one, or else the least
    disturbed."""
    attempts = []
    for k in range(max_retries + 1):
        q = quiet() if quiet else None
        rec = fn()
        rec["attempt"] = k
        rec["quiet_wait"] = q
        rec["accepted"] = False
        attempts.append(rec)
        if not rec["disturbed"]:
            break
        log(f"  {rec['engine']}: {rec['disturbed_samples']} disturbed sample(s) (others up to "
            f"{100 * rec['worst_others_frac']:.0f}% of a core)"
            + ("; repeating" if k < max_retries else "; keeping the least disturbed run"))
    best = min(attempts, key=lambda r: (r["disturbed_samples"], r["excess_others_s"] or 0.0)) \
        if attempts[-1]["disturbed"] else attempts[-1]
    best["accepted"] = True
    return attempts


# ============================================================================ bandwidth

def measure_bandwidth(threads: int, nbytes: int | None = None, reps: int = 5) -> float:
    """Read GB/s at ``threads`` threads with bench/kernels.py's STREAM-like read
    (the better of plain and prefetched loads, best of ``reps``)."""
    import numpy as np
    from moe_numa import kernels as K
    from .kernels import cache_bytes, paired
    cpus = K.order_cpus(K.available_cpus())
    if threads > len(cpus):
        cpus = [cpus[i % len(cpus)] for i in range(threads)]
    nbytes = nbytes or max(256 << 20, 8 * cache_bytes())
    buf = np.ones(nbytes // 4, dtype=np.float32)
    pool = K.ThreadPool(cpus[:threads])
    try:
        gbps, _ = paired(buf, pool, lambda: None, reps)
    finally:
        pool.close()
        del buf
    return gbps


# ============================================================================ facts

def model_facts(path: str) -> dict:
    import gguf
    from moe_numa.gguf_file import GGUFModelFile
    from moe_numa.model_info import model_info
    from moe_numa.models import load_model
    g = GGUFModelFile(path)
    _, cfg, _ = load_model(g)
    info = model_info(g, cfg)
    ft = g.get("general.file_type")
    try:
        quant = gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_") if ft is not None else None
    except ValueError:
        quant = None
    if quant is None and info.quant_types:
        quant = max(info.quant_types, key=info.quant_types.get)
    return {"path": str(path), "name": Path(path).name.removesuffix(".gguf"), "arch": info.arch,
            "quant": quant, "n_params": info.n_params, "weight_bytes": sum(info.bytes_by_class.values()),
            "file_bytes": info.file_bytes, "bytes_per_token": info.bytes_per_token, "n_layer": info.n_layer,
            "n_expert": info.n_expert, "n_used": info.n_used, "hidden": info.hidden, "n_vocab": info.n_vocab}


def _lscpu() -> dict:
    out = {}
    try:
        text = subprocess.run(["lscpu"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              timeout=20).stdout
        for line in text.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                out[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# (vendor, family) -> [(first model, last model, name)]: what a VM's masked model name hides
_UARCH = {("AuthenticAMD", 23): [(0x30, 0x3F, "Zen 2"), (0x60, 0x7F, "Zen 2"), (0x00, 0x2F, "Zen / Zen+")],
          ("AuthenticAMD", 25): [(0x00, 0x0F, "Zen 3"), (0x20, 0x5F, "Zen 3"), (0x10, 0x1F, "Zen 4"),
                                 (0x60, 0xAF, "Zen 4")],
          ("AuthenticAMD", 26): [(0x00, 0xFF, "Zen 5")],
          ("GenuineIntel", 6): [(0x55, 0x55, "Skylake-SP / Cascade Lake"), (0x6A, 0x6C, "Ice Lake-SP"),
                                (0x8F, 0x8F, "Sapphire Rapids"), (0xCF, 0xCF, "Emerald Rapids"),
                                (0xAD, 0xAE, "Granite Rapids")]}


def cpu_label(ls: dict) -> str:
    """The model name with family, model, microarchitecture and the SIMD extensions that
    matter here, e.g. "AMD EPYC (family 25, model 17: Zen 4; AVX2, AVX-512, VNNI, BF16, no AMX)"."""
    name = ls.get("Model name") or platform.processor() or "unknown CPU"
    try:
        fam, mod = int(ls.get("CPU family", "")), int(ls.get("Model", ""))
    except ValueError:
        return name
    uarch = next((n for lo, hi, n in _UARCH.get((ls.get("Vendor ID"), fam), []) if lo <= mod <= hi), None)
    flags = set(ls.get("Flags", "").split())
    isa = [n for f, n in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"),
                          ("avx512_bf16", "BF16")) if f in flags]
    isa.append("AMX" if "amx_int8" in flags else "no AMX")
    return f"{name} (family {fam}, model {mod}" + (f": {uarch}" if uarch else "") + f"; {', '.join(isa)})"


def machine_facts(threads: int) -> dict:
    from moe_numa import kernels as K
    from moe_numa.numa.topology import topology
    ls = _lscpu()
    topo = topology(None)
    import psutil
    mem = psutil.virtual_memory().total
    return {"cpu": cpu_label(ls), "cpus": os.cpu_count(),
            "physical_cores": sum(len(n.physical) for n in topo.nodes), "numa_nodes": topo.n_nodes,
            "memory_bytes": mem, "hypervisor": ls.get("Hypervisor vendor"), "simd": K.simd_level(),
            "prefetch_bytes": K.prefetch_distance(), "kernel": platform.release(), "threads": threads, "loadavg_start": _loadavg()}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        p = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=20)
        return p.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def llama_facts(args, log) -> tuple[str, dict]:
    """(path of llama-bench, what build it is)."""
    if args.llama_bench:
        path = Path(args.llama_bench).resolve()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SystemExit(f"--llama-bench {path}: not an executable file")
        return str(path), {"source": "given binary (--llama-bench)", "path": str(path),
                           "version": _bench_version(path)}
    if args.llama_build:
        d = Path(args.llama_build).resolve()
        for cand in (d / "bin" / "llama-bench", d / "llama-bench"):
            if cand.is_file():
                return str(cand), {"source": "given build dir (--llama-build)", "build_dir": str(d),
                                   "path": str(cand), "version": _bench_version(cand),
                                   "cmake_flags": _cmake_cache_flags(d)}
        raise SystemExit(f"--llama-build {d}: no bin/llama-bench there")
    from .llama_cpp import find_or_build
    b = find_or_build(log=log, allow_build=not args.no_build, simd=args.simd)
    path = b.path("llama-bench")
    info = {k: b.info.get(k) for k in ("tag", "source", "compiler", "cmake_flags", "simd_variant", "date",
                                       "system_info")}
    info.update(source=f"cached build of {b.info.get('source', 'llama.cpp')}", build_dir=str(b.build_dir),
                path=str(path), version=_bench_version(path))
    return str(path), info


def _bench_version(path) -> str:
    try:
        p = subprocess.run([str(path), "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=60)
        return " ".join(p.stdout.split())
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cmake_cache_flags(d: Path) -> list[str]:
    flags = []
    cache = d / "CMakeCache.txt"
    if cache.is_file():
        for line in cache.read_text(errors="replace").splitlines():
            if re.match(r"(GGML_\w+|CMAKE_BUILD_TYPE|CMAKE_C_COMPILER|CMAKE_CXX_COMPILER|CMAKE_C_FLAGS"
                        r"|CMAKE_CXX_FLAGS)(:\w+)?=", line) and not line.split("=", 1)[1] in ("", "OFF"):
                k, v = line.split("=", 1)
                flags.append(f"-D{k.split(':')[0]}={v}")
    return flags


def prefetch_file(path: str, chunk: int = 64 << 20) -> float:
    """Read the file once so both engines start from a warm page cache; seconds taken."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


# ============================================================================ aggregation

def _accepted(runs: Sequence[dict], engine: str) -> list[dict]:
    return [r for r in runs if r["engine"] == engine and r.get("accepted") and not r.get("warmup_round")]


def aggregate(runs: Sequence[dict], tests: Sequence[str], bandwidth_gbps: float | None,
              bytes_per_token: int | None, target_pp: float = DEFAULT_TARGET_PP,
              target_tg: float = DEFAULT_TARGET_TG, target_share: float | None = None,
              target_keep: float | None = DEFAULT_TARGET_KEEP) -> dict:
    """Rows of the summary table from run records (accepted, non-warm-up runs only).
    `target_share`: the share of the bandwidth bound decode rows must also reach (Q8_0).
    `target_keep`: the share of its depth-0 rate our decode must keep at depth KEEP_DEPTH or
    more (tgN@dD against tgN, where both ran)."""
    ours, theirs = _accepted(runs, "moe_numa"), _accepted(runs, "llama.cpp")
    bound = bound_tps(bandwidth_gbps, bytes_per_token)
    rows = []
    for test in tests:
        s = {}
        for name, rr in (("moe_numa", ours), ("llama.cpp", theirs)):
            vals = [v for r in rr if test in r["tests"] for v in r["tests"][test]["samples_ts"]]
            flags = sum(sum(r["tests"][test].get("disturbed", [])) for r in rr if test in r["tests"])
            s[name] = (summarize(vals), flags)
        (so, fo), (sl, fl) = s["moe_numa"], s["llama.cpp"]
        # per-round ratios: the two runs of one round saw the same machine state
        paired = []
        for r in sorted({x["round"] for x in ours} & {x["round"] for x in theirs}):
            a = [x for x in ours if x["round"] == r and test in x["tests"]]
            b = [x for x in theirs if x["round"] == r and test in x["tests"]]
            if a and b:
                paired.append(ratio(statistics.median(a[0]["tests"][test]["samples_ts"]),
                                    statistics.median(b[0]["tests"][test]["samples_ts"])))
        rat = ratio(so and so["median"], sl and sl["median"])
        tgt = target_for(test, target_pp, target_tg)
        is_tg = kind_of_test(test) == "tg"
        share = ratio(so and so["median"], bound) if is_tg else None
        # the bound counts the weights only, not a deep context's KV reads: depth-0 decode only
        share_tgt = target_share if is_tg and "@" not in test and target_share and share is not None else None
        met = None if rat is None else rat >= tgt and (share_tgt is None or share >= share_tgt)
        rows.append({
            "test": test, "moe_numa": so, "llama.cpp": sl, "ratio": rat,
            "paired_ratios": paired, "paired_ratio": summarize(paired),
            "target": tgt, "share_target": share_tgt, "met": met,
            "bound_tps": bound if is_tg else None,
            "share_moe_numa": share,
            "share_llama.cpp": ratio(sl and sl["median"], bound) if is_tg else None,
            "disturbed_kept": {"moe_numa": fo, "llama.cpp": fl},
        })
    _depth_keeps(rows, target_keep)
    extra = {}
    for key in ("load_s", "peak_rss_bytes"):
        a = summarize([r[key] for r in ours if r.get(key) is not None])
        b = summarize([r[key] for r in theirs if r.get(key) is not None])
        extra[key] = {"moe_numa": a, "llama.cpp": b, "ratio": ratio(a and a["median"], b and b["median"])}
    return {"rows": rows, "load_s": extra["load_s"], "peak_rss_bytes": extra["peak_rss_bytes"],
            "bound_tps": bound}


def _depth_keeps(rows: list[dict], target_keep: float | None) -> None:
    """Each decode row at depth gets what it keeps of its depth-0 row's rate, per engine; at
    KEEP_DEPTH or deeper that is also a target of ours."""
    by_test = {r["test"]: r for r in rows}
    for r in rows:
        base, _, depth = r["test"].partition("@d")
        d0 = by_test.get(base)
        if not depth or kind_of_test(base) != "tg" or d0 is None:
            continue
        r["keep_of"] = base
        for eng in ENGINES:
            r[f"keep_{eng}"] = ratio(r[eng] and r[eng]["median"], d0[eng] and d0[eng]["median"])
        if target_keep and int(depth) >= KEEP_DEPTH and r["keep_moe_numa"] is not None:
            r["keep_target"] = target_keep
            if r["met"] is not None:
                r["met"] = r["met"] and r["keep_moe_numa"] >= target_keep


def targets_summary(rows: Sequence[dict]) -> tuple[list[str], list[str]]:
    """(met, missed) as short strings like "tg32 1.31x >= 1.30x" (", 86% >= 85% of the bound"
    where a row has a share target)."""
    met, missed = [], []
    for r in rows:
        if r["met"] is None:
            continue
        s = f"{r['test']} {r['ratio']:.2f}x {'>=' if r['ratio'] >= r['target'] else '<'} {r['target']:.2f}x"
        if r.get("share_target"):
            ok = r["share_moe_numa"] >= r["share_target"]
            s += f", {_pct_vs(r['share_moe_numa'], r['share_target'])} {'>=' if ok else '<'} {_pct(r['share_target'])} of the bound"
        if r.get("keep_target"):
            ok = r["keep_moe_numa"] >= r["keep_target"]
            s += (f", keeps {_pct_vs(r['keep_moe_numa'], r['keep_target'])} {'>=' if ok else '<'} {_pct(r['keep_target'])} "
                  f"of {r['keep_of']}")
        (met if r["met"] else missed).append(s)
    return met, missed


# ============================================================================ markdown

def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def fmt_summary(s: dict | None, scale: float = 1.0, digits: int = 2, flags: int = 0) -> str:
    """"median [min–max]" (with a dagger when disturbed samples were kept)."""
    if not s:
        return "–"
    dag = " †" if flags else ""
    if s["n"] == 1:
        return f"{s['median'] / scale:.{digits}f}{dag}"
    return f"{s['median'] / scale:.{digits}f} [{s['min'] / scale:.{digits}f}–{s['max'] / scale:.{digits}f}]{dag}"


def _gib(n: float | None) -> str:
    return "–" if not n else f"{n / 2**30:.2f} GiB"


def _balance_line(mrep: dict) -> str | None:
    """Node balance of our runs per test: imbalance (critical path ÷ mean node busy time)
    and the share of node time spent waiting on the slowest node, medians over samples."""
    parts = []
    runs = _accepted(mrep.get("runs") or [], "moe_numa")
    for test in dict.fromkeys(t for r in runs for t in r["tests"]):
        imb = [v for r in runs for v in r["tests"].get(test, {}).get("imbalance") or []]
        wf = [v for r in runs for v in r["tests"].get(test, {}).get("wait_frac") or []]
        if imb:
            parts.append(f"{test} {statistics.median(imb):.3f} (waits {100 * statistics.median(wf):.1f}%)")
    return ("Node balance (moe_numa, imbalance = critical path ÷ mean node busy time): " + "; ".join(parts) + ".") \
        if parts else None


def format_markdown(report: dict) -> str:
    s = report["settings"]
    m = report["machine"]
    L = report.get("llama_cpp") or {}
    lines = ["# moe_numa vs llama.cpp (`moe-numa bench`)", ""]
    lines.append(f"- date: {report['created']}; moe_numa {report.get('moe_numa_commit') or '?'} "
                 f"(CPU's SIMD {m.get('simd')}"
                 + (f", prefetch {m['prefetch_bytes']} B ahead" if m.get("prefetch_bytes") is not None else "")
                 + (f"; ours run with MOE_NUMA_SIMD={s['simd']})" if s.get("simd", "native") != "native" else ")"))
    lines.append(f"- machine: {m.get('cpu')}, {m.get('physical_cores')} physical cores / {m.get('cpus')} CPUs, "
                 f"{m.get('numa_nodes')} NUMA node(s), {_gib(m.get('memory_bytes'))} RAM"
                 + (f", {m['hypervisor']} guest" if m.get("hypervisor") else "")
                 + f"; loadavg at start {' '.join(str(x) for x in m.get('loadavg_start', []))}")
    if s.get("kv_type"):
        ours = (s["kv_type"], s.get("kv_type_v", s["kv_type"]))
        theirs = (s.get("llama_kv_type", ours[0]), s.get("llama_kv_type_v", s.get("llama_kv_type", ours[1])))
        name = ours[0] if ours[0] == ours[1] else f"K {ours[0]} / V {ours[1]}"
        lines.append((f"- KV cache {name} for both engines (llama-bench `-ctk {ours[0]} -ctv {ours[1]}`)"
                      if theirs == ours
                      else f"- KV cache: moe_numa {name}, llama.cpp K {theirs[0]} / V {theirs[1]} (**not the same**: "
                           f"llama-bench takes no f32 cache type)")
                     + f", llama-bench flash attention `-fa {s.get('flash_attn')}`"
                     + (f"; depths {','.join(str(d) for d in s['depths'])} (`-d`: each test after an untimed "
                        "prompt of that many tokens, named `test@dN`)" if s.get("depths", [0]) != [0] else ""))
    lines.append(f"- threads: {s['threads']} for both (llama-bench `-t {s['threads']}`; moe_numa "
                 f"{report.get('ours_layout') or '-'})")
    if s["engine_only"]:
        lines.append("- llama.cpp: not run (`--engine-only`)")
    else:
        lines.append(f"- llama.cpp: {L.get('version', '?')}; {L.get('source', '')}"
                     + (f"; {L['compiler']}" if L.get("compiler") else "")
                     + f"; binary `{L.get('path')}`")
        if L.get("cmake_flags"):
            lines.append(f"  - cmake flags: `{' '.join(L['cmake_flags'])}`")
        lb = report.get("llama_bench_settings") or {}
        fa = {-1: "auto", 0: "off", 1: "on"}.get(lb.get("flash_attn"), lb.get("flash_attn"))
        lines.append(f"  - llama-bench settings: repack {'on' if s['repack'] else 'off'}"
                     + (f", extra args `{' '.join(s['llama_args'])}`" if s["llama_args"] else "")
                     + (f"; as it ran: batch {lb.get('n_batch')}, ubatch {lb.get('n_ubatch')}, KV cache "
                        f"{lb.get('type_k')}/{lb.get('type_v')}, flash attention {fa}" if lb else ""))
        fell = sorted({m["facts"]["name"] for m in report.get("models", []) for r in m.get("runs") or []
                       if r.get("repack_fallback")})
        if fell:
            lines.append(f"  - **repack off** for {', '.join(fell)}: llama-bench aborted with repack on "
                         f"(`{REPACK_ABORT}`), so those runs used `--repack 0`")
    lines.append(f"- method: {s['reps']} round(s)"
                 + (f" after {s['warmup_rounds']} discarded warm-up round(s)" if s["warmup_rounds"] else "")
                 + ", each a fresh process per engine (model loaded each time), alternating A B A B "
                 "(moe_numa, llama.cpp); in every process llama-bench's warm-up (ppN: the prompt once; tgN: one "
                 f"token) then {s['inner_reps']} timed repetition(s) per test from an empty context; "
                 "tgN times N single-token steps including the first. t/s: median [min–max] over all samples; "
                 "ratio = moe_numa / llama.cpp of the medians.")
    lines.append(f"- noise: a sample is disturbed when other processes used more than {100 * s['noise_threshold']:.0f}% "
                 "of one core during it (machine busy time minus the benchmarked process and the harness); "
                 f"disturbed runs are repeated up to {s['max_retries']} time(s). Repeated runs: "
                 f"{report['noise']['repeated']}; disturbed samples kept (marked †): {report['noise']['kept']}.")
    lines.append("- bound: decode tokens/s if each token read its weights (weight bytes per token, "
                 "`moe_numa.model_info`) at the read bandwidth measured in the same run "
                 "(bench/kernels.py STREAM-like read at the same thread count, once per round); share = t/s ÷ bound.")
    all_missed = []
    for mrep in report["models"]:
        f = mrep["facts"]
        a = mrep["summary"]
        bw = mrep.get("bandwidth_gbps")
        lines += ["", f"## {f['name']}", ""]
        bws = summarize(mrep.get("bandwidth_samples_gbps", []))
        lines.append(f"`{f['path']}`: {f['arch']}, {f['n_layer']} layers, {f['n_expert']} experts top-{f['n_used']}, "
                     f"hidden {f['hidden']}, vocab {f['n_vocab']}; weight bytes per token "
                     f"{f['bytes_per_token'] / 2**30:.3f} GiB")
        if bw:
            lines.append(f"read bandwidth at {s['threads']} threads: {fmt_summary(bws)} GB/s → decode bound "
                         f"{_fmt(a['bound_tps'])} t/s")
        lines += ["", "| model | size | params | quant | threads | test | moe_numa t/s | llama.cpp t/s | ratio "
                  "| target | share of bound (moe_numa / llama.cpp) |",
                  "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | --- | --- |"]
        label = f["name"] if f["name"].startswith(f["arch"]) else f"{f['arch']} {f['name']}"
        head = (f"| {label} | {_gib(f['weight_bytes'])} | {f['n_params'] / 1e9:.2f} B | "
                f"{f['quant']} | {s['threads']} ")
        for r in a["rows"]:
            tgt = "–" if r["met"] is None else \
                f"≥ {r['target']:.2f}" + (f", ≥ {_pct(r['share_target'])} of bound" if r.get("share_target") else "") \
                + (f", keeps ≥ {_pct(r['keep_target'])} of d0" if r.get("keep_target") else "") \
                + f": {'met' if r['met'] else '**missed**'}"
            share = "" if r["bound_tps"] is None else \
                f"{_pct(r['share_moe_numa'])} / {_pct(r['share_llama.cpp'])}"
            if r.get("keep_moe_numa") is not None:
                share += f"; keeps {_pct(r['keep_moe_numa'])} / {_pct(r.get('keep_llama.cpp'))} of {r['keep_of']}"
            lines.append(head + f"| {r['test']} | {fmt_summary(r['moe_numa'], flags=r['disturbed_kept']['moe_numa'])} "
                         f"| {fmt_summary(r['llama.cpp'], flags=r['disturbed_kept']['llama.cpp'])} "
                         f"| {_fmt(r['ratio'])} | {tgt} | {share} |")
        ld, rss = a["load_s"], a["peak_rss_bytes"]
        lines.append(head + f"| load time (s, lower is better) | {fmt_summary(ld['moe_numa'])} | "
                     f"{fmt_summary(ld['llama.cpp'])} | {_fmt(ld['ratio'])} | | |")
        fill = summarize([r["load_fill_gbps"] for r in _accepted(mrep.get("runs") or [], "moe_numa")
                          if r.get("load_fill_gbps")])
        if fill:
            mapped = any(r.get("load_mapped_bytes") for r in _accepted(mrep.get("runs") or [], "moe_numa"))
            how = "mapped from the file, no copy" if mapped else "copied into node memory"
            lines.append(head + f"| load: placement fill ({how}; GB/s, higher is better) | {fmt_summary(fill)} "
                                f"| | | | |")
        behind = [r for r in _accepted(mrep.get("runs") or [], "moe_numa")
                  if r.get("placed_s") and r["placed_s"] > r["load_s"] + 0.05]
        if behind:   # one node: mapped at load, copied into hugepage memory behind the first token
            lines.append(head + f"| load: all weights copied into node memory, behind the first token (s) | "
                                f"{fmt_summary(summarize([r['placed_s'] for r in behind]))} | | | | |")
        lines.append(head + f"| peak RSS (GiB, lower is better) | {fmt_summary(rss['moe_numa'], scale=2**30)} | "
                     f"{fmt_summary(rss['llama.cpp'], scale=2**30)} | {_fmt(rss['ratio'])} | | |")
        met, missed = targets_summary(a["rows"])
        lines.append("")
        bal = _balance_line(mrep)
        if bal:
            lines += [bal, ""]
        if missed:
            lines.append("**Targets missed:** " + "; ".join(missed) + ("." if not met else ". Met: " + "; ".join(met) + "."))
            all_missed += [f"{f['name']} {x}" for x in missed]
        elif met:
            lines.append("**All targets met:** " + "; ".join(met) + ".")
        else:
            lines.append("Targets: not evaluated (no llama.cpp numbers).")
    lines += ["", "llama.cpp load time: from llama-bench's `benchmark 1/N: starting` to its first warm-up line "
              "(model load, repacking, context creation); moe_numa load time: `moe_numa.load` (placement "
              "into node arenas included). Peak RSS: the process's largest RSS, sampled every 50 ms.", ""]
    if all_missed:
        lines.append(f"Overall: {len(all_missed)} target(s) missed.")
    lines.append("")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _pct_vs(x: float, target: float) -> str:
    """x as a percentage, with a decimal where whole percents would print it equal to a
    target it misses (69.7% < 70%, not 70% < 70%)."""
    if x < target and round(100 * x) >= round(100 * target):
        return f"{100 * x:.1f}%"
    return _pct(x)


# ============================================================================ plot

def write_plot(report: dict, path: str | os.PathLike) -> bool:
    """PNG of t/s per test for both engines (median, min–max bars) with the decode bound.
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.0, 5.5 * len(models)), 4.2), squeeze=False)
    colors = {"moe_numa": "#1f77b4", "llama.cpp": "#ff7f0e"}
    for ax, mrep in zip(axes[0], models):
        rows = mrep["summary"]["rows"]
        x = list(range(len(rows)))
        w = 0.38
        for k, eng in enumerate(ENGINES):
            med = [r[eng]["median"] if r[eng] else 0 for r in rows]
            lo = [r[eng]["median"] - r[eng]["min"] if r[eng] else 0 for r in rows]
            hi = [r[eng]["max"] - r[eng]["median"] if r[eng] else 0 for r in rows]
            if not any(med):
                continue
            ax.bar([i + (k - 0.5) * w for i in x], med, w, yerr=[lo, hi], capsize=3, label=eng,
                   color=colors[eng])
        bound_drawn = False
        for i, r in enumerate(rows):
            if r["bound_tps"]:
                ax.hlines(r["bound_tps"], i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                          label=None if bound_drawn else "bandwidth bound")
                bound_drawn = True
            if r["ratio"] is not None:
                top = max([r[e]["max"] for e in ENGINES if r[e]] + [r["bound_tps"] or 0])
                ax.annotate(f"{r['ratio']:.2f}x", (i, top), textcoords="offset points", xytext=(0, 4),
                            ha="center", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels([r["test"] for r in rows])
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{mrep['facts']['name']} ({report['settings']['threads']} threads)", fontsize=10)
        ax.legend(fontsize=8)
        ax.margins(y=0.12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ============================================================================ make-bench-model

def cache_dir() -> Path:
    from moe_numa.default_model import cache_dir as _cd
    return _cd()


def bench_model_path(preset: str, qtype: str, routing_skew: float = 0.0) -> Path:
    """Default location of a bench model: $MOE_NUMA_CACHE/bench/<preset>[-skewS]-<qtype>.gguf."""
    skew = f"-skew{routing_skew:g}" if routing_skew else ""
    return cache_dir() / "bench" / f"{preset}{skew}-{qtype.lower()}.gguf"


#: low-bit bench models made by llama-quantize from the Q8_0 bench model, as releases are
#: (an importance matrix from llama-imatrix, which IQ1/IQ2 need): "lq-<llama-quantize type>"
LOW_BIT_PREFIX = "lq-"
LOW_BIT_TYPES = ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m", "iq3_xxs", "q2_k", "q2_k_s", "q3_k_m")


def _make_low_bit(preset: str, qtype: str, path: Path, seed: int, threads: int, log, build=None,
                  routing_skew: float = 0.0) -> None:
    """llama-quantize --allow-requantize --imatrix of the preset's Q8_0 bench model into `path`."""
    from moe_numa.bench import llama_cpp as lc
    lq = qtype[len(LOW_BIT_PREFIX):]
    src, _ = make_bench_model(preset, "q8_0", seed=seed, progress=False, log=log, routing_skew=routing_skew)
    build = build or lc.find_or_build(log=log, extra_targets=("llama-imatrix",))
    imatrix = src.with_name(src.stem + ".imatrix.gguf")
    if not imatrix.exists():
        text = Path(__file__).resolve().parent / "data" / "tokenizer_text.txt"
        tmp = imatrix.with_name(f".{imatrix.name}.tmp{os.getpid()}.gguf")
        log(f"llama-imatrix on {src.name} over {text.name}")
        p = subprocess.run([str(build.path("llama-imatrix")), "-m", str(src), "-f", str(text), "-o", str(tmp),
                            "-c", "128", "-t", str(threads), "--no-ppl"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, errors="replace")
        if p.returncode != 0 or not tmp.exists():
            tmp.unlink(missing_ok=True)
            raise RuntimeError("llama-imatrix failed:\n" + "\n".join(p.stdout.splitlines()[-20:]))
        os.replace(tmp, imatrix)
    lc.llama_quantize(build, src, path, lq.upper(), threads=threads,
                      extra_args=["--allow-requantize", "--imatrix", str(imatrix)])


def make_bench_model(preset: str, qtype: str, output: str | os.PathLike | None = None, force: bool = False,
                     seed: int = 0, progress: bool | Callable[[int, int], None] = True,
                     log: Callable[[str], None] = print, routing_skew: float = 0.0, threads: int | None = None,
                     build=None) -> tuple[Path, bool]:
    """Write a random-weight bench model atomically (temp file + rename).

    `routing_skew` > 0: Zipf-like expert popularity per layer with that exponent
    (moe_numa.testing.writer, through the router weights and DeepSeek's score bias).
    ``qtype`` is one of our writer's types, or ``lq-<type>`` (LOW_BIT_TYPES): llama-quantize's
    mix of that type, made from the Q8_0 model (of the same routing skew) with an importance
    matrix (``build``: the llama.cpp build to use, default the cached one).
    Returns (path, written); an existing file is kept unless ``force``.
    """
    from dataclasses import replace
    from moe_numa.testing import PRESETS, QTYPES, make_test_model
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    qtype = qtype.lower()
    low_bit = qtype.startswith(LOW_BIT_PREFIX)
    if low_bit and qtype[len(LOW_BIT_PREFIX):] not in LOW_BIT_TYPES:
        raise ValueError(f"unknown low-bit type {qtype!r}; choose from "
                         f"{', '.join(LOW_BIT_PREFIX + t for t in LOW_BIT_TYPES)}")
    if not low_bit and qtype not in QTYPES:
        raise ValueError(f"unknown quant type {qtype!r}; choose from {', '.join(QTYPES)} or "
                         f"{', '.join(LOW_BIT_PREFIX + t for t in LOW_BIT_TYPES)}")
    if routing_skew < 0:
        raise ValueError(f"routing skew must be >= 0, got {routing_skew}")
    path = Path(output) if output else bench_model_path(preset, qtype, routing_skew)
    if path.exists() and not force:
        log(f"{path} exists; keeping it (--force rewrites it)")
        return path, False
    if low_bit:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.gguf")
        t0 = time.perf_counter()
        try:
            _make_low_bit(preset, qtype, tmp, seed, threads or os.cpu_count() or 2, log, build, routing_skew)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
        return path, True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.gguf")
    cb = progress if callable(progress) else (progress_bar(path.name, unit="tensor") if progress else None)
    t0 = time.perf_counter()
    try:
        spec = replace(PRESETS[preset], routing_skew=routing_skew) if routing_skew else None
        written = make_test_model(tmp, preset, qtype.lower(), seed=seed, progress=cb, spec=spec)
        if Path(written) != tmp:
            raise RuntimeError(f"make_test_model wrote {written}, expected {tmp}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    return path, True


MAKE_BENCH_MODEL_HELP = ("write random-weight benchmark models of realistic proportions "
                         "(default $MOE_NUMA_CACHE/bench/<preset>-<type>.gguf; kept if present)")


def _usage_error(prog: str, msg: str):
    raise SystemExit(f"moe-numa {prog}: error: {msg}")


def add_make_bench_model_arguments(ap: argparse.ArgumentParser) -> None:
    from moe_numa.testing import PRESETS
    ap.add_argument("--preset", default=",".join(BENCH_PRESETS_DEFAULT),
                    help=f"comma-separated presets (bench presets: qwen3moe-bench, deepseek-v3-bench; "
                         f"any of {', '.join(PRESETS)})")
    ap.add_argument("--type", default=",".join(DEFAULT_QTYPES),
                    help="comma-separated quant types: our writer's, or llama-quantize low-bit mixes made from "
                         f"the Q8_0 model: {', '.join(LOW_BIT_PREFIX + t for t in LOW_BIT_TYPES)}")
    ap.add_argument("-o", "--output", help="output file (one preset and one type only)")
    ap.add_argument("--force", action="store_true", help="rewrite an existing file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--routing-skew", type=float, default=0.0, metavar="S",
                    help="Zipf exponent of per-layer expert popularity (0: uniform routing; 1 is realistic)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress")


def make_bench_model_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-numa make-bench-model", description=MAKE_BENCH_MODEL_HELP)
    add_make_bench_model_arguments(ap)
    return run_make_bench_model(ap.parse_args(argv))


def run_make_bench_model(a: argparse.Namespace) -> int:
    presets = [p.strip() for p in a.preset.split(",") if p.strip()]
    types = [t.strip().lower() for t in a.type.split(",") if t.strip()]
    if a.output and len(presets) * len(types) != 1:
        _usage_error("make-bench-model", "-o/--output needs exactly one preset and one type")
    for p in presets:
        for t in types:
            path, _ = make_bench_model(p, t, a.output, force=a.force, seed=a.seed, progress=not a.quiet,
                                       log=lambda s: print(s, file=sys.stderr), routing_skew=a.routing_skew)
            print(path)
    return 0


# ============================================================================ main

def default_models() -> list[str]:
    found = [bench_model_path("qwen3moe-bench", q) for q in DEFAULT_QTYPES]
    return [str(p) for p in found if p.exists()]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-m", "--model", action="append",
                    help="GGUF file (repeatable; default: the qwen3moe-bench q8_0/q4_k_m files in "
                         "$MOE_NUMA_CACHE/bench, see make-bench-model)")
    ap.add_argument("-t", "--threads", type=int, default=None,
                    help="threads for both engines (default: every physical core)")
    ap.add_argument("--tests", default=",".join(DEFAULT_TESTS), help="comma-separated ppN/tgN tests")
    ap.add_argument("-d", "--depth", default="0",
                    help="comma-separated depths (llama-bench -d): every test also runs after an untimed "
                         "prompt of that many tokens, e.g. 0,1024,4096")
    ap.add_argument("--kv-type", default=None, choices=("f32", "f16", "q8_0"),
                    help="KV-cache type of keys and values for both engines (llama-bench -ctk/-ctv; default: "
                         "our engine's)")
    ap.add_argument("-ctk", "--cache-type-k", default=None, choices=("f32", "f16", "q8_0"),
                    help="key type alone, for both engines (default: --kv-type)")
    ap.add_argument("-ctv", "--cache-type-v", default=None, choices=("f32", "f16", "q8_0"),
                    help="value type alone, for both engines (default: --kv-type; MLA's latent cache has no "
                         "values of its own)")
    ap.add_argument("--flash-attn", default="on", choices=("on", "off"),
                    help="llama-bench -fa (default on, llama.cpp's choice on CPU; ours always runs its fused "
                         "flash attention)")
    ap.add_argument("-r", "--reps", type=int, default=3, help="A/B rounds (one process per engine each)")
    ap.add_argument("--inner-reps", type=int, default=1, help="timed repetitions per test in each process")
    ap.add_argument("--warmup-rounds", type=int, default=0, help="extra discarded rounds before the measured ones")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--llama-bench", metavar="PATH", help="a llama-bench binary to use")
    g.add_argument("--llama-build", metavar="DIR", help="a llama.cpp build dir (with bin/llama-bench)")
    g.add_argument("--engine-only", action="store_true", help="run only our engine")
    ap.add_argument("--simd", choices=("native", "avx2"), default="native",
                    help="avx2: run ours with MOE_NUMA_SIMD=avx2 against an AVX2-only llama.cpp build of the "
                         "same tag (built and cached on first use), as on an AVX2 server")
    ap.add_argument("--no-build", action="store_true",
                    help="fail instead of building llama.cpp when no cached build exists")
    ap.add_argument("--repack", type=int, choices=(0, 1), default=1, help="llama-bench --repack (default 1)")
    ap.add_argument("--llama-args", default="", help="extra llama-bench arguments, one string")
    ap.add_argument("--numa-nodes", type=int, default=None, help="our engine: N virtual nodes")
    ap.add_argument("--expert-map", default=None, help="our engine: YAML expert map")
    ap.add_argument("--noise-threshold", type=float, default=DEFAULT_NOISE,
                    help="disturbed if others used more than this fraction of one core (default 0.05)")
    ap.add_argument("--max-retries", type=int, default=2, help="repeats of a disturbed run")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each run, wait up to this many seconds for a quiet machine (0: off)")
    ap.add_argument("--no-bandwidth", action="store_true", help="skip the read-bandwidth measurement")
    ap.add_argument("--bandwidth-mib", type=int, default=0, help="read buffer MiB (default max(256, 8 x L3))")
    ap.add_argument("--no-prefetch", action="store_true", help="do not read the model file into the page cache first")
    ap.add_argument("--target-tg", type=float, default=DEFAULT_TARGET_TG,
                    help=f"decode ratio target ({DEFAULT_TARGET_TG}, issue 11's bar)")
    ap.add_argument("--target-pp", type=float, default=DEFAULT_TARGET_PP,
                    help=f"prefill ratio target ({DEFAULT_TARGET_PP})")
    ap.add_argument("--target-share", type=float, default=DEFAULT_TARGET_SHARE,
                    help=f"decode's share of the bandwidth bound at {', '.join(SHARE_TARGET_QUANTS)} "
                         f"({DEFAULT_TARGET_SHARE}; 0: none)")
    ap.add_argument("--target-keep", type=float, default=DEFAULT_TARGET_KEEP,
                    help=f"the share of its depth-0 decode rate ours keeps at depth {KEEP_DEPTH} or more "
                         f"({DEFAULT_TARGET_KEEP}; 0: none)")
    ap.add_argument("--rerender", metavar="REPORT.json", default=None,
                    help="write a finished run's report again under this version's targets; runs nothing")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmarked process")
    ap.add_argument("--out", default=None,
                    help="output prefix: writes PREFIX.md, PREFIX.json, PREFIX.png (default bench/out/bench-<time>)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--seed", type=int, default=0)


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main("moe-numa bench", __doc__, add_arguments, run, argv)


def run(a: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if a.rerender:
        return rerender(a)
    from .run_ours import engine_kv_type, parse_tests, with_depths
    try:
        base_tests = [t for t, _, _ in parse_tests(a.tests)]
        depths = parse_depths(a.depth)
    except ValueError as e:
        _usage_error("bench", str(e))
    if any("@" in t for t in base_tests):
        _usage_error("bench", "give depths with -d/--depth, not in --tests")
    tests = with_depths(base_tests, depths)
    kv_type = a.cache_type_k or a.kv_type or engine_kv_type()
    kv_type_v = a.cache_type_v or a.kv_type or engine_kv_type()
    # llama-bench b11434 parses -ctk/-ctv for f16, bf16 and the quantized types only: no f32
    llama_kv = kv_type if kv_type != "f32" else None
    llama_kv_v = kv_type_v if kv_type_v != "f32" else None
    models = a.model or default_models()
    if not models:
        _usage_error("bench", "no model: pass -m FILE.gguf, or write the default bench models first with "
                              "`moe-numa make-bench-model`")
    for mpath in models:
        if not Path(mpath).is_file():
            _usage_error("bench", f"model file not found: {mpath}")
    if a.reps < 1 or a.inner_reps < 1:
        _usage_error("bench", "--reps and --inner-reps must be at least 1")
    from moe_numa import kernels as K
    threads = a.threads or len(K.order_cpus(K.available_cpus()))
    llama_args = a.llama_args.split() if a.llama_args else []
    clash = sorted(set(llama_args) & {"-d", "--n-depth", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v",
                                      "-fa", "--flash-attn"})
    if clash:   # llama-bench would run the product of both values
        _usage_error("bench", f"--llama-args {' '.join(clash)}: use --depth / --kv-type, -ctk, -ctv / --flash-attn, "
                              "which set both engines")
    created = _dt.datetime.now().astimezone()
    prefix = Path(a.out) if a.out else Path("bench") / "out" / f"bench-{created:%Y%m%d-%H%M%S}"
    prefix.parent.mkdir(parents=True, exist_ok=True)

    machine = machine_facts(threads)
    bench_path, linfo = (None, None) if a.engine_only else llama_facts(a, log)
    settings = {"threads": threads, "tests": tests, "reps": a.reps, "inner_reps": a.inner_reps,
                "warmup_rounds": a.warmup_rounds, "repack": bool(a.repack), "llama_args": llama_args,
                "depths": depths, "kv_type": kv_type, "llama_kv_type": llama_kv or "f16 (its default)",
                "kv_type_v": kv_type_v, "llama_kv_type_v": llama_kv_v or "f16 (its default)",
                "flash_attn": a.flash_attn,
                "engine_only": a.engine_only, "simd": a.simd, "numa_nodes": a.numa_nodes, "expert_map": a.expert_map,
                "noise_threshold": a.noise_threshold, "max_retries": a.max_retries, "quiet_wait_s": a.quiet_wait,
                "target_tg": a.target_tg, "target_pp": a.target_pp, "target_share": a.target_share,
                "target_keep": a.target_keep, "seed": a.seed}
    report = {"version": 1, "created": created.isoformat(timespec="seconds"), "argv": sys.argv[1:],
              "args": {k: v for k, v in vars(a).items() if k != "func"},
              "moe_numa_commit": _git_commit(), "machine": machine, "llama_cpp": linfo, "settings": settings,
              "models": [], "noise": {"repeated": 0, "kept": 0}}
    log(f"# moe-numa bench: {len(models)} model(s), {threads} threads, tests {','.join(tests)}, "
        f"{a.reps} round(s){'' if a.engine_only else ' A/B with ' + str(bench_path)}; loadavg {_loadavg()}")
    quiet = (lambda: wait_quiet(a.quiet_wait, a.noise_threshold, log=log)) if a.quiet_wait > 0 else None
    timeout = a.timeout or None

    for mpath in models:
        facts = model_facts(mpath)
        mrep = {"facts": facts, "runs": [], "bandwidth_samples_gbps": []}
        fell_back = {}   # "note": llama-bench aborted with repack on for this file
        report["models"].append(mrep)
        log(f"## {facts['name']}: {facts['weight_bytes'] / 2**30:.2f} GiB of weights, "
            f"{facts['bytes_per_token'] / 2**30:.3f} GiB read per token")
        if not a.no_prefetch:
            mrep["prefetch_s"] = prefetch_file(mpath)
            log(f"  page cache: read the file in {mrep['prefetch_s']:.1f} s")
        n_rounds = a.warmup_rounds + a.reps
        for rnd in range(n_rounds):
            warm = rnd < a.warmup_rounds
            tag = f"warm-up round {rnd + 1}" if warm else f"round {rnd - a.warmup_rounds + 1}/{a.reps}"
            if not a.no_bandwidth:
                bw = measure_bandwidth(threads, a.bandwidth_mib << 20 if a.bandwidth_mib else None)
                if not warm:
                    mrep["bandwidth_samples_gbps"].append(bw)
                log(f"  {tag}: read bandwidth {bw:.1f} GB/s")
            jobs = [("moe_numa", lambda: run_ours_once(mpath, threads, tests, a.inner_reps, a.noise_threshold,
                                                       a.numa_nodes, a.expert_map, a.seed, timeout,
                                                       simd=a.simd, kv_type=kv_type, kv_type_v=kv_type_v))]
            if not a.engine_only:
                # once llama-bench has aborted with repack on for this file, later runs start without it
                # and keep the record's note
                def llama_run():
                    rec = run_llama_once(bench_path, mpath, threads, tests, a.inner_reps, a.noise_threshold,
                                         bool(a.repack) and "note" not in fell_back, llama_args, timeout, llama_kv,
                                         a.flash_attn, llama_kv_v, log=log)
                    if rec.get("repack_fallback"):
                        fell_back["note"] = rec["repack_fallback"]
                    elif "note" in fell_back:
                        rec["repack_fallback"] = fell_back["note"]
                    return rec
                jobs.append(("llama.cpp", llama_run))
            for eng, fn in jobs:
                attempts = run_with_retries(fn, a.max_retries, quiet, log)
                for rec in attempts:
                    rec["round"] = rnd - a.warmup_rounds
                    rec["warmup_round"] = warm
                    mrep["runs"].append(rec)
                acc = next(r for r in attempts if r["accepted"])
                if not warm:
                    report["noise"]["repeated"] += len(attempts) - 1
                    report["noise"]["kept"] += acc["disturbed_samples"]
                log(f"  {tag} {eng}: load {_fmt(acc['load_s'])} s, peak RSS {_gib(acc['peak_rss_bytes'])}, "
                    + ", ".join(f"{t} {statistics.median(v['samples_ts']):.2f} t/s"
                                + (f" (imbalance {statistics.median(v['imbalance']):.3f}, waits "
                                   f"{100 * statistics.median(v['wait_frac']):.1f}%)" if v.get("imbalance") else "")
                                for t, v in acc["tests"].items()))
                if eng == "llama.cpp" and "llama_bench_settings" not in report:
                    report["llama_bench_settings"] = acc.get("llama_bench")
                if eng == "moe_numa" and "ours_layout" not in report:
                    report["ours_layout"] = f"{acc.get('n_nodes')} node(s) x {acc.get('threads_per_node')} threads"
        bws = summarize(mrep["bandwidth_samples_gbps"])
        mrep["bandwidth_gbps"] = bws["median"] if bws else None
        mrep["summary"] = summary_of(mrep, tests, a)
        if mpath != models[-1]:   # a long run stopped later still leaves the models it finished
            write_report(report, prefix, plot=False, log=log)
            log(f"  wrote the report so far ({len(report['models'])} of {len(models)} models)")
    machine["loadavg_end"] = _loadavg()
    md, paths = write_report(report, prefix, plot=not a.no_plot, log=log)
    print(md)
    log("wrote " + ", ".join(paths.values()))
    return 0


def summary_of(mrep: dict, tests: Sequence[str], a: argparse.Namespace) -> dict:
    """A model's summary rows under the targets of `a` (the share target only for the quant
    types issue 11 names it for)."""
    share = a.target_share if mrep["facts"].get("quant") in SHARE_TARGET_QUANTS else None
    return aggregate(mrep["runs"], tests, mrep.get("bandwidth_gbps"), mrep["facts"]["bytes_per_token"],
                     a.target_pp, a.target_tg, share, a.target_keep)


def rerender(a: argparse.Namespace) -> int:
    """--rerender REPORT.json: the report again from its runs, under this version's targets
    (or those given), to PREFIX.md/.json/.png beside it (or --out)."""
    path = Path(a.rerender)
    try:
        report = json.loads(path.read_text())
        models = report["models"]
    except (OSError, ValueError, KeyError) as e:
        _usage_error("bench", f"--rerender {path}: not a `moe-numa bench` report ({e})")
    for mrep in models:
        tests = list(dict.fromkeys(r["test"] for r in mrep["summary"]["rows"]))
        mrep["summary"] = summary_of(mrep, tests, a)
    report["settings"].update(target_tg=a.target_tg, target_pp=a.target_pp, target_share=a.target_share,
                              target_keep=a.target_keep)
    prefix = a.out or str(path.with_suffix(""))
    md, paths = write_report(report, prefix, plot=not a.no_plot, log=print)
    print(md)
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return 0


def write_report(report: dict, prefix, plot: bool, log=print) -> tuple[str, dict]:
    """PREFIX.md and PREFIX.json (and PREFIX.png with plot) of the models measured so far."""
    md = format_markdown(report)
    paths = {"md": str(prefix) + ".md", "json": str(prefix) + ".json"}
    Path(paths["md"]).write_text(md)
    if plot:
        png = str(prefix) + ".png"
        if write_plot(report, png):
            paths["png"] = png
        else:
            log("matplotlib is not installed (pip install 'moe_numa[bench]'): no plot")
    report["outputs"] = paths
    Path(paths["json"]).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return md, paths


if __name__ == "__main__":
    sys.exit(main())
