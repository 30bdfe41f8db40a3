/* The type-traits table: for every GGML type id, its block geometry, the
 * activation format its dot product takes, where its fp16 scales sit in a
 * block, and (filled at first use) its kernel at each SIMD level.  Python reads
 * it through moe_numa.quants.traits(); nothing else re-derives these facts. */
#include "mn_internal.h"
#include "mn_iq.h"

#define NO -1
/*                       name       block bytes act          d   dmin */
#define T_(id, nm, bl, by, ac, d0, d1) [id] = { { nm, bl, by, ac, { d0, d1 } }, { 0 } }
mn_traits mn_traits_table[MN_MAX_TYPE] = {
    T_(MN_F32,     "F32",       1,   4, MN_ACT_FLOAT, NO, NO),
    T_(MN_F16,     "F16",       1,   2, MN_ACT_FLOAT, NO, NO),
    T_(MN_BF16,    "BF16",      1,   2, MN_ACT_FLOAT, NO, NO),
    T_(MN_Q4_0,    "Q4_0",     32,  BS_Q4_0, MN_ACT_Q8_0,   0, NO),
    T_(MN_Q4_1,    "Q4_1",     32,  BS_Q4_1, MN_ACT_Q8_0,   0,  2),
    T_(MN_Q5_0,    "Q5_0",     32,  BS_Q5_0, MN_ACT_Q8_0,   0, NO),
    T_(MN_Q5_1,    "Q5_1",     32,  BS_Q5_1, MN_ACT_Q8_0,   0,  2),
    T_(MN_Q8_0,    "Q8_0",     32,  BS_Q8_0, MN_ACT_Q8_0,   0, NO),
    T_(MN_Q8_1,    "Q8_1",     32,  40, MN_ACT_NONE,   0,  2),
    T_(MN_Q2_K,    "Q2_K",    256,  BS_Q2_K, MN_ACT_Q8_K,  80, 82),
    T_(MN_Q3_K,    "Q3_K",    256, BS_Q3_K, MN_ACT_Q8_K, 108, NO),
    T_(MN_Q4_K,    "Q4_K",    256, BS_Q4_K, MN_ACT_Q8_K,   0,  2),
    T_(MN_Q5_K,    "Q5_K",    256, BS_Q5_K, MN_ACT_Q8_K,   0,  2),
    T_(MN_Q6_K,    "Q6_K",    256, BS_Q6_K, MN_ACT_Q8_K, 208, NO),
    T_(MN_Q8_K,    "Q8_K",    256, 292, MN_ACT_NONE,  NO, NO),
    T_(MN_IQ2_XXS, "IQ2_XXS", 256,  BS_IQ2_XXS, MN_ACT_Q8_K,   0, NO),
    T_(MN_IQ2_XS,  "IQ2_XS",  256,  BS_IQ2_XS, MN_ACT_Q8_K,   0, NO),
    T_(MN_IQ3_XXS, "IQ3_XXS", 256,  BS_IQ3_XXS, MN_ACT_Q8_K,   0, NO),
    T_(MN_IQ1_S,   "IQ1_S",   256,  BS_IQ1_S, MN_ACT_Q8_K,   0, NO),
    T_(MN_IQ4_NL,  "IQ4_NL",   32,  BS_IQ4_NL, MN_ACT_Q8_0,   0, NO),
    T_(MN_IQ3_S,   "IQ3_S",   256, BS_IQ3_S, MN_ACT_Q8_K,   0, NO),
    T_(MN_IQ2_S,   "IQ2_S",   256,  BS_IQ2_S, MN_ACT_Q8_K,   0, NO),
    T_(MN_IQ4_XS,  "IQ4_XS",  256, BS_IQ4_XS, MN_ACT_Q8_K,   0, NO),
    T_(MN_I8,      "I8",        1,   1, MN_ACT_NONE,  NO, NO),
    T_(MN_I16,     "I16",       1,   2, MN_ACT_NONE,  NO, NO),
    T_(MN_I32,     "I32",       1,   4, MN_ACT_NONE,  NO, NO),
    T_(MN_I64,     "I64",       1,   8, MN_ACT_NONE,  NO, NO),
    T_(MN_F64,     "F64",       1,   8, MN_ACT_NONE,  NO, NO),
    T_(MN_IQ1_M,   "IQ1_M",   256,  BS_IQ1_M, MN_ACT_Q8_K,  NO, NO),   /* scale spread over the scale nibbles */
    T_(MN_TQ1_0,   "TQ1_0",   256,  54, MN_ACT_Q8_K,  52, NO),
    T_(MN_TQ2_0,   "TQ2_0",   256,  BS_TQ2_0, MN_ACT_Q8_K,  64, NO),
    T_(MN_MXFP4,   "MXFP4",    32,  17, MN_ACT_Q8_0,  NO, NO),   /* e8m0 exponent byte */
    T_(MN_NVFP4,   "NVFP4",    64,  36, MN_ACT_NONE,  NO, NO),
    T_(MN_Q1_0,    "Q1_0",    128,  18, MN_ACT_NONE,  NO, NO),
};

const mn_type_info *mn_type(int wtype) {
    if (wtype < 0 || wtype >= MN_MAX_TYPE || !mn_traits_table[wtype].info.block) return NULL;
    return &mn_traits_table[wtype].info;
}

static mn_dot_fn dot_at(int wtype, int level) {
    if (wtype < 0 || wtype >= MN_MAX_TYPE || level < 0 || level >= MN_N_LEVELS) return NULL;
    (void)mn_kernels_init();
    return mn_traits_table[wtype].dot[level];
}

int mn_kernel_level(int wtype, int level) {
    const mn_dot_fn f = dot_at(wtype, level);
    if (!f) return -1;
    for (int l = 0; l < level; l++) if (dot_at(wtype, l) == f) return l;
    return level;
}

int mn_type_supported(int wtype) { return dot_at(wtype, MN_SIMD_SCALAR) != NULL; }

int64_t mn_block_size(int wtype) { return mn_type_supported(wtype) ? mn_traits_table[wtype].info.block : 0; }

size_t mn_row_bytes(int wtype, int64_t cols) {
    const int64_t bs = mn_block_size(wtype);
    if (bs == 0 || cols <= 0 || cols % bs) return 0;
    return (size_t)(cols / bs) * (size_t)mn_traits_table[wtype].info.bytes;
}

/* A block is bad when one of its fp16 scales (or, for the plain float types,
 * its value) is Inf or NaN. */
static int bad_block(int wtype, const mn_type_info *ti, const uint8_t *b) {
    switch (wtype) {
    case MN_F32: { uint32_t u; memcpy(&u, b, 4); return (u & 0x7F800000u) == 0x7F800000u; }
    case MN_F16: return (mn_rd16(b) & 0x7C00) == 0x7C00;
    case MN_BF16: return (mn_rd16(b) & 0x7F80) == 0x7F80;
    case MN_IQ1_M: {
        const uint16_t s0 = mn_rd16(b + 48), s1 = mn_rd16(b + 50), s2 = mn_rd16(b + 52), s3 = mn_rd16(b + 54);
        const uint16_t d = (uint16_t)((s0 >> 12) | ((s1 >> 8) & 0xF0) | ((s2 >> 4) & 0xF00) | (s3 & 0xF000));
        return (d & 0x7C00) == 0x7C00;
    }
    default:
        for (int k = 0; k < 2; k++)
            if (ti->scale_off[k] >= 0 && (mn_rd16(b + ti->scale_off[k]) & 0x7C00) == 0x7C00) return 1;
        return 0;
    }
}

int64_t mn_first_bad_block(int wtype, const uint8_t *w, size_t row_stride, int64_t rows, int64_t cols) {
    if (!mn_row_bytes(wtype, cols) || rows < 0) return -2;
    const mn_type_info *ti = &mn_traits_table[wtype].info;
    const int64_t nb = cols / ti->block;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = w + r * row_stride;
        for (int64_t i = 0; i < nb; i++)
            if (bad_block(wtype, ti, row + i * ti->bytes)) return r * nb + i;
    }
    return -1;
}
