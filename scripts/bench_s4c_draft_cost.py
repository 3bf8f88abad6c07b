"""S4C's drafting cost against a verify step: measured CPU times beside a bytes model.

For the demo model (its weights) and random-weight Qwen3-0.6B and Qwen3-8B shapes (``configs/``),
at batch 1 and 16, in one process: the compiled draft program (the heads growing the default
16-node tree over K = 5 depths, ``s4c.grow_tree``) with the full vocabulary and with a draft
vocabulary of V/4 ids, each with float and int8 reads of the LM head slice; and a verify forward
of 1 and K+1 = 6 tokens over a cache of 128 committed positions. The random shapes are built with
1 and 6 decoder layers and the verify time is extrapolated per layer (a line through both); a shape
of at most 4 GB of weights (the 0.6B one) is also built whole and timed, which checks the
extrapolation; the 8B one is only extrapolated. Drafting does not depend on the layer count. Every shape runs in float32: XLA:CPU's bfloat16 dots
run far below the memory bound (one bfloat16 decoder layer of the 8B shape takes about 1 s for a
1-token verify, under 0.5 GB/s), so CPU times would not track bytes. The 8B shape (``--models
qwen3-8b``, not a default) skips the full-vocabulary int8 slice and needs about 12 GiB.

Bytes model (weights read per step; KV cache and activations left out): a verify reads every
decoder layer and the LM head once, whatever its token count on an accelerator; drafting reads,
per depth, one head block (3 D^2, float32 as loaded) and the LM head slice (N D at the model's
width, or 1 byte + a scale per column for int8 reads). r = draft / verify(1 token).

    python scripts/bench_s4c_draft_cost.py --out docs/results/s4c_draft_cost_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quasar_jax.bench.report import machine_info
from quasar_jax.bench.step_cost import carried_ms, median_ms, verify_program
from quasar_jax.model.config import Qwen3Config
from quasar_jax.model.qwen3 import Qwen3
from quasar_jax.speculative.heads import DEMO_HEADS_DIR, DraftHeads, draft_slice, load_heads
from quasar_jax.speculative.s4c import TreeShape, grow_tree
from quasar_jax.weights.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
K, NODES, CTX = 5, 16, 128
FEW = (1, 6)  # decoder layers of the builds a verify per layer is extrapolated from
WHOLE_BYTES = 4e9  # shapes with at most these weight bytes are also built whole (and timed so)


def verify_ms(model: Qwen3, b: int, t: int, calls: int) -> float:
    graphdef, params = nnx.split(model)
    cache = model.init_cache(b, CTX + 16).replace(lengths=jnp.full((b,), CTX, jnp.int32))
    return carried_ms(verify_program(graphdef), (params, jnp.ones((b, t), jnp.int32)), cache, calls)


def draft_ms(model: Qwen3, heads: DraftHeads, tree: TreeShape, vocab, b: int, calls: int) -> float:
    graphdef, hp = nnx.split(heads)
    mdef, mp = nnx.split(model)  # the model's weights are an input, not constants of the program
    fn = jax.jit(lambda mp, hp, v, h, t: grow_tree(nnx.merge(graphdef, hp), nnx.merge(mdef, mp), tree, h, t, v))
    h = jax.random.normal(jax.random.key(0), (b, model.config.hidden_size))
    return median_ms(fn, (mp, hp, vocab, h, jnp.ones((b,), jnp.int32)), calls)


def bytes_model(cfg: Qwen3Config, width: int, n: int) -> dict:
    """Weights read per step (bytes): verify (float / int8 decoder layers) and drafting over N ids."""
    d, v = cfg.hidden_size, cfg.vocab_size
    e, q, g = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    layer = d * e * (2 * q + 2 * g) + 3 * d * cfg.intermediate_size  # attention + MLP projections
    head = v * d  # the LM head (tied: the embedding), float in both (int8 only with --quantize-lm-head)
    verify = {"float": cfg.num_hidden_layers * layer * width + head * width,
              "int8": cfg.num_hidden_layers * layer * 1 + head * width}
    blocks = K * 3 * d * d * 4
    draft = {"full-float": blocks + K * v * d * width, "vocab-float": blocks + K * n * d * width,
             "full-int8": blocks + K * v * (d + 4), "vocab-int8": blocks + K * n * (d + 4)}
    return {"verify_bytes": verify, "draft_bytes": draft,
            "r": {f"{k} vs {m} verify": draft[k] / verify[m] for k in draft for m in ("float", "int8")
                  if k.endswith(m)}}


def shape_model(cfg: Qwen3Config, layers: int, dtype) -> Qwen3:
    return Qwen3(dataclasses.replace(cfg, num_hidden_layers=layers), dtype=dtype, rngs=nnx.Rngs(0))


def weight_bytes(cfg: Qwen3Config, width: int) -> float:
    d, e, q, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    layer = d * e * (2 * q + 2 * g) + 3 * d * cfg.intermediate_size
    return width * (cfg.num_hidden_layers * layer + cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2))


def extrapolate(per: dict, layers: int) -> dict:
    """Verify times of ``layers`` layers from those of the FEW-layer builds (a line through both)."""
    (l1, a), (l2, b) = sorted(per.items())
    return {t: a[t] + (layers - l1) * (b[t] - a[t]) / (l2 - l1) for t in a}


def run(name: str, cfg: Qwen3Config, dtype, tree: TreeShape, calls: int, batches) -> dict:
    width = jnp.dtype(dtype).itemsize
    n = cfg.vocab_size // 4
    ids = np.arange(n, dtype=np.int32)  # which ids does not change the cost
    whole = name == "demo" or weight_bytes(cfg, width) <= WHOLE_BYTES
    out = {"model": name, "dtype": jnp.dtype(dtype).name, "vocab_size": cfg.vocab_size, "draft_vocab": n,
           "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers, "built_whole": whole,
           "bytes_model_bf16": bytes_model(cfg, 2, n), "bytes_model_run_dtype": bytes_model(cfg, width, n),
           "batches": {}}
    heads = DraftHeads(K, cfg.hidden_size, rngs=nnx.Rngs(1))
    for b in batches:
        row, m = {}, None
        if name != "demo":  # a verify per layer from FEW-layer builds (for the whole ones: a check)
            per = {}
            for layers in sorted(FEW, reverse=True):  # the smallest build last: it may draft
                m = shape_model(cfg, layers, dtype)
                per[layers] = {t: verify_ms(m, b, t, calls) for t in (1, K + 1)}
                if layers != min(FEW) or whole:
                    del m
                    m = None
                    gc.collect()
            row["verify_ms_few_layers"] = per
            row["verify_ms_extrapolated"] = extrapolate(per, cfg.num_hidden_layers)
        if whole:
            m = load_model("demo", dtype=dtype) if name == "demo" else shape_model(cfg, cfg.num_hidden_layers, dtype)
            row["verify_ms"] = {t: verify_ms(m, b, t, calls) for t in (1, K + 1)}
        else:  # drafting reads the embedding and LM head only: the 1-layer build drafts
            row["verify_ms"] = row["verify_ms_extrapolated"]
        params = nnx.split(m)[1]
        variants = {"full-float": None, "vocab-float": draft_slice(params, ids, int8=False),
                    "vocab-int8": draft_slice(params, ids, int8=True)}
        if cfg.vocab_size * cfg.hidden_size < 2e8:
            variants["full-int8"] = draft_slice(params, np.arange(cfg.vocab_size, dtype=np.int32), int8=True)
        row["draft_ms"] = {k: draft_ms(m, heads, tree, v, b, calls) for k, v in variants.items()}
        row["r_measured"] = {f"{k} vs verify(1)": row["draft_ms"][k] / row["verify_ms"][1] for k in row["draft_ms"]}
        row["r_measured"].update({f"{k} vs verify(K+1)": row["draft_ms"][k] / row["verify_ms"][K + 1]
                                  for k in row["draft_ms"]})
        out["batches"][b] = row
        print(name, b, json.dumps(row), flush=True)
        del variants, m, params
        gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["demo", "qwen3-0.6b"],
                    help="demo, qwen3-0.6b, qwen3-8b (the 8B shape needs ~12 GiB with 6 layers: not a default)")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the random-weight shapes' dtype (the demo runs float32)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tree = TreeShape.from_ranked(load_heads(DEMO_HEADS_DIR).meta["tree"]["paths"], NODES, K)
    load_before = os.getloadavg()
    results = []
    for name in args.models:
        if name == "demo":
            cfg, dtype = load_model("demo").config, jnp.float32
        else:
            cfg = Qwen3Config.from_json(ROOT / "configs" / f"{name}.json")
            dtype = jnp.dtype(args.dtype)
        results.append(run(name, cfg, dtype, tree, args.calls, args.batches))
        gc.collect()
        info = machine_info()
        info.update(loadavg_before=load_before, loadavg_after=os.getloadavg())
        report = {"machine": info, "num_draft": K, "tree_nodes": NODES, "context": CTX, "results": results}
        if args.out:  # after every model: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
