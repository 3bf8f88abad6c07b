"""The KV flags of the commands: bad values are one line and exit 2; the pool sized by
``--kv-memory-fraction`` (the arithmetic, with the device memory given; on the CPU the device
memory is the host's physical memory, tests/test_sharding.py); ``decode --kv-dtype int8`` end to
end (speculative output equals autoregressive output with int8 KV)."""

from __future__ import annotations

import json

import jax
import pytest
from flax import nnx

from quasar_jax.decode import main as decode_main
from quasar_jax.serve import main as serve_main
from test_cli_inputs import one_line_exit_2

MAINS = {"decode": decode_main, "serve": serve_main}


def _one_line_exit_2(command, argv, capsys) -> str:
    return one_line_exit_2(MAINS[command], command, argv, capsys)


@pytest.mark.parametrize("command,argv,message", [
    ("serve", ["--page-size", "0"], "--page-size: expected a positive integer, got '0'"),
    ("serve", ["--page-size", "x"], "--page-size: expected a positive integer, got 'x'"),
    ("serve", ["--kv-pages", "0"], "--kv-pages: expected a positive integer, got '0'"),
    ("serve", ["--kv-pages", "8", "--kv-memory-fraction", "0.5"],
     "argument --kv-memory-fraction: not allowed with argument --kv-pages"),
    ("serve", ["--kv-memory-fraction", "0"], "--kv-memory-fraction: expected a number in (0.0, 1.0]"),
    ("serve", ["--kv-memory-fraction", "1.5"], "--kv-memory-fraction: expected a number in (0.0, 1.0]"),
    ("serve", ["--kv-dtype", "int4"], "--kv-dtype: invalid choice: 'int4'"),
    ("serve", ["--prefill-budget", "-1"], "--prefill-budget: expected an integer >= 0, got '-1'"),
    ("decode", ["--page-size", "0"], "--page-size: expected a positive integer, got '0'"),
    ("decode", ["--kv-dtype", "fp8"], "--kv-dtype: invalid choice: 'fp8'"),
])
def test_bad_kv_flag_values(command, argv, message, capsys):
    assert message in _one_line_exit_2(command, argv, capsys)


def test_serve_int8_kv_on_the_dense_layout(tiny_model_dir, capsys):
    err = _one_line_exit_2("serve", ["--model", str(tiny_model_dir), "--kv-layout", "dense", "--kv-dtype", "int8"],
                           capsys)
    assert "kv_dtype int8 needs the paged layout" in err


def test_serve_memory_fraction_with_no_room_left(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr("quasar_jax.serving.server.device_memory_bytes", lambda: 1000)  # less than the weights
    err = _one_line_exit_2("serve", ["--model", str(tiny_model_dir), "--kv-memory-fraction", "0.9",
                                     "--drafter", "none", "--speculation", "off"], capsys)
    assert "kv_memory_fraction 0.9" in err and "leaves no KV page" in err


def test_pool_that_cannot_hold_one_request():
    from types import SimpleNamespace

    from quasar_jax.serving.kv_pages import SlotPages

    engine = SimpleNamespace(num_pages=1, page_size=8, b=2, max_pages=12, n=3, k=3, s=96,
                             drafters=[SimpleNamespace(num_draft=3)])
    with pytest.raises(ValueError, match=r"kv_pages 1: the pool cannot hold one request .* take 2 pages of 8"):
        SlotPages(engine)
    engine.num_pages = 2
    SlotPages(engine)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import jax.numpy as jnp

    from quasar_jax.weights.loading import load_model

    return load_model(tiny_model_dir, dtype=jnp.float32)


@pytest.mark.parametrize("kv_dtype,bytes_per_value", [("auto", 4), ("bfloat16", 2), ("int8", None)])
def test_kv_memory_fraction_sizes_the_pool(tiny, kv_dtype, bytes_per_value, monkeypatch):
    from quasar_jax.serving.server import ServeConfig
    from quasar_jax.speculative.drafters import make_drafter

    device = 256 * 2**20
    monkeypatch.setattr("quasar_jax.serving.server.device_memory_bytes", lambda: device)
    cfg = tiny.config
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(tiny)))
    # one token: K and V of every layer and KV head; int8: 1 byte a value and a 2-byte scale per head
    per_head = cfg.head_dim * bytes_per_value if bytes_per_value else cfg.head_dim + 2
    per_page = 16 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * per_head
    for fraction in (0.5, 0.05):
        sc = ServeConfig(drafter=make_drafter("none"), kv_memory_fraction=fraction, page_size=16, kv_dtype=kv_dtype)
        assert sc.num_kv_pages(tiny) == int((device - weights) * fraction) // per_page
    assert ServeConfig(drafter=make_drafter("none"), kv_pages=7).num_kv_pages(tiny) == 7
    assert ServeConfig(drafter=make_drafter("none"), slots=3, max_len=100, page_size=16).num_kv_pages(tiny) == 3 * 7


def test_decode_int8_kv_end_to_end(tiny_model_dir, capsys):
    out = {}
    for kv_dtype in ("int8", "float32"):
        for drafter in ("none", "ngram"):
            rc = decode_main(["--model", str(tiny_model_dir), "--prompt", "class Point:\n    def", "--max-new-tokens",
                              "24", "--drafter", drafter, "--ignore-eos", "--json", "--kv-dtype", kv_dtype])
            assert rc == 0
            row = json.loads(capsys.readouterr().out)
            assert len(row["output_ids"]) == 24
            out[kv_dtype, drafter] = row["output_ids"]
    assert out["int8", "none"] == out["int8", "ngram"]  # speculation stays lossless on int8 KV
    assert out["float32", "none"] == out["float32", "ngram"]
