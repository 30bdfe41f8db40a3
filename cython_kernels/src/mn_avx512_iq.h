/* AVX-512 IQ kernels (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S),
 * included by mn_avx512_tmpl.h inside each AVX-512 level's target pragma (K(),
 * dpwssd, k16_scales in scope).
 * Per 64 values (two sub-blocks, "pair" p): eight grid rows loaded into one
 * register (a gather is slower on the CPUs measured), the values' signs as a
 * 64-bit mask register that negates the activations in one masked subtract,
 * one maddubs and one dpwssd with the integer scales (one per 16 values).  The
 * packed 7-bit sign indices of IQ2_XXS / IQ2_XS / IQ3_XXS are turned into sign
 * bytes for the whole block at once in vector registers, and so are the grid
 * indices. */
#include "mn_iq.h"

/* 32 bytes of 7 sign bits -> with llama.cpp's even-parity 8th bit (ksigns_iq2xs) */
MN_INLINE __m256i K(iq_parity)(__m256i v) {
    /* bit 0 of each byte of p: the parity of that byte (the carries the shifts
     * bring in from the next byte stay above bit 0) */
    __m256i p = _mm256_xor_si256(v, _mm256_srli_epi64(v, 4));
    p = _mm256_xor_si256(p, _mm256_srli_epi64(p, 2));
    p = _mm256_xor_si256(p, _mm256_srli_epi64(p, 1));
    return _mm256_ternarylogic_epi64(_mm256_slli_epi64(p, 7), v, _mm256_set1_epi8((char)0x80), 0xEC);  /* (a & c) | b */
}
/* qword k of t holds sub-block k's 4 x 7 sign bits at bits 0-27 -> its 4 sign bytes at 4k */
MN_INLINE __m256i K(iq_ksigns)(__m512i t) {
    const int OR_AND = 0xEC;
    __m512i v = _mm512_and_si512(t, _mm512_set1_epi64(0x7F));
    v = _mm512_ternarylogic_epi64(_mm512_slli_epi64(t, 1), v, _mm512_set1_epi64(0x7F00), OR_AND);
    v = _mm512_ternarylogic_epi64(_mm512_slli_epi64(t, 2), v, _mm512_set1_epi64(0x7F0000), OR_AND);
    v = _mm512_ternarylogic_epi64(_mm512_slli_epi64(t, 3), v, _mm512_set1_epi64(0x7F000000), OR_AND);
    return K(iq_parity)(_mm512_cvtepi64_epi32(v));
}

/* index l of pair p's rows: straight from the block where it is a byte or a
 * masked u16 (faster than through ix: a wide store does not forward to the
 * narrow loads at speed), else from the vector-made ix (K(iq_index)) */
MN_INLINE unsigned K(iq_ix)(const int IQT, const uint8_t *b, const uint16_t *ix, int p, int l) {
    if (IQT == IQT_2XXS) return b[2 + 16 * p + l + (l & 4)];
    if (IQT == IQT_2XS) return mn_rd16(b + 2 + 16 * p + 2 * l) & 511;
    if (IQT == IQT_3XXS) return b[2 + 16 * p + l];
    if (IQT == IQT_2S) return b[2 + 8 * p + l] | (((unsigned)b[66 + 2 * p + l / 4] >> (2 * (l & 3))) & 3) << 8;
    return ix[(IQT == IQT_3S ? 16 : 8) * p + l];
}
/* pair p's 8 grid rows of 8 bytes -> 64 values */
MN_INLINE __m512i K(rows8)(const int IQT, const uint64_t *g, const uint8_t *b, const uint16_t *ix, int p) {
#define IX(l) K(iq_ix)(IQT, b, ix, p, l)
    const __m128i r0 = _mm_insert_epi64(_mm_loadl_epi64((const __m128i *)(g + IX(0))), (long long)g[IX(1)], 1);
    const __m128i r1 = _mm_insert_epi64(_mm_loadl_epi64((const __m128i *)(g + IX(2))), (long long)g[IX(3)], 1);
    const __m128i r2 = _mm_insert_epi64(_mm_loadl_epi64((const __m128i *)(g + IX(4))), (long long)g[IX(5)], 1);
    const __m128i r3 = _mm_insert_epi64(_mm_loadl_epi64((const __m128i *)(g + IX(6))), (long long)g[IX(7)], 1);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(r1, r0)), _mm256_set_m128i(r3, r2), 1);
}
/* pair p's 16 grid rows of 4 bytes (IQ3): paired in general registers, then as rows8 */
MN_INLINE __m512i K(rows16)(const int IQT, const uint32_t *g, const uint8_t *b, const uint16_t *ix, int p) {
    uint64_t r[8];
    for (int j = 0; j < 8; j++) r[j] = (uint64_t)g[IX(2 * j)] | ((uint64_t)g[IX(2 * j + 1)] << 32);
#undef IX
    const __m128i a = _mm_set_epi64x((long long)r[1], (long long)r[0]), c = _mm_set_epi64x((long long)r[3], (long long)r[2]);
    const __m128i d = _mm_set_epi64x((long long)r[5], (long long)r[4]), e = _mm_set_epi64x((long long)r[7], (long long)r[6]);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(c, a)), _mm256_set_m128i(e, d), 1);
}

/* 8 integer scales (one per sub-block, raw 4-bit or 3-bit s in int16 lanes) ->
 * the 16 per-16-value scales 2s + 1 that k16_scales spreads */
MN_INLINE __m256i K(iq_sc8)(__m128i s) {
    const __m128i v = _mm_add_epi16(_mm_add_epi16(s, s), _mm_set1_epi16(1));
    return _mm256_set_m128i(_mm_unpackhi_epi16(v, v), _mm_unpacklo_epi16(v, v));
}
/* 16 raw scales s (bytes) -> 2s + 1 in int16 lanes */
MN_INLINE __m256i K(iq_sc16)(__m128i s) {
    const __m256i v = _mm256_cvtepu8_epi16(s);
    return _mm256_add_epi16(_mm256_add_epi16(v, v), _mm256_set1_epi16(1));
}
/* 8 scale bytes, two nibbles each (low: the first 16 values) -> 16 raw scales */
MN_INLINE __m128i K(iq_nibbles)(const uint8_t *p) {
    const __m128i v = _mm_loadl_epi64((const __m128i *)p), m = _mm_set1_epi8(0xF);
    return _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
}

/* per block: d (with the format's 1/8 or 1/4), the 16 scales, and (IQ2/IQ3) the
 * sign bytes of the 256 values in sg (pair p's 64 sign bits: sg[p]) */
MN_INLINE float K(iq_head)(const int IQT, const uint8_t *b, __m256i *sc16, uint64_t sg[4]) {
    if (IQT == IQT_2XXS) {
        const __m512i q = _mm512_loadu_si512((const void *)(b + 2));   /* qword k: 4 grid bytes, u32 signs+scale */
        *sc16 = K(iq_sc8)(_mm512_cvtepi64_epi16(_mm512_srli_epi64(q, 60)));
        _mm256_storeu_si256((__m256i *)sg, K(iq_ksigns)(_mm512_srli_epi64(q, 32)));
    } else if (IQT == IQT_3XXS) {
        const __m512i t = _mm512_cvtepu32_epi64(_mm256_loadu_si256((const __m256i *)(b + 66)));
        *sc16 = K(iq_sc8)(_mm512_cvtepi64_epi16(_mm512_srli_epi64(t, 28)));
        _mm256_storeu_si256((__m256i *)sg, K(iq_ksigns)(t));
    } else if (IQT == IQT_2XS) {   /* u16 k: 9-bit grid index, 7 sign bits */
        const __m512i q = _mm512_loadu_si512((const void *)(b + 2));
        *sc16 = K(iq_sc16)(K(iq_nibbles)(b + 66));
        _mm256_storeu_si256((__m256i *)sg, K(iq_parity)(_mm512_cvtepi16_epi8(_mm512_srli_epi16(q, 9))));
    } else if (IQT == IQT_2S) {
        *sc16 = K(iq_sc16)(K(iq_nibbles)(b + 74));
        memcpy(sg, b + 34, 32);
    } else if (IQT == IQT_3S) {
        const __m128i v = _mm_cvtsi32_si128((int)mn_rd32(b + 106)), m = _mm_set1_epi8(0xF);
        const __m128i n = _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
        *sc16 = K(iq_sc8)(_mm_cvtepu8_epi16(n));
        memcpy(sg, b + 74, 32);
    } else if (IQT == IQT_1S) {   /* 8 (2s + 1): the values are 8 g, the deltas go by the sums of 32 */
        const __m128i qh = _mm_loadu_si128((const __m128i *)(b + 34));
        *sc16 = _mm256_slli_epi16(K(iq_sc8)(_mm_and_si128(_mm_srli_epi16(qh, 12), _mm_set1_epi16(7))), 3);
    } else {   /* IQ1_M: 3-bit scale k (per 16 values) at bit 3 (k % 4) of u16 k / 4 */
        const __m128i w = _mm_loadl_epi64((const __m128i *)(b + 48));   /* the block's last 8 bytes */
        const __m256i v = _mm256_cvtepu16_epi32(_mm_shuffle_epi8(w, _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3)));
        const __m256i v2 = _mm256_cvtepu16_epi32(_mm_shuffle_epi8(w, _mm_setr_epi8(4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7)));
        const __m256i sh = _mm256_setr_epi32(0, 3, 6, 9, 0, 3, 6, 9), m7 = _mm256_set1_epi32(7);
        const __m256i s = _mm256_packus_epi32(_mm256_and_si256(_mm256_srlv_epi32(v, sh), m7),
                                              _mm256_and_si256(_mm256_srlv_epi32(v2, sh), m7));
        /* packus interleaves the lanes: scales 0-3, 8-11 | 4-7, 12-15 */
        const __m256i o = _mm256_permute4x64_epi64(s, 0xD8);
        *sc16 = _mm256_add_epi16(_mm256_add_epi16(o, o), _mm256_set1_epi16(1));
    }
    return mn_iq_d(IQT, b);
}

/* the block's grid indices in ix (IQ1/IQ2: 32 rows of 8 values, IQ3: 64 rows of 4),
 * made in vector registers; IQ1_M: *neg, bit r set where row r's delta is -1 */
MN_INLINE void K(iq_index)(const int IQT, const uint8_t *b, uint16_t ix[64], uint32_t *neg) {
    /* per row r: the u16 of the high index bits (r / 4 or r / 2), and their shift */
    static const uint16_t per4[32] __attribute__((aligned(64))) = {
        0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7};
    static const uint16_t per2[32] __attribute__((aligned(64))) = {
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15};
    static const uint16_t sh3[32] __attribute__((aligned(64))) = {
        0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9};
    static const uint16_t sh4[32] __attribute__((aligned(64))) = {
        0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4};
    if (IQT == IQT_2XXS || IQT == IQT_2XS || IQT == IQT_3XXS || IQT == IQT_2S) {
        /* K(iq_ix) reads these from the block */
    } else if (IQT == IQT_3S) {   /* the ninth bits, one a row, in qh[8] */
        const uint64_t h = mn_rd64(b + 66);
        for (int k = 0; k < 2; k++) {
            const __m512i lo = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b + 2 + 32 * k)));
            _mm512_storeu_si512((void *)(ix + 32 * k),
                                _mm512_mask_add_epi16(lo, (__mmask32)(h >> (32 * k)), lo, _mm512_set1_epi16(256)));
        }
    } else {   /* IQ1_S, IQ1_M: the low 8 bits in qs[32], the high ones in a field per row */
        const __m512i lo = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b + (IQT == IQT_1M ? 0 : 2))));
        __m512i f;
        if (IQT == IQT_1S)   /* u16 qh[ib], 3 bits per row */
            f = _mm512_srlv_epi16(_mm512_permutexvar_epi16(_mm512_load_si512((const void *)per4),
                                      _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(b + 34)))),
                                  _mm512_load_si512((const void *)sh3));
        else                      /* IQ1_M: nibble r of qh[16], its low 3 bits */
            f = _mm512_srlv_epi16(_mm512_permutexvar_epi16(_mm512_load_si512((const void *)per2),
                                      _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 32))))),
                                  _mm512_load_si512((const void *)sh4));
        const __m512i m = _mm512_set1_epi16(0x700);
        _mm512_storeu_si512((void *)ix, _mm512_ternarylogic_epi64(_mm512_slli_epi16(f, 8), lo, m, 0xEC));   /* (a & c) | b */
    }
    if (IQT == IQT_1M) {   /* bit 3 of each nibble */
        *neg = (uint32_t)(_pext_u64(mn_rd64(b + 32), 0x8888888888888888ULL) | (_pext_u64(mn_rd64(b + 40), 0x8888888888888888ULL) << 16));
    }
}

/* pair p's 64 values: magnitudes *u and the mask of the negative ones */
MN_INLINE __mmask64 K(iq_pair)(const int IQT, const uint8_t *b, int p, const uint16_t ix[64], uint32_t neg, const uint64_t sg[4], __m512i *u) {
    if (IQT == IQT_3XXS || IQT == IQT_3S) {
        *u = K(rows16)(IQT, IQT == IQT_3S ? mn_iq3s_grid : mn_iq3xxs_grid, b, ix, p);
        return _cvtu64_mask64(sg[p]);
    }
    if (IQT == IQT_1S) {   /* 8 g, g in {-1, 0, 1} (the 8 is in the scales) */
        const __m512i g = K(rows8)(IQT, mn_iq1s_grid, b, ix, p);
        *u = _mm512_and_si512(g, _mm512_set1_epi8(1));
        return _mm512_movepi8_mask(g);
    }
    if (IQT == IQT_1M) {   /* value 8 g + delta, g in {-1, 0, 1}, delta = +-1 per row */
        const __m512i g = K(rows8)(IQT, mn_iq1s_grid, b, ix, p);
        const __m512i dl = _mm512_mask_blend_epi64((__mmask8)(neg >> (8 * p)), _mm512_set1_epi8(1), _mm512_set1_epi8(-1));
        const __m512i v = _mm512_add_epi8(_mm512_and_si512(_mm512_slli_epi16(g, 3), _mm512_set1_epi8((char)0xF8)), dl);
        *u = _mm512_abs_epi8(v);
        return _mm512_movepi8_mask(v);
    }
    *u = K(rows8)(IQT, IQT == IQT_2XXS ? mn_iq2xxs_grid : IQT == IQT_2XS ? mn_iq2xs_grid : mn_iq2s_grid, b, ix, p);
    return _cvtu64_mask64(sg[p]);
}

MN_INLINE void K(dot_iq_t)(const int IQT, size_t bsz, const uint8_t *w, int64_t nb,
                           const uint8_t *xq, size_t xs, const int NT, float *res) {
    __m512 acc[MN_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = w + i * bsz;
        mn_prefetch(b, 2);
        __m256i sc16;
        uint64_t sg[4];
        uint16_t ix[64];
        uint32_t neg = 0;
        const float d = K(iq_head)(IQT, b, &sc16, sg);
        K(iq_index)(IQT, b, ix, &neg);
        __m512i sv[4], isum[MN_TILE];
        K(k16_scales)(sc16, sv);
        for (int t = 0; t < NT; t++) isum[t] = zero;
        if (IQT == IQT_1S)
            for (int t = 0; t < NT; t++)
                isum[t] = _mm512_zextsi128_si512(mn_iq1s_delta_dot(b, xq + t * xs + (QK_K + 36) * nb + 16 * i));
        for (int p = 0; p < 4; p++) {
            __m512i u;
            const __mmask64 m = K(iq_pair)(IQT, b, p, ix, neg, sg, &u);
            for (int t = 0; t < NT; t++) {
                const __m512i x = _mm512_loadu_si512((const void *)((const int8_t *)(xq + t * xs) + QK_K * i + 64 * p));
                isum[t] = K(dpwssd)(isum[t], _mm512_maddubs_epi16(u, _mm512_mask_sub_epi8(x, m, zero, x)), sv[p]);
            }
        }
        for (int t = 0; t < NT; t++) {
            const float dy = ((const float *)(xq + t * xs + QK_K * nb))[i];
            acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * dy), _mm512_cvtepi32_ps(isum[t]), acc[t]);
        }
    }
    K(hsums)(acc, NT, res);
}
#define IQK512(name, T, IQT) \
    MN_INLINE void K(dot_##name##_t)(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, const int NT, float *res) { \
        K(dot_iq_t)(IQT, BS_##T, w, nb, xq, xs, NT, res); } \
    MN_TILED_AS(K(dot_##name), K(dot_##name##_t))
MN_IQ_TYPES(IQK512)

static void K(fill_iq)(mn_traits *tab, int level) {
#define SET(T, f) tab[MN_##T].dot[level] = f
#define SET_IQ(name, T, IQT) SET(T, K(dot_##name));
    MN_IQ_TYPES(SET_IQ)
#undef SET_IQ
#undef SET
}
