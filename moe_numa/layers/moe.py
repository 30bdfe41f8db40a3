"""Mixture-of-Experts: the router (gating, grouped top-k, bias, normalisation,
scaling) and the expert block, as DeepSeek and Qwen define them in GGUF files.

`route` is the reference's router. The NUMA engine has its own in C
(`mn_engine.c`) with the same rules; the engine tests compare whole MoE blocks,
routing included, against `moe_block` here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UnsupportedError
from ..gguf_file import Tensor
from .ffn import FFNWeights, silu, swiglu
from .split import EXPERTS, REPLICATED, split

GATING_SOFTMAX = "softmax"
GATING_SIGMOID = "sigmoid"
# How a group of experts is scored for group-limited routing:
#   "top2_sum": sum of the group's two best scores (DeepSeek-V3, and llama.cpp for all files)
#   "max":      the group's best score (the original DeepSeek-V2 group_limited_greedy)
GROUP_RULES = ("top2_sum", "max")


@dataclass(frozen=True)
class RouterConfig:
    n_expert: int
    n_used: int
    gating: str = GATING_SOFTMAX
    norm_weights: bool = False
    weights_scale: float = 0.0       # 0 or 1: not applied
    n_groups: int = 0                # 0 or 1: no group limit
    n_groups_used: int = 0
    group_rule: str = "top2_sum"

    def __post_init__(self):
        if self.gating not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise UnsupportedError(f"expert gating function {self.gating!r} is not supported (softmax, sigmoid)")
        if self.group_rule not in GROUP_RULES:
            raise UnsupportedError(f"group rule {self.group_rule!r} is not supported ({', '.join(GROUP_RULES)})")
        if not 0 < self.n_used <= self.n_expert:
            raise UnsupportedError(f"expert_used_count {self.n_used} must be in 1..{self.n_expert}")
        if self.n_groups > 1:
            if self.n_expert % self.n_groups:
                raise UnsupportedError(f"expert_count {self.n_expert} is not divisible by expert_group_count {self.n_groups}")
            if not 0 < self.n_groups_used <= self.n_groups:
                raise UnsupportedError(f"expert_group_used_count {self.n_groups_used} must be in 1..{self.n_groups}")
            if self.n_groups_used * (self.n_expert // self.n_groups) < self.n_used:
                raise UnsupportedError("the selected expert groups hold fewer experts than expert_used_count")


@dataclass(frozen=True)
class MoEWeights:
    router: Tensor = split(REPLICATED)                 # [n_expert, hidden]
    gate_exps: Tensor = split(EXPERTS, inner=1)        # [n_expert, ff, hidden]
    up_exps: Tensor = split(EXPERTS, inner=1)          # [n_expert, ff, hidden]
    down_exps: Tensor = split(EXPERTS, inner=2)        # [n_expert, hidden, ff]
    probs_bias: Tensor | None = split(REPLICATED, optional=True)    # [n_expert] score correction (DeepSeek-V3)
    shared: FFNWeights | None = None                   # shared expert(s), always active: its own split rules
    shared_gate: Tensor | None = split(REPLICATED, optional=True)   # [hidden] sigmoid gate (Qwen2-MoE)

    kind = "moe"   # the engine's FFN kind

    def expert(self, e: int) -> FFNWeights:
        """Expert e's matrices as zero-copy views of the merged tensors."""
        return FFNWeights(self.gate_exps[e], self.up_exps[e], self.down_exps[e])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def route(cfg: RouterConfig, logits: np.ndarray, bias: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Expert ids [T, n_used] (int32, best first) and their weights [T, n_used] (float32)."""
    logits = np.asarray(logits, dtype=np.float32)
    if cfg.gating == GATING_SOFTMAX:
        probs = _softmax(logits)
    else:
        probs = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    selection = probs + bias if bias is not None else probs
    if cfg.n_groups > 1:
        T = selection.shape[0]
        grouped = selection.reshape(T, cfg.n_groups, -1)
        if cfg.group_rule == "top2_sum":
            top2 = -np.sort(-grouped, axis=-1)[..., :2]
            group_score = top2.sum(axis=-1)
        else:
            group_score = grouped.max(axis=-1)
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :cfg.n_groups_used]
        mask = np.full((T, cfg.n_groups), -np.inf, dtype=np.float32)
        np.put_along_axis(mask, keep, 0.0, axis=-1)
        selection = (grouped + mask[..., None]).reshape(T, -1)
    ids = np.argsort(-selection, axis=-1, kind="stable")[:, :cfg.n_used].astype(np.int32)
    weights = np.take_along_axis(probs, ids, axis=-1)
    if cfg.norm_weights:
        weights = weights / np.maximum(weights.sum(axis=-1, keepdims=True), 6.103515625e-5)
    if cfg.weights_scale not in (0.0, 1.0):
        weights = weights * np.float32(cfg.weights_scale)
    return ids, weights.astype(np.float32)


def moe_block(cfg: RouterConfig, w: MoEWeights, x: np.ndarray, deq) -> np.ndarray:
    """x: [T, hidden] (already normed) -> routed experts + shared expert, [T, hidden]."""
    logits = deq.linear(x, w.router)
    ids, weights = route(cfg, logits, deq(w.probs_bias))
    out = np.zeros_like(x)
    for e in np.unique(ids):
        tok, slot = np.nonzero(ids == e)
        ew = w.expert(int(e))
        xe = x[tok]
        h = silu(deq.linear(xe, ew.gate)) * deq.linear(xe, ew.up)
        out[tok] += deq.linear(h, ew.down) * weights[tok, slot][:, None]
    if w.shared is not None:
        shared = swiglu(w.shared, x, deq)
        if w.shared_gate is not None:
            g = x @ deq(w.shared_gate)
            shared = shared * (1.0 / (1.0 + np.exp(-g)))[:, None]
        out += shared
    return out
