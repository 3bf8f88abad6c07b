"""int8 K/V: one scale per token and per KV head (the per-``dkv`` scheme of MaxText's ``kv_quant``).

A K or V vector ``x [..., E]`` of one token and one KV head is stored as
``q = round(x / scale)`` (int8, symmetric, in ``[-127, 127]``) with ``scale`` the bfloat16 value
at or just above ``max|x| / 127`` (1 for an all-zero vector), and read back as ``q * scale``:
E + 2 bytes per vector (1.94x fewer than bfloat16 at E = 64, 1.97x at E = 128). Quantization happens once,
when the cache is written; every reader (the chunk that wrote it included) sees the dequantized
value, so a verify chunk's tokens attend to each other exactly as later steps will.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KV_DTYPES = ("auto", "bfloat16", "float32", "int8")
SCALE_DTYPE = jnp.bfloat16


def kv_storage_dtype(kv_dtype: str, model_dtype) -> jnp.dtype:
    """The dtype the cache stores for ``--kv-dtype`` (``auto`` = the model's compute dtype)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return jnp.dtype(model_dtype if kv_dtype == "auto" else kv_dtype)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [..., E]`` -> (int8 ``[..., E]``, bfloat16 scale ``[...]``), one scale per vector."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    # Rounded up into bfloat16 (x (1 + 2^-7) before the cast): 127 * scale >= max|x|, nothing clips.
    scale = jnp.where(amax > 0, amax / 127.0 * (1.0 + 2.0 ** -7), 1.0).astype(SCALE_DTYPE)
    scale = scale.astype(jnp.float32)
    q = jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale.astype(SCALE_DTYPE)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """int8 ``q [..., E]`` and ``scale [...]`` -> ``[..., E]`` in ``dtype``."""
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)
