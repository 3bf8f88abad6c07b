"""The scheduler over a paged ``SlotEngine``: prefix caching at admission, pages reserved before
every chunk, preemption of the youngest running choice when the pool runs out.

``PagedScheduler`` is the ``Scheduler`` with the host's pages (``quasar_jax.serving.kv_pages.
SlotPages``): a new prompt is staged after its longest cached prefix (a prompt whose pages are
not free yet waits at the head of the queue while rows run), a preempted choice is staged again
before any new request, from its prompt and the tokens it made (its stream goes on where it
stopped; ``max_tokens`` counts what it already made), and before every chunk each running row
gets the pages the chunk may write.
"""

from __future__ import annotations

import numpy as np

from quasar_jax.serving.kv_pages import SlotPages
from quasar_jax.serving.scheduler import Finished, Scheduler, _Staging
from quasar_jax.serving.slots import prefill_pieces
from quasar_jax.speculative.results import CACHE_FULL, FINISH_CODES


class PagedScheduler(Scheduler):
    def __init__(self, engine, *, prefix_caching: bool = True, **kwargs):
        super().__init__(engine, **kwargs)
        self.pages = SlotPages(engine, prefix_caching=prefix_caching)
        self.metrics.watch_pages(lambda: self.pages.stats())

    def _start_staging(self) -> _Staging | None:
        """The next prompt (a preempted choice first) begun on the engine, or None: none waits,
        or its KV pages are not free yet."""
        eng, busy = self.engine, bool(self._owner)
        if self.pages.resume and len(self._owner) < eng.b:
            (req, index), tokens, produced, steps = self.pages.resume[0]
            if (cached := self.pages.stage(tokens, True, busy)) is None:
                return None
            self.pages.resume.popleft()
            return _Staging(req, self._pieces(tokens, cached), None, index, True, (tokens, produced, steps))
        req = self._next_request(len(self._owner) < eng.b)
        if req is None:
            return None
        cached = 0
        if req.max_tokens > 0:  # echo prefills every position (its logprobs)
            cached = self.pages.stage(req.prompt, req.prompt_logprobs is None, busy)
            if cached is None:
                with self._cond:
                    self._queue.appendleft(req)  # waits for pages
                return None
        else:
            eng.begin(req.prompt)
        return _Staging(req, self._pieces(req.prompt, cached), None if req.prompt_logprobs is None else [None])

    def _pieces(self, tokens, cached: int) -> list[tuple[int, int]]:
        return [(cached + a, n) for a, n in prefill_pieces(len(tokens) - 1 - cached, self.engine.buckets)]

    def _before_chunk(self) -> None:
        """Pages for the next chunk of every running row; the youngest running choices are
        preempted while the pool cannot (each resumes later from its prompt and its tokens)."""
        victims, full = self.pages.make_room(self._owner, lambda req: len(req.prompt))
        if ended := victims + ([full] if full is not None else []):
            self.engine.finish(np.isin(np.arange(self.engine.b), ended))
        if full is not None:  # alone and still out of pages: the pool is its limit
            req, index = self._owner[full]
            _, made, steps = self.pages.totals(full, len(req.prompt))
            self._retire(full, Finished(FINISH_CODES[CACHE_FULL].value, made, steps, index))
        self.metrics.slots_busy.set(len(self._owner))
