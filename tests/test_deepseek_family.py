"""Kimi-K2 and Moonlight are DeepSeek-V3's architecture (GGUF arch `deepseek2`) with 384
and 64 routed experts and a single expert group: their files load through
models/deepseek2.py with no code of their own.  The `kimi-k2` and `moonlight` presets
have those routers (and Moonlight's q projection without LoRA); both oracles hold.

(The real files' own tokenizers, `tokenizer.ggml.pre` "kimi-k2" and Moonlight's
tiktoken vocabulary, are not among the supported pre-tokenizers; the presets carry the
DeepSeek-V3 vocabulary.)
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import moe_numa
from moe_numa.bench import llama_cpp as lc
from moe_numa.gguf_file import GGUFModelFile
from moe_numa.layers.moe import GATING_SIGMOID
from moe_numa.models import deepseek2, load_model
from moe_numa.testing import PRESETS

from test_engine import check_float_model

# llama.cpp runs an F32 KV cache in these comparisons (the engine defaults to F16, as llama.cpp does)
F32_KV = {"cache_type_k": "f32", "cache_type_v": "f32"}

PRESETS_HERE = ["kimi-k2", "moonlight"]


@pytest.mark.parametrize("preset", PRESETS_HERE)
def test_loads_as_deepseek2(make_model, preset):
    spec = PRESETS[preset]
    module, cfg, w = load_model(GGUFModelFile(make_model(preset)))
    r = cfg.router
    assert module is deepseek2 and cfg.arch == "deepseek2"
    assert (r.n_expert, r.n_used, r.gating, r.norm_weights) == (spec.n_expert, spec.n_used, GATING_SIGMOID, True)
    assert r.n_groups == 1 and r.weights_scale == pytest.approx(spec.weights_scale)   # one group: no limit
    assert cfg.attention.q_lora_rank == spec.q_lora_rank and cfg.split_kv_b
    assert w.layers[1].ffn.gate_exps.shape[0] == spec.n_expert


@pytest.mark.parametrize("n_nodes", [1, 2, 3, 4])
@pytest.mark.parametrize("preset", PRESETS_HERE)
@settings(max_examples=2)
@given(data=st.data())
def test_engine_matches_reference(make_model, preset, n_nodes, data):
    check_float_model(make_model, preset, "f32", n_nodes, data)


@pytest.mark.parametrize("preset", PRESETS_HERE)
def test_reference_and_engine_match_llama_cpp(make_model, preset):
    try:
        llama = lc.find_or_build(allow_build=False, log=lambda *a: None)
    except lc.LlamaCppError as e:
        pytest.skip(f"no llama.cpp build found ({e})")
    path = make_model(preset, "f32")
    ids = list(range(100, 132))
    want = lc.llama_logits(llama, path, ids, threads=2)
    got = {"reference": moe_numa.load(path, backend="reference").logits(ids)}
    with moe_numa.load(path, backend="engine", numa_nodes=2, **F32_KV) as eng:
        got["engine"] = eng.logits(ids)
    for name, g in got.items():
        rel = np.abs(np.asarray(g, np.float64) - want).max() / np.abs(want).max()
        assert rel <= 1e-4, f"{name}: {rel:.2e}"
        assert (g.argmax(-1) == want.argmax(-1)).all(), name
