"""Qwen3 mixture-of-experts layer: a float32 router and dropless experts (grouped matmuls).

The layer replaces the dense MLP of the sparse layers of a ``Qwen3MoeForCausalLM``
(``Qwen3Config.is_moe_layer``). It computes what transformers' ``Qwen3MoeSparseMoeBlock`` does:

    probs   = softmax(x @ router.T)                     [N, X]   float32 (N = B*T tokens)
    w, e    = top_k(probs, k)                           [N, k]   (w / sum(w) if norm_topk_prob)
    y[n]    = sum_j w[n, j] * expert_{e[n, j]}(x[n])    expert(x) = down(silu(gate(x)) * up(x))

Letters: B T D as in docs/CONVENTIONS.md, plus X (experts), k (experts per token), F (an expert's
width ``moe_intermediate_size``), N = B*T tokens and M = N*k routed rows.

Dropless, never an all-experts einsum: the M = N*k (token, expert) pairs are sorted by expert,
the token rows gathered in that order, and each projection is a grouped matmul over contiguous
groups (``group_sizes [X]``). Two implementations of the grouped matmul, equal to rounding:

* ``ragged``: ``jax.lax.ragged_dot`` (TPU: the Mosaic grouped-matmul kernel; GPU: XLA's ragged dot).
  JAX lowers it on CPU to a masked dense product over all X experts, so on CPU it reads every expert.
* ``blocked``: the groups padded to multiples of a row block ``b``; each block of ``b`` rows
  belongs to one expert, whose weights it gathers (``[nb, b, I] x [nb, I, O]``): only the experts a
  block routes to are read, the waste is at most ``b - 1`` padding rows per touched expert. The
  default on CPU (inference and training; ``ragged_dot``'s CPU backward is a dense X-fold product).

``SparseMoeBlock.impl`` (``None``: ``blocked`` on CPU, ``ragged`` elsewhere) picks one.

Expert parallelism: a block whose ``expert_mesh`` is set (``quasar_jax.sharding.place_model`` sets
it when the mesh's ``model`` axis is > 1) runs under ``jax.shard_map``: the experts are split over
the ``model`` axis (device m holds experts ``[m X/M, (m+1) X/M)``), every device routes all tokens
of its ``data`` rows (the router is replicated), computes only the pairs routed to its own experts,
and the partial outputs are summed over ``model`` (one ``psum`` of ``[B, T, D]``, the collective a
tensor-parallel MLP does too). Outputs equal one device to float rounding (the sum order differs).

Int8 experts (``quasar_jax.model.quant.Int8ExpertLinear``) use the same formula as the dense
``Int8Linear`` (``pallas_kernels``' reference): per-expert per-output-channel scales, W8A16 or W8A8
chosen per call by ``mode``; the router and the norms stay float.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.modes import QuantMode

_init = nnx.initializers.normal(0.02)
IMPLS = ("ragged", "blocked")


def default_impl() -> str:
    """``blocked`` on CPU (it reads only the routed experts there), ``ragged`` on TPU / GPU."""
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


def dot_precision(dtype) -> jax.lax.Precision:
    """``HIGHEST`` for float32 operands (no TF32 / bf16 passes), the default otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


# ----------------------------------------------------------------------------- routing
def route(x: jax.Array, weight: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """``x [N, D]``, router ``weight [X, D]`` -> ``(weights [N, k] float32, experts [N, k] int32)``.

    In float32: softmax over the X experts, top-k (ties: the lower expert id), renormalised to sum
    1 when ``norm_topk_prob`` (transformers' ``Qwen3MoeTopKRouter``).
    """
    logits = jnp.einsum("nd,xd->nx", x.astype(jnp.float32), weight.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    top, experts = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top, experts.astype(jnp.int32)


def dispatch(experts: jax.Array, k: int, num_local: int, offset) -> dict:
    """Sort the ``M = N*k`` routed pairs by expert (only experts ``[offset, offset + num_local)``).

    Returns ``order [M]`` (pair index, sorted), ``token [M]`` (its token row), ``row_expert [M]``
    (its local expert; ``num_local`` for a pair routed elsewhere, sorted last) and
    ``group_sizes [num_local]``.
    """
    local = experts.reshape(-1) - offset  # [M]
    key = jnp.where((local >= 0) & (local < num_local), local, num_local).astype(jnp.int32)
    order = jnp.argsort(key, stable=True)
    row_expert = key[order]
    group_sizes = jnp.zeros((num_local + 1,), jnp.int32).at[key].add(1)[:num_local]
    return dict(order=order, token=(order // k).astype(jnp.int32), row_expert=row_expert,
                group_sizes=group_sizes)


# ----------------------------------------------------------------------------- blocked layout
def block_rows(m: int, num_experts: int) -> int:
    """Row block of the blocked grouped matmul for ``m`` routed rows (a power of two in [8, 128])."""
    per_expert = -(-m // num_experts)
    return int(min(128, max(8, 1 << max(0, per_expert - 1).bit_length())))


class BlockPlan:
    """Where each sorted row goes in the padded block layout ``[nb, b, .]`` and each block's expert."""

    def __init__(self, row_expert: jax.Array, group_sizes: jax.Array, b: int):
        m, x = row_expert.shape[0], group_sizes.shape[0]
        self.b = b
        self.nb = -(-m // b) + min(x, m)  # sum over groups of ceil(size / b) is at most this
        padded = -(-group_sizes // b) * b  # [X]
        pad_start = jnp.cumsum(padded) - padded  # [X] exclusive
        start = jnp.cumsum(group_sizes) - group_sizes
        valid = row_expert < x
        e = jnp.minimum(row_expert, x - 1)
        rank = jnp.arange(m, dtype=jnp.int32) - start[e]
        # padded slot of each sorted row; pairs routed elsewhere go past the end (dropped, read as 0)
        self.slot = jnp.where(valid, pad_start[e] + rank, self.nb * b).astype(jnp.int32)  # [M]
        ends = jnp.cumsum(padded)  # [X]
        block_start = jnp.arange(self.nb, dtype=jnp.int32) * b
        owner = jnp.searchsorted(ends, block_start, side="right").astype(jnp.int32)  # [nb]
        last = jnp.searchsorted(ends, jnp.maximum(ends[-1] - 1, 0), side="right").astype(jnp.int32)
        # unused blocks (past the padded rows) reread the last used expert (no extra weights read)
        self.block_expert = jnp.minimum(jnp.where(owner < x, owner, last), x - 1)

    def to_blocks(self, rows: jax.Array) -> jax.Array:
        """``rows [M, I]`` (sorted) -> ``[nb, b, I]`` with zero padding rows."""
        out = jnp.zeros((self.nb * self.b, rows.shape[-1]), rows.dtype)
        return out.at[self.slot].set(rows, mode="drop").reshape(self.nb, self.b, -1)

    def from_blocks(self, blocks: jax.Array) -> jax.Array:
        """``[nb, b, O]`` -> the sorted rows ``[M, O]`` (0 for pairs routed elsewhere)."""
        flat = blocks.reshape(self.nb * self.b, -1)
        return jnp.take(flat, self.slot, axis=0, mode="fill", fill_value=0)


# ----------------------------------------------------------------------------- experts
class ExpertLinear(nnx.Module):
    """The X experts' float weights for one projection: ``kernel [X, I, O]`` (torch ``weight``
    transposed per expert). Multiplies sorted rows by their experts' kernels."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs.params(), (num_experts, d_in, d_out), dtype))

    @property
    def num_experts(self) -> int:
        return self.kernel.shape[0]

    def ragged(self, x, row_expert, group_sizes, *, mode: QuantMode) -> jax.Array:
        """``x [M, I]`` sorted by expert -> ``[M, O]`` (``jax.lax.ragged_dot``)."""
        del row_expert, mode
        w = self.kernel[...]
        y = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes, precision=dot_precision(x.dtype),
                               preferred_element_type=jnp.float32)
        return y.astype(x.dtype)

    def blocked(self, xb, block_expert, *, mode: QuantMode) -> jax.Array:
        """``xb [nb, b, I]``, ``block_expert [nb]`` -> ``[nb, b, O]``."""
        del mode
        w = jnp.take(self.kernel[...], block_expert, axis=0).astype(xb.dtype)  # [nb, I, O]
        return jnp.einsum("nbi,nio->nbo", xb, w, precision=dot_precision(xb.dtype),
                          preferred_element_type=jnp.float32).astype(xb.dtype)


class Experts(nnx.Module):
    """X SwiGLU experts; attribute names mirror the checkpoint's ``mlp.experts.{e}.gate_proj`` etc."""

    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        x, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = ExpertLinear(x, d, f, dtype=dtype, rngs=rngs)
        self.up_proj = ExpertLinear(x, d, f, dtype=dtype, rngs=rngs)
        self.down_proj = ExpertLinear(x, f, d, dtype=dtype, rngs=rngs)

    def __call__(self, xs, row_expert, group_sizes, *, mode: QuantMode, impl: str) -> jax.Array:
        """Sorted token rows ``xs [M, D]`` -> each row through its expert ``[M, D]``."""
        if impl == "ragged":
            args = (row_expert, group_sizes)
            h = jax.nn.silu(self.gate_proj.ragged(xs, *args, mode=mode)) * self.up_proj.ragged(xs, *args, mode=mode)
            return self.down_proj.ragged(h, *args, mode=mode)
        plan = BlockPlan(row_expert, group_sizes, block_rows(xs.shape[0], group_sizes.shape[0]))
        xb = plan.to_blocks(xs)  # [nb, b, D]
        be = plan.block_expert
        h = jax.nn.silu(self.gate_proj.blocked(xb, be, mode=mode)) * self.up_proj.blocked(xb, be, mode=mode)
        return plan.from_blocks(self.down_proj.blocked(h, be, mode=mode))


class Router(nnx.Module):
    """The router's ``weight [X, D]`` (the checkpoint's ``mlp.gate.weight`` as is); always float."""

    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_init(rngs.params(), (cfg.num_experts, cfg.hidden_size), dtype))


def moe_forward(x, router_w, experts: Experts, *, k: int, norm_topk_prob: bool, mode: QuantMode,
                impl: str, offset=0) -> jax.Array:
    """``x [N, D]`` -> ``[N, D]``: route, dispatch to ``experts`` (the experts ``[offset, offset +
    X_local)`` of the model; others contribute 0), combine with the router weights."""
    num_local = experts.gate_proj.num_experts
    weights, chosen = route(x, router_w, k, norm_topk_prob)  # [N, k]
    d = dispatch(chosen, k, num_local, offset)
    xs = jnp.take(x, d["token"], axis=0)  # [M, D] sorted by expert
    ys = experts(xs, d["row_expert"], d["group_sizes"], mode=mode, impl=impl)  # [M, D]
    w = jnp.where(d["row_expert"] < num_local, weights.reshape(-1)[d["order"]], 0.0)  # [M]
    ys = ys * w[:, None].astype(ys.dtype)
    return jnp.zeros_like(x).at[d["token"]].add(ys)


def load_balance_loss(x, weight, k: int) -> jax.Array:
    """The Switch-Transformer auxiliary loss of one layer (transformers'
    ``load_balancing_loss_func``): ``X * sum_e f_e * P_e`` with ``f_e`` the fraction of the
    ``N*k`` routed pairs sent to expert e and ``P_e`` its mean router probability (1 when uniform).
    """
    logits = jnp.einsum("nd,xd->nx", x.astype(jnp.float32), weight.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)  # [N, X]
    _, chosen = jax.lax.top_k(probs, k)
    num = probs.shape[-1]
    frac = jnp.zeros((num,), jnp.float32).at[chosen.reshape(-1)].add(1.0) / chosen.size
    return num * jnp.sum(jax.lax.stop_gradient(frac) * jnp.mean(probs, axis=0))


class SparseMoeBlock(nnx.Module):
    """The mixture-of-experts MLP of a sparse layer (``mlp.gate`` router, ``mlp.experts``)."""

    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        self.gate = Router(cfg, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.impl: str | None = None  # None: default_impl()
        self.expert_mesh = None  # a Mesh whose "model" axis splits the experts (set by placement)
        self.sow_aux = False  # training: sow the load-balancing loss as nnx.Intermediate "aux_loss"
        self.sow_routing = False  # measurement: sow each token's experts [B, T, k] as "routing"

    def __call__(self, x: jax.Array, *, mode: QuantMode) -> jax.Array:
        """``x [B, T, D]`` -> ``[B, T, D]``."""
        impl = self.impl or default_impl()
        if impl not in IMPLS:
            raise ValueError(f"unknown MoE impl {impl!r}; choose one of {', '.join(IMPLS)}")
        kw = dict(k=self.top_k, norm_topk_prob=self.norm_topk_prob, mode=mode, impl=impl)
        b, t, d = x.shape
        if self.sow_aux:
            self.sow(nnx.Intermediate, "aux_loss", load_balance_loss(x.reshape(b * t, d), self.gate.weight[...],
                                                                      self.top_k))
        if self.sow_routing:
            chosen = route(x.reshape(b * t, d), self.gate.weight[...], self.top_k, self.norm_topk_prob)[1]
            self.sow(nnx.Intermediate, "routing", chosen.reshape(b, t, self.top_k))
        mesh = self.expert_mesh
        if mesh is None or mesh.shape["model"] == 1:
            return moe_forward(x.reshape(b * t, d), self.gate.weight[...], self.experts, **kw).reshape(b, t, d)
        return _expert_parallel(x, self.gate.weight[...], self.experts, mesh, kw)


def _expert_parallel(x, router_w, experts: Experts, mesh, kw) -> jax.Array:
    """The block under ``shard_map``: experts split over ``model``, rows over ``data`` (when it
    divides B), partial outputs summed over ``model``."""
    graphdef, state = nnx.split(experts)
    rows = "data" if x.shape[0] % mesh.shape["data"] == 0 else None
    x_spec = P(rows, None, None)

    def local(x, router_w, state):
        ex = nnx.merge(graphdef, state)
        num_local = ex.gate_proj.num_experts
        offset = jax.lax.axis_index("model") * num_local
        b, t, d = x.shape
        y = moe_forward(x.reshape(b * t, d), router_w, ex, offset=offset, **kw).reshape(b, t, d)
        return jax.lax.psum(y, "model")

    state_specs = jax.tree.map(lambda _: P("model"), state)
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, P(), state_specs), out_specs=x_spec,
                         check_vma=False)(x, router_w, state)


def set_expert_mesh(model: nnx.Module, mesh) -> None:
    """Point every ``SparseMoeBlock`` of ``model`` at ``mesh`` (``None``: one device)."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, SparseMoeBlock):
            m.expert_mesh = mesh if mesh is not None and mesh.shape.get("model", 1) > 1 else None
