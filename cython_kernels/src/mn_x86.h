/* x86 helpers shared by the SIMD kernel files (mn_avx2.c, mn_avx512_tmpl.h):
 * included inside each file's target region, so they compile for its level. */
#ifndef MN_X86_H
#define MN_X86_H
#include "mn_tile.h"
#ifndef MN_PF_DIST
#define MN_PF_DIST 4096
#endif

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
/* the first n (<= 5) cache lines of the weights MN_PF_DIST bytes past b; straight-line
 * code, folded before the loop passes (a loop here moves the registers of the kernels) */
MN_INLINE void mn_prefetch(const uint8_t *b, const int n) {
    const char *p = (const char *)(b + MN_PF_DIST);
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
#endif
