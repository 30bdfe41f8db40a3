# Included by native.pyx.  The byte-level BPE of mn_bpe.c behind a Python class: the tokenizer
# builds it from the vocabulary's strings in one pass (no Python dict of 150k tokens, no second
# model in another library holding the GIL for a third of a second) and encodes pieces with it.

from cpython.unicode cimport PyUnicode_AsUTF8AndSize

cdef extern from "Python.h":
    Py_ssize_t PyUnicode_FindChar(object s, Py_UCS4 ch, Py_ssize_t start, Py_ssize_t end, int direction) except -2
    Py_ssize_t PyUnicode_GetLength(object s) except -1

cdef extern from "mn_bpe.h":
    ctypedef struct mn_bpe:
        pass
    mn_bpe *mn_bpe_new(int64_t n_tokens, size_t text_bytes, int64_t n_merges, int ignore_merges) nogil
    void mn_bpe_free(mn_bpe *b) nogil
    int64_t mn_bpe_add_token(mn_bpe *b, const char *s, size_t n) nogil
    void mn_bpe_finish_tokens(mn_bpe *b) nogil
    int64_t mn_bpe_lookup(const mn_bpe *b, const char *s, size_t n) nogil
    int mn_bpe_add_merge(mn_bpe *b, const char *m, size_t n, int64_t rank) nogil
    size_t mn_bpe_scratch_bytes(size_t n) nogil
    int64_t mn_bpe_encode(const mn_bpe *b, const uint8_t *piece, size_t n, int32_t *out, void *scratch) nogil


cdef class BPE:
    """A vocabulary (token i is tokens[i]) and its merges ("a b", ranked by index), as
    llama.cpp reads them: a merge is cut at its first space after the first character, one
    without a space never matches, a repeated pair keeps its first rank.  ignore_merges: a
    piece that is itself a token is taken whole.

    ValueError for a token seen twice or a merge whose parts or result are not tokens, and
    TypeError for an item that is not a str, each naming the item: "merges[i] = ..."."""
    cdef mn_bpe *b
    cdef readonly Py_ssize_t n_tokens

    def __cinit__(self, list tokens, list merges, bint ignore_merges=False):
        cdef Py_ssize_t i, n = len(tokens), size, total = 0
        cdef const char *s
        cdef int64_t dup
        cdef int missing
        for i in range(n):
            t = tokens[i]
            if type(t) is not str:
                raise TypeError(f"tokens[{i}]: expected a string, got {t!r}")
            PyUnicode_AsUTF8AndSize(t, &size)
            total += size
        self.b = mn_bpe_new(n, total, len(merges), ignore_merges)
        if self.b == NULL:
            raise MemoryError("BPE: cannot allocate the vocabulary tables")
        for i in range(n):
            s = PyUnicode_AsUTF8AndSize(tokens[i], &size)
            dup = mn_bpe_add_token(self.b, s, size)
            if dup >= 0:
                raise ValueError(f"tokens[{i}]: token {tokens[i]!r} appears twice (ids {dup} and {i})")
        self.n_tokens = n
        mn_bpe_finish_tokens(self.b)
        for i in range(len(merges)):
            m = merges[i]
            if type(m) is not str:
                raise TypeError(f"merges[{i}]: expected a string, got {m!r}")
            s = PyUnicode_AsUTF8AndSize(m, &size)
            missing = mn_bpe_add_merge(self.b, s, size, i)
            if missing:
                cut = PyUnicode_FindChar(m, 32, 1, PyUnicode_GetLength(m), 1)
                a, c = m[:cut], m[cut + 1:]
                raise ValueError(f"merges[{i}] = {m!r}: {(a, c, a + c)[missing - 1]!r} is not one of the tokens")

    def __dealloc__(self):
        mn_bpe_free(self.b)

    def lookup(self, str text):
        """The id of the token whose string is text, or None."""
        cdef Py_ssize_t size
        cdef const char *s = PyUnicode_AsUTF8AndSize(text, &size)
        cdef int64_t i = mn_bpe_lookup(self.b, s, size)
        return None if i < 0 else i

    def encode(self, pieces):
        """The ids of pre-tokenized pieces (str), one after another."""
        cdef list out = []
        cdef Py_ssize_t size, cap = 0, j
        cdef int64_t k
        cdef const char *s
        cdef int32_t *ids = NULL
        cdef void *scratch = NULL
        try:
            for p in pieces:
                s = PyUnicode_AsUTF8AndSize(p, &size)
                if size > cap:
                    cap = max(size, 2 * cap, 64)
                    free(ids); free(scratch)
                    ids = <int32_t *>malloc(sizeof(int32_t) * cap)
                    scratch = malloc(mn_bpe_scratch_bytes(cap))
                    if ids == NULL or scratch == NULL:
                        raise MemoryError("BPE: cannot allocate the encode scratch")
                k = mn_bpe_encode(self.b, <const uint8_t *>s, size, ids, scratch)
                for j in range(k):
                    out.append(ids[j])
        finally:
            free(ids); free(scratch)
        return out
