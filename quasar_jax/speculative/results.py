"""What a generation returns: tokens, typed per-row and batch statistics, finish reasons."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


class FinishReason(str, enum.Enum):
    """Why a row stopped: a stop id, its token budget, or a full cache."""

    STOP = "stop"
    LENGTH = "length"
    CACHE_FULL = "cache_full"


FINISH_CODES = (None, FinishReason.STOP, FinishReason.LENGTH, FinishReason.CACHE_FULL)  # 0 = running
STOP, LENGTH, CACHE_FULL = 1, 2, 3  # LoopState.finish codes (indices into FINISH_CODES)


@dataclasses.dataclass(frozen=True)
class RowStats:
    """One row's generation statistics."""

    new_tokens: int
    verify_steps: int
    mean_accepted: float  # tau: tokens emitted per verify step
    emitted_hist: list[int]  # [K+2]: steps that emitted n = 0..K+1 tokens
    finish_reason: str  # a FinishReason value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """Statistics of one ``generate`` call (all rows)."""

    new_tokens: int
    verify_steps: int
    loop_iterations: int
    mean_accepted: float
    wall_s: float  # run time of the compiled program (compile time excluded)
    tokens_per_s: float
    compile_s: float  # 0.0 when the program was already compiled
    cache_len: int
    num_draft: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the verifier's raw logits, and the most likely ids'."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, log p), most likely first


def token_logprobs(token, ids, top, positions, n: int) -> list[TokenLogprob]:
    """``TokenLogprob`` at ``positions`` of one row's ``logits.Logprobs`` fields (``token [T]``,
    ``ids``, ``top [T, NL]``), with ``n`` alternatives."""
    token, ids, top = np.asarray(token), np.asarray(ids), np.asarray(top)
    return [TokenLogprob(float(token[j]), list(zip(ids[j, :n].tolist(), top[j, :n].tolist()))) for j in positions]


@dataclasses.dataclass
class GenerationResult:
    """Generated ids per row (prompt excluded) and statistics; ``logprobs[i]``: one
    ``TokenLogprob`` per generated token of row i, for rows that asked (else None)."""

    tokens: list[list[int]]
    stats: list[RowStats]
    batch_stats: BatchStats
    logprobs: list[list[TokenLogprob] | None] | None = None


def result_of(final, lens: list[int], wall: float, compile_s: float, s: int,
              k: int, logprobs: list[int | None] | None = None) -> GenerationResult:
    """Host-side result of a finished loop (``LoopState`` fields as arrays, rows ``len(lens)``);
    ``logprobs[i]``: alternatives row i asked for (None: no logprobs)."""
    history, lengths = np.asarray(final.history), np.asarray(final.lengths)
    new, steps, hist = np.asarray(final.new_tokens), np.asarray(final.steps), np.asarray(final.emitted_hist)
    finish = np.asarray(final.finish)
    b = len(lens)
    tokens = [history[i, lens[i]:lengths[i]].tolist() for i in range(b)]
    stats = [RowStats(new_tokens=int(new[i]), verify_steps=int(steps[i]),
                      mean_accepted=float(new[i] / max(steps[i], 1)), emitted_hist=hist[i].tolist(),
                      finish_reason=FINISH_CODES[int(finish[i])].value) for i in range(b)]
    total_new, total_steps = int(new.sum()), int(steps.sum())
    batch = BatchStats(new_tokens=total_new, verify_steps=total_steps,
                       loop_iterations=int(final.iteration), mean_accepted=total_new / max(total_steps, 1),
                       wall_s=wall, tokens_per_s=total_new / wall if wall > 0 else float("inf"),
                       compile_s=compile_s, cache_len=s, num_draft=k)
    rows_lp = None
    if logprobs is not None and any(n is not None for n in logprobs):
        lp = final.logprobs
        rows_lp = [None if n is None else token_logprobs(lp.token[i], lp.top_ids[i], lp.top[i],
                                                         range(lens[i], lengths[i]), n)
                   for i, n in enumerate(logprobs)]
    return GenerationResult(tokens=tokens, stats=stats, batch_stats=batch, logprobs=rows_lp)
