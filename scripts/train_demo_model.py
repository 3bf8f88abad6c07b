#!/usr/bin/env python
"""Train the small Qwen3 demo model that ships in ``quasar_jax/assets/demo-qwen3/``.

Corpus: the ``*.py`` files of a Python standard library (by default the running interpreter's,
``sysconfig.get_paths()["stdlib"]``; ``--stdlib-dir`` points at another copy), minus noisy trees
(``site-packages``, every ``test``/``tests`` tree, ``idlelib``, ``lib2to3``, the generated codec
tables in ``encodings`` and the doc-string dump ``pydoc_data``), in sorted order. Held-out split:
a file is validation when ``zlib.crc32(relative_posix_path) % --val-mod == 0`` (default 25: for
CPython 3.11.7, 24 of the 475 non-empty files, 3% of the bytes), a rule that does not depend on
which other files exist.

Tokenizer: byte-level BPE (``tokenizers``) with Qwen2's pre-tokenisation regex, trained on the
training files only; special tokens ``<|endoftext|>`` (eos and pad), ``<|im_start|>``,
``<|im_end|>``; wrapped in ``transformers.PreTrainedTokenizerFast`` with a Qwen-style chat template.

Model: ``quasar_jax.model.qwen3.Qwen3`` (tied embeddings, GQA), trained in float32 with AdamW, linear
warm-up then cosine decay, global-norm clipping, on ``--seq-len`` windows drawn at seeded random
offsets from the packed training stream (files joined by ``<|endoftext|>``). The forward pass is
the model's own: each step builds a fresh ``model.init_cache(B, T)`` so the cache-based attention
reduces to plain causal attention.

Output (``--out``): the Hugging Face directory written by ``quasar_jax.weights.loading.save_pretrained``
(bfloat16 weights, ``generation_config.json``), the tokenizer files and ``training_log.json``.

Examples::

    python scripts/train_demo_model.py --out /tmp/demo               # CPU default, ~40 min on 2 cores
    python scripts/train_demo_model.py --preset gpu --out /tmp/demo  # the shipped model's settings
    python scripts/train_demo_model.py --preset moe-cpu --out /tmp/demo-moe  # the MoE demo (8 experts, top 2)

Mixture of experts (``--num-experts > 0``): every layer is sparse (``--experts-per-tok`` of
``--num-experts`` experts of width ``--moe-intermediate-size``, top-k weights renormalised); the
loss adds ``--aux-loss-coef`` times the mean over layers of the Switch load-balancing loss
(``quasar_jax.model.moe.load_balance_loss``), so that the routing spreads over the experts.

The shipped model was trained on a copy of CPython 3.11.7's standard library (``--stdlib-dir``),
see docs/demo_model.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from quasar_jax.model.config import Qwen3Config  # noqa: E402
from quasar_jax.model.moe import SparseMoeBlock  # noqa: E402
from quasar_jax.model.qwen3 import Qwen3, count_params  # noqa: E402
from quasar_jax.training.corpus import EXCLUDED_DIRS, list_corpus, read_texts  # noqa: E402
from quasar_jax.weights.loading import load_model, save_pretrained  # noqa: E402

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

# Qwen2/Qwen3's pre-tokenisation regex: digits split one by one, runs of indentation kept whole.
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Size presets. "cpu" is the default and trains in about 40 minutes on 2 CPU cores;
# "gpu" is the shipped model (10.8M parameters, 21.6 MB in bfloat16; 800 steps = 6.1 epochs of
# the 2.14M-token training stream took 40 s on one H100; 400/800/1600 steps gave val loss
# 3.79/3.04/3.33: the corpus is small, and longer runs overfit).
PRESETS = {
    "cpu": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, intermediate_size=768,
                steps=900, batch_size=16, seq_len=256, lr=2e-3, warmup=60, eval_every=150,
                eval_max_seqs=128),
    "gpu": dict(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=2, head_dim=64, intermediate_size=768,
                steps=800, batch_size=32, seq_len=512, lr=1.5e-3, warmup=150, eval_every=200,
                eval_max_seqs=None),
    # the MoE demo: 8 experts, top 2, 12.3M parameters (24.6 MB in bfloat16), 4.9M read per token
    "moe-cpu": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, intermediate_size=768, num_experts=8,
                    experts_per_tok=2, moe_intermediate_size=384,
                    steps=900, batch_size=16, seq_len=256, lr=2e-3, warmup=60, eval_every=150,
                    eval_max_seqs=128),
}
SAMPLE_PROMPT = "def fibonacci(n):"


# ---------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, max_len: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, model_max_length=max_len,
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE)
    return hf


def check_round_trip(tokenizer, texts: list[str]) -> None:
    """``decode(encode(text)) == text`` for every text (the HF wrapper's decode)."""
    for i, text in enumerate(texts):
        ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        back = tokenizer.decode(ids)
        if back != text:
            raise ValueError(f"tokenizer round trip failed on validation text {i}")


def encode_stream(tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """All texts encoded and joined, each followed by ``<|endoftext|>``: int32 [N]."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = []
    for enc in encodings:
        parts.append(np.asarray(enc.ids, np.int32))
        parts.append(np.asarray([eos_id], np.int32))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------- training
def make_schedule(lr: float, warmup: int, steps: int, min_ratio: float):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=max(1, warmup),
        decay_steps=max(warmup + 1, steps), end_value=lr * min_ratio)


def build_steps(graphdef, tx, aux_loss_coef: float = 0.0):
    def loss_fn(params, batch):  # batch [B, T+1] int32 -> (loss with the MoE aux loss, cross-entropy)
        model = nnx.merge(graphdef, params)
        tokens, targets = batch[:, :-1], batch[:, 1:]
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits, _ = model(tokens, positions, model.init_cache(b, t))  # [B, T, V] float32
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        aux = [x for x in jax.tree.leaves(nnx.pop(model, nnx.Intermediate))]  # MoE layers' aux losses
        total = ce + aux_loss_coef * sum(aux) / len(aux) if aux else ce
        return total, ce

    @jax.jit
    def train_step(params, opt_state, batch):
        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    @jax.jit
    def eval_step(params, batch):
        return loss_fn(params, batch)[1]

    return train_step, eval_step


def windows(stream: np.ndarray, seq_len: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping ``[N, seq_len + 1]`` windows (stride ``seq_len``) of ``stream``."""
    n = (len(stream) - 1) // seq_len
    if limit is not None:
        n = min(n, limit)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


def mean_loss(eval_step, params, data: np.ndarray, batch_size: int) -> float:
    """Token-weighted mean loss over ``data [N, T+1]`` (the final partial batch is dropped)."""
    n = (len(data) // batch_size) * batch_size
    losses = [float(eval_step(params, jnp.asarray(data[i:i + batch_size])))
              for i in range(0, n, batch_size)]
    return float(np.mean(losses))


# ---------------------------------------------------------------------------------- sampling
def greedy_complete(model: Qwen3, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    eos_id = tokenizer.eos_token_id
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, positions, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, positions, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    cache = model.init_cache(1, len(ids) + max_new_tokens)
    tokens = jnp.asarray([ids], jnp.int32)
    nxt, cache = step(state, tokens, jnp.arange(len(ids), dtype=jnp.int32)[None], cache)
    out = []
    for i in range(max_new_tokens):
        token = int(nxt[0])
        if token == eos_id:
            break
        out.append(token)
        pos = jnp.asarray([[len(ids) + i]], jnp.int32)
        nxt, cache = step(state, jnp.asarray([[token]], jnp.int32), pos, cache)
    return prompt + tokenizer.decode(out)


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="size and schedule defaults; explicit flags below override them")
    p.add_argument("--out", required=True, help="output directory (HF format + training_log.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--num-kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--num-experts", type=int, help="experts per layer (0: a dense model)")
    p.add_argument("--experts-per-tok", type=int, help="experts routed per token (MoE)")
    p.add_argument("--moe-intermediate-size", type=int, help="width of one expert (MoE)")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="weight of the MoE load-balancing loss")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    p.add_argument("--warmup", type=int, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--eval-every", type=int, help="steps between validation passes")
    p.add_argument("--eval-max-seqs", type=int,
                   help="cap on validation windows per pass (gpu preset: all of them)")
    p.add_argument("--log-every", type=int, default=10, help="steps between train-loss readouts")
    p.add_argument("--stdlib-dir", default=sysconfig.get_paths()["stdlib"],
                   help="standard library to train on")
    p.add_argument("--val-mod", type=int, default=25,
                   help="a file is held out when crc32(relative path) %% val_mod == 0")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="safety net: stop early (and say so in the log) past this wall time")
    p.add_argument("--sample-tokens", type=int, default=120)
    p.add_argument("--progress-interval", type=float, default=2.0,
                   help="seconds between progress-bar refreshes (large for logs)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        flag = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                "num_key_value_heads": "num_kv_heads"}.get(key, key)
        if getattr(args, flag, None) is None:
            setattr(args, flag, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}), "
          f"{os.cpu_count()} host cores", flush=True)

    # ---- corpus and tokenizer
    root = Path(args.stdlib_dir)
    train_files, val_files = list_corpus(root, args.val_mod)
    train_texts, val_texts = read_texts(train_files), read_texts(val_files)
    tokenizer = train_tokenizer(train_texts, args.vocab_size, args.max_position_embeddings)
    check_round_trip(tokenizer, val_texts)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    train_stream = encode_stream(tokenizer, train_texts, eos_id)
    val_stream = encode_stream(tokenizer, val_texts, eos_id)
    train_bytes = sum(len(t.encode()) for t in train_texts)
    val_bytes = sum(len(t.encode()) for t in val_texts)
    t_data = time.time() - t_start
    print(f"corpus {root}: {len(train_texts)} train files ({train_bytes / 1e6:.2f} MB, "
          f"{len(train_stream):,} tokens), {len(val_texts)} val files ({val_bytes / 1e6:.2f} MB, "
          f"{len(val_stream):,} tokens); tokenizer vocab {len(tokenizer)}, round trip ok; "
          f"{t_data:.1f}s", flush=True)

    # ---- model
    cfg = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads, head_dim=args.head_dim,
        intermediate_size=args.intermediate_size, rms_norm_eps=1e-6, rope_theta=args.rope_theta,
        tie_word_embeddings=True, max_position_embeddings=args.max_position_embeddings,
        bos_token_id=None, eos_token_id=(eos_id,),
        **(dict(num_experts=args.num_experts, num_experts_per_tok=args.experts_per_tok,
                moe_intermediate_size=args.moe_intermediate_size, norm_topk_prob=True)
           if args.num_experts else {}))
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_position_embeddings")
    model = Qwen3(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    n_params = count_params(model)
    print(f"model: {n_params / 1e6:.2f}M parameters, {json.dumps(dataclasses.asdict(cfg))}",
          flush=True)

    schedule = make_schedule(args.lr, args.warmup, args.steps, args.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(args.clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=args.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    for block in (layer.mlp for layer in model.layers):
        if isinstance(block, SparseMoeBlock):
            block.sow_aux = True  # the load-balancing loss, read back in loss_fn
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)
    train_step, eval_step = build_steps(graphdef, tx, args.aux_loss_coef)

    val_data = windows(val_stream, args.seq_len, args.eval_max_seqs)
    train_probe = windows(train_stream, args.seq_len, len(val_data))  # same size as val
    eval_bs = min(args.batch_size, len(val_data))
    rng = np.random.default_rng(args.seed)
    span = len(train_stream) - args.seq_len - 1
    col = np.arange(args.seq_len + 1)[None, :]

    history, evals = [], []
    pending: list = []
    stopped_early = False
    t_train = time.time()
    t_first = None
    bar = tqdm(total=args.steps, desc="train", mininterval=args.progress_interval,
               maxinterval=max(10.0, args.progress_interval), dynamic_ncols=True)
    for step in range(1, args.steps + 1):
        starts = rng.integers(0, span + 1, size=args.batch_size)
        batch = jnp.asarray(train_stream[starts[:, None] + col])
        params, opt_state, loss, gnorm = train_step(params, opt_state, batch)
        pending.append((loss, gnorm))
        if step == 1:
            loss.block_until_ready()
            t_first = time.time() - t_train
        if step % args.log_every == 0 or step == args.steps:
            got = jax.device_get(pending)
            pending = []
            mean = float(np.mean([g[0] for g in got]))
            elapsed = time.time() - t_train
            history.append(dict(step=step, train_loss=round(mean, 5),
                                grad_norm=round(float(got[-1][1]), 4),
                                lr=float(schedule(step - 1)), elapsed_s=round(elapsed, 2)))
            bar.set_postfix(loss=f"{mean:.3f}", lr=f"{float(schedule(step - 1)):.2e}")
            if step == args.log_every * 3:
                per_step = (elapsed - t_first) / (step - 1)
                tqdm.write(f"timing: first step (compile) {t_first:.1f}s, then {per_step * 1e3:.1f} "
                           f"ms/step, {args.batch_size * args.seq_len / per_step:,.0f} tokens/s; "
                           f"projected {t_first + per_step * args.steps:.0f}s for {args.steps} steps")
        bar.update(1)
        if step % args.eval_every == 0 or step == args.steps:
            val = mean_loss(eval_step, params, val_data, eval_bs)
            evals.append(dict(step=step, val_loss=round(val, 5), val_ppl=round(math.exp(val), 3),
                              elapsed_s=round(time.time() - t_train, 2)))
            tqdm.write(f"step {step}: val loss {val:.4f}, ppl {math.exp(val):.2f}")
        if args.max_minutes and (time.time() - t_start) > 60 * args.max_minutes and step < args.steps:
            stopped_early = True
            tqdm.write(f"stopping early at step {step}: past --max-minutes {args.max_minutes}")
            if not evals or evals[-1]["step"] != step:
                val = mean_loss(eval_step, params, val_data, eval_bs)
                evals.append(dict(step=step, val_loss=round(val, 5), val_ppl=round(math.exp(val), 3),
                                  elapsed_s=round(time.time() - t_train, 2)))
            break
    bar.close()
    jax.block_until_ready(params)
    train_wall = time.time() - t_train
    steps_done = step

    # ---- final numbers, save, reload check, sample
    final_train = mean_loss(eval_step, params, train_probe, eval_bs)
    final_val = evals[-1]["val_loss"]
    nnx.update(model, params)
    for block in (layer.mlp for layer in model.layers):
        if isinstance(block, SparseMoeBlock):
            block.sow_aux = False
    generation_config = {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id,
                         "do_sample": False, "max_new_tokens": 256}
    save_pretrained(model, out, dtype=jnp.bfloat16, tokenizer=tokenizer,
                    generation_config=generation_config)
    shipped = load_model(out, dtype=jnp.float32)
    _, shipped_params = nnx.split(shipped, nnx.Param)
    shipped_val = mean_loss(eval_step, shipped_params, val_data, eval_bs)
    sample = greedy_complete(shipped, tokenizer, SAMPLE_PROMPT, args.sample_tokens)
    print(f"final: train loss {final_train:.4f}, val loss {final_val:.4f} (ppl "
          f"{math.exp(final_val):.2f}); bf16 checkpoint val loss {shipped_val:.4f} "
          f"(ppl {math.exp(shipped_val):.2f})", flush=True)
    print("sample greedy completion:\n" + sample, flush=True)

    tokens_seen = steps_done * args.batch_size * args.seq_len
    log = dict(
        command="python scripts/train_demo_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        args=vars(args),
        model_config=dataclasses.asdict(cfg),
        num_params=n_params,
        corpus=dict(stdlib_dir=str(root), python=platform.python_version(),
                    excluded_dirs=sorted(EXCLUDED_DIRS),
                    split=f"val iff zlib.crc32(relative path) % {args.val_mod} == 0",
                    train_files=len(train_texts), val_files=len(val_texts),
                    train_bytes=train_bytes, val_bytes=val_bytes,
                    train_tokens=int(len(train_stream)), val_tokens=int(len(val_stream)),
                    bytes_per_token=round(train_bytes / len(train_stream), 3)),
        tokenizer=dict(kind="byte-level BPE (Qwen2 split regex)", vocab_size=len(tokenizer),
                       special_tokens=SPECIAL_TOKENS, eos_token_id=eos_id, round_trip_ok=True),
        device=dict(platform=device.platform, kind=device.device_kind, host_cores=os.cpu_count(),
                    jax=jax.__version__),
        steps=steps_done, stopped_early=stopped_early,
        tokens_seen=tokens_seen, epochs=round(tokens_seen / len(train_stream), 2),
        first_step_s=round(t_first, 2),
        step_time_s=round((train_wall - t_first) / max(1, steps_done - 1), 5),
        train_wall_s=round(train_wall, 1), data_and_tokenizer_s=round(t_data, 1),
        final=dict(train_loss=round(final_train, 5), train_ppl=round(math.exp(final_train), 3),
                   val_loss=final_val, val_ppl=round(math.exp(final_val), 3),
                   bf16_val_loss=round(shipped_val, 5), bf16_val_ppl=round(math.exp(shipped_val), 3),
                   train_loss_measured_on=f"first {len(train_probe)} windows of the train stream",
                   val_windows=len(val_data), seq_len=args.seq_len),
        sample=dict(prompt=SAMPLE_PROMPT, max_new_tokens=args.sample_tokens, completion=sample),
        evals=evals, history=history,
    )
    log["total_wall_s"] = round(time.time() - t_start, 1)
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {out} in {log['total_wall_s']:.0f}s", flush=True)
    return log


if __name__ == "__main__":
    main()
