"""Writers of small random GGUF models (tests, the default model, benchmarks)."""
from .writer import PRESETS, QTYPES, ModelSpec, iter_presets, make_test_model, variant

__all__ = ["PRESETS", "QTYPES", "ModelSpec", "iter_presets", "make_test_model", "variant"]
