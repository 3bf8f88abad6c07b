"""The layering of the package, written as import-linter contracts in pyproject.toml.

``lint-imports`` must keep every contract; and each contract must bite: a copy of the package with
one forbidden import planted per contract breaks exactly the contracts it should.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quasar_jax", "pallas_kernels")
CONTRACTS = {c["id"]: c["name"] for c in
             tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}

# (file, planted import, the contracts it must break)
PLANTED = [
    ("quasar_jax/model/qwen3.py", "import quasar_jax.speculative.engine", {"layers", "model"}),
    ("quasar_jax/speculative/tree.py", "import quasar_jax.speculative.accept", {"drafters"}),
    ("quasar_jax/decode.py", "import quasar_jax.serving.api", {"serving"}),
    ("pallas_kernels/__init__.py", "import quasar_jax.model.modes", {"layers", "kernels"}),
    ("quasar_jax/sharding/rules.py", "import quasar_jax.weights.loading", {"layers"}),
    ("quasar_jax/paging/pool.py", "import quasar_jax.model.kv_quant", {"layers", "paging"}),
]


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "lint-imports not found: install the test extras (import-linter)"
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([exe, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _broken(output: str) -> set[str]:
    """Ids of the contracts ``lint-imports`` reported broken (its summary lines end in BROKEN)."""
    flat = " ".join(output.split())
    return {cid for cid, name in CONTRACTS.items() if f"{' '.join(name.split())} BROKEN" in flat}


def test_contracts_are_kept():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in proc.stdout


def test_each_contract_bites(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=lambda d, names: [
            n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir()) or n == "__pycache__"])
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for rel, line, _ in PLANTED:
        path = tmp_path / rel
        path.write_text(path.read_text() + f"\n{line}  # planted by test_layering\n")
    proc = _lint_imports(tmp_path, pythonpath=tmp_path)
    assert proc.returncode != 0, proc.stdout
    expected = set().union(*(contracts for _, _, contracts in PLANTED))
    assert expected == set(CONTRACTS), "every contract has a planted import that breaks it"
    assert _broken(proc.stdout) == expected, proc.stdout
    for _, line, _ in PLANTED:  # import-linter names the offending import
        assert line.split()[-1] in proc.stdout, (line, proc.stdout)
