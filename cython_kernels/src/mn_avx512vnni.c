/* AVX-512 kernels with VNNI (vpdpbusd / vpdpwssd), e.g. Ice Lake, Zen 4/5. */
#include <immintrin.h>
#include "mn_internal.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#define MN_VNNI 1
#define SFX _avx512vnni
#include "mn_avx512_tmpl.h"
#pragma GCC pop_options

void mn_fill_avx512vnni(mn_traits *tab) { fill_avx512vnni(tab, MN_SIMD_AVX512_VNNI); }
