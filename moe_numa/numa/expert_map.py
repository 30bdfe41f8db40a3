"""YAML expert maps: where each routed expert lives, per MoE layer: whole on
one node, split across several nodes by its FFN rows, or whole with extra
copies (replicas) on other nodes.

Schema (docs/expert-maps.md has the full description):

    version: 1
    model: {name: DeepSeek-V3, arch: deepseek2, n_expert: 256, n_layer: 61}   # optional
    nodes: [0, 1]
    experts:            # every MoE layer, unless overridden
      0: 2-127          # whole on node 0
      1: 128-255
      0+1: 0-1          # split across nodes 0 and 1 (gate/up rows, down columns)
    layers:             # optional per-layer overrides (same form as `experts`)
      7: {0: "0-63,128-191", 1: "64-127,192-255"}
    replicas:           # optional extra copies of whole experts
      - {layer: 7, expert: 17, nodes: [1]}

Every error names the field it is about. `ExpertMap.for_model()` checks a map
against a model before any weight is copied.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import ExpertMapError

STRATEGIES = ("contiguous", "round-robin", "split")
# The engine's map when none is given. Split experts leave no node waiting on the one that
# drew the most of a token's experts (docs/expert-maps.md, "Which wins"); on one node, or where
# an expert's FFN has a single GGML block, it is whole placement.
DEFAULT_STRATEGY = "split"

Owner = "int | tuple[int, ...]"   # a node (whole expert) or the node set of a split expert


def parse_ranges(value: Any, where: str) -> list[int]:
    """'0-7,16,20-23' | 5 | [0, 1, '4-6'] -> list of ints (order kept)."""
    if isinstance(value, bool):
        raise ExpertMapError(f"{where}: expected expert ids or ranges, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        out: list[int] = []
        for item in value:
            out.extend(parse_ranges(item, where))
        return out
    if isinstance(value, str):
        out = []
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            try:
                lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part[1:] else (int(part),) * 2
            except ValueError:
                raise ExpertMapError(f"{where}: cannot parse {part!r} as an expert id or range like 0-7") from None
            if hi < lo:
                raise ExpertMapError(f"{where}: range {part!r} is empty (end before start)")
            out.extend(range(lo, hi + 1))
        return out
    raise ExpertMapError(f"{where}: expected expert ids or ranges, got {type(value).__name__}")


def format_ranges(ids: list[int]) -> str:
    ids = sorted(ids)
    runs, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        runs.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(runs)


@dataclass(frozen=True)
class ExpertMap:
    """owner[layer][expert] -> node (whole) or node tuple (split), plus replicas,
    for the MoE layers of one model."""
    n_expert: int
    nodes: tuple[int, ...]
    default: tuple                               # owner of each expert, all layers
    overrides: Mapping[int, tuple] = field(default_factory=dict)
    replicas: Mapping[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)   # extra copies
    model: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<map>"

    def owners(self, layer: int) -> tuple:
        return self.overrides.get(layer, self.default)

    def mode(self, layer: int, expert: int) -> str:
        """'whole', 'split' or 'replicated'."""
        if isinstance(self.owners(layer)[expert], tuple):
            return "split"
        return "replicated" if (layer, expert) in self.replicas else "whole"

    def holders(self, layer: int, expert: int) -> tuple[int, ...]:
        """Nodes that hold weights of the expert: the owner first, then its replicas; or the split set."""
        o = self.owners(layer)[expert]
        return o if isinstance(o, tuple) else (o,) + tuple(self.replicas.get((layer, expert), ()))

    def experts_on(self, layer: int, node: int) -> list[int]:
        """Experts with weights on `node` (whole, a split slice, or a replica)."""
        return [e for e in range(self.n_expert) if node in self.holders(layer, e)]

    def field_of(self, layer: int) -> str:
        return f"layers.{layer}" if layer in self.overrides else "experts"

    def check_model(self, n_expert: int, moe_layers: list[int], n_layer: int, arch: str | None = None,
                    n_nodes: int | None = None) -> None:
        """Refuse a map made for another model or for nodes the engine does not have."""
        src = self.source
        if self.n_expert != n_expert:
            raise ExpertMapError(f"{src}: model.n_expert: the map is for {self.n_expert} experts but the model has "
                                 f"{n_expert}")
        if arch and self.model.get("arch") and self.model["arch"] != arch:
            raise ExpertMapError(f"{src}: model.arch: the map is for {self.model['arch']!r}, the model is {arch!r}")
        if self.model.get("n_layer") is not None and int(self.model["n_layer"]) != n_layer:
            raise ExpertMapError(f"{src}: model.n_layer: the map is for {self.model['n_layer']} layers, the model "
                                 f"has {n_layer}")
        for layer in self.overrides:
            if layer not in moe_layers:
                raise ExpertMapError(f"{src}: layers.{layer}: not an MoE layer of this model "
                                     f"(MoE layers: {format_ranges(moe_layers)})")
        for layer, e in self.replicas:
            if layer not in moe_layers:
                raise ExpertMapError(f"{src}: replicas: layer {layer} (expert {e}): not an MoE layer of this model "
                                     f"(MoE layers: {format_ranges(moe_layers)})")
        if n_nodes is not None:
            unknown = [n for n in self.nodes if not 0 <= n < n_nodes]
            if unknown:
                raise ExpertMapError(f"{src}: nodes: node {unknown[0]} is unknown; the engine has nodes "
                                     f"0-{n_nodes - 1}")

    def to_yaml_dict(self) -> dict:
        def by_node(owner: tuple) -> dict:
            keys = sorted(set(owner), key=lambda o: (isinstance(o, tuple), o if isinstance(o, tuple) else (o,)))
            return {(k if isinstance(k, int) else "+".join(map(str, k))):
                    format_ranges([e for e, o in enumerate(owner) if o == k]) for k in keys}
        d: dict[str, Any] = {"version": 1}
        if self.model:
            d["model"] = dict(self.model)
        d["nodes"] = list(self.nodes)
        d["experts"] = by_node(self.default)
        if self.overrides:
            d["layers"] = {l: by_node(o) for l, o in sorted(self.overrides.items())}
        if self.replicas:
            d["replicas"] = [{"layer": l, "expert": e, "nodes": list(ns)} for (l, e), ns in sorted(self.replicas.items())]
        return d

    def dump(self) -> str:
        header = "# moe_numa expert map (docs/expert-maps.md)\n"
        return header + yaml.safe_dump(self.to_yaml_dict(), sort_keys=False, default_flow_style=None)


def _node_key(node_key: Any, nodes: tuple[int, ...], where: str):
    """'1' | 1 | 'node1' -> 1; '0+1' -> (0, 1): the node set of a split."""
    parts = str(node_key).replace(" ", "").split("+")
    try:
        ids = [int(p.removeprefix("node")) for p in parts]
    except ValueError:
        raise ExpertMapError(f"{where}.{node_key}: not a node id or a split like 0+1") from None
    for node in ids:
        if node not in nodes:
            raise ExpertMapError(f"{where}.{node_key}: node {node} is unknown (nodes: {list(nodes)})")
    if len(ids) == 1:
        return ids[0]
    if len(set(ids)) != len(ids):
        raise ExpertMapError(f"{where}.{node_key}: a split lists node {ids[0]} twice (give distinct nodes)")
    return tuple(ids)


def _owners(section: Any, n_expert: int, nodes: tuple[int, ...], where: str) -> tuple:
    if not isinstance(section, Mapping) or not section:
        raise ExpertMapError(f"{where}: expected a mapping of node (or split like 0+1) -> expert ranges")
    owner: list = [None] * n_expert
    for node_key, ranges in section.items():
        node = _node_key(node_key, nodes, where)
        for e in parse_ranges(ranges, f"{where}.{node_key}"):
            if not 0 <= e < n_expert:
                raise ExpertMapError(f"{where}.{node_key}: expert {e} is out of range 0..{n_expert - 1}")
            if owner[e] is not None:
                raise ExpertMapError(f"{where}.{node_key}: expert {e} is listed twice (nodes {_fmt(owner[e])} and "
                                     f"{_fmt(node)})")
            owner[e] = node
    missing = [e for e, o in enumerate(owner) if o is None]
    if missing:
        raise ExpertMapError(f"{where}: expert(s) {format_ranges(missing)} missing (every expert needs one node)")
    return tuple(owner)


def _fmt(owner) -> str:
    return "+".join(map(str, owner)) if isinstance(owner, tuple) else str(owner)


def from_dict(d: Any, n_expert: int | None = None, source: str = "<map>") -> ExpertMap:
    """Validate a parsed map. `n_expert` (the model's) is used when the map has no model.n_expert."""
    if not isinstance(d, Mapping):
        raise ExpertMapError(f"{source}: an expert map is a YAML mapping, got {type(d).__name__}")
    known = {"version", "model", "nodes", "experts", "layers", "replicas"}
    extra = sorted(set(map(str, d)) - known)
    if extra:
        raise ExpertMapError(f"{source}: {extra[0]}: unknown field (fields: {', '.join(sorted(known))})")
    if d.get("version", 1) != 1:
        raise ExpertMapError(f"{source}: version: only version 1 is supported, got {d.get('version')!r}")
    model = d.get("model") or {}
    if not isinstance(model, Mapping):
        raise ExpertMapError(f"{source}: model: expected a mapping")
    map_n = model.get("n_expert")
    if map_n is not None and (not isinstance(map_n, int) or map_n <= 0):
        raise ExpertMapError(f"{source}: model.n_expert: expected a positive integer, got {map_n!r}")
    n = map_n if map_n is not None else n_expert
    if n is None:
        raise ExpertMapError(f"{source}: model.n_expert: missing, and no model given to take it from")
    if "nodes" not in d:
        raise ExpertMapError(f"{source}: nodes: missing (list the node ids, e.g. [0, 1])")
    raw = d["nodes"] if isinstance(d["nodes"], list) else [d["nodes"]]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in raw):   # 1.5 or .inf is no node id
        raise ExpertMapError(f"{source}: nodes: expected a list of node ids (integers), got {d['nodes']!r}")
    nodes = tuple(raw)
    if len(set(nodes)) != len(nodes) or any(x < 0 for x in nodes):
        raise ExpertMapError(f"{source}: nodes: node ids must be distinct and >= 0, got {list(nodes)}")
    if "experts" not in d:
        raise ExpertMapError(f"{source}: experts: missing (node -> expert ranges)")
    default = _owners(d["experts"], n, nodes, f"{source}: experts")
    overrides = {}
    for layer_key, section in (d.get("layers") or {}).items():
        try:
            layer = int(layer_key)
        except (TypeError, ValueError):
            raise ExpertMapError(f"{source}: layers.{layer_key}: not a layer number") from None
        if layer < 0:
            raise ExpertMapError(f"{source}: layers.{layer}: layer out of range")
        overrides[layer] = _owners(section, n, nodes, f"{source}: layers.{layer}")
    replicas = {}
    for i, r in enumerate(d.get("replicas") or []):
        where = f"{source}: replicas[{i}]"
        if not isinstance(r, Mapping) or not {"layer", "expert", "nodes"} <= set(r):
            raise ExpertMapError(f"{where}: expected {{layer, expert, nodes}}")
        extra = sorted(set(map(str, r)) - {"layer", "expert", "nodes"})
        if extra:
            raise ExpertMapError(f"{where}.{extra[0]}: unknown field (fields: expert, layer, nodes)")
        try:
            layer = int(r["layer"])
        except (TypeError, ValueError):
            raise ExpertMapError(f"{where}.layer: not a layer number: {r['layer']!r}") from None
        try:
            e = int(r["expert"])
        except (TypeError, ValueError):
            raise ExpertMapError(f"{where}.expert: not an expert id: {r['expert']!r}") from None
        if not 0 <= e < n:
            raise ExpertMapError(f"{where}.expert: expert {e} is out of range 0..{n - 1}")
        try:
            rnodes = tuple(int(x) for x in (r["nodes"] if isinstance(r["nodes"], list) else [r["nodes"]]))
        except (TypeError, ValueError):
            raise ExpertMapError(f"{where}.nodes: expected a list of node ids, got {r['nodes']!r}") from None
        if not rnodes:
            raise ExpertMapError(f"{where}.nodes: empty (list the nodes that get a copy)")
        bad = [x for x in rnodes if x not in nodes]
        if bad:
            raise ExpertMapError(f"{where}.nodes: node {bad[0]} is unknown (nodes: {list(nodes)})")
        if len(set(rnodes)) != len(rnodes):
            raise ExpertMapError(f"{where}.nodes: node ids must be distinct, got {list(rnodes)}")
        owner = overrides.get(layer, default)[e]
        if isinstance(owner, tuple):
            raise ExpertMapError(f"{where}: expert {e} of layer {layer} is split ({_fmt(owner)}); a split expert has "
                                 f"one copy and cannot have replicas")
        if owner in rnodes:
            raise ExpertMapError(f"{where}.nodes: node {owner} already owns expert {e}")
        if (layer, e) in replicas:
            raise ExpertMapError(f"{where}: expert {e} of layer {layer} already has replicas (one entry per expert)")
        replicas[(layer, e)] = rnodes
    return ExpertMap(n, nodes, default, overrides, replicas, dict(model), source)


def load_map(spec: str | os.PathLike[str] | Mapping, n_expert: int | None = None,
             n_nodes: int | None = None) -> ExpertMap:
    """An ExpertMap from a YAML file path, an already-parsed dict, or a strategy
    name (STRATEGIES, over `n_nodes` nodes) that is not an existing file."""
    if isinstance(spec, ExpertMap):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        return from_dict(spec, n_expert, "<dict>")
    path = Path(spec)
    if str(spec) in STRATEGIES and not path.exists() and n_expert is not None and n_nodes is not None:
        return make_map(n_expert, n_nodes, str(spec))
    if not path.is_file():   # "" is "." to pathlib: a directory
        raise ExpertMapError(f"expert map not found: {str(spec)!r}" + (" is a directory" if path.is_dir() else ""))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExpertMapError(f"{path}: not valid YAML: {e}") from None
    return from_dict(data, n_expert, str(path))


def make_map(n_expert: int, n_nodes: int, strategy: str = "contiguous", model: Mapping | None = None,
             ffn_blocks: int | None = None) -> ExpertMap:
    """A balanced map: contiguous ranges (0-7 on node0, 8-15 on node1, ...), round-robin,
    or every expert split across all nodes (the plan keeps an expert whole on its
    contiguous node when its FFN is too small to cut on GGML blocks)."""
    if strategy not in STRATEGIES:
        raise ExpertMapError(f"strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if n_nodes < 1:
        raise ExpertMapError(f"nodes: need at least one node, got {n_nodes}")
    if strategy == "contiguous":
        q, r = divmod(n_expert, n_nodes)
        owner = []
        for node in range(n_nodes):
            owner += [node] * (q + (1 if node < r else 0))
    elif strategy == "round-robin":
        owner = [e % n_nodes for e in range(n_expert)]
    else:
        # `ffn_blocks`: GGML blocks in an expert's FFN dimension, when known. With fewer
        # blocks than nodes, each expert is split over as many consecutive nodes as it
        # has blocks (rotating, so all nodes share the work); with one block, whole.
        k = n_nodes if ffn_blocks is None else min(n_nodes, ffn_blocks)
        if k <= 1:
            return make_map(n_expert, n_nodes, "contiguous", model)
        owner = [tuple(range(n_nodes)) if k == n_nodes else tuple(sorted((e * k + j) % n_nodes for j in range(k)))
                 for e in range(n_expert)]
    meta = dict(model or {})
    meta["n_expert"] = n_expert
    return ExpertMap(n_expert, tuple(range(n_nodes)), tuple(owner), model=meta)
