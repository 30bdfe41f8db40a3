/* AVX-512 F/BW/VL/DQ kernels without VNNI (e.g. Skylake-X); the other K-quants
 * use the AVX2 kernels. */
#include <immintrin.h>
#include "mn_internal.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#define MN_VNNI 0
#define SFX _avx512
#include "mn_avx512_tmpl.h"
#pragma GCC pop_options

void mn_fill_avx512(mn_traits *tab) { fill_avx512(tab, MN_SIMD_AVX512); }
