"""Node-bound memory: anonymous mappings whose pages the kernel must place on a
given NUMA node (mbind with MPOL_BIND), optional transparent hugepages, and a
check of where pages really are (move_pages).

Weights are copied once from the memory-mapped GGUF into one arena per node,
so each byte lives in exactly one node's memory. Where no placement is needed
(one node, shards that are plain file ranges), FileMapping maps the GGUF
copy-on-write instead: the page cache's pages are the one copy, nothing is
copied or first-touched (as llama.cpp's mmap). The syscalls go through libc's
`syscall()` with ctypes: nothing to compile, no libnuma headers needed. Where
binding is impossible (no such node, a kernel or container that refuses
mbind), memory falls back to the default policy and the fallback is logged once.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import platform

import numpy as np

log = logging.getLogger("moe_numa.numa")

_SYSCALLS = {
    "x86_64": {"mbind": 237, "move_pages": 279, "mremap": 25},
    "aarch64": {"mbind": 235, "move_pages": 239, "mremap": 216},
}
MPOL_BIND = 2
MPOL_MF_STRICT = 1
MPOL_MF_MOVE = 2
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23   # Linux >= 5.14: fault a range in, writable, in one call
MADV_HUGEPAGE = 14
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
HUGE = 2 << 20             # population chunk: one transparent hugepage on x86-64 and aarch64
PAGE = mmap.PAGESIZE
ALIGN = 64          # shard alignment inside an arena: a cache line, enough for every SIMD path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def _syscall(name: str, *args) -> int:
    nr = _SYSCALLS.get(platform.machine(), {}).get(name)
    if nr is None:
        ctypes.set_errno(38)   # ENOSYS
        return -1
    return _libc.syscall(nr, *args)


def address_of(buf) -> int:
    """Address of a writable buffer (mmap, bytearray, numpy array)."""
    if isinstance(buf, np.ndarray):
        return buf.ctypes.data
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def mbind(addr: int, length: int, node: int) -> bool:
    """Bind [addr, addr+length) to `node` (strict, moving pages already there). True on success."""
    mask = (ctypes.c_ulong * 16)()
    mask[node // 64] = 1 << (node % 64)
    rc = _syscall("mbind", ctypes.c_void_p(addr), ctypes.c_ulong(length), ctypes.c_int(MPOL_BIND),
                  mask, ctypes.c_ulong(64 * 16 + 1), ctypes.c_uint(MPOL_MF_STRICT | MPOL_MF_MOVE))
    if rc != 0:
        err = ctypes.get_errno()
        _warn_once(f"mbind{err}", f"mbind to node {node} failed ({os.strerror(err)}); "
                                  f"memory uses the default policy")
        return False
    return True


def page_nodes(addr: int, length: int, sample: int = 0) -> np.ndarray:
    """Node of each page of [addr, addr+length) (negative: -errno, e.g. -2 not present).
    `sample` > 0 checks that many pages evenly spread instead of all."""
    first = addr - addr % PAGE
    n_pages = (addr + length - first + PAGE - 1) // PAGE
    idx = np.arange(n_pages) if not sample or sample >= n_pages else \
        np.unique(np.linspace(0, n_pages - 1, sample).astype(np.int64))
    pages = (ctypes.c_void_p * len(idx))(*[first + int(i) * PAGE for i in idx])
    status = (ctypes.c_int * len(idx))()
    rc = _syscall("move_pages", 0, ctypes.c_ulong(len(idx)), pages, None, status, 0)
    if rc < 0:
        raise OSError(ctypes.get_errno(), f"move_pages failed: {os.strerror(ctypes.get_errno())}")
    return np.frombuffer(status, dtype=np.int32).copy()


def _reserve(size: int) -> tuple[mmap.mmap, int, np.ndarray]:
    """An anonymous mapping of `size` bytes starting on a hugepage boundary: (the mmap, which
    owns the range and unmaps all of it on close, the aligned address, a uint8 view there).
    The slack is address space only, never touched."""
    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = address_of(m)
    addr = base + (-base) % HUGE
    return m, addr, np.frombuffer(m, dtype=np.uint8, count=size, offset=addr - base)


def _close_mapping(self) -> None:
    """close() of a class holding `buffer` (a view) over `_map` (an mmap)."""
    self.buffer = None
    try:
        self._map.close()
    except BufferError:
        pass   # views still alive; the mapping goes when they do


class NodeArena:
    """One anonymous mapping for one node's weights, filled by bump allocation.

    `node` is the real node to bind to, or None for the default policy."""

    def __init__(self, size: int, node: int | None, hugepages: bool = False, label: str = ""):
        self.size = max(PAGE, (size + PAGE - 1) // PAGE * PAGE)
        self.node = node
        self.label = label
        self.hugepages = hugepages
        # Start on a hugepage boundary (the slack is address space only, never touched): the
        # anonymous pages are then whole THPs, and a weights-cache image mapped over the start
        # (at a HUGE-aligned file offset) can be mapped by PMDs, not 4 KiB entries.
        self._map, self.addr, self.buffer = _reserve(self.size)
        self.bound = node is not None and mbind(self.addr, self.size, node)
        if hugepages:
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except (OSError, AttributeError):
                _warn_once("thp", "transparent hugepages unavailable (madvise failed); using 4 KiB pages")
        self.used = 0

    def alloc(self, nbytes: int) -> np.ndarray:
        start = (self.used + ALIGN - 1) // ALIGN * ALIGN
        if start + nbytes > self.size:
            raise MemoryError(f"arena {self.label or self.node}: {nbytes} bytes do not fit "
                              f"({self.size - start} left)")
        self.used = start + nbytes
        return self.buffer[start:start + nbytes]

    def map_file(self, length: int, fd: int, offset: int, shared: bool) -> None:
        """Replace the first `length` bytes (page multiple) of the arena by a mapping of
        `fd` at `offset`, at the same address (so views made before stay valid), bound
        to the arena's node. Shared: writes go to the file (building a cache image);
        private: the file is read, writes (rebalancing) are copied on write."""
        if length <= 0:
            return
        flags = (0x01 if shared else 0x02) | 0x10          # MAP_SHARED / MAP_PRIVATE, MAP_FIXED
        got = _libc.mmap(ctypes.c_void_p(self.addr), length, 0x3, flags, fd, offset)
        if got in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mapping the weights cache failed: {os.strerror(err)}")
        if self.node is not None:
            mbind(self.addr, length, self.node)
        if self.hugepages:   # honoured where the file's filesystem gives hugepages (huge= tmpfs)
            _libc.madvise(ctypes.c_void_p(self.addr), length, MADV_HUGEPAGE)

    close = _close_mapping


class FileMapping:
    """A copy-on-write mapping of a whole file (MAP_PRIVATE, read/write): views of it
    are the weights themselves, the page cache's pages, with no copy. Writes (none
    expected) would copy the page on write and never reach the file.

    Unlike an arena's anonymous pages, these are clean file pages: the kernel may
    reclaim them under memory pressure and read them back on the next touch (as
    llama.cpp's mmap), and a page read back lands where the reading thread's policy
    says, so this is only used where every shard's node is the same memory node.

    The file starts on a hugepage boundary (mapped over an anonymous reservation, which
    owns the address range and unmaps it all on close), so place_behind() can swap
    2 MiB-aligned runs of it for anonymous hugepages at the same addresses."""

    def __init__(self, path: str, hugepages: bool = False):
        self.path = path
        self.hugepages = hugepages
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.length = max(PAGE, (self.size + PAGE - 1) // PAGE * PAGE)
            self._map, self.addr, buffer = _reserve(self.length)
            got = _libc.mmap(ctypes.c_void_p(self.addr), self.length, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | 0x10, f.fileno(), 0)        # MAP_FIXED over the reservation
            if got in (None, _MAP_FAILED):
                err = ctypes.get_errno()
                del buffer          # (a view would keep the reservation from closing)
                self._map.close()
                raise OSError(err, f"mapping {path} failed: {os.strerror(err)}")
        self.buffer = buffer[:self.size]
        if hugepages:   # page-cache large folios map as PMDs where the filesystem makes them
            _libc.madvise(ctypes.c_void_p(self.addr), self.length, MADV_HUGEPAGE)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"{self.path}: bytes [{offset}, {offset + nbytes}) outside the file ({self.size} bytes)")
        return self.buffer[offset:offset + nbytes]

    def place_behind(self, lo: int, hi: int, node: int | None) -> int:
        """Swap bytes [lo, hi) of the mapping (lo on a hugepage boundary, hi clipped to the
        mapping) for anonymous memory holding the same bytes, bound to `node`, in hugepages
        where asked: the copy is made aside, then moved over the range in one mremap. Views
        keep their addresses, and a thread reading the range meanwhile reads the same bytes
        from either side (its faults wait for the move). The caller keeps writers out.
        Returns the bytes placed."""
        if lo % HUGE or lo < 0:
            raise ValueError(f"place_behind: offset {lo} is not on a {HUGE}-byte boundary")
        hi = min(hi, self.length)
        n = (hi - lo + PAGE - 1) // PAGE * PAGE
        if n <= 0:
            return 0
        raw = _libc.mmap(None, n + HUGE, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if raw in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"placing {self.path} in node memory: {os.strerror(err)}")
        start = raw + (-raw) % HUGE
        try:
            if node is not None:
                mbind(start, n, node)
            if self.hugepages:
                _libc.madvise(ctypes.c_void_p(start), n, MADV_HUGEPAGE)
            populate(start, n)
            dst = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(start))
            src = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(self.addr + lo))
            np.copyto(dst, src)      # the file's last page reads as zeros past its end
            got = _syscall("mremap", ctypes.c_void_p(start), ctypes.c_size_t(n), ctypes.c_size_t(n),
                           ctypes.c_int(MREMAP_MAYMOVE | MREMAP_FIXED), ctypes.c_void_p(self.addr + lo))
            if got != self.addr + lo:
                err = ctypes.get_errno()
                raise OSError(err, f"mremap failed: {os.strerror(err)}")
        except BaseException:
            _libc.munmap(ctypes.c_void_p(raw), n + HUGE)
            raise
        if start > raw:   # the alignment slack around the moved run
            _libc.munmap(ctypes.c_void_p(raw), start - raw)
        if raw + n + HUGE > start + n:
            _libc.munmap(ctypes.c_void_p(start + n), raw + n + HUGE - start - n)
        return n

    close = _close_mapping


_populate_ok = True


def populate(addr: int, length: int) -> bool:
    """Fault [addr, addr+length) in, writable, with MADV_POPULATE_WRITE (page-rounded).

    Pages come from the mapping's policy (mbind) and from the calling thread, so a
    node's threads populating its arena fault it in parallel, a hugepage at a time
    where THP is on. False (and nothing done) where the kernel lacks it (EINVAL):
    the copy that follows then faults pages itself."""
    global _populate_ok
    if not _populate_ok or length <= 0:
        return False
    first = addr - addr % PAGE
    end = (addr + length + PAGE - 1) // PAGE * PAGE
    if _libc.madvise(ctypes.c_void_p(first), end - first, MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:   # e.g. ENOMEM: leave it to the copy, keep trying elsewhere
            return False
        _populate_ok = False
        _warn_once("populate", f"MADV_POPULATE_WRITE unavailable ({os.strerror(err)}); "
                               f"weights are faulted in by the copies")
        return False
    return True


def populate_read(addr: int, length: int) -> bool:
    """Map [addr, addr+length) of a file mapping in ahead of use (MADV_POPULATE_READ), so a
    cached image does not fault page by page in the first forward passes."""
    if length <= 0:
        return False
    return _libc.madvise(ctypes.c_void_p(addr), length, MADV_POPULATE_READ) == 0


def drop_file_pages(arr: np.ndarray) -> None:
    """Let the kernel reclaim the pages of a file-backed view we no longer need
    (after copying a tensor into node memory), so the file does not stay resident.
    (ctypes: the view belongs to the GGUF reader's numpy memmap, not an mmap object we hold.)"""
    if arr.size == 0:
        return
    start = arr.ctypes.data
    first = start - start % PAGE
    end = start + arr.nbytes
    # Only whole pages inside the view: neighbouring tensors may still be in use.
    first_full = first if first == start else first + PAGE
    length = (end - first_full) // PAGE * PAGE
    if length > 0:
        _libc.madvise(ctypes.c_void_p(first_full), length, MADV_DONTNEED)


def resident_bytes() -> dict[str, int]:
    """RssAnon / RssFile / VmHWM of this process from /proc/self/status, in bytes."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def populate_supported() -> bool:
    """Whether MADV_POPULATE_WRITE worked so far (False after the kernel refused it)."""
    return _populate_ok
