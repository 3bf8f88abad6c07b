"""``python -m quasar_jax.decode`` end to end on a tiny checkpoint, and its error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from quasar_jax.decode import main


def _run_cli(*args, stdin=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "quasar_jax.decode", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_json_end_to_end(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "turns": ["def add(a, b):"]}) + "\n"
                       + json.dumps({"question_id": 2, "turns": ["for i in range(10):"]}) + "\n")
    proc = _run_cli("--model", str(tiny_model_dir), "--prompt-file", str(prompts), "--max-new-tokens", "12",
                    "--ignore-eos", "--json", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["def add(a, b):", "for i in range(10):"]
    for r in rows:
        assert len(r["output_ids"]) == 12 and isinstance(r["text"], str)
        s = r["stats"]
        assert s["new_tokens"] == 12 and s["verify_steps"] >= 1 and s["compile_s"] > 0
        assert s["mean_accepted"] == pytest.approx(12 / s["verify_steps"], rel=1e-3)
        assert s["tokens_per_s"] > 0


def test_cli_modes_agree_and_stream(tiny_model_dir, capsys):
    outs = {}
    for drafter in ("none", "ngram"):
        rc = main(["--model", str(tiny_model_dir), "--prompt", "class Point:", "--max-new-tokens", "10",
                   "--drafter", drafter, "--ignore-eos", "--json"])
        assert rc == 0
        outs[drafter] = json.loads(capsys.readouterr().out)["output_ids"]
    assert outs["none"] == outs["ngram"]
    rc = main(["--model", str(tiny_model_dir), "--prompt", "class Point:", "--max-new-tokens", "10",
               "--ignore-eos", "--stream", "--chat"])
    out = capsys.readouterr().out
    assert rc == 0 and "tau=" in out


@pytest.mark.parametrize("argv,message", [
    (["--num-draft", "0"], "--num-draft: expected a positive integer"),
    (["--drafter", "eagle"], "--drafter: invalid choice: 'eagle'"),
    (["--top-p", "1.5"], "--top-p: expected a number in (0.0, 1.0]"),
    (["--verifier", "int4"], "--verifier: invalid choice: 'int4'"),
    (["--max-new-tokens", "many"], "--max-new-tokens: expected a positive integer"),
    (["--model", "./does/not/exist", "--prompt", "x"], "model directory not found: ./does/not/exist"),
    (["--prompt-file", "/no/such/prompts.txt"], "prompt file not found"),
    (["--prompt", "x", "--stream", "--batch-size", "2"], "--stream needs --batch-size 1"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys, tiny_model_dir):
    if "--model" not in argv:
        argv = ["--model", str(tiny_model_dir)] + argv
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_cli_prompt_longer_than_cache(tiny_model_dir):
    proc = _run_cli("--model", str(tiny_model_dir), "--prompt", "def add(a, b): return a + b " * 4,
                    "--max-len", "8")
    assert proc.returncode == 2
    assert "does not fit in a cache of 8 slots" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_stream_with_json_keeps_stdout_valid_jsonl(tiny_model_dir):
    proc = _run_cli("--model", str(tiny_model_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "8",
                    "--ignore-eos", "--stream", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip())  # exactly one JSON object on stdout
    norm = row["text"].replace("\r\n", "\n").replace("\r", "\n")  # text-mode pipes translate newlines
    assert norm in proc.stderr  # the streamed text went to stderr


def test_cli_empty_prompt_file(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["--model", str(tiny_model_dir), "--prompt-file", str(empty)]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_cli_unreachable_hub_id_is_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "quasar_jax.decode", "--model", "Qwen/Qwen3-0.6B", "--prompt", "x"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "'Qwen/Qwen3-0.6B' is neither a local directory nor downloadable" in err and len(err.splitlines()) == 1


def test_cli_stop_strings_question_ids_and_finish_reasons(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.JSONL"  # suffix in any case: read as Spec-Bench records
    prompts.write_text(json.dumps({"question_id": "q7", "category": "coding", "turns": ["def add(a, b):"]}) + "\n")
    base = ["--model", str(tiny_model_dir), "--prompt-file", str(prompts), "--max-new-tokens", "12",
            "--ignore-eos", "--json"]
    assert main(base) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["question_id"] == "q7" and full["category"] == "coding"
    assert full["stats"]["finish_reason"] == "length"
    text = full["text"]
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip()), None)
    assert stop is not None, text
    assert main(base + ["--stop", stop]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["text"] == text[:text.index(stop)]
    assert cut["stats"]["finish_reason"] == "stop"
    assert cut["stats"]["new_tokens"] <= full["stats"]["new_tokens"]
    assert main(["--model", str(tiny_model_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "5",
                 "--ignore-eos"]) == 0
    assert "finish=length" in capsys.readouterr().out


def test_plain_prompt_file_lines_are_verbatim(tmp_path):
    from quasar_jax.cli.prompts import read_prompt_file

    path = tmp_path / "p.txt"
    path.write_text("print('a\\nb')\n\n  second  \n")
    assert [p.text for p in read_prompt_file(path)] == ["print('a\\nb')", "  second  "]
