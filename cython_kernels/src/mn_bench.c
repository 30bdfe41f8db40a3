/* The STREAM-like read of the kernel benchmark: plain loads (hardware
 * prefetchers only) or loads with the kernels' software prefetch. */
#include <immintrin.h>
#include "mn_bench.h"
#include "mn_cpu.h"

double mn_read_sum(const float *x, int64_t n) {
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 += x[i]; a1 += x[i + 1]; a2 += x[i + 2]; a3 += x[i + 3];
        a4 += x[i + 4]; a5 += x[i + 5]; a6 += x[i + 6]; a7 += x[i + 7];
    }
    for (; i < n; i++) a0 += x[i];
    return (double)a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")
static double read_sum_avx2(const float *x, int64_t n, int prefetch) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        if (prefetch) {
            _mm_prefetch((const char *)(x + i) + mn_pf_dist, _MM_HINT_T0);
            _mm_prefetch((const char *)(x + i) + mn_pf_dist + 64, _MM_HINT_T0);
        }
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i)); a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16)); a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
    }
    const __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    double s = _mm_cvtss_f32(s4);
    for (; i < n; i++) s += x[i];
    return s;
}
#pragma GCC pop_options

double mn_read_sum2(const float *x, int64_t n, int prefetch) {
    mn_prefetch_init();
    if (mn_simd_level_cpu() >= MN_SIMD_AVX2) return read_sum_avx2(x, n, prefetch);
    return mn_read_sum(x, n);
}
