"""What a mode produced and the benchmark's metrics over it: the counting rule
(:func:`truncate_output`) and pooled per-mode / per-category figures (:func:`summarize`)."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Sequence

from quasar_jax.bench.modes import BASELINE
from quasar_jax.fidelity.metrics import common_prefix, ratio


@dataclasses.dataclass
class Batch:
    category: str
    rows: list[int]  # prompt indices
    walls: list[float] = dataclasses.field(default_factory=list)  # one per timed repeat

    @property
    def wall_s(self) -> float:
        return statistics.median(self.walls)


@dataclasses.dataclass
class ModeRun:
    """What one mode produced: outputs aligned with the prompt list, steps, timed batches."""

    mode: str
    outputs: list[list[int] | None]
    steps: list[int | None]  # verify steps (forward calls for HF) per prompt; None = unknown
    batches: list[Batch]
    compile_s: float | None = None
    reference: str | None = None
    auto_added: bool = False
    deterministic: bool = True  # every repeat produced the same ids


def make_batches(categories: Sequence[str], batch_size: int) -> list[Batch]:
    """Consecutive prompts of one category, at most ``batch_size`` per batch (never mixed)."""
    batches = []
    for cat in dict.fromkeys(categories):
        rows = [i for i, c in enumerate(categories) if c == cat]
        for s in range(0, len(rows), batch_size):
            batches.append(Batch(cat, rows[s:s + batch_size]))
    return batches


def truncate_output(ids: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Cut after the first stop id (kept) and at ``max_new_tokens``: the one counting rule."""
    out = []
    stop = set(int(s) for s in stop_ids)
    for t in list(ids)[:max_new_tokens]:
        out.append(int(t))
        if int(t) in stop:
            break
    return out


def _group_metrics(run: ModeRun, rows: list[int], batches: list[Batch], runs: dict[str, ModeRun]) -> dict:
    new = sum(len(run.outputs[i]) for i in rows)
    steps = None if any(run.steps[i] is None for i in rows) else sum(run.steps[i] for i in rows)
    wall = sum(b.wall_s for b in batches) if batches and all(b.walls for b in batches) else None
    out = {"num_prompts": len(rows), "new_tokens": new, "verify_steps": steps,
           "tau": ratio(new, steps), "wall_s": wall, "tokens_per_s": ratio(new, wall)}
    for key, ref_name in (("exact_match", run.reference), ("exact_match_vs_ar_fp", BASELINE)):
        ref = runs.get(ref_name) if ref_name else None
        out[key] = (None if ref is None or not rows else
                    sum(run.outputs[i] == ref.outputs[i] for i in rows) / len(rows))
    ref = runs.get(run.reference) if run.reference else None
    out["mean_common_prefix_vs_reference"] = (
        None if ref is None or not rows else
        sum(common_prefix(run.outputs[i], ref.outputs[i]) for i in rows) / len(rows))
    return out


def summarize(runs: dict[str, ModeRun], categories: Sequence[str]) -> dict:
    """Per mode ``{"overall": {...}, "categories": {cat: {...}}}`` from the raw runs.

    ``categories[i]`` is prompt i's category. tau, tokens/s and exact match are pooled over the
    prompts of the group; ``speedup_vs_ar_fp`` divides by ``ar-fp``'s tokens/s on the same group.
    """
    cats = list(dict.fromkeys(categories))
    result = {}
    for name, run in runs.items():
        if len(run.outputs) != len(categories) or len(run.steps) != len(categories):
            raise ValueError(f"mode {name}: {len(run.outputs)} outputs for {len(categories)} prompts")
        overall = _group_metrics(run, list(range(len(categories))), run.batches, runs)
        per_cat = {}
        for c in cats:
            rows = [i for i, ci in enumerate(categories) if ci == c]
            per_cat[c] = _group_metrics(run, rows, [b for b in run.batches if b.category == c], runs)
        repeats = min((len(b.walls) for b in run.batches), default=0)
        totals = [sum(b.walls[r] for b in run.batches) for r in range(repeats)]
        overall.update(compile_s=run.compile_s, reference=run.reference, auto_added=run.auto_added,
                       deterministic=run.deterministic,
                       wall_s_min_repeat=min(totals) if totals else None,
                       wall_s_max_repeat=max(totals) if totals else None)
        result[name] = {"overall": overall, "categories": per_cat}
    base = result.get(BASELINE)
    for name, res in result.items():
        groups = [(res["overall"], base and base["overall"])]
        groups += [(res["categories"][c], base and base["categories"][c]) for c in cats]
        for g, b in groups:
            g["speedup_vs_ar_fp"] = ratio(g["tokens_per_s"], b["tokens_per_s"] if b else None)
    return result
