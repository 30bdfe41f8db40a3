"""One module per GGUF architecture; each has `ARCH` (the `general.architecture`
value), a config dataclass built from the file's metadata (`Config.from_gguf`, a
`ModelConfig` subclass), `load_weights` and `forward_layer`. Modules are found
here by discovery: adding an architecture is adding its file."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ..errors import UnsupportedError
from ..gguf_file import GGUFModelFile
from .base import ModelConfig, ModelWeights


def _config_class(module: ModuleType) -> type:
    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, ModelConfig) and v.__module__ == module.__name__]
    if len(found) != 1:
        raise TypeError(f"{module.__name__} must define exactly one ModelConfig subclass, found {len(found)}")
    return found[0]


def _discover() -> dict[str, tuple[ModuleType, type]]:
    out = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        out[module.ARCH] = (module, _config_class(module))
    return out


ARCHITECTURES: dict[str, tuple[ModuleType, type]] = _discover()


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
