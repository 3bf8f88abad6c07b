"""Prompt and question I/O shared by every command: Spec-Bench ``.jsonl`` files, prompt encoding
(optionally through the chat template) and the stop ids of a model directory."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence


@dataclasses.dataclass
class Question:
    """One Spec-Bench style question: its first turn is the prompt."""

    category: str
    question_id: object
    text: str
    source: str  # file stem


def read_jsonl_turns(path: Path, text: str | None = None) -> list[tuple[int, dict, str]]:
    """``(line number, row, first turn)`` of each non-empty line of a Spec-Bench style .jsonl."""
    rows = []
    for n, line in enumerate((path.read_text() if text is None else text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turn = row["turns"][0]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            turn = None
        if not isinstance(turn, str) or not turn.strip():
            raise ValueError(f"{path}:{n}: expected a JSON object whose 'turns' starts with a non-empty string")
        rows.append((n, row, turn))
    return rows


def load_questions(files: Sequence[str | os.PathLike], num_prompts: int | None = None) -> list[Question]:
    """Spec-Bench jsonl files -> the first ``num_prompts`` questions of each category.

    The first turn is the prompt; a missing/empty ``category`` becomes the file's stem. Texts
    already taken (the same question listed in two files) are skipped. The result is grouped by
    category in order of first appearance.
    """
    by_cat: dict[str, list[Question]] = {}
    seen: set[str] = set()
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"questions file not found: {path}")
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
        raise ValueError("no questions found in " + ", ".join(map(str, files)))
    return questions


def stop_ids_of(tokenizer, model_dir) -> tuple[int, ...]:
    """EOS ids of the tokenizer, ``generation_config.json`` and ``config.json``."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            data = json.loads(path.read_text())
            eos = data.get("eos_token_id") if isinstance(data, dict) else None
            ids.update(e for e in ([eos] if isinstance(eos, int) else (eos or [])) if isinstance(e, int))
    return tuple(sorted(ids))


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of ``text``; with ``chat`` the text is one user turn of the chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]
