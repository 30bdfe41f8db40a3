/* AVX-512 kernels (placeholder: uses the AVX2 table until written). */
#include "mn_internal.h"
void mn_fill_avx512(mn_kernel_set *k) { (void)k; }
void mn_fill_avx512vnni(mn_kernel_set *k) { (void)k; }
