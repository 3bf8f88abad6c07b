"""Quasar / QSpec end to end: int8 verifier losslessness, streaming int8 load, Orbax round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quasar_jax.convert import main as convert_main
from quasar_jax.model.quant import Int8Linear, is_quantized, quantize_model
from quasar_jax.model.qwen3 import Linear
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.weights.checkpoint import load_converted
from quasar_jax.weights.loading import load_model

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12, 13, 11, 12], [40, 3, 77, 21, 9, 60]]


@pytest.fixture(scope="module")
def int8_engine(hf_tiny):
    return Engine(load_model(hf_tiny(False, 2)[0], int8=True))


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_quasar_greedy_equals_autoregressive_of_same_int8_model(int8_engine, mode):
    ar = int8_engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, drafter="none", verifier=mode))
    sd = int8_engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, drafter="ngram", verifier=mode,
                                                        num_draft=4))
    assert sd.tokens == ar.tokens
    assert sd.batch_stats.verify_steps < ar.batch_stats.verify_steps


def test_qspec_greedy_equals_autoregressive_w8a16(int8_engine):
    ar = int8_engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, drafter="none", verifier="w8a16"))
    qs = int8_engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, drafter="qspec", verifier="w8a16",
                                                        num_draft=3))
    assert qs.tokens == ar.tokens
    assert qs.batch_stats.mean_accepted > 1.0  # w8a8 drafts mostly agree with w8a16


def test_streaming_int8_load_matches_quantizing_after_load(hf_tiny):
    path = hf_tiny(False, 2)[0]
    streamed = load_model(path, int8=True, quantize_lm_head=True)
    after = quantize_model(load_model(path), lm_head=True)
    for a, b in zip(jax.tree.leaves(nnx.state(streamed)), jax.tree.leaves(nnx.state(after))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not any(isinstance(m, Linear) for _, m in nnx.iter_modules(streamed))
    with pytest.raises(ValueError, match="ties its LM head"):
        load_model(hf_tiny(True, 2)[0], int8=True, quantize_lm_head=True)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_orbax_round_trip_is_exact_and_decodes_identically(hf_tiny, tmp_path, quantize):
    src = hf_tiny(False, 2)[0]
    out = tmp_path / f"converted-{quantize}"
    assert convert_main(["--model", str(src), "--quantize", quantize, "--dtype", "float32",
                         "--out", str(out)]) == 0
    original = load_model(src, int8=quantize == "int8")
    restored = load_model(out)
    assert is_quantized(restored) == (quantize == "int8")
    a, b = nnx.state(original), nnx.state(restored)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    verifier = "float" if quantize == "none" else "w8a16"
    cfg = GenerationConfig(max_new_tokens=12, verifier=verifier)
    assert Engine(original).generate(PROMPTS, cfg).tokens == Engine(restored).generate(PROMPTS, cfg).tokens


def test_converted_checkpoint_errors(hf_tiny, tmp_path, capsys):
    src = hf_tiny(False, 2)[0]
    out = tmp_path / "conv"
    assert convert_main(["--model", str(src), "--quantize", "int8", "--out", str(out)]) == 0
    assert convert_main(["--model", str(src), "--out", str(out)]) == 2  # refuses to overwrite
    assert "already holds a checkpoint" in capsys.readouterr().err
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_converted(out)
    import shutil
    shutil.copy(src / "config.json", out / "config.json")
    shutil.rmtree(out / "params")
    with pytest.raises(FileNotFoundError, match="missing params"):
        load_converted(out)
    with pytest.raises(SystemExit) as exc:
        convert_main(["--model", str(src), "--quantize", "int4", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_bf16_converted_model_loads_as_float32(hf_tiny, tmp_path):
    src = hf_tiny(False, 2)[0]
    out = tmp_path / "bf16"
    assert convert_main(["--model", str(src), "--quantize", "int8", "--out", str(out)]) == 0
    model = load_model(out, dtype=jnp.float32)
    assert model.embed_tokens[...].dtype == jnp.float32
    assert model.layers[0].mlp.up_proj.qvalue[...].dtype == jnp.int8
    assert isinstance(model.layers[0].mlp.up_proj, Int8Linear)
