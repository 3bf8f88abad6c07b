"""``python -m quasar_jax.bench``: flags, then :func:`~quasar_jax.bench.run.run_benchmark` and the
output files (see the package docstring for the modes and metrics).

``--out`` and ``--questions`` are checked before any model loads; the outputs are written all or
nothing. Without torch (the plain install) the HF peer modes are skipped with one line when they
came from the default mode list, and are an error when asked for by name. Parsing (and ``--help``)
does not import JAX: the benchmark loads in :func:`run`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import quasar_jax.bench
from quasar_jax.bench.modes import DEFAULT_MODES, MODES, SPECS
from quasar_jax.cli.errors import InputError
from quasar_jax.cli.flags import (DTYPES, add_drafting_flags, add_heads_flag, add_kv_flags, check_ngram_range, float_in,
                                  non_negative_int, positive_int)
from quasar_jax.cli.mesh_flags import add_mesh_flags
from quasar_jax.cli.outputs import check_output_dir
from quasar_jax.cli.runner import OneLineParser, explicit_flags, run_cli

PROG = "python -m quasar_jax.bench"
OUTPUT_FILES = ("results.json", "results.md", "plot.png", "outputs.jsonl")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=quasar_jax.bench.__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="'demo', a local HF directory, or a hub id (default: demo)")
    add_mesh_flags(p)
    p.add_argument("--questions", nargs="+", required=True, metavar="FILE.jsonl",
                   help="Spec-Bench jsonl files (question_id, category, turns); 'mini' = the small "
                        "set shipped with the package")
    p.add_argument("--num-prompts", type=positive_int, default=None,
                   help="first N prompts of each category (default: all)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="tokens to generate per prompt at most (default: 128)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default: all but ar-w8a8, "
                        "which is added as the reference of quasar-w8a8)")
    add_drafting_flags(p, num_candidates=4)  # C applies to the tree modes only
    add_heads_flag(p)  # the s4c modes
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="rows per batch of the JAX modes; HF modes run one at a time (default: 1)")
    p.add_argument("--temperature", type=float_in(0.0, 100.0, False), default=0.0,
                   help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats, median (default: 3)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="JAX model dtype; HF modes always run torch float32 (default: float32)")
    p.add_argument("--backend", choices=["xla", "pallas"], default="xla",
                   help="int8 matmul backend (default: xla)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (all modes)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="keep only the last N prompt tokens (default: no limit)")
    p.add_argument("--prompt-bucket", type=positive_int, default=None,
                   help="pad prompts to a multiple of N tokens (default: the engine's 32); a "
                        "coarser bucket compiles fewer programs")
    p.add_argument("--no-step-cost", action="store_true",
                   help="skip timing each drafting mode's draft against its verify (r per mode)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the float-vs-int8 fidelity pass")
    add_kv_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier bench output)")
    return p


def check_modes(args, given: set[str]) -> None:
    """Unknown modes are errors; HF peers without torch are skipped (default list) or refused."""
    requested = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in requested if m not in SPECS]
    if unknown or not requested:
        raise InputError(f"--modes: unknown mode {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {', '.join(MODES)}")
    hf = [m for m in requested if SPECS[m].kind == "hf"]
    if hf and importlib.util.find_spec("torch") is None:
        if "--modes" in given:
            raise InputError(f"--modes {hf[0]} needs torch, which is not installed "
                             "(pip install torch==2.13.0, or leave the HF modes out)")
        print(f"{PROG}: torch is not installed: skipping the HF peer modes {', '.join(hf)}",
              file=sys.stderr)
        args.modes = ",".join(m for m in requested if m not in hf)


def run(args) -> int:
    # The benchmark (and JAX) load here, after the arguments and paths are known to be valid.
    from quasar_jax import sharding
    from quasar_jax.bench.report import results_markdown, write_outputs
    from quasar_jax.bench.run import run_benchmark

    args.mesh_obj = sharding.start(args, PROG)

    results = write_outputs(run_benchmark(args, progress=not args.no_progress), args.out)
    print(results_markdown(results))
    print(f"wrote {', '.join(str(args.out / f) for f in OUTPUT_FILES)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int:
        given = explicit_flags(parser, argv)
        check_ngram_range(args)
        requested = [m.strip() for m in args.modes.split(",")]
        if args.num_candidates < 2 and any(m.startswith("tree-") for m in requested):
            raise InputError("--num-candidates must be >= 2 for the tree modes")
        if "--heads" in given and not any(m.startswith("s4c-") for m in requested):
            raise InputError("--heads applies only to the s4c modes (s4c-fp, s4c-w8a16)")
        if args.temperature == 0 and "--seed" in given:
            raise InputError("--seed applies only to sampling (--temperature > 0)")
        check_modes(args, given)
        args.out = check_output_dir(args.out, owned=OUTPUT_FILES)
        return run(args)

    return run_cli(PROG, work)
