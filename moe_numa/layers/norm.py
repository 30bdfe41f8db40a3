"""RMSNorm, computed as llama.cpp does: mean of squares in double, scale in float."""
from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """RMS-normalise the last axis of `x`, then multiply by `weight` (if given)."""
    x = np.asarray(x, dtype=np.float32)
    mean_sq = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    y = x * (1.0 / np.sqrt(mean_sq + eps)).astype(np.float32)
    return y if weight is None else y * weight
