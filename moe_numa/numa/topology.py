"""NUMA topology: nodes, their CPUs (physical cores and SMT siblings told
apart), memory and distances, read from /sys; and virtual nodes, which split a
machine's CPUs into N groups so the whole engine runs on a one-node machine.

A virtual node binds memory to the real node of the same id when that node
exists; otherwise memory placement falls back to the kernel's default policy,
and that fallback is logged once.

Also the CPU mask of a thread that calls into engines: an engine pins its
caller to node 0's first core, and the CPUs the thread may use are still those
it had before (a second model loaded beside the first sees them all).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TopologyError

log = logging.getLogger("moe_numa.numa")
SYS_NODE = Path("/sys/devices/system/node")
SYS_CPU = Path("/sys/devices/system/cpu")


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def format_cpulist(cpus: list[int]) -> str:
    cpus = sorted(cpus)
    runs, start, prev = [], None, None
    for c in cpus:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            runs.append((start, prev))
            start = prev = c
    if start is not None:
        runs.append((start, prev))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple[int, ...]            # usable CPUs: physical cores first, then SMT siblings
    physical: tuple[int, ...]        # one CPU per physical core
    mem_bytes: int = 0
    distances: tuple[int, ...] = ()
    memory_node: int | None = None   # real node to bind memory to (None: default policy)

    def threads(self, n: int | None = None, use_smt: bool = False) -> list[int]:
        """CPUs for n threads: physical cores first, siblings only if asked or needed."""
        pool = list(self.cpus) if use_smt else list(self.physical)
        if n is None:
            return pool
        if n > len(pool):
            pool = list(self.cpus)
        if n > len(pool):
            # More threads than CPUs: wrap around (oversubscribed; only sensible for tests).
            return [pool[i % len(pool)] for i in range(n)]
        return pool[:n]


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    virtual: bool = False
    real_nodes: int = 1
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def describe(self) -> str:
        kind = f"{self.n_nodes} virtual node(s) over {self.real_nodes} real" if self.virtual else \
            f"{self.n_nodes} NUMA node(s)"
        lines = [kind]
        for n in self.nodes:
            siblings = sorted(set(n.cpus) - set(n.physical))
            mem = f"{n.mem_bytes / 2**30:.1f} GiB" if n.mem_bytes else "-"
            bind = "default policy (fallback)" if n.memory_node is None else f"node {n.memory_node}"
            lines.append(f"  node {n.id}: cpus {format_cpulist(list(n.physical))}"
                         + (f" (+SMT {format_cpulist(siblings)})" if siblings else "")
                         + f", memory {mem}, binds to {bind}"
                         + (f", distances {list(n.distances)}" if n.distances else ""))
        lines.extend(f"  note: {t}" for t in self.notes)
        return "\n".join(lines)


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text()
    except OSError:
        return default


def core_of(cpu: int) -> int:
    """An id of the physical core a CPU belongs to (its lowest SMT sibling)."""
    for name in ("core_cpus_list", "thread_siblings_list"):
        text = _read(SYS_CPU / f"cpu{cpu}" / "topology" / name).strip()
        if text:
            return min(parse_cpulist(text))
    return cpu


def order_cpus(cpus, use_smt: bool = False) -> list[int]:
    """The CPUs, one per physical core first (in the given order); SMT siblings of
    cores already listed are appended only when use_smt."""
    seen: set[int] = set()
    first: list[int] = []
    siblings: list[int] = []
    for c in cpus:
        c = int(c)
        core = core_of(c)
        if core in seen:
            siblings.append(c)
        else:
            seen.add(core)
            first.append(c)
    return first + siblings if use_smt else first


def order_physical_first(cpus: list[int]) -> tuple[list[int], list[int]]:
    """(all CPUs with one per physical core first, one CPU per physical core)."""
    return order_cpus(sorted(cpus), use_smt=True), order_cpus(sorted(cpus))


def _meminfo_bytes(node_dir: Path) -> int:
    m = re.search(r"MemTotal:\s+(\d+)\s*kB", _read(node_dir / "meminfo"))
    return int(m.group(1)) * 1024 if m else 0


# Threads pinned by loaded engines: tid -> [affinity before the first engine, live engines].
# Several models loaded by one thread and closed in any order give it back its own affinity,
# and a model loaded beside another sees the CPUs the thread had, not the engine's one core.
_pinned: dict[int, list] = {}
_pinned_lock = threading.Lock()


def allowed_cpus() -> set[int]:
    """The CPUs this thread may use, as they were before a loaded engine pinned it."""
    with _pinned_lock:
        entry = _pinned.get(threading.get_native_id())
        return set(entry[0]) if entry else set(os.sched_getaffinity(0))


def pin_caller(cpu: int) -> int:
    """Pin this thread to `cpu` for an engine's life (engines count); returns its tid."""
    tid = threading.get_native_id()
    with _pinned_lock:
        entry = _pinned.setdefault(tid, [os.sched_getaffinity(0), 0])
        entry[1] += 1
    os.sched_setaffinity(0, {cpu})
    return tid


def unpin_caller(tid: int) -> None:
    """An engine pinned by `tid` closed: the last one gives the thread its affinity back."""
    with _pinned_lock:
        entry = _pinned.get(tid)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _pinned[tid]
    try:
        os.sched_setaffinity(tid, entry[0])
    except OSError:       # that thread has exited: nothing left to restore
        pass


@contextlib.contextmanager
def unpinned():
    """This thread with its pre-engine affinity for a moment (to start pools on other CPUs)."""
    before = os.sched_getaffinity(0)
    allowed = allowed_cpus()
    if allowed != before:
        os.sched_setaffinity(0, allowed)
    try:
        yield
    finally:
        if allowed != before:
            os.sched_setaffinity(0, before)


def detect() -> Topology:
    """The machine's real NUMA nodes, restricted to the CPUs this process may use."""
    allowed = allowed_cpus()
    nodes = []
    node_dirs = sorted((p for p in SYS_NODE.glob("node[0-9]*")), key=lambda p: int(p.name[4:])) \
        if SYS_NODE.exists() else []
    for d in node_dirs:
        nid = int(d.name[4:])
        cpus = [c for c in parse_cpulist(_read(d / "cpulist")) if c in allowed]
        if not cpus:
            continue    # memory-only node, or none of its CPUs are ours
        ordered, physical = order_physical_first(cpus)
        distances = tuple(int(x) for x in _read(d / "distance").split())
        nodes.append(Node(nid, tuple(ordered), tuple(physical), _meminfo_bytes(d), distances, memory_node=nid))
    if not nodes:
        ordered, physical = order_physical_first(sorted(allowed))
        nodes.append(Node(0, tuple(ordered), tuple(physical), memory_node=None))
        return Topology(tuple(nodes), notes=("no NUMA information in /sys; one node, default memory policy",))
    return Topology(tuple(nodes), real_nodes=len(node_dirs))


_fallback_logged = False


def virtual_topology(n_nodes: int, base: Topology | None = None) -> Topology:
    """Split the machine's CPUs into n_nodes groups (physical cores spread first).

    Virtual node k binds memory to real node k if it exists, else falls back to
    the default policy. With fewer CPUs than nodes, nodes share CPUs."""
    global _fallback_logged
    if n_nodes < 1:
        raise TopologyError(f"--numa-nodes must be at least 1, got {n_nodes}")
    base = base or detect()
    if n_nodes == base.n_nodes and not base.virtual:
        return base
    real_ids = {n.id for n in base.nodes}
    physical = [c for n in base.nodes for c in n.physical]
    siblings = [c for n in base.nodes for c in n.cpus if c not in n.physical]
    notes = []
    groups_phys = _split(physical, n_nodes)
    groups_smt = _split(siblings, n_nodes) if siblings else [[] for _ in range(n_nodes)]
    if len(physical) < n_nodes:
        notes.append(f"{n_nodes} virtual nodes share {len(physical)} physical cores (oversubscribed; for testing)")
    nodes = []
    for k in range(n_nodes):
        phys = groups_phys[k] or [physical[k % len(physical)]]
        mem_node = k if k in real_ids else None
        nodes.append(Node(k, tuple(phys + groups_smt[k]), tuple(phys), memory_node=mem_node))
    missing = [k for k in range(n_nodes) if k not in real_ids]
    if missing:
        msg = (f"virtual node(s) {format_cpulist(missing)} have no real NUMA node; their memory uses the "
               f"default policy")
        notes.append(msg)
        if not _fallback_logged:
            log.warning(msg)
            _fallback_logged = True
    return Topology(tuple(nodes), virtual=True, real_nodes=base.real_nodes if base.nodes else 1, notes=tuple(notes))


def _split(items: list[int], n: int) -> list[list[int]]:
    """Contiguous, balanced split (the first groups get the extra items)."""
    q, r = divmod(len(items), n)
    out, i = [], 0
    for k in range(n):
        size = q + (1 if k < r else 0)
        out.append(items[i:i + size])
        i += size
    return out


def topology(numa_nodes: int | None = None) -> Topology:
    """The real topology, or `numa_nodes` virtual nodes over it."""
    real = detect()
    return real if numa_nodes is None else virtual_topology(numa_nodes, real)
