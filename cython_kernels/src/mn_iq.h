/* IQ types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) unpacked to
 * the K-quant form mn_kblock: int8 values, an integer scale per 16 values and
 * one float factor, so that value = d * sc[k] * q.  The fractional scales of
 * the format become integers: (0.5 + s) / 4 = (2s + 1) / 8, and IQ1's
 * grid + delta (delta = +-1/8) becomes (8 g +- 1) / 8.  Grids: mn_iq_tables.c
 * (generated from gguf.quants). */
#ifndef MN_IQ_H
#define MN_IQ_H
#include <emmintrin.h>
#include "mn_internal.h"

extern const uint64_t mn_iq2xxs_grid[256], mn_iq2xs_grid[512], mn_iq2s_grid[1024], mn_iq1s_grid[2048];
extern const uint32_t mn_iq3xxs_grid[256], mn_iq3s_grid[512];
extern const uint8_t mn_ksigns_iq2xs[128];
extern const uint64_t mn_signs64[256], mn_ksigns64[128];

#define BS_IQ2_XXS 66   /* fp16 d; u16 qs[32]: per 32 values 4 grid bytes, 4 x 7 sign bits, 4-bit scale */
#define BS_IQ2_XS 74    /* fp16 d; u16 qs[32] (9-bit grid index, 7 sign bits); u8 scales[8] */
#define BS_IQ2_S 82     /* fp16 d; u8 qs[32]; u8 signs[32]; u8 qh[8]; u8 scales[8] */
#define BS_IQ3_XXS 98   /* fp16 d; u8 qs[64]; u32 scales_and_signs[8] */
#define BS_IQ3_S 110    /* fp16 d; u8 qs[64]; u8 qh[8]; u8 signs[32]; u8 scales[4] */
#define BS_IQ1_S 50     /* fp16 d; u8 qs[32]; u16 qh[8] */
#define BS_IQ1_M 56     /* u8 qs[32]; u8 qh[16]; u16 scales[4] (the fp16 d in their top nibbles) */

/* n values of a packed grid row, negated where the sign bit is set */
static inline void mn_iq_signed(int8_t *y, uint64_t g, unsigned signs, int n) {
    for (int j = 0; j < n; j++) {
        const int8_t v = (int8_t)(g >> (8 * j));
        y[j] = (signs >> j) & 1 ? (int8_t)-v : v;
    }
}

static inline void mn_iq_zero_mins(mn_kblock *u) { for (int k = 0; k < 16; k++) u->m[k] = 0; u->dmin = 0.f; }

static inline void mn_unpack_iq2_xxs(const uint8_t *b, mn_kblock *u) {
    u->d = mn_h2f(mn_rd16(b)) * 0.125f; mn_iq_zero_mins(u);
    for (int ib = 0; ib < 8; ib++) {
        const uint8_t *a = b + 2 + 8 * ib;
        const uint32_t s = mn_rd32(a + 4);
        u->sc[2 * ib] = u->sc[2 * ib + 1] = (int16_t)(2 * (s >> 28) + 1);
        for (int l = 0; l < 4; l++)
            mn_iq_signed(u->q + 32 * ib + 8 * l, mn_iq2xxs_grid[a[l]], mn_ksigns_iq2xs[(s >> (7 * l)) & 127], 8);
    }
}

static inline void mn_unpack_iq2_xs(const uint8_t *b, mn_kblock *u) {
    u->d = mn_h2f(mn_rd16(b)) * 0.125f; mn_iq_zero_mins(u);
    const uint8_t *sc = b + 66;
    for (int ib = 0; ib < 8; ib++) {
        u->sc[2 * ib] = (int16_t)(2 * (sc[ib] & 0xF) + 1); u->sc[2 * ib + 1] = (int16_t)(2 * (sc[ib] >> 4) + 1);
        for (int l = 0; l < 4; l++) {
            const uint16_t q = mn_rd16(b + 2 + 2 * (4 * ib + l));
            mn_iq_signed(u->q + 32 * ib + 8 * l, mn_iq2xs_grid[q & 511], mn_ksigns_iq2xs[q >> 9], 8);
        }
    }
}

static inline void mn_unpack_iq2_s(const uint8_t *b, mn_kblock *u) {
    u->d = mn_h2f(mn_rd16(b)) * 0.125f; mn_iq_zero_mins(u);
    const uint8_t *qs = b + 2, *sg = b + 34, *qh = b + 66, *sc = b + 74;
    for (int ib = 0; ib < 8; ib++) {
        u->sc[2 * ib] = (int16_t)(2 * (sc[ib] & 0xF) + 1); u->sc[2 * ib + 1] = (int16_t)(2 * (sc[ib] >> 4) + 1);
        for (int l = 0; l < 4; l++)
            mn_iq_signed(u->q + 32 * ib + 8 * l, mn_iq2s_grid[qs[4 * ib + l] | (((qh[ib] >> (2 * l)) & 3) << 8)],
                         sg[4 * ib + l], 8);
    }
}

static inline void mn_unpack_iq3_xxs(const uint8_t *b, mn_kblock *u) {
    u->d = mn_h2f(mn_rd16(b)) * 0.25f; mn_iq_zero_mins(u);
    const uint8_t *qs = b + 2;
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t s = mn_rd32(b + 66 + 4 * ib);
        u->sc[2 * ib] = u->sc[2 * ib + 1] = (int16_t)(2 * (s >> 28) + 1);
        for (int l = 0; l < 4; l++) {
            const unsigned sg = mn_ksigns_iq2xs[(s >> (7 * l)) & 127];
            int8_t *y = u->q + 32 * ib + 8 * l;
            mn_iq_signed(y, mn_iq3xxs_grid[qs[8 * ib + 2 * l]], sg, 4);
            mn_iq_signed(y + 4, mn_iq3xxs_grid[qs[8 * ib + 2 * l + 1]], sg >> 4, 4);
        }
    }
}

static inline void mn_unpack_iq3_s(const uint8_t *b, mn_kblock *u) {
    u->d = mn_h2f(mn_rd16(b)); mn_iq_zero_mins(u);
    const uint8_t *qs = b + 2, *qh = b + 66, *sg = b + 74, *sc = b + 106;
    for (int ib = 0; ib < 8; ib++) {
        const int s = (sc[ib / 2] >> (4 * (ib & 1))) & 0xF;
        u->sc[2 * ib] = u->sc[2 * ib + 1] = (int16_t)(1 + 2 * s);
        for (int l = 0; l < 4; l++) {
            int8_t *y = u->q + 32 * ib + 8 * l;
            const int k0 = 8 * ib + 2 * l;
            mn_iq_signed(y, mn_iq3s_grid[qs[k0] | (((qh[ib] >> (2 * l)) & 1) << 8)], sg[4 * ib + l], 4);
            mn_iq_signed(y + 4, mn_iq3s_grid[qs[k0 + 1] | (((qh[ib] >> (2 * l + 1)) & 1) << 8)], sg[4 * ib + l] >> 4, 4);
        }
    }
}

/* IQ1: 8 values 8 g + delta (delta +-1) from grid row g of {-1, 0, 1} */
static inline void mn_iq1_vals(int8_t *y, uint64_t g, int delta) {
    for (int j = 0; j < 8; j++) y[j] = (int8_t)(8 * (int8_t)(g >> (8 * j)) + delta);
}

static inline void mn_unpack_iq1_s(const uint8_t *b, mn_kblock *u) {
    u->d = mn_h2f(mn_rd16(b)) * 0.125f; mn_iq_zero_mins(u);
    const uint8_t *qs = b + 2;
    for (int ib = 0; ib < 8; ib++) {
        const uint16_t qh = mn_rd16(b + 34 + 2 * ib);
        u->sc[2 * ib] = u->sc[2 * ib + 1] = (int16_t)(2 * ((qh >> 12) & 7) + 1);
        const int delta = qh & 0x8000 ? -1 : 1;
        for (int l = 0; l < 4; l++)
            mn_iq1_vals(u->q + 32 * ib + 8 * l, mn_iq1s_grid[qs[4 * ib + l] | (((qh >> (3 * l)) & 7) << 8)], delta);
    }
}

static inline float mn_iq1_m_d(const uint8_t *b) {
    const uint16_t s0 = mn_rd16(b + 48), s1 = mn_rd16(b + 50), s2 = mn_rd16(b + 52), s3 = mn_rd16(b + 54);
    return mn_h2f((uint16_t)((s0 >> 12) | ((s1 >> 8) & 0xF0) | ((s2 >> 4) & 0xF00) | (s3 & 0xF000)));
}

static inline void mn_unpack_iq1_m(const uint8_t *b, mn_kblock *u) {
    u->d = mn_iq1_m_d(b) * 0.125f; mn_iq_zero_mins(u);
    const uint8_t *qs = b, *qh = b + 32;
    for (int k = 0; k < 16; k++) u->sc[k] = (int16_t)(2 * ((mn_rd16(b + 48 + 2 * (k / 4)) >> (3 * (k % 4))) & 7) + 1);
    for (int g = 0; g < 32; g++) {          /* groups of 8 values; qh nibble g: 3 grid bits, delta sign */
        const int h = (qh[g / 2] >> (4 * (g & 1))) & 0xF;
        mn_iq1_vals(u->q + 8 * g, mn_iq1s_grid[qs[g] | ((h & 7) << 8)], h & 8 ? -1 : 1);
    }
}

/* ---- for the SIMD kernels ---- */
#define IQT_2XXS 0
#define IQT_2XS 1
#define IQT_2S 2
#define IQT_3XXS 3
#define IQT_3S 4
#define IQT_1S 5
#define IQT_1M 6
/* X(name, GGML type, IQT) for each: the SIMD files instantiate their kernels from it */
#define MN_IQ_TYPES(X) X(iq2_xxs, IQ2_XXS, IQT_2XXS) X(iq2_xs, IQ2_XS, IQT_2XS) X(iq2_s, IQ2_S, IQT_2S) \
    X(iq3_xxs, IQ3_XXS, IQT_3XXS) X(iq3_s, IQ3_S, IQT_3S) X(iq1_s, IQ1_S, IQT_1S) X(iq1_m, IQ1_M, IQT_1M)

/* the block's float factor: value = d * (integer scale) * (integer value) */
static inline float mn_iq_d(const int IQT, const uint8_t *b) {
    if (IQT == IQT_1M) return mn_iq1_m_d(b) * 0.125f;
    const float d = mn_h2f(mn_rd16(b));
    return IQT == IQT_3S ? d : IQT == IQT_3XXS ? d * 0.25f : d * 0.125f;
}

/* IQ1_S's deltas: delta_ib * (2 s_ib + 1) times the activations' sums of 32 (int16
 * psums of the Q8_K row), as four int32 partial sums; the SIMD kernels take the
 * grid part as 8 g and add this per block (SSE2: baseline on x86-64) */
static inline __m128i mn_iq1s_delta_dot(const uint8_t *b, const uint8_t *psums) {
    const __m128i qh = _mm_loadu_si128((const __m128i *)(b + 34)), neg = _mm_srai_epi16(qh, 15);
    const __m128i sc = _mm_add_epi16(_mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(qh, 12), _mm_set1_epi16(7)), 1), _mm_set1_epi16(1));
    return _mm_madd_epi16(_mm_sub_epi16(_mm_xor_si128(sc, neg), neg), _mm_loadu_si128((const __m128i *)psums));
}


#endif
