/* The float kernels (F32, F16, BF16) at one vector width, included by mn_avx2.c
 * (8 floats) and mn_avx512_tmpl.h (16) inside their target regions, which define
 *   FV, FV_W             the float vector type and its float count
 *   FV_ZERO() FV_LOADU(p) FV_FMA(a, b, c) FV_ADD(a, b) FV_HSUM(v)
 *   FV_F32(i) FV_F16(i) FV_BF16(i)   FV_W weights from element i of w, as floats
 *   FV_NAME(name)        the level's name of a kernel
 * A step takes 2 * FV_W weights into two accumulators per token (two dependency
 * chains) and prefetches FV_W / 8 lines; the leftover elements are scalar. */
#include "mn_x86.h"

#define FV_KERNEL(name, LOAD, ONE, ESZ) \
MN_INLINE void FV_NAME(name##_t)(const uint8_t *w, int64_t n, const uint8_t *xq, size_t xs, const int NT, float *res) { \
    FV a0[MN_TILE], a1[MN_TILE]; \
    for (int t = 0; t < NT; t++) { a0[t] = FV_ZERO(); a1[t] = FV_ZERO(); } \
    int64_t i = 0; \
    for (; i + 2 * FV_W <= n; i += 2 * FV_W) { \
        mn_prefetch(w + i * (int64_t)(ESZ), FV_W / 8); \
        const FV w0 = LOAD(i), w1 = LOAD(i + FV_W); \
        for (int t = 0; t < NT; t++) { \
            const float *x = (const float *)(xq + t * xs) + i; \
            a0[t] = FV_FMA(w0, FV_LOADU(x), a0[t]); \
            a1[t] = FV_FMA(w1, FV_LOADU(x + FV_W), a1[t]); \
        } \
    } \
    for (int t = 0; t < NT; t++) { \
        const float *x = (const float *)(xq + t * xs); \
        float s = FV_HSUM(FV_ADD(a0[t], a1[t])); \
        for (int64_t j = i; j < n; j++) s += ONE(w, j) * x[j]; \
        res[t] = s; \
    } \
}
FV_KERNEL(dot_f32, FV_F32, f32_one, 4)
FV_KERNEL(dot_f16, FV_F16, f16_one, 2)
FV_KERNEL(dot_bf16, FV_BF16, bf16_one, 2)
MN_TILED_AS(FV_NAME(dot_f32), FV_NAME(dot_f32_t))
MN_TILED_AS(FV_NAME(dot_f16), FV_NAME(dot_f16_t))
MN_TILED_AS(FV_NAME(dot_bf16), FV_NAME(dot_bf16_t))
#undef FV_KERNEL
#undef FV
#undef FV_W
#undef FV_ZERO
#undef FV_LOADU
#undef FV_FMA
#undef FV_ADD
#undef FV_HSUM
#undef FV_F32
#undef FV_F16
#undef FV_BF16
#undef FV_NAME
