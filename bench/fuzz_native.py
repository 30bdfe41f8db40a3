"""Coverage-guided fuzzing (atheris / libFuzzer) of the native boundary, for a
fixed time budget:

- block kernels: random bytes as GGML blocks of every supported type, random
  column counts and activations, through moe_numa.kernels.matmul;
- engine setters: the layer/head parameters of a loaded two-node engine with
  random fields replaced (sizes, kinds, indices, arrays cut short, retyped or
  dropped), handed to set_attention / set_ffn / set_head, then a forward pass;
- block calls: random layer, token counts and positions.

Each input must be accepted or refused with a MoeNumaError. A crash, or any
other exception, stops the run with the input saved by libFuzzer
(crash-<sha1> in the current directory).

    pip install -e ".[fuzz]"
    python3 bench/fuzz_native.py --seconds 60 [-- LIBFUZZER_FLAGS...]

Build the extension with MOE_NUMA_SANITIZE=address,undefined (and preload
libasan, see .ci/sanitize) to turn silent out-of-bounds accesses into crashes.
"""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import tempfile

import numpy as np

# Run as a script from a source tree: fuzz that tree's moe_numa, not an installed one.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.exists(os.path.join(_ROOT, "moe_numa", "__init__.py")):
    sys.path.insert(0, _ROOT)

STATS = {"runs": 0, "accepted": 0, "refused": 0}
EXTREMES = [0, 1, -1, 2, 3, 7, 8, 64, 255, 256, 1023, 1024, 4096, 2**31 - 1, -2**31, 2**40, -2**40]


def _ints(fdp, n=1):
    out = []
    for _ in range(n):
        if fdp.ConsumeBool():
            out.append(EXTREMES[fdp.ConsumeIntInRange(0, len(EXTREMES) - 1)])
        else:
            out.append(fdp.ConsumeIntInRange(-4, 4096))
    return out if n > 1 else out[0]


class Harness:
    def __init__(self):
        import moe_numa
        from moe_numa import _native, kernels as K, quants
        from moe_numa.errors import MoeNumaError
        from moe_numa.testing import make_test_model
        self.K, self.Err, self.Mat = K, MoeNumaError, _native.Mat
        self.types = [t for t in quants.supported_names()]
        d = tempfile.mkdtemp(prefix="moe_numa-fuzz-")
        path = make_test_model(os.path.join(d, "fuzz.gguf"), "qwen3moe", "q4_k", seed=0)
        self.model = moe_numa.load(path, n_ctx=64, numa_nodes=2, rebalance_every=None, ubatch=8)
        B = self.model.backend
        self.params = {k: B.store.resolve(p) for k, p in B._params.items()}
        self.core = B.core

    # -- targets -----------------------------------------------------------------
    def blocks(self, fdp) -> None:
        from moe_numa import quants
        qtype = quants.qtype_from_name(self.types[fdp.ConsumeIntInRange(0, len(self.types) - 1)])
        block, size = quants.block_size(qtype)
        rows = fdp.ConsumeIntInRange(1, 8)
        good = fdp.ConsumeProbability() < 0.9
        cols = fdp.ConsumeIntInRange(1, 4) * block if good else fdp.ConsumeIntInRange(1, 2048)
        row_bytes = cols // block * size if good else fdp.ConsumeIntInRange(1, 4096)
        row_bytes = max(row_bytes, 1)
        w = np.frombuffer(fdp.ConsumeBytes(rows * row_bytes).ljust(rows * row_bytes, b"\0"),
                          dtype=np.uint8).reshape(rows, row_bytes)
        n_tok = fdp.ConsumeIntInRange(1, 5)
        x = np.frombuffer(fdp.ConsumeBytes(4 * n_tok * cols).ljust(4 * n_tok * cols, b"\0"),
                          dtype=np.float32).reshape(n_tok, cols)
        self.K.matmul(w, qtype, x if n_tok > 1 else x[0])

    def setter(self, fdp) -> None:
        keys = sorted(self.params, key=str)
        key = keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]
        kind, node, layer = key
        p = self.params[key].fields()
        fields = sorted(p)
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            f = fields[fdp.ConsumeIntInRange(0, len(fields) - 1)]
            p[f] = self._mutate(fdp, p[f])
        if fdp.ConsumeProbability() < 0.1:
            node, layer = _ints(fdp), _ints(fdp)
        self.core.set_shard(node, layer, type(self.params[key])(**p))
        try:   # it was taken: it must also run; then the original goes back
            self.model.logits([1, 2, 3])
        finally:
            self._restore(key)

    def _restore(self, key) -> None:
        kind, node, layer = key
        self.core.set_shard(node, layer, self.params[key])

    def _mutate(self, fdp, v):
        choice = fdp.ConsumeIntInRange(0, 5)
        if choice == 0:
            return None
        if choice == 1:
            return _ints(fdp)
        if isinstance(v, np.ndarray) and v.size:
            if choice == 2:
                return v.reshape(-1)[: fdp.ConsumeIntInRange(0, v.size - 1)]
            if choice == 3:
                return v.astype(np.float64 if v.dtype != np.float64 else np.float32)
            if choice == 4 and v.ndim == 2:
                return v[: max(1, v.shape[0] - 1)]
        if isinstance(v, self.Mat):
            return [v.replace(type=_ints(fdp)), v.replace(raw=v.raw[:, :-1]), v.replace(cols=_ints(fdp)),
                    v.replace(raw=v.raw[:-1])][choice % 4]
        if isinstance(v, dict) and v:   # experts
            e = sorted(v)[0]
            return {_ints(fdp): v[e]} if choice % 2 else {e: v[e].replace(inter=_ints(fdp))}
        return _ints(fdp)

    def block_call(self, fdp) -> None:
        H, n_layer = self.model.config.hidden, self.model.config.n_layer
        T = fdp.ConsumeIntInRange(0, 10)
        x = np.zeros((T, H if fdp.ConsumeProbability() < 0.9 else H - 1), np.float32)
        layer = fdp.ConsumeIntInRange(-1, n_layer) if fdp.ConsumeBool() else _ints(fdp)
        which = fdp.ConsumeIntInRange(0, 2)
        if which == 0:
            self.core.attention(layer, x, _ints(fdp))
        elif which == 1:
            self.core.ffn(layer, x)
        else:
            self.core.head(x, np.zeros((max(T, 1), self.model.config.n_vocab), np.float32))

    def one_input(self, data: bytes) -> None:
        import atheris
        fdp = atheris.FuzzedDataProvider(data)
        STATS["runs"] += 1
        target = (self.blocks, self.setter, self.block_call)[fdp.ConsumeIntInRange(0, 2)]
        try:
            target(fdp)
            STATS["accepted"] += 1
        except (self.Err, OverflowError) as e:   # OverflowError: a Python int too large for a C int argument
            STATS["refused"] += 1
            if isinstance(e, OverflowError) and "int" not in str(e):
                raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="atheris fuzzing of the native boundary")
    ap.add_argument("--seconds", type=int, default=60, help="time budget (libFuzzer -max_total_time)")
    ap.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags (after --)")
    a = ap.parse_args(argv)
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install -e '.[fuzz]'", file=sys.stderr)
        return 2
    with atheris.instrument_imports(include=["moe_numa"]):   # coverage of the Python side guides the search
        import moe_numa  # noqa: F401
        import moe_numa.engine  # noqa: F401
    h = Harness()
    atexit.register(lambda: print(f"\nfuzz_native: {STATS['runs']} inputs, {STATS['accepted']} accepted, "
                                  f"{STATS['refused']} refused with a MoeNumaError", file=sys.stderr))
    atheris.Setup([sys.argv[0], f"-max_total_time={a.seconds}", *a.libfuzzer], h.one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
