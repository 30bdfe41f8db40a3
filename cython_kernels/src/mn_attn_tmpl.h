/* Attention micro-kernels, compiled once per SIMD level by mn_engine.c:
 *   #define ATTN_SUFFIX avx512 / ATTN_TARGET __attribute__((target("avx512f")))
 *   #include "mn_attn_tmpl.h"
 * GCC vector extensions keep one source: 16-float vectors become zmm
 * registers at AVX-512, pairs of ymm at AVX2, four xmm at the baseline.
 *
 * Scores read keys in transposed tiles of 32 positions ([dim][32], contiguous),
 * so 32 keys of up to 4 heads accumulate in 8 vector registers with no
 * horizontal sums; values are read in rows, 32 dims of up to 4 heads at a time. */
#define ATTN_CAT2(a, b) a##_##b
#define ATTN_CAT(a, b) ATTN_CAT2(a, b)

/* sc[j][s] = scale * dot(q_j, key s), j < nh (<= 4), s < S. Keys are tiles of
 * 32 positions, [tile][dim][32] (qk * 32 floats each); a partial last tile is
 * computed whole and only its first S % 32 scores are kept. */
ATTN_TARGET static void ATTN_CAT(attn_scores, ATTN_SUFFIX)(
        const float *const *q, int nh, const float *ktiles, int qk, int64_t S, float scale, float *const *sc) {
    const float *qq[4];
    for (int j = 0; j < 4; j++) qq[j] = q[j < nh ? j : 0];
    for (int64_t s0 = 0; s0 < S; s0 += 32) {
        v16 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
        const float *kp = ktiles + (s0 / 32) * (int64_t)qk * 32;
        for (int i = 0; i < qk; i++, kp += 32) {
            const v16 k0 = *(const v16u *)kp, k1 = *(const v16u *)(kp + 16);
            const float q0 = qq[0][i], q1 = qq[1][i], q2 = qq[2][i], q3 = qq[3][i];
            a00 += q0 * k0; a01 += q0 * k1;
            a10 += q1 * k0; a11 += q1 * k1;
            a20 += q2 * k0; a21 += q2 * k1;
            a30 += q3 * k0; a31 += q3 * k1;
        }
        float tmp[4][32];
        *(v16u *)tmp[0] = a00 * scale; *(v16u *)(tmp[0] + 16) = a01 * scale;
        *(v16u *)tmp[1] = a10 * scale; *(v16u *)(tmp[1] + 16) = a11 * scale;
        *(v16u *)tmp[2] = a20 * scale; *(v16u *)(tmp[2] + 16) = a21 * scale;
        *(v16u *)tmp[3] = a30 * scale; *(v16u *)(tmp[3] + 16) = a31 * scale;
        const int n = S - s0 < 32 ? (int)(S - s0) : 32;
        for (int j = 0; j < nh; j++) memcpy(sc[j] + s0, tmp[j], sizeof(float) * n);
    }
}

/* out_j[d] = sum_s p_j[s] * v[s][d], j < nh (<= 4), d < vd */
ATTN_TARGET static void ATTN_CAT(attn_values, ATTN_SUFFIX)(
        const float *const *p, int nh, const float *v, int64_t vstride, int vd, int64_t S, float *const *out) {
    const float *pp[4];
    for (int j = 0; j < 4; j++) pp[j] = p[j < nh ? j : 0];
    int d0 = 0;
    for (; d0 + 32 <= vd; d0 += 32) {
        v16 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
        const float *vp = v + d0;
        for (int64_t s = 0; s < S; s++, vp += vstride) {
            const v16 v0 = *(const v16u *)vp, v1 = *(const v16u *)(vp + 16);
            const float p0 = pp[0][s], p1 = pp[1][s], p2 = pp[2][s], p3 = pp[3][s];
            a00 += p0 * v0; a01 += p0 * v1;
            a10 += p1 * v0; a11 += p1 * v1;
            a20 += p2 * v0; a21 += p2 * v1;
            a30 += p3 * v0; a31 += p3 * v1;
        }
        *(v16u *)(out[0] + d0) = a00; *(v16u *)(out[0] + d0 + 16) = a01;
        if (nh > 1) { *(v16u *)(out[1] + d0) = a10; *(v16u *)(out[1] + d0 + 16) = a11; }
        if (nh > 2) { *(v16u *)(out[2] + d0) = a20; *(v16u *)(out[2] + d0 + 16) = a21; }
        if (nh > 3) { *(v16u *)(out[3] + d0) = a30; *(v16u *)(out[3] + d0 + 16) = a31; }
    }
    for (; d0 < vd; d0++)
        for (int j = 0; j < nh; j++) {
            float a = 0;
            for (int64_t s = 0; s < S; s++) a += p[j][s] * v[s * vstride + d0];
            out[j][d0] = a;
        }
}

#undef ATTN_CAT
#undef ATTN_CAT2
