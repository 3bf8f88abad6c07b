"""The host's pages for a paged ``SlotEngine``: prefix caching, reservation before each chunk,
registration of committed pages, preemption's choice.

``SlotPages`` keeps ``quasar_jax.paging.PageTables`` over ``B + 1`` rows: the B slots and the
staging row (the prompt being prefilled). The scheduler calls:

* ``begin(prompt)`` -> cached slots: the prompt's longest cached prefix (whole pages, at most
  ``len(prompt) - 1``: the last token is verified, never prefilled) is shared, pages for the rest
  of the prompt are reserved on the staging row (``OutOfPages`` when the pool cannot hold it now),
  and ``SlotEngine.begin`` loads the cached pages into the staging cache.
* ``admit(slot)`` -> (pages, from_page) for ``SlotEngine.admit``: the slot shares the staging
  row's pages (a request's ``n`` choices share the prompt's pages; its partial last page is copied
  on write). ``end_staging()`` releases the staging row once every choice is in.
* ``reserve(running)`` before every chunk: each running slot gets pages for every slot the chunk
  may write (``length - 1 + (N - 1)(K + 1) + T``, T the widest verify forward: K + 1 or the
  tree's nodes + 1), copies on write first; ``OutOfPages`` names no slot: the caller preempts
  (``youngest``) and tries again.
* ``committed(slot, tokens)`` after a chunk: full pages below ``len(tokens) - 1`` (final K/V)
  are indexed under the hash chain of the tokens, so hits do not depend on speculation: a page is
  indexed when its K/V is committed, whatever the draft length (rejected tokens' slots lie past
  it). ``free(slot)`` when the row ends: indexed pages stay cached (LRU).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from quasar_jax.paging import OutOfPages, PageTables

__all__ = ["OutOfPages", "SlotPages", "chunk_reach"]


def chunk_reach(engine) -> int:
    """Slots past ``length - 1`` one chunk of ``engine`` may write (its widest program)."""
    width = max(max(getattr(d, "num_nodes", d.num_draft), d.num_draft) + 1 for d in engine.drafters)
    return (engine.n - 1) * (engine.k + 1) + width


class SlotPages:
    def __init__(self, engine, *, prefix_caching: bool = True):
        self.engine = engine
        self.staging = engine.b  # the extra row
        self.tables = PageTables(engine.num_pages, engine.page_size, engine.b + 1, engine.max_pages,
                                 prefix_caching=prefix_caching)
        self.reach = chunk_reach(engine)
        self.preemptions = 0
        self._cached = 0
        self._copies: list[tuple[int, int]] = []
        self.tokens: dict[int, list[int]] = {}  # slot -> its tokens (prompt + generated)
        self.before: dict[int, tuple[int, int]] = {}  # slot -> (tokens generated, verify steps) before it resumed
        self.steps: dict[int, int] = {}  # slot -> verify steps since its admission
        self.resume: deque = deque()  # preempted choices: (owner, tokens, tokens generated, verify steps)
        if engine.num_pages < (least := self.pages_needed(2)):
            raise ValueError(f"kv_pages {engine.num_pages}: the pool cannot hold one request (a 2-token prompt "
                             f"and one chunk take {least} pages of {engine.page_size} slots)")

    @property
    def page_size(self) -> int:
        return self.engine.page_size

    def pages_needed(self, prompt_len: int) -> int:
        """Pages a request with this prompt needs at least (its prompt and one chunk)."""
        return self.tables.pages_for(min(prompt_len - 1 + self.reach, self.engine.s))

    def begin(self, prompt: Sequence[int], lookup: bool = True) -> int:
        t, row = self.tables, self.staging
        # The last prompt token is verified, never prefilled; a drafter reading the hidden state of
        # position P-2 (S4C) needs that position prefilled.
        reusable = len(prompt) - 1 - (1 if getattr(self.engine, "hidden", False) else 0)
        cached = t.admit(row, prompt, reusable=reusable if lookup else 0)
        try:
            t.reserve(row, cached, len(prompt) - 1)
        except OutOfPages:
            t.free(row)
            t.queried_tokens -= len(prompt)  # looked up again when retried
            t.hit_tokens -= cached
            raise
        self._cached = cached
        return cached

    def stage(self, prompt: Sequence[int], lookup: bool, busy: bool) -> int | None:
        """``begin`` here and on the engine (the cached pages loaded into its staging row) -> the
        cached slots; None when out of pages while other rows run (``busy``: try again later)."""
        try:
            cached = self.begin(prompt, lookup)
        except OutOfPages:
            if busy:
                return None
            raise
        if cached:
            self.engine.begin(prompt, prefix_pages=self.prefix_pages())
        else:
            self.engine.begin(prompt)
        return cached

    def make_room(self, owner: dict, prompt_len) -> tuple[list[int], int | None]:
        """``reserve`` for the running slots of ``owner`` (``slot -> (request, choice)``,
        requests with ``arrival``), preempting the youngest until it succeeds: each leaves
        ``owner`` for ``resume`` (with its tokens, ``prompt_len(request)`` telling how many it
        made). -> (the slots preempted, a lone slot the whole pool cannot hold or None)."""
        victims = []
        while owner:
            try:
                self.reserve({s: len(self.tokens[s]) for s in owner})
                return victims, None
            except OutOfPages:
                if len(owner) == 1:
                    return victims, next(iter(owner))
                slot = max(owner, key=lambda s: (owner[s][0].arrival, s))
                choice = owner.pop(slot)
                self.resume.append((choice, *self.totals(slot, prompt_len(choice[0]))))
                self.free(slot)
                self.preemptions += 1
                victims.append(slot)
        return victims, None

    def prefix_pages(self) -> list[int]:
        return self.tables.pages(self.staging)[:self._cached // self.page_size]

    def admit(self, slot: int, prompt: Sequence[int], before: tuple[int, int] = (0, 0)) -> tuple[list[int], int]:
        t = self.tables
        self.tokens[slot], self.before[slot], self.steps[slot] = list(prompt), tuple(before), 0
        t.fork(self.staging, slot)
        t.commit(self.staging, prompt, len(prompt) - 1)  # the prompt's full pages, once written
        t.commit(slot, prompt, len(prompt) - 1)
        return t.pages(slot), self._cached // self.page_size

    def end_staging(self) -> None:
        self.tables.free(self.staging)

    def reserve(self, running: dict[int, int]) -> None:
        """Pages for the next chunk of every running slot (``slot -> history length``), then the
        tables and copies to the engine. ``OutOfPages``: nothing sent (some rows may hold more)."""
        for slot, length in running.items():  # copies made on earlier tries wait in _copies
            self._copies += self.tables.reserve(slot, length - 1, min(length - 1 + self.reach, self.engine.s))
        self.engine.set_pages(self.tables.table[:self.engine.b], self._copies)
        self._copies = []

    def committed(self, slot: int, new: Sequence[int], steps: int) -> None:
        """``new`` tokens appended to ``slot`` (``steps`` verify steps since its admission)."""
        self.tokens[slot] += new
        self.steps[slot] = steps
        self.tables.commit(slot, self.tokens[slot], len(self.tokens[slot]) - 1)

    def totals(self, slot: int, prompt_len: int) -> tuple[list[int], int, int]:
        """(tokens, tokens generated, verify steps) of the choice in ``slot`` since its request began."""
        tokens = self.tokens[slot]
        return tokens, len(tokens) - prompt_len, self.before[slot][1] + self.steps[slot]

    def free(self, slot: int) -> None:
        self.tables.free(slot)
        self.tokens.pop(slot, None), self.before.pop(slot, None), self.steps.pop(slot, None)

    def reset(self) -> None:
        """Every page free, nothing cached or waiting (after a failure: the slots were reset)."""
        self.__init__(self.engine, prefix_caching=self.tables.prefix_caching)

    def stats(self) -> dict:
        return {**self.tables.stats(), "preemptions": self.preemptions}
