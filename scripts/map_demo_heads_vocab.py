"""Give the shipped demo heads a draft vocabulary without retraining them.

The heads' self-distillation corpus (the demo model's greedy continuations of 2048 seeded windows
of its training split, as ``python -m quasar_jax.train_heads --model demo`` makes it) is
regenerated for its first ``--count`` prompts; the ``--size`` most frequent generated tokens become
the draft vocabulary (``training.trainer.draft_vocab_meta``). Acceptance is measured again on the
last ``--val`` sequences (the held-out split), per rank, among the full and among the draft
vocabulary; the draft one becomes ``acceptance.top_rank`` (what decoding with the draft vocabulary
sees), the full one is kept as ``acceptance.top_rank_full_vocab``. The tree is chosen again from the
draft-vocabulary acceptance (``training.trainer.tree_meta``, as ``train_heads`` does), so its
estimated tau is what decoding with the draft vocabulary should see. The heads' weights are
unchanged; ``heads.json`` is rewritten with the current fingerprint. ``--tree-only`` skips the
regeneration and only chooses the tree again from the recorded acceptance.

    python scripts/map_demo_heads_vocab.py [--count 384 --val 128 --size 2048] [--tree-only]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np

from quasar_jax.cli.outputs import write_text_atomic
from quasar_jax.speculative.engine import Engine
from quasar_jax.speculative.heads import DEMO_HEADS_DIR, META, fingerprint, load_heads
from quasar_jax.train_heads import prompts_of
from quasar_jax.training.trainer import HeadsTrainer, acceptance, draft_vocab_meta, generate_data, tree_meta
from quasar_jax.cli.prompts import stop_ids_of
from quasar_jax.weights.loading import DEMO_MODEL_DIR, load_model, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=384, help="corpus sequences counted (from the first)")
    p.add_argument("--val", type=int, default=128, help="held-out sequences (from the last) for acceptance")
    p.add_argument("--size", type=int, default=2048, help="draft vocabulary size (default: V/4)")
    p.add_argument("--tree-only", action="store_true",
                   help="only choose the tree again from the recorded draft-vocabulary acceptance")
    args = p.parse_args()
    meta = json.loads((DEMO_HEADS_DIR / META).read_text())
    if args.tree_only:
        write_tree(meta, np.asarray(meta["acceptance"]["top_rank"]))
        return
    tr = meta["training"]
    tokenizer = load_tokenizer(DEMO_MODEL_DIR)
    stop = stop_ids_of(tokenizer, DEMO_MODEL_DIR)
    model = load_model(DEMO_MODEL_DIR, dtype=jnp.float32)
    prompt_args = SimpleNamespace(prompt=None, prompt_file=None, text=None, num_prompts=tr["sequences"],
                                  prompt_tokens=64, seed=tr["seed"])
    prompts, _ = prompts_of(prompt_args, tokenizer, stop[0] if stop else None)
    engine, t0 = Engine(model), time.perf_counter()
    count = generate_data(engine, prompts[:args.count], max_new_tokens=128, batch_size=32, stop_ids=stop)
    val = generate_data(engine, prompts[-args.val:], max_new_tokens=128, batch_size=32, stop_ids=stop)
    print(f"generated {count.generated_tokens} + {val.generated_tokens} tokens in {time.perf_counter() - t0:.0f}s")
    draft = draft_vocab_meta(count, model.config.vocab_size, args.size)
    draft["counted_on"] = (f"{draft['counted_on']}: the first {args.count} of the {tr['sequences']} sequences "
                           "of the heads' self-distillation corpus, regenerated")
    trainer = HeadsTrainer(model, load_heads("demo").module())
    full = acceptance(trainer, val, 16)
    restricted = acceptance(trainer, val, 16, draft["ids"])
    print("top1 full", full[:, 0].round(4).tolist(), "draft", restricted[:, 0].round(4).tolist(),
          "coverage", draft["coverage"])
    meta["model"] = fingerprint(model)
    meta["acceptance"] = {"top_rank": restricted.round(4).tolist(), "top1": restricted[:, 0].round(4).tolist(),
                          "top_rank_full_vocab": full.round(4).tolist(),
                          "measured_on": f"the last {args.val} held-out sequences (regenerated)"}
    meta["draft_vocab"] = draft
    write_tree(meta, restricted)


def write_tree(meta: dict, acc: np.ndarray) -> None:
    """``meta`` with the tree chosen from ``acc`` (same default size), written to heads.json."""
    old = meta["tree"]
    meta["tree"] = tree_meta(acc, old["default_nodes"])
    n = meta["tree"]["default_nodes"]
    same = sorted(map(tuple, old["paths"][:n])) == sorted(map(tuple, meta["tree"]["paths"][:n]))
    print(f"tree of {n} nodes: {'the same nodes' if same else 'other nodes'}; estimated tau "
          f"{old['estimated_tau']} -> {meta['tree']['estimated_tau']}")
    write_text_atomic(DEMO_HEADS_DIR / META, json.dumps(meta, indent=1) + "\n")
    print(f"wrote {DEMO_HEADS_DIR / META}")


if __name__ == "__main__":
    main()
