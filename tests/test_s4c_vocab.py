"""S4C's draft vocabulary and the heads' fingerprint of the LM head and final norm.

The heads may score only N ids (``heads.json``'s ``draft_vocab``) through a slice of the LM head
gathered once per program; verification is the target's, so output equals plain AR decoding
(float32 greedy, and w8a16 against w8a16 AR, where the slice is read as int8). Heads trained for
another checkpoint (same shapes, another LM head or final norm) are refused with one line.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_heads
from quasar_jax.cli.errors import InputError
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.speculative.heads import (LoadedHeads, check_model, draft_slice, draft_vocab_ids, fingerprint,
                                          head_logits, save_heads)
from quasar_jax.speculative.s4c import TreeShape, grow_tree
from quasar_jax.weights.loading import load_model
from test_engine import PROMPTS


def with_vocab(heads: LoadedHeads, ids) -> LoadedHeads:
    ids = [int(i) for i in ids]
    return LoadedHeads(heads.module(), {**heads.meta, "draft_vocab": {"size": len(ids), "ids": ids}}, None)


def vocab_of(model, size: int) -> np.ndarray:
    """A draft vocabulary that keeps the prompts' ids and a seeded share of the others."""
    v = model.config.vocab_size
    keep = sorted({t for p in PROMPTS for t in p})
    rest = np.random.default_rng(0).permutation([i for i in range(v) if i not in keep])
    return np.asarray(keep + rest[:size - len(keep)].tolist(), np.int32)


@pytest.fixture(scope="module")
def engine(hf_tiny):
    return Engine(load_model(hf_tiny(False, 2)[0], dtype=jnp.float32))


def test_draft_vocab_ids_rank_by_frequency_then_id():
    tokens = np.array([[5, 5, 5, 2, 2, 9, 0], [9, 9, 1, 1, 1, 1, 7]])
    mask = np.ones_like(tokens, bool)
    mask[1, 2:] = False  # the 1s and 7 are not counted
    assert draft_vocab_ids(tokens, mask, 12, 5).tolist() == [5, 9, 2, 0, 1]
    with pytest.raises(ValueError, match="draft vocabulary size"):
        draft_vocab_ids(tokens, mask, 12, 13)


def test_grow_tree_over_the_draft_vocabulary_matches_plain_python(engine):
    """Every node is the rank-r id among the draft ids' logits (full logits restricted)."""
    model = engine.model
    heads = random_heads(model, num_heads=3)
    ids = vocab_of(model, model.config.vocab_size // 4)
    vocab = draft_slice(nnx.split(model)[1], ids)
    assert vocab["kernel"].shape == (model.config.hidden_size, len(ids))
    module, shape = heads.module(), TreeShape.from_ranked(heads.meta["tree"]["paths"], 10)
    hidden = jax.random.normal(jax.random.key(5), (2, model.config.hidden_size))
    last = jnp.asarray([7, 50], jnp.int32)
    got = np.asarray(jax.jit(lambda h, t: grow_tree(module, model, shape, h, t, vocab))(hidden, last))
    for b in range(2):
        feat, tok = {(): hidden[b]}, {(): int(last[b])}
        for i, path in enumerate(shape.paths):
            f = module.blocks[len(path) - 1](feat[path[:-1]][None], model.embed(jnp.asarray([tok[path[:-1]]])))[0]
            logits = np.asarray(head_logits(model, f))[ids]
            tok[path], feat[path] = int(ids[np.argsort(-logits, kind="stable")[path[-1]]]), f
            assert got[b, i] == tok[path]
    assert set(got.ravel().tolist()) <= set(ids.tolist())


@pytest.mark.parametrize("c", [0, 1])
def test_greedy_s4c_with_draft_vocab_equals_autoregressive(engine, c):
    model = engine.model
    heads = with_vocab(random_heads(model, num_heads=3), vocab_of(model, model.config.vocab_size // 4))
    ar = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=24, drafter="none")).tokens
    cfg = GenerationConfig(max_new_tokens=24, drafter="s4c", heads=heads, num_draft=3, num_candidates=c)
    assert engine.generate(PROMPTS, cfg).tokens == ar


def test_greedy_s4c_with_draft_vocab_equals_autoregressive_w8a16(hf_tiny):
    """An int8 target (float LM head): the slice is quantised per column and read as int8."""
    engine = Engine(load_model(hf_tiny(False, 2)[0], int8=True))
    model = engine.model
    ids = vocab_of(model, model.config.vocab_size // 4)
    vocab = draft_slice(nnx.split(model)[1], ids)
    assert vocab["qvalue"].dtype == jnp.int8 and vocab["scale"].shape == (len(ids),)
    heads = with_vocab(random_heads(model, num_heads=3), ids)
    ar = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, drafter="none", verifier="w8a16"))
    cfg = GenerationConfig(max_new_tokens=20, drafter="s4c", heads=heads, num_draft=3, verifier="w8a16")
    assert engine.generate(PROMPTS, cfg).tokens == ar.tokens


def test_tied_embedding_slice(hf_tiny):
    model = load_model(hf_tiny(True, 2)[0], dtype=jnp.float32)
    ids = np.array([3, 1, 40], np.int32)
    vocab = draft_slice(nnx.split(model)[1], ids)
    np.testing.assert_array_equal(np.asarray(vocab["embed"]), np.asarray(model.embed_tokens[...])[ids])
    q = draft_slice(nnx.split(model)[1], ids, int8=True)  # [D, N] int8 columns of the tied embedding
    np.testing.assert_allclose(np.asarray(q["qvalue"], np.float32) * np.asarray(q["scale"]),
                               np.asarray(model.embed_tokens[...])[ids].T, atol=float(np.max(q["scale"])))


# ----------------------------------------------------------------------------- fingerprint
@pytest.mark.parametrize("part", ["lm_head", "norm"])
def test_heads_of_another_checkpoint_are_refused(engine, part):
    """Same shapes and embedding, another LM head or final norm: one line naming the statistic."""
    model = engine.model
    heads = random_heads(model, num_heads=2)
    other = nnx.clone(model)
    if part == "lm_head":
        other.lm_head.kernel.set_value(other.lm_head.kernel[...] * 1.3)
    else:
        other.norm.scale.set_value(jnp.roll(other.norm.scale[...] + jnp.arange(other.norm.scale.shape[0]) * 0.01, 1))
    heads.check_model(model)
    with pytest.raises(InputError) as err:
        heads.check_model(other)
    msg = str(err.value)
    assert "\n" not in msg and "another model of the same shape" in msg and ("LM head" in msg or "final norm" in msg)


def test_old_fingerprint_without_head_checksums_still_loads(engine):
    model = engine.model
    heads = random_heads(model, num_heads=2)
    old = {k: v for k, v in fingerprint(model).items() if not k.startswith(("lm_head", "final_norm"))}
    check_model({**heads.meta, "model": old}, model, "old")  # no error: only what it carries is checked


def test_int8_model_matches_float_fingerprint(hf_tiny):
    """Heads trained on the float target serve its int8 copy (the checksums agree within tolerance)."""
    d = hf_tiny(False, 2)[0]
    heads = random_heads(load_model(d, dtype=jnp.float32), num_heads=2)
    heads.check_model(load_model(d, int8=True))


def test_decode_refuses_foreign_heads_with_one_line(tiny_model_dir, tmp_path, capsys):
    from quasar_jax import decode

    model = load_model(tiny_model_dir)
    heads = random_heads(model, num_heads=2)
    meta = dict(heads.meta)
    meta["model"] = {**meta["model"], "lm_head_mean_abs": meta["model"]["lm_head_mean_abs"] * 1.5}
    save_heads(heads.module(), meta, tmp_path / "h")
    rc = decode.main(["--model", str(tiny_model_dir), "--prompt", "def", "--drafter", "s4c", "--heads",
                      str(tmp_path / "h"), "--num-draft", "2", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "another model of the same shape (LM head: lm_head_mean_abs" in err
