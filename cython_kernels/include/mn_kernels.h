/* C API of the moe_numa kernels: quantized matmul on GGUF blocks, node-local
 * thread pools and the fused MoE expert kernel.
 *
 * Everything here is plain C: no Python objects, safe to call with the GIL
 * released and from inside pool tasks.  Weight rows are contiguous GGML blocks
 * (GGML type ids as in gguf.GGMLQuantizationType).  Activations are quantized
 * once per row into the partner format of the weight type: Q8_K for K-quants,
 * Q8_0 for Q8_0/Q4_0, plain float for F32/F16/BF16.  The activation row layout
 * is private to the kernels; size it with mn_act_row_bytes() and fill it with
 * mn_quantize_act(). */
#ifndef MN_KERNELS_H
#define MN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* GGML type ids (gguf.GGMLQuantizationType) */
enum {
    MN_F32 = 0, MN_F16 = 1, MN_Q4_0 = 2, MN_Q8_0 = 8, MN_Q2_K = 10, MN_Q3_K = 11,
    MN_Q4_K = 12, MN_Q5_K = 13, MN_Q6_K = 14, MN_Q8_K = 15, MN_BF16 = 30,
};
#define MN_MAX_TYPE 40
/* token tile of the GEMM path: each weight block is loaded once per MN_TILE tokens */
#define MN_TILE 4

/* ---- SIMD level (also in mn_cpu.h) ----------------------------------------
 * mn_active_level(): the level the kernels dispatch to.  Chosen once, on first
 * use, from mn_simd_level() (CPUID lowered by MOE_NUMA_SIMD); can be changed
 * later with mn_set_simd_level() (clamped to what the CPU supports; call it only
 * while no kernel runs).  Returns the level now in force. */
int    mn_active_level(void);
int    mn_set_simd_level(int level);

/* ---- types and matmul ---------------------------------------------------- */
int    mn_type_supported(int wtype);
int64_t mn_block_size(int wtype);                     /* weights per block, 0 if unsupported */
size_t mn_row_bytes(int wtype, int64_t cols);         /* 0 if unsupported or cols not a multiple of the block */
size_t mn_act_row_bytes(int wtype, int64_t cols);     /* bytes of one quantized activation row (multiple of 64) */
void   mn_quantize_act(int wtype, const float *x, void *xq, int64_t cols);
/* out[t*out_stride + r] = dot(row r of W, x_t) for r in [r0, r1), t in [0, n_tok).
 * xq holds n_tok activation rows, xq_stride bytes apart (>= mn_act_row_bytes).
 * For n_tok > 1 rows are processed in cache-sized row blocks and tokens in tiles
 * of MN_TILE, so each weight block is read from memory once per row block. */
void   mn_matmul_rows(int wtype, const uint8_t *w, size_t w_row_stride, int64_t cols,
                      const void *xq, size_t xq_stride, int64_t n_tok,
                      float *out, int64_t out_stride, int64_t r0, int64_t r1);

/* ---- thread pools ---------------------------------------------------------
 * A pool owns n threads, thread i pinned to cpus[i].  With caller_is_worker0,
 * only n-1 threads are created (pinned to cpus[1..n-1]); the thread that calls
 * mn_pool_wait() runs slice 0 itself (it is not pinned by the pool: the engine
 * pins it with sched_setaffinity).  A task fn(ctx, ith, nth) is run once by
 * every ith in [0, nth), nth = n.  Submit and wait alternate; several pools may
 * have tasks in flight at once. */
typedef struct mn_pool mn_pool;
typedef void (*mn_task_fn)(void *ctx, int ith, int nth);

mn_pool *mn_pool_create(const int *cpus, int n, int caller_is_worker0, char *err, size_t errlen);
int      mn_pool_size(const mn_pool *pool);
void     mn_pool_submit(mn_pool *pool, mn_task_fn fn, void *ctx);   /* asynchronous */
void     mn_pool_wait(mn_pool *pool);                               /* caller runs ith 0 if it is a worker */
void     mn_pool_run(mn_pool *pool, mn_task_fn fn, void *ctx);      /* submit + wait */
void     mn_pool_barrier(mn_pool *pool, int ith);                   /* inside a task: all nth threads meet */
void     mn_pool_destroy(mn_pool *pool);
/* Spin this long (ns) before sleeping on a futex, in workers, waits and barriers. */
void     mn_pool_set_spin_ns(mn_pool *pool, int64_t ns);
/* Counters since creation (or the last reset): tasks run; per thread i the ns
 * spent inside task functions (busy) and waiting for the other threads (in
 * mn_pool_barrier, and the caller in mn_pool_wait after its own slice). */
typedef struct { int64_t tasks; int64_t busy_ns; int64_t wait_ns; } mn_thread_stats;
int      mn_pool_stats(const mn_pool *pool, mn_thread_stats *out, int n);  /* returns n threads */
void     mn_pool_reset_stats(mn_pool *pool);
/* 0 if every CPU exists and is available to this process; otherwise -1 and a
 * message naming the CPU.  A CPU may repeat (two threads on one CPU). */
int      mn_check_cpus(const int *cpus, int n, char *err, size_t errlen);

/* ---- fused MoE experts ----------------------------------------------------
 * For every assignment a (expert e = expert[a], token t = token[a], weight w):
 *   h   = SiLU(gate_e @ x_t) * (up_e @ x_t)         gate_e, up_e: [inter, hidden]
 *   out_t += w * (down_e @ h)                        down_e: [hidden, inter]
 * Expert weights are separate buffers (arrays of n_expert row pointers); each
 * expert's rows are w_stride bytes apart.  A NULL pointer means the expert is
 * not local: assignments to it are an error (mn_moe_check).  Assignments are
 * grouped by expert; experts with several tokens use the tiled GEMM path.
 * A split expert (its FFN rows spread over nodes) has a smaller local
 * intermediate size: inter_of[e] rows of gate/up, columns of down (rows
 * down_stride_of[e] bytes apart); inter is then the largest of them. */
typedef struct {
    int gate_type, up_type, down_type;
    int64_t hidden, inter;
    int n_expert;
    const uint8_t *const *gate;  size_t gate_stride;
    const uint8_t *const *up;    size_t up_stride;
    const uint8_t *const *down;  size_t down_stride;
    const int64_t *inter_of;     /* [n_expert] or NULL: every expert has inter */
    const size_t *down_stride_of;   /* [n_expert], with inter_of */
    int64_t n_assign;
    const int32_t *expert, *token;
    const float *weight;
    const float *x;  int64_t n_tok; int64_t x_stride;     /* floats between token rows */
    float *out;      int64_t out_stride;
    void *scratch;   size_t scratch_bytes;                 /* >= mn_moe_scratch_bytes() */
    mn_pool *pool;   /* pool whose task runs mn_moe_task (for barriers); NULL: one thread */
} mn_moe_args;

size_t mn_moe_scratch_bytes(const mn_moe_args *a);   /* depends on n_assign and n_tok */
/* 0 if args are consistent; else -1 with a message naming the bad field. */
int    mn_moe_check(const mn_moe_args *a, char *err, size_t errlen);
/* Pool task body: run as fn(args, ith, nth) by all threads of args->pool,
 * or call with (args, 0, 1) and pool NULL for one thread. */
void   mn_moe_task(void *args, int ith, int nth);
/* Convenience: run on pool (or inline when pool is NULL). */
void   mn_moe_experts(mn_moe_args *a);

/* STREAM-like read: sum of n floats (used by the benchmark) */
double mn_read_sum(const float *x, int64_t n);
/* same, SIMD; prefetch=1 adds software prefetch as the kernels use */
double mn_read_sum2(const float *x, int64_t n, int prefetch);

#ifdef __cplusplus
}
#endif
#endif
