"""Paged KV cache (quasar_jax.model.paged_kv_cache): the forward over pages equals the dense strip
(scattered page tables, ragged rows, causal and tree chunks), attention reads only the blocks in
use, the TPU kernel's argument mapping (JAX's own reference of the kernel), int8 KV (per token and
KV head), and the engine's every mode lossless over pages with float and int8 KV."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quasar_jax.model import kv_quant
from quasar_jax.model.kv_cache import KVCache
from quasar_jax.model.paged_attention import (RAGGED_KERNEL, REFERENCE, Visibility, attention_path,
                                              ragged_kernel_attention, reference_attention)
from quasar_jax.model.paged_kv_cache import CacheSpec, PagedKVCache, cache_bytes_per_token
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.weights.loading import load_model
from test_engine import PROMPTS


@pytest.fixture(scope="module")
def model(hf_tiny):
    return load_model(hf_tiny(False, 2)[0], dtype=jnp.float32)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)  # paged (the default on one device)


@pytest.fixture(scope="module")
def int8_engine(hf_tiny):
    return Engine(load_model(hf_tiny(False, 2)[0], int8=True))


def _scattered(cfg, b, m, page, extra=3, **kw):
    table = np.random.RandomState(0).permutation(b * m + extra)[:b * m].reshape(b, m)
    return PagedKVCache.init(cfg, table, b * m + extra, page, **kw)


def test_forward_over_pages_equals_dense(model):
    cfg, b, page, m = model.config, 3, 8, 12
    tokens = jax.random.randint(jax.random.key(1), (b, 40), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(40), (b, 40))
    dense, paged = KVCache.init(cfg, b, page * m), _scattered(cfg, b, m, page)
    ld, dense = model(tokens, pos, dense)
    lp, paged = model(tokens, pos, paged)
    np.testing.assert_allclose(lp, ld, atol=1e-5)
    lens = jnp.array([30, 39, 5])  # ragged rows, a chunk of 4 at each row's own offset
    chunk, at = tokens[:, :4], lens[:, None] + jnp.arange(4)
    tree = jnp.tril(jnp.ones((b, 4, 4), bool)).at[:, 2, 1].set(False).at[:, 3, 2].set(False)
    for mask in (None, tree):
        ld, d2 = model(chunk, at, dense.replace(lengths=lens), chunk_mask=mask)
        lp, p2 = model(chunk, at, paged.replace(lengths=lens), chunk_mask=mask)
        np.testing.assert_allclose(lp, ld, atol=1e-5)
    src, dst = lens[:, None] + jnp.array([[1, 3]]), lens[:, None] + jnp.array([[0, 1]])
    d3, p3 = d2.move(src, dst), p2.move(src, dst)  # tree acceptance's K/V move
    for row in range(b):
        slots = jnp.arange(int(lens[row]) + 4)
        got = np.stack([np.asarray(p3.kv[1][p3.page_table[row, s // page], s % page, 0::2]) for s in slots])
        np.testing.assert_allclose(got, np.asarray(d3.k[1, row, :len(slots)]), rtol=1e-5, atol=1e-5)


def test_attention_reads_only_the_blocks_in_use():
    b, t, h, g, e, page, m = 2, 3, 4, 2, 8, 4, 16
    keys = jax.random.split(jax.random.key(0), 2)
    q = jax.random.normal(keys[0], (b, t, h, e))
    pages = jax.random.normal(keys[1], (b * m, page, 2 * g, e))
    table = jnp.arange(b * m).reshape(b, m)
    lens = jnp.array([9, 4])
    vis = Visibility(lens[:, None] + jnp.arange(t), lens)
    clean = reference_attention(q, pages, None, table, vis, pages_per_block=2)
    used = (int(jnp.max(lens)) + t + 7) // 8 * 2  # pages of the blocks any row sees
    poisoned = pages.reshape(b, m, page, 2 * g, e).at[:, used:].set(jnp.nan).reshape(pages.shape)
    out = reference_attention(q, poisoned, None, table, vis, pages_per_block=2)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, clean, atol=1e-6)


def test_tpu_kernel_arguments_against_jax_reference_and_dispatch():
    """The kernel itself does not run in Pallas' TPU interpreter on CPU (jax 0.10.2): JAX's
    reference of the kernel checks the argument mapping (layout, kv_lens, cu_q_lens, tables)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    b, t, h, g, e, page, m = 2, 4, 4, 2, 128, 16, 4
    keys = jax.random.split(jax.random.key(0), 2)
    q = jax.random.normal(keys[0], (b, t, h, e))
    pages = jax.random.normal(keys[1], (b * m + 2, page, 2 * g, e))
    table = jnp.asarray(np.random.RandomState(0).permutation(b * m + 2)[:b * m].reshape(b, m))
    lens = jnp.array([30, 7])
    vis = Visibility(lens[:, None] + jnp.arange(t), lens)
    got = ragged_kernel_attention(q, pages, table, vis, impl=ref_ragged_paged_attention)
    np.testing.assert_allclose(got, reference_attention(q, pages, None, table, vis), atol=1e-5)
    assert attention_path("tpu", tree=False, int8=False) == RAGGED_KERNEL
    assert {attention_path("tpu", tree=True, int8=False), attention_path("tpu", tree=False, int8=True),
            attention_path("cpu", tree=False, int8=False), attention_path("gpu", tree=False, int8=False)} == {REFERENCE}


def test_int8_kv_scheme():
    x = jax.random.normal(jax.random.key(3), (5, 2, 64)) * jnp.array([[0.01], [30.0]])[None]
    q, s = kv_quant.quantize(x)
    assert q.dtype == jnp.int8 and s.dtype == jnp.bfloat16 and s.shape == (5, 2)
    assert int(jnp.max(jnp.abs(q))) >= 126  # the scale is rounded up into bfloat16: nothing clips
    err = jnp.abs(kv_quant.dequantize(q, s, jnp.float32) - x)
    assert bool(jnp.all(err <= s.astype(jnp.float32)[..., None] / 2 + 1e-6))  # half a step of its own scale
    q0, s0 = kv_quant.quantize(jnp.zeros((1, 8)))
    assert float(s0[0]) == 1.0 and not np.asarray(q0).any()


def test_int8_chunk_sees_the_cache_as_stored(model):
    """One 6-token forward equals six 1-token forwards over int8 pages (what makes speculation
    lossless with int8 KV), and both differ from float pages."""
    cfg = model.config
    tokens = jax.random.randint(jax.random.key(2), (1, 16), 0, cfg.vocab_size)
    cache = PagedKVCache.contiguous(cfg, 1, 32, 8, kv_dtype="int8")
    _, cache = model(tokens[:, :10], jnp.arange(10)[None], cache)
    whole, _ = model(tokens[:, 10:], jnp.arange(10, 16)[None], cache)
    steps, c = [], cache
    for i in range(10, 16):
        lg, c = model(tokens[:, i:i + 1], jnp.array([[i]]), c)
        steps.append(lg[:, 0])
    np.testing.assert_allclose(whole[0], jnp.stack(steps, 1)[0], atol=2e-5)
    assert cache_bytes_per_token(cfg, "int8") < cache_bytes_per_token(cfg, "bfloat16")


def test_layout_options_and_errors(model, engine):
    with pytest.raises(ValueError, match="kv_dtype"):
        GenerationConfig(kv_dtype="int4")
    with pytest.raises(ValueError, match="paged"):
        CacheSpec("dense", kv_dtype="int8")
    with pytest.raises(ValueError, match="kv_layout"):
        Engine(model, kv_layout="ring")
    dense = Engine(model, kv_layout="dense")
    cfg = GenerationConfig(max_new_tokens=16, drafter="none")
    assert dense.generate(PROMPTS, cfg).tokens == engine.generate(PROMPTS, cfg).tokens
    with pytest.raises(ValueError, match="paged"):
        dense.generate(PROMPTS, GenerationConfig(max_new_tokens=4, kv_dtype="int8"))


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_every_float_mode_lossless_over_pages(engine, kv_dtype):
    ar = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, drafter="none", kv_dtype=kv_dtype))
    for kw in (dict(num_draft=4), dict(num_draft=3, num_candidates=3)):  # chain, n-gram tree
        sd = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=20, kv_dtype=kv_dtype, **kw))
        assert sd.tokens == ar.tokens, kw
        assert sd.batch_stats.verify_steps < ar.batch_stats.verify_steps


def test_int8_verifiers_and_qspec_lossless_with_int8_kv(int8_engine):
    for verifier, drafter in (("w8a16", "ngram"), ("w8a8", "ngram"), ("w8a16", "qspec")):
        ar = int8_engine.generate(PROMPTS[:3], GenerationConfig(max_new_tokens=16, drafter="none",
                                                                verifier=verifier, kv_dtype="int8"))
        sd = int8_engine.generate(PROMPTS[:3], GenerationConfig(max_new_tokens=16, drafter=drafter, num_draft=3,
                                                                verifier=verifier, kv_dtype="int8"))
        assert sd.tokens == ar.tokens, (verifier, drafter)
