/* Expands a kernel template NAME##_t(w, nb, xq, xs, NT, res) with a
 * compile-time token count into the dispatched kernel NAME(..., nt, ...). */
#ifndef MN_TILE_H
#define MN_TILE_H
#define MN_INLINE static inline __attribute__((always_inline))
#define MN_TILED(name) MN_TILED_AS(name, name##_t)
#define MN_TILED_AS(name, tmpl) \
    static void name(const uint8_t *w, int64_t nb, const uint8_t *xq, size_t xs, int nt, float *res) { \
        switch (nt) { \
        case 1: tmpl(w, nb, xq, xs, 1, res); break; \
        case 2: tmpl(w, nb, xq, xs, 2, res); break; \
        case 3: tmpl(w, nb, xq, xs, 3, res); break; \
        default: tmpl(w, nb, xq, xs, 4, res); break; \
        } \
    }
#endif
