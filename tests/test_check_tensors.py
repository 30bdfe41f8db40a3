"""check_tensors=True (llama.cpp's --check-tensors): a block whose fp16 scale is
Inf or NaN, or an F32 value that is, is refused at load, naming the tensor and
the block, in the reference and in the engine (which checks each shard as it
copies it into node memory, so an expert tensor's bad block is found there)."""
import shutil

import numpy as np
import pytest
from gguf import GGUFReader

import moe_numa
from moe_numa import kernels as K
from moe_numa import quants
from moe_numa.errors import GGUFError


def corrupt(src, dst, name, row, block, value=b"\x00\x7c"):
    """Copy src to dst with the first fp16 scale of (row, block) of tensor `name` set to `value` (Inf)."""
    shutil.copy(src, dst)
    t = next(t for t in GGUFReader(src).tensors if t.name == name)
    tr = quants.traits(int(t.tensor_type))
    cols = int(t.shape[0])
    block = min(block, cols // tr.block - 1)
    rb = cols // tr.block * tr.type_size
    off = int(t.data_offset) + row * rb + block * tr.type_size + (tr.scale_offsets[0] if tr.scale_offsets else 0)
    with open(dst, "r+b") as f:
        f.seek(off)
        f.write(value)
    return cols // tr.block, block


@pytest.mark.parametrize("backend", ["reference", "engine"])
@pytest.mark.parametrize("qtype", ["q8_0", "iq4_xs"])
def test_bad_scale_is_named_with_its_block(make_model, tmp_path, backend, qtype):
    src = make_model("qwen3moe", qtype)
    name = "blk.1.ffn_down_exps.weight"          # merged experts: the engine copies them per expert
    dst = tmp_path / "bad.gguf"
    per_row, blk = corrupt(src, dst, name, row=70, block=1)
    opts = {"numa_nodes": 2} if backend == "engine" else {}
    with moe_numa.load(dst, backend=backend, **opts):
        pass                                         # unchecked: loads
    with pytest.raises(GGUFError, match=rf"{name}.*block {70 * per_row + blk} \(row 70, block {blk} of the row\)"):
        moe_numa.load(dst, backend=backend, check_tensors=True, **opts)


@pytest.mark.parametrize("backend", ["reference", "engine"])
def test_nan_in_a_float_tensor_is_named(make_model, tmp_path, backend):
    src = make_model("qwen3moe", "q8_0")
    dst = tmp_path / "nan.gguf"
    corrupt(src, dst, "blk.0.attn_norm.weight", row=0, block=5, value=np.float32("nan").tobytes())
    opts = {"numa_nodes": 1} if backend == "engine" else {}
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_norm\.weight.*block 5 "):
        moe_numa.load(dst, backend=backend, check_tensors=True, **opts)


def test_clean_file_passes_and_every_type_is_checked(make_model):
    with moe_numa.load(make_model("deepseek-v3", "q4_k_m"), backend="engine", numa_nodes=2,
                       check_tensors=True) as m:
        assert np.isfinite(m.logits([1, 2])).all()
    rng = np.random.default_rng(0)
    for t in K.SUPPORTED_TYPES:
        tr = quants.traits(t)
        w = K.random_blocks(t, 3, 4 * tr.block, rng)
        assert K.first_bad_block(w, t, 4 * tr.block) == -1, t.name
        bad = w.copy()
        if tr.block == 1:
            bad.view({4: np.float32, 2: np.uint16}[tr.type_size])[2, 3] = (
                np.float32("inf") if tr.type_size == 4 else 0x7F80 if t.name == "BF16" else 0x7C00)
        elif tr.scale_offsets:
            bad[2, 3 * tr.type_size + tr.scale_offsets[-1]:][:2] = (0x00, 0x7C)
        else:        # IQ1_M: d's bits 8-11 / 12-15 are the top nibbles of scale words 2 / 3
            sw = bad[2, 3 * tr.type_size + 48:3 * tr.type_size + 56].view(np.uint16)
            sw[2] |= 0xC000                          # exponent bits 10, 11
            sw[3] |= 0x7000                          # exponent bits 12-14: all ones -> Inf/NaN
        assert K.first_bad_block(bad, t, 4 * tr.block) == 2 * 4 + 3, t.name


def test_cli_check_tensors_flag(make_model, tmp_path):
    import subprocess
    import sys
    dst = tmp_path / "bad.gguf"
    corrupt(make_model("qwen3moe", "q8_0"), dst, "blk.0.attn_q.weight", row=3, block=0)
    out = subprocess.run([sys.executable, "-m", "moe_numa.cli", "generate", "-m", str(dst), "-p", "hi", "-n", "1",
                          "--backend", "reference", "--check-tensors"], capture_output=True, text=True)
    assert out.returncode != 0 and "blk.0.attn_q.weight" in out.stderr and "row 3" in out.stderr
