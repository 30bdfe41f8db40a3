"""The NUMA engine against the numpy reference, for every architecture, random
valid expert maps and 1 to 4 (virtual) nodes; placement, counters and sync
counts; bad maps refused before any weight is copied.

Tolerances. Float weights (F32/BF16): the engine computes what the reference
computes, up to summation order: logits agree to 1e-4 of their scale. Quantized
weights: activations are rounded to Q8_0/Q8_K on the way into every matmul (as
llama.cpp does); the reference simulates that rounding (act_quant=True), so each
block agrees to ~1e-6, except that an input differing in the 7th digit can land
on the other side of a rounding boundary now and then. Blocks are therefore
compared on identical inputs (teacher forcing), with a budget for such isolated
flips, and whole-model logits must agree tightly at most positions.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import moe_numa
from moe_numa.errors import ContextOverflowError, ExpertMapError
from moe_numa.layers.attention import GQAWeights, gqa_attention
from moe_numa.layers.ffn import swiglu
from moe_numa.layers.mla import mla_attention
from moe_numa.layers.moe import moe_block
from moe_numa.layers.norm import rms_norm

from conftest import TEST_PRESETS

_REF = {}


# Float models are checked with F32 KV caches: they test the engine's arithmetic, and an F16
# cache would turn summation-order noise into fp16 rounding flips (the cache types, flips
# included: tests/test_kv_cache.py). The quantized checks keep the default F16 cache.
F32_KV = {"cache_type_k": "f32", "cache_type_v": "f32"}


def reference(make_model, preset, qtype, kv="f16"):
    key = (preset, qtype, kv)
    if key not in _REF:
        _REF[key] = moe_numa.load(make_model(preset, qtype), backend="reference", act_quant=True,
                                  cache_type_k=kv, cache_type_v=kv)
    return _REF[key]


def random_map(n_expert, n_nodes, data, layers=()):
    owners = data.draw(st.lists(st.integers(0, n_nodes - 1), min_size=n_expert, max_size=n_expert))
    d = {"model": {"n_expert": n_expert}, "nodes": list(range(n_nodes)),
         "experts": {n: [e for e, o in enumerate(owners) if o == n] for n in range(n_nodes)}}
    d["experts"] = {n: v for n, v in d["experts"].items() if v}
    d["nodes"] = sorted(d["experts"]) if data.draw(st.booleans()) else list(range(n_nodes))
    if layers and data.draw(st.booleans()):
        layer = data.draw(st.sampled_from(list(layers)))
        perm = data.draw(st.permutations(list(range(n_expert))))
        half = n_expert // 2
        d["layers"] = {layer: {d["nodes"][0]: perm[:half], d["nodes"][-1]: perm[half:]}} \
            if len(d["nodes"]) > 1 else {layer: {d["nodes"][0]: perm}}
    return d


def moe_layers(cfg):
    return [i for i in range(cfg.n_layer) if cfg.is_moe_layer(i)]


@settings(max_examples=16)
@given(preset=st.sampled_from(TEST_PRESETS), qtype=st.sampled_from(["f32", "bf16"]),
       n_nodes=st.integers(1, 4), data=st.data())
def test_float_models_match_reference(make_model, preset, qtype, n_nodes, data):
    check_float_model(make_model, preset, qtype, n_nodes, data)


def check_float_model(make_model, preset, qtype, n_nodes, data):
    ref = reference(make_model, preset, qtype, "f32")
    cfg = ref.config
    emap = random_map(cfg.n_expert, n_nodes, data, moe_layers(cfg))
    n = data.draw(st.integers(1, 10))
    ids = data.draw(st.lists(st.integers(0, cfg.n_vocab - 1), min_size=n + 2, max_size=n + 2))
    with moe_numa.load(make_model(preset, qtype), backend="engine", numa_nodes=n_nodes, expert_map=emap,
                       **F32_KV) as eng:
        # prefill of n tokens, then two decode steps, against the reference's full prefill
        eng.backend.reset()
        got = [eng.backend.forward(np.array(ids[:n]), all_logits=True)]
        got += [eng.backend.forward(np.array([t]), all_logits=True) for t in ids[n:]]
        got = np.concatenate(got)
    want = ref.logits(ids)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert (got.argmax(-1) == want.argmax(-1)).all()


def routing_margins(ref, ids):
    """Per token, the smallest routing margin over the MoE layers in the reference's own forward
    pass: the gap between the last chosen and the first unchosen selection score (and, with
    group-limited routing, between the last kept and the first dropped group). Where it is
    within the activation-quantization noise the engine may pick the other expert, and that
    token (and every later one, through the KV cache) may then differ by far more than rounding."""
    R, cfg = ref.backend.forward_pass, ref.config
    deq, rc = R.deq, cfg.router
    x = deq.rows(ref.weights.token_embd, np.asarray(ids)).astype(np.float32)
    cache, pos = R.new_cache(len(ids), ref.backend.cache_type_k, ref.backend.cache_type_v), np.arange(len(ids))
    margin = np.full(len(ids), np.inf)
    for i, w in enumerate(ref.weights.layers):
        attn = gqa_attention if isinstance(w.attn, GQAWeights) else mla_attention
        a = x + attn(cfg.attention, w.attn, rms_norm(x, deq(w.attn_norm), cfg.rms_eps), cache.layers[i], pos, deq)
        h = rms_norm(a, deq(w.ffn_norm), cfg.rms_eps)
        if cfg.is_moe_layer(i):
            logits = deq.linear(h, w.ffn.router).astype(np.float64)
            p = np.exp(logits - logits.max(-1, keepdims=True)) if rc.gating == "softmax" else 1 / (1 + np.exp(-logits))
            if rc.gating == "softmax":
                p = p / p.sum(-1, keepdims=True)
            sel = p + (deq(w.ffn.probs_bias) if w.ffn.probs_bias is not None else 0)
            if rc.n_groups > 1:
                g = sel.reshape(len(ids), rc.n_groups, -1)
                gs = -np.sort(-g, -1)
                gscore = gs[..., :2].sum(-1) if rc.group_rule == "top2_sum" else gs[..., 0]
                order = -np.sort(-gscore, -1)
                margin = np.minimum(margin, order[:, rc.n_groups_used - 1] - order[:, rc.n_groups_used])
                keep = np.argsort(-gscore, -1, kind="stable")[:, :rc.n_groups_used]
                mask = np.full(gscore.shape, -np.inf)
                np.put_along_axis(mask, keep, 0.0, -1)
                sel = (g + mask[..., None]).reshape(len(ids), -1)
            top = -np.sort(-sel, -1)
            margin = np.minimum(margin, top[:, rc.n_used - 1] - top[:, rc.n_used])
            f = a + moe_block(rc, w.ffn, h, deq)
        else:
            f = a + swiglu(w.ffn, h, deq)
        x = f.astype(np.float32)
    return margin


def _blocks(ref, eng, ids):
    """Per-block relative errors (per token) of the engine on the reference's own inputs."""
    R, B, cfg = ref.backend.forward_pass, eng.backend, ref.config
    deq = R.deq
    x = deq.rows(ref.weights.token_embd, np.asarray(ids)).astype(np.float32)
    cache, pos = R.new_cache(len(ids), ref.backend.cache_type_k, ref.backend.cache_type_v), np.arange(len(ids))
    errs = []
    for i, w in enumerate(ref.weights.layers):
        attn = gqa_attention if isinstance(w.attn, GQAWeights) else mla_attention
        a = x + attn(cfg.attention, w.attn, rms_norm(x, deq(w.attn_norm), cfg.rms_eps), cache.layers[i], pos, deq)
        got = x.copy()
        B.core.attention(i, got, 0)
        errs.append(np.linalg.norm(got - a, axis=1) / np.linalg.norm(a - x, axis=1))
        ffn = (lambda h: moe_block(cfg.router, w.ffn, h, deq)) if cfg.is_moe_layer(i) else \
            (lambda h: swiglu(w.ffn, h, deq))
        f = a + ffn(rms_norm(a, deq(w.ffn_norm), cfg.rms_eps))
        got = a.astype(np.float32)
        B.core.ffn(i, got)
        errs.append(np.linalg.norm(got - f, axis=1) / np.linalg.norm(f - a, axis=1))
        x = f.astype(np.float32)
    return np.concatenate(errs)


@settings(max_examples=16)
@given(preset=st.sampled_from(TEST_PRESETS), qtype=st.sampled_from(["q8_0", "q4_k_m", "q6_k", "q4_0"]),
       n_nodes=st.integers(1, 4), data=st.data())
def test_quantized_blocks_match_reference(make_model, preset, qtype, n_nodes, data):
    check_quantized_blocks(make_model, preset, qtype, n_nodes, data)


def check_quantized_blocks(make_model, preset, qtype, n_nodes, data):
    ref = reference(make_model, preset, qtype)
    cfg = ref.config
    emap = random_map(cfg.n_expert, n_nodes, data, moe_layers(cfg))
    ids = data.draw(st.lists(st.integers(0, cfg.n_vocab - 1), min_size=1, max_size=12))
    with moe_numa.load(make_model(preset, qtype), backend="engine", numa_nodes=n_nodes, expert_map=emap) as eng:
        errs = _blocks(ref, eng, ids)
    assert np.median(errs) <= 1e-4            # most blocks: summation order only
    assert errs.max() <= 3e-2                 # an isolated rounding-boundary flip at worst


# The architectures added last, at every node count (the sampled tests above may not draw them).
@pytest.mark.parametrize("n_nodes", [1, 2, 3, 4])
@pytest.mark.parametrize("preset", ["glm4moe"])
@settings(max_examples=3)
@given(data=st.data())
def test_newest_architectures_at_every_node_count(make_model, preset, n_nodes, data):
    check_float_model(make_model, preset, data.draw(st.sampled_from(["f32", "bf16"])), n_nodes, data)
    check_quantized_blocks(make_model, preset, data.draw(st.sampled_from(["q8_0", "q4_k_m", "q6_k", "q4_0"])),
                           n_nodes, data)


@pytest.mark.parametrize("preset", TEST_PRESETS)
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_quantized_logits_match_reference(make_model, preset, qtype):
    ref = reference(make_model, preset, qtype)
    ids = list(range(10, 10 + 12))
    want = ref.logits(ids)
    with moe_numa.load(make_model(preset, qtype), backend="engine", numa_nodes=2) as eng:
        got = eng.logits(ids)
    per_pos = np.abs(got - want).max(axis=1) / np.abs(want).max()
    assert np.median(per_pos) <= 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_decode_equals_prefill_and_counts_syncs(make_model, preset):
    path = make_model(preset, "q8_0")
    with moe_numa.load(path, backend="engine", numa_nodes=2) as eng:
        b, cfg = eng.backend, eng.config
        ids = np.arange(3, 12)
        full = b.forward(ids, all_logits=True)
        b.reset()
        b.reset_counters()
        steps = np.concatenate([b.forward(ids[:4], all_logits=True)] +
                               [b.forward(ids[k:k + 1], all_logits=True) for k in range(4, len(ids))])
        np.testing.assert_allclose(steps, full, atol=1e-4 * np.abs(full).max())
        c = b.counters()
        # one forward call = 2 syncs per layer + 1 for the head, and one more per MoE layer, whose
        # router runs once, split over the nodes (by tokens from 4 tokens on, by rows below); 6 calls
        n_moe = len(moe_layers(cfg))
        assert b.core.route_split_min == 0           # the default: by tokens from 4 tokens
        assert c["syncs"] == 6 * (2 * cfg.n_layer + 1 + n_moe)
        routed = sum(int(t.sum()) for t in c["expert_tokens"])
        assert routed == len(ids) * cfg.router.n_used * n_moe


def test_ubatch_chunks_equal_one_batch(make_model):
    path = make_model("qwen3moe", "f32")
    ids = list(range(5, 22))
    with moe_numa.load(path, backend="engine", ubatch=4) as small, moe_numa.load(path, backend="engine") as big:
        np.testing.assert_allclose(small.logits(ids), big.logits(ids), atol=1e-5 * 20)
        with pytest.raises(ContextOverflowError):
            small.backend.forward(np.arange(small.n_ctx + 1))


def test_experts_live_on_mapped_nodes_with_one_copy(make_model):
    path = make_model("deepseek-v3", "q8_0")
    emap = {"model": {"n_expert": 16}, "nodes": [0, 1, 2],
            "experts": {0: "0-3", 1: "4-9", 2: "10-15"}, "layers": {2: {0: "8-15", 2: "0-7"}}}
    with moe_numa.load(path, backend="engine", numa_nodes=3, expert_map=emap) as eng:
        items = eng.backend.store.items
        for (node, key), it in items.items():
            if it.cls == "routed_experts":
                layer, expert = int(key.split(".")[0][1:]), int(key.split(".")[1][1:])
                want = {2: {0: range(8, 16), 2: range(0, 8)}}.get(layer, {0: range(0, 4), 1: range(4, 10),
                                                                          2: range(10, 16)})
                assert expert in want[node]
        rep = eng.placement_report()
        gguf = eng.gguf
        exps = sum(t.nbytes for t in gguf if "_exps" in t.name)
        placed = sum(n["bytes_by_class"].get("routed_experts", 0) for n in rep["nodes"])
        assert placed == exps                                # every expert exactly once
        attn_split = sum(it.nbytes for it in items.values() if it.cls == "attention" and not it.replicated)
        attn_gguf = sum(t.nbytes for t in gguf if ".attn_" in t.name and t.name.endswith(".weight")
                        and not any(k in t.name for k in ("norm", "kv_a_mqa", "q_a.")))
        assert attn_split == attn_gguf                       # head shards partition the tensors


def test_bad_map_is_refused_before_any_copy(make_model, monkeypatch):
    from moe_numa.engine import backend
    def boom(*a, **k):
        raise AssertionError("weights were copied")
    monkeypatch.setattr(backend.NodeStore, "materialize", boom)
    path = make_model("qwen3moe", "q8_0")
    with pytest.raises(ExpertMapError, match="model.n_expert: the map is for 64 experts but the model has 8"):
        moe_numa.load(path, backend="engine", expert_map={"model": {"n_expert": 64}, "nodes": [0],
                                                           "experts": {0: "0-63"}})
    with pytest.raises(ExpertMapError, match="nodes: node 3 is unknown; the engine has nodes 0-1"):
        moe_numa.load(path, backend="engine", numa_nodes=2,
                      expert_map={"nodes": [0, 3], "experts": {0: "0-3", 3: "4-7"}})
    with pytest.raises(ExpertMapError, match=r"layers\.5: not an MoE layer"):
        moe_numa.load(path, backend="engine", expert_map={"nodes": [0], "experts": {0: "0-7"},
                                                          "layers": {5: {0: "0-7"}}})


def test_engine_generate_matches_reference(make_model):
    path = make_model("qwen2moe", "f32")
    ref = moe_numa.load(path, backend="reference")
    with moe_numa.load(path, backend="engine", numa_nodes=2) as eng:
        assert eng.generate("Hello", max_tokens=12, temperature=0) == ref.generate("Hello", max_tokens=12,
                                                                                  temperature=0)


@pytest.mark.parametrize("preset", ["qwen3moe", "deepseek-v3"])
@pytest.mark.parametrize("qtype", ["q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs", "q2_k", "iq2_xxs", "iq2_xs",
                                   "iq2_s", "iq3_xxs", "iq3_s", "iq1_s"])
def test_every_weight_type_runs_in_the_engine(make_model, preset, qtype):
    """Files of each type (rows that the type's block does not divide fall back as
    llama-quantize does: Q5_0 / IQ4_NL) run in the engine at 2 nodes, block by
    block as the act-quant reference."""
    ref = reference(make_model, preset, qtype)
    ids = [3, 17, 101, 5, 9]
    with moe_numa.load(make_model(preset, qtype), backend="engine", numa_nodes=2) as eng:
        errs = _blocks(ref, eng, ids)
    assert np.median(errs) <= 1e-4
    assert errs.max() <= 3e-2


@pytest.mark.parametrize("nodes", [1, 2, 3])
def test_one_native_call_equals_the_block_calls(make_model, nodes):
    """core.forward (the layer loop in C, then the head) gives bit-identical logits and KV
    caches to one call per block, and so does the parallel reduction of the partials (forced
    here with a threshold of 1; by default only prefill-sized blocks use it)."""
    path = make_model("qwen3moe", "q8_0")
    ids = np.arange(5, 14)
    with moe_numa.load(path, backend="engine", numa_nodes=nodes) as m:
        b, cfg = m.backend, m.config
        core = b.core

        def by_blocks(x, pos0):
            for layer in range(cfg.n_layer):
                core.attention(layer, x, pos0)
                core.ffn(layer, x)
            out = np.empty((len(x), cfg.n_vocab), np.float32)
            core.head(x, out)
            return out

        want = [by_blocks(b.embed(ids[:6]), 0), by_blocks(b.embed(ids[6:]), 6)]
        for threshold in (0, 1):
            core.reduce_parallel_min = threshold
            b.reset()
            x = b.embed(ids[:6])
            got = np.empty((6, cfg.n_vocab), np.float32)
            core.forward(x, 0, logits=got)
            np.testing.assert_array_equal(got, want[0])
            last = np.empty((1, cfg.n_vocab), np.float32)
            core.forward(b.embed(ids[6:]), 6, logits=last, logit_from=2)   # the last row only
            np.testing.assert_array_equal(last[0], want[1][-1])
        core.reduce_parallel_min = 0


def test_native_forward_refuses_bad_arguments(make_model):
    from moe_numa.errors import ShapeError
    with moe_numa.load(make_model("qwen3moe", "q8_0"), backend="engine", numa_nodes=2) as m:
        b, core = m.backend, m.backend.core
        x = b.embed(np.arange(3))
        logits = np.empty((3, m.config.n_vocab), np.float32)
        with pytest.raises(ShapeError, match="logit_from"):
            core.forward(x, 0, logits=logits, logit_from=3)
        with pytest.raises(ShapeError, match="pos and slot together"):
            core.forward(x, pos=np.arange(3))
        with pytest.raises(ShapeError, match="logits must be"):
            core.forward(x, 0, logits=np.empty((2, m.config.n_vocab), np.float32))
        with pytest.raises(ShapeError, match="positions"):
            core.forward(x, b.n_ctx - 2)                     # past the context: nothing runs
        with pytest.raises(ShapeError, match=r"positions must be in \[0, "):
            core.forward(x, pos=[0, 1, b.n_ctx], slot=[0, 0, 0])
        with pytest.raises(ShapeError, match=r"slots must be in \[0, "):
            core.forward(x, pos=[0, 1, 2], slot=[0, 0, b.n_slots])
