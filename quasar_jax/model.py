"""Qwen3 dense decoder in Flax NNX.

One entry point serves prefill, single-token decode and multi-token verification:

    logits [B, T, V], cache = model(tokens [B, T], positions [B, T], cache)

Token ``(b, t)`` sits at absolute position ``positions[b, t]``; its K/V is written to that cache
slot, and it attends causally to the committed slots of its row plus this call's chunk (see
``KVCache.attention_mask``). Rows may sit at different offsets. The returned cache has
``lengths = positions[:, -1] + 1``; a caller that keeps fewer tokens (speculative rejection,
right padding) sets ``lengths`` itself.

Dimension letters are those of docs/CONVENTIONS.md: B T S D H G R E F V L.
Numerics follow transformers' Qwen3: RMSNorm in float32 (normalised value cast back to the
compute dtype before the weight multiply), RoPE cos/sin in float32 cast to the compute dtype,
attention scores and softmax in float32, logits returned in float32.

Every projection is a ``Linear`` called as ``proj(x, quant_mode=...)``; ``quasar_jax.quant``
swaps them for int8 layers that honour ``quant_mode`` ("w8a16" or "w8a8"); float layers ignore it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from quasar_jax.config import Qwen3Config
from quasar_jax.kv_cache import KVCache

_init = nnx.initializers.normal(0.02)


class Linear(nnx.Module):
    """``y = x @ kernel`` with ``kernel [I, O]`` (the transpose of torch's ``weight``)."""

    def __init__(self, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs.params(), (d_in, d_out), dtype))

    def __call__(self, x: jax.Array, *, quant_mode: str | None = None) -> jax.Array:
        del quant_mode  # float weights: nothing to choose
        return jnp.einsum("...i,io->...o", x, self.kernel[...])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half convention) of ``x [B, T, N, E]`` at ``positions [B, T]``."""
    e = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))  # [E/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, E]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        d, h, g, e = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(d, h * e, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, g * e, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, g * e, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * e, d, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(e, cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(e, cfg.rms_norm_eps, dtype=dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, e
        self.rope_theta = cfg.rope_theta

    def __call__(self, x, positions, cache: KVCache, layer: int, mask, *, quant_mode=None):
        b, t, _ = x.shape  # [B, T, D]
        h, g, e = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x, quant_mode=quant_mode).reshape(b, t, h, e))  # [B, T, H, E]
        k = self.k_norm(self.k_proj(x, quant_mode=quant_mode).reshape(b, t, g, e))  # [B, T, G, E]
        v = self.v_proj(x, quant_mode=quant_mode).reshape(b, t, g, e)  # [B, T, G, E]
        q = rope(q, positions, self.rope_theta)
        k = rope(k, positions, self.rope_theta)
        cache = cache.write(layer, k, v, positions)
        keys, values = cache.k[layer], cache.v[layer]  # [B, S, G, E]

        q = q.reshape(b, t, g, h // g, e)  # [B, T, G, R, E]
        scores = jnp.einsum("btgre,bsge->bgrts", q, keys.astype(q.dtype),
                            preferred_element_type=jnp.float32) * (e ** -0.5)
        scores = jnp.where(mask[:, None, None], scores, -jnp.inf)  # [B, G, R, T, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bgrts,bsge->btgre", probs, values.astype(x.dtype)).reshape(b, t, h * e)
        return self.o_proj(out, quant_mode=quant_mode), cache


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, quant_mode=None):
        gate = jax.nn.silu(self.gate_proj(x, quant_mode=quant_mode))  # [B, T, F]
        return self.down_proj(gate * self.up_proj(x, quant_mode=quant_mode), quant_mode=quant_mode)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, cache, layer, mask, *, quant_mode=None):
        attn, cache = self.self_attn(self.input_layernorm(x), positions, cache, layer, mask,
                                     quant_mode=quant_mode)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), quant_mode=quant_mode)
        return x, cache


class Qwen3(nnx.Module):
    """Qwen3 dense causal LM. Attribute names mirror the Hugging Face checkpoint keys."""

    def __init__(self, cfg: Qwen3Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Param(_init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype))
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.init(self.config, batch, max_len, self.dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *,
                 mode=None) -> tuple[jax.Array, KVCache]:
        """tokens, positions [B, T] int32 -> (logits [B, T, V] float32, cache)."""
        quant_mode = None if mode is None or str(mode) == "float" else str(mode)
        mask = cache.attention_mask(positions)  # [B, T, S], from the lengths before this call
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)  # [B, T, D]
        for layer, block in enumerate(self.layers):
            x, cache = block(x, positions, cache, layer, mask, quant_mode=quant_mode)
        x = self.norm(x)
        if self.lm_head is None:
            logits = jnp.einsum("btd,vd->btv", x, self.embed_tokens[...],
                                preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x, quant_mode=quant_mode)
        cache = cache.replace(lengths=positions[:, -1].astype(jnp.int32) + 1)
        return logits.astype(jnp.float32), cache


def forward(model: Qwen3, tokens, positions, cache, *, quant_mode=None):
    """Functional alias of ``model(tokens, positions, cache)``."""
    return model(tokens, positions, cache, quant_mode=quant_mode)


def abstract_model(cfg: Qwen3Config, dtype=jnp.float32) -> Qwen3:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes and parameter counts, no memory."""
    return nnx.eval_shape(lambda: Qwen3(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def count_params(model: Qwen3) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
