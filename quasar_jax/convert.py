"""``python -m quasar_jax.convert --model SRC --quantize {none,int8} --out DIR``.

Converts a Hugging Face checkpoint (or ``demo`` / a hub id) once, optionally quantising the
projections to int8, and saves the params with orbax-checkpoint plus config and tokenizer files.
``--model DIR`` then loads the result everywhere (decode, bench, API) without converting again.
"""

from __future__ import annotations

import argparse
import time
import warnings

from quasar_jax.checkpoint import save_converted
from quasar_jax.cli import OneLineParser, fail
from quasar_jax.loading import load_model, resolve_model_dir


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m quasar_jax.convert", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="'demo', a local HF directory, or a hub id")
    p.add_argument("--quantize", choices=["none", "int8"], default="none")
    p.add_argument("--quantize-lm-head", action="store_true", help="int8 LM head too (untied models)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="dtype of the float params (default bfloat16)")
    p.add_argument("--out", required=True, help="output directory (must not hold a checkpoint)")
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    try:
        src = resolve_model_dir(args.model)
        t0 = time.perf_counter()
        model = load_model(src, dtype=args.dtype, int8=args.quantize == "int8",
                           quantize_lm_head=args.quantize_lm_head)
        t_load = time.perf_counter() - t0
        out = save_converted(model, args.out, source_dir=src)
        print(f"converted {src} -> {out} (quantize={args.quantize}, dtype={args.dtype}); "
              f"load+convert {t_load:.2f}s, save {time.perf_counter() - t0 - t_load:.2f}s")
        return 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        return fail("python -m quasar_jax.convert", err)


if __name__ == "__main__":
    raise SystemExit(main())
