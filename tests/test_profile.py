"""Routing profiles and the maps made from them: the profile records what the
router did (counts and per-token selections agree with each other and with the
engine's counters), the map search never projects worse than contiguous whole
placement and wins under skew, and every map it writes runs and matches the
reference."""
import numpy as np
import pytest
import yaml

import moe_numa
from moe_numa.cli import main
from moe_numa.errors import MoeNumaError
from moe_numa.numa.expert_map import load_map
from moe_numa.numa.profile import LayerPlacement, Profile, collect, critical_path, make_profile_map

PROMPTS = ["Hello there, tell me about NUMA machines.", "Once upon a time there was a socket with many cores."]


def test_profile_records_the_routing(make_model, tmp_path):
    with moe_numa.load(make_model("deepseek-v3", "q8_0"), numa_nodes=2, rebalance_every=None) as m:
        prof = collect(m, PROMPTS)
        n_tok = sum(len(m.tokenize(p)) for p in PROMPTS)
    cfg_used = 4
    assert prof.tokens == n_tok and sorted(prof.counts) == [1, 2]         # deepseek-v3 preset: layer 0 dense
    for layer, counts in prof.counts.items():
        t = prof.trace[layer]
        assert counts.sum() == n_tok * cfg_used and t.shape == (n_tok, cfg_used)
        assert all(len(set(row)) == cfg_used for row in t.tolist())
        co = prof.co_selection(layer)
        np.testing.assert_array_equal(np.diag(co), counts)              # the trace covers every token here
        assert (co == co.T).all() and co.sum() == n_tok * cfg_used ** 2
    path = tmp_path / "p.json"
    import json
    path.write_text(json.dumps(prof.to_json()))
    again = Profile.load(path)
    for layer in prof.counts:
        np.testing.assert_array_equal(again.trace[layer], prof.trace[layer])
    path.write_text("{}")
    with pytest.raises(MoeNumaError, match="not a routing profile"):
        Profile.load(path)


def skewed_profile(n_expert=16, n_used=4, tokens=400, seed=0):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_expert + 1) ** 1.2            # Zipf-like popularity
    p = p[rng.permutation(n_expert)]
    p /= p.sum()
    trace = np.array([rng.choice(n_expert, n_used, replace=False, p=p) for _ in range(tokens)])
    counts = np.bincount(trace.ravel(), minlength=n_expert)
    return Profile(n_expert, n_used, tokens, {1: counts, 2: counts.copy()}, {1: trace, 2: trace.copy()})


@pytest.mark.parametrize("n_nodes", [2, 4])
def test_maps_from_a_profile_shorten_the_critical_path(n_nodes):
    prof = skewed_profile()
    paths = {}
    for strategy in ("whole", "split", "hybrid"):
        emap, proj = make_profile_map(prof, 16, n_nodes, [1, 2], ffn_blocks=8, strategy=strategy, replica_slots=8)
        base, chosen = proj["mean"]
        assert chosen <= base + 1e-9                       # never worse than contiguous whole
        paths[strategy] = chosen
        load_map(emap.to_yaml_dict())                      # a valid map
        if strategy == "hybrid":
            assert len(emap.replicas) <= 8
    assert paths["hybrid"] <= paths["whole"] + 1e-9
    contiguous = proj["mean"][0]
    assert contiguous / paths["hybrid"] >= 1.2             # under skew, balance pays


def test_critical_path_follows_the_engine_choice():
    trace = np.array([[0, 1], [0, 2]])
    whole = LayerPlacement([(0,), (0,), (1,)], [False] * 3)
    assert critical_path(trace, whole, 2) == pytest.approx((2 + 1) / 2)
    repl = LayerPlacement([(0,), (0, 1), (1,)], [False] * 3)   # expert 1 runs on node 1 (node 0 has expert 0)
    assert critical_path(trace, repl, 2) == pytest.approx(1.0)
    split = LayerPlacement([(0, 1), (0,), (1,)], [True, False, False])
    assert critical_path(trace, split, 2, split_overhead=0.0) == pytest.approx(1.5)


def test_profile_and_map_commands(make_model, tmp_path, capsys):
    path = str(make_model("qwen3moe", "q8_0"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n".join(PROMPTS))
    prof = tmp_path / "profile.json"
    assert main(["profile", "-m", path, "-f", str(prompts), "-o", str(prof), "--numa-nodes", "2"]) == 0
    out = tmp_path / "map.yaml"
    assert main(["map", "-m", path, "--nodes", "2", "--profile", str(prof), "--replica-budget", "25%",
                 "-o", str(out)]) == 0
    text = out.read_text()
    assert "projected per-token critical path" in text
    assert main(["map", "-m", path, "--nodes", "3"]) == 0            # default without a profile: split
    m = yaml.safe_load(capsys.readouterr().out.split("# projected")[0])
    assert list(m["experts"]) == ["0+1+2"]
    ref = moe_numa.load(path, backend="reference", act_quant=True)
    ids = list(range(30, 40))
    with moe_numa.load(path, numa_nodes=2, expert_map=str(out), replica_budget="25%", rebalance_every=None) as eng:
        got = eng.logits(ids)
    want = ref.logits(ids)
    assert np.median(np.abs(got - want).max(axis=1) / np.abs(want).max()) <= 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75
