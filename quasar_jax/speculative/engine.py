"""Speculative generation: prefill, then ONE ``lax.while_loop`` that drafts, verifies, accepts.

Sequence bookkeeping (per row b)::

    history[b, :lengths[b]]   prompt + generated tokens (int32)
    cache.lengths[b]          = lengths[b] - 1: every token but the last has its K/V in the cache

One loop iteration (all rows at once, static shapes, no host round trip):

1. draft   ``draft [B, K], n_draft [B]`` from the ``Drafter`` (``quasar_jax.speculative.drafters``: n-gram
           lookup, QSpec's W8A8 path, none)
2. verify  forward ``[last, draft_0..draft_{K-1}]`` at positions ``lengths-1 .. lengths-1+K``
           (each row at its own offset) -> logits ``[B, K+1, V]``; K/V of all K+1 are written
3. accept  the logits stage (``quasar_jax.speculative.logits``: min_tokens, logit bias, penalties counting
           the tokens before each draft position), then the ``Sampler`` (``quasar_jax.speculative.sampling``):
           greedy prefix match, or exact speculative sampling with each row's own settings ->
           ``tokens [B, K+1], n_emit [B]``
4. commit  truncate at the token budget / stop ids, append, ``lengths += n_emit``; token counts
           and (when asked) the emitted tokens' logprobs of the raw logits. Rejected K/V
           stay in the cache past ``lengths - 1``: they are hidden by the mask and overwritten by
           the next verify pass (rollback is free); the bonus token's K/V is written next step.

A row stops on a stop id (EOS), on ``max_new_tokens``, or when its sequence fills the cache
(``lengths == S``). Plain autoregressive decoding is the same loop with ``drafter="none"`` (K = 0).
A tree drafter (``num_candidates > 1``) verifies a trie instead (``quasar_jax.speculative.verify``): N
trie nodes verified in one forward under a tree mask, the accepted path's K/V then moved to
contiguous slots; step 4 is shared (docs/tree.md).
The prompt's last token is not prefilled: it is the first token the loop verifies, so drafts are
used from the first step on. For a drafter that reads the target's hidden state (S4C) the state
carries it, refreshed by every verify forward (feature reuse: ``quasar_jax.speculative.features``).

The compiled program depends on (drafter, sampler kind, verifier mode, batch, prompt bucket, cache
length S, number of stop ids, ``LogitsSpec``); ``Engine`` compiles each once (ahead of time, so compile time is
measured separately from run time) and reuses it. Everything per row is device data: token
budgets, stop ids, temperature / top-k / top-p / min-p, penalties, logit bias, min_tokens, logprob
counts and PRNG keys, so new values never recompile.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax import sharding
from quasar_jax.cli import compile_cache
from quasar_jax.model.kv_cache import KVCache
from quasar_jax.model.kv_quant import KV_DTYPES
from quasar_jax.model.modes import QuantMode
from quasar_jax.model.paged_kv_cache import DEFAULT_PAGE_SIZE, CacheSpec, KVLayout, PagedKVCache
from quasar_jax.model.quant import is_quantized
from quasar_jax.model.qwen3 import Qwen3
from quasar_jax.speculative import features
from quasar_jax.speculative import logits as stage
from quasar_jax.speculative.buckets import CACHE_BUCKET, PROMPT_BUCKET, round_up
from quasar_jax.speculative.drafters import Drafter, DrafterKind, QSpecDrafter, is_tree_drafter, make_drafter
from quasar_jax.speculative.features import program_params
from quasar_jax.speculative.logits import MAX_LOGPROBS, LogitsSpec, Logprobs
from quasar_jax.speculative.results import CACHE_FULL, LENGTH, STOP, GenerationResult, result_of
from quasar_jax.speculative.sampling import (RowSampling, Sampler, SamplingParams, check_sampling, check_seed, is_int,
                                 row_keys, sampler_for)
from quasar_jax.speculative.verify import verify_chain, verify_tree



@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how; validated on construction (one-line ``ValueError``).

    ``drafter`` is a built-in drafter's name (``DrafterKind``: none | ngram | qspec, built from
    ``num_draft`` and the ``ngram_*`` fields) or any ``Drafter`` instance. ``verifier`` is the
    ``QuantMode`` of the verify (and autoregressive) forward. ``temperature`` / ``top_k`` /
    ``top_p`` / ``seed`` are the batch's sampling settings; ``Engine.generate(sampling=...)``
    may give each row its own.
    """

    max_new_tokens: int = 128
    drafter: DrafterKind | Drafter | str = DrafterKind.NGRAM
    num_draft: int = 5  # K (ignored for drafter="none")
    ngram_min: int = 1
    ngram_max: int = 3
    ngram_prefer: str = "recent"  # which earlier occurrence wins: recent | earliest
    num_candidates: int = 1  # C n-gram continuations verified as one tree (1 = the chain)
    tree_nodes: int | None = None  # N trie nodes (None = C * K); only with num_candidates > 1
    verifier: QuantMode | str = QuantMode.FLOAT
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    max_len: int | None = None  # cache slots S; None = prompt + max_new_tokens rounded up
    seed: int = 0
    allow_long_context: bool = False  # allow prompt + max_new_tokens past max_position_embeddings
    heads: object = None  # drafter "s4c": a heads directory or quasar_jax.speculative.heads.load_heads(...)
    kv_dtype: str = "auto"  # what the KV cache stores: auto (the model's dtype) | bfloat16 | float32 | int8

    def __post_init__(self):
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.drafter, (str, DrafterKind)):
            object.__setattr__(self, "drafter", DrafterKind.parse(self.drafter, "drafter"))
        elif not any(callable(getattr(self.drafter, m, None)) for m in ("draft", "draft_tree", "bind")):
            raise ValueError(f"drafter must be one of {', '.join(DrafterKind.values())} or a Drafter, "
                             f"got {self.drafter!r}")
        object.__setattr__(self, "verifier", QuantMode.parse(self.verifier, "verifier"))
        drafter = self.make_drafter()  # validates num_draft / ngram_* for the built-in drafters
        if not isinstance(self.stop_ids, (tuple, list)) or not all(
                is_int(t) and 0 <= t < 2**31 for t in self.stop_ids):
            raise ValueError(f"stop_ids must be a tuple of non-negative int32 token ids, got {self.stop_ids!r}")
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in self.stop_ids))
        check_seed(self.seed)
        if isinstance(drafter, QSpecDrafter) and self.verifier is not QuantMode.W8A16:
            raise ValueError("drafter 'qspec' drafts with w8a8 and verifies with w8a16: use verifier='w8a16'")
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.max_len is not None and (not is_int(self.max_len) or self.max_len < 2):
            raise ValueError(f"max_len must be an integer >= 2, got {self.max_len!r}")

    def make_drafter(self) -> Drafter:
        if not isinstance(self.drafter, DrafterKind):
            return self.drafter
        return make_drafter(self.drafter, num_draft=self.num_draft, ngram_min=self.ngram_min,
                            ngram_max=self.ngram_max, ngram_prefer=self.ngram_prefer,
                            num_candidates=self.num_candidates, tree_nodes=self.tree_nodes,
                            heads=self.heads)

    @property
    def k(self) -> int:
        return self.make_drafter().num_draft

    @property
    def sampling(self) -> SamplingParams:
        """The batch's sampling settings (rows without their own use these)."""
        return SamplingParams(self.temperature, self.top_k, self.top_p)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
    """Carry of the generation ``while_loop`` (dimension letters of docs/CONVENTIONS.md)."""

    history: jax.Array  # [B, S] int32: prompt + generated tokens
    lengths: jax.Array  # [B] int32: valid tokens in history
    cache: KVCache | PagedKVCache  # K/V of history[:, :lengths-1]
    done: jax.Array  # [B] bool
    finish: jax.Array  # [B] int32: 0 running, else the index of a FinishReason in FINISH_CODES
    new_tokens: jax.Array  # [B] int32: tokens generated so far
    steps: jax.Array  # [B] int32: verify steps while the row was active
    emitted_hist: jax.Array  # [B, K+2] int32: count of steps that emitted n tokens (n = 0..K+1)
    keys: jax.Array  # [B] PRNG keys, one stream per row
    iteration: jax.Array  # [] int32
    # The logits stage (LogitsSpec): [B, 0] / [B, 0, 0] when the program has no penalties / logprobs.
    counts: jax.Array  # [B, V] int32: generated tokens per id (frequency / presence penalties)
    prompt_ids: jax.Array  # [B, V] bool: ids in the prompt (repetition penalty)
    logprobs: Logprobs  # [B, S], [B, S, NL]: raw-logits logprobs of history[b, s] (generated positions)
    # [B, D] hidden state of position lengths-2, for drafters that read it (quasar_jax.speculative.features); else None
    hidden: jax.Array | None = None


# ----------------------------------------------------------------------------- the device program
def make_program(graphdef, drafter: Drafter, sampler: Sampler, verifier: QuantMode,
                 stream: Callable | None = None, *, spec: LogitsSpec = LogitsSpec(),
                 cache_spec: CacheSpec = CacheSpec()):
    """The device functions of one (drafter, sampler, verifier, logits spec), to be jitted by the
    caller.

    Returns ``(init, step, run)``. Per-row inputs: ``max_new [B]`` token budgets, ``stop [B, NS]``
    stop ids (-1 = none), ``rows`` the ``RowSampling`` arrays, ``keys [B]`` PRNG keys. ``spec``
    says whether the state carries token counts (penalties) and logprob buffers; ``cache_spec``
    how ``init`` lays out the cache (dense strips or pages; its dtype).

    * ``init(params, prompt [B, P], prompt_lens [B], S, keys)`` prefills and gives the first
      ``LoopState``;
    * ``step(params, state, max_new, stop, rows)`` is one loop iteration;
    * ``run(params, prompt, prompt_lens, S, max_new, stop, rows, keys)`` is ``init`` followed by
      the ``while_loop`` of ``step`` until every row is done (what ``Engine`` compiles).

    ``params`` is ``features.program_params(model_params, drafter)``; a state carrying ``hidden``
    has it refreshed by every step, whatever the drafter, so programs may share one state.
    """
    k = drafter.num_draft
    carry_hidden = features.uses_hidden(drafter)

    def merged(params):
        """(model, the drafter's params or None) from the program's ``params``."""
        model_params, extra = features.split_params(params, drafter)
        return nnx.merge(graphdef, model_params), extra

    def body(model, extra, state: LoopState, max_new, stop, rows: RowSampling) -> LoopState:
        b, s = state.history.shape
        split = jax.vmap(jax.random.split)(state.keys)  # [B, 2]
        keys, step_keys = split[:, 0], split[:, 1]
        # Never propose past the cache (each emitted token needs a history slot) or the budget.
        room = jnp.minimum(s - state.lengths, max_new - state.new_tokens) - 1  # [B]
        # Finished rows are frozen: sampling them is wasted work, so they count as greedy.
        rows = dataclasses.replace(rows, temperature=jnp.where(state.done, 0.0, rows.temperature))

        def process(logits, tree, accept):  # acceptance after the logits stage (a lax.cond)
            if not spec.processing:
                return accept(logits)
            return stage.accept_processed(logits, tree, accept, rows, stop=stop, new_tokens=state.new_tokens,
                                          counts=state.counts, prompt_ids=state.prompt_ids, active=~state.done,
                                          penalties=spec.penalties)

        bound = features.bind(drafter, state.hidden, extra)
        verify = verify_tree if is_tree_drafter(bound) else verify_chain  # static: trie or chain
        tokens, n_emit, cache, raw, emit_rows, *verify_hidden = verify(
            model, bound, sampler, verifier, state.history, state.lengths, state.cache, room, rows, step_keys,
            process=process, return_hidden=state.hidden is not None)
        hidden = (features.reused_hidden(state.hidden, state.done, verify_hidden[0], emit_rows, n_emit)
                  if verify_hidden else None)  # feature reuse (before the stop-id cut: a row cut there is done)

        # Stop ids: emit up to and including the first one.
        j = jnp.arange(k + 1, dtype=jnp.int32)[None, :]  # [1, K+1]
        is_stop = jnp.any(tokens[:, :, None] == stop[:, None, :], axis=-1) & (j < n_emit[:, None])
        first_stop = jnp.min(jnp.where(is_stop, j, k + 1), axis=1)  # [B]
        hit_stop = first_stop <= k
        n_emit = jnp.where(hit_stop, first_stop + 1, n_emit)
        n_emit = jnp.where(state.done, 0, n_emit)  # finished rows are frozen

        write_at = jnp.where(j < n_emit[:, None], state.lengths[:, None] + j, s)  # s = dropped
        history = state.history.at[jnp.arange(b)[:, None], write_at].set(tokens, mode="drop")
        lengths = state.lengths + n_emit
        new_tokens = state.new_tokens + n_emit
        active = (~state.done).astype(jnp.int32)
        if stream is not None:  # the host sees the new tokens and may stop rows (stop strings)
            hit_stop |= jax.experimental.io_callback(
                stream, jax.ShapeDtypeStruct((b,), jnp.bool_), tokens, n_emit, ordered=True)
        reason = jnp.where(hit_stop, STOP, jnp.where(new_tokens >= max_new, LENGTH,
                                                      jnp.where(lengths >= s, CACHE_FULL, 0)))
        finish = jnp.where(state.done, state.finish, reason).astype(jnp.int32)
        counts = stage.count_tokens(state.counts, tokens, n_emit) if spec.penalties else state.counts
        logprobs = state.logprobs
        if spec.max_logprobs is not None:
            logprobs = stage.record_logprobs(logprobs, raw, emit_rows, tokens, write_at,
                                             jnp.any((rows.logprobs >= 0) & ~state.done))
        return LoopState(
            history=history, lengths=lengths, cache=cache.replace(lengths=lengths - 1),
            done=finish > 0, finish=finish, new_tokens=new_tokens, steps=state.steps + active,
            emitted_hist=state.emitted_hist.at[jnp.arange(b), n_emit].add(active),
            keys=keys, iteration=state.iteration + 1, counts=counts, prompt_ids=state.prompt_ids,
            logprobs=logprobs, hidden=hidden)

    def init(params, prompt, prompt_lens, max_len_static: int, keys) -> LoopState:
        """Prefill every prompt token but each row's last one; the loop's state before step 1."""
        model, _ = merged(params)
        b, p = prompt.shape
        s = max_len_static
        cache = cache_spec.init(model.config, b, s, model.dtype)
        hidden = jnp.zeros((b, model.config.hidden_size), model.dtype) if carry_hidden else None
        if p > 1:
            positions = jnp.broadcast_to(jnp.arange(p - 1, dtype=jnp.int32), (b, p - 1))
            _, cache, *out = model(prompt[:, :-1], positions, cache, mode=verifier, return_hidden=carry_hidden)
            if carry_hidden:
                hidden = features.prefill_hidden(out[0], prompt_lens)
        history = jnp.zeros((b, s), jnp.int32).at[:, :p].set(prompt)
        full = prompt_lens >= s
        v = model.config.vocab_size if spec.penalties else 0
        return LoopState(
            history=history, lengths=prompt_lens, cache=cache.replace(lengths=prompt_lens - 1),
            done=full, finish=jnp.where(full, CACHE_FULL, 0).astype(jnp.int32),
            new_tokens=jnp.zeros((b,), jnp.int32), steps=jnp.zeros((b,), jnp.int32),
            emitted_hist=jnp.zeros((b, k + 2), jnp.int32), keys=keys, iteration=jnp.zeros((), jnp.int32),
            counts=jnp.zeros((b, v), jnp.int32), prompt_ids=stage.prompt_mask(history, prompt_lens, v),
            logprobs=stage.empty_logprobs(b, s, spec.max_logprobs), hidden=hidden)

    def step(params, state: LoopState, max_new, stop, rows) -> LoopState:
        """One draft-verify-accept-commit iteration (the loop body)."""
        return body(*merged(params), state, max_new, stop, rows)

    def run(params, prompt, prompt_lens, max_len_static: int, max_new, stop, rows, keys) -> LoopState:
        model, extra = merged(params)
        state = init(params, prompt, prompt_lens, max_len_static, keys)
        return jax.lax.while_loop(lambda st: jnp.any(~st.done),
                                  lambda st: body(model, extra, st, max_new, stop, rows), state)

    return init, step, run


# ----------------------------------------------------------------------------- host side
class Engine:
    """Holds a model split into (graph, params) and the compiled programs, one per shape bucket.

    A program is keyed by (drafter, sampler kind, verifier, batch, prompt bucket, cache length,
    number of stop ids, streaming); budgets, stop ids, sampling values and seeds are device inputs,
    so calls that differ only in those reuse it.
    """

    def __init__(self, model: Qwen3, *, prompt_bucket: int = PROMPT_BUCKET, mesh=None,
                 kv_layout: KVLayout | str | None = None, page_size: int = DEFAULT_PAGE_SIZE):
        """``mesh``: a ``Mesh`` with axes ("data", "model"), a spec ("data=2,model=4"), or ``None``
        (one device). Params are placed by ``quasar_jax.sharding``'s rules; rows pad to ``data``.
        ``kv_layout``: ``paged`` (pages of ``page_size`` slots; attention reads only the pages a
        row uses) or ``dense`` (a strip of S slots per row); ``None`` = paged on one device, dense
        on a mesh (the partition rules shard the dense cache)."""
        if not is_int(prompt_bucket) or prompt_bucket < 1:
            raise ValueError(f"prompt_bucket must be a positive integer, got {prompt_bucket!r}")
        compile_cache.enable()  # on by default (QUASAR_JAX_COMPILE_CACHE=off to disable)
        self.model = model
        self.prompt_bucket = prompt_bucket  # prompts are right-padded to a multiple of this
        self.mesh = sharding.make_mesh(mesh)
        if kv_layout is None:
            kv_layout = KVLayout.DENSE if self.mesh is not None else KVLayout.PAGED
        CacheSpec(kv_layout, page_size)  # validates
        self.kv_layout, self.page_size = KVLayout(kv_layout), page_size
        if self.mesh is not None:
            sharding.place_model(model, self.mesh)  # the model now refers to the sharded arrays
        self.graphdef, self.params = nnx.split(model)
        self._compiled, self._program_params = {}, {}  # key -> program, its params (the drafter's placed once)
        self.quantized = is_quantized(model)
        self._stream_target: Callable | None = None  # the current call's stream callback
        self._stream_rows: int | None = None  # and its number of rows

    @property
    def num_compiled(self) -> int:
        """How many programs this engine has compiled."""
        return len(self._compiled)

    def _stream(self, tokens, n_emit) -> np.ndarray:
        """The one host callback compiled into streaming programs; forwards to this call's.

        Returns the rows to stop now (``[B]`` bool): what the call's callback returned, if any.
        """
        stop = np.zeros(n_emit.shape, bool)
        b = self._stream_rows  # the caller's rows; those past it pad the batch for the mesh
        if self._stream_target is not None:
            wanted = self._stream_target(tokens[:b], n_emit[:b])
            if wanted is not None:
                stop[:b] |= np.asarray(wanted, bool).reshape(stop[:b].shape)
        return stop

    def _program(self, drafter: Drafter, sampler: Sampler, verifier: QuantMode, b: int, p: int,
                 s: int, n_stop: int, stream: bool, spec: LogitsSpec = LogitsSpec(),
                 cache_spec: CacheSpec = CacheSpec()):
        key = (drafter, sampler, verifier, b, p, s, n_stop, stream, spec, cache_spec)
        if key in self._compiled:
            return self._compiled[key], self._program_params[key], 0.0
        if callable(getattr(drafter, "check_model", None)):
            drafter.check_model(self.model)  # e.g. S4C heads trained for another model
        _, _, run = make_program(self.graphdef, drafter, sampler, verifier,
                                 self._stream if stream else None, spec=spec, cache_spec=cache_spec)
        i32 = jnp.int32
        inputs = (jax.ShapeDtypeStruct((b, p), i32), jax.ShapeDtypeStruct((b,), i32),
                  jax.ShapeDtypeStruct((b,), i32), jax.ShapeDtypeStruct((b, n_stop), i32),
                  RowSampling.abstract(b), jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b)))
        out_shardings, params = None, program_params(self.params, drafter, self.mesh)
        if self.mesh is not None:  # rows on "data"; the params carry their own shardings
            inputs, out_shardings = sharding.program_shardings(
                lambda *a: run(params, *a[:2], s, *a[2:]), inputs, self.mesh, self.model.config)
        jitted = jax.jit(run, static_argnums=(3,), out_shardings=out_shardings)
        t0 = time.perf_counter()
        compiled = jitted.lower(params, *inputs[:2], s, *inputs[2:]).compile()
        compile_s = time.perf_counter() - t0
        self._compiled[key], self._program_params[key] = compiled, params
        return compiled, params, compile_s

    def _check_prompts(self, prompts, cfg: GenerationConfig) -> list[int]:
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        lens = [len(p) for p in prompts]
        if min(lens) == 0:
            raise ValueError(f"prompt {lens.index(0)} is empty")
        if not cfg.verifier.is_int8 and self.quantized:
            raise ValueError("this model holds int8 weights: use verifier 'w8a16' or 'w8a8'")
        if cfg.verifier.is_int8 and not self.quantized:
            raise ValueError(f"verifier '{cfg.verifier}' needs an int8 model "
                             "(load_model(..., int8=True) or quant.quantize_model)")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            bad = [t for t in p if not (is_int(t) and 0 <= t < vocab)]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]!r}: ids must be integers in [0, {vocab})")
        return lens

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None, *,
                 sampling: Sequence[SamplingParams | None] | None = None,
                 stream: Callable | None = None) -> GenerationResult:
        """Generate for a batch of token-id prompts (ragged lengths allowed).

        ``sampling`` optionally gives row ``i`` its own ``SamplingParams`` (``None`` entries use
        the config's), penalties, logit bias, min_tokens and logprobs included (the result's
        ``logprobs[i]`` then holds row i's; a batch that uses none of them compiles without them).
        ``stream(tokens [B, K+1], n_emit [B])`` is called (NumPy arrays) after every
        loop iteration with the tokens each row appended; it may return a ``[B]`` bool array of rows
        to stop there (finish reason ``stop``: how stop strings are honoured).
        """
        cfg = config or GenerationConfig()
        lens = self._check_prompts(prompts, cfg)
        b = len(prompts)
        if sampling is None:
            rows = [cfg.sampling] * b
        elif len(sampling) != b:
            raise ValueError(f"sampling has {len(sampling)} entries for {b} prompts")
        else:
            rows = [cfg.sampling if r is None else r for r in sampling]
            if not all(isinstance(r, SamplingParams) for r in rows):
                raise ValueError("sampling entries must be SamplingParams or None")
        vocab = self.model.config.vocab_size
        bad = next((t for r in rows for t, _ in r.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is not in [0, {vocab})")
        spec = LogitsSpec(processing=any(r.processed for r in rows), penalties=any(r.penalized for r in rows),
                          max_logprobs=MAX_LOGPROBS if any(r.logprobs is not None for r in rows) else None)
        wanted = [r.logprobs for r in rows]
        prompts, lens, rows = sharding.pad_rows(self.mesh, prompts, lens, rows)  # B % data == 0
        longest = max(lens)
        s = cfg.max_len or round_up(longest + cfg.max_new_tokens, CACHE_BUCKET)
        if longest >= s:
            raise ValueError(f"prompt of {longest} tokens does not fit in a cache of {s} slots "
                             "(needs at least one free slot); raise max_len")
        context = self.model.config.max_position_embeddings
        if min(longest + cfg.max_new_tokens, s) > context and not cfg.allow_long_context:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {cfg.max_new_tokens} exceeds "
                             f"the model's context of {context} positions (max_position_embeddings); "
                             "shorten the prompt or allow it explicitly (allow_long_context)")
        p = min(round_up(longest, self.prompt_bucket), s)
        bp = len(prompts)  # padded batch
        prompt = np.zeros((bp, p), np.int32)
        for i, row in enumerate(prompts):
            prompt[i, :len(row)] = np.asarray(row, np.int32)
        stop = np.tile(np.asarray(cfg.stop_ids or (-1,), np.int32), (bp, 1))  # [B, NS]
        max_new = np.where(np.arange(bp) < b, cfg.max_new_tokens, 1).astype(np.int32)  # pad rows: 1
        drafter = cfg.make_drafter()
        cache_spec = CacheSpec(self.kv_layout, self.page_size, cfg.kv_dtype)
        program, params, compile_s = self._program(drafter, sampler_for(rows), cfg.verifier, bp, p, s,
                                           stop.shape[1], stream is not None, spec, cache_spec)
        inputs = (prompt, np.asarray(lens, np.int32), max_new, stop, RowSampling.of(rows),
                  row_keys(rows, cfg.seed))
        inputs = sharding.put_inputs(inputs, self.mesh, self.model.config)
        self._stream_target, self._stream_rows = stream, b
        t0 = time.perf_counter()
        try:
            final = jax.block_until_ready(program(params, *inputs))
        finally:
            self._stream_target = None
        wall = time.perf_counter() - t0
        host = sharding.host_rows(dataclasses.replace(final, cache=None, keys=None, counts=None, prompt_ids=None,
                                                      hidden=None), b)  # pad rows dropped
        return result_of(host, lens[:b], wall, compile_s, s, drafter.num_draft, wanted[:b])


def generate(model: Qwen3, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None,
             **kwargs) -> GenerationResult:
    """One-shot convenience wrapper (compiles on every call: keep an ``Engine`` to reuse programs)."""
    return Engine(model).generate(prompts, config, **kwargs)
