"""Shared fixtures: small random GGUF models written once per test session."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def make_model(model_dir):
    """make_model(preset, qtype="f32", seed=0) -> path, cached for the session."""
    from moe_numa.testing import make_test_model
    cache = {}

    def make(preset: str, qtype: str = "f32", seed: int = 0, **kwargs):
        key = (preset, qtype, seed, tuple(sorted(kwargs.items())))
        if key not in cache:
            name = f"{preset}-{qtype}-s{seed}-{len(cache)}.gguf"
            cache[key] = make_test_model(model_dir / name, preset, qtype, seed=seed, **kwargs)
        return cache[key]

    return make


TEST_PRESETS = ["qwen3moe", "qwen2moe", "deepseek-v3", "deepseek-v2-lite", "glm4moe"]
