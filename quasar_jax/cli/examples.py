"""Small inputs shipped inside the package, so the examples in README.md and the notebook run
without downloading anything.

``PROMPTS`` is ``specbench_mini.jsonl``: 18 short prompts written for this project, 3 in each of
six Spec-Bench categories (coding, math_reasoning, translation, summarization, qa, rag), in the
Spec-Bench jsonl format ``{"question_id", "category", "turns": [...]}`` that
``python -m quasar_jax.bench --questions`` and ``quasar_jax.cli.prompts.load_questions`` read.
"""

from __future__ import annotations

from pathlib import Path

PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "specbench_mini.jsonl"

if __name__ == "__main__":  # `python -m quasar_jax.cli.examples` prints the path (for shell commands)
    print(PROMPTS)
