"""The persistent compilation cache: on by default, a second run compiles from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from quasar_jax.cli.compile_cache import default_dir


def _decode(model_dir, *extra, env=None):
    proc = subprocess.run([sys.executable, "-m", "quasar_jax.decode", "--model", str(model_dir), "--prompt",
                           "def add(a, b):", "--max-new-tokens", "8", "--ignore-eos", "--json", *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["stats"]


def test_second_run_compiles_from_the_cache(tiny_model_dir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("QUASAR_JAX_COMPILE_CACHE", None)
    cache = tmp_path / "cache"
    first = _decode(tiny_model_dir, "--compile-cache", str(cache), env=env)
    assert any(cache.iterdir())  # programs were written
    second = _decode(tiny_model_dir, "--compile-cache", str(cache), env=env)
    assert second["compile_s"] < first["compile_s"], (first["compile_s"], second["compile_s"])
    off = tmp_path / "off"
    _decode(tiny_model_dir, "--compile-cache", "off", env={**env, "XDG_CACHE_HOME": str(off)})
    assert not off.exists()  # "off" writes nothing, not even the default directory


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_dir() == tmp_path / "quasar_jax" / "jax-compile"
