/* AVX2 + FMA + F16C kernels.  Compiled for the baseline ISA with a target
 * pragma, called only when CPUID reports AVX2/FMA/F16C. */
#include <immintrin.h>
#include "mn_internal.h"
#include "mn_iq.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,popcnt")
#include "mn_x86.h"

/* ---------------------------------------------------------------- floats */
#define FV __m256
#define FV_W 8
#define FV_ZERO() _mm256_setzero_ps()
#define FV_LOADU(p) _mm256_loadu_ps(p)
#define FV_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FV_ADD(a, b) _mm256_add_ps(a, b)
#define FV_HSUM(v) hsum8(v)
#define FV_F32(i) _mm256_loadu_ps((const float *)w + (i))
#define FV_F16(i) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * (i))))
#define FV_BF16(i) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + 2 * (i)))), 16))
#define FV_NAME(name) name
#include "mn_float_tmpl.h"

/* ---------------------- 32-value blocks: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL */
/* 16 bytes of nibbles -> 32 values: low nibbles are values 0-15, high ones 16-31
 * (a broadcast load and one shift per lane: a lane insert costs an op) */
MN_INLINE __m256i nib32(const uint8_t *q) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q));
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0xF));
}
/* bit j of 32 bits -> byte j = 0x10 if set (the fifth bit of Q5 values) */
MN_INLINE __m256i bit5_32(const uint8_t *qh) {
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bm = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)mn_rd32(qh)), shuf), bm);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bm), _mm256_set1_epi8(0x10));
}
MN_INLINE __m256i q8_0_vals(const uint8_t *b, __m256i *u) {
    const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 2));
    *u = _mm256_sign_epi8(q, q);
    return q;
}
MN_INLINE __m256i q4_1_vals(const uint8_t *b, __m256i *u) { return *u = nib32(b + 4); }
MN_INLINE __m256i q5_1_vals(const uint8_t *b, __m256i *u) { return *u = _mm256_or_si256(nib32(b + 8), bit5_32(b + 4)); }
/* |kvalues_iq4nl|: a second lookup gives the magnitudes, one op like the sign op it
 * replaces, measured 5% faster on Zen 5 */
static const int8_t mn_kvalues_iq4nl_abs[16] = {127, 104, 83, 65, 49, 35, 22, 10, 1, 13, 25, 38, 53, 69, 89, 113};
MN_INLINE __m256i iq4_nl_vals(const uint8_t *b, __m256i *u) {
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)mn_kvalues_iq4nl));
    const __m256i ka = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)mn_kvalues_iq4nl_abs));
    const __m256i n = nib32(b + 2);
    *u = _mm256_shuffle_epi8(ka, n);
    return _mm256_shuffle_epi8(kv, n);
}

/* Four 32-value blocks per step.  VALS(b, &u): the block's values q as int8, and
 * in u what maddubs multiplies; SIGNED: they may be negative, so u = |q| and the
 * signs move onto the activations; else they are unsigned (value = u - OFF, or d * u + m with the fp16
 * min m at MOFF) and go straight in.  madd + sum4x8 reduce the four blocks'
 * pair sums to one int32 per block, so each step ends in one conversion and one
 * fma per token (the OFF term in int32 from the rows' block sums; the min times
 * llama.cpp's Q8_1 sum s, fp16-rounded, for Q4_1 / Q5_1). */
/* [sum of a's 4 int32 in lane 0, of b's, c's, d's | the same for lane 1]: unpacks and adds,
 * any of the 4 vector ALU ports; vphaddd costs 2 cycles of throughput on Zen 5 and
 * stalls the other ports (measured: 0.48 per cycle alone, 0.95 with an add in between) */
MN_INLINE __m256i sum4x8(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
    const __m256i cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
}
/* the int16 form, for sums that stay within int16: lane l = [two partial sums of a's 8
 * int16 of lane l, then b's, c's, d's], so one madd with ones finishes the four sums */
MN_INLINE __m256i sum4x16(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_add_epi16(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
    const __m256i cd = _mm256_add_epi16(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
    return _mm256_add_epi16(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
}
/* One step: the four blocks at i, each token's sums into acc[t] (lane j: block i + j). */
#define B32_STEP4(name, BS, VALS, SIGNED, OFF, MOFF) \
MN_INLINE void name##_s4(const uint8_t *w, int64_t i, int64_t nb, const uint8_t *xq, size_t xs, const int NT, __m128 *acc) { \
    const __m256i ones = _mm256_set1_epi16(1); \
    const uint8_t *b = mn_block(w, i * BS, 2); \
    __m256i q[4], u[4]; \
    for (int k = 0; k < 4; k++) q[k] = VALS(b + k * BS, &u[k]); \
    const __m128 d4 = h4(b, BS); \
    const __m128 m4 = (MOFF) >= 0 ? h4(b + ((MOFF) >= 0 ? (MOFF) : 0), BS) : _mm_setzero_ps(); \
    for (int t = 0; t < NT; t++) { \
        const uint8_t *xr = xq + t * xs; \
        const int8_t *x = (const int8_t *)xr + 32 * i; \
        __m256i p[4], h; \
        for (int k = 0; k < 4; k++) { \
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * k)); \
            if (SIGNED) xv = _mm256_sign_epi8(xv, q[k]); \
            p[k] = _mm256_maddubs_epi16(u[k], xv); \
        } \
        if (SIGNED) { \
            for (int k = 0; k < 4; k++) p[k] = _mm256_madd_epi16(p[k], ones); \
            h = sum4x8(p[0], p[1], p[2], p[3]); \
        } else { /* u <= 31: sums of 8 products stay within int16 (8 * 31 * 127) */ \
            h = _mm256_madd_epi16(sum4x16(p[0], p[1], p[2], p[3]), ones); \
        } \
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)); \
        if (OFF) /* OFF is 8 or 16 */ \
            s = _mm_sub_epi32(s, _mm_slli_epi32(_mm_loadu_si128((const __m128i *)(xr + 36 * nb + 4 * i)), (OFF) == 16 ? 4 : 3)); \
        const __m128 xd = _mm_loadu_ps((const float *)(xr + 32 * nb) + i); \
        acc[t] = _mm_fmadd_ps(_mm_mul_ps(d4, xd), _mm_cvtepi32_ps(s), acc[t]); \
        if ((MOFF) >= 0) acc[t] = _mm_fmadd_ps(m4, _mm_loadu_ps((const float *)(xr + 40 * nb) + i), acc[t]); \
    } \
}
/* Steps of eight blocks: the first four into acc, the next four into acc2, added at the
 * end.  GEMV (NT = 1) does the eight at once (one conversion, one 8-wide fma: +6-9%
 * here); the same lane-wise operations in the same order, so a token's result does
 * not depend on how many tokens share the call (the batching relies on it). */
#define B32_KERNEL(name, BS, VALS, SIGNED, OFF, MOFF, UNPACK) \
B32_STEP4(name, BS, VALS, SIGNED, OFF, MOFF) \
MN_INLINE void name##_t(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) { \
    const __m256i ones = _mm256_set1_epi16(1); \
    __m128 acc[MN_TILE], acc2[MN_TILE]; float tail[MN_TILE]; \
    for (int t = 0; t < NT; t++) { acc[t] = acc2[t] = _mm_setzero_ps(); tail[t] = 0.f; } \
    int64_t i = 0; \
    if (NT == 1) { \
        __m256 acc8 = _mm256_setzero_ps(); \
        for (; i + 8 <= nb; i += 8) { \
            const uint8_t *b = mn_block(w, i * BS, (8 * BS) / 64 + 1); \
            const int8_t *x = (const int8_t *)xq + 32 * i; \
            __m256i p[8], hh[2]; \
            for (int k = 0; k < 8; k++) { \
                __m256i u; \
                const __m256i q = VALS(b + k * BS, &u); \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * k)); \
                if (SIGNED) xv = _mm256_sign_epi8(xv, q); \
                p[k] = _mm256_maddubs_epi16(u, xv); \
                if (SIGNED) p[k] = _mm256_madd_epi16(p[k], ones); \
            } \
            for (int g = 0; g < 2; g++) \
                hh[g] = SIGNED ? sum4x8(p[4 * g], p[4 * g + 1], p[4 * g + 2], p[4 * g + 3]) \
                               : _mm256_madd_epi16(sum4x16(p[4 * g], p[4 * g + 1], p[4 * g + 2], p[4 * g + 3]), ones); \
            __m256i h = _mm256_add_epi32(_mm256_permute2x128_si256(hh[0], hh[1], 0x20), _mm256_permute2x128_si256(hh[0], hh[1], 0x31)); \
            if (OFF) \
                h = _mm256_sub_epi32(h, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(xq + 36 * nb + 4 * i)), (OFF) == 16 ? 4 : 3)); \
            const __m256 d8 = _mm256_set_m128(h4(b + 4 * BS, BS), h4(b, BS)); \
            const __m256 xd = _mm256_loadu_ps((const float *)(xq + 32 * nb) + i); \
            acc8 = _mm256_fmadd_ps(_mm256_mul_ps(d8, xd), _mm256_cvtepi32_ps(h), acc8); \
            if ((MOFF) >= 0) { \
                const uint8_t *bm = b + ((MOFF) >= 0 ? (MOFF) : 0); \
                acc8 = _mm256_fmadd_ps(_mm256_set_m128(h4(bm + 4 * BS, BS), h4(bm, BS)), \
                                       _mm256_loadu_ps((const float *)(xq + 40 * nb) + i), acc8); \
            } \
        } \
        acc[0] = _mm256_castps256_ps128(acc8); acc2[0] = _mm256_extractf128_ps(acc8, 1); \
    } else { \
        for (; i + 8 <= nb; i += 8) { \
            name##_s4(w, i, nb, xq, xs, NT, acc); \
            name##_s4(w, i + 4, nb, xq, xs, NT, acc2); \
        } \
    } \
    if (i + 4 <= nb) { name##_s4(w, i, nb, xq, xs, NT, acc); i += 4; } \
    MN_B32_TAIL(UNPACK, w, BS, i, nb, xq, xs, NT, tail); \
    for (int t = 0; t < NT; t++) res[t] = hsum4(_mm_add_ps(acc[t], acc2[t])) + tail[t]; \
}
MN_INLINE __m256i q4_0_u(const uint8_t *b, __m256i *u) { return *u = nib32(b + 2); }
MN_INLINE __m256i q5_0_u(const uint8_t *b, __m256i *u) { return *u = _mm256_or_si256(nib32(b + 6), bit5_32(b + 2)); }
B32_KERNEL(dot_q8_0, BS_Q8_0, q8_0_vals, 1, 0, -1, mn_unpack_q8_0)
B32_KERNEL(dot_iq4_nl, BS_IQ4_NL, iq4_nl_vals, 1, 0, -1, mn_unpack_iq4_nl)
B32_KERNEL(dot_q4_0, BS_Q4_0, q4_0_u, 0, 8, -1, mn_unpack_q4_0)
B32_KERNEL(dot_q5_0, BS_Q5_0, q5_0_u, 0, 16, -1, mn_unpack_q5_0)
B32_KERNEL(dot_q4_1, BS_Q4_1, q4_1_vals, 0, 0, 2, mn_unpack_q4_1)
B32_KERNEL(dot_q5_1, BS_Q5_1, q5_1_vals, 0, 0, 2, mn_unpack_q5_1)
MN_TILED(dot_q8_0)
MN_TILED(dot_q4_0)
MN_TILED(dot_q4_1)
MN_TILED(dot_q5_0)
MN_TILED(dot_q5_1)
MN_TILED(dot_iq4_nl)

/* ------------------------------------- 256-value super-blocks (Q8_K rows) */
/* acc[t] += d * dy_t * isum[t]: super-block i's integer dot of each token, dy_t its scale */
MN_INLINE void k_scale_acc(__m256 *acc, const __m256i *isum, const int NT, float d, const uint8_t *xq, size_t xs,
                           int64_t nb, int64_t i) {
    for (int t = 0; t < NT; t++) {
        const float dy = ((const float *)(xq + t * xs + QK_K * nb))[i];
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy), _mm256_cvtepi32_ps(isum[t]), acc[t]);
    }
}
/* isum[t] += sc * (|q| . x with q's signs) over 32 signed values q (u = |q|), x at byte
 * `off` of each token's row */
MN_INLINE void k_sign_acc32(__m256i *isum, const int NT, __m256i u, __m256i q, __m256i sc, const uint8_t *xq,
                            size_t xs, int64_t off) {
    for (int t = 0; t < NT; t++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + t * xs + off));
        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, q)), sc));
    }
}

/* ------------------------------------------------------------- IQ4_XS */
MN_INLINE void dot_iq4_xs_t(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)mn_kvalues_iq4nl));
    const __m256i ka = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)mn_kvalues_iq4nl_abs));
    __m256 acc[MN_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = mn_block(w, i * BS_IQ4_XS, 3);
        const float d = h2f(b);
        __m256i isum[MN_TILE];
        for (int t = 0; t < NT; t++) isum[t] = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++) {
            const __m256i n = nib32(b + 8 + 16 * ib);
            k_sign_acc32(isum, NT, _mm256_shuffle_epi8(ka, n), _mm256_shuffle_epi8(kv, n),
                         _mm256_set1_epi16((short)mn_iq4_xs_scale(b, ib)), xq, xs, QK_K * i + 32 * ib);
        }
        k_scale_acc(acc, isum, NT, d, xq, xs, nb, i);
    }
    for (int t = 0; t < NT; t++) res[t] = hsum8(acc[t]);
}
MN_TILED(dot_iq4_xs)

/* --------------------------------------------------------------- Q4_K, Q5_K
 * One loop; Q5 adds the fifth bit: chunk c's bit c of qh moved straight to bit 4 (one
 * shift, an and, an or).  Each super-block i ends in two exact integers per row and token,
 * S = sum_c sc_c * (q . x)_c and M = sum_c m_c * (sum of x)_c, and one float step into
 * partial sum i % 4: p = fma(S, d * dy, p), then p -= M * (dmin * dy) (fnmadd); the result
 * is (p0 + p1) + (p2 + p3).  The four-row kernel below makes the same integers in another
 * order and the same float steps, so the two agree bit for bit (the driver picks either by
 * shape).  dot reduces four super-blocks at once (q45_group: lanes = super-blocks). */
/* super-block b's integer dots of NT tokens: isum[t] (8 lanes of S) and mm[t] (4 lanes of M) */
MN_INLINE void k45_block(const int Q5, const uint8_t *b, int64_t i, const uint8_t *xq, size_t xs, int64_t nb,
                         const int NT, __m256i *isum, __m128i *mm) {
    const __m128i sm = k4_scales(b + 4);
    const __m128i mins = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
    const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
    const __m256i qh = Q5 ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
    for (int t = 0; t < NT; t++) {
        mm[t] = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)(xq + t * xs + (QK_K + 36) * nb + 16 * i)));
        isum[t] = _mm256_setzero_si256();
    }
    for (int j = 0; j < 4; j++) {
        __m256i lo, hi;
        k45_vals(Q5, b, j, qh, &lo, &hi);
        const int c0 = 2 * j, c1 = 2 * j + 1;
        const __m256i slo = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * c0)));
        const __m256i shi = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * c1)));
        for (int t = 0; t < NT; t++) {
            const int8_t *x = (const int8_t *)(xq + t * xs) + QK_K * i + 64 * j;
            const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)), slo);
            const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))), shi);
            isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(p0, p1));
        }
    }
}
/* G (<= 4) super-blocks from i for NT tokens: lane k of p[t] = token t's partial sum of
 * super-block i + k, so the last horizontal sums and the float steps of four super-blocks
 * are done at once (G < 4, the last step: one lane at a time) */
MN_INLINE void q45_group(const int Q5, const int G, const uint8_t *w, int64_t i, int64_t nb, const uint8_t *xq,
                         size_t xs, const int NT, __m128 *p) {
    const size_t bs = Q5 ? BS_Q5_K : BS_Q4_K;
    if (G < 4) {   /* one super-block at a time: short rows (a split expert's slice) are all tail */
        for (int k = 0; k < G; k++) {
            const uint8_t *b = mn_block(w, (i + k) * bs, 3);
            __m256i isum[MN_TILE]; __m128i mm[MN_TILE];
            k45_block(Q5, b, i + k, xq, xs, nb, NT, isum, mm);
            for (int t = 0; t < NT; t++)
                p[t] = k45_step_lane(p[t], k, isum_all(half_sum(isum[t])), isum_all(mm[t]), h2f(b), h2f(b + 2),
                                     ((const float *)(xq + t * xs + QK_K * nb))[i + k]);
        }
        return;
    }
    __m128i s[MN_TILE][4], m[MN_TILE][4];
    for (int t = 0; t < NT; t++)
        for (int k = 0; k < 4; k++) s[t][k] = m[t][k] = _mm_setzero_si128();
    for (int k = 0; k < G; k++) {
        __m256i isum[MN_TILE]; __m128i mm[MN_TILE];
        k45_block(Q5, mn_block(w, (i + k) * bs, 3), i + k, xq, xs, nb, NT, isum, mm);
        for (int t = 0; t < NT; t++) { s[t][k] = half_sum(isum[t]); m[t][k] = mm[t]; }
    }
    const uint8_t *b = w + i * bs;
    const __m128 d = h4(b, bs), dm = h4(b + 2, bs);
    for (int t = 0; t < NT; t++) {
        const __m128 y = _mm_loadu_ps((const float *)(xq + t * xs + QK_K * nb) + i);
        p[t] = k45_step(p[t], sum4x4(s[t][0], s[t][1], s[t][2], s[t][3]), sum4x4(m[t][0], m[t][1], m[t][2], m[t][3]), d, dm, y);
    }
}
MN_INLINE void dot_q45_K_t(const int Q5, const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT,
                           float *res) {
    __m128 p[MN_TILE];
    for (int t = 0; t < NT; t++) p[t] = _mm_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) q45_group(Q5, 4, w, i, nb, xq, xs, NT, p);
    switch (nb - i) {
    case 1: q45_group(Q5, 1, w, i, nb, xq, xs, NT, p); break;
    case 2: q45_group(Q5, 2, w, i, nb, xq, xs, NT, p); break;
    case 3: q45_group(Q5, 3, w, i, nb, xq, xs, NT, p); break;
    default: break;
    }
    for (int t = 0; t < NT; t++) res[t] = parts_sum(p[t]);
}
MN_INLINE void dot_q4_K_t(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    dot_q45_K_t(0, w, nb, xq, xs, NT, res);
}
MN_INLINE void dot_q5_K_t(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    dot_q45_K_t(1, w, nb, xq, xs, NT, res);
}
MN_TILED(dot_q4_K)
MN_TILED(dot_q5_K)

/* The four-row GEMM (mn_x86.h's k45_pack with R = 4): a quarter of dot's madds. */
MN_INLINE __m256i bq(const int8_t *x) { return _mm256_set1_epi64x((long long)mn_rd64((const uint8_t *)x)); }
MN_INLINE void k45x4_run_t(const void *buf, int64_t i0, int64_t n, int64_t nb, const uint8_t *xq, size_t xs,
                           const int NT, float *accp) {
    for (int64_t ii = 0; ii < n; ii++) {
        const uint8_t *b = (const uint8_t *)buf + ii * K45_BLK(4);
        const int64_t i = i0 + ii;
        __m256i I[MN_TILE];
        for (int t = 0; t < NT; t++) I[t] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const __m256i a0 = _mm256_load_si256((const __m256i *)K45_V(b, 4, c, 0)), a1 = _mm256_load_si256((const __m256i *)K45_V(b, 4, c, 1));
            const __m256i a2 = _mm256_load_si256((const __m256i *)K45_V(b, 4, c, 2)), a3 = _mm256_load_si256((const __m256i *)K45_V(b, 4, c, 3));
            const __m256i sc = _mm256_loadu_si256((const __m256i *)K45_SC(b, 4, c));
            for (int t = 0; t < NT; t++) {
                const int8_t *x = (const int8_t *)(xq + t * xs) + QK_K * i + 32 * c;
                const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(a0, bq(x)), _mm256_maddubs_epi16(a1, bq(x + 8)));
                const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(a2, bq(x + 16)), _mm256_maddubs_epi16(a3, bq(x + 24)));
                I[t] = _mm256_add_epi32(I[t], _mm256_madd_epi16(_mm256_add_epi16(p0, p1), sc));
            }
        }
        const __m256i mn01 = _mm256_loadu_si256((const __m256i *)K45_MINS(b, 4)), mn23 = _mm256_loadu_si256((const __m256i *)(K45_MINS(b, 4) + 32));
        const __m128 d = _mm_loadu_ps(K45_D(b, 4)), dmin = _mm_loadu_ps(K45_DMIN(b, 4));
        for (int t = 0; t < NT; t++) {
            const uint8_t *xr = xq + t * xs;
            /* [r0 r0 r1 r1 | r2 r2 r3 r3] -> [r0 r1 r2 r3] */
            const __m256i h = _mm256_hadd_epi32(I[t], I[t]);
            const __m128i S = _mm_unpacklo_epi64(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            const __m256i ps = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xr + (QK_K + 36) * nb + 16 * i)));
            /* [r0 x4 | r1 x4], [r2 x4 | r3 x4] -> [r0 r2 r0 r2 | r1 r3 r1 r3] -> [r0 r1 r2 r3] */
            const __m256i m = _mm256_hadd_epi32(_mm256_madd_epi16(mn01, ps), _mm256_madd_epi16(mn23, ps));
            const __m256i m2 = _mm256_hadd_epi32(m, m);
            const __m128i M = _mm_unpacklo_epi32(_mm256_castsi256_si128(m2), _mm256_extracti128_si256(m2, 1));
            float *pp = accp + 16 * t + 4 * (i & 3);
            _mm_storeu_ps(pp, k45_step(_mm_loadu_ps(pp), S, M, d, dmin, _mm_set1_ps(((const float *)(xr + QK_K * nb))[i])));
        }
    }
}
#define K45X4(name, Q5) \
    static void name##_pack(const uint8_t *w, size_t ws, int64_t i0, int64_t n, void *buf) { k45_pack(Q5, 4, w, ws, i0, n, buf); } \
    static void name##_run(const void *buf, int64_t i0, int64_t n, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *acc) { \
        switch (nt) { \
        case 1: k45x4_run_t(buf, i0, n, nb, xq, xs, 1, acc); break; \
        case 2: k45x4_run_t(buf, i0, n, nb, xq, xs, 2, acc); break; \
        case 3: k45x4_run_t(buf, i0, n, nb, xq, xs, 3, acc); break; \
        default: k45x4_run_t(buf, i0, n, nb, xq, xs, 4, acc); break; \
        } \
    }
K45X4(q4_Kx4, 0)
K45X4(q5_Kx4, 1)

/* --------------------------------------------------------------- Q6_K */
MN_INLINE void dot_q6_K_t(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3);
    __m256 acc[MN_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = mn_block(w, i * BS_Q6_K, 4);
        const float d = h2f(b + 208);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)(b + 192));
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        __m256i isum[MN_TILE];
        for (int t = 0; t < NT; t++) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(xq + t * xs + (QK_K + 4) * nb + 32 * i));
            isum[t] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
        }
        for (int n = 0; n < 2; n++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + 64 * n));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + 64 * n + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m2), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m2), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m2), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m2), 4));
            for (int c = 0; c < 4; c++) {
                const int p = 4 * n + c;
                const __m128i shuf = _mm_set_epi64x(0x0101010101010101LL * (2 * p + 1), 0x0101010101010101LL * (2 * p));
                const __m256i s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, shuf));
                for (int t = 0; t < NT; t++) {
                    const int8_t *x = (const int8_t *)(xq + t * xs) + QK_K * i + 128 * n + 32 * c;
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(q[c], _mm256_loadu_si256((const __m256i *)x)), s));
                }
            }
        }
        k_scale_acc(acc, isum, NT, d, xq, xs, nb, i);
    }
    for (int t = 0; t < NT; t++) res[t] = hsum8(acc[t]);
}
MN_TILED(dot_q6_K)

/* lane l of the result: [the int16 sum of p[c]'s lane l, c = 0..7] (the caller keeps the
 * sums within int16); unpacks and adds, 21 ALU ops (seven vphaddw cost more, see sum4x8) */
MN_INLINE __m256i sum8x16(const __m256i p[8]) {
    __m256i q[4], r[2];
    for (int j = 0; j < 4; j++)
        q[j] = _mm256_add_epi16(_mm256_unpacklo_epi16(p[2 * j], p[2 * j + 1]), _mm256_unpackhi_epi16(p[2 * j], p[2 * j + 1]));
    for (int j = 0; j < 2; j++)
        r[j] = _mm256_add_epi16(_mm256_unpacklo_epi32(q[2 * j], q[2 * j + 1]), _mm256_unpackhi_epi32(q[2 * j], q[2 * j + 1]));
    return _mm256_add_epi16(_mm256_unpacklo_epi64(r[0], r[1]), _mm256_unpackhi_epi64(r[0], r[1]));
}

/* ------------------------------------------------------------ Q2_K, Q3_K
 * Values u <= 7 keep the sum over a whole 16-value sub-block within int16
 * (16 * 7 * 127; Q2_K's 4u below: 16 * 12 * 127), so the eight maddubs of a
 * super-block reduce (sum8x16) to the 16 sub-block dots in one register and ONE
 * madd applies the 16 scales (instead of a scale shuffle, a madd and an add per 32
 * values).  Chunk c = 4n + k holds the values of qs[32n + l] >> 2k; the tree leaves
 * sub-block 8n + 2k in lane 0 slot c and 8n + 2k + 1 in lane 1, so the scales go
 * in that order (ord16).  Q2_K masks the odd shifts in place (4u, no shift) and
 * takes the other sub-blocks' scales 4x: its sum is 4x the dot.  The second term
 * is a madd of the Q8_K block sums: Q2_K's mins (times dmin), Q3_K's offset of 4
 * (times -4 d).  Two super-blocks per step share the float work: their dots and
 * second terms meet in one sum4x8, one conversion and one fma per token. */
#define K16_Q2 0
#define K16_Q3 1
#define K16_TQ2 2   /* TQ2_0: Q2_K's quant layout at offset 0, value = u - 1: scales and "mins" all 1 */
MN_INLINE void k16_unpack(const int KT, const uint8_t *b, __m256i u[8], __m256i *sc, __m256i *mn) {
    const __m256i m3 = _mm256_set1_epi8(3), m15 = _mm256_set1_epi8(15);
    /* 16 bytes, sub-blocks 0..15 -> 0 2 4 .. 14 | 1 3 .. 15 (then widened lane by lane) */
    const __m128i ord16 = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    if (KT == K16_Q2 || KT == K16_TQ2) {
        const __m256i m12 = _mm256_set1_epi8(12), f41 = _mm256_set1_epi32(0x00010004);
        if (KT == K16_Q2) {
            const __m128i s8 = _mm_loadu_si128((const __m128i *)b);
            const __m256i sv = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_and_si128(s8, _mm256_castsi256_si128(m15)), ord16));
            *sc = _mm256_mullo_epi16(sv, f41);
            *mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s8, 4), _mm256_castsi256_si128(m15)));
        } else {
            *sc = f41;
            *mn = _mm256_set1_epi16(1);
        }
        const uint8_t *qs = KT == K16_Q2 ? b + 16 : b;
        for (int n = 0; n < 2; n++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * n));
            const __m256i h = _mm256_srli_epi16(v, 4);
            u[4 * n + 0] = _mm256_and_si256(v, m3);
            u[4 * n + 1] = _mm256_and_si256(v, m12);
            u[4 * n + 2] = _mm256_and_si256(h, m3);
            u[4 * n + 3] = _mm256_and_si256(h, m12);
        }
    } else {
        const __m128i s = k3_scales(b);
        *sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s, ord16));
        *mn = _mm256_cvtepi8_epi16(s);
        const __m256i hm = _mm256_loadu_si256((const __m256i *)b), m4 = _mm256_set1_epi8(4);
        for (int n = 0; n < 2; n++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 32 + 32 * n));
            for (int k = 0; k < 4; k++) {
                const int bit = 4 * n + k;
                const __m256i lo = _mm256_and_si256(k ? _mm256_srli_epi16(v, 2 * k) : v, m3);
                /* the high bit moved straight to bit 2 (16-bit shifts: the bits crossing
                 * a byte boundary never land on bit 2) */
                const __m256i hs = bit < 2 ? _mm256_slli_epi16(hm, 2 - bit) : bit > 2 ? _mm256_srli_epi16(hm, bit - 2) : hm;
                u[bit] = _mm256_or_si256(lo, _mm256_and_si256(hs, m4));   /* (q & 3) + 4*hbit = value + 4 */
            }
        }
    }
}
MN_INLINE void dot_k16_t(const int KT, size_t bsz, const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs,
                         const int NT, float *res) {
    /* per block: (d, dmin) -> (d / 4, -dmin) for Q2_K; (d, d) -> (d / 4, -d) for TQ2_0, (d, -4 d) for Q3_K */
    const __m128 f = KT != K16_Q3 ? _mm_setr_ps(0.25f, -1.f, 0.25f, -1.f) : _mm_setr_ps(1.f, -4.f, 1.f, -4.f);
    __m128 acc[MN_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; i += 2) {
        const int two = i + 1 < nb;
        __m256i dot[2][MN_TILE], mins[2][MN_TILE];
        uint32_t dd[2] = {0, 0};
        for (int j = 0; j < 2; j++) {
            if (j && !two) {
                for (int t = 0; t < NT; t++) dot[1][t] = mins[1][t] = _mm256_setzero_si256();
                break;
            }
            const uint8_t *b = mn_block(w, (i + j) * bsz, 2);
            dd[j] = KT == K16_Q2 ? mn_rd32(b + 80) : mn_rd16(b + (KT == K16_Q3 ? 108 : 64)) * 0x10001u;
            __m256i u[8], sc, mn;
            k16_unpack(KT, b, u, &sc, &mn);
            for (int t = 0; t < NT; t++) {
                const uint8_t *xr = xq + t * xs;
                const __m256i *x = (const __m256i *)(xr + QK_K * (i + j));
                __m256i p[8];
                for (int c = 0; c < 8; c++) p[c] = _mm256_maddubs_epi16(u[c], _mm256_loadu_si256(x + c));
                dot[j][t] = _mm256_madd_epi16(sum8x16(p), sc);
                mins[j][t] = _mm256_madd_epi16(mn, _mm256_loadu_si256((const __m256i *)(xr + (QK_K + 4) * nb + 32 * (i + j))));
            }
        }
        /* both blocks' two factors in one conversion, times each token's two dy */
        const __m128 dm = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi64_si128((long long)((uint64_t)dd[0] | (uint64_t)dd[1] << 32))), f);
        for (int t = 0; t < NT; t++) {
            const float *dy = (const float *)(xq + t * xs + QK_K * nb) + i;
            const __m128 g = _mm_mul_ps(dm, _mm_setr_ps(dy[0], dy[0], two ? dy[1] : 0.f, two ? dy[1] : 0.f));
            const __m256i z = sum4x8(dot[0][t], mins[0][t], dot[1][t], mins[1][t]);
            const __m128i z4 = _mm_add_epi32(_mm256_castsi256_si128(z), _mm256_extracti128_si256(z, 1));
            acc[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(z4), g, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) res[t] = hsum4(acc[t]);
}
#define K16(name, T, KT) \
    MN_INLINE void dot_##name##_t(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) { \
        dot_k16_t(KT, BS_##T, w, nb, xq, xs, NT, res); } \
    MN_TILED(dot_##name)
K16(q2_K, Q2_K, K16_Q2)
K16(q3_K, Q3_K, K16_Q3)
K16(tq2_0, TQ2_0, K16_TQ2)

/* ----------------------------------------------------------- IQ types
 * Per 32 values (sub-block ib): magnitudes u (unsigned int8) and signs s (+1 /
 * -1 bytes) gathered from the grids in registers, integer scales for the two
 * halves; dot = d * dy * sum_k sc_k * sum u * sign(x, s). */
MN_INLINE __m256i sg4(uint8_t s0, uint8_t s1, uint8_t s2, uint8_t s3) {
    return _mm256_set_epi64x((long long)mn_signs64[s3], (long long)mn_signs64[s2],
                             (long long)mn_signs64[s1], (long long)mn_signs64[s0]);
}
MN_INLINE __m256i ks4(uint32_t s) {   /* four 7-bit sign indices (bits 0-27) */
    return _mm256_set_epi64x((long long)mn_ksigns64[(s >> 21) & 127], (long long)mn_ksigns64[(s >> 14) & 127],
                             (long long)mn_ksigns64[(s >> 7) & 127], (long long)mn_ksigns64[s & 127]);
}
MN_INLINE __m256i g4(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
    return _mm256_set_epi64x((long long)d, (long long)c, (long long)b, (long long)a);
}
MN_INLINE __m256i g8(const uint32_t *grid, const uint8_t *q, const int hi[8]) {
    return _mm256_setr_epi32((int)grid[q[0] | hi[0]], (int)grid[q[1] | hi[1]], (int)grid[q[2] | hi[2]], (int)grid[q[3] | hi[3]],
                             (int)grid[q[4] | hi[4]], (int)grid[q[5] | hi[5]], (int)grid[q[6] | hi[6]], (int)grid[q[7] | hi[7]]);
}
/* IQ1: 8 g + delta per group of 8, delta = +-1 (g in {-1, 0, 1}: the 16-bit shift's
 * carries into the next byte are masked off) */
MN_INLINE __m256i iq1_vals(__m256i g, __m256i delta) {
    return _mm256_add_epi8(_mm256_and_si256(_mm256_slli_epi16(g, 3), _mm256_set1_epi8((char)0xF8)), delta);
}

/* sub-block ib: magnitudes u, signs s, and for the types with one scale per
 * sub-block, that scale (2s + 1) in *one (the others: iq_scales) */
MN_INLINE void iq_sub(const int IQT, const uint8_t *b, int ib, __m256i *u, __m256i *s, int *one) {
    static const int zero8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (IQT == IQT_2XXS) {
        const uint8_t *a = b + 2 + 8 * ib;
        const uint32_t sc = mn_rd32(a + 4);
        *u = g4(mn_iq2xxs_grid[a[0]], mn_iq2xxs_grid[a[1]], mn_iq2xxs_grid[a[2]], mn_iq2xxs_grid[a[3]]);
        *s = ks4(sc);
        *one = 2 * (int)(sc >> 28) + 1;
    } else if (IQT == IQT_2XS) {
        const uint8_t *a = b + 2 + 8 * ib;
        const uint16_t q0 = mn_rd16(a), q1 = mn_rd16(a + 2), q2 = mn_rd16(a + 4), q3 = mn_rd16(a + 6);
        *u = g4(mn_iq2xs_grid[q0 & 511], mn_iq2xs_grid[q1 & 511], mn_iq2xs_grid[q2 & 511], mn_iq2xs_grid[q3 & 511]);
        *s = _mm256_set_epi64x((long long)mn_ksigns64[q3 >> 9], (long long)mn_ksigns64[q2 >> 9],
                               (long long)mn_ksigns64[q1 >> 9], (long long)mn_ksigns64[q0 >> 9]);
    } else if (IQT == IQT_2S) {
        const uint8_t *qs = b + 2 + 4 * ib, *sg = b + 34 + 4 * ib;
        const int h = b[66 + ib];
        *u = g4(mn_iq2s_grid[qs[0] | ((h & 3) << 8)], mn_iq2s_grid[qs[1] | ((h & 0xC) << 6)],
                mn_iq2s_grid[qs[2] | ((h & 0x30) << 4)], mn_iq2s_grid[qs[3] | ((h & 0xC0) << 2)]);
        *s = sg4(sg[0], sg[1], sg[2], sg[3]);
    } else if (IQT == IQT_3XXS) {
        const uint32_t sc = mn_rd32(b + 66 + 4 * ib);
        *u = g8(mn_iq3xxs_grid, b + 2 + 8 * ib, zero8);
        *s = ks4(sc);
        *one = 2 * (int)(sc >> 28) + 1;
    } else if (IQT == IQT_3S) {
        const int h = b[66 + ib];
        const int hb[8] = {(h << 8) & 256, (h << 7) & 256, (h << 6) & 256, (h << 5) & 256,
                           (h << 4) & 256, (h << 3) & 256, (h << 2) & 256, (h << 1) & 256};
        *u = g8(mn_iq3s_grid, b + 2 + 8 * ib, hb);
        const uint8_t *sg = b + 74 + 4 * ib;
        *s = sg4(sg[0], sg[1], sg[2], sg[3]);
    } else if (IQT == IQT_1S) {
        const uint8_t *qs = b + 2 + 4 * ib;
        const uint16_t qh = mn_rd16(b + 34 + 2 * ib);
        const __m256i g = g4(mn_iq1s_grid[qs[0] | ((qh << 8) & 0x700)], mn_iq1s_grid[qs[1] | ((qh << 5) & 0x700)],
                             mn_iq1s_grid[qs[2] | ((qh << 2) & 0x700)], mn_iq1s_grid[qs[3] | ((qh >> 1) & 0x700)]);
        /* 8 g here; the delta's part, delta * sum(x), is added per block (dot_iq_t) */
        *u = _mm256_and_si256(g, _mm256_set1_epi8(1)); *s = g;
        *one = 8 * (2 * ((qh >> 12) & 7) + 1);
    } else {   /* IQ1_M */
        const uint8_t *qs = b + 4 * ib, *qh = b + 32 + 2 * ib;
        const int h0 = qh[0] & 0xF, h1 = qh[0] >> 4, h2 = qh[1] & 0xF, h3 = qh[1] >> 4;
        const __m256i g = g4(mn_iq1s_grid[qs[0] | ((h0 & 7) << 8)], mn_iq1s_grid[qs[1] | ((h1 & 7) << 8)],
                             mn_iq1s_grid[qs[2] | ((h2 & 7) << 8)], mn_iq1s_grid[qs[3] | ((h3 & 7) << 8)]);
        /* group k's delta sign: bit 3 of nibble k of the u16 -> -1 or +1 in its qword */
        const __m256i m = _mm256_setr_epi64x(0x08, 0x80, 0x0800, 0x8000);
        const __m256i neg = _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(mn_rd16(qh)), m), m);
        const __m256i q = iq1_vals(g, _mm256_or_si256(neg, _mm256_set1_epi8(1)));
        *u = _mm256_sign_epi8(q, q); *s = q;
    }
}

/* The 16 integer scales 2s + 1 of a super-block (one per half sub-block) in
 * int16 lanes: the low 128 bits hold the eight sub-blocks' first-half scales,
 * the high 128 bits their second-half ones, so one in-lane shuffle broadcasts
 * sub-block ib's pair.  lo, hi: the raw 4-bit (IQ1: 3-bit) scales, 8 x int32.
 * (IQ2_XXS, IQ3_XXS and IQ1_S have one scale per sub-block at hand in a general
 * register: broadcasting it is as fast.) */
MN_INLINE __m256i iq_scale_pairs(__m256i lo, __m256i hi) {
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i v = _mm256_packs_epi32(_mm256_add_epi32(_mm256_add_epi32(lo, lo), one), _mm256_add_epi32(_mm256_add_epi32(hi, hi), one));
    return _mm256_permute4x64_epi64(v, 0xD8);
}
MN_INLINE __m256i iq_scales(const int IQT, const uint8_t *b) {
    const __m256i m15 = _mm256_set1_epi32(15), m7 = _mm256_set1_epi32(7);
    if (IQT == IQT_2XS || IQT == IQT_2S) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + (IQT == IQT_2XS ? 66 : 74))));
        return iq_scale_pairs(_mm256_and_si256(v, m15), _mm256_srli_epi32(v, 4));
    } else if (IQT == IQT_3S) {
        const __m128i w4 = _mm_cvtsi32_si128((int)mn_rd32(b + 106));
        const __m256i v = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(w4, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0)));
        const __m256i n = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)), m15);
        return iq_scale_pairs(n, n);
    } else {   /* IQ1_M: sub-block ib's scales at bits 6 (ib & 1) and + 3 of u16 ib / 2 */
        const __m128i w = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)(b + 48)),
                                           _mm_setr_epi8(0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7));
        const __m256i v = _mm256_cvtepu16_epi32(w);
        return iq_scale_pairs(_mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 6, 0, 6, 0, 6, 0, 6)), m7),
                              _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(3, 9, 3, 9, 3, 9, 3, 9)), m7));
    }
}

MN_INLINE void dot_iq_t(const int IQT, size_t bsz, const uint8_t *w, int64_t nb,
                        const uint8_t *xq, size_t xs, const int NT, float *res) {
    __m256 acc[MN_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = w + i * bsz;
        mn_prefetch(b, 2);
        const float d = mn_iq_d(IQT, b);
        __m256i isum[MN_TILE];
        for (int t = 0; t < NT; t++) isum[t] = _mm256_setzero_si256();
        if (IQT == IQT_1S)
            for (int t = 0; t < NT; t++)
                isum[t] = _mm256_zextsi128_si256(mn_iq1s_delta_dot(b, xq + t * xs + (QK_K + 36) * nb + 16 * i));
        const int ONE = IQT == IQT_2XXS || IQT == IQT_3XXS || IQT == IQT_1S;
        const __m256i scv = ONE ? _mm256_setzero_si256() : iq_scales(IQT, b);
        for (int ib = 0; ib < 8; ib++) {
            __m256i u, s; int one = 0;
            iq_sub(IQT, b, ib, &u, &s, &one);
            const __m256i sc = ONE ? _mm256_set1_epi16((short)one)
                                   : _mm256_shuffle_epi8(scv, _mm256_set1_epi16((short)(0x0100 + 0x0202 * ib)));
            for (int t = 0; t < NT; t++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)((const int8_t *)(xq + t * xs) + QK_K * i + 32 * ib));
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, s)), sc));
            }
        }
        for (int t = 0; t < NT; t++) {
            const float dy = ((const float *)(xq + t * xs + QK_K * nb))[i];
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy), _mm256_cvtepi32_ps(isum[t]), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) res[t] = hsum8(acc[t]);
}
#define IQK(name, T, IQT) \
    MN_INLINE void dot_##name##_t(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) { \
        dot_iq_t(IQT, BS_##T, w, nb, xq, xs, NT, res); } \
    MN_TILED(dot_##name)
MN_IQ_TYPES(IQK)

#pragma GCC pop_options

void mn_fill_avx2(mn_traits *tab) {
#define SET(T, f) tab[MN_##T].dot[MN_SIMD_AVX2] = f
    SET(F32, dot_f32); SET(F16, dot_f16); SET(BF16, dot_bf16);
    SET(Q8_0, dot_q8_0); SET(Q4_0, dot_q4_0);
    SET(Q4_K, dot_q4_K); SET(Q6_K, dot_q6_K); SET(Q2_K, dot_q2_K); SET(Q3_K, dot_q3_K); SET(Q5_K, dot_q5_K);
    SET(Q4_1, dot_q4_1); SET(Q5_0, dot_q5_0); SET(Q5_1, dot_q5_1); SET(IQ4_NL, dot_iq4_nl); SET(IQ4_XS, dot_iq4_xs);
#define SET_IQ(name, T, IQT) SET(T, dot_##name);
    MN_IQ_TYPES(SET_IQ)
#undef SET_IQ
    SET(TQ2_0, dot_tq2_0);
#undef SET
#define SET4(T, name, mint) tab[MN_##T].multi[MN_SIMD_AVX2] = (mn_multirow){name##_pack, name##_run, K45_BLK(4), 4, mint}
    /* from 2 (Q4_K) and 3 (Q5_K) tokens faster than dot, one core, 2048 x 2048 */
    SET4(Q4_K, q4_Kx4, 2);
    SET4(Q5_K, q5_Kx4, 3);
#undef SET4
}
