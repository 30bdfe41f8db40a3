"""Tests of the llama.cpp harness's own logic (parsing, arithmetic, bookkeeping).

None of these needs llama.cpp built; the few that do are marked slow and skip when
no build is cached.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from moe_numa.bench import llama_cpp as lc

# captured from `llama-bench -m tiny.gguf -o json -t 2 -r 2 -p 16 -n 8 --repack 1` (b11434),
# with most configuration keys dropped
BENCH_JSON = """
[
  {
    "build_commit": "b11434",
    "build_number": 11434,
    "cpu_info": "AMD EPYC",
    "backends": "CPU",
    "model_filename": "tiny.gguf",
    "model_type": "qwen3moe ?B (guessed) all F32",
    "model_size": 631296,
    "model_n_params": 157824,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "flash_attn": -1,
    "repack": true,
    "n_prompt": 16,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-11-22T03:24:27Z",
    "avg_ns": 164211,
    "stddev_ns": 34112,
    "avg_ts": 99584.322886,
    "stddev_ts": 20687.072450,
    "samples_ns": [ 188332, 140090 ],
    "samples_ts": [ 84956.4, 114212 ]
  },
  {
    "build_commit": "b11434",
    "build_number": 11434,
    "model_type": "qwen3moe ?B (guessed) all F32",
    "model_size": 631296,
    "model_n_params": 157824,
    "n_threads": 2,
    "n_prompt": 0,
    "n_gen": 8,
    "n_depth": 0,
    "avg_ns": 274727,
    "stddev_ns": 11691,
    "avg_ts": 29146.209308,
    "stddev_ts": 1240.348344,
    "samples_ns": [ 282994, 266460 ],
    "samples_ts": [ 28269.2, 30023.3 ]
  }
]
"""


def test_parse_llama_bench_json():
    recs = lc.parse_llama_bench_json("some log line on stdout\n" + BENCH_JSON)
    assert [r["test"] for r in recs] == ["pp16", "tg8"]
    pp, tg = recs
    assert pp["threads"] == 2 and pp["n_prompt"] == 16 and pp["n_gen"] == 0
    assert pp["tokens_per_s"] == pytest.approx(99584.322886)
    assert pp["tokens_per_s_stddev"] == pytest.approx(20687.07245)
    assert pp["samples_ts"] == [84956.4, 114212.0]
    assert pp["samples_ns"] == [188332, 140090]
    assert pp["model_size"] == 631296 and pp["model_n_params"] == 157824
    assert pp["build"] == "b11434 b11434"
    assert tg["tokens_per_s"] == pytest.approx(29146.209308)
    # tokens/s of a sample is n_tokens / seconds
    assert tg["samples_ts"][0] == pytest.approx(8 / (tg["samples_ns"][0] * 1e-9), rel=1e-4)


def test_parse_llama_bench_json_without_avg_and_depth():
    rec = {"n_prompt": 64, "n_gen": 32, "n_depth": 128, "n_threads": 4,
           "samples_ts": [10.0, 12.0, 14.0], "samples_ns": [1, 2, 3]}
    (r,) = lc.parse_llama_bench_json(json.dumps([rec]))
    assert r["test"] == "pp64+tg32@d128"
    assert r["tokens_per_s"] == pytest.approx(12.0)
    assert r["tokens_per_s_stddev"] == pytest.approx(np.std([10.0, 12.0, 14.0]))


@pytest.mark.parametrize("text", ["", "error: no model", "[{not json"])
def test_parse_llama_bench_json_rejects_garbage(text):
    with pytest.raises(lc.LlamaCppError):
        lc.parse_llama_bench_json(text)


def test_bench_test_args():
    assert lc._bench_test_args(["pp64", "pp512", "tg32", "tg128"]) == ["-p", "64,512", "-n", "32,128"]
    assert lc._bench_test_args(["tg32"]) == ["-p", "0", "-n", "32"]
    assert lc._bench_test_args(["pp512"]) == ["-p", "512", "-n", "0"]
    with pytest.raises(lc.LlamaCppError):
        lc._bench_test_args(["pp"])
    with pytest.raises(lc.LlamaCppError):
        lc._bench_test_args(["decode32"])


def test_cmake_flags_pin_native_release_and_tag():
    flags = lc._cmake_flags("clang-16", "clang++-16", [])
    assert "-DGGML_NATIVE=ON" in flags and "-DCMAKE_BUILD_TYPE=Release" in flags
    assert "-DCMAKE_C_COMPILER=clang-16" in flags
    assert f"-DLLAMA_BUILD_NUMBER={lc.TAG[1:]}" in flags
    gflags = lc._cmake_flags("gcc-12", "g++-12", [f"-DCMAKE_C_FLAGS={lc.GCC_NO_AMX}"])
    assert any("-mno-amx-tile" in f for f in gflags)
    # the server is one flag away and otherwise identical: a build with it stays valid for everyone
    sflags = lc._cmake_flags("clang-16", "clang++-16", [], server=True)
    assert "-DLLAMA_BUILD_SERVER=OFF" in flags and "-DLLAMA_BUILD_SERVER=ON" in sflags
    assert [f for f in sflags if "SERVER" not in f] == [f for f in flags if "SERVER" not in f]


def test_extra_target_builds_on_top_of_the_cached_build(monkeypatch, tmp_path):
    """Asking for llama-imatrix adds that target to the existing build dir: same flags, the CMake cache
    kept (so ninja rebuilds nothing that is up to date), the earlier targets still listed, the first
    build's record kept; asking again runs nothing."""
    monkeypatch.setenv("MOE_NUMA_CACHE", str(tmp_path))
    root = tmp_path / f"llama.cpp-{lc.TAG}"
    bdir = root / "build-clang"
    (root / "src" / "include").mkdir(parents=True)
    (bdir / "bin").mkdir(parents=True)
    (bdir / "CMakeCache.txt").write_text("cached\n")
    flags = lc._cmake_flags("clang-16", "clang++-16", [])
    for t in lc.TARGETS:
        (bdir / "bin" / t).write_text("")
    (bdir / "bin" / "libllama.so").write_text("")
    first = {"tag": lc.TAG, "compiler": "clang: 16", "cxx": "clang++-16", "cmake_flags": flags,
             "targets": list(lc.TARGETS), "date": "2026-01-01T00:00:00+00:00", "build_seconds": 150.0,
             "system_info": "CPU : AVX2 = 1"}
    (bdir / "build-info.json").write_text(json.dumps(first))
    runs = []

    def fake_run(cmd, log, cwd=None, env=None, what=""):
        runs.append([str(c) for c in cmd])
        if "--build" in cmd:
            for t in cmd[cmd.index("--target") + 1:]:
                (bdir / "bin" / t).write_text("")
        return ""

    monkeypatch.setattr(lc, "_run", fake_run)
    monkeypatch.setattr(lc, "_choose_compiler", lambda c, log: ("clang", "clang-16", "clang++-16", []))
    monkeypatch.setattr(lc, "_fetch_source", lambda root, log: root / "src")
    monkeypatch.setattr(lc, "_build_tools", lambda build, cxx, log: None)
    b = lc.find_or_build(log=lambda *a: None, extra_targets=("llama-imatrix",))
    assert (bdir / "CMakeCache.txt").read_text() == "cached\n"
    build = next(r for r in runs if "--build" in r)
    assert set(build[build.index("--target") + 1:]) == set(lc.TARGETS) | {"llama-imatrix"}
    info = json.loads((bdir / "build-info.json").read_text())
    assert set(info["targets"]) == set(lc.TARGETS) | {"llama-imatrix"}
    assert (info["date"], info["build_seconds"], info["system_info"]) == (first["date"], 150.0, first["system_info"])
    assert b.bin_dir == bdir / "bin"
    runs.clear()
    lc.find_or_build(log=lambda *a: None, extra_targets=("llama-imatrix",))
    lc.find_or_build(log=lambda *a: None)
    assert runs == []


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_NUMA_CACHE", str(tmp_path))
    assert lc.cache_root() == tmp_path
    monkeypatch.delenv("MOE_NUMA_CACHE")
    assert lc.cache_root() == Path.home() / ".cache" / "moe_numa"


def test_build_path_lookup(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "tools").mkdir()
    for p in (tmp_path / "bin" / "llama-bench", tmp_path / "tools" / "llama_logits"):
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    b = lc.LlamaCppBuild(bin_dir=tmp_path / "bin", lib_dir=tmp_path / "bin",
                         include_dir=tmp_path, source_dir=None, compiler="x", cmake_flags=[],
                         tag=lc.TAG, build_dir=tmp_path, tools_dir=tmp_path / "tools")
    assert b.path("llama-bench") == tmp_path / "bin" / "llama-bench"
    assert b.path("llama_logits") == tmp_path / "tools" / "llama_logits"
    with pytest.raises(lc.LlamaCppError, match="llama-quantize"):
        b.path("llama-quantize")


def test_existing_build_dir_must_have_llama_bench(tmp_path):
    with pytest.raises(lc.LlamaCppError, match="llama-bench"):
        lc.find_or_build(build_dir=tmp_path, log=lambda *a: None)


def test_ids_arg():
    assert lc._ids_arg([1, 2, 3]).dtype == np.int32
    with pytest.raises(lc.LlamaCppError):
        lc._ids_arg([])
    with pytest.raises(lc.LlamaCppError):
        lc._ids_arg(np.zeros((2, 2), dtype=np.int64))


def test_file_lock_is_reentrant_across_calls(tmp_path):
    msgs = []
    with lc._file_lock(tmp_path / "x.lock", msgs.append):
        pass
    with lc._file_lock(tmp_path / "x.lock", msgs.append):
        pass
    assert msgs == []


def test_tokenizer_text_is_varied():
    text = (Path(lc.__file__).parent / "data" / "tokenizer_text.txt").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) >= 10_000
    for needle in ("大型语言模型", "吾輩は猫である", "한국어", "Съешь", "العربية", "Größenänderung",
                   "😀", "<|im_start|>", "<｜begin▁of▁sentence｜>", "\t\t", "```rust",
                   "12345678901234567890", "\n\n\n"):
        assert needle in text, needle


def test_unframe():
    flat = np.array([2, 7, 8, 0, 3, 1, 2, 3], dtype=np.int32)
    assert lc._unframe(flat, 3) == [[7, 8], [], [1, 2, 3]]
    with pytest.raises(lc.LlamaCppError):
        lc._unframe(flat, 2)
    with pytest.raises(lc.LlamaCppError):
        lc._unframe(np.array([5, 1], dtype=np.int32), 1)


# ----------------------------------------------------------------------------- compat arithmetic

from moe_numa.bench import compat_llama_cpp as compat  # noqa: E402


def test_compare_logits_identical_and_scaled():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 50)).astype(np.float32) * 3
    r = compat.compare_logits(ref, ref)
    assert r["max_abs"] == 0 and r["argmax_agree"] == 1.0 and r["n"] == 5
    assert r["scale"] == pytest.approx(np.abs(ref).max())
    ours = ref.copy()
    ours[3, 7] += 0.5
    r = compat.compare_logits(ours, ref)
    assert r["max_abs"] == pytest.approx(0.5, rel=1e-6)
    assert r["worst_pos"] == 3
    assert r["max_rel"] == pytest.approx(0.5 / np.abs(ref).max(), rel=1e-6)


def test_compare_logits_argmax_and_near_ties():
    ref = np.array([[0.0, 1.0, 0.999], [0.0, 5.0, 1.0], [2.0, 0.0, 0.0]])
    ours = np.array([[0.0, 0.999, 1.0], [0.0, 1.0, 5.0], [2.0, 0.0, 0.0]])
    r = compat.compare_logits(ours, ref)
    assert r["argmax_agree"] == pytest.approx(1 / 3)
    assert r["argmax_disagree_pos"] == [0, 1]
    assert r["disagree_margin"] == pytest.approx(4.0)
    assert r["min_margin"] == pytest.approx(0.001)
    assert compat.compare_logits(ref, ref)["disagree_margin"] is None
    with pytest.raises(ValueError):
        compat.compare_logits(np.zeros((2, 3)), np.zeros((3, 2)))


def test_compare_ids():
    assert compat.compare_ids([1, 2, 3], [1, 2, 3])["identical"]
    r = compat.compare_ids([1, 2, 3], [1, 5, 3])
    assert not r["identical"] and r["first_diff"] == 1
    assert r["similarity"] == pytest.approx(2 * 2 / 6)
    r = compat.compare_ids([1, 2], [1, 2, 3])
    assert r["first_diff"] == 2 and r["n_ours"] == 2 and r["n_llama"] == 3


def test_split_pieces_keeps_newlines_and_covers_text():
    text = "a\n\nb c\r\nlast"
    pieces = compat.split_pieces(text)
    assert "".join(pieces) == text
    assert pieces == ["a\n", "\n", "b c\r\n", "last"]


# ----------------------------------------------------------------------------- with a cached build

@pytest.fixture(scope="module")
def llama_build():
    try:
        return lc.find_or_build(log=lambda *a: None, allow_build=False)
    except lc.LlamaCppError as e:
        pytest.skip(f"llama.cpp not built ({e}); run python -m moe_numa.bench.compat_llama_cpp once")


@pytest.fixture(scope="module")
def qwen3_f32(tmp_path_factory):
    from moe_numa.testing import make_test_model
    return make_test_model(tmp_path_factory.mktemp("m") / "q3.gguf", "qwen3moe", qtype="f32", seed=0)


@pytest.mark.slow
def test_llama_logits_match_reference(llama_build, qwen3_f32):
    model = compat._load_ours(qwen3_f32)
    ids = model.tokenizer.encode("The quick brown fox 123 中文", add_special=True, parse_special=False)
    ours = model.logits(ids)
    theirs = lc.llama_logits(llama_build, qwen3_f32, ids, threads=2)
    r = compat.compare_logits(ours, theirs)
    assert theirs.dtype == np.float32 and theirs.shape == ours.shape
    assert r["max_rel"] <= compat.F32_REL_TOL and r["argmax_agree"] == 1.0
    # chunked decoding through the KV cache gives the same logits
    chunked = lc.llama_logits(llama_build, qwen3_f32, ids, threads=2, batch=3)
    assert np.abs(chunked - theirs).max() <= 1e-4 * r["scale"]


@pytest.mark.slow
def test_llama_tokenize_matches_ours(llama_build, qwen3_f32):
    model = compat._load_ours(qwen3_f32)
    texts = ["Hello world", "  x = 12345\n\n", "<|im_start|>user\nhi<|im_end|>", "日本語 😀"]
    for parse in (False, True):
        theirs = lc.llama_tokenize_many(llama_build, qwen3_f32, texts, add_special=True, parse_special=parse)
        for t, ids in zip(texts, theirs):
            assert ids == lc.llama_tokenize(llama_build, qwen3_f32, t, add_special=True, parse_special=parse)
            assert ids == list(model.tokenizer.encode(t, add_special=True, parse_special=parse)), t


@pytest.mark.slow
def test_llama_intermediates_and_bench(llama_build, qwen3_f32):
    nodes = lc.llama_intermediates(llama_build, qwen3_f32, [1, 2, 3, 4], name_filter="ffn_moe_probs")
    probs = [n for n in nodes if n["name"] == "ffn_moe_probs-0" and n["op"] == "SOFT_MAX"]
    assert probs and probs[0]["array"].shape == (4, 8)
    assert np.allclose(probs[0]["array"].sum(-1), 1.0, atol=1e-5)
    recs = lc.run_llama_bench(llama_build, qwen3_f32, threads=1, tests=("pp8", "tg4"), repetitions=1)
    assert [r["test"] for r in recs] == ["pp8", "tg4"]
    assert all(r["tokens_per_s"] > 0 and r["threads"] == 1 for r in recs)
