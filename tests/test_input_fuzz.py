"""Property-based fuzzing of the readers of user files: only the project's InputError escapes."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quasar_jax.cli.errors import InputError
from quasar_jax.model.config import Qwen3Config

BASE = {"model_type": "qwen3", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64,
        "rope_theta": 10000.0, "eos_token_id": [1, 2], "tie_word_embeddings": True}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read(tmp_path, raw: bytes):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    try:
        return Qwen3Config.from_json(path)
    except InputError as err:
        message = str(err)
        assert "\n" not in message and str(path) in message, message
        return None


@FUZZ
@given(field=st.sampled_from(sorted(BASE) + ["rope_parameters", "rope_scaling", "layer_types",
                                             "max_position_embeddings", "bos_token_id", "hidden_act"]),
       value=json_values)
def test_mistyped_fields_give_one_line_naming_file_and_field(tmp_path, field, value):
    cfg = {**BASE, field: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    try:
        Qwen3Config.from_json(path)
    except InputError as err:
        assert "\n" not in str(err) and str(path) in str(err)


@FUZZ
@given(cut=st.integers(0, len(json.dumps(BASE)) - 1))
def test_truncated_json(tmp_path, cut):
    assert _read(tmp_path, json.dumps(BASE)[:cut].encode()) is None


@FUZZ
@given(raw=st.binary(max_size=64))
def test_random_bytes(tmp_path, raw):
    _read(tmp_path, raw)


@FUZZ
@given(doc=json_values)
def test_any_json_document(tmp_path, doc):
    _read(tmp_path, json.dumps(doc).encode())


def test_messages_name_field_and_file(tmp_path):
    path = tmp_path / "config.json"
    for cfg, expect in [({k: v for k, v in BASE.items() if k != "num_attention_heads"},
                         "required field 'num_attention_heads' is missing"),
                        ({**BASE, "vocab_size": "8192"}, "field 'vocab_size' must be a positive integer, got \"8192\""),
                        ({**BASE, "num_key_value_heads": 3}, "must be a multiple of num_key_value_heads")]:
        path.write_text(json.dumps(cfg))
        with pytest.raises(InputError, match=expect) as info:
            Qwen3Config.from_json(path)
        assert str(info.value).startswith(str(path))
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        Qwen3Config.from_json(path)
