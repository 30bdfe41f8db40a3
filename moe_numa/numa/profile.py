"""Routing profiles, and expert maps made from them.

A profile (`moe-numa profile`) runs prompts through the engine one token at a
time and records, per MoE layer, how many tokens each expert received, which
experts each token selected (the routing trace, up to `max_trace` tokens) and
how often two experts were selected by the same token (co-selection).

A map (`moe-numa map --profile`) is chosen to minimise the projected per-token
critical path: for each token of the trace, each node's work is the sum, over
the token's selected experts it runs, of its share of the expert's rows (1 for
a whole expert, its slice for a split one, made `split_overhead` (10%) dearer
for the shorter rows), replicated experts going to the least-loaded holder as
the engine does (engine/backend.py, mn_engine.c choose_replicas); the token
waits for the busiest node. Strategies:

- whole: every expert on one node; hot experts spread first (longest
  processing time first), then swaps between nodes while they shorten the path;
- split: every expert across all nodes (balanced by construction; the default
  when there is no profile);
- hybrid: start from whole, then split or replicate (within the replica
  budget) the hot experts that shorten the path; all-split if that is shorter.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MoeNumaError
from .expert_map import ExpertMap, make_map

PROFILE_VERSION = 1
REPL_BIAS = 4.0          # as choose_replicas in mn_engine.c: an expert's weight reads, in tokens


@dataclass
class Profile:
    n_expert: int
    n_used: int
    tokens: int
    counts: dict[int, np.ndarray]                  # layer -> tokens per expert
    trace: dict[int, np.ndarray]                   # layer -> [tokens, n_used] selected experts
    model: dict = field(default_factory=dict)

    def co_selection(self, layer: int) -> np.ndarray:
        """[n_expert, n_expert]: tokens that selected both experts (diagonal: tokens per expert)."""
        t = self.trace[layer]
        onehot = np.zeros((len(t), self.n_expert), dtype=np.int64)
        np.put_along_axis(onehot, t, 1, axis=1)
        return onehot.T @ onehot

    def to_json(self) -> dict:
        out = {"version": PROFILE_VERSION, "model": self.model, "n_expert": self.n_expert, "n_used": self.n_used,
               "tokens": self.tokens, "layers": {}}
        for layer in sorted(self.counts):
            co = self.co_selection(layer)
            np.fill_diagonal(co, 0)
            iu = np.triu_indices(self.n_expert, 1)
            order = np.argsort(-co[iu], kind="stable")[:32]
            out["layers"][str(layer)] = {
                "counts": self.counts[layer].tolist(),
                "trace": self.trace[layer].tolist(),
                # the most frequent pairs and the mean co-selections of a pair, for reading
                "top_pairs": [[int(iu[0][k]), int(iu[1][k]), int(co[iu][k])] for k in order if co[iu][k] > 0],
                "mean_pair": float(co[iu].mean()) if len(iu[0]) else 0.0}
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise MoeNumaError(f"{path}: not a routing profile: {e}") from None
        if not isinstance(d, dict) or d.get("version") != PROFILE_VERSION or "layers" not in d:
            raise MoeNumaError(f"{path}: not a routing profile (version {PROFILE_VERSION} from moe-numa profile)")
        E, k = int(d["n_expert"]), int(d["n_used"])
        counts, trace = {}, {}
        for key, v in d["layers"].items():
            counts[int(key)] = np.asarray(v["counts"], dtype=np.int64)
            trace[int(key)] = np.asarray(v["trace"], dtype=np.int64).reshape(-1, k)
            if counts[int(key)].shape != (E,) or (trace[int(key)].size and trace[int(key)].max() >= E):
                raise MoeNumaError(f"{path}: layers.{key}: counts or trace do not match n_expert {E}")
        return cls(E, k, int(d["tokens"]), counts, trace, d.get("model") or {})


def collect(model, prompts: list[str], max_tokens: int = 4096, max_trace: int = 4096) -> Profile:
    """Run prompts token by token through an engine-backed model; record the routing."""
    b = model.backend
    if not hasattr(b, "expert_tokens"):
        raise MoeNumaError("profiling needs the engine backend")
    cfg = model.config
    layers = [i for i in range(cfg.n_layer) if cfg.is_moe_layer(i)]
    counts = {i: np.zeros(cfg.n_expert, dtype=np.int64) for i in layers}
    trace: dict[int, list] = {i: [] for i in layers}
    tokens = 0
    for text in prompts:
        ids = model.tokenize(text)[: max(0, max_tokens - tokens)]
        b.reset()
        for t in ids:
            before = [b.expert_tokens[i].copy() for i in layers]
            b.forward(np.array([t]), all_logits=False)
            for i, prev in zip(layers, before):
                sel = np.flatnonzero(b.expert_tokens[i] - prev)
                counts[i][sel] += 1
                if len(trace[i]) < max_trace and len(sel) == cfg.router.n_used:
                    trace[i].append(sel)
            tokens += 1
        if tokens >= max_tokens:
            break
    if tokens == 0:
        raise MoeNumaError("profile: no tokens (the prompt file is empty)")
    k = cfg.router.n_used
    return Profile(cfg.n_expert, k, tokens, counts,
                   {i: np.asarray(trace[i], dtype=np.int64).reshape(-1, k) for i in layers},
                   {"name": cfg.name, "arch": cfg.arch, "n_layer": cfg.n_layer})


# ---------------------------------------------------------------- projection

@dataclass
class LayerPlacement:
    """Per expert: holders and the share of its rows each holder has (replicas: 1 each)."""
    holders: list[tuple[int, ...]]
    split: list[bool]

    def copy(self) -> "LayerPlacement":
        return LayerPlacement(list(self.holders), list(self.split))


def critical_path(trace: np.ndarray, pl: LayerPlacement, n_nodes: int, split_overhead: float = 0.1) -> float:
    """Mean over the trace's tokens of the busiest node's work (units: one whole expert)."""
    if len(trace) == 0:
        return 0.0
    E = len(pl.holders)
    fixed = np.zeros((E, n_nodes))
    repl = [False] * E
    for e, (h, s) in enumerate(zip(pl.holders, pl.split)):
        if s:
            fixed[e, list(h)] = (1.0 + split_overhead) / len(h)
        elif len(h) == 1:
            fixed[e, h[0]] = 1.0
        else:
            repl[e] = True
    load = fixed[trace].sum(axis=1)                      # [tokens, nodes]
    if any(repl):
        # the engine's choice (one token: every selected expert has one token), in order of expert id
        for t in range(len(trace)):
            for e in sorted(int(x) for x in trace[t] if repl[int(x)]):
                h = pl.holders[e]
                best = min(h, key=lambda m: (load[t, m], m))
                load[t, best] += 1.0
    return float(load.max(axis=1).mean())


def _lpt(counts: np.ndarray, n_nodes: int) -> LayerPlacement:
    load = np.zeros(n_nodes)
    holders: list = [None] * len(counts)
    for e in sorted(range(len(counts)), key=lambda e: (-counts[e], e)):
        node = int(np.argmin(load))
        holders[e] = (node,)
        load[node] += counts[e]
    return LayerPlacement(holders, [False] * len(counts))


def _improve_whole(trace, pl: LayerPlacement, n_nodes: int, counts, rounds: int = 2, **kw) -> LayerPlacement:
    """Swap pairs of whole experts between nodes while the critical path shrinks (hot experts first)."""
    best = critical_path(trace, pl, n_nodes, **kw)
    order = np.argsort(-counts, kind="stable")
    hot = [int(e) for e in order[:16] if not pl.split[e] and len(pl.holders[e]) == 1]
    cold = [int(e) for e in order[::-1][:16]]
    for _ in range(rounds):
        improved = False
        for e1 in hot:
            for e2 in cold:
                if pl.split[e2] or len(pl.holders[e2]) != 1 or pl.holders[e2] == pl.holders[e1]:
                    continue
                cand = pl.copy()
                cand.holders[e1], cand.holders[e2] = pl.holders[e2], pl.holders[e1]
                c = critical_path(trace, cand, n_nodes, **kw)
                if c < best - 1e-12:
                    pl, best, improved = cand, c, True
        if not improved:
            break
    return pl


def plan_layer(trace, counts, n_nodes: int, strategy: str, ffn_blocks: int, replica_slots: int = 0,
               split_overhead: float = 0.1) -> LayerPlacement:
    E = len(counts)
    kw = {"split_overhead": split_overhead}
    k = min(n_nodes, ffn_blocks)
    if strategy == "split" and k > 1:
        return LayerPlacement([tuple(range(n_nodes)) if k == n_nodes else
                               tuple(sorted((e * k + j) % n_nodes for j in range(k))) for e in range(E)], [True] * E)
    pl = _improve_whole(trace, _lpt(counts, n_nodes), n_nodes, counts, **kw)
    if strategy != "hybrid" or n_nodes < 2:
        return pl
    best = critical_path(trace, pl, n_nodes, **kw)
    slots = replica_slots
    for e in [int(x) for x in np.argsort(-counts, kind="stable")[:max(8, 2 * n_nodes)]]:
        options = []
        if k > 1:
            cand = pl.copy()
            cand.holders[e] = tuple(range(n_nodes)) if k == n_nodes else tuple(
                sorted((pl.holders[e][0] + j) % n_nodes for j in range(k)))
            cand.split[e] = True
            options.append((critical_path(trace, cand, n_nodes, **kw), 0, cand))
        if slots > 0:
            owner = pl.holders[e][0]
            for m in range(n_nodes):
                if m != owner:
                    cand = pl.copy()
                    cand.holders[e] = (owner, m)
                    options.append((critical_path(trace, cand, n_nodes, **kw), 1, cand))
        if options:
            c, used, cand = min(options, key=lambda o: (o[0], o[1]))
            if c < best - 1e-12:
                pl, best, slots = cand, c, slots - used
    if k > 1:
        every = plan_layer(trace, counts, n_nodes, "split", ffn_blocks, split_overhead=split_overhead)
        if critical_path(trace, every, n_nodes, **kw) < best - 1e-12:
            return every
    return pl


def make_profile_map(profile: Profile | None, n_expert: int, n_nodes: int, moe_layers: list[int], ffn_blocks: int,
                     strategy: str = "hybrid", replica_slots: int = 0, split_overhead: float = 0.1,
                     model: dict | None = None) -> tuple[ExpertMap, dict]:
    """The map per strategy, and the projected per-token critical path per layer against
    contiguous whole placement: {"layers": {layer: (contiguous, chosen)}, "mean": (.., ..)}."""
    meta = dict(model or {})
    meta["n_expert"] = n_expert
    if profile is None:
        if strategy not in ("split", "whole", "hybrid"):
            raise MoeNumaError(f"strategy: {strategy!r} is not one of whole, split, hybrid")
        # no routing known: splitting balances any routing; whole falls back to contiguous
        emap = make_map(n_expert, n_nodes, "contiguous" if strategy == "whole" else "split", meta, ffn_blocks)
        return emap, {}
    if profile.n_expert != n_expert:
        raise MoeNumaError(f"profile: made for {profile.n_expert} experts, the model has {n_expert}")
    slots_per_layer = replica_slots // max(1, len(moe_layers))
    overrides, projection = {}, {}
    contiguous = make_map(n_expert, n_nodes, "contiguous").default
    base = LayerPlacement([(o,) for o in contiguous], [False] * n_expert)
    for layer in moe_layers:
        trace = profile.trace.get(layer, np.zeros((0, profile.n_used), dtype=np.int64))
        counts = profile.counts.get(layer, np.zeros(n_expert, dtype=np.int64))
        pl = plan_layer(trace, counts, n_nodes, strategy, ffn_blocks, slots_per_layer, split_overhead)
        projection[layer] = (critical_path(trace, base, n_nodes, split_overhead),
                             critical_path(trace, pl, n_nodes, split_overhead))
        overrides[layer] = pl
    owners = {layer: tuple(pl.holders[e] if pl.split[e] else pl.holders[e][0] for e in range(n_expert))
              for layer, pl in overrides.items()}
    replicas = {(layer, e): pl.holders[e][1:] for layer, pl in overrides.items()
                for e in range(n_expert) if not pl.split[e] and len(pl.holders[e]) > 1}
    default = owners[moe_layers[0]] if moe_layers else contiguous
    emap = ExpertMap(n_expert, tuple(range(n_nodes)), default,
                     {layer: o for layer, o in owners.items() if o != default}, replicas, meta, "<profile map>")
    means = tuple(float(np.mean([p[i] for p in projection.values()])) for i in (0, 1)) if projection else (0, 0)
    return emap, {"layers": projection, "mean": means}


# ---------------------------------------------------------------- `moe-numa profile`

def add_arguments(ap: argparse.ArgumentParser) -> None:
    from ..cli import add_engine_flags
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True, help="prompts, separated by blank lines")
    ap.add_argument("-o", "--output", required=True, help="profile JSON to write")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--max-trace", type=int, default=4096, help="tokens whose selections are kept")
    add_engine_flags(ap)


def run(args: argparse.Namespace) -> int:
    from .. import load
    from ..cli import model_options
    with open(args.file, encoding="utf-8") as f:
        prompts = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    opts = model_options(args)
    opts.update(backend="engine", rebalance_every=None)
    model = load(args.model, **opts)
    try:
        prof = collect(model, prompts, max_tokens=args.max_tokens, max_trace=args.max_trace)
    finally:
        model.close()
    with open(args.output, "w") as f:
        json.dump(prof.to_json(), f)
    print(f"wrote {args.output}: {prof.tokens} tokens, {len(prof.counts)} MoE layers", file=sys.stderr)
    return 0
