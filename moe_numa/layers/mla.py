"""Multi-head latent attention (DeepSeek-V2/V3): queries through an optional
low-rank bottleneck, keys and values compressed into one latent vector per
token (cached) plus a shared rotary key.

Both GGUF layouts are handled as llama.cpp handles them: with the newer split
`attn_k_b` / `attn_v_b`, attention runs in the latent space with the key/value
up-projections absorbed into query and output; with the older merged `attn_kv_b`,
each head's K/V are decompressed from the latent and attended as usual.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gguf_file import Tensor
from .attention import causal_softmax_attention
from .kv_cache import LayerCache
from .norm import rms_norm
from .rope import RopeConfig, apply_rope, rope_cos_sin
from .split import HEADS, REPLICATED, split


@dataclass(frozen=True)
class MLAConfig:
    n_head: int
    q_lora_rank: int          # 0: plain attn_q (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    rope: RopeConfig
    kq_scale: float
    norm_eps: float

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"latent": (self.kv_lora_rank,), "k_rope": (self.qk_rope_dim,)}

    def split_sizes(self) -> dict[str, int]:
        return {HEADS: self.n_head}


@dataclass(frozen=True)
class MLAWeights:
    # The latent projection and its cache are needed by every node with heads: replicated.
    wkv_a: Tensor = split(REPLICATED)                        # [kv_lora + rope, hidden]  (attn_kv_a_mqa)
    kv_a_norm: Tensor = split(REPLICATED)                    # [kv_lora]
    wo: Tensor = split(HEADS, axis=1)                        # [hidden, n_head * v_head]
    wq: Tensor | None = split(HEADS, optional=True)          # [n_head * q_head, hidden]   (no q LoRA)
    wq_a: Tensor | None = split(REPLICATED, optional=True)   # [q_lora, hidden]
    q_a_norm: Tensor | None = split(REPLICATED, optional=True)
    wq_b: Tensor | None = split(HEADS, optional=True)        # [n_head * q_head, q_lora]
    wk_b: Tensor | None = split(HEADS, optional=True)        # [n_head, kv_lora, qk_nope]  (split layout)
    wv_b: Tensor | None = split(HEADS, optional=True)        # [n_head, v_head, kv_lora]
    wkv_b: Tensor | None = split(HEADS, optional=True)       # [n_head * (qk_nope + v_head), kv_lora]  (merged)

    @property
    def kind(self) -> str:
        """The engine's attention kind: absorbed over the latent cache (split layout), or
        decompressed per head with a full K/V cache (merged attn_kv_b)."""
        return "mla" if self.wk_b is not None else "mla_mha"


def mla_attention(cfg: MLAConfig, w: MLAWeights, x: np.ndarray, cache: LayerCache,
                  positions: np.ndarray, deq) -> np.ndarray:
    T = x.shape[0]
    if w.wq is not None:
        q = deq.linear(x, w.wq)
    else:
        q = deq.linear(rms_norm(deq.linear(x, w.wq_a), deq(w.q_a_norm), cfg.norm_eps), w.wq_b)
    q = q.reshape(T, cfg.n_head, cfg.q_head_dim)
    q_nope, q_rope = q[..., :cfg.qk_nope_dim], q[..., cfg.qk_nope_dim:]

    kv_a = deq.linear(x, w.wkv_a)
    latent = rms_norm(kv_a[:, :cfg.kv_lora_rank], deq(w.kv_a_norm), cfg.norm_eps)
    k_rope = kv_a[:, None, cfg.kv_lora_rank:]

    cos, sin = rope_cos_sin(cfg.rope, positions)
    q_rope = apply_rope(np.ascontiguousarray(q_rope), cos, sin, cfg.rope.neox)
    k_rope = apply_rope(np.ascontiguousarray(k_rope), cos, sin, cfg.rope.neox)[:, 0, :]

    start = int(positions[0])
    R = cfg.kv_lora_rank
    if w.wkv_b is not None:
        # The merged layout decompresses K/V per head (llama.cpp without MLA, and the engine):
        # the cache types round those, so attend over them. attn_kv_b's input is the latent,
        # rounded as such.
        cache.store(start, latent=latent, k_rope=k_rope)
        end = start + T
        lat, kr = cache.view("latent", end), cache.view("k_rope", end)
        S, nope, vd = len(lat), cfg.qk_nope_dim, cfg.v_head_dim
        kv = deq.linear(np.ascontiguousarray(lat), w.wkv_b).reshape(S, cfg.n_head, nope + vd)
        key = np.concatenate([kv[..., :nope], np.broadcast_to(kr[:, None, :], (S, cfg.n_head, kr.shape[1]))], -1)
        query = np.concatenate([q_nope, q_rope], axis=-1)
        out = causal_softmax_attention(query, cache.round_k(key), cache.round_v(kv[..., nope:]), positions,
                                       cfg.kq_scale)
        return deq.linear(out.reshape(T, -1), w.wo)

    # The cache holds [latent | k_rope] rows of the K type; the values are its latent part
    # (llama.cpp's MLA V is a view of K), so both round as K.
    kv = cache.round_k(np.concatenate([latent, k_rope], axis=-1))
    cache.store(start, latent=kv[:, :R], k_rope=kv[:, R:])
    end = start + T
    lat = cache.view("latent", end)
    kr = cache.view("k_rope", end)
    k_b, v_b = deq(w.wk_b), deq(w.wv_b)
    # q_nope . (k_b^T c) == (k_b q_nope) . c : attend in the latent space.
    q_in = np.ascontiguousarray(q_nope)
    q_lat = deq.min_term(q_in, w.wk_b, np.einsum("hrd,thd->thr", k_b, deq.act(q_in, w.wk_b)))
    query = np.concatenate([q_lat, q_rope], axis=-1)                     # [T, H, kv_lora + rope]
    key = np.concatenate([lat, kr], axis=-1)[:, None, :]                 # [S, 1, kv_lora + rope]
    key = np.broadcast_to(key, (key.shape[0], cfg.n_head, key.shape[2]))
    value = np.broadcast_to(lat[:, None, :], (lat.shape[0], cfg.n_head, lat.shape[1]))
    out_lat = causal_softmax_attention(query, key, value, positions, cfg.kq_scale)  # [T, H, kv_lora]
    o_in = np.ascontiguousarray(out_lat)
    out = deq.min_term(o_in, w.wv_b, np.einsum("hvr,thr->thv", v_b, deq.act(o_in, w.wv_b)))
    return deq.linear(out.reshape(T, -1), w.wo)
