"""S4C drafting: a static token tree grown by the draft heads, verified in one forward (docs/s4c.md).

The tree has a static shape (:class:`TreeShape`): node i is a path of ranks ``(r_1 .. r_d)``,
meaning "the r_d-th most likely token of head d, below the node ``(r_1 .. r_{d-1})``". One decode
step grows it depth by depth (K small steps, all on device)::

    depth 1:  f = head_1(h, e(last))                  h: target hidden state at lengths-2 (LoopState)
              children of the root = top-k of lm_head(f)
    depth d:  for every node p at depth d-1 that has children (static list):
              f_p' = head_d(f_p, e(token_p));  children of p = top-k of lm_head(f_p')

A node's feature is the head output at its parent (the feature that proposed it); the next head
reads it with the node's own token (Hydra / EAGLE-style coherence). The shape is chosen once from
measured per-head acceptance (:func:`choose_tree`, Medusa's greedy rule: add the path of highest
estimated acceptance ``prod_j a_j(r_j)`` until N nodes) and stored with the heads (``heads.json``).

Optionally C n-gram continuations (``quasar_jax.speculative.ngram.ngram_candidates``) join the same tree:
the head tree's root-to-leaf paths and the n-gram candidates are merged by ``tree.build_trie``.

The drafter reads the target's hidden state carried by the loop (``uses_hidden``) and takes the
heads' parameters as a run-time input (``params``; ``bind`` gives the per-step drafter), so the
compiled program does not embed them. Verification, acceptance (greedy and SpecInfer sampling) and
the K/V move are the tree path's (``quasar_jax.speculative.tree``), unchanged.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quasar_jax.speculative.heads import LoadedHeads, draft_slice, head_logits, slice_logits
from quasar_jax.speculative.ngram import check_ngram_args, ngram_candidates
from quasar_jax.speculative.tree import TreeDraft, build_trie


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """A static token tree: ``paths[i]`` are node i's ranks from the root (BFS order: by depth)."""

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        paths = tuple(tuple(int(r) for r in p) for p in self.paths)
        object.__setattr__(self, "paths", paths)
        seen = set()
        for i, p in enumerate(paths):
            if not p or min(p) < 0:
                raise ValueError(f"tree node {i}: a path of ranks >= 0 is needed, got {list(p)}")
            if p in seen:
                raise ValueError(f"tree node {i}: path {list(p)} appears twice")
            if len(p) > 1 and p[:-1] not in seen:
                raise ValueError(f"tree node {i}: the parent {list(p[:-1])} of {list(p)} must come before it")
            if i and len(p) < len(paths[i - 1]):
                raise ValueError(f"tree node {i}: nodes must be ordered by depth")
            seen.add(p)
        if not paths:
            raise ValueError("a tree needs at least one node")

    @classmethod
    def from_ranked(cls, ranked: Sequence[Sequence[int]], num_nodes: int | None = None,
                    max_depth: int | None = None) -> "TreeShape":
        """The first ``num_nodes`` paths of ``ranked`` (best first, every prefix before its
        extensions) of depth <= ``max_depth``, in BFS order."""
        kept = [tuple(p) for p in ranked if max_depth is None or len(p) <= max_depth]
        kept = kept[:num_nodes] if num_nodes is not None else kept
        return cls(tuple(sorted(kept, key=len)))  # stable: greedy order within a depth

    @property
    def num_nodes(self) -> int:  # N
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def parent(self) -> np.ndarray:
        """[N] parent node index (-1 = the root)."""
        index = {p: i for i, p in enumerate(self.paths)}
        return np.array([index[p[:-1]] if len(p) > 1 else -1 for p in self.paths], np.int32)

    def levels(self):
        """Per depth d = 1 .. max_depth: ``(parents, k, nodes, slot, rank)`` as NumPy arrays:
        the nodes of depth d-1 that have children (-1 = root), how many top tokens to take, the
        nodes of depth d, the slot of each node's parent in ``parents``, each node's rank."""
        parent = self.parent
        for d in range(1, self.max_depth + 1):
            nodes = np.array([i for i, p in enumerate(self.paths) if len(p) == d], np.int32)
            parents = np.array(sorted(set(parent[nodes].tolist())), np.int32)
            slot = np.searchsorted(parents, parent[nodes]).astype(np.int32)
            rank = np.array([self.paths[i][-1] for i in nodes], np.int32)
            yield parents, int(rank.max()) + 1, nodes, slot, rank

    def leaf_paths(self) -> np.ndarray:
        """[L, D] node indices along each root-to-leaf path (-1 past the leaf), D = max_depth."""
        index = {p: i for i, p in enumerate(self.paths)}
        leaves = [p for p in self.paths if not any(q[:-1] == p for q in self.paths if len(q) == len(p) + 1)]
        out = np.full((len(leaves), self.max_depth), -1, np.int32)
        for j, p in enumerate(leaves):
            out[j, :len(p)] = [index[p[:d + 1]] for d in range(len(p))]
        return out


def choose_tree(acceptance: Sequence[Sequence[float]], num_nodes: int) -> list[tuple[tuple[int, ...], float]]:
    """Medusa's greedy tree: ``acceptance[d][r]`` is the measured probability that head d+1's rank-r
    token is the target's (teacher forced). A path's estimated acceptance is the product along it;
    paths are added best first (ties: smaller ranks first) up to ``num_nodes``. Every prefix of a
    path has at least its estimate, so any leading part of the list is a tree.

    Returns ``[(path, estimate), ...]`` in that order; ``1 + sum(estimates)`` estimates tau."""
    acc = [list(map(float, row)) for row in acceptance]
    heap = [(-acc[0][r], (r,)) for r in range(len(acc[0]))]
    heapq.heapify(heap)
    out = []
    while heap and len(out) < num_nodes:
        neg, path = heapq.heappop(heap)
        out.append((path, -neg))
        if len(path) < len(acc):
            for r, a in enumerate(acc[len(path)]):
                heapq.heappush(heap, (neg * a, path + (r,)))
    return out


def grow_tree(heads, model, shape: TreeShape, hidden: jax.Array, last: jax.Array, vocab: dict | None = None) -> jax.Array:
    """Node tokens ``[B, N]`` of ``shape`` grown by ``heads`` from the root feature ``hidden [B, D]``
    and root token ``last [B]`` (module docstring); with ``vocab`` (``heads.draft_slice``) the
    heads score only its ids."""
    b, n = last.shape[0], shape.num_nodes
    node_tok = jnp.zeros((b, n + 1), jnp.int32).at[:, 0].set(last.astype(jnp.int32))  # index 0 = root
    node_feat = jnp.zeros((b, n + 1, hidden.shape[-1]), jnp.float32).at[:, 0].set(hidden.astype(jnp.float32))
    for d, (parents, k, nodes, slot, rank) in enumerate(shape.levels(), start=1):
        feat = heads.blocks[d - 1](node_feat[:, parents + 1], model.embed(node_tok[:, parents + 1]))  # [B, P, D]
        if vocab is None:
            top = jax.lax.top_k(head_logits(model, feat), k)[1].astype(jnp.int32)  # [B, P, k]
        else:
            top = vocab["ids"][jax.lax.top_k(slice_logits(model, feat, vocab), k)[1]]  # [B, P, k] token ids
        node_tok = node_tok.at[:, nodes + 1].set(top[:, slot, rank])
        node_feat = node_feat.at[:, nodes + 1].set(feat[:, slot].astype(jnp.float32))
    return node_tok[:, 1:]


@dataclasses.dataclass(frozen=True)
class S4CDrafter:
    """Trained draft heads growing a static tree (+ optionally C n-gram candidates), depth <= K.

    ``heads`` (``quasar_jax.speculative.heads.load_heads``) hashes by identity, so the compiled program is
    keyed by it; its parameters are a run-time input (``params``).
    """

    heads: LoadedHeads
    tree: TreeShape
    num_draft: int = 5  # K: deepest node (the loop's tokens [B, K+1])
    num_candidates: int = 0  # C n-gram continuations merged into the tree (0 = heads only)
    ngram_min: int = 1
    ngram_max: int = 3
    prefer: str = "recent"
    uses_hidden: ClassVar[bool] = True
    verifies_tree: ClassVar[bool] = True  # its bound drafter has ``draft_tree``

    def __post_init__(self):
        k = self.num_draft
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.heads.num_heads:
            raise ValueError(f"num_draft must be an integer in [1, {self.heads.num_heads}] (the heads at "
                             f"{self.heads.where} are {self.heads.num_heads}), got {k!r}")
        if self.tree.max_depth > k:
            raise ValueError(f"the tree is {self.tree.max_depth} deep, more than num_draft {k}")
        c = self.num_candidates
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"num_candidates must be an integer >= 0, got {c!r}")
        check_ngram_args(k, self.ngram_min, self.ngram_max, self.prefer)

    @property
    def num_nodes(self) -> int:  # N of the verified tree
        return self.tree.num_nodes + self.num_candidates * self.num_draft

    @property
    def params(self):
        return self.heads.params

    def program_params(self, model_params):
        """What the compiled program takes as this drafter's params: the heads' and, with a draft
        vocabulary, the LM head's slice (gathered here, once per program; ``features``)."""
        ids = self.heads.draft_ids
        return self.heads.params, None if ids is None else draft_slice(model_params, ids)

    def check_model(self, model) -> None:
        self.heads.check_model(model)

    def with_draft_length(self, k: int) -> "S4CDrafter":
        """The heads' stored tree cut to depth <= ``k`` (as many head nodes, where it has them):
        ``--speculation K`` of the server."""
        nodes = min(self.tree.num_nodes, self.heads.usable_nodes(k))
        return make_s4c_drafter(self.heads, num_draft=k, tree_nodes=nodes,
                                num_candidates=self.num_candidates, ngram_min=self.ngram_min,
                                ngram_max=self.ngram_max, ngram_prefer=self.prefer)

    def bind(self, hidden: jax.Array, params) -> "_BoundS4C":
        """The drafter of one loop step: this step's root features ``hidden [B, D]`` and
        ``program_params``' pair (traced arrays)."""
        return _BoundS4C(self, hidden, params)


@dataclasses.dataclass(frozen=True, eq=False)
class _BoundS4C:
    """``S4CDrafter`` with one step's inputs; the ``TreeDrafter`` the tree path calls."""

    drafter: S4CDrafter
    hidden: jax.Array  # [B, D]
    params: object  # (heads' params, draft slice or None)

    @property
    def num_draft(self) -> int:
        return self.drafter.num_draft

    @property
    def num_nodes(self) -> int:
        return self.drafter.num_nodes

    def draft_tree(self, model, history, lengths, cache):
        dr = self.drafter
        last = jnp.take_along_axis(history, lengths[:, None] - 1, axis=1)[:, 0]  # [B]
        heads_params, vocab = self.params
        tokens = grow_tree(dr.heads.module(heads_params), model, dr.tree, self.hidden, last, vocab)  # [B, N]
        b, n, k = tokens.shape[0], dr.tree.num_nodes, dr.num_draft
        if dr.num_candidates == 0:
            parent = jnp.broadcast_to(jnp.asarray(dr.tree.parent), (b, n))
            return TreeDraft(tokens, parent, jnp.full((b,), n, jnp.int32), k), cache
        leaf = dr.tree.leaf_paths()  # [L, depth]
        leaf = np.pad(leaf, ((0, 0), (0, k - leaf.shape[1])), constant_values=-1)  # [L, K]
        cand = jnp.where(leaf >= 0, tokens[:, np.maximum(leaf, 0)], 0)  # [B, L, K]
        n_tok = jnp.broadcast_to(jnp.asarray((leaf >= 0).sum(axis=1), jnp.int32), (b, leaf.shape[0]))
        ng, ng_n = ngram_candidates(history, lengths, num_draft=k, num_candidates=dr.num_candidates,
                                    ngram_min=dr.ngram_min, ngram_max=dr.ngram_max, prefer=dr.prefer)
        merged = build_trie(jnp.concatenate([cand, ng], axis=1), jnp.concatenate([n_tok, ng_n], axis=1),
                            dr.num_nodes)
        return merged, cache


def make_s4c_drafter(heads: LoadedHeads, *, num_draft: int = 5, tree_nodes: int | None = None,
                     num_candidates: int = 0, ngram_min: int = 1, ngram_max: int = 3,
                     ngram_prefer: str = "recent") -> S4CDrafter:
    """The S4C drafter of ``heads`` with its stored tree cut to ``tree_nodes`` nodes (default: the
    heads' ``default_nodes``) of depth <= ``num_draft``."""
    h = heads.num_heads
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or not 1 <= num_draft <= h:
        raise ValueError(f"num_draft must be an integer in [1, {h}] (the heads at {heads.where} are {h}), "
                         f"got {num_draft!r}")
    tree = heads.meta["tree"]
    ranked = tree["paths"]
    n = tree.get("default_nodes", len(ranked)) if tree_nodes is None else tree_nodes
    usable = heads.usable_nodes(num_draft)
    n = min(n, usable) if tree_nodes is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= usable:
        raise ValueError(f"tree_nodes must be an integer in [1, {usable}] for these heads and "
                         f"num_draft {num_draft}, got {n!r}")
    return S4CDrafter(heads, TreeShape.from_ranked(ranked, n, num_draft), num_draft, num_candidates,
                      ngram_min, ngram_max, ngram_prefer)
