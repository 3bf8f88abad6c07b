"""How every command runs: one-line errors, exit statuses, Ctrl-C, a progress line.

Every command line of the project goes through ``run_cli``: bad input (``ValueError``,
``FileNotFoundError``, ``OSError`` of a user path) prints ONE line and exits with status 2; Ctrl-C
prints one line and exits with 130. Nothing here imports JAX, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from typing import Callable

from quasar_jax.cli.outputs import remove_partial_outputs

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints ONE line (no usage block) and exits with status 2.

    Abbreviated long options are off, so ``explicit_flags`` can tell which flags were given.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The long option strings the user actually gave (so flags that do not apply can be refused)."""
    argv = sys.argv[1:] if argv is None else argv
    options = {o for a in parser._actions for o in a.option_strings}
    return {tok.split("=", 1)[0] for tok in argv if tok.split("=", 1)[0] in options}


def quiet_libraries() -> None:
    """Silence import-time chatter of the libraries (the one-line promise covers stderr)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*PyTorch.*")


def _interrupt_handler(prog: str):
    """Ctrl-C: remove partial outputs, say so on one line, exit 130 at once.

    Exiting from the handler (rather than raising ``KeyboardInterrupt``) is deliberate: the
    interrupt may land inside a garbage-collection callback or a library's worker thread, where a
    raised exception is swallowed or printed as a traceback.
    """
    def handler(signum, frame):
        del signum, frame
        remove_partial_outputs()
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.write(2, f"{prog}: interrupted\n".encode())
        os._exit(EXIT_INTERRUPTED)
    return handler


def run_cli(prog: str, work: Callable[[], int]) -> int:
    """Run a command's work; map bad input to one line + status 2, Ctrl-C to one line + 130."""
    quiet_libraries()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _interrupt_handler(prog))
    try:
        return work()
    except KeyboardInterrupt:
        remove_partial_outputs()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        return fail(prog, err)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run_command(prog: str, parser: argparse.ArgumentParser, run: Callable, argv: list[str] | None) -> int:
    """A command's ``main``: parse ``argv``, then ``run(args, the flags given)`` through ``run_cli``."""
    args = parser.parse_args(argv)
    return run_cli(prog, lambda: run(args, explicit_flags(parser, argv)))


class StatusLine:
    """One self-overwriting progress line on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self._width = 0

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r" + text.ljust(self._width))
            sys.stderr.flush()
            self._width = len(text)

    def clear(self) -> None:
        if self.enabled and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0


def fail(prog: str, err: Exception) -> int:
    """Report an input error on one line; the exit status for it."""
    message = " ".join(str(err).split("\n")[0].split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in message:
        message = f"{err.strerror or message}: {err.filename}"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE
