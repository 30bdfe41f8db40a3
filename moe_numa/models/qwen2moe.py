"""Qwen2-MoE (GGUF arch `qwen2moe`): GQA attention with q/k/v biases and NeoX
RoPE; every layer an MoE block with softmax routing (top-k weights not
normalised) plus a shared expert scaled by a sigmoid gate."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError
from ..gguf_file import GGUFModelFile
from ..layers.attention import gqa_attention
from ..layers.moe import GATING_SOFTMAX, MoEWeights, RouterConfig
from .base import (LayerWeights, MetadataReader, ModelConfig, ModelWeights, gqa_config, load_layers,
                   pre_norm_block, take_ffn, take_gqa, take_moe)

ARCH = "qwen2moe"


@dataclass(frozen=True)
class Qwen2MoeConfig(ModelConfig):
    shared_ff: int = 0

    @classmethod
    def from_gguf(cls, gguf: GGUFModelFile, **overrides) -> "Qwen2MoeConfig":
        md = MetadataReader(gguf, ARCH)
        base, attention = cls.base_fields(gguf, md), gqa_config(gguf, md)
        if attention.n_head * attention.head_dim != base["hidden"]:
            raise UnsupportedError(f"{gguf.path}: {ARCH} needs head_count x key_length == embedding_length")
        if attention.rope.n_dims != attention.head_dim:
            raise UnsupportedError(f"{gguf.path}: {ARCH} needs rope.dimension_count == key_length")
        n_used = md.int("expert_used_count")
        ff = md.int("feed_forward_length", 0)
        return cls(
            **base, attention=attention,
            router=RouterConfig(
                n_expert=md.int("expert_count"), n_used=n_used, gating=GATING_SOFTMAX, norm_weights=False,
                n_groups=md.int("expert_group_count", 0), n_groups_used=md.int("expert_group_used_count", 0),
                **overrides),
            expert_ff=md.int("expert_feed_forward_length", ff // n_used if ff else None),
            shared_ff=md.int("expert_shared_feed_forward_length", ff or None),
        )


def load_weights(gguf: GGUFModelFile, cfg: Qwen2MoeConfig) -> ModelWeights:
    H = cfg.hidden

    def layer(pick, i, p):
        return take_gqa(pick, p, cfg.attention, H, biases=True), MoEWeights(
            **take_moe(pick, i, H, cfg.expert_ff, cfg.n_expert),
            shared=take_ffn(pick, p, "_shexp", H, cfg.shared_ff),
            shared_gate=pick.take(p + "ffn_gate_inp_shexp.weight", (H,)))
    return load_layers(gguf, cfg, layer)


def forward_layer(cfg: Qwen2MoeConfig, i: int, w: LayerWeights, x, cache, positions, deq):
    return pre_norm_block(cfg, w, x, lambda h: gqa_attention(cfg.attention, w.attn, h, cache, positions, deq), deq)
