"""The logits stage: penalties, logit bias, min_tokens and logprobs inside the loop.

References are independent of the loop: vLLM's penalty formula in NumPy over Hugging Face
transformers' float32 logits (greedy, token by token), transformers' ``log_softmax`` for logprobs,
and the verifier's own processed distribution for speculative sampling (statistical).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import random_heads
from quasar_jax.speculative.accept import process_logits
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.speculative.logits import process
from quasar_jax.speculative.sampling import RowSampling, SamplingParams
from quasar_jax.weights.loading import load_model
from test_engine import PROMPTS

V = 96
N_NEW = 20


@pytest.fixture(scope="module")
def engine(hf_tiny):
    return Engine(load_model(hf_tiny(False, 2)[0], dtype=jnp.float32))


def penalize(x, prompt, out, p: SamplingParams, stop=(), position=None):
    """vLLM's order and formulas, in NumPy: min_tokens, logit_bias, repetition, frequency, presence.
    ``out``: the generated ids so far; ``position``: the generated-token number predicted (len(out))."""
    x = np.array(x, np.float32)
    if (len(out) if position is None else position) < p.min_tokens:
        x[list(stop)] = -np.inf
    for tok, value in p.logit_bias:
        x[tok] += np.float32(value)
    counts = np.bincount(np.asarray(out, int), minlength=x.size).astype(np.float32)
    seen = counts > 0
    r = np.float32(p.repetition_penalty)
    x = np.where(seen | np.isin(np.arange(x.size), prompt), np.where(x > 0, x / r, x * r), x)
    return x - np.float32(p.frequency_penalty) * counts - np.float32(p.presence_penalty) * seen


def hf_greedy(hf, prompt, n, p: SamplingParams, stop=()):
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float().numpy()
        out.append(int(np.argmax(penalize(logits, prompt, out, p, stop))))
        if out[-1] in stop:
            break
    return out


def hf_logprobs(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1).numpy()  # [T, V]


def test_process_matches_numpy_and_neutral_rows_are_untouched():
    rng = np.random.default_rng(0)
    b, t = 3, 4
    logits = rng.normal(size=(b, t, V)).astype(np.float32) * 3
    params = [SamplingParams(), SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.3,
                                               logit_bias={5: 3.0, 7: -100.0}, min_tokens=3),
              SamplingParams(repetition_penalty=0.8, min_tokens=1)]
    prompts = [rng.integers(0, V, 6).tolist() for _ in range(b)]
    outs = [rng.integers(0, V, 5).tolist() for _ in range(b)]  # generated ids before each row (same for all t)
    stop = np.array([[9, -1], [9, 11], [4, -1]], np.int32)
    new_tokens = np.array([0, 1, 0])
    counts = np.stack([np.bincount(o, minlength=V) for o in outs])
    prompt_ids = np.stack([np.isin(np.arange(V), pr) for pr in prompts])
    out_index = new_tokens[:, None] + np.arange(t)[None, :]
    got = np.asarray(process(jnp.asarray(logits), RowSampling.of(params), stop=jnp.asarray(stop),
                             out_index=jnp.asarray(out_index),
                             counts=jnp.asarray(np.repeat(counts[:, None], t, 1)), prompt_ids=jnp.asarray(prompt_ids)))
    np.testing.assert_array_equal(got[0], logits[0])  # neutral settings: bit for bit
    for i in (1, 2):
        for j in range(t):
            want = penalize(logits[i, j], prompts[i], outs[i], params[i], stop[i][stop[i] >= 0], out_index[i, j])
            np.testing.assert_allclose(got[i, j], want, rtol=1e-6, atol=1e-6)
    assert np.isneginf(got[1, :2, [9, 11]]).all() and np.isfinite(got[1, 2:, [9, 11]]).all()


# The last two rows accept drafts whose argmax depends on tokens drafted earlier in the same step
# (a loop that counted only committed tokens diverges there; found by a search on this model).
PROMPTS = PROMPTS + [[83, 40] * 4, [77, 93, 92, 85] * 2]
ROWS = [SamplingParams(repetition_penalty=1.5, logprobs=3),
        SamplingParams(presence_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(logit_bias={40: 5.0, 3: -100.0}, logprobs=0),
        SamplingParams(min_tokens=4, repetition_penalty=0.9, logprobs=20),
        SamplingParams(),
        SamplingParams(frequency_penalty=-0.7, logprobs=1),
        SamplingParams(frequency_penalty=-0.7)]


@pytest.fixture(scope="module")
def penalized_ar(engine):
    """Greedy autoregressive decoding with penalties, logit bias, min_tokens (one ragged batch)."""
    plain = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=N_NEW, drafter="none")).tokens
    stop = plain[3][0]  # row 3's first greedy token stops it unless min_tokens holds it back
    cfg = GenerationConfig(max_new_tokens=N_NEW, drafter="none", stop_ids=(stop,))
    return engine.generate(PROMPTS, cfg, sampling=ROWS), plain, stop


def test_greedy_with_penalties_equals_a_transformers_reference(penalized_ar, hf_tiny):
    res, plain, stop = penalized_ar
    hf = hf_tiny(False, 2)[1]
    for i, (prompt, p) in enumerate(zip(PROMPTS, ROWS)):
        assert res.tokens[i] == hf_greedy(hf, prompt, N_NEW, p, (stop,)), i
    for i in range(4):  # the settings changed every penalized row's output (the test can fail)
        assert res.tokens[i] != plain[i][:len(res.tokens[i])], i
    assert len(res.tokens[3]) > 4 and stop not in res.tokens[3][:4]


@pytest.mark.parametrize("draft", [dict(num_draft=3), dict(num_draft=4, num_candidates=3, tree_nodes=8), "s4c"],
                         ids=["chain", "tree", "s4c"])
def test_speculative_greedy_with_penalties_equals_autoregressive(engine, penalized_ar, draft):
    ar, _, stop = penalized_ar
    if draft == "s4c":  # a heads-grown tree (+ one n-gram candidate): the stage scores its nodes alike
        draft = dict(drafter="s4c", heads=random_heads(engine.model, num_heads=3), num_draft=3)
    sd = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=N_NEW, stop_ids=(stop,), **draft), sampling=ROWS)
    assert sd.tokens == ar.tokens
    assert sd.batch_stats.verify_steps < ar.batch_stats.verify_steps  # drafts were accepted
    for i, (a, b) in enumerate(zip(ar.logprobs, sd.logprobs)):
        assert (a is None) == (b is None) == (ROWS[i].logprobs is None)
        if a is not None:
            np.testing.assert_allclose([t.logprob for t in a], [t.logprob for t in b], atol=1e-5)


def test_logprobs_equal_transformers_log_softmax(penalized_ar, hf_tiny):
    """Raw logprobs (before penalties) of every generated token and its top-N, within 2e-3 (float32)."""
    res, _, _ = penalized_ar
    hf = hf_tiny(False, 2)[1]
    worst = 0.0
    for i, (prompt, p) in enumerate(zip(PROMPTS, ROWS)):
        if p.logprobs is None:
            assert res.logprobs[i] is None
            continue
        lp = res.logprobs[i]
        ref = hf_logprobs(hf, prompt + res.tokens[i])[len(prompt) - 1:-1]  # [T, V]: rows predicting each token
        assert len(lp) == len(res.tokens[i])
        for j, tok in enumerate(res.tokens[i]):
            worst = max(worst, abs(lp[j].logprob - ref[j, tok]))
            assert len(lp[j].top) == p.logprobs
            ids, vals = zip(*lp[j].top) if p.logprobs else ((), ())
            np.testing.assert_allclose(vals, np.sort(ref[j])[::-1][:p.logprobs], atol=2e-3)
            np.testing.assert_allclose(vals, ref[j, list(ids)], atol=2e-3)
    assert worst < 2e-3


def _top8(x):
    """NumPy softmax over the 8 largest logits (temperature 1, top-k 8)."""
    keep = x >= np.sort(x)[-8]
    e = np.where(keep, np.exp(x - x.max()), 0.0)
    return e / e.sum()


def test_speculative_sampling_with_penalties_is_exact(engine):
    """Sampling under presence / frequency / repetition penalties and a logit bias: the first
    token follows the processed distribution p0, and the second (a draft position, whose counts
    include the drafted first token d) follows p1 given d. The bias gives d p0(d) = 1/2 (so
    acceptance and rejection both happen); d is chosen where the penalty on d moves p1 most
    (checked), so a loop that forgot the drafted tokens would fail.
    """
    base = dict(temperature=1.0, top_k=8, presence_penalty=2.0, frequency_penalty=1.0, repetition_penalty=1.2)
    a, rest = 50, [40, 3, 77, 21, 9, 60, 2, 15, 88]
    model = engine.model

    def logits_after(seqs):
        seqs = jnp.asarray(seqs, jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(seqs.shape[1], dtype=jnp.int32), seqs.shape)
        return np.asarray(model(seqs, pos, model.init_cache(seqs.shape[0], 64))[0][:, -1])

    prompts = [[a, d] + rest + [a] for d in range(V)]
    x0, x1 = logits_after(prompts), logits_after([pr + [d] for d, pr in enumerate(prompts)])
    cases = []
    for d in range(V):
        y = penalize(x0[d], prompts[d], [], SamplingParams(**base)).astype(np.float64)
        f = np.log(np.exp(np.sort(np.delete(y, d))[-7:]).sum())  # d's final logit for p0(d) = 1/2
        r = base["repetition_penalty"]  # d is in the prompt: the bias comes before its penalty
        p = SamplingParams(logit_bias={d: float((f * r if f > 0 else f / r) - x0[d, d])}, **base)
        p1 = _top8(penalize(x1[d], prompts[d], [d], p))
        moved = 0.5 * np.abs(p1 - _top8(penalize(x1[d], prompts[d], [], p))).sum()
        cases.append((moved, d, p, _top8(penalize(x0[d], prompts[d], [], p)), p1))
    moved, d, p, p0, p1 = max(cases, key=lambda c: c[0])
    assert moved > 0.3 and abs(p0[d] - 0.5) < 1e-3
    n = 3000
    res = engine.generate([prompts[d]] * n, GenerationConfig(max_new_tokens=2, num_draft=3, seed=5),
                          sampling=[p] * n)
    first = np.array([t[0] for t in res.tokens])
    assert 0.5 * np.abs(np.bincount(first, minlength=V) / n - p0).sum() < 0.06
    second = np.array([t[1] for t in res.tokens])[first == d]
    assert 0.5 * np.abs(np.bincount(second, minlength=V) / second.size - p1).sum() < 0.08


def test_bad_sampling_params():
    for bad, match in [(dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency"),
                       (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_tokens=-1), "min_tokens"),
                       (dict(logprobs=21), "logprobs"), (dict(logit_bias={1: 101}), "logit_bias value"),
                       (dict(logit_bias={-1: 1}), "logit_bias token id"), (dict(min_p=1.5), "min_p"),
                       (dict(logit_bias={i: 1.0 for i in range(301)}), "at most 300")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    assert SamplingParams(logit_bias={7: 1, 2: -3.5}).logit_bias == ((2, -3.5), (7, 1.0))


def test_logit_bias_id_outside_the_vocabulary(engine):
    with pytest.raises(ValueError, match=r"logit_bias token id 500 is not in \[0, 96\)"):
        engine.generate([[1, 2]], GenerationConfig(max_new_tokens=2), sampling=[SamplingParams(logit_bias={500: 1})])


def test_min_p_drops_the_unlikely_tail():
    x = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = [[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]]  # 0.05 < 0.2 * 0.5
    np.testing.assert_allclose(process_logits(x, temperature=1.0, min_p=0.2), kept, atol=1e-6)
    rows = process_logits(x, temperature=jnp.ones((1,)), top_k=jnp.zeros((1,), jnp.int32),
                          top_p=jnp.ones((1,)), min_p=jnp.full((1,), 0.2))
    np.testing.assert_allclose(rows, kept, atol=1e-6)
    assert jax.numpy.allclose(process_logits(x, temperature=1.0, min_p=0.0), jnp.exp(x))
