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
from ..layers.moe import GATING_SIGMOID, GATING_SOFTMAX
from ..layers.rope import rope_from_metadata
from .base import (DenseLeadConfig, LayerWeights, MetadataReader, ModelWeights, TensorPicker,
                   pre_norm_block, take_common, take_dense_or_moe, take_gqa)

ARCH = "glm4moe"
_GATING = {0: GATING_SIGMOID, 1: GATING_SOFTMAX, 2: GATING_SIGMOID}   # 0 (absent): llama.cpp's sigmoid


@dataclass(frozen=True)
class Glm4MoeConfig(DenseLeadConfig):

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
        common = cls.common_fields(gguf, md, _GATING, overrides)
        return cls(
            **common,
            attention=AttentionConfig(
                n_head=n_head, n_head_kv=md.int("attention.head_count_kv", n_head), head_dim=head_dim,
                rope=rope_from_metadata(gguf.metadata, ARCH, rope_dim, neox=True,
                                        n_ctx_train=common["n_ctx_train"]),
                kq_scale=1.0 / math.sqrt(head_dim), norm_eps=common["rms_eps"]),
        )


def load_weights(gguf: GGUFModelFile, cfg: Glm4MoeConfig) -> ModelWeights:
    pick = TensorPicker(gguf, ignore=cfg.is_nextn_tensor)
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
        layers.append(LayerWeights(pick.take(p + "attn_norm.weight", (H,)), attn,
                                   pick.take(p + "post_attention_norm.weight", (H,)),
                                   take_dense_or_moe(pick, cfg, i, require_bias=True)))
    pick.check_all_used()
    return ModelWeights(embd, layers, out_norm, out)


def forward_layer(cfg: Glm4MoeConfig, i: int, w: LayerWeights, x, cache, positions, deq):
    return pre_norm_block(cfg, w, x, lambda h: gqa_attention(cfg.attention, w.attn, h, cache, positions, deq), deq)
