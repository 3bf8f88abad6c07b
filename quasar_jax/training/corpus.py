"""The demo model's training corpus: the ``*.py`` files of a Python standard library.

Used by ``scripts/train_demo_model.py`` (which trained the demo model) and by
``python -m quasar_jax.train_heads`` (whose default prompts for the demo model are windows of the
same training split). Left out: ``site-packages``, every ``test``/``tests`` tree, ``idlelib``,
``lib2to3``, the generated codec tables in ``encodings``, the doc-string dump ``pydoc_data`` and
``__pycache__``. A file is validation when ``zlib.crc32(relative_posix_path) % val_mod == 0``
(default 25), a rule that does not depend on which other files exist. ``text_prompts`` cuts
seeded token windows out of texts (the heads' training prompts).
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                 "encodings", "pydoc_data", "__pycache__"}
VAL_MOD = 25


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus(root: Path, val_mod: int = VAL_MOD) -> tuple[list[Path], list[Path]]:
    """Sorted ``*.py`` files of the stdlib at ``root`` split into (train, val)."""
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    train, val = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        is_val = zlib.crc32(rel.as_posix().encode()) % val_mod == 0
        (val if is_val else train).append(path)
    if not train or not val:
        raise ValueError(f"corpus at {root} gave {len(train)} train and {len(val)} val files")
    return train, val


def read_texts(paths: list[Path]) -> list[str]:
    """The non-empty UTF-8 texts of ``paths`` (files that are not UTF-8 are skipped)."""
    texts = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of latin-1 test fixtures; none outside the excluded trees
        if text.strip():
            texts.append(text)
    return texts


def text_prompts(texts: Sequence[str], tokenizer, num: int, prompt_tokens: int, seed: int,
                 eos_id: int | None) -> list[list[int]]:
    """``num`` windows of ``prompt_tokens`` tokens at seeded random offsets of the texts joined
    (each followed by ``eos_id`` when given); fewer tokens than one window: the whole stream."""
    stream = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        stream.extend(enc.ids)
        if eos_id is not None:
            stream.append(eos_id)
    if not stream:
        raise ValueError("the text gives no tokens")
    if len(stream) <= prompt_tokens:
        return [stream] * num
    starts = np.random.default_rng(seed).integers(0, len(stream) - prompt_tokens, size=num)
    return [stream[s:s + prompt_tokens] for s in starts]
