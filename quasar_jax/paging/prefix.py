"""The prefix index: full KV pages keyed by a hash chain of their tokens and everything before.

``h_0 = H(b"", tokens[0:page])``, ``h_i = H(h_{i-1}, tokens[i*page:(i+1)*page])`` (BLAKE2b, 16
bytes: the same in every process, so process 0's decisions can be checked elsewhere). A page's key
therefore names its whole prefix: two requests share page i only if their first ``(i+1) * page``
tokens are equal. Only full pages are indexed; a page is indexed once its K/V is committed.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def page_hashes(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """The hash chain of the full pages of ``tokens``."""
    arr = np.asarray(tokens, np.int32)
    out, prev = [], b""
    for i in range(len(arr) // page_size):
        prev = hashlib.blake2b(prev + arr[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


class PrefixIndex:
    def __init__(self):
        self._page: dict[bytes, int] = {}  # hash -> page
        self._hash: dict[int, bytes] = {}  # page -> hash

    def __len__(self) -> int:
        return len(self._page)

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The pages of the longest indexed prefix of ``hashes``."""
        pages = []
        for h in hashes:
            page = self._page.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def insert(self, h: bytes, page: int) -> bool:
        """Index ``page`` under ``h``; False (nothing changed) if ``h`` or ``page`` is indexed already."""
        if h in self._page or page in self._hash:
            return False
        self._page[h], self._hash[page] = page, h
        return True

    def remove_page(self, page: int) -> None:
        """Forget ``page`` (evicted)."""
        h = self._hash.pop(page, None)
        if h is not None:
            del self._page[h]

    def has_page(self, page: int) -> bool:
        return page in self._hash
