"""Shared fixtures: tiny random Hugging Face Qwen3 checkpoints written offline."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests count compilations: no persistent cache (test_compile_cache turns it on in a subprocess).
os.environ["QUASAR_JAX_COMPILE_CACHE"] = "off"
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"aqt\..*")

import pytest  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, intermediate_size=64, rms_norm_eps=1e-6,
            max_position_embeddings=256)


def make_hf_checkpoint(out_dir, *, tie=False, kv_heads=2, seed=0, **overrides):
    """Save a random ``Qwen3ForCausalLM`` with non-trivial norm weights; return the HF model."""
    import torch
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = HFConfig(**{**TINY, "num_key_value_heads": kv_heads, "tie_word_embeddings": tie,
                      "rope_theta": 10000.0, **overrides})
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm weights init to 1: make them matter
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    return model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """Factory: (tie, kv_heads) -> (checkpoint dir, HF model); cached per session."""
    made = {}

    def get(tie=False, kv_heads=2):
        key = (tie, kv_heads)
        if key not in made:
            d = tmp_path_factory.mktemp(f"hf_tie{int(tie)}_kv{kv_heads}")
            made[key] = (d, make_hf_checkpoint(d, tie=tie, kv_heads=kv_heads))
        return made[key]

    return get


TOKENIZER_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "the quick brown fox jumps over the lazy dog\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
]


def make_tiny_tokenizer(out_dir, vocab_size=160):
    """A byte-level BPE tokenizer trained offline on a few lines, saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    fast.save_pretrained(str(out_dir))
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen3 checkpoint with a matching tokenizer (for engine and CLI tests)."""
    d = tmp_path_factory.mktemp("tiny_with_tokenizer")
    tok = make_tiny_tokenizer(d)
    make_hf_checkpoint(d, tie=True, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    return d


def random_heads(model, *, num_heads=3, seed=0, nodes=10, scale=0.3):
    """Untrained S4C heads for ``model`` with random (non-zero) output weights, so drafts vary,
    and a tree grown from a made-up acceptance table (``quasar_jax.speculative.heads.LoadedHeads``)."""
    import jax
    from flax import nnx

    from quasar_jax.speculative.heads import DraftHeads, LoadedHeads, heads_meta
    from quasar_jax.speculative.s4c import choose_tree

    heads = DraftHeads(num_heads, model.config.hidden_size, rngs=nnx.Rngs(seed))
    for i, block in enumerate(heads.blocks):
        shape = block.w_out.kernel.shape
        block.w_out.kernel.set_value(scale * jax.random.normal(jax.random.key(seed * 100 + i), shape))
    acc = [[0.55 - 0.05 * d, 0.2, 0.08, 0.04] for d in range(num_heads)]
    ranked = [list(p) for p, _ in choose_tree(acc, 32)]
    meta = heads_meta(heads, model, tree={"paths": ranked, "default_nodes": nodes})
    return LoadedHeads(heads, meta, None)


DEMO_SLOTS, DEMO_MAX_LEN = 4, 192


@pytest.fixture(scope="session")
def demo_server():
    """One live server per test process (demo model, float32, 4 slots, K = 3): the serving tests
    of several modules share it (and its compiled programs)."""
    import openai

    import quasar_jax as qj
    from quasar_jax.cli.prompts import stop_ids_of
    from quasar_jax.serving.server import ServeConfig, ServerThread, build
    from quasar_jax.speculative.drafters import make_drafter
    from quasar_jax.weights.loading import resolve_model_dir

    model, tok = qj.load("demo", dtype="float32")
    stop_ids = stop_ids_of(tok, resolve_model_dir("demo"))
    cfg = ServeConfig(drafter=make_drafter("ngram", num_draft=3), slots=DEMO_SLOTS, max_len=DEMO_MAX_LEN,
                      chunk_steps=4, prefill_chunk=16, max_queue=16)
    app, api, scheduler = build(model, tok, cfg, model_name="demo", stop_ids=stop_ids)
    server = ServerThread(app).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield dict(model=model, tok=tok, url=server.url, client=client, api=api, scheduler=scheduler,
               stop_ids=stop_ids, cfg=cfg)
    server.stop()
