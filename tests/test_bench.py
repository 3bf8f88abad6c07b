"""Benchmark harness: metric aggregation on a hand-built case, question loading, fidelity, CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import random_heads
from quasar_jax.bench import cli as bench_cli
from quasar_jax.bench.metrics import Batch, ModeRun, summarize, truncate_output
from quasar_jax.bench.modes import resolve_modes
from quasar_jax.bench.step_cost import draft_bytes, step_cost
from quasar_jax.cli import prompts
from quasar_jax.fidelity.metrics import common_prefix, fidelity
from quasar_jax.model.modes import QuantMode
from quasar_jax.speculative import features
from quasar_jax.speculative.drafters import NGramDrafter, QSpecDrafter, make_drafter
from quasar_jax.speculative.engine import Engine
from quasar_jax.weights.loading import load_model
from test_s4c_vocab import with_vocab


def _run(mode, outputs, steps, batches, reference="ar-fp"):
    return ModeRun(mode, outputs, steps, batches, compile_s=1.5, reference=reference)


def test_summarize_by_hand():
    cats = ["a", "a", "b"]
    runs = {
        # ar-fp: category a = 6 tokens in 2 s (3 tok/s), b = 3 tokens in 3 s (1 tok/s)
        "ar-fp": _run("ar-fp", [[1, 2, 3, 4], [5, 6], [7, 8, 9]], [4, 2, 3],
                      [Batch("a", [0], [1.0]), Batch("a", [1], [1.0]), Batch("b", [2], [3.0])]),
        # sd-fp: prompt 1 differs; walls are medians of three repeats
        "sd-fp": _run("sd-fp", [[1, 2, 3, 4], [5, 7], [7, 8, 9]], [2, 1, 1],
                      [Batch("a", [0], [0.5, 0.9, 0.2]), Batch("a", [1], [0.5, 0.5, 0.5]),
                       Batch("b", [2], [1.0, 0.8, 1.4])]),
        # an HF-like mode with unknown steps and a batch of two
        "hf-ar": _run("hf-ar", [[1, 2, 3, 4], [5, 6], [7, 8]], [None, None, None],
                      [Batch("a", [0, 1], [4.0]), Batch("b", [2], [2.0])]),
        # its reference (ar-w8a8) was not run
        "quasar-w8a8": _run("quasar-w8a8", [[1], [2], [3]], [1, 1, 1],
                            [Batch("a", [0, 1], [1.0]), Batch("b", [2], [1.0])], reference="ar-w8a8"),
    }
    res = summarize(runs, cats)

    ar = res["ar-fp"]
    assert ar["overall"]["tokens_per_s"] == pytest.approx(9 / 5)
    assert ar["categories"]["a"]["tokens_per_s"] == pytest.approx(3.0)
    assert ar["overall"]["tau"] == pytest.approx(1.0)
    assert ar["overall"]["speedup_vs_ar_fp"] == pytest.approx(1.0)
    assert ar["overall"]["exact_match"] == 1.0

    sd = res["sd-fp"]
    assert sd["categories"]["a"]["tau"] == pytest.approx(6 / 3)
    assert sd["categories"]["b"]["tau"] == pytest.approx(3 / 1)
    assert sd["overall"]["tau"] == pytest.approx(9 / 4)  # pooled, not the mean of ratios
    assert sd["overall"]["verify_steps"] == 4 and sd["overall"]["new_tokens"] == 9
    assert sd["categories"]["a"]["wall_s"] == pytest.approx(1.0)  # medians 0.5 + 0.5
    assert sd["categories"]["a"]["speedup_vs_ar_fp"] == pytest.approx((6 / 1.0) / 3.0)
    assert sd["categories"]["b"]["speedup_vs_ar_fp"] == pytest.approx((3 / 1.0) / 1.0)
    assert sd["overall"]["speedup_vs_ar_fp"] == pytest.approx((9 / 2.0) / (9 / 5))
    assert sd["categories"]["a"]["exact_match"] == pytest.approx(0.5)
    assert sd["overall"]["exact_match"] == pytest.approx(2 / 3)
    assert sd["overall"]["mean_common_prefix_vs_reference"] == pytest.approx((4 + 1 + 3) / 3)
    assert sd["overall"]["compile_s"] == 1.5
    # per-repeat totals: (0.5+0.5+1.0, 0.9+0.5+0.8, 0.2+0.5+1.4)
    assert sd["overall"]["wall_s_min_repeat"] == pytest.approx(2.0)
    assert sd["overall"]["wall_s_max_repeat"] == pytest.approx(2.2)

    hf = res["hf-ar"]
    assert hf["overall"]["tau"] is None and hf["overall"]["verify_steps"] is None
    assert hf["overall"]["new_tokens"] == 8
    assert hf["overall"]["tokens_per_s"] == pytest.approx(8 / 6.0)
    assert hf["categories"]["b"]["exact_match"] == 0.0
    assert hf["overall"]["exact_match"] == pytest.approx(2 / 3)

    q = res["quasar-w8a8"]
    assert q["overall"]["exact_match"] is None  # reference not run
    assert q["overall"]["exact_match_vs_ar_fp"] == 0.0


def test_counting_helpers_and_modes():
    assert truncate_output([4, 5, 0, 6, 7], stop_ids=[0], max_new_tokens=10) == [4, 5, 0]
    assert truncate_output([4, 5, 6, 7], stop_ids=[], max_new_tokens=3) == [4, 5, 6]
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    modes, added = resolve_modes(["quasar-w8a8", "hf-ar"])
    assert modes == ["ar-fp", "ar-w8a8", "quasar-w8a8", "hf-ar"] and added == ["ar-fp", "ar-w8a8"]
    modes, added = resolve_modes(["qspec"])
    assert set(added) == {"ar-fp", "ar-int8"}
    with pytest.raises(ValueError, match="unknown mode 'nope'"):
        resolve_modes(["nope"])


def test_load_questions(tmp_path):
    a = tmp_path / "alpaca.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "category": "", "turns": ["first"]},
        {"question_id": 2, "turns": ["second", "ignored turn"]},
        {"question_id": 3, "category": "qa", "turns": ["third"]},
        {"question_id": 4, "category": "", "turns": ["fourth"]},
    ]) + "\n")
    b = tmp_path / "more.jsonl"
    b.write_text(json.dumps({"question_id": 9, "category": "qa", "turns": ["third"]}) + "\n"
                 + json.dumps({"question_id": 10, "category": "qa", "turns": ["tenth"]}) + "\n")
    qs = prompts.load_questions([a, b], num_prompts=2)
    assert [(q.category, q.text) for q in qs] == [
        ("alpaca", "first"), ("alpaca", "second"), ("qa", "third"), ("qa", "tenth")]
    assert len(prompts.load_questions([a, b])) == 5  # duplicate "third" used once
    with pytest.raises(FileNotFoundError):
        prompts.load_questions([tmp_path / "missing.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        prompts.load_questions([bad])


def test_fidelity_identical_and_quantized(tiny_model_dir):
    from quasar_jax.model.quant import quantize_model
    from quasar_jax.speculative.engine import Engine, GenerationConfig
    from quasar_jax.weights.loading import load_model

    model = load_model(tiny_model_dir, dtype=jnp.float32)
    prompts = [[5, 6, 7, 8, 9, 5, 6], [11, 12, 13]]
    outs = Engine(model).generate(prompts, GenerationConfig(max_new_tokens=6, drafter="none")).tokens
    same = fidelity(model, model, "w8a16", prompts, outs, ar_q_outputs=outs)
    assert same["top1_agreement"] == 1.0
    assert abs(same["mean_kl"]) < 1e-6
    assert same["mean_common_prefix"] == pytest.approx(6.0)
    assert same["positions"] == 12 and same["prompts"] == 2

    q = quantize_model(nnx.clone(model))
    fid = fidelity(model, q, "w8a8", prompts, outs)
    assert 0.0 <= fid["top1_agreement"] <= 1.0
    assert fid["mean_kl"] >= -1e-6
    assert fid["mean_common_prefix"] is None  # no int8 AR outputs given


def test_cli_end_to_end(tiny_model_dir, tmp_path):
    questions = tmp_path / "mini.jsonl"
    questions.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "category": "code", "turns": ["def add(a, b):\n    return a + b\n"]},
        {"question_id": 2, "category": "code", "turns": ["for i in range(10):\n    print(i)\n"]},
        {"question_id": 3, "category": "", "turns": ["class Point:\n    def __init__(self, x, y):"]},
    ]) + "\n")
    out = tmp_path / "bench"
    rc = bench_cli.main(["--model", str(tiny_model_dir), "--questions", str(questions),
                         "--num-prompts", "2", "--max-new-tokens", "8", "--repeats", "1",
                         "--modes", "ar-fp,sd-fp,quasar-w8a8,hf-ar", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert {"machine", "config", "modes", "fidelity"} <= set(res)
    assert {"cpu", "cores_available", "jax", "backend"} <= set(res["machine"])
    assert set(res["modes"]) == {"ar-fp", "ar-w8a8", "sd-fp", "quasar-w8a8", "hf-ar"}
    assert res["modes"]["ar-w8a8"]["overall"]["auto_added"] is True
    for name, mode in res["modes"].items():
        o = mode["overall"]
        for key in ("tau", "tokens_per_s", "speedup_vs_ar_fp", "exact_match", "compile_s",
                    "new_tokens", "verify_steps"):
            assert key in o, (name, key)
        assert set(mode["categories"]) == {"code", "mini"}
        assert o["new_tokens"] > 0 and o["tokens_per_s"] > 0
    modes = res["modes"]
    assert modes["ar-fp"]["overall"]["speedup_vs_ar_fp"] == pytest.approx(1.0)
    assert modes["sd-fp"]["overall"]["exact_match"] == 1.0  # greedy speculative is lossless
    assert modes["quasar-w8a8"]["overall"]["exact_match"] == 1.0  # vs ar-w8a8
    assert modes["hf-ar"]["overall"]["tau"] == pytest.approx(1.0)  # one forward per token
    assert modes["hf-ar"]["overall"]["compile_s"] is None
    assert set(res["step_cost"]) == {"sd-fp", "quasar-w8a8"}  # the drafting modes: r per mode
    assert all(c["r_bytes"] == 0 and c["r"] > 0 for c in res["step_cost"].values())
    assert "| quasar-w8a8 | 6 |" in (out / "results.md").read_text()
    assert modes["ar-fp"]["overall"]["compile_s"] > 0
    fid = res["fidelity"]["w8a8"]
    assert {"top1_agreement", "mean_kl", "mean_common_prefix", "categories"} <= set(fid)
    md = (out / "results.md").read_text()
    assert "| sd-fp |" in md and "| quasar-w8a8 |" in md and "fidelity" in md
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]["outputs"]) == set(res["modes"])


def test_cli_errors(tmp_path, capsys):
    rc = bench_cli.main(["--questions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "questions file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        bench_cli.main(["--questions", "x.jsonl"])  # --out missing
    assert err.value.code == 2


def test_questions_mini_is_the_shipped_set():
    from quasar_jax.cli.examples import PROMPTS

    assert [q.text for q in prompts.load_questions(["mini"], 1)] == \
        [q.text for q in prompts.load_questions([PROMPTS], 1)]


def test_step_cost_counts_the_weights_each_draft_reads(hf_tiny):
    """r per mode: n-gram drafts read no weights, QSpec reads the int8 model K times, S4C one head
    block and the LM head (or its draft-vocabulary slice) per tree depth; the verify reads every
    weight but the (untied) embedding table. Counted by hand from the config."""
    path = hf_tiny(False, 2)[0]
    engine = Engine(load_model(path, dtype=jnp.float32))
    c = engine.model.config
    d, e, f, v = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    layer = d * e * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * d * f + 2 * d + 2 * e
    weights = 4 * (c.num_hidden_layers * layer + d + v * d)  # float32; the final norm and LM head

    ngram = step_cost(engine, NGramDrafter(num_draft=4), QuantMode.FLOAT, 2, 64, calls=1)
    assert ngram["verify_bytes"] == weights and ngram["draft_bytes"] == 0 and ngram["r_bytes"] == 0
    assert ngram["verified_tokens"] == 5 and set(ngram["verify_ms"]) == {"1", "5"}
    assert ngram["draft_ms"] > 0 and ngram["r"] == ngram["draft_ms"] / ngram["verify_ms"]["1"]

    heads = random_heads(engine.model, num_heads=3)
    block = sum(x.size * 4 for x in jax.tree.leaves(heads.params)) // 3
    ids = list(range(0, v, 4))
    s4c = make_drafter("s4c", heads=with_vocab(heads, ids), num_draft=3)
    cost = step_cost(engine, s4c, QuantMode.FLOAT, 2, 64, calls=1)
    depth = s4c.tree.max_depth
    assert cost["verified_tokens"] == s4c.num_nodes + 1
    assert cost["draft_bytes"] == depth * (block + 4 * len(ids) * d)
    full = make_drafter("s4c", heads=heads, num_draft=3)
    extra = features.split_params(features.program_params(engine.params, full), full)[1]
    assert draft_bytes(full, engine.params, extra) == depth * (block + 4 * v * d)

    q = Engine(load_model(path, int8=True))
    qspec = step_cost(q, QSpecDrafter(num_draft=3), QuantMode.W8A16, 1, 64, calls=1)
    assert qspec["draft_bytes"] == 3 * qspec["verify_bytes"] and qspec["r_bytes"] == 3
    assert qspec["verify_bytes"] < weights  # int8 layers
