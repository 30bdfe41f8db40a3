"""The engine backend: applies a PlacementPlan to a loaded model, copies every
shard once into its node's bound memory, sets up one pinned thread pool per
node, and runs the forward pass as a handful of native calls per layer.

How a token flows (docs/architecture.md): embedding row -> for each layer:
attention block (every node: norm, its heads' q/k/v, RoPE, its KV cache, its
part of attn_output -> partial; one sync; partials summed into the residual)
-> FFN block (every node: norm, the replicated router picks experts, the node
runs the experts it owns and its slice of the shared expert -> partial; one
sync; summed) -> output head (every node: its vocabulary rows).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import _native, quants
from ..errors import ArgumentError, ClosedError, ContextOverflowError, MoeNumaError
from .. import kernels
from ..gguf_file import Tensor, bad_block_error, check_tensor_blocks
from ..kernels import ThreadPool
from ..layers.kv_cache import cache_type
from ..layers.rope import rope_cos_sin
from ..layers.split import EXPERTS, FFN, KV_HEADS, REPLICATED, split_rules
from ..model_info import tensor_class
from ..errors import ExpertMapError
from ..numa.expert_map import DEFAULT_STRATEGY, STRATEGIES, load_map, make_map
from ..numa.memory import ALIGN, HUGE, PAGE, NodeArena, drop_file_pages, populate, populate_read, populate_supported, resident_bytes
from ..numa.topology import Topology, pin_caller, topology, unpin_caller, unpinned
from .plan import LayerPlan, PlacementPlan, expert_blocks, make_plan

log = logging.getLogger("moe_numa.engine")


@dataclass
class Ref:
    """A shard placed in node memory, resolved to its array after placement."""
    node: int
    key: str


@dataclass
class _Item:
    node: int
    key: str
    cls: str
    nbytes: int
    fill: Callable[[np.ndarray], None] | None   # None: zeros (caches), left untouched
    shape: tuple[int, ...]
    dtype: Any
    replicated: bool
    src: tuple[str, int] | None = None          # a plain copy of this file range: may be mapped instead
    check: Callable[[np.ndarray], None] | None = None   # check_tensors' block check of the placed bytes
    mapped: bool = False    # zero_copy: a view of the file mapping, not a copy in the arena


class NodeStore:
    """Collects shards per node, then allocates one bound arena per node and
    copies every shard in (with progress).

    Contiguous shards are read from the file straight into their arena (pread):
    the file is never faulted into this process, so the weights are resident
    once. Strided shards (column slices) are copied from the memory map, whose
    pages are released right after.

    With `zero_copy` (and no weights cache), shards that are plain file ranges are not
    copied: they are views of a copy-on-write mapping of the GGUF (numa.memory.FileMapping),
    whose pages are the page cache's. Only sound where placement moves nothing: every
    node on one memory node (a one-node machine), so EngineBackend asks for it only there.
    With `place_behind` too, a background thread then swaps the mapped ranges for copies in
    bound hugepage memory at the same addresses (place_behind_start): the first token comes
    at mapping speed, and decode reads the copies once they are in."""

    BEHIND_RUN = 32 << 20    # bytes per background copy-and-move (the write lock is held for one)

    def __init__(self, topo: Topology, hugepages: bool = False, gguf=None, check_tensors: bool = False,
                 zero_copy: bool = False, place_behind: bool = False):
        self.topo = topo
        self.hugepages = hugepages
        self.zero_copy = zero_copy
        self.place_behind = zero_copy and place_behind
        # Held by whoever writes weights in place (the rebalancer's swaps) and by the background
        # placement for each run it moves, so that no write lands in a copy already taken.
        self.write_lock = threading.Lock()
        self.behind: dict | None = None          # the background placement's progress
        self._behind_thread: threading.Thread | None = None
        self._behind_stop = threading.Event()
        self.file_maps: dict[str, Any] = {}   # path -> FileMapping (zero_copy)
        self.check_tensors = check_tensors
        self.checked: set[str] = set()      # tensors whose copies are checked
        self.gguf = gguf
        self.items: dict[tuple[int, str], _Item] = {}
        self.arrays: dict[tuple[int, str], np.ndarray] = {}
        self.arenas: list[NodeArena] = []
        # Address space kept free in every arena for expert replicas made at run time
        # (untouched anonymous pages are not resident), and freed replica slots by size.
        self.reserve = 0
        self.free_slots: dict[tuple[int, int], list[np.ndarray]] = {}

    def raw(self, node: int, key: str, view: np.ndarray, cls: str, replicated: bool = False,
            source: Tensor | None = None) -> Ref:
        """Copy a (possibly strided) uint8 view of GGML blocks, rows kept."""
        view = np.asarray(view)
        shape = view.shape if view.ndim == 2 else (1, view.shape[0])
        where = self.gguf.locate(view) if self.gguf is not None else None

        if where is not None:
            def fill(dst, where=where):
                _pread_into(where[0], where[1], dst)
        else:
            def fill(dst, v=view, whole=None if source is None else source.raw):
                np.copyto(dst, v.reshape(dst.shape))
                if whole is not None and whole.flags.c_contiguous:
                    drop_file_pages(whole)   # later shards of this tensor fault it back in if needed
        check = None
        if self.check_tensors and source is not None:
            check = _block_check(view, source)
            fill = _checked(fill, check)
            self.checked.add(source.name)
        return self._add(_Item(node, key, cls, int(math.prod(shape)), fill, shape, np.uint8, replicated,
                               src=where, check=check))

    def floats(self, node: int, key: str, values_fn: Callable[[], np.ndarray], shape, cls: str,
               replicated: bool = True) -> Ref:
        def fill(dst):
            np.copyto(dst, np.asarray(values_fn(), dtype=np.float32).reshape(dst.shape))
        return self._add(_Item(node, key, cls, int(math.prod(shape)) * 4, fill, tuple(shape), np.float32, replicated))

    def zeros(self, node: int, key: str, shape, cls: str, dtype=np.float32) -> Ref:
        nbytes = int(math.prod(shape)) * np.dtype(dtype).itemsize
        return self._add(_Item(node, key, cls, nbytes, None, tuple(shape), dtype, False))

    def _add(self, item: _Item) -> Ref:
        self.items[(item.node, item.key)] = item
        return Ref(item.node, item.key)

    def materialize(self, progress: Callable[[int, int], None] | None = None, cache=None) -> None:
        """Allocate each node's arena and fill it: weights first (a page-aligned prefix,
        the part a weights cache holds), then zero items (caches) and the replica reserve.

        Each node is filled by threads pinned to its CPUs, all nodes at once: a thread
        populates a run of shards (MADV_POPULATE_WRITE, whole hugepages) and then reads
        them in, so pages are faulted in parallel and on the node. With `cache` (a
        numa.weights_cache.WeightsCache) a valid image is mapped instead of filled; with
        zero_copy (and no cache) the plain file ranges are mapped from the GGUF instead."""
        n = self.topo.n_nodes
        weights: list[list[tuple]] = [[] for _ in range(n)]
        rest: list[list[tuple]] = [[] for _ in range(n)]
        mapped: list[list[tuple]] = [[] for _ in range(n)]
        zero_copy = self.zero_copy and cache is None
        for k, it in self.items.items():
            if zero_copy and it.src is not None:
                mapped[it.node].append((k, it))
            else:
                (weights if it.fill is not None else rest)[it.node].append((k, it))
        size = [0] * n
        for k in range(n):
            w = sum((it.nbytes + ALIGN - 1) // ALIGN * ALIGN for _, it in weights[k])
            z = sum((it.nbytes + ALIGN - 1) // ALIGN * ALIGN for _, it in rest[k])
            size[k] = (w + PAGE - 1) // PAGE * PAGE + z
        for k, node in enumerate(self.topo.nodes):
            self.arenas.append(NodeArena(size[k] + self.reserve + 4096, node.memory_node, self.hugepages,
                                         label=f"node{k}"))
        self.weight_bytes = []
        for k in range(n):
            arena = self.arenas[k]
            for key, it in weights[k]:
                self.arrays[key] = arena.alloc(it.nbytes).view(it.dtype).reshape(it.shape)
            arena.used = (arena.used + PAGE - 1) // PAGE * PAGE
            self.weight_bytes.append(arena.used)
            for key, it in rest[k]:   # fresh anonymous memory is zero, and stays unfaulted until written
                self.arrays[key] = arena.alloc(it.nbytes).view(it.dtype).reshape(it.shape)
        total = sum(it.nbytes for ws in weights for _, it in ws)
        mapped_bytes = sum(it.nbytes for ms in mapped for _, it in ms)
        t0 = time.perf_counter()
        hit = cache.attach(self) if cache is not None else [False] * n
        todo = [ws if not hit[k] else [] for k, ws in enumerate(weights)]
        done0 = sum(it.nbytes for k in range(n) if hit[k] for _, it in weights[k])
        if progress and done0:
            progress(done0, total)
        try:
            self._map_file_ranges(mapped)
            self._prefault(hit)
            self._fill_nodes(todo, total, done0, progress, cache)
            if cache is not None:
                cache.commit(self)
                self._prefault([not h for h in hit])   # the images just built, now mapped private
        except BaseException:
            if cache is not None:
                cache.abort()
            raise
        finally:
            _close_files()
        secs = time.perf_counter() - t0
        moved = total + mapped_bytes
        self.load_stats = {"bytes": moved, "seconds": secs, "gb_per_s": moved / secs / 1e9 if secs > 0 else None,
                           "copied_bytes": total - done0, "cached_bytes": done0, "mapped_bytes": mapped_bytes,
                           "populate": populate_supported(),
                           "weights_cache": None if cache is None else cache.summary(hit)}

    def _map_file_ranges(self, mapped: list[list[tuple]]) -> None:
        """zero_copy: every plain file-range shard becomes a view of a copy-on-write mapping
        of its file; the ranges are mapped in (MADV_POPULATE_READ: the page cache's pages, or
        a read where the file is not cached) from each node's pinned threads, then checked."""
        from ..numa.memory import FileMapping
        ranges: list[list[tuple[int, int]]] = [[] for _ in mapped]
        for k, items in enumerate(mapped):
            for key, it in items:
                path, off = it.src
                fm = self.file_maps.get(path)
                if fm is None:
                    fm = self.file_maps[path] = FileMapping(path, self.hugepages)
                self.arrays[key] = fm.view(off, it.nbytes).view(it.dtype).reshape(it.shape)
                it.mapped = True
                ranges[k].append((fm.addr + off, it.nbytes))
        # Placed behind, the pages are faulted by the background copy (and the first tokens
        # fault only what they read: about a tenth of the experts per decoded token), so
        # mapping them all in first would only delay load()'s return (0.5 s for 5.5 GiB here).
        if not self.place_behind:
            self._populate_read_ranges(ranges)
        for items in mapped:
            for key, it in items:
                if it.check is not None:
                    it.check(self.arrays[key])

    def _populate_read_ranges(self, ranges: list[list[tuple[int, int]]]) -> None:
        """MADV_POPULATE_READ of (addr, length) ranges per node, from threads pinned to the
        node's CPUs, the node's ranges cut into one piece per thread."""
        def work(pieces, cpus):
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
            for addr, length in pieces:
                first = addr - addr % PAGE
                populate_read(first, addr + length - first)
        threads = []
        for k, rs in enumerate(ranges):
            if not rs:
                continue
            cpus = list(self.topo.nodes[k].cpus) or list(os.sched_getaffinity(0))
            n_thr = min(len(cpus), 32)
            pieces: list[list[tuple[int, int]]] = [[] for _ in range(n_thr)]
            share = -(-sum(length for _, length in rs) // n_thr)
            t, room = 0, share
            for addr, length in rs:   # cut the ranges into n_thr runs of about equal bytes
                while length > 0:
                    take = min(length, room)
                    pieces[t].append((addr, take))
                    addr, length, room = addr + take, length - take, room - take
                    if room == 0 and t + 1 < n_thr:
                        t, room = t + 1, share
            for p in pieces:
                if p:
                    threads.append(threading.Thread(target=work, args=(p, cpus), daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _prefault(self, hit: list[bool]) -> None:
        """Map the cached images in now, from each node's pinned threads (~10 GB/s here),
        so that the first tokens do not take minor faults page by page."""
        def work(k, lo, hi, cpus):
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
            populate_read(self.arenas[k].addr + lo, hi - lo)
        threads = []
        for k in (k for k, h in enumerate(hit) if h):
            cpus = list(self.topo.nodes[k].cpus) or list(os.sched_getaffinity(0))
            cuts = np.linspace(0, self.weight_bytes[k] // PAGE, min(len(cpus), 32) + 1).astype(np.int64) * PAGE
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                threads.append(threading.Thread(target=work, args=(k, int(lo), int(hi), cpus), daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _fill_nodes(self, todo, total: int, done0: int, progress, cache) -> None:
        """Fill each node's shards from threads pinned to that node, all nodes in parallel."""
        state = {"done": done0, "error": None}
        lock = threading.Lock()

        def runs(items):   # consecutive shards in runs of >= 32 MiB: one populate call each
            run, nbytes = [], 0
            for entry in items:
                run.append(entry)
                nbytes += entry[1].nbytes
                if nbytes >= 32 << 20:
                    yield run
                    run, nbytes = [], 0
            if run:
                yield run

        def worker(k, queue, cpus):
            try:
                os.sched_setaffinity(0, cpus)   # this thread only: its faults and copies run on node k
            except OSError:
                pass
            while state["error"] is None:
                with lock:
                    if not queue:
                        return
                    run = queue.pop()
                try:
                    first, last = self.arrays[run[0][0]], self.arrays[run[-1][0]]
                    lo = _native.data_address(first)
                    hi = _native.data_address(last) + last.nbytes
                    base = self.arenas[k].addr
                    lo_h = max(base, lo - (lo - base) % HUGE)
                    hi_h = min(base + self.weight_bytes[k], hi + (-(hi - base)) % HUGE)
                    if cache is not None:
                        cache.reserve(k, lo_h - base, hi_h - lo_h)
                    populate(lo_h, hi_h - lo_h)
                    for key, it in run:
                        it.fill(self.arrays[key])
                    with lock:
                        state["done"] += sum(it.nbytes for _, it in run)
                        if progress:
                            progress(state["done"], total)
                except BaseException as e:   # the first error stops every thread, then is raised
                    with lock:
                        state["error"] = state["error"] or e
                    return

        threads = []
        for k, items in enumerate(todo):
            queue = list(runs(items))[::-1]
            cpus = list(self.topo.nodes[k].cpus) or list(os.sched_getaffinity(0))
            for _ in range(min(len(queue), len(cpus), 32)):
                t = threading.Thread(target=worker, args=(k, queue, cpus), name=f"moe-numa-load{k}", daemon=True)
                t.start()
                threads.append(t)
        try:
            for t in threads:
                t.join()
        except BaseException as e:   # Ctrl-C: the workers stop after the run in hand
            with lock:
                state["error"] = state["error"] or e
            for t in threads:
                t.join()
            raise
        if state["error"] is not None:
            raise state["error"]
        if progress and state["done"] < total:
            progress(total, total)

    def place_behind_start(self) -> None:
        """Start the background placement of the mapped shards (a no-op without place_behind
        or mapped shards): one thread on the nodes' CPUs copies each hugepage-aligned run of
        the file that holds mapped shards into bound memory and moves it over the mapping
        (FileMapping.place_behind), BEHIND_RUN bytes at a time. A failure leaves the rest
        mapped, which reads the same bytes; it is logged and reported in `behind`."""
        if not self.place_behind or self._behind_thread is not None:
            return
        runs: list[tuple[Any, int, int]] = []
        for path, fm in self.file_maps.items():
            spans = sorted((it.src[1], it.src[1] + it.nbytes) for it in self.items.values()
                           if it.mapped and it.src[0] == path)
            merged: list[list[int]] = []
            for lo, hi in spans:
                lo, hi = lo - lo % HUGE, min(-(-hi // HUGE) * HUGE, fm.length)
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            runs += [(fm, a, min(a + self.BEHIND_RUN, hi)) for lo, hi in merged
                     for a in range(lo, hi, self.BEHIND_RUN)]
        if not runs:
            return
        node = self.topo.nodes[0].memory_node     # zero_copy: every node is on this memory node
        cpus = sorted({c for n in self.topo.nodes for c in n.cpus}) or list(os.sched_getaffinity(0))
        self.behind = {"bytes": sum(hi - lo for _, lo, hi in runs), "done_bytes": 0, "runs": len(runs),
                       "seconds": None, "finished": False, "error": None}
        started = time.perf_counter()

        def work():
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
            try:
                for fm, lo, hi in runs:
                    with self.write_lock:
                        if self._behind_stop.is_set():
                            return
                        self.behind["done_bytes"] += fm.place_behind(lo, hi, node)
                with self.write_lock:
                    for it in list(self.items.values()):   # (a replica may be added meanwhile)
                        it.mapped = False
                    self.behind["finished"] = True
            except Exception as e:   # the rest stays mapped: the same bytes, read from the page cache
                self.behind["error"] = f"{type(e).__name__}: {e}"
                log.warning("placing the mapped weights in node memory stopped: %s; the rest stays mapped", e)
            finally:
                self.behind["seconds"] = time.perf_counter() - started

        self._behind_thread = threading.Thread(target=work, name="moe-numa-place-behind", daemon=True)
        self._behind_thread.start()

    def wait_placed(self, timeout: float | None = None) -> bool:
        """Wait for the background placement (if any); True when nothing is left mapped that
        it would place (done, or none started)."""
        t = self._behind_thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                return False
        return self.behind is None or self.behind["finished"]

    def _stop_behind(self) -> None:
        self._behind_stop.set()
        if self._behind_thread is not None:
            self._behind_thread.join()

    def close(self) -> None:
        """Unmap the node arenas and file mappings (numpy views still alive keep their pages
        until they go); a background placement stops first, after the run in hand."""
        self._stop_behind()
        self.arrays.clear()
        for a in self.arenas:
            a.close()
        self.arenas = []
        for fm in self.file_maps.values():
            fm.close()
        self.file_maps = {}

    def add_copy(self, node: int, key: str, src: np.ndarray, cls: str) -> None:
        """Place a copy of `src` on `node` at run time (a freed slot of that size, or the reserve)."""
        slots = self.free_slots.get((node, src.nbytes))
        dst = slots.pop() if slots else self.arenas[node].alloc(src.nbytes)
        dst = dst.view(src.dtype).reshape(src.shape)
        np.copyto(dst, src)
        self.arrays[(node, key)] = dst
        self.items[(node, key)] = _Item(node, key, cls, src.nbytes, None, src.shape, src.dtype, True)

    def drop(self, node: int, key: str) -> None:
        """Forget a run-time copy; its memory becomes a free slot of its size on that node."""
        arr = self.arrays.pop((node, key))
        del self.items[(node, key)]
        self.free_slots.setdefault((node, arr.nbytes), []).append(arr.reshape(-1).view(np.uint8))

    def resolve(self, obj):
        if isinstance(obj, Ref):
            return self.arrays[(obj.node, obj.key)]
        if isinstance(obj, _native.Descriptor):
            return obj.map(self.resolve)
        if isinstance(obj, dict):
            return {k: self.resolve(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.resolve(v) for v in obj)
        return obj

    def report(self) -> dict:
        nodes = []
        for k in range(self.topo.n_nodes):
            by_class: dict[str, int] = {}
            replicated = 0
            for it in self.items.values():
                if it.node == k:
                    by_class[it.cls] = by_class.get(it.cls, 0) + it.nbytes
                    replicated += it.nbytes if it.replicated else 0
            mapped = sum(it.nbytes for it in self.items.values() if it.node == k and it.mapped)
            nodes.append({"node": k, "bytes_by_class": by_class, "replicated_bytes": replicated,
                          "file_mapped_bytes": mapped,   # until a background placement moves them
                          "bound_to": self.topo.nodes[k].memory_node,
                          "bound": bool(self.arenas and self.arenas[k].bound)})
        return {"nodes": nodes}


_files: dict[str, int] = {}
_files_lock = threading.Lock()


def _pread_into(path: str, offset: int, dst: np.ndarray) -> None:
    with _files_lock:
        fd = _files.get(path)
        if fd is None:
            fd = _files[path] = os.open(path, os.O_RDONLY)
    buf = memoryview(dst.reshape(-1))
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise MoeNumaError(f"{path}: short read at byte {offset + done} (file truncated while loading?)")
        done += n


def _close_files() -> None:
    with _files_lock:
        for fd in _files.values():
            os.close(fd)
        _files.clear()


BEHIND_MIN_BYTES = 512 << 20   # below this the copy takes well under a second: just copy


def _zero_copy(want: bool | str | None, topo: Topology, weight_bytes: int = 0) -> str:
    """How shards that are plain file ranges are placed: "copy" (into the node arenas before
    load() returns), "map" (views of the GGUF's mapping, never copied: llama.cpp's mmap) or
    "behind" (mapped at once, then copied into the arenas' kind of memory by a background
    thread, at the same addresses).

    Decode from the mapping alone ran 10-35% slower here than from 2 MiB pages: the page
    cache maps a file mostly with 4 KiB pages (docs/benchmarks.md, "Load"). "behind" gives
    both the mapping's start and the copy's decode. It is the default on one real node for
    files of BEHIND_MIN_BYTES or more; smaller ones are copied (False). True: "map". Mapping
    is refused across real nodes: page-cache pages are shared and reclaimable, so nothing
    would keep them on the node a shard is placed on."""
    if want is None:
        return "behind" if topo.real_nodes <= 1 and weight_bytes >= BEHIND_MIN_BYTES else "copy"
    if want is False:
        return "copy"
    mode = "map" if want is True else want
    if mode not in ("map", "behind"):
        raise MoeNumaError(f"zero_copy must be True, False, None or 'behind', got {want!r}")
    if topo.real_nodes > 1:
        raise MoeNumaError(f"zero_copy={want!r} needs one NUMA node; this machine has {topo.real_nodes} "
                           f"(across nodes the weights are copied into each node's bound memory)")
    return mode


def _f32(t: Tensor | None):
    return None if t is None else (lambda: t.dequantize())


def _checked(fill, check):
    """`fill`, then the blocks just copied are checked (check_tensors)."""
    def fill_and_check(dst):
        fill(dst)
        check(dst)
    return fill_and_check


def _block_check(view: np.ndarray, source: Tensor):
    """The check of a shard's placed bytes (a copy of `view`): the first block with a
    non-finite scale is named by its place in the source tensor."""
    tr = quants.traits(source.qtype)
    row_bytes = source.row_bytes

    def check(dst):
        d2 = dst.reshape(-1, dst.shape[-1])
        bad = kernels.first_bad_block(d2, source.qtype, d2.shape[1] // tr.type_size * tr.block)
        if bad >= 0:
            per_shard_row = d2.shape[1] // tr.type_size
            off = _native.data_address(view) - _native.data_address(source.raw)
            row = off // row_bytes + bad // per_shard_row
            blk = (off % row_bytes) // tr.type_size + bad % per_shard_row
            raise bad_block_error(source, row * (row_bytes // tr.type_size) + blk)
    return check


def _mat(ref: Ref, t: Tensor, cols: int):
    return _native.Mat(type=int(t.qtype), raw=ref, cols=cols)


_GUD = ("gate", "up", "down")
_ATTN_FIELD = {"wk_b": "k_b", "wv_b": "v_b"}   # weight name -> AttnShard field, where they differ


def _cols(t: Tensor, c0: int, c1: int) -> np.ndarray:
    """Columns [c0, c1) of every row of a 2-D GGML tensor, as a strided byte view."""
    tr = quants.traits(t.qtype)
    return t.raw[:, c0 // tr.block * tr.type_size: c1 // tr.block * tr.type_size]


class EngineBackend:
    """The NUMA engine behind the common backend interface (reset, n_ctx, n_past,
    forward). Created by `moe_numa.load(path, backend="engine", ...)`."""

    name = "engine"

    def __init__(self, model, expert_map=None, numa_nodes: int | None = None,
                 threads_per_node: int | None = None, use_smt: bool = False, hugepages: bool = True,
                 ubatch: int = 512, progress: bool | Callable[[int, int], None] = False,
                 rebalance_every: int | None = 1024, replica_budget: float | int | str | None = None,
                 check_tensors: bool = False, n_slots: int = 1,
                 weights_cache: str | os.PathLike | None = None, zero_copy: bool | str | None = None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16"):
        from .. import _native
        kernels.prefetch_distance()   # a bad MOE_NUMA_PREFETCH is refused before anything is placed
        self.cfg = cfg = model.config
        self.weights = w = model.weights
        self.n_ctx = model.n_ctx
        self.n_past = 0
        if int(n_slots) < 1:
            raise MoeNumaError(f"n_slots must be >= 1, got {n_slots}")
        self.n_slots = int(n_slots)   # independent KV-cache sequences (forward() uses slot 0)
        # KV-cache types (llama.cpp's -ctk / -ctv), f16 by default as there; MLA's latent cache is one
        # cache (llama.cpp's V is a view of its K), so it takes cache_type_k for both.
        self.cache_type_k = cache_type(cache_type_k or "f16")
        self.cache_type_v = cache_type(cache_type_v or "f16")
        self.ubatch = int(ubatch)
        self.topology = topology(numa_nodes)
        n_nodes = self.topology.n_nodes
        if expert_map is None:
            expert_map = DEFAULT_STRATEGY
        if isinstance(expert_map, str) and expert_map in STRATEGIES and not os.path.exists(expert_map):
            emap = make_map(cfg.n_expert, n_nodes, expert_map, ffn_blocks=expert_blocks(w))
        else:
            emap = load_map(expert_map, cfg.n_expert)
        # Validates the map against the model before anything is copied.
        self.plan: PlacementPlan = make_plan(cfg, w, self.topology, emap)
        self.expert_bytes = sum(t.nbytes for t in _used_tensors(w) if "_exps" in t.name)
        self.replica_budget = self._replica_budget(replica_budget)
        t0 = time.perf_counter()
        self.pools = []
        self.core = None
        self._work = []
        self._closed = False
        try:
            for k, node in enumerate(self.topology.nodes):
                cpus = node.threads(threads_per_node, use_smt)
                with unpinned():     # a pool checks its CPUs against this thread's mask
                    self.pools.append(ThreadPool(cpus, caller_is_worker0=(k == 0)))
            self.placement_mode = _zero_copy(zero_copy, self.topology, sum(t.nbytes for t in _used_tensors(w)))
            self.store = NodeStore(self.topology, hugepages, model.gguf, check_tensors,
                                   self.placement_mode != "copy", self.placement_mode == "behind")
            self.store.reserve = self.replica_budget
            self.expert_tokens = [np.zeros(cfg.n_expert, dtype=np.int64) for _ in range(cfg.n_layer)]
            # Every slot's params keep their Refs (resolved again after experts move).
            self._params = params = self._plan_shards()
            # FFN params keep their Refs: the rebalancer re-resolves them after moving experts.
            self._ffn_params = {(node, layer): p for (kind, node, layer), p in params.items() if kind == "ffn"}
            report = _progress_printer(progress)
            cache = None
            if weights_cache is not None:
                from ..numa.weights_cache import WeightsCache
                cache = WeightsCache(weights_cache, model.gguf.paths, check_tensors)
            self.store.materialize(report, cache)
            if cache is not None and self.placement_mode != "copy":
                self.placement_mode = "weights_cache"   # a cache image wins over mapping the file
            if progress is True:   # the CLI's progress: say how fast placement went
                _print_load(self.store.load_stats)
            if check_tensors:   # what was not copied (norms, embeddings) is read from the file: check it there
                for t in model.gguf:
                    if t.name not in self.store.checked:
                        check_tensor_blocks(t)
            self.core = _native.NativeEngine([p._pool for p in self.pools], cfg.n_layer, cfg.hidden, self.ubatch)
            for (kind, node, layer), p in params.items():
                self.core.set_shard(node, layer, self.store.resolve(p))
            self._work = [NodeArena(self.core.scratch_bytes(k) + self.ubatch * cfg.hidden * 4 + 8192,
                                    n.memory_node, label=f"work{k}") for k, n in enumerate(self.topology.nodes)]
            partials = [a.alloc(self.ubatch * cfg.hidden * 4).view(np.float32) for a in self._work]
            scratches = [a.alloc(self.core.scratch_bytes(k)) for k, a in enumerate(self._work)]
            self.core.finalize(partials, scratches)
        except BaseException:   # Ctrl-C too: no pool thread may outlive a failed load
            self.close()
            raise
        self.load_seconds = time.perf_counter() - t0
        self.rebalance_every = rebalance_every
        self._since_rebalance = 0
        self.rebalance_log: list[dict] = []
        self.last_forward: dict = {}
        self._blas = _blas_controller()
        # The calling thread is node 0's thread 0: keep it on that node's first core
        # (restored on close, from whichever thread closes), so the scheduler never
        # stacks it on a pool thread's core. Only this thread is pinned, not the process.
        self._caller_tid = pin_caller(self.pools[0].cpus[0])
        self.store.place_behind_start()

    def wait_placed(self, timeout: float | None = None) -> bool:
        """Wait until the background placement (zero_copy "behind") is done; True when no
        weights are left mapped that it would place."""
        self._check_open()
        return self.store.wait_placed(timeout)

    # ---------------------------------------------------------------- placement
    def _expert_copy_bytes(self, layer: int) -> int:
        f = self.weights.layers[layer].ffn
        return sum(getattr(f, f"{n}_exps").raw[0].nbytes for n in ("gate", "up", "down"))

    def _replica_bytes(self) -> int:
        return sum(self._expert_copy_bytes(layer) * (len(holders) - 1)
                   for layer, lp in enumerate(self.plan.layers) for holders in lp.replicas.values())

    def _replica_budget(self, budget) -> int:
        """Bytes replicas may take: a fraction of the routed-expert bytes (0.05, '5%'), a byte
        count ('2GiB', 123456), or None: what the map places (replicas may move, not grow)."""
        placed = self._replica_bytes()
        if budget is None:
            return placed
        nbytes = parse_budget(budget, self.expert_bytes)
        if placed > nbytes:
            raise ExpertMapError(f"{self.plan.expert_map.source}: replicas: the map's replicas take {placed} bytes, "
                                 f"over the replica budget of {nbytes} bytes ({budget!r})")
        return nbytes

    def _plan_shards(self) -> dict:
        """(kind, node, layer) -> the typed shard descriptor of every slot (arrays still Refs)."""
        cfg, w, plan = self.cfg, self.weights, self.plan
        cos, sin = (np.ascontiguousarray(v) for v in rope_cos_sin(cfg.attention.rope, np.arange(self.n_ctx)))
        params: dict = {}
        for i, (lw, lp) in enumerate(zip(w.layers, plan.layers)):
            for node in range(plan.n_nodes):
                placed = self._place(node, f"L{i}.", split_rules(lw), lp)
                params[("attn", node, i)] = self._attention_shard(i, node, lw.attn, lp, placed, cos, sin)
                params[("ffn", node, i)] = self._ffn_shard(i, node, lw.ffn, lp, placed)
        for node, (v0, v1) in enumerate(plan.vocab):
            placed = self._place(node, "", split_rules(w), plan.head)
            params[("head", node, -1)] = _native.HeadShard(hidden=cfg.hidden, vocab=cfg.n_vocab, rms_eps=cfg.rms_eps,
                                                           norm=placed["output_norm"], out=placed["output"], v0=v0)
        return params

    def _place(self, node: int, key: str, rules, lp: LayerPlan) -> dict:
        """Node's part of every tensor of `rules` (but routed experts), by its split rule, added to
        the store: matrices as Mat descriptors of GGML rows, vectors (norms, biases) as floats,
        per-head 3-D tensors as one Mat per head; None where the node has none of it."""
        S, out = self.store, {}
        for name, t, r in rules:
            if r.dim == EXPERTS:
                continue
            whole = r.dim == REPLICATED
            a, b, unit = (0, 1, t.shape[0]) if whole else lp.part(r, t, node)
            k, cls, lo, hi = key + name, tensor_class(t.name), a * unit, b * unit
            if b <= a:
                out[name] = None
            elif len(t.shape) == 1:
                out[name] = S.floats(node, k, lambda t=t, lo=lo, hi=hi: t.dequantize()[lo:hi], (hi - lo,), cls,
                                     replicated=whole)
            elif len(t.shape) == 3:   # one matrix per index of the split axis (MLA's k_b / v_b per head)
                out[name] = [_mat(S.raw(node, f"{k}{h}", t.raw[h], cls, source=t), t, t.shape[2])
                             for h in range(a, b)]
            elif r.axis == 1:
                out[name] = _mat(S.raw(node, k, _cols(t, lo, hi), cls, source=t), t, hi - lo)
            else:
                out[name] = _mat(S.raw(node, k, t.raw[lo:hi], cls, replicated=whole, source=t), t, t.shape[1])
        return out

    def _attention_shard(self, i, node, at, lp, placed, cos, sin):
        """The attention descriptor of one node: its heads' projections and cache, by the
        weights' engine kind; kind "none" (norm only) on a node without heads. Arrays the
        kind has no use for are None (NULL)."""
        cfg, S, a = self.cfg, self.store, self.cfg.attention
        h0, h1 = lp.heads[node]
        nh, key = h1 - h0, f"L{i}."
        f = dict.fromkeys(_native.AttnShard.__slots__)
        f.update(kind=_native.ATTN_KINDS["none"], hidden=cfg.hidden, rms_eps=cfg.rms_eps, norm_eps=a.norm_eps,
                 kq_scale=a.kq_scale, attn_norm=placed["attn_norm"], n_ctx=self.n_ctx, n_slots=self.n_slots,
                 cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
                 **dict.fromkeys(("n_head", "n_kv", "qk_dim", "v_dim", "rope_off", "rope_dims", "rope_neox",
                                  "q_lora", "kv_lora", "nope"), 0))
        if nh == 0:
            return _native.AttnShard(**f)
        # the weights' tensors are the descriptor's fields (MLA's per-head wk_b / wv_b: k_b / v_b)
        f.update({_ATTN_FIELD.get(n[5:], n[5:]): v for n, v in placed.items() if n.startswith("attn.")},
                 kind=_native.ATTN_KINDS[at.kind], n_head=nh, rope_cos=cos, rope_sin=sin, rope_neox=int(a.rope.neox))
        tiles = -(-self.n_ctx // 32)   # keys in transposed tiles of 32 positions
        if at.kind == "gqa":
            hd, group = a.head_dim, a.n_head // a.n_head_kv
            k0, k1 = lp.ranges[KV_HEADS][node]
            nkv = k1 - k0
            f.update(n_kv=nkv, qk_dim=hd, v_dim=hd, rope_dims=a.rope.n_dims,
                     q2kv=np.array([(h0 + j) // group - k0 for j in range(nh)], dtype=np.int32),
                     **self._kv_caches(node, key, nkv, hd, hd))
            return _native.AttnShard(**f)
        qh, vd, R, rd = a.q_head_dim, a.v_head_dim, a.kv_lora_rank, a.qk_rope_dim
        f.update(q_lora=a.q_lora_rank, kv_lora=R, nope=a.qk_nope_dim, qk_dim=qh, v_dim=vd, rope_dims=rd,
                 rope_off=a.qk_nope_dim, n_kv=nh)
        if at.kind == "mla":      # absorbed attention over the latent cache
            # one [latent | k_pe] cache of the K type (llama.cpp's V is a view of its K)
            f.update(cache_lat=S.zeros(node, key + "cache_lat",
                                       (self.n_slots, self.n_ctx, self._kv_bytes("row", self.cache_type_k, R)),
                                       "kv_cache", dtype=np.uint8),
                     cache_ktiles=S.zeros(node, key + "cache_ktiles",
                                          (self.n_slots, tiles, self._kv_bytes("tile", self.cache_type_k, R + rd)),
                                          "kv_cache", dtype=np.uint8))
        else:                     # attn_kv_b: decompress this node's heads, cache full K/V
            f.update(**self._kv_caches(node, key, nh, qh, vd))
        return _native.AttnShard(**f)

    def _kv_bytes(self, what: str, t: str, dim: int) -> int:
        """Bytes of one key tile (32 positions) or value row of `dim` values in a cache of type t."""
        n = (_native.kv_tile_bytes if what == "tile" else _native.kv_row_bytes)(t, dim)
        if not n:
            raise ArgumentError(f"KV-cache type {t} needs rows of a multiple of 32 values; this model's are {dim}")
        return n

    def _kv_caches(self, node: int, key: str, n_kv: int, k_dim: int, v_dim: int) -> dict:
        """Per-head K/V caches: keys in transposed tiles of 32 positions, values in rows."""
        tiles = -(-self.n_ctx // 32)
        kt, vr = self._kv_bytes("tile", self.cache_type_k, k_dim), self._kv_bytes("row", self.cache_type_v, v_dim)
        return {"cache_k": self.store.zeros(node, key + "cache_k", (self.n_slots, n_kv, tiles, kt), "kv_cache",
                                            dtype=np.uint8),
                "cache_v": self.store.zeros(node, key + "cache_v", (self.n_slots, n_kv, self.n_ctx, vr), "kv_cache",
                                            dtype=np.uint8)}


    def _ffn_shard(self, i, node, ffn, lp, placed):
        """The FFN descriptor of one node: the router and its routed experts (MoE), and its
        slice of the dense FFN or shared expert."""
        cfg = self.cfg
        f = dict.fromkeys(_native.FFNShard.__slots__)
        f.update(kind=_native.FFN_KINDS[ffn.kind], hidden=cfg.hidden, rms_eps=cfg.rms_eps, ffn_norm=placed["ffn_norm"],
                 **dict.fromkeys(("n_expert", "n_used", "gating", "norm_w", "n_groups", "n_groups_used",
                                  "group_rule", "gate_type", "up_type", "down_type", "inter", "node_id",
                                  "n_nodes", "sh_ff"), 0), w_scale=0.0)
        f0, f1 = lp.ranges[FFN][node] if FFN in lp.ranges else (0, 0)
        if f1 > f0:   # the dense FFN's or the shared expert's slice
            dense = "ffn." if ffn.kind == "dense" else "ffn.shared."
            f.update(sh_ff=f1 - f0, **{"sh_" + n: placed[dense + n] for n in _GUD})
        if ffn.kind == "moe":
            r = cfg.router
            f.update(n_expert=r.n_expert, n_used=r.n_used, norm_w=int(r.norm_weights),
                     gating=_native.GATINGS[r.gating], w_scale=r.weights_scale,
                     n_groups=r.n_groups if r.n_groups > 1 else 0, n_groups_used=r.n_groups_used,
                     group_rule=_native.GROUP_RULES[r.group_rule], router=placed["ffn.router"],
                     probs_bias=placed.get("ffn.probs_bias"), sh_gate_vec=placed.get("ffn.shared_gate"),
                     gate_type=int(ffn.gate_exps.qtype), up_type=int(ffn.up_exps.qtype),
                     down_type=int(ffn.down_exps.qtype), inter=cfg.expert_ff,
                     experts={e: self._expert_shard(i, node, e, ffn, lp) for e in lp.experts[node]},
                     expert_tokens=self.expert_tokens[i], node_id=node, n_nodes=self.plan.n_nodes,
                     **self._replica_tables(lp))
        return _native.FFNShard(**f)

    def _expert_shard(self, i, node, e, ffn, lp):
        """Expert e on node: whole, a replica copy, or a split slice (gate/up rows and down
        columns [f0, f1) of its FFN dimension)."""
        S, key = self.store, f"L{i}.e{e}."
        tensors = (ffn.gate_exps, ffn.up_exps, ffn.down_exps)
        if e in lp.slices:
            f0, f1 = lp.slices[e][node]
            d = tensors[2]
            tr = quants.traits(d.qtype)
            views = (tensors[0].raw[e][f0:f1], tensors[1].raw[e][f0:f1],
                     d.raw[e][:, f0 // tr.block * tr.type_size: f1 // tr.block * tr.type_size])
            refs = [S.raw(node, key + n, v, "routed_experts", source=t) for n, v, t in zip(_GUD, views, tensors)]
            return _native.Expert(gate=refs[0], up=refs[1], down=refs[2], inter=f1 - f0)
        copy = e in lp.replicas and lp.replicas[e][0] != node
        refs = [S.raw(node, key + n, t.raw[e], "expert_replicas" if copy else "routed_experts", replicated=copy,
                      source=t) for n, t in zip(_GUD, tensors)]
        return _native.Expert(gate=refs[0], up=refs[1], down=refs[2], inter=self.cfg.expert_ff)

    def _expert_refs(self, node: int, key: str):
        """A whole expert's descriptor over the shards stored under `key` on node."""
        return _native.Expert(**{n: Ref(node, key + n) for n in _GUD}, inter=self.cfg.expert_ff)

    def _replica_tables(self, lp) -> dict:
        """What every node needs to make the same replica choice: holders and shares."""
        if not lp.replicas:
            return {"repl_nodes": None, "node_share": None}
        repl = np.zeros(self.cfg.n_expert, dtype=np.uint64)
        for e, holders in lp.replicas.items():
            for node in holders:
                repl[e] |= np.uint64(1 << node)
        return {"repl_nodes": repl, "node_share": lp.node_share(self.plan.n_nodes, self.cfg.n_expert,
                                                                self.cfg.expert_ff)}

    # ---------------------------------------------------------------- running
    def reset(self) -> None:
        self.n_past = 0

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.weights.token_embd.dequantize_rows(ids), dtype=np.float32)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the engine backend is closed (Model.close() was called)")

    def forward(self, ids: np.ndarray, all_logits: bool = True) -> np.ndarray:
        self._check_open()
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        if self.n_past + n > self.n_ctx:
            raise ContextOverflowError(f"{self.n_past} cached + {n} new tokens exceed the context of "
                                       f"{self.n_ctx} tokens")
        out = np.empty((n if all_logits else 1, self.cfg.n_vocab), dtype=np.float32)
        st0 = self.core.stats()
        with _blas_limited(self._blas), self._as_node0_worker():
            self._forward(ids, n, out, all_logits)
        self.last_forward = {"tokens": n, **_balance(self.core.stats(), st0)}
        if self.rebalance_every and self._since_rebalance >= self.rebalance_every and self.plan.n_nodes > 1:
            self.rebalance()
        return out

    @contextlib.contextmanager
    def _as_node0_worker(self):
        """The calling thread runs node 0's slice 0. The loading thread is pinned to
        that core for the model's life; any other caller (the server's engine thread)
        is pinned for the call, then given its affinity back. Left to the scheduler,
        it may share a pool thread's core, and every sync then waits for a time slice
        (~0.2 ms here, against ~0.3 us)."""
        if threading.get_native_id() == self._caller_tid:
            yield
            return
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.pools[0].cpus[0]})
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)

    def _forward(self, ids, n, out, all_logits) -> None:
        for start in range(0, n, self.ubatch):   # one native call per micro-batch
            chunk = ids[start:start + self.ubatch]
            x = self.embed(chunk)
            if all_logits:
                self.core.forward(x, self.n_past, logits=out[start:start + len(chunk)])
            elif start + self.ubatch >= n:
                self.core.forward(x, self.n_past, logits=out, logit_from=len(chunk) - 1)
            else:
                self.core.forward(x, self.n_past)
            self.n_past += len(chunk)
            self._since_rebalance += len(chunk)

    def forward_batch(self, ids, pos, slot, logit_rows=None) -> np.ndarray:
        """One step for several sequences at once (continuous batching): token t
        is at position pos[t] of KV-cache slot slot[t] and sees positions 0..pos[t]
        of its own slot (earlier tokens of this batch included), so a slot's
        prompt chunk and other slots' decode tokens share the step. Projections,
        the router and each expert's weights run once over all tokens; only
        attention is per slot. Per token the result equals running its sequence
        alone. Returns logits for the tokens in `logit_rows` (default: all),
        [len(logit_rows), n_vocab]. The caller tracks each slot's length;
        `n_past` (slot 0 of forward()) is left alone."""
        self._check_open()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        slot = np.asarray(slot, dtype=np.int32).reshape(-1)
        n = len(ids)
        if not (len(pos) == len(slot) == n) or n == 0:
            raise MoeNumaError(f"forward_batch needs ids, pos and slot of one length >= 1, got "
                               f"{len(ids)}, {len(pos)}, {len(slot)}")
        if pos.min() < 0 or pos.max() >= self.n_ctx:
            raise ContextOverflowError(f"positions {pos.min()}..{pos.max()} outside the context of "
                                       f"{self.n_ctx} tokens")
        if slot.min() < 0 or slot.max() >= self.n_slots:
            raise MoeNumaError(f"slots {slot.min()}..{slot.max()} outside 0..{self.n_slots - 1}")
        if n > 1 and np.unique(slot.astype(np.int64) * self.n_ctx + pos).size != n:
            raise MoeNumaError("a (slot, position) pair appears twice in one batch")
        rows = np.arange(n) if logit_rows is None else np.asarray(logit_rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.cfg.n_vocab), dtype=np.float32)
        st0 = self.core.stats()
        with _blas_limited(self._blas), self._as_node0_worker():
            self._forward_batch(ids, pos, slot, rows, out, n)
        self.last_forward = {"tokens": n, **_balance(self.core.stats(), st0)}
        if self.rebalance_every and self._since_rebalance >= self.rebalance_every and self.plan.n_nodes > 1:
            self.rebalance()
        return out

    def _forward_batch(self, ids, pos, slot, rows, out, n) -> None:
        for start in range(0, n, self.ubatch):
            end = min(n, start + self.ubatch)
            x = self.embed(ids[start:end])
            p, s = pos[start:end], slot[start:end]
            self.core.forward(x, pos=p, slot=s)
            self._since_rebalance += end - start
            want = np.nonzero((rows >= start) & (rows < end))[0]
            if len(want):
                sel = np.ascontiguousarray(x[rows[want] - start])
                buf = np.empty((len(want), self.cfg.n_vocab), dtype=np.float32)
                self.core.head(sel, buf)
                out[want] = buf

    # ---------------------------------------------------------------- hot experts
    def rebalance(self, min_tokens: int = 64, tolerance: float = 0.10, max_swaps: int = 64) -> dict:
        """Even out the tokens each node's experts received since the last call
        (layers that saw fewer than `min_tokens` tokens are left alone).

        A node's projected load counts a whole expert's tokens on its node, a split
        expert's by each node's share of its rows, and a replicated expert's spread
        over its holders. Per MoE layer:
        1. replicas of experts that turned cold (at most the layer's mean tokens per
           expert) are dropped, freeing replica budget;
        2. while the busiest node exceeds the mean by more than `tolerance` and the
           replica budget allows, its hottest unsplit expert gets a copy on the least
           busy node that lacks one (a freed slot of that size, or the reserve);
        3. while still over, a hot whole expert of the busiest node swaps places with a
           colder whole expert of the least busy node (the swap that best closes their
           gap): experts of a layer have the same size, so a swap exchanges the contents
           of two shard slots, one copy each, in the bound memory of its new node.
        Split experts stay: they are balanced by construction. Counters are reset
        afterwards. Returns {layer: {"swaps": [(e_from, node_from, e_to, node_to)],
        "replicated": [(e, node)], "dropped": [(e, node)], "before": max/mean,
        "after": max/mean}} for the layers that changed."""
        self._check_open()
        report = {}
        n = self.plan.n_nodes
        for layer, counts in enumerate(self.expert_tokens):
            lp = self.plan.layers[layer]
            if not any(lp.experts) or counts.sum() < min_tokens * self.cfg.router.n_used or n < 2:
                continue
            load = self._projected_load(lp, counts)
            before = load.max() / load.mean()
            dropped, replicated = self._rebalance_replicas(layer, counts, tolerance)
            load = self._projected_load(lp, counts)
            owner = {e: node for node in range(n) for e in lp.experts[node]
                     if e not in lp.slices and e not in lp.replicas}
            swaps = []
            while len(swaps) < max_swaps and load.max() > (1 + tolerance) * load.mean():
                hot, cold = int(load.argmax()), int(load.argmin())
                gap = load[hot] - load[cold]
                best = None
                for e1 in (e for e, o in owner.items() if o == hot):
                    for e2 in (e for e, o in owner.items() if o == cold):
                        d = counts[e1] - counts[e2]
                        if 0 < d < gap and (best is None or abs(gap - 2 * d) < best[0]):
                            best = (abs(gap - 2 * d), e1, e2, d)
                if best is None:
                    break
                _, e1, e2, d = best
                self._swap_experts(layer, e1, hot, e2, cold)
                owner[e1], owner[e2] = cold, hot
                load[hot] -= d
                load[cold] += d
                swaps.append((e1, hot, e2, cold))
            if swaps or dropped or replicated:
                report[layer] = {"swaps": swaps, "replicated": replicated, "dropped": dropped,
                                 "before": float(before), "after": float(load.max() / load.mean())}
                nodes = range(n) if (dropped or replicated) else {m for s in swaps for m in (s[1], s[3])}
                for node in nodes:
                    p = self._ffn_params[(node, layer)]
                    for name, value in self._replica_tables(lp).items():
                        setattr(p, name, value)
                    self.core.set_ffn(node, layer, self.store.resolve(p))
        if report:
            self._update_map(report)
            self.rebalance_log.append(report)
        for c in self.expert_tokens:
            c[:] = 0
        self._since_rebalance = 0
        return report

    def _projected_load(self, lp, counts) -> np.ndarray:
        share = lp.node_share(self.plan.n_nodes, self.cfg.n_expert, self.cfg.expert_ff)
        load = (share * counts[None, :]).sum(axis=1).astype(np.float64)
        for e, holders in lp.replicas.items():
            for node in holders:
                load[node] += counts[e] / len(holders)
        return load

    def _rebalance_replicas(self, layer: int, counts, tolerance: float):
        """Steps 1 and 2 of rebalance(): drop cold replicas, add hot ones within the budget."""
        lp, n = self.plan.layers[layer], self.plan.n_nodes
        size = self._expert_copy_bytes(layer)
        mean = counts.sum() / len(counts)
        dropped, replicated = [], []
        for e in sorted(lp.replicas):
            if counts[e] <= mean:
                for node in lp.replicas[e][1:]:
                    self._drop_replica(layer, e, node)
                    dropped.append((e, node))
        while True:
            load = self._projected_load(lp, counts)
            if load.max() <= (1 + tolerance) * load.mean() or self._replica_bytes() + size > self.replica_budget:
                break
            hot = int(load.argmax())
            cands = [e for e in lp.experts[hot] if e not in lp.slices and counts[e] > mean
                     and len(lp.replicas.get(e, (hot,))) < n]
            if not cands:
                break
            e = max(cands, key=lambda x: (counts[x], -x))
            holders = lp.replicas.get(e, (hot,))
            target = min((m for m in range(n) if m not in holders), key=lambda m: (load[m], m))
            k = len(holders)
            # the copy must lower the busiest node's load without making the target the new peak
            if load[target] + counts[e] / (k + 1) >= load[hot]:
                break
            self._add_replica(layer, e, target)
            replicated.append((e, target))
        return dropped, replicated

    def _add_replica(self, layer: int, e: int, node: int) -> None:
        lp, S, key = self.plan.layers[layer], self.store, f"L{layer}.e{e}."
        holders = lp.replicas.get(e) or (next(m for m in range(self.plan.n_nodes) if e in lp.experts[m]),)
        for name in ("gate", "up", "down"):
            S.add_copy(node, key + name, S.arrays[(holders[0], key + name)], "expert_replicas")
        self._ffn_params[(node, layer)].experts[e] = self._expert_refs(node, key)
        lp.replicas[e] = holders + (node,)
        lp.experts[node][:] = sorted(set(lp.experts[node]) | {e})

    def _drop_replica(self, layer: int, e: int, node: int) -> None:
        lp, key = self.plan.layers[layer], f"L{layer}.e{e}."
        for name in ("gate", "up", "down"):
            self.store.drop(node, key + name)
        del self._ffn_params[(node, layer)].experts[e]
        holders = tuple(m for m in lp.replicas[e] if m != node)
        if len(holders) > 1:
            lp.replicas[e] = holders
        else:
            del lp.replicas[e]
        lp.experts[node][:] = [x for x in lp.experts[node] if x != e]

    def _swap_experts(self, layer: int, e1: int, n1: int, e2: int, n2: int) -> None:
        """Expert e1 moves from node n1 to n2 and e2 from n2 to n1, by swapping slot contents."""
        S, key = self.store, f"L{layer}."
        for name in ("gate", "up", "down"):
            k1, k2 = f"{key}e{e1}.{name}", f"{key}e{e2}.{name}"
            a, b = S.arrays.pop((n1, k1)), S.arrays.pop((n2, k2))
            with S.write_lock:     # not into a run the background placement has copied but not moved
                tmp = a.copy()
                a[...] = b
                b[...] = tmp
            S.arrays[(n1, k2)], S.arrays[(n2, k1)] = a, b
            S.items[(n1, k2)], S.items[(n2, k1)] = S.items.pop((n1, k1)), S.items.pop((n2, k2))
            S.items[(n1, k2)].key, S.items[(n2, k1)].key = k2, k1
        p1, p2 = self._ffn_params[(n1, layer)].experts, self._ffn_params[(n2, layer)].experts
        p1[e2] = self._expert_refs(n1, f"{key}e{e2}.")
        p2[e1] = self._expert_refs(n2, f"{key}e{e1}.")
        del p1[e1], p2[e2]
        lp = self.plan.layers[layer]
        lp.experts[n1][:] = sorted(set(lp.experts[n1]) - {e1} | {e2})
        lp.experts[n2][:] = sorted(set(lp.experts[n2]) - {e2} | {e1})

    def _update_map(self, report: dict) -> None:
        """The expert map now in force: the old one with the rebalanced layers overridden,
        and the replicas as they are now."""
        from dataclasses import replace
        emap = self.plan.expert_map
        overrides = dict(emap.overrides)
        for layer in report:
            lp = self.plan.layers[layer]
            owner: list = list(emap.owners(layer))
            for node, experts in enumerate(lp.experts):
                for e in experts:
                    if e not in lp.slices and e not in lp.replicas:
                        owner[e] = node
            for e, holders in lp.replicas.items():
                owner[e] = holders[0]
            overrides[layer] = tuple(owner)
        replicas = {(layer, e): holders[1:] for layer, lp in enumerate(self.plan.layers)
                    for e, holders in lp.replicas.items()}
        self.plan.expert_map = replace(emap, overrides=overrides, replicas=replicas)

    # ---------------------------------------------------------------- reports
    def placement_report(self, check_pages: bool = False, sample: int = 8) -> dict:
        """Bytes per node by tensor class (and, on request, where sampled pages really are)."""
        rep = self.store.report()
        for n in rep["nodes"]:   # this node's heads' KV caches (all slots, n_ctx positions)
            n["kv_cache_bytes"] = n["bytes_by_class"].get("kv_cache", 0)
        gguf_bytes = sum(t.nbytes for t in _used_tensors(self.weights))
        placed = sum(it.nbytes for it in self.store.items.values() if it.cls != "kv_cache")
        replicated = sum(it.nbytes for it in self.store.items.values() if it.replicated)
        emap, modes = self.plan.expert_map, {}
        for layer, lp in enumerate(self.plan.layers):
            if any(lp.experts):
                for e in range(self.cfg.n_expert):
                    modes[emap.mode(layer, e)] = modes.get(emap.mode(layer, e), 0) + 1
        c = self.counters()
        rep.update(replica_bytes=sum(it.nbytes for it in self.store.items.values() if it.cls == "expert_replicas"),
                   replica_budget_bytes=self.replica_budget, expert_bytes=self.expert_bytes, expert_modes=modes,
                   balance={k: c[k] for k in ("imbalance", "ffn_imbalance", "node_busy_ns", "node_wait_ns")})
        rep.update(gguf_weight_bytes=gguf_bytes, placed_weight_bytes=placed, replicated_bytes=replicated,
                   kv_cache_bytes=sum(it.nbytes for it in self.store.items.values() if it.cls == "kv_cache"),
                   kv_cache_type={"k": self.cache_type_k, "v": self.cache_type_v},
                   process=resident_bytes(), topology=self.topology.describe(),
                   load=dict(self.store.load_stats, total_seconds=self.load_seconds, mode=self.placement_mode,
                             behind=None if self.store.behind is None else dict(self.store.behind)),
                   notes=list(self.plan.notes) + list(self.topology.notes))
        if check_pages:
            rep["pages"] = self.check_pages(sample)
        return rep

    def check_pages(self, sample: int = 8) -> list[dict]:
        """For every placed shard of a bound node: the share of sampled pages on that node."""
        from ..numa.memory import page_nodes
        out = []
        for (node, key), it in self.store.items.items():
            arena = self.store.arenas[node]
            if not arena.bound or it.nbytes < 4096:
                continue
            arr = self.store.arrays[(node, key)]
            status = page_nodes(_native.data_address(arr), arr.nbytes, sample)
            # -ENOENT (never touched) and -EFAULT (only read: the shared zero page): no page of
            # ours exists there yet, e.g. a cache's unused tail; mbind places it when first written.
            present = status[(status != -2) & (status != -14)]
            out.append({"node": node, "key": key, "class": it.cls, "pages": int(present.size),
                        "on_node": int((present == arena.node).sum()), "absent": int(status.size - present.size),
                        "status": sorted(set(status.tolist()))})
        return out

    def counters(self) -> dict:
        """Since the last reset: tokens routed per layer and expert, syncs, and the balance of
        the nodes: each node's busy time in blocks, its wait (idle while the slowest node of a
        block finished), and the imbalance, critical path / mean node busy time (1.0: no node
        ever waits). `last_forward` has the same for the latest forward() call alone."""
        st = self.core.stats()
        pools = [p.stats() for p in self.pools]
        return {"expert_tokens": [c.copy() for c in self.expert_tokens], "syncs": st["syncs"],
                "wait_ns": st["wait_ns"], "pools": pools, **_balance(st),
                "moe_assign": st["moe_assign"], "moe_taken": st["moe_taken"], "attn_taken": st["attn_taken"],
                "last_forward": dict(self.last_forward)}

    def reset_counters(self) -> None:
        self.core.reset_stats()
        for c in self.expert_tokens:
            c[:] = 0
        for p in self.pools:
            p.reset_stats()

    def close(self) -> None:
        """Stop the pools, free the node memory, give the loading thread its CPU
        affinity back. Idempotent; later calls raise ClosedError."""
        self._closed = True
        core, self.core = getattr(self, "core", None), None
        if core is not None:
            core.close()          # first: it points into the pools and arenas
        for p in getattr(self, "pools", []):
            p.close()
        self.pools = []
        for a in getattr(self, "_work", []):
            a.close()
        self._work = []
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
        tid = getattr(self, "_caller_tid", None)
        if tid is not None:
            self._caller_tid = None
            unpin_caller(tid)

    def __del__(self):
        # At interpreter exit module globals may already be gone; never raise from here.
        try:
            self.close()
        except Exception:
            pass


def parse_budget(budget, expert_bytes: int) -> int:
    """A replica budget in bytes: a fraction of `expert_bytes` (0.05, '5%'), or a size (123456, '2GiB')."""
    b = budget
    try:
        if isinstance(b, str):
            t = b.strip().lower()
            units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
            unit = next((u for u in units if t.endswith(u)), None)
            if t.endswith("%"):
                b = float(t[:-1]) / 100
            elif unit:
                b = int(float(t[:-len(unit)]) * units[unit])
            else:
                b = float(t) if "." in t else int(t)
        if isinstance(b, bool) or b < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ExpertMapError(f"replica_budget: {budget!r} is not a fraction of the expert bytes (0.05, '5%') "
                             f"or a size ('2GiB')") from None
    return int(b * expert_bytes) if isinstance(b, float) else int(b)


def _balance(st: dict, before: dict | None = None) -> dict:
    """Per-node busy/wait and imbalance from engine stats (minus `before`, if given)."""
    def d(key):
        v = st[key]
        if before is None:
            return v
        return [a - b for a, b in zip(v, before[key])] if isinstance(v, list) else v - before[key]
    busy, idle, ffn = d("busy_ns"), d("idle_ns"), d("ffn_busy_ns")
    mean, ffn_mean = sum(busy) / len(busy), sum(ffn) / len(ffn)
    return {"node_busy_ns": busy, "node_wait_ns": idle, "critical_ns": d("crit_ns"),
            "imbalance": d("crit_ns") / mean if mean else 1.0,
            "ffn_imbalance": d("ffn_crit_ns") / ffn_mean if ffn_mean else 1.0}


def _used_tensors(w) -> list[Tensor]:
    seen: dict[str, Tensor] = {}

    def visit(obj):
        if isinstance(obj, Tensor):
            seen.setdefault(obj.name, obj)
        elif hasattr(obj, "__dataclass_fields__"):
            for f in obj.__dataclass_fields__:
                visit(getattr(obj, f))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)
    visit(w)
    return list(seen.values())


def _blas_controller():
    """numpy's BLAS libraries, found once (threadpoolctl); None if there are none."""
    try:
        from threadpoolctl import ThreadpoolController
        ctl = ThreadpoolController().select(user_api="blas")
        return ctl if ctl.lib_controllers else None
    except Exception:  # pragma: no cover - threadpoolctl is a hard dependency, but never fail a load on it
        return None


def _blas_limited(ctl):
    """BLAS threads must not compete with the pools for their cores: one thread
    while a forward pass runs (~20 us), the caller's setting at all other times.
    (A process-wide limit for the model's lifetime could not be restored from
    another thread: OpenBLAS keeps the setting per thread.)"""
    import contextlib
    return ctl.limit(limits=1) if ctl is not None else contextlib.nullcontext()


def _print_load(st: dict) -> None:
    import sys
    wc = st.get("weights_cache")
    how = "" if wc is None else (" (mapped from the weights cache)" if not wc["built_nodes"] else
                                 f" (weights cache written for node(s) {','.join(map(str, wc['built_nodes']))})")
    if st.get("mapped_bytes"):
        how += f" ({st['mapped_bytes'] / 2**30:.2f} GiB mapped from the file, no copy)"
    rate = f", {st['gb_per_s']:.2f} GB/s" if st.get("gb_per_s") else ""
    print(f"placed {st['bytes'] / 2**30:.2f} GiB of weights in {st['seconds']:.2f} s{rate}{how}", file=sys.stderr)


def _progress_printer(progress):
    if callable(progress) or not progress:
        return progress or None
    from ..progress import progress_bar
    return progress_bar("placing weights", unit="B")
