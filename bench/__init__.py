"""Benchmarks and the llama.cpp comparison harness (installed as moe_numa.bench)."""
