"""Training S4C draft heads by self-distillation (``python -m quasar_jax.train_heads``, docs/s4c.md).

1. Data: prompts (given, or windows of a text corpus) are continued by the frozen target itself
   (``Engine``, greedy, lossless n-gram drafting only to go faster): the heads learn the target's
   own generations. ``HeadsData`` holds them (``data.npz`` in the output directory).
2. Training: each step runs the frozen target over a batch of sequences (hidden states and its
   next-token distributions), then every head teacher-forced at every generated position
   (``DraftHeads.unroll``); the loss is the cross-entropy of head i's distribution at position t
   against the target's own distribution at position t+i (both predict token t+i+1), summed over
   heads, on the generated positions only. optax AdamW (warm-up + cosine schedule,
   global-norm clipping); ``nnx.Optimizer(..., wrt=HEADS)`` and ``nnx.grad`` over the same filter,
   so the target gets neither gradients nor optimizer state.
3. Acceptance: on held-out sequences, the rank of the target's token among each head's logits
   gives ``a_i(r)``, the measured probability that head i's rank-r token is the target's; the
   tree (``s4c.choose_tree``) is grown from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from quasar_jax import sharding
from quasar_jax.cli.outputs import write_text_atomic
from quasar_jax.model.qwen3 import Qwen3
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.speculative.heads import DraftHeads, draft_vocab_ids, shift_left
from quasar_jax.speculative.s4c import choose_tree

HEADS = nnx.All(nnx.Param, nnx.PathContains("heads"))  # what is trained (and has optimizer state)
MAX_RANK = 10  # acceptance is measured for ranks 0 .. MAX_RANK-1
TREE_CANDIDATES = 64  # ranked tree paths stored with the heads (decode takes a leading part)


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass
class HeadsData:
    """Prompts and the target's continuations: ``tokens [N, T]`` (right-padded with 0),
    ``prompt_lens [N]``, ``lengths [N]`` (valid tokens: prompt + continuation)."""

    tokens: np.ndarray
    prompt_lens: np.ndarray
    lengths: np.ndarray

    @property
    def generated_tokens(self) -> int:
        return int(np.sum(self.lengths - self.prompt_lens))

    def rows(self, idx) -> "HeadsData":
        return HeadsData(self.tokens[idx], self.prompt_lens[idx], self.lengths[idx])

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.partial.npz")
        np.savez(tmp, tokens=self.tokens, prompt_lens=self.prompt_lens, lengths=self.lengths)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "HeadsData":
        with np.load(path) as f:
            return cls(f["tokens"], f["prompt_lens"], f["lengths"])


def generate_data(engine: Engine, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
                  stop_ids: tuple[int, ...], on_batch: Callable[[int], None] | None = None) -> HeadsData:
    """The target's greedy continuations of ``prompts`` (``Engine``, n-gram drafts: same output)."""
    width = max(map(len, prompts)) + max_new_tokens
    tokens = np.zeros((len(prompts), width), np.int32)
    prompt_lens = np.array([len(p) for p in prompts], np.int32)
    lengths = prompt_lens.copy()
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, drafter="ngram", stop_ids=stop_ids)
    for start in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start:start + batch_size]]
        res = engine.generate(batch, cfg)
        for i, (p, out) in enumerate(zip(batch, res.tokens)):
            row = p + out
            tokens[start + i, :len(row)] = row
            lengths[start + i] = len(row)
        if on_batch is not None:
            on_batch(len(batch))
    return HeadsData(tokens, prompt_lens, lengths)


# ----------------------------------------------------------------------------- model and loss
class HeadsTrainer(nnx.Module):
    """The frozen target and the heads being trained (only ``HEADS`` params get gradients)."""

    def __init__(self, target: Qwen3, heads: DraftHeads):
        self.target, self.heads = target, heads


def _target_pass(target: Qwen3, tokens: jax.Array):
    """The frozen target over ``tokens [B, T]``: hidden states [B, T, D], log-probs [B, T, V]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _, hidden = target(tokens, positions, target.init_cache(b, t), return_hidden=True)
    return jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(jax.nn.log_softmax(logits, axis=-1))


def _valid(prompt_lens, lengths, t: int, i: int) -> jax.Array:
    """[B, T] positions where head i (1-based) is trained: h_t of the continuation's context
    (t >= P-1) whose label position t+i is a real token (t + i <= length - 1)."""
    pos = jnp.arange(t)[None, :]
    return (pos >= prompt_lens[:, None] - 1) & (pos + i <= lengths[:, None] - 1)


def head_losses(trainer: HeadsTrainer, tokens, prompt_lens, lengths):
    """Summed loss over heads, and per head: top-1 accuracy [H] and KL(target || head) [H] (the
    loss less the target's entropy, which no head can remove) on a batch."""
    hidden, logp_t = _target_pass(trainer.target, tokens)
    losses, accs, kls = [], [], []
    for i, logits in enumerate(trainer.heads.unroll(trainer.target, hidden, tokens), start=1):
        want = shift_left(logp_t, i)  # [B, T, V] the target's distribution at position t+i
        mask = _valid(prompt_lens, lengths, tokens.shape[1], i).astype(jnp.float32)
        n = jnp.maximum(jnp.sum(mask), 1.0)
        p = jnp.exp(want)
        ce = -jnp.sum(p * jax.nn.log_softmax(logits, axis=-1), axis=-1)  # [B, T]
        entropy = -jnp.sum(p * want, axis=-1)
        hit = jnp.argmax(logits, axis=-1) == jnp.argmax(want, axis=-1)
        losses.append(jnp.sum(ce * mask) / n)
        kls.append(jnp.sum((ce - entropy) * mask) / n)
        accs.append(jnp.sum(hit * mask) / n)
    return jnp.sum(jnp.stack(losses)), (jnp.stack(accs), jnp.stack(kls))


@nnx.jit
def rank_counts(trainer: HeadsTrainer, tokens, prompt_lens, lengths, allowed=None) -> jax.Array:
    """[H, MAX_RANK + 1] counts of the rank of the target's greedy token among each head's logits
    (last column: rank >= MAX_RANK), teacher forced, over the trained positions. With ``allowed
    [V]`` (a draft vocabulary) ranks count only allowed tokens and a label outside it is a miss."""
    hidden, logp_t = _target_pass(trainer.target, tokens)
    out = []
    for i, logits in enumerate(trainer.heads.unroll(trainer.target, hidden, tokens), start=1):
        label = jnp.argmax(shift_left(logp_t, i), axis=-1)  # [B, T]
        if allowed is not None:
            logits = jnp.where(allowed, logits, -jnp.inf)
        mine = jnp.take_along_axis(logits, label[..., None], axis=-1)
        rank = jnp.minimum(jnp.sum(logits > mine, axis=-1), MAX_RANK)  # [B, T]
        if allowed is not None:
            rank = jnp.where(allowed[label], rank, MAX_RANK)
        valid = _valid(prompt_lens, lengths, tokens.shape[1], i)
        out.append(jnp.zeros((MAX_RANK + 1,), jnp.int32).at[rank].add(valid.astype(jnp.int32)))
    return jnp.stack(out)


def acceptance(trainer: HeadsTrainer, data: HeadsData, batch_size: int, draft_ids=None) -> np.ndarray:
    """``a [H, MAX_RANK]``: the measured probability that head i's rank-r token is the target's
    (with ``draft_ids``: rank among the draft vocabulary, a token outside it never accepted)."""
    counts, allowed = 0, None
    if draft_ids is not None:
        allowed = jnp.zeros((trainer.target.config.vocab_size,), bool).at[jnp.asarray(draft_ids)].set(True)
    for s in range(0, len(data.tokens), batch_size):
        part = data.rows(slice(s, s + batch_size))
        counts = counts + np.asarray(rank_counts(trainer, part.tokens, part.prompt_lens, part.lengths, allowed))
    counts = np.asarray(counts, np.float64)
    return counts[:, :MAX_RANK] / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def draft_vocab_meta(data: HeadsData, vocab_size: int, size: int) -> dict:
    """``heads.json``'s ``draft_vocab``: the ``size`` ids most frequent among the target's own
    generated tokens in ``data`` (``heads.draft_vocab_ids``) and the share of them it covers."""
    pos = np.arange(data.tokens.shape[1])[None, :]
    gen = (pos >= data.prompt_lens[:, None]) & (pos < data.lengths[:, None])
    ids = draft_vocab_ids(data.tokens, gen, vocab_size, size)
    counts = np.bincount(data.tokens[gen].ravel(), minlength=vocab_size)
    return {"size": int(size), "ids": ids.tolist(), "counted_on": f"{int(gen.sum())} generated tokens",
            "coverage": round(float(counts[ids].sum() / max(counts.sum(), 1)), 5)}


# ----------------------------------------------------------------------------- optimisation
@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0


def optimizer(trainer: HeadsTrainer, st: TrainSettings) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(0.0, st.lr, max(1, st.warmup), max(st.warmup + 1, st.steps),
                                                  end_value=st.lr * 0.05)
    decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731  matrices only
    tx = optax.chain(optax.clip_by_global_norm(st.clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=st.weight_decay, mask=decay))
    return nnx.Optimizer(trainer, tx, wrt=HEADS)


@nnx.jit
def train_step(trainer: HeadsTrainer, opt: nnx.Optimizer, tokens, prompt_lens, lengths):
    grad_fn = nnx.value_and_grad(head_losses, argnums=nnx.DiffState(0, HEADS), has_aux=True)
    (loss, (accs, kls)), grads = grad_fn(trainer, tokens, prompt_lens, lengths)
    opt.update(trainer, grads)
    return loss, accs, kls


def batch_rows(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices of ``step``'s batch: epochs of seeded permutations (so a resumed run sees the
    same batches as an uninterrupted one)."""
    idx = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = {int(e) for e in idx // n}
    perm = {e: np.random.default_rng([seed, e]).permutation(n) for e in epochs}
    return np.array([perm[int(j // n)][int(j % n)] for j in idx])


def place(trainer: HeadsTrainer, mesh) -> None:
    """On a mesh: the target on its shards, the heads replicated (data parallelism)."""
    if mesh is None:
        return
    sharding.place_model(trainer.target, mesh)
    _, state = nnx.split(trainer.heads)
    nnx.update(trainer.heads, jax.device_put(state, sharding.batch_sharding(mesh, 0)))


def put_batch(part: HeadsData, mesh):
    arrays = (part.tokens, part.prompt_lens, part.lengths)
    if mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    return tuple(sharding.put_global(a, sharding.batch_sharding(mesh, a.ndim)) for a in arrays)


class Checkpoints:
    """Resumable training state in ``directory``: the heads' and optimizer's params (orbax, the
    latest only) and the log so far (``log.json``, written with each checkpoint)."""

    def __init__(self, directory: Path):
        import orbax.checkpoint as ocp

        self.dir = directory
        self.manager = ocp.CheckpointManager(directory.resolve(), options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trainer: HeadsTrainer, opt: nnx.Optimizer, log: dict) -> None:
        import orbax.checkpoint as ocp

        state = {"heads": nnx.to_pure_dict(nnx.state(trainer.heads)), "opt": nnx.to_pure_dict(nnx.state(opt))}
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()
        write_text_atomic(self.dir / "log.json", json.dumps(log) + "\n")

    def restore(self, trainer: HeadsTrainer, opt: nnx.Optimizer) -> tuple[int, dict]:
        import orbax.checkpoint as ocp

        step = self.latest()
        heads_state, opt_state = nnx.state(trainer.heads), nnx.state(opt)
        target = {"heads": nnx.to_pure_dict(heads_state), "opt": nnx.to_pure_dict(opt_state)}
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        nnx.replace_by_pure_dict(heads_state, restored["heads"])
        nnx.replace_by_pure_dict(opt_state, restored["opt"])
        nnx.update(trainer.heads, heads_state)
        nnx.update(opt, opt_state)
        log = json.loads((self.dir / "log.json").read_text())
        return step, {k: (v[:step] if isinstance(v, list) else v) for k, v in log.items()}

    def close(self) -> None:
        self.manager.close()


# ----------------------------------------------------------------------------- tree and report
def tree_meta(acc: np.ndarray, default_nodes: int) -> dict:
    """The ranked tree paths of measured acceptance ``acc [H, R]`` (``s4c.choose_tree``) and the
    estimated tau (1 + summed path estimates) of each leading part."""
    ranked = choose_tree(acc.tolist(), TREE_CANDIDATES)
    est = np.cumsum([e for _, e in ranked])
    n = min(default_nodes, len(ranked))
    return {"paths": [list(p) for p, _ in ranked], "estimates": [round(e, 5) for _, e in ranked],
            "default_nodes": n, "estimated_tau": round(1 + float(est[n - 1]), 4),
            "estimated_tau_by_nodes": {str(k): round(1 + float(est[k - 1]), 4)
                                       for k in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64) if k <= len(ranked)}}


def plot_curve(log: dict, path: Path) -> None:
    """Training loss and per-head top-1 accuracy against the step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss, acc = np.asarray(log["loss"]), np.asarray(log["head_acc"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(np.arange(1, len(loss) + 1), loss, label="loss = target entropy + KL")
    if log.get("kl"):
        a1.plot(np.arange(1, len(log["kl"]) + 1), log["kl"], label="KL(target || heads)")
    a1.set(xlabel="step", ylabel="nats, summed over heads", title="training loss")
    a1.legend(fontsize=8)
    for i in range(acc.shape[1] if acc.ndim == 2 else 0):
        a2.plot(np.arange(1, len(acc) + 1), acc[:, i], label=f"head {i + 1}")
    a2.set(xlabel="step", ylabel="top-1 = target's token", title="per-head top-1 accuracy (train batch)", ylim=(0, 1))
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
