/* A STREAM-like read, the yardstick of the kernel benchmark (bench/kernels.py):
 * weight-streaming GB/s is compared with it. */
#ifndef MN_BENCH_H
#define MN_BENCH_H
#include <stdint.h>

/* sum of n floats, portable C */
double mn_read_sum(const float *x, int64_t n);
/* same with AVX2 where the CPU has it; prefetch=1 adds software prefetch as the kernels use */
double mn_read_sum2(const float *x, int64_t n, int prefetch);

#endif
