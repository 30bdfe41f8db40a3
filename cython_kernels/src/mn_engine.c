/* The NUMA engine's per-node block tasks (see mn_engine.h).
 *
 * A block task runs on every thread of one node's pool; phases are separated
 * by the pool's own barrier (cheap: the threads share the node).  Only the
 * block call itself synchronises across nodes.  Numerics follow the numpy
 * reference (moe_numa/layers): RMSNorm with a double sum, RoPE from tables the
 * reference computed, softmax in float, routing with the same tie rules. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <immintrin.h>

#include "mn_engine.h"
#include "mn_internal.h"

/* ------------------------------------------------------------ small helpers */
static inline void split(int64_t n, int ith, int nth, int64_t *a, int64_t *b) {
    const int64_t q = n / nth, r = n % nth;
    *a = ith * q + (ith < r ? ith : r);
    *b = *a + q + (ith < r ? 1 : 0);
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline size_t pad64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Bump allocation in a node's scratch.  p == NULL: sizing only (returns NULL).
 * Past the capacity it returns NULL and sets `over`; the layouts are carved
 * identically by every thread, so every thread then leaves the task alike. */
typedef struct { uint8_t *p; size_t used, cap; int over; } arena;
static void *carve(arena *a, size_t n) {
    const size_t n64 = pad64(n);
    if (n64 < n || a->used + n64 < a->used) { a->over = 1; return NULL; }
    if (!a->p) { a->used += n64; return NULL; }
    if (a->over || a->used + n64 > a->cap) { a->over = 1; return NULL; }
    void *r = a->p + a->used;
    a->used += n64;
    return r;
}
static arena sizing_arena(void) { arena a = {NULL, 0, SIZE_MAX, 0}; return a; }
static arena node_arena(const mn_node *nd) {
    const uintptr_t base = ((uintptr_t)nd->scratch + 63) & ~(uintptr_t)63;
    const size_t skip = (size_t)(base - (uintptr_t)nd->scratch);
    arena a = {(uint8_t *)base, 0, nd->scratch_bytes > skip ? nd->scratch_bytes - skip : 0, 0};
    return a;
}

/* attention micro-kernels per SIMD level (mn_attn_tmpl.h), each at its native vector width */
#define FA_MAXR 8   /* the most query rows one kernel pass takes (ATTN_ROWS) */
typedef struct {
    int rows;    /* query rows per pass, <= FA_MAXR */
    void (*scores)(const float *const *q, int nb, const void *tile, int qk, float scale, float *const *sc);
    void (*values)(const float *p, int64_t pstride, int nb, const void *v, int64_t vstride, int vd, int n,
                   const float *corr, float *const *o);
    /* the same on F16 storage, converted in registers (NULL: expand first) */
    void (*scores_h)(const float *const *q, int nb, const void *tile, int qk, float scale, float *const *sc);
    void (*values_h)(const float *p, int64_t pstride, int nb, const void *v, int64_t vstride, int vd, int n,
                     const float *corr, float *const *o);
    void (*cvt_f16)(const uint16_t *h, float *f, int64_t n);
    void (*cvt_q8_tile)(const uint8_t *tile, int64_t dim, float *f);
    void (*cvt_q8_row)(const uint8_t *row, int64_t dim, float *f);
} attn_ops;
#define ATTN_SUFFIX avx512
#define ATTN_TARGET __attribute__((target("avx512f,f16c,fma")))
#define ATTN_VW 16
#include "mn_attn_tmpl.h"
#undef ATTN_SUFFIX
#undef ATTN_TARGET
#undef ATTN_VW
#define ATTN_SUFFIX avx2
#define ATTN_TARGET __attribute__((target("avx2,fma,f16c")))
#define ATTN_VW 8
#include "mn_attn_tmpl.h"
#undef ATTN_SUFFIX
#undef ATTN_TARGET
#undef ATTN_VW
#define ATTN_SUFFIX base
#define ATTN_TARGET
#define ATTN_VW 4
#include "mn_attn_tmpl.h"
#undef ATTN_SUFFIX
#undef ATTN_TARGET
#undef ATTN_VW

static const attn_ops *attn_for_level(void) {
    const int lvl = mn_active_level();
    if (lvl >= MN_SIMD_AVX512) return &attn_ops_avx512;
    if (lvl >= MN_SIMD_AVX2) return &attn_ops_avx2;
    return &attn_ops_base;
}
static void rms_norm_row(const float *x, const float *w, float *y, int64_t n, float eps) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    const float scale = (float)(1.0 / sqrt(s / (double)n + (double)eps));
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] * scale) * (w ? w[i] : 1.0f);
}

/* rotate v[0..dims) in place for position p (tables: [p][dims/2]) */
static void rope_apply(float *v, int dims, int neox, const float *cos_t, const float *sin_t, int64_t p) {
    const int half = dims / 2;
    const float *c = cos_t + p * half, *s = sin_t + p * half;
    for (int i = 0; i < half; i++) {
        float *a = neox ? v + i : v + 2 * i;
        float *b = neox ? v + i + half : v + 2 * i + 1;
        const float x0 = *a, x1 = *b;
        *a = x0 * c[i] - x1 * s[i];
        *b = x0 * s[i] + x1 * c[i];
    }
}


/* activation rows of one input, one buffer per activation format */
typedef struct { int n; int type[3]; int kind[3]; uint8_t *buf[3]; size_t row[3]; } act_set;

static void act_add(act_set *s, int type, int64_t cols) {
    if (!type && !cols) return;
    const int k = mn_act_kind(type);
    for (int i = 0; i < s->n; i++) if (s->kind[i] == k) return;
    s->type[s->n] = type; s->kind[s->n] = k; s->row[s->n] = mn_act_row_bytes(type, cols); s->n++;
}
static void act_alloc(act_set *s, arena *a, int64_t T) {
    for (int i = 0; i < s->n; i++) s->buf[i] = (uint8_t *)carve(a, s->row[i] * (size_t)T);
}
static size_t act_bytes(const act_set *s, int64_t T) {
    size_t n = 0;
    for (int i = 0; i < s->n; i++) n += pad64(s->row[i] * (size_t)T);
    return n;
}
static void act_quantize(const act_set *s, const float *x, int64_t t, int64_t cols) {
    for (int i = 0; i < s->n; i++) mn_quantize_act(s->type[i], x, s->buf[i] + (size_t)t * s->row[i], cols);
}
static const uint8_t *act_of(const act_set *s, int type, size_t *row) {
    const int k = mn_act_kind(type);
    for (int i = 0; i < s->n; i++) if (s->kind[i] == k) { *row = s->row[i]; return s->buf[i]; }
    *row = 0;
    return NULL;
}

/* rows of several matrices (same input) split evenly over the threads */
typedef struct { const mn_mat *m; float *out; int64_t out_stride; const uint8_t *xq; size_t xq_row; } seg;

/* rows [a, b) of the matrices taken one after another */
static void segs_rows(const seg *s, int n, int64_t T, int64_t a, int64_t b) {
    int64_t base = 0;
    for (int i = 0; i < n; i++) {
        const int64_t r0 = a > base ? a - base : 0;
        const int64_t r1 = (b - base) < s[i].m->rows ? b - base : s[i].m->rows;
        if (r1 > r0)
            mn_matmul_rows(s[i].m->type, s[i].m->data, s[i].m->stride, s[i].m->cols, s[i].xq, s[i].xq_row, T,
                           s[i].out, s[i].out_stride, r0, r1);
        base += s[i].m->rows;
    }
}

static int64_t segs_total(const seg *s, int n) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += s[i].m->rows;
    return total;
}

static void matmul_segs(const seg *s, int n, int64_t T, int ith, int nth) {
    int64_t a, b;
    split(segs_total(s, n), ith, nth, &a, &b);
    segs_rows(s, n, T, a, b);
}

/* One matrix per head (rows x m[h].cols), rows of all heads split over the threads.
 * Head h reads T activation rows at xq + h*T*xq_row and writes row r of token t
 * to out[h*out_head + t*out_stride + r]. */
static void matmul_heads(const mn_mat *m, int64_t n_head, int64_t rows, const uint8_t *xq, size_t xq_row, int64_t T,
                         float *out, int64_t out_head, int64_t out_stride, int ith, int nth) {
    int64_t b0, b1;
    split(n_head * rows, ith, nth, &b0, &b1);
    for (int64_t h = 0; h < n_head; h++) {
        const int64_t r0 = b0 > h * rows ? b0 - h * rows : 0, r1 = (b1 - h * rows) < rows ? b1 - h * rows : rows;
        if (r1 > r0)
            mn_matmul_rows(m[h].type, m[h].data, m[h].stride, m[h].cols, xq + h * T * xq_row, xq_row, T,
                           out + h * out_head, out_stride, r0, r1);
    }
}

/* ------------------------------------------------------------ KV cache storage
 * Keys: per stream (slot x kv head, or slot for MLA's latent) tiles of 32 positions,
 *   F32 / F16: [dim][32] values;  Q8_0: int8 [dim][32], then fp16 scales [dim / 32][32]
 *   (one per 32 dims of a position, as ggml's Q8_0 row of that key).
 * Values: rows per position in the ggml row format of their type (F32, F16, Q8_0 blocks).
 * Rounding is ggml's: fp16 round-to-nearest-even; Q8_0 as its CPU quantize_row_q8_0. */
size_t mn_kv_tile_bytes(int type, int64_t dim) {
    if (dim < 1) return 0;
    switch (type) {
    case MN_F32: return (size_t)dim * 32 * 4;
    case MN_F16: return (size_t)dim * 32 * 2;
    case MN_Q8_0: return dim % 32 ? 0 : (size_t)dim * 32 + (size_t)(dim / 32) * 32 * 2;
    default: return 0;
    }
}

size_t mn_kv_row_bytes(int type, int64_t dim) {
    if (dim < 1) return 0;
    switch (type) {
    case MN_F32: return (size_t)dim * 4;
    case MN_F16: return (size_t)dim * 2;
    case MN_Q8_0: return dim % 32 ? 0 : (size_t)(dim / 32) * BS_Q8_0;
    default: return 0;
    }
}

static uint16_t f2h(float f) {   /* IEEE fp16, round to nearest even (as F16C and numpy) */
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);
    if (ax >= 0x477ff000u) return sign | 0x7c00;          /* rounds past 65504 */
    if (ax < 0x38800000u) {                               /* fp16 subnormal: let the FPU round at 2^-24 */
        float a;
        memcpy(&a, &ax, 4);
        a += 0.5f;
        uint32_t r;
        memcpy(&r, &a, 4);
        return sign | (uint16_t)(r - 0x3f000000u);
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1);                 /* rebias the exponent, round the mantissa */
    return sign | (uint16_t)(ax >> 13);
}

static void q8_block(const float *x, int8_t *q, uint16_t *dh) {
    float amax = 0.f;
    for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float d = amax / 127.f, id = amax != 0.f ? 127.f / amax : 0.f;
    for (int i = 0; i < 32; i++) q[i] = (int8_t)nearbyintf(x[i] * id);
    *dh = f2h(d);
}

/* key x[dim] into position `lane` of a tile */
static void kv_put_key(uint8_t *tile, int type, int64_t dim, int lane, const float *x) {
    if (type == MN_F32) {
        float *t = (float *)tile;
        for (int64_t i = 0; i < dim; i++) t[i * 32 + lane] = x[i];
    } else if (type == MN_F16) {
        uint16_t *t = (uint16_t *)tile;
        for (int64_t i = 0; i < dim; i++) t[i * 32 + lane] = f2h(x[i]);
    } else {
        int8_t *t = (int8_t *)tile, qb[32];
        uint16_t *ds = (uint16_t *)(tile + dim * 32);
        for (int64_t b = 0; b < dim / 32; b++) {
            q8_block(x + 32 * b, qb, &ds[b * 32 + lane]);
            for (int i = 0; i < 32; i++) t[(32 * b + i) * 32 + lane] = qb[i];
        }
    }
}

static void kv_put_row(uint8_t *row, int type, int64_t dim, const float *x) {
    if (type == MN_F32) {
        memcpy(row, x, sizeof(float) * dim);
    } else if (type == MN_F16) {
        uint16_t *r = (uint16_t *)row;
        for (int64_t i = 0; i < dim; i++) r[i] = f2h(x[i]);
    } else {
        for (int64_t b = 0; b < dim / 32; b++) {
            uint8_t *blk = row + b * BS_Q8_0;
            uint16_t dh;
            q8_block(x + 32 * b, (int8_t *)(blk + 2), &dh);
            memcpy(blk, &dh, 2);
        }
    }
}

/* a tile as floats [dim][32]: in place (F32) or expanded into buf */
static const float *kv_get_tile(const uint8_t *tile, int type, int64_t dim, float *buf, const attn_ops *A) {
    if (type == MN_F32) return (const float *)tile;
    if (type == MN_F16) A->cvt_f16((const uint16_t *)tile, buf, dim * 32);
    else A->cvt_q8_tile(tile, dim, buf);
    return buf;
}

/* n value rows as floats: in place (F32, *fstride = stride / 4) or expanded into buf [n][dim] */
static const float *kv_get_rows(const uint8_t *v, size_t stride, int type, int64_t dim, int n, float *buf,
                                int64_t *fstride, const attn_ops *A) {
    if (type == MN_F32) { *fstride = (int64_t)(stride / 4); return (const float *)v; }
    *fstride = dim;
    for (int s = 0; s < n; s++) {
        const uint8_t *row = v + s * stride;
        float *out = buf + s * dim;
        if (type == MN_F16) A->cvt_f16((const uint16_t *)row, out, dim);
        else A->cvt_q8_row(row, dim, out);
    }
    return buf;
}

/* ------------------------------------------------------------ flash attention
 * One query block (rows sharing one KV stream) against the stream's cache: key blocks of
 * FA_KB positions, each read (and expanded) once per block of up to FA_QB query rows, with
 * an online softmax per row.  A row's arithmetic depends only on its own query and
 * position (key blocks start at multiples of FA_KB; rows past a block's end skip it), so
 * any batch gives each token bit-identical results. */
#define FA_KB 64
#define FA_QB 64

typedef struct {
    const uint8_t *k; size_t tile_bytes; int ktype; int64_t qk;     /* key tiles */
    const uint8_t *v; size_t v_stride; int vtype; int64_t vd;       /* value rows */
} kv_stream;

typedef struct { const float *q[FA_QB]; float *o[FA_QB]; int64_t last[FA_QB]; int n; } qblock;

typedef struct { float *kbuf, *vbuf, *sc; } fa_scratch;   /* FA_KB * qk, FA_KB * vd, FA_MAXR * FA_KB floats */

/* the next key block's tiles and value rows, asked for while this block computes: the
 * cache is streamed from memory at depth (200 MB a token at 4096 positions on the Qwen3
 * bench model), in 8 KB tiles and value rows one KV head wide.  Into L2, not L1: a block
 * is 32 KB of keys and values, and fetched into L1 it evicted the block being computed */
static void fa_prefetch_block(const kv_stream *kv, int64_t k0, int nk) {
    const int ntile = (nk + 31) / 32;
    const char *kt = (const char *)(kv->k + (size_t)(k0 / 32) * kv->tile_bytes);
    for (size_t b = 0; b < (size_t)ntile * kv->tile_bytes; b += 64) _mm_prefetch(kt + b, _MM_HINT_T1);
    const size_t vrow = mn_row_bytes(kv->vtype, kv->vd);
    for (int s = 0; s < nk; s++) {
        const char *v = (const char *)(kv->v + (size_t)(k0 + s) * kv->v_stride);
        for (size_t b = 0; b < vrow; b += 64) _mm_prefetch(v + b, _MM_HINT_T1);
    }
}

static void flash_attend(const attn_ops *A, const kv_stream *kv, const qblock *B, float scale, const fa_scratch *F) {
    float m[FA_QB], l[FA_QB];
    int64_t hi = 0;
    for (int r = 0; r < B->n; r++) {
        m[r] = -INFINITY; l[r] = 0.f;
        memset(B->o[r], 0, sizeof(float) * kv->vd);
        if (B->last[r] + 1 > hi) hi = B->last[r] + 1;
    }
    const int R = A->rows;
    for (int64_t k0 = 0; k0 < hi; k0 += FA_KB) {
        const int nk = hi - k0 < FA_KB ? (int)(hi - k0) : FA_KB, ntile = (nk + 31) / 32;
        int act[FA_QB], na = 0;
        for (int r = 0; r < B->n; r++) if (B->last[r] >= k0) act[na++] = r;
        if (k0 + FA_KB < hi) fa_prefetch_block(kv, k0 + FA_KB, hi - k0 - FA_KB < FA_KB ? (int)(hi - k0 - FA_KB) : FA_KB);
        /* F16 storage is read in place by the _h kernels when one pass of rows reads the block
         * (decode: a GQA group, MLA's heads); more passes share one expansion instead, since the
         * conversion takes the FMA ports */
        const int one_pass = na <= R;
        const int kh = one_pass && kv->ktype == MN_F16 && A->scores_h, vh = one_pass && kv->vtype == MN_F16 && A->values_h;
        const void *kt[FA_KB / 32];
        for (int tt = 0; tt < ntile; tt++) {
            const uint8_t *tile = kv->k + (size_t)(k0 / 32 + tt) * kv->tile_bytes;
            kt[tt] = kh ? (const void *)tile : (const void *)kv_get_tile(tile, kv->ktype, kv->qk, F->kbuf + tt * kv->qk * 32, A);
        }
        int64_t vs;
        const void *vb;
        if (vh) { vb = kv->v + (size_t)k0 * kv->v_stride; vs = (int64_t)(kv->v_stride / 2); }
        else vb = kv_get_rows(kv->v + (size_t)k0 * kv->v_stride, kv->v_stride, kv->vtype, kv->vd, nk, F->vbuf, &vs, A);
        for (int g = 0; g < na; g += R) {
            const int nb = na - g < R ? na - g : R;
            const float *qs[FA_MAXR];
            float *sc[FA_MAXR], *os[FA_MAXR], corr[FA_MAXR];
            for (int j = 0; j < nb; j++) { qs[j] = B->q[act[g + j]]; sc[j] = F->sc + j * FA_KB; os[j] = B->o[act[g + j]]; }
            for (int tt = 0; tt < ntile; tt++) {
                float *st[FA_MAXR];
                for (int j = 0; j < nb; j++) st[j] = sc[j] + 32 * tt;
                (kh ? A->scores_h : A->scores)(qs, nb, kt[tt], (int)kv->qk, scale, st);
            }
            int nmax = 0;
            for (int j = 0; j < nb; j++) {
                const int r = act[g + j];
                const int nv = B->last[r] - k0 + 1 < nk ? (int)(B->last[r] - k0 + 1) : nk;
                const float mx = mn_max_of(sc[j], nv, m[r]);
                float sum;
                corr[j] = expf(m[r] - mx);
                sum = mn_exp_sum(sc[j], nv, mx);
                for (int s = nv; s < nk; s++) sc[j][s] = 0.f;
                l[r] = l[r] * corr[j] + sum;
                m[r] = mx;
                if (nv > nmax) nmax = nv;
            }
            for (int j = nb; j < R; j++) memset(F->sc + j * FA_KB, 0, sizeof(float) * (size_t)nmax);
            (vh ? A->values_h : A->values)(F->sc, FA_KB, nb, vb, vs, (int)kv->vd, nmax, corr, os);
        }
    }
    for (int r = 0; r < B->n; r++) {
        const float inv = 1.0f / l[r];
        for (int64_t i = 0; i < kv->vd; i++) B->o[r][i] *= inv;
    }
}

/* ------------------------------------------------------------ attention */
typedef struct {
    mn_engine *e; mn_node *node; const mn_attn_layer *L;
    const float *x; int64_t T;
    /* token t sits at position pos[t] of cache slot slot[t]; NULL: pos0 + t, slot 0 */
    int64_t pos0;
    const int64_t *pos; const int32_t *slot;
    /* scratch, carved identically by every thread */
    float *xn, *q, *k, *v, *qa, *kva, *kvb, *lat_n, *qlat, *olat, *ao, *att;
    int failed;                       /* the layout did not fit the scratch (set by thread 0) */
    int64_t att_stride;               /* floats of flash scratch per thread */
    act_set in, qa_act, lat_act, ao_act;
    uint8_t *qn_q, *olat_q;           /* MLA: per-head activations of q_nope / o_lat */
    size_t qn_row, olat_row;
    struct attn_board *boards;        /* prefill: the nodes share their projections (attn_share_min) */
    int phase;                        /* this thread's count of shared projections in the block */
} attn_ctx;

/* Prefill on several nodes: a node's projections (q/k/v, MLA's, the output) run in fixed chunks
 * of rows, and a thread out of its own node's chunks runs what is left of another node's open
 * projection (that node's weights and activations, read from its memory; the outputs written
 * where the owner would write them). A row's result does not depend on the rows run with it,
 * so the bits do not depend on who runs a chunk. */
#define ATTN_PHASES 4          /* shared projections in one block, at most (decompressed MLA's) */
#define SHARE_ROWS 32
typedef struct {
    mn_mat mats[3]; seg s[3];         /* copies: the owner's are on its threads' stacks */
    int n; int64_t T, rows, chunks;
    _Atomic int64_t next; char pad0[56];
    _Atomic int64_t done; char pad1[56];
} proj_job;
typedef struct attn_board {
    _Atomic int phase;                /* 1..ATTN_PHASES: jobs[phase - 1] is open to others; 0: closed */
    char pad0[60];
    _Atomic int64_t taken;            /* chunks of other nodes this node ran, summed */
    char pad1[56];
    proj_job jobs[ATTN_PHASES];
} attn_board;

/* Runs chunks of job j until none is left; returns how many it ran. */
static int64_t run_proj(proj_job *j) {
    int64_t ran = 0;
    for (;;) {
        const int64_t c = atomic_fetch_add(&j->next, 1);
        if (c >= j->chunks) break;
        segs_rows(j->s, j->n, j->T, c * SHARE_ROWS, (c + 1) * SHARE_ROWS < j->rows ? (c + 1) * SHARE_ROWS : j->rows);
        atomic_fetch_add_explicit(&j->done, 1, memory_order_release);
        ran++;
    }
    return ran;
}

/* What is left of the other nodes' open projections. A job is read only after its phase is
 * seen open (acquire); its owner leaves it only when every chunk is finished, and rewrites it
 * only in the next block, which starts when every node's task has returned. */
static void help_projections(const attn_ctx *C) {
    const mn_engine *e = C->e;
    const int me = (int)(C->node - e->nodes);
    int64_t ran = 0;
    for (int k = 1; k < e->n_nodes; k++) {
        attn_board *b = &C->boards[(me + k) % e->n_nodes];
        const int p = atomic_load_explicit(&b->phase, memory_order_acquire);
        if (p >= 1 && p <= ATTN_PHASES) ran += run_proj(&b->jobs[p - 1]);
    }
    if (ran) atomic_fetch_add_explicit(&C->boards[me].taken, ran, memory_order_relaxed);
}

/* matmul_segs of an attention block: shared with the other nodes in prefill (C->boards) */
static void project(attn_ctx *C, const seg *s, int n, int64_t T, int ith, int nth) {
    if (!C->boards || C->phase >= ATTN_PHASES) { matmul_segs(s, n, T, ith, nth); return; }
    attn_board *b = &C->boards[C->node - C->e->nodes];
    proj_job *j = &b->jobs[C->phase++];
    if (ith == 0) {
        j->n = n; j->T = T; j->rows = segs_total(s, n); j->chunks = (j->rows + SHARE_ROWS - 1) / SHARE_ROWS;
        for (int i = 0; i < n; i++) { j->mats[i] = *s[i].m; j->s[i] = s[i]; j->s[i].m = &j->mats[i]; }
        atomic_store(&j->next, 0); atomic_store(&j->done, 0);
        atomic_store_explicit(&b->phase, C->phase, memory_order_release);
    }
    mn_pool_barrier(C->node->pool, ith);
    run_proj(j);
    help_projections(C);
    while (atomic_load_explicit(&j->done, memory_order_acquire) < j->chunks) MN_CPU_RELAX();
}

static inline int64_t tok_pos(const attn_ctx *c, int64_t t) { return c->pos ? c->pos[t] : c->pos0 + t; }
static inline int64_t tok_slot(const attn_ctx *c, int64_t t) { return c->slot ? c->slot[t] : 0; }

static void attn_layout(attn_ctx *c, arena *a, int nth) {
    const mn_attn_layer *L = c->L;
    const int64_t T = c->T, H = L->hidden, nq = L->n_head;
    memset(&c->in, 0, sizeof(act_set)); memset(&c->qa_act, 0, sizeof(act_set));
    memset(&c->lat_act, 0, sizeof(act_set)); memset(&c->ao_act, 0, sizeof(act_set));
    c->xn = (float *)carve(a, sizeof(float) * T * H);
    const int64_t qrows = nq * L->qk_dim;
    c->q = (float *)carve(a, sizeof(float) * T * qrows);
    if (L->kind == MN_ATTN_GQA) {
        act_add(&c->in, L->wq.type, H); act_add(&c->in, L->wk.type, H); act_add(&c->in, L->wv.type, H);
        c->k = (float *)carve(a, sizeof(float) * T * L->n_kv * L->qk_dim);
        c->v = (float *)carve(a, sizeof(float) * T * L->n_kv * L->v_dim);
    } else {
        act_add(&c->in, L->q_lora ? L->wq_a.type : L->wq.type, H);
        act_add(&c->in, L->wkv_a.type, H);
        if (L->q_lora) {
            c->qa = (float *)carve(a, sizeof(float) * T * L->q_lora);
            act_add(&c->qa_act, L->wq_b.type, L->q_lora);
        }
        c->kva = (float *)carve(a, sizeof(float) * T * (L->kv_lora + L->rope_dims));
        if (L->kind == MN_ATTN_MLA_MHA) {
            c->lat_n = (float *)carve(a, sizeof(float) * T * L->kv_lora);
            act_add(&c->lat_act, L->wkv_b.type, L->kv_lora);
            c->kvb = (float *)carve(a, sizeof(float) * T * L->wkv_b.rows);
        } else if (nq > 0) {
            c->qn_row = mn_act_row_bytes(L->k_b[0].type, L->nope);
            c->qn_q = (uint8_t *)carve(a, c->qn_row * nq * T);
            c->qlat = (float *)carve(a, sizeof(float) * nq * T * L->kv_lora);
            c->olat = (float *)carve(a, sizeof(float) * nq * T * L->kv_lora);
            c->olat_row = mn_act_row_bytes(L->v_b[0].type, L->kv_lora);
            c->olat_q = (uint8_t *)carve(a, c->olat_row * nq * T);
        }
    }
    c->ao = (float *)carve(a, sizeof(float) * T * nq * L->v_dim);
    if (nq > 0) act_add(&c->ao_act, L->wo.type, nq * L->v_dim);
    act_alloc(&c->in, a, T); act_alloc(&c->qa_act, a, T); act_alloc(&c->lat_act, a, T); act_alloc(&c->ao_act, a, T);
    /* per thread: expanded keys and values of one key block, FA_MAXR rows of scores (+ MLA's query rows) */
    if (L->kind == MN_ATTN_MLA) {
        const int64_t kvw = L->kv_lora + L->rope_dims;
        c->att_stride = FA_KB * kvw + FA_KB * L->kv_lora + FA_MAXR * FA_KB + FA_QB * kvw;
    } else {
        c->att_stride = FA_KB * L->qk_dim + FA_KB * L->v_dim + FA_MAXR * FA_KB;
    }
    c->att = (float *)carve(a, sizeof(float) * c->att_stride * nth);
}

static size_t attn_scratch(const mn_attn_layer *L, int64_t T, int nth) {
    attn_ctx c;
    memset(&c, 0, sizeof c);
    c.L = L; c.T = T;
    arena a = sizing_arena();
    attn_layout(&c, &a, nth);
    return a.used + 64;
}

static void head_norm(float *v, const float *w, int n, float eps) { rms_norm_row(v, w, v, n, eps); }

#define MAX_HEAD_DIM 1024
#define MAX_LATENT 4096        /* kv_lora + rope_dims */
#define KV_TILES(n_ctx) (((n_ctx) + 31) / 32)

static fa_scratch fa_of(const attn_ctx *C, int ith, int64_t kdim, int64_t vdim) {
    float *base = C->att + C->att_stride * ith;
    fa_scratch f = {base, base + FA_KB * kdim, base + FA_KB * kdim + FA_KB * vdim};
    return f;
}

/* Shared prologue: norm + quantize the input rows, clear the partial output. */
static void attn_prologue(attn_ctx *C, int ith, int nth) {
    const mn_attn_layer *L = C->L;
    const int64_t H = L->hidden;
    float *partial = C->node->partial;
    int64_t a0, a1;
    split(C->T, ith, nth, &a0, &a1);
    for (int64_t t = a0; t < a1; t++) {
        rms_norm_row(C->x + t * H, L->attn_norm, C->xn + t * H, H, L->rms_eps);
        act_quantize(&C->in, C->xn + t * H, t, H);
        memset(partial + t * H, 0, sizeof(float) * H);
    }
    mn_pool_barrier(C->node->pool, ith);
}

/* Shared epilogue: this node's heads' outputs (ao) through its columns of wo -> partial. */
static void attn_epilogue(attn_ctx *C, int ith, int nth) {
    const mn_attn_layer *L = C->L;
    const int64_t nd = L->n_head * L->v_dim;
    int64_t a0, a1;
    size_t r;
    split(C->T, ith, nth, &a0, &a1);
    for (int64_t t = a0; t < a1; t++) act_quantize(&C->ao_act, C->ao + t * nd, t, nd);
    mn_pool_barrier(C->node->pool, ith);
    seg so = {&L->wo, C->node->partial, L->hidden, act_of(&C->ao_act, L->wo.type, &r), r};
    project(C, &so, 1, C->T, ith, nth);
}

/* MLA's query path (q = wq x, or wq_b(norm(wq_a x))) and the compressed kv_a = wkv_a x. */
static void mla_project(attn_ctx *C, int ith, int nth) {
    const mn_attn_layer *L = C->L;
    mn_pool *pool = C->node->pool;
    const mn_mat *wq = L->q_lora ? &L->wq_a : &L->wq;
    size_t r;
    seg s[2] = {{wq, L->q_lora ? C->qa : C->q, wq->rows, act_of(&C->in, wq->type, &r), r},
                {&L->wkv_a, C->kva, L->wkv_a.rows, NULL, 0}};
    s[1].xq = act_of(&C->in, L->wkv_a.type, &s[1].xq_row);
    project(C, s, 2, C->T, ith, nth);
    mn_pool_barrier(pool, ith);
    if (!L->q_lora) return;
    int64_t a0, a1;
    split(C->T, ith, nth, &a0, &a1);
    for (int64_t t = a0; t < a1; t++) {
        float *row = C->qa + t * L->q_lora;
        rms_norm_row(row, L->q_a_norm, row, L->q_lora, L->norm_eps);
        act_quantize(&C->qa_act, row, t, L->q_lora);
    }
    mn_pool_barrier(pool, ith);
    seg sb = {&L->wq_b, C->q, L->wq_b.rows, act_of(&C->qa_act, L->wq_b.type, &r), r};
    project(C, &sb, 1, C->T, ith, nth);
    mn_pool_barrier(pool, ith);
}

/* Per-head attention over per-head K/V caches (GQA, and decompressed MLA): per (kv head,
 * chunk of tokens), the group's query rows of consecutive same-slot tokens form the blocks. */
static void attend_heads(attn_ctx *C, int ith, int nth) {
    const mn_attn_layer *L = C->L;
    const int64_t T = C->T, nq = L->n_head, qk = L->qk_dim, vd = L->v_dim, tiles = KV_TILES(L->n_ctx);
    const size_t tb = mn_kv_tile_bytes(L->cache_type_k, qk), vb = mn_kv_row_bytes(L->cache_type_v, vd);
    int gmax = 1;
    for (int h = 0, n = 0; h < nq; h++) { n = h > 0 && L->q2kv[h] == L->q2kv[h - 1] ? n + 1 : 1; if (n > gmax) gmax = n; }
    const int64_t qt = gmax >= FA_QB ? 1 : FA_QB / gmax, nchunk = (T + qt - 1) / qt;
    const attn_ops *A = attn_for_level();
    const fa_scratch F = fa_of(C, ith, qk, vd);
    int64_t a0, a1;
    split(L->n_kv * nchunk, ith, nth, &a0, &a1);
    for (int64_t u = a0; u < a1; u++) {
        const int64_t g = u / nchunk, t0 = (u % nchunk) * qt, t1 = t0 + qt < T ? t0 + qt : T;
        int64_t h0 = 0, h1;
        while (h0 < nq && L->q2kv[h0] != g) h0++;
        for (h1 = h0; h1 < nq && L->q2kv[h1] == g; h1++) {}
        qblock B;
        B.n = 0;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t sl = tok_slot(C, t);
            for (int64_t h = h0; h < h1; h++) {
                B.q[B.n] = C->q + (t * nq + h) * qk;
                B.o[B.n] = C->ao + (t * nq + h) * vd;
                B.last[B.n] = tok_pos(C, t);
                B.n++;
                const int last = t + 1 == t1 || tok_slot(C, t + 1) != sl;
                if (B.n == FA_QB || (h + 1 == h1 && last)) {
                    const kv_stream kv = {(const uint8_t *)L->cache_k + (size_t)((sl * L->n_kv + g) * tiles) * tb, tb,
                                          L->cache_type_k, qk,
                                          (const uint8_t *)L->cache_v + (size_t)((sl * L->n_kv + g) * L->n_ctx) * vb,
                                          vb, L->cache_type_v, vd};
                    flash_attend(A, &kv, &B, L->kq_scale, &F);
                    B.n = 0;
                }
            }
        }
    }
}

/* store head h's key kc[qk] (roped) and value vv[vd] of the token at (slot, pos) */
static void store_kv(const mn_attn_layer *L, int64_t sl, int64_t pos, int64_t h, const float *kc, const float *vv) {
    const int64_t qk = L->qk_dim, vd = L->v_dim;
    const size_t tb = mn_kv_tile_bytes(L->cache_type_k, qk), vb = mn_kv_row_bytes(L->cache_type_v, vd);
    uint8_t *tile = (uint8_t *)L->cache_k + (size_t)((sl * L->n_kv + h) * KV_TILES(L->n_ctx) + pos / 32) * tb;
    kv_put_key(tile, L->cache_type_k, qk, (int)(pos % 32), kc);
    kv_put_row((uint8_t *)L->cache_v + (size_t)((sl * L->n_kv + h) * L->n_ctx + pos) * vb, L->cache_type_v, vd, vv);
}

/* Once every K/V row of the block is cached: attention per head, then the output projection. */
static void attend_then_project(attn_ctx *C, int ith, int nth) {
    mn_pool_barrier(C->node->pool, ith);
    attend_heads(C, ith, nth);
    mn_pool_barrier(C->node->pool, ith);
    attn_epilogue(C, ith, nth);
}

/* Grouped-query attention: q/k/v projections, biases, q/k norms, RoPE, cache, attention. */
static void gqa_task(attn_ctx *C, int ith, int nth) {
    const mn_attn_layer *L = C->L;
    mn_pool *pool = C->node->pool;
    const int64_t T = C->T, nq = L->n_head, nkv = L->n_kv, qk = L->qk_dim, vd = L->v_dim;
    attn_prologue(C, ith, nth);
    size_t r;
    seg s[3] = {{&L->wq, C->q, L->wq.rows, act_of(&C->in, L->wq.type, &r), r},
                {&L->wk, C->k, L->wk.rows, NULL, 0}, {&L->wv, C->v, L->wv.rows, NULL, 0}};
    s[1].xq = act_of(&C->in, L->wk.type, &s[1].xq_row);
    s[2].xq = act_of(&C->in, L->wv.type, &s[2].xq_row);
    project(C, s, 3, T, ith, nth);
    mn_pool_barrier(pool, ith);
    int64_t a0, a1;
    split(T * (nq + nkv), ith, nth, &a0, &a1);
    for (int64_t u = a0; u < a1; u++) {
        const int64_t t = u / (nq + nkv), j = u % (nq + nkv), pos = tok_pos(C, t);
        if (j < nq) {
            float *qh = C->q + (t * nq + j) * qk;
            if (L->bq) for (int64_t i = 0; i < qk; i++) qh[i] += L->bq[j * qk + i];
            if (L->q_norm) head_norm(qh, L->q_norm, (int)qk, L->norm_eps);
            rope_apply(qh + L->rope_off, L->rope_dims, L->rope_neox, L->rope_cos, L->rope_sin, pos);
            continue;
        }
        const int64_t h = j - nq;
        const float *kh = C->k + (t * nkv + h) * qk, *vh = C->v + (t * nkv + h) * vd;
        float kc[MAX_HEAD_DIM], vc[MAX_HEAD_DIM];
        for (int64_t i = 0; i < qk; i++) kc[i] = kh[i] + (L->bk ? L->bk[h * qk + i] : 0.f);
        for (int64_t i = 0; i < vd; i++) vc[i] = vh[i] + (L->bv ? L->bv[h * vd + i] : 0.f);
        if (L->k_norm) head_norm(kc, L->k_norm, (int)qk, L->norm_eps);
        rope_apply(kc + L->rope_off, L->rope_dims, L->rope_neox, L->rope_cos, L->rope_sin, pos);
        store_kv(L, tok_slot(C, t), pos, h, kc, vc);
    }
    attend_then_project(C, ith, nth);
}

/* MLA with the merged attn_kv_b (older files): decompress this node's heads' K/V from the
 * normed latent, cache them per head and attend as GQA does. */
static void mla_mha_task(attn_ctx *C, int ith, int nth) {
    const mn_attn_layer *L = C->L;
    mn_pool *pool = C->node->pool;
    const int64_t T = C->T, nq = L->n_head, qk = L->qk_dim, vd = L->v_dim, R = L->kv_lora, rd = L->rope_dims;
    attn_prologue(C, ith, nth);
    mla_project(C, ith, nth);
    int64_t a0, a1;
    size_t r;
    split(T, ith, nth, &a0, &a1);
    for (int64_t t = a0; t < a1; t++) {
        float *lat = C->lat_n + t * R;
        rms_norm_row(C->kva + t * (R + rd), L->kv_a_norm, lat, R, L->norm_eps);
        act_quantize(&C->lat_act, lat, t, R);
    }
    mn_pool_barrier(pool, ith);
    seg sk = {&L->wkv_b, C->kvb, L->wkv_b.rows, act_of(&C->lat_act, L->wkv_b.type, &r), r};
    project(C, &sk, 1, T, ith, nth);
    mn_pool_barrier(pool, ith);
    split(T * 2 * nq, ith, nth, &a0, &a1);
    for (int64_t u = a0; u < a1; u++) {
        const int64_t t = u / (2 * nq), j = u % (2 * nq), pos = tok_pos(C, t);
        if (j < nq) {
            rope_apply(C->q + (t * nq + j) * qk + L->rope_off, (int)rd, L->rope_neox, L->rope_cos, L->rope_sin, pos);
            continue;
        }
        /* k = [k_nope(h), rope(k_pe)], v = v(h), from the kv_b rows of local head h */
        const int64_t h = j - nq;
        const float *kvh = C->kvb + t * L->wkv_b.rows + h * (L->nope + vd);
        float kc[MAX_HEAD_DIM];
        memcpy(kc, kvh, sizeof(float) * L->nope);
        memcpy(kc + L->nope, C->kva + t * (R + rd) + R, sizeof(float) * rd);
        rope_apply(kc + L->rope_off, (int)rd, L->rope_neox, L->rope_cos, L->rope_sin, pos);
        store_kv(L, tok_slot(C, t), pos, h, kc, kvh + L->nope);
    }
    attend_then_project(C, ith, nth);
}

/* Absorbed MLA: one cache of [latent | roped k_pe] per token shared by all heads (keys;
 * the values are its latent part, as llama.cpp's V is a view of its K, so both use
 * cache_type_k).  q_nope goes through k_b into the latent space, the attention output
 * back through v_b. */
static void mla_task(attn_ctx *C, int ith, int nth) {
    const mn_attn_layer *L = C->L;
    mn_pool *pool = C->node->pool;
    const int64_t T = C->T, nq = L->n_head, qk = L->qk_dim, vd = L->v_dim, R = L->kv_lora, rd = L->rope_dims;
    const int64_t kvw = R + rd, tiles = KV_TILES(L->n_ctx);
    const int kt = L->cache_type_k;
    const size_t tb = mn_kv_tile_bytes(kt, kvw), vb = mn_kv_row_bytes(kt, R);
    attn_prologue(C, ith, nth);
    mla_project(C, ith, nth);
    /* RoPE on q_pe, q_nope quantized for k_b; the latent and rotary key of each token cached */
    int64_t a0, a1;
    split(T * (nq + 1), ith, nth, &a0, &a1);
    for (int64_t u = a0; u < a1; u++) {
        const int64_t t = u / (nq + 1), j = u % (nq + 1), pos = tok_pos(C, t), sl = tok_slot(C, t);
        if (j < nq) {
            float *qh = C->q + (t * nq + j) * qk;
            rope_apply(qh + L->nope, (int)rd, L->rope_neox, L->rope_cos, L->rope_sin, pos);
            mn_quantize_act(L->k_b[j].type, qh, C->qn_q + (j * T + t) * C->qn_row, L->nope);
            continue;
        }
        float key[MAX_LATENT];
        rms_norm_row(C->kva + t * kvw, L->kv_a_norm, key, R, L->norm_eps);
        memcpy(key + R, C->kva + t * kvw + R, sizeof(float) * rd);
        rope_apply(key + R, (int)rd, L->rope_neox, L->rope_cos, L->rope_sin, pos);
        kv_put_key((uint8_t *)L->cache_ktiles + (size_t)(sl * tiles + pos / 32) * tb, kt, kvw, (int)(pos % 32), key);
        kv_put_row((uint8_t *)L->cache_lat + (size_t)(sl * L->n_ctx + pos) * vb, kt, R, key);
    }
    mn_pool_barrier(pool, ith);
    /* absorb k_b into the query: q_lat[h, t] = k_b[h] @ q_nope[t, h] */
    matmul_heads(L->k_b, nq, R, C->qn_q, C->qn_row, T, C->qlat, T * R, R, ith, nth);
    mn_pool_barrier(pool, ith);
    /* attention in the latent space, query = [q_lat | q_pe]: units of (hb heads, FA_QB / hb tokens),
     * hb a multiple of 4 giving about one unit per thread at decode (every unit reads the whole cache) */
    const attn_ops *A = attn_for_level();
    const fa_scratch F = fa_of(C, ith, kvw, R);
    float *qcat = F.sc + FA_MAXR * FA_KB;
    int64_t hb = 4 * (((nq + 3) / 4 + nth - 1) / nth);
    if (hb > FA_QB) hb = FA_QB;
    const int64_t nhb = (nq + hb - 1) / hb, qt = FA_QB / hb, nchunk = (T + qt - 1) / qt;
    split(nhb * nchunk, ith, nth, &a0, &a1);
    for (int64_t u = a0; u < a1; u++) {
        const int64_t h0 = (u / nchunk) * hb, h1 = h0 + hb < nq ? h0 + hb : nq;
        const int64_t t0 = (u % nchunk) * qt, t1 = t0 + qt < T ? t0 + qt : T;
        qblock B;
        B.n = 0;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t sl = tok_slot(C, t);
            for (int64_t h = h0; h < h1; h++) {
                float *qj = qcat + B.n * kvw;
                memcpy(qj, C->qlat + (h * T + t) * R, sizeof(float) * R);
                memcpy(qj + R, C->q + (t * nq + h) * qk + L->nope, sizeof(float) * rd);
                B.q[B.n] = qj;
                B.o[B.n] = C->olat + (h * T + t) * R;
                B.last[B.n] = tok_pos(C, t);
                B.n++;
            }
            if (t + 1 == t1 || tok_slot(C, t + 1) != sl) {
                const kv_stream kv = {(const uint8_t *)L->cache_ktiles + (size_t)(sl * tiles) * tb, tb, kt, kvw,
                                      (const uint8_t *)L->cache_lat + (size_t)(sl * L->n_ctx) * vb, vb, kt, R};
                flash_attend(A, &kv, &B, L->kq_scale, &F);
                B.n = 0;
            }
        }
        for (int64_t t = t0; t < t1; t++)
            for (int64_t h = h0; h < h1; h++)
                mn_quantize_act(L->v_b[h].type, C->olat + (h * T + t) * R, C->olat_q + (h * T + t) * C->olat_row, R);
    }
    mn_pool_barrier(pool, ith);
    /* values out of the latent: ao[t, h] = v_b[h] @ o_lat[h, t] */
    matmul_heads(L->v_b, nq, vd, C->olat_q, C->olat_row, T, C->ao, vd, nq * vd, ith, nth);
    mn_pool_barrier(pool, ith);
    attn_epilogue(C, ith, nth);
}

static void attn_task(void *p, int ith, int nth) {
    attn_ctx *c = (attn_ctx *)p;
    const mn_attn_layer *L = c->L;
    const int64_t t_start = ith == 0 ? now_ns() : 0;
    if (L->kind == MN_ATTN_NONE || L->n_head == 0) {   /* no heads here: contribute nothing */
        int64_t a0, a1;
        split(c->T, ith, nth, &a0, &a1);
        memset(c->node->partial + a0 * L->hidden, 0, sizeof(float) * (a1 - a0) * L->hidden);
        if (c->boards) help_projections(c);
        return;
    }
    arena a = node_arena(c->node);
    attn_ctx C = *c;
    attn_layout(&C, &a, nth);
    if (a.over) { if (ith == 0) c->failed = 1; return; }
    if (L->kind == MN_ATTN_GQA) gqa_task(&C, ith, nth);
    else if (L->kind == MN_ATTN_MLA_MHA) mla_mha_task(&C, ith, nth);
    else mla_task(&C, ith, nth);
    if (C.boards) {   /* this node is done: close its board, take what the others still have */
        if (ith == 0) atomic_store_explicit(&C.boards[c->node - c->e->nodes].phase, 0, memory_order_release);
        help_projections(&C);
    }
    if (ith == 0) c->node->busy_ns += now_ns() - t_start;
}

/* ------------------------------------------------------------ feed-forward */
typedef struct {
    mn_engine *e; mn_node *node; const mn_ffn_layer *L;
    const float *x; int64_t T;
    mn_moe_board *boards;                 /* prefill: the nodes share their MoE chunks (moe_share_min) */
    int routed;                           /* ROUTED_TOKENS: norms, ids and weights came from ffn_route_task
                                             (e->shared); ROUTED_LOGITS: the router logits did */
    int64_t t0, t1;                       /* ffn_route_task: this node's share of the tokens ... */
    int64_t e0, e1;                       /* ... or of the router's rows (ROUTED_LOGITS) */
    float *xn, *logits, *gsc, *G, *U, *Y, *wts;
    int32_t *ids, *a_exp, *a_tok;         /* ids / wts: [T, n_used], best first */
    float *a_w;
    int64_t n_assign;
    act_set in, h_act;
    float *probs, *sel;                   /* [nth, n_expert]: each thread's routing scratch */
    int32_t *r_cnt, *r_chosen, *r_list;   /* replica choice: tokens per expert, chosen holder, order */
    uint8_t *moe_scratch; size_t moe_scratch_bytes;
    int failed;
} ffn_ctx;

enum { ROUTED_NO = 0, ROUTED_TOKENS = 1, ROUTED_LOGITS = 2 };

/* e->shared, carved the same way by every node: [t_max, hidden] norms, [t_max, n_used] ids and
 * weights, [t_max, n_expert] router logits */
typedef struct { float *xn; int32_t *ids; float *w; float *logits; mn_moe_board *boards; attn_board *attn; } route_share;
static int max_moe(const mn_engine *e, int experts) {
    int k = 0;
    for (int l = 0; l < e->n_layers; l++) {
        const mn_ffn_layer *L = &e->nodes[0].ffn[l];
        const int v = experts ? L->n_expert : L->n_used;
        if (L->kind == MN_FFN_MOE && v > k) k = v;
    }
    return k;
}
static int max_used(const mn_engine *e) { return max_moe(e, 0); }
static route_share share_layout(const mn_engine *e, arena *a) {
    route_share r;
    const int k = max_used(e);
    r.xn = (float *)carve(a, sizeof(float) * e->t_max * e->hidden);
    r.ids = (int32_t *)carve(a, sizeof(int32_t) * e->t_max * k);
    r.w = (float *)carve(a, sizeof(float) * e->t_max * k);
    r.logits = (float *)carve(a, sizeof(float) * e->t_max * max_moe(e, 1));
    r.boards = (mn_moe_board *)carve(a, sizeof(mn_moe_board) * e->n_nodes);
    r.attn = (attn_board *)carve(a, sizeof(attn_board) * e->n_nodes);
    return r;
}
size_t mn_engine_shared_bytes(const mn_engine *e) {
    if (!e || !e->nodes || e->n_nodes < 2 || !max_used(e)) return 64;
    arena a = sizing_arena();
    share_layout(e, &a);
    return a.used + 64;
}
static route_share engine_share(const mn_engine *e) {
    const uintptr_t base = ((uintptr_t)e->shared + 63) & ~(uintptr_t)63;
    arena a = {(uint8_t *)base, 0, e->shared_bytes - (size_t)(base - (uintptr_t)e->shared), 0};
    return share_layout(e, &a);
}
/* several nodes, and the region every node shares is there and large enough */
static int has_share(const mn_engine *e) {
    return e->n_nodes > 1 && e->shared && e->shared_bytes >= mn_engine_shared_bytes(e);
}
/* prefill work sharing applies to a block of T tokens from `min` of them (0: 64, -1: never) */
static int sharing(const mn_engine *e, int64_t min, int64_t T) {
    const int64_t from = min ? min : 64;
    return from > 0 && T >= from && has_share(e);
}
static int64_t read_taken(const mn_engine *e, int node, int attn, int reset) {
    if (!e || node < 0 || node >= e->n_nodes || !has_share(e)) return 0;
    const route_share r = engine_share(e);
    _Atomic int64_t *taken = attn ? &r.attn[node].taken : &r.boards[node].taken;
    return reset ? atomic_exchange(taken, 0) : atomic_load(taken);
}
int64_t mn_engine_moe_taken(const mn_engine *e, int node, int reset) { return read_taken(e, node, 0, reset); }
int64_t mn_engine_attn_taken(const mn_engine *e, int node, int reset) { return read_taken(e, node, 1, reset); }

static void ffn_moe_args(const ffn_ctx *c, mn_moe_args *m) {
    const mn_ffn_layer *L = c->L;
    memset(m, 0, sizeof *m);
    m->gate_type = L->gate_type; m->up_type = L->up_type; m->down_type = L->down_type;
    m->hidden = L->hidden; m->inter = L->inter; m->n_expert = L->n_expert;
    m->gate = L->gate_ptrs; m->gate_stride = L->gate_stride;
    m->up = L->up_ptrs; m->up_stride = L->up_stride;
    m->down = L->down_ptrs; m->down_stride = L->down_stride;
    m->inter_of = L->inter_of; m->down_stride_of = L->down_stride_of;
    m->n_assign = c->n_assign; m->expert = c->a_exp; m->token = c->a_tok; m->weight = c->a_w;
    m->x = c->xn; m->n_tok = c->T; m->x_stride = L->hidden;
    m->out = c->node ? c->node->partial : NULL; m->out_stride = L->hidden;
    m->scratch = c->moe_scratch; m->scratch_bytes = c->moe_scratch_bytes;
    m->pool = c->node ? c->node->pool : NULL;
    if (c->boards) { m->boards = c->boards; m->node = (int)(c->node - c->e->nodes); m->n_nodes = c->e->n_nodes; }
}

static void ffn_layout(ffn_ctx *c, arena *a, int nth) {
    const mn_ffn_layer *L = c->L;
    const int64_t T = c->T, H = L->hidden;
    memset(&c->in, 0, sizeof(act_set)); memset(&c->h_act, 0, sizeof(act_set));
    c->xn = (float *)carve(a, sizeof(float) * T * H);
    if (L->kind == MN_FFN_MOE) {
        if (!c->routed) act_add(&c->in, L->router.type, H);
        c->logits = (float *)carve(a, sizeof(float) * T * L->n_expert);
        c->probs = (float *)carve(a, sizeof(float) * nth * L->n_expert);
        c->sel = (float *)carve(a, sizeof(float) * nth * L->n_expert);
        c->ids = (int32_t *)carve(a, sizeof(int32_t) * T * L->n_used);
        c->wts = (float *)carve(a, sizeof(float) * T * L->n_used);
        c->a_exp = (int32_t *)carve(a, sizeof(int32_t) * T * L->n_used);
        c->a_tok = (int32_t *)carve(a, sizeof(int32_t) * T * L->n_used);
        c->a_w = (float *)carve(a, sizeof(float) * T * L->n_used);
        if (L->repl_nodes) {
            c->r_cnt = (int32_t *)carve(a, sizeof(int32_t) * L->n_expert);
            c->r_chosen = (int32_t *)carve(a, sizeof(int32_t) * L->n_expert);
            c->r_list = (int32_t *)carve(a, sizeof(int32_t) * L->n_expert);
        }
        mn_moe_args m;
        ffn_ctx probe = *c;
        probe.n_assign = T * L->n_used;
        ffn_moe_args(&probe, &m);
        c->moe_scratch_bytes = mn_moe_scratch_bytes(&m);
        c->moe_scratch = (uint8_t *)carve(a, c->moe_scratch_bytes);
    }
    c->gsc = (float *)carve(a, sizeof(float) * T);
    if (L->sh_ff > 0) {
        act_add(&c->in, L->sh_gate.type, H); act_add(&c->in, L->sh_up.type, H);
        act_add(&c->h_act, L->sh_down.type, L->sh_ff);
        c->G = (float *)carve(a, sizeof(float) * T * L->sh_ff);
        c->U = (float *)carve(a, sizeof(float) * T * L->sh_ff);
        c->Y = (float *)carve(a, sizeof(float) * T * H);
    }
    act_alloc(&c->in, a, T); act_alloc(&c->h_act, a, T);
    if (c->routed && c->e && c->e->shared) {   /* what every node reads */
        const route_share r = engine_share(c->e);
        if (c->routed == ROUTED_TOKENS) { c->xn = r.xn; c->ids = r.ids; c->wts = r.w; }
        else c->logits = r.logits;
    }
}

static size_t ffn_scratch(const mn_ffn_layer *L, int64_t T, int nth) {
    ffn_ctx c;
    memset(&c, 0, sizeof c);
    c.L = L; c.T = T;
    arena a = sizing_arena();
    ffn_layout(&c, &a, nth);
    return a.used + 64;
}

/* the router of one token: ids [n_used] best first and their weights */
static void route(const mn_ffn_layer *L, const float *logit, float *probs, float *sel, int32_t *ids, float *w) {
    const int E = L->n_expert;
    if (L->gating == MN_GATE_SOFTMAX) {
        const float mx = mn_max_of(logit, E, -INFINITY);
        float sum = 0;
        for (int e = 0; e < E; e++) { probs[e] = expf(logit[e] - mx); sum += probs[e]; }
        for (int e = 0; e < E; e++) probs[e] /= sum;
    } else {
        for (int e = 0; e < E; e++) probs[e] = 1.0f / (1.0f + expf(-logit[e]));
    }
    for (int e = 0; e < E; e++) sel[e] = probs[e] + (L->probs_bias ? L->probs_bias[e] : 0.f);
    if (L->n_groups > 1) {
        const int per = E / L->n_groups;
        float gscore[256];
        int keep[256];
        for (int g = 0; g < L->n_groups; g++) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int i = 0; i < per; i++) {
                const float v = sel[g * per + i];
                if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) b2 = v;
            }
            gscore[g] = L->group_rule == MN_GROUP_MAX ? b1 : b1 + b2;
            keep[g] = 0;
        }
        for (int k = 0; k < L->n_groups_used; k++) {   /* best groups, lower index first on ties */
            int best = -1;
            for (int g = 0; g < L->n_groups; g++)
                if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            keep[best] = 1;
        }
        for (int g = 0; g < L->n_groups; g++)
            if (!keep[g]) for (int i = 0; i < per; i++) sel[g * per + i] = -INFINITY;
    }
    for (int k = 0; k < L->n_used; k++) {              /* top-k, lower index first on ties */
        int best = -1;
        for (int e = 0; e < E; e++) {
            if (sel[e] == -INFINITY && best >= 0) continue;
            int taken = 0;
            for (int j = 0; j < k; j++) if (ids[j] == e) { taken = 1; break; }
            if (!taken && (best < 0 || sel[e] > sel[best])) best = e;
        }
        ids[k] = best;
        w[k] = probs[best];
    }
    if (L->norm_w) {
        float s = 0;
        for (int k = 0; k < L->n_used; k++) s += w[k];
        if (s < 6.103515625e-5f) s = 6.103515625e-5f;
        for (int k = 0; k < L->n_used; k++) w[k] /= s;
    }
    if (L->w_scale != 0.f && L->w_scale != 1.f)
        for (int k = 0; k < L->n_used; k++) w[k] *= L->w_scale;
}

/* Which holder runs each selected replicated expert for this batch.  Every node
 * runs this on the same routing and tables, so all agree without talking and
 * the result does not depend on timing.  A node's load is the sum, over the
 * batch's selected experts it holds without choice (whole or a split slice),
 * of its share of the expert's rows x (tokens + REPL_BIAS): an expert costs its
 * weight reads (the bias, about the tokens a tile amortises) plus its tokens.
 * Replicated experts then go, most tokens first (lower id on ties), to the
 * least-loaded holder (lower node id on ties). */
#define REPL_BIAS 4.0
static void choose_replicas(const mn_ffn_layer *L, const int32_t *a_exp, int64_t n, int32_t *cnt, int32_t *chosen,
                            int32_t *list) {
    const int E = L->n_expert, N = L->n_nodes;
    double load[64] = {0};
    for (int e = 0; e < E; e++) { cnt[e] = 0; chosen[e] = -1; }
    for (int64_t i = 0; i < n; i++) cnt[a_exp[i]]++;
    int nl = 0;
    for (int e = 0; e < E; e++) {
        if (!cnt[e]) continue;
        if (L->repl_nodes[e]) { list[nl++] = e; continue; }
        for (int k = 0; k < N; k++) load[k] += L->node_share[(int64_t)k * E + e] * (cnt[e] + REPL_BIAS);
    }
    for (int i = 1; i < nl; i++) {          /* insertion sort: tokens descending, id ascending */
        const int v = list[i];
        int j = i - 1;
        while (j >= 0 && (cnt[list[j]] < cnt[v] || (cnt[list[j]] == cnt[v] && list[j] > v))) { list[j + 1] = list[j]; j--; }
        list[j + 1] = v;
    }
    for (int i = 0; i < nl; i++) {
        const int e = list[i];
        int best = -1;
        for (int k = 0; k < N; k++)
            if ((L->repl_nodes[e] >> k & 1) && (best < 0 || load[k] < load[best])) best = k;
        chosen[e] = best;
        load[best] += cnt[e] + REPL_BIAS;
    }
}

/* Route tokens [t0, t1) (thread ith's share): C->ids / C->wts rows t, from logits rows t - lbase. */
static void route_tokens(const ffn_ctx *C, int64_t t0, int64_t t1, int64_t lbase, int ith) {
    const mn_ffn_layer *L = C->L;
    for (int64_t t = t0; t < t1; t++)
        route(L, C->logits + (t - lbase) * L->n_expert, C->probs + (int64_t)ith * L->n_expert,
              C->sel + (int64_t)ith * L->n_expert, C->ids + t * L->n_used, C->wts + t * L->n_used);
}

/* The router of a MoE block done once, not on every node.  ROUTED_TOKENS (prefill): this node
 * normalises its share of the tokens [t0, t1), runs the router on them and routes them, into
 * e->shared, which every node's ffn_task then reads.  ROUTED_LOGITS (a few tokens): this node
 * computes its share [e0, e1) of the router's rows for every token, so that the router's
 * bytes are read once in all, not once per node; every node then routes from the logits. */
static void ffn_route_task(void *p, int ith, int nth) {
    ffn_ctx *c = (ffn_ctx *)p;
    const mn_ffn_layer *L = c->L;
    const int64_t t_start = ith == 0 ? now_ns() : 0;
    const int64_t H = L->hidden;
    const int by_rows = c->routed == ROUTED_LOGITS;
    const int64_t first = by_rows ? 0 : c->t0, n = by_rows ? c->T : c->t1 - c->t0;
    if (n <= 0 || (by_rows && c->e1 <= c->e0)) return;
    arena a = node_arena(c->node);
    ffn_ctx C = *c;
    C.routed = ROUTED_NO;
    ffn_layout(&C, &a, nth);
    if (a.over) { if (ith == 0) c->failed = 1; return; }
    const route_share sh = engine_share(c->e);
    C.ids = sh.ids; C.wts = sh.w;
    /* by tokens the norms go to e->shared for every node; by rows each node keeps its own */
    float *xn = by_rows ? C.xn : sh.xn;
    int64_t a0, a1;
    size_t r;
    split(n, ith, nth, &a0, &a1);
    for (int64_t i = a0; i < a1; i++) {
        const int64_t t = first + i;
        rms_norm_row(c->x + t * H, L->ffn_norm, xn + t * H, H, L->rms_eps);
        act_quantize(&C.in, xn + t * H, i, H);
    }
    mn_pool_barrier(c->node->pool, ith);
    mn_mat rows = L->router;          /* by rows: this node's [e0, e1) of them, into the shared logits */
    if (by_rows) { rows.data += (size_t)c->e0 * rows.stride; rows.rows = c->e1 - c->e0; }
    seg sr = {&rows, by_rows ? sh.logits + c->e0 : C.logits, L->n_expert, act_of(&C.in, L->router.type, &r), r};
    matmul_segs(&sr, 1, n, ith, nth);
    if (!by_rows) {
        mn_pool_barrier(c->node->pool, ith);
        route_tokens(&C, c->t0 + a0, c->t0 + a1, c->t0, ith);
    }
    if (ith == 0) c->node->busy_ns += now_ns() - t_start;
}

static void ffn_task(void *p, int ith, int nth) {
    ffn_ctx *c = (ffn_ctx *)p;
    const mn_ffn_layer *L = c->L;
    const int64_t t_start = ith == 0 ? now_ns() : 0;
    const int64_t T = c->T, H = L->hidden;
    mn_pool *pool = c->node->pool;
    arena a = node_arena(c->node);
    ffn_ctx C = *c;
    ffn_layout(&C, &a, nth);
    if (a.over) { if (ith == 0) c->failed = 1; return; }
    float *partial = c->node->partial;
    int64_t a0, a1;
    size_t r;

    split(T, ith, nth, &a0, &a1);
    for (int64_t t = a0; t < a1; t++) {
        if (C.routed != ROUTED_TOKENS) rms_norm_row(c->x + t * H, L->ffn_norm, C.xn + t * H, H, L->rms_eps);
        act_quantize(&C.in, C.xn + t * H, t, H);
        memset(partial + t * H, 0, sizeof(float) * H);
        C.gsc[t] = 1.0f;
        if (L->sh_gate_vec) {
            double g = 0;
            for (int64_t i = 0; i < H; i++) g += (double)C.xn[t * H + i] * L->sh_gate_vec[i];
            C.gsc[t] = 1.0f / (1.0f + expf(-(float)g));
        }
    }
    mn_pool_barrier(pool, ith);

    if (L->kind == MN_FFN_MOE) {
        if (C.routed != ROUTED_TOKENS) {
            if (C.routed == ROUTED_NO) {
                seg sr = {&L->router, C.logits, L->n_expert, act_of(&C.in, L->router.type, &r), r};
                matmul_segs(&sr, 1, T, ith, nth);
                mn_pool_barrier(pool, ith);
            }
            route_tokens(&C, a0, a1, 0, ith);
            mn_pool_barrier(pool, ith);
        }
        if (ith == 0) {   /* every node knows every route; keep the local assignments */
            int64_t n = 0;
            int64_t *counts = L->node_id == 0 ? L->expert_tokens : NULL;
            for (int64_t t = 0; t < T; t++) {
                for (int k = 0; k < L->n_used; k++) {
                    const int e = C.ids[t * L->n_used + k];
                    if (counts) counts[e]++;
                    if (!L->repl_nodes && !L->gate_ptrs[e]) continue;
                    C.a_exp[n] = e; C.a_tok[n] = (int32_t)t; C.a_w[n] = C.wts[t * L->n_used + k]; n++;
                }
            }
            if (L->repl_nodes) {   /* all assignments were kept for the choice; keep this node's share */
                choose_replicas(L, C.a_exp, n, C.r_cnt, C.r_chosen, C.r_list);
                int64_t m = 0;
                for (int64_t i = 0; i < n; i++) {
                    const int e = C.a_exp[i];
                    if ((L->repl_nodes[e] && C.r_chosen[e] != L->node_id) || !L->gate_ptrs[e]) continue;
                    C.a_exp[m] = e; C.a_tok[m] = C.a_tok[i]; C.a_w[m] = C.a_w[i]; m++;
                }
                n = m;
            }
            c->n_assign = n;
            c->node->moe_assign += n;
        }
        mn_pool_barrier(pool, ith);
        C.n_assign = c->n_assign;
        mn_moe_args m;
        ffn_moe_args(&C, &m);
        mn_moe_task(&m, ith, nth);
        mn_pool_barrier(pool, ith);
    }

    if (L->sh_ff > 0) {   /* dense FFN or shared expert: this node's slice of the intermediate dim */
        seg s[2] = {{&L->sh_gate, C.G, L->sh_ff, act_of(&C.in, L->sh_gate.type, &r), r},
                    {&L->sh_up, C.U, L->sh_ff, NULL, 0}};
        s[1].xq = act_of(&C.in, L->sh_up.type, &s[1].xq_row);
        matmul_segs(s, 2, T, ith, nth);
        mn_pool_barrier(pool, ith);
        split(T, ith, nth, &a0, &a1);
        for (int64_t t = a0; t < a1; t++) {
            float *g = C.G + t * L->sh_ff;
            const float *u = C.U + t * L->sh_ff;
            mn_silu_mul(g, u, L->sh_ff);
            act_quantize(&C.h_act, g, t, L->sh_ff);
        }
        mn_pool_barrier(pool, ith);
        int64_t r0, r1;
        split(H, ith, nth, &r0, &r1);
        if (r1 > r0) {
            const uint8_t *hq = act_of(&C.h_act, L->sh_down.type, &r);
            mn_matmul_rows(L->sh_down.type, L->sh_down.data, L->sh_down.stride, L->sh_ff, hq, r, T, C.Y, H, r0, r1);
            for (int64_t t = 0; t < T; t++)
                for (int64_t i = r0; i < r1; i++) partial[t * H + i] += C.gsc[t] * C.Y[t * H + i];
        }
    }
    if (ith == 0) c->node->busy_ns += now_ns() - t_start;
}

/* ------------------------------------------------------------ output head */
typedef struct { mn_engine *e; mn_node *node; const float *x; int64_t T; float *logits; int failed; } head_ctx;

static size_t head_scratch(const mn_head_shard *h, int64_t T) {
    if (h->out.rows == 0) return 64;
    return pad64(sizeof(float) * T * h->hidden) + pad64(mn_act_row_bytes(h->out.type, h->hidden) * T) + 128;
}

static void head_task(void *p, int ith, int nth) {
    head_ctx *c = (head_ctx *)p;
    const mn_head_shard *h = &c->node->head;
    if (h->out.rows == 0) return;
    const int64_t H = h->hidden, T = c->T;
    arena a = node_arena(c->node);
    float *xn = (float *)carve(&a, sizeof(float) * T * H);
    const size_t row = mn_act_row_bytes(h->out.type, H);
    uint8_t *xq = (uint8_t *)carve(&a, row * T);
    if (a.over) { if (ith == 0) c->failed = 1; return; }
    int64_t a0, a1;
    split(T, ith, nth, &a0, &a1);
    for (int64_t t = a0; t < a1; t++) {
        rms_norm_row(c->x + t * H, h->norm, xn + t * H, H, h->rms_eps);
        mn_quantize_act(h->out.type, xn + t * H, xq + t * row, H);
    }
    mn_pool_barrier(c->node->pool, ith);
    split(h->out.rows, ith, nth, &a0, &a1);
    if (a1 > a0)
        mn_matmul_rows(h->out.type, h->out.data, h->out.stride, H, xq, row, T, c->logits + h->v0, h->vocab, a0, a1);
}

/* ------------------------------------------------------------ dispatch */
#define MAX_NODES 64

static void run_nodes(mn_engine *e, mn_task_fn fn, void *ctxs, size_t ctx_size, int is_ffn) {
    int64_t before[MAX_NODES];
    for (int n = 0; n < e->n_nodes; n++) before[n] = e->nodes[n].busy_ns;
    for (int n = 1; n < e->n_nodes; n++) mn_pool_submit(e->nodes[n].pool, fn, (char *)ctxs + n * ctx_size);
    mn_pool_submit(e->nodes[0].pool, fn, ctxs);
    mn_pool_wait(e->nodes[0].pool);
    const int64_t t0 = now_ns();
    for (int n = 1; n < e->n_nodes; n++) mn_pool_wait(e->nodes[n].pool);
    e->wait_ns += now_ns() - t0;
    e->syncs++;
    /* each node's idle time in this block: how long it waited on the slowest */
    int64_t slowest = 0;
    for (int n = 0; n < e->n_nodes; n++) {
        before[n] = e->nodes[n].busy_ns - before[n];
        if (before[n] > slowest) slowest = before[n];
    }
    for (int n = 0; n < e->n_nodes; n++) {
        e->nodes[n].idle_ns += slowest - before[n];
        if (is_ffn) e->nodes[n].ffn_busy_ns += before[n];
    }
    e->crit_ns += slowest;
    if (is_ffn) e->ffn_crit_ns += slowest;
}

/* x += every node's partial, in node order (so the sum does not depend on who adds). Small
 * blocks (decode) on the caller; large ones (prefill) split over every thread of every node,
 * one more sync, so the reduction no longer runs serially while the pools wait. */
typedef struct { mn_engine *e; float *x; int64_t n; int first, threads; } reduce_ctx;

static void reduce_range(const mn_engine *e, float *x, int64_t i0, int64_t i1) {
    for (int k = 0; k < e->n_nodes; k++) {
        const float *p = e->nodes[k].partial;
        for (int64_t i = i0; i < i1; i++) x[i] += p[i];
    }
}

static void reduce_task(void *p, int ith, int nth) {
    (void)nth;
    const reduce_ctx *c = (const reduce_ctx *)p;
    int64_t a, b;
    split(c->n / 16, c->first + ith, c->threads, &a, &b);   /* whole cache lines per thread */
    if (c->first + ith == c->threads - 1) b = c->n;         /* the last takes the remainder */
    else b *= 16;
    reduce_range(c->e, c->x, a * 16, b);
}

static void reduce_partials(mn_engine *e, float *x, int64_t T) {
    const int64_t n = T * e->hidden;
    const int64_t min = e->reduce_parallel_min > 0 ? e->reduce_parallel_min : (int64_t)1 << 18;
    if (e->n_nodes == 1 || n * e->n_nodes < min) { reduce_range(e, x, 0, n); return; }
    reduce_ctx ctx[MAX_NODES];
    int threads = 0;
    for (int k = 0; k < e->n_nodes; k++) threads += mn_pool_size(e->nodes[k].pool);
    for (int k = 0, first = 0; k < e->n_nodes; k++) {
        ctx[k] = (reduce_ctx){e, x, n, first, threads};
        first += mn_pool_size(e->nodes[k].pool);
    }
    run_nodes(e, reduce_task, ctx, sizeof(reduce_ctx), 0);
}

const char *mn_engine_strerror(int rc) {
    switch (rc) {
    case MN_ENGINE_OK: return "ok";
    case MN_ENGINE_ELAYER: return "layer index out of range";
    case MN_ENGINE_ETOKENS: return "token count out of range 1..t_max";
    case MN_ENGINE_EPOS: return "positions or slots out of range: need 0 <= pos0, pos0 + T <= n_ctx "
                                "(batched: 0 <= pos < n_ctx, 0 <= slot < n_slots)";
    case MN_ENGINE_ESCRATCH: return "a node's scratch is too small for this block";
    case MN_ENGINE_ESTATE: return "the engine has no nodes, buffers or pools (not finalized?)";
    default: return "unknown engine error";
    }
}

/* What every block call checks before touching anything. */
static int check_call(const mn_engine *e, int layer, int64_t T) {
    if (!e || !e->nodes || e->n_nodes < 1 || e->n_nodes > MAX_NODES) return MN_ENGINE_ESTATE;
    for (int n = 0; n < e->n_nodes; n++)
        if (!e->nodes[n].pool || !e->nodes[n].partial || !e->nodes[n].scratch) return MN_ENGINE_ESTATE;
    if (layer < -1 || layer >= e->n_layers) return MN_ENGINE_ELAYER;
    if (T < 1 || T > e->t_max) return MN_ENGINE_ETOKENS;
    return MN_ENGINE_OK;
}

static int attention(mn_engine *e, int layer, float *x, int64_t T, int64_t pos0, const int64_t *pos,
                     const int32_t *slot) {
    int rc = check_call(e, layer, T);
    if (rc) return rc;
    if (layer < 0) return MN_ENGINE_ELAYER;
    for (int n = 0; n < e->n_nodes; n++) {
        const mn_attn_layer *L = &e->nodes[n].attn[layer];
        if (L->kind == MN_ATTN_NONE || L->n_head == 0) continue;
        if (!pos) {
            if (pos0 < 0 || pos0 > L->n_ctx - T) return MN_ENGINE_EPOS;
        } else {
            for (int64_t t = 0; t < T; t++)
                if (pos[t] < 0 || pos[t] >= L->n_ctx || (slot && (slot[t] < 0 || slot[t] >= L->n_slots)))
                    return MN_ENGINE_EPOS;
        }
    }
    attn_ctx ctx[MAX_NODES];
    attn_board *boards = sharing(e, e->attn_share_min, T) ? engine_share(e).attn : NULL;
    for (int n = 0; n < e->n_nodes; n++) {
        memset(&ctx[n], 0, sizeof(attn_ctx));
        ctx[n].e = e; ctx[n].node = &e->nodes[n]; ctx[n].L = &e->nodes[n].attn[layer];
        ctx[n].x = x; ctx[n].T = T; ctx[n].pos0 = pos0;
        ctx[n].pos = pos; ctx[n].slot = slot; ctx[n].boards = boards;
    }
    run_nodes(e, attn_task, ctx, sizeof(attn_ctx), 0);
    for (int n = 0; n < e->n_nodes; n++) if (ctx[n].failed) return MN_ENGINE_ESCRATCH;
    reduce_partials(e, x, T);
    return MN_ENGINE_OK;
}

int mn_engine_attention(mn_engine *e, int layer, float *x, int64_t T, int64_t pos0) {
    return attention(e, layer, x, T, pos0, NULL, NULL);
}

int mn_engine_attention_batch(mn_engine *e, int layer, float *x, int64_t T, const int64_t *pos,
                              const int32_t *slot) {
    if (!pos) return MN_ENGINE_EPOS;
    return attention(e, layer, x, T, 0, pos, slot);
}

/* On several nodes a MoE block's router runs once, split over the nodes: by tokens (norm, router
 * and routing) from route_split_min tokens, by the router's rows below */
static int route_split(const mn_engine *e, const mn_ffn_layer *L, int64_t T) {
    if (L->kind != MN_FFN_MOE || e->route_split_min < 0 || !has_share(e)) return ROUTED_NO;
    const int64_t min = e->route_split_min > 0 ? e->route_split_min : 4;
    return T >= min ? ROUTED_TOKENS : ROUTED_LOGITS;
}

int mn_engine_ffn(mn_engine *e, int layer, float *x, int64_t T) {
    int rc = check_call(e, layer, T);
    if (rc) return rc;
    if (layer < 0) return MN_ENGINE_ELAYER;
    ffn_ctx ctx[MAX_NODES];
    const int routed = route_split(e, &e->nodes[0].ffn[layer], T);
    mn_moe_board *boards = e->nodes[0].ffn[layer].kind == MN_FFN_MOE && sharing(e, e->moe_share_min, T)
                           ? engine_share(e).boards : NULL;
    int threads = 0;
    for (int n = 0; n < e->n_nodes; n++) threads += mn_pool_size(e->nodes[n].pool);
    for (int n = 0, first = 0; n < e->n_nodes; n++) {
        memset(&ctx[n], 0, sizeof(ffn_ctx));
        ctx[n].e = e; ctx[n].node = &e->nodes[n]; ctx[n].L = &e->nodes[n].ffn[layer];
        ctx[n].x = x; ctx[n].T = T; ctx[n].boards = boards;
        /* a node routes tokens, or runs router rows, in proportion to its threads */
        const int nth = mn_pool_size(e->nodes[n].pool);
        const int64_t E = ctx[n].L->n_expert;
        ctx[n].t0 = T * first / threads; ctx[n].t1 = T * (first + nth) / threads;
        ctx[n].e0 = E * first / threads; ctx[n].e1 = E * (first + nth) / threads;
        first += nth;
    }
    if (routed) {
        for (int n = 0; n < e->n_nodes; n++) ctx[n].routed = routed;
        run_nodes(e, ffn_route_task, ctx, sizeof(ffn_ctx), 1);
        for (int n = 0; n < e->n_nodes; n++) if (ctx[n].failed) return MN_ENGINE_ESCRATCH;
    }
    run_nodes(e, ffn_task, ctx, sizeof(ffn_ctx), 1);
    for (int n = 0; n < e->n_nodes; n++) if (ctx[n].failed) return MN_ENGINE_ESCRATCH;
    reduce_partials(e, x, T);
    return MN_ENGINE_OK;
}

int mn_engine_forward(mn_engine *e, float *x, int64_t T, int64_t pos0, const int64_t *pos,
                      const int32_t *slot, int64_t logit_from, float *logits) {
    int rc = check_call(e, 0, T);
    if (rc) return rc;
    if (logits && (logit_from < 0 || logit_from >= T)) return MN_ENGINE_ETOKENS;
    for (int l = 0; l < e->n_layers; l++) {
        if ((rc = attention(e, l, x, T, pos0, pos, slot))) return rc;
        if ((rc = mn_engine_ffn(e, l, x, T))) return rc;
    }
    return logits ? mn_engine_head(e, x + logit_from * e->hidden, T - logit_from, logits) : MN_ENGINE_OK;
}

int mn_engine_head(mn_engine *e, const float *x, int64_t T, float *logits) {
    int rc = check_call(e, -1, T);
    if (rc) return rc;
    head_ctx ctx[MAX_NODES];
    for (int n = 0; n < e->n_nodes; n++) {
        memset(&ctx[n], 0, sizeof(head_ctx));
        ctx[n].e = e; ctx[n].node = &e->nodes[n]; ctx[n].x = x; ctx[n].T = T; ctx[n].logits = logits;
    }
    run_nodes(e, head_task, ctx, sizeof(head_ctx), 0);
    for (int n = 0; n < e->n_nodes; n++) if (ctx[n].failed) return MN_ENGINE_ESCRATCH;
    return MN_ENGINE_OK;
}

size_t mn_node_scratch_bytes(const mn_engine *e, int node) {
    const mn_node *nd = &e->nodes[node];
    const int nth = nd->pool ? mn_pool_size(nd->pool) : 1;
    size_t need = head_scratch(&nd->head, e->t_max);
    for (int l = 0; l < e->n_layers; l++) {
        if (nd->attn[l].kind != MN_ATTN_NONE && nd->attn[l].n_head > 0) {
            const size_t s = attn_scratch(&nd->attn[l], e->t_max, nth);
            if (s > need) need = s;
        }
        if (nd->ffn[l].kind != MN_FFN_NONE) {
            const size_t s = ffn_scratch(&nd->ffn[l], e->t_max, nth);
            if (s > need) need = s;
        }
    }
    return need;
}

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); return -1; } while (0)

/* A matrix of `rows` x `cols` (rows == 0: must be absent). */
static int check_mat(const mn_mat *m, int64_t rows, int64_t cols, const char *what, int node, int layer,
                     char *err, size_t errlen) {
    if (rows == 0 && m->rows == 0) return 0;
    if (m->rows != rows)
        FAIL("node %d layer %d: %s has %lld rows, expected %lld", node, layer, what, (long long)m->rows, (long long)rows);
    if (!m->data) FAIL("node %d layer %d: %s has no data", node, layer, what);
    if (!mn_type_supported(m->type)) FAIL("node %d layer %d: %s has unsupported type %d", node, layer, what, m->type);
    if (m->cols != cols || mn_row_bytes(m->type, m->cols) == 0 || m->stride < mn_row_bytes(m->type, m->cols))
        FAIL("node %d layer %d: %s is %lld x %lld (stride %zu), expected %lld columns",
             node, layer, what, (long long)m->rows, (long long)m->cols, m->stride, (long long)cols);
    return 0;
}

static int check_attn(const mn_engine *e, int n, int l, char *err, size_t errlen) {
    const mn_attn_layer *A = &e->nodes[n].attn[l];
    if (A->kind < MN_ATTN_NONE || A->kind > MN_ATTN_MLA_MHA) FAIL("node %d layer %d: attention kind %d unknown", n, l, A->kind);
    if (A->kind == MN_ATTN_NONE || A->n_head == 0) return 0;
    const int64_t H = A->hidden, nq = A->n_head, qk = A->qk_dim, vd = A->v_dim, rd = A->rope_dims;
    if (H != e->hidden) FAIL("node %d layer %d: attention hidden %lld, engine %lld", n, l, (long long)H, (long long)e->hidden);
    if (!A->attn_norm) FAIL("node %d layer %d: attn_norm missing", n, l);
    if (nq < 0 || A->n_kv < 1 || A->n_kv > nq || qk < 1 || vd < 1 || rd < 0 || rd % 2 || A->rope_off < 0)
        FAIL("node %d layer %d: n_head %d, n_kv %d, qk_dim %d, v_dim %d, rope_dims %d, rope_off %d are inconsistent",
             n, l, A->n_head, A->n_kv, A->qk_dim, A->v_dim, A->rope_dims, A->rope_off);
    if (qk > MAX_HEAD_DIM || vd > MAX_HEAD_DIM || rd > MAX_HEAD_DIM)
        FAIL("node %d layer %d: head size %lld / %lld exceeds %d", n, l, (long long)qk, (long long)vd, MAX_HEAD_DIM);
    if (A->kind == MN_ATTN_MLA ? A->kv_lora + rd > MAX_LATENT || !mn_kv_tile_bytes(A->cache_type_k, A->kv_lora + rd) ||
                                 !mn_kv_row_bytes(A->cache_type_k, A->kv_lora)
                               : !mn_kv_tile_bytes(A->cache_type_k, qk) || !mn_kv_row_bytes(A->cache_type_v, vd))
        FAIL("node %d layer %d: KV cache types %d / %d unsupported for key size %lld, value size %lld "
             "(F32, F16, or Q8_0 with sizes a multiple of 32; MLA: kv_lora + rope_dims <= %d)", n, l,
             A->cache_type_k, A->cache_type_v, (long long)(A->kind == MN_ATTN_MLA ? A->kv_lora + rd : qk),
             (long long)(A->kind == MN_ATTN_MLA ? A->kv_lora : vd), MAX_LATENT);
    if (A->n_ctx < 1 || A->n_slots < 1) FAIL("node %d layer %d: n_ctx %lld, n_slots %d", n, l, (long long)A->n_ctx, A->n_slots);
    if (rd > 0 && (!A->rope_cos || !A->rope_sin)) FAIL("node %d layer %d: RoPE tables missing", n, l);
    if (!A->q2kv) FAIL("node %d layer %d: q2kv missing", n, l);
    for (int h = 0; h < nq; h++) {   /* kv heads in range, and the query heads of a group contiguous */
        if (A->q2kv[h] < 0 || A->q2kv[h] >= A->n_kv || (h > 0 && A->q2kv[h] < A->q2kv[h - 1]))
            FAIL("node %d layer %d: q2kv[%d] = %d (need a non-decreasing map into 0..%d)", n, l, h, A->q2kv[h], A->n_kv - 1);
    }
    if (!(A->kq_scale == A->kq_scale)) FAIL("node %d layer %d: kq_scale is NaN", n, l);
    if (A->kind == MN_ATTN_GQA) {
        if (A->rope_off + rd > qk) FAIL("node %d layer %d: rope_off %d + rope_dims %d > qk_dim %d", n, l, A->rope_off, A->rope_dims, A->qk_dim);
        if (!A->cache_k || !A->cache_v) FAIL("node %d layer %d: KV cache missing", n, l);
        if (check_mat(&A->wq, nq * qk, H, "attn_q", n, l, err, errlen) ||
            check_mat(&A->wk, A->n_kv * qk, H, "attn_k", n, l, err, errlen) ||
            check_mat(&A->wv, A->n_kv * vd, H, "attn_v", n, l, err, errlen)) return -1;
    } else {
        const int64_t R = A->kv_lora;
        if (R < 1 || A->nope < 0 || A->q_lora < 0 || A->nope + rd != qk)
            FAIL("node %d layer %d: kv_lora %d, nope %d + rope_dims %d != qk_dim %d", n, l, A->kv_lora, A->nope, A->rope_dims, A->qk_dim);
        if (!A->kv_a_norm) FAIL("node %d layer %d: attn_kv_a_norm missing", n, l);
        if (check_mat(&A->wkv_a, R + rd, H, "attn_kv_a_mqa", n, l, err, errlen)) return -1;
        if (A->q_lora ? (!A->q_a_norm ? (snprintf(err, errlen, "node %d layer %d: attn_q_a_norm missing", n, l), -1) : 0) ||
                        check_mat(&A->wq_a, A->q_lora, H, "attn_q_a", n, l, err, errlen) ||
                        check_mat(&A->wq_b, nq * qk, A->q_lora, "attn_q_b", n, l, err, errlen)
                      : check_mat(&A->wq, nq * qk, H, "attn_q", n, l, err, errlen)) return -1;
        if (A->kind == MN_ATTN_MLA_MHA) {
            if (A->n_kv != nq) FAIL("node %d layer %d: MLA without k_b needs n_kv == n_head", n, l);
            if (!A->cache_k || !A->cache_v) FAIL("node %d layer %d: KV cache missing", n, l);
            if (check_mat(&A->wkv_b, nq * (A->nope + vd), R, "attn_kv_b", n, l, err, errlen)) return -1;
        } else {
            if (!A->cache_lat || !A->cache_ktiles) FAIL("node %d layer %d: latent cache missing", n, l);
            if (A->nope < 1 || !A->k_b || !A->v_b) FAIL("node %d layer %d: attn_k_b / attn_v_b missing", n, l);
            for (int h = 0; h < nq; h++) {
                if (check_mat(&A->k_b[h], R, A->nope, "attn_k_b", n, l, err, errlen) ||
                    check_mat(&A->v_b[h], vd, R, "attn_v_b", n, l, err, errlen)) return -1;
                if (A->k_b[h].type != A->k_b[0].type || A->v_b[h].type != A->v_b[0].type)
                    FAIL("node %d layer %d: attn_k_b / attn_v_b heads differ in type", n, l);
            }
        }
    }
    return check_mat(&A->wo, H, nq * vd, "attn_output", n, l, err, errlen);
}

static int check_ffn(const mn_engine *e, int n, int l, char *err, size_t errlen) {
    const mn_ffn_layer *F = &e->nodes[n].ffn[l];
    if (F->kind < MN_FFN_NONE || F->kind > MN_FFN_MOE) FAIL("node %d layer %d: ffn kind %d unknown", n, l, F->kind);
    if (F->kind == MN_FFN_NONE) return 0;
    const int64_t H = F->hidden;
    if (H != e->hidden) FAIL("node %d layer %d: ffn hidden %lld, engine %lld", n, l, (long long)H, (long long)e->hidden);
    if (!F->ffn_norm) FAIL("node %d layer %d: ffn_norm missing", n, l);
    if (F->kind == MN_FFN_MOE) {
        const int E = F->n_expert;
        if (E < 1 || E > 256 * 64) FAIL("node %d layer %d: n_expert %d out of range 1..%d", n, l, E, 256 * 64);
        if (F->n_used < 1 || F->n_used > E) FAIL("node %d layer %d: n_used %d out of range 1..n_expert (%d)", n, l, F->n_used, E);
        if (F->gating != MN_GATE_SOFTMAX && F->gating != MN_GATE_SIGMOID) FAIL("node %d layer %d: gating %d unknown", n, l, F->gating);
        if (F->group_rule != MN_GROUP_TOP2_SUM && F->group_rule != MN_GROUP_MAX) FAIL("node %d layer %d: group_rule %d unknown", n, l, F->group_rule);
        if (F->n_groups < 0 || F->n_groups > 256 || (F->n_groups > 1 && E % F->n_groups))
            FAIL("node %d layer %d: n_groups %d must be 0..256 and divide n_expert %d", n, l, F->n_groups, E);
        if (F->n_groups > 1 && (F->n_groups_used < 1 || F->n_groups_used > F->n_groups))
            FAIL("node %d layer %d: n_groups_used %d out of range 1..n_groups (%d)", n, l, F->n_groups_used, F->n_groups);
        if (F->n_groups > 1 && F->group_rule == MN_GROUP_TOP2_SUM && E / F->n_groups < 2)
            FAIL("node %d layer %d: top2_sum groups need 2 experts each", n, l);
        if (check_mat(&F->router, E, H, "ffn_gate_inp", n, l, err, errlen)) return -1;
        if (!F->gate_ptrs || !F->up_ptrs || !F->down_ptrs || !F->expert_tokens)
            FAIL("node %d layer %d: expert tables missing", n, l);
        if (F->inter < 1) FAIL("node %d layer %d: expert inter %lld", n, l, (long long)F->inter);
        const int types[3] = {F->gate_type, F->up_type, F->down_type};
        const int64_t cols[3] = {H, H, F->inter};
        const size_t strides[3] = {F->gate_stride, F->up_stride, F->down_stride};
        const uint8_t *const *ptrs[3] = {F->gate_ptrs, F->up_ptrs, F->down_ptrs};
        const char *names[3] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"};
        int local = 0;
        for (int x = 0; x < E; x++) {
            const int have = (ptrs[0][x] != NULL) + (ptrs[1][x] != NULL) + (ptrs[2][x] != NULL);
            if (have != 0 && have != 3) FAIL("node %d layer %d: expert %d has only %d of gate/up/down", n, l, x, have);
            local += have == 3;
        }
        if (local)
            for (int k = 0; k < 3; k++) {
                const size_t rb = mn_type_supported(types[k]) ? mn_row_bytes(types[k], cols[k]) : 0;
                if (!rb) FAIL("node %d layer %d: %s: type %d cannot hold %lld columns", n, l, names[k], types[k], (long long)cols[k]);
                if (k == 2 && F->inter_of) continue;   /* split experts: per-expert down rows, below */
                if (strides[k] < rb) FAIL("node %d layer %d: %s row stride %zu < row bytes %zu", n, l, names[k], strides[k], rb);
            }
        if (F->inter_of && !F->down_stride_of) FAIL("node %d layer %d: split experts need their down strides", n, l);
        for (int x = 0; F->inter_of && x < E; x++) {
            if (!ptrs[0][x]) continue;
            const int64_t ie = F->inter_of[x];
            const size_t rb = ie > 0 ? mn_row_bytes(F->down_type, ie) : 0;
            if (ie < 1 || ie > F->inter || !rb || F->down_stride_of[x] < rb)
                FAIL("node %d layer %d: expert %d: local inter %lld / down stride %zu do not fit (inter %lld)", n, l, x,
                     (long long)ie, F->down_stride_of[x], (long long)F->inter);
        }
        if (F->repl_nodes && (!F->node_share || F->n_nodes != e->n_nodes || F->node_id != n))
            FAIL("node %d layer %d: replicated experts need node_share and this node's id", n, l);
        for (int x = 0; F->repl_nodes && x < E; x++)
            if (F->repl_nodes[x] && ((F->repl_nodes[x] >> n & 1) != (F->gate_ptrs[x] != NULL) ||
                                     F->repl_nodes[x] >> e->n_nodes))
                FAIL("node %d layer %d: expert %d: the replica table and this node's weights disagree", n, l, x);
    }
    if (F->sh_ff < 0) FAIL("node %d layer %d: sh_ff %lld", n, l, (long long)F->sh_ff);
    if (F->sh_ff > 0 && (check_mat(&F->sh_gate, F->sh_ff, H, "ffn_gate(_shexp)", n, l, err, errlen) ||
                         check_mat(&F->sh_up, F->sh_ff, H, "ffn_up(_shexp)", n, l, err, errlen) ||
                         check_mat(&F->sh_down, H, F->sh_ff, "ffn_down(_shexp)", n, l, err, errlen))) return -1;
    return 0;
}

static int check_head(const mn_engine *e, int n, char *err, size_t errlen) {
    const mn_head_shard *h = &e->nodes[n].head;
    if (h->vocab < 1) FAIL("node %d: head vocab %lld", n, (long long)h->vocab);
    if (h->vocab != e->nodes[0].head.vocab) FAIL("node %d: head vocab %lld, node 0 has %lld", n, (long long)h->vocab, (long long)e->nodes[0].head.vocab);
    if (h->hidden != e->hidden) FAIL("node %d: head hidden %lld, engine %lld", n, (long long)h->hidden, (long long)e->hidden);
    if (!h->norm) FAIL("node %d: output_norm missing", n);
    if (h->v0 < 0 || h->out.rows < 0 || h->v0 > h->vocab - h->out.rows)
        FAIL("node %d: output rows [%lld, %lld) outside the vocabulary of %lld", n, (long long)h->v0,
             (long long)(h->v0 + h->out.rows), (long long)h->vocab);
    return check_mat(&h->out, h->out.rows, h->hidden, "output", n, -1, err, errlen);
}

int mn_engine_check_layer(const mn_engine *e, int node, int layer, char *err, size_t errlen) {
    if (!e || !e->nodes || node < 0 || node >= e->n_nodes || layer < -1 || layer >= e->n_layers)
        FAIL("node %d layer %d: out of range", node, layer);
    if (layer < 0) return e->nodes[node].head.vocab == 0 && e->nodes[node].head.hidden == 0 ? 0 : check_head(e, node, err, errlen);
    return check_attn(e, node, layer, err, errlen) || check_ffn(e, node, layer, err, errlen) ? -1 : 0;
}

int mn_engine_check(const mn_engine *e, char *err, size_t errlen) {
    if (!e || !e->nodes || e->n_nodes < 1 || e->n_nodes > MAX_NODES) FAIL("engine needs 1..%d nodes", MAX_NODES);
    if (e->hidden < 1 || e->t_max < 1 || e->n_layers < 0)
        FAIL("engine: hidden %lld, t_max %lld, n_layers %d", (long long)e->hidden, (long long)e->t_max, e->n_layers);
    for (int n = 0; n < e->n_nodes; n++) {
        const mn_node *nd = &e->nodes[n];
        if (!nd->pool) FAIL("node %d has no thread pool", n);
        if (!nd->attn || !nd->ffn) FAIL("node %d has no layer tables", n);
        if (!nd->partial) FAIL("node %d has no partial-output buffer", n);
        for (int l = 0; l < e->n_layers; l++)
            if (check_attn(e, n, l, err, errlen) || check_ffn(e, n, l, err, errlen)) return -1;
        if (check_head(e, n, err, errlen)) return -1;
        const size_t need = mn_node_scratch_bytes(e, n);
        if (!nd->scratch || nd->scratch_bytes < need) FAIL("node %d: scratch of %zu bytes, needs %zu", n, nd->scratch_bytes, need);
    }
    return 0;
}
