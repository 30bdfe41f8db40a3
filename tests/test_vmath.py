"""The vector exp (mn_vmath.c) behind SiLU and flash attention's softmax, at
every SIMD level the CPU has, against float64 numpy."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_numa import kernels as K
from moe_numa.errors import ShapeError

LEVELS = K.SIMD_LEVELS[:K.SIMD_LEVELS.index(K.simd_level_cpu()) + 1]
F32_EPS = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("level", LEVELS)
def test_exp_is_within_two_ulps_over_the_float_range(level):
    x = np.linspace(-87.0, 88.0, 400_003, dtype=np.float32)
    with K.simd(level):
        y, s = K.exp_sum(x)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(y - ref) / ref) < 2 * F32_EPS
    scores = x[x <= 0]                            # softmax: scores minus their max
    with K.simd(level):
        _, s = K.exp_sum(scores)
    assert s == pytest.approx(np.exp(scores.astype(np.float64)).sum(), rel=1e-5)


@pytest.mark.parametrize("level", LEVELS)
def test_exp_edges(level):
    x = np.array([-np.inf, -1e30, -87.5, -0.0, 0.0, 1e-30, np.nan], np.float32)
    with K.simd(level):
        y, _ = K.exp_sum(x)
    assert list(y[:3]) == [0.0, 0.0, 0.0]        # below -87: 0, as softmax wants exp(-inf)
    assert list(y[3:6]) == [1.0, 1.0, 1.0]
    assert np.isnan(y[6])


@settings(max_examples=60, deadline=None)
@given(level=st.sampled_from(LEVELS), n=st.integers(0, 70), at=st.integers(0, 69),
       v=st.floats(-90, 90, width=32), shift=st.floats(-5, 5, width=32))
def test_a_value_gives_the_same_result_at_any_position(level, n, at, v, shift):
    """The tail runs the vector code too, so a split expert's slice (other lengths,
    other offsets) gets the very bits the whole expert gets."""
    rng = np.random.default_rng(n)
    x = rng.uniform(-20, 20, n + 1).astype(np.float32)
    x[at % (n + 1)] = v
    with K.simd(level):
        y, s = K.exp_sum(x, shift)
        one, _ = K.exp_sum(np.array([v], np.float32), shift)
        g = K.silu_mul(x, np.full_like(x, 2.0))
        g1 = K.silu_mul(np.array([v], np.float32), np.array([2.0], np.float32))
    assert y[at % (n + 1)] == one[0]
    assert g[at % (n + 1)] == g1[0]
    assert s == pytest.approx(float(np.sum(y, dtype=np.float64)), rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("level", LEVELS)
def test_silu_mul_matches_float64(level):
    rng = np.random.default_rng(1)
    g = np.concatenate([np.linspace(-100, 100, 20_001), rng.standard_normal(999) * 8]).astype(np.float32)
    u = rng.uniform(-3, 3, g.size).astype(np.float32)
    with K.simd(level):
        y = K.silu_mul(g, u)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64)) * u64
    # below g = -88 the exp is held at exp(88): silu is then ~1e-36 instead of ~1e-41
    assert np.all(np.abs(y - ref) <= 4 * F32_EPS * np.abs(ref) + 1e-35)


def test_shape_errors_name_the_problem():
    with pytest.raises(ShapeError, match="g has shape"):
        K.silu_mul(np.zeros(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ShapeError, match="1-D"):
        K.exp_sum(np.zeros((2, 2), np.float32))


@settings(max_examples=80, deadline=None)
@given(level=st.sampled_from(LEVELS), n=st.integers(0, 70),
       vals=st.lists(st.floats(-1e9, 1e9, width=32) | st.just(float("nan")) | st.just(float("-inf")),
                     min_size=70, max_size=70),
       init=st.floats(-1e9, 1e9, width=32) | st.just(float("-inf")))
def test_max_of_is_the_scalar_loops_maximum(level, n, vals, init):
    """The softmax's running max at every level and length (the vector body and its tail):
    equal to what "if (x > m) m = x" gives, NaNs passed over."""
    x = np.array(vals[:n], np.float32)
    want = np.float32(init)
    for v in x:
        if v > want:
            want = v
    with K.simd(level):
        got = K.max_of(x, init)
    assert got == want            # (a zero's sign may differ: equal as floats, and as a softmax shift)
