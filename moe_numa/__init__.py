"""moe_numa: run Mixture-of-Experts LLMs from GGUF files on multi-NUMA CPU servers.

    import moe_numa
    model = moe_numa.load("model.gguf")                  # the NUMA engine
    print(model.generate("Hello", max_tokens=32))
    ref = moe_numa.load("model.gguf", backend="reference")   # the numpy oracle
"""
from .api import Model, load
from .errors import (ChatTemplateError, ContextOverflowError, ExpertMapError, GGUFError, MoeNumaError,
                     ShapeError, TopologyError, UnsupportedError)

__version__ = "0.1.0"
__all__ = ["load", "Model", "MoeNumaError", "GGUFError", "UnsupportedError", "ShapeError", "ExpertMapError",
           "TopologyError", "ContextOverflowError", "ChatTemplateError", "__version__"]
