# cython: language_level=3
"""moe_numa._native: the compiled kernels (CPU dispatch, quantized matmul,
node-local thread pools). Python code uses it through moe_numa.kernels."""

cdef extern from "mn_cpu.h":
    int mn_simd_level()
    int mn_simd_level_cpu()
    const char *mn_simd_name(int level)


def simd_level():
    """Name of the SIMD path the kernels use now (after MOE_NUMA_SIMD)."""
    return mn_simd_name(mn_simd_level()).decode()


def simd_level_cpu():
    """Name of the best SIMD path this CPU supports."""
    return mn_simd_name(mn_simd_level_cpu()).decode()
