"""Tests of the end-to-end benchmark harness (bench/bench.py, bench/run_ours.py): its
arithmetic, parsing, noise accounting, tables and files.  No timing assertions, and no
llama.cpp needed (a stub script stands in for llama-bench)."""
from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moe_numa.bench import bench as B
from moe_numa.bench import run_ours as R

# captured from `llama-bench -m tiny-q8_0.gguf -o json -t 2 -r 2 --repack 1 -p 16 -n 8 --progress`
# (b11434); configuration keys trimmed
BENCH_STDERR = """\
llama-bench: benchmark 1/2: starting
llama-bench: benchmark 1/2: warmup prompt run
llama-bench: benchmark 1/2: prompt run 1/2
llama-bench: benchmark 1/2: prompt run 2/2
llama-bench: benchmark 2/2: starting
llama-bench: benchmark 2/2: warmup generation run
llama-bench: benchmark 2/2: generation run 1/2
llama-bench: benchmark 2/2: generation run 2/2
"""
# its JSON rows, the configuration common to both written once
_BENCH_CONFIG = {
    "build_commit": "b11434", "build_number": 11434, "cpu_info": "AMD EPYC", "backends": "CPU",
    "model_filename": "/tmp/tiny.gguf", "model_type": "qwen3moe ?B Q8_0", "model_size": 7339328,
    "model_n_params": 6892032, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "poll": 50,
    "type_k": "f16", "type_v": "f16", "flash_attn": -1, "repack": True, "n_depth": 0,
    "test_time": "2026-11-22T04:03:21Z"}
BENCH_STDOUT = json.dumps([
    {**_BENCH_CONFIG, "n_prompt": 16, "n_gen": 0, "avg_ns": 7449499, "stddev_ns": 824995, "avg_ts": 2161.047505,
     "stddev_ts": 239.325455, "samples_ns": [8032859, 6866139], "samples_ts": [1991.82, 2330.28]},
    {**_BENCH_CONFIG, "n_prompt": 0, "n_gen": 8, "avg_ns": 8467621, "stddev_ns": 5069628, "avg_ts": 1151.077446,
     "stddev_ts": 689.158472, "samples_ns": [12052389, 4882854], "samples_ts": [663.769, 1638.39]},
], indent=2) + "\n"

# ----------------------------------------------------------------------------- arithmetic

def test_summarize_median_min_max():
    assert B.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert B.summarize([4, 1, 3, 2])["median"] == 2.5
    assert B.summarize([5])["median"] == 5.0
    assert B.summarize([]) is None
    assert B.summarize([None, 2.0])["n"] == 1


def test_ratio_and_bound():
    assert B.ratio(15.0, 12.0) == pytest.approx(1.25)
    assert B.ratio(None, 1.0) is None and B.ratio(1.0, None) is None and B.ratio(1.0, 0) is None
    # 20 GB/s over 1 GB per token: 20 tokens/s
    assert B.bound_tps(20.0, 10**9) == pytest.approx(20.0)
    assert B.bound_tps(None, 10**9) is None and B.bound_tps(20.0, 0) is None
    assert B.tokens_per_s(32, 2e9) == pytest.approx(16.0)
    assert B.kind_of_test("tg128") == "tg" and B.kind_of_test("pp512") == "pp"
    assert B.target_for("tg32", 1.0, 1.25) == 1.25 and B.target_for("pp64", 1.0, 1.25) == 1.0


def test_parse_tests():
    assert R.parse_tests("pp64, tg32") == [("pp64", 64, 0), ("tg32", 0, 32)]
    assert R.parse_tests(["pp512"]) == [("pp512", 512, 0)]
    for bad in ("pp", "tg0", "xx12", "", "pp64+tg32"):
        with pytest.raises(ValueError):
            R.parse_tests(bad)


# ----------------------------------------------------------------------------- CPU accounting

def test_cpu_label_names_the_microarchitecture_and_simd():
    """A VM masks the model name ("AMD EPYC"); family and model say which CPU ran a result."""
    zen4 = {"Model name": "AMD EPYC", "Vendor ID": "AuthenticAMD", "CPU family": "25", "Model": "17",
            "Flags": "fpu avx2 avx512f avx512_vnni avx512_bf16"}
    assert B.cpu_label(zen4) == "AMD EPYC (family 25, model 17: Zen 4; AVX2, AVX-512, VNNI, BF16, no AMX)"
    zen3 = dict(zen4, Model="1", Flags="avx2 fma")
    assert B.cpu_label(zen3) == "AMD EPYC (family 25, model 1: Zen 3; AVX2, no AMX)"
    spr = {"Model name": "Intel(R) Xeon(R) Platinum 8480+", "Vendor ID": "GenuineIntel", "CPU family": "6",
           "Model": "143", "Flags": "avx2 avx512f avx512_vnni amx_tile amx_int8"}
    assert "Sapphire Rapids; AVX2, AVX-512, VNNI, AMX)" in B.cpu_label(spr)
    assert B.cpu_label({"Model name": "Some CPU"}) == "Some CPU"   # no family: the name alone


def test_cpu_readers_see_our_own_work():
    b0, c0 = B.read_busy_ticks(), B.pid_cpu_s(os.getpid())
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    b1, c1 = B.read_busy_ticks(), B.pid_cpu_s(os.getpid())
    # our 0.3 s of spinning is in the machine's busy time and in our own CPU time
    assert (b1 - b0) / B.clock_ticks() >= 0.25 and c1 - c0 >= 0.25
    assert B.pid_cpu_s(2**22 + 12345) is None      # no such process


def test_peak_rss_sampler_keeps_the_maximum():
    sample = B.peak_rss_sampler(os.getpid())
    first = sample()
    big = np.ones(64 << 20, dtype=np.uint8)         # 64 MiB, touched
    assert sample() >= first + (60 << 20)
    del big
    assert sample() >= first + (60 << 20)           # the peak stays


def test_others_and_disturbed():
    hz = 100
    # 200 busy ticks (2 s) over 1 s wall, ourselves 1.9 s: others 0.1 s
    o = B.others_cpu_s(1000, 1200, 1.9, hz)
    assert o == pytest.approx(0.1)
    slack = B.noise_slack_s(2, hz)
    assert slack == pytest.approx(0.03)
    assert B.is_disturbed(o, 1.0, 0.05, slack)          # 0.1 > 0.05 + 0.03
    assert not B.is_disturbed(o, 1.0, 0.10, slack)      # 0.1 <= 0.10 + 0.03
    assert not B.is_disturbed(0.07, 1.0, 0.05, slack)   # inside the tick slack
    assert not B.is_disturbed(None, 1.0, 0.05)
    a = B.Snap(0.0, 1000, 0.5, 10.0)
    b = B.Snap(1.0, 1200, 0.6, 11.85)
    assert B.snap_others(a, b, hz) == pytest.approx(2.0 - 1.85 - 0.1)
    assert B.snap_others(B.Snap(0, 0, 0), b, hz) is None


def _rec(engine, samples, others, wall=1.0, test="tg32", load=1.0, rss=2**30, rnd=0):
    return {"engine": engine, "round": rnd, "accepted": True, "warmup_round": False, "load_s": load,
            "peak_rss_bytes": rss,
            "tests": {test: {"samples_ts": list(samples), "samples_ns": [1] * len(samples),
                             "wall_s": [wall] * len(samples), "others_cpu_s": list(others)}}}


def test_finish_run_flags_disturbed_samples():
    hz = os.sysconf("SC_CLK_TCK")
    slack = B.noise_slack_s(2, hz)
    rec = B._finish_run(_rec("moe_numa", [10, 11, 12], [0.0, 0.05 + slack + 0.01, None]), 2, 0.05)
    assert rec["tests"]["tg32"]["disturbed"] == [False, True, False]
    assert rec["disturbed"] and rec["disturbed_samples"] == 1
    assert rec["excess_others_s"] == pytest.approx(0.01, abs=1e-3)
    clean = B._finish_run(_rec("moe_numa", [10], [0.0]), 2, 0.05)
    assert not clean["disturbed"] and clean["excess_others_s"] < 0


def test_run_with_retries():
    hz = os.sysconf("SC_CLK_TCK")
    big = 0.5 + B.noise_slack_s(2, hz)
    seq = iter([big, big * 2, 0.0])
    calls = []

    def fn():
        calls.append(1)
        return B._finish_run(_rec("llama.cpp", [10], [next(seq)]), 2, 0.05)
    att = B.run_with_retries(fn, max_retries=2, log=lambda s: None)
    assert len(att) == 3 and [r["accepted"] for r in att] == [False, False, True]
    assert [r["attempt"] for r in att] == [0, 1, 2]
    # all disturbed: the least disturbed one is kept
    seq = iter([big * 3, big, big * 2])
    att = B.run_with_retries(fn, max_retries=2, log=lambda s: None)
    assert [r["accepted"] for r in att] == [False, True, False]
    # no retries: one attempt, accepted even if disturbed
    seq = iter([big])
    att = B.run_with_retries(fn, max_retries=0, log=lambda s: None)
    assert len(att) == 1 and att[0]["accepted"] and att[0]["disturbed"]


# ----------------------------------------------------------------------------- llama-bench parsing

def test_parse_progress():
    p = B.parse_progress("llama-bench: benchmark 2/4: generation run 3/5")
    assert p == {"bench": 2, "of": 4, "kind": "gen", "rep": 3}
    assert B.parse_progress("llama-bench: benchmark 1/4: starting")["kind"] == "starting"
    assert B.parse_progress("llama-bench: benchmark 1/4: warmup prompt run")["kind"] == "warmup"
    assert B.parse_progress("llama-bench: benchmark 1/4: prompt run 1/1")["rep"] == 1
    assert B.parse_progress("llama-bench: benchmark 1/4: depth run 2/3 (cached)")["kind"] == "depth"
    assert B.parse_progress("main: loading model") is None


def _events(lines, step=1.0, busy_per_step=200, child_per_step=1.9, hz=100):
    out = []
    for i, line in enumerate(lines):
        snap = B.Snap(i * step, i * busy_per_step, 0.0, i * child_per_step)
        out.append(B.Event(line, snap, B.parse_progress(line)))
    n = len(lines)
    return out, B.Snap(n * step, n * busy_per_step, 0.0, n * child_per_step)


def test_llama_sample_noise_and_load_time():
    lines = BENCH_STDERR.splitlines()
    ev, end = _events(lines, hz=100)
    noise = B.llama_sample_noise(ev, end, hz=100)
    assert sorted(noise) == [1, 2] and len(noise[1]) == 2 and len(noise[2]) == 2
    for z in noise[1] + noise[2]:
        assert z["wall_s"] == pytest.approx(1.0)
        assert z["others_cpu_s"] == pytest.approx(0.1)
    # load: "benchmark 1/2: starting" (t=0) to the warm-up line (t=1)
    assert B.llama_load_s(ev) == pytest.approx(1.0)
    assert B.llama_load_s([]) is None


def test_llama_record_from_captured_output():
    ev, end = _events(BENCH_STDERR.splitlines(), busy_per_step=190)   # no one else
    res = B.ChildResult(cmd=["llama-bench"], returncode=0, stdout=BENCH_STDOUT, events=ev,
                        start=B.Snap(0, 0, 0, 0), end=end, wall_s=8.0, cpu_s=15.2, peak_rss_bytes=123 << 20,
                        others_cpu_s=0.0)
    rec = B.llama_record(res, threads=2, threshold=0.05)
    assert set(rec["tests"]) == {"pp16", "tg8"}
    assert rec["tests"]["pp16"]["samples_ns"] == [8032859, 6866139]
    assert rec["tests"]["pp16"]["samples_ts"][0] == pytest.approx(16 / 8032859e-9)
    assert rec["tests"]["tg8"]["samples_ts"][1] == pytest.approx(8 / 4882854e-9)
    assert not rec["disturbed"]
    assert rec["peak_rss_bytes"] == 123 << 20 and rec["load_s"] == pytest.approx(1.0)
    assert rec["llama_bench"]["build_number"] == 11434 and rec["llama_bench"]["type_k"] == "f16"
    # without progress lines: samples are kept, no noise accounting
    res.events = []
    rec = B.llama_record(res, threads=2, threshold=0.05)
    assert rec["tests"]["tg8"]["others_cpu_s"] == [None, None] and not rec["disturbed"]


def test_llama_bench_cmd():
    cmd = B.llama_bench_cmd("/x/llama-bench", "m.gguf", 2, ["pp64", "pp512", "tg32"], 1, False, ["-fa", "off"])
    assert cmd[:2] == ["/x/llama-bench", "-m"] and "--progress" in cmd
    i = cmd.index("-p")
    assert cmd[i + 1] == "64,512" and cmd[cmd.index("-n") + 1] == "32"
    assert cmd[cmd.index("--repack") + 1] == "0" and cmd[-2:] == ["-fa", "off"]


def test_depth_tests_and_llama_bench_flags():
    assert R.parse_tests("tg32@d1024") == [("tg32@d1024", 0, 32)] and R.test_depth("tg32@d1024") == 1024
    assert R.test_depth("pp64") == 0
    assert B.parse_depths("0,1024,4096,1024") == [0, 1024, 4096]
    for bad in ("", "-1", "x"):
        with pytest.raises(ValueError):
            B.parse_depths(bad)
    tests = R.with_depths(["pp64", "tg32"], [0, 1024])
    assert tests == ["pp64", "tg32", "pp64@d1024", "tg32@d1024"]
    cmd = B.llama_bench_cmd("/x/llama-bench", "m.gguf", 2, tests, 1, True, kv_type="q8_0", flash_attn="on")
    assert cmd[cmd.index("-p") + 1] == "64" and cmd[cmd.index("-n") + 1] == "32"
    assert cmd[cmd.index("-d") + 1] == "0,1024"
    assert cmd[cmd.index("-ctk") + 1] == cmd[cmd.index("-ctv") + 1] == "q8_0" and cmd[cmd.index("-fa") + 1] == "on"
    assert "-d" not in B.llama_bench_cmd("/x/llama-bench", "m.gguf", 2, ["tg32"], 1, True)
    apart = B.llama_bench_cmd("/x/llama-bench", "m.gguf", 2, ["tg32"], 1, True, kv_type="f16", kv_type_v="q8_0")
    assert apart[apart.index("-ctk") + 1] == "f16" and apart[apart.index("-ctv") + 1] == "q8_0"


def test_run_ours_runs_the_depth_prompt_first(tiny_q8, monkeypatch):
    from moe_numa.engine.backend import EngineBackend
    calls = []
    orig = EngineBackend.forward

    def forward(self, ids, all_logits=True):
        calls.append((self.n_past, len(ids)))
        return orig(self, ids, all_logits)
    monkeypatch.setattr(EngineBackend, "forward", forward)
    res = R.run(tiny_q8, 1, "tg2@d24", reps=2)
    assert res["n_ctx"] >= 26 and res["tests"][0]["n_depth"] == 24 and len(res["tests"][0]["samples_ns"]) == 2
    # warm-up: one token from 0; then per repetition: the 24-token depth prompt from 0, then 2 tokens from 24
    assert calls == [(0, 1)] + [(0, 24), (24, 1), (25, 1)] * 2
    assert res["kv_type"] and res["load_fill_gbps"] > 0
    apart = R.run(tiny_q8, 1, "tg2", kv_type="f16", kv_type_v="q8_0", warmup=False)
    assert (apart["kv_type"], apart["kv_type_v"]) == ("f16", "q8_0")


def test_bench_depth_with_stub_llama_bench(tmp_path, tiny_q8):
    stub = tmp_path / "llama-bench"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    args = _common(tmp_path, tiny_q8) + ["--llama-bench", str(stub), "-d", "0,32", "-r", "1", "--no-plot",
                                         "--no-bandwidth", "--flash-attn", "off"]
    assert B.main(args) == 0
    rep = json.loads((tmp_path / "res.json").read_text())
    rows = {r["test"]: r for r in rep["models"][0]["summary"]["rows"]}
    assert set(rows) == {"pp16", "tg4", "pp16@d32", "tg4@d32"}
    assert all(r["moe_numa"]["n"] == 1 and r["llama.cpp"]["n"] == 1 for r in rows.values())
    lb = rep["llama_bench_settings"]
    kv = rep["settings"]["kv_type"]
    assert kv == R.engine_kv_type() and {r["kv_type"] for r in rep["models"][0]["runs"] if r["engine"] == "moe_numa"} == {kv}
    # llama-bench gets our cache type (it has no f32: then its f16 default, said in the table's notes)
    assert lb["type_k"] == (kv if kv != "f32" else "f16") and lb["flash_attn"] == 0   # as it ran
    assert rep["settings"]["depths"] == [0, 32]
    md = (tmp_path / "res.md").read_text()
    assert "| tg4@d32 |" in md and "depths 0,32" in md and "load: placement fill" in md
    with pytest.raises(SystemExit):
        B.main(_common(tmp_path, tiny_q8) + ["--engine-only", "--llama-args", "-fa on"])


def test_bench_key_and_value_types_apart(tmp_path, tiny_q8):
    """-ctk / -ctv as llama-bench's: each engine gets both, and the report says which ran."""
    stub = tmp_path / "llama-bench"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    args = _common(tmp_path, tiny_q8) + ["--llama-bench", str(stub), "-r", "1", "--no-plot", "--no-bandwidth",
                                         "-ctk", "f16", "-ctv", "q8_0"]
    assert B.main(args) == 0
    rep = json.loads((tmp_path / "res.json").read_text())
    ours = [r for r in rep["models"][0]["runs"] if r["engine"] == "moe_numa"]
    assert {(r["kv_type"], r["kv_type_v"]) for r in ours} == {("f16", "q8_0")}
    assert (rep["llama_bench_settings"]["type_k"], rep["llama_bench_settings"]["type_v"]) == ("f16", "q8_0")
    assert "KV cache K f16 / V q8_0 for both engines (llama-bench `-ctk f16 -ctv q8_0`)" in (tmp_path / "res.md").read_text()


def test_parse_ours_json():
    obj = {"engine": "moe_numa", "threads": 2, "load_s": 0.5, "peak_rss_bytes": 1000,
           "tests": [{"test": "tg32", "n_prompt": 0, "n_gen": 32, "samples_ns": [2_000_000_000],
                      "samples_ts": [0.0], "samples_wall_s": [2.0], "others_cpu_s": [0.01]}]}
    text = "some log line\n" + json.dumps(obj) + "\n"
    got = B.parse_ours_json(text)
    assert got["tests"][0]["samples_ts"] == [pytest.approx(16.0)]   # recomputed from ns
    with pytest.raises(ValueError):
        B.parse_ours_json("no json here")
    with pytest.raises(ValueError):
        B.parse_ours_json('{"tests": []}')


# ----------------------------------------------------------------------------- aggregation, tables

def _runs():
    runs = []
    for rnd, (o, l) in enumerate([(15.0, 12.0), (16.0, 12.5), (14.0, 11.0)]):
        a = _rec("moe_numa", [o], [0.0], rnd=rnd, load=2.0, rss=6 * 2**30)
        a["tests"]["pp64"] = {"samples_ts": [60.0 + rnd], "samples_ns": [1], "wall_s": [1.0], "others_cpu_s": [0.0]}
        b = _rec("llama.cpp", [l], [0.0], rnd=rnd, load=1.0, rss=7 * 2**30)
        b["tests"]["pp64"] = {"samples_ts": [62.0], "samples_ns": [1], "wall_s": [1.0], "others_cpu_s": [0.0]}
        for r in (a, b):
            B._finish_run(r, 2, 0.05)
        runs += [a, b]
    # a discarded warm-up round and a rejected attempt do not count
    w = _rec("moe_numa", [1000.0], [0.0], rnd=-1)
    w["warmup_round"] = True
    rej = _rec("llama.cpp", [1000.0], [0.0], rnd=0)
    rej["accepted"] = False
    return runs + [w, rej]


def test_aggregate_medians_ratio_bound_targets():
    agg = B.aggregate(_runs(), ["pp64", "tg32"], bandwidth_gbps=20.0, bytes_per_token=10**9,
                      target_pp=1.0, target_tg=1.25)
    pp, tg = agg["rows"]
    assert tg["moe_numa"] == {"median": 15.0, "min": 14.0, "max": 16.0, "n": 3}
    assert tg["llama.cpp"]["median"] == 12.0
    assert tg["ratio"] == pytest.approx(1.25) and tg["met"] is True and tg["target"] == 1.25
    assert tg["paired_ratios"] == [pytest.approx(15 / 12), pytest.approx(16 / 12.5), pytest.approx(14 / 11)]
    assert tg["bound_tps"] == pytest.approx(20.0)
    assert tg["share_moe_numa"] == pytest.approx(0.75) and tg["share_llama.cpp"] == pytest.approx(0.6)
    assert pp["ratio"] == pytest.approx(61 / 62) and pp["met"] is False and pp["bound_tps"] is None
    assert agg["load_s"]["ratio"] == pytest.approx(2.0)
    assert agg["peak_rss_bytes"]["moe_numa"]["median"] == 6 * 2**30
    met, missed = B.targets_summary(agg["rows"])
    assert met == ["tg32 1.25x >= 1.25x"] and missed == ["pp64 0.98x < 1.00x"]


def test_default_targets_are_issue_11s_bar_with_the_share_of_bound():
    assert (B.DEFAULT_TARGET_TG, B.DEFAULT_TARGET_PP, B.DEFAULT_TARGET_SHARE) == (1.3, 1.2, 0.85)
    # 1.25x misses 1.3x; with a share target of 0.85 a 75% share misses even where the ratio is met
    tg = B.aggregate(_runs(), ["tg32"], 20.0, 10**9)["rows"][0]
    assert tg["met"] is False and tg["share_target"] is None
    tg = B.aggregate(_runs(), ["tg32"], 20.0, 10**9, target_tg=1.2, target_share=0.85)["rows"][0]
    assert tg["share_target"] == 0.85 and tg["met"] is False
    assert B.targets_summary([tg])[1] == ["tg32 1.25x >= 1.20x, 75% < 85% of the bound"]
    tg = B.aggregate(_runs(), ["tg32"], 20.0, 10**9, target_tg=1.2, target_share=0.7)["rows"][0]
    assert tg["met"] is True
    pp = B.aggregate(_runs(), ["pp64"], 20.0, 10**9, target_share=0.85)["rows"][0]
    assert pp["share_target"] is None                      # prefill has no bound
    deep = _runs()
    for r in deep:
        if "tg32" in r["tests"]:
            r["tests"]["tg32@d1024"] = r["tests"]["tg32"]
    tg = B.aggregate(deep, ["tg32@d1024"], 20.0, 10**9, target_tg=1.2, target_share=0.85)["rows"][0]
    assert tg["share_target"] is None and tg["met"] is True   # the bound ignores the cache: depth 0 only


def test_decode_at_depth_4096_must_keep_70_percent_of_its_depth_0_rate():
    """The bar's retention part: tgN@dD against tgN of the same engine; a target from depth 4096."""
    assert (B.DEFAULT_TARGET_KEEP, B.KEEP_DEPTH) == (0.70, 4096)

    def deep(ours, theirs):
        runs = _runs()
        for r in runs:
            if "tg32" in r["tests"]:
                t = dict(r["tests"]["tg32"])
                f = ours if r["engine"] == "moe_numa" else theirs
                t["samples_ts"] = [v * f for v in t["samples_ts"]]
                r["tests"]["tg32@d4096"] = t
                r["tests"]["tg32@d1024"] = dict(t)
        return runs
    rows = B.aggregate(deep(0.6, 0.3), ["tg32", "tg32@d1024", "tg32@d4096"], 20.0, 10**9, target_tg=1.2)["rows"]
    d0, d1, d4 = rows
    assert "keep_moe_numa" not in d0 and d1.get("keep_target") is None      # below 4096: reported, no target
    assert d4["keep_moe_numa"] == pytest.approx(0.6) and d4["keep_llama.cpp"] == pytest.approx(0.3)
    assert d4["ratio"] == pytest.approx(2.5) and d4["met"] is False          # 2.5x llama.cpp, but keeps 60%
    assert B.targets_summary([d4])[1] == ["tg32@d4096 2.50x >= 1.20x, keeps 60% < 70% of tg32"]
    d4 = B.aggregate(deep(0.697, 0.3), ["tg32", "tg32@d4096"], 20.0, 10**9, target_tg=1.2)["rows"][1]
    assert B.targets_summary([d4])[1] == ["tg32@d4096 2.90x >= 1.20x, keeps 69.7% < 70% of tg32"]   # not 70% < 70%
    d4 = B.aggregate(deep(0.75, 0.3), ["tg32", "tg32@d4096"], 20.0, 10**9, target_tg=1.2)["rows"][1]
    assert d4["met"] is True and d4["keep_target"] == 0.70
    d4 = B.aggregate(deep(0.6, 0.3), ["tg32", "tg32@d4096"], 20.0, 10**9, target_tg=1.2, target_keep=0)["rows"][1]
    assert d4["met"] is True and "keep_target" not in d4
    # without its depth-0 row there is nothing to keep a share of
    d4 = B.aggregate(deep(0.6, 0.3), ["tg32@d4096"], 20.0, 10**9, target_tg=1.2)["rows"][0]
    assert d4["met"] is True and "keep_moe_numa" not in d4


def test_rerender_applies_this_versions_targets(tmp_path):
    report = _report(_runs())
    for m in report["models"]:
        m["runs"] = _runs()
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report))
    rc = B.main(["--rerender", str(path), "--no-plot", "--target-tg", "1.2", "--target-share", "0.7"])
    assert rc == 0
    md = (tmp_path / "old.md").read_text()
    assert "tg32 1.25x >= 1.20x, 75% >= 70% of the bound" in md          # Q8_0: the share counts
    assert "≥ 1.20, ≥ 70% of bound: met" in md
    again = json.loads(path.read_text())
    assert again["settings"]["target_share"] == 0.7
    assert again["models"][0]["summary"]["rows"][1]["met"] is True
    with pytest.raises(SystemExit):
        B.main(["--rerender", str(tmp_path / "missing.json"), "--no-plot"])


def test_aggregate_engine_only():
    runs = [r for r in _runs() if r["engine"] == "moe_numa"]
    agg = B.aggregate(runs, ["tg32"], None, 10**9)
    (tg,) = agg["rows"]
    assert tg["llama.cpp"] is None and tg["ratio"] is None and tg["met"] is None and tg["bound_tps"] is None


def _report(runs, flags=0):
    agg = B.aggregate(runs, ["pp64", "tg32"], 20.0, 10**9, target_pp=1.0, target_tg=1.25)
    agg["rows"][1]["disturbed_kept"]["llama.cpp"] = flags
    facts = {"path": "/m/qwen3moe-bench-q8_0.gguf", "name": "qwen3moe-bench-q8_0", "arch": "qwen3moe",
             "quant": "Q8_0", "n_params": 6_250_000_000, "weight_bytes": int(5.9 * 2**30), "file_bytes": 1,
             "bytes_per_token": 10**9, "n_layer": 24, "n_expert": 64, "n_used": 8, "hidden": 2048,
             "n_vocab": 151936}
    return {"created": "2026-11-22T00:00:00", "moe_numa_commit": "abc", "ours_layout": "1 node(s) x 2 threads",
            "machine": {"cpu": "AMD EPYC", "cpus": 2, "physical_cores": 2, "numa_nodes": 1,
                        "memory_bytes": 24 * 2**30, "simd": "avx512", "loadavg_start": [0.1, 0.2, 0.3]},
            "llama_cpp": {"version": "b11434", "source": "cached", "path": "/x/llama-bench", "cmake_flags": ["-DX=1"]},
            "llama_bench_settings": {"n_batch": 2048, "n_ubatch": 512, "type_k": "f16", "type_v": "f16",
                                     "flash_attn": -1},
            "settings": {"threads": 2, "tests": ["pp64", "tg32"], "reps": 3, "inner_reps": 1, "warmup_rounds": 0,
                         "repack": True, "llama_args": [], "engine_only": False, "noise_threshold": 0.05,
                         "max_retries": 2},
            "noise": {"repeated": 1, "kept": flags},
            "models": [{"facts": facts, "summary": agg, "bandwidth_gbps": 20.0,
                        "bandwidth_samples_gbps": [19.0, 20.0, 21.0]}]}


def test_markdown_table():
    md = B.format_markdown(_report(_runs(), flags=1))
    rows = [l for l in md.splitlines() if l.startswith("| qwen3moe")]
    assert len(rows) == 4         # pp64, tg32, load, peak RSS
    tg = rows[1].split("|")
    assert tg[6].strip() == "tg32"
    assert tg[7].strip() == "15.00 [14.00–16.00]"
    assert tg[8].strip() == "12.00 [11.00–12.50] †"           # a disturbed sample was kept
    assert tg[9].strip() == "1.25" and "met" in tg[10]
    assert tg[11].strip() == "75% / 60%"
    assert "**missed**" in rows[0]
    assert "Q8_0" in rows[0] and "5.90 GiB" in rows[0] and "6.25 B" in rows[0]
    assert "peak RSS" in rows[3] and "6.00" in rows[3] and "7.00" in rows[3]
    assert "**Targets missed:** pp64 0.98x < 1.00x" in md
    assert "20.00 [19.00–21.00] GB/s" in md and "decode bound 20.00 t/s" in md
    assert "flash attention auto" in md and "KV cache f16/f16" in md
    header = [l for l in md.splitlines() if l.startswith("| model |")][0]
    sep = [l for l in md.splitlines() if l.startswith("| --- |")][0]
    assert header.count("|") == sep.count("|") == rows[0].count("|")


def test_fmt_summary():
    assert B.fmt_summary(None) == "–"
    assert B.fmt_summary({"median": 2.0, "min": 2.0, "max": 2.0, "n": 1}) == "2.00"
    assert B.fmt_summary({"median": 2 * 2**30, "min": 2**30, "max": 3 * 2**30, "n": 3}, scale=2**30) == \
        "2.00 [1.00–3.00]"


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    assert B.write_plot(_report(_runs()), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- make-bench-model

def test_make_bench_model_path_skip_force(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_NUMA_CACHE", str(tmp_path / "cache"))
    assert B.bench_model_path("qwen3moe-bench", "Q8_0") == tmp_path / "cache" / "bench" / "qwen3moe-bench-q8_0.gguf"
    seen = []
    path, written = B.make_bench_model("qwen3moe", "q8_0", progress=lambda k, n: seen.append((k, n)),
                                       log=lambda s: None)
    assert written and path == tmp_path / "cache" / "bench" / "qwen3moe-q8_0.gguf"
    assert seen and seen[-1][0] == seen[-1][1]
    assert [p.name for p in path.parent.iterdir()] == [path.name]       # no temp file left
    mtime = path.stat().st_mtime_ns
    path2, written = B.make_bench_model("qwen3moe", "q8_0", log=lambda s: None)
    assert path2 == path and not written and path.stat().st_mtime_ns == mtime
    _, written = B.make_bench_model("qwen3moe", "q8_0", force=True, progress=False, log=lambda s: None)
    assert written
    from moe_numa.gguf_file import GGUFModelFile
    assert GGUFModelFile(str(path)).get("general.file_type") == 7
    with pytest.raises(ValueError):
        B.make_bench_model("nope", "q8_0")
    with pytest.raises(ValueError):
        B.make_bench_model("qwen3moe", "q9_9")


def test_make_bench_model_main_output(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert B.make_bench_model_main(["--preset", "qwen3moe", "--type", "q8_0", "-o", str(out), "-q"]) == 0
    assert out.is_file() and capsys.readouterr().out.strip() == str(out)
    with pytest.raises(SystemExit):
        B.make_bench_model_main(["--preset", "qwen3moe", "--type", "q8_0,q4_k", "-o", str(out)])


# ----------------------------------------------------------------------------- end to end

STUB = r'''#!{python}
import json, sys
a = sys.argv[1:]
if "--version" in a:
    print("version: 0.0.0-stub (build 1, commit stub)"); sys.exit(0)
def val(flag): return a[a.index(flag) + 1]
reps, thr = int(val("-r")), int(val("-t"))
tests = [(int(p), 0) for p in val("-p").split(",") if p != "0"] + [(0, int(n)) for n in val("-n").split(",") if n != "0"]
depths = [int(d) for d in val("-d").split(",")] if "-d" in a else [0]
tests = [(p, g, d) for d in depths for p, g in tests]
type_k = val("-ctk") if "-ctk" in a else "f16"
type_v = val("-ctv") if "-ctv" in a else "f16"
fa = {{"on": 1, "off": 0}}[val("-fa")] if "-fa" in a else -1
out = []
for i, (p, g, d) in enumerate(tests, 1):
    print(f"llama-bench: benchmark {{i}}/{{len(tests)}}: starting", file=sys.stderr, flush=True)
    print(f"llama-bench: benchmark {{i}}/{{len(tests)}}: warmup {{'prompt' if p else 'generation'}} run", file=sys.stderr, flush=True)
    for r in range(reps):
        if d:
            print(f"llama-bench: benchmark {{i}}/{{len(tests)}}: depth run {{r + 1}}/{{reps}}", file=sys.stderr, flush=True)
        print(f"llama-bench: benchmark {{i}}/{{len(tests)}}: {{'prompt' if p else 'generation'}} run {{r + 1}}/{{reps}}", file=sys.stderr, flush=True)
    ns = 1_000_000_000 if p else 2_000_000_000
    out.append({{"build_commit": "stub", "build_number": 1, "model_type": "stub", "n_threads": thr,
                "n_prompt": p, "n_gen": g, "n_depth": d, "samples_ns": [ns] * reps,
                "samples_ts": [(p + g) / (ns * 1e-9)] * reps, "type_k": type_k, "type_v": type_v,
                "n_batch": 2048, "n_ubatch": 512, "flash_attn": fa}})
import time
time.sleep(0.25)   # alive for a few of the harness's 50 ms RSS samples, as a real llama-bench is
print(json.dumps(out, indent=1))
'''


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    from moe_numa.testing import make_test_model
    return str(make_test_model(tmp_path_factory.mktemp("bench") / "tiny-q8_0.gguf", "qwen3moe", "q8_0"))


def _common(tmp_path, model):
    return ["-m", model, "-t", "1", "--tests", "pp16,tg4", "-r", "2", "--quiet-wait", "0",
            "--max-retries", "0", "--bandwidth-mib", "8", "--no-prefetch", "--out", str(tmp_path / "res")]


def test_bench_main_with_stub_llama_bench(tmp_path, tiny_q8, capsys):
    stub = tmp_path / "llama-bench"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    assert B.main(_common(tmp_path, tiny_q8) + ["--llama-bench", str(stub)]) == 0
    md = (tmp_path / "res.md").read_text()
    rep = json.loads((tmp_path / "res.json").read_text())
    assert capsys.readouterr().out.strip() == md.strip()
    if rep["outputs"].get("png"):
        assert (tmp_path / "res.png").read_bytes()[:4] == b"\x89PNG"
    assert rep["llama_cpp"]["version"].startswith("version: 0.0.0-stub")
    m = rep["models"][0]
    assert m["facts"]["quant"] == "Q8_0" and m["facts"]["bytes_per_token"] > 0
    assert len(m["bandwidth_samples_gbps"]) == 2 and m["summary"]["bound_tps"] > 0
    acc = [r for r in m["runs"] if r["accepted"]]
    assert [r["engine"] for r in acc] == ["moe_numa", "llama.cpp"] * 2          # A B A B
    assert [r["round"] for r in acc] == [0, 0, 1, 1]
    rows = {r["test"]: r for r in m["summary"]["rows"]}
    assert rows["pp16"]["llama.cpp"]["median"] == pytest.approx(16.0)          # 16 tokens in 1 s
    assert rows["tg4"]["llama.cpp"]["median"] == pytest.approx(2.0)            # 4 tokens in 2 s
    assert rows["tg4"]["ratio"] == pytest.approx(rows["tg4"]["moe_numa"]["median"] / 2.0)
    assert all(r["moe_numa"]["n"] == 2 for r in rows.values())
    ours = acc[0]
    assert ours["load_s"] > 0 and ours["peak_rss_bytes"] > 0 and ours["simd"]
    assert acc[1]["load_s"] is not None and acc[1]["peak_rss_bytes"] > 0
    assert "| pp16 |" in md and "| tg4 |" in md and "load time" in md


def test_bench_main_engine_only(tmp_path, tiny_q8):
    assert B.main(_common(tmp_path, tiny_q8) + ["--engine-only", "--no-plot", "--no-bandwidth"]) == 0
    rep = json.loads((tmp_path / "res.json").read_text())
    assert "png" not in rep["outputs"]
    rows = rep["models"][0]["summary"]["rows"]
    assert all(r["llama.cpp"] is None and r["ratio"] is None and r["moe_numa"]["median"] > 0 for r in rows)
    assert "not run (`--engine-only`)" in (tmp_path / "res.md").read_text()


def test_run_ours_main_json(tiny_q8, capsys):
    assert R.main([tiny_q8, "-t", "1", "--tests", "pp8,tg2", "-r", "2", "--json"]) == 0
    obj = B.parse_ours_json(capsys.readouterr().out)
    assert [t["test"] for t in obj["tests"]] == ["pp8", "tg2"]
    assert all(len(t["samples_ns"]) == 2 and len(t["others_cpu_s"]) == 2 for t in obj["tests"])
    assert obj["n_ctx"] == 256 and obj["peak_rss_bytes"] > 0


def test_bench_requires_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_NUMA_CACHE", str(tmp_path))
    with pytest.raises(SystemExit):
        B.main(["--engine-only"])


def test_make_low_bit_bench_model(tmp_path, monkeypatch):
    """`--type lq-iq2_xxs`: llama-quantize's IQ2_XXS mix of the Q8_0 model, with an importance matrix."""
    from moe_numa.bench import llama_cpp as lc
    try:
        build = lc.find_or_build(allow_build=False, log=lambda *a: None, extra_targets=("llama-imatrix",))
    except lc.LlamaCppError as e:
        pytest.skip(f"no llama.cpp build with llama-imatrix ({e})")
    import numpy as np

    import moe_numa
    from moe_numa.gguf_file import GGUFModelFile
    monkeypatch.setenv("MOE_NUMA_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="lq-iq2_xxs"):
        B.make_bench_model("qwen3moe", "lq-iq9")
    path, written = B.make_bench_model("qwen3moe", "lq-iq2_xxs", log=lambda s: None, threads=2, build=build)
    assert written and path == B.bench_model_path("qwen3moe", "lq-iq2_xxs")
    assert B.bench_model_path("qwen3moe", "q8_0").exists()                   # made from the Q8_0 model
    types = {t.qtype.name for t in GGUFModelFile(path)}
    assert "IQ2_XXS" in types and len(types) >= 3                            # a mix, as releases are
    assert np.isfinite(moe_numa.load(path, backend="reference").logits([1, 2, 3])).all()


def test_bench_kernels_l2_mode(capsys):
    """bench-kernels --l2 (the single-thread L2-resident rates for busy machines):
    one row per type, token count and SIMD level the CPU has, with a positive rate."""
    from moe_numa import kernels as K
    from moe_numa.bench import kernels as BK
    levels = list(K.SIMD_LEVELS[1:K.SIMD_LEVELS.index(K.simd_level_cpu()) + 1]) or ["scalar"]
    assert BK.main(["--l2", "--types", "q4_0,iq2_xxs", "--l2-kib", "16", "--l2-tokens", "1,4",
                    "--l2-samples", "2", "--simd", ",".join(levels), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["type"], r["tokens"], r["simd"]) for r in rows} == {
        (t, n, lv) for t in ("q4_0", "iq2_xxs") for n in (1, 4) for lv in levels}
    assert all(r["gbps"] > 0 and r["gflops"] > 0 for r in rows)


def test_bench_kernels_says_which_types_are_compute_bound(capsys):
    """The GEMV table's compute ceiling: an L2 rate per row from the native timing
    loop (times the threads), "bound" = compute exactly where it is below the read
    bandwidth, and a closing line that names those rows with the L2 rate."""
    from moe_numa.bench import kernels as BK
    assert BK.main(["--types", "q8_0,iq1_m", "--threads", "1", "--tokens", "", "--gemv-mib", "8",
                    "--reps", "1", "--json"]) == 0
    cap = capsys.readouterr()
    rows = json.loads(cap.out)
    assert {r["type"] for r in rows} == {"q8_0", "iq1_m"}
    for r in rows:
        assert r["l2_gbps"] > 0
        assert r["bound"] == ("compute" if r["l2_gbps"] < r["bandwidth_gbps"] else "memory")
    closing = [ln for ln in cap.err.splitlines() if ln.startswith("# compute-bound")]
    assert len(closing) == 1
    for r in rows:
        assert (f"{r['type']} at 1 thr (L2 " in closing[0]) == (r["bound"] == "compute")


def test_bench_report_written_after_each_model(tmp_path, tiny_q8):
    """A run of several models that stops on a later one still leaves the report of those
    it finished (a full bench run takes an hour here)."""
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(Path(tiny_q8).read_bytes()[:4096])
    argv = _common(tmp_path, tiny_q8) + ["-m", str(broken), "--engine-only", "--no-plot", "--no-bandwidth", "-r", "1"]
    with pytest.raises(Exception):
        B.main(argv)
    rep = json.loads((tmp_path / "res.json").read_text())
    assert [m["facts"]["name"] for m in rep["models"]] == [Path(tiny_q8).stem]
    assert rep["models"][0]["summary"]["rows"]
    assert "| pp16 |" in (tmp_path / "res.md").read_text()


def test_bench_falls_back_to_repack_off_when_llama_bench_aborts(tmp_path, tiny_q8):
    """b11434's AMX build aborts with repack on for some files: the harness reruns it with
    --repack 0 and the report says so (a real llama-bench without the abort is untouched)."""
    stub = tmp_path / "llama-bench"
    calls = tmp_path / "calls"
    abort = (f'open({str(calls)!r}, "a").write(" ".join(a) + "\\n")\n'
             'if "--repack" in a and a[a.index("--repack") + 1] == "1" and "--version" not in a:\n'
             '    print("ggml-backend.cpp:1434: GGML_ASSERT(*cur_backend_id != -1) failed", file=sys.stderr)\n'
             '    sys.exit(134)\n')
    text = STUB.format(python=sys.executable).replace("def val(flag)", abort + "def val(flag)", 1)
    stub.write_text(text)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    args = _common(tmp_path, tiny_q8) + ["--llama-bench", str(stub), "--no-plot", "--no-bandwidth"]   # 2 rounds
    assert B.main(args) == 0
    rep = json.loads((tmp_path / "res.json").read_text())
    llama = [r for r in rep["models"][0]["runs"] if r["engine"] == "llama.cpp"]
    assert len(llama) == 2 and all("--repack 0" in r["repack_fallback"] for r in llama)
    runs = [c for c in calls.read_text().splitlines() if "--version" not in c]
    # the abort is met once; the second round starts with repack off
    assert [("--repack 1" in c) for c in runs] == [True, False, False]
    assert "**repack off** for tiny-q8_0" in (tmp_path / "res.md").read_text()
    # an abort of another kind is still an error, not a silent rerun
    stub.write_text(text.replace("GGML_ASSERT(*cur_backend_id != -1)", "GGML_ASSERT(other)"))
    with pytest.raises(RuntimeError, match="llama-bench failed"):
        B.main(args)
