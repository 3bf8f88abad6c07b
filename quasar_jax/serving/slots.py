"""Device side of serving: a fixed set of slots (batch rows) that requests enter and leave.

The slot state is ``SlotState``: the generation loop's ``LoopState`` for ``B`` rows plus every
per-row input of ``make_program``'s ``step`` (token budget, stop ids, sampling settings) as device
arrays. A free slot is a done row (``step`` freezes done rows). The programs, each compiled once
ahead of time when ``SlotEngine`` is built, so requests coming and going never compile:

* ``prefill(params, staged, tokens [1, C], start, next_tokens [1, C], want, at)``: K/V of one
  prompt piece of ``C`` tokens (``C`` from ``prefill_buckets``; a long prompt is several pieces) into a
  one-row staging cache at slots ``start .. start+C-1``. Pad tokens past the prompt write slots
  that are masked and overwritten later (or dropped past ``S``), exactly as ``Engine``'s padded
  prefill. When ``want`` (a device bool: one program either way) it also returns the logprobs of
  ``next_tokens`` (the prompt shifted by one: echo) and their top alternatives.
* ``admit(slots, cache1, slot, history_row [S], prompt_len, row, key)``: copies the staging row
  into row ``slot`` of the ``[L, B, S, G, E]`` cache, resets that row's loop fields (from a fresh
  one-row state; the prompt's id mask for the repetition penalty) and sets its per-row inputs
  from ``row``: ONE pytree holding, for every per-row field of ``SlotState`` (``SlotState.inputs``),
  that row's value (``SlotEngine.row_inputs``: budget, stop ids and the request's ``RowSampling``:
  sampling, penalties, logit bias, min_tokens, logprobs). The staging cache stays, so one prompt
  is admitted into several slots (``n`` choices).
* ``chunk_p(params, slots)``, one per drafter of ``drafters`` (e.g. K = 0, 2, 5: the
  speculation options, ``quasar_jax.serving.speculation``), all over the SAME slot state
  (``emitted_hist`` sized for the largest K): a ``lax.while_loop`` of that drafter's ``step``
  until ``N`` steps have run, or a row that was running at entry is done, or a newly admitted row
  has its first tokens, or no row runs. Every program carries the same ``LogitsSpec`` (the
  logits stage). Returns the new state, the tokens each row appended (``[B, N*(K+1)]``, from its
  length at entry), their logprobs and top alternatives (``quasar_jax.speculative.logits.Logprobs``, rows on
  ``data``, fetched to the host only when a request asked) and ``n_emit`` per step (``[N, B]``).
* ``finish(slots, mask [B])``: marks rows done (finish reason "stop"): stop strings found on the
  host, cancelled (disconnected) requests.

On a mesh (``mesh="data=2,model=4"``) the params are placed once by ``quasar_jax.sharding``'s
rules, the slot state once (cache ``[L, B, S, G, E]`` with B on ``data`` and G on ``model``;
every other per-row array on ``data``), and each program is compiled with explicit input and
output shardings; the small outputs the host reads are replicated. Host arguments become global
arrays (``sharding.put_global``), so the same calls work on every process of a multi-host group
(``quasar_jax.serving.lockstep``).

``slot`` and every per-row value are device data; only (B, S, N, the Ks, prefill bucket, number
of stop ids, drafters, verifier, mesh) are static.

Feature reuse (``quasar_jax.speculative.features``): when a drafter reads the target's hidden state (S4C), the
staging area is a ``Staging`` (the one-row cache and the hidden state of prompt position P-2,
kept from the prefill piece that holds it, ``at``), the slot state carries ``LoopState.hidden``
(every chunk program refreshes it, so programs of other drafters keep it current), and each chunk
program takes its drafter's params with the model's (``program_params``: S4C's heads).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from quasar_jax import sharding
from quasar_jax.model.kv_cache import KVCache
from quasar_jax.model.modes import QuantMode
from quasar_jax.model.paged_kv_cache import CacheSpec, KVLayout, PagedKVCache
from quasar_jax.model.quant import is_quantized
from quasar_jax.speculative import logits as stage
from quasar_jax.speculative.drafters import Drafter
from quasar_jax.speculative.engine import make_program
from quasar_jax.speculative.features import program_params, uses_hidden
from quasar_jax.speculative.logits import MAX_LOGPROBS, LogitsSpec, Logprobs
from quasar_jax.serving.slot_state import ChunkResult, SlotState, Staging, empty_loop, set_row
from quasar_jax.speculative.results import CACHE_FULL, STOP
from quasar_jax.speculative.sampling import RowSampler, RowSampling, SamplingParams, row_keys

SERVING_SPEC = LogitsSpec(processing=True, penalties=True, max_logprobs=MAX_LOGPROBS)  # a server's loop


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


def paged_cache_shardings(cache: PagedKVCache, mesh, rules) -> PagedKVCache:
    """Shardings of a page pool on ``mesh``: the combined K/V head axis (``2G``; K and V of a head
    side by side, so a device holds both of its heads) on the axes the dense cache puts its KV heads
    on (``model`` when it divides G), pages and slots whole on every device (any row may use any
    page); page tables and lengths replicated."""
    heads = sharding.logical_spec(sharding.CACHE_AXES, rules)[3]
    pool = NamedSharding(mesh, P(None, None, heads, None))
    scales = NamedSharding(mesh, P(None, None, heads))
    rep = sharding.replicated(mesh)
    return dataclasses.replace(cache, kv=tuple(pool for _ in cache.kv),
                         scale=None if cache.scale is None else tuple(scales for _ in cache.scale),
                         page_table=rep, lengths=rep)


def stage_prompt(engine, prompt, *, prefix_pages=(), cached: int = 0) -> None:
    """``begin(prompt)`` then every prefill piece: the prompt staged whole, ready to ``admit``.
    A function, not a method, so that a ``lockstep.Leader`` records each op it calls. On pages,
    ``cached`` prompt slots are found in ``prefix_pages`` (prefix caching): only the rest is
    prefilled."""
    if cached:
        engine.begin(prompt, prefix_pages=prefix_pages)
    else:
        engine.begin(prompt)
    for start, size in prefill_pieces(len(prompt) - 1 - cached, engine.buckets):
        engine.prefill(cached + start, size)


class SlotEngine:
    """The slots of one (model, drafters, verifier, mesh) and their compiled programs.

    ``drafters``: one drafter, or several (one chunk program each, chosen per call by index:
    ``chunk(program)``). Not thread-safe: one host thread (the scheduler) drives it.
    """

    heartbeat_s = None  # no peers to keep in step (see lockstep.Leader)

    def __init__(self, model, drafters: Drafter | Sequence[Drafter], verifier: QuantMode | str, *, slots: int,
                 max_len: int, num_stop: int = 4, chunk_steps: int = 8, prefill_buckets: tuple[int, ...] = (32, 128),
                 mesh=None, spec: LogitsSpec = SERVING_SPEC, cache_spec: CacheSpec = CacheSpec(KVLayout.DENSE),
                 kv_pages: int | None = None):
        """``cache_spec``: a dense ``[L, B, S, G, E]`` cache (the default) or one pool of
        ``kv_pages`` pages for all slots (``cache_spec.layout`` paged; on a mesh the pool's KV heads
        on model; the host's ``quasar_jax.serving.kv_pages.SlotPages`` allocates them and sends the page tables with
        every ``chunk``)."""
        verifier = QuantMode.parse(verifier, "verifier")
        if verifier.is_int8 != is_quantized(model):
            raise ValueError(f"verifier '{verifier}' does not match the model's weights "
                             f"({'int8' if is_quantized(model) else 'float'})")
        if slots < 1 or max_len < 2 or chunk_steps < 1 or num_stop < 1:
            raise ValueError("slots >= 1, max_len >= 2, chunk_steps >= 1 and num_stop >= 1 are required")
        if not prefill_buckets or list(prefill_buckets) != sorted(set(prefill_buckets)) or prefill_buckets[0] < 1:
            raise ValueError(f"prefill_buckets must be increasing positive sizes, got {prefill_buckets!r}")
        self.drafters = tuple(drafters) if isinstance(drafters, (tuple, list)) else (drafters,)
        if not self.drafters:
            raise ValueError("at least one drafter is required")
        self.mesh = sharding.make_mesh(mesh)
        if self.mesh is not None:
            data = int(self.mesh.shape["data"])
            if slots % data:
                raise ValueError(f"slots {slots} must be a multiple of the mesh's data axis {data}")
            sharding.place_model(model, self.mesh)  # a no-op for params loaded onto the mesh
        for d in self.drafters:
            if callable(getattr(d, "check_model", None)):
                d.check_model(model)  # e.g. S4C heads trained for another model
        self.model, self.verifier, self.spec = model, verifier, spec
        self.cache_spec, self.paged = cache_spec, cache_spec.layout is KVLayout.PAGED
        if self.paged:
            if not isinstance(kv_pages, int) or kv_pages < 1:
                raise ValueError(f"a paged slot engine needs kv_pages >= 1, got {kv_pages!r}")
        self.page_size = cache_spec.page_size
        self.max_pages = -(-max_len // cache_spec.page_size)  # M: pages a row can address
        self.num_pages = kv_pages if self.paged else slots * self.max_pages
        self.hidden = any(uses_hidden(d) for d in self.drafters)  # the state carries [B, D]
        self.b, self.s, self.n, self.ns = slots, max_len, chunk_steps, num_stop
        self.ks = tuple(d.num_draft for d in self.drafters)  # K of each chunk program
        self.k = max(self.ks)  # emitted_hist is sized for the largest
        self.buckets = tuple(sorted({min(c, max_len) for c in prefill_buckets}))
        self.graphdef, self.params = nnx.split(model)
        self._staged: list[int] = []  # the prompt being admitted (begin / extend)
        self._staging: Staging | None = None  # its one-row cache (and hidden state)
        self._build()

    # ------------------------------------------------------------------ programs
    def _build(self):
        graphdef, verifier, b, s, n, k = self.graphdef, self.verifier, self.b, self.s, self.n, self.k
        cfg, dtype, carry = self.model.config, self.model.dtype, self.hidden
        spec, n_top = self.spec, self.spec.max_logprobs or 0
        steps = [make_program(graphdef, d, RowSampler(), verifier, spec=spec)[1] for d in self.drafters]
        cspec, paged, m, num_pages = self.cache_spec, self.paged, self.max_pages, self.num_pages

        def empty_cache(rows: int):
            if not paged:
                return KVCache.init(cfg, rows, s, dtype)
            return PagedKVCache.init(cfg, jnp.full((rows, m), num_pages, jnp.int32), num_pages, cspec.page_size,
                                     dtype, cspec.kv_dtype)

        def empty() -> SlotState:
            return SlotState(loop=empty_loop(cfg, dtype, b, s, k, spec, hidden=carry, cache=empty_cache(b)),
                             max_new=jnp.ones((b,), jnp.int32), stop=jnp.full((b, self.ns), -1, jnp.int32),
                             rows=RowSampling.of([SamplingParams()] * b))

        def staging() -> Staging:
            one = (PagedKVCache.contiguous(cfg, 1, s, cspec.page_size, dtype, cspec.kv_dtype) if paged
                   else KVCache.init(cfg, 1, s, dtype))
            return Staging(one, jnp.zeros((1, cfg.hidden_size), dtype) if carry else None)

        def load_prefix(st: SlotState, staged: Staging, table_row, n_pages) -> Staging:
            """Pages ``table_row[:n_pages]`` of the pool (a cached prefix) into the staging row."""
            at = jnp.arange(m)
            cache = staged.cache.put_pages(st.loop.cache, table_row, jnp.where(at < n_pages, at, m))
            return dataclasses.replace(staged, cache=cache)

        def copy_pages(st: SlotState, src, dst) -> SlotState:  # copy on write
            return dataclasses.replace(st, loop=dataclasses.replace(st.loop, cache=st.loop.cache.copy_pages(src, dst)))

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
            lp = jax.lax.cond(want, lambda: stage.token_logprobs(logits, next_tokens, n_top),
                              lambda: stage.empty_logprobs(1, c, n_top))
            return Staging(cache1, hidden), lp

        def admit(st: SlotState, staged: Staging, slot, history_row, prompt_len, row: dict, key_data,
                  table_row, from_page) -> SlotState:
            """Pages: the staging row's pages ``from_page ..`` go to the pool pages ``table_row``
            (those before are the cached prefix the row shares, never written)."""
            full, cache1 = prompt_len >= s, staged.cache
            fresh = dataclasses.replace(  # a one-row state: counters zero, its own key
                empty_loop(cfg, dtype, 1, s, k, spec, hidden=carry), hidden=staged.hidden,
                history=history_row[None], lengths=prompt_len[None],
                done=full[None], finish=jnp.where(full, CACHE_FULL, 0).astype(jnp.int32)[None],
                keys=jax.random.wrap_key_data(key_data)[None], cache=None,
                prompt_ids=stage.prompt_mask(history_row[None], prompt_len[None], st.loop.prompt_ids.shape[1]))
            fresh = jax.tree.map(lambda x: x[0] if x.ndim else x, fresh)
            loop = set_row(dataclasses.replace(st.loop, cache=None), slot, fresh)
            cache = st.loop.cache
            if paged:
                at = jnp.arange(m)
                cache = cache.put_pages(cache1, at, jnp.where(at >= from_page, table_row, num_pages)).replace(
                    page_table=cache.page_table.at[slot].set(table_row), lengths=loop.lengths - 1)
            else:
                cache = cache.replace(k=cache.k.at[:, slot].set(cache1.k[:, 0]),
                                      v=cache.v.at[:, slot].set(cache1.v[:, 0]), lengths=loop.lengths - 1)
            inputs = {name: set_row(value, slot, row[name]) for name, value in st.inputs().items()}
            return dataclasses.replace(st, loop=dataclasses.replace(loop, cache=cache), **inputs)

        def chunk_program(step, kp: int):
            m = n * (kp + 1)

            def chunk(params, st: SlotState, table):
                if paged:  # the host's page tables for this chunk (pages reserved for its reach)
                    st = dataclasses.replace(st, loop=dataclasses.replace(
                        st.loop, cache=st.loop.cache.replace(page_table=table)))
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
                out = (tokens, loop.lengths - start_len, emits, loop.done, loop.finish, loop.new_tokens,
                       loop.steps, loop.iteration - start_it)
                if spec.max_logprobs is None:
                    logprobs = stage.empty_logprobs(b, m, 0)
                else:  # the same positions of the logprob buffers
                    logprobs = jax.tree.map(lambda buf: jnp.take_along_axis(
                        buf, idx.reshape(idx.shape + (1,) * (buf.ndim - 2)), axis=1), loop.logprobs)
                return dataclasses.replace(st, loop=loop), out, logprobs
            return chunk

        def finish(st: SlotState, mask) -> SlotState:
            lp = st.loop
            loop = dataclasses.replace(lp, done=lp.done | mask,
                                       finish=jnp.where(mask & ~lp.done, STOP, lp.finish).astype(jnp.int32))
            return dataclasses.replace(st, loop=loop)

        sds, i32 = jax.ShapeDtypeStruct, jnp.int32
        state, cache1 = jax.eval_shape(empty), jax.eval_shape(staging)
        self.row_spec = jax.tree.map(lambda x: sds(x.shape[1:], x.dtype), state.inputs())  # one row's inputs
        self.key_spec = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        state_sh = cache1_sh = out_sh = lp_sh = None
        host = {"scalar": sds((), i32), "piece": {c: sds((1, c), i32) for c in self.buckets}, "want": sds((), bool),
                "history": sds((s,), i32), "row": self.row_spec, "key": self.key_spec, "mask": sds((b,), jnp.bool_),
                "table_row": sds((m,), i32), "table": sds((b, m) if paged else (b, 0), i32),
                "pages": sds((b * m,), i32)}
        if self.mesh is not None:
            mesh, rules = self.mesh, sharding.axis_rules(cfg, self.mesh)
            state_sh = sharding.with_batch_shardings(state, mesh, cfg)
            if paged:  # one pool for all rows: its KV heads on model, replicated over data; tables replicated
                state_sh = dataclasses.replace(state_sh, loop=dataclasses.replace(
                    state_sh.loop, cache=paged_cache_shardings(state.loop.cache, mesh, rules)))
            staging_5d = NamedSharding(mesh, sharding.logical_spec(sharding.CACHE_AXES, {**rules, "batch": None}))
            cache1_sh = jax.tree.map(lambda x: staging_5d if x.ndim == 5 else sharding.replicated(mesh), cache1)
            if paged:
                cache1_sh = dataclasses.replace(cache1_sh, cache=paged_cache_shardings(cache1.cache, mesh, rules))
            out_sh = sharding.replicated(mesh)
            lp_sh = {kp: sharding.with_batch_shardings(jax.eval_shape(
                lambda kp=kp: stage.empty_logprobs(b, n * (kp + 1), n_top)), mesh, cfg)
                     for kp in self.ks}  # rows on data: gathered only when fetched
            state, cache1 = sharding.sharded_abstract(state, state_sh), sharding.sharded_abstract(cache1, cache1_sh)
            host = jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=out_sh), host)

        def aot(fn, args, out, donate=()):
            return jax.jit(fn, out_shardings=out, donate_argnums=donate).lower(*args).compile()

        p = self.params
        self._params = [program_params(p, d, self.mesh) for d in self.drafters]  # each chunk program's
        self._empty = aot(empty, (), state_sh)
        self._new_staging = aot(staging, (), cache1_sh)
        self._prefill = {c: aot(prefill, (p, cache1, host["piece"][c], host["scalar"], host["piece"][c], host["want"],
                                          host["scalar"]), (cache1_sh, out_sh), (1,)) for c in self.buckets}
        self._admit = aot(admit, (state, cache1, host["scalar"], host["history"], host["scalar"], host["row"],
                                  host["key"], host["table_row"], host["scalar"]), state_sh, (0,))
        self._chunk = [aot(chunk_program(step, d.num_draft), (pp, state, host["table"]),
                           (state_sh, out_sh, lp_sh and lp_sh[d.num_draft]), (1,))
                       for step, d, pp in zip(steps, self.drafters, self._params)]
        if paged:
            self._load_prefix = aot(load_prefix, (state, cache1, host["table_row"], host["scalar"]), cache1_sh, (1,))
            self._copy_pages = aot(copy_pages, (state, host["pages"], host["pages"]), state_sh, (0,))
        self._table = np.zeros((b, m) if paged else (b, 0), np.int32)
        self._finish = aot(finish, (state, host["mask"]), state_sh, (0,))
        self.state = self._empty()
        self.key_data(SamplingParams(), 0, index=1)  # compile the host-side key helpers now, not at the first request
        if paged:  # the page ops' transfers too (a copy to the dropped page P changes nothing)
            self._put(self._row_table(()))
            self.set_pages(self._table, [(0, self.num_pages)])

    def _put(self, tree):
        """Host values -> device arguments (replicated global arrays on a mesh)."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        out = sharding.replicated(self.mesh)
        return jax.tree.map(lambda x: sharding.put_global(np.asarray(x), out), tree)

    # ------------------------------------------------------------------ host API (the lockstep ops)
    def reset(self) -> None:
        """Every slot free (after a failure)."""
        self.state = self._empty()
        self._staging, self._staged = None, []

    def begin(self, prompt: Sequence[int] = (), prefix_pages: Sequence[int] = ()) -> None:
        """Start staging a prompt (its tokens now, or by ``extend``) in a fresh one-row cache; on
        pages, ``prefix_pages`` (a cached prefix of the prompt) are loaded into it first."""
        self._staging, self._staged = self._new_staging(), [int(t) for t in prompt]
        if len(prefix_pages):
            self.load_prefix(prefix_pages)

    def load_prefix(self, prefix_pages: Sequence[int]) -> None:
        """Pages ``prefix_pages`` of the pool (a cached prefix) into the staging cache."""
        self._staging = self._load_prefix(self.state, self._staging, *self._put(
            (self._row_table(prefix_pages), np.int32(len(prefix_pages)))))

    def _row_table(self, pages: Sequence[int]) -> np.ndarray:
        row = np.full((self.max_pages,), self.num_pages, np.int32)
        row[:len(pages)] = pages
        return row

    def extend(self, tokens: Sequence[int]) -> None:
        """More tokens of the staged prompt."""
        self._staged.extend(int(t) for t in tokens)

    def prefill(self, start: int, size: int, logprobs: bool = False) -> Logprobs | None:
        """Prefill ``prompt[start:start+size]`` (padded) of the staged prompt into its cache. With
        ``logprobs`` (echo), returns the host logprobs ``[size]`` (and top ``[size, NL]``) of
        ``prompt[start+1 : start+size+1]`` under the raw logits of the positions before them."""
        if logprobs and self.spec.max_logprobs is None:
            raise ValueError("this slot engine was built without logprobs")
        piece = np.zeros((2, size), np.int32)  # the piece and the tokens each position predicts
        for row, at in enumerate((start, start + 1)):
            part = self._staged[at:at + size]
            piece[row, :len(part)] = part
        self._staging, lp = self._prefill[size](self.params, self._staging, *self._put(
            (piece[:1], np.int32(start), piece[1:], np.bool_(logprobs), np.int32(len(self._staged) - 2 - start))))
        return jax.tree.map(lambda x: x[0], sharding.fetch(lp)) if logprobs else None

    def admit(self, slot: int, row: dict, key_data: np.ndarray, pages: Sequence[int] = (), from_page: int = 0) -> None:
        """The staged prompt into slot ``slot`` with per-row inputs ``row`` (``row_inputs``); on
        pages, into the row's ``pages`` (the staging's pages ``from_page ..`` are copied there)."""
        history = np.zeros((self.s,), np.int32)
        history[:len(self._staged)] = self._staged
        if self.paged:
            self._table[slot] = self._row_table(pages)
        args = self._put((np.int32(slot), history, np.int32(len(self._staged)), row, key_data,
                          self._row_table(pages), np.int32(from_page)))
        self.state = self._admit(self.state, self._staging, *args)  # the staging stays (until ``begin``)

    def chunk(self, program: int = 0, logprobs: bool = False) -> ChunkResult:
        """Run chunk program ``program`` (index into ``drafters``); ``logprobs``: also fetch the
        appended tokens' logprobs (when a request asked; the same on every process)."""
        self.state, out, lp = self._chunk[program](self._params[program], self.state, self._put(self._table))
        out, lp = sharding.fetch((out, lp if logprobs else None))
        tokens, appended, emits, done, finish, new_tokens, steps, iters = out
        return ChunkResult(tokens, appended, emits, done, finish, new_tokens, steps, int(iters), lp)

    def set_pages(self, table: np.ndarray, copies: Sequence[tuple[int, int]] = ()) -> None:
        """Pages: the page tables ``[B, M]`` the next chunks use, after the page ``copies``
        ``(src, dst)`` (copy on write) are made in the pool."""
        self._table = np.asarray(table, np.int32).copy()
        for i in range(0, len(copies), self.b * self.max_pages):
            part = list(copies[i:i + self.b * self.max_pages])
            src = np.zeros((self.b * self.max_pages,), np.int32)
            dst = np.full((self.b * self.max_pages,), self.num_pages, np.int32)
            src[:len(part)], dst[:len(part)] = zip(*part)
            self.state = self._copy_pages(self.state, *self._put((src, dst)))

    def finish(self, mask: np.ndarray) -> None:
        """Mark the rows of ``mask [B]`` done (finish reason stop)."""
        self.state = self._finish(self.state, self._put(np.asarray(mask, bool)))

    def flush(self) -> None:
        """Nothing is deferred on one controller (``lockstep.Leader`` sends its batch of calls)."""

    def close(self) -> None:
        """Nothing to release on one controller."""

    # ------------------------------------------------------------------ host values
    def check(self, sampling: SamplingParams) -> None:
        """``ValueError`` when this engine's programs cannot serve ``sampling``."""
        if (sampling.penalized and not self.spec.penalties) or (sampling.processed and not self.spec.processing):
            raise ValueError("this slot engine was built without penalties, logit bias and min_tokens")
        if sampling.logprobs is not None and (self.spec.max_logprobs or 0) < sampling.logprobs:
            raise ValueError(f"this slot engine returns at most {self.spec.max_logprobs or 0} logprobs")

    def row_inputs(self, max_new: int, stop_ids: Sequence[int], sampling: SamplingParams) -> dict:
        """One row's value of every per-row input (the ``row`` of ``admit``), as NumPy."""
        self.check(sampling)
        if len(stop_ids) > self.ns:
            raise ValueError(f"{len(stop_ids)} stop ids; this slot engine holds {self.ns}")
        stop = np.full((self.ns,), -1, np.int32)
        stop[:len(stop_ids)] = stop_ids
        rows = jax.tree.map(lambda x: x[0], RowSampling.host([sampling]))
        return {"max_new": np.int32(max_new), "stop": stop, "rows": rows}

    @staticmethod
    def key_data(sampling: SamplingParams, seed: int, index: int = 0) -> np.ndarray:
        """The PRNG key data of one request's choice ``index``: from the request's own seed alone
        when it has one; choices after the first fold their index in (different, reproducible)."""
        key = row_keys([sampling], seed)[0]
        return np.asarray(jax.random.key_data(key if index == 0 else jax.random.fold_in(key, index)))
