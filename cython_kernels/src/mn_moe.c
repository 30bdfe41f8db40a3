/* Fused MoE expert kernel: for a whole layer's local experts, in one pool task:
 * group assignments by expert, quantize activations, gate/up (GEMM when an
 * expert has several tokens), SiLU(gate)*up, quantize, down, weighted sum. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include "mn_kernels.h"

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
    L->off_ctr = o;   o = ALIGN64(o + 256);
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

void mn_moe_task(void *argp, int ith, int nth) {
    mn_moe_args *a = (mn_moe_args *)argp;
    if (a->n_assign <= 0) return;
    moe_layout L; layout(a, &L);
    uint8_t *base = (uint8_t *)(((uintptr_t)a->scratch + 63) & ~(uintptr_t)63);
    int32_t *order = (int32_t *)(base + L.off_order);
    int64_t *eoff = (int64_t *)(base + L.off_eoff);
    int64_t *cg = (int64_t *)(base + L.off_chunk);            /* gate/up chunk prefix, n_expert+1 */
    int64_t *cd = cg + a->n_expert + 1;                        /* down chunk prefix */
    _Atomic int64_t *ctr = (_Atomic int64_t *)(base + L.off_ctr);
    uint8_t *xg = base + L.off_xg, *xu = base + L.off_xu, *hq = base + L.off_hq;
    float *G = (float *)(base + L.off_g), *U = (float *)(base + L.off_u), *Y = (float *)(base + L.off_y);
    const int64_t A = a->n_assign, E = a->n_expert, H = a->hidden, I = a->inter;
    /* whole experts: every expert has I rows; split experts: their local slice */
    const int64_t *IE = a->inter_of;
#define INTER(e) (IE ? IE[e] : I)
#define DSTRIDE(e) (IE ? a->down_stride_of[e] : a->down_stride)
    int64_t chg = chunk_rows((int64_t)mn_row_bytes(a->gate_type, H));
    int64_t chd = chunk_rows((int64_t)mn_row_bytes(a->down_type, I));

    if (ith == 0) {   /* group by expert (counting sort, stable) */
        for (int64_t e = 0; e <= E; e++) eoff[e] = 0;
        for (int64_t i = 0; i < A; i++) eoff[a->expert[i] + 1]++;
        /* Few active experts (decode): hand out long contiguous runs, about four
         * per thread per phase, so each thread streams long stretches of matrices
         * and the prefetchers are rarely restarted, while the phase's last run (which
         * the other threads wait for) stays short; two a thread left 2% more of
         * decode in waits (Sapphire Rapids, Qwen3 bench Q8_0), eight gained nothing.
         * Many (prefill): the cache-sized chunks balance the compute. */
        int64_t active = 0, active_rows = 0;
        for (int64_t e = 0; e < E; e++) if (eoff[e + 1] > 0) { active++; active_rows += INTER(e); }
        const int64_t runs = 4 * nth;
        const int64_t want_g = (active_rows + runs - 1) / runs, want_d = (active * H + runs - 1) / runs;
        if (want_g > chg) chg = want_g < I ? want_g : I;
        if (want_d > chd) chd = want_d < H ? want_d : H;
        atomic_store(&ctr[16], chg); atomic_store(&ctr[24], chd);
        cg[0] = cd[0] = 0;
        for (int64_t e = 0; e < E; e++) {
            const int64_t m = eoff[e + 1];
            cg[e + 1] = cg[e] + (m ? (INTER(e) + chg - 1) / chg : 0);
            cd[e + 1] = cd[e] + (m ? (H + chd - 1) / chd : 0);
            eoff[e + 1] += eoff[e];
        }
        /* stable placement using eoff as running cursor, then restore */
        for (int64_t i = 0; i < A; i++) order[eoff[a->expert[i]]++] = (int32_t)i;
        for (int64_t e = E; e > 0; e--) eoff[e] = eoff[e - 1];
        eoff[0] = 0;
        atomic_store(&ctr[0], 0); atomic_store(&ctr[8], 0);
    }
    mn_pool_barrier(a->pool, ith);
    chg = atomic_load(&ctr[16]); chd = atomic_load(&ctr[24]);
    /* Quantize each token once (a token goes to n_used experts), then gather the
     * rows into expert order, which the GEMM reads contiguously. */
    uint8_t *tq = base + L.off_tq, *tqu = tq + (size_t)a->n_tok * L.xgb;
    for (int64_t t = ith; t < a->n_tok; t += nth) {
        const float *xr = a->x + t * a->x_stride;
        mn_quantize_act(a->gate_type, xr, tq + t * L.xgb, H);
        if (!L.share_xu) mn_quantize_act(a->up_type, xr, tqu + t * L.xub, H);
    }
    mn_pool_barrier(a->pool, ith);
    for (int64_t s = ith; s < A; s += nth) {
        const int64_t t = a->token[order[s]];
        memcpy(xg + s * L.xgb, tq + t * L.xgb, L.xgb);
        if (!L.share_xu) memcpy(xu + s * L.xub, tqu + t * L.xub, L.xub);
    }
    mn_pool_barrier(a->pool, ith);
    /* gate/up + SiLU, dynamic chunks */
    {
        int64_t e = 0;
        for (;;) {
            const int64_t c = atomic_fetch_add(&ctr[0], 1);
            if (c >= cg[E]) break;
            while (cg[e + 1] <= c) e++;
            const int64_t Ie = INTER(e);
            const int64_t r0 = (c - cg[e]) * chg, r1 = r0 + chg < Ie ? r0 + chg : Ie;
            const int64_t o = eoff[e], m = eoff[e + 1] - o;
            mn_matmul_rows(a->gate_type, a->gate[e], a->gate_stride, H, xg + o * L.xgb, L.xgb, m, G + o * I, I, r0, r1);
            mn_matmul_rows(a->up_type, a->up[e], a->up_stride, H, xu + o * (L.share_xu ? L.xgb : L.xub),
                           L.share_xu ? L.xgb : L.xub, m, U + o * I, I, r0, r1);
            for (int64_t t = o; t < o + m; t++) mn_silu_mul(G + t * I + r0, U + t * I + r0, r1 - r0);
        }
    }
    mn_pool_barrier(a->pool, ith);
    for (int64_t s = ith; s < A; s += nth)
        mn_quantize_act(a->down_type, G + s * I, hq + s * L.hqb, IE ? INTER(a->expert[order[s]]) : I);
    mn_pool_barrier(a->pool, ith);
    {
        int64_t e = 0;
        for (;;) {
            const int64_t c = atomic_fetch_add(&ctr[8], 1);
            if (c >= cd[E]) break;
            while (cd[e + 1] <= c) e++;
            const int64_t r0 = (c - cd[e]) * chd, r1 = r0 + chd < H ? r0 + chd : H;
            const int64_t o = eoff[e], m = eoff[e + 1] - o;
            mn_matmul_rows(a->down_type, a->down[e], DSTRIDE(e), INTER(e), hq + o * L.hqb, L.hqb, m, Y + o * H, H, r0, r1);
        }
    }
    mn_pool_barrier(a->pool, ith);
    /* weighted sum into out, columns split among threads (no races) */
    const int64_t c0 = H * ith / nth, c1 = H * (ith + 1) / nth;
    for (int64_t s = 0; s < A; s++) {
        const int32_t ai = order[s];
        const float wgt = a->weight[ai];
        float *o = a->out + (int64_t)a->token[ai] * a->out_stride;
        const float *y = Y + s * H;
        for (int64_t c = c0; c < c1; c++) o[c] += wgt * y[c];
    }
#undef INTER
#undef DSTRIDE
}

void mn_moe_experts(mn_moe_args *a) {
    if (a->pool) mn_pool_run(a->pool, mn_moe_task, a);
    else mn_moe_task(a, 0, 1);
}
