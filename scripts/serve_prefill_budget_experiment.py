"""Inter-token latency of running streams while long prompts prefill, with and without a prefill budget.

One paged ``SlotEngine`` of the demo model (float32, speculation off: one token per verify step),
compiled once and driven by a ``PagedScheduler`` per budget (``--prefill-budget`` of the server),
side by side in one process: ``--streams`` requests start and stream; once all are streaming,
``--long-prompts`` prompts of ``--long-tokens`` tokens arrive ``--gap`` seconds apart. For each
budget: the running streams' gaps between two deliveries (a delivery = one chunk's tokens) while a
long prompt is being prefilled (the window from its arrival to its first token) and outside it, the
largest stall, and the long prompts' TTFT (what the budget costs them). Timestamps are taken on the
scheduler thread (no HTTP in the way). Writes ``OUT.json`` and ``OUT.md``.

    python scripts/serve_prefill_budget_experiment.py --out docs/results/serving_prefill_budget_cpu
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import threading
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 128, 512], help="0: no budget")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--stream-prompt", type=int, default=64)
    p.add_argument("--long-prompts", type=int, default=2)
    p.add_argument("--long-tokens", type=int, default=1536)
    p.add_argument("--gap", type=float, default=1.0, help="seconds between two long prompts")
    p.add_argument("--before", type=float, default=1.0,
                   help="seconds of streaming measured before the first long prompt")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the budgets (interleaved)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--chunk-steps", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default=f"{platform.machine()} CPU, {os.cpu_count()} cores")
    p.add_argument("--out", default="runs/serving_prefill_budget")
    return p.parse_args(argv)


def run_budget(engine, budget, args, rng) -> dict:
    from quasar_jax.serving.paged_scheduler import PagedScheduler
    from quasar_jax.serving.scheduler import Finished, Request, Tokens
    from quasar_jax.serving.speculation import FixedPolicy

    vocab = engine.model.config.vocab_size if hasattr(engine, "model") else 1000
    lock, events, done = threading.Lock(), [], threading.Event()
    ends = {}

    def sink(name):
        def on(event):
            now = time.perf_counter()
            with lock:
                if isinstance(event, Tokens):
                    events.append((now, name, sum(map(len, event.groups))))
                elif isinstance(event, Finished) or hasattr(event, "message"):
                    ends[name] = now
                    if name.startswith("long") and sum(k.startswith("long") for k in ends) == args.long_prompts:
                        done.set()
        return on

    ids = lambda n: [rng.randrange(10, vocab) for _ in range(n)]  # noqa: E731
    # streams long enough to outlast every long prompt's prefill
    scheduler = PagedScheduler(engine, policy=FixedPolicy(0), prefill_budget=budget, prefix_caching=False).start()
    streams = [Request(prompt=ids(args.stream_prompt), max_tokens=args.max_len - args.stream_prompt - 64,
                       sink=sink(f"s{i}")) for i in range(args.streams)]
    try:
        for r in streams:
            scheduler.submit(r)
        while True:  # every stream streaming
            with lock:
                if len({n for _, n, _ in events}) == args.streams:
                    break
            time.sleep(0.01)
        time.sleep(args.before)  # the streams' pace with no prompt arriving
        arrivals = {}
        for j in range(args.long_prompts):
            arrivals[f"long{j}"] = time.perf_counter()
            scheduler.submit(Request(prompt=ids(args.long_tokens), max_tokens=4, sink=sink(f"long{j}")))
            time.sleep(args.gap)
        assert done.wait(1800)
        end = time.perf_counter()
        for r in streams:
            scheduler.cancel(r)
    finally:
        scheduler.stop()
    engine.reset()
    first = {n: min(t for t, m, _ in events if m == n) for n in arrivals}
    windows = [(arrivals[n], first[n]) for n in arrivals]
    start = windows[0][0]
    inside, before = [], []
    for i in range(args.streams):
        times = [t for t, m, _ in events if m == f"s{i}" and t <= end]
        for a, b in zip(times, times[1:]):
            if any(lo < b and a < hi for lo, hi in windows):
                inside.append(b - a)
            elif start - args.before <= a and b <= start:
                before.append(b - a)
    tokens = sum(n for t, m, n in events if m.startswith("s") and windows[0][0] <= t <= end)

    def stats(gaps):
        g = np.array(gaps) if gaps else np.zeros(1)
        return {"n": len(gaps), "mean_s": float(g.mean()), "p50_s": float(np.median(g)),
                "p99_s": float(np.percentile(g, 99)), "max_s": float(g.max())}
    return {"budget": budget, "during_prefill": stats(inside), "before": stats(before),
            "long_ttft_s": [first[n] - arrivals[n] for n in arrivals],
            "stream_tokens_per_s": tokens / (end - windows[0][0])}


def tables(report: dict) -> str:
    lines = ["| prefill budget (tokens) | round | stream gap during prefill: mean / p99 / max (s) | gap before: mean (s) "
             "| long prompt TTFT mean (s) | stream tokens/s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        d, o = r["during_prefill"], r["before"]
        lines.append(f"| {r['budget'] or 'none'} | {r['round']} | {d['mean_s']:.3f} / {d['p99_s']:.3f} / {d['max_s']:.3f} "
                     f"| {o['mean_s']:.3f} | {np.mean(r['long_ttft_s']):.2f} | {r['stream_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import quasar_jax as qj
    from quasar_jax.serving.server import ServeConfig, make_engine
    from quasar_jax.speculative.drafters import make_drafter

    model, _ = qj.load(args.model, dtype="float32")
    cfg = ServeConfig(drafter=make_drafter("none"), speculation="off", slots=args.slots, max_len=args.max_len,
                      chunk_steps=args.chunk_steps, prefill_chunk=args.prefill_chunk)
    t0 = time.perf_counter()
    engine = make_engine(model, cfg)
    compile_s = time.perf_counter() - t0
    engine.model = model
    rng = random.Random(args.seed)
    warm = dict_args(args, long_prompts=1, long_tokens=args.prefill_chunk * 2)
    run_budget(engine, args.budgets[-1], warm, rng)  # every program run once before timing
    report = {"machine": args.machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average_before": os.getloadavg(), "args": vars(args), "compile_s": compile_s, "runs": []}
    for round_, budget in itertools.product(range(args.repeats), args.budgets):
        report["runs"].append({"round": round_, **run_budget(engine, budget, args, random.Random(args.seed))})
        print(json.dumps(report["runs"][-1]), flush=True)
    report["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(tables(report))
    print(tables(report))
    return 0


def dict_args(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    raise SystemExit(main())
