"""Drafters: what proposes the K tokens that one verify step checks.

A drafter is a small frozen dataclass (hashable: it is part of the compiled program's key) with a
static ``num_draft`` (K) and one device method::

    draft, n_draft, cache = drafter.draft(model, history [B, S], lengths [B], cache)

``draft [B, K]`` int32 holds the proposals, ``n_draft [B]`` in [0, K] how many are valid (the
rest are ignored by acceptance). A drafter that runs the model (QSpec) may write K/V into the
verifier's cache, but only at slots ``>= lengths - 1`` that the verify pass rewrites; it returns
the cache it wrote. The loop (``quasar_jax.speculative.engine``) never looks inside a drafter: a new one plugs
in by implementing this method.

* :class:`NoDrafter` (K = 0): plain autoregressive decoding through the same loop.
* :class:`NGramDrafter`: prompt lookup in the row's own history (``quasar_jax.speculative.ngram``).
* :class:`QSpecDrafter`: QSpec self-drafting, K greedy single-token steps of the same int8
  weights on the W8A8 path (the verifier then runs W8A16).

A tree drafter instead has ``num_draft`` (K, the tree's depth), ``num_nodes`` (N) and::

    tree, cache = drafter.draft_tree(model, history [B, S], lengths [B], cache)

returning a ``quasar_jax.speculative.tree.TreeDraft``; the loop then verifies all N nodes in one forward
(docs/tree.md). :class:`NGramTreeDrafter` merges several n-gram continuations into one trie;
``quasar_jax.speculative.s4c.S4CDrafter`` grows a tree with trained draft heads (docs/s4c.md).

Optional capabilities (read with ``getattr``, so existing drafters need none of them):

* ``uses_hidden = True``: the drafter reads the target's final hidden state of position
  ``lengths - 2`` (``LoopState.hidden [B, D]``, which the loop then carries and updates);
* ``params``: a pytree of arrays the compiled program takes as a run-time input (see
  ``features.program_params``) instead of embedding them as constants;
* ``bind(hidden, params)``: the drafter of one loop step, given that step's hidden state and params;
* ``check_model(model)``: a one-line ``ValueError`` when the drafter does not fit the model.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from quasar_jax.model.kv_cache import KVCache
from quasar_jax.model.modes import QuantMode, Choice
from quasar_jax.speculative.heads import LoadedHeads, load_heads
from quasar_jax.speculative.ngram import NGRAM_PREFER, check_ngram_args, ngram_candidates, ngram_draft
from quasar_jax.speculative.s4c import S4CDrafter, make_s4c_drafter
from quasar_jax.speculative.tree import TreeDraft, build_trie


class DrafterKind(Choice):
    """The built-in drafters, by name (the ``--drafter`` flag)."""

    NONE = "none"
    NGRAM = "ngram"
    QSPEC = "qspec"
    S4C = "s4c"


class Drafter(Protocol):
    num_draft: int  # K, static

    def draft(self, model, history: jax.Array, lengths: jax.Array,
              cache: KVCache) -> tuple[jax.Array, jax.Array, KVCache]:
        ...


class TreeDrafter(Protocol):
    num_draft: int  # K: the deepest node, static
    num_nodes: int  # N: nodes per row, static

    def draft_tree(self, model, history: jax.Array, lengths: jax.Array,
                   cache: KVCache) -> tuple[TreeDraft, KVCache]:
        ...


def is_tree_drafter(drafter) -> bool:
    """Whether the loop verifies this drafter's proposals as a tree (``draft_tree``, or, for a
    drafter bound to each step's hidden state such as S4C's, ``verifies_tree``)."""
    return callable(getattr(drafter, "draft_tree", None)) or bool(getattr(drafter, "verifies_tree", False))


@dataclasses.dataclass(frozen=True)
class NoDrafter:
    """No proposals: every step verifies one token (autoregressive decoding)."""

    num_draft: int = 0

    def draft(self, model, history, lengths, cache):
        del model
        b = lengths.shape[0]
        return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32), cache


@dataclasses.dataclass(frozen=True)
class NGramDrafter:
    """Prompt lookup: copy what followed the latest earlier occurrence of the current suffix."""

    num_draft: int = 5
    ngram_min: int = 1
    ngram_max: int = 3
    prefer: str = "recent"  # which earlier occurrence wins: recent | earliest

    def __post_init__(self):
        check_ngram_args(self.num_draft, self.ngram_min, self.ngram_max, self.prefer)

    def draft(self, model, history, lengths, cache):
        del model
        draft, n_draft = ngram_draft(history, lengths, num_draft=self.num_draft,
                                     ngram_min=self.ngram_min, ngram_max=self.ngram_max,
                                     prefer=self.prefer)
        return draft, n_draft, cache


@dataclasses.dataclass(frozen=True)
class NGramTreeDrafter:
    """Up to C n-gram continuations (``ngram_candidates``, best first) merged into a trie of at
    most N = ``tree_nodes`` nodes (default C * K, i.e. nothing cut); candidate 0 is always whole."""

    num_draft: int = 5
    num_candidates: int = 4
    tree_nodes: int | None = None
    ngram_min: int = 1
    ngram_max: int = 3
    prefer: str = "recent"

    def __post_init__(self):
        check_ngram_args(self.num_draft, self.ngram_min, self.ngram_max, self.prefer)
        c = self.num_candidates
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"num_candidates must be an integer >= 1, got {c!r}")
        n = self.tree_nodes
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < self.num_draft):
            raise ValueError(f"tree_nodes must be an integer >= num_draft ({self.num_draft}), got {n!r}")

    @property
    def num_nodes(self) -> int:
        return min(self.tree_nodes or self.num_candidates * self.num_draft,
                   self.num_candidates * self.num_draft)

    def draft_tree(self, model, history, lengths, cache):
        del model
        cand, n_tok = ngram_candidates(history, lengths, num_draft=self.num_draft,
                                       num_candidates=self.num_candidates, ngram_min=self.ngram_min,
                                       ngram_max=self.ngram_max, prefer=self.prefer)
        return build_trie(cand, n_tok, self.num_nodes), cache


@dataclasses.dataclass(frozen=True)
class QSpecDrafter:
    """K greedy single-token steps on the W8A8 path, sharing the verifier's KV cache.

    Their K/V land in the slots the verify pass rewrites next, so nothing needs undoing.
    """

    num_draft: int = 5

    def __post_init__(self):
        if isinstance(self.num_draft, bool) or not isinstance(self.num_draft, int) or self.num_draft < 1:
            raise ValueError(f"num_draft must be an integer >= 1, got {self.num_draft!r}")

    def draft(self, model, history, lengths, cache):
        b, k = lengths.shape[0], self.num_draft
        last = jnp.take_along_axis(history, lengths[:, None] - 1, axis=1)  # [B, 1]

        def one(i, carry):
            tok, cache, draft = carry
            pos = lengths[:, None] - 1 + i  # [B, 1]
            logits, cache = model(tok, pos, cache, mode=QuantMode.W8A8)
            tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]  # [B, 1]
            return tok, cache, draft.at[:, i].set(tok[:, 0])

        cache = cache.replace(lengths=lengths - 1)
        _, cache, draft = jax.lax.fori_loop(0, k, one, (last, cache, jnp.zeros((b, k), jnp.int32)))
        return draft, jnp.full((b,), k, jnp.int32), cache


def make_drafter(kind: DrafterKind | str, *, num_draft: int = 5, ngram_min: int = 1,
                 ngram_max: int = 3, ngram_prefer: str = "recent", num_candidates: int = 1,
                 tree_nodes: int | None = None,
                 heads: LoadedHeads | str | None = None) -> Drafter | TreeDrafter:
    """A built-in drafter from its name and the flags that apply to it.

    ``num_candidates`` C > 1 (n-gram) gives the tree drafter; C = 1 is the chain
    ``NGramDrafter`` (``tree_nodes`` is then unused). ``s4c`` needs ``heads`` (loaded, or a
    directory for ``quasar_jax.speculative.heads.load_heads``); its ``num_candidates`` C >= 0 n-gram
    continuations join the heads' tree and ``tree_nodes`` cuts the heads' stored tree.
    """
    kind = DrafterKind.parse(kind, "drafter")
    low = 0 if kind is DrafterKind.S4C else 1
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < low:
        raise ValueError(f"num_candidates must be an integer >= {low}, got {num_candidates!r}")
    if num_candidates > 1 and kind not in (DrafterKind.NGRAM, DrafterKind.S4C):
        raise ValueError(f"num_candidates > 1 needs drafter 'ngram' or 's4c', got drafter '{kind}'")
    if kind is DrafterKind.S4C:
        if heads is None:
            raise ValueError("drafter 's4c' needs trained heads: heads=DIR (or quasar_jax.speculative.heads.load_heads(DIR))")
        heads = heads if isinstance(heads, LoadedHeads) else load_heads(heads)
        return make_s4c_drafter(heads, num_draft=num_draft, tree_nodes=tree_nodes, num_candidates=num_candidates,
                                ngram_min=ngram_min, ngram_max=ngram_max, ngram_prefer=ngram_prefer)
    if kind is DrafterKind.NONE:
        return NoDrafter()
    if kind is DrafterKind.NGRAM and num_candidates > 1:
        return NGramTreeDrafter(num_draft, num_candidates, tree_nodes, ngram_min, ngram_max, ngram_prefer)
    if kind is DrafterKind.NGRAM:
        return NGramDrafter(num_draft, ngram_min, ngram_max, ngram_prefer)
    return QSpecDrafter(num_draft)


__all__ = ["Drafter", "DrafterKind", "NGRAM_PREFER", "NGramDrafter", "NGramTreeDrafter", "NoDrafter",
           "QSpecDrafter", "S4CDrafter", "TreeDrafter", "is_tree_drafter", "make_drafter"]
