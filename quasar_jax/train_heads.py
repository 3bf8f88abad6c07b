"""``python -m quasar_jax.train_heads --model M --out DIR``: train S4C draft heads by self-distillation.

The frozen target continues prompts (``--prompt``, ``--prompt-file``, or windows of ``--text``
files; for ``--model demo`` by default windows of the demo model's own training corpus, the Python
standard library's source) and the heads learn its own generations (docs/s4c.md). ``DIR`` gets
the heads (``heads.json``, ``params/``: what ``--heads DIR`` of decode / bench / serve loads),
``training_log.json``, ``training_curve.png`` and the generated data (``data.npz``).

Resumable: checkpoints go to ``DIR/checkpoints/`` while training runs; running the same command
again continues an interrupted run (the settings must match). Ctrl-C (exit 130) leaves no half
written file: only complete checkpoints, which the next run resumes from. ``DIR`` must be new,
empty, or hold an interrupted run of this command. Parsing (and ``--help``) does not import JAX.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from quasar_jax.cli.errors import InputError
from quasar_jax.cli.flags import DTYPES, float_in, int_at_least, non_negative_int, positive_int
from quasar_jax.cli.mesh_flags import add_mesh_flags
from quasar_jax.cli.outputs import check_output_dir, staged_dir, write_text_atomic
from quasar_jax.cli.prompts import Prompt, check_prompt, encode, read_prompt_file, read_text_file, stop_ids_of
from quasar_jax.cli.runner import OneLineParser, run_command
from quasar_jax.training import corpus

PROG = "python -m quasar_jax.train_heads"
RUN_FILE = "run.json"  # the settings of the run in DIR (resume checks them)
OWNED = ("heads.json", "params", "training_log.json", "training_curve.png", "data.npz", "checkpoints", RUN_FILE)
# Settings a resumed run must share with the interrupted one.
RUN_SETTINGS = ("model", "dtype", "prompt", "prompt_file", "text", "num_prompts", "prompt_tokens",
                "max_new_tokens", "num_heads", "steps", "batch_size", "lr", "warmup", "seed", "val_fraction")


DEMOS = ("demo", "demo-moe")  # the shipped models, trained on the same corpus


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="'demo', a local HF or converted directory, or a hub id "
                                                   "(default: demo)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="the target's compute dtype (default: float32)")
    p.add_argument("--out", required=True, help="output directory (new or empty, or an interrupted run to resume)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt the target continues (repeatable)")
    src.add_argument("--prompt-file", help="prompts, one per line, or Spec-Bench .jsonl (as decode)")
    src.add_argument("--text", action="append", metavar="PATH",
                     help="a text file, or a directory of *.py / *.txt files, whose token windows are the "
                          "prompts (repeatable; default for --model demo or demo-moe: the demo models' "
                          "training corpus)")
    p.add_argument("--num-prompts", type=positive_int, default=512,
                   help="prompts drawn from --text (default: 512)")
    p.add_argument("--prompt-tokens", type=int_at_least(2), default=64,
                   help="tokens per prompt window of --text (default: 64)")
    p.add_argument("--max-new-tokens", type=int_at_least(2), default=128,
                   help="tokens the target generates per prompt (default: 128)")
    p.add_argument("--num-heads", type=positive_int, default=5, help="draft heads = deepest tree level (default: 5)")
    p.add_argument("--steps", type=positive_int, default=600, help="optimizer steps (default: 600)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--lr", type=float_in(0.0, 1.0, True), default=3e-3, help="peak learning rate (default: 3e-3)")
    p.add_argument("--warmup", type=non_negative_int, default=30, help="warm-up steps (default: 30)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of prompts, batches and init (default: 0)")
    p.add_argument("--val-fraction", type=float_in(0.0, 0.5, True), default=0.1,
                   help="share of the sequences held out to measure acceptance (default: 0.1)")
    p.add_argument("--tree-nodes", type=positive_int, default=16,
                   help="the tree size decode uses by default (stored with the heads; default: 16)")
    p.add_argument("--draft-vocab", type=non_negative_int, default=None,
                   help="the heads score only this many of the target's most frequent generated tokens "
                        "(default: a quarter of the vocabulary; 0: the full vocabulary)")
    p.add_argument("--gen-batch-size", type=positive_int, default=32,
                   help="rows per generation batch (default: 32)")
    p.add_argument("--checkpoint-every", type=positive_int, default=100,
                   help="steps between checkpoints (default: 100)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_mesh_flags(p)
    return p


def check_args(args, given: set[str]) -> None:
    if args.plan:
        raise InputError("--plan applies only to decode")
    if args.text is None and args.prompt is None and args.prompt_file is None and args.model not in DEMOS:
        raise InputError("no prompts: give --prompt, --prompt-file or --text (only --model demo and demo-moe have a "
                         "default corpus)")
    if args.text is None:
        for flag in ("--num-prompts", "--prompt-tokens"):
            if flag in given and (args.prompt or args.prompt_file):
                raise InputError(f"{flag} applies only to --text prompts")
    else:
        text_files(args.text)  # every path exists


def text_files(paths: list[str]) -> list[Path]:
    files = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(q for q in path.rglob("*") if q.suffix in (".py", ".txt") and q.is_file())
            if not found:
                raise InputError(f"--text {name}: the directory holds no *.py or *.txt file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"--text {name}: no such file or directory")
    return files


def prompts_of(args, tokenizer, eos_id) -> tuple[list[list[int]], str]:
    """Prompt ids and a description of where they came from."""
    if args.prompt or args.prompt_file:
        ps = ([Prompt(check_prompt(t, f"--prompt {i + 1}")) for i, t in enumerate(args.prompt)] if args.prompt
              else read_prompt_file(args.prompt_file))
        if not ps:
            raise InputError(f"--prompt-file {args.prompt_file} holds no prompt")
        return [encode(tokenizer, p.text, False) for p in ps], f"{len(ps)} given prompts"
    if args.text:
        texts = [read_text_file(f, "--text file") for f in text_files(args.text)]
        where = ", ".join(args.text)
    else:
        root = corpus.stdlib_dir()
        try:
            train, _ = corpus.list_corpus(root)
        except (FileNotFoundError, ValueError) as err:
            raise InputError(f"the demo model's corpus (this Python's standard library) is unavailable ({err}); "
                             "give --text, --prompt or --prompt-file") from None
        texts = corpus.read_texts(train)
        where = f"the demo model's training split of {root} ({len(train)} files)"
    ids = corpus.text_prompts(texts, tokenizer, args.num_prompts, args.prompt_tokens, args.seed, eos_id)
    return ids, f"{len(ids)} windows of {args.prompt_tokens} tokens of {where}"


def run_settings(args) -> dict:
    return {k: getattr(args, k) for k in RUN_SETTINGS}


def prepare_out(args) -> tuple[Path, bool]:
    """The output directory, and whether it holds an interrupted run to resume."""
    out = check_output_dir(args.out, owned=OWNED)
    if (out / "heads.json").exists():
        raise InputError(f"--out {args.out} already holds trained heads; choose a new or empty directory")
    run_file = out / RUN_FILE
    if not run_file.exists():
        return out, False
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, ValueError):
        raise InputError(f"--out {args.out}: {RUN_FILE} is unreadable; choose a new or empty directory") from None
    for key, value in run_settings(args).items():
        if saved.get(key) != value:
            raise InputError(f"--out {args.out} holds an interrupted run with --{key.replace('_', '-')} "
                             f"{saved.get(key)!r}, not {value!r}: give the same settings to resume, or a new --out")
    return out, True


def run(args, given: set[str]) -> int:
    # JAX and the model code load here, after the arguments are known to be valid.
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from quasar_jax import sharding
    from quasar_jax.speculative.engine import Engine
    from quasar_jax.speculative.heads import DraftHeads, heads_meta, write_heads
    from quasar_jax.training.trainer import (Checkpoints, HeadsData, HeadsTrainer, TrainSettings, acceptance,
                                           batch_rows, draft_vocab_meta, generate_data, optimizer, place, plot_curve, put_batch,
                                           train_step, tree_meta)
    from quasar_jax.weights.loading import load_model, load_tokenizer, resolve_model_dir

    check_args(args, given)
    mesh = sharding.start(args, PROG)
    if mesh is not None and args.batch_size % int(mesh.shape["data"]):
        raise InputError(f"--batch-size {args.batch_size} must be a multiple of the mesh's data axis "
                         f"({int(mesh.shape['data'])})")
    out, resume = prepare_out(args)
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    stop = stop_ids_of(tokenizer, model_dir)
    model = load_model(model_dir, dtype=jnp.float32 if args.dtype == "float32" else jnp.bfloat16)
    if args.draft_vocab is not None and args.draft_vocab > model.config.vocab_size:
        raise InputError(f"--draft-vocab {args.draft_vocab} is more than the model's vocabulary "
                         f"({model.config.vocab_size})")
    progress = not args.no_progress
    t_start = time.perf_counter()

    have_data = resume and (out / "data.npz").exists()
    if not have_data:  # bad prompt input is refused before anything is written
        prompt_ids, source = prompts_of(args, tokenizer, stop[0] if stop else None)
    if not resume:  # the settings first: a run interrupted from here on can be resumed
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / RUN_FILE, json.dumps(run_settings(args)) + "\n")
    if have_data:
        data = HeadsData.load(out / "data.npz")
    else:
        bar = tqdm(total=len(prompt_ids), desc="generate", unit="prompt", disable=not progress, file=sys.stderr)
        data = generate_data(Engine(model), prompt_ids, max_new_tokens=args.max_new_tokens,
                             batch_size=args.gen_batch_size, stop_ids=stop, on_batch=bar.update)
        bar.close()
        data.save(out / "data.npz")
        write_text_atomic(out / RUN_FILE, json.dumps({**run_settings(args), "source": source,
                                                      "generate_s": time.perf_counter() - t_start}) + "\n")
    run_info = json.loads((out / RUN_FILE).read_text())
    source, gen_s = run_info.get("source", "data.npz"), run_info.get("generate_s", 0.0)
    n_val = max(1, int(round(len(data.tokens) * args.val_fraction)))
    if len(data.tokens) - n_val < 1:
        raise InputError(f"{len(data.tokens)} sequences leave none to train on after --val-fraction {args.val_fraction}")
    train, val = data.rows(slice(0, len(data.tokens) - n_val)), data.rows(slice(len(data.tokens) - n_val, None))

    st = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, seed=args.seed)
    trainer = HeadsTrainer(model, DraftHeads(args.num_heads, model.config.hidden_size,
                                             eps=model.config.rms_norm_eps, rngs=nnx.Rngs(args.seed)))
    place(trainer, mesh)
    opt = optimizer(trainer, st)
    ckpt = Checkpoints(out / "checkpoints")
    step, log = 0, {"loss": [], "kl": [], "head_acc": [], "train_s": 0.0}
    if resume and ckpt.latest() is not None:
        step, log = ckpt.restore(trainer, opt)
    bar = tqdm(total=st.steps, initial=step, desc="train", unit="step", disable=not progress, file=sys.stderr)
    t0 = time.perf_counter() - log["train_s"]
    while step < st.steps:
        batch = put_batch(train.rows(batch_rows(len(train.tokens), step, st.batch_size, st.seed)), mesh)
        loss, accs, kls = train_step(trainer, opt, *batch)
        log["loss"].append(float(loss))
        log["kl"].append(round(float(np.sum(kls)), 5))
        log["head_acc"].append([round(float(a), 4) for a in np.asarray(accs)])
        step += 1
        bar.set_postfix_str(f"loss {log['loss'][-1]:.3f} acc " + "/".join(f"{a:.2f}" for a in log["head_acc"][-1]))
        bar.update(1)
        if step % args.checkpoint_every == 0 or step == st.steps:
            log["train_s"] = time.perf_counter() - t0
            ckpt.save(step, trainer, opt, log)
    bar.close()
    ckpt.close()
    train_s = log["train_s"]

    vocab = model.config.vocab_size
    size = vocab // 4 if args.draft_vocab is None else args.draft_vocab
    draft = draft_vocab_meta(data, vocab, size) if 0 < size < vocab else None
    acc = acceptance(trainer, val, st.batch_size, None if draft is None else draft["ids"])
    tree = tree_meta(acc, args.tree_nodes)
    seen = st.steps * st.batch_size
    training = {"source": source, "sequences": len(data.tokens), "train_sequences": len(train.tokens),
                "val_sequences": n_val, "generated_tokens": data.generated_tokens,
                "train_generated_tokens": train.generated_tokens, "steps": st.steps, "batch_size": st.batch_size,
                "sequences_seen": seen, "epochs": seen / len(train.tokens), "lr": st.lr, "warmup": st.warmup,
                "seed": st.seed, "generate_s": gen_s, "train_s": train_s, "final_loss": float(np.mean(log["loss"][-20:])),
                "final_kl": float(np.mean(log["kl"][-20:])),
                "final_head_acc": np.mean(log["head_acc"][-20:], axis=0).round(4).tolist()}
    meta = heads_meta(trainer.heads, model, tree=tree, acceptance={"top_rank": acc.round(4).tolist(),
                                                                   "top1": acc[:, 0].round(4).tolist()},
                      training=training, **({} if draft is None else {"draft_vocab": draft}))
    with staged_dir(out) as stage:
        write_heads(trainer.heads, meta, stage)
        (stage / "training_log.json").write_text(json.dumps({**log, "training": training}) + "\n")
        plot_curve(log, stage / "training_curve.png")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / RUN_FILE).unlink(missing_ok=True)
    print(f"trained {args.num_heads} heads on {data.generated_tokens} generated tokens ({source}): "
          f"{st.steps} steps in {train_s:.0f}s; held-out top-1 per head "
          + " ".join(f"{a:.2f}" for a in acc[:, 0]) + f"; estimated tau {tree['estimated_tau']:.2f} at "
          f"{tree['default_nodes']} nodes -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
