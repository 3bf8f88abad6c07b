"""Bad input to every command line: exit status 2, exactly one stderr line naming the problem, no
traceback, and no file outside the requested output created or changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quasar_jax.bench.cli import main as bench_main
from quasar_jax.cli.errors import InputError
from quasar_jax.cli.prompts import read_prompt_file
from quasar_jax.convert import main as convert_main
from quasar_jax.decode import main as decode_main
from quasar_jax.fidelity.cli import main as fidelity_main
from quasar_jax.train_heads import main as train_heads_main

MAINS = {"decode": decode_main, "convert": convert_main, "bench": bench_main, "fidelity": fidelity_main,
         "train_heads": train_heads_main}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir, hf_tiny):
    """Inputs the cases point at: a model, broken models, prompt files of every bad kind."""
    d = tmp_path_factory.mktemp("cli_inputs")
    (d / "dir.jsonl").mkdir()
    (d / "latin1.txt").write_bytes(b"caf\xe9\n")
    (d / "bad.jsonl").write_text('{"turns": ["ok"]}\nnot json\n')
    (d / "q.jsonl").write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["def f(x):"]}) + "\n")
    (d / "notes.txt").write_text("not a question file\n")
    (d / "afile").write_text("mine\n")
    (d / "foreign").mkdir()
    (d / "foreign" / "config.json").write_text('{"mine": 1}\n')
    noheads = d / "noheads"
    noheads.mkdir()
    for f in tiny_model_dir.iterdir():
        (noheads / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((noheads / "config.json").read_text())
    del cfg["num_attention_heads"]
    (noheads / "config.json").write_text(json.dumps(cfg))
    from conftest import random_heads
    from quasar_jax.speculative.heads import save_heads
    from quasar_jax.weights.loading import load_model

    other = random_heads(load_model(hf_tiny(False, 2)[0]), num_heads=3)  # heads of another model
    save_heads(other.module(), other.meta, d / "otherheads")
    (d / "interrupted").mkdir()
    (d / "interrupted" / "run.json").write_text(json.dumps({"model": "other"}))
    (d / "trained").mkdir()
    (d / "trained" / "heads.json").write_text("{}")
    return d


def _cases(model: str):
    long_prompt = "def add(a, b): return a + b\n" * 40
    return [
        ("decode", ["--num-draft", "0"], "--num-draft: expected a positive integer"),
        ("decode", ["--model", model, "--prompt", "   "], "--prompt 1: the prompt is empty or only whitespace"),
        ("decode", ["--model", model, "--prompt-file", "dir.jsonl"], "prompt file dir.jsonl is a directory"),
        ("decode", ["--model", model, "--prompt-file", "latin1.txt"], "prompt file latin1.txt is not UTF-8 text"),
        ("decode", ["--model", model, "--prompt-file", "bad.jsonl"], "bad.jsonl:2: not a JSON object"),
        ("decode", ["--model", model, "--prompt", "x", "--drafter", "none", "--ngram-min", "2"],
         "--ngram-min applies only to --drafter ngram"),
        ("decode", ["--model", model, "--prompt", "x", "--top-k", "5"], "--top-k applies only to sampling"),
        ("decode", ["--model", model, "--prompt", "x", "--backend", "pallas"],
         "--backend applies only to an int8 verifier"),
        ("decode", ["--model", model, "--prompt", "x", "--stop", ""], "--stop: a stop string must not be empty"),
        ("decode", ["--model", "noheads", "--prompt", "x"], "required field 'num_attention_heads' is missing"),
        ("decode", ["--model", model, "--prompt", long_prompt], "exceeds the model's context of 256 positions"),
        ("convert", ["--model", model, "--out", model], "is the source directory"),
        ("convert", ["--model", model, "--out", "foreign"], "--out foreign is not empty (holds 'config.json')"),
        ("convert", ["--model", model, "--out", "afile"], "--out afile exists and is not a directory"),
        ("convert", ["--model", model, "--quantize-lm-head", "--out", "new"],
         "--quantize-lm-head applies only with --quantize int8"),
        ("bench", ["--model", model, "--questions", "q.jsonl", "--modes", "ar-fp,foo", "--out", "b"],
         "--modes: unknown mode 'foo'"),
        ("bench", ["--model", model, "--questions", "q.jsonl", "--modes", "ar-fp", "--out", "afile"],
         "--out afile exists and is not a directory"),
        ("bench", ["--model", model, "--questions", "missing.jsonl", "--modes", "ar-fp", "--out", "b"],
         "not found: missing.jsonl"),
        ("bench", ["--model", model, "--questions", "notes.txt", "--modes", "ar-fp", "--out", "b"],
         "expected a Spec-Bench .jsonl file"),
        ("bench", ["--model", model, "--questions", "q.jsonl", "--seed", "3", "--out", "b"],
         "--seed applies only to sampling"),
        ("fidelity", ["--model", model, "--questions", "q.jsonl", "--json", "no/dir/f.json"],
         "--json no/dir/f.json: directory"),
        ("fidelity", ["--model", model, "--questions", "q.jsonl", "--modes", "w4a4"], "--modes: unknown mode 'w4a4'"),
        ("decode", ["--model", model, "--prompt", "x", "--heads", "otherheads"], "--heads applies only to --drafter s4c"),
        ("decode", ["--model", model, "--prompt", "x", "--drafter", "s4c"], "--drafter s4c: no heads beside the model"),
        ("decode", ["--model", model, "--prompt", "x", "--drafter", "s4c", "--heads", "nope"],
         "heads directory not found: nope"),
        ("decode", ["--model", model, "--prompt", "x", "--drafter", "s4c", "--heads", "foreign"],
         "foreign is not a heads directory (no heads.json)"),
        ("decode", ["--model", model, "--prompt", "x", "--drafter", "s4c", "--heads", "otherheads"],
         "--num-draft 5: the heads at otherheads are 3"),
        ("decode", ["--model", model, "--prompt", "x", "--drafter", "s4c", "--heads", "otherheads", "--num-draft", "3"],
         "do not match the model: they were trained for vocab_size 96"),
        ("decode", ["--model", model, "--prompt", "x", "--drafter", "s4c", "--heads", "otherheads", "--num-draft", "3",
                    "--tree-nodes", "999"], "--tree-nodes 999: the tree of the heads at otherheads has 32 nodes"),
        ("decode", ["--model", model, "--prompt", "x", "--num-candidates", "0"],
         "--num-candidates must be >= 1 for --drafter ngram"),
        ("bench", ["--model", model, "--questions", "q.jsonl", "--modes", "ar-fp", "--heads", "otherheads", "--out", "b"],
         "--heads applies only to the s4c modes"),
        ("train_heads", ["--model", model, "--out", "new"], "no prompts: give --prompt, --prompt-file or --text"),
        ("train_heads", ["--model", model, "--text", "missing.txt", "--out", "new"],
         "--text missing.txt: no such file or directory"),
        ("train_heads", ["--model", model, "--prompt", "x", "--out", "afile"], "--out afile exists and is not a directory"),
        ("train_heads", ["--model", model, "--prompt", "x", "--out", "foreign"], "--out foreign is not empty"),
        ("train_heads", ["--model", model, "--prompt", "x", "--out", "trained"], "--out trained already holds trained heads"),
        ("train_heads", ["--model", model, "--prompt", "x", "--out", "interrupted"],
         "--out interrupted holds an interrupted run with --model 'other'"),
        ("train_heads", ["--model", model, "--prompt", "x", "--plan", "--out", "new"], "--plan applies only to decode"),
        ("train_heads", ["--model", model, "--prompt", "x", "--steps", "0", "--out", "new"],
         "--steps: expected a positive integer"),
        ("train_heads", ["--model", model, "--prompt", "   ", "--out", "new"], "--prompt 1: the prompt is empty"),
        ("train_heads", ["--model", model, "--prompt", "x", "--draft-vocab", "100000", "--out", "new"],
         "--draft-vocab 100000 is more than the model's vocabulary"),
    ]


CASE_IDS = [f"{c[0]}-{i}" for i, c in enumerate(_cases("m"))]


def one_line_exit_2(main, command: str, argv, capsys) -> str:
    """Run ``main(argv)`` of ``python -m quasar_jax.<command>``; assert exit 2 with one error line
    (no traceback) and return that line."""
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse refuses a flag value before main's body runs
        rc = exit_.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"python -m quasar_jax.{command}: error: "), err
    return err


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(index, workdir, tiny_model_dir, capsys, monkeypatch):
    command, argv, message = _cases(str(tiny_model_dir))[index]
    monkeypatch.chdir(workdir)
    before = _snapshot(workdir)
    model_before = _snapshot(tiny_model_dir)
    assert message in one_line_exit_2(MAINS[command], command, argv, capsys)
    assert _snapshot(workdir) == before
    assert _snapshot(tiny_model_dir) == model_before


def test_non_utf8_stdin_is_one_line(tiny_model_dir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "quasar_jax.decode", "--model", str(tiny_model_dir)],
                          input=b"caf\xe9", capture_output=True, env=env, timeout=120, cwd=tmp_path)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and err.splitlines() == [
        "python -m quasar_jax.decode: error: stdin is not UTF-8 text (byte 3: b'\\xe9')"], err
    assert list(tmp_path.iterdir()) == []


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["turns", "category", "x"]), c, max_size=3),
    max_leaves=6)


@FUZZ
@given(suffix=st.sampled_from([".txt", ".jsonl", ".json", ".JSONL"]),
       raw=st.one_of(st.binary(max_size=80),
                     st.lists(json_values, max_size=4).map(lambda rows: "\n".join(map(json.dumps, rows)).encode()),
                     json_values.map(lambda v: json.dumps(v).encode()),
                     st.text(max_size=80).map(str.encode)))
def test_prompt_file_reader_raises_only_input_error(tmp_path, suffix, raw):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(raw)
    try:
        prompts = read_prompt_file(path)
    except InputError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return
    assert prompts and all(isinstance(p.text, str) and p.text.strip() for p in prompts)


@FUZZ
@given(cut=st.integers(0, 60))
def test_truncated_spec_bench_line(tmp_path, cut):
    line = json.dumps({"question_id": 7, "category": "qa", "turns": ["What is 2 + 2?"]})
    path = tmp_path / "q.jsonl"
    path.write_text(line[:cut])
    try:
        prompts = read_prompt_file(path)
    except InputError:
        return
    assert prompts[0].text == "What is 2 + 2?" and prompts[0].question_id == 7
