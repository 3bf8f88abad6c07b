"""Sharded decoding per mesh (decode tokens/s, verify-step ms, w8a8 exact-match rate) and the
per-device memory plan of the Qwen3 presets.

    python scripts/bench_sharding.py --out docs/results/sharding_cpu8      # 8 fake CPU devices
    python scripts/bench_sharding.py --plan-only --out docs/results/memory_plan

Without accelerators the script asks XLA for 8 host devices (``--devices``). Fake CPU devices
share the machine's cores, so the figures show the overhead of partitioning, not a speedup.
The model is a random Qwen3 with 8 query and 8 kv heads (Qwen3's G = 8), so every mesh up to
model=8 shards heads; all meshes decode the same prompts with the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices when none are present")
    p.add_argument("--meshes", nargs="+", default=["data=1,model=1", "data=1,model=8", "data=2,model=4",
                                                   "data=4,model=2", "data=8,model=1"])
    p.add_argument("--verifiers", nargs="+", default=["float", "w8a16", "w8a8"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--num-draft", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per program (best is kept)")
    p.add_argument("--machine", default=None, help="machine name for the JSON")
    p.add_argument("--plan-only", action="store_true", help="only the memory plan")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    return p.parse_args(argv)


def bench_config():
    from quasar_jax.model.config import Qwen3Config

    return Qwen3Config(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, head_dim=64, intermediate_size=1536,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def random_model(cfg, int8: bool):
    """Random weights with decisive logits (kernels ~ N(0, 2/fan_in), norms 1 +- 0.3)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from quasar_jax.model.quant import quantize_model
    from quasar_jax.model.qwen3 import Qwen3

    model = Qwen3(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))

    def init(x):
        k = next(keys)
        if x.ndim == 1:
            return 1.0 + 0.3 * jax.random.normal(k, x.shape, x.dtype)
        return jax.random.normal(k, x.shape, x.dtype) * (2.0 / x.shape[0]) ** 0.5

    nnx.update(model, jax.tree.map(init, state))
    return quantize_model(model) if int8 else model


def prompts(batch: int, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(batch):  # repetitive, ragged: n-gram drafts find matches
        motif = rng.integers(1, vocab, size=4 + i % 5).tolist()
        out.append((motif * 8)[: 20 + 3 * i])
    return out


def bench_meshes(args) -> list[dict]:
    import jax

    from quasar_jax.speculative.engine import Engine, GenerationConfig

    cfg = bench_config()
    batch = prompts(args.batch, cfg.vocab_size)
    rows, reference = [], {}
    for verifier in args.verifiers:
        for mesh in args.meshes:
            engine = Engine(random_model(cfg, verifier != "float"), mesh=mesh)
            gen = GenerationConfig(max_new_tokens=args.max_new_tokens, num_draft=args.num_draft,
                                   verifier=verifier)
            first = engine.generate(batch, gen)
            best = min((engine.generate(batch, gen) for _ in range(args.repeats)),
                       key=lambda r: r.batch_stats.wall_s)
            stats = best.batch_stats
            reference.setdefault(verifier, first.tokens)  # the first mesh is the single device
            same = [a == b for a, b in zip(first.tokens, reference[verifier])]
            row = {"mesh": mesh, "verifier": verifier, "drafter": "ngram", "batch": args.batch,
                   "new_tokens": stats.new_tokens, "loop_iterations": stats.loop_iterations,
                   "tau": round(stats.mean_accepted, 3), "wall_s": round(stats.wall_s, 4),
                   "tokens_per_s": round(stats.tokens_per_s, 1),
                   "verify_step_ms": round(1000 * stats.wall_s / max(stats.loop_iterations, 1), 2),
                   "compile_s": round(first.batch_stats.compile_s, 2),
                   "exact_match_vs_one_device": round(sum(same) / len(same), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del engine
            jax.clear_caches()
    return rows


def plan_rows() -> list[dict]:
    from quasar_jax.model.config import Qwen3Config
    from quasar_jax.sharding import memory_plan

    rows = []
    for preset in ("qwen3-8b", "qwen3-14b", "qwen3-32b"):
        cfg = Qwen3Config.preset(preset)
        for int8 in (False, True):
            for chips in (1, 4, 8):
                for gb in (16, 80):
                    plan = memory_plan(cfg, f"data=1,model={chips}", dtype="bfloat16", int8=int8,
                                       batch=16, cache_len=4096, device_gb=gb, name=preset)
                    rows.append({**plan.to_dict(), "chips": chips})
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") and not args.plan_only:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    import jax

    gib = 1024**3
    machine = args.machine or (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                               f"{jax.device_count()} {jax.default_backend()} devices")
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__}
    text = []
    if not args.plan_only:
        result["decode"] = bench_meshes(args)
        result["model"] = dict(vars(bench_config()))
        text.append(f"Sharded decoding ({machine}; batch {args.batch}, K {args.num_draft}, n-gram drafts)\n")
        text.append(table(result["decode"], ["mesh", "verifier", "tokens_per_s", "verify_step_ms", "tau",
                                             "compile_s", "exact_match_vs_one_device"]))
    plan = plan_rows()
    result["memory_plan"] = plan
    for r in plan:
        r["per_device_gib"] = round(r["total_bytes"] / gib, 2)
        r["headroom_gib"] = round(r["headroom_bytes"] / gib, 2)
    text.append("\nMemory plan per device (params + KV cache; batch 16 x 4096 slots, bf16 cache)\n")
    text.append(table(plan, ["model", "weights", "chips", "device_bytes", "per_device_gib", "headroom_gib",
                             "fits"]).replace(str(16 * gib), "16 GiB").replace(str(80 * gib), "80 GiB"))
    print("\n".join(text))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".txt").write_text("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
