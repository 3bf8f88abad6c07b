"""Tests for pallas_kernels.int8_matmul (matmul letters M, I, O).

On CPU the Pallas kernels run in interpret mode (the GPU/Triton kernel with
plain ``interpret=True``, the TPU/Mosaic kernel with
``pltpu.InterpretParams()`` = TPU semantics) on small shapes.  On a GPU or
TPU host the ``*_native`` tests additionally compile the kernels for real;
tests/conftest.py defaults JAX_PLATFORMS to cpu, so run them with e.g.
``JAX_PLATFORMS=cuda pytest -q tests/test_pallas_kernels.py -k native``.

Tolerances (all relative to max|reference|, per output tensor):
* W8A8 kernel vs reference: both quantise x with the same XLA function, the
  int32 accumulation is exact and the scales are applied in the same order,
  so f32 outputs agree to 1e-6 and bf16 outputs to one bf16 ulp (2**-7).
* W8A16 kernel vs reference: float32 accumulation in a different order:
  1e-5 for f32 x; bf16 x: one bf16 ulp of the output (2**-7).
* W8A8 vs an unquantised float matmul with the dequantised weight: the
  error is only the activation quantisation (per-row step max|x|/127):
  relative Frobenius error < 2e-2 for Gaussian x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes
from pallas_kernels import int8_matmul
from pallas_kernels import int8_matmul_reference
from pallas_kernels import quantize_rows
from pallas_kernels.int8_matmul import tuned_block_sizes as tbs

I_DIM, O_DIM = 256, 256
BF16_ULP = 2.0 ** -7

# Small blocks so that the interpreted grids have several programs and both
# the multi-step I loop and split-K (GPU) / the VMEM accumulator over I
# steps (TPU) are exercised.
GPU_BLOCKS = BlockSizes(block_m=16, block_o=128, block_i=64, split_k=2)
GPU_BLOCKS_NOSPLIT = BlockSizes(block_m=16, block_o=128, block_i=128,
                                split_k=1)
TPU_BLOCKS = BlockSizes(block_m=32, block_o=128, block_i=128)


def _weights(i=I_DIM, o=O_DIM, seed=0):
    kw, ks = jax.random.split(jax.random.PRNGKey(seed))
    w_q = jax.random.randint(kw, (i, o), -127, 128, jnp.int32).astype(jnp.int8)
    w_scale = jax.random.uniform(ks, (o,), jnp.float32, 1e-3, 1e-2)
    return w_q, w_scale


def _x(m, dtype, i=I_DIM, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (m, i),
                             jnp.float32).astype(dtype)


def _rel_max_err(y, ref):
    y = np.asarray(y.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _tol(dtype, act_quant):
    if dtype == jnp.bfloat16:
        return BF16_ULP
    return 1e-6 if act_quant else 1e-5


@pytest.fixture(scope="module")
def weights():
    return _weights()


# ---------------------------------------------------------------------------
# Kernels (interpret mode) vs reference.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("act_quant", [False, True], ids=["w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 6, 16])
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernel_matches_reference(weights, backend, m, dtype, act_quant):
    w_q, w_scale = weights
    x = _x(m, dtype)
    if backend == "gpu":
        blocks = GPU_BLOCKS if m != 16 else GPU_BLOCKS_NOSPLIT
    else:
        blocks = TPU_BLOCKS
    y = int8_matmul(x, w_q, w_scale, act_quant=act_quant, backend=backend,
                    interpret=True, block_sizes=blocks)
    ref = int8_matmul_reference(x, w_q, w_scale, act_quant=act_quant)
    assert y.shape == (m, O_DIM) and y.dtype == x.dtype
    assert _rel_max_err(y, ref) <= _tol(dtype, act_quant)


def test_gpu_kernel_f32_dot_modes(weights):
    """f32 x W8A16 on GPU: the default bf16x3 split and the IEEE dot both
    match the HIGHEST-precision reference to f32 accuracy."""
    from pallas_kernels.int8_matmul.gpu import int8_matmul_gpu
    w_q, w_scale = weights
    x = _x(16, jnp.float32) * 1e3  # large magnitude: the split must be exact
    ref = int8_matmul_reference(x, w_q, w_scale, act_quant=False)
    for mode in ("bf16x3", "ieee"):
        y = int8_matmul_gpu(x, w_q, w_scale, None, block_sizes=GPU_BLOCKS,
                            out_dtype=jnp.float32, interpret=True, f32_dot=mode)
        assert _rel_max_err(y, ref) <= 1e-5, mode
    with pytest.raises(ValueError, match="f32_dot"):
        int8_matmul_gpu(x, w_q, w_scale, None, block_sizes=GPU_BLOCKS,
                        out_dtype=jnp.float32, interpret=True, f32_dot="tf32")


def test_tpu_kernel_int8_via_bf16(weights):
    """The TPU v4 workaround path (int8 tiles converted to bf16 in-kernel)."""
    w_q, w_scale = weights
    x = _x(6, jnp.float32)
    y = int8_matmul(x, w_q, w_scale, act_quant=True, backend="tpu",
                    interpret=True, block_sizes=TPU_BLOCKS, int8_via_bf16=True)
    ref = int8_matmul_reference(x, w_q, w_scale, act_quant=True)
    assert _rel_max_err(y, ref) <= 1e-6


def test_default_block_sizes_and_padding():
    """Non-multiple I/O and M with the heuristic blocks: wrapper pads and
    slices back; leading dims of x are flattened and restored."""
    w_q, w_scale = _weights(i=200, o=136, seed=3)
    x = _x(10, jnp.float32, i=200).reshape(2, 5, 200)
    for act_quant in (False, True):
        y = int8_matmul(x, w_q, w_scale, act_quant=act_quant, backend="gpu",
                        interpret=True)
        ref = int8_matmul_reference(x.reshape(10, 200), w_q, w_scale,
                                    act_quant=act_quant).reshape(2, 5, 136)
        assert y.shape == (2, 5, 136)
        assert _rel_max_err(y, ref) <= _tol(jnp.float32, act_quant)


def test_auto_backend_on_cpu_is_reference(weights):
    if jax.default_backend() != "cpu":
        pytest.skip("auto picks a kernel on accelerators")
    w_q, w_scale = weights
    x = _x(3, jnp.bfloat16)
    for act_quant in (False, True):
        y = int8_matmul(x, w_q, w_scale, act_quant=act_quant)
        ref = int8_matmul_reference(x, w_q, w_scale, act_quant=act_quant)
        np.testing.assert_array_equal(np.asarray(y, np.float32),
                                      np.asarray(ref, np.float32))


def test_jit_compatible(weights):
    w_q, w_scale = weights
    x = _x(6, jnp.float32)
    f = jax.jit(lambda x, w, s: int8_matmul(x, w, s, act_quant=True,
                                            backend="gpu", interpret=True,
                                            block_sizes=GPU_BLOCKS))
    ref = int8_matmul_reference(x, w_q, w_scale, act_quant=True)
    assert _rel_max_err(f(x, w_q, w_scale), ref) <= 1e-6


# ---------------------------------------------------------------------------
# Quantisation semantics.
# ---------------------------------------------------------------------------

def test_all_zero_row_no_nan(weights):
    w_q, w_scale = weights
    x = _x(6, jnp.float32).at[2].set(0.0)
    x_q, x_scale = quantize_rows(x)
    assert float(x_scale[2]) == pytest.approx(1e-8)
    assert not np.any(np.asarray(x_q[2]))
    outs = [int8_matmul_reference(x, w_q, w_scale, act_quant=True)]
    outs.append(int8_matmul(x, w_q, w_scale, act_quant=True, backend="gpu",
                            interpret=True, block_sizes=GPU_BLOCKS))
    outs.append(int8_matmul(x, w_q, w_scale, act_quant=True, backend="tpu",
                            interpret=True, block_sizes=TPU_BLOCKS))
    for y in outs:
        y = np.asarray(y)
        assert np.all(np.isfinite(y))
        assert not np.any(y[2])


def test_quantize_rows_properties():
    x = _x(5, jnp.float32) * 3.0
    x_q, x_scale = quantize_rows(x)
    assert x_q.dtype == jnp.int8 and x_scale.dtype == jnp.float32
    assert x_scale.shape == (5,)
    assert int(jnp.max(jnp.abs(x_q.astype(jnp.int32)))) == 127
    deq = x_q.astype(jnp.float32) * x_scale[:, None]
    assert bool(jnp.all(jnp.abs(deq - x) <= x_scale[:, None] * 0.5 + 1e-6))


def test_w8a8_close_to_float_matmul(weights):
    w_q, w_scale = weights
    x = _x(16, jnp.float32)
    w = w_q.astype(jnp.float32) * w_scale[None, :]
    exact = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
    y8 = int8_matmul(x, w_q, w_scale, act_quant=True, backend="gpu",
                     interpret=True, block_sizes=GPU_BLOCKS)
    y16 = int8_matmul_reference(x, w_q, w_scale, act_quant=False)
    rel8 = float(jnp.linalg.norm(y8 - exact) / jnp.linalg.norm(exact))
    rel16 = float(jnp.linalg.norm(y16 - exact) / jnp.linalg.norm(exact))
    assert rel8 < 2e-2
    assert rel16 < 1e-5


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    ("x_rank", "x must have rank >= 1"),
    ("w_rank", "w_q must have rank 2"),
    ("s_rank", "w_scale must have rank 1"),
    ("i_mismatch", "I mismatch"),
    ("w_dtype", "w_q must be int8"),
    ("s_shape", "w_scale shape"),
    ("x_dtype", "x dtype must be float32 or bfloat16"),
    ("backend", "unknown backend"),
    ("blocks", "block_sizes must be a BlockSizes"),
])
def test_validation_errors(weights, bad, match):
    w_q, w_scale = weights
    x = _x(2, jnp.float32)
    kw = dict(act_quant=False)
    if bad == "x_rank":
        x = jnp.float32(1.0)
    elif bad == "w_rank":
        w_q = w_q[None]
    elif bad == "s_rank":
        w_scale = w_scale[None]
    elif bad == "i_mismatch":
        x = _x(2, jnp.float32, i=128)
    elif bad == "w_dtype":
        w_q = w_q.astype(jnp.int16)
    elif bad == "s_shape":
        w_scale = w_scale[:10]
    elif bad == "x_dtype":
        x = x.astype(jnp.float16)
    elif bad == "backend":
        kw["backend"] = "cuda"
    elif bad == "blocks":
        kw["block_sizes"] = (16, 128, 128)
    with pytest.raises(ValueError, match=match) as info:
        int8_matmul(x, w_q, w_scale, **kw)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# Tuned block-size table.
# ---------------------------------------------------------------------------

def test_block_size_lookup():
    assert tbs.device_family("NVIDIA H100 80GB HBM3") == "H100"
    assert tbs.device_family("TPU v5 lite") == "TPU v5e"
    assert tbs.device_family("TPU v4") == "TPU v4"
    assert [tbs.m_bucket(m) for m in (1, 16, 17, 48, 5000)] == [16, 16, 32, 64,
                                                                1024]
    for key, bs in tbs.TUNED_BLOCK_SIZES.items():
        device, bucket, i, o, act_quant = key
        assert isinstance(bs, BlockSizes)
        if not device.startswith("TPU"):
            for v in (bs.block_m, bs.block_o, bs.block_i, bs.split_k):
                assert v & (v - 1) == 0, key
            assert i % (bs.block_i * bs.split_k) == 0 and o % bs.block_o == 0, key
    for backend in ("gpu", "tpu"):
        for m in (1, 48, 4096):
            bs = tbs.get_block_sizes(m, 4096, 12288, True, backend=backend,
                                     device_kind="NVIDIA H100 80GB HBM3")
            assert isinstance(bs, BlockSizes)
    # Untuned small bucket borrows a tuned neighbour, with block_m = bucket.
    bs = tbs.get_block_sizes(20, 4096, 12288, True, backend="gpu",
                             device_kind="NVIDIA H100 80GB HBM3")
    assert bs.block_m == 32


# ---------------------------------------------------------------------------
# Real hardware (skipped on CPU).
# ---------------------------------------------------------------------------

NATIVE_CASES = [(m, i, o) for m in (1, 48, 200)
                for (i, o) in ((1024, 3072), (4096, 1024))]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("act_quant", [False, True], ids=["w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
def test_gpu_native(act_quant, dtype):
    for m, i, o in NATIVE_CASES:
        w_q, w_scale = _weights(i, o)
        x = _x(m, dtype, i=i)
        y = int8_matmul(x, w_q, w_scale, act_quant=act_quant, backend="gpu",
                        interpret=False)
        ref = int8_matmul_reference(x, w_q, w_scale, act_quant=act_quant)
        err = _rel_max_err(y, ref)
        assert err <= _tol(dtype, act_quant) * 4, (m, i, o, err)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("act_quant", [False, True], ids=["w8a16", "w8a8"])
def test_tpu_native(act_quant):
    for m, i, o in NATIVE_CASES:
        w_q, w_scale = _weights(i, o)
        x = _x(m, jnp.bfloat16, i=i)
        y = int8_matmul(x, w_q, w_scale, act_quant=act_quant, backend="tpu",
                        interpret=False)
        ref = int8_matmul_reference(x, w_q, w_scale, act_quant=act_quant)
        assert _rel_max_err(y, ref) <= BF16_ULP * 4, (m, i, o)
