"""Float-vs-int8 fidelity: how closely the int8 verifier (Quasar / QSpec) tracks the float model.

``python -m quasar_jax.fidelity --model demo --questions ../shared/specbench/*.jsonl --num-prompts 5``

For each int8 mode (w8a16, w8a8), over a prompt set, against the float model:

* top-1 agreement and mean KL(p_fp || p_q) of next-token distributions, along the float model's
  greedy trajectories (one teacher-forced forward per prompt through both models);
* mean length of the common prefix of the int8 model's greedy output and the float one's;
* tau (tokens per verify step) of Quasar (n-gram + int8 verifier) next to tau of n-gram + float
  verifier on the same prompts.

Prints a table and writes JSON (``--json``). ``quasar_jax.bench`` reuses ``fidelity()`` and the
pure metric helpers (``common_prefix``, ``ratio``, ``pool_fidelity``); this module never imports
the benchmark.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax.cli import OneLineParser, fail, positive_int
from quasar_jax.engine import Engine, GenerationConfig, round_up
from quasar_jax.loading import load_model, load_tokenizer, resolve_model_dir
from quasar_jax.modes import QuantMode
from quasar_jax.prompts import encode, load_questions, stop_ids_of


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ratio(a, b):
    """``a / b``, or None when either is missing or ``b`` is 0."""
    return None if a is None or b in (None, 0) else a / b


def fidelity(model_fp, model_q, mode: QuantMode | str, prompts_ids: Sequence[Sequence[int]],
             ar_fp_outputs: Sequence[Sequence[int]], *,
             ar_q_outputs: Sequence[Sequence[int]] | None = None, bucket: int = 32) -> dict:
    """Float-vs-int8 fidelity along the float model's greedy trajectories.

    For each prompt, ONE teacher-forced forward of ``prompt + ar_fp_output[:-1]`` through both
    models (``model_q`` called in int8 ``mode``, w8a16 or w8a8) gives the next-token distributions at
    every generated position (n positions for n generated tokens). Returns::

        top1_agreement        fraction of positions where argmax p_q == argmax p_fp (pooled)
        mean_kl               mean over positions of KL(p_fp || p_q) in nats
        mean_common_prefix    mean over prompts of the common prefix (tokens) of the int8 AR
                              output ``ar_q_outputs[i]`` and ``ar_fp_outputs[i]`` (None if not given)
        mean_ar_fp_tokens     mean length of the ar-fp outputs (scale for the prefix)
        positions, prompts    counts
        per_prompt            [{positions, agree, kl_sum, common_prefix}] for per-group pooling

    Sequences are right-padded to a multiple of ``bucket`` (fewer compiles; the padding sits after
    every scored position, so causal attention makes it irrelevant).
    """
    if len(prompts_ids) != len(ar_fp_outputs):
        raise ValueError(f"fidelity: {len(prompts_ids)} prompts but {len(ar_fp_outputs)} outputs")
    g_fp, p_fp = nnx.split(model_fp)
    g_q, p_q = nnx.split(model_q)
    quant_kw = {"mode": QuantMode.parse(mode)}

    @jax.jit
    def score(p_fp, p_q, tokens):  # tokens [1, L]
        m_fp, m_q = nnx.merge(g_fp, p_fp), nnx.merge(g_q, p_q)
        n = tokens.shape[1]
        pos = jnp.arange(n, dtype=jnp.int32)[None]
        logits_fp, _ = m_fp(tokens, pos, m_fp.init_cache(1, n))
        logits_q, _ = m_q(tokens, pos, m_q.init_cache(1, n), **quant_kw)
        lp_fp = jax.nn.log_softmax(logits_fp[0], axis=-1)  # [L, V] float32
        lp_q = jax.nn.log_softmax(logits_q[0], axis=-1)
        kl = jnp.sum(jnp.exp(lp_fp) * (lp_fp - lp_q), axis=-1)  # [L]
        agree = jnp.argmax(logits_fp[0], axis=-1) == jnp.argmax(logits_q[0], axis=-1)
        return agree, kl

    per_prompt = []
    for i, (prompt, out) in enumerate(zip(prompts_ids, ar_fp_outputs)):
        prompt, out = list(prompt), list(out)
        if not out:
            per_prompt.append({"positions": 0, "agree": 0, "kl_sum": 0.0, "common_prefix": 0})
            continue
        seq = prompt + out[:-1]
        length = round_up(len(seq), bucket)
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :len(seq)] = seq
        agree, kl = score(p_fp, p_q, jnp.asarray(tokens))
        lo, hi = len(prompt) - 1, len(prompt) - 1 + len(out)  # positions predicting out[0..n-1]
        agree, kl = np.asarray(agree)[lo:hi], np.asarray(kl, np.float64)[lo:hi]
        cp = common_prefix(ar_q_outputs[i], out) if ar_q_outputs is not None else None
        per_prompt.append({"positions": len(out), "agree": int(agree.sum()),
                           "kl_sum": float(kl.sum()), "common_prefix": cp})
    result = pool_fidelity(per_prompt)
    result["mean_ar_fp_tokens"] = (sum(len(o) for o in ar_fp_outputs) / len(ar_fp_outputs)
                                   if ar_fp_outputs else None)
    result["per_prompt"] = per_prompt
    return result


def pool_fidelity(per_prompt: Sequence[dict]) -> dict:
    positions = sum(p["positions"] for p in per_prompt)
    prefixes = [p["common_prefix"] for p in per_prompt]
    return {"top1_agreement": ratio(sum(p["agree"] for p in per_prompt), positions),
            "mean_kl": ratio(sum(p["kl_sum"] for p in per_prompt), positions),
            "mean_common_prefix": (None if not prefixes or any(p is None for p in prefixes)
                                   else sum(prefixes) / len(prefixes)),
            "positions": positions, "prompts": len(per_prompt)}


def build_parser():
    p = OneLineParser(prog="python -m quasar_jax.fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="'demo', a local HF directory, or a hub id")
    p.add_argument("--questions", nargs="+", required=True, help="Spec-Bench style .jsonl files")
    p.add_argument("--num-prompts", type=positive_int, default=None, help="first N per category")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--modes", default="w8a16,w8a8", help="int8 modes to compare with the float model")
    p.add_argument("--num-draft", type=positive_int, default=5)
    p.add_argument("--ngram-min", type=positive_int, default=1)
    p.add_argument("--ngram-max", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--json", help="write the results here")
    return p


def run(args) -> dict:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("w8a16", "w8a8")]
    if bad or not modes:
        raise ValueError(f"--modes: unknown mode {bad[0] if bad else '(none)'!r}; choose from w8a16, w8a8")
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    questions = load_questions(args.questions, args.num_prompts)
    prompts = [encode(tokenizer, q.text, args.chat) for q in questions]
    stop = stop_ids_of(tokenizer, model_dir)
    model_fp = load_model(model_dir, dtype=args.dtype)
    model_q = load_model(model_dir, dtype=args.dtype, int8=True)
    engines = {"fp": Engine(model_fp), "q": Engine(model_q)}

    def generate(engine, **kw):
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, num_draft=args.num_draft,
                               ngram_min=args.ngram_min, ngram_max=args.ngram_max, stop_ids=stop, **kw)
        tokens, new, steps = [], 0, 0
        for i in range(0, len(prompts), args.batch_size):
            res = engine.generate(prompts[i:i + args.batch_size], cfg)
            tokens += res.tokens
            n, k = res.batch_stats.new_tokens, res.batch_stats.verify_steps
            new, steps = new + n, steps + k
        return tokens, ratio(new, steps)

    ar_fp, _ = generate(engines["fp"], drafter="none")
    _, tau_fp = generate(engines["fp"], drafter="ngram")
    results = {"model": str(model_dir), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
               "num_draft": args.num_draft, "tau_sd_fp": tau_fp, "modes": {}}
    for mode in modes:
        ar_q, _ = generate(engines["q"], drafter="none", verifier=mode)
        _, tau_q = generate(engines["q"], drafter="ngram", verifier=mode)
        f = fidelity(model_fp, model_q, mode, prompts, ar_fp, ar_q_outputs=ar_q)
        f.pop("per_prompt")
        results["modes"][mode] = {**f, "tau_quasar": tau_q, "tau_sd_fp": tau_fp}
    return results


def format_table(results: dict) -> str:
    lines = ["| mode | top-1 agreement | mean KL(p_fp||p_q) | common greedy prefix | tau Quasar | tau n-gram+fp |",
             "| --- | --- | --- | --- | --- | --- |"]
    for mode, r in results["modes"].items():
        lines.append(f"| {mode} | {r['top1_agreement']:.4f} | {r['mean_kl']:.2e} | "
                     f"{r['mean_common_prefix']:.1f} / {r['mean_ar_fp_tokens']:.1f} | "
                     f"{r['tau_quasar']:.3f} | {r['tau_sd_fp']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
    except (ValueError, FileNotFoundError) as err:
        return fail("python -m quasar_jax.fidelity", err)
    print(f"{results['prompts']} prompts, {results['max_new_tokens']} new tokens, model {results['model']}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
