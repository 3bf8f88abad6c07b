"""Paged key/value cache: one pool of fixed-size pages per layer, per-row page tables.

Layout: ``kv`` is a tuple of L arrays ``[P, page, 2G, E]`` (pages, slot in page, combined K/V
head, head dim; K of KV head g at 2g and V at 2g+1, the layout of JAX's TPU ragged paged
attention kernel); ``scale`` the matching tuple of ``[P, page, 2G]`` bfloat16 scales when the pages
are int8 (``quasar_jax.model.kv_quant``: one bfloat16 scale per token and KV head), else ``None``;
``page_table [B, M]`` the pages of each row: slot ``s`` of row ``b`` lives at
``kv[l][page_table[b, s // page], s % page]``; ``lengths [B]`` the committed slots of each row.
A row's slots run ``0 .. M * page - 1`` (``max_len``); the allocation of pages to rows (and their
sharing between rows: prefix caching) is the caller's, on the host.

It has the interface of :class:`~quasar_jax.model.kv_cache.KVCache` (``write``, ``move``,
``attention_mask``, ``attend``, ``lengths``, ``replace``, ``batch``, ``max_len``), so the
forward, the drafters and the loop take either. Slots at or past ``max_len`` and table entries
``>= P`` (unallocated) are dropped on write. Rolling back rejected draft tokens stays free: their
slots lie in pages the row already holds, past its length, and the next chunk overwrites them.
Attention reads only the pages a row's queries can see (``quasar_jax.model.paged_attention``).
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp

from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.kv_cache import KVCache
from quasar_jax.model.kv_quant import SCALE_DTYPE, kv_storage_dtype, quantize
from quasar_jax.model.paged_attention import Visibility, attend_pages

DEFAULT_PAGE_SIZE = 16  # the TPU kernel's usual page (tpu-inference serves with 16-128)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    kv: tuple  # L x [P, page, 2G, E]
    scale: tuple | None  # L x [P, page, 2G] bfloat16 (int8 pages) or None
    page_table: jax.Array  # [B, M] int32
    lengths: jax.Array  # [B] int32: committed slots per row

    @classmethod
    def init(cls, cfg: Qwen3Config, page_table: jax.Array, num_pages: int, page_size: int = DEFAULT_PAGE_SIZE,
             dtype=jnp.float32, kv_dtype: str = "auto") -> "PagedKVCache":
        """An empty pool of ``num_pages`` pages of ``page_size`` slots; rows use ``page_table [B, M]``."""
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"paged cache needs num_pages > 0 and page_size > 0, got {num_pages}, {page_size}")
        store = kv_storage_dtype(kv_dtype, dtype)
        shape = (num_pages, page_size, 2 * cfg.num_key_value_heads, cfg.head_dim)
        kv = tuple(jnp.zeros(shape, store) for _ in range(cfg.num_hidden_layers))
        scale = (tuple(jnp.ones(shape[:-1], SCALE_DTYPE) for _ in range(cfg.num_hidden_layers))
                 if store == jnp.int8 else None)
        table = jnp.asarray(page_table, jnp.int32)
        return cls(kv=kv, scale=scale, page_table=table, lengths=jnp.zeros((table.shape[0],), jnp.int32))

    @classmethod
    def contiguous(cls, cfg: Qwen3Config, batch: int, max_len: int, page_size: int = DEFAULT_PAGE_SIZE,
                   dtype=jnp.float32, kv_dtype: str = "auto") -> "PagedKVCache":
        """Offline decoding: row b owns pages ``b*M .. b*M + M - 1`` (``M = ceil(max_len / page_size)``)."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        m = -(-max_len // page_size)  # max_len rounded up to whole pages
        table = jnp.arange(batch * m, dtype=jnp.int32).reshape(batch, m)
        return cls.init(cfg, table, batch * m, page_size, dtype, kv_dtype)

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.kv[0].shape[1]

    @property
    def num_pages(self) -> int:  # P
        return self.kv[0].shape[0]

    @property
    def max_len(self) -> int:  # S: slots a row can address
        return self.page_table.shape[1] * self.page_size

    @property
    def int8(self) -> bool:
        return self.scale is not None

    def replace(self, **changes) -> "PagedKVCache":
        return dataclasses.replace(self, **changes)

    def locate(self, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``slots [B, T]`` -> (page ``[B, T]``, offset ``[B, T]``); slots past ``max_len`` -> page P (dropped)."""
        page = self.page_size
        idx = jnp.clip(slots // page, 0, self.page_table.shape[1] - 1)
        pages = jnp.take_along_axis(self.page_table, idx.astype(jnp.int32), axis=1)
        pages = jnp.where((slots >= 0) & (slots < self.max_len), pages, self.num_pages)
        return pages, slots % page

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "PagedKVCache":
        """Write ``k_new, v_new [B, T, G, E]`` of ``layer`` at slots ``positions [B, T]`` (quantized
        on write for int8 pages)."""
        b, t, g, e = k_new.shape
        new = jnp.stack([k_new, v_new], axis=3).reshape(b, t, 2 * g, e)  # K at 2g, V at 2g+1
        pages, offsets = self.locate(positions)
        kv, scale = list(self.kv), self.scale
        if self.int8:
            new, s = quantize(new)
            scale = list(scale)
            scale[layer] = scale[layer].at[pages, offsets].set(s, mode="drop")
            scale = tuple(scale)
        kv[layer] = kv[layer].at[pages, offsets].set(new.astype(kv[layer].dtype), mode="drop")
        return dataclasses.replace(self, kv=tuple(kv), scale=scale)

    def move(self, src: jax.Array, dst: jax.Array) -> "PagedKVCache":
        """Copy the K/V of slots ``src [B, T]`` to slots ``dst [B, T]`` in every layer (all reads
        before any write; ``dst`` at or past ``max_len`` dropped)."""
        src_pages, src_off = self.locate(jnp.clip(src, 0, self.max_len - 1))
        dst_pages, dst_off = self.locate(dst)

        def moved(x):
            return x.at[dst_pages, dst_off].set(x[src_pages, src_off], mode="drop")

        scale = None if self.scale is None else tuple(moved(x) for x in self.scale)
        return dataclasses.replace(self, kv=tuple(moved(x) for x in self.kv), scale=scale)

    def copy_pages(self, src: jax.Array, dst: jax.Array) -> "PagedKVCache":
        """Copy pages ``src [C]`` to pages ``dst [C]`` in every layer (``dst >= P`` dropped)."""
        return self.put_pages(self, src, dst)

    def put_pages(self, other: "PagedKVCache", src: jax.Array, dst: jax.Array) -> "PagedKVCache":
        """Pages ``src [C]`` of ``other`` (a pool of the same page shape and dtype) into this
        pool's pages ``dst [C]`` in every layer (``dst >= P`` dropped; all reads first)."""
        ids = jnp.clip(src, 0, other.num_pages - 1)

        def put(x, y):
            return x.at[dst].set(y[ids], mode="drop")

        scale = None if self.scale is None else tuple(map(put, self.scale, other.scale))
        return dataclasses.replace(self, kv=tuple(map(put, self.kv, other.kv)), scale=scale)

    def attention_mask(self, positions: jax.Array, chunk_mask: jax.Array | None = None) -> Visibility:
        """What the call's queries see (evaluated block by block by the attention)."""
        return Visibility(positions=positions, lengths=self.lengths, chunk_mask=chunk_mask)

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array,
               mask: Visibility) -> tuple[jax.Array, "PagedKVCache"]:
        """Write ``k, v [B, T, G, E]`` at ``slots [B, T]``, then attend ``q [B, T, H, E]`` over the
        row's pages (the chunk sees its own K/V as the cache holds them: int8 included)."""
        cache = self.write(layer, k, v, slots)
        scale = None if cache.scale is None else cache.scale[layer]
        return attend_pages(q, cache.kv[layer], scale, cache.page_table, mask), cache


class KVLayout(str, enum.Enum):
    DENSE = "dense"  # KVCache: a [S] strip per row
    PAGED = "paged"  # PagedKVCache: pages from one pool


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """How a program's cache is laid out and stored (static: part of a compiled program's key).

    ``layout`` dense or paged, ``page_size`` (paged), ``kv_dtype`` auto (the model's compute
    dtype) | bfloat16 | float32 | int8 (int8 needs pages).
    """

    layout: KVLayout | str = KVLayout.PAGED
    page_size: int = DEFAULT_PAGE_SIZE
    kv_dtype: str = "auto"

    def __post_init__(self):
        try:
            object.__setattr__(self, "layout", KVLayout(self.layout))
        except ValueError:
            raise ValueError(f"kv_layout must be dense or paged, got {self.layout!r}") from None
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {self.page_size!r}")
        kv_storage_dtype(self.kv_dtype, jnp.float32)  # validates
        if self.kv_dtype == "int8" and self.layout is KVLayout.DENSE:
            raise ValueError("kv_dtype int8 needs the paged layout (kv_layout='paged')")

    def init(self, cfg: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32):
        """An empty offline cache of ``batch`` rows x ``max_len`` slots."""
        if self.layout is KVLayout.DENSE:
            return KVCache.init(cfg, batch, max_len, kv_storage_dtype(self.kv_dtype, dtype))
        return PagedKVCache.contiguous(cfg, batch, max_len, self.page_size, dtype, self.kv_dtype)


def cache_bytes_per_token(cfg: Qwen3Config, kv_dtype: str, model_dtype=jnp.bfloat16) -> int:
    """Bytes of K/V (and scales) one token takes in every layer."""
    store = kv_storage_dtype(kv_dtype, model_dtype)
    per_head = cfg.head_dim * store.itemsize + (jnp.dtype(SCALE_DTYPE).itemsize if store == jnp.int8 else 0)
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * per_head
