"""Sharded decoding and serving: the device mesh, the partition rules, placement, multi-host start-up.

The mesh has two axes (``quasar_jax.cli.mesh_flags``): ``data`` splits the batch rows, ``model``
splits heads, MLP width and vocabulary (Megatron-style tensor parallelism). XLA's GSPMD
partitioner derives every collective from the shardings of the program's inputs and outputs: no
collective is written by hand.

===============  ============================  ==========================
logical axis     used by                        mesh axis
===============  ============================  ==========================
``batch``        history, lengths, cache rows   ``data``
``q_heads``      q_proj out, o_proj in          ``model`` (H % M == 0)
``kv_heads``     k/v_proj out, KV cache G       ``model`` if G % M == 0; replicated if M % G == 0
``mlp``          gate/up out, down in           ``model`` (F % M == 0)
``vocab``        embedding rows, LM head out    ``model`` (V % M == 0)
``expert``       MoE experts [X, I, O]          ``model`` (X % M == 0; a ``shard_map`` + ``psum``)
``embed`` etc.   D, norms, S, E, L              replicated
===============  ============================  ==========================

A head count (or F, V) that does not divide is a one-line ``ValueError`` naming the constraint.

One module per concern; every name is importable from ``quasar_jax.sharding``:

* ``rules``: ``make_mesh``, ``PARAM_AXES`` / ``CACHE_AXES``, ``axis_rules``, parameter specs;
* ``placement``: parameters onto their shards (``place_model``, ``Placer``), program input /
  output shardings, host values <-> global arrays (``put_global``, ``fetch``);
* ``distributed``: ``jax.distributed`` start-up, stdout on process 0, the CLIs' ``start``;
* ``plan``: ``memory_plan`` and its command,
  ``python -m quasar_jax.sharding --preset qwen3-32b --int8 --mesh model=8 --batch 16 --cache-len 4096``.
"""

from quasar_jax.sharding.distributed import initialize_distributed, is_primary, silence_non_primary, start
from quasar_jax.sharding.placement import (Placer, batch_sharding, cache_sharding, fetch, host_rows, pad_rows,
                                           place_model, program_shardings, put_global, put_inputs,
                                           replicated, sharded_abstract, with_batch_shardings)
from quasar_jax.sharding.plan import GiB, MemoryPlan, device_memory_bytes, main, memory_plan
from quasar_jax.sharding.rules import (BATCH_AXES, CACHE_AXES, PARAM_AXES, as_spec, attr_path, axis_rules,
                                       logical_spec, make_mesh, param_axes, param_shardings, param_specs)

__all__ = ["BATCH_AXES", "CACHE_AXES", "GiB", "MemoryPlan", "PARAM_AXES", "Placer", "as_spec", "attr_path",
           "axis_rules", "batch_sharding", "cache_sharding", "device_memory_bytes", "fetch", "host_rows",
           "initialize_distributed", "is_primary", "logical_spec", "main", "make_mesh", "memory_plan",
           "pad_rows", "param_axes", "param_shardings", "param_specs", "place_model", "program_shardings",
           "put_global", "put_inputs", "replicated", "sharded_abstract", "silence_non_primary", "start",
           "with_batch_shardings"]
