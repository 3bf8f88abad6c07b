"""``python -m quasar_jax.train_heads`` on a tiny random model: the loss falls in 30 steps, the heads
load and draft losslessly, an interrupted run resumes to the same heads, checkpoints round-trip."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import random_heads
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.speculative.heads import load_heads, save_heads
from quasar_jax.train_heads import main as train_main
from quasar_jax.training.trainer import batch_rows
from quasar_jax.weights.loading import load_model

TEXT = ("def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i)\n\n"
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n") * 3


def _argv(model_dir, text, out):
    return ["--model", str(model_dir), "--text", str(text), "--out", str(out), "--num-prompts", "12",
            "--prompt-tokens", "8", "--max-new-tokens", "16", "--steps", "30", "--batch-size", "4",
            "--num-heads", "2", "--lr", "1e-2", "--warmup", "2", "--checkpoint-every", "10", "--tree-nodes", "6",
            "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("train_heads")
    (d / "corpus.py").write_text(TEXT)
    assert train_main(_argv(tiny_model_dir, d / "corpus.py", d / "heads")) == 0
    return d


def test_loss_falls_and_heads_draft_losslessly(trained, tiny_model_dir, capsys):
    out = trained / "heads"
    assert {p.name for p in out.iterdir()} == {"heads.json", "params", "training_log.json", "training_curve.png",
                                               "data.npz"}
    log = json.loads((out / "training_log.json").read_text())
    loss, kl = np.asarray(log["loss"]), np.asarray(log["kl"])
    assert len(loss) == 30 and loss[-5:].mean() < loss[:5].mean(), loss
    # The loss is the target's entropy (no head can remove it) plus KL(target || head): the KL falls.
    assert kl[-5:].mean() < 0.8 * kl[:5].mean(), kl
    meta = json.loads((out / "heads.json").read_text())
    assert meta["num_heads"] == 2 and meta["tree"]["default_nodes"] == 6
    assert len(meta["acceptance"]["top_rank"]) == 2 and meta["training"]["steps"] == 30
    assert meta["training"]["generated_tokens"] == 12 * 16  # no EOS in 16 tokens of a random model
    data = np.load(out / "data.npz")  # the draft vocabulary: the V/4 most generated ids, by count
    gen = np.arange(data["tokens"].shape[1])[None] >= data["prompt_lens"][:, None]
    gen &= np.arange(data["tokens"].shape[1])[None] < data["lengths"][:, None]
    counts = np.bincount(data["tokens"][gen], minlength=meta["vocab_size"])
    ids = meta["draft_vocab"]["ids"]
    assert meta["draft_vocab"]["size"] == len(ids) == meta["vocab_size"] // 4
    assert list(counts[ids]) == sorted(counts[ids], reverse=True) and counts[ids][-1] >= np.delete(counts, ids).max()
    heads = load_heads(out)
    engine = Engine(load_model(tiny_model_dir))
    prompts = [[5, 6, 7, 8, 5, 6, 7], [40, 3, 77, 21]]
    ar = engine.generate(prompts, GenerationConfig(max_new_tokens=16, drafter="none"))
    s4c = engine.generate(prompts, GenerationConfig(max_new_tokens=16, drafter="s4c", heads=heads, num_draft=2))
    assert s4c.tokens == ar.tokens


def test_interrupted_run_resumes_to_the_same_heads(trained, tiny_model_dir, monkeypatch, capsys):
    from quasar_jax.training import trainer

    out = trained / "resumed"
    real, calls = trainer.train_step, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 16:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    assert train_main(_argv(tiny_model_dir, trained / "corpus.py", out)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (out / "heads.json").exists() and (out / "checkpoints").is_dir() and (out / "data.npz").exists()
    monkeypatch.setattr(trainer, "train_step", real)
    assert train_main(_argv(tiny_model_dir, trained / "corpus.py", out)) == 0
    a = json.loads((trained / "heads" / "training_log.json").read_text())
    b = json.loads((out / "training_log.json").read_text())
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    pa, pb = load_heads(trained / "heads").params, load_heads(out).params
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not (out / "checkpoints").exists()


def test_heads_checkpoint_round_trip(hf_tiny, tmp_path):
    model = load_model(hf_tiny(False, 2)[0])
    heads = random_heads(model, num_heads=3)
    for dtype in (jnp.float32, jnp.bfloat16):
        out = save_heads(heads.module(), heads.meta, tmp_path / jnp.dtype(dtype).name, dtype=dtype)
        back = load_heads(out)
        assert back.meta["tree"] == heads.meta["tree"] and back.num_heads == 3
        want = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)),
                            nnx.to_pure_dict(heads.params))
        got = nnx.to_pure_dict(back.params)
        jax.tree.map(np.testing.assert_array_equal, want, jax.tree.map(np.asarray, got))
        back.check_model(model)  # its own model fits
        assert load_heads(out) is back  # cached: one object, one compiled program


def test_batches_are_epochs_of_seeded_permutations():
    rows = np.concatenate([batch_rows(10, s, 4, seed=1) for s in range(5)])  # 20 rows: 2 epochs
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    assert (batch_rows(10, 3, 4, seed=1) == batch_rows(10, 3, 4, seed=1)).all()
