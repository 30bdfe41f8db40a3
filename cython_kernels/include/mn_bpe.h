/* Byte-level BPE (GPT-2 style) over a GGUF vocabulary: the token table, the merge ranks and
 * the merge loop, so that building a tokenizer is one pass over the vocabulary's bytes
 * (tens of milliseconds for 150k tokens) instead of a second model in another library.
 * The pre-tokenizer (regex splits) stays outside; this encodes one piece at a time. */
#ifndef MN_BPE_H
#define MN_BPE_H
#include <stddef.h>
#include <stdint.h>

typedef struct mn_bpe mn_bpe;

/* An empty table for n tokens whose UTF-8 bytes total text_bytes and at most n_merges merges.
 * NULL when out of memory. */
mn_bpe *mn_bpe_new(int64_t n_tokens, size_t text_bytes, int64_t n_merges, int ignore_merges);
void mn_bpe_free(mn_bpe *b);

/* Add the next token (its id is the count added so far). Returns -1 when added, or the id of
 * an earlier token with the same bytes (the token is then not added). */
int64_t mn_bpe_add_token(mn_bpe *b, const char *s, size_t n);

/* Once every token is added: the ids of the 256 byte characters (GPT-2's byte-to-unicode map). */
void mn_bpe_finish_tokens(mn_bpe *b);

/* The id of a token's bytes, or -1. */
int64_t mn_bpe_lookup(const mn_bpe *b, const char *s, size_t n);

/* Add merge "a b", with the rank of its index. The cut is at the first space after the first
 * UTF-8 character. Returns 0 when added or when it is skipped as llama.cpp does (no space: an
 * empty pair that never matches; a pair seen before: it keeps its first rank), or
 * 1 / 2 / 3 when a / b / their concatenation is not a token. */
int mn_bpe_add_merge(mn_bpe *b, const char *m, size_t n, int64_t rank);

/* Encode one pre-tokenized piece (the text's own UTF-8 bytes, before the byte map).
 * out holds at least n ids; scratch at least mn_bpe_scratch_bytes(n). Returns the count. */
size_t mn_bpe_scratch_bytes(size_t n);
int64_t mn_bpe_encode(const mn_bpe *b, const uint8_t *piece, size_t n, int32_t *out, void *scratch);

#endif
