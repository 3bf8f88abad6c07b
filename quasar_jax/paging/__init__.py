"""Host-side KV page management: which pages each row holds, which are shared, which stay cached.

``pool`` (``PagePool``: reference counts, a free list, LRU eviction among unreferenced cached
pages) · ``prefix`` (``PrefixIndex``: full pages keyed by a hash chain of their tokens and their
prefix) · ``tables`` (``PageTables``: per-row page lists as a ``[B, M]`` table for the device,
prefix lookup on admission, copy on write of a shared partial page, registration of committed
pages). Pure Python and NumPy: no JAX at import (the server's process 0 decides allocation and
sends the tables); the device side is ``quasar_jax.model.paged_kv_cache``.
"""

from quasar_jax.paging.pool import OutOfPages, PagePool
from quasar_jax.paging.prefix import PrefixIndex, page_hashes
from quasar_jax.paging.tables import PageTables

__all__ = ["OutOfPages", "PagePool", "PageTables", "PrefixIndex", "page_hashes"]
