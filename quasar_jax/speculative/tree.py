"""Token trees: several draft continuations as one trie, and the inputs of its verify forward.

A :class:`TreeDraft` is a token trie of at most N nodes per row hanging below the root, the row's
last committed token. Node ``i`` holds ``tokens[b, i]`` and ``parent[b, i]`` (a node index, -1 =
the root); parents precede their children and depth (root = 0) is at most K. The verify forward
(``quasar_jax.speculative.verify.verify_tree``) feeds ``[root, node_0 .. node_{N-1}]`` (T = N+1):

* position of node i = ``lengths - 1 + depth(i)`` (RoPE sees each path as a plain sequence);
* its K/V goes to scratch slot ``lengths + i`` (root at ``lengths - 1``);
* ``chunk_mask [B, N+1, N+1]``: a node sees the committed cache, the root and its own ancestors.

Tree drafters build tries here (:func:`build_trie`); the acceptance rules over a trie live with
the chain's in ``quasar_jax.speculative.accept`` (docs/tree.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp



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
