"""Writes mn_iq_tables.c: the IQ grids and sign table as C arrays, decoded from
the definitions in the `gguf.quants` package (the same tables our reference
dequantizes with), so the kernels and the reference cannot disagree on them.
setup.py runs it at every build, into the build tree (the file is not tracked).

    python3 cython_kernels/tools/gen_iq_tables.py OUT   # to read the generated file
"""
from __future__ import annotations

import os
import sys

import numpy as np
from gguf import quants as gq

# (C name, gguf class, C element type); each grid row is packed little-endian,
# one int8 value per byte, into that element
GRIDS = [
    ("mn_iq2xxs_grid", gq.IQ2_XXS, "uint64_t"),
    ("mn_iq2xs_grid", gq.IQ2_XS, "uint64_t"),
    ("mn_iq2s_grid", gq.IQ2_S, "uint64_t"),
    ("mn_iq3xxs_grid", gq.IQ3_XXS, "uint32_t"),
    ("mn_iq3s_grid", gq.IQ3_S, "uint32_t"),
    ("mn_iq1s_grid", gq.IQ1_S, "uint64_t"),
]


def grid_rows(cls) -> np.ndarray:
    cls.init_grid()
    g = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    q = np.rint(g).astype(np.int64)
    assert np.array_equal(q, g) and q.min() >= -128 and q.max() <= 127, cls.__name__
    packed = np.zeros(g.shape[0], dtype=np.uint64)
    for j in range(g.shape[1]):
        packed |= (q[:, j].astype(np.int8).view(np.uint8).astype(np.uint64)) << np.uint64(8 * j)
    return packed


def c_array(name: str, ctype: str, values, per_line: int, width: int) -> str:
    vals = [f"0x{int(v):0{width}x}" for v in values]
    lines = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    return (f"const {ctype} {name}[{len(vals)}] __attribute__((aligned(64))) = {{\n    "
            + ",\n    ".join(lines) + ",\n};\n")


def write(out: str) -> None:
    """Writes the tables to `out`, leaving an up-to-date file untouched (no rebuild)."""
    parts = ["/* Generated at build time by cython_kernels/tools/gen_iq_tables.py from gguf.quants.\n"
             " * IQ grids (one grid row of int8 values per element, little-endian) and the\n"
             " * IQ2/IQ3 sign table (7 sign bits -> 8 with even parity); mn_signs64 spreads a\n"
             " * sign byte over 8 bytes of +1 / -1 for the SIMD kernels, mn_ksigns64 the\n"
             " * 7-bit IQ2/IQ3 sign index likewise. */\n"
             "#include <stdint.h>\n"]
    for name, cls, ctype in GRIDS:
        rows = grid_rows(cls)
        width = 16 if ctype == "uint64_t" else 8
        parts.append(c_array(name, ctype, rows, 4 if width == 16 else 8, width))
    ksigns = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)
    parts.append(c_array("mn_ksigns_iq2xs", "uint8_t", ksigns, 16, 2))
    # for the SIMD kernels: sign byte -> 8 bytes of +1 / -1 (bit j set: byte j is -1)
    signs64 = [sum((0xFF if (v >> j) & 1 else 0x01) << (8 * j) for j in range(8)) for v in range(256)]
    parts.append(c_array("mn_signs64", "uint64_t", signs64, 4, 16))
    parts.append(c_array("mn_ksigns64", "uint64_t", [signs64[v] for v in ksigns], 4, 16))
    text = "\n".join(parts)
    if os.path.exists(out):
        with open(out) as f:
            if f.read() == text:
                return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: gen_iq_tables.py OUT", file=sys.stderr)
        return 2
    write(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
