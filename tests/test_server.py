"""`moe-numa serve` end to end: the server runs the default model in a
subprocess on a free loopback port (two virtual nodes, 8 slots), and the real
`openai` client talks to it. Greedy outputs are checked against the one-shot
API (moe_numa.load(...).generate), alone and among 8 concurrent streams;
bad requests get OpenAI-style errors naming the field; a client that goes
away frees its slot; SIGTERM exits 0."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

import moe_numa
from moe_numa.default_model import default_model_path

ROOT = Path(__file__).resolve().parent.parent
CTX = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")   # a file, not a pipe: a chatty server never blocks on it
        self.proc = subprocess.Popen([sys.executable, "-m", "moe_numa.cli", "serve", "--port", str(self.port),
                                      "--log-level", "warning", *flags], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.log.read()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and r.json()["status"] == "loading"
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.model_id = self.client.models.list().data[0].id

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout=20.0) -> dict:
        deadline = time.time() + timeout
        while True:
            h = self.health()
            if h["slots"]["busy"] == 0 and h["slots"]["queued"] == 0:
                return h
            assert time.time() < deadline, f"slots still busy: {h}"
            time.sleep(0.05)

    def terminate(self, timeout=60, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


@pytest.fixture(scope="module")
def server():
    s = Server("--parallel", "8", "-c", str(CTX), "--numa-nodes", "2")
    yield s
    assert s.terminate() == 0


@pytest.fixture(scope="module")
def local():
    """The one-shot API on the same file: the single-stream oracle."""
    with moe_numa.load(default_model_path(), n_ctx=CTX) as m:
        yield m


def _chat(text):
    return [{"role": "user", "content": text}]


PROMPTS = ["Hello", "Tell me about NUMA.", "What is a mixture of experts?", "1 2 3 4 5 6 7 8",
           "The quick brown fox jumps over the lazy dog. " * 3, "Bonjour", "x", "Explain KV caches in detail"]


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.model_id] == [Path(default_model_path()).name]
    h = server.health()
    assert h["status"] == "ready" and h["n_ctx"] == CTX and h["kv_cache_bytes"] > 0
    assert h["slots"]["total"] == 8 and h["slots"]["free"] + h["slots"]["busy"] == 8
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])


def test_chat_non_streaming_and_streaming_match_the_api(server, local):
    want = local.generate(_chat("Hello"), max_tokens=12, temperature=0)
    r = server.client.chat.completions.create(model=server.model_id, messages=_chat("Hello"), max_tokens=12,
                                              temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == local.last_stats.finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == local.last_stats.prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12

    chunks = list(server.client.chat.completions.create(
        model=server.model_id, messages=_chat("Hello"), max_completion_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_stop_strings_and_seeded_sampling(server, local):
    want = local.generate("Once upon a time", max_tokens=10, temperature=0)
    r = server.client.completions.create(model=server.model_id, prompt="Once upon a time", max_tokens=10,
                                         temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in server.client.completions.create(
        model=server.model_id, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True))
    assert streamed == want
    # a stop string cut out of the greedy text: output ends right before it, finish_reason stop
    stop = want[len(want) // 2:len(want) // 2 + 3]
    cut = server.client.completions.create(model=server.model_id, prompt="Once upon a time", max_tokens=10,
                                           temperature=0, stop=[stop])
    assert cut.choices[0].text == want[:want.index(stop)] and cut.choices[0].finish_reason == "stop"
    # seeded sampling is reproducible and matches the API's sampler with the same parameters
    kw = dict(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, min_p=0.0, seed=7)
    a = server.client.completions.create(model=server.model_id, prompt="Once", extra_body={"top_k": 20,
                                         "min_p": 0.0}, max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    assert a.choices[0].text == local.generate("Once", **kw)


def test_eight_concurrent_streams_equal_single_streams(server, local):
    alone = [local.generate(_chat(p), max_tokens=20, temperature=0) for p in PROMPTS]
    before = server.wait_idle()

    def run(p):
        s = server.client.chat.completions.create(model=server.model_id, messages=_chat(p), max_tokens=20,
                                                  temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(run, PROMPTS))
    assert together == alone
    after = server.wait_idle()
    tokens = after["slots"]["tokens_generated"] - before["slots"]["tokens_generated"]
    steps = after["slots"]["steps"] - before["slots"]["steps"]
    assert tokens == 8 * 20
    assert steps < tokens / 2, f"{steps} steps for {tokens} tokens: the streams were not batched"


def test_next_chat_turn_reuses_the_cached_prefix(server, local):
    server.wait_idle()
    first = _chat("Tell me a story about a dragon")
    r1 = server.client.chat.completions.create(model=server.model_id, messages=first, max_tokens=8, temperature=0)
    turn2 = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    r2 = server.client.chat.completions.create(model=server.model_id, messages=turn2, max_tokens=8, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1
    assert r2.choices[0].message.content == local.generate(turn2, max_tokens=8, temperature=0)


def test_disconnecting_client_frees_its_slot(server):
    before = server.wait_idle()
    body = {"messages": _chat("Go on forever"), "max_tokens": CTX, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break
        assert server.health()["slots"]["busy"] == 1
    after = server.wait_idle(timeout=10)
    assert after["slots"]["tokens_generated"] - before["slots"]["tokens_generated"] < CTX // 2


def _post(server, path, content, headers=None):
    return httpx.post(server.url + path, content=content, timeout=30,
                      headers=headers or {"content-type": "application/json"})


BAD = [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}', "body"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "max_tokens": 1.5}, "max_tokens"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "max_completion_tokens": -1}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "top_k": -1}, "top_k"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "min_p": 1.5}, "min_p"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "frequency_penalty": 9}, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "presence_penalty": "x"}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "seed": "1"}, "seed"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "seed": -1}, "seed"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "stop": 3}, "stop"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": _chat("hi"), "model": "gpt-4"}, "model"),
    ("/v1/chat/completions", {"messages": _chat("word " * CTX)}, "messages"),
    ("/v1/completions", {"prompt": "word " * CTX}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 9]}, "prompt"),
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", b"[1, 2]", "body"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_400_naming_the_field(server, path, body, param):
    r = _post(server, path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param in err["message"] or param == "body"


def test_bad_request_through_the_openai_client(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="no-such-model", messages=_chat("hi"))
    assert e.value.body["param"] == "model"


def test_full_queue_gets_429_and_sigterm_exits_0():
    s = Server("--parallel", "1", "--queue", "1", "-c", "4096", "--shutdown-timeout", "2")
    try:   # 4000 tokens keep the one slot busy for the rest of the test
        body = {"prompt": "a", "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}
        first = httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60)
        r1 = first.__enter__()
        lines1 = r1.iter_lines()                    # (kept: a dropped iterator closes the stream)
        next(lines1)                                # slot taken, decoding
        held = httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60)
        r2 = held.__enter__()                       # waits in the queue
        assert r2.status_code == 200
        deadline = time.time() + 10
        while s.health()["slots"]["queued"] < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError):
            s.client.completions.create(model=s.model_id, prompt="b", max_tokens=2)
        # SIGTERM with two streams in flight: they end (finished or cancelled), the process exits 0
        results = {}

        def drain(name, lines):
            try:
                results[name] = [line for line in lines if line]
            except httpx.HTTPError as e:
                results[name] = e
        threads = [threading.Thread(target=drain, args=(n, it))
                   for n, it in (("first", lines1), ("held", r2.iter_lines()))]
        for t in threads:
            t.start()
        assert s.terminate(timeout=60) == 0
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        # each stream ended cleanly: finished, or cut by the shutdown (an error event), then [DONE]
        for name in ("first", "held"):
            assert not isinstance(results[name], Exception), results[name]
            assert results[name][-1] == "data: [DONE]"
        first.__exit__(None, None, None)
        held.__exit__(None, None, None)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_reference_backend_serves_too():
    s = Server("--backend", "reference", "--parallel", "2", "-c", "128")
    try:
        with moe_numa.load(default_model_path(), backend="reference", n_ctx=128) as ref:
            want = [ref.generate(p, max_tokens=6, temperature=0) for p in ("Hello", "Bonjour")]
        with ThreadPoolExecutor(2) as ex:
            got = list(ex.map(lambda p: s.client.completions.create(model=s.model_id, prompt=p, max_tokens=6,
                                                                    temperature=0).choices[0].text,
                              ["Hello", "Bonjour"]))
        assert got == want
    finally:
        assert s.terminate(sig=signal.SIGINT) == 0         # Ctrl-C ends as cleanly as SIGTERM


def test_bad_command_lines_fail_before_serving(tmp_path):
    def run(*flags):
        return subprocess.run([sys.executable, "-m", "moe_numa.cli", "serve", "--port", str(_free_port()), *flags],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    r = run("-m", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and "missing.gguf" in r.stderr
    r = run("--parallel", "0")
    assert r.returncode == 2 and "--parallel" in r.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)       # the loader refuses it on the engine thread: exit 1
    r = run("-m", str(bad))
    assert r.returncode == 1 and "bad.gguf" in r.stderr


def test_health_reports_loading_progress():
    from fastapi.testclient import TestClient
    from moe_numa.sampling import SamplingParams
    from moe_numa.server import ServerState, create_app
    state = ServerState("x.gguf", "x", {}, 2, 4, 64, SamplingParams())   # not started: still "loading"
    state.progress = {"done_bytes": 3 << 20, "total_bytes": 12 << 20}
    with TestClient(create_app(state)) as c:
        r = c.get("/health")
        assert r.status_code == 503
        assert r.json()["status"] == "loading" and r.json()["loading"]["fraction"] == 0.25
        r = c.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]


def test_health_reports_the_copy_behind_the_mapped_start(make_model):
    """On one node a large file is served from its mapping while it is copied into node
    memory: /health says how far that copy is."""
    from fastapi.testclient import TestClient
    from moe_numa.sampling import SamplingParams
    from moe_numa.server import ServerState, create_app
    path = make_model("qwen3moe", "q8_0")
    state = ServerState(path, "x", {"backend": "engine", "numa_nodes": 1, "zero_copy": "behind"}, 2, 4, 64,
                        SamplingParams())
    state.start()
    try:
        deadline = time.time() + 60
        while state.status == "loading":
            assert time.time() < deadline
            time.sleep(0.02)
        assert state.status == "ready", state.error
        assert state.model.wait_placed(timeout=60)
        with TestClient(create_app(state)) as c:
            h = c.get("/health").json()
        p = h["placement"]
        assert p["finished"] and p["error"] is None and p["done_bytes"] == p["bytes"] > 0
    finally:
        state.stop()
