"""Per-layer KV caches: keys/values per KV head for GQA, and the compressed
latent plus the shared rotary key for MLA. Positions continue across calls."""
from __future__ import annotations

import numpy as np

from ..errors import ContextOverflowError


class LayerCache:
    """Named float32 arrays of shape [n_ctx, ...], filled up to the model's n_past."""

    def __init__(self, n_ctx: int, **shapes: tuple[int, ...]):
        self.arrays = {name: np.zeros((n_ctx, *shape), dtype=np.float32) for name, shape in shapes.items()}

    def store(self, start: int, **values: np.ndarray) -> None:
        for name, v in values.items():
            self.arrays[name][start:start + len(v)] = v

    def view(self, name: str, end: int) -> np.ndarray:
        return self.arrays[name][:end]


class KVCache:
    """The cache of one sequence: one LayerCache per layer plus the fill level."""

    def __init__(self, n_ctx: int, layer_shapes: list[dict[str, tuple[int, ...]]]):
        self.n_ctx = n_ctx
        self.n_past = 0
        self.layers = [LayerCache(n_ctx, **shapes) for shapes in layer_shapes]

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
