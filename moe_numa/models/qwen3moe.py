"""Qwen3-MoE (GGUF arch `qwen3moe`): GQA attention with per-head q/k RMSNorm and
NeoX RoPE; every layer an MoE block with softmax routing and normalised top-k
weights; no shared expert. heads x head_dim may differ from the hidden size."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..gguf_file import GGUFModelFile
from ..layers.attention import AttentionConfig, gqa_attention
from ..layers.moe import GATING_SOFTMAX, MoEWeights, RouterConfig
from ..layers.rope import rope_from_metadata
from .base import (LayerWeights, MetadataReader, ModelConfig, ModelWeights, TensorPicker,
                   pre_norm_block, take_common, take_gqa, take_moe, vocab_size)

ARCH = "qwen3moe"


@dataclass(frozen=True)
class Qwen3MoeConfig(ModelConfig):

    @classmethod
    def from_gguf(cls, gguf: GGUFModelFile, **overrides) -> "Qwen3MoeConfig":
        md = MetadataReader(gguf, ARCH)
        hidden = md.int("embedding_length")
        n_head = md.int("attention.head_count")
        head_dim = md.int("attention.key_length", hidden // n_head)
        value_dim = md.int("attention.value_length", head_dim)
        if value_dim != head_dim or md.int("rope.dimension_count", head_dim) != head_dim:
            from ..errors import UnsupportedError
            raise UnsupportedError(f"{gguf.path}: {ARCH} needs key_length == value_length == rope.dimension_count")
        n_ctx = md.int("context_length")
        n_expert, n_used = md.int("expert_count"), md.int("expert_used_count")
        return cls(
            arch=ARCH, name=str(gguf.get("general.name", ARCH)), n_vocab=vocab_size(gguf),
            n_ctx_train=n_ctx, hidden=hidden, n_layer=md.int("block_count"),
            rms_eps=md.float("attention.layer_norm_rms_epsilon"),
            router=RouterConfig(
                n_expert=n_expert, n_used=n_used, gating=GATING_SOFTMAX, norm_weights=True,
                n_groups=md.int("expert_group_count", 0), n_groups_used=md.int("expert_group_used_count", 0),
                **overrides),
            expert_ff=md.int("expert_feed_forward_length", md.int("feed_forward_length", 0) // n_used),
            attention=AttentionConfig(
                n_head=n_head, n_head_kv=md.int("attention.head_count_kv", n_head), head_dim=head_dim,
                rope=rope_from_metadata(gguf.metadata, ARCH, head_dim, neox=True, n_ctx_train=n_ctx),
                kq_scale=1.0 / math.sqrt(head_dim), norm_eps=md.float("attention.layer_norm_rms_epsilon")),
        )


def load_weights(gguf: GGUFModelFile, cfg: Qwen3MoeConfig) -> ModelWeights:
    pick = TensorPicker(gguf)
    a, H = cfg.attention, cfg.hidden
    embd, out_norm, out = take_common(pick, cfg.n_vocab, H)
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        attn = take_gqa(pick, p, a, H, qk_norm=True)
        moe = MoEWeights(**take_moe(pick, i, H, cfg.expert_ff, cfg.n_expert))
        layers.append(LayerWeights(pick.take(p + "attn_norm.weight", (H,)), attn,
                                   pick.take(p + "ffn_norm.weight", (H,)), moe))
    pick.check_all_used()
    return ModelWeights(embd, layers, out_norm, out)


def forward_layer(cfg: Qwen3MoeConfig, i: int, w: LayerWeights, x, cache, positions, deq):
    return pre_norm_block(cfg, w, x, lambda h: gqa_attention(cfg.attention, w.attn, h, cache, positions, deq), deq)
