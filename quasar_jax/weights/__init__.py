"""Where the model's parameters come from: Hugging Face safetensors or a hub id (``loading``), and
the converted (int8) orbax checkpoints of ``python -m quasar_jax.convert`` (``checkpoint``). Both
place each tensor straight onto its mesh shards, so this sits above ``quasar_jax.sharding``.
"""
