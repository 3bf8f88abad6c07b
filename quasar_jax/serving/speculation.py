"""Speculation that adapts to load: which chunk program (draft length K) the next chunk runs.

``--speculation auto|off|K`` (``parse_speculation``):

* ``off``: plain autoregressive decoding (K = 0) through the same loop;
* ``K``: always K draft tokens (the drafter's own kind, K replaced);
* ``auto`` (default): one chunk program per K of ``draft_options`` -- {0, 2, --num-draft} for a
  chain drafter (QSpec and n-gram), {0, the n-gram chain of depth K, the tree} for a tree drafter
  (the n-gram trie, or S4C's heads' tree: ``K`` then cuts that tree to depth K) -- all
  compiled at start-up over ONE slot state; before each chunk ``AdaptivePolicy`` picks one.

Whatever is picked the output is lossless (each program is the exact speculative loop of the same
verifier; switching between chunks changes no row's state layout). With sampling, the tokens of a
seeded request follow the same distribution but may differ from one run to the next, because the
programs draw their random numbers differently and the choice depends on timing (a fixed
``--speculation`` reproduces a seed's text).

The cost model (``AdaptivePolicy``), for program p with draft length K_p and ``busy`` rows:

    rate(p) = busy * E[tokens per row-step | p] / t(p, busy)          (tokens per second)

* ``E`` for a chain of K drafts with per-token acceptance alpha is (1 - alpha^(K+1)) / (1 - alpha)
  (1 for K = 0); alpha is the mean of each speculative chunk's observed tau = tokens / row-steps
  inverted through that formula (so drafts that are sometimes missing, as n-gram lookup's, lower
  the effective alpha), weighted by the chunk's row-steps, older evidence fading with a half-life
  of ``half_life`` (256) row-steps, the start value 0.5 counting as half of that. (A per-chunk
  moving average weighted up to one half per chunk was tried first: a few busy chunks of young
  rows, whose n-gram drafts rarely hit yet, drove it to AR at concurrency 16 while K = 2 was 16%
  faster there.) A tree program uses its own observed tau, a ratio of sums fading the same way;
  until it has run, its prior (``tree_prior``): for S4C's heads, 1 + the sum over the tree's nodes
  of the product of the heads' recorded acceptance along the node's path (``heads.json``'s
  ``acceptance.top_rank``, Medusa's estimate; the chain's expectation when the merged n-gram
  candidates promise more), for the n-gram tree the chain's expectation at the current alpha.
  A row's first verify step is left out (``acceptance_evidence``): it drafts from the prompt
  alone, before the row has output of its own to copy, and a chunk returns right after new rows'
  first tokens, so under load whole chunks are first steps (tau ~1 on Spec-Bench).
* ``t(p, busy)``: seconds per loop iteration, calibrated at start-up (``calibrate``: each program
  timed with 1 and with all rows busy, best of two chunks, linear in between) and scaled online by
  ONE factor common to every program, a moving average of observed / predicted time of whatever
  runs: ``rate`` then reads as tokens per second on the machine as it is now, and, scaling every
  rate alike, it never moves the choice, which rests on alpha and the ratios measured side by side
  at start-up. (A factor per program would drift apart: the program that does not run is never
  re-measured, so one noisy reading could hold the choice for good.)

Rule: run the best rate; switch from the current program only when another's predicted rate is
higher by ``margin`` (10%) for ``patience`` (3) chunks in a row (hysteresis, no thrashing at a
threshold). Evidence that the running program does not produce is probed: while no chain runs
(K = 0 or a tree), alpha is not observed, so every ``probe_every`` chunks (8, doubling to 128 while
the probes keep confirming the choice) one chunk runs the smallest chain K > 0 (the cheapest probe)
to measure it; each tree program not running is probed the same way (its own interval, from the
second chunk on), so its observed tau replaces its prior and a tree that pays is found.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np

from quasar_jax.cli.flags import parse_speculation
from quasar_jax.serving.slots import stage_prompt
from quasar_jax.speculative.drafters import NGramDrafter, NGramTreeDrafter, NoDrafter, is_tree_drafter
from quasar_jax.speculative.sampling import SamplingParams

AUTO = "auto"
__all__ = ["AUTO", "AdaptivePolicy", "FixedPolicy", "acceptance_evidence", "calibrate", "draft_options",
           "heads_tau", "make_policy", "parse_speculation", "program_kind", "tree_prior"]
AUTO_KS = (0, 2)  # besides the drafter's own K


def with_draft_length(drafter, k: int):
    """The same kind of drafter with K = ``k`` draft tokens (``NoDrafter`` for 0)."""
    if k == 0:
        return NoDrafter()
    if k == drafter.num_draft:
        return drafter
    if callable(getattr(drafter, "with_draft_length", None)):  # S4C: its tree cut to depth k
        return drafter.with_draft_length(k)
    if isinstance(drafter, NGramTreeDrafter) and drafter.tree_nodes is not None:
        return dataclasses.replace(drafter, num_draft=k, tree_nodes=max(drafter.tree_nodes, k))
    if not dataclasses.is_dataclass(drafter) or isinstance(drafter, NoDrafter):
        raise ValueError(f"drafter {drafter!r} has no draft length to change: use speculation 'auto' or 'off'")
    return dataclasses.replace(drafter, num_draft=k)


def draft_options(drafter, speculation: str | int) -> tuple:
    """The drafters of the chunk programs, by increasing cost (K = 0 first)."""
    speculation = parse_speculation(speculation)
    if speculation != AUTO:
        return (with_draft_length(drafter, speculation),)
    k = drafter.num_draft
    if k == 0:
        return (drafter,)
    if is_tree_drafter(drafter):
        chain = NGramDrafter(k, drafter.ngram_min, drafter.ngram_max, drafter.prefer)
        return (NoDrafter(), chain, drafter)
    if not dataclasses.is_dataclass(drafter):  # a user drafter: with it or without it
        return (NoDrafter(), drafter)
    return tuple(with_draft_length(drafter, kk) for kk in sorted({*AUTO_KS, k}) if kk <= k)


def expected_tokens(k: int, alpha: float) -> float:
    """E[tokens per verify step] for a chain of K drafts, each accepted with probability alpha."""
    if k == 0:
        return 1.0
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def alpha_of(tau: float, k: int) -> float:
    """The alpha whose ``expected_tokens(k, alpha)`` is ``tau`` (bisection; tau in [1, K+1])."""
    tau = min(max(tau, 1.0), k + 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(k, mid) < tau else (lo, mid)
    return (lo + hi) / 2


def program_kind(drafter) -> str:
    """``ar``, ``chain`` or ``tree``: the kind of a chunk program (the metrics' label)."""
    if drafter.num_draft == 0:
        return "ar"
    return "tree" if is_tree_drafter(drafter) else "chain"


def heads_tau(drafter) -> float | None:
    """Expected tokens per verify step of an S4C drafter's head tree from the heads' recorded
    acceptance (``acceptance.top_rank[d][r]``: head d+1's rank-r token is the target's): 1 + the
    sum over nodes of the product along the node's path (at most one node per depth is accepted,
    so the node probabilities add up). None for drafters without recorded acceptance."""
    heads, tree = getattr(drafter, "heads", None), getattr(drafter, "tree", None)
    meta = getattr(heads, "meta", None) or {}
    acc = (meta.get("acceptance") or {}).get("top_rank")
    if not acc or tree is None:
        return None
    tau = 1.0
    for path in tree.paths:
        p = 1.0
        for d, r in enumerate(path):
            p *= float(acc[d][r]) if d < len(acc) and r < len(acc[d]) else 0.0
        tau += p
    return tau


def tree_prior(drafter, alpha: float) -> float:
    """Tokens per verify step a tree program is assumed to give before it has run."""
    chain = expected_tokens(drafter.num_draft, alpha)
    heads = heads_tau(drafter)
    if heads is None:
        return chain  # the n-gram tree: at least its best candidate, a chain of K
    return max(heads, chain) if getattr(drafter, "num_candidates", 0) else heads


def acceptance_evidence(res, slots) -> tuple[int, int]:
    """(tokens, row-steps) of a chunk result for the acceptance estimate: every verify step of the
    ``slots`` rows but each row's first (the row's device step count equals its steps in this
    chunk: the first is here)."""
    tokens, row_steps = int(res.appended.sum()), res.row_steps
    for slot in slots:
        emits = res.emits[:, slot]
        emits = emits[emits > 0]
        if len(emits) and int(res.steps[slot]) == len(emits):
            tokens, row_steps = tokens - int(emits[0]), row_steps - 1
    return tokens, row_steps


class FixedPolicy:
    """Always the one program (``--speculation off`` or ``K``)."""

    def __init__(self, program: int = 0):
        self.program = program

    def choose(self, busy: int) -> int:
        return self.program

    def observe(self, program: int, busy: int, wall_s: float, iterations: int, tokens: int, row_steps: int) -> None:
        pass


class AdaptivePolicy:
    """The rule and cost model of the module docstring."""

    def __init__(self, ks: Sequence[int], trees: Sequence[bool], calibration: Sequence[tuple[float, float]],
                 slots: int, *, priors: Sequence | None = None, margin: float = 0.10, patience: int = 3,
                 probe_every: int = 8, probe_max: int = 128, smoothing: float = 0.3, alpha: float = 0.5,
                 half_life: float = 256.0):
        self.ks, self.trees, self.slots = list(ks), list(trees), slots
        # per tree program: its prior tokens per step, a number or a function of alpha (None: the chain's)
        self.priors = list(priors) if priors is not None else [None] * len(self.ks)
        self.calibration = list(calibration)  # per program: (s/iteration with 1 row busy, with all busy)
        self.margin, self.patience, self.smoothing = margin, patience, smoothing
        self.probe_every, self.probe_max, self.probe_interval = probe_every, probe_max, probe_every
        self.alpha, self.half_life = alpha, half_life
        self._alpha_sums = [alpha * half_life / 2, half_life / 2]  # decayed sum of alpha x row-steps, of row-steps
        self._tree_sums = [[0.0, 0.0] for _ in self.ks]  # per tree program: decayed tokens, row-steps
        self.tree_tau = [None] * len(self.ks)  # observed tau of tree programs
        self.since_tree = [math.inf] * len(self.ks)  # per tree program: chunks since it last ran
        self.tree_interval = [probe_every] * len(self.ks)
        self.correction = 1.0  # observed / calibrated step time, common to every program
        self.current = self.ks.index(min(self.ks))
        self.since_alpha = math.inf  # chunks since alpha was last observed
        self.streak, self.candidate = 0, None
        self.switches = 0

    # ------------------------------------------------------------------ the model
    def step_time(self, p: int, busy: int) -> float:
        one, full = self.calibration[p]
        frac = 0.0 if self.slots <= 1 else (busy - 1) / (self.slots - 1)
        return self.correction * (one + (full - one) * frac)

    def tokens_per_step(self, p: int) -> float:
        if self.trees[p]:
            if self.tree_tau[p] is not None:
                return self.tree_tau[p]
            prior = self.priors[p]
            if prior is not None:
                return prior(self.alpha) if callable(prior) else float(prior)
        return expected_tokens(self.ks[p], self.alpha)

    def rate(self, p: int, busy: int) -> float:
        return busy * self.tokens_per_step(p) / self.step_time(p, busy)

    # ------------------------------------------------------------------ the rule
    def choose(self, busy: int) -> int:
        busy = max(busy, 1)
        probe = self._probe()
        if probe is not None:
            return probe  # a probe measures, it does not move `current`
        rates = [self.rate(p, busy) for p in range(len(self.ks))]
        best = int(np.argmax(rates))
        if best != self.current and rates[best] > (1 + self.margin) * rates[self.current]:
            self.streak = self.streak + 1 if self.candidate == best else 1
            self.candidate = best
            if self.streak >= self.patience:
                self.current, self.streak, self.candidate = best, 0, None
                self.switches += 1
                if self.ks[best] > 0:
                    self.probe_interval = self.probe_every
                if self.trees[best]:
                    self.tree_interval[best] = self.probe_every
        else:
            self.streak, self.candidate = 0, None
        return self.current

    def _probe(self) -> int | None:
        """A program whose evidence is stale (the rule's probes), or None."""
        cur = self.current
        chains = [p for p, k in enumerate(self.ks) if k > 0 and not self.trees[p]]
        chain_runs = self.ks[cur] > 0 and not self.trees[cur]
        if chains and not chain_runs and self.since_alpha >= self.probe_interval:
            self.since_alpha = 0
            self.probe_interval = min(2 * self.probe_interval, self.probe_max)
            return min(chains, key=lambda p: self.ks[p])  # the cheapest chain measures alpha
        for p in range(len(self.ks)):
            if self.trees[p] and p != cur and self.since_tree[p] >= self.tree_interval[p]:
                self.since_tree[p] = 0
                self.tree_interval[p] = min(2 * self.tree_interval[p], self.probe_max)
                return p
        return None

    def observe(self, program: int, busy: int, wall_s: float, iterations: int, tokens: int, row_steps: int) -> None:
        """What one chunk of ``program`` did with ``busy`` rows."""
        w = self.smoothing
        if iterations > 0 and wall_s > 0:
            ratio = wall_s / iterations / (self.step_time(program, max(busy, 1)) / self.correction)
            self.correction = (1 - w) * self.correction + w * ratio
        k = self.ks[program]
        for p in range(len(self.ks)):
            if self.trees[p] and p != program:
                self.since_tree[p] += 1
        if k > 0 and row_steps > 0:
            decay, tau = 0.5 ** (row_steps / self.half_life), tokens / row_steps  # older evidence fades per row-step
            if self.trees[program]:
                sums = self._tree_sums[program]
                sums[:] = decay * sums[0] + tokens, decay * sums[1] + row_steps
                self.tree_tau[program] = sums[0] / sums[1]
                self.since_tree[program] = 0
                self.since_alpha += 1  # a tree does not measure the chains' alpha
            else:
                sums = self._alpha_sums
                sums[:] = decay * sums[0] + row_steps * alpha_of(tau, k), decay * sums[1] + row_steps
                self.alpha = sums[0] / sums[1]
                self.since_alpha = 0
        elif k == 0 or self.trees[program]:
            self.since_alpha += 1


def make_policy(engine, speculation: str | int, calibration=None):
    """``FixedPolicy`` for one program, else ``AdaptivePolicy`` (calibrated through ``engine``'s
    calls unless ``calibration`` is given)."""
    if len(engine.ks) == 1 or parse_speculation(speculation) != AUTO:
        return FixedPolicy(0)
    calibration = calibration or calibrate(engine)
    trees = [is_tree_drafter(d) and d.num_draft > 0 for d in engine.drafters]
    priors = [(lambda alpha, d=d: tree_prior(d, alpha)) if tree else None for d, tree in zip(engine.drafters, trees)]
    return AdaptivePolicy(engine.ks, trees, calibration, engine.b, priors=priors)


def calibrate(engine, busy_counts: Sequence[int] | None = None) -> list[tuple[float, float]]:
    """Seconds per loop iteration of each chunk program with 1 and with all rows busy.

    Runs through ``engine``'s own calls (so every process of a multi-host group takes part) on
    dummy prompts, one per slot: a repeating 7-token pattern (n-gram drafts find matches) of tokens
    drawn for that slot, so that the rows of a mixture of experts route to different experts as
    real traffic does (identical rows would route a full batch to as few experts as one row, and
    time its verify as if it grew with K as one row's does). The slots are free again afterwards.
    """
    counts = busy_counts or (1, engine.b)
    vocab, length = engine.model.config.vocab_size, min(16, max(engine.s // 4, 2))
    prompts = [[int(t) for t in np.resize(np.random.default_rng(slot).integers(1, vocab, 7), length)]
               for slot in range(max(counts))]
    row = engine.row_inputs(engine.s, (), SamplingParams())
    key = engine.key_data(SamplingParams(), 0)
    out = []
    for p in range(len(engine.ks)):
        times = []
        for busy in counts:
            engine.reset()
            for slot in range(busy):
                stage_prompt(engine, prompts[slot])
                engine.admit(slot, row, key)
            engine.chunk(p)  # the first tokens: returns after one step (and warms the program)
            best = float("inf")
            for _ in range(2):  # the best of two: a stray pause of the host is not the program's cost
                t0 = time.perf_counter()
                res = engine.chunk(p)
                best = min(best, (time.perf_counter() - t0) / max(res.iterations, 1))
            times.append(best)
        out.append((times[0], times[-1]))
    engine.reset()
    return out
