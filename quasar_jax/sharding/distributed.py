"""Multi-host start-up: ``jax.distributed`` from the flags / environment (or a TPU pod), stdout
kept to process 0, and the command lines' ``start`` (runtime, then the mesh)."""

from __future__ import annotations

import contextlib
import os
import sys

import jax
from jax.sharding import Mesh

from quasar_jax.cli.mesh_flags import DistributedSettings, distributed_settings
from quasar_jax.sharding.rules import make_mesh


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


def start(args=None, prog: str = "quasar_jax") -> Mesh | None:
    """For a command line: start the multi-host runtime if the flags / environment ask for it,
    keep stdout to process 0, and return the mesh of ``args.mesh`` (``None``: one device).

    A mesh smaller than the visible devices runs on the first ``D x M`` of them and says so on
    one line (stderr)."""
    initialize_distributed(distributed_settings(args))
    silence_non_primary()
    mesh = make_mesh(getattr(args, "mesh", None))
    if mesh is not None and mesh.size < jax.device_count() and is_primary():
        print(f"{prog}: mesh {getattr(args, 'mesh')} runs on the first {mesh.size} of the "
              f"{jax.device_count()} devices", file=sys.stderr)
    return mesh
