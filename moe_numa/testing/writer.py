"""Random-weight GGUF models with real architectures, metadata and tokenizers.

Every file is deterministic from (preset, quant type, seed), is written in a
stream (a tensor at a time, so multi-GiB bench models need little memory), and
loads in llama.cpp as well as here. Presets:

- `qwen3moe`, `qwen2moe`: tiny Qwen MoE models (Qwen2 vocabulary);
- `deepseek-v3`: MLA with q LoRA and split k_b/v_b, sigmoid gating with groups,
  score bias, normalised and scaled weights, a leading dense layer, YaRN;
- `deepseek-v2-lite`: MLA without q LoRA and the older merged attn_kv_b, softmax
  gating, two shared experts;
- `glm4moe`: GLM-4.5 (GQA with q/k/v biases, q/k norms, half-head RoPE; sigmoid
  routing with score bias, a shared expert, a leading dense layer, one NextN layer);
- `kimi-k2`, `moonlight`: DeepSeek-V3's architecture with 384 / 64 experts;
- `qwen3moe-bench`, `deepseek-v3-bench`: realistic proportions for benchmarks.

`routing_skew` > 0 gives every MoE layer a Zipf-like expert popularity (see
_skew_bias): one hidden dimension of the token embeddings carries a large
constant, as real models' "massive activations" do, and each router row reads
it with a weight that adds the expert's log-popularity to its logit; DeepSeek's
score-correction bias gets the same ranking.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

from .. import quants
from ..errors import UnsupportedError
from . import kquants
from .vocab import VocabSpec, add_vocab, deepseek_v3_vocab, qwen2_vocab

QTYPES = {
    "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
    "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "iq4_nl": Q.IQ4_NL, "iq4_xs": Q.IQ4_XS,
    "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K, "q2_k": Q.Q2_K, "q3_k": Q.Q3_K,
    "iq2_xxs": Q.IQ2_XXS, "iq2_xs": Q.IQ2_XS, "iq2_s": Q.IQ2_S, "iq3_xxs": Q.IQ3_XXS, "iq3_s": Q.IQ3_S,
    "iq1_s": Q.IQ1_S,
    "q4_k_m": Q.Q4_K,   # a mix: Q4_K, with Q6_K for output and some attn_v / ffn_down
}
_FILE_TYPE = {   # llama_ftype
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k": 12,
    "q4_k": 14, "q4_k_m": 15, "q5_k": 16, "q6_k": 18, "iq2_xxs": 19, "iq2_xs": 20, "iq3_xxs": 23,
    "iq1_s": 24, "iq4_nl": 25, "iq3_s": 26, "iq2_s": 28, "iq4_xs": 30, "bf16": 32,
}
# llama-quantize's per-tensor fallback when a row is not a multiple of the type's block
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q2_K: Q.IQ4_NL, Q.Q3_K: Q.IQ4_NL,
             Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL, Q.IQ3_XXS: Q.IQ4_NL,
             Q.IQ3_S: Q.IQ4_NL, Q.IQ1_S: Q.IQ4_NL, Q.IQ4_XS: Q.IQ4_NL}


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    vocab: str                    # "qwen2", "qwen3" (Qwen2 BPE, Qwen3 specials/template) or "deepseek-v3"
    n_vocab_regular: int          # regular BPE tokens kept from the real vocabulary (0: all)
    hidden: int
    n_layer: int
    n_head: int
    n_head_kv: int                # split attn_k_b/attn_v_b (MLA as MQA over the latent): 1, as converters write
    head_dim: int
    n_expert: int
    n_used: int
    expert_ff: int
    context_length: int = 4096
    rope_base: float = 1e6
    rms_eps: float = 1e-6
    # Qwen2-MoE
    shared_ff: int = 0
    qkv_bias: bool = False
    # DeepSeek2
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope: int = 0
    qk_rope: int = 0
    v_head: int = 0
    n_dense_lead: int = 0
    dense_ff: int = 0
    n_shared: int = 0
    gating: int = 1               # 1 softmax, 2 sigmoid
    norm_weights: bool = False
    weights_scale: float = 1.0
    n_groups: int = 0
    n_groups_used: int = 0
    probs_bias: bool = False
    split_kv_b: bool = True
    yarn: tuple[float, int, float] | None = None   # (factor, original ctx, mscale_all_dim)
    # GLM-4.5 (GQA with the DeepSeek-style router and leading dense layers)
    rope_dims: int = 0            # rotated dims per head (0: all of head_dim)
    qk_norm: bool = False         # per-head q/k RMSNorm (always on for qwen3moe)
    n_nextn: int = 0              # trailing multi-token-prediction layers (written, not run)
    routing_skew: float = 0.0     # Zipf exponent of per-layer expert popularity (0: uniform)
    extra: dict = field(default_factory=dict)


# The test presets are small (hidden 256, a few layers): the tests write them in every quant type.
_QWEN3 = ModelSpec(arch="qwen3moe", vocab="qwen3", n_vocab_regular=6000, hidden=256, n_layer=2, n_head=8,
                   n_head_kv=2, head_dim=64, n_expert=8, n_used=2, expert_ff=256)
# DeepSeek-V3's MLA (q LoRA, split attn_k_b/attn_v_b), sigmoid router with groups and score bias.
_DEEPSEEK_V3 = ModelSpec(
    arch="deepseek2", vocab="deepseek-v3", n_vocab_regular=6000, hidden=256, n_layer=3, n_head=4,
    n_head_kv=1, head_dim=0, n_expert=16, n_used=4, expert_ff=256, rope_base=10000.0,
    q_lora_rank=256, kv_lora_rank=256, qk_nope=64, qk_rope=32, v_head=64, n_dense_lead=1, dense_ff=512,
    n_shared=1, gating=2, norm_weights=True, weights_scale=2.5, n_groups=4, n_groups_used=2,
    probs_bias=True, split_kv_b=True, yarn=(4.0, 1024, 1.0))
# Kimi-K2 / Moonlight: DeepSeek-V3's architecture (deepseek2), 384 / 64 experts, one expert group.
_KIMI = replace(_DEEPSEEK_V3, n_layer=2, n_expert=384, n_used=8, expert_ff=32, rope_base=50000.0,
                q_lora_rank=128, kv_lora_rank=128, weights_scale=2.827, n_groups=1, n_groups_used=1,
                yarn=(32.0, 4096, 1.0))

PRESETS: dict[str, ModelSpec] = {
    "qwen3moe": _QWEN3,
    "qwen2moe": replace(_QWEN3, arch="qwen2moe", vocab="qwen2", n_head=4, shared_ff=512, qkv_bias=True),
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-v2-lite": replace(   # no q LoRA, merged attn_kv_b, softmax router without groups
        _DEEPSEEK_V3, n_head_kv=4, q_lora_rank=0, n_shared=2, gating=1, norm_weights=False, weights_scale=1.0,
        n_groups=0, n_groups_used=0, probs_bias=False, split_kv_b=False, yarn=(40.0, 512, 0.707)),
    "glm4moe": replace(   # GQA with DeepSeek's router and leading dense layer, partial RoPE, NextN layer
        _QWEN3, arch="glm4moe", n_layer=3, n_expert=16, n_used=4, n_dense_lead=1, dense_ff=512, n_shared=1,
        gating=2, norm_weights=True, weights_scale=2.5, probs_bias=True, qkv_bias=True, rope_dims=32,
        qk_norm=True, n_nextn=1),
    "kimi-k2": _KIMI,
    "moonlight": replace(_KIMI, n_expert=64, n_used=6, expert_ff=64, q_lora_rank=0, n_shared=2,
                         weights_scale=2.446, yarn=None),
    # Benchmark models: realistic proportions that fit a 24 GiB machine.
    "qwen3moe-bench": replace(_QWEN3, n_vocab_regular=0, hidden=2048, n_layer=24, n_head=32, n_head_kv=4,
                              head_dim=128, n_expert=64, n_used=8, expert_ff=512, context_length=32768),
    "deepseek-v3-bench": replace(
        _DEEPSEEK_V3, n_vocab_regular=0, hidden=2048, n_layer=16, n_head=16, n_expert=64, n_used=6,
        expert_ff=768, context_length=32768, q_lora_rank=768, kv_lora_rank=512, qk_nope=128, qk_rope=64,
        v_head=128, dense_ff=5632, n_shared=2, n_groups=8, n_groups_used=4, yarn=(40.0, 4096, 1.0)),
}


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]        # numpy order
    qtype: Q
    make: Callable[[np.random.Generator], np.ndarray]   # float32 values of `shape`


def _rng_for(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _normal(shape, std, mean=0.0):
    return lambda rng: (rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean))


def _matrix(shape, gain=1.0):
    return _normal(shape, gain / math.sqrt(shape[-1]))


def _tensor_qtype(name: str, shape: tuple[int, ...], qname: str, layer: int | None, n_layer: int) -> Q:
    """Per-tensor type for a file of type `qname`, with llama-quantize-like rules:
    1-D tensors and routers stay F32; a type whose block does not divide the row
    falls back as llama-quantize does (Q4_K -> Q5_0, Q6_K -> Q8_0, low-bit types ->
    IQ4_NL, ...), then to F16."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") or name.endswith("ffn_gate_inp_shexp.weight"):
        return Q.F32
    want = QTYPES[qname]
    if qname == "q4_k_m":
        more_bits = layer is not None and (layer < n_layer // 8 or layer >= 7 * n_layer // 8
                                           or (layer - n_layer // 8) % 3 == 2)
        if name == "output.weight" or (more_bits and any(k in name for k in ("attn_v.", "ffn_down"))):
            want = Q.Q6_K
    for candidate in (want, _FALLBACK.get(want, Q.Q8_0), Q.F16):
        block, _ = quants.block_size(candidate)
        if shape[-1] % block == 0:
            return candidate
    return Q.F32


SKEW_DIM, SKEW_MAGNITUDE = 0, 8.0     # the embedding dimension that carries the constant, and its value


def _skew_bias(spec: ModelSpec, layer: int) -> np.ndarray:
    """Per-expert logit offsets of one layer: -s * log(rank), ranks a per-layer permutation,
    centred; softmax over offsets alone gives popularity proportional to rank**-s."""
    rng = _rng_for(0, f"skew:{layer}")
    rank = rng.permutation(spec.n_expert) + 1
    b = -spec.routing_skew * np.log(rank)
    return (b - b.mean()).astype(np.float32)


def _skewed_router(spec: ModelSpec, layer: int, shape):
    base = _matrix(shape, 2.0)
    H = spec.hidden
    # after RMSNorm the constant dimension is about M / sqrt(1 + M^2 / H) (other dims ~N(0, 1))
    x_const = SKEW_MAGNITUDE / math.sqrt(1.0 + SKEW_MAGNITUDE ** 2 / H)

    def make(rng):
        w = base(rng)
        w[:, SKEW_DIM] = _skew_bias(spec, layer) / x_const
        return w
    return make


def _skewed_embeddings(shape):
    base = _normal(shape, 1.0)

    def make(rng):
        e = base(rng)
        e[:, SKEW_DIM] = SKEW_MAGNITUDE
        return e
    return make


def plan_tensors(spec: ModelSpec, n_vocab: int, qname: str) -> list[TensorPlan]:
    H, L = spec.hidden, spec.n_layer
    items: list[tuple[str, tuple[int, ...], Callable, int | None]] = []

    def add(name, shape, make, layer=None):
        items.append((name, tuple(shape), make, layer))

    skew = spec.routing_skew > 0
    add("token_embd.weight", (n_vocab, H), _skewed_embeddings((n_vocab, H)) if skew else _normal((n_vocab, H), 1.0))
    add("output_norm.weight", (H,), _normal((H,), 0.1, 1.0))
    add("output.weight", (n_vocab, H), _matrix((n_vocab, H), 4.0))
    ffn_norm = "post_attention_norm" if spec.arch == "glm4moe" else "ffn_norm"
    for i in range(L + spec.n_nextn):
        p = f"blk.{i}."
        if i >= L:   # a NextN layer: its own input projection and norms, then a normal MoE layer
            add(p + "nextn.eh_proj.weight", (H, 2 * H), _matrix((H, 2 * H)), i)
            for name in ("enorm", "hnorm", "shared_head_norm"):
                add(p + f"nextn.{name}.weight", (H,), _normal((H,), 0.1, 1.0), i)
        add(p + "attn_norm.weight", (H,), _normal((H,), 0.1, 1.0), i)
        add(p + ffn_norm + ".weight", (H,), _normal((H,), 0.1, 1.0), i)
        if spec.arch != "deepseek2":
            q_dim, kv_dim = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
            add(p + "attn_q.weight", (q_dim, H), _matrix((q_dim, H)), i)
            add(p + "attn_k.weight", (kv_dim, H), _matrix((kv_dim, H)), i)
            add(p + "attn_v.weight", (kv_dim, H), _matrix((kv_dim, H)), i)
            add(p + "attn_output.weight", (H, q_dim), _matrix((H, q_dim)), i)
            if spec.qkv_bias:
                for n, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                    add(p + f"attn_{n}.bias", (d,), _normal((d,), 0.1), i)
            if spec.arch == "qwen3moe" or spec.qk_norm:
                add(p + "attn_q_norm.weight", (spec.head_dim,), _normal((spec.head_dim,), 0.1, 1.0), i)
                add(p + "attn_k_norm.weight", (spec.head_dim,), _normal((spec.head_dim,), 0.1, 1.0), i)
        else:
            q_head = spec.qk_nope + spec.qk_rope
            if spec.q_lora_rank:
                add(p + "attn_q_a.weight", (spec.q_lora_rank, H), _matrix((spec.q_lora_rank, H)), i)
                add(p + "attn_q_a_norm.weight", (spec.q_lora_rank,), _normal((spec.q_lora_rank,), 0.1, 1.0), i)
                add(p + "attn_q_b.weight", (spec.n_head * q_head, spec.q_lora_rank),
                    _matrix((spec.n_head * q_head, spec.q_lora_rank)), i)
            else:
                add(p + "attn_q.weight", (spec.n_head * q_head, H), _matrix((spec.n_head * q_head, H)), i)
            kva = spec.kv_lora_rank + spec.qk_rope
            add(p + "attn_kv_a_mqa.weight", (kva, H), _matrix((kva, H)), i)
            add(p + "attn_kv_a_norm.weight", (spec.kv_lora_rank,), _normal((spec.kv_lora_rank,), 0.1, 1.0), i)
            if spec.split_kv_b:
                kb = (spec.n_head, spec.kv_lora_rank, spec.qk_nope)
                vb = (spec.n_head, spec.v_head, spec.kv_lora_rank)
                add(p + "attn_k_b.weight", kb, _normal(kb, 1.0 / math.sqrt(spec.qk_nope)), i)
                add(p + "attn_v_b.weight", vb, _matrix(vb), i)
            else:
                kvb = (spec.n_head * (spec.qk_nope + spec.v_head), spec.kv_lora_rank)
                add(p + "attn_kv_b.weight", kvb, _matrix(kvb), i)
            add(p + "attn_output.weight", (H, spec.n_head * spec.v_head), _matrix((H, spec.n_head * spec.v_head)), i)
        if i < spec.n_dense_lead:
            ff = spec.dense_ff
            add(p + "ffn_gate.weight", (ff, H), _matrix((ff, H)), i)
            add(p + "ffn_up.weight", (ff, H), _matrix((ff, H)), i)
            add(p + "ffn_down.weight", (H, ff), _matrix((H, ff)), i)
            continue
        E, ff = spec.n_expert, spec.expert_ff
        add(p + "ffn_gate_inp.weight", (E, H), _skewed_router(spec, i, (E, H)) if skew else _matrix((E, H), 2.0), i)
        add(p + "ffn_gate_exps.weight", (E, ff, H), _matrix((E, ff, H)), i)
        add(p + "ffn_up_exps.weight", (E, ff, H), _matrix((E, ff, H)), i)
        add(p + "ffn_down_exps.weight", (E, H, ff), _matrix((E, H, ff)), i)
        if spec.probs_bias:
            # sigmoid scores sit in (0, 1): the bias ranks experts like the router's offsets
            add(p + "exp_probs_b.bias", (E,), (lambda rng, i=i: 0.05 * _skew_bias(spec, i)) if skew else
                _normal((E,), 0.1), i)
        shared_ff = spec.shared_ff or spec.expert_ff * spec.n_shared
        if shared_ff:
            add(p + "ffn_gate_shexp.weight", (shared_ff, H), _matrix((shared_ff, H)), i)
            add(p + "ffn_up_shexp.weight", (shared_ff, H), _matrix((shared_ff, H)), i)
            add(p + "ffn_down_shexp.weight", (H, shared_ff), _matrix((H, shared_ff)), i)
        if spec.arch == "qwen2moe":
            add(p + "ffn_gate_inp_shexp.weight", (H,), _normal((H,), 1.0 / math.sqrt(H)), i)
    return [TensorPlan(n, s, _tensor_qtype(n, s, qname, layer, L), make) for n, s, make, layer in items]


def _write_metadata(w: gguf.GGUFWriter, spec: ModelSpec, vocab: VocabSpec, qname: str, name: str) -> None:
    w.add_name(name)
    w.add_uint32("general.file_type", _FILE_TYPE[qname])
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    write_hparams(w, spec, len(vocab.tokens))
    add_vocab(w, vocab)


def write_hparams(w: gguf.GGUFWriter, spec: ModelSpec, n_vocab: int) -> None:
    """The `{arch}.*` hyper-parameters of `spec`, as the converter writes them."""
    a = spec.arch
    u32 = {"context_length": spec.context_length, "embedding_length": spec.hidden,
           "block_count": spec.n_layer + spec.n_nextn, "attention.head_count": spec.n_head,
           "attention.head_count_kv": spec.n_head_kv, "expert_count": spec.n_expert, "expert_used_count": spec.n_used,
           "expert_feed_forward_length": spec.expert_ff, "vocab_size": n_vocab}
    f32 = {"attention.layer_norm_rms_epsilon": spec.rms_eps, "rope.freq_base": spec.rope_base}
    if a in ("qwen2moe", "qwen3moe", "glm4moe"):   # GQA
        u32["attention.key_length"] = u32["attention.value_length"] = spec.head_dim
    if a in ("qwen2moe", "qwen3moe"):
        u32["feed_forward_length"] = spec.shared_ff or spec.expert_ff * spec.n_used
        if spec.shared_ff:
            u32["expert_shared_feed_forward_length"] = spec.shared_ff
    else:   # DeepSeek's router, leading dense layers and shared experts (deepseek2, glm4moe)
        u32.update(leading_dense_block_count=spec.n_dense_lead, feed_forward_length=spec.dense_ff,
                   expert_shared_count=spec.n_shared, expert_gating_func=spec.gating)
        f32["expert_weights_scale"] = spec.weights_scale
        w.add_bool(f"{a}.expert_weights_norm", spec.norm_weights)
        if spec.n_nextn:
            u32["nextn_predict_layers"] = spec.n_nextn
    if a == "glm4moe":
        u32["rope.dimension_count"] = spec.rope_dims or spec.head_dim
    elif a == "deepseek2":
        u32["attention.q_lora_rank"] = spec.q_lora_rank
        u32["attention.kv_lora_rank"] = spec.kv_lora_rank
        if spec.split_kv_b:
            u32["attention.key_length"] = spec.kv_lora_rank + spec.qk_rope
            u32["attention.value_length"] = spec.kv_lora_rank
            u32["attention.key_length_mla"] = spec.qk_nope + spec.qk_rope
            u32["attention.value_length_mla"] = spec.v_head
        else:
            u32["attention.key_length"] = spec.qk_nope + spec.qk_rope
            u32["attention.value_length"] = spec.v_head
        u32["rope.dimension_count"] = spec.qk_rope
    if spec.n_groups:
        u32["expert_group_count"] = spec.n_groups
        u32["expert_group_used_count"] = spec.n_groups_used
    if spec.yarn:
        factor, orig_ctx, mscale_all_dim = spec.yarn
        w.add_string(f"{a}.rope.scaling.type", "yarn")
        f32["rope.scaling.factor"] = factor
        u32["rope.scaling.original_context_length"] = orig_ctx
        if a == "deepseek2":
            f32["rope.scaling.yarn_log_multiplier"] = 0.1 * mscale_all_dim
    for key, value in u32.items():
        w.add_uint32(f"{a}.{key}", value)
    for key, value in f32.items():
        w.add_float32(f"{a}.{key}", value)
    for key, value in spec.extra.items():
        w.add_key_value(key, *value)


# Rows of the embedding in real full-vocabulary files (the tokenizer pads to them).
_FULL_ROWS = {"qwen2": 151936, "qwen3": 151936, "deepseek-v3": 129280}


def make_vocab(spec: ModelSpec) -> VocabSpec:
    n = spec.n_vocab_regular or None
    pad = None if n else _FULL_ROWS[spec.vocab]
    if spec.vocab in ("qwen2", "qwen3"):
        return qwen2_vocab(n, flavor=spec.vocab, pad_to=pad)
    return deepseek_v3_vocab(n, pad_to=pad)


def make_test_model(path: str | os.PathLike[str], preset: str = "qwen3moe", qtype: str = "f32", seed: int = 0,
                    spec: ModelSpec | None = None, split_max_tensors: int = 0,
                    progress: Callable[[int, int], None] | None = None,
                    tensor_types: dict[str, str | int] | None = None) -> Path:
    """Write a random-weight GGUF model and return its path (the first file if split).

    `spec` overrides the preset (use `dataclasses.replace(PRESETS[p], ...)`);
    `split_max_tensors` > 0 writes a split model (`-00001-of-0000N.gguf` files);
    `tensor_types` gives tensors their own type ({"blk.0.attn_q.weight": "Q5_K"}), as
    llama-quantize's mixes do.
    """
    if spec is None:
        if preset not in PRESETS:
            raise UnsupportedError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        spec = PRESETS[preset]
    qname = qtype.lower()
    if qname not in QTYPES:
        raise UnsupportedError(f"unknown quant type {qtype!r}; choose from {', '.join(QTYPES)}")
    vocab = make_vocab(spec)
    plans = plan_tensors(spec, len(vocab.tokens), qname)
    if tensor_types:
        plans = _override_types(plans, tensor_types)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer_path = path
    if split_max_tensors:
        # GGUFWriter names split files itself from a path without the suffix numbering.
        stem = path.name[:-5] if path.name.endswith(".gguf") else path.name
        writer_path = path.with_name(stem + ".gguf")
    w = gguf.GGUFWriter(writer_path, spec.arch, split_max_tensors=split_max_tensors)
    _write_metadata(w, spec, vocab, qname, f"moe_numa {preset} {qname} seed {seed}")
    encoded_shapes = []
    for p in plans:
        nbytes, byte_shape, dtype = _encoded_layout(p)
        encoded_shapes.append(nbytes)
        w.add_tensor_info(p.name, byte_shape, dtype, nbytes, raw_dtype=None if p.qtype in (Q.F32, Q.F16) else p.qtype)
    w.write_header_to_file(writer_path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for k, p in enumerate(plans):
        rng = _rng_for(seed, p.name)
        data = kquants.encode(p.make(rng), p.qtype, rng)
        assert data.nbytes == encoded_shapes[k], p.name
        w.write_tensor_data(data)
        if progress:
            progress(k + 1, len(plans))
    w.close()
    if split_max_tensors:
        first = sorted(writer_path.parent.glob(f"{writer_path.stem}-00001-of-*.gguf"))
        return first[0] if first else writer_path
    return writer_path


def _override_types(plans: list[TensorPlan], tensor_types: dict[str, str | int]) -> list[TensorPlan]:
    known = {p.name for p in plans}
    unknown = sorted(set(tensor_types) - known)
    if unknown:
        raise UnsupportedError(f"tensor_types names tensor(s) the model does not have: {', '.join(unknown[:5])}")
    out = []
    for p in plans:
        t = tensor_types.get(p.name)
        if t is not None:
            t = Q[t.upper()] if isinstance(t, str) else Q(int(t))
            block, _ = gguf.GGML_QUANT_SIZES[t]
            if p.shape[-1] % block:
                raise UnsupportedError(f"tensor_types: {p.name} has rows of {p.shape[-1]}, not a multiple of the "
                                       f"{t.name} block of {block}")
            p = replace(p, qtype=t)
        out.append(p)
    return out


def _encoded_layout(p: TensorPlan) -> tuple[int, tuple[int, ...], np.dtype]:
    if p.qtype == Q.F32:
        return int(np.prod(p.shape)) * 4, p.shape, np.dtype(np.float32)
    if p.qtype == Q.F16:
        return int(np.prod(p.shape)) * 2, p.shape, np.dtype(np.float16)
    block, size = quants.block_size(p.qtype)
    byte_shape = (*p.shape[:-1], p.shape[-1] // block * size)
    return int(np.prod(byte_shape)), byte_shape, np.dtype(np.uint8)


def variant(preset: str, **changes) -> ModelSpec:
    return replace(PRESETS[preset], **changes)
