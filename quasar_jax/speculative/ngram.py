"""N-gram prompt-lookup drafter (on device, static shapes, jittable).

Proposes up to K draft tokens per row by finding an earlier occurrence of the current suffix in
the row's own history (prompt + generated tokens) and copying the tokens that followed it.

Rule, for each row b with valid length ``len = lengths[b]`` (only ``history[b, :len]`` is read):

* For n = ngram_max down to ngram_min (larger n wins, first hit stops the search):

  - the suffix is the last n valid tokens ``history[b, len-n:len]``; it needs ``len >= n + 1``
    (there must be room for an earlier occurrence followed by at least one token);
  - candidate starts are the indices i >= 0 with ``i + n <= len - 1`` (an EARLIER occurrence,
    followed by at least one valid token) and ``history[b, i:i+n] == suffix``;
  - if any candidate exists, pick one: ``prefer="recent"`` takes the largest i,
    ``prefer="earliest"`` the smallest i. The draft is ``history[b, i+n : min(i+n+K, len)]`` and
    ``n_draft = min(K, len - (i+n))``.

* If no n matches, ``n_draft = 0``.

Draft positions ``>= n_draft[b]`` are filled with 0. Lengths outside [0, S] are clipped to it.

Cost: O(B * S * ngram_max) elementwise work (shifted-copy comparisons for each static n), plus one
[B, K] gather; there is no O(S^2) term.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

NGRAM_PREFER = ("recent", "earliest")


def check_ngram_args(num_draft: int, ngram_min: int, ngram_max: int, prefer: str) -> None:
    if not isinstance(num_draft, numbers.Integral) or num_draft < 1:
        raise ValueError(f"num_draft must be an int >= 1, got {num_draft!r}")
    if (
        not isinstance(ngram_min, numbers.Integral)
        or not isinstance(ngram_max, numbers.Integral)
        or not 1 <= ngram_min <= ngram_max
    ):
        raise ValueError(
            f"ngram_min/ngram_max must satisfy 1 <= ngram_min <= ngram_max, "
            f"got ngram_min={ngram_min!r}, ngram_max={ngram_max!r}"
        )
    if prefer not in NGRAM_PREFER:
        raise ValueError(f"prefer must be one of {NGRAM_PREFER}, got {prefer!r}")


def ngram_draft(
    history: jax.Array,
    lengths: jax.Array,
    *,
    num_draft: int,
    ngram_min: int = 1,
    ngram_max: int = 3,
    prefer: str = "recent",
) -> tuple[jax.Array, jax.Array]:
    """Prompt-lookup draft of up to K = num_draft tokens per row (rule in the module docstring).

    Args:
      history: [B, S] int32 tokens so far of each row; only ``history[b, :lengths[b]]`` is valid,
        the rest is padding that is never read as a match or a proposal.
      lengths: [B] int32 valid lengths.
      num_draft: K >= 1, static.
      ngram_min, ngram_max: n-gram sizes tried (largest first), 1 <= ngram_min <= ngram_max, static.
      prefer: "recent" (largest matching start) or "earliest" (smallest), static.

    Returns:
      draft [B, K] int32 (positions >= n_draft[b] are 0) and n_draft [B] int32 in [0, K].

    Under ``jax.jit`` pass the keyword arguments as static (``static_argnames``).
    """
    check_ngram_args(num_draft, ngram_min, ngram_max, prefer)
    history, lengths = _checked_rows(history, lengths)
    b, s = history.shape
    k = num_draft

    pos = jnp.arange(s, dtype=jnp.int32)[None, :]  # [1, S] candidate start i
    found = jnp.zeros((b,), dtype=bool)  # [B] some larger n already matched
    start = jnp.zeros((b,), dtype=jnp.int32)  # [B] index of the first proposed token (i + n)
    for n, match in _matches(history, lengths, ngram_min, ngram_max):
        has = jnp.any(match, axis=1)  # [B]
        if prefer == "recent":
            i = jnp.max(jnp.where(match, pos, -1), axis=1)  # [B]
        else:
            i = jnp.min(jnp.where(match, pos, s), axis=1)  # [B]
        take = has & ~found
        start = jnp.where(take, i + n, start)
        found = found | has

    n_draft = jnp.where(found, jnp.minimum(k, lengths - start), 0).astype(jnp.int32)  # [B]
    offs = jnp.arange(k, dtype=jnp.int32)[None, :]  # [1, K]
    idx = jnp.clip(start[:, None] + offs, 0, s - 1)  # [B, K]
    draft = jnp.take_along_axis(history, idx, axis=1)  # [B, K]
    draft = jnp.where(offs < n_draft[:, None], draft, 0).astype(jnp.int32)
    return draft, n_draft


def _checked_rows(history, lengths) -> tuple[jax.Array, jax.Array]:
    """history [B, S] int32 and lengths [B] int32 clipped to [0, S], or a one-line ValueError."""
    history = jnp.asarray(history)
    if history.ndim != 2:
        raise ValueError(f"history must have shape [B, S], got shape {history.shape}")
    history = history.astype(jnp.int32)
    b, s = history.shape
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape [B]=({b},), got shape {lengths.shape}")
    return history, jnp.clip(lengths, 0, s)


def _matches(history, lengths, ngram_min: int, ngram_max: int):
    """Yield ``(n, match [B, S])`` for n = ngram_max .. ngram_min: ``match[b, i]`` is True when
    ``history[b, i:i+n]`` equals the row's last n tokens and is followed by >= 1 valid token."""
    b, s = history.shape
    pos = jnp.arange(s, dtype=jnp.int32)[None, :]  # [1, S] candidate start i
    # shifted[j][b, i] = history[b, i + j] (padded with 0 past S; such starts are masked anyway).
    padded = jnp.pad(history, ((0, 0), (0, ngram_max - 1)))  # [B, S + ngram_max - 1]
    shifted = [padded[:, j : j + s] for j in range(ngram_max)]  # ngram_max x [B, S]
    for n in range(ngram_max, ngram_min - 1, -1):
        # Suffix tokens history[b, len-n+j], j < n (index clipped; rows with len < n+1 are masked).
        suffix_idx = jnp.clip(lengths[:, None] - n + jnp.arange(n, dtype=jnp.int32), 0, s - 1)
        suffix = jnp.take_along_axis(history, suffix_idx, axis=1)  # [B, n]
        match = pos + n <= lengths[:, None] - 1  # [B, S]: earlier occurrence, >= 1 token after
        for j in range(n):
            match = match & (shifted[j] == suffix[:, j : j + 1])
        yield n, match


def ngram_candidates(
    history: jax.Array,
    lengths: jax.Array,
    *,
    num_draft: int,
    num_candidates: int,
    ngram_min: int = 1,
    ngram_max: int = 3,
    prefer: str = "recent",
) -> tuple[jax.Array, jax.Array]:
    """Up to C = num_candidates distinct continuations per row, best first (tree drafting).

    The pool is, for n = ngram_max down to ngram_min, the ``min(S, 2C)`` preferred matching
    starts (most recent first, or earliest first), each giving the continuation
    ``history[b, i+n : min(i+n+K, len)]``. A pool entry is dropped when it is empty or a prefix
    of (or equal to) an earlier entry; the first C survivors are returned in pool order. So
    candidate 0 is exactly :func:`ngram_draft`'s draft, and C = 1 reproduces it.

    Returns:
      tokens [B, C, K] int32 (0 past each length) and n_tok [B, C] int32 in [0, K]; candidates
      that do not exist have n_tok 0 and come after those that do.
    """
    check_ngram_args(num_draft, ngram_min, ngram_max, prefer)
    if not isinstance(num_candidates, numbers.Integral) or num_candidates < 1:
        raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
    history, lengths = _checked_rows(history, lengths)
    b, s = history.shape
    k, c = num_draft, num_candidates
    m = min(s, 2 * c)  # preferred matches kept per n
    pos = jnp.arange(s, dtype=jnp.int32)[None, :]  # [1, S]
    key = pos if prefer == "recent" else s - 1 - pos  # larger = preferred
    starts, ok = [], []
    for n, match in _matches(history, lengths, ngram_min, ngram_max):
        best = jax.lax.top_k(jnp.where(match, key, -1), m)[0]  # [B, M] preferred first
        starts.append((best if prefer == "recent" else s - 1 - best) + n)
        ok.append(best >= 0)
    start = jnp.concatenate(starts, axis=1)  # [B, P] first proposed index, P = M * sizes
    n_tok = jnp.where(jnp.concatenate(ok, axis=1), jnp.minimum(k, lengths[:, None] - start), 0)
    offs = jnp.arange(k, dtype=jnp.int32)  # [K]
    idx = jnp.clip(start[:, :, None] + offs, 0, s - 1)  # [B, P, K]
    toks = jnp.take_along_axis(history[:, None, :], idx, axis=2)  # [B, P, K]
    toks = jnp.where(offs < n_tok[:, :, None], toks, 0)
    # covered[b, p, q]: entry p is a prefix of (or equal to) entry q.
    same = (toks[:, :, None, :] == toks[:, None, :, :]) | (offs >= n_tok[:, :, None, None])
    covered = jnp.all(same, axis=-1) & (n_tok[:, :, None] <= n_tok[:, None, :])  # [B, P, P]
    p = start.shape[1]
    earlier = jnp.arange(p)[None, :] < jnp.arange(p)[:, None]  # [P, P]: q < p
    keep = (n_tok > 0) & ~jnp.any(covered & earlier, axis=2)  # [B, P]
    rank = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, c)  # [B, P] slot among the C
    rows = jnp.arange(b)[:, None]
    out = jnp.zeros((b, c, k), jnp.int32).at[rows, rank].set(toks, mode="drop")
    n_out = jnp.zeros((b, c), jnp.int32).at[rows, rank].set(n_tok, mode="drop")
    return out, n_out


ngram_draft_jit = functools.partial(
    jax.jit, static_argnames=("num_draft", "ngram_min", "ngram_max", "prefer")
)(ngram_draft)
"""``jax.jit``-compiled :func:`ngram_draft` with the keyword arguments static."""
