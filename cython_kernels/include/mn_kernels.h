/* C API of the moe_numa kernels: quantized matmul on GGUF blocks, node-local
 * thread pools and the fused MoE expert kernel.
 *
 * Everything here is plain C: no Python objects, safe to call with the GIL
 * released and from inside pool tasks.  Weight rows are contiguous GGML blocks
 * (GGML type ids as in gguf.GGMLQuantizationType).  Activations are quantized
 * once per row into the partner format of the weight type: Q8_K for K-quants,
 * Q8_0 for the 32-value types, plain float for F32/F16/BF16 (the type table,
 * mn_type(), says which).  The activation row layout
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
enum mn_ggml_type {   /* gguf.GGMLQuantizationType's values (tests/test_enums.py) */
    MN_F32 = 0, MN_F16 = 1, MN_Q4_0 = 2, MN_Q4_1 = 3, MN_Q5_0 = 6, MN_Q5_1 = 7, MN_Q8_0 = 8, MN_Q8_1 = 9,
    MN_Q2_K = 10, MN_Q3_K = 11, MN_Q4_K = 12, MN_Q5_K = 13, MN_Q6_K = 14, MN_Q8_K = 15,
    MN_IQ2_XXS = 16, MN_IQ2_XS = 17, MN_IQ3_XXS = 18, MN_IQ1_S = 19, MN_IQ4_NL = 20, MN_IQ3_S = 21,
    MN_IQ2_S = 22, MN_IQ4_XS = 23, MN_I8 = 24, MN_I16 = 25, MN_I32 = 26, MN_I64 = 27, MN_F64 = 28,
    MN_IQ1_M = 29, MN_BF16 = 30, MN_TQ1_0 = 34, MN_TQ2_0 = 35, MN_MXFP4 = 39, MN_NVFP4 = 40, MN_Q1_0 = 41,
};
#define MN_MAX_TYPE 42
/* SIMD levels (as mn_cpu.h): scalar, avx2, avx512, avx512vnni */
#define MN_N_LEVELS 4

/* Activation formats (the partner of a weight type in its dot product).  The
 * Q8_0 rows also carry each block's integer sum and llama.cpp's Q8_1 sum
 * fp16(d * sum), which the min of Q4_1 / Q5_1 multiplies, so those use them too. */
enum mn_act_format { MN_ACT_NONE = -1, MN_ACT_FLOAT = 0, MN_ACT_Q8_0 = 1, MN_ACT_Q8_K = 2 };

/* One row of the type table. */
typedef struct {
    const char *name;
    int32_t block;          /* values per block (1 for plain types) */
    int32_t bytes;          /* bytes per block */
    int32_t act;            /* MN_ACT_*; MN_ACT_NONE: not a weight type we multiply with */
    int32_t scale_off[2];   /* byte offsets of the fp16 block scales (d, then dmin/m), -1 if none */
} mn_type_info;

/* The table row of a GGML type id; NULL for an id GGML does not define. */
const mn_type_info *mn_type(int wtype);
/* The SIMD level whose code runs wtype's kernel at `level` (lower where that
 * level reuses another's code); -1 if there is no kernel there. */
int    mn_kernel_level(int wtype, int level);

/* Validation (--check-tensors): the index r * (cols / block) + i of the first
 * block (row r, block i) whose fp16 scale, or plain float value, is Inf or NaN;
 * -1 if none, -2 if the type has no kernel or cols does not fit its block. */
int64_t mn_first_bad_block(int wtype, const uint8_t *w, size_t row_stride, int64_t rows, int64_t cols);

/* Error codes of the kernel entry points */
#define MN_OK 0
#define MN_ERR_TYPE (-1)    /* no kernel for this weight type */
#define MN_ERR_COLS (-2)    /* cols not a positive multiple of the type's block */
#define MN_ERR_ARGS (-3)    /* negative token count */

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
int    mn_type_supported(int wtype);                  /* 1 if the kernels compute with wtype */
int64_t mn_block_size(int wtype);                     /* weights per block, 0 if unsupported */
size_t mn_row_bytes(int wtype, int64_t cols);         /* 0 if unsupported or cols not a multiple of the block */
size_t mn_act_row_bytes(int wtype, int64_t cols);     /* bytes of one quantized activation row (multiple of 64) */
/* returns MN_OK, MN_ERR_TYPE or MN_ERR_COLS (xq untouched then) */
int    mn_quantize_act(int wtype, const float *x, void *xq, int64_t cols);
/* out[t*out_stride + r] = dot(row r of W, x_t) for r in [r0, r1), t in [0, n_tok).
 * xq holds n_tok activation rows, xq_stride bytes apart (>= mn_act_row_bytes).
 * For n_tok > 1 rows are processed in cache-sized row blocks and tokens in tiles
 * of MN_TILE, so each weight block is read from memory once per row block.
 * Returns MN_OK (also for an empty row range or n_tok == 0), MN_ERR_TYPE,
 * MN_ERR_COLS or MN_ERR_ARGS; out is untouched on an error. */
int    mn_matmul_rows(int wtype, const uint8_t *w, size_t w_row_stride, int64_t cols,
                      const void *xq, size_t xq_stride, int64_t n_tok,
                      float *out, int64_t out_stride, int64_t r0, int64_t r1);

/* ---- vector exp (mn_vmath.c), at the active SIMD level --------------------
 * Relative error within a few float ulps of exp; exp(x) for x < -87 is 0. */
void   mn_silu_mul(float *g, const float *u, int64_t n);  /* g[i] = silu(g[i]) * u[i] */
float  mn_exp_sum(float *x, int64_t n, float shift);      /* x[i] = exp(x[i] - shift); returns the sum */
float  mn_max_of(const float *x, int64_t n, float init); /* max(init, x[0..n)), NaNs passed over */

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
    /* Prefill on several nodes: each node's MoE task posts its open phase on boards[node], and a
     * node that has run out of its own chunks runs chunks of another node's open phase (reading
     * that node's weights and scratch), so a node the host slows no longer holds the others at the
     * block's sync.  NULL: no sharing (decode, where the owner's memory bandwidth is the limit). */
    struct mn_moe_board *boards;  int node, n_nodes;
} mn_moe_args;

/* One per node, 64-byte aligned, zeroed before first use (see mn_moe_args.boards). */
typedef struct mn_moe_board {
    _Atomic int phase;           /* MN_MOE_GATE_UP or MN_MOE_DOWN: open to others; else closed */
    char pad0[60];
    _Atomic int64_t taken;       /* chunks of other nodes this node ran, summed */
    char pad1[56];
    mn_moe_args args;            /* the owner's arguments, valid while a phase is open */
} mn_moe_board;
enum { MN_MOE_CLOSED = 0, MN_MOE_GATE_UP = 1, MN_MOE_DOWN = 2 };

size_t mn_moe_scratch_bytes(const mn_moe_args *a);   /* depends on n_assign and n_tok */
/* 0 if args are consistent; else -1 with a message naming the bad field. */
int    mn_moe_check(const mn_moe_args *a, char *err, size_t errlen);
/* Pool task body: run as fn(args, ith, nth) by all threads of args->pool,
 * or call with (args, 0, 1) and pool NULL for one thread. */
void   mn_moe_task(void *args, int ith, int nth);
/* Convenience: run on pool (or inline when pool is NULL). */
void   mn_moe_experts(mn_moe_args *a);

#ifdef __cplusplus
}
#endif
#endif
