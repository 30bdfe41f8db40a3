"""Dequantized float32 weights for the reference path, cached with a byte budget.

The reference forward pass is the correctness oracle, not the fast path: it
dequantizes a GGUF tensor with gguf.quants the first time it is used and keeps
the float32 copy while the cache has room.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..gguf_file import Tensor


class Dequantizer:
    """Maps a Tensor to its float32 values; least-recently-used copies are dropped
    once the cache holds more than `budget_bytes`."""

    def __init__(self, budget_bytes: int = 8 << 30, act_quant: bool = False):
        self.budget = budget_bytes
        # With act_quant, inputs of quantized matmuls are rounded the way the native
        # kernels round them (Q8_0 / Q8_K), so the engine can be checked tightly.
        self.act_quant = act_quant
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._bytes = 0

    def __call__(self, t: Tensor | None) -> np.ndarray | None:
        if t is None:
            return None
        key = (t.file, t.name)
        arr = self._cache.get(key)
        if arr is not None:
            self._cache.move_to_end(key)
            return arr
        arr = t.dequantize()
        arr.setflags(write=False)
        if arr.nbytes <= self.budget:
            self._cache[key] = arr
            self._bytes += arr.nbytes
            while self._bytes > self.budget:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.nbytes
        return arr

    def act(self, x: np.ndarray, t: Tensor) -> np.ndarray:
        """The input a matmul with `t` sees: `x`, or its kernel-quantized version."""
        if not self.act_quant:
            return x
        from ..quants import simulate_act_quant
        return simulate_act_quant(x, t.qtype)

    def linear(self, x: np.ndarray, t: Tensor) -> np.ndarray:
        """x @ W.T for a [rows, cols] tensor W."""
        return self.min_term(x, t, self.act(x, t) @ self(t).T)

    def min_term(self, x: np.ndarray, t: Tensor, y: np.ndarray) -> np.ndarray:
        """`y`, the product of act(x) with `t`, plus the rounding of the activation sums
        that the kernels (as llama.cpp's Q8_1) apply to a Q4_1 / Q5_1 weight's min term."""
        if not self.act_quant:
            return y
        from ..quants import q8_1_sum_correction
        c = q8_1_sum_correction(x, t.raw, t.qtype)
        return y if c is None else (y + c).astype(y.dtype)

    def rows(self, t: Tensor, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D tensor (embedding lookup) without dequantizing it all."""
        return t.dequantize_rows(ids)
