"""Output paths of the commands: checked before any work starts, written all or nothing.

* :func:`check_output_dir` / :func:`check_output_file` refuse, with one line naming the flag and
  the path, an output that could not be written (read-only location, a file where a directory is
  wanted, a missing parent that cannot be made), that is the command's own source, or that would
  overwrite files the command does not own (a non-empty foreign directory, a user's file).
* :func:`staged_dir` writes a directory's content into a hidden sibling and renames it into place
  only when complete: an interrupted or failed write leaves no half output and touches nothing
  of the user's. :func:`write_text_atomic` does the same for one file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from quasar_jax.cli.errors import InputError

_PARTIAL: set[Path] = set()  # staging paths being written now (removed on an interrupt)


def remove_partial_outputs() -> None:
    """Delete every staging directory or file still being written (Ctrl-C handler)."""
    for path in list(_PARTIAL):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        _PARTIAL.discard(path)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(directory: Path, flag: str, shown: Path) -> None:
    """``directory`` (existing) accepts new entries; probed by creating one (works on ro mounts)."""
    if not directory.is_dir():
        raise InputError(f"{flag} {shown}: {directory} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".quasar_jax-probe-", dir=directory)
    except OSError as err:
        raise InputError(f"{flag} {shown}: cannot write in {directory} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | os.PathLike, *, flag: str = "--out", source: str | os.PathLike | None = None,
                     owned: Iterable[str] = ()) -> Path:
    """A directory the command may create or fill; returns its absolute path.

    It must not be (or lie inside) ``source``; if it exists it must be a writable directory that
    is empty or holds only ``owned`` names (the command's own earlier outputs); otherwise its
    nearest existing ancestor must be a writable directory.
    """
    shown = Path(path)
    out = Path(os.path.abspath(path))
    if source is not None:
        src = Path(source).resolve()
        real = out.resolve()
        if real == src or src in real.parents:
            raise InputError(f"{flag} {shown} is the source directory {src} (or inside it); choose another")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"{flag} {shown} exists and is not a directory")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in set(owned))
        if foreign:
            raise InputError(f"{flag} {shown} is not empty (holds {foreign[0]!r}"
                             f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
                             "choose a new or empty directory")
        _check_writable_dir(out, flag, shown)
        _check_writable_dir(out.parent, flag, shown)
    else:
        _check_writable_dir(_nearest_existing(out.parent), flag, shown)
    return out


def check_output_file(path: str | os.PathLike, *, flag: str) -> Path:
    """A file the command will write (replacing a regular file of that name is allowed)."""
    shown = Path(path)
    out = Path(os.path.abspath(path))
    if out.exists() and not out.is_file():
        raise InputError(f"{flag} {shown} exists and is not a regular file")
    parent = out.parent
    if not parent.exists():
        raise InputError(f"{flag} {shown}: directory {parent} does not exist")
    _check_writable_dir(parent, flag, shown)
    return out


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``out``; on success its content lands in ``out``.

    An absent or empty ``out`` is replaced by the sibling in one rename; an ``out`` holding the
    command's own earlier outputs (see ``check_output_dir(owned=...)``) gets each new file renamed
    over the old one. On any exception (Ctrl-C included) the sibling is removed and ``out`` is
    left as it was.
    """
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    _PARTIAL.add(stage)
    try:
        yield stage
        if out.is_dir() and any(out.iterdir()):
            for item in stage.iterdir():
                os.replace(item, out / item.name)
            stage.rmdir()
        else:
            if out.is_dir():
                out.rmdir()
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        _PARTIAL.discard(stage)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    path = Path(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    _PARTIAL.add(Path(tmp))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        _PARTIAL.discard(Path(tmp))
