"""Sampling: determinism under a seed, and what each filter does."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from moe_numa.sampling import Sampler, SamplingParams, apply_penalties, candidate_probs, top_order

LOGITS = np.random.default_rng(0).standard_normal(500).astype(np.float32) * 3


@given(seed=st.integers(0, 2**32 - 1), temp=st.floats(0.1, 2.0), top_k=st.integers(0, 50),
       top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.5))
def test_same_seed_same_tokens(seed, temp, top_k, top_p, min_p):
    p = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    a, b = Sampler(p), Sampler(p)
    assert [a(LOGITS) for _ in range(20)] == [b(LOGITS) for _ in range(20)]


def test_different_seeds_differ():
    p = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    runs = {tuple(Sampler(SamplingParams(seed=s, **p))(LOGITS) for _ in range(10)) for s in range(5)}
    assert len(runs) > 1


def test_greedy_and_degenerate_filters_pick_argmax():
    best = int(np.argmax(LOGITS))
    assert Sampler(SamplingParams(temperature=0))(LOGITS) == best
    for p in (SamplingParams(top_k=1, seed=1), SamplingParams(top_p=1e-9, seed=1), SamplingParams(min_p=1.0, seed=1)):
        assert {Sampler(p)(LOGITS) for _ in range(20)} == {best}


def test_filters_restrict_candidates():
    ids, probs = candidate_probs(LOGITS, SamplingParams(top_k=7, top_p=1.0, min_p=0.0, temperature=1.0))
    assert len(ids) == 7 and set(ids) == set(np.argsort(-LOGITS)[:7])
    assert probs.sum() == pytest.approx(1.0)
    ids, probs = candidate_probs(LOGITS, SamplingParams(top_k=0, top_p=0.5, min_p=0.0, temperature=1.0))
    full = np.exp(LOGITS - LOGITS.max()); full /= full.sum()
    assert np.sort(full)[::-1][:len(ids) - 1].sum() < 0.5 <= np.sort(full)[::-1][:len(ids)].sum()
    ids, _ = candidate_probs(LOGITS, SamplingParams(top_k=0, top_p=1.0, min_p=0.2, temperature=1.0))
    assert all(full[i] >= 0.2 * full.max() for i in ids)


def test_temperature_sharpens():
    cold = candidate_probs(LOGITS, SamplingParams(top_k=0, top_p=1.0, min_p=0.0, temperature=0.3))[1]
    hot = candidate_probs(LOGITS, SamplingParams(top_k=0, top_p=1.0, min_p=0.0, temperature=2.0))[1]
    assert cold.max() > hot.max()


def test_repetition_penalty():
    logits = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = apply_penalties(logits, [0, 1], SamplingParams(repeat_penalty=2.0))
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])
    out = apply_penalties(logits, [0, 0, 2], SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    np.testing.assert_allclose(out, [2.0 - 1.0 - 0.25, -2.0, 1.0 - 0.5 - 0.25])
    # only the last repeat_last_n tokens count
    out = apply_penalties(logits, [0, 2, 2], SamplingParams(repeat_penalty=2.0, repeat_last_n=2))
    np.testing.assert_allclose(out, [2.0, -2.0, 0.5])


def test_bad_params():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(min_p=2)


@given(k=st.integers(0, 80), n=st.integers(1, 300), levels=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_top_order_is_the_stable_sort_prefix(k, n, levels, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, size=n).astype(np.float32)   # few distinct values: many ties
    if n > 3:
        x[rng.integers(0, n)] = -np.inf
    full = np.argsort(-x, kind="stable")
    assert np.array_equal(top_order(x, k), full[:k] if k > 0 else full)
