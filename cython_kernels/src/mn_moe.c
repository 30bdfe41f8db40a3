/* Fused MoE expert kernel: for a whole layer's local experts, in one pool task:
 * group assignments by expert, quantize activations, gate/up (GEMM when an
 * expert has several tokens), SiLU(gate)*up, quantize, down, weighted sum. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include "mn_internal.h"

#define ALIGN64(n) (((n) + 63) & ~(size_t)63)

typedef struct {
    size_t off_order, off_eoff, off_chunk, off_ctr, off_xg, off_xu, off_g, off_u, off_hq, off_y, off_tq, total;
    size_t xgb, xub, hqb;
    int share_xu;
} moe_layout;

static int act_kind(int t) {
    if (t == MN_F32 || t == MN_F16 || t == MN_BF16) return 0;
    if (t == MN_Q8_0 || t == MN_Q4_0) return 1;
    return 2;
}

static void layout(const mn_moe_args *a, moe_layout *L) {
    const size_t A = (size_t)(a->n_assign > 0 ? a->n_assign : 0);
    size_t o = 0;
    L->xgb = mn_act_row_bytes(a->gate_type, a->hidden);
    L->xub = mn_act_row_bytes(a->up_type, a->hidden);
    L->hqb = mn_act_row_bytes(a->down_type, a->inter);
    L->share_xu = act_kind(a->gate_type) == act_kind(a->up_type);
    L->off_order = o; o = ALIGN64(o + 4 * A);
    L->off_eoff = o;  o = ALIGN64(o + 8 * ((size_t)a->n_expert + 1));
    L->off_chunk = o; o = ALIGN64(o + 8 * ((size_t)a->n_expert + 1) * 2);
    L->off_ctr = o;   o = ALIGN64(o + 384);
    L->off_xg = o;    o = ALIGN64(o + A * L->xgb);
    L->off_xu = L->share_xu ? L->off_xg : o;
    if (!L->share_xu) o = ALIGN64(o + A * L->xub);
    L->off_g = o;     o = ALIGN64(o + A * (size_t)a->inter * 4);
    L->off_u = o;     o = ALIGN64(o + A * (size_t)a->inter * 4);
    L->off_hq = o;    o = ALIGN64(o + A * L->hqb);
    L->off_y = o;     o = ALIGN64(o + A * (size_t)a->hidden * 4);
    /* each token's activations, quantized once (gate format, then up format if it differs) */
    const size_t T = (size_t)(a->n_tok > 0 ? a->n_tok : 0);
    L->off_tq = o;    o = ALIGN64(o + T * (L->xgb + (L->share_xu ? 0 : L->xub)));
    L->total = o + 64;   /* room to align the base */
}

size_t mn_moe_scratch_bytes(const mn_moe_args *a) { moe_layout L; layout(a, &L); return L.total; }

int mn_moe_check(const mn_moe_args *a, char *err, size_t errlen) {
    const char *names[3] = {"gate", "up", "down"};
    const int types[3] = {a->gate_type, a->up_type, a->down_type};
    const int64_t cols[3] = {a->hidden, a->hidden, a->inter};
    const size_t strides[3] = {a->gate_stride, a->up_stride, a->down_stride};
    const uint8_t *const *ptrs[3] = {a->gate, a->up, a->down};
    if (a->hidden <= 0 || a->inter <= 0) { snprintf(err, errlen, "hidden and inter must be positive"); return -1; }
    if (a->n_expert <= 0) { snprintf(err, errlen, "n_expert must be positive"); return -1; }
    for (int k = 0; k < 3; k++) {
        if (!mn_type_supported(types[k])) { snprintf(err, errlen, "%s: unsupported weight type %d", names[k], types[k]); return -1; }
        size_t rb = mn_row_bytes(types[k], cols[k]);
        if (!rb) { snprintf(err, errlen, "%s: %lld columns is not a multiple of the type's block size %lld",
                            names[k], (long long)cols[k], (long long)mn_block_size(types[k])); return -1; }
        if (strides[k] < rb) { snprintf(err, errlen, "%s: row stride %zu is smaller than a row (%zu bytes)", names[k], strides[k], rb); return -1; }
        if (!ptrs[k]) { snprintf(err, errlen, "%s: no expert pointer array", names[k]); return -1; }
    }
    if (a->n_assign < 0) { snprintf(err, errlen, "n_assign is negative"); return -1; }
    if (a->n_assign > 0 && (!a->expert || !a->token || !a->weight)) { snprintf(err, errlen, "assignment arrays missing"); return -1; }
    if (!a->x || !a->out) { snprintf(err, errlen, "x and out are required"); return -1; }
    if (a->x_stride < a->hidden || a->out_stride < a->hidden) { snprintf(err, errlen, "x/out row stride smaller than hidden"); return -1; }
    if (a->inter_of) {
        if (!a->down_stride_of) { snprintf(err, errlen, "inter_of needs down_stride_of"); return -1; }
        for (int e = 0; e < a->n_expert; e++) {
            if (!a->down[e]) continue;
            const int64_t ie = a->inter_of[e];
            const size_t rb = mn_row_bytes(a->down_type, ie);
            if (ie <= 0 || ie > a->inter || !rb) {
                snprintf(err, errlen, "expert %d: local intermediate size %lld must be in 1..%lld and a multiple of "
                         "down's block size %lld", e, (long long)ie, (long long)a->inter, (long long)mn_block_size(a->down_type));
                return -1;
            }
            if (a->down_stride_of[e] < rb) { snprintf(err, errlen, "expert %d: down row stride %zu is smaller than a row (%zu bytes)", e, a->down_stride_of[e], rb); return -1; }
        }
    }
    for (int64_t i = 0; i < a->n_assign; i++) {
        int e = a->expert[i]; int64_t t = a->token[i];
        if (e < 0 || e >= a->n_expert) { snprintf(err, errlen, "assignment %lld: expert %d out of range [0, %d)", (long long)i, e, a->n_expert); return -1; }
        if (t < 0 || t >= a->n_tok) { snprintf(err, errlen, "assignment %lld: token %lld out of range [0, %lld)", (long long)i, (long long)t, (long long)a->n_tok); return -1; }
        for (int k = 0; k < 3; k++)
            if (!ptrs[k][e]) { snprintf(err, errlen, "assignment %lld: expert %d has no %s weights here", (long long)i, e, names[k]); return -1; }
    }
    if (a->n_assign > 0 && (!a->scratch || a->scratch_bytes < mn_moe_scratch_bytes(a))) {
        snprintf(err, errlen, "scratch buffer too small (%zu < %zu bytes)", a->scratch_bytes, mn_moe_scratch_bytes(a)); return -1;
    }
    return 0;
}

/* chunks of rows: chunk c of the flattened (expert, row block) list */
static int64_t chunk_rows(int64_t rb_bytes) {
    int64_t r = (int64_t)(96 * 1024) / (rb_bytes > 0 ? rb_bytes : 1);
    return r < 4 ? 4 : r;
}

/* Where one node's block lives in its scratch.  ctr holds its counters, a cache line each: */
enum { NEXT_GU = 0, NEXT_DN = 8, ROWS_GU = 16, ROWS_DN = 24, DONE_GU = 32, DONE_DN = 40 };
typedef struct {
    moe_layout L;
    int32_t *order;
    int64_t *eoff, *cg, *cd;
    _Atomic int64_t *ctr;
    uint8_t *xg, *xu, *hq, *tq;
    float *G, *U, *Y;
} moe_view;

static void view_of(const mn_moe_args *a, moe_view *v) {
    layout(a, &v->L);
    uint8_t *base = (uint8_t *)(((uintptr_t)a->scratch + 63) & ~(uintptr_t)63);
    v->order = (int32_t *)(base + v->L.off_order);
    v->eoff = (int64_t *)(base + v->L.off_eoff);
    v->cg = (int64_t *)(base + v->L.off_chunk);     /* gate/up chunk prefix, n_expert+1 */
    v->cd = v->cg + a->n_expert + 1;                 /* down chunk prefix */
    v->ctr = (_Atomic int64_t *)(base + v->L.off_ctr);
    v->xg = base + v->L.off_xg; v->xu = base + v->L.off_xu; v->hq = base + v->L.off_hq;
    v->tq = base + v->L.off_tq;
    v->G = (float *)(base + v->L.off_g); v->U = (float *)(base + v->L.off_u); v->Y = (float *)(base + v->L.off_y);
}

#define INTER(a, e) ((a)->inter_of ? (a)->inter_of[e] : (a)->inter)
#define DSTRIDE(a, e) ((a)->inter_of ? (a)->down_stride_of[e] : (a)->down_stride)

/* the expert of chunk c: *e is a hint that only moves forward within one node's list */
static int64_t expert_of(const int64_t *prefix, int64_t c, int64_t *e) {
    if (prefix[*e] > c) *e = 0;
    while (prefix[*e + 1] <= c) (*e)++;
    return *e;
}

static void gate_up_chunk(const mn_moe_args *a, const moe_view *v, int64_t c, int64_t *hint) {
    const int64_t e = expert_of(v->cg, c, hint), H = a->hidden, I = a->inter, chg = atomic_load(&v->ctr[ROWS_GU]);
    const int64_t Ie = INTER(a, e);
    const int64_t r0 = (c - v->cg[e]) * chg, r1 = r0 + chg < Ie ? r0 + chg : Ie;
    const int64_t o = v->eoff[e], m = v->eoff[e + 1] - o;
    const size_t xub = v->L.share_xu ? v->L.xgb : v->L.xub;
    mn_matmul_rows(a->gate_type, a->gate[e], a->gate_stride, H, v->xg + o * v->L.xgb, v->L.xgb, m, v->G + o * I, I, r0, r1);
    mn_matmul_rows(a->up_type, a->up[e], a->up_stride, H, v->xu + o * xub, xub, m, v->U + o * I, I, r0, r1);
    for (int64_t t = o; t < o + m; t++) mn_silu_mul(v->G + t * I + r0, v->U + t * I + r0, r1 - r0);
}

static void down_chunk(const mn_moe_args *a, const moe_view *v, int64_t c, int64_t *hint) {
    const int64_t e = expert_of(v->cd, c, hint), H = a->hidden, chd = atomic_load(&v->ctr[ROWS_DN]);
    const int64_t r0 = (c - v->cd[e]) * chd, r1 = r0 + chd < H ? r0 + chd : H;
    const int64_t o = v->eoff[e], m = v->eoff[e + 1] - o;
    mn_matmul_rows(a->down_type, a->down[e], DSTRIDE(a, e), INTER(a, e), v->hq + o * v->L.hqb, v->L.hqb, m,
                   v->Y + o * H, H, r0, r1);
}

/* Runs chunks of `phase` from node a's counters until none is left; returns how many it ran. */
static int64_t run_chunks(const mn_moe_args *a, const moe_view *v, int phase) {
    const int gu = phase == MN_MOE_GATE_UP;
    const int64_t total = gu ? v->cg[a->n_expert] : v->cd[a->n_expert];
    _Atomic int64_t *next = &v->ctr[gu ? NEXT_GU : NEXT_DN], *done = &v->ctr[gu ? DONE_GU : DONE_DN];
    int64_t hint = 0, ran = 0;
    for (;;) {
        const int64_t c = atomic_fetch_add(next, 1);
        if (c >= total) break;
        if (gu) gate_up_chunk(a, v, c, &hint); else down_chunk(a, v, c, &hint);
        atomic_fetch_add_explicit(done, 1, memory_order_release);
        ran++;
    }
    return ran;
}

/* This thread ran out of its own chunks: run what is left of the other nodes' open phases. The
 * board's copy of the owner's arguments is read only after its phase is seen open (acquire),
 * and the owner does not leave a phase before every chunk of it is finished, so its scratch
 * outlives these reads (the next block starts only when every node's task has returned). */
static void help_others(const mn_moe_args *a) {
    int64_t ran = 0;
    for (int k = 1; k < a->n_nodes; k++) {
        mn_moe_board *b = &a->boards[(a->node + k) % a->n_nodes];
        const int phase = atomic_load_explicit(&b->phase, memory_order_acquire);
        if (phase != MN_MOE_GATE_UP && phase != MN_MOE_DOWN) continue;
        moe_view v;
        view_of(&b->args, &v);
        ran += run_chunks(&b->args, &v, phase);
    }
    if (ran) atomic_fetch_add_explicit(&a->boards[a->node].taken, ran, memory_order_relaxed);
}

/* This node's phase ends when all its chunks are finished, by its threads or by others. */
static void close_phase(const mn_moe_args *a, const moe_view *v, int phase, int ith) {
    const int gu = phase == MN_MOE_GATE_UP;
    const int64_t total = gu ? v->cg[a->n_expert] : v->cd[a->n_expert];
    if (a->boards) {
        help_others(a);
        while (atomic_load_explicit(&v->ctr[gu ? DONE_GU : DONE_DN], memory_order_acquire) < total) MN_CPU_RELAX();
    }
    mn_pool_barrier(a->pool, ith);
}

static void open_phase(const mn_moe_args *a, int phase, int ith) {
    if (a->boards && ith == 0) {
        mn_moe_board *b = &a->boards[a->node];
        if (phase == MN_MOE_GATE_UP) b->args = *a;
        atomic_store_explicit(&b->phase, phase, memory_order_release);
    }
}

void mn_moe_task(void *argp, int ith, int nth) {
    mn_moe_args *a = (mn_moe_args *)argp;
    if (a->n_assign <= 0) return;
    moe_view v;
    view_of(a, &v);
    const moe_layout L = v.L;
    const int64_t A = a->n_assign, E = a->n_expert, H = a->hidden, I = a->inter;

    if (ith == 0) {   /* group by expert (counting sort, stable) */
        int64_t chg = chunk_rows((int64_t)mn_row_bytes(a->gate_type, H));
        int64_t chd = chunk_rows((int64_t)mn_row_bytes(a->down_type, I));
        int64_t *eoff = v.eoff, *cg = v.cg, *cd = v.cd;
        for (int64_t e = 0; e <= E; e++) eoff[e] = 0;
        for (int64_t i = 0; i < A; i++) eoff[a->expert[i] + 1]++;
        /* Few active experts (decode): hand out long contiguous runs, about four
         * per thread per phase, so each thread streams long stretches of matrices
         * and the prefetchers are rarely restarted, while the phase's last run (which
         * the other threads wait for) stays short; two a thread left 2% more of
         * decode in waits (Sapphire Rapids, Qwen3 bench Q8_0), eight gained nothing.
         * Many (prefill): the cache-sized chunks balance the compute. */
        int64_t active = 0, active_rows = 0;
        for (int64_t e = 0; e < E; e++) if (eoff[e + 1] > 0) { active++; active_rows += INTER(a, e); }
        const int64_t runs = 4 * nth;
        const int64_t want_g = (active_rows + runs - 1) / runs, want_d = (active * H + runs - 1) / runs;
        if (want_g > chg) chg = want_g < I ? want_g : I;
        if (want_d > chd) chd = want_d < H ? want_d : H;
        atomic_store(&v.ctr[ROWS_GU], chg); atomic_store(&v.ctr[ROWS_DN], chd);
        cg[0] = cd[0] = 0;
        for (int64_t e = 0; e < E; e++) {
            const int64_t m = eoff[e + 1];
            cg[e + 1] = cg[e] + (m ? (INTER(a, e) + chg - 1) / chg : 0);
            cd[e + 1] = cd[e] + (m ? (H + chd - 1) / chd : 0);
            eoff[e + 1] += eoff[e];
        }
        /* stable placement using eoff as running cursor, then restore */
        for (int64_t i = 0; i < A; i++) v.order[eoff[a->expert[i]]++] = (int32_t)i;
        for (int64_t e = E; e > 0; e--) eoff[e] = eoff[e - 1];
        eoff[0] = 0;
        atomic_store(&v.ctr[NEXT_GU], 0); atomic_store(&v.ctr[NEXT_DN], 0);
        atomic_store(&v.ctr[DONE_GU], 0); atomic_store(&v.ctr[DONE_DN], 0);
    }
    mn_pool_barrier(a->pool, ith);
    /* Quantize each token once (a token goes to n_used experts), then gather the
     * rows into expert order, which the GEMM reads contiguously. */
    uint8_t *tqu = v.tq + (size_t)a->n_tok * L.xgb;
    for (int64_t t = ith; t < a->n_tok; t += nth) {
        const float *xr = a->x + t * a->x_stride;
        mn_quantize_act(a->gate_type, xr, v.tq + t * L.xgb, H);
        if (!L.share_xu) mn_quantize_act(a->up_type, xr, tqu + t * L.xub, H);
    }
    mn_pool_barrier(a->pool, ith);
    for (int64_t s = ith; s < A; s += nth) {
        const int64_t t = a->token[v.order[s]];
        memcpy(v.xg + s * L.xgb, v.tq + t * L.xgb, L.xgb);
        if (!L.share_xu) memcpy(v.xu + s * L.xub, tqu + t * L.xub, L.xub);
    }
    mn_pool_barrier(a->pool, ith);
    open_phase(a, MN_MOE_GATE_UP, ith);          /* gate/up + SiLU, dynamic chunks */
    run_chunks(a, &v, MN_MOE_GATE_UP);
    close_phase(a, &v, MN_MOE_GATE_UP, ith);
    for (int64_t s = ith; s < A; s += nth)
        mn_quantize_act(a->down_type, v.G + s * I, v.hq + s * L.hqb, INTER(a, a->expert[v.order[s]]));
    mn_pool_barrier(a->pool, ith);
    open_phase(a, MN_MOE_DOWN, ith);
    run_chunks(a, &v, MN_MOE_DOWN);
    close_phase(a, &v, MN_MOE_DOWN, ith);
    if (a->boards && ith == 0) atomic_store_explicit(&a->boards[a->node].phase, MN_MOE_CLOSED, memory_order_release);
    /* weighted sum into out, columns split among threads (no races) */
    const int64_t c0 = H * ith / nth, c1 = H * (ith + 1) / nth;
    for (int64_t s = 0; s < A; s++) {
        const int32_t ai = v.order[s];
        const float wgt = a->weight[ai];
        float *o = a->out + (int64_t)a->token[ai] * a->out_stride;
        const float *y = v.Y + s * H;
        for (int64_t c = c0; c < c1; c++) o[c] += wgt * y[c];
    }
    if (a->boards) help_others(a);   /* this node is done: take what the others still have */
}
#undef INTER
#undef DSTRIDE

void mn_moe_experts(mn_moe_args *a) {
    if (a->pool) mn_pool_run(a->pool, mn_moe_task, a);
    else mn_moe_task(a, 0, 1);
}
