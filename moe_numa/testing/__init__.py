"""Writers of small random GGUF models (tests, the default model, benchmarks)."""
from .writer import PRESETS, QTYPES, ModelSpec, make_test_model, variant

__all__ = ["PRESETS", "QTYPES", "ModelSpec", "make_test_model", "variant"]
