"""Qwen3 mixture of experts: config, parity with transformers' Qwen3MoeForCausalLM, both checkpoint
layouts, int8 experts, every decoding mode lossless against autoregressive decoding, expert
parallelism on 8 fake devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.moe import ExpertLinear, SparseMoeBlock, route
from quasar_jax.model.quant import Int8ExpertLinear, Int8Linear, quantize_model
from quasar_jax.model.qwen3 import Linear
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.weights.loading import load_model
from test_sharding import decode_in_two_processes

TINY_MOE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=256, rope_theta=10000.0)
SHAPES = {  # several shapes, some layers dense
    "x6k2_norm_dense1": dict(num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    "x4k1_step2_tied": dict(num_experts=4, num_experts_per_tok=1, decoder_sparse_step=2,
                            tie_word_embeddings=True),
    "x8k3_kv1": dict(num_experts=8, num_experts_per_tok=3, num_key_value_heads=1, norm_topk_prob=False),
}
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12, 13, 11, 12], [40, 3, 77, 21, 9, 60]]


def make_hf_moe(out_dir, seed=0, **overrides):
    """Save a random ``Qwen3MoeForCausalLM`` (norms != 1, distinct routers); return it."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY_MOE, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.5 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    return model


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    made = {}

    def get(shape):
        if shape not in made:
            d = tmp_path_factory.mktemp(f"moe_{shape}")
            made[shape] = (d, make_hf_moe(d, **SHAPES[shape]))
        return made[shape]

    return get


def _logits(model, ids):
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return np.asarray(model(jnp.asarray(ids, jnp.int32), pos, model.init_cache(b, t + 4))[0])


def _set_impl(model, impl):
    for _, m in nnx.iter_modules(model):
        if isinstance(m, SparseMoeBlock):
            m.impl = impl
    return model


# ----------------------------------------------------------------------------- config
def test_config_spellings_sparse_layers_and_presets(hf_moe):
    d, hf = hf_moe("x6k2_norm_dense1")
    raw = json.loads((d / "config.json").read_text())
    assert "num_local_experts" in raw  # transformers 5 writes this spelling
    cfg = Qwen3Config.from_json(d)
    hub = dict(raw)
    hub["num_experts"] = hub.pop("num_local_experts")  # the hub's spelling
    assert Qwen3Config.from_hf_dict(hub) == cfg
    assert cfg.num_experts == 6 and cfg.num_experts_per_tok == 2 and cfg.norm_topk_prob
    # the sparse layers are those transformers built
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    for shape in SHAPES:
        c = Qwen3Config.from_json(hf_moe(shape)[0])
        hf_sparse = [isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in hf_moe(shape)[1].model.layers]
        assert [c.is_moe_layer(i) for i in range(c.num_hidden_layers)] == hf_sparse
    assert Qwen3Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    a3b = Qwen3Config.preset("Qwen/Qwen3-30B-A3B")
    assert round(a3b.num_params() / 1e9, 1) == 30.5 and round(a3b.num_active_params() / 1e9, 1) == 3.4
    big = Qwen3Config.preset("qwen3-235b-a22b")
    assert round(big.num_params() / 1e9) == 235 and round(big.num_active_params() / 1e9) == 22
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_params()


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_transformers(hf_moe, shape):
    import torch

    d, hf = hf_moe(shape)
    ids = np.random.default_rng(1).integers(0, 96, size=(2, 13))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    model = load_model(d)
    for impl in ("blocked", "ragged"):
        got = _logits(_set_impl(model, impl), ids)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_fused_layout_loads_the_same_and_errors_name_tensors(hf_moe, tmp_path):
    src, _ = hf_moe("x6k2_norm_dense1")
    tensors = load_file(str(src / "model.safetensors"))
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in (0, 2):  # the sparse layers: transformers 5's in-memory layout
        p = f"model.layers.{i}.mlp.experts"
        gate = np.stack([tensors[f"{p}.{e}.gate_proj.weight"] for e in range(6)])
        up = np.stack([tensors[f"{p}.{e}.up_proj.weight"] for e in range(6)])
        fused[f"{p}.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        fused[f"{p}.down_proj"] = np.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(6)])
    d = tmp_path / "fused"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    save_file(fused, str(d / "model.safetensors"))
    ids = np.arange(12).reshape(1, 12)
    np.testing.assert_array_equal(_logits(load_model(d), ids), _logits(load_model(src), ids))

    broken = dict(tensors)
    del broken["model.layers.2.mlp.experts.4.up_proj.weight"]
    save_file(broken, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.2\.mlp\.experts\.4\.up_proj\.weight"):
        load_model(d)
    broken = {**tensors, "model.layers.0.mlp.experts.6.up_proj.weight": tensors[
        "model.layers.0.mlp.experts.0.up_proj.weight"]}
    save_file(broken, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"experts\.6\.up_proj.*expert 6 of 6"):
        load_model(d)


def test_router_matches_transformers_top_k():
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    for norm in (False, True):
        r = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=3,
                                              norm_topk_prob=norm))
        with torch.no_grad():
            r.weight.normal_()
        x = torch.randn(10, 16)
        _, w_ref, e_ref = r(x)
        w, e = route(jnp.asarray(x.numpy()), jnp.asarray(r.weight.detach().numpy()), 3, norm)
        np.testing.assert_array_equal(np.asarray(e), e_ref.numpy())
        np.testing.assert_allclose(np.asarray(w), w_ref.detach().numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- int8 experts
@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_int8_experts_equal_per_expert_int8_linear(mode):
    key = jax.random.key(0)
    kernel = 0.2 * jax.random.normal(key, (5, 24, 16))
    layer = Int8ExpertLinear.from_kernel(kernel)
    sizes = jnp.asarray([3, 0, 4, 1, 2], jnp.int32)
    row_expert = jnp.repeat(jnp.arange(5, dtype=jnp.int32), sizes, total_repeat_length=10)
    x = jax.random.normal(jax.random.key(1), (10, 24))
    want = np.concatenate([np.asarray(Int8Linear.from_kernel(kernel[e])(x[row_expert == e], mode=mode))
                           for e in range(5)])
    np.testing.assert_allclose(np.asarray(layer.ragged(x, row_expert, sizes, mode=mode)), want, atol=1e-5)
    from quasar_jax.model.moe import BlockPlan
    plan = BlockPlan(row_expert, sizes, 8)
    got = plan.from_blocks(layer.blocked(plan.to_blocks(x), plan.block_expert, mode=mode))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_quantize_model_keeps_router_and_norms_float(hf_moe):
    model = quantize_model(load_model(hf_moe("x6k2_norm_dense1")[0]))
    kinds = {type(m) for _, m in nnx.iter_modules(model)}
    assert Int8ExpertLinear in kinds and Int8Linear in kinds and ExpertLinear not in kinds and Linear in kinds
    assert model.layers[0].mlp.gate.weight[...].dtype == jnp.float32  # router stays float
    streamed = load_model(hf_moe("x6k2_norm_dense1")[0], int8=True)
    for a, b in zip(jax.tree.leaves(nnx.state(streamed)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_conversion_round_trip(hf_moe, tmp_path):
    from quasar_jax.convert import main as convert_main

    src = hf_moe("x4k1_step2_tied")[0]
    out = tmp_path / "conv"
    assert convert_main(["--model", str(src), "--quantize", "int8", "--dtype", "float32", "--out", str(out)]) == 0
    a, b = nnx.state(load_model(src, int8=True)), nnx.state(load_model(out))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- decoding modes
@pytest.fixture(scope="module")
def engines(hf_moe):
    path = hf_moe("x6k2_norm_dense1")[0]
    return {"float": Engine(load_model(path)), "int8": Engine(load_model(path, int8=True))}


@pytest.mark.parametrize("weights,verifier,drafter,extra", [
    ("float", "float", "ngram", {}),
    ("float", "float", "ngram", {"num_candidates": 2}),
    ("int8", "w8a16", "ngram", {}),
    ("int8", "w8a8", "ngram", {"num_candidates": 2}),
    ("int8", "w8a16", "qspec", {}),
])  # S4C: test_demo_moe_s4c_with_trained_heads_is_lossless (heads trained on an MoE target)
def test_every_mode_is_lossless_against_autoregressive(engines, weights, verifier, drafter, extra):
    engine = engines[weights]
    ar = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=16, drafter="none", verifier=verifier))
    sd = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=16, drafter=drafter, verifier=verifier,
                                                   num_draft=3, **extra))
    assert sd.tokens == ar.tokens
    assert sd.batch_stats.verify_steps < ar.batch_stats.verify_steps


# ----------------------------------------------------------------------------- expert parallelism
SHARDED = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    from quasar_jax.speculative.engine import Engine, GenerationConfig
    from quasar_jax.weights.loading import load_model
    from quasar_jax.model.moe import SparseMoeBlock
    path = sys.argv[1]
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12, 13], [40, 3, 77, 21], [1, 2, 1, 2, 1]]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, size=(4, 9)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (4, 9))
    for int8, verifier in ((False, "float"), (True, "w8a16"), (True, "w8a8")):
        one = load_model(path, int8=int8)
        want = np.asarray(one(ids, pos, one.init_cache(4, 16), mode=verifier)[0])
        cfg = GenerationConfig(max_new_tokens=12, drafter="ngram", num_draft=3, verifier=verifier)
        ref = Engine(one).generate(prompts, cfg).tokens if verifier != "w8a8" else None
        for mesh in ("data=2,model=4", "data=4,model=2"):
            sharded = load_model(path, int8=int8, mesh=mesh)
            blocks = [l.mlp for l in sharded.layers if isinstance(l.mlp, SparseMoeBlock)]
            assert all(b.expert_mesh is not None for b in blocks)
            spec = blocks[0].experts.gate_proj.qvalue if int8 else blocks[0].experts.gate_proj.kernel
            assert spec[...].sharding.spec[0] == "model", spec[...].sharding
            got = np.asarray(jax.jit(lambda m, i, p: m(i, p, m.init_cache(4, 16), mode=verifier)[0])(sharded, ids, pos))
            err = float(np.abs(got - want).max())
            print(f"{verifier} {mesh}: max |logits - one device| {err:.2e}", end="")
            assert err < 1e-5
            if ref is not None and mesh == "data=2,model=4":  # the decoding loop, sharded
                toks = Engine(sharded, mesh=mesh).generate(prompts, cfg).tokens
                print(f", tokens equal {toks == ref}", end="")
                assert toks == ref
            print()
    print("ok")
""")


def test_expert_parallel_equals_one_device(hf_moe):
    path = hf_moe("x8k3_kv1")[0]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED, str(path)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr[-3000:]


# ----------------------------------------------------------------------------- memory plan, bytes model
def test_memory_plan_of_the_moe_presets():
    from quasar_jax.sharding import memory_plan

    cfg = Qwen3Config.preset("qwen3-30b-a3b")
    one = memory_plan(cfg, "data=1,model=1", dtype="bfloat16", batch=1, cache_len=16)
    assert one.params_bytes == 2 * cfg.num_params()
    eight = memory_plan(cfg, "model=8", dtype="bfloat16", batch=1, cache_len=16)
    d, v = cfg.hidden_size, cfg.vocab_size
    replicated = 2 * cfg.num_hidden_layers * (2 * d + 2 * cfg.head_dim + cfg.num_experts * d  # norms, router
                                              + 2 * d * cfg.num_key_value_heads * cfg.head_dim) + 2 * d  # k/v: M % G
    assert eight.params_bytes == (one.params_bytes - replicated) // 8 + replicated
    int8 = memory_plan(cfg, "model=8", dtype="bfloat16", int8=True, batch=1, cache_len=16)
    assert 0.5 < int8.params_bytes / eight.params_bytes < 0.55
    assert not memory_plan(Qwen3Config.preset("qwen3-235b-a22b"), "model=8", int8=False, device_gb=48).fits
    mixed = Qwen3Config(**{**cfg.__dict__, "num_hidden_layers": 4, "mlp_only_layers": (1,)})
    assert memory_plan(mixed, "data=1,model=1").params_bytes == 2 * mixed.num_params()


def test_experts_touched_and_bytes_model(hf_moe):
    from quasar_jax.bench.experts import routing, touched, uniform_touched, verify_bytes

    routes = np.array([[[0, 1], [1, 2], [0, 1], [3, 4]]])  # [1 layer, 4 tokens, k=2]
    assert touched(routes, 1) == 2 and touched(routes, 2) == (3 + 3 + 4) / 3 and touched(routes, 4) == 5
    assert touched(routes, 2, start=2) == 4
    assert uniform_touched(8, 2, 1) == 2 and abs(uniform_touched(8, 2, 50) - 8) < 1e-4
    for shape in ("x6k2_norm_dense1", "x4k1_step2_tied"):
        cfg = Qwen3Config.from_json(hf_moe(shape)[0])
        head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # untied: embedding not read
        assert verify_bytes(cfg, cfg.num_experts, int8=False, dtype_bytes=4).total == 4 * (cfg.num_params() - head)
    import torch

    d, hf = hf_moe("x6k2_norm_dense1")
    r = routing(load_model(d), list(range(20)))
    assert r.shape == (2, 20, 2)  # layers 0 and 2 are sparse
    with torch.no_grad():  # transformers' router logits of the same tokens
        logits = hf(torch.arange(20)[None], output_router_logits=True).router_logits
    for layer, ref in enumerate(logits):
        np.testing.assert_array_equal(r[layer], torch.topk(ref.reshape(20, -1), 2).indices.numpy())


def test_two_processes_decode_like_one_device(hf_moe):
    """Experts split over a mesh that spans two processes (4 CPU devices each, gloo collectives)."""
    ckpt = hf_moe("x8k3_kv1")[0]
    config = dict(max_new_tokens=12, num_draft=3)
    got = json.loads(decode_in_two_processes(ckpt, PROMPTS, config)[0].strip().splitlines()[-1])
    assert got["processes"] == 2 and got["devices"] == 8
    assert got["tokens"] == Engine(load_model(ckpt)).generate(PROMPTS, GenerationConfig(**config)).tokens


# ----------------------------------------------------------------------------- the shipped demo-moe
def test_demo_moe_files_size_and_transformers_parity():
    import torch
    from transformers import Qwen3MoeForCausalLM

    from quasar_jax.weights.loading import DEMO_MODEL_DIR, DEMO_MOE_MODEL_DIR, load_tokenizer, resolve_model_dir

    assert resolve_model_dir("demo-moe") == DEMO_MOE_MODEL_DIR
    names = {p.name for p in DEMO_MOE_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "training_log.json"} <= names
    files = [p for p in DEMO_MOE_MODEL_DIR.rglob("*") if p.is_file()]
    heads = DEMO_MOE_MODEL_DIR / "s4c_heads"  # the S4C draft heads shipped beside it, counted apart
    size = sum(p.stat().st_size for p in files if heads not in p.parents)
    assert size <= 26 * 10**6, f"demo-moe is {size / 1e6:.1f} MB"
    heads_size = sum(p.stat().st_size for p in files if heads in p.parents)
    assert heads_size <= 5 * 10**6, f"demo-moe's S4C heads are {heads_size / 1e6:.1f} MB"
    cfg = Qwen3Config.from_json(DEMO_MOE_MODEL_DIR)
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2 and cfg.moe_layers == tuple(range(4))
    # the same tokenizer as the dense demo (same corpus, same training)
    assert (DEMO_MOE_MODEL_DIR / "tokenizer.json").read_bytes() == (DEMO_MODEL_DIR / "tokenizer.json").read_bytes()
    tok = load_tokenizer("demo-moe")
    ids = tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n", add_special_tokens=False)
    hf = Qwen3MoeForCausalLM.from_pretrained(str(DEMO_MOE_MODEL_DIR), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor([ids])).logits.numpy()
    np.testing.assert_allclose(_logits(load_model("demo-moe"), np.asarray([ids])), ref, atol=1e-4, rtol=0)


def test_demo_moe_s4c_with_trained_heads_is_lossless():
    """S4C on the MoE demo with the heads ``train_heads`` trained on it (shipped beside the model):
    greedy float32 tokens equal autoregressive decoding's, with fewer verify steps (tau > 1)."""
    from quasar_jax.speculative.heads import load_heads
    from quasar_jax.weights.loading import DEMO_MOE_MODEL_DIR, load_tokenizer

    heads = load_heads(DEMO_MOE_MODEL_DIR)  # <model dir>/s4c_heads, what --drafter s4c picks up
    assert heads.path == (DEMO_MOE_MODEL_DIR / "s4c_heads").resolve()
    tok = load_tokenizer("demo-moe")
    prompts = [tok.encode(p, add_special_tokens=False) for p in ("def fibonacci(n):", "import os\nimport sys\n")]
    engine = Engine(load_model("demo-moe"))
    ar = engine.generate(prompts, GenerationConfig(max_new_tokens=24, drafter="none"))
    sd = engine.generate(prompts, GenerationConfig(max_new_tokens=24, drafter="s4c", heads=heads,
                                                  num_draft=heads.num_heads))
    assert sd.tokens == ar.tokens
    assert sd.batch_stats.verify_steps < ar.batch_stats.verify_steps
