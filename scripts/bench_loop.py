"""Cost of the on-device loop: one ``lax.while_loop`` vs a Python loop driving a jitted step.

Both run the same step function (``quasar_jax.speculative.engine.make_program``) on the same prompt; the
Python loop must read ``done`` back to the host after every step to know when to stop, which is
what the one-loop design avoids. Also reports tau and tokens/s of n-gram speculative decoding vs
autoregressive decoding on a repetitive prompt, measured side by side in this process.

    python scripts/bench_loop.py --model demo --max-new-tokens 256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from quasar_jax.bench.report import machine_info
from quasar_jax.speculative.engine import Engine, GenerationConfig, make_program
from quasar_jax.speculative.sampling import RowSampling, row_keys, sampler_for
from quasar_jax.weights.loading import load_model, load_tokenizer

REPETITIVE = '''def add(a, b):
    """Return a + b."""
    return a + b


def sub(a, b):
    """Return a - b."""
    return a - b


def mul(a, b):
'''


def python_loop(engine: Engine, cfg: GenerationConfig, prompt_ids: list[int], s: int):
    """Generate with a host-side loop around the jitted step; returns (tokens, steps, seconds)."""
    rows_sampling = [cfg.sampling]
    init, step, _ = make_program(engine.graphdef, cfg.make_drafter(), sampler_for(rows_sampling), cfg.verifier)
    init = jax.jit(init, static_argnums=(3,))
    step = jax.jit(step, donate_argnums=(1,))
    p = len(prompt_ids)
    prompt = jnp.asarray([prompt_ids], jnp.int32)
    lens = jnp.asarray([p], jnp.int32)
    max_new = jnp.asarray([cfg.max_new_tokens], jnp.int32)
    stop = jnp.asarray([[-1]], jnp.int32)
    rows = RowSampling.of(rows_sampling)

    def once():
        state = init(engine.params, prompt, lens, s, row_keys(rows_sampling, cfg.seed))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        iterations = 0
        while not bool(jnp.all(state.done)):  # the host round trip per step
            state = step(engine.params, state, max_new, stop, rows)
            iterations += 1
        jax.block_until_ready(state)
        return state, iterations, time.perf_counter() - t0

    once()  # compile + warm up
    return once()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--num-draft", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    tok = load_tokenizer(args.model)
    engine = Engine(load_model(args.model, dtype=jnp.float32))
    ids = tok(REPETITIVE)["input_ids"]
    s = 1024
    results = {"machine": machine_info(), "model": args.model, "prompt_tokens": len(ids),
               "max_new_tokens": args.max_new_tokens}
    rows = []
    for name, cfg in [("ar", GenerationConfig(max_new_tokens=args.max_new_tokens, drafter="none", max_len=s)),
                      ("ngram", GenerationConfig(max_new_tokens=args.max_new_tokens, drafter="ngram",
                                                 num_draft=args.num_draft, max_len=s))]:
        first = engine.generate([ids], cfg)
        walls = [engine.generate([ids], cfg).batch_stats.wall_s for _ in range(args.repeats)]
        wall = statistics.median(walls)
        st = first.stats[0]
        py_state, py_iters, py_wall = python_loop(engine, cfg, ids, s)
        py_tokens = np.asarray(py_state.history[0, len(ids):int(py_state.lengths[0])]).tolist()
        assert py_tokens == first.tokens[0], "python loop and while_loop disagree"
        row = {"mode": name, "tau": st.mean_accepted, "new_tokens": st.new_tokens,
               "verify_steps": st.verify_steps, "compile_s": first.batch_stats.compile_s,
               "while_loop_s": wall, "tokens_per_s": st.new_tokens / wall,
               "while_loop_ms_per_step": 1e3 * wall / st.verify_steps,
               "python_loop_s": py_wall, "python_loop_ms_per_step": 1e3 * py_wall / py_iters}
        rows.append(row)
    ar, sd = rows
    results["rows"] = rows
    results["speedup_ngram_vs_ar"] = sd["tokens_per_s"] / ar["tokens_per_s"]
    print(f"machine: {results['machine']}")
    print("| mode | tau | tokens/s | while_loop ms/step | python loop ms/step | compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['tau']:.2f} | {r['tokens_per_s']:.1f} | {r['while_loop_ms_per_step']:.3f} "
              f"| {r['python_loop_ms_per_step']:.3f} | {r['compile_s']:.2f} |")
    print(f"n-gram speculative vs autoregressive tokens/s: {results['speedup_ngram_vs_ar']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
