"""Tree verification vs the chain: tau per Spec-Bench category and tokens/s, side by side.

Every mode decodes the same prompts (batch 1, greedy, float32 unless --dtype) with the same
cache length; only the on-device ``while_loop`` is timed (prefill and compile excluded), each
prompt the faster of ``--repeats`` runs. Modes: autoregressive, the chain (K = --num-draft) and
trees of C candidates / N nodes (``--trees C:N ...``). Writes JSON (``--out``) and prints a
markdown table.

    python scripts/bench_tree.py --questions ../shared/specbench/*.jsonl --num-prompts 2 \\
        --max-new-tokens 64 --machine "CPU 2 cores, shared" --out docs/results/tree_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax.bench.report import machine_info
from quasar_jax.cli.prompts import encode, load_questions
from quasar_jax.speculative.buckets import round_up
from quasar_jax.speculative.engine import GenerationConfig, make_program
from quasar_jax.speculative.features import program_params
from quasar_jax.speculative.sampling import RowSampling, row_keys, sampler_for
from quasar_jax.weights.loading import load


def mode_configs(k: int, trees: list[str], max_new: int) -> dict[str, GenerationConfig]:
    modes = {"ar": GenerationConfig(max_new_tokens=max_new, drafter="none"),
             "chain": GenerationConfig(max_new_tokens=max_new, num_draft=k)}
    for spec in trees:
        c, n = (int(x) for x in spec.split(":"))
        modes[f"tree-c{c}-n{n}"] = GenerationConfig(max_new_tokens=max_new, num_draft=k, num_candidates=c,
                                                    tree_nodes=n)
    return modes


def run_mode(graphdef, params, cfg: GenerationConfig, prompts: list[list[int]], p: int, s: int, repeats: int):
    """Per prompt: (new_tokens, verify_steps, loop seconds, output ids, emitted_hist) of one batch-1
    generation (the drafter's own params, e.g. S4C heads, travel with the model's)."""
    rows = [cfg.sampling]
    drafter = cfg.make_drafter()
    params = program_params(params, drafter)
    init, step, _ = make_program(graphdef, drafter, sampler_for(rows), cfg.verifier)
    init = jax.jit(init, static_argnums=(3,))
    max_new, stop, sampling = jnp.asarray([cfg.max_new_tokens], jnp.int32), jnp.full((1, 1), -1), RowSampling.of(rows)
    loop = jax.jit(lambda params, state: jax.lax.while_loop(
        lambda st: jnp.any(~st.done), lambda st: step(params, st, max_new, stop, sampling), state))
    out, compile_s = [], 0.0
    for ids in prompts:
        prompt = jnp.asarray([ids + [0] * (p - len(ids))], jnp.int32)
        state = jax.block_until_ready(init(params, prompt, jnp.asarray([len(ids)], jnp.int32), s,
                                           row_keys(rows, cfg.seed)))
        if not compile_s:
            t0 = time.perf_counter()
            loop = loop.lower(params, state).compile()
            compile_s = time.perf_counter() - t0
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            final = jax.block_until_ready(loop(params, state))
            best = min(best, time.perf_counter() - t0)
        out.append((int(final.new_tokens[0]), int(final.steps[0]), best,
                    np.asarray(final.history[0, len(ids):int(final.lengths[0])]).tolist(),
                    np.asarray(final.emitted_hist[0]).tolist()))
    return out, compile_s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--questions", nargs="+", required=True)
    ap.add_argument("--num-prompts", type=int, default=2, help="questions per category")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--num-draft", type=int, default=5)
    ap.add_argument("--trees", nargs="*", default=["2:10", "4:16", "8:32"], help="C:N per tree mode")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--machine", default=None, help="a name for this machine in the results")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    model, tok = load(args.model, dtype=args.dtype)
    graphdef, params = nnx.split(model)
    questions = load_questions(args.questions, args.num_prompts)
    prompts = [encode(tok, q.text, chat=False) for q in questions]
    p = round_up(max(map(len, prompts)), 64)
    s = round_up(p + args.max_new_tokens + args.num_draft + 1, 128)
    modes = mode_configs(args.num_draft, args.trees, args.max_new_tokens)
    results, reference = {}, None
    for name, cfg in modes.items():
        runs, compile_s = run_mode(graphdef, params, cfg, prompts, p, s, args.repeats)
        outputs = [r[3] for r in runs]
        reference = reference or outputs
        cats: dict[str, list] = {}
        for q, r in zip(questions, runs):
            cats.setdefault(q.category, []).append(r)
        summary = lambda rs: dict(new_tokens=sum(r[0] for r in rs), verify_steps=sum(r[1] for r in rs),  # noqa: E731
                                  tau=sum(r[0] for r in rs) / max(sum(r[1] for r in rs), 1),
                                  tokens_per_s=sum(r[0] for r in rs) / sum(r[2] for r in rs))
        results[name] = dict(config=dict(num_draft=cfg.k, num_candidates=cfg.num_candidates,
                                         tree_nodes=getattr(cfg.make_drafter(), "num_nodes", None)),
                             compile_s=compile_s, all=summary(runs),
                             same_output_as_ar=sum(o == ref for o, ref in zip(outputs, reference)) / len(outputs),
                             categories={c: summary(rs) for c, rs in cats.items()})
        print(f"{name}: tau {results[name]['all']['tau']:.2f}, {results[name]['all']['tokens_per_s']:.1f} tok/s, "
              f"compile {compile_s:.1f} s", flush=True)
    info = machine_info()
    info["name"] = args.machine or info.get("device")
    report = dict(machine=info, model=args.model, dtype=args.dtype, prompts=len(prompts),
                  num_prompts_per_category=args.num_prompts, max_new_tokens=args.max_new_tokens,
                  cache_len=s, modes=results)
    print(markdown(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def markdown(report: dict) -> str:
    """tau per category (rows) for every drafting mode (columns), then tokens/s and ratios."""
    modes = [m for m in report["modes"] if m != "ar"]
    cats = list(report["modes"]["chain"]["categories"])
    lines = ["| category | " + " | ".join(f"tau {m}" for m in modes) + " |",
             "| --- |" + " --- |" * len(modes)]
    for c in cats + ["all"]:
        cell = (lambda m: report["modes"][m]["categories"][c]) if c != "all" else (lambda m: report["modes"][m]["all"])
        lines.append(f"| {c} | " + " | ".join(f"{cell(m)['tau']:.2f}" for m in modes) + " |")
    chain = report["modes"]["chain"]["all"]
    lines += ["", "| mode | tau | tau / chain | tokens/s | tokens/s / chain | same output as AR |",
              "| --- | --- | --- | --- | --- | --- |"]
    for m, r in report["modes"].items():
        a = r["all"]
        lines.append(f"| {m} | {a['tau']:.2f} | {a['tau'] / chain['tau']:.2f} | {a['tokens_per_s']:.1f} | "
                     f"{a['tokens_per_s'] / chain['tokens_per_s']:.2f} | {r['same_output_as_ar']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
