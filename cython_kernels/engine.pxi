# The NUMA engine's native core, seen from Python (included by native.pyx).
# moe_numa.engine builds the per-node shards in node memory and hands them here;
# a forward step is then one call per block (attention, ffn) and one for the
# head, each releasing the GIL and synchronising the nodes once.
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

import numpy as np

cdef extern from "mn_engine.h":
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
        float *cache_k
        float *cache_v
        float *cache_lat
        float *cache_ktiles

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

    size_t mn_node_scratch_bytes(const mn_engine *e, int node)
    int mn_engine_check(const mn_engine *e, char *err, size_t errlen)
    void mn_engine_attention(mn_engine *e, int layer, float *x, int64_t T, int64_t pos0) nogil
    void mn_engine_attention_batch(mn_engine *e, int layer, float *x, int64_t T, const int64_t *pos,
                                   const int32_t *slot) nogil
    void mn_engine_ffn(mn_engine *e, int layer, float *x, int64_t T) nogil
    void mn_engine_head(mn_engine *e, const float *x, int64_t T, float *logits) nogil

ATTN_KINDS = {"none": 0, "gqa": 1, "mla": 2, "mla_mha": 3}
FFN_KINDS = {"none": 0, "dense": 1, "moe": 2}


cdef class NativeEngine:
    """Per-node layer shards and the block calls. Arrays handed in must stay
    alive as long as the engine: it keeps a reference to each of them."""
    cdef mn_engine e
    cdef list _keep
    cdef list _pools
    cdef list _mallocs
    cdef bint _ready
    cdef int64_t _n_ctx
    cdef int _n_slots

    def __cinit__(self, pools, int n_layers, int64_t hidden, int64_t t_max):
        n = len(pools)
        if n < 1:
            raise ValueError("NativeEngine needs at least one pool")
        self._keep = []
        self._pools = list(pools)
        self._mallocs = []
        self._ready = False
        self._n_ctx = -1
        self._n_slots = -1
        memset(&self.e, 0, sizeof(mn_engine))
        self.e.n_nodes = n
        self.e.n_layers = n_layers
        self.e.hidden = hidden
        self.e.t_max = t_max
        self.e.nodes = <mn_node *>calloc(n, sizeof(mn_node))
        if self.e.nodes == NULL:
            raise MemoryError()
        for i in range(n):
            self.e.nodes[i].pool = (<Pool?>pools[i]).p
            self.e.nodes[i].attn = <mn_attn_layer *>calloc(max(n_layers, 1), sizeof(mn_attn_layer))
            self.e.nodes[i].ffn = <mn_ffn_layer *>calloc(max(n_layers, 1), sizeof(mn_ffn_layer))
            if self.e.nodes[i].attn == NULL or self.e.nodes[i].ffn == NULL:
                raise MemoryError()

    def __dealloc__(self):
        cdef int i
        if self.e.nodes != NULL:
            for i in range(self.e.n_nodes):
                free(self.e.nodes[i].attn)
                free(self.e.nodes[i].ffn)
            free(self.e.nodes)
            self.e.nodes = NULL
        for ptr in self._mallocs:
            free(<void *><size_t>ptr)

    # -- building ------------------------------------------------------------
    cdef const float *_f(self, a) except? NULL:
        if a is None:
            return NULL
        arr = np.ascontiguousarray(a, dtype=np.float32)
        self._keep.append(arr)
        return <const float *><size_t>arr.ctypes.data

    cdef float *_fw(self, a) except? NULL:
        if a is None:
            return NULL
        if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable):
            raise ValueError("cache and output buffers must be writable C-contiguous float32 arrays")
        self._keep.append(a)
        return <float *><size_t>a.ctypes.data

    cdef mn_mat _mat(self, m) except *:
        """m: None, or (qtype, raw uint8 [rows, row_bytes], cols)."""
        cdef mn_mat r
        memset(&r, 0, sizeof(mn_mat))
        if m is None:
            return r
        qtype, raw, cols = m
        if not (isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.ndim == 2):
            raise ValueError("weight shards must be 2-D uint8 arrays of GGML blocks")
        if raw.strides[1] != 1:
            raise ValueError("weight shard rows must be contiguous")
        rb = mn_row_bytes(int(qtype), int(cols))
        if rb == 0 or rb != raw.shape[1]:
            raise ValueError(f"weight shard of type {qtype} has {raw.shape[1]} bytes per row, expected {rb} "
                             f"for {cols} columns")
        self._keep.append(raw)
        r.type = int(qtype)
        r.data = <const uint8_t *><size_t>raw.ctypes.data
        r.stride = raw.strides[0]
        r.rows = raw.shape[0]
        r.cols = cols
        return r

    cdef void *_malloc(self, size_t n) except NULL:
        cdef void *p = calloc(n if n else 1, 1)
        if p == NULL:
            raise MemoryError()
        self._mallocs.append(<size_t>p)
        return p

    def set_attention(self, int node, int layer, dict p):
        cdef mn_attn_layer *L = &self.e.nodes[node].attn[layer]
        cdef mn_mat *mats
        cdef int n, h
        memset(L, 0, sizeof(mn_attn_layer))
        L.kind = ATTN_KINDS[p["kind"]]
        L.hidden = p["hidden"]
        L.rms_eps = p["rms_eps"]
        L.norm_eps = p.get("norm_eps", p["rms_eps"])
        L.kq_scale = p["kq_scale"]
        L.attn_norm = self._f(p["attn_norm"])
        L.n_head = p["n_head"]
        L.n_kv = p.get("n_kv", p["n_head"])
        q2kv = np.ascontiguousarray(p.get("q2kv", np.arange(L.n_head)), dtype=np.int32)
        self._keep.append(q2kv)
        L.q2kv = <const int32_t *><size_t>q2kv.ctypes.data
        L.qk_dim = p["qk_dim"]
        L.v_dim = p["v_dim"]
        L.rope_off = p.get("rope_off", 0)
        L.rope_dims = p["rope_dims"]
        L.rope_neox = p["rope_neox"]
        L.rope_cos = self._f(p["rope_cos"])
        L.rope_sin = self._f(p["rope_sin"])
        L.wq = self._mat(p.get("wq"))
        L.wk = self._mat(p.get("wk"))
        L.wv = self._mat(p.get("wv"))
        L.wo = self._mat(p.get("wo"))
        L.bq = self._f(p.get("bq"))
        L.bk = self._f(p.get("bk"))
        L.bv = self._f(p.get("bv"))
        L.q_norm = self._f(p.get("q_norm"))
        L.k_norm = self._f(p.get("k_norm"))
        L.q_lora = p.get("q_lora", 0)
        L.kv_lora = p.get("kv_lora", 0)
        L.nope = p.get("nope", 0)
        L.wq_a = self._mat(p.get("wq_a"))
        L.wq_b = self._mat(p.get("wq_b"))
        L.wkv_a = self._mat(p.get("wkv_a"))
        L.wkv_b = self._mat(p.get("wkv_b"))
        L.q_a_norm = self._f(p.get("q_a_norm"))
        L.kv_a_norm = self._f(p.get("kv_a_norm"))
        if p.get("k_b") is not None:
            n = len(p["k_b"])
            mats = <mn_mat *>self._malloc(2 * max(n, 1) * sizeof(mn_mat))
            for h in range(n):
                mats[h] = self._mat(p["k_b"][h])
                mats[n + h] = self._mat(p["v_b"][h])
            L.k_b = mats
            L.v_b = mats + n
        L.n_ctx = p["n_ctx"]
        L.n_slots = p.get("n_slots", 1)
        if L.n_ctx < 1 or L.n_slots < 1:
            raise ValueError(f"layer {layer}: n_ctx ({L.n_ctx}) and n_slots ({L.n_slots}) must be >= 1")
        if self._n_ctx >= 0 and (self._n_ctx, self._n_slots) != (L.n_ctx, L.n_slots):
            raise ValueError(f"layer {layer}: every layer needs the same n_ctx and n_slots")
        self._n_ctx, self._n_slots = L.n_ctx, L.n_slots
        L.cache_k = self._fw(p.get("cache_k"))
        L.cache_v = self._fw(p.get("cache_v"))
        L.cache_lat = self._fw(p.get("cache_lat"))
        L.cache_ktiles = self._fw(p.get("cache_ktiles"))

    def set_ffn(self, int node, int layer, dict p):
        cdef mn_ffn_layer *L = &self.e.nodes[node].ffn[layer]
        cdef const uint8_t **ptrs
        cdef int e, k
        memset(L, 0, sizeof(mn_ffn_layer))
        L.kind = FFN_KINDS[p["kind"]]
        L.hidden = p["hidden"]
        L.rms_eps = p["rms_eps"]
        L.ffn_norm = self._f(p["ffn_norm"])
        if L.kind == 2:
            L.n_expert = p["n_expert"]
            L.n_used = p["n_used"]
            L.gating = p["gating"]
            L.norm_w = p["norm_w"]
            L.n_groups = p["n_groups"]
            L.n_groups_used = p["n_groups_used"]
            L.group_rule = p["group_rule"]
            L.w_scale = p["w_scale"]
            L.router = self._mat(p["router"])
            L.probs_bias = self._f(p.get("probs_bias"))
            L.gate_type, L.up_type, L.down_type = p["expert_types"]
            L.inter = p["inter"]
            ptrs = <const uint8_t **>self._malloc(3 * L.n_expert * sizeof(void *))
            L.gate_ptrs = ptrs
            L.up_ptrs = ptrs + L.n_expert
            L.down_ptrs = ptrs + 2 * L.n_expert
            strides = [0, 0, 0]
            split = any(len(mats) == 4 for mats in p["experts"].values())
            if split:   # some local experts are slices: per-expert intermediate size and down stride
                inter_of = np.zeros(L.n_expert, dtype=np.int64)
                down_stride_of = np.zeros(L.n_expert, dtype=np.uint64)
                self._keep += [inter_of, down_stride_of]
                L.inter_of = <const int64_t *><size_t>inter_of.ctypes.data
                L.down_stride_of = <const size_t *><size_t>down_stride_of.ctypes.data
            for e, mats in p["experts"].items():      # expert id -> (gate raw, up raw, down raw[, local inter])
                if not 0 <= e < L.n_expert:
                    raise ValueError(f"expert {e} out of range 0..{L.n_expert - 1}")
                ie = mats[3] if len(mats) == 4 else L.inter
                if not (0 < ie <= L.inter and mats[0].shape[0] == ie and mats[1].shape[0] == ie
                        and mats[2].shape[1] == mn_row_bytes(L.down_type, ie) and mats[2].strides[1] == 1):
                    raise ValueError(f"expert {e}: shards do not hold {ie} intermediate rows")
                for k in range(3):
                    raw = mats[k]
                    self._keep.append(raw)
                    ptrs[k * L.n_expert + e] = <const uint8_t *><size_t>raw.ctypes.data
                    if k < 2 or not split:
                        strides[k] = raw.strides[0]
                if split:
                    inter_of[e] = ie
                    down_stride_of[e] = mats[2].strides[0]
            L.gate_stride, L.up_stride, L.down_stride = strides
            L.node_id = p.get("node_id", node)
            L.n_nodes = p.get("n_nodes", self.e.n_nodes)
            if p.get("repl_nodes") is not None:
                repl = np.ascontiguousarray(p["repl_nodes"], dtype=np.uint64)
                share = np.ascontiguousarray(p["node_share"], dtype=np.float32)
                if repl.shape != (L.n_expert,) or share.shape != (L.n_nodes, L.n_expert):
                    raise ValueError("repl_nodes must be [n_expert] and node_share [n_nodes, n_expert]")
                self._keep += [repl, share]
                L.repl_nodes = <const uint64_t *><size_t>repl.ctypes.data
                L.node_share = <const float *><size_t>share.ctypes.data
            counts = p["expert_tokens"]
            if not (counts.dtype == np.int64 and counts.flags.c_contiguous and counts.shape == (L.n_expert,)):
                raise ValueError("expert_tokens must be a C-contiguous int64 array of n_expert counters")
            self._keep.append(counts)
            L.expert_tokens = <int64_t *><size_t>counts.ctypes.data
        L.sh_ff = p.get("sh_ff", 0)
        if L.sh_ff:
            L.sh_gate = self._mat(p["sh_gate"])
            L.sh_up = self._mat(p["sh_up"])
            L.sh_down = self._mat(p["sh_down"])
        L.sh_gate_vec = self._f(p.get("sh_gate_vec"))

    def set_head(self, int node, dict p):
        cdef mn_head_shard *h = &self.e.nodes[node].head
        memset(h, 0, sizeof(mn_head_shard))
        h.hidden = p["hidden"]
        h.vocab = p["vocab"]
        h.rms_eps = p["rms_eps"]
        h.norm = self._f(p["norm"])
        h.out = self._mat(p.get("out"))
        h.v0 = p.get("v0", 0)

    def scratch_bytes(self, int node):
        return mn_node_scratch_bytes(&self.e, node)

    def finalize(self, partials, scratches):
        """Hand each node its partial-output buffer ([t_max, hidden] float32) and
        its scratch (uint8, >= scratch_bytes(node)), then validate everything."""
        cdef char err[512]
        for i in range(self.e.n_nodes):
            part, scr = partials[i], scratches[i]
            if part.size < self.e.t_max * self.e.hidden:
                raise ValueError(f"node {i}: partial buffer too small")
            if scr.nbytes < mn_node_scratch_bytes(&self.e, i):
                raise ValueError(f"node {i}: scratch of {scr.nbytes} bytes, needs {mn_node_scratch_bytes(&self.e, i)}")
            self.e.nodes[i].partial = self._fw(part)
            self._keep.append(scr)
            self.e.nodes[i].scratch = <uint8_t *><size_t>scr.ctypes.data
            self.e.nodes[i].scratch_bytes = scr.nbytes
        if mn_engine_check(&self.e, err, sizeof(err)) != 0:
            raise ValueError(err.decode())
        self._ready = True

    # -- running -------------------------------------------------------------
    cdef float *_x(self, x, int64_t *T) except NULL:
        if not self._ready:
            raise RuntimeError("NativeEngine.finalize() was not called")
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous
                and x.flags.writeable and x.shape[1] == self.e.hidden):
            raise ValueError(f"x must be a writable C-contiguous float32 array [T, {self.e.hidden}]")
        T[0] = x.shape[0]
        if T[0] < 1 or T[0] > self.e.t_max:
            raise ValueError(f"a block call takes 1..{self.e.t_max} tokens, got {T[0]}")
        return <float *><size_t>x.ctypes.data

    def attention(self, int layer, x, int64_t pos0):
        """x += attention of `layer` at positions pos0.. (updates the KV caches)."""
        cdef int64_t T
        cdef float *px = self._x(x, &T)
        if not 0 <= layer < self.e.n_layers:
            raise IndexError(f"layer {layer} out of range")
        with nogil:
            mn_engine_attention(&self.e, layer, px, T, pos0)

    def attention_batch(self, int layer, x, pos, slot):
        """x += attention of `layer`, token t at position pos[t] of cache slot slot[t]
        (int64 / int32 arrays of T entries). Positions and slots are range-checked here;
        a (slot, position) given twice is the caller's bug (EngineBackend.forward_batch checks)."""
        cdef int64_t T
        cdef float *px = self._x(x, &T)
        if not 0 <= layer < self.e.n_layers:
            raise IndexError(f"layer {layer} out of range")
        pos_a = np.ascontiguousarray(pos, dtype=np.int64)
        slot_a = np.ascontiguousarray(slot, dtype=np.int32)
        if pos_a.shape != (T,) or slot_a.shape != (T,):
            raise ValueError(f"pos and slot need {T} entries each, got {pos_a.shape} and {slot_a.shape}")
        if T and (pos_a.min() < 0 or pos_a.max() >= self._n_ctx):
            raise ValueError(f"positions must be in [0, {self._n_ctx}), got {pos_a.min()}..{pos_a.max()}")
        if T and (slot_a.min() < 0 or slot_a.max() >= self._n_slots):
            raise ValueError(f"slots must be in [0, {self._n_slots}), got {slot_a.min()}..{slot_a.max()}")
        cdef const int64_t *pp = <const int64_t *><size_t>pos_a.ctypes.data
        cdef const int32_t *ps = <const int32_t *><size_t>slot_a.ctypes.data
        with nogil:
            mn_engine_attention_batch(&self.e, layer, px, T, pp, ps)

    def ffn(self, int layer, x):
        cdef int64_t T
        cdef float *px = self._x(x, &T)
        if not 0 <= layer < self.e.n_layers:
            raise IndexError(f"layer {layer} out of range")
        with nogil:
            mn_engine_ffn(&self.e, layer, px, T)

    def head(self, x, logits):
        cdef int64_t T
        cdef float *px = self._x(x, &T)
        cdef float *pl = self._fw(logits)
        self._keep.pop()
        if logits.shape[0] < T or logits.size < T * self.e.nodes[0].head.vocab:
            raise ValueError("logits buffer too small")
        with nogil:
            mn_engine_head(&self.e, px, T, pl)

    def stats(self):
        return {"syncs": self.e.syncs, "wait_ns": self.e.wait_ns, "crit_ns": self.e.crit_ns,
                "ffn_crit_ns": self.e.ffn_crit_ns,
                "busy_ns": [self.e.nodes[i].busy_ns for i in range(self.e.n_nodes)],
                "idle_ns": [self.e.nodes[i].idle_ns for i in range(self.e.n_nodes)],
                "ffn_busy_ns": [self.e.nodes[i].ffn_busy_ns for i in range(self.e.n_nodes)],
                "moe_assign": [self.e.nodes[i].moe_assign for i in range(self.e.n_nodes)]}

    def reset_stats(self):
        self.e.syncs = 0
        self.e.wait_ns = 0
        self.e.crit_ns = 0
        self.e.ffn_crit_ns = 0
        for i in range(self.e.n_nodes):
            self.e.nodes[i].busy_ns = 0
            self.e.nodes[i].idle_ns = 0
            self.e.nodes[i].ffn_busy_ns = 0
            self.e.nodes[i].moe_assign = 0
