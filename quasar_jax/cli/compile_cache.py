"""JAX's persistent compilation cache, on by default.

Compiled programs are kept under ``$XDG_CACHE_HOME/quasar_jax/jax-compile`` (``~/.cache/...``),
so the second run of the same command on the same machine skips most of XLA's compile time.
``QUASAR_JAX_COMPILE_CACHE`` (a directory, or ``off``) and the commands' ``--compile-cache``
flag choose otherwise. A cache directory the user already configured for JAX
(``jax_compilation_cache_dir`` / ``JAX_COMPILATION_CACHE_DIR``) is left alone by the default.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "QUASAR_JAX_COMPILE_CACHE"
OFF = "off"
_chosen = False  # an explicit choice (a command's --compile-cache) was made in this process


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quasar_jax" / "jax-compile"


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn the cache on in ``directory`` (default: ``$QUASAR_JAX_COMPILE_CACHE`` or
    :func:`default_dir`), or leave it off for ``"off"``; returns the directory in use (or None).

    An explicit ``directory`` (a command's flag) is final for the process: later default calls
    (``Engine`` enables the default) do not override it.

    An unusable directory (not creatable) leaves the cache off rather than failing the run.
    """
    global _chosen
    if directory is None and _chosen:
        return Path(jax.config.jax_compilation_cache_dir) if jax.config.jax_compilation_cache_dir else None
    _chosen = _chosen or directory is not None
    choice = str(directory) if directory is not None else os.environ.get(ENV)
    if choice is None and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)  # the user's own JAX setting wins
    if choice == OFF:
        return None
    path = Path(choice) if choice else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
