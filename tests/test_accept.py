"""Tests for quasar_jax.speculative.accept: logits processing, greedy acceptance, speculative sampling.

Statistical tests use fixed seeds, so they are deterministic. Thresholds: with N = 20000 draws
over V = 6 outcomes the expected total variation between the empirical and the true distribution
is about 0.5 * sum_x sqrt(2 p(1-p) / (pi N)) <= 0.5 * sqrt(2 (V-1) / (pi N)) ~= 0.009, with
standard deviation well below that, so TV < 0.02 fails only on a real bias (a wrong rule moves
the mass by >= 0.05 in the cases below). The chi-square statistic on V-1 = 5 degrees of freedom is
compared to 20.5 (the 0.999 quantile). For n_emit we compare each probability within 0.015
(binomial standard deviation <= 0.0036 at N = 20000, i.e. > 4 sigma).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quasar_jax.speculative.accept import greedy_accept, process_logits, sample_tokens, speculative_sample

N = 20000
V = 6
CHI2_5DOF_999 = 20.52


# ---------------------------------------------------------------------------- greedy_accept


def one_hot_logits(targets, v=8):
    """targets [B, K+1] -> logits [B, K+1, V] whose argmax is targets."""
    t = np.asarray(targets)
    return jnp.asarray(np.eye(v, dtype=np.float32)[t] * 5.0 - 1.0)


def test_greedy_full_partial_zero():
    g = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    logits = one_hot_logits(g)
    draft = jnp.array([[1, 2, 3], [1, 5, 3], [7, 2, 3], [1, 2, 3]], jnp.int32)
    n_draft = jnp.array([3, 3, 3, 0], jnp.int32)
    tokens, n_emit = jax.jit(greedy_accept)(draft, n_draft, logits)
    assert tokens.dtype == jnp.int32 and n_emit.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(n_emit), [4, 2, 1, 1])
    for b, n in enumerate(np.asarray(n_emit)):
        # accepted draft tokens then the bonus token g[b, n_accept]
        want = list(np.asarray(draft)[b, : n - 1]) + [g[b, n - 1]]
        assert list(np.asarray(tokens)[b, :n]) == want


def test_greedy_respects_n_draft():
    g = np.array([[1, 2, 3, 4]])
    draft = jnp.array([[1, 2, 3]], jnp.int32)  # all would match, but only 2 are valid
    tokens, n_emit = greedy_accept(draft, jnp.array([2]), one_hot_logits(g))
    assert int(n_emit[0]) == 3
    assert list(np.asarray(tokens)[0, :3]) == [1, 2, 3]


def test_greedy_ties_take_first_index():
    logits = np.zeros((1, 3, 5), np.float32)
    logits[0, 0, [1, 3]] = 2.0  # tie -> 1
    logits[0, 1, [0, 4]] = 2.0  # tie -> 0
    logits[0, 2, :] = 1.0  # all tie -> 0
    # draft 3 at position 0 loses the tie -> rejected; draft 1 accepted then 0 accepted.
    _, n_emit = greedy_accept(jnp.array([[3, 0]]), jnp.array([2]), jnp.asarray(logits))
    assert int(n_emit[0]) == 1
    tokens, n_emit = greedy_accept(jnp.array([[1, 0]]), jnp.array([2]), jnp.asarray(logits))
    assert int(n_emit[0]) == 3 and list(np.asarray(tokens)[0]) == [1, 0, 0]


# ---------------------------------------------------------------------------- process_logits


def test_temperature_matches_softmax():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 11)) * 3.0
    for t in (0.5, 1.0, 1.7):
        got = process_logits(logits, temperature=t)
        np.testing.assert_allclose(got, jax.nn.softmax(logits / t, axis=-1), rtol=1e-5, atol=1e-7)


def test_top_k_keeps_exact_support():
    logits = jax.random.normal(jax.random.PRNGKey(1), (4, 13))  # distinct values a.s.
    for k in (1, 3, 13, 20):
        probs = np.asarray(process_logits(logits, temperature=0.8, top_k=k))
        kk = min(k, 13)
        top = np.argsort(-np.asarray(logits), axis=-1)[:, :kk]
        for r in range(4):
            assert set(np.flatnonzero(probs[r])) == set(top[r])
            ref = np.asarray(jax.nn.softmax(np.asarray(logits)[r, top[r]] / 0.8))
            np.testing.assert_allclose(probs[r, top[r]], ref, rtol=1e-5)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_top_p_keeps_minimal_nucleus():
    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32)  # sorted: .4 .3 .15 .1 .05
    logits = jnp.log(jnp.asarray(p))[None]
    cases = {0.35: {1}, 0.39: {1}, 0.41: {1, 3}, 0.69: {1, 3}, 0.71: {1, 3, 4}, 0.9: {1, 3, 4, 2},
             0.96: {0, 1, 2, 3, 4}, 1.0: {0, 1, 2, 3, 4}, 1e-6: {1}}
    for top_p, support in cases.items():
        probs = np.asarray(process_logits(logits, temperature=1.0, top_p=top_p))[0]
        assert set(np.flatnonzero(probs)) == support, top_p
        idx = sorted(support)
        np.testing.assert_allclose(probs[idx], p[idx] / p[idx].sum(), rtol=1e-5)


def test_top_k_then_top_p():
    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32)
    logits = jnp.log(jnp.asarray(p))
    # top_k=2 -> {1: .4/.7, 3: .3/.7}; top_p=0.5 -> 0.571 >= 0.5 -> {1} only.
    probs = np.asarray(process_logits(logits, temperature=1.0, top_k=2, top_p=0.5))
    assert set(np.flatnonzero(probs)) == {1}
    probs = np.asarray(process_logits(logits, temperature=1.0, top_k=2, top_p=0.6))
    assert set(np.flatnonzero(probs)) == {1, 3}


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(temperature=0.0), "temperature"), (dict(temperature=1.0, top_k=-1), "top_k"),
     (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=1.0, top_p=1.5), "top_p")],
)
def test_process_logits_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        process_logits(jnp.zeros((3,)), **kwargs)


def test_sample_tokens_never_draws_zero_prob():
    probs = jnp.array([0.0, 0.5, 0.0, 0.5, 0.0])
    keys = jax.random.split(jax.random.PRNGKey(3), 2000)
    toks = np.asarray(jax.jit(jax.vmap(sample_tokens, in_axes=(None, 0)))(probs, keys))
    assert set(np.unique(toks)) == {1, 3}


# ---------------------------------------------------------------------------- speculative_sample


@functools.partial(jax.jit, static_argnames=("n",))
def _many(draft, n_draft, probs, seed, n=N):
    """N independent runs of speculative_sample (B = 1 each) -> tokens [N, K+1], n_emit [N]."""
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    tokens, n_emit = jax.vmap(lambda k: speculative_sample(draft, n_draft, probs, k))(keys)
    return tokens[:, 0], n_emit[:, 0]


def _tv(samples, p):
    emp = np.bincount(samples, minlength=len(p)) / len(samples)
    return 0.5 * np.abs(emp - p).sum()


def _chi2(samples, p):
    counts = np.bincount(samples, minlength=len(p))
    expected = len(samples) * p
    keep = expected > 0
    assert counts[~keep].sum() == 0  # never a zero-probability token
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _probs(rows):
    p = np.asarray(rows, np.float64)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


# K = 3 positions + bonus. Draft x = [2, 0, 5].
# Case "high": draft tokens are likely (p_0(2) = .6, p_1(0) = .5, p_2(5) = .7).
# Case "low": draft tokens are unlikely (p_0(2) = .05, ...), so the residual path dominates.
DRAFT = np.array([[2, 0, 5]], np.int32)
P_HIGH = _probs([[.1, .1, .6, .05, .1, .05],
                 [.5, .1, .1, .1, .1, .1],
                 [.05, .05, .1, .05, .05, .7],
                 [.3, .2, .1, .2, .1, .1]])
P_LOW = _probs([[.3, .2, .05, .15, .2, .1],
                [.02, .3, .3, .18, .1, .1],
                [.2, .2, .2, .2, .15, .05],
                [.1, .1, .1, .1, .3, .3]])


def _theory_n_emit(p, draft, n_draft):
    """P(n_emit = m + 1) for m = 0..n_draft."""
    acc = [float(p[i, draft[i]]) for i in range(n_draft)]
    out, run = [], 1.0
    for m in range(n_draft):
        out.append(run * (1.0 - acc[m]))
        run *= acc[m]
    out.append(run)
    return np.array(out)


@pytest.mark.parametrize("name, p", [("high", P_HIGH), ("low", P_LOW)])
def test_speculative_sample_distribution(name, p):
    n_draft = 3
    tokens, n_emit = _many(jnp.asarray(DRAFT), jnp.array([n_draft]), jnp.asarray(p)[None], 0)
    tokens, n_emit = np.asarray(tokens), np.asarray(n_emit)
    draft = DRAFT[0]

    # Structure: n_emit in [1, n_draft+1]; emitted prefix equals the draft; tail is zero.
    assert n_emit.min() >= 1 and n_emit.max() <= n_draft + 1
    for m in range(1, n_draft + 2):
        rows = tokens[n_emit == m]
        np.testing.assert_array_equal(rows[:, : m - 1], np.tile(draft[: m - 1], (len(rows), 1)))
        assert not rows[:, m:].any()
        if m <= n_draft and len(rows):  # a rejection never re-emits the rejected draft token
            assert not (rows[:, m - 1] == draft[m - 1]).any()

    # n_emit distribution vs. the acceptance probabilities.
    emp = np.bincount(n_emit, minlength=n_draft + 2)[1:] / N
    np.testing.assert_allclose(emp, _theory_n_emit(p, draft, n_draft), atol=0.015)

    # The first emitted token is distributed as p_0.
    first = tokens[:, 0]
    assert _tv(first, p[0]) < 0.02, name
    assert _chi2(first, p[0]) < CHI2_5DOF_999, name

    # The second emitted token, given that the first was the accepted draft token x_0 (n_emit >= 2),
    # is distributed as p_1 (fewer samples: threshold scaled by sqrt(N / N_cond)).
    cond = n_emit >= 2
    second = tokens[cond, 1]
    assert _tv(second, p[1]) < 0.02 * np.sqrt(N / cond.sum()), name
    assert _chi2(second, p[1]) < CHI2_5DOF_999, name


def test_speculative_sample_partial_and_zero_drafts():
    p = P_HIGH
    for n_draft in (0, 1):
        tokens, n_emit = _many(jnp.asarray(DRAFT), jnp.array([n_draft]), jnp.asarray(p)[None], 7)
        tokens, n_emit = np.asarray(tokens), np.asarray(n_emit)
        emp = np.bincount(n_emit, minlength=n_draft + 2)[1:] / N
        np.testing.assert_allclose(emp, _theory_n_emit(p, DRAFT[0], n_draft), atol=0.015)
        first = tokens[:, 0]
        assert _tv(first, p[0]) < 0.02 and _chi2(first, p[0]) < CHI2_5DOF_999
        if n_draft == 1:  # bonus token after the single accepted draft ~ p_1
            bonus = tokens[n_emit == 2, 1]
            assert _tv(bonus, p[1]) < 0.02 * np.sqrt(N / len(bonus))


def test_speculative_sample_batched_and_degenerate():
    # Row 0: draft token has probability 1 -> always accepted, bonus from the point mass.
    # Row 1: draft token has probability 0 -> always rejected, residual = p_0.
    p = np.zeros((2, 3, 4), np.float32)
    p[0, 0, 1] = 1.0
    p[0, 1, 2] = 1.0
    p[0, 2, 3] = 1.0
    p[1, :, :] = [0.0, 0.5, 0.5, 0.0]
    draft = jnp.array([[1, 2], [0, 1]], jnp.int32)
    fn = jax.jit(speculative_sample)
    for seed in range(5):
        tokens, n_emit = fn(draft, jnp.array([2, 2]), jnp.asarray(p), jax.random.PRNGKey(seed))
        assert list(np.asarray(n_emit)) == [3, 1]
        assert list(np.asarray(tokens)[0]) == [1, 2, 3]
        assert int(tokens[1, 0]) in (1, 2) and not np.asarray(tokens)[1, 1:].any()
