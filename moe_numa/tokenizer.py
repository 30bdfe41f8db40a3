"""Byte-level BPE tokenizers from GGUF metadata (``tokenizer.ggml.*``), as llama.cpp does it.

:class:`GGUFTokenizer` reproduces llama.cpp b11434's ``llama_tokenize`` /
``llama_token_to_piece`` for ``tokenizer.ggml.model == "gpt2"`` with the
pre-tokenizers ``qwen2`` (also ``deepseek-r1-qwen``), ``deepseek-v3`` (also
``joyai-llm``) and ``glm4`` (also ``glm5``: qwen2's splitting with numbers in runs of
up to three digits, words that are whole tokens taken as they are, no default BOS).  The regex
splitting runs in the HF ``tokenizers`` library, the BPE merges in C (``_native.BPE``,
mn_bpe.c); what llama.cpp does around them is done here:

* **special tokens** -- tokens of type CONTROL, USER_DEFINED or UNKNOWN are cut
  out of the text first, longest first, as whole strings, never split.  CONTROL
  and UNKNOWN ones only with ``parse_special=True``; USER_DEFINED ones (Qwen's
  ``<think>``, ``<tool_call>``) always.  Tokens llama.cpp recognises by their text
  (``<|im_end|>``, ``<|endoftext|>``, ``<｜end▁of▁sentence｜>``, the FIM tokens ...)
  are promoted to CONTROL as llama.cpp does.
* **BOS / EOS** -- ``add_special=True`` prepends BOS when ``add_bos`` and appends EOS
  when ``add_eos``; both come from ``tokenizer.ggml.add_bos_token`` /
  ``add_eos_token``, default false for these pre-tokenizers.  Absent
  ``bos_token_id`` / ``eos_token_id`` fall back to llama.cpp's gpt2 default, 11.
* **pre-tokenizer regexes** -- llama.cpp's own (its ``qwen2`` splitter is hand
  written, ``deepseek-v3`` is three regexes applied in sequence) with its Unicode
  tables: llama.cpp b11434 classifies characters by Unicode 15.1, the Oniguruma in
  ``tokenizers`` by Unicode 16.0, so the characters new in 16.0 are taken out of
  ``\\p{L}``, ``\\p{N}``, ``\\p{P}``, ``\\p{S}``, ``\\p{M}`` (llama.cpp sees them as
  unassigned).
* **decoding** -- NORMAL tokens are byte-level decoded, USER_DEFINED tokens give their
  text, CONTROL/UNKNOWN tokens give their text unless ``skip_special``, other types
  nothing; invalid UTF-8 is replaced (U+FFFD).  :class:`StreamDecoder` does the same
  one id at a time, holding back incomplete UTF-8 sequences.
* **end of generation** -- :attr:`GGUFTokenizer.stop_ids` is llama.cpp's EOG set: EOS,
  EOT, EOM, the FIM pad/repo/file-separator tokens and the tokens it knows by text.

Not supported (raise :class:`~moe_numa.errors.UnsupportedError`): other tokenizer
models ("llama" SentencePiece, "bert", ...), other pre-tokenizers, the LSTRIP/RSTRIP
token attributes llama.cpp sets for a few other models.
"""
from __future__ import annotations

import codecs
import functools
import importlib.resources
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import _native
from .errors import GGUFError, MoeNumaError, UnsupportedError
from .gguf_file import metadata_value

__all__ = [
    "GGUFTokenizer", "StreamDecoder", "TokenizerError", "SUPPORTED_PRE_TOKENIZERS",
    "TOKEN_TYPE_UNDEFINED", "TOKEN_TYPE_NORMAL", "TOKEN_TYPE_UNKNOWN", "TOKEN_TYPE_CONTROL",
    "TOKEN_TYPE_USER_DEFINED", "TOKEN_TYPE_UNUSED", "TOKEN_TYPE_BYTE",
]


class TokenizerError(MoeNumaError, ValueError):
    """A token id out of range, or text the tokenizer cannot take."""


# token types (tokenizer.ggml.token_type) and llama.cpp's token attributes
TOKEN_TYPE_UNDEFINED = 0
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

_ATTR_UNKNOWN = 1 << 0
_ATTR_UNUSED = 1 << 1
_ATTR_NORMAL = 1 << 2
_ATTR_CONTROL = 1 << 3
_ATTR_USER_DEFINED = 1 << 4
_ATTR_BYTE = 1 << 5
_TYPE_TO_ATTR = {
    TOKEN_TYPE_UNDEFINED: 0, TOKEN_TYPE_NORMAL: _ATTR_NORMAL, TOKEN_TYPE_UNKNOWN: _ATTR_UNKNOWN,
    TOKEN_TYPE_CONTROL: _ATTR_CONTROL, TOKEN_TYPE_USER_DEFINED: _ATTR_USER_DEFINED,
    TOKEN_TYPE_UNUSED: _ATTR_UNUSED, TOKEN_TYPE_BYTE: _ATTR_BYTE,
}
_TYPE_ATTR_TABLE = np.array([_TYPE_TO_ATTR[t] for t in range(len(_TYPE_TO_ATTR))], dtype=np.int64)

#: tokenizer.ggml.pre values we implement -> the splitting they use
SUPPORTED_PRE_TOKENIZERS = {
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
    "deepseek-v3": "deepseek-v3", "joyai-llm": "deepseek-v3",
    "glm4": "glm4", "glm5": "glm4",
}
# splittings whose words that are whole tokens skip the merges (llama.cpp's ignore_merges)
_IGNORE_MERGES = frozenset({"glm4"})

_KEY_PREFIX = "tokenizer.ggml."
_GPT2_DEFAULT_BOS_EOS = 11   # llama.cpp's default bos/eos for tokenizer model "gpt2"

# --------------------------------------------------------------------------- #
# pre-tokenizer regexes
# --------------------------------------------------------------------------- #

# llama.cpp's own tables, as package data (moe_numa/data/tokenizer_tables.json):
# - new_in_unicode_16: code point ranges first assigned in Unicode 16.0.  llama.cpp
#   b11434's unicode tables are Unicode 15.1 and flag them "undefined"; the Oniguruma in
#   `tokenizers` knows them;
# - eot/eom/fim/eog_texts: tokens llama.cpp recognises by their text (llama-vocab.cpp, load_vocab).
_TABLES = json.loads((importlib.resources.files("moe_numa") / "data" / "tokenizer_tables.json")
                     .read_text(encoding="utf-8"))
_NEW_IN_UNICODE_16 = tuple((a, b) for a, b in _TABLES["new_in_unicode_16"])
_EOT_TEXTS = tuple(_TABLES["eot_texts"])
_EOM_TEXTS = tuple(_TABLES["eom_texts"])
_FIM_TEXTS = {kind: tuple(texts) for kind, texts in _TABLES["fim_texts"].items()}
_EOG_TEXTS = frozenset(_TABLES["eog_texts"])


def _x_set() -> str:
    return "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}"
                   for a, b in _NEW_IN_UNICODE_16)


def _cls(members: str) -> str:
    """``[members]`` restricted to characters llama.cpp's tables know."""
    return f"[{members}&&[^{_x_set()}]]"


def _ncls(members: str) -> str:
    """``[^members]`` where llama.cpp's unknown characters are never members."""
    return f"[[^{members}]{_x_set()}]"


_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"


@functools.lru_cache(maxsize=None)
def pre_tokenizer_regexes(kind: str) -> tuple[str, ...]:
    """The Oniguruma regexes, applied in sequence, for a splitting kind."""
    L, N = _cls(r"\p{L}"), _cls(r"\p{N}")
    if kind == "qwen2":
        # (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*
        #   |\s*[\r\n]+|\s+(?!\S)|\s+
        return ("|".join([
            _CONTRACTIONS,
            _ncls(r"\r\n\p{L}\p{N}") + "?" + L + "+",
            N,
            " ?" + _ncls(r"\s\p{L}\p{N}") + r"+[\r\n]*",
            r"\s*[\r\n]+",
            r"\s+(?!\S)",
            r"\s+",
        ]),)
    if kind == "glm4":
        # qwen2's with numbers in runs of up to three digits (llama.cpp's CHATGLM4)
        return ("|".join([
            _CONTRACTIONS,
            _ncls(r"\r\n\p{L}\p{N}") + "?" + L + "+",
            N + "{1,3}",
            " ?" + _ncls(r"\s\p{L}\p{N}") + r"+[\r\n]*",
            r"\s*[\r\n]+",
            r"\s+(?!\S)",
            r"\s+",
        ]),)
    if kind == "deepseek-v3":
        # \p{N}{1,3} ; [一-龥぀-ゟ゠-ヿ]+ ;
        # [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
        #   | ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
        return (
            N + "{1,3}",
            r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+",
            "|".join([
                r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+",
                _ncls(r"\r\n\p{L}\p{P}\p{S}") + "?" + _cls(r"\p{L}\p{M}") + "+",
                " ?" + _cls(r"\p{P}\p{S}") + r"+[\r\n]*",
                r"\s*[\r\n]+",
                r"\s+(?!\S)",
                r"\s+",
            ]),
        )
    raise UnsupportedError(f"pre-tokenizer splitting {kind!r} is not implemented")


# special-id keys: attribute name -> GGUF key suffix(es) (the later, deprecated ones too)
_ID_KEYS = (
    ("bos", ("bos_token_id",)), ("eos", ("eos_token_id",)), ("eot", ("eot_token_id",)),
    ("eom", ("eom_token_id",)), ("unk", ("unknown_token_id",)), ("sep", ("seperator_token_id",)),
    ("pad", ("padding_token_id",)), ("mask", ("mask_token_id",)),
    ("fim_pre", ("fim_pre_token_id", "prefix_token_id")),
    ("fim_suf", ("fim_suf_token_id", "suffix_token_id")),
    ("fim_mid", ("fim_mid_token_id", "middle_token_id")),
    ("fim_pad", ("fim_pad_token_id",)), ("fim_rep", ("fim_rep_token_id",)),
    ("fim_sep", ("fim_sep_token_id",)),
)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE token strings)."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in out):
        out[b] = chr(256 + n)
    return out


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[int, int]:
    """Inverse of :func:`bytes_to_unicode`, as a str.translate table."""
    return {ord(c): b for b, c in bytes_to_unicode().items()}


# --------------------------------------------------------------------------- #
# metadata access
# --------------------------------------------------------------------------- #

def _as_list(md: Mapping[str, Any], key: str) -> list | None:
    if key not in md:
        return None
    value = md[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise GGUFError(f"GGUF key {key!r}: expected an array, got {type(value).__name__}")
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)


def _as_str_list(md: Mapping[str, Any], key: str) -> list[str] | None:
    value = _as_list(md, key)
    if value is None:
        return None
    if set(map(type, value)) <= {str}:   # the file reader's decoded strings: nothing to check
        return value
    out = []
    for i, v in enumerate(value):
        if isinstance(v, (bytes, bytearray, memoryview)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError as e:
                raise GGUFError(f"GGUF key {key!r}[{i}]: not valid UTF-8 ({e})") from None
        elif not isinstance(v, str):
            raise GGUFError(f"GGUF key {key!r}[{i}]: expected a string, got {type(v).__name__}")
        out.append(v)
    return out


def _as_int(md: Mapping[str, Any], key: str) -> int | None:
    return metadata_value(md, key, "int")


def _as_bool(md: Mapping[str, Any], key: str) -> bool | None:
    return metadata_value(md, key, "bool")


def _as_str(md: Mapping[str, Any], key: str) -> str | None:
    return metadata_value(md, key, "str")


# --------------------------------------------------------------------------- #
# the tokenizer
# --------------------------------------------------------------------------- #

class GGUFTokenizer:
    """llama.cpp's byte-level BPE tokenizer for a GGUF vocabulary; see the module doc."""

    def __init__(self, *, tokens: Sequence[str], token_types: Sequence[int] | None,
                 merges: Sequence[str], pre: str, bos_id: int | None = None,
                 eos_id: int | None = None, add_bos: bool | None = None,
                 add_eos: bool | None = None, special_ids: Mapping[str, int] | None = None,
                 chat_template: str | None = None, model: str = "gpt2") -> None:
        """Prefer :meth:`from_metadata`.  ``special_ids`` maps "eot", "pad", "fim_pre"...
        to ids (out-of-range ids are ignored with a warning, as llama.cpp does)."""
        if model != "gpt2":
            raise UnsupportedError(f"tokenizer.ggml.model={model!r} is not supported "
                                   "(only 'gpt2', byte-level BPE)")
        if pre not in SUPPORTED_PRE_TOKENIZERS:
            raise UnsupportedError(
                f"tokenizer.ggml.pre={pre!r} is not supported (supported: "
                f"{', '.join(sorted(SUPPORTED_PRE_TOKENIZERS))})")
        self.model = model
        self.pre = pre
        self.chat_template = chat_template
        n = len(tokens)
        if n == 0:
            raise GGUFError("tokenizer.ggml.tokens is empty")
        if "" in tokens:
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        else:
            tokens = list(tokens)
        if token_types is not None and len(token_types) < n:
            raise GGUFError(f"tokenizer.ggml.token_type has {len(token_types)} entries for "
                            f"{n} tokens")
        self._tokens: list[str] = tokens
        if token_types is None:
            attrs = [_ATTR_NORMAL] * n
        elif isinstance(token_types, np.ndarray) and token_types.dtype.kind in "iu":
            # a GGUF array: one table lookup for the whole vocabulary (a list comprehension
            # over 129k types is 70 ms of load, on the tokenizer's thread beside the placement)
            types = token_types[:n].astype(np.int64)
            known = (types >= 0) & (types < len(_TYPE_ATTR_TABLE))
            attrs = np.where(known, _TYPE_ATTR_TABLE[np.where(known, types, 0)], 0).tolist()
        else:
            attrs = [_TYPE_TO_ATTR.get(int(t), 0) for t in token_types[:n]]
        # the vocabulary and merges in C (mn_bpe.c): a second model in another library held the
        # GIL for a third of a second of every load, beside the weights' placement
        try:
            self._bpe = _native.BPE(tokens, list(merges),
                                    ignore_merges=SUPPORTED_PRE_TOKENIZERS[pre] in _IGNORE_MERGES)
        except (TypeError, ValueError) as e:   # "merges[i] = 'a b': 'b' is not one of the tokens", ...
            raise GGUFError(f"tokenizer.ggml.{e}") from None
        token_to_id = self._bpe.lookup

        # special ids: llama.cpp's gpt2 defaults, then the keys
        ids: dict[str, int | None] = {k: None for k, _ in _ID_KEYS}
        ids["bos"] = ids["eos"] = _GPT2_DEFAULT_BOS_EOS if _GPT2_DEFAULT_BOS_EOS < n else None
        if SUPPORTED_PRE_TOKENIZERS.get(pre) == "glm4":
            ids["bos"] = None            # GLM has no BOS unless the file names one
        given = dict(special_ids or {})
        if bos_id is not None:
            given["bos"] = bos_id
        if eos_id is not None:
            given["eos"] = eos_id
        for name, value in given.items():
            if name not in ids:
                raise ValueError(f"unknown special token kind {name!r}")
            if value is None:
                continue
            if not 0 <= int(value) < n:
                warnings.warn(f"tokenizer: {name} token id {value} is out of range for "
                              f"{n} tokens; using {ids[name]}", stacklevel=3)
                continue
            ids[name] = int(value)

        # tokens llama.cpp knows by their text (made CONTROL where they are not)
        def by_text(kind: str, texts: Sequence[str]) -> None:
            if ids[kind] is not None:
                return
            for text in texts:   # llama.cpp takes the first one its hash map yields
                tid = token_to_id(text)
                if tid is not None:
                    ids[kind] = tid
                    attrs[tid] |= _ATTR_CONTROL
                    return

        by_text("eot", _EOT_TEXTS)
        by_text("eom", _EOM_TEXTS)
        for kind, texts in _FIM_TEXTS.items():
            by_text(kind, texts)
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for text in _EOG_TEXTS:
            tid = token_to_id(text)
            if tid is not None:
                eog.add(tid)
                attrs[tid] |= _ATTR_CONTROL
        eog.update(ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None)
        self._ids = ids
        self._attrs = attrs
        self.stop_ids: frozenset[int] = frozenset(eog)
        self.add_bos = bool(add_bos) if add_bos is not None else False
        self.add_eos = bool(add_eos) if add_eos is not None else False

        # whole-string special tokens, longest first (ties: lower id first)
        special = np.flatnonzero(np.array(attrs, dtype=np.int64)
                                 & (_ATTR_CONTROL | _ATTR_USER_DEFINED | _ATTR_UNKNOWN)).tolist()
        special.sort(key=lambda i: (-len(tokens[i].encode("utf-8")), i))
        self._special_all = [(tokens[i], i) for i in special]
        self._special_user = [(t, i) for t, i in self._special_all
                              if not attrs[i] & (_ATTR_CONTROL | _ATTR_UNKNOWN)]

        from tokenizers import Regex, pre_tokenizers   # the regex splitting, with Oniguruma's Unicode classes
        splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated")
                  for rx in pre_tokenizer_regexes(SUPPORTED_PRE_TOKENIZERS[self.pre])]
        self._splitter = pre_tokenizers.Sequence(splits)
        self._pieces: list[bytes | None] = [None] * n
        self._pieces_plain: dict[int, bytes] = {}

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "GGUFTokenizer":
        """Build from GGUF metadata: GGUF key -> python value (arrays as lists or numpy)."""
        model = _as_str(md, _KEY_PREFIX + "model")
        if model is None:
            raise UnsupportedError("GGUF has no tokenizer: key 'tokenizer.ggml.model' is missing")
        if model != "gpt2":
            raise UnsupportedError(f"tokenizer.ggml.model={model!r} is not supported "
                                   "(only 'gpt2', byte-level BPE)")
        pre = _as_str(md, _KEY_PREFIX + "pre")
        if pre is None:
            raise UnsupportedError("key 'tokenizer.ggml.pre' is missing: the pre-tokenizer is "
                                   "unknown (llama.cpp would fall back to a degraded default)")
        if pre not in SUPPORTED_PRE_TOKENIZERS:
            raise UnsupportedError(
                f"tokenizer.ggml.pre={pre!r} is not supported (supported: "
                f"{', '.join(sorted(SUPPORTED_PRE_TOKENIZERS))})")
        tokens = _as_str_list(md, _KEY_PREFIX + "tokens")
        if tokens is None:
            raise GGUFError("key 'tokenizer.ggml.tokens' is missing")
        merges = _as_str_list(md, _KEY_PREFIX + "merges")
        if merges is None:
            raise GGUFError("key 'tokenizer.ggml.merges' is missing (needed by tokenizer 'gpt2')")
        raw_types = md.get(_KEY_PREFIX + "token_type")
        types = raw_types if isinstance(raw_types, np.ndarray) and raw_types.dtype.kind in "iu" \
            and raw_types.ndim == 1 else _as_list(md, _KEY_PREFIX + "token_type")
        if types is not None and types is not raw_types:
            for i, t in enumerate(types):
                if isinstance(t, bool) or not isinstance(t, int):
                    raise GGUFError(f"GGUF key 'tokenizer.ggml.token_type'[{i}]: expected an "
                                    f"integer, got {t!r}")
        special: dict[str, int] = {}
        for name, suffixes in _ID_KEYS:
            for suffix in suffixes:
                value = _as_int(md, _KEY_PREFIX + suffix)
                if value is not None:
                    special[name] = value
        return cls(tokens=tokens, token_types=types, merges=merges, pre=pre,
                   add_bos=_as_bool(md, _KEY_PREFIX + "add_bos_token"),
                   add_eos=_as_bool(md, _KEY_PREFIX + "add_eos_token"),
                   special_ids=special, chat_template=_as_str(md, "tokenizer.chat_template"),
                   model=model)

    # ------------------------------------------------------------------ facts

    @property
    def n_vocab(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self._ids["eot"]

    @property
    def eom_id(self) -> int | None:
        return self._ids["eom"]

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    def _check_id(self, token_id: int) -> int:
        try:
            i = int(token_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= i < len(self._tokens):
            raise TokenizerError(f"token id {i} is out of range (vocabulary of "
                                 f"{len(self._tokens)} tokens)")
        return i

    def is_special(self, token_id: int) -> bool:
        """CONTROL, USER_DEFINED or UNKNOWN: matched in text as a whole string, never split."""
        return bool(self._attrs[self._check_id(token_id)]
                    & (_ATTR_CONTROL | _ATTR_USER_DEFINED | _ATTR_UNKNOWN))

    def is_control(self, token_id: int) -> bool:
        """CONTROL or UNKNOWN: parsed only with parse_special, hidden by skip_special."""
        return bool(self._attrs[self._check_id(token_id)] & (_ATTR_CONTROL | _ATTR_UNKNOWN))

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string (byte-level encoded for normal tokens)."""
        return self._tokens[self._check_id(token_id)]

    def token_to_id(self, text: str) -> int | None:
        """The id whose vocabulary string is ``text``, or None."""
        return self._bpe.lookup(text)

    # ------------------------------------------------------------------ encode

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces the pre-tokenizer regexes cut ``text`` into (no special tokens)."""
        return [p for p, _ in self._splitter.pre_tokenize_str(text)]

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        frags: list[str | int] = [text]
        for s, tid in (self._special_all if parse_special else self._special_user):
            if s not in text:
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or s not in f:
                    out.append(f)
                    continue
                parts = f.split(s)
                for k, part in enumerate(parts):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """``llama_tokenize(vocab, text, add_special, parse_special)``."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise TokenizerError("add_bos is set but the vocabulary has no BOS token")
            out.append(self.bos_id)
        if text:
            frags = self._partition(text, parse_special)
            raw = [f for f in frags if isinstance(f, str)]
            try:
                encoded = [self._bpe.encode(self.pre_tokenize(f)) for f in raw]
            except Exception as e:
                bad = next((i for i, ch in enumerate(text) if 0xD800 <= ord(ch) < 0xE000), None)
                if bad is not None:
                    raise TokenizerError(f"text has a lone surrogate (U+{ord(text[bad]):04X} at "
                                         f"index {bad}); it is not valid Unicode") from None
                raise TokenizerError(f"cannot encode the text: {e}") from e
            it = iter(encoded)
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    out.extend(next(it))
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise TokenizerError("add_eos is set but the vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    # ------------------------------------------------------------------ decode

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """``llama_token_to_piece(token, special)``: the bytes of one token.

        ``special=False`` gives b"" for CONTROL and UNKNOWN tokens.
        """
        i = self._check_id(token_id)
        attr = self._attrs[i]
        if not special and attr & (_ATTR_CONTROL | _ATTR_UNKNOWN):
            return b""
        piece = self._pieces[i]
        if piece is None:
            piece = self._make_piece(i, attr)
            self._pieces[i] = piece
        return piece

    def _make_piece(self, i: int, attr: int) -> bytes:
        text = self._tokens[i]
        if attr & (_ATTR_CONTROL | _ATTR_UNKNOWN | _ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & (_ATTR_NORMAL | _ATTR_BYTE):
            table = _unicode_to_byte()
            if all(ord(c) in table for c in text):
                return bytes(table[ord(c)] for c in text)
            # llama.cpp's llama_decode_text marks characters outside the byte map
            out = bytearray()
            for c in text:
                if ord(c) in table:
                    out.append(table[ord(c)])
                else:
                    out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + \
                        text.encode("utf-8") + b"]"
            return bytes(out)
        return b""   # UNUSED, UNDEFINED

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        special = not skip_special
        return b"".join(self.token_to_piece(i, special) for i in ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Concatenated pieces as text; invalid UTF-8 becomes U+FFFD.

        ``skip_special`` drops CONTROL/UNKNOWN tokens (BOS, EOS, ``<|im_end|>``...).
        """
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    def __repr__(self) -> str:
        return (f"GGUFTokenizer(pre={self.pre!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos}, add_eos={self.add_eos})")


class StreamDecoder:
    """Incremental detokenizer: ids in one at a time, only complete UTF-8 text out.

    ``push(id)`` returns the text that is complete so far (possibly ""), holding back
    a partial multi-byte sequence; ``flush()`` returns what is left (an incomplete
    sequence becomes U+FFFD).  The concatenation of all outputs equals
    ``tokenizer.decode(ids, skip_special)``.
    """

    def __init__(self, tokenizer: GGUFTokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._special = not skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_to_piece(token_id, self._special))

    def flush(self) -> str:
        """The held-back bytes (as U+FFFD); the decoder is reset and can be reused."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    @property
    def pending(self) -> bool:
        """True while an incomplete UTF-8 sequence is held back."""
        return bool(self._dec.getstate()[0])
