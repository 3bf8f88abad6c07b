"""Speculative engine: lossless vs autoregressive, parity with HF generate, tau, sampling, stops."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from quasar_jax.speculative.accept import process_logits
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.speculative.ngram import ngram_draft
from quasar_jax.weights.loading import load_model

REPETITIVE = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
PROMPTS = [REPETITIVE, [11, 12, 13, 11, 12, 13, 11, 12], [40, 3, 77, 21, 9, 60, 2, 15, 88],
           [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1], [50]]


@pytest.fixture(scope="module")
def engine(hf_tiny):
    return Engine(load_model(hf_tiny(False, 2)[0], dtype=jnp.float32))


def _ar(engine, prompts, n=24, **kw):
    return engine.generate(prompts, GenerationConfig(max_new_tokens=n, drafter="none", **kw))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_autoregressive(engine, k):
    ar = _ar(engine, PROMPTS)  # one ragged batch
    sd = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=24, drafter="ngram", num_draft=k))
    assert sd.tokens == ar.tokens
    assert sd.batch_stats.verify_steps < ar.batch_stats.verify_steps  # drafts were accepted
    for prompt, expected in zip(PROMPTS[:2], ar.tokens[:2]):  # batch 1
        alone = engine.generate([prompt], GenerationConfig(max_new_tokens=24, num_draft=k))
        assert alone.tokens[0] == expected


def test_autoregressive_matches_transformers_generate(engine, hf_tiny):
    _, hf = hf_tiny(False, 2)
    ours = _ar(engine, PROMPTS[:3], n=20)
    for prompt, got in zip(PROMPTS[:3], ours.tokens):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_tau_above_one_on_repeated_text(engine):
    res = engine.generate([REPETITIVE * 3], GenerationConfig(max_new_tokens=32, num_draft=5))
    assert res.stats[0].mean_accepted > 1.0
    hist = res.stats[0].emitted_hist
    assert sum(hist) == res.stats[0].verify_steps
    assert sum(n * c for n, c in enumerate(hist)) == res.stats[0].new_tokens


def test_tau_is_one_when_nothing_can_match(engine):
    """Pick a prompt whose whole greedy continuation never offers an n-gram match."""
    cfg = dict(num_draft=3, ngram_min=2, ngram_max=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        prompt = rng.permutation(96)[:12].tolist()
        seq = prompt + _ar(engine, [prompt], n=8).tokens[0]
        hist = jnp.asarray([seq], jnp.int32)
        matches = [int(ngram_draft(hist, jnp.asarray([n]), **cfg)[1][0]) for n in range(12, len(seq))]
        if not any(matches):
            break
    else:
        pytest.fail("no match-free continuation found among 20 random prompts")
    res = engine.generate([prompt], GenerationConfig(max_new_tokens=8, drafter="ngram", **cfg))
    assert res.tokens[0] == seq[12:]
    assert res.stats[0].mean_accepted == 1.0
    assert res.stats[0].verify_steps == 8


def test_stop_ids_and_budget_per_row(engine):
    ar = _ar(engine, PROMPTS[:2], n=16)
    stop = ar.tokens[0][4]  # row 0 stops at its 5th token (or earlier if it occurs before)
    first = ar.tokens[0].index(stop)
    res = engine.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=16, stop_ids=(stop,)))
    assert res.tokens[0] == ar.tokens[0][:first + 1]
    expect1 = ar.tokens[1][:ar.tokens[1].index(stop) + 1] if stop in ar.tokens[1] else ar.tokens[1]
    assert res.tokens[1] == expect1
    short = engine.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=3))
    assert [len(t) for t in short.tokens] == [3, 3]


def test_cache_full_stops_cleanly(engine):
    ar = _ar(engine, [REPETITIVE], n=40)
    res = engine.generate([REPETITIVE], GenerationConfig(max_new_tokens=40, max_len=20))
    assert res.tokens[0] == ar.tokens[0][:20 - len(REPETITIVE)]
    with pytest.raises(ValueError, match="prompt of 13 tokens does not fit in a cache of 13 slots"):
        engine.generate([REPETITIVE], GenerationConfig(max_len=13))


def test_compiled_once_per_shape_bucket(engine):
    cfg = GenerationConfig(max_new_tokens=8, max_len=64)
    engine.generate([PROMPTS[0]], cfg)
    again = engine.generate([PROMPTS[2]], GenerationConfig(max_new_tokens=5, max_len=64, seed=3))
    assert again.batch_stats.compile_s == 0.0


def test_bad_generation_config(engine):
    for bad, match in [(dict(drafter="eagle"), "unknown drafter 'eagle'"),
                       (dict(verifier="int4"), "unknown verifier 'int4'"),
                       (dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(num_draft=0), "num_draft"),
                       (dict(top_p=0.0), "top_p")]:
        with pytest.raises(ValueError, match=match):
            engine.generate([[1, 2]], GenerationConfig(**bad))
    with pytest.raises(ValueError, match=r"token id 500: ids must be integers in \[0, 96\)"):
        engine.generate([[1, 500]], GenerationConfig())


def _next_token_probs(model, prompts, **kw):
    prompts = jnp.asarray(prompts, jnp.int32)
    cache = model.init_cache(prompts.shape[0], 64)
    pos = jnp.broadcast_to(jnp.arange(prompts.shape[1], dtype=jnp.int32), prompts.shape)
    logits, _ = model(prompts, pos, cache)
    return np.asarray(process_logits(logits[:, -1], **kw))


@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=8), dict(temperature=0.7, top_p=0.8)])
def test_speculative_sampling_matches_verifier_distribution(engine, sampling):
    """First sampled token over N rows vs the verifier's processed distribution.

    The prompt ``[a, d, ..., a]`` makes the n-gram drafter propose ``d`` first; ``d`` is chosen so
    that the verifier gives it probability near 1/2, so acceptance and rejection both happen.
    N = 3000 rows, support <= 8 tokens: the expected total variation of the empirical
    distribution is ~0.02; 0.06 only fails on a real bias (accepting d blindly would move ~0.5).
    The acceptance rate of d must be p(d) (binomial std ~0.009; bound 0.04).
    """
    a, rest = 50, [40, 3, 77, 21, 9, 60, 2, 15, 88]
    candidates = [[a, d] + rest + [a] for d in range(96)]
    probs = _next_token_probs(engine.model, candidates, **sampling)
    d = int(np.argmin(np.abs(probs[np.arange(96), np.arange(96)] - 0.5)))
    prompt, p = candidates[d], probs[d]
    assert 0.1 < p[d] < 0.9
    n = 3000
    res = engine.generate([prompt] * n, GenerationConfig(max_new_tokens=2, num_draft=3, seed=1, **sampling))
    first = np.array([t[0] for t in res.tokens])
    emp = np.bincount(first, minlength=p.size) / n
    assert set(np.flatnonzero(emp)) <= set(np.flatnonzero(p))  # top-k / top-p support respected
    assert 0.5 * np.abs(emp - p).sum() < 0.06
    accepted = np.mean([s.verify_steps == 1 for s in res.stats])  # d accepted: 2 tokens, 1 step
    assert abs(accepted - p[d]) < 0.04
    # The plain sampler (K = 0) as a control.
    ar = engine.generate([prompt] * n, GenerationConfig(max_new_tokens=1, drafter="none", seed=2, **sampling))
    emp_ar = np.bincount([t[0] for t in ar.tokens], minlength=p.size) / n
    assert 0.5 * np.abs(emp_ar - p).sum() < 0.06


def test_verifier_must_match_the_model(engine, hf_tiny):
    with pytest.raises(ValueError, match="verifier 'w8a16' needs an int8 model"):
        engine.generate([[1, 2, 3]], GenerationConfig(verifier="w8a16"))
    with pytest.raises(ValueError, match="needs an int8 model"):
        engine.generate([[1, 2, 3]], GenerationConfig(drafter="qspec", verifier="w8a16"))
    int8 = Engine(load_model(hf_tiny(False, 2)[0], int8=True))
    with pytest.raises(ValueError, match="holds int8 weights"):
        int8.generate([[1, 2, 3]], GenerationConfig())


@pytest.mark.parametrize("bad,match", [(dict(stop_ids=5), "stop_ids"), (dict(stop_ids=(2**40,)), "stop_ids"),
                                       (dict(temperature=True), "temperature"), (dict(seed=2**70), "seed")])
def test_bad_values_are_rejected(engine, bad, match):
    with pytest.raises(ValueError, match=match):
        engine.generate([[1, 2]], GenerationConfig(**bad))
    with pytest.raises(ValueError, match="ids must be integers"):
        engine.generate([[1.7, 2]], GenerationConfig())


def test_streaming_sees_every_token_and_compiles_once(engine):
    cfg = GenerationConfig(max_new_tokens=12, max_len=64)
    for attempt in range(2):
        seen = []
        res = engine.generate([REPETITIVE], cfg, stream=lambda t, n: seen.extend(t[0, :int(n[0])].tolist()))
        assert seen == res.tokens[0]
        assert (res.batch_stats.compile_s == 0.0) == (attempt == 1)  # a new callback: no recompile
