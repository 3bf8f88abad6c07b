"""Command line decoding: ``python -m quasar_jax.decode --prompt "def fibonacci(n):"``.

Loads a model (``demo`` = the small model shipped with the package, a local Hugging Face
directory, a converted quasar_jax checkpoint, or a hub id), optionally quantises the verifier to
int8, and generates with n-gram speculative decoding (Quasar when the verifier is int8), QSpec, or
plain autoregressive decoding. Invalid input gets a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from quasar_jax.cli import (DRAFTERS, VERIFIERS, OneLineParser, add_drafting_flags, add_model_flags, add_prompt_flags,
                            add_sampling_flags, fail, generation_kwargs, positive_int)
from quasar_jax.prompts import encode, read_jsonl_turns, stop_ids_of


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m quasar_jax.decode", description=__doc__.splitlines()[0])
    add_model_flags(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompt-file", help="one prompt per line, or .jsonl with 'turns' (first turn used)")
    add_prompt_flags(p, max_new_tokens=128)
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="KV cache slots (default: longest prompt + max new tokens, rounded up)")
    p.add_argument("--drafter", choices=DRAFTERS, default="ngram",
                   help="none (autoregressive), ngram (prompt lookup), qspec (W8A8 self-draft) "
                        "(default: ngram)")
    add_drafting_flags(p)
    p.add_argument("--verifier", choices=VERIFIERS, default=None,
                   help="verifier weights/matmul: float, int8 weight-only, int8 W8A8 "
                        "(default: float; w8a16 for --drafter qspec)")
    add_sampling_flags(p)
    p.add_argument("--batch-size", type=positive_int, default=1, help="prompts per batch (default: 1)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are accepted (batch size 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def read_prompts(args) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read prompt file {path}: {err}") from None
        if path.suffix == ".jsonl":
            prompts = [turn for _, _, turn in read_jsonl_turns(path, text)]
        else:
            prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {path} holds no prompt")
        return prompts
    if not sys.stdin.isatty():
        text = sys.stdin.read()
        if text.strip():
            return [text]
    raise ValueError("no prompt: give --prompt, --prompt-file, or text on stdin")


def run(args) -> int:
    import jax.numpy as jnp

    from quasar_jax.engine import Engine, GenerationConfig
    from quasar_jax.loading import load_model, load_tokenizer, resolve_model_dir

    verifier = args.verifier or ("w8a16" if args.drafter == "qspec" else "float")
    config = GenerationConfig(**generation_kwargs(args, drafter=args.drafter, verifier=verifier))
    if args.stream and args.batch_size != 1:
        raise ValueError("--stream needs --batch-size 1")
    prompts = read_prompts(args)

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    model = load_model(model_dir, dtype=dtype, int8=config.verifier.is_int8,
                       quantize_lm_head=args.quantize_lm_head, backend=args.backend)
    stop = () if args.ignore_eos else stop_ids_of(tokenizer, model_dir)
    config = dataclasses.replace(config, stop_ids=stop)
    engine = Engine(model)

    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        ids = [encode(tokenizer, text, args.chat) for text in batch]
        stream = None
        if args.stream:
            shown: list[int] = []
            sink = sys.stderr if args.json else sys.stdout  # keep --json output valid JSONL

            printed = 0

            def stream_text(tokens, n_emit):
                nonlocal printed
                shown.extend(tokens[0, :int(n_emit[0])].tolist())
                text = tokenizer.decode(shown, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
                    return
                sink.write(text[printed:])
                sink.flush()
                printed = len(text)

            stream = stream_text
            if not args.json:
                sys.stdout.write(batch[0])
        result = engine.generate(ids, config, stream=stream)
        for i, text in enumerate(batch):
            out_ids = result.tokens[i]
            completion = tokenizer.decode(out_ids, skip_special_tokens=True)
            row, batch_stats = result.stats[i], result.batch_stats
            stats = {**row.to_dict(), "mean_accepted": round(row.mean_accepted, 4),
                     "tokens_per_s": round(batch_stats.tokens_per_s, 2),
                     "wall_s": round(batch_stats.wall_s, 4), "compile_s": round(batch_stats.compile_s, 3),
                     "batch_size": len(batch), "drafter": str(config.drafter),
                     "verifier": str(config.verifier), "num_draft": config.k}
            if args.json:
                print(json.dumps({"prompt": text, "prompt_ids": ids[i], "output_ids": out_ids,
                                  "text": completion, "stats": stats}), flush=True)
            else:
                if args.stream:
                    print()
                else:
                    print(text + completion)
                print(f"[{config.drafter}/{config.verifier}] new_tokens={stats['new_tokens']} "
                      f"verify_steps={stats['verify_steps']} tau={stats['mean_accepted']:.2f} "
                      f"tokens/s={stats['tokens_per_s']:.1f} (batch) compile={stats['compile_s']:.2f}s",
                      flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        return fail("python -m quasar_jax.decode", err)


if __name__ == "__main__":
    raise SystemExit(main())
