"""Tree drafts: candidates and trie vs plain-Python references, the tree forward vs each path alone,
the K/V move, greedy tree acceptance, and SpecInfer sampling's distribution.

Statistical thresholds are those of tests/test_accept.py (N = 20000 draws over V = 6 outcomes:
expected TV ~0.009, bound 0.02; chi-square on 5 dof below its 0.999 quantile 20.52), scaled by
sqrt(N / N_cond) for conditional distributions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quasar_jax.speculative.accept import greedy_tree_accept, speculative_tree_sample
from quasar_jax.speculative.ngram import ngram_candidates, ngram_draft
from quasar_jax.speculative.tree import TreeDraft, build_trie, chain_tree, tree_inputs
from quasar_jax.weights.loading import load_model

N_DRAWS = 20000
CHI2_5DOF_999 = 20.52


def ref_candidates(tokens, s, *, num_draft, num_candidates, ngram_min, ngram_max, prefer):
    """Plain-Python rule of ``ngram_candidates`` for ONE row (valid history only)."""
    length, m, pool = len(tokens), min(s, 2 * num_candidates), []
    for n in range(ngram_max, ngram_min - 1, -1):
        if length < n + 1:
            continue
        starts = [i for i in range(length - n) if tokens[i:i + n] == tokens[length - n:]]
        starts = sorted(starts, reverse=prefer == "recent")[:m]
        pool += [tokens[i + n:min(i + n + num_draft, length)] for i in starts]
    out = [p for j, p in enumerate(pool)
           if p and not any(len(q) >= len(p) and q[:len(p)] == p for q in pool[:j])]
    return out[:num_candidates]


def ref_trie(cands, n_max):
    """Plain-Python trie: nodes in (candidate, depth) order, the first n_max new prefixes."""
    index, tokens, parent = {}, [], []
    for c in cands:
        for d in range(len(c)):
            pre = tuple(c[:d + 1])
            if pre not in index and len(tokens) < n_max:
                index[pre] = len(tokens)
                tokens.append(c[d])
                parent.append(index[pre[:-1]] if d else -1)
    return tokens, parent


@pytest.mark.parametrize("prefer", ["recent", "earliest"])
@pytest.mark.parametrize("c,k,n_max", [(1, 4, 4), (3, 3, 6), (4, 5, 12), (6, 3, 18)])
def test_candidates_and_trie_match_references(c, k, n_max, prefer):
    rng = np.random.default_rng(c * 10 + k)
    b, s = 6, 40
    history = rng.integers(0, 4, size=(b, s)).astype(np.int32)  # 4 symbols: many matches
    lengths = np.array([40, 33, 12, 3, 1, 25], np.int32)
    kw = dict(num_draft=k, num_candidates=c, ngram_min=1, ngram_max=3, prefer=prefer)
    cand, n_tok = jax.jit(functools.partial(ngram_candidates, **kw))(history, lengths)
    tree = jax.jit(build_trie, static_argnums=2)(cand, n_tok, n_max)
    chain, n_chain = ngram_draft(history, lengths, num_draft=k, ngram_min=1, ngram_max=3, prefer=prefer)
    for r in range(b):
        want = ref_candidates(history[r, :lengths[r]].tolist(), s, **kw)
        got = [cand[r, i, :n_tok[r, i]].tolist() for i in range(c)]
        assert got == want + [[]] * (c - len(want)), r
        assert got[0] == chain[r, :n_chain[r]].tolist()  # candidate 0 is the chain's draft
        tokens, parent = ref_trie(want, n_max)
        n = int(tree.n_nodes[r])
        assert (np.asarray(tree.tokens[r, :n]).tolist(), np.asarray(tree.parent[r, :n]).tolist()) == (tokens, parent)


def _paths(tokens, parent, n):
    """Root-to-node path (node indices) of every node."""
    out = []
    for i in range(n):
        path, j = [], i
        while j >= 0:
            path.append(j)
            j = parent[j]
        out.append(path[::-1])
    return out


@pytest.mark.parametrize("int8_mode", [None, "w8a16"])
def test_tree_forward_equals_each_path_alone_and_move_makes_it_contiguous(hf_tiny, int8_mode):
    model = load_model(hf_tiny(False, 2)[0], int8=int8_mode is not None)
    mode = int8_mode or "float"
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 96, size=9).tolist(), rng.integers(0, 96, size=5).tolist()]
    # Candidates sharing prefixes: the trie branches at depths 0, 1 and 2.
    cand = jnp.asarray([[[3, 4, 5, 6], [3, 4, 7, 0], [3, 8, 0, 0], [9, 1, 2, 0]],
                        [[1, 2, 3, 4], [5, 6, 0, 0], [1, 7, 7, 7], [0, 0, 0, 0]]], jnp.int32)
    n_tok = jnp.asarray([[4, 3, 2, 3], [4, 2, 4, 0]], jnp.int32)

    @jax.jit
    def tree_pass(prompt, lengths):
        model = nnx.merge(graphdef, params)
        cache = model.init_cache(2, 48)
        pos = jnp.broadcast_to(jnp.arange(prompt.shape[1] - 1, dtype=jnp.int32), (2, prompt.shape[1] - 1))
        _, cache = model(prompt[:, :-1], pos, cache, mode=mode)
        cache = cache.replace(lengths=lengths - 1)
        tree = build_trie(cand, n_tok, 12)
        last = jnp.take_along_axis(prompt, lengths[:, None] - 1, axis=1)[:, 0]
        tokens, positions, chunk_mask, _ = tree_inputs(tree, last, lengths)
        logits, tree_cache = model(tokens, positions, cache, mode=mode, chunk_mask=chunk_mask)
        return tree, last, cache, logits, tree_cache

    @jax.jit
    def path_pass(b, chain, cache, tree_cache, src, dst):
        """The path alone as a chain [1, 5] in row b's cache; the tree's K/V moved by src -> dst."""
        row = cache.replace(k=cache.k[:, b][:, None], v=cache.v[:, b][:, None], lengths=cache.lengths[b][None])
        pos = row.lengths[:, None] + jnp.arange(5, dtype=jnp.int32)[None]
        want, chain_cache = nnx.merge(graphdef, params)(chain, pos, row, mode=mode)
        moved = tree_cache.move(src, dst)
        return want[0], (moved.k[:, b], moved.v[:, b]), (chain_cache.k[:, 0], chain_cache.v[:, 0])

    prompt = np.zeros((2, 9), np.int32)
    for i, r in enumerate(rows):
        prompt[i, :len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
    tree, last, cache, logits, tree_cache = tree_pass(jnp.asarray(prompt), jnp.asarray(lengths))
    tree, last, logits = jax.tree.map(np.asarray, (tree, last, logits))
    for b in range(2):
        toks, par = tree.tokens[b].tolist(), tree.parent[b].tolist()
        for path in _paths(toks, par, int(tree.n_nodes[b])):
            # Padded to 5 tokens: later tokens of a causal chain cannot change earlier ones.
            chain = np.array([([int(last[b])] + [toks[i] for i in path] + [0] * 4)[:5]], np.int32)
            src, dst = np.zeros((2, 4), np.int32), np.full((2, 4), 48, np.int32)  # 48 = S: dropped
            src[b, :len(path)] = lengths[b] + np.array(path)
            dst[b, :len(path)] = lengths[b] + np.arange(len(path))
            want, moved, chain_kv = jax.tree.map(np.asarray, path_pass(b, chain, cache, tree_cache, src, dst))
            got = logits[b, np.array([0] + [i + 1 for i in path])]
            np.testing.assert_allclose(got, want[:len(path) + 1], atol=1e-5)
            span = slice(lengths[b] - 1, lengths[b] + len(path))  # root + path, now contiguous
            for got_kv, want_kv in zip(moved, chain_kv):
                np.testing.assert_allclose(got_kv[:, span], want_kv[:, span], atol=1e-5)


def _one_hot_logits(targets, v=8):
    return jnp.asarray(np.eye(v, dtype=np.float32)[np.asarray(targets)] * 5.0 - 1.0)


def test_greedy_tree_accept_walks_the_argmax_path():
    # Node: 0:a=1 (root)  1:b=2 (root)  2:1 (under 0)  3:4 (under 0)  4:5 (under 3)  5:6 (under 1)
    tree = TreeDraft(tokens=jnp.asarray([[1, 2, 1, 4, 5, 6]] * 4, jnp.int32),
                     parent=jnp.asarray([[-1, -1, 0, 0, 3, 1]] * 4, jnp.int32),
                     n_nodes=jnp.asarray([6, 6, 6, 3], jnp.int32), max_depth=3)
    valid = jnp.arange(6)[None] < tree.n_nodes[:, None]
    #           root node0 node1 node2 node3 node4 node5   (argmax at each)
    argmax = [[1, 4, 6, 0, 5, 7, 0],   # root->0->3->4, bonus 7
              [2, 0, 6, 0, 0, 0, 3],   # root->1->5, bonus 3
              [3, 0, 0, 0, 0, 0, 0],   # nothing accepted: 3
              [1, 4, 0, 0, 5, 7, 0]]   # node 3 is padding here: root->0, bonus 4
    tokens, n_emit, path = greedy_tree_accept(tree, valid, _one_hot_logits(argmax))
    assert np.asarray(n_emit).tolist() == [4, 3, 1, 2]
    assert np.asarray(tokens).tolist() == [[1, 4, 5, 7], [2, 6, 3, 0], [3, 0, 0, 0], [1, 4, 0, 0]]
    assert np.asarray(path).tolist() == [[0, 3, 4], [1, 5, -1], [-1, -1, -1], [0, -1, -1]]
    # A chain is the special case: equals accept.greedy_accept.
    chain = chain_tree(jnp.asarray([[4, 5, 7]]), jnp.asarray([2]))
    tokens, n_emit, _ = greedy_tree_accept(chain, jnp.arange(3)[None] < 2, _one_hot_logits([[4, 5, 1, 2]]))
    assert np.asarray(tokens).tolist() == [[4, 5, 1, 0]] and int(n_emit[0]) == 3


def _probs(rows):
    p = np.asarray(rows, np.float64)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


# Root children 2, 0, 4 (nodes 0, 1, 2); node 0 has children 1, 3 (nodes 3, 4); node 4 has child 5.
SAMPLE_TREE = TreeDraft(tokens=jnp.asarray([[2, 0, 4, 1, 3, 5]], jnp.int32),
                        parent=jnp.asarray([[-1, -1, -1, 0, 0, 4]], jnp.int32),
                        n_nodes=jnp.asarray([6], jnp.int32), max_depth=3)
P_TREE = _probs([[.3, .1, .25, .05, .2, .1],    # root
                 [.1, .3, .05, .25, .2, .1],    # node 0
                 [.2, .2, .2, .2, .1, .1],      # node 1
                 [.1, .1, .1, .1, .3, .3],      # node 2
                 [.3, .2, .1, .2, .1, .1],      # node 3
                 [.05, .05, .1, .1, .1, .6],    # node 4
                 [.1, .2, .3, .1, .2, .1]])     # node 5


@functools.partial(jax.jit, static_argnames=("n",))
def _many_tree(probs, seed, n=N_DRAWS):
    valid = jnp.ones((1, 6), bool)
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    tokens, n_emit, _ = jax.vmap(lambda k: speculative_tree_sample(SAMPLE_TREE, valid, probs, k))(keys)
    return tokens[:, 0], n_emit[:, 0]


def _check(samples, p, n_cond):
    emp = np.bincount(samples, minlength=len(p)) / len(samples)
    assert 0.5 * np.abs(emp - p).sum() < 0.02 * np.sqrt(N_DRAWS / n_cond)
    counts, expected = np.bincount(samples, minlength=len(p)), len(samples) * p
    assert counts[expected == 0].sum() == 0
    keep = expected > 0
    assert ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum() < CHI2_5DOF_999


def test_speculative_tree_sample_is_exact():
    tokens, n_emit = map(np.asarray, _many_tree(jnp.asarray(P_TREE)[None], 0))
    p = P_TREE
    # Each token along the walk is distributed as the verifier's distribution at its parent.
    _check(tokens[:, 0], p[0], N_DRAWS)
    # A child's token is emitted only as an accepted draft (the residual excludes every tried child).
    assert (np.isin(tokens[:, 0], [2, 0, 4]) == (n_emit >= 2)).all()
    for first, node in ((2, 1), (0, 2), (4, 3)):  # given the first token, the second ~ p[node]
        sel = tokens[:, 0] == first
        _check(tokens[sel, 1], p[node], sel.sum())
    sel = (tokens[:, 0] == 2) & (tokens[:, 1] == 3)  # path 2 -> 3 (node 4): third ~ p[node 4]
    _check(tokens[sel, 2], p[5], sel.sum())
    # P(some draft accepted at the root) = p(children) = .25 + .3 + .2.
    assert abs((n_emit >= 2).mean() - 0.75) < 0.015


def test_speculative_tree_sample_degenerate_and_invalid_nodes():
    sample = jax.jit(functools.partial(speculative_tree_sample, SAMPLE_TREE))
    p = np.zeros((1, 7, 6), np.float32)
    p[0, 0] = [0.0, 0.0, 0.0, 0.5, 0.0, 0.5]  # root: every child has probability 0
    p[0, 1:] = 1.0 / 6
    valid = jnp.ones((1, 6), bool)
    for seed in range(5):
        tokens, n_emit, _ = sample(valid, jnp.asarray(p), jax.random.PRNGKey(seed))
        assert int(n_emit[0]) == 1 and int(tokens[0, 0]) in (3, 5)
    p[0, 0] = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # node 0 certain; node 0 invalid -> never walked
    tokens, n_emit, path = sample(valid.at[0, 0].set(False), jnp.asarray(p), jax.random.PRNGKey(0))
    assert int(n_emit[0]) == 1 and int(tokens[0, 0]) == 2 and np.asarray(path).tolist() == [[-1, -1, -1]]
