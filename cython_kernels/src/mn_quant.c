/* Activation quantization (llama.cpp numerics), the portable scalar kernels,
 * the run-time dispatch (the kernel columns of the type table) and the
 * row/tile driver mn_matmul_rows. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include "mn_internal.h"
#include "mn_iq.h"

float mn_fp16_table[65536];

static float fp16_to_fp32_bits(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, f;
    if (exp == 0) {
        if (mant == 0) f = sign;
        else {
            int e = -1;
            do { e++; mant <<= 1; } while (!(mant & 0x400));
            mant &= 0x3ff;
            f = sign | ((uint32_t)(112 - e) << 23) | (mant << 13);
        }
    } else if (exp == 31) f = sign | 0x7f800000u | (mant << 13);
    else f = sign | ((exp + 112) << 23) | (mant << 13);
    float r; memcpy(&r, &f, 4); return r;
}

/* round-to-nearest-even fp32 -> fp16 (same as F16C / ggml) */
static uint16_t fp32_to_fp16(float f) {
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    uint32_t w; memcpy(&w, &f, 4);
    const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    uint32_t bb = (bias >> 1) + 0x07800000u; float bf; memcpy(&bf, &bb, 4);
    base = bf + base;
    uint32_t bits; memcpy(&bits, &base, 4);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u, mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i; memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

static size_t pad64(size_t n) { return (n + 63) & ~(size_t)63; }

size_t mn_act_row_bytes(int wtype, int64_t cols) {
    if (!mn_row_bytes(wtype, cols)) return 0;
    switch (mn_act_kind(wtype)) {
    case ACT_FLOAT: return pad64((size_t)cols * 4);
    case ACT_Q8_0: return pad64((size_t)(cols / 32) * 44);
    case ACT_Q8_K: return pad64((size_t)(cols / QK_K) * 308);
    default: return 0;
    }
}

/* --------------------------------------------------- activation quantization */
static void quantize_q8_0(const float *x, uint8_t *xq, int64_t nb) {
    int8_t *qs = (int8_t *)xq;
    float *dd = (float *)(xq + 32 * nb);
    int32_t *ss = (int32_t *)(xq + 36 * nb);
    float *ms = (float *)(xq + 40 * nb);
    for (int64_t i = 0; i < nb; i++) {
        const float *v = x + 32 * i;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) { float a = fabsf(v[j]); if (a > amax) amax = a; }
        const float d = amax / 127.f;
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        int32_t s = 0;
        for (int j = 0; j < 32; j++) {
            int q = nearest_int(v[j] * id);       /* round half to even, as _mm256_round_ps */
            qs[32 * i + j] = (int8_t)q; s += q;
        }
        dd[i] = mn_h2f(fp32_to_fp16(d));
        ss[i] = s;
        ms[i] = mn_h2f(fp32_to_fp16(d * (float)s));
    }
}

static void quantize_q8_K(const float *x, uint8_t *xq, int64_t nb) {
    int8_t *qs = (int8_t *)xq;
    float *dd = (float *)(xq + QK_K * nb);
    int16_t *bs = (int16_t *)(xq + (QK_K + 4) * nb);
    int16_t *ps = (int16_t *)(xq + (QK_K + 4 + 32) * nb);
    for (int64_t i = 0; i < nb; i++) {
        const float *v = x + QK_K * i;
        int8_t *q = qs + QK_K * i;
        float max = 0.f, amax = 0.f;
        for (int j = 0; j < QK_K; j++) { float a = fabsf(v[j]); if (a > amax) { amax = a; max = v[j]; } }
        if (amax == 0.f) {
            dd[i] = 0.f; memset(q, 0, QK_K); memset(bs + 16 * i, 0, 32); memset(ps + 8 * i, 0, 16);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++) { int t = nearest_int(iscale * v[j]); q[j] = (int8_t)(t < 127 ? t : 127); }
        for (int k = 0; k < 16; k++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += q[16 * k + l];
            bs[16 * i + k] = (int16_t)s;
        }
        for (int k = 0; k < 8; k++) ps[8 * i + k] = (int16_t)(bs[16 * i + 2 * k] + bs[16 * i + 2 * k + 1]);
        dd[i] = 1.f / iscale;
    }
}

int mn_quantize_act(int wtype, const float *x, void *xq, int64_t cols) {
    /* Q8_0 scales are rounded through mn_fp16_table, which init_once fills: the
     * first kernel call of a process may be a quantization (it was zeros then) */
    (void)mn_kernels_init();
    if (!mn_type_supported(wtype)) return MN_ERR_TYPE;
    size_t rb = mn_act_row_bytes(wtype, cols);
    if (!rb) return MN_ERR_COLS;
    switch (mn_act_kind(wtype)) {
    case ACT_FLOAT: memcpy(xq, x, (size_t)cols * 4); memset((char *)xq + cols * 4, 0, rb - cols * 4); break;
    case ACT_Q8_0: quantize_q8_0(x, (uint8_t *)xq, cols / 32); break;
    default: quantize_q8_K(x, (uint8_t *)xq, cols / QK_K); break;
    }
    return MN_OK;
}

/* ------------------------------------------------------- scalar kernels */
static void dot_f32_s(const uint8_t *w, int64_t n, const uint8_t *xq, size_t xs, int nt, float *res) {
    const float *wf = (const float *)w;   /* may be unaligned only if caller passes odd rows: use memcpy-free path */
    for (int t = 0; t < nt; t++) {
        const float *x = (const float *)(xq + t * xs);
        float s = 0.f;
        for (int64_t i = 0; i < n; i++) { float v; memcpy(&v, wf + i, 4); s += v * x[i]; }
        res[t] = s;
    }
}
static void dot_f16_s(const uint8_t *w, int64_t n, const uint8_t *xq, size_t xs, int nt, float *res) {
    for (int t = 0; t < nt; t++) {
        const float *x = (const float *)(xq + t * xs);
        float s = 0.f;
        for (int64_t i = 0; i < n; i++) s += mn_h2f(mn_rd16(w + 2 * i)) * x[i];
        res[t] = s;
    }
}
static void dot_bf16_s(const uint8_t *w, int64_t n, const uint8_t *xq, size_t xs, int nt, float *res) {
    for (int t = 0; t < nt; t++) {
        const float *x = (const float *)(xq + t * xs);
        float s = 0.f;
        for (int64_t i = 0; i < n; i++) s += mn_bf2f(mn_rd16(w + 2 * i)) * x[i];
        res[t] = s;
    }
}

static void dot_q8_0_s(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *res) {
    for (int t = 0; t < nt; t++) {
        const int8_t *xqs = (const int8_t *)(xq + t * xs);
        const float *xd = (const float *)(xq + t * xs + 32 * nb);
        float s = 0.f;
        for (int64_t i = 0; i < nb; i++) {
            const uint8_t *b = w + i * BS_Q8_0; const int8_t *q = (const int8_t *)(b + 2);
            int sum = 0;
            for (int j = 0; j < 32; j++) sum += q[j] * xqs[32 * i + j];
            s += (float)sum * (mn_h2f(mn_rd16(b)) * xd[i]);
        }
        res[t] = s;
    }
}

static void dot_q4_0_s(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *res) {
    for (int t = 0; t < nt; t++) {
        const int8_t *xqs = (const int8_t *)(xq + t * xs);
        const float *xd = (const float *)(xq + t * xs + 32 * nb);
        float s = 0.f;
        for (int64_t i = 0; i < nb; i++) {
            const uint8_t *b = w + i * BS_Q4_0; const uint8_t *q = b + 2; const int8_t *x = xqs + 32 * i;
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += ((q[j] & 0xF) - 8) * x[j] + ((q[j] >> 4) - 8) * x[j + 16];
            s += (float)sum * (mn_h2f(mn_rd16(b)) * xd[i]);
        }
        res[t] = s;
    }
}

static inline void dot_kq_s(mn_unpack_fn unpack, size_t bsz, const uint8_t *w, int64_t nb,
                            const uint8_t *xq, size_t xs, int nt, float *res) {
    mn_kblock u;
    float acc[MN_TILE];
    for (int t = 0; t < nt; t++) acc[t] = 0.f;
    for (int64_t i = 0; i < nb; i++) {
        unpack(w + i * bsz, &u);
        for (int t = 0; t < nt; t++) {
            const int8_t *x = (const int8_t *)(xq + t * xs) + QK_K * i;
            const float dy = ((const float *)(xq + t * xs + QK_K * nb))[i];
            const int16_t *bs = (const int16_t *)(xq + t * xs + (QK_K + 4) * nb) + 16 * i;
            int isum = 0, msum = 0;
            for (int k = 0; k < 16; k++) {
                int s = 0;
                for (int l = 0; l < 16; l++) s += u.q[16 * k + l] * x[16 * k + l];
                isum += u.sc[k] * s; msum += u.m[k] * bs[k];
            }
            acc[t] += dy * u.d * (float)isum - dy * u.dmin * (float)msum;
        }
    }
    for (int t = 0; t < nt; t++) res[t] = acc[t];
}

#define KQ_SCALAR(name, T) \
    static void dot_##name##_s(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *res) { \
        dot_kq_s(mn_unpack_##name, BS_##T, w, nb, xq, xs, nt, res); }
KQ_SCALAR(q2_K, Q2_K)
KQ_SCALAR(q3_K, Q3_K)
KQ_SCALAR(q4_K, Q4_K)
KQ_SCALAR(q5_K, Q5_K)
KQ_SCALAR(q6_K, Q6_K)
KQ_SCALAR(iq4_xs, IQ4_XS)
KQ_SCALAR(iq2_xxs, IQ2_XXS)
KQ_SCALAR(iq2_xs, IQ2_XS)
KQ_SCALAR(iq2_s, IQ2_S)
KQ_SCALAR(iq3_xxs, IQ3_XXS)
KQ_SCALAR(iq3_s, IQ3_S)
KQ_SCALAR(iq1_s, IQ1_S)
KQ_SCALAR(iq1_m, IQ1_M)
KQ_SCALAR(tq2_0, TQ2_0)

/* 32-value blocks with Q8_0 activations: d*dx*sum(q*xq) (+ m*s, s the Q8_1 sum) */
static inline void dot_b32_s(mn_unpack32_fn unpack, size_t bsz, const uint8_t *w, int64_t nb,
                             const uint8_t *xq, size_t xs, int nt, float *res) {
    mn_b32 u;
    float acc[MN_TILE];
    for (int t = 0; t < nt; t++) acc[t] = 0.f;
    for (int64_t i = 0; i < nb; i++) {
        unpack(w + i * bsz, &u);
        for (int t = 0; t < nt; t++) {
            const int8_t *x = (const int8_t *)(xq + t * xs) + 32 * i;
            const float dx = ((const float *)(xq + t * xs + 32 * nb))[i];
            const float ms = ((const float *)(xq + t * xs + 40 * nb))[i];
            int sum = 0;
            for (int j = 0; j < 32; j++) sum += u.q[j] * x[j];
            acc[t] += (float)sum * (u.d * dx) + u.m * ms;
        }
    }
    for (int t = 0; t < nt; t++) res[t] = acc[t];
}
#define B32_SCALAR(name, T) \
    static void dot_##name##_s(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *res) { \
        dot_b32_s(mn_unpack_##name, BS_##T, w, nb, xq, xs, nt, res); }
B32_SCALAR(q4_1, Q4_1)
B32_SCALAR(q5_0, Q5_0)
B32_SCALAR(q5_1, Q5_1)
B32_SCALAR(iq4_nl, IQ4_NL)

void mn_fill_scalar(mn_traits *tab) {
#define SET(T, f) tab[MN_##T].dot[MN_SIMD_SCALAR] = f
    SET(F32, dot_f32_s); SET(F16, dot_f16_s); SET(BF16, dot_bf16_s);
    SET(Q8_0, dot_q8_0_s); SET(Q4_0, dot_q4_0_s);
    SET(Q2_K, dot_q2_K_s); SET(Q3_K, dot_q3_K_s); SET(Q4_K, dot_q4_K_s); SET(Q5_K, dot_q5_K_s); SET(Q6_K, dot_q6_K_s);
    SET(Q4_1, dot_q4_1_s); SET(Q5_0, dot_q5_0_s); SET(Q5_1, dot_q5_1_s); SET(IQ4_NL, dot_iq4_nl_s);
    SET(IQ4_XS, dot_iq4_xs_s);
    SET(IQ2_XXS, dot_iq2_xxs_s); SET(IQ2_XS, dot_iq2_xs_s); SET(IQ2_S, dot_iq2_s_s);
    SET(IQ3_XXS, dot_iq3_xxs_s); SET(IQ3_S, dot_iq3_s_s); SET(IQ1_S, dot_iq1_s_s); SET(IQ1_M, dot_iq1_m_s);
    SET(TQ2_0, dot_tq2_0_s);
#undef SET
}

/* ------------------------------------------------------------- dispatch */
static volatile int g_level = -1;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void init_once(void) {
    for (uint32_t h = 0; h < 65536; h++) mn_fp16_table[h] = fp16_to_fp32_bits((uint16_t)h);
    int cpu = mn_simd_level_cpu();
    mn_prefetch_init();
    mn_fill_scalar(mn_traits_table);
    if (cpu >= MN_SIMD_AVX2) mn_fill_avx2(mn_traits_table);
    if (cpu >= MN_SIMD_AVX512) mn_fill_avx512(mn_traits_table);
    if (cpu >= MN_SIMD_AVX512_VNNI) mn_fill_avx512vnni(mn_traits_table);
    /* a level without its own kernel for a type runs the level below's */
    for (int l = 1; l <= cpu && l < MN_N_LEVELS; l++)
        for (int t = 0; t < MN_MAX_TYPE; t++)
            if (!mn_traits_table[t].dot[l]) {
                mn_traits_table[t].dot[l] = mn_traits_table[t].dot[l - 1];
                mn_traits_table[t].multi[l] = mn_traits_table[t].multi[l - 1];
            }
    g_level = mn_simd_level();
}

int mn_kernels_init(void) { pthread_once(&g_once, init_once); return g_level; }

int mn_active_level(void) { return mn_kernels_init(); }

int mn_set_simd_level(int level) {
    mn_kernels_init();
    int cpu = mn_simd_level_cpu();
    if (level < 0) level = mn_simd_level();   /* back to CPUID / MOE_NUMA_SIMD */
    if (level > cpu) level = cpu;
    g_level = level;
    return g_level;
}

/* --------------------------------------------------------------- driver */
#define MN_MR_BUF (16 * 1024)    /* packed rows in L1 beside the tokens' tile */
#define MN_MR_TOK 64             /* tokens per pass over a packed group of rows */
#define MN_MR_ROWS 16            /* the most rows a multi-row kernel packs */
/* rows [r0, r1) (a multiple of g->rows) with g: each group of rows packed in chunks of
 * blocks, each chunk run for up to MN_MR_TOK tokens (a tile of MN_TILE at a time) */
static void multirow_block(const mn_multirow *g, const uint8_t *w, size_t ws, int64_t nb, const uint8_t *xq,
                           size_t xs, int64_t n_tok, float *out, int64_t out_stride, int64_t r0, int64_t r1) {
    uint8_t buf[MN_MR_BUF] __attribute__((aligned(64)));
    float acc[MN_MR_ROWS * 4 * MN_MR_TOK] __attribute__((aligned(64)));
    const int R = g->rows, P = 4;   /* partial sums per row and token (mn_multirow) */
    int64_t cb = (int64_t)(MN_MR_BUF / g->blk);
    if (cb < 1) cb = 1;   /* the kernels keep blk <= MN_MR_BUF */
    for (int64_t t0 = 0; t0 < n_tok; t0 += MN_MR_TOK) {
        const int64_t tn = n_tok - t0 < MN_MR_TOK ? n_tok - t0 : MN_MR_TOK;
        const uint8_t *x0 = xq + t0 * xs;
        for (int64_t r = r0; r < r1; r += R) {
            if (!g->inits || nb < P) memset(acc, 0, sizeof(float) * (size_t)(R * P * tn));
            for (int64_t i0 = 0; i0 < nb; i0 += cb) {
                const int64_t n = nb - i0 < cb ? nb - i0 : cb;
                g->pack(w + r * ws, ws, i0, n, buf);
                for (int64_t t = 0; t < tn; t += MN_TILE)
                    g->run(buf, i0, n, nb, x0 + t * xs, xs, (int)(tn - t < MN_TILE ? tn - t : MN_TILE), acc + R * P * t);
            }
            if (g->reduce) {
                g->reduce(acc, tn, out + t0 * out_stride + r, out_stride);
                continue;
            }
            for (int64_t t = 0; t < tn; t++)
                for (int j = 0; j < R; j++) {
                    const float *a = acc + R * P * t + j;
                    out[(t0 + t) * out_stride + r + j] = (a[0] + a[R]) + (a[2 * R] + a[3 * R]);
                }
        }
    }
}

int mn_matmul_rows(int wtype, const uint8_t *w, size_t w_row_stride, int64_t cols,
                   const void *xq_, size_t xq_stride, int64_t n_tok,
                   float *out, int64_t out_stride, int64_t r0, int64_t r1) {
    const int level = mn_kernels_init();
    if (wtype < 0 || wtype >= MN_MAX_TYPE || !mn_traits_table[wtype].dot[level]) return MN_ERR_TYPE;
    const size_t rb = mn_row_bytes(wtype, cols);
    if (!rb) return MN_ERR_COLS;
    if (n_tok < 0) return MN_ERR_ARGS;
    if (r1 <= r0 || n_tok == 0) return MN_OK;
    const mn_dot_fn f = mn_traits_table[wtype].dot[level];
    const int64_t nb = cols / mn_block_size(wtype);
    const uint8_t *xq = (const uint8_t *)xq_;
    if (n_tok == 1) {
        for (int64_t r = r0; r < r1; r++) f(w + r * w_row_stride, nb, xq, xq_stride, 1, out + r);
        return MN_OK;
    }
    /* GEMM: a block of rows that fits in L2 is streamed from memory once, then
     * reused from cache for every tile of MN_TILE tokens. */
    int64_t rows_blk = (int64_t)((256 * 1024) / rb);
    if (rows_blk < 1) rows_blk = 1;
    const mn_multirow *g = &mn_traits_table[wtype].multi[level];
    const int multi = g->run && n_tok >= g->min_tokens;
    /* whole groups per row block: else each block's rest ran on dot (Q8_0 at 2048 columns:
     * 120 rows a block, 8 of them on the slower path) */
    if (multi) rows_blk = rows_blk < g->rows ? g->rows : rows_blk / g->rows * g->rows;
    float res[MN_TILE];
    for (int64_t rr = r0; rr < r1; rr += rows_blk) {
        const int64_t re = rr + rows_blk < r1 ? rr + rows_blk : r1;
        const int64_t r4 = multi ? rr + (re - rr) / g->rows * g->rows : rr;
        if (r4 > rr) multirow_block(g, w, w_row_stride, nb, xq, xq_stride, n_tok, out, out_stride, rr, r4);
        for (int64_t t = 0; t < n_tok && r4 < re; t += MN_TILE) {
            const int nt = (int)(n_tok - t < MN_TILE ? n_tok - t : MN_TILE);
            const uint8_t *x = xq + t * xq_stride;
            for (int64_t r = r4; r < re; r++) {
                f(w + r * w_row_stride, nb, x, xq_stride, nt, res);
                for (int i = 0; i < nt; i++) out[(t + i) * out_stride + r] = res[i];
            }
        }
    }
    return MN_OK;
}
