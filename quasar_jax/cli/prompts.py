"""Prompt and question I/O shared by every command: prompt files and stdin, Spec-Bench ``.jsonl``
files, prompt encoding (optionally through the chat template) and the stop ids of a model.

Prompt files (``read_prompt_file``):

* ``.jsonl`` / ``.json`` (any case): Spec-Bench style, one JSON object per line whose ``turns``
  list starts with the prompt (``question_id`` and ``category`` are carried along); a ``.json``
  file may instead hold one JSON array of such objects or of strings.
* anything else: plain UTF-8 text, one prompt per non-blank line, taken verbatim (a backslash
  followed by ``n`` stays two characters; put multi-line prompts in a ``.jsonl`` file).

Every reader decodes bytes as UTF-8 explicitly and raises ``InputError`` naming the file (or
``stdin``), the line and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

from quasar_jax.cli.errors import InputError
from quasar_jax.cli.examples import PROMPTS as MINI_PROMPTS

JSON_SUFFIXES = (".jsonl", ".json")
MINI = "mini"  # --questions mini: the small Spec-Bench-style set shipped with the package


@dataclasses.dataclass
class Question:
    """One Spec-Bench style question: its first turn is the prompt."""

    category: str
    question_id: object
    text: str
    source: str  # file stem


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt and, when it came from a Spec-Bench file, its id and category."""

    text: str
    question_id: object = None
    category: str | None = None


def decode_text(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text (a leading BOM dropped); ``InputError`` naming ``source`` if not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{source} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})") from None


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path``; one-line errors for missing, directory, unreadable, not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}") from None
    return decode_text(data, f"{what} {path}")


def check_prompt(text: str, source: str) -> str:
    if not text.strip():
        raise InputError(f"{source}: the prompt is empty or only whitespace")
    return text


def _row_turn(row, source: str) -> str:
    turn = None
    if isinstance(row, str):
        turn = row
    elif isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
        turn = row["turns"][0]
    if not isinstance(turn, str) or not turn.strip():
        raise InputError(f"{source}: expected a JSON object whose 'turns' starts with a non-empty string")
    return turn


def read_jsonl_turns(path: Path, text: str | None = None) -> list[tuple[int, dict, str]]:
    """``(line number, row, first turn)`` of each Spec-Bench record of a ``.jsonl`` / ``.json`` file."""
    text = read_text_file(path, "questions file") if text is None else text
    if Path(path).suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise InputError(f"{path}: not valid JSON: {err}") from None
        return [(n, row if isinstance(row, dict) else {}, _row_turn(row, f"{path}: item {n}"))
                for n, row in enumerate(doc, 1)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise InputError(f"{path}:{n}: not a JSON object (Spec-Bench files hold one JSON object per line)") from None
        rows.append((n, row if isinstance(row, dict) else {}, _row_turn(row, f"{path}:{n}")))
    return rows


def read_prompt_file(path: str | os.PathLike) -> list[Prompt]:
    """Prompts of a prompt file (formats in the module docstring); at least one."""
    path = Path(path)
    text = read_text_file(path, "prompt file")
    if path.suffix.lower() in JSON_SUFFIXES:
        prompts = [Prompt(turn, row.get("question_id", n),
                          None if row.get("category") is None else str(row["category"]))
                   for n, row, turn in read_jsonl_turns(path, text)]
    else:
        prompts = [Prompt(line) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompt")
    return prompts


def load_questions(files: Sequence[str | os.PathLike], num_prompts: int | None = None) -> list[Question]:
    """Spec-Bench jsonl files -> the first ``num_prompts`` questions of each category.

    The name ``mini`` stands for the prompt set shipped with the package (``quasar_jax.cli.examples``).

    The first turn is the prompt; a missing/empty ``category`` becomes the file's stem. Texts
    already taken (the same question listed in two files) are skipped. The result is grouped by
    category in order of first appearance.
    """
    by_cat: dict[str, list[Question]] = {}
    seen: set[str] = set()
    for file in files:
        path = MINI_PROMPTS if str(file) == MINI else Path(file)
        if path.suffix.lower() not in JSON_SUFFIXES and path.exists():
            raise InputError(f"questions file {path}: expected a Spec-Bench .jsonl file")
        for n, row, text in read_jsonl_turns(path):
            cat = str(row.get("category") or path.stem)
            if text in seen:
                continue
            bucket = by_cat.setdefault(cat, [])
            if num_prompts is not None and len(bucket) >= num_prompts:
                continue
            seen.add(text)
            bucket.append(Question(cat, row.get("question_id", n), text, path.stem))
    questions = [q for qs in by_cat.values() for q in qs]
    if not questions:
        raise InputError("no questions found in " + ", ".join(map(str, files)))
    return questions


def stop_ids_of(tokenizer, model_dir) -> tuple[int, ...]:
    """EOS ids of the tokenizer, ``generation_config.json`` and ``config.json``."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            try:
                data = json.loads(read_text_file(path, name))
            except (json.JSONDecodeError, RecursionError) as err:
                raise InputError(f"{path} is not valid JSON: {err}") from None
            eos = data.get("eos_token_id") if isinstance(data, dict) else None
            if eos is not None and not (isinstance(eos, int) or (
                    isinstance(eos, list) and all(isinstance(e, int) for e in eos))):
                raise InputError(f"{path}: field 'eos_token_id' must be a token id or a list of token ids, "
                                 f"got {json.dumps(eos)[:60]}")
            ids.update(e for e in ([eos] if isinstance(eos, int) else (eos or [])) if not isinstance(e, bool))
    return tuple(sorted(ids))


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of ``text``; with ``chat`` the text is one user turn of the chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]
