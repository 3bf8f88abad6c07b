"""``python -m quasar_jax.fidelity`` on a tiny checkpoint: metrics present and sane, bad input."""

from __future__ import annotations

import json


from quasar_jax.fidelity.cli import main
from quasar_jax.fidelity.metrics import common_prefix


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5, 6], [5, 6]) == 2


def test_fidelity_cli_writes_table_and_json(tiny_model_dir, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "category": "code", "turns": [t]})
                                   for i, t in enumerate(["def add(a, b):", "for i in range(10):"])) + "\n")
    out = tmp_path / "fid.json"
    assert main(["--model", str(tiny_model_dir), "--questions", str(questions), "--max-new-tokens", "8",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| w8a16 |" in table and "| w8a8 |" in table
    res = json.loads(out.read_text())
    assert res["prompts"] == 2
    for mode in ("w8a16", "w8a8"):
        r = res["modes"][mode]
        assert 0.5 <= r["top1_agreement"] <= 1.0 and r["mean_kl"] >= 0.0
        assert 0 <= r["mean_common_prefix"] <= 8 and r["tau_quasar"] >= 1.0 and r["tau_sd_fp"] >= 1.0


def test_fidelity_cli_bad_mode(tiny_model_dir, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 0, "turns": ["x"]}) + "\n")
    assert main(["--model", str(tiny_model_dir), "--questions", str(questions), "--modes", "w4a4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown mode 'w4a4'" in err and len(err.splitlines()) == 1
