"""``python -m quasar_jax.fidelity``: flags, the run over a question set, the table and ``--json``.

Paths are checked before any work (``--json`` must be writable); the JSON is written atomically.
Parsing (and ``--help``) does not import JAX: the model code loads in :func:`run`.
"""

from __future__ import annotations

import argparse
import json

from quasar_jax.cli.errors import InputError
from quasar_jax.cli.flags import DTYPES, add_drafting_flags, add_kv_flags, generation_kwargs, positive_int
from quasar_jax.cli.outputs import check_output_file, write_text_atomic
from quasar_jax.cli.runner import OneLineParser, explicit_flags, run_cli
import quasar_jax.fidelity

PROG = "python -m quasar_jax.fidelity"
INT8_MODES = ("w8a16", "w8a8")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=quasar_jax.fidelity.__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="'demo', a local HF directory, or a hub id (default: demo)")
    p.add_argument("--questions", nargs="+", required=True, metavar="FILE.jsonl",
                   help="Spec-Bench style .jsonl files; 'mini' = the small set shipped with the package")
    p.add_argument("--num-prompts", type=positive_int, default=None,
                   help="first N prompts of each category (default: all)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="tokens to generate per prompt at most (default: 64)")
    p.add_argument("--modes", default="w8a16,w8a8",
                   help="int8 modes to compare with the float model (default: w8a16,w8a8)")
    add_drafting_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch (default: 8)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default: float32)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    add_kv_flags(p, page_size=False)
    p.add_argument("--json", help="also write the results to this file (default: none)")
    return p


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in INT8_MODES]
    if bad or not modes:
        raise InputError(f"--modes: unknown mode {bad[0] if bad else '(none)'!r}; choose from "
                         f"{', '.join(INT8_MODES)}")
    return modes


def run(args) -> dict:
    # The model code (and JAX) load here, after the arguments and paths are known to be valid.
    from quasar_jax.cli.prompts import encode, load_questions, stop_ids_of
    from quasar_jax.fidelity.metrics import fidelity, ratio
    from quasar_jax.speculative.engine import Engine, GenerationConfig
    from quasar_jax.weights.loading import load_model, load_tokenizer, resolve_model_dir

    modes = parse_modes(args.modes)
    kv = args.kv_dtype
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    questions = load_questions(args.questions, args.num_prompts)
    prompts = [encode(tokenizer, q.text, args.chat) for q in questions]
    stop = stop_ids_of(tokenizer, model_dir)
    model_fp = load_model(model_dir, dtype=args.dtype)
    model_q = load_model(model_dir, dtype=args.dtype, int8=True)
    engines = {"float": Engine(model_fp), "int8": Engine(model_q)}

    def generate(engine, **kw):
        kw.setdefault("kv_dtype", "auto" if kv == "int8" else kv)  # the mode rows: the model's KV
        cfg = GenerationConfig(**generation_kwargs(args, stop_ids=stop, **kw))
        tokens, new, steps = [], 0, 0
        for i in range(0, len(prompts), args.batch_size):
            res = engine.generate(prompts[i:i + args.batch_size], cfg)
            tokens += res.tokens
            new, steps = new + res.batch_stats.new_tokens, steps + res.batch_stats.verify_steps
        return tokens, ratio(new, steps)

    ar_fp, _ = generate(engines["float"], drafter="none")
    _, tau_fp = generate(engines["float"], drafter="ngram")
    results = {"model": str(model_dir), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
               "num_draft": args.num_draft, "tau_sd_fp": tau_fp, "modes": {}}
    for mode in modes:
        ar_q, _ = generate(engines["int8"], drafter="none", verifier=mode)
        _, tau_q = generate(engines["int8"], drafter="ngram", verifier=mode)
        mode_kv = "auto" if kv == "int8" else kv
        f = fidelity(model_fp, model_q, mode, prompts, ar_fp, ar_q_outputs=ar_q, kv_fp=mode_kv, kv_q=mode_kv)
        f.pop("per_prompt")
        results["modes"][mode] = {**f, "tau_quasar": tau_q, "tau_sd_fp": tau_fp}
    if kv == "int8":  # int8 KV against bfloat16 KV: alone (float weights) and with the w8a16 verifier
        results["kv_int8"] = {}
        ar_bf, _ = generate(engines["float"], drafter="none", kv_dtype="bfloat16")
        _, tau_bf = generate(engines["float"], drafter="ngram", kv_dtype="bfloat16")
        for name, model, engine, mode in (("float", model_fp, engines["float"], "float"),
                                          ("w8a16", model_q, engines["int8"], "w8a16")):
            ar_kv, _ = generate(engine, drafter="none", verifier=mode, kv_dtype="int8")
            _, tau_kv = generate(engine, drafter="ngram", verifier=mode, kv_dtype="int8")
            f = fidelity(model_fp, model, mode, prompts, ar_bf, ar_q_outputs=ar_kv, kv_fp="bfloat16", kv_q="int8")
            f.pop("per_prompt")
            results["kv_int8"][name] = {**f, "tau_int8_kv": tau_kv, "tau_bf16_kv": tau_bf,
                                        "tau_ratio": ratio(tau_kv, tau_bf)}
    return results


def format_table(results: dict) -> str:
    lines = ["| mode | top-1 agreement | mean KL(p_fp||p_q) | common greedy prefix | tau Quasar | tau n-gram+fp |",
             "| --- | --- | --- | --- | --- | --- |"]
    for mode, r in results["modes"].items():
        lines.append(f"| {mode} | {r['top1_agreement']:.4f} | {r['mean_kl']:.2e} | "
                     f"{r['mean_common_prefix']:.1f} / {r['mean_ar_fp_tokens']:.1f} | "
                     f"{r['tau_quasar']:.3f} | {r['tau_sd_fp']:.3f} |")
    if results.get("kv_int8"):
        lines += ["", "| int8 KV vs bfloat16 KV | top-1 agreement | mean KL | common greedy prefix | "
                  "tau int8 KV | tau bf16 KV | tau ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in results["kv_int8"].items():
            lines.append(f"| {name} weights | {r['top1_agreement']:.4f} | {r['mean_kl']:.2e} | "
                         f"{r['mean_common_prefix']:.1f} / {r['mean_ar_fp_tokens']:.1f} | "
                         f"{r['tau_int8_kv']:.3f} | {r['tau_bf16_kv']:.3f} | {r['tau_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int:
        given = explicit_flags(parser, argv)
        if "--ngram-prefer" in given:
            raise InputError("--ngram-prefer: fidelity's n-gram runs use the default (recent)")
        parse_modes(args.modes)
        json_path = check_output_file(args.json, flag="--json") if args.json else None
        results = run(args)
        print(f"{results['prompts']} prompts, {results['max_new_tokens']} new tokens, model {results['model']}")
        print(format_table(results))
        if json_path is not None:
            write_text_atomic(json_path, json.dumps(results, indent=2) + "\n")
        return 0

    return run_cli(PROG, work)
