"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (GGUF arch `glm4moe`): GQA attention with q/k/v
biases, optional per-head q/k RMSNorm and NeoX RoPE over the first
`rope.dimension_count` dims of each head (head_dim x partial_rotary_factor, half the
head in the released models); leading dense FFN layers, then MoE layers with sigmoid
gating, the score-correction bias (`exp_probs_b`, selection only), normalised and
scaled top-k weights and a shared expert. The FFN's pre-norm is stored as
`post_attention_norm`.

As in llama.cpp: `block_count` includes the multi-token-prediction (NextN) layers
at the end (`nextn_predict_layers`); they are not run and their tensors are not
loaded. Files with M-RoPE sections (`rope.dimension_sections`, the vision models)
are refused.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import UnsupportedError
from ..gguf_file import GGUFModelFile
from ..layers.attention import AttentionConfig, gqa_attention
from ..layers.ffn import swiglu
from ..layers.moe import GATING_SIGMOID, GATING_SOFTMAX, MoEWeights, RouterConfig, moe_block
from ..layers.rope import rope_from_metadata
from .base import (LayerWeights, MetadataReader, ModelConfig, ModelWeights, TensorPicker,
                   pre_norm_block, take_common, take_ffn, take_gqa, take_moe, vocab_size)

ARCH = "glm4moe"
_GATING = {0: GATING_SIGMOID, 1: GATING_SOFTMAX, 2: GATING_SIGMOID}   # 0 (absent): llama.cpp's sigmoid


@dataclass(frozen=True)
class Glm4MoeConfig(ModelConfig):
    n_dense_lead: int = 0
    dense_ff: int = 0
    n_shared: int = 0
    n_nextn: int = 0             # trailing multi-token-prediction layers, not run

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.n_dense_lead

    @property
    def shared_ff(self) -> int:
        return self.expert_ff * self.n_shared

    @classmethod
    def from_gguf(cls, gguf: GGUFModelFile, **overrides) -> "Glm4MoeConfig":
        md = MetadataReader(gguf, ARCH)
        hidden = md.int("embedding_length")
        n_head = md.int("attention.head_count")
        head_dim = md.int("attention.key_length", hidden // n_head)
        if md.int("attention.value_length", head_dim) != head_dim:
            raise UnsupportedError(f"{gguf.path}: {ARCH} needs key_length == value_length")
        if md.has("rope.dimension_sections"):
            raise UnsupportedError(f"{gguf.path}: {ARCH} with M-RoPE sections (a vision model) is not supported")
        rope_dim = md.int("rope.dimension_count", head_dim)
        if not 0 < rope_dim <= head_dim or rope_dim % 2:
            raise UnsupportedError(f"{gguf.path}: rope.dimension_count {rope_dim} must be even and at most "
                                   f"the head size {head_dim}")
        gating_id = md.int("expert_gating_func", 0)
        if gating_id not in _GATING:
            raise UnsupportedError(f"{gguf.path}: {ARCH}.expert_gating_func = {gating_id} is not supported "
                                   f"(1 softmax, 2 sigmoid)")
        n_nextn = md.int("nextn_predict_layers", 0)
        n_layer = md.int("block_count") - n_nextn
        n_ctx = md.int("context_length")
        eps = md.float("attention.layer_norm_rms_epsilon")
        n_dense = md.int("leading_dense_block_count", 0)
        n_expert, n_used = md.int("expert_count"), md.int("expert_used_count")
        return cls(
            arch=ARCH, name=str(gguf.get("general.name", ARCH)), n_vocab=vocab_size(gguf),
            n_ctx_train=n_ctx, hidden=hidden, n_layer=n_layer, rms_eps=eps,
            router=RouterConfig(
                n_expert=n_expert, n_used=n_used, gating=_GATING[gating_id],
                norm_weights=md.bool("expert_weights_norm", False),
                weights_scale=md.float("expert_weights_scale", 0.0),
                n_groups=md.int("expert_group_count", 0), n_groups_used=md.int("expert_group_used_count", 0),
                **overrides),
            expert_ff=md.int("expert_feed_forward_length"),
            attention=AttentionConfig(
                n_head=n_head, n_head_kv=md.int("attention.head_count_kv", n_head), head_dim=head_dim,
                rope=rope_from_metadata(gguf.metadata, ARCH, rope_dim, neox=True, n_ctx_train=n_ctx),
                kq_scale=1.0 / math.sqrt(head_dim), norm_eps=eps),
            n_dense_lead=n_dense, dense_ff=md.int("feed_forward_length", 0 if n_dense == 0 else None),
            n_shared=md.int("expert_shared_count", 0), n_nextn=n_nextn,
        )


def load_weights(gguf: GGUFModelFile, cfg: Glm4MoeConfig) -> ModelWeights:
    nextn = tuple(f"blk.{i}." for i in range(cfg.n_layer, cfg.n_layer + cfg.n_nextn))
    pick = TensorPicker(gguf, ignore=lambda name: name.startswith(nextn))
    a, H = cfg.attention, cfg.hidden
    embd, out_norm, out = take_common(pick, cfg.n_vocab, H)
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        attn = take_gqa(pick, p, a, H, biases=True)
        attn = dataclasses.replace(attn, q_norm=pick.maybe(p + "attn_q_norm.weight", (a.head_dim,)),
                                   k_norm=pick.maybe(p + "attn_k_norm.weight", (a.head_dim,)))
        if (attn.q_norm is None) != (attn.k_norm is None):
            raise UnsupportedError(f"{gguf.path}: layer {i} has only one of attn_q_norm / attn_k_norm")
        if cfg.is_moe_layer(i):
            ffn = MoEWeights(
                **take_moe(pick, i, H, cfg.expert_ff, cfg.n_expert),
                probs_bias=pick.take(p + "exp_probs_b.bias", (cfg.n_expert,)),
                shared=take_ffn(pick, p, "_shexp", H, cfg.shared_ff) if cfg.n_shared else None,
            )
        else:
            ffn = take_ffn(pick, p, "", H, cfg.dense_ff)
        layers.append(LayerWeights(pick.take(p + "attn_norm.weight", (H,)), attn,
                                   pick.take(p + "post_attention_norm.weight", (H,)), ffn))
    pick.check_all_used()
    return ModelWeights(embd, layers, out_norm, out)


def forward_layer(cfg: Glm4MoeConfig, i: int, w: LayerWeights, x, cache, positions, deq):
    if cfg.is_moe_layer(i):
        ffn = lambda h: moe_block(cfg.router, w.ffn, h, deq)  # noqa: E731
    else:
        ffn = lambda h: swiglu(w.ffn, h, deq)  # noqa: E731
    return pre_norm_block(
        cfg, w, x, lambda h: gqa_attention(cfg.attention, w.attn, h, cache, positions, deq), ffn, deq)
