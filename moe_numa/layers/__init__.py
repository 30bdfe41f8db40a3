"""Shared reference building blocks (numpy, float32): norms, RoPE, attention
(GQA and MLA), feed-forward and MoE blocks, and the KV cache. The architecture
files in moe_numa.models compose these; the NUMA engine shards the same weight
structures across nodes."""
