"""The OpenAI-compatible HTTP routes (FastAPI): requests in, events out. No torch here.

    POST /v1/completions        POST /v1/chat/completions        GET /v1/models, /v1/models/ID
    GET /health                 GET /metrics (Prometheus text)

Models: NAME (routed per request; listed when the store has a router), NAME:task:T (forced to
task T), NAME:static (the merged model). Every response (and the first stream chunk) carries a
`routing` field: the decision's mode, task, weights, probabilities, entropy and what was applied.

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for malformed
JSON, wrong types, a prompt over the context, max_tokens over what the context leaves; 401 for
a missing or wrong API key; 404 for an unknown model or route; 405 for a method a route does not
take; 413 for a body over the limit; 429 with Retry-After when the waiting queue is full; 503
with Retry-After when the engine is not running.
Why FastAPI + uvicorn: well kept, pydantic request models (already a dependency), SSE through a
StreamingResponse, and a disconnecting client cancels the stream (its request is then aborted
and its batch slot freed).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import StreammergeError
from ..limits import REQUEST, parse_request_body
from .scheduler import QueueFull, Request, Sampling

MAX_BODY = REQUEST.max_bytes  # bytes of a request body
DEFAULT_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---- request bodies ------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class _Body(BaseModel):
    # strict: "5" is not a number, true is not 1; unknown fields are ignored, as OpenAI's SDKs
    # add new ones over time
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1)  # one choice per request
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    # what torch.Generator.manual_seed takes (a negative seed counts modulo 2^64)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    echo: Literal[False] | None = None
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None
    tools: None = None


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "body"
    return APIError(400, f"{loc}: {err['msg']}", param=str(err["loc"][0]) if err["loc"] else None, code="invalid_value")


async def _read_json(request: HTTPRequest, limit: int) -> dict:
    """The body as a JSON object: read no further than `limit` bytes (413), parsed under the
    request limits of limits.py (nesting, containers: 400)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes is over the limit of {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        data = parse_request_body(b"".join(chunks))
    except StreammergeError as e:
        raise APIError(400, str(e), code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body: a JSON object is needed", code="invalid_json")
    return data


# ---- the app -------------------------------------------------------------------------------------


def create_app(engine, name: str, api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    runner = engine.runner
    tasks, method = runner.tasks, runner.method
    routed = runner.router is not None
    app = FastAPI(title=f"streammerge serve {name}", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):  # no such route (404), method (405)
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(exc.status_code, what.get(exc.status_code, str(exc.detail)), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # a bug answers 500; the server stays up
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine is not running", type="server_error", headers={"Retry-After": "5"})
        return {"status": "ok", **engine.scheduler.load()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_ids() -> list[str]:
        return ([name] if routed else []) + [f"{name}:static"] + [f"{name}:task:{t}" for t in tasks]

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "streammerge"}
                                           for m in model_ids()]}

    @app.get("/v1/models/{model:path}")
    async def model_info(model: str):
        if model not in model_ids():
            raise APIError(404, f"no model {model!r}; models: {', '.join(model_ids())}", param="model",
                           code="model_not_found")
        return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "streammerge"}

    def target(model: str) -> tuple:
        if model == name and routed:
            return ("routed",)
        if model == name:
            raise APIError(404, f"model {name!r} is routed, but the store has no router; fit one, or use one of: "
                           f"{', '.join(model_ids())}", param="model", code="model_not_found")
        if model == f"{name}:static":
            return ("static",)
        prefix = f"{name}:task:"
        if model.startswith(prefix) and model[len(prefix):] in tasks:
            return ("task", model[len(prefix):])
        raise APIError(404, f"no model {model!r}; models: {', '.join(model_ids())}", param="model", code="model_not_found")

    def sampling(body: _Body, prompt_len: int, default_max: int | None) -> Sampling:
        ctx = runner.context_length
        if prompt_len > ctx:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context is {ctx}", param="prompt",
                           code="context_length_exceeded")
        left = ctx - prompt_len
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > left:
            raise APIError(400, f"max_tokens {asked} is over the {left} tokens the context leaves after the prompt's "
                           f"{prompt_len} (context {ctx})", param="max_tokens", code="context_length_exceeded")
        if left < 1:
            raise APIError(400, f"the prompt fills the model's context ({ctx}): no room for an answer", param="prompt",
                           code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stop) or len(stop) > 4:
            raise APIError(400, "stop: up to 4 non-empty strings", param="stop", code="invalid_value")
        return Sampling(
            max_tokens=asked or min(left, default_max or left),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=stop,
        )

    def encode(text: str) -> list[int]:
        return list(runner.tokenizer(text, add_special_tokens=True)["input_ids"])

    async def parse(request: HTTPRequest, model_cls):
        data = await _read_json(request, max_body)
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await parse(request, CompletionBody)
        tgt = target(body.model)
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise APIError(400, "one prompt per request", param="prompt", code="invalid_value")
            p = p[0]
        if isinstance(p, str):
            ids, text = encode(p), p
        else:
            vocab = len(runner.tokenizer)
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
            ids, text = list(p), runner.tokenizer.decode(p, skip_special_tokens=True)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        req = Request(ids, sampling(body, len(ids), DEFAULT_MAX_TOKENS), tgt, features_text=text)
        return await run(request, req, body, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await parse(request, ChatBody)
        tgt = target(body.model)
        tok = runner.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {body.model!r} has no chat template (the base tokenizer has none); use "
                           "/v1/completions", param="messages", code="no_chat_template")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template rejects them ({' '.join(str(e).split())[:200]})",
                           param="messages", code="invalid_value") from None
        ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
        users = [m["content"] for m in msgs if m["role"] == "user"]
        req = Request(ids, sampling(body, len(ids), None), tgt, features_text=users[-1] if users else msgs[-1]["content"])
        return await run(request, req, body, "chat.completion")

    # ---- running a request ---------------------------------------------------------------------
    async def run(http: HTTPRequest, req: Request, body: _Body, kind: str):
        if not engine.alive:
            raise APIError(503, "the engine is not running", type="server_error", headers={"Retry-After": "5"})
        if not engine.scheduler.fits_alone(req):
            raise APIError(400, f"prompt + max_tokens ({req.reserved_tokens} tokens) need more KV cache than the "
                           "memory budget leaves", param="max_tokens", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        req.emit = emit
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(429, f"the server is at capacity ({e}); retry later", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        meta = {"id": f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(req, events, meta, kind, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await collect(http, req, events, meta, kind)

    def routing(decision) -> dict | None:
        return None if decision is None else {**decision.as_dict(), "applied": decision.applied(method)}

    async def collect(http: HTTPRequest, req: Request, events: asyncio.Queue, meta: dict, kind: str):
        text = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if ev[0] == "text":
                    text.append(ev[1])
                elif ev[0] == "error":
                    raise APIError(500, f"generation failed: {ev[1]}", type="server_error")
                elif ev[0] == "done":
                    _, reason, usage = ev
                    break
        finally:
            engine.abort(req)  # a no-op when finished
        out = "".join(text)
        choice = ({"index": 0, "text": out, "logprobs": None, "finish_reason": reason} if kind == "text_completion" else
                  {"index": 0, "message": {"role": "assistant", "content": out}, "logprobs": None, "finish_reason": reason})
        return {**meta, "object": kind, "choices": [choice], "usage": usage, "routing": routing(req.decision)}

    async def stream(req: Request, events: asyncio.Queue, meta: dict, kind: str, include_usage: bool):
        obj = "text_completion" if kind == "text_completion" else "chat.completion.chunk"

        def chunk(text: str | None, reason: str | None, first: bool = False, **extra) -> str:
            if kind == "text_completion":
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            else:
                delta = ({"role": "assistant", "content": text or ""} if first else {"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return "data: " + json.dumps({**meta, "object": obj, "choices": [choice], **extra}) + "\n\n"

        try:
            while True:
                ev = await events.get()
                if ev[0] == "routing":
                    yield chunk(None, None, first=True, routing=routing(ev[1]))
                elif ev[0] == "text":
                    yield chunk(ev[1], None)
                elif ev[0] == "error":
                    err = {"message": f"generation failed: {ev[1]}", "type": "server_error", "param": None, "code": None}
                    yield "data: " + json.dumps({"error": err}) + "\n\n"
                    break
                else:
                    _, reason, usage = ev
                    yield chunk(None, reason, routing=routing(req.decision))
                    if include_usage:
                        yield "data: " + json.dumps({**meta, "object": obj, "choices": [], "usage": usage}) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: free the slot
            engine.abort(req)

    return app
