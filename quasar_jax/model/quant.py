"""int8 weight quantisation of the Qwen3 projections (Quasar / QSpec).

One set of int8 weights serves both int8 activation modes (:class:`~quasar_jax.model.modes.QuantMode`),
chosen per call by ``mode`` and never stored in the model:

* ``W8A16`` (weight-only; the verifier in QSpec/Quasar): activations stay in ``x.dtype``,
  ``y = (x @ qvalue.astype(x.dtype)) * scale`` accumulated in float32 (``Precision.HIGHEST`` for
  float32 activations: no TF32).
* ``W8A8`` (the cheap drafter): each token row of ``x`` is quantised dynamically (symmetric int8,
  per-token absmax), ``y = (x_q @ qvalue accumulated in int32) * x_scale * scale`` (multiplied in
  float32 in that order).

The output dtype is always ``x.dtype``. ``FLOAT`` on an int8 layer is a ``ValueError``.

Weight format: ``kernel [I, O] ~= qvalue [I, O] int8 * scale [O] float32`` (symmetric,
per-output-channel, ``qvalue`` in [-127, 127], round half to even). The absmax of each channel /
token row is clamped so the scale is ``>= MIN_SCALE`` (1e-8, i.e. absmax >= 1.27e-6): an all-zero
channel or activation row quantises to zeros with a finite scale, never NaN.

Where the arithmetic lives (one place each):

* The int8 formula, its constants (``INT8_MAX``, ``MIN_SCALE``) and the absmax clamp
  (``absmax_bound``) are those of ``pallas_kernels.int8_matmul.reference``, the ground truth the
  Pallas kernels are tested against. Backend ``xla`` *is* that reference
  (``int8_matmul_reference``); backend ``pallas`` is ``pallas_kernels.int8_matmul`` (Triton on
  GPU, Mosaic on TPU, imported by the wrapper only when it launches one; the reference on CPU).
  So both backends compute the same formula, and the W8A8 activation quantiser is
  ``quantize_rows``.
* Weights are quantised once, by AQT (``aqtp``, imported ``aqt``) through its public quantiser
  API, the pattern of AQT's own ``aqt.jax.v2.pallas.quantizer.quant``:
  ``aqt_quantizer.quantizer_make(8, preserve_max_val=True)`` (``IntSymmetric`` numerics, bound
  127, float32 scales) with a ``calibration.ConstantCalibration`` whose per-channel bound is
  ``absmax_bound(kernel, axis=0)`` (AQT's stock absmax calibration has no scale floor: it maps a
  zero channel to scale 1/127 and a tiny one below 1e-8), then ``quantizer.quant`` over the
  contracting axis I. The resulting int8 values equal ``quantize_rows`` of the transposed kernel
  (tested).

Why this split rather than AQT's dot_general for the matmul too: the int8 weights are frozen
tensors stored in the model, while AQT's dot_general quantises its operands itself; serving a
frozen weight through it needs private AQT objects (``DotGeneralRaw`` with a prebuilt
``QTensor``, a placeholder rhs and a warnings filter for AQT 0.9's deprecated dtype promotion),
and it would be a second matmul formula next to the reference the kernels already match. AQT's
quantiser, by contrast, is public and used as designed.

On the w8a16 dot: the int8 weight is cast to ``x.dtype`` at the dot, a convert that XLA fuses into
the GEMM on GPU (checked on an H100: one bf16 Triton GEMM fusion, no weight copy; a mixed
bf16 x int8 dot instead got a materialised float32 weight copy at M >= 512). On CPU XLA may
materialise the converted weight transiently per call; the Pallas backend never does.

Mixture-of-experts layers: ``Int8ExpertLinear`` (drop-in for ``quasar_jax.model.moe.ExpertLinear``)
holds ``qvalue [X, I, O]`` and ``scale [X, O]``, each expert quantised by the same AQT quantiser
(vmapped) and multiplied by the same formula inside the grouped matmuls; routers stay float.

Entry points: ``Int8Linear`` (drop-in for ``quasar_jax.model.qwen3.Linear``), ``quantize_model`` (in
place, layer by layer), ``abstract_quantized_model``, ``param_bytes``, ``quantized_projection_bytes``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aqt.jax.v2 import aqt_quantizer
from aqt.jax.v2 import calibration as aqt_calibration
from pallas_kernels import int8_matmul, int8_matmul_reference
from pallas_kernels.int8_matmul.reference import INT8_MAX, MIN_SCALE, absmax_bound, quantize_rows
from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.modes import Backend, QuantMode
from quasar_jax.model.moe import ExpertLinear, dot_precision
from quasar_jax.model.qwen3 import Linear, Qwen3, get_path, linear_paths, set_path

__all__ = ["INT8_MAX", "MIN_SCALE", "Int8ExpertLinear", "Int8Linear", "ProjectionBytes", "abstract_quantized_model",
           "dequantize", "int8_matmul_pallas", "int8_matmul_xla", "is_quantized", "param_bytes",
           "quantize_kernel", "quantize_linear", "quantize_model", "quantized_projection_bytes"]


def int8_mode(mode: Any) -> QuantMode:
    """``mode`` as a ``QuantMode`` that an int8 layer can run (``W8A16`` or ``W8A8``)."""
    mode = QuantMode.parse(mode, "mode")
    if not mode.is_int8:
        raise ValueError(f"mode {mode.value!r} multiplies float weights, but the model holds int8 "
                         f"weights (Int8Linear); use 'w8a16' or 'w8a8'")
    return mode


# ----------------------------------------------------------------------------- weights (AQT)
def _check_kernel(kernel: Any, name: str) -> None:
    shape = getattr(kernel, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"cannot quantise {name}: expected a rank-2 Linear kernel [I, O], got "
                         f"{'shape ' + str(tuple(shape)) if shape is not None else type(kernel).__name__}")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"cannot quantise {name}: expected a floating-point kernel, got {kernel.dtype}")


@functools.partial(jax.jit, static_argnames="transpose")
def _quantize_kernel_impl(kernel: jax.Array, transpose: bool) -> tuple[jax.Array, jax.Array]:
    kernel = kernel.astype(jnp.float32)
    if transpose:  # torch layout [O, I] -> [I, O], fused into the quantisation
        kernel = kernel.T
    quantizer = aqt_quantizer.quantizer_make(8, preserve_max_val=True, initialize_calibration=False,
                                             scale_dtype=jnp.float32)
    quantizer.calibration = functools.partial(aqt_calibration.ConstantCalibration,
                                              bound=absmax_bound(kernel, axis=0))  # [1, O]
    quantizer.init_calibration()
    qt, _ = quantizer.quant(kernel, calibration_axes=[0])
    return qt.qvalue.astype(jnp.int8), qt.scale[0].reshape(-1)


def quantize_kernel(kernel: jax.Array, *, name: str = "kernel",
                    transpose: bool = False) -> tuple[jax.Array, jax.Array]:
    """``kernel [I, O]`` float -> ``(qvalue [I, O] int8, scale [O] float32)``.

    With ``transpose=True`` the input is a torch/HF ``weight [O, I]`` and the result is still the
    ``[I, O]`` layout. Raises ``ValueError`` (naming ``name``) for a non-rank-2 or non-float input.
    """
    _check_kernel(kernel, name)
    return _quantize_kernel_impl(jnp.asarray(kernel), transpose)


def dequantize(qvalue: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``qvalue [I, O] int8, scale [O]`` -> ``qvalue * scale`` as ``[I, O]`` in ``dtype``."""
    if qvalue.ndim != 2 or scale.shape != (qvalue.shape[1],):
        raise ValueError(f"dequantize expects qvalue [I, O] and scale [O], got shapes "
                         f"{tuple(qvalue.shape)} and {tuple(scale.shape)}")
    return (qvalue.astype(jnp.float32) * scale.astype(jnp.float32)[None, :]).astype(dtype)


# ----------------------------------------------------------------------------- matmul
def int8_matmul_xla(x: jax.Array, qvalue: jax.Array, scale: jax.Array, *,
                    mode: QuantMode) -> jax.Array:
    """``x [..., I] @ (qvalue [I, O] int8 * scale [O])`` -> ``[..., O]`` in ``x.dtype``, by the
    reference formula (``pallas_kernels.int8_matmul_reference``) in XLA."""
    act_quant = int8_mode(mode) is QuantMode.W8A8
    lead, (i, o) = x.shape[:-1], qvalue.shape
    y = int8_matmul_reference(x.reshape(-1, i), qvalue, scale, act_quant=act_quant)  # [M, O]
    return y.reshape(*lead, o)


def int8_matmul_pallas(x: jax.Array, qvalue: jax.Array, scale: jax.Array, *,
                       mode: QuantMode) -> jax.Array:
    """Same as :func:`int8_matmul_xla` through the Pallas kernels (``pallas_kernels.int8_matmul``,
    ``backend="auto"``: Triton on GPU, Mosaic on TPU, the reference on CPU)."""
    act_quant = int8_mode(mode) is QuantMode.W8A8
    return int8_matmul(x, qvalue, scale, act_quant=act_quant, backend="auto").astype(x.dtype)


_MATMULS = {Backend.XLA: int8_matmul_xla, Backend.PALLAS: int8_matmul_pallas}


# ----------------------------------------------------------------------------- the layer
class Int8Linear(nnx.Module):
    """int8 drop-in for ``quasar_jax.model.qwen3.Linear``: holds only ``qvalue`` and ``scale``.

    ``qvalue`` int8 ``[I, O]`` and ``scale`` float32 ``[O]`` are ``nnx.Param``; ``backend`` (a
    ``Backend``) is a static attribute. The activation mode is an argument of every call.
    """

    def __init__(self, qvalue: jax.Array, scale: jax.Array, *, backend: Backend | str = Backend.XLA):
        backend = Backend.parse(backend, "backend")
        if getattr(qvalue, "ndim", None) != 2 or jnp.dtype(qvalue.dtype) != jnp.int8:
            raise ValueError(f"Int8Linear qvalue must be int8 [I, O], got "
                             f"{getattr(qvalue, 'dtype', type(qvalue).__name__)} "
                             f"{tuple(getattr(qvalue, 'shape', ()))}")
        if tuple(scale.shape) != (qvalue.shape[1],):
            raise ValueError(f"Int8Linear scale must have shape ({qvalue.shape[1]},), got "
                             f"{tuple(scale.shape)}")
        self.qvalue = nnx.Param(qvalue)
        self.scale = nnx.Param(scale.astype(jnp.float32))
        self.backend = backend

    @classmethod
    def from_kernel(cls, kernel: jax.Array, *, backend: Backend | str = Backend.XLA,
                    name: str = "kernel") -> "Int8Linear":
        backend = Backend.parse(backend, "backend")
        return cls(*quantize_kernel(kernel, name=name), backend=backend)

    @property
    def in_features(self) -> int:  # I
        return self.qvalue.shape[0]

    @property
    def out_features(self) -> int:  # O
        return self.qvalue.shape[1]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self.qvalue[...], self.scale[...], dtype)

    def __call__(self, x: jax.Array, *, mode: QuantMode) -> jax.Array:
        return _MATMULS[self.backend](x, self.qvalue[...], self.scale[...], mode=mode)


# ----------------------------------------------------------------------------- experts
@jax.jit
def _quantize_experts_impl(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.vmap(lambda w: _quantize_kernel_impl(w, False))(kernel)


def quantize_expert_kernel(kernel: jax.Array, *, name: str = "experts") -> tuple[jax.Array, jax.Array]:
    """``kernel [X, I, O]`` float -> ``(qvalue [X, I, O] int8, scale [X, O] float32)``: each expert
    quantised as :func:`quantize_kernel` quantises a ``Linear`` (the same AQT quantiser, vmapped)."""
    shape = getattr(kernel, "shape", None)
    if shape is None or len(shape) != 3 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"cannot quantise {name}: expected a floating rank-3 expert kernel [X, I, O], "
                         f"got {getattr(kernel, 'dtype', type(kernel).__name__)} {tuple(shape or ())}")
    return _quantize_experts_impl(jnp.asarray(kernel))


class Int8ExpertLinear(nnx.Module):
    """int8 drop-in for ``quasar_jax.model.moe.ExpertLinear``: ``qvalue [X, I, O]`` int8 and
    ``scale [X, O]`` float32; the matmul is ``Int8Linear``'s formula per expert (W8A16: float
    activations times the int8 weight cast at the dot, then the scale; W8A8: per-row int8
    activations, int32 accumulation, ``* x_scale * scale`` in that order). ``backend`` is kept for
    symmetry with ``Int8Linear``; grouped matmuls always run in XLA (``ragged_dot`` / blocked)."""

    def __init__(self, qvalue: jax.Array, scale: jax.Array, *, backend: Backend | str = Backend.XLA):
        backend = Backend.parse(backend, "backend")
        if getattr(qvalue, "ndim", None) != 3 or jnp.dtype(qvalue.dtype) != jnp.int8:
            raise ValueError(f"Int8ExpertLinear qvalue must be int8 [X, I, O], got "
                             f"{getattr(qvalue, 'dtype', type(qvalue).__name__)} {tuple(getattr(qvalue, 'shape', ()))}")
        if tuple(scale.shape) != (qvalue.shape[0], qvalue.shape[2]):
            raise ValueError(f"Int8ExpertLinear scale must have shape {(qvalue.shape[0], qvalue.shape[2])}, "
                             f"got {tuple(scale.shape)}")
        self.qvalue = nnx.Param(qvalue)
        self.scale = nnx.Param(scale.astype(jnp.float32))
        self.backend = backend

    @classmethod
    def from_kernel(cls, kernel: jax.Array, *, backend: Backend | str = Backend.XLA,
                    name: str = "experts") -> "Int8ExpertLinear":
        return cls(*quantize_expert_kernel(kernel, name=name), backend=backend)

    @property
    def num_experts(self) -> int:
        return self.qvalue.shape[0]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.qvalue[...].astype(jnp.float32) * self.scale[...][:, None, :]).astype(dtype)

    def ragged(self, x, row_expert, group_sizes, *, mode: QuantMode) -> jax.Array:
        """``x [M, I]`` sorted by expert -> ``[M, O]`` in ``x.dtype`` (``jax.lax.ragged_dot``)."""
        scale = jnp.take(self.scale[...], jnp.minimum(row_expert, self.num_experts - 1), axis=0)  # [M, O]
        if int8_mode(mode) is QuantMode.W8A8:
            x_q, x_scale = quantize_rows(x)
            acc = jax.lax.ragged_dot(x_q, self.qvalue[...], group_sizes, preferred_element_type=jnp.int32)
            y = acc.astype(jnp.float32) * x_scale[:, None] * scale
        else:
            acc = jax.lax.ragged_dot(x, self.qvalue[...].astype(x.dtype), group_sizes,
                                     precision=dot_precision(x.dtype), preferred_element_type=jnp.float32)
            y = acc * scale
        return y.astype(x.dtype)

    def blocked(self, xb, block_expert, *, mode: QuantMode) -> jax.Array:
        """``xb [nb, b, I]``, ``block_expert [nb]`` -> ``[nb, b, O]`` in ``xb.dtype``."""
        q = jnp.take(self.qvalue[...], block_expert, axis=0)  # [nb, I, O] int8
        scale = jnp.take(self.scale[...], block_expert, axis=0)[:, None, :]  # [nb, 1, O]
        if int8_mode(mode) is QuantMode.W8A8:
            x_q, x_scale = quantize_rows(xb)  # [nb, b, I], [nb, b]
            acc = jnp.einsum("nbi,nio->nbo", x_q, q, preferred_element_type=jnp.int32)
            y = acc.astype(jnp.float32) * x_scale[..., None] * scale
        else:
            acc = jnp.einsum("nbi,nio->nbo", xb, q.astype(xb.dtype), precision=dot_precision(xb.dtype),
                             preferred_element_type=jnp.float32)
            y = acc * scale
        return y.astype(xb.dtype)


def quantize_linear(linear: Any, *, backend: Backend | str = Backend.XLA,
                    name: str = "module") -> Int8Linear | Int8ExpertLinear:
    """A float ``Linear`` -> ``Int8Linear``, an ``ExpertLinear`` -> ``Int8ExpertLinear`` (an int8
    layer is re-wrapped with ``backend``)."""
    backend = Backend.parse(backend, "backend")
    if isinstance(linear, Int8Linear):
        return Int8Linear(linear.qvalue[...], linear.scale[...], backend=backend)
    if isinstance(linear, Int8ExpertLinear):
        return Int8ExpertLinear(linear.qvalue[...], linear.scale[...], backend=backend)
    if isinstance(linear, ExpertLinear):
        return Int8ExpertLinear.from_kernel(linear.kernel[...], backend=backend, name=name)
    if not isinstance(linear, Linear):
        raise ValueError(f"cannot quantise {name}: expected a quasar_jax.model.qwen3.Linear, got "
                         f"{type(linear).__name__}")
    return Int8Linear.from_kernel(linear.kernel[...], backend=backend, name=name)


def _block(arrays) -> None:
    """Wait for concrete arrays (bounds the async queue, so freed float kernels really go)."""
    leaves = [a for a in jax.tree.leaves(arrays) if not isinstance(a, jax.core.Tracer)]
    jax.block_until_ready(leaves)


def quantize_model(model: Qwen3, *, lm_head: bool = False,
                   backend: Backend | str = Backend.XLA) -> Qwen3:
    """Replace, in place, every float projection (each ``Linear`` of the layers) by an ``Int8Linear``.

    ``lm_head=True`` also quantises the untied ``lm_head`` (a tied model raises ``ValueError``:
    its head is the float embedding). Embeddings and norms stay float. The projections are found
    by walking the module tree (``model.linear_paths``) and quantised one layer at a time; each
    float kernel is dropped as soon as its layer is done, so the extra peak memory is about one
    layer's projections (the float arrays are freed once nothing else refers to them;
    ``nnx.clone`` of the model shares them). Returns ``model``.
    """
    backend = Backend.parse(backend, "backend")
    if not isinstance(model, Qwen3):
        raise ValueError(f"quantize_model expects a quasar_jax.model.qwen3.Qwen3, got {type(model).__name__}")
    if lm_head and model.lm_head is None:
        raise ValueError("quantize_model: lm_head=True but this model ties its LM head to the float "
                         "embedding (tie_word_embeddings=True); there is no separate lm_head to quantise")
    done, group = [], None
    for path in linear_paths(model, lm_head=lm_head):  # paths only: no float kernel is held here
        if path[:2] != group:  # a new layer (or the head): the previous one is finished
            _block(done)
            done, group = [], path[:2]
        q = quantize_linear(get_path(model, path), backend=backend, name=".".join(map(str, path)))
        set_path(model, path, q)  # drops the float Linear
        done.append((q.qvalue[...], q.scale[...]))
    _block(done)
    return model


def abstract_quantized_model(cfg: Qwen3Config, dtype=jnp.bfloat16, *, lm_head: bool = False,
                             backend: Backend | str = Backend.XLA) -> Qwen3:
    """The quantised model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory).

    ``nnx.split`` of it gives the graphdef / state layout a loader fills: projections at
    ``(..., "q_proj", "qvalue")`` int8 and ``(..., "q_proj", "scale")`` float32.
    """
    return nnx.eval_shape(lambda: quantize_model(Qwen3(cfg, dtype=dtype, rngs=nnx.Rngs(0)),
                                                 lm_head=lm_head, backend=backend))


# ----------------------------------------------------------------------------- accounting
def _nbytes(x: Any) -> int:
    return int(x.size) * jnp.dtype(x.dtype).itemsize


def is_quantized(model: nnx.Module) -> bool:
    """Whether any layer of ``model`` is an ``Int8Linear`` (or ``Int8ExpertLinear``)."""
    return any(isinstance(m, (Int8Linear, Int8ExpertLinear)) for _, m in nnx.iter_modules(model))


def param_bytes(model: nnx.Module) -> int:
    """Total bytes of the model's ``nnx.Param`` leaves (works on abstract models too)."""
    return sum(_nbytes(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


class ProjectionBytes(NamedTuple):
    quantized: int  # int8 values + float32 scales of every Int8Linear
    bf16: int  # the same projections stored as bf16 kernels
    count: int  # number of Int8Linear layers

    @property
    def ratio(self) -> float:
        return self.quantized / self.bf16 if self.bf16 else float("nan")


def quantized_projection_bytes(model: nnx.Module) -> ProjectionBytes:
    """Bytes of all ``Int8Linear`` layers vs. the bf16 kernels they replace."""
    quantized = bf16 = count = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (Int8Linear, Int8ExpertLinear)):
            quantized += _nbytes(module.qvalue) + _nbytes(module.scale)
            bf16 += int(module.qvalue.size) * 2
            count += 1
    return ProjectionBytes(quantized, bf16, count)
