"""Python face of the native kernels (moe_numa._native).

Owns: the SIMD level in force (`simd_level`, `set_simd_level`), quantized
matrix-vector / matrix-matrix products straight on GGUF blocks (`matmul`),
node-local thread pools (`ThreadPool`, `order_cpus`), the fused MoE expert
kernel (`moe_experts`), `random_blocks` (random valid GGML blocks of every
supported type, for tests and test models), `first_bad_block` (the block check
of check_tensors) and `limit_blas_threads`.

Every function validates its arguments here, at the Python boundary, and raises
`moe_numa.errors.ShapeError` (shapes, dtypes, contiguity, alignment, index
ranges), `UnsupportedError` (weight types) or `TopologyError` (CPU sets); the
native code behind it trusts its inputs and runs without the GIL.

Numerics follow llama.cpp: activations are quantized per row to Q8_K (K-quants,
IQ types) or Q8_0 (the 32-value types), as the type table's `act` column says
(`quants.traits`), and integer dot products do the work; F32/F16/BF16 weights
are multiplied with float activations.  The SIMD path is picked at run time from
CPUID; `MOE_NUMA_SIMD=scalar|avx2|avx512|avx512vnni` (read on first use) or
`set_simd_level(name)` lowers it, e.g. to test the AVX2 and scalar paths on an
AVX-512 machine.  The kernels prefetch the weights a CPU-dependent distance ahead
(`prefetch_distance`; `MOE_NUMA_PREFETCH=BYTES` overrides it).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
from gguf import GGMLQuantizationType

from . import _native, quants
from .errors import MoeNumaError, ShapeError, TopologyError, UnsupportedError
from .numa.topology import core_of, order_cpus  # noqa: F401  (CPU ordering lives in numa.topology)

Q = GGMLQuantizationType

#: SIMD paths, lowest first.
SIMD_LEVELS = ("scalar", "avx2", "avx512", "avx512vnni")

#: Weight types the kernels compute with (from the type table, quants.traits).
SUPPORTED_TYPES = quants.SUPPORTED

# C error codes of the kernel entry points (mn_kernels.h)
_C_ERRORS = {-1: (UnsupportedError, "no kernel for this weight type"),
             -2: (ShapeError, "the column count is not a positive multiple of the block size"),
             -3: (ShapeError, "negative token count")}


def _raise_c_error(rc: int, what: str) -> None:
    if rc:
        cls, msg = _C_ERRORS.get(rc, (MoeNumaError, f"native error {rc}"))
        raise cls(f"{what}: {msg}")


def simd_level() -> str:
    """Name of the SIMD path the kernels use now."""
    return _native.simd_level()


def simd_level_cpu() -> str:
    """Name of the best SIMD path this CPU supports."""
    return _native.simd_level_cpu()


def set_simd_level(name: str | None) -> str:
    """Force the SIMD path ('scalar', 'avx2', 'avx512', 'avx512vnni'), clamped to
    what the CPU supports; None restores CPUID/MOE_NUMA_SIMD.  Process-wide: call
    it only while no kernel runs.  Returns the level now in force."""
    if name is not None and name not in SIMD_LEVELS:
        raise UnsupportedError(f"unknown SIMD level {name!r}; expected one of {', '.join(SIMD_LEVELS)}")
    return _native.set_simd_level(name)


def prefetch_distance() -> int:
    """Bytes ahead of the weights being read that the kernels' software prefetch reads:
    this CPU's default (Intel 2048, others 4096; docs/numa-tuning.md) or
    `MOE_NUMA_PREFETCH`, which must be 0 to the maximum in multiples of 64.  A bad value
    raises UnsupportedError naming the variable (the native side then ignores it)."""
    dist, default, most = _native.prefetch_distance()
    env = os.environ.get("MOE_NUMA_PREFETCH", "").strip()
    if env:
        try:
            ok = 0 <= int(env) <= most and int(env) % 64 == 0
        except ValueError:
            ok = False
        if not ok:
            raise UnsupportedError(f"MOE_NUMA_PREFETCH={env!r} is not a prefetch distance: give bytes from 0 to "
                                   f"{most} in multiples of 64 (this CPU's default is {default})")
    return dist


@contextlib.contextmanager
def simd(name: str):
    """Context manager: run the body with the SIMD path forced to `name`."""
    before = simd_level()
    set_simd_level(name)
    try:
        yield simd_level()
    finally:
        set_simd_level(before)


def _qtype(qtype) -> GGMLQuantizationType:
    tr = quants.traits(qtype)
    if not tr.supported:
        raise UnsupportedError(f"weight type {tr.name} is not supported by the kernels; supported: "
                               f"{', '.join(x.name for x in SUPPORTED_TYPES)}")
    return tr.qtype


def is_supported(qtype) -> bool:
    try:
        _qtype(qtype)
        return True
    except UnsupportedError:
        return False


def block_size(qtype) -> int:
    """Weights per block of a supported type (1 for float types)."""
    return quants.traits(_qtype(qtype)).block


def row_bytes(qtype, cols: int) -> int:
    """Bytes of one weight row of `cols` values; ShapeError if cols is not a
    multiple of the block size."""
    t = _qtype(qtype)
    n = _native.row_bytes(int(t), int(cols))
    if n == 0:
        raise ShapeError(f"{t.name} rows need a positive multiple of {quants.traits(t).block} "
                         f"columns, got {cols}")
    return n


def act_row_bytes(qtype, cols: int) -> int:
    """Bytes of one quantized activation row for weights of `qtype`."""
    row_bytes(qtype, cols)
    return _native.act_row_bytes(int(_qtype(qtype)), int(cols))


def first_bad_block(w_raw: np.ndarray, qtype, cols: int) -> int:
    """Flat index (row * blocks_per_row + block) of the first block of the
    weights [rows, row_bytes] whose fp16 scale (or float value) is Inf or NaN;
    -1 when every block is finite.  Runs without the GIL."""
    t = _qtype(qtype)
    _check_weights(w_raw, t, cols, "w_raw")
    r = _native.first_bad_block_ptr(int(t), _addr(w_raw), w_raw.strides[0], w_raw.shape[0], int(cols))
    _raise_c_error(-2 if r == -2 else 0, f"first_bad_block({t.name}, {cols} columns)")
    return int(r)


# ---------------------------------------------------------------- random blocks
def random_blocks(qtype, rows: int, cols: int, rng: np.random.Generator | None = None,
                  scale: float = 1.0) -> np.ndarray:
    """Random valid GGML data: uint8 array [rows, row_bytes(qtype, cols)].

    Quantized types get random bytes for their quants and packed scales (every
    bit pattern is valid there) and finite positive fp16 super-block scales
    d, dmin of magnitude about `scale`/(values range), so dequantized weights are
    O(scale).  Float types get N(0, scale) values.  Works for every type in
    SUPPORTED_TYPES; feed the result to gguf.quants.dequantize for the oracle."""
    t = _qtype(qtype)
    rng = np.random.default_rng() if rng is None else rng
    rb = row_bytes(t, cols)
    rows = int(rows)
    if t == Q.F32:
        return rng.normal(0, scale, (rows, cols)).astype(np.float32).view(np.uint8).reshape(rows, rb)
    if t == Q.F16:
        return rng.normal(0, scale, (rows, cols)).astype(np.float16).view(np.uint8).reshape(rows, rb)
    if t == Q.BF16:
        f = rng.normal(0, scale, (rows, cols)).astype(np.float32).view(np.uint32)
        return (f >> 16).astype(np.uint16).view(np.uint8).reshape(rows, rb)
    tr = quants.traits(t)
    nb = cols // tr.block
    raw = rng.integers(0, 256, (rows, nb, tr.type_size), dtype=np.uint8)
    # typical magnitude of the integer part times its sub-block scale
    span = _SPAN[t]
    for off in tr.scale_offsets:
        d = (rng.uniform(0.5, 1.5, (rows, nb)) * scale / span).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    if t == Q.IQ1_M:     # its fp16 d is spread over the top nibbles of the four scale words
        d = (rng.uniform(0.5, 1.5, (rows, nb)) * scale / span).astype(np.float16).view(np.uint16)
        sc = raw[:, :, 48:56].copy().view(np.uint16)
        for k in range(4):
            sc[..., k] = (sc[..., k] & 0x0FFF) | (((d >> (4 * k)) & 0xF) << 12)
        raw[:, :, 48:56] = sc.view(np.uint8)
    return raw.reshape(rows, rb)


# typical |integer value x sub-block scale| of each type's random blocks, so that
# random_blocks' values come out O(scale)
_SPAN = {Q.Q8_0: 64, Q.Q4_0: 4, Q.Q4_1: 8, Q.Q5_0: 8, Q.Q5_1: 16, Q.IQ4_NL: 64, Q.IQ4_XS: 64 * 16,
         Q.Q4_K: 8 * 32, Q.Q5_K: 16 * 32, Q.Q2_K: 2 * 8, Q.Q3_K: 2 * 16, Q.Q6_K: 32 * 64,
         Q.IQ2_XXS: 50, Q.IQ2_XS: 50, Q.IQ2_S: 50, Q.IQ3_XXS: 120, Q.IQ3_S: 128, Q.IQ1_S: 6, Q.IQ1_M: 6,
         Q.TQ2_0: 1}


# ------------------------------------------------------------------ validation
_addr = _native.data_address


def _check_weights(w: np.ndarray, t: GGMLQuantizationType, cols: int, name: str, rows: int | None = None):
    if not isinstance(w, np.ndarray):
        raise ShapeError(f"{name}: expected a numpy uint8 array [rows, row_bytes], got {type(w).__name__}")
    if w.dtype != np.uint8:
        raise ShapeError(f"{name}: expected dtype uint8 (raw GGML blocks), got {w.dtype}")
    if w.ndim != 2:
        raise ShapeError(f"{name}: expected 2 dimensions [rows, row_bytes], got shape {w.shape}")
    rb = row_bytes(t, cols)
    if w.shape[1] != rb:
        raise ShapeError(f"{name}: {t.name} rows of {cols} values take {rb} bytes, but the array has "
                         f"{w.shape[1]} bytes per row (shape {w.shape})")
    if rows is not None and w.shape[0] != rows:
        raise ShapeError(f"{name}: expected {rows} rows, got {w.shape[0]}")
    if w.shape[0] == 0:
        raise ShapeError(f"{name}: has no rows")
    if w.strides[1] != 1 or w.strides[0] < rb:
        raise ShapeError(f"{name}: each row must be contiguous bytes and rows must not overlap "
                         f"(strides {w.strides}); pass np.ascontiguousarray(...)")


def _check_float(a, name: str, ndim: tuple[int, ...], writeable: bool = False) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ShapeError(f"{name}: expected a numpy float32 array, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ShapeError(f"{name}: expected dtype float32, got {a.dtype}")
    if a.ndim not in ndim:
        raise ShapeError(f"{name}: expected {' or '.join(map(str, ndim))} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ShapeError(f"{name}: must be C-contiguous (strides {a.strides}); pass np.ascontiguousarray(...)")
    if _addr(a) % 4:
        raise ShapeError(f"{name}: buffer is misaligned (address % 4 = {_addr(a) % 4}); float32 data must be 4-byte aligned")
    if writeable and not a.flags.writeable:
        raise ShapeError(f"{name}: must be writeable")
    return a


def _aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    buf = np.empty(nbytes + align, dtype=np.uint8)
    off = (-_addr(buf)) % align
    return buf[off:off + nbytes]


def _pool_native(pool):
    if pool is None:
        return None
    if not isinstance(pool, ThreadPool):
        raise ShapeError(f"pool: expected a moe_numa.kernels.ThreadPool or None, got {type(pool).__name__}")
    if pool.closed:
        raise ShapeError("pool: the ThreadPool is closed")
    return pool._pool


# ---------------------------------------------------------------------- matmul
def quantize_act(x: np.ndarray, qtype) -> np.ndarray:
    """Quantize float32 rows x ([cols] or [n, cols]) into the activation format
    that partners weights of `qtype`: uint8 [n, act_row_bytes] (layout private)."""
    t = _qtype(qtype)
    _check_float(x, "x", (1, 2))
    x2 = x.reshape(1, -1) if x.ndim == 1 else x
    cols = x2.shape[1]
    arb = act_row_bytes(t, cols)
    out = _aligned_empty(arb * x2.shape[0]).reshape(x2.shape[0], arb)
    _raise_c_error(_native.quantize_act_ptr(int(t), _addr(x2), cols, _addr(out), arb, cols, x2.shape[0]),
                   f"quantize_act({t.name}, {cols} columns)")
    return out


def matmul(w_raw: np.ndarray, qtype, x: np.ndarray, out: np.ndarray | None = None,
           pool: "ThreadPool | None" = None) -> np.ndarray:
    """y = W @ x on raw GGML weights.

    w_raw: uint8 [rows, row_bytes(qtype, cols)], rows contiguous (may be a view of
    a memory map, rows may be further apart than row_bytes); x: float32 [cols]
    (GEMV, returns [rows]) or [n_tok, cols] (GEMM, returns [n_tok, rows]).  out,
    if given, must be float32 C-contiguous of the result's shape.  With a pool the
    rows are split among its threads (contiguous ranges)."""
    t = _qtype(qtype)
    _check_float(x, "x", (1, 2))
    cols = x.shape[-1]
    _check_weights(w_raw, t, cols, "w_raw")
    rows = w_raw.shape[0]
    n_tok = 1 if x.ndim == 1 else x.shape[0]
    shape = (rows,) if x.ndim == 1 else (n_tok, rows)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    else:
        _check_float(out, "out", (len(shape),), writeable=True)
        if out.shape != shape:
            raise ShapeError(f"out: expected shape {shape}, got {out.shape}")
    if n_tok == 0:
        return out
    arb = _native.act_row_bytes(int(t), cols)
    xq = _aligned_empty(arb * n_tok)
    rc = _native.matmul_ptr(int(t), _addr(w_raw), w_raw.strides[0], rows, cols, _addr(x), cols, n_tok,
                            _addr(xq), arb, _addr(out), rows, _pool_native(pool))
    _raise_c_error(rc, f"matmul({t.name}, {rows}x{cols})")
    return out


# ----------------------------------------------------------------------- pools
def available_cpus() -> list[int]:
    """CPUs this thread may run on (as before a loaded engine pinned it)."""
    from .numa.topology import allowed_cpus
    return sorted(allowed_cpus())


class ThreadPool:
    """Persistent native threads, thread i pinned to cpus[i].

    With caller_is_worker0 (default) the thread calling into the kernels runs
    slice 0 itself (it is not pinned) and len(cpus)-1 threads are started.
    Workers spin briefly (spin_us, default 100 or MOE_NUMA_SPIN_US) after a task,
    then sleep on a futex.  Use as a context manager or call close()."""

    def __init__(self, cpus: Sequence[int], caller_is_worker0: bool = True, spin_us: float | None = None):
        try:
            cpus = [int(c) for c in cpus]
        except (TypeError, ValueError):
            raise TopologyError(f"cpus: expected a list of CPU numbers, got {cpus!r}") from None
        if not cpus:
            raise TopologyError("cpus: a pool needs at least one CPU")
        try:
            self._pool = _native.Pool(cpus, caller_is_worker0)
        except ValueError as e:
            raise TopologyError(f"cannot create a thread pool on CPUs {cpus}: {e}") from None
        if spin_us is not None:
            self._pool.set_spin_ns(int(spin_us * 1000))
        self.cpus = cpus
        self.caller_is_worker0 = caller_is_worker0

    @property
    def size(self) -> int:
        return len(self.cpus)

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def stats(self) -> dict:
        """{'threads', 'cpus', 'tasks', 'busy_ns', 'wait_ns' (lists per thread),
        'busy_ns_total', 'wait_ns_total'}; busy = inside tasks, wait = waiting for
        the pool's other threads (barriers, and the caller after its own slice)."""
        if self.closed:
            raise ShapeError("pool: the ThreadPool is closed")
        s = self._pool.stats()
        s["busy_ns_total"] = sum(s["busy_ns"])
        s["wait_ns_total"] = sum(s["wait_ns"])
        return s

    def reset_stats(self) -> None:
        self._check_open()
        self._pool.reset_stats()

    def noop(self) -> None:
        """Dispatch and finish one empty task."""
        self._check_open()
        self._pool.noop_latency(1)

    def _check_open(self) -> None:
        if self.closed:
            raise ShapeError("pool: the ThreadPool is closed")

    def noop_latency(self, n: int = 1000) -> np.ndarray:
        """ns taken by each of n empty tasks (submit to completion)."""
        if self.closed:
            raise ShapeError("pool: the ThreadPool is closed")
        return np.asarray(self._pool.noop_latency(int(n)), dtype=np.int64)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ThreadPool(cpus={self.cpus}, caller_is_worker0={self.caller_is_worker0}, closed={self.closed})"


def _f32_vector(name: str, a) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 1:
        raise ShapeError(f"{name}: expected a 1-D float32 array, got shape {a.shape}")
    return a


def silu_mul(g, u) -> np.ndarray:
    """silu(g) * u with the engine's vector exp (mn_vmath.c), at the active SIMD level."""
    g = _f32_vector("g", g).copy()
    u = _f32_vector("u", u)
    if g.shape != u.shape:
        raise ShapeError(f"silu_mul: g has shape {g.shape}, u has {u.shape}")
    _native.silu_mul_ptr(_addr(g), _addr(u), g.size)
    return g


def exp_sum(x, shift: float = 0.0) -> tuple[np.ndarray, float]:
    """(exp(x - shift), its sum) with the vector exp flash attention's softmax uses."""
    y = _f32_vector("x", x).copy()
    return y, _native.exp_sum_ptr(_addr(y), y.size, float(shift))


def max_of(x, init: float = float("-inf")) -> float:
    """max(init, x) with NaNs passed over: the vector maximum of flash attention's softmax."""
    x = _f32_vector("x", x)
    return _native.max_of_ptr(_addr(x), x.size, float(init))


@contextlib.contextmanager
def limit_blas_threads(n: int = 1):
    """Limit numpy's BLAS (and OpenMP) threads while pools own the cores."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=n):
        yield


def read_sum(x: np.ndarray, pool: "ThreadPool | None" = None, prefetch: bool = False) -> float:
    """Sum of a float32 array read by the pool's threads (a STREAM-like read);
    prefetch adds software prefetch ahead of the loads, as the kernels do."""
    _check_float(x, "x", tuple(range(1, 8)))
    return _native.read_sum_ptr(_addr(x), x.size, _pool_native(pool), prefetch)


# ------------------------------------------------------------------------ MoE
def _expert_list(ws, name: str, n_expert: int | None):
    if isinstance(ws, np.ndarray) and ws.ndim == 3:
        ws = [ws[i] for i in range(ws.shape[0])]
    if not isinstance(ws, (list, tuple)):
        raise ShapeError(f"{name}: expected a list of per-expert uint8 arrays or a 3-D array "
                         f"[n_expert, rows, row_bytes], got {type(ws).__name__}")
    if n_expert is not None and len(ws) != n_expert:
        raise ShapeError(f"{name}: has {len(ws)} experts, expected {n_expert} (as gate)")
    return list(ws)


def moe_experts(x: np.ndarray, gate, up, down, types, experts, tokens, weights,
                out: np.ndarray | None = None, pool: "ThreadPool | None" = None) -> np.ndarray:
    """Fused MoE layer over local experts, in one native call:
    for each assignment a: out[tokens[a]] += weights[a] * down_e @ (SiLU(gate_e @ x_t) * (up_e @ x_t)),
    e = experts[a], t = tokens[a].

    x: float32 [n_tok, hidden].  gate, up: per-expert uint8 [inter, row_bytes]
    arrays (a list, None for experts not held here, or a 3-D array [n_expert,
    inter, row_bytes]); down: per-expert [hidden, row_bytes(inter)].  Each list's
    experts must share one row stride.  types: (gate_type, up_type, down_type) or
    one type for all.  experts, tokens: int arrays [n_assign] (expert index into
    the lists, token row of x); weights: float [n_assign].  out: float32 [n_tok,
    hidden], accumulated into (created as zeros when None).  Returns out."""
    if isinstance(types, (list, tuple)):
        if len(types) != 3:
            raise ShapeError(f"types: expected (gate_type, up_type, down_type), got {types!r}")
        tg, tu, td = (_qtype(t) for t in types)
    else:
        tg = tu = td = _qtype(types)
    _check_float(x, "x", (2,))
    n_tok, hidden = x.shape
    gate = _expert_list(gate, "gate", None)
    n_expert = len(gate)
    if n_expert == 0:
        raise ShapeError("gate: no experts")
    up = _expert_list(up, "up", n_expert)
    down = _expert_list(down, "down", n_expert)
    inter = None
    for e in range(n_expert):
        if gate[e] is not None and isinstance(gate[e], np.ndarray) and gate[e].ndim == 2:
            inter = gate[e].shape[0]
            break
    if inter is None:
        raise ShapeError("gate: no expert has weights")
    ptrs, strides = {}, {}
    for name, ws, t, rows, cols in (("gate", gate, tg, inter, hidden), ("up", up, tu, inter, hidden),
                                    ("down", down, td, hidden, inter)):
        p = np.zeros(n_expert, dtype=np.uint64)
        stride = None
        for e, w in enumerate(ws):
            if w is None:
                continue
            _check_weights(w, t, cols, f"{name}[{e}]", rows)
            if stride is None:
                stride = w.strides[0]
            elif w.strides[0] != stride:
                raise ShapeError(f"{name}[{e}]: row stride {w.strides[0]} differs from the other experts' {stride}")
            p[e] = _addr(w)
        if stride is None:
            raise ShapeError(f"{name}: no expert has weights")
        ptrs[name], strides[name] = p, stride
    experts = np.asarray(experts)
    tokens = np.asarray(tokens)
    weights = np.asarray(weights)
    for name, arr in (("experts", experts), ("tokens", tokens)):
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ShapeError(f"{name}: expected a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
    if weights.ndim != 1 or (weights.size and weights.dtype.kind not in "fiu"):
        raise ShapeError(f"weights: expected a 1-D array of numbers, got dtype {weights.dtype} shape {weights.shape}")
    n_assign = experts.shape[0]
    if tokens.shape[0] != n_assign or weights.shape[0] != n_assign:
        raise ShapeError(f"experts, tokens, weights: lengths differ ({n_assign}, {tokens.shape[0]}, {weights.shape[0]})")
    if n_assign:
        bad = np.flatnonzero((experts < 0) | (experts >= n_expert))
        if bad.size:
            raise ShapeError(f"experts[{bad[0]}] = {experts[bad[0]]} is out of range [0, {n_expert})")
        bad = np.flatnonzero((tokens < 0) | (tokens >= n_tok))
        if bad.size:
            raise ShapeError(f"tokens[{bad[0]}] = {tokens[bad[0]]} is out of range [0, {n_tok})")
        for name in ("gate", "up", "down"):
            missing = np.flatnonzero(ptrs[name][experts] == 0)
            if missing.size:
                raise ShapeError(f"experts[{missing[0]}] = {experts[missing[0]]}: that expert has no {name} weights here")
    if out is None:
        out = np.zeros((n_tok, hidden), dtype=np.float32)
    else:
        _check_float(out, "out", (2,), writeable=True)
        if out.shape != (n_tok, hidden):
            raise ShapeError(f"out: expected shape {(n_tok, hidden)}, got {out.shape}")
    if n_assign == 0:
        return out
    e32 = np.ascontiguousarray(experts, dtype=np.int32)
    t32 = np.ascontiguousarray(tokens, dtype=np.int32)
    w32 = np.ascontiguousarray(weights, dtype=np.float32)
    nbytes = _native.moe_scratch_bytes(int(tg), int(tu), int(td), hidden, inter, n_expert, n_assign, n_tok)
    scratch = _aligned_empty(nbytes)
    try:
        _native.moe_ptr(int(tg), int(tu), int(td), hidden, inter, n_expert,
                        _addr(ptrs["gate"]), strides["gate"], _addr(ptrs["up"]), strides["up"],
                        _addr(ptrs["down"]), strides["down"], n_assign, _addr(e32), _addr(t32), _addr(w32),
                        _addr(x), n_tok, hidden, _addr(out), hidden, _addr(scratch), nbytes, _pool_native(pool))
    except ValueError as e:
        raise ShapeError(str(e)) from None
    return out
