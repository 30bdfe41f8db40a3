"""Grouped-query attention (Qwen2-MoE, Qwen3-MoE, GLM-4.5): q/k/v projections
with optional biases and per-head q/k RMSNorm, RoPE over all or the first
`rope.n_dims` dims of each head, causal softmax attention over the cache, and
the output projection."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gguf_file import Tensor
from .kv_cache import LayerCache
from .norm import rms_norm
from .rope import RopeConfig, apply_rope, rope_cos_sin
from .split import HEADS, KV_HEADS, REPLICATED, split


@dataclass(frozen=True)
class AttentionConfig:
    n_head: int
    n_head_kv: int
    head_dim: int
    rope: RopeConfig
    kq_scale: float
    norm_eps: float          # for the per-head q/k norms

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.n_head_kv, self.head_dim), "v": (self.n_head_kv, self.head_dim)}

    def split_sizes(self) -> dict[str, int]:
        return {HEADS: self.n_head, KV_HEADS: self.n_head_kv}


@dataclass(frozen=True)
class GQAWeights:
    wq: Tensor = split(HEADS)                # [n_head * head_dim, hidden]
    wk: Tensor = split(KV_HEADS)             # [n_head_kv * head_dim, hidden]
    wv: Tensor = split(KV_HEADS)             # [n_head_kv * head_dim, hidden]
    wo: Tensor = split(HEADS, axis=1)        # [hidden, n_head * head_dim]
    bq: Tensor | None = split(HEADS, optional=True)
    bk: Tensor | None = split(KV_HEADS, optional=True)
    bv: Tensor | None = split(KV_HEADS, optional=True)
    q_norm: Tensor | None = split(REPLICATED, optional=True)   # [head_dim]
    k_norm: Tensor | None = split(REPLICATED, optional=True)

    kind = "gqa"             # the engine's attention kind


def _linear(x, w, b, deq):
    y = deq.linear(x, w)
    return y if b is None else y + deq(b)


def causal_softmax_attention(q, k, v, positions, kq_scale):
    """q [T, H, D], k/v [S, H, D] for the same heads; positions [T] of the
    queries; key s is visible to query t if s <= positions[t]. -> [T, H, Dv]"""
    scores = np.einsum("thd,shd->hts", q, k) * np.float32(kq_scale)
    visible = np.arange(k.shape[0])[None, :] <= positions[:, None]
    scores = np.where(visible[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v)


def gqa_attention(cfg: AttentionConfig, w: GQAWeights, x: np.ndarray, cache: LayerCache,
                  positions: np.ndarray, deq) -> np.ndarray:
    """x: [T, hidden] (normed) at `positions` -> attention output [T, hidden]."""
    T = x.shape[0]
    q = _linear(x, w.wq, w.bq, deq).reshape(T, cfg.n_head, cfg.head_dim)
    k = _linear(x, w.wk, w.bk, deq).reshape(T, cfg.n_head_kv, cfg.head_dim)
    v = _linear(x, w.wv, w.bv, deq).reshape(T, cfg.n_head_kv, cfg.head_dim)
    if w.q_norm is not None:
        q = rms_norm(q, deq(w.q_norm), cfg.norm_eps)
        k = rms_norm(k, deq(w.k_norm), cfg.norm_eps)
    # Partial rotary (GLM-4.5: rope.n_dims = head_dim / 2): only the first n_dims of each head
    # turn, the rest pass through, as ggml's rope does.
    cos, sin = rope_cos_sin(cfg.rope, positions)
    nd = cfg.rope.n_dims
    q, k = q.copy(), k.copy()
    q[..., :nd] = apply_rope(q[..., :nd], cos, sin, cfg.rope.neox)
    k[..., :nd] = apply_rope(k[..., :nd], cos, sin, cfg.rope.neox)
    start = int(positions[0])
    cache.store(start, k=cache.round_k(k), v=cache.round_v(v))   # as the cache type holds them
    end = start + T
    group = cfg.n_head // cfg.n_head_kv
    keys = np.repeat(cache.view("k", end), group, axis=1)
    values = np.repeat(cache.view("v", end), group, axis=1)
    out = causal_softmax_attention(q, keys, values, positions, cfg.kq_scale)
    return deq.linear(out.reshape(T, -1), w.wo)
