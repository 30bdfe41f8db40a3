"""YAML expert maps: parsing, generation, shipped maps, and every invalid map."""
from pathlib import Path

import pytest
import yaml
from hypothesis import given, strategies as st

from moe_numa.errors import ExpertMapError
from moe_numa.numa.expert_map import format_ranges, load_map, make_map, parse_ranges

MAPS = Path(__file__).resolve().parent.parent / "expert_maps"


def base(**changes):
    d = {"version": 1, "model": {"n_expert": 16}, "nodes": [0, 1], "experts": {0: "0-7", 1: "8-15"}}
    d.update(changes)
    return d


def test_contiguous_and_per_layer_override():
    m = load_map(base(layers={2: {0: "0-3,8-11", 1: [4, 5, 6, 7, "12-15"]}}))
    assert m.experts_on(0, 0) == list(range(8)) and m.experts_on(0, 1) == list(range(8, 16))
    assert m.experts_on(2, 0) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert m.owners(2)[12] == 1


@given(n_expert=st.integers(1, 300), n_nodes=st.integers(1, 8), strategy=st.sampled_from(["contiguous", "round-robin"]))
def test_generated_maps_cover_every_expert_once(n_expert, n_nodes, strategy):
    m = make_map(n_expert, n_nodes, strategy)
    again = load_map(yaml.safe_load(m.dump()))
    assert again.default == m.default
    counts = [len(m.experts_on(0, n)) for n in range(n_nodes)]
    assert sum(counts) == n_expert and max(counts) - min(counts) <= 1


@given(st.lists(st.integers(0, 500), unique=True, min_size=1))
def test_range_format_round_trip(ids):
    assert parse_ranges(format_ranges(ids), "x") == sorted(ids)


@pytest.mark.parametrize("path", sorted(MAPS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_maps_are_valid(path):
    m = load_map(path)
    n_nodes = int(path.stem.split("-")[-1].removesuffix("node"))
    assert len(m.nodes) == n_nodes
    assert m.n_expert in (64, 128, 256) and m.model["n_layer"] > 0
    assert sorted(e for n in m.nodes for e in m.experts_on(0, n)) == list(range(m.n_expert))


BAD = [
    (base(nodes=[0]), r"experts\.1: node 1 is unknown"),
    (base(experts={0: "0-8", 1: "8-15"}), r"experts\.1: expert 8 is listed twice"),
    (base(experts={0: "0-6", 1: "8-15"}), r"experts: expert\(s\) 7 missing"),
    (base(experts={0: "0-7", 1: "8-16"}), r"experts\.1: expert 16 is out of range 0\.\.15"),
    (base(experts={0: "0-7", 1: "8-x"}), r"experts\.1: cannot parse '8-x'"),
    (base(experts={0: "7-0", 1: "8-15"}), r"experts\.0: range '7-0' is empty"),
    (base(layers={"a": {0: "0-15"}}), r"layers\.a: not a layer number"),
    (base(layers={-1: {0: "0-15"}}), r"layers\.-1: layer out of range"),
    (base(layers={3: {0: "0-15", 1: "3"}}), r"layers\.3\.1: expert 3 is listed twice"),
    (base(replicas=[{"layer": 1, "expert": 3, "nodes": [0]}]), r"replicas\[0\]\.nodes: node 0 already owns expert 3"),
    (base(replicas=[{"layer": 1, "expert": 99, "nodes": [1]}]), r"replicas\[0\]\.expert: expert 99 is out of range"),
    (base(replicas=[{"layer": 1, "expert": 3, "nodes": [5]}]), r"replicas\[0\]\.nodes: node 5 is unknown"),
    (base(colour="blue"), r"colour: unknown field"),
    (base(version=2), r"version: only version 1"),
    ({"nodes": [0], "experts": {0: "0-3"}}, r"model\.n_expert: missing"),
    (base(nodes="zero"), r"nodes: expected a list of node ids"),
    (base(nodes=[0, 1.5]), r"nodes: expected a list of node ids \(integers\)"),
    (base(nodes=float("inf")), r"nodes: expected a list of node ids \(integers\)"),
    (base(nodes=[0, 0]), r"nodes: node ids must be distinct"),
    ({k: v for k, v in base().items() if k != "experts"}, r"experts: missing"),
    ([1, 2], r"an expert map is a YAML mapping"),
]


@pytest.mark.parametrize("data,message", BAD)
def test_invalid_maps_name_the_field(data, message):
    with pytest.raises(ExpertMapError, match=message):
        load_map(data)


def test_map_checked_against_model():
    m = load_map(base(model={"n_expert": 16, "arch": "qwen3moe", "n_layer": 4}, layers={3: {0: "0-15"}}))
    m.check_model(16, [0, 1, 2, 3], 4, "qwen3moe", n_nodes=2)
    with pytest.raises(ExpertMapError, match="model.n_expert: the map is for 16 experts but the model has 64"):
        m.check_model(64, [0, 1, 2, 3], 4)
    with pytest.raises(ExpertMapError, match="model.arch"):
        m.check_model(16, [0, 1, 2, 3], 4, "deepseek2")
    with pytest.raises(ExpertMapError, match="model.n_layer"):
        m.check_model(16, [0, 1, 2, 3], 5)
    with pytest.raises(ExpertMapError, match=r"layers\.3: not an MoE layer"):
        m.check_model(16, [0, 1, 2], 4)
    with pytest.raises(ExpertMapError, match="nodes: node 1 is unknown; the engine has nodes 0-0"):
        m.check_model(16, [0, 1, 2, 3], 4, n_nodes=1)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ExpertMapError, match="expert map not found"):
        load_map(tmp_path / "nope.yaml")
    for directory in ("", tmp_path):   # "" is "." to pathlib
        with pytest.raises(ExpertMapError, match="is a directory"):
            load_map(directory)
    p = tmp_path / "bad.yaml"
    p.write_text("nodes: [0\nexperts: {")
    with pytest.raises(ExpertMapError, match="not valid YAML"):
        load_map(p)
