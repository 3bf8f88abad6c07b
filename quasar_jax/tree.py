"""Tree verification: several draft continuations checked by ONE verify forward (docs/tree.md).

A :class:`TreeDraft` is a token trie of at most N nodes per row hanging below the root, the row's
last committed token. Node ``i`` holds ``tokens[b, i]`` and ``parent[b, i]`` (a node index, -1 =
the root); parents precede their children and depth (root = 0) is at most K. The verify forward
feeds ``[root, node_0 .. node_{N-1}]`` (T = N+1):

* position of node i = ``lengths - 1 + depth(i)`` (RoPE sees each path as a plain sequence);
* its K/V goes to scratch slot ``lengths + i`` (root at ``lengths - 1``);
* ``chunk_mask [B, N+1, N+1]``: a node sees the committed cache, the root and its own ancestors.

Acceptance walks from the root down at most K levels, at each level taking the first child (in
node order) that passes: greedy, the child whose token is the verifier's argmax at the current
node (siblings are distinct, so at most one); sampling, SpecInfer's multi-candidate rejection
(:func:`speculative_tree_sample`). Afterwards :meth:`KVCache.move` copies the accepted path's K/V
from its scratch slots to the contiguous slots ``lengths .. lengths + n_accept - 1``; everything
else past the new length is stale and hidden by the mask, as with a chain.

Outputs follow ``quasar_jax.accept``: ``tokens [B, K+1]`` (accepted path tokens, then the bonus /
correction token, then zeros), ``n_emit [B] = n_accept + 1``, plus ``path [B, K]`` (accepted node
indices, -1 past n_accept).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from quasar_jax.accept import row_keys, sample_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TreeDraft:
    """A token trie per row (N nodes, static), the output of a tree drafter."""

    tokens: jax.Array  # [B, N] int32 node tokens (0 for padding nodes)
    parent: jax.Array  # [B, N] int32 parent node, -1 = the root; parent < own index
    n_nodes: jax.Array  # [B] int32: nodes 0 .. n_nodes-1 are real, the rest padding
    max_depth: int = dataclasses.field(default=1, metadata=dict(static=True))  # K

    @property
    def num_nodes(self) -> int:  # N
        return self.tokens.shape[1]


def chain_tree(draft: jax.Array, n_draft: jax.Array) -> TreeDraft:
    """A chain draft ``[B, K]`` as a tree: node i's parent is node i-1."""
    b, k = draft.shape
    parent = jnp.broadcast_to(jnp.arange(-1, k - 1, dtype=jnp.int32), (b, k))
    return TreeDraft(draft.astype(jnp.int32), parent, n_draft.astype(jnp.int32), k)


def build_trie(cand: jax.Array, n_tok: jax.Array, num_nodes: int) -> TreeDraft:
    """Merge candidate continuations ``cand [B, C, K]`` (lengths ``n_tok [B, C]``) into a trie.

    Token d of candidate c is the node of the prefix ``cand[c, :d+1]``; it is new when no earlier
    candidate shares that prefix. New nodes are numbered in (candidate, depth) order and the first
    ``num_nodes`` kept: candidate 0 whole, then what each later candidate adds. Every kept node's
    parent comes earlier in that order, so the kept set is a trie.
    """
    b, c, k = cand.shape
    n = num_nodes
    d_idx = jnp.arange(k)
    valid = d_idx[None, None, :] < n_tok[:, :, None]  # [B, C, K]
    eq = (cand[:, :, None, :] == cand[:, None, :, :]) & valid[:, :, None, :] & valid[:, None, :, :]
    same = jnp.cumprod(eq.astype(jnp.int32), axis=-1).astype(bool)  # [B, C, C', K] prefix equal
    rep = jnp.argmax(same, axis=2).astype(jnp.int32)  # [B, C, K] first candidate with the prefix
    new = valid & (rep == jnp.arange(c)[None, :, None])  # [B, C, K]
    flat = new.reshape(b, c * k)
    rank = (jnp.cumsum(flat, axis=1) - 1).reshape(b, c, k)  # node index of each new (c, d)
    keep = new & (rank < n)
    node_of = jnp.take_along_axis(rank, rep, axis=1)  # [B, C, K] node of (rep(c, d), d)
    parent = jnp.concatenate([jnp.full((b, c, 1), -1, rank.dtype), node_of[:, :, :-1]], axis=2)
    slot = jnp.where(keep, rank, n).reshape(b, c * k)  # n = dropped
    rows = jnp.arange(b)[:, None]
    tokens = jnp.zeros((b, n), jnp.int32).at[rows, slot].set(cand.reshape(b, c * k), mode="drop")
    parents = jnp.full((b, n), -1, jnp.int32).at[rows, slot].set(parent.reshape(b, c * k), mode="drop")
    n_nodes = jnp.minimum(jnp.sum(flat, axis=1), n).astype(jnp.int32)
    return TreeDraft(tokens, parents, n_nodes, k)


def ancestors(parent: jax.Array, max_depth: int) -> tuple[jax.Array, jax.Array]:
    """``anc [B, N, N]`` (node j is node i or an ancestor of it) and ``depth [B, N]`` (root = 0)."""
    n = parent.shape[1]
    anc = jnp.broadcast_to(jnp.eye(n, dtype=bool), parent.shape + (n,))
    ptr = parent
    for _ in range(max_depth - 1):  # depth <= K: at most K-1 proper ancestors below the root
        anc = anc | jax.nn.one_hot(ptr, n, dtype=bool)  # -1 gives an all-False row
        ptr = jnp.where(ptr >= 0, jnp.take_along_axis(parent, jnp.maximum(ptr, 0), axis=1), -1)
    return anc, jnp.sum(anc, axis=-1).astype(jnp.int32)


def tree_chunk_mask(anc: jax.Array) -> jax.Array:
    """``[B, N+1, N+1]`` chunk visibility: everyone sees the root, a node its ancestors and itself."""
    b, n, _ = anc.shape
    top = jnp.zeros((b, 1, n), bool)  # the root sees only itself
    return jnp.concatenate([jnp.ones((b, n + 1, 1), bool), jnp.concatenate([top, anc], axis=1)], axis=2)


def tree_inputs(tree: TreeDraft, last: jax.Array, lengths: jax.Array):
    """The verify forward's inputs for the root ``last [B]`` at position ``lengths - 1``:
    tokens, positions ``[B, N+1]``, ``chunk_mask [B, N+1, N+1]`` and node ``depth [B, N]``."""
    anc, depth = ancestors(tree.parent, tree.max_depth)
    tokens = jnp.concatenate([last[:, None].astype(jnp.int32), tree.tokens], axis=1)
    positions = lengths[:, None] - 1 + jnp.pad(depth, ((0, 0), (1, 0)))
    return tokens, positions.astype(jnp.int32), tree_chunk_mask(anc), depth


def _walk(tree: TreeDraft, ok: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Descend from the root taking the first child with ``ok [B, N]`` at each of K levels.

    Returns ``path [B, K]`` (node per level, -1 past the end), ``n_accept [B]`` and the final node
    ``cur [B]`` (-1 = the root).
    """
    b = ok.shape[0]
    cur = jnp.full((b,), -1, jnp.int32)
    path = []
    for _ in range(tree.max_depth):
        child = ok & (tree.parent == cur[:, None])  # [B, N]
        has = jnp.any(child, axis=1)
        cur = jnp.where(has, jnp.argmax(child, axis=1).astype(jnp.int32), cur)
        path.append(jnp.where(has, cur, -1))
    path = jnp.stack(path, axis=1)  # [B, K]; a walk that stops never restarts (same children)
    return path, jnp.sum(path >= 0, axis=1).astype(jnp.int32), cur


def _emit(tree: TreeDraft, path, n_accept, last_token) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens [B, K+1]: the path's tokens, then ``last_token [B]``, then zeros."""
    toks = jnp.take_along_axis(tree.tokens, jnp.maximum(path, 0), axis=1)  # [B, K]
    toks = jnp.pad(toks, ((0, 0), (0, 1)))  # [B, K+1]
    j = jnp.arange(tree.max_depth + 1)[None, :]
    out = jnp.where(j < n_accept[:, None], toks, jnp.where(j == n_accept[:, None], last_token[:, None], 0))
    return out.astype(jnp.int32), n_accept + 1, path


def greedy_tree_accept(tree: TreeDraft, valid: jax.Array, logits: jax.Array):
    """Greedy acceptance: the longest root-to-node path whose every token is the argmax at its
    parent, plus the argmax at its end. ``valid [B, N]``, ``logits [B, N+1, V]`` at
    ``[root, nodes]`` -> (tokens [B, K+1], n_emit [B], path [B, K])."""
    g = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, N+1]
    ok = valid & (tree.tokens == jnp.take_along_axis(g, tree.parent + 1, axis=1))
    path, n_accept, cur = _walk(tree, ok)
    return _emit(tree, path, n_accept, jnp.take_along_axis(g, cur[:, None] + 1, axis=1)[:, 0])


def speculative_tree_sample(tree: TreeDraft, valid: jax.Array, probs: jax.Array, key: jax.Array):
    """Exact multi-candidate speculative sampling (SpecInfer) for deterministic tree drafts.

    At node u with children x_1 .. x_m (distinct tokens, node order) and processed distribution
    p = probs[u]: try x_1, x_2, ... in turn, accepting x_i with probability
    ``p(x_i) / (1 - sum_{j<i} p(x_j))`` (x_i's mass in p with the rejected siblings zeroed and
    renormalised) and moving to x_i; if all are rejected sample from p with x_1 .. x_m zeroed,
    renormalised. Each emitted token is then distributed exactly as p (docs/tree.md). The trials
    are drawn for every node at once (one uniform per node); the walk reads those on its path.

    ``valid [B, N]``, ``probs [B, N+1, V]``, ``key`` one key or ``[B]`` ->
    (tokens [B, K+1], n_emit [B], path [B, K]).
    """
    b, n = tree.tokens.shape
    keys = jax.vmap(jax.random.split)(row_keys(key, b))  # [B, 2]
    u = jax.vmap(lambda kk: jax.random.uniform(kk, (n,), dtype=jnp.float32))(keys[:, 0])  # [B, N]
    at_parent = jnp.take_along_axis(probs, (tree.parent + 1)[:, :, None], axis=1)  # [B, N, V]
    p_node = jnp.take_along_axis(at_parent, tree.tokens[:, :, None], axis=2)[..., 0] * valid  # [B, N]
    idx = jnp.arange(n)
    sib_before = (tree.parent[:, :, None] == tree.parent[:, None, :]) & (idx[None, None, :] < idx[None, :, None])
    rejected = jnp.einsum("bij,bj->bi", sib_before.astype(jnp.float32), p_node)  # [B, N]
    ok = valid & (u * jnp.maximum(1.0 - rejected, 0.0) < p_node)  # u < p / (1 - rejected)
    path, n_accept, cur = _walk(tree, ok)

    p_cur = jnp.take_along_axis(probs, cur[:, None, None] + 1, axis=1)[:, 0]  # [B, V]
    tried = (valid & (tree.parent == cur[:, None])).astype(jnp.int32)  # [B, N] all rejected
    drop = jnp.zeros_like(p_cur, jnp.int32).at[jnp.arange(b)[:, None], tree.tokens].add(tried) > 0
    resid = jnp.where(drop, 0.0, p_cur)
    denom = jnp.sum(resid, axis=-1, keepdims=True)
    # Zero residual mass only happens under round-off (the children held all of p): use p.
    resid = jnp.where(denom > 0, resid / jnp.where(denom > 0, denom, 1.0), p_cur)
    return _emit(tree, path, n_accept, jax.vmap(sample_tokens)(resid, keys[:, 1]))


def verify_tree(model, drafter, sampler, verifier, history, lengths, cache, room, rows, keys, *, process=None):
    """Draft a tree, verify it in one forward, accept, and move the accepted K/V into place.

    ``history [B, S]``, ``lengths [B]``, ``room [B]`` (most tokens a row may still accept) ->
    ``tokens [B, K+1]``, ``n_emit [B]``, cache (lengths not yet updated), the raw verify logits
    ``[B, N+1, V]`` and ``emit_rows [B, K+1]``: the logits row behind each emitted token (the
    root's for the first, then the parent node's). ``process(logits, tree, accept)``, when given,
    returns ``accept``'s outputs for the processed logits (``quasar_jax.logits``: penalties, bias,
    min_tokens).
    """
    s = history.shape[1]
    tree, cache = drafter.draft_tree(model, history, lengths, cache)
    last = jnp.take_along_axis(history, lengths[:, None] - 1, axis=1)  # [B, 1]
    tokens_in, positions, chunk_mask, depth = tree_inputs(tree, last[:, 0], lengths)
    node = jnp.arange(tree.num_nodes, dtype=jnp.int32)[None, :]  # [1, N]
    valid = (node < tree.n_nodes[:, None]) & (depth <= room[:, None]) & (lengths[:, None] + node < s)
    cache = cache.replace(lengths=lengths - 1)
    logits, cache = model(tokens_in, positions, cache, mode=verifier, chunk_mask=chunk_mask)  # [B, N+1, V]
    def accept(scored):
        return sampler.accept_tree(tree, valid, scored, rows, keys)

    tokens, n_emit, path = accept(logits) if process is None else process(logits, tree, accept)
    level = jnp.arange(tree.max_depth, dtype=jnp.int32)[None, :]  # [1, K]
    dst = jnp.where(level < n_emit[:, None] - 1, lengths[:, None] + level, s)  # s = dropped
    emit_rows = jnp.pad(path + 1, ((0, 0), (1, 0)))  # [B, K+1] (past the path: 0, unused)
    return tokens, n_emit, cache.move(lengths[:, None] + jnp.maximum(path, 0), dst), logits, emit_rows
