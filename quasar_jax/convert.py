"""``python -m quasar_jax.convert --model SRC --quantize {none,int8} --out DIR``.

Converts a Hugging Face checkpoint (or ``demo`` / a hub id) once, optionally quantising the
projections to int8, and saves the params with orbax-checkpoint plus config and tokenizer files.
``--model DIR`` then loads the result everywhere (decode, bench, API) without converting again.

``--out`` is checked before any work (writable, not the source, new or empty); the checkpoint is
written into a hidden sibling and renamed into place when complete, so a failed or interrupted
conversion (Ctrl-C: exit 130) leaves nothing behind and never touches the user's files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from quasar_jax.cli.errors import InputError
from quasar_jax.cli.flags import DTYPES
from quasar_jax.cli.runner import OneLineParser, run_command

PROG = "python -m quasar_jax.convert"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="'demo', a local HF or converted directory, or a hub id")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: quantise every projection to int8 (default: none)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="int8 LM head too (untied models, with --quantize int8; default: off)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of the float params (default: bfloat16)")
    p.add_argument("--out", required=True, help="output directory (new or empty; not the source)")
    return p


def run(args, given: set[str]) -> int:
    # The model code (and JAX) load here, after the arguments and paths are known to be valid.
    from quasar_jax.cli.outputs import check_output_dir
    from quasar_jax.model.config import Qwen3Config
    from quasar_jax.weights.checkpoint import converted_meta, is_converted_dir, save_converted
    from quasar_jax.weights.loading import load_model, resolve_model_dir

    if "--quantize-lm-head" in given and args.quantize != "int8":
        raise InputError("--quantize-lm-head applies only with --quantize int8")
    src = resolve_model_dir(args.model)
    if is_converted_dir(args.out) and not Path(args.out).resolve() == src.resolve():
        raise InputError(f"--out {args.out} already holds a checkpoint; choose a new or empty directory")
    check_output_dir(args.out, source=src)
    meta = converted_meta(src)
    if meta is not None and meta.get("quantize") == "int8" and args.quantize == "none":
        raise InputError(f"--model {args.model} is already an int8 checkpoint; converting it back to "
                         "float is not supported (use --quantize int8, or convert the float source)")
    if args.quantize_lm_head and Qwen3Config.from_json(src).tie_word_embeddings:
        raise InputError(f"--quantize-lm-head: {args.model} ties its LM head to the float embedding; "
                         "there is no separate lm_head to quantise")
    if meta is not None and args.quantize_lm_head and not meta.get("lm_head_int8"):
        raise InputError(f"--quantize-lm-head: {args.model} is a converted checkpoint whose LM head is "
                         "float; convert its Hugging Face source with --quantize-lm-head instead")
    t0 = time.perf_counter()
    model = load_model(src, dtype=args.dtype, int8=args.quantize == "int8",
                       quantize_lm_head=args.quantize_lm_head)
    t_load = time.perf_counter() - t0
    out = save_converted(model, args.out, source_dir=src)
    print(f"converted {src} -> {out} (quantize={args.quantize}, dtype={args.dtype}); "
          f"load+convert {t_load:.2f}s, save {time.perf_counter() - t0 - t_load:.2f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
