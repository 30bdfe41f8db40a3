"""`moe-numa project`: a cost model projecting decode and prefill tokens/s of a
MoE model on 2, 4 and 8 sockets, per way of placing the weights, from machine
parameters and a routing trace.

Machine inputs (Machine): per-node read bandwidth, cross-node link bandwidth
and latency, the cost of one cross-node synchronisation, the share of read
bandwidth the decode kernels reach and the matmul rate per node for prefill.
Model inputs (Shape): bytes of one routed expert, the other weight bytes read
per token, FLOPs per token, from a GGUF file or a built-in real model.
Routing: a profile (`moe-numa profile`) or a synthetic Zipf-like trace.

Modes:
- `llama.cpp distribute`: every thread on every node reads its rows of every
  tensor; pages interleaved, so (N-1)/N of the reads cross the link; about a
  dozen thread barriers per layer span all sockets;
- `copy per node` (KTransformers v0.2): a whole weight copy on each node, work
  split evenly, all reads local; N x the memory;
- `whole`, `split`, `hybrid` (+ replicas): this engine with the map that
  `moe-numa map` makes from the trace (numa/profile.py); per layer two syncs (three for a MoE
  layer on several nodes),
  each node reads its own shards; a layer waits for its busiest node.

Decode time per layer = max over nodes of (bytes read / (bandwidth x kernel
share)) + its syncs; prefill per node = max(bytes / bandwidth, FLOPs / rate).
`--calibrate` measures this machine's virtual nodes (one core each): it runs
the engine in each mode and prints measured beside projected times. Timing
claims are never made by tests: run this on a quiet machine.

    python -m moe_numa.bench.project [-m FILE | --model-preset deepseek-v3-q4_k_m] [--profile P] [--skew S]
    python -m moe_numa.bench.project --calibrate -m bench.gguf [--nodes 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import standalone_main


@dataclass(frozen=True)
class Machine:
    name: str
    read_gbps: float          # achievable read bandwidth of one node (socket)
    link_gbps: float          # cross-socket bandwidth, one direction, all links
    link_latency_us: float
    sync_us: float            # one cross-node synchronisation (barrier of all nodes)
    decode_share: float       # share of read bandwidth the decode kernels reach
    prefill_gflops: float     # quantized matmul rate of one node's cores (prefill)
    source: str


# Assumed parameters of real dual-socket servers (for 4 and 8 nodes: more such sockets, each pair with
# the same link). Bandwidths: channels x MT/s x 8 bytes, times 0.8 for what STREAM-like reads reach;
# links: vendor link rate x lanes x links / 8, one direction, times 0.8; prefill: int8 peak of the
# cores at 10%, about what CPU prefill reaches on quantized weights; decode share and sync cost as
# measured for this engine on one core here. None of it is measured on those machines: replace them
# with `moe-numa bench-kernels` / Intel mlc numbers of the real machine.
SERVERS = [
    Machine("2x Xeon 6980P", read_gbps=0.8 * 12 * 6400 * 8 / 1000, link_gbps=6 * 24 * 20 / 8 * 0.8,
            link_latency_us=0.15, sync_us=1.0, decode_share=0.75, prefill_gflops=128 * 0.1 * 256 * 2.0,
            source="12 ch DDR5-6400 per socket (614 GB/s peak), 6 UPI 2.0 links x 24 GT/s x 20 lanes; "
                   "128 cores x 2.0 GHz x 256 int8 ops/cycle (AVX-512 VNNI, AMX not counted) at 10%"),
    Machine("2x EPYC 9654", read_gbps=0.8 * 12 * 4800 * 8 / 1000, link_gbps=4 * 32 * 16 / 8 * 0.8,
            link_latency_us=0.2, sync_us=1.2, decode_share=0.75, prefill_gflops=96 * 0.1 * 128 * 2.4,
            source="12 ch DDR5-4800 per socket (461 GB/s peak), 4 xGMI3 links x 32 Gb/s x 16 lanes; "
                   "96 cores x 2.4 GHz x 128 int8 ops/cycle (AVX-512 VNNI on 256-bit units) at 10%"),
    Machine("2x EPYC 7532", read_gbps=0.8 * 8 * 3200 * 8 / 1000, link_gbps=4 * 18 * 16 / 8 * 0.8,
            link_latency_us=0.25, sync_us=1.5, decode_share=0.75, prefill_gflops=32 * 0.1 * 128 * 2.4,
            source="8 ch DDR4-3200 per socket (205 GB/s peak), 4 xGMI2 links x 18 GT/s x 16 lanes; "
                   "32 cores x 2.4 GHz x 128 int8 ops/cycle (AVX2) at 10%"),
]


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_moe: int
    n_expert: int
    n_used: int
    expert_bytes: int          # one routed expert of one layer (gate + up + down)
    other_bytes: int           # every other weight byte a token reads (attention, shared/dense FFN, head)
    expert_flops: int          # one token through one expert
    other_flops: int           # one token through everything else
    ffn_blocks: int = 8        # GGML blocks in an expert's FFN dimension (split limit)

    @classmethod
    def from_gguf(cls, path: str) -> "Shape":
        from moe_numa.engine.plan import expert_blocks
        from moe_numa.gguf_file import GGUFModelFile
        from moe_numa.model_info import model_info
        from moe_numa.models import load_model
        g = GGUFModelFile(path)
        _, cfg, w = load_model(g)
        info = model_info(g, cfg)
        n_moe = info.n_moe_layers
        routed = info.bytes_by_class.get("routed_experts", 0)
        expert = routed // max(1, n_moe * cfg.n_expert)
        other = info.bytes_per_token - routed * cfg.router.n_used // cfg.n_expert
        efl = 2 * 3 * cfg.hidden * cfg.expert_ff
        other_params = info.n_params - sum(t.n_elements for t in g if "_exps" in t.name)
        return cls(cfg.name, cfg.n_layer, n_moe, cfg.n_expert, cfg.router.n_used, expert, other, efl,
                   2 * other_params, expert_blocks(w))


def _shape(name, n_layer, n_moe, E, k, hidden, ff, other_params, bpw, block=256):
    return Shape(name, n_layer, n_moe, E, k, int(3 * hidden * ff * bpw / 8), int(other_params * bpw / 8),
                 2 * 3 * hidden * ff, 2 * other_params, ff // block)


# Real models at Q4_K_M (about 4.85 bits per weight), from their published configs.
MODELS = {
    # 61 layers (3 dense), 256 experts top-8, hidden 7168, expert FFN 2048, one shared expert; other
    # parameters a token reads: MLA attention ~187M x 61, shared 44M x 58, dense 396M x 3, head 927M
    "deepseek-v3-q4_k_m": _shape("DeepSeek-V3 Q4_K_M", 61, 58, 256, 8, 7168, 2048,
                                 187e6 * 61 + 44e6 * 58 + 396e6 * 3 + 927e6, 4.85),
    # 94 layers, 128 experts top-8, hidden 4096, expert FFN 1536; GQA attention ~71M x 94, head 622M
    "qwen3-235b-a22b-q4_k_m": _shape("Qwen3-235B-A22B Q4_K_M", 94, 94, 128, 8, 4096, 1536, 71e6 * 94 + 622e6, 4.85),
    # 48 layers, 128 experts top-8, hidden 2048, expert FFN 768; attention ~19M x 48, head 311M
    "qwen3-30b-a3b-q4_k_m": _shape("Qwen3-30B-A3B Q4_K_M", 48, 48, 128, 8, 2048, 768, 19e6 * 48 + 311e6, 4.85),
}


def synthetic_trace(n_expert: int, n_used: int, tokens: int = 2048, skew: float = 0.0, seed: int = 0) -> np.ndarray:
    """[tokens, n_used] selections with popularity ~ rank**-skew (0: uniform)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_expert + 1) ** skew
    p = p[rng.permutation(n_expert)]
    p /= p.sum()
    # Gumbel top-k: sampling without replacement with probabilities p
    g = np.log(p)[None, :] - np.log(-np.log(rng.random((tokens, n_expert))))
    return np.argsort(-g, axis=1)[:, :n_used]


MODES = ("llama.cpp distribute", "copy per node", "whole", "split", "hybrid", "hybrid + replicas")


def _placement(mode: str, trace, shape: Shape, n: int, replica_slots: int):
    from moe_numa.numa.profile import plan_layer
    counts = np.bincount(trace.ravel(), minlength=shape.n_expert)
    strategy = {"whole": "whole", "split": "split", "hybrid": "hybrid", "hybrid + replicas": "hybrid"}[mode]
    return plan_layer(trace, counts, n, strategy, shape.ffn_blocks,
                      replica_slots if mode == "hybrid + replicas" else 0)


def _batch_loads(tokens_per_expert, pl, n: int, split_overhead: float) -> np.ndarray:
    """Per node (weight units read, tokens x experts computed) for one batch, the engine's choice."""
    reads, work = np.zeros(n), np.zeros(n)
    repl = []
    for e, c in enumerate(tokens_per_expert):
        if not c:
            continue
        h = pl.holders[e]
        if pl.split[e]:
            for m in h:
                reads[m] += (1 + split_overhead) / len(h)
                work[m] += c / len(h)
        elif len(h) == 1:
            reads[h[0]] += 1
            work[h[0]] += c
        else:
            repl.append(e)
    for e in sorted(repl, key=lambda e: (-tokens_per_expert[e], e)):
        m = min(pl.holders[e], key=lambda m: (reads[m] + work[m] / 4, m))
        reads[m] += 1
        work[m] += tokens_per_expert[e]
    return reads, work


def project(shape: Shape, machine: Machine, trace: np.ndarray, nodes=(2, 4, 8), replica_budget: float = 0.05,
            split_overhead: float = 0.1, prefill_tokens: int = 512, ops_per_layer: int = 12) -> list[dict]:
    """Rows {mode, nodes, decode_tps, prefill_tps, memory_x} for every mode and node count."""
    from moe_numa.numa.profile import critical_path
    rows = []
    bw = machine.read_gbps * 1e9 * machine.decode_share
    sync = machine.sync_us * 1e-6
    tok_bytes = shape.other_bytes + shape.n_moe * shape.n_used * shape.expert_bytes
    tok_flops = shape.other_flops + shape.n_moe * shape.n_used * shape.expert_flops
    all_bytes = shape.other_bytes + shape.n_moe * shape.n_expert * shape.expert_bytes
    gf = machine.prefill_gflops * 1e9
    T = prefill_tokens
    batches = [trace[i:i + T] for i in range(0, max(len(trace) - T + 1, 1), T)]
    for n in nodes:
        link = machine.link_gbps * 1e9
        slots = int(replica_budget * shape.n_expert)       # replica copies per layer the budget pays for
        for mode in MODES:
            if mode == "llama.cpp distribute":
                remote = tok_bytes * (n - 1) / n
                t_dec = max(tok_bytes / (n * bw), remote / link) + shape.n_layer * ops_per_layer * sync
                pre_read = all_bytes / (n * machine.read_gbps * 1e9)
                t_pre = max(T * tok_flops / (n * gf), pre_read, all_bytes * (n - 1) / n / link) \
                    + shape.n_layer * ops_per_layer * sync
                mem = 1.0
            elif mode == "copy per node":
                t_dec = tok_bytes / (n * bw) + shape.n_layer * 2 * sync
                t_pre = max(T * tok_flops / (n * gf), all_bytes / (n * machine.read_gbps * 1e9)) \
                    + shape.n_layer * 2 * sync
                mem = float(n)
            else:
                pl = _placement(mode, trace, shape, n, slots)
                crit = critical_path(trace, pl, n, split_overhead)          # expert units per token per layer
                # other_bytes / n: the router too is read once in all (each node a share of its rows),
                # at one more sync per MoE layer on several nodes
                syncs = 2 * shape.n_layer + 1 + (shape.n_moe if n > 1 else 0)
                t_dec = (shape.other_bytes / n + shape.n_moe * crit * shape.expert_bytes) / bw + syncs * sync
                pre = []
                for b in batches:
                    reads, work = _batch_loads(np.bincount(b.ravel(), minlength=shape.n_expert), pl, n,
                                               split_overhead)
                    per_node = np.maximum(reads * shape.expert_bytes / (machine.read_gbps * 1e9),
                                          work * shape.expert_flops / gf)
                    pre.append(per_node.max() * T / len(b))         # a short trace: scaled to T tokens
                moe_t = float(np.mean(pre)) * shape.n_moe
                other = max(T * shape.other_flops / (n * gf), shape.other_bytes / (n * machine.read_gbps * 1e9))
                t_pre = moe_t + other + syncs * sync
                n_repl = sum(len(h) - 1 for e, h in enumerate(pl.holders) if not pl.split[e])
                mem = 1.0 + shape.n_moe * n_repl * shape.expert_bytes / all_bytes
            rows.append({"mode": mode, "nodes": n, "decode_tps": 1.0 / t_dec, "prefill_tps": T / t_pre,
                         "memory_x": mem})
    return rows


def format_rows(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| mode | nodes | decode t/s | prefill t/s | memory | decode vs whole |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    whole = {r["nodes"]: r["decode_tps"] for r in rows if r["mode"] == "whole"}
    for r in rows:
        lines.append(f"| {r['mode']} | {r['nodes']} | {r['decode_tps']:.1f} | {r['prefill_tps']:.0f} | "
                     f"{r['memory_x']:.2f}x | {r['decode_tps'] / whole[r['nodes']]:.2f}x |")
    return "\n".join(lines)


def format_compact(rows: list[dict], title: str) -> str:
    """One row per mode: decode / prefill t/s per node count, and memory."""
    nodes = sorted({r["nodes"] for r in rows})
    by = {(r["mode"], r["nodes"]): r for r in rows}
    lines = [f"**{title}**", "", "| mode | " + " | ".join(f"{n} nodes: tg / pp512 t/s" for n in nodes)
             + " | memory |", "| --- |" + " ---: |" * (len(nodes) + 1)]
    for mode in MODES:
        cells = []
        for n in nodes:
            r, w = by[(mode, n)], by[("whole", n)]
            cells.append(f"{r['decode_tps']:.1f} / {r['prefill_tps']:.0f} ({r['decode_tps'] / w['decode_tps']:.2f}x)")
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {by[(mode, nodes[-1])]['memory_x']:.2f}x at {nodes[-1]} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- calibration

@contextlib.contextmanager
def _pinned_to(cpu: int):
    """The engine's caller is node 0's worker 0, pinned to its core; measurements that stand
    in for it must be too (unpinned, it can share a pool thread's core: ~0.2 ms per sync)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def measure_split_overhead(model_path: str, n_nodes: int, cpu: int) -> float:
    """The extra time per byte of a split expert, measured: its gate/up keep their rows, but its
    down matrix keeps 1/n of its columns on each node, so a node reads n times as many rows,
    each 1/n as long and each with its fixed cost. One core streams, from memory, down-shaped
    matrices of the model's own type at the whole and at the split row length; the slowdown,
    weighted by down's share of an expert's bytes."""
    from moe_numa import kernels as K
    from moe_numa.gguf_file import GGUFModelFile
    by = {t.name: t for t in GGUFModelFile(model_path)}
    down = next(t for n, t in by.items() if n.endswith("ffn_down_exps.weight"))
    parts = [by[down.name.replace("ffn_down_exps", k)] for k in ("ffn_gate_exps", "ffn_up_exps")] + [down]
    hidden, ff = down.shape[-2], down.shape[-1]              # numpy order: rows = hidden, columns = ff
    block = K.block_size(down.qtype)
    cols = max(block, ff // n_nodes // block * block)
    rng = np.random.default_rng(0)
    rows = max(hidden, (96 << 20) // K.row_bytes(down.qtype, ff) // hidden * hidden)   # past the L3, as decode

    def rate(n_cols: int) -> float:
        w = K.random_blocks(down.qtype, rows * (ff // n_cols), n_cols, rng)
        x = rng.standard_normal(n_cols).astype(np.float32)
        best = float("inf")
        with _pinned_to(cpu):
            for _ in range(4):
                t0 = time.perf_counter()
                K.matmul(w, down.qtype, x)
                best = min(best, time.perf_counter() - t0)
        return w.nbytes / best

    slow = rate(ff) / rate(cols) - 1.0
    return max(0.0, slow) * down.nbytes / sum(t.nbytes for t in parts)


def calibrate(model_path: str, n_nodes: int = 2, tokens: int = 32, rounds: int = 5) -> dict:
    """On this machine's virtual nodes (one core each): fit the machine from runs that are not
    the ones predicted, then project each mode and compare with its measured decode.

    - per-node read bandwidth: every node's core reading at once, divided by the nodes (the
      cores share one memory system here), measured just before and after every timed run,
      because this VM's bandwidth drifts between states minutes apart;
    - the share of it that decode reaches, all costs included, and the routing trace: one node
      with all the cores;
    - the sync cost: an empty task on pools shaped like the engine's at N nodes (the pinned
      caller runs node 0, one pool per other node).
    Each mode then runs `rounds` times; a round's projection uses the bandwidth measured
    around that round. The error is median projected / median measured - 1."""
    from moe_numa import kernels as K
    shape = Shape.from_gguf(model_path)
    cpus = K.order_cpus(K.available_cpus())[:n_nodes]

    ovh = measure_split_overhead(model_path, n_nodes, cpus[0])
    # made before any model is loaded: a loaded engine pins this thread, and a pool checks its CPUs
    bw_pool = K.ThreadPool(cpus)
    sync_pools = [K.ThreadPool([c], caller_is_worker0=False) for c in cpus[1:]]
    try:
        return _calibrate(model_path, n_nodes, tokens, rounds, shape, cpus, bw_pool, sync_pools, ovh)
    finally:
        for p in [bw_pool, *sync_pools]:
            p.close()


def _calibrate(model_path, n_nodes, tokens, rounds, shape, cpus, bw_pool, pools, ovh: float) -> dict:
    import moe_numa
    from moe_numa import kernels as K
    from moe_numa.numa.profile import collect, make_profile_map
    buf = np.ones(256 << 20 >> 2, dtype=np.float32)          # 256 MiB: well past the L3

    def node_bw() -> float:
        with _pinned_to(cpus[0]):
            K.read_sum(buf, bw_pool)
            t0 = time.perf_counter()
            for _ in range(3):
                K.read_sum(buf, bw_pool)
            return 3 * buf.nbytes / (time.perf_counter() - t0) / 1e9 / len(cpus)

    def decode(m, first: int) -> tuple[float, dict]:
        m.backend.reset()
        m.backend.forward(np.array([1]), all_logits=False)     # warm-up token
        m.backend.reset()
        m.backend.reset_counters()
        t0 = time.perf_counter()
        for t in range(first, first + tokens):
            m.backend.forward(np.array([t]), all_logits=False)
        return time.perf_counter() - t0, m.backend.counters()

    tok_bytes = shape.other_bytes + shape.n_moe * shape.n_used * shape.expert_bytes
    shares, one = [], []
    with moe_numa.load(model_path, numa_nodes=1, threads_per_node=len(cpus), rebalance_every=None) as m:
        ids = list(range(100, 100 + tokens))
        prof = collect(m, [" ".join(m.detokenize([i]) for i in ids)], max_tokens=tokens * 4)
        for r in range(rounds):
            bw = node_bw()
            wall, c = decode(m, 100 + r)
            bw = (bw + node_bw()) / 2
            one.append(tokens / wall)
            # the block time (critical path) is kernel work: its bytes/s against all the cores' bandwidth
            # bytes per second of the whole decode against all the cores' bandwidth: what a node
            # reaches with everything a token costs at one node (quantising, routing, in-task
            # barriers, the calls from Python), which all grow with the bytes a node reads
            shares.append(tokens * tok_bytes / wall / (bw * 1e9 * len(cpus)))
    share = min(1.0, float(np.median(shares)))
    with _pinned_to(cpus[0]):
        if len(pools) == 1:
            lat = pools[0].noop_latency(2000)
        else:       # several pools from Python: an overestimate by the call overhead
            lat = []
            for _ in range(2000):
                t0 = time.perf_counter_ns()
                for p in pools:
                    p.noop()
                lat.append(time.perf_counter_ns() - t0)
    # what N nodes add per block: waking the other nodes' pools and hearing back from them
    sync_us = float(np.median(lat)) / 1e3
    moe_layers = sorted(prof.trace)
    trace = np.concatenate([prof.trace[l] for l in moe_layers]) if moe_layers else synthetic_trace(
        shape.n_expert, shape.n_used)
    maps = {"whole": "contiguous", "split": "split",
            "hybrid": make_profile_map(prof, shape.n_expert, n_nodes, moe_layers, shape.ffn_blocks, "hybrid")[0]}
    rows, bws = [], []
    for mode, emap in maps.items():
        measured, projected = [], []
        with moe_numa.load(model_path, numa_nodes=n_nodes, threads_per_node=1, expert_map=emap,
                           rebalance_every=None) as m:
            for r in range(rounds):
                bw = node_bw()
                wall, _ = decode(m, 100 + r)
                bw = (bw + node_bw()) / 2
                bws.append(bw)
                mach = Machine("here", bw, link_gbps=1e6, link_latency_us=0.0, sync_us=sync_us,
                               decode_share=share, prefill_gflops=1e3, source="")
                row = next(x for x in project(shape, mach, trace, nodes=(n_nodes,), split_overhead=ovh)
                           if x["mode"] == mode)
                measured.append(tokens / wall)
                projected.append(row["decode_tps"])
        pm, mm = float(np.median(projected)), float(np.median(measured))
        rows.append({"mode": mode, "projected_tps": pm, "measured_tps": mm, "error": pm / mm - 1,
                     "round_errors": [p / x - 1 for p, x in zip(projected, measured)]})
    here = Machine(f"this machine, {n_nodes} virtual nodes of 1 core", float(np.median(bws)), link_gbps=1e6,
                   link_latency_us=0.0, sync_us=sync_us, decode_share=share, prefill_gflops=1e3,
                   source="measured now: per-node read bandwidth (all nodes reading, around every run), the "
                          "share of it decode reaches at 1 node, an empty task across the nodes' pools")
    return {"machine": asdict(here), "one_node_tps": float(np.median(one)), "rounds": rounds, "rows": rows,
            "split_overhead": ovh}


def main(argv=None) -> int:
    return standalone_main("moe-numa project", __doc__, add_arguments, run, argv)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-m", "--model", help="GGUF file (its shapes)")
    ap.add_argument("--model-preset", choices=sorted(MODELS), default="deepseek-v3-q4_k_m")
    ap.add_argument("--profile", help="routing profile (moe-numa profile); default: a synthetic trace")
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the synthetic trace")
    ap.add_argument("--replica-budget", type=float, default=0.05, help="fraction of the experts for replicas")
    ap.add_argument("--nodes", default="2,4,8")
    ap.add_argument("--calibrate", action="store_true", help="measure this machine's virtual nodes (needs -m)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--compact", action="store_true", help="one row per mode (markdown)")


def run(a: argparse.Namespace) -> int:
    nodes = tuple(int(x) for x in a.nodes.split(","))
    if a.calibrate:
        if not a.model:
            raise SystemExit("moe-numa project: error: --calibrate needs -m FILE (a bench model)")
        res = calibrate(a.model, nodes[0])
        if a.json:
            print(json.dumps(res))
        else:
            print(f"# {res['machine']['name']}: {res['machine']['read_gbps']:.1f} GB/s per node (median), "
                  f"sync {res['machine']['sync_us']:.2f} us, decode share {res['machine']['decode_share']:.2f}; "
                  f"split experts' extra time per byte {100 * res['split_overhead']:.1f}% (measured); "
                  f"1 node x {nodes[0]} cores: {res['one_node_tps']:.2f} t/s; {res['rounds']} rounds per mode")
            print("| mode | projected t/s | measured t/s | error | per-round errors |\n"
                  "| --- | ---: | ---: | ---: | --- |")
            for r in res["rows"]:
                print(f"| {r['mode']} | {r['projected_tps']:.2f} | {r['measured_tps']:.2f} | {100 * r['error']:+.1f}% | "
                      + ", ".join(f"{100 * e:+.0f}%" for e in r["round_errors"]) + " |")
        return 0
    shape = Shape.from_gguf(a.model) if a.model else MODELS[a.model_preset]
    if a.profile:
        from moe_numa.numa.profile import Profile
        prof = Profile.load(a.profile)
        trace = np.concatenate([prof.trace[l] for l in sorted(prof.trace)])
    else:
        trace = synthetic_trace(shape.n_expert, shape.n_used, skew=a.skew)
    out = []
    for mach in SERVERS:
        rows = project(shape, mach, trace, nodes, a.replica_budget)
        out.append({"machine": asdict(mach), "rows": rows})
        if not a.json:
            title = f"{shape.name} on {mach.name}-class sockets (routing skew {'profile' if a.profile else a.skew})"
            print(format_compact(rows, title) if a.compact else format_rows(rows, title))
            print(f"\nassumed: {mach.read_gbps:.0f} GB/s per node, link {mach.link_gbps:.0f} GB/s, sync "
                  f"{mach.sync_us} us; {mach.source}\n")
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
