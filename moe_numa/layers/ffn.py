"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gguf_file import Tensor
from .split import FFN, split


@dataclass(frozen=True)
class FFNWeights:
    gate: Tensor = split(FFN)           # [ff, hidden]
    up: Tensor = split(FFN)             # [ff, hidden]
    down: Tensor = split(FFN, axis=1)   # [hidden, ff]

    kind = "dense"   # the engine's FFN kind

    @property
    def n_ff(self) -> int:
        return self.gate.shape[0]


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(w: FFNWeights, x: np.ndarray, deq) -> np.ndarray:
    """x: [T, hidden] -> [T, hidden]."""
    h = silu(deq.linear(x, w.gate)) * deq.linear(x, w.up)
    return deq.linear(h, w.down)
