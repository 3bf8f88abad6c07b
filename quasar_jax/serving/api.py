"""OpenAI-compatible HTTP API (FastAPI) in front of a ``Scheduler``.

``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent events, one
chunk per verify step's accepted tokens, then ``data: [DONE]``; or one JSON response),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Bad requests get HTTP 400 with ``{"error": {"message", "type", "param", "code"}}``; a full queue
429; a server that is draining 503. Bodies are checked by hand (not pydantic) so that every
error names the offending parameter in OpenAI's format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import numbers
import secrets
import time
import uuid

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quasar_jax.sampling import SamplingParams
from quasar_jax.serving.metrics import CONTENT_TYPE_LATEST
from quasar_jax.serving.scheduler import Failed, Finished, QueueFull, Request, Scheduler, ShuttingDown, Tokens
from quasar_jax.text_stream import TextStream

MAX_STOP_STRINGS = 4
# Parameters accepted with their neutral value only (anything else is "unsupported": 400).
_NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None,
            "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None,
            "user": "*", "stream_options": "*", "max_completion_tokens": "*"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream"}
_ALLOWED = {"completions": _COMMON | {"prompt"} | set(_NEUTRAL) - {"top_logprobs"},
            "chat": _COMMON | {"messages"} | set(_NEUTRAL) - {"best_of", "echo", "suffix"}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(v)}", name, "invalid_type")
    if not ((v > lo if lo_open else v >= lo) and v <= hi):
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name,
                       "invalid_value")
    return float(v)


class Api:
    """Request parsing, prompt building and response shaping for one served model."""

    def __init__(self, scheduler: Scheduler, tokenizer, *, model_name: str, stop_ids: tuple[int, ...],
                 default_max_tokens: int = 16):
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.stop_ids = stop_ids
        self.max_len = scheduler.engine.s
        self.vocab = scheduler.engine.model.config.vocab_size
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.draining = False

    # ------------------------------------------------------------------ parsing
    def parse(self, body, kind: str) -> tuple[Request, list[str], bool, dict]:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        unknown = sorted(set(body) - _ALLOWED[kind])
        if unknown:
            raise ApiError(400, f"unsupported parameter '{unknown[0]}'", unknown[0], "unsupported_parameter")
        for name, neutral in _NEUTRAL.items():
            if name in body and neutral != "*" and body[name] is not None and body[name] != neutral:
                raise ApiError(400, f"unsupported value for '{name}': only {json.dumps(neutral)} is supported",
                               name, "unsupported_parameter")
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise ApiError(404, f"the model {json.dumps(model)} does not exist; this server serves "
                                f"'{self.model_name}'", "model", "model_not_found")
        stream = body.get("stream", False) or False
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", "stream", "invalid_type")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise ApiError(400, "'stream_options' must be an object with a boolean 'include_usage'",
                           "stream_options", "invalid_type")
        prompt = self._chat_prompt(body.get("messages")) if kind == "chat" else self._prompt(body.get("prompt"))
        room = self.max_len - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this server's cache holds "
                                f"{self.max_len} (prompt + completion)", "messages" if kind == "chat" else "prompt",
                           "context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(name)
        if max_tokens is None:
            max_tokens = room if kind == "chat" else min(self.default_max_tokens, room)
        elif not _is_int(max_tokens):
            raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(max_tokens)}", name, "invalid_type")
        elif max_tokens < 1:
            raise ApiError(400, f"'{name}' must be >= 1, got {max_tokens}", name, "invalid_value")
        elif max_tokens > room:
            raise ApiError(400, f"'{name}' is {max_tokens} but the prompt ({len(prompt)} tokens) leaves "
                                f"{room} of the cache's {self.max_len} slots", name, "context_length_exceeded")
        temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        top_k = body.get("top_k", 0)
        top_k = 0 if top_k is None or top_k == -1 else top_k
        if not _is_int(top_k) or top_k < 0:
            raise ApiError(400, f"'top_k' must be an integer >= 0 (or -1), got {json.dumps(top_k)}", "top_k",
                           "invalid_value")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or not -2**63 <= seed < 2**63):
            raise ApiError(400, f"'seed' must be a 64-bit integer, got {json.dumps(seed)}", "seed", "invalid_value")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
                or len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                                "non-empty strings", "stop", "invalid_value")
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        req = Request(prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                      seed=secrets.randbits(63), stop_ids=self.stop_ids)
        return req, stop, stream, {"include_usage": opts.get("include_usage", False)}

    def _check_ids(self, ids, param: str) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty", param, "invalid_value")
        bad = next((t for t in ids if not _is_int(t) or not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {json.dumps(bad)} is not in [0, {self.vocab})", param, "invalid_value")
        return list(ids)

    def _prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self._check_ids(self.tokenizer(prompt)["input_ids"], "prompt")
        if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
            return self._check_ids(prompt, "prompt")
        if prompt is None:
            raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
        raise ApiError(400, "'prompt' must be a string or a list of token ids (batches of several prompts "
                            "are not supported)", "prompt", "invalid_type")

    def _chat_prompt(self, messages) -> list[int]:
        if messages is None:
            raise ApiError(400, "'messages' is required", "messages", "missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
        turns = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   f"messages[{i}].content", "invalid_value")
                content = "".join(p["text"] for p in content)
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] must be an object with a role (system, user, assistant) "
                                    "and a string content", f"messages[{i}]", "invalid_value")
            turns.append({"role": m["role"], "content": content})
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions",
                           "messages", "invalid_value")
        text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return self._check_ids(self.tokenizer(text, add_special_tokens=False)["input_ids"], "messages")

    # ------------------------------------------------------------------ running
    async def generate(self, http: HttpRequest, kind: str):
        if self.draining:
            raise ApiError(503, "the server is shutting down", None, "shutting_down", "server_error")
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"invalid JSON body: {err}", None, "invalid_json") from None
        req, stop, stream, opts = self.parse(body, kind)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.sink = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        try:
            self.scheduler.submit(req)
        except QueueFull as err:
            raise ApiError(429, str(err), None, "queue_full", "rate_limit_exceeded") from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), None, "shutting_down", "server_error") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        text = TextStream(self.tokenizer, stop)
        if stream:
            return StreamingResponse(self._sse(req, events, text, kind, rid, opts), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            pieces, finish = [], None
            async for delta, finish in self._events(req, events, text, http):
                pieces.append(delta)
        finally:
            self.scheduler.cancel(req)
        if finish is None:  # client gone
            return Response(status_code=499)
        return JSONResponse(self._body(kind, rid, "".join(pieces), finish, req, text))

    async def _events(self, req: Request, events: asyncio.Queue, text: TextStream, http: HttpRequest | None):
        """``(delta, None)`` per verify step, then ``(delta, finish_reason)``; raises ApiError on failure."""
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    return
                continue
            if isinstance(ev, Tokens):
                for group in ev.groups:
                    delta = text.feed(group)
                    text.steps += 1
                    if text.stopped:
                        self.scheduler.cancel(req)
                        yield delta, "stop"
                        return
                    yield delta, None
            elif isinstance(ev, Finished):
                yield text.flush(), ("stop" if ev.reason == "stop" else "length")
                return
            elif isinstance(ev, Failed):
                raise ApiError(500, ev.message, None, "internal_error", "server_error")

    async def _sse(self, req, events, text, kind, rid, opts):
        created = int(time.time())
        try:
            if kind == "chat":
                yield self._sse_chunk(rid, created, kind, {"role": "assistant", "content": ""}, None)
            async for delta, finish in self._events(req, events, text, None):
                if delta or finish:
                    chunk = self._sse_chunk(rid, created, kind, delta, finish,
                                            self._usage(req, text) if finish else None)
                    yield chunk
            if opts["include_usage"]:
                yield "data: " + json.dumps({"id": rid, "object": self._object(kind, True), "created": created,
                                             "model": self.model_name, "choices": [],
                                             "usage": self._usage(req, text)}) + "\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as err:
            yield "data: " + json.dumps({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                                   "code": err.code}}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(req)  # no-op when finished; frees the slot on a disconnect

    def _object(self, kind: str, chunk: bool) -> str:
        if kind == "chat":
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def _sse_chunk(self, rid, created, kind, delta, finish, usage=None) -> str:
        if kind == "chat":
            d = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        obj = {"id": rid, "object": self._object(kind, True), "created": created, "model": self.model_name,
               "choices": [choice]}
        if usage is not None:
            obj["usage"] = usage
        return "data: " + json.dumps(obj) + "\n\n"

    def _usage(self, req: Request, text: TextStream) -> dict:
        n, steps = len(text.ids), text.steps
        return {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n,
                "verify_steps": steps, "accepted_tokens": max(0, n - steps)}

    def _body(self, kind, rid, content, finish, req, text) -> dict:
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": self._object(kind, False), "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": self._usage(req, text)}


def create_app(api: Api, *, on_shutdown=None) -> FastAPI:
    """The FastAPI app; ``on_shutdown`` runs after uvicorn has drained the connections."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        api.draining = True
        if on_shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, on_shutdown)

    app = FastAPI(title="quasar_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = api.scheduler.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        if err.status in (400, 404):
            metrics.requests.labels("invalid").inc()
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        return error_response(err.status_code, str(err.detail), None, None)

    @app.exception_handler(Exception)
    async def _internal(request, err):
        metrics.requests.labels("error").inc()
        return error_response(500, f"internal error: {type(err).__name__}", None, "internal_error", "server_error")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await api.generate(http, "completions")

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        return await api.generate(http, "chat")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": api.model_name, "object": "model", "created": api.created,
                                            "owned_by": "quasar_jax", "max_model_len": api.max_len}]}

    @app.get("/health")
    async def health():
        status = "draining" if api.draining else "ok"
        return JSONResponse({"status": status, "slots": api.scheduler.engine.b, "busy": api.scheduler.busy,
                             "queued": api.scheduler.queued}, status_code=503 if api.draining else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
