"""The device state of the serving slots: ``SlotState`` (the loop's state for B rows and every
per-row input of ``step``), ``Staging`` (one prompt's prefill), an empty loop state, the row
update ``admit`` uses (``quasar_jax.serving.slots``), and ``ChunkResult`` (the host copy of what
a chunk produced)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from quasar_jax.model.kv_cache import KVCache
from quasar_jax.model.paged_kv_cache import PagedKVCache
from quasar_jax.speculative import logits as stage
from quasar_jax.speculative.engine import LoopState
from quasar_jax.speculative.logits import LogitsSpec, Logprobs
from quasar_jax.speculative.results import LENGTH
from quasar_jax.speculative.sampling import RowSampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """All device state of the slots (dimension letters of docs/CONVENTIONS.md)."""

    loop: LoopState  # B rows; a done row is a free (or finishing) slot
    max_new: jax.Array  # [B] int32 token budgets
    stop: jax.Array  # [B, NS] int32 stop ids (-1 = none)
    rows: RowSampling  # [B] sampling settings

    def inputs(self) -> dict:
        """The per-row inputs of ``step`` (every field but ``loop``; each leaf ``[B, ...]``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "loop"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Staging:
    """One request's prefill: its K/V and (drafters with ``uses_hidden``) the hidden state of
    prompt position P-2 (``[1, D]``, zeros until the piece holding it is prefilled)."""

    cache: KVCache | PagedKVCache  # pages: one row's own M pages (copied into the pool by admit)
    hidden: jax.Array | None = None


def set_row(full, slot, one):
    """Row ``slot`` of every ``[B, ...]`` leaf of ``full`` := the leaf of ``one`` (scalars kept)."""
    return jax.tree.map(lambda a, v: a.at[slot].set(v) if a.ndim else a, full, one)


def empty_loop(cfg, dtype, b: int, s: int, k: int, spec: LogitsSpec, *, hidden: bool = False,
                cache=None) -> LoopState:
    """A ``LoopState`` with every row done (every slot free); ``hidden``: it carries ``[B, D]``."""
    zeros = jnp.zeros((b,), jnp.int32)
    v = cfg.vocab_size if spec.penalties else 0
    return LoopState(history=jnp.zeros((b, s), jnp.int32), lengths=jnp.ones((b,), jnp.int32),
                     cache=KVCache.init(cfg, b, s, dtype) if cache is None else cache, done=jnp.ones((b,), bool),
                     finish=jnp.full((b,), LENGTH, jnp.int32), new_tokens=zeros, steps=zeros,
                     emitted_hist=jnp.zeros((b, k + 2), jnp.int32),
                     keys=jax.random.split(jax.random.key(0), b), iteration=jnp.zeros((), jnp.int32),
                     counts=jnp.zeros((b, v), jnp.int32), prompt_ids=jnp.zeros((b, v), bool),
                     logprobs=stage.empty_logprobs(b, s, spec.max_logprobs),
                     hidden=jnp.zeros((b, cfg.hidden_size), dtype) if hidden else None)


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """Host copy of what one ``chunk`` call produced."""

    tokens: np.ndarray  # [B, N*(K+1)] tokens appended per row (valid: the first appended[b])
    appended: np.ndarray  # [B] tokens appended in this chunk
    emits: np.ndarray  # [N, B] tokens appended by each verify step (0 for steps not run / frozen)
    done: np.ndarray  # [B] bool
    finish: np.ndarray  # [B] int32 FinishReason code (see results.FINISH_CODES)
    new_tokens: np.ndarray  # [B]
    steps: np.ndarray  # [B] verify steps while active
    iterations: int  # loop iterations run by this chunk
    logprobs: Logprobs | None = None  # [B, N*(K+1)] (, NL) of ``tokens``, when asked for

    @property
    def row_steps(self) -> int:
        """Verify steps summed over the rows that emitted (tau = appended.sum() / row_steps)."""
        return int(np.sum(self.emits > 0))
