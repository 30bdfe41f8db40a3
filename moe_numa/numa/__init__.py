"""NUMA machinery: topology (real and virtual nodes), node-bound memory, YAML expert maps."""
