"""Native kernels against the float64 oracle gguf.quants.dequantize(W) @ x.

Two checks per result:
  * exact-activation oracle: dequantize(W) @ x in float64; the error must stay
    under the worst case that activation quantization allows,
    sum_j |W_rj| * (half a quantization step of x_j's block) (+ fp16 rounding of
    the Q8_0 scale) - a rigorous bound, so a dropped block or wrong scale fails;
  * quantized-activation oracle: dequantize(W) @ xq, with xq the activations
    quantized in numpy exactly as llama.cpp does; only float32 rounding remains,
    so this is tight (relative 1e-4 of sum |W||xq|).
Every SIMD path the CPU has is checked (forced with kernels.simd / set_simd_level,
and MOE_NUMA_SIMD in a subprocess), with 1 to 4 pool threads.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moe_numa import kernels as K
from moe_numa import _native
from moe_numa import quants as MQ
from moe_numa.errors import MoeNumaError, ShapeError, TopologyError, UnsupportedError

LEVELS = K.SIMD_LEVELS[:K.SIMD_LEVELS.index(K.simd_level_cpu()) + 1]
TYPES = list(K.SUPPORTED_TYPES)
FLOAT_TYPES = tuple(t for t in TYPES if MQ.traits(t).act == "float")
Q8_0_PARTNER = tuple(t for t in TYPES if MQ.traits(t).act == "q8_0")
CPUS = K.available_cpus()


def dequant(w, t, rows, cols):
    return quants.dequantize(w, t).reshape(rows, cols).astype(np.float64)


def quantize_like_llama(x, t):
    """(dequantized activations, per-value half step bound) as the kernels quantize them."""
    x = np.asarray(x, np.float32)
    if t in FLOAT_TYPES:
        return x.astype(np.float64), np.zeros(x.shape)
    n, cols = x.shape
    if t in Q8_0_PARTNER:
        b = x.reshape(n, -1, 32)
        amax = np.abs(b).max(axis=2, keepdims=True)
        d = amax / np.float32(127)
        with np.errstate(divide="ignore"):
            idv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.rint(b * idv)
        d16 = d.astype(np.float16).astype(np.float64)
        xq = (q * d16).reshape(n, cols)
        # |x - q*d16| <= d/2 + |q| |d - d16|
        bound = (d.astype(np.float64) * 0.5 + 127 * np.abs(d - d16)) * np.ones_like(b, np.float64)
        return xq, bound.reshape(n, cols)
    b = x.reshape(n, -1, 256)
    idx = np.abs(b).argmax(axis=2)[..., None]
    mx = np.take_along_axis(b, idx, axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
        q = np.minimum(np.rint(iscale * b), 127)
        d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    xq = (q * d.astype(np.float64)).reshape(n, cols)
    bound = (np.abs(d.astype(np.float64)) * 0.5 * np.ones_like(b, np.float64)).reshape(n, cols)
    return xq, bound


def q8_1_sum_rounding(w, t, rows, x):
    """[tokens, rows] bound of what Q8_1's stored block sum adds for types with a min (Q4_1,
    Q5_1): llama.cpp keeps s = d * sum(q) of each activation block as fp16 (from the f32 d,
    not the fp16 one the values use), and the kernels multiply the weight block's min by it."""
    offs = MQ.traits(t).scale_offsets
    if len(offs) < 2 or MQ.traits(t).act != "q8_0":
        return 0.0
    bs = MQ.traits(t).type_size
    raw = np.asarray(w, np.uint8).reshape(rows, -1, bs)
    m = np.abs(raw[:, :, offs[1]:offs[1] + 2].copy().view(np.float16)[..., 0].astype(np.float64))
    b = np.asarray(x, np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(axis=2)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        idv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    sq = np.rint(b * idv[..., None]).sum(axis=2)
    s_exact = d.astype(np.float64) * sq
    err = np.abs(s_exact) * 2.0 ** -11 + np.abs(d.astype(np.float64) - d.astype(np.float16)) * np.abs(sq)
    return 1.01 * (err @ m.T)


def check_result(y, w, t, x):
    rows = w.shape[0]
    x2 = x.reshape(1, -1) if x.ndim == 1 else x
    y2 = y.reshape(1, -1) if y.ndim == 1 else y
    cols = x2.shape[1]
    W = dequant(w, t, rows, cols)
    assert np.all(np.isfinite(W))
    xq, half = quantize_like_llama(x2, t)
    absW = np.abs(W)
    # 1. exact activations: rigorous bound from activation quantization + float32 rounding
    ref = x2.astype(np.float64) @ W.T
    mag = np.abs(x2.astype(np.float64)) @ absW.T
    tol1 = 1.001 * (half @ absW.T) + 2e-5 * mag + 1e-30
    err1 = np.abs(y2 - ref)
    assert np.all(err1 <= tol1), f"{t.name}: max err/tol {np.max(err1 / tol1):.3g} (vs exact activations)"
    # 2. activations quantized like llama.cpp: only float rounding remains
    ref2 = xq @ W.T
    mag2 = np.abs(xq) @ absW.T
    tol2 = 1e-4 * mag2 + 1e-30 + q8_1_sum_rounding(w, t, rows, x2)
    err2 = np.abs(y2 - ref2)
    assert np.all(err2 <= tol2), f"{t.name}: max err/tol {np.max(err2 / tol2):.3g} (vs quantized activations)"


def cols_for(t, nblocks):
    return nblocks * K.block_size(t) if t not in FLOAT_TYPES else nblocks * 37


_pools = {}


def pool_of(n):
    if n == 1:
        return None
    if n not in _pools:
        _pools[n] = K.ThreadPool([CPUS[i % len(CPUS)] for i in range(n)])
    return _pools[n]


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level=st.sampled_from(LEVELS), rows=st.integers(1, 23),
       nblocks=st.integers(1, 19), n_tok=st.integers(0, 7), threads=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-3, 1.0, 300.0]))
# found by hypothesis: Q4_1 with tiny weights, where the min times Q8_1's fp16 block sum dominates
@example(level="scalar", rows=6, nblocks=1, n_tok=2, threads=1, seed=120, scale=1e-3)
def test_matmul_matches_oracle(t, level, rows, nblocks, n_tok, threads, seed, scale):
    """Every type the table lists as supported, random valid blocks, every SIMD
    level: GEMV (n_tok 0 means a 1-D x) and the tiled GEMM path."""
    rng = np.random.default_rng(seed)
    cols = cols_for(t, nblocks)
    w = K.random_blocks(t, rows, cols, rng)
    if n_tok == 0:
        x = (rng.standard_normal(cols) * scale).astype(np.float32)       # 1-D: GEMV
    else:
        x = (rng.standard_normal((n_tok, cols)) * scale).astype(np.float32)
        if seed % 5 == 0:
            x[0, : cols // 2] = 0.0                                       # all-zero blocks
    with K.simd(level):
        y = K.matmul(w, t, x, pool=pool_of(threads))
    assert y.shape == ((rows,) if x.ndim == 1 else (n_tok, rows))
    check_result(y, w, t, x)


@pytest.mark.parametrize("t", [Q.Q8_0, Q.Q4_K, Q.Q5_K], ids=lambda t: t.name)
@pytest.mark.parametrize("nblocks", [1, 2, 3, 4, 5, 8, 64])
def test_multirow_gemm_equals_gemv_bit_for_bit(t, nblocks):
    """The multi-row GEMM kernels (16 Q8_0 rows, 8 or 4 K-quant rows a pack) give each
    token's row what the GEMV gives, bit for bit, including rows of fewer than four blocks
    (where the driver zeroes the four partial sums itself) and the rows past the last
    whole pack; the driver may pick either by shape."""
    rng = np.random.default_rng(nblocks)
    cols = cols_for(t, nblocks)
    w = K.random_blocks(t, 37, cols, rng)
    x = rng.standard_normal((70, cols)).astype(np.float32)    # two token tiles of the driver
    for level in LEVELS:
        with K.simd(level):
            y = K.matmul(w, t, x)
            for i in (0, 1, 63, 64, 69):
                np.testing.assert_array_equal(y[i], K.matmul(w, t, x[i]), err_msg=f"{level} token {i}")


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_rows_do_not_depend_on_the_rows_run_with_them(t):
    """A row's result is the same bits whichever rows share its call: the prefill sharing
    runs fixed chunks of rows that any node may take, and its bit-identity rests on this."""
    rng = np.random.default_rng(300 + int(t))
    cols = cols_for(t, 9)
    w = K.random_blocks(t, 70, cols, rng)
    x = rng.standard_normal((37, cols)).astype(np.float32)
    for level in LEVELS:
        with K.simd(level):
            whole = K.matmul(w, t, x)
            for cuts in ((1, 70), (5, 21, 70), (16, 17, 32, 33, 70), (3, 4, 8, 64, 70)):
                parts = [K.matmul(np.ascontiguousarray(w[a:b]), t, x) for a, b in zip((0,) + cuts[:-1], cuts)]
                np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole, err_msg=f"{level} {cuts}")


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_gemm_many_row_blocks_and_token_tiles(t):
    """Rows beyond one cache block, tokens beyond several tiles, strided rows."""
    rng = np.random.default_rng(int(t))
    cols = 8192 if t not in FLOAT_TYPES else 4100
    rows = max(3, 3 * (256 * 1024) // K.row_bytes(t, cols) // 2 + 5)
    rows = min(rows, 200)
    big = K.random_blocks(t, rows, cols, rng)
    # rows further apart than row_bytes: a view of a wider buffer
    wide = np.zeros((rows, big.shape[1] + 64), np.uint8)
    wide[:, :big.shape[1]] = big
    w = wide[:, :big.shape[1]]
    x = rng.standard_normal((11, cols)).astype(np.float32)
    for level in LEVELS:
        with K.simd(level):
            y = K.matmul(w, t, x, pool=pool_of(2))
            check_result(y, big, t, x)
            # GEMM rows equal the GEMV of each token (same kernel numerics)
            y1 = K.matmul(w, t, x[5])
            np.testing.assert_allclose(y[5], y1, rtol=1e-5, atol=1e-6 * np.abs(y1).max())


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_simd_paths_agree(t):
    rng = np.random.default_rng(100 + int(t))
    cols = cols_for(t, 11)              # 8-block main loops plus a tail
    w = K.random_blocks(t, 19, cols, rng)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    outs = {}
    for level in LEVELS:
        with K.simd(level) as got:
            assert got == level
            outs[level] = K.matmul(w, t, x)
    base = outs["scalar"]
    for level, y in outs.items():
        np.testing.assert_allclose(y, base, rtol=2e-5, atol=2e-5 * np.abs(base).max(), err_msg=level)


@pytest.mark.parametrize("level", LEVELS)
def test_env_var_forces_level_in_subprocess(level):
    code = ("import numpy as np\n"
            "from moe_numa import kernels as K\n"
            "print(K.simd_level())\n"
            "rng = np.random.default_rng(1)\n"
            "w = K.random_blocks('q4_k', 8, 512, rng); x = rng.standard_normal(512).astype(np.float32)\n"
            "print(float(K.matmul(w, 'q4_k', x)[3]))\n")
    env = dict(os.environ, MOE_NUMA_SIMD=level)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.split()
    assert lines[0] == level
    rng = np.random.default_rng(1)
    w = K.random_blocks("q4_k", 8, 512, rng)
    x = rng.standard_normal(512).astype(np.float32)
    with K.simd(level):
        ref = float(K.matmul(w, "q4_k", x)[3])
    assert float(lines[1]) == ref          # the same code path gives the same bits


def test_prefetch_distance_default_and_env_in_subprocess():
    """MOE_NUMA_PREFETCH sets the look-ahead (read once, natively); it changes no bits."""
    code = ("import numpy as np\n"
            "from moe_numa import kernels as K\n"
            "print(K.prefetch_distance())\n"
            "rng = np.random.default_rng(2)\n"
            "for t in ('q8_0', 'q4_k', 'iq4_xs', 'f16'):\n"
            "    w = K.random_blocks(t, 16, 1024, rng); x = rng.standard_normal(1024).astype(np.float32)\n"
            "    print(repr(K.matmul(w, t, x).tolist()))\n")

    def run(value):
        env = dict(os.environ)
        env.pop("MOE_NUMA_PREFETCH", None)
        if value is not None:
            env["MOE_NUMA_PREFETCH"] = value
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    default = run(None)
    assert default.returncode == 0, default.stderr
    dist, cpu_default, most = _native.prefetch_distance()
    assert int(default.stdout.split("\n")[0]) == cpu_default in (2048, 4096)
    for value in ("0", "1024", str(most)):
        got = run(value)
        assert got.returncode == 0, got.stderr
        lines = got.stdout.split("\n")
        assert int(lines[0]) == int(value)
        assert lines[1:] == default.stdout.split("\n")[1:]     # the same products, bit for bit
    for bad in ("100", "-64", str(most + 64), "far"):
        got = run(bad)
        assert got.returncode != 0
        assert "MOE_NUMA_PREFETCH" in got.stderr and "multiples of 64" in got.stderr, got.stderr


def test_set_simd_level_clamps_and_restores():
    before = K.simd_level()
    assert K.set_simd_level("scalar") == "scalar"
    assert K.simd_level() == "scalar"
    assert K.set_simd_level("avx512vnni") == K.simd_level_cpu() or K.SIMD_LEVELS.index(K.simd_level_cpu()) < 3
    K.set_simd_level(None)
    assert K.simd_level() == before
    with pytest.raises(UnsupportedError):
        K.set_simd_level("sse9")


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_random_blocks_valid(t):
    rng = np.random.default_rng(5)
    cols = cols_for(t, 3)
    w = K.random_blocks(t, 4, cols, rng)
    assert w.dtype == np.uint8 and w.shape == (4, K.row_bytes(t, cols))
    W = dequant(w, t, 4, cols)
    assert np.all(np.isfinite(W))
    assert 0.01 < np.abs(W).mean() < 100


def test_quantize_act_matches_llama_formula():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    for t in (Q.Q8_0, Q.Q4_K):
        xq = K.quantize_act(x, t)
        assert xq.shape[0] == 3 and xq.shape[1] == K.act_row_bytes(t, 512)
        assert xq.__array_interface__["data"][0] % 64 == 0
    # Q8_K: int8 values first, then the float scale per 256
    xq = K.quantize_act(x, Q.Q4_K)
    q = xq[:, :512].view(np.int8).astype(np.float64)
    d = xq[:, 512:520].view(np.float32).astype(np.float64)
    deq = (q.reshape(3, 2, 256) * d[:, :, None]).reshape(3, 512)
    ref, _ = quantize_like_llama(x, Q.Q4_K)
    np.testing.assert_array_equal(deq, ref)
    # bsums: sums of 16 quants
    bs = xq[:, 520:520 + 64].view(np.int16).reshape(3, 2, 16)
    np.testing.assert_array_equal(bs, q.reshape(3, 2, 16, 16).sum(axis=3))


@pytest.mark.parametrize("t", [Q.Q4_1, Q.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("level", LEVELS)
def test_min_types_use_llama_q8_1_sums(t, level):
    """Q4_1 / Q5_1 weights meet llama.cpp's Q8_1 activations: per block
    d_w d_x sum(u q) + m s, where s = fp16(d_x * sum(q)) is rounded on its own
    (not fp16(d_x) * sum(q)). A positive mean makes the sums, and the difference, large:
    the old product fp16(d_x) * sum(q) was 6-7e-6 of the magnitude off, float rounding is 2e-7."""
    rng = np.random.default_rng(7)
    rows, cols = 6, 32 * 24
    w = K.random_blocks(t, rows, cols, rng)
    x = (rng.standard_normal((5, cols)) + 1.5).astype(np.float32)
    with K.simd(level):
        y = K.matmul(w, t, x)
    W = dequant(w, t, rows, cols)
    bs = MQ.traits(t).type_size
    m = w.reshape(rows, -1, bs)[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)   # [rows, nb]
    b = x.reshape(5, -1, 32)
    amax = np.abs(b).max(axis=2)
    d = (amax / np.float32(127)).astype(np.float32)
    q = np.rint(b * (np.float32(127) / amax)[..., None].astype(np.float32)).astype(np.float64)
    s = (d * q.sum(axis=2).astype(np.float32)).astype(np.float16).astype(np.float64)            # Q8_1's s
    xq = q * d.astype(np.float16).astype(np.float64)[..., None]
    Wu = W.reshape(rows, -1, 32) - m[..., None]                                                 # d_w * u
    want = np.einsum("rbj,tbj->tr", Wu, xq) + s @ m.T
    mag = np.abs(xq.reshape(5, cols)) @ np.abs(W).T
    err = np.abs(y - want)
    assert np.all(err <= 1e-6 * mag), f"max err/mag {np.max(err / mag):.2e}"
    # the act-quant reference's simulation of the same rounding
    sim = MQ.simulate_act_quant(x, t) @ W.T + MQ.q8_1_sum_correction(x, w, t)
    assert np.all(np.abs(sim - want) <= 1e-6 * mag)


# ----------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(0)
    w = K.random_blocks("q8_0", 8, 64, rng)
    x = rng.standard_normal(64).astype(np.float32)
    with pytest.raises(ShapeError, match="bytes per row"):
        K.matmul(w, "q8_0", rng.standard_normal(96).astype(np.float32))
    with pytest.raises(ShapeError, match="multiple of 32"):
        K.matmul(w, "q8_0", rng.standard_normal(50).astype(np.float32))
    with pytest.raises(ShapeError, match="float32"):
        K.matmul(w, "q8_0", x.astype(np.float64))
    with pytest.raises(ShapeError, match="C-contiguous"):
        K.matmul(w, "q8_0", rng.standard_normal((4, 128)).astype(np.float32)[:, ::2])
    buf = np.zeros(65 * 4 + 1, np.uint8)
    mis = buf[1:1 + 256].view(np.float32)
    with pytest.raises(ShapeError, match="misaligned"):
        K.matmul(w, "q8_0", mis)
    with pytest.raises(ShapeError, match="uint8"):
        K.matmul(w.view(np.int8), "q8_0", x)
    with pytest.raises(ShapeError, match="contiguous"):
        K.matmul(np.asfortranarray(w), "q8_0", x)
    with pytest.raises(ShapeError, match="out"):
        K.matmul(w, "q8_0", x, out=np.zeros(7, np.float32))
    with pytest.raises(UnsupportedError, match="Q8_K"):
        K.matmul(w, Q.Q8_K, x)          # an activation format, never a weight type
    with pytest.raises(UnsupportedError):
        K.matmul(w, 999, x)
    with pytest.raises(UnsupportedError):
        K.matmul(w, "q9_k", x)
    with pytest.raises(TopologyError, match="CPU 4096"):
        K.ThreadPool([0, 4096])
    with pytest.raises(TopologyError, match="CPU -1"):
        K.ThreadPool([-1])
    with pytest.raises(TopologyError):
        K.ThreadPool([])
    p = K.ThreadPool([CPUS[0]])
    p.close()
    with pytest.raises(ShapeError, match="closed"):
        K.matmul(w, "q8_0", x, pool=p)
    assert issubclass(ShapeError, MoeNumaError) and issubclass(ShapeError, ValueError)


def test_memmap_view_weights(tmp_path):
    rng = np.random.default_rng(9)
    w = K.random_blocks("q6_k", 6, 512, rng)
    path = tmp_path / "w.bin"
    (np.zeros(7, np.uint8).tobytes() + w.tobytes()) and path.write_bytes(np.zeros(7, np.uint8).tobytes() + w.tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    view = mm[7:].reshape(w.shape)                       # odd address, read-only
    x = rng.standard_normal(512).astype(np.float32)
    np.testing.assert_array_equal(K.matmul(view, "q6_k", x), K.matmul(w, "q6_k", x))
