"""The verify step: draft, one forward of the target over the drafted tokens, acceptance.

Both steps return ``(tokens [B, K+1], n_emit [B], cache, raw logits [B, T, V], emit_rows [B, K+1]
(, hidden [B, T, D]))``: the tokens to append (accepted drafts, then the bonus or correction token),
how many, the cache with the verify pass's K/V (lengths not yet updated), the verifier's raw
logits, the logits row behind each emitted token, and on request the final hidden states.

* :func:`verify_chain`: a chain drafter's ``[last, draft_0 .. draft_{K-1}]`` at positions
  ``lengths-1 .. lengths-1+K`` (each row at its own offset); all K+1 K/V are written, the
  rejected ones lie past the new length (masked, overwritten next step: free rollback).
* :func:`verify_tree`: a tree drafter's trie under a tree mask (``quasar_jax.speculative.tree``);
  acceptance walks the trie, then :meth:`KVCache.move` copies the accepted path's K/V from its
  scratch slots to the contiguous slots ``lengths .. lengths + n_accept - 1``.

``process(logits, tree, accept)``, when given, returns ``accept``'s outputs for the processed
logits (the logits stage, ``quasar_jax.speculative.logits``: penalties, bias, min_tokens).
"""

from __future__ import annotations

import jax.numpy as jnp

from quasar_jax.speculative.tree import chain_tree, tree_inputs


def verify_chain(model, drafter, sampler, verifier, history, lengths, cache, room, rows, keys, *, process=None,
                 return_hidden: bool = False):
    """Draft a chain of K tokens, verify ``[last, draft]`` in one forward, accept.

    ``history [B, S]``, ``lengths [B]``, ``room [B]`` (most tokens a row may still accept).
    """
    k = drafter.num_draft
    draft, n_draft, cache = drafter.draft(model, history, lengths, cache)
    n_draft = jnp.clip(jnp.minimum(n_draft, room), 0, k)
    last = jnp.take_along_axis(history, lengths[:, None] - 1, axis=1)  # [B, 1]
    verify_tokens = jnp.concatenate([last, draft], axis=1)  # [B, K+1]
    positions = lengths[:, None] - 1 + jnp.arange(k + 1, dtype=jnp.int32)  # [B, K+1]
    cache = cache.replace(lengths=lengths - 1)
    logits, cache, *hidden = model(verify_tokens, positions, cache, mode=verifier,
                                   return_hidden=return_hidden)  # [B, K+1, V] (, [B, K+1, D])

    def accept(scored):
        return sampler.accept(draft, n_draft, scored, rows, keys)

    tokens, n_emit = accept(logits) if process is None else process(logits, chain_tree(draft, n_draft), accept)
    emit_rows = jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32), tokens.shape)
    return (tokens, n_emit, cache, logits, emit_rows, *hidden)


def verify_tree(model, drafter, sampler, verifier, history, lengths, cache, room, rows, keys, *, process=None,
                return_hidden: bool = False):
    """Draft a tree, verify it in one forward, accept, and move the accepted K/V into place.

    ``history [B, S]``, ``lengths [B]``, ``room [B]`` (most tokens a row may still accept) ->
    ``tokens [B, K+1]``, ``n_emit [B]``, cache (lengths not yet updated), the raw verify logits
    ``[B, N+1, V]`` and ``emit_rows [B, K+1]``: the logits row behind each emitted token (the
    root's for the first, then the parent node's). ``process(logits, tree, accept)``, when given,
    returns ``accept``'s outputs for the processed logits (``quasar_jax.speculative.logits``: penalties, bias,
    min_tokens). ``return_hidden`` appends the verify forward's final hidden states ``[B, N+1, D]``
    (S4C's feature reuse reads the row ``emit_rows`` gives for the last emitted token).
    """
    s = history.shape[1]
    tree, cache = drafter.draft_tree(model, history, lengths, cache)
    last = jnp.take_along_axis(history, lengths[:, None] - 1, axis=1)  # [B, 1]
    tokens_in, positions, chunk_mask, depth = tree_inputs(tree, last[:, 0], lengths)
    node = jnp.arange(tree.num_nodes, dtype=jnp.int32)[None, :]  # [1, N]
    valid = (node < tree.n_nodes[:, None]) & (depth <= room[:, None]) & (lengths[:, None] + node < s)
    cache = cache.replace(lengths=lengths - 1)
    logits, cache, *hidden = model(tokens_in, positions, cache, mode=verifier, chunk_mask=chunk_mask,
                                   return_hidden=return_hidden)  # [B, N+1, V] (, [B, N+1, D])

    def accept(scored):
        return sampler.accept_tree(tree, valid, scored, rows, keys)

    tokens, n_emit, path = accept(logits) if process is None else process(logits, tree, accept)
    level = jnp.arange(tree.max_depth, dtype=jnp.int32)[None, :]  # [1, K]
    dst = jnp.where(level < n_emit[:, None] - 1, lengths[:, None] + level, s)  # s = dropped
    emit_rows = jnp.pad(path + 1, ((0, 0), (1, 0)))  # [B, K+1] (past the path: 0, unused)
    return (tokens, n_emit, cache.move(lengths[:, None] + jnp.maximum(path, 0), dst), logits, emit_rows, *hidden)
