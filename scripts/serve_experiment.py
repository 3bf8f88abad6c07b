"""Load generator for ``quasar_jax.serve``: throughput and latency per decoding mode.

For each mode (ar: float autoregressive; sd: n-gram speculative, float; quasar / quasar-w8a8:
n-gram drafts verified by the int8 model, w8a16 / w8a8; qspec: W8A8 drafts, W8A16 verify) the
script starts the server in this process (uvicorn on 127.0.0.1, a free port) and sends Spec-Bench
prompts over HTTP with an async client (streaming ``/v1/completions``, greedy):

* ``--concurrency 1 4 16``: that many requests in flight at all times;
* ``--rates 0.5 2``: Poisson arrivals at these rates (requests/s);
* ``--offline``: every request at once, continuous batching (the server) against static batching
  (``Engine.generate`` on consecutive groups of ``--slots`` requests; a group runs until its last
  row is done, with the group's largest budget, each row then cut to its own).

Per run: throughput (completion tokens / makespan), time to first token and time per output
token p50/p90/p99 (client side), tau and slot occupancy (from the server's /metrics). Budgets are
drawn uniformly from [--min-tokens, --max-tokens] (seeded), so requests finish at different times.
Writes ``OUT.json``, ``OUT.md`` (a markdown table) and ``OUT.png`` (throughput against latency,
one curve per mode).

    python scripts/serve_experiment.py --modes ar quasar --concurrency 1 4 16 --offline \\
        --questions ../shared/specbench/*.jsonl --out docs/results/serving_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import platform
import random
import time
from pathlib import Path

import httpx
import numpy as np

MODES = {  # name -> (drafter, verifier)
    "ar": ("none", "float"), "sd": ("ngram", "float"), "quasar": ("ngram", "w8a16"),
    "quasar-w8a8": ("ngram", "w8a8"), "qspec": ("qspec", "w8a16"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["ar", "quasar"])
    p.add_argument("--concurrency", nargs="*", type=int, default=[1, 4, 16])
    p.add_argument("--rates", nargs="*", type=float, default=[])
    p.add_argument("--offline", action="store_true", help="also compare static and continuous batching")
    p.add_argument("--questions", nargs="+", default=sorted(glob.glob("../shared/specbench/*.jsonl")))
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--num-draft", type=int, default=5)
    p.add_argument("--chunk-steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default=f"{platform.machine()} CPU")
    p.add_argument("--out", default="runs/serving")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- workload
def make_requests(args, tokenizer) -> list[dict]:
    from quasar_jax.prompts import load_questions

    rng = random.Random(args.seed)
    questions = load_questions(args.questions)
    rng.shuffle(questions)
    reqs = []
    for q in questions:
        budget = rng.randint(args.min_tokens, args.max_tokens)
        n = len(tokenizer(q.text)["input_ids"])
        if n + budget <= args.max_len:
            reqs.append({"prompt": q.text, "max_tokens": budget, "prompt_tokens": n})
        if len(reqs) == args.num_requests:
            break
    return reqs


async def one_request(client: httpx.AsyncClient, model: str, req: dict) -> dict:
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            first = first or now
            last = now
            usage = chunk.get("usage") or usage
    n = usage["completion_tokens"]
    return {"ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else None, "latency": last - t0,
            "tokens": n, "steps": usage["verify_steps"]}


async def run_load(url: str, model: str, reqs: list[dict], *, concurrency: int | None = None,
                   rate: float | None = None, seed: int = 0) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=len(reqs) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if rate is None:
            sem = asyncio.Semaphore(concurrency)

            async def gated(r):
                async with sem:
                    return await one_request(client, model, r)
            results = await asyncio.gather(*(gated(r) for r in reqs))
        else:
            rng = np.random.default_rng(seed)
            tasks = []
            for r in reqs:
                tasks.append(asyncio.create_task(one_request(client, model, r)))
                await asyncio.sleep(rng.exponential(1.0 / rate))
            results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if not s.labels or set(s.labels) == {"outcome"}:
                out[s.name + "".join(f"{{{v}}}" for v in s.labels.values())] = s.value
    return out


def summarize(results: list[dict], wall: float, before: dict, after: dict, slots: int) -> dict:
    def pct(key):
        xs = [r[key] for r in results if r[key] is not None]
        return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)} if xs else {}

    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    tokens = sum(r["tokens"] for r in results)
    iters = d.get("quasar_loop_iterations_total", 0)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_s": pct("ttft"), "tpot_s": pct("tpot"), "latency_s": pct("latency"),
            "tau": d.get("quasar_accepted_length_sum", 0) / max(d.get("quasar_accepted_length_count", 0), 1),
            "slot_occupancy": d.get("quasar_busy_slot_iterations_total", 0) / max(iters * slots, 1)}


def static_batching(model, tokenizer, reqs, args, drafter, verifier, stop_ids) -> dict:
    """``Engine.generate`` on consecutive groups of ``slots`` requests (compile excluded)."""
    import quasar_jax as qj

    engine = qj.Engine(model)
    done_at, tokens, wall, t = [], 0, 0.0, 0.0
    for start in range(0, len(reqs), args.slots):
        group = reqs[start:start + args.slots]
        ids = [tokenizer(r["prompt"])["input_ids"] for r in group]
        cfg = qj.GenerationConfig(max_new_tokens=max(r["max_tokens"] for r in group), drafter=drafter,
                                  num_draft=args.num_draft, verifier=verifier, stop_ids=stop_ids,
                                  max_len=args.max_len)
        engine.generate(ids, cfg)  # compile (and warm) this group's shapes
        res = engine.generate(ids, cfg)
        t += res.batch_stats.wall_s
        wall += res.batch_stats.wall_s
        for r, out in zip(group, res.tokens):
            tokens += min(len(out), r["max_tokens"])
            done_at.append(t)
    lat = np.asarray(done_at)
    return {"requests": len(reqs), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_s": {f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)}}


# ----------------------------------------------------------------------------- driver
def run_mode(mode: str, args, reqs, tokenizer, model_dir, stop_ids) -> dict:
    import jax.numpy as jnp

    from quasar_jax.drafters import make_drafter
    from quasar_jax.loading import load_model
    from quasar_jax.serving.server import ServeConfig, ServerThread, build

    drafter_name, verifier = MODES[mode]
    drafter = make_drafter(drafter_name, num_draft=args.num_draft)
    model = load_model(model_dir, dtype=jnp.float32, int8=verifier != "float")
    cfg = ServeConfig(drafter=drafter, verifier=verifier, slots=args.slots, max_len=args.max_len,
                      chunk_steps=args.chunk_steps, max_queue=max(64, len(reqs)))
    t0 = time.perf_counter()
    app, _, _ = build(model, tokenizer, cfg, model_name="m", stop_ids=stop_ids)
    compile_s = time.perf_counter() - t0
    server = ServerThread(app).start()
    out = {"mode": mode, "drafter": drafter_name, "verifier": verifier, "compile_s": compile_s, "runs": []}
    try:
        asyncio.run(run_load(server.url, "m", reqs[:2], concurrency=2))  # warm-up
        loads = [("concurrency", c) for c in args.concurrency] + [("rate", r) for r in args.rates]
        if args.offline:
            loads.append(("offline", len(reqs)))
        for kind, value in loads:
            before = scrape(server.url)
            results, wall = asyncio.run(run_load(
                server.url, "m", reqs, concurrency=value if kind != "rate" else None,
                rate=value if kind == "rate" else None, seed=args.seed))
            row = {"load": kind, "value": value, **summarize(results, wall, before, scrape(server.url), args.slots)}
            print(json.dumps({"mode": mode, **row}), flush=True)
            out["runs"].append(row)
    finally:
        server.stop()
    if args.offline:
        row = {"load": "static", "value": len(reqs),
               **static_batching(model, tokenizer, reqs, args, drafter_name, verifier, stop_ids)}
        print(json.dumps({"mode": mode, **row}), flush=True)
        out["runs"].append(row)
    return out


def _ms(d: dict, q: str) -> str:
    return f"{1000 * d[q]:.0f}" if d and q in d else "-"


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Machine: {report['machine']}; model {report['model']}, float32; {report['num_requests']} "
             f"requests, budgets {report['budgets']} tokens, {report['slots']} slots, cache {report['max_len']}.", "",
             "| mode | load | tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | latency p50/p99 s | tau | occupancy |",
             "| --- | --- | ---: | --- | --- | --- | ---: | ---: |"]
    for m in report["modes"]:
        for r in m["runs"]:
            load = {"concurrency": f"concurrency {r['value']}", "rate": f"Poisson {r['value']}/s",
                    "offline": f"offline, continuous ({r['value']})", "static": f"offline, static ({r['value']})"}[r["load"]]
            ttft, tpot, lat = r.get("ttft_s", {}), r.get("tpot_s", {}), r["latency_s"]
            lines.append(f"| {m['mode']} | {load} | {r['tokens_per_s']:.1f} | "
                         f"{_ms(ttft, 'p50')}/{_ms(ttft, 'p90')}/{_ms(ttft, 'p99')} | "
                         f"{_ms(tpot, 'p50')}/{_ms(tpot, 'p90')}/{_ms(tpot, 'p99')} | "
                         f"{lat['p50']:.2f}/{lat['p99']:.2f} | {r.get('tau', float('nan')):.2f} | "
                         f"{r.get('slot_occupancy', float('nan')):.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in report["modes"]:
        pts = sorted((r["tokens_per_s"], 1000 * r["tpot_s"]["p50"], r["value"]) for r in m["runs"]
                     if r["load"] in ("concurrency", "rate") and r.get("tpot_s"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m["mode"])
            for x, y, v in pts:
                ax.annotate(str(v), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput (completion tokens/s)")
    ax.set_ylabel("time per output token, p50 (ms)")
    ax.set_title(f"quasar_jax.serve, {report['model']} model, {report['machine']}\n(points: concurrency)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv=None) -> int:
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from quasar_jax.loading import load_tokenizer, resolve_model_dir
    from quasar_jax.prompts import stop_ids_of

    args = parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    stop_ids = stop_ids_of(tokenizer, model_dir)
    reqs = make_requests(args, tokenizer)
    report = {"machine": args.machine, "model": args.model, "num_requests": len(reqs),
              "budgets": [args.min_tokens, args.max_tokens], "slots": args.slots, "max_len": args.max_len,
              "num_draft": args.num_draft, "chunk_steps": args.chunk_steps,
              "questions": [Path(q).name for q in args.questions], "modes": []}
    for mode in args.modes:
        report["modes"].append(run_mode(mode, args, reqs, tokenizer, model_dir, stop_ids))
        write_outputs(report, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
