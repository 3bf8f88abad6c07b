"""A pool of KV pages with reference counts and LRU eviction.

A page is in one of three states: *free* (refcount 0, holds nothing worth keeping), *in use*
(refcount > 0: some rows' page tables point at it) or *cached* (refcount 0 but registered in the
prefix index: its K/V may serve a later request). ``allocate`` takes free pages first, then evicts
cached pages, least recently released first, telling the owner of the index through ``on_evict``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable


class OutOfPages(RuntimeError):
    """Not enough free or evictable pages for an allocation (nothing was allocated)."""


class PagePool:
    def __init__(self, num_pages: int, on_evict: Callable[[int], None] | None = None):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")
        self.num_pages = num_pages
        self.refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives the lowest page first
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced cached pages, LRU first
        self._registered: set[int] = set()  # pages the prefix index knows (cached or in use)
        self.on_evict = on_evict
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_available(self) -> int:
        """Pages an allocation may take now (free + evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_available

    def allocate(self, n: int) -> list[int]:
        """``n`` pages with refcount 1, or ``OutOfPages`` (and nothing changed)."""
        if n > self.num_available:
            raise OutOfPages(f"need {n} KV pages, {self.num_available} of {self.num_pages} available")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._cached.popitem(last=False)  # least recently used
                self._registered.discard(page)
                self.evictions += 1
                if self.on_evict is not None:
                    self.on_evict(page)
            self.refcount[page] = 1
            pages.append(page)
        return pages

    def retain(self, page: int) -> None:
        """One more reference to ``page`` (in use or cached)."""
        if self.refcount[page] == 0:
            if page not in self._cached:
                raise ValueError(f"page {page} is free: nothing to share")
            del self._cached[page]
        self.refcount[page] += 1

    def release(self, page: int) -> None:
        """Drop one reference; an unreferenced page becomes cached (if registered) or free."""
        if self.refcount[page] <= 0:
            raise ValueError(f"page {page} released more often than retained")
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            if page in self._registered:
                self._cached[page] = None  # most recently used end
            else:
                self._free.append(page)

    def register(self, page: int) -> None:
        """Mark ``page`` as holding indexed K/V (kept when unreferenced, until evicted)."""
        self._registered.add(page)

    def is_registered(self, page: int) -> bool:
        return page in self._registered

    def check(self) -> None:
        """Internal consistency (tests): every page in exactly one state."""
        free, cached = set(self._free), set(self._cached)
        used = {p for p in range(self.num_pages) if self.refcount[p] > 0}
        assert len(free) == len(self._free) and not (free & cached) and not (free & used) and not (cached & used)
        assert free | cached | used == set(range(self.num_pages))
        assert cached <= self._registered
