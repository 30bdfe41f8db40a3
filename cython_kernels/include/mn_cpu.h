/* CPU feature detection and SIMD level selection (run time, from CPUID). */
#ifndef MN_CPU_H
#define MN_CPU_H

enum { MN_SIMD_SCALAR = 0, MN_SIMD_AVX2 = 1, MN_SIMD_AVX512 = 2, MN_SIMD_AVX512_VNNI = 3 };

/* Highest level this CPU supports, lowered by the MOE_NUMA_SIMD environment
 * variable ("scalar", "avx2", "avx512", "avx512vnni") so tests can force a path. */
int mn_simd_level(void);
/* Highest level the CPU itself supports, ignoring the environment. */
int mn_simd_level_cpu(void);
const char *mn_simd_name(int level);

#endif
