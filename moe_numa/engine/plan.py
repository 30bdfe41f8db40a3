"""The placement plan: which node holds which shard of every tensor.

The model code (moe_numa.models) is unchanged; this plan is applied over its
weight structures, like gpt-fast's tp.py over a single-device model:

- routed experts: as the expert map says, per expert: whole on one node;
  split across a node set by the FFN dimension (gate/up rows, down columns,
  block-aligned slices: the nodes' partial outputs add up to the expert's); or
  whole on several nodes (replicas; the engine picks one holder per batch);
- attention: query heads split into contiguous ranges (q/k/v rows, the heads'
  KV cache, their columns of attn_output); MLA's latent projection and cache
  are needed by every node that has heads and are replicated;
- dense FFNs and shared experts: the intermediate dimension split into slices
  (gate/up rows, down columns);
- output head: vocabulary rows split;
- norms, routers and the score bias: small, replicated on every node.

Split points respect GGML block boundaries (a column slice of a quantized row
must start and end on a block), so a node may get no heads or no FFN slice
when a tensor is too small to split N ways; the result is still exact.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field


from .. import quants
from ..errors import ExpertMapError
from ..layers.split import EXPERTS, FOLLOWS, REPLICATED, VOCAB, Split, split_rules
from ..models.base import ModelConfig, ModelWeights
from ..numa.expert_map import ExpertMap, make_map
from ..numa.topology import Topology


def _block(t) -> int:
    return quants.traits(t.qtype).block


def balanced_cuts(n: int, parts: int, allowed: list[int]) -> list[tuple[int, int]]:
    """Split range(n) into `parts` contiguous ranges whose inner boundaries are
    taken from `allowed` (sorted, within 0..n), each as close to the balanced
    point as possible and never going backwards."""
    cuts = [0]
    for k in range(1, parts):
        target = k * n / parts
        best = min((a for a in allowed if a >= cuts[-1]), key=lambda a: (abs(a - target), a), default=n)
        cuts.append(best)
    cuts.append(n)
    return [(cuts[i], cuts[i + 1]) for i in range(parts)]


@dataclass
class LayerPlan:
    ranges: dict[str, list[tuple[int, int]]]   # split dimension -> per node [a, b) of it
    sizes: dict[str, int]                      # split dimension -> its size
    experts: list[list[int]]                # per node: routed experts with weights there (empty for dense layers)
    slices: dict = field(default_factory=dict)    # split expert -> {node: (f0, f1)} of its FFN dimension
    replicas: dict = field(default_factory=dict)  # replicated expert -> holders (owner first)

    def part(self, rule: Split, t, node: int) -> tuple[int, int, int]:
        """(a, b, unit): node's range of the rule's dimension, and how many entries of t's
        axis one index of it spans (head_dim rows per head, 1 per FFN row)."""
        a, b = self.ranges[rule.dim][node]
        return a, b, t.shape[rule.axis] // self.sizes[rule.dim]

    @property
    def heads(self) -> list[tuple[int, int]]:
        return self.ranges.get("heads", [])

    def node_share(self, n_nodes: int, n_expert: int, inter: int):
        """[n_nodes, n_expert]: share of each non-replicated expert's FFN rows per node."""
        import numpy as np
        share = np.zeros((n_nodes, n_expert), dtype=np.float32)
        for node, experts in enumerate(self.experts):
            for e in experts:
                if e in self.slices:
                    f0, f1 = self.slices[e][node]
                    share[node, e] = (f1 - f0) / inter
                elif e not in self.replicas:
                    share[node, e] = 1.0
        return share


@dataclass
class PlacementPlan:
    n_nodes: int
    layers: list[LayerPlan]
    head: LayerPlan            # the model's own tensors: output norm, vocabulary rows of the output head
    expert_map: ExpertMap | None
    notes: list[str] = field(default_factory=list)

    @property
    def vocab(self) -> list[tuple[int, int]]:
        return self.head.ranges[VOCAB]


def _is_column_split(t, axis: int) -> bool:
    """A cut along the last axis of a matrix slices its rows' GGML blocks."""
    return len(t.shape) > 1 and axis == len(t.shape) - 1


def _cut_points(n: int, tensors: list[tuple[object, int]]) -> list[int]:
    """Cut points of a dimension of size n that keep every column slice of `tensors`
    ((tensor, axis) pairs) on GGML block boundaries."""
    # c * unit is a multiple of the block exactly when c is a multiple of block / gcd(unit, block)
    step = 1
    for t, axis in tensors:
        if _is_column_split(t, axis):
            b = _block(t)
            step = math.lcm(step, b // math.gcd(t.shape[axis] // n, b))
    return list(range(0, n + 1, step))


def _dimension_cuts(rules, sizes: dict[str, int], parts: int) -> dict[str, list[tuple[int, int]]]:
    """Per split dimension of one layer, each node's contiguous range. A following dimension
    (KV heads) is cut where its leader is, preferably on whole groups (no KV head needed by
    two nodes); each node then gets the followers its leader range touches."""
    by_dim: dict[str, list] = {}
    for _, t, r in rules:
        if r.dim not in (REPLICATED, EXPERTS):
            by_dim.setdefault(r.dim, []).append((t, r.axis))
    ranges = {}
    for dim, tensors in by_dim.items():
        if dim in FOLLOWS:
            continue
        n = sizes.setdefault(dim, tensors[0][0].shape[tensors[0][1]])
        allowed = _cut_points(n, tensors)
        followers = [f for f, lead in FOLLOWS.items() if lead == dim and f in by_dim]
        for f in followers:
            group = n // sizes[f]
            whole = [c for c in allowed if c % group == 0]
            allowed = whole if len(whole) - 1 >= parts else allowed
        ranges[dim] = balanced_cuts(n, parts, allowed)
        for f in followers:
            group = n // sizes[f]
            ranges[f] = [(a // group, -(-b // group)) if b > a else (0, 0) for a, b in ranges[dim]]
    return ranges


def _expert_rules(rules):
    return [(t, r) for _, t, r in rules if r.dim == EXPERTS]


def _expert_cut_tensor(rules):
    """The expert tensor whose FFN axis is its columns (ffn_down_exps): it sets the block
    a split expert is cut on."""
    return next(t for t, r in _expert_rules(rules) if _is_column_split(t, r.inner))


def expert_blocks(weights: ModelWeights) -> int:
    """GGML blocks of the experts' FFN dimension (ffn_down_exps' columns), the fewest over MoE layers."""
    counts = []
    for lw in weights.layers:
        rules = split_rules(lw)
        if _expert_rules(rules):
            t = _expert_cut_tensor(rules)
            counts.append(t.shape[-1] // _block(t))
    return min(counts, default=1)


def split_slices(emap: ExpertMap, layer: int, e: int, down, inter: int) -> dict[int, tuple[int, int]]:
    """node -> (f0, f1): a split expert's FFN dimension cut on down's GGML blocks.
    Uneven cuts rotate with the expert id, so no node always gets the bigger part."""
    nodes = emap.owners(layer)[e]
    blk = _block(down)
    cuts = balanced_cuts(inter, len(nodes), list(range(0, inter + 1, blk)))
    if any(f1 <= f0 for f0, f1 in cuts):
        raise ExpertMapError(f"{emap.source}: {emap.field_of(layer)}.{'+'.join(map(str, nodes))}: expert {e} of layer "
                             f"{layer} cannot be split {len(nodes)} ways: its FFN size {inter} has {inter // blk} "
                             f"GGML block(s) of {blk} ({down.name} is {down.qtype.name})")
    k = len(nodes)
    return {nodes[(j + e) % k]: cuts[j] for j in range(k)}


def _place_experts(expert_map: ExpertMap, i: int, rules, n: int, n_expert: int):
    """Routed experts per node (as the map says), split experts' FFN slices, replicas."""
    experts = [expert_map.experts_on(i, node) for node in range(n)]
    down = _expert_cut_tensor(rules)
    modes = [expert_map.mode(i, e) for e in range(n_expert)]
    slices = {e: split_slices(expert_map, i, e, down, down.shape[-1])
              for e in range(n_expert) if modes[e] == "split"}
    replicas = {e: expert_map.holders(i, e) for e in range(n_expert) if modes[e] == "replicated"}
    return experts, slices, replicas


def make_plan(cfg: ModelConfig, weights: ModelWeights, topology: Topology,
              expert_map: ExpertMap | None = None) -> PlacementPlan:
    """Apply the weights' declared split rules (moe_numa.layers.split) to `topology`."""
    n = topology.n_nodes
    moe_layers = [i for i, lw in enumerate(weights.layers) if _expert_rules(split_rules(lw))]
    if expert_map is None:
        expert_map = make_map(cfg.n_expert, n, "contiguous")
    expert_map.check_model(cfg.n_expert, moe_layers, cfg.n_layer, cfg.arch, n_nodes=n)
    notes: list[str] = []
    layers = []
    for i, lw in enumerate(weights.layers):
        rules = split_rules(lw)
        sizes = dict(cfg.attention.split_sizes())
        ranges = _dimension_cuts(rules, sizes, n)
        if i in moe_layers:
            experts, slices, replicas = _place_experts(expert_map, i, rules, n, cfg.n_expert)
        else:
            experts, slices, replicas = [[] for _ in range(n)], {}, {}
        layers.append(LayerPlan(ranges, sizes, experts, slices, replicas))
    empty_heads = sorted({node for lp in layers for node, (h0, h1) in enumerate(lp.heads) if h1 == h0})
    if empty_heads and n > 1:
        notes.append(f"node(s) {empty_heads} hold no attention heads in some layers: the heads cannot be split "
                     f"{n} ways on GGML block boundaries")
    sizes = {}
    head = LayerPlan(_dimension_cuts(split_rules(weights), sizes, n), sizes, [[] for _ in range(n)])
    return PlacementPlan(n, layers, head, expert_map, notes)
