"""Writers of K-quant blocks for the models we generate (gguf.quants can read
K-quants but not write them).

Q4_K and Q6_K come from a simple round-to-nearest quantizer of real float
weights (min/max per sub-block, not llama.cpp's search), so a Q4_K model stays
close to the F32 model of the same seed. Q5_K, Q3_K and Q2_K are written as
valid random blocks whose magnitude matches the weights'.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from .. import quants

QK = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x: [..., n*256] float -> uint8 [..., n*144]."""
    lead = x.shape[:-1]
    b = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(b.min(axis=-1), 0.0)
    hi = b.max(axis=-1)
    scale = (hi - lo) / 15.0
    mins = -lo
    d = _f16(scale.max(axis=-1) / 63.0)
    dmin = _f16(mins.max(axis=-1) / 63.0)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin32[:, None] > 0, np.rint(mins / dmin32[:, None]), 0).clip(0, 63).astype(np.uint8)
        step = d32[:, None] * sc
        offset = dmin32[:, None] * mn
        q = np.where(step[..., None] > 0, np.rint((b + offset[..., None]) / step[..., None]), 0)
    q = q.clip(0, 15).astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)
    scales = np.empty((b.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return out.reshape(*lead, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x: [..., n*256] float -> uint8 [..., n*210]."""
    lead = x.shape[:-1]
    b = x.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(b).max(axis=-1) / 31.5
    d = _f16(scale.max(axis=-1) / 127.0)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(-128, 127).astype(np.int8)
        step = d32[:, None] * sc.astype(np.float32)
        q = np.where(step[..., None] > 0, np.rint(b / step[..., None]), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)   # [blk, half, quarter, l]
    v0, v1, v2, v3 = q[:, :, 0], q[:, :, 1], q[:, :, 2], q[:, :, 3]
    ql = np.concatenate([(v0 & 0xF) | ((v2 & 0xF) << 4), (v1 & 0xF) | ((v3 & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = ((v0 >> 4) | ((v1 >> 4) << 2) | ((v2 >> 4) << 4) | ((v3 >> 4) << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(*lead, -1)


# types gguf.quants cannot write, written as random blocks (their layouts come
# from the type table; IQ1_M, whose scale has no field of its own, is left out)
_RANDOM = (Q.Q5_K, Q.Q3_K, Q.Q2_K, Q.IQ4_NL, Q.IQ4_XS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S)


def random_blocks(qtype: Q, shape: tuple[int, ...], target_std: float, rng: np.random.Generator) -> np.ndarray:
    """Valid random blocks of a K-quant or IQ type whose values have about `target_std`."""
    tr = quants.traits(qtype)
    nbytes, d_offsets = tr.type_size, tr.scale_offsets
    n_blocks = int(np.prod(shape)) // tr.block
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for off in d_offsets:
        d = _f16(rng.uniform(0.5, 1.0, size=n_blocks))
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    values = gguf_quants.dequantize(raw[: min(n_blocks, 64)], qtype)
    std = float(values.std()) or 1.0
    for off in d_offsets:
        d = raw[:, off:off + 2].copy().view(np.float16).astype(np.float32) * (target_std / std)
        raw[:, off:off + 2] = _f16(d).view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], shape[-1] // tr.block * nbytes)


def encode(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes of `values` (float32, any shape) in `qtype`."""
    if qtype == Q.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype == Q.Q4_K:
        return quantize_q4_k(values)
    if qtype == Q.Q6_K:
        return quantize_q6_k(values)
    if qtype in _RANDOM:
        return random_blocks(qtype, values.shape, float(values.std()), rng)
    return gguf_quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)
