"""Step cost per mode: r = draft / verify, timed and by the weights each reads.

For every JAX mode that drafts, at the benchmark's batch size and cache length and with the
mode's own drafter, verifier and model: the draft alone (the drafter's ``draft`` / ``draft_tree``,
one compiled program) and the verify forward over 1 token and over the T tokens one step verifies
(K + 1 for a chain, N + 1 for a tree; causal, which costs what a tree's mask costs), each the
median of ``calls`` runs after compiling, its KV cache donated and carried from call to call
(updated in place, as in the decode loop). The history is the run's cache length, half of it
committed; the cache is dense with just the committed slots and T more (what a paged cache's
attention reads).

* ``r = draft / verify(1)``: the accelerator figure. Where a verify step is flat in its token
  count (memory bound), speed-up over autoregressive decoding = tau / (1 + r).
* ``r_step = draft / verify(T)``: the draft's share of a step on this machine.
* ``r_bytes``: weights the draft reads over the weights one verify reads (bytes, per step,
  whatever the batch): n-gram lookup reads none; QSpec's K single-token W8A8 steps read the int8
  model K times; S4C reads, per tree depth, one head block and the LM head (its draft-vocabulary
  slice when the heads carry one, int8 with its scales for an int8 target). The embedding table
  counts only as a tied LM head (a forward gathers B x T of its rows). For a mixture of experts
  every expert counts, as a verify of many rows touches most of them; what one verify touches is
  ``quasar_jax.bench.experts``' measurement.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax.model.modes import QuantMode
from quasar_jax.speculative import features
from quasar_jax.speculative.buckets import round_up
from quasar_jax.speculative.drafters import QSpecDrafter, is_tree_drafter
from quasar_jax.speculative.engine import Engine
from quasar_jax.speculative.s4c import S4CDrafter


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def verify_bytes(params) -> int:
    """Weights one forward reads: every parameter but the embedding table, unless it is the LM head."""
    embed = nbytes(params["embed_tokens"])
    return nbytes(params) - (embed if "lm_head" in params else 0)


def draft_bytes(drafter, params, extra) -> int:
    """Weights one draft reads (module docstring); ``extra`` is ``features.program_params``' part
    for the drafter (S4C: the heads' params and the draft slice or None)."""
    if isinstance(drafter, QSpecDrafter):
        return drafter.num_draft * verify_bytes(params)
    if isinstance(drafter, S4CDrafter):
        heads, vocab = extra
        block = nbytes(heads) // drafter.heads.num_heads
        if vocab is None:
            head = nbytes(params["lm_head"] if "lm_head" in params else params["embed_tokens"])
        else:
            head = nbytes({k: v for k, v in vocab.items() if k != "ids"})
        return drafter.tree.max_depth * (block + head)  # one block and one LM-head read per depth
    return 0  # n-gram lookup: the row's own history, no weights


def median_ms(fn, args, calls: int) -> float:
    """Median wall milliseconds of ``fn(*args)`` over ``calls`` runs, after one untimed run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def carried_ms(fn, args, cache, calls: int) -> float:
    """``median_ms`` of ``fn(*args, cache) -> (out, cache)`` whose cache is donated and carried from
    call to call: updated in place, as the decode loop does (a program that took the cache without
    donating it would time a copy of the whole cache as well)."""
    out, cache = jax.block_until_ready(fn(*args, cache))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        out, cache = jax.block_until_ready(fn(*args, cache))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def draft_program(graphdef, drafter):
    """``run(params, history, lengths, hidden, cache) -> (draft, cache)``: the drafter's own draft
    (``draft`` or ``draft_tree``) as the decode loop calls it, jitted with the cache donated."""
    def run(params, history, lengths, hidden, cache):
        model_params, extra = features.split_params(params, drafter)
        model = nnx.merge(graphdef, model_params)
        bound = features.bind(drafter, hidden, extra)
        if is_tree_drafter(bound):
            return bound.draft_tree(model, history, lengths, cache)
        draft, n_draft, cache = bound.draft(model, history, lengths, cache)
        return (draft, n_draft), cache
    return jax.jit(run, donate_argnums=4)


def verify_program(graphdef, mode: QuantMode = QuantMode.FLOAT):
    """``run(params, tokens [B, T], cache) -> (logits, cache)``: one verify forward of T tokens
    after the cache's committed slots (causal), jitted with the cache donated (``carried_ms``)."""
    def run(params, tokens, cache):
        pos = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        return nnx.merge(graphdef, params)(tokens, pos, cache, mode=mode)
    return jax.jit(run, donate_argnums=2)


def step_cost(engine: Engine, drafter, verifier: QuantMode, batch: int, cache_len: int, *,
              calls: int = 11) -> dict:
    """Draft and verify times and bytes of one mode (module docstring) -> a JSON-able dict."""
    model = engine.model
    params = features.program_params(engine.params, drafter)
    model_params, extra = features.split_params(params, drafter)
    fill = cache_len // 2
    rng = np.random.default_rng(0)
    period = rng.integers(0, model.config.vocab_size, 7)  # a repeating history: n-gram lookups hit
    history = jnp.asarray(np.resize(period, (batch, cache_len)), jnp.int32)
    lengths = jnp.full((batch,), fill, jnp.int32)
    hidden = jax.random.normal(jax.random.key(0), (batch, model.config.hidden_size), model.dtype)

    tree = is_tree_drafter(drafter)
    t = (drafter.num_nodes if tree else drafter.num_draft) + 1
    slots = round_up(fill + t, 16)  # attention over the committed slots, as a paged cache reads them

    def cache():  # a fresh one per program: a donated cache is gone
        return model.init_cache(batch, slots).replace(lengths=lengths - 1)

    draft = draft_program(engine.graphdef, drafter)
    out = {"verified_tokens": t, "verify_ms": {},
           "draft_ms": carried_ms(draft, (params, history, lengths, hidden), cache(), calls)}
    verify = verify_program(engine.graphdef, verifier)
    for n in sorted({1, t}):
        out["verify_ms"][str(n)] = carried_ms(verify, (model_params, history[:, fill - n:fill]), cache(), calls)
    out["draft_bytes"] = draft_bytes(drafter, model_params, extra)
    out["verify_bytes"] = verify_bytes(model_params)
    out["r"] = out["draft_ms"] / out["verify_ms"]["1"]
    out["r_step"] = out["draft_ms"] / out["verify_ms"][str(t)]
    out["r_bytes"] = out["draft_bytes"] / out["verify_bytes"]
    return out
