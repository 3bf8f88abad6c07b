"""Speculative generation: prefill, then ONE ``lax.while_loop`` that drafts, verifies, accepts.

Sequence bookkeeping (per row b)::

    history[b, :lengths[b]]   prompt + generated tokens (int32)
    cache.lengths[b]          = lengths[b] - 1: every token but the last has its K/V in the cache

One loop iteration (all rows at once, static shapes, no host round trip):

1. draft   ``draft [B, K], n_draft [B]`` from the drafter (n-gram lookup, QSpec's W8A8 path, none)
2. verify  forward ``[last, draft_0..draft_{K-1}]`` at positions ``lengths-1 .. lengths-1+K``
           (each row at its own offset) -> logits ``[B, K+1, V]``; K/V of all K+1 are written
3. accept  greedy prefix match, or exact speculative sampling -> ``tokens [B, K+1], n_emit [B]``
4. commit  truncate at the token budget / stop ids, append, ``lengths += n_emit``. Rejected K/V
           stay in the cache past ``lengths - 1``: they are hidden by the mask and overwritten by
           the next verify pass (rollback is free); the bonus token's K/V is written next step.

A row stops on a stop id (EOS), on ``max_new_tokens``, or when its sequence fills the cache
(``lengths == S``). Plain autoregressive decoding is the same loop with ``drafter="none"`` (K = 0).
The prompt's last token is not prefilled: it is the first token the loop verifies, so drafts are
used from the first step on.

The compiled program depends on (batch, prompt bucket, cache length S, K, drafter, modes,
sampling); ``Engine`` compiles each such shape once (ahead of time, so compile time is measured
separately from run time) and reuses it across calls.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax.accept import greedy_accept, process_logits, sample_tokens, speculative_sample
from quasar_jax.drafting import _check_args as _check_ngram_args
from quasar_jax.drafting import ngram_draft
from quasar_jax.kv_cache import KVCache
from quasar_jax.model import Qwen3

DRAFTERS = ("none", "ngram", "qspec")
VERIFIERS = ("fp", "w8a16", "w8a8")
PROMPT_BUCKET = 32  # default prompt padding multiple (coarser: fewer programs, more padded prefill)
CACHE_BUCKET = 128  # default cache lengths are rounded up to a multiple of this


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how. All fields are validated by ``validate``."""

    max_new_tokens: int = 128
    drafter: str = "ngram"  # none | ngram | qspec
    num_draft: int = 5  # K (ignored for drafter="none")
    ngram_min: int = 1
    ngram_max: int = 3
    ngram_prefer: str = "recent"  # which earlier occurrence wins: recent | earliest
    verifier: str = "fp"  # fp | w8a16 | w8a8: quant_mode of the verify (and AR) forward
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    max_len: int | None = None  # cache slots S; None = prompt + max_new_tokens rounded up
    seed: int = 0

    @property
    def k(self) -> int:
        return 0 if self.drafter == "none" else self.num_draft

    @property
    def quant_mode(self) -> str | None:
        return None if self.verifier == "fp" else self.verifier

    def validate(self) -> "GenerationConfig":
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.drafter!r}; choose one of {', '.join(DRAFTERS)}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"unknown verifier {self.verifier!r}; choose one of {', '.join(VERIFIERS)}")
        if self.drafter == "ngram":
            _check_ngram_args(self.num_draft, self.ngram_min, self.ngram_max, self.ngram_prefer)
        elif self.drafter == "qspec" and (not _is_int(self.num_draft) or self.num_draft < 1):
            raise ValueError(f"num_draft must be an integer >= 1, got {self.num_draft!r}")
        if not isinstance(self.stop_ids, (tuple, list)) or not all(
                _is_int(t) and 0 <= t < 2**31 for t in self.stop_ids):
            raise ValueError(f"stop_ids must be a tuple of non-negative int32 token ids, got {self.stop_ids!r}")
        if not _is_int(self.seed) or not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if self.drafter == "qspec" and self.verifier != "w8a16":
            raise ValueError("drafter 'qspec' drafts with w8a8 and verifies with w8a16: use verifier='w8a16'")
        if isinstance(self.temperature, bool) or not (
                isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_len is not None and (not _is_int(self.max_len) or self.max_len < 2):
            raise ValueError(f"max_len must be an integer >= 2, got {self.max_len!r}")
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
    """Carry of the generation ``while_loop`` (dimension letters of docs/CONVENTIONS.md)."""

    history: jax.Array  # [B, S] int32: prompt + generated tokens
    lengths: jax.Array  # [B] int32: valid tokens in history
    cache: KVCache  # K/V of history[:, :lengths-1]
    done: jax.Array  # [B] bool
    new_tokens: jax.Array  # [B] int32: tokens generated so far
    steps: jax.Array  # [B] int32: verify steps while the row was active
    emitted_hist: jax.Array  # [B, K+2] int32: count of steps that emitted n tokens (n = 0..K+1)
    key: jax.Array  # PRNG key
    iteration: jax.Array  # [] int32


@dataclasses.dataclass
class GenerationResult:
    """Generated ids per row (prompt excluded) and statistics."""

    tokens: list[list[int]]
    stats: list[dict]  # per row: new_tokens, verify_steps, mean_accepted, emitted_hist
    batch_stats: dict  # new_tokens, verify_steps, mean_accepted, wall_s, tokens_per_s, compile_s


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` that is >= ``x`` (shape buckets)."""
    return -(-x // m) * m


# ----------------------------------------------------------------------------- the device program
def make_program(graphdef, cfg: GenerationConfig, stream: Callable | None = None):
    """The device functions of one generation config, to be jitted by the caller.

    Returns ``(init, step, run)``: ``init(params, prompt [B, P], prompt_lens [B], S, key)`` prefills
    and gives the first ``LoopState``; ``step(params, state, max_new [], stop [NS])`` is one loop
    iteration; ``run(params, prompt, prompt_lens, S, max_new, stop, key)`` is ``init`` followed by
    the ``while_loop`` of ``step`` until every row is done (what ``Engine`` compiles).
    """
    k = cfg.k
    mode = cfg.quant_mode
    greedy = cfg.temperature == 0

    def draft_fn(model, state: LoopState):
        b = state.lengths.shape[0]
        if cfg.drafter == "none":
            return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32), state.cache
        if cfg.drafter == "ngram":
            draft, n_draft = ngram_draft(state.history, state.lengths, num_draft=k,
                                         ngram_min=cfg.ngram_min, ngram_max=cfg.ngram_max,
                                         prefer=cfg.ngram_prefer)
            return draft, n_draft, state.cache
        # QSpec: K greedy single-token steps on the W8A8 path, sharing the verifier's cache. Their
        # K/V land in the slots the verify pass rewrites next, so nothing needs undoing.
        last = jnp.take_along_axis(state.history, state.lengths[:, None] - 1, axis=1)  # [B, 1]

        def one(i, carry):
            tok, cache, draft = carry
            pos = state.lengths[:, None] - 1 + i  # [B, 1]
            logits, cache = model(tok, pos, cache, quant_mode="w8a8")
            tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]  # [B, 1]
            return tok, cache, draft.at[:, i].set(tok[:, 0])

        cache = state.cache.replace(lengths=state.lengths - 1)
        _, cache, draft = jax.lax.fori_loop(0, k, one, (last, cache, jnp.zeros((b, k), jnp.int32)))
        return draft, jnp.full((b,), k, jnp.int32), cache

    def body(model, state: LoopState, max_new, stop) -> LoopState:
        b, s = state.history.shape
        key, k_sample = jax.random.split(state.key)
        draft, n_draft, cache = draft_fn(model, state)
        # Never propose past the cache (each emitted token needs a history slot) or the budget.
        room = jnp.minimum(s - state.lengths, max_new - state.new_tokens) - 1  # [B]
        n_draft = jnp.clip(jnp.minimum(n_draft, room), 0, k)

        last = jnp.take_along_axis(state.history, state.lengths[:, None] - 1, axis=1)  # [B, 1]
        verify_tokens = jnp.concatenate([last, draft], axis=1)  # [B, K+1]
        positions = state.lengths[:, None] - 1 + jnp.arange(k + 1, dtype=jnp.int32)  # [B, K+1]
        cache = cache.replace(lengths=state.lengths - 1)
        logits, cache = model(verify_tokens, positions, cache, quant_mode=mode)  # [B, K+1, V]

        if greedy:
            tokens, n_emit = greedy_accept(draft, n_draft, logits)
        else:
            probs = process_logits(logits, temperature=float(cfg.temperature), top_k=cfg.top_k,
                                   top_p=float(cfg.top_p))
            if k == 0:
                tokens, n_emit = sample_tokens(probs, k_sample), jnp.ones((b,), jnp.int32)
            else:
                tokens, n_emit = speculative_sample(draft, n_draft, probs, k_sample)

        # Stop ids: emit up to and including the first one.
        j = jnp.arange(k + 1, dtype=jnp.int32)[None, :]  # [1, K+1]
        is_stop = jnp.any(tokens[:, :, None] == stop[None, None, :], axis=-1) & (j < n_emit[:, None])
        first_stop = jnp.min(jnp.where(is_stop, j, k + 1), axis=1)  # [B]
        hit_stop = first_stop <= k
        n_emit = jnp.where(hit_stop, first_stop + 1, n_emit)
        n_emit = jnp.where(state.done, 0, n_emit)  # finished rows are frozen

        write_at = jnp.where(j < n_emit[:, None], state.lengths[:, None] + j, s)  # s = dropped
        history = state.history.at[jnp.arange(b)[:, None], write_at].set(tokens, mode="drop")
        lengths = state.lengths + n_emit
        new_tokens = state.new_tokens + n_emit
        active = (~state.done).astype(jnp.int32)
        done = state.done | hit_stop | (new_tokens >= max_new) | (lengths >= s)
        if stream is not None:
            jax.experimental.io_callback(stream, None, tokens, n_emit, ordered=True)
        return LoopState(
            history=history, lengths=lengths, cache=cache.replace(lengths=lengths - 1), done=done,
            new_tokens=new_tokens, steps=state.steps + active,
            emitted_hist=state.emitted_hist.at[jnp.arange(b), n_emit].add(active),
            key=key, iteration=state.iteration + 1)

    def init(params, prompt, prompt_lens, max_len_static: int, key) -> LoopState:
        """Prefill every prompt token but each row's last one; the loop's state before step 1."""
        model = nnx.merge(graphdef, params)
        b, p = prompt.shape
        s = max_len_static
        cache = KVCache.init(model.config, b, s, model.dtype)
        if p > 1:
            positions = jnp.broadcast_to(jnp.arange(p - 1, dtype=jnp.int32), (b, p - 1))
            _, cache = model(prompt[:, :-1], positions, cache, quant_mode=mode)
        history = jnp.zeros((b, s), jnp.int32).at[:, :p].set(prompt)
        return LoopState(
            history=history, lengths=prompt_lens, cache=cache.replace(lengths=prompt_lens - 1),
            done=jnp.zeros((b,), bool) | (prompt_lens >= s), new_tokens=jnp.zeros((b,), jnp.int32),
            steps=jnp.zeros((b,), jnp.int32), emitted_hist=jnp.zeros((b, k + 2), jnp.int32),
            key=key, iteration=jnp.zeros((), jnp.int32))

    def step(params, state: LoopState, max_new, stop) -> LoopState:
        """One draft-verify-accept-commit iteration (the loop body)."""
        return body(nnx.merge(graphdef, params), state, max_new, stop)

    def run(params, prompt, prompt_lens, max_len_static: int, max_new, stop, key) -> LoopState:
        model = nnx.merge(graphdef, params)
        state = init(params, prompt, prompt_lens, max_len_static, key)
        return jax.lax.while_loop(lambda st: jnp.any(~st.done),
                                  lambda st: body(model, st, max_new, stop), state)

    return init, step, run


# ----------------------------------------------------------------------------- host side
class Engine:
    """Holds a model split into (graph, params) and the compiled programs, one per shape bucket."""

    def __init__(self, model: Qwen3, *, prompt_bucket: int = PROMPT_BUCKET):
        if not isinstance(prompt_bucket, int) or prompt_bucket < 1:
            raise ValueError(f"prompt_bucket must be a positive integer, got {prompt_bucket!r}")
        self.model = model
        self.prompt_bucket = prompt_bucket  # prompts are right-padded to a multiple of this
        self.graphdef, self.params = nnx.split(model)
        self._compiled: dict = {}
        from quasar_jax.quant import is_quantized  # AQT is imported only here, not per call

        self.quantized = is_quantized(model)
        self._stream_target: Callable | None = None  # the current call's stream callback

    def _stream(self, tokens, n_emit) -> None:
        """The one host callback compiled into streaming programs; forwards to this call's."""
        if self._stream_target is not None:
            self._stream_target(tokens, n_emit)

    def _program(self, cfg: GenerationConfig, b: int, p: int, s: int, n_stop: int, stream: bool):
        static = dataclasses.replace(cfg, max_new_tokens=1, stop_ids=(), max_len=None, seed=0)
        key = (static, b, p, s, n_stop, stream)
        if key in self._compiled:
            return self._compiled[key], 0.0
        _, _, run = make_program(self.graphdef, static, self._stream if stream else None)
        jitted = jax.jit(run, static_argnums=(3,))
        t0 = time.perf_counter()
        compiled = jitted.lower(
            self.params, jax.ShapeDtypeStruct((b, p), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
            s, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((n_stop,), jnp.int32),
            jax.random.key(0)).compile()
        compile_s = time.perf_counter() - t0
        self._compiled[key] = compiled
        return compiled, compile_s

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
                 *, stream: Callable | None = None) -> GenerationResult:
        """Generate for a batch of token-id prompts (ragged lengths allowed)."""
        cfg = (config or GenerationConfig()).validate()
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        lens = [len(p) for p in prompts]
        if min(lens) == 0:
            raise ValueError(f"prompt {lens.index(0)} is empty")
        if cfg.verifier == "fp" and self.quantized:
            raise ValueError("this model holds int8 weights: use verifier 'w8a16' or 'w8a8'")
        if cfg.verifier != "fp" and not self.quantized:
            raise ValueError(f"verifier {cfg.verifier!r} needs an int8 model "
                             "(load_model(..., quantize='int8') or quant.quantize_model)")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            bad = [t for t in p if not (_is_int(t) and 0 <= t < vocab)]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]!r}: ids must be integers in [0, {vocab})")
        longest = max(lens)
        s = cfg.max_len or round_up(longest + cfg.max_new_tokens, CACHE_BUCKET)
        if longest >= s:
            raise ValueError(f"prompt of {longest} tokens does not fit in a cache of {s} slots "
                             "(needs at least one free slot); raise max_len")
        b = len(prompts)
        p = min(round_up(longest, self.prompt_bucket), s)
        prompt = np.zeros((b, p), np.int32)
        for i, row in enumerate(prompts):
            prompt[i, :len(row)] = np.asarray(row, np.int32)
        stop = np.asarray(cfg.stop_ids or (-1,), np.int32)
        program, compile_s = self._program(cfg, b, p, s, len(stop), stream is not None)
        self._stream_target = stream

        args = (self.params, jnp.asarray(prompt), jnp.asarray(lens, jnp.int32),
                jnp.asarray(cfg.max_new_tokens, jnp.int32), jnp.asarray(stop),
                jax.random.key(cfg.seed))
        t0 = time.perf_counter()
        try:
            final = jax.block_until_ready(program(*args))
        finally:
            self._stream_target = None
        wall = time.perf_counter() - t0

        history, lengths = np.asarray(final.history), np.asarray(final.lengths)
        new, steps, hist = np.asarray(final.new_tokens), np.asarray(final.steps), np.asarray(final.emitted_hist)
        tokens = [history[i, lens[i]:lengths[i]].tolist() for i in range(b)]
        stats = [{"new_tokens": int(new[i]), "verify_steps": int(steps[i]),
                  "mean_accepted": float(new[i] / max(steps[i], 1)),
                  "emitted_hist": hist[i].tolist()} for i in range(b)]
        total_new, total_steps = int(new.sum()), int(steps.sum())
        batch_stats = {"new_tokens": total_new, "verify_steps": total_steps,
                       "loop_iterations": int(final.iteration),
                       "mean_accepted": total_new / max(total_steps, 1), "wall_s": wall,
                       "tokens_per_s": total_new / wall if wall > 0 else float("inf"),
                       "compile_s": compile_s, "cache_len": s, "num_draft": cfg.k}
        return GenerationResult(tokens=tokens, stats=stats, batch_stats=batch_stats)


def generate(model: Qwen3, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
             **kwargs) -> GenerationResult:
    """One-shot convenience wrapper (compiles on every call: keep an ``Engine`` to reuse programs)."""
    return Engine(model).generate(prompts, config, **kwargs)
