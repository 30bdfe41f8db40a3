"""Continuous batching for the server: one engine thread owns the model and runs
the step loop; requests wait in a bounded queue and are given KV-cache slots.

Each step forwards, in ONE engine call (EngineBackend.forward_batch), the next
token of every decoding sequence plus up to `prefill_chunk` prompt tokens of
sequences still prefilling, so a long prompt never stalls the running streams
for more than one chunk. Then every sequence whose last token was in the step
samples its next token (its own Sampler, penalties over its own history).

Prompt caching: a slot keeps the tokens of its last sequence after it ends. A
new request takes the free slot whose cached tokens share the longest prefix
with its prompt and prefills only the rest (the next turn of a chat).

The engine is not thread-safe: only the engine thread touches the model. Other
threads talk to it through `submit()`, `GenRequest.cancel()` and `status()`;
results come back through each request's `on_event` callback (called from the
engine thread)."""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import MoeNumaError, QueueFullError
from .generate import _StopFilter
from .sampling import Sampler, SamplingParams

log = logging.getLogger("moe_numa.scheduler")

_ids = itertools.count(1)


@dataclass
class GenRequest:
    """One generation. `on_event(kind, data)` receives ("text", str) pieces, then
    exactly one ("done", {...usage, finish_reason}) or ("error", message)."""
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    on_event: Callable[[str, Any], None]
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Ask the engine thread to drop this request; its slot is free after the current step."""
        self.cancelled = True


@dataclass
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)   # tokens whose K/V the slot holds, by position
    seq: "_Seq | None" = None
    last_used: int = 0


class _Seq:
    def __init__(self, req: GenRequest, slot: _Slot, reuse: int, tokenizer):
        self.req, self.slot = req, slot
        self.n_past = reuse                        # positions of the slot valid for this sequence
        self.cached = reuse
        self.pending = list(req.prompt_ids[reuse:])  # tokens still to feed
        self.history = list(req.prompt_ids)
        self.generated = 0
        self.sampler = Sampler(req.params)
        self.decoder = tokenizer.stream_decoder()
        self.stop_filter = _StopFilter(req.stop)
        slot.tokens = slot.tokens[:reuse]


class Scheduler:
    """The step loop over a loaded model's EngineBackend (with n_slots slots)."""

    def __init__(self, model, max_queue: int = 64, prefill_chunk: int = 256):
        backend = model.backend
        if not hasattr(backend, "forward_batch"):
            raise MoeNumaError(f"the {backend.name} backend has no batched step (forward_batch)")
        self.model, self.backend, self.tokenizer = model, backend, model.tokenizer
        self.n_ctx = backend.n_ctx
        self.slots = [_Slot(i) for i in range(backend.n_slots)]
        self.max_queue = int(max_queue)
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.waiting: list[GenRequest] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.tokens_generated = 0
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- other threads
    def submit(self, req: GenRequest) -> None:
        """Queue a request; QueueFullError when every slot is busy and the queue is full."""
        if len(req.prompt_ids) == 0:
            raise MoeNumaError("the prompt is empty")
        if len(req.prompt_ids) >= self.n_ctx:
            raise MoeNumaError(f"the prompt has {len(req.prompt_ids)} tokens but a sequence's context holds "
                               f"{self.n_ctx} (start the server with a larger --ctx-size)")
        with self.cond:
            if self.stopping:
                raise QueueFullError("the server is shutting down")
            self.waiting = [r for r in self.waiting if not r.cancelled]   # clients that gave up waiting
            free = sum(s.seq is None for s in self.slots)
            if len(self.waiting) >= free + self.max_queue:
                raise QueueFullError(f"all {len(self.slots)} slots are busy and the queue of {self.max_queue} "
                                     "requests is full; retry later")
            self.waiting.append(req)
            self.cond.notify()

    def status(self) -> dict:
        with self.cond:
            busy = sum(s.seq is not None for s in self.slots)
            return {"total": len(self.slots), "busy": busy, "free": len(self.slots) - busy,
                    "queued": len(self.waiting), "steps": self.steps, "tokens_generated": self.tokens_generated}

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="moe-numa-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop; requests still in flight end with an error event."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---------------------------------------------------------------- engine thread
    def run(self) -> None:
        """The loop (call on the thread that loaded the model: node 0's pool runs on it)."""
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and all(s.seq is None for s in self.slots):
                    self.cond.wait(0.5)
                if self.stopping:
                    break
            try:
                self.step()
            except Exception as e:   # never let one bad step kill the server: fail the batch, go on
                log.exception("engine step failed")
                for s in self.slots:
                    if s.seq is not None:
                        self._finish(s.seq, error=f"internal error in the engine step: {e}")
                        s.tokens = []
        with self.cond:
            waiting, self.waiting = self.waiting, []
        for req in waiting:
            _emit(req, "error", "the server is shutting down")
        for s in self.slots:
            if s.seq is not None:
                self._finish(s.seq, error="the server is shutting down")

    def step(self) -> bool:
        """One batched forward over every active sequence; False if there was nothing to do."""
        for s in self.slots:
            if s.seq is not None and s.seq.req.cancelled:
                self._finish(s.seq, reason=None)
        self._admit()
        ids, pos, slot, rows, owners = [], [], [], [], []
        budget = self.prefill_chunk
        active = [s.seq for s in self.slots if s.seq is not None]
        # decoding sequences first (one token each), then prompt chunks in arrival order
        active.sort(key=lambda q: (len(q.pending) > 1, q.req.submitted))
        for q in active:
            if len(q.pending) == 1:
                take = 1
            else:
                take = min(len(q.pending), budget)
                if take == 0:
                    continue
                budget -= take
            feed, q.pending = q.pending[:take], q.pending[take:]
            ids += feed
            pos += range(q.n_past, q.n_past + take)
            slot += [q.slot.index] * take
            q.slot.tokens[q.n_past:] = feed
            q.n_past += take
            if not q.pending:            # its last known token is in: it samples after this step
                rows.append(len(ids) - 1)
                owners.append(q)
        if not ids:
            return False
        logits = self.backend.forward_batch(ids, pos, slot, logit_rows=rows)
        self.steps += 1
        for q, lg in zip(owners, logits):
            try:
                self._advance(q, lg)
            except Exception as e:   # one sequence's failure (its sampler) ends it, not the batch
                log.exception("sampling failed for request %d", q.req.id)
                self._finish(q, error=f"sampling failed: {e}")
        return True

    def _admit(self) -> None:
        with self.cond:
            while self.waiting:
                free = [s for s in self.slots if s.seq is None]
                if not free:
                    return
                req = self.waiting.pop(0)
                if req.cancelled:
                    continue
                best, reuse = None, -1
                for s in free:   # longest cached prefix, then least recently used
                    n = _common_prefix(s.tokens, req.prompt_ids)
                    if n > reuse or (n == reuse and s.last_used < best.last_used):
                        best, reuse = s, n
                reuse = min(reuse, len(req.prompt_ids) - 1)   # the last prompt token must run: its logits
                try:
                    best.seq = _Seq(req, best, reuse, self.tokenizer)
                except Exception as e:   # a request the sampler refuses fails alone
                    _emit(req, "error", f"bad sampling parameters: {e}")
                    continue
                best.last_used = self.steps + 1

    def _advance(self, q: _Seq, logits: np.ndarray) -> None:
        token = q.sampler(logits, q.history)
        if token in self.tokenizer.stop_ids and not q.req.ignore_eos:
            return self._finish(q, "stop")
        q.generated += 1
        self.tokens_generated += 1
        q.history.append(token)
        piece = q.stop_filter.feed(q.decoder.push(token))
        if piece:
            _emit(q.req, "text", piece)
        if q.stop_filter.stopped:
            return self._finish(q, "stop")
        if q.generated >= q.req.max_tokens or q.n_past + 1 >= self.n_ctx:
            return self._finish(q, "length")
        q.pending = [token]

    def _finish(self, q: _Seq, reason: str | None = None, error: str | None = None) -> None:
        slot = q.slot
        slot.seq = None
        slot.last_used = self.steps
        del slot.tokens[q.n_past:]
        with self.cond:
            self.cond.notify_all()
        if reason is None and error is None:   # cancelled: nobody listens
            return
        if error is not None:
            return _emit(q.req, "error", error)
        if not q.stop_filter.stopped:
            tail = q.stop_filter.feed(q.decoder.flush())
            tail += "" if q.stop_filter.stopped else q.stop_filter.flush()
            if tail:
                _emit(q.req, "text", tail)
        _emit(q.req, "done", {"finish_reason": reason, "prompt_tokens": len(q.req.prompt_ids),
                              "completion_tokens": q.generated, "cached_tokens": q.cached})


def _emit(req: GenRequest, kind: str, data) -> None:
    try:
        req.on_event(kind, data)
    except Exception:   # the listener is gone (event loop closed): treat as cancelled
        req.cancelled = True


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n]) != np.asarray(b[:n])
    i = np.flatnonzero(x)
    return int(i[0]) if len(i) else n
