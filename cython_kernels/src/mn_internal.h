/* Internal helpers shared by the kernel sources: block layouts, fp16/bf16
 * conversion, activation row layouts, K-quant unpacking, the dispatch table. */
#ifndef MN_INTERNAL_H
#define MN_INTERNAL_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include "mn_kernels.h"
#include "mn_cpu.h"

#define QK_K 256
#define QK8_0 32

/* one spin-wait step: lets the sibling hyperthread run while this one polls */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MN_CPU_RELAX() _mm_pause()
#else
#define MN_CPU_RELAX() ((void)0)
#endif

/* GGML block layouts (bytes per block); the type table (mn_types.c) is built from these */
#define BS_Q4_0 18   /* fp16 d; u8 qs[16] (low nibbles: values 0-15, high: 16-31) */
#define BS_Q4_1 20   /* fp16 d; fp16 m; u8 qs[16] */
#define BS_Q5_0 22   /* fp16 d; u8 qh[4] (bit j: fifth bit of value j); u8 qs[16] */
#define BS_Q5_1 24   /* fp16 d; fp16 m; u8 qh[4]; u8 qs[16] */
#define BS_Q8_0 34   /* fp16 d; i8 qs[32] */
#define BS_IQ4_NL 18 /* fp16 d; u8 qs[16]: nibbles index kvalues_iq4nl */
#define BS_Q2_K 84   /* u8 scales[16]; u8 qs[64]; fp16 d; fp16 dmin */
#define BS_Q3_K 110  /* u8 hmask[32]; u8 qs[64]; u8 scales[12]; fp16 d */
#define BS_Q4_K 144  /* fp16 d; fp16 dmin; u8 scales[12]; u8 qs[128] */
#define BS_Q5_K 176  /* fp16 d; fp16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] */
#define BS_Q6_K 210  /* u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d */
#define BS_IQ4_XS 136 /* fp16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128] */
#define BS_TQ2_0 66   /* u8 qs[64] (2-bit q + 1, ordered as Q2_K's); fp16 d */

/* the non-linear 4-bit values of IQ4_NL / IQ4_XS */
static const int8_t mn_kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* Activation row layouts (private):
 *  Q8_0 partner: int8 qs[32*nb] | float d[nb] (fp16-rounded scales) | int32 sum[nb]
 *                | float s[nb]: fp16(d * sum) with d before its rounding, llama.cpp's Q8_1
 *                  `s`, which the min term of Q4_1 / Q5_1 multiplies (m * s, not m * d * sum)
 *  Q8_K partner: int8 qs[256*nb] | float d[nb] | int16 bsums[16*nb] (sums of 16)
 *                | int16 psums[8*nb] (sums of 32)
 *  float partner: float x[cols]
 * Each row is padded to a multiple of 64 bytes. */
#define ACT_FLOAT MN_ACT_FLOAT
#define ACT_Q8_0 MN_ACT_Q8_0
#define ACT_Q8_K MN_ACT_Q8_K

/* kernel: res[t] = dot(weight row w (nb blocks), activation row t) for t < nt (1..MN_TILE) */
typedef void (*mn_dot_fn)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs,
                          int nt, float *res);

/* A GEMM kernel over several rows at once, for many tokens (optional, per type and level):
 * pack(w, ws, i0, n, buf) lays blocks [i0, i0 + n) of `rows` rows (w, w + ws, ...) out
 * interleaved in buf (n * blk bytes, 64-aligned); run(buf, i0, n, nb, xq, xs, nt, acc)
 * continues the partial sums acc[(4 * t + k) * rows + j] (token t < nt <= MN_TILE, part k
 * = block index % 4, row j) over those blocks; the driver adds a row's four parts pairwise:
 * (p0 + p1) + (p2 + p3), as dot does.  The packing is paid once for every token of a call.  A level's
 * run must give, bit for bit, what the same level's dot gives row by row: the driver picks
 * either by shape.  A run with `inits` writes part k of blocks 0-3 instead of adding to it,
 * so the driver zeroes acc only where a row has fewer than 4 blocks; `reduce`, where a
 * level has one, is the driver's pairwise sum into out at the level's vector width. */
typedef void (*mn_pack_fn)(const uint8_t *w, size_t ws, int64_t i0, int64_t n, void *buf);
typedef void (*mn_run_fn)(const void *buf, int64_t i0, int64_t n, int64_t nb, const uint8_t *xq, size_t xs,
                          int nt, float *acc);
/* out[t * out_stride + j] = (a[j] + a[R + j]) + (a[2R + j] + a[3R + j]), a = acc + 4 R t, j < R, t < tn */
typedef void (*mn_reduce_fn)(const float *acc, int64_t tn, float *out, int64_t out_stride);
typedef struct {
    mn_pack_fn pack;
    mn_run_fn run;
    size_t blk;        /* packed bytes per block of the rows */
    int rows;          /* rows per pack: 4, 8 or 16 */
    int min_tokens;    /* from this many tokens in a call it beats dot */
    int inits;         /* run writes the parts of blocks 0-3 (see above) */
    mn_reduce_fn reduce;
} mn_multirow;

/* a row of the type table: the public facts plus a kernel per SIMD level
 * (NULL: none; the levels above the scalar one inherit the level below, with its multi) */
typedef struct {
    mn_type_info info;
    mn_dot_fn dot[MN_N_LEVELS];
    mn_multirow multi[MN_N_LEVELS];
} mn_traits;
extern mn_traits mn_traits_table[MN_MAX_TYPE];

static inline int mn_act_kind(int wtype) {
    return (wtype >= 0 && wtype < MN_MAX_TYPE && mn_traits_table[wtype].info.block)
        ? mn_traits_table[wtype].info.act : MN_ACT_NONE;
}

/* fills the kernel columns of the table once (and the fp16 table); returns the active level */
int mn_kernels_init(void);
void mn_fill_scalar(mn_traits *tab);
void mn_fill_avx2(mn_traits *tab);
void mn_fill_avx512(mn_traits *tab);
void mn_fill_avx512vnni(mn_traits *tab);

static inline uint16_t mn_rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

extern float mn_fp16_table[65536];
static inline float mn_h2f(uint16_t h) { return mn_fp16_table[h]; }
static inline float mn_bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* ---- K-quant superblock unpacked to int8 values and per-16 integer scales ----
 * dot(block, x) = dy * (d * sum_k sc[k] * sum_{i<16} q[16k+i] x[16k+i]
 *                       - dmin * sum_k m[k] * bsums[k]) */
typedef struct {
    int8_t q[QK_K] __attribute__((aligned(64)));
    int16_t sc[16] __attribute__((aligned(32)));
    int16_t m[16] __attribute__((aligned(32)));
    float d, dmin;
} mn_kblock;

static inline void mn_scale_min_k4(int j, const uint8_t *q, int *d, int *m) {
    if (j < 4) { *d = q[j] & 63; *m = q[j + 4] & 63; }
    else { *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

static inline void mn_unpack_q2_K(const uint8_t *b, mn_kblock *u) {
    const uint8_t *sc = b, *qs = b + 16;
    u->d = mn_h2f(mn_rd16(b + 80)); u->dmin = mn_h2f(mn_rd16(b + 82));
    for (int k = 0; k < 16; k++) { u->sc[k] = sc[k] & 0xF; u->m[k] = sc[k] >> 4; }
    int8_t *y = u->q;
    for (int n = 0; n < 2; n++) {
        const uint8_t *q = qs + 32 * n;
        for (int shift = 0; shift < 8; shift += 2)
            for (int l = 0; l < 32; l++) *y++ = (q[l] >> shift) & 3;
    }
}

static inline void mn_unpack_q3_K(const uint8_t *b, mn_kblock *u) {
    const uint8_t *hm = b, *qs = b + 32, *s = b + 96;
    u->d = mn_h2f(mn_rd16(b + 108)); u->dmin = 0.f;
    for (int k = 0; k < 16; k++) {
        int lo = (k < 8) ? (s[k] & 0xF) : (s[k - 8] >> 4);
        int hi = (s[8 + (k & 3)] >> (2 * (k >> 2))) & 3;
        u->sc[k] = (int16_t)((lo | (hi << 4)) - 32);
        u->m[k] = 0;
    }
    int8_t *y = u->q; int bit = 0;
    for (int n = 0; n < 2; n++) {
        const uint8_t *q = qs + 32 * n;
        for (int shift = 0; shift < 8; shift += 2, bit++)
            for (int l = 0; l < 32; l++)
                *y++ = (int8_t)(((q[l] >> shift) & 3) - ((hm[l] >> bit) & 1 ? 0 : 4));
    }
}

/* Q4_K/Q5_K: d, dmin and the 8 packed 6-bit scale/min pairs, one per 32 values (stored per 16) */
static inline void mn_unpack_k4_scales(const uint8_t *b, const uint8_t *s, mn_kblock *u) {
    u->d = mn_h2f(mn_rd16(b)); u->dmin = mn_h2f(mn_rd16(b + 2));
    for (int j = 0; j < 8; j++) {
        int sc, m; mn_scale_min_k4(j, s, &sc, &m);
        u->sc[2 * j] = u->sc[2 * j + 1] = (int16_t)sc; u->m[2 * j] = u->m[2 * j + 1] = (int16_t)m;
    }
}

static inline void mn_unpack_q4_K(const uint8_t *b, mn_kblock *u) {
    const uint8_t *s = b + 4, *q = b + 16;
    mn_unpack_k4_scales(b, s, u);
    int8_t *y = u->q;
    for (int j = 0; j < 4; j++, q += 32) {
        for (int l = 0; l < 32; l++) *y++ = q[l] & 0xF;
        for (int l = 0; l < 32; l++) *y++ = q[l] >> 4;
    }
}

static inline void mn_unpack_q5_K(const uint8_t *b, mn_kblock *u) {
    const uint8_t *s = b + 4, *qh = b + 16, *q = b + 48;
    mn_unpack_k4_scales(b, s, u);
    int8_t *y = u->q;
    for (int j = 0; j < 4; j++, q += 32) {
        for (int l = 0; l < 32; l++) *y++ = (q[l] & 0xF) | (((qh[l] >> (2 * j)) & 1) << 4);
        for (int l = 0; l < 32; l++) *y++ = (q[l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
    }
}

static inline void mn_unpack_q6_K(const uint8_t *b, mn_kblock *u) {
    const uint8_t *ql = b, *qh = b + 128; const int8_t *s = (const int8_t *)(b + 192);
    u->d = mn_h2f(mn_rd16(b + 208)); u->dmin = 0.f;
    for (int k = 0; k < 16; k++) { u->sc[k] = s[k]; u->m[k] = 0; }
    for (int n = 0; n < 2; n++) {
        int8_t *y = u->q + 128 * n; const uint8_t *l0 = ql + 64 * n, *h = qh + 32 * n;
        for (int l = 0; l < 32; l++) {
            y[l] = (int8_t)(((l0[l] & 0xF) | (((h[l] >> 0) & 3) << 4)) - 32);
            y[l + 32] = (int8_t)(((l0[l + 32] & 0xF) | (((h[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = (int8_t)(((l0[l] >> 4) | (((h[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = (int8_t)(((l0[l + 32] >> 4) | (((h[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

typedef void (*mn_unpack_fn)(const uint8_t *b, mn_kblock *u);

static inline void mn_unpack_tq2_0(const uint8_t *b, mn_kblock *u) {
    u->d = mn_h2f(mn_rd16(b + 64)); u->dmin = 0.f;
    for (int k = 0; k < 16; k++) { u->sc[k] = 1; u->m[k] = 0; }
    int8_t *y = u->q;
    for (int n = 0; n < 2; n++)
        for (int shift = 0; shift < 8; shift += 2)
            for (int l = 0; l < 32; l++) *y++ = (int8_t)(((b[32 * n + l] >> shift) & 3) - 1);
}

/* ---- 32-value blocks unpacked to int8 values: value j = d * q[j] + m ---- */
typedef struct { int8_t q[32]; float d, m; } mn_b32;

static inline uint32_t mn_rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t mn_rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline void mn_unpack_q4_0(const uint8_t *b, mn_b32 *u) {
    u->d = mn_h2f(mn_rd16(b)); u->m = 0.f;
    for (int j = 0; j < 16; j++) { u->q[j] = (int8_t)((b[2 + j] & 0xF) - 8); u->q[j + 16] = (int8_t)((b[2 + j] >> 4) - 8); }
}
static inline void mn_unpack_q4_1(const uint8_t *b, mn_b32 *u) {
    u->d = mn_h2f(mn_rd16(b)); u->m = mn_h2f(mn_rd16(b + 2));
    for (int j = 0; j < 16; j++) { u->q[j] = b[4 + j] & 0xF; u->q[j + 16] = b[4 + j] >> 4; }
}
static inline void mn_unpack_q5_0(const uint8_t *b, mn_b32 *u) {
    const uint32_t qh = mn_rd32(b + 2);
    u->d = mn_h2f(mn_rd16(b)); u->m = 0.f;
    for (int j = 0; j < 16; j++) {
        u->q[j] = (int8_t)(((b[6 + j] & 0xF) | (((qh >> j) & 1) << 4)) - 16);
        u->q[j + 16] = (int8_t)(((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
}
static inline void mn_unpack_q5_1(const uint8_t *b, mn_b32 *u) {
    const uint32_t qh = mn_rd32(b + 4);
    u->d = mn_h2f(mn_rd16(b)); u->m = mn_h2f(mn_rd16(b + 2));
    for (int j = 0; j < 16; j++) {
        u->q[j] = (int8_t)((b[8 + j] & 0xF) | (((qh >> j) & 1) << 4));
        u->q[j + 16] = (int8_t)((b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
}
static inline void mn_unpack_iq4_nl(const uint8_t *b, mn_b32 *u) {
    u->d = mn_h2f(mn_rd16(b)); u->m = 0.f;
    for (int j = 0; j < 16; j++) { u->q[j] = mn_kvalues_iq4nl[b[2 + j] & 0xF]; u->q[j + 16] = mn_kvalues_iq4nl[b[2 + j] >> 4]; }
}
typedef void (*mn_unpack32_fn)(const uint8_t *b, mn_b32 *u);

/* IQ4_XS: 8 sub-blocks of 32, 6-bit scales (ls - 32), IQ4_NL values */
static inline int mn_iq4_xs_scale(const uint8_t *b, int ib) {
    const int lo = (b[4 + ib / 2] >> (4 * (ib & 1))) & 0xF, hi = (mn_rd16(b + 2) >> (2 * ib)) & 3;
    return (lo | (hi << 4)) - 32;
}
static inline void mn_unpack_iq4_xs(const uint8_t *b, mn_kblock *u) {
    u->d = mn_h2f(mn_rd16(b)); u->dmin = 0.f;
    for (int ib = 0; ib < 8; ib++) {
        const int s = mn_iq4_xs_scale(b, ib);
        const uint8_t *q = b + 8 + 16 * ib;
        u->sc[2 * ib] = u->sc[2 * ib + 1] = (int16_t)s; u->m[2 * ib] = u->m[2 * ib + 1] = 0;
        for (int j = 0; j < 16; j++) {
            u->q[32 * ib + j] = mn_kvalues_iq4nl[q[j] & 0xF];
            u->q[32 * ib + j + 16] = mn_kvalues_iq4nl[q[j] >> 4];
        }
    }
}

/* The SIMD 32-value kernels' leftover blocks [i, nb), scalar, added to tail[t]: for each of
 * the NT activation rows (Q8 values, then per-block scales at 32*nb, sums at 40*nb). A macro,
 * not a function: UNPACK is inlined into each SIMD level's target code. */
#define MN_B32_TAIL(UNPACK, w, BS, i, nb, xq, xs, NT, tail) do { \
    for (; (i) < (nb); (i)++) { \
        mn_b32 ub_; \
        UNPACK((w) + (i) * (BS), &ub_); \
        for (int t_ = 0; t_ < (NT); t_++) { \
            const int8_t *x_ = (const int8_t *)((xq) + t_ * (xs)) + 32 * (i); \
            const float dx_ = ((const float *)((xq) + t_ * (xs) + 32 * (nb)))[i]; \
            const float ms_ = ((const float *)((xq) + t_ * (xs) + 40 * (nb)))[i]; \
            int sum_ = 0; \
            for (int j_ = 0; j_ < 32; j_++) sum_ += ub_.q[j_] * x_[j_]; \
            /* one fused step, written out: left to the compiler's contraction, the two \
             * products were fused differently in the 1- and 4-token copies (Q4_1, Q5_1) */ \
            (tail)[t_] += fmaf((float)sum_, ub_.d * dx_, ub_.m * ms_); \
        } \
    } \
} while (0)

#endif
