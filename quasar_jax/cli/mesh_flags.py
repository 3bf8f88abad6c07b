"""Mesh specs and the sharding / multi-host command-line flags (argparse only: no JAX import).

A mesh spec names the two axes of the device mesh::

    "data=2,model=4"   # 2-way data parallel (batch rows) x 4-way model parallel (heads, MLP, vocab)

An omitted axis has size 1; ``data=1,model=1`` (or no spec) means one device. ``parse_mesh_spec``
refuses unknown axes, repeated axes, non-integers and non-positive sizes with a one-line
``ValueError``; whether the devices suffice is checked where they are known
(``quasar_jax.sharding.make_mesh``: a smaller mesh runs on the first ``D x M`` devices).

``add_mesh_flags(parser)`` adds ``--mesh``, ``--plan`` and the multi-host flags
(``--coordinator-address``, ``--num-processes``, ``--process-id``); ``distributed_settings(args)``
gives what ``quasar_jax.sharding.initialize_distributed`` needs (flags first, then the environment
variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

MESH_AXES = ("data", "model")  # batch rows | heads, MLP width, vocabulary


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the mesh axes (``data`` x ``model``)."""

    data: int = 1
    model: int = 1

    def __post_init__(self):
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"mesh axis {axis} must be a positive integer, got {size!r}")

    @property
    def size(self) -> int:
        return self.data * self.model

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data, self.model)

    def __str__(self) -> str:
        return f"data={self.data},model={self.model}"


def parse_mesh_spec(text: str | MeshSpec | dict | None) -> MeshSpec:
    """``"data=D,model=M"`` (either part optional), a dict of sizes, or a ``MeshSpec``."""
    if text is None:
        return MeshSpec()
    if isinstance(text, MeshSpec):
        return text
    if isinstance(text, dict):
        unknown = [k for k in text if k not in MESH_AXES]
        if unknown:
            raise ValueError(f"unknown mesh axis {unknown[0]!r}; axes are {', '.join(MESH_AXES)}")
        return MeshSpec(**text)
    if not isinstance(text, str):
        raise ValueError(f"mesh spec must be a string like 'data=2,model=4', got {type(text).__name__}")
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        axis, eq, value = part.partition("=")
        axis, value = axis.strip(), value.strip()
        if not eq or not axis:
            raise ValueError(f"mesh spec {text!r}: expected axis=size pairs like 'data=2,model=4'")
        if axis not in MESH_AXES:
            raise ValueError(f"mesh spec {text!r}: unknown axis {axis!r}; axes are {', '.join(MESH_AXES)}")
        if axis in sizes:
            raise ValueError(f"mesh spec {text!r}: axis {axis!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {text!r}: size of {axis!r} must be an integer, got {value!r}") from None
        if size < 1:
            raise ValueError(f"mesh spec {text!r}: size of {axis!r} must be positive, got {size}")
        sizes[axis] = size
    return MeshSpec(**sizes)


def _mesh_arg(text: str) -> MeshSpec:
    try:
        return parse_mesh_spec(text)
    except ValueError as err:  # argparse turns this into one line + status 2
        raise argparse.ArgumentTypeError(str(err)) from None


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_mesh_flags(parser: argparse.ArgumentParser) -> None:
    """``--mesh``, ``--plan`` and the multi-host flags (``--coordinator-address`` ...)."""
    g = parser.add_argument_group("devices and hosts")
    g.add_argument("--mesh", type=_mesh_arg, default=None, metavar="data=D,model=M",
                   help="device mesh: D-way batch (data) x M-way model parallel; D x M devices at "
                        "most (a smaller mesh runs on the first D x M) (default: one device)")
    g.add_argument("--plan", action="store_true",
                   help="print the per-device memory plan (params + KV cache) for the model, "
                        "--mesh, --batch-size (serve: --slots) and --max-len, then exit (loads no weights)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-host: process 0's address (or $JAX_COORDINATOR_ADDRESS; automatic on "
                        "TPU pods)")
    g.add_argument("--num-processes", type=_nonneg_int, default=None,
                   help="multi-host: number of processes (or $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=_nonneg_int, default=None,
                   help="multi-host: this process's index, 0 .. N-1 (or $JAX_PROCESS_ID)")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def distributed_settings(args: argparse.Namespace | None = None) -> DistributedSettings:
    """The multi-host settings from the flags, else the environment; validated (one-line errors)."""
    flag = (lambda n: getattr(args, n, None)) if args is not None else (lambda n: None)
    address = flag("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = flag("num_processes") if flag("num_processes") is not None else _env_int("JAX_NUM_PROCESSES")
    pid = flag("process_id") if flag("process_id") is not None else _env_int("JAX_PROCESS_ID")
    settings = DistributedSettings(address, n, pid)
    if settings.given:
        if address is None or n is None or pid is None:
            raise ValueError("multi-host needs --coordinator-address, --num-processes and --process-id "
                             "together (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
        if n < 1 or not 0 <= pid < n:
            raise ValueError(f"--process-id must be in [0, {n}) and --num-processes >= 1, "
                             f"got process {pid} of {n}")
    return settings


__all__ = ["DistributedSettings", "MESH_AXES", "MeshSpec", "add_mesh_flags", "distributed_settings",
           "parse_mesh_spec"]
