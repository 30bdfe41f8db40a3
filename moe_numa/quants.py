"""GGML tensor types: which ones we support, their block geometry, and
dequantization to float32 through `gguf.quants` (the reference path)."""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from .errors import UnsupportedError

Q = GGMLQuantizationType

# Types both the reference and the native kernels compute with.
SUPPORTED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K)

_BY_NAME = {t.name.lower(): t for t in SUPPORTED}


def is_supported(qtype: int) -> bool:
    return int(qtype) in {int(t) for t in SUPPORTED}


def supported_names() -> list[str]:
    return [t.name for t in SUPPORTED]


def qtype_from_name(name: str) -> GGMLQuantizationType:
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise UnsupportedError(f"unknown or unsupported quant type {name!r}; supported: "
                               f"{', '.join(sorted(_BY_NAME))}") from None


def block_size(qtype: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]
    except (KeyError, ValueError):
        raise UnsupportedError(f"unknown GGML type id {qtype}") from None


def row_bytes(qtype: int, cols: int) -> int:
    block, size = block_size(qtype)
    if cols % block:
        raise UnsupportedError(f"{GGMLQuantizationType(qtype).name} needs a multiple of {block} columns, got {cols}")
    return cols // block * size


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of raw GGML data (any leading shape) as an array of `shape`."""
    qtype = GGMLQuantizationType(int(qtype))
    if not is_supported(qtype):
        raise UnsupportedError(f"quant type {qtype.name} is not supported; supported: {', '.join(supported_names())}")
    if qtype == Q.F32:
        return np.asarray(raw).view(np.float32).reshape(shape).copy()
    if qtype == Q.F16:
        return np.asarray(raw).view(np.float16).reshape(shape).astype(np.float32)
    return gguf_quants.dequantize(np.asarray(raw), qtype).reshape(shape).astype(np.float32, copy=False)


def quantize(values: np.ndarray, qtype: int) -> np.ndarray:
    """Raw bytes (shape `(*rows, row_bytes)`) of float values in a type gguf.quants can write."""
    qtype = GGMLQuantizationType(int(qtype))
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F32:
        return values.view(np.uint8).reshape(*values.shape[:-1], values.shape[-1] * 4)
    if qtype == Q.F16:
        return values.astype(np.float16).view(np.uint8).reshape(*values.shape[:-1], values.shape[-1] * 2)
    return gguf_quants.quantize(values, qtype)


# -- activation quantization, as the native kernels (and llama.cpp) do it -----------------
_ACT_Q8_0 = {int(Q.Q8_0), int(Q.Q4_0)}
_ACT_Q8_K = {int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K), int(Q.Q2_K), int(Q.Q3_K)}


def simulate_act_quant(x: np.ndarray, wtype: int) -> np.ndarray:
    """The activations a kernel multiplies a `wtype` weight with, dequantized:
    Q8_0 blocks of 32 (fp16 scale) for Q8_0/Q4_0, Q8_K blocks of 256 for
    K-quants, unchanged floats for F32/F16/BF16."""
    wtype = int(wtype)
    if wtype not in _ACT_Q8_0 and wtype not in _ACT_Q8_K:
        return x
    x = np.ascontiguousarray(x, dtype=np.float32)
    size = 32 if wtype in _ACT_Q8_0 else 256
    b = x.reshape(-1, size)
    if wtype in _ACT_Q8_0:
        amax = np.abs(b).max(axis=1, keepdims=True)
        d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.rint(b * inv)
        return (q * d).reshape(x.shape).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)[:, None]            # first of equal maxima, as the C loop
    mx = np.take_along_axis(b, idx, axis=1)
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint(b * iscale), 127)
    return (q * d).reshape(x.shape).astype(np.float32)
