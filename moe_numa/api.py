"""The public Python API: `load()` and `Model` (tokenize, detokenize, logits,
generate), over either backend: the numpy reference or the NUMA engine."""
from __future__ import annotations

import numbers
import os
import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np

from .chat import render_chat
from .errors import ArgumentError, ClosedError, ContextOverflowError, MoeNumaError
from .generate import GenerationStats, generate_stream
from .gguf_file import GGUFModelFile, check_supported_types, check_tensor_blocks
from .layers.kv_cache import cache_type
from .layers.weights import Dequantizer
from .models import load_model
from .models.base import ReferenceForward
from .sampling import SamplingParams
from .tokenizer import GGUFTokenizer

BACKENDS = ("reference", "engine")
DEFAULT_BACKEND = "engine"
DEFAULT_CTX = 4096
MAX_CTX = 1 << 24       # positions are int32 in places; far beyond any model's training context


class ReferenceBackend:
    """The numpy oracle behind the common backend interface:
    reset(), n_ctx, n_past, forward(ids, all_logits) -> logits [n or 1, n_vocab]."""

    name = "reference"

    def __init__(self, arch_module, cfg, weights, n_ctx: int, weight_cache_bytes: int = 8 << 30,
                 act_quant: bool = False, n_slots: int = 1, cache_type_k: str | None = None,
                 cache_type_v: str | None = None):
        self.cfg = cfg
        self.n_ctx = n_ctx
        # KV-cache types: exact f32 by default (the oracle against llama.cpp's F32 cache);
        # act_quant models the engine, so it models the engine's default f16 cache too.
        default = "f16" if act_quant else "f32"
        self.cache_type_k = cache_type(cache_type_k or default)
        self.cache_type_v = cache_type(cache_type_v or default)
        if int(n_slots) < 1:
            raise MoeNumaError(f"n_slots must be >= 1, got {n_slots}")
        self.n_slots = int(n_slots)
        # act_quant=True rounds matmul inputs as the native kernels do (Q8_0/Q8_K), to check the engine tightly.
        self.forward_pass = ReferenceForward(arch_module, cfg, weights, Dequantizer(weight_cache_bytes, act_quant))
        self.cache = self._new_cache()
        self.slot_caches = {0: self.cache}   # further slots' caches, made on first use

    def forward_batch(self, ids, pos, slot, logit_rows=None) -> np.ndarray:
        """EngineBackend.forward_batch's semantics, one slot after the other: each slot's
        tokens must be consecutive positions starting at or before what the slot holds."""
        ids, pos, slot = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (ids, pos, slot))
        if not (len(ids) == len(pos) == len(slot)) or len(ids) == 0:
            raise MoeNumaError("forward_batch needs ids, pos and slot of one length >= 1")
        hidden = np.empty((len(ids), self.cfg.hidden), dtype=np.float32)
        for s in np.unique(slot):
            if not 0 <= s < self.n_slots:
                raise MoeNumaError(f"slot {s} outside 0..{self.n_slots - 1}")
            rows = np.flatnonzero(slot == s)
            cache = self.slot_caches.get(int(s)) or self.slot_caches.setdefault(
                int(s), self._new_cache())
            p0 = int(pos[rows[0]])
            if not (np.diff(pos[rows]) == 1).all() or p0 > cache.n_past:
                raise MoeNumaError(f"slot {s}: positions must run on from at most {cache.n_past}, got "
                                   f"{pos[rows].tolist()}")
            cache.n_past = p0   # positions before p0 are already filled
            hidden[rows] = self.forward_pass.hidden_states(ids[rows], cache)
        want = np.arange(len(ids)) if logit_rows is None else np.asarray(logit_rows, dtype=np.int64)
        return self.forward_pass.logits(hidden[want])

    def _new_cache(self):
        return self.forward_pass.new_cache(self.n_ctx, self.cache_type_k, self.cache_type_v)

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    def reset(self) -> None:
        self.cache.reset()

    def forward(self, ids: np.ndarray, all_logits: bool = True) -> np.ndarray:
        hidden = self.forward_pass.hidden_states(ids, self.cache)
        if not all_logits:
            hidden = hidden[-1:]
        return self.forward_pass.logits(hidden)

    def close(self) -> None:
        pass


class Model:
    """A loaded GGUF model. Create it with `moe_numa.load()`."""

    def __init__(self, path: str | os.PathLike[str], backend: str = DEFAULT_BACKEND, n_ctx: int | None = None,
                 router_group_rule: str | None = None, check_tensors: bool = False, **backend_options: Any):
        if backend not in BACKENDS:
            raise ArgumentError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, numbers.Integral)
                                  or not 1 <= n_ctx <= MAX_CTX):
            raise ArgumentError(f"n_ctx must be an integer in 1..{MAX_CTX}, got {n_ctx!r}")
        self.path = str(path)
        self._closed = True     # until the backend exists: close() and __del__ have nothing to do
        t0 = time.perf_counter()
        self.gguf = GGUFModelFile(path)
        # The tokenizer (~1 s for a 150k vocabulary: Python loops and the tokenizers build) is
        # built on a thread while the model is read and the backend places the weights (whose
        # copies and madvise calls release the GIL). Errors keep their order: the file's, the
        # tokenizer's, the backend's.
        tok: dict[str, Any] = {}
        tok_thread = threading.Thread(target=_build_tokenizer, args=(self.gguf.metadata, tok),
                                      name="moe-numa-tokenizer", daemon=True)
        tok_thread.start()
        try:
            self._read_model(backend, check_tensors, router_group_rule, backend_options)
        except BaseException:   # the file's errors came before the tokenizer's, and still do
            tok_thread.join()
            raise
        t1 = time.perf_counter()
        self.n_ctx = int(n_ctx or max(1, min(self.config.n_ctx_train, DEFAULT_CTX)))
        self.chat_template = self.gguf.get("tokenizer.chat_template")
        self.last_stats: GenerationStats | None = None
        try:
            if backend == "reference":
                self.backend = ReferenceBackend(self.arch_module, self.config, self.weights, self.n_ctx,
                                                **backend_options)
            else:
                from .engine import EngineBackend
                self.backend = EngineBackend(self, **backend_options)
        except MemoryError as e:
            tok_thread.join()
            if "error" in tok:
                raise tok["error"]
            raise ArgumentError(f"{self.path}: not enough memory for this model with n_ctx={self.n_ctx} "
                                f"({e or 'allocation failed'})") from None
        except BaseException:
            tok_thread.join()
            if "error" in tok:
                raise tok["error"] from None
            raise
        t2 = time.perf_counter()
        tok_thread.join()
        if "error" in tok:
            self.backend.close()
            raise tok["error"]
        self.tokenizer = tok["tokenizer"]
        # Seconds per phase of this load (bench-load prints them); the tokenizer's ran alongside the backend's.
        self.load_phases = {"file_and_model_s": t1 - t0, "tokenizer_s": tok["seconds"], "backend_s": t2 - t1,
                            "total_s": time.perf_counter() - t0}
        self._closed = False

    def _read_model(self, backend: str, check_tensors: bool, router_group_rule, backend_options: dict) -> None:
        check_supported_types(self.gguf, backend)
        if check_tensors:
            if backend == "reference":
                for t in self.gguf:
                    check_tensor_blocks(t)
            else:   # the engine checks each shard as it copies it into node memory
                backend_options["check_tensors"] = True
        overrides = {"group_rule": router_group_rule} if router_group_rule else {}
        self.arch_module, self.config, self.weights = load_model(self.gguf, **overrides)

    # -- text ---------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self._token_text(self.tokenizer.bos_id),
                           eos_token=self._token_text(self.tokenizer.eos_id))

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.tokenizer.id_to_token(token_id)

    def prompt_ids(self, prompt: str | list[dict] | Sequence[int]) -> list[int]:
        """Token ids of a text prompt, a chat (list of messages) or ids as given."""
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            text = self.apply_chat_template(prompt)
            # The template usually writes BOS itself; don't add a second one.
            bos = self._token_text(self.tokenizer.bos_id)
            return self.tokenize(text, add_special=not (bos and text.startswith(bos)))
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            raise ArgumentError("token ids must be integers")
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.n_vocab]
        if bad:
            raise ArgumentError(f"token id(s) out of range 0..{self.config.n_vocab - 1}: {bad[:5]}")
        return ids

    # -- compute ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.path}: the model is closed")

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits after every position, from an empty cache: [n, n_vocab] float32."""
        self._check_open()
        ids = self.prompt_ids(list(token_ids))
        if not ids:
            raise ArgumentError("logits() needs at least one token")
        self._check_fits(len(ids))
        self.backend.reset()
        return np.asarray(self.backend.forward(np.asarray(ids, dtype=np.int32), all_logits=True),
                          dtype=np.float32)

    def generate(self, prompt: str | list[dict] | Sequence[int], max_tokens: int = 128,
                 temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 repeat_penalty: float = 1.0, repeat_last_n: int = 64, seed: int | None = None,
                 stop: Sequence[str] = (), stream: bool = False) -> str | Iterator[str]:
        """Generate text. With `stream=True`, an iterator of text pieces."""
        self._check_open()
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
            raise ArgumentError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        ids = self.prompt_ids(prompt)
        if not ids:
            raise ArgumentError("the prompt is empty")
        self._check_fits(len(ids))
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
        self.last_stats = GenerationStats()
        pieces = generate_stream(self.backend, self.tokenizer, ids, max_tokens, params,
                                 stop=list(stop), stats=self.last_stats)
        return pieces if stream else "".join(pieces)

    def _check_fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {n} tokens but the context holds {self.n_ctx} "
                                       f"(raise n_ctx, up to the model's {self.config.n_ctx_train})")

    def placement_report(self) -> dict:
        self._check_open()
        report = getattr(self.backend, "placement_report", None)
        if report is None:
            raise MoeNumaError("placement_report() needs the engine backend")
        return report()

    def wait_placed(self, timeout: float | None = None) -> bool:
        """Wait for the weights to be in node memory: on one node, load() maps a large file
        and returns at once while a background thread copies it into hugepage memory (see
        docs/numa-tuning.md, "Load"). True when that is done (or there was none to do)."""
        self._check_open()
        wait = getattr(self.backend, "wait_placed", None)
        return True if wait is None else wait(timeout)

    def rebalance(self, **options) -> dict:
        """Move hot experts between nodes to even out routed tokens (engine only)."""
        self._check_open()
        rebalance = getattr(self.backend, "rebalance", None)
        if rebalance is None:
            raise MoeNumaError("rebalance() needs the engine backend")
        return rebalance(**options)

    def close(self) -> None:
        """Release the backend (pools, node memory) and the file maps. Idempotent:
        afterwards logits()/generate() raise ClosedError."""
        if self._closed:
            return
        self._closed = True
        self.backend.close()
        self.gguf.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _build_tokenizer(metadata, out: dict) -> None:
    t0 = time.perf_counter()
    try:
        out["tokenizer"] = GGUFTokenizer.from_metadata(metadata)
    except BaseException as e:   # handed to the loading thread, which raises it
        out["error"] = e
    out["seconds"] = time.perf_counter() - t0


def load(path: str | os.PathLike[str], backend: str = DEFAULT_BACKEND, **options: Any) -> Model:
    """Load a GGUF model (the first file of a split set). `backend` is "engine"
    (the NUMA engine) or "reference" (the numpy oracle)."""
    return Model(path, backend=backend, **options)
