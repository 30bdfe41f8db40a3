/* The NUMA engine's native core: per-node shards of each layer, and the block
 * calls that run one layer's attention or feed-forward on every node at once.
 *
 * Each node owns a thread pool pinned to its CPUs, its slice of the attention
 * heads (and their KV cache), its slice of the dense/shared FFNs, its routed
 * experts, and its rows of the output head, all in its own memory.  A block
 * call dispatches one task per node; each node computes a partial result from
 * local weights only; the caller waits for all nodes (the one cross-node
 * synchronisation of the block) and adds the partials into the residual.
 * Everything is plain C, run with the GIL released. */
#ifndef MN_ENGINE_H
#define MN_ENGINE_H

#include <stdint.h>
#include "mn_kernels.h"

typedef struct {            /* a weight matrix (or shard) in node memory: rows x cols */
    int type;
    const uint8_t *data;
    size_t stride;          /* bytes between rows */
    int64_t rows, cols;
} mn_mat;

/* The one definition of these enums: engine.pxi exposes them to Python as IntEnums
 * (cpdef enum), and tests/test_enums.py checks that both sides list the same members. */
enum mn_attn_kind { MN_ATTN_NONE = 0, MN_ATTN_GQA = 1, MN_ATTN_MLA = 2, MN_ATTN_MLA_MHA = 3 };
enum mn_ffn_kind { MN_FFN_NONE = 0, MN_FFN_DENSE = 1, MN_FFN_MOE = 2 };
enum mn_gating { MN_GATE_SOFTMAX = 0, MN_GATE_SIGMOID = 1 };
enum mn_group_rule { MN_GROUP_TOP2_SUM = 0, MN_GROUP_MAX = 1 };

typedef struct {
    int kind;                       /* MN_ATTN_*; NONE: no heads on this node */
    int64_t hidden;
    float rms_eps, norm_eps, kq_scale;
    const float *attn_norm;         /* [hidden] */
    int n_head;                     /* local query heads */
    int n_kv;                       /* local kv heads (GQA, MLA_MHA: = n_head) */
    const int32_t *q2kv;            /* local q head -> local kv head */
    int qk_dim;                     /* per-head q/k size (GQA: head_dim; MLA: nope + rope) */
    int v_dim;                      /* per-head value size */
    int rope_off, rope_dims, rope_neox;
    const float *rope_cos, *rope_sin;   /* [n_ctx, rope_dims/2], magnitude included */
    /* GQA */
    mn_mat wq, wk, wv, wo;          /* wq rows: local heads; wo: [hidden, n_head * v_dim] */
    const float *bq, *bk, *bv, *q_norm, *k_norm;
    /* MLA */
    int q_lora, kv_lora, nope;
    mn_mat wq_a, wq_b, wkv_a, wkv_b;    /* wq (no q LoRA) in wq; wkv_b: local heads' rows (MLA_MHA) */
    const float *q_a_norm, *kv_a_norm;
    const mn_mat *k_b, *v_b;            /* per local head: [kv_lora, nope], [v_dim, kv_lora] (MLA) */
    /* cache (this node's part): n_slots independent sequences of n_ctx positions each,
     * slot-major (every shape below gets a leading [n_slots]) */
    int64_t n_ctx;
    int n_slots;
    int cache_type_k, cache_type_v;     /* MN_F32, MN_F16 or MN_Q8_0 (MLA: both latent caches use cache_type_k) */
    void *cache_k, *cache_v;            /* GQA/MLA_MHA: keys in tiles [n_kv, ceil(n_ctx/32)] of mn_kv_tile_bytes(k, qk_dim),
                                         * values [n_kv, n_ctx] rows of mn_kv_row_bytes(v, v_dim): a head's
                                         * rows contiguous (interleaved heads, 1 KB apart in Qwen3, fell on
                                         * a quarter of L1's sets and conflicted in the value pass) */
    void *cache_lat;                    /* MLA: latents [n_ctx] rows of mn_kv_row_bytes(k, kv_lora) (values) */
    void *cache_ktiles;                 /* MLA: keys [latent | roped k_pe] in tiles [ceil(n_ctx/32)] of
                                         * mn_kv_tile_bytes(k, kv_lora + rope_dims) */
} mn_attn_layer;

typedef struct {
    int kind;                       /* MN_FFN_* */
    int64_t hidden;
    float rms_eps;
    const float *ffn_norm;
    /* router (MoE), replicated on every node */
    int n_expert, n_used, gating, norm_w, n_groups, n_groups_used, group_rule;
    float w_scale;
    mn_mat router;                  /* [n_expert, hidden] */
    const float *probs_bias;        /* [n_expert] or NULL: selection only */
    /* this node's routed experts: pointers per expert, NULL when not local */
    int gate_type, up_type, down_type;
    int64_t inter;
    const uint8_t **gate_ptrs, **up_ptrs, **down_ptrs;
    size_t gate_stride, up_stride, down_stride;
    /* split experts here: per expert local intermediate size and down row stride
     * (inter is then the largest); NULL when every local expert is whole */
    const int64_t *inter_of;
    const size_t *down_stride_of;
    /* replicated experts: every node makes the same greedy choice of which
     * holder runs each selected replicated expert for this batch (see ffn_task) */
    int node_id, n_nodes;
    const uint64_t *repl_nodes;     /* [n_expert]: bit n set if node n holds a copy; 0: not replicated; NULL: none */
    const float *node_share;        /* [n_nodes * n_expert]: share of expert e's rows on node n (non-replicated) */
    /* dense FFN or shared expert: this node's slice of the intermediate dim */
    int64_t sh_ff;
    mn_mat sh_gate, sh_up, sh_down; /* [sh_ff, hidden], [sh_ff, hidden], [hidden, sh_ff] */
    const float *sh_gate_vec;       /* [hidden]: sigmoid gate of the shared expert (Qwen2-MoE), or NULL */
    int64_t *expert_tokens;         /* [n_expert]: tokens routed to each expert (counted by node 0) */
} mn_ffn_layer;

typedef struct {
    int64_t hidden, vocab;
    float rms_eps;
    const float *norm;
    mn_mat out;                     /* local vocab rows [v0, v0 + out.rows) */
    int64_t v0;
} mn_head_shard;

typedef struct {
    mn_pool *pool;
    mn_attn_layer *attn;            /* [n_layers] */
    mn_ffn_layer *ffn;              /* [n_layers] */
    mn_head_shard head;
    float *partial;                 /* [t_max, hidden] */
    uint8_t *scratch;
    size_t scratch_bytes;
    int64_t busy_ns;                /* wall time inside block tasks (thread 0) */
    int64_t idle_ns;                /* time finished but waiting for the slowest node, per block, summed */
    int64_t ffn_busy_ns;            /* busy_ns of FFN blocks only */
    int64_t moe_assign;             /* (token, expert) pairs this node ran, summed */
} mn_node;

typedef struct {
    int n_nodes, n_layers;
    int64_t hidden, t_max;
    mn_node *nodes;
    int64_t syncs;                  /* cross-node synchronisations so far */
    int64_t wait_ns;                /* caller's time waiting for nodes 1.. after node 0 finished */
    int64_t crit_ns;                /* per block, the slowest node's busy time, summed (the critical path) */
    int64_t ffn_crit_ns;            /* crit_ns of FFN blocks only */
    int64_t reduce_parallel_min;    /* T x hidden x nodes from which every pool sums the partials
                                       (one more sync); below, the caller does; 0: 2^18 */
    int64_t route_split_min;        /* on several nodes a MoE block's router runs once, split over the
                                       nodes (one more sync): from this many tokens by tokens (norm,
                                       router and routing), below by the router's rows; 0: 4;
                                       -1: every node runs all of it (the replicated router) */
    int64_t moe_share_min;          /* from this many tokens a node that has run out of its own MoE
                                       chunks runs chunks of the others' (their weights, read from
                                       their memory): prefill is compute-bound, so a node the host
                                       slows is helped; 0: 64; -1: never (each node runs its own) */
    int64_t attn_share_min;         /* the same for attention's projections (q/k/v, MLA's, the output),
                                       which then run in fixed chunks of rows; 0: 64; -1: never */
    uint8_t *shared;                /* what the nodes share in such a block, mn_engine_shared_bytes */
    size_t shared_bytes;
} mn_engine;

/* KV-cache layouts: bytes of one key tile (32 positions of `dim` values, transposed) and of one
 * value row, for cache type MN_F32, MN_F16 or MN_Q8_0 (dim a multiple of 32); 0: unsupported. */
size_t mn_kv_tile_bytes(int type, int64_t dim);
size_t mn_kv_row_bytes(int type, int64_t dim);

/* Scratch bytes one node needs for blocks of up to t_max tokens with its layers. */
size_t mn_node_scratch_bytes(const mn_engine *e, int node);
/* MoE chunks node `node` ran for other nodes since the last reset (see moe_share_min). */
int64_t mn_engine_moe_taken(const mn_engine *e, int node, int reset);
/* Attention projection chunks node `node` ran for other nodes since the last reset (attn_share_min). */
int64_t mn_engine_attn_taken(const mn_engine *e, int node, int reset);
/* Bytes of the engine-wide buffer for blocks of up to t_max tokens (the routed tokens' norms,
 * expert ids and weights, written by the node that routed them and read by every node). */
size_t mn_engine_shared_bytes(const mn_engine *e);
/* Validate the whole engine (every node's layers, buffers and scratch); 0, or -1
 * with a message naming node, layer and field.  Array lengths the structs do not
 * carry (norm vectors, RoPE tables, caches) are checked by the setters that have them. */
int    mn_engine_check(const mn_engine *e, char *err, size_t errlen);
/* The same checks for one slot: layer >= 0 (its attention and FFN), or -1 (the head). */
int    mn_engine_check_layer(const mn_engine *e, int node, int layer, char *err, size_t errlen);

/* Block calls return MN_ENGINE_OK, or a negative code before touching x, the
 * caches or any node (a layer, token count or position out of range). */
enum { MN_ENGINE_OK = 0, MN_ENGINE_ELAYER = -1, MN_ENGINE_ETOKENS = -2, MN_ENGINE_EPOS = -3,
       MN_ENGINE_ESCRATCH = -4, MN_ENGINE_ESTATE = -5 };
const char *mn_engine_strerror(int rc);

/* x[T, hidden] += attention(layer) at positions pos0 .. pos0+T-1 (cache updated);
 * needs 0 <= pos0 and pos0 + T <= n_ctx of every node's part of the layer. */
int    mn_engine_attention(mn_engine *e, int layer, float *x, int64_t T, int64_t pos0);
/* The batched step: token t is at position pos[t] of cache slot slot[t] and attends to positions
 * 0..pos[t] of its own slot (earlier tokens of the batch included); needs 0 <= pos[t] < n_ctx
 * and 0 <= slot[t] < n_slots (checked), and no (slot, pos) twice in one call (the caller's).
 * Per token the result is bit-identical to running that token alone. */
int    mn_engine_attention_batch(mn_engine *e, int layer, float *x, int64_t T, const int64_t *pos,
                              const int32_t *slot);
/* x[T, hidden] += ffn(layer) (MoE with shared experts, or dense). */
int    mn_engine_ffn(mn_engine *e, int layer, float *x, int64_t T);
/* logits[T, vocab] = head(x) (final norm included). */
int    mn_engine_head(mn_engine *e, const float *x, int64_t T, float *logits);
/* One step of the whole model, the layer loop in C: every layer's attention then FFN on
 * x[T, hidden] (positions pos0.., or pos[t] of slot[t] when pos is given, as the block calls),
 * then, when logits is not NULL, logits[T - logit_from, vocab] = head(x rows logit_from..T-1).
 * Checked as the block calls are, before any layer runs. */
int    mn_engine_forward(mn_engine *e, float *x, int64_t T, int64_t pos0, const int64_t *pos,
                         const int32_t *slot, int64_t logit_from, float *logits);

#endif
