"""Qwen3-MoE (GGUF arch `qwen3moe`): GQA attention with per-head q/k RMSNorm and
NeoX RoPE; every layer an MoE block with softmax routing and normalised top-k
weights; no shared expert. heads x head_dim may differ from the hidden size."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError
from ..gguf_file import GGUFModelFile
from ..layers.attention import gqa_attention
from ..layers.moe import GATING_SOFTMAX, MoEWeights, RouterConfig
from .base import (LayerWeights, MetadataReader, ModelConfig, ModelWeights, gqa_config, load_layers,
                   pre_norm_block, take_gqa, take_moe)

ARCH = "qwen3moe"


@dataclass(frozen=True)
class Qwen3MoeConfig(ModelConfig):

    @classmethod
    def from_gguf(cls, gguf: GGUFModelFile, **overrides) -> "Qwen3MoeConfig":
        md = MetadataReader(gguf, ARCH)
        attention = gqa_config(gguf, md)
        if attention.rope.n_dims != attention.head_dim:
            raise UnsupportedError(f"{gguf.path}: {ARCH} needs rope.dimension_count == key_length")
        n_used = md.int("expert_used_count")
        return cls(
            **cls.base_fields(gguf, md), attention=attention,
            router=RouterConfig(
                n_expert=md.int("expert_count"), n_used=n_used, gating=GATING_SOFTMAX, norm_weights=True,
                n_groups=md.int("expert_group_count", 0), n_groups_used=md.int("expert_group_used_count", 0),
                **overrides),
            expert_ff=md.int("expert_feed_forward_length", md.int("feed_forward_length", 0) // n_used),
        )


def load_weights(gguf: GGUFModelFile, cfg: Qwen3MoeConfig) -> ModelWeights:
    def layer(pick, i, p):
        return (take_gqa(pick, p, cfg.attention, cfg.hidden, qk_norm=True),
                MoEWeights(**take_moe(pick, i, cfg.hidden, cfg.expert_ff, cfg.n_expert)))
    return load_layers(gguf, cfg, layer)


def forward_layer(cfg: Qwen3MoeConfig, i: int, w: LayerWeights, x, cache, positions, deq):
    return pre_norm_block(cfg, w, x, lambda h: gqa_attention(cfg.attention, w.attn, h, cache, positions, deq), deq)
