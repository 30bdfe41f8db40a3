/* Expands a kernel template NAME##_t(w, nb, xq, xs, NT, res) with a
 * compile-time token count into the dispatched kernel NAME(..., nt, ...). */
#ifndef MN_TILE_H
#define MN_TILE_H
#define MN_INLINE static inline __attribute__((always_inline))
/* up to 4 tokens per pass (16-register ISAs); more tokens: several passes */
#define MN_TILED(name) MN_TILED_AS(name, name##_t)
#define MN_TILED_AS(name, tmpl) \
    static void name(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *res) { \
        for (; nt > 0; nt -= 4, xq += 4 * xs, res += 4) { \
            switch (nt) { \
            case 1: tmpl(w, nb, xq, xs, 1, res); break; \
            case 2: tmpl(w, nb, xq, xs, 2, res); break; \
            case 3: tmpl(w, nb, xq, xs, 3, res); break; \
            default: tmpl(w, nb, xq, xs, 4, res); break; \
            } \
        } \
    }
/* up to 8 tokens in one pass (32-register AVX-512) */
#define MN_TILED8_AS(name, tmpl) \
    static void name(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *res) { \
        switch (nt) { \
        case 1: tmpl(w, nb, xq, xs, 1, res); break; \
        case 2: tmpl(w, nb, xq, xs, 2, res); break; \
        case 3: tmpl(w, nb, xq, xs, 3, res); break; \
        case 4: tmpl(w, nb, xq, xs, 4, res); break; \
        case 5: tmpl(w, nb, xq, xs, 5, res); break; \
        case 6: tmpl(w, nb, xq, xs, 6, res); break; \
        case 7: tmpl(w, nb, xq, xs, 7, res); break; \
        default: tmpl(w, nb, xq, xs, 8, res); break; \
        } \
    }
#endif
