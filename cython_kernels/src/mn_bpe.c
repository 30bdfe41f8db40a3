/* Byte-level BPE: the vocabulary and merge tables, and the merge loop (see mn_bpe.h).
 *
 * A piece starts as one symbol per byte (the token of that byte's GPT-2 character); the
 * adjacent pair of lowest merge rank is merged, the leftmost on ties, until no pair has a
 * rank: llama.cpp's llm_tokenizer_bpe and the tokenizers library's BPE both do this. */
#include "mn_bpe.h"

#include <stdlib.h>
#include <string.h>

#define EMPTY_KEY UINT64_MAX

typedef struct { uint64_t key; int32_t rank, id; } merge_slot;

struct mn_bpe {
    int64_t n, cap_n;          /* tokens added, and room for */
    char *text; size_t text_used, text_cap;
    size_t *off;               /* token i's bytes are text[off[i], off[i + 1]) */
    int32_t *slots; uint64_t mask;          /* vocabulary: id + 1, 0 when empty */
    merge_slot *merges; uint64_t mmask;     /* (a, b) -> rank, id of a + b */
    int32_t byte_id[256];
    char byte_utf8[256][2]; uint8_t byte_len[256];   /* each byte's GPT-2 character, in UTF-8 */
    int ignore_merges;         /* a piece that is a token is taken whole (llama-3 style) */
};

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;    /* FNV-1a */
    for (size_t i = 0; i < n; i++) { h ^= (uint8_t)s[i]; h *= 1099511628211ull; }
    return h;
}
static uint64_t hash_pair(uint64_t k) {
    k ^= k >> 33; k *= 0xff51afd7ed558ccdull; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53ull; k ^= k >> 33;
    return k;
}
static uint64_t pow2_at_least(uint64_t n) { uint64_t c = 16; while (c < n) c <<= 1; return c; }

mn_bpe *mn_bpe_new(int64_t n_tokens, size_t text_bytes, int64_t n_merges, int ignore_merges) {
    if (n_tokens < 0 || n_tokens >= INT32_MAX || n_merges < 0 || n_merges >= INT32_MAX) return NULL;   /* int32 ids, ranks */
    mn_bpe *b = (mn_bpe *)calloc(1, sizeof *b);
    if (!b) return NULL;
    const uint64_t cap = pow2_at_least(2 * (uint64_t)n_tokens + 2), mcap = pow2_at_least(2 * (uint64_t)n_merges + 2);
    b->cap_n = n_tokens; b->text_cap = text_bytes + 1; b->mask = cap - 1; b->mmask = mcap - 1;
    b->ignore_merges = ignore_merges;
    b->text = (char *)malloc(b->text_cap);
    b->off = (size_t *)malloc(sizeof(size_t) * ((size_t)n_tokens + 1));
    b->slots = (int32_t *)calloc(cap, sizeof(int32_t));
    b->merges = (merge_slot *)malloc(sizeof(merge_slot) * mcap);
    if (!b->text || !b->off || !b->slots || !b->merges) { mn_bpe_free(b); return NULL; }
    for (uint64_t i = 0; i < mcap; i++) b->merges[i].key = EMPTY_KEY;
    b->off[0] = 0;
    for (int i = 0; i < 256; i++) b->byte_id[i] = -1;
    return b;
}

void mn_bpe_free(mn_bpe *b) {
    if (!b) return;
    free(b->text); free(b->off); free(b->slots); free(b->merges); free(b);
}

/* the slot of bytes s[0, n): holding their id + 1, or the empty slot where they would go */
static uint64_t find_slot(const mn_bpe *b, const char *s, size_t n) {
    uint64_t i = hash_bytes(s, n) & b->mask;
    for (;;) {
        const int32_t v = b->slots[i];
        if (!v) return i;
        const size_t o = b->off[v - 1], len = b->off[v] - o;
        if (len == n && memcmp(b->text + o, s, n) == 0) return i;
        i = (i + 1) & b->mask;
    }
}

int64_t mn_bpe_lookup(const mn_bpe *b, const char *s, size_t n) {
    return (int64_t)b->slots[find_slot(b, s, n)] - 1;
}

int64_t mn_bpe_add_token(mn_bpe *b, const char *s, size_t n) {
    if (b->n >= b->cap_n || b->text_used + n > b->text_cap) return -2;
    const uint64_t i = find_slot(b, s, n);
    if (b->slots[i]) return b->slots[i] - 1;
    memcpy(b->text + b->text_used, s, n);
    b->text_used += n;
    b->off[b->n + 1] = b->text_used;
    b->slots[i] = (int32_t)(++b->n);
    return -1;
}

/* GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for 256 + k */
static uint32_t byte_char(int byte) {
    if ((byte >= 33 && byte <= 126) || (byte >= 161 && byte <= 172) || byte >= 174) return (uint32_t)byte;
    uint32_t k = 0;
    for (int c = 0; c < byte; c++)
        if (!((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || c >= 174)) k++;
    return 256 + k;
}
/* the UTF-8 bytes of code point c < 0x800 */
static size_t put_utf8(uint32_t c, char *out) {
    if (c < 0x80) { out[0] = (char)c; return 1; }
    out[0] = (char)(0xC0 | (c >> 6)); out[1] = (char)(0x80 | (c & 0x3F));
    return 2;
}
void mn_bpe_finish_tokens(mn_bpe *b) {
    for (int i = 0; i < 256; i++) {
        b->byte_len[i] = (uint8_t)put_utf8(byte_char(i), b->byte_utf8[i]);
        b->byte_id[i] = (int32_t)mn_bpe_lookup(b, b->byte_utf8[i], b->byte_len[i]);
    }
}

static merge_slot *find_merge(const mn_bpe *b, uint64_t key) {
    uint64_t i = hash_pair(key) & b->mmask;
    while (b->merges[i].key != EMPTY_KEY && b->merges[i].key != key) i = (i + 1) & b->mmask;
    return &b->merges[i];
}

static size_t utf8_char_len(uint8_t c) { return c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

int mn_bpe_add_merge(mn_bpe *b, const char *m, size_t n, int64_t rank) {
    size_t p = n ? utf8_char_len((uint8_t)m[0]) : 0;
    if (p > n) p = n;
    while (p < n && m[p] != ' ') p++;
    if (p >= n) return 0;
    const int64_t a = mn_bpe_lookup(b, m, p);
    if (a < 0) return 1;
    const int64_t c = mn_bpe_lookup(b, m + p + 1, n - p - 1);
    if (c < 0) return 2;
    char small[256], *joined = n <= sizeof small ? small : (char *)malloc(n);
    if (!joined) return 3;
    memcpy(joined, m, p);
    memcpy(joined + p, m + p + 1, n - p - 1);
    const int64_t ab = mn_bpe_lookup(b, joined, n - 1);
    if (joined != small) free(joined);
    if (ab < 0) return 3;
    const uint64_t key = (uint64_t)a << 32 | (uint64_t)c;
    merge_slot *s = find_merge(b, key);
    if (s->key == EMPTY_KEY) { s->key = key; s->rank = (int32_t)rank; s->id = (int32_t)ab; }
    return 0;
}

/* ------------------------------------------------------------ the merge loop */
typedef struct { int32_t rank, pos, id; } cand;   /* merge symbols pos and its next into id */

static int cand_before(const cand *x, const cand *y) { return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos); }
static void heap_push(cand *h, size_t *n, cand c) {
    size_t i = (*n)++;
    while (i > 0) {
        const size_t up = (i - 1) / 2;
        if (!cand_before(&c, &h[up])) break;
        h[i] = h[up]; i = up;
    }
    h[i] = c;
}
static cand heap_pop(cand *h, size_t *n) {
    const cand top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t k = 2 * i + 1;
        if (k >= *n) break;
        if (k + 1 < *n && cand_before(&h[k + 1], &h[k])) k++;
        if (!cand_before(&h[k], &last)) break;
        h[i] = h[k]; i = k;
    }
    if (*n) h[i] = last;
    return top;
}

size_t mn_bpe_scratch_bytes(size_t n) { return n * (3 * sizeof(int32_t) + 3 * sizeof(cand) + 2) + 64; }

static void push_pair(const mn_bpe *b, const int32_t *id, const int32_t *next, int32_t pos, cand *h, size_t *nh) {
    if (pos < 0 || next[pos] < 0) return;
    const merge_slot *s = find_merge(b, (uint64_t)(uint32_t)id[pos] << 32 | (uint32_t)id[next[pos]]);
    if (s->key != EMPTY_KEY) { cand c = {s->rank, pos, s->id}; heap_push(h, nh, c); }
}

int64_t mn_bpe_encode(const mn_bpe *b, const uint8_t *piece, size_t n, int32_t *out, void *scratch) {
    if (n == 0) return 0;
    int32_t *id = (int32_t *)scratch, *prev = id + n, *next = prev + n;
    cand *h = (cand *)(next + n);
    char *mapped = (char *)(h + 3 * n);
    if (b->ignore_merges) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++) { memcpy(mapped + m, b->byte_utf8[piece[i]], b->byte_len[piece[i]]); m += b->byte_len[piece[i]]; }
        const int64_t whole = mn_bpe_lookup(b, mapped, m);
        if (whole >= 0) { out[0] = (int32_t)whole; return 1; }
    }
    /* symbols: one per byte whose character is a token (the others are dropped, as a BPE
     * model without an unknown token does) */
    int32_t ns = 0;
    for (size_t i = 0; i < n; i++) {
        const int32_t t = b->byte_id[piece[i]];
        if (t < 0) continue;
        id[ns] = t; prev[ns] = ns - 1; next[ns] = ns + 1; ns++;
    }
    if (ns == 0) return 0;
    next[ns - 1] = -1;
    size_t nh = 0;
    for (int32_t i = 0; i + 1 < ns; i++) push_pair(b, id, next, i, h, &nh);
    while (nh) {
        const cand c = heap_pop(h, &nh);
        const int32_t r = next[c.pos];
        if (id[c.pos] < 0 || r < 0) continue;          /* merged away, or now the last symbol */
        const merge_slot *s = find_merge(b, (uint64_t)(uint32_t)id[c.pos] << 32 | (uint32_t)id[r]);
        if (s->key == EMPTY_KEY || s->id != c.id || s->rank != c.rank) continue;   /* the pair changed since it was queued */
        id[c.pos] = c.id;
        id[r] = -1;
        next[c.pos] = next[r];
        if (next[r] >= 0) prev[next[r]] = c.pos;
        push_pair(b, id, next, prev[c.pos], h, &nh);
        push_pair(b, id, next, c.pos, h, &nh);
    }
    int64_t k = 0;
    for (int32_t i = 0; i >= 0; i = next[i]) out[k++] = id[i];
    return k;
}
