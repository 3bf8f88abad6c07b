"""Tree drafts in the fused loop: lossless greedy output (float32, w8a16, w8a8; batch 1 and ragged
batches), exact sampling, streaming, budgets and a full cache, statistics, configuration errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from quasar_jax.speculative.drafters import NGramDrafter, NGramTreeDrafter, make_drafter
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.weights.loading import load_model
from test_engine import PROMPTS, REPETITIVE, _next_token_probs


@pytest.fixture(scope="module")
def engine(hf_tiny):
    return Engine(load_model(hf_tiny(False, 2)[0], dtype=jnp.float32))


@pytest.fixture(scope="module")
def int8_engine(hf_tiny):
    return Engine(load_model(hf_tiny(False, 2)[0], int8=True))


@pytest.fixture(scope="module")
def ar_tokens(engine):
    return engine.generate(PROMPTS, GenerationConfig(max_new_tokens=24, drafter="none")).tokens


@pytest.mark.parametrize("c,k", [(2, 3), (2, 5), (4, 3), (4, 5)])
def test_greedy_tree_equals_autoregressive(engine, ar_tokens, c, k):
    tree = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=24, num_draft=k, num_candidates=c))
    assert tree.tokens == ar_tokens  # one ragged batch
    for s in tree.stats:
        assert sum(s.emitted_hist) == s.verify_steps and len(s.emitted_hist) == k + 2
        assert sum(n * m for n, m in enumerate(s.emitted_hist)) == s.new_tokens
    if (c, k) == (4, 5):  # the tree holds the chain's draft: never more steps
        chain = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=24, num_draft=k))
        assert tree.batch_stats.verify_steps <= chain.batch_stats.verify_steps
    if (c, k) == (2, 3):  # batch 1
        for prompt, expected in zip(PROMPTS[:2], ar_tokens[:2]):
            cfg = GenerationConfig(max_new_tokens=24, num_draft=k, num_candidates=c)
            assert engine.generate([prompt], cfg).tokens[0] == expected


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_greedy_tree_equals_autoregressive_int8(int8_engine, mode):
    ar = int8_engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, drafter="none", verifier=mode))
    tree = int8_engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, verifier=mode, num_draft=4,
                                                          num_candidates=3, tree_nodes=8))
    assert tree.tokens == ar.tokens
    assert tree.batch_stats.verify_steps < ar.batch_stats.verify_steps


def test_tree_truncated_to_few_nodes_and_full_cache_stay_lossless(engine):
    """tree_nodes = 7 < C * K cuts candidates; a 40-slot cache ends rows with nodes past its end."""
    prompts = [REPETITIVE * 2, [1, 2, 1, 2, 1, 2, 1, 2, 1]]
    ar = engine.generate(prompts, GenerationConfig(max_new_tokens=40, drafter="none", max_len=40))
    cfg = GenerationConfig(max_new_tokens=40, num_draft=5, num_candidates=4, tree_nodes=7, max_len=40)
    res = engine.generate(prompts, cfg)
    assert res.tokens == ar.tokens
    assert [s.finish_reason for s in res.stats] == ["cache_full", "cache_full"]


def test_stop_ids_budget_and_streaming(engine, ar_tokens):
    stop = ar_tokens[0][6]
    first = ar_tokens[0].index(stop)
    seen = {0: [], 1: []}

    def stream(tokens, n_emit):
        for b in (0, 1):
            seen[b].extend(tokens[b, :int(n_emit[b])].tolist())

    cfg = GenerationConfig(max_new_tokens=10, num_draft=5, num_candidates=2, stop_ids=(stop,))
    res = engine.generate(PROMPTS[:2], cfg, stream=stream)
    assert res.tokens[0] == ar_tokens[0][:first + 1] and res.stats[0].finish_reason == "stop"
    assert len(res.tokens[1]) <= 10 and res.tokens[1] == ar_tokens[1][:len(res.tokens[1])]
    assert seen == {0: res.tokens[0], 1: res.tokens[1]}


def test_tree_sampling_matches_verifier_distribution(engine):
    """As test_engine's chain test: the first sampled token over 2000 rows vs the verifier.

    ``[a, d, rest, a, e, rest, a]`` makes the tree hold two root children d and e; d is chosen
    with p(d) near 1/2, so both acceptance and rejection (then e, then the residual) happen.
    2000 rows over <= 8 tokens: expected TV ~0.025, bound 0.07 (a blind acceptance moves ~0.5).
    """
    sampling = dict(temperature=1.0, top_k=8)
    a, e, rest = 50, 33, [40, 3, 77, 21, 9, 60, 2, 15, 88]
    candidates = [[a, d] + rest + [a, e] + rest + [a] for d in range(96)]
    probs = _next_token_probs(engine.model, candidates, **sampling)
    ok = [d for d in range(96) if d != e]
    d = ok[int(np.argmin(np.abs(probs[ok, ok] - 0.5)))]
    cfg = GenerationConfig(max_new_tokens=2, num_draft=3, num_candidates=2, seed=3, **sampling)
    # A draft is accepted at the root exactly when the first token is d or e: p(d) + p(e).
    check_first_token(engine, candidates[d], probs[d], cfg, root_mass=probs[d][d] + probs[d][e])


def check_first_token(engine, prompt, p, cfg, root_mass, n=2000):
    """``n`` rows of ``prompt`` (``cfg.max_new_tokens`` = 2): the first token's empirical
    distribution is within TV 0.07 of ``p`` (expected ~0.025), and the share of rows that accepted
    a root child (one verify step) is ``root_mass`` (the children's mass in ``p``) within 0.05."""
    res = engine.generate([prompt] * n, cfg)
    first = np.array([t[0] for t in res.tokens])
    emp = np.bincount(first, minlength=p.size) / n
    assert set(np.flatnonzero(emp)) <= set(np.flatnonzero(p))
    assert 0.5 * np.abs(emp - p).sum() < 0.07
    accepted = np.mean([s.verify_steps == 1 for s in res.stats])
    assert abs(accepted - root_mass) < 0.05


def test_make_drafter_and_config_errors(engine):
    assert make_drafter("ngram", num_candidates=1, tree_nodes=9) == NGramDrafter(5, 1, 3, "recent")
    tree = make_drafter("ngram", num_draft=4, num_candidates=3)
    assert isinstance(tree, NGramTreeDrafter) and tree.num_nodes == 12
    assert NGramTreeDrafter(5, 4, tree_nodes=16).num_nodes == 16
    with pytest.raises(ValueError, match="num_candidates > 1 needs drafter 'ngram'"):
        GenerationConfig(drafter="none", num_candidates=2)
    with pytest.raises(ValueError, match="num_candidates must be"):
        GenerationConfig(num_candidates=0)
    with pytest.raises(ValueError, match="tree_nodes must be"):
        GenerationConfig(num_draft=5, num_candidates=2, tree_nodes=3)
