"""The model: Qwen3's configuration, its forward pass, the KV cache it writes, and its int8 layers.

``config`` (``Qwen3Config``), ``qwen3`` (the Flax NNX decoder, one entry point
``model(tokens, positions, cache, mode=)``), ``moe`` (the mixture-of-experts layer: float32
router, dropless grouped-matmul experts, expert parallelism), ``kv_cache`` (``KVCache``), ``modes`` (``QuantMode``,
``Backend``), ``quant`` (``Int8Linear``: AQT weights, the matmul of ``pallas_kernels``). It knows
nothing of drafting, serving or where its weights come from; it stands on ``pallas_kernels`` and
``quasar_jax.cli`` (errors) only.
"""
