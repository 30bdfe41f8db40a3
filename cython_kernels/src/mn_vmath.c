/* Vector exp for the hot loops that were scalar expf calls: the SiLU gate of
 * every FFN (mn_moe.c, the shared expert) and the softmax numerators of flash
 * attention; and the softmaxes' running maximum (flash attention's, the router's),
 * a scalar chain of dependent compares that took a tenth of the attention time at
 * depth.  Each SIMD level runs mn_vmath_tmpl.h at its native width; the entry points
 * dispatch on the active level (mn_active_level). */
#include <math.h>
#include <string.h>
#include "mn_internal.h"

#define VM_SUFFIX avx512
#define VM_TARGET __attribute__((target("avx512f,avx512dq,fma")))
#define VM_W 16
#include "mn_vmath_tmpl.h"
#undef VM_SUFFIX
#undef VM_TARGET
#undef VM_W
#define VM_SUFFIX avx2
#define VM_TARGET __attribute__((target("avx2,fma")))
#define VM_W 8
#include "mn_vmath_tmpl.h"
#undef VM_SUFFIX
#undef VM_TARGET
#undef VM_W
#define VM_SUFFIX base
#define VM_TARGET
#define VM_W 4
#include "mn_vmath_tmpl.h"
#undef VM_SUFFIX
#undef VM_TARGET
#undef VM_W

void mn_silu_mul(float *g, const float *u, int64_t n) {
    const int lvl = mn_active_level();
    if (lvl >= MN_SIMD_AVX512) silu_mul_avx512(g, u, n);
    else if (lvl >= MN_SIMD_AVX2) silu_mul_avx2(g, u, n);
    else silu_mul_base(g, u, n);
}

float mn_exp_sum(float *x, int64_t n, float shift) {
    if (n <= 0) return 0.f;
    const int lvl = mn_active_level();
    if (lvl >= MN_SIMD_AVX512) return exp_sum_avx512(x, n, shift);
    if (lvl >= MN_SIMD_AVX2) return exp_sum_avx2(x, n, shift);
    return exp_sum_base(x, n, shift);
}

float mn_max_of(const float *x, int64_t n, float init) {
    const int lvl = mn_active_level();
    if (lvl >= MN_SIMD_AVX512) return max_of_avx512(x, n, init);
    if (lvl >= MN_SIMD_AVX2) return max_of_avx2(x, n, init);
    return max_of_base(x, n, init);
}
