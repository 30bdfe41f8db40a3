"""The native type table (mn_types.c) through its one accessor, quants.traits:
its geometry agrees with gguf's independent GGML_QUANT_SIZES for every type it
lists, every kernel type has a kernel at every SIMD level of this CPU, and the
kernel entry points report bad arguments instead of returning silently."""
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from moe_numa import _native, quants
from moe_numa import kernels as K
from moe_numa.errors import ShapeError, UnsupportedError

LEVELS = K.SIMD_LEVELS[:K.SIMD_LEVELS.index(K.simd_level_cpu()) + 1]


def test_table_geometry_matches_gguf_for_every_ggml_type():
    listed = {r["id"] for r in _native.type_table()}
    for t in Q:
        assert int(t) in listed, f"{t.name} missing from the type table"
        tr = quants.traits(t)
        assert tr.name == t.name
        assert (tr.block, tr.type_size) == GGML_QUANT_SIZES[t], t.name
        assert quants.block_size(t) == GGML_QUANT_SIZES[t]


def test_supported_types_have_a_kernel_at_every_level_and_an_activation_format():
    assert Q.Q8_0 in quants.SUPPORTED and Q.Q4_K in quants.SUPPORTED
    for t in quants.SUPPORTED:
        tr = quants.traits(t)
        assert set(tr.kernels) == set(LEVELS), t.name
        for level, impl in tr.kernels.items():
            assert LEVELS.index(impl) <= LEVELS.index(level)
        assert tr.act in ("float", "q8_0", "q8_k")
        assert (tr.act == "float") == (tr.block == 1)
        assert K.block_size(t) == tr.block
        assert K.row_bytes(t, 4 * tr.block) == 4 * tr.type_size
    assert quants.supported_names() == [t.name for t in K.SUPPORTED_TYPES]


def test_scale_offsets_point_at_fp16_scales():
    """Writing a scale at each listed offset changes the dequantized block by exactly that factor."""
    rng = np.random.default_rng(0)
    for t in quants.SUPPORTED:
        tr = quants.traits(t)
        if not tr.scale_offsets:
            continue
        w = K.random_blocks(t, 1, tr.block, rng)
        base = quants.dequantize(w, t, (tr.block,))
        off = tr.scale_offsets[0]
        doubled = w.copy()
        d = doubled[0, off:off + 2].view(np.float16)
        doubled[0, off:off + 2] = (d * 2).astype(np.float16).view(np.uint8)
        y = quants.dequantize(doubled, t, (tr.block,))
        if len(tr.scale_offsets) == 1:     # no min term: the whole block scales with d
            np.testing.assert_allclose(y, 2 * base, rtol=1e-6, err_msg=t.name)
        else:
            assert not np.allclose(y, base), t.name


def test_unknown_and_unsupported_types_are_refused():
    with pytest.raises(UnsupportedError, match="999"):
        quants.traits(999)
    with pytest.raises(UnsupportedError):
        quants.traits("q9_k")
    assert not quants.is_supported(Q.Q8_K)          # an activation format, never a weight here
    assert not quants.is_supported(999)


def test_native_entry_points_return_error_codes():
    """Called past the Python checks, the C entry points refuse instead of
    returning silently: bad type, bad column count, negative token count."""
    rng = np.random.default_rng(1)
    w = K.random_blocks("q8_0", 4, 64, rng)
    x = rng.standard_normal(64).astype(np.float32)
    out = np.full(4, 7.0, np.float32)
    xq = np.zeros(4096, np.uint8)
    addr = lambda a: a.__array_interface__["data"][0]   # noqa: E731
    args = (addr(w), w.strides[0], 4)
    assert _native.matmul_ptr(int(Q.Q8_0), *args, 64, addr(x), 64, 1, addr(xq), 128, addr(out), 4) == 0
    assert _native.matmul_ptr(int(Q.Q8_K), *args, 64, addr(x), 64, 1, addr(xq), 128, addr(out), 4) == -1
    assert _native.matmul_ptr(999, *args, 64, addr(x), 64, 1, addr(xq), 128, addr(out), 4) == -1
    out[:] = 7
    assert _native.matmul_ptr(int(Q.Q8_0), *args, 48, addr(x), 48, 1, addr(xq), 128, addr(out), 4,
                              None, True) == -2
    assert np.all(out == 7)                       # nothing half-done
    assert _native.matmul_ptr(int(Q.Q8_0), *args, 64, addr(x), 64, -1, addr(xq), 128, addr(out), 4,
                              None, True) == -3
    assert _native.quantize_act_ptr(int(Q.Q8_0), addr(x), 64, addr(xq), 128, 40, 1) == -2
    assert _native.quantize_act_ptr(int(Q.Q8_K), addr(x), 64, addr(xq), 128, 64, 1) == -1
    with pytest.raises(ShapeError, match="multiple"):
        K._raise_c_error(-2, "matmul")
    with pytest.raises(UnsupportedError, match="no kernel"):
        K._raise_c_error(-1, "matmul")
