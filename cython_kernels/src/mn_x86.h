/* x86 helpers shared by the SIMD kernel files (mn_avx2.c, mn_avx512_tmpl.h):
 * included inside each file's target region, so they compile for its level. */
#ifndef MN_X86_H
#define MN_X86_H
#include "mn_tile.h"

MN_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
MN_INLINE float hsum4(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
MN_INLINE float h2f(const uint8_t *p) { return _cvtsh_ss(mn_rd16(p)); }
/* the first n (<= 5) cache lines of the weights mn_pf_dist bytes past b (mn_cpu.h); straight-line
 * code, folded before the loop passes (a loop here moves the registers of the kernels) */
MN_INLINE void mn_prefetch(const uint8_t *b, const int n) {
    const char *p = (const char *)(b + mn_pf_dist);
    _mm_prefetch(p, _MM_HINT_T0);
    if (n > 1) _mm_prefetch(p + 64, _MM_HINT_T0);
    if (n > 2) _mm_prefetch(p + 128, _MM_HINT_T0);
    if (n > 3) _mm_prefetch(p + 192, _MM_HINT_T0);
    if (n > 4) _mm_prefetch(p + 256, _MM_HINT_T0);
}
/* the block `off` bytes into the weights w, its first n lines ahead prefetched */
MN_INLINE const uint8_t *mn_block(const uint8_t *w, int64_t off, const int n) {
    mn_prefetch(w + off, n);
    return w + off;
}

/* one float weight j, for the float kernels' leftover elements */
static inline float f32_one(const uint8_t *w, int64_t j) { float v; memcpy(&v, w + 4 * j, 4); return v; }
static inline float f16_one(const uint8_t *w, int64_t j) { return h2f(w + 2 * j); }
static inline float bf16_one(const uint8_t *w, int64_t j) { return mn_bf2f(mn_rd16(w + 2 * j)); }

/* Q8_0 for the scalar leftover blocks (MN_B32_TAIL) */
MN_INLINE void mn_unpack_q8_0(const uint8_t *b, mn_b32 *u) { u->d = h2f(b); u->m = 0.f; memcpy(u->q, b + 2, 32); }

/* Q4_K / Q5_K: the 12 packed scale bytes -> 8 scales (bytes 0-7) and 8 mins (bytes
 * 8-15), in registers (reads 16 bytes: safe inside a Q4_K/Q5_K block) */
MN_INLINE __m128i k4_scales(const uint8_t *s) {
    const __m128i v = _mm_loadu_si128((const __m128i *)s);                 /* u0 u1 u2 . */
    const __m128i b = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0));       /* u0 u0 u1 u1 */
    const __m128i x = _mm_and_si128(b, _mm_set1_epi32(0x3f3f3f3f));
    const __m128i a = _mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 2, 2, 2)), _mm_setr_epi32(0, 0, 0, 4));
    const __m128i y = _mm_or_si128(_mm_and_si128(a, _mm_set1_epi32(0x0f0f0f0f)),
                                   _mm_and_si128(_mm_srli_epi32(b, 2), _mm_set1_epi32(0x30303030)));
    return _mm_blend_epi32(x, y, 0xA);
}
/* Q3_K block b: its 12 scale bytes a0 a1 a2 -> the 16 six-bit scales - 32, as int8
 * (llama.cpp's aux trick, in registers) */
MN_INLINE __m128i k3_scales(const uint8_t *b) {
    uint32_t a2; memcpy(&a2, b + 104, 4);
    const __m128i v = _mm_insert_epi32(_mm_loadl_epi64((const __m128i *)(b + 96)), (int)a2, 2);
    const __m128i A = _mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 1, 0)), _mm_setr_epi32(0, 0, 4, 4));
    const __m128i T = _mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 2, 2, 2)), _mm_setr_epi32(0, 2, 4, 6));
    const __m128i s6 = _mm_or_si128(_mm_and_si128(A, _mm_set1_epi32(0x0f0f0f0f)),
                                    _mm_slli_epi32(_mm_and_si128(T, _mm_set1_epi32(0x03030303)), 4));
    return _mm_sub_epi8(s6, _mm_set1_epi8(32));
}
/* the fp16 at b of four blocks: packed in a general register (idle ports here) */
MN_INLINE __m128 h4(const uint8_t *b, size_t bs) {
    const uint64_t v = (uint64_t)mn_rd16(b) | ((uint64_t)mn_rd16(b + bs) << 16) |
                       ((uint64_t)mn_rd16(b + 2 * bs) << 32) | ((uint64_t)mn_rd16(b + 3 * bs) << 48);
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)v));
}

/* ---- Q4_K / Q5_K, shared by dot and the multi-row GEMM at every level ---- */
/* [sum a, sum b, sum c, sum d] of four int32 x 4 */
MN_INLINE __m128i sum4x4(__m128i a, __m128i b, __m128i c, __m128i d) {
    const __m128i ab = _mm_add_epi32(_mm_unpacklo_epi32(a, b), _mm_unpackhi_epi32(a, b));
    const __m128i cd = _mm_add_epi32(_mm_unpacklo_epi32(c, d), _mm_unpackhi_epi32(c, d));
    return _mm_add_epi32(_mm_unpacklo_epi64(ab, cd), _mm_unpackhi_epi64(ab, cd));
}
MN_INLINE __m128i half_sum(__m256i v) { return _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)); }
/* sub-block pair j's values (lo: sub-block 2j, hi: 2j + 1) of a Q4_K / Q5_K block b */
MN_INLINE void k45_vals(const int Q5, const uint8_t *b, int j, __m256i qh, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(0xF), m16 = _mm256_set1_epi8(0x10);
    const __m256i q = _mm256_loadu_si256((const __m256i *)(b + (Q5 ? 48 : 16) + 32 * j));
    *lo = _mm256_and_si256(q, m4); *hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    if (Q5) {
        const int c0 = 2 * j, c1 = 2 * j + 1;
        /* 16-bit shifts: the bits crossing a byte boundary never land on bit 4 */
        const __m256i h0 = c0 < 4 ? _mm256_slli_epi16(qh, 4 - c0) : c0 > 4 ? _mm256_srli_epi16(qh, c0 - 4) : qh;
        const __m256i h1 = c1 < 4 ? _mm256_slli_epi16(qh, 4 - c1) : _mm256_srli_epi16(qh, c1 - 4);
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(h0, m16));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(h1, m16));
    }
}
/* the float step of a super-block, lane-wise (lanes: tokens, rows or super-blocks) */
MN_INLINE __m128 k45_step(__m128 p, __m128i S, __m128i M, __m128 d, __m128 dmin, __m128 dy) {
    p = _mm_fmadd_ps(_mm_cvtepi32_ps(S), _mm_mul_ps(d, dy), p);
    return _mm_fnmadd_ps(_mm_cvtepi32_ps(M), _mm_mul_ps(dmin, dy), p);
}
/* a row's total from its four partial sums (lane k: blocks i % 4 == k), (p0 + p1) + (p2 + p3):
 * the order in which the multi-row driver adds them too, so dot and the runs agree */
MN_INLINE float parts_sum(__m128 p) {
    const __m128 h = _mm_add_ps(p, _mm_shuffle_ps(p, p, _MM_SHUFFLE(2, 3, 0, 1)));   /* p0 + p1, p2 + p3 */
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehl_ps(h, h)));
}
/* the four int32 of v summed, in every lane */
MN_INLINE __m128i isum_all(__m128i v) {
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
}
/* k45_step into lane k of p alone (a last group of fewer than four super-blocks: the
 * same arithmetic as that lane of k45_step, the other lanes untouched); S, M in lane 0 */
MN_INLINE __m128 k45_step_lane(__m128 p, int k, __m128i S, __m128i M, float d, float dmin, float dy) {
    const __m128 pk = _mm_permutevar_ps(p, _mm_set1_epi32(k));
    __m128 r = _mm_fmadd_ss(_mm_cvtepi32_ps(S), _mm_set_ss(d * dy), pk);
    r = _mm_fnmadd_ss(_mm_cvtepi32_ps(M), _mm_set_ss(dmin * dy), r);
    const __m128 lane = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_setr_epi32(0, 1, 2, 3), _mm_set1_epi32(k)));
    return _mm_blendv_ps(p, _mm_broadcastss_ps(r), lane);
}
MN_INLINE __m256 k45_step8(__m256 p, __m256i S, __m256i M, __m256 d, __m256 dmin, __m256 dy) {
    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), _mm256_mul_ps(d, dy), p);
    return _mm256_fnmadd_ps(_mm256_cvtepi32_ps(M), _mm256_mul_ps(dmin, dy), p);
}
/* qword k of each of four registers -> register k holds qword k of a, b, c, d */
MN_INLINE void transpose4x64(__m256i a, __m256i b, __m256i c, __m256i d, __m256i *o) {
    const __m256i t0 = _mm256_unpacklo_epi64(a, b), t1 = _mm256_unpackhi_epi64(a, b);
    const __m256i t2 = _mm256_unpacklo_epi64(c, d), t3 = _mm256_unpackhi_epi64(c, d);
    o[0] = _mm256_permute2x128_si256(t0, t2, 0x20); o[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
    o[2] = _mm256_permute2x128_si256(t0, t2, 0x31); o[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
}
/* R rows (4 or 8) of Q4_K / Q5_K packed per super-block (K45_BLK(R) bytes): for sub-block c,
 * four registers of R * 8 values, register k holding values 8k..8k+7 of every row (one row
 * per qword), so one broadcast of a token's 8 values feeds all R rows; the four products of
 * a sub-block add up in int16 (4 * 2 * 31 * 128 < 2^15) before one madd applies the rows'
 * scales (row j's scale c in qword j of K45_SC); then the eight mins of each row (int16),
 * and d and dmin per row. */
#define K45_V(B, R, c, k) ((B) + (32 * (c) + 8 * (k)) * (R))
#define K45_SC(B, R, c) ((B) + 256 * (R) + 8 * (R) * (c))
#define K45_MINS(B, R) ((B) + 320 * (R))
#define K45_D(B, R) ((float *)((B) + 336 * (R)))
#define K45_DMIN(B, R) ((float *)((B) + 340 * (R)))
#define K45_BLK(R) (344 * (R))
MN_INLINE void k45_pack(const int Q5, const int R, const uint8_t *w, size_t ws, int64_t i0, int64_t n, void *buf) {
    const size_t bs = Q5 ? BS_Q5_K : BS_Q4_K;
    /* qword q of each lane: [byte 8q + c, 0] x 4 (+ c below; 0x80 + c stays a zeroing index) */
    const __m256i pick = _mm256_setr_epi8(0, -128, 0, -128, 0, -128, 0, -128, 8, -128, 8, -128, 8, -128, 8, -128,
                                          0, -128, 0, -128, 0, -128, 0, -128, 8, -128, 8, -128, 8, -128, 8, -128);
    for (int64_t ii = 0; ii < n; ii++) {
        uint8_t *B = (uint8_t *)buf + ii * K45_BLK(R);
        for (int g = 0; g < R; g += 4) {   /* four rows at a time: 32 bytes of each register */
            const uint8_t *b[4];
            __m128i sm[4];
            for (int r = 0; r < 4; r++) {
                b[r] = w + (g + r) * ws + (i0 + ii) * bs;
                sm[r] = k4_scales(b[r] + 4);
                K45_D(B, R)[g + r] = h2f(b[r]); K45_DMIN(B, R)[g + r] = h2f(b[r] + 2);
            }
            const __m256i s4 = _mm256_set_m128i(_mm_unpacklo_epi64(sm[2], sm[3]), _mm_unpacklo_epi64(sm[0], sm[1]));
            for (int c = 0; c < 8; c++)
                _mm256_storeu_si256((__m256i *)(K45_SC(B, R, c) + 8 * g),
                                    _mm256_shuffle_epi8(s4, _mm256_add_epi8(pick, _mm256_set1_epi8((char)c))));
            _mm256_storeu_si256((__m256i *)(K45_MINS(B, R) + 16 * g), _mm256_cvtepu8_epi16(_mm_unpackhi_epi64(sm[0], sm[1])));
            _mm256_storeu_si256((__m256i *)(K45_MINS(B, R) + 16 * g + 32), _mm256_cvtepu8_epi16(_mm_unpackhi_epi64(sm[2], sm[3])));
            for (int j = 0; j < 4; j++) {
                __m256i lo[4], hi[4], o[4];
                for (int r = 0; r < 4; r++) {
                    const __m256i qh = Q5 ? _mm256_loadu_si256((const __m256i *)(b[r] + 16)) : _mm256_setzero_si256();
                    k45_vals(Q5, b[r], j, qh, &lo[r], &hi[r]);
                }
                transpose4x64(lo[0], lo[1], lo[2], lo[3], o);
                for (int k = 0; k < 4; k++) _mm256_store_si256((__m256i *)(K45_V(B, R, 2 * j, k) + 8 * g), o[k]);
                transpose4x64(hi[0], hi[1], hi[2], hi[3], o);
                for (int k = 0; k < 4; k++) _mm256_store_si256((__m256i *)(K45_V(B, R, 2 * j + 1, k) + 8 * g), o[k]);
            }
        }
    }
}
#endif
