"""Feature reuse: the target's hidden state carried by the decode loop for drafters that read it.

A drafter with ``uses_hidden = True`` (S4C's heads, ``quasar_jax.speculative.s4c``) drafts from the final
hidden state of position ``lengths - 2``: the position whose logits gave the last committed token.
The loop state then carries it as ``LoopState.hidden [B, D]``; the prefill supplies it
(:func:`prefill_hidden`) and every verify forward, chain or tree, gathers it behind the last
emitted token (:func:`reused_hidden`), so drafting needs no extra target forward.

A drafter with ``params`` (a pytree of arrays, e.g. the heads' weights) gets them as a run-time
input of the compiled program, next to the model's (:func:`program_params`), instead of as
constants baked into it; ``bind(hidden, params)`` gives the drafter of one loop step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from quasar_jax import sharding


def uses_hidden(drafter) -> bool:
    return bool(getattr(drafter, "uses_hidden", False))


def has_params(drafter) -> bool:
    return getattr(drafter, "params", None) is not None


def program_params(params, drafter, mesh=None):
    """What ``make_program``'s functions take as ``params``: the model's params, paired with the
    drafter's own (``drafter.params``; replicated on ``mesh``) when it has any."""
    if not has_params(drafter):
        return params
    own = getattr(drafter, "program_params", None)  # params derived from the model's (S4C's LM head slice)
    extra = own(params) if callable(own) else drafter.params
    if mesh is not None:
        extra = jax.tree.map(lambda x: _replicated(x, sharding.batch_sharding(mesh, 0)), extra)
    return params, extra


def _replicated(x: jax.Array, where) -> jax.Array:
    """``x`` replicated on ``where``, also across processes: a process-local array (the heads as
    each process read them) from its host copy, a global one (derived from the sharded model's
    params) by a resharding program every process runs."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=where)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, where, lambda index: host[index])


def split_params(params, drafter):
    """``program_params``' inverse: (model params, the drafter's params or None)."""
    return params if has_params(drafter) else (params, None)


def bind(drafter, hidden, extra):
    """The drafter of one loop step (``drafter.bind`` when it has one, else the drafter itself)."""
    return drafter.bind(hidden, extra) if callable(getattr(drafter, "bind", None)) else drafter


def prefill_hidden(hidden: jax.Array, prompt_lens: jax.Array) -> jax.Array:
    """The prefill's hidden states ``[B, P-1, D]`` -> those of position P-2 per row ``[B, D]``
    (a 1-token prompt has none: zeros, its first drafts are then poor, never wrong)."""
    at = jnp.maximum(prompt_lens - 2, 0)[:, None, None]
    return jnp.where((prompt_lens >= 2)[:, None], jnp.take_along_axis(hidden, at, axis=1)[:, 0], 0)


def reused_hidden(old: jax.Array, done: jax.Array, verify_hidden: jax.Array, emit_rows: jax.Array,
                  n_emit: jax.Array) -> jax.Array:
    """The next step's ``hidden [B, D]``: the verify forward's hidden state (``[B, T, D]``) at the
    row whose logits gave the last emitted token (``emit_rows [B, K+1]``, ``n_emit [B]``);
    finished rows keep ``old``."""
    at = jnp.take_along_axis(emit_rows, jnp.maximum(n_emit - 1, 0)[:, None], axis=1)  # [B, 1]
    return jnp.where(done[:, None], old, jnp.take_along_axis(verify_hidden, at[:, :, None], axis=1)[:, 0])
