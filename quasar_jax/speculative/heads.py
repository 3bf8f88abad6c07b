"""S4C draft heads: light residual blocks on the frozen target's final hidden state.

Head i (1-based, i = 1..H) proposes the token at depth i below the last committed token. It is
*coherent* in the sense of S4C / Hydra / EAGLE: it sees the token chosen for the depth before
(its embedding) and the feature head i-1 computed, not the hidden state alone as Medusa does::

    f_0 = h_t                                  the target's final hidden state at position t
                                               (after the final norm: the LM head's input)
    f_i = f_{i-1} + W_out silu(W_in [norm(f_{i-1}); norm(e(x_{t+i}))])      W_in [2D, D], W_out [D, D]
    logits_i = lm_head(f_i)                    predicts x_{t+i+1}

The target's LM head ``lm_head`` and embedding ``e`` are REUSED (``Qwen3.lm_logits`` /
``Qwen3.embed``), so the heads hold only their blocks (~3 D^2 parameters each) and their checkpoint
is small. ``W_out`` starts at zero: an untrained head predicts what the target predicts next.
In a decode step ``h_t`` is the hidden state at position ``lengths - 2`` (whose logits produced the
last committed token ``x_{t+1}``), so head 1 proposes the token after it (``quasar_jax.speculative.s4c``).

A heads directory (``save_heads`` / ``load_heads``)::

    heads.json     {"format": 1, "num_heads", "hidden_size", "vocab_size", "rms_norm_eps", "dtype",
                    "model": fingerprint of the target, "tree": {...}, "acceptance": {...},
                    "draft_vocab": {"size": N, "ids": [...], "counted_on": ...} (optional), ...}
    params/        orbax-checkpoint of the heads' parameter pytree

Draft vocabulary: with ``draft_vocab`` the heads score only N target tokens (the most frequent
ones of the self-distillation corpus, :func:`draft_vocab_ids`) through a gathered slice of the LM
head (:func:`draft_slice`, ``[D, N]`` or for a tied embedding ``[N, D]``; an int8 head gives its
int8 columns and their scales), made once per compiled program; top-k ranks over the slice are
mapped back to token ids. Heads without it (older directories) score the full vocabulary.
Verification is the target's, so output is unchanged; only proposals outside the N are lost.

Dimension letters: docs/CONVENTIONS.md (H here counts draft heads, not attention heads).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax.cli.errors import InputError
from quasar_jax.cli.outputs import staged_dir, write_text_atomic
from quasar_jax.model.modes import QuantMode
from quasar_jax.model.quant import dequantize, is_quantized, quantize_kernel
from quasar_jax.model.qwen3 import Linear, Qwen3, RMSNorm
from quasar_jax.weights.loading import DEMO_MODEL_DIR

META = "heads.json"
FORMAT = 1
DEFAULT_DIRNAME = "s4c_heads"  # heads saved beside a model: <model dir>/s4c_heads
DEMO_HEADS_DIR = DEMO_MODEL_DIR / DEFAULT_DIRNAME
FINGERPRINT_RTOL = 0.02  # weight statistics may differ this much (float32 vs bfloat16 or int8 loads)


class HeadBlock(nnx.Module):
    """One draft head: ``f' = f + W_out silu(W_in [norm(f); norm(e)])`` (module docstring)."""

    def __init__(self, d: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.feat_norm = RMSNorm(d, eps, dtype=dtype)
        self.token_norm = RMSNorm(d, eps, dtype=dtype)
        self.w_in = Linear(2 * d, d, dtype=dtype, rngs=rngs)
        self.w_out = Linear(d, d, dtype=dtype, rngs=rngs)
        self.w_out.kernel.set_value(jnp.zeros((d, d), dtype))  # start as the identity on f

    def __call__(self, feat: jax.Array, emb: jax.Array) -> jax.Array:
        """feat, emb [..., D] -> the next feature [..., D] (in the heads' dtype)."""
        dtype = self.w_in.kernel.dtype
        feat, emb = feat.astype(dtype), emb.astype(dtype)
        u = jnp.concatenate([self.feat_norm(feat), self.token_norm(emb)], axis=-1)  # [..., 2D]
        return feat + self.w_out(jax.nn.silu(self.w_in(u)))


class DraftHeads(nnx.Module):
    """H draft heads for one target model (the target is not part of this module)."""

    def __init__(self, num_heads: int, hidden_size: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.blocks = nnx.List([HeadBlock(hidden_size, eps, dtype=dtype, rngs=rngs) for _ in range(num_heads)])
        self.hidden_size, self.eps = hidden_size, eps

    @property
    def num_heads(self) -> int:  # H
        return len(self.blocks)

    def unroll(self, model: Qwen3, hidden: jax.Array, tokens: jax.Array) -> list[jax.Array]:
        """Teacher-forced training / evaluation pass of every head at every position.

        ``hidden [B, T, D]`` are the target's final hidden states of ``tokens [B, T]``. Returns H
        logits ``[B, T, V]``: entry i-1 at position t predicts ``tokens[t + i + 1]`` from ``f_{i-1}``
        and ``tokens[t + i]`` (positions past the end see padding; mask them out).
        """
        feat, out = hidden, []
        for i, block in enumerate(self.blocks):
            nxt = shift_left(tokens, i + 1)  # [B, T]: x_{t+i+1}
            feat = block(feat, model.embed(nxt))
            out.append(head_logits(model, feat))
        return out


def shift_left(x: jax.Array, i: int) -> jax.Array:
    """``x[:, t + i]`` at position t (zero-padded past the end)."""
    return jnp.pad(x[:, i:], ((0, 0), (0, i)) + ((0, 0),) * (x.ndim - 2))


def draft_slice(model_params, ids, *, int8: bool | None = None) -> dict:
    """The LM head's columns of the draft vocabulary ``ids [N]`` from the target's parameters
    (``nnx.split(model)[1]``), gathered once (a run-time input of the compiled program):
    ``{"ids", "kernel" [D, N]}`` for an untied float head, ``{"ids", "embed" [N, D]}`` for a tied
    embedding, ``{"ids", "qvalue" [D, N] int8, "scale" [N]}`` for int8 reads. Reads are int8 when
    ``int8`` (default: when the target is an int8 model, as Quasar's verifier): an int8 LM head
    gives its own columns and scales, a float one (tied or not) is quantised per column here."""
    int8 = has_int8(model_params) if int8 is None else bool(int8)
    return _gather_slice(model_params, jnp.asarray(ids, jnp.int32), int8)  # one program: the params may span processes


@functools.partial(jax.jit, static_argnums=(2,))
def _gather_slice(model_params, ids, int8: bool) -> dict:
    out = {"ids": ids}
    head = model_params["lm_head"] if "lm_head" in model_params else None
    if head is not None and "qvalue" in head:
        out["qvalue"] = jnp.take(head["qvalue"][...], ids, axis=1)
        out["scale"] = jnp.take(head["scale"][...], ids, axis=0)
        return out if int8 else {"ids": ids, "kernel": dequantize(out["qvalue"], out["scale"])}
    if head is None:
        cols = jnp.take(model_params["embed_tokens"][...], ids, axis=0)  # [N, D]
        if not int8:
            return {**out, "embed": cols}
        cols = cols.T
    else:
        cols = jnp.take(head["kernel"][...], ids, axis=1)  # [D, N]
        if not int8:
            return {**out, "kernel": cols}
    out["qvalue"], out["scale"] = quantize_kernel(cols, name="the draft slice of the LM head")
    return out


def has_int8(model_params) -> bool:
    """Whether the target's parameters hold int8 weights (an int8 model, Quasar's verifier)."""
    return any(getattr(k, "key", None) == "qvalue" for path, _ in
               jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(model_params))[0] for k in path)


def slice_logits(model: Qwen3, feat: jax.Array, vocab: dict) -> jax.Array:
    """Logits ``[..., N]`` float32 of ``feat [..., D]`` over a :func:`draft_slice` (int8 columns:
    the weight-only product, the float activations times the int8 weights, then the scales)."""
    x = feat.astype(model.dtype)
    if "embed" in vocab:
        y = jnp.einsum("...d,nd->...n", x, vocab["embed"], preferred_element_type=jnp.float32)
    elif "qvalue" in vocab:
        y = jnp.einsum("...d,dn->...n", x, vocab["qvalue"].astype(x.dtype), preferred_element_type=jnp.float32)
        y = y * vocab["scale"].astype(jnp.float32)
    else:
        y = jnp.einsum("...d,dn->...n", x, vocab["kernel"], preferred_element_type=jnp.float32)
    return y.astype(jnp.float32)


def draft_vocab_ids(tokens: np.ndarray, mask: np.ndarray, vocab_size: int, size: int) -> np.ndarray:
    """The ``size`` most frequent ids among ``tokens[mask]`` (ties and unseen ids: smaller id
    first), in decreasing frequency."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {size}")
    counts = np.bincount(np.asarray(tokens)[np.asarray(mask, bool)].ravel(), minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count desc, then id asc
    return order[:size].astype(np.int32)


def head_logits(model: Qwen3, feat: jax.Array) -> jax.Array:
    """The target's LM head on a head feature ``[..., D]`` -> logits ``[..., V]`` float32 (int8
    models: the weight-only path, whatever the verifier)."""
    mode = QuantMode.W8A16 if is_quantized(model) else QuantMode.FLOAT
    return model.lm_logits(feat.astype(model.dtype), mode=mode)


# ----------------------------------------------------------------------------- model fingerprint
STAT_KEYS = ("embed_mean_abs", "embed_row0_norm", "lm_head_mean_abs", "lm_head_cols_norm",
             "final_norm_mean", "final_norm_signed")


@jax.jit
def _checksums(emb, head_q, head_scale, norm):
    """Statistics of the weights the heads read: the embedding, the LM head (``head_q * head_scale``
    column-wise: an int8 head is read as such, a float one has scale 1) and the final norm (whose
    "signed" sum weights its entries by a fixed +-1 pattern, so a permutation shows)."""
    f32 = jnp.float32

    def signed(x):  # sum of x * (+1, -1, +1, ...) over a fixed flattening, normalised by the size
        flat = x.reshape(-1).astype(f32)
        sign = 1.0 - 2.0 * (jnp.arange(flat.shape[0]) % 3 == 1)
        return jnp.sum(flat * sign) / flat.shape[0] * 100.0

    head = head_q.astype(f32) * head_scale.astype(f32)[None, :]  # [D, V]
    return (jnp.mean(jnp.abs(emb.astype(f32))), jnp.linalg.norm(emb[0].astype(f32)),
            jnp.mean(jnp.abs(head)), jnp.linalg.norm(head[:, :8]),
            jnp.mean(norm.astype(f32)), signed(norm))


def fingerprint(model: Qwen3) -> dict:
    """What heads must match: the shapes they were built for and checksums of the weights they read,
    so heads of another checkpoint of the same shape (or of a fine-tune that changed only its LM
    head or final norm) are refused too: statistics of the embedding, the LM head (as read, int8
    columns times their scales) and the final norm, one reduction each, and two of the logits the
    final norm and LM head give a fixed feature. Reduced on device: only numbers reach the host."""
    if model.lm_head is None:  # tied: the LM head is the embedding
        q, scale = model.embed_tokens[...].T, jnp.ones((model.config.vocab_size,), jnp.float32)
    elif hasattr(model.lm_head, "qvalue"):
        q, scale = model.lm_head.qvalue[...], model.lm_head.scale[...]
    else:
        q, scale = model.lm_head.kernel[...], jnp.ones((model.config.vocab_size,), jnp.float32)
    stats = _checksums(model.embed_tokens[...], q, scale, model.norm.scale[...])
    probe = jnp.cos(jnp.arange(model.config.hidden_size, dtype=jnp.float32) * 0.37)[None]  # [1, D]
    logits = head_logits(model, model.norm(probe.astype(model.dtype)))[0]  # [V]
    return {"hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
            "num_hidden_layers": model.config.num_hidden_layers,
            **{k: float(v) for k, v in zip(STAT_KEYS, stats)},
            "head_probe_mean_abs": float(jnp.mean(jnp.abs(logits))), "head_probe_std": float(jnp.std(logits))}


_STATISTICS = {"embed_mean_abs": "embedding", "embed_row0_norm": "embedding",
               "head_probe_mean_abs": "final norm and LM head", "head_probe_std": "final norm and LM head",
               "lm_head_mean_abs": "LM head", "lm_head_cols_norm": "LM head",
               "final_norm_mean": "final norm", "final_norm_signed": "final norm"}


def check_model(meta: dict, model: Qwen3, where: str) -> None:
    """One-line ``InputError`` when the heads described by ``meta`` do not fit ``model``."""
    want, have = meta["model"], fingerprint(model)
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if want.get(key) != have[key]:
            raise InputError(f"heads {where} do not match the model: they were trained for {key} "
                             f"{want.get(key)}, the model has {have[key]}")
    for key, what in _STATISTICS.items():
        if key not in want:  # heads saved before this statistic was recorded
            continue
        w, h = float(want[key]), have[key]
        if abs(w - h) > FINGERPRINT_RTOL * max(abs(w), abs(h), 1e-6):
            raise InputError(f"heads {where} do not match the model: they were trained for another "
                             f"model of the same shape ({what}: {key} {w:.5g} vs {h:.5g})")
    ids = meta.get("draft_vocab", {}).get("ids") if isinstance(meta.get("draft_vocab"), dict) else None
    if ids is not None and (min(ids) < 0 or max(ids) >= have["vocab_size"]):
        raise InputError(f"heads {where}: draft_vocab ids outside the model's vocabulary of {have['vocab_size']}")


# ----------------------------------------------------------------------------- save / load
class LoadedHeads:
    """Heads restored from a directory: the module split for use inside compiled programs.

    Hashed by identity (it holds arrays): a drafter holding it keys its compiled programs by it.
    """

    def __init__(self, heads: DraftHeads, meta: dict, path: Path | None):
        self.graphdef, self.params = nnx.split(heads)
        self.meta, self.path = meta, path

    @property
    def num_heads(self) -> int:
        return int(self.meta["num_heads"])

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "(in memory)"

    def module(self, params=None) -> DraftHeads:
        return nnx.merge(self.graphdef, self.params if params is None else params)

    def check_model(self, model: Qwen3) -> None:
        check_model(self.meta, model, self.where)

    @property
    def draft_ids(self) -> np.ndarray | None:
        """[N] token ids the heads score (None: the full vocabulary)."""
        dv = self.meta.get("draft_vocab")
        return None if dv is None else np.asarray(dv["ids"], np.int32)

    def full_vocab(self) -> "LoadedHeads":
        """These heads scoring every token (their draft vocabulary dropped): the draft
        vocabulary's cost in tau shows as the difference."""
        return LoadedHeads(self.module(), {k: v for k, v in self.meta.items() if k != "draft_vocab"}, self.path)

    def usable_nodes(self, depth: int) -> int:
        """Nodes of the stored ranked tree at depth <= ``depth`` (any leading part is a tree)."""
        return sum(1 for p in self.meta["tree"]["paths"] if len(p) <= depth)


def heads_meta(heads: DraftHeads, model: Qwen3, **extra) -> dict:
    return {"format": FORMAT, "num_heads": heads.num_heads, "hidden_size": heads.hidden_size,
            "vocab_size": model.config.vocab_size, "rms_norm_eps": heads.eps, "model": fingerprint(model),
            **extra}


def write_heads(heads: DraftHeads, meta: dict, directory: Path, *, dtype=jnp.bfloat16) -> None:
    """Write ``params/`` (``heads`` cast to ``dtype``) and ``heads.json`` into ``directory``."""
    import orbax.checkpoint as ocp

    state = jax.tree.map(lambda x: jnp.asarray(x, dtype), nnx.to_pure_dict(nnx.state(heads)))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(Path(directory).resolve() / "params", state)
        ckpt.wait_until_finished()
    write_text_atomic(Path(directory) / META, json.dumps({**meta, "dtype": jnp.dtype(dtype).name}, indent=1) + "\n")


def save_heads(heads: DraftHeads, meta: dict, out_dir: str | os.PathLike, *, dtype=jnp.bfloat16) -> Path:
    """``write_heads`` into ``out_dir`` all or nothing (a hidden sibling renamed into place)."""
    with staged_dir(out_dir) as stage:
        write_heads(heads, meta, stage, dtype=dtype)
    return Path(out_dir)


def read_meta(path: Path) -> dict:
    """``heads.json`` of a heads directory, checked field by field (one-line errors)."""
    marker = path / META
    if not path.is_dir():
        raise InputError(f"heads directory not found: {path}")
    if not marker.is_file():
        raise InputError(f"{path} is not a heads directory (no {META}); train heads with "
                         "python -m quasar_jax.train_heads")
    try:
        meta = json.loads(marker.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{marker} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{marker}: unsupported format (expected {{\"format\": {FORMAT}, ...}})")
    for key in ("num_heads", "hidden_size", "vocab_size", "model", "dtype", "tree"):
        if key not in meta:
            raise InputError(f"{marker} lacks field {key!r}")
    dv = meta.get("draft_vocab")
    if dv is not None:
        ids = dv.get("ids") if isinstance(dv, dict) else None
        if (not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
                or len(set(ids)) != len(ids) or dv.get("size") != len(ids)):
            raise InputError(f"{marker}: field 'draft_vocab' must be {{\"size\": N, \"ids\": [N distinct token ids]}}")
    if not (path / "params").is_dir():
        raise InputError(f"heads directory {path} is missing params/")
    return meta


def resolve_heads(heads: str | os.PathLike | None, model_dir: str | os.PathLike, *, num_draft: int | None = None,
                  tree_nodes: int | None = None) -> "LoadedHeads":
    """``--heads`` of a command line: the given heads directory, else the heads saved beside the
    model (``<model dir>/s4c_heads``: for the demo model, the shipped heads); one-line errors, also
    for a ``--num-draft`` / ``--tree-nodes`` the heads cannot serve."""
    if heads is not None:
        where, loaded = heads, _load_dir(Path(heads).expanduser())
    else:
        where = path = Path(model_dir) / DEFAULT_DIRNAME
        if not (path / META).is_file():
            raise InputError(f"--drafter s4c: no heads beside the model ({path}); give --heads DIR, or train them: "
                             f"python -m quasar_jax.train_heads --model {model_dir} --out {path}")
        loaded = _load_dir(path)
    h = loaded.num_heads
    if num_draft is not None and num_draft > h:
        raise InputError(f"--num-draft {num_draft}: the heads at {where} are {h} (the deepest tree level)")
    depth = min(num_draft or h, h)
    usable = loaded.usable_nodes(depth)
    if tree_nodes is not None and tree_nodes > usable:
        raise InputError(f"--tree-nodes {tree_nodes}: the tree of the heads at {where} has {usable} nodes "
                         f"of depth <= {depth}")
    return loaded


def _load_dir(path: Path) -> LoadedHeads:
    """The heads directory ``path`` (errors name it as given), through a cache keyed by its
    resolved path and the time ``heads.json`` was written."""
    meta = read_meta(path)
    return _load(str(path.resolve()), (path / META).stat().st_mtime_ns, json.dumps(meta, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _load(path: str, stamp: int, meta_json: str) -> LoadedHeads:
    del stamp  # part of the cache key: a rewritten directory is loaded again
    import orbax.checkpoint as ocp

    p = Path(path)
    meta = json.loads(meta_json)
    abstract = nnx.eval_shape(lambda: DraftHeads(int(meta["num_heads"]), int(meta["hidden_size"]),
                                                 eps=float(meta.get("rms_norm_eps", 1e-6)),
                                                 dtype=jnp.dtype(meta["dtype"])))
    graphdef, state = nnx.split(abstract)
    # Every process of a multi-process group reads the whole (small) checkpoint on its own: no
    # barrier with the others, the arrays on a local device (then replicated by the program).
    pid, device = jax.process_index(), jax.local_devices()[0]
    alone = ocp.options.MultiprocessingOptions(primary_host=pid, active_processes={pid},
                                               barrier_sync_key_prefix=f"heads-p{pid}")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
                          nnx.to_pure_dict(state))
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckpt:
            restored = ckpt.restore(p / "params", target)
    except Exception as err:  # orbax reports missing / mismatched arrays in many shapes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"could not restore heads from {p / 'params'}: {first}") from None
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), restored))
    heads = nnx.merge(graphdef, state)
    return LoadedHeads(heads, meta, p)


def load_heads(path: str | os.PathLike = "demo") -> LoadedHeads:
    """Heads from a directory (``"demo"``: the shipped heads of the demo model; a model directory:
    the heads saved beside it), as float32. Loads are cached per path, so repeated configs share
    one object (and so one compiled program)."""
    p = DEMO_HEADS_DIR if str(path) == "demo" else Path(path).expanduser()
    if (p / "config.json").is_file() and not (p / META).is_file():
        p = p / DEFAULT_DIRNAME
    return _load_dir(p)
