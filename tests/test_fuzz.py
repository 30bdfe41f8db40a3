"""Fuzzed inputs: mutated GGUF files of every preset and quant type, random
expert maps (YAML text and structures), random API arguments. Each input is
accepted or refused with a MoeNumaError: never a crash, a hang or another
exception type.

Mutated files are loaded (engine backend, then a forward pass) by a worker
process (tests/fuzz_worker.py), many per process, so that a segfault fails the
test, naming the mutation, instead of killing pytest; the worker's timeout
turns a hang into a failure. Sizes fit CI: the `ci` hypothesis profile is
derandomized, the whole file runs in about a minute."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings, strategies as st

import moe_numa
from moe_numa.errors import MoeNumaError

from conftest import TEST_PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "fuzz_worker.py")
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q2_k", "q3_k", "q4_k_m"]
# every type once, spread over the presets (each preset gets 2-3 types)
FILES = [(TEST_PRESETS[i % len(TEST_PRESETS)], t) for i, t in enumerate(TYPES)]
MUTANTS_PER_FILE = 10
EXTREMES = [0, 1, 2, 0xFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, 1 << 40]


def layout(path) -> dict:
    """Byte regions of a GGUF file and its integer slots (counts, lengths, dims, types, offsets)."""
    r = GGUFReader(path)
    size = os.path.getsize(path)
    slots = [(4, 4), (8, 8), (16, 8)]          # version, tensor count, kv count

    def add(field):
        pos = field.offset
        for part in field.parts:
            if part.dtype.kind in "iu" and part.nbytes in (1, 2, 4, 8) and part.size == 1:
                slots.append((pos, part.nbytes))
            pos += part.nbytes
    fields = list(r.fields.values())
    for f in fields:
        if not f.name.startswith("GGUF."):
            add(f)
    for t in r.tensors:
        add(t.field)
    kv_start = min(f.offset for f in fields if not f.name.startswith("GGUF."))
    ti_start = min(t.field.offset for t in r.tensors)
    data_start = min(int(t.data_offset) for t in r.tensors)
    return {"size": size, "slots": slots,
            "regions": [(0, 24), (kv_start, ti_start), (ti_start, data_start), (data_start, size)]}


def mutation():
    """One mutation, as plain data: applied by `mutate` to a file's bytes."""
    frac = st.floats(0, 1, exclude_max=True)
    return st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 3), frac, st.integers(1, 255)),
        st.tuples(st.just("zero"), st.integers(0, 2), frac, st.integers(1, 64)),
        st.tuples(st.just("extreme"), frac, st.sampled_from(EXTREMES)),
        st.tuples(st.just("truncate"), frac),
    )


def mutate(blob: bytes, lay: dict, m: tuple) -> bytes:
    b = bytearray(blob)
    kind = m[0]
    if kind in ("flip", "zero"):
        a, e = lay["regions"][m[1]]
        pos = a + int(m[2] * (e - a))
        if kind == "flip":
            b[pos] ^= m[3]
        else:
            b[pos:pos + m[3]] = bytes(len(b[pos:pos + m[3]]))
    elif kind == "extreme":
        pos, n = lay["slots"][int(m[1] * len(lay["slots"]))]
        b[pos:pos + n] = (m[2] % (1 << (8 * n))).to_bytes(n, "little")
    else:
        del b[int(m[1] * len(b)):]
    return bytes(b)


def run_worker(paths: list[str], timeout: float = 120) -> list[dict]:
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, WORKER], input="\n".join(paths) + "\n", cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = "timeout", "hang"
    results: dict[int, dict] = {}
    started = []
    for line in out.splitlines():
        if line.startswith("START "):
            started.append(int(line.split()[1]))
        elif line.startswith("RESULT "):
            _, i, js = line.split(" ", 2)
            results[int(i)] = json.loads(js)
    missing = [i for i in started if i not in results]
    assert not missing and rc == 0, f"worker died (rc {rc}) on {paths[missing[0]] if missing else '?'}:\n{err[-3000:]}"
    return [results[i] for i in range(len(paths))]


@pytest.mark.slow
@pytest.mark.parametrize("preset,qtype", FILES)
@settings(max_examples=1, suppress_health_check=list(HealthCheck), deadline=None)
@given(muts=st.lists(mutation(), min_size=MUTANTS_PER_FILE, max_size=MUTANTS_PER_FILE))
def test_mutated_files_load_or_raise_moe_numa_errors(make_model, tmp_path_factory, preset, qtype, muts):
    clean = make_model(preset, qtype)
    blob = open(clean, "rb").read()
    lay = layout(clean)
    d = tmp_path_factory.mktemp(f"mutants-{preset}-{qtype}")
    paths = []
    for i, m in enumerate(muts):
        p = d / f"m{i}.gguf"
        p.write_bytes(mutate(blob, lay, m))
        paths.append(str(p))
    results = run_worker(paths)
    foreign = [(muts[i], r) for i, r in enumerate(results) if r["outcome"] == "foreign"]
    assert not foreign, f"{preset} {qtype}: exceptions other than MoeNumaError: {foreign[:3]}"
    for p in paths:
        os.unlink(p)


def test_truncation_anywhere_names_what_is_missing(make_model, tmp_path):
    """Cut a file at many points: each is refused with a GGUFError naming the file; inside the data,
    the message names the tensor and the byte counts."""
    clean = make_model("qwen3moe", "q4_k")
    blob = open(clean, "rb").read()
    lay = layout(clean)
    data_start = lay["regions"][3][0]
    cuts = sorted({1, 4, 23, 24, 100, data_start - 1, data_start + 1, len(blob) - 1} |
                  {int(f * len(blob)) for f in np.linspace(0.01, 0.99, 9)})
    paths = []
    for c in cuts:
        p = tmp_path / f"cut{c}.gguf"
        p.write_bytes(blob[:c])
        paths.append(str(p))
    results = run_worker(paths)
    for c, r in zip(cuts, results):
        assert r["outcome"] == "error", (c, r)
        if c > data_start:
            assert "tensor '" in r["message"] and "bytes" in r["message"], (c, r["message"])


# ----------------------------------------------------------------- expert maps
N_EXPERT = 8
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8) | st.integers(-2, 9),
                                                                       children, max_size=5),
    max_leaves=20)


def map_like():
    """Structures close to a valid map, with any part replaced by junk."""
    experts = st.dictionaries(st.integers(-1, 4) | st.text(max_size=3),
                              st.lists(st.integers(-2, N_EXPERT + 1) | st.text(max_size=2), max_size=10) | yaml_values,
                              max_size=4)
    return st.fixed_dictionaries(
        {"model": st.fixed_dictionaries({"n_expert": st.integers(-1, 10) | yaml_values}) | yaml_values,
         "nodes": st.lists(st.integers(-1, 4), max_size=4) | yaml_values,
         "experts": experts | yaml_values},
        optional={"layers": st.dictionaries(st.integers(-1, 3) | st.text(max_size=2), experts | yaml_values,
                                            max_size=2),
                  "version": yaml_values})


@settings(max_examples=150)
@given(obj=map_like() | yaml_values)
def test_random_expert_map_structures(obj):
    from moe_numa.numa.expert_map import load_map
    try:
        emap = load_map(obj, N_EXPERT)
    except MoeNumaError:
        return
    # accepted: every expert has exactly one node
    owners = emap.owners if hasattr(emap, "owners") else None
    assert emap is not None and (owners is None or len(owners) == N_EXPERT)


@settings(max_examples=150)
@given(text=st.text(max_size=200) | st.builds(lambda o: yaml.safe_dump(o), map_like()))
def test_random_expert_map_yaml(tmp_path_factory, text):
    from moe_numa.numa.expert_map import load_map
    p = tmp_path_factory.mktemp("maps") / "m.yaml"
    p.write_text(text)
    try:
        load_map(str(p), N_EXPERT)
    except MoeNumaError:
        pass


# ----------------------------------------------------------------- API arguments
@pytest.fixture(scope="module")
def engine_model(make_model):
    m = moe_numa.load(make_model("qwen2moe", "q8_0"), n_ctx=48, numa_nodes=2)
    yield m
    m.close()


any_number = st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
maybe_junk = any_number | st.none() | st.text(max_size=3) | st.booleans()


@settings(max_examples=60)
@given(ids=st.lists(st.integers(-2**40, 2**40) | st.integers(0, 7000), min_size=0, max_size=60),
       max_tokens=st.integers(-3, 6) | maybe_junk,
       temperature=maybe_junk, top_k=maybe_junk, top_p=maybe_junk, min_p=maybe_junk,
       repeat_penalty=maybe_junk, repeat_last_n=maybe_junk, seed=st.none() | st.integers(-2**70, 2**70) | st.text(max_size=2))
def test_random_generate_arguments(engine_model, ids, max_tokens, temperature, top_k, top_p, min_p,
                                   repeat_penalty, repeat_last_n, seed):
    m = engine_model
    try:
        out = m.generate(ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
    except MoeNumaError:
        return
    assert isinstance(out, str)


@settings(max_examples=30)
@given(n_ctx=st.integers(-5, 2**62) | maybe_junk, ids=st.lists(st.integers(-5, 7000), max_size=20))
def test_random_n_ctx_and_logits_ids(make_model, n_ctx, ids):
    path = make_model("qwen3moe", "q8_0")
    try:
        m = moe_numa.load(path, backend="reference", n_ctx=n_ctx)
    except MoeNumaError:
        return
    try:
        out = m.logits(ids)
        assert out.shape == (len(ids), m.config.n_vocab)
    except MoeNumaError:
        pass
    finally:
        m.close()
