/* Flash-attention micro-kernels, compiled once per SIMD level by mn_engine.c:
 *   #define ATTN_SUFFIX avx2 / ATTN_TARGET __attribute__((target("avx2,fma,f16c"))) / ATTN_VW 8
 *   #include "mn_attn_tmpl.h"
 * ATTN_VW is the level's native float count (16 zmm, 8 ymm, 4 xmm): GCC vector
 * types of that width map onto single registers.  ATTN_ROWS query rows run at once,
 * each with ATTN_ACC accumulators: 8 x 2 on the 32-register AVX-512 file, 8 x 1 at
 * AVX2 (8 accumulators, enough to cover the FMA latency, in 16 ymm registers; a
 * 16-float type there would be ymm pairs and spill), 4 x 2 below.  More rows per pass
 * is fewer reads of each key and value per product: at decode a GQA group (8 heads per
 * KV head in Qwen3) or MLA's heads all read the same cache, and one pass reads the F16
 * cache in place instead of expanding it to F32 first.
 *
 * Keys come in transposed tiles of 32 positions ([dim][32]): a chunk of ATTN_ACC *
 * ATTN_VW positions of the rows accumulates with no horizontal sums.  Values come as
 * rows; ATTN_ACC * ATTN_VW dims of the rows at a time.  Each kernel reads F32 storage, or (the _h
 * kernels, where the level has F16C) F16 storage converted in registers: exact, so
 * both give the same floats as expanding the F16 cache first, without the round trip
 * of the expanded block through L1/L2.  A row's arithmetic (one fma chain per lane) is
 * the same whichever rows share its pass. */
#define ATTN_CAT2(a, b) a##_##b
#define ATTN_CAT(a, b) ATTN_CAT2(a, b)
#define VF ATTN_CAT(vf, ATTN_SUFFIX)
#define VFU ATTN_CAT(vfu, ATTN_SUFFIX)
typedef float VF __attribute__((vector_size(ATTN_VW * 4)));
typedef float VFU __attribute__((vector_size(ATTN_VW * 4), aligned(4)));
#if ATTN_VW == 16
#define ATTN_ROWS 8
#define ATTN_ACC 2
#define ATTN_LD_H(p) ((VF)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))
#elif ATTN_VW == 8
#define ATTN_ROWS 8
#define ATTN_ACC 1
#define ATTN_LD_H(p) ((VF)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
#else
#define ATTN_ROWS 4
#define ATTN_ACC 2
#endif
#define ATTN_STEP (ATTN_ACC * ATTN_VW)
_Static_assert(ATTN_ROWS <= FA_MAXR, "the engine's per-pass arrays hold FA_MAXR rows");
#define ATTN_LD_F(p) (*(const VFU *)(p))
#define ATTN_EL_F(x) (x)
#define ATTN_EL_H(x) mn_h2f(x)

/* sc[j][s] = scale * dot(q_j, key s) for the 32 keys of one tile [qk][32], j < nb (<= ATTN_ROWS) */
#define ATTN_SCORES(name, ET, LD) \
ATTN_TARGET static void name(const float *const *q, int nb, const void *tile_, int qk, float scale, float *const *sc) { \
    const ET *tile = (const ET *)tile_; \
    const float *qr[ATTN_ROWS]; \
    for (int j = 0; j < ATTN_ROWS; j++) qr[j] = q[j < nb ? j : 0]; \
    const VF zero = {0}; \
    for (int c = 0; c < 32; c += ATTN_STEP) { \
        VF a[ATTN_ROWS][ATTN_ACC]; \
        _Pragma("GCC unroll 8") for (int j = 0; j < ATTN_ROWS; j++) \
            _Pragma("GCC unroll 2") for (int h = 0; h < ATTN_ACC; h++) a[j][h] = zero; \
        const ET *kp = tile + c; \
        for (int i = 0; i < qk; i++, kp += 32) { \
            VF u[ATTN_ACC]; \
            _Pragma("GCC unroll 2") for (int h = 0; h < ATTN_ACC; h++) u[h] = LD(kp + h * ATTN_VW); \
            _Pragma("GCC unroll 8") for (int j = 0; j < ATTN_ROWS; j++) { \
                const float x = qr[j][i]; \
                _Pragma("GCC unroll 2") for (int h = 0; h < ATTN_ACC; h++) a[j][h] += x * u[h]; \
            } \
        } \
        _Pragma("GCC unroll 8") for (int j = 0; j < ATTN_ROWS; j++) \
            if (j < nb) \
                _Pragma("GCC unroll 2") for (int h = 0; h < ATTN_ACC; h++) \
                    *(VFU *)(sc[j] + c + h * ATTN_VW) = a[j][h] * scale; \
    } \
}

/* o_j = o_j * corr_j + sum_{s < n} p_j[s] * v[s], j < nb (<= ATTN_ROWS); p_j = p + j * pstride
 * (rows nb..ATTN_ROWS-1 of p are zeros: one base register keeps the loop within the
 * general registers); v rows vstride elements apart */
#define ATTN_VALUES(name, ET, LD, EL) \
ATTN_TARGET static void name(const float *p, int64_t pstride, int nb, const void *v_, int64_t vstride, int vd, \
                             int n, const float *corr, float *const *o) { \
    const ET *v = (const ET *)v_; \
    /* the row pointers and factors are read from memory outside the inner loop, not held in
     * registers through it (GCC parked them in vector registers and spilled the values) */ \
    volatile const int nbv = nb; \
    int d = 0; \
    for (; d + ATTN_STEP <= vd; d += ATTN_STEP) { \
        VF a[ATTN_ROWS][ATTN_ACC]; \
        _Pragma("GCC unroll 8") for (int j = 0; j < ATTN_ROWS; j++) { \
            const int r = j < nbv ? j : 0; \
            _Pragma("GCC unroll 2") for (int h = 0; h < ATTN_ACC; h++) \
                a[j][h] = ATTN_LD_F(o[r] + d + h * ATTN_VW) * corr[r]; \
        } \
        const ET *vp = v + d; \
        for (int s = 0; s < n; s++, vp += vstride) { \
            VF u[ATTN_ACC]; \
            _Pragma("GCC unroll 2") for (int h = 0; h < ATTN_ACC; h++) u[h] = LD(vp + h * ATTN_VW); \
            _Pragma("GCC unroll 8") for (int j = 0; j < ATTN_ROWS; j++) { \
                const float x = p[j * pstride + s]; \
                _Pragma("GCC unroll 2") for (int h = 0; h < ATTN_ACC; h++) a[j][h] += x * u[h]; \
            } \
        } \
        /* aliased rows (j >= nb) are stored first so the real row's value lands last */ \
        _Pragma("GCC unroll 8") for (int j = ATTN_ROWS - 1; j >= 0; j--) { \
            float *dst = o[j < nbv ? j : 0]; \
            _Pragma("GCC unroll 2") for (int h = 0; h < ATTN_ACC; h++) *(VFU *)(dst + d + h * ATTN_VW) = a[j][h]; \
        } \
    } \
    for (; d < vd; d++) \
        for (int j = 0; j < nb; j++) { \
            float a = o[j][d] * corr[j]; \
            for (int s = 0; s < n; s++) a += p[j * pstride + s] * EL(v[s * vstride + d]); \
            o[j][d] = a; \
        } \
}

ATTN_SCORES(ATTN_CAT(flash_scores, ATTN_SUFFIX), float, ATTN_LD_F)
ATTN_VALUES(ATTN_CAT(flash_values, ATTN_SUFFIX), float, ATTN_LD_F, ATTN_EL_F)
#ifdef ATTN_LD_H
ATTN_SCORES(ATTN_CAT(flash_scores_h, ATTN_SUFFIX), uint16_t, ATTN_LD_H)
ATTN_VALUES(ATTN_CAT(flash_values_h, ATTN_SUFFIX), uint16_t, ATTN_LD_H, ATTN_EL_H)
#define ATTN_F16_SCORES ATTN_CAT(flash_scores_h, ATTN_SUFFIX)
#define ATTN_F16_VALUES ATTN_CAT(flash_values_h, ATTN_SUFFIX)
#else
#define ATTN_F16_SCORES NULL
#define ATTN_F16_VALUES NULL
#endif

/* f[i] = fp16 h[i] (exact at every level) */
ATTN_TARGET static void ATTN_CAT(cvt_f16, ATTN_SUFFIX)(const uint16_t *h, float *f, int64_t n) {
    int64_t i = 0;
#if ATTN_VW == 16
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
#elif ATTN_VW == 8
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) f[i] = mn_h2f(h[i]);
}

/* a Q8_0 key tile (int8 [dim][32], then fp16 scales [dim / 32][32]) as floats [dim][32] */
ATTN_TARGET static void ATTN_CAT(cvt_q8_tile, ATTN_SUFFIX)(const uint8_t *tile, int64_t dim, float *f) {
    const int8_t *q = (const int8_t *)tile;
    const uint16_t *ds = (const uint16_t *)(tile + dim * 32);
    for (int64_t b = 0; b < dim / 32; b++) {
        float d[32];
        ATTN_CAT(cvt_f16, ATTN_SUFFIX)(ds + b * 32, d, 32);
        for (int64_t i = 32 * b; i < 32 * b + 32; i++)
            for (int l = 0; l < 32; l++) f[i * 32 + l] = d[l] * (float)q[i * 32 + l];
    }
}

/* a row of Q8_0 blocks (ggml's: fp16 d, int8 qs[32]) as dim floats */
ATTN_TARGET static void ATTN_CAT(cvt_q8_row, ATTN_SUFFIX)(const uint8_t *row, int64_t dim, float *f) {
    for (int64_t b = 0; b < dim / 32; b++) {
        const uint8_t *blk = row + b * 34;
        const float d = mn_h2f((uint16_t)(blk[0] | blk[1] << 8));
        const int8_t *q = (const int8_t *)(blk + 2);
        for (int i = 0; i < 32; i++) f[32 * b + i] = d * (float)q[i];
    }
}

static const attn_ops ATTN_CAT(attn_ops, ATTN_SUFFIX) = {
    ATTN_ROWS, ATTN_CAT(flash_scores, ATTN_SUFFIX), ATTN_CAT(flash_values, ATTN_SUFFIX), ATTN_F16_SCORES, ATTN_F16_VALUES,
    ATTN_CAT(cvt_f16, ATTN_SUFFIX), ATTN_CAT(cvt_q8_tile, ATTN_SUFFIX), ATTN_CAT(cvt_q8_row, ATTN_SUFFIX)};

#undef ATTN_F16_SCORES
#undef ATTN_F16_VALUES
#undef ATTN_ROWS
#undef ATTN_ACC
#undef ATTN_STEP
#undef ATTN_SCORES
#undef ATTN_VALUES
#undef ATTN_LD_F
#undef ATTN_LD_H
#undef ATTN_EL_F
#undef ATTN_EL_H
#undef VF
#undef VFU
#undef ATTN_CAT
#undef ATTN_CAT2
