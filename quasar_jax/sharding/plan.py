"""The per-device memory plan (params + KV cache, computed abstractly) and its command:
``python -m quasar_jax.sharding --preset qwen3-32b --int8 --mesh model=8 --batch 16 --cache-len 4096``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from quasar_jax.cli.mesh_flags import MeshSpec, parse_mesh_spec
from quasar_jax.cli.runner import OneLineParser, run_cli
from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.paged_kv_cache import cache_bytes_per_token
from quasar_jax.model.quant import abstract_quantized_model
from quasar_jax.model.qwen3 import abstract_model
from quasar_jax.sharding.rules import CACHE_AXES, attr_path, axis_rules, logical_spec, param_axes

GiB = 1024**3


def device_memory_bytes(default_gb: float = 16.0) -> int:
    """Memory of the first device: the runtime's limit where it reports one (GPU / TPU); on the CPU,
    whose device memory is the host's, the host's physical memory (shared with everything else the
    host runs); else ``default_gb``."""
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX host
            pass
    return int(default_gb * GiB)


KV_PLAN_DTYPES = ("bfloat16", "int8")  # the KV dtypes the plan counts tokens for


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
    # tokens of K/V (every layer) one device holds in the memory left after the params, per KV dtype
    kv_tokens: dict = dataclasses.field(default_factory=dict)

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
                f"{self.device_bytes / GiB:.0f} GiB: {verdict}"
                + self._kv_tokens_text())

    def _kv_tokens_text(self) -> str:
        if not self.kv_tokens:
            return ""
        return "; KV tokens per device after the params: " + ", ".join(f"{k} {v:,}" for k, v in self.kv_tokens.items())


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
    # One layer of each kind is built (abstractly) and counted as often as the model has it: a
    # dense model's layers are all alike; a mixture of experts has sparse layers (experts split
    # over ``model``) and maybe dense ones (mlp_only_layers, decoder_sparse_step).
    n_sparse = len(cfg.moe_layers)
    kinds = [(dataclasses.replace(cfg, num_hidden_layers=1, num_experts=0, num_experts_per_tok=0,
                                  moe_intermediate_size=0, mlp_only_layers=()),
              cfg.num_hidden_layers - n_sparse)]
    if n_sparse:
        kinds.append((dataclasses.replace(cfg, num_hidden_layers=1, mlp_only_layers=(), decoder_sparse_step=1),
                      n_sparse))
    params = 0
    for i, (one_layer, count) in enumerate(kinds):
        state = _abstract_state(one_layer, dtype, int8, quantize_lm_head)
        params += sum(_shard_bytes(x, logical_spec(param_axes(attr_path(path), len(x.shape)), rules), sizes)
                      * (count if attr_path(path)[0] == "layers" else int(i == 0))  # embedding etc. once
                      for path, x in jax.tree_util.tree_flatten_with_path(state)[0])
    padded = -(-batch // spec.data) * spec.data
    kv = jax.ShapeDtypeStruct((cfg.num_hidden_layers, padded, cache_len, cfg.num_key_value_heads,
                               cfg.head_dim), dtype)
    cache = 2 * _shard_bytes(kv, logical_spec(CACHE_AXES, rules), sizes)
    weights = f"int8 + {dtype.name}" if int8 else dtype.name
    device = int(device_gb * GiB)
    # The KV heads are split over the mesh axes the cache's head dimension maps to (none when G does
    # not divide): one token's K/V on a device is its share of the heads.
    head_parts = math.prod(sizes[a] for a in _axes(logical_spec(CACHE_AXES, rules)[3]))
    per_token = {k: -(-cache_bytes_per_token(cfg, k, dtype) // head_parts) for k in KV_PLAN_DTYPES}
    kv_tokens = {k: max(0, device - params) // b for k, b in per_token.items()}
    return MemoryPlan(name, str(spec), weights, batch, cache_len, params, cache, device, kv_tokens)


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


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
