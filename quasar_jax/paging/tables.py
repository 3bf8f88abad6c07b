"""Per-row page tables over one ``PagePool``, with prefix caching.

Row ``r`` holds the pages ``pages(r)``; slot ``s`` of the row lives in page
``pages(r)[s // page_size]``. ``table`` is the ``[rows, M]`` int32 array the device reads
(``quasar_jax.model.paged_kv_cache``), unallocated entries ``num_pages`` (writes there are dropped).

The life of a row:

* ``admit(row, tokens, reusable)``: the longest indexed prefix of ``tokens[:reusable]`` (whole
  pages) becomes the row's first pages (shared, read only); returns how many slots are cached.
* ``reserve(row, write_from, end)`` before a device chunk writes slots ``write_from .. end-1``:
  allocates the missing pages and replaces every page of the written range that another row or
  the index also holds by a fresh copy (copy on write: returns ``(src, dst)`` page copies for the
  device to make before the chunk runs). All or nothing: ``OutOfPages`` leaves the row unchanged.
* ``commit(row, tokens, committed)``: indexes the row's full pages below slot ``committed`` (their
  K/V final), keyed by ``tokens``' hash chain; ``fork(src, dst)`` shares a row's pages with another
  (``n > 1``); ``free(row)`` releases the row's pages (indexed ones stay cached until evicted).

Rejected draft tokens never leak pages: their slots lie in pages the row already holds (reserved
for ``length + K + 1`` or the tree's scratch) and the next chunk overwrites them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from quasar_jax.paging.pool import OutOfPages, PagePool
from quasar_jax.paging.prefix import PrefixIndex, page_hashes


class PageTables:
    def __init__(self, num_pages: int, page_size: int, rows: int, max_pages_per_row: int, *,
                 prefix_caching: bool = True):
        if page_size < 1 or rows < 1 or max_pages_per_row < 1:
            raise ValueError("page_size, rows and max_pages_per_row must be positive")
        self.index = PrefixIndex()
        self.pool = PagePool(num_pages, on_evict=self.index.remove_page)
        self.page_size, self.max_pages = page_size, max_pages_per_row
        self.prefix_caching = prefix_caching
        self._pages: list[list[int]] = [[] for _ in range(rows)]
        self._chain: list[list[bytes]] = [[] for _ in range(rows)]  # hashes of the row's indexed pages
        self.table = np.full((rows, max_pages_per_row), num_pages, np.int32)
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which found cached

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    def pages(self, row: int) -> list[int]:
        return list(self._pages[row])

    def pages_for(self, slots: int) -> int:
        return -(-slots // self.page_size)

    def _set(self, row: int, pages: list[int]) -> None:
        self._pages[row] = pages
        self.table[row] = self.num_pages
        self.table[row, :len(pages)] = pages

    def admit(self, row: int, tokens: Sequence[int], reusable: int) -> int:
        """Start ``row`` (empty) on ``tokens``; returns the cached slots (a multiple of the page
        size, at most ``reusable``: the caller computes the rest)."""
        if self._pages[row]:
            raise ValueError(f"row {row} still holds pages")
        self.queried_tokens += len(tokens)
        if not self.prefix_caching:
            return 0
        hashes = page_hashes(tokens[:max(0, reusable)], self.page_size)[:self.max_pages]
        pages = self.index.match(hashes)
        for p in pages:
            self.pool.retain(p)
        self._set(row, pages)
        self._chain[row] = hashes[:len(pages)]
        cached = len(pages) * self.page_size
        self.hit_tokens += cached
        return cached

    def reserve(self, row: int, write_from: int, end: int) -> list[tuple[int, int]]:
        """Pages for slots ``0 .. end-1`` of ``row``, the written ones (from ``write_from``) its own;
        ``end`` is clipped to the row's ``max_pages``. Returns the page copies to make first."""
        pages = self._pages[row]
        need = min(self.pages_for(end), self.max_pages)
        first = max(0, write_from) // self.page_size
        shared = [i for i in range(first, min(len(pages), need))
                  if self.pool.refcount[pages[i]] > 1 or self.pool.is_registered(pages[i])]
        missing = max(0, need - len(pages))
        if missing + len(shared) > self.pool.num_available:
            raise OutOfPages(f"row needs {missing + len(shared)} more KV pages, "
                             f"{self.pool.num_available} of {self.num_pages} available")
        copies = []
        fresh = self.pool.allocate(missing + len(shared))
        pages = list(pages)
        for i in shared:
            src, dst = pages[i], fresh.pop()
            copies.append((src, dst))
            pages[i] = dst
            self.pool.release(src)
        pages.extend(fresh)
        self._set(row, pages)
        self._chain[row] = self._chain[row][:first] if shared else self._chain[row]
        return copies

    def commit(self, row: int, tokens: Sequence[int], committed: int) -> None:
        """Index the row's full pages below slot ``committed`` (``tokens[:committed]`` their K/V)."""
        if not self.prefix_caching:
            return
        pages, chain = self._pages[row], self._chain[row]
        full = min(committed // self.page_size, len(pages))
        if full <= len(chain):
            return
        hashes = page_hashes(tokens[:full * self.page_size], self.page_size)
        for i in range(len(chain), full):
            if self.index.insert(hashes[i], pages[i]):
                self.pool.register(pages[i])
        self._chain[row] = hashes

    def fork(self, src: int, dst: int) -> None:
        """``dst`` (empty) shares every page of ``src`` (its written pages are copied on write)."""
        if self._pages[dst]:
            raise ValueError(f"row {dst} still holds pages")
        for p in self._pages[src]:
            self.pool.retain(p)
        self._set(dst, list(self._pages[src]))
        self._chain[dst] = list(self._chain[src])

    def free(self, row: int) -> None:
        """Release ``row``'s pages (indexed ones stay cached, LRU)."""
        for p in reversed(self._pages[row]):  # the prefix's first pages end most recently used
            self.pool.release(p)
        self._set(row, [])
        self._chain[row] = []

    def stats(self) -> dict:
        return {"pages_total": self.num_pages, "pages_used": self.pool.num_used,
                "pages_free": self.pool.num_available, "pages_cached": self.pool.num_cached,
                "prefix_queried_tokens": self.queried_tokens, "prefix_hit_tokens": self.hit_tokens,
                "evictions": self.pool.evictions}
