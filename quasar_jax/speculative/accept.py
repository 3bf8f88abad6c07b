"""Logits processing and acceptance rules for speculative decoding (jittable, static shapes).

* :func:`process_logits` turns verifier logits into the sampling distribution
  (temperature -> min-p -> top-k -> top-p -> renormalise).
* :func:`greedy_accept` is the temperature-0 rule: accept the longest draft prefix that equals the
  verifier's argmax, then emit the verifier's argmax at the first mismatch (the "bonus" token).
* :func:`speculative_sample` is exact speculative (rejection) sampling for a deterministic,
  one-hot draft q = delta(x_i): accept x_i with probability min(1, p_i(x_i) / q_i(x_i)) = p_i(x_i);
  at the first rejection j sample from norm(max(0, p_j - q_j)) = p_j with x_j zeroed and
  renormalised; if all drafts are accepted sample the bonus token from p_{n_draft}. Every emitted
  token is then distributed exactly as the verifier's processed distribution.

Both acceptance rules return ``(tokens [B, K+1] int32, n_emit [B] int32)``:
``tokens[b, :n_emit[b]]`` are the tokens to append (accepted draft tokens followed by one bonus or
correction token), ``n_emit = n_accepted + 1`` in [1, n_draft + 1]. Entries of ``tokens`` at
positions ``>= n_emit`` carry no meaning.

The draft logits layout is ``logits[b, t]`` = verifier logits after feeding
``[last, draft_0, ..., draft_{K-1}]``, so position t predicts the token after draft_{t-1}.

For a token trie (``quasar_jax.speculative.tree.TreeDraft``) acceptance walks from the root down at
most K levels, at each level taking the first child (in node order) that passes:
:func:`greedy_tree_accept`, the child whose token is the verifier's argmax at the current node
(siblings are distinct, so at most one); :func:`speculative_tree_sample`, SpecInfer's
multi-candidate rejection. They return ``tokens [B, K+1]`` (accepted path tokens, then the bonus /
correction token, then zeros), ``n_emit [B] = n_accept + 1`` and ``path [B, K]`` (accepted node
indices, -1 past n_accept).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from quasar_jax.speculative.tree import TreeDraft


def process_logits(
    logits: jax.Array, *, temperature, top_k=0, top_p=1.0, min_p=0.0
) -> jax.Array:
    """Probabilities of the sampling distribution.

    Args:
      logits: [..., V] float32.
      temperature: > 0; logits are divided by it.
      min_p: in [0, 1]; drop tokens whose probability is below min_p times the largest one
        (0 = off), after temperature and before top-k (vLLM's order).
      top_k: keep the top_k largest logits (0 or >= V = off). Ties with the k-th value are kept.
      top_p: in (0, 1]; keep the smallest set of most likely tokens (after top-k) whose cumulative
        probability is >= top_p (1.0 = off). The argmax is always kept; ties with the smallest
        kept probability are kept too.

    Each parameter is either a Python number (validated here; one setting for every row, and
    top-k without a sort) or an array broadcastable to ``logits.shape[:-1]`` (per-row settings
    as device data, so one compiled program serves any values; the caller validates them).

    Returns:
      [..., V] float32 probabilities (zeros outside the kept support), summing to 1.
    """
    if all(isinstance(v, numbers.Number) for v in (temperature, top_k, top_p, min_p)):
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        return _process_logits_static(logits, float(_checked(temperature, top_k, top_p)),
                                      int(top_k), float(top_p), float(min_p))
    return _process_logits_rows(logits, temperature, top_k, top_p, min_p)


def _checked(temperature, top_k, top_p):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return temperature


def _nucleus(probs: jax.Array, sorted_p: jax.Array, top_p) -> jax.Array:
    """Keep the minimal top-p nucleus of ``probs`` given the same values sorted descending."""
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # [..., V] exclusive cumulative sum
    # Position j is in the minimal nucleus iff the mass strictly before it is < top_p
    # (position 0 always qualifies because top_p > 0).
    n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # [..., 1] >= 1
    threshold = jnp.take_along_axis(sorted_p, n_keep - 1, axis=-1)  # [..., 1]
    kept = jnp.where(probs >= threshold, probs, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


def _min_p(x: jax.Array, min_p) -> jax.Array:
    """Drop logits whose probability is below ``min_p`` times the largest (p_i < min_p * p_max,
    i.e. x_i < x_max + log(min_p)); ``min_p`` 0 keeps everything."""
    cut = jnp.max(x, axis=-1, keepdims=True) + jnp.log(jnp.asarray(min_p, jnp.float32))
    return jnp.where(x < cut, -jnp.inf, x)


def _process_logits_static(logits, temperature: float, top_k: int, top_p: float, min_p: float) -> jax.Array:
    x = jnp.asarray(logits, dtype=jnp.float32) / jnp.float32(temperature)  # [..., V]
    v = x.shape[-1]
    if min_p > 0:
        x = _min_p(x, min_p)
    if 0 < top_k < v:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]  # [..., 1] k-th largest value
        x = jnp.where(x >= kth, x, -jnp.inf)
    probs = jax.nn.softmax(x, axis=-1)  # [..., V]
    if top_p < 1.0:
        probs = _nucleus(probs, -jnp.sort(-probs, axis=-1), top_p)
    return probs


def _process_logits_rows(logits, temperature, top_k, top_p, min_p) -> jax.Array:
    """Per-row parameters: one descending sort serves top-k (any k) and top-p."""
    x = jnp.asarray(logits, dtype=jnp.float32)  # [..., V]
    v = x.shape[-1]
    t = jnp.asarray(temperature, jnp.float32)[..., None]  # [..., 1]
    k = jnp.asarray(top_k, jnp.int32)[..., None]  # [..., 1]
    p = jnp.asarray(top_p, jnp.float32)[..., None]  # [..., 1]
    x = _min_p(x / t, jnp.asarray(min_p, jnp.float32)[..., None])  # log(0) = -inf: nothing dropped
    sorted_x = -jnp.sort(-x, axis=-1)  # [..., V] descending
    use_k = (k > 0) & (k < v)
    kth = jnp.take_along_axis(sorted_x, jnp.broadcast_to(jnp.clip(k - 1, 0, v - 1), sorted_x.shape[:-1] + (1,)),
                              axis=-1)  # [..., 1]
    x = jnp.where(use_k & (x < kth), -jnp.inf, x)
    sorted_x = jnp.where(use_k & (sorted_x < kth), -jnp.inf, sorted_x)
    # Top-p on the sorted values, then a cut in logit space (no second sort, no float mismatch
    # between a sorted and an unsorted softmax): keep x >= the smallest kept sorted logit.
    sorted_p = jax.nn.softmax(sorted_x, axis=-1)  # [..., V] descending
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # exclusive cumulative sum
    n_keep = jnp.sum(before < p, axis=-1, keepdims=True)  # [..., 1] >= 1
    x_min = jnp.take_along_axis(sorted_x, n_keep - 1, axis=-1)  # [..., 1]
    x = jnp.where((p < 1.0) & (x < x_min), -jnp.inf, x)
    return jax.nn.softmax(x, axis=-1)


def sample_tokens(probs: jax.Array, key: jax.Array) -> jax.Array:
    """Categorical sample from probabilities.

    Args:
      probs: [..., V] float32, non-negative (need not be normalised; zero entries are never drawn).
      key: PRNG key.

    Returns:
      [...] int32 sampled token ids.
    """
    probs = jnp.asarray(probs, dtype=jnp.float32)
    logp = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


def row_keys(key: jax.Array, b: int) -> jax.Array:
    """``[B]`` keys: ``key`` itself when it already holds one key per row, else split into B."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    per_row = key.ndim == (1 if typed else 2)
    return key if per_row else jax.random.split(key, b)


def _accepted_prefix(ok: jax.Array) -> jax.Array:
    """ok [B, K] bool -> [B] int32 length of the all-True prefix."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def greedy_accept(
    draft: jax.Array, n_draft: jax.Array, logits: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Greedy (temperature 0) acceptance.

    Args:
      draft: [B, K] int32 draft tokens.
      n_draft: [B] int32 number of valid draft tokens, in [0, K].
      logits: [B, K+1, V] verifier logits at [last, draft_0 .. draft_{K-1}].

    Returns:
      tokens [B, K+1] int32 = g = argmax(logits, -1) (first maximal index); tokens[b, :n_emit[b]]
      are the accepted draft tokens (equal to g there) followed by the bonus token g[b, n_accept].
      n_emit [B] int32 = n_accept + 1, where n_accept is the longest prefix i < n_draft[b] with
      draft[b, i] == g[b, i].
    """
    draft = jnp.asarray(draft).astype(jnp.int32)
    k = draft.shape[-1]
    g = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, K+1]
    valid = jnp.arange(k, dtype=jnp.int32)[None, :] < jnp.asarray(n_draft)[:, None]  # [B, K]
    n_accept = _accepted_prefix(valid & (draft == g[:, :k]))  # [B]
    return g, n_accept + 1


def speculative_sample(
    draft: jax.Array, n_draft: jax.Array, probs: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Exact speculative sampling for a one-hot (deterministic) draft.

    Args:
      draft: [B, K] int32 draft tokens x_0 .. x_{K-1}.
      n_draft: [B] int32 number of valid draft tokens, in [0, K].
      probs: [B, K+1, V] float32 verifier PROCESSED distribution (output of process_logits).
      key: one PRNG key, or one per row (``[B]``: each row's draws then depend on its key only).

    For i = 0 .. n_draft-1 in order, accept x_i iff u_i < p_i(x_i) with u_i ~ U[0, 1). At the first
    rejection j emit a token from p_j with x_j zeroed and renormalised, and stop; if all n_draft
    drafts are accepted emit a bonus token from p_{n_draft}.

    Returns:
      tokens [B, K+1] int32: accepted draft tokens, then the sampled token at index n_accept, then
      zeros. n_emit [B] int32 = n_accept + 1.
    """
    draft = jnp.asarray(draft).astype(jnp.int32)
    n_draft = jnp.asarray(n_draft).astype(jnp.int32)
    probs = jnp.asarray(probs, dtype=jnp.float32)
    b, k = draft.shape
    v = probs.shape[-1]
    keys = jax.vmap(jax.random.split)(row_keys(key, b))  # [B, 2]
    key_u, key_s = keys[:, 0], keys[:, 1]

    # Acceptance of each draft position, then the accepted prefix length.
    p_draft = jnp.take_along_axis(probs[:, :k, :], draft[:, :, None], axis=-1)[..., 0]  # [B, K]
    u = jax.vmap(lambda kk: jax.random.uniform(kk, (k,), dtype=jnp.float32))(key_u)  # [B, K] in [0, 1)
    valid = jnp.arange(k, dtype=jnp.int32)[None, :] < n_draft[:, None]  # [B, K]
    n_accept = _accepted_prefix(valid & (u < p_draft))  # [B]

    # Distribution of the single sampled token at position j = n_accept.
    p_j = jnp.take_along_axis(probs, n_accept[:, None, None], axis=1)[:, 0, :]  # [B, V]
    rejected = n_accept < n_draft  # [B] (else: bonus token from p_j as is)
    x_j = jnp.take_along_axis(draft, jnp.minimum(n_accept, k - 1)[:, None], axis=1)  # [B, 1]
    drop = rejected[:, None] & (jnp.arange(v, dtype=jnp.int32)[None, :] == x_j)  # [B, V]
    resid = jnp.where(drop, 0.0, p_j)  # [B, V]
    denom = jnp.sum(resid, axis=-1, keepdims=True)  # [B, 1]
    # Zero residual mass only happens when p_j(x_j) == 1, i.e. never on an exact rejection; fall
    # back to p_j itself so the sample stays well defined under float round-off.
    resid = jnp.where(denom > 0, resid / jnp.where(denom > 0, denom, 1.0), p_j)
    sampled = jax.vmap(sample_tokens)(resid, key_s)  # [B]

    pos = jnp.arange(k + 1, dtype=jnp.int32)[None, :]  # [1, K+1]
    draft_ext = jnp.pad(draft, ((0, 0), (0, 1)))  # [B, K+1]
    tokens = jnp.where(
        pos < n_accept[:, None],
        draft_ext,
        jnp.where(pos == n_accept[:, None], sampled[:, None], 0),
    ).astype(jnp.int32)
    return tokens, n_accept + 1


# ----------------------------------------------------------------------------- tree drafts
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
