"""What every architecture shares: the config base, the weight structures of a
pre-norm MoE transformer, tensor lookup with shape checks, and the reference
forward pass that runs an architecture's layer code over a KV cache.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

from ..errors import GGUFError, UnsupportedError
from ..gguf_file import GGUFModelFile, Tensor, metadata_value
from ..layers.attention import AttentionConfig, GQAWeights
from ..layers.ffn import FFNWeights, swiglu
from ..layers.kv_cache import KVCache
from ..layers.mla import MLAConfig, MLAWeights
from ..layers.moe import MoEWeights, RouterConfig, moe_block
from ..layers.norm import rms_norm
from ..layers.rope import rope_from_metadata
from ..layers.split import REPLICATED, VOCAB, split
from ..layers.weights import Dequantizer


@dataclass(frozen=True)
class ModelConfig:
    """Fields every supported architecture has. Subclasses add their own."""
    arch: str
    name: str
    n_vocab: int
    n_ctx_train: int
    hidden: int
    n_layer: int
    rms_eps: float
    router: RouterConfig
    expert_ff: int
    attention: Union[AttentionConfig, MLAConfig]

    @property
    def n_expert(self) -> int:
        return self.router.n_expert

    def is_moe_layer(self, i: int) -> bool:
        return True

    @staticmethod
    def base_fields(gguf: GGUFModelFile, md: "MetadataReader", n_layer: int | None = None) -> dict:
        """The fields every architecture reads alike: names, vocabulary, sizes, layer count."""
        return dict(arch=md.arch, name=str(gguf.get("general.name", md.arch)), n_vocab=vocab_size(gguf),
                    n_ctx_train=md.int("context_length"), hidden=md.int("embedding_length"),
                    n_layer=md.int("block_count") if n_layer is None else n_layer,
                    rms_eps=md.float("attention.layer_norm_rms_epsilon"))

    def cache_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        return [self.attention.cache_shapes() for _ in range(self.n_layer)]


@dataclass(frozen=True)
class DenseLeadConfig(ModelConfig):
    """Leading dense FFN layers, then MoE layers with `n_shared` shared experts of the
    routed experts' size (DeepSeek-V2/V3, GLM-4.5); `n_nextn` multi-token-prediction
    layers after the `n_layer` that run, stored in the file but never run or loaded."""
    n_dense_lead: int = 0
    dense_ff: int = 0
    n_shared: int = 0
    n_nextn: int = 0

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.n_dense_lead

    @staticmethod
    def common_fields(gguf: GGUFModelFile, md: "MetadataReader", gating: dict[int, str],
                      overrides: dict) -> dict:
        """The fields these architectures read alike: sizes, layer counts (NextN layers
        off `block_count`), the router (`expert_gating_func` through `gating`, weight
        normalisation and scale, groups) and the dense / shared FFN sizes."""
        gating_id = md.int("expert_gating_func", 0)
        if gating_id not in gating:
            raise UnsupportedError(f"{gguf.path}: {md.key('expert_gating_func')} = {gating_id} is not "
                                   f"supported (1 softmax, 2 sigmoid)")
        n_nextn = md.int("nextn_predict_layers", 0)
        n_dense = md.int("leading_dense_block_count", 0)
        return dict(
            **ModelConfig.base_fields(gguf, md, md.int("block_count") - n_nextn),
            router=RouterConfig(
                n_expert=md.int("expert_count"), n_used=md.int("expert_used_count"), gating=gating[gating_id],
                norm_weights=md.bool("expert_weights_norm", False),
                weights_scale=md.float("expert_weights_scale", 0.0),
                n_groups=md.int("expert_group_count", 0), n_groups_used=md.int("expert_group_used_count", 0),
                **overrides),
            expert_ff=md.int("expert_feed_forward_length"),
            n_dense_lead=n_dense, dense_ff=md.int("feed_forward_length", 0 if n_dense == 0 else None),
            n_shared=md.int("expert_shared_count", 0), n_nextn=n_nextn)

    def is_nextn_tensor(self, name: str) -> bool:
        m = re.match(r"blk\.(\d+)\.", name)
        return m is not None and self.n_layer <= int(m.group(1)) < self.n_layer + self.n_nextn

    @property
    def shared_ff(self) -> int:
        return self.expert_ff * self.n_shared


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Tensor = split(REPLICATED)
    attn: Union[GQAWeights, MLAWeights] = field()   # each declares its own split rules
    ffn_norm: Tensor = split(REPLICATED)
    ffn: Union[FFNWeights, MoEWeights] = field()


@dataclass(frozen=True)
class ModelWeights:
    token_embd: Tensor         # [n_vocab, hidden]: rows read from the file by the caller, never placed
    layers: list[LayerWeights]
    output_norm: Tensor = split(REPLICATED)
    output: Tensor = split(VOCAB)   # [n_vocab, hidden] (token_embd when tied)


class MetadataReader:
    """Typed access to `{arch}.*` keys with errors that name the key."""

    def __init__(self, gguf: GGUFModelFile, arch: str):
        self.gguf, self.arch = gguf, arch

    def key(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"

    def has(self, suffix: str) -> bool:
        return self.key(suffix) in self.gguf.metadata

    def int(self, suffix: str, default: int | None = None) -> int:
        return self._get(suffix, default, "int")

    def float(self, suffix: str, default: float | None = None) -> float:
        return self._get(suffix, default, "float")

    def bool(self, suffix: str, default: bool | None = None) -> bool:
        return self._get(suffix, default, "bool")

    def _get(self, suffix, default, kind):
        value = metadata_value(self.gguf.metadata, self.key(suffix), kind, where=str(self.gguf.path))
        if value is None:
            if default is None:
                raise GGUFError(f"{self.gguf.path}: missing metadata key {self.key(suffix)!r} "
                                f"(required for {self.arch})")
            return default
        return value


def same_ggml_shape(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether ggml sees two shapes (numpy order) as one: it pads a tensor's dims with
    trailing 1s (in its own order, so leading ones here), so `[1, n]` is `[n]`
    (e.g. Qwen2-MoE's `ffn_gate_inp_shexp`, written 2-D by the converter)."""
    def core(s):
        s = tuple(int(d) for d in s)
        while len(s) > 1 and s[0] == 1:
            s = s[1:]
        return s
    return core(a) == core(b)


class TensorPicker:
    """Looks tensors up by name, checks their shapes, and remembers which were used
    so that tensors we do not understand are reported instead of ignored."""

    def __init__(self, gguf: GGUFModelFile, ignore: Callable[[str], bool] = lambda name: False):
        self.gguf = gguf
        self.used: set[str] = set()
        self.ignore = ignore

    def take(self, name: str, shape: tuple[int, ...]) -> Tensor:
        t = self.gguf.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.gguf.path}: missing tensor {name!r} (expected shape {shape})")
        return self._check(t, shape)

    def maybe(self, name: str, shape: tuple[int, ...]) -> Tensor | None:
        t = self.gguf.tensors.get(name)
        return None if t is None else self._check(t, shape)

    def _check(self, t: Tensor, shape: tuple[int, ...]) -> Tensor:
        shape = tuple(int(d) for d in shape)
        if tuple(t.shape) != shape:
            if not same_ggml_shape(t.shape, shape):
                raise GGUFError(f"{self.gguf.path}: tensor {t.name!r} has shape {t.shape} but the metadata "
                                f"implies {shape} (numpy order)")
            t = t.with_shape(shape)
        self.used.add(t.name)
        return t

    def check_all_used(self) -> None:
        unknown = sorted(n for n in self.gguf.tensors if n not in self.used and not self.ignore(n))
        if unknown:
            listed = ", ".join(unknown[:6]) + (" ..." if len(unknown) > 6 else "")
            raise UnsupportedError(f"{self.gguf.path}: unsupported tensor(s) for {self.gguf.architecture}: {listed}")


def take_common(pick: TensorPicker, n_vocab: int, hidden: int) -> tuple[Tensor, Tensor, Tensor]:
    """token_embd, output_norm and output (tied to token_embd when absent)."""
    embd = pick.take("token_embd.weight", (n_vocab, hidden))
    norm = pick.take("output_norm.weight", (hidden,))
    out = pick.maybe("output.weight", (n_vocab, hidden)) or embd
    return embd, norm, out


def vocab_size(gguf: GGUFModelFile) -> int:
    t = gguf.tensors.get("token_embd.weight")
    if t is None or len(t.shape) != 2:
        raise GGUFError(f"{gguf.path}: missing 2-D tensor 'token_embd.weight'")
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != t.shape[0]:
        # llama.cpp accepts a longer embedding than vocab only through vocab_size; keep it strict.
        n = int(gguf.metadata.get(f"{gguf.architecture}.vocab_size", len(tokens)))
        if n != t.shape[0]:
            raise GGUFError(f"{gguf.path}: token_embd.weight has {t.shape[0]} rows but the tokenizer has "
                            f"{len(tokens)} tokens")
    return int(t.shape[0])


def take_moe(pick: TensorPicker, i: int, hidden: int, ff: int, n_expert: int) -> dict[str, Tensor]:
    p = f"blk.{i}."
    return dict(
        router=pick.take(p + "ffn_gate_inp.weight", (n_expert, hidden)),
        gate_exps=pick.take(p + "ffn_gate_exps.weight", (n_expert, ff, hidden)),
        up_exps=pick.take(p + "ffn_up_exps.weight", (n_expert, ff, hidden)),
        down_exps=pick.take(p + "ffn_down_exps.weight", (n_expert, hidden, ff)),
    )


def gqa_config(gguf: GGUFModelFile, md: MetadataReader, rope_dims: int | None = None) -> AttentionConfig:
    """GQA attention from `{arch}.attention.*`: head_dim = key_length (default hidden / n_head),
    which value_length must equal; NeoX RoPE over `rope_dims` (default rope.dimension_count,
    else the whole head); softmax scale 1/sqrt(head_dim)."""
    n_head = md.int("attention.head_count")
    head_dim = md.int("attention.key_length", md.int("embedding_length") // n_head)
    if md.int("attention.value_length", head_dim) != head_dim:
        raise UnsupportedError(f"{gguf.path}: {md.arch} needs attention.key_length == attention.value_length")
    rope_dims = md.int("rope.dimension_count", head_dim) if rope_dims is None else rope_dims
    return AttentionConfig(
        n_head=n_head, n_head_kv=md.int("attention.head_count_kv", n_head), head_dim=head_dim,
        rope=rope_from_metadata(gguf.metadata, md.arch, rope_dims, neox=True, n_ctx_train=md.int("context_length")),
        kq_scale=1.0 / math.sqrt(head_dim), norm_eps=md.float("attention.layer_norm_rms_epsilon"))


def load_layers(gguf: GGUFModelFile, cfg: ModelConfig, layer: Callable, ffn_norm: str = "ffn_norm",
                ignore: Callable[[str], bool] = lambda name: False) -> ModelWeights:
    """The loading loop all our models share: embedding, output norm and head, then per layer
    `layer(pick, i, prefix) -> (attn, ffn)` between `attn_norm` and the FFN's pre-norm
    (`ffn_norm`), then the check that no tensor was left unread (but those `ignore` names)."""
    pick = TensorPicker(gguf, ignore)
    H = cfg.hidden
    embd, out_norm, out = take_common(pick, cfg.n_vocab, H)
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        attn, ffn = layer(pick, i, p)
        layers.append(LayerWeights(pick.take(p + "attn_norm.weight", (H,)), attn,
                                   pick.take(p + ffn_norm + ".weight", (H,)), ffn))
    pick.check_all_used()
    return ModelWeights(embd, layers, out_norm, out)


def take_gqa(pick: TensorPicker, prefix: str, a: AttentionConfig, hidden: int, biases: bool = False,
             qk_norm: bool = False) -> GQAWeights:
    """q/k/v/output projections of a GQA layer; optional q/k/v biases (`biases`),
    required per-head q/k RMSNorm weights (`qk_norm`)."""
    q_dim, kv_dim = a.n_head * a.head_dim, a.n_head_kv * a.head_dim
    return GQAWeights(
        wq=pick.take(prefix + "attn_q.weight", (q_dim, hidden)),
        wk=pick.take(prefix + "attn_k.weight", (kv_dim, hidden)),
        wv=pick.take(prefix + "attn_v.weight", (kv_dim, hidden)),
        wo=pick.take(prefix + "attn_output.weight", (hidden, q_dim)),
        bq=pick.maybe(prefix + "attn_q.bias", (q_dim,)) if biases else None,
        bk=pick.maybe(prefix + "attn_k.bias", (kv_dim,)) if biases else None,
        bv=pick.maybe(prefix + "attn_v.bias", (kv_dim,)) if biases else None,
        q_norm=pick.take(prefix + "attn_q_norm.weight", (a.head_dim,)) if qk_norm else None,
        k_norm=pick.take(prefix + "attn_k_norm.weight", (a.head_dim,)) if qk_norm else None,
    )


def take_dense_or_moe(pick: TensorPicker, cfg: DenseLeadConfig, i: int,
                      require_bias: bool = False) -> FFNWeights | MoEWeights:
    """Layer i's FFN of a DenseLeadConfig model: the dense FFN of a leading layer, or
    the routed experts with the score bias (`exp_probs_b`, required with
    `require_bias`) and the shared experts."""
    p = f"blk.{i}."
    if not cfg.is_moe_layer(i):
        return take_ffn(pick, p, "", cfg.hidden, cfg.dense_ff)
    bias = (pick.take if require_bias else pick.maybe)(p + "exp_probs_b.bias", (cfg.n_expert,))
    return MoEWeights(**take_moe(pick, i, cfg.hidden, cfg.expert_ff, cfg.n_expert), probs_bias=bias,
                      shared=take_ffn(pick, p, "_shexp", cfg.hidden, cfg.shared_ff) if cfg.n_shared else None)


def take_ffn(pick: TensorPicker, prefix: str, suffix: str, hidden: int, ff: int) -> FFNWeights:
    return FFNWeights(
        gate=pick.take(f"{prefix}ffn_gate{suffix}.weight", (ff, hidden)),
        up=pick.take(f"{prefix}ffn_up{suffix}.weight", (ff, hidden)),
        down=pick.take(f"{prefix}ffn_down{suffix}.weight", (hidden, ff)),
    )


class ReferenceForward:
    """The numpy reference forward pass: an architecture's `forward_layer` over
    all layers, embedding lookup before and the output head after."""

    def __init__(self, arch_module, cfg: ModelConfig, weights: ModelWeights,
                 deq: Dequantizer | None = None):
        self.arch = arch_module
        self.cfg = cfg
        self.w = weights
        self.deq = deq or Dequantizer()

    def new_cache(self, n_ctx: int, type_k: str = "f32", type_v: str = "f32") -> KVCache:
        return KVCache(n_ctx, self.cfg.cache_shapes(), type_k, type_v)

    def hidden_states(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = cache.positions(len(tokens))
        x = self.deq.rows(self.w.token_embd, tokens)
        for i, layer in enumerate(self.w.layers):
            x = self.arch.forward_layer(self.cfg, i, layer, x, cache.layers[i], positions, self.deq)
        cache.advance(len(tokens))
        return x

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        h = rms_norm(hidden, self.deq(self.w.output_norm), self.cfg.rms_eps)
        return self.deq.linear(h, self.w.output).astype(np.float32)


def pre_norm_block(cfg: ModelConfig, w: LayerWeights, x: np.ndarray, attention_fn, deq) -> np.ndarray:
    """x + attention(norm(x)), then + ffn(norm(.)) with the layer's MoE block or dense
    SwiGLU FFN: the layer shape all our models share."""
    h = x + attention_fn(rms_norm(x, deq(w.attn_norm), cfg.rms_eps))
    g = rms_norm(h, deq(w.ffn_norm), cfg.rms_eps)
    return h + (moe_block(cfg.router, w.ffn, g, deq) if isinstance(w.ffn, MoEWeights) else swiglu(w.ffn, g, deq))
