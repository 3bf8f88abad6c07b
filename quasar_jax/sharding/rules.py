"""The device mesh and the partition rules: which mesh axis splits each logical axis.

Each parameter has logical axes (``PARAM_AXES``, one table; a projection's ``[I, O]`` weight, its
int8 ``qvalue [I, O]`` and its per-channel ``scale [O]`` share one entry, so values and scales are
always split alike), and ``axis_rules`` maps logical axes onto mesh axes for one model and mesh
(the table is in ``quasar_jax.sharding``'s docstring and docs/sharding.md).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from quasar_jax.cli.mesh_flags import MESH_AXES, MeshSpec, parse_mesh_spec
from quasar_jax.model.config import Qwen3Config

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
    "gate": ("router", "embed"),  # a mixture of experts' router weight [X, D]: replicated
}
# The stacked experts of a mixture of experts (``mlp.experts.*``, kernel / qvalue [X, I, O],
# int8 scale [X, O]): the expert axis X is split over ``model`` (expert parallelism).
EXPERT_PARAM_AXES: dict[str, tuple[str, ...]] = {
    "gate_proj": ("expert", "embed", "expert_mlp"),
    "up_proj": ("expert", "embed", "expert_mlp"),
    "down_proj": ("expert", "expert_mlp", "embed"),
}
CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")  # KVCache.k / .v [L, B, S, G, E]
BATCH_AXES = ("batch",)  # leading axis of every per-row array (history [B, S], lengths [B], ...)


def axis_rules(cfg: Qwen3Config, mesh: MeshSpec | str | Mesh | None) -> dict[str, str | None]:
    """Logical axis -> mesh axis (or ``None``: replicated) for ``cfg`` on ``mesh``; checks divisibility."""
    m = as_spec(mesh).model
    h, g = cfg.num_attention_heads, cfg.num_key_value_heads
    sizes = [("num_attention_heads", h), ("vocab_size", cfg.vocab_size)]
    if len(cfg.moe_layers) < cfg.num_hidden_layers:  # some layer has the dense MLP
        sizes.append(("intermediate_size", cfg.intermediate_size))
    if cfg.is_moe:
        sizes.append(("num_experts", cfg.num_experts))
    for name, n in sizes:
        if n % m:
            raise ValueError(f"{name} {n} is not divisible by the model axis {m}: "
                             f"the model axis must divide {name}")
    if g % m and m % g:
        raise ValueError(f"num_key_value_heads {g} and the model axis {m}: one must divide the other "
                         f"(G % M == 0 shards kv heads, M % G == 0 replicates them)")
    shard = "model" if m > 1 else None
    return {"batch": "data", "q_heads": shard, "kv_heads": shard if g % m == 0 else None,
            "mlp": shard, "vocab": shard, "expert": shard}


def as_spec(mesh: MeshSpec | str | dict | Mesh | None) -> MeshSpec:
    """Axis sizes of a mesh, spec string or dict (``None``: one device)."""
    if isinstance(mesh, Mesh):
        return MeshSpec(**{a: int(mesh.shape.get(a, 1)) for a in MESH_AXES})
    return parse_mesh_spec(mesh)


def make_mesh(mesh: MeshSpec | str | dict | Mesh | None, devices=None) -> Mesh | None:
    """A ``Mesh`` with axes ``("data", "model")``, or ``None`` for one device (no spec, or
    ``data=1,model=1``).

    A mesh smaller than the (global) devices runs on the first ``D x M`` of them (``start`` says
    so on one line); a larger one is a one-line ``ValueError``. Across processes the mesh must
    use every device (each process drives its own devices in lockstep).
    """
    if isinstance(mesh, Mesh):
        missing = [a for a in MESH_AXES if a not in mesh.axis_names]
        if missing:
            raise ValueError(f"mesh lacks axis {missing[0]!r}; quasar_jax meshes have axes {MESH_AXES}")
        return mesh
    spec = parse_mesh_spec(mesh)
    if spec.size == 1:
        return None
    devices = list(jax.devices() if devices is None else devices)
    if spec.size > len(devices):
        raise ValueError(f"mesh {spec} needs {spec.size} devices, but there are {len(devices)}: "
                         "the product of the axis sizes must be at most the device count")
    if spec.size < len(devices) and jax.process_count() > 1:
        raise ValueError(f"mesh {spec} uses {spec.size} of the {len(devices)} devices of "
                         f"{jax.process_count()} processes: a multi-host mesh must use every device")
    # Auto axes: GSPMD propagates shardings through the program from its inputs and outputs.
    return jax.make_mesh(spec.shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices[:spec.size])


def logical_spec(axes: tuple[str | None, ...], rules: dict[str, str | None]) -> P:
    return P(*(rules.get(a) if a is not None else None for a in axes))


def attr_path(path) -> tuple:
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
    table = EXPERT_PARAM_AXES if len(path) > 2 and path[-3] == "experts" else PARAM_AXES
    axes = table.get(owner)
    if axes is not None and table is PARAM_AXES and len(axes) == 2 and path[-1] == "scale":
        axes = axes[1:]  # an int8 projection's scale [O]
    if axes is not None and table is EXPERT_PARAM_AXES and path[-1] == "scale":
        axes = (axes[0], axes[2])  # int8 experts' scale [X, O]
    if axes is None or len(axes) != ndim:
        raise ValueError(f"no partition rule for parameter {'.'.join(map(str, path))} ({ndim}-D)")
    return axes


def param_specs(state, rules: dict[str, str | None]):
    """The ``PartitionSpec`` of every leaf of an NNX param state (concrete or abstract)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: logical_spec(param_axes(attr_path(path), len(x.shape)), rules), state)


def param_shardings(state, mesh: Mesh, cfg: Qwen3Config):
    rules = axis_rules(cfg, mesh)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(state, rules),
                        is_leaf=lambda x: isinstance(x, P))
