"""Pure-JAX (XLA) reference for the int8 weight-quantised matmul.

Matmul letters (see docs/CONVENTIONS.md): M rows (= B*T), I input features,
O output features.

* ``w_q`` [I, O] int8, symmetric, per-output-channel scale ``w_scale`` [O] f32,
  i.e. the float weight is ``w ~= w_q * w_scale[None, :]``.
* ``act_quant=False`` (W8A16): ``y = (x @ w_q.astype(x.dtype)) * w_scale``,
  accumulated in float32 (``Precision.HIGHEST`` for float32 ``x``: no TF32).
* ``act_quant=True`` (W8A8): ``x`` is quantised per row (dynamic, symmetric,
  see :func:`quantize_rows`), ``y = (x_q @ w_q accumulated in int32)
  * x_scale[:, None] * w_scale[None, :]`` (the multiplications in this order,
  in float32; the kernels use the same order so they agree to rounding).

Quantisation is symmetric with the absmax of each row / channel clamped to
``>= INT8_MAX * MIN_SCALE`` (:func:`absmax_bound`), so the scale is
``>= MIN_SCALE`` and an all-zero row quantises to zeros with a finite scale.

The output dtype is ``x.dtype``.  This module is the ground truth for the
Pallas kernels, what the wrapper runs for ``backend="reference"`` (the default
on CPU), and the XLA backend of ``quasar_jax.model.quant`` (the project's one int8
formula; its constants are defined only here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT8_MAX = 127  # symmetric int8 range [-127, 127]
MIN_SCALE = 1e-8  # scale floor: guards all-zero rows (scale 0 would give 0/0 = NaN)


def absmax_bound(x: jax.Array, axis: int) -> jax.Array:
    """``max(|x|)`` along ``axis`` (kept, size 1) in float32, clamped to
    ``>= INT8_MAX * MIN_SCALE``; the quantisation scale is this ``/ INT8_MAX``
    (exactly ``MIN_SCALE`` for an all-zero row)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True)
    return jnp.maximum(amax, jnp.float32(INT8_MAX * MIN_SCALE))


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-row symmetric int8 quantisation.

    Args:
      x: [..., I] float array (any float dtype; the maths is done in float32).

    Returns:
      ``(x_q, x_scale)``: ``x_q`` [..., I] int8 in [-127, 127] and ``x_scale``
      [...] float32 with ``x ~= x_q * x_scale[..., None]``.  ``x_scale`` is
      ``max(|x_row|) / 127`` clamped to ``>= 1e-8`` so an all-zero row gives
      ``x_q = 0`` and a finite scale (no NaN).
    """
    x_scale = absmax_bound(x, -1) / INT8_MAX  # [..., 1]
    x_q = jnp.clip(jnp.round(x.astype(jnp.float32) / x_scale), -INT8_MAX, INT8_MAX)
    return x_q.astype(jnp.int8), x_scale[..., 0]


def dequant_epilogue(acc: jax.Array, w_scale: jax.Array,
                     x_scale: jax.Array | None, out_dtype) -> jax.Array:
    """Applies the scales to an [M, O] accumulator (int32 or float32).

    Shared by the reference and by the split-K reduction of the GPU kernel so
    that the multiplication order is the same everywhere.
    """
    y = acc.astype(jnp.float32)
    if x_scale is not None:
        y = y * x_scale.astype(jnp.float32)[:, None]
    y = y * w_scale.astype(jnp.float32)[None, :]
    return y.astype(out_dtype)


def int8_matmul_reference(x: jax.Array, w_q: jax.Array, w_scale: jax.Array,
                          *, act_quant: bool) -> jax.Array:
    """Reference int8 matmul.  x [M, I] (f32 or bf16), w_q [I, O] int8,
    w_scale [O] f32 -> [M, O] in x.dtype.  Leading dims of x other than the
    last are not flattened here (use the wrapper for [..., I])."""
    if act_quant:
        x_q, x_scale = quantize_rows(x)
        acc = jax.lax.dot_general(
            x_q, w_q, (((x_q.ndim - 1,), (0,)), ((), ())),
            preferred_element_type=jnp.int32)
        return dequant_epilogue(acc.reshape(-1, acc.shape[-1]), w_scale,
                                x_scale.reshape(-1), x.dtype).reshape(acc.shape)
    # The int8 weight is cast to x.dtype right at the dot: XLA fuses that
    # convert into the GEMM on GPU (no float copy of the weight).
    precision = (jax.lax.Precision.HIGHEST if x.dtype == jnp.float32
                 else jax.lax.Precision.DEFAULT)
    acc = jax.lax.dot_general(
        x, w_q.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())),
        precision=precision, preferred_element_type=jnp.float32)
    return dequant_epilogue(acc.reshape(-1, acc.shape[-1]), w_scale, None,
                            x.dtype).reshape(acc.shape)
