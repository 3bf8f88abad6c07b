"""int8 weight quantisation of the Qwen3 projections (Quasar / QSpec), built on Google AQT.

One set of int8 weights serves two activation modes, chosen per call by ``quant_mode``:

* ``"w8a16"`` (weight-only; the verifier in QSpec/Quasar): activations stay in ``x.dtype``,
  ``y = (x @ qvalue.astype(x.dtype)) * scale`` accumulated in float32.
* ``"w8a8"`` (the cheap drafter): each token row of ``x`` is quantised dynamically (symmetric
  int8, per-token absmax), ``y = (x_q @ qvalue accumulated in int32) * x_scale * scale``
  (multiplied in float32 in that order, as in ``pallas_kernels.int8_matmul_reference``).

The output dtype is always ``x.dtype``.

Weight format: ``kernel [I, O] ~= qvalue [I, O] int8 * scale [O] float32`` (symmetric,
per-output-channel, ``qvalue`` in [-127, 127], round half to even). The absmax of each channel /
token row is clamped so the scale is ``>= MIN_SCALE`` (1e-8, i.e. absmax >= 1.27e-6): an all-zero
channel or activation row quantises to zeros with a finite scale, never NaN. Same convention as
``pallas_kernels.quantize_rows``.

How AQT (``aqtp``, imported ``aqt``) is used:

* Quantisation: an ``aqt.jax.v2.aqt_quantizer.Quantizer`` with AQT's ``IntSymmetric`` int8
  numerics (``preserve_max_val=True`` -> bound 127) and a small ``Calibration`` subclass
  (absmax with the ``MIN_SCALE`` clamp, float32 scales). ``quantize_kernel`` runs it over axis 0
  (the contracting axis I) of the kernel; the same quantiser, over the last axis, is the per-token
  activation quantiser of w8a8 mode.
* Matmul (backend "xla"): ``aqt.jax.v2.aqt_dot_general.DotGeneralRaw`` (the forward-only AQT
  dot_general) with the weight passed as a frozen, fully quantised ``QTensor`` (serving mode).
  w8a16: lhs unquantised (AQT ``NoNumerics``), ``dg_accumulator_dtype=float32``; w8a8: lhs
  quantised by AQT per token, ``dg_accumulator_dtype=int32`` (int8 x int8 -> int32 dot); AQT then
  applies the transposed scales to the accumulator (``DequantMode.OUTPUT``). Because the frozen
  QTensor replaces the weight, AQT's ``rhs`` argument is only a (1, 1) float32 placeholder (its
  dtype makes AQT dequantise the accumulator in float32); AQT's own calibration of that
  placeholder is dead code. AQT's ``DotGeneralRaw.dot_general`` hook is set to a
  ``jax.lax.dot_general`` wrapper: in w8a8 it is ``dot_general(int8, int8,
  preferred_element_type=int32)`` untouched; in w8a16 it casts the int8 weight to ``x.dtype`` at
  the dot (``x @ qvalue.astype(x.dtype)``, f32 accumulation), a convert that XLA fuses into the
  GEMM on GPU (checked on an H100: one bf16 Triton GEMM fusion, no weight copy; the uncast mixed
  bf16 x int8 dot instead got a materialised float32 weight copy at M >= 512). On CPU XLA may
  materialise the converted weight transiently per call; the Pallas backend never does.
  float32 activations use ``Precision.HIGHEST`` (no TF32 on GPU).
* AQT 0.9 calls ``jnp.promote_types`` on arrays, which jax reports as a ``DeprecationWarning``
  ("Implicit conversion of an array to a dtype is deprecated"); exactly that warning is ignored
  around the AQT call (a scoped filter, not a global one).
* backend "pallas": ``pallas_kernels.int8_matmul(x, qvalue, scale, act_quant=mode == "w8a8",
  backend="auto")`` (imported lazily at trace time), same numerics and weight format.

Entry points: ``Int8Linear`` (drop-in for ``quasar_jax.model.Linear``), ``quantize_model`` (in
place, layer by layer), ``abstract_quantized_model``, ``param_bytes``, ``quantized_projection_bytes``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aqt.jax.v2 import aqt_dot_general
from aqt.jax.v2 import aqt_quantizer
from aqt.jax.v2 import aqt_tensor
from aqt.jax.v2 import calibration as aqt_calibration
from aqt.jax.v2 import utils as aqt_utils
from aqt.jax.v2.numerics import utils as aqt_numerics_utils

from quasar_jax.config import Qwen3Config
from quasar_jax.model import Linear, Qwen3

MODES = ("w8a16", "w8a8")
BACKENDS = ("xla", "pallas")
INT8_MAX = 127
MIN_SCALE = 1e-8  # scale floor (= absmax floor / 127); matches pallas_kernels.quantize_rows
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

_AQT_DTYPE_WARNING = r"Implicit conversion of an array to a dtype is deprecated"


def _check_mode(mode: Any, what: str = "quant_mode") -> str:
    if mode not in MODES:
        raise ValueError(f"unknown {what} {mode!r}; valid values: {', '.join(map(repr, MODES))}")
    return mode


def _check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid values: "
                         f"{', '.join(map(repr, BACKENDS))}")
    return backend


# ----------------------------------------------------------------------------- AQT quantiser
@aqt_utils.flax_slots_kw_only_dataclass
class ClampedAbsMaxCalibration(aqt_calibration.Calibration):
    """AQT absmax calibration with the scale clamped to ``>= MIN_SCALE`` (float32 maths)."""

    def get_scale_and_bias_and_sparsity(self, x, shared_axes, numerics_, context=None):
        del context
        assert shared_axes is not None, "ClampedAbsMaxCalibration needs calibration axes"
        abs_max = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(shared_axes), keepdims=True)
        scale = jnp.maximum(abs_max / numerics_.get_quant_bound(), MIN_SCALE)
        return [scale.astype(self.dtype or jnp.float32)], [], None


def int8_quantizer() -> aqt_quantizer.Quantizer:
    """AQT quantiser: symmetric int8 in [-127, 127], float32 scales, clamped absmax."""
    quantizer = aqt_quantizer.Quantizer(
        numerics=aqt_numerics_utils.get_numerics(8, preserve_max_val=True),
        calib_shared_axes=None,
        scale_stop_grad=True,
        scale_dtype=jnp.float32,
        calibration=ClampedAbsMaxCalibration,
        context=aqt_utils.Context(key=None, train_step=None),
    )
    quantizer.init_calibration()
    return quantizer


def _lax_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """The dot AQT calls.

    w8a16 (float activations x int8 weight): the weight is cast to the activation dtype right at
    the dot, i.e. ``x @ qvalue.astype(x.dtype)``. Measured on an H100 (jax 0.11, I=4096,
    O=12288): XLA fuses that convert into a single bf16 Triton GEMM, whereas the mixed
    bf16 x int8 dot AQT would emit is lowered (at M >= 512) to a materialised float32 copy of the
    weight plus a float32 cuBLAS GEMM. float32 activations use HIGHEST precision (no TF32).
    """
    del precision
    if jnp.issubdtype(rhs.dtype, jnp.integer) and jnp.issubdtype(lhs.dtype, jnp.floating):
        rhs = rhs.astype(lhs.dtype)
    precision = (jax.lax.Precision.HIGHEST if jnp.float32 in (lhs.dtype, rhs.dtype)
                 else jax.lax.Precision.DEFAULT)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


@functools.lru_cache(maxsize=None)
def _aqt_dot_general(mode: str) -> aqt_dot_general.DotGeneralRaw:
    """Forward-only AQT dot_general for ``x [M, I] @ frozen int8 QTensor [I, O]``."""
    raw = aqt_dot_general.dot_general_raw_make(
        lhs_bits=8 if mode == "w8a8" else None, rhs_bits=8, jax_scope_name=f"aqt_{mode}")
    raw.dg_quantizer.rhs = int8_quantizer()
    if mode == "w8a8":
        raw.dg_quantizer.lhs = int8_quantizer()  # dynamic per-token (contracting-axis) absmax
        raw.dg_accumulator_dtype = jnp.int32
    else:
        raw.dg_accumulator_dtype = jnp.float32
    raw.dot_general = _lax_dot_general
    return raw


def _frozen_qtensor(qvalue: jax.Array, scale: jax.Array) -> aqt_tensor.QTensor:
    return aqt_tensor.QTensor(qvalue=qvalue, scale=[scale.astype(jnp.float32).reshape(1, -1)],
                              scale_t=None, bias=[], dequant_dtype=jnp.float32)


# ----------------------------------------------------------------------------- functional API
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
    qt, _ = int8_quantizer().quant(kernel, calibration_axes=[0])
    return qt.qvalue, qt.scale[0].reshape(-1)


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
    return _frozen_qtensor(qvalue, scale).dequant().astype(dtype)


def int8_matmul_xla(x: jax.Array, qvalue: jax.Array, scale: jax.Array, *, mode: str) -> jax.Array:
    """``x [..., I] @ (qvalue [I, O] int8 * scale [O])`` via AQT's dot_general -> ``[..., O]``."""
    _check_mode(mode)
    lead, (i, o) = x.shape[:-1], qvalue.shape
    x2 = x.reshape(-1, i)  # [M, I]
    lhs = x2.astype(jnp.float32) if mode == "w8a8" else x2  # w8a8 quantises from float32
    placeholder = jnp.zeros((1, 1), jnp.float32)  # AQT's rhs; the frozen QTensor is used instead
    dims = (((1,), (0,)), ((), ()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_AQT_DTYPE_WARNING, category=DeprecationWarning)
        y, _ = _aqt_dot_general(mode)(lhs, placeholder, None, _frozen_qtensor(qvalue, scale), dims)
    return y.astype(x.dtype).reshape(*lead, o)


def int8_matmul_pallas(x: jax.Array, qvalue: jax.Array, scale: jax.Array, *, mode: str) -> jax.Array:
    """Same as :func:`int8_matmul_xla` through ``pallas_kernels.int8_matmul`` (lazy import)."""
    _check_mode(mode)
    try:
        from pallas_kernels import int8_matmul
    except ImportError as err:
        raise ImportError(f"backend 'pallas' needs pallas_kernels.int8_matmul, which cannot be "
                          f"imported: {err}") from err
    return int8_matmul(x, qvalue, scale, act_quant=mode == "w8a8", backend="auto").astype(x.dtype)


# ----------------------------------------------------------------------------- the layer
class Int8Linear(nnx.Module):
    """int8 drop-in for ``quasar_jax.model.Linear``: holds only ``qvalue`` and ``scale``.

    ``qvalue`` int8 ``[I, O]`` and ``scale`` float32 ``[O]`` are ``nnx.Param``; ``mode`` (the
    default ``quant_mode``) and ``backend`` are static attributes.
    """

    def __init__(self, qvalue: jax.Array, scale: jax.Array, *, mode: str = "w8a16",
                 backend: str = "xla"):
        _check_mode(mode, "mode")
        _check_backend(backend)
        if getattr(qvalue, "ndim", None) != 2 or jnp.dtype(qvalue.dtype) != jnp.int8:
            raise ValueError(f"Int8Linear qvalue must be int8 [I, O], got "
                             f"{getattr(qvalue, 'dtype', type(qvalue).__name__)} "
                             f"{tuple(getattr(qvalue, 'shape', ()))}")
        if tuple(scale.shape) != (qvalue.shape[1],):
            raise ValueError(f"Int8Linear scale must have shape ({qvalue.shape[1]},), got "
                             f"{tuple(scale.shape)}")
        self.qvalue = nnx.Param(qvalue)
        self.scale = nnx.Param(scale.astype(jnp.float32))
        self.mode = mode
        self.backend = backend

    @classmethod
    def from_kernel(cls, kernel: jax.Array, *, mode: str = "w8a16", backend: str = "xla",
                    name: str = "kernel") -> "Int8Linear":
        _check_mode(mode, "mode")
        _check_backend(backend)
        return cls(*quantize_kernel(kernel, name=name), mode=mode, backend=backend)

    @property
    def in_features(self) -> int:  # I
        return self.qvalue.shape[0]

    @property
    def out_features(self) -> int:  # O
        return self.qvalue.shape[1]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self.qvalue[...], self.scale[...], dtype)

    def __call__(self, x: jax.Array, *, quant_mode: str | None = None) -> jax.Array:
        mode = _check_mode(self.mode if quant_mode is None else quant_mode)
        matmul = int8_matmul_pallas if self.backend == "pallas" else int8_matmul_xla
        return matmul(x, self.qvalue[...], self.scale[...], mode=mode)


def quantize_linear(linear: Any, *, mode: str = "w8a16", backend: str = "xla",
                    name: str = "module") -> Int8Linear:
    """A float ``Linear`` -> ``Int8Linear`` (an ``Int8Linear`` is re-wrapped with the new settings)."""
    _check_mode(mode, "mode")
    _check_backend(backend)
    if isinstance(linear, Int8Linear):
        return Int8Linear(linear.qvalue[...], linear.scale[...], mode=mode, backend=backend)
    if not isinstance(linear, Linear):
        raise ValueError(f"cannot quantise {name}: expected a quasar_jax.model.Linear, got "
                         f"{type(linear).__name__}")
    return Int8Linear.from_kernel(linear.kernel[...], mode=mode, backend=backend, name=name)


def _block(arrays) -> None:
    """Wait for concrete arrays (bounds the async queue, so freed float kernels really go)."""
    leaves = [a for a in jax.tree.leaves(arrays) if not isinstance(a, jax.core.Tracer)]
    jax.block_until_ready(leaves)


def quantize_model(model: Qwen3, *, lm_head: bool = False, mode: str = "w8a16",
                   backend: str = "xla") -> Qwen3:
    """Replace, in place, every q/k/v/o and gate/up/down projection by an ``Int8Linear``.

    ``lm_head=True`` also quantises the untied ``lm_head`` (a tied model raises ``ValueError``:
    its head is the float embedding). Embeddings and norms stay float. Layers are quantised one at
    a time and each float kernel is dropped as soon as its layer is done, so the extra peak memory
    is about one layer's projections (the float arrays are freed once nothing else refers to them;
    ``nnx.clone`` of the model shares them). Returns ``model``.
    """
    _check_mode(mode, "mode")
    _check_backend(backend)
    if not isinstance(model, Qwen3):
        raise ValueError(f"quantize_model expects a quasar_jax.model.Qwen3, got {type(model).__name__}")
    if lm_head and model.lm_head is None:
        raise ValueError("quantize_model: lm_head=True but this model ties its LM head to the float "
                         "embedding (tie_word_embeddings=True); there is no separate lm_head to quantise")
    for i, layer in enumerate(model.layers):
        done = []
        for parent, prefix, names in ((layer.self_attn, "self_attn", ATTN_PROJECTIONS),
                                      (layer.mlp, "mlp", MLP_PROJECTIONS)):
            for proj in names:
                q = quantize_linear(getattr(parent, proj), mode=mode, backend=backend,
                                    name=f"layers.{i}.{prefix}.{proj}")
                setattr(parent, proj, q)  # drops the float Linear
                done.append((q.qvalue[...], q.scale[...]))
        _block(done)
    if lm_head:
        model.lm_head = quantize_linear(model.lm_head, mode=mode, backend=backend, name="lm_head")
        _block((model.lm_head.qvalue[...], model.lm_head.scale[...]))
    return model


def abstract_quantized_model(cfg: Qwen3Config, dtype=jnp.bfloat16, *, lm_head: bool = False,
                             mode: str = "w8a16", backend: str = "xla") -> Qwen3:
    """The quantised model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory).

    ``nnx.split`` of it gives the graphdef / state layout a loader fills: projections at
    ``(..., "q_proj", "qvalue")`` int8 and ``(..., "q_proj", "scale")`` float32.
    """
    return nnx.eval_shape(lambda: quantize_model(Qwen3(cfg, dtype=dtype, rngs=nnx.Rngs(0)),
                                                 lm_head=lm_head, mode=mode, backend=backend))


# ----------------------------------------------------------------------------- accounting
def _nbytes(x: Any) -> int:
    return int(x.size) * jnp.dtype(x.dtype).itemsize


def is_quantized(model: nnx.Module) -> bool:
    """Whether any layer of ``model`` is an ``Int8Linear``."""
    return any(isinstance(m, Int8Linear) for _, m in nnx.iter_modules(model))


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
        if isinstance(module, Int8Linear):
            quantized += _nbytes(module.qvalue) + _nbytes(module.scale)
            bf16 += int(module.qvalue.size) * 2
            count += 1
    return ProjectionBytes(quantized, bf16, count)
