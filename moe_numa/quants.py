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
