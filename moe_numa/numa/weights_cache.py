"""The placed-weights cache (`--weights-cache DIR`, `weights_cache=` in load()):
one file per node holding that node's weights exactly as placed (the weights
prefix of its arena), so a restart maps the files instead of copying the GGUF.

A file is a 2 MiB header (magic, then JSON: the key and a checksum of sampled
image bytes) followed by the image: at a hugepage-aligned offset, so that on a
huge tmpfs the image maps into the (hugepage-aligned) arena by PMDs. The key is everything the image depends on:
the GGUF's identity (real path, size, mtime, a hash of its first MiB, for every
split part), the layout (a digest of every shard's key, offset, size, type and
shape: this covers the expert map, node count and shard split), the node, the
format, the native build and the shard-layout code. KV caches, scratch and the replica reserve live
after the prefix, outside the image. A file whose key differs is stale and is
rebuilt; one that fails the checks (size, magic, JSON, sampled checksum) is
rejected with a warning and rebuilt. Images are built into a temp name (pages
reserved with fallocate, so a full tmpfs fails cleanly instead of SIGBUS) and
renamed when complete, so a half-written image is never used.

Mapped MAP_PRIVATE: the tmpfs pages are the only copy (no anonymous copy), and
run-time writes (expert swaps when rebalancing) are copied on write, leaving
the file intact. Needs a filesystem with fallocate and write(): tmpfs
(/dev/shm) yes, hugetlbfs no."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import struct

import numpy as np

from .. import _native
from ..errors import MoeNumaError
from .memory import populate_read

log = logging.getLogger("moe_numa.numa")

MAGIC = b"MNWCACHE"
FORMAT = 2            # 2: the image at a 2 MiB offset (1: 64 KiB, never PMD-mapped)
HEADER = 2 << 20
SAMPLE = 64           # bytes per sample of the checksum
N_SAMPLES = 16384


class WeightsCacheError(MoeNumaError):
    """The weights cache directory cannot be used (missing, not writable, full)."""


def _identity(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        st = os.stat(p)
        with open(p, "rb") as f:
            head = hashlib.sha256(f.read(1 << 20)).hexdigest()
        out.append({"path": os.path.realpath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head})
    return out


def _huge_tmpfs(directory: str) -> bool:
    """Whether the image files under `directory` get transparent hugepages: a tmpfs mounted
    with huge=always or huge=within_size, or shmem_enabled "force". (shmem_enabled otherwise
    governs only the kernel's internal mount, and huge=advise needs the mapping's advice at
    fault time, which pages reserved by fallocate never see.)"""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "never"
    if mode in ("force", "deny"):
        return mode == "force"
    best, opts = "", ""
    real = os.path.realpath(directory)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) >= len(best):
                    best, opts = parts[1], parts[3]
    except OSError:
        return False
    return any(o in opts.split(",") for o in ("huge=always", "huge=within_size"))


def _code_id() -> list:
    """The native build (kernels, types) and the source of the code that lays shards out:
    a change to either may change the bytes an image should hold."""
    from ..engine import backend
    st = os.stat(_native.__file__)
    with open(backend.__file__, "rb") as f:
        src = hashlib.sha256(f.read()).hexdigest()[:16]
    return [os.path.basename(_native.__file__), st.st_size, st.st_mtime_ns, src]


def _samples(buf: np.ndarray) -> str:
    """A hash of N_SAMPLES evenly spread SAMPLE-byte pieces of the image (and its last bytes):
    cheap (it touches at most N_SAMPLES pages), and catches truncation and overwritten regions."""
    n = buf.size
    if n == 0:
        return hashlib.sha256(b"").hexdigest()
    starts = np.linspace(0, max(0, n - SAMPLE), min(N_SAMPLES, max(1, n // SAMPLE))).astype(np.int64)
    # sorted already: dropping repeats is np.unique's answer, without its first call importing numpy.ma (40 ms)
    starts = starts[np.concatenate(([True], starts[1:] != starts[:-1]))]
    idx = (starts[:, None] + np.arange(min(SAMPLE, n))[None, :]).reshape(-1)
    return hashlib.sha256(np.ascontiguousarray(buf[idx]).tobytes()).hexdigest()


class WeightsCache:
    """Attach NodeStore arenas to cached images (attach), build the missing ones
    while the store fills them (reserve), and publish them (commit)."""

    def __init__(self, directory: str | os.PathLike, gguf_paths: list[str], check_tensors: bool = False):
        self.dir = os.fspath(directory)
        if not os.path.exists(self.dir):   # made as a cache directory is, when its parent exists
            try:
                os.mkdir(self.dir)
            except OSError as e:
                raise WeightsCacheError(f"weights cache: cannot create {self.dir}: {e.strerror}") from None
        if not os.path.isdir(self.dir):
            raise WeightsCacheError(f"weights cache: {self.dir} is not a directory")
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise WeightsCacheError(f"weights cache: {self.dir} is not writable")
        self.identity = _identity(gguf_paths)
        self.check_tensors = check_tensors
        base = os.path.basename(gguf_paths[0])
        self.stem = f"{base}-{hashlib.sha256(self.identity[0]['path'].encode()).hexdigest()[:12]}"
        self.building: dict[int, tuple[int, str]] = {}   # node -> (fd, temp path)
        self.rejected: dict[int, str] = {}
        self.lock_fd: int | None = None
        self.huge = _huge_tmpfs(self.dir)
        if not self.huge:
            log.warning("weights cache %s: this filesystem gives 4 KiB pages (not a tmpfs mounted with "
                        "huge=within_size), so cached weights lose transparent hugepages and decode may be "
                        "slower: `mount -t tmpfs -o huge=within_size,size=SIZE tmpfs DIR`", self.dir)

    def path(self, node: int) -> str:
        return os.path.join(self.dir, f"{self.stem}.node{node}.mnw")

    def key(self, store, node: int) -> dict:
        arena = store.arenas[node]
        # every weight's name, place in the image, size, dtype, shape and class, in one repr
        # (a hash update and a numpy address dict per item were a tenth of a cached load)
        rows = []
        for (k, key), it in store.items.items():
            if k == node and it.fill is not None:
                addr = _native.data_address(store.arrays[(k, key)])
                rows.append((key, addr - arena.addr, it.nbytes, np.dtype(it.dtype).str, tuple(it.shape), it.cls))
        rows.sort(key=lambda row: row[0])
        layout = hashlib.sha256(repr(rows).encode())
        return {"format": FORMAT, "gguf": self.identity, "node": node, "n_nodes": store.topo.n_nodes,
                "memory_node": arena.node, "image_bytes": store.weight_bytes[node], "layout": layout.hexdigest(),
                "code": _code_id()}

    # ------------------------------------------------------------------ attach
    def attach(self, store) -> list[bool]:
        """Map every valid image over its arena's weights prefix; start a build for the rest.
        Returns, per node, whether its weights came from the cache.
        Holds a lock on the model's images until commit/abort: a second process loading the
        same model waits, then maps what the first one built instead of building it again."""
        self.lock_fd = os.open(os.path.join(self.dir, f"{self.stem}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        hit = []
        for node in range(store.topo.n_nodes):
            key = self.key(store, node)
            ok = self._open_valid(store, node, key)
            if not ok:
                self._start_build(store, node)
            hit.append(ok)
        return hit

    def _open_valid(self, store, node: int, key: dict) -> bool:
        path, length = self.path(node), store.weight_bytes[node]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            why = None
            head = os.pread(fd, HEADER, 0)
            size = os.fstat(fd).st_size
            meta = None
            if len(head) < 16 or head[:8] != MAGIC:
                why = "not a weights cache file (bad magic)"
            else:
                (n,) = struct.unpack("<Q", head[8:16])
                try:
                    meta = json.loads(head[16:16 + n]) if 16 + n <= HEADER else None
                except ValueError:
                    meta = None
                if not isinstance(meta, dict) or "key" not in meta:
                    why = "unreadable header"
                elif meta["key"] != key:
                    log.info("weights cache %s is stale (the model file or the layout changed): rebuilding", path)
                    return False
                elif size != HEADER + length:
                    why = f"size {size}, expected {HEADER + length} (truncated?)"
                elif self.check_tensors and not meta.get("checked"):
                    log.info("weights cache %s was built without --check-tensors: rebuilding", path)
                    return False
            if why is None:
                arena = store.arenas[node]
                arena.map_file(length, fd, HEADER, shared=False)
                if self.huge:   # 2 MiB entries: mapping it all in first is ms; 16k faulting samples are 10x that
                    populate_read(arena.addr, length)
                if _samples(arena.buffer[:length]) != meta.get("samples"):
                    why = "image checksum mismatch (corrupt)"   # the build maps its temp file over it
            if why is not None:
                self.rejected[node] = why
                log.warning("weights cache %s rejected: %s; rebuilding it", path, why)
                return False
            return True
        finally:
            os.close(fd)

    def _start_build(self, store, node: int) -> None:
        final = self.path(node)
        # Under the lock no other process builds this model: temp files left are from a
        # killed build and only hold memory. Never two images of one node in memory either.
        for name in os.listdir(self.dir):
            if name == os.path.basename(final) or name.startswith(os.path.basename(final) + ".tmp"):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass
        tmp = f"{final}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            length = store.weight_bytes[node]
            os.ftruncate(fd, HEADER + length)
            # Shared: the shard fills write the file's pages; mbind there sets the file's
            # policy, so the pages reserve() allocates are on the node.
            store.arenas[node].map_file(length, fd, HEADER, shared=True)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        self.building[node] = (fd, tmp)

    def reserve(self, node: int, offset: int, length: int) -> None:
        """Allocate the file pages of [offset, offset+length) of a node being built (called from
        that node's threads, before they populate and fill the range)."""
        b = self.building.get(node)
        if b is None or length <= 0:
            return
        try:
            os.posix_fallocate(b[0], HEADER + offset, length)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise WeightsCacheError(f"weights cache: {self.dir} is full ({length} more bytes for node "
                                        f"{node}); free space or drop --weights-cache") from None
            raise

    # ------------------------------------------------------------------ publish
    def commit(self, store) -> None:
        """Write the headers of the images just built, rename them into place, and map them
        private (the same pages: no copy) so later writes never reach the files."""
        for node, (fd, tmp) in list(self.building.items()):
            length = store.weight_bytes[node]
            arena = store.arenas[node]
            meta = {"key": self.key(store, node), "samples": _samples(arena.buffer[:length]),
                    "checked": bool(self.check_tensors)}
            blob = json.dumps(meta, sort_keys=True).encode()
            if 16 + len(blob) > HEADER:
                raise WeightsCacheError("weights cache: header too large")
            os.pwrite(fd, MAGIC + struct.pack("<Q", len(blob)) + blob, 0)
            os.rename(tmp, self.path(node))
            arena.map_file(length, fd, HEADER, shared=False)
            os.close(fd)
            del self.building[node]
        self._unlock()

    def _unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)   # releases the flock
            self.lock_fd = None

    def abort(self) -> None:
        """A failed load: drop the temp files (their mappings go with the arenas)."""
        for fd, tmp in self.building.values():
            os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self.building.clear()
        self._unlock()

    def summary(self, hit: list[bool]) -> dict:
        return {"dir": self.dir, "hugepages": self.huge, "hit_nodes": [k for k, h in enumerate(hit) if h],
                "built_nodes": [k for k, h in enumerate(hit) if not h], "rejected": dict(self.rejected)}
