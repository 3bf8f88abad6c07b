"""Device side of serving: a fixed set of slots (batch rows) that requests enter and leave.

The slot state is ``SlotState``: the generation loop's ``LoopState`` for ``B`` rows plus every
per-row input of ``make_program``'s ``step`` (token budget, stop ids, sampling settings) as device
arrays. A free slot is a done row (``step`` freezes done rows). Four programs, each compiled once
ahead of time when ``SlotEngine`` is built, so requests coming and going never compile:

* ``prefill(params, staged, tokens [1, C], start, next_tokens [1, C], want, at)``: K/V of one prompt
  piece of ``C`` tokens (``C`` from ``prefill_buckets``; a long prompt is several pieces) into a
  one-row staging cache at slots ``start .. start+C-1``. Pad tokens past the prompt write slots
  that are masked and overwritten later (or dropped past ``S``), exactly as ``Engine``'s padded
  prefill. When ``want`` (a device bool: one program either way) it also returns the logprobs of
  ``next_tokens`` (the prompt shifted by one: echo) and their top alternatives.
* ``admit(slots, cache1, slot, history_row [S], prompt_len, max_new, stop_row, row, key)``:
  copies the staging row into row ``slot`` of the ``[L, B, S, G, E]`` cache
  (``lax.dynamic_update_slice``) and resets that row's loop fields and inputs; ``row`` is the
  request's ``RowSampling`` (one row: sampling, penalties, logit bias, min_tokens, logprobs).
* ``chunk(params, slots)``: a ``lax.while_loop`` of ``step`` until ``N`` steps have run, or a row
  that was running at entry is done, or a newly admitted row has its first tokens, or no row runs.
  Returns the new state, the tokens each row appended (``[B, N*(K+1)]``, from its length at
  entry), their logprobs and top alternatives (``quasar_jax.logits.Logprobs``, fetched to the host
  only when a request asked) and ``n_emit`` per step (``[N, B]``).
* ``finish(slots, mask [B])``: marks rows done (finish reason "stop"): stop strings found on the
  host, cancelled (disconnected) requests.

``slot`` and every per-row value are device data; only (B, S, N, K, prefill bucket, number of
stop ids, drafter, verifier) are static.

A drafter that reads the target's hidden state (S4C) makes the staging area a ``Staging`` (cache
and the hidden state of prompt position P-2, taken from the prefill piece that holds it) and the
slot state carry ``LoopState.hidden``; its params travel with the model's (``program_params``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax import logits as stage
from quasar_jax.drafters import Drafter
from quasar_jax.engine import LoopState, make_program
from quasar_jax.features import program_params, uses_hidden
from quasar_jax.logits import MAX_LOGPROBS, LogitsSpec, Logprobs
from quasar_jax.results import CACHE_FULL, LENGTH, STOP
from quasar_jax.kv_cache import KVCache
from quasar_jax.modes import QuantMode
from quasar_jax.quant import is_quantized
from quasar_jax.sampling import RowSampler, RowSampling, SamplingParams, row_keys

SERVING_SPEC = LogitsSpec(processing=True, penalties=True, max_logprobs=MAX_LOGPROBS)  # a server's loop


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """All device state of the slots (dimension letters of docs/CONVENTIONS.md)."""

    loop: LoopState  # B rows; a done row is a free (or finishing) slot
    max_new: jax.Array  # [B] int32 token budgets
    stop: jax.Array  # [B, NS] int32 stop ids (-1 = none)
    rows: RowSampling  # [B] sampling settings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Staging:
    """One request's prefill: its K/V and (drafters with ``uses_hidden``) the hidden state of
    prompt position P-2 (``[1, D]``, zeros until the piece holding it is prefilled)."""

    cache: KVCache
    hidden: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """Host copy of what one ``chunk`` call produced."""

    tokens: np.ndarray  # [B, N*(K+1)] tokens appended per row (valid: the first appended[b])
    appended: np.ndarray  # [B] tokens appended in this chunk
    emits: np.ndarray  # [N, B] tokens appended by each verify step (0 for steps not run / frozen)
    done: np.ndarray  # [B] bool
    finish: np.ndarray  # [B] int32 FinishReason code (see engine.FINISH_CODES)
    new_tokens: np.ndarray  # [B]
    steps: np.ndarray  # [B] verify steps while active
    iterations: int  # loop iterations run by this chunk
    logprobs: Logprobs | None = None  # [B, N*(K+1)] (, NL) of ``tokens``, when asked for


def prefill_pieces(n: int, buckets: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(start, size)`` pieces that cover ``n`` tokens: full pieces of the largest bucket, then
    the smallest bucket that holds the rest."""
    big, pieces, start = buckets[-1], [], 0
    while n - start > 0:
        rest = n - start
        size = big if rest >= big else next(b for b in buckets if b >= rest)
        pieces.append((start, size))
        start += size
    return pieces


class SlotEngine:
    """The slots of one (model, drafter, verifier) and their compiled programs.

    Not thread-safe: one host thread (the scheduler) drives it.
    """

    def __init__(self, model, drafter: Drafter, verifier: QuantMode | str, *, slots: int, max_len: int,
                 num_stop: int = 4, chunk_steps: int = 8, prefill_buckets: tuple[int, ...] = (32, 128),
                 spec: LogitsSpec = SERVING_SPEC):
        verifier = QuantMode.parse(verifier, "verifier")
        if verifier.is_int8 != is_quantized(model):
            raise ValueError(f"verifier '{verifier}' does not match the model's weights "
                             f"({'int8' if is_quantized(model) else 'float'})")
        if slots < 1 or max_len < 2 or chunk_steps < 1 or num_stop < 1:
            raise ValueError("slots >= 1, max_len >= 2, chunk_steps >= 1 and num_stop >= 1 are required")
        if not prefill_buckets or list(prefill_buckets) != sorted(set(prefill_buckets)) or prefill_buckets[0] < 1:
            raise ValueError(f"prefill_buckets must be increasing positive sizes, got {prefill_buckets!r}")
        if callable(getattr(drafter, "check_model", None)):
            drafter.check_model(model)  # e.g. S4C heads trained for another model
        self.model, self.drafter, self.verifier, self.spec = model, drafter, verifier, spec
        self.hidden = uses_hidden(drafter)
        self.b, self.s, self.n, self.ns = slots, max_len, chunk_steps, num_stop
        self.k = drafter.num_draft
        self.buckets = tuple(min(c, max_len) for c in prefill_buckets)
        self.graphdef, self.params = nnx.split(model)
        self.program_params = program_params(self.params, drafter)
        self._build()

    # ------------------------------------------------------------------ programs
    def _build(self):
        graphdef, verifier, b, s, n, k = self.graphdef, self.verifier, self.b, self.s, self.n, self.k
        cfg, dtype, carry = self.model.config, self.model.dtype, self.hidden
        spec = self.spec
        _, step, _ = make_program(graphdef, self.drafter, RowSampler(), verifier, spec=spec)
        m = n * (k + 1)
        n_top = spec.max_logprobs or 0

        def empty(params) -> SlotState:
            del params
            return SlotState(loop=_empty_loop(cfg, dtype, b, s, k, spec, hidden=carry),
                             max_new=jnp.ones((b,), jnp.int32), stop=jnp.full((b, self.ns), -1, jnp.int32),
                             rows=RowSampling.of([SamplingParams()] * b))

        def prefill(params, staged: Staging, tokens, start, next_tokens, want, at):
            """``at``: the piece index of prompt position P-2 (its hidden state is kept)."""
            model = nnx.merge(graphdef, params)
            c = tokens.shape[1]
            positions = (start + jnp.arange(c, dtype=jnp.int32))[None, :]
            logits, cache1, *out = model(tokens, positions, staged.cache.replace(lengths=jnp.reshape(start, (1,))),
                                         mode=verifier, return_hidden=carry)
            hidden = staged.hidden
            if carry:  # [1, D]
                row = jax.lax.dynamic_slice_in_dim(out[0][0], jnp.clip(at, 0, c - 1), 1)
                hidden = jnp.where((at >= 0) & (at < c), row, hidden)
            empty_lp = stage.empty_logprobs(1, c, n_top)
            lp = jax.lax.cond(want, lambda: stage.token_logprobs(logits, next_tokens, n_top), lambda: empty_lp)
            return Staging(cache1, hidden), lp

        def admit(st: SlotState, staged: Staging, slot, history_row, prompt_len, max_new, stop_row,
                  row: RowSampling, key) -> SlotState:
            lp, cache1 = st.loop, staged.cache
            zero = jnp.zeros((), jnp.int32)
            at = (zero, slot, zero, zero, zero)
            cache = lp.cache.replace(k=jax.lax.dynamic_update_slice(lp.cache.k, cache1.k, at),
                                     v=jax.lax.dynamic_update_slice(lp.cache.v, cache1.v, at))
            lengths = lp.lengths.at[slot].set(prompt_len)
            full = prompt_len >= s
            loop = LoopState(
                history=lp.history.at[slot].set(history_row), lengths=lengths,
                cache=cache.replace(lengths=lengths - 1), done=lp.done.at[slot].set(full),
                finish=lp.finish.at[slot].set(jnp.where(full, CACHE_FULL, 0)),
                new_tokens=lp.new_tokens.at[slot].set(0), steps=lp.steps.at[slot].set(0),
                emitted_hist=lp.emitted_hist.at[slot].set(0), keys=lp.keys.at[slot].set(key),
                iteration=lp.iteration, counts=lp.counts.at[slot].set(0),
                prompt_ids=lp.prompt_ids.at[slot].set(
                    stage.prompt_mask(history_row[None], prompt_len[None], lp.prompt_ids.shape[1])[0]),
                logprobs=lp.logprobs,  # stale logprobs are overwritten before they are read
                hidden=None if lp.hidden is None else lp.hidden.at[slot].set(staged.hidden[0]))
            rows = jax.tree.map(lambda all_rows, one: all_rows.at[slot].set(one[0]), st.rows, row)
            return SlotState(loop=loop, max_new=st.max_new.at[slot].set(max_new),
                             stop=st.stop.at[slot].set(stop_row), rows=rows)

        def chunk(params, st: SlotState):
            start_done, start_len, start_it = st.loop.done, st.loop.lengths, st.loop.iteration
            fresh = ~start_done & (st.loop.new_tokens == 0)  # admitted since the last chunk

            def cond(carry):
                i, lp, _ = carry
                finished = jnp.any(lp.done & ~start_done)
                first_tokens = jnp.any(fresh & (lp.new_tokens > 0))  # return them at once (TTFT)
                return (i < n) & jnp.any(~lp.done) & ~finished & ~first_tokens

            def body(carry):
                i, lp, emits = carry
                new = step(params, lp, st.max_new, st.stop, st.rows)
                return i + 1, new, emits.at[i].set(new.lengths - lp.lengths)

            _, loop, emits = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), st.loop,
                                                             jnp.zeros((n, b), jnp.int32)))
            idx = jnp.clip(start_len[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :], 0, s - 1)
            tokens = jnp.take_along_axis(loop.history, idx, axis=1)  # [B, N*(K+1)]
            if spec.max_logprobs is None:
                logprobs = stage.empty_logprobs(b, m, 0)
            else:  # the same positions of the logprob buffers
                logprobs = jax.tree.map(lambda buf: jnp.take_along_axis(
                    buf, idx.reshape(idx.shape + (1,) * (buf.ndim - 2)), axis=1), loop.logprobs)
            out = (tokens, loop.lengths - start_len, emits, loop.done, loop.finish, loop.new_tokens,
                   loop.steps, loop.iteration - start_it)
            return dataclasses.replace(st, loop=loop), out, logprobs

        def finish(st: SlotState, mask) -> SlotState:
            lp = st.loop
            loop = dataclasses.replace(lp, done=lp.done | mask,
                                       finish=jnp.where(mask & ~lp.done, STOP, lp.finish).astype(jnp.int32))
            return dataclasses.replace(st, loop=loop)

        i32 = jnp.int32
        sds = jax.ShapeDtypeStruct
        abstract_state = jax.eval_shape(empty, None)
        def new_staging() -> Staging:
            return Staging(KVCache.init(cfg, 1, s, dtype),
                           jnp.zeros((1, cfg.hidden_size), dtype) if carry else None)

        staging1 = jax.eval_shape(new_staging)
        key1 = jax.eval_shape(lambda: jax.random.key(0))
        scalar = sds((), i32)
        self._empty = jax.jit(empty)
        self._cache1 = jax.jit(new_staging)
        self._prefill = {c: jax.jit(prefill, donate_argnums=(1,)).lower(
            self.params, staging1, sds((1, c), i32), scalar, sds((1, c), i32), sds((), jnp.bool_), scalar).compile()
            for c in sorted(set(self.buckets))}
        self._admit = jax.jit(admit, donate_argnums=(0,)).lower(
            abstract_state, staging1, scalar, sds((s,), i32), scalar, scalar, sds((self.ns,), i32),
            RowSampling.abstract(1), key1).compile()
        self._chunk = jax.jit(chunk, donate_argnums=(1,)).lower(self.program_params, abstract_state).compile()
        self._finish = jax.jit(finish, donate_argnums=(0,)).lower(abstract_state, sds((b,), jnp.bool_)).compile()
        self.state = self._empty(None)
        self.new_staging()  # compile the small helpers now, not at the first request
        self.key_for(SamplingParams(), 0, index=1)

    @property
    def num_programs(self) -> int:
        return len(self._prefill) + 3

    # ------------------------------------------------------------------ host API
    def reset(self) -> None:
        """Every slot free (after a failure)."""
        self.state = self._empty(None)

    def new_staging(self) -> Staging:
        return self._cache1()

    def _run_prefill(self, cache1: Staging, prompt: list[int], start: int, size: int, want: bool):
        piece = np.zeros((2, size), np.int32)  # the piece and the tokens each position predicts
        for row, at in enumerate((start, start + 1)):
            part = prompt[at:at + size]
            piece[row, :len(part)] = part
        return self._prefill[size](self.params, cache1, jnp.asarray(piece[:1]), jnp.int32(start),
                                   jnp.asarray(piece[1:]), jnp.asarray(want), jnp.int32(len(prompt) - 2 - start))

    def prefill(self, cache1: Staging, prompt: list[int], start: int, size: int) -> Staging:
        """Prefill ``prompt[start:start+size]`` (padded) into the staging area."""
        return self._run_prefill(cache1, prompt, start, size, False)[0]

    def prefill_logprobs(self, cache1: Staging, prompt: list[int], start: int,
                         size: int) -> tuple[Staging, Logprobs]:
        """``prefill``, plus the host logprobs ``[size]`` (and top ``[size, NL]``) of
        ``prompt[start+1 : start+size+1]`` under the raw logits of the positions before them."""
        if self.spec.max_logprobs is None:
            raise ValueError("this slot engine was built without logprobs")
        cache1, lp = self._run_prefill(cache1, prompt, start, size, True)
        return cache1, jax.tree.map(lambda x: x[0], jax.device_get(lp))

    def check(self, sampling: SamplingParams) -> None:
        """``ValueError`` when this engine's programs cannot serve ``sampling``."""
        if (sampling.penalized and not self.spec.penalties) or (sampling.processed and not self.spec.processing):
            raise ValueError("this slot engine was built without penalties, logit bias and min_tokens")
        if sampling.logprobs is not None and (self.spec.max_logprobs or 0) < sampling.logprobs:
            raise ValueError(f"this slot engine returns at most {self.spec.max_logprobs or 0} logprobs")

    def admit(self, cache1: Staging, slot: int, prompt: list[int], max_new: int, stop_ids: tuple[int, ...],
              sampling: SamplingParams, key) -> None:
        self.check(sampling)
        if len(stop_ids) > self.ns:
            raise ValueError(f"{len(stop_ids)} stop ids; this slot engine holds {self.ns}")
        history = np.zeros((self.s,), np.int32)
        history[:len(prompt)] = prompt
        stop = np.full((self.ns,), -1, np.int32)
        stop[:len(stop_ids)] = stop_ids
        self.state = self._admit(self.state, cache1, jnp.int32(slot), jnp.asarray(history),
                                 jnp.int32(len(prompt)), jnp.int32(max_new), jnp.asarray(stop),
                                 RowSampling.of([sampling]), key)

    def chunk(self, logprobs: bool = False) -> ChunkResult:
        """One chunk; ``logprobs``: also fetch the appended tokens' logprobs (when a request asked)."""
        self.state, out, lp = self._chunk(self.program_params, self.state)
        tokens, appended, emits, done, finish, new_tokens, steps, iters = jax.device_get(out)
        return ChunkResult(tokens, appended, emits, done, finish, new_tokens, steps, int(iters),
                           jax.device_get(lp) if logprobs else None)

    def finish(self, slots: list[int]) -> None:
        mask = np.zeros((self.b,), bool)
        mask[slots] = True
        self.state = self._finish(self.state, jnp.asarray(mask))

    @staticmethod
    def key_for(sampling: SamplingParams, seed: int, index: int = 0):
        """The PRNG key of one request's choice ``index``: from the request's own seed alone when it
        has one; choices after the first fold their index in (different, reproducible)."""
        key = row_keys([sampling], seed)[0]
        return key if index == 0 else jax.random.fold_in(key, index)


def _empty_loop(cfg, dtype, b: int, s: int, k: int, spec: LogitsSpec, *, hidden: bool = False) -> LoopState:
    """A ``LoopState`` with every row done (every slot free); ``hidden``: it carries ``[B, D]``."""
    zeros = jnp.zeros((b,), jnp.int32)
    v = cfg.vocab_size if spec.penalties else 0
    return LoopState(history=jnp.zeros((b, s), jnp.int32), lengths=jnp.ones((b,), jnp.int32),
                     cache=KVCache.init(cfg, b, s, dtype), done=jnp.ones((b,), bool),
                     finish=jnp.full((b,), LENGTH, jnp.int32), new_tokens=zeros, steps=zeros,
                     emitted_hist=jnp.zeros((b, k + 2), jnp.int32),
                     keys=jax.random.split(jax.random.key(0), b), iteration=jnp.zeros((), jnp.int32),
                     counts=jnp.zeros((b, v), jnp.int32), prompt_ids=jnp.zeros((b, v), bool),
                     logprobs=stage.empty_logprobs(b, s, spec.max_logprobs),
                     hidden=jnp.zeros((b, cfg.hidden_size), dtype) if hidden else None)
