/* Flash-attention micro-kernels, compiled once per SIMD level by mn_engine.c:
 *   #define ATTN_SUFFIX avx2 / ATTN_TARGET __attribute__((target("avx2,fma,f16c"))) / ATTN_VW 8
 *   #include "mn_attn_tmpl.h"
 * ATTN_VW is the level's native float count (16 zmm, 8 ymm, 4 xmm): GCC vector
 * types of that width map onto single registers, so the 8 accumulators, the two
 * key (or value) vectors and the broadcasts fit the register file at every level
 * (16 registers at AVX2: a 16-float type there would be ymm pairs and spill).
 *
 * Keys come in transposed tiles of 32 positions ([dim][32] floats): a chunk of
 * 2 * ATTN_VW positions of up to 4 query rows accumulates in 8 registers with no
 * horizontal sums.  Values come as rows; 2 * ATTN_VW dims of up to 4 rows at a time. */
#define ATTN_CAT2(a, b) a##_##b
#define ATTN_CAT(a, b) ATTN_CAT2(a, b)
#define VF ATTN_CAT(vf, ATTN_SUFFIX)
#define VFU ATTN_CAT(vfu, ATTN_SUFFIX)
typedef float VF __attribute__((vector_size(ATTN_VW * 4)));
typedef float VFU __attribute__((vector_size(ATTN_VW * 4), aligned(4)));

/* the 4 x 2 accumulators a00..a31 += w_j[i] * (the 2 * ATTN_VW floats at u), j < 4 */
#define ATTN_ACC_4X2(w0, w1, w2, w3, i, u) do { \
        const VF u0_ = *(const VFU *)(u), u1_ = *(const VFU *)((u) + ATTN_VW); \
        const float x0_ = (w0)[i], x1_ = (w1)[i], x2_ = (w2)[i], x3_ = (w3)[i]; \
        a00 += x0_ * u0_; a01 += x0_ * u1_; \
        a10 += x1_ * u0_; a11 += x1_ * u1_; \
        a20 += x2_ * u0_; a21 += x2_ * u1_; \
        a30 += x3_ * u0_; a31 += x3_ * u1_; \
    } while (0)

/* sc[j][s] = scale * dot(q_j, key s) for the 32 keys of one tile [qk][32], j < nb (<= 4) */
ATTN_TARGET static void ATTN_CAT(flash_scores, ATTN_SUFFIX)(
        const float *const *q, int nb, const float *tile, int qk, float scale, float *const *sc) {
    const float *q0 = q[0], *q1 = q[nb > 1 ? 1 : 0], *q2 = q[nb > 2 ? 2 : 0], *q3 = q[nb > 3 ? 3 : 0];
    for (int c = 0; c < 32; c += 2 * ATTN_VW) {
        VF a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
        const float *kp = tile + c;
        for (int i = 0; i < qk; i++, kp += 32) ATTN_ACC_4X2(q0, q1, q2, q3, i, kp);
        *(VFU *)(sc[0] + c) = a00 * scale; *(VFU *)(sc[0] + c + ATTN_VW) = a01 * scale;
        if (nb > 1) { *(VFU *)(sc[1] + c) = a10 * scale; *(VFU *)(sc[1] + c + ATTN_VW) = a11 * scale; }
        if (nb > 2) { *(VFU *)(sc[2] + c) = a20 * scale; *(VFU *)(sc[2] + c + ATTN_VW) = a21 * scale; }
        if (nb > 3) { *(VFU *)(sc[3] + c) = a30 * scale; *(VFU *)(sc[3] + c + ATTN_VW) = a31 * scale; }
    }
}

/* o_j = o_j * corr_j + sum_{s < n} p_j[s] * v[s], j < nb (<= 4); v rows vstride floats apart */
ATTN_TARGET static void ATTN_CAT(flash_values, ATTN_SUFFIX)(
        const float *const *p, int nb, const float *v, int64_t vstride, int vd, int n, const float *corr,
        float *const *o) {
    const float *p0 = p[0], *p1 = p[nb > 1 ? 1 : 0], *p2 = p[nb > 2 ? 2 : 0], *p3 = p[nb > 3 ? 3 : 0];
    float *o0 = o[0], *o1 = o[nb > 1 ? 1 : 0], *o2 = o[nb > 2 ? 2 : 0], *o3 = o[nb > 3 ? 3 : 0];
    const float c0 = corr[0], c1 = corr[nb > 1 ? 1 : 0], c2 = corr[nb > 2 ? 2 : 0], c3 = corr[nb > 3 ? 3 : 0];
    int d = 0;
    for (; d + 2 * ATTN_VW <= vd; d += 2 * ATTN_VW) {
        const int e = d + ATTN_VW;
        VF a00 = *(VFU *)(o0 + d) * c0, a01 = *(VFU *)(o0 + e) * c0, a10 = *(VFU *)(o1 + d) * c1,
           a11 = *(VFU *)(o1 + e) * c1, a20 = *(VFU *)(o2 + d) * c2, a21 = *(VFU *)(o2 + e) * c2,
           a30 = *(VFU *)(o3 + d) * c3, a31 = *(VFU *)(o3 + e) * c3;
        const float *vp = v + d;
        for (int s = 0; s < n; s++, vp += vstride) ATTN_ACC_4X2(p0, p1, p2, p3, s, vp);
        /* aliased rows (nb < 4) are stored first so the real row's value lands last */
        *(VFU *)(o3 + d) = a30; *(VFU *)(o3 + e) = a31;
        *(VFU *)(o2 + d) = a20; *(VFU *)(o2 + e) = a21;
        *(VFU *)(o1 + d) = a10; *(VFU *)(o1 + e) = a11;
        *(VFU *)(o0 + d) = a00; *(VFU *)(o0 + e) = a01;
    }
    for (; d < vd; d++)
        for (int j = 0; j < nb; j++) {
            float a = o[j][d] * corr[j];
            for (int s = 0; s < n; s++) a += p[j][s] * v[s * vstride + d];
            o[j][d] = a;
        }
}

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

#undef ATTN_ACC_4X2
#undef VF
#undef VFU
#undef ATTN_CAT
#undef ATTN_CAT2
