"""Turning next-token logits into a token: penalties, top-k, top-p, min-p,
temperature and a seeded draw, in llama.cpp's default order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import math
import numbers

import numpy as np

from .errors import ArgumentError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8          # <= 0: greedy
    top_k: int = 40                   # <= 0: off
    top_p: float = 0.95               # >= 1: off
    min_p: float = 0.05               # <= 0: off
    repeat_penalty: float = 1.0       # 1: off
    repeat_last_n: int = 64           # tokens the penalties look back over (-1: all)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        for name in ("top_k", "repeat_last_n"):
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        if self.top_p <= 0 or self.repeat_penalty <= 0:
            raise ArgumentError(f"top_p and repeat_penalty must be > 0, got {self.top_p} and {self.repeat_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ArgumentError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_last_n < -1:
            raise ArgumentError(f"repeat_last_n must be >= -1 (-1: all), got {self.repeat_last_n}")
        if self.seed is not None:
            seed = _integer("seed", self.seed)
            if seed < 0:
                raise ArgumentError(f"seed must be a non-negative integer or None, got {seed}")
            object.__setattr__(self, "seed", seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def _finite(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ArgumentError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _integer(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ArgumentError(f"{name} must be an integer, got {v!r}")
    return int(v)


def apply_penalties(logits: np.ndarray, history: Sequence[int], p: SamplingParams) -> np.ndarray:
    if not history or (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0):
        return logits
    recent = list(history) if p.repeat_last_n < 0 else list(history)[-p.repeat_last_n:] if p.repeat_last_n else []
    if not recent:
        return logits
    ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
    out = logits.copy()
    vals = out[ids]
    # llama.cpp divides positive logits and multiplies negative ones by the penalty.
    vals = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
    vals = vals - counts * p.frequency_penalty - (counts > 0) * p.presence_penalty
    out[ids] = vals
    return out


def top_order(logits: np.ndarray, k: int = 0) -> np.ndarray:
    """Token ids by falling logit, ties by lower id (a stable sort), the first k only
    when k > 0. Selects the k candidates in linear time before sorting them: a full
    sort of a 150k vocabulary costs milliseconds per token, a server's sampling
    budget for a whole batch."""
    n = len(logits)
    if 0 < k < n:
        kth = np.partition(logits, n - k)[n - k]            # the k-th largest value
        if np.isfinite(kth):
            above = np.flatnonzero(logits > kth)
            cand = np.concatenate([above, np.flatnonzero(logits == kth)[:k - len(above)]])
            cand.sort()
            return cand[np.argsort(-logits[cand], kind="stable")]
    order = np.argsort(-logits, kind="stable")
    return order[:k] if k > 0 else order


def candidate_probs(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Token ids still eligible after top-k / top-p / min-p, and their
    probabilities after temperature (normalised)."""
    order = top_order(logits, p.top_k)
    sorted_logits = logits[order].astype(np.float64)
    probs = np.exp(sorted_logits - sorted_logits[0])
    probs /= probs.sum()
    if p.top_p < 1.0:
        cum = np.cumsum(probs)
        keep = int(np.searchsorted(cum, p.top_p) + 1)
        order, sorted_logits, probs = order[:keep], sorted_logits[:keep], probs[:keep]
    if p.min_p > 0.0:
        keep = probs >= p.min_p * probs[0]
        order, sorted_logits = order[keep], sorted_logits[keep]
    t = max(p.temperature, 1e-6)
    probs = np.exp((sorted_logits - sorted_logits[0]) / t)
    return order, probs / probs.sum()


class Sampler:
    """Stateful sampler: one random stream per generation, seeded for reproducibility."""

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        logits = apply_penalties(np.asarray(logits, dtype=np.float32), history, self.params)
        if self.params.greedy:
            return int(np.argmax(logits))
        ids, probs = candidate_probs(logits, self.params)
        return int(ids[self.rng.choice(len(ids), p=probs)])
