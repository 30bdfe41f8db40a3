# The NUMA engine's native core, seen from Python (included by native.pyx).
# moe_numa.engine builds the per-node shards in node memory and hands them here;
# a forward step is then one call per block (attention, ffn) and one for the
# head, each releasing the GIL and synchronising the nodes once.
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

import numpy as np

cdef extern from "mn_engine.h":
    cpdef enum mn_attn_kind:
        MN_ATTN_NONE, MN_ATTN_GQA, MN_ATTN_MLA, MN_ATTN_MLA_MHA
    cpdef enum mn_ffn_kind:
        MN_FFN_NONE, MN_FFN_DENSE, MN_FFN_MOE
    cpdef enum mn_gating:
        MN_GATE_SOFTMAX, MN_GATE_SIGMOID
    cpdef enum mn_group_rule:
        MN_GROUP_TOP2_SUM, MN_GROUP_MAX

    ctypedef struct mn_mat:
        int type
        const uint8_t *data
        size_t stride
        int64_t rows, cols

    ctypedef struct mn_attn_layer:
        int kind
        int64_t hidden
        float rms_eps, norm_eps, kq_scale
        const float *attn_norm
        int n_head, n_kv
        const int32_t *q2kv
        int qk_dim, v_dim, rope_off, rope_dims, rope_neox
        const float *rope_cos
        const float *rope_sin
        mn_mat wq, wk, wv, wo
        const float *bq
        const float *bk
        const float *bv
        const float *q_norm
        const float *k_norm
        int q_lora, kv_lora, nope
        mn_mat wq_a, wq_b, wkv_a, wkv_b
        const float *q_a_norm
        const float *kv_a_norm
        const mn_mat *k_b
        const mn_mat *v_b
        int64_t n_ctx
        int n_slots
        int cache_type_k, cache_type_v
        void *cache_k
        void *cache_v
        void *cache_lat
        void *cache_ktiles

    ctypedef struct mn_ffn_layer:
        int kind
        int64_t hidden
        float rms_eps
        const float *ffn_norm
        int n_expert, n_used, gating, norm_w, n_groups, n_groups_used, group_rule
        float w_scale
        mn_mat router
        const float *probs_bias
        int gate_type, up_type, down_type
        int64_t inter
        const uint8_t **gate_ptrs
        const uint8_t **up_ptrs
        const uint8_t **down_ptrs
        size_t gate_stride, up_stride, down_stride
        const int64_t *inter_of
        const size_t *down_stride_of
        int node_id, n_nodes
        const uint64_t *repl_nodes
        const float *node_share
        int64_t sh_ff
        mn_mat sh_gate, sh_up, sh_down
        const float *sh_gate_vec
        int64_t *expert_tokens

    ctypedef struct mn_head_shard:
        int64_t hidden, vocab
        float rms_eps
        const float *norm
        mn_mat out
        int64_t v0

    ctypedef struct mn_node:
        mn_pool *pool
        mn_attn_layer *attn
        mn_ffn_layer *ffn
        mn_head_shard head
        float *partial
        uint8_t *scratch
        size_t scratch_bytes
        int64_t busy_ns
        int64_t idle_ns
        int64_t ffn_busy_ns
        int64_t moe_assign

    ctypedef struct mn_engine:
        int n_nodes, n_layers
        int64_t hidden, t_max
        mn_node *nodes
        int64_t syncs
        int64_t wait_ns
        int64_t crit_ns
        int64_t ffn_crit_ns
        int64_t reduce_parallel_min
        int64_t route_split_min
        int64_t moe_share_min
        int64_t attn_share_min
        uint8_t *shared
        size_t shared_bytes

    size_t mn_node_scratch_bytes(const mn_engine *e, int node)
    int64_t mn_engine_moe_taken(const mn_engine *e, int node, int reset)
    int64_t mn_engine_attn_taken(const mn_engine *e, int node, int reset)
    size_t mn_engine_shared_bytes(const mn_engine *e)
    size_t mn_kv_tile_bytes(int type, int64_t dim)
    size_t mn_kv_row_bytes(int type, int64_t dim)
    int mn_engine_check(const mn_engine *e, char *err, size_t errlen)
    int mn_engine_check_layer(const mn_engine *e, int node, int layer, char *err, size_t errlen)
    const char *mn_engine_strerror(int rc)
    int mn_engine_attention(mn_engine *e, int layer, float *x, int64_t T, int64_t pos0) nogil
    int mn_engine_attention_batch(mn_engine *e, int layer, float *x, int64_t T, const int64_t *pos,
                                  const int32_t *slot) nogil
    int mn_engine_ffn(mn_engine *e, int layer, float *x, int64_t T) nogil
    int mn_engine_head(mn_engine *e, const float *x, int64_t T, float *logits) nogil
    int mn_engine_forward(mn_engine *e, float *x, int64_t T, int64_t pos0, const int64_t *pos,
                          const int32_t *slot, int64_t logit_from, float *logits) nogil

from moe_numa.errors import ClosedError as _ClosedError, ShapeError as _ShapeError

ATTN_KINDS = enum_names(mn_attn_kind, "MN_ATTN_")     # "none", "gqa", "mla", "mla_mha"
FFN_KINDS = enum_names(mn_ffn_kind, "MN_FFN_")        # "none", "dense", "moe"
GATINGS = enum_names(mn_gating, "MN_GATE_")           # RouterConfig.gating: "softmax", "sigmoid"
GROUP_RULES = enum_names(mn_group_rule, "MN_GROUP_")  # RouterConfig.group_rule: "top2_sum", "max"


# -- shard descriptors ---------------------------------------------------------
# One Python class per struct of mn_engine.h, with the struct's fields by name (an
# array field holds the numpy array its pointer will point into, or None for NULL).
# Where C needs what Python holds as one value, DERIVED names the C fields it fills
# (tests/test_enums.py checks the classes against the header field by field).
class Descriptor:
    """Fixed fields, every one given: an unknown or missing field is a ShapeError that
    names it, never a silent default."""
    __slots__ = ()
    DERIVED = {}

    def __init__(self, **fields):
        names = type(self).__slots__
        unknown = sorted(set(fields) - set(names))
        missing = [n for n in names if n not in fields]
        if unknown or missing:
            raise _ShapeError(f"{type(self).__name__}: " + "; ".join(
                ([f"unknown field(s) {', '.join(unknown)}"] if unknown else []) +
                ([f"missing field(s) {', '.join(missing)}"] if missing else [])))
        for n in names:
            setattr(self, n, fields[n])

    def fields(self):
        return {n: getattr(self, n) for n in type(self).__slots__}

    def replace(self, **changes):
        """A copy with some fields changed (an unknown name is refused like any other)."""
        return type(self)(**dict(self.fields(), **changes))

    def map(self, fn):
        """A copy with fn applied to every field value (containers entered)."""
        def walk(v):
            if isinstance(v, Descriptor):
                return v.map(fn)
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return type(v)(walk(x) for x in v)
            return fn(v)
        return type(self)(**{n: walk(v) for n, v in self.fields().items()})

    def __repr__(self):
        shown = (f"{n}=<{v.dtype} {v.shape}>" if hasattr(v, "shape") else f"{n}={v!r}" for n, v in self.fields().items())
        return f"{type(self).__name__}({', '.join(shown)})"


class Mat(Descriptor):
    """mn_mat: GGML `type`, `raw` uint8 rows [rows, row_bytes] (data, stride, rows), `cols`."""
    __slots__ = ("type", "raw", "cols")
    DERIVED = {"raw": ("data", "stride", "rows")}


class Expert(Descriptor):
    """One routed expert of a node: its gate/up/down uint8 rows and its FFN size here
    (the layer's inter for a whole expert, its slice's for a split one)."""
    __slots__ = ("gate", "up", "down", "inter")


class AttnShard(Descriptor):
    """mn_attn_layer (q2kv None: query head h reads KV head h)."""
    __slots__ = ("kind", "hidden", "rms_eps", "norm_eps", "kq_scale", "attn_norm", "n_head", "n_kv", "q2kv",
                 "qk_dim", "v_dim", "rope_off", "rope_dims", "rope_neox", "rope_cos", "rope_sin",
                 "wq", "wk", "wv", "wo", "bq", "bk", "bv", "q_norm", "k_norm",
                 "q_lora", "kv_lora", "nope", "wq_a", "wq_b", "wkv_a", "wkv_b", "q_a_norm", "kv_a_norm",
                 "k_b", "v_b", "n_ctx", "n_slots", "cache_type_k", "cache_type_v", "cache_k", "cache_v", "cache_lat",
                 "cache_ktiles")


class FFNShard(Descriptor):
    """mn_ffn_layer; `experts` ({expert id: Expert}) fills the per-expert pointer tables."""
    __slots__ = ("kind", "hidden", "rms_eps", "ffn_norm", "n_expert", "n_used", "gating", "norm_w", "n_groups",
                 "n_groups_used", "group_rule", "w_scale", "router", "probs_bias", "gate_type", "up_type",
                 "down_type", "inter", "experts", "node_id", "n_nodes", "repl_nodes", "node_share",
                 "sh_ff", "sh_gate", "sh_up", "sh_down", "sh_gate_vec", "expert_tokens")
    DERIVED = {"experts": ("gate_ptrs", "up_ptrs", "down_ptrs", "gate_stride", "up_stride", "down_stride",
                           "inter_of", "down_stride_of")}


class HeadShard(Descriptor):
    """mn_head_shard."""
    __slots__ = ("hidden", "vocab", "rms_eps", "norm", "out", "v0")


cdef _descriptor(p, cls, str pre):
    if type(p) is not cls:
        raise _ShapeError(f"{pre}expected a {cls.__name__} descriptor, got {type(p).__name__}")


cdef int _member(enum, value, str what) except? -1:
    """The C value of an enum member given as itself or its int; anything else is refused."""
    try:
        return int(enum(value))
    except (TypeError, ValueError):
        raise _ShapeError(f"{what} {value!r} unknown ({', '.join(m.name for m in enum)})") from None

KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}   # llama.cpp's -ctk / -ctv names, as ggml type ids


def cache_type(t) -> int:
    """A KV-cache type by llama.cpp's name (f32, f16, q8_0) or ggml id -> the id."""
    if isinstance(t, str):
        if t.lower() not in KV_CACHE_TYPES:
            raise _ShapeError(f"KV-cache type {t!r} unknown ({', '.join(KV_CACHE_TYPES)})")
        return KV_CACHE_TYPES[t.lower()]
    if t not in KV_CACHE_TYPES.values():
        raise _ShapeError(f"KV-cache type id {t!r} unknown ({', '.join(KV_CACHE_TYPES)})")
    return int(t)


def kv_tile_bytes(t, int64_t dim) -> int:
    """Bytes of one key tile (32 positions of dim values) of KV-cache type t (0: unsupported)."""
    return mn_kv_tile_bytes(cache_type(t), dim)


def kv_row_bytes(t, int64_t dim) -> int:
    """Bytes of one value row of dim values of KV-cache type t (0: unsupported)."""
    return mn_kv_row_bytes(cache_type(t), dim)


cdef _refuse(exc, str pre):
    """Re-raise a setter's failure; a parameter of the wrong Python type or shape
    (TypeError, ValueError, ...) becomes a ShapeError naming the slot."""
    if isinstance(exc, (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError)) \
            and not isinstance(exc, _ShapeError):
        raise _ShapeError(f"{pre}bad parameter ({type(exc).__name__}: {exc})") from exc
    raise exc


cdef class NativeEngine:
    """Per-node layer shards and the block calls.

    The engine holds its pools (Pool objects) and every array handed to a
    setter, per layer slot: re-setting a slot (rebalancing) releases what the
    slot held before. Every field is checked before it reaches C; a bad one
    raises ShapeError naming node, layer and field, and leaves the slot as it
    was. After close(), or once one of its pools was closed, every call raises
    ClosedError."""
    cdef mn_engine e
    cdef list _pools
    cdef dict _slots          # (kind, node, layer) -> (arrays kept, malloc'd addresses)
    cdef list _keep           # finalize()'s buffers
    cdef list _cur_keep
    cdef list _cur_mallocs
    cdef bint _ready
    cdef bint _closed
    cdef int64_t _n_ctx       # every layer's (n_ctx, n_slots), once one is set
    cdef int _n_slots

    def __cinit__(self, pools, int n_layers, int64_t hidden, int64_t t_max):
        n = len(pools)
        memset(&self.e, 0, sizeof(mn_engine))
        self._pools = []
        self._slots = {}
        self._keep = []
        self._ready = False
        self._closed = False
        self._n_ctx = -1
        self._n_slots = -1
        if not 1 <= n <= 64:
            raise _ShapeError(f"NativeEngine: pools: 1..64 pools (one per node), got {n}")
        if n_layers < 0 or hidden < 1 or t_max < 1:
            raise _ShapeError(f"NativeEngine: n_layers={n_layers}, hidden={hidden}, t_max={t_max}: "
                              f"need n_layers >= 0, hidden >= 1, t_max >= 1")
        for i in range(n):
            if not isinstance(pools[i], Pool) or (<Pool>pools[i]).p == NULL:
                raise _ShapeError(f"NativeEngine: pools[{i}] is not an open Pool")
        self._pools = list(pools)
        self.e.n_layers = n_layers
        self.e.hidden = hidden
        self.e.t_max = t_max
        self.e.nodes = <mn_node *>calloc(n, sizeof(mn_node))
        if self.e.nodes == NULL:
            raise MemoryError()
        self.e.n_nodes = n
        for i in range(n):
            self.e.nodes[i].pool = (<Pool>pools[i]).p
            self.e.nodes[i].attn = <mn_attn_layer *>calloc(max(n_layers, 1), sizeof(mn_attn_layer))
            self.e.nodes[i].ffn = <mn_ffn_layer *>calloc(max(n_layers, 1), sizeof(mn_ffn_layer))
            if self.e.nodes[i].attn == NULL or self.e.nodes[i].ffn == NULL:
                raise MemoryError()

    def __dealloc__(self):
        self._release()

    cdef void _release(self):
        cdef int i
        if self.e.nodes != NULL:
            for i in range(self.e.n_nodes):
                free(self.e.nodes[i].attn)
                free(self.e.nodes[i].ffn)
            free(self.e.nodes)
            self.e.nodes = NULL
        self.e.n_nodes = 0
        if self._slots:
            for keep, mallocs in self._slots.values():
                for ptr in mallocs:
                    free(<void *><size_t>ptr)
            self._slots = {}
        self._keep = []
        self._pools = []

    def close(self):
        """Drop every table and reference (idempotent); later calls raise ClosedError."""
        self._closed = True
        self._ready = False
        self._release()

    @property
    def closed(self):
        return self._closed

    def retained(self):
        """(arrays, native tables) the engine holds now: constant across re-sets of a slot."""
        return (sum(len(k) for k, _ in self._slots.values()) + len(self._keep),
                sum(len(m) for _, m in self._slots.values()))

    cdef _check_open(self):
        cdef int i
        if self._closed:
            raise _ClosedError("the engine is closed")
        for i in range(self.e.n_nodes):
            if (<Pool>self._pools[i]).p != self.e.nodes[i].pool:
                raise _ClosedError(f"node {i}'s thread pool was closed; the engine cannot run")

    cdef _check_node(self, int node, int layer, bint head=False):
        """node (and layer, unless for the head) in range: Cython does not check indices here."""
        self._check_open()
        if not 0 <= node < self.e.n_nodes:
            raise _ShapeError(f"node {node} out of range 0..{self.e.n_nodes - 1}")
        if not head and not 0 <= layer < self.e.n_layers:
            raise _ShapeError(f"layer {layer} out of range 0..{self.e.n_layers - 1}")

    # -- building ------------------------------------------------------------
    cdef const float *_f(self, a, int64_t n, str name) except? NULL:
        """A float32 vector of n values (None: NULL)."""
        if a is None:
            return NULL
        try:
            arr = np.ascontiguousarray(a, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise _ShapeError(f"{name}: not an array of floats ({exc})") from None
        if arr.size != n:
            raise _ShapeError(f"{name}: {arr.size} values, expected {n}")
        self._cur_keep.append(arr)
        return <const float *><size_t>arr.ctypes.data

    cdef float *_fw(self, a, int64_t n, str name) except? NULL:
        """A writable float32 buffer of n values (caches): used in place, never copied."""
        if a is None:
            return NULL
        if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable):
            raise _ShapeError(f"{name}: cache and output buffers must be writable C-contiguous float32 arrays")
        if a.size != n:
            raise _ShapeError(f"{name}: {a.size} values, expected {n}")
        self._cur_keep.append(a)
        return <float *><size_t>a.ctypes.data

    cdef void *_bw(self, a, size_t n, str name) except? NULL:
        """A writable buffer of n bytes (caches, any dtype): used in place, never copied."""
        if a is None:
            return NULL
        if not (isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable):
            raise _ShapeError(f"{name}: cache buffers must be writable C-contiguous arrays")
        if <size_t>a.nbytes != n:
            raise _ShapeError(f"{name}: {a.nbytes} bytes, expected {n}")
        self._cur_keep.append(a)
        return <void *><size_t>a.ctypes.data

    cdef mn_mat _mat(self, m, str name) except *:
        """m: None (NULL), or a Mat."""
        cdef mn_mat r
        memset(&r, 0, sizeof(mn_mat))
        if m is None:
            return r
        _descriptor(m, Mat, name + ": ")
        try:
            qtype, raw, cols = int(m.type), m.raw, int(m.cols)
        except (TypeError, ValueError):
            raise _ShapeError(f"{name}: type and cols must be integers") from None
        if not (isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.ndim == 2):
            raise _ShapeError(f"{name}: weight shards must be 2-D uint8 arrays of GGML blocks")
        if raw.strides[1] != 1 or raw.strides[0] < raw.shape[1]:
            raise _ShapeError(f"{name}: weight shard rows must be contiguous")
        if not (0 <= qtype < 1 << 16 and mn_type_supported(qtype)):
            raise _ShapeError(f"{name}: unsupported weight type {qtype}")
        rb = mn_row_bytes(qtype, cols) if 0 < cols < 1 << 40 else 0
        if rb == 0 or rb != raw.shape[1]:
            raise _ShapeError(f"{name}: weight shard of type {qtype} has {raw.shape[1]} bytes per row, expected "
                              f"{rb} for {cols} columns")
        self._cur_keep.append(raw)
        r.type = qtype
        r.data = <const uint8_t *><size_t>raw.ctypes.data
        r.stride = raw.strides[0]
        r.rows = raw.shape[0]
        r.cols = cols
        return r

    cdef void *_malloc(self, size_t n) except NULL:
        cdef void *p = calloc(n if n else 1, 1)
        if p == NULL:
            raise MemoryError()
        self._cur_mallocs.append(<size_t>p)
        return p

    cdef _begin(self):
        self._cur_keep = []
        self._cur_mallocs = []

    cdef _abort(self):
        for ptr in self._cur_mallocs:
            free(<void *><size_t>ptr)
        self._cur_keep = None
        self._cur_mallocs = None

    cdef _commit(self, key):
        """The slot now holds what was just built; release what it held before."""
        old = self._slots.pop(key, None)
        self._slots[key] = (self._cur_keep, self._cur_mallocs)
        self._cur_keep = None
        self._cur_mallocs = None
        if old is not None:
            for ptr in old[1]:
                free(<void *><size_t>ptr)

    cdef _check_slot(self, int node, int layer):
        """C's structural checks of the slot just written, and (once running) its scratch."""
        cdef char err[512]
        err[0] = 0
        if mn_engine_check_layer(&self.e, node, layer, err, sizeof(err)) != 0:
            raise _ShapeError(err.decode())
        if self._ready and mn_node_scratch_bytes(&self.e, node) > self.e.nodes[node].scratch_bytes:
            raise _ShapeError(f"node {node} layer {layer}: needs {mn_node_scratch_bytes(&self.e, node)} scratch "
                              f"bytes, the node has {self.e.nodes[node].scratch_bytes}")

    def set_attention(self, int node, int layer, p):
        self._check_node(node, layer)
        cdef mn_attn_layer *slot = &self.e.nodes[node].attn[layer]
        cdef mn_attn_layer old = slot[0]
        cdef mn_attn_layer L
        cdef mn_mat *mats
        cdef int n, h
        cdef int64_t tiles, half
        pre = f"node {node} layer {layer}: "
        _descriptor(p, AttnShard, pre)
        memset(&L, 0, sizeof(mn_attn_layer))
        self._begin()
        try:
            try:
                L.kind = _member(mn_attn_kind, p.kind, pre + "attention kind")
                L.hidden = p.hidden
                L.rms_eps = p.rms_eps
                L.norm_eps = p.norm_eps
                L.kq_scale = p.kq_scale
                L.n_head = p.n_head
                L.n_kv = p.n_kv
                L.qk_dim = p.qk_dim
                L.v_dim = p.v_dim
                L.rope_off = p.rope_off
                L.rope_dims = p.rope_dims
                L.rope_neox = p.rope_neox
                L.q_lora = p.q_lora
                L.kv_lora = p.kv_lora
                L.nope = p.nope
                L.n_ctx = p.n_ctx
                L.n_slots = p.n_slots
            except (TypeError, OverflowError) as exc:
                raise _ShapeError(f"{pre}attention field out of range: {exc}") from None
            if L.hidden != self.e.hidden:
                raise _ShapeError(f"{pre}hidden={L.hidden}, the engine's is {self.e.hidden}")
            if L.n_head < 0 or L.n_kv < 0 or L.qk_dim < 0 or L.v_dim < 0 or L.rope_dims < 0 or L.rope_off < 0 \
                    or L.q_lora < 0 or L.kv_lora < 0 or L.nope < 0 or L.n_ctx < 0 or L.rope_dims % 2:
                raise _ShapeError(f"{pre}negative size, or odd rope_dims={L.rope_dims}")
            if L.n_ctx > 1 << 32 or not 1 <= L.n_slots <= 1 << 16:
                raise _ShapeError(f"{pre}n_ctx={L.n_ctx} / n_slots={L.n_slots} out of range")
            if self._n_ctx >= 0 and (self._n_ctx, self._n_slots) != (L.n_ctx, L.n_slots):
                raise _ShapeError(f"{pre}every layer needs the same n_ctx and n_slots "
                                  f"({self._n_ctx}, {self._n_slots}), got ({L.n_ctx}, {L.n_slots})")
            L.attn_norm = self._f(p.attn_norm, L.hidden, pre + "attn_norm")
            active = L.kind != 0 and L.n_head > 0
            if active:
                q2kv = p.q2kv
                q2kv = np.arange(L.n_head) if q2kv is None else q2kv
                q2kv = np.ascontiguousarray(q2kv, dtype=np.int32)
                if q2kv.shape != (L.n_head,):
                    raise _ShapeError(f"{pre}q2kv has {q2kv.size} entries, expected n_head={L.n_head}")
                self._cur_keep.append(q2kv)
                L.q2kv = <const int32_t *><size_t>q2kv.ctypes.data
                half = L.rope_dims // 2
                L.rope_cos = self._f(p.rope_cos, L.n_ctx * half, pre + "rope_cos") if half else NULL
                L.rope_sin = self._f(p.rope_sin, L.n_ctx * half, pre + "rope_sin") if half else NULL
            L.wq = self._mat(p.wq, pre + "wq")
            L.wk = self._mat(p.wk, pre + "wk")
            L.wv = self._mat(p.wv, pre + "wv")
            L.wo = self._mat(p.wo, pre + "wo")
            L.bq = self._f(p.bq, <int64_t>L.n_head * L.qk_dim, pre + "bq")
            L.bk = self._f(p.bk, <int64_t>L.n_kv * L.qk_dim, pre + "bk")
            L.bv = self._f(p.bv, <int64_t>L.n_kv * L.v_dim, pre + "bv")
            L.q_norm = self._f(p.q_norm, L.qk_dim, pre + "q_norm")
            L.k_norm = self._f(p.k_norm, L.qk_dim, pre + "k_norm")
            L.wq_a = self._mat(p.wq_a, pre + "wq_a")
            L.wq_b = self._mat(p.wq_b, pre + "wq_b")
            L.wkv_a = self._mat(p.wkv_a, pre + "wkv_a")
            L.wkv_b = self._mat(p.wkv_b, pre + "wkv_b")
            L.q_a_norm = self._f(p.q_a_norm, L.q_lora, pre + "q_a_norm")
            L.kv_a_norm = self._f(p.kv_a_norm, L.kv_lora, pre + "kv_a_norm")
            if L.kind == 2 and active:
                k_b, v_b = p.k_b, p.v_b
                if k_b is None or v_b is None or len(k_b) != L.n_head or len(v_b) != L.n_head:
                    raise _ShapeError(f"{pre}k_b and v_b need one matrix per local head ({L.n_head})")
                n = L.n_head
                mats = <mn_mat *>self._malloc(2 * max(n, 1) * sizeof(mn_mat))
                for h in range(n):
                    mats[h] = self._mat(k_b[h], f"{pre}k_b[{h}]")
                    mats[n + h] = self._mat(v_b[h], f"{pre}v_b[{h}]")
                L.k_b = mats
                L.v_b = mats + n
            tiles = (L.n_ctx + 31) // 32
            ns = L.n_slots   # caches: n_slots sequences, slot-major
            L.cache_type_k, L.cache_type_v = cache_type(p.cache_type_k), cache_type(p.cache_type_v)
            if active and L.kind in (1, 3):
                L.cache_k = self._bw(p.cache_k, ns * L.n_kv * tiles * mn_kv_tile_bytes(L.cache_type_k, L.qk_dim),
                                     pre + "cache_k")
                L.cache_v = self._bw(p.cache_v, ns * L.n_ctx * L.n_kv * mn_kv_row_bytes(L.cache_type_v, L.v_dim),
                                     pre + "cache_v")
            elif active and L.kind == 2:
                L.cache_lat = self._bw(p.cache_lat, ns * L.n_ctx * mn_kv_row_bytes(L.cache_type_k, L.kv_lora),
                                       pre + "cache_lat")
                L.cache_ktiles = self._bw(p.cache_ktiles,
                                          ns * tiles * mn_kv_tile_bytes(L.cache_type_k, L.kv_lora + L.rope_dims),
                                          pre + "cache_ktiles")
            slot[0] = L
            try:
                self._check_slot(node, layer)
            except BaseException:
                slot[0] = old
                raise
        except BaseException as exc:
            self._abort()
            _refuse(exc, pre)
        self._commit(("attn", node, layer))
        self._n_ctx, self._n_slots = L.n_ctx, L.n_slots

    def set_ffn(self, int node, int layer, p):
        self._check_node(node, layer)
        cdef mn_ffn_layer *slot = &self.e.nodes[node].ffn[layer]
        cdef mn_ffn_layer old = slot[0]
        cdef mn_ffn_layer L
        cdef const uint8_t **ptrs
        cdef int e, k
        cdef size_t rb
        pre = f"node {node} layer {layer}: "
        _descriptor(p, FFNShard, pre)
        memset(&L, 0, sizeof(mn_ffn_layer))
        self._begin()
        try:
            try:
                L.kind = _member(mn_ffn_kind, p.kind, pre + "ffn kind")
                L.hidden = p.hidden
                L.rms_eps = p.rms_eps
                if L.kind == 2:
                    L.n_expert = p.n_expert
                    L.n_used = p.n_used
                    L.gating = p.gating
                    L.norm_w = p.norm_w
                    L.n_groups = p.n_groups
                    L.n_groups_used = p.n_groups_used
                    L.group_rule = p.group_rule
                    L.w_scale = p.w_scale
                    L.gate_type = p.gate_type
                    L.up_type = p.up_type
                    L.down_type = p.down_type
                    L.inter = p.inter
                L.sh_ff = p.sh_ff
            except (TypeError, ValueError, OverflowError) as exc:
                raise _ShapeError(f"{pre}ffn field out of range: {exc}") from None
            if L.hidden != self.e.hidden:
                raise _ShapeError(f"{pre}hidden={L.hidden}, the engine's is {self.e.hidden}")
            L.ffn_norm = self._f(p.ffn_norm, L.hidden, pre + "ffn_norm")
            if L.kind == 2:
                if not 1 <= L.n_expert <= 1 << 14:
                    raise _ShapeError(f"{pre}n_expert={L.n_expert} out of range 1..{1 << 14}")
                if L.inter < 1 or L.inter > 1 << 30:
                    raise _ShapeError(f"{pre}inter={L.inter} out of range")
                L.router = self._mat(p.router, pre + "router")
                L.probs_bias = self._f(p.probs_bias, L.n_expert, pre + "probs_bias")
                ptrs = <const uint8_t **>self._malloc(3 * L.n_expert * sizeof(void *))
                L.gate_ptrs = ptrs
                L.up_ptrs = ptrs + L.n_expert
                L.down_ptrs = ptrs + 2 * L.n_expert
                types = (L.gate_type, L.up_type, L.down_type)
                strides = [0, 0, 0]
                experts = p.experts
                if not (isinstance(experts, dict) and all(type(x) is Expert for x in experts.values())):
                    raise _ShapeError(f"{pre}experts must map expert ids to Expert descriptors")
                split = any(x.inter != L.inter for x in experts.values())
                if split:   # some local experts are slices: per-expert intermediate size and down stride
                    inter_of = np.zeros(L.n_expert, dtype=np.int64)
                    down_stride_of = np.zeros(L.n_expert, dtype=np.uint64)
                    self._cur_keep += [inter_of, down_stride_of]
                    L.inter_of = <const int64_t *><size_t>inter_of.ctypes.data
                    L.down_stride_of = <const size_t *><size_t>down_stride_of.ctypes.data
                for e_, x in experts.items():
                    if not (isinstance(e_, (int, np.integer)) and 0 <= e_ < L.n_expert):
                        raise _ShapeError(f"{pre}expert {e_!r} out of range 0..{L.n_expert - 1}")
                    e = e_
                    mats = (x.gate, x.up, x.down)
                    ie = x.inter
                    if not (isinstance(ie, (int, np.integer)) and 0 < ie <= L.inter):
                        raise _ShapeError(f"{pre}expert {e}: local inter {ie!r} out of range 1..{L.inter}")
                    cols = (L.hidden, L.hidden, ie)
                    rows = (ie, ie, L.hidden)
                    for k in range(3):
                        raw = mats[k]
                        what = f"{pre}expert {e} {('gate', 'up', 'down')[k]}"
                        rb = mn_row_bytes(types[k], cols[k]) if mn_type_supported(types[k]) else 0
                        if rb == 0:
                            raise _ShapeError(f"{what}: type {types[k]} cannot hold {cols[k]} columns")
                        if not (isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.ndim == 2
                                and raw.shape == (rows[k], rb) and raw.strides[1] == 1):
                            raise _ShapeError(f"{what}: expected uint8 rows of shape ({rows[k]}, {rb}), got "
                                              f"{getattr(raw, 'dtype', type(raw))} {getattr(raw, 'shape', '')}")
                        shared = k < 2 or not split   # split experts' down rows have their own stride
                        if shared and strides[k] and raw.strides[0] != strides[k]:
                            raise _ShapeError(f"{what}: row stride {raw.strides[0]} differs from the other "
                                              f"experts' ({strides[k]})")
                        self._cur_keep.append(raw)
                        ptrs[k * L.n_expert + e] = <const uint8_t *><size_t>raw.ctypes.data
                        if shared:
                            strides[k] = raw.strides[0]
                    if split:
                        inter_of[e] = ie
                        down_stride_of[e] = mats[2].strides[0]
                L.gate_stride, L.up_stride, L.down_stride = strides
                L.node_id = p.node_id
                L.n_nodes = p.n_nodes
                if p.repl_nodes is not None:
                    repl = np.ascontiguousarray(p.repl_nodes, dtype=np.uint64)
                    share = np.ascontiguousarray(p.node_share, dtype=np.float32)
                    if repl.shape != (L.n_expert,) or share.shape != (L.n_nodes, L.n_expert):
                        raise _ShapeError(f"{pre}repl_nodes must be [n_expert] and node_share [n_nodes, n_expert]")
                    self._cur_keep += [repl, share]
                    L.repl_nodes = <const uint64_t *><size_t>repl.ctypes.data
                    L.node_share = <const float *><size_t>share.ctypes.data
                counts = p.expert_tokens
                if not (isinstance(counts, np.ndarray) and counts.dtype == np.int64 and counts.flags.c_contiguous
                        and counts.flags.writeable and counts.shape == (L.n_expert,)):
                    raise _ShapeError(f"{pre}expert_tokens must be a writable C-contiguous int64 array of "
                                      f"n_expert counters")
                self._cur_keep.append(counts)
                L.expert_tokens = <int64_t *><size_t>counts.ctypes.data
            if L.sh_ff < 0:
                raise _ShapeError(f"{pre}sh_ff={L.sh_ff} is negative")
            if L.sh_ff:
                L.sh_gate = self._mat(p.sh_gate, pre + "sh_gate")
                L.sh_up = self._mat(p.sh_up, pre + "sh_up")
                L.sh_down = self._mat(p.sh_down, pre + "sh_down")
            L.sh_gate_vec = self._f(p.sh_gate_vec, L.hidden, pre + "sh_gate_vec")
            slot[0] = L
            try:
                self._check_slot(node, layer)
            except BaseException:
                slot[0] = old
                raise
        except BaseException as exc:
            self._abort()
            _refuse(exc, pre)
        self._commit(("ffn", node, layer))

    def set_shard(self, int node, int layer, p):
        """Set one shard by its descriptor's type: AttnShard, FFNShard or HeadShard (the
        head has no layer: `layer` is ignored)."""
        if type(p) is AttnShard:
            self.set_attention(node, layer, p)
        elif type(p) is FFNShard:
            self.set_ffn(node, layer, p)
        elif type(p) is HeadShard:
            self.set_head(node, p)
        else:
            raise _ShapeError(f"node {node}: {type(p).__name__} is not a shard descriptor "
                              f"(AttnShard, FFNShard or HeadShard)")

    def set_head(self, int node, p):
        self._check_node(node, -1, True)
        cdef mn_head_shard *slot = &self.e.nodes[node].head
        cdef mn_head_shard old = slot[0]
        cdef mn_head_shard h
        pre = f"node {node} head: "
        _descriptor(p, HeadShard, pre)
        memset(&h, 0, sizeof(mn_head_shard))
        self._begin()
        try:
            try:
                h.hidden = p.hidden
                h.vocab = p.vocab
                h.rms_eps = p.rms_eps
                h.v0 = p.v0
            except (TypeError, OverflowError) as exc:
                raise _ShapeError(f"{pre}field out of range: {exc}") from None
            if h.hidden != self.e.hidden:
                raise _ShapeError(f"{pre}hidden={h.hidden}, the engine's is {self.e.hidden}")
            h.norm = self._f(p.norm, h.hidden, pre + "norm")
            h.out = self._mat(p.out, pre + "out")
            slot[0] = h
            try:
                self._check_slot(node, -1)
            except BaseException:
                slot[0] = old
                raise
        except BaseException as exc:
            self._abort()
            _refuse(exc, pre)
        self._commit(("head", node, -1))

    def scratch_bytes(self, int node):
        self._check_node(node, -1, True)
        return mn_node_scratch_bytes(&self.e, node)

    def finalize(self, partials, scratches):
        """Hand each node its partial-output buffer ([t_max, hidden] float32) and
        its scratch (uint8, >= scratch_bytes(node)), then validate everything."""
        cdef char err[512]
        self._check_open()
        if len(partials) != self.e.n_nodes or len(scratches) != self.e.n_nodes:
            raise _ShapeError(f"finalize: one partial buffer and one scratch per node ({self.e.n_nodes})")
        keep = []
        for i in range(self.e.n_nodes):
            part, scr = partials[i], scratches[i]
            if not (isinstance(part, np.ndarray) and part.dtype == np.float32 and part.flags.c_contiguous
                    and part.flags.writeable and part.size >= self.e.t_max * self.e.hidden):
                raise _ShapeError(f"node {i}: partial buffer must be a writable C-contiguous float32 array of at "
                                  f"least {self.e.t_max * self.e.hidden} values")
            if not (isinstance(scr, np.ndarray) and scr.dtype == np.uint8 and scr.flags.c_contiguous
                    and scr.flags.writeable):
                raise _ShapeError(f"node {i}: scratch must be a writable C-contiguous uint8 array")
            if scr.nbytes < mn_node_scratch_bytes(&self.e, i):
                raise _ShapeError(f"node {i}: scratch of {scr.nbytes} bytes, needs {mn_node_scratch_bytes(&self.e, i)}")
            keep += [part, scr]
        for i in range(self.e.n_nodes):
            self.e.nodes[i].partial = <float *><size_t>partials[i].ctypes.data
            self.e.nodes[i].scratch = <uint8_t *><size_t>scratches[i].ctypes.data
            self.e.nodes[i].scratch_bytes = scratches[i].nbytes
        shared = np.zeros(mn_engine_shared_bytes(&self.e), np.uint8)   # what routed MoE blocks share
        keep.append(shared)
        self.e.shared = <uint8_t *><size_t>shared.ctypes.data
        self.e.shared_bytes = shared.nbytes
        self._keep = keep
        if mn_engine_check(&self.e, err, sizeof(err)) != 0:
            raise _ShapeError(err.decode())
        self._ready = True

    # -- running -------------------------------------------------------------
    cdef float *_x(self, x, int64_t *T) except NULL:
        self._check_open()
        if not self._ready:
            raise _ShapeError("NativeEngine.finalize() was not called")
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous
                and x.flags.writeable and x.shape[1] == self.e.hidden):
            raise _ShapeError(f"x must be a writable C-contiguous float32 array [T, {self.e.hidden}]")
        T[0] = x.shape[0]
        if T[0] < 1 or T[0] > self.e.t_max:
            raise _ShapeError(f"a block call takes 1..{self.e.t_max} tokens, got {T[0]}")
        return <float *><size_t>x.ctypes.data

    cdef _rc(self, int rc, str what):
        if rc != 0:
            raise _ShapeError(f"{what}: {mn_engine_strerror(rc).decode()}")

    cdef float *_logits(self, logits, int64_t rows) except NULL:
        """The head's output buffer for `rows` tokens, checked."""
        if not (isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.flags.c_contiguous
                and logits.flags.writeable and logits.ndim == 2 and logits.shape[0] >= rows
                and logits.shape[1] == self.e.nodes[0].head.vocab):
            raise _ShapeError(f"logits must be a writable C-contiguous float32 array "
                              f"[>= {rows}, {self.e.nodes[0].head.vocab}]")
        return <float *><size_t>logits.ctypes.data

    cdef tuple _pos_slot(self, pos, slot, int64_t T):
        """Token t's position and cache slot as contiguous int64 / int32 arrays of T entries,
        range-checked (in C too)."""
        pos_a = np.ascontiguousarray(pos, dtype=np.int64)
        slot_a = np.ascontiguousarray(slot, dtype=np.int32)
        if pos_a.shape != (T,) or slot_a.shape != (T,):
            raise _ShapeError(f"pos and slot need {T} entries each, got {pos_a.shape} and {slot_a.shape}")
        if T and (pos_a.min() < 0 or pos_a.max() >= self._n_ctx):
            raise _ShapeError(f"positions must be in [0, {self._n_ctx}), got {pos_a.min()}..{pos_a.max()}")
        if T and (slot_a.min() < 0 or slot_a.max() >= self._n_slots):
            raise _ShapeError(f"slots must be in [0, {self._n_slots}), got {slot_a.min()}..{slot_a.max()}")
        return pos_a, slot_a

    def attention(self, int layer, x, int64_t pos0):
        """x += attention of `layer` at positions pos0.. (updates the KV caches)."""
        cdef int64_t T
        cdef float *px = self._x(x, &T)
        cdef int rc
        with nogil:
            rc = mn_engine_attention(&self.e, layer, px, T, pos0)
        self._rc(rc, f"attention(layer={layer}, T={T}, pos0={pos0})")

    def attention_batch(self, int layer, x, pos, slot):
        """x += attention of `layer`, token t at position pos[t] of cache slot slot[t]
        (int64 / int32 arrays of T entries). Positions and slots are range-checked (in C
        too); a (slot, position) given twice is the caller's bug (EngineBackend.forward_batch checks)."""
        cdef int64_t T
        cdef float *px = self._x(x, &T)
        cdef int rc
        pos_a, slot_a = self._pos_slot(pos, slot, T)
        cdef const int64_t *pp = <const int64_t *><size_t>pos_a.ctypes.data
        cdef const int32_t *ps = <const int32_t *><size_t>slot_a.ctypes.data
        with nogil:
            rc = mn_engine_attention_batch(&self.e, layer, px, T, pp, ps)
        self._rc(rc, f"attention_batch(layer={layer}, T={T})")

    def ffn(self, int layer, x):
        cdef int64_t T
        cdef float *px = self._x(x, &T)
        cdef int rc
        with nogil:
            rc = mn_engine_ffn(&self.e, layer, px, T)
        self._rc(rc, f"ffn(layer={layer}, T={T})")

    def head(self, x, logits):
        cdef int64_t T
        cdef float *px = self._x(x, &T)
        cdef int rc
        cdef float *pl = self._logits(logits, T)
        with nogil:
            rc = mn_engine_head(&self.e, px, T, pl)
        self._rc(rc, f"head(T={T})")

    def forward(self, x, int64_t pos0=0, pos=None, slot=None, logits=None, int64_t logit_from=0):
        """The whole step in one native call: every layer (attention then FFN) on x, at
        positions pos0.. (or pos[t] of slot[t], as attention_batch), then, if `logits` is
        given, logits[:T - logit_from] = head(x[logit_from:])."""
        cdef int64_t T
        cdef float *px = self._x(x, &T)
        cdef int rc
        cdef const int64_t *pp = NULL
        cdef const int32_t *ps = NULL
        cdef float *pl = NULL
        if (pos is None) != (slot is None):
            raise _ShapeError("forward: give pos and slot together, or neither")
        if pos is not None:
            pos_a, slot_a = self._pos_slot(pos, slot, T)
            pp = <const int64_t *><size_t>pos_a.ctypes.data
            ps = <const int32_t *><size_t>slot_a.ctypes.data
        if logits is not None:
            if not 0 <= logit_from < T:
                raise _ShapeError(f"forward: logit_from={logit_from} outside 0..{T - 1}")
            pl = self._logits(logits, T - logit_from)
        with nogil:
            rc = mn_engine_forward(&self.e, px, T, pos0, pp, ps, logit_from, pl)
        self._rc(rc, f"forward(T={T}, pos0={pos0})")

    @property
    def reduce_parallel_min(self):
        """T x hidden x nodes from which the partials are summed by every pool (0: the default)."""
        return self.e.reduce_parallel_min

    @reduce_parallel_min.setter
    def reduce_parallel_min(self, int64_t v):
        self.e.reduce_parallel_min = max(v, 0)

    @property
    def route_split_min(self):
        """On several nodes a MoE block's router runs once, split over the nodes: from this many
        tokens each node normalises, scores and routes its share of the tokens, below it runs its
        share of the router's rows (0: the default, 4; -1: every node runs the whole router)."""
        return self.e.route_split_min

    @route_split_min.setter
    def route_split_min(self, int64_t v):
        self.e.route_split_min = max(v, -1)

    @property
    def moe_share_min(self):
        """From this many tokens, a node that has run out of its own MoE chunks runs what is left
        of the other nodes' (0: the default, 64; -1: never)."""
        return self.e.moe_share_min

    @moe_share_min.setter
    def moe_share_min(self, int64_t v):
        self.e.moe_share_min = max(v, -1)

    @property
    def attn_share_min(self):
        """From this many tokens, attention's projections run in fixed chunks of rows, and a node
        that has run out of its own runs what is left of the others' (0: the default, 64; -1:
        never, each node splits its own rows over its threads)."""
        return self.e.attn_share_min

    @attn_share_min.setter
    def attn_share_min(self, int64_t v):
        self.e.attn_share_min = max(v, -1)

    def stats(self):
        self._check_open()
        return {"syncs": self.e.syncs, "wait_ns": self.e.wait_ns, "crit_ns": self.e.crit_ns,
                "ffn_crit_ns": self.e.ffn_crit_ns,
                "busy_ns": [self.e.nodes[i].busy_ns for i in range(self.e.n_nodes)],
                "idle_ns": [self.e.nodes[i].idle_ns for i in range(self.e.n_nodes)],
                "ffn_busy_ns": [self.e.nodes[i].ffn_busy_ns for i in range(self.e.n_nodes)],
                "moe_assign": [self.e.nodes[i].moe_assign for i in range(self.e.n_nodes)],
                "moe_taken": [mn_engine_moe_taken(&self.e, i, 0) for i in range(self.e.n_nodes)],
                "attn_taken": [mn_engine_attn_taken(&self.e, i, 0) for i in range(self.e.n_nodes)]}

    def reset_stats(self):
        self._check_open()
        self.e.syncs = 0
        self.e.wait_ns = 0
        self.e.crit_ns = 0
        self.e.ffn_crit_ns = 0
        for i in range(self.e.n_nodes):
            self.e.nodes[i].busy_ns = 0
            self.e.nodes[i].idle_ns = 0
            self.e.nodes[i].ffn_busy_ns = 0
            self.e.nodes[i].moe_assign = 0
            mn_engine_moe_taken(&self.e, i, 1)
            mn_engine_attn_taken(&self.e, i, 1)
