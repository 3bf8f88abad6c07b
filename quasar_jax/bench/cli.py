"""``python -m quasar_jax.bench``: flags, then :func:`~quasar_jax.bench.run.run_benchmark` and the
output files (see the package docstring for the modes and metrics)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import quasar_jax.bench
from quasar_jax.bench.modes import DEFAULT_MODES, MODES
from quasar_jax.bench.report import results_markdown, write_outputs
from quasar_jax.bench.run import run_benchmark
from quasar_jax.cli import OneLineParser, fail, float_in, positive_int

PROG = "python -m quasar_jax.bench"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=quasar_jax.bench.__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="'demo', a local HF directory, or a hub id")
    p.add_argument("--questions", nargs="+", required=True, metavar="FILE.jsonl",
                   help="Spec-Bench jsonl files (question_id, category, turns)")
    p.add_argument("--num-prompts", type=positive_int, default=None,
                   help="first N prompts of each category (default: all)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default: all but ar-w8a8, "
                        "which is added as the reference of quasar-w8a8)")
    p.add_argument("--num-draft", type=positive_int, default=5, help="K, draft tokens per step")
    p.add_argument("--ngram-min", type=positive_int, default=1)
    p.add_argument("--ngram-max", type=positive_int, default=3)
    p.add_argument("--batch-size", type=positive_int, default=1, help="JAX modes (HF: always 1)")
    p.add_argument("--temperature", type=float_in(0.0, 100.0, False), default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (median)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="JAX model dtype (HF modes always run torch float32)")
    p.add_argument("--backend", choices=["xla", "pallas"], default="xla", help="int8 matmul backend")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (all modes)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="keep only the last N prompt tokens (default: no limit)")
    p.add_argument("--prompt-bucket", type=positive_int, default=None,
                   help="pad prompts to a multiple of N tokens (default: the engine's 32); a "
                        "coarser bucket compiles fewer programs")
    p.add_argument("--no-fidelity", action="store_true", help="skip the float-vs-int8 fidelity pass")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--out", required=True, help="output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.ngram_min > args.ngram_max:
            raise ValueError(f"--ngram-min {args.ngram_min} > --ngram-max {args.ngram_max}")
        results = write_outputs(run_benchmark(args, progress=not args.no_progress), out)
    except (ValueError, FileNotFoundError) as err:
        return fail(PROG, err)
    print(results_markdown(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'plot.png'}, "
          f"{out / 'outputs.jsonl'}", file=sys.stderr)
    return 0
