"""The server's step loop (moe_numa.scheduler), driven step by step on the
default model: one engine call per step carries every running stream's next
token plus at most --prefill-chunk prompt tokens; a new request reuses the free
slot with the longest cached prefix; a cancelled request frees its slot at the
next step; outputs equal the one-shot API's."""
from __future__ import annotations

import time

import numpy as np
import pytest

import moe_numa
from moe_numa.default_model import default_model_path
from moe_numa.errors import MoeNumaError, QueueFullError
from moe_numa.sampling import SamplingParams
from moe_numa.scheduler import GenRequest, Scheduler

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model():
    with moe_numa.load(default_model_path(), n_slots=3, n_ctx=512) as m:
        yield m


class Recorder:
    def __init__(self):
        self.text, self.done, self.error = [], None, None

    def __call__(self, kind, data):
        if kind == "text":
            self.text.append(data)
        elif kind == "done":
            self.done = data
        else:
            self.error = data


def _request(ids, n, **kw):
    rec = Recorder()
    return GenRequest(list(ids), n, kw.pop("params", GREEDY), rec, **kw), rec


def _spy(sched):
    calls = []
    real = sched.backend.forward_batch

    def spy(ids, pos, slot, logit_rows=None):
        calls.append((list(ids), list(pos), list(slot)))
        return real(ids, pos, slot, logit_rows=logit_rows)
    sched.backend.forward_batch = spy
    return calls


def _drain(sched, limit=2000):
    for _ in range(limit):
        if not sched.step():
            return
    raise AssertionError("the scheduler did not go idle")


def test_long_prompt_is_chunked_between_decode_steps(model):
    sched = Scheduler(model, prefill_chunk=16)
    calls = _spy(sched)
    try:
        short, rs = _request(model.tokenize("Hello"), 30)
        sched.submit(short)
        sched.step()
        sched.step()                                      # short is decoding now
        long_ids = model.tokenize("word " * 100)
        big, rb = _request(long_ids, 5)
        sched.submit(big)
        n0 = len(calls)
        _drain(sched)
        prefill_steps = [c for c in calls[n0:] if c[2].count(1) > 1]
        assert len(prefill_steps) >= len(long_ids) // 16
        for ids, pos, slot in calls[n0:]:
            assert slot.count(1) <= 16                        # at most one chunk of the prompt per step
        # the short stream (slot 0, 30 tokens) advanced in every step of the long prompt's prefill
        assert len(prefill_steps) < 28 and all(0 in slot for _, _, slot in prefill_steps)
        assert rs.done["completion_tokens"] == 30 and rb.done["completion_tokens"] == 5
        assert "".join(rs.text) == model.generate("Hello", max_tokens=30, temperature=0)
        assert "".join(rb.text) == model.generate(long_ids, max_tokens=5, temperature=0)
    finally:
        del sched.backend.forward_batch          # the spy (a cycle through the backend) goes


def test_prefix_reuse_picks_the_right_slot_and_keeps_results(model):
    sched = Scheduler(model)
    a_ids, b_ids = model.tokenize("The cat sat on the mat and"), model.tokenize("Dogs bark at night when")
    ra_req, ra = _request(a_ids, 6)
    rb_req, rb = _request(b_ids, 6)
    sched.submit(ra_req)
    sched.submit(rb_req)
    _drain(sched)
    b_slot = [s.index for s in sched.slots if s.tokens[:len(b_ids)] == b_ids]
    assert len(b_slot) == 1
    follow = b_ids + model.tokenize(" and then", add_special=False)
    rc_req, rc = _request(follow, 6)
    calls = _spy(sched)
    try:
        sched.submit(rc_req)
        _drain(sched)
    finally:
        del sched.backend.forward_batch          # the spy (a cycle through the backend) goes
    assert rc.done["cached_tokens"] >= len(b_ids)
    first_ids, first_pos, first_slot = calls[0]
    assert first_pos[0] == rc.done["cached_tokens"]       # only the new part was prefilled
    assert set(first_slot) == set(b_slot)                 # the slot that holds b's tokens
    assert "".join(rc.text) == model.generate(follow, max_tokens=6, temperature=0)


def test_cancel_frees_the_slot_at_the_next_step(model):
    sched = Scheduler(model)
    req, rec = _request(model.tokenize("Go"), 400, ignore_eos=True)
    sched.submit(req)
    for _ in range(3):
        sched.step()
    assert sched.status()["busy"] == 1
    req.cancel()
    sched.step()
    assert sched.status()["busy"] == 0 and rec.done is None and rec.error is None


def test_queue_bounds_and_bad_prompts(model):
    sched = Scheduler(model, max_queue=1)
    reqs = [_request([1, 2, 3], 4)[0] for _ in range(4)]   # 3 free slots + a queue of 1
    for r in reqs:
        sched.submit(r)
    with pytest.raises(QueueFullError, match="queue"):
        sched.submit(_request([1, 2, 3], 4)[0])
    reqs[0].cancel()                                        # a client that gave up frees its place
    sched.submit(_request([1, 2, 3], 4)[0])
    with pytest.raises(MoeNumaError, match="empty"):
        sched.submit(_request([], 4)[0])
    with pytest.raises(MoeNumaError, match="context"):
        sched.submit(_request(np.ones(512, dtype=int), 4)[0])
    _drain(sched)
    assert sched.status()["busy"] == 0


def test_stop_ends_requests_in_flight_with_an_error(model):
    sched = Scheduler(model)
    req, rec = _request(model.tokenize("Go"), 400, ignore_eos=True)
    sched.submit(req)
    sched.start()

    deadline = time.time() + 20
    while not rec.text and time.time() < deadline:
        time.sleep(0.01)
    sched.stop(timeout=20)
    assert rec.error == "the server is shutting down" and rec.done is None
