"""Continuous batching on the host: one thread drives the ``SlotEngine``.

Each iteration of the scheduler thread:

1. cancellations (client gone, stop string found): queued requests are dropped, running ones are
   finished on device (``SlotEngine.finish``) and their slots freed;
2. admission: while a slot is free, the next queued prompt is prefilled piece by piece into a
   one-row staging cache and copied into the slot; a request for ``n`` choices is copied into
   ``n`` slots (each choice its own PRNG key), the staging cache kept until all are admitted. While
   other rows are decoding, prompt pieces are prefilled per iteration up to ``prefill_budget``
   tokens (at least one piece; 0: no budget): a long prompt is spread over several iterations, so
   the running rows get a chunk between its pieces; with nothing running, prefill is unbounded.
   A request that asks for its prompt's logprobs (echo) gets them from its prefill; with ``max_tokens`` 0 it needs no slot at all;
3. one ``chunk``: up to ``chunk_steps`` verify steps on device, returning early when a row finishes;
   the speculation policy (``quasar_jax.serving.speculation``) picks the chunk program (draft
   length K) from the busy rows and the recent acceptance, and learns from what the chunk did;
   each choice gets its new tokens, one group per verify step (with their logprobs when asked), and
   a finish event when its row is done.

The engine is a ``SlotEngine`` or, on process 0 of a multi-host group, a ``lockstep.Leader``
with the same calls (it sends them to every process): ``flush`` ends each iteration, and while
idle the loop calls it every ``engine.heartbeat_s`` seconds so the other processes know it lives.
An engine error marked ``fatal`` (the group is lost) fails every request and stops the loop for
good (``on_fatal``); any other fails the running requests and the loop goes on.

Requests talk to the thread through ``Request.sink`` (called on the scheduler thread with a
``PromptLogprobs`` / ``Tokens`` / ``Finished`` / ``Failed`` event, ``Tokens`` and ``Finished``
naming their choice; the HTTP layer hops onto its event loop) and ``Scheduler.cancel`` (a whole
request, or one choice: a stop string). The queue is bounded: ``submit`` raises ``QueueFull``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
import traceback
from typing import Callable

import numpy as np

from quasar_jax.serving.kv_pages import SlotPages
from quasar_jax.serving.metrics import ServingMetrics
from quasar_jax.serving.slots import SlotEngine, prefill_pieces
from quasar_jax.serving.speculation import FixedPolicy, acceptance_evidence, program_kind
from quasar_jax.speculative.results import FINISH_CODES, TokenLogprob, token_logprobs
from quasar_jax.speculative.sampling import SamplingParams

log = logging.getLogger("quasar_jax.serving")


class QueueFull(Exception):
    """The waiting queue is at its bound."""


class ShuttingDown(Exception):
    """The scheduler no longer accepts requests."""


@dataclasses.dataclass
class PromptLogprobs:
    logprobs: list[TokenLogprob | None]  # one per prompt token; the first is None


@dataclasses.dataclass
class Tokens:
    groups: list[list[int]]  # tokens accepted by each verify step of the last chunk
    index: int = 0  # the choice
    logprobs: list[TokenLogprob] | None = None  # one per token of ``groups``, when asked


@dataclasses.dataclass
class Finished:
    reason: str  # stop | length | cache_full | cancelled
    new_tokens: int
    verify_steps: int
    index: int = 0  # the choice


@dataclasses.dataclass
class Failed:
    message: str


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request (token ids in, events out)."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0  # the key's seed when ``sampling.seed`` is None
    stop_ids: tuple[int, ...] = ()
    sink: Callable[[object], None] = lambda event: None
    rid: int = dataclasses.field(default_factory=lambda: next(_ids))
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0
    cancelled: bool = False
    finished: bool = False
    n: int = 1  # choices (sequences) from this prompt
    prompt_logprobs: int | None = None  # echo: alternatives per prompt token (None: no prompt logprobs)
    ended: set = dataclasses.field(default_factory=set)  # choices whose Finished was delivered
    interrupted: bool = False  # a choice was cancelled (the request's outcome is "cancelled")
    group: int = -1  # the HTTP request it belongs to (its prompts are queued together)


@dataclasses.dataclass
class _Staging:
    req: Request
    pieces: list[tuple[int, int]]
    echo: list | None  # prompt logprobs gathered so far (None: not asked)
    next_choice: int = 0  # choices admitted so far
    prefilled: bool = False  # the prompt is in the staging cache (and its logprobs delivered)
    resume: tuple | None = None  # a preempted choice: (tokens so far, tokens produced, verify steps)


class Scheduler:
    """Owns the slots; ``start`` runs the loop in a daemon thread."""

    def __init__(self, engine: SlotEngine, *, max_queue: int = 64, prefill_budget: int | None = None,
                 metrics: ServingMetrics | None = None, policy=None, on_fatal: Callable | None = None):
        self.engine = engine
        self.pages: SlotPages | None = None  # paged KV: PagedScheduler's pages
        self.policy = policy or FixedPolicy(len(engine.ks) - 1)  # read each chunk (tests may swap it)
        self.on_fatal = on_fatal or (lambda err: None)
        self.max_queue = max_queue
        # prompt tokens prefilled per iteration while rows decode (None: the largest piece; 0: no budget)
        self.prefill_budget = engine.buckets[-1] if prefill_budget is None else prefill_budget
        self.metrics = metrics or ServingMetrics(engine.b, engine.k)
        self.program_kinds = [program_kind(d) for d in engine.drafters]  # the metrics' label of each program
        self._cond = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._cancels: collections.deque[tuple[Request, int | None]] = collections.deque()
        self._owner: dict[int, tuple[Request, int]] = {}  # slot -> (request, choice)
        self._staging: _Staging | None = None
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ any thread
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="quasar-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, *reqs: Request) -> None:
        """Queue ``reqs``, one request's prompts (one place of ``max_queue``): all, or none (``QueueFull``)."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self.waiting >= self.max_queue:
                self.metrics.requests.labels("rejected").inc()
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            group = reqs[0].rid
            for req in reqs:
                req.group = group
                self._queue.append(req)
            self.metrics.queue_depth.set(self.waiting)
            self._cond.notify()

    def cancel(self, req: Request, index: int | None = None) -> None:
        """Stop generating for ``req``, or only its choice ``index`` (idempotent; finished ones stay)."""
        with self._cond:
            if req.finished or req.cancelled or index in req.ended:
                return
            req.cancelled = index is None
            self._cancels.append((req, index))
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let queued and running ones finish, then end the thread."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def busy(self) -> int:
        return len(self._owner)

    @property
    def queued(self) -> int:  # prompts waiting for a slot
        return len(self._queue)

    @property
    def waiting(self) -> int:  # requests waiting (a batch of prompts is one)
        return len({r.group for r in self._queue})

    # ------------------------------------------------------------------ scheduler thread
    def _idle(self) -> bool:
        return not (self._queue or self._owner or self._staging or self._cancels or (self.pages and self.pages.resume))

    def _loop(self) -> None:
        try:
            self._iterations()
        except Exception as err:  # the group is lost: nothing can run any more
            with self._cond:
                self._accepting = False
            self._fail_all(f"internal error: {err}", reset=False)
            self.on_fatal(err)
        else:
            try:
                self.engine.close()
            except Exception as err:
                log.error("closing the slots failed: %s", err)

    def _iterations(self) -> None:
        heartbeat = self.engine.heartbeat_s
        while True:
            with self._cond:
                while self._idle() and not self._stop:
                    if not self._cond.wait(heartbeat) and heartbeat is not None and self._idle():
                        break  # idle for a heartbeat: an empty iteration keeps the group in step
                if self._idle() and self._stop:
                    return
                cancels = list(self._cancels)
                self._cancels.clear()
            try:
                self._cancel(cancels)
                self._admit()
                if self._owner:
                    self._chunk()
                self.engine.flush()
            except Exception as err:  # a device failure: fail the running requests, keep serving
                if getattr(err, "fatal", False):
                    raise
                log.error("scheduler iteration failed: %s", traceback.format_exc())
                self._fail_all(f"internal error: {type(err).__name__}: {err}")

    def _cancel(self, items: list[tuple[Request, int | None]]) -> None:
        slots = []
        for req, index in items:
            if req.finished:
                continue
            req.interrupted = True
            for slot, (r, i) in list(self._owner.items()):
                if r is req and (index is None or i == index):
                    slots.append(slot)
                    self._retire(slot, Finished("cancelled", 0, 0, i))
            if index is not None:
                continue
            if self._staging is not None and self._staging.req is req:
                self._drop_staging()
            if self.pages is not None:
                self.pages.resume = collections.deque(r for r in self.pages.resume if r[0][0] is not req)
            with self._cond:
                if req in self._queue:
                    self._queue.remove(req)
                    self.metrics.queue_depth.set(self.waiting)
            self._end_choices(req, "cancelled")
        if slots:
            mask = np.zeros((self.engine.b,), bool)
            mask[slots] = True
            self.engine.finish(mask)

    def _next_request(self, slot_free: bool) -> Request | None:
        """The next live queued request; without a free slot only one that needs none (echo alone)."""
        with self._cond:
            while self._queue:
                if not slot_free and self._queue[0].max_tokens > 0:
                    return None
                req = self._queue.popleft()
                self.metrics.queue_depth.set(self.waiting)
                if not req.cancelled:
                    return req
        return None

    def _admit(self) -> None:
        eng = self.engine
        spent = 0
        while True:
            if self._staging is None:
                self._staging = self._start_staging()
                if self._staging is None:
                    return
            st = self._staging
            while st.pieces and (not self._owner or self._budget_allows(spent, st.pieces[0][1])):
                start, size = st.pieces.pop(0)
                lp = eng.prefill(start, size, logprobs=st.echo is not None)
                if st.echo is not None:
                    st.echo.extend(token_logprobs(lp.token, lp.top_ids, lp.top,
                                                  range(min(size, len(st.req.prompt) - 1 - start)),
                                                  st.req.prompt_logprobs))
                spent += size
            if st.pieces:
                return  # budget spent: continue next iteration, after a decode chunk
            req = st.req
            if not st.prefilled:
                st.prefilled = True
                self.metrics.prompt_tokens.inc(len(req.prompt))
                if st.echo is not None:
                    self._deliver(req, PromptLogprobs(st.echo))
                if req.max_tokens == 0:  # the prompt's logprobs were all that was asked
                    self._drop_staging()
                    self._end_choices(req, "length")
                    continue
            produced = st.resume[1] if st.resume else 0
            row = eng.row_inputs(req.max_tokens - produced, req.stop_ids, req.sampling)  # the same for every choice
            last = st.next_choice + 1 if st.resume else req.n
            while st.next_choice < last and len(self._owner) < eng.b:
                slot = next(s for s in range(eng.b) if s not in self._owner)
                key = eng.key_data(req.sampling, req.seed, st.next_choice)
                if self.pages is None:
                    eng.admit(slot, row, key)
                else:
                    tokens = st.resume[0] if st.resume else req.prompt
                    eng.admit(slot, row, key, *self.pages.admit(slot, tokens, st.resume[1:] if st.resume else (0, 0)))
                self._owner[slot] = (req, st.next_choice)
                st.next_choice += 1
            self.metrics.slots_busy.set(len(self._owner))
            if st.next_choice < last:
                return  # the other choices wait for free slots (the staging cache is kept)
            self._drop_staging()

    def _budget_allows(self, spent: int, size: int) -> bool:
        """A prefill piece of ``size`` more, ``spent`` prompt tokens into this iteration, while rows
        decode: the first piece always (progress), then as long as the budget holds."""
        return not self.prefill_budget or spent == 0 or spent + size <= self.prefill_budget

    def _start_staging(self) -> _Staging | None:
        """The next queued prompt, begun on the engine (``PagedScheduler`` also finds its pages)."""
        req = self._next_request(len(self._owner) < self.engine.b)
        if req is not None:
            self.engine.begin(req.prompt)
            return _Staging(req, prefill_pieces(len(req.prompt) - 1, self.engine.buckets),
                            None if req.prompt_logprobs is None else [None])
        return None

    def _drop_staging(self) -> None:
        self._staging = None
        if self.pages is not None:
            self.pages.end_staging()

    def _before_chunk(self) -> None:
        """Nothing on a dense cache (``PagedScheduler`` reserves the chunk's pages)."""

    def _chunk(self) -> None:
        self._before_chunk()
        if not self._owner:
            return
        busy = len(self._owner)
        program = self.policy.choose(busy)
        t0 = time.perf_counter()
        res = self.engine.chunk(program, logprobs=any(r.sampling.logprobs is not None for r, _ in self._owner.values()))
        now = time.perf_counter()
        self.policy.observe(program, busy, now - t0, res.iterations, *acceptance_evidence(res, self._owner))
        m = self.metrics
        m.chunks.labels(self.program_kinds[program], str(self.engine.ks[program])).inc()
        m.alpha.set(getattr(self.policy, "alpha", float("nan")))
        m.loop_iterations.inc(res.iterations)
        m.busy_slot_iterations.inc(res.iterations * busy)
        for slot, (req, index) in list(self._owner.items()):
            n = int(res.appended[slot])
            if n:
                toks = res.tokens[slot, :n].tolist()
                groups, at = [], 0
                for e in res.emits[:, slot]:
                    if e > 0:
                        groups.append(toks[at:at + e])
                        m.accepted_length.observe(int(e))
                        at += int(e)
                m.generated_tokens.inc(n)
                m.verify_steps.inc(len(groups))
                if req.first_token is None:
                    req.first_token = now
                    m.ttft.observe(now - req.arrival)
                req.last_token = now
                req.generated += n
                lps = None
                if req.sampling.logprobs is not None:
                    lp = res.logprobs
                    lps = token_logprobs(lp.token[slot], lp.top_ids[slot], lp.top[slot], range(n),
                                         req.sampling.logprobs)
                self._deliver(req, Tokens(groups, index, lps))
                if self.pages is not None:
                    self.pages.committed(slot, toks, int(res.steps[slot]))
            if res.done[slot]:
                reason = FINISH_CODES[int(res.finish[slot])].value
                before, steps = self.pages.before[slot] if self.pages is not None else (0, 0)
                self._retire(slot, Finished(reason, before + int(res.new_tokens[slot]),
                                            steps + int(res.steps[slot]), index))

    def _retire(self, slot: int, event: Finished) -> None:
        """Free ``slot`` and end its choice; the request ends with its last choice."""
        req, _ = self._owner.pop(slot)
        self.metrics.slots_busy.set(len(self._owner))
        if self.pages is not None:
            self.pages.free(slot)
        self._end_choice(req, event)

    def _end_choice(self, req: Request, event: Finished) -> None:
        if event.index in req.ended:
            return
        req.ended.add(event.index)
        self._deliver(req, event)
        if len(req.ended) == req.n and not req.finished:
            req.finished = True
            if req.first_token is not None:
                self.metrics.latency.observe(req.last_token - req.arrival)
                if req.generated > 1:
                    self.metrics.tpot.observe((req.last_token - req.first_token) / (req.generated - 1))
            self.metrics.requests.labels("cancelled" if req.interrupted else "finished").inc()

    def _end_choices(self, req: Request, reason: str) -> None:
        """End every choice of ``req`` that is not running (never admitted, or echo alone)."""
        for i in range(req.n):
            self._end_choice(req, Finished(reason, 0, 0, i))

    def _deliver(self, req: Request, event) -> None:
        try:
            req.sink(event)
        except Exception:  # a broken consumer must not stop the loop
            log.error("request %s: event delivery failed: %s", req.rid, traceback.format_exc())

    def _fail_all(self, message: str, reset: bool = True) -> None:
        reqs = {id(r): r for r, _ in self._owner.values()}
        if self._staging:
            reqs[id(self._staging.req)] = self._staging.req
        if not reset:  # nothing will run: the queued requests fail too
            with self._cond:
                reqs.update((id(r), r) for r in self._queue)
                self._queue.clear()
        reqs.update((id(r[0][0]), r[0][0]) for r in (self.pages.resume if self.pages is not None else ()))
        self._owner.clear()
        self._staging = None
        if self.pages is not None:
            self.pages.reset()
        self.metrics.slots_busy.set(0)
        if reset:
            try:
                self.engine.reset()
            except Exception:
                log.error("slot reset failed: %s", traceback.format_exc())
        for req in reqs.values():
            if not req.finished:
                req.finished = True
                self.metrics.requests.labels("error").inc()
                self._deliver(req, Failed(message))


