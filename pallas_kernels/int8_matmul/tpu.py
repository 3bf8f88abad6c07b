"""Pallas TPU (Mosaic) int8-weight matmul kernel.

Matmul letters: M rows, I input features, O output features.

Grid: (M / block_m, O / block_o, I / block_i), the I axis last and
"arbitrary" (sequential), M and O "parallel".  A [block_m, block_o]
accumulator lives in VMEM scratch: zeroed at the first I step, incremented
every step, and at the last I step the scales are applied and the tile is
written out in x.dtype.

W8A16: the int8 weight tile is converted to x.dtype in VMEM and hits the MXU
with a float32 accumulator.
W8A8: x arrives quantised (int8 + per-row float32 scale from
:func:`reference.quantize_rows`).  By default the dot is int8 x int8 -> int32
on the MXU (v5e / v6e and newer have int8 MXU paths).  Int8 x int8 did not
compile under Mosaic on TPU v4, so ``int8_via_bf16=True`` converts both int8
tiles to bfloat16 in-kernel (exact: |v| <= 127) and accumulates in float32;
the integer partial sums stay exact while below 2**24 (|x_q|,|w_q| <= 127
gives that for block_i <= 1040 per step, and the f32 carry across I steps
rounds like any f32 sum beyond that: relative error ~1e-7).  ``None`` picks
True on TPU v2-v4 and False otherwise.

Tiling constraints (Mosaic): block_o and block_i multiples of 128; block_m a
multiple of 8 (f32 x), 16 (bf16 x) or 32 (int8 x).  The wrapper pads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.int8_matmul.tuned_block_sizes import BlockSizes
from pallas_kernels.int8_matmul.tuned_block_sizes import device_family


def default_int8_via_bf16() -> bool:
    fam = device_family()
    return fam in ("TPU v2", "TPU v3", "TPU v4")


def tpu_interpret_params():
    """Interpret-mode argument with TPU semantics when this jax has it."""
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def _kernel(*refs, act_quant: bool, int8_via_bf16: bool, n_steps: int):
    if act_quant:
        x_ref, w_ref, ws_ref, xs_ref, o_ref, acc_ref = refs
    else:
        x_ref, w_ref, ws_ref, o_ref, acc_ref = refs
        xs_ref = None
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    xb = x_ref[...]
    wb = w_ref[...]
    if act_quant and not int8_via_bf16:
        acc_ref[...] += jnp.dot(xb, wb, preferred_element_type=jnp.int32)
    elif act_quant:
        acc_ref[...] += jnp.dot(xb.astype(jnp.bfloat16), wb.astype(jnp.bfloat16),
                                preferred_element_type=jnp.float32)
    else:
        acc_ref[...] += jnp.dot(xb, wb.astype(xb.dtype),
                                preferred_element_type=jnp.float32)

    @pl.when(step == n_steps - 1)
    def _finish():
        y = acc_ref[...].astype(jnp.float32)
        if act_quant:
            y = y * xs_ref[...]                          # [bm, 1]
        y = y * ws_ref[...]                            # [1, bo]
        o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "out_dtype",
                                             "interpret", "int8_via_bf16"))
def int8_matmul_tpu(x: jax.Array, w_q: jax.Array, w_scale: jax.Array,
                    x_scale: jax.Array | None, *, block_sizes: BlockSizes,
                    out_dtype, interpret=False,
                    int8_via_bf16: bool = False) -> jax.Array:
    """Runs the Mosaic kernel on pre-padded operands.

    Args:
      x: [M, I]; float32/bfloat16 (W8A16) or int8 (W8A8, then ``x_scale`` [M]
        float32 must be given).
      w_q: [I, O] int8.  w_scale: [O] float32.
      block_sizes: M, O, I multiples of block_m, block_o, block_i (split_k,
        num_warps and num_stages are ignored).
      interpret: False, True or a ``pltpu.InterpretParams``.

    Returns:
      [M, O] in ``out_dtype``.
    """
    act_quant = x_scale is not None
    m, i = x.shape
    o = w_q.shape[1]
    bs = block_sizes
    if m % bs.block_m or o % bs.block_o or i % bs.block_i:
        raise ValueError(f"tpu kernel: shape M={m} I={i} O={o} not a multiple of "
                         f"blocks {bs}")
    n_steps = i // bs.block_i
    grid = (m // bs.block_m, o // bs.block_o, n_steps)
    in_specs = [
        pl.BlockSpec((bs.block_m, bs.block_i), lambda a, b, k: (a, k)),
        pl.BlockSpec((bs.block_i, bs.block_o), lambda a, b, k: (k, b)),
        pl.BlockSpec((1, bs.block_o), lambda a, b, k: (0, b)),
    ]
    args = [x, w_q, w_scale.astype(jnp.float32).reshape(1, o)]
    if act_quant:
        in_specs.append(pl.BlockSpec((bs.block_m, 1), lambda a, b, k: (a, 0)))
        args.append(x_scale.astype(jnp.float32).reshape(m, 1))
    acc_dtype = jnp.int32 if (act_quant and not int8_via_bf16) else jnp.float32

    return pl.pallas_call(
        functools.partial(_kernel, act_quant=act_quant,
                          int8_via_bf16=int8_via_bf16, n_steps=n_steps),
        out_shape=jax.ShapeDtypeStruct((m, o), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bs.block_m, bs.block_o),
                                   lambda a, b, k: (a, b)),
            scratch_shapes=[pltpu.VMEM((bs.block_m, bs.block_o), acc_dtype)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="int8_matmul_w8a8" if act_quant else "int8_matmul_w8a16",
    )(*args)
