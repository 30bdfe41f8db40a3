"""Benchmarks and the llama.cpp comparison harness (installed as moe_numa.bench)."""
from __future__ import annotations

import argparse


def standalone_main(prog: str, doc: str, add_arguments, run, argv=None, *, full_doc: bool = False) -> int:
    """`python -m moe_numa.bench.X`: the module's own `add_arguments` and `run`, as `moe-numa` wires
    them, under a parser described by the module docstring (all of it, or its first paragraph)."""
    if full_doc:
        ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))
