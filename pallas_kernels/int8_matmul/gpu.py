"""Pallas GPU (Triton backend) int8-weight matmul kernel.

Matmul letters: M rows, I input features, O output features.

Grid: (M / block_m, O / block_o, split_k).  Each program owns one
[block_m, block_o] output tile and one contiguous 1/split_k share of the I
reduction, which it walks with a ``fori_loop`` in steps of ``block_i``
(Triton software-pipelines the loads over ``num_stages``).  Triton programs
run concurrently, so the reduction cannot be carried across grid steps as on
TPU; when ``split_k > 1`` the kernel writes un-scaled partial sums
[split_k, M, O] (int32 for W8A8, float32 for W8A16) and XLA adds them and
applies the scales (:func:`reference.dequant_epilogue`, same order as the
reference).

Small M (decode / verify, M = B*(K+1) <= 64) is memory bound on the int8
weight bytes: the tuned/heuristic block sizes use a single M block (the
weights are read exactly once), narrow O tiles and split-K so that enough
programs are in flight to saturate HBM bandwidth.  Triton's ``dot`` needs
every tile dimension >= 16, so M is padded to at least 16 by the wrapper.

W8A16: the int8 weight tile is converted to bf16 in registers and fed to
``dot`` with a float32 accumulator.  float32 x is split in-kernel into three
bf16 pieces (hi + mid + lo) and multiplied with three bf16 dots, which is
f32-accurate (w is exact in bf16) and uses tensor cores; the alternative
``f32_dot="ieee"`` (``Precision.HIGHEST``) is exact too but runs on the FMA
units (validated on H100, ~40x slower).  A DEFAULT-precision f32 dot would be
TF32 in Triton (~2e-4 relative error, measured).
W8A8: x arrives already quantised (int8 + per-row float32 scale, computed by
:func:`reference.quantize_rows` in XLA: it is tiny next to the weights) and
the dot is int8 x int8 -> int32.

All block sizes must be powers of two (Triton tensor sizes); the wrapper
guarantees that and that the operands are padded to block multiples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.int8_matmul.reference import dequant_epilogue
from pallas_kernels.int8_matmul.tuned_block_sizes import BlockSizes

try:  # jax >= 0.4.3x: Triton-specific params live here.
    from jax.experimental.pallas import triton as _pltriton
    _TritonParams = _pltriton.CompilerParams
except (ImportError, AttributeError):  # pragma: no cover - very old jax
    from jax.experimental.pallas import gpu as _pltriton  # type: ignore
    _TritonParams = getattr(_pltriton, "TritonCompilerParams")


# A size-1 block dim dropped inside the kernel (``None`` in older jax).
_SQUEEZED = getattr(pl, "squeezed", None)


def _kernel(*refs, act_quant: bool, n_steps: int, block_i: int,
            partial: bool, f32_dot: str):
    if act_quant:
        x_ref, w_ref, ws_ref, xs_ref, o_ref = refs
    else:
        x_ref, w_ref, ws_ref, o_ref = refs
        xs_ref = None
    bm = x_ref.shape[0]
    bo = w_ref.shape[-1]
    acc_dtype = jnp.int32 if act_quant else jnp.float32

    def body(step, acc):
        start = pl.multiple_of(step * block_i, block_i)
        xb = x_ref[:, pl.ds(start, block_i)]          # [bm, bi]
        wb = w_ref[pl.ds(start, block_i), :]          # [bi, bo] int8
        if act_quant:
            return acc + jnp.dot(xb, wb, preferred_element_type=jnp.int32)
        if xb.dtype != jnp.float32:
            return acc + jnp.dot(xb, wb.astype(xb.dtype),
                                 preferred_element_type=jnp.float32)
        if f32_dot == "ieee":
            return acc + jnp.dot(xb, wb.astype(jnp.float32),
                                 precision=jax.lax.Precision.HIGHEST,
                                 preferred_element_type=jnp.float32)
        # "bf16x3": x = hi + mid + lo exactly up to ~2**-24 relative, each piece
        # bf16; w (|w| <= 127) is exact in bf16, so the three bf16 tensor-core
        # dots with f32 accumulation reproduce an f32 dot to f32 rounding.
        wbf = wb.astype(jnp.bfloat16)
        hi = xb.astype(jnp.bfloat16)
        r1 = xb - hi.astype(jnp.float32)
        mid = r1.astype(jnp.bfloat16)
        lo = (r1 - mid.astype(jnp.float32)).astype(jnp.bfloat16)
        for part in (hi, mid, lo):
            acc = acc + jnp.dot(part, wbf, preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bo), acc_dtype))
    if partial:
        o_ref[...] = acc
        return
    y = acc.astype(jnp.float32)
    if act_quant:
        y = y * xs_ref[...]                            # [bm, 1]
    y = y * ws_ref[...]                              # [1, bo]
    o_ref[...] = y.astype(o_ref.dtype)


F32_DOT_MODES = ("bf16x3", "ieee")


@functools.partial(jax.jit, static_argnames=("block_sizes", "out_dtype",
                                             "interpret", "f32_dot"))
def int8_matmul_gpu(x: jax.Array, w_q: jax.Array, w_scale: jax.Array,
                    x_scale: jax.Array | None, *, block_sizes: BlockSizes,
                    out_dtype, interpret=False,
                    f32_dot: str = "bf16x3") -> jax.Array:
    """Runs the Triton kernel on pre-padded operands.

    Args:
      x: [M, I]; float32/bfloat16 (W8A16) or int8 (W8A8, then ``x_scale`` [M]
        float32 must be given).
      w_q: [I, O] int8.  w_scale: [O] float32.
      block_sizes: M, O, I must be multiples of block_m, block_o and
        split_k * block_i; all block sizes powers of two, >= 16.
      out_dtype: output dtype.  interpret: Pallas interpret mode (CPU tests).
      f32_dot: W8A16 with float32 x only: "bf16x3" (default; x split into
        three bf16 pieces, three tensor-core dots, f32-accurate) or "ieee"
        (``Precision.HIGHEST``: Triton's FMA path, measured ~40x slower on H100
        for 4096x12288 at M=1).  Triton's own default for f32 would be TF32.

    Returns:
      [M, O] in ``out_dtype``.
    """
    if f32_dot not in F32_DOT_MODES:
        raise ValueError(f"gpu kernel: f32_dot must be one of {F32_DOT_MODES}, "
                         f"got {f32_dot!r}")
    act_quant = x_scale is not None
    m, i = x.shape
    o = w_q.shape[1]
    bs = block_sizes
    split = bs.split_k
    if m % bs.block_m or o % bs.block_o or i % (split * bs.block_i):
        raise ValueError(f"gpu kernel: shape M={m} I={i} O={o} not a multiple of "
                         f"blocks {bs}")
    i_per_split = i // split
    n_steps = i_per_split // bs.block_i
    partial = split > 1
    grid = (m // bs.block_m, o // bs.block_o, split)

    in_specs = [
        pl.BlockSpec((bs.block_m, i_per_split), lambda a, b, s: (a, s)),
        pl.BlockSpec((i_per_split, bs.block_o), lambda a, b, s: (s, b)),
        pl.BlockSpec((1, bs.block_o), lambda a, b, s: (0, b)),
    ]
    args = [x, w_q, w_scale.astype(jnp.float32).reshape(1, o)]
    if act_quant:
        in_specs.append(pl.BlockSpec((bs.block_m, 1), lambda a, b, s: (a, 0)))
        args.append(x_scale.astype(jnp.float32).reshape(m, 1))

    if partial:
        acc_dtype = jnp.int32 if act_quant else jnp.float32
        out_shape = jax.ShapeDtypeStruct((split, m, o), acc_dtype)
        out_spec = pl.BlockSpec((_SQUEEZED, bs.block_m, bs.block_o),
                                lambda a, b, s: (s, a, b))
    else:
        out_shape = jax.ShapeDtypeStruct((m, o), out_dtype)
        out_spec = pl.BlockSpec((bs.block_m, bs.block_o), lambda a, b, s: (a, b))

    out = pl.pallas_call(
        functools.partial(_kernel, act_quant=act_quant, n_steps=n_steps,
                          block_i=bs.block_i, partial=partial,
                          f32_dot=f32_dot),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=_TritonParams(num_warps=bs.num_warps,
                                      num_stages=bs.num_stages),
        interpret=interpret,
        name="int8_matmul_w8a8" if act_quant else "int8_matmul_w8a16",
    )(*args)
    if partial:
        out = out.sum(axis=0)
        return dequant_epilogue(out, w_scale, x_scale, out_dtype)
    return out
