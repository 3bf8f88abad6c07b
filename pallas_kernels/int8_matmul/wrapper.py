"""User-facing int8 matmul: validation, backend choice, padding.

Matmul letters: M rows (all leading dims of x flattened), I input features,
O output features.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.int8_matmul import tuned_block_sizes as tbs
from pallas_kernels.int8_matmul.reference import int8_matmul_reference
from pallas_kernels.int8_matmul.reference import quantize_rows
from pallas_kernels.int8_matmul.tuned_block_sizes import BlockSizes

_BACKENDS = ("auto", "tpu", "gpu", "reference")
_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def round_up(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is ``>= n`` (padding, shape buckets)."""
    return -(-n // k) * k


def _fit(dim: int, preferred: int, align: int, pow2: bool) -> int:
    """Largest block <= preferred (multiple of align; power of two if pow2)
    that needs the least padding of ``dim``: a divisor of dim if one exists."""
    preferred = max(align, preferred)
    if pow2:
        cands = []
        c = 1 << (preferred.bit_length() - 1)
        while c >= align:
            cands.append(c)
            c //= 2
    else:
        cands = list(range(preferred - preferred % align, align - 1, -align))
    if not cands:
        cands = [align]
    best = min(round_up(dim, c) for c in cands)
    for c in cands:  # descending: the largest block reaching minimal padding
        if round_up(dim, c) == best:
            return c
    return cands[-1]  # pragma: no cover


# Shared-memory budget for the software-pipelined GPU loads (H100/A100 have
# ~228/164 KiB per SM; stay well below so Triton does not run out).
_GPU_SMEM_BUDGET = 160 * 1024


def _adapt_gpu(bs: BlockSizes, m: int, i: int, o: int,
               x_bytes: int) -> BlockSizes:
    bm = max(16, 1 << (max(bs.block_m, 16) - 1).bit_length())
    bm = min(bm, max(16, 1 << (m - 1).bit_length()))  # no block beyond M
    bo = _fit(o, bs.block_o, 16, pow2=True)
    bi = _fit(i, bs.block_i, 16, pow2=True)
    stages = max(1, bs.num_stages)

    def smem(bi_, st_):
        return st_ * (bm * bi_ * x_bytes + bi_ * bo)

    while smem(bi, stages) > _GPU_SMEM_BUDGET and stages > 2:
        stages -= 1
    while smem(bi, stages) > _GPU_SMEM_BUDGET and bi > 16:
        bi //= 2
    ip = round_up(i, bi)
    split = max(1, bs.split_k)
    while split > 1 and (ip % (split * bi) != 0):
        split //= 2
    return dataclasses.replace(bs, block_m=bm, block_o=bo, block_i=bi,
                               split_k=split, num_stages=stages)


def _adapt_tpu(bs: BlockSizes, m: int, i: int, o: int, x_dtype,
               act_quant: bool) -> BlockSizes:
    align_m = 32 if act_quant else (8 if x_dtype == jnp.float32 else 16)
    bm = min(round_up(max(bs.block_m, 1), align_m), round_up(m, align_m))
    bo = _fit(o, bs.block_o, 128, pow2=False)
    bi = _fit(i, bs.block_i, 128, pow2=False)
    return dataclasses.replace(bs, block_m=bm, block_o=bo, block_i=bi,
                               split_k=1)


def effective_block_sizes(m: int, i: int, o: int, x_dtype, act_quant: bool, *,
                          backend: str,
                          block_sizes: BlockSizes | None = None,
                          device_kind: str | None = None) -> BlockSizes:
    """The block sizes the wrapper will actually launch with: the given ones
    or the tuned/heuristic ones, adapted to the shape and the backend's
    constraints (GPU: powers of two, >= 16, shared-memory budget; TPU:
    multiples of 128 for O/I and of the sublane packing for M)."""
    x_dtype = jnp.dtype(x_dtype)
    if block_sizes is None:
        block_sizes = tbs.get_block_sizes(
            m, i, o, act_quant, backend=backend, device_kind=device_kind,
            x_itemsize=x_dtype.itemsize)
    if backend == "gpu":
        return _adapt_gpu(block_sizes, m, i, o, 1 if act_quant else
                          x_dtype.itemsize)
    if backend == "tpu":
        return _adapt_tpu(block_sizes, m, i, o, x_dtype, act_quant)
    raise ValueError(f"effective_block_sizes: backend must be 'gpu' or 'tpu', "
                     f"got {backend!r}")


def _pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    if a.shape == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _resolve_backend(backend: str, interpret) -> tuple[str, object]:
    """Returns (kernel backend, interpret argument for pallas_call)."""
    platform = jax.default_backend()
    if backend == "auto":
        if platform == "tpu":
            backend = "tpu"
        elif platform in ("gpu", "cuda", "rocm"):
            backend = "gpu"
        elif interpret:
            backend = "gpu"  # the Triton-style kernel interprets fastest on CPU
        else:
            backend = "reference"
    if backend == "reference":
        return backend, False
    native = {"tpu": ("tpu",), "gpu": ("gpu", "cuda", "rocm")}[backend]
    if interpret is None:
        interpret = platform not in native
    if interpret and backend == "tpu":
        from pallas_kernels.int8_matmul.tpu import tpu_interpret_params
        interpret = tpu_interpret_params()
    return backend, interpret


def int8_matmul(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *,
                act_quant: bool, backend: str = "auto",
                interpret: bool | None = None,
                block_sizes: BlockSizes | None = None,
                int8_via_bf16: bool | None = None,
                gpu_f32_dot: str = "bf16x3") -> jax.Array:
    """y = x @ dequant(w_q, w_scale), optionally with per-row int8 activations.

    Args:
      x: [..., I] float32 or bfloat16 (leading dims are flattened to M).
      w_q: [I, O] int8, symmetric per-output-channel quantised weight.
      w_scale: [O] per-output-channel scale (cast to float32).
      act_quant: False = W8A16 (x stays float); True = W8A8 (dynamic per-row
        symmetric int8 quantisation of x, int32 accumulation).
      backend: "auto" (by ``jax.default_backend()``: TPU -> "tpu", GPU ->
        "gpu", CPU -> "reference" unless ``interpret=True``, then the "gpu"
        kernel interpreted), "tpu" (Pallas Mosaic), "gpu" (Pallas Triton) or
        "reference" (pure XLA).
      interpret: run the Pallas kernel in interpret mode.  None: only when the
        chosen kernel's platform is not the current one.  For "tpu" this uses
        ``pltpu.InterpretParams()`` (TPU semantics) when available.
      block_sizes: override the tuned/heuristic :class:`BlockSizes`; they are
        still adapted to the shape (shrunk to divisors of I/O where possible,
        rounded to the backend's alignment).
      int8_via_bf16: TPU W8A8 only: convert int8 tiles to bf16 in-kernel
        (needed on TPU v4).  None = auto by device.
      gpu_f32_dot: GPU W8A16 with float32 x only: "bf16x3" (x split into
        three bf16 pieces, tensor cores, f32-accurate) or "ieee" (FMA path,
        exact, ~40x slower on H100).  See ``gpu.py``.

    Returns:
      [..., O] in x.dtype.

    Note: operands are padded to block multiples when needed; for weights that
    means a copy per call, so keep I and O multiples of 128 (true for Qwen3).
    """
    # ---- validation (one-line ValueErrors naming the problem) ----
    if backend not in _BACKENDS:
        raise ValueError(f"int8_matmul: unknown backend {backend!r}, expected one "
                         f"of {_BACKENDS}")
    if getattr(x, "ndim", 0) < 1:
        raise ValueError(f"int8_matmul: x must have rank >= 1 ([..., I]), got "
                         f"rank {getattr(x, 'ndim', 0)}")
    if getattr(w_q, "ndim", None) != 2:
        raise ValueError(f"int8_matmul: w_q must have rank 2 ([I, O]), got rank "
                         f"{getattr(w_q, 'ndim', None)}")
    if getattr(w_scale, "ndim", None) != 1:
        raise ValueError(f"int8_matmul: w_scale must have rank 1 ([O]), got shape "
                         f"{getattr(w_scale, 'shape', None)}")
    if jnp.dtype(x.dtype) not in _X_DTYPES:
        raise ValueError(f"int8_matmul: x dtype must be float32 or bfloat16, got "
                         f"{x.dtype}")
    if jnp.dtype(w_q.dtype) != jnp.dtype(jnp.int8):
        raise ValueError(f"int8_matmul: w_q must be int8, got {w_q.dtype}")
    if not jnp.issubdtype(w_scale.dtype, jnp.floating):
        raise ValueError(f"int8_matmul: w_scale must be floating, got "
                         f"{w_scale.dtype}")
    i, o = w_q.shape
    if x.shape[-1] != i:
        raise ValueError(f"int8_matmul: I mismatch: x.shape[-1]={x.shape[-1]} "
                         f"!= w_q.shape[0]={i}")
    if w_scale.shape != (o,):
        raise ValueError(f"int8_matmul: w_scale shape {tuple(w_scale.shape)} must "
                         f"be (O,)=({o},)")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"int8_matmul: block_sizes must be a BlockSizes, got "
                         f"{type(block_sizes).__name__}")

    act_quant = bool(act_quant)
    kernel_backend, interp = _resolve_backend(backend, interpret)
    lead = x.shape[:-1]
    m = math.prod(lead)
    out_dtype = jnp.dtype(x.dtype)
    w_scale = w_scale.astype(jnp.float32)
    x2 = x.reshape(m, i)
    if m == 0 or o == 0:
        return jnp.zeros((*lead, o), out_dtype)
    if kernel_backend == "reference":
        y = int8_matmul_reference(x2, w_q, w_scale, act_quant=act_quant)
        return y.reshape(*lead, o)

    device_kind = "cpu" if interp is not False else None  # interpreted: untuned
    bs = effective_block_sizes(m, i, o, out_dtype, act_quant,
                               backend=kernel_backend, block_sizes=block_sizes,
                               device_kind=device_kind)
    mp = round_up(m, bs.block_m)
    ip = round_up(i, bs.split_k * bs.block_i)
    op = round_up(o, bs.block_o)

    x_scale = None
    if act_quant:
        x_in, x_scale = quantize_rows(x2)
    else:
        x_in = x2
    x_in = _pad2(x_in, mp, ip)
    if x_scale is not None and mp != m:
        x_scale = jnp.pad(x_scale, (0, mp - m), constant_values=1.0)
    w_in = _pad2(w_q, ip, op)
    s_in = w_scale if op == o else jnp.pad(w_scale, (0, op - o))

    if kernel_backend == "gpu":
        from pallas_kernels.int8_matmul.gpu import int8_matmul_gpu
        y = int8_matmul_gpu(x_in, w_in, s_in, x_scale, block_sizes=bs,
                            out_dtype=out_dtype, interpret=interp,
                            f32_dot=gpu_f32_dot)
    else:
        from pallas_kernels.int8_matmul.tpu import default_int8_via_bf16
        from pallas_kernels.int8_matmul.tpu import int8_matmul_tpu
        if int8_via_bf16 is None:
            int8_via_bf16 = default_int8_via_bf16()
        y = int8_matmul_tpu(x_in, w_in, s_in, x_scale, block_sizes=bs,
                            out_dtype=out_dtype, interpret=interp,
                            int8_via_bf16=bool(int8_via_bf16))
    if y.shape != (m, o):
        y = y[:m, :o]
    return y.reshape(*lead, o)
