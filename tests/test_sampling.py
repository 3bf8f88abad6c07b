"""Per-row sampling as device data, drafters as a protocol, typed statistics."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quasar_jax.model.modes import QuantMode
from quasar_jax.speculative.accept import process_logits
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.speculative.results import BatchStats, RowStats
from quasar_jax.speculative.sampling import GreedySampler, RowSampler, SamplingParams
from quasar_jax.weights.loading import load_model

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12, 13, 11, 12],
           [40, 3, 77, 21, 9, 60, 2, 15, 88]]


@pytest.fixture(scope="module")
def engine(hf_tiny):
    return Engine(load_model(hf_tiny(False, 2)[0], dtype=jnp.float32))


def _count_compiles(caplog, fn):
    """Number of XLA compilations while ``fn`` runs (jax's own compile log)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        out = fn()
    return sum("Finished XLA compilation" in r.getMessage() for r in caplog.records), out


def test_process_logits_per_row_equals_static():
    logits = jax.random.normal(jax.random.key(0), (4, 3, 50)) * 3
    settings = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)]
    rows = process_logits(logits, temperature=jnp.array([s[0] for s in settings])[:, None],
                          top_k=jnp.array([s[1] for s in settings])[:, None],
                          top_p=jnp.array([s[2] for s in settings])[:, None])
    for b, (t, k, p) in enumerate(settings):
        np.testing.assert_allclose(rows[b], process_logits(logits[b], temperature=t, top_k=k, top_p=p),
                                   atol=1e-6)


def test_new_sampling_values_compile_nothing(engine, caplog):
    """Temperatures 0.7, 1.0, 1.3 (and new top-k / top-p / seeds): one program, compiled once."""
    ids = [PROMPTS[0]]
    n, first = _count_compiles(caplog, lambda: engine.generate(
        ids, GenerationConfig(max_new_tokens=8, max_len=64, temperature=0.7, seed=1)))
    assert n >= 1 and first.batch_stats.compile_s > 0
    before = engine.num_compiled
    for temperature, top_k, top_p, seed in [(1.0, 5, 0.9, 2), (1.3, 0, 0.5, 3)]:
        cfg = GenerationConfig(max_new_tokens=8, max_len=64, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed)
        n, res = _count_compiles(caplog, lambda: engine.generate(ids, cfg))
        assert n == 0, f"recompiled for temperature={temperature}"
        assert res.batch_stats.compile_s == 0.0
    assert engine.num_compiled == before


def test_greedy_row_of_a_mixed_batch_is_exactly_greedy(engine):
    greedy = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, max_len=64))
    rows = [SamplingParams(), SamplingParams(temperature=1.2, top_k=20, seed=7),
            SamplingParams(temperature=0.8, top_p=0.9, seed=8)]
    mixed = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, max_len=64), sampling=rows)
    assert mixed.tokens[0] == greedy.tokens[0]
    assert mixed.stats[0] == greedy.stats[0]
    # The sampled rows really sampled (a greedy copy of them would be a silent wrong answer).
    assert mixed.tokens[1] != greedy.tokens[1] or mixed.tokens[2] != greedy.tokens[2]


def test_a_row_with_its_own_seed_does_not_depend_on_its_neighbours(engine):
    own = SamplingParams(temperature=1.0, seed=123)
    alone = engine.generate([PROMPTS[1]], GenerationConfig(max_new_tokens=12, max_len=64), sampling=[own])
    batch = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=12, max_len=64, temperature=0.9),
                            sampling=[None, own, None])
    assert batch.tokens[1] == alone.tokens[0]
    again = engine.generate([PROMPTS[1]], GenerationConfig(max_new_tokens=12, max_len=64), sampling=[own])
    assert again.tokens == alone.tokens


def test_sampler_choice_and_bad_sampling(engine):
    from quasar_jax.speculative.sampling import sampler_for

    assert sampler_for([SamplingParams()] * 2) == GreedySampler()
    assert sampler_for([SamplingParams(), SamplingParams(temperature=0.5)]) == RowSampler()
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="sampling has 1 entries for 2 prompts"):
        engine.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=2), sampling=[SamplingParams()])


@dataclasses.dataclass(frozen=True)
class OracleDrafter:
    """A test drafter that proposes a known continuation: plugs in without touching the loop."""

    prompt_len: int
    continuation: tuple[int, ...]
    num_draft: int = 4

    def draft(self, model, history, lengths, cache):
        del model, history
        known = jnp.asarray(self.continuation + (0,) * self.num_draft, jnp.int32)
        start = lengths - self.prompt_len  # [B] tokens generated so far
        idx = start[:, None] + jnp.arange(self.num_draft)[None, :]  # [B, K]
        draft = known[jnp.clip(idx, 0, known.shape[0] - 1)]
        n_draft = jnp.clip(len(self.continuation) - start, 0, self.num_draft).astype(jnp.int32)
        return draft, n_draft, cache


def test_a_new_drafter_plugs_in(engine):
    ar = engine.generate([PROMPTS[2]], GenerationConfig(max_new_tokens=16, max_len=64, drafter="none"))
    oracle = OracleDrafter(len(PROMPTS[2]), tuple(ar.tokens[0]))
    res = engine.generate([PROMPTS[2]], GenerationConfig(max_new_tokens=16, max_len=64, drafter=oracle))
    assert res.tokens == ar.tokens
    assert res.stats[0].verify_steps == 4  # 16 tokens, 4 drafts + 1 bonus accepted per step (5, 5, 5, 1)
    assert res.batch_stats.num_draft == 4


def test_typed_statistics_and_finish_reasons(engine):
    ar = engine.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=16, max_len=64, drafter="none"))
    stop = ar.tokens[0][3]
    res = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=6, max_len=64, stop_ids=(stop,)))
    assert isinstance(res.stats[0], RowStats) and isinstance(res.batch_stats, BatchStats)
    assert res.stats[0].finish_reason == "stop"
    assert all(s.finish_reason in ("stop", "length") for s in res.stats)
    assert any(s.finish_reason == "length" for s in res.stats)
    full = engine.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=40, max_len=20))
    assert full.stats[0].finish_reason == "cache_full"
    d = res.stats[0].to_dict()
    assert set(d) == {"new_tokens", "verify_steps", "mean_accepted", "emitted_hist", "finish_reason"}
    assert res.batch_stats.to_dict()["new_tokens"] == sum(s.new_tokens for s in res.stats)


def test_verifier_is_one_type():
    cfg = GenerationConfig(verifier="w8a16")
    assert cfg.verifier is QuantMode.W8A16 and cfg.verifier == "w8a16"
    assert GenerationConfig().verifier is QuantMode.FLOAT
    with pytest.raises(ValueError, match="unknown verifier 'fp'"):
        GenerationConfig(verifier="fp")
