"""GGML tensor types: the one accessor of the native type table (`traits`:
block geometry, activation format, fp16 scale fields, kernels per SIMD level;
the table itself lives in cython_kernels/src/mn_types.c), the supported set
derived from it, dequantization to float32 through `gguf.quants` (the
reference path), and the kernels' activation rounding for the act-quant
reference (`simulate_act_quant`, `q8_1_sum_correction`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from . import _native
from .errors import UnsupportedError

Q = GGMLQuantizationType


@dataclass(frozen=True)
class TypeTraits:
    """One row of the type table."""
    qtype: GGMLQuantizationType
    name: str
    block: int                      # values per block (1 for plain types)
    type_size: int                  # bytes per block
    act: str | None                 # activation format of its dot product: 'float', 'q8_0', 'q8_k'
    scale_offsets: tuple[int, ...]  # byte offsets of the fp16 block scales (d, then dmin / m)
    kernels: dict                   # SIMD level -> level whose code runs it (this CPU); {}: no kernel

    @property
    def supported(self) -> bool:
        """The engine's kernels (and so the reference) compute with this type."""
        return bool(self.kernels)


_KNOWN = {int(t) for t in Q}     # ids this gguf release names (the C table may list newer ones)
_TABLE = {int(r["id"]): TypeTraits(Q(r["id"]), r["name"], r["block"], r["type_size"], r["act"],
                                   r["scale_offsets"], r["kernels"])
          for r in _native.type_table() if r["id"] in _KNOWN}

#: Types both the reference and the native kernels compute with, in id order.
SUPPORTED = tuple(t.qtype for t in _TABLE.values() if t.supported)

_BY_NAME = {t.name.lower(): t for t in SUPPORTED}


def traits(qtype) -> TypeTraits:
    """The type table's row for a GGML type (id, GGMLQuantizationType or name)."""
    if isinstance(qtype, str):
        try:
            qtype = Q[qtype.upper()]
        except KeyError:
            raise UnsupportedError(f"unknown GGML type {qtype!r}") from None
    try:
        return _TABLE[int(qtype)]
    except (KeyError, ValueError, TypeError):
        raise UnsupportedError(f"unknown GGML type id {qtype!r}") from None


#: Types the reference alone computes with: every other one gguf.quants dequantizes.
REFERENCE_TYPES = SUPPORTED + tuple(
    getattr(Q, n) for n in ("Q4_1", "Q5_0", "Q5_1", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                            "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4")
    if hasattr(Q, n) and getattr(Q, n) not in SUPPORTED and int(getattr(Q, n)) in _TABLE)


def is_supported(qtype, backend: str = "engine") -> bool:
    """Whether `backend` computes with the type: the engine where the table has kernels,
    the reference also for the other types gguf.quants dequantizes."""
    try:
        t = traits(qtype)
    except UnsupportedError:
        return False
    return t.supported or (backend == "reference" and t.qtype in REFERENCE_TYPES)


def is_supported(qtype: int, backend: str = "engine") -> bool:
    return int(qtype) in {int(t) for t in (REFERENCE_TYPES if backend == "reference" else SUPPORTED)}


def supported_names(backend: str = "engine") -> list[str]:
    return [t.name for t in (REFERENCE_TYPES if backend == "reference" else SUPPORTED)]


def qtype_from_name(name: str) -> GGMLQuantizationType:
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise UnsupportedError(f"unknown or unsupported quant type {name!r}; supported: "
                               f"{', '.join(sorted(_BY_NAME))}") from None


def block_size(qtype: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type."""
    t = traits(qtype)
    return t.block, t.type_size


def row_bytes(qtype: int, cols: int) -> int:
    block, size = block_size(qtype)
    if cols % block:
        raise UnsupportedError(f"{GGMLQuantizationType(qtype).name} needs a multiple of {block} columns, got {cols}")
    return cols // block * size


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of raw GGML data (any leading shape) as an array of `shape`."""
    qtype = GGMLQuantizationType(int(qtype))
    if not is_supported(qtype, "reference"):
        raise UnsupportedError(f"quant type {qtype.name} is not supported; supported: "
                               f"{', '.join(supported_names('reference'))}")
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
def simulate_act_quant(x: np.ndarray, wtype: int) -> np.ndarray:
    """The activations a kernel multiplies a `wtype` weight with, dequantized:
    Q8_0 blocks of 32 (fp16 scale), Q8_K blocks of 256, or unchanged floats, as
    the type table's activation format says."""
    act = traits(wtype).act
    if act not in ("q8_0", "q8_k"):
        return x
    x = np.ascontiguousarray(x, dtype=np.float32)
    size = 32 if act == "q8_0" else 256
    b = x.reshape(-1, size)
    if act == "q8_0":
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


# Weight types whose dot product has a min term: llama.cpp pairs them with Q8_1
# activations, whose block sum s = fp16(d * sum(q)) is rounded on its own.
MIN_TYPES = (Q.Q4_1, Q.Q5_1)


def q8_1_sum_correction(x: np.ndarray, raw: np.ndarray, wtype: int) -> np.ndarray | None:
    """What llama.cpp's Q8_1 activations add to `simulate_act_quant(x) @ W.T` for a
    Q4_1 / Q5_1 weight W (raw blocks, `[..., rows, row_bytes]`): per block the min m
    multiplies fp16(d * sum(q)) rather than fp16(d) * sum(q). `x` is `[T, cols]` for a
    2-D W, `[T, H, cols]` for a `[H, rows, row_bytes]` one. None for other types."""
    if int(wtype) not in MIN_TYPES:
        return None
    t = traits(wtype)
    raw = np.ascontiguousarray(raw)
    blocks = raw.reshape(*raw.shape[:-1], -1, t.type_size)
    off = t.scale_offsets[1]
    m = blocks[..., off:off + 2].copy().view(np.float16)[..., 0].astype(np.float32)   # [..., rows, nb]
    b = np.ascontiguousarray(x, dtype=np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(b).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    sq = np.rint(b * inv[..., None]).sum(axis=-1).astype(np.float32)
    delta = (d * sq).astype(np.float16).astype(np.float32) - d.astype(np.float16).astype(np.float32) * sq
    if raw.ndim == 2:
        return (delta.reshape(-1, delta.shape[-1]) @ m.T).reshape(*x.shape[:-1], m.shape[0])
    return np.einsum("hrb,thb->thr", m, delta)

