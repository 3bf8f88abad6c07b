"""Attention over KV pages: one interface, two paths.

``attend_pages(q, pages, scales, table, vis, ...)`` attends the queries ``q [B, T, H, E]`` of one
layer over the pages a row uses. ``pages [P, page, 2G, E]`` is one layer's pool in the layout of
JAX's TPU ragged paged attention kernel (K of KV head g at combined head 2g, V at 2g+1);
``scales [P, page, 2G]`` (bfloat16) when the pages are int8 (``quasar_jax.model.kv_quant``), else
``None``; ``table [B, M]`` the pages of each row (slot s of row b lives at
``pages[table[b, s // page], s % page]``); ``vis`` the :class:`Visibility` of the call.

* :func:`reference_attention` (every backend; the CPU path): an online softmax over blocks of
  ``pages_per_block`` pages, looping only over the blocks that hold a slot some row of the batch
  can see (a ``while_loop`` with a data-dependent trip count: a row that uses 300 of 4,096 slots
  reads 3 blocks of 128, not the whole strip). Any mask: causal, committed + chunk, tree.
* :func:`ragged_kernel_attention` (TPU): ``jax.experimental.pallas.ops.tpu``'s
  ``ragged_paged_attention``, for causal chunks on float pages (its K/V scale is one static
  float, so per-token int8 scales and tree masks take the reference path).

:func:`attention_path` is the dispatch rule; ``PAGED_ATTENTION`` in the environment (``reference``)
forces the reference on TPU.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

from quasar_jax.model.kv_cache import visible
from quasar_jax.model.kv_quant import dequantize

REFERENCE, RAGGED_KERNEL = "reference", "ragged_kernel"
BLOCK_TOKENS = 128  # slots per block of the reference path (whole pages)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Visibility:
    """What decides which slots a call's queries see (``quasar_jax.model.kv_cache.visible``)."""

    positions: jax.Array  # [B, T] int32
    lengths: jax.Array  # [B] int32: committed slots before the call
    chunk_mask: jax.Array | None = None  # [B, T, T] bool (tree verification) or None (causal)

    def used_slots(self) -> jax.Array:
        """``[]`` int32: one past the last slot any query of the batch may see."""
        t = self.positions.shape[1]
        last = jnp.maximum(jnp.max(self.positions) + 1, jnp.max(self.positions[:, 0]) + t)
        return jnp.maximum(last, jnp.max(self.lengths)).astype(jnp.int32)


def attention_path(backend: str, *, tree: bool, int8: bool) -> str:
    """Which implementation attends: the TPU kernel for causal float chunks on TPU, else the reference."""
    if backend == "tpu" and not tree and not int8 and os.environ.get("PAGED_ATTENTION") != REFERENCE:
        return RAGGED_KERNEL
    return REFERENCE


def attend_pages(q, pages, scales, table, vis: Visibility, *, pages_per_block: int | None = None):
    """``q [B, T, H, E]`` over the pages of ``table [B, M]`` -> ``[B, T, H, E]`` (``q.dtype``)."""
    path = attention_path(jax.default_backend(), tree=vis.chunk_mask is not None, int8=scales is not None)
    if path == RAGGED_KERNEL:
        return ragged_kernel_attention(q, pages, table, vis)
    return reference_attention(q, pages, scales, table, vis, pages_per_block=pages_per_block)


def reference_attention(q, pages, scales, table, vis: Visibility, *, pages_per_block: int | None = None):
    """Online softmax over page blocks (pure JAX; scores and softmax in float32)."""
    b, t, h, e = q.shape
    num_pages, page, g2, _ = pages.shape
    g, r = g2 // 2, h // (g2 // 2)
    m_pages = table.shape[1]
    ppb = max(1, min(pages_per_block or max(1, BLOCK_TOKENS // page), m_pages))
    n_static = -(-m_pages // ppb)
    table = jnp.pad(table, ((0, 0), (0, n_static * ppb - m_pages)), constant_values=num_pages - 1)
    blk = ppb * page
    n_blocks = jnp.minimum((vis.used_slots() + blk - 1) // blk, n_static)
    qg = q.reshape(b, t, g, r, e)  # [B, T, G, R, E]

    def block(j, carry):
        m, l, acc = carry  # [B, G, R, T], [B, G, R, T], [B, G, R, T, E] float32
        ids = jax.lax.dynamic_slice_in_dim(table, j * ppb, ppb, axis=1)  # [B, ppb]
        kv = pages[ids].reshape(b, blk, g2, e)  # [B, blk, 2G, E]
        if scales is not None:
            kv = dequantize(kv, scales[ids].reshape(b, blk, g2), q.dtype)
        keys, values = kv[:, :, 0::2].astype(q.dtype), kv[:, :, 1::2].astype(q.dtype)  # [B, blk, G, E]
        slots = (j * blk + jnp.arange(blk, dtype=jnp.int32))[None, None, :]
        seen = visible(slots, vis.positions, vis.lengths, vis.chunk_mask)[:, None, None]  # [B, 1, 1, T, blk]
        s = jnp.einsum("btgre,bsge->bgrts", qg, keys, preferred_element_type=jnp.float32) * (e ** -0.5)
        s = jnp.where(seen, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(seen, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bgrts,bsge->bgrte", p.astype(q.dtype), values, preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

    init = (jnp.full((b, g, r, t), -1e30, jnp.float32), jnp.zeros((b, g, r, t), jnp.float32),
            jnp.zeros((b, g, r, t, e), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, block, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, G, R, T, E]
    return jnp.einsum("bgrte->btgre", out).reshape(b, t, h, e).astype(q.dtype)


def ragged_kernel_attention(q, pages, table, vis: Visibility, *, impl=None, **kernel_options):
    """JAX's TPU ragged paged attention for a causal chunk right after each row's committed slots
    (``positions[b] = lengths[b] .. lengths[b] + T - 1``, what prefill and chain verification pass).

    ``impl`` replaces the kernel by a function of its signature (the tests pass JAX's
    ``ref_ragged_paged_attention``: the kernel itself does not run in Pallas' TPU interpreter on
    CPU in jax 0.10.2, which fails on its reshaped refs)."""
    b, t, h, e = q.shape
    kv_lens = (vis.positions[:, -1] + 1).astype(jnp.int32)
    cu_q_lens = (jnp.arange(b + 1, dtype=jnp.int32) * t)
    out = (impl or ragged_paged_attention)(q.reshape(b * t, h, e), pages, kv_lens, table.astype(jnp.int32), cu_q_lens,
                                 jnp.array([b], jnp.int32), sm_scale=e ** -0.5, **kernel_options)
    return out.reshape(b, t, h, e)
