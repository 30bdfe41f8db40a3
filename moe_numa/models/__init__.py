"""One module per GGUF architecture; each has a config dataclass built from the
file's metadata (`Config.from_gguf`), `load_weights` and `forward_layer`."""
from __future__ import annotations

from types import ModuleType

from ..errors import UnsupportedError
from ..gguf_file import GGUFModelFile
from . import deepseek2, qwen2moe, qwen3moe
from .base import ModelConfig, ModelWeights

ARCHITECTURES: dict[str, tuple[ModuleType, type]] = {
    qwen2moe.ARCH: (qwen2moe, qwen2moe.Qwen2MoeConfig),
    qwen3moe.ARCH: (qwen3moe, qwen3moe.Qwen3MoeConfig),
    deepseek2.ARCH: (deepseek2, deepseek2.DeepSeek2Config),
}


def architecture(gguf: GGUFModelFile) -> tuple[ModuleType, type]:
    try:
        return ARCHITECTURES[gguf.architecture]
    except KeyError:
        raise UnsupportedError(f"{gguf.path}: architecture {gguf.architecture!r} is not supported; "
                               f"supported: {', '.join(sorted(ARCHITECTURES))}") from None


def load_model(gguf: GGUFModelFile, **router_overrides) -> tuple[ModuleType, ModelConfig, ModelWeights]:
    """The architecture module, its config and the (memory-mapped) weights."""
    module, config_cls = architecture(gguf)
    cfg = config_cls.from_gguf(gguf, **router_overrides)
    return module, cfg, module.load_weights(gguf, cfg)
