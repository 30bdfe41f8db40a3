/* AVX-512 (F/BW/VL/DQ) kernel templates, included by mn_avx512.c (MN_VNNI 0)
 * and mn_avx512vnni.c (MN_VNNI 1) inside their target pragmas.  SFX names the
 * variant. */
#include "mn_x86.h"

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define K(name) CAT(name, SFX)

MN_INLINE float K(hsum16)(__m512 v) { return _mm512_reduce_add_ps(v); }
/* out[t] = the sum of v[t]'s 16 lanes, t < NT: four at once through a transposing tree (11
 * shuffles and adds, against 32 for four reductions), since a GEMM call over a short row
 * spends a good part of its time here. */
MN_INLINE void K(hsums)(const __m512 *v, const int NT, float *out) {
    if (NT != 4) {
        for (int t = 0; t < NT; t++) out[t] = K(hsum16)(v[t]);
        return;
    }
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44), _mm512_shuffle_f32x4(v[0], v[1], 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44), _mm512_shuffle_f32x4(v[2], v[3], 0xEE));
    __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));   /* 128-bit lane k: token k's four partial sums */
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0xB1));
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0,
                                                                                       0, 0, 0, 0, 0, 0), q)));
}
/* the same for accumulator pairs acc[t][0] + acc[t][1] */
MN_INLINE void K(hsums2)(__m512 (*acc)[2], const int NT, float *out) {
    __m512 v[MN_TILE];
    for (int t = 0; t < NT; t++) v[t] = _mm512_add_ps(acc[t][0], acc[t][1]);
    K(hsums)(v, NT, out);
}

/* acc += sum over groups of 4 of u8 * s8 */
MN_INLINE __m512i K(dpbusd)(__m512i acc, __m512i u, __m512i s) {
#if MN_VNNI
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
/* acc += pairwise i16 * i16 */
MN_INLINE __m512i K(dpwssd)(__m512i acc, __m512i a, __m512i b) {
#if MN_VNNI
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

/* One token's integer dot over a 256-value super-block: unsigned quants qv[k] (64 each)
 * times activations x, each 16-value group weighted by its scale in sv[k], added to
 * `init` (an offset term, or zero); two accumulators halve the dependency chain. */
MN_INLINE __m512i K(k_dot256)(const __m512i qv[4], const __m512i sv[4], const int8_t *x, __m512i init) {
    __m512i s0 = init, s1 = _mm512_setzero_si512();
    s0 = K(dpwssd)(s0, _mm512_maddubs_epi16(qv[0], _mm512_loadu_si512((const void *)x)), sv[0]);
    s1 = K(dpwssd)(s1, _mm512_maddubs_epi16(qv[1], _mm512_loadu_si512((const void *)(x + 64))), sv[1]);
    s0 = K(dpwssd)(s0, _mm512_maddubs_epi16(qv[2], _mm512_loadu_si512((const void *)(x + 128))), sv[2]);
    s1 = K(dpwssd)(s1, _mm512_maddubs_epi16(qv[3], _mm512_loadu_si512((const void *)(x + 192))), sv[3]);
    return _mm512_add_epi32(s0, s1);
}
/* acc + d * dy * (k_dot256 + init): d the super-block's weight scale, *dy the token's (read
 * after the dot: read before, it moved Q3_K's and Q6_K's loop registers onto the stack) */
MN_INLINE __m512 K(k_acc256)(__m512 acc, float d, const float *dy, const __m512i qv[4], const __m512i sv[4],
                             const int8_t *x, __m512i init) {
    const __m512i q = K(k_dot256)(qv, sv, x, init);
    return _mm512_fmadd_ps(_mm512_set1_ps(d * *dy), _mm512_cvtepi32_ps(q), acc);
}
/* a Q8_K row (xr) of nb super-blocks: super-block i's 256 values, (a pointer to) its scale, its 16 int16 sums of 16 */
#define K_X(xr, i) ((const int8_t *)(xr) + QK_K * (i))
#define K_DY(xr, nb, i) ((const float *)((xr) + QK_K * (nb)) + (i))
#define K_BSUMS(xr, nb, i) _mm256_loadu_si256((const __m256i *)((xr) + (QK_K + 4) * (nb) + 32 * (i)))
/* acc[t] += d * dy * (sum_k sc_k sum u x - 2^SH sum_k sc_k bsum_k) for the NT tokens of a tile:
 * unsigned quants u = value + 2^SH (Q6_K, Q3_K), the offset removed with the rows' sums of 16 */
MN_INLINE void K(k_offset_tokens)(__m512 *acc, const int NT, const __m512i qv[4], const __m512i sv[4], __m256i sc16,
                                  const int SH, float d, const uint8_t *xq, size_t xs, int64_t nb, int64_t i) {
    for (int t = 0; t < NT; t++) {
        const uint8_t *xr = xq + t * xs;
        const __m512i off = _mm512_sub_epi32(_mm512_setzero_si512(),
                                             _mm512_zextsi256_si512(_mm256_slli_epi32(_mm256_madd_epi16(sc16, K_BSUMS(xr, nb, i)), SH)));
        acc[t] = K(k_acc256)(acc[t], d, K_DY(xr, nb, i), qv, sv, K_X(xr, i), off);
    }
}

/* ---------------------------------------------------------------- floats */
#define FV __m512
#define FV_W 16
#define FV_ZERO() _mm512_setzero_ps()
#define FV_LOADU(p) _mm512_loadu_ps(p)
#define FV_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FV_ADD(a, b) _mm512_add_ps(a, b)
#define FV_HSUM(v) K(hsum16)(v)
#define FV_F32(i) _mm512_loadu_ps((const float *)w + (i))
#define FV_F16(i) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 2 * (i))))
#define FV_BF16(i) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + 2 * (i)))), 16))
#define FV_NAME(name) K(name)
#include "mn_float_tmpl.h"

/* ------------------------------- 32-value blocks, 8 a step: scales; Q4_0 */
MN_INLINE __m256 K(scales8)(const uint8_t *b, size_t bs) {
    const __m128i h = _mm_setr_epi16((short)mn_rd16(b), (short)mn_rd16(b + bs), (short)mn_rd16(b + 2 * bs),
                                     (short)mn_rd16(b + 3 * bs), (short)mn_rd16(b + 4 * bs), (short)mn_rd16(b + 5 * bs),
                                     (short)mn_rd16(b + 6 * bs), (short)mn_rd16(b + 7 * bs));
    return _mm256_cvtph_ps(h);
}

/* After the 8-block steps: the row's remaining pairs of blocks, one 512-bit step each (a
 * split expert's down rows are often not a multiple of 8 blocks: 12 at a 384-column slice,
 * whose last 4 blocks ran scalar). PAIR(b): two blocks' values; SIGNED: the values may be
 * negative (|q| into dpbusd, the signs onto the activations), else unsigned with the offset
 * OFF removed through the rows' int block sums; MOFF >= 0: the fp16 min at that offset
 * times the rows' float block sums. Scalar terms go to tail[t]. */
#define B32_512_PAIRS(PAIR, BS, SIGNED, OFF, MOFF) \
    for (; i + 2 <= nb; i += 2) { \
        const uint8_t *b = w + i * BS; \
        const __m512i q = PAIR(b); \
        const __m512i u = SIGNED ? _mm512_abs_epi8(q) : q; \
        const __mmask64 neg = SIGNED ? _mm512_movepi8_mask(q) : 0; \
        const float d0 = h2f(b), d1 = h2f(b + BS); \
        for (int t = 0; t < NT; t++) { \
            const uint8_t *xr = xq + t * xs; \
            const float *dx = (const float *)(xr + 32 * nb) + i; \
            const __m512i xv = _mm512_loadu_si512((const void *)(xr + 32 * i)); \
            const __m512i sx = SIGNED ? _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv) : xv; \
            const __m512i p = K(dpbusd)(_mm512_setzero_si512(), u, sx); \
            const float s0 = d0 * dx[0], s1 = d1 * dx[1]; \
            const __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1); \
            acc[t][0] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc[t][0]); \
            if (OFF) { \
                const int32_t *is = (const int32_t *)(xr + 36 * nb) + i; \
                tail[t] -= (float)(OFF) * (s0 * (float)is[0] + s1 * (float)is[1]); \
            } \
            if ((MOFF) >= 0) { \
                const float *fs = (const float *)(xr + 40 * nb) + i; \
                const int mo = (MOFF) >= 0 ? (MOFF) : 0;   /* an offset even where unused */ \
                tail[t] += h2f(b + mo) * fs[0] + h2f(b + BS + mo) * fs[1]; \
            } \
        } \
    }

/* 8 blocks a step, as 4 pairs: acc[p & 1] += pair p's int32 sums d times its two blocks'
 * scales (lanes 2p, 2p + 1 of s, each over its 256-bit half) */
MN_INLINE void K(pair_fma)(__m512 acc[2], const int p, __m512 s, __m512i d) {
    const __m512i idx = _mm512_set_epi32(2*p+1, 2*p+1, 2*p+1, 2*p+1, 2*p+1, 2*p+1, 2*p+1, 2*p+1,
                                         2*p, 2*p, 2*p, 2*p, 2*p, 2*p, 2*p, 2*p);
    acc[p & 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, s), _mm512_cvtepi32_ps(d), acc[p & 1]);
}
/* Q4_0: unsigned nibbles u = q + 8 straight into dpbusd; the offset is removed
 * with the activation block sums: sum (u - 8) x = sum u x - 8 sum x */
MN_INLINE __m512i K(q4_0_upair)(const uint8_t *b) {
    const __m512i v = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 2)))),
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + BS_Q4_0 + 2))), 1);
    return _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFF00FF00u, v, 4), _mm512_set1_epi8(0xF));
}
MN_INLINE void K(dot_q4_0_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    __m512 acc[MN_TILE][2];
    __m256 corr[MN_TILE];
    float tail[MN_TILE];
    for (int t = 0; t < NT; t++) { acc[t][0] = acc[t][1] = _mm512_setzero_ps(); corr[t] = _mm256_setzero_ps(); tail[t] = 0.f; }
    const __m512i zero = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) {
        const uint8_t *b = mn_block(w, i * BS_Q4_0, 3);
        const __m256 dw = K(scales8)(b, BS_Q4_0);
        __m512i u[4];
        for (int p = 0; p < 4; p++) u[p] = K(q4_0_upair)(b + 2 * p * BS_Q4_0);
        for (int t = 0; t < NT; t++) {
            const int8_t *x = (const int8_t *)(xq + t * xs) + 32 * i;
            const __m256 s8 = _mm256_mul_ps(dw, _mm256_loadu_ps((const float *)(xq + t * xs + 32 * nb) + i));
            const __m256i sums = _mm256_loadu_si256((const __m256i *)(xq + t * xs + 36 * nb + 4 * i));
            corr[t] = _mm256_fmadd_ps(s8, _mm256_cvtepi32_ps(sums), corr[t]);
            const __m512 s = _mm512_castps256_ps512(s8);
            for (int p = 0; p < 4; p++)
                K(pair_fma)(acc[t], p, s, K(dpbusd)(zero, u[p], _mm512_loadu_si512((const void *)(x + 64 * p))));
        }
    }
    B32_512_PAIRS(K(q4_0_upair), BS_Q4_0, 0, 8, -1)
    MN_B32_TAIL(mn_unpack_q4_0, w, BS_Q4_0, i, nb, xq, xs, NT, tail);
    K(hsums2)(acc, NT, res);
    for (int t = 0; t < NT; t++) res[t] += -8.f * hsum8(corr[t]) + tail[t];
}
MN_TILED_AS(K(dot_q4_0), K(dot_q4_0_t))

/* ------------------------------- Q8_0, Q4_1, Q5_0, Q5_1, IQ4_NL (Q8_0 rows) */
/* two blocks' 16 nibble bytes -> 64 values: block 0's low, high nibbles, block 1's */
MN_INLINE __m512i K(nib_pair)(const uint8_t *q0, const uint8_t *q1) {
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q0))),
                                         _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q1)), 1);
    return _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFF00FF00u, v, 4), _mm512_set1_epi8(0xF));
}
/* two blocks' 32 fifth bits -> 0x10 bytes */
MN_INLINE __m512i K(bit5_pair)(const uint8_t *h0, const uint8_t *h1) {
    return _mm512_maskz_mov_epi8((__mmask64)mn_rd32(h0) | ((__mmask64)mn_rd32(h1) << 32), _mm512_set1_epi8(0x10));
}
MN_INLINE __m512i K(q8_0_pair)(const uint8_t *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b + 2))),
                              _mm256_loadu_si256((const __m256i *)(b + BS_Q8_0 + 2)), 1);
}
MN_INLINE __m512i K(q4_1_pair)(const uint8_t *b) { return K(nib_pair)(b + 4, b + BS_Q4_1 + 4); }
MN_INLINE __m512i K(q5_0_pair)(const uint8_t *b) {
    return _mm512_sub_epi8(_mm512_or_si512(K(nib_pair)(b + 6, b + BS_Q5_0 + 6), K(bit5_pair)(b + 2, b + BS_Q5_0 + 2)),
                           _mm512_set1_epi8(16));
}
MN_INLINE __m512i K(q5_1_pair)(const uint8_t *b) {
    return _mm512_or_si512(K(nib_pair)(b + 8, b + BS_Q5_1 + 8), K(bit5_pair)(b + 4, b + BS_Q5_1 + 4));
}
MN_INLINE __m512i K(iq4_nl_pair)(const uint8_t *b) {
    const __m512i kv = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)mn_kvalues_iq4nl));
    return _mm512_shuffle_epi8(kv, K(nib_pair)(b + 2, b + BS_IQ4_NL + 2));
}

/* 8 blocks per step; PAIR(b): two blocks' values as int8; MOFF >= 0: the fp16
 * min at that offset adds m * dx * sum(xq) (the rows carry the block sums);
 * UNPACK: the scalar unpacking, for the tail blocks */
#define B32_512(name, BS, PAIR, MOFF, UNPACK) \
MN_INLINE void K(name##_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) { \
    __m512 acc[MN_TILE][2]; \
    __m256 corr[MN_TILE]; \
    float tail[MN_TILE]; \
    for (int t = 0; t < NT; t++) { acc[t][0] = acc[t][1] = _mm512_setzero_ps(); corr[t] = _mm256_setzero_ps(); tail[t] = 0.f; } \
    const __m512i zero = _mm512_setzero_si512(); \
    int64_t i = 0; \
    for (; i + 8 <= nb; i += 8) { \
        const uint8_t *b = mn_block(w, i * BS, (8 * BS + 63) / 64); \
        const __m256 dw = K(scales8)(b, BS); \
        __m256 mw = _mm256_setzero_ps(); \
        if (MOFF >= 0) mw = K(scales8)(b + (MOFF), BS); \
        __m512i u[4]; __mmask64 m[4]; \
        for (int p = 0; p < 4; p++) { \
            const __m512i q = PAIR(b + 2 * p * BS); \
            u[p] = _mm512_abs_epi8(q); m[p] = _mm512_movepi8_mask(q); \
        } \
        for (int t = 0; t < NT; t++) { \
            const int8_t *x = (const int8_t *)(xq + t * xs) + 32 * i; \
            const __m256 xd = _mm256_loadu_ps((const float *)(xq + t * xs + 32 * nb) + i); \
            if (MOFF >= 0) { \
                /* the min times llama.cpp's Q8_1 sum (fp16-rounded) */ \
                corr[t] = _mm256_fmadd_ps(mw, _mm256_loadu_ps((const float *)(xq + t * xs + 40 * nb) + i), corr[t]); \
            } \
            const __m512 s = _mm512_castps256_ps512(_mm256_mul_ps(dw, xd)); \
            for (int p = 0; p < 4; p++) { \
                const __m512i xv = _mm512_loadu_si512((const void *)(x + 64 * p)); \
                const __m512i sx = _mm512_mask_sub_epi8(xv, m[p], zero, xv); \
                K(pair_fma)(acc[t], p, s, K(dpbusd)(zero, u[p], sx)); \
            } \
        } \
    } \
    B32_512_PAIRS(PAIR, BS, 1, 0, MOFF) \
    MN_B32_TAIL(UNPACK, w, BS, i, nb, xq, xs, NT, tail); \
    K(hsums2)(acc, NT, res); \
    for (int t = 0; t < NT; t++) res[t] += hsum8(corr[t]) + tail[t]; \
}
B32_512(dot_q4_1, BS_Q4_1, K(q4_1_pair), 2, mn_unpack_q4_1)
B32_512(dot_q5_0, BS_Q5_0, K(q5_0_pair), -1, mn_unpack_q5_0)
B32_512(dot_q5_1, BS_Q5_1, K(q5_1_pair), 2, mn_unpack_q5_1)
B32_512(dot_iq4_nl, BS_IQ4_NL, K(iq4_nl_pair), -1, mn_unpack_iq4_nl)

#if MN_VNNI
/* Q8_0: each block's integer dot is exact (S), then one float step into partial sum
 * i % 4, p = fma(d * dx, S, p); the row's sum is (p0 + p1) + (p2 + p3).  The sixteen-row
 * GEMM below makes the same steps, so the driver may pick either by shape. */
/* the int32 sums of eight blocks (in order) from four pairs' dpbusd lanes (pair k: block 2k
 * in lanes 0-7, 2k + 1 in 8-15) */
MN_INLINE __m256i K(q8_sums8)(const __m512i d[4]) {
    const __m512i u01 = _mm512_add_epi32(_mm512_unpacklo_epi32(d[0], d[1]), _mm512_unpackhi_epi32(d[0], d[1]));
    const __m512i u23 = _mm512_add_epi32(_mm512_unpacklo_epi32(d[2], d[3]), _mm512_unpackhi_epi32(d[2], d[3]));
    /* 128-bit lane L: pair k's sum over its four lanes there, k = 0..3 */
    __m512i v = _mm512_add_epi32(_mm512_unpacklo_epi64(u01, u23), _mm512_unpackhi_epi64(u01, u23));
    v = _mm512_add_epi32(v, _mm512_shuffle_i32x4(v, v, 0xB1));   /* lane 0: blocks 0, 2, 4, 6; lane 2: 1, 3, 5, 7 */
    return _mm512_castsi512_si256(_mm512_permutexvar_epi32(_mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 0, 0, 0, 0, 0, 0, 0, 0), v));
}
/* two blocks' q + 128 for dpbusd's unsigned side: the dot is sum (q + 128) x - 128 sum x, with
 * the rows' int block sums (maddubs would saturate on it: the level without VNNI keeps the
 * kernel of the other 32-value types, and has no multi-row run) */
MN_INLINE __m512i K(q8_0_upair)(const uint8_t *b) { return _mm512_xor_si512(K(q8_0_pair)(b), _mm512_set1_epi8((char)0x80)); }
MN_INLINE __m512i K(q8_pair_dot)(__m512i u, const int8_t *x) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512((const void *)x));
}
MN_INLINE void K(dot_q8_0_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    __m128 p[MN_TILE];
    for (int t = 0; t < NT; t++) p[t] = _mm_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) {
        const uint8_t *b = mn_block(w, i * BS_Q8_0, 5);
        const __m256 dw = K(scales8)(b, BS_Q8_0);
        __m512i u[4];
        for (int k = 0; k < 4; k++) u[k] = K(q8_0_upair)(b + 2 * k * BS_Q8_0);
        for (int t = 0; t < NT; t++) {
            const uint8_t *xr = xq + t * xs;
            const int8_t *x = (const int8_t *)xr + 32 * i;
            __m512i d[4];
            for (int k = 0; k < 4; k++) d[k] = K(q8_pair_dot)(u[k], x + 64 * k);
            const __m256i off = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(xr + 36 * nb + 4 * i)), 7);
            const __m256 S = _mm256_cvtepi32_ps(_mm256_sub_epi32(K(q8_sums8)(d), off));
            const __m256 s = _mm256_mul_ps(dw, _mm256_loadu_ps((const float *)(xr + 32 * nb) + i));
            p[t] = _mm_fmadd_ps(_mm256_castps256_ps128(s), _mm256_castps256_ps128(S), p[t]);
            p[t] = _mm_fmadd_ps(_mm256_extractf128_ps(s, 1), _mm256_extractf128_ps(S, 1), p[t]);
        }
    }
    if (i + 4 <= nb) {   /* a split expert's 384-column slice: 12 blocks */
        const uint8_t *b = w + i * BS_Q8_0;
        const __m128 dw = h4(b, BS_Q8_0);
        const __m512i u0 = K(q8_0_upair)(b), u1 = K(q8_0_upair)(b + 2 * BS_Q8_0);
        for (int t = 0; t < NT; t++) {
            const uint8_t *xr = xq + t * xs;
            const int8_t *x = (const int8_t *)xr + 32 * i;
            const __m512i d[4] = {K(q8_pair_dot)(u0, x), K(q8_pair_dot)(u1, x + 64), _mm512_setzero_si512(), _mm512_setzero_si512()};
            const __m128i off = _mm_slli_epi32(_mm_loadu_si128((const __m128i *)(xr + 36 * nb + 4 * i)), 7);
            const __m128 S = _mm_cvtepi32_ps(_mm_sub_epi32(_mm256_castsi256_si128(K(q8_sums8)(d)), off));
            p[t] = _mm_fmadd_ps(_mm_mul_ps(dw, _mm_loadu_ps((const float *)(xr + 32 * nb) + i)), S, p[t]);
        }
        i += 4;
    }
    for (; i < nb; i++) {   /* one block at a time, into its lane */
        const uint8_t *b = w + i * BS_Q8_0;
        const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 2)), u = _mm256_abs_epi8(q);
        const float dw = h2f(b);
        const __mmask8 lane = (__mmask8)(1u << (i & 3));
        for (int t = 0; t < NT; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + t * xs + 32 * i));
            /* |q| <= 128, |x| <= 127: the pair sums of maddubs do not saturate */
            const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(xv, q)), _mm256_set1_epi16(1));
            const float S = (float)_mm_cvtsi128_si32(isum_all(half_sum(d)));
            const float dx = ((const float *)(xq + t * xs + 32 * nb))[i];
            p[t] = _mm_mask3_fmadd_ps(_mm_set1_ps(dw * dx), _mm_set1_ps(S), p[t], lane);
        }
    }
    for (int t = 0; t < NT; t++) res[t] = parts_sum(p[t]);
}
MN_TILED_AS(K(dot_q8_0), K(dot_q8_0_t))

/* The sixteen-row Q8_0 GEMM: per block, eight 64-byte groups (group g: values 4g..4g+3 of
 * the sixteen rows, row j in dword j, each q + 128 for dpbusd's unsigned side), then the
 * rows' scales as floats.  One broadcast of a token's four values feeds sixteen rows, and a
 * row's integer dot needs no horizontal sum: a quarter of dot's instructions per product. */
#define Q8X16_BLK (8 * 64 + 64)
static void K(q8_0x16_pack)(const uint8_t *w, size_t ws, int64_t i0, int64_t n, void *buf) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    /* qwords of (a, b): 128-bit lanes 0 of a, 0 of b, 2 of a, 2 of b; and lanes 1, 1, 3, 3 */
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int64_t ii = 0; ii < n; ii++) {
        const uint8_t *b = w + (i0 + ii) * BS_Q8_0;
        uint8_t *o = (uint8_t *)buf + ii * Q8X16_BLK;
        /* z[r]: row r's eight dwords of values, then row r + 8's: an 8 x 8 transpose in each half */
        __m512i z[8], t[8], u[8];
        for (int r = 0; r < 8; r++)
            z[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b + r * ws + 2))),
                                      _mm256_loadu_si256((const __m256i *)(b + (r + 8) * ws + 2)), 1);
        for (int r = 0; r < 8; r += 2) {
            t[r] = _mm512_unpacklo_epi32(z[r], z[r + 1]);
            t[r + 1] = _mm512_unpackhi_epi32(z[r], z[r + 1]);
        }
        for (int h = 0; h < 8; h += 4) {   /* u[h + g], lane 0: rows h..h+3, dword g; lane 1: dword g + 4 */
            u[h] = _mm512_unpacklo_epi64(t[h], t[h + 2]);
            u[h + 1] = _mm512_unpackhi_epi64(t[h], t[h + 2]);
            u[h + 2] = _mm512_unpacklo_epi64(t[h + 1], t[h + 3]);
            u[h + 3] = _mm512_unpackhi_epi64(t[h + 1], t[h + 3]);
        }
        for (int g = 0; g < 4; g++) {
            _mm512_store_si512((void *)(o + 64 * g), _mm512_xor_si512(_mm512_permutex2var_epi64(u[g], first, u[4 + g]), flip));
            _mm512_store_si512((void *)(o + 64 * (g + 4)), _mm512_xor_si512(_mm512_permutex2var_epi64(u[g], second, u[4 + g]), flip));
        }
        uint16_t d[16];
        for (int r = 0; r < 16; r++) d[r] = mn_rd16(b + r * ws);
        _mm512_store_ps((float *)(o + 512), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d)));
    }
}
MN_INLINE void K(q8_0x16_run_t)(const void *buf, int64_t i0, int64_t n, int64_t nb, const uint8_t *xq, size_t xs,
                                const int NT, float *accp) {
    for (int64_t ii = 0; ii < n; ii++) {
        const uint8_t *b = (const uint8_t *)buf + ii * Q8X16_BLK;
        const int64_t i = i0 + ii;
        __m512i v[8];
        for (int g = 0; g < 8; g++) v[g] = _mm512_load_si512((const void *)(b + 64 * g));
        const __m512 dw = _mm512_load_ps((const float *)(b + 512));
        for (int t = 0; t < NT; t++) {
            const uint8_t *xr = xq + t * xs, *x = xr + 32 * i;
            /* sum (q + 128) x - 128 sum x, with the row's int block sum */
            __m512i a0 = _mm512_set1_epi32(-128 * ((const int32_t *)(xr + 36 * nb))[i]), a1 = _mm512_setzero_si512();
            for (int g = 0; g < 8; g += 2) {
                a0 = _mm512_dpbusd_epi32(a0, v[g], _mm512_set1_epi32((int)mn_rd32(x + 4 * g)));
                a1 = _mm512_dpbusd_epi32(a1, v[g + 1], _mm512_set1_epi32((int)mn_rd32(x + 4 * g + 4)));
            }
            const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(((const float *)(xr + 32 * nb))[i]));
            float *pp = accp + 16 * (4 * t + (i & 3));
            /* blocks 0-3 start their parts (inits): fma onto +0, as onto the driver's zeroes */
            const __m512 prev = _mm512_maskz_loadu_ps(i < 4 ? 0 : 0xFFFF, pp);
            _mm512_storeu_ps(pp, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)), prev));
        }
    }
}
static void K(mr_reduce16)(const float *acc, int64_t tn, float *out, int64_t out_stride) {
    for (int64_t t = 0; t < tn; t++) {
        const float *a = acc + 64 * t;
        const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(a), _mm512_load_ps(a + 16)),
                                       _mm512_add_ps(_mm512_load_ps(a + 32), _mm512_load_ps(a + 48)));
        _mm512_storeu_ps(out + t * out_stride, s);
    }
}
static void K(q8_0x16_run)(const void *buf, int64_t i0, int64_t n, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *acc) {
    switch (nt) {
    case 1: K(q8_0x16_run_t)(buf, i0, n, nb, xq, xs, 1, acc); break;
    case 2: K(q8_0x16_run_t)(buf, i0, n, nb, xq, xs, 2, acc); break;
    case 3: K(q8_0x16_run_t)(buf, i0, n, nb, xq, xs, 3, acc); break;
    default: K(q8_0x16_run_t)(buf, i0, n, nb, xq, xs, 4, acc); break;
    }
}
#else
B32_512(dot_q8_0, BS_Q8_0, K(q8_0_pair), -1, mn_unpack_q8_0)
MN_TILED_AS(K(dot_q8_0), K(dot_q8_0_t))
#endif
MN_TILED_AS(K(dot_q4_1), K(dot_q4_1_t))
MN_TILED_AS(K(dot_q5_0), K(dot_q5_0_t))
MN_TILED_AS(K(dot_q5_1), K(dot_q5_1_t))
MN_TILED_AS(K(dot_iq4_nl), K(dot_iq4_nl_t))

/* ---------------------------------------------------------------- IQ4_XS */
MN_INLINE void K(dot_iq4_xs_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    const __m512i kv = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)mn_kvalues_iq4nl));
    const __m512i zero = _mm512_setzero_si512();
    /* lanes 0-7 (the low half of the result of cvtepi32_epi16) hold ib = 0..7 */
    const __m512i shl4 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i shl2 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[MN_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = mn_block(w, i * BS_IQ4_XS, 3);
        const float d = h2f(b);
        /* the 8 scales (int16) in every 128-bit lane; lanes of each 256-bit half pick one */
        const __m512i lo = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)mn_rd32(b + 4)), shl4), _mm512_set1_epi32(0xF));
        const __m512i hi = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(mn_rd16(b + 2)), shl2), _mm512_set1_epi32(3));
        const __m512i sc32 = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
        const __m512i scs = _mm512_broadcast_i32x4(_mm256_castsi256_si128(_mm512_cvtepi32_epi16(sc32)));
        __m512i u[4], sv[4]; __mmask64 m[4];
        for (int p = 0; p < 4; p++) {   /* sub-blocks 2p (bytes 0-15) and 2p+1 (16-31) */
            const uint8_t *q = b + 8 + 32 * p;
            const __m512i v = _mm512_shuffle_epi8(kv, K(nib_pair)(q, q + 16));
            u[p] = _mm512_abs_epi8(v); m[p] = _mm512_movepi8_mask(v);
            const __m512i ctl = _mm512_inserti64x4(_mm512_set1_epi16((short)(0x0100 + 0x0202 * (2 * p))),
                                                   _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * p + 1))), 1);
            sv[p] = _mm512_shuffle_epi8(scs, ctl);
        }
        for (int t = 0; t < NT; t++) {
            const int8_t *x = (const int8_t *)(xq + t * xs) + QK_K * i;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int p = 0; p < 4; p += 2) {
                const __m512i x0 = _mm512_loadu_si512((const void *)(x + 64 * p));
                const __m512i x1 = _mm512_loadu_si512((const void *)(x + 64 * p + 64));
                s0 = K(dpwssd)(s0, _mm512_maddubs_epi16(u[p], _mm512_mask_sub_epi8(x0, m[p], zero, x0)), sv[p]);
                s1 = K(dpwssd)(s1, _mm512_maddubs_epi16(u[p + 1], _mm512_mask_sub_epi8(x1, m[p + 1], zero, x1)), sv[p + 1]);
            }
            const float dy = ((const float *)(xq + t * xs + QK_K * nb))[i];
            acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * dy), _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), acc[t]);
        }
    }
    K(hsums)(acc, NT, res);
}
MN_TILED_AS(K(dot_iq4_xs), K(dot_iq4_xs_t))

/* ---------------------------------------------------------------- Q4_K */

/* Q4_K, and Q5_K (Q5 = 1: a fifth bit from qh).  As at AVX2 (mn_avx2.c): each super-block
 * ends in exact integers S, M per row and token and one float step into partial sum i % 4
 * (k45_step), which the eight-row GEMM below repeats bit for bit. */
/* super-block b's values (qv) and scales (sv) for k_dot256, and its 8 mins */
MN_INLINE __m128i K(k45_prep)(const int Q5, const uint8_t *b, __m512i *qv, __m512i *sv) {
    const __m512i m4 = _mm512_set1_epi8(0xF), m1 = _mm512_set1_epi8(1);
    __m512i hb = _mm512_setzero_si512();
    if (Q5) hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
    const __m128i sm = k4_scales(b + 4);
    const __m512i sc = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(sm));
    for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + (Q5 ? 48 : 16) + 32 * j)));
        qv[j] = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4), m4);
        if (Q5) {   /* bit 2j of qh for the low half, bit 2j+1 for the high half */
            const __m512i sh = _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * j)), _mm256_set1_epi16((short)(2 * j + 1)), 1);
            qv[j] = _mm512_or_si512(qv[j], _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hb, sh), m1), 4));
        }
        /* lanes 0,1 <- scale 2j, lanes 2,3 <- scale 2j+1 (int16 in each lane) */
        const int lo = 0x0100 + 0x0202 * (2 * j), hi = 0x0100 + 0x0202 * (2 * j + 1);
        const __m512i ctl = _mm512_inserti64x4(_mm512_set1_epi16((short)lo), _mm256_set1_epi16((short)hi), 1);
        sv[j] = _mm512_shuffle_epi8(sc, ctl);
    }
    return _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
}
#define K45_PS(xr, nb, i) _mm_loadu_si128((const __m128i *)((xr) + (QK_K + 36) * (nb) + 16 * (i)))
/* G (<= 4) super-blocks from i for NT tokens: lane k of p[t] = token t's partial sum of
 * super-block i + k, so the last horizontal sums and the float steps of four super-blocks
 * are done at once (G < 4, the last step: one lane at a time).  Each dot is halved to 128 bits at once: it frees the registers (+5% on Q5_K's GEMV
 * against one tree over the four). */
MN_INLINE void K(q45_group)(const int Q5, const int G, const uint8_t *w, int64_t i, int64_t nb, const uint8_t *xq,
                            size_t xs, const int NT, __m128 *p) {
    const size_t BS = Q5 ? BS_Q5_K : BS_Q4_K;
    if (G < 4) {   /* one super-block at a time: short rows (a split expert's slice) are all tail */
        for (int k = 0; k < G; k++) {
            const uint8_t *b = mn_block(w, (i + k) * BS, 3);
            __m512i qv[4], sv[4];
            const __m128i mins = K(k45_prep)(Q5, b, qv, sv);
            for (int t = 0; t < NT; t++) {
                const uint8_t *xr = xq + t * xs;
                const __m512i v = K(k_dot256)(qv, sv, K_X(xr, i + k), _mm512_setzero_si512());
                const __m128i S = isum_all(half_sum(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1))));
                const __m128i M = isum_all(_mm_madd_epi16(mins, K45_PS(xr, nb, i + k)));
                p[t] = k45_step_lane(p[t], k, S, M, h2f(b), h2f(b + 2), *K_DY(xr, nb, i + k));
            }
        }
        return;
    }
    __m128i s[MN_TILE][4];
    __m128i mins[4];
    for (int k = 0; k < 4; k++) {
        mins[k] = _mm_setzero_si128();
        for (int t = 0; t < NT; t++) s[t][k] = _mm_setzero_si128();
    }
    for (int k = 0; k < G; k++) {
        __m512i qv[4], sv[4];
        mins[k] = K(k45_prep)(Q5, mn_block(w, (i + k) * BS, 3), qv, sv);
        for (int t = 0; t < NT; t++) {
            const __m512i v = K(k_dot256)(qv, sv, K_X(xq + t * xs, i + k), _mm512_setzero_si512());
            s[t][k] = half_sum(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
        }
    }
    const __m512i mn4 = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(mins[0]), mins[1], 1),
                                                              mins[2], 2), mins[3], 3);
    const uint8_t *b = w + i * BS;
    const __m128 d = h4(b, BS), dm = h4(b + 2, BS);
    const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int t = 0; t < NT; t++) {
        const uint8_t *xr = xq + t * xs;
        /* the four super-blocks' sums of 32 (16 bytes each) */
        const __m512i ps = _mm512_loadu_si512((const void *)(xr + (QK_K + 36) * nb + 16 * i));
        __m512i m = _mm512_madd_epi16(mn4, ps);   /* 128-bit lane k: super-block k's four partial sums */
        m = _mm512_add_epi32(m, _mm512_shuffle_epi32(m, (_MM_PERM_ENUM)0x4E));
        m = _mm512_add_epi32(m, _mm512_shuffle_epi32(m, (_MM_PERM_ENUM)0xB1));
        const __m128i M = _mm512_castsi512_si128(_mm512_permutexvar_epi32(pick, m));
        const __m128 dy = _mm_loadu_ps(K_DY(xr, nb, i));
        p[t] = k45_step(p[t], sum4x4(s[t][0], s[t][1], s[t][2], s[t][3]), M, d, dm, dy);
    }
}
MN_INLINE void K(dot_q45_K_t)(const int Q5, const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    __m128 p[MN_TILE];
    for (int t = 0; t < NT; t++) p[t] = _mm_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) K(q45_group)(Q5, 4, w, i, nb, xq, xs, NT, p);
    switch (nb - i) {
    case 1: K(q45_group)(Q5, 1, w, i, nb, xq, xs, NT, p); break;
    case 2: K(q45_group)(Q5, 2, w, i, nb, xq, xs, NT, p); break;
    case 3: K(q45_group)(Q5, 3, w, i, nb, xq, xs, NT, p); break;
    default: break;
    }
    for (int t = 0; t < NT; t++) res[t] = parts_sum(p[t]);
}
/* The eight-row GEMM (mn_x86.h's k45_pack with R = 8): a quarter of dot's dpwssd's. */
MN_INLINE void K(k45x8_run_t)(const void *buf, int64_t i0, int64_t n, int64_t nb, const uint8_t *xq, size_t xs,
                              const int NT, float *accp) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    /* after the adds below: row k's M in lane 4k of m (k < 4) and 4k + 1 ... of the second half */
    const __m512i rows = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t ii = 0; ii < n; ii++) {
        const uint8_t *b = (const uint8_t *)buf + ii * K45_BLK(8);
        const int64_t i = i0 + ii;
        __m512i I[MN_TILE];
        for (int t = 0; t < NT; t++) I[t] = _mm512_setzero_si512();
        for (int c = 0; c < 8; c++) {
            const __m512i a0 = _mm512_load_si512((const void *)K45_V(b, 8, c, 0)), a1 = _mm512_load_si512((const void *)K45_V(b, 8, c, 1));
            const __m512i a2 = _mm512_load_si512((const void *)K45_V(b, 8, c, 2)), a3 = _mm512_load_si512((const void *)K45_V(b, 8, c, 3));
            const __m512i sc = _mm512_load_si512((const void *)K45_SC(b, 8, c));
            for (int t = 0; t < NT; t++) {
                const int8_t *x = K_X(xq + t * xs, i) + 32 * c;
                const __m512i p0 = _mm512_add_epi16(_mm512_maddubs_epi16(a0, _mm512_set1_epi64((long long)mn_rd64((const uint8_t *)x))),
                                                    _mm512_maddubs_epi16(a1, _mm512_set1_epi64((long long)mn_rd64((const uint8_t *)x + 8))));
                const __m512i p1 = _mm512_add_epi16(_mm512_maddubs_epi16(a2, _mm512_set1_epi64((long long)mn_rd64((const uint8_t *)x + 16))),
                                                    _mm512_maddubs_epi16(a3, _mm512_set1_epi64((long long)mn_rd64((const uint8_t *)x + 24))));
                I[t] = K(dpwssd)(I[t], _mm512_add_epi16(p0, p1), sc);
            }
        }
        const __m512i mn0 = _mm512_load_si512((const void *)K45_MINS(b, 8)), mn1 = _mm512_load_si512((const void *)(K45_MINS(b, 8) + 64));
        const __m256 d = _mm256_loadu_ps(K45_D(b, 8)), dmin = _mm256_loadu_ps(K45_DMIN(b, 8));
        for (int t = 0; t < NT; t++) {
            const uint8_t *xr = xq + t * xs;
            /* row j's two int32 at lanes 2j, 2j + 1 */
            const __m256i S = _mm512_castsi512_si256(_mm512_permutexvar_epi32(even, _mm512_add_epi32(I[t], _mm512_shuffle_epi32(I[t], (_MM_PERM_ENUM)0xB1))));
            const __m512i ps = _mm512_broadcast_i32x4(K45_PS(xr, nb, i));
            /* rows 0-3 (a) and 4-7 (b), four int32 each per 128-bit lane */
            const __m512i ma = _mm512_madd_epi16(mn0, ps), mb = _mm512_madd_epi16(mn1, ps);
            const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi32(ma, mb), _mm512_unpackhi_epi32(ma, mb));
            const __m512i v = _mm512_add_epi32(_mm512_unpacklo_epi64(u, u), _mm512_unpackhi_epi64(u, u));   /* lane k: [a_k b_k a_k b_k] */
            const __m256i M = _mm512_castsi512_si256(_mm512_permutexvar_epi32(rows, v));
            float *pp = accp + 32 * t + 8 * (i & 3);
            _mm256_storeu_ps(pp, k45_step8(_mm256_loadu_ps(pp), S, M, d, dmin, _mm256_set1_ps(*K_DY(xr, nb, i))));
        }
    }
}
#define K45X8(name, Q5) \
    static void K(name##_pack)(const uint8_t *w, size_t ws, int64_t i0, int64_t n, void *buf) { k45_pack(Q5, 8, w, ws, i0, n, buf); } \
    static void K(name##_run)(const void *buf, int64_t i0, int64_t n, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *acc) { \
        switch (nt) { \
        case 1: K(k45x8_run_t)(buf, i0, n, nb, xq, xs, 1, acc); break; \
        case 2: K(k45x8_run_t)(buf, i0, n, nb, xq, xs, 2, acc); break; \
        case 3: K(k45x8_run_t)(buf, i0, n, nb, xq, xs, 3, acc); break; \
        default: K(k45x8_run_t)(buf, i0, n, nb, xq, xs, 4, acc); break; \
        } \
    }
K45X8(q4_Kx8, 0)
K45X8(q5_Kx8, 1)
MN_INLINE void K(dot_q4_K_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    K(dot_q45_K_t)(0, w, nb, xq, xs, NT, res);
}
MN_INLINE void K(dot_q5_K_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    K(dot_q45_K_t)(1, w, nb, xq, xs, NT, res);
}
MN_TILED_AS(K(dot_q4_K), K(dot_q4_K_t))
MN_TILED_AS(K(dot_q5_K), K(dot_q5_K_t))

/* ---------------------------------------------------------------- Q6_K */
MN_INLINE void K(dot_q6_K_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    const __m512i m4 = _mm512_set1_epi8(0xF), m30 = _mm512_set1_epi8(0x30);
    const __m512i shA = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i shB = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    __m512 acc[MN_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = mn_block(w, i * BS_Q6_K, 4);
        const float d = h2f(b + 208);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
        const __m512i scz = _mm512_castsi256_si512(sc16);
        __m512i qv[4], sv[4];
        for (int n = 0; n < 2; n++) {
            const __m512i l = _mm512_loadu_si512((const void *)(b + 64 * n));
            const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n)));
            const __m512i hA = _mm512_and_si512(_mm512_sllv_epi16(h, shA), m30);
            const __m512i hB = _mm512_and_si512(_mm512_srlv_epi16(h, shB), m30);
            qv[2 * n] = _mm512_or_si512(_mm512_and_si512(l, m4), hA);
            qv[2 * n + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4), hB);
        }
        for (int c = 0; c < 4; c++) {   /* chunk c covers sub-blocks 4c..4c+3, one per 128-bit lane */
            const __m512i idx = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16((short)(4 * c + 1)), _mm_set1_epi16((short)(4 * c)))),
                _mm256_set_m128i(_mm_set1_epi16((short)(4 * c + 3)), _mm_set1_epi16((short)(4 * c + 2))), 1);
            sv[c] = _mm512_permutexvar_epi16(idx, scz);
        }
        K(k_offset_tokens)(acc, NT, qv, sv, sc16, 5, d, xq, xs, nb, i);
    }
    K(hsums)(acc, NT, res);
}
MN_TILED_AS(K(dot_q6_K), K(dot_q6_K_t))

/* ------------------------------------------------------------ Q2_K, Q3_K
 * The 64 bytes of 2-bit quants hold value 128n + 32s + l at bits 2s of byte
 * 32n + l.  Four shifted copies a..d (s = 0..3) are recombined with lane
 * shuffles into qv[0..3] = values 0-63, 64-127, 128-191, 192-255, so each meets
 * one contiguous 64-byte slice of the activations; each 128-bit lane then holds
 * one group of 16 values and meets its scale (as int16) in dpwssd. */
MN_INLINE void K(k2_quants)(const uint8_t *qs, __m512i qv[4]) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i v = _mm512_loadu_si512((const void *)qs);
    const __m512i a = _mm512_and_si512(v, m3), b = _mm512_and_si512(_mm512_srli_epi16(v, 2), m3);
    const __m512i c = _mm512_and_si512(_mm512_srli_epi16(v, 4), m3), d = _mm512_and_si512(_mm512_srli_epi16(v, 6), m3);
    qv[0] = _mm512_shuffle_i64x2(a, b, 0x44); qv[1] = _mm512_shuffle_i64x2(c, d, 0x44);
    qv[2] = _mm512_shuffle_i64x2(a, b, 0xEE); qv[3] = _mm512_shuffle_i64x2(c, d, 0xEE);
}
/* 16 int16 scales (one per 16 values) -> per qv[k], lane j holds scale 4k + j */
MN_INLINE void K(k16_scales)(__m256i sc16, __m512i sv[4]) {
    const __m512i z = _mm512_castsi256_si512(sc16);
    for (int k = 0; k < 4; k++) {
        const __m512i idx = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16((short)(4 * k + 1)), _mm_set1_epi16((short)(4 * k)))),
            _mm256_set_m128i(_mm_set1_epi16((short)(4 * k + 3)), _mm_set1_epi16((short)(4 * k + 2))), 1);
        sv[k] = _mm512_permutexvar_epi16(idx, z);
    }
}

MN_INLINE void K(dot_q2_K_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    __m512 acc[MN_TILE]; __m256 macc[MN_TILE];
    for (int t = 0; t < NT; t++) { acc[t] = _mm512_setzero_ps(); macc[t] = _mm256_setzero_ps(); }
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = mn_block(w, i * BS_Q2_K, 2);
        const float d = h2f(b + 80), dmin = h2f(b + 82);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)b);
        const __m256i sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(sc8, _mm_set1_epi8(0xF)));
        const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc8, 4), _mm_set1_epi8(0xF)));
        __m512i qv[4], sv[4];
        K(k2_quants)(b + 16, qv);
        K(k16_scales)(sc16, sv);
        for (int t = 0; t < NT; t++) {
            const uint8_t *xr = xq + t * xs;
            const float dy = *K_DY(xr, nb, i);
            macc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * dy), _mm256_cvtepi32_ps(_mm256_madd_epi16(mn16, K_BSUMS(xr, nb, i))),
                                      macc[t]);
            acc[t] = K(k_acc256)(acc[t], d, K_DY(xr, nb, i), qv, sv, K_X(xr, i), _mm512_setzero_si512());
        }
    }
    K(hsums)(acc, NT, res);
    for (int t = 0; t < NT; t++) res[t] -= hsum8(macc[t]);
}
MN_TILED_AS(K(dot_q2_K), K(dot_q2_K_t))

/* Q3_K: u = 2 low bits + 4 * high bit (0..7) = value + 4, so
 * dot = d * dy * (sum_k sc_k sum u x - 4 sum_k sc_k bsum_k) */
MN_INLINE void K(dot_q3_K_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) {
    __m512 acc[MN_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    const __m512i four = _mm512_set1_epi8(4);
    /* high bit of value 128n + 32s + l: bit 4n + s of hmask[l]; qv[k] covers (n, s) pairs
     * (0,0)(0,1) | (0,2)(0,3) | (1,0)(1,1) | (1,2)(1,3), one per 256-bit half */
    __m512i hbit[4];
    for (int k = 0; k < 4; k++) {
        const int n = k >> 1, s0 = 2 * (k & 1);
        hbit[k] = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (4 * n + s0))), _mm256_set1_epi8((char)(1 << (4 * n + s0 + 1))), 1);
    }
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = mn_block(w, i * BS_Q3_K, 2);
        const float d = h2f(b + 108);
        const __m256i sc16 = _mm256_cvtepi8_epi16(k3_scales(b));
        __m512i qv[4], sv[4];
        K(k2_quants)(b + 32, qv);
        const __m512i hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)b));
        for (int k = 0; k < 4; k++) qv[k] = _mm512_mask_add_epi8(qv[k], _mm512_test_epi8_mask(hm, hbit[k]), qv[k], four);
        K(k16_scales)(sc16, sv);
        K(k_offset_tokens)(acc, NT, qv, sv, sc16, 2, d, xq, xs, nb, i);
    }
    K(hsums)(acc, NT, res);
}
MN_TILED_AS(K(dot_q3_K), K(dot_q3_K_t))

#include "mn_avx512_iq.h"

static void K(fill)(mn_traits *tab, int level) {
#define SET(T, f) tab[MN_##T].dot[level] = f
    SET(F32, K(dot_f32)); SET(F16, K(dot_f16)); SET(BF16, K(dot_bf16));
    SET(Q8_0, K(dot_q8_0)); SET(Q4_0, K(dot_q4_0));
    SET(Q4_K, K(dot_q4_K)); SET(Q5_K, K(dot_q5_K)); SET(Q6_K, K(dot_q6_K));
    SET(Q4_1, K(dot_q4_1)); SET(Q5_0, K(dot_q5_0)); SET(Q5_1, K(dot_q5_1)); SET(IQ4_NL, K(dot_iq4_nl));
    SET(IQ4_XS, K(dot_iq4_xs)); SET(Q2_K, K(dot_q2_K)); SET(Q3_K, K(dot_q3_K));
#undef SET
    /* from 4 tokens faster than dot (one core, 2048 x 2048: at 2-3 the packing is not paid back) */
    tab[MN_Q4_K].multi[level] = (mn_multirow){K(q4_Kx8_pack), K(q4_Kx8_run), K45_BLK(8), 8, 4};
    tab[MN_Q5_K].multi[level] = (mn_multirow){K(q5_Kx8_pack), K(q5_Kx8_run), K45_BLK(8), 8, 4};
#if MN_VNNI
    tab[MN_Q8_0].multi[level] = (mn_multirow){K(q8_0x16_pack), K(q8_0x16_run), Q8X16_BLK, 16, 2, 1, K(mr_reduce16)};
#endif
    K(fill_iq)(tab, level);
}
