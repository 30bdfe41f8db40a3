"""The generation loop: prefill the prompt, then decode token by token until
EOS, a stop string, `max_tokens` or the end of the context. Streams text pieces
that are complete UTF-8 and never part of a stop string."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""            # "stop" (EOS or stop string), "length" or "context"
    token_ids: list[int] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # The first generated token comes from the prefill; decode time covers the rest.
        n = self.generated_tokens - 1
        return n / self.decode_seconds if self.decode_seconds and n > 0 else 0.0


class _StopFilter:
    """Holds back text that might be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending, self.stopped = self.pending[:i], "", True
                return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate_stream(backend, tokenizer, prompt_ids: Sequence[int], max_tokens: int,
                    params: SamplingParams, stop: Sequence[str] = (), stats: GenerationStats | None = None,
                    ) -> Iterator[str]:
    """Yield text pieces. `backend` has reset(), n_ctx and forward(ids, all_logits)."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    sampler = Sampler(params)
    decoder = tokenizer.stream_decoder()
    stop_filter = _StopFilter(stop)
    history = list(prompt_ids)
    backend.reset()
    t0 = time.perf_counter()
    logits = backend.forward(np.asarray(prompt_ids, dtype=np.int32), all_logits=False)[-1]
    stats.prompt_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    stop_ids = tokenizer.stop_ids
    n_ctx = backend.n_ctx
    while True:
        token = sampler(logits, history)
        if token in stop_ids:
            stats.finish_reason = "stop"
            break
        stats.generated_tokens += 1
        stats.token_ids.append(token)
        history.append(token)
        piece = stop_filter.feed(decoder.push(token))
        if piece:
            yield piece
        if stop_filter.stopped:
            stats.finish_reason = "stop"
            break
        if stats.generated_tokens >= max_tokens:
            stats.finish_reason = "length"
            break
        if len(history) >= n_ctx:
            stats.finish_reason = "context"
            break
        logits = backend.forward(np.asarray([token], dtype=np.int32), all_logits=False)[-1]
    stats.decode_seconds = time.perf_counter() - t1
    if not stop_filter.stopped:
        tail = stop_filter.feed(decoder.flush())
        tail += "" if stop_filter.stopped else stop_filter.flush()
        if tail:
            yield tail
