"""Qwen2-MoE (GGUF arch `qwen2moe`): GQA attention with q/k/v biases and NeoX
RoPE; every layer an MoE block with softmax routing (top-k weights not
normalised) plus a shared expert scaled by a sigmoid gate."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UnsupportedError
from ..gguf_file import GGUFModelFile
from ..layers.attention import AttentionConfig, gqa_attention
from ..layers.moe import GATING_SOFTMAX, MoEWeights, RouterConfig
from ..layers.rope import rope_from_metadata
from .base import (LayerWeights, MetadataReader, ModelConfig, ModelWeights, TensorPicker,
                   pre_norm_block, take_common, take_ffn, take_gqa, take_moe, vocab_size)

ARCH = "qwen2moe"


@dataclass(frozen=True)
class Qwen2MoeConfig(ModelConfig):
    shared_ff: int = 0

    @classmethod
    def from_gguf(cls, gguf: GGUFModelFile, **overrides) -> "Qwen2MoeConfig":
        md = MetadataReader(gguf, ARCH)
        hidden = md.int("embedding_length")
        n_head = md.int("attention.head_count")
        head_dim = md.int("attention.key_length", hidden // n_head)
        if n_head * head_dim != hidden or md.int("attention.value_length", head_dim) != head_dim:
            raise UnsupportedError(f"{gguf.path}: {ARCH} needs head_count x key_length == embedding_length "
                                   f"== head_count x value_length")
        if md.int("rope.dimension_count", head_dim) != head_dim:
            raise UnsupportedError(f"{gguf.path}: {ARCH} needs rope.dimension_count == key_length")
        n_ctx = md.int("context_length")
        n_expert, n_used = md.int("expert_count"), md.int("expert_used_count")
        ff = md.int("feed_forward_length", 0)
        return cls(
            arch=ARCH, name=str(gguf.get("general.name", ARCH)), n_vocab=vocab_size(gguf),
            n_ctx_train=n_ctx, hidden=hidden, n_layer=md.int("block_count"),
            rms_eps=md.float("attention.layer_norm_rms_epsilon"),
            router=RouterConfig(
                n_expert=n_expert, n_used=n_used, gating=GATING_SOFTMAX, norm_weights=False,
                n_groups=md.int("expert_group_count", 0), n_groups_used=md.int("expert_group_used_count", 0),
                **overrides),
            expert_ff=md.int("expert_feed_forward_length", ff // n_used if ff else None),
            attention=AttentionConfig(
                n_head=n_head, n_head_kv=md.int("attention.head_count_kv", n_head), head_dim=head_dim,
                rope=rope_from_metadata(gguf.metadata, ARCH, head_dim, neox=True, n_ctx_train=n_ctx),
                kq_scale=1.0 / math.sqrt(head_dim), norm_eps=md.float("attention.layer_norm_rms_epsilon")),
            shared_ff=md.int("expert_shared_feed_forward_length", ff or None),
        )


def load_weights(gguf: GGUFModelFile, cfg: Qwen2MoeConfig) -> ModelWeights:
    pick = TensorPicker(gguf)
    a, H = cfg.attention, cfg.hidden
    embd, out_norm, out = take_common(pick, cfg.n_vocab, H)
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        attn = take_gqa(pick, p, a, H, biases=True)
        moe = MoEWeights(
            **take_moe(pick, i, H, cfg.expert_ff, cfg.n_expert),
            shared=take_ffn(pick, p, "_shexp", H, cfg.shared_ff),
            shared_gate=pick.take(p + "ffn_gate_inp_shexp.weight", (H,)),
        )
        layers.append(LayerWeights(pick.take(p + "attn_norm.weight", (H,)), attn,
                                   pick.take(p + "ffn_norm.weight", (H,)), moe))
    pick.check_all_used()
    return ModelWeights(embd, layers, out_norm, out)


def forward_layer(cfg: Qwen2MoeConfig, i: int, w: LayerWeights, x, cache, positions, deq):
    return pre_norm_block(cfg, w, x, lambda h: gqa_attention(cfg.attention, w.attn, h, cache, positions, deq), deq)
