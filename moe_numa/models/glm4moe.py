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
from dataclasses import dataclass

from ..errors import UnsupportedError
from ..gguf_file import GGUFModelFile
from ..layers.attention import gqa_attention
from ..layers.moe import GATING_SIGMOID, GATING_SOFTMAX
from .base import (DenseLeadConfig, LayerWeights, MetadataReader, ModelWeights, gqa_config, load_layers,
                   pre_norm_block, take_dense_or_moe, take_gqa)

ARCH = "glm4moe"
_GATING = {0: GATING_SIGMOID, 1: GATING_SOFTMAX, 2: GATING_SIGMOID}   # 0 (absent): llama.cpp's sigmoid


@dataclass(frozen=True)
class Glm4MoeConfig(DenseLeadConfig):

    @classmethod
    def from_gguf(cls, gguf: GGUFModelFile, **overrides) -> "Glm4MoeConfig":
        md = MetadataReader(gguf, ARCH)
        if md.has("rope.dimension_sections"):
            raise UnsupportedError(f"{gguf.path}: {ARCH} with M-RoPE sections (a vision model) is not supported")
        attention = gqa_config(gguf, md)
        rope_dim, head_dim = attention.rope.n_dims, attention.head_dim
        if not 0 < rope_dim <= head_dim or rope_dim % 2:
            raise UnsupportedError(f"{gguf.path}: rope.dimension_count {rope_dim} must be even and at most "
                                   f"the head size {head_dim}")
        return cls(**cls.common_fields(gguf, md, _GATING, overrides), attention=attention)


def load_weights(gguf: GGUFModelFile, cfg: Glm4MoeConfig) -> ModelWeights:
    a = cfg.attention

    def layer(pick, i, p):
        attn = take_gqa(pick, p, a, cfg.hidden, biases=True)
        attn = dataclasses.replace(attn, q_norm=pick.maybe(p + "attn_q_norm.weight", (a.head_dim,)),
                                   k_norm=pick.maybe(p + "attn_k_norm.weight", (a.head_dim,)))
        if (attn.q_norm is None) != (attn.k_norm is None):
            raise UnsupportedError(f"{gguf.path}: layer {i} has only one of attn_q_norm / attn_k_norm")
        return attn, take_dense_or_moe(pick, cfg, i, require_bias=True)
    return load_layers(gguf, cfg, layer, ffn_norm="post_attention_norm", ignore=cfg.is_nextn_tensor)


def forward_layer(cfg: Glm4MoeConfig, i: int, w: LayerWeights, x, cache, positions, deq):
    return pre_norm_block(cfg, w, x, lambda h: gqa_attention(cfg.attention, w.attn, h, cache, positions, deq), deq)
