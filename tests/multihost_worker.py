"""One process of the two-process sharded decoding test (launched by tests/test_sharding.py).

    python tests/multihost_worker.py CKPT_DIR PORT PROCESS_ID MESH REQUEST_JSON

The launcher sets ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and ``JAX_PLATFORMS=cpu``
for each process, so two processes form one 8-device mesh over CPU (gloo) collectives. Process 0
prints ``{"tokens": ...}``; every other process prints nothing.
"""

from __future__ import annotations

import json
import sys

import jax

from quasar_jax import sharding
from quasar_jax.cli.mesh_flags import DistributedSettings
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.weights.loading import load_model


def main(ckpt: str, port: str, process_id: str, mesh: str, request: str) -> int:
    sharding.initialize_distributed(DistributedSettings(f"localhost:{port}", 2, int(process_id)))
    sharding.silence_non_primary()
    req = json.loads(request)
    engine = Engine(load_model(ckpt, int8=req["config"].get("verifier", "float") != "float", mesh=mesh),
                    mesh=mesh)
    result = engine.generate(req["prompts"], GenerationConfig(**req["config"]))
    print(json.dumps({"tokens": result.tokens, "processes": jax.process_count(),
                      "devices": jax.device_count()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
