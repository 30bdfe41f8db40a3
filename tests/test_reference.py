"""The numpy reference forward pass: cache semantics, routing rules, RoPE."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moe_numa.errors import ContextOverflowError
from moe_numa.gguf_file import GGUFModelFile
from moe_numa.layers.moe import RouterConfig, route
from moe_numa.layers.rope import RopeConfig, apply_rope, rope_cos_sin
from moe_numa.models import load_model
from moe_numa.models.base import ReferenceForward

from conftest import TEST_PRESETS

_REFS = {}


def reference(make_model, preset, qtype="f32"):
    key = (preset, qtype)
    if key not in _REFS:
        mod, cfg, w = load_model(GGUFModelFile(make_model(preset, qtype)))
        _REFS[key] = ReferenceForward(mod, cfg, w)
    return _REFS[key]


@settings(max_examples=12)
@given(preset=st.sampled_from(TEST_PRESETS), data=st.data())
def test_kv_cache_decode_equals_full_prefill(make_model, preset, data):
    ref = reference(make_model, preset)
    n = data.draw(st.integers(2, 12))
    ids = np.array(data.draw(st.lists(st.integers(0, ref.cfg.n_vocab - 1), min_size=n, max_size=n)))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=3))))
    full = ref.logits(ref.hidden_states(ids, ref.new_cache(32)))
    cache = ref.new_cache(32)
    pieces = [ref.hidden_states(chunk, cache) for chunk in np.split(ids, cuts)]
    assert cache.n_past == n
    stepped = ref.logits(np.concatenate(pieces))
    scale = np.abs(full).max()
    assert np.abs(full - stepped).max() <= 1e-5 * scale


def test_context_overflow(make_model):
    ref = reference(make_model, "qwen3moe")
    cache = ref.new_cache(4)
    ref.hidden_states(np.array([1, 2, 3]), cache)
    with pytest.raises(ContextOverflowError, match="exceed the context of 4"):
        ref.hidden_states(np.array([4, 5]), cache)


def test_logits_change_with_position(make_model):
    """The same token at different positions gives different logits (RoPE is applied)."""
    ref = reference(make_model, "deepseek-v3")
    out = ref.logits(ref.hidden_states(np.array([7, 7, 7]), ref.new_cache(8)))
    assert not np.allclose(out[1], out[2])


# -- router ---------------------------------------------------------------

@given(seed=st.integers(0, 10**6), gating=st.sampled_from(["softmax", "sigmoid"]),
       norm=st.booleans(), scale=st.sampled_from([0.0, 1.0, 2.5]), rule=st.sampled_from(["top2_sum", "max"]),
       groups=st.sampled_from([(0, 0), (4, 2), (8, 3)]), bias=st.booleans())
def test_route_properties(seed, gating, norm, scale, rule, groups, bias):
    rng = np.random.default_rng(seed)
    E, k, T = 32, 4, 5
    cfg = RouterConfig(E, k, gating=gating, norm_weights=norm, weights_scale=scale,
                       n_groups=groups[0], n_groups_used=groups[1], group_rule=rule)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    b = rng.standard_normal(E).astype(np.float32) * 0.3 if bias else None
    ids, w = route(cfg, logits, b)
    assert ids.shape == (T, k) and w.shape == (T, k)
    assert all(len(set(row)) == k for row in ids.tolist())
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) if gating == "softmax" else 1 / (1 + np.exp(-logits))
    expected = np.take_along_axis(probs, ids, -1)
    if norm:
        expected = expected / expected.sum(-1, keepdims=True)
    if scale not in (0.0, 1.0):
        expected = expected * scale
    np.testing.assert_allclose(w, expected, rtol=1e-5)   # weights come from unbiased scores
    sel = probs + (b if bias else 0)
    if groups[0]:
        per = E // groups[0]
        grouped = sel.reshape(T, groups[0], per)
        score = np.sort(grouped, -1)[..., -2:].sum(-1) if rule == "top2_sum" else grouped.max(-1)
        allowed = np.argsort(-score, -1)[:, :groups[1]]
        for t in range(T):
            assert set((ids[t] // per).tolist()) <= set(allowed[t].tolist())
    else:
        best = np.sort(np.argsort(-sel, -1)[:, :k], -1)
        np.testing.assert_array_equal(np.sort(ids, -1), best)


def test_group_rules_differ():
    """A group with one strong expert wins under "max" but loses to a group with two good ones under "top2_sum"."""
    cfg_sum = RouterConfig(8, 1, gating="sigmoid", n_groups=2, n_groups_used=1, group_rule="top2_sum")
    cfg_max = RouterConfig(8, 1, gating="sigmoid", n_groups=2, n_groups_used=1, group_rule="max")
    p = np.array([[0.95, 0.01, 0.01, 0.01, 0.9, 0.9, 0.01, 0.01]], dtype=np.float32)
    logits = np.log(p / (1 - p))
    assert route(cfg_max, logits)[0][0, 0] == 0
    assert route(cfg_sum, logits)[0][0, 0] in (4, 5)


def test_bias_changes_selection_not_weights():
    cfg = RouterConfig(4, 1, gating="sigmoid")
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], dtype=np.float32)
    ids, w = route(cfg, logits, np.array([0, 0, 0, 5.0], dtype=np.float32))
    assert ids[0, 0] == 3 and w[0, 0] == pytest.approx(1 / (1 + math.exp(1.0)), rel=1e-6)


# -- RoPE -----------------------------------------------------------------

def test_rope_rotates_pairs_by_position():
    cfg = RopeConfig(n_dims=8, base=10000.0, neox=True)
    cos, sin = rope_cos_sin(cfg, np.array([0, 3]))
    x = np.random.default_rng(0).standard_normal((2, 1, 8)).astype(np.float32)
    y = apply_rope(x, cos, sin, neox=True)
    np.testing.assert_allclose(y[0], x[0], atol=1e-7)           # position 0: identity
    np.testing.assert_allclose(np.linalg.norm(y[1]), np.linalg.norm(x[1]), rtol=1e-6)  # a rotation
    theta = 3 * 10000.0 ** (-2 * np.arange(4) / 8)
    a, b = x[1, 0, :4], x[1, 0, 4:]
    np.testing.assert_allclose(y[1, 0, :4], a * np.cos(theta) - b * np.sin(theta), rtol=1e-5, atol=1e-6)
    # non-NeoX pairs adjacent elements
    z = apply_rope(x, cos, sin, neox=False)
    np.testing.assert_allclose(z[1, 0, 0], x[1, 0, 0] * np.cos(theta[0]) - x[1, 0, 1] * np.sin(theta[0]), rtol=1e-5)


def test_yarn_matches_reference_formula():
    """YaRN angles: low-frequency dims are interpolated, high-frequency ones extrapolated."""
    cfg = RopeConfig(n_dims=64, base=10000.0, neox=False, freq_scale=0.25, ext_factor=1.0,
                     attn_factor=1.0 / (1 + 0.1 * math.log(4)), n_ctx_orig=1024)
    pos = np.array([100])
    cos, sin = rope_cos_sin(cfg, pos)
    theta = np.arctan2(sin, cos)[0]
    base_theta = 100 * 10000.0 ** (-2 * np.arange(32) / 64)
    assert np.allclose(np.hypot(cos, sin), 1.0, atol=1e-6)    # magnitude cancelled
    assert math.isclose(theta[0], math.remainder(base_theta[0], 2 * math.pi), rel_tol=1e-4)   # extrapolated
    assert math.isclose(theta[-1], base_theta[-1] * 0.25, rel_tol=1e-4)                       # interpolated
