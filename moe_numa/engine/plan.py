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

from dataclasses import dataclass, field


from .. import quants
from ..layers.attention import GQAWeights
from ..layers.ffn import FFNWeights
from ..layers.mla import MLAWeights
from ..layers.moe import MoEWeights
from ..models.base import ModelConfig, ModelWeights
from ..errors import ExpertMapError
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
    heads: list[tuple[int, int]]            # per node: query heads [h0, h1)
    kv_heads: list[tuple[int, int]]         # per node: KV heads [k0, k1) it needs (GQA)
    ffn_slices: list[tuple[int, int]]       # per node: dense/shared intermediate [f0, f1)
    experts: list[list[int]]                # per node: routed experts with weights there (empty for dense layers)
    slices: dict = field(default_factory=dict)    # split expert -> {node: (f0, f1)} of its FFN dimension
    replicas: dict = field(default_factory=dict)  # replicated expert -> holders (owner first)

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
    vocab: list[tuple[int, int]]
    expert_map: ExpertMap | None
    notes: list[str] = field(default_factory=list)


def _head_cuts(n_head: int, group: int, v_dim: int, wo_block: int, parts: int) -> list[tuple[int, int]]:
    aligned = [h for h in range(n_head + 1) if (h * v_dim) % wo_block == 0]
    whole_groups = [h for h in aligned if h % group == 0]
    # Prefer cuts on KV-group boundaries (no KV head needed by two nodes).
    allowed = whole_groups if len(whole_groups) - 1 >= parts else aligned
    return balanced_cuts(n_head, parts, allowed)


def _ffn_cuts(ffn: FFNWeights, parts: int) -> list[tuple[int, int]]:
    n = ffn.n_ff
    blk = _block(ffn.down)
    return balanced_cuts(n, parts, [f for f in range(0, n + 1, blk)])


def expert_blocks(weights: ModelWeights) -> int:
    """GGML blocks of ffn_down_exps' columns (the FFN dimension), the fewest over MoE layers."""
    return min((lw.ffn.down_exps.shape[-1] // _block(lw.ffn.down_exps) for lw in weights.layers
                if isinstance(lw.ffn, MoEWeights)), default=1)


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


def make_plan(cfg: ModelConfig, weights: ModelWeights, topology: Topology,
              expert_map: ExpertMap | None = None) -> PlacementPlan:
    n = topology.n_nodes
    moe_layers = [i for i in range(cfg.n_layer) if cfg.is_moe_layer(i)]
    if expert_map is None:
        expert_map = make_map(cfg.n_expert, n, "contiguous")
    expert_map.check_model(cfg.n_expert, moe_layers, cfg.n_layer, cfg.arch, n_nodes=n)
    notes: list[str] = []
    layers = []
    for i, lw in enumerate(weights.layers):
        a = cfg.attention
        if isinstance(lw.attn, GQAWeights):
            group = a.n_head // a.n_head_kv
            heads = _head_cuts(a.n_head, group, a.head_dim, _block(lw.attn.wo), n)
            kv = [(h0 // group, -(-h1 // group)) if h1 > h0 else (0, 0) for h0, h1 in heads]
        elif isinstance(lw.attn, MLAWeights):
            heads = _head_cuts(a.n_head, 1, a.v_head_dim, _block(lw.attn.wo), n)
            kv = heads
        else:
            raise TypeError(f"layer {i}: unknown attention weights {type(lw.attn).__name__}")
        if isinstance(lw.ffn, MoEWeights):
            experts = [expert_map.experts_on(i, node) for node in range(n)]
            ffn = _ffn_cuts(lw.ffn.shared, n) if lw.ffn.shared is not None else [(0, 0)] * n
            modes = [expert_map.mode(i, e) for e in range(cfg.n_expert)]
            slices = {e: split_slices(expert_map, i, e, lw.ffn.down_exps, cfg.expert_ff)
                      for e in range(cfg.n_expert) if modes[e] == "split"}
            replicas = {e: expert_map.holders(i, e) for e in range(cfg.n_expert) if modes[e] == "replicated"}
        else:
            experts = [[] for _ in range(n)]
            ffn = _ffn_cuts(lw.ffn, n)
            slices, replicas = {}, {}
        layers.append(LayerPlan(heads, kv, ffn, experts, slices, replicas))
    empty_heads = sorted({node for lp in layers for node, (h0, h1) in enumerate(lp.heads) if h1 == h0})
    if empty_heads and n > 1:
        notes.append(f"node(s) {empty_heads} hold no attention heads in some layers: the heads cannot be split "
                     f"{n} ways on GGML block boundaries")
    vocab = balanced_cuts(cfg.n_vocab, n, list(range(cfg.n_vocab + 1)))
    return PlacementPlan(n, layers, vocab, expert_map, notes)
