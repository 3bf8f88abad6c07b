"""Command line decoding: ``python -m quasar_jax.decode --prompt "def fibonacci(n):"``.

Loads a model (``demo`` = the small model shipped with the package, a local Hugging Face
directory, a converted quasar_jax checkpoint, or a hub id), optionally quantises the verifier to
int8, and generates with n-gram speculative decoding (Quasar when the verifier is int8), QSpec, or
plain autoregressive decoding. Invalid input gets a one-line error and exit status 2; Ctrl-C one
line and exit status 130. Parsing (and ``--help``) does not import JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from quasar_jax.cli.errors import InputError
from quasar_jax.cli.flags import (add_compile_cache_flag, add_drafter_flag, add_drafting_flags,
                                  add_kv_flags, add_model_flags, add_prompt_flags, add_sampling_flags, add_verifier_flag,
                                  check_drafter_flags, generation_kwargs, positive_int)
from quasar_jax.cli.mesh_flags import add_mesh_flags
from quasar_jax.cli.prompts import Prompt, check_prompt, decode_text, read_prompt_file
from quasar_jax.cli.runner import OneLineParser, run_command, StatusLine
from quasar_jax.cli.text_stream import TextStream

PROG = "python -m quasar_jax.decode"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    add_model_flags(p)
    add_kv_flags(p)
    add_mesh_flags(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeatable; default: read stdin)")
    src.add_argument("--prompt-file", help="one prompt per line, or Spec-Bench .jsonl (first turn; "
                                           "question_id and category are kept in --json output)")
    add_prompt_flags(p, max_new_tokens=128)
    p.add_argument("--stop", action="append", default=[],
                   help="a stop string (repeatable): the text ends before it (default: none)")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="KV cache slots (default: longest prompt + max new tokens, rounded up)")
    add_drafter_flag(p)
    add_drafting_flags(p)
    add_verifier_flag(p)
    add_sampling_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=1, help="prompts per batch (default: 1)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are accepted (batch size 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    add_compile_cache_flag(p)
    return p


def read_prompts(args) -> list[Prompt]:
    if args.prompt:
        return [Prompt(check_prompt(text, f"--prompt {i + 1}")) for i, text in enumerate(args.prompt)]
    if args.prompt_file:
        return read_prompt_file(args.prompt_file)
    if sys.stdin is not None and not sys.stdin.isatty():
        text = decode_text(sys.stdin.buffer.read(), "stdin")
        if text.strip():
            return [Prompt(text)]
        raise InputError("stdin: the prompt is empty or only whitespace")
    raise InputError("no prompt: give --prompt, --prompt-file, or text on stdin")


def check_flags(args, given: set[str]) -> None:
    """Flags that do not apply to this run are errors (before anything loads)."""
    check_drafter_flags(args, given)
    if args.temperature == 0:
        for flag in ("--top-k", "--top-p", "--seed"):
            if flag in given:
                raise InputError(f"{flag} applies only to sampling (--temperature > 0)")
    if args.verifier == "float":
        for flag in ("--backend", "--quantize-lm-head"):
            if flag in given:
                raise InputError(f"{flag} applies only to an int8 verifier (--verifier w8a16 or w8a8)")
    if args.stream and args.batch_size != 1:
        raise InputError("--stream needs --batch-size 1")
    if any(not s for s in args.stop):
        raise InputError("--stop: a stop string must not be empty")


def resolve_verifier(args, given: set[str], auto: str, platform: str) -> str:
    """``--verifier auto`` resolved (``auto``: the choice for this model and machine); int8-only
    flags checked against the result."""
    verifier = args.verifier
    if verifier == "auto":
        verifier = auto
        if verifier == "float":
            for flag in ("--backend", "--quantize-lm-head"):
                if flag in given:
                    raise InputError(f"{flag} applies only to an int8 verifier, and --verifier auto "
                                     f"chose float on this {platform}: add --verifier w8a16 or w8a8")
    if args.backend == "pallas" and platform == "cpu" and verifier != "float":
        raise InputError("--backend pallas needs a GPU or TPU: on a CPU the Pallas kernels only run "
                         "in interpret mode (tests); use --backend xla")
    return verifier


def run(args, given: set[str]) -> int:
    # JAX and the model code load here, after the arguments are known to be valid.
    import jax
    import jax.numpy as jnp

    from quasar_jax.cli import compile_cache

    from quasar_jax import sharding
    from quasar_jax.cli.prompts import encode, stop_ids_of
    from quasar_jax.model.config import Qwen3Config
    from quasar_jax.speculative.engine import Engine, GenerationConfig
    from quasar_jax.speculative.heads import resolve_heads
    from quasar_jax.weights.checkpoint import default_verifier
    from quasar_jax.weights.loading import load_model, load_tokenizer, resolve_model_dir

    mesh = sharding.start(args, PROG)  # jax.distributed when asked for; stdout on process 0 only
    check_flags(args, given)
    if args.plan:
        model_dir = resolve_model_dir(args.model)
        plan = sharding.memory_plan(
            Qwen3Config.from_json(model_dir / "config.json"), args.mesh, dtype=args.dtype,
            int8=args.verifier in ("w8a16", "w8a8") or args.drafter == "qspec",
            quantize_lm_head=args.quantize_lm_head, batch=args.batch_size, cache_len=args.max_len or 4096,
            device_gb=sharding.device_memory_bytes() / sharding.GiB, name=args.model)
        print(plan.line())
        return 0
    prompts = read_prompts(args)
    compile_cache.enable(args.compile_cache)
    status = StatusLine(enabled=not (args.json or args.quiet))
    status.show(f"loading {args.model} ...")
    model_dir = resolve_model_dir(args.model)
    platform = jax.default_backend()
    verifier = resolve_verifier(args, given, default_verifier(model_dir, args.drafter, platform).value, platform)
    heads = (resolve_heads(args.heads, model_dir, num_draft=args.num_draft, tree_nodes=args.tree_nodes)
             if args.drafter == "s4c" else None)
    config = GenerationConfig(**generation_kwargs(args, drafter=args.drafter, verifier=verifier, heads=heads,
                                                  allow_long_context=args.allow_long_context))
    tokenizer = load_tokenizer(model_dir)
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    model = load_model(model_dir, dtype=dtype, int8=config.verifier.is_int8,
                       quantize_lm_head=args.quantize_lm_head, backend=args.backend, mesh=mesh)
    stop = () if args.ignore_eos else stop_ids_of(tokenizer, model_dir)
    config = dataclasses.replace(config, stop_ids=stop)
    engine = Engine(model, mesh=mesh, page_size=args.page_size)
    backend = args.backend if config.verifier.is_int8 else "none"  # what runs the int8 matmuls

    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        ids = [encode(tokenizer, p.text, args.chat) for p in batch]
        texts = [TextStream(tokenizer, args.stop) for _ in batch]  # incremental text, stop strings
        sink = sys.stderr if args.json else sys.stdout  # keep --json output valid JSONL

        def on_tokens(tokens, n_emit):
            for i, text in enumerate(texts):
                if n_emit[i]:
                    delta = text.feed(tokens[i, :int(n_emit[i])].tolist())
                    if args.stream and delta:
                        sink.write(delta)
                        sink.flush()
            return [text.stopped for text in texts]

        streaming = args.stream or bool(args.stop)
        if args.stream and not args.json:
            status.clear()
            sys.stdout.write(batch[0].text)
        status.show(f"generating (compiling on first use) {start + len(batch)}/{len(prompts)} ...")
        result = engine.generate(ids, config, stream=on_tokens if streaming else None)
        status.clear()
        for i, prompt in enumerate(batch):
            out_ids, text = result.tokens[i], texts[i]
            if not streaming:
                text.feed(out_ids)
            tail = text.flush()  # the held-back rest (an incomplete character, a stop-string prefix)
            if args.stream:
                sink.write(tail + ("" if args.json else "\n"))
            completion = text.text
            row, batch_stats = result.stats[i], result.batch_stats
            finish = "stop" if text.stopped else row.finish_reason
            stats = {**row.to_dict(), "mean_accepted": round(row.mean_accepted, 4), "finish_reason": finish,
                     "tokens_per_s": round(batch_stats.tokens_per_s, 2),
                     "wall_s": round(batch_stats.wall_s, 4), "compile_s": round(batch_stats.compile_s, 3),
                     "batch_size": len(batch), "drafter": str(config.drafter),
                     "verifier": str(config.verifier), "verifier_flag": args.verifier, "backend": backend,
                     "num_draft": config.k, "num_candidates": config.num_candidates,
                     "tree_nodes": getattr(config.make_drafter(), "num_nodes", None)}
            if args.json:
                record = {"prompt": prompt.text, "prompt_ids": ids[i], "output_ids": out_ids,
                          "text": completion, "stats": stats}
                if prompt.question_id is not None:
                    record["question_id"] = prompt.question_id
                if prompt.category is not None:
                    record["category"] = prompt.category
                print(json.dumps(record), flush=True)
            else:
                if not args.stream:
                    print(prompt.text + completion)
                print(f"[{config.drafter}/{config.verifier}/{backend}] new_tokens={stats['new_tokens']} "
                      f"verify_steps={stats['verify_steps']} tau={stats['mean_accepted']:.2f} "
                      f"finish={finish} tokens/s={stats['tokens_per_s']:.1f} (batch) "
                      f"compile={stats['compile_s']:.2f}s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
