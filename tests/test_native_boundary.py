"""The native engine's boundary: every field a setter hands to C is checked and
a bad one raises a MoeNumaError naming node, layer and field, leaving the slot
as it was; block calls check layer, token count and positions in C (error
codes) before touching the caches. Cython's bounds checks are off, so each of
these would otherwise write or read out of bounds."""
from __future__ import annotations

import numpy as np
import pytest

import moe_numa
from moe_numa import _native
from moe_numa.errors import MoeNumaError, ShapeError


@pytest.fixture(scope="module")
def engines(make_model):
    """One loaded engine per attention kind: GQA (qwen3moe), absorbed MLA (deepseek-v3), MLA+MHA (v2-lite),
    with whole experts (the FFN cases mutate whole experts' matrices)."""
    out = {}
    for preset in ("qwen3moe", "deepseek-v3", "deepseek-v2-lite"):
        out[preset] = moe_numa.load(make_model(preset, "q8_0"), n_ctx=64, numa_nodes=2, rebalance_every=None,
                                    ubatch=16, expert_map="contiguous")
    yield out
    for m in out.values():
        m.close()


def params(m, kind, node, layer):
    B = m.backend
    return B.store.resolve(B._params[(kind, node, layer)])


def moe_layer(m):
    return next(i for i in range(m.config.n_layer) if m.config.is_moe_layer(i))


def logits_of(m):
    return m.logits([1, 2, 3, 4])


def setter(m, kind):
    core = m.backend.core
    return {"attn": core.set_attention, "ffn": core.set_ffn}[kind]


def bad(p, **changes):
    return p.replace(**changes)


def experts_with(p, **changes):
    return {e: x.replace(**{k: f(x) for k, f in changes.items()}) for e, x in p.experts.items()}


FFN_CASES = [   # (mutation of a MoE layer's params, words the error must contain)
    (lambda p: bad(p, n_used=p.n_expert + 1), "n_used"),
    (lambda p: bad(p, n_used=0), "n_used"),
    (lambda p: bad(p, n_expert=0), "n_expert"),
    (lambda p: bad(p, n_groups=4, n_groups_used=5), "n_groups_used"),
    (lambda p: bad(p, n_groups=3), "n_groups"),
    (lambda p: bad(p, gating=7), "gating"),
    (lambda p: bad(p, group_rule=-1), "group_rule"),
    (lambda p: bad(p, experts={p.n_expert: next(iter(p.experts.values()))}), "expert"),
    (lambda p: bad(p, experts={-1: next(iter(p.experts.values()))}), "expert"),
    (lambda p: bad(p, experts=experts_with(p, gate=lambda x: x.gate[:-1])), "gate"),
    (lambda p: bad(p, experts=experts_with(p, down=lambda x: x.down[:, :-1])), "down"),
    (lambda p: bad(p, experts={e: (x.gate, x.up, x.down) for e, x in p.experts.items()}), "Expert"),
    (lambda p: bad(p, expert_tokens=np.zeros(p.n_expert - 1, np.int64)), "expert_tokens"),
    (lambda p: bad(p, ffn_norm=p.ffn_norm[:-1]), "ffn_norm"),
    (lambda p: bad(p, probs_bias=np.zeros(3, np.float32)), "probs_bias"),
    (lambda p: bad(p, router=p.router.replace(raw=p.router.raw[:-1])), "ffn_gate_inp"),
    (lambda p: bad(p, router=p.router.replace(cols=p.router.cols * 2)), "router"),
    (lambda p: bad(p, router=p.router.replace(type=999)), "router"),
    (lambda p: bad(p, router=(p.router.type, p.router.raw, p.router.cols)), "router: expected a Mat"),
    (lambda p: bad(p, hidden=p.hidden + 1), "hidden"),
    (lambda p: bad(p, kind="bogus"), "kind"),
    (lambda p: bad(p, kind=7), "ffn kind 7 unknown"),
    (lambda p: bad(p, inter=-1), "inter"),
    (lambda p: bad(p, n_used=1 << 40), "out of range"),
]


@pytest.mark.parametrize("case", range(len(FFN_CASES)))
def test_bad_ffn_fields_are_refused_and_leave_the_layer(engines, case):
    m = engines["qwen3moe"]
    layer = moe_layer(m)
    before = logits_of(m)
    retained = m.backend.core.retained()
    mutate, words = FFN_CASES[case]
    with pytest.raises(ShapeError, match=words) as e:
        m.backend.core.set_ffn(1, layer, mutate(params(m, "ffn", 1, layer)))
    assert "node 1" in str(e.value) or "expert" in str(e.value)
    assert m.backend.core.retained() == retained
    np.testing.assert_array_equal(logits_of(m), before)


def attn_cases(kind):
    cases = [
        (lambda p: bad(p, n_head=p.n_head + 1), "n_head|q2kv|rows|head"),
        (lambda p: bad(p, rope_cos=p.rope_cos[:-1]), "rope_cos"),
        (lambda p: bad(p, rope_sin=p.rope_sin[: len(p.rope_sin) // 2]), "rope_sin"),
        (lambda p: bad(p, n_ctx=p.n_ctx * 2), "rope_cos|cache|n_ctx"),
        (lambda p: bad(p, attn_norm=None), "attn_norm"),
        (lambda p: bad(p, qk_dim=4096), "qk_dim|head size|rows|cache|rope|norm|bq"),
        (lambda p: bad(p, rope_dims=3), "rope_dims"),
        (lambda p: bad(p, kind="nope"), "kind"),
        (lambda p: bad(p, kind=9), "attention kind 9 unknown"),
        (lambda p: bad(p, wo=p.wo.replace(raw=p.wo.raw[:-1])), "attn_output"),
    ]
    if kind == "gqa":
        cases += [
            (lambda p: bad(p, q2kv=np.full(p.n_head, p.n_kv, np.int32)), "q2kv"),
            (lambda p: bad(p, q2kv=np.arange(p.n_head - 1, dtype=np.int32)), "q2kv"),
            (lambda p: bad(p, cache_k=p.cache_k.reshape(-1)[:-1]), "cache_k"),
            (lambda p: bad(p, cache_v=None), "cache"),
            (lambda p: bad(p, n_kv=p.n_kv + 1), "n_kv|rows|cache|bk"),
            (lambda p: bad(p, rope_off=p.qk_dim), "rope_off"),
            (lambda p: bad(p, bq=np.zeros(3, np.float32)), "bq"),
            (lambda p: bad(p, cache_k=p.cache_k.astype(np.float64)), "cache_k"),
        ]
    elif kind == "mla":
        cases += [
            (lambda p: bad(p, k_b=p.k_b[:-1]), "k_b"),
            (lambda p: bad(p, cache_lat=p.cache_lat[:-1]), "cache_lat"),
            (lambda p: bad(p, cache_ktiles=None), "cache"),
            (lambda p: bad(p, nope=p.nope + 1), "nope|qk_dim|rows|k_b"),
        ]
    else:
        cases += [(lambda p: bad(p, wkv_b=p.wkv_b.replace(raw=p.wkv_b.raw[:-1])), "attn_kv_b")]
    return cases


@pytest.mark.parametrize("preset,kind", [("qwen3moe", "gqa"), ("deepseek-v3", "mla"), ("deepseek-v2-lite", "mla_mha")])
def test_bad_attention_fields_are_refused_and_leave_the_layer(engines, preset, kind):
    m = engines[preset]
    before = logits_of(m)
    node = next(n for n in range(2) if params(m, "attn", n, 0).n_head > 0)
    assert params(m, "attn", node, 0).kind == _native.ATTN_KINDS[kind]
    for mutate, words in attn_cases(kind):
        with pytest.raises(ShapeError, match=words):
            m.backend.core.set_attention(node, 0, mutate(params(m, "attn", node, 0)))
    np.testing.assert_array_equal(logits_of(m), before)


def test_indices_are_checked_in_every_setter(engines):
    m = engines["qwen3moe"]
    core, n_layer = m.backend.core, m.config.n_layer
    p_attn, p_ffn, p_head = params(m, "attn", 0, 0), params(m, "ffn", 0, 0), params(m, "head", 0, -1)
    for node, layer in [(2, 0), (-1, 0), (0, n_layer), (0, -1), (1 << 20, 0)]:
        with pytest.raises(ShapeError, match="out of range"):
            core.set_attention(node, layer, p_attn)
        with pytest.raises(ShapeError, match="out of range"):
            core.set_ffn(node, layer, p_ffn)
    for node in (2, -1):
        with pytest.raises(ShapeError, match="out of range"):
            core.set_head(node, p_head)
        with pytest.raises(ShapeError, match="out of range"):
            core.scratch_bytes(node)
    with pytest.raises(ShapeError, match="output rows"):
        core.set_head(1, bad(p_head, v0=m.config.n_vocab))
    with pytest.raises(ShapeError, match="vocab"):
        core.set_head(1, bad(p_head, vocab=p_head.vocab + 1))


def test_set_shard_dispatches_by_descriptor_and_names_a_foreign_one(engines):
    m = engines["qwen3moe"]
    core, before = m.backend.core, logits_of(m)
    for kind, layer in (("attn", 0), ("ffn", 0), ("head", -1)):
        core.set_shard(0, layer, params(m, kind, 0, layer))   # the plan's own shards go back in
    np.testing.assert_array_equal(logits_of(m), before)
    with pytest.raises(ShapeError, match="dict is not a shard descriptor"):
        core.set_shard(0, 0, params(m, "ffn", 0, 0).fields())
    with pytest.raises(ShapeError, match="expected a FFNShard"):
        core.set_ffn(0, 0, params(m, "attn", 0, 0))
    with pytest.raises(ShapeError, match="out of range"):   # the kind's own checks still run
        core.set_shard(0, m.config.n_layer, params(m, "ffn", 0, 0))


@pytest.mark.parametrize("kind", ["attn", "ffn", "head"])
def test_a_mistyped_or_missing_descriptor_field_is_an_error_naming_it(engines, kind):
    p = params(engines["qwen3moe"], kind, 0, 0 if kind != "head" else -1)
    fields = p.fields()
    with pytest.raises(ShapeError, match=r"unknown field\(s\) rms_epz"):
        type(p)(**fields, rms_epz=1e-6)
    with pytest.raises(ShapeError, match=r"missing field\(s\) rms_eps"):
        type(p)(**{k: v for k, v in fields.items() if k != "rms_eps"})
    with pytest.raises(ShapeError, match=r"unknown field\(s\) rms_epz; missing field\(s\) rms_eps"):
        type(p)(**{k: v for k, v in fields.items() if k != "rms_eps"}, rms_epz=1e-6)
    with pytest.raises(ShapeError, match="rms_epz"):
        p.replace(rms_epz=1e-6)
    with pytest.raises(AttributeError, match="rms_epz"):   # fixed fields: no new attribute either
        p.rms_epz = 1e-6
    with pytest.raises(ShapeError, match=r"Mat: missing field\(s\) cols"):
        _native.Mat(type=8, raw=np.zeros((1, 34), np.uint8))


def test_block_calls_check_layer_tokens_and_positions(engines):
    m = engines["qwen3moe"]
    core, H, n_ctx = m.backend.core, m.config.hidden, m.n_ctx
    x = np.zeros((4, H), np.float32)
    caches = [params(m, "attn", n, 0).cache_v for n in range(2)]
    snapshot = [c.copy() for c in caches if c is not None]
    for pos0 in (-1, n_ctx - 3, n_ctx, 1 << 40):
        with pytest.raises(ShapeError, match="pos0"):
            core.attention(0, x, pos0)
    for layer in (-1, m.config.n_layer, 1 << 30):
        with pytest.raises((ShapeError, OverflowError), match="layer|int"):
            core.attention(layer, x, 0)
        with pytest.raises((ShapeError, OverflowError), match="layer|int"):
            core.ffn(layer, x)
    with pytest.raises(ShapeError, match="tokens"):
        core.ffn(0, np.zeros((17, H), np.float32))          # ubatch is 16
    with pytest.raises(ShapeError, match="x must be"):
        core.ffn(0, np.zeros((4, H + 1), np.float32))
    with pytest.raises(ShapeError, match="logits"):
        core.head(x, np.zeros((4, m.config.n_vocab - 1), np.float32))
    with pytest.raises(ShapeError, match="logits"):
        core.head(x, np.zeros((3, m.config.n_vocab), np.float32))
    core.attention(0, x.copy(), n_ctx - 4)                 # the last positions that fit
    for c, s in zip([c for c in caches if c is not None], snapshot):
        assert np.array_equal(c[:n_ctx - 4], s[:n_ctx - 4])  # nothing written before pos0


def test_a_rebalanced_layer_that_needs_more_scratch_is_refused(engines):
    m = engines["qwen3moe"]
    layer = moe_layer(m)
    p = params(m, "ffn", 0, layer)
    # the same layer with every expert routed (n_used = n_expert) needs more scratch than was carved
    wide = bad(p, n_used=p.n_expert)
    with pytest.raises(ShapeError, match="scratch"):
        m.backend.core.set_ffn(0, layer, wide)


def test_errors_are_moe_numa_errors():
    assert issubclass(ShapeError, MoeNumaError)
