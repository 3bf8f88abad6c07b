"""What a verify pass reads on a mixture of experts: experts touched per step, and the bytes model.

A verify pass over ``T = K + 1`` tokens (the last committed token and ``K`` drafted ones) runs every
sparse layer's experts on the union of the experts its T tokens route to, so its weight bytes grow
with T where a dense model's are flat:

    bytes(T) = shared + sum over sparse layers of |union of the T tokens' experts| * expert bytes

``shared`` is what every step reads whatever the routing: attention projections, norms, routers,
dense MLP layers and the LM head (the embedding rows of T tokens are negligible), plus the KV cache
of the context. :func:`touched` measures the union on real routing (a model's own greedy text,
teacher-forced: each window of T consecutive tokens is what a fully accepted verify step routes);
:func:`uniform_touched` is what independent uniform routing would give,
``X (1 - (1 - k/X)^T)`` per layer. :func:`verify_bytes` is the bytes model for a config, float or
int8 weights (int8 values plus float32 per-channel scales).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.moe import SparseMoeBlock


def routing(model, tokens: list[int]) -> np.ndarray:
    """The experts each token of ``tokens`` routes to in each sparse layer: ``[L_sparse, N, k]``
    (one teacher-forced forward of the float model)."""
    blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, SparseMoeBlock)]
    if not blocks:
        raise ValueError("the model has no mixture-of-experts layer")
    for block in blocks:
        block.sow_routing = True
    try:
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state, ids):
            m = nnx.merge(graphdef, state)
            n = ids.shape[1]
            _, sown = nnx.capture(m, nnx.Intermediate)(ids, jnp.arange(n, dtype=jnp.int32)[None], m.init_cache(1, n))
            return jax.tree.leaves(sown)  # module-tree order: the sparse layers in order

        routes = run(state, jnp.asarray([tokens], jnp.int32))
    finally:
        for block in blocks:
            block.sow_routing = False
    return np.stack([np.asarray(r)[0] for r in routes])  # [L_sparse, N, k]


def touched(routes: np.ndarray, t: int, start: int = 0) -> float:
    """Mean over sparse layers and over windows of ``t`` consecutive tokens (from ``start``) of the
    number of distinct experts the window routes to."""
    layers, n, _ = routes.shape
    sizes = [len(np.unique(routes[layer, s:s + t])) for layer in range(layers) for s in range(start, n - t + 1)]
    return float(np.mean(sizes))


def uniform_touched(num_experts: int, k: int, t: int) -> float:
    """Expected distinct experts of ``t`` tokens each routed to ``k`` of ``X`` experts uniformly
    and independently: ``X (1 - (1 - k/X)^t)``."""
    return num_experts * (1.0 - (1.0 - k / num_experts) ** t)


@dataclasses.dataclass(frozen=True)
class VerifyBytes:
    shared: int  # attention, norms, routers, dense MLPs, LM head (weights)
    experts: int  # the touched experts' weights
    kv_cache: int  # the context's K/V

    @property
    def total(self) -> int:
        return self.shared + self.experts + self.kv_cache


def verify_bytes(cfg: Qwen3Config, experts_per_layer: float, *, int8: bool, dtype_bytes: int = 2,
                 context: int = 0) -> VerifyBytes:
    """The bytes model of one verify step of batch 1: weights read (projections in int8 + float32
    scales when ``int8``, else ``dtype_bytes``; norms, routers and the LM head, which the int8
    verifier keeps float by default, in ``dtype_bytes``) and the KV cache of ``context`` tokens."""
    d, e, h, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def proj(i: int, o: int, n: int = 1) -> int:  # n stacked [I, O] projections
        return n * i * o * (1 if int8 else dtype_bytes) + (n * o * 4 if int8 else 0)

    attn = proj(d, h * e) + 2 * proj(d, g * e) + proj(h * e, d) + 2 * e * dtype_bytes
    n_sparse = len(cfg.moe_layers)
    n_dense = cfg.num_hidden_layers - n_sparse
    shared = cfg.num_hidden_layers * (attn + 2 * d * dtype_bytes) + n_dense * (
        2 * proj(d, cfg.intermediate_size) + proj(cfg.intermediate_size, d))
    shared += n_sparse * cfg.num_experts * d * dtype_bytes  # routers
    shared += d * dtype_bytes + cfg.vocab_size * d * dtype_bytes  # final norm, LM head (float by default)
    f = cfg.moe_intermediate_size
    one_expert = 2 * proj(d, f) + proj(f, d)
    experts = int(round(n_sparse * experts_per_layer * one_expert))
    kv = 2 * cfg.num_hidden_layers * context * g * e * dtype_bytes
    return VerifyBytes(int(shared), experts, kv)
