/* Picks the SIMD code path once per process from CPUID, so one build runs on
 * AVX-512, AVX2-only and older x86-64 CPUs alike. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "mn_cpu.h"

int mn_simd_level_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    /* every level above scalar compiles with BMI2 and POPCNT enabled (their target
     * pragmas), so the compiler may emit them anywhere there: require them too */
    const int base = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2") &&
                     __builtin_cpu_supports("popcnt");
    if (!base) return MN_SIMD_SCALAR;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        if (__builtin_cpu_supports("avx512vnni")) return MN_SIMD_AVX512_VNNI;
        return MN_SIMD_AVX512;
    }
    return MN_SIMD_AVX2;
#endif
    return MN_SIMD_SCALAR;
}

int mn_pf_dist = 4096;

int mn_prefetch_default(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) return 2048;
#endif
    return 4096;
}

static void prefetch_init_once(void) {
    const char *s = getenv("MOE_NUMA_PREFETCH");
    int d = mn_prefetch_default();
    if (s && *s) {
        char *end;
        const long v = strtol(s, &end, 10);
        /* a bad value keeps the default: the Python side refuses it with a message first */
        if (!*end && v >= MN_PF_OFF && v <= MN_PF_MAX && v % 64 == 0) d = (int)v;
    }
    mn_pf_dist = d;
}

void mn_prefetch_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, prefetch_init_once);
}

static int parse_level(const char *s) {
    if (!s || !*s) return -1;
    if (!strcmp(s, "scalar")) return MN_SIMD_SCALAR;
    if (!strcmp(s, "avx2")) return MN_SIMD_AVX2;
    if (!strcmp(s, "avx512")) return MN_SIMD_AVX512;
    if (!strcmp(s, "avx512vnni")) return MN_SIMD_AVX512_VNNI;
    return -1;
}

int mn_simd_level(void) {
    int cpu = mn_simd_level_cpu();
    int forced = parse_level(getenv("MOE_NUMA_SIMD"));
    /* A forced level can only lower the path: asking for AVX-512 on an AVX2 CPU
     * must not produce SIGILL. */
    if (forced >= 0 && forced < cpu) return forced;
    return cpu;
}

const char *mn_simd_name(int level) {
    switch (level) {
    case MN_SIMD_AVX2: return "avx2";
    case MN_SIMD_AVX512: return "avx512";
    case MN_SIMD_AVX512_VNNI: return "avx512vnni";
    default: return "scalar";
    }
}
