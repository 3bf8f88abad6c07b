"""Shared command-line plumbing: one-line argument errors with exit status 2, value parsers."""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints ONE line (no usage block) and exits with status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


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


def fail(prog: str, err: Exception) -> int:
    """Report an input error on one line; the exit status for it."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return EXIT_USAGE
