"""`moe-numa serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over
the NUMA engine, with concurrent requests batched by moe_numa.scheduler.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming as
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`),
GET /v1/models, GET /health (loading progress while the weights are placed,
then slots busy/free), and the OpenAPI spec at /openapi.json.

The model is loaded on the engine thread after the HTTP socket is up, so
/health answers (503, with progress) during the load. Every error is an
OpenAI-style object {"error": {"message", "type", "param", "code"}}: 400 for a
bad request (param names the field), 429 when every slot is busy and the queue
is full, 503 while loading or shutting down. SIGTERM/SIGINT: stop accepting,
let the streams in flight finish (up to --shutdown-timeout seconds, then cancel
them), exit 0."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ChatTemplateError, MoeNumaError, QueueFullError
from .sampling import SamplingParams
from .scheduler import GenRequest, Scheduler

log = logging.getLogger("moe_numa.server")


# ---------------------------------------------------------------- request schema
class _Strict(BaseModel):
    # Known fields are type-checked strictly ("5" is not a number); unknown fields are
    # ignored, as OpenAI clients send extras (user, logprobs, ...) we have no use for.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class _Sampling(_Strict):
    model: str | None = Field(None, description="must be the served model's id (GET /v1/models) if given")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0: off")
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings")
    ignore_eos: bool = Field(False, description="keep generating past end-of-generation tokens (benchmarks)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 choice per request")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(description="text, or token ids")
    max_tokens: int | None = Field(16, ge=1)


# ---------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                              503: "unavailable_error"}.get(status, "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse(_error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def _error_body(message, type_, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _loc_name(loc) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic puts the union member tried into the path ("stop.str", "content.list[...]"): drop it
    parts = [p for p in parts if not p.startswith(("list[", "dict[")) and p not in ("str", "int", "float", "bool")]
    return ".".join(parts) or None


# ---------------------------------------------------------------- state
class ServerState:
    """What the HTTP handlers share with the engine thread."""

    def __init__(self, model_path: str, model_id: str, load_options: dict, parallel: int, max_queue: int,
                 prefill_chunk: int, defaults: SamplingParams):
        self.model_path, self.model_id = model_path, model_id
        self.load_options, self.parallel = load_options, parallel
        self.max_queue, self.prefill_chunk, self.defaults = max_queue, prefill_chunk, defaults
        self.status = "loading"            # loading | ready | failed | stopping
        self.progress = {"done_bytes": 0, "total_bytes": 0}
        self.error: str | None = None
        self.model = None
        self.scheduler: Scheduler | None = None
        self.created = int(time.time())
        self.stopping = False
        self.kv_cache_bytes: int | None = None
        self.on_failure = lambda: None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._engine_thread, name="moe-numa-engine", daemon=True)
        self.thread.start()

    def _engine_thread(self) -> None:
        # The engine pins the thread that loads it as node 0's worker 0 and must run on it,
        # so this thread loads the model and then runs the step loop.
        from . import load

        def progress(done, total):
            self.progress = {"done_bytes": int(done), "total_bytes": int(total)}
        try:
            opts = dict(self.load_options)
            if opts.get("backend", "engine") == "engine":
                opts["progress"] = progress
            model = load(self.model_path, n_slots=self.parallel, **opts)
            self.model = model
            self.scheduler = Scheduler(model, max_queue=self.max_queue, prefill_chunk=self.prefill_chunk)
            if model.backend.name == "engine":
                kv = self.kv_cache_bytes = model.placement_report()["kv_cache_bytes"]
                log.info("KV cache: %d tokens per sequence x %d slots = %.1f MiB", model.n_ctx, self.parallel,
                         kv / 2**20)
            if self.stopping:   # a signal came while the weights were being placed
                model.close()
                return
            self.status = "ready"
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self.status = "failed"
            log.error("loading %s failed: %s", self.model_path, self.error)
            self.on_failure()
            return
        try:
            self.scheduler.run()
        finally:
            model.close()

    def begin_shutdown(self, grace: float) -> None:
        """Refuse new requests; give the ones in flight `grace` seconds, then end them
        (each stream gets an error event and [DONE], so every response completes)."""
        self.stopping = True
        if self.status in ("ready", "loading"):
            self.status = "stopping"

        def drain():
            deadline = time.monotonic() + grace
            while self.scheduler is not None and time.monotonic() < deadline:
                st = self.scheduler.status()
                if st["busy"] == 0 and st["queued"] == 0:
                    break
                time.sleep(0.05)
            if self.scheduler is not None:
                self.scheduler.stop(timeout=0)
        threading.Thread(target=drain, name="moe-numa-drain", daemon=True).start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the step loop (requests still in flight get an error event) and close the model."""
        if self.status == "ready":
            self.status = "stopping"
        if self.scheduler is not None:
            self.scheduler.stop(timeout=0)
        if self.thread is not None:
            self.thread.join(timeout)


# ---------------------------------------------------------------- the app
def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moe-numa", version="1", description="OpenAI-compatible API over the moe_numa NUMA engine")

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        if e.get("type") == "json_invalid":
            return ApiError(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e['msg'])}",
                            "body").response()
        param = _loc_name(e.get("loc", ()))
        what = f"{param}: " if param else "request body: "
        return ApiError(400, what + e["msg"], param or "body", code=e.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), type_="invalid_request_error"
                        if exc.status_code < 500 else "server_error").response()

    @app.exception_handler(Exception)
    async def _any(request, exc: Exception):
        log.exception("unexpected error")
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.get("/health")
    async def health():
        body: dict[str, Any] = {"status": state.status, "model": state.model_id}
        if state.status == "loading":
            p = state.progress
            body["loading"] = dict(p, fraction=p["done_bytes"] / p["total_bytes"] if p["total_bytes"] else 0.0)
            return JSONResponse(body, status_code=503)
        if state.status == "failed":
            body["error"] = state.error
            return JSONResponse(body, status_code=500)
        if state.scheduler is not None:
            body["slots"] = state.scheduler.status()
            body["n_ctx"] = state.scheduler.n_ctx
            body["kv_cache_bytes"] = state.kv_cache_bytes
            behind = getattr(getattr(getattr(state.model, "backend", None), "store", None), "behind", None)
            if behind is not None:   # one node: serving from the mapped file while it is copied into node memory
                body["placement"] = {k: behind[k] for k in ("bytes", "done_bytes", "finished", "error")}
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                             "owned_by": "moe-numa"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = _ready(state, body.model)
        messages = []
        for i, m in enumerate(body.messages):
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):   # OpenAI content parts: text only
                texts = []
                for j, part in enumerate(m.content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages.{i}.content.{j}: only text parts are supported",
                                       f"messages.{i}.content")
                    texts.append(part["text"])
                d["content"] = "".join(texts)
            d.setdefault("content", "")
            messages.append(d)
        try:   # templating and tokenizing a long prompt off the event loop: other streams keep flowing
            ids = await asyncio.to_thread(model.prompt_ids, messages)
        except (ChatTemplateError, ValueError) as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        return await _generate(state, request, body, ids, limit, chat=True, param="messages")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = _ready(state, body.model)
        try:
            ids = await asyncio.to_thread(model.prompt_ids, body.prompt)
        except ValueError as e:
            raise ApiError(400, f"prompt: {e}", "prompt") from None
        return await _generate(state, request, body, ids, body.max_tokens, chat=False, param="prompt")

    return app


def _ready(state: ServerState, name: str | None):
    if state.status == "loading":
        p = state.progress
        raise ApiError(503, f"the model is loading ({p['done_bytes'] / 2**20:.0f} of "
                            f"{p['total_bytes'] / 2**20:.0f} MiB placed)", code="loading")
    if state.status != "ready":
        raise ApiError(503, f"the server is {state.status}", code=state.status)
    if name is not None and name != state.model_id:
        raise ApiError(400, f"model: unknown model {name!r}; this server serves {state.model_id!r}", "model",
                       code="model_not_found")
    return state.model


def _sampling(state: ServerState, body: _Sampling) -> SamplingParams:
    d = state.defaults
    pick = lambda v, default: default if v is None else v  # noqa: E731
    return SamplingParams(temperature=pick(body.temperature, d.temperature), top_k=pick(body.top_k, d.top_k),
                          top_p=pick(body.top_p, d.top_p), min_p=pick(body.min_p, d.min_p),
                          repeat_penalty=pick(body.repeat_penalty, d.repeat_penalty),
                          repeat_last_n=d.repeat_last_n,
                          frequency_penalty=pick(body.frequency_penalty, d.frequency_penalty),
                          presence_penalty=pick(body.presence_penalty, d.presence_penalty),
                          seed=body.seed)


async def _generate(state: ServerState, request: Request, body: _Sampling, ids: list[int], limit: int | None,
                    chat: bool, param: str):
    sched = state.scheduler
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 16:
        raise ApiError(400, f"stop: at most 16 stop strings, got {len(stops)}", "stop")
    if len(ids) >= sched.n_ctx:
        raise ApiError(400, f"{param}: the prompt has {len(ids)} tokens but a sequence's context holds "
                            f"{sched.n_ctx} (start the server with a larger --ctx-size)", param,
                       code="context_length_exceeded")
    max_tokens = limit if limit is not None else sched.n_ctx - len(ids)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_event(kind, data):
        loop.call_soon_threadsafe(events.put_nowait, (kind, data))
    req = GenRequest(ids, max_tokens, _sampling(state, body), on_event, stop=stops, ignore_eos=body.ignore_eos)
    try:
        sched.submit(req)
    except QueueFullError as e:
        raise ApiError(429, str(e), code="queue_full") from None
    except MoeNumaError as e:
        raise ApiError(400, f"{param}: {e}", param) from None

    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
                ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": state.model_id,
                                      "choices": [choice]}) + "\n\n"

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            try:
                if chat:
                    yield chunk(None, None, role=True)
                while True:
                    kind, data = await events.get()
                    if kind == "text":
                        yield chunk(data, None)
                    elif kind == "done":
                        yield chunk(None, data["finish_reason"])
                        if include_usage:
                            yield "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                                         "model": state.model_id, "choices": [],
                                                         "usage": _usage(data)}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        yield "data: " + json.dumps(_error_body(str(data), "server_error")) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:   # a client that went away (the task is cancelled) frees its slot
                req.cancel()
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    pieces: list[str] = []
    try:
        while True:
            try:
                kind, data = await asyncio.wait_for(events.get(), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            if kind == "text":
                pieces.append(data)
            elif kind == "done":
                break
            else:
                raise ApiError(503 if "shutting down" in str(data) else 500, str(data))
    finally:
        req.cancel()
    text = "".join(pieces)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": data["finish_reason"]}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": data["finish_reason"]}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": state.model_id, "choices": [choice], "usage": _usage(data)}


def _usage(d: dict) -> dict:
    return {"prompt_tokens": d["prompt_tokens"], "completion_tokens": d["completion_tokens"],
            "total_tokens": d["prompt_tokens"] + d["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": d["cached_tokens"]}}


# ---------------------------------------------------------------- command
def add_arguments(sv) -> None:
    """The flags of `moe-numa serve` (moe_numa.cli's command table)."""
    from .cli import add_engine_flags
    sv.add_argument("-m", "--model", help="GGUF file (default: the embedded small model)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("-np", "--parallel", type=int, default=1, metavar="N",
                    help="sequences decoded together (KV-cache slots of --ctx-size tokens each)")
    sv.add_argument("--queue", type=int, default=64, metavar="N",
                    help="requests that may wait for a slot; beyond that the server answers 429")
    sv.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                    help="prompt tokens per step, interleaved with the running decodes")
    sv.add_argument("-a", "--alias", help="model id clients use (default: the file name)")
    sv.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                    help="on SIGTERM/SIGINT, seconds the streams in flight may take to finish before cancelling")
    sv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sv.add_argument("--temp", type=float, default=0.8, help="default temperature of requests that set none")
    sv.add_argument("--top-k", type=int, default=40)
    sv.add_argument("--top-p", type=float, default=0.95)
    sv.add_argument("--min-p", type=float, default=0.05)
    sv.add_argument("--repeat-penalty", type=float, default=1.0)
    sv.add_argument("--repeat-last-n", type=int, default=64)
    add_engine_flags(sv)


def run(args) -> int:
    from .cli import model_options
    from .default_model import default_model_path
    opts = model_options(args)
    opts.pop("progress", None)   # the server reports placement progress on /health and in its log
    path = args.model or str(default_model_path())
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    defaults = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n)
    return serve(path, host=args.host, port=args.port, parallel=args.parallel, max_queue=args.queue,
                 prefill_chunk=args.prefill_chunk, model_id=args.alias, load_options=opts, defaults=defaults,
                 shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8080, parallel: int = 1, max_queue: int = 64,
          prefill_chunk: int = 256, model_id: str | None = None, load_options: dict | None = None,
          defaults: SamplingParams | None = None, shutdown_timeout: float = 10.0, log_level: str = "info") -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status."""
    import uvicorn
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if parallel < 1:
        raise MoeNumaError(f"--parallel must be >= 1, got {parallel}")
    model_id = model_id or os.path.basename(model_path)
    state = ServerState(model_path, model_id, dict(load_options or {}), parallel, max_queue, prefill_chunk,
                        defaults or SamplingParams())
    app = create_app(state)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout + 10, lifespan="off")

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                state.begin_shutdown(shutdown_timeout)
            super().handle_exit(sig, frame)
    server = _Server(config)
    state.on_failure = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it caught once it has shut down; these no-op handlers make
    # that re-raise harmless, so a SIGTERM ends in a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    state.start()
    log.info("serving %s as %r on http://%s:%d (%d slots)", model_path, model_id, host, port, parallel)
    server.run()
    failed = state.status == "failed"
    state.stop()
    return 1 if failed else 0
