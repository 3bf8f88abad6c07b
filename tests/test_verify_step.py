"""Structure of the verify step (CPU-checkable guards for the GPU bandwidth work): the KV cache is
updated in place, and no temporary as large as the cache is allocated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.kv_cache import KVCache
from quasar_jax.model.modes import QuantMode
from quasar_jax.model.quant import quantize_model
from quasar_jax.model.qwen3 import Qwen3

CFG = Qwen3Config(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=256, max_position_embeddings=4096)
B, S, T = 2, 8192, 6  # a long cache, so a copy of it would dwarf every other temporary (on a CPU
# the w8a16 dot materialises float weights: ~2.4 MB here, against 16 MB for one of K / V)


@pytest.mark.parametrize("mode", [QuantMode.FLOAT, QuantMode.W8A16, QuantMode.W8A8])
def test_verify_step_writes_the_cache_in_place(mode):
    model = Qwen3(CFG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    if mode.is_int8:
        model = quantize_model(model)
    graphdef, params = nnx.split(model)
    cache = KVCache.init(CFG, B, S, jnp.float32)

    def step(params, tokens, positions, cache):
        logits, cache = nnx.merge(graphdef, params)(tokens, positions, cache, mode=mode)
        return logits, cache

    tokens = jnp.zeros((B, T), jnp.int32)
    positions = 100 + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    compiled = jax.jit(step, donate_argnums=(3,)).lower(params, tokens, positions, cache).compile()
    memory = compiled.memory_analysis()
    cache_bytes = cache.k.nbytes + cache.v.nbytes
    # The donated cache is the output's buffer (updated in place) ...
    assert memory.alias_size_in_bytes >= cache_bytes, memory
    # ... and the step's scratch is far below even one of the K / V buffers [L, B, S, G, E].
    assert memory.temp_size_in_bytes < cache.k.nbytes, (memory.temp_size_in_bytes, cache.k.nbytes)
