"""Split rules: how each weight tensor may be cut across NUMA nodes.

The weight dataclasses declare, per tensor, the dimension it is split along and
the axis that dimension runs on (`wq: Tensor = split(HEADS)`); engine/plan.py
reads only these declarations to decide which node holds which part, as
gpt-fast's tp.py applies a plan to an unchanged model: the model says what it
computes, the plan says where each shard lives.

Dimensions:
- HEADS: query heads (wq rows, wo columns, per-head k_b / v_b);
- KV_HEADS: GQA's KV heads; they follow HEADS (a node needs the KV heads of its
  query heads);
- FFN: a SwiGLU FFN's intermediate dimension (gate/up rows, down columns);
- EXPERTS: routed experts (axis 0), placed by the expert map; `inner` is the axis
  of the expert's own FFN dimension, along which a split expert is cut;
- VOCAB: the output head's rows;
- REPLICATED: small tensors every node holds whole (norms, routers, latents).

A dimension's size is the config's (`split_sizes()`, for heads: one head spans
head_dim rows) or else the tensor's extent along the axis.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

HEADS, KV_HEADS, FFN, EXPERTS, VOCAB, REPLICATED = "heads", "kv_heads", "ffn", "experts", "vocab", "replicated"
FOLLOWS = {KV_HEADS: HEADS}   # a following dimension is cut where its leader is, in whole groups


@dataclass(frozen=True)
class Split:
    dim: str
    axis: int = 0
    inner: int | None = None   # EXPERTS: the axis of each expert's FFN dimension


def split(dim: str, axis: int = 0, inner: int | None = None, optional: bool = False):
    """A dataclass field with its split rule; `optional`: None when the file lacks it."""
    meta = {"split": Split(dim, axis, inner)}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


def split_rules(weights, prefix: str = "") -> list[tuple[str, object, Split]]:
    """(name, tensor, rule) of every present tensor of a weight dataclass. A nested weight
    structure (MoE's shared expert) gives its own under `name.`."""
    out = []
    for f in fields(weights):
        value = getattr(weights, f.name)
        if value is None:
            continue
        if "split" in f.metadata:
            out.append((prefix + f.name, value, f.metadata["split"]))
        elif _declares(value):
            out += split_rules(value, f"{prefix}{f.name}.")
    return out


def _declares(value) -> bool:
    """A weight structure with split rules of its own (a Tensor, also a dataclass, has none)."""
    return is_dataclass(value) and any("split" in f.metadata for f in fields(value))
