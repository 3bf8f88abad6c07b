"""Sharded decoding: the device mesh, the partition rules, placement, multi-host start-up.

The mesh has two axes (``quasar_jax.mesh_flags``): ``data`` splits the batch rows, ``model``
splits heads, MLP width and vocabulary (Megatron-style tensor parallelism). XLA's GSPMD
partitioner derives every collective from the shardings of the program's inputs and outputs: no
collective is written by hand.

Each parameter has logical axes (``PARAM_AXES``, one table; a projection's ``[I, O]`` weight, its
int8 ``qvalue [I, O]`` and its per-channel ``scale [O]`` share one entry, so values and scales are
always split alike), and ``axis_rules`` maps logical axes onto mesh axes for one model and mesh:

===============  ============================  ==========================
logical axis     used by                        mesh axis
===============  ============================  ==========================
``batch``        history, lengths, cache rows   ``data``
``q_heads``      q_proj out, o_proj in          ``model`` (H % M == 0)
``kv_heads``     k/v_proj out, KV cache G       ``model`` if G % M == 0; replicated if M % G == 0
``mlp``          gate/up out, down in           ``model`` (F % M == 0)
``vocab``        embedding rows, LM head out    ``model`` (V % M == 0)
``embed`` etc.   D, norms, S, E, L              replicated
===============  ============================  ==========================

A head count (or F, V) that does not divide is a one-line ``ValueError`` naming the constraint.

``memory_plan`` computes per-device bytes of params + KV cache abstractly (``jax.eval_shape``):
``python -m quasar_jax.sharding --preset qwen3-32b --int8 --mesh model=8 --batch 16 --cache-len 4096``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from quasar_jax.cli import OneLineParser, run_cli
from quasar_jax.config import Qwen3Config
from quasar_jax.mesh_flags import (MESH_AXES, DistributedSettings, MeshSpec, distributed_settings,
                                   parse_mesh_spec)
from quasar_jax.model import abstract_model
from quasar_jax.quant import abstract_quantized_model, quantize_kernel

# Logical axes of each parameter, by the name of the module (or param) that owns it. A projection
# lists its weight's [I, O] axes; its int8 ``scale [O]`` takes the O axis.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "q_proj": ("embed", "q_heads"),  # column-parallel
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("q_heads", "embed"),  # row-parallel
    "gate_proj": ("embed", "mlp"),  # column-parallel
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),  # row-parallel
    "lm_head": ("embed", "vocab"),
    "input_layernorm": ("norm",), "post_attention_layernorm": ("norm",),
    "q_norm": ("norm",), "k_norm": ("norm",), "norm": ("norm",),
}
CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")  # KVCache.k / .v [L, B, S, G, E]
BATCH_AXES = ("batch",)  # leading axis of every per-row array (history [B, S], lengths [B], ...)


def axis_rules(cfg: Qwen3Config, mesh: MeshSpec | str | Mesh | None) -> dict[str, str | None]:
    """Logical axis -> mesh axis (or ``None``: replicated) for ``cfg`` on ``mesh``; checks divisibility."""
    m = as_spec(mesh).model
    h, g = cfg.num_attention_heads, cfg.num_key_value_heads
    for name, n in (("num_attention_heads", h), ("intermediate_size", cfg.intermediate_size),
                    ("vocab_size", cfg.vocab_size)):
        if n % m:
            raise ValueError(f"{name} {n} is not divisible by the model axis {m}: "
                             f"the model axis must divide {name}")
    if g % m and m % g:
        raise ValueError(f"num_key_value_heads {g} and the model axis {m}: one must divide the other "
                         f"(G % M == 0 shards kv heads, M % G == 0 replicates them)")
    shard = "model" if m > 1 else None
    return {"batch": "data", "q_heads": shard, "kv_heads": shard if g % m == 0 else None,
            "mlp": shard, "vocab": shard}


def as_spec(mesh: MeshSpec | str | dict | Mesh | None) -> MeshSpec:
    """Axis sizes of a mesh, spec string or dict (``None``: one device)."""
    if isinstance(mesh, Mesh):
        return MeshSpec(**{a: int(mesh.shape.get(a, 1)) for a in MESH_AXES})
    return parse_mesh_spec(mesh)


def make_mesh(mesh: MeshSpec | str | dict | Mesh | None, devices=None) -> Mesh | None:
    """A ``Mesh`` with axes ``("data", "model")`` over all (global) devices, or ``None`` for one
    device (no spec, or ``data=1,model=1``). The product of the sizes must equal the device count."""
    if isinstance(mesh, Mesh):
        missing = [a for a in MESH_AXES if a not in mesh.axis_names]
        if missing:
            raise ValueError(f"mesh lacks axis {missing[0]!r}; quasar_jax meshes have axes {MESH_AXES}")
        return mesh
    spec = parse_mesh_spec(mesh)
    if spec.size == 1:
        return None
    devices = list(jax.devices() if devices is None else devices)
    if spec.size != len(devices):
        raise ValueError(f"mesh {spec} needs {spec.size} devices, but there are {len(devices)}: "
                         "the product of the axis sizes must equal the device count")
    # Auto axes: GSPMD propagates shardings through the program from its inputs and outputs.
    return jax.make_mesh(spec.shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices)


def logical_spec(axes: tuple[str | None, ...], rules: dict[str, str | None]) -> P:
    return P(*(rules.get(a) if a is not None else None for a in axes))


# ----------------------------------------------------------------------------- parameters
def _names(path) -> tuple:
    """A pytree key path -> the attribute path (names and layer indices), without NNX's ``value``."""
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name != "value":
            out.append(name)
    return tuple(out)


def param_axes(path: tuple, ndim: int) -> tuple[str, ...]:
    """Logical axes of the parameter at attribute ``path`` (e.g. ``("layers", 0, "mlp",
    "down_proj", "qvalue")``); ``ValueError`` if no rule covers it."""
    owner = path[-1] if path[-1] in PARAM_AXES else path[-2] if len(path) > 1 else None
    axes = PARAM_AXES.get(owner)
    if axes is not None and len(axes) == 2 and path[-1] == "scale":  # an int8 projection's scale [O]
        axes = axes[1:]
    if axes is None or len(axes) != ndim:
        raise ValueError(f"no partition rule for parameter {'.'.join(map(str, path))} ({ndim}-D)")
    return axes


def param_specs(state, rules: dict[str, str | None]):
    """The ``PartitionSpec`` of every leaf of an NNX param state (concrete or abstract)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: logical_spec(param_axes(_names(path), len(x.shape)), rules), state)


def param_shardings(state, mesh: Mesh, cfg: Qwen3Config):
    rules = axis_rules(cfg, mesh)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(state, rules),
                        is_leaf=lambda x: isinstance(x, P))


def place_model(model, mesh: Mesh):
    """Put every param of ``model`` on its shards (in place; a no-op for those already there)."""
    _, state = nnx.split(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, model.config)))
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
        """``kernel [I, O]`` (sharded) -> ``(qvalue, scale)`` on their shards, computed in place."""
        q_sh = self.sharding(path[:-1] + ("qvalue",), 2)
        s_sh = self.sharding(path[:-1] + ("scale",), 1)
        return _sharded_quantizer(q_sh, s_sh)(kernel)


@functools.cache
def _sharded_quantizer(q_sh: NamedSharding, s_sh: NamedSharding):
    return jax.jit(quantize_kernel, out_shardings=(q_sh, s_sh))


# ----------------------------------------------------------------------------- program inputs / outputs
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
    remote = [x for x in leaves if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if remote:
        tree = _replicator(remote[0].sharding.mesh)(tree)
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
    return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------- multi-host
def _on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize_distributed(settings: DistributedSettings | None = None) -> bool:
    """Start JAX's multi-host runtime when asked (flags / ``JAX_*`` environment) or on a TPU pod.

    Must run before anything touches a device. CPU processes talk through gloo collectives.
    Returns whether this is a multi-process run.
    """
    settings = settings if settings is not None else distributed_settings()
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if settings.given:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                                   settings.process_id)
    elif _on_tpu_pod():
        jax.distributed.initialize()  # TPU pod: addresses and ids come from the TPU environment
    else:
        return False
    with _stdout_to_stderr():  # the runtime's connection log (e.g. gloo's) is not program output
        jax.devices()
    return True


@contextlib.contextmanager
def _stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def is_primary() -> bool:
    """Whether this process prints (process 0)."""
    return jax.process_index() == 0


def silence_non_primary() -> None:
    """Send this process's stdout (Python's and the native one) to /dev/null unless it is process 0."""
    if not is_primary():
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def start(args=None) -> Mesh | None:
    """For a command line: start the multi-host runtime if the flags / environment ask for it,
    keep stdout to process 0, and return the mesh of ``args.mesh`` (``None``: one device)."""
    initialize_distributed(distributed_settings(args))
    silence_non_primary()
    return make_mesh(getattr(args, "mesh", None))


# ----------------------------------------------------------------------------- memory plan
GiB = 1024**3


def device_memory_bytes(default_gb: float = 16.0) -> int:
    """Memory of the first device where the runtime reports it (GPU / TPU), else ``default_gb``."""
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit") or default_gb * GiB)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of params and KV cache (activations and XLA workspace not included)."""

    model: str
    mesh: str
    weights: str  # "bfloat16", "int8 (w8a16/w8a8)", ...
    batch: int
    cache_len: int
    params_bytes: int
    cache_bytes: int
    device_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.cache_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.device_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes,
                "headroom_bytes": self.headroom_bytes, "fits": self.fits}

    def line(self) -> str:
        verdict = (f"fits, {self.headroom_bytes / GiB:.2f} GiB free" if self.fits
                   else f"does NOT fit, short by {-self.headroom_bytes / GiB:.2f} GiB")
        return (f"{self.model} {self.weights} mesh {self.mesh} batch {self.batch} x {self.cache_len} slots: "
                f"per device params {self.params_bytes / GiB:.2f} GiB + KV cache "
                f"{self.cache_bytes / GiB:.2f} GiB = {self.total_bytes / GiB:.2f} GiB of "
                f"{self.device_bytes / GiB:.0f} GiB: {verdict}")


def _shard_bytes(x, spec: P, sizes: dict[str, int]) -> int:
    parts = math.prod(sizes[a] for a in spec if a is not None)
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize // parts


@functools.lru_cache(maxsize=8)
def _abstract_state(cfg: Qwen3Config, dtype, int8: bool, lm_head: bool):
    model = abstract_quantized_model(cfg, dtype, lm_head=lm_head) if int8 else abstract_model(cfg, dtype)
    return nnx.split(model)[1]


def memory_plan(cfg: Qwen3Config, mesh: MeshSpec | str | dict | None = None, *, dtype="bfloat16",
                int8: bool = False, quantize_lm_head: bool = False, batch: int = 1,
                cache_len: int = 4096, device_gb: float = 16.0, name: str = "model") -> MemoryPlan:
    """Per-device params + KV cache of ``cfg`` on ``mesh`` (abstract: no weights, no devices).

    A batch that ``data`` does not divide is padded as ``Engine`` pads it.
    """
    spec = parse_mesh_spec(mesh)
    rules = axis_rules(cfg, spec)
    sizes = {"data": spec.data, "model": spec.model}
    dtype = jnp.dtype(dtype)
    # One layer is built (abstractly) and counted L times: all layers are alike.
    state = _abstract_state(dataclasses.replace(cfg, num_hidden_layers=1), dtype, int8, quantize_lm_head)
    params = sum(_shard_bytes(x, logical_spec(param_axes(_names(path), len(x.shape)), rules), sizes)
                 * (cfg.num_hidden_layers if _names(path)[0] == "layers" else 1)
                 for path, x in jax.tree_util.tree_flatten_with_path(state)[0])
    padded = -(-batch // spec.data) * spec.data
    kv = jax.ShapeDtypeStruct((cfg.num_hidden_layers, padded, cache_len, cfg.num_key_value_heads,
                               cfg.head_dim), dtype)
    cache = 2 * _shard_bytes(kv, logical_spec(CACHE_AXES, rules), sizes)
    weights = f"int8 + {dtype.name}" if int8 else dtype.name
    return MemoryPlan(name, str(spec), weights, batch, cache_len, params, cache, int(device_gb * GiB))


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m quasar_jax.sharding", description="per-device memory plan")
    p.add_argument("--preset", action="append", required=True, help="e.g. qwen3-32b (repeatable)")
    p.add_argument("--mesh", action="append", default=None, help="data=D,model=M (repeatable)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--int8", action="store_true", help="int8 projections (w8a16 / w8a8 verifier)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache-len", type=int, default=4096)
    p.add_argument("--device-gb", type=float, action="append", default=None, help="GiB per device")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    def work() -> int:
        for preset in args.preset:
            cfg = Qwen3Config.preset(preset)
            for mesh in args.mesh or ["data=1,model=1"]:
                for gb in args.device_gb or [16.0]:
                    plan = memory_plan(cfg, mesh, dtype=args.dtype, int8=args.int8, batch=args.batch,
                                       cache_len=args.cache_len, device_gb=gb, name=preset)
                    print(json.dumps(plan.to_dict()) if args.json else plan.line())
        return 0

    return run_cli(p.prog, work)


if __name__ == "__main__":
    raise SystemExit(main())
