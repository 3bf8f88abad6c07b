"""Tests for quasar_jax.model.quant: int8 weight quantisation (AQT), Int8Linear, quantize_model.

Error bounds. Symmetric per-channel int8 with step s = absmax / 127 gives an elementwise rounding
error uniform in [-s/2, s/2], rms s / sqrt(12). For Gaussian columns of length I = 256 the absmax
is ~2.9 sigma, so the relative rms weight error is ~2.9 / (127 sqrt(12)) ~= 0.0066, and since the
errors are independent of x the matmul output has the same relative error: measured 0.0067
(float32) / 0.0069 (bfloat16 activations, which add bf16 rounding), bound 1e-2. w8a8 adds an
independent per-token activation error of similar size, ~sqrt(2) * 0.0066 ~= 0.0093: measured
0.0094 / 0.0097, bound 2e-2.

Whole model (2 layers + quantised lm_head, random init N(0, 0.02), float32): the errors of the
~8 quantised matmuls on each token's path partly add up; measured relative logit error 0.0099
(w8a16) and 0.0135 (w8a8), bounds 3e-2 / 4e-2; top-1 agreement measured 64/64 and 62/64
positions, bound >= 0.9 (random-init logits have small margins, so a flip or two is expected).
"""

from __future__ import annotations

import functools
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import quantize_rows
from quasar_jax.model import quant
from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.modes import Backend, QuantMode
from quasar_jax.model.qwen3 import Linear, Qwen3

CFG = Qwen3Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=128)
# every projection has I >= 128 (scale overhead 4 / I bytes per int8 byte) and no float tensor
# (embedding [160, 128]) shares a shape with a projection kernel
CFG_MEM = Qwen3Config(vocab_size=160, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, intermediate_size=256)

W8A16_BOUND = 1e-2
W8A8_BOUND = 2e-2
INT8_MODES = (QuantMode.W8A16, QuantMode.W8A8)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def gaussian(seed, shape, scale=1.0, dtype=jnp.float32):
    return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def iter_eqns(jaxpr):
    """All equations of a jaxpr, sub-jaxprs (pjit, custom_vjp, ...) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from iter_eqns(sub)


# ---------------------------------------------------------------------------- quantize_kernel


def test_quantize_kernel_format_and_roundtrip():
    w = gaussian(0, (96, 48), 0.05)
    q, s = quant.quantize_kernel(w)
    assert q.dtype == jnp.int8 and q.shape == (96, 48)
    assert s.dtype == jnp.float32 and s.shape == (48,)
    np.testing.assert_allclose(np.asarray(s), np.abs(np.asarray(w)).max(0) / 127, rtol=1e-6)
    assert int(jnp.abs(q.astype(jnp.int32)).max()) == 127  # the absmax maps onto +-127
    w_hat = quant.dequantize(q, s)
    assert w_hat.dtype == jnp.float32 and w_hat.shape == w.shape
    # round to nearest: |w - q s| <= s / 2 (plus float slack)
    assert bool(jnp.all(jnp.abs(w_hat - w) <= s * (0.5 + 1e-4)))
    assert quant.dequantize(q, s, jnp.bfloat16).dtype == jnp.bfloat16
    # bf16 kernels and the torch layout (transpose=True) give the same [I, O] result
    q2, s2 = quant.quantize_kernel(w.T, transpose=True)
    np.testing.assert_array_equal(np.asarray(q2), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(s2), np.asarray(s))
    qb, sb = quant.quantize_kernel(w.astype(jnp.bfloat16))
    assert qb.dtype == jnp.int8 and sb.dtype == jnp.float32


def test_aqt_weight_quantiser_equals_the_plain_formula():
    """AQT's quantiser gives exactly the int8 values and scales of the plain formula
    (scale = max(absmax, 127 * 1e-8) / 127, round half to even, clip to [-127, 127]), which is
    also the activation quantiser (quantize_rows) applied to the transposed kernel."""
    w = gaussian(20, (256, 96), 0.05) * jnp.exp(gaussian(21, (1, 96)))  # channels of mixed range
    w = w.at[:, 3].set(0.0).at[:, 4].set(1e-7)  # a zero and a tiny channel
    q, s = quant.quantize_kernel(w)
    scale = jnp.maximum(jnp.abs(w).max(0), 127 * 1e-8) / 127  # [O]
    ref_q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(scale))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(ref_q))
    rows_q, rows_s = quantize_rows(w.T)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(rows_q).T)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(rows_s))


def test_zero_channel_and_zero_row_give_no_nan():
    w = gaussian(1, (64, 32), 0.05).at[:, 5].set(0.0)
    q, s = quant.quantize_kernel(w)
    assert bool(jnp.all(jnp.isfinite(s))) and float(s[5]) == np.float32(quant.MIN_SCALE)
    assert bool(jnp.all(q[:, 5] == 0))
    x = gaussian(2, (4, 64)).at[2].set(0.0)  # one all-zero activation row
    for mode in INT8_MODES:
        y = quant.int8_matmul_xla(x, q, s, mode=mode)
        assert bool(jnp.all(jnp.isfinite(y))), mode
        assert bool(jnp.all(y[:, 5] == 0)) and bool(jnp.all(y[2] == 0)), mode


# ---------------------------------------------------------------------------- matmul numerics


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_error_bounds(dtype):
    x = gaussian(3, (2, 8, 256), dtype=dtype)  # [B, T, I]
    w = gaussian(4, (256, 192), 0.05)
    y = jnp.einsum("bti,io->bto", x.astype(jnp.float32), w, precision="highest")
    layer = quant.Int8Linear.from_kernel(w)
    for mode, bound in ((QuantMode.W8A16, W8A16_BOUND), (QuantMode.W8A8, W8A8_BOUND)):
        yq = layer(x, mode=mode)
        assert yq.dtype == dtype and yq.shape == (2, 8, 192)
        err = rel_err(yq.astype(jnp.float32), y)
        assert err < bound, (mode, err)
    # w8a8 loses more than w8a16 (activations are quantised too)
    assert rel_err(layer(x, mode=QuantMode.W8A8).astype(jnp.float32), y) > rel_err(
        layer(x, mode=QuantMode.W8A16).astype(jnp.float32), y)


def test_w8a16_equals_dequantized_matmul():
    x = gaussian(5, (3, 128))
    q, s = quant.quantize_kernel(gaussian(6, (128, 64), 0.05))
    ref = jnp.dot(x, quant.dequantize(q, s), precision="highest")
    y = quant.int8_matmul_xla(x, q, s, mode=QuantMode.W8A16)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # bf16 activations: f32 accumulation, one bf16 rounding of the output
    xb = x.astype(jnp.bfloat16)
    refb = jnp.dot(xb.astype(jnp.float32), quant.dequantize(q, s), precision="highest")
    yb = quant.int8_matmul_xla(xb, q, s, mode=QuantMode.W8A16)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(refb), rtol=1e-2, atol=1e-3)


def test_w8a8_equals_explicit_integer_formula():
    x = gaussian(7, (5, 128))
    q, s = quant.quantize_kernel(gaussian(8, (128, 64), 0.05))
    x_scale = jnp.maximum(jnp.abs(x).max(-1) / 127, quant.MIN_SCALE)  # [M]
    x_q = jnp.clip(jnp.round(x / x_scale[:, None]), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(x_q, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    ref = acc.astype(jnp.float32) * x_scale[:, None] * s[None, :]
    y = quant.int8_matmul_xla(x, q, s, mode=QuantMode.W8A8)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_jaxpr_int8_dots_and_no_float_weight_copy():
    """w8a8: int8 x int8 -> int32 dot, nothing float of the weight's shape. w8a16: the only float
    [I, O] value is the int8 -> x.dtype convert feeding the dot (fused into the GEMM by XLA on
    GPU), never a float32 copy of a bf16 model's weight."""
    i, o = 128, 96
    x = jnp.zeros((4, i), jnp.bfloat16)
    q, s = jnp.zeros((i, o), jnp.int8), jnp.ones((o,), jnp.float32)
    for mode, operand_dtypes, acc_dtype in (
            (QuantMode.W8A16, (jnp.bfloat16, jnp.bfloat16), jnp.float32),
            (QuantMode.W8A8, (jnp.int8, jnp.int8), jnp.int32)):
        jaxpr = jax.make_jaxpr(functools.partial(quant.int8_matmul_xla, mode=mode))(x, q, s)
        eqns = list(iter_eqns(jaxpr))
        dots = [e for e in eqns if e.primitive.name == "dot_general"]
        assert len(dots) == 1, mode
        lhs, rhs = (v.aval for v in dots[0].invars)
        assert (lhs.dtype, rhs.dtype) == operand_dtypes and rhs.shape == (i, o), mode
        assert dots[0].params["preferred_element_type"] == acc_dtype, mode
        float_weights = [e for e in eqns for v in e.outvars
                         if tuple(v.aval.shape) == (i, o)
                         and jnp.issubdtype(v.aval.dtype, jnp.floating)]
        if mode is QuantMode.W8A8:
            assert not float_weights
        else:
            assert len(float_weights) == 1, float_weights
            convert = float_weights[0]
            assert convert.primitive.name == "convert_element_type"
            assert convert.invars[0].aval.dtype == jnp.int8
            assert convert.outvars[0].aval.dtype == jnp.bfloat16
            assert convert.outvars[0] is dots[0].invars[1]


def test_pallas_backend_matches_xla():
    x = gaussian(9, (2, 3, 128))
    w = gaussian(10, (128, 64), 0.05)
    xla = quant.Int8Linear.from_kernel(w)
    pallas = quant.Int8Linear.from_kernel(w, backend=Backend.PALLAS)
    assert (xla.backend, pallas.backend) == (Backend.XLA, Backend.PALLAS)
    # identical on CPU (the wrapper runs its XLA reference); the GPU/TPU kernels may use
    # TF32/bf16 passes for float32 activations, hence the looser tolerance
    for mode in INT8_MODES:
        np.testing.assert_allclose(np.asarray(pallas(x, mode=mode)),
                                   np.asarray(xla(x, mode=mode)), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------- Int8Linear


def test_int8linear_holds_only_int8_and_scale():
    layer = quant.Int8Linear.from_kernel(gaussian(11, (64, 32), 0.05))
    leaves = nnx.to_flat_state(nnx.state(layer))
    got = {path: (v.get_value().dtype, v.get_value().shape) for path, v in leaves}
    assert got == {("qvalue",): (jnp.int8, (64, 32)), ("scale",): (jnp.float32, (32,))}
    assert (layer.in_features, layer.out_features) == (64, 32)
    x = gaussian(12, (3, 64))
    # the mode is an argument of every call (a string is parsed), never stored in the layer
    np.testing.assert_array_equal(np.asarray(layer(x, mode="w8a8")),
                                  np.asarray(layer(x, mode=QuantMode.W8A8)))
    assert not np.array_equal(np.asarray(layer(x, mode=QuantMode.W8A8)),
                              np.asarray(layer(x, mode=QuantMode.W8A16)))
    with pytest.raises(TypeError, match="mode"):
        layer(x)


def test_bad_mode_and_backend_errors():
    w = gaussian(13, (16, 8))
    layer = quant.Int8Linear.from_kernel(w)
    with pytest.raises(ValueError, match=r"unknown mode 'w4a4'.*'w8a16', 'w8a8'"):
        layer(jnp.ones((1, 16)), mode="w4a4")
    with pytest.raises(ValueError, match=r"mode 'float' .*the model holds int8 weights"):
        layer(jnp.ones((1, 16)), mode=QuantMode.FLOAT)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*'xla', 'pallas'"):
        quant.Int8Linear.from_kernel(w, backend="cuda")
    model = Qwen3(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'"):
        quant.quantize_model(model, backend="tpu")
    assert isinstance(model.layers[0].self_attn.q_proj, Linear)  # nothing changed


def test_not_a_kernel_errors():
    with pytest.raises(ValueError, match=r"cannot quantise kernel: expected a rank-2.*\(4, 4, 4\)"):
        quant.quantize_kernel(jnp.ones((4, 4, 4)))
    with pytest.raises(ValueError, match=r"cannot quantise bias: expected a rank-2.*\(8,\)"):
        quant.quantize_kernel(jnp.ones((8,)), name="bias")
    with pytest.raises(ValueError, match=r"cannot quantise w: expected a floating-point.*int32"):
        quant.quantize_kernel(jnp.ones((4, 4), jnp.int32), name="w")
    model = Qwen3(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"cannot quantise input_layernorm: expected a "
                                         r"quasar_jax.model.qwen3.Linear, got RMSNorm"):
        quant.quantize_linear(model.layers[0].input_layernorm, name="input_layernorm")


def test_tied_lm_head_request_errors():
    tied = Qwen3(Qwen3Config(**{**CFG.__dict__, "tie_word_embeddings": True}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"lm_head=True.*ties its LM head.*embedding"):
        quant.quantize_model(tied, lm_head=True)
    assert isinstance(tied.layers[0].mlp.down_proj, Linear)  # checked before any change
    quant.quantize_model(tied)  # without the head it is fine
    assert isinstance(tied.layers[0].mlp.down_proj, quant.Int8Linear) and tied.lm_head is None


# ---------------------------------------------------------------------------- whole model


def test_quantize_model_memory():
    model = Qwen3(CFG_MEM, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    float_bytes = quant.param_bytes(model)
    proj_shapes, kernel_refs = set(), []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            proj_shapes.add(tuple(module.kernel.shape))
            kernel_refs.append(weakref.ref(module.kernel.get_value()))
    assert len(kernel_refs) == 7 * CFG_MEM.num_hidden_layers + 1

    assert quant.quantize_model(model, lm_head=True) is model
    pb = quant.quantized_projection_bytes(model)
    assert pb.count == len(kernel_refs)
    assert pb.quantized <= 0.52 * pb.bf16, pb  # int8 + f32 scales vs bf16
    # every leaf of the param pytree: no float array shaped like a projection kernel
    leaves = nnx.to_flat_state(nnx.state(model, nnx.Param))
    total = 0
    for path, var in leaves:
        value = var.get_value()
        total += value.size * value.dtype.itemsize
        if jnp.issubdtype(value.dtype, jnp.floating):
            assert tuple(value.shape) not in proj_shapes, path
            assert path[-1] != "kernel", path
    assert total == quant.param_bytes(model)
    saved = float_bytes - total
    assert saved == pb.bf16 - pb.quantized
    # the float kernels were released (nothing in quant keeps them alive)
    gc.collect()
    assert all(ref() is None for ref in kernel_refs)


def _jit_forward(model, batch, max_len):
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="mode")
    def forward(state, tokens, positions, mode=QuantMode.FLOAT):
        m = nnx.merge(graphdef, state)
        logits, _ = m(tokens, positions, m.init_cache(batch, max_len), mode=mode)
        return logits

    return functools.partial(forward, state)


def test_quantized_model_forward_close_to_float():
    model = Qwen3(CFG, rngs=nnx.Rngs(0))
    b, t = 4, 16
    tokens = jax.random.randint(jax.random.key(14), (b, t), 0, CFG.vocab_size, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ref = _jit_forward(model, b, t)(tokens, positions)

    quant.quantize_model(model, lm_head=True)
    assert isinstance(model.lm_head, quant.Int8Linear)
    fwd = _jit_forward(model, b, t)
    results = {}
    for mode, bound in ((QuantMode.W8A16, 3e-2), (QuantMode.W8A8, 4e-2)):
        logits = fwd(tokens, positions, mode=mode)
        assert logits.dtype == jnp.float32 and logits.shape == ref.shape
        err = rel_err(logits, ref)
        agree = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(ref, -1)))
        assert err < bound and agree >= 0.9, (mode, err, agree)
        results[mode] = logits
    assert not np.array_equal(np.asarray(results[QuantMode.W8A16]),
                              np.asarray(results[QuantMode.W8A8]))
    # the same under nnx.jit with the mode as a static argument; the default (FLOAT) is an error
    fwd_nnx = nnx.jit(lambda m, tk, ps, mode: m(tk, ps, m.init_cache(b, t), mode=mode),
                      static_argnames="mode")
    logits, _ = fwd_nnx(model, tokens, positions, mode=QuantMode.W8A16)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(results[QuantMode.W8A16]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="holds int8 weights"):
        fwd(tokens, positions)


def test_abstract_quantized_model_layout():
    abstract = quant.abstract_quantized_model(CFG_MEM, jnp.bfloat16, lm_head=True)
    flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    q = flat[("layers", 1, "self_attn", "k_proj", "qvalue")].get_value()
    s = flat[("layers", 1, "self_attn", "k_proj", "scale")].get_value()
    assert isinstance(q, jax.ShapeDtypeStruct)
    assert (q.shape, q.dtype, s.shape, s.dtype) == ((128, 64), jnp.int8, (64,), jnp.float32)
    assert ("lm_head", "qvalue") in flat and not any(p[-1] == "kernel" for p in flat)
    concrete = quant.quantize_model(Qwen3(CFG_MEM, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                                    lm_head=True)
    assert quant.param_bytes(abstract) == quant.param_bytes(concrete)
