"""Placing arrays on a mesh: parameters loaded straight onto their shards, program inputs and
outputs (rows on ``data``, the KV cache by the partition rules), host values <-> global arrays
(also across processes: each process fills and reads only its addressable shards)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.moe import set_expert_mesh
from quasar_jax.model.quant import quantize_expert_kernel, quantize_kernel
from quasar_jax.sharding.rules import CACHE_AXES, axis_rules, logical_spec, param_axes, param_shardings


def place_model(model, mesh: Mesh):
    """Put every param of ``model`` on its shards (in place; a no-op for those already there), and
    point its mixture-of-experts layers at ``mesh`` (experts split over ``model``)."""
    _, state = nnx.split(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, model.config)))
    set_expert_mesh(model, mesh)
    return model


class Placer:
    """Creates each loaded tensor directly on its shards: every device gets only its slice, read
    from the host array (``jax.make_array_from_callback``); no device holds the full tensor."""

    def __init__(self, mesh: Mesh, cfg: Qwen3Config):
        self.mesh, self.rules = mesh, axis_rules(cfg, mesh)

    def sharding(self, path: tuple, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, logical_spec(param_axes(path, ndim), self.rules))

    def __call__(self, path: tuple, host: np.ndarray, dtype) -> jax.Array:
        dtype = jnp.dtype(dtype)
        return jax.make_array_from_callback(host.shape, self.sharding(path, host.ndim),
                                            lambda idx: np.asarray(host[idx], dtype=dtype))

    def quantize(self, path: tuple, kernel: jax.Array):
        """``kernel [I, O]`` (or experts' ``[X, I, O]``, sharded) -> ``(qvalue, scale)`` on their
        shards, computed in place."""
        q_sh = self.sharding(path[:-1] + ("qvalue",), kernel.ndim)
        s_sh = self.sharding(path[:-1] + ("scale",), kernel.ndim - 1)
        return _sharded_quantizer(q_sh, s_sh, kernel.ndim == 3)(kernel)


@functools.cache
def _sharded_quantizer(q_sh: NamedSharding, s_sh: NamedSharding, experts: bool = False):
    return jax.jit(quantize_expert_kernel if experts else quantize_kernel, out_shardings=(q_sh, s_sh))


# ----------------------------------------------------------------------------- program inputs / outputs
def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (small program outputs the host reads on every process)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows on ``data``, everything else replicated (``ndim`` 0: replicated)."""
    return NamedSharding(mesh, P(*(("data",) + (None,) * (ndim - 1))) if ndim else P())


def cache_sharding(mesh: Mesh, cfg: Qwen3Config) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(CACHE_AXES, axis_rules(cfg, mesh)))


def with_batch_shardings(abstract, mesh: Mesh, cfg: Qwen3Config):
    """Abstract inputs / loop state -> the same tree with shardings: 5-D leaves are KV caches
    ``[L, B, S, G, E]``, scalars are replicated, every other leaf has its rows on ``data``."""
    cache = cache_sharding(mesh, cfg)
    return jax.tree.map(lambda x: cache if len(x.shape) == 5 else batch_sharding(mesh, len(x.shape)),
                        abstract)


def sharded_abstract(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def program_shardings(run, inputs, mesh: Mesh, cfg: Qwen3Config):
    """``run(*inputs)``'s abstract inputs with their shardings, and its output shardings."""
    inputs = sharded_abstract(inputs, with_batch_shardings(inputs, mesh, cfg))
    return inputs, with_batch_shardings(jax.eval_shape(run, *inputs), mesh, cfg)


def pad_rows(mesh: Mesh | None, prompts: list, lens: list[int], rows: list):
    """Pad the batch to a multiple of ``data`` with 1-token rows (the caller drops their output)."""
    pad = -len(prompts) % (1 if mesh is None else int(mesh.shape["data"]))
    return [*prompts, *[[0]] * pad], [*lens, *[1] * pad], [*rows, *rows[:1] * pad]


def put_inputs(inputs, mesh: Mesh | None, cfg: Qwen3Config):
    """Host inputs -> device arrays: one device, or global arrays with rows on ``data``."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, inputs)
    return jax.tree.map(put_global, inputs, with_batch_shardings(inputs, mesh, cfg))


def host_rows(tree, b: int):
    """Device results -> NumPy, first ``b`` rows of every batched leaf."""
    return jax.tree.map(lambda x: x[:b] if x.ndim else x, fetch(tree))


def put_global(value, sharding: NamedSharding) -> jax.Array:
    """A host value that every process holds in full -> a global array on ``sharding`` (works
    across hosts: each process fills only its addressable shards). PRNG key arrays included."""
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(value)
        data = np.asarray(jax.random.key_data(value))
        spec = P(*sharding.spec, *(None,) * (data.ndim - len(sharding.spec)))
        placed = put_global(data, NamedSharding(sharding.mesh, spec))
        return jax.random.wrap_key_data(placed, impl=impl)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


@functools.cache
def _replicator(mesh: Mesh):
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))


def fetch(tree):
    """Global arrays -> NumPy on every process (gathered to replicated first when some shards live
    on other hosts). Leaves must not be PRNG keys."""
    leaves = jax.tree.leaves(tree)
    remote = [x for x in leaves if isinstance(x, jax.Array) and not x.is_fully_addressable
              and not x.sharding.is_fully_replicated]
    if remote:
        tree = _replicator(remote[0].sharding.mesh)(tree)
    return jax.device_get(jax.tree.map(_local, tree))  # one transfer for all leaves


def _local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # replicated: any local copy
        return x.addressable_data(0)
    return x
