"""The flags the commands share, and their value parsers (argparse only: no JAX import).

Every command defines these flags through the functions below, so names, defaults and help agree.
"""

from __future__ import annotations

import argparse
from typing import Callable

from quasar_jax.cli.errors import InputError


def int_at_least(lo: int):
    """Parser of an integer ``>= lo``."""
    what = "a positive integer" if lo == 1 else f"an integer >= {lo}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(lo: float, hi: float, lo_open: bool):
    """Parser of a float in ``(lo, hi]`` (``lo_open``) or ``[lo, hi]``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ((value > lo if lo_open else value >= lo) and value <= hi):
            raise argparse.ArgumentTypeError(
                f"expected a number in {'(' if lo_open else '['}{lo}, {hi}], got {text!r}")
        return value
    return parse


# ----------------------------------------------------------------------------- shared flags
# Every CLI defines these flags through the functions below, so names, defaults and help agree.
# The functions only touch argparse: parsing (and --help) never imports JAX.
DTYPES = ("float32", "bfloat16")
VERIFIERS = ("float", "w8a16", "w8a8")  # quasar_jax.model.modes.QuantMode values
BACKENDS = ("xla", "pallas")  # quasar_jax.model.modes.Backend values
DRAFTERS = ("none", "ngram", "qspec", "s4c")  # quasar_jax.speculative.drafters.DrafterKind values
NGRAM_PREFER = ("recent", "earliest")


VERIFIER_CHOICES = ("auto",) + VERIFIERS


def add_verifier_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verifier", choices=VERIFIER_CHOICES, default="auto",
                   help="verifier weights/matmul: float, int8 weight-only (w8a16), int8 weights and "
                        "activations (w8a8); auto = w8a16 on a GPU/TPU, for a converted int8 "
                        "checkpoint and for --drafter qspec, else float (default: auto)")


def add_compile_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", default=None, metavar="DIR|off",
                   help="JAX persistent compilation cache directory, or off (default: "
                        "$QUASAR_JAX_COMPILE_CACHE or ~/.cache/quasar_jax/jax-compile)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --backend, --quantize-lm-head."""
    p.add_argument("--model", default="demo",
                   help="'demo' (the model shipped with the package), 'demo-moe' (its mixture-of-experts "
                        "sibling), a local Hugging Face or converted directory, or a hub id (default: demo)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype of the float weights and activations (default: float32)")
    p.add_argument("--backend", choices=BACKENDS, default="xla",
                   help="int8 matmul implementation (default: xla)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantise the LM head to int8 too (untied models; default: off)")


KV_DTYPES = ("auto", "bfloat16", "float32", "int8")  # quasar_jax.model.kv_quant.KV_DTYPES (no JAX here)


def add_kv_flags(p: argparse.ArgumentParser, *, page_size: bool = True) -> None:
    """--kv-dtype (and --page-size)."""
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto",
                   help="what the KV cache stores: auto (the compute dtype), bfloat16, float32, or int8 "
                        "(a scale per token and KV head; paged layout) (default: auto)")
    if page_size:
        p.add_argument("--page-size", type=positive_int, default=16,
                       help="slots per KV page (default: 16)")


def add_drafter_flag(p: argparse.ArgumentParser, *, note: str = "") -> None:
    """--drafter {none,ngram,qspec,s4c}, --heads."""
    p.add_argument("--drafter", choices=DRAFTERS, default="ngram",
                   help="none (autoregressive), ngram (prompt lookup), qspec (W8A8 self-draft), s4c (trained "
                        f"draft heads, a token tree){note} (default: ngram)")
    add_heads_flag(p)


def add_heads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", default=None, metavar="DIR",
                   help="S4C draft heads (python -m quasar_jax.train_heads) (default: the heads saved beside "
                        "the model, <model>/s4c_heads; the shipped heads for --model demo)")


def add_drafting_flags(p: argparse.ArgumentParser, *, num_candidates: int = 1) -> None:
    """--num-draft, --ngram-min, --ngram-max, --ngram-prefer, --num-candidates, --tree-nodes."""
    p.add_argument("--num-draft", type=positive_int, default=5,
                   help="K, draft tokens proposed per verify step (default: 5)")
    p.add_argument("--ngram-min", type=positive_int, default=1,
                   help="smallest n-gram the prompt-lookup drafter matches (default: 1)")
    p.add_argument("--ngram-max", type=positive_int, default=3,
                   help="largest n-gram the prompt-lookup drafter matches (default: 3)")
    p.add_argument("--ngram-prefer", choices=NGRAM_PREFER, default="recent",
                   help="which earlier occurrence of the n-gram wins (default: recent)")
    p.add_argument("--num-candidates", type=non_negative_int, default=num_candidates,
                   help="C n-gram continuations verified together as one token tree; 1 = the chain; with "
                        f"--drafter s4c, joining the heads' tree (0 = none) (default: {num_candidates})")
    p.add_argument("--tree-nodes", type=positive_int, default=None,
                   help="N, most tree nodes per verify step, >= --num-draft (default: C * K; s4c: the "
                        "heads' stored default)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p, --seed."""
    p.add_argument("--temperature", type=float_in(0.0, 100.0, False), default=0.0,
                   help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-k", type=non_negative_int, default=0,
                   help="keep the k most likely tokens; 0 = off (default: 0)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, True), default=1.0,
                   help="nucleus sampling mass; 1 = off (default: 1)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default: 0)")


def add_prompt_flags(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """--chat, --max-new-tokens, --ignore-eos."""
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                   help=f"tokens to generate per prompt at most (default: {max_new_tokens})")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    p.add_argument("--allow-long-context", action="store_true",
                   help="allow prompt + max new tokens past the model's max_position_embeddings "
                        "(default: an error)")


def generation_kwargs(args: argparse.Namespace, **overrides) -> dict:
    """``GenerationConfig`` keyword arguments from the shared flags present on ``args``
    (each flag's dest is the field's name)."""
    check_ngram_range(args)
    fields = ("max_new_tokens", "num_draft", "ngram_min", "ngram_max", "ngram_prefer", "temperature",
              "top_k", "top_p", "seed", "max_len", "num_candidates", "tree_nodes", "kv_dtype")
    return {**{f: getattr(args, f) for f in fields if hasattr(args, f)}, **overrides}


def parse_speculation(text: str | int) -> str | int:
    """``--speculation``: ``"auto"``, ``"off"`` (= 0) or a draft length K >= 0 (``ValueError`` otherwise)."""
    if text in ("auto", "off"):
        return "auto" if text == "auto" else 0
    try:
        value = int(text) if not isinstance(text, bool) else -1
    except (TypeError, ValueError):
        value = -1
    if value < 0:
        raise ValueError(f"speculation must be auto, off or a draft length K >= 0, got {text!r}")
    return value


def argparse_type(parse: Callable):
    """An argparse ``type`` from a parser that raises ``ValueError`` (its message, one line)."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = parse.__name__
    return convert


def check_ngram_range(args: argparse.Namespace) -> None:
    """--ngram-min <= --ngram-max, refused before anything loads."""
    if args.ngram_min > args.ngram_max:
        raise InputError(f"--ngram-min {args.ngram_min} > --ngram-max {args.ngram_max}")


def check_drafter_flags(args: argparse.Namespace, given: set[str]) -> None:
    """Drafting flags that do not apply to ``--drafter`` are errors (decode, serve)."""
    tree_capable = args.drafter in ("ngram", "s4c")
    for flag in ("--ngram-min", "--ngram-max", "--ngram-prefer", "--num-candidates", "--tree-nodes"):
        if flag in given and not tree_capable:
            raise InputError(f"{flag} applies only to --drafter ngram or s4c")
    if "--heads" in given and args.drafter != "s4c":
        raise InputError("--heads applies only to --drafter s4c")
    if args.drafter == "none" and "--num-draft" in given:
        raise InputError("--num-draft does not apply to --drafter none")
    if args.drafter == "ngram" and args.num_candidates < 1:
        raise InputError("--num-candidates must be >= 1 for --drafter ngram (1 = the chain)")
    if "--tree-nodes" in given and args.drafter == "ngram" and args.num_candidates == 1:
        raise InputError("--tree-nodes applies only with --num-candidates > 1")
    check_ngram_range(args)
