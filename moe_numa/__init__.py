"""moe_numa: run Mixture-of-Experts LLMs from GGUF files on multi-NUMA CPU servers."""

__version__ = "0.1.0"
