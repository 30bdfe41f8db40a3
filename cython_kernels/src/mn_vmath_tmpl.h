/* exp and the activations built on it, compiled once per SIMD level by mn_vmath.c:
 *   #define VM_SUFFIX avx2 / VM_TARGET __attribute__((target("avx2,fma"))) / VM_W 8
 *   #include "mn_vmath_tmpl.h"
 * VM_W is the level's native float count.  One algorithm at every width
 * (Cephes-style: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r,
 * then 2^n through the exponent bits), so a value's result does not depend on
 * where it sits in the array: the tail runs the same vector code on a padded copy. */
#define VM_CAT2(a, b) a##_##b
#define VM_CAT(a, b) VM_CAT2(a, b)
#define VMF VM_CAT(vmf, VM_SUFFIX)
#define VMI VM_CAT(vmi, VM_SUFFIX)
#define VMFU VM_CAT(vmfu, VM_SUFFIX)
typedef float VMF __attribute__((vector_size(VM_W * 4)));
typedef int32_t VMI __attribute__((vector_size(VM_W * 4)));
typedef float VMFU __attribute__((vector_size(VM_W * 4), aligned(4)));

/* m ? a : b, with m all-ones or all-zeros per lane */
#define VM_SEL(m, a, b) ((VMF)(((VMI)(a) & (m)) | ((VMI)(b) & ~(m))))

VM_TARGET static inline VMF VM_CAT(vexp, VM_SUFFIX)(VMF x) {
    const VMF zero = {0};
    const VMI under = x < -87.0f;            /* exp < 1.7e-38: 0 (softmax tails, exp(-inf)) */
    const VMI over = x > 88.0f;              /* 2^127 keeps the exponent in range */
    x = VM_SEL(over, zero + 88.0f, x);
    x = VM_SEL(under, zero, x);
    VMF n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;   /* round to nearest */
    const VMF r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    VMF p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r) * r + r + 1.0f;
    const VMI e = (__builtin_convertvector(n, VMI) + 127) << 23;
    const VMF y = p * (VMF)e;
    return VM_SEL(under, zero, y);
}

/* g[i] = silu(g[i]) * u[i] */
VM_TARGET static void VM_CAT(silu_mul, VM_SUFFIX)(float *g, const float *u, int64_t n) {
    int64_t i = 0;
    for (; i + VM_W <= n; i += VM_W) {
        const VMF x = *(const VMFU *)(g + i);
        *(VMFU *)(g + i) = x / (1.0f + VM_CAT(vexp, VM_SUFFIX)(-x)) * *(const VMFU *)(u + i);
    }
    if (i < n) {
        float bg[VM_W] = {0}, bu[VM_W] = {0};
        memcpy(bg, g + i, sizeof(float) * (n - i)); memcpy(bu, u + i, sizeof(float) * (n - i));
        const VMF x = *(const VMFU *)bg;
        *(VMFU *)bg = x / (1.0f + VM_CAT(vexp, VM_SUFFIX)(-x)) * *(const VMFU *)bu;
        memcpy(g + i, bg, sizeof(float) * (n - i));
    }
}

/* x[i] = exp(x[i] - shift); returns their sum */
VM_TARGET static float VM_CAT(exp_sum, VM_SUFFIX)(float *x, int64_t n, float shift) {
    VMF acc = {0};
    int64_t i = 0;
    for (; i + VM_W <= n; i += VM_W) {
        const VMF y = VM_CAT(vexp, VM_SUFFIX)(*(const VMFU *)(x + i) - shift);
        *(VMFU *)(x + i) = y;
        acc += y;
    }
    if (i < n) {
        float b[VM_W];
        for (int k = 0; k < VM_W; k++) b[k] = -INFINITY;
        memcpy(b, x + i, sizeof(float) * (n - i));
        const VMF y = VM_CAT(vexp, VM_SUFFIX)(*(const VMFU *)b - shift);
        acc += y;
        *(VMFU *)b = y;
        memcpy(x + i, b, sizeof(float) * (n - i));
    }
    float s = 0.f;
    for (int k = 0; k < VM_W; k++) s += acc[k];
    return s;
}
/* the largest of init and x[0..n), NaNs passed over, as a scalar "if (x > m) m = x" loop gives */
VM_TARGET static float VM_CAT(max_of, VM_SUFFIX)(const float *x, int64_t n, float init) {
    VMF m = {0};
    m += init;
    int64_t i = 0;
    for (; i + VM_W <= n; i += VM_W) {
        const VMF y = *(const VMFU *)(x + i);
        m = VM_SEL(y > m, y, m);
    }
    float r = init;
    for (int k = 0; k < VM_W; k++) if (m[k] > r) r = m[k];
    for (; i < n; i++) if (x[i] > r) r = x[i];
    return r;
}
#undef VM_SEL
#undef VMF
#undef VMI
#undef VMFU
