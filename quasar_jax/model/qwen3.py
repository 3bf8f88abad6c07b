"""Qwen3 decoder in Flax NNX (dense; the sparse layers of a mixture of experts are ``quasar_jax.model.moe``).

One entry point serves prefill, single-token decode and multi-token verification:

    logits [B, T, V], cache = model(tokens [B, T], positions [B, T], cache)

Token ``(b, t)`` sits at absolute position ``positions[b, t]``; its K/V is written to that cache
slot, and it attends causally to the committed slots of its row plus this call's chunk (see
``KVCache.attention_mask``). Rows may sit at different offsets. The returned cache has
``lengths = positions[:, -1] + 1``; a caller that keeps fewer tokens (speculative rejection,
right padding) sets ``lengths`` itself. ``return_hidden=True`` adds the final hidden state
``[B, T, D]`` (the LM head's input) as a third output, for draft heads (``quasar_jax.speculative.heads``).

Tree verification passes ``chunk_mask [B, T, T]`` (bool): token t then attends to chunk token j
iff ``chunk_mask[b, t, j]`` (instead of causally), its K/V goes to slot ``positions[b, 0] + t``
(contiguous scratch slots) while ``positions`` still sets its RoPE angle (a tree node's depth).

Dimension letters are those of docs/CONVENTIONS.md: B T S D H G R E F V L.
Numerics follow transformers' Qwen3: RMSNorm in float32 (normalised value cast back to the
compute dtype before the weight multiply), RoPE cos/sin in float32 cast to the compute dtype,
attention scores and softmax in float32, logits returned in float32.

The forward takes ``mode`` (a :class:`~quasar_jax.model.modes.QuantMode`) and passes it to every
projection as ``proj(x, mode=mode)``: a float ``Linear`` ignores it; ``quasar_jax.model.quant`` swaps the
projections for int8 layers that multiply as it says ("w8a16" or "w8a8"; "float" is an error
there). The projections are found by walking the module tree (:func:`linear_paths`), and the
checkpoint key table is derived from the same tree, so no list of projection names exists.

Profiles read as the model does: the forward runs under ``jax.named_scope`` "embed",
"layer_{i}/attention", "layer_{i}/mlp" and "lm_head" (final norm + LM head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.kv_cache import KVCache
from quasar_jax.model.modes import QuantMode
from quasar_jax.model.moe import ExpertLinear, SparseMoeBlock

_init = nnx.initializers.normal(0.02)


class Linear(nnx.Module):
    """``y = x @ kernel`` with ``kernel [I, O]`` (the transpose of torch's ``weight``)."""

    def __init__(self, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs.params(), (d_in, d_out), dtype))

    def __call__(self, x: jax.Array, *, mode: QuantMode = QuantMode.FLOAT) -> jax.Array:
        del mode  # float weights: nothing to choose
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

    def __call__(self, x, positions, slots, cache: KVCache, layer: int, mask, *, mode: QuantMode):
        b, t, _ = x.shape  # [B, T, D]
        h, g, e = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x, mode=mode).reshape(b, t, h, e))  # [B, T, H, E]
        k = self.k_norm(self.k_proj(x, mode=mode).reshape(b, t, g, e))  # [B, T, G, E]
        v = self.v_proj(x, mode=mode).reshape(b, t, g, e)  # [B, T, G, E]
        q = rope(q, positions, self.rope_theta)
        k = rope(k, positions, self.rope_theta)
        out, cache = cache.attend(layer, q, k, v, slots, mask)  # [B, T, H, E]: dense strip or pages
        out = out.astype(x.dtype).reshape(b, t, h * e)
        return self.o_proj(out, mode=mode), cache


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, mode: QuantMode):
        gate = jax.nn.silu(self.gate_proj(x, mode=mode))  # [B, T, F]
        return self.down_proj(gate * self.up_proj(x, mode=mode), mode=mode)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, rngs: nnx.Rngs, layer: int = 0):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        # a sparse layer of a mixture of experts (quasar_jax.model.moe) or the dense MLP
        self.mlp = (SparseMoeBlock(cfg, dtype=dtype, rngs=rngs) if cfg.is_moe_layer(layer)
                    else MLP(cfg, dtype=dtype, rngs=rngs))

    def __call__(self, x, positions, slots, cache, layer: int, mask, *, mode: QuantMode):
        with jax.named_scope(f"layer_{layer}/attention"):
            attn, cache = self.self_attn(self.input_layernorm(x), positions, slots, cache, layer, mask,
                                         mode=mode)
            x = x + attn
        with jax.named_scope(f"layer_{layer}/mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x), mode=mode)
        return x, cache


class Qwen3(nnx.Module):
    """Qwen3 causal LM (dense or mixture of experts). Attribute names mirror the Hugging Face checkpoint keys."""

    def __init__(self, cfg: Qwen3Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Param(_init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype))
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs, layer=i)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.init(self.config, batch, max_len, self.dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *,
                 mode: QuantMode = QuantMode.FLOAT, chunk_mask: jax.Array | None = None,
                 return_hidden: bool = False):
        """tokens, positions [B, T] int32 -> (logits [B, T, V] float32, cache).

        ``mode`` is how the projections multiply: ``FLOAT`` for a float model, ``W8A16`` or
        ``W8A8`` for an int8 one (it is static under ``jit``). ``chunk_mask [B, T, T]`` replaces
        causal visibility inside this call's tokens (tree verification; module docstring).
        ``return_hidden=True`` also returns the final hidden state ``[B, T, D]`` (compute dtype):
        the output of the final norm, i.e. the LM head's input (draft heads reuse it):
        ``(logits, cache, hidden)``.
        """
        mode = QuantMode.parse(mode, "mode")
        mask = cache.attention_mask(positions, chunk_mask)  # [B, T, S], lengths before this call
        slots = positions  # [B, T] where each token's K/V is written
        if chunk_mask is not None:
            slots = positions[:, :1] + jnp.arange(tokens.shape[1], dtype=positions.dtype)[None, :]
        with jax.named_scope("embed"):
            x = self.embed(tokens)  # [B, T, D]
        for layer, block in enumerate(self.layers):
            x, cache = block(x, positions, slots, cache, layer, mask, mode=mode)
        with jax.named_scope("lm_head"):
            x = self.norm(x)
            logits = self.lm_logits(x, mode=mode)
        cache = cache.replace(lengths=positions[:, -1].astype(jnp.int32) + 1)
        return (logits, cache, x) if return_hidden else (logits, cache)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings ``[..., D]`` (compute dtype) of int32 ``tokens [...]``."""
        return jnp.take(self.embed_tokens[...], tokens, axis=0)

    def lm_logits(self, x: jax.Array, *, mode: QuantMode = QuantMode.FLOAT) -> jax.Array:
        """The LM head: final hidden states ``x [..., D]`` (after the final norm) -> logits
        ``[..., V]`` float32 (the tied embedding, or ``lm_head`` multiplied as ``mode`` says)."""
        if self.lm_head is None:
            logits = jnp.einsum("...d,vd->...v", x, self.embed_tokens[...], preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x, mode=mode)
        return logits.astype(jnp.float32)


def forward(model: Qwen3, tokens, positions, cache, *, mode: QuantMode = QuantMode.FLOAT,
            chunk_mask=None, return_hidden: bool = False):
    """Functional alias of ``model(tokens, positions, cache, mode=..., chunk_mask=..., return_hidden=...)``."""
    return model(tokens, positions, cache, mode=mode, chunk_mask=chunk_mask, return_hidden=return_hidden)


def linear_paths(module: nnx.Module, *, lm_head: bool = True) -> list[tuple]:
    """Attribute paths of the float ``Linear`` layers under ``module``, in module-tree order.

    The projections of a ``Qwen3`` are every ``Linear`` (and every ``ExpertLinear``, the stacked
    weights of a mixture of experts; the router is not a projection) but its untied head
    ``("lm_head",)``, which is included only with ``lm_head=True``. This walk is the one place
    that finds them.
    """
    return [path for path, m in nnx.iter_modules(module)
            if isinstance(m, (Linear, ExpertLinear)) and (lm_head or path != ("lm_head",))]


def get_path(module: nnx.Module, path: tuple):
    """The attribute at ``path`` (names and list indices) below ``module``."""
    for part in path:
        module = module[part] if isinstance(part, int) else getattr(module, part)
    return module


def set_path(module: nnx.Module, path: tuple, value) -> None:
    """Replace the attribute at ``path`` (a non-empty tuple) below ``module`` by ``value``."""
    parent, last = get_path(module, path[:-1]), path[-1]
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)


def abstract_model(cfg: Qwen3Config, dtype=jnp.float32) -> Qwen3:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes and parameter counts, no memory."""
    return nnx.eval_shape(lambda: Qwen3(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def count_params(model: Qwen3) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
