"""DeepSeek-V2 / V2-Lite / V3 / R1 (GGUF arch `deepseek2`): multi-head latent
attention with non-NeoX RoPE and YaRN, leading dense FFN layers, then MoE
layers with shared experts, softmax or sigmoid gating, group-limited top-k,
the score-correction bias, and weight normalisation and scaling.

Choices where files or implementations disagree (see docs/architecture.md):
- group scoring follows llama.cpp (sum of each group's top-2 scores) for every
  file; `router_group_rule="max"` selects DeepSeek-V2's original rule;
- files without `expert_gating_func` use softmax, as llama.cpp does;
- multi-token-prediction layers (`nextn_predict_layers`) are not loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UnsupportedError
from ..gguf_file import GGUFModelFile
from ..layers.mla import MLAConfig, MLAWeights, mla_attention
from ..layers.moe import GATING_SIGMOID, GATING_SOFTMAX
from ..layers.rope import rope_from_metadata
from .base import (DenseLeadConfig, LayerWeights, MetadataReader, ModelWeights, load_layers, pre_norm_block,
                   take_dense_or_moe)

ARCH = "deepseek2"
_GATING = {0: GATING_SOFTMAX, 1: GATING_SOFTMAX, 2: GATING_SIGMOID}


@dataclass(frozen=True)
class DeepSeek2Config(DenseLeadConfig):
    split_kv_b: bool = True      # attn_k_b / attn_v_b (newer files) rather than attn_kv_b

    @classmethod
    def from_gguf(cls, gguf: GGUFModelFile, **overrides) -> "DeepSeek2Config":
        md = MetadataReader(gguf, ARCH)
        hidden = md.int("embedding_length")
        n_head = md.int("attention.head_count")
        if md.float("attention.temperature_scale", 0.0) != 0.0:
            raise UnsupportedError(f"{gguf.path}: {ARCH}.attention.temperature_scale (attention temperature "
                                   f"tuning) is not supported")
        split = md.has("attention.key_length_mla") and md.has("attention.value_length_mla")
        key_len = md.int("attention.key_length", hidden // n_head)
        val_len = md.int("attention.value_length", hidden // n_head)
        q_head = md.int("attention.key_length_mla") if split else key_len
        v_head = md.int("attention.value_length_mla") if split else val_len
        rope_dim = md.int("rope.dimension_count", key_len)
        if not 0 < rope_dim < q_head or rope_dim % 2:
            raise UnsupportedError(f"{gguf.path}: rope.dimension_count {rope_dim} must be even and smaller "
                                   f"than the query head size {q_head}")
        common = cls.common_fields(gguf, md, _GATING, overrides)
        n_ctx, eps = common["n_ctx_train"], common["rms_eps"]
        # The converter stores 0.1 * mscale_all_dim; llama.cpp divides it back out.
        log_mul = md.float("rope.scaling.yarn_log_multiplier", 0.0) / 0.1
        rope = rope_from_metadata(gguf.metadata, ARCH, rope_dim, neox=False, n_ctx_train=n_ctx,
                                  yarn_log_mul=log_mul)
        # YaRN's magnitude correction goes into the softmax scale (llama.cpp's deepseek2 graph).
        ln_inv_scale = math.log(1.0 / rope.freq_scale)
        mscale = rope.attn_factor * (1.0 + 0.1 * ln_inv_scale) * (1.0 + 0.1 * log_mul * ln_inv_scale)
        return cls(
            **common, split_kv_b=split,
            attention=MLAConfig(
                n_head=n_head, q_lora_rank=md.int("attention.q_lora_rank", 0),
                kv_lora_rank=md.int("attention.kv_lora_rank"), qk_nope_dim=q_head - rope_dim,
                qk_rope_dim=rope_dim, v_head_dim=v_head, rope=rope,
                kq_scale=mscale * mscale / math.sqrt(q_head), norm_eps=eps),
        )


def load_weights(gguf: GGUFModelFile, cfg: DeepSeek2Config) -> ModelWeights:
    a, H = cfg.attention, cfg.hidden
    q_rows, lora = a.n_head * a.q_head_dim, a.q_lora_rank > 0

    def layer(pick, i, p):
        attn = MLAWeights(
            wkv_a=pick.take(p + "attn_kv_a_mqa.weight", (a.kv_lora_rank + a.qk_rope_dim, H)),
            kv_a_norm=pick.take(p + "attn_kv_a_norm.weight", (a.kv_lora_rank,)),
            wo=pick.take(p + "attn_output.weight", (H, a.n_head * a.v_head_dim)),
            wq=None if lora else pick.take(p + "attn_q.weight", (q_rows, H)),
            wq_a=pick.take(p + "attn_q_a.weight", (a.q_lora_rank, H)) if lora else None,
            q_a_norm=pick.take(p + "attn_q_a_norm.weight", (a.q_lora_rank,)) if lora else None,
            wq_b=pick.take(p + "attn_q_b.weight", (q_rows, a.q_lora_rank)) if lora else None,
            wk_b=pick.take(p + "attn_k_b.weight", (a.n_head, a.kv_lora_rank, a.qk_nope_dim))
            if cfg.split_kv_b else None,
            wv_b=pick.take(p + "attn_v_b.weight", (a.n_head, a.v_head_dim, a.kv_lora_rank))
            if cfg.split_kv_b else None,
            wkv_b=None if cfg.split_kv_b else pick.take(
                p + "attn_kv_b.weight", (a.n_head * (a.qk_nope_dim + a.v_head_dim), a.kv_lora_rank)),
        )
        return attn, take_dense_or_moe(pick, cfg, i)
    return load_layers(gguf, cfg, layer, ignore=cfg.is_nextn_tensor)


def forward_layer(cfg: DeepSeek2Config, i: int, w: LayerWeights, x, cache, positions, deq):
    return pre_norm_block(cfg, w, x, lambda h: mla_attention(cfg.attention, w.attn, h, cache, positions, deq), deq)
