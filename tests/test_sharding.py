"""Sharding without extra devices: mesh specs, partition rules, memory plan, flags; and the
subprocess runs that need several devices (8 fake CPU devices; two processes x 4 devices)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from conftest import make_hf_checkpoint
from quasar_jax import sharding
from quasar_jax.cli.mesh_flags import MeshSpec, add_mesh_flags, distributed_settings, parse_mesh_spec
from quasar_jax.model.config import Qwen3Config
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.weights.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(kv_heads=4, num_attention_heads=8, vocab_size=128, hidden_size=48, intermediate_size=96)


def _cfg(**kw) -> Qwen3Config:
    base = dict(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, head_dim=8, intermediate_size=96)
    return Qwen3Config(**{**base, **kw})


def test_mesh_spec_parsing():
    assert parse_mesh_spec("data=2,model=4") == MeshSpec(2, 4)
    assert parse_mesh_spec(" model=8 ") == MeshSpec(1, 8) and parse_mesh_spec(None) == MeshSpec()
    assert parse_mesh_spec({"data": 2}) == MeshSpec(2, 1) and str(MeshSpec(2, 4)) == "data=2,model=4"
    for bad, words in (("data=2,pipe=4", "unknown axis 'pipe'"), ("data=0", "must be positive"),
                       ("model=-2", "must be positive"), ("data=x", "must be an integer"),
                       ("data=2,data=2", "given twice"), ("data2", "axis=size pairs"), ("", "axis=size")):
        with pytest.raises(ValueError, match=words) as err:
            parse_mesh_spec(bad)
        assert "\n" not in str(err.value)


def test_mesh_flags_and_distributed_settings(monkeypatch, capsys):
    p = argparse.ArgumentParser(prog="x")
    add_mesh_flags(p)
    args = p.parse_args(["--mesh", "data=2,model=4", "--plan"])
    assert args.mesh == MeshSpec(2, 4) and args.plan and not distributed_settings(args).given
    with pytest.raises(SystemExit):
        p.parse_args(["--mesh", "data=2,gpu=4"])
    assert "unknown axis 'gpu'" in capsys.readouterr().err
    args = p.parse_args(["--coordinator-address", "h:1234", "--num-processes", "2", "--process-id", "1"])
    assert distributed_settings(args).process_id == 1
    with pytest.raises(ValueError, match="together"):
        distributed_settings(p.parse_args(["--num-processes", "2"]))
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        distributed_settings(p.parse_args(["--coordinator-address", "h:1", "--num-processes", "2",
                                           "--process-id", "2"]))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:9")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed_settings(p.parse_args([])).num_processes == 4


def test_axis_rules_and_divisibility_errors():
    assert sharding.axis_rules(_cfg(), "data=2,model=4")["kv_heads"] == "model"  # G = 4 = M
    assert sharding.axis_rules(_cfg(), "model=8")["kv_heads"] is None  # G = 4 < 8: replicated
    assert sharding.axis_rules(_cfg(), "data=8")["q_heads"] is None
    with pytest.raises(ValueError, match="num_attention_heads 6 is not divisible by the model axis 4"):
        sharding.axis_rules(_cfg(num_attention_heads=6, num_key_value_heads=2), "model=4")
    with pytest.raises(ValueError, match="num_key_value_heads 6 and the model axis 4: one must divide"):
        sharding.axis_rules(_cfg(num_attention_heads=24, num_key_value_heads=6), "model=4")
    with pytest.raises(ValueError, match="vocab_size 100 is not divisible"):
        sharding.axis_rules(_cfg(vocab_size=100), "model=8")


def test_param_axes_table_covers_every_param_and_pairs_int8_scales():
    assert sharding.param_axes(("layers", 0, "self_attn", "o_proj", "qvalue"), 2) == ("q_heads", "embed")
    assert sharding.param_axes(("layers", 0, "self_attn", "o_proj", "scale"), 1) == ("embed",)
    assert sharding.param_axes(("layers", 3, "mlp", "up_proj", "scale"), 1) == ("mlp",)
    assert sharding.param_axes(("layers", 0, "self_attn", "k_norm", "scale"), 1) == ("norm",)
    with pytest.raises(ValueError, match="no partition rule for parameter layers.0.foo.kernel"):
        sharding.param_axes(("layers", 0, "foo", "kernel"), 2)


def test_memory_plan_counts_shards():
    cfg = _cfg()  # 2 layers, D 48, H 8 x E 8, G 4, F 96, V 128, untied
    plan = sharding.memory_plan(cfg, "data=2,model=4", dtype="float32", batch=3, cache_len=64, device_gb=1)
    d, qkvo, mlp, vocab = 48, 64 * 48 * 2 + 32 * 48 * 2, 96 * 48 * 3, 128 * 48 * 2
    norms = 2 * (2 * d + 2 * 8) + d
    assert plan.params_bytes == 4 * (2 * (qkvo + mlp) // 4 + vocab // 4 + norms)
    assert plan.cache_bytes == 4 * 2 * (2 * 4 * 64 * 4 * 8) // (2 * 4)  # batch 3 padded to 4
    assert plan.fits and "fits" in plan.line()
    big = sharding.memory_plan(Qwen3Config.preset("qwen3-32b"), "model=8", int8=True, batch=16,
                               cache_len=4096, device_gb=16)
    assert 3.5 < big.params_bytes / sharding.GiB < 4.5 and big.cache_bytes == 2 * sharding.GiB
    assert big.fits
    assert not sharding.memory_plan(Qwen3Config.preset("qwen3-32b"), None, device_gb=16).fits


def test_memory_plan_kv_tokens_per_device_per_kv_dtype():
    cfg = _cfg()  # 2 layers, G 4 KV heads of E 8
    plan = sharding.memory_plan(cfg, "data=2,model=4", dtype="float32", batch=3, cache_len=64, device_gb=1)
    rest = sharding.GiB - plan.params_bytes
    # one KV head per device (4 over model=4), K and V, 2 layers: bfloat16 2 bytes a value; int8 1
    # byte a value plus a bfloat16 scale per token and head
    assert plan.kv_tokens == {"bfloat16": rest // (2 * 2 * 1 * 8 * 2), "int8": rest // (2 * 2 * 1 * (8 + 2))}
    one = sharding.memory_plan(cfg, None, dtype="float32", device_gb=1)
    assert one.kv_tokens["bfloat16"] == (sharding.GiB - one.params_bytes) // (2 * 2 * 4 * 8 * 2)
    assert "KV tokens per device after the params: bfloat16 " in plan.line() and ", int8 " in plan.line()
    assert plan.to_dict()["kv_tokens"] == plan.kv_tokens


def test_cpu_device_memory_is_the_hosts():
    import jax

    assert jax.devices()[0].platform == "cpu"
    assert sharding.device_memory_bytes() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_one_device_spec_is_no_mesh(hf_tiny):
    assert sharding.make_mesh("data=1,model=1") is None and sharding.make_mesh(None) is None
    with pytest.raises(ValueError, match="mesh data=2,model=1 needs 2 devices, but there are 1"):
        Engine(load_model(hf_tiny(False, 2)[0]), mesh="data=2")


def _python_env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def test_eight_device_suite_in_subprocess():
    """tests/test_sharding_mesh.py (decoding: meshes 1x8, 2x4, 8x1) and tests/test_serving_mesh.py
    (serving) on 8 fake CPU devices."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-rs", "--durations=8", str(ROOT / "tests" / "test_sharding_mesh.py"),
                           str(ROOT / "tests" / "test_serving_mesh.py")],
                          cwd=ROOT, env=_python_env(8), capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert "skipped" not in proc.stdout.splitlines()[-1], tail


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def decode_in_two_processes(ckpt, prompts, config: dict, mesh: str = "data=2,model=4") -> list[str]:
    """``tests/multihost_worker.py`` decoding ``prompts`` in two processes x 4 CPU devices (one
    ``mesh``); asserts both exit 0 and returns their standard outputs."""
    port, request = _free_port(), json.dumps({"prompts": prompts, "config": config})
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(ckpt),
                               str(port), str(pid), mesh, request], cwd=ROOT, env=_python_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=300))
        finally:
            proc.kill()
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-4000:]
    return [out for out, _ in outs]


def test_two_processes_decode_like_one_device(tmp_path):
    """Two processes x 4 CPU devices = one data=2,model=4 mesh (jax.distributed, gloo)."""
    ckpt = tmp_path / "ckpt"
    make_hf_checkpoint(ckpt, **SHAPE)
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [40, 3, 77, 21, 9, 60, 2, 15, 88], [50]]
    config = dict(max_new_tokens=12, num_draft=3)
    outs = decode_in_two_processes(ckpt, prompts, config)
    assert outs[1] == ""  # only process 0 prints
    got = json.loads(outs[0].strip().splitlines()[-1])
    assert got["processes"] == 2 and got["devices"] == 8
    expected = Engine(load_model(ckpt, dtype=jnp.float32)).generate(prompts, GenerationConfig(**config))
    assert got["tokens"] == expected.tokens
