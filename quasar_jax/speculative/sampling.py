"""How the verifier's logits become emitted tokens: per-row sampling settings and the samplers.

* :class:`SamplingParams` is one row's (one request's) host-side setting: temperature (0 =
  greedy), top-k, top-p, min-p, an optional seed, and the logits stage's settings (penalties,
  logit bias, min_tokens, logprobs; ``quasar_jax.speculative.logits``). It is validated on construction.
* :class:`RowSampling` holds those settings for a whole batch as device arrays (``[B]`` each,
  ``[B, MAX_LOGIT_BIAS]`` for the bias), so one compiled program serves any values and the rows of
  one batch may differ.
* A sampler turns ``(draft, n_draft, logits)`` into ``(tokens [B, K+1], n_emit [B])`` (see
  ``quasar_jax.speculative.accept``). :class:`GreedySampler` is the all-greedy program (no sort, no random
  numbers). :class:`RowSampler` serves any mix: rows with temperature 0 take exactly the greedy
  rule's result (so a greedy row of a mixed batch equals the all-greedy output), the others exact
  speculative sampling with their own temperature / top-k / top-p and their own PRNG key.

Seeds: a row with its own ``seed`` draws from a key derived from that seed alone, so its tokens do
not depend on the batch around it; rows without one use the batch seed folded with the row index.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quasar_jax.speculative.accept import (greedy_accept, greedy_tree_accept, process_logits, sample_tokens,
                                          speculative_sample, speculative_tree_sample)
from quasar_jax.speculative.logits import MAX_LOGIT_BIAS, MAX_LOGPROBS
from quasar_jax.speculative.tree import TreeDraft

SEED_RANGE = (-2**63, 2**63)


def is_int(x) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_seed(seed, what: str = "seed") -> None:
    if not is_int(seed) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"{what} must be a 64-bit integer, got {seed!r}")


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and x == x  # not NaN


def check_sampling(temperature, top_k, top_p, min_p=0.0) -> None:
    """One-line ``ValueError`` naming the first bad sampling value."""
    if not _real(temperature) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    if not _real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _real(min_p) or not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")


def _check_logits_stage(p: "SamplingParams") -> tuple[tuple[int, float], ...]:
    """Validate the logits stage's settings; the logit bias as sorted ``(id, value)`` pairs."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(p, name)
        if not _real(v) or not -2 <= v <= 2:
            raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
    if not _real(p.repetition_penalty) or not 0 < p.repetition_penalty <= 100:
        raise ValueError(f"repetition_penalty must be in (0, 100], got {p.repetition_penalty!r}")
    if not is_int(p.min_tokens) or p.min_tokens < 0:
        raise ValueError(f"min_tokens must be an integer >= 0, got {p.min_tokens!r}")
    if p.logprobs is not None and (not is_int(p.logprobs) or not 0 <= p.logprobs <= MAX_LOGPROBS):
        raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {p.logprobs!r}")
    bias = p.logit_bias
    pairs = list(bias.items()) if isinstance(bias, dict) else bias
    if not isinstance(pairs, (list, tuple)) or len(pairs) > MAX_LOGIT_BIAS or not all(
            isinstance(e, (tuple, list)) and len(e) == 2 for e in pairs):
        raise ValueError(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to values, got {bias!r}")
    for tok, value in pairs:
        if not is_int(tok) or not 0 <= tok < 2**31:
            raise ValueError(f"logit_bias token id {tok!r} is not a non-negative int32")
        if not _real(value) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias value for token {tok} must be in [-100, 100], got {value!r}")
    if len({int(t) for t, _ in pairs}) != len(pairs):
        raise ValueError("logit_bias lists a token id twice")
    return tuple(sorted((int(t), float(v)) for t, v in pairs))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One row's sampling settings (temperature 0 = greedy; ``seed=None``: the batch's seed).

    The logits stage (``quasar_jax.speculative.logits``, vLLM's semantics): ``presence_penalty`` /
    ``frequency_penalty`` in [-2, 2] over generated tokens, ``repetition_penalty`` > 0 over prompt
    and generated tokens (1 = off), ``min_tokens`` (stop ids masked until that many tokens are
    generated), ``logit_bias`` ({token id: value in [-100, 100]}, at most 300; kept as sorted
    pairs). ``logprobs``: None, or return each generated token's log-probability under the
    verifier's raw logits with this many (0-20) most likely alternatives.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] | dict = ()
    logprobs: int | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        if self.seed is not None:
            check_seed(self.seed)
        object.__setattr__(self, "logit_bias", _check_logits_stage(self))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a penalty is on (the loop then needs token counts)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processed(self) -> bool:
        """Whether the loop's logits stage has work for this row (penalties, bias, min_tokens)."""
        return self.penalized or self.min_tokens > 0 or bool(self.logit_bias)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Per-row sampling settings as device arrays (dimension letters of docs/CONVENTIONS.md)."""

    temperature: jax.Array  # [B] float32; 0 = greedy row
    top_k: jax.Array  # [B] int32; 0 = off
    top_p: jax.Array  # [B] float32; 1 = off
    min_p: jax.Array  # [B] float32; 0 = off
    presence_penalty: jax.Array  # [B] float32; 0 = off
    frequency_penalty: jax.Array  # [B] float32; 0 = off
    repetition_penalty: jax.Array  # [B] float32; 1 = off
    min_tokens: jax.Array  # [B] int32; 0 = off
    bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS] int32; -1 = unused entry
    bias_values: jax.Array  # [B, MAX_LOGIT_BIAS] float32
    logprobs: jax.Array  # [B] int32: alternatives wanted per token; -1 = no logprobs

    @classmethod
    def of(cls, rows: Sequence[SamplingParams]) -> "RowSampling":
        return jax.tree.map(jnp.asarray, cls.host(rows))

    @classmethod
    def host(cls, rows: Sequence[SamplingParams]) -> "RowSampling":
        """The same settings as NumPy arrays (what a host sends once per admission)."""
        b = len(rows)
        bias_ids = np.full((b, MAX_LOGIT_BIAS), -1, np.int32)
        bias_values = np.zeros((b, MAX_LOGIT_BIAS), np.float32)
        for i, r in enumerate(rows):
            for j, (tok, value) in enumerate(r.logit_bias):
                bias_ids[i, j], bias_values[i, j] = tok, value

        def col(name, dtype):
            return np.array([getattr(r, name) for r in rows], dtype)

        return cls(temperature=col("temperature", np.float32), top_k=col("top_k", np.int32),
                   top_p=col("top_p", np.float32), min_p=col("min_p", np.float32),
                   presence_penalty=col("presence_penalty", np.float32),
                   frequency_penalty=col("frequency_penalty", np.float32),
                   repetition_penalty=col("repetition_penalty", np.float32),
                   min_tokens=col("min_tokens", np.int32), bias_ids=bias_ids, bias_values=bias_values,
                   logprobs=np.array([-1 if r.logprobs is None else r.logprobs for r in rows], np.int32))

    @classmethod
    def abstract(cls, b: int) -> "RowSampling":
        return jax.eval_shape(lambda: cls.of([SamplingParams()] * b))


@jax.jit
def _keys_from_seeds(lo: jax.Array, hi: jax.Array, salt: jax.Array) -> jax.Array:
    def one(lo_, hi_, salt_):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(lo_), hi_), salt_)
    return jax.vmap(one)(lo, hi, salt)


def row_keys(rows: Sequence[SamplingParams], batch_seed: int) -> jax.Array:
    """``[B]`` PRNG keys: a row's own seed, else the batch seed folded with the row index."""
    seeds = np.array([batch_seed if r.seed is None else r.seed for r in rows], dtype=object)
    seeds = np.array([int(s) % 2**64 for s in seeds], dtype=np.uint64)
    salt = np.array([i + 1 if r.seed is None else 0 for i, r in enumerate(rows)], np.uint32)
    return _keys_from_seeds(jnp.asarray((seeds & 0xFFFFFFFF).astype(np.uint32)),
                            jnp.asarray((seeds >> np.uint64(32)).astype(np.uint32)), jnp.asarray(salt))


class Sampler(Protocol):
    """Acceptance rule of one verify step (a hashable value: part of the compiled program's key)."""

    def accept(self, draft: jax.Array, n_draft: jax.Array, logits: jax.Array, rows: RowSampling,
               keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        """draft [B, K], n_draft [B], logits [B, K+1, V], keys [B] -> tokens [B, K+1], n_emit [B]."""

    def accept_tree(self, tree: TreeDraft, valid: jax.Array, logits: jax.Array, rows: RowSampling,
                    keys: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Tree drafts (``quasar_jax.speculative.tree``): valid [B, N], logits [B, N+1, V] ->
        tokens [B, K+1], n_emit [B], path [B, K]."""


@dataclasses.dataclass(frozen=True)
class GreedySampler:
    """Every row greedy: longest draft prefix equal to the argmax, plus the argmax bonus token."""

    def accept(self, draft, n_draft, logits, rows, keys):
        del rows, keys
        return greedy_accept(draft, n_draft, logits)

    def accept_tree(self, tree, valid, logits, rows, keys):
        del rows, keys
        return greedy_tree_accept(tree, valid, logits)


@dataclasses.dataclass(frozen=True)
class RowSampler:
    """Per-row settings: greedy rows exactly greedy, the others exact speculative sampling.

    A step in which every row is greedy (finished rows count as greedy: the loop zeroes their
    temperature) takes the greedy rule alone through a device-side ``lax.cond``, skipping the
    per-row sort over the vocabulary; greedy rows get the same tokens either way.
    """

    def accept(self, draft, n_draft, logits, rows, keys):
        def sampled():
            b, k = draft.shape
            g_tokens, g_emit = greedy_accept(draft, n_draft, logits)
            greedy, probs = _row_probs(logits, rows)  # [B], [B, K+1, V]
            if k == 0:
                tokens = jax.vmap(sample_tokens)(probs[:, 0], keys)[:, None]  # [B, 1]
                n_emit = jnp.ones((b,), jnp.int32)
            else:
                tokens, n_emit = speculative_sample(draft, n_draft, probs, keys)
            return jnp.where(greedy[:, None], g_tokens, tokens), jnp.where(greedy, g_emit, n_emit)

        return _greedy_or(rows, lambda: greedy_accept(draft, n_draft, logits), sampled)

    def accept_tree(self, tree, valid, logits, rows, keys):
        def sampled():
            greedy_out = greedy_tree_accept(tree, valid, logits)
            greedy, probs = _row_probs(logits, rows)  # [B], [B, N+1, V]
            return tuple(jnp.where(greedy.reshape((-1,) + (1,) * (g.ndim - 1)), g, x)
                         for g, x in zip(greedy_out, speculative_tree_sample(tree, valid, probs, keys)))

        return _greedy_or(rows, lambda: greedy_tree_accept(tree, valid, logits), sampled)


def _greedy_or(rows: RowSampling, greedy, sampled):
    """``greedy()`` when every row is greedy, else ``sampled()`` (int32 outputs either way)."""
    def as_int32(fn):
        return lambda: tuple(x.astype(jnp.int32) for x in fn())
    return jax.lax.cond(jnp.all(rows.temperature <= 0), as_int32(greedy), as_int32(sampled))


def _row_probs(logits, rows: RowSampling) -> tuple[jax.Array, jax.Array]:
    """Greedy rows ``[B]``, per-row processed distributions ``[B, T, V]`` (temperature 1 if greedy)."""
    greedy = rows.temperature <= 0  # [B]
    probs = process_logits(logits, temperature=jnp.where(greedy, 1.0, rows.temperature)[:, None],
                           top_k=rows.top_k[:, None], top_p=rows.top_p[:, None],
                           min_p=rows.min_p[:, None])  # [B, T, V]
    return greedy, probs


def sampler_for(rows: Sequence[SamplingParams]) -> Sampler:
    """The cheapest sampler that serves these rows."""
    return GreedySampler() if all(r.greedy for r in rows) else RowSampler()
