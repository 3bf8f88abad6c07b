"""Static key/value cache with per-row lengths.

Layout: ``k``, ``v`` are ``[L, B, S, G, E]`` (layer, row, slot, kv head, head dim); ``lengths``
``[B]`` counts the committed slots of each row. A forward call writes the K/V of token ``(b, t)``
into slot ``positions[b, t]``; slots at or past ``S`` are dropped, never clamped onto valid ones.
Rolling back rejected draft tokens is free: the engine just sets ``lengths`` back, and the
attention mask hides slots ``>= lengths`` that are not part of the current chunk.

Tree verification (``quasar_jax.speculative.tree``) writes its T chunk tokens at contiguous scratch slots and
passes a ``chunk_mask [B, T, T]``; after acceptance :meth:`KVCache.move` copies the accepted
path's K/V to contiguous slots (one gather and one scatter over all layers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from quasar_jax.model.config import Qwen3Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, S, G, E]
    v: jax.Array  # [L, B, S, G, E]
    lengths: jax.Array  # [B] int32: committed slots per row

    @classmethod
    def init(cls, cfg: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"cache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:  # S
        return self.k.shape[2]

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "KVCache":
        """Write ``k_new, v_new [B, T, G, E]`` of ``layer`` at slots ``positions [B, T]``.

        Row by row: the scatter names B as a batch dimension of both the cache and the indices
        (what ``vmap`` over rows would give, without its transposes), which GSPMD partitions along
        the rows, so a cache split over ``data`` is written where it lives. (A plain
        ``k.at[layer, rows, positions]`` made XLA all-gather each step's new K/V rows.)
        """
        b, t = positions.shape
        at = jnp.stack([jnp.full((b, t), layer, jnp.int32), positions.astype(jnp.int32)], axis=-1)  # [B, T, 2]
        return dataclasses.replace(self, k=_scatter_rows(self.k, at, k_new, (0, 2)),
                                   v=_scatter_rows(self.v, at, v_new, (0, 2)))

    def move(self, src: jax.Array, dst: jax.Array) -> "KVCache":
        """Copy the K/V of slots ``src [B, T]`` to slots ``dst [B, T]`` in every layer.

        All reads happen before any write; ``dst`` entries at or past ``S`` are dropped. Row by
        row, as :meth:`write`.
        """
        src = jnp.clip(src, 0, self.max_len - 1)[..., None]  # [B, T, 1]
        dst = dst.astype(jnp.int32)[..., None]

        def moved(x):  # [L, B, S, G, E]
            return _scatter_rows(x, dst, _gather_rows(x, src), (2,))

        return dataclasses.replace(self, k=moved(self.k), v=moved(self.v))

    def attention_mask(self, positions: jax.Array, chunk_mask: jax.Array | None = None) -> jax.Array:
        """Visibility ``[B, T, S]`` of cache slots for the queries at ``positions [B, T]``
        (:func:`visible` over every slot, with this cache's ``lengths``)."""
        slots = jnp.arange(self.max_len)[None, None, :]  # [1, 1, S]
        return visible(slots, positions, self.lengths, chunk_mask)

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array,
               mask: jax.Array) -> tuple[jax.Array, "KVCache"]:
        """Write ``k, v [B, T, G, E]`` of ``layer`` at ``slots [B, T]``, then attend the queries
        ``q [B, T, H, E]`` over the whole ``[S]`` strip under ``mask`` (:meth:`attention_mask`)
        -> ``(out [B, T, H, E], cache)``. Scores and softmax in float32."""
        cache = self.write(layer, k, v, slots)
        b, t, h, e = q.shape
        g = k.shape[2]
        keys, values = cache.k[layer], cache.v[layer]  # [B, S, G, E]
        q = q.reshape(b, t, g, h // g, e)  # [B, T, G, R, E]
        scores = jnp.einsum("btgre,bsge->bgrts", q, keys.astype(q.dtype),
                            preferred_element_type=jnp.float32) * (e ** -0.5)
        scores = jnp.where(mask[:, None, None], scores, -jnp.inf)  # [B, G, R, T, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bgrts,bsge->btgre", probs, values.astype(q.dtype)).reshape(b, t, h, e)
        return out, cache


def visible(slots: jax.Array, positions: jax.Array, lengths: jax.Array,
            chunk_mask: jax.Array | None = None) -> jax.Array:
    """Visibility ``[B, T, n]`` of cache ``slots [B or 1, 1, n]`` for the queries at ``positions [B, T]``.

    Slot ``s`` is visible to query ``(b, t)`` when ``s <= positions[b, t]`` (causal) and it is
    either committed (``s < lengths[b]``) or part of this call's chunk (``s >= positions[b, 0]``).

    With ``chunk_mask [B, T, T]`` (bool) the chunk occupies slots ``c0 .. c0+T-1``
    (``c0 = positions[b, 0]``, token t at slot c0+t) and chunk slot ``c0+j`` is visible to query
    t iff ``chunk_mask[b, t, j]``; slots outside the chunk follow the rule above. One rule for
    the dense strip and for every block of pages (``quasar_jax.model.paged_kv_cache``).
    """
    causal = slots <= positions[:, :, None]
    committed = slots < lengths[:, None, None]
    if chunk_mask is None:
        in_chunk = slots >= positions[:, :1, None]
        return causal & (committed | in_chunk)
    b, t = positions.shape
    rel = slots - positions[:, :1, None]  # [B, 1, n] chunk index of each slot
    in_chunk = (rel >= 0) & (rel < t)
    idx = jnp.broadcast_to(jnp.clip(rel, 0, t - 1), (b, t, slots.shape[-1]))
    seen = jnp.take_along_axis(chunk_mask.astype(bool), idx, axis=2)  # [B, T, n]
    return jnp.where(in_chunk, seen, causal & committed)


# Row-batched gather / scatter on ``[L, B, S, G, E]`` with index tuples ``idx [B, T, n]`` (B is a
# batch dimension of both: row b reads / writes only row b).
def _gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[:, b, idx[b, t, 0]]`` for every (b, t) -> ``[L, B, T, G, E]`` (slots clipped by the caller)."""
    l, _, _, g, e = x.shape
    dims = jax.lax.GatherDimensionNumbers(offset_dims=(0, 3, 4), collapsed_slice_dims=(2,),
                                          start_index_map=(2,), operand_batching_dims=(1,),
                                          start_indices_batching_dims=(0,))
    return jax.lax.gather(x, idx, dims, slice_sizes=(l, 1, 1, g, e), mode="clip")


def _scatter_rows(x: jax.Array, idx: jax.Array, updates: jax.Array, indexed: tuple[int, ...]) -> jax.Array:
    """Set row b of ``x`` at the ``indexed`` dims given by ``idx [B, T, len(indexed)]``.

    ``indexed`` (0, 2): (layer, slot), updates ``[B, T, G, E]``; (2,): slot in every layer,
    updates ``[L, B, T, G, E]``. Out-of-range indices are dropped.
    """
    window = (2, 3) if indexed == (0, 2) else (0, 3, 4)
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=window, inserted_window_dims=indexed,
                                           scatter_dims_to_operand_dims=indexed, operand_batching_dims=(1,),
                                           scatter_indices_batching_dims=(0,))
    return jax.lax.scatter(x, idx, updates.astype(x.dtype), dims, mode="drop",
                           indices_are_sorted=False, unique_indices=False)
