"""De-consolidated expert views, and numpy dequantization round trips."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from hypothesis import given, strategies as st

from moe_numa import quants
from moe_numa.gguf_file import GGUFModelFile
from moe_numa.models import load_model
from moe_numa.testing import kquants


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("preset", ["qwen3moe", "deepseek-v3"])
def test_expert_views_are_zero_copy_slices(make_model, preset, qtype):
    g = GGUFModelFile(make_model(preset, qtype))
    _, cfg, w = load_model(g)
    layer = next(l for i, l in enumerate(w.layers) if cfg.is_moe_layer(i))
    merged = {name: getattr(layer.ffn, f"{name}_exps") for name in ("gate", "up", "down")}
    full = {name: t.dequantize() for name, t in merged.items()}
    for e in range(cfg.n_expert):
        ex = layer.ffn.expert(e)
        for name in ("gate", "up", "down"):
            view = getattr(ex, name)
            assert np.shares_memory(view.raw, merged[name].raw)
            assert view.raw.ctypes.data == merged[name].raw[e].ctypes.data
            np.testing.assert_array_equal(view.dequantize(), full[name][e])
    with pytest.raises(IndexError):
        merged["gate"][cfg.n_expert]


FLOAT_TYPES = [Q.F32, Q.F16, Q.BF16]


@given(rows=st.integers(1, 6), blocks=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       qtype=st.sampled_from([Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q6_K]))
def test_dequant_round_trip(rows, blocks, seed, qtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 256 * blocks)).astype(np.float32)
    raw = kquants.encode(x, qtype, rng)
    raw_u8 = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    assert raw_u8.shape[1] == quants.row_bytes(qtype, x.shape[1])
    y = quants.dequantize(raw_u8, qtype, x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    # Relative RMS error bound per type: exact for F32, else the format's resolution.
    bound = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_K: 0.15, Q.Q6_K: 0.04}[qtype]
    rel = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2))
    assert rel <= bound
    # Our K-quant writer agrees with gguf's reader block by block: re-encoding the
    # dequantized values reproduces them (a fixed point up to rounding).
    if qtype in (Q.Q8_0, Q.Q4_0):
        np.testing.assert_array_equal(gguf_quants.quantize(y, qtype), raw_u8)


def test_random_k_blocks_are_valid():
    rng = np.random.default_rng(1)
    for qtype in (Q.Q5_K, Q.Q3_K, Q.Q2_K):
        raw = kquants.random_blocks(qtype, (3, 512), 0.25, rng)
        y = quants.dequantize(raw, qtype, (3, 512))
        assert np.isfinite(y).all() and 0.15 < y.std() < 0.4


def test_unsupported_quant_name():
    from moe_numa.errors import UnsupportedError
    with pytest.raises(UnsupportedError, match="q8_k"):
        quants.qtype_from_name("q8_k")
