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

/* How far ahead (bytes) the kernels' software prefetch reads the weights: chosen once per
 * process by mn_prefetch_init() (idempotent; the kernels' first use runs it).  Intel cores want it
 * nearer than AMD's (Sapphire Rapids: GEMV at 2048 bytes streams 15-35% faster than at
 * 4096; Zen 3-5 reach 0.95 of read bandwidth at 4096).  MOE_NUMA_PREFETCH=BYTES (0 to
 * 16384, a multiple of 64; 0: no look-ahead) overrides the choice. */
extern int mn_pf_dist;
enum { MN_PF_OFF = 0, MN_PF_MAX = 16384 };
int mn_prefetch_default(void);
void mn_prefetch_init(void);

#endif
