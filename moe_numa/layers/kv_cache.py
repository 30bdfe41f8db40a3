"""Per-layer KV caches: keys/values per KV head for GQA, and the compressed
latent plus the shared rotary key for MLA. Positions continue across calls.

The cache types (llama.cpp's `-ctk` / `-ctv`: f32, f16, q8_0) are modelled by
rounding what the attention stores (`LayerCache.round_k` / `round_v`) exactly as
ggml's copy into an F16 or Q8_0 cache does, so the engine, which stores the
rounded form, still matches this reference tightly."""
from __future__ import annotations

import numpy as np

from ..errors import ArgumentError, ContextOverflowError

CACHE_TYPES = ("f32", "f16", "q8_0")


def cache_type(t: str | None) -> str:
    """A KV-cache type name checked (None: f32, the reference's exact default)."""
    name = "f32" if t is None else str(t).lower()
    if name not in CACHE_TYPES:
        raise ArgumentError(f"KV-cache type {t!r} unknown: choose from {', '.join(CACHE_TYPES)}")
    return name


def kv_round(x: np.ndarray, t: str) -> np.ndarray:
    """x (float32, last axis the stored row) as a cache of type t holds it: fp16
    round-to-nearest-even, or Q8_0 per 32 values as ggml's CPU quantize_row_q8_0
    (d = amax / 127 stored as fp16, q = round-half-even(x * 127 / amax))."""
    x = np.asarray(x, dtype=np.float32)
    if t == "f32":
        return x
    if t == "f16":
        return x.astype(np.float16).astype(np.float32)
    if x.shape[-1] % 32:
        raise ArgumentError(f"a q8_0 KV cache needs rows of a multiple of 32 values, got {x.shape[-1]}")
    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (q * d).astype(np.float32).reshape(x.shape)


class LayerCache:
    """Named float32 arrays of shape [n_ctx, ...], filled up to the model's n_past."""

    def __init__(self, n_ctx: int, type_k: str = "f32", type_v: str = "f32", **shapes: tuple[int, ...]):
        self.type_k, self.type_v = cache_type(type_k), cache_type(type_v)
        self.arrays = {name: np.zeros((n_ctx, *shape), dtype=np.float32) for name, shape in shapes.items()}

    def round_k(self, x: np.ndarray) -> np.ndarray:
        return kv_round(x, self.type_k)

    def round_v(self, x: np.ndarray) -> np.ndarray:
        return kv_round(x, self.type_v)

    def store(self, start: int, **values: np.ndarray) -> None:
        for name, v in values.items():
            self.arrays[name][start:start + len(v)] = v

    def view(self, name: str, end: int) -> np.ndarray:
        return self.arrays[name][:end]


class KVCache:
    """The cache of one sequence: one LayerCache per layer plus the fill level."""

    def __init__(self, n_ctx: int, layer_shapes: list[dict[str, tuple[int, ...]]], type_k: str = "f32",
                 type_v: str = "f32"):
        self.n_ctx = n_ctx
        self.n_past = 0
        self.layers = [LayerCache(n_ctx, type_k, type_v, **shapes) for shapes in layer_shapes]

    def positions(self, n_new: int) -> np.ndarray:
        """Positions of n_new tokens appended now; raises if they do not fit."""
        if self.n_past + n_new > self.n_ctx:
            raise ContextOverflowError(
                f"{self.n_past} cached + {n_new} new tokens exceed the context of {self.n_ctx} tokens")
        return np.arange(self.n_past, self.n_past + n_new, dtype=np.int32)

    def advance(self, n_new: int) -> None:
        self.n_past += n_new

    def reset(self) -> None:
        self.n_past = 0
