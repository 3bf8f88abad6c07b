"""S4C vs autoregressive, the n-gram chain and the n-gram tree, side by side in one process.

Per Spec-Bench category: tau (tokens per verify step, bonus included), tokens/s and exact match
against the mode's own autoregressive reference (float AR for float verifiers, AR with the int8
weight-only verifier for ``s4c-w8a16``); per-depth acceptance of the drafts; and the step-cost model's
inputs: the verify forward's time against its token count T, and the heads' drafting time.

Every mode decodes the same prompts (batch 1, greedy) with the same cache length; only the
on-device ``while_loop`` is timed (prefill and compile excluded), each prompt the faster of
``--repeats`` runs (``scripts/bench_tree.py``'s runner). Writes JSON (``--out``), prints markdown.

    python scripts/bench_s4c.py --questions ../shared/specbench/*.jsonl --num-prompts 3 \\
        --max-new-tokens 64 --machine "CPU 2 cores, shared" --out docs/results/s4c_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench_tree import run_mode
from quasar_jax.bench.report import machine_info
from quasar_jax.bench.step_cost import carried_ms, median_ms, verify_program
from quasar_jax.cli.prompts import encode, load_questions
from quasar_jax.speculative.buckets import round_up
from quasar_jax.speculative.engine import GenerationConfig
from quasar_jax.speculative.heads import resolve_heads
from quasar_jax.speculative.s4c import grow_tree
from quasar_jax.weights.loading import load, load_model, resolve_model_dir

REFERENCE = {"float": "ar", "int8": "ar-int8"}
# Heads with a draft vocabulary also run as s4c-full-vocab, s4c-heads-only-full-vocab and
# s4c-w8a16-full-vocab (the same heads scoring every token): the draft vocabulary's cost in tau.


def mode_table(args, heads) -> dict[str, tuple[str, GenerationConfig]]:
    """name -> (which model runs it, config)."""
    k, n = args.num_draft, args.max_new_tokens
    s4c = dict(drafter="s4c", heads=heads, num_draft=k)
    modes = {"ar": ("float", GenerationConfig(max_new_tokens=n, drafter="none")),
             "chain": ("float", GenerationConfig(max_new_tokens=n, num_draft=k)),
             "ngram-tree": ("float", GenerationConfig(max_new_tokens=n, num_draft=k, num_candidates=4, tree_nodes=16)),
             "s4c": ("float", GenerationConfig(max_new_tokens=n, num_candidates=1, **s4c)),
             "s4c-heads-only": ("float", GenerationConfig(max_new_tokens=n, num_candidates=0, **s4c)),
             "ar-int8": ("int8", GenerationConfig(max_new_tokens=n, drafter="none", verifier="w8a16")),
             "s4c-w8a16": ("int8", GenerationConfig(max_new_tokens=n, num_candidates=1, verifier="w8a16", **s4c))}
    if heads.draft_ids is not None:  # the same heads scoring the full vocabulary, beside the draft one
        full = dict(s4c, heads=heads.full_vocab())
        modes["s4c-full-vocab"] = ("float", GenerationConfig(max_new_tokens=n, num_candidates=1, **full))
        modes["s4c-heads-only-full-vocab"] = ("float", GenerationConfig(max_new_tokens=n, num_candidates=0, **full))
        modes["s4c-w8a16-full-vocab"] = ("int8", GenerationConfig(max_new_tokens=n, num_candidates=1,
                                                                  verifier="w8a16", **full))
    for nodes in args.sweep:
        for c in (0, 1):
            modes[f"s4c-n{nodes}-c{c}"] = ("float", GenerationConfig(max_new_tokens=n, num_candidates=c,
                                                                     tree_nodes=nodes, **s4c))
    chosen = {m: v for m, v in modes.items() if args.modes is None or m in args.modes or m.startswith("s4c-n")}
    refs = {REFERENCE[which] for which, _ in chosen.values()}  # each model's AR reference, first
    return {m: v for m, v in modes.items() if m in refs} | chosen


def summary(runs) -> dict:
    new, steps, secs = (sum(r[i] for r in runs) for i in range(3))
    hist = np.sum([r[4] for r in runs], axis=0)
    reach = [float(hist[d + 1:].sum() / max(hist.sum(), 1)) for d in range(len(hist) - 1)]  # P(>= d accepted)
    return dict(new_tokens=new, verify_steps=steps, tau=new / max(steps, 1), tokens_per_s=new / secs,
                accepted_at_least=reach[1:],
                depth_acceptance=[reach[d] / reach[d - 1] if reach[d - 1] else 0.0 for d in range(1, len(reach))])


def verify_cost(model, s: int, lengths: int, tokens=(1, 2, 4, 6, 8, 12, 17, 22, 33, 49), calls: int = 20) -> dict:
    """Median ms of one verify forward of T tokens over a cache of ``lengths`` committed slots."""
    graphdef, params = nnx.split(model)
    fwd = verify_program(graphdef)
    cache = lambda: model.init_cache(1, s).replace(lengths=jnp.full((1,), lengths, jnp.int32))  # donated: one per T
    return {t: carried_ms(fwd, (params, jnp.ones((1, t), jnp.int32)), cache(), calls) for t in tokens}


def draft_cost(model, heads, drafter, calls: int = 20) -> float:
    """Median ms of growing the S4C tree (the heads' whole drafting work, over their draft
    vocabulary if they have one) for one row."""
    fn = jax.jit(lambda p, h, t: grow_tree(heads.module(p[0]), model, drafter.tree, h, t, p[1]))
    h, t = jnp.zeros((1, model.config.hidden_size)), jnp.ones((1,), jnp.int32)
    params = drafter.program_params(nnx.split(model)[1])
    return median_ms(fn, (params, h, t), calls)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--heads", default=None, help="heads directory (default: beside the model)")
    ap.add_argument("--questions", nargs="+", required=True)
    ap.add_argument("--num-prompts", type=int, default=3, help="questions per category")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--num-draft", type=int, default=5)
    ap.add_argument("--modes", nargs="*", default=None,
                    help="a subset of the modes (default: all; their AR references are added)")
    ap.add_argument("--sweep", nargs="*", type=int, default=[], help="tree sizes N of extra s4c modes (C = 0, 1)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--machine", default=None, help="a name for this machine in the results")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    model, tok = load(args.model, dtype="float32")
    models = {"float": model, "int8": load_model(args.model, int8=True)}
    heads = resolve_heads(args.heads, resolve_model_dir(args.model))
    questions = load_questions(args.questions, args.num_prompts)
    prompts = [encode(tok, q.text, chat=False) for q in questions]
    p = round_up(max(map(len, prompts)), 64)
    s = round_up(p + args.max_new_tokens + 64, 128)  # room for the largest tree's scratch slots
    results, outputs = {}, {}
    for name, (which, cfg) in mode_table(args, heads).items():
        graphdef, params = nnx.split(models[which])
        runs, compile_s = run_mode(graphdef, params, cfg, prompts, p, s, args.repeats)
        outputs[name] = [r[3] for r in runs]
        cats: dict[str, list] = {}
        for q, r in zip(questions, runs):
            cats.setdefault(q.category, []).append(r)
        drafter = cfg.make_drafter()
        results[name] = dict(model=which, verifier=str(cfg.verifier), drafter=str(cfg.drafter), num_draft=cfg.k,
                             num_candidates=cfg.num_candidates, tree_nodes=getattr(drafter, "num_nodes", None),
                             compile_s=compile_s, all=summary(runs), categories={c: summary(rs) for c, rs in cats.items()},
                             per_prompt_exact=None)
        print(f"{name}: tau {results[name]['all']['tau']:.2f}, {results[name]['all']['tokens_per_s']:.1f} tok/s, "
              f"compile {compile_s:.1f} s", flush=True)
    for name, r in results.items():
        ref = outputs[REFERENCE[r["model"]]]
        same = [o == e for o, e in zip(outputs[name], ref)]
        r["per_prompt_exact"] = same
        r["exact_match"] = sum(same) / len(same)
        for c in r["categories"]:
            idx = [i for i, q in enumerate(questions) if q.category == c]
            r["categories"][c]["exact_match"] = sum(same[i] for i in idx) / len(idx)
    cost = {"verify_ms_by_tokens": verify_cost(model, s, p),
            "s4c_draft_ms_by_nodes": {n: draft_cost(model, heads, GenerationConfig(
                drafter="s4c", heads=heads, num_draft=args.num_draft, tree_nodes=n).make_drafter())
                for n in sorted({4, 8, 16, 32, *args.sweep})}}
    info = machine_info()
    info["name"] = args.machine or info.get("device")
    info.update(loadavg_1m_before=load_before, loadavg_1m_after=os.getloadavg()[0])
    report = dict(machine=info, model=args.model, heads=str(heads.path), heads_training=heads.meta.get("training"),
                  prompts=len(prompts), num_prompts_per_category=args.num_prompts, max_new_tokens=args.max_new_tokens,
                  category_prompts={c: sum(q.category == c for q in questions) for c in dict.fromkeys(
                      q.category for q in questions)},
                  num_draft=args.num_draft, cache_len=s, step_cost=cost, modes=results)
    print(markdown(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def markdown(report: dict) -> str:
    """Per category (and all): "tau / tokens/s / exact match" of every mode."""
    modes = list(report["modes"])
    cats = list(report["modes"]["chain"]["categories"]) if "chain" in modes else []
    lines = ["| category | n | " + " | ".join(modes) + " |", "| --- | --- |" + " --- |" * len(modes)]
    for c in cats + ["all"]:
        def cell(m):
            r = report["modes"][m]["all"] if c == "all" else report["modes"][m]["categories"][c]
            em = report["modes"][m]["exact_match"] if c == "all" else r["exact_match"]
            return f"{r['tau']:.2f} / {r['tokens_per_s']:.0f} / {em:.2f}"
        n = report["prompts"] if c == "all" else report["category_prompts"][c]
        lines.append(f"| {c} | {n} | " + " | ".join(cell(m) for m in modes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
