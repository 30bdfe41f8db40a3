"""Facts about a model file: tensor classes and their bytes, the type mix (tensors
and bytes per type, overall and per class), and the weight bytes one generated
token reads (the decode bandwidth bound). Used by `moe-numa inspect` and by the
benchmarks."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from . import quants
from .gguf_file import GGUFModelFile
from .models.base import ModelConfig

CLASSES = ("embeddings", "output", "attention", "router", "dense_ffn", "shared_expert", "routed_experts", "norms",
           "nextn")
_LAYER = re.compile(r"blk\.(\d+)\.")


def tensor_class(name: str) -> str:
    """The class of a tensor by its GGUF name."""
    if name.startswith("token_embd"):
        return "embeddings"
    if name.startswith("output"):
        return "output"
    if re.search(r"_exps\.", name):
        return "routed_experts"
    if "_shexp" in name:
        return "shared_expert"
    if "ffn_gate_inp" in name or "exp_probs_b" in name:
        return "router"
    if name.endswith("_norm.weight") and not re.search(r"attn_(q|k|q_a|kv_a)_norm", name):
        return "norms"
    if ".attn_" in name:
        return "attention"
    if re.search(r"\.ffn_(gate|up|down)\.", name):
        return "dense_ffn"
    return "other"


@dataclass
class ModelInfo:
    arch: str
    name: str
    n_layer: int
    n_moe_layers: int
    n_expert: int
    n_used: int
    hidden: int
    n_vocab: int
    n_params: int
    quant_types: dict[str, int]          # type -> number of tensors
    bytes_by_class: dict[str, int]
    file_bytes: int
    bytes_per_token: int                 # weight bytes read to generate one token
    # type -> {"tensors": n, "bytes": b}, largest first; per class the same
    type_mix: dict[str, dict[str, int]] = field(default_factory=dict)
    type_mix_by_class: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    engine_unsupported: list[str] = field(default_factory=list)   # types only the reference runs

    def bandwidth_bound_tps(self, bandwidth_gbps: float) -> float:
        return bandwidth_gbps * 1e9 / self.bytes_per_token


def model_info(gguf: GGUFModelFile, cfg: ModelConfig) -> ModelInfo:
    by_class: dict[str, int] = defaultdict(int)
    types: Counter = Counter()
    mix: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"tensors": 0, "bytes": 0}))
    n_params = 0
    for t in gguf:
        m = _LAYER.match(t.name)
        # Layers past n_layer are multi-token-prediction (NextN) layers: stored, never run.
        cls = "nextn" if m and int(m.group(1)) >= cfg.n_layer else tensor_class(t.name)
        by_class[cls] += t.nbytes
        types[t.qtype.name] += 1
        for cell in (mix["*"][t.qtype.name], mix[cls][t.qtype.name]):
            cell["tensors"] += 1
            cell["bytes"] += t.nbytes
        n_params += t.n_elements

    def largest_first(d):
        return {k: dict(v) for k, v in sorted(d.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))}
    embd = gguf.tensor("token_embd.weight")
    tied = "output.weight" not in gguf.tensors
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layer))
    # Decode reads every tensor once, except: one embedding row, and top-k of the
    # routed experts in each MoE layer. A tied output head reads the embedding whole.
    per_token = sum(b for c, b in by_class.items() if c not in ("embeddings", "routed_experts", "nextn"))
    per_token += embd.nbytes if tied else embd.nbytes // embd.shape[0]
    per_token += int(by_class["routed_experts"] * cfg.router.n_used / cfg.router.n_expert)
    return ModelInfo(
        arch=cfg.arch, name=cfg.name, n_layer=cfg.n_layer, n_moe_layers=n_moe, n_expert=cfg.router.n_expert,
        n_used=cfg.router.n_used, hidden=cfg.hidden, n_vocab=cfg.n_vocab, n_params=n_params,
        quant_types=dict(types), bytes_by_class={c: by_class.get(c, 0) for c in CLASSES + ("other",) if by_class.get(c)},
        file_bytes=gguf.file_bytes, bytes_per_token=per_token,
        type_mix=largest_first(mix["*"]),
        type_mix_by_class={c: largest_first(mix[c]) for c in CLASSES + ("other",) if c in mix},
        engine_unsupported=sorted(q for q in types if not quants.is_supported(getattr(quants.Q, q))))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_info(info: ModelInfo, path: str) -> str:
    lines = [
        f"file:            {path} ({human_bytes(info.file_bytes)})",
        f"architecture:    {info.arch}  ({info.name})",
        f"layers:          {info.n_layer} ({info.n_moe_layers} MoE)",
        f"experts:         {info.n_expert}, top-{info.n_used} per token",
        f"hidden / vocab:  {info.hidden} / {info.n_vocab}",
        f"parameters:      {info.n_params / 1e9:.3f} B",
        "quant types:     " + ", ".join(f"{q} x{n}" for q, n in sorted(info.quant_types.items())),
        "type mix:        type       tensors        bytes   share",
    ]
    total = sum(info.bytes_by_class.values())
    for q, v in info.type_mix.items():
        note = "  (reference backend only)" if q in info.engine_unsupported else ""
        lines.append(f"                 {q:<9} {v['tensors']:>8} {human_bytes(v['bytes']):>12}  "
                     f"{100 * v['bytes'] / total:5.1f}%{note}")
    lines.append("bytes by tensor class (type x tensors (bytes)):")
    for c, b in sorted(info.bytes_by_class.items(), key=lambda kv: -kv[1]):
        cell = ", ".join(f"{q} x{v['tensors']} ({human_bytes(v['bytes'])})"
                         for q, v in info.type_mix_by_class.get(c, {}).items())
        lines.append(f"  {c:<16} {human_bytes(b):>12}  {100 * b / total:5.1f}%   {cell}")
    lines.append(f"weight bytes read per generated token: {human_bytes(info.bytes_per_token)} "
                 f"({100 * info.bytes_per_token / total:.1f}% of the weights)")
    return "\n".join(lines)
