"""Experts touched per verify step on a mixture of experts, against T (= draft length K + 1), and
the bytes model's prediction for int8 verification of a large MoE on an accelerator.

1. The model (default ``demo-moe``) writes its own greedy continuation of each prompt
   (autoregressive, float32); one teacher-forced forward routes every token; for each T the
   distinct experts of every window of T consecutive generated tokens are counted per sparse layer
   (a fully accepted verify step of K = T - 1 drafted tokens routes exactly such a window), next to
   independent uniform routing ``X (1 - (1 - k/X)^T)``.
2. n-gram chain decoding with K in ``--num-drafts``: tau (tokens per verify step) and the weight
   bytes per emitted token, ``bytes(K + 1) / tau``, float vs int8 (the bytes model of
   ``quasar_jax.bench.experts``).
3. The bytes model for ``--preset`` (default qwen3-30b-a3b) at batch 1: weight bytes per verify
   step in bfloat16 and int8 for each T (uniform routing: an upper bound, real routing is more
   local) and the implied step time at ``--hbm-tbps``.

    python scripts/bench_moe_experts.py --questions mini --max-new-tokens 96 \\
        --machine "CPU 2 cores, shared" --out docs/results/moe_experts_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from quasar_jax.bench.experts import routing, touched, uniform_touched, verify_bytes
from quasar_jax.bench.report import machine_info
from quasar_jax.cli.prompts import encode, load_questions
from quasar_jax.model.config import Qwen3Config
from quasar_jax.speculative.engine import Engine, GenerationConfig
from quasar_jax.weights.loading import load


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo-moe")
    p.add_argument("--questions", nargs="+", default=["mini"])
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-t", type=int, default=9)
    p.add_argument("--num-drafts", default="2,4,6")
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="accelerator memory bandwidth (H200: 4.8)")
    p.add_argument("--context", type=int, default=1024, help="context tokens whose KV cache a step reads")
    p.add_argument("--machine", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    model, tok = load(args.model, dtype="float32")
    cfg = model.config
    questions = load_questions(args.questions, args.num_prompts)
    prompts = [encode(tok, q.text, False) for q in questions]
    engine = Engine(model)
    ar = engine.generate(prompts, GenerationConfig(max_new_tokens=args.max_new_tokens, drafter="none"))
    ts = list(range(1, args.max_t + 1))
    per_t = {t: [] for t in ts}
    for prompt, out in zip(prompts, ar.tokens):
        routes = routing(model, list(prompt) + list(out))
        for t in ts:
            if len(out) >= t:
                per_t[t].append((touched(routes, t, start=len(prompt)), len(out) - t + 1))
    x, k = cfg.num_experts, cfg.num_experts_per_tok
    table = []
    for t in ts:
        pairs = per_t[t]
        mean = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        table.append(dict(T=t, K=t - 1, touched=round(mean, 3), uniform=round(uniform_touched(x, k, t), 3),
                          fraction=round(mean / x, 3)))

    decoding = []
    for num_draft in [int(v) for v in args.num_drafts.split(",")]:
        res = engine.generate(prompts, GenerationConfig(max_new_tokens=args.max_new_tokens, num_draft=num_draft))
        assert res.tokens == ar.tokens, "n-gram decoding differs from autoregressive"
        tau = res.batch_stats.mean_accepted
        row = next(r for r in table if r["T"] == num_draft + 1) if num_draft + 1 <= args.max_t else None
        e_t = row["touched"] if row else uniform_touched(x, k, num_draft + 1)
        one = {w: verify_bytes(cfg, k, int8=w == "int8", dtype_bytes=2).total for w in ("bf16", "int8")}
        step = {w: verify_bytes(cfg, e_t, int8=w == "int8", dtype_bytes=2).total for w in ("bf16", "int8")}
        decoding.append(dict(K=num_draft, tau=round(tau, 3), touched=round(e_t, 3),
                             **{f"bytes_per_token_{w}_vs_ar_bf16": round(step[w] / tau / one["bf16"], 3)
                                for w in ("bf16", "int8")}))

    big = Qwen3Config.preset(args.preset)
    prediction = []
    for t in ts:
        e_t = uniform_touched(big.num_experts, big.num_experts_per_tok, t)
        row = dict(T=t, touched_uniform=round(e_t, 2))
        for w in ("bf16", "int8"):
            b = verify_bytes(big, e_t, int8=w == "int8", context=args.context)
            row[f"gb_{w}"] = round(b.total / 1e9, 3)
            row[f"ms_{w}"] = round(b.total / (args.hbm_tbps * 1e12) * 1e3, 3)
        prediction.append(row)

    result = dict(model=args.model, config=dict(num_experts=x, top_k=k, sparse_layers=len(cfg.moe_layers)),
                  prompts=len(prompts), max_new_tokens=args.max_new_tokens, touched=table,
                  decoding=decoding, preset=args.preset, hbm_tbps=args.hbm_tbps, context=args.context,
                  prediction=prediction, machine=args.machine or machine_info(),
                  load_average=os.getloadavg())
    print(f"experts touched per sparse layer per verify step ({args.model}: {x} experts, top {k})")
    print("| K | T | touched | uniform routing | fraction of experts |\n|---|---|---|---|---|")
    for r in table:
        print(f"| {r['K']} | {r['T']} | {r['touched']:.2f} | {r['uniform']:.2f} | {r['fraction']:.2f} |")
    print("\nn-gram chain: weight bytes per emitted token relative to autoregressive bf16")
    print("| K | tau | touched | bf16 | int8 |\n|---|---|---|---|---|")
    for r in decoding:
        print(f"| {r['K']} | {r['tau']:.2f} | {r['touched']:.2f} | {r['bytes_per_token_bf16_vs_ar_bf16']:.2f} "
              f"| {r['bytes_per_token_int8_vs_ar_bf16']:.2f} |")
    print(f"\n{args.preset}, batch 1, context {args.context}: bytes per verify step (uniform routing)")
    print(f"| T | experts/layer | bf16 GB | int8 GB | bf16 ms | int8 ms (at {args.hbm_tbps} TB/s) |")
    print("|---|---|---|---|---|---|")
    for r in prediction:
        print(f"| {r['T']} | {r['touched_uniform']:.1f} | {r['gb_bf16']:.2f} | {r['gb_int8']:.2f} | "
              f"{r['ms_bf16']:.2f} | {r['ms_int8']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
