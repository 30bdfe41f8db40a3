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
        # The strings' UTF-8 are located with the GIL, then hashed without it: the tokenizer is
        # built on a thread beside the weights' placement, whose Python work would otherwise wait.
        cdef Py_ssize_t i, n = len(tokens), n_merges = len(merges), size, total = 0
        cdef Py_ssize_t bad = -1
        cdef int64_t dup = -1
        cdef int missing = 0
        cdef const char **text = <const char **>malloc((n + n_merges + 1) * sizeof(const char *))
        cdef Py_ssize_t *sizes = <Py_ssize_t *>malloc((n + n_merges + 1) * sizeof(Py_ssize_t))
        try:
            if text == NULL or sizes == NULL:
                raise MemoryError("BPE: cannot allocate the vocabulary tables")
            for i in range(n):
                t = tokens[i]
                if type(t) is not str:
                    raise TypeError(f"tokens[{i}]: expected a string, got {t!r}")
                text[i] = PyUnicode_AsUTF8AndSize(t, &sizes[i])
                total += sizes[i]
            for i in range(n_merges):
                m = merges[i]
                if type(m) is not str:
                    raise TypeError(f"merges[{i}]: expected a string, got {m!r}")
                text[n + i] = PyUnicode_AsUTF8AndSize(m, &sizes[n + i])
            self.b = mn_bpe_new(n, total, n_merges, ignore_merges)
            if self.b == NULL:
                raise MemoryError("BPE: cannot allocate the vocabulary tables")
            with nogil:   # the lists are held by the caller: their strings, and these pointers, live
                for i in range(n):
                    dup = mn_bpe_add_token(self.b, text[i], sizes[i])
                    if dup >= 0:
                        bad = i
                        break
                if bad < 0:
                    mn_bpe_finish_tokens(self.b)
                    for i in range(n_merges):
                        missing = mn_bpe_add_merge(self.b, text[n + i], sizes[n + i], i)
                        if missing:
                            bad = i
                            break
        finally:
            free(text)
            free(sizes)
        self.n_tokens = n
        if bad >= 0 and dup >= 0:
            raise ValueError(f"tokens[{bad}]: token {tokens[bad]!r} appears twice (ids {dup} and {bad})")
        if bad >= 0:
            m = merges[bad]
            cut = PyUnicode_FindChar(m, 32, 1, PyUnicode_GetLength(m), 1)
            a, c = m[:cut], m[cut + 1:]
            raise ValueError(f"merges[{bad}] = {m!r}: {(a, c, a + c)[missing - 1]!r} is not one of the tokens")

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
