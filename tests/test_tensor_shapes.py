"""Tensor shapes as ggml sees them: degenerate dims (`[n]` vs `[1, n]` in numpy order,
i.e. ggml's trailing 1s) are the same tensor; a real mismatch is refused with the
tensor and both shapes named."""
import numpy as np
import pytest

import moe_numa
from moe_numa.errors import GGUFError
from moe_numa.models.base import same_ggml_shape

from gguf_edit import rewrite_gguf


def test_same_ggml_shape():
    assert same_ggml_shape((1, 64), (64,))
    assert same_ggml_shape((1, 1, 64), (64,))
    assert same_ggml_shape((1, 8, 64), (8, 64))
    assert same_ggml_shape((1,), (1, 1))
    assert not same_ggml_shape((64, 1), (64,))       # ggml ne (1, 64): another tensor
    assert not same_ggml_shape((8, 1, 64), (8, 64))
    assert not same_ggml_shape((2, 64), (64,))


def _tensor(path, name):
    from moe_numa.gguf_file import GGUFModelFile
    return GGUFModelFile(path).tensor(name).dequantize()


def test_qwen2moe_2d_shared_expert_gate_loads_and_runs(make_model, tmp_path):
    """The converter writes `ffn_gate_inp_shexp.weight` as ggml [n_embd, 1] (numpy (1, n_embd))."""
    src = make_model("qwen2moe")
    names = [f"blk.{i}.ffn_gate_inp_shexp.weight" for i in range(2)]
    arrs = {n: _tensor(src, n)[None, :] for n in names}
    dst = rewrite_gguf(src, tmp_path / "shexp2d.gguf", drop_tensors=names, add_tensors=arrs)
    from moe_numa.gguf_file import GGUFModelFile
    assert GGUFModelFile(dst).tensor(names[0]).shape == (1, arrs[names[0]].shape[1])
    ids = [1, 5, 9, 200, 3]
    want = moe_numa.load(src, backend="reference").logits(ids)
    ref = moe_numa.load(dst, backend="reference")
    assert ref.weights.layers[0].ffn.shared_gate.shape == (arrs[names[0]].shape[1],)
    np.testing.assert_array_equal(ref.logits(ids), want)
    # an F32 KV cache, as the reference's: an F16 one turns summation-order noise into rounding flips
    with moe_numa.load(dst, backend="engine", numa_nodes=2, cache_type_k="f32", cache_type_v="f32") as eng:
        np.testing.assert_allclose(eng.logits(ids), want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_trailing_ones_on_a_norm_are_accepted(make_model, tmp_path):
    src = make_model("qwen3moe")
    name = "blk.1.attn_norm.weight"
    dst = rewrite_gguf(src, tmp_path / "norm3d.gguf", drop_tensors=[name],
                       add_tensors={name: _tensor(src, name)[None, None, :]})
    ids = [4, 2, 7]
    np.testing.assert_array_equal(moe_numa.load(dst, backend="reference").logits(ids),
                                  moe_numa.load(src, backend="reference").logits(ids))


def test_transposed_degenerate_shape_is_refused_with_both_shapes(make_model, tmp_path):
    """numpy (n_embd, 1) is ggml [1, n_embd]: ggml refuses it too."""
    src = make_model("qwen2moe")
    name = "blk.0.ffn_gate_inp_shexp.weight"
    v = _tensor(src, name)
    dst = rewrite_gguf(src, tmp_path / "shexp_t.gguf", drop_tensors=[name], add_tensors={name: v[:, None]})
    with pytest.raises(GGUFError, match=rf"blk\.0\.ffn_gate_inp_shexp\.weight.*\({v.size}, 1\).*\({v.size},\)"):
        moe_numa.load(dst, backend="reference")
