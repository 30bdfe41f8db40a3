"""The embedded default model: a small random-weight Qwen3-MoE GGUF with the
real Qwen vocabulary and chat template, generated on first use (about a
second) so the main command runs with no download."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PRESET = "qwen3moe"
DEFAULT_QTYPE = "q8_0"
DEFAULT_SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_NUMA_CACHE", Path.home() / ".cache" / "moe_numa"))


def default_model_path() -> Path:
    """Path of the default model, writing it first if it does not exist yet."""
    from .testing import make_test_model
    path = cache_dir() / "default" / f"{DEFAULT_PRESET}-{DEFAULT_QTYPE}-seed{DEFAULT_SEED}.gguf"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}.gguf")
        make_test_model(tmp, DEFAULT_PRESET, DEFAULT_QTYPE, seed=DEFAULT_SEED)
        os.replace(tmp, path)   # atomic: concurrent first runs never see a half-written file
    return path
