"""Split and replicated experts: every placement mode and any mix of them, on 1 to
4 virtual nodes and every architecture, computes what the reference computes (the
tolerances of test_engine.py); the replica choice is greedy and deterministic;
memory is one copy of the GGUF plus the replica budget; rebalancing in every mode
keeps the output; bad maps are refused before any copy, naming the field."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import moe_numa
from moe_numa.errors import ExpertMapError
from moe_numa.numa.expert_map import load_map, make_map
from moe_numa.testing import make_test_model
from moe_numa.testing.writer import variant

from conftest import TEST_PRESETS
from test_engine import F32_KV, _blocks, moe_layers, reference

# expert_ff 256 is one block of a K-quant: only block-32 types can split these models
SPLITTABLE = {"f32", "bf16", "q8_0", "q4_0"}


def mixed_map(cfg, n_nodes, data, split_ok=True):
    """A random map mixing whole, split and replicated experts, with per-layer overrides."""
    E, layers = cfg.n_expert, moe_layers(cfg)

    def owners():
        out = {}
        for e in range(E):
            mode = data.draw(st.sampled_from(["whole", "split"] if split_ok and n_nodes > 1 else ["whole"]))
            if mode == "split":
                nodes = data.draw(st.lists(st.integers(0, n_nodes - 1), min_size=2, max_size=n_nodes, unique=True))
                key = "+".join(map(str, nodes))
            else:
                key = data.draw(st.integers(0, n_nodes - 1))
            out.setdefault(key, []).append(e)
        return out
    d = {"model": {"n_expert": E}, "nodes": list(range(n_nodes)), "experts": owners()}
    if data.draw(st.booleans()):
        d["layers"] = {data.draw(st.sampled_from(layers)): owners()}
    replicas = []
    if n_nodes > 1:
        for layer in layers:
            own = d.get("layers", {}).get(layer, d["experts"])
            whole = {e: k for k, es in own.items() if isinstance(k, int) for e in es}
            for e in data.draw(st.lists(st.sampled_from(sorted(whole)), unique=True, max_size=3)) if whole else []:
                others = [m for m in range(n_nodes) if m != whole[e]]
                replicas.append({"layer": layer, "expert": e,
                                 "nodes": data.draw(st.lists(st.sampled_from(others), min_size=1, unique=True))})
    d["replicas"] = replicas
    return d


@settings(max_examples=16)
@given(preset=st.sampled_from(TEST_PRESETS), qtype=st.sampled_from(["f32", "bf16"]),
       n_nodes=st.integers(1, 4), data=st.data())
def test_mixed_modes_float_match_reference(make_model, preset, qtype, n_nodes, data):
    ref = reference(make_model, preset, qtype, "f32")
    emap = mixed_map(ref.config, n_nodes, data)
    n = data.draw(st.integers(1, 10))
    ids = data.draw(st.lists(st.integers(0, ref.config.n_vocab - 1), min_size=n + 2, max_size=n + 2))
    with moe_numa.load(make_model(preset, qtype), numa_nodes=n_nodes, expert_map=emap, rebalance_every=None,
                       replica_budget=1.0, **F32_KV) as eng:
        eng.backend.reset()
        got = [eng.backend.forward(np.array(ids[:n]))] + [eng.backend.forward(np.array([t])) for t in ids[n:]]
        got = np.concatenate(got)
    want = ref.logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


@settings(max_examples=16)
@given(preset=st.sampled_from(TEST_PRESETS), qtype=st.sampled_from(["q8_0", "q4_k_m", "q6_k", "q4_0"]),
       n_nodes=st.integers(1, 4), data=st.data())
def test_mixed_modes_quantized_blocks_match_reference(make_model, preset, qtype, n_nodes, data):
    ref = reference(make_model, preset, qtype)
    emap = mixed_map(ref.config, n_nodes, data, split_ok=qtype in SPLITTABLE)
    ids = data.draw(st.lists(st.integers(0, ref.config.n_vocab - 1), min_size=1, max_size=12))
    with moe_numa.load(make_model(preset, qtype), numa_nodes=n_nodes, expert_map=emap, rebalance_every=None,
                       replica_budget=1.0) as eng:
        errs = _blocks(ref, eng, ids)
    assert np.median(errs) <= 1e-4
    assert errs.max() <= 3e-2


@pytest.mark.parametrize("qtype", ["q4_k_m", "q6_k"])
def test_k_quant_experts_split_on_256_blocks(model_dir, qtype):
    """A K-quant expert with a 512-wide FFN splits 2 ways (one 256-block each)."""
    path = make_test_model(model_dir / f"ff512-{qtype}.gguf", "qwen3moe", qtype,
                           spec=variant("qwen3moe", expert_ff=512))
    ref = moe_numa.load(path, backend="reference", act_quant=True)
    with moe_numa.load(path, numa_nodes=2, expert_map="split", rebalance_every=None) as eng:
        assert all(len(lp.slices) == 8 for lp in eng.backend.plan.layers)
        errs = _blocks(ref, eng, list(range(30, 40)))
    assert np.median(errs) <= 1e-4 and errs.max() <= 3e-2


def test_split_slices_partition_each_expert(make_model):
    path = make_model("deepseek-v3", "q8_0")
    with moe_numa.load(path, numa_nodes=3, expert_map="split", rebalance_every=None) as eng:
        b = eng.backend
        ffn = b.weights.layers[1].ffn
        for e in range(16):
            slices = b.plan.layers[1].slices[e]
            assert sorted(slices) == [0, 1, 2]
            rows = sorted(slices.values())
            assert rows[0][0] == 0 and rows[-1][1] == 256 and all(a[1] == c[0] for a, c in zip(rows, rows[1:]))
            for node, (f0, f1) in slices.items():
                assert f0 % 32 == 0 and f1 % 32 == 0
                np.testing.assert_array_equal(b.store.arrays[(node, f"L1.e{e}.gate")], ffn.gate_exps.raw[e][f0:f1])
                np.testing.assert_array_equal(b.store.arrays[(node, f"L1.e{e}.down")],
                                              ffn.down_exps.raw[e][:, f0 // 32 * 34: f1 // 32 * 34])
        rep = b.placement_report()
        placed = sum(nd["bytes_by_class"].get("routed_experts", 0) for nd in rep["nodes"])
        assert placed == sum(t.nbytes for t in eng.gguf if "_exps" in t.name)   # one copy, cut in three
        assert rep["replica_bytes"] == 0


def all_replicated(cfg, n_nodes):
    return {"model": {"n_expert": cfg.n_expert}, "nodes": list(range(n_nodes)),
            "experts": {0: f"0-{cfg.n_expert - 1}"},
            "replicas": [{"layer": l, "expert": e, "nodes": list(range(1, n_nodes))}
                         for l in moe_layers(cfg) for e in range(cfg.n_expert)]}


def test_replica_choice_is_greedy_and_deterministic(make_model):
    path = make_model("qwen3moe", "f32")
    cfg = moe_numa.load(path, backend="reference").config
    n_moe = len(moe_layers(cfg))
    runs = []
    for _ in range(2):
        with moe_numa.load(path, numa_nodes=2, expert_map=all_replicated(cfg, 2), rebalance_every=None,
                           replica_budget=1.0) as eng:
            b = eng.backend
            out = [b.forward(np.array([5 + t])) for t in range(6)]   # decode, one token at a time
            # top-2, both experts on both nodes, nothing else loaded: one each, every layer, every token
            assert b.counters()["moe_assign"] == [6 * n_moe, 6 * n_moe]
            b.reset_counters()
            out.append(b.forward(np.arange(40, 72)))                 # prefill: whole experts per batch
            a = b.counters()["moe_assign"]
            assert sum(a) == 32 * cfg.router.n_used * n_moe and min(a) > 0
            runs.append(np.concatenate(out))
    np.testing.assert_array_equal(runs[0], runs[1])               # no dependence on timing


def test_replica_choice_counts_whole_and_split_load(make_model):
    """A replicated expert goes to the holder with less work from whole/split experts."""
    path = make_model("qwen3moe", "f32")
    E = 8
    # node 0 owns every other expert whole; expert 7 has copies on both nodes: it must always run on
    # node 1 when node 0 has another selected expert, and on node 0 (lower id) only when tied.
    emap = {"model": {"n_expert": E}, "nodes": [0, 1], "experts": {0: "0-7"},
            "replicas": [{"layer": l, "expert": 7, "nodes": [1]} for l in (0, 1)]}
    with moe_numa.load(path, numa_nodes=2, expert_map=emap, rebalance_every=None, replica_budget=1.0) as eng:
        b = eng.backend
        for t in range(8):
            b.reset_counters()
            b.forward(np.array([100 + t]))
            sel7 = sum(int(c[7]) for c in b.counters()["expert_tokens"])
            assert b.counters()["moe_assign"][1] == sel7      # expert 7, whenever selected, on node 1


def test_memory_is_one_copy_plus_the_replica_budget(make_model):
    path = make_model("deepseek-v3", "q8_0")
    cfg = moe_numa.load(path, backend="reference").config
    emap = {"model": {"n_expert": 16}, "nodes": [0, 1], "experts": {0: "2-8", 1: "9-15", "0+1": "0-1"},
            "replicas": [{"layer": l, "expert": 3, "nodes": [1]} for l in moe_layers(cfg)]}
    with moe_numa.load(path, numa_nodes=2, expert_map=emap, rebalance_every=None, replica_budget="10%") as eng:
        b = eng.backend
        rep = b.placement_report()
        exps = sum(t.nbytes for t in eng.gguf if "_exps" in t.name)
        by = lambda cls: sum(nd["bytes_by_class"].get(cls, 0) for nd in rep["nodes"])
        copy = b._expert_copy_bytes(1)
        assert by("routed_experts") == exps
        assert by("expert_replicas") == rep["replica_bytes"] == copy * len(moe_layers(cfg))
        assert rep["replica_budget_bytes"] == int(0.10 * exps) >= rep["replica_bytes"]
        assert rep["expert_modes"] == {"whole": 13 * len(moe_layers(cfg)), "split": 2 * len(moe_layers(cfg)),
                                       "replicated": len(moe_layers(cfg))}
        # rebalancing adds replicas only within the budget
        for c in b.expert_tokens:
            c[:] = 1
            c[9:12] = 500          # node 1's experts are hot
        b.rebalance(min_tokens=1, tolerance=0.0)
        rep = b.placement_report()
        assert rep["replica_bytes"] <= rep["replica_budget_bytes"]
        assert by("routed_experts") == exps


def test_rebalance_replicates_hot_drops_cold_and_keeps_the_output(make_model):
    path = make_model("qwen3moe", "f32")
    emap = {"model": {"n_expert": 8}, "nodes": [0, 1], "experts": {0: "1-6", 1: "7", "0+1": "0"},
            "replicas": [{"layer": 0, "expert": 5, "nodes": [1]}]}
    with moe_numa.load(path, numa_nodes=2, expert_map=emap, rebalance_every=None, replica_budget="30%") as m:
        b = m.backend
        ids = list(range(20, 50))
        before = m.logits(ids)
        for c in b.expert_tokens:
            c[:] = [10, 90, 80, 5, 5, 1, 5, 10]      # experts 1, 2 hot on node 0; replicated 5 is cold
        report = m.rebalance(min_tokens=1)
        r0 = report[0]
        assert (5, 1) in r0["dropped"] and 5 not in b.plan.layers[0].replicas
        assert {e for e, _ in r0["replicated"]} <= {1, 2} and r0["replicated"]
        assert r0["after"] < r0["before"]
        for e, node in r0["replicated"]:
            assert node in b.plan.layers[0].replicas[e] and node in b.plan.expert_map.holders(0, e)
            np.testing.assert_array_equal(b.store.arrays[(node, f"L0.e{e}.down")],
                                          m.weights.layers[0].ffn.down_exps.raw[e])
        assert (1, "L0.e5.gate") not in b.store.arrays
        assert b.placement_report()["replica_bytes"] <= b.replica_budget
        again = load_map(b.plan.expert_map.to_yaml_dict())      # the map in force is a valid map
        assert again.replicas == b.plan.expert_map.replicas
        np.testing.assert_allclose(m.logits(ids), before, atol=1e-5 * np.abs(before).max())


def test_counters_report_balance(make_model):
    with moe_numa.load(make_model("qwen3moe", "q8_0"), numa_nodes=3, rebalance_every=None) as m:
        m.logits(list(range(10, 30)))
        c = m.backend.counters()
        assert len(c["node_busy_ns"]) == len(c["node_wait_ns"]) == 3 and min(c["node_busy_ns"]) > 0
        assert c["imbalance"] >= 1.0 and c["ffn_imbalance"] >= 1.0
        assert c["critical_ns"] >= max(c["node_busy_ns"]) * 0.999
        # a node's busy time plus its waits is the critical path, for every node
        for busy, wait in zip(c["node_busy_ns"], c["node_wait_ns"]):
            assert busy + wait == c["critical_ns"]
        lf = c["last_forward"]
        assert lf["tokens"] == 20 and lf["imbalance"] >= 1.0 and len(lf["node_wait_ns"]) == 3
        assert "imbalance" in m.placement_report()["balance"]


def split_map(**changes):
    d = {"model": {"n_expert": 8}, "nodes": [0, 1], "experts": {0: "2-4", 1: "5-7", "0+1": "0-1"}}
    d.update(changes)
    return d


BAD = [
    (split_map(experts={0: "2-4", 1: "5-7", "0+5": "0-1"}), r"experts\.0\+5: node 5 is unknown"),
    (split_map(experts={0: "2-4", 1: "5-7", "0+0": "0-1"}), r"experts\.0\+0: a split lists node 0 twice"),
    (split_map(experts={0: "2-4", 1: "5-7", "0+x": "0-1"}), r"experts\.0\+x: not a node id or a split"),
    (split_map(experts={0: "1-4", 1: "5-7", "0+1": "0-1"}), r"experts\.0\+1: expert 1 is listed twice \(nodes 0 and 0\+1\)"),
    (split_map(replicas=[{"layer": 1, "expert": 0, "nodes": [1]}]), r"replicas\[0\]: expert 0 of layer 1 is split \(0\+1\)"),
    (split_map(replicas=[{"layer": 1, "expert": 2, "nodes": []}]), r"replicas\[0\]\.nodes: empty"),
    (split_map(replicas=[{"layer": 1, "expert": 2, "nodes": [1, 1]}]), r"replicas\[0\]\.nodes: node ids must be distinct"),
    (split_map(replicas=[{"layer": 1, "expert": 2, "nodes": [1]}, {"layer": 1, "expert": 2, "nodes": [1]}]),
     r"replicas\[1\]: expert 2 of layer 1 already has replicas"),
    (split_map(replicas=[{"layer": "x", "expert": 2, "nodes": [1]}]), r"replicas\[0\]\.layer: not a layer number"),
    (split_map(replicas=[{"layer": 1, "expert": 2, "nodes": [1], "copies": 2}]), r"replicas\[0\]\.copies: unknown field"),
]


@pytest.mark.parametrize("data,message", BAD)
def test_invalid_split_and_replica_maps_name_the_field(data, message):
    with pytest.raises(ExpertMapError, match=message):
        load_map(data)


def test_bad_placements_refused_before_any_copy(make_model, monkeypatch):
    from moe_numa.engine import backend

    def boom(*a, **k):
        raise AssertionError("weights were copied")
    monkeypatch.setattr(backend.NodeStore, "materialize", boom)
    kq = make_model("qwen3moe", "q4_k_m")
    with pytest.raises(ExpertMapError, match=r"experts\.0\+1: expert 0 of layer 0 cannot be split 2 ways: its FFN "
                                             r"size 256 has 1 GGML block\(s\) of 256"):
        moe_numa.load(kq, numa_nodes=2, expert_map=split_map())
    with pytest.raises(ExpertMapError, match=r"layers\.1\.0\+1: expert 0 of layer 1 cannot be split"):
        moe_numa.load(kq, numa_nodes=2, expert_map=split_map(experts={0: "0-3", 1: "4-7"},
                                                             layers={1: split_map()["experts"]}))
    f32 = make_model("qwen3moe", "f32")
    reps = split_map(replicas=[{"layer": 0, "expert": 2, "nodes": [1]}])
    with pytest.raises(ExpertMapError, match=r"replicas: the map's replicas take \d+ bytes, over the replica "
                                             r"budget of 0 bytes"):
        moe_numa.load(f32, numa_nodes=2, expert_map=reps, replica_budget=0)
    with pytest.raises(ExpertMapError, match="replica_budget: 'lots' is not a fraction"):
        moe_numa.load(f32, numa_nodes=2, expert_map=reps, replica_budget="lots")
    with pytest.raises(ExpertMapError, match=r"replicas: layer 3 \(expert 2\): not an MoE layer"):
        moe_numa.load(f32, numa_nodes=2, expert_map=split_map(replicas=[{"layer": 3, "expert": 2, "nodes": [1]}]))


@given(n_expert=st.integers(1, 300), n_nodes=st.integers(1, 8), blocks=st.integers(1, 16))
def test_split_strategy_maps_round_trip(n_expert, n_nodes, blocks):
    m = make_map(n_expert, n_nodes, "split", ffn_blocks=blocks)
    again = load_map(m.to_yaml_dict())
    assert again.default == m.default
    k = min(n_nodes, blocks)
    for e in range(n_expert):
        assert len(m.holders(0, e)) == k and m.mode(0, e) == ("split" if k > 1 else "whole")
    loads = [sum(1 / k for e in range(n_expert) if node in m.holders(0, e)) for node in range(n_nodes)]
    assert max(loads) - min(loads) <= 1 + 1e-9


@pytest.mark.parametrize("preset", ["qwen3moe", "deepseek-v3"])
def test_routing_skew_concentrates_the_routing(model_dir, preset):
    """Bench models with a routing skew: the hot quarter of experts takes a larger share
    (router weights, and DeepSeek's score bias), and the model still matches the reference."""
    shares = []
    ids = list(np.random.default_rng(0).integers(0, 5000, 96))
    for s in (0.0, 2.0):
        path = make_test_model(model_dir / f"skew-{preset}-{s}.gguf", preset, "q8_0",
                               spec=variant(preset, routing_skew=s))
        with moe_numa.load(path, numa_nodes=2, rebalance_every=None) as m:
            got = m.logits(ids[:12])
            m.backend.reset_counters()
            m.logits(ids)
            counts = [c for c in m.backend.counters()["expert_tokens"] if c.sum()]
        shares.append(np.mean([np.sort(c)[::-1][:len(c) // 4].sum() / c.sum() for c in counts]))
        if s:
            want = moe_numa.load(path, backend="reference", act_quant=True).logits(ids[:12])
            assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75
    assert shares[1] >= shares[0] + 0.15


def test_make_bench_model_routing_skew(tmp_path, monkeypatch):
    from moe_numa.bench import bench as B
    monkeypatch.setenv("MOE_NUMA_CACHE", str(tmp_path))
    path, written = B.make_bench_model("qwen3moe", "q8_0", progress=False, log=lambda s: None, routing_skew=1.0)
    assert written and path.name == "qwen3moe-skew1-q8_0.gguf"
    with pytest.raises(ValueError, match="routing skew must be >= 0"):
        B.make_bench_model("qwen3moe", "q8_0", routing_skew=-1)


def mixed_engine(make_model, preset, n_nodes, data, max_tokens):
    """The preset's Q8_0 model on a random mixed map (replica budget to spare) and a prompt."""
    path = make_model(preset, "q8_0")
    cfg = moe_numa.load(path, backend="reference").config
    emap = mixed_map(cfg, n_nodes, data, split_ok=True)
    ids = np.array(data.draw(st.lists(st.integers(0, cfg.n_vocab - 1), min_size=1, max_size=max_tokens)))
    eng = moe_numa.load(path, numa_nodes=n_nodes, expert_map=emap, rebalance_every=None, replica_budget=1.0)
    return cfg, ids, eng


@settings(max_examples=12)
@given(preset=st.sampled_from(TEST_PRESETS), n_nodes=st.integers(2, 4), data=st.data())
def test_routing_once_split_over_nodes_is_bit_identical(make_model, preset, n_nodes, data):
    """A MoE block's router runs once, split over the nodes by tokens (norm, router, routing)
    or by the router's rows (route_split_min), or whole on every node: the same bits, every map."""
    cfg, ids, eng = mixed_engine(make_model, preset, n_nodes, data, max_tokens=12)
    with eng:
        b = eng.backend
        out, tokens = [], []
        for threshold in (-1, 10 ** 9, 1):      # replicated, by rows, by tokens
            b.core.route_split_min = threshold
            b.reset(); b.reset_counters()
            out.append(b.forward(ids, all_logits=True))
            c = b.counters()
            tokens.append([t.copy() for t in c["expert_tokens"]])
            assert c["syncs"] == 2 * cfg.n_layer + 1 + (len(moe_layers(cfg)) if threshold != -1 else 0)
        b.core.route_split_min = 0
    for k in (1, 2):
        np.testing.assert_array_equal(out[0], out[k])
        for a, b_ in zip(tokens[0], tokens[k]):
            np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("knob, counter", [("moe_share_min", "moe_taken"), ("attn_share_min", "attn_taken")])
@settings(max_examples=12)
@given(preset=st.sampled_from(TEST_PRESETS), n_nodes=st.integers(2, 4), data=st.data())
def test_sharing_work_across_nodes_is_bit_identical(make_model, knob, counter, preset, n_nodes, data):
    """In prefill a node that has run out of its own MoE chunks (moe_share_min), or of its own
    attention projection rows (attn_share_min, which run in fixed chunks then), runs the
    others': whichever node runs a chunk, the logits are the same bits as with no sharing,
    every architecture and map."""
    _, ids, eng = mixed_engine(make_model, preset, n_nodes, data, max_tokens=24)
    with eng:
        b = eng.backend
        out = []
        for threshold in (-1, 1, 1):            # never, then from one token (twice: other timings)
            setattr(b.core, knob, threshold)
            b.reset(); b.reset_counters()
            out.append(b.forward(ids, all_logits=True))
            taken = b.counters()[counter]
            assert len(taken) == n_nodes and min(taken) >= 0
            if threshold == -1:
                assert sum(taken) == 0
        setattr(b.core, knob, 0)
    for k in (1, 2):
        np.testing.assert_array_equal(out[0], out[k])


def _taken_while_sharing(b, ids, knob, counter):
    """Five prefills of ids with sharing from one token, each the same bits as one without
    sharing; returns the chunks each node took for the others in them."""
    setattr(b.core, knob, -1)
    b.reset()
    want = b.forward(ids, all_logits=True)
    setattr(b.core, knob, 1)
    b.reset_counters()
    for _ in range(5):
        b.reset()
        np.testing.assert_array_equal(b.forward(ids, all_logits=True), want)
    return b.counters()[counter]


def test_a_node_with_few_experts_runs_chunks_of_the_busy_one(make_model):
    """Node 1 holds one expert per layer, node 0 the rest: in prefill node 1 finishes first and
    takes node 0's chunks, the counters say so, and the output does not change."""
    path = make_model("qwen3moe", "q8_0")
    cfg = moe_numa.load(path, backend="reference").config
    E = cfg.n_expert
    emap = {"model": {"n_expert": E}, "nodes": [0, 1], "experts": {0: list(range(E - 1)), 1: [E - 1]}}
    ids = np.arange(3, 3 + 64) % cfg.n_vocab
    with moe_numa.load(path, numa_nodes=2, threads_per_node=1, expert_map=emap, rebalance_every=None) as eng:
        taken = _taken_while_sharing(eng.backend, ids, "moe_share_min", "moe_taken")
        assert taken[1] > 0, taken


def test_nodes_with_fewer_heads_run_projections_of_the_busy_one(make_model):
    """Three nodes over the heads of a model with four: one node has twice the others'
    projections, the others finish first and take its chunks, and the output does not change."""
    path = make_model("qwen3moe", "q8_0")
    cfg = moe_numa.load(path, backend="reference").config
    ids = np.arange(3, 3 + 64) % cfg.n_vocab
    with moe_numa.load(path, numa_nodes=3, threads_per_node=1, rebalance_every=None) as eng:
        b = eng.backend
        heads = [h1 - h0 for h0, h1 in b.plan.layers[0].heads]
        assert max(heads) > min(heads), heads   # the premise: an uneven split
        taken = _taken_while_sharing(b, ids, "attn_share_min", "attn_taken")
        busy = heads.index(max(heads))
        assert sum(t for k, t in enumerate(taken) if k != busy) > 0, (heads, taken)
