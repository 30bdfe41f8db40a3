# Included by native.pyx.  GGUF string arrays (a vocabulary's 100k-250k tokens and merges)
# located and decoded at C speed: each item is a little-endian u64 byte count and its bytes,
# so finding item i needs every item before it, a loop Python runs at ~1 us an item.

from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcpy


def gguf_string_spans(const uint8_t[::1] data, size_t offs, uint64_t n):
    """(starts, lengths, end) of the n strings of a GGUF string array whose first item's
    count is at data[offs]: int64 arrays of each string's first byte and byte count, and
    the offset just past the last.  ValueError, naming the item, where one runs past the
    end of the buffer."""
    import numpy as np
    cdef size_t size = data.shape[0]
    cdef size_t left = size - offs if offs <= size else 0
    # every item takes at least its 8-byte count, so a count beyond that is a bad file,
    # and refusing it first keeps the arrays below from being huge
    if n > left // 8:
        raise ValueError(f"string array of {n} items cannot fit in the {left} bytes left in the file "
                         f"from byte {offs}")
    starts = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] s = starts, L = lengths
    cdef uint64_t i, length
    cdef size_t p = offs
    cdef int64_t bad = -1
    with nogil:
        for i in range(n):
            if p + 8 > size:
                bad = <int64_t>i
                break
            memcpy(&length, &data[p], 8)   # x86-64 and every ggml host are little-endian
            if length > size - p - 8:
                bad = <int64_t>i
                break
            s[i] = <int64_t>(p + 8)
            L[i] = <int64_t>length
            p += 8 + length
    if bad >= 0:
        raise ValueError(f"string array of {n} items: item {bad} runs past the end of the file ({size} bytes)")
    return starts, lengths, p


cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void *PyUnicode_DATA(object o)


cdef inline bint _ascii(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef uint8_t bits = 0
    cdef Py_ssize_t i
    for i in range(n):
        bits |= p[i]
    return bits < 0x80


def gguf_decode_strings(const uint8_t[::1] data, const int64_t[::1] starts, const int64_t[::1] lengths):
    """The strings at data[starts[i]:starts[i] + lengths[i]] as str (UTF-8); ValueError
    naming the first item that is not valid UTF-8."""
    cdef Py_ssize_t i, n = starts.shape[0]
    cdef const uint8_t *p
    cdef list out = [None] * n
    for i in range(n):
        p = &data[starts[i]]
        if _ascii(p, lengths[i]):   # most of a vocabulary: a copy, not a decode (a third of a load's header time)
            s = PyUnicode_New(lengths[i], 127)
            memcpy(PyUnicode_DATA(s), p, lengths[i])
            out[i] = s
            continue
        try:
            out[i] = PyUnicode_DecodeUTF8(<const char *>p, lengths[i], NULL)
        except UnicodeDecodeError as e:
            raise ValueError(f"item {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return out


cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyArrayObject:
        pass
    void *PyArray_DATA(PyArrayObject *a)


from numpy import ndarray as _ndarray


def data_address(a):
    """The address of an ndarray's first byte: numpy's __array_interface__ builds a dict for
    it (3 us), and a load asks for thousands (every weight's place in the file and the arena)."""
    if not isinstance(a, _ndarray):
        raise TypeError(f"data_address: expected an ndarray, got {type(a).__name__}")
    return <uintptr_t>PyArray_DATA(<PyArrayObject *><void *>a)

