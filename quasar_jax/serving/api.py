"""OpenAI-compatible HTTP API (FastAPI) in front of a ``Scheduler``.

``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent events, one
chunk per verify step's accepted tokens and choice, then ``data: [DONE]``; or one JSON response),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Bodies are parsed by the typed models of ``quasar_jax.serving.protocol``; this module adds the
checks that need the served model, turns a request into scheduler requests (one per prompt, each
with ``n`` choices), follows their events and shapes the answer (``serving.responses``). Bad
requests get HTTP 400 with ``{"error": {"message", "type", "param", "code"}}``; a body over
``max_request_bytes`` 413; a full queue 429 (with ``Retry-After``); a server that is draining 503.

Host work stays off the event loop: parsing, tokenization and chat templates run in a worker
thread (``run_in_threadpool``), and so does the detokenization of each event's tokens. A client
that goes away is noticed when it does (the ASGI disconnect message, awaited beside the events;
for streams Starlette's own watcher), and its requests are cancelled: a running choice frees its
slot at the scheduler's next iteration, a queued one its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from quasar_jax.cli.text_stream import TextStream
from quasar_jax.serving import protocol
from quasar_jax.serving.metrics import CONTENT_TYPE_LATEST
from quasar_jax.serving.protocol import MAX_CHOICES, ApiError, ChatRequest, CompletionRequest
from quasar_jax.serving.responses import Choice, Delta, Shaper, TokenPieces
from quasar_jax.serving.scheduler import (Failed, Finished, PromptLogprobs, QueueFull, Request, Scheduler,
                                          ShuttingDown, Tokens)
from quasar_jax.speculative.sampling import SamplingParams


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error"):
    return ApiError(status, message, param, code, kind).response()


@dataclasses.dataclass
class Job:
    """One HTTP request: its scheduler requests (one per prompt) and choices (prompts x n)."""

    shaper: Shaper
    requests: list[Request]
    choices: list[Choice]
    n: int
    stream: bool
    echo: bool
    include_usage: bool
    continuous_usage: bool
    gone: bool = False  # the client disconnected

    def usage(self) -> dict:
        return self.shaper.usage(sum(len(r.prompt) for r in self.requests), self.choices)


class Api:
    """Request checking, scheduling and response shaping for one served model."""

    def __init__(self, scheduler: Scheduler, tokenizer, *, model_name: str, stop_ids: tuple[int, ...],
                 default_max_tokens: int = 16, max_len: int | None = None,
                 max_request_bytes: int = 64 << 20):
        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.stop_ids = stop_ids
        # prompt + completion at most: the served context (``ServeConfig.max_len``), within the cache
        self.max_len = min(max_len or scheduler.engine.s, scheduler.engine.s)
        self.num_stop = scheduler.engine.ns
        self.vocab = scheduler.engine.model.config.vocab_size
        self.default_max_tokens = default_max_tokens
        self.max_request_bytes = max_request_bytes
        self.pieces = TokenPieces(tokenizer)  # each token's bytes and shown text, shared by requests
        self.created = int(time.time())
        self.draining = False

    # ------------------------------------------------------------------ checking
    def job(self, r: CompletionRequest | ChatRequest, kind: str) -> Job:
        """The scheduler requests and choices of a parsed request (``ApiError`` when it cannot run)."""
        chat = kind == "chat"
        if r.model is not None and r.model != self.model_name:
            raise ApiError(404, f"the model {json.dumps(r.model)} does not exist; this server serves "
                                f"'{self.model_name}'", "model", "model_not_found")
        if not chat and r.suffix is not None:
            raise ApiError(400, "'suffix' is not supported", "suffix", "unsupported_parameter")
        if r.best_of is not None and r.best_of != r.n:
            raise ApiError(400, f"'best_of' must equal 'n' ({r.n}): every generated sequence is returned",
                           "best_of", "unsupported_parameter")
        prompt_param = "messages" if chat else "prompt"
        count = 1 if chat else len(self._batch(r))
        if count * r.n > MAX_CHOICES:  # before any prompt is tokenized
            raise ApiError(400, f"{count} prompts x n = {r.n} choices; at most {MAX_CHOICES} per request",
                           "n", "invalid_value")
        prompts = [self._chat_prompt(r)] if chat else self._prompts(r)
        if r.truncate_prompt_tokens is not None:
            prompts = [(ids[-r.truncate_prompt_tokens:], None) for ids, _ in prompts]
        echo = bool(not chat and r.echo)
        if chat:
            if r.top_logprobs is not None and not r.logprobs:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
            n_logprobs = (r.top_logprobs or 0) if r.logprobs else None
        else:
            n_logprobs = r.logprobs
        name = "max_completion_tokens" if chat and r.max_completion_tokens is not None else "max_tokens"
        asked = getattr(r, name)
        longest = max(len(ids) for ids, _ in prompts)
        room = self.max_len - longest
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens. However, your "
                                f"request has {longest} input tokens, which leaves no room for a completion. "
                                "Please reduce the length of the input.", prompt_param, "context_length_exceeded")
        pages = getattr(self.scheduler, "pages", None)
        if pages is not None and pages.pages_needed(longest) > pages.tables.num_pages:
            raise ApiError(400, f"the prompt has {longest} tokens and needs {pages.pages_needed(longest)} KV pages "
                                f"of {pages.page_size} slots; this server's pool holds {pages.tables.num_pages}",
                           prompt_param, "context_length_exceeded")
        if asked is None:
            max_tokens = room if chat else min(self.default_max_tokens, room)
        elif asked == 0 and not echo:
            raise ApiError(400, f"'{name}' must be >= 1 (0 only with echo), got 0", name, "invalid_value")
        elif asked > room:
            raise ApiError(400, f"'{name}' is too large: {asked}. This model's maximum context length is "
                                f"{self.max_len} tokens and your request has {longest} input tokens "
                                f"({asked} > {self.max_len} - {longest}).", name, "context_length_exceeded")
        else:
            max_tokens = asked
        if max_tokens and r.min_tokens > max_tokens:
            raise ApiError(400, f"'min_tokens' ({r.min_tokens}) must be <= '{name}' ({max_tokens})", "min_tokens",
                           "invalid_value")
        stop = [] if r.stop is None else [r.stop] if isinstance(r.stop, str) else r.stop
        if not all(stop):
            raise ApiError(400, "'stop' strings must be non-empty", "stop", "invalid_value")
        sampling = self._sampling(r, n_logprobs)
        try:
            self.scheduler.engine.check(sampling)  # a slot engine built without penalties / logprobs
        except ValueError as err:
            raise ApiError(400, str(err), None, "unsupported_parameter") from None
        stop_ids = self._stop_ids(r)
        seed = secrets.randbits(63)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        shaper = Shaper(self.tokenizer, kind, self.model_name, rid, int(time.time()), logprobs=n_logprobs,
                        as_ids=bool(r.return_tokens_as_token_ids), pieces=self.pieces)
        requests, choices = [], []
        for ids, text in prompts:
            requests.append(Request(prompt=ids, max_tokens=max_tokens, sampling=sampling, seed=seed,
                                    stop_ids=stop_ids, n=r.n,
                                    prompt_logprobs=n_logprobs if echo and n_logprobs is not None else None))
            for _ in range(r.n):
                stream = TextStream(self.tokenizer, stop, include_stop=r.include_stop_str_in_output,
                                    skip_special_tokens=r.skip_special_tokens,
                                    spaces_between_special_tokens=r.spaces_between_special_tokens)
                choices.append(Choice(len(choices), stream, echo_text=(self.tokenizer.decode(ids) if text is None
                                                                       else text) if echo else "",
                                      echo_ids=ids if echo else []))
        opts = r.stream_options
        return Job(shaper, requests, choices, r.n, bool(r.stream), echo, bool(opts and opts.include_usage),
                   bool(opts and opts.continuous_usage_stats))

    def _sampling(self, r, n_logprobs: int | None) -> SamplingParams:
        bias = {}
        for key, value in (r.logit_bias or {}).items():
            if not (key.isdigit() and int(key) < self.vocab):
                raise ApiError(400, f"logit_bias key {json.dumps(key)} is not a token id in [0, {self.vocab})",
                               "logit_bias", "invalid_value")
            bias[int(key)] = value
        top_k = r.top_k if r.top_k is not None and r.top_k > 0 else 0
        return SamplingParams(temperature=1.0 if r.temperature is None else r.temperature, top_k=top_k,
                              top_p=1.0 if r.top_p is None else r.top_p, seed=r.seed,
                              min_p=r.min_p or 0.0, presence_penalty=r.presence_penalty or 0.0,
                              frequency_penalty=r.frequency_penalty or 0.0,
                              repetition_penalty=r.repetition_penalty or 1.0, min_tokens=r.min_tokens,
                              logit_bias=bias, logprobs=n_logprobs)

    def _stop_ids(self, r) -> tuple[int, ...]:
        extra = r.stop_token_ids or []
        bad = next((t for t in extra if t >= self.vocab), None)
        if bad is not None:
            raise ApiError(400, f"stop token id {bad} is not in [0, {self.vocab})", "stop_token_ids", "invalid_value")
        ids = tuple(dict.fromkeys((() if r.ignore_eos else self.stop_ids) + tuple(extra)))
        if len(ids) > self.num_stop:
            room = self.num_stop - (0 if r.ignore_eos else len(self.stop_ids))
            raise ApiError(400, f"{len(extra)} stop_token_ids; this server takes at most {room} per request",
                           "stop_token_ids", "invalid_value")
        return ids

    def _check_ids(self, ids, param: str) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty", param, "invalid_value")
        bad = next((t for t in ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is not in [0, {self.vocab})", param, "invalid_value")
        return list(ids)

    @staticmethod
    def _batch(r: CompletionRequest) -> list:
        """The prompts of a completions request (texts or token-id lists), not yet tokenized."""
        p = r.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p

    def _prompts(self, r: CompletionRequest) -> list[tuple[list[int], str | None]]:
        """``(ids, text)`` per prompt (text None for token-id prompts)."""
        batch = self._batch(r)
        if not batch:
            raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
        out = []
        for one in batch:
            if isinstance(one, str):
                ids = self.tokenizer(one, add_special_tokens=r.add_special_tokens)["input_ids"]
                out.append((self._check_ids(ids, "prompt"), one))
            else:
                out.append((self._check_ids(one, "prompt"), None))
        return out

    def _chat_prompt(self, r: ChatRequest) -> tuple[list[int], None]:
        # OpenAI's "developer" role is its newer name for "system"; chat templates know only "system".
        turns = [{"role": "system" if m.role == "developer" else m.role,
                  "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                 for m in r.messages]
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions",
                           "messages", "invalid_value")
        try:
            text = self.tokenizer.apply_chat_template(turns, tokenize=False,
                                                      add_generation_prompt=r.add_generation_prompt,
                                                      **(r.chat_template_kwargs or {}))
        except Exception as err:  # a template error is the request's (bad kwargs, roles out of order)
            raise ApiError(400, f"the chat template failed: {err}", "messages", "invalid_value") from None
        return self._check_ids(self.tokenizer(text, add_special_tokens=False)["input_ids"], "messages"), None

    # ------------------------------------------------------------------ running
    async def _body(self, http: HttpRequest) -> bytes:
        """The request body; 413 past ``max_request_bytes`` (told by Content-Length, or counted)."""
        limit = self.max_request_bytes
        too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes", None,
                           "request_too_large")
        length = http.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        async for part in http.stream():
            body += part
            if len(body) > limit:
                raise too_big
        return bytes(body)

    async def generate(self, http: HttpRequest, kind: str):
        if self.draining:
            raise ApiError(503, "the server is shutting down", None, "shutting_down", "server_error")
        body = await self._body(http)
        job = await run_in_threadpool(lambda: self.job(protocol.parse(body, kind), kind))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, req in enumerate(job.requests):
            req.sink = lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))
        try:
            self.scheduler.submit(*job.requests)  # the prompts of one request: all queued, or none
        except QueueFull as err:
            raise ApiError(429, str(err), None, "queue_full", "rate_limit_exceeded", {"Retry-After": "1"}) from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), None, "shutting_down", "server_error") from None
        if job.stream:
            return StreamingResponse(self._sse(job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(self._watch(http, job))
        try:
            async for _ in self._updates(job, events):
                pass
        finally:
            watcher.cancel()
            self._cancel(job)
        if job.gone:
            return Response(status_code=499)
        return JSONResponse(job.shaper.body(job.choices, job.usage()))

    async def _watch(self, http: HttpRequest, job: Job) -> None:
        """Cancel ``job`` when its client disconnects (the body is read: the next ASGI message is
        the disconnect)."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        job.gone = True
        self._cancel(job)

    def _cancel(self, job: Job) -> None:
        for req in job.requests:
            self.scheduler.cancel(req)  # no-op when finished

    def _tokens(self, job: Job, p: int, ev: Tokens) -> list[Delta]:
        """The deltas of one ``Tokens`` event (detokenization and stop strings: run in a worker thread)."""
        c = job.choices[p * job.n + ev.index]
        out, at = [], 0
        for group in ev.groups:
            if c.finish:
                break
            lps = ev.logprobs[at:at + len(group)] if ev.logprobs is not None else None
            at += len(group)
            before = c.text.kept
            delta = c.text.feed(group)
            c.text.steps += 1
            ids = c.text.ids[before:c.text.kept]
            lps = None if lps is None else lps[:len(ids)]
            c.logprobs.extend(lps or [])
            if c.text.stopped:
                c.finish = "stop"
                self.scheduler.cancel(job.requests[p], ev.index)
            out.append(Delta(c, delta, ids, lps, c.finish))
        return out

    async def _updates(self, job: Job, events: asyncio.Queue):
        """``Delta`` per event and choice until every choice is finished; ``ApiError`` on failure."""
        if job.echo and job.shaper.n_logprobs is None:
            for c in job.choices:
                yield Delta(c, c.echo_text, c.echo_ids, None, first=True)
        running = len(job.choices)
        while running and not job.gone:
            p, ev = await events.get()
            if isinstance(ev, PromptLogprobs):
                for c in job.choices[p * job.n:(p + 1) * job.n]:
                    c.echo_logprobs = ev.logprobs
                    yield Delta(c, c.echo_text, c.echo_ids, ev.logprobs, first=True)
            elif isinstance(ev, Tokens):
                for d in await run_in_threadpool(self._tokens, job, p, ev):
                    running -= d.finish is not None
                    yield d
            elif isinstance(ev, Finished):
                c = job.choices[p * job.n + ev.index]
                if not c.finish:
                    c.finish = "stop" if ev.reason == "stop" else "length"
                    running -= 1
                    yield Delta(c, c.text.flush(), [], None, c.finish)
            elif isinstance(ev, Failed):
                raise ApiError(500, ev.message, None, "internal_error", "server_error")

    async def _sse(self, job: Job, events: asyncio.Queue):
        shaper, offsets = job.shaper, {}
        try:
            if shaper.kind == "chat":
                for c in job.choices:
                    yield shaper.role_chunk(c.index)
            async for d in self._updates(job, events):
                if d.text or d.finish or (shaper.n_logprobs is not None and d.ids):
                    yield shaper.chunk(d, offsets, job.usage() if d.finish or job.continuous_usage else None)
            if job.include_usage:
                yield shaper.event([], job.usage())
            yield "data: [DONE]\n\n"
        except ApiError as err:
            yield "data: " + json.dumps(err.body()) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._cancel(job)  # no-op when finished; frees the slots on a disconnect


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
