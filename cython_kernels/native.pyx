# cython: language_level=3
"""moe_numa._native: the compiled kernels (CPU dispatch, quantized matmul,
node-local thread pools, fused MoE) and the GGUF string-array scan. Python code uses it through moe_numa.kernels,
which validates arguments; the functions here trust their inputs' shapes."""

from libc.stdint cimport int64_t, int32_t, uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free

cdef extern from "mn_cpu.h":
    int mn_simd_level() nogil
    int mn_simd_level_cpu() nogil
    const char *mn_simd_name(int level) nogil
    int mn_pf_dist
    int MN_PF_MAX
    void mn_prefetch_init() nogil
    int mn_prefetch_default() nogil

cdef extern from "mn_kernels.h":
    # One definition, in the header; Python sees IntEnums with the C values.
    cpdef enum mn_ggml_type:
        MN_F32, MN_F16, MN_Q4_0, MN_Q4_1, MN_Q5_0, MN_Q5_1, MN_Q8_0, MN_Q8_1, MN_Q2_K, MN_Q3_K, MN_Q4_K, MN_Q5_K
        MN_Q6_K, MN_Q8_K, MN_IQ2_XXS, MN_IQ2_XS, MN_IQ3_XXS, MN_IQ1_S, MN_IQ4_NL, MN_IQ3_S, MN_IQ2_S, MN_IQ4_XS
        MN_I8, MN_I16, MN_I32, MN_I64, MN_F64, MN_IQ1_M, MN_BF16, MN_TQ1_0, MN_TQ2_0, MN_MXFP4, MN_NVFP4, MN_Q1_0
    cpdef enum mn_act_format:
        MN_ACT_NONE, MN_ACT_FLOAT, MN_ACT_Q8_0, MN_ACT_Q8_K
    int MN_TILE
    int mn_active_level() nogil
    int mn_set_simd_level(int level) nogil
    int MN_MAX_TYPE
    int MN_N_LEVELS
    ctypedef struct mn_type_info:
        const char *name
        int32_t block
        int32_t bytes
        int32_t act
        int32_t scale_off[2]
    const mn_type_info *mn_type(int wtype) nogil
    int mn_kernel_level(int wtype, int level) nogil
    int64_t mn_first_bad_block(int wtype, const uint8_t *w, size_t row_stride, int64_t rows, int64_t cols) nogil
    int mn_type_supported(int wtype) nogil
    int64_t mn_block_size(int wtype) nogil
    size_t mn_row_bytes(int wtype, int64_t cols) nogil
    size_t mn_act_row_bytes(int wtype, int64_t cols) nogil
    int mn_quantize_act(int wtype, const float *x, void *xq, int64_t cols) nogil
    void mn_silu_mul(float *g, const float *u, int64_t n) nogil
    float mn_exp_sum(float *x, int64_t n, float shift) nogil
    float mn_max_of(const float *x, int64_t n, float init) nogil
    int mn_matmul_rows(int wtype, const uint8_t *w, size_t w_row_stride, int64_t cols,
                        const void *xq, size_t xq_stride, int64_t n_tok,
                        float *out, int64_t out_stride, int64_t r0, int64_t r1) nogil
    ctypedef struct mn_pool:
        pass
    ctypedef void (*mn_task_fn)(void *ctx, int ith, int nth) noexcept nogil
    mn_pool *mn_pool_create(const int *cpus, int n, int caller_is_worker0, char *err, size_t errlen) nogil
    int mn_pool_size(const mn_pool *pool) nogil
    void mn_pool_submit(mn_pool *pool, mn_task_fn fn, void *ctx) nogil
    void mn_pool_wait(mn_pool *pool) nogil
    void mn_pool_run(mn_pool *pool, mn_task_fn fn, void *ctx) nogil
    void mn_pool_barrier(mn_pool *pool, int ith) nogil
    void mn_pool_destroy(mn_pool *pool) nogil
    void mn_pool_set_spin_ns(mn_pool *pool, int64_t ns) nogil
    ctypedef struct mn_thread_stats:
        int64_t tasks
        int64_t busy_ns
        int64_t wait_ns
    int mn_pool_stats(const mn_pool *pool, mn_thread_stats *out, int n) nogil
    void mn_pool_reset_stats(mn_pool *pool) nogil
    int mn_check_cpus(const int *cpus, int n, char *err, size_t errlen) nogil
    ctypedef struct mn_moe_args:
        int gate_type, up_type, down_type
        int64_t hidden, inter
        int n_expert
        const uint8_t *const *gate
        size_t gate_stride
        const uint8_t *const *up
        size_t up_stride
        const uint8_t *const *down
        size_t down_stride
        int64_t n_assign
        const int32_t *expert
        const int32_t *token
        const float *weight
        const float *x
        int64_t n_tok
        int64_t x_stride
        float *out
        int64_t out_stride
        void *scratch
        size_t scratch_bytes
        mn_pool *pool
    size_t mn_moe_scratch_bytes(const mn_moe_args *a) nogil
    int mn_moe_check(const mn_moe_args *a, char *err, size_t errlen) nogil
    void mn_moe_task(void *args, int ith, int nth) nogil
    void mn_moe_experts(mn_moe_args *a) nogil

cdef extern from "mn_bench.h":
    double mn_read_sum(const float *x, int64_t n) nogil
    double mn_read_sum2(const float *x, int64_t n, int prefetch) nogil

include "kernels.pxi"
include "engine.pxi"
include "formats.pxi"
include "bpe.pxi"
