"""The README's runnable commands, run as written (offline, on the shipped demo model).

Lines that name a hub model (``Qwen/...``), a placeholder prompt (``"..."``), a file the reader
supplies (``prompts.jsonl``) or a server are not runnable here and are only checked to parse;
every other ``python -m quasar_jax...`` line runs in a fresh directory and must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_HERE = ("Qwen/", '"..."', "prompts.jsonl", "quasar_jax.serve", "qwen3-8b-int8")


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines, joined = [], ""
    for block in blocks:
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).rstrip()
            joined += line[:-1] + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                if "python -m quasar_jax" in joined:
                    lines.append(joined[joined.index("python -m quasar_jax"):].strip())
                joined = ""
    return lines


COMMANDS = _commands()
RUNNABLE = [c for c in COMMANDS if not any(m in c for m in NOT_HERE)]


def test_readme_has_the_commands():
    assert any(c.startswith("python -m quasar_jax.decode --prompt") for c in RUNNABLE)
    assert any(c.startswith("python -m quasar_jax.bench --questions mini") for c in RUNNABLE)


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable] + shlex.split(command)[1:]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in RUNNABLE])
def test_readme_command_parses(command):
    """The other lines at least name a command and flags that exist (argparse accepts them)."""
    module = shlex.split(command)[2]
    args = [a for a in shlex.split(command)[3:]]
    from importlib import import_module

    cli = {"quasar_jax.bench": "quasar_jax.bench.cli", "quasar_jax.fidelity": "quasar_jax.fidelity.cli"}
    parser = import_module(cli.get(module, module)).build_parser()
    parser.parse_args(args)
