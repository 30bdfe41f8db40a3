"""Continuous batching in the engine: several sequences, each in its own
KV-cache slot, advance in one forward_batch step (a prompt chunk of one slot
next to decode tokens of others). Per token the result must be bit-identical
to running that sequence alone (numerics independent of the batch: the tiled
matmuls are checked for it at every SIMD level), and agree with the numpy
reference, on more than one virtual node."""
import numpy as np
import pytest

import moe_numa
from moe_numa import kernels, quants
from moe_numa.errors import ContextOverflowError, MoeNumaError

from conftest import TEST_PRESETS


@pytest.mark.parametrize("qtype", [t.name for t in quants.SUPPORTED])
def test_tiled_matmul_is_per_token_independent(qtype):
    """What the batching relies on: a token's matmul result does not depend on how many
    tokens share the call (tiles of 4/8 accumulate each token on its own, in one order)."""
    t = quants.qtype_from_name(qtype)
    rng = np.random.default_rng(3)
    cpu = kernels.SIMD_LEVELS.index(kernels.simd_level_cpu())
    # the second shape: more blocks than the four-row kernels pack at once, and more
    # tokens than one pass over a packed group (mn_quant.c's MN_MR_BUF, MN_MR_TOK)
    shapes = [(37, 512, (2, 3, 4, 5, 8, 9, 11)), (13, 256 * 19, (2, 3, 66, 70))]
    if kernels.block_size(t) == 32:   # the sixteen-row Q8_0 run: two groups and a rest, more blocks than
        shapes.append((35, 32 * 45, (4, 5, 66)))   # it packs at once; dot's 8-, 4- and 1-block steps
    for rows, cols, counts in shapes:
        raw = kernels.random_blocks(t, rows, cols, rng)
        x = rng.standard_normal((max(counts), cols)).astype(np.float32)
        for level in kernels.SIMD_LEVELS[:cpu + 1]:
            with kernels.simd(level):
                alone = np.stack([kernels.matmul(raw, t, x[i]) for i in range(len(x))])
                for n in counts:
                    got = kernels.matmul(raw, t, np.ascontiguousarray(x[:n]))
                    assert np.array_equal(got, alone[:n]), (level, rows, cols, n)


def _batched(backend, seqs, chunk):
    """Run seqs interleaved: slot k's first step takes chunk[k] tokens, then one per step.
    Returns each sequence's logits [len, vocab] in order."""
    got = [[] for _ in seqs]
    done = [0] * len(seqs)
    while any(d < len(s) for d, s in zip(done, seqs)):
        ids, pos, slot, owner = [], [], [], []
        for k, s in enumerate(seqs):
            take = min(chunk[k] if done[k] == 0 else 1, len(s) - done[k])
            for _ in range(take):
                ids.append(s[done[k]]); pos.append(done[k]); slot.append(k); owner.append(k)
                done[k] += 1
        out = backend.forward_batch(ids, pos, slot)
        for row, k in enumerate(owner):
            got[k].append(out[row])
    return [np.stack(g) for g in got]


def _seqs(cfg, lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.n_vocab, size=n) for n in lengths]


@pytest.mark.parametrize("preset,n_nodes,qtype", [(p, 2, "q8_0") for p in TEST_PRESETS] + [
    ("qwen3moe", None, "q8_0"), ("deepseek-v3", 3, "q4_k_m"), ("qwen2moe", 2, "bf16")])
def test_batched_step_is_bit_identical_to_single_sequences(make_model, preset, n_nodes, qtype):
    path = make_model(preset, qtype)   # n_nodes None: the real topology, all threads in one pool
    with moe_numa.load(path, backend="engine", numa_nodes=n_nodes, n_slots=4, n_ctx=64) as m:
        b = m.backend
        seqs = _seqs(m.config, (7, 12, 9, 3))
        alone = []
        for s in seqs:
            b.reset()
            alone.append(np.concatenate([b.forward(s[i:i + 1]) for i in range(len(s))]))
        # slot 2 prefills 5 tokens in the step where the others decode; slot 3 finishes early
        got = _batched(b, seqs, chunk=(1, 1, 5, 2))
        for k in range(len(seqs)):
            assert np.array_equal(got[k], alone[k]), f"slot {k} differs from its sequence run alone"
        # slot 0 (forward()) is the same cache: a batched step on slots 1.. leaves it alone
        b.reset()
        first = b.forward(seqs[0][:4])
        b.forward_batch(seqs[1][:3], [0, 1, 2], [1, 1, 1])
        nxt = b.forward(seqs[0][4:5])
        assert np.array_equal(np.concatenate([first, nxt]), alone[0][:5])


@pytest.mark.parametrize("preset,n_nodes", [("qwen3moe", 3), ("deepseek-v3", 2), ("deepseek-v2-lite", 2)])
def test_batched_step_matches_reference(make_model, preset, n_nodes):
    path = make_model(preset, "f32")
    # F32 caches: an F16 cache turns summation-order noise into fp16 rounding flips (tests/test_kv_cache.py)
    kv = {"cache_type_k": "f32", "cache_type_v": "f32"}
    ref = moe_numa.load(path, backend="reference", n_slots=3, n_ctx=32, **kv)
    with moe_numa.load(path, backend="engine", numa_nodes=n_nodes, n_slots=3, n_ctx=32, **kv) as m:
        seqs = _seqs(m.config, (6, 10, 4), seed=2)
        got = _batched(m.backend, seqs, chunk=(3, 1, 4))
    batched_ref = _batched(ref.backend, seqs, chunk=(3, 1, 4))   # the reference's own slots, same schedule
    for k, s in enumerate(seqs):
        want = ref.logits(list(s))
        np.testing.assert_allclose(batched_ref[k], want, atol=1e-5 * np.abs(want).max())
        assert np.abs(got[k] - want).max() <= 1e-4 * np.abs(want).max()
        assert (got[k].argmax(-1) == want.argmax(-1)).all()


def test_logit_rows_and_bad_batches(make_model):
    path = make_model("qwen3moe", "q8_0")
    with moe_numa.load(path, backend="engine", n_slots=2, n_ctx=16) as m:
        b = m.backend
        full = b.forward_batch([5, 6, 7], [0, 1, 0], [0, 0, 1])
        last = b.forward_batch([5, 6, 7], [0, 1, 0], [0, 0, 1], logit_rows=[1, 2])
        assert np.array_equal(last, full[1:])
        with pytest.raises(ContextOverflowError):
            b.forward_batch([5], [16], [0])
        with pytest.raises(MoeNumaError, match="slots"):
            b.forward_batch([5], [0], [2])
        with pytest.raises(MoeNumaError, match="twice"):
            b.forward_batch([5, 6], [3, 3], [1, 1])
        with pytest.raises(MoeNumaError, match="n_slots"):
            moe_numa.load(path, backend="engine", n_slots=0)
