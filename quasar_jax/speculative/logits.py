"""The loop's logits stage: per-row processing before acceptance, logprobs after it (pure, jittable).

**Processing** turns the verifier's raw logits ``[B, T, V]`` (rows ``[root, node_0 ..]`` of a
verify forward; a chain is a tree whose node i has parent i-1) into the logits that acceptance and
sampling see, with vLLM's semantics and order, every setting a per-row device value
(``sampling.RowSampling``):

1. ``min_tokens``: a row's stop ids are ``-inf`` while the token that logits row t predicts is
   generated token number ``new_tokens + depth_t < min_tokens`` (depth 0 = the root's row);
2. ``logit_bias``: ``+ value`` at each listed id (up to ``MAX_LOGIT_BIAS`` per row);
3. ``repetition_penalty`` r over ids in the prompt or generated so far:
   ``logit / r`` where ``logit > 0``, else ``logit * r``;
4. ``frequency_penalty`` f and ``presence_penalty`` p: ``- f * count - p * (count > 0)`` over
   generated ids.

"Generated so far" at row t is exact under speculation: the tokens committed before this step
(``LoopState.counts``) plus the drafted tokens on row t's path (its node's ancestors and itself).
So each position gets the distribution autoregressive decoding would give it: greedy output with
penalties equals greedy autoregressive output with them, and speculative sampling stays exact.
The whole stage sits behind one ``lax.cond`` on "some running row uses it": a batch without
penalties, bias or min_tokens pays only that test.

**Logprobs** are those of the raw logits (before all of the above and before temperature / top-k /
top-p, as vLLM reports by default): the emitted token's ``log_softmax`` and the ``n`` most likely
ids with theirs, behind a ``lax.cond`` on "some running row asks".

``LogitsSpec`` is the static part (what the compiled program carries); everything else is data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from quasar_jax.speculative.tree import TreeDraft, ancestors

MAX_LOGIT_BIAS = 300  # logit_bias entries per row (OpenAI's limit)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class LogitsSpec:
    """What a compiled loop carries for the logits stage (static, part of the program's key).

    ``processing``: compile the processing stage (min_tokens, logit bias; behind its ``lax.cond``).
    ``penalties``: also keep the per-row token counts and prompt mask ``[B, V]`` that penalties
    need (implies ``processing``; else they are ``[B, 0]``).
    ``max_logprobs``: keep logprob buffers ``[B, S]`` and ``[B, S, max_logprobs]`` (None: none).
    ``LogitsSpec()`` is the loop without a logits stage; rows that need a missing part are refused
    by the caller (``SamplingParams.processed`` / ``penalized``).
    """

    processing: bool = False
    penalties: bool = False
    max_logprobs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "processing", bool(self.processing or self.penalties))
        n = self.max_logprobs
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
            raise ValueError(f"max_logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {n!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of tokens under the verifier's raw logits (dimension letters of CONVENTIONS)."""

    token: jax.Array  # [B, T] float32: log p(token)
    top_ids: jax.Array  # [B, T, N] int32: the N most likely ids, most likely first
    top: jax.Array  # [B, T, N] float32: their log p


def uses_processing(rows, active: jax.Array) -> jax.Array:
    """``[]`` bool: some active row has a penalty, a logit bias or min_tokens."""
    per_row = ((rows.presence_penalty != 0) | (rows.frequency_penalty != 0) | (rows.repetition_penalty != 1)
               | (rows.min_tokens > 0) | jnp.any(rows.bias_ids >= 0, axis=-1))
    return jnp.any(per_row & active)


def prompt_mask(history: jax.Array, prompt_lens: jax.Array, v: int) -> jax.Array:
    """``[B, V]`` bool: the ids among ``history[b, :prompt_lens[b]]``."""
    pos = jnp.arange(history.shape[1])[None, :]
    ids = jnp.where(pos < prompt_lens[:, None], history, v)  # v = dropped
    return jnp.zeros((history.shape[0], v), bool).at[jnp.arange(history.shape[0])[:, None], ids].set(
        True, mode="drop")


def count_tokens(counts: jax.Array, tokens: jax.Array, n: jax.Array) -> jax.Array:
    """``counts [B, V]`` plus one for each of ``tokens[b, :n[b]]`` (``tokens [B, T]``)."""
    v = counts.shape[1]
    keep = jnp.arange(tokens.shape[1])[None, :] < n[:, None]
    return counts.at[jnp.arange(tokens.shape[0])[:, None], jnp.where(keep, tokens, v)].add(1, mode="drop")


def tree_rows(tree: TreeDraft) -> tuple[jax.Array, jax.Array]:
    """For the verify logits rows ``[root, node_0 .. node_{N-1}]``: ``seen [B, N+1, N]`` (node n is
    on row t's path: an ancestor of row t's node, or that node itself) and ``depth [B, N+1]``."""
    anc, depth = ancestors(tree.parent, tree.max_depth)  # [B, N, N], [B, N]
    b, n = tree.tokens.shape
    seen = jnp.concatenate([jnp.zeros((b, 1, n), bool), anc], axis=1)
    return seen, jnp.pad(depth, ((0, 0), (1, 0)))


def process(logits: jax.Array, rows, *, stop: jax.Array, out_index: jax.Array,
            counts: jax.Array | None, prompt_ids: jax.Array | None) -> jax.Array:
    """The processed logits ``[B, T, V]`` (module docstring; every step applied to every row:
    neutral settings leave a row's logits bit for bit unchanged).

    ``stop [B, NS]`` stop ids (-1 none); ``out_index [B, T]`` the generated-token number each row
    predicts; ``counts [B, T, V]`` generated ids before each row and ``prompt_ids [B, V]`` (None:
    no penalties).
    """
    b, t, v = logits.shape
    x = logits.astype(jnp.float32)
    # 1. min_tokens: stop ids (-1 entries hit nothing) masked while out_index < min_tokens.
    is_stop = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], jnp.where(stop >= 0, stop, v)].set(
        True, mode="drop")  # [B, V]
    early = out_index < rows.min_tokens[:, None]  # [B, T]
    x = jnp.where(early[:, :, None] & is_stop[:, None, :], -jnp.inf, x)
    # 2. logit_bias.
    ids = jnp.where(rows.bias_ids >= 0, rows.bias_ids, v)
    bias = jnp.zeros((b, v), jnp.float32).at[jnp.arange(b)[:, None], ids].add(rows.bias_values, mode="drop")
    x = x + bias[:, None, :]
    if counts is None:
        return x
    # 3-4. penalties (vLLM's apply_penalties).
    seen = counts > 0  # [B, T, V]
    rep = rows.repetition_penalty[:, None, None]
    repeated = seen | prompt_ids[:, None, :]
    x = jnp.where(repeated, jnp.where(x > 0, x / rep, x * rep), x)
    x = x - rows.frequency_penalty[:, None, None] * counts.astype(jnp.float32)
    return x - rows.presence_penalty[:, None, None] * seen.astype(jnp.float32)


def accept_processed(logits: jax.Array, tree: TreeDraft, accept, rows, *, stop: jax.Array,
                     new_tokens: jax.Array, counts: jax.Array, prompt_ids: jax.Array, active: jax.Array,
                     penalties: bool):
    """``accept(process(logits))`` for one verify step's raw logits ``[B, N+1, V]`` of ``tree``;
    ``accept(logits)`` when no active row uses the stage. The ``lax.cond`` holds the acceptance
    too, so only its small outputs (tokens, n_emit) leave it, never a copy of the logits.
    ``counts [B, V]``: ids committed so far."""
    def processed():
        seen, depth = tree_rows(tree)
        row_counts = None
        if penalties:  # committed counts + the drafted tokens on each row's path
            b, n = tree.tokens.shape
            on_path = seen.astype(jnp.int32)  # [B, N+1, N]
            drafted = jnp.zeros((b, n + 1, counts.shape[1]), jnp.int32).at[
                jnp.arange(b)[:, None, None], jnp.arange(n + 1)[None, :, None], tree.tokens[:, None, :]].add(on_path)
            row_counts = counts[:, None, :] + drafted
        return accept(process(logits, rows, stop=stop, out_index=new_tokens[:, None] + depth, counts=row_counts,
                              prompt_ids=prompt_ids if penalties else None))

    return jax.lax.cond(uses_processing(rows, active), processed, lambda: accept(logits))


def token_logprobs(logits: jax.Array, tokens: jax.Array, n: int) -> Logprobs:
    """``log_softmax(logits [B, T, V])`` at ``tokens [B, T]`` and its ``n`` largest entries."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top, top_ids = jax.lax.top_k(logp, n) if n else (logp[..., :0], jnp.zeros(logp.shape[:-1] + (0,), jnp.int32))
    return Logprobs(jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0], top_ids.astype(jnp.int32), top)


def record_logprobs(buffers: Logprobs, logits: jax.Array, emit_rows: jax.Array, tokens: jax.Array,
                    write_at: jax.Array, wanted: jax.Array) -> Logprobs:
    """Write the logprobs of the emitted ``tokens [B, K+1]`` into the history-aligned ``buffers``
    (``[B, S]``, ``[B, S, N]``) at ``write_at [B, K+1]`` (S = dropped). Token j's logits are row
    ``emit_rows[b, j]`` of the raw verify ``logits [B, T, V]``. The softmax and top-N sit behind
    one ``lax.cond`` on ``wanted`` (zeros are written otherwise: a small in-place scatter)."""
    n = buffers.top_ids.shape[-1]

    def run():
        return token_logprobs(jnp.take_along_axis(logits, emit_rows[:, :, None], axis=1), tokens, n)

    b, k1 = tokens.shape
    new = jax.lax.cond(wanted, run, lambda: empty_logprobs(b, k1, n))
    rows = jnp.arange(b)[:, None]
    return jax.tree.map(lambda buf, x: buf.at[rows, write_at].set(x, mode="drop"), buffers, new)


def empty_logprobs(b: int, s: int, n: int | None) -> Logprobs:
    """Zeroed buffers ``[B, S]`` / ``[B, S, n]`` (``n`` None: ``[B, 0]`` / ``[B, 0, 0]``)."""
    s, n = (0, 0) if n is None else (s, n)
    return Logprobs(jnp.zeros((b, s), jnp.float32), jnp.zeros((b, s, n), jnp.int32),
                    jnp.zeros((b, s, n), jnp.float32))
