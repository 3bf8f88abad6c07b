"""Config reading and strict checkpoint loading: every bad input gets an error naming it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from quasar_jax.model.config import Qwen3Config
from quasar_jax.weights.loading import key_table, load_model, resolve_model_dir

BASE = {"model_type": "qwen3", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64}


def test_both_rope_theta_spellings():
    old = Qwen3Config.from_hf_dict({**BASE, "rope_theta": 1e6})
    new = Qwen3Config.from_hf_dict({**BASE, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert old.rope_theta == 1e6 and new.rope_theta == 5e5
    with pytest.raises(ValueError, match="rope_theta"):
        Qwen3Config.from_hf_dict(BASE)


@pytest.mark.parametrize("extra,match", [
    ({"use_sliding_window": True, "sliding_window": 4096}, "sliding window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "linear"}}, "linear"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "llama"}, "llama"),
    ({"num_experts": 128}, "qwen3_moe"),
    ({"model_type": "qwen3_moe", "num_experts": 8}, "num_experts_per_tok"),
    ({"model_type": "qwen3_moe", "num_experts": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 16}, "disagree"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 8,
      "moe_intermediate_size": 16}, "exceeds"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 16, "mlp_only_layers": [5]}, "mlp_only_layers"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 16, "mlp_only_layers": "0"}, "mlp_only_layers"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
])
def test_unsupported_features_are_rejected(extra, match):
    with pytest.raises(ValueError, match=match):
        Qwen3Config.from_hf_dict({**BASE, "rope_theta": 1e6, **extra})


def test_missing_config_field():
    cfg = {**BASE, "rope_theta": 1e6}
    del cfg["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        Qwen3Config.from_hf_dict(cfg)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="model directory not found: ./no/such/dir"):
        resolve_model_dir("./no/such/dir")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return load_file(str(dst / "model.safetensors"))


def test_missing_extra_and_misshaped_tensors(hf_tiny, tmp_path):
    src, _ = hf_tiny(False, 2)
    name = "model.layers.1.mlp.up_proj.weight"

    tensors = _copy(src, tmp_path / "missing")
    del tensors[name]
    save_file(tensors, str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"missing tensor {name}"):
        load_model(tmp_path / "missing")

    tensors = _copy(src, tmp_path / "extra")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    save_file(tensors, str(tmp_path / "extra" / "model.safetensors"))
    with pytest.raises(ValueError, match="unknown tensor in checkpoint: model.layers.0.self_attn.q_proj.bias"):
        load_model(tmp_path / "extra")

    tensors = _copy(src, tmp_path / "shape")
    tensors[name] = tensors[name][:, :16].copy()
    save_file(tensors, str(tmp_path / "shape" / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"tensor {name} has shape \(64, 16\), expected \(64, 32\)"):
        load_model(tmp_path / "shape")


def test_tied_checkpoint_with_and_without_lm_head(hf_tiny, tmp_path):
    src, _ = hf_tiny(True, 2)
    tensors = _copy(src, tmp_path / "tied")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(tmp_path / "tied" / "model.safetensors"))
    assert load_model(tmp_path / "tied").lm_head is None
    assert load_model(src).lm_head is None


def test_sharded_checkpoint_with_index(hf_tiny, tmp_path):
    src, _ = hf_tiny(False, 2)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(out / file))
        weight_map.update({k: file for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = load_model(src), load_model(out)
    np.testing.assert_array_equal(np.asarray(a.layers[1].mlp.up_proj.kernel[...]),
                                  np.asarray(b.layers[1].mlp.up_proj.kernel[...]))
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(out)


def test_duplicate_and_corrupt_tensors(hf_tiny, tmp_path):
    src, _ = hf_tiny(False, 2)
    tensors = load_file(str(src / "model.safetensors"))
    out = tmp_path / "dup"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    name = "model.norm.weight"
    save_file(tensors, str(out / "a.safetensors"))
    save_file({name: tensors[name]}, str(out / "b.safetensors"))
    weight_map = {k: "a.safetensors" for k in tensors}
    weight_map["extra-copy"] = "b.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=f"tensor {name} appears twice"):
        load_model(out)

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(src / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="cannot read safetensors file .*model.safetensors"):
        load_model(broken)


def test_config_must_be_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config must be a JSON object, got list"):
        Qwen3Config.from_json(tmp_path)


def test_int8_weights_do_not_depend_on_the_load_dtype(hf_tiny):
    src, _ = hf_tiny(False, 2)
    a = load_model(src, dtype="float32", int8=True).layers[0].mlp.up_proj.qvalue[...]
    b = load_model(src, dtype="bfloat16", int8=True).layers[0].mlp.up_proj.qvalue[...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_key_table_follows_the_module_tree():
    cfg = Qwen3Config.from_hf_dict({**BASE, "rope_theta": 1e6})
    table = key_table(cfg)
    per_layer = {k.split(".", 3)[3]: v[2:] for k, v in table.items() if k.startswith("model.layers.1.")}
    assert per_layer == {
        "input_layernorm.weight": ("input_layernorm", "scale"),
        "self_attn.q_proj.weight": ("self_attn", "q_proj", "kernel"),
        "self_attn.k_proj.weight": ("self_attn", "k_proj", "kernel"),
        "self_attn.v_proj.weight": ("self_attn", "v_proj", "kernel"),
        "self_attn.o_proj.weight": ("self_attn", "o_proj", "kernel"),
        "self_attn.q_norm.weight": ("self_attn", "q_norm", "scale"),
        "self_attn.k_norm.weight": ("self_attn", "k_norm", "scale"),
        "post_attention_layernorm.weight": ("post_attention_layernorm", "scale"),
        "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel"),
        "mlp.up_proj.weight": ("mlp", "up_proj", "kernel"),
        "mlp.down_proj.weight": ("mlp", "down_proj", "kernel"),
    }
    assert len(table) == 3 + 11 * cfg.num_hidden_layers  # embedding, final norm, lm_head
    assert table["lm_head.weight"] == ("lm_head", "kernel")
