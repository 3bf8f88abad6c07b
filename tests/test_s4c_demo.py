"""The shipped demo heads (with their draft vocabulary) held to the acceptance recorded in their
``heads.json``, teacher-forced on fixed prompts (seeded windows of the heads' training corpus, as
the recorded acceptance was measured on held-out windows of it). Lossless decoding with head
nodes accepted beyond the n-gram chain: test_s4c.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.speculative.heads import load_heads
from quasar_jax.training import corpus
from quasar_jax.training.trainer import HeadsData, HeadsTrainer, acceptance
from quasar_jax.weights.loading import load_model, load_tokenizer, DEMO_MODEL_DIR

NEW = 64


@pytest.fixture(scope="module")
def demo():
    model = load_model("demo", dtype=jnp.float32)
    tok = load_tokenizer(DEMO_MODEL_DIR)
    train, _ = corpus.list_corpus(corpus.stdlib_dir())
    prompts = corpus.text_prompts(corpus.read_texts(train), tok, 12, 48, seed=1, eos_id=None)
    engine = Engine(model)
    ar = engine.generate(prompts, GenerationConfig(max_new_tokens=NEW, drafter="none")).tokens
    return engine, load_heads("demo"), prompts, ar


def test_demo_heads_hold_their_recorded_acceptance(demo):
    """Teacher-forced top-1 acceptance per head (among the draft vocabulary) on the target's own
    continuations of fixed prompts is at least the recorded one less 0.1 (12 x 64 positions)."""
    engine, heads, prompts, ar = demo
    assert heads.draft_ids is not None and len(heads.draft_ids) == engine.model.config.vocab_size // 4
    width = max(len(p) for p in prompts) + NEW
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, (p, o) in enumerate(zip(prompts, ar)):
        tokens[i, :len(p) + len(o)] = p + o
    data = HeadsData(tokens, np.array([len(p) for p in prompts], np.int32),
                     np.array([len(p) + len(o) for p, o in zip(prompts, ar)], np.int32))
    acc = acceptance(HeadsTrainer(engine.model, heads.module()), data, 8, heads.draft_ids)
    recorded = np.asarray(heads.meta["acceptance"]["top1"])
    print("measured top-1", acc[:, 0].round(3).tolist(), "recorded", recorded.tolist())
    assert np.all(acc[:, 0] >= recorded - 0.1), (acc[:, 0], recorded)
