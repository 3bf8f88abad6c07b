"""notebooks/quasar_colab.ipynb runs top to bottom on CPU with the demo model (offline), and the
prompt set it uses ships inside the package.

The notebook is executed by nbclient in a fresh ``python3`` kernel of this interpreter, with the
parameters overridden by a cell inserted after the ``parameters`` cell (as papermill does): one
prompt per category, a few new tokens, and a hub id that cannot resolve offline, so the
fall-back-to-demo path runs too.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quasar_colab.ipynb"

OVERRIDES = """\
MODEL = "quasar-jax-tests/not-on-the-hub"  # HF_HUB_OFFLINE=1: loading fails, the demo model is used
PROMPTS_PER_CATEGORY = 1
MAX_NEW_TOKENS = 16
BATCH_SIZE = 3
"""


def _cells(nb) -> dict:
    return {c["id"]: c for c in nb.cells}


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.extend(v for k, v in out["data"].items() if k.startswith("text/"))
    return "".join(parts)


def test_notebook_format_and_committed_state():
    nbformat = pytest.importorskip("nbformat")  # a test dependency: fails loudly in CI if absent
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5)
    assert nb.metadata.kernelspec.name == "python3"
    assert all(c.get("id") for c in nb.cells) and len({c.id for c in nb.cells}) == len(nb.cells)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"cell {c.id} has outputs committed"
    cells = _cells(nb)
    assert "parameters" in cells["params"].metadata.get("tags", [])
    assert nb.cells[1].id == "params-md" and nb.cells[2].id == "params"  # parameters at the top
    assert '"google.colab" in sys.modules' in cells["install"].source
    assert not (ROOT / "notebooks" / "quickstart.ipynb").exists()


def test_shipped_prompt_set_loads():
    from quasar_jax.cli.examples import PROMPTS
    from quasar_jax.cli.prompts import load_questions

    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"question_id", "category", "turns"} and r["turns"] for r in rows)
    assert len({r["question_id"] for r in rows}) == len(rows)
    questions = load_questions([PROMPTS])
    per_category = {}
    for q in questions:
        per_category[q.category] = per_category.get(q.category, 0) + 1
    assert len(per_category) >= 5 and all(n >= 3 for n in per_category.values()), per_category


def _python3_kernelspec(root: Path) -> Path:
    """A ``python3`` kernelspec for this interpreter (first on JUPYTER_PATH, so a user-wide
    ``python3`` pointing at another Python cannot be picked instead)."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return root


def test_notebook_runs_on_cpu_with_the_demo_model(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = [c.id for c in nb.cells].index("params") + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(OVERRIDES, id="test-overrides"))

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("QUASAR_JAX_COMPILE_CACHE", "off")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel imports this checkout's package, not another installed copy.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("JUPYTER_PATH", str(_python3_kernelspec(tmp_path / "jupyter")))

    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    cells = _cells(nb)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert _text(cells["device"]).startswith("CPU: ")
    assert "falling back to the demo model" in _text(cells["load"])
    run = _text(cells["run"])
    for mode in ("ar", "ngram-sd", "tree-ngram", "quasar-w8a16", "quasar-tree-w8a16", "quasar-w8a8", "qspec"):
        assert f"{mode}: compile" in run, run
    table = [o for o in cells["table"].outputs if o.get("output_type") == "display_data"]
    assert table and any(k in table[0]["data"] for k in ("text/html", "text/markdown"))
    assert "tau" in _text(cells["table"])
    assert re.search(r"1\.00 vs ar\b(?!-)", _text(cells["table"]))  # float32 n-gram SD is lossless
    assert any("image/png" in o.get("data", {}) for o in cells["plot"].outputs)
    stream = _text(cells["stream"])
    assert "\u2502" in stream and "streamed == returned: True" in stream, stream
    s4c = _text(cells["s4c-run"])  # the demo's S4C heads, with and without their draft vocabulary
    for mode, ref in (("s4c", "ar"), ("s4c-full-vocab", "ar"), ("s4c-w8a16", "ar-w8a16")):
        assert re.search(rf"^ *{mode}: tau [\d.]+, +[\d.]+ tokens/s, same tokens as {ref}: True$", s4c, re.M), s4c
    assert re.search(r"^ *qspec \| +[\d.]+ \| +[\d.]+ \| +[\d.]+ \| +5\.00$", s4c, re.M), s4c  # K int8 forwards
    assert re.search(r"^ *ngram-sd \| .* \| +0\.00$", s4c, re.M), s4c  # n-gram lookup reads no weights
    moe = _text(cells["moe-run"])  # the MoE demo: speculative decoding equals its AR reference
    for mode, ref in (("ngram-sd", "ar"), ("quasar-w8a16", "ar-w8a16")):
        assert re.search(rf"^{mode} +tau [\d.]+, same tokens as {ref}: True$", moe, re.M), moe
    assert "experts touched per sparse layer" in moe
