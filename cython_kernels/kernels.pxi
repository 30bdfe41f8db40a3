# Included by native.pyx.  Thin GIL-free wrappers over the C API.  Buffers are
# passed as integer addresses; moe_numa.kernels validates shapes, dtypes,
# contiguity and alignment and keeps the arrays alive during the call.

from libc.string cimport memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

_LEVEL_NAMES = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512vnni": 3}


def simd_level():
    """Name of the SIMD path the kernels dispatch to now."""
    return mn_simd_name(mn_active_level()).decode()


def simd_level_cpu():
    """Name of the best SIMD path this CPU supports."""
    return mn_simd_name(mn_simd_level_cpu()).decode()


def set_simd_level(name=None):
    """Force the kernels' SIMD path ('scalar', 'avx2', 'avx512', 'avx512vnni'),
    clamped to what the CPU supports; None goes back to CPUID/MOE_NUMA_SIMD.
    Call only while no kernel runs.  Returns the name now in force."""
    cdef int lvl = -1
    if name is not None:
        if name not in _LEVEL_NAMES:
            raise ValueError(f"unknown SIMD level {name!r}; expected one of {sorted(_LEVEL_NAMES)}")
        lvl = _LEVEL_NAMES[name]
    return mn_simd_name(mn_set_simd_level(lvl)).decode()


def prefetch_distance():
    """(bytes in force, this CPU's default, the most MOE_NUMA_PREFETCH may ask) of the
    kernels' software prefetch look-ahead."""
    mn_prefetch_init()
    return mn_pf_dist, mn_prefetch_default(), MN_PF_MAX


def enum_names(enum, prefix):
    """A C enum exposed by cpdef as {lower-case name without the prefix: member}."""
    return {m.name[len(prefix):].lower(): m for m in enum}


_ACT_NAMES = {int(m): (None if name == "none" else name) for name, m in enum_names(mn_act_format, "MN_ACT_").items()}


def type_table():
    """The C type table (mn_types.c), one dict per GGML type id it defines:
    id, name, block (values per block), type_size (bytes per block), act (the
    activation format of its dot product, None if the type is not multiplied
    with), scale_offsets (byte offsets of its fp16 block scales) and kernels
    (per SIMD level of this CPU, the level whose code runs it; empty if the
    kernels do not compute with it)."""
    cdef const mn_type_info *ti
    cdef int t, lv, k
    rows = []
    for t in range(MN_MAX_TYPE):
        ti = mn_type(t)
        if ti == NULL:
            continue
        kernels = {}
        for lv in range(MN_N_LEVELS):
            k = mn_kernel_level(t, lv)
            if k >= 0:
                kernels[mn_simd_name(lv).decode()] = mn_simd_name(k).decode()
        rows.append({"id": t, "name": ti.name.decode(), "block": ti.block, "type_size": ti.bytes,
                     "act": _ACT_NAMES[ti.act],
                     "scale_offsets": tuple(o for o in (ti.scale_off[0], ti.scale_off[1]) if o >= 0),
                     "kernels": kernels})
    return rows


def first_bad_block_ptr(int wtype, uintptr_t w, size_t row_stride, int64_t rows, int64_t cols):
    """mn_first_bad_block: flat index of the first block with a non-finite scale, -1 if none."""
    cdef int64_t r
    with nogil:
        r = mn_first_bad_block(wtype, <const uint8_t *>w, row_stride, rows, cols)
    return r


def type_supported(int wtype):
    return bool(mn_type_supported(wtype))


def block_size(int wtype):
    return int(mn_block_size(wtype))


def row_bytes(int wtype, int64_t cols):
    return int(mn_row_bytes(wtype, cols))


def act_row_bytes(int wtype, int64_t cols):
    return int(mn_act_row_bytes(wtype, cols))


def quantize_act_ptr(int wtype, uintptr_t x, int64_t x_stride, uintptr_t xq, size_t xq_stride,
                     int64_t cols, int64_t n):
    """Quantize n float rows (x_stride floats apart) into activation rows;
    returns the C error code (0: done)."""
    cdef int64_t t
    cdef int rc = 0
    with nogil:
        for t in range(n):
            rc = mn_quantize_act(wtype, <const float *>x + t * x_stride, <uint8_t *>xq + t * xq_stride, cols)
            if rc:
                break
    return rc


def silu_mul_ptr(uintptr_t g, uintptr_t u, int64_t n):
    """g[i] = silu(g[i]) * u[i] over n float32s, in place, at the active SIMD level."""
    with nogil:
        mn_silu_mul(<float *>g, <const float *>u, n)


def exp_sum_ptr(uintptr_t x, int64_t n, float shift):
    """x[i] = exp(x[i] - shift) over n float32s, in place; returns their sum."""
    cdef float s
    with nogil:
        s = mn_exp_sum(<float *>x, n, shift)
    return s


def max_of_ptr(uintptr_t x, int64_t n, float init):
    """max(init, x[0..n)) over float32s, NaNs passed over (flash attention's running max)."""
    cdef float m
    with nogil:
        m = mn_max_of(<const float *>x, n, init)
    return m


ctypedef struct mm_ctx:
    int wtype
    const uint8_t *w
    size_t ws
    int64_t cols
    int64_t rows
    const float *x
    int64_t x_stride
    uint8_t *xq
    size_t xqs
    int64_t n_tok
    float *out
    int64_t out_stride
    mn_pool *pool
    int rc


cdef void mm_task(void *c, int ith, int nth) noexcept nogil:
    cdef mm_ctx *m = <mm_ctx *>c
    cdef int64_t t
    cdef int rc = 0
    if m.x != NULL:
        t = ith
        while t < m.n_tok and rc == 0:
            rc = mn_quantize_act(m.wtype, m.x + t * m.x_stride, m.xq + t * m.xqs, m.cols)
            t += nth
        mn_pool_barrier(m.pool, ith)
    cdef int64_t r0 = m.rows * ith // nth
    cdef int64_t r1 = m.rows * (ith + 1) // nth
    if rc == 0:
        rc = mn_matmul_rows(m.wtype, m.w, m.ws, m.cols, m.xq, m.xqs, m.n_tok, m.out, m.out_stride, r0, r1)
    if rc:
        m.rc = rc      # any thread's error; they all see the same arguments


def matmul_ptr(int wtype, uintptr_t w, size_t w_stride, int64_t rows, int64_t cols,
               uintptr_t x, int64_t x_stride, int64_t n_tok, uintptr_t xq, size_t xq_stride,
               uintptr_t out, int64_t out_stride, Pool pool=None, bint prequantized=False):
    """out[t, r] = W[r] . x[t] for n_tok float rows x (quantized into xq first,
    unless prequantized: then xq already holds them).  Returns the C error
    code (0: done)."""
    cdef mm_ctx m
    m.rc = 0
    m.wtype = wtype; m.w = <const uint8_t *>w; m.ws = w_stride; m.cols = cols; m.rows = rows
    m.x = NULL if prequantized else <const float *>x
    m.x_stride = x_stride; m.xq = <uint8_t *>xq; m.xqs = xq_stride; m.n_tok = n_tok
    m.out = <float *>out; m.out_stride = out_stride
    m.pool = NULL if pool is None else pool.p
    if pool is not None and pool.p == NULL:
        raise ValueError("pool is closed")
    with nogil:
        if m.pool == NULL:
            mm_task(&m, 0, 1)
        else:
            mn_pool_run(m.pool, mm_task, &m)
    return m.rc


ctypedef struct sum_ctx:
    const float *x
    int64_t n
    double *res
    int prefetch


cdef void sum_task(void *c, int ith, int nth) noexcept nogil:
    cdef sum_ctx *s = <sum_ctx *>c
    cdef int64_t a = (s.n * ith // nth) & ~(<int64_t>15)
    cdef int64_t b = s.n if ith == nth - 1 else ((s.n * (ith + 1) // nth) & ~(<int64_t>15))
    s.res[ith] = mn_read_sum2(s.x + a, b - a, s.prefetch)


cdef void noop_task(void *c, int ith, int nth) noexcept nogil:
    pass


cdef inline int64_t _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000 + ts.tv_nsec


def read_sum_ptr(uintptr_t x, int64_t n, Pool pool=None, bint prefetch=False):
    """Sum of n floats, split among the pool's threads (a STREAM-like read)."""
    cdef double res[256]
    cdef sum_ctx s
    if pool is not None and pool.p == NULL:
        raise ValueError("pool is closed")
    cdef int nth = 1 if pool is None else mn_pool_size(pool.p)
    cdef int i
    cdef double tot = 0
    if nth > 256:
        raise ValueError("at most 256 threads")
    s.x = <const float *>x; s.n = n; s.res = res; s.prefetch = prefetch
    with nogil:
        if pool is None:
            sum_task(&s, 0, 1)
        else:
            mn_pool_run(pool.p, sum_task, &s)
    for i in range(nth):
        tot += res[i]
    return tot


cdef class Pool:
    """Low-level pool handle; use moe_numa.kernels.ThreadPool."""
    cdef mn_pool *p
    cdef public object cpus
    cdef public bint caller_is_worker0

    def __cinit__(self, cpus, bint caller_is_worker0=True):
        cdef int n = len(cpus)
        cdef int *c = <int *>malloc(sizeof(int) * max(n, 1))
        cdef char err[512]
        cdef int i
        err[0] = 0
        self.p = NULL
        if c == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                c[i] = int(cpus[i])
            with nogil:
                self.p = mn_pool_create(c, n, caller_is_worker0, err, sizeof(err))
        finally:
            free(c)
        if self.p == NULL:
            raise ValueError(err.decode())
        self.cpus = list(cpus)
        self.caller_is_worker0 = caller_is_worker0

    def __dealloc__(self):
        if self.p != NULL:
            with nogil:
                mn_pool_destroy(self.p)
            self.p = NULL

    def close(self):
        if self.p != NULL:
            with nogil:
                mn_pool_destroy(self.p)
            self.p = NULL

    @property
    def closed(self):
        return self.p == NULL

    @property
    def size(self):
        return 0 if self.p == NULL else mn_pool_size(self.p)

    def set_spin_ns(self, int64_t ns):
        self._check()
        mn_pool_set_spin_ns(self.p, ns)

    cdef _check(self):
        if self.p == NULL:
            raise ValueError("pool is closed")

    def stats(self):
        self._check()
        cdef int n = mn_pool_size(self.p)
        cdef mn_thread_stats *st = <mn_thread_stats *>malloc(sizeof(mn_thread_stats) * n)
        cdef int i
        try:
            mn_pool_stats(self.p, st, n)
            return {"threads": n, "cpus": list(self.cpus),
                    "tasks": [st[i].tasks for i in range(n)],
                    "busy_ns": [st[i].busy_ns for i in range(n)],
                    "wait_ns": [st[i].wait_ns for i in range(n)]}
        finally:
            free(st)

    def reset_stats(self):
        self._check()
        mn_pool_reset_stats(self.p)

    def noop_latency(self, int n):
        """Run n empty tasks; list of the ns each took from submit to wait's return."""
        self._check()
        cdef int64_t *t = <int64_t *>malloc(sizeof(int64_t) * max(n, 1))
        cdef int i
        cdef int64_t t0
        try:
            with nogil:
                for i in range(n):
                    t0 = _now()
                    mn_pool_run(self.p, noop_task, NULL)
                    t[i] = _now() - t0
            return [t[i] for i in range(n)]
        finally:
            free(t)


def check_cpus(cpus):
    """Raise ValueError naming the first CPU that does not exist / is not allowed."""
    cdef int n = len(cpus)
    cdef int *c = <int *>malloc(sizeof(int) * max(n, 1))
    cdef char err[512]
    cdef int i, rc
    try:
        for i in range(n):
            c[i] = int(cpus[i])
        rc = mn_check_cpus(c, n, err, sizeof(err))
    finally:
        free(c)
    if rc:
        raise ValueError(err.decode())


def moe_scratch_bytes(int gate_type, int up_type, int down_type, int64_t hidden, int64_t inter,
                      int n_expert, int64_t n_assign, int64_t n_tok):
    cdef mn_moe_args a
    memset(&a, 0, sizeof(a))
    a.gate_type = gate_type; a.up_type = up_type; a.down_type = down_type
    a.hidden = hidden; a.inter = inter; a.n_expert = n_expert; a.n_assign = n_assign; a.n_tok = n_tok
    return int(mn_moe_scratch_bytes(&a))


def moe_ptr(int gate_type, int up_type, int down_type, int64_t hidden, int64_t inter, int n_expert,
            uintptr_t gate, size_t gate_stride, uintptr_t up, size_t up_stride,
            uintptr_t down, size_t down_stride,
            int64_t n_assign, uintptr_t expert, uintptr_t token, uintptr_t weight,
            uintptr_t x, int64_t n_tok, int64_t x_stride, uintptr_t out, int64_t out_stride,
            uintptr_t scratch, size_t scratch_bytes, Pool pool=None):
    """Fused MoE layer (see mn_moe_args).  gate/up/down: addresses of arrays of
    n_expert row-pointer values (uint64)."""
    cdef mn_moe_args a
    cdef char err[512]
    memset(&a, 0, sizeof(a))
    a.gate_type = gate_type; a.up_type = up_type; a.down_type = down_type
    a.hidden = hidden; a.inter = inter; a.n_expert = n_expert
    a.gate = <const uint8_t *const *>gate; a.gate_stride = gate_stride
    a.up = <const uint8_t *const *>up; a.up_stride = up_stride
    a.down = <const uint8_t *const *>down; a.down_stride = down_stride
    a.n_assign = n_assign
    a.expert = <const int32_t *>expert; a.token = <const int32_t *>token; a.weight = <const float *>weight
    a.x = <const float *>x; a.n_tok = n_tok; a.x_stride = x_stride
    a.out = <float *>out; a.out_stride = out_stride
    a.scratch = <void *>scratch; a.scratch_bytes = scratch_bytes
    if pool is not None:
        if pool.p == NULL:
            raise ValueError("pool is closed")
        a.pool = pool.p
    if mn_moe_check(&a, err, sizeof(err)):
        raise ValueError(err.decode())
    with nogil:
        mn_moe_experts(&a)


# ---------------------------------------------------------------- test hooks
cdef extern from "<sched.h>" nogil:
    int sched_getcpu()

ctypedef struct probe_ctx:
    int *seen_cpu
    int *count
    int *violations
    int n_phases
    int *phase
    mn_pool *pool


cdef void probe_task(void *c, int ith, int nth) noexcept nogil:
    cdef probe_ctx *p = <probe_ctx *>c
    cdef int k, j
    p.seen_cpu[ith] = sched_getcpu()
    p.count[ith] += 1
    for k in range(p.n_phases):
        p.phase[ith] = k
        mn_pool_barrier(p.pool, ith)
        for j in range(nth):        # after the barrier every thread is at phase k
            if p.phase[j] != k:
                p.violations[ith] += 1
        mn_pool_barrier(p.pool, ith)


def _probe_pools(pools, int iters, int n_phases):
    """Test hook: submit a probe task to every pool, then wait for each, iters
    times (several pools in flight at once).  Each task records the CPU of every
    thread, counts runs per thread and checks n_phases barriers.  Returns a list
    per pool of (cpus seen, runs per thread, barrier violations)."""
    cdef int np_ = len(pools)
    cdef int i, k, it, n
    cdef Pool pl
    ctxs = []
    cdef probe_ctx *cs = <probe_ctx *>malloc(sizeof(probe_ctx) * np_)
    cdef mn_pool **ps = <mn_pool **>malloc(sizeof(mn_pool *) * np_)
    cdef int *buf
    if cs == NULL or ps == NULL:
        free(cs); free(ps)
        raise MemoryError()
    memset(cs, 0, sizeof(probe_ctx) * np_)    # the finally frees every entry's buffer, set or not
    try:
        for i in range(np_):
            pl = pools[i]
            pl._check()
            n = mn_pool_size(pl.p)
            buf = <int *>malloc(sizeof(int) * 4 * n)
            memset(buf, 0, sizeof(int) * 4 * n)
            cs[i].seen_cpu = buf; cs[i].count = buf + n; cs[i].violations = buf + 2 * n; cs[i].phase = buf + 3 * n
            cs[i].n_phases = n_phases; cs[i].pool = pl.p
            ps[i] = pl.p
        with nogil:
            for it in range(iters):
                for i in range(np_):
                    mn_pool_submit(ps[i], probe_task, &cs[i])
                for i in range(np_):
                    mn_pool_wait(ps[i])
        res = []
        for i in range(np_):
            n = mn_pool_size(ps[i])
            res.append(([cs[i].seen_cpu[k] for k in range(n)], [cs[i].count[k] for k in range(n)],
                        sum(cs[i].violations[k] for k in range(n))))
        return res
    finally:
        for i in range(np_):
            free(cs[i].seen_cpu)
        free(cs); free(ps)


cdef extern from "<time.h>" nogil:
    int CLOCK_THREAD_CPUTIME_ID


def _time_rows(int wtype, uintptr_t w, size_t w_stride, int64_t rows, int64_t cols,
               uintptr_t xq, size_t xq_stride, int64_t n_tok, uintptr_t out, int iters):
    """Benchmark hook: thread-CPU ns of iters calls of mn_matmul_rows on
    prequantized activations (no Python in the loop)."""
    cdef timespec a, b
    cdef int i
    with nogil:
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a)
        for i in range(iters):
            mn_matmul_rows(wtype, <const uint8_t *>w, w_stride, cols, <const void *>xq, xq_stride, n_tok,
                           <float *>out, rows, 0, rows)
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b)
    return (b.tv_sec - a.tv_sec) * 1000000000 + (b.tv_nsec - a.tv_nsec)
