"""The first kernel call of a process: Q8_0 activation scales are rounded through
the fp16 table that the kernel dispatch fills on first use. When a quantization
came before any matmul (always the case in the engine: each block quantizes its
input first), the table was still zeros, every Q8_0/Q4_0 product was 0 and the
first forward pass of a Q8_0 model was garbage (later ones were right). Each
case runs in a fresh interpreter, since any earlier kernel call hides the bug."""
import subprocess
import sys
import textwrap

import pytest


def _fresh(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_first_matmul_of_a_process(qtype):
    out = _fresh(f"""
        import numpy as np
        from moe_numa import kernels, quants
        t = quants.Q.{qtype}
        rng = np.random.default_rng(0)
        w = quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), t)
        x = rng.standard_normal((3, 64)).astype(np.float32)
        got = kernels.matmul(w, t, x)          # quantizes x before any other kernel call
        want = quants.simulate_act_quant(x, t) @ quants.dequantize(w, t, (8, 64)).T
        print(float(np.abs(got - want).max() / np.abs(want).max()))
    """)
    assert float(out.split()[-1]) <= 1e-5


def test_first_forward_of_a_q8_0_engine(make_model):
    path = make_model("deepseek-v3", "q8_0")
    out = _fresh(f"""
        import numpy as np, moe_numa
        with moe_numa.load({str(path)!r}, numa_nodes=1) as eng:
            ids = list(range(10, 16))
            first, second = eng.logits(ids), eng.logits(ids)
        print(float(np.abs(first - second).max()))
    """)
    assert float(out.split()[-1]) == 0.0
