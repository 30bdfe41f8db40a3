"""GGUF loading: memory mapping, split files, metadata, and every bad input."""
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import moe_numa
from moe_numa.errors import GGUFError, UnsupportedError
from moe_numa.gguf_file import GGUFModelFile, check_supported_types
from moe_numa.testing import make_test_model

from gguf_edit import rewrite_gguf


def test_tensors_are_views_of_the_memory_map(make_model):
    g = GGUFModelFile(make_model("qwen3moe", "q8_0"))
    t = g.tensor("blk.0.ffn_up_exps.weight")
    assert isinstance(t.raw.base, np.memmap) or isinstance(t.raw, np.memmap) or t.raw.base is not None
    assert not t.raw.flags.owndata
    assert t.shape == (8, 256, 256) and t.qtype == Q.Q8_0
    assert t.raw.shape == (8, 256, 256 // 32 * 34)
    assert g.metadata["general.architecture"] == "qwen3moe"
    assert isinstance(g.metadata["tokenizer.ggml.tokens"], list)
    assert g.tensor_bytes <= g.file_bytes


def test_split_files_load_as_one_model(make_model, tmp_path):
    single = make_model("deepseek-v3", "q8_0")
    first = make_test_model(tmp_path / "ds.gguf", "deepseek-v3", "q8_0", split_max_tensors=15)
    assert "-00001-of-" in first.name
    parts = sorted(tmp_path.glob("ds-0000*-of-*.gguf"))
    assert len(parts) > 2
    a, b = GGUFModelFile(single), GGUFModelFile(first)
    assert len(b.paths) == len(parts)
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        assert np.array_equal(np.asarray(t.raw), np.asarray(b.tensors[name].raw)), name
    ids = [1, 5, 9, 200]
    la = moe_numa.load(single, backend="reference").logits(ids)
    lb = moe_numa.load(first, backend="reference").logits(ids)
    assert np.array_equal(la, lb)


def test_missing_split_part_is_named(tmp_path):
    first = make_test_model(tmp_path / "m.gguf", "qwen3moe", "q8_0", split_max_tensors=10)
    parts = sorted(tmp_path.glob("m-*.gguf"))
    os.remove(parts[1])
    with pytest.raises(GGUFError, match=parts[1].name):
        GGUFModelFile(first)


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFModelFile(p)


@pytest.mark.parametrize("keep", [10, 300, 0.5, 0.999])
def test_truncated_file(make_model, tmp_path, keep):
    src = make_model("qwen2moe", "q8_0").read_bytes()
    n = int(len(src) * keep) if isinstance(keep, float) else keep
    p = tmp_path / "t.gguf"
    p.write_bytes(src[:n])
    with pytest.raises(GGUFError, match="truncated|too short"):
        moe_numa.load(p, backend="reference")


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        GGUFModelFile("/nonexistent/model.gguf")


def test_unsupported_architecture(make_model, tmp_path):
    dst = rewrite_gguf(make_model("qwen3moe"), tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(UnsupportedError, match="'llama'"):
        moe_numa.load(dst, backend="reference")


def test_unsupported_quant_type_is_named(make_model, tmp_path):
    """Q8_K (an activation type, which gguf.quants cannot dequantize) as a weight: refused by both backends."""
    raw = np.zeros((128, 256 // 256 * 292), dtype=np.uint8)
    dst = rewrite_gguf(make_model("qwen3moe"), tmp_path / "q8k.gguf",
                       replace_tensors={"blk.1.attn_k.weight": (raw, Q.Q8_K)})
    for backend in ("reference", "engine"):
        with pytest.raises(UnsupportedError, match=r"blk\.1\.attn_k\.weight \(Q8_K\)"):
            moe_numa.load(dst, backend=backend)


def test_reference_runs_every_gguf_quants_type(make_model, tmp_path):
    """The reference dequantizes a type the engine has no kernel for (TQ1_0) through gguf.quants;
    the engine refuses it at load, the tensor named."""
    from gguf import quants
    from moe_numa import kernels
    src = make_model("qwen3moe")
    w = GGUFModelFile(src).tensor("blk.1.attn_k.weight").dequantize()
    raw = quants.quantize(w, Q.TQ1_0)
    dst = rewrite_gguf(src, tmp_path / "tq1.gguf", replace_tensors={"blk.1.attn_k.weight": (raw, Q.TQ1_0)})
    m = moe_numa.load(dst, backend="reference")
    assert m.weights.layers[1].attn.wk.qtype == Q.TQ1_0
    np.testing.assert_array_equal(m.weights.layers[1].attn.wk.dequantize(), quants.dequantize(raw, Q.TQ1_0))
    assert np.isfinite(m.logits([1, 2, 3])).all()
    if not kernels.is_supported("TQ1_0"):
        with pytest.raises(UnsupportedError, match=r"blk\.1\.attn_k\.weight \(TQ1_0\)"):
            moe_numa.load(dst, backend="engine")


def test_mixed_legacy_type_loads(make_model, tmp_path):
    """One Q4_1 tensor in an F32 file (a per-tensor mix, as llama-quantize writes)
    loads and runs, in the reference and in the engine alike."""
    from gguf import quants
    rng = np.random.default_rng(0)
    raw = quants.quantize(rng.standard_normal((128, 256)).astype(np.float32) * 0.05, Q.Q4_1)
    dst = rewrite_gguf(make_model("qwen3moe"), tmp_path / "q41.gguf",
                       replace_tensors={"blk.1.attn_k.weight": (raw, Q.Q4_1)})
    want = moe_numa.load(dst, backend="reference", act_quant=True).logits([1, 2, 3])
    with moe_numa.load(dst, backend="engine", numa_nodes=1) as eng:
        got = eng.logits([1, 2, 3])
    assert np.isfinite(want).all()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_unknown_type_id(make_model, tmp_path):
    data = bytearray(make_model("qwen3moe").read_bytes())
    name = b"blk.0.attn_q.weight"
    pos = data.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    struct.pack_into("<I", data, pos + 4 + 8 * n_dims, 99)
    p = tmp_path / "badtype.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(UnsupportedError, match="unknown GGML type"):
        moe_numa.load(p, backend="reference")


def test_missing_metadata_key_is_named(make_model, tmp_path):
    dst = rewrite_gguf(make_model("qwen3moe"), tmp_path / "nokey.gguf", drop_keys=("qwen3moe.expert_count",))
    with pytest.raises(GGUFError, match="qwen3moe.expert_count"):
        moe_numa.load(dst, backend="reference")


def test_wrong_metadata_type_is_named(make_model, tmp_path):
    dst = rewrite_gguf(make_model("qwen3moe"), tmp_path / "badkey.gguf",
                       set_keys={"qwen3moe.block_count": ("two", V.STRING)})
    with pytest.raises(GGUFError, match="qwen3moe.block_count"):
        moe_numa.load(dst, backend="reference")


def test_tensor_shape_mismatch_is_named(make_model, tmp_path):
    dst = rewrite_gguf(make_model("qwen2moe"), tmp_path / "shape.gguf",
                       set_keys={"qwen2moe.expert_feed_forward_length": (512, V.UINT32)})
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        moe_numa.load(dst, backend="reference")


def test_missing_tensor_is_named(make_model, tmp_path):
    dst = rewrite_gguf(make_model("deepseek-v3"), tmp_path / "missing.gguf", drop_tensors=("blk.2.attn_k_b.weight",))
    with pytest.raises(GGUFError, match=r"blk\.2\.attn_k_b\.weight"):
        moe_numa.load(dst, backend="reference")


def test_unknown_tensor_is_rejected(make_model, tmp_path):
    dst = rewrite_gguf(make_model("qwen3moe"), tmp_path / "extra.gguf",
                       add_tensors={"blk.0.ffn_gate_up_exps.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(UnsupportedError, match="ffn_gate_up_exps"):
        moe_numa.load(dst, backend="reference")


def test_unsupported_gating_function(make_model, tmp_path):
    dst = rewrite_gguf(make_model("deepseek-v3"), tmp_path / "gating.gguf",
                       set_keys={"deepseek2.expert_gating_func": (3, V.UINT32)})
    with pytest.raises(UnsupportedError, match="expert_gating_func"):
        moe_numa.load(dst, backend="reference")


def test_check_supported_types_lists_types(make_model):
    g = GGUFModelFile(make_model("qwen3moe", "q4_k_m"))
    check_supported_types(g)  # Q4_K/Q6_K/Q8_0/F32 are all supported
    assert {t.qtype for t in g} >= {Q.Q4_K, Q.Q6_K, Q.F32}


def _string_array(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<Q", len(s)) + s for s in items)


@pytest.mark.parametrize("items", [[], [b""], ["a".encode(), "Ġé".encode(), b"", "\u4e2d\u6587".encode()] * 50])
def test_native_string_array_scan_matches_python(items):
    from moe_numa import _native
    blob = b"xyz" + _string_array(items) + b"tail"
    data = np.frombuffer(blob, dtype=np.uint8)
    starts, lengths, end = _native.gguf_string_spans(data, 3, len(items))
    assert end == len(blob) - 4
    assert _native.gguf_decode_strings(data, starts, lengths) == [s.decode() for s in items]
    # every cut inside the array is a truncation, named by item
    for cut in range(3, end, 7):
        with pytest.raises(ValueError, match="past the end|cannot fit"):
            _native.gguf_string_spans(data[:cut].copy(), 3, len(items))
    with pytest.raises(ValueError, match="cannot fit"):
        _native.gguf_string_spans(data, 3, 2 ** 62)          # a count no file can hold


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=12).map(str.encode), st.binary(max_size=12)), max_size=40))
def test_native_string_decode_is_pythons_for_any_bytes(items):
    """ASCII items take a copy, the rest UTF-8's decoder: either way Python's str, or Python's
    refusal naming the first bad item."""
    from moe_numa import _native
    data = np.frombuffer(b"\0" + _string_array(items), dtype=np.uint8)
    starts, lengths, _ = _native.gguf_string_spans(data, 1, len(items))
    expected, bad = [], None
    for i, b in enumerate(items):
        try:
            expected.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            bad = i
            break
    if bad is None:
        got = _native.gguf_decode_strings(data, starts, lengths)
        assert got == expected and all(type(x) is str for x in got)
    else:
        with pytest.raises(ValueError, match=f"item {bad} is not valid UTF-8"):
            _native.gguf_decode_strings(data, starts, lengths)


def test_data_address_is_numpys_and_refuses_what_is_not_an_array():
    from moe_numa import _native
    a = np.arange(64, dtype=np.uint8)
    for v in (a, a[5:], a[3:40].view(np.uint8), a.reshape(8, 8)[2:, 3:]):
        assert _native.data_address(v) == v.__array_interface__["data"][0]
    with pytest.raises(TypeError, match="data_address: expected an ndarray, got bytes"):
        _native.data_address(b"abc")


def test_string_array_with_bad_utf8_names_key_and_item(make_model, tmp_path):
    from moe_numa import _native
    data = np.frombuffer(_string_array([b"ok", b"\xff\xfe", b"x"]), dtype=np.uint8)
    starts, lengths, _ = _native.gguf_string_spans(data, 0, 3)
    with pytest.raises(ValueError, match="item 1 is not valid UTF-8"):
        _native.gguf_decode_strings(data, starts, lengths)
    src = make_model("qwen3moe", "q8_0")
    path = tmp_path / "bad_utf8.gguf"
    raw = bytearray(open(src, "rb").read())
    i = raw.find(struct.pack("<Q", 1) + b"!")         # the vocabulary's token "!"
    assert i > 0
    raw[i + 8] = 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.tokens.*item \d+ is not valid UTF-8"):
        GGUFModelFile(path)
